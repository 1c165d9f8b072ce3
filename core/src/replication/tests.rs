//! Replication tests: unit cases, and the property for invariant 4 (docs/architecture.md) under a hostile network,
//! minion restarts and master restarts.

use super::*;
use crate::node::testing::{Ending, ending};
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
    let t = Monotonic(0);
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
    let t = Monotonic(0);
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
    o.handle_connected(Monotonic(0));
    o.push(Monotonic(0), 7u32).unwrap();
    o.handle_persisted(Monotonic(0), 1);
    drain(&mut o);
    assert_eq!(o.poll_timeout(), Some(Monotonic(100)));
    o.handle_timeout(Monotonic(100));
    assert_eq!(
        drain(&mut o),
        vec![OutboxAction::Send {
            epoch: 1,
            events: vec![(1, 7)]
        }]
    );
}

/// Performs an inbox's actions the way a healthy master does (every effect and cursor write
/// done), returning the events applied and the acks sent.
fn run_inbox<E: Clone>(i: &mut Inbox<E>) -> (Vec<E>, Vec<(u64, u64)>) {
    let (mut applied, mut acks) = (vec![], vec![]);
    while let Some(a) = i.poll_action() {
        match a {
            InboxAction::Apply {
                node,
                cursor,
                event,
            } => {
                applied.push(event);
                i.handle_applied(&node, cursor, Outcome::Done);
            }
            InboxAction::Persist { node, cursor } => {
                i.handle_persisted(&node, cursor, Outcome::Done)
            }
            InboxAction::Ack { epoch, upto, .. } => acks.push((epoch, upto)),
        }
    }
    (applied, acks)
}

#[test]
fn inbox_applies_in_order_once_and_refuses_stale_epochs() {
    let t = Monotonic(0);
    let mut i: Inbox<u32> = Inbox::recover(
        InboxLimits {
            minions_max: 1,
            queued_max: 16,
        },
        [],
    );
    i.handle_batch(t, "m1", 2, vec![(2, 20), (1, 10)]).unwrap();
    assert_eq!(run_inbox(&mut i), (vec![], vec![(2, 0)]));
    i.handle_batch(t, "m1", 2, vec![(1, 10), (2, 20), (1, 10)])
        .unwrap();
    assert_eq!(run_inbox(&mut i), (vec![10, 20], vec![(2, 2)]));
    assert_eq!(
        i.handle_batch(t, "m1", 1, vec![(3, 30)]),
        Err(InboxError::StaleEpoch { got: 1, current: 2 })
    );
    assert_eq!(
        i.handle_batch(t, "m2", 1, vec![]),
        Err(InboxError::TooManyMinions { max: 1 })
    );
}

/// One effect at a time, the cursor after them, the ack after the cursor — and an ack never passes
/// a cursor write that failed or whose outcome is unknown.
#[test]
fn the_inbox_acknowledges_only_what_a_durable_cursor_covers() {
    let t = Monotonic(0);
    let mut i: Inbox<u32> = Inbox::recover(InboxLimits::default(), []);
    i.handle_batch(t, "m", 1, vec![(1, 10), (2, 20)]).unwrap();
    let c1 = Cursor { epoch: 1, hwm: 1 };
    let c2 = Cursor { epoch: 1, hwm: 2 };
    let apply = |event| InboxAction::Apply {
        node: "m".into(),
        cursor: Cursor {
            epoch: 1,
            hwm: u64::from(event) / 10,
        },
        event,
    };
    assert_eq!(i.poll_action(), Some(apply(10)));
    assert_eq!(i.poll_action(), None, "the next effect waits for this one");
    i.handle_applied("m", c1, Outcome::Done);
    assert_eq!(i.poll_action(), Some(apply(20)));
    i.handle_applied("m", c2, Outcome::Done);
    let persist = InboxAction::Persist {
        node: "m".into(),
        cursor: c2,
    };
    assert_eq!(i.poll_action(), Some(persist.clone()));
    assert_eq!(i.poll_action(), None, "no ack before the cursor is durable");
    // The write's outcome is unknown: it may not have happened. The ack covers nothing.
    i.handle_persisted("m", c2, Outcome::Unknown);
    let ack0 = InboxAction::Ack {
        node: "m".into(),
        epoch: 1,
        upto: 0,
    };
    assert_eq!(i.poll_action(), Some(ack0));
    assert_eq!(
        i.poll_action(),
        None,
        "no retry loop against a failing volume"
    );
    // The minion resends; nothing is applied again in this life, and the cursor is written again.
    i.handle_batch(t, "m", 1, vec![(1, 10), (2, 20)]).unwrap();
    assert_eq!(i.poll_action(), Some(persist));
    i.handle_persisted("m", c2, Outcome::Done);
    assert_eq!(
        i.poll_action(),
        Some(InboxAction::Ack {
            node: "m".into(),
            epoch: 1,
            upto: 2
        })
    );
    assert_eq!(i.durable("m"), Some(c2));
}

/// The events waiting to be applied are bounded: beyond the bound a batch's rest is not taken (nor
/// acknowledged), and the minion's resend brings it.
#[test]
fn the_inbox_queue_is_bounded_and_the_resend_brings_the_rest() {
    let t = Monotonic(0);
    let mut i: Inbox<u64> = Inbox::recover(
        InboxLimits {
            minions_max: 4,
            queued_max: 3,
        },
        [],
    );
    i.handle_batch(t, "m", 1, (1..=10).map(|s| (s, s)).collect())
        .unwrap();
    // Three are taken, and only they are acknowledged.
    let (applied, acks) = run_inbox(&mut i);
    assert_eq!(applied, vec![1, 2, 3]);
    assert_eq!(acks, vec![(1, 3)]);
    i.handle_batch(t, "m", 1, (4..=10).map(|s| (s, s)).collect())
        .unwrap();
    let (applied, acks) = run_inbox(&mut i);
    assert_eq!(applied, vec![4, 5, 6]);
    assert_eq!(acks, vec![(1, 6)]);
}

/// A minion that lost its outbox on a machine whose clock is behind starts an epoch older than the
/// master's cursor: refused, it moves past the master's epoch and everything it holds is applied.
#[test]
fn an_outbox_behind_the_masters_epoch_moves_past_it() {
    let t = Monotonic(0);
    let mut i: Inbox<u32> = Inbox::recover(
        InboxLimits {
            minions_max: 4,
            ..InboxLimits::default()
        },
        [],
    );
    i.handle_batch(t, "m1", 500, vec![(1, 10)]).unwrap();
    run_inbox(&mut i);
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
    assert_eq!(run_inbox(&mut i), (vec![7], vec![(501, 1)]));
    // Once the master acknowledged this epoch, a refusal is not ours to fix.
    o.handle_ack(t, 501, 1);
    assert_eq!(o.handle_stale_epoch(t, 600), None);
    assert_eq!(o.epoch(), 501);
}

// ---- Property: invariant 4. ----

#[test]
fn an_event_not_applied_is_applied_again_on_resend_in_order() {
    let mut inbox: Inbox<&str> = Inbox::recover(InboxLimits::default(), []);
    let now = Monotonic(0);
    inbox
        .handle_batch(now, "m", 1, vec![(1, "a"), (2, "b"), (3, "c")])
        .unwrap();
    let mut seen = vec![];
    while let Some(a) = inbox.poll_action() {
        match a {
            // "b" meets a busy datastore.
            InboxAction::Apply {
                node,
                cursor,
                event: "b",
            } => inbox.handle_applied(&node, cursor, Outcome::Refused),
            InboxAction::Apply {
                node,
                cursor,
                event,
            } => {
                seen.push(event);
                inbox.handle_applied(&node, cursor, Outcome::Done);
            }
            InboxAction::Persist { node, cursor } => {
                inbox.handle_persisted(&node, cursor, Outcome::Done)
            }
            InboxAction::Ack { upto, .. } => seen.push(if upto == 1 { "ack1" } else { "ack?" }),
        }
    }
    // "c" was not applied past the hole, and only "a" is acknowledged.
    assert_eq!(seen, vec!["a", "ack1"]);
    assert_eq!(inbox.cursor("m"), Some(Cursor { epoch: 1, hwm: 1 }));
    // The minion resends from its ack: both follow, in order.
    inbox
        .handle_batch(now, "m", 1, vec![(2, "b"), (3, "c")])
        .unwrap();
    assert_eq!(run_inbox(&mut inbox), (vec!["b", "c"], vec![(1, 3)]));
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
    /// The master crashes; its writes in flight all land (`true`) or none does.
    MasterCrash(bool),
    /// The master's oldest effect or cursor write in flight ends: done, refused, or unknown —
    /// having happened (`true`) or not.
    Complete(Ending),
    /// The master's volume starts or stops refusing every write as busy.
    Busy(bool),
}

fn step() -> impl Strategy<Value = Step> {
    let ending = ending(8, 1, 1);
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
        1 => any::<bool>().prop_map(Step::MasterCrash),
        8 => ending.prop_map(Step::Complete),
        1 => any::<bool>().prop_map(Step::Busy),
    ]
}

/// A fault planted in the master's shell, to prove the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plant {
    None,
    /// Acknowledge what is applied rather than what the inbox says (the old shell's override,
    /// minus its durable-cursor clamp).
    AckApplied,
    /// Start without the persisted cursor.
    ForgetCursor,
}

/// A minion's outbox and the master's inbox over a hostile wire, with a model of the master's
/// storage: effect writes and cursor writes that end done, refused or unknown, asynchronously, and a
/// master crash that lands some of what was in flight.
struct World {
    outbox: Outbox<u64>,
    /// The minion's disk: the acked mark and the synced events.
    disk_acked: u64,
    disk_events: Vec<(u64, u64)>,
    unsynced: Vec<(u64, u64)>,
    wire: Vec<(u64, Vec<(u64, u64)>)>,
    acks: Vec<(u64, u64)>,
    inbox: Inbox<u64>,
    /// The master's writes in flight, oldest first.
    in_flight: VecDeque<InboxAction<u64>>,
    /// The master's storage: its cursor, and every effect written (an event's effect may land
    /// twice: effects are idempotent, and a crash before the cursor re-applies them).
    stored_cursor: Option<Cursor>,
    effects: Vec<u64>,
    /// Events accepted (persisted) by the minion, in order: what must be applied.
    accepted: Vec<(u64, u64)>,
    next_payload: u64,
    now: Monotonic,
    busy: bool,
    plant: Plant,
}

impl World {
    fn new(plant: Plant) -> World {
        World {
            outbox: Outbox::new(lim(), 1),
            disk_acked: 0,
            disk_events: vec![],
            unsynced: vec![],
            wire: vec![],
            acks: vec![],
            inbox: Inbox::recover(InboxLimits::default(), []),
            in_flight: VecDeque::new(),
            stored_cursor: None,
            effects: vec![],
            accepted: vec![],
            next_payload: 0,
            now: Monotonic(0),
            busy: false,
            plant,
        }
    }

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

    /// Takes the inbox's actions: writes go in flight; an ack is checked, then sent.
    fn drain_inbox(&mut self) -> Result<(), String> {
        while let Some(a) = self.inbox.poll_action() {
            match a {
                InboxAction::Apply { cursor, .. } => {
                    // Invariant 4: nothing a durable cursor covers is applied again.
                    if let Some(s) = self.stored_cursor
                        && s.epoch == cursor.epoch
                        && cursor.hwm <= s.hwm
                    {
                        return Err(format!(
                            "applies event {cursor:?}, covered by the durable cursor {s:?}"
                        ));
                    }
                    self.in_flight.push_back(a);
                }
                InboxAction::Persist { .. } => self.in_flight.push_back(a),
                InboxAction::Ack {
                    epoch, mut upto, ..
                } => {
                    if self.plant == Plant::AckApplied {
                        upto = self.inbox.cursor("m").map_or(upto, |c| c.hwm);
                    }
                    // Invariant 4: an ack never passes the durable cursor.
                    let durable = self
                        .stored_cursor
                        .filter(|c| c.epoch == epoch)
                        .map_or(0, |c| c.hwm);
                    if upto > durable {
                        return Err(format!(
                            "acknowledges {upto} of epoch {epoch}; the durable cursor is at {durable}"
                        ));
                    }
                    self.acks.push((epoch, upto));
                }
            }
        }
        Ok(())
    }

    /// A write in flight lands on storage (or not).
    fn land(&mut self, a: &InboxAction<u64>) {
        match a {
            InboxAction::Apply { event, .. } => self.effects.push(*event),
            InboxAction::Persist { cursor, .. } => self.stored_cursor = Some(*cursor),
            InboxAction::Ack { .. } => {}
        }
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
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
                if !self.wire.is_empty() {
                    let i = n % self.wire.len();
                    let (epoch, events) = if keep {
                        self.wire[i].clone()
                    } else {
                        self.wire.remove(i)
                    };
                    let _ = self.inbox.handle_batch(now, "m", epoch, events);
                }
            }
            Step::Drop(n) => {
                if !self.wire.is_empty() {
                    let i = n % self.wire.len();
                    self.wire.remove(i);
                }
            }
            Step::AckDeliver(n, ok) => {
                if !self.acks.is_empty() {
                    let (epoch, upto) = self.acks.remove(n % self.acks.len());
                    if ok {
                        self.outbox.handle_ack(now, epoch, upto);
                    }
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
            Step::MasterCrash(lands) => {
                // Writes in flight end unknown: all of them happened, or none.
                let in_flight: Vec<_> = self.in_flight.drain(..).collect();
                if lands {
                    for a in &in_flight {
                        self.land(a);
                    }
                }
                self.wire.clear();
                self.acks.clear();
                let cursors = match self.plant {
                    Plant::ForgetCursor => None,
                    _ => self.stored_cursor,
                };
                self.inbox =
                    Inbox::recover(InboxLimits::default(), cursors.map(|c| ("m".into(), c)));
            }
            Step::Complete(ending) => {
                if let Some(a) = self.in_flight.pop_front() {
                    let (outcome, lands) = ending.resolve(self.busy);
                    if lands {
                        self.land(&a);
                    }
                    match a {
                        InboxAction::Apply { node, cursor, .. } => {
                            self.inbox.handle_applied(&node, cursor, outcome)
                        }
                        InboxAction::Persist { node, cursor } => {
                            self.inbox.handle_persisted(&node, cursor, outcome)
                        }
                        InboxAction::Ack { .. } => {}
                    }
                }
            }
            Step::Busy(b) => self.busy = b,
        }
        self.drain_inbox()?;
        self.drain_outbox();
        Ok(())
    }

    /// Safety: the effects written, first occurrences in order, are a prefix of what was accepted.
    fn check_order(&self) -> Result<(), String> {
        let mut firsts = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for e in &self.effects {
            if seen.insert(*e) {
                firsts.push(*e);
            }
        }
        let accepted: Vec<u64> = self.accepted.iter().map(|e| e.1).collect();
        if !accepted.starts_with(&firsts) {
            return Err(format!("applied {firsts:?}, accepted {accepted:?}"));
        }
        Ok(())
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
            if self.outbox.len() > lim().events_max {
                return Err("outbox over its bound".into());
            }
            self.check_order()?;
        }
        // Liveness: heal everything and require the master to catch up.
        self.step(Step::Busy(false))?;
        self.step(Step::Persist)?;
        self.step(Step::Connect)?;
        for _ in 0..200 {
            if self.outbox.is_empty() {
                break;
            }
            while !self.wire.is_empty() {
                self.step(Step::Deliver(0, false))?;
                while !self.in_flight.is_empty() {
                    self.step(Step::Complete(Ending::Done))?;
                }
            }
            while !self.acks.is_empty() {
                self.step(Step::AckDeliver(0, true))?;
            }
            self.step(Step::Tick(1000))?;
        }
        let accepted: std::collections::BTreeSet<u64> = self.accepted.iter().map(|e| e.1).collect();
        let effects: std::collections::BTreeSet<u64> = self.effects.iter().copied().collect();
        if effects != accepted || !self.outbox.is_empty() {
            return Err(format!(
                "after healing: effects {effects:?}, accepted {accepted:?}, outbox holds {}",
                self.outbox.len()
            ));
        }
        self.check_order()
    }
}

/// A short history in which a crash and an unknown cursor write leave the master's memory ahead
/// of its durable cursor.
fn crash_history() -> Vec<Step> {
    use Step::*;
    vec![
        Connect,
        Push,
        Push,
        Persist,
        Deliver(0, false),
        Complete(Ending::Done),
        Complete(Ending::Done),
        // The cursor write: unknown, and it did not happen.
        Complete(Ending::Unknown(false)),
        // The minion resends; the master crashes with the cursor write in flight, which lands.
        Tick(200),
        Deliver(0, false),
        MasterCrash(true),
        Push,
        Persist,
        Tick(200),
        Deliver(0, false),
        Complete(Ending::Done),
        Complete(Ending::Done),
    ]
}

#[test]
fn the_checks_catch_an_ack_past_the_durable_cursor_and_a_reapply_below_it() {
    assert_eq!(World::new(Plant::None).run(crash_history()), Ok(()));
    let ack = World::new(Plant::AckApplied).run(crash_history());
    assert!(
        ack.as_ref()
            .is_err_and(|e| e.contains("durable cursor is at")),
        "{ack:?}"
    );
    let reapply = World::new(Plant::ForgetCursor).run(crash_history());
    assert!(
        reapply
            .as_ref()
            .is_err_and(|e| e.contains("covered by the durable cursor")),
        "{reapply:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Invariant 4: every accepted event is applied, in order, whatever the network, the minion,
    /// the master and its storage do; nothing a durable cursor covers is applied again; no ack
    /// passes the durable cursor; and bounds hold throughout.
    #[test]
    fn accepted_events_apply_exactly_once_in_order(steps in prop::collection::vec(step(), 0..200)) {
        let r = World::new(Plant::None).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
