//! Replication tests: unit cases, and the property for invariant 4 (docs/architecture.md) under a hostile network,
//! minion restarts and master restarts.

use super::*;
use proptest::prelude::*;

fn lim() -> OutboxLimits {
    OutboxLimits {
        events_max: 8,
        in_flight_max: 3,
        batch_max: 2,
        resend_after_ms: 100,
    }
}

fn drain<E: Clone>(o: &mut Outbox<E>) -> Vec<OutboxAction<E>> {
    std::iter::from_fn(|| o.poll_action()).collect()
}

#[test]
fn sends_only_persisted_events_within_the_window() {
    let t = Timestamp(0);
    let mut o = Outbox::new(lim(), 1);
    o.handle_connected(t);
    for e in 0..5u32 {
        o.push(t, e).unwrap();
    }
    let acts = drain(&mut o);
    assert_eq!(
        acts.len(),
        5,
        "only Persist actions before anything is durable"
    );
    o.handle_persisted(t, 5);
    let acts = drain(&mut o);
    assert_eq!(
        acts,
        vec![
            OutboxAction::Send {
                epoch: 1,
                events: vec![(1, 0), (2, 1)]
            },
            OutboxAction::Send {
                epoch: 1,
                events: vec![(3, 2)]
            },
        ]
    );
    o.handle_ack(t, 1, 2);
    let acts = drain(&mut o);
    assert_eq!(
        acts,
        vec![
            OutboxAction::Truncate { upto: 2 },
            OutboxAction::Send {
                epoch: 1,
                events: vec![(4, 3), (5, 4)]
            },
        ]
    );
}

#[test]
fn full_outbox_refuses_and_reconnect_resends_from_ack() {
    let t = Timestamp(0);
    let mut o = Outbox::new(lim(), 1);
    for e in 0..8u32 {
        o.push(t, e).unwrap();
    }
    assert_eq!(o.push(t, 99), Err(OutboxError::Full { max: 8 }));
    o.handle_persisted(t, 8);
    o.handle_connected(t);
    drain(&mut o);
    o.handle_ack(t, 1, 1);
    o.handle_disconnected(t);
    drain(&mut o);
    o.handle_connected(t);
    let acts = drain(&mut o);
    assert_eq!(
        acts[0],
        OutboxAction::Send {
            epoch: 1,
            events: vec![(2, 1), (3, 2)]
        }
    );
}

#[test]
fn stalled_acks_trigger_a_resend() {
    let mut o = Outbox::new(lim(), 1);
    o.handle_connected(Timestamp(0));
    o.push(Timestamp(0), 7u32).unwrap();
    o.handle_persisted(Timestamp(0), 1);
    drain(&mut o);
    assert_eq!(o.poll_timeout(), Some(Timestamp(100)));
    o.handle_timeout(Timestamp(100));
    assert_eq!(
        drain(&mut o),
        vec![OutboxAction::Send {
            epoch: 1,
            events: vec![(1, 7)]
        }]
    );
}

#[test]
fn inbox_applies_in_order_once_and_refuses_stale_epochs() {
    let t = Timestamp(0);
    let mut i: Inbox<u32> = Inbox::recover(InboxLimits { minions_max: 1 }, []);
    i.handle_batch(t, "m1", 2, vec![(2, 20), (1, 10)]).unwrap();
    let acts: Vec<_> = std::iter::from_fn(|| i.poll_action()).collect();
    assert_eq!(
        acts,
        vec![InboxAction::Ack {
            node: "m1".into(),
            epoch: 2,
            upto: 0
        }]
    );
    i.handle_batch(t, "m1", 2, vec![(1, 10), (2, 20), (1, 10)])
        .unwrap();
    let applied: Vec<u32> = std::iter::from_fn(|| i.poll_action())
        .filter_map(|a| match a {
            InboxAction::Apply { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![10, 20]);
    assert_eq!(
        i.handle_batch(t, "m1", 1, vec![(3, 30)]),
        Err(InboxError::StaleEpoch { got: 1, current: 2 })
    );
    assert_eq!(
        i.handle_batch(t, "m2", 1, vec![]),
        Err(InboxError::TooManyMinions { max: 1 })
    );
}

/// A minion that lost its outbox on a machine whose clock is behind starts an epoch older than the
/// master's cursor: refused, it moves past the master's epoch and everything it holds is applied.
#[test]
fn an_outbox_behind_the_masters_epoch_moves_past_it() {
    let t = Timestamp(0);
    let mut i: Inbox<u32> = Inbox::recover(InboxLimits { minions_max: 4 }, []);
    i.handle_batch(t, "m1", 500, vec![(1, 10)]).unwrap();
    std::iter::from_fn(|| i.poll_action()).count();
    // The new outbox's epoch came from a clock that is behind: 400 < 500.
    let mut o = Outbox::new(lim(), 400);
    o.handle_connected(t);
    o.push(t, 7u32).unwrap();
    drain(&mut o);
    o.handle_persisted(t, 1);
    let OutboxAction::Send { epoch, events } = drain(&mut o).remove(0) else {
        panic!("a send");
    };
    let Err(InboxError::StaleEpoch { current, .. }) = i.handle_batch(t, "m1", epoch, events) else {
        panic!("a stale epoch is refused");
    };
    assert_eq!(o.handle_stale_epoch(t, current), Some(501));
    let OutboxAction::Send { epoch, events } = drain(&mut o).remove(0) else {
        panic!("everything is sent again, in the new epoch");
    };
    assert_eq!((epoch, events.clone()), (501, vec![(1, 7)]));
    i.handle_batch(t, "m1", epoch, events).unwrap();
    let applied: Vec<u32> = std::iter::from_fn(|| i.poll_action())
        .filter_map(|a| match a {
            InboxAction::Apply { event, .. } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![7]);
    // Once the master acknowledged this epoch, a refusal is not ours to fix.
    o.handle_ack(t, 501, 1);
    assert_eq!(o.handle_stale_epoch(t, 600), None);
    assert_eq!(o.epoch(), 501);
}

// ---- Property: invariant 4. ----

#[test]
fn an_event_not_applied_is_applied_again_on_resend_in_order() {
    let mut inbox: Inbox<&str> = Inbox::recover(InboxLimits::default(), []);
    let now = Timestamp(0);
    inbox
        .handle_batch(now, "m", 1, vec![(1, "a"), (2, "b"), (3, "c")])
        .unwrap();
    let mut applied = vec![];
    while let Some(a) = inbox.poll_action() {
        match a {
            // "b" meets a busy datastore.
            InboxAction::Apply {
                node,
                cursor,
                event: "b",
            } => inbox.handle_not_applied(&node, cursor),
            InboxAction::Apply { event, .. } => applied.push(event),
            InboxAction::Ack { upto, .. } => applied.push(if upto == 1 { "ack1" } else { "ack?" }),
        }
    }
    // "c" was not applied past the hole, and only "a" is acknowledged.
    assert_eq!(applied, vec!["a", "ack1"]);
    assert_eq!(inbox.cursor("m"), Some(Cursor { epoch: 1, hwm: 1 }));
    // The minion resends from its ack: both follow, in order.
    inbox
        .handle_batch(now, "m", 1, vec![(2, "b"), (3, "c")])
        .unwrap();
    let again: Vec<_> = std::iter::from_fn(|| inbox.poll_action()).collect();
    assert!(
        matches!(
            &again[..],
            [
                InboxAction::Apply { event: "b", .. },
                InboxAction::Apply { event: "c", .. },
                InboxAction::Ack { upto: 3, .. },
            ]
        ),
        "{again:?}"
    );
}

#[derive(Clone, Debug)]
enum Step {
    Push,
    Persist,
    Connect,
    Disconnect,
    /// Deliver the n-th message on the wire to the master (it may stay there too: duplication).
    Deliver(usize, bool),
    /// Drop the n-th message on the wire.
    Drop(usize),
    /// Deliver or drop the n-th ack.
    AckDeliver(usize, bool),
    Tick(u64),
    MinionCrash,
    MasterCrash,
    /// The master's datastore starts or stops refusing writes as busy: applies fail meanwhile.
    Busy(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => Just(Step::Push),
        3 => Just(Step::Persist),
        1 => Just(Step::Connect),
        1 => Just(Step::Disconnect),
        6 => (any::<usize>(), any::<bool>()).prop_map(|(n, keep)| Step::Deliver(n, keep)),
        1 => any::<usize>().prop_map(Step::Drop),
        4 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(n, ok)| Step::AckDeliver(n, ok)),
        1 => (1u64..200).prop_map(Step::Tick),
        1 => Just(Step::MinionCrash),
        1 => Just(Step::MasterCrash),
        1 => any::<bool>().prop_map(Step::Busy),
    ]
}

struct World {
    outbox: Outbox<u64>,
    /// The minion's disk: the acked mark and the synced events.
    disk_acked: u64,
    disk_events: Vec<(u64, u64)>,
    unsynced: Vec<(u64, u64)>,
    wire: Vec<(u64, Vec<(u64, u64)>)>,
    acks: Vec<(u64, u64)>,
    inbox: Inbox<u64>,
    /// The master's durable state: cursor and the applied events, in order.
    master_cursor: Option<Cursor>,
    applied: Vec<u64>,
    /// Events accepted (persisted) by the minion, in order: what must be applied.
    accepted: Vec<(u64, u64)>,
    next_payload: u64,
    now: Timestamp,
    /// Applies fail (the shell reports them not applied).
    busy: bool,
    /// Applies that failed.
    refused: u64,
}

impl World {
    fn drain_outbox(&mut self) {
        while let Some(a) = self.outbox.poll_action() {
            match a {
                OutboxAction::Persist { seq, event } => self.unsynced.push((seq, event)),
                OutboxAction::Send { epoch, events } => self.wire.push((epoch, events)),
                OutboxAction::Truncate { upto } => {
                    self.disk_acked = upto;
                    self.disk_events.retain(|(s, _)| *s > upto);
                }
            }
        }
    }

    fn drain_inbox(&mut self) {
        while let Some(a) = self.inbox.poll_action() {
            match a {
                InboxAction::Apply {
                    node,
                    cursor,
                    event,
                } => {
                    if self.busy {
                        self.refused += 1;
                        self.inbox.handle_not_applied(&node, cursor);
                        continue;
                    }
                    self.master_cursor = Some(cursor);
                    self.applied.push(event);
                }
                InboxAction::Ack { epoch, upto, .. } => self.acks.push((epoch, upto)),
            }
        }
    }

    fn step(&mut self, s: Step) {
        let now = self.now;
        match s {
            Step::Push => {
                let p = self.next_payload;
                self.next_payload += 1;
                let _ = self.outbox.push(now, p);
            }
            Step::Persist => {
                if let Some(&(last, _)) = self.unsynced.last() {
                    for e in self.unsynced.drain(..) {
                        self.accepted.push(e);
                        self.disk_events.push(e);
                    }
                    self.outbox.handle_persisted(now, last);
                }
            }
            Step::Connect => self.outbox.handle_connected(now),
            Step::Disconnect => self.outbox.handle_disconnected(now),
            Step::Deliver(n, keep) => {
                if self.wire.is_empty() {
                    return;
                }
                let i = n % self.wire.len();
                let (epoch, events) = if keep {
                    self.wire[i].clone()
                } else {
                    self.wire.remove(i)
                };
                let _ = self.inbox.handle_batch(now, "m", epoch, events);
                self.drain_inbox();
            }
            Step::Drop(n) => {
                if !self.wire.is_empty() {
                    let i = n % self.wire.len();
                    self.wire.remove(i);
                }
            }
            Step::AckDeliver(n, ok) => {
                if self.acks.is_empty() {
                    return;
                }
                let (epoch, upto) = self.acks.remove(n % self.acks.len());
                if ok {
                    self.outbox.handle_ack(now, epoch, upto);
                }
            }
            Step::Tick(ms) => {
                self.now = now.plus_ms(ms);
                self.outbox.handle_timeout(self.now);
            }
            Step::MinionCrash => {
                self.unsynced.clear();
                self.wire.clear();
                self.acks.clear();
                let events = self.disk_events.clone();
                self.outbox = Outbox::recover(lim(), 1, self.disk_acked, events);
            }
            Step::MasterCrash => {
                self.wire.clear();
                self.acks.clear();
                let cursors = self.master_cursor.map(|c| ("m".to_string(), c));
                self.inbox = Inbox::recover(InboxLimits::default(), cursors);
            }
            Step::Busy(b) => self.busy = b,
        }
        self.drain_outbox();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Invariant 4: every accepted event is applied exactly once, in order, whatever the network,
    /// the minion or the master do; and bounds hold throughout.
    #[test]
    fn accepted_events_apply_exactly_once_in_order(steps in prop::collection::vec(step(), 0..200)) {
        let mut w = World {
            outbox: Outbox::new(lim(), 1),
            disk_acked: 0,
            disk_events: vec![],
            unsynced: vec![],
            wire: vec![],
            acks: vec![],
            inbox: Inbox::recover(InboxLimits::default(), []),
            master_cursor: None,
            applied: vec![],
            accepted: vec![],
            next_payload: 0,
            now: Timestamp(0),
            busy: false,
            refused: 0,
        };
        for s in steps {
            w.step(s);
            prop_assert!(w.outbox.len() <= lim().events_max);
            // Safety: what is applied is a prefix of what was accepted.
            let accepted: Vec<u64> = w.accepted.iter().map(|e| e.1).collect();
            prop_assert!(accepted.starts_with(&w.applied), "applied {:?} accepted {:?}", w.applied, accepted);
        }
        // Liveness: heal everything and require the master to catch up.
        w.step(Step::Busy(false));
        w.step(Step::Persist);
        w.step(Step::Connect);
        for _ in 0..200 {
            if w.outbox.is_empty() { break; }
            while !w.wire.is_empty() { w.step(Step::Deliver(0, false)); }
            while !w.acks.is_empty() { w.step(Step::AckDeliver(0, true)); }
            w.step(Step::Tick(1000));
        }
        let accepted: Vec<u64> = w.accepted.iter().map(|e| e.1).collect();
        prop_assert_eq!(&w.applied, &accepted);
        prop_assert!(w.outbox.is_empty());
    }
}
