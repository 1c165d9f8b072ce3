//! A node's intake of client flows: store, acknowledge twice, complete, record.
//!
//! Every node — master or minion — takes flow messages from the clients connected to it. This
//! machine owns what happens to them after the [`FlowTracker`]'s per-flow rules, so the shell only
//! performs effects:
//!
//! # Rules (docs/architecture.md, invariant 1 and "Visibility order")
//!
//! - **Acknowledged twice**: once stored (`Ack{settled: false}`: durable in the node's write-behind
//!   buffer), and again once settled (`Ack{settled: true}`: on the shared volume). Acks to settle
//!   wait in a queue of at most `settle_queue_max` (beyond it one is dropped: the client resends the
//!   message and its re-acknowledgement is queued again) and are settled a batch of at most
//!   `settle_batch_max` at a time, one wait (`Settle`) in flight per node.
//! - **A completion is recorded only once its messages are on the shared volume** (`Locate`: wait
//!   for the buffer, then find the runs that hold them), where the master, the API and other
//!   frontends read.
//! - **Recorded where the role says**: a master records it itself (the [`Completions`] machine:
//!   record, uploads marker, hunt outcome); a minion replicates it to the master (`Replicate`) and
//!   waits for the master to have applied it. The master takes minions' replicated completions
//!   through the same machine (`handle_completion`).
//! - **The final status is acknowledged only once its completion is recorded**; a completion not
//!   recorded (messages not located, write refused or maybe done, replication lost) is forgotten by
//!   the tracker, and the client's resend of its final status completes the flow again.

use super::Outcome;
use super::Token;
use super::completions::{
    CompletionAction, CompletionLimits, Completions, FlowRecord, RecordStep, Recorded,
};
use crate::events::EventKey;
use crate::flows::{
    FlowAction, FlowError, FlowKey, FlowLimits, FlowOutcome, FlowTracker, Payload, StoredMessage,
};
use crate::time::{Monotonic, Timestamp};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Acknowledgements waiting to be sent again as settled, per node. Beyond it one is dropped: the
/// client resends the message after 2 s and its re-acknowledgement is queued again (so a hung volume
/// costs this much memory at most, not one waiter per resend).
pub const SETTLE_QUEUE_MAX: usize = 65_536;
/// Completions the master records at once (each a record read and write, then its hunt's
/// outcome); beyond it a completion is refused as busy and comes again with its resend.
pub const COMPLETIONS_IN_FLIGHT_MAX: usize = 1_024;
/// Acknowledgements settled by one wait for the write-behind buffer.
pub const SETTLE_BATCH_MAX: usize = 4_096;

/// Bounds of the intake.
#[derive(Clone, Debug)]
pub struct IntakeLimits {
    /// The flow tracker's.
    pub flows: FlowLimits,
    /// Acks waiting to be settled.
    pub settle_queue_max: usize,
    /// Acks settled by one wait.
    pub settle_batch_max: usize,
    /// The master's completions machine's.
    pub completions: CompletionLimits,
    /// Event batches being stored at once; beyond it one is refused as busy (the agent resends it
    /// after 2 s), so a flood of events waits on the agents, not in the node's memory.
    pub event_stores_max: usize,
}

/// An event batch was not taken: `max` batches are being stored (the agent resends it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventsBusy {
    /// The bound (`IntakeLimits::event_stores_max`).
    pub max: usize,
}

impl std::fmt::Display for EventsBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} event batches are being stored; send it again later",
            self.max
        )
    }
}

/// An acknowledgement waiting to be sent again as settled.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ToSettle {
    Flow(FlowKey, u64),
    Event(EventKey),
}

/// Where a completion reported to the master came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin<O> {
    /// The master's own tracker.
    Local,
    /// A minion's replicated completion, named by what the shell gave `handle_completion`.
    Replicated(O),
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntakeAction<Run, O> {
    /// Store message `seq` (the bytes the shell holds for it), then call `handle_stored`.
    Store {
        /// The flow.
        key: FlowKey,
        /// The message.
        seq: u64,
    },
    /// Store, in the refused message's place, a record saying why it was refused; then call
    /// `handle_stored`.
    StoreRefusal {
        /// The flow.
        key: FlowKey,
        /// The message.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Store an event batch (the bytes the shell holds for it) under its name
    /// (`paths::event_batch`), then call `handle_event_stored`.
    StoreEvent {
        /// The batch.
        key: EventKey,
    },
    /// Send the client an acknowledgement of an event batch (if it is connected here).
    EventAck {
        /// The batch.
        key: EventKey,
        /// On the shared volume (not only in the node's buffer).
        settled: bool,
    },
    /// Send the client an acknowledgement of `seq` (if it is connected here).
    Ack {
        /// The flow.
        key: FlowKey,
        /// The message.
        seq: u64,
        /// On the shared volume (not only in the node's buffer).
        settled: bool,
    },
    /// Read what storage holds of the flow, then call `handle_audit`.
    Audit {
        /// The flow.
        key: FlowKey,
    },
    /// Wait until everything stored before now is on the shared volume, then call
    /// `handle_settled` (`false`: the buffer stopped).
    Settle {
        /// Names the wait.
        token: Token,
    },
    /// Wait until the flow's messages (`0..messages`) are on the shared volume and find the runs
    /// that hold them, then call `handle_located`.
    Locate {
        /// Names the step.
        token: Token,
        /// The flow.
        key: FlowKey,
        /// How many messages.
        messages: u64,
    },
    /// (Minion) replicate the completion to the master, then call `handle_replicated` once the
    /// master applied it or the link lost it.
    Replicate {
        /// Names the step.
        token: Token,
        /// The completion.
        outcome: FlowOutcome,
        /// Where its messages are.
        runs: Vec<Run>,
    },
    /// (Master) a step of recording a completion (`completions::RecordStep`): acknowledge the
    /// task, read or write the record, start reassembling uploads, record the hunt's outcome; its
    /// result comes back through `handle_read`, `handle_written` or `handle_hunt_recorded`.
    Record(RecordStep),
    /// A completion was recorded: the shell may forget where its messages are.
    Recorded {
        /// The flow.
        key: FlowKey,
        /// How it was recorded (for the log).
        result: Recorded,
    },
    /// A completion this node could not record yet (for the log; the resend brings it again).
    NotRecorded {
        /// The flow.
        key: FlowKey,
        /// Why.
        why: String,
    },
    /// (Master) a minion's replicated completion ended (`ok`: durable; else it is applied again).
    Applied {
        /// What the shell gave `handle_completion`.
        origin: O,
        /// How.
        result: Recorded,
    },
}

enum Role<R: FlowRecord, O> {
    Master(Completions<R, Origin<O>>),
    Minion,
}

/// A node's intake of client flows.
pub struct Intake<R: FlowRecord, O> {
    limits: IntakeLimits,
    tracker: FlowTracker,
    role: Role<R, O>,
    to_settle: VecDeque<ToSettle>,
    settling: Option<(Token, Vec<ToSettle>)>,
    /// Event batches being stored.
    events_storing: BTreeSet<EventKey>,
    /// Acks dropped at the settle queue's bound (the client resends).
    settle_dropped: u64,
    /// Completions waiting for their messages to be located, or (minion) to be applied.
    completing: BTreeMap<Token, FlowOutcome>,
    next_token: u64,
    actions: VecDeque<IntakeAction<R::Run, O>>,
}

impl<R: FlowRecord, O> Intake<R, O> {
    /// A master's intake: it records completions itself.
    pub fn master(limits: IntakeLimits) -> Self {
        let c = Completions::new(limits.completions.clone());
        Self::new(limits, Role::Master(c))
    }

    /// A minion's intake: it replicates completions to the master.
    pub fn minion(limits: IntakeLimits) -> Self {
        Self::new(limits, Role::Minion)
    }

    fn new(limits: IntakeLimits, role: Role<R, O>) -> Self {
        Intake {
            tracker: FlowTracker::new(limits.flows.clone()),
            limits,
            role,
            to_settle: VecDeque::new(),
            settling: None,
            events_storing: BTreeSet::new(),
            settle_dropped: 0,
            completing: BTreeMap::new(),
            next_token: 1,
            actions: VecDeque::new(),
        }
    }

    /// The flow tracker (for its figures).
    pub fn tracker(&self) -> &FlowTracker {
        &self.tracker
    }

    /// Acks dropped at the settle queue's bound since start.
    pub fn settle_dropped(&self) -> u64 {
        self.settle_dropped
    }

    /// Acks waiting to be settled (queued and in the wait in flight).
    pub fn settle_backlog(&self) -> usize {
        self.to_settle.len() + self.settling.as_ref().map_or(0, |(_, b)| b.len())
    }

    /// A client sent message `seq` of a flow (the shell holds its bytes until `Store` takes them).
    pub fn handle_message(
        &mut self,
        now: Monotonic,
        key: FlowKey,
        seq: u64,
        payload: Payload,
    ) -> Result<(), FlowError> {
        let r = self.tracker.handle_message(now, key, seq, payload);
        self.pump();
        r
    }

    /// A client sent an event batch (the shell holds its bytes until `StoreEvent` takes them).
    /// Stored again if it was stored before (a resend): it has the same name, so storage holds it
    /// once (docs/events.md, "Exactly once"). A resend of a batch being stored is dropped: its
    /// store's acknowledgement answers both.
    pub fn handle_event(&mut self, key: EventKey) -> Result<(), EventsBusy> {
        if self.events_storing.contains(&key) {
            return Ok(());
        }
        if self.events_storing.len() >= self.limits.event_stores_max {
            return Err(EventsBusy {
                max: self.limits.event_stores_max,
            });
        }
        self.events_storing.insert(key.clone());
        self.actions.push_back(IntakeAction::StoreEvent { key });
        Ok(())
    }

    /// A `StoreEvent` ended (`ok`: durable in the node's buffer). Not stored: not acknowledged,
    /// and the agent resends it.
    pub fn handle_event_stored(&mut self, key: &EventKey, ok: bool) {
        if !self.events_storing.remove(key) || !ok {
            return;
        }
        self.queue_settle(ToSettle::Event(key.clone()));
        self.actions.push_back(IntakeAction::EventAck {
            key: key.clone(),
            settled: false,
        });
        self.pump();
    }

    /// Event batches being stored now.
    pub fn events_storing(&self) -> usize {
        self.events_storing.len()
    }

    fn queue_settle(&mut self, s: ToSettle) {
        if self.to_settle.len() < self.limits.settle_queue_max {
            self.to_settle.push_back(s);
        } else {
            self.settle_dropped += 1;
        }
    }

    /// A `Store` or `StoreRefusal` ended.
    pub fn handle_stored(&mut self, now: Monotonic, key: &FlowKey, seq: u64, ok: bool) {
        self.tracker.handle_stored(now, key, seq, ok);
        self.pump();
    }

    /// An `Audit` ended (`None`: storage could not be read).
    pub fn handle_audit(
        &mut self,
        now: Monotonic,
        key: &FlowKey,
        found: Option<Vec<StoredMessage>>,
    ) {
        self.tracker.handle_audit(now, key, found);
        self.pump();
    }

    /// A `Settle` wait ended.
    pub fn handle_settled(&mut self, token: Token, ok: bool) {
        // (Not ok: the buffer stopped and the node stops with it; clients resend.)
        if let Some((_, batch)) = self.settling.take_if(|(t, _)| *t == token)
            && ok
        {
            for s in batch {
                self.actions.push_back(match s {
                    ToSettle::Flow(key, seq) => IntakeAction::Ack {
                        key,
                        seq,
                        settled: true,
                    },
                    ToSettle::Event(key) => IntakeAction::EventAck { key, settled: true },
                });
            }
        }
        self.pump();
    }

    /// A `Locate` ended: the flow's messages are on the shared volume, in `runs` (`Err`: the wait
    /// or the search failed).
    pub fn handle_located(&mut self, token: Token, runs: Result<Vec<R::Run>, String>) {
        let Some(o) = self.completing.remove(&token) else {
            return;
        };
        match (runs, &mut self.role) {
            (Err(why), _) => self.not_recorded(o.key, why),
            (Ok(runs), Role::Master(c)) => c.handle_completed(Origin::Local, o, runs),
            (Ok(runs), Role::Minion) => {
                let token = self.token();
                self.completing.insert(token, o.clone());
                self.actions.push_back(IntakeAction::Replicate {
                    token,
                    outcome: o,
                    runs,
                });
            }
        }
        self.pump();
    }

    /// (Minion) a `Replicate` ended: the master applied it (`true`), or the link lost it.
    pub fn handle_replicated(&mut self, token: Token, applied: bool) {
        if let Some(o) = self.completing.remove(&token) {
            if applied {
                self.recorded(o.key, Recorded::Written { unlisted: None });
            } else {
                self.not_recorded(o.key, "the replication link lost it".into());
            }
        }
        self.pump();
    }

    /// (Master) a minion's replicated completion, its messages on the shared volume in `runs`;
    /// `Applied{origin}` ends it. (A minion ignores it.)
    pub fn handle_completion(&mut self, origin: O, outcome: FlowOutcome, runs: Vec<R::Run>) {
        match &mut self.role {
            Role::Master(c) => c.handle_completed(Origin::Replicated(origin), outcome, runs),
            Role::Minion => self.actions.push_back(IntakeAction::Applied {
                origin,
                result: Recorded::Busy,
            }),
        }
        self.pump();
    }

    /// (Master) a `ReadRecord` ended.
    pub fn handle_read(&mut self, now: Timestamp, token: Token, record: Result<Option<R>, ()>) {
        if let Role::Master(c) = &mut self.role {
            c.handle_read(now, token, record);
        }
        self.pump();
    }

    /// (Master) a `WriteRecord` ended.
    pub fn handle_written(&mut self, token: Token, outcome: Outcome) {
        if let Role::Master(c) = &mut self.role {
            c.handle_written(token, outcome);
        }
        self.pump();
    }

    /// (Master) a `HuntOutcome` ended.
    pub fn handle_hunt_recorded(&mut self, token: Token, outcome: Outcome) {
        if let Role::Master(c) = &mut self.role {
            c.handle_hunt_recorded(token, outcome);
        }
        self.pump();
    }

    /// Time passed (idle flows are forgotten).
    pub fn handle_timeout(&mut self, now: Monotonic) {
        self.tracker.handle_timeout(now);
        self.pump();
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        self.tracker.poll_timeout()
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<IntakeAction<R::Run, O>> {
        self.actions.pop_front()
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    /// Moves the inner machines' actions out, until none is left.
    fn pump(&mut self) {
        loop {
            if let Some(a) = self.tracker.poll_action() {
                self.flow_action(a);
                continue;
            }
            let Role::Master(c) = &mut self.role else {
                break;
            };
            let Some(a) = c.poll_action() else { break };
            self.completion_action(a);
        }
        if self.settling.is_none() && !self.to_settle.is_empty() {
            let n = self.to_settle.len().min(self.limits.settle_batch_max);
            let batch: Vec<_> = self.to_settle.drain(..n).collect();
            let token = self.token();
            self.settling = Some((token, batch));
            self.actions.push_back(IntakeAction::Settle { token });
        }
    }

    fn flow_action(&mut self, a: FlowAction) {
        match a {
            FlowAction::Store { key, seq } => {
                self.actions.push_back(IntakeAction::Store { key, seq })
            }
            FlowAction::StoreRefusal { key, seq, reason } => self
                .actions
                .push_back(IntakeAction::StoreRefusal { key, seq, reason }),
            FlowAction::Audit { key } => self.actions.push_back(IntakeAction::Audit { key }),
            FlowAction::Ack { key, seq } => {
                self.queue_settle(ToSettle::Flow(key.clone(), seq));
                self.actions.push_back(IntakeAction::Ack {
                    key,
                    seq,
                    settled: false,
                });
            }
            FlowAction::Completed(o) => {
                let token = self.token();
                let (key, messages) = (o.key.clone(), o.messages);
                self.completing.insert(token, o);
                self.actions.push_back(IntakeAction::Locate {
                    token,
                    key,
                    messages,
                });
            }
        }
    }

    fn completion_action(&mut self, a: CompletionAction<Origin<O>>) {
        match a {
            CompletionAction::Step(step) => self.actions.push_back(IntakeAction::Record(step)),
            CompletionAction::Done {
                origin: Origin::Local,
                key,
                result,
            } => {
                if result.ok() {
                    self.recorded(key, result);
                } else {
                    self.not_recorded(key, format!("{result:?}"));
                }
            }
            CompletionAction::Done {
                origin: Origin::Replicated(origin),
                result,
                ..
            } => self
                .actions
                .push_back(IntakeAction::Applied { origin, result }),
        }
    }

    fn recorded(&mut self, key: FlowKey, result: Recorded) {
        self.tracker.handle_recorded(&key, true);
        self.actions
            .push_back(IntakeAction::Recorded { key, result });
    }

    fn not_recorded(&mut self, key: FlowKey, why: String) {
        self.tracker.handle_recorded(&key, false);
        self.actions
            .push_back(IntakeAction::NotRecorded { key, why });
    }
}

#[cfg(test)]
mod tests;
