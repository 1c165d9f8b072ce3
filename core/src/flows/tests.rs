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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    let now = Timestamp(0);
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
    t.handle_message(Timestamp(0), key(), 0, data(1)).unwrap();
    drain(&mut t);
    t.handle_timeout(Timestamp(5000));
    assert_eq!(t.len(), 1, "a flow with a store in flight is kept");
    t.handle_stored(Timestamp(5000), &key(), 0, true);
    let deadline = t.poll_timeout().unwrap();
    t.handle_timeout(deadline.plus_ms(2000));
    assert!(t.is_empty());
}

// ---- Property: invariant 1 across two nodes, failovers, lost acks and node crashes. ----

#[derive(Clone, Debug)]
enum Step {
    /// The client sends its n-th unacked message (mod count) to its current node.
    Send(usize),
    /// The current node completes its n-th pending store, succeeding or failing.
    Store(usize, bool),
    /// Deliver or drop the node's outgoing acks.
    Acks(bool),
    /// The client fails over to the other node.
    Failover,
    /// Node n crashes: its tracker is lost; its pending stores may or may not have hit storage.
    Crash(usize, bool),
    /// Answer an audit.
    Audit,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<usize>().prop_map(Step::Send),
        4 => (any::<usize>(), prop::bool::weighted(0.85)).prop_map(|(n, ok)| Step::Store(n, ok)),
        3 => any::<bool>().prop_map(Step::Acks),
        1 => Just(Step::Failover),
        1 => (0usize..2, any::<bool>()).prop_map(|(n, applied)| Step::Crash(n, applied)),
        2 => Just(Step::Audit),
    ]
}

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
    nodes: [Node; 2],
    current: usize,
    storage: BTreeMap<u64, Payload>,
    acked: BTreeSet<u64>,
    outcomes: Vec<FlowOutcome>,
}

impl World {
    fn total(&self) -> u64 {
        self.weights.len() as u64 + 1
    }

    fn apply(&mut self, s: &Step, now: Timestamp) {
        let n = self.current;
        match s.clone() {
            Step::Send(i) => {
                let unacked: Vec<u64> = (0..self.total())
                    .filter(|q| !self.acked.contains(q))
                    .collect();
                if unacked.is_empty() {
                    return;
                }
                let seq = unacked[i % unacked.len()];
                let p = payload_of(&self.weights, seq);
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
            Step::Acks(deliver) => {
                for seq in std::mem::take(&mut self.nodes[n].acks) {
                    // Invariant 1: an ack is only ever sent for a stored message.
                    assert!(
                        self.storage.contains_key(&seq),
                        "acked {seq} but not stored"
                    );
                    if deliver {
                        self.acked.insert(seq);
                    }
                }
            }
            Step::Failover => self.current = 1 - n,
            Step::Crash(c, applied) => {
                let old = std::mem::replace(&mut self.nodes[c], Node::new());
                if applied {
                    for seq in old.pending {
                        self.storage.insert(seq, payload_of(&self.weights, seq));
                    }
                }
                self.outcomes.extend(old.outcomes);
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
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// invariant 1 (docs/architecture.md): acknowledged messages are stored; resends are stored once; the completed
    /// totals are exact whichever node stored what, after failovers, lost acks and crashes.
    #[test]
    fn acknowledged_is_stored_and_totals_are_exact(
        weights in prop::collection::vec(0u64..100, 0..12),
        steps in prop::collection::vec(step(), 0..120),
    ) {
        let mut w = World {
            weights,
            nodes: [Node::new(), Node::new()],
            current: 0,
            storage: BTreeMap::new(),
            acked: BTreeSet::new(),
            outcomes: vec![],
        };
        let now = Timestamp(1);
        for s in &steps {
            w.apply(s, now);
        }
        // Liveness: heal (stores succeed, acks delivered, audits answered) and require completion.
        for _ in 0..(4 * w.total() + 8) {
            if w.acked.len() as u64 == w.total() {
                break;
            }
            for i in 0..w.total() as usize {
                w.apply(&Step::Send(i), now);
            }
            while !w.nodes[w.current].pending.is_empty() {
                w.apply(&Step::Store(0, true), now);
            }
            w.apply(&Step::Audit, now);
            w.apply(&Step::Acks(true), now);
        }
        prop_assert_eq!(w.acked.len() as u64, w.total(), "client never got every ack");
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
