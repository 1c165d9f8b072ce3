//! `talon bench <scenario>`: starts the deployment it measures on loopback in a temporary directory —
//! the master as its own `talon frontend` process (so its memory is its own) and the load generator
//! as a `talon pool-client` process — drives it through the real API, and prints one JSON object of
//! figures (`--json`) or a table. Both processes share this machine's cores with the bench itself:
//! every figure includes that contention (docs/performance.md).

use crate::api_client::Api;
use crate::config::{self, GenerateOptions};
use crate::env::Env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// What `talon bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// N clients connected to one frontend: its memory per client and the connect rate.
    Connections,
    /// A hunt (`Generic.Test.Rows count=1`) over N connected clients: time to task them all, to
    /// 95% and 100% complete, rows ingested per second.
    Hunt,
}

/// `talon bench` options.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Virtual clients.
    pub clients: usize,
    /// Clients the pool starts per second (0: all at once).
    pub start_rate: f64,
    /// Where the clients' keys are cached between runs (generated once, before timing starts).
    pub keys: PathBuf,
}

/// A child process killed when dropped.
struct Child {
    inner: std::process::Child,
    what: &'static str,
    log: PathBuf,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.inner.kill();
        let _ = self.inner.wait();
    }
}

impl Child {
    fn spawn(what: &'static str, args: &[&str], log: PathBuf) -> Result<Child, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the talon binary: {e}"))?;
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let inner = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start the {what}: {e}"))?;
        Ok(Child { inner, what, log })
    }

    /// An error if the process has exited (naming it and the end of its log).
    fn check_alive(&mut self) -> Result<(), String> {
        match self.inner.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let text = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!(
                    "the {} exited ({status}); the end of {}:\n{}",
                    self.what,
                    self.log.display(),
                    tail.join("\n")
                ))
            }
            Err(e) => Err(format!("the {}: {e}", self.what)),
        }
    }

    /// Resident memory, from `/proc/<pid>/status`.
    fn rss_bytes(&self) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.inner.id());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| format!("{path}: no VmRSS line"))
    }
}

fn progress(line: &str) {
    eprintln!("bench: {line}");
}

/// A monotonic stopwatch through the injected clock.
struct Watch {
    env: Env,
    start: talon_core::Timestamp,
}

impl Watch {
    fn start(env: &Env) -> Watch {
        Watch {
            env: env.clone(),
            start: env.clock.now(),
        }
    }

    fn secs(&self) -> f64 {
        self.env.clock.now().since_ms(self.start) as f64 / 1000.0
    }
}

/// Descriptors a process needs beside its client connections (files, listeners, the volume).
const FDS_SPARE: u64 = 1024;

/// Runs the scenario; returns the figures as one JSON object.
pub async fn run(o: &BenchOptions) -> Result<serde_json::Value, String> {
    if o.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    // The frontend holds one descriptor per client, and so does the load generator.
    let wanted = o.clients as u64 + FDS_SPARE;
    let limit = crate::env::raise_fd_limit(wanted)?;
    if limit < wanted {
        return Err(format!(
            "one frontend holding {} clients needs about {wanted} open files, but this process may \
             open at most {limit} (the hard limit; raising it needs root with CAP_SYS_RESOURCE): run \
             with --clients {} or raise the limit (ulimit -Hn)",
            o.clients,
            limit.saturating_sub(FDS_SPARE)
        ));
    }
    let env = Env::real();
    let dir = crate::demo::scratch_dir("bench", &env)?;
    let r = run_in(o, &dir, &env).await;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn run_in(o: &BenchOptions, dir: &Path, env: &Env) -> Result<serde_json::Value, String> {
    let n = o.clients;
    // The deployment: one master serving every client, limits sized for the run.
    let opts = GenerateOptions {
        hostname: "127.0.0.1".into(),
        frontend_port: crate::demo::free_port()?,
        api_port: crate::demo::free_port()?,
        gui_port: crate::demo::free_port()?,
        datastore: dir.join("shared"),
    };
    let mut cfg = config::generate(&opts, &*env.clock, &*env.entropy).map_err(|e| e.to_string())?;
    let r = &mut cfg.frontend.resources;
    r.expected_clients = n as u64;
    r.connections_per_second = r.connections_per_second.max(10_000);
    r.notifications_per_second = r.notifications_per_second.max(100_000);
    let tuned = serde_json::json!({
        "expected_clients": r.expected_clients,
        "connections_per_second": r.connections_per_second,
        "notifications_per_second": r.notifications_per_second,
    });
    let (server_cfg, client_cfg) = (
        dir.join("server.config.yaml"),
        dir.join("client.config.yaml"),
    );
    config::write_yaml(&server_cfg, &cfg).map_err(|e| e.to_string())?;
    config::write_yaml(&client_cfg, &cfg.client_config()).map_err(|e| e.to_string())?;
    let api_cfg = config::api_client(&cfg, "bench", &*env.clock)?;

    // Keys first, outside the timing (a second run reuses them).
    prepare_keys(&o.keys, n, env)?;

    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut master = Child::spawn(
        "master",
        &[
            "-c",
            &s(&server_cfg),
            "frontend",
            "--local-dir",
            &s(&dir.join("local-master")),
        ],
        dir.join("master.log"),
    )?;
    let mut api = wait_for_api(&api_cfg, &mut master, env).await?;
    let baseline = master.rss_bytes()?;
    progress(&format!(
        "master up (RSS {:.1} MiB); starting {n} clients at {} per second",
        baseline as f64 / (1 << 20) as f64,
        if o.start_rate > 0.0 {
            o.start_rate.to_string()
        } else {
            "unlimited".into()
        }
    ));
    let watch = Watch::start(env);
    let mut pool = Child::spawn(
        "pool-client",
        &[
            "-c",
            &s(&client_cfg),
            "pool-client",
            "--number",
            &n.to_string(),
            "--writeback-dir",
            &s(&o.keys),
            "--start-rate",
            &o.start_rate.to_string(),
        ],
        dir.join("pool.log"),
    )?;
    let connect_s = wait_connected(&mut api, n, &mut master, &mut pool, &watch).await?;
    // Let allocations settle (handshake buffers freed) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = master.rss_bytes()?;
    let pool_rss = pool.rss_bytes()?;
    let mut out = serde_json::json!({
        "scenario": match o.scenario { Scenario::Connections => "connections", Scenario::Hunt => "hunt" },
        "clients": n,
        "frontend_rss_bytes": rss,
        "frontend_rss_baseline_bytes": baseline,
        "rss_per_client_bytes": rss.saturating_sub(baseline) / n as u64,
        "connect_s": round3(connect_s),
        "connect_rate_per_s": round3(n as f64 / connect_s),
        "pool_rss_bytes": pool_rss,
        "config": tuned,
    });
    if o.scenario == Scenario::Hunt {
        let h = hunt(&mut api, n, &mut master, env).await?;
        for (k, v) in h.as_object().expect("an object") {
            out[k] = v.clone();
        }
        out["frontend_rss_after_hunt_bytes"] = master.rss_bytes()?.into();
    }
    drop(pool);
    drop(master);
    Ok(out)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Makes (or reuses) the pool's `n` keys in `dir`, as `pool-client` names them.
fn prepare_keys(dir: &Path, n: usize, env: &Env) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut made = 0;
    for i in 0..n {
        let p = crate::agent::pool_key_path(dir, i);
        if !p.exists() {
            crate::agent::load_or_create_identity(&p, &*env.clock)?;
            made += 1;
            if made % 10_000 == 0 {
                progress(&format!(
                    "generated {made} client keys in {}",
                    dir.display()
                ));
            }
        }
    }
    if made > 0 {
        progress(&format!(
            "generated {made} client keys in {} (reused next time)",
            dir.display()
        ));
    }
    Ok(())
}

async fn wait_for_api(
    c: &config::ApiClientConfig,
    master: &mut Child,
    env: &Env,
) -> Result<Api, String> {
    let watch = Watch::start(env);
    loop {
        master.check_alive()?;
        if let Ok(mut api) = Api::connect_with(c, &env.net).await
            && api.search_limit("all", 1).await.is_ok()
        {
            return Ok(api);
        }
        if watch.secs() > 60.0 {
            return Err("the master's API did not answer within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `n` clients are connected; returns the seconds since `watch` started.
async fn wait_connected(
    api: &mut Api,
    n: usize,
    master: &mut Child,
    pool: &mut Child,
    watch: &Watch,
) -> Result<f64, String> {
    // Generous: 100 clients per second at worst, and never under two minutes.
    let limit = (n as f64 / 100.0).max(120.0);
    let mut last_report = 0.0;
    loop {
        master.check_alive()?;
        pool.check_alive()?;
        let r = api.search_limit("all", n as u32 + 1).await?;
        let connected = r.clients.iter().filter(|c| c.connected).count();
        let t = watch.secs();
        if connected >= n {
            progress(&format!("{connected} clients connected in {t:.1} s"));
            return Ok(t);
        }
        if t - last_report >= 2.0 {
            progress(&format!("{connected}/{n} clients connected ({t:.0} s)"));
            last_report = t;
        }
        if t > limit {
            return Err(format!(
                "only {connected} of {n} clients connected after {t:.0} s (see {})",
                pool.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A hunt of `Generic.Test.Rows count=1` over the `n` connected clients.
async fn hunt(
    api: &mut Api,
    n: usize,
    master: &mut Child,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let params = [("count".to_owned(), "1".to_owned())].into_iter().collect();
    let watch = Watch::start(env);
    let h = api
        .create_hunt(talon_proto::api::CreateHuntRequest {
            artifact: "Generic.Test.Rows".into(),
            params,
            description: "talon bench hunt".into(),
            ..Default::default()
        })
        .await?;
    let created_s = watch.secs();
    let (mut tasked, mut p95, mut done) = (None, None, None);
    let mut last_report = 0.0;
    let limit = (n as f64 / 50.0).max(120.0);
    loop {
        master.check_alive()?;
        let s = api.hunt(&h.hunt_id).await?;
        let stats = s.stats.unwrap_or_default();
        let t = watch.secs();
        if tasked.is_none() && stats.scheduled as usize >= n {
            tasked = Some(t);
        }
        if p95.is_none() && stats.completed as f64 >= 0.95 * n as f64 {
            p95 = Some(t);
        }
        if stats.completed as usize >= n {
            done = Some((t, stats.rows));
        }
        if let Some((t, rows)) = done {
            progress(&format!("hunt complete on {n} clients in {t:.2} s"));
            return Ok(serde_json::json!({
                "hunt_id": h.hunt_id,
                "hunt_create_s": round3(created_s),
                "tasked_all_s": round3(tasked.unwrap_or(t)),
                "completed_95_s": round3(p95.unwrap_or(t)),
                "completed_100_s": round3(t),
                "rows": rows,
                "rows_per_s": round3(rows as f64 / t),
            }));
        }
        if t - last_report >= 2.0 {
            progress(&format!(
                "hunt: {} scheduled, {} completed of {n} ({t:.0} s)",
                stats.scheduled, stats.completed
            ));
            last_report = t;
        }
        if t > limit {
            return Err(format!(
                "the hunt completed on {} of {n} clients in {t:.0} s",
                stats.completed
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The figures as a two-column table.
pub fn table(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if let Some(m) = v.as_object() {
        for (k, x) in m {
            if k == "config" {
                continue;
            }
            let shown = match (k.ends_with("_bytes"), x.as_u64()) {
                (true, Some(b)) if b >= 1 << 20 => {
                    format!("{x} ({:.1} MiB)", b as f64 / (1 << 20) as f64)
                }
                (true, Some(b)) if b >= 1 << 10 => format!("{x} ({:.1} KiB)", b as f64 / 1024.0),
                _ => x.to_string().trim_matches('"').to_owned(),
            };
            out.push_str(&format!("{k:<32} {shown}\n"));
        }
        if let Some(c) = m.get("config") {
            out.push_str(&format!("{:<32} {c}\n", "config"));
        }
    }
    out.trim_end().to_owned()
}

/// Default key cache: `$XDG_CACHE_HOME/talon/bench-keys` or `~/.cache/talon/bench-keys`.
pub fn default_key_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("talon").join("bench-keys")
}
