//! What the node's effects look like on storage and on the wire: datastore keys and values of the
//! master core's writes, batched metadata writes, the records and events a completion becomes, and
//! the conversions between core answers and gRPC statuses.

use super::*;

/// Datastore key of a minion's replication cursor (persisted after the effects it covers).
pub(super) fn cursor_key(node: &str) -> String {
    format!("cluster/minions/{}.json", paths::safe_component(node))
}

/// Datastore key of a task not yet acknowledged by its client (protobuf `Task`).
pub(super) fn task_key(client: &ClientId, flow: &FlowId) -> String {
    format!("tasks/{client}/{flow}.pb")
}

/// Hunt participants scheduled in one batch at most (their records built, written together and
/// their tasks sent) before the node yields to its other work.
pub(super) const SCHEDULE_BATCH_MAX: usize = 1024;

/// Reads at most this many keys at once when a master starts (its records are on the 40–60 ms volume:
/// one at a time, 100,000 client records would take over an hour; the datastore bounds its own
/// readers too).
pub(super) const LOAD_CONCURRENCY: usize = 256;

/// Writes each group of keys atomically ([`Meta::write_all`]), up to [`LOAD_CONCURRENCY`] groups at
/// once (so one journal sync covers many); one result per group, in order.
pub(super) async fn write_groups(
    ds: &Meta,
    groups: Vec<Vec<(String, Option<Bytes>)>>,
) -> Vec<Result<(), WriteError>> {
    // A group whose task panicked keeps this error: it may have been written.
    let mut out: Vec<Result<(), WriteError>> = (0..groups.len())
        .map(|_| {
            Err(WriteError {
                outcome: Outcome::Unknown,
                message: "the write task failed".to_owned(),
            })
        })
        .collect();
    let mut set = tokio::task::JoinSet::new();
    let mut todo = groups.into_iter().enumerate();
    loop {
        while set.len() < LOAD_CONCURRENCY {
            let Some((i, writes)) = todo.next() else {
                break;
            };
            let ds = ds.clone();
            set.spawn(async move {
                let first = writes.first().map(|w| w.0.clone()).unwrap_or_default();
                match ds.write_all(writes).await {
                    Ok(_) => (i, Ok(())),
                    Err(e) => (
                        i,
                        Err(WriteError {
                            message: format!("{first}: {e}"),
                            ..e
                        }),
                    ),
                }
            });
        }
        match set.join_next().await {
            Some(Ok((i, r))) => out[i] = r,
            Some(Err(e)) => tracing::error!(error = %e, "a datastore write task failed"),
            None => break,
        }
    }
    out
}

/// A core request error as a gRPC status.
pub(super) fn status(e: RequestError) -> Status {
    let m = e.message;
    match e.kind {
        ErrorKind::Invalid => Status::invalid_argument(m),
        ErrorKind::NotFound => Status::not_found(m),
        ErrorKind::Precondition => Status::failed_precondition(m),
        ErrorKind::Unavailable => Status::unavailable(m),
        ErrorKind::Exhausted => Status::resource_exhausted(m),
        ErrorKind::Denied => Status::permission_denied(m),
    }
}

/// A queued flow's record.
pub(super) fn flow_json(f: &NewFlow) -> FlowJson {
    FlowJson {
        client_id: f.client.to_string(),
        flow_id: f.flow.to_string(),
        artifact: f.artifact.clone(),
        params: f.params.clone(),
        hunt_id: f.hunt.as_ref().map(ToString::to_string),
        state: FlowRecordState::Queued,
        rows: 0,
        uploaded_bytes: 0,
        error: String::new(),
        created_ms: f.created.as_ms(),
        finished_ms: 0,
        uploads: vec![],
        runs: vec![],
    }
}

/// An item of the core's atomic writes, as the datastore key and value it is stored as.
pub(super) fn encode(item: &Item) -> (String, Option<Bytes>) {
    fn json<T: serde::Serialize>(v: &T) -> Option<Bytes> {
        // These records are plain data; serialising them cannot fail.
        Some(Bytes::from(
            serde_json::to_vec(v).expect("a record serialises"),
        ))
    }
    match item {
        Item::Client(r) => (
            paths::client_record(&r.id),
            json(&ClientJson::from_record(r)),
        ),
        Item::Hunt(r) => (paths::hunt_record(&r.id), json(&HuntJson::from_record(r))),
        Item::Participant {
            hunt,
            client,
            participation,
        } => (
            paths::hunt_participant(hunt, client),
            json(&ParticipantJson::from(*participation)),
        ),
        Item::Task { client, flow, task } => (
            task_key(client, flow),
            Some(Bytes::from(task.encode_to_vec())),
        ),
        Item::Flow(f) => (paths::flow_record(&f.client, &f.flow), json(&flow_json(f))),
        Item::Cursor { node, cursor } => (
            cursor_key(node),
            json(&CursorJson {
                node: node.clone(),
                epoch: cursor.epoch,
                hwm: cursor.hwm,
            }),
        ),
        Item::Audit(e) => (
            paths::audit_entry(e.time, e.id),
            json(&crate::storage::records::AuditJson::from_entry(e)),
        ),
        Item::Artifact { name, definition } => (
            paths::artifact_definition(name),
            definition
                .as_ref()
                .map(|d| Bytes::from(d.clone().into_bytes())),
        ),
        Item::ClientEvent {
            label,
            artifact,
            entry,
        } => (
            paths::client_event(label, artifact),
            entry.as_ref().map(|e| Bytes::from(e.clone().into_bytes())),
        ),
    }
}

/// A minion's replicated completion as the intake takes it; `None` if it names a malformed client or
/// flow (skipped, so that the minion's later events are not stuck behind it).
pub(super) fn replicated_completion(
    node: &str,
    f: pc::FlowCompleted,
) -> Option<(talon_core::flows::FlowOutcome, Vec<RunRef>)> {
    let (Ok(client), Ok(flow)) = (ClientId::parse(&f.client_id), FlowId::parse(&f.flow_id)) else {
        tracing::warn!(minion = %node, client = %f.client_id, flow = %f.flow_id, "a replicated completion names a malformed client or flow");
        return None;
    };
    let state = if f.state == comms::FlowState::Completed as i32 {
        FinalState::Completed
    } else {
        FinalState::Error
    };
    let mut runs = Vec::with_capacity(f.runs.len());
    for r in f.runs {
        match RunRef::from_proto(r) {
            Ok(r) => runs.push(r),
            // A minion is one of ours: this is a bug, not an attack. The flow's results would
            // miss this run's messages.
            Err(e) => {
                tracing::error!(%client, %flow, error = %e, "a replicated completion names a bad run")
            }
        }
    }
    let o = talon_core::flows::FlowOutcome {
        key: FlowKey { client, flow },
        state,
        error: f.error,
        rows: f.rows,
        uploaded_bytes: f.uploaded_bytes,
        uploads: f.uploads,
        messages: f.messages,
    };
    Some((o, runs))
}

/// What the filestore holds in place of a flow message the server refused: a log line at error
/// level saying why (results and uploads skip it; a person reading the flow's logs sees it).
pub(super) fn refusal_record(flow: &FlowId, seq: u64, now: Timestamp, reason: &str) -> Bytes {
    let m = comms::FlowMessage {
        flow_id: flow.to_string(),
        seq,
        payload: Some(comms::flow_message::Payload::Logs(comms::LogLines {
            lines: vec![comms::LogLine {
                time_unix_ms: now.as_ms(),
                level: "ERROR".into(),
                message: format!("message {seq} refused by the server: {reason}"),
            }],
        })),
    };
    Bytes::from(m.encode_to_vec())
}

/// Finds and decodes a flow's stored messages, wherever they were written (`None` if the
/// filestore failed).
pub(super) async fn audit(
    fs: &Filestore,
    key: &FlowKey,
    limits: &CodecLimits,
) -> Option<Vec<StoredMessage>> {
    let found = match fs.audit(&key.client, &key.flow).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(client = %key.client, flow = %key.flow, error = %e, "cannot audit a flow's stored messages");
            return None;
        }
    };
    let mut out = Vec::new();
    for (_, bytes) in found {
        let msg = comms::FlowMessage::decode(bytes).ok()?;
        let seq = msg.seq;
        let input = codec::validate(
            comms::ClientMessage {
                kind: Some(client_message::Kind::Flow(msg)),
            },
            limits,
        )
        .ok()?;
        if let ClientInput::Flow { data, .. } = input {
            out.push(StoredMessage {
                seq,
                payload: data.tracker_payload(),
            });
        }
    }
    Some(out)
}

/// A minion's completion as the event it replicates to the master.
pub(super) fn completion_event(o: talon_core::flows::FlowOutcome, runs: Vec<RunRef>) -> Event {
    Event::FlowCompleted(pc::FlowCompleted {
        client_id: o.key.client.to_string(),
        flow_id: o.key.flow.to_string(),
        hunt_id: String::new(),
        state: match o.state {
            FinalState::Completed => comms::FlowState::Completed,
            FinalState::Error => comms::FlowState::Error,
        } as i32,
        error: o.error,
        rows: o.rows,
        uploaded_bytes: o.uploaded_bytes,
        uploads: o.uploads,
        messages: o.messages,
        runs: runs.into_iter().map(Into::into).collect(),
    })
}
