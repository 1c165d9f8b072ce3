//! Replication between a minion and the master: the minion's [`Outbox`] and the master's [`Inbox`].
//!
//! # Guarantee (invariant 4 (docs/architecture.md))
//!
//! An event the minion accepted (persisted on its local disk) is applied by the master exactly once
//! and in the minion's order, across lost, duplicated and reordered messages, reconnects, a minion
//! restart and a master restart.
//!
//! - The outbox numbers events 1, 2, 3, ... within an *epoch*. It sends only persisted events (so a
//!   restarted minion never reuses a number the master has seen) and keeps them until acknowledged.
//!   On reconnect, or when acks stall, it resends from the last acknowledged number.
//! - The inbox keeps one cursor (epoch, high-water mark) per minion. It applies an event only when its
//!   number is the high-water mark + 1, skips what is at or below it, and stops at a gap. It asks
//!   for one event's effects at a time and for the next only once they are durable; then for the
//!   cursor to be written; and it acknowledges only what a cursor certainly written covers. A crash
//!   between an event's effects and the cursor applies the event again: effects are idempotent, and
//!   nothing at or below a durable cursor is ever applied again.
//! - A minion whose persisted outbox is lost starts a new, higher epoch; the master resets its cursor
//!   for that minion. Events of an older epoch are refused.

use crate::time::Monotonic;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Bounds of an outbox.
#[derive(Clone, Debug)]
pub struct OutboxLimits {
    /// Events held (accepted and not yet acknowledged). At the bound, `push` fails: back-pressure.
    pub events_max: usize,
    /// Events sent and not yet acknowledged.
    pub in_flight_max: usize,
    /// Events per sent batch.
    pub batch_max: usize,
    /// With events in flight and no ack for this long, resend from the last ack.
    pub resend_after_ms: u64,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            events_max: 1_000_000,
            in_flight_max: 4096,
            batch_max: 256,
            resend_after_ms: 5000,
        }
    }
}

/// Why an event was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxError {
    /// The outbox holds `events_max` events; nothing was accepted, retry after the master catches up.
    Full {
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::Full { max } => {
                write!(
                    f,
                    "replication outbox holds {max} unacknowledged events; master unreachable?"
                )
            }
        }
    }
}

impl std::error::Error for OutboxError {}

/// What the minion's shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxAction<E> {
    /// Append the event to the local outbox file and sync, then call `handle_persisted`.
    Persist {
        /// Its number.
        seq: u64,
        /// The event.
        event: E,
    },
    /// Send these events (ascending, consecutive) to the master.
    Send {
        /// The outbox's epoch.
        epoch: u64,
        /// `(seq, event)` pairs.
        events: Vec<(u64, E)>,
    },
    /// Everything up to `upto` is applied by the master: persist that and drop those events.
    Truncate {
        /// The new acknowledged mark.
        upto: u64,
    },
}

/// The minion's side.
#[derive(Debug)]
pub struct Outbox<E> {
    limits: OutboxLimits,
    epoch: u64,
    acked: u64,
    persisted_upto: u64,
    next_seq: u64,
    events: VecDeque<(u64, E)>,
    sent_upto: u64,
    connected: bool,
    ack_deadline: Option<Monotonic>,
    actions: VecDeque<OutboxAction<E>>,
}

impl<E: Clone> Outbox<E> {
    /// A fresh outbox (first start, or a new epoch after the persisted one was lost).
    pub fn new(limits: OutboxLimits, epoch: u64) -> Outbox<E> {
        Outbox::recover(limits, epoch, 0, Vec::new())
    }

    /// Rebuilds the outbox from what was persisted: the acknowledged mark and the events after it.
    pub fn recover(
        limits: OutboxLimits,
        epoch: u64,
        acked: u64,
        events: Vec<(u64, E)>,
    ) -> Outbox<E> {
        assert!(limits.events_max > 0 && limits.in_flight_max > 0 && limits.batch_max > 0);
        let events: VecDeque<(u64, E)> = events.into_iter().filter(|(s, _)| *s > acked).collect();
        for (i, (seq, _)) in events.iter().enumerate() {
            assert_eq!(
                *seq,
                acked + 1 + i as u64,
                "persisted outbox is not consecutive"
            );
        }
        let last = acked + events.len() as u64;
        Outbox {
            limits,
            epoch,
            acked,
            persisted_upto: last,
            next_seq: last + 1,
            events,
            sent_upto: acked,
            connected: false,
            ack_deadline: None,
            actions: VecDeque::new(),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Events accepted and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True if the master has applied everything accepted.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The highest number the master acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The newest event's number (0: none yet in this epoch).
    pub fn head(&self) -> u64 {
        self.next_seq - 1
    }

    /// Accepts an event; it counts as accepted once `handle_persisted` covers its number.
    pub fn push(&mut self, now: Monotonic, event: E) -> Result<u64, OutboxError> {
        if self.events.len() >= self.limits.events_max {
            return Err(OutboxError::Full {
                max: self.limits.events_max,
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.events.push_back((seq, event.clone()));
        self.actions.push_back(OutboxAction::Persist { seq, event });
        self.send_more(now);
        Ok(seq)
    }

    /// Everything up to `upto` is durable on the local disk.
    pub fn handle_persisted(&mut self, now: Monotonic, upto: u64) {
        debug_assert!(upto < self.next_seq);
        self.persisted_upto = self.persisted_upto.max(upto.min(self.next_seq - 1));
        self.send_more(now);
    }

    /// A stream to the master is up: resend everything after the last ack.
    pub fn handle_connected(&mut self, now: Monotonic) {
        self.connected = true;
        self.sent_upto = self.acked;
        self.ack_deadline = None;
        self.send_more(now);
    }

    /// The master refused this outbox's epoch as older than `current`, the last epoch it applied
    /// from this minion. That happens when the outbox was recreated (the minion's local disk was
    /// lost) on a machine whose wall clock, where a new epoch comes from, is behind the one that
    /// made `current`: without this the minion's events would be refused forever. If the master
    /// has acknowledged nothing of this epoch, the outbox moves to `current + 1` and sends every
    /// event again from its first; returns the new epoch, which the shell persists before it sends
    /// anything (the epoch never goes backwards, whatever the clock does). Otherwise (the master
    /// acknowledged this epoch, so another process speaks with this minion's name) `None`.
    pub fn handle_stale_epoch(&mut self, now: Monotonic, current: u64) -> Option<u64> {
        if current < self.epoch || self.acked > 0 {
            return None;
        }
        self.epoch = current.checked_add(1)?;
        self.actions
            .retain(|a| !matches!(a, OutboxAction::Send { .. }));
        if self.connected {
            self.handle_connected(now);
        }
        Some(self.epoch)
    }

    /// The stream to the master is gone.
    pub fn handle_disconnected(&mut self, _now: Monotonic) {
        self.connected = false;
        self.ack_deadline = None;
    }

    /// The master applied everything up to `upto` in `epoch`.
    pub fn handle_ack(&mut self, now: Monotonic, epoch: u64, upto: u64) {
        if epoch != self.epoch || upto <= self.acked {
            return;
        }
        // The master can only acknowledge what it was sent, and only persisted events are sent.
        let upto = upto.min(self.persisted_upto);
        while self.events.front().is_some_and(|(s, _)| *s <= upto) {
            self.events.pop_front();
        }
        self.acked = upto;
        self.sent_upto = self.sent_upto.max(upto);
        self.ack_deadline = None;
        self.actions.push_back(OutboxAction::Truncate { upto });
        self.send_more(now);
    }

    /// Resends from the last ack if acks stalled.
    pub fn handle_timeout(&mut self, now: Monotonic) {
        if self.ack_deadline.is_some_and(|t| now >= t) {
            self.sent_upto = self.acked;
            self.ack_deadline = None;
            self.send_more(now);
        }
    }

    fn send_more(&mut self, now: Monotonic) {
        if !self.connected {
            return;
        }
        loop {
            let in_flight = (self.sent_upto - self.acked) as usize;
            if in_flight >= self.limits.in_flight_max || self.sent_upto >= self.persisted_upto {
                break;
            }
            let room = (self.limits.in_flight_max - in_flight).min(self.limits.batch_max);
            let first = (self.sent_upto - self.acked) as usize;
            let last_allowed = self.persisted_upto - self.acked;
            let n = room.min(last_allowed as usize - first);
            let events: Vec<(u64, E)> = self.events.range(first..first + n).cloned().collect();
            debug_assert_eq!(events.first().map(|e| e.0), Some(self.sent_upto + 1));
            self.sent_upto += n as u64;
            self.actions.push_back(OutboxAction::Send {
                epoch: self.epoch,
                events,
            });
        }
        if self.sent_upto > self.acked && self.ack_deadline.is_none() {
            self.ack_deadline = Some(now.plus_ms(self.limits.resend_after_ms));
        }
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<OutboxAction<E>> {
        self.actions.pop_front()
    }

    /// When to call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        self.ack_deadline
    }
}

/// One minion's position in the master's inbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The minion's current epoch.
    pub epoch: u64,
    /// Every event up to this number is applied.
    pub hwm: u64,
}

/// Bounds of the inbox.
#[derive(Clone, Debug)]
pub struct InboxLimits {
    /// Minions tracked.
    pub minions_max: usize,
    /// Events accepted from one minion and waiting to be applied. Beyond it the rest of a batch is
    /// not taken: it is not acknowledged, and the minion sends it again.
    pub queued_max: usize,
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits {
            minions_max: 1024,
            queued_max: 4096,
        }
    }
}

/// Why a batch was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxError {
    /// The batch is from an epoch older than the minion's current one.
    StaleEpoch {
        /// The batch's epoch.
        got: u64,
        /// The current epoch.
        current: u64,
    },
    /// `minions_max` minions are known already.
    TooManyMinions {
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for InboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InboxError::StaleEpoch { got, current } => {
                write!(
                    f,
                    "events from epoch {got}, but the minion is at epoch {current}"
                )
            }
            InboxError::TooManyMinions { max } => {
                write!(f, "{max} minions known; refusing another")
            }
        }
    }
}

impl std::error::Error for InboxError {}

pub use crate::node::Outcome;

/// What the master's shell must do, in order. Each result comes back as an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxAction<E> {
    /// Apply the event — its effects durable and idempotent (a crash before the cursor covers it
    /// applies it again) — then call [`Inbox::handle_applied`] with this cursor. One `Apply` per
    /// minion is outstanding at a time: the next follows its result.
    Apply {
        /// The minion.
        node: String,
        /// The cursor after applying.
        cursor: Cursor,
        /// The event.
        event: E,
    },
    /// Every event up to `cursor` is applied: write the cursor, then call
    /// [`Inbox::handle_persisted`]. One per minion is outstanding at a time.
    Persist {
        /// The minion.
        node: String,
        /// The cursor to write.
        cursor: Cursor,
    },
    /// Acknowledge `upto` to the minion: never beyond the cursor known durable.
    Ack {
        /// The minion.
        node: String,
        /// Its epoch.
        epoch: u64,
        /// Everything up to here is applied and the cursor saying so is durable.
        upto: u64,
    },
}

/// One minion, as the inbox sees it.
#[derive(Debug)]
struct Minion<E> {
    /// Every event up to here is applied (its effects durable).
    applied: Cursor,
    /// The cursor last written successfully (or recovered): acknowledgements never pass it.
    durable: Cursor,
    /// Accepted events after `applied` (and after the one in flight), contiguous, in order.
    queue: VecDeque<(u64, E)>,
    /// The `Apply` outstanding.
    applying: Option<Cursor>,
    /// The `Persist` outstanding.
    persisting: Option<Cursor>,
    /// A batch arrived since the last `Ack`: one is owed once the work in hand is done.
    ack_due: bool,
    /// The last cursor write failed: no other until the next batch (no retry loop on a volume that
    /// refuses; the minion's resend brings the next batch).
    persist_failed: bool,
}

impl<E> Minion<E> {
    fn at(c: Cursor) -> Minion<E> {
        Minion {
            applied: c,
            durable: c,
            queue: VecDeque::new(),
            applying: None,
            persisting: None,
            ack_due: false,
            persist_failed: false,
        }
    }

    /// The last event accepted (applied, in flight or queued).
    fn accepted_hwm(&self) -> u64 {
        self.queue
            .back()
            .map(|(s, _)| *s)
            .or(self.applying.map(|c| c.hwm))
            .unwrap_or(self.applied.hwm)
    }
}

/// The master's side: applies each minion's events in order, one at a time, persists the minion's
/// cursor after the effects it covers, and acknowledges no further than the durable cursor.
#[derive(Debug)]
pub struct Inbox<E> {
    limits: InboxLimits,
    minions: BTreeMap<String, Minion<E>>,
    actions: VecDeque<InboxAction<E>>,
}

impl<E> Inbox<E> {
    /// Rebuilds the inbox from persisted cursors (empty on first start).
    pub fn recover(
        limits: InboxLimits,
        cursors: impl IntoIterator<Item = (String, Cursor)>,
    ) -> Inbox<E> {
        Inbox {
            limits,
            minions: cursors
                .into_iter()
                .map(|(n, c)| (n, Minion::at(c)))
                .collect(),
            actions: VecDeque::new(),
        }
    }

    /// How far a minion's events are applied.
    pub fn cursor(&self, node: &str) -> Option<Cursor> {
        self.minions.get(node).map(|m| m.applied)
    }

    /// A minion's cursor as last made durable.
    pub fn durable(&self, node: &str) -> Option<Cursor> {
        self.minions.get(node).map(|m| m.durable)
    }

    /// Every minion known, with its durable cursor.
    pub fn minions(&self) -> impl Iterator<Item = (&str, Cursor)> {
        self.minions.iter().map(|(n, m)| (n.as_str(), m.durable))
    }

    /// A batch of events arrived from `node`.
    pub fn handle_batch(
        &mut self,
        _now: Monotonic,
        node: &str,
        epoch: u64,
        events: Vec<(u64, E)>,
    ) -> Result<(), InboxError> {
        if !self.minions.contains_key(node) && self.minions.len() >= self.limits.minions_max {
            return Err(InboxError::TooManyMinions {
                max: self.limits.minions_max,
            });
        }
        let m = self
            .minions
            .entry(node.to_owned())
            .or_insert_with(|| Minion::at(Cursor::default()));
        if epoch < m.applied.epoch {
            return Err(InboxError::StaleEpoch {
                got: epoch,
                current: m.applied.epoch,
            });
        }
        if epoch > m.applied.epoch {
            // A minion that lost its outbox: its numbering starts again. What is in flight of the
            // old epoch reports back and is ignored; nothing of the new one is durable yet.
            let c = Cursor { epoch, hwm: 0 };
            m.applied = c;
            m.durable = c;
            m.queue.clear();
            m.applying = None;
        }
        let mut next = m.accepted_hwm() + 1;
        for (seq, event) in events {
            if seq < next {
                continue; // Applied or queued before: a resend.
            }
            if seq != next || m.queue.len() >= self.limits.queued_max {
                break; // A gap, or the queue is full: the minion resends from our ack.
            }
            m.queue.push_back((seq, event));
            next += 1;
        }
        m.ack_due = true;
        m.persist_failed = false;
        self.pump(node);
        Ok(())
    }

    /// The result of the `Apply` that carried `cursor`. If it was not done (refused, or maybe
    /// done), nothing of it may count as applied: the events queued behind it are dropped and only
    /// what was applied before it is acknowledged; the minion, hearing no ack for the rest, sends
    /// them again and they are applied then (an event maybe applied is applied again:
    /// effects are idempotent). Back-pressure on the master thus delays replication, never loses
    /// or reorders an event, and never stops the node.
    pub fn handle_applied(&mut self, node: &str, cursor: Cursor, outcome: Outcome) {
        let Some(m) = self.minions.get_mut(node) else {
            return;
        };
        if m.applying != Some(cursor) {
            return; // Of an epoch since replaced.
        }
        m.applying = None;
        if outcome == Outcome::Done {
            m.applied = cursor;
        } else {
            m.queue.clear();
            m.ack_due = true;
        }
        self.pump(node);
    }

    /// The result of the `Persist` that carried `cursor`. Only a cursor certainly written counts
    /// as durable; one maybe written is not relied on (a restart that finds it re-applies nothing
    /// it covers, and one that does not re-applies events whose effects are idempotent).
    pub fn handle_persisted(&mut self, node: &str, cursor: Cursor, outcome: Outcome) {
        let Some(m) = self.minions.get_mut(node) else {
            return;
        };
        if m.persisting != Some(cursor) {
            return;
        }
        m.persisting = None;
        if outcome == Outcome::Done {
            if cursor.epoch == m.applied.epoch && cursor.hwm > m.durable.hwm {
                m.durable = cursor;
            }
        } else {
            m.persist_failed = true;
        }
        self.pump(node);
    }

    /// Queues the minion's next action: apply the next event; once none is left, persist the
    /// cursor; once that is done, acknowledge.
    fn pump(&mut self, node: &str) {
        let Some(m) = self.minions.get_mut(node) else {
            return;
        };
        if m.applying.is_some() || m.persisting.is_some() {
            return;
        }
        if let Some((seq, event)) = m.queue.pop_front() {
            let cursor = Cursor {
                epoch: m.applied.epoch,
                hwm: seq,
            };
            m.applying = Some(cursor);
            self.actions.push_back(InboxAction::Apply {
                node: node.to_owned(),
                cursor,
                event,
            });
            return;
        }
        if m.applied.hwm > m.durable.hwm && !m.persist_failed {
            m.persisting = Some(m.applied);
            self.actions.push_back(InboxAction::Persist {
                node: node.to_owned(),
                cursor: m.applied,
            });
            return;
        }
        if m.ack_due {
            m.ack_due = false;
            self.actions.push_back(InboxAction::Ack {
                node: node.to_owned(),
                epoch: m.durable.epoch,
                upto: m.durable.hwm,
            });
        }
    }

    /// The next action for the shell. Each input queues at most one.
    pub fn poll_action(&mut self) -> Option<InboxAction<E>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests;
