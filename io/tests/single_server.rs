//! Talon in single-server mode as a user runs it: real `talon` processes on loopback.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn talon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_talon"))
}

fn run(args: &[&str]) -> Output {
    talon().args(args).output().expect("run talon")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "talon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Deployment {
    dir: tempfile::TempDir,
}

impl Deployment {
    fn new() -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: u16| n.to_string();
        let (fe, api, gui) = (free_port(), free_port(), free_port());
        let out = dir.path().to_str().unwrap().to_owned();
        let shared = dir.path().join("shared");
        ok(&[
            "config",
            "generate",
            "--hostname",
            "127.0.0.1",
            "--frontend-port",
            &p(fe),
            "--api-port",
            &p(api),
            "--gui-port",
            &p(gui),
            "--datastore",
            shared.to_str().unwrap(),
            "--out-dir",
            &out,
        ]);
        let d = Deployment { dir };
        ok(&[
            "-c",
            d.path("server.config.yaml").to_str().unwrap(),
            "config",
            "api-client",
            "--name",
            "alice",
            "--out",
            d.path("api.yaml").to_str().unwrap(),
        ]);
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    fn start_master(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("master.log"))
            .unwrap();
        let child = talon()
            .args([
                "-c",
                &self.s("server.config.yaml"),
                "frontend",
                "--local-dir",
                &self.s("local"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Proc(child);
        self.wait_until("the API answers", || {
            run(&[
                "--api-config",
                &self.s("api.yaml"),
                "clients",
                "search",
                "all",
            ])
            .status
            .success()
        });
        p
    }

    fn start_client(&self, config: &Path, name: &str) -> Proc {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = talon()
            .args([
                "-c",
                config.to_str().unwrap(),
                "client",
                "--writeback",
                &self.s(&format!("{name}.wb.yaml")),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    fn api(&self, args: &[&str]) -> String {
        let mut a = vec!["--api-config".to_string(), self.s("api.yaml")];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ok(&a)
    }

    fn clients(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<Vec<serde_json::Value>>(
            &self.api(&["clients", "search", "all", "--json"]),
        )
        .unwrap()
    }

    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            if start.elapsed() > Duration::from_secs(120) {
                let log = std::fs::read_to_string(self.path("master.log")).unwrap_or_default();
                panic!("timed out waiting until {what}; master log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn collections_work_end_to_end_and_survive_a_master_sigkill() {
    let d = Deployment::new();
    let master = d.start_master();
    let _client = d.start_client(&d.path("client.config.yaml"), "c1");
    d.wait_until("the client enrols", || d.clients().len() == 1);
    let c = d.clients()[0].clone();
    assert_eq!(c["connected"], true);
    assert_eq!(c["os"], "linux");
    let id = c["client_id"].as_str().unwrap().to_owned();

    let info = json(&d.api(&["collect", &id, "Generic.Client.Info", "--wait", "--json"]));
    assert_eq!(
        (info["state"].as_str(), info["rows"].as_u64()),
        (Some("completed"), Some(1))
    );
    let rows = d.api(&["flow", "results", &id, info["flow_id"].as_str().unwrap()]);
    assert_eq!(json(rows.trim())["os"], "linux");

    // FileFinder with upload=true: the file is rebuilt in the filestore, byte for byte.
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect(); // > one 512 KiB chunk
    std::fs::write(d.path("evidence.bin"), &payload).unwrap();
    let glob = format!("{}/evidence.*", d.dir.path().display());
    let ff = json(&d.api(&[
        "collect",
        &id,
        "Generic.Forensic.FileFinder",
        "--param",
        &format!("glob={glob}"),
        "--param",
        "upload=true",
        "--wait",
        "--json",
    ]));
    assert_eq!(
        (
            ff["state"].as_str(),
            ff["rows"].as_u64(),
            ff["uploaded_bytes"].as_u64()
        ),
        (Some("completed"), Some(1), Some(700_000)),
        "{ff}"
    );
    let uploads = d.path(&format!(
        "shared/clients/{id}/flows/{}/uploads",
        ff["flow_id"].as_str().unwrap()
    ));
    let committed = || -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(&uploads) else {
            return vec![];
        };
        dir.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.to_string_lossy().ends_with(".partial"))
            .collect()
    };
    d.wait_until("the upload is reassembled", || committed().len() == 1);
    let stored = committed().remove(0);
    assert!(
        stored
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("00000-%2F"),
        "{stored:?}"
    );
    assert_eq!(std::fs::read(&stored).unwrap(), payload);

    // A big flow; the master is killed (SIGKILL) while it runs, then restarted.
    const N: u64 = 200_000;
    let f = json(&d.api(&[
        "collect",
        &id,
        "Generic.Test.Rows",
        "--param",
        &format!("count={N}"),
        "--param",
        "size=8",
        "--json",
    ]));
    let flow = f["flow_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(300));
    drop(master);
    let stored_at_kill =
        std::fs::read_dir(d.path(&format!("shared/clients/{id}/flows/{flow}/messages")))
            .map(|r| r.count())
            .unwrap_or(0);
    eprintln!(
        "master killed with {stored_at_kill} of {} messages stored",
        N / 1000 + 1
    );
    let _master = d.start_master();
    let mut last = serde_json::Value::Null;
    d.wait_until("the flow completes after the restart", || {
        last = json(&d.api(&["flow", "show", &id, &flow, "--json"]));
        last["state"] == "completed"
    });
    assert_eq!(last["rows"].as_u64(), Some(N), "{last}");
    // Every row exactly once in the export.
    let out = d.api(&["flow", "results", &id, &flow]);
    let seen: BTreeSet<u64> = out
        .lines()
        .map(|l| json(l)["row"].as_u64().unwrap())
        .collect();
    assert_eq!(out.lines().count() as u64, N);
    assert_eq!(seen.len() as u64, N);
    // The client is still known after the restart (its enrolment was durable).
    d.wait_until("the client reconnects", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
}

#[test]
fn foreign_agents_and_api_users_are_refused_and_bad_requests_rejected() {
    let d = Deployment::new();
    let _master = d.start_master();
    let other = Deployment::new();

    // An agent of another deployment (it pins the other CA) pointed at this master.
    let cfg = std::fs::read_to_string(other.path("client.config.yaml")).unwrap();
    let ours = std::fs::read_to_string(d.path("client.config.yaml")).unwrap();
    let our_url = ours.lines().find(|l| l.contains("https://")).unwrap();
    let their_url = cfg.lines().find(|l| l.contains("https://")).unwrap();
    let foreign = d.path("foreign.client.yaml");
    std::fs::write(&foreign, cfg.replace(their_url, our_url)).unwrap();
    let _agent = d.start_client(&foreign, "foreign");
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.clients().is_empty(), "a foreign agent must not enrol");
    let log = std::fs::read_to_string(d.path("foreign.log")).unwrap();
    assert!(log.contains("connection failed"), "{log}");

    // An API user of another deployment.
    let api = std::fs::read_to_string(other.path("api.yaml")).unwrap();
    let ours = std::fs::read_to_string(d.path("api.yaml")).unwrap();
    let conn = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("api_connection_string"))
            .unwrap()
            .to_owned()
    };
    let foreign_api = d.path("foreign.api.yaml");
    std::fs::write(&foreign_api, api.replace(&conn(&api), &conn(&ours))).unwrap();
    let out = run(&[
        "--api-config",
        foreign_api.to_str().unwrap(),
        "clients",
        "search",
        "all",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the master's API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unknown artifacts, parameters and clients are refused before anything is scheduled.
    for (args, want) in [
        (
            vec!["collect", "C.0123456789abcdef", "No.Such"],
            "unknown artifact",
        ),
        (
            vec![
                "collect",
                "C.0123456789abcdef",
                "Generic.Test.Rows",
                "--param",
                "rows=1",
            ],
            "no parameter",
        ),
        (
            vec!["collect", "C.0123456789abcdef", "Generic.Test.Rows"],
            "no client",
        ),
        (vec!["clients", "search", "hostname:x"], "bad search query"),
    ] {
        let mut a = vec![
            "--api-config",
            d.path("api.yaml").to_str().unwrap().to_owned().leak() as &str,
        ];
        a.extend(args);
        let out = run(&a);
        assert!(!out.status.success(), "{a:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{a:?}: {err}");
    }
}

#[test]
fn hunts_have_exact_stats_across_a_master_sigkill_and_late_clients() {
    let d = Deployment::new();
    let master = d.start_master();
    let pool = |n: &str, dir: &str| -> Proc {
        let log = std::fs::File::create(d.path(&format!("{dir}.log"))).unwrap();
        Proc(
            talon()
                .args([
                    "-c",
                    &d.s("client.config.yaml"),
                    "pool-client",
                    "--number",
                    n,
                    "--writeback-dir",
                    &d.s(dir),
                    "--start-rate",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let _p1 = pool("20", "pool1");
    d.wait_until("20 clients connect", || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count()
            == 20
    });

    // A hunt restricted by label, and a big one; the master dies while the big one runs.
    let web = d.clients()[3]["client_id"].as_str().unwrap().to_owned();
    d.api(&["label", "add", &web, "web"]);
    let small = d
        .api(&["hunt", "create", "Generic.Client.Info", "--label", "web"])
        .trim()
        .to_owned();
    let big = json(&d.api(&[
        "hunt",
        "create",
        "Generic.Test.Rows",
        "--param",
        "count=5000",
        "--param",
        "size=4",
        "--json",
    ]));
    assert_eq!(big["state"], "running");
    let big = big["hunt_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(200));
    drop(master);
    let _master = d.start_master();
    let show = |h: &str| json(&d.api(&["hunt", "show", h, "--json"]));
    d.wait_until("the big hunt completes on 20 clients", || {
        show(&big)["stats"]["completed"] == 20
    });
    let stats = show(&big)["stats"].clone();
    assert_eq!(
        (
            stats["scheduled"].as_u64(),
            stats["rows"].as_u64(),
            stats["errors"].as_u64()
        ),
        (Some(20), Some(100_000), Some(0)),
        "{stats}"
    );
    let s = show(&small)["stats"].clone();
    assert_eq!(
        (s["scheduled"].as_u64(), s["completed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );

    // Late clients join the running hunt; nobody is scheduled twice.
    let _p2 = pool("5", "pool2");
    d.wait_until("late clients complete", || {
        show(&big)["stats"]["completed"] == 25
    });
    std::thread::sleep(Duration::from_millis(500));
    let stats = show(&big)["stats"].clone();
    assert_eq!(
        (stats["scheduled"].as_u64(), stats["rows"].as_u64()),
        (Some(25), Some(125_000)),
        "{stats}"
    );

    // The export holds every row exactly once, per client.
    let out = d.api(&["hunt", "results", &big]);
    let pairs: BTreeSet<(String, u64)> = out
        .lines()
        .map(|l| {
            let v = json(l);
            (
                v["client_id"].as_str().unwrap().to_owned(),
                v["row"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!((out.lines().count(), pairs.len()), (125_000, 125_000));
    let csv = d.api(&["hunt", "results", &small, "--format", "csv"]);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.starts_with("client_id,flow_id,"), "{csv}");
}
