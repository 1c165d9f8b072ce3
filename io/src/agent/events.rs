//! Client event monitoring on the agent (docs/events.md): the event artifacts the client event
//! table assigns run here continuously, each as a *runner* — its event source collects what
//! happened, its query runs over each batch, and its rows go out as `EventBatch`es on the stream.
//!
//! Each runner is one *stream*: named by the agent's start and a counter, its batches numbered
//! 0, 1, 2, ... when made, and kept by core `agent::FlowOutbox` (the flow protocol's numbering,
//! keeping until settled, resending after a reconnect). At most the frontend's `max_in_flight`
//! batches of a stream are in the outbox; the rest wait in this agent's buffer. A real agent's
//! buffer is on its local disk ([`super::spool`]): every batch is written there when made, and
//! after a restart what was not settled goes again under its stream and number; at most
//! [`BUFFER_MEMORY_MAX`] of the waiting batches are also held in memory. A virtual agent (the
//! load generator) buffers in memory only, up to [`BUFFER_MEMORY_MAX`]. Beyond the buffer's bound
//! a new batch is dropped, and counted: the stream's later batches carry the count
//! (`EventBatch.dropped`), so storage records what was lost, and the agent logs it.

use super::spool::{Loc, Spool, SpoolError};
use crate::clock::Clock;
use crate::query::{EventQuery, Host};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_core::agent::{FlowOutbox, OutboxAction, OutboxLimits, PushError};
use talon_core::artifacts::DEFINITION_PARAM;
use talon_proto::comms::{self, client_message};
use tokio::sync::{mpsc, watch};

/// Event batches (bytes of rows) waiting in memory for room in the outbox, for all streams
/// together; beyond it a new batch waits only on disk, or without a disk buffer is dropped and
/// counted.
pub const BUFFER_MEMORY_MAX: usize = 8 << 20;
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

/// A batch waiting for room in the outbox.
struct Waiting {
    seq: u64,
    /// Its stamp, if known without reading it (a batch found on disk after a restart: not).
    stamp: Option<Stamp>,
    body: Body,
}

enum Body {
    Memory(comms::EventBatch),
    Disk(Loc),
}

struct State {
    outbox: FlowOutbox<comms::EventBatch, Stamp>,
    /// Batches waiting for room in the outbox, per stream (its outbox flow).
    pending: BTreeMap<String, VecDeque<Waiting>>,
    /// Bytes of the batches waiting in memory.
    pending_bytes: usize,
    /// The next number of each running stream.
    next_seq: BTreeMap<String, u64>,
    /// The buffer on disk (a real agent).
    spool: Option<Spool>,
    /// Streams found on disk at start: sent until settled, then forgotten.
    recovered: BTreeSet<String>,
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
    /// Told of every acknowledgement of a batch: (`<artifact>/<stream>`, seq, settled).
    observer: Option<super::AckObserver>,
}

impl State {
    /// Forgets stream `flow`: its batches kept, waiting and on disk; answers how many there were.
    fn forget(&mut self, flow: &str) -> usize {
        let kept = self.outbox.abandon(flow);
        let waiting = self.pending.remove(flow).unwrap_or_default();
        for w in &waiting {
            if let Body::Memory(b) = &w.body {
                self.pending_bytes -= batch_bytes(b);
            }
        }
        self.next_seq.remove(flow);
        if let (Some(sp), Some(stream)) = (self.spool.as_mut(), stream_of(flow)) {
            sp.forget(stream);
        }
        kept + waiting.len()
    }
}

/// The streams' outbox: room for the 32 artifacts the table can start and `recovered` streams
/// found on disk.
fn event_outbox(recovered: usize) -> FlowOutbox<comms::EventBatch, Stamp> {
    FlowOutbox::new(OutboxLimits {
        resend_after_ms: super::RESEND_AFTER_MS,
        done_max: 0,
        flows_max: talon_core::events::PER_CLIENT_MAX + recovered,
    })
}

impl Default for Events {
    fn default() -> Events {
        Events {
            state: Arc::new(Mutex::new(State {
                outbox: event_outbox(0),
                pending: BTreeMap::new(),
                pending_bytes: 0,
                next_seq: BTreeMap::new(),
                spool: None,
                recovered: BTreeSet::new(),
                session: None,
                runners: BTreeMap::new(),
                next_stream: 0,
            })),
            times: None,
            clock: None,
            observer: None,
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

/// The stream of an outbox flow.
fn stream_of(flow: &str) -> Option<u64> {
    flow.rsplit_once('/').and_then(|(_, s)| s.parse().ok())
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

    /// Events whose buffer is on disk in `dir`, bounded to `max_bytes` (a real agent): streams
    /// found there — batches made before a restart and not settled — are sent again first, under
    /// their stream and numbers.
    pub fn on_disk(dir: &std::path::Path, max_bytes: u64) -> Result<Events, String> {
        let (spool, found) = Spool::open(dir, max_bytes)?;
        let events = Events::default();
        {
            let mut s = events.lock();
            // Room for the streams found beside those the client event table starts.
            s.outbox = event_outbox(found.len());
            for r in found {
                let flow = flow_of(&r.artifact, r.stream);
                let first = r.batches.first().map_or(0, |b| b.0);
                tracing::info!(artifact = %r.artifact, stream = r.stream, batches = r.batches.len(), "event batches buffered before the restart are sent again");
                s.outbox.begin_at(&flow, first);
                let queue = r
                    .batches
                    .into_iter()
                    .map(|(seq, loc)| Waiting {
                        seq,
                        stamp: None,
                        body: Body::Disk(loc),
                    })
                    .collect();
                s.pending.insert(flow.clone(), queue);
                s.recovered.insert(flow);
            }
            s.spool = Some(spool);
        }
        Ok(events)
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
            spool,
            ..
        } = s;
        let mut gone = 0i64;
        for (flow, queue) in pending.iter_mut() {
            while let Some(w) = queue.front() {
                if !outbox.has_room(flow) && outbox.kept(flow) > 0 {
                    break; // Not read from disk only to be refused.
                }
                let (batch, stamp) = match &w.body {
                    Body::Memory(b) => (b.clone(), w.stamp),
                    Body::Disk(loc) => match spool.as_ref().map(|sp| sp.read(*loc)) {
                        Some(Ok(b)) => (b, w.stamp),
                        Some(Err(e)) => {
                            // Tried again at the next pump (an acknowledgement or a second).
                            tracing::warn!(stream = %flow, error = %e, "cannot read an event batch back from the buffer");
                            break;
                        }
                        None => unreachable!("a batch on disk without a disk buffer"),
                    },
                };
                let stamp = stamp.unwrap_or((
                    batch.time_unix_ms,
                    u32::try_from(batch.rows.len()).unwrap_or(u32::MAX),
                ));
                match outbox.push(now, flow, batch, false, stamp) {
                    Ok(seq) => {
                        debug_assert_eq!(seq, w.seq, "a stream's batches are pushed in order");
                        let w = queue.pop_front().expect("a front");
                        if let Body::Memory(b) = &w.body {
                            *pending_bytes -= batch_bytes(b);
                        }
                    }
                    Err(PushError::Full { .. }) => break,
                    Err(PushError::NotRunning) => {
                        // The stream was abandoned: its waiting batches go with it.
                        for w in queue.drain(..) {
                            if let Body::Memory(b) = &w.body {
                                *pending_bytes -= batch_bytes(b);
                            }
                            gone += i64::from(w.stamp.map_or(0, |s| s.1));
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
                    flow,
                    seq,
                    stamp: (made_ms, rows),
                } => {
                    if let (Some(sp), Some(stream)) = (s.spool.as_mut(), stream_of(&flow)) {
                        sp.settled(stream, seq);
                    }
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
        // A stream from before the restart with nothing left is over.
        let over: Vec<String> = s
            .recovered
            .iter()
            .filter(|f| !s.pending.contains_key(*f) && s.outbox.kept(f) == 0)
            .cloned()
            .collect();
        for flow in over {
            s.recovered.remove(&flow);
            s.forget(&flow);
            tracing::info!(stream = %flow, "event batches buffered before the restart are stored");
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

    /// These events, telling `observer` of every acknowledgement of a batch (the simulator
    /// checks what an agent was told against what storage holds).
    pub fn observed(self, observer: super::AckObserver) -> Events {
        Events {
            observer: Some(observer),
            ..self
        }
    }

    /// The frontend acknowledged a batch.
    pub(super) async fn ack(&self, a: &comms::EventAck, now: talon_core::Monotonic) {
        if let Some(o) = &self.observer {
            o(&flow_of(&a.artifact, a.stream), a.seq, a.settled);
        }
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

    /// A runner made a batch: numbered, written to the disk buffer (if any), then into the outbox
    /// if it has room, else waiting; dropped (counted in `dropped`) beyond the buffer's bound.
    async fn offer(
        &self,
        flow: &str,
        mut batch: comms::EventBatch,
        made_ms: u64,
        dropped: &AtomicU64,
        now: talon_core::Monotonic,
    ) {
        let (out, session) = {
            let mut s = self.lock();
            let State {
                pending,
                pending_bytes,
                next_seq,
                spool,
                ..
            } = &mut *s;
            let Some(seq) = next_seq.get_mut(flow) else {
                return; // The runner was stopped meanwhile.
            };
            batch.seq = *seq;
            let size = batch_bytes(&batch);
            let n = batch.rows.len() as u64;
            let in_memory = *pending_bytes + size <= BUFFER_MEMORY_MAX;
            let placed = match spool {
                Some(sp) => match sp.append(&batch) {
                    Ok(loc) => Ok(Some(loc)),
                    Err(SpoolError::Full { max }) => Err(max),
                    Err(SpoolError::Io(e)) => {
                        // The disk refused: held in memory only, while there is room.
                        tracing::warn!(stream = %flow, error = %e, "cannot write an event batch to the disk buffer");
                        if in_memory {
                            Ok(None)
                        } else {
                            Err(BUFFER_MEMORY_MAX as u64)
                        }
                    }
                },
                None if in_memory => Ok(None),
                None => Err(BUFFER_MEMORY_MAX as u64),
            };
            let loc = match placed {
                Ok(loc) => loc,
                Err(max_bytes) => {
                    let before = dropped.fetch_add(n, Ordering::Relaxed);
                    if let Some(t) = &self.times {
                        t.events_dropped(n);
                    }
                    if before == 0 || (before + n) / 10_000 > before / 10_000 {
                        tracing::warn!(stream = %flow, dropped = before + n, max_bytes, "the event buffer is full; events are dropped (counted in the stream's batches)");
                    }
                    return;
                }
            };
            let number = *seq;
            *seq += 1;
            if let Some(t) = &self.times {
                t.events_waiting(n as i64);
            }
            let stamp = Some((made_ms, u32::try_from(n).unwrap_or(u32::MAX)));
            let body = match loc {
                Some(loc) if !in_memory => Body::Disk(loc),
                _ => {
                    *pending_bytes += size;
                    Body::Memory(batch)
                }
            };
            pending
                .entry(flow.to_owned())
                .or_default()
                .push_back(Waiting {
                    seq: number,
                    stamp,
                    body,
                });
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
                let unsent = s.forget(&r.flow);
                tracing::info!(artifact = %name, unsent, "event artifact stopped");
            }
        }
        // A stream from before a restart whose artifact no longer runs here is not wanted.
        let unwanted: Vec<String> = s
            .recovered
            .iter()
            .filter(|f| !wanted.contains_key(f.rsplit_once('/').map_or(f.as_str(), |x| x.0)))
            .cloned()
            .collect();
        for flow in unwanted {
            s.recovered.remove(&flow);
            let unsent = s.forget(&flow);
            tracing::warn!(stream = %flow, unsent, "event batches buffered before the restart are discarded: their artifact no longer runs on this client");
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
            s.next_seq.insert(flow.clone(), 0);
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

/// Where an agent whose writeback file is `writeback` keeps its event buffer: beside it, named
/// after it (`talon.writeback.yaml` → `talon.writeback.events/`).
pub fn buffer_dir(writeback: &std::path::Path) -> std::path::PathBuf {
    let stem = writeback
        .file_stem()
        .map_or_else(|| "talon".into(), |s| s.to_string_lossy().into_owned());
    writeback.with_file_name(format!("{stem}.events"))
}

/// The disk buffer's bound from the client config, checked: it must hold a few whole batches.
pub fn buffer_bytes(c: &crate::deploy::config::ClientSection) -> Result<u64, String> {
    let min = 4 * BATCH_BYTES_MAX as u64;
    if c.events_buffer_bytes < min {
        return Err(format!(
            "Client.events_buffer_bytes: {} is too small; it must hold a few whole event batches \
             (at least {min})",
            c.events_buffer_bytes
        ));
    }
    Ok(c.events_buffer_bytes)
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

/// Where in the poll period a runner of `artifact` on `host` polls: spread evenly over hosts and
/// artifacts by a hash of both (a real agent's host is this machine).
fn poll_phase_ms(host: &Host, artifact: &str) -> u64 {
    use sha2::Digest;
    let name = match host {
        Host::Virtual { hostname, .. } => hostname.as_ref(),
        Host::Real => "",
    };
    let h = sha2::Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update([0])
        .chain_update(artifact.as_bytes())
        .finalize();
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % POLL_MS
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
        let source = super::sources::Source::new(
            self.query.table(),
            &self.params,
            out.clock.monotonic(),
            out.clock.now(),
            &self.host,
        );
        let mut source = match source {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(artifact = %out.artifact, error = %e, "cannot run an event artifact");
                return;
            }
        };
        let poll = Duration::from_millis(POLL_MS);
        // Runners started by one table change (every client at once) would poll in lockstep: a
        // burst of batches each second. Each starts at its own phase within the poll period,
        // fixed by its host and artifact (deterministic, so the simulator stays a function of
        // its seed).
        let phase = Duration::from_millis(poll_phase_ms(&self.host, &out.artifact));
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(phase) => {}
        }
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(poll) => {}
            }
            let (now, wall) = (out.clock.monotonic(), out.clock.now());
            let (rows, made_ms) = match source.poll(now, wall) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runners of many virtual agents poll at phases spread over the period, not together; the
    /// same host and artifact always get the same phase.
    #[test]
    fn poll_phases_spread_over_the_period() {
        let cache = crate::query::TableCache::new(Arc::new(crate::clock::SystemClock));
        let host = |i: usize| Host::Virtual {
            hostname: format!("pool-{i}").into(),
            cache: cache.clone(),
        };
        let mut per_tenth = [0usize; 10];
        for i in 0..1000 {
            let p = poll_phase_ms(&host(i), "Generic.Events.Test");
            assert!(p < POLL_MS);
            per_tenth[(p * 10 / POLL_MS) as usize] += 1;
        }
        assert!(
            per_tenth.iter().all(|&n| (50..150).contains(&n)),
            "{per_tenth:?}"
        );
        assert_eq!(poll_phase_ms(&host(1), "A"), poll_phase_ms(&host(1), "A"));
    }
}
