//! Client event monitoring on the agent (docs/events.md): the event artifacts the client event
//! table assigns run here continuously, each as a *runner* — its event source collects what
//! happened, its query runs over each batch, and its rows go out as `EventBatch`es on the stream.
//!
//! Each runner is one *stream*: named by the agent's start and a counter, its batches numbered
//! 0, 1, 2, ... by core `agent::FlowOutbox` (the flow protocol's numbering, keeping until settled,
//! resending after a reconnect). At most the frontend's `max_in_flight` batches of a stream are in
//! the outbox; the rest wait in this agent's buffer, at most [`BUFFER_BYTES_MAX`] for all streams
//! together. Beyond it a new batch is dropped, and counted: the stream's later batches carry the
//! count (`EventBatch.dropped`), so storage records what was lost, and the agent logs it.

use crate::clock::Clock;
use crate::query::{EventQuery, Host, table::Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_core::agent::{FlowOutbox, OutboxAction, OutboxLimits, PushError};
use talon_core::artifacts::DEFINITION_PARAM;
use talon_proto::comms::{self, client_message};
use tokio::sync::{mpsc, watch};

/// Event batches (bytes of rows) waiting for room in the outbox, for all streams together; beyond
/// it a new batch is dropped and counted.
pub const BUFFER_BYTES_MAX: usize = 8 << 20;
/// Rows per batch at most (also bounded by the frontend's `max_rows_per_batch`).
pub const BATCH_ROWS_MAX: usize = 1000;
/// Bytes of rows per batch at most.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// How often a source is polled: what it found since is one batch.
pub const POLL_MS: u64 = 1000;
/// How long one batch's query may run.
pub const QUERY_TIMEOUT_MS: u64 = 10_000;

/// One event artifact running: how to stop it and what it dropped.
struct Runner {
    flow: String,
    params: BTreeMap<String, String>,
    stop: watch::Sender<bool>,
}

/// What a batch's entry in the outbox carries: when its oldest event was made (ms since the
/// epoch) and how many events it holds.
type Stamp = (u64, u32);

struct State {
    outbox: FlowOutbox<comms::EventBatch, Stamp>,
    /// Batches waiting for room in the outbox, per stream (its outbox flow).
    pending: BTreeMap<String, VecDeque<(comms::EventBatch, Stamp)>>,
    pending_bytes: usize,
    session: Option<mpsc::Sender<comms::ClientMessage>>,
    runners: BTreeMap<String, Runner>,
    next_stream: u64,
}

/// The agent's event streams, shared by every session.
#[derive(Clone)]
pub struct Events {
    state: Arc<Mutex<State>>,
    /// Where the load generator's figures go.
    times: Option<Arc<super::ServiceTimes>>,
    clock: Option<Arc<dyn Clock>>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            state: Arc::new(Mutex::new(State {
                outbox: FlowOutbox::new(OutboxLimits {
                    resend_after_ms: super::RESEND_AFTER_MS,
                    done_max: 0,
                    flows_max: talon_core::events::PER_CLIENT_MAX,
                }),
                pending: BTreeMap::new(),
                pending_bytes: 0,
                session: None,
                runners: BTreeMap::new(),
                next_stream: 0,
            })),
            times: None,
            clock: None,
        }
    }
}

fn batch_bytes(b: &comms::EventBatch) -> usize {
    b.rows.iter().map(|r| r.len()).sum::<usize>() + 64
}

fn events_msg(b: comms::EventBatch) -> comms::ClientMessage {
    comms::ClientMessage {
        kind: Some(client_message::Kind::Events(b)),
    }
}

/// The outbox flow of `artifact`'s stream `stream`.
fn flow_of(artifact: &str, stream: u64) -> String {
    format!("{artifact}/{stream}")
}

impl Events {
    /// Events recording their latency (oldest event made → batch settled) and the events
    /// waiting into `times` (the load generator's figures).
    pub fn recording(times: Arc<super::ServiceTimes>) -> Events {
        Events {
            times: Some(times),
            clock: Some(Arc::new(crate::clock::SystemClock)),
            ..Events::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves waiting batches into the outbox while it has room; answers what to send.
    fn pump(&self, s: &mut State, now: talon_core::Monotonic) -> Vec<comms::EventBatch> {
        let State {
            outbox,
            pending,
            pending_bytes,
            ..
        } = s;
        let mut gone = 0i64;
        for (flow, queue) in pending.iter_mut() {
            while let Some((b, stamp)) = queue.front() {
                match outbox.push(now, flow, b.clone(), false, *stamp) {
                    Ok(_) => {
                        let (b, _) = queue.pop_front().expect("a front");
                        *pending_bytes -= batch_bytes(&b);
                    }
                    Err(PushError::Full { .. }) => break,
                    Err(PushError::NotRunning) => {
                        // The stream was abandoned: its waiting batches go with it.
                        for (b, stamp) in queue.drain(..) {
                            *pending_bytes -= batch_bytes(&b);
                            gone += i64::from(stamp.1);
                        }
                    }
                }
            }
        }
        pending.retain(|_, q| !q.is_empty());
        let mut out = Vec::new();
        while let Some(a) = s.outbox.poll_action() {
            match a {
                OutboxAction::Send {
                    seq, mut payload, ..
                } => {
                    payload.seq = seq;
                    out.push(payload);
                }
                OutboxAction::Settled {
                    stamp: (made_ms, rows),
                    ..
                } => {
                    gone += i64::from(rows);
                    if let (Some(t), Some(c)) = (&self.times, &self.clock) {
                        let ms = c.now().as_ms().saturating_sub(made_ms);
                        t.record_events(u64::from(rows), ms.saturating_mul(1000));
                    }
                }
                OutboxAction::FirstAck { .. } | OutboxAction::Ended { .. } => {}
            }
        }
        if let Some(t) = &self.times {
            t.events_waiting(-gone);
        }
        out
    }

    /// Sends `batches` on the stream, if one is up (else they are kept and resent on attach).
    async fn send(
        session: Option<mpsc::Sender<comms::ClientMessage>>,
        batches: Vec<comms::EventBatch>,
    ) {
        if let Some(tx) = session {
            for b in batches {
                if tx.send(events_msg(b)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A new stream is up: every batch not settled goes again.
    pub(super) async fn attach(
        &self,
        tx: mpsc::Sender<comms::ClientMessage>,
        max_in_flight: usize,
        now: talon_core::Monotonic,
    ) {
        let out = {
            let mut s = self.lock();
            s.session = Some(tx.clone());
            s.outbox.handle_connected(now, max_in_flight);
            self.pump(&mut s, now)
        };
        Self::send(Some(tx), out).await;
    }

    /// The stream is gone.
    pub(super) fn detach(&self) {
        let mut s = self.lock();
        s.session = None;
        s.outbox.handle_disconnected();
    }

    /// The frontend acknowledged a batch.
    pub(super) async fn ack(&self, a: &comms::EventAck, now: talon_core::Monotonic) {
        let (out, session) = {
            let mut s = self.lock();
            s.outbox
                .handle_ack(now, &flow_of(&a.artifact, a.stream), a.seq, a.settled);
            (self.pump(&mut s, now), s.session.clone())
        };
        Self::send(session, out).await;
    }

    /// Batches unacknowledged for too long, to send again.
    pub(super) async fn resend_stale(&self, now: talon_core::Monotonic) {
        let (out, session) = {
            let mut s = self.lock();
            s.outbox.handle_timeout(now);
            (self.pump(&mut s, now), s.session.clone())
        };
        Self::send(session, out).await;
    }

    /// A runner made a batch: into the outbox if it has room, else into the buffer, else dropped
    /// (counted in `dropped`).
    async fn offer(
        &self,
        flow: &str,
        batch: comms::EventBatch,
        made_ms: u64,
        dropped: &AtomicU64,
        now: talon_core::Monotonic,
    ) {
        let (out, session) = {
            let mut s = self.lock();
            let size = batch_bytes(&batch);
            let n = batch.rows.len() as u64;
            if s.pending_bytes + size > BUFFER_BYTES_MAX {
                let before = dropped.fetch_add(n, Ordering::Relaxed);
                if let Some(t) = &self.times {
                    t.events_dropped(n);
                }
                if before == 0 || (before + n) / 10_000 > before / 10_000 {
                    tracing::warn!(stream = %flow, dropped = before + n, max_bytes = BUFFER_BYTES_MAX, "the event buffer is full; events are dropped (counted in the stream's batches)");
                }
                return;
            }
            s.pending_bytes += size;
            if let Some(t) = &self.times {
                t.events_waiting(n as i64);
            }
            let stamp = (made_ms, u32::try_from(n).unwrap_or(u32::MAX));
            s.pending
                .entry(flow.to_owned())
                .or_default()
                .push_back((batch, stamp));
            (self.pump(&mut s, now), s.session.clone())
        };
        Self::send(session, out).await;
    }

    /// The client event table arrived: starts the artifacts it names that are not running (or
    /// run with other parameters), stops those it does not name.
    pub(super) async fn set_table(
        &self,
        table: comms::EventTable,
        clock: Arc<dyn Clock>,
        host: Host,
    ) {
        let wanted: BTreeMap<String, BTreeMap<String, String>> = table
            .artifacts
            .into_iter()
            .take(talon_core::events::PER_CLIENT_MAX)
            .map(|a| (a.artifact, a.params.into_iter().collect()))
            .collect();
        let mut s = self.lock();
        let stale: Vec<String> = s
            .runners
            .iter()
            .filter(|(name, r)| wanted.get(*name) != Some(&r.params))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = s.runners.remove(&name) {
                let _ = r.stop.send(true);
                let kept = s.outbox.abandon(&r.flow);
                let waiting = s.pending.remove(&r.flow).unwrap_or_default();
                for (b, _) in &waiting {
                    s.pending_bytes -= batch_bytes(b);
                }
                tracing::info!(artifact = %name, unsent = kept + waiting.len(), "event artifact stopped");
            }
        }
        let start_ms = clock.now().as_ms();
        for (name, params) in wanted {
            if s.runners.contains_key(&name) {
                continue;
            }
            let spec = match resolve(&name, &params) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::warn!(artifact = %name, error = %e, "cannot run an event artifact");
                    continue;
                }
            };
            let query = match EventQuery::new(&spec, &params, host.clone()) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(artifact = %name, error = %e, "cannot run an event artifact");
                    continue;
                }
            };
            // Unique per agent run and runner: the agent's start (ms) and a counter.
            s.next_stream += 1;
            let stream = (start_ms << 16) | (s.next_stream & 0xffff);
            let flow = flow_of(&name, stream);
            s.outbox.begin(&flow);
            let (stop, stopped) = watch::channel(false);
            s.runners.insert(
                name.clone(),
                Runner {
                    flow: flow.clone(),
                    params: params.clone(),
                    stop,
                },
            );
            tracing::info!(artifact = %name, table = query.table(), "event artifact started");
            let run = Run {
                out: Outlet {
                    events: self.clone(),
                    artifact: name,
                    stream,
                    flow,
                    clock: clock.clone(),
                },
                params,
                query,
                host: host.clone(),
            };
            tokio::spawn(run.run(stopped));
        }
    }
}

/// The definition of an assigned event artifact: a built-in by name, or the compiled one its
/// entry carries.
fn resolve(
    name: &str,
    params: &BTreeMap<String, String>,
) -> Result<talon_core::artifacts::ArtifactSpec, String> {
    let spec = match params.get(DEFINITION_PARAM) {
        Some(compiled) => crate::definitions::from_task(compiled)?,
        None => crate::definitions::builtin(name)
            .ok_or_else(|| format!("unknown event artifact {name}"))?
            .spec
            .clone(),
    };
    if !spec.event {
        return Err(format!("{name} is not an event artifact"));
    }
    Ok(spec)
}

/// What collects an event table's rows.
enum Source {
    /// `talon_test_events`: `rate` per second.
    Test {
        rate: u64,
        payload: String,
        started: talon_core::Monotonic,
        /// `started` on the wall clock: event `n` is due `n / rate` seconds after it.
        started_wall: talon_core::Timestamp,
        made: u64,
    },
    /// `process_events`: pids seen at the last scan (none before the first).
    Processes { seen: Option<BTreeSet<i32>> },
}

impl Source {
    fn new(
        table: &str,
        params: &BTreeMap<String, String>,
        now: talon_core::Monotonic,
        wall: talon_core::Timestamp,
    ) -> Source {
        let int = |k: &str, d: u64| params.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        match table {
            "talon_test_events" => Source::Test {
                rate: int("rate", 10),
                payload: "x".repeat(int("payload_bytes", 0).min(64 << 10) as usize),
                started: now,
                started_wall: wall,
                made: 0,
            },
            _ => Source::Processes { seen: None },
        }
    }

    /// What happened since the last poll, as rows of the event table, and when the oldest of
    /// them happened (ms since the epoch).
    fn poll(
        &mut self,
        now: talon_core::Monotonic,
        wall: talon_core::Timestamp,
        host: &Host,
    ) -> Result<(Vec<Vec<Value>>, u64), String> {
        match self {
            Source::Test {
                rate,
                payload,
                started,
                started_wall,
                made,
            } => {
                let due = now.since_ms(*started).saturating_mul(*rate) / 1000;
                // At most ten seconds' worth at once (a stalled runner does not flood).
                let n = due
                    .saturating_sub(*made)
                    .min(rate.saturating_mul(10).max(1));
                // Each event is stamped with when it was due, not when the poll found it.
                let due_ms =
                    |k: u64| started_wall.as_ms() + k.saturating_mul(1000) / (*rate).max(1);
                let rows = (0..n)
                    .map(|i| {
                        let t = due_ms(*made + i);
                        vec![
                            Value::from(t / 1000),
                            Value::from(t),
                            Value::from(*made + i),
                            Value::from(payload.as_str()),
                        ]
                    })
                    .collect();
                let oldest = due_ms(*made);
                *made += n;
                Ok((rows, oldest))
            }
            Source::Processes { seen } => {
                if matches!(host, Host::Virtual { .. }) {
                    // A virtual agent has no processes of its own.
                    return Ok((Vec::new(), wall.as_ms()));
                }
                let now_pids = crate::query::linux::pids().map_err(|e| e.0)?;
                let new: Vec<i32> = match seen {
                    Some(before) => now_pids.difference(before).copied().collect(),
                    None => Vec::new(),
                };
                *seen = Some(now_pids);
                if new.is_empty() {
                    return Ok((Vec::new(), wall.as_ms()));
                }
                // Found now; started within the last poll.
                let rows = crate::query::linux::process_event_rows(&new).map_err(|e| e.0)?;
                Ok((rows, wall.as_ms()))
            }
        }
    }
}

/// One runner's task.
struct Run {
    out: Outlet,
    params: BTreeMap<String, String>,
    query: EventQuery,
    host: Host,
}

/// Where a runner's batches go.
struct Outlet {
    events: Events,
    artifact: String,
    stream: u64,
    flow: String,
    clock: Arc<dyn Clock>,
}

impl Run {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let dropped = AtomicU64::new(0);
        let out = &self.out;
        let mut source = Source::new(
            self.query.table(),
            &self.params,
            out.clock.monotonic(),
            out.clock.now(),
        );
        let poll = Duration::from_millis(POLL_MS);
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(poll) => {}
            }
            let (now, wall) = (out.clock.monotonic(), out.clock.now());
            let (rows, made_ms) = match source.poll(now, wall, &self.host) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(artifact = %out.artifact, error = %e, "an event source failed; trying again");
                    continue;
                }
            };
            if rows.is_empty() {
                continue;
            }
            let clock = out.clock.clone();
            let deadline = now.plus_ms(QUERY_TIMEOUT_MS);
            let made = match self.query.run(rows, move || clock.monotonic() >= deadline) {
                Ok(made) => made,
                Err(e) => {
                    tracing::warn!(artifact = %out.artifact, error = %e, "an event artifact's query failed on a batch");
                    continue;
                }
            };
            let day = wall.utc_day();
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let rows = made
                .into_iter()
                .map(|r| serde_json::to_vec(&r).unwrap_or_default());
            for row in rows {
                if !batch.is_empty()
                    && (batch.len() >= BATCH_ROWS_MAX || bytes + row.len() > BATCH_BYTES_MAX)
                {
                    out.offer(std::mem::take(&mut batch), &day, wall, made_ms, &dropped)
                        .await;
                    bytes = 0;
                }
                bytes += row.len();
                batch.push(bytes::Bytes::from(row));
            }
            if !batch.is_empty() {
                out.offer(batch, &day, wall, made_ms, &dropped).await;
            }
        }
    }
}

impl Outlet {
    async fn offer(
        &self,
        rows: Vec<bytes::Bytes>,
        day: &str,
        wall: talon_core::Timestamp,
        made_ms: u64,
        dropped: &AtomicU64,
    ) {
        let batch = comms::EventBatch {
            artifact: self.artifact.clone(),
            stream: self.stream,
            seq: 0, // Numbered by the outbox when it takes it.
            day: day.to_owned(),
            time_unix_ms: wall.as_ms(),
            rows,
            dropped: dropped.load(Ordering::Relaxed),
        };
        self.events
            .offer(&self.flow, batch, made_ms, dropped, self.clock.monotonic())
            .await;
    }
}
