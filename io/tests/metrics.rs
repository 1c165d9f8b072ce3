//! Every node's Prometheus metrics (docs/operations.md, "Metrics"), scraped from real processes: a
//! master and a minion with clients on both, a hunt, a refused connection. `prometheus_*` runs a
//! real Prometheus server against them (`scripts/prometheus-test.sh`, called by `.ci/run`).

mod common;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

const CLIENTS: usize = 6;

/// A master and one minion serving metrics, `CLIENTS` pool clients spread over both, and a hunt
/// that reached all of them. Returns the processes (kept alive), the minion's name, and the two
/// metrics ports (master, minion).
struct Cluster {
    _procs: Vec<Proc>,
    minion: String,
    ports: [u16; 2],
    hunt: String,
}

/// A client config whose only frontend is `url`.
fn client_config_for(d: &Deployment, url: &str, name: &str) -> String {
    let mut c: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(d.path("client.config.yaml")).unwrap())
            .unwrap();
    c["Client"]["server_urls"] = serde_yaml_ng::Value::Sequence(vec![url.into()]);
    let path = d.s(name);
    std::fs::write(&path, serde_yaml_ng::to_string(&c).unwrap()).unwrap();
    path
}

/// `n` pool clients of `config`, keyed in `dir`.
fn pool(d: &Deployment, config: &str, n: usize, dir: &str) -> Proc {
    let log = std::fs::File::create(d.path(&format!("{dir}.log"))).unwrap();
    Proc(
        talon()
            .args(["-c", config, "pool-client", "--number", &n.to_string()])
            .args(["--writeback-dir", &d.s(dir), "--start-rate", "0"])
            .args(["--hostname-prefix", dir])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn cluster(d: &Deployment) -> Cluster {
    let (minion, minion_port) = d.add_minion();
    let ports = free_ports::<2>();
    let [pm, pn] = ports.map(|p| p.to_string());
    let master = d.start_master_with(&["--monitoring-port", &pm]);
    let local = d.s(&format!("local-{minion}"));
    let minion_proc = d.start_frontend(
        &minion,
        &[
            "--minion",
            "--node",
            &minion,
            "--local-dir",
            &local,
            "--monitoring-port",
            &pn,
        ],
    );
    d.wait_until("the minion listens", || {
        std::net::TcpStream::connect(("127.0.0.1", minion_port)).is_ok()
    });
    // Half the clients on each node, by giving each half one frontend only.
    let server: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(d.path("server.config.yaml")).unwrap())
            .unwrap();
    let master_port = server["Frontend"]["bind_port"].as_u64().unwrap();
    let on_master = client_config_for(d, &format!("https://127.0.0.1:{master_port}/"), "m.yaml");
    let on_minion = client_config_for(d, &format!("https://127.0.0.1:{minion_port}/"), "n.yaml");
    let pools = [
        pool(d, &on_master, CLIENTS / 2, "pm"),
        pool(d, &on_minion, CLIENTS - CLIENTS / 2, "pn"),
    ];
    d.wait_until("the pools connect, half to each node", || {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for c in d.clients().iter().filter(|c| c["connected"] == true) {
            *by.entry(c["node"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        by.values().sum::<usize>() == CLIENTS && by.get(&minion) == Some(&(CLIENTS - CLIENTS / 2))
    });
    let hunt = d
        .api(&["hunt", "create", "Generic.Client.Info"])
        .trim()
        .to_owned();
    d.wait_until("the hunt completes on every client", || {
        let s = json(&d.api(&["hunt", "show", &hunt, "--json"]));
        s["stats"]["completed"].as_u64() == Some(CLIENTS as u64)
    });
    let [pm, pn] = pools;
    Cluster {
        _procs: vec![master, minion_proc, pm, pn],
        minion,
        ports,
        hunt,
    }
}

fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn each_node_counts_its_clients_rows_volume_and_replication() {
    let d = Deployment::new();
    let c = cluster(&d);
    let [pm, pn] = c.ports;
    // Gauges move with the actor's next message and the link's next turn: wait for what the hunt
    // and the connections must have left.
    d.wait_until(
        "both nodes report their clients and the hunt's rows, the master's metadata flushed",
        || {
            let (m, n) = (scrape(pm), scrape(pn));
            let clients =
                value(&m, "talon_clients_connected") + value(&n, "talon_clients_connected");
            let rows =
                value(&m, "talon_rows_received_total") + value(&n, "talon_rows_received_total");
            // The master's metadata reaches the volume behind its journal, a moment later.
            let flushed = sample(
                &m,
                "talon_volume_operation_duration_seconds_count{op=\"write_many\",store=\"datastore\"}",
            )
            .is_some_and(|n| n > 0.0);
            clients == CLIENTS as f64 && rows >= CLIENTS as f64 && flushed
        },
    );
    let (m, n) = (scrape(pm), scrape(pn));
    for (text, role) in [(&m, "master"), (&n, "minion")] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("talon_node_info{")
                    && l.contains(&format!("role=\"{role}\""))),
            "{role}: {text}"
        );
        assert!(value(text, "talon_clients_connected") > 0.0, "{role}");
        assert!(value(text, "talon_rows_received_total") > 0.0, "{role}");
        assert!(
            value(text, "talon_client_messages_received_total{kind=\"final\"}") > 0.0,
            "{role}"
        );
        // Each node copied its clients' messages to the shared filestore, and timed it.
        assert!(
            value(
                text,
                "talon_volume_operation_duration_seconds_count{op=\"append\",store=\"filestore\"}"
            ) > 0.0,
            "{role}"
        );
        assert!(
            value(
                text,
                "talon_volume_written_bytes_total{store=\"filestore\"}"
            ) > 0.0
        );
        assert!(
            value(text, "process_open_fds") > 0.0
                && value(text, "process_resident_memory_bytes") > 0.0
        );
        assert!(
            value(
                text,
                "talon_connections_accepted_total{listener=\"frontend\"}"
            ) > 0.0,
            "{role}"
        );
    }
    // The master: its hunt runs (until it expires), its metadata reached the volume, the minion's
    // stream is up and its events arrived; the API's calls are counted by method.
    assert_eq!(value(&m, "talon_hunts_running"), 1.0, "{}", c.hunt);
    assert!(
        value(
            &m,
            "talon_volume_operation_duration_seconds_count{op=\"write_many\",store=\"datastore\"}"
        ) > 0.0
    );
    let minion = &c.minion;
    assert_eq!(
        value(
            &m,
            &format!("talon_replication_connected{{minion=\"{minion}\"}}")
        ),
        1.0
    );
    assert!(
        value(
            &m,
            &format!("talon_replication_received_events_total{{minion=\"{minion}\"}}")
        ) > 0.0
    );
    assert!(
        value(
            &m,
            "talon_api_request_duration_seconds_count{method=\"CreateHunt\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            "talon_api_requests_total{code=\"Ok\",method=\"CreateHunt\"}"
        ) >= 1.0
    );
    // The minion: its link is up and the master applied everything (the hunt is over).
    assert_eq!(
        value(
            &n,
            &format!("talon_replication_connected{{minion=\"{minion}\"}}")
        ),
        1.0
    );
    d.wait_until("the minion's backlog drains", || {
        let n = scrape(pn);
        value(&n, "talon_replication_backlog_events") == 0.0
            && value(&n, "talon_replication_lag_seconds") == 0.0
    });
    assert!(value(&n, "talon_writebehind_backlog_bytes{buffer=\"filestore\"}") >= 0.0);
    // The master's view of the same backlog (`cluster status`): the minion reported its outbox
    // with its last batch, and all of it is durable on the master now.
    d.wait_until("the master shows the minion's backlog drained", || {
        let s = json(&d.api(&["cluster", "status", "--json"]));
        let m = s["minions"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["node"] == minion.as_str()).cloned())
            .unwrap_or_default();
        m["connected"] == true && m["backlog_events"] == 0 && m["lag_ms"] == 0
    });
    let text = d.api(&["cluster", "status"]);
    let row = text
        .lines()
        .find(|l| l.starts_with(minion.as_str()))
        .unwrap_or_else(|| panic!("no row for {minion}:\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "connected", "{text}");
    assert_eq!(&cells[4..], ["0", "0s"], "backlog and lag: {text}");
}

#[test]
fn refused_connections_are_counted_by_reason_and_the_listener_answers_only_metrics() {
    let d = Deployment::new();
    let port = free_port();
    let _master = d.start_master_with(&["--monitoring-port", &port.to_string()]);
    let fe: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(d.path("server.config.yaml")).unwrap())
            .unwrap();
    let fe_port = fe["Frontend"]["bind_port"].as_u64().unwrap() as u16;
    let refused = |text: &str| {
        sample(
            text,
            "talon_connections_refused_total{listener=\"frontend\",reason=\"handshake_failed\"}",
        )
        .unwrap_or(0.0)
    };
    let before = refused(&scrape(port));
    // Not TLS at all: the handshake fails.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", fe_port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    }
    d.wait_until("the refusal is counted", || refused(&scrape(port)) > before);

    assert_eq!(http_get(port, "/nothing").unwrap().0, 404);
    let (status, body) = http_get(port, "/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("/metrics"), "{body}");

    // The bound: with every slot held by a connection that sends nothing, a scrape waits for a
    // slot, and is served once one is given back.
    let idle: Vec<std::net::TcpStream> = (0..talon_io::metrics::CONNECTIONS_MAX)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(http_get(port, "/metrics").map(|r| r.0));
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        rx.try_recv().is_err(),
        "a scrape was served beyond the bound"
    );
    drop(idle);
    let status = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(status, 200);
}

/// `s` percent-encoded for a URL's query.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector from Prometheus's HTTP API.
fn query(port: u16, q: &str) -> Vec<serde_json::Value> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(q))).unwrap();
    let v = json(&body);
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("success")),
        "{q}: {body}"
    );
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn number(series: &serde_json::Value) -> f64 {
    series["value"][1].as_str().unwrap().parse().unwrap()
}

/// The acceptance test of the metrics: a real Prometheus (Debian's) scrapes a real master and
/// minion through a hunt; its HTTP API shows clients per node, rows received and the replication
/// lag; `promtool check metrics` passes on each node's output; every query of the Grafana
/// dashboard in `deploy/grafana/` returns data.
#[test]
#[ignore = "needs prometheus and promtool (scripts/prometheus-test.sh installs them)"]
fn prometheus_scrapes_every_node_and_the_dashboard_queries_return_data() {
    let d = Deployment::new();
    let c = cluster(&d);
    // The check bites: a counter without `_total` and a family without help fail it.
    let planted = "# TYPE talon_bad counter\ntalon_bad 1\n";
    assert!(
        promtool_check(planted).is_err(),
        "promtool passed {planted:?}"
    );
    for port in c.ports {
        if let Err(e) = promtool_check(&scrape(port)) {
            panic!("promtool check metrics on port {port}: {e}");
        }
    }

    let prom = free_port();
    let targets: Vec<String> = c.ports.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
    std::fs::write(
        d.path("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: talon\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.path("prometheus.log")).unwrap();
    let _prometheus = Proc(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", d.s("prometheus.yml")))
            .arg(format!("--storage.tsdb.path={}", d.s("tsdb")))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (apt-get install prometheus)"),
    );
    d.wait_until("Prometheus scrapes both nodes", || {
        http_get(prom, "/-/ready").is_ok_and(|r| r.0 == 200) && query(prom, "up == 1").len() == 2
    });
    // Rates need two samples of each series in their window.
    d.wait_until("Prometheus holds the cluster's figures", || {
        let clients: f64 = query(prom, "talon_clients_connected")
            .iter()
            .map(number)
            .sum();
        clients == CLIENTS as f64
            && query(prom, "count_over_time(talon_rows_received_total[1m]) >= 3").len() == 2
    });
    let per_node = query(prom, "talon_clients_connected > 0");
    assert_eq!(per_node.len(), 2, "clients on both nodes: {per_node:?}");
    let rows = query(prom, "sum(talon_rows_received_total)");
    assert!(number(&rows[0]) >= CLIENTS as f64, "{rows:?}");
    let lag = query(prom, "talon_replication_lag_seconds");
    let minion_lag: Vec<_> = lag
        .iter()
        .filter(|s| s["metric"]["instance"] == format!("127.0.0.1:{}", c.ports[1]).as_str())
        .collect();
    assert_eq!(minion_lag.len(), 1, "the minion's lag: {lag:?}");
    let up = query(
        prom,
        &format!("talon_replication_connected{{minion=\"{}\"}}", c.minion),
    );
    assert_eq!(up.len(), 2, "the master's and the minion's view: {up:?}");

    // The dashboard: every target's query, with Grafana's variables as Grafana would fill them.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/talon-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // The emptiness check bites: a series nothing exports is empty.
    assert!(query(prom, "talon_no_such_series").is_empty());
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".+")
                .replace("$__rate_interval", "30s");
            let r = query(prom, &q);
            assert!(
                !r.is_empty(),
                "panel {:?}: {q} returned nothing",
                panel["title"]
            );
            checked += 1;
        }
    }
    let variable = &dash["templating"]["list"][0]["query"]["query"];
    assert_eq!(variable, "label_values(talon_node_info, instance)");
    assert_eq!(query(prom, "talon_node_info").len(), 2);
    eprintln!("{checked} dashboard queries returned data");
}

/// `promtool check metrics` on `text`: its complaints if it has any.
fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
