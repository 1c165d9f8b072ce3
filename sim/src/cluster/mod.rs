//! A simulated deployment: the production master, minions and agents (`talon_io::node::server`,
//! `talon_io::agent`) on turmoil hosts, one shared [`SimVolume`] with the seed's 40–60 ms per
//! operation, a crashable (and losable) local disk per node, a driver that runs the analyst's
//! workload through the real API ([`driver`]), and a nemesis that applies the faults drawn from the
//! seed ([`faults`]).
//!
//! A run has two phases. The **safety phase** (`duration_s`) runs the workload under faults; checkers
//! sample the storage every virtual second. Then everything heals (links repaired and released,
//! crashed nodes restarted, the volume reachable and error-free, local disks error-free) and the
//! **liveness phase** requires convergence within [`LIVENESS_BOUND_S`]: every hunt complete on every
//! participant, tasks delivered, acknowledged writes on storage, outboxes drained. The final checkers
//! then read the storage — the shared volume and the nodes' local disks, not the nodes' claims — and
//! compare it with what the API reported ([`check`]).

pub mod check;
pub mod driver;
pub mod faults;

use crate::disk::{DiskFaults, SimDisk};
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use crate::world::{SimClock, SimEntropy, SimLocalDisk, SimNet, SimVolume};
use check::{Deployment, MetaView, Samples};
use driver::{Driver, Told, Workload};
use faults::{Fault, Planned, Swarm};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use talon_core::ClientId;
use talon_io::deploy::config::{self, GenerateOptions};
use talon_io::env::Env;
use talon_io::storage::NodeStorage;
use talon_io::storage::volume::{FsVolume, SharedVolume, SyncMode};
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

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The seed: the run is a function of it.
    pub seed: u64,
    /// Minion frontends beside the master.
    pub minions: usize,
    /// Endpoint agents.
    pub clients: usize,
    /// Typical rows each client returns per hunt (`Generic.Test.Rows count=`); hunts also draw one
    /// row, a few, and (some seeds) more than one agent batch.
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
    /// The analyst's workload drawn from the seed.
    pub workload: Workload,
    /// The faults applied.
    pub plan: Vec<Planned>,
    /// Virtual ms at which the deployment had converged after healing (0 if it did not).
    pub converged_ms: u64,
    /// Virtual ms the run lasted (to convergence, or to the liveness deadline or a failure).
    pub ended_ms: u64,
    /// The hunts the driver created (acknowledged) and their stats as the master reported them.
    pub hunts: BTreeMap<String, api::HuntStats>,
    /// Label changes the master acknowledged.
    pub labels: usize,
    /// Collections the master acknowledged.
    pub collections: usize,
    /// Event batches the agents were told are settled.
    pub event_batches_settled: u64,
    /// Event batches and events the volume holds at the end.
    pub events_stored: (u64, u64),
    /// Operations the shared volume served, and how many failed by injection.
    pub volume_ops: (u64, u64),
    /// Frontend processes that exited on an error and were restarted: (virtual ms, host, error).
    pub exits: Vec<(u64, String, String)>,
    /// Broken invariants, each naming what was expected and found.
    pub violations: Vec<String>,
    /// Wall time the checkers took (samples and convergence checks): the rest is the simulation.
    pub checks_wall: std::time::Duration,
    /// SHA-256 over the final contents of the shared volume (every record, row and timestamp the
    /// nodes wrote), the faults applied, the driver's acknowledged operations and the virtual times.
    pub trace_hash: String,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn elapsed_ms() -> u64 {
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
    let workload = Workload::draw(&mut root.fork("workload"), o.rows, o.clients);
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
    progress(format!("workload: {workload:?}"));
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
    let clock = SimClock::exact(EPOCH_MS);
    let cfg_entropy = SimEntropy::new(root.fork("config"));
    let generate = GenerateOptions {
        hostname: "master".into(),
        frontend_port: CLIENT_PORT,
        api_port: API_PORT,
        gui_port: 8889,
        monitoring_port: 0,
        datastore: PathBuf::from("/sim/shared"),
        key_type: talon_io::deploy::pki::KeyType::Ed25519,
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

    // Endpoint identities, from the seed; some clients join late, some leave for good.
    let mut late_rng = root.fork("late-clients");
    let mut leave_rng = root.fork("leaving-clients");
    let mut clients = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        let mut key = [0u8; 32];
        root.fork(&format!("client-key-{i}")).fill(&mut key);
        let (identity, id) = talon_io::deploy::pki::endpoint_identity_from_seed(
            key,
            talon_core::Timestamp(EPOCH_MS),
        )
        .map_err(|e| e.to_string())?;
        let start_ms = if late_rng.chance(swarm.late_clients) {
            late_rng.range(1_000, safety_ms.max(1_000))
        } else {
            0
        };
        let leave_ms = leave_rng
            .chance(swarm.leaving_clients)
            .then(|| leave_rng.range(start_ms + 1_000, (start_ms + 1_000).max(safety_ms)));
        clients.push((identity, id, start_ms, leave_ms));
    }
    let ids: Vec<ClientId> = clients.iter().map(|c| c.1.clone()).collect();
    let told: Arc<Mutex<Told>> = Arc::default();

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
            error_p: swarm.disk_error_p,
            torn_write_p: swarm.torn_write_p,
        };
        SimLocalDisk::new(SimDisk::new(64 << 30, faults, root.fork(label)))
    };
    // Each frontend's local disk, by host name: kept across its restarts, crashed with it.
    let mut disks: BTreeMap<String, SimLocalDisk> = BTreeMap::new();
    // How far each frontend machine's wall clock is behind (set when it is replaced).
    let mut clocks: BTreeMap<String, Arc<AtomicU64>> = BTreeMap::new();
    for name in std::iter::once("master".to_owned()).chain(minion_names.iter().cloned()) {
        let local = disk(&format!("disk-{name}"));
        disks.insert(name.clone(), local.clone());
        let behind = Arc::new(AtomicU64::new(0));
        clocks.insert(name.clone(), behind.clone());
        let (cfg, root, volume, exits) = (cfg.clone(), root.clone(), volume.clone(), exits.clone());
        let incarnation = Arc::new(AtomicU64::new(0));
        let host = name.clone();
        sim.host(host.as_str(), move || {
            let (cfg, root, exits, name) = (cfg.clone(), root.clone(), exits.clone(), name.clone());
            let n = incarnation.fetch_add(1, Ordering::Relaxed);
            let env = Env {
                clock: Arc::new(SimClock {
                    epoch_ms: EPOCH_MS,
                    behind: behind.clone(),
                }),
                entropy: Arc::new(SimEntropy::new(root.fork(&format!("env-{name}-{n}")))),
                net: Arc::new(SimNet),
                // Deterministic: a run is a function of its seed, whatever process runs it.
                host: name.clone(),
                pid: u32::try_from(n + 1).unwrap_or(u32::MAX),
            };
            // The same disk and volume every incarnation: a restart finds what the last one left.
            let storage = NodeStorage {
                local: Box::new(local.clone()),
                buffer: Box::new(local.clone()),
                // The production volume logic over the simulated primitives, as on a network
                // filesystem (per-file syncs); its temp files named per node and incarnation.
                metadata: SharedVolume::new(FsVolume::over(
                    volume.mount(&name),
                    SyncMode::PerFile,
                    &format!("{name}-{n}-m"),
                )),
                filestore: SharedVolume::new(FsVolume::over(
                    volume.mount(&name),
                    SyncMode::PerFile,
                    &format!("{name}-{n}-f"),
                )),
                local_name: format!("{name}:/local"),
                lock: None,
            };
            async move {
                let r = if name == "master" {
                    talon_io::node::server::run_master(
                        env,
                        cfg,
                        storage,
                        |_| {},
                        std::future::pending(),
                    )
                    .await
                } else {
                    let node = format!("{name}-{CLIENT_PORT}");
                    talon_io::node::server::run_minion(
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
        // The group's machine clock (every agent on it reads it; `Fault::ClockStep` moves it).
        let behind = Arc::new(AtomicU64::new(0));
        clocks.insert(host.clone(), behind.clone());
        let mine: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|(i, _)| i % groups == g)
            .map(|(i, c)| (i, c.clone()))
            .collect();
        let (root, client_cfg, told) = (root.clone(), client_cfg.clone(), told.clone());
        // The impostor: its own key, claiming the first client's id (invariant 6 (docs/architecture.md)).
        let impostor = if g == 0 {
            let mut key = [0u8; 32];
            root.fork("impostor-key").fill(&mut key);
            let (identity, _) = talon_io::deploy::pki::endpoint_identity_from_seed(
                key,
                talon_core::Timestamp(EPOCH_MS),
            )
            .map_err(|e| e.to_string())?;
            Some((identity, ids[0].clone()))
        } else {
            None
        };
        sim.host(host.as_str(), move || {
            let (root, client_cfg, mine, impostor, told, behind) = (
                root.clone(),
                client_cfg.clone(),
                mine.clone(),
                impostor.clone(),
                told.clone(),
                behind.clone(),
            );
            let agent = move |identity, id: ClientId, hostname: String, label: String| {
                // Every acknowledgement the agent receives is what the checkers hold storage to.
                let (me, flow_told) = (id.to_string(), told.clone());
                let observer: talon_io::agent::AckObserver =
                    Arc::new(move |flow: &str, seq: u64, settled: bool| {
                        lock(&flow_told)
                            .acks
                            .push((me.clone(), flow.to_owned(), seq, settled));
                    });
                let (me, event_told) = (id.to_string(), told.clone());
                let event_observer: talon_io::agent::AckObserver =
                    Arc::new(move |stream: &str, seq: u64, settled: bool| {
                        if settled {
                            lock(&event_told)
                                .events_settled
                                .entry((me.clone(), stream.to_owned()))
                                .or_default()
                                .insert(seq);
                        }
                    });
                let clock: Arc<dyn talon_io::clock::Clock> = Arc::new(SimClock {
                    epoch_ms: EPOCH_MS,
                    behind: behind.clone(),
                });
                talon_io::agent::Agent {
                    config: client_cfg.clone(),
                    identity,
                    id,
                    clock: clock.clone(),
                    entropy: Arc::new(SimEntropy::new(root.fork(&label))),
                    outbox: talon_io::agent::Outbox::default()
                        .observed(observer)
                        .observed_events(event_observer),
                    host: talon_io::query::Host::Virtual {
                        hostname: hostname.into(),
                        cache: talon_io::query::TableCache::new(clock),
                    },
                    inline_artifacts: true,
                    net: Arc::new(SimNet),
                }
            };
            async move {
                let mut set = tokio::task::JoinSet::new();
                if let Some((identity, id)) = impostor {
                    let a = agent(identity, id, "impostor".into(), "impostor".into());
                    // It is refused on every attempt and keeps retrying (its backoff grows).
                    set.spawn(a.run());
                }
                for (i, (identity, id, start_ms, leave_ms)) in mine {
                    let a = agent(identity, id, format!("sim-{i}"), format!("client-{i}"));
                    set.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(start_ms)).await;
                        match leave_ms {
                            // Leaves for good: its connection and unfinished work are dropped.
                            Some(at) => {
                                let stay = Duration::from_millis(at - start_ms);
                                tokio::time::timeout(stay, a.run()).await.unwrap_or(Ok(()))
                            }
                            None => a.run().await,
                        }
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())??;
                }
                // Every agent left: the host idles (its end is not the simulation's end).
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }

    let finish = Arc::new(AtomicBool::new(false));
    {
        let driver = Driver {
            api: api_cfg,
            ids: ids.clone(),
            workload: workload.clone(),
            rng: root.fork("driver"),
            told: told.clone(),
            finish: finish.clone(),
            safety_ms,
        };
        sim.client("driver", driver.run());
    }

    progress(format!(
        "running: master, {} minions, {} clients ({} joining late, {} leaving), about {} rows per flow; safety phase {} virtual s, then at most {LIVENESS_BOUND_S} s to converge",
        o.minions,
        o.clients,
        clients.iter().filter(|c| c.2 > 0).count(),
        clients.iter().filter(|c| c.3.is_some()).count(),
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
    let deployment = Deployment {
        clients: ids.clone(),
        departed: clients
            .iter()
            .filter(|c| c.3.is_some())
            .map(|c| c.1.clone())
            .collect(),
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
    // Until when acknowledgements may name messages a lost disk took with it (an ack in flight
    // when the disk went arrives a little later).
    let mut disk_lost_until = 0;
    let mut checks_wall = std::time::Duration::ZERO;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        // A crash aimed at an fsync tripped in the last step: the process dies now (its disk
        // already did). Before the plan's events, so that a heal at this instant restarts it.
        for (name, d) in &disks {
            if d.power_lost() && !crashed.contains(name) {
                sim.crash(name.as_str());
                crashed.insert(name.clone());
            }
        }
        while next_event < events.len() && events[next_event].0 <= now {
            let (_, start, i) = events[next_event];
            next_event += 1;
            if start && matches!(plan[i].fault, Fault::DiskLoss { .. }) {
                disk_lost_until = now + 2_000;
            }
            apply(
                &mut sim,
                &plan[i].fault,
                start,
                &volume,
                (&disks, &clocks),
                &mut crashed,
            );
        }
        if !healed && now >= safety_ms {
            // The liveness phase: every fault is healed (the plan's windows end by here), and
            // neither the volume nor the local disks fail any more.
            for p in &plan {
                if p.until_ms > now {
                    apply(
                        &mut sim,
                        &p.fault,
                        false,
                        &volume,
                        (&disks, &clocks),
                        &mut crashed,
                    );
                }
            }
            volume.set_error_p(0.0);
            for d in disks.values() {
                d.set_error_p(0.0);
            }
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
            let world = check::World {
                volume: &volume,
                disks: &disks,
                disk_lost: now <= disk_lost_until,
            };
            let checks_start = std::time::Instant::now();
            samples.sample(now, &world, &deployment, &mut lock(&told), &mut violations);
            let converging = if healed && converged_ms == 0 && !finish.load(Ordering::Relaxed) {
                let t = lock(&told);
                Some(samples.converged(&volume, &disks, &deployment, &t, EPOCH_MS + now))
            } else {
                None
            };
            checks_wall += checks_start.elapsed();
            if let Some(converging) = converging {
                match converging {
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
                let t = lock(&told);
                progress(format!(
                    "{:.0} virtual s: {} hunts created, {} label changes, {} collections, {} volume ops ({} failed), {} process exits{}",
                    now as f64 / 1000.0,
                    t.hunts.len(),
                    t.labels.len(),
                    t.collections.len(),
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

    let ended_ms = sim.elapsed().as_millis() as u64;
    let told = std::mem::take(&mut *lock(&told));
    let files = volume.snapshot();
    let mut events = (0, 0);
    if converged_ms > 0 {
        match disks.get("master").map(MetaView::read).transpose() {
            Ok(view) => {
                events = check::final_state(
                    &files,
                    &view.unwrap_or_default(),
                    &deployment,
                    &told,
                    &mut violations,
                );
            }
            Err(e) => violations.push(e),
        }
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
    for hunt in &told.hunts {
        h.update(hunt.as_bytes());
    }
    for ((c, l), state) in &told.labels {
        h.update(format!("{c} {l} {state:?}").as_bytes());
    }
    for (c, f) in &told.collections {
        h.update(c.as_bytes());
        h.update(f.as_bytes());
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
        workload,
        plan,
        converged_ms,
        ended_ms,
        hunts: told.stats,
        labels: told.labels.len(),
        collections: told.collections.len(),
        event_batches_settled: told.events_settled.values().map(|s| s.len() as u64).sum(),
        events_stored: events,
        volume_ops: (volume.ops(), volume.errors()),
        exits,
        violations,
        checks_wall,
        trace_hash,
    })
}

/// How far a minion's replacement machine's clock is behind (`Fault::DiskLoss`).
const REPLACEMENT_CLOCK_BEHIND_MS: u64 = 3_600_000;

/// How far a running frontend's wall clock steps back (`Fault::ClockStep`).
const CLOCK_STEP_MS: u64 = 3_600_000;

/// Starts (`start`) or heals one fault.
fn apply(
    sim: &mut turmoil::Sim<'_>,
    fault: &Fault,
    start: bool,
    volume: &SimVolume,
    (disks, clocks): (
        &BTreeMap<String, SimLocalDisk>,
        &BTreeMap<String, Arc<AtomicU64>>,
    ),
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
        (Fault::DiskLoss { host }, true) => {
            let Some(d) = disks.get(host) else { return };
            if crashed.insert(host.clone()) {
                sim.crash(host.as_str());
            }
            d.wipe();
            // The replacement machine's clock is an hour slower: its new outbox epoch (wall-clock
            // ms) is older than the one the master last applied.
            if let Some(c) = clocks.get(host) {
                c.fetch_add(REPLACEMENT_CLOCK_BEHIND_MS, Ordering::Relaxed);
            }
        }
        (Fault::ClockStep { host }, true) => {
            if let Some(c) = clocks.get(host) {
                c.fetch_add(CLOCK_STEP_MS, Ordering::Relaxed);
            }
        }
        // A clock stepped back stays back: what waits on it must not wait for it to catch up.
        (Fault::ClockStep { .. }, false) => {}
        (Fault::DiskLoss { host }, false) => {
            let Some(d) = disks.get(host) else { return };
            if crashed.remove(host) {
                d.restore_power();
                sim.bounce(host.as_str());
            }
        }
    }
}
