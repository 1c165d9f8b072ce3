//! `talon bench <scenario>`: starts the deployment it measures on loopback in a temporary directory —
//! the master as its own `talon frontend` process (so its memory is its own) and the load generator
//! as a `talon pool-client` process — drives it through the real API, and prints one JSON object of
//! figures (`--json`) or a table. Both processes share this machine's cores with the bench itself:
//! every figure includes that contention (docs/performance.md).

mod gui;
use crate::cli::api_client::Api;
use crate::deploy::config::{self, GenerateOptions};
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
    /// The same row workload (a hunt of `Generic.Test.Rows count=--rows`) with the shared volume's
    /// latency injected at 0 ms and at 50 ms per operation: throughput and client service times.
    StorageLatency,
    /// A minion's clients connect while the master is down for `--outage-s`; the master restarts
    /// and applies the minion's backlog: replicated events per second and catch-up time.
    Replication,
    /// SQL over the endpoint tables on this machine, as an agent runs a `Generic.Query` task (a
    /// fresh engine each run): milliseconds per query, p50 and max of `--clients` runs each.
    Query,
    /// The GUI's calls with N clients enrolled (default 100,000, through the real path in batches
    /// of 10,000 connected at once): p50/p99/max per call a page makes, over one HTTPS session.
    Gui,
    /// Client events: N clients each running `Generic.Events.Test rate=--rate` into one frontend
    /// for `--seconds`, with the shared volume at 0 ms and at `--latency-ms` per operation: events
    /// per second stored, latency from an event made to its batch settled on the volume, memory
    /// and backlog over time.
    Events,
}

impl Scenario {
    /// Its name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connections => "connections",
            Scenario::Hunt => "hunt",
            Scenario::StorageLatency => "storage-latency",
            Scenario::Replication => "replication",
            Scenario::Query => "query",
            Scenario::Events => "events",
            Scenario::Gui => "gui",
        }
    }

    /// Clients when `--clients` is not given.
    pub fn default_clients(self) -> usize {
        match self {
            Scenario::Connections | Scenario::Hunt | Scenario::Events => 10_000,
            Scenario::StorageLatency | Scenario::Replication => 1_000,
            Scenario::Query => 50,
            Scenario::Gui => 100_000,
        }
    }
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
    /// `storage-latency`: rows each client returns (in messages of up to 1,000 rows).
    pub rows: u64,
    /// `storage-latency`: the injected latency of the slow run (ms per volume operation).
    pub latency_ms: u64,
    /// `storage-latency`: each client pauses this long after every 100 rows (0: as fast as it can,
    /// which measures capacity rather than service time).
    pub pause_ms: u64,
    /// `replication`: how long the master is down.
    pub outage_s: u64,
    /// `storage-latency`: a directory on the filesystem to measure (a network mount), compared in
    /// the same run with the local scratch directory and the latency model; `gui`: where the shared
    /// volume is.
    pub volume: Option<PathBuf>,
    /// `connections`, `hunt`: minions beside the master, each frontend holding an equal share of
    /// the clients (each share in its own load-generator process).
    pub minions: usize,
    /// `events`: events each client makes per second.
    pub rate: u64,
    /// `events`: how long each run is measured (seconds, after the clients connected and a
    /// warm-up).
    pub seconds: u64,
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
        // Appended to: a restarted process's log follows its first life's.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
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

    /// Sends SIGTERM and waits for the process to exit, at most `limit`; an error if it exits
    /// unsuccessfully or is still running then (it is killed).
    async fn terminate(&mut self, limit: Duration, env: &Env) -> Result<(), String> {
        let pid = rustix::process::Pid::from_raw(self.inner.id() as i32)
            .ok_or_else(|| format!("the {} has no pid", self.what))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| format!("SIGTERM to the {}: {e}", self.what))?;
        let watch = Watch::start(env);
        loop {
            match self.inner.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!("the {} exited ({status}) after SIGTERM", self.what));
                }
                Ok(None) if watch.secs() > limit.as_secs_f64() => {
                    return Err(format!(
                        "the {} was still running {} s after SIGTERM",
                        self.what,
                        limit.as_secs()
                    ));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return Err(format!("the {}: {e}", self.what)),
            }
        }
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    fn cpu_seconds(&self) -> Result<f64, String> {
        let path = format!("/proc/{}/stat", self.inner.id());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        // Fields after the command name (which may hold spaces) end with ')'.
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        match (ticks(11), ticks(12)) {
            (Some(u), Some(s)) => Ok((u + s) as f64 / 100.0),
            _ => Err(format!("{path}: no utime/stime")),
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

/// A scratch directory in `volume` (`--volume`), named after the bench's directory `dir`.
fn scratch_on_volume(volume: &Path, dir: &Path) -> Result<PathBuf, String> {
    if !volume.is_dir() {
        return Err(format!("--volume {}: not a directory", volume.display()));
    }
    let d = volume.join(
        dir.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "talon-bench".into()),
    );
    std::fs::create_dir(&d).map_err(|e| format!("--volume {}: {e}", d.display()))?;
    Ok(d)
}

/// Removes a scratch directory made by [`scratch_on_volume`] (a failure is reported, not fatal).
fn remove_scratch(d: &Path) {
    progress(&format!("removing {}", d.display()));
    if let Err(e) = crate::fsutil::remove_tree_concurrently(d, 32) {
        progress(&format!("could not remove {}: {e}", d.display()));
    }
}

/// Runs the scenario; returns the figures as one JSON object.
pub async fn run(o: &BenchOptions) -> Result<serde_json::Value, String> {
    if o.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if o.volume.is_some() && !matches!(o.scenario, Scenario::StorageLatency | Scenario::Gui) {
        return Err("--volume applies to the storage-latency and gui scenarios only".into());
    }
    if o.scenario == Scenario::StorageLatency && o.rows == 0 {
        return Err("--rows must be at least 1".into());
    }
    if o.minions > 0 && !matches!(o.scenario, Scenario::Connections | Scenario::Hunt) {
        return Err("--minions applies to the connections and hunt scenarios".into());
    }
    if o.scenario == Scenario::Query {
        return query_bench(o.clients);
    }
    // Each frontend holds one descriptor per client on it, and so does its load generator.
    let per_process = if o.scenario == Scenario::Gui {
        o.clients.min(gui::BATCH) // Connected a batch at a time.
    } else {
        o.clients.div_ceil(o.minions + 1)
    };
    let wanted = per_process as u64 + FDS_SPARE;
    let limit = crate::env::raise_fd_limit(wanted)?;
    if limit < wanted {
        return Err(format!(
            "one frontend holding {per_process} clients needs about {wanted} open files, but this \
             process may open at most {limit} (the hard limit; raising it needs root with \
             CAP_SYS_RESOURCE): run with --clients {}, more --minions, or raise the limit (ulimit -Hn)",
            limit.saturating_sub(FDS_SPARE) * (o.minions as u64 + 1)
        ));
    }
    let env = Env::real();
    let dir = crate::cli::demo::scratch_dir("bench", &env)?;
    // Keys first, outside the timing (a second run reuses them).
    let r = match prepare_keys(&o.keys, o.clients, &env) {
        Ok(()) => match o.scenario {
            Scenario::Connections | Scenario::Hunt => connections_and_hunt(o, &dir, &env).await,
            Scenario::StorageLatency => storage_latency(o, &dir, &env).await,
            Scenario::Replication => replication(o, &dir, &env).await,
            Scenario::Events => events_bench(o, &dir, &env).await,
            Scenario::Gui => gui::gui_bench(o, &dir, &env).await,
            Scenario::Query => unreachable!("answered before any deployment"),
        },
        Err(e) => Err(e),
    };
    match r {
        Ok(v) if std::env::var_os("TALON_BENCH_KEEP").is_some() => Ok(v),
        Ok(v) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(v)
        }
        // The processes' logs explain a failure: keep them.
        Err(e) => Err(format!("{e} (logs kept in {})", dir.display())),
    }
}

/// A generated deployment in `dir`: its config files and an API client config.
struct Setup {
    dir: PathBuf,
    cfg: config::ServerConfig,
    server_cfg: PathBuf,
    client_cfg: PathBuf,
    api_cfg: config::ApiClientConfig,
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Setup {
    /// A master on loopback sized for `n` clients, `tune` applied before the files are written.
    fn new(
        dir: &Path,
        n: usize,
        env: &Env,
        tune: impl FnOnce(&mut config::ServerConfig) -> Result<(), String>,
    ) -> Result<Setup, String> {
        Setup::on(dir, &dir.join("shared"), n, env, tune)
    }

    /// [`Setup::new`] with the shared volume at `datastore` rather than inside `dir`.
    fn on(
        dir: &Path,
        datastore: &Path,
        n: usize,
        env: &Env,
        tune: impl FnOnce(&mut config::ServerConfig) -> Result<(), String>,
    ) -> Result<Setup, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let opts = GenerateOptions {
            hostname: "127.0.0.1".into(),
            frontend_port: crate::cli::demo::free_port()?,
            api_port: crate::cli::demo::free_port()?,
            gui_port: crate::cli::demo::free_port()?,
            monitoring_port: 0,
            datastore: datastore.to_owned(),
            key_type: crate::deploy::pki::KeyType::default(),
        };
        let mut cfg =
            config::generate(&opts, &*env.clock, &*env.entropy).map_err(|e| e.to_string())?;
        let r = &mut cfg.frontend.resources;
        r.expected_clients = n as u64;
        r.connections_per_second = r.connections_per_second.max(10_000);
        r.notifications_per_second = r.notifications_per_second.max(100_000);
        tune(&mut cfg)?;
        let server_cfg = dir.join("server.config.yaml");
        let client_cfg = dir.join("client.config.yaml");
        config::write_yaml(&server_cfg, &cfg).map_err(|e| e.to_string())?;
        config::write_yaml(&client_cfg, &cfg.client_config()).map_err(|e| e.to_string())?;
        let api_cfg = config::api_client(&cfg, "bench", &*env.clock)?;
        Ok(Setup {
            dir: dir.to_owned(),
            cfg,
            server_cfg,
            client_cfg,
            api_cfg,
        })
    }

    /// The limits the bench raised, for the report.
    fn tuned(&self) -> serde_json::Value {
        let r = &self.cfg.frontend.resources;
        serde_json::json!({
            "expected_clients": r.expected_clients,
            "connections_per_second": r.connections_per_second,
            "notifications_per_second": r.notifications_per_second,
            "volume_latency_ms": self.cfg.datastore.volume_latency_ms,
        })
    }

    fn start_master(&self) -> Result<Child, String> {
        Child::spawn(
            "master",
            &[
                "-c",
                &path_str(&self.server_cfg),
                "frontend",
                "--local-dir",
                &path_str(&self.dir.join("local-master")),
            ],
            self.dir.join("master.log"),
        )
    }

    fn start_minion(&self, node: &str) -> Result<Child, String> {
        Child::spawn(
            "minion",
            &[
                "-c",
                &path_str(&self.server_cfg),
                "frontend",
                "--minion",
                "--node",
                node,
                "--local-dir",
                &path_str(&self.dir.join(format!("local-{node}"))),
            ],
            self.dir.join(format!("{node}.log")),
        )
    }

    /// The load generator: `n` clients with the cached keys, service times into `stats`.
    fn start_pool(
        &self,
        o: &BenchOptions,
        n: usize,
        stats: Option<&Path>,
    ) -> Result<Child, String> {
        self.start_pool_on(o, &self.client_cfg, 0, n, stats, "pool")
    }

    /// A load generator with the clients numbered `first..first + n`, configured by `client_cfg`
    /// (which frontends they connect to); it logs to `<name>.log`.
    fn start_pool_on(
        &self,
        o: &BenchOptions,
        client_cfg: &Path,
        first: usize,
        n: usize,
        stats: Option<&Path>,
        name: &str,
    ) -> Result<Child, String> {
        let (number, rate, keys) = (n.to_string(), o.start_rate.to_string(), path_str(&o.keys));
        let mut args = vec![
            "-c".to_owned(),
            path_str(client_cfg),
            "pool-client".into(),
            "--first".into(),
            first.to_string(),
            "--number".into(),
            number,
            "--writeback-dir".into(),
            keys,
            "--start-rate".into(),
            rate,
        ];
        if let Some(p) = stats {
            args.extend(["--stats".into(), path_str(p)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Child::spawn("pool-client", &args, self.dir.join(format!("{name}.log")))
    }
}

async fn connections_and_hunt(
    o: &BenchOptions,
    dir: &Path,
    env: &Env,
) -> Result<serde_json::Value, String> {
    if o.minions > 0 {
        return cluster_hunt(o, dir, env).await;
    }
    let n = o.clients;
    let setup = Setup::new(dir, n, env, |_| Ok(()))?;
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    let baseline = master.rss_bytes()?;
    progress(&format!(
        "master up (RSS {:.1} MiB); starting {n} clients at {} per second",
        baseline as f64 / (1 << 20) as f64,
        rate_text(o.start_rate)
    ));
    let watch = Watch::start(env);
    let mut pool = setup.start_pool(o, n, None)?;
    let connect_s = wait_connected(&mut api, n, &mut [&mut master, &mut pool], &watch).await?;
    // Let allocations settle (handshake buffers freed) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = master.rss_bytes()?;
    let pool_rss = pool.rss_bytes()?;
    let mut out = serde_json::json!({
        "scenario": o.scenario.name(),
        "clients": n,
        "frontend_rss_bytes": rss,
        "frontend_rss_baseline_bytes": baseline,
        "rss_per_client_bytes": rss.saturating_sub(baseline) / n as u64,
        "connect_s": round3(connect_s),
        "connect_rate_per_s": round3(n as f64 / connect_s),
        "pool_rss_bytes": pool_rss,
        "config": setup.tuned(),
    });
    if o.scenario == Scenario::Hunt {
        let limit = (n as f64 / 50.0).max(120.0);
        let h = hunt(&mut api, n, 1, 0, limit, &mut master, env).await?;
        merge(&mut out, h);
        out["frontend_rss_after_hunt_bytes"] = master.rss_bytes()?.into();
    }
    Ok(out)
}

/// `connections` / `hunt` with `--minions K`: a master and K minions, the clients split evenly
/// over the K + 1 frontends (each share configured to connect to its frontend only, in its own
/// load-generator process): per-frontend memory per client, the connect rate, the hunt's figures,
/// and the master's replication load during the hunt (events applied, its CPU time).
async fn cluster_hunt(
    o: &BenchOptions,
    dir: &Path,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let k = o.minions;
    let mut adds = Vec::new();
    for _ in 0..k {
        adds.push(("127.0.0.1".to_owned(), crate::cli::demo::free_port()?));
    }
    let setup = Setup::new(dir, n, env, |c| {
        config::add_frontends(c, &adds, &*env.clock).map(|_| ())
    })?;
    let nodes: Vec<String> = setup
        .cfg
        .extra_frontends
        .iter()
        .map(|x| x.node_name())
        .collect();
    // One client config per frontend, naming that frontend only.
    let mut client_cfgs = Vec::new();
    for (i, url) in setup.cfg.server_urls().into_iter().enumerate() {
        let mut cc = setup.cfg.client_config();
        cc.client.server_urls = vec![url];
        let p = dir.join(format!("client-{i}.config.yaml"));
        config::write_yaml(&p, &cc).map_err(|e| e.to_string())?;
        client_cfgs.push(p);
    }
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    let mut minions = Vec::new();
    for node in &nodes {
        minions.push(setup.start_minion(node)?);
    }
    // The minions have connected to the master once it lists them all.
    until(
        &mut [&mut master],
        env,
        "every minion to connect to the master",
        100,
        async || {
            let up = api
                .cluster()
                .await
                .is_ok_and(|c| c.minions.iter().filter(|m| m.connected).count() == k);
            Ok(up.then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut baselines = vec![master.rss_bytes()?];
    for m in &minions {
        baselines.push(m.rss_bytes()?);
    }
    progress(&format!(
        "master and {k} minions up; starting {n} clients ({} per frontend) at {} per second each",
        n.div_ceil(k + 1),
        rate_text(o.start_rate)
    ));
    let watch = Watch::start(env);
    let mut pools = Vec::new();
    let mut shares = Vec::new();
    let mut first = 0;
    for (i, cc) in client_cfgs.iter().enumerate() {
        let share = n / (k + 1) + usize::from(i < n % (k + 1));
        pools.push(setup.start_pool_on(o, cc, first, share, None, &format!("pool-{i}"))?);
        shares.push(share);
        first += share;
    }
    let connect_s = {
        let mut procs: Vec<&mut Child> = std::iter::once(&mut master)
            .chain(minions.iter_mut())
            .chain(pools.iter_mut())
            .collect();
        wait_connected(&mut api, n, &mut procs, &watch).await?
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_frontend = Vec::new();
    let mut worst_per_client = 0;
    let frontends = std::iter::once(("master".to_owned(), &master))
        .chain(nodes.iter().cloned().zip(minions.iter()));
    for (((name, child), base), share) in frontends.zip(&baselines).zip(&shares) {
        let rss = child.rss_bytes()?;
        let per_client = rss.saturating_sub(*base) / (*share).max(1) as u64;
        worst_per_client = worst_per_client.max(per_client);
        per_frontend.push(serde_json::json!({
            "node": name,
            "clients": share,
            "rss_bytes": rss,
            "rss_baseline_bytes": base,
            "rss_per_client_bytes": per_client,
        }));
    }
    let mut pool_rss = 0;
    for p in &pools {
        pool_rss += p.rss_bytes()?;
    }
    let mut out = serde_json::json!({
        "scenario": o.scenario.name(),
        "clients": n,
        "minions": k,
        "rss_per_client_bytes": worst_per_client,
        "frontends": per_frontend,
        "connect_s": round3(connect_s),
        "connect_rate_per_s": round3(n as f64 / connect_s),
        "pool_rss_bytes": pool_rss,
        "config": setup.tuned(),
    });
    if o.scenario == Scenario::Hunt {
        let applied = |c: &talon_proto::api::ClusterStatus| -> u64 {
            c.minions.iter().map(|m| m.applied).sum()
        };
        let before = applied(&api.cluster().await?);
        let cpu_before = master.cpu_seconds()?;
        let limit = (n as f64 / 50.0).max(120.0);
        let h = hunt(&mut api, n, 1, 0, limit, &mut master, env).await?;
        let secs = h["completed_100_s"].as_f64().unwrap_or(0.0);
        let events = applied(&api.cluster().await?).saturating_sub(before);
        let cpu = master.cpu_seconds()? - cpu_before;
        merge(&mut out, h);
        out["master_replicated_events"] = events.into();
        out["master_replicated_events_per_s"] = round3(events as f64 / secs.max(0.001)).into();
        out["master_cpu_s_during_hunt"] = round3(cpu).into();
        out["frontend_rss_after_hunt_bytes"] = master.rss_bytes()?.into();
    }
    Ok(out)
}

fn rate_text(rate: f64) -> String {
    if rate > 0.0 {
        rate.to_string()
    } else {
        "unlimited".into()
    }
}

fn merge(out: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(m)) = (out.as_object_mut(), more) {
        o.extend(m);
    }
}

/// One deployment of the storage-latency workload: where its shared volume is, and the latency
/// the model injects there.
struct VolumeRun {
    /// `local`, `model` or `volume`: the suffix of its figures.
    name: &'static str,
    latency_ms: u64,
    datastore: PathBuf,
}

/// The same hunt on fresh deployments whose shared volume is the local scratch disk, the same disk
/// behind the latency model (`--latency-ms`, skipped at 0) and, with `--volume DIR`, a directory on
/// the filesystem to measure (a network mount): throughput, service times, reading the results
/// back, a clean stop and a restart of the master.
async fn storage_latency(
    o: &BenchOptions,
    dir: &Path,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let mut plan = vec![VolumeRun {
        name: "local",
        latency_ms: 0,
        datastore: dir.join("local").join("shared"),
    }];
    if o.latency_ms > 0 {
        plan.push(VolumeRun {
            name: "model",
            latency_ms: o.latency_ms,
            datastore: dir.join("model").join("shared"),
        });
    }
    let mut on_volume = None;
    if let Some(v) = &o.volume {
        let d = scratch_on_volume(v, dir)?;
        on_volume = Some(d.clone());
        plan.push(VolumeRun {
            name: "volume",
            latency_ms: 0,
            datastore: d,
        });
    }
    let mut runs = Vec::new();
    let mut failed = None;
    for r in &plan {
        match storage_run(o, &dir.join(r.name), r, env).await {
            Ok(v) => runs.push((r.name, v)),
            Err(e) => {
                failed = Some(format!("{} run: {e}", r.name));
                break;
            }
        }
    }
    if let Some(d) = on_volume {
        remove_scratch(&d);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let l = o.latency_ms;
    let mut out = serde_json::json!({
        "scenario": o.scenario.name(),
        "clients": n,
        "rows_per_client": o.rows,
        "pause_ms_per_100_rows": o.pause_ms,
        "latency_ms": l,
        "volume": o.volume.as_ref().map(|v| v.display().to_string()),
        "throughput_unit": "rows/s, hunt create to 100% complete",
    });
    let local_thr = runs[0].1["hunt"]["rows_per_s"].as_f64().unwrap_or(0.0);
    for (name, v) in &runs {
        // The figures of the model run keep their historical names (`_50ms`).
        let sfx = match *name {
            "local" => "0ms".to_owned(),
            "model" => format!("{l}ms"),
            other => other.to_owned(),
        };
        let thr = v["hunt"]["rows_per_s"].as_f64().unwrap_or(0.0);
        out[format!("throughput_{sfx}")] = v["hunt"]["rows_per_s"].clone();
        if *name != "local" {
            let ratio = if local_thr > 0.0 {
                round3(thr / local_thr)
            } else {
                0.0
            };
            let key = if *name == "model" {
                "throughput_ratio".to_owned()
            } else {
                format!("throughput_ratio_{sfx}")
            };
            out[key] = ratio.into();
        }
        out[format!("hunt_100_s_{sfx}")] = v["hunt"]["completed_100_s"].clone();
        out[format!("p50_ms_{sfx}")] = v["service_times"]["data"]["p50_ms"].clone();
        out[format!("p99_ms_{sfx}")] = v["service_times"]["data"]["p99_ms"].clone();
        out[format!("completion_p50_ms_{sfx}")] = v["service_times"]["finals"]["p50_ms"].clone();
        out[format!("completion_p99_ms_{sfx}")] = v["service_times"]["finals"]["p99_ms"].clone();
        out[format!("results_s_{sfx}")] = v["results_s"].clone();
        out[format!("stop_s_{sfx}")] = v["stop_s"].clone();
        out[format!("restart_api_s_{sfx}")] = v["restart_api_s"].clone();
        out[format!("run_{sfx}")] = v.clone();
    }
    Ok(out)
}

/// One deployment of [`storage_latency`] in `sub`: the hunt, every row read back through the API
/// (and checked to be exactly what the clients sent), then the master stopped with SIGTERM and
/// started again.
async fn storage_run(
    o: &BenchOptions,
    sub: &Path,
    r: &VolumeRun,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let latency = r.latency_ms;
    let setup = Setup::on(sub, &r.datastore, n, env, |c| {
        c.datastore.volume_latency_ms = latency;
        if o.pause_ms > 0 {
            // Tasks reach the clients over ten pause periods, so their messages do not all
            // arrive in the same instant of each period (an open, evenly spread load).
            let spread_ms = 10 * o.pause_ms;
            c.frontend.resources.notifications_per_second = (n as u64 * 1000 / spread_ms).max(1);
        }
        c.validate()
    })?;
    let what = match r.name {
        "model" => format!("model ({latency} ms per operation)"),
        "volume" => format!("volume {}", r.datastore.display()),
        _ => "local disk".to_owned(),
    };
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    progress(&format!("{what}: master up; starting {n} clients"));
    let stats = sub.join("service-times.json");
    let mut pool = setup.start_pool(o, n, Some(&stats))?;
    wait_connected(
        &mut api,
        n,
        &mut [&mut master, &mut pool],
        &Watch::start(env),
    )
    .await?;
    // A network filesystem may be far slower than the model: give it ten minutes at least.
    let limit = (n as f64 / 50.0).max(if r.name == "volume" { 600.0 } else { 120.0 });
    let h = hunt(&mut api, n, o.rows, o.pause_ms, limit, &mut master, env).await?;
    // Every final status acknowledged (the pool writes its figures each second).
    let times = wait_stats(&stats, &mut pool, env, |v| {
        v["finals"]["count"].as_u64().unwrap_or(0) >= n as u64
    })
    .await?;
    progress(&format!(
        "{what}: {} rows/s; data messages p50 {} ms, p99 {} ms",
        h["rows_per_s"], times["data"]["p50_ms"], times["data"]["p99_ms"]
    ));
    let hunt_id = h["hunt_id"].as_str().unwrap_or_default().to_owned();
    let watch = Watch::start(env);
    // As `talon hunt results` reads them: streamed, each row parsed, none kept.
    let rows = api.each_hunt_row(&hunt_id, |_, _, _| Ok(())).await?;
    let results_s = watch.secs();
    let expected = n as u64 * o.rows;
    if rows != expected {
        return Err(format!(
            "hunt results returned {rows} rows, the clients sent {expected}"
        ));
    }
    progress(&format!(
        "{what}: hunt results ({expected} rows) in {results_s:.2} s"
    ));
    let watch = Watch::start(env);
    master.terminate(Duration::from_secs(600), env).await?;
    let stop_s = watch.secs();
    progress(&format!(
        "{what}: master stopped (SIGTERM) in {stop_s:.2} s"
    ));
    let watch = Watch::start(env);
    let mut master = setup.start_master()?;
    // A restart on a network filesystem can be slow: measure it up to ten minutes.
    wait_for_api(&setup.api_cfg, &mut master, 600.0, env).await?;
    let restart_api_s = watch.secs();
    progress(&format!(
        "{what}: master restarted, API answering in {restart_api_s:.2} s"
    ));
    drop(pool);
    master.terminate(Duration::from_secs(600), env).await?;
    Ok(serde_json::json!({
        "hunt": h,
        "service_times": times,
        "results_s": round3(results_s),
        "stop_s": round3(stop_s),
        "restart_api_s": round3(restart_api_s),
    }))
}

/// The `events` scenario: a run with the shared volume at 0 ms, then one at `--latency-ms`.
async fn events_bench(
    o: &BenchOptions,
    dir: &Path,
    env: &Env,
) -> Result<serde_json::Value, String> {
    if o.rate == 0 || o.seconds == 0 {
        return Err("--rate and --seconds must be at least 1".into());
    }
    let mut out = serde_json::json!({
        "scenario": o.scenario.name(),
        "clients": o.clients,
        "rate_per_client": o.rate,
        "offered_events_per_s": o.clients as u64 * o.rate,
        "seconds": o.seconds,
        "latency_ms": o.latency_ms,
    });
    let mut base = 0.0;
    for latency in [0, o.latency_ms] {
        let sfx = format!("{latency}ms");
        let v = events_run(o, &dir.join(&sfx), latency, env).await?;
        let thr = v["events_per_s"].as_f64().unwrap_or(0.0);
        if latency == 0 {
            base = thr;
        } else {
            out["throughput_ratio"] = if base > 0.0 { round3(thr / base) } else { 0.0 }.into();
        }
        for k in [
            "events_per_s",
            "events_per_s_second_half",
            "p50_ms",
            "p99_ms",
            "dropped",
        ] {
            out[format!("{k}_{sfx}")] = v[k].clone();
        }
        out[format!("frontend_rss_mib_max_{sfx}")] = v["frontend_rss_mib_max"].clone();
        out[format!("run_{sfx}")] = v;
        if o.latency_ms == 0 {
            break;
        }
    }
    Ok(out)
}

/// One deployment of [`events_bench`]: the master, the event table set, `--clients` virtual
/// clients; sampled every 5 s for `--seconds` after a 10 s warm-up.
async fn events_run(
    o: &BenchOptions,
    sub: &Path,
    latency: u64,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let setup = Setup::new(sub, n, env, |c| {
        c.datastore.volume_latency_ms = latency;
        c.validate()
    })?;
    let what = format!("volume at {latency} ms");
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    let rss0 = master.rss_bytes()?;
    progress(&format!("{what}: master up; starting {n} clients"));
    let stats = sub.join("service-times.json");
    let mut pool = setup.start_pool(o, n, Some(&stats))?;
    wait_connected(
        &mut api,
        n,
        &mut [&mut master, &mut pool],
        &Watch::start(env),
    )
    .await?;
    // Set once every client is connected: the connected clients are told at once (what is
    // measured is the steady stream, not connections competing with it for the cores).
    api.set_client_event(talon_proto::api::SetClientEventRequest {
        artifact: "Generic.Events.Test".into(),
        label: String::new(),
        params: [("rate".to_owned(), o.rate.to_string())]
            .into_iter()
            .collect(),
        remove: false,
    })
    .await?;
    progress(&format!(
        "{what}: Generic.Events.Test rate={} set for every client",
        o.rate
    ));
    let read = |pool: &mut Child| -> Result<serde_json::Value, String> {
        pool.check_alive()?;
        let b = std::fs::read(&stats).map_err(|e| format!("{}: {e}", stats.display()))?;
        serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", stats.display()))
    };
    progress(&format!("{what}: warming up for 10 s"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let watch = Watch::start(env);
    let first = read(&mut pool)?;
    let settled0 = first["events"]["settled"].as_u64().unwrap_or(0);
    let (cpu_master0, cpu_pool0) = (master.cpu_seconds()?, pool.cpu_seconds()?);
    let mut samples = Vec::new();
    let mut last = first;
    let mib = |b: u64| round3(b as f64 / (1 << 20) as f64);
    while watch.secs() < o.seconds as f64 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        master.check_alive()?;
        last = read(&mut pool)?;
        let t = watch.secs();
        let settled = last["events"]["settled"].as_u64().unwrap_or(0) - settled0;
        let sample = serde_json::json!({
            "t_s": round3(t),
            "events_per_s": round3(settled as f64 / t),
            "waiting": last["events"]["waiting"],
            "dropped": last["events"]["dropped"],
            "frontend_rss_mib": mib(master.rss_bytes()?),
            "pool_rss_mib": mib(pool.rss_bytes()?),
            "frontend_cpu": round3((master.cpu_seconds()? - cpu_master0) / t),
            "pool_cpu": round3((pool.cpu_seconds()? - cpu_pool0) / t),
        });
        progress(&format!(
            "{what}: {t:.0} s: {} events/s, {} waiting on the agents, frontend {} MiB, CPU \
             frontend {} pool {} (cores)",
            sample["events_per_s"],
            sample["waiting"],
            sample["frontend_rss_mib"],
            sample["frontend_cpu"],
            sample["pool_cpu"]
        ));
        samples.push(sample);
    }
    let t = watch.secs();
    let settled = last["events"]["settled"].as_u64().unwrap_or(0) - settled0;
    // The second half of the window: the steady state, past any start-up transient.
    let half = samples.len() / 2;
    let steady = match (samples.get(half.saturating_sub(1)), samples.last()) {
        (Some(a), Some(b)) if half > 0 => {
            let at = |s: &serde_json::Value| {
                (
                    s["t_s"].as_f64().unwrap_or(0.0),
                    s["events_per_s"].as_f64().unwrap_or(0.0),
                )
            };
            let ((t0, r0), (t1, r1)) = (at(a), at(b));
            round3((r1 * t1 - r0 * t0) / (t1 - t0).max(0.001))
        }
        _ => round3(settled as f64 / t),
    };
    let rss_max = samples
        .iter()
        .filter_map(|s| s["frontend_rss_mib"].as_f64())
        .fold(0.0, f64::max);
    drop(pool);
    master.terminate(Duration::from_secs(600), env).await?;
    Ok(serde_json::json!({
        "events_per_s": round3(settled as f64 / t),
        "events_per_s_second_half": steady,
        "events_settled": settled,
        "p50_ms": last["events"]["p50_ms"],
        "p99_ms": last["events"]["p99_ms"],
        "max_ms": last["events"]["max_ms"],
        "dropped": last["events"]["dropped"],
        "frontend_rss_mib_before_clients": mib(rss0),
        "frontend_rss_mib_max": rss_max,
        "samples": samples,
    }))
}

/// Reads the pool's service-time file until `done` holds for it.
async fn wait_stats(
    path: &Path,
    pool: &mut Child,
    env: &Env,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, String> {
    let what = format!(
        "the load generator's figures in {} to reach the expected state",
        path.display()
    );
    until(&mut [pool], env, &what, 200, async || {
        let v = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        Ok(v.filter(|v| done(v)))
    })
    .await
}

/// Calls `probe` every `every_ms` until it yields a value, checking first that `procs` are alive;
/// after 60 s, an error saying what was waited for.
async fn until<T>(
    procs: &mut [&mut Child],
    env: &Env,
    what: &str,
    every_ms: u64,
    mut probe: impl AsyncFnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let watch = Watch::start(env);
    loop {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if watch.secs() > 60.0 {
            return Err(format!("waited 60 s for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
}

/// A master and one minion. The master is killed; during its outage the minion's clients connect,
/// all drop, and connect again (a replicated `ClientSeen`, `ClientGone`, `ClientSeen` each); the master
/// restarts and applies the minion's backlog. Counted with the master's applied-events cursor.
async fn replication(o: &BenchOptions, dir: &Path, env: &Env) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let minion_port = crate::cli::demo::free_port()?;
    let setup = Setup::new(dir, n, env, |c| {
        config::add_frontends(c, &[("127.0.0.1".into(), minion_port)], &*env.clock)?;
        // Every client on the minion: what the master learns of them is replicated.
        let minion_url = c.server_urls().pop().expect("the minion's URL");
        c.client.server_urls = vec![minion_url];
        Ok(())
    })?;
    let node = setup
        .cfg
        .extra_frontends
        .first()
        .map(|x| x.node_name())
        .expect("one minion");
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    let mut minion = setup.start_minion(&node)?;
    let before = wait_applied(&mut api, &node, &mut [&mut master, &mut minion], env, |m| {
        m.connected && m.applied > 0
    })
    .await?;
    drop(api);
    drop(master);
    let outage = Watch::start(env);
    progress(&format!(
        "master down (minion {node} at {} applied events); {n} clients connect, drop and \
         reconnect during a {} s outage",
        before.applied, o.outage_s
    ));
    let stats = dir.join("service-times.json");
    let connected = |v: &serde_json::Value| v["connected"].as_u64().unwrap_or(0) >= n as u64;
    let mut pool = setup.start_pool(o, n, Some(&stats))?;
    wait_stats(&stats, &mut pool, env, connected).await?;
    drop(pool);
    let _ = std::fs::remove_file(&stats);
    let mut pool = setup.start_pool(o, n, Some(&stats))?;
    wait_stats(&stats, &mut pool, env, connected).await?;
    let churn_s = outage.secs();
    let rest = (o.outage_s as f64 - churn_s).max(0.0);
    progress(&format!(
        "{n} clients connected twice in {churn_s:.1} s; master restarts in {rest:.1} s"
    ));
    tokio::time::sleep(Duration::from_secs_f64(rest)).await;
    minion.check_alive()?;
    let outage_s = outage.secs();
    let watch = Watch::start(env);
    let mut master = setup.start_master()?;
    let mut api = wait_for_api(&setup.api_cfg, &mut master, 60.0, env).await?;
    let api_s = watch.secs();
    // Samples of the applied cursor until every client is known connected and it stops moving.
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut last_report, mut stable_since) = (0.0, None::<f64>);
    let limit = (n as f64 / 50.0).max(120.0);
    loop {
        master.check_alive()?;
        minion.check_alive()?;
        pool.check_alive()?;
        let t = watch.secs();
        let m = minion_status(&mut api, &node).await?;
        let moved = samples.last().is_none_or(|&(_, a)| a != m.applied);
        samples.push((t, m.applied));
        if moved {
            stable_since = None;
        } else if stable_since.is_none() {
            stable_since = Some(t);
        }
        let seen = api
            .search("all")
            .await?
            .clients
            .iter()
            .filter(|c| c.connected)
            .count();
        if seen >= n && m.connected && stable_since.is_some_and(|s| t - s >= 1.0) {
            let done = m.applied;
            // The master was killed at `before.applied` (no client had connected yet), so what
            // it applied since is `done - before.applied`. The drain runs from the last sample
            // still at that cursor (or the restart itself, when the master drained the backlog
            // before its API first answered) to the first sample at its end.
            let start = samples
                .iter()
                .rev()
                .find(|&&(_, a)| a <= before.applied)
                .map_or(0.0, |&(t, _)| t);
            let end = samples
                .iter()
                .find(|&&(_, a)| a == done)
                .map_or(t, |&(t, _)| t);
            let events = done.saturating_sub(before.applied);
            let window = end - start;
            progress(&format!(
                "master applied {events} events and caught up {end:.2} s after its restart"
            ));
            return Ok(serde_json::json!({
                "scenario": o.scenario.name(),
                "clients": n,
                "events": "ClientSeen/ClientGone: every client connected, dropped, reconnected during the outage",
                "outage_s": round3(outage_s),
                "backlog_events": events,
                "catchup_s": round3(end),
                "master_api_up_s": round3(api_s),
                "drain_s": round3(window),
                "events_per_s": if window > 0.0 { round3(events as f64 / window) } else { 0.0 },
                "config": setup.tuned(),
            }));
        }
        if t - last_report >= 2.0 {
            progress(&format!(
                "master applied {} events, knows {seen}/{n} clients connected ({t:.0} s after restart)",
                m.applied
            ));
            last_report = t;
        }
        if t > limit {
            return Err(format!(
                "the master did not catch up in {t:.0} s (see the logs in {})",
                setup.dir.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn minion_status(
    api: &mut Api,
    node: &str,
) -> Result<talon_proto::api::MinionStatus, String> {
    Ok(api
        .cluster()
        .await?
        .minions
        .into_iter()
        .find(|m| m.node == node)
        .unwrap_or_else(|| talon_proto::api::MinionStatus {
            node: node.to_owned(),
            ..Default::default()
        }))
}

/// Polls the master's status of `node` until `done` holds.
async fn wait_applied(
    api: &mut Api,
    node: &str,
    procs: &mut [&mut Child],
    env: &Env,
    done: impl Fn(&talon_proto::api::MinionStatus) -> bool,
) -> Result<talon_proto::api::MinionStatus, String> {
    let what = format!("minion {node} to replicate to the master");
    until(procs, env, &what, 100, async || {
        let m = minion_status(api, node).await?;
        Ok(done(&m).then_some(m))
    })
    .await
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
    limit_s: f64,
    env: &Env,
) -> Result<Api, String> {
    let watch = Watch::start(env);
    loop {
        master.check_alive()?;
        if let Ok(mut api) = Api::connect_with(c, &env.net).await
            && api.search("C.0").await.is_ok()
        {
            return Ok(api);
        }
        if watch.secs() > limit_s {
            return Err(format!(
                "the master's API did not answer within {limit_s} s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `n` clients are connected; returns the seconds since `watch` started.
async fn wait_connected(
    api: &mut Api,
    n: usize,
    procs: &mut [&mut Child],
    watch: &Watch,
) -> Result<f64, String> {
    // Generous: 100 clients per second at worst, and never under two minutes.
    let limit = (n as f64 / 100.0).max(120.0);
    let mut last_report = 0.0;
    loop {
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        let r = api.search("all").await?;
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
                "only {connected} of {n} clients connected after {t:.0} s (see the logs in {})",
                procs
                    .first()
                    .and_then(|p| p.log.parent())
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A hunt of `Generic.Test.Rows count=<rows> pause_ms=<pause_ms>` over the `n` connected clients.
async fn hunt(
    api: &mut Api,
    n: usize,
    rows: u64,
    pause_ms: u64,
    limit: f64,
    master: &mut Child,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let params = [
        ("count".to_owned(), rows.to_string()),
        ("pause_ms".to_owned(), pause_ms.to_string()),
    ]
    .into_iter()
    .collect();
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

/// The figures as a two-column record (`config` last; per-run details only with --json).
pub fn table(v: &serde_json::Value) -> String {
    let Some(m) = v.as_object() else {
        return String::new();
    };
    let mut fields: Vec<(&str, String)> = m
        .iter()
        .filter(|(_, x)| !x.is_object())
        .map(|(k, x)| {
            let shown = match (k.ends_with("_bytes"), x.as_u64()) {
                (true, Some(b)) if b >= 1 << 20 => {
                    format!("{x} ({:.1} MiB)", b as f64 / (1 << 20) as f64)
                }
                (true, Some(b)) if b >= 1 << 10 => format!("{x} ({:.1} KiB)", b as f64 / 1024.0),
                _ => x.to_string().trim_matches('"').to_owned(),
            };
            (k.as_str(), shown)
        })
        .collect();
    if let Some(c) = m.get("config") {
        fields.push(("config", c.to_string()));
    }
    let mut out = crate::cli::show::record(fields);
    if m.keys().any(|k| k.starts_with("run_")) {
        out.push_str("\n(each run's hunt and service-time figures: --json)");
    }
    out
}

/// The queries `bench query` times, by name.
const BENCH_QUERIES: &[(&str, &str)] = &[
    (
        "processes",
        "SELECT pid, name, path, cmdline, uid, resident_size FROM processes",
    ),
    (
        "listening_ports",
        "SELECT pid, port, protocol, address FROM listening_ports",
    ),
    ("users", "SELECT uid, username, directory, shell FROM users"),
    ("system_info", "SELECT * FROM system_info"),
    (
        "hash_etc_passwd",
        "SELECT sha256 FROM hash WHERE path = '/etc/passwd'",
    ),
    (
        "file_etc",
        "SELECT path, size, mtime FROM file WHERE directory = '/etc'",
    ),
    (
        "processes_join_users",
        "SELECT p.pid, p.name, u.username FROM processes p JOIN users u ON p.uid = u.uid",
    ),
];

/// `bench query`: each of [`BENCH_QUERIES`] `runs` times through the agent's path.
fn query_bench(runs: usize) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), "query".into());
    out.insert("runs".into(), runs.into());
    for (name, sql) in BENCH_QUERIES {
        time_runs(runs, name, &mut out, |emit| {
            crate::query::run_query(sql, crate::agent::artifacts::Budget::unlimited(), emit)
        })?;
    }
    // The built-in artifacts written as SQL, with their default parameters, as an agent runs them.
    for b in crate::definitions::builtins().iter().filter(|b| !b.native) {
        let name = &b.spec.name;
        let params = talon_core::artifacts::validate(&b.spec, &Default::default())
            .map_err(|e| format!("{name}: {e}"))?;
        time_runs(runs, name, &mut out, |emit| {
            crate::agent::artifacts::run(
                name,
                &params,
                crate::agent::artifacts::Budget::unlimited(),
                emit,
            )
        })?;
    }
    Ok(serde_json::Value::Object(out))
}

/// Runs `run` `runs` times, timing each, and records `name`'s rows, p50 and max in `out`.
fn time_runs(
    runs: usize,
    name: &str,
    out: &mut serde_json::Map<String, serde_json::Value>,
    mut run: impl FnMut(&mut crate::agent::artifacts::Emit<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let clock = crate::clock::SystemClock;
    let mut ms: Vec<f64> = Vec::with_capacity(runs);
    let mut rows = 0u64;
    for _ in 0..runs {
        let t0 = clock.micros();
        rows = 0;
        run(&mut |_| {
            rows += 1;
            Ok(())
        })
        .map_err(|e| format!("{name}: {e}"))?;
        ms.push((clock.micros() - t0) as f64 / 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    progress(&format!(
        "{name}: {rows} rows, p50 {:.2} ms",
        ms[ms.len() / 2]
    ));
    out.insert(format!("{name}_rows"), rows.into());
    out.insert(format!("{name}_p50_ms"), round2(ms[ms.len() / 2]).into());
    out.insert(format!("{name}_max_ms"), round2(ms[ms.len() - 1]).into());
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Default key cache: `$XDG_CACHE_HOME/talon/bench-keys` or `~/.cache/talon/bench-keys`.
pub fn default_key_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("talon").join("bench-keys")
}
