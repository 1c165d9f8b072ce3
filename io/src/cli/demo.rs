//! `talon demo`: a whole deployment on loopback in a temporary directory — a master, minions (two by
//! default) and N virtual clients spread over every frontend, all in this process but each node with
//! its own local disk and the shared volume between them — then a hunt across every client with live
//! progress, its stats, and how to use the CLI against it. Serves until Ctrl-C, then removes the
//! directory.

use crate::cli::api_client::Api;
use crate::deploy::config::{self, GenerateOptions};
use crate::env::Env;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// A free TCP port on loopback (also used by `talon bench`).
pub(crate) fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A new directory `talon-<what>-<pid>-<random>` under the temp dir (the caller removes it).
pub(crate) fn scratch_dir(what: &str, env: &Env) -> Result<PathBuf, String> {
    let mut tag = [0u8; 4];
    env.entropy.fill(&mut tag);
    let dir = std::env::temp_dir().join(format!(
        "talon-{what}-{}-{}",
        std::process::id(),
        crate::clock::hex(&tag)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Runs the demo until `shutdown`.
pub async fn run(
    minions: usize,
    clients: usize,
    shutdown: impl Future<Output = ()>,
) -> Result<String, String> {
    if minions > 64 {
        return Err(format!("--minions {minions}: at most 64 in a demo"));
    }
    if clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let env = Env::real();
    let dir = scratch_dir("demo", &env)?;
    let result = run_in(&dir, minions, clients, env, shutdown).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &std::path::Path,
    minions: usize,
    clients: usize,
    env: Env,
    shutdown: impl Future<Output = ()>,
) -> Result<String, String> {
    let (clock, entropy) = (env.clock.clone(), env.entropy.clone());
    let opts = GenerateOptions {
        hostname: "127.0.0.1".into(),
        frontend_port: free_port()?,
        api_port: free_port()?,
        gui_port: free_port()?,
        monitoring_port: free_port()?,
        datastore: dir.join("shared"),
        key_type: crate::deploy::pki::KeyType::default(),
    };
    let mut cfg = config::generate(&opts, &*clock, &*entropy).map_err(|e| e.to_string())?;
    let mut adds = Vec::new();
    for _ in 0..minions {
        adds.push(("127.0.0.1".to_owned(), free_port()?));
    }
    config::add_frontends(&mut cfg, &adds, &*clock)?;
    let (server_cfg, client_cfg, api_cfg) = (
        dir.join("server.config.yaml"),
        dir.join("client.config.yaml"),
        dir.join("api.config.yaml"),
    );
    config::write_yaml(&server_cfg, &cfg).map_err(|e| e.to_string())?;
    config::write_yaml(&client_cfg, &cfg.client_config()).map_err(|e| e.to_string())?;
    config::write_yaml(&api_cfg, &config::api_client(&cfg, "demo", &*clock)?)
        .map_err(|e| e.to_string())?;
    say(&format!("talon demo: deployment in {}", dir.display()));
    // A GUI user with a fresh password, and the CA a browser can be told to trust.
    let mut secret = [0u8; 12];
    entropy.fill(&mut secret);
    let password = crate::clock::hex(&secret);
    let mut salt = [0u8; 16];
    entropy.fill(&mut salt);
    let admin = crate::gui::users::User::new(
        "admin",
        crate::deploy::pki::Access::Administrator,
        &password,
        salt,
        clock.now().as_ms(),
    )?;
    crate::gui::users::Users::at(&cfg.datastore.location).put(&admin)?;
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, &cfg.ca.certificate)
        .map_err(|e| format!("{}: {e}", ca_pem.display()))?;

    // Minions stop first, then the master: stopped the other way round, each minion's replication
    // link would report the master gone while it shuts down.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let (stop_minions, _) = tokio::sync::watch::channel(false);
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let master = tokio::spawn(crate::node::server::run_master(
        env.clone(),
        cfg.clone(),
        crate::storage::NodeStorage::real(&cfg, &dir.join("local"), &cfg.master_node_name())?,
        move |l| {
            let _ = up_tx.send(l);
        },
        async move {
            let _ = stop_rx.changed().await;
        },
    ));
    let listening = up_rx
        .await
        .map_err(|_| "the master did not start (run with RUST_LOG=info to see why)".to_string())?;
    say(&format!(
        "master up: clients connect to {}, API on {} (loopback only)",
        listening.frontend, listening.api
    ));
    let gui_url = listening
        .gui
        .map(|a| format!("https://{a}/"))
        .unwrap_or_default();
    let metrics_url = listening
        .monitoring
        .map(|a| format!("http://{a}/metrics"))
        .unwrap_or_default();
    // The demo's nodes are one process: its metrics are served once, on the master's port.
    let mut minion_cfg = cfg.clone();
    minion_cfg.monitoring.bind_port = 0;
    let mut nodes = Vec::new();
    for x in &cfg.extra_frontends {
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let mut stop = stop_minions.subscribe();
        let name = x.node_name();
        nodes.push(tokio::spawn(crate::node::server::run_minion(
            env.clone(),
            minion_cfg.clone(),
            name.clone(),
            crate::storage::NodeStorage::real(&cfg, &dir.join(format!("local-{name}")), &name)?,
            move |l| {
                let _ = up_tx.send(l);
            },
            async move {
                let _ = stop.changed().await;
            },
        )));
        let l = up_rx
            .await
            .map_err(|_| format!("minion {name} did not start (RUST_LOG=info shows why)"))?;
        say(&format!(
            "minion {name} up: clients connect to {}",
            l.frontend
        ));
    }

    let pool = crate::agent::spawn_pool(
        &cfg.client_config(),
        &dir.join("pool"),
        0..clients,
        500.0,
        "demo",
        env.clone(),
        None,
    )?;
    let mut api = Api::connect(&api_cfg).await?;
    let start = tokio::time::Instant::now();
    let ids = loop {
        let r = api.search("all").await?;
        let connected: Vec<String> = r
            .clients
            .iter()
            .filter(|c| c.connected)
            .map(|c| c.client_id.clone())
            .collect();
        say(&format!(
            "  clients connected: {}/{clients}",
            connected.len()
        ));
        if connected.len() >= clients {
            break connected;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "only {}/{clients} clients connected after 120 s",
                connected.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    say(&format!(
        "all {clients} clients connected in {:.1}s",
        start.elapsed().as_secs_f64()
    ));

    let artifact = "Generic.Client.Info";
    say(&format!("hunting {artifact} across every client ..."));
    let sweep = tokio::time::Instant::now();
    let req = talon_proto::api::CreateHuntRequest {
        artifact: artifact.into(),
        description: "talon demo".into(),
        ..Default::default()
    };
    let hunt = api.create_hunt(req).await?;
    let last = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = api.hunt(&hunt.hunt_id).await?;
        let st = last.stats.unwrap_or_default();
        say(&format!(
            "  {}: scheduled {}  completed {}  errors {}  rows {}  ({:.1}s)",
            hunt.hunt_id,
            st.scheduled,
            st.completed,
            st.errors,
            st.rows,
            sweep.elapsed().as_secs_f64()
        ));
        if st.scheduled >= clients as u64 && st.completed + st.errors == st.scheduled {
            break last;
        }
        if sweep.elapsed() > Duration::from_secs(300) {
            say("  giving up waiting after 300 s");
            break last;
        }
    };
    let st = last.stats.unwrap_or_default();
    let secs = sweep.elapsed().as_secs_f64();
    say(&format!(
        "hunt {} stats: scheduled {}, completed {}, errors {}, rows {}, {secs:.1}s ({:.0} clients/s)",
        hunt.hunt_id,
        st.scheduled,
        st.completed,
        st.errors,
        st.rows,
        st.completed as f64 / secs.max(0.001)
    ));
    let t = PathBuf::from(std::env::args().next().unwrap_or_else(|| "talon".into()));
    let t = t.display();
    let a = api_cfg.display();
    say("\nthe deployment keeps running; try:");
    say(&format!(
        "  {t} --api-config {a} hunt show {} --json",
        hunt.hunt_id
    ));
    say(&format!(
        "  {t} --api-config {a} hunt results {} --format csv",
        hunt.hunt_id
    ));
    say(&format!(
        "  {t} --api-config {a} clients search host:demo-1"
    ));
    say(&format!(
        "  {t} --api-config {a} collect {} Linux.Sys.Pslist --wait",
        ids[0]
    ));
    say(&format!(
        "  {t} --api-config {a} flow results {} <FLOW_ID>",
        ids[0]
    ));
    say(&format!(
        "  {t} --config {} client --writeback /tmp/my.writeback.yaml   # one more, real agent",
        client_cfg.display()
    ));
    say(&format!(
        "\nthe GUI: {gui_url}  user admin, password {password}\n  (its certificate is signed by \
         the deployment's own CA, {}: import it into the browser, or accept the warning)",
        ca_pem.display()
    ));
    say(&format!(
        "Prometheus metrics: {metrics_url}\n  (the demo's nodes share one process: counters add up all of them, a gauge such as \
         talon_clients_connected shows the node that set it last; a deployment runs a node per process)"
    ));
    say(&format!(
        "config files: {}\npress Ctrl-C to stop (the directory is removed)",
        server_cfg.display()
    ));

    shutdown.await;
    say("stopping ...");
    pool.abort();
    let _ = stop_minions.send(true);
    for n in nodes {
        n.await.map_err(|e| e.to_string())??;
    }
    let _ = stop_tx.send(true);
    master.await.map_err(|e| e.to_string())??;
    Ok("demo stopped".into())
}
