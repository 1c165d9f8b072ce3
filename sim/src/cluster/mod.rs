//! A simulated deployment: the production master, minions and agents (`talon_io::server`,
//! `talon_io::agent`) on turmoil hosts, one shared [`SimVolume`] pair with the seed's 40–60 ms per
//! operation, a crashable local disk per node, and a driver that runs a hunt through the real API.
//! After the run, checkers read the simulated storage — not the nodes' claims — and compare.
//!
//! This first harness has no faults yet: it proves the same shell code runs in the simulated world
//! and that a run is a function of its seed (agents run artifacts inline, not on a blocking thread
//! whose progress real time would decide). Partitions, crashes and the liveness phase build on it.

use crate::disk::{DiskFaults, SimDisk};
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use crate::world::{SimClock, SimEntropy, SimLocalDisk, SimNet, SimVolume};
use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_io::api_client::Api;
use talon_io::config::{self, GenerateOptions};
use talon_io::env::Env;
use talon_io::net::Net;
use talon_io::storage::NodeStorage;
use talon_io::storage::volume::SharedVolume;
use talon_proto::api;
use talon_proto::comms::{self, flow_message};

/// Virtual Unix time at the start of every run.
pub const EPOCH_MS: u64 = 1_790_000_000_000;
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
    /// Rows each client returns (`Generic.Test.Rows count=`).
    pub rows: u64,
    /// Virtual-time bound on the whole run, seconds.
    pub duration_s: u64,
}

/// Parameters drawn from the seed (printed first, so a failure can be read against them).
#[derive(Clone, Debug)]
pub struct Drawn {
    /// Network latency bounds, ms.
    pub net_latency_ms: (u64, u64),
    /// Shared-volume latency bounds per operation, ms.
    pub volume_latency_ms: (u64, u64),
    /// A partition between the first minion and the master while the hunt runs: (starting this many
    /// ms after the hunt is created, lasting this many ms). `None` without minions or when not drawn.
    pub partition_ms: Option<(u64, u64)>,
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was drawn from the seed.
    pub drawn: Drawn,
    /// Virtual ms from start until every client was connected, and until the hunt completed.
    pub connected_ms: u64,
    /// Virtual ms at which the hunt was seen complete.
    pub completed_ms: u64,
    /// The hunt the driver created.
    pub hunt_id: String,
    /// The hunt's stats as the master reports them.
    pub stats: api::HuntStats,
    /// Operations the shared volumes served (metadata, filestore).
    pub volume_ops: (u64, u64),
    /// Broken invariants, each naming what was expected and found.
    pub violations: Vec<String>,
    /// SHA-256 over the final contents of both shared volumes (every record, row and timestamp the
    /// nodes wrote), the virtual times the driver observed and the volumes' operation counts.
    pub trace_hash: String,
}

#[derive(Default)]
struct Outcome {
    connected_ms: u64,
    completed_ms: u64,
    hunt_id: String,
    stats: api::HuntStats,
}

fn elapsed_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

fn env(seed: &SimRng, label: &str) -> Env {
    Env {
        clock: Arc::new(SimClock { epoch_ms: EPOCH_MS }),
        entropy: Arc::new(SimEntropy::new(seed.fork(label))),
        net: Arc::new(SimNet),
    }
}

fn disk(seed: &SimRng, label: &str) -> SimLocalDisk {
    let faults = DiskFaults {
        error_p: 0.0,
        torn_write_p: 0.5,
    };
    SimLocalDisk::new(SimDisk::new(64 << 30, faults, seed.fork(label)))
}

/// Runs one simulation; `progress` gets a line now and then.
pub fn run(o: &SimOptions, progress: &mut dyn FnMut(String)) -> Result<Report, String> {
    if o.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let root = SimRng::new(o.seed);
    let mut draw = root.fork("parameters");
    let lo = draw.range(1, 5);
    let hi = lo + draw.range(0, 20);
    let partition = draw.chance(0.5);
    let (p_at, p_len) = (draw.range(0, 300), draw.range(500, 5000));
    let drawn = Drawn {
        net_latency_ms: (lo, hi),
        volume_latency_ms: (40, 60),
        partition_ms: (o.minions > 0 && partition).then_some((p_at, p_len)),
    };
    progress(format!("drawn: {drawn:?}"));

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
    let minions: Vec<(String, u16)> = (1..=o.minions)
        .map(|i| (format!("minion{i}"), CLIENT_PORT))
        .collect();
    config::add_frontends(&mut cfg, &minions, &clock)?;
    let api_cfg = config::api_client(&cfg, "sim", &clock)?;
    let client_cfg = cfg.client_config();

    let model = LatencyModel::network_volume();
    let metadata = SimVolume::new(model.clone(), root.fork("volume-metadata"));
    let filestore = SimVolume::new(model, root.fork("volume-filestore"));

    let mut sim = turmoil::Builder::new()
        .rng_seed(o.seed)
        .simulation_duration(Duration::from_secs(o.duration_s))
        .min_message_latency(Duration::from_millis(drawn.net_latency_ms.0))
        .max_message_latency(Duration::from_millis(drawn.net_latency_ms.1))
        // Every client may connect at once: the listeners' backlog must hold them.
        .tcp_capacity(o.clients.max(64) * 4)
        .build();

    let storage = |local: &SimLocalDisk, name: &str| NodeStorage {
        local: Box::new(local.clone()),
        metadata: SharedVolume::new(metadata.clone()),
        filestore: SharedVolume::new(filestore.clone()),
        local_name: format!("{name}:/local"),
    };

    let master_disk = disk(&root, "disk-master");
    {
        let (cfg, root) = (cfg.clone(), root.clone());
        let st = storage(&master_disk, "master");
        let st = Arc::new(Mutex::new(Some(st)));
        sim.host("master", move || {
            let (cfg, root, st) = (cfg.clone(), root.clone(), st.clone());
            async move {
                let storage = st
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or("the master was started twice (restarts are not simulated yet)")?;
                talon_io::server::run_master(
                    env(&root, "env-master"),
                    cfg,
                    storage,
                    |_| {},
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }
    for (name, _) in &minions {
        let node = format!("{name}-{CLIENT_PORT}");
        let d = disk(&root, &format!("disk-{name}"));
        let st = Arc::new(Mutex::new(Some(storage(&d, name))));
        let (cfg, root, label) = (cfg.clone(), root.clone(), format!("env-{name}"));
        sim.host(name.as_str(), move || {
            let (cfg, root, st, node, label) = (
                cfg.clone(),
                root.clone(),
                st.clone(),
                node.clone(),
                label.clone(),
            );
            async move {
                let storage = st
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or("a minion was started twice (restarts are not simulated yet)")?;
                talon_io::server::run_minion(
                    env(&root, &label),
                    cfg,
                    node,
                    storage,
                    |_| {},
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }
    {
        let (root, client_cfg, n) = (root.clone(), client_cfg.clone(), o.clients);
        sim.host("clients", move || {
            let (root, client_cfg) = (root.clone(), client_cfg.clone());
            async move {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..n {
                    let mut key = [0u8; 32];
                    root.fork(&format!("client-key-{i}")).fill(&mut key);
                    let (identity, id) = talon_io::pki::endpoint_identity_from_seed(
                        key,
                        talon_core::Timestamp(EPOCH_MS),
                    )
                    .map_err(|e| e.to_string())?;
                    let agent = talon_io::agent::Agent {
                        config: client_cfg.clone(),
                        identity,
                        id,
                        clock: Arc::new(SimClock { epoch_ms: EPOCH_MS }),
                        entropy: Arc::new(SimEntropy::new(root.fork(&format!("client-{i}")))),
                        outbox: Default::default(),
                        hostname: Some(format!("sim-{i}")),
                        inline_artifacts: true,
                        net: Arc::new(SimNet),
                    };
                    set.spawn(agent.run());
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())??;
                }
                Ok(())
            }
        });
    }

    let outcome = Arc::new(Mutex::new(Outcome::default()));
    {
        let (outcome, n, rows, partition) =
            (outcome.clone(), o.clients, o.rows, drawn.partition_ms);
        sim.client("driver", async move {
            let net: Arc<dyn Net> = Arc::new(SimNet);
            let mut api = loop {
                match Api::connect_with(&api_cfg, &net).await {
                    Ok(a) => break a,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            loop {
                let connected = match api.search("all").await {
                    Ok(r) => r.clients.iter().filter(|c| c.connected).count(),
                    Err(_) => 0,
                };
                if connected >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let connected_ms = elapsed_ms();
            let req = api::CreateHuntRequest {
                artifact: "Generic.Test.Rows".into(),
                params: [("count".to_string(), rows.to_string())].into(),
                description: "simulation".into(),
                ..Default::default()
            };
            let hunt = api.create_hunt(req).await?;
            if let Some((at, len)) = partition {
                // The minion keeps serving its clients; its events wait in its outbox.
                tokio::time::sleep(Duration::from_millis(at)).await;
                turmoil::partition("minion1", "master");
                tokio::time::sleep(Duration::from_millis(len)).await;
                turmoil::repair("minion1", "master");
            }
            let stats = loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(h) = api.hunt(&hunt.hunt_id).await else {
                    continue;
                };
                let s = h.stats.unwrap_or_default();
                if s.completed + s.errors >= n as u64 {
                    break s;
                }
            };
            let mut out = outcome.lock().unwrap_or_else(|p| p.into_inner());
            *out = Outcome {
                connected_ms,
                completed_ms: elapsed_ms(),
                hunt_id: hunt.hunt_id,
                stats,
            };
            Ok(())
        });
    }

    progress(format!(
        "running: master, {} minions, {} clients, {} rows each, at most {} virtual s",
        o.minions, o.clients, o.rows, o.duration_s
    ));
    sim.run().map_err(|e| format!("simulation failed: {e}"))?;

    let out = std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()));
    let fs = filestore.snapshot();
    let md = metadata.snapshot();
    let violations = check(o, &out, &fs);
    if let Some(path) = std::env::var_os("TALON_SIM_DUMP") {
        // For chasing nondeterminism: every stored key and its contents, one per line.
        let mut text = String::new();
        for (k, v) in fs.iter().chain(md.iter()) {
            text.push_str(&format!(
                "{k} {}\n",
                String::from_utf8_lossy(v).escape_debug()
            ));
        }
        std::fs::write(&path, text).map_err(|e| format!("TALON_SIM_DUMP: {e}"))?;
    }
    let mut h = Sha256::new();
    for (k, v) in fs.iter().chain(md.iter()) {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    for n in [
        out.connected_ms,
        out.completed_ms,
        metadata.ops(),
        filestore.ops(),
    ] {
        h.update(n.to_le_bytes());
    }
    let trace_hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Report {
        drawn,
        connected_ms: out.connected_ms,
        completed_ms: out.completed_ms,
        hunt_id: out.hunt_id,
        stats: out.stats,
        volume_ops: (metadata.ops(), filestore.ops()),
        violations,
        trace_hash,
    })
}

/// The invariants, read from the simulated filestore: every client's flow holds exactly `rows` rows,
/// each stored message once under its sequence number, ending in a final status; the master's hunt
/// stats equal what storage holds.
fn check(o: &SimOptions, out: &Outcome, fs: &BTreeMap<String, Bytes>) -> Vec<String> {
    let mut v = Vec::new();
    let mut per_flow: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for (k, bytes) in fs {
        let Some((flow_dir, _seq)) = k.rsplit_once("/messages/") else {
            continue;
        };
        let msg = match comms::FlowMessage::decode(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                v.push(format!("{k}: stored message does not decode: {e}"));
                continue;
            }
        };
        let e = per_flow.entry(flow_dir.to_owned()).or_default();
        match msg.payload {
            Some(flow_message::Payload::Rows(r)) => e.0 += r.rows.len() as u64,
            Some(flow_message::Payload::Status(_)) => e.1 = true,
            _ => {}
        }
    }
    // The hunt is the run's only work: every stored flow is one of its clients'.
    let hunt_flows: Vec<_> = per_flow.iter().collect();
    if hunt_flows.len() != o.clients {
        v.push(format!(
            "storage holds {} flows, expected one per client ({})",
            hunt_flows.len(),
            o.clients
        ));
    }
    let mut stored_rows = 0;
    for (dir, (rows, done)) in &hunt_flows {
        stored_rows += rows;
        if *rows != o.rows {
            v.push(format!("{dir}: {rows} rows stored, expected {}", o.rows));
        }
        if !done {
            v.push(format!("{dir}: no final status stored"));
        }
    }
    let s = &out.stats;
    if (s.scheduled, s.completed, s.errors, s.rows)
        != (o.clients as u64, o.clients as u64, 0, stored_rows)
    {
        v.push(format!(
            "hunt stats scheduled {} completed {} errors {} rows {}; storage holds {} clients' flows with {stored_rows} rows",
            s.scheduled,
            s.completed,
            s.errors,
            s.rows,
            hunt_flows.len()
        ));
    }
    v
}
