//! The endpoint agent's half of the flow protocol: numbering, keeping, resending and failing over.
//!
//! # Rules (invariant 1 (docs/architecture.md), the client's side)
//!
//! - A flow's durable messages are numbered 0, 1, 2, ...; the final status takes the next number.
//! - A message is **kept until settled**: acknowledged unsettled, it is durable only in one
//!   frontend's write-behind buffer, so it is kept (and sent again on the next stream, where that
//!   frontend may be gone); acknowledged settled, it is on the shared volume and forgotten.
//! - On a new stream every kept message goes again, in order (the frontend acknowledges a resend of
//!   a stored message again and stores nothing twice). A message without an acknowledgement of
//!   either kind for `resend_after_ms` goes again too (an acknowledgement can be lost).
//! - At most `max_in_flight` (the frontend's `Welcome`) messages of a flow are kept at once: `push`
//!   refuses beyond it, and the agent waits for an acknowledgement. The final status is never
//!   refused (it carries no data, and a flow must be able to end).
//! - The final status acknowledged ends the flow (the frontend acknowledges it only once the whole
//!   flow is stored and its completion recorded); the flow is remembered (`done_max` of them) so a
//!   task delivered again does not run it again.

use crate::time::Monotonic;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Bounds and timing of the agent's outbox.
#[derive(Clone, Debug)]
pub struct OutboxLimits {
    /// A message unacknowledged (or unsettled) this long is sent again.
    pub resend_after_ms: u64,
    /// Flows remembered after they ended (a task delivered twice runs once).
    pub done_max: usize,
    /// Flows running (or awaiting their final acknowledgement) at once; a task beyond it is not
    /// taken, and not acknowledged, so the master sends it again later.
    pub flows_max: usize,
}

/// What [`FlowOutbox::begin`] made of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// A new flow: run the task and acknowledge it.
    Started,
    /// Running or recently done (a task delivered twice): acknowledge it, do not run it again.
    Again,
    /// `max` flows are running: neither run nor acknowledge it (the master sends it again).
    Full {
        /// The bound (`OutboxLimits::flows_max`).
        max: usize,
    },
}

/// Why a message was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The flow keeps `max` messages not yet settled: wait for an acknowledgement.
    Full {
        /// The bound (the frontend's `max_in_flight`).
        max: usize,
    },
    /// The flow is not running (never begun, or ended).
    NotRunning,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Full { max } => write!(f, "{max} messages of this flow await settling"),
            PushError::NotRunning => f.write_str("the flow is not running"),
        }
    }
}

impl std::error::Error for PushError {}

/// What the agent's shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxAction<P, S> {
    /// Send message `seq` of `flow` on the current stream.
    Send {
        /// The flow.
        flow: String,
        /// Its number.
        seq: u64,
        /// What it carries.
        payload: P,
    },
    /// Message `seq` was acknowledged for the first time (its service time ends): `stamp` is what
    /// `push` was given.
    FirstAck {
        /// The flow.
        flow: String,
        /// Its number.
        seq: u64,
        /// It was the final status.
        is_final: bool,
        /// What `push` was given with it.
        stamp: S,
    },
    /// Message `seq` is settled (on the shared volume) and forgotten: `stamp` is what `push` was
    /// given with it.
    Settled {
        /// The flow.
        flow: String,
        /// Its number.
        seq: u64,
        /// What `push` was given with it.
        stamp: S,
    },
    /// The flow's final status was acknowledged: the flow is over.
    Ended {
        /// The flow.
        flow: String,
    },
}

#[derive(Clone, Debug)]
struct Kept<P, S> {
    payload: P,
    /// When it was last sent (or acknowledged unsettled): the resend timer runs from here.
    sent: Monotonic,
    stamp: S,
    acked_once: bool,
}

#[derive(Debug)]
struct FlowOut<P, S> {
    next_seq: u64,
    /// Sent and not acknowledged.
    unacked: BTreeMap<u64, Kept<P, S>>,
    /// Acknowledged (durable in a frontend's buffer) and not yet settled.
    unsettled: BTreeMap<u64, Kept<P, S>>,
    final_seq: Option<u64>,
}

impl<P, S> FlowOut<P, S> {
    fn kept(&self) -> usize {
        self.unacked.len() + self.unsettled.len()
    }
}

/// The agent's flows, their messages kept until settled, and the stream they go on.
#[derive(Debug)]
pub struct FlowOutbox<P, S> {
    limits: OutboxLimits,
    flows: BTreeMap<String, FlowOut<P, S>>,
    done: VecDeque<String>,
    /// A stream is up.
    connected: bool,
    /// The last stream's `max_in_flight` (1 before any): kept while disconnected, so an artifact
    /// goes on producing up to it.
    max_in_flight: usize,
    actions: VecDeque<OutboxAction<P, S>>,
}

impl<P: Clone, S: Copy> FlowOutbox<P, S> {
    /// An empty outbox.
    pub fn new(limits: OutboxLimits) -> FlowOutbox<P, S> {
        FlowOutbox {
            limits,
            flows: BTreeMap::new(),
            done: VecDeque::new(),
            connected: false,
            max_in_flight: 1,
            actions: VecDeque::new(),
        }
    }

    /// Flows running or awaiting their final acknowledgement (told to a frontend in `Hello`).
    pub fn running_flows(&self) -> impl Iterator<Item = &str> {
        self.flows.keys().map(String::as_str)
    }

    /// Messages not yet settled, in total.
    pub fn unsettled(&self) -> usize {
        self.flows.values().map(FlowOut::kept).sum()
    }

    /// Starts a task's flow, unless it is running or recently done (a task delivered twice) or
    /// `flows_max` flows are running.
    pub fn begin(&mut self, flow: &str) -> Begin {
        self.begin_at(flow, 0)
    }

    /// Starts a flow whose messages are numbered from `first_seq` (an event stream taken up again
    /// from the agent's disk after a restart: its earlier messages were settled). As
    /// [`FlowOutbox::begin`] otherwise.
    pub fn begin_at(&mut self, flow: &str, first_seq: u64) -> Begin {
        if self.flows.contains_key(flow) || self.done.iter().any(|d| d == flow) {
            return Begin::Again;
        }
        if self.flows.len() >= self.limits.flows_max {
            return Begin::Full {
                max: self.limits.flows_max,
            };
        }
        self.flows.insert(
            flow.to_owned(),
            FlowOut {
                next_seq: first_seq,
                unacked: BTreeMap::new(),
                unsettled: BTreeMap::new(),
                final_seq: None,
            },
        );
        Begin::Started
    }

    /// Forgets a flow and every message it keeps, unsent or unsettled (an event stream whose
    /// artifact the client no longer runs); returns how many messages it kept.
    pub fn abandon(&mut self, flow: &str) -> usize {
        self.flows.remove(flow).map_or(0, |f| f.kept())
    }

    /// Whether `push` would take a message of `flow` now (it runs and keeps fewer than
    /// `max_in_flight`): lets a caller skip preparing a message that would be refused.
    pub fn has_room(&self, flow: &str) -> bool {
        self.flows
            .get(flow)
            .is_some_and(|f| f.final_seq.is_none() && f.kept() < self.max_in_flight)
    }

    /// Messages `flow` keeps (unacknowledged or unsettled).
    pub fn kept(&self, flow: &str) -> usize {
        self.flows.get(flow).map_or(0, FlowOut::kept)
    }

    /// Adds the flow's next message (`is_final`: its final status) and sends it if a stream is up;
    /// returns its number. Refused while the flow keeps `max_in_flight` messages (not the final).
    pub fn push(
        &mut self,
        now: Monotonic,
        flow: &str,
        payload: P,
        is_final: bool,
        stamp: S,
    ) -> Result<u64, PushError> {
        let max = self.max_in_flight;
        let f = self.flows.get_mut(flow).ok_or(PushError::NotRunning)?;
        if f.final_seq.is_some() {
            return Err(PushError::NotRunning);
        }
        if f.kept() >= max && !is_final {
            return Err(PushError::Full { max });
        }
        let seq = f.next_seq;
        f.next_seq += 1;
        if is_final {
            f.final_seq = Some(seq);
        }
        f.unacked.insert(
            seq,
            Kept {
                payload: payload.clone(),
                sent: now,
                stamp,
                acked_once: false,
            },
        );
        if self.connected {
            self.actions.push_back(OutboxAction::Send {
                flow: flow.to_owned(),
                seq,
                payload,
            });
        }
        Ok(seq)
    }

    /// A new stream is up, taking `max_in_flight` messages per flow: every message kept goes again,
    /// in order — what the last frontend acknowledged but did not settle may exist only in its
    /// buffer.
    pub fn handle_connected(&mut self, now: Monotonic, max_in_flight: usize) {
        self.connected = true;
        self.max_in_flight = max_in_flight.max(1);
        for (flow, f) in &mut self.flows {
            let unsettled = std::mem::take(&mut f.unsettled);
            f.unacked.extend(unsettled);
            for (seq, k) in &mut f.unacked {
                k.sent = now;
                self.actions.push_back(OutboxAction::Send {
                    flow: flow.clone(),
                    seq: *seq,
                    payload: k.payload.clone(),
                });
            }
        }
    }

    /// The stream is gone: nothing is sent until the next one.
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
    }

    /// The frontend acknowledged message `seq` (`settled`: it is on the shared volume).
    pub fn handle_ack(&mut self, now: Monotonic, flow: &str, seq: u64, settled: bool) {
        let Some(f) = self.flows.get_mut(flow) else {
            return;
        };
        if let Some(mut k) = f.unacked.remove(&seq) {
            if !k.acked_once {
                k.acked_once = true;
                self.actions.push_back(OutboxAction::FirstAck {
                    flow: flow.to_owned(),
                    seq,
                    is_final: f.final_seq == Some(seq),
                    stamp: k.stamp,
                });
            }
            if settled {
                self.actions.push_back(OutboxAction::Settled {
                    flow: flow.to_owned(),
                    seq,
                    stamp: k.stamp,
                });
            } else {
                k.sent = now;
                f.unsettled.insert(seq, k);
            }
        } else if settled && let Some(k) = f.unsettled.remove(&seq) {
            self.actions.push_back(OutboxAction::Settled {
                flow: flow.to_owned(),
                seq,
                stamp: k.stamp,
            });
        }
        if f.final_seq == Some(seq) {
            // Acknowledged only once the whole flow is stored and its completion recorded.
            self.flows.remove(flow);
            self.done.push_back(flow.to_owned());
            if self.done.len() > self.limits.done_max {
                self.done.pop_front();
            }
            self.actions.push_back(OutboxAction::Ended {
                flow: flow.to_owned(),
            });
        }
    }

    /// Sends again what has had no acknowledgement of either kind for `resend_after_ms`.
    pub fn handle_timeout(&mut self, now: Monotonic) {
        if !self.connected {
            return;
        }
        for (flow, f) in &mut self.flows {
            for (seq, k) in f.unacked.iter_mut().chain(f.unsettled.iter_mut()) {
                if now.since_ms(k.sent) >= self.limits.resend_after_ms {
                    k.sent = now;
                    self.actions.push_back(OutboxAction::Send {
                        flow: flow.clone(),
                        seq: *seq,
                        payload: k.payload.clone(),
                    });
                }
            }
        }
    }

    /// When to call `handle_timeout` next (none while disconnected or nothing is kept).
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        if !self.connected {
            return None;
        }
        self.flows
            .values()
            .flat_map(|f| f.unacked.values().chain(f.unsettled.values()))
            .map(|k| k.sent.plus_ms(self.limits.resend_after_ms))
            .min()
    }

    /// The next action. One input queues at most one per message kept.
    pub fn poll_action(&mut self) -> Option<OutboxAction<P, S>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests;
