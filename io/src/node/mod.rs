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
//!
//! Where things are: this file holds the actor, its inputs and dispatch; `master.rs` the master's
//! policy driver (over the core task book and replication inbox), `minion.rs` the link events,
//! `flows.rs` client flows on every node, `load.rs` a master's start, `comms_service.rs` and
//! `api_service.rs` the gRPC services. The policy moves into `talon_core::node` machine by machine
//! (docs/architecture.md, "The node's policy").

pub mod server;

use crate::clock::{Clock, Entropy};
use crate::cluster::{Link, LinkEvent, Meta, WriteError};
use crate::deploy::pki::Role;
use crate::net::tls::Peer;
use crate::storage::filestore::Filestore;
use crate::storage::records::{ClientJson, FlowJson, FlowRecordState, HuntJson, ParticipantJson};
use crate::storage::segments::{MessageReader, RunRef};
use crate::storage::volume::SharedVolume;
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use talon_core::cluster_codec::MinionBatch;
use talon_core::codec::{self, ClientInput, CodecLimits, FlowData};
use talon_core::flows::{FinalState, FlowKey, FlowLimits, StoredMessage};
use talon_core::hunts::{
    ClientFacts, Hunt, HuntAction, HuntLimits, HuntManager, HuntSpec, HuntState,
};
use talon_core::node::completions::{CompletionLimits, RecordStep, Recorded};
use talon_core::node::hunt_tasks::{self, TaskOrigin};
use talon_core::node::intake::{Intake, IntakeAction, IntakeLimits};
use talon_core::node::tasks::{TaskAction, TaskBook, TaskLimits};
use talon_core::node::{Outcome, Token};
use talon_core::ratelimit::Paced;
use talon_core::registry::{
    KeyCache, KeyCheck, Query, Registry, RegistryAction, RegistryLimits, Sighting,
};
use talon_core::replication::{Cursor, Inbox, InboxAction, InboxLimits};
use talon_core::{ClientId, FlowId, HuntId, Monotonic, Timestamp, paths};
use talon_proto::api;
use talon_proto::cluster::{self as pc, broadcast, master_message, replicated_event::Event};
use talon_proto::comms::{self, client_message, server_message};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

mod api_service;
mod comms_service;
mod flows;
mod load;
mod master;
mod minion;

pub use api_service::*;
pub use comms_service::*;
use flows::*;
pub use load::*;
use master::*;

/// Per-client queue of messages to push down its stream; a slow client drops acks (it resends).
pub const CLIENT_QUEUE_MAX: usize = 256;

/// Messages waiting for the node actor; handlers wait beyond it (back-pressure).
pub const NODE_INBOX_MAX: usize = 8192;

/// How often the master sends tasks not yet acknowledged again.
pub const TASK_RESEND_MS: u64 = 5_000;

/// Task notifications a node queues, in seconds' worth of `notifications_per_second` (at least
/// 1,024). Beyond it a notification is dropped: the task stays pending on the master, which sends it
/// again every `TASK_RESEND_MS`.
pub const NOTIFY_QUEUE_SECONDS: u64 = 60;

fn json_bytes<T: serde::Serialize>(value: &T) -> Result<Bytes, Status> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| Status::internal(e.to_string()))
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
    /// (Minion) a completion was applied by the master (`applied`), or its replication failed.
    Replicated {
        token: Token,
        applied: bool,
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
    /// Everything stored before a `Settle` is on the shared volume (`ok`), or the buffer stopped.
    Settled {
        token: Token,
        ok: bool,
    },
    /// A completed flow's messages are on the shared volume, in these runs.
    Located {
        token: Token,
        runs: Result<Vec<RunRef>, String>,
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

/// Names a replicated completion the master is applying: the minion and the event's cursor.
type ApplyOrigin = (String, Cursor);

struct MinionConn {
    conn: u64,
    /// How far the minion's clock is behind ours (ms; negative: ahead), measured on its last batch.
    behind_ms: i128,
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
    /// Events not handed to the link because it had stopped (the process is stopping): the first
    /// is logged as an error, the rest counted (a clean stop of a minion with 1,000 clients logged
    /// 1,000 errors, one per client gone).
    unreplicated: std::sync::atomic::AtomicU64,
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
    /// Client flows: stores, the two-phase acknowledgement, completions and their recording (core
    /// `node::intake`).
    intake: Intake<FlowJson, ApplyOrigin>,
    hunts: HuntManager,
    conns: BTreeMap<ClientId, Conn>,
    /// Tasks for clients connected here, pushed at `notifications_per_second`.
    notify: Paced<(ClientId, String), comms::Task>,
    /// The bytes of the flow message being handled, until a Store action takes them (at most one).
    raw: BTreeMap<(FlowKey, u64), Bytes>,
    self_tx: mpsc::Sender<Msg>,
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
                    tasks: TaskBook::restore(task_limits, clock.monotonic(), loaded.pending),
                };
                (NodeRole::Master(Box::new(state)), None)
            }
            Cluster::Minion { link, events } => (
                NodeRole::Minion(MinionState {
                    link,
                    unreplicated: std::sync::atomic::AtomicU64::new(0),
                }),
                Some(events),
            ),
        };
        let limits = IntakeLimits {
            flows: opts.flows.clone(),
            settle_queue_max: talon_core::node::intake::SETTLE_QUEUE_MAX,
            settle_batch_max: talon_core::node::intake::SETTLE_BATCH_MAX,
            completions: CompletionLimits {
                value_bytes_max: opts.value_bytes_max,
                in_flight_max: talon_core::node::intake::COMPLETIONS_IN_FLIGHT_MAX,
            },
        };
        let intake = match &role {
            NodeRole::Master(_) => Intake::master(limits),
            NodeRole::Minion(_) => Intake::minion(limits),
        };
        let (tx, rx) = mpsc::channel(NODE_INBOX_MAX);
        let mut keys = KeyCache::new(opts.expected_clients.max(1));
        for r in records.iter().take(opts.expected_clients) {
            keys.insert(r.id.clone(), r.key_fingerprint);
        }
        let now0 = clock.monotonic();
        let clock0 = clock.clone();
        let actor = Actor {
            registry: Registry::restore(opts.registry.clone(), records),
            keys,
            intake,
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
            // Deadlines are on the monotonic clock, except a hunt's expiry (a wall-clock time).
            let at = self.clock.monotonic();
            let resend = match &self.role {
                NodeRole::Master(m) => m.tasks.poll_timeout(),
                NodeRole::Minion(_) => None,
            };
            let next = [
                self.intake.poll_timeout(),
                resend,
                self.notify.poll_timeout(at),
                self.hunts.poll_retry(),
            ]
            .into_iter()
            .fold(None, talon_core::time::earliest)
            .map_or(30_000, |t| t.since_ms(at));
            let hunts = self
                .hunts
                .poll_timeout()
                .map_or(30_000, |t| t.since_ms(self.now()));
            let wait = std::time::Duration::from_millis(next.min(hunts).min(30_000));
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => {
                        self.handle(m).await;
                        // Also under a steady stream of messages, which keeps the timer from firing.
                        let at = self.clock.monotonic();
                        self.resend_pending(at).await;
                        self.release_notifications(at);
                    }
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    if self.stopped() {
                        break;
                    }
                    let (now, at) = (self.now(), self.clock.monotonic());
                    self.intake.handle_timeout(at);
                    self.hunts.handle_timeout(now, at);
                    self.drain().await;
                    if let Err(e) = self.drain_hunts().await {
                        // Logged where it failed; a hunt record not written is written with the
                        // hunt's next change, and a restart re-derives an expiry from the spec.
                        tracing::debug!(error = %e, "a hunt's change after a timeout is not recorded yet");
                    }
                    self.resend_pending(at).await;
                    self.release_notifications(at);
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
    fn release_notifications(&mut self, at: Monotonic) {
        while let Some(((client, _), task)) = self.notify.poll(at) {
            self.push(&client, server_message::Kind::Task(task));
        }
    }

    /// Sends every pending task again once `TASK_RESEND_MS` has passed, and retries deletes of
    /// acknowledged tasks' records that failed (master).
    async fn resend_pending(&mut self, at: Monotonic) {
        if let NodeRole::Master(m) = &mut self.role
            && m.tasks.poll_timeout().is_some_and(|t| at >= t)
        {
            m.tasks.handle_timeout(at);
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
        let (now, at) = (self.now(), self.clock.monotonic());
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
            Msg::Replicated { token, applied } => {
                self.intake.handle_replicated(token, applied);
                self.drain().await;
            }
            Msg::Settled { token, ok } => {
                self.intake.handle_settled(token, ok);
                self.drain().await;
            }
            Msg::Located { token, runs } => {
                self.intake.handle_located(token, runs);
                self.drain().await;
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
                    .intake
                    .handle_message(at, key.clone(), seq, data.tracker_payload())
                {
                    Ok(()) => {
                        // A Store action takes the bytes; a resend that is only re-acknowledged
                        // leaves them here, so drop them after the drain: at most one entry lives.
                        self.raw.insert((key.clone(), seq), raw);
                        self.drain().await;
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
                        self.drain().await;
                    }
                }
            }
            Msg::Stored { key, seq, ok } => {
                self.intake.handle_stored(at, &key, seq, ok);
                self.drain().await;
            }
            Msg::Audited { key, found } => {
                self.intake.handle_audit(at, &key, found);
                self.drain().await;
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
                self.hunts.handle_timeout(now, at);
                // Report nothing that is not durable.
                let r = self.drain_hunts().await.map(|()| api::ListHuntsResponse {
                    hunts: self.hunts.list().map(hunt_summary).collect(),
                });
                let _ = reply.send(r);
            }
            Msg::GetHunt { id, reply } => {
                self.hunts.handle_timeout(now, at);
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
        let at = self.clock.monotonic();
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
                connected_order: at,
            };
            let enrolment = self.registry.handle_seen(now, at, sighting).map_err(|e| {
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
}

/// A client's outgoing queue. Boxed messages: tokio's channel allocates its slots in blocks of 32,
/// so each connected client holds a block of 8-byte pointers rather than of 120-byte messages.
type ClientTx = mpsc::Sender<Result<Box<comms::ServerMessage>, Status>>;
