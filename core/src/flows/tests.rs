//! Flow tracker tests: unit cases, and the property for invariant 1 (docs/architecture.md) across failovers and crashes.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn key() -> FlowKey {
    FlowKey {
        client: ClientId::from_public_key(b"c"),
        flow: FlowId::from_u64(1),
    }
}

fn data(rows: u64) -> Payload {
    Payload::Data(Weight {
        rows,
        ..Weight::default()
    })
}

fn done() -> Payload {
    Payload::Final {
        state: FinalState::Completed,
        error: String::new(),
    }
}

fn drain(t: &mut FlowTracker) -> Vec<FlowAction> {
    std::iter::from_fn(|| t.poll_action()).collect()
}

fn limits() -> FlowLimits {
    FlowLimits {
        flows_max: 4,
        stores_in_flight_max: 4,
        seq_window: 8,
        completed_remembered_max: 4,
        idle_timeout_ms: 1000,
        flow_bytes_max: 100,
        uploads_per_flow_max: 2,
    }
}

fn bytes(n: u64) -> Payload {
    Payload::Data(Weight {
        data_bytes: n,
        ..Weight::default()
    })
}

fn upload(n: u64) -> Payload {
    Payload::Data(Weight {
        bytes: n,
        data_bytes: n,
        uploads: 1,
        ..Weight::default()
    })
}

/// Sends and stores `payloads` from seq 0 on; returns the errors and the actions.
fn run(t: &mut FlowTracker, payloads: Vec<Payload>) -> (Vec<FlowError>, Vec<FlowAction>) {
    let now = Monotonic(0);
    let (mut errors, mut actions) = (vec![], vec![]);
    for (seq, p) in payloads.into_iter().enumerate() {
        if let Err(e) = t.handle_message(now, key(), seq as u64, p) {
            errors.push(e);
        }
        for a in drain(t) {
            if let FlowAction::Store { seq, .. } | FlowAction::StoreRefusal { seq, .. } = &a {
                t.handle_stored(now, &key(), *seq, true);
            }
            actions.push(a);
            actions.extend(drain(t));
        }
    }
    (errors, actions)
}

#[test]
fn a_flow_over_its_byte_budget_fails_and_stores_refusals_in_place() {
    let mut t = FlowTracker::new(limits());
    let (errors, actions) = run(&mut t, vec![bytes(60), bytes(50), bytes(1), done()]);
    // Message 1 would bring the flow to 110 bytes: refused, and so is everything after it.
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].to_string().contains("max_flow_bytes (100)"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].to_string().contains("already failed"),
        "{}",
        errors[1]
    );
    let refusals: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            FlowAction::StoreRefusal { seq, reason, .. } => {
                assert!(reason.contains("max_flow_bytes"), "{reason}");
                Some(*seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(refusals, vec![1, 2]);
    // Every number is acknowledged (the client moves on), the flow completes, in error.
    let acks: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            FlowAction::Ack { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![0, 1, 2]);
    let Some(FlowAction::Completed(o)) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!(o.state, FinalState::Error);
    assert!(
        o.error.contains("refused by the server") && o.error.contains("max_flow_bytes"),
        "{}",
        o.error
    );
    assert_eq!(o.messages, 4);
}

#[test]
fn a_flow_past_its_upload_count_fails() {
    let mut t = FlowTracker::new(limits());
    let (errors, actions) = run(&mut t, vec![upload(1), upload(1), upload(1), done()]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].to_string().contains("max_uploads_per_flow (2)"),
        "{}",
        errors[0]
    );
    let Some(FlowAction::Completed(o)) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!(
        (o.state, o.uploads, o.uploaded_bytes),
        (FinalState::Error, 2, 2)
    );
}

#[test]
fn within_budget_a_flow_is_untouched() {
    let mut t = FlowTracker::new(limits());
    let (errors, actions) = run(&mut t, vec![bytes(50), upload(50), done()]);
    assert_eq!(errors, vec![]);
    let Some(FlowAction::Completed(o)) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!((o.state, o.error.as_str()), (FinalState::Completed, ""));
}

#[test]
fn acks_only_after_store_and_dedupes_resends() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    t.handle_message(now, key(), 0, data(3)).unwrap();
    assert_eq!(
        drain(&mut t),
        vec![FlowAction::Store { key: key(), seq: 0 }]
    );
    // Resend while the store is in flight: nothing new.
    t.handle_message(now, key(), 0, data(3)).unwrap();
    assert_eq!(drain(&mut t), vec![]);
    t.handle_stored(now, &key(), 0, true);
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 0 }]);
    // Resend after the ack was lost: ack again, do not store again.
    t.handle_message(now, key(), 0, data(3)).unwrap();
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 0 }]);
}

#[test]
fn failed_store_is_not_acked_and_can_be_resent() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    t.handle_message(now, key(), 0, data(1)).unwrap();
    drain(&mut t);
    t.handle_stored(now, &key(), 0, false);
    assert_eq!(drain(&mut t), vec![]);
    t.handle_message(now, key(), 0, data(1)).unwrap();
    assert_eq!(
        drain(&mut t),
        vec![FlowAction::Store { key: key(), seq: 0 }]
    );
}

#[test]
fn completes_with_exact_totals_and_acks_final_last() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    for (seq, p) in [(0, data(2)), (1, data(5)), (2, done())] {
        t.handle_message(now, key(), seq, p).unwrap();
        drain(&mut t);
    }
    t.handle_stored(now, &key(), 2, true);
    t.handle_stored(now, &key(), 0, true);
    t.handle_stored(now, &key(), 1, true);
    let acts = drain(&mut t);
    assert_eq!(
        acts,
        vec![
            FlowAction::Ack { key: key(), seq: 0 },
            FlowAction::Ack { key: key(), seq: 1 },
            FlowAction::Completed(FlowOutcome {
                key: key(),
                state: FinalState::Completed,
                error: String::new(),
                rows: 7,
                uploaded_bytes: 0,
                uploads: 0,
                messages: 3,
            }),
        ]
    );
    assert!(t.is_empty());
    // The final status is acknowledged only once the shell recorded the completion; a resend of
    // it meanwhile waits too.
    t.handle_message(now, key(), 2, done()).unwrap();
    assert_eq!(drain(&mut t), vec![]);
    t.handle_recorded(&key(), true);
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 2 }]);
    t.handle_message(now, key(), 2, done()).unwrap();
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 2 }]);
    // A late resend of a completed flow is acknowledged, not stored.
    t.handle_message(now, key(), 1, data(5)).unwrap();
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 1 }]);
    assert!(matches!(
        t.handle_message(now, key(), 3, data(1)),
        Err(FlowError::AfterFinal {
            seq: 3,
            final_seq: 2
        })
    ));
}

#[test]
fn a_completion_that_could_not_be_recorded_completes_again_on_resend() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    for (seq, p) in [(0, data(3)), (1, done())] {
        t.handle_message(now, key(), seq, p).unwrap();
        drain(&mut t);
        t.handle_stored(now, &key(), seq, true);
    }
    let acts = drain(&mut t);
    assert!(
        matches!(acts.last(), Some(FlowAction::Completed(o)) if o.rows == 3),
        "{acts:?}"
    );
    // The node could not record it (its datastore failed, or the master never applied it): no
    // final ack, and the completion is forgotten.
    t.handle_recorded(&key(), false);
    assert_eq!(drain(&mut t), vec![]);
    // The client resends the unacknowledged final: stored again (idempotent), the rows found by
    // audit, completed again with the same totals.
    t.handle_message(now, key(), 1, done()).unwrap();
    assert_eq!(
        drain(&mut t),
        vec![FlowAction::Store { key: key(), seq: 1 }]
    );
    t.handle_stored(now, &key(), 1, true);
    assert_eq!(drain(&mut t), vec![FlowAction::Audit { key: key() }]);
    let found = vec![
        StoredMessage {
            seq: 0,
            payload: data(3),
        },
        StoredMessage {
            seq: 1,
            payload: done(),
        },
    ];
    t.handle_audit(now, &key(), Some(found));
    let acts = drain(&mut t);
    assert!(
        matches!(acts.last(), Some(FlowAction::Completed(o)) if o.rows == 3),
        "{acts:?}"
    );
    t.handle_recorded(&key(), true);
    assert_eq!(drain(&mut t), vec![FlowAction::Ack { key: key(), seq: 1 }]);
}

#[test]
fn final_with_gaps_audits_storage() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    t.handle_message(now, key(), 2, done()).unwrap();
    drain(&mut t);
    t.handle_stored(now, &key(), 2, true);
    assert_eq!(drain(&mut t), vec![FlowAction::Audit { key: key() }]);
    let found = vec![
        StoredMessage {
            seq: 0,
            payload: data(4),
        },
        StoredMessage {
            seq: 1,
            payload: data(6),
        },
        StoredMessage {
            seq: 2,
            payload: done(),
        },
    ];
    t.handle_audit(now, &key(), Some(found));
    let acts = drain(&mut t);
    assert!(matches!(&acts[0], FlowAction::Completed(o) if o.rows == 10));
}

#[test]
fn bounds_are_enforced_with_errors() {
    let mut t = FlowTracker::new(limits());
    let now = Monotonic(0);
    for seq in 0..4 {
        t.handle_message(now, key(), seq, data(1)).unwrap();
    }
    assert_eq!(
        t.handle_message(now, key(), 4, data(1)),
        Err(FlowError::Busy { max: 4 })
    );
    assert!(matches!(
        t.handle_message(now, key(), 100, data(1)),
        Err(FlowError::OutOfWindow(_))
    ));
    for n in 2..=4 {
        let k = FlowKey {
            client: key().client,
            flow: FlowId::from_u64(n),
        };
        t.handle_message(now, k, 0, data(1)).unwrap();
    }
    let k = FlowKey {
        client: key().client,
        flow: FlowId::from_u64(9),
    };
    assert_eq!(
        t.handle_message(now, k, 0, data(1)),
        Err(FlowError::TooManyFlows { max: 4 })
    );
    assert_eq!(t.len(), 4);
}

#[test]
fn idle_flows_are_forgotten_but_busy_ones_kept() {
    let mut t = FlowTracker::new(limits());
    t.handle_message(Monotonic(0), key(), 0, data(1)).unwrap();
    drain(&mut t);
    t.handle_timeout(Monotonic(5000));
    assert_eq!(t.len(), 1, "a flow with a store in flight is kept");
    t.handle_stored(Monotonic(5000), &key(), 0, true);
    let deadline = t.poll_timeout().unwrap();
    t.handle_timeout(deadline.plus_ms(2000));
    assert!(t.is_empty());
}

// ---- Property: invariant 1 across two nodes, failovers, lost acks and node crashes. ----
//
// The client is the agent's own outbox (`crate::agent::FlowOutbox`): what it numbers, keeps, resends
// and fails over is the real agent's logic, checked here against the real tracker.

use crate::agent::{FlowOutbox, OutboxAction, OutboxLimits};

#[derive(Clone, Debug)]
enum Step {
    /// The agent produces its next message (refused while `max_in_flight` are kept).
    Produce,
    /// The n-th message on the wire reaches the current node (it may stay there too: duplication).
    Deliver(usize, bool),
    /// The current node completes its n-th pending store, succeeding or failing.
    Store(usize, bool),
    /// The node's outgoing acks reach the agent (as settled or not) or are lost.
    Acks(bool, bool),
    /// The agent fails over to the other node (the stream and what was on it are gone).
    Failover,
    /// Node n crashes: its tracker is lost; its pending stores may or may not have hit storage.
    Crash(usize, bool),
    /// Answer an audit.
    Audit,
    /// Time passes: the agent resends what has had no acknowledgement.
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Produce),
        5 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(n, keep)| Step::Deliver(n, keep)),
        4 => (any::<usize>(), prop::bool::weighted(0.85)).prop_map(|(n, ok)| Step::Store(n, ok)),
        3 => (prop::bool::weighted(0.8), any::<bool>()).prop_map(|(d, s)| Step::Acks(d, s)),
        1 => Just(Step::Failover),
        1 => (0usize..2, any::<bool>()).prop_map(|(n, applied)| Step::Crash(n, applied)),
        2 => Just(Step::Audit),
        1 => (1u64..300).prop_map(Step::Tick),
    ]
}

const MAX_IN_FLIGHT: usize = 4;

struct Node {
    tracker: FlowTracker,
    pending: Vec<u64>,
    audits: Vec<FlowKey>,
    acks: Vec<u64>,
    outcomes: Vec<FlowOutcome>,
}

impl Node {
    fn new() -> Node {
        let lim = FlowLimits {
            seq_window: 64,
            stores_in_flight_max: 64,
            ..FlowLimits::default()
        };
        Node {
            tracker: FlowTracker::new(lim),
            pending: vec![],
            audits: vec![],
            acks: vec![],
            outcomes: vec![],
        }
    }
    fn drain(&mut self) {
        while let Some(a) = self.tracker.poll_action() {
            match a {
                FlowAction::Store { seq, .. } => self.pending.push(seq),
                FlowAction::Ack { seq, .. } => self.acks.push(seq),
                FlowAction::Audit { key } => self.audits.push(key),
                FlowAction::StoreRefusal { .. } => unreachable!("no budget is reached here"),
                FlowAction::Completed(o) => {
                    // The shell records it, then the final is acknowledged.
                    self.tracker.handle_recorded(&o.key, true);
                    self.outcomes.push(o);
                }
            }
        }
    }
}

fn payload_of(weights: &[u64], seq: u64) -> Payload {
    match weights.get(seq as usize) {
        Some(w) => data(*w),
        None => done(),
    }
}

struct World {
    weights: Vec<u64>,
    agent: FlowOutbox<Payload, ()>,
    /// Messages the agent produced.
    produced: u64,
    /// The current stream: messages on their way to the current node.
    wire: Vec<(u64, Payload)>,
    nodes: [Node; 2],
    current: usize,
    storage: BTreeMap<u64, Payload>,
    /// Messages the agent was told are stored.
    acked: BTreeSet<u64>,
    ended: bool,
    outcomes: Vec<FlowOutcome>,
    now: Monotonic,
}

impl World {
    fn new(weights: Vec<u64>) -> World {
        let mut agent = FlowOutbox::new(OutboxLimits {
            resend_after_ms: 500,
            done_max: 4,
            flows_max: 4,
        });
        assert_eq!(
            agent.begin(key().flow.as_str()),
            crate::agent::Begin::Started
        );
        agent.handle_connected(Monotonic(1), MAX_IN_FLIGHT);
        World {
            weights,
            agent,
            produced: 0,
            wire: vec![],
            nodes: [Node::new(), Node::new()],
            current: 0,
            storage: BTreeMap::new(),
            acked: BTreeSet::new(),
            ended: false,
            outcomes: vec![],
            now: Monotonic(1),
        }
    }

    fn total(&self) -> u64 {
        self.weights.len() as u64 + 1
    }

    fn drain_agent(&mut self) {
        while let Some(a) = self.agent.poll_action() {
            match a {
                OutboxAction::Send { seq, payload, .. } => self.wire.push((seq, payload)),
                OutboxAction::FirstAck { .. } | OutboxAction::Settled { .. } => {}
                OutboxAction::Ended { .. } => self.ended = true,
            }
        }
    }

    fn apply(&mut self, s: &Step) {
        let (n, now) = (self.current, self.now);
        let flow = key().flow.to_string();
        match s.clone() {
            Step::Produce => {
                if self.produced < self.total() {
                    let seq = self.produced;
                    let is_final = seq + 1 == self.total();
                    let p = payload_of(&self.weights, seq);
                    if let Ok(got) = self.agent.push(now, &flow, p, is_final, ()) {
                        assert_eq!(got, seq, "the agent numbers its messages in order");
                        self.produced += 1;
                    }
                }
            }
            Step::Deliver(i, keep) => {
                if self.wire.is_empty() {
                    return;
                }
                let i = i % self.wire.len();
                let (seq, p) = if keep {
                    self.wire[i].clone()
                } else {
                    self.wire.remove(i)
                };
                let _ = self.nodes[n].tracker.handle_message(now, key(), seq, p);
                self.nodes[n].drain();
            }
            Step::Store(i, ok) => {
                let node = &mut self.nodes[n];
                if node.pending.is_empty() {
                    return;
                }
                let seq = node.pending.remove(i % node.pending.len());
                if ok {
                    self.storage.insert(seq, payload_of(&self.weights, seq));
                }
                node.tracker.handle_stored(now, &key(), seq, ok);
                node.drain();
            }
            Step::Acks(deliver, settled) => {
                for seq in std::mem::take(&mut self.nodes[n].acks) {
                    // Invariant 1: an ack is only ever sent for a stored message.
                    assert!(
                        self.storage.contains_key(&seq),
                        "acked {seq} but not stored"
                    );
                    if deliver {
                        self.acked.insert(seq);
                        self.agent.handle_ack(now, &flow, seq, settled);
                    }
                }
            }
            Step::Failover => {
                self.current = 1 - n;
                self.wire.clear();
                self.nodes[n].acks.clear();
                self.agent.handle_disconnected();
                self.agent.handle_connected(now, MAX_IN_FLIGHT);
            }
            Step::Crash(c, applied) => {
                let old = std::mem::replace(&mut self.nodes[c], Node::new());
                if applied {
                    for seq in old.pending {
                        self.storage.insert(seq, payload_of(&self.weights, seq));
                    }
                }
                self.outcomes.extend(old.outcomes);
                if c == n {
                    // Its streams died with it: the agent reconnects to the same address.
                    self.wire.clear();
                    self.agent.handle_disconnected();
                    self.agent.handle_connected(now, MAX_IN_FLIGHT);
                }
            }
            Step::Audit => {
                for c in 0..2 {
                    for k in std::mem::take(&mut self.nodes[c].audits) {
                        let found = self
                            .storage
                            .iter()
                            .map(|(s, p)| StoredMessage {
                                seq: *s,
                                payload: p.clone(),
                            })
                            .collect();
                        self.nodes[c].tracker.handle_audit(now, &k, Some(found));
                        self.nodes[c].drain();
                    }
                }
            }
            Step::Tick(ms) => {
                self.now = now.plus_ms(ms);
                self.agent.handle_timeout(self.now);
            }
        }
        self.drain_agent();
        assert!(
            self.agent.unsettled() <= MAX_IN_FLIGHT + 1,
            "the agent keeps more than max_in_flight (+ its final status)"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// invariant 1 (docs/architecture.md): acknowledged messages are stored; resends are stored
    /// once; the completed totals are exact whichever node stored what, after failovers, lost and
    /// unsettled acks and crashes — with the agent's real outbox as the client.
    #[test]
    fn acknowledged_is_stored_and_totals_are_exact(
        weights in prop::collection::vec(0u64..100, 0..12),
        steps in prop::collection::vec(step(), 0..160),
    ) {
        let mut w = World::new(weights);
        for s in &steps {
            w.apply(s);
        }
        // Liveness: heal (stores succeed, acks delivered settled, audits answered) and require
        // the agent's flow to end.
        for _ in 0..(8 * w.total() + 16) {
            if w.ended {
                break;
            }
            for _ in 0..MAX_IN_FLIGHT + 1 {
                w.apply(&Step::Produce);
            }
            while !w.wire.is_empty() {
                w.apply(&Step::Deliver(0, false));
            }
            while !w.nodes[w.current].pending.is_empty() {
                w.apply(&Step::Store(0, true));
            }
            w.apply(&Step::Audit);
            w.apply(&Step::Acks(true, true));
            w.apply(&Step::Tick(500));
        }
        prop_assert!(w.ended, "the agent's flow never ended ({} of {} produced)", w.produced, w.total());
        prop_assert_eq!(w.agent.unsettled(), 0);
        // The final acknowledgement covers the whole flow (some acks may have been lost): every
        // message is stored.
        for seq in 0..w.total() {
            prop_assert!(w.storage.contains_key(&seq), "the flow ended without message {}", seq);
        }
        for n in &mut w.nodes {
            w.outcomes.append(&mut n.outcomes);
        }
        prop_assert!(!w.outcomes.is_empty(), "no node completed the flow");
        let rows: u64 = w.weights.iter().sum();
        for o in &w.outcomes {
            prop_assert_eq!(o.rows, rows);
        }
        for seq in &w.acked {
            prop_assert!(w.storage.contains_key(seq));
        }
    }
}
