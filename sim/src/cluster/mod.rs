//! A simulated deployment: the production master, minions and agents (`talon_io::server`,
//! `talon_io::agent`) on turmoil hosts, one shared [`SimVolume`] with the seed's 40–60 ms per
//! operation, a crashable local disk per node, a driver that runs hunts and label writes through the
//! real API, and a nemesis that applies the faults drawn from the seed ([`faults`]).
//!
//! A run has two phases. The **safety phase** (`duration_s`) runs the workload under faults; checkers
//! sample the storage every virtual second. Then everything heals (links repaired and released,
//! crashed nodes restarted, the volume reachable and error-free) and the **liveness phase** requires
//! convergence within [`LIVENESS_BOUND_S`]: every hunt complete on every client, tasks delivered,
//! acknowledged writes on the volume, outboxes drained. The final checkers then read the storage —
//! the shared volume and the nodes' local disks, not the nodes' claims — and compare it with what
//! the API reported ([`check`]).

pub mod check;
pub mod faults;

use crate::disk::{DiskFaults, SimDisk};
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use crate::world::{SimClock, SimEntropy, SimLocalDisk, SimNet, SimVolume};
use check::{Expect, Samples};
use faults::{Fault, Planned, Swarm};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use talon_core::ClientId;
use talon_io::api_client::Api;
use talon_io::config::{self, GenerateOptions};
use talon_io::env::Env;
use talon_io::net::Net;
use talon_io::storage::NodeStorage;
use talon_io::storage::volume::SharedVolume;
use talon_proto::api;

/// Virtual Unix time at the start of every run.
pub const EPOCH_MS: u64 = 1_790_000_000_000;
/// Virtual seconds the deployment has, once every fault is healed, to converge.
///
/// What it covers: a crashed master restarting and reloading its records from the 40–60 ms volume,
/// agents noticing a connection that died silently under a partition (HTTP/2 keepalive: 20 s + 10 s),
/// their reconnect backoff (at most 30 s), the master's task resend (5 s), the datastore's flush.
pub const LIVENESS_BOUND_S: u64 = 120;
/// A frontend process that exits (an error it cannot ride out) is restarted after this long, as a
/// service manager would.
pub const RESTART_DELAY_MS: u64 = 1_000;
const CLIENT_PORT: u16 = 8000;
const API_PORT: u16 = 8001;
/// Hunts the driver creates at most (each schedules every client).
const HUNTS_MAX: usize = 12;
/// Every API call of the driver gives up after this long (the master may be down).
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed: the run is a function of it.
    pub seed: u64,
    /// Minion frontends beside the master.
    pub minions: usize,
    /// Endpoint agents.
    pub clients: usize,
    /// Rows each client returns per hunt (`Generic.Test.Rows count=`).
    pub rows: u64,
    /// Virtual seconds of the safety phase (faults and workload); the liveness phase follows.
    pub duration_s: u64,
    /// Draw and apply faults (`false`: the same workload, fault-free).
    pub faults: bool,
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was drawn from the seed.
    pub swarm: Swarm,
    /// The faults applied.
    pub plan: Vec<Planned>,
    /// Virtual ms at which the deployment had converged after healing (0 if it did not).
    pub converged_ms: u64,
    /// The hunts the driver created (acknowledged) and their stats as the master reported them.
    pub hunts: BTreeMap<String, api::HuntStats>,
    /// Labels whose addition the master acknowledged.
    pub labels: usize,
    /// Operations the shared volume served, and how many failed by injection.
    pub volume_ops: (u64, u64),
    /// Frontend processes that exited on an error and were restarted: (virtual ms, host, error).
    pub exits: Vec<(u64, String, String)>,
    /// Broken invariants, each naming what was expected and found.
    pub violations: Vec<String>,
    /// SHA-256 over the final contents of the shared volume (every record, row and timestamp the
    /// nodes wrote), the faults applied, the driver's acknowledged operations and the virtual times.
    pub trace_hash: String,
}

/// What the driver saw; shared with the harness.
#[derive(Default)]
struct DriverLog {
    /// Hunts created, acknowledged by the master.
    hunts: Vec<String>,
    /// Hunt creations whose outcome is unknown (an error or a timeout: the master may have created it).
    hunts_unknown: usize,
    /// (client, label) additions acknowledged.
    labels: BTreeSet<(String, String)>,
    /// Final stats per hunt, fetched after convergence.
    stats: BTreeMap<String, api::HuntStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn elapsed_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

/// Runs one simulation; `progress` gets a line now and then.
pub fn run(o: &SimOptions, progress: &mut dyn FnMut(String)) -> Result<Report, String> {
    if o.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if o.duration_s == 0 {
        return Err("--duration must be at least 1 virtual second".into());
    }
    let root = SimRng::new(o.seed);
    let swarm = Swarm::draw(&mut root.fork("parameters"), o.minions, o.faults);
    let safety_ms = o.duration_s * 1000;
    let minion_names: Vec<String> = (1..=o.minions).map(|i| format!("minion{i}")).collect();
    let groups = o.clients.clamp(1, 4);
    let client_hosts: Vec<String> = (0..groups).map(|g| format!("clients{g}")).collect();
    let plan = swarm.plan(
        &mut root.fork("plan"),
        safety_ms,
        &minion_names,
        &client_hosts,
    );
    progress(format!("drawn: {swarm:?}"));
    progress(format!(
        "faults ({}): {}",
        plan.len(),
        if plan.is_empty() {
            "none".to_owned()
        } else {
            plan.iter()
                .map(|p| format!("{} @{}..{}ms", p.fault, p.at_ms, p.until_ms))
                .collect::<Vec<_>>()
                .join("; ")
        }
    ));

    // The deployment, made the way `talon config` makes it (hostnames are turmoil host names).
    let clock = SimClock { epoch_ms: EPOCH_MS };
    let cfg_entropy = SimEntropy::new(root.fork("config"));
    let generate = GenerateOptions {
        hostname: "master".into(),
        frontend_port: CLIENT_PORT,
        api_port: API_PORT,
        gui_port: 8889,
        datastore: PathBuf::from("/sim/shared"),
    };
    let mut cfg = config::generate(&generate, &clock, &cfg_entropy).map_err(|e| e.to_string())?;
    let minions: Vec<(String, u16)> = minion_names
        .iter()
        .map(|m| (m.clone(), CLIENT_PORT))
        .collect();
    config::add_frontends(&mut cfg, &minions, &clock)?;
    let api_cfg = config::api_client(&cfg, "sim", &clock)?;
    let client_cfg = cfg.client_config();

    let model = LatencyModel::network_volume();
    let volume = SimVolume::new(model, root.fork("volume"));
    volume.set_error_p(swarm.volume_error_p);

    // Endpoint identities, from the seed; some clients join late.
    let mut late_rng = root.fork("late-clients");
    let mut clients = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        let mut key = [0u8; 32];
        root.fork(&format!("client-key-{i}")).fill(&mut key);
        let (identity, id) =
            talon_io::pki::endpoint_identity_from_seed(key, talon_core::Timestamp(EPOCH_MS))
                .map_err(|e| e.to_string())?;
        let start_ms = if late_rng.chance(swarm.late_clients) {
            late_rng.range(1_000, safety_ms.max(1_000))
        } else {
            0
        };
        clients.push((identity, id, start_ms));
    }
    let ids: Vec<ClientId> = clients.iter().map(|c| c.1.clone()).collect();

    let mut sim = turmoil::Builder::new()
        .rng_seed(o.seed)
        // The harness enforces its own bounds; this only stops a wedged run.
        .simulation_duration(Duration::from_secs(o.duration_s + LIVENESS_BOUND_S + 60))
        .min_message_latency(Duration::from_millis(swarm.net_latency_ms.0))
        .max_message_latency(Duration::from_millis(swarm.net_latency_ms.1))
        // Every client may connect at once: the listeners' backlog must hold them.
        .tcp_capacity(o.clients.max(64) * 4)
        .build();

    let exits: Arc<Mutex<Vec<(u64, String, String)>>> = Arc::default();
    let disk = |label: &str| {
        let faults = DiskFaults {
            error_p: 0.0,
            torn_write_p: swarm.torn_write_p,
        };
        SimLocalDisk::new(SimDisk::new(64 << 30, faults, root.fork(label)))
    };
    // Each frontend's local disk, by host name: kept across its restarts, crashed with it.
    let mut disks: BTreeMap<String, SimLocalDisk> = BTreeMap::new();
    for name in std::iter::once("master".to_owned()).chain(minion_names.iter().cloned()) {
        let local = disk(&format!("disk-{name}"));
        disks.insert(name.clone(), local.clone());
        let (cfg, root, volume, exits) = (cfg.clone(), root.clone(), volume.clone(), exits.clone());
        let incarnation = Arc::new(AtomicU64::new(0));
        let host = name.clone();
        sim.host(host.as_str(), move || {
            let (cfg, root, exits, name) = (cfg.clone(), root.clone(), exits.clone(), name.clone());
            let n = incarnation.fetch_add(1, Ordering::Relaxed);
            let env = Env {
                clock: Arc::new(SimClock { epoch_ms: EPOCH_MS }),
                entropy: Arc::new(SimEntropy::new(root.fork(&format!("env-{name}-{n}")))),
                net: Arc::new(SimNet),
            };
            // The same disk and volume every incarnation: a restart finds what the last one left.
            let storage = NodeStorage {
                local: Box::new(local.clone()),
                buffer: Box::new(local.clone()),
                metadata: SharedVolume::new(volume.mount(&name)),
                filestore: SharedVolume::new(volume.mount(&name)),
                local_name: format!("{name}:/local"),
            };
            async move {
                let r = if name == "master" {
                    talon_io::server::run_master(env, cfg, storage, |_| {}, std::future::pending())
                        .await
                } else {
                    let node = format!("{name}-{CLIENT_PORT}");
                    talon_io::server::run_minion(
                        env,
                        cfg,
                        node,
                        storage,
                        |_| {},
                        std::future::pending(),
                    )
                    .await
                };
                // A process that exits is restarted by the harness (the supervisor), not a failed
                // simulation: record why.
                let why = match r {
                    Ok(()) => "exited".to_owned(),
                    Err(e) => e,
                };
                lock(&exits).push((elapsed_ms(), name, why));
                Ok(())
            }
        });
    }
    for (g, host) in client_hosts.iter().enumerate() {
        let mine: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|(i, _)| i % groups == g)
            .map(|(i, c)| (i, c.clone()))
            .collect();
        let (root, client_cfg) = (root.clone(), client_cfg.clone());
        // The impostor: its own key, claiming the first client's id (BRIEF invariant 6).
        let impostor = if g == 0 {
            let mut key = [0u8; 32];
            root.fork("impostor-key").fill(&mut key);
            let (identity, _) =
                talon_io::pki::endpoint_identity_from_seed(key, talon_core::Timestamp(EPOCH_MS))
                    .map_err(|e| e.to_string())?;
            Some((identity, ids[0].clone()))
        } else {
            None
        };
        sim.host(host.as_str(), move || {
            let (root, client_cfg, mine, impostor) = (
                root.clone(),
                client_cfg.clone(),
                mine.clone(),
                impostor.clone(),
            );
            let agent =
                move |identity, id, hostname: String, label: String| talon_io::agent::Agent {
                    config: client_cfg.clone(),
                    identity,
                    id,
                    clock: Arc::new(SimClock { epoch_ms: EPOCH_MS }),
                    entropy: Arc::new(SimEntropy::new(root.fork(&label))),
                    outbox: Default::default(),
                    hostname: Some(hostname),
                    inline_artifacts: true,
                    net: Arc::new(SimNet),
                };
            async move {
                let mut set = tokio::task::JoinSet::new();
                if let Some((identity, id)) = impostor {
                    let a = agent(identity, id, "impostor".into(), "impostor".into());
                    // It is refused on every attempt and keeps retrying (its backoff grows).
                    set.spawn(a.run());
                }
                for (i, (identity, id, start_ms)) in mine {
                    let a = agent(identity, id, format!("sim-{i}"), format!("client-{i}"));
                    set.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(start_ms)).await;
                        a.run().await
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())??;
                }
                Ok(())
            }
        });
    }

    let log: Arc<Mutex<DriverLog>> = Arc::default();
    let finish = Arc::new(AtomicBool::new(false));
    {
        let (log, finish, ids) = (log.clone(), finish.clone(), ids.clone());
        let (rows, hunt_every, label_every) = (o.rows, swarm.hunt_every_ms, swarm.label_every_ms);
        let mut pick = root.fork("driver");
        sim.client("driver", async move {
            let net: Arc<dyn Net> = Arc::new(SimNet);
            let mut api: Option<Api> = None;
            let (mut next_hunt, mut next_label, mut label_n) = (2_000, 1_000, 0u64);
            loop {
                if api.is_none() {
                    match tokio::time::timeout(API_TIMEOUT, Api::connect_with(&api_cfg, &net)).await
                    {
                        Ok(Ok(a)) => api = Some(a),
                        _ => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    }
                }
                let Some(a) = api.as_mut() else { continue };
                let now = elapsed_ms();
                let mut failed = false;
                if finish.load(Ordering::Relaxed) {
                    // Converged: read every hunt's stats as the master reports them.
                    let hunts = lock(&log).hunts.clone();
                    let mut stats = BTreeMap::new();
                    for h in hunts {
                        match tokio::time::timeout(API_TIMEOUT, a.hunt(&h)).await {
                            Ok(Ok(s)) => {
                                stats.insert(h, s.stats.unwrap_or_default());
                            }
                            _ => failed = true,
                        }
                    }
                    if !failed {
                        lock(&log).stats = stats;
                        return Ok(());
                    }
                } else if now < safety_ms {
                    if now >= next_hunt && lock(&log).hunts.len() < HUNTS_MAX {
                        next_hunt = now + hunt_every;
                        let req = api::CreateHuntRequest {
                            artifact: "Generic.Test.Rows".into(),
                            params: [("count".to_string(), rows.to_string())].into(),
                            description: "simulation".into(),
                            ..Default::default()
                        };
                        match tokio::time::timeout(API_TIMEOUT, a.create_hunt(req)).await {
                            Ok(Ok(h)) => lock(&log).hunts.push(h.hunt_id),
                            _ => {
                                lock(&log).hunts_unknown += 1;
                                failed = true;
                            }
                        }
                    }
                    if now >= next_label {
                        next_label = now + label_every;
                        let client = ids[pick.range(0, ids.len() as u64 - 1) as usize].to_string();
                        label_n += 1;
                        let label = format!("sim-l{label_n}");
                        match tokio::time::timeout(API_TIMEOUT, a.label(&client, &label, false))
                            .await
                        {
                            Ok(Ok(_)) => {
                                lock(&log).labels.insert((client, label));
                            }
                            // Unknown client (not enrolled yet) or the master unreachable.
                            _ => failed = true,
                        }
                    }
                }
                if failed {
                    api = None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    progress(format!(
        "running: master, {} minions, {} clients ({} joining late), {} rows per hunt; safety phase {} virtual s, then at most {LIVENESS_BOUND_S} s to converge",
        o.minions,
        o.clients,
        clients.iter().filter(|c| c.2 > 0).count(),
        o.rows,
        o.duration_s
    ));

    // The nemesis and the supervisor, between steps of the simulation.
    let mut events: Vec<(u64, bool, usize)> = plan
        .iter()
        .enumerate()
        .flat_map(|(i, p)| [(p.at_ms, true, i), (p.until_ms, false, i)])
        .collect();
    // Heals before starts at the same instant.
    events.sort_by_key(|&(t, start, i)| (t, start, i));
    let mut next_event = 0;
    let mut crashed: BTreeSet<String> = BTreeSet::new();
    let mut restart_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = Samples::default();
    let expect = Expect {
        rows: o.rows,
        clients: ids.clone(),
        minions: minion_names
            .iter()
            .map(|m| format!("{m}-{CLIENT_PORT}"))
            .collect(),
        outbox_events_max: talon_core::replication::OutboxLimits::default().events_max,
    };
    let mut healed = false;
    let mut converged_ms = 0;
    let mut next_sample = 1_000;
    let mut last_progress = 0;
    let mut violations = Vec::new();
    let deadline_ms = safety_ms + LIVENESS_BOUND_S * 1000;
    let mut waiting_for = String::new();
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while next_event < events.len() && events[next_event].0 <= now {
            let (_, start, i) = events[next_event];
            next_event += 1;
            apply(
                &mut sim,
                &plan[i].fault,
                start,
                &volume,
                &disks,
                &mut crashed,
            );
        }
        // A crash aimed at an fsync tripped: the process dies now (its disk already did).
        for (name, d) in &disks {
            if d.power_lost() && !crashed.contains(name) {
                sim.crash(name.as_str());
                crashed.insert(name.clone());
            }
        }
        if !healed && now >= safety_ms {
            // The liveness phase: every fault is healed (the plan's windows end by here), and the
            // volume stops failing.
            for p in &plan {
                if p.until_ms > now {
                    apply(&mut sim, &p.fault, false, &volume, &disks, &mut crashed);
                }
            }
            volume.set_error_p(0.0);
            healed = true;
            progress(format!(
                "{:.1} virtual s: safety phase over; all faults healed",
                now as f64 / 1000.0
            ));
        }
        // The supervisor: a frontend that exited on its own is started again.
        for name in disks.keys() {
            if crashed.contains(name) {
                continue;
            }
            if !sim.is_host_running(name.as_str()) {
                let at = *restart_at
                    .entry(name.clone())
                    .or_insert(now + RESTART_DELAY_MS);
                if now >= at {
                    restart_at.remove(name);
                    sim.bounce(name.as_str());
                }
            }
        }
        if now >= next_sample {
            next_sample = now + 1_000;
            samples.sample(now, &volume, &disks, &expect, &mut violations);
            if healed && converged_ms == 0 && !finish.load(Ordering::Relaxed) {
                let l = lock(&log);
                match check::converged(&volume, &disks, &expect, &l.hunts, &l.labels) {
                    Ok(()) => {
                        converged_ms = now;
                        finish.store(true, Ordering::Relaxed);
                        progress(format!(
                            "{:.1} virtual s: converged ({:.1} s after healing)",
                            now as f64 / 1000.0,
                            (now - safety_ms) as f64 / 1000.0
                        ));
                    }
                    Err(w) => waiting_for = w,
                }
            }
            if now >= last_progress + 10_000 {
                last_progress = now;
                let l = lock(&log);
                progress(format!(
                    "{:.0} virtual s: {} hunts created, {} labels, {} volume ops ({} failed), {} process exits{}",
                    now as f64 / 1000.0,
                    l.hunts.len(),
                    l.labels.len(),
                    volume.ops(),
                    volume.errors(),
                    lock(&exits).len(),
                    if healed && converged_ms == 0 {
                        format!("; waiting for: {waiting_for}")
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if converged_ms == 0 && now > deadline_ms {
            violations.push(format!(
                "liveness: not converged {LIVENESS_BOUND_S} virtual s after every fault healed; still waiting for: {waiting_for}"
            ));
            break;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                violations.push(format!("simulation failed: {e}"));
                break;
            }
        }
    }

    let log = std::mem::take(&mut *lock(&log));
    let files = volume.snapshot();
    if converged_ms > 0 {
        check::final_state(&files, &expect, &log.hunts, &log.stats, &mut violations);
    }
    let exits = std::mem::take(&mut *lock(&exits));
    if let Some(path) = std::env::var_os("TALON_SIM_DUMP") {
        // For chasing nondeterminism: every stored key and its contents, one per line.
        let mut text = String::new();
        for (k, v) in &files {
            text.push_str(&format!(
                "{k} {}\n",
                String::from_utf8_lossy(v).escape_debug()
            ));
        }
        std::fs::write(&path, text).map_err(|e| format!("TALON_SIM_DUMP: {e}"))?;
    }
    let mut h = Sha256::new();
    for (k, v) in &files {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    for p in &plan {
        h.update(format!("{p:?}").as_bytes());
    }
    for hunt in &log.hunts {
        h.update(hunt.as_bytes());
    }
    for (c, l) in &log.labels {
        h.update(c.as_bytes());
        h.update(l.as_bytes());
    }
    for (t, host, why) in &exits {
        h.update(t.to_le_bytes());
        h.update(host.as_bytes());
        h.update(why.as_bytes());
    }
    for n in [converged_ms, volume.ops(), volume.errors()] {
        h.update(n.to_le_bytes());
    }
    let trace_hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Report {
        swarm,
        plan,
        converged_ms,
        hunts: log.stats,
        labels: log.labels.len(),
        volume_ops: (volume.ops(), volume.errors()),
        exits,
        violations,
        trace_hash,
    })
}

/// Starts (`start`) or heals one fault.
fn apply(
    sim: &mut turmoil::Sim<'_>,
    fault: &Fault,
    start: bool,
    volume: &SimVolume,
    disks: &BTreeMap<String, SimLocalDisk>,
    crashed: &mut BTreeSet<String>,
) {
    match (fault, start) {
        (Fault::Partition { a, b }, true) => sim.partition(a.as_str(), b.as_str()),
        (Fault::Partition { a, b }, false) => sim.repair(a.as_str(), b.as_str()),
        (Fault::OneWay { from, to }, true) => sim.partition_oneway(from.as_str(), to.as_str()),
        (Fault::OneWay { from, to }, false) => sim.repair_oneway(from.as_str(), to.as_str()),
        (Fault::Hold { a, b }, true) => sim.hold(a.as_str(), b.as_str()),
        (Fault::Hold { a, b }, false) => sim.release(a.as_str(), b.as_str()),
        (Fault::Crash { host, at_sync }, true) => {
            let Some(d) = disks.get(host) else { return };
            if *at_sync {
                d.arm_power_loss();
            } else {
                sim.crash(host.as_str());
                d.crash();
                crashed.insert(host.clone());
            }
        }
        (Fault::Crash { host, .. }, false) => {
            let Some(d) = disks.get(host) else { return };
            // An armed crash that never met an fsync simply did not happen.
            d.disarm();
            if crashed.remove(host) {
                d.restore_power();
                sim.bounce(host.as_str());
            }
        }
        (Fault::VolumeCut { host }, cut) => volume.set_cut(host, cut),
    }
}
