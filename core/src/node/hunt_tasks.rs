//! Hunt participants and their tasks: the master's glue between the [`HuntManager`] and the
//! [`TaskBook`] (docs/architecture.md, "A participant has a durable task").
//!
//! A participant the hunt manager chose is scheduled only with its task: [`schedule`] creates the
//! task (its `Write` carries the participant's records with it, in one atomic group the shell
//! writes), and a participant whose task cannot exist — the client is at its task bound, or the
//! group's write was refused — is undone in the hunt manager, which offers it again
//! `schedule_retry_ms` later. A group maybe written counts as written (the participant stays
//! scheduled, its task pending): a restart finds both or neither.

use super::tasks::{TaskBook, TaskError};
use super::{Outcome, Token};
use crate::hunts::{HuntManager, HuntSpec};
use crate::time::Monotonic;
use crate::{ClientId, FlowId, HuntId};
use std::collections::BTreeMap;
use talon_proto::comms;

/// What asked for a task: how its creation ended goes back there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskOrigin {
    /// An analyst's collection (the caller awaits the outcome).
    Collect,
    /// A hunt's schedule: a refused one is undone in the hunt manager.
    Hunt(HuntId),
}

/// Seconds an agent gives one task's artifact.
pub const TASK_TIMEOUT_S: u64 = 600;

/// The task for a flow of `artifact` (validated) with `params`: a collection's (`hunt` none) or a
/// hunt participant's.
pub fn task(
    flow: &FlowId,
    artifact: &str,
    params: &BTreeMap<String, String>,
    hunt: Option<&HuntId>,
    upload_bytes_max: u64,
) -> comms::Task {
    comms::Task {
        flow_id: flow.to_string(),
        artifact: artifact.to_owned(),
        params: params.clone().into_iter().collect(),
        hunt_id: hunt.map(ToString::to_string).unwrap_or_default(),
        max_rows: 0,
        max_upload_bytes: upload_bytes_max,
        timeout_s: TASK_TIMEOUT_S,
    }
}

/// The task a hunt participant runs.
pub fn hunt_task(
    hunt: &HuntId,
    spec: &HuntSpec,
    flow: &FlowId,
    upload_bytes_max: u64,
) -> comms::Task {
    task(
        flow,
        &spec.artifact,
        &spec.params,
        Some(hunt),
        upload_bytes_max,
    )
}

/// Schedules a participant the hunt manager chose (its `Schedule` action): creates its task,
/// whose `Write` the shell performs with the participant's records. If the task cannot be created
/// (the client is at its bound), nothing is decided: the hunt manager undoes the participant.
pub fn schedule(
    hunts: &mut HuntManager,
    tasks: &mut TaskBook<comms::Task, TaskOrigin>,
    at: Monotonic,
    hunt: &HuntId,
    client: &ClientId,
    flow: &FlowId,
    upload_bytes_max: u64,
) -> Result<Token, TaskError> {
    let Some(h) = hunts.get(hunt) else {
        return Err(TaskError::UnknownHunt { hunt: hunt.clone() });
    };
    let task = hunt_task(hunt, &h.record().spec, flow, upload_bytes_max);
    let r = tasks.create(
        client.clone(),
        flow.clone(),
        task,
        TaskOrigin::Hunt(hunt.clone()),
    );
    if r.is_err() {
        hunts.handle_schedule_failed(at, hunt, client);
    }
    r
}

/// A task's creation ended (the book's `Created`): a hunt participant whose group was refused is
/// no participant — undone, and offered again later. Done or maybe done, it stays scheduled.
pub fn created(
    hunts: &mut HuntManager,
    at: Monotonic,
    client: &ClientId,
    outcome: Outcome,
    origin: &TaskOrigin,
) {
    if outcome == Outcome::Refused
        && let TaskOrigin::Hunt(h) = origin
    {
        hunts.handle_schedule_failed(at, h, client);
    }
}
