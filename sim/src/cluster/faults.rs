//! What a run does to the deployment, drawn from its seed (swarm testing: each run enables a random
//! subset of fault kinds at random rates, so some runs hammer one kind and others mix them).

use crate::rng::SimRng;
use std::collections::BTreeMap;
use std::fmt;

/// One fault, applied at a virtual time and healed at a later one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No traffic between two hosts either way (turmoil `partition`; segments in flight are lost).
    Partition {
        /// One side.
        a: String,
        /// The other.
        b: String,
    },
    /// No traffic from `from` to `to`; the other direction still flows.
    OneWay {
        /// Sender whose traffic is lost.
        from: String,
        /// Its destination.
        to: String,
    },
    /// Traffic between two hosts is held (delayed, not lost) until the fault heals.
    Hold {
        /// One side.
        a: String,
        /// The other.
        b: String,
    },
    /// The host's process dies (every task dropped) and its local disk loses what was not synced,
    /// maybe tearing the last write; it restarts when the fault heals.
    Crash {
        /// The node.
        host: String,
        /// Aimed at a durability point: the crash happens in place of the node's next fsync (the
        /// moment a write is about to become durable), not at the fault's start.
        at_sync: bool,
    },
    /// The host cannot reach the shared volume: its operations stall, then fail after
    /// [`crate::world::VOLUME_CUT_TIMEOUT_MS`].
    VolumeCut {
        /// The node.
        host: String,
    },
    /// A minion's process dies and its local disk is lost with it (replaced by an empty one): its
    /// outbox and the write-behind buffer's unsettled messages are gone. It restarts when the fault
    /// heals, on a machine whose wall clock is an hour behind (so its new outbox's epoch is older
    /// than the one the master last applied from it). (The master's disk is not lost: its journal holds acknowledged metadata not yet on the
    /// volume, which only replication to another machine could save — docs/operations.md.)
    DiskLoss {
        /// The minion.
        host: String,
    },
    /// A running machine's wall clock steps back an hour (NTP, a VM restored from a snapshot) and
    /// stays back: deadlines run on the monotonic clock and must not wait for the wall clock to
    /// catch up; what is recorded with wall-clock times must still converge. A frontend's
    /// (`clock-step`) or a client group's machine (`client-clock-step`: every agent on it).
    ClockStep {
        /// The frontend or client host.
        host: String,
    },
}

impl Fault {
    /// The fault's kind, as printed and as the test's coverage check names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition { a, b } if is_frontend(a) && is_frontend(b) => {
                "partition-minion-master"
            }
            Fault::Partition { .. } => "partition-client-frontend",
            Fault::OneWay { .. } => "one-way-partition",
            Fault::Hold { .. } => "hold",
            Fault::Crash { host, .. } if host == "master" => "crash-master",
            Fault::Crash { .. } => "crash-minion",
            Fault::VolumeCut { .. } => "volume-partition",
            Fault::DiskLoss { .. } => "disk-loss",
            Fault::ClockStep { host } if is_frontend(host) => "clock-step",
            Fault::ClockStep { .. } => "client-clock-step",
        }
    }

    /// What the fault holds exclusively while active: no two active faults share a target.
    fn target(&self) -> String {
        let pair = |a: &str, b: &str| {
            if a < b {
                format!("{a}|{b}")
            } else {
                format!("{b}|{a}")
            }
        };
        match self {
            Fault::Partition { a, b } | Fault::Hold { a, b } => pair(a, b),
            Fault::OneWay { from, to } => pair(from, to),
            Fault::Crash { host, .. } | Fault::DiskLoss { host } => format!("process {host}"),
            Fault::VolumeCut { host } => format!("volume {host}"),
            Fault::ClockStep { host } => format!("clock {host}"),
        }
    }
}

fn is_frontend(h: &str) -> bool {
    h == "master" || h.starts_with("minion")
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Partition { a, b } => write!(f, "partition {a} <-> {b}"),
            Fault::OneWay { from, to } => write!(f, "one-way partition {from} -> {to}"),
            Fault::Hold { a, b } => write!(f, "hold {a} <-> {b}"),
            Fault::Crash {
                host,
                at_sync: false,
            } => write!(f, "crash {host}"),
            Fault::Crash {
                host,
                at_sync: true,
            } => write!(f, "crash {host} at its next fsync"),
            Fault::VolumeCut { host } => write!(f, "cut {host} off the shared volume"),
            Fault::DiskLoss { host } => write!(f, "crash {host} and lose its local disk"),
            Fault::ClockStep { host } => write!(f, "step {host}'s wall clock back an hour"),
        }
    }
}

/// A fault with its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Virtual ms at which it starts.
    pub at_ms: u64,
    /// Virtual ms at which it heals (at the latest, the end of the safety phase).
    pub until_ms: u64,
    /// The fault.
    pub fault: Fault,
}

/// A fault kind's rate: the mean gap between two of its faults and the bounds of their length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Mean gap between faults (each gap drawn from 0.5–1.5 of it), ms.
    pub mean_gap_ms: u64,
    /// Shortest fault, ms.
    pub min_len_ms: u64,
    /// Longest fault, ms.
    pub max_len_ms: u64,
}

/// Everything a run draws from its seed before it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Swarm {
    /// Network latency bounds, ms.
    pub net_latency_ms: (u64, u64),
    /// Shared-volume latency bounds per operation, ms.
    pub volume_latency_ms: (u64, u64),
    /// Probability that a shared-volume operation fails during the safety phase.
    pub volume_error_p: f64,
    /// Probability that a crash tears a local file's unsynced tail instead of dropping it.
    pub torn_write_p: f64,
    /// Probability that a local-disk operation fails during the safety phase (a failed append may
    /// leave a short write; a failed fsync saves nothing): the nodes must survive it or stop, and
    /// never acknowledge what a failed write covered.
    pub disk_error_p: f64,
    /// Fraction of the clients that join late, at a time drawn within the safety phase.
    pub late_clients: f64,
    /// Fraction of the clients that leave for good at a time drawn within the safety phase.
    pub leaving_clients: f64,
    /// Enabled fault kinds and their rates.
    pub rates: BTreeMap<&'static str, Rate>,
}

/// Every fault kind (what the swarm chooses from).
pub const KINDS: [&str; 10] = [
    "partition-minion-master",
    "partition-client-frontend",
    "one-way-partition",
    "hold",
    "crash-minion",
    "crash-master",
    "volume-partition",
    "disk-loss",
    "clock-step",
    "client-clock-step",
];

/// Kinds added after the seeds in the tests were chosen: each draws and plans from its own stream
/// (`SimRng::fork` by its name), so every seed keeps the faults it had before the kind existed.
const LATER_KINDS: [&str; 2] = ["clock-step", "client-clock-step"];

impl Swarm {
    /// Draws a run's parameters. `faults == false` gives a fault-free run (latencies still drawn).
    pub fn draw(rng: &mut SimRng, minions: usize, faults: bool) -> Swarm {
        let lo = rng.range(1, 5);
        let hi = lo + rng.range(0, 20);
        let mut rates = BTreeMap::new();
        let mut later: BTreeMap<&str, SimRng> =
            LATER_KINDS.iter().map(|k| (*k, rng.fork(k))).collect();
        for kind in KINDS {
            let rng = match later.get_mut(kind) {
                Some(own) => own,
                None => &mut *rng,
            };
            let on = rng.chance(0.5);
            let mean_gap_ms = rng.range(2_000, 30_000);
            let (min_len_ms, max_len_ms) = match kind {
                "hold" => (100, 3_000),
                "crash-minion" | "crash-master" | "disk-loss" => (200, 8_000),
                _ => (500, 8_000),
            };
            let needs_minion = matches!(
                kind,
                "partition-minion-master" | "crash-minion" | "disk-loss"
            );
            if faults && on && (minions > 0 || !needs_minion) {
                rates.insert(
                    kind,
                    Rate {
                        mean_gap_ms,
                        min_len_ms,
                        max_len_ms,
                    },
                );
            }
        }
        let errors = rng.chance(0.5);
        let volume_error_p = rng.range(1, 20) as f64 / 1000.0;
        let late = rng.chance(0.5);
        let late_clients = rng.range(10, 50) as f64 / 100.0;
        let disk_errors = rng.chance(0.5);
        let disk_error_p = rng.range(2, 30) as f64 / 10_000.0;
        let leaving = rng.chance(0.5);
        let leaving_clients = rng.range(5, 20) as f64 / 100.0;
        Swarm {
            net_latency_ms: (lo, hi),
            volume_latency_ms: (40, 60),
            volume_error_p: if faults && errors {
                volume_error_p
            } else {
                0.0
            },
            torn_write_p: rng.range(0, 100) as f64 / 100.0,
            disk_error_p: if faults && disk_errors {
                disk_error_p
            } else {
                0.0
            },
            late_clients: if faults && late { late_clients } else { 0.0 },
            leaving_clients: if faults && leaving {
                leaving_clients
            } else {
                0.0
            },
            rates,
        }
    }

    /// The enabled kinds, with volume errors and late clients counted as kinds too.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = self.rates.keys().copied().collect();
        if self.volume_error_p > 0.0 {
            k.push("volume-errors");
        }
        if self.late_clients > 0.0 {
            k.push("late-clients");
        }
        if self.disk_error_p > 0.0 {
            k.push("disk-errors");
        }
        if self.leaving_clients > 0.0 {
            k.push("leaving-clients");
        }
        k
    }

    /// The safety phase's faults over `hosts`, in start order.
    pub fn plan(
        &self,
        rng: &mut SimRng,
        safety_ms: u64,
        minions: &[String],
        client_hosts: &[String],
    ) -> Vec<Planned> {
        let master = "master".to_owned();
        let frontends: Vec<String> = std::iter::once(master.clone())
            .chain(minions.iter().cloned())
            .collect();
        let pick =
            |rng: &mut SimRng, v: &[String]| v[rng.range(0, v.len() as u64 - 1) as usize].clone();
        let mut out: Vec<Planned> = Vec::new();
        let mut busy: BTreeMap<String, u64> = BTreeMap::new();
        let mut later: BTreeMap<&str, SimRng> = LATER_KINDS
            .iter()
            .map(|k| (*k, rng.fork(&format!("{k} plan"))))
            .collect();
        for (kind, rate) in &self.rates {
            // (As in `draw`: a kind added later plans from its own stream.)
            let rng = match later.get_mut(kind) {
                Some(own) => own,
                None => &mut *rng,
            };
            let mut t = 1_000;
            loop {
                let gap = rate.mean_gap_ms / 2 + rng.range(0, rate.mean_gap_ms);
                t += gap;
                if t >= safety_ms {
                    break;
                }
                let len = rng.range(rate.min_len_ms, rate.max_len_ms);
                // A link between a client group and a frontend, or a minion and the master.
                let link = |rng: &mut SimRng| -> (String, String) {
                    if !minions.is_empty() && rng.chance(0.5) {
                        (pick(rng, minions), master.clone())
                    } else {
                        (pick(rng, client_hosts), pick(rng, &frontends))
                    }
                };
                let fault = match *kind {
                    "partition-minion-master" => Fault::Partition {
                        a: pick(rng, minions),
                        b: master.clone(),
                    },
                    "partition-client-frontend" => Fault::Partition {
                        a: pick(rng, client_hosts),
                        b: pick(rng, &frontends),
                    },
                    "one-way-partition" => {
                        let (a, b) = link(rng);
                        if rng.chance(0.5) {
                            Fault::OneWay { from: a, to: b }
                        } else {
                            Fault::OneWay { from: b, to: a }
                        }
                    }
                    "hold" => {
                        let (a, b) = link(rng);
                        Fault::Hold { a, b }
                    }
                    "crash-minion" => Fault::Crash {
                        host: pick(rng, minions),
                        at_sync: rng.chance(0.5),
                    },
                    "crash-master" => Fault::Crash {
                        host: master.clone(),
                        at_sync: rng.chance(0.5),
                    },
                    "volume-partition" => Fault::VolumeCut {
                        host: pick(rng, &frontends),
                    },
                    "disk-loss" => Fault::DiskLoss {
                        host: pick(rng, minions),
                    },
                    "clock-step" => Fault::ClockStep {
                        host: pick(rng, &frontends),
                    },
                    "client-clock-step" => Fault::ClockStep {
                        host: pick(rng, client_hosts),
                    },
                    other => unreachable!("unknown fault kind {other}"),
                };
                let target = fault.target();
                if busy.get(&target).is_some_and(|&until| until + 100 > t) {
                    continue;
                }
                let until_ms = (t + len).min(safety_ms);
                busy.insert(target, until_ms);
                out.push(Planned {
                    at_ms: t,
                    until_ms,
                    fault,
                });
            }
        }
        out.sort_by_key(|p| p.at_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_a_function_of_the_seed_and_never_overlap_on_a_target() {
        let minions = vec!["minion1".to_owned(), "minion2".to_owned()];
        let clients = vec!["clients0".to_owned(), "clients1".to_owned()];
        for seed in 0..50 {
            let draw = |seed| {
                let mut rng = SimRng::new(seed);
                let s = Swarm::draw(&mut rng, 2, true);
                let p = s.plan(&mut rng, 120_000, &minions, &clients);
                (s, p)
            };
            let (s, plan) = draw(seed);
            assert_eq!((s.clone(), plan.clone()), draw(seed));
            for (i, a) in plan.iter().enumerate() {
                assert!(a.at_ms < a.until_ms && a.until_ms <= 120_000, "{a:?}");
                assert!(s.rates.contains_key(a.fault.kind()), "{a:?} not enabled");
                for b in &plan[i + 1..] {
                    let overlap = a.at_ms < b.until_ms && b.at_ms < a.until_ms;
                    assert!(
                        !(overlap && a.fault.target() == b.fault.target()),
                        "{a:?} {b:?}"
                    );
                }
            }
        }
        // Without faults, nothing is planned.
        let mut rng = SimRng::new(1);
        let s = Swarm::draw(&mut rng, 2, false);
        assert!(s.plan(&mut rng, 120_000, &minions, &clients).is_empty());
        assert!(s.kinds().is_empty());
    }
}
