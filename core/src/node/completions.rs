//! The master's record of a completed flow.
//!
//! A flow completes on whichever node its client's final status reached (the master's own flow
//! tracker, or a minion's, replicated as an event); the master then records it. This machine owns
//! that policy.
//!
//! # Rules (docs/architecture.md, "Visibility order" and "A final status is acknowledged last")
//!
//! - **A completed flow was delivered** (`Delivered`), whether or not its task's acknowledgement
//!   arrived: its task must not stay pending.
//! - **The flow's record moves once**, from running to its final state with the outcome's exact
//!   totals and the runs that hold its messages. A report the record already says (a resend, a
//!   second node's report after a failover) writes nothing. A record that would exceed the value
//!   bound with its runs is written as failed without them (its results are not listed) rather
//!   than not at all.
//! - The record and the marker that makes a restart reassemble the flow's uploads are **one atomic
//!   write**; the reassembly starts only once that write is done.
//! - **The hunt's outcome follows the record**, and the completion is reported recorded (`Done`
//!   with `ok`) only once both are durable — only then may the client's final status (or the
//!   minion's replicated event) be acknowledged. A failed or maybe-done step reports not recorded:
//!   the resend comes back through here and finds what did land (the record written, so only the
//!   hunt's outcome is left).
//! - **One completion per flow at a time**; another report of the same flow meanwhile is refused as
//!   busy (it is resent), and at most `in_flight_max` completions are in flight.

use super::{Outcome, Token};
use crate::flows::{FinalState, FlowKey, FlowOutcome};
use crate::time::Timestamp;
use crate::{ClientId, HuntId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A flow's record as stored: what this machine needs to know of it and do to it.
pub trait FlowRecord {
    /// Where a run of the flow's messages is in the filestore.
    type Run;
    /// Whether the record already says what `o` says: final, with its totals. (A flow's outcome is
    /// a function of its stored messages, so its state follows; a record failed as too large to
    /// list keeps its totals.)
    fn says(&self, o: &FlowOutcome) -> bool;
    /// Moves the record to the outcome's final state, finished at `at`, its messages in `runs`.
    fn finish(&mut self, o: &FlowOutcome, at: Timestamp, runs: Vec<Self::Run>);
    /// The record is too large with its runs: drop them and mark the flow failed with `why`.
    fn fail_unlisted(&mut self, why: String);
    /// How many runs it holds.
    fn runs(&self) -> usize;
    /// Its stored form.
    fn encode(&self) -> Vec<u8>;
    /// The hunt it belongs to, if any.
    fn hunt(&self) -> Option<HuntId>;
}

/// Bounds of the machine.
#[derive(Clone, Debug)]
pub struct CompletionLimits {
    /// The largest record (`Datastore.max_value_size`).
    pub value_bytes_max: u64,
    /// Completions in flight at once.
    pub in_flight_max: usize,
}

/// How a completion ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The record was written now, with the hunt's outcome if any; `unlisted` says why the flow was
    /// recorded as failed without its runs, if it was.
    Written {
        /// Why its results are not listed.
        unlisted: Option<String>,
    },
    /// The record already said so (its hunt's outcome is now durable too).
    Already,
    /// No record for this flow (not a flow this master created): acknowledged all the same, or the
    /// client would resend it forever.
    NoRecord,
    /// Another completion of this flow is in flight, or `in_flight_max` are.
    Busy,
    /// Reading the record failed.
    ReadFailed,
    /// Writing the record did not certainly happen (refused, or maybe done).
    WriteFailed(Outcome),
    /// The hunt's outcome did not certainly become durable.
    HuntFailed(Outcome),
}

impl Recorded {
    /// Whether the completion is durable: the final status may be acknowledged.
    pub fn ok(&self) -> bool {
        matches!(
            self,
            Recorded::Written { .. } | Recorded::Already | Recorded::NoRecord
        )
    }
}

/// An effect of recording a completion, for the shell (or, on a node, the intake passes it on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordStep {
    /// The flow's task was delivered (drop it from the pending tasks).
    Delivered {
        /// The flow.
        key: FlowKey,
    },
    /// Read the flow's record, then call [`Completions::handle_read`].
    Read {
        /// Names the read.
        token: Token,
        /// The flow.
        key: FlowKey,
    },
    /// Write the record (and, with `uploads_marker`, the marker that a restart finishes the flow's
    /// uploads) in one atomic group, then call [`Completions::handle_written`].
    Write {
        /// Names the write.
        token: Token,
        /// The flow.
        key: FlowKey,
        /// The record's stored form.
        record: Vec<u8>,
        /// Write the uploads-pending marker with it.
        uploads_marker: bool,
    },
    /// The record is durable: reassemble the flow's uploads (bulk work on the volume).
    StartUploads {
        /// The flow.
        key: FlowKey,
    },
    /// Record the flow's outcome in its hunt, then call [`Completions::handle_hunt_recorded`].
    HuntOutcome {
        /// Names the step.
        token: Token,
        /// The outcome.
        outcome: HuntOutcome,
    },
}

/// A hunt participant's flow ended: what its hunt counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuntOutcome {
    /// The hunt.
    pub hunt: HuntId,
    /// The participant.
    pub client: ClientId,
    /// How the flow ended.
    pub state: FinalState,
    /// Its rows.
    pub rows: u64,
    /// Its upload bytes.
    pub uploaded_bytes: u64,
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompletionAction<O> {
    /// An effect of recording.
    Step(RecordStep),
    /// The completion ended (`result.ok()`: durable).
    Done {
        /// What [`Completions::handle_completed`] was given to name the report.
        origin: O,
        /// The flow.
        key: FlowKey,
        /// How.
        result: Recorded,
    },
}

enum Stage {
    Reading,
    Writing {
        written: Recorded,
        hunt: Option<HuntId>,
    },
    Hunt {
        written: Recorded,
    },
}

struct InFlight<R: FlowRecord, O> {
    origin: O,
    outcome: FlowOutcome,
    runs: Vec<R::Run>,
    stage: Stage,
}

/// The master's completions in flight.
pub struct Completions<R: FlowRecord, O> {
    limits: CompletionLimits,
    in_flight: BTreeMap<Token, InFlight<R, O>>,
    keys: BTreeSet<FlowKey>,
    next_token: u64,
    actions: VecDeque<CompletionAction<O>>,
}

impl<R: FlowRecord, O> Completions<R, O> {
    /// No completion in flight.
    pub fn new(limits: CompletionLimits) -> Self {
        Completions {
            limits,
            in_flight: BTreeMap::new(),
            keys: BTreeSet::new(),
            next_token: 1,
            actions: VecDeque::new(),
        }
    }

    /// Completions in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A flow completed (its messages are on the shared volume, in `runs`); `origin` names the
    /// report in the `Done` that ends it.
    pub fn handle_completed(&mut self, origin: O, outcome: FlowOutcome, runs: Vec<R::Run>) {
        let key = outcome.key.clone();
        self.actions
            .push_back(CompletionAction::Step(RecordStep::Delivered {
                key: key.clone(),
            }));
        if self.keys.contains(&key) || self.in_flight.len() >= self.limits.in_flight_max {
            self.actions.push_back(CompletionAction::Done {
                origin,
                key,
                result: Recorded::Busy,
            });
            return;
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        self.keys.insert(key.clone());
        self.in_flight.insert(
            token,
            InFlight {
                origin,
                outcome,
                runs,
                stage: Stage::Reading,
            },
        );
        self.actions
            .push_back(CompletionAction::Step(RecordStep::Read { token, key }));
    }

    /// The record read for `token`: `Ok(None)` if there is none, `Err(())` if the read failed.
    pub fn handle_read(&mut self, now: Timestamp, token: Token, record: Result<Option<R>, ()>) {
        let Some(f) = self.in_flight.get_mut(&token) else {
            return;
        };
        if !matches!(f.stage, Stage::Reading) {
            return;
        }
        let mut record = match record {
            Err(()) => return self.end(token, Recorded::ReadFailed),
            Ok(None) => return self.end(token, Recorded::NoRecord),
            Ok(Some(r)) => r,
        };
        let hunt = record.hunt();
        if record.says(&f.outcome) {
            return self.hunt_step(token, Recorded::Already, hunt);
        }
        record.finish(&f.outcome, now, std::mem::take(&mut f.runs));
        let mut bytes = record.encode();
        let mut unlisted = None;
        if bytes.len() as u64 > self.limits.value_bytes_max {
            // Runs pile up with the flushes a flow spans: a flow that spans too many fails (its
            // messages stay in the filestore), the node goes on.
            let why = format!(
                "the flow's record would be {} bytes with its {} runs, over \
                 Datastore.max_value_size ({}); its results are not listed",
                bytes.len(),
                record.runs(),
                self.limits.value_bytes_max
            );
            record.fail_unlisted(why.clone());
            bytes = record.encode();
            unlisted = Some(why);
        }
        let uploads_marker = f.outcome.uploads > 0 || f.outcome.uploaded_bytes > 0;
        f.stage = Stage::Writing {
            written: Recorded::Written { unlisted },
            hunt,
        };
        self.actions
            .push_back(CompletionAction::Step(RecordStep::Write {
                token,
                key: f.outcome.key.clone(),
                record: bytes,
                uploads_marker,
            }));
    }

    /// The record's write for `token` ended.
    pub fn handle_written(&mut self, token: Token, outcome: Outcome) {
        let Some(f) = self.in_flight.get_mut(&token) else {
            return;
        };
        let Stage::Writing { written, hunt } = &mut f.stage else {
            return;
        };
        if outcome != Outcome::Done {
            return self.end(token, Recorded::WriteFailed(outcome));
        }
        let (written, hunt) = (std::mem::replace(written, Recorded::Already), hunt.take());
        if f.outcome.uploads > 0 || f.outcome.uploaded_bytes > 0 {
            self.actions
                .push_back(CompletionAction::Step(RecordStep::StartUploads {
                    key: f.outcome.key.clone(),
                }));
        }
        self.hunt_step(token, written, hunt);
    }

    /// The hunt's outcome for `token` ended (`Done`: durable, or the hunt had it already).
    pub fn handle_hunt_recorded(&mut self, token: Token, outcome: Outcome) {
        let Some(f) = self.in_flight.get_mut(&token) else {
            return;
        };
        let Stage::Hunt { written } = &mut f.stage else {
            return;
        };
        let written = std::mem::replace(written, Recorded::Already);
        let result = match outcome {
            Outcome::Done => written,
            other => Recorded::HuntFailed(other),
        };
        self.end(token, result);
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<CompletionAction<O>> {
        self.actions.pop_front()
    }

    fn hunt_step(&mut self, token: Token, written: Recorded, hunt: Option<HuntId>) {
        let Some(hunt) = hunt else {
            return self.end(token, written);
        };
        let Some(f) = self.in_flight.get_mut(&token) else {
            return;
        };
        f.stage = Stage::Hunt { written };
        let o = &f.outcome;
        self.actions
            .push_back(CompletionAction::Step(RecordStep::HuntOutcome {
                token,
                outcome: HuntOutcome {
                    hunt,
                    client: o.key.client.clone(),
                    state: o.state,
                    rows: o.rows,
                    uploaded_bytes: o.uploaded_bytes,
                },
            }));
    }

    fn end(&mut self, token: Token, result: Recorded) {
        if let Some(f) = self.in_flight.remove(&token) {
            self.keys.remove(&f.outcome.key);
            self.actions.push_back(CompletionAction::Done {
                origin: f.origin,
                key: f.outcome.key,
                result,
            });
        }
    }
}

#[cfg(test)]
mod tests;
