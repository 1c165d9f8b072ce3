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
//!   number is the high-water mark + 1, skips what is at or below it, and stops at a gap. The shell
//!   persists the cursor together with the applied effects, and acknowledges only after that.
//! - A minion whose persisted outbox is lost starts a new, higher epoch; the master resets its cursor
//!   for that minion. Events of an older epoch are refused.

use crate::time::Timestamp;
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
    ack_deadline: Option<Timestamp>,
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

    /// Accepts an event; it counts as accepted once `handle_persisted` covers its number.
    pub fn push(&mut self, now: Timestamp, event: E) -> Result<u64, OutboxError> {
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
    pub fn handle_persisted(&mut self, now: Timestamp, upto: u64) {
        debug_assert!(upto < self.next_seq);
        self.persisted_upto = self.persisted_upto.max(upto.min(self.next_seq - 1));
        self.send_more(now);
    }

    /// A stream to the master is up: resend everything after the last ack.
    pub fn handle_connected(&mut self, now: Timestamp) {
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
    pub fn handle_stale_epoch(&mut self, now: Timestamp, current: u64) -> Option<u64> {
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
    pub fn handle_disconnected(&mut self, _now: Timestamp) {
        self.connected = false;
        self.ack_deadline = None;
    }

    /// The master applied everything up to `upto` in `epoch`.
    pub fn handle_ack(&mut self, now: Timestamp, epoch: u64, upto: u64) {
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
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.ack_deadline.is_some_and(|t| now >= t) {
            self.sent_upto = self.acked;
            self.ack_deadline = None;
            self.send_more(now);
        }
    }

    fn send_more(&mut self, now: Timestamp) {
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
    pub fn poll_timeout(&self) -> Option<Timestamp> {
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
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits { minions_max: 1024 }
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

/// What the master's shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxAction<E> {
    /// Apply the event and persist `cursor` with its effects (one journal record).
    Apply {
        /// The minion.
        node: String,
        /// The cursor after applying.
        cursor: Cursor,
        /// The event.
        event: E,
    },
    /// Once every preceding `Apply` is durable, acknowledge `upto` to the minion.
    Ack {
        /// The minion.
        node: String,
        /// Its epoch.
        epoch: u64,
        /// Everything up to here is applied.
        upto: u64,
    },
}

/// The master's side.
#[derive(Debug)]
pub struct Inbox<E> {
    limits: InboxLimits,
    cursors: BTreeMap<String, Cursor>,
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
            cursors: cursors.into_iter().collect(),
            actions: VecDeque::new(),
        }
    }

    /// A minion's cursor.
    pub fn cursor(&self, node: &str) -> Option<Cursor> {
        self.cursors.get(node).copied()
    }

    /// A batch of events arrived from `node`.
    pub fn handle_batch(
        &mut self,
        _now: Timestamp,
        node: &str,
        epoch: u64,
        events: Vec<(u64, E)>,
    ) -> Result<(), InboxError> {
        if !self.cursors.contains_key(node) && self.cursors.len() >= self.limits.minions_max {
            return Err(InboxError::TooManyMinions {
                max: self.limits.minions_max,
            });
        }
        let cursor = self.cursors.entry(node.to_owned()).or_default();
        if epoch < cursor.epoch {
            return Err(InboxError::StaleEpoch {
                got: epoch,
                current: cursor.epoch,
            });
        }
        if epoch > cursor.epoch {
            *cursor = Cursor { epoch, hwm: 0 };
        }
        for (seq, event) in events {
            if seq <= cursor.hwm {
                continue; // Applied before: a resend.
            }
            if seq != cursor.hwm + 1 {
                break; // A gap: the minion resends from our ack.
            }
            cursor.hwm = seq;
            self.actions.push_back(InboxAction::Apply {
                node: node.to_owned(),
                cursor: *cursor,
                event,
            });
        }
        self.actions.push_back(InboxAction::Ack {
            node: node.to_owned(),
            epoch,
            upto: cursor.hwm,
        });
        Ok(())
    }

    /// The shell could not apply the event of an `Apply` whose cursor is `cursor` (its datastore
    /// refused as busy, a read failed): nothing of it may count as applied. The minion's cursor goes
    /// back to just before it, its later queued actions are dropped, and an `Ack` follows for what
    /// was applied only; the minion, hearing no ack for the rest, resends it (its resend timeout)
    /// and it is applied then. Back-pressure on the master thus delays replication, never loses or
    /// reorders an event, and never stops the node.
    pub fn handle_not_applied(&mut self, node: &str, cursor: Cursor) {
        let Some(c) = self.cursors.get_mut(node) else {
            return;
        };
        if c.epoch != cursor.epoch || cursor.hwm == 0 || c.hwm < cursor.hwm {
            return; // Not the event in hand (a later epoch reset the cursor meanwhile).
        }
        c.hwm = cursor.hwm - 1;
        let c = *c;
        // Every action still queued for this node comes after the failed one: none may happen.
        self.actions.retain(|a| match a {
            InboxAction::Apply { node: n, .. } | InboxAction::Ack { node: n, .. } => n != node,
        });
        self.actions.push_back(InboxAction::Ack {
            node: node.to_owned(),
            epoch: c.epoch,
            upto: c.hwm,
        });
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<InboxAction<E>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests;
