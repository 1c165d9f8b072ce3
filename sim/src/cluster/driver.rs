//! The analyst: a workload drawn from the seed, run through the master's real gRPC API, recording
//! what the API acknowledged and reported ([`Told`]) for the checkers to compare with storage.
//!
//! Each seed draws its mix ([`Workload`]): hunts of `Generic.Test.Rows` whose flows are one row, a
//! few, or several agent batches, with synthetic uploads (one chunk or several) or none; hunts
//! filtered by labels the driver added; hunts stopped or expiring while they run; labels added and
//! removed during hunts; single-client collections; every client streaming `Generic.Events.Test`
//! events through the client event table; and, every virtual second, the hunts' stats as the API
//! reports them while they move.

use crate::rng::SimRng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_core::ClientId;
use talon_io::cli::api_client::Api;
use talon_io::deploy::config::ApiClientConfig;
use talon_io::net::Net;
use talon_proto::api;

use super::{elapsed_ms, lock};
use crate::world::SimNet;

/// Hunts the driver creates at most (each schedules every matching client).
pub const HUNTS_MAX: usize = 12;
/// Every API call of the driver gives up after this long (the master may be down).
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the driver reads every hunt's stats through the API.
const STATS_EVERY_MS: u64 = 1_000;
/// The event artifact every client streams when the workload has event streams.
pub const EVENT_ARTIFACT: &str = "Generic.Events.Test";
/// Rows past one agent batch (`talon_io::agent::BATCH_ROWS_MAX`): a multi-message flow.
const BATCH_ROWS: u64 = talon_io::agent::BATCH_ROWS_MAX as u64;

/// The workload one seed draws.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// A hunt is created every this many ms of the safety phase.
    pub hunt_every_ms: u64,
    /// A label is added (or removed) every this many ms.
    pub label_every_ms: u64,
    /// The typical rows per flow (`--rows`); hunts also draw 1, a few, or (with `multi_batch`)
    /// more than one agent batch.
    pub rows: u64,
    /// Hunts may return more rows than one agent batch holds (several messages per flow).
    pub multi_batch: bool,
    /// Hunts may upload synthetic files (one chunk or several per file).
    pub uploads: bool,
    /// Probability that a hunt is limited to, or excludes, a label.
    pub label_hunt_p: f64,
    /// Probability that a hunt is stopped while it runs.
    pub stop_p: f64,
    /// Probability that a hunt expires while it runs.
    pub expire_p: f64,
    /// Probability that a label operation removes a label rather than adding one.
    pub remove_label_p: f64,
    /// A single-client collection every this many ms (`None`: no collections).
    pub collect_every_ms: Option<u64>,
    /// Uploads may span several chunks (off in runs with many clients: the simulated volume holds
    /// everything in memory).
    pub large_uploads: bool,
    /// Every client streams `Generic.Events.Test` at this many events per second, set in the
    /// client event table at the start (0: no event streams).
    pub event_rate: u64,
}

/// Above this many clients, flows stay within one batch and uploads within one small chunk: a
/// 10,000-client run would otherwise hold tens of GB in the in-memory volume.
pub const HEAVY_FLOWS_CLIENTS_MAX: usize = 200;

impl Workload {
    /// Draws a workload; `rows` is `--rows`.
    pub fn draw(rng: &mut SimRng, rows: u64, clients: usize) -> Workload {
        let heavy = clients <= HEAVY_FLOWS_CLIENTS_MAX;
        let p = |rng: &mut SimRng, on: f64, lo: u64, hi: u64| {
            if rng.chance(on) {
                rng.range(lo, hi) as f64 / 100.0
            } else {
                0.0
            }
        };
        Workload {
            hunt_every_ms: rng.range(3_000, 40_000),
            label_every_ms: rng.range(500, 5_000),
            rows: rows.max(1),
            multi_batch: rng.chance(0.5) && heavy,
            uploads: rng.chance(0.5),
            label_hunt_p: p(rng, 0.5, 10, 50),
            stop_p: p(rng, 0.5, 10, 40),
            expire_p: p(rng, 0.5, 10, 30),
            remove_label_p: p(rng, 0.5, 10, 40),
            collect_every_ms: rng.chance(0.5).then(|| rng.range(2_000, 20_000)),
            large_uploads: heavy,
            // Drawn last: the draws before it are what they were before event streams existed.
            event_rate: if rng.chance(0.6) { rng.range(1, 20) } else { 0 },
        }
    }

    /// The parameters of one `Generic.Test.Rows` hunt or collection.
    fn params(&self, rng: &mut SimRng) -> BTreeMap<String, String> {
        let count = match rng.range(0, 9) {
            0 | 1 => 1,
            2 | 3 => rng.range(1, self.rows),
            4 | 5 if self.multi_batch => rng.range(BATCH_ROWS, 2 * BATCH_ROWS + 200),
            _ => self.rows,
        };
        let mut p = BTreeMap::from([
            ("count".to_string(), count.to_string()),
            ("size".to_string(), rng.range(0, 64).to_string()),
        ]);
        if self.uploads && rng.chance(0.5) {
            // Mostly one small chunk; now and then a file of two chunks (512 KiB each).
            let size = match rng.range(0, 9) {
                0 => 0,
                1 if self.large_uploads => 700 << 10,
                _ if self.large_uploads => rng.range(1, 64 << 10),
                _ => rng.range(1, 4 << 10),
            };
            p.insert("uploads".into(), rng.range(1, 2).to_string());
            p.insert("upload_size".into(), size.to_string());
        }
        p
    }
}

/// A label's state as the driver's acknowledged operations left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelState {
    /// The last operation, acknowledged, added it.
    Present,
    /// The last operation, acknowledged, removed it.
    Absent,
    /// The last operation's outcome is unknown (an error or a timeout).
    Unknown,
}

/// What the API acknowledged and reported, as the driver saw it. The harness drains the `seen_*`
/// and `acks` lists at every sample.
#[derive(Default)]
pub struct Told {
    /// Hunts created, acknowledged by the master.
    pub hunts: Vec<String>,
    /// Hunt creations whose outcome is unknown (an error or a timeout: the master may have made it).
    pub hunts_unknown: usize,
    /// Hunts the master acknowledged stopping.
    pub stopped: BTreeSet<String>,
    /// (client, label) and what the driver's operations left of it.
    pub labels: BTreeMap<(String, String), LabelState>,
    /// Collections acknowledged: (client, flow).
    pub collections: Vec<(String, String)>,
    /// Hunt stats reported while the run goes on: (virtual ms, hunt, stats).
    pub seen_stats: Vec<(u64, String, api::HuntStats)>,
    /// Flows the API reported finished: (client, flow, rows, uploaded bytes).
    pub seen_done: Vec<(String, String, u64, u64)>,
    /// Acknowledgements the agents received: (client, flow, seq, settled).
    pub acks: Vec<(String, String, u64, bool)>,
    /// Event batches the agents were told are settled: (client, `<artifact>/<stream>`) → seqs.
    /// Kept whole for the final check.
    pub events_settled: BTreeMap<(String, String), BTreeSet<u64>>,
    /// The master acknowledged setting the event stream in the client event table.
    pub events_set: bool,
    /// After convergence: every acknowledged hunt's final stats as the master reports them.
    pub stats: BTreeMap<String, api::HuntStats>,
    /// After convergence: every acknowledged collection as the master reports it.
    pub flows: BTreeMap<(String, String), api::FlowSummary>,
    /// The safety phase is over and no call that changes anything is in flight any more (one made
    /// just before healing may create work after it).
    pub quiet: bool,
}

impl Told {
    /// Labels the driver believes present (acknowledged, not removed since).
    fn present(&self) -> Vec<&(String, String)> {
        self.labels
            .iter()
            .filter(|(_, s)| **s == LabelState::Present)
            .map(|(k, _)| k)
            .collect()
    }
}

/// What the driver needs.
pub struct Driver {
    /// The API client config (`talon config api-client`).
    pub api: ApiClientConfig,
    /// Every client, in index order.
    pub ids: Vec<ClientId>,
    /// The drawn workload.
    pub workload: Workload,
    /// Its own random stream.
    pub rng: SimRng,
    /// Where it records what it was told.
    pub told: Arc<Mutex<Told>>,
    /// Set by the harness once the deployment converged: read the final stats and stop.
    pub finish: Arc<AtomicBool>,
    /// Virtual ms of the safety phase (no new work after it).
    pub safety_ms: u64,
}

struct Plan {
    next_hunt: u64,
    next_label: u64,
    next_collect: u64,
    next_stats: u64,
    label_n: u64,
    /// Hunts to stop, with when.
    stops: Vec<(u64, String)>,
}

impl Driver {
    /// Runs until the harness says the deployment converged and the final reads succeeded.
    pub async fn run(mut self) -> Result<(), Box<dyn std::error::Error>> {
        let net: Arc<dyn Net> = Arc::new(SimNet);
        let mut api: Option<Api> = None;
        let mut plan = Plan {
            next_hunt: 2_000,
            next_label: 1_000,
            next_collect: 3_000,
            next_stats: 1_000,
            label_n: 0,
            stops: Vec::new(),
        };
        loop {
            if api.is_none() {
                match tokio::time::timeout(API_TIMEOUT, Api::connect_with(&self.api, &net)).await {
                    Ok(Ok(a)) => api = Some(a),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let Some(a) = api.as_mut() else { continue };
            let failed = if self.finish.load(Ordering::Relaxed) {
                match self.final_reads(a).await {
                    Ok(()) => return Ok(()),
                    Err(()) => true,
                }
            } else {
                self.step(a, &mut plan).await.is_err()
            };
            if failed {
                api = None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One round of the safety phase's work that is due; `Err` if a call failed (reconnect).
    async fn step(&mut self, a: &mut Api, plan: &mut Plan) -> Result<(), ()> {
        let now = elapsed_ms();
        let mut ok = true;
        if now >= plan.next_stats {
            plan.next_stats = now + STATS_EVERY_MS;
            ok &= self.read_stats(a, now).await;
        }
        if now >= self.safety_ms {
            // Calls are made one at a time: every one that could change something has returned.
            lock(&self.told).quiet = true;
            return if ok { Ok(()) } else { Err(()) };
        }
        if self.workload.event_rate > 0 && !lock(&self.told).events_set {
            ok &= self.set_events(a).await;
        }
        if now >= plan.next_hunt && lock(&self.told).hunts.len() < HUNTS_MAX {
            plan.next_hunt = now + self.workload.hunt_every_ms;
            ok &= self.create_hunt(a, now, plan).await;
        }
        while let Some(i) = plan.stops.iter().position(|(at, _)| *at <= now) {
            let (_, h) = plan.stops.remove(i);
            match tokio::time::timeout(API_TIMEOUT, a.stop_hunt(&h)).await {
                Ok(Ok(_)) => {
                    lock(&self.told).stopped.insert(h);
                }
                // Already expired, or the master unreachable: not retried.
                _ => ok = false,
            }
        }
        if now >= plan.next_label {
            plan.next_label = now + self.workload.label_every_ms;
            ok &= self.change_label(a, plan).await;
        }
        if let Some(every) = self.workload.collect_every_ms
            && now >= plan.next_collect
        {
            plan.next_collect = now + every;
            ok &= self.collect(a).await;
        }
        if ok { Ok(()) } else { Err(()) }
    }

    /// Every client streams test events (set once; tried again until the master says so).
    async fn set_events(&mut self, a: &mut Api) -> bool {
        let req = api::SetClientEventRequest {
            artifact: EVENT_ARTIFACT.into(),
            label: String::new(),
            params: [("rate".to_owned(), self.workload.event_rate.to_string())].into(),
            remove: false,
        };
        match tokio::time::timeout(API_TIMEOUT, a.set_client_event(req)).await {
            Ok(Ok(_)) => {
                lock(&self.told).events_set = true;
                true
            }
            _ => false,
        }
    }

    async fn read_stats(&mut self, a: &mut Api, now: u64) -> bool {
        match tokio::time::timeout(API_TIMEOUT, a.list_hunts()).await {
            Ok(Ok(hunts)) => {
                let mut t = lock(&self.told);
                for h in hunts {
                    if let Some(s) = h.stats {
                        t.seen_stats.push((now, h.hunt_id, s));
                    }
                }
            }
            _ => return false,
        }
        // One collection not yet seen finished: what the API says of it.
        let pending: Vec<(String, String)> = {
            let t = lock(&self.told);
            let done: BTreeSet<(&String, &String)> =
                t.seen_done.iter().map(|d| (&d.0, &d.1)).collect();
            t.collections
                .iter()
                .filter(|c| !done.contains(&(&c.0, &c.1)))
                .take(1)
                .cloned()
                .collect()
        };
        for (c, f) in pending {
            match tokio::time::timeout(API_TIMEOUT, a.flow(&c, &f)).await {
                Ok(Ok(s)) => {
                    let finished = s.state == talon_proto::comms::FlowState::Completed as i32
                        || s.state == talon_proto::comms::FlowState::Error as i32;
                    if finished {
                        lock(&self.told)
                            .seen_done
                            .push((c, f, s.rows, s.uploaded_bytes));
                    }
                }
                _ => return false,
            }
        }
        true
    }

    async fn create_hunt(&mut self, a: &mut Api, now: u64, plan: &mut Plan) -> bool {
        let w = &self.workload;
        let mut req = api::CreateHuntRequest {
            artifact: "Generic.Test.Rows".into(),
            params: w.params(&mut self.rng).into_iter().collect(),
            description: "simulation".into(),
            ..Default::default()
        };
        if self.rng.chance(w.label_hunt_p) {
            let labels: Vec<String> = lock(&self.told)
                .present()
                .into_iter()
                .map(|(_, l)| l.clone())
                .collect();
            if !labels.is_empty() {
                let l = labels[self.rng.range(0, labels.len() as u64 - 1) as usize].clone();
                if self.rng.chance(0.7) {
                    req.include_labels.push(l);
                } else {
                    req.exclude_labels.push(l);
                }
            }
        }
        if self.rng.chance(w.expire_p) {
            req.expires_in_s = self.rng.range(3, 30);
        }
        let stop_after = self
            .rng
            .chance(w.stop_p)
            .then(|| self.rng.range(1_000, 20_000));
        match tokio::time::timeout(API_TIMEOUT, a.create_hunt(req)).await {
            Ok(Ok(h)) => {
                if let Some(after) = stop_after {
                    plan.stops.push((now + after, h.hunt_id.clone()));
                }
                lock(&self.told).hunts.push(h.hunt_id);
                true
            }
            _ => {
                lock(&self.told).hunts_unknown += 1;
                false
            }
        }
    }

    async fn change_label(&mut self, a: &mut Api, plan: &mut Plan) -> bool {
        let present: Vec<(String, String)> =
            lock(&self.told).present().into_iter().cloned().collect();
        let (client, label, remove) =
            if !present.is_empty() && self.rng.chance(self.workload.remove_label_p) {
                let (c, l) = present[self.rng.range(0, present.len() as u64 - 1) as usize].clone();
                (c, l, true)
            } else {
                let c = self.ids[self.rng.range(0, self.ids.len() as u64 - 1) as usize].to_string();
                plan.label_n += 1;
                // A few labels shared by several clients, so label hunts match groups.
                (c, format!("sim-l{}", plan.label_n % 6), false)
            };
        let r = tokio::time::timeout(API_TIMEOUT, a.label(&client, &label, remove)).await;
        let mut t = lock(&self.told);
        match r {
            Ok(Ok(_)) => {
                let s = if remove {
                    LabelState::Absent
                } else {
                    LabelState::Present
                };
                t.labels.insert((client, label), s);
                true
            }
            // Unknown client (not enrolled yet), or the master unreachable.
            Ok(Err(e)) if e.contains("no client") || e.contains("not found") => true,
            _ => {
                t.labels.insert((client, label), LabelState::Unknown);
                false
            }
        }
    }

    async fn collect(&mut self, a: &mut Api) -> bool {
        let client = self.ids[self.rng.range(0, self.ids.len() as u64 - 1) as usize].to_string();
        let params = self.workload.params(&mut self.rng);
        match tokio::time::timeout(API_TIMEOUT, a.collect(&client, "Generic.Test.Rows", params))
            .await
        {
            Ok(Ok(f)) => {
                lock(&self.told).collections.push((client, f.flow_id));
                true
            }
            // Not enrolled yet: nothing was scheduled.
            Ok(Err(e)) if e.contains("no client") => true,
            _ => false,
        }
    }

    /// After convergence: every acknowledged hunt's and collection's figures as the API reports
    /// them.
    async fn final_reads(&mut self, a: &mut Api) -> Result<(), ()> {
        let (hunts, collections) = {
            let t = lock(&self.told);
            (t.hunts.clone(), t.collections.clone())
        };
        let mut stats = BTreeMap::new();
        for h in hunts {
            match tokio::time::timeout(API_TIMEOUT, a.hunt(&h)).await {
                Ok(Ok(s)) => {
                    stats.insert(h, s.stats.unwrap_or_default());
                }
                _ => return Err(()),
            }
        }
        let mut flows = BTreeMap::new();
        for (c, f) in collections {
            match tokio::time::timeout(API_TIMEOUT, a.flow(&c, &f)).await {
                Ok(Ok(s)) => {
                    flows.insert((c, f), s);
                }
                _ => return Err(()),
            }
        }
        let mut t = lock(&self.told);
        t.stats = stats;
        t.flows = flows;
        Ok(())
    }
}
