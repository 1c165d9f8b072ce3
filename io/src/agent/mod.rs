//! The endpoint agent (`talon client`): keeps one stream to a frontend, runs the tasks pushed down it,
//! and sends results back in numbered messages, keeping each until the frontend acknowledges it.
//!
//! - Identity: a key made on first start and kept in the writeback file; the client id is derived from
//!   it. Each start makes a fresh self-signed certificate over the same key.
//! - Failover: starts at a random `Client.server_urls` entry, moves to the next on error, reconnects
//!   with jittered exponential backoff.
//! - Durability: every flow message is kept in the [`Outbox`] until the frontend says it is *settled*
//!   (on the shared volume), and resent, in order, after a reconnect (to any frontend). A message is
//!   acknowledged twice: first when the frontend has it durably on its local disk (the service time a
//!   client waits for), then settled once the frontend's write-behind buffer copied it to the volume.
//!   Keeping it between the two is what lets another frontend complete the flow if the first dies with
//!   the message still in its buffer. At most `max_in_flight` messages per flow are unsettled (the
//!   server's Welcome says how many); the artifact waits beyond that (back-pressure).

pub mod artifacts;
pub mod events;
mod sources;
pub mod spool;

use crate::clock::{Clock, Entropy};
use crate::deploy::config::ClientConfig;
use crate::deploy::pki;
use crate::net::tls;
use artifacts::Output;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_core::agent::{Begin, FlowOutbox, OutboxAction, OutboxLimits, PushError};
use talon_core::{ClientId, Monotonic};
use talon_proto::comms::{
    self, client_message, comms_client::CommsClient, flow_message, server_message,
};
use tokio::sync::{Notify, mpsc};

/// Rows per result message at most (the server may ask for fewer).
pub const BATCH_ROWS_MAX: usize = 1000;
/// Bytes of rows per result message at most.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// A partial batch is sent once its first row is this old.
pub const BATCH_AGE_MAX_MS: u64 = 200;
/// Bytes per upload chunk.
pub const CHUNK_BYTES: usize = 512 << 10;
/// Completed flow ids remembered to ignore a task delivered twice.
pub const DONE_REMEMBERED_MAX: usize = 1024;

/// Flows the agent runs (or keeps until their final status is settled) at once; a task beyond it
/// is not acknowledged, and the master sends it again (every 5 s) until one has ended.
pub const FLOWS_RUNNING_MAX: usize = 256;
/// Outgoing messages queued for the current stream.
pub const SEND_QUEUE_MAX: usize = 256;
/// A message unacknowledged this long is sent again (a refusal under load, or a lost ack): like a TCP
/// retransmission timer. Safe because the frontend stores each (flow, seq) once.
pub const RESEND_AFTER_MS: u64 = 2000;

/// What the writeback file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Writeback {
    /// The id derived from the key (informational; always re-derived).
    pub client_id: String,
    /// The client's private key (PEM).
    pub private_key: String,
}

/// Loads the writeback file, or makes a new identity and writes it.
pub fn load_or_create_identity(
    path: &Path,
    clock: &dyn Clock,
) -> Result<(pki::Pem, ClientId), String> {
    if path.exists() {
        let wb: Writeback = crate::deploy::config::read_yaml(path).map_err(|e| e.to_string())?;
        return pki::endpoint_certificate(&wb.private_key, clock.now())
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let (pem, id) = pki::new_endpoint_identity(clock.now()).map_err(|e| e.to_string())?;
    let wb = Writeback {
        client_id: id.to_string(),
        private_key: pem.private_key.clone(),
    };
    crate::deploy::config::write_yaml(path, &wb).map_err(|e| e.to_string())?;
    Ok((pem, id))
}

/// The outbox's state: the core's flow outbox (numbering, keeping until settled, resending,
/// failover) and the stream it sends on.
struct OutboxState {
    flows: FlowOutbox<flow_message::Payload, tokio::time::Instant>,
    session: Option<mpsc::Sender<comms::ClientMessage>>,
    /// Flows an analyst cancelled, with why (the newest [`CANCELLED_REMEMBERED_MAX`]): one running
    /// stops and reports failed; a task for one not started is acknowledged and not run.
    cancelled: std::collections::VecDeque<(String, String)>,
}

/// Cancelled flows the agent remembers (a cancel can arrive before its task).
pub const CANCELLED_REMEMBERED_MAX: usize = 1024;

impl Default for OutboxState {
    fn default() -> OutboxState {
        OutboxState {
            flows: FlowOutbox::new(OutboxLimits {
                resend_after_ms: RESEND_AFTER_MS,
                done_max: DONE_REMEMBERED_MAX,
                flows_max: FLOWS_RUNNING_MAX,
            }),
            session: None,
            cancelled: std::collections::VecDeque::new(),
        }
    }
}

/// Service times the agent observed: from a message's first send to its first acknowledgement.
/// Also counts the agents sharing it that are connected now (the load generator's view).
#[derive(Debug, Default)]
pub struct ServiceTimes {
    inner: Mutex<ServiceTimesInner>,
    connected: std::sync::atomic::AtomicUsize,
    /// Events made and not yet settled (in the agents' buffers and outboxes).
    events_waiting: std::sync::atomic::AtomicI64,
    /// Events dropped at the agents' buffer bound.
    events_dropped: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct ServiceTimesInner {
    data: talon_core::histogram::Histogram,
    finals: talon_core::histogram::Histogram,
    /// Events: from the oldest event of a batch being made to the batch settled (µs).
    events: talon_core::histogram::Histogram,
    events_settled: u64,
}

/// Counts one connected agent while alive.
struct Connected<'a>(&'a ServiceTimes);

impl<'a> Connected<'a> {
    fn new(t: &'a ServiceTimes) -> Connected<'a> {
        t.connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Connected(t)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0
            .connected
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ServiceTimes {
    fn record(&self, is_final: bool, micros: u64) {
        let mut s = self.inner.lock().expect("service times lock poisoned");
        if is_final {
            s.finals.record(micros);
        } else {
            s.data.record(micros);
        }
    }

    /// An event batch of `rows` events settled, `micros` after its oldest event was made.
    pub(crate) fn record_events(&self, rows: u64, micros: u64) {
        let mut s = self.inner.lock().expect("service times lock poisoned");
        s.events.record(micros);
        s.events_settled += rows;
    }

    /// Events made (positive) or settled or dropped (negative) since the last call.
    pub(crate) fn events_waiting(&self, delta: i64) {
        self.events_waiting
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    /// Events dropped at an agent's buffer bound.
    pub(crate) fn events_dropped(&self, n: u64) {
        self.events_dropped
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Data messages (rows, chunks, logs), and final statuses (acknowledged only once the flow is
    /// complete, so theirs is the completion latency).
    pub fn snapshot(
        &self,
    ) -> (
        talon_core::histogram::Histogram,
        talon_core::histogram::Histogram,
    ) {
        let s = self.inner.lock().expect("service times lock poisoned");
        (s.data.clone(), s.finals.clone())
    }

    /// The figures as JSON: count, p50, p99 and max in milliseconds, for data messages and finals.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |us: u64| us as f64 / 1000.0;
        let one = |h: &talon_core::histogram::Histogram| {
            serde_json::json!({
                "count": h.count(),
                "p50_ms": ms(h.quantile(0.5)),
                "p99_ms": ms(h.quantile(0.99)),
                "max_ms": ms(h.max()),
            })
        };
        let (data, finals) = self.snapshot();
        let connected = self.connected.load(std::sync::atomic::Ordering::Relaxed);
        let (events, settled) = {
            let s = self.inner.lock().expect("service times lock poisoned");
            (s.events.clone(), s.events_settled)
        };
        let mut ev = one(&events);
        ev["batches"] = ev["count"].take();
        ev["settled"] = settled.into();
        ev["waiting"] = self
            .events_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            .into();
        ev["dropped"] = self
            .events_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            .into();
        serde_json::json!({
            "connected": connected,
            "data": one(&data),
            "finals": one(&finals),
            "events": ev,
        })
    }
}

/// Told of every acknowledgement the agent receives: `(flow, seq, settled)`.
pub type AckObserver = Arc<dyn Fn(&str, u64, bool) + Send + Sync>;

/// Flow messages not yet settled, shared by every session of the agent.
#[derive(Clone, Default)]
pub struct Outbox {
    state: Arc<Mutex<OutboxState>>,
    /// The event artifacts running and their batches not yet settled (docs/events.md).
    pub events: events::Events,
    acked: Arc<Notify>,
    times: Option<Arc<ServiceTimes>>,
    observer: Option<AckObserver>,
}

fn flow_msg(m: comms::FlowMessage) -> comms::ClientMessage {
    comms::ClientMessage {
        kind: Some(client_message::Kind::Flow(m)),
    }
}

impl Outbox {
    /// Remembers that `flow` is cancelled (the oldest is forgotten beyond
    /// [`CANCELLED_REMEMBERED_MAX`]).
    pub fn cancel(&self, flow: &str, reason: &str) {
        let mut s = self.state.lock().expect("outbox lock");
        if s.cancelled.iter().any(|(f, _)| f == flow) {
            return;
        }
        if s.cancelled.len() >= CANCELLED_REMEMBERED_MAX {
            s.cancelled.pop_front();
        }
        s.cancelled.push_back((flow.to_owned(), reason.to_owned()));
    }

    /// Why `flow` was cancelled, if it was.
    pub fn cancelled(&self, flow: &str) -> Option<String> {
        let s = self.state.lock().expect("outbox lock");
        s.cancelled
            .iter()
            .find(|(f, _)| f == flow)
            .map(|(_, why)| why.clone())
    }

    /// An outbox that records service times into `times` (the load generator's measurements).
    pub fn recording(times: Arc<ServiceTimes>) -> Outbox {
        Outbox {
            events: events::Events::recording(times.clone()),
            times: Some(times),
            ..Outbox::default()
        }
    }

    /// This outbox, telling `observer` of every acknowledgement it receives (the simulator checks
    /// what a client was told against what storage holds).
    pub fn observed(self, observer: AckObserver) -> Outbox {
        Outbox {
            observer: Some(observer),
            ..self
        }
    }

    /// This outbox, telling `observer` of every acknowledgement of an event batch, as
    /// `(<artifact>/<stream>, seq, settled)`.
    pub fn observed_events(self, observer: AckObserver) -> Outbox {
        Outbox {
            events: self.events.clone().observed(observer),
            ..self
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().expect("outbox lock poisoned")
    }

    /// Performs the core outbox's actions under the lock: returns the messages to send (the caller
    /// sends them outside it) and records service times.
    fn drain(&self, s: &mut OutboxState) -> Vec<comms::FlowMessage> {
        let mut out = Vec::new();
        while let Some(a) = s.flows.poll_action() {
            match a {
                OutboxAction::Send { flow, seq, payload } => out.push(comms::FlowMessage {
                    flow_id: flow,
                    seq,
                    payload: Some(payload),
                }),
                OutboxAction::FirstAck {
                    is_final, stamp, ..
                } => {
                    if let Some(t) = &self.times {
                        let micros = u64::try_from(stamp.elapsed().as_micros()).unwrap_or(u64::MAX);
                        t.record(is_final, micros);
                    }
                }
                OutboxAction::Ended { flow } => tracing::debug!(%flow, "flow acknowledged whole"),
                OutboxAction::Settled { .. } => {}
            }
        }
        out
    }

    /// Flows still running or awaiting acknowledgement.
    pub fn running_flows(&self) -> Vec<String> {
        self.lock()
            .flows
            .running_flows()
            .map(str::to_owned)
            .collect()
    }

    /// Messages not yet settled (unacknowledged, or acknowledged and not on the volume yet), in total.
    pub fn unacked(&self) -> usize {
        self.lock().flows.unsettled()
    }

    /// A new stream is up: resend everything not settled, in order, through it.
    async fn attach(
        &self,
        tx: mpsc::Sender<comms::ClientMessage>,
        max_in_flight: usize,
        now: Monotonic,
    ) {
        let resend = {
            let mut s = self.lock();
            s.session = Some(tx.clone());
            s.flows.handle_connected(now, max_in_flight);
            self.drain(&mut s)
        };
        for m in resend {
            if tx.send(flow_msg(m)).await.is_err() {
                return;
            }
        }
        self.events.attach(tx, max_in_flight, now).await;
    }

    fn detach(&self) {
        {
            let mut s = self.lock();
            s.session = None;
            s.flows.handle_disconnected();
        }
        self.events.detach();
    }

    /// Registers a task's flow (`Begin::Started`), unless it is already running or recently done
    /// (a task delivered twice) or too many run. Check and insert happen under one lock, so no
    /// duplicate slips between.
    fn begin(&self, flow: &str) -> Begin {
        self.lock().flows.begin(flow)
    }

    /// Messages with no acknowledgement of either kind for `RESEND_AFTER_MS`, to send again (a
    /// lost acknowledgement: the frontend acknowledges a resend of a stored message again, and
    /// settles it again).
    fn stale(&self, now: Monotonic) -> Vec<comms::FlowMessage> {
        let mut s = self.lock();
        s.flows.handle_timeout(now);
        self.drain(&mut s)
    }

    /// Adds the next message of a flow, waiting while the flow has `max_in_flight` unsettled.
    async fn push(&self, flow: &str, payload: flow_message::Payload, now: Monotonic) {
        let is_final = matches!(payload, flow_message::Payload::Status(_));
        loop {
            let notified = self.acked.notified();
            // Decide under the lock, await outside it.
            let sent = {
                let mut s = self.lock();
                let stamp = tokio::time::Instant::now();
                s.flows
                    .push(now, flow, payload.clone(), is_final, stamp)
                    .map(|_| (self.drain(&mut s), s.session.clone()))
            };
            match sent {
                // Not connected, or the stream breaks: the message stays kept and is resent on
                // attach.
                Ok((msgs, session)) => {
                    if let Some(tx) = session {
                        for m in msgs {
                            let _ = tx.send(flow_msg(m)).await;
                        }
                    }
                    return;
                }
                Err(PushError::Full { .. }) => notified.await,
                Err(PushError::NotRunning) => {
                    tracing::warn!(%flow, "a message for a flow that is not running; dropped");
                    return;
                }
            }
        }
    }

    /// The frontend acknowledged message `seq` (`settled`: it is on the shared volume).
    fn ack(&self, flow: &str, seq: u64, settled: bool, now: Monotonic) {
        if let Some(o) = &self.observer {
            o(flow, seq, settled);
        }
        {
            let mut s = self.lock();
            s.flows.handle_ack(now, flow, seq, settled);
            // An acknowledgement sends nothing; it records a service time.
            self.drain(&mut s);
        }
        self.acked.notify_waiters();
    }
}

fn status(
    state: comms::FlowState,
    error: String,
    rows: u64,
    bytes: u64,
    ms: u64,
) -> flow_message::Payload {
    flow_message::Payload::Status(comms::FlowStatus {
        state: state as i32,
        error,
        total_rows: rows,
        total_uploaded_bytes: bytes,
        duration_ms: ms,
    })
}

enum Produced {
    Out(Output),
    Done(Result<(), String>),
}

/// Runs one task (its flow already registered with `Outbox::begin`) to completion, streaming its
/// output into the outbox.
async fn run_task(
    task: comms::Task,
    outbox: Outbox,
    clock: Arc<dyn Clock>,
    host: crate::query::Host,
    inline: bool,
) {
    let flow = task.flow_id.clone();
    let started = clock.monotonic();
    let params: BTreeMap<String, String> = task.params.clone().into_iter().collect();
    let artifact = task.artifact.clone();
    let budget = {
        let (clock, outbox, flow) = (clock.clone(), outbox.clone(), flow.clone());
        let timeout_ms = task.timeout_s.saturating_mul(1000);
        artifacts::Budget {
            host,
            max_rows: task.max_rows,
            // Its time is up, or the analyst cancelled it: a query that makes no rows for a while
            // (a long scan, a sort) is stopped at once, not at its next row.
            expired: Box::new(move || {
                (timeout_ms > 0 && clock.monotonic().0.saturating_sub(started.0) >= timeout_ms)
                    || outbox.cancelled(&flow).is_some()
            }),
        }
    };
    let mut rx = if inline {
        // On this task, start to end (the simulator: no thread whose progress real time decides).
        let mut out = Vec::new();
        let done = artifacts::run(&artifact, &params, budget, &mut |o| {
            out.push(Produced::Out(o));
            Ok(())
        });
        out.push(Produced::Done(done));
        let (tx, rx) = mpsc::channel::<Produced>(out.len());
        for p in out {
            let _ = tx.try_send(p);
        }
        rx
    } else {
        // Artifacts block (files, /proc): a blocking thread, streaming through a bounded channel.
        let (tx, rx) = mpsc::channel::<Produced>(64);
        tokio::task::spawn_blocking(move || {
            let done = artifacts::run(&artifact, &params, budget, &mut |o| {
                tx.blocking_send(Produced::Out(o))
                    .map_err(|_| artifacts::Stop)
            });
            let _ = tx.blocking_send(Produced::Done(done));
        });
        rx
    };
    let (mut rows, mut bytes, mut upload_id) = (0u64, 0u64, 0u32);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_bytes = 0usize;
    let source = task.artifact.clone();
    let flush = |batch: &mut Vec<Bytes>, batch_bytes: &mut usize| {
        *batch_bytes = 0;
        flow_message::Payload::Rows(comms::ResultRows {
            source: source.clone(),
            rows: std::mem::take(batch),
        })
    };
    let mut result = Err("the artifact stopped without a result".to_string());
    // A partial batch is sent once its first row has waited BATCH_AGE_MAX_MS (a slow artifact's rows
    // arrive promptly); an artifact that keeps up fills batches first.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, rx.recv()).await {
                Ok(p) => p,
                Err(_) => {
                    deadline = None;
                    outbox
                        .push(
                            &flow,
                            flush(&mut batch, &mut batch_bytes),
                            clock.monotonic(),
                        )
                        .await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(p) = next else { break };
        if let Some(why) = outbox.cancelled(&flow) {
            // Dropping `rx` stops the artifact at its next output.
            result = Err(why);
            break;
        }
        match p {
            Produced::Out(Output::Row(r)) => {
                let b = Bytes::from(serde_json::to_vec(&r).expect("JSON objects serialise"));
                if !batch.is_empty()
                    && (batch.len() >= BATCH_ROWS_MAX || batch_bytes + b.len() > BATCH_BYTES_MAX)
                {
                    outbox
                        .push(
                            &flow,
                            flush(&mut batch, &mut batch_bytes),
                            clock.monotonic(),
                        )
                        .await;
                    deadline = None;
                }
                if batch.is_empty() {
                    deadline =
                        Some(tokio::time::Instant::now() + Duration::from_millis(BATCH_AGE_MAX_MS));
                }
                batch_bytes += b.len();
                batch.push(b);
                rows += 1;
            }
            Produced::Out(out @ (Output::Upload(_) | Output::SyntheticUpload { .. })) => {
                if !batch.is_empty() {
                    outbox
                        .push(
                            &flow,
                            flush(&mut batch, &mut batch_bytes),
                            clock.monotonic(),
                        )
                        .await;
                }
                deadline = None;
                let (name, source): (String, std::io::Result<Box<dyn Read + Send>>) = match out {
                    Output::Upload(path) => (
                        path.display().to_string(),
                        std::fs::File::open(&path).map(|f| Box::new(f) as Box<dyn Read + Send>),
                    ),
                    Output::SyntheticUpload { name, index, size } => {
                        (name, Ok(Box::new(Synthetic { index, size, at: 0 })))
                    }
                    Output::Row(_) => unreachable!("matched above"),
                };
                let sent = match source {
                    Ok(r) => upload(&outbox, &flow, upload_id, &name, r, &*clock).await,
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(n) => bytes += n,
                    Err(e) => {
                        tracing::warn!(flow = %flow, file = %name, error = %e, "upload failed")
                    }
                }
                upload_id += 1;
            }
            Produced::Done(r) => {
                result = r;
                break;
            }
        }
    }
    drop(rx); // A cancelled artifact stops at its next output.
    if !batch.is_empty() {
        outbox
            .push(
                &flow,
                flush(&mut batch, &mut batch_bytes),
                clock.monotonic(),
            )
            .await;
    }
    let ms = clock.monotonic().since_ms(started);
    let final_status = match result {
        Ok(()) => status(comms::FlowState::Completed, String::new(), rows, bytes, ms),
        Err(e) => status(comms::FlowState::Error, e, rows, bytes, ms),
    };
    outbox.push(&flow, final_status, clock.monotonic()).await;
    tracing::debug!(flow = %flow, artifact = %task.artifact, rows, "task finished");
}

/// The content of a synthetic upload (`Output::SyntheticUpload`).
struct Synthetic {
    index: u64,
    size: u64,
    at: u64,
}

impl Read for Synthetic {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.size - self.at)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = artifacts::synthetic_byte(self.index, self.at + i as u64);
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// Sends what `f` reads as chunks of an upload named `name`; returns its size.
async fn upload(
    outbox: &Outbox,
    flow: &str,
    upload_id: u32,
    name: &str,
    mut f: Box<dyn Read + Send>,
    clock: &dyn Clock,
) -> std::io::Result<u64> {
    let name = name.to_owned();
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        // Fill the chunk (a reader may return less than asked before its end).
        let mut n = 0;
        while n < CHUNK_BYTES {
            let got = f.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        buf.truncate(n);
        hasher.update(&buf);
        let eof = n < CHUNK_BYTES;
        let (total_size, sha256) = if eof {
            (
                offset + n as u64,
                Bytes::from(hasher.clone().finalize().to_vec()),
            )
        } else {
            (0, Bytes::new())
        };
        let chunk = comms::FileChunk {
            upload_id,
            name: name.clone(),
            offset,
            data: Bytes::from(buf),
            eof,
            total_size,
            sha256,
        };
        outbox
            .push(
                flow,
                flow_message::Payload::FileChunk(chunk),
                clock.monotonic(),
            )
            .await;
        offset += n as u64;
        if eof {
            return Ok(offset);
        }
    }
}

/// Splits `https://host:port/` into host and port.
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?}: expected https://HOST:PORT/"))?;
    let hostport = rest.trim_end_matches('/');
    crate::deploy::config::parse_host_port(hostport)
        .map_err(|_| format!("{url:?}: expected https://HOST:PORT/"))
}

fn hello(
    id: &ClientId,
    nonce: &str,
    outbox: &Outbox,
    hostname: Option<&str>,
) -> comms::ClientMessage {
    let mut info = artifacts::client_info();
    if let Some(h) = hostname {
        info["hostname"] = serde_json::Value::from(h);
        info["fqdn"] = serde_json::Value::from(h);
    }
    let s = |k: &str| info[k].as_str().unwrap_or_default().to_owned();
    let list = |k: &str| {
        info[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    comms::ClientMessage {
        kind: Some(client_message::Kind::Hello(comms::Hello {
            client_id: id.to_string(),
            deployment_nonce: nonce.to_owned(),
            info: Some(comms::ClientInfo {
                hostname: s("hostname"),
                fqdn: s("fqdn"),
                os: s("os"),
                kernel: s("kernel"),
                arch: s("arch"),
                agent_version: s("agent_version"),
                ips: list("ips"),
                macs: list("macs"),
                boot_time_unix_s: info["boot_time"].as_u64().unwrap_or(0),
            }),
            running_flows: outbox.running_flows(),
        })),
    }
}

/// Everything one agent needs.
pub struct Agent {
    /// The client config.
    pub config: ClientConfig,
    /// The TLS identity.
    pub identity: pki::Pem,
    /// The derived id.
    pub id: ClientId,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Randomness (start URL, jitter).
    pub entropy: Arc<dyn Entropy>,
    /// Unacknowledged messages.
    pub outbox: Outbox,
    /// Whose machine it reports and queries: this one, or for a virtual agent of `pool-client`
    /// (and the simulator) its own host name over this machine's tables, shared by its pool.
    pub host: crate::query::Host,
    /// The network.
    pub net: Arc<dyn crate::net::Net>,
    /// Run artifacts on the agent's own task rather than a blocking thread, holding a task's whole
    /// output in memory: for the simulator (deterministic), never for real endpoints.
    pub inline_artifacts: bool,
}

impl Agent {
    /// Runs sessions forever, failing over between frontends.
    pub async fn run(self) -> Result<(), String> {
        let urls = self
            .config
            .client
            .server_urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err("Client.server_urls is empty".into());
        }
        let tls = tls::client_config(
            &self.config.client.ca_certificate,
            &self.identity.certificate,
            &self.identity.private_key,
        )
        .map_err(|e| e.to_string())?;
        let mut r = [0u8; 8];
        self.entropy.fill(&mut r);
        let mut idx = (u64::from_le_bytes(r) % urls.len() as u64) as usize;
        let mut failures = 0u32;
        loop {
            let (host, port) = &urls[idx];
            match self.session(host, *port, tls.clone()).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(server = %format!("{host}:{port}"), error = %e, "connection failed");
                }
            }
            idx = (idx + 1) % urls.len();
            // Jittered exponential backoff: 0.5..1.0 of min(30 s, 0.5 s * 2^failures).
            let base_ms = 500u64.saturating_mul(1 << failures.min(6)).min(30_000);
            self.entropy.fill(&mut r);
            let jitter = base_ms / 2 + u64::from_le_bytes(r) % (base_ms / 2 + 1);
            tokio::time::sleep(Duration::from_millis(if failures == 0 {
                200
            } else {
                jitter
            }))
            .await;
        }
    }

    async fn session(
        &self,
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<(), String> {
        let channel = tls::connect(&self.net, host, port, tls, Duration::from_secs(10))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = CommsClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(SEND_QUEUE_MAX);
        tx.send(hello(
            &self.id,
            &self.config.client.nonce,
            &self.outbox,
            self.host.hostname(),
        ))
        .await
        .map_err(|e| e.to_string())?;
        let mut inbound = client
            .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        let welcome = match inbound
            .message()
            .await
            .map_err(|e| e.message().to_owned())?
        {
            Some(comms::ServerMessage {
                kind: Some(server_message::Kind::Welcome(w)),
            }) => w,
            other => return Err(format!("expected a Welcome, got {other:?}")),
        };
        tracing::info!(client = %self.id, node = %welcome.node, frontend = %format_args!("{host}:{port}"), "connected");
        let _counted = self.outbox.times.as_deref().map(Connected::new);
        self.outbox
            .attach(
                tx.clone(),
                welcome.max_in_flight as usize,
                self.clock.monotonic(),
            )
            .await;
        let mut ping = tokio::time::interval(Duration::from_secs(30));
        let mut resend = tokio::time::interval(Duration::from_millis(RESEND_AFTER_MS / 2));
        let result = loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(comms::ServerMessage { kind: Some(kind) })) => match kind {
                        server_message::Kind::Task(t) if self.outbox.cancelled(&t.flow_id).is_some() => {
                            // Cancelled before it started: acknowledged, never run (the master
                            // marked it failed).
                            tracing::info!(flow = %t.flow_id, "task cancelled before it started");
                            let _ = tx.send(comms::ClientMessage { kind: Some(client_message::Kind::TaskAck(comms::TaskAck { flow_id: t.flow_id.clone() })) }).await;
                        }
                        server_message::Kind::Task(t) => {
                            let began = self.outbox.begin(&t.flow_id);
                            if let Begin::Full { max } = began {
                                // Not acknowledged: the master sends it again.
                                tracing::warn!(flow = %t.flow_id, max, "too many flows running; the task is taken when one ends");
                                continue;
                            }
                            let _ = tx.send(comms::ClientMessage { kind: Some(client_message::Kind::TaskAck(comms::TaskAck { flow_id: t.flow_id.clone() })) }).await;
                            if began == Begin::Again {
                                continue; // Delivered twice: already running or done.
                            }
                            tracing::info!(flow = %t.flow_id, artifact = %t.artifact, "task started");
                            tokio::spawn(run_task(t, self.outbox.clone(), self.clock.clone(), self.host.clone(), self.inline_artifacts));
                        }
                        server_message::Kind::Ack(a) => self.outbox.ack(&a.flow_id, a.seq, a.settled, self.clock.monotonic()),
                        server_message::Kind::Error(e) => tracing::warn!(flow = %e.flow_id, seq = e.seq, message = %e.message, "server refused a message"),
                        server_message::Kind::Cancel(c) => {
                            tracing::info!(flow = %c.flow_id, reason = %c.reason, "flow cancelled");
                            self.outbox.cancel(&c.flow_id, &c.reason);
                        }
                        server_message::Kind::EventAck(a) => self.outbox.events.ack(&a, self.clock.monotonic()).await,
                        server_message::Kind::EventTable(t) => {
                            tracing::info!(artifacts = t.artifacts.len(), "client event table received");
                            self.outbox.events.set_table(t, self.clock.clone(), self.host.clone()).await;
                        }
                        server_message::Kind::Welcome(_) | server_message::Kind::Pong(_) => {}
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.message().to_owned()),
                },
                _ = resend.tick() => {
                    for m in self.outbox.stale(self.clock.monotonic()) {
                        if tx.send(flow_msg(m)).await.is_err() {
                            break;
                        }
                    }
                    self.outbox.events.resend_stale(self.clock.monotonic()).await;
                }
                _ = ping.tick() => {
                    let p = comms::Ping { time_unix_ms: self.clock.now().as_ms() };
                    if tx.send(comms::ClientMessage { kind: Some(client_message::Kind::Ping(p)) }).await.is_err() {
                        break Err("stream closed".into());
                    }
                }
            }
        };
        self.outbox.detach();
        result
    }
}

/// Where `pool-client` keeps virtual client `i`'s key under `dir`.
pub fn pool_key_path(dir: &Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("pool-{i}.yaml"))
}

/// Starts the virtual clients numbered `keys` in this process (`talon pool-client`): each has its own key,
/// cached in `writeback_dir/pool-<i>.yaml` so a restart reuses it, and reports hostname
/// `<prefix>-<i>`. They share one runtime. Starts at most `start_rate` clients per second. With
/// `times`, every client records its messages' service times there.
pub fn spawn_pool(
    config: &ClientConfig,
    writeback_dir: &Path,
    keys: std::ops::Range<usize>,
    start_rate: f64,
    prefix: &str,
    env: crate::env::Env,
    times: Option<Arc<ServiceTimes>>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let crate::env::Env {
        clock,
        entropy,
        net,
        ..
    } = env;
    std::fs::create_dir_all(writeback_dir)
        .map_err(|e| format!("{}: {e}", writeback_dir.display()))?;
    // On loopback, clients leave from 127.0.1.1 to 127.0.1.64 in turn: one source address has
    // about 28,000 ephemeral ports, fewer than a large pool's connections to one frontend.
    let loopback = config.client.server_urls.iter().all(|u| {
        parse_url(u).is_ok_and(|(h, _)| crate::deploy::config::bind_address_for(&h) != "0.0.0.0")
    });
    let mut agents = Vec::with_capacity(keys.len());
    let tables = crate::query::TableCache::new(clock.clone());
    for i in keys {
        let (identity, id) = load_or_create_identity(&pool_key_path(writeback_dir, i), &*clock)?;
        let net: Arc<dyn crate::net::Net> = if loopback {
            Arc::new(crate::net::FromAddr {
                inner: net.clone(),
                local: std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 1, 1 + (i % 64) as u8)),
            })
        } else {
            net.clone()
        };
        agents.push(Agent {
            config: config.clone(),
            identity,
            id,
            clock: clock.clone(),
            entropy: entropy.clone(),
            outbox: times.clone().map(Outbox::recording).unwrap_or_default(),
            host: crate::query::Host::Virtual {
                hostname: format!("{prefix}-{i}").into(),
                cache: tables.clone(),
            },
            inline_artifacts: false,
            net,
        });
    }
    let gap = if start_rate > 0.0 {
        Duration::from_secs_f64(1.0 / start_rate)
    } else {
        Duration::ZERO
    };
    Ok(tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for a in agents {
            let id = a.id.clone();
            set.spawn(async move {
                if let Err(e) = a.run().await {
                    tracing::error!(client = %id, error = %e, "virtual client stopped");
                }
            });
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        while set.join_next().await.is_some() {}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent remembers the newest `CANCELLED_REMEMBERED_MAX` cancelled flows: one more forgets
    /// the oldest; a repeated cancel does not take a second place.
    #[test]
    fn cancelled_flows_are_remembered_up_to_the_bound() {
        let o = Outbox::default();
        for i in 0..CANCELLED_REMEMBERED_MAX {
            o.cancel(&format!("F.{i}"), "why");
        }
        o.cancel("F.0", "again");
        assert_eq!(o.cancelled("F.0").as_deref(), Some("why"));
        o.cancel("F.new", "last");
        assert_eq!(
            o.cancelled("F.0"),
            None,
            "the oldest is forgotten at the bound"
        );
        assert_eq!(o.cancelled("F.1").as_deref(), Some("why"));
        assert_eq!(o.cancelled("F.new").as_deref(), Some("last"));
        assert_eq!(o.cancelled("F.unknown"), None);
    }
}
