//! The cluster: how a minion works with the master.
//!
//! - [`Link`] (minion): the replication outbox. Events (a client seen or gone, a task delivered, a
//!   flow completed, the node started) are appended to a journal on the minion's local disk and synced
//!   before they are sent; the master applies them exactly once and in order (core `Outbox`/`Inbox`)
//!   and acknowledges; acknowledged events are truncated from the journal. A master outage is ridden
//!   out: events wait on disk and are replayed when the stream comes back. The master pushes
//!   broadcasts (tasks for the minion's clients, datastore changes) down the same stream.
//! - [`Meta`] / [`RemoteStore`] (minion): metadata reads and writes through the master's datastore,
//!   with a bounded read cache that the master's `DatastoreChanged` broadcasts keep correct (and that
//!   is cleared whenever the stream reconnects, since broadcasts may have been missed meanwhile).
//! - [`ClusterService`] (master): the `Replication` and `RemoteDatastore` gRPC services on the API
//!   port, for peers holding the frontend certificate and named in `ExtraFrontends`.

use crate::clock::Clock;
use crate::deploy::pki::Role;
use crate::node::Node;
use crate::storage::datastore::Datastore;
use crate::storage::journal::Journal;
use crate::storage::local::LocalDisk;
use bytes::{Bytes, BytesMut};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use talon_core::cluster_codec::{
    ClusterError, ClusterLimits, MinionInput, ValueAssembly, validate_minion_message,
};
use talon_core::node::Outcome;
use talon_core::replication::{Outbox, OutboxAction, OutboxLimits};
use talon_proto::cluster::{
    self as pc, master_message, minion_message, remote_datastore_client::RemoteDatastoreClient,
    replicated_event::Event, replication_client::ReplicationClient,
};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Entries in a minion's metadata read cache.
pub const READ_CACHE_MAX: usize = 65_536;
/// Bytes per chunk of a remote value.
pub const VALUE_CHUNK_BYTES: usize = 1 << 20;
/// Keys per `List` response message.
pub const LIST_PAGE_KEYS: usize = 1000;
/// Messages queued from the master to one minion; past it the master drops the stream (the minion
/// reconnects and is resynchronised), so a stalled minion cannot grow the master's memory.
pub const MINION_QUEUE_MAX: usize = 65_536;
/// Events waiting for the link task (the node waits beyond it: back-pressure).
pub const LINK_QUEUE_MAX: usize = 8192;
/// HTTP/2 ping interval on a minion's connections to the master.
pub const CLUSTER_KEEPALIVE: Duration = Duration::from_secs(2);
/// How long the master has to answer a ping before the minion drops the connection. Not the
/// interval: a master busy with a 30,000-client hunt (on a 2-core machine shared with five minions
/// and the load generator) answered later than 2 s, every minion dropped its replication stream
/// 12 s into the hunt, and the reconnections and resends stalled it for a minute.
pub const CLUSTER_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Journal segment size of the outbox.
pub const OUTBOX_SEGMENT_BYTES: u64 = 16 << 20;
const RECONNECT_MIN_MS: u64 = 100;
const RECONNECT_MAX_MS: u64 = 2000;
/// The longest pause between two attempts of a minion's remote datastore to reach the master.
pub const REMOTE_RECONNECT_MAX_MS: u64 = 5_000;

/// A reconnect delay: `base`, halved to doubled by jitter (at least 1 ms).
fn jittered(entropy: &dyn crate::clock::Entropy, base_ms: u64) -> Duration {
    let mut r = [0u8; 8];
    entropy.fill(&mut r);
    let half = base_ms / 2;
    Duration::from_millis((half + u64::from_le_bytes(r) % (base_ms + 1)).max(1))
}

/// Where a minion reaches the master.
#[derive(Clone)]
pub struct MasterAddr {
    /// Randomness for reconnect jitter (so minions and their callers do not retry in step).
    pub entropy: Arc<dyn crate::clock::Entropy>,
    /// `API.hostname`.
    pub host: String,
    /// `API.bind_port`.
    pub port: u16,
    /// The frontend certificate as a TLS client identity, pinning the deployment CA.
    pub tls: Arc<rustls::ClientConfig>,
    /// The network.
    pub net: Arc<dyn crate::net::Net>,
}

impl MasterAddr {
    async fn channel(&self) -> Result<Channel, String> {
        // The replication stream carries tasks for the minion's clients: a silently dead stream
        // must be noticed in seconds (then the link reconnects and the master resends them).
        crate::net::tls::connect_with_keepalive(
            &self.net,
            &self.host,
            self.port,
            self.tls.clone(),
            Duration::from_secs(5),
            CLUSTER_KEEPALIVE,
            CLUSTER_PING_TIMEOUT,
        )
        .await
        .map_err(|e| {
            format!(
                "master {}: {e}",
                crate::deploy::config::host_port(&self.host, self.port)
            )
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Metadata: local on the master, remote on a minion.

/// A node's metadata store: the master's datastore, or the master's datastore reached remotely.
#[derive(Clone)]
pub enum Meta {
    /// On the master.
    Local(Datastore),
    /// On a minion.
    Remote(RemoteStore),
}

/// A failed write stops the master unless nothing happened and the node may go on: back-pressure
/// (`Busy`: retry later) or a value over `max_value_size` (`TooLarge`: the writer's fault; that
/// write fails, and its caller fails what it was for, never the node).
fn fail_stop_unless_determinate(
    d: &Datastore,
    key: &str,
    e: crate::storage::datastore::DatastoreError,
) -> WriteError {
    use crate::storage::datastore::DatastoreError;
    use talon_core::datastore::CacheError;
    if !matches!(
        e,
        DatastoreError::Refused(CacheError::Busy { .. } | CacheError::TooLarge { .. })
    ) {
        d.fail_stop(&format!("writing {key}: {e}"));
    }
    let outcome = match e {
        // Refused by the cache before anything was journalled.
        DatastoreError::Refused(_) => Outcome::Refused,
        // The datastore stopped: the write may be in the journal a restart replays.
        DatastoreError::Stopped(_) => Outcome::Unknown,
    };
    WriteError {
        outcome,
        message: e.to_string(),
    }
}

/// Why a metadata write failed, and whether it may have happened anyway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteError {
    /// `Refused`: certainly not done (busy, too large, not sent). `Unknown`: maybe done (the
    /// master's datastore stopped with it in hand, or the remote call got no answer).
    pub outcome: Outcome,
    /// What went wrong, naming the key where known.
    pub message: String,
}

impl WriteError {
    fn refused(message: String) -> WriteError {
        WriteError {
            outcome: Outcome::Refused,
            message,
        }
    }

    /// A remote write's failure: refused if the master answered that it refused it (or it was
    /// never sent), maybe done if the call got no answer.
    fn remote(what: &str, key: &str, e: Status) -> WriteError {
        use tonic::Code;
        let outcome = match e.code() {
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                Outcome::Refused
            }
            _ => Outcome::Unknown,
        };
        WriteError {
            outcome,
            message: remote_error(what, key, e),
        }
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WriteError {}

/// Why a metadata read failed. A read changes nothing, so every failure is determinate; the kind
/// says whether trying again can help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadError {
    /// What kind of failure.
    pub kind: ReadFailure,
    /// What went wrong, naming the key where known.
    pub message: String,
}

/// The kinds of [`ReadError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFailure {
    /// Storage, or the master, did not answer or refused for now: try again later.
    Unavailable,
    /// The node's datastore has stopped (the process is stopping): trying again cannot help.
    Stopped,
    /// The value is there and cannot be decoded: trying again cannot help.
    Malformed,
}

impl ReadError {
    /// A failure worth trying again.
    pub fn unavailable(message: impl Into<String>) -> ReadError {
        ReadError {
            kind: ReadFailure::Unavailable,
            message: message.into(),
        }
    }

    /// A value that cannot be decoded.
    pub fn malformed(message: impl Into<String>) -> ReadError {
        ReadError {
            kind: ReadFailure::Malformed,
            message: message.into(),
        }
    }

    /// The same failure, its message prefixed with `what` (a key, a step).
    pub fn context(self, what: &str) -> ReadError {
        ReadError {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }

    /// As a gRPC status.
    pub fn status(&self) -> Status {
        match self.kind {
            ReadFailure::Unavailable | ReadFailure::Stopped => Status::unavailable(&self.message),
            ReadFailure::Malformed => Status::data_loss(&self.message),
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {}

impl From<crate::storage::datastore::DatastoreError> for ReadError {
    fn from(e: crate::storage::datastore::DatastoreError) -> ReadError {
        use crate::storage::datastore::DatastoreError;
        let kind = match e {
            DatastoreError::Refused(_) => ReadFailure::Unavailable,
            DatastoreError::Stopped(_) => ReadFailure::Stopped,
        };
        ReadError {
            kind,
            message: e.to_string(),
        }
    }
}

impl Meta {
    /// Reads a key.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ReadError> {
        match self {
            Meta::Local(d) => Ok(d.get(key).await?),
            Meta::Remote(r) => r.get(key).await,
        }
    }

    /// Writes a key; durable on the master when this returns.
    ///
    /// On the master a failed write is fatal (fail-stop): the node writes records after applying
    /// their change in memory (registry, hunts, flows), so memory is now ahead of what a restart
    /// would find; the process stops and restarts from what is durable rather than acknowledge
    /// anything on top of it. The exceptions are refusals where nothing happened: back-pressure
    /// (`Busy`: the unflushed backlog is at its bound because the volume is slow or down; the caller
    /// gets the "retry later" error and acknowledges nothing) and a value over `max_value_size`
    /// (the writer's fault: the caller fails what it was for). The caller always gets the error.
    pub async fn set(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
        match self {
            Meta::Local(d) => d
                .set(key, value)
                .await
                .map_err(|e| fail_stop_unless_determinate(d, key, e)),
            Meta::Remote(r) => r.set(key, value).await,
        }
    }

    /// Writes (or, for `None`, deletes) several keys atomically: all happen or none, whatever
    /// crash follows (fail-stop on the master as for [`Meta::set`]). Only the master writes
    /// groups: a minion's writes go one by one through the remote datastore.
    pub async fn write_all(&self, writes: Vec<(String, Option<Bytes>)>) -> Result<u64, WriteError> {
        match self {
            Meta::Local(d) => {
                let first = writes.first().map(|w| w.0.clone()).unwrap_or_default();
                d.write_all(writes)
                    .await
                    .map_err(|e| fail_stop_unless_determinate(d, &first, e))
            }
            Meta::Remote(_) => Err(WriteError::refused(
                "atomic writes of several keys are made on the master".into(),
            )),
        }
    }

    /// Deletes a key (fail-stop on the master as for [`Meta::set`]).
    pub async fn delete(&self, key: &str) -> Result<u64, WriteError> {
        match self {
            Meta::Local(d) => d
                .delete(key)
                .await
                .map_err(|e| fail_stop_unless_determinate(d, key, e)),
            Meta::Remote(r) => r.delete(key).await,
        }
    }

    /// Lists keys under a prefix (and whether the list was cut short).
    pub async fn list(&self, prefix: &str) -> Result<(Vec<String>, bool), ReadError> {
        self.list_within(prefix, None).await
    }

    /// Keys under a prefix with at most `depth` components after it: the master's volume is not
    /// walked deeper (a minion filters what the master lists).
    pub async fn list_within(
        &self,
        prefix: &str,
        depth: Option<usize>,
    ) -> Result<(Vec<String>, bool), ReadError> {
        match self {
            Meta::Local(d) => Ok(d.list_within(prefix, depth).await?),
            Meta::Remote(r) => {
                let (mut keys, truncated) = r.list(prefix, 0).await?;
                keys.retain(|k| talon_core::datastore::within_depth(k, prefix, depth));
                Ok((keys, truncated))
            }
        }
    }
}

#[derive(Default)]
struct ReadCache {
    values: BTreeMap<String, Option<Bytes>>,
    order: VecDeque<String>,
    /// Bumped by every invalidation; a read started before one does not fill the cache.
    generation: u64,
}

/// The remote datastore's one connection to the master, and when it may next try to open one.
#[derive(Default)]
struct RemoteConn {
    channel: Option<Channel>,
    /// Attempts that failed in a row.
    failures: u32,
    /// No new attempt before this (back-off after a failed attempt).
    retry_at: Option<tokio::time::Instant>,
}

/// The master's datastore seen from a minion, with a bounded read cache. It keeps one connection
/// and reuses it for every call; when the master is unreachable, it tries again after a jittered,
/// growing pause (up to [`REMOTE_RECONNECT_MAX_MS`]), and calls meanwhile fail at once — a
/// partition or a master restart costs one connection attempt per pause, not one per call (which
/// would use up the minion's ephemeral ports and hammer the recovering master with handshakes).
#[derive(Clone)]
pub struct RemoteStore {
    master: MasterAddr,
    conn: Arc<tokio::sync::Mutex<RemoteConn>>,
    cache: Arc<Mutex<ReadCache>>,
    cache_max: usize,
    value_bytes_max: u64,
}

fn remote_error(what: &str, key: &str, e: Status) -> String {
    format!("remote datastore {what} {key:?}: {}", e.message())
}

impl RemoteStore {
    /// A store reaching `master`; connects on first use (and again after a failure). It caches at
    /// most `cache_max` values and carries values of at most `value_bytes_max` bytes.
    pub fn new(master: MasterAddr, cache_max: usize, value_bytes_max: u64) -> RemoteStore {
        RemoteStore {
            master,
            conn: Arc::new(tokio::sync::Mutex::new(RemoteConn::default())),
            cache: Arc::new(Mutex::new(ReadCache::default())),
            cache_max: cache_max.max(1),
            value_bytes_max,
        }
    }

    async fn client(&self) -> Result<RemoteDatastoreClient<Channel>, String> {
        let mut c = self.conn.lock().await;
        let channel = match &c.channel {
            Some(ch) => ch.clone(),
            None => {
                let now = tokio::time::Instant::now();
                if let Some(at) = c.retry_at.filter(|at| *at > now) {
                    return Err(format!(
                        "the master is unreachable; the next attempt is in {} ms",
                        (at - now).as_millis()
                    ));
                }
                match self.master.channel().await {
                    Ok(ch) => {
                        *c = RemoteConn {
                            channel: Some(ch.clone()),
                            ..RemoteConn::default()
                        };
                        ch
                    }
                    Err(e) => {
                        c.failures = c.failures.saturating_add(1);
                        let base =
                            (RECONNECT_MIN_MS << c.failures.min(16)).min(REMOTE_RECONNECT_MAX_MS);
                        c.retry_at = Some(
                            tokio::time::Instant::now() + jittered(&*self.master.entropy, base),
                        );
                        return Err(e);
                    }
                }
            }
        };
        Ok(RemoteDatastoreClient::new(channel).max_decoding_message_size(2 * VALUE_CHUNK_BYTES))
    }

    /// A call failed on the connection: drop it; the next call opens a new one (at once the first
    /// time, then backing off while attempts fail).
    async fn failed(&self) {
        self.conn.lock().await.channel = None;
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ReadCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries cached now.
    pub fn cached(&self) -> usize {
        self.cache().values.len()
    }

    /// Drops one key from the read cache (the master changed it).
    pub fn invalidate(&self, key: &str) {
        let mut c = self.cache();
        c.generation += 1;
        c.values.remove(key);
    }

    /// Drops the whole read cache (broadcasts may have been missed).
    pub fn clear(&self) {
        let mut c = self.cache();
        c.generation += 1;
        c.values.clear();
        c.order.clear();
    }

    fn fill(&self, generation: u64, key: &str, value: Option<Bytes>) {
        let mut c = self.cache();
        if c.generation != generation {
            return;
        }
        if c.values.insert(key.to_owned(), value).is_none() {
            c.order.push_back(key.to_owned());
        }
        while c.values.len() > self.cache_max {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            c.values.remove(&old);
        }
        // `order` may hold keys already invalidated; keep it from growing past twice the bound.
        if c.order.len() > 2 * self.cache_max {
            let ReadCache { values, order, .. } = &mut *c;
            order.retain(|k| values.contains_key(k));
        }
    }

    /// Reads a key, from the cache when it holds it.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, ReadError> {
        let generation = {
            let c = self.cache();
            if let Some(v) = c.values.get(key) {
                return Ok(v.clone());
            }
            c.generation
        };
        let mut client = self.client().await.map_err(ReadError::unavailable)?;
        let r = client
            .get(pc::GetRequest {
                key: key.to_owned(),
            })
            .await;
        let mut stream = match r {
            Ok(s) => s.into_inner(),
            Err(e) => {
                self.failed().await;
                return Err(ReadError::unavailable(remote_error("get", key, e)));
            }
        };
        let mut value = BytesMut::new();
        let mut total = None;
        loop {
            let chunk = match stream.message().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    self.failed().await;
                    return Err(ReadError::unavailable(remote_error("get", key, e)));
                }
            };
            if !chunk.found {
                self.fill(generation, key, None);
                return Ok(None);
            }
            let t = *total.get_or_insert(chunk.total_len);
            if t > self.value_bytes_max || value.len() as u64 + chunk.data.len() as u64 > t {
                return Err(ReadError::malformed(format!(
                    "remote datastore get {key:?}: value larger than announced ({t} bytes)"
                )));
            }
            value.extend_from_slice(&chunk.data);
        }
        match total {
            Some(t) if t == value.len() as u64 => {
                let v = value.freeze();
                self.fill(generation, key, Some(v.clone()));
                Ok(Some(v))
            }
            _ => Err(ReadError::unavailable(format!(
                "remote datastore get {key:?}: the value ended early"
            ))),
        }
    }

    /// Writes a key through the master; durable there when this returns.
    pub async fn set(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
        if value.len() as u64 > self.value_bytes_max {
            return Err(WriteError::refused(format!(
                "remote datastore set {key:?}: {} bytes is over the {}-byte bound \
                 (Datastore.max_value_size)",
                value.len(),
                self.value_bytes_max
            )));
        }
        self.invalidate(key);
        let mut chunks = Vec::new();
        let mut first = true;
        let mut at = 0;
        while first || at < value.len() {
            let end = (at + VALUE_CHUNK_BYTES).min(value.len());
            chunks.push(pc::SetChunk {
                key: if first { key.to_owned() } else { String::new() },
                total_len: if first { value.len() as u64 } else { 0 },
                data: value.slice(at..end),
            });
            first = false;
            at = end;
        }
        let mut client = self.client().await.map_err(WriteError::refused)?;
        match client.set(tokio_stream::iter(chunks)).await {
            Ok(r) => Ok(r.into_inner().version),
            Err(e) => {
                self.failed().await;
                Err(WriteError::remote("set", key, e))
            }
        }
    }

    /// Deletes a key through the master.
    pub async fn delete(&self, key: &str) -> Result<u64, WriteError> {
        self.invalidate(key);
        let mut client = self.client().await.map_err(WriteError::refused)?;
        match client
            .delete(pc::DeleteRequest {
                key: key.to_owned(),
            })
            .await
        {
            Ok(r) => Ok(r.into_inner().version),
            Err(e) => {
                self.failed().await;
                Err(WriteError::remote("delete", key, e))
            }
        }
    }

    /// Lists keys under a prefix (`limit` 0: the master's bound).
    pub async fn list(&self, prefix: &str, limit: u32) -> Result<(Vec<String>, bool), ReadError> {
        let mut client = self.client().await.map_err(ReadError::unavailable)?;
        let mut stream = match client
            .list(pc::ListRequest {
                prefix: prefix.to_owned(),
                limit,
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => {
                self.failed().await;
                return Err(ReadError::unavailable(remote_error("list", prefix, e)));
            }
        };
        let mut keys = Vec::new();
        let mut truncated = false;
        loop {
            match stream.message().await {
                Ok(Some(page)) => {
                    keys.extend(page.keys);
                    truncated |= page.truncated;
                }
                Ok(None) => return Ok((keys, truncated)),
                Err(e) => {
                    self.failed().await;
                    return Err(ReadError::unavailable(remote_error("list", prefix, e)));
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The minion's replication link.

/// What the link tells its node.
#[derive(Debug)]
pub enum LinkEvent {
    /// A stream to the master is up (the node re-announces its clients; the read cache is cleared).
    Connected,
    /// The stream is gone; the link reconnects by itself.
    Disconnected,
    /// A broadcast from the master.
    Broadcast(pc::Broadcast),
    /// Broadcasts were dropped because the node was not taking events (its queue was full): the
    /// node clears its read cache (an invalidation may be among them); tasks are resent by the master.
    BroadcastsLost,
}

struct Push {
    event: Event,
    applied: Option<oneshot::Sender<()>>,
}

/// A handle to the link task.
#[derive(Clone)]
pub struct Link {
    tx: mpsc::Sender<Push>,
}

/// The link's settings.
pub struct LinkOptions {
    /// This minion's node name (`<hostname>-<port>`).
    pub node: String,
    /// Where the master is.
    pub master: MasterAddr,
    /// Outbox bounds.
    pub limits: OutboxLimits,
}

/// What the link found on disk at start.
#[derive(Clone, Copy, Debug)]
pub struct LinkRecovery {
    /// The outbox epoch.
    pub epoch: u64,
    /// Events on disk not yet acknowledged by the master (replayed first).
    pub pending: usize,
    /// Bytes of a torn final record cut off.
    pub torn_bytes: u64,
}

/// The file (on a minion's local disk) holding its outbox epoch.
pub const EPOCH_FILE: &str = "outbox-epoch";
/// The directory (on a minion's local disk) of its outbox journal.
pub const JOURNAL_DIR: &str = "outbox";

impl Link {
    /// Opens the outbox journal on the local disk `disk` (named `disk_name` in errors) and starts the
    /// link task. The task ends only on a local disk error (fail-stop: the error is its result).
    pub fn start(
        opts: LinkOptions,
        mut disk: Box<dyn LocalDisk>,
        disk_name: &str,
        clock: Arc<dyn Clock>,
        events_out: mpsc::Sender<LinkEvent>,
    ) -> Result<(Link, LinkRecovery, tokio::task::JoinHandle<String>), String> {
        let here = |e: std::io::Error| format!("outbox in {disk_name}: {e}");
        let epoch = match disk.read(EPOCH_FILE).map_err(here)? {
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("{disk_name}/{EPOCH_FILE}: not an epoch number"))?,
            None => {
                if !disk
                    .list(&format!("{JOURNAL_DIR}/"))
                    .map_err(here)?
                    .is_empty()
                {
                    return Err(format!(
                        "{disk_name}/{JOURNAL_DIR}: an outbox journal without its epoch file; refusing to guess"
                    ));
                }
                // A new epoch must exceed any this minion used before: the wall clock in ms does.
                let e = clock.now().as_ms().max(1);
                disk.write_atomic(EPOCH_FILE, format!("{e}\n").as_bytes())
                    .map_err(here)?;
                e
            }
        };
        let (journal, rec) =
            Journal::open(disk, JOURNAL_DIR, OUTBOX_SEGMENT_BYTES).map_err(here)?;
        let mut events = Vec::with_capacity(rec.records.len());
        let mut pushed_at = std::collections::VecDeque::new();
        for (seq, bytes) in rec.records {
            let e = pc::ReplicatedEvent::decode(bytes.as_slice())
                .map_err(|e| format!("outbox record {seq}: {e}"))?;
            if seq > rec.truncated_upto {
                pushed_at.push_back((seq, e.time_unix_ms));
            }
            let ev = e
                .event
                .ok_or_else(|| format!("outbox record {seq}: no event"))?;
            events.push((seq, ev));
        }
        let recovery = LinkRecovery {
            epoch,
            pending: events.len(),
            torn_bytes: rec.torn_bytes,
        };
        let outbox = Outbox::recover(opts.limits.clone(), epoch, rec.truncated_upto, events);
        let (tx, rx) = mpsc::channel(LINK_QUEUE_MAX);
        let (itx, irx) = mpsc::channel(1024);
        let opts_node = opts.node.clone();
        let task = LinkTask {
            outbox,
            journal,
            waiters: BTreeMap::new(),
            clock,
            opts,
            events_out,
            conn: None,
            generation: 0,
            connecting: false,
            backoff_ms: RECONNECT_MIN_MS,
            itx,
            report: None,
            broadcasts_lost: false,
            epoch_to_persist: None,
            pushed_at,
            connected_gauge: crate::metrics::metrics()
                .replication_connected
                .with_label_values(&[&opts_node]),
        };
        let span = tracing::info_span!("link", node = %task.opts.node);
        let handle = tokio::spawn(tracing::Instrument::instrument(task.run(rx, irx), span));
        Ok((Link { tx }, recovery, handle))
    }

    /// Hands an event to the outbox (waits while the outbox is full); `applied` fires once the
    /// master has applied it.
    pub async fn push(
        &self,
        event: Event,
        applied: Option<oneshot::Sender<()>>,
    ) -> Result<(), String> {
        self.tx
            .send(Push { event, applied })
            .await
            .map_err(|_| "the replication link has stopped (see the log)".to_owned())
    }
}

enum Internal {
    Up {
        generation: u64,
        tx: mpsc::Sender<pc::MinionMessage>,
    },
    Down {
        generation: u64,
        error: String,
    },
    Msg {
        generation: u64,
        msg: pc::MasterMessage,
    },
}

struct LinkTask {
    outbox: Outbox<Event>,
    journal: Journal<Box<dyn LocalDisk>>,
    waiters: BTreeMap<u64, oneshot::Sender<()>>,
    clock: Arc<dyn Clock>,
    opts: LinkOptions,
    events_out: mpsc::Sender<LinkEvent>,
    conn: Option<mpsc::Sender<pc::MinionMessage>>,
    generation: u64,
    connecting: bool,
    backoff_ms: u64,
    itx: mpsc::Sender<Internal>,
    /// A connection change not yet told to the node (`true`: up). The link never waits for the node:
    /// the node may itself be waiting for room in the link's queue, and that cycle would deadlock.
    report: Option<bool>,
    /// Broadcasts were dropped since the node last heard from us.
    broadcasts_lost: bool,
    /// A new epoch to write to the epoch file before anything more is sent.
    epoch_to_persist: Option<u64>,
    /// When each event not yet acknowledged was accepted (wall clock, ms), oldest first: the
    /// replication lag in the node's metrics. As many as the outbox holds.
    pushed_at: std::collections::VecDeque<(u64, u64)>,
    /// This link's `talon_replication_connected` series (looked up once, set every turn).
    connected_gauge: prometheus::IntGauge,
}

impl LinkTask {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Push>,
        mut irx: mpsc::Receiver<Internal>,
    ) -> String {
        let mut reconnect_at = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.drain() {
                let msg = format!("replication outbox: local disk error: {e}");
                tracing::error!(node = %self.opts.node, "{msg}");
                return msg;
            }
            self.publish();
            let room = self.outbox.len() < self.opts.limits.events_max;
            let now = self.clock.monotonic();
            let wait = self
                .outbox
                .poll_timeout()
                .map_or(30_000, |t| t.since_ms(now).min(30_000));
            let want_connect = self.conn.is_none() && !self.connecting;
            let events_out = self.events_out.clone();
            tokio::select! {
                p = rx.recv(), if room => match p {
                    Some(p) => {
                        self.push(p);
                        // Take what else is queued, up to a batch, so one sync covers them all.
                        for _ in 1..self.opts.limits.batch_max {
                            if self.outbox.len() >= self.opts.limits.events_max {
                                break;
                            }
                            let Ok(p) = rx.try_recv() else { break };
                            self.push(p);
                        }
                    }
                    None => return "the node stopped".into(),
                },
                i = irx.recv() => {
                    if let Some(i) = i
                        && let Some(delay) = self.internal(i).await
                    {
                        reconnect_at = tokio::time::Instant::now() + delay;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                    self.outbox.handle_timeout(self.clock.monotonic());
                }
                _ = tokio::time::sleep_until(reconnect_at), if want_connect => {
                    self.connect();
                }
                permit = events_out.reserve(), if self.report.is_some() || self.broadcasts_lost => {
                    let Ok(permit) = permit else { return "the node stopped".into() };
                    match self.report.take() {
                        Some(true) => permit.send(LinkEvent::Connected),
                        Some(false) => permit.send(LinkEvent::Disconnected),
                        None => {
                            self.broadcasts_lost = false;
                            permit.send(LinkEvent::BroadcastsLost);
                        }
                    }
                }
            }
        }
    }

    /// The master last applied epoch `current` from this minion, newer than this outbox's: moves
    /// past it if the master never acknowledged this outbox ([`Outbox::handle_stale_epoch`]). The
    /// new epoch goes to the epoch file before anything is sent in it (`drain`).
    fn stale_epoch(&mut self, now: talon_core::Monotonic, current: u64) {
        let old = self.outbox.epoch();
        match self.outbox.handle_stale_epoch(now, current) {
            Some(epoch) => {
                tracing::warn!(node = %self.opts.node, old, master_epoch = current, epoch, "this outbox's epoch is older than the master's for this node (a new outbox on a clock that is behind); moving past it and sending everything again");
                self.epoch_to_persist = Some(epoch);
            }
            None => {
                tracing::error!(node = %self.opts.node, epoch = old, master_epoch = current, "the master applies a newer epoch of this node than its outbox, and acknowledged this one: is another process running as this node?");
            }
        }
    }

    /// The backlog, the lag and the stream's state for the node's metrics.
    fn publish(&mut self) {
        let acked = self.outbox.acked();
        while self.pushed_at.front().is_some_and(|(seq, _)| *seq <= acked) {
            self.pushed_at.pop_front();
        }
        let m = crate::metrics::metrics();
        m.set_replication(self.outbox.len(), self.pushed_at.front().map(|(_, at)| *at));
        self.connected_gauge.set(i64::from(self.conn.is_some()));
    }

    /// The outbox as the master is told it (the minion's backlog in `cluster status`).
    fn outbox_state(&self) -> pc::OutboxState {
        let acked = self.outbox.acked();
        pc::OutboxState {
            head_seq: self.outbox.head(),
            oldest_unix_ms: self
                .pushed_at
                .iter()
                .find(|(seq, _)| *seq > acked)
                .map_or(0, |(_, at)| *at),
            sent_unix_ms: self.clock.now().as_ms(),
        }
    }

    fn push(&mut self, p: Push) {
        let now = self.clock.monotonic();
        match self.outbox.push(now, p.event) {
            Ok(seq) => {
                self.pushed_at.push_back((seq, self.clock.now().as_ms()));
                if let Some(a) = p.applied {
                    self.waiters.insert(seq, a);
                }
            }
            // Unreachable: pushes are taken only while there is room.
            Err(e) => tracing::error!(error = %e, "outbox refused an event"),
        }
    }

    /// Performs the outbox's actions: persist (one sync per batch), send, truncate.
    fn drain(&mut self) -> std::io::Result<()> {
        if let Some(e) = self.epoch_to_persist {
            self.journal
                .disk_mut()
                .write_atomic(EPOCH_FILE, format!("{e}\n").as_bytes())?;
            self.epoch_to_persist = None;
        }
        loop {
            let mut persisted = None;
            while let Some(a) = self.outbox.poll_action() {
                match a {
                    OutboxAction::Persist { seq, event } => {
                        let rec = pc::ReplicatedEvent {
                            seq,
                            time_unix_ms: self.clock.now().as_ms(),
                            event: Some(event),
                        };
                        self.journal.append(seq, &rec.encode_to_vec())?;
                        persisted = Some(seq);
                    }
                    OutboxAction::Send { epoch, events } => {
                        let Some(tx) = &self.conn else { continue };
                        let now = self.clock.now().as_ms();
                        let batch = pc::EventBatch {
                            epoch,
                            outbox: Some(self.outbox_state()),
                            events: events
                                .into_iter()
                                .map(|(seq, event)| pc::ReplicatedEvent {
                                    seq,
                                    time_unix_ms: now,
                                    event: Some(event),
                                })
                                .collect(),
                        };
                        // A full or closed stream loses nothing: the outbox resends from the ack.
                        let _ = tx.try_send(pc::MinionMessage {
                            kind: Some(minion_message::Kind::Events(batch)),
                        });
                    }
                    OutboxAction::Truncate { upto } => self.journal.truncate(upto)?,
                }
            }
            match persisted {
                Some(upto) => {
                    self.journal.sync()?;
                    self.outbox.handle_persisted(self.clock.monotonic(), upto);
                }
                None => return Ok(()),
            }
        }
    }

    fn connect(&mut self) {
        self.connecting = true;
        self.generation += 1;
        let generation = self.generation;
        let (master, itx) = (self.opts.master.clone(), self.itx.clone());
        let hello = pc::MinionHello {
            node: self.opts.node.clone(),
            epoch: self.outbox.epoch(),
            acked_broadcast_seq: 0,
            outbox: Some(self.outbox_state()),
        };
        tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(256);
            let _ = tx
                .send(pc::MinionMessage {
                    kind: Some(minion_message::Kind::Hello(hello)),
                })
                .await;
            let stream = async {
                let ch = master.channel().await?;
                ReplicationClient::new(ch)
                    .max_decoding_message_size(64 << 20)
                    .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| format!("replication stream refused: {}", e.message()))
            };
            let mut inbound = match stream.await {
                Ok(s) => s,
                Err(error) => {
                    let _ = itx.send(Internal::Down { generation, error }).await;
                    return;
                }
            };
            if itx.send(Internal::Up { generation, tx }).await.is_err() {
                return;
            }
            let error = loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = itx.closed() => return, // The link stopped: drop the stream.
                };
                match next {
                    Ok(Some(msg)) => {
                        if itx.send(Internal::Msg { generation, msg }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break "the master closed the stream".to_owned(),
                    Err(e) => break e.message().to_owned(),
                }
            };
            let _ = itx.send(Internal::Down { generation, error }).await;
        });
    }

    /// Handles a connection event; returns a reconnect delay when the stream went down.
    async fn internal(&mut self, i: Internal) -> Option<Duration> {
        let now = self.clock.monotonic();
        match i {
            Internal::Up { generation, tx } if generation == self.generation => {
                self.connecting = false;
                self.backoff_ms = RECONNECT_MIN_MS;
                self.conn = Some(tx);
                tracing::info!(node = %self.opts.node, epoch = self.outbox.epoch(), pending = self.outbox.len(), "replication stream to the master is up");
                self.outbox.handle_connected(now);
                self.report = Some(true);
                None
            }
            Internal::Down { generation, error } if generation == self.generation => {
                let was_up = self.conn.take().is_some();
                self.connecting = false;
                self.outbox.handle_disconnected(now);
                if was_up {
                    tracing::warn!(node = %self.opts.node, %error, pending = self.outbox.len(), "replication stream to the master is down; reconnecting");
                    self.report = Some(false);
                } else {
                    tracing::debug!(node = %self.opts.node, %error, "cannot reach the master yet");
                }
                let delay = jittered(&*self.opts.master.entropy, self.backoff_ms);
                self.backoff_ms = (self.backoff_ms * 2).min(RECONNECT_MAX_MS);
                Some(delay)
            }
            Internal::Msg { generation, msg } if generation == self.generation => {
                match msg.kind {
                    Some(master_message::Kind::Ack(a)) => {
                        self.outbox.handle_ack(now, a.epoch, a.upto_seq);
                        let later = self.waiters.split_off(&(self.outbox.acked() + 1));
                        for (_, w) in std::mem::replace(&mut self.waiters, later) {
                            let _ = w.send(());
                        }
                    }
                    Some(master_message::Kind::Broadcast(b)) => {
                        // Behind an untold connection change, or into a full queue: dropped (and
                        // the node told), never waited for.
                        let sent = self.report.is_none()
                            && !self.broadcasts_lost
                            && self.events_out.try_send(LinkEvent::Broadcast(b)).is_ok();
                        if !sent {
                            if !self.broadcasts_lost {
                                tracing::warn!(node = %self.opts.node, "the node is not taking broadcasts; dropping them (tasks are resent, the read cache is cleared)");
                            }
                            self.broadcasts_lost = true;
                        }
                    }
                    Some(master_message::Kind::Error(e)) => {
                        tracing::warn!(node = %self.opts.node, message = %e.message, expected = e.expected_seq, "the master refused events");
                        if e.current_epoch > 0 {
                            self.stale_epoch(now, e.current_epoch);
                        }
                    }
                    None => {}
                }
                None
            }
            _ => None, // From an older connection attempt.
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The master's side.

/// The master's `Replication` and `RemoteDatastore` services.
#[derive(Clone)]
pub struct ClusterService {
    node: Node,
    datastore: Datastore,
    minions: Arc<BTreeSet<String>>,
    value_bytes_max: u64,
}

impl ClusterService {
    /// Serves the minions named in `minions` (node names from `ExtraFrontends`), accepting values
    /// of at most `value_bytes_max` (`Datastore.max_value_size`).
    pub fn new(
        node: Node,
        datastore: Datastore,
        minions: BTreeSet<String>,
        value_bytes_max: u64,
    ) -> ClusterService {
        ClusterService {
            node,
            datastore,
            minions: Arc::new(minions),
            value_bytes_max,
        }
    }
}

fn require_frontend<T>(req: &Request<T>) -> Result<(), Status> {
    crate::net::tls::require_role(req, Role::Frontend, "the frontend certificate").map(drop)
}

fn ds_status(e: crate::storage::datastore::DatastoreError) -> Status {
    match e {
        crate::storage::datastore::DatastoreError::Refused(e) => {
            Status::invalid_argument(e.to_string())
        }
        crate::storage::datastore::DatastoreError::Stopped(_) => Status::unavailable(e.to_string()),
    }
}

type MasterStream = tokio_stream::wrappers::ReceiverStream<Result<pc::MasterMessage, Status>>;
type Stream<T> = tokio_stream::wrappers::ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl pc::replication_server::Replication for ClusterService {
    type StreamStream = MasterStream;

    async fn stream(
        &self,
        req: Request<tonic::Streaming<pc::MinionMessage>>,
    ) -> Result<Response<MasterStream>, Status> {
        require_frontend(&req)?;
        let mut incoming = req.into_inner();
        let limits = ClusterLimits::default();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream closed before a MinionHello"))?;
        let (node_name, outbox) = match validate_minion_message(first, &limits) {
            Ok(MinionInput::Hello { node, outbox, .. }) => (node, outbox),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a MinionHello",
                ));
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        if !self.minions.contains(&node_name) {
            return Err(Status::permission_denied(format!(
                "{node_name:?} is not a minion of this deployment (ExtraFrontends lists {:?})",
                self.minions
            )));
        }
        let (tx, rx) = mpsc::channel(MINION_QUEUE_MAX);
        let conn = self.node.minion_up(node_name.clone(), outbox, tx).await?;
        let node = self.node.clone();
        let reader = async move {
            loop {
                let msg = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(minion = %node_name, error = %e, "replication stream ended");
                        break;
                    }
                };
                match validate_minion_message(msg, &limits) {
                    Ok(MinionInput::Events(batch)) => {
                        tracing::debug!(minion = %node_name, first = batch.events.first().map(|e| e.0), count = batch.events.len(), "replication batch");
                        if node
                            .minion_events(node_name.clone(), conn, batch)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(MinionInput::BroadcastAck { .. }) => {}
                    Ok(MinionInput::Hello { .. }) => {
                        tracing::warn!(minion = %node_name, "a second MinionHello on the replication stream; closing it");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(minion = %node_name, error = %e, "refused a replication message; closing the stream");
                        break;
                    }
                }
            }
            node.minion_down(node_name, conn).await;
        };
        tokio::spawn(reader);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[tonic::async_trait]
impl pc::remote_datastore_server::RemoteDatastore for ClusterService {
    type GetStream = Stream<pc::ValueChunk>;

    async fn get(&self, req: Request<pc::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        require_frontend(&req)?;
        let key = req.into_inner().key;
        let value = self.datastore.get(&key).await.map_err(ds_status)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let Some(v) = value else {
                let _ = tx
                    .send(Ok(pc::ValueChunk {
                        found: false,
                        ..Default::default()
                    }))
                    .await;
                return;
            };
            let total = v.len() as u64;
            let mut at = 0;
            loop {
                let end = (at + VALUE_CHUNK_BYTES).min(v.len());
                let chunk = pc::ValueChunk {
                    found: true,
                    total_len: total,
                    version: 0,
                    data: v.slice(at..end),
                };
                if tx.send(Ok(chunk)).await.is_err() || end == v.len() {
                    return;
                }
                at = end;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn set(
        &self,
        req: Request<tonic::Streaming<pc::SetChunk>>,
    ) -> Result<Response<pc::SetResponse>, Status> {
        require_frontend(&req)?;
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("Set without a chunk"))?;
        let bad = |e: ClusterError| Status::invalid_argument(e.to_string());
        let mut value =
            ValueAssembly::start(&first.key, first.total_len, self.value_bytes_max).map_err(bad)?;
        value.push(&first.data).map_err(bad)?;
        while let Some(c) = chunks.message().await? {
            value.push(&c.data).map_err(bad)?;
        }
        let (key, value) = value.finish().map_err(bad)?;
        let version = self
            .datastore
            .set(&key, Bytes::from(value))
            .await
            .map_err(ds_status)?;
        self.node.datastore_changed(key, version).await;
        Ok(Response::new(pc::SetResponse { version }))
    }

    async fn delete(
        &self,
        req: Request<pc::DeleteRequest>,
    ) -> Result<Response<pc::DeleteResponse>, Status> {
        require_frontend(&req)?;
        let key = req.into_inner().key;
        let version = self.datastore.delete(&key).await.map_err(ds_status)?;
        self.node.datastore_changed(key, version).await;
        Ok(Response::new(pc::DeleteResponse { version }))
    }

    type ListStream = Stream<pc::ListResponse>;

    async fn list(
        &self,
        req: Request<pc::ListRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        require_frontend(&req)?;
        let r = req.into_inner();
        let (mut keys, mut truncated) = self.datastore.list(&r.prefix).await.map_err(ds_status)?;
        if r.limit > 0 && keys.len() > r.limit as usize {
            keys.truncate(r.limit as usize);
            truncated = true;
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut pages: Vec<Vec<String>> =
                keys.chunks(LIST_PAGE_KEYS).map(|c| c.to_vec()).collect();
            if pages.is_empty() {
                pages.push(Vec::new());
            }
            let n = pages.len();
            for (i, keys) in pages.into_iter().enumerate() {
                let page = pc::ListResponse {
                    keys,
                    truncated: truncated && i + 1 == n,
                };
                if tx.send(Ok(page)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

#[cfg(test)]
mod tests;
