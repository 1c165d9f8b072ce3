//! A frontend node: the client-facing `Comms` service and, on the master, the analyst's `Api`.
//!
//! One task, the [`Node`] actor, owns the core state machines of the node (client registry, key cache,
//! flow tracker). gRPC handlers talk to it through a bounded channel; it performs the machines' actions
//! (store a flow message in the filestore, acknowledge, write records through the datastore) and feeds
//! their results back as inputs — the driving rule of `talon-core`, with tokio around it.
//!
//! The same actor runs on the master and on minions ([`Role`]). The master is the single writer of
//! metadata: it owns the registry, the hunt manager and the tasks not yet delivered. A minion serves
//! its clients' flows (bulk data straight to the shared filestore) and tells the master what happened
//! through its replication [`Link`]: a client seen or gone, a task delivered, a flow completed. It
//! acknowledges a flow's final status only once the master has applied the completion, so a minion
//! killed at any point loses nothing: the client resends the final status to another node.

use crate::clock::{Clock, Entropy};
use crate::cluster::{Link, LinkEvent, Meta, WriteError};
use crate::filestore::Filestore;
use crate::pki::Role;
use crate::records::{ClientJson, FlowJson, FlowRecordState, HuntJson, ParticipantJson};
use crate::storage::segments::{MessageReader, RunRef};
use crate::storage::volume::SharedVolume;
use crate::tls::Peer;
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use talon_core::cluster_codec::MinionBatch;
use talon_core::codec::{self, ClientInput, CodecLimits, FlowData};
use talon_core::flows::{FinalState, FlowAction, FlowKey, FlowLimits, FlowTracker, StoredMessage};
use talon_core::hunts::{
    ClientFacts, Hunt, HuntAction, HuntLimits, HuntManager, HuntSpec, HuntState,
};
use talon_core::node::tasks::{TaskAction, TaskBook, TaskLimits};
use talon_core::node::{Outcome, Token};
use talon_core::ratelimit::Paced;
use talon_core::registry::{
    KeyCache, KeyCheck, Query, Registry, RegistryAction, RegistryLimits, Sighting,
};
use talon_core::replication::{Cursor, Inbox, InboxAction, InboxLimits};
use talon_core::{ClientId, FlowId, HuntId, Timestamp, paths};
use talon_proto::api;
use talon_proto::cluster::{self as pc, broadcast, master_message, replicated_event::Event};
use talon_proto::comms::{self, client_message, server_message};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

/// Per-client queue of messages to push down its stream; a slow client drops acks (it resends).
pub const CLIENT_QUEUE_MAX: usize = 256;
/// Messages waiting for the node actor; handlers wait beyond it (back-pressure).
pub const NODE_INBOX_MAX: usize = 8192;
/// Acknowledgements waiting to be sent again as settled. Beyond it one is dropped: the client resends
/// the message after 2 s and its re-acknowledgement is queued again (so a hung volume costs this
/// much memory at most, not one waiter per resend).
pub const SETTLE_QUEUE_MAX: usize = 65_536;
/// Acknowledgements settled by one wait for the filestore buffer.
const SETTLE_BATCH_MAX: usize = 4096;
/// How often the master sends tasks not yet acknowledged again.
pub const TASK_RESEND_MS: u64 = 5_000;
/// Task notifications a node queues, in seconds' worth of `notifications_per_second` (at least
/// 1,024). Beyond it a notification is dropped: the task stays pending on the master, which sends it
/// again every `TASK_RESEND_MS`.
pub const NOTIFY_QUEUE_SECONDS: u64 = 60;
/// Datastore key of a minion's replication cursor (persisted after the effects it covers).
fn cursor_key(node: &str) -> String {
    format!("cluster/minions/{}.json", paths::safe_component(node))
}

/// Datastore key of a task not yet acknowledged by its client (protobuf `Task`).
fn task_key(client: &ClientId, flow: &FlowId) -> String {
    format!("tasks/{client}/{flow}.pb")
}

/// What asked for a task: how its creation ended goes back there.
#[derive(Debug)]
enum TaskOrigin {
    /// An analyst's collection (the caller awaits the outcome).
    Collect,
    /// A hunt's schedule: a refused one is undone in the hunt manager.
    Hunt(HuntId),
}

/// Hunt participants scheduled in one batch at most (their records built, written together and
/// their tasks sent) before the node yields to its other work.
const SCHEDULE_BATCH_MAX: usize = 1024;

/// Reads at most this many keys at once when a master starts (its records are on the 40–60 ms volume:
/// one at a time, 100,000 client records would take over an hour; the datastore bounds its own
/// readers too).
const LOAD_CONCURRENCY: usize = 256;

/// Writes each group of keys atomically ([`Meta::write_all`]), up to [`LOAD_CONCURRENCY`] groups at
/// once (so one journal sync covers many); one result per group, in order.
async fn write_groups(ds: &Meta, groups: Vec<Vec<(String, Bytes)>>) -> Vec<Result<(), WriteError>> {
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
                let writes = writes.into_iter().map(|(k, v)| (k, Some(v))).collect();
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

fn json_bytes<T: serde::Serialize>(value: &T) -> Result<Bytes, Status> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| Status::internal(e.to_string()))
}

/// Attempts at one start-up read. A read is idempotent, and one failure among a 10,000-client
/// master's 10,000 start-up reads must not stop it: the simulator's 10,000-client run, with a volume
/// failing 0.2 % of its operations, restarted the master 382 times in 600 virtual s and it never
/// finished starting.
const LOAD_READ_ATTEMPTS: u32 = 5;

/// Reads a key, retrying a failure after 50, 100, 200, 400 ms; the last error names the key.
async fn get_retrying(ds: &Meta, key: &str) -> Result<Option<Bytes>, String> {
    let mut attempt = 1;
    loop {
        match ds.get(key).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= LOAD_READ_ATTEMPTS => {
                return Err(format!("{key}: {e} (after {attempt} attempts)"));
            }
            Err(e) => {
                tracing::debug!(key, error = %e, attempt, "a start-up read failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// Reads `keys` with up to [`LOAD_CONCURRENCY`] reads in flight; the values come back in key order.
async fn get_many(ds: &Meta, keys: Vec<String>) -> Result<Vec<(String, Option<Bytes>)>, String> {
    let mut out: Vec<(usize, String, Option<Bytes>)> = Vec::with_capacity(keys.len());
    let mut set = tokio::task::JoinSet::new();
    let mut todo = keys.into_iter().enumerate();
    loop {
        while set.len() < LOAD_CONCURRENCY {
            let Some((i, k)) = todo.next() else { break };
            let ds = ds.clone();
            set.spawn(async move {
                let v = get_retrying(&ds, &k).await;
                (i, k, v)
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (i, k, v) = r.map_err(|e| format!("a start-up read failed: {e}"))?;
        out.push((i, k, v?));
    }
    out.sort_by_key(|(i, ..)| *i);
    Ok(out.into_iter().map(|(_, k, v)| (k, v)).collect())
}

fn parse_value<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, String> {
    serde_json::from_slice(v).map_err(|e| format!("{key}: {e}"))
}

fn parse_json<T: serde::de::DeserializeOwned>(
    key: &str,
    v: Option<Bytes>,
) -> Result<Option<T>, String> {
    match v {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
    }
}

/// The keys a master reads when it starts: client records, hunt records and participants,
/// replication cursors, tasks awaiting delivery and uploads awaiting reassembly. Its datastore keeps
/// a start image of exactly these (docs/architecture.md, "The start image").
pub fn start_key(k: &str) -> bool {
    let parts: Vec<&str> = k.split('/').collect();
    matches!(
        parts.as_slice(),
        ["clients", _, "record.json"] | ["hunts", _, "record.json"] | ["hunts", _, "clients", _]
    ) || k.starts_with("cluster/minions/")
        || k.starts_with("tasks/")
        || k.starts_with(paths::UPLOADS_PENDING)
}

/// Where the start keys live on the volume, and how deep under each prefix they lie (the listing
/// never walks deeper: below `clients/C/` lie every flow's directories).
const START_PREFIXES: [(&str, Option<usize>); 5] = [
    ("clients/", Some(2)),
    ("hunts/", Some(3)),
    ("cluster/minions/", None),
    ("tasks/", None),
    (paths::UPLOADS_PENDING, None),
];

/// Reads every start key by listing the volume (a master's first start, or one whose start image
/// was lost): the entries in key order, and whether the listing was complete (a list the datastore
/// cut at its bound is not, and must not seed the start image).
async fn list_start_keys(ds: &Meta) -> Result<(Vec<(String, Bytes)>, bool), String> {
    let mut keys = Vec::new();
    let mut complete = true;
    for (prefix, depth) in START_PREFIXES {
        let (found, truncated) = ds
            .list_within(prefix, depth)
            .await
            .map_err(|e| format!("listing {prefix}: {e}"))?;
        if truncated {
            tracing::warn!(
                prefix,
                "more keys than the datastore lists at once; some wait for a later restart"
            );
            complete = false;
        }
        keys.extend(found.into_iter().filter(|k| start_key(k)));
    }
    keys.sort();
    keys.dedup();
    let entries = get_many(ds, keys)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    Ok((entries, complete))
}

/// What a master starts from.
struct MasterStart {
    records: Vec<talon_core::registry::ClientRecord>,
    hunts: HuntManager,
    cursors: Vec<(String, Cursor)>,
    pending: Vec<(ClientId, FlowId, comms::Task)>,
    reassembling: Vec<FlowKey>,
}

/// Loads the master's state: from the datastore's start image when it has a valid one (one local
/// file), else by listing and reading the volume, which then seeds the image for the next start.
async fn load_master(
    ds: &Meta,
    limits: &HuntLimits,
    now: Timestamp,
) -> Result<MasterStart, String> {
    let image = match ds {
        Meta::Local(d) => d.take_start_image().await.map_err(|e| e.to_string())?,
        Meta::Remote(_) => None,
    };
    let entries: Vec<(String, Bytes)> = match image {
        Some(e) => {
            tracing::info!(keys = e.len(), "loading from the start image");
            e.into_iter().collect()
        }
        None => {
            let (entries, complete) = list_start_keys(ds).await?;
            if let (Meta::Local(d), true) = (ds, complete) {
                match d.seed_start_image(entries.clone()).await {
                    Ok(generation) => {
                        tracing::info!(keys = entries.len(), generation, "start image written")
                    }
                    Err(e) => tracing::warn!(error = %e, "no start image written"),
                }
            }
            entries
        }
    };
    let mut records = Vec::new();
    let mut cursors = Vec::new();
    let mut pending = Vec::new();
    let mut reassembling = Vec::new();
    let mut hunt_entries = Vec::new();
    for (k, v) in entries {
        let parts: Vec<&str> = k.split('/').collect();
        match parts.as_slice() {
            ["clients", _, "record.json"] => {
                let j: ClientJson = parse_value(&k, &v)?;
                records.push(
                    j.to_record()
                        .ok_or_else(|| format!("{k}: malformed client record"))?,
                );
            }
            ["hunts", ..] => hunt_entries.push((k, v)),
            ["cluster", "minions", ..] => {
                let c: CursorJson = parse_value(&k, &v)?;
                cursors.push((
                    c.node,
                    Cursor {
                        epoch: c.epoch,
                        hwm: c.hwm,
                    },
                ));
            }
            ["tasks", ..] => {
                let Some(client) = parts.get(1).and_then(|c| ClientId::parse(c).ok()) else {
                    tracing::warn!(key = %k, "ignoring a malformed pending task key");
                    continue;
                };
                let task = comms::Task::decode(v).map_err(|e| format!("{k}: {e}"))?;
                let Ok(flow) = FlowId::parse(&task.flow_id) else {
                    tracing::warn!(key = %k, "ignoring a pending task with a malformed flow id");
                    continue;
                };
                pending.push((client, flow, task));
            }
            _ => {
                let parsed = k
                    .strip_prefix(paths::UPLOADS_PENDING)
                    .and_then(|r| r.strip_suffix(".json"))
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(c, f)| Some((ClientId::parse(c).ok()?, FlowId::parse(f).ok()?)));
                match parsed {
                    Some((client, flow)) => reassembling.push(FlowKey { client, flow }),
                    None => tracing::warn!(key = %k, "ignoring a malformed uploads-pending key"),
                }
            }
        }
    }
    tracing::info!(clients = records.len(), "loaded client registry");
    let hunts = restore_hunts(hunt_entries, limits, now)?;
    tracing::info!(minions = cursors.len(), "loaded replication cursors");
    tracing::info!(tasks = pending.len(), "loaded tasks awaiting delivery");
    if !reassembling.is_empty() {
        tracing::info!(
            flows = reassembling.len(),
            "reassembling uploads a restart interrupted"
        );
    }
    Ok(MasterStart {
        records,
        hunts,
        cursors,
        pending,
        reassembling,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CursorJson {
    node: String,
    epoch: u64,
    hwm: u64,
}

/// The node's settings.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `<hostname>-<port>`.
    pub node_name: String,
    /// The deployment nonce clients must present.
    pub nonce: String,
    /// Key cache size (`Frontend.resources.expected_clients`).
    pub expected_clients: usize,
    /// Client message limits.
    pub codec: CodecLimits,
    /// Flow tracker limits.
    pub flows: FlowLimits,
    /// Registry limits.
    pub registry: RegistryLimits,
    /// Hunt manager limits.
    pub hunts: HuntLimits,
    /// Tasks waiting for one client (`Frontend.resources.max_queued_tasks_per_client`).
    pub queued_tasks_per_client_max: usize,
    /// Task notifications pushed to this node's clients per second
    /// (`Frontend.resources.notifications_per_second`).
    pub notifications_per_second: u64,
    /// A client stream without a Hello for this long is closed (`hello_timeout_s`).
    pub hello_timeout: std::time::Duration,
    /// Largest metadata value (`Datastore.max_value_size`): a flow record is kept within it.
    pub value_bytes_max: u64,
}

type Reply<T> = oneshot::Sender<Result<T, Status>>;

enum Msg {
    Connected {
        peer: Peer,
        hello: codec::Hello,
        tx: ClientTx,
        conn: u64,
        reply: Reply<()>,
    },
    Disconnected {
        client: ClientId,
        conn: u64,
    },
    MinionUp {
        node: String,
        tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
        reply: Reply<u64>,
    },
    MinionDown {
        node: String,
        conn: u64,
    },
    MinionEvents {
        node: String,
        conn: u64,
        batch: MinionBatch,
    },
    DatastoreChanged {
        key: String,
        version: u64,
    },
    Link(LinkEvent),
    /// A minion's flow completion was applied by the master (`ok`), or its replication failed.
    CompletionApplied {
        key: FlowKey,
        ok: bool,
    },
    Flow {
        client: ClientId,
        flow: FlowId,
        seq: u64,
        data: FlowData,
        raw: Bytes,
    },
    Stored {
        key: FlowKey,
        seq: u64,
        ok: bool,
    },
    /// A completed flow's messages are on the shared volume (`ok`), or copying them failed.
    Settled {
        outcome: talon_core::flows::FlowOutcome,
        /// Where its messages are (empty unless `ok`).
        runs: Vec<RunRef>,
        ok: bool,
    },
    Audited {
        key: FlowKey,
        found: Option<Vec<StoredMessage>>,
    },
    TaskAck {
        client: ClientId,
        flow: FlowId,
    },
    Search {
        query: String,
        limit: usize,
        reply: Reply<api::SearchResponse>,
    },
    Label {
        client: String,
        label: String,
        remove: bool,
        reply: Reply<api::ClientSummary>,
    },
    Collect {
        client: String,
        artifact: String,
        params: BTreeMap<String, String>,
        reply: Reply<api::FlowSummary>,
    },
    CreateHunt {
        req: api::CreateHuntRequest,
        reply: Reply<api::HuntSummary>,
    },
    ListHunts {
        reply: Reply<api::ListHuntsResponse>,
    },
    GetHunt {
        id: String,
        reply: Reply<api::HuntSummary>,
    },
    StopHunt {
        id: String,
        reply: Reply<api::HuntSummary>,
    },
    HuntFlows {
        id: String,
        reply: Reply<Vec<(ClientId, FlowId)>>,
    },
    Cluster {
        reply: Reply<api::ClusterStatus>,
    },
}

/// Default hunt lifetime when the request gives none.
pub const HUNT_EXPIRES_DEFAULT_S: u64 = 7 * 24 * 3600;

/// The API's view of a hunt.
pub fn hunt_summary(h: &Hunt) -> api::HuntSummary {
    let r = h.record();
    let s = h.stats();
    let state = match r.state {
        HuntState::Running => api::HuntState::Running,
        HuntState::Stopped => api::HuntState::Stopped,
        HuntState::Expired => api::HuntState::Expired,
        HuntState::Complete => api::HuntState::Complete,
    };
    api::HuntSummary {
        hunt_id: r.id.to_string(),
        state: state as i32,
        artifact: r.spec.artifact.clone(),
        params: r.spec.params.clone().into_iter().collect(),
        created_unix_ms: r.created.as_ms(),
        expires_unix_ms: r.spec.expires.as_ms(),
        stats: Some(api::HuntStats {
            scheduled: s.scheduled,
            completed: s.completed,
            errors: s.errors,
            rows: s.rows,
            uploaded_bytes: s.uploaded_bytes,
        }),
        include_labels: r.spec.include_labels.iter().cloned().collect(),
        exclude_labels: r.spec.exclude_labels.iter().cloned().collect(),
        os: r.spec.os.clone().unwrap_or_default(),
        client_limit: r.spec.client_limit.unwrap_or(0),
        description: r.spec.description.clone(),
    }
}

/// A handle to the node actor.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Msg>,
    datastore: Meta,
    filestore: Filestore,
    limits: CodecLimits,
    nonce: String,
    hello_timeout: std::time::Duration,
    next_conn: Arc<std::sync::atomic::AtomicU64>,
    /// On a minion: paces the first contacts it accepts (`enrolments_per_second`; the master's
    /// registry paces its own).
    enrolments: Arc<std::sync::Mutex<talon_core::ratelimit::TokenBucket>>,
    enrolments_per_second: u64,
    clock: Arc<dyn Clock>,
}

struct Conn {
    id: u64,
    tx: ClientTx,
    /// On a minion: what the master was told when the client connected (re-told after a reconnect).
    seen: Option<pc::ClientSeen>,
}

/// How a node takes part in the cluster, given to [`Node::start`].
pub enum Cluster {
    /// The master (also a single-server deployment).
    Master,
    /// A minion: its replication link and the link's events.
    Minion {
        /// The link to the master.
        link: Link,
        /// What the link reports.
        events: mpsc::Receiver<LinkEvent>,
    },
}

/// The actor's role-specific state.
enum NodeRole {
    Master(Box<MasterState>),
    Minion(MinionState),
}

struct MinionConn {
    conn: u64,
    tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
}

struct MasterState {
    /// Minions with a replication stream up.
    minions: BTreeMap<String, MinionConn>,
    next_minion_conn: u64,
    /// Events checked by `cluster_codec`: a malformed one is `Err(reason)`, skipped when applied.
    /// It holds each minion's cursor as applied and as durable, and acknowledges only the latter.
    inbox: Inbox<Result<Event, String>>,
    /// Tasks created and not yet acknowledged by their client (core `TaskBook`: durable before
    /// sent, bounded per client, sent again until acknowledged).
    tasks: TaskBook<comms::Task, TaskOrigin>,
}

struct MinionState {
    link: Link,
}

struct Actor {
    opts: NodeOptions,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    datastore: Meta,
    filestore: Filestore,
    role: NodeRole,
    registry: Registry,
    keys: KeyCache,
    flows: FlowTracker,
    hunts: HuntManager,
    conns: BTreeMap<ClientId, Conn>,
    /// Tasks for clients connected here, pushed at `notifications_per_second`.
    notify: Paced<(ClientId, String), comms::Task>,
    /// The bytes of the flow message being handled, until a Store action takes them (at most one).
    raw: BTreeMap<(FlowKey, u64), Bytes>,
    self_tx: mpsc::Sender<Msg>,
    /// Acknowledgements to send again once settled (bounded: `SETTLE_QUEUE_MAX`).
    settler: Settler,
    /// Completed flows' uploads being reassembled (master).
    uploads: Reassembly,
}

async fn load_json<T: serde::de::DeserializeOwned>(
    ds: &Meta,
    key: &str,
) -> Result<Option<T>, String> {
    parse_json(key, ds.get(key).await.map_err(|e| format!("{key}: {e}"))?)
}

async fn save_json<T: serde::Serialize>(ds: &Meta, key: &str, value: &T) -> Result<(), Status> {
    let bytes = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    ds.set(key, Bytes::from(bytes))
        .await
        .map(|_| ())
        .map_err(|e| Status::unavailable(format!("datastore: {e}")))
}

fn parse_hunt(id: &str) -> Result<HuntId, Status> {
    HuntId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Rebuilds the hunt manager from the hunt and participant records.
fn restore_hunts(
    entries: Vec<(String, Bytes)>,
    limits: &HuntLimits,
    now: Timestamp,
) -> Result<HuntManager, String> {
    let mut records = Vec::new();
    let mut participants = Vec::new();
    for (k, v) in entries {
        let parts: Vec<&str> = k.split('/').collect();
        match parts.as_slice() {
            ["hunts", _, "record.json"] => {
                let j: HuntJson = parse_value(&k, &v)?;
                records.push(
                    j.to_record()
                        .ok_or_else(|| format!("{k}: malformed hunt record"))?,
                );
            }
            ["hunts", hunt, "clients", file] => {
                let hunt = HuntId::parse(hunt).map_err(|e| format!("{k}: {e}"))?;
                let client = ClientId::parse(file.trim_end_matches(".json"))
                    .map_err(|e| format!("{k}: {e}"))?;
                let p: ParticipantJson = parse_value(&k, &v)?;
                participants.push((hunt, client, p.into()));
            }
            _ => {}
        }
    }
    tracing::info!(
        hunts = records.len(),
        participants = participants.len(),
        "restored hunts"
    );
    Ok(HuntManager::restore(
        limits.clone(),
        now,
        records,
        participants,
    ))
}

fn summary(r: &talon_core::registry::ClientRecord) -> api::ClientSummary {
    api::ClientSummary {
        client_id: r.id.to_string(),
        hostname: r.hostname.clone(),
        os: r.os.clone(),
        labels: r.labels.iter().cloned().collect(),
        last_seen_unix_ms: r.last_seen.as_ms(),
        last_ip: r.last_ip.clone(),
        node: r.node.clone(),
        connected: r.connected,
    }
}

/// The API's view of a flow record.
pub fn flow_summary(f: &FlowJson) -> api::FlowSummary {
    let state = match f.state {
        FlowRecordState::Queued | FlowRecordState::Running => comms::FlowState::Running,
        FlowRecordState::Completed => comms::FlowState::Completed,
        FlowRecordState::Error => comms::FlowState::Error,
    };
    api::FlowSummary {
        client_id: f.client_id.clone(),
        flow_id: f.flow_id.clone(),
        artifact: f.artifact.clone(),
        state: state as i32,
        rows: f.rows,
        uploaded_bytes: f.uploaded_bytes,
        error: f.error.clone(),
        created_unix_ms: f.created_ms,
    }
}

impl Node {
    /// Starts the node actor. The master loads the registry, the hunts and the minions' replication
    /// cursors from its datastore first; a minion starts empty (the master holds that state).
    pub async fn start(
        opts: NodeOptions,
        datastore: Meta,
        filestore: Filestore,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        cluster: Cluster,
    ) -> Result<Node, String> {
        let mut records = Vec::new();
        let mut hunts = HuntManager::new(opts.hunts.clone());
        // Completed flows whose uploads a crash left unassembled (master).
        let mut reassembling = Vec::new();
        let (role, link_events) = match cluster {
            Cluster::Master => {
                let loaded = load_master(&datastore, &opts.hunts, clock.now()).await?;
                records = loaded.records;
                hunts = loaded.hunts;
                reassembling = loaded.reassembling;
                let task_limits = TaskLimits {
                    per_client_max: opts.queued_tasks_per_client_max,
                    resend_ms: TASK_RESEND_MS,
                };
                let state = MasterState {
                    minions: BTreeMap::new(),
                    next_minion_conn: 1,
                    inbox: Inbox::recover(InboxLimits::default(), loaded.cursors),
                    tasks: TaskBook::restore(task_limits, clock.now(), loaded.pending),
                };
                (NodeRole::Master(Box::new(state)), None)
            }
            Cluster::Minion { link, events } => {
                (NodeRole::Minion(MinionState { link }), Some(events))
            }
        };
        let (tx, rx) = mpsc::channel(NODE_INBOX_MAX);
        let mut keys = KeyCache::new(opts.expected_clients.max(1));
        for r in records.iter().take(opts.expected_clients) {
            keys.insert(r.id.clone(), r.key_fingerprint);
        }
        let now0 = clock.now();
        let clock0 = clock.clone();
        let actor = Actor {
            registry: Registry::restore(opts.registry.clone(), records),
            keys,
            flows: FlowTracker::new(opts.flows.clone()),
            hunts,
            opts: opts.clone(),
            clock,
            entropy,
            datastore: datastore.clone(),
            filestore: filestore.clone(),
            role,
            conns: BTreeMap::new(),
            notify: Paced::new(
                opts.notifications_per_second.max(1),
                usize::try_from(
                    opts.notifications_per_second
                        .saturating_mul(NOTIFY_QUEUE_SECONDS)
                        .max(1024),
                )
                .unwrap_or(usize::MAX),
                now0,
            ),
            raw: BTreeMap::new(),
            self_tx: tx.clone(),
            settler: Settler::start(filestore.clone(), SETTLE_QUEUE_MAX),
            uploads: Reassembly::new(opts.value_bytes_max),
        };
        for key in reassembling {
            actor
                .uploads
                .start(filestore.volume().clone(), datastore.clone(), key);
        }
        if let Some(mut events) = link_events {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    if tx.send(Msg::Link(e)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let span = tracing::info_span!("node", node = %opts.node_name);
        tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
        let enrolments = talon_core::ratelimit::TokenBucket::new(
            opts.registry.enrolments_per_second,
            opts.registry.enrolment_burst,
            now0,
        );
        Ok(Node {
            enrolments: Arc::new(std::sync::Mutex::new(enrolments)),
            enrolments_per_second: opts.registry.enrolments_per_second,
            clock: clock0,
            tx,
            datastore,
            filestore,
            limits: opts.codec,
            nonce: opts.nonce,
            hello_timeout: opts.hello_timeout,
            next_conn: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        })
    }

    /// A minion's replication stream is up; returns its connection number.
    pub(crate) async fn minion_up(
        &self,
        node: String,
        tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
    ) -> Result<u64, Status> {
        self.ask(|reply| Msg::MinionUp { node, tx, reply }).await
    }

    /// A minion's replication stream ended.
    pub(crate) async fn minion_down(&self, node: String, conn: u64) {
        let _ = self.tx.send(Msg::MinionDown { node, conn }).await;
    }

    /// A batch of a minion's events; the actor acknowledges on the minion's stream once applied.
    pub(crate) async fn minion_events(
        &self,
        node: String,
        conn: u64,
        batch: MinionBatch,
    ) -> Result<(), Status> {
        self.tx
            .send(Msg::MinionEvents { node, conn, batch })
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))
    }

    /// A minion wrote a key through the remote datastore: other minions drop it from their caches.
    pub(crate) async fn datastore_changed(&self, key: String, version: u64) {
        let _ = self.tx.send(Msg::DatastoreChanged { key, version }).await;
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Msg) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("node is shutting down"))?
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // Ends when every sender is gone, or once the node has fail-stopped (`stopped`): the
        // process is exiting, and requests still queued get "shutting down".
        while !self.stopped() {
            let now = self.now();
            let resend = match &self.role {
                NodeRole::Master(m) => m.tasks.poll_timeout(),
                NodeRole::Minion(_) => None,
            };
            let next = [
                self.flows.poll_timeout(),
                self.hunts.poll_timeout(),
                resend,
                self.notify.poll_timeout(now),
            ]
            .into_iter()
            .fold(None, talon_core::time::earliest)
            .unwrap_or(now.plus_ms(30_000));
            let wait = std::time::Duration::from_millis(next.since_ms(now).min(30_000));
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => {
                        self.handle(m).await;
                        // Also under a steady stream of messages, which keeps the timer from firing.
                        let now = self.now();
                        self.resend_pending(now).await;
                        self.release_notifications(now);
                    }
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    if self.stopped() {
                        break;
                    }
                    let now = self.now();
                    self.flows.handle_timeout(now);
                    self.hunts.handle_timeout(now);
                    self.drain_flows().await;
                    // A failed write is logged and fail-stops the node (`Meta::set`).
                    let _ = self.drain_hunts().await;
                    self.resend_pending(now).await;
                    self.release_notifications(now);
                }
            }
        }
    }

    /// Queues a task notification for a client connected here (paced by
    /// `notifications_per_second`). Dropped at the queue's bound: the master sends it again.
    fn notify_task(&mut self, client: &ClientId, task: comms::Task) {
        if !self.conns.contains_key(client) {
            return; // Not connected here (any more): the master sends it where it connects.
        }
        let key = (client.clone(), task.flow_id.clone());
        if let Err(full) = self.notify.push(key, task) {
            tracing::warn!(client = %client, max = full.max, "task notification queue is full; the task is sent again later");
        }
    }

    /// Pushes the notifications the rate allows now.
    fn release_notifications(&mut self, now: Timestamp) {
        while let Some(((client, _), task)) = self.notify.poll(now) {
            self.push(&client, server_message::Kind::Task(task));
        }
    }

    /// Sends every pending task again once `TASK_RESEND_MS` has passed, and retries deletes of
    /// acknowledged tasks' records that failed (master).
    async fn resend_pending(&mut self, now: Timestamp) {
        if let NodeRole::Master(m) = &mut self.role
            && m.tasks.poll_timeout().is_some_and(|t| now >= t)
        {
            m.tasks.handle_timeout(now);
            self.drain_tasks(BTreeMap::new()).await;
        }
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Fail-stop: once the datastore (or the filestore buffer) has stopped, memory may be ahead of
    /// what is durable (a participant scheduled whose write failed), and the process is about to
    /// exit. Nothing more is acted on or answered: a dropped request's caller gets "shutting down",
    /// never figures a restart would not find.
    fn stopped(&self) -> bool {
        self.filestore.stopped() || matches!(&self.datastore, Meta::Local(d) if d.stopped())
    }

    async fn handle(&mut self, msg: Msg) {
        if self.stopped() {
            return;
        }
        let now = self.now();
        match msg {
            Msg::Connected {
                peer,
                hello,
                tx,
                conn,
                reply,
            } => {
                let r = self.connected(now, peer, hello, tx, conn).await;
                let _ = reply.send(r);
            }
            Msg::Disconnected { client, conn } => {
                if self.conns.get(&client).is_some_and(|c| c.id == conn) {
                    self.conns.remove(&client);
                    tracing::info!(client = %client, "client disconnected");
                    match &self.role {
                        NodeRole::Master(_) => {
                            self.registry
                                .set_disconnected(now, &client, &self.opts.node_name);
                        }
                        NodeRole::Minion(_) => {
                            let ev = Event::ClientGone(pc::ClientGone {
                                client_id: client.to_string(),
                            });
                            self.replicate(ev, None).await;
                        }
                    }
                }
            }
            Msg::MinionUp { node, tx, reply } => {
                let r = self.minion_up(node, tx);
                let _ = reply.send(r);
            }
            Msg::MinionDown { node, conn } => {
                if let NodeRole::Master(m) = &mut self.role
                    && m.minions.get(&node).is_some_and(|c| c.conn == conn)
                {
                    m.minions.remove(&node);
                    tracing::warn!(minion = %node, "minion's replication stream closed");
                }
            }
            Msg::MinionEvents { node, conn, batch } => {
                self.minion_events(now, node, conn, batch).await
            }
            Msg::DatastoreChanged { key, version } => {
                self.broadcast(broadcast::Kind::DatastoreChanged(pc::DatastoreChanged {
                    key,
                    version,
                }));
            }
            Msg::Link(e) => self.link_event(e).await,
            Msg::CompletionApplied { key, ok } => {
                // The final status is acknowledged now (or, if replication failed, the completion
                // is forgotten and the client's resend completes the flow again).
                if ok {
                    self.filestore.forget_runs(&key.client, &key.flow);
                }
                self.flows.handle_recorded(&key, ok);
                self.drain_flows().await;
            }
            Msg::Flow {
                client,
                flow,
                seq,
                data,
                raw,
            } => {
                let key = FlowKey {
                    client: client.clone(),
                    flow,
                };
                match self
                    .flows
                    .handle_message(now, key.clone(), seq, data.tracker_payload())
                {
                    Ok(()) => {
                        // A Store action takes the bytes; a resend that is only re-acknowledged
                        // leaves them here, so drop them after the drain: at most one entry lives.
                        self.raw.insert((key.clone(), seq), raw);
                        self.drain_flows().await;
                        self.raw.remove(&(key, seq));
                    }
                    Err(e) => {
                        // A message after the final status is the client's mistake; the rest are
                        // back-pressure it should retry.
                        let code = match e {
                            talon_core::flows::FlowError::AfterFinal { .. } => {
                                comms::ErrorCode::InvalidMessage
                            }
                            // Not stored, never will be: its refusal is acknowledged in its place.
                            talon_core::flows::FlowError::OverBudget(_) => {
                                comms::ErrorCode::TooLarge
                            }
                            _ => comms::ErrorCode::Busy,
                        } as i32;
                        let m = comms::ServerError {
                            code,
                            message: e.to_string(),
                            flow_id: key.flow.to_string(),
                            seq,
                        };
                        self.push(&client, server_message::Kind::Error(m));
                        self.drain_flows().await;
                    }
                }
            }
            Msg::Stored { key, seq, ok } => {
                self.flows.handle_stored(now, &key, seq, ok);
                self.drain_flows().await;
            }
            Msg::Settled { outcome, runs, ok } => {
                if ok {
                    self.completed(outcome, runs).await;
                } else {
                    // Forgotten: the client's resend of its final status completes it again.
                    self.flows.handle_recorded(&outcome.key, false);
                }
                self.drain_flows().await;
            }
            Msg::Audited { key, found } => {
                self.flows.handle_audit(now, &key, found);
                self.drain_flows().await;
            }
            Msg::TaskAck { client, flow } => self.task_delivered(&client, &flow).await,
            Msg::Search {
                query,
                limit,
                reply,
            } => {
                let r = Query::parse(&query)
                    .map_err(|e| Status::invalid_argument(e.to_string()))
                    .map(|q| {
                        let res = self.registry.search(&q, limit);
                        api::SearchResponse {
                            clients: res.clients.iter().map(|c| summary(c)).collect(),
                            truncated: res.truncated,
                        }
                    });
                let _ = reply.send(r);
            }
            Msg::Label {
                client,
                label,
                remove,
                reply,
            } => {
                let r = self.label(&client, &label, remove).await;
                let _ = reply.send(r);
            }
            Msg::Collect {
                client,
                artifact,
                params,
                reply,
            } => {
                let r = self.collect(now, &client, &artifact, &params).await;
                let _ = reply.send(r);
            }
            Msg::CreateHunt { req, reply } => {
                let r = self.create_hunt(now, req).await;
                let _ = reply.send(r);
            }
            Msg::ListHunts { reply } => {
                self.hunts.handle_timeout(now);
                // Report nothing that is not durable.
                let r = self.drain_hunts().await.map(|()| api::ListHuntsResponse {
                    hunts: self.hunts.list().map(hunt_summary).collect(),
                });
                let _ = reply.send(r);
            }
            Msg::GetHunt { id, reply } => {
                self.hunts.handle_timeout(now);
                let durable = self.drain_hunts().await;
                let r = durable.and_then(|()| parse_hunt(&id)).and_then(|h| {
                    self.hunts
                        .get(&h)
                        .map(hunt_summary)
                        .ok_or_else(|| Status::not_found(format!("no hunt {h}")))
                });
                let _ = reply.send(r);
            }
            Msg::StopHunt { id, reply } => {
                let r = match parse_hunt(&id) {
                    Ok(h) => {
                        let r = self
                            .hunts
                            .stop(now, &h)
                            .map(hunt_summary)
                            .map_err(|e| Status::failed_precondition(e.to_string()));
                        if r.is_ok() {
                            self.broadcast(broadcast::Kind::HuntStopped(pc::HuntStopped {
                                hunt_id: h.to_string(),
                            }));
                        }
                        r
                    }
                    Err(e) => Err(e),
                };
                let r = match self.drain_hunts().await {
                    Ok(()) => r,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Msg::Cluster { reply } => {
                let r = match &self.role {
                    NodeRole::Master(m) => {
                        let names: BTreeSet<&str> = m
                            .inbox
                            .minions()
                            .map(|(n, _)| n)
                            .chain(m.minions.keys().map(String::as_str))
                            .collect();
                        let meta = match &self.datastore {
                            Meta::Local(d) => d.volume_error(),
                            Meta::Remote(_) => None,
                        };
                        let volume_errors = [
                            ("metadata", meta),
                            ("filestore", self.filestore.volume_error()),
                        ]
                        .into_iter()
                        .filter_map(|(what, e)| {
                            e.map(|(t, why)| format!("{what}: {why} (since {})", t.as_ms()))
                        })
                        .collect();
                        Ok(api::ClusterStatus {
                            volume_errors,
                            master: self.opts.node_name.clone(),
                            minions: names
                                .into_iter()
                                .map(|n| {
                                    let c = m.inbox.durable(n);
                                    api::MinionStatus {
                                        node: n.to_owned(),
                                        connected: m.minions.contains_key(n),
                                        epoch: c.map_or(0, |c| c.epoch),
                                        applied: c.map_or(0, |c| c.hwm),
                                    }
                                })
                                .collect(),
                        })
                    }
                    NodeRole::Minion(_) => Err(Status::failed_precondition(
                        "cluster status is the master's; ask its API",
                    )),
                };
                let _ = reply.send(r);
            }
            Msg::HuntFlows { id, reply } => {
                let r = parse_hunt(&id).and_then(|h| {
                    let hunt = self
                        .hunts
                        .get(&h)
                        .ok_or_else(|| Status::not_found(format!("no hunt {h}")))?;
                    Ok(hunt
                        .participants()
                        .map(|(c, _)| (c.clone(), FlowId::for_hunt(&h, c)))
                        .collect())
                });
                let _ = reply.send(r);
            }
        }
    }

    /// Hands an event to the replication link (minion only). Waits while the outbox is full.
    async fn replicate(&self, event: Event, applied: Option<oneshot::Sender<()>>) {
        if let NodeRole::Minion(m) = &self.role
            && let Err(e) = m.link.push(event, applied).await
        {
            tracing::error!(error = %e, "cannot replicate an event");
        }
    }

    /// A client acknowledged a task, on this node or (master) on a minion.
    async fn task_delivered(&mut self, client: &ClientId, flow: &FlowId) {
        match &mut self.role {
            NodeRole::Minion(_) => {
                let ev = Event::TaskDelivered(pc::TaskDelivered {
                    client_id: client.to_string(),
                    flow_id: flow.to_string(),
                });
                self.replicate(ev, None).await;
                return;
            }
            NodeRole::Master(m) => {
                if !m.tasks.handle_acked(client, flow) {
                    return; // A duplicate acknowledgement (tasks are resent until acknowledged).
                }
                self.drain_tasks(BTreeMap::new()).await;
            }
        }
        let k = paths::flow_record(client, flow);
        if let Ok(Some(mut f)) = load_json::<FlowJson>(&self.datastore, &k).await
            && f.state == FlowRecordState::Queued
        {
            f.state = FlowRecordState::Running;
            let _ = save_json(&self.datastore, &k, &f).await;
        }
    }

    /// Performs the task book's actions (master): writes each new task's record together with
    /// what goes with it (`groups`, by the creation's token) — up to [`LOAD_CONCURRENCY`] groups at
    /// once, so one journal sync covers many; sends tasks toward their clients; deletes the records
    /// of acknowledged ones. Returns how each creation ended, with the datastore's error if its
    /// write failed.
    async fn drain_tasks(
        &mut self,
        mut groups: BTreeMap<Token, Vec<(String, Bytes)>>,
    ) -> BTreeMap<Token, (Outcome, Option<String>)> {
        let mut created = BTreeMap::new();
        let mut why: BTreeMap<Token, String> = BTreeMap::new();
        loop {
            let actions: Vec<_> = match &mut self.role {
                NodeRole::Master(m) => std::iter::from_fn(|| m.tasks.poll_action()).collect(),
                NodeRole::Minion(_) => return created,
            };
            if actions.is_empty() {
                return created;
            }
            let (mut writes, mut deletes) = (Vec::new(), Vec::new());
            for a in actions {
                match a {
                    TaskAction::Write {
                        token,
                        client,
                        flow,
                        task,
                    } => {
                        let mut g = groups.remove(&token).unwrap_or_default();
                        g.push((task_key(&client, &flow), Bytes::from(task.encode_to_vec())));
                        writes.push((token, g));
                    }
                    TaskAction::Created {
                        token,
                        client,
                        flow,
                        outcome,
                        context,
                    } => {
                        if outcome == Outcome::Refused
                            && let TaskOrigin::Hunt(h) = &context
                        {
                            // Not a participant without its task: undone, offered again later.
                            tracing::warn!(hunt = %h, client = %client, flow = %flow, "cannot record a hunt participant yet; offering it again later");
                            self.hunts.handle_schedule_failed(self.now(), h, &client);
                        }
                        created.insert(token, (outcome, why.remove(&token)));
                    }
                    TaskAction::Deliver { client, task } => self.send_task(&client, task),
                    TaskAction::Delete { client, flow } => deletes.push((client, flow)),
                }
            }
            let (tokens, writes): (Vec<Token>, Vec<_>) = writes.into_iter().unzip();
            let results = write_groups(&self.datastore, writes).await;
            let mut outcomes = Vec::with_capacity(tokens.len());
            for (token, r) in tokens.into_iter().zip(results) {
                if let Err(e) = &r {
                    why.insert(token, e.to_string());
                }
                outcomes.push((token, self.write_outcome("a task's record", r)));
            }
            for (client, flow) in deletes {
                let r = self.datastore.delete(&task_key(&client, &flow)).await;
                let outcome =
                    self.write_outcome("a delivered task's record (deleting)", r.map(|_| ()));
                if let NodeRole::Master(m) = &mut self.role {
                    m.tasks.handle_deleted(&client, &flow, outcome);
                }
            }
            if let NodeRole::Master(m) = &mut self.role {
                for (token, outcome) in outcomes {
                    m.tasks.handle_written(token, outcome);
                }
            }
        }
    }

    /// How a metadata write ended (logged if it failed).
    fn write_outcome(&self, what: &str, r: Result<(), WriteError>) -> Outcome {
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => {
                tracing::warn!(error = %e, outcome = ?e.outcome, "cannot write {what} yet");
                e.outcome
            }
        }
    }

    /// Persists a client record (master) and tells the minions to drop their cached copy.
    async fn persist_client(
        &mut self,
        rec: &talon_core::registry::ClientRecord,
    ) -> Result<(), Status> {
        let key = paths::client_record(&rec.id);
        save_json(&self.datastore, &key, &ClientJson::from_record(rec)).await?;
        self.broadcast(broadcast::Kind::DatastoreChanged(pc::DatastoreChanged {
            key,
            version: 0,
        }));
        Ok(())
    }

    /// Performs the registry's actions (master): persists changed records; a client whose labels
    /// changed is offered the running hunts (a new label may put it in one), once its record is
    /// durable and if it is connected.
    async fn persist_registry(&mut self) -> Result<(), Status> {
        let mut relabelled = Vec::new();
        while let Some(a) = self.registry.poll_action() {
            match a {
                RegistryAction::Persist(rec) => self.persist_client(&rec).await?,
                RegistryAction::LabelsChanged(id) => relabelled.push(id),
            }
        }
        for id in relabelled {
            if self.registry.get(&id).is_some_and(|c| c.connected) {
                self.offer_hunts(self.now(), &id).await;
            }
        }
        Ok(())
    }

    /// Sends one message to a minion; a full or closed queue drops its stream (it resynchronises).
    fn send_to_minion(&mut self, node: &str, kind: broadcast::Kind) {
        let NodeRole::Master(m) = &mut self.role else {
            return;
        };
        let Some(c) = m.minions.get(node) else {
            return;
        };
        let msg = pc::MasterMessage {
            kind: Some(master_message::Kind::Broadcast(pc::Broadcast {
                seq: 0,
                kind: Some(kind),
            })),
        };
        if c.tx.try_send(Ok(msg)).is_err() {
            tracing::warn!(minion = %node, "minion's queue is full or closed; dropping its stream (it resynchronises on reconnect)");
            m.minions.remove(node);
        }
    }

    fn broadcast(&mut self, kind: broadcast::Kind) {
        let nodes: Vec<String> = match &self.role {
            NodeRole::Master(m) => m.minions.keys().cloned().collect(),
            NodeRole::Minion(_) => return,
        };
        for n in nodes {
            self.send_to_minion(&n, kind.clone());
        }
    }

    /// Records a new task (master) together with its flow record, atomically, and sends it toward
    /// its client wherever that is connected. It stays pending until the client acknowledges it,
    /// and is sent again whenever the client (or its minion) reconnects.
    async fn deliver(
        &mut self,
        client: &ClientId,
        flow: &FlowId,
        task: comms::Task,
        record: &FlowJson,
    ) -> Result<(), Status> {
        // Durable before it can be delivered: a master restart still delivers it. The flow record
        // goes with it, so its results always have a record and a record never waits for a task
        // that was not written.
        let group = vec![(paths::flow_record(client, flow), json_bytes(record)?)];
        let NodeRole::Master(m) = &mut self.role else {
            return Err(Status::internal("tasks are created on the master"));
        };
        let token = m
            .tasks
            .create(client.clone(), flow.clone(), task, TaskOrigin::Collect)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let mut created = self.drain_tasks([(token, group)].into()).await;
        let (outcome, why) = created.remove(&token).unwrap_or((Outcome::Unknown, None));
        let why = why.unwrap_or_default();
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Refused => Err(Status::unavailable(format!(
                "datastore: {why}; the collection was not scheduled, try again"
            ))),
            Outcome::Unknown => Err(Status::unavailable(format!(
                "datastore: {why}; the master stopped while scheduling the collection, which \
                 may have happened (see the client's flows once the master is back)"
            ))),
        }
    }

    fn send_task(&mut self, client: &ClientId, task: comms::Task) {
        if self.conns.contains_key(client) {
            return self.notify_task(client, task);
        }
        let Some(rec) = self.registry.get(client) else {
            return;
        };
        if !rec.connected || rec.node == self.opts.node_name {
            return; // Sent when it connects.
        }
        let node = rec.node.clone();
        self.send_to_minion(
            &node,
            broadcast::Kind::TaskQueued(pc::TaskQueued {
                client_id: client.to_string(),
                task: Some(task),
            }),
        );
    }

    /// Sends a client's pending tasks toward it (it acknowledges duplicates and runs each once).
    fn send_pending(&mut self, client: &ClientId) {
        let tasks: Vec<comms::Task> = match &self.role {
            NodeRole::Master(m) => m.tasks.pending(client).map(|(_, t)| t.clone()).collect(),
            NodeRole::Minion(_) => return,
        };
        for t in tasks {
            self.send_task(client, t);
        }
    }

    fn minion_up(
        &mut self,
        node: String,
        tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
    ) -> Result<u64, Status> {
        let NodeRole::Master(m) = &mut self.role else {
            return Err(Status::failed_precondition("this node is not the master"));
        };
        let conn = m.next_minion_conn;
        m.next_minion_conn += 1;
        m.minions.insert(node.clone(), MinionConn { conn, tx });
        tracing::info!(minion = %node, cursor = ?m.inbox.cursor(&node), "minion's replication stream is up");
        // Tasks that may have been lost with the previous stream go again to its clients.
        let clients: Vec<ClientId> = m
            .tasks
            .clients()
            .filter(|c| {
                self.registry
                    .get(c)
                    .is_some_and(|r| r.connected && r.node == node)
            })
            .cloned()
            .collect();
        for c in clients {
            self.send_pending(&c);
        }
        Ok(conn)
    }

    /// Applies a batch of a minion's events in order, persists its cursor, then acknowledges.
    async fn minion_events(&mut self, now: Timestamp, node: String, conn: u64, batch: MinionBatch) {
        let MinionBatch {
            epoch,
            events,
            sent_unix_ms,
        } = batch;
        // How far the minion's clock is behind ours (negative: ahead), measured on this batch (it
        // includes the batch's transit and queueing: milliseconds, against machines' clocks that
        // may differ by hours). Times the minion reports are moved onto our clock with it.
        let behind_ms = if sent_unix_ms == 0 {
            0
        } else {
            i128::from(now.as_ms()) - i128::from(sent_unix_ms)
        };
        let NodeRole::Master(m) = &mut self.role else {
            return;
        };
        if m.minions.get(&node).is_none_or(|c| c.conn != conn) {
            return; // A stream that was replaced; the minion resends on the new one.
        }
        // The flow records this batch's events read: fetched together below, not one 40–60 ms
        // volume read after another (the master's cache is cold after a restart).
        let warm: BTreeSet<String> = events
            .iter()
            .filter_map(|(_, e)| {
                let (c, f) = match e {
                    Ok(Event::TaskDelivered(t)) => (&t.client_id, &t.flow_id),
                    Ok(Event::FlowCompleted(f)) => (&f.client_id, &f.flow_id),
                    _ => return None,
                };
                Some(paths::flow_record(
                    &ClientId::parse(c).ok()?,
                    &FlowId::parse(f).ok()?,
                ))
            })
            .collect();
        if let Err(e) = m.inbox.handle_batch(now, &node, epoch, events) {
            tracing::warn!(minion = %node, error = %e, "refused a replication batch");
            let expected = m.inbox.cursor(&node).map_or(1, |c| c.hwm + 1);
            let current_epoch = match e {
                talon_core::replication::InboxError::StaleEpoch { current, .. } => current,
                _ => 0,
            };
            if let Some(c) = m.minions.get(&node) {
                let _ = c.tx.try_send(Ok(pc::MasterMessage {
                    kind: Some(master_message::Kind::Error(pc::ReplError {
                        message: e.to_string(),
                        expected_seq: expected,
                        current_epoch,
                    })),
                }));
            }
            return;
        }
        if warm.len() > 1
            && let Err(e) = get_many(&self.datastore, warm.into_iter().collect()).await
        {
            tracing::warn!(minion = %node, error = %e, "prefetching flow records failed");
        }
        loop {
            let NodeRole::Master(m) = &mut self.role else {
                return;
            };
            let Some(a) = m.inbox.poll_action() else {
                break;
            };
            match a {
                InboxAction::Apply {
                    node: n,
                    cursor,
                    event,
                } => {
                    let outcome = if self.apply_event(&n, event, behind_ms).await {
                        Outcome::Done
                    } else {
                        // Not applied (busy, or a read failed), or in part: it stays
                        // unacknowledged, and the minion resends it and what follows.
                        tracing::warn!(minion = %n, seq = cursor.hwm, "a replicated event could not be applied yet; the minion sends it again");
                        Outcome::Unknown
                    };
                    if let NodeRole::Master(m) = &mut self.role {
                        m.inbox.handle_applied(&n, cursor, outcome);
                    }
                }
                InboxAction::Persist { node: n, cursor } => {
                    // The effects it covers are journalled (each write awaited). A crash before
                    // this write re-applies them: effects are idempotent.
                    let j = CursorJson {
                        node: n.clone(),
                        epoch: cursor.epoch,
                        hwm: cursor.hwm,
                    };
                    let outcome = match save_json(&self.datastore, &cursor_key(&n), &j).await {
                        Ok(()) => Outcome::Done,
                        Err(e) => {
                            tracing::error!(minion = %n, error = %e, "cannot persist a replication cursor; not acknowledging");
                            Outcome::Unknown
                        }
                    };
                    if let NodeRole::Master(m) = &mut self.role {
                        m.inbox.handle_persisted(&n, cursor, outcome);
                    }
                }
                InboxAction::Ack {
                    node: n,
                    epoch,
                    upto,
                } => {
                    // The inbox acknowledges only what its durable cursor covers.
                    if let NodeRole::Master(m) = &mut self.role
                        && let Some(c) = m.minions.get(&n)
                    {
                        let ack = pc::MasterMessage {
                            kind: Some(master_message::Kind::Ack(pc::ReplAck {
                                epoch,
                                upto_seq: upto,
                            })),
                        };
                        if c.tx.try_send(Ok(ack)).is_err() {
                            m.minions.remove(&n);
                        }
                    }
                }
            }
        }
    }

    /// One replicated event's effects on the master. Each is idempotent (a crash between the effects
    /// and the cursor re-applies it). False if they could not be made durable now (the datastore
    /// refused as busy, a read failed): the event must be applied again later. The minion's clock
    /// is `behind_ms` behind ours.
    async fn apply_event(
        &mut self,
        node: &str,
        event: Result<Event, String>,
        behind_ms: i128,
    ) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(reason) => {
                // Skipped so that the minion's later events are not stuck behind it.
                tracing::error!(minion = %node, %reason, "skipping a malformed replicated event");
                return true;
            }
        };
        let now = self.now();
        let client_of = |id: &str| -> Option<ClientId> {
            ClientId::parse(id)
                .inspect_err(|e| tracing::warn!(minion = %node, error = %e, "event names a malformed client id"))
                .ok()
        };
        match event {
            Event::ClientSeen(cs) => {
                let Some(id) = client_of(&cs.client_id) else {
                    return true;
                };
                let info = cs.info.unwrap_or_default();
                let sighting = Sighting {
                    id: id.clone(),
                    public_key: cs.public_key.to_vec(),
                    hostname: info.hostname,
                    fqdn: info.fqdn,
                    os: info.os,
                    ips: info.ips,
                    last_ip: cs.last_ip,
                    node: node.to_owned(),
                    // On our clock: sightings from different machines are compared by it.
                    connected_at: Timestamp(
                        u64::try_from(i128::from(cs.connected_unix_ms) + behind_ms).unwrap_or(0),
                    ),
                };
                if let Err(e) = self.registry.handle_seen_admitted(now, sighting) {
                    tracing::warn!(minion = %node, client = %id, error = %e, "refused a client seen on a minion");
                    return true;
                }
                self.keys
                    .insert(id.clone(), talon_core::ids::key_fingerprint(&cs.public_key));
                if let Err(e) = self.persist_registry().await {
                    tracing::error!(client = %id, error = %e, "cannot record a client");
                }
                self.send_pending(&id);
                self.offer_hunts(now, &id).await;
            }
            Event::ClientGone(g) => {
                if let Some(id) = client_of(&g.client_id) {
                    self.registry.set_disconnected(now, &id, node);
                }
            }
            Event::TaskDelivered(t) => {
                if let (Some(id), Ok(flow)) = (client_of(&t.client_id), FlowId::parse(&t.flow_id)) {
                    self.task_delivered(&id, &flow).await;
                }
            }
            Event::FlowCompleted(f) => {
                let (Some(client), Ok(flow)) = (client_of(&f.client_id), FlowId::parse(&f.flow_id))
                else {
                    return true;
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
                        // A minion is one of ours: this is a bug, not an attack. The flow's
                        // results would miss this run's messages.
                        Err(e) => {
                            tracing::error!(client = %client, flow = %flow, error = %e, "a replicated completion names a bad run")
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
                // The replication cursor must not move past an event whose effects are not durable:
                // the caller hands it back to the inbox, and the minion sends it again.
                return self.flow_completed(o, runs).await;
            }
            Event::NodeStarted(_) => {
                let n = self.registry.disconnect_node(now, node);
                tracing::info!(minion = %node, clients = n, "minion restarted: its clients are disconnected until they reconnect");
            }
        }
        true
    }

    /// What the replication link reports (minion).
    async fn link_event(&mut self, e: LinkEvent) {
        match e {
            LinkEvent::Connected => {
                if let Meta::Remote(r) = &self.datastore {
                    r.clear(); // Broadcasts may have been missed while the stream was down.
                }
                // The master may have restarted and lost who is connected here: tell it again.
                let seen: Vec<pc::ClientSeen> =
                    self.conns.values().filter_map(|c| c.seen.clone()).collect();
                tracing::info!(
                    clients = seen.len(),
                    "re-announcing connected clients to the master"
                );
                for cs in seen {
                    self.replicate(Event::ClientSeen(cs), None).await;
                }
            }
            LinkEvent::Disconnected => {}
            LinkEvent::BroadcastsLost => {
                if let Meta::Remote(r) = &self.datastore {
                    r.clear(); // An invalidation may have been among them.
                }
            }
            LinkEvent::Broadcast(b) => match b.kind {
                Some(broadcast::Kind::TaskQueued(t)) => {
                    if let (Ok(id), Some(task)) = (ClientId::parse(&t.client_id), t.task) {
                        // Not connected here any more: the master sends it again where it connects.
                        self.notify_task(&id, task);
                    }
                }
                Some(broadcast::Kind::DatastoreChanged(d)) => {
                    if let Meta::Remote(r) = &self.datastore {
                        r.invalidate(&d.key);
                    }
                }
                Some(broadcast::Kind::HuntStarted(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt started on the master");
                }
                Some(broadcast::Kind::HuntStopped(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt stopped on the master");
                }
                Some(broadcast::Kind::LabelsChanged(_)) | None => {}
            },
        }
    }

    /// Offers a connected client to every running hunt.
    /// Offers a hunt to a client if it is connected (else it is offered every running hunt when it
    /// connects): at the hunt's creation, and when a failed schedule is retried.
    fn offer_to_connected(&mut self, now: Timestamp, hunt: &HuntId, id: &ClientId) {
        let Some(rec) = self.registry.get(id).filter(|r| r.connected) else {
            return;
        };
        let (os, labels) = (rec.os.clone(), rec.labels.clone());
        let facts = ClientFacts {
            id,
            os: &os,
            labels: &labels,
        };
        self.hunts.offer_to(now, hunt, facts);
    }

    async fn offer_hunts(&mut self, now: Timestamp, id: &ClientId) {
        let Some(rec) = self.registry.get(id) else {
            return;
        };
        let (os, labels) = (rec.os.clone(), rec.labels.clone());
        self.hunts.offer(
            now,
            ClientFacts {
                id,
                os: &os,
                labels: &labels,
            },
        );
        // A failed write is logged and fail-stops the node (`Meta::set`).
        let _ = self.drain_hunts().await;
    }

    async fn create_hunt(
        &mut self,
        now: Timestamp,
        req: api::CreateHuntRequest,
    ) -> Result<api::HuntSummary, Status> {
        let given: BTreeMap<String, String> = req.params.into_iter().collect();
        let (spec, params) = talon_core::artifacts::validate(&req.artifact, &given)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let labels = |ls: Vec<String>| -> Result<std::collections::BTreeSet<String>, Status> {
            ls.iter()
                .map(|l| {
                    talon_core::registry::normalize_label(l)
                        .map_err(|e| Status::invalid_argument(e.to_string()))
                })
                .collect()
        };
        let os = match req.os.to_ascii_lowercase().as_str() {
            "" => None,
            o @ ("linux" | "windows" | "darwin") => Some(o.to_owned()),
            o => {
                return Err(Status::invalid_argument(format!(
                    "--os {o:?}: use linux, windows or darwin"
                )));
            }
        };
        let ttl_s = if req.expires_in_s == 0 {
            HUNT_EXPIRES_DEFAULT_S
        } else {
            req.expires_in_s
        };
        let hunt_spec = HuntSpec {
            artifact: spec.name.to_owned(),
            params,
            include_labels: labels(req.include_labels)?,
            exclude_labels: labels(req.exclude_labels)?,
            os,
            expires: now.plus_ms(ttl_s.saturating_mul(1000)),
            client_limit: (req.client_limit > 0).then_some(req.client_limit),
            description: req.description,
        };
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        let id = HuntId::from_u64(u64::from_le_bytes(n));
        self.hunts
            .create(now, id.clone(), hunt_spec)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Acknowledged only once its record is durable (invariant 5 (docs/architecture.md)).
        self.drain_hunts().await?;
        tracing::info!(hunt = %id, artifact = spec.name, "hunt created");
        self.broadcast(broadcast::Kind::HuntStarted(pc::HuntStarted {
            hunt_id: id.to_string(),
        }));
        // Every client connected to any node is offered the hunt now; later ones when they connect.
        let connected: Vec<ClientId> = self.registry.connected().map(|r| r.id.clone()).collect();
        for c in connected {
            self.offer_to_connected(now, &id, &c);
        }
        self.drain_hunts().await?;
        let h = self
            .hunts
            .get(&id)
            .ok_or_else(|| Status::internal("the new hunt vanished"))?;
        Ok(hunt_summary(h))
    }

    /// Records and tasks newly scheduled hunt participants. For each client one atomic write: its
    /// participant record, its flow record and its pending task — all of them or none, whatever
    /// crash follows (a restart that finds the participant finds its task; its frontend finds the
    /// flow tasked) — durable before the task is sent. Up to [`LOAD_CONCURRENCY`] clients are
    /// written at once, so one journal sync covers many of them. A client whose write is refused,
    /// or that already has `max_queued_tasks_per_client` tasks waiting, is no participant: the hunt
    /// manager undoes it and offers it again later (docs/architecture.md, "Invariants").
    async fn schedule(&mut self, batch: Vec<(HuntId, ClientId, FlowId)>) -> Result<(), Status> {
        let now = self.now();
        let mut groups = BTreeMap::new();
        for (hunt, client, flow) in batch {
            let Some(h) = self.hunts.get(&hunt) else {
                continue;
            };
            let spec = h.record().spec.clone();
            let record = FlowJson {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                artifact: spec.artifact.clone(),
                params: spec.params.clone(),
                hunt_id: Some(hunt.to_string()),
                state: FlowRecordState::Queued,
                rows: 0,
                uploaded_bytes: 0,
                error: String::new(),
                created_ms: now.as_ms(),
                finished_ms: 0,
                uploads: vec![],
                runs: vec![],
            };
            let task = comms::Task {
                flow_id: flow.to_string(),
                artifact: spec.artifact,
                params: spec.params.into_iter().collect(),
                hunt_id: hunt.to_string(),
                max_rows: 0,
                max_upload_bytes: self.opts.codec.upload_bytes_max,
                timeout_s: 600,
            };
            let group = vec![
                (
                    paths::hunt_participant(&hunt, &client),
                    json_bytes(&ParticipantJson::Scheduled)?,
                ),
                (paths::flow_record(&client, &flow), json_bytes(&record)?),
            ];
            let NodeRole::Master(m) = &mut self.role else {
                return Err(Status::internal("hunts are scheduled on the master"));
            };
            match m
                .tasks
                .create(client.clone(), flow, task, TaskOrigin::Hunt(hunt.clone()))
            {
                Ok(token) => {
                    groups.insert(token, group);
                }
                Err(e) => {
                    // Not a participant without its task: undone, and offered again later.
                    tracing::warn!(client = %client, hunt = %hunt, error = %e, "hunt task not queued yet; offering it again later");
                    self.hunts.handle_schedule_failed(now, &hunt, &client);
                }
            }
        }
        // Refused groups are undone in the hunt manager as their `Created` comes back.
        self.drain_tasks(groups).await;
        Ok(())
    }

    /// Performs the hunt manager's actions: a participant is journalled before its task is delivered.
    /// `Err` carries the first write that failed (the node fail-stops on it, see `Meta::set`): what
    /// the caller was about to acknowledge is not durable.
    async fn drain_hunts(&mut self) -> Result<(), Status> {
        let mut failed = None;
        // Consecutive Schedule actions are written together (each client's records in order, many
        // clients at once, so the journal's group commit covers them); anything else waits for them.
        let mut batch: Vec<(HuntId, ClientId, FlowId)> = Vec::new();
        loop {
            let a = self.hunts.poll_action();
            if !matches!(a, Some(HuntAction::Schedule { .. }))
                && !batch.is_empty()
                && let Err(e) = self.schedule(std::mem::take(&mut batch)).await
            {
                failed.get_or_insert(e);
            }
            let Some(a) = a else { break };
            match a {
                HuntAction::Schedule { hunt, client, flow } => {
                    batch.push((hunt, client, flow));
                    if batch.len() >= SCHEDULE_BATCH_MAX {
                        if let Err(e) = self.schedule(std::mem::take(&mut batch)).await {
                            failed.get_or_insert(e);
                        }
                        // A hunt over 100,000 clients is 100 batches, and the node's other work
                        // (pings, the API, other streams) gets a turn between them: scheduling
                        // all at once, a master logged nothing for 43 s and its API connection
                        // was dropped by the keep-alive.
                        tokio::task::yield_now().await;
                    }
                }
                HuntAction::Participant {
                    hunt,
                    client,
                    participation,
                } => {
                    let key = paths::hunt_participant(&hunt, &client);
                    if let Err(e) =
                        save_json(&self.datastore, &key, &ParticipantJson::from(participation))
                            .await
                    {
                        // Not counted until it is recorded: the completion fails with it, and the
                        // client's (or minion's) resend brings the outcome again.
                        tracing::warn!(hunt = %hunt, client = %client, error = %e, "cannot record a hunt outcome yet");
                        self.hunts
                            .handle_outcome_failed(&hunt, &client, participation);
                        failed.get_or_insert(e);
                    }
                }
                HuntAction::Offer { hunt, client } => {
                    self.offer_to_connected(self.now(), &hunt, &client)
                }
                HuntAction::Record(r) => {
                    if let Err(e) = save_json(
                        &self.datastore,
                        &paths::hunt_record(&r.id),
                        &HuntJson::from_record(&r),
                    )
                    .await
                    {
                        tracing::error!(hunt = %r.id, error = %e, "cannot record a hunt");
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn connected(
        &mut self,
        now: Timestamp,
        peer: Peer,
        hello: codec::Hello,
        tx: ClientTx,
        conn: u64,
    ) -> Result<(), Status> {
        let id = peer.client_id.clone();
        if self.keys.check(&id, &peer.public_key) == KeyCheck::Mismatch {
            return Err(Status::permission_denied(format!(
                "client {id} presented a key it did not enrol with"
            )));
        }
        let master = matches!(self.role, NodeRole::Master(_));
        let seen = if master {
            let sighting = Sighting {
                id: id.clone(),
                public_key: peer.public_key.clone(),
                hostname: hello.info.hostname.clone(),
                fqdn: hello.info.fqdn.clone(),
                os: hello.info.os.clone(),
                ips: hello.info.ips.clone(),
                last_ip: peer.addr.ip().to_string(),
                node: self.opts.node_name.clone(),
                connected_at: now,
            };
            let enrolment = self.registry.handle_seen(now, sighting).map_err(|e| {
                use talon_core::registry::RegistryError as E;
                match e {
                    // The agent backs off and tries again.
                    E::EnrolmentRate { .. } => Status::unavailable(e.to_string()),
                    E::Full { .. } => Status::resource_exhausted(e.to_string()),
                    _ => Status::permission_denied(e.to_string()),
                }
            })?;
            tracing::info!(client = %id, host = %crate::text::Printable(&hello.info.hostname), addr = %peer.addr, ?enrolment, "client connected");
            None
        } else {
            tracing::info!(client = %id, host = %crate::text::Printable(&hello.info.hostname), addr = %peer.addr, "client connected");
            let i = &hello.info;
            Some(pc::ClientSeen {
                client_id: id.to_string(),
                public_key: peer.public_key.clone().into(),
                info: Some(comms::ClientInfo {
                    hostname: i.hostname.clone(),
                    fqdn: i.fqdn.clone(),
                    os: i.os.clone(),
                    kernel: i.kernel.clone(),
                    arch: i.arch.clone(),
                    ips: i.ips.clone(),
                    ..Default::default()
                }),
                last_ip: peer.addr.ip().to_string(),
                connected_unix_ms: now.as_ms(),
                running_flows: hello.running_flows.iter().map(|f| f.to_string()).collect(),
            })
        };
        self.keys.insert(
            id.clone(),
            talon_core::ids::key_fingerprint(&peer.public_key),
        );
        if master {
            self.persist_registry().await?;
        }
        if let Some(old) = self.conns.insert(
            id.clone(),
            Conn {
                id: conn,
                tx: tx.clone(),
                seen: seen.clone(),
            },
        ) {
            drop(old); // A reconnect replaces the old stream.
        }
        let welcome = comms::Welcome {
            client_id: id.to_string(),
            node: self.opts.node_name.clone(),
            max_message_bytes: self.opts.codec.message_bytes_max as u32,
            max_rows_per_batch: self.opts.codec.rows_per_batch_max as u32,
            max_in_flight: self.opts.flows.stores_in_flight_max as u32,
        };
        self.push(&id, server_message::Kind::Welcome(welcome));
        match seen {
            // The master decides what this client should run: pending tasks and hunts follow.
            Some(cs) => self.replicate(Event::ClientSeen(cs), None).await,
            None => {
                self.send_pending(&id);
                self.offer_hunts(now, &id).await;
            }
        }
        Ok(())
    }

    fn push(&self, client: &ClientId, kind: server_message::Kind) -> bool {
        match self.conns.get(client) {
            Some(c) => {
                c.tx.try_send(Ok(Box::new(comms::ServerMessage { kind: Some(kind) })))
                    .is_ok()
            }
            None => false,
        }
    }

    async fn label(
        &mut self,
        client: &str,
        label: &str,
        remove: bool,
    ) -> Result<api::ClientSummary, Status> {
        let id = ClientId::parse(client).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = self
            .registry
            .set_label(&id, label, remove)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let out = summary(rec);
        self.persist_registry().await?;
        Ok(out)
    }

    async fn collect(
        &mut self,
        now: Timestamp,
        client: &str,
        artifact: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<api::FlowSummary, Status> {
        let id = ClientId::parse(client).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.registry.get(&id).is_none() {
            return Err(Status::not_found(format!(
                "no client {id} (search with `talon clients search all`)"
            )));
        }
        let (spec, params) = talon_core::artifacts::validate(artifact, params)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        let flow = FlowId::from_u64(u64::from_le_bytes(n));
        let record = FlowJson {
            client_id: id.to_string(),
            flow_id: flow.to_string(),
            artifact: spec.name.to_owned(),
            params: params.clone(),
            hunt_id: None,
            state: FlowRecordState::Queued,
            rows: 0,
            uploaded_bytes: 0,
            error: String::new(),
            created_ms: now.as_ms(),
            finished_ms: 0,
            uploads: vec![],
            runs: vec![],
        };
        let task = comms::Task {
            flow_id: flow.to_string(),
            artifact: spec.name.to_owned(),
            params: params.into_iter().collect(),
            hunt_id: String::new(),
            max_rows: 0,
            max_upload_bytes: self.opts.codec.upload_bytes_max,
            timeout_s: 600,
        };
        self.deliver(&id, &flow, task, &record).await?;
        tracing::info!(client = %id, flow = %flow, artifact = spec.name, "collection scheduled");
        Ok(flow_summary(&record))
    }

    /// Stores message `seq` of a flow in the filestore in the background, then reports `Stored`.
    fn store_flow_message(&self, key: FlowKey, seq: u64, raw: Bytes) {
        let (fs, tx) = (self.filestore.clone(), self.self_tx.clone());
        tokio::spawn(async move {
            let path = paths::flow_message(&key.client, &key.flow, seq);
            let ok = match fs.store(&path, raw).await {
                Ok(()) => true,
                Err(e) => {
                    // Not acknowledged: the client resends it.
                    tracing::warn!(client = %key.client, flow = %key.flow, seq, error = %e, "cannot store a flow message");
                    false
                }
            };
            let _ = tx.send(Msg::Stored { key, seq, ok }).await;
        });
    }

    /// Performs the flow tracker's actions.
    async fn drain_flows(&mut self) {
        while let Some(a) = self.flows.poll_action() {
            match a {
                FlowAction::Store { key, seq } => {
                    let Some(raw) = self.raw.remove(&(key.clone(), seq)) else {
                        // The bytes are gone (cannot happen: stored right after handle_message); fail the store.
                        self.flows.handle_stored(self.now(), &key, seq, false);
                        continue;
                    };
                    self.store_flow_message(key, seq, raw);
                }
                FlowAction::StoreRefusal { key, seq, reason } => {
                    tracing::warn!(client = %key.client, flow = %key.flow, seq, %reason, "refused a flow message; the flow fails");
                    // (No bytes were kept for it: a refused message is never stored.)
                    let refusal = refusal_record(&key.flow, seq, self.now(), &reason);
                    self.store_flow_message(key, seq, refusal);
                }
                FlowAction::Ack { key, seq } => {
                    let ack = comms::FlowAck {
                        flow_id: key.flow.to_string(),
                        seq,
                        settled: false,
                    };
                    // Acknowledged now (durable in the local buffer); settled once the buffer
                    // has copied it.
                    self.push(&key.client, server_message::Kind::Ack(ack.clone()));
                    if let Some(c) = self.conns.get(&key.client)
                        && !self.settler.offer(c.tx.clone(), ack)
                    {
                        tracing::debug!("settle queue full; the client's resend is settled later");
                    }
                }
                FlowAction::Audit { key } => {
                    let (fs, tx, limits) = (
                        self.filestore.clone(),
                        self.self_tx.clone(),
                        self.opts.codec.clone(),
                    );
                    tokio::spawn(async move {
                        let found = audit(&fs, &key, &limits).await;
                        let _ = tx.send(Msg::Audited { key, found }).await;
                    });
                }
                FlowAction::Completed(o) => {
                    // Reported only once every message is on the shared volume, where the master,
                    // the API and other frontends read.
                    let (fs, tx) = (self.filestore.clone(), self.self_tx.clone());
                    tokio::spawn(async move {
                        let runs = match fs.settled().await {
                            Ok(()) => fs
                                .runs(&o.key.client, &o.key.flow, o.messages)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        let (runs, ok) = match runs {
                            Ok(r) => (r, true),
                            Err(e) => {
                                tracing::error!(client = %o.key.client, flow = %o.key.flow, error = %e, "cannot copy or locate a flow's messages in the filestore");
                                (Vec::new(), false)
                            }
                        };
                        let _ = tx
                            .send(Msg::Settled {
                                outcome: o,
                                runs,
                                ok,
                            })
                            .await;
                    });
                }
            }
        }
    }

    /// A flow completed and its messages are on the shared volume: record it (master) or replicate
    /// its completion (minion); the tracker acknowledges the final status once that is durable.
    async fn completed(&mut self, o: talon_core::flows::FlowOutcome, runs: Vec<RunRef>) {
        match &mut self.role {
            NodeRole::Master(_) => {
                let key = o.key.clone();
                let ok = self.flow_completed(o, runs).await;
                if ok {
                    self.filestore.forget_runs(&key.client, &key.flow);
                }
                self.flows.handle_recorded(&key, ok);
            }
            NodeRole::Minion(_) => {
                tracing::info!(client = %o.key.client, flow = %o.key.flow, rows = o.rows, "flow completed; replicating");
                let (tx, rx) = oneshot::channel();
                let ev = Event::FlowCompleted(pc::FlowCompleted {
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
                });
                self.replicate(ev, Some(tx)).await;
                let (me, key) = (self.self_tx.clone(), o.key);
                tokio::spawn(async move {
                    // Dropped unsent if the link failed before the master applied it.
                    let ok = rx.await.is_ok();
                    let _ = me.send(Msg::CompletionApplied { key, ok }).await;
                });
            }
        }
    }

    /// Records a completed flow (master): its record, its uploads, its hunt's outcome. Idempotent: a
    /// flow may be reported by two nodes after a failover. True once all of it is durable: only then
    /// may the client's final status be acknowledged.
    async fn flow_completed(
        &mut self,
        o: talon_core::flows::FlowOutcome,
        runs: Vec<RunRef>,
    ) -> bool {
        // A completed flow was delivered, whether or not its TaskAck reached us (it may have been lost
        // with a connection): it must not stay pending.
        if let NodeRole::Master(m) = &mut self.role
            && m.tasks.handle_acked(&o.key.client, &o.key.flow)
        {
            self.drain_tasks(BTreeMap::new()).await;
        }
        let k = paths::flow_record(&o.key.client, &o.key.flow);
        match load_json::<FlowJson>(&self.datastore, &k).await {
            Ok(Some(mut f)) => {
                let state = match o.state {
                    FinalState::Completed => FlowRecordState::Completed,
                    FinalState::Error => FlowRecordState::Error,
                };
                let first =
                    f.state != state || f.rows != o.rows || f.uploaded_bytes != o.uploaded_bytes;
                if first {
                    f.state = state;
                    f.rows = o.rows;
                    f.uploaded_bytes = o.uploaded_bytes;
                    f.error = o.error.clone();
                    f.finished_ms = self.now().as_ms();
                    f.runs = runs;
                    // Uploads are reassembled after the completion is recorded (bulk work on the
                    // volume); the marker written with it makes a restart finish the job.
                    let uploads = o.uploads > 0 || o.uploaded_bytes > 0;
                    let Ok(mut record) = json_bytes(&f) else {
                        return false; // A record always serialises.
                    };
                    if record.len() as u64 > self.opts.value_bytes_max {
                        // Runs pile up with the flushes a flow spans: a flow that spans too many
                        // fails (its messages stay in the filestore), the node goes on.
                        let why = format!(
                            "the flow's record would be {} bytes with its {} runs, over \
                             Datastore.max_value_size ({}); its results are not listed",
                            record.len(),
                            f.runs.len(),
                            self.opts.value_bytes_max
                        );
                        tracing::warn!(client = %o.key.client, flow = %o.key.flow, "{why}");
                        f.runs.clear();
                        f.state = FlowRecordState::Error;
                        f.error = why;
                        let Ok(r) = json_bytes(&f) else {
                            return false;
                        };
                        record = r;
                    }
                    let mut writes = vec![(k.clone(), Some(record))];
                    if uploads {
                        let marker = paths::uploads_pending(&o.key.client, &o.key.flow);
                        writes.push((marker, Some(Bytes::from_static(b"{}"))));
                    }
                    if let Err(e) = self.datastore.write_all(writes).await {
                        tracing::error!(flow = %o.key.flow, error = %e, "cannot record flow completion");
                        return false;
                    }
                    tracing::info!(client = %o.key.client, flow = %o.key.flow, rows = o.rows, state = f.state.as_str(), "flow completed");
                    if uploads {
                        self.uploads.start(
                            self.filestore.volume().clone(),
                            self.datastore.clone(),
                            o.key.clone(),
                        );
                    }
                }
                if let Some(h) = f.hunt_id.as_deref().and_then(|h| HuntId::parse(h).ok()) {
                    let now = self.now();
                    self.hunts.handle_outcome(
                        now,
                        &h,
                        &o.key.client,
                        o.state,
                        o.rows,
                        o.uploaded_bytes,
                    );
                    if self.drain_hunts().await.is_err() {
                        return false;
                    }
                }
                true
            }
            Ok(None) => {
                // Nothing to record it in (not a flow this master created): acknowledged, or the
                // client would resend forever.
                tracing::warn!(client = %o.key.client, flow = %o.key.flow, "completed flow has no record");
                true
            }
            Err(e) => {
                tracing::error!(flow = %o.key.flow, error = %e, "cannot read flow record");
                false
            }
        }
    }
}

/// What the filestore holds in place of a flow message the server refused: a log line at error
/// level saying why (results and uploads skip it; a person reading the flow's logs sees it).
fn refusal_record(flow: &FlowId, seq: u64, now: Timestamp, reason: &str) -> Bytes {
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

/// Acknowledgements waiting to be sent again as settled, and the task that sends them.
#[derive(Clone)]
struct Settler(mpsc::Sender<(ClientTx, comms::FlowAck)>);

impl Settler {
    /// Starts the task; at most `max` acknowledgements wait for it.
    fn start(fs: Filestore, max: usize) -> Settler {
        let (tx, rx) = mpsc::channel(max);
        tokio::spawn(settle(fs, rx));
        Settler(tx)
    }

    /// Queues `ack` to be sent on `tx` once settled; false if the queue is full (dropped: the client
    /// resends the message, and its re-acknowledgement is offered again).
    fn offer(&self, tx: ClientTx, ack: comms::FlowAck) -> bool {
        self.0.try_send((tx, ack)).is_ok()
    }
}

/// Sends acknowledgements again as settled, a batch at a time: everything queued is waited for with
/// one `Filestore::settled` (each acknowledgement was queued after its message was stored, so the
/// wait covers it). One wait at a time per node, whatever the rate of acknowledgements.
async fn settle(fs: Filestore, mut rx: mpsc::Receiver<(ClientTx, comms::FlowAck)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, SETTLE_BATCH_MAX).await > 0 {
        if fs.settled().await.is_err() {
            return; // The buffer stopped: the node exits (fail-stop); clients resend.
        }
        for (tx, mut ack) in batch.drain(..) {
            ack.settled = true;
            let m = comms::ServerMessage {
                kind: Some(server_message::Kind::Ack(ack)),
            };
            // A full queue drops it: the client resends the message after 2 s, and it is
            // acknowledged and settled again.
            let _ = tx.try_send(Ok(Box::new(m)));
        }
    }
}

/// Reassembles completed flows' uploads on the volume, a bounded number at a time, each retried
/// until it is recorded (the volume may fail or be cut off for a while).
#[derive(Clone)]
struct Reassembly {
    permits: Arc<tokio::sync::Semaphore>,
    /// A flow record with its uploads listed stays within this (`Datastore.max_value_size`).
    value_bytes_max: u64,
}

/// Uploads reassembled at once (each reads its flow's chunks and writes its files on the volume).
const REASSEMBLY_CONCURRENCY: usize = 64;
/// The longest pause between two attempts at one flow's uploads.
const REASSEMBLY_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl Reassembly {
    fn new(value_bytes_max: u64) -> Reassembly {
        Reassembly {
            permits: Arc::new(tokio::sync::Semaphore::new(REASSEMBLY_CONCURRENCY)),
            value_bytes_max,
        }
    }

    /// Reassembles `key`'s uploads in the background: retried until the flow record lists them and
    /// its [`paths::uploads_pending`] marker is gone (or the process stops; then the next start
    /// takes it up again from the marker).
    fn start(&self, fs: SharedVolume, ds: Meta, key: FlowKey) {
        let (permits, max) = (self.permits.clone(), self.value_bytes_max);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_secs(1);
            loop {
                let r = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    record_uploads(&fs, &ds, &key, max).await
                };
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(client = %key.client, flow = %key.flow, error = %e, retry_in_s = pause.as_secs(), "cannot reassemble uploads yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(REASSEMBLY_RETRY_MAX);
                    }
                }
            }
        });
    }
}

/// Rebuilds a completed flow's uploaded files and records them in its flow record, dropping its
/// [`paths::uploads_pending`] marker in the same atomic write. A record that would not fit in
/// `value_bytes_max` lists the uploads that fit, and the flow fails saying how many are unlisted
/// (their files are still in the filestore): a large record is the writer's doing, and stops
/// nothing but its own flow.
async fn record_uploads(
    fs: &SharedVolume,
    ds: &Meta,
    key: &FlowKey,
    value_bytes_max: u64,
) -> Result<(), String> {
    let k = paths::flow_record(&key.client, &key.flow);
    let record = load_json::<FlowJson>(ds, &k).await?;
    let runs = record.as_ref().map(|f| f.runs.clone()).unwrap_or_default();
    let uploads = crate::uploads::assemble(fs, &key.client, &key.flow, &runs)
        .await
        .map_err(|e| format!("reading the flow's chunks: {e}"))?;
    for u in uploads.iter().filter(|u| !u.error.is_empty()) {
        tracing::warn!(client = %key.client, flow = %key.flow, file = %crate::text::Printable(&u.name), error = %crate::text::Printable(&u.error), "upload not stored");
    }
    let marker = paths::uploads_pending(&key.client, &key.flow);
    let mut writes = vec![(marker, None)];
    if let Some(mut f) = record {
        f.uploads = uploads;
        let bytes = json_within(&mut f, value_bytes_max)?;
        writes.push((k, Some(bytes)));
    }
    ds.write_all(writes)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `f` as JSON of at most `max` bytes: if its upload list makes it larger, the list keeps the
/// uploads that fit (half the bound, leaving room for the rest of the record) and the flow is
/// marked failed with the number left out.
fn json_within(f: &mut FlowJson, max: u64) -> Result<Bytes, String> {
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 <= max {
        return Ok(Bytes::from(bytes));
    }
    let total = f.uploads.len();
    let mut room = max / 2;
    let mut kept = 0;
    for u in &f.uploads {
        let len = serde_json::to_vec(u).map_err(|e| e.to_string())?.len() as u64 + 1;
        if len > room {
            break;
        }
        room -= len;
        kept += 1;
    }
    f.uploads.truncate(kept);
    f.state = FlowRecordState::Error;
    let why = format!(
        "{} of {total} uploads are not listed: the flow record would exceed \
         Datastore.max_value_size ({max} bytes)",
        total - kept
    );
    tracing::warn!(client = %f.client_id, flow = %f.flow_id, "{why}");
    f.error = if f.error.is_empty() {
        why
    } else {
        format!("{}; {why}", f.error)
    };
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "the flow record is {} bytes without its uploads, over Datastore.max_value_size ({max})",
            bytes.len()
        ));
    }
    Ok(Bytes::from(bytes))
}

/// Finds and decodes a flow's stored messages, wherever they were written (`None` if the
/// filestore failed).
async fn audit(fs: &Filestore, key: &FlowKey, limits: &CodecLimits) -> Option<Vec<StoredMessage>> {
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

/// Flows whose results [`stream_flows`] reads ahead of the one it is sending: on a network volume
/// each read is a round trip, so reading flows one after another costs a hunt one round trip per
/// message and per flow.
pub const RESULT_FLOWS_AHEAD: usize = 16;

/// Blocks of segment data files one results request keeps (each
/// [`crate::storage::segments::CACHE_BLOCK_BYTES`]): 32 MiB.
pub const RESULT_CACHE_BLOCKS: usize = 32;

/// Pages each flow read ahead may hold.
pub const RESULT_PAGES_AHEAD: usize = 4;

/// Streams the result rows of `flows` from the filestore, one page per stored rows message: flows in
/// the order given, each in sequence order, from the runs its flow record names (a flow not yet
/// complete has none, and shows no rows), through a [`crate::storage::segments::BlockCache`] of
/// [`RESULT_CACHE_BLOCKS`]. Up to [`RESULT_FLOWS_AHEAD`] flows are read at once,
/// each into its own channel of [`RESULT_PAGES_AHEAD`] pages, so memory stays bounded whatever the
/// flows' size; a reader stops when the caller goes away.
fn stream_flows(fs: SharedVolume, ds: Meta, flows: Vec<(ClientId, FlowId)>) -> Pages {
    // The flows' runs lie side by side in a few data files: read them in large shared blocks.
    let fs = SharedVolume::new(crate::storage::segments::BlockCache::new(
        fs,
        RESULT_CACHE_BLOCKS,
    ));
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut flows = flows.into_iter();
        let mut ahead = std::collections::VecDeque::new();
        loop {
            while ahead.len() < RESULT_FLOWS_AHEAD {
                let Some((client, flow)) = flows.next() else {
                    break;
                };
                let (ftx, frx) = mpsc::channel(RESULT_PAGES_AHEAD);
                tokio::spawn(read_flow_pages(fs.clone(), ds.clone(), client, flow, ftx));
                ahead.push_back(frx);
            }
            let Some(mut next) = ahead.pop_front() else {
                return;
            };
            while let Some(page) = next.recv().await {
                let failed = page.is_err();
                // Returning drops the readers' channels: each stops at its next send.
                if tx.send(page).await.is_err() || failed {
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Sends one flow's rows pages into `tx` in sequence order (an error ends it).
async fn read_flow_pages(
    fs: SharedVolume,
    ds: Meta,
    client: ClientId,
    flow: FlowId,
    tx: mpsc::Sender<Result<api::ResultPage, Status>>,
) {
    let unavailable = |e: String| Err(Status::unavailable(format!("filestore: {e}")));
    let runs = match load_json::<FlowJson>(&ds, &paths::flow_record(&client, &flow)).await {
        Ok(Some(f)) if f.state.is_final() => f.runs,
        Ok(_) => return, // Not complete: nothing to show yet.
        Err(e) => {
            let _ = tx.send(unavailable(e)).await;
            return;
        }
    };
    let dir = paths::flow_messages_dir(&client, &flow);
    let mut reader = match MessageReader::new(&fs, &dir, &runs).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(unavailable(e.to_string())).await;
            return;
        }
    };
    loop {
        let msg = match reader.next().await {
            Ok(Some((name, bytes))) => comms::FlowMessage::decode(bytes)
                .map_err(|e| Status::data_loss(format!("{name}: {e}"))),
            Ok(None) => return,
            Err(e) => Err(Status::unavailable(format!("filestore: {e}"))),
        };
        let page = match msg {
            Ok(comms::FlowMessage {
                payload: Some(comms::flow_message::Payload::Rows(r)),
                ..
            }) => Ok(api::ResultPage {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                rows: r.rows,
            }),
            Ok(_) => continue,
            Err(e) => Err(e),
        };
        let failed = page.is_err();
        if tx.send(page).await.is_err() || failed {
            return;
        }
    }
}

/// Whether a client connecting to a minion is enrolled already, as far as the minion can tell.
#[derive(Debug, PartialEq, Eq)]
enum Contact {
    /// Enrolled (or the master cannot be asked now: served, not paced).
    Known,
    /// No enrolment record: a new client.
    First,
}

/// On a minion: compares the client's key with its enrolment record, read through the master's
/// datastore (and the minion's read cache). With the master unreachable the client is served: its id
/// is the hash of the key it proved in the TLS handshake, and the master checks the key again when it
/// applies the replicated `ClientSeen`.
async fn check_enrolled_key(
    r: &crate::cluster::RemoteStore,
    peer: &Peer,
) -> Result<Contact, Status> {
    let key = paths::client_record(&peer.client_id);
    match r.get(&key).await {
        Ok(Some(b)) => {
            let rec: ClientJson =
                serde_json::from_slice(&b).map_err(|e| Status::internal(format!("{key}: {e}")))?;
            let fp = crate::clock::hex(&talon_core::ids::key_fingerprint(&peer.public_key));
            if rec.key_fingerprint != fp {
                return Err(Status::permission_denied(format!(
                    "client {} presented a key it did not enrol with",
                    peer.client_id
                )));
            }
            Ok(Contact::Known)
        }
        Ok(None) => Ok(Contact::First), // The master enrols it.
        Err(e) => {
            tracing::debug!(client = %peer.client_id, error = %e, "cannot check the enrolment record now");
            Ok(Contact::Known)
        }
    }
}

/// The client-facing gRPC service.
#[derive(Clone)]
pub struct CommsService {
    node: Node,
}

impl CommsService {
    /// Serves clients through `node`.
    pub fn new(node: Node) -> CommsService {
        CommsService { node }
    }
}

/// A client's outgoing queue. Boxed messages: tokio's channel allocates its slots in blocks of 32,
/// so each connected client holds a block of 8-byte pointers rather than of 120-byte messages.
type ClientTx = mpsc::Sender<Result<Box<comms::ServerMessage>, Status>>;

/// The client's queue as the stream tonic sends.
pub struct ServerStream(mpsc::Receiver<Result<Box<comms::ServerMessage>, Status>>);

impl tokio_stream::Stream for ServerStream {
    type Item = Result<comms::ServerMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|m| m.map(|r| r.map(|b| *b)))
    }
}

#[tonic::async_trait]
impl comms::comms_server::Comms for CommsService {
    type ConnectStream = ServerStream;

    async fn connect(
        &self,
        request: Request<tonic::Streaming<comms::ClientMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let mut incoming = request.into_inner();
        let limits = &self.node.limits;
        // A client that opens the stream and stalls must not hold it open.
        let first = tokio::time::timeout(self.node.hello_timeout, incoming.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Hello within {} s (Frontend.resources.hello_timeout_s)",
                    self.node.hello_timeout.as_secs()
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("stream closed before hello"))?;
        let hello = match codec::validate(first, limits) {
            Ok(ClientInput::Hello(h)) => h,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        codec::check_identity(&hello.claimed_id, &peer.client_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if hello.deployment_nonce != self.node.nonce {
            return Err(Status::permission_denied(
                "the client's nonce is not this deployment's",
            ));
        }
        if let Meta::Remote(r) = &self.node.datastore
            && check_enrolled_key(r, &peer).await? == Contact::First
        {
            let now = self.node.clock.now();
            let admitted = self
                .node
                .enrolments
                .lock()
                .is_ok_and(|mut b| b.try_take(now));
            if !admitted {
                let rate = talon_core::registry::RegistryError::EnrolmentRate {
                    per_second: self.node.enrolments_per_second,
                };
                return Err(Status::unavailable(rate.to_string()));
            }
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE_MAX);
        let conn = self
            .node
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = peer.client_id.clone();
        let node = self.node.clone();
        node.ask(|reply| Msg::Connected {
            peer,
            hello,
            tx: tx.clone(),
            conn,
            reply,
        })
        .await?;
        let span = tracing::info_span!("client", client = %client);
        let reader = async move {
            // Flows this connection has shown to be tasked to this client (bounded; see `tasked`).
            let mut known: BTreeSet<FlowId> = BTreeSet::new();
            loop {
                let msg = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(client = %client, error = %e, "client stream ended");
                        // Tell the client why (e.g. a message over max_message_size: OUT_OF_RANGE).
                        let _ = tx.try_send(Err(Status::new(e.code(), e.message().to_owned())));
                        break;
                    }
                };
                let (raw, which) = match &msg.kind {
                    Some(client_message::Kind::Flow(f)) => (
                        Bytes::from(f.encode_to_vec()),
                        Some((f.flow_id.chars().take(64).collect::<String>(), f.seq)),
                    ),
                    _ => (Bytes::new(), None),
                };
                match codec::validate(msg, &node.limits) {
                    Ok(ClientInput::Flow { flow, seq, data }) => {
                        // Boxed: its state (a datastore read) exists only while it runs, not in
                        // every idle connection's task.
                        if let Err(err) = Box::pin(tasked(&node, &client, &flow, &mut known)).await
                        {
                            let err = comms::ServerError {
                                seq,
                                flow_id: flow.to_string(),
                                ..err
                            };
                            let _ = tx.try_send(Ok(Box::new(comms::ServerMessage {
                                kind: Some(server_message::Kind::Error(err)),
                            })));
                            continue;
                        }
                        if node
                            .tx
                            .send(Msg::Flow {
                                client: client.clone(),
                                flow,
                                seq,
                                data,
                                raw,
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(ClientInput::TaskAck { flow }) => {
                        let _ = node
                            .tx
                            .send(Msg::TaskAck {
                                client: client.clone(),
                                flow,
                            })
                            .await;
                    }
                    Ok(ClientInput::Ping { time_unix_ms }) => {
                        let pong = comms::ServerMessage {
                            kind: Some(server_message::Kind::Pong(comms::Pong { time_unix_ms })),
                        };
                        let _ = tx.try_send(Ok(Box::new(pong)));
                    }
                    Ok(ClientInput::Hello(_)) => {
                        let _ = tx.try_send(Err(Status::invalid_argument(
                            "a second Hello on one stream",
                        )));
                        break;
                    }
                    Err(e) => {
                        tracing::info!(client = %client, error = %e, "refused client message");
                        // Names the refused message so the client can tell which one it was.
                        let (flow_id, seq) = which.unwrap_or_default();
                        let err = comms::ServerError {
                            code: comms::ErrorCode::InvalidMessage as i32,
                            message: e.to_string(),
                            flow_id,
                            seq,
                        };
                        let _ = tx.try_send(Ok(Box::new(comms::ServerMessage {
                            kind: Some(server_message::Kind::Error(err)),
                        })));
                    }
                }
            }
            let _ = node.tx.send(Msg::Disconnected { client, conn }).await;
        };
        tokio::spawn(tracing::Instrument::instrument(reader, span));
        Ok(Response::new(ServerStream(rx)))
    }
}

/// Flows remembered per connection as tasked to its client; past it the set starts over (one more
/// datastore read per flow).
const KNOWN_FLOWS_PER_CONN_MAX: usize = 64;

/// A client may only write into flows the master created for it (their record exists): a client
/// replaying another's messages, or inventing flows, is refused with UNKNOWN_FLOW and nothing of it
/// is stored. One datastore read per flow per connection (the master's cache, or a minion's read
/// cache), never per message.
async fn tasked(
    node: &Node,
    client: &ClientId,
    flow: &FlowId,
    known: &mut BTreeSet<FlowId>,
) -> Result<(), comms::ServerError> {
    if known.contains(flow) {
        return Ok(());
    }
    let key = paths::flow_record(client, flow);
    let mut found = node.datastore.get(&key).await;
    if let (Ok(None), Meta::Remote(r)) = (&found, &node.datastore) {
        // The minion's read cache may hold an old miss: ask the master itself before refusing.
        r.invalidate(&key);
        found = node.datastore.get(&key).await;
    }
    match found {
        Ok(Some(_)) => {
            if known.len() >= KNOWN_FLOWS_PER_CONN_MAX {
                known.clear();
            }
            known.insert(flow.clone());
            Ok(())
        }
        Ok(None) => Err(comms::ServerError {
            code: comms::ErrorCode::UnknownFlow as i32,
            message: format!("flow {flow} was never tasked to {client}; nothing was stored"),
            ..Default::default()
        }),
        Err(e) => Err(comms::ServerError {
            code: comms::ErrorCode::Busy as i32,
            message: format!("cannot check flow {flow} now ({e}); send it again later"),
            ..Default::default()
        }),
    }
}

/// The analyst's gRPC API (master only); every call needs an API certificate.
#[derive(Clone)]
pub struct ApiService {
    node: Node,
}

impl ApiService {
    /// Serves the API through `node`.
    pub fn new(node: Node) -> ApiService {
        ApiService { node }
    }
}

fn require_api<T>(req: &Request<T>) -> Result<(), Status> {
    crate::tls::require_role(req, Role::Api, "an API certificate")
}

type Pages = tokio_stream::wrappers::ReceiverStream<Result<api::ResultPage, Status>>;

#[tonic::async_trait]
impl api::api_server::Api for ApiService {
    async fn search_clients(
        &self,
        req: Request<api::SearchRequest>,
    ) -> Result<Response<api::SearchResponse>, Status> {
        require_api(&req)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            10_000
        } else {
            r.limit as usize
        };
        self.node
            .ask(|reply| Msg::Search {
                query: r.query,
                limit,
                reply,
            })
            .await
            .map(Response::new)
    }

    async fn modify_label(
        &self,
        req: Request<api::LabelRequest>,
    ) -> Result<Response<api::ClientSummary>, Status> {
        require_api(&req)?;
        let r = req.into_inner();
        self.node
            .ask(|reply| Msg::Label {
                client: r.client_id,
                label: r.label,
                remove: r.remove,
                reply,
            })
            .await
            .map(Response::new)
    }

    async fn collect(
        &self,
        req: Request<api::CollectRequest>,
    ) -> Result<Response<api::FlowSummary>, Status> {
        require_api(&req)?;
        let r = req.into_inner();
        let params = r.params.into_iter().collect();
        self.node
            .ask(|reply| Msg::Collect {
                client: r.client_id,
                artifact: r.artifact,
                params,
                reply,
            })
            .await
            .map(Response::new)
    }

    async fn get_flow(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<api::FlowSummary>, Status> {
        require_api(&req)?;
        let r = req.into_inner();
        let client =
            ClientId::parse(&r.client_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let flow =
            FlowId::parse(&r.flow_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = load_json::<FlowJson>(&self.node.datastore, &paths::flow_record(&client, &flow))
            .await
            .map_err(Status::unavailable)?
            .ok_or_else(|| Status::not_found(format!("no flow {flow} on client {client}")))?;
        Ok(Response::new(flow_summary(&rec)))
    }

    type GetFlowResultsStream = Pages;

    async fn get_flow_results(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<Pages>, Status> {
        require_api(&req)?;
        let r = req.into_inner();
        let client =
            ClientId::parse(&r.client_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let flow =
            FlowId::parse(&r.flow_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(stream_flows(
            self.node.filestore.volume().clone(),
            self.node.datastore.clone(),
            vec![(client, flow)],
        )))
    }

    async fn create_hunt(
        &self,
        req: Request<api::CreateHuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        require_api(&req)?;
        let req = req.into_inner();
        self.node
            .ask(|reply| Msg::CreateHunt { req, reply })
            .await
            .map(Response::new)
    }

    async fn list_hunts(
        &self,
        req: Request<api::ListHuntsRequest>,
    ) -> Result<Response<api::ListHuntsResponse>, Status> {
        require_api(&req)?;
        self.node
            .ask(|reply| Msg::ListHunts { reply })
            .await
            .map(Response::new)
    }

    async fn get_hunt(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        require_api(&req)?;
        let id = req.into_inner().hunt_id;
        self.node
            .ask(|reply| Msg::GetHunt { id, reply })
            .await
            .map(Response::new)
    }

    async fn stop_hunt(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        require_api(&req)?;
        let id = req.into_inner().hunt_id;
        self.node
            .ask(|reply| Msg::StopHunt { id, reply })
            .await
            .map(Response::new)
    }

    type GetHuntResultsStream = Pages;

    async fn get_hunt_results(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<Pages>, Status> {
        require_api(&req)?;
        let id = req.into_inner().hunt_id;
        let flows = self.node.ask(|reply| Msg::HuntFlows { id, reply }).await?;
        Ok(Response::new(stream_flows(
            self.node.filestore.volume().clone(),
            self.node.datastore.clone(),
            flows,
        )))
    }

    async fn get_cluster(
        &self,
        req: Request<api::ClusterRequest>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        require_api(&req)?;
        let r = self.node.ask(|reply| Msg::Cluster { reply }).await?;
        Ok(Response::new(r))
    }

    async fn list_artifacts(
        &self,
        req: Request<api::ListArtifactsRequest>,
    ) -> Result<Response<api::ListArtifactsResponse>, Status> {
        require_api(&req)?;
        let artifacts = talon_core::artifacts::CATALOGUE
            .iter()
            .map(|a| api::ArtifactInfo {
                name: a.name.into(),
                description: a.description.into(),
                params: a
                    .params
                    .iter()
                    .map(|p| api::ArtifactParam {
                        name: p.name.into(),
                        kind: p.kind.name().into(),
                        default: p.default.into(),
                        description: p.description.into(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(api::ListArtifactsResponse { artifacts }))
    }
}

#[cfg(test)]
mod settle_tests {
    use super::*;
    use crate::filestore::FilestoreOptions;
    use crate::storage::local::StdDisk;
    use crate::storage::volume::FsVolume;
    use crate::storage::volume::Volume;
    use std::io;

    /// A volume whose writes wait until the gate opens (a hung NFS server that recovers).
    struct Gate {
        open: tokio::sync::watch::Receiver<bool>,
        inner: FsVolume,
    }

    impl Gate {
        async fn wait(&self) {
            let mut open = self.open.clone();
            while !*open.borrow_and_update() {
                if open.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    impl Volume for Gate {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.wait().await;
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.wait().await;
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.wait().await;
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.wait().await;
            self.inner.commit(from, to).await
        }
    }

    fn ack(seq: u64) -> comms::FlowAck {
        comms::FlowAck {
            flow_id: "F.1".into(),
            seq,
            settled: false,
        }
    }

    /// invariant 7 (docs/architecture.md) for the settle queue: with the volume hung, it takes `max` acknowledgements
    /// and refuses the next; once the volume recovers, exactly those are sent again as settled.
    #[tokio::test]
    async fn settle_queue_is_bounded_and_settles_once_the_volume_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let volume = SharedVolume::new(Gate {
            open,
            inner: FsVolume::new(&dir.path().join("volume")).unwrap(),
        });
        let disk = StdDisk::new(&dir.path().join("local")).unwrap();
        let opts = FilestoreOptions {
            buffer_bytes: 16 << 20,
            message_bytes_max: 1 << 20,
            writer: "test".into(),
            flows_remembered: 100,
        };
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (fs, _task, _) = crate::filestore::Filestore::open(disk, volume, clock, &opts).unwrap();
        // Stored (journalled, acknowledged) but not settled: the volume is hung.
        fs.store("clients/C.1/flows/F.1/messages/0", Bytes::from_static(b"m"))
            .await
            .unwrap();
        const MAX: usize = 4;
        let settler = Settler::start(fs.clone(), MAX);
        let (tx, mut rx) = mpsc::channel(16);
        // The settle task has not run yet (this runtime runs one task at a time): the queue fills.
        for seq in 0..MAX as u64 {
            assert!(
                settler.offer(tx.clone(), ack(seq)),
                "ack {seq} refused below the bound"
            );
        }
        assert!(
            !settler.offer(tx.clone(), ack(99)),
            "the bound was not enforced"
        );
        // Nothing is settled while the volume is hung.
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        open_tx.send(true).unwrap();
        for seq in 0..MAX as u64 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
                .await
                .expect("settled within 30 s")
                .unwrap()
                .unwrap();
            match m.kind {
                Some(server_message::Kind::Ack(a)) => {
                    assert_eq!((a.seq, a.settled), (seq, true));
                }
                other => panic!("expected a settled ack, got {other:?}"),
            }
        }
        // The refused one never comes (the client's resend would be offered again).
        drop(settler);
        drop(tx);
        assert!(rx.recv().await.is_none());
        let (_, found) =
            crate::storage::segments::locate(fs.volume(), "clients/C.1/flows/F.1/messages")
                .await
                .unwrap();
        assert_eq!(
            found,
            vec![(
                "clients/C.1/flows/F.1/messages/0".to_owned(),
                Bytes::from_static(b"m")
            )]
        );
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::datastore::DatastoreOptions;
    use crate::storage::local::StdDisk;
    use crate::storage::volume::FsVolume;
    use crate::storage::volume::Volume;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A volume whose reads fail while `failing` is above zero (each failure counts it down).
    struct Flaky {
        failing: Arc<AtomicU32>,
        inner: FsVolume,
    }

    impl Volume for Flaky {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            let left = self.failing.load(Ordering::SeqCst);
            if left > 0 {
                self.failing.store(left - 1, Ordering::SeqCst);
                return Err(io::Error::other("injected read error"));
            }
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.commit(from, to).await
        }
    }

    /// A start-up read that fails is retried (a transient volume error must not stop a master
    /// loading thousands of records); one that keeps failing is reported with its key.
    #[tokio::test(start_paused = true)]
    async fn start_up_reads_retry_transient_failures_and_name_a_lasting_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = FsVolume::new(&dir.path().join("volume")).unwrap();
        let keys: Vec<String> = (0..8).map(|i| format!("hunts/H.{i}/record.json")).collect();
        for k in &keys {
            shared.write(k, Bytes::from(k.clone())).await.unwrap();
        }
        let failing = Arc::new(AtomicU32::new(0));
        let volume = Flaky {
            failing: failing.clone(),
            inner: shared,
        };
        let disk = StdDisk::new(&dir.path().join("local")).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (ds, _task, _) =
            crate::datastore::Datastore::open(disk, volume, clock, DatastoreOptions::default())
                .unwrap();
        let meta = Meta::Local(ds);
        // Fewer failures than attempts per read: every value arrives, in key order.
        failing.store(LOAD_READ_ATTEMPTS - 1, Ordering::SeqCst);
        let got = get_many(&meta, keys.clone()).await.unwrap();
        assert_eq!(failing.load(Ordering::SeqCst), 0, "the failures were hit");
        assert_eq!(
            got,
            keys.iter()
                .map(|k| (k.clone(), Some(Bytes::from(k.clone()))))
                .collect::<Vec<_>>()
        );
        // A read that fails every attempt fails the load, naming the key.
        failing.store(LOAD_READ_ATTEMPTS, Ordering::SeqCst);
        let e = get_many(&meta, vec!["hunts/H.new/record.json".into()])
            .await
            .unwrap_err();
        assert!(
            e.contains("hunts/H.new/record.json") && e.contains("after 5 attempts"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod start_image_tests {
    use super::*;
    use crate::datastore::{Datastore, DatastoreOptions, ImageOptions, ImageReport};
    use crate::records::{HuntJson, ParticipantJson};
    use crate::storage::local::StdDisk;
    use crate::storage::volume::{FsVolume, Volume};
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the volume's reads and lists.
    struct Counting {
        reads: Arc<AtomicU32>,
        inner: FsVolume,
    }

    impl Volume for Counting {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.list(prefix).await
        }
        async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.list_within(prefix, depth).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.commit(from, to).await
        }
    }

    fn client_json(i: u8) -> Bytes {
        let id = ClientId::from_public_key(&[i]);
        let r = talon_core::registry::ClientRecord {
            id,
            key_fingerprint: [i; 32],
            hostname: format!("host{i}"),
            fqdn: format!("host{i}.example"),
            os: "linux".into(),
            labels: ["lab".to_owned()].into(),
            ips: vec![],
            first_seen: Timestamp(1),
            last_seen: Timestamp(2),
            last_ip: "127.0.0.1".into(),
            node: "m".into(),
            connected: false,
            persisted_seen: Timestamp(2),
            connected_at: Timestamp(0),
        };
        Bytes::from(serde_json::to_vec(&ClientJson::from_record(&r)).unwrap())
    }

    fn start_keys() -> Vec<(String, Bytes)> {
        let c = |i: u8| ClientId::from_public_key(&[i]);
        let hunt = HuntJson {
            hunt_id: "H.1".into(),
            artifact: "Generic.Client.Info".into(),
            params: Default::default(),
            include_labels: Default::default(),
            exclude_labels: Default::default(),
            os: None,
            expires_ms: 10_000_000,
            client_limit: None,
            description: String::new(),
            created_ms: 5,
            state: "running".into(),
        };
        let json = |v: &dyn erased::Json| Bytes::from(v.to_json());
        let task = comms::Task {
            flow_id: "F.7".into(),
            ..Default::default()
        };
        vec![
            (format!("clients/{}/record.json", c(1)), client_json(1)),
            (format!("clients/{}/record.json", c(2)), client_json(2)),
            ("hunts/H.1/record.json".into(), json(&hunt)),
            (
                format!("hunts/H.1/clients/{}.json", c(1)),
                json(&ParticipantJson::Completed {
                    rows: 3,
                    uploaded_bytes: 0,
                }),
            ),
            (
                format!("hunts/H.1/clients/{}.json", c(2)),
                json(&ParticipantJson::Scheduled),
            ),
            (
                "cluster/minions/m1.json".into(),
                json(&CursorJson {
                    node: "m1".into(),
                    epoch: 4,
                    hwm: 9,
                }),
            ),
            (
                format!("tasks/{}/F.7.pb", c(2)),
                Bytes::from(task.encode_to_vec()),
            ),
            (
                paths::uploads_pending(&c(1), &FlowId::from_u64(3)),
                Bytes::from_static(b"{}"),
            ),
        ]
    }

    mod erased {
        pub trait Json {
            fn to_json(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Json for T {
            fn to_json(&self) -> Vec<u8> {
                serde_json::to_vec(self).unwrap()
            }
        }
    }

    /// What a start loaded, comparable.
    fn digest(m: &MasterStart) -> String {
        let hunts: Vec<String> = m
            .hunts
            .list()
            .map(|h| {
                let mut p: Vec<String> = h
                    .participants()
                    .map(|(c, p)| format!("{c}={p:?}"))
                    .collect();
                p.sort();
                format!("{:?} {:?} {p:?}", h.record(), h.stats())
            })
            .collect();
        format!(
            "{:?}\n{hunts:?}\n{:?}\n{:?}\n{:?}",
            m.records, m.cursors, m.pending, m.reassembling
        )
    }

    /// A master restarted with a valid start image loads its state from that one local file: the
    /// volume is neither listed nor read, and what it loads is what listing the volume loads, also
    /// after writes made since the image was seeded (replayed from the journal).
    #[tokio::test]
    async fn a_restart_loads_from_the_start_image_without_touching_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let reads = Arc::new(AtomicU32::new(0));
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let opts = HuntLimits::default();
        let open = |image: bool| {
            let volume = Counting {
                reads: reads.clone(),
                inner: FsVolume::new(&dir.path().join("volume")).unwrap(),
            };
            let ds_opts = DatastoreOptions {
                image: image.then_some(ImageOptions { tracks: start_key }),
                ..DatastoreOptions::default()
            };
            let disk = StdDisk::new(&dir.path().join("local")).unwrap();
            Datastore::open(disk, volume, clock.clone(), ds_opts).unwrap()
        };
        // Records on the volume from an earlier life (written by a datastore keeping no image), with
        // keys the start does not read beside them.
        let (ds, task, _) = open(false);
        for (k, v) in start_keys() {
            ds.set(&k, v).await.unwrap();
        }
        let c1 = ClientId::from_public_key(&[1]);
        ds.set(
            &format!("clients/{c1}/flows/F.3/record.json"),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        ds.flushed().await.unwrap();
        drop(ds);
        task.await.unwrap().unwrap();

        // First start keeping an image: it lists the volume and seeds the image.
        let (ds, task, report) = open(true);
        assert_eq!(report.image, ImageReport::Absent);
        let listed = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert!(reads.load(Ordering::SeqCst) > 0);
        assert_eq!(listed.records.len(), 2);
        assert_eq!(listed.hunts.list().count(), 1);
        assert_eq!(listed.reassembling.len(), 1);
        // Written after the seed: a third client, a delivered task.
        ds.set(
            &format!("clients/{}/record.json", ClientId::from_public_key(&[3])),
            client_json(3),
        )
        .await
        .unwrap();
        ds.delete(&format!("tasks/{}/F.7.pb", ClientId::from_public_key(&[2])))
            .await
            .unwrap();
        drop(ds);
        task.await.unwrap().unwrap();

        // Restart: from the image, nothing read from the volume.
        let (ds, task, report) = open(true);
        assert!(
            matches!(report.image, ImageReport::Loaded { keys: 8, .. }),
            "{:?}",
            report.image
        );
        reads.store(0, Ordering::SeqCst);
        let imaged = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "the volume was not touched"
        );
        assert_eq!(imaged.records.len(), 3);
        assert!(imaged.pending.is_empty());
        drop(ds);
        task.await.unwrap().unwrap();

        // The listing path over the same journal and volume loads the same state.
        let (ds, task, _) = open(false);
        let relisted = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert_eq!(digest(&imaged), digest(&relisted));
        drop(ds);
        task.await.unwrap().unwrap();
    }
}

#[cfg(test)]
mod results_tests {
    use super::*;
    use crate::storage::fs::{LatencyFs, OsFs};
    use crate::storage::volume::Volume;
    use crate::storage::volume::{FsVolume, SyncMode};
    use tokio_stream::StreamExt;

    /// Hunt results come in the order of the flows, each flow's pages in sequence order, with
    /// non-row messages skipped, however many flows are read ahead and whichever finish first;
    /// from the runs in the flow records (written in two flushes each, the later one first), or
    /// listed for a flow of the old one-file-per-message layout; a flow not complete shows nothing.
    #[tokio::test(start_paused = true)]
    async fn results_keep_the_flows_order_while_reading_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LatencyFs::new(
            OsFs::new(&dir.path().join("fs")).unwrap(),
            std::time::Duration::from_millis(50),
        );
        let vol = SharedVolume::new(FsVolume::over(fs, SyncMode::PerFile, "t"));
        let log = crate::storage::segments::SegmentLog::new(vol.clone(), "w", 1000).unwrap();
        let disk = crate::storage::local::StdDisk::new(&dir.path().join("local")).unwrap();
        let meta = SharedVolume::new(FsVolume::new(&dir.path().join("meta")).unwrap());
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (ds, _task, _) = crate::datastore::Datastore::open(
            disk,
            meta,
            clock,
            crate::datastore::DatastoreOptions::default(),
        )
        .unwrap();
        let client = ClientId::from_public_key(b"k");
        // More flows than are read ahead; the early ones have the most messages (finish last).
        let n_flows = RESULT_FLOWS_AHEAD as u64 * 2 + 3;
        let mut flows = Vec::new();
        let mut expected = Vec::new();
        for f in 0..n_flows {
            let flow = FlowId::from_u64(f + 1);
            let msgs = (n_flows - f) % 7 + 1;
            let mut writes = Vec::new();
            for seq in 0..msgs {
                let row = format!("{{\"f\":{f},\"seq\":{seq}}}");
                let m = comms::FlowMessage {
                    flow_id: flow.to_string(),
                    seq,
                    payload: Some(comms::flow_message::Payload::Rows(comms::ResultRows {
                        source: "a".into(),
                        rows: vec![Bytes::from(row.clone())],
                    })),
                };
                writes.push((
                    paths::flow_message(&client, &flow, seq),
                    Some(Bytes::from(m.encode_to_vec())),
                ));
                if f != 5 {
                    expected.push(row);
                }
            }
            let status = comms::FlowMessage {
                flow_id: flow.to_string(),
                seq: msgs,
                payload: Some(comms::flow_message::Payload::Status(Default::default())),
            };
            writes.push((
                paths::flow_message(&client, &flow, msgs),
                Some(Bytes::from(status.encode_to_vec())),
            ));
            let mut record = FlowJson {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                artifact: "Generic.Test.Rows".into(),
                params: BTreeMap::new(),
                hunt_id: None,
                state: FlowRecordState::Completed,
                rows: msgs,
                uploaded_bytes: 0,
                error: String::new(),
                created_ms: 0,
                finished_ms: 1,
                uploads: vec![],
                runs: vec![],
            };
            if f == 3 {
                vol.write_many(writes).await.unwrap(); // The old layout: runs stay empty.
            } else {
                let later = writes.split_off(writes.len() / 2);
                log.write_many(later).await.unwrap();
                log.write_many(writes).await.unwrap();
                let dir = paths::flow_messages_dir(&client, &flow);
                record.runs = log.runs_covering(&dir, msgs + 1).unwrap();
            }
            if f == 5 {
                record.state = FlowRecordState::Running;
            }
            let key = paths::flow_record(&client, &flow);
            ds.set(&key, json_bytes(&record).unwrap()).await.unwrap();
            flows.push((client.clone(), flow));
        }
        let mut pages = stream_flows(vol, Meta::Local(ds), flows);
        let mut got = Vec::new();
        while let Some(p) = pages.next().await {
            for r in p.unwrap().rows {
                got.push(String::from_utf8(r.to_vec()).unwrap());
            }
        }
        assert_eq!(got, expected);
    }
}
