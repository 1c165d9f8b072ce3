//! Flows on one frontend: which messages of each flow are durably stored, deduplication of resent
//! messages by sequence number, and completion with exact row and byte totals.
//!
//! # Protocol
//!
//! A client numbers the durable messages of a flow 0, 1, 2, ... (rows, file chunks, logs), then sends
//! a final status at sequence number N = the number of data messages before it. For each message:
//!
//! - new: the tracker emits [`FlowAction::Store`]; the shell writes it to the filestore (an idempotent
//!   write named by `(client, flow, seq)`), then calls [`FlowTracker::handle_stored`]; only then is the
//!   message acknowledged ([`FlowAction::Ack`]). invariant 1 (docs/architecture.md): what was acknowledged is stored.
//! - already stored: acknowledged again, not stored again (a resend after a lost ack).
//! - being stored: ignored; the ack follows the store.
//!
//! The final status is acknowledged only when the flow is complete (every sequence number below N is
//! stored). If this node does not know of them all, e.g. after a failover where another node stored
//! some, it asks the shell to list what storage holds ([`FlowAction::Audit`]). Totals come from what
//! is stored, each sequence number counted once, so they are exact whichever nodes stored the parts.

use crate::ids::{ClientId, FlowId};
use crate::seqset::{SeqSet, SeqSetError, Weight};
use crate::time::Monotonic;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Bounds of the tracker.
#[derive(Clone, Debug)]
pub struct FlowLimits {
    /// Flows tracked at once on this node.
    pub flows_max: usize,
    /// Stores in flight per flow (the client's in-flight window must not exceed this).
    pub stores_in_flight_max: usize,
    /// How far above the contiguous stored prefix a sequence number may be.
    pub seq_window: u64,
    /// Completed flows remembered so that late resends are acknowledged, not re-stored.
    pub completed_remembered_max: usize,
    /// A flow with no activity for this long and nothing in flight is forgotten (storage keeps it).
    pub idle_timeout_ms: u64,
    /// Bytes of data one flow may store (rows' JSON, chunk data, log text): its byte budget
    /// (`max_flow_bytes`).
    pub flow_bytes_max: u64,
    /// Uploads one flow may finish (`max_uploads_per_flow`).
    pub uploads_per_flow_max: u64,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            flows_max: 100_000,
            stores_in_flight_max: 64,
            seq_window: 256,
            completed_remembered_max: 100_000,
            idle_timeout_ms: 10 * 60 * 1000,
            flow_bytes_max: 4 << 30,
            uploads_per_flow_max: 10_000,
        }
    }
}

/// A flow on a client. Flows are keyed by both so a client can only write into its own flows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// The client (its id is derived from its key by the shell before it reaches here).
    pub client: ClientId,
    /// The flow.
    pub flow: FlowId,
}

/// How a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalState {
    /// The artifact ran to completion.
    Completed,
    /// The artifact failed; whatever it stored still counts.
    Error,
}

/// What one flow message carries, as far as the tracker cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Rows, a file chunk or logs.
    Data(Weight),
    /// The final status; its sequence number is the number of data messages before it.
    Final {
        /// How the flow ended.
        state: FinalState,
        /// The error, when `state` is `Error`.
        error: String,
    },
}

/// One message found in storage by an audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence number.
    pub seq: u64,
    /// What it is.
    pub payload: Payload,
}

/// A completed flow and its exact totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowOutcome {
    /// The flow.
    pub key: FlowKey,
    /// How it ended.
    pub state: FinalState,
    /// The error, if any.
    pub error: String,
    /// Rows stored, each message counted once.
    pub rows: u64,
    /// Upload bytes stored, each message counted once.
    pub uploaded_bytes: u64,
    /// Uploads finished (their last chunk stored), each counted once: what to reassemble.
    pub uploads: u64,
    /// Messages stored, the final status included: sequence numbers `0..messages`.
    pub messages: u64,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowAction {
    /// Write message `seq` durably (idempotently, named by key and seq), then call `handle_stored`.
    Store {
        /// The flow.
        key: FlowKey,
        /// The message.
        seq: u64,
    },
    /// Tell the client message `seq` is stored.
    Ack {
        /// The flow.
        key: FlowKey,
        /// The message.
        seq: u64,
    },
    /// Write, in place of message `seq`, a record that the server refused it (a log line carrying
    /// `reason`), durably and idempotently like a `Store`, then call `handle_stored`. The message
    /// itself is not stored; the refusal holds its number so that the flow can still complete.
    StoreRefusal {
        /// The flow.
        key: FlowKey,
        /// The refused message.
        seq: u64,
        /// Why, naming the limit.
        reason: String,
    },
    /// List the flow's stored messages, then call `handle_audit`.
    Audit {
        /// The flow.
        key: FlowKey,
    },
    /// The flow completed: record it (the master) or replicate it (a minion), then call
    /// [`FlowTracker::handle_recorded`]. The final status is acknowledged to the client only once
    /// the completion is recorded, so a completion is never lost with a node. May be emitted by more
    /// than one node for the same flow after a failover; consumers are idempotent.
    Completed(FlowOutcome),
}

/// Why a message was refused. Every refusal is determinate: nothing was stored, the client may resend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowError {
    /// The node tracks `flows_max` flows already.
    TooManyFlows {
        /// The bound.
        max: usize,
    },
    /// The flow has `stores_in_flight_max` stores in flight; resend after acks arrive.
    Busy {
        /// The bound.
        max: usize,
    },
    /// The sequence number is too far ahead of what is stored; resend later.
    OutOfWindow(SeqSetError),
    /// The message would take the flow past one of its budgets (or the flow went past one
    /// before). It is not stored: a refusal record takes its number ([`FlowAction::StoreRefusal`],
    /// acknowledged once stored, so the client moves on) and the flow will end in error.
    OverBudget(String),
    /// A message numbered after the flow's final status, or a second, different final status.
    AfterFinal {
        /// The message.
        seq: u64,
        /// The final status's sequence number.
        final_seq: u64,
    },
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::TooManyFlows { max } => {
                write!(f, "node is tracking {max} flows; retry later")
            }
            FlowError::Busy { max } => {
                write!(f, "{max} messages of this flow in flight; wait for acks")
            }
            FlowError::OutOfWindow(SeqSetError::OutOfWindow { seq, next, window }) => write!(
                f,
                "message {seq} is more than {window} ahead of the first missing message {next}"
            ),
            FlowError::OverBudget(reason) => write!(f, "{reason}; the message is not stored"),
            FlowError::AfterFinal { seq, final_seq } => {
                write!(
                    f,
                    "message {seq} comes after the final status at {final_seq}"
                )
            }
        }
    }
}

impl std::error::Error for FlowError {}

#[derive(Debug)]
struct Flow {
    stored: SeqSet,
    pending: BTreeMap<u64, Payload>,
    final_status: Option<(u64, FinalState, String)>,
    audit_in_flight: bool,
    last_activity: Monotonic,
    /// Why the server failed the flow (a budget it went past), if it did: the flow stores nothing
    /// more, and its outcome is an error naming this.
    refused: Option<String>,
}

impl Flow {
    /// What is stored plus what is being stored.
    fn admitted(&self) -> Weight {
        let mut w = self.stored.total();
        for p in self.pending.values() {
            if let Payload::Data(d) = p {
                w.add(*d);
            }
        }
        w
    }

    /// Why storing a message of weight `w` is refused, if it is.
    fn over_budget(&self, seq: u64, w: &Weight, limits: &FlowLimits) -> Option<String> {
        if let Some(r) = &self.refused {
            return Some(format!("the flow has already failed ({r})"));
        }
        let mut total = self.admitted();
        total.add(*w);
        if total.data_bytes > limits.flow_bytes_max {
            return Some(format!(
                "message {seq} would take the flow to {} bytes of data, over max_flow_bytes ({})",
                total.data_bytes, limits.flow_bytes_max
            ));
        }
        if total.uploads > limits.uploads_per_flow_max {
            return Some(format!(
                "message {seq} would finish upload {} of the flow, over max_uploads_per_flow ({})",
                total.uploads, limits.uploads_per_flow_max
            ));
        }
        None
    }
}

/// The flows of one node.
#[derive(Debug)]
pub struct FlowTracker {
    limits: FlowLimits,
    flows: BTreeMap<FlowKey, Flow>,
    /// Completed flows: (final sequence number, completion recorded).
    completed: BTreeMap<FlowKey, (u64, bool)>,
    completed_order: VecDeque<FlowKey>,
    actions: VecDeque<FlowAction>,
    next_sweep: Option<Monotonic>,
}

impl FlowTracker {
    /// An empty tracker.
    pub fn new(limits: FlowLimits) -> FlowTracker {
        assert!(limits.flows_max > 0 && limits.stores_in_flight_max > 0);
        assert!(limits.seq_window >= limits.stores_in_flight_max as u64);
        FlowTracker {
            limits,
            flows: BTreeMap::new(),
            completed: BTreeMap::new(),
            completed_order: VecDeque::new(),
            actions: VecDeque::new(),
            next_sweep: None,
        }
    }

    /// The limits in force (the shell tells clients the in-flight window).
    pub fn limits(&self) -> &FlowLimits {
        &self.limits
    }

    /// Flows currently tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True if no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A client sent message `seq` of a flow.
    pub fn handle_message(
        &mut self,
        now: Monotonic,
        key: FlowKey,
        seq: u64,
        payload: Payload,
    ) -> Result<(), FlowError> {
        if let Some(&(final_seq, recorded)) = self.completed.get(&key) {
            return if seq < final_seq || (seq == final_seq && recorded) {
                self.actions.push_back(FlowAction::Ack { key, seq });
                Ok(())
            } else if seq == final_seq {
                Ok(()) // Acknowledged once the completion is recorded.
            } else {
                Err(FlowError::AfterFinal { seq, final_seq })
            };
        }
        if !self.flows.contains_key(&key) && self.flows.len() >= self.limits.flows_max {
            return Err(FlowError::TooManyFlows {
                max: self.limits.flows_max,
            });
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now.plus_ms(self.limits.idle_timeout_ms));
        }
        let limits = &self.limits;
        let flow = self.flows.entry(key.clone()).or_insert_with(|| Flow {
            stored: SeqSet::new(limits.seq_window),
            pending: BTreeMap::new(),
            final_status: None,
            audit_in_flight: false,
            last_activity: now,
            refused: None,
        });
        flow.last_activity = now;
        if let Some((final_seq, _, _)) = &flow.final_status
            && seq > *final_seq
        {
            return Err(FlowError::AfterFinal {
                seq,
                final_seq: *final_seq,
            });
        }
        if let Payload::Final { .. } = payload {
            let beyond = flow
                .pending
                .keys()
                .next_back()
                .copied()
                .filter(|s| *s > seq);
            if let Some(s) = beyond {
                return Err(FlowError::AfterFinal {
                    seq: s,
                    final_seq: seq,
                });
            }
        }
        if flow.pending.contains_key(&seq) {
            return Ok(());
        }
        match flow.stored.check(seq) {
            Ok(false) => {
                // Stored already: a resend whose ack was lost. The final's ack waits for completion.
                let is_final = matches!(flow.final_status, Some((f, _, _)) if f == seq);
                if is_final {
                    // The client still waits for completion: look again at what storage holds.
                    self.check_complete(&key, true);
                } else {
                    self.actions.push_back(FlowAction::Ack { key, seq });
                }
                return Ok(());
            }
            Ok(true) => {}
            Err(e) => {
                // Perhaps another node stored the gap: learn what storage holds, then accept resends.
                if !flow.audit_in_flight {
                    flow.audit_in_flight = true;
                    self.actions.push_back(FlowAction::Audit { key });
                }
                return Err(FlowError::OutOfWindow(e));
            }
        }
        if flow.pending.len() >= self.limits.stores_in_flight_max {
            return Err(FlowError::Busy {
                max: self.limits.stores_in_flight_max,
            });
        }
        if let Payload::Data(w) = &payload
            && let Some(reason) = flow.over_budget(seq, w, &self.limits)
        {
            // The writer's fault: this flow fails, the node goes on (its records stay bounded).
            flow.refused.get_or_insert_with(|| reason.clone());
            flow.pending.insert(seq, Payload::Data(Weight::default()));
            self.actions.push_back(FlowAction::StoreRefusal {
                key,
                seq,
                reason: reason.clone(),
            });
            return Err(FlowError::OverBudget(reason));
        }
        flow.pending.insert(seq, payload);
        self.actions.push_back(FlowAction::Store { key, seq });
        Ok(())
    }

    /// The shell finished (or failed) storing message `seq`.
    pub fn handle_stored(&mut self, now: Monotonic, key: &FlowKey, seq: u64, ok: bool) {
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        let Some(payload) = flow.pending.remove(&seq) else {
            return;
        };
        flow.last_activity = now;
        if !ok {
            return; // Not acknowledged: the client resends it.
        }
        Self::record(flow, seq, &payload);
        let is_final = matches!(payload, Payload::Final { .. });
        if !is_final {
            self.actions.push_back(FlowAction::Ack {
                key: key.clone(),
                seq,
            });
        }
        // Audit once when the final lands incomplete; later stores just fill the gaps.
        self.check_complete(key, is_final);
    }

    /// The shell listed what storage holds for the flow (`None`: the listing failed).
    pub fn handle_audit(
        &mut self,
        now: Monotonic,
        key: &FlowKey,
        found: Option<Vec<StoredMessage>>,
    ) {
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        flow.audit_in_flight = false;
        flow.last_activity = now;
        let Some(mut found) = found else { return };
        found.sort_by_key(|m| m.seq);
        for m in &found {
            if flow.pending.contains_key(&m.seq) {
                continue; // Our own store will record it.
            }
            Self::record(flow, m.seq, &m.payload);
        }
        // No new audit from here: what is still missing comes from client resends.
        self.check_complete(key, false);
    }

    fn record(flow: &mut Flow, seq: u64, payload: &Payload) {
        let weight = match payload {
            Payload::Data(w) => *w,
            Payload::Final { state, error } => {
                if flow.final_status.is_none() {
                    flow.final_status = Some((seq, *state, error.clone()));
                }
                Weight::default()
            }
        };
        // Out of window only for a hostile client's storage; such a message is not counted.
        let _ = flow.stored.insert(seq, weight);
    }

    fn check_complete(&mut self, key: &FlowKey, may_audit: bool) {
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        let Some((final_seq, state, error)) = flow.final_status.clone() else {
            return;
        };
        if flow.stored.contiguous_upto() <= final_seq {
            // Gaps that our own in-flight stores will fill need no audit. (Bounded: the final
            // passed the window check, so this scans at most `seq_window` numbers.)
            let gap_elsewhere = (flow.stored.contiguous_upto()..final_seq)
                .any(|q| !flow.stored.contains(q) && !flow.pending.contains_key(&q));
            if may_audit && gap_elsewhere && !flow.audit_in_flight {
                flow.audit_in_flight = true;
                self.actions
                    .push_back(FlowAction::Audit { key: key.clone() });
            }
            return;
        }
        if !flow.pending.is_empty() {
            return;
        }
        let total = flow.stored.total();
        let (state, error) = match &flow.refused {
            None => (state, error),
            Some(why) if error.is_empty() => {
                (FinalState::Error, format!("refused by the server: {why}"))
            }
            Some(why) => (
                FinalState::Error,
                format!("refused by the server: {why}; the client reported: {error}"),
            ),
        };
        self.flows.remove(key);
        self.remember_completed(key.clone(), final_seq);
        self.actions.push_back(FlowAction::Completed(FlowOutcome {
            key: key.clone(),
            state,
            error,
            rows: total.rows,
            uploaded_bytes: total.bytes,
            uploads: total.uploads,
            messages: final_seq + 1,
        }));
    }

    /// The shell recorded (`ok`) a [`FlowAction::Completed`], or could not: on success the final
    /// status is acknowledged; on failure the completion is forgotten, so the client's resend of the
    /// final status completes the flow again (from storage, by audit).
    pub fn handle_recorded(&mut self, key: &FlowKey, ok: bool) {
        let Some(done) = self.completed.get_mut(key) else {
            return; // Forgotten meanwhile (bounded memory): the client resends, it completes again.
        };
        if ok {
            done.1 = true;
            self.actions.push_back(FlowAction::Ack {
                key: key.clone(),
                seq: done.0,
            });
        } else {
            self.completed.remove(key);
        }
    }

    fn remember_completed(&mut self, key: FlowKey, final_seq: u64) {
        if self
            .completed
            .insert(key.clone(), (final_seq, false))
            .is_none()
        {
            self.completed_order.push_back(key);
        }
        while self.completed_order.len() > self.limits.completed_remembered_max {
            if let Some(old) = self.completed_order.pop_front() {
                self.completed.remove(&old);
            }
        }
    }

    /// Forgets idle flows (storage keeps their messages; an audit relearns them).
    pub fn handle_timeout(&mut self, now: Monotonic) {
        if self.next_sweep.is_none_or(|t| now < t) {
            return;
        }
        let idle = self.limits.idle_timeout_ms;
        self.flows.retain(|_, f| {
            !(f.pending.is_empty() && !f.audit_in_flight && now.since_ms(f.last_activity) >= idle)
        });
        self.next_sweep = (!self.flows.is_empty()).then(|| now.plus_ms(idle / 2 + 1));
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<FlowAction> {
        self.actions.pop_front()
    }

    /// When to call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        self.next_sweep
    }
}

#[cfg(test)]
mod tests;
