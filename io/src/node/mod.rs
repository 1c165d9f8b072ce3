//! A frontend node: the client-facing `Comms` service and, on the master, the analyst's `Api`.
//!
//! One task, the node [`Actor`], owns the node's state: the [`Frontend`] every node has (its client
//! connections and their flows, core `node::intake`) and its [`RoleDriver`]. gRPC handlers talk to it
//! through a bounded channel; it performs the core machines' actions (store a flow message, write
//! metadata, send to a client or a minion, answer a request) and feeds their results back as inputs
//! — the driving rule of `talon-core`, with tokio around it.
//!
//! The master is the single writer of metadata: its role drives core `node::Master` (the registry,
//! the hunts, the tasks not yet delivered, the replication inbox). A minion serves its clients'
//! flows (bulk data straight to the shared filestore) and tells the master what happened through
//! its replication [`Link`]: a client seen or gone, a task delivered, a flow completed. It
//! acknowledges a flow's final status only once the master has applied the completion, so a minion
//! killed at any point loses nothing: the client resends the final status to another node.
//!
//! Where things are: this file holds the actor, its inputs and the frontend; `flows.rs` client
//! flows on every node; `master.rs` and `minion.rs` the two roles; `load.rs` a master's start;
//! `comms_service.rs` and `api_service.rs` the gRPC services (docs/architecture.md, "The node").

pub mod server;

use crate::clock::{Clock, Entropy};
use crate::cluster::{Link, LinkEvent, Meta, ReadError, ReadFailure, WriteError};
use crate::deploy::pki::{Access, Role};
use crate::net::tls::Peer;
use crate::storage::filestore::Filestore;
use crate::storage::records::{ClientJson, FlowJson, FlowRecordState, HuntJson, ParticipantJson};
use crate::storage::segments::{MessageReader, RunRef};
use crate::storage::volume::SharedVolume;
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use talon_core::cluster_codec::{MinionBatch, OutboxReport};
use talon_core::codec::{self, ClientInput, CodecLimits, FlowData};
use talon_core::flows::{FinalState, FlowKey, FlowLimits, StoredMessage};
use talon_core::hunts::{HuntLimits, HuntManager, HuntSpec, HuntState};
use talon_core::node::completions::{CompletionLimits, RecordStep, Recorded};
use talon_core::node::intake::{Intake, IntakeAction, IntakeLimits};
use talon_core::node::master::{
    Analyst, Answer, ErrorKind, HuntView, Item, Level, Master, MasterAction, MasterLimits, NewFlow,
    Request as CoreRequest, RequestError, Restored, Time, WriteFailure,
};
use talon_core::node::tasks::TaskLimits;
use talon_core::node::{Outcome, Token};
use talon_core::ratelimit::Paced;
use talon_core::registry::{KeyCache, KeyCheck, RegistryLimits, Sighting};
use talon_core::replication::{Cursor, InboxLimits};
use talon_core::{ClientId, FlowId, HuntId, Monotonic, Timestamp, paths};
use talon_proto::api;
use talon_proto::cluster::{self as pc, broadcast, replicated_event::Event};
use talon_proto::comms::{self, client_message, server_message};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

mod actor;
mod api_reads;
mod api_service;
mod comms_service;
mod effects;
pub mod events;
mod flows;
mod load;
mod master;
mod minion;
mod repository;
mod uploads;

use actor::*;
pub use api_service::*;
pub use comms_service::*;
use effects::*;
pub use load::*;
use master::*;
use minion::*;
use uploads::*;

/// Per-client queue of messages to push down its stream; a slow client drops acks (it resends).
pub const CLIENT_QUEUE_MAX: usize = 256;

/// Event batches a node stores at once; one more is refused as busy and the agent resends it
/// (docs/events.md, "Limits").
pub const EVENT_STORES_MAX: usize = 4096;

/// Messages waiting for the node actor; handlers wait beyond it (back-pressure).
pub const NODE_INBOX_MAX: usize = 8192;

/// How often the master sends tasks not yet acknowledged again.
pub const TASK_RESEND_MS: u64 = 5_000;

/// Task notifications a node queues, in seconds' worth of `notifications_per_second` (at least
/// 1,024). Beyond it a notification is dropped: the task stays pending on the master, which sends it
/// again every `TASK_RESEND_MS`.
pub const NOTIFY_QUEUE_SECONDS: u64 = 60;

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
    /// Client event days kept (`Datastore.events_retention_days`; 0: all): the master deletes
    /// older ones hourly.
    pub events_retention_days: u64,
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
        /// Its outbox as its hello reported it.
        outbox: Option<OutboxReport>,
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
    /// (Master) metadata writes the core asked for ended.
    Written {
        results: Vec<(Token, Result<(), WriteError>)>,
    },
    /// (Master) a completed flow's record, read.
    RecordRead {
        token: Token,
        record: Result<Option<FlowJson>, ()>,
    },
    /// (Master) a completed flow's record (and uploads marker), written.
    RecordWritten {
        token: Token,
        outcome: Outcome,
    },
    /// An analyst's request (master).
    Request {
        by: Analyst,
        req: CoreRequest,
        reply: Reply<Answer>,
    },
    /// A client's event batch (its bytes: the encoded `EventBatch`).
    Event {
        client: ClientId,
        key: talon_core::events::EventKey,
        raw: Bytes,
    },
    /// A `StoreEvent` ended.
    EventStored {
        key: talon_core::events::EventKey,
        ok: bool,
    },
    /// The client event table, read.
    EventTable {
        table: Result<Vec<events::EntryJson>, String>,
    },
    /// (Master) a client's labels changed: tell it again what it runs, if it is connected here.
    LabelsChanged {
        client: ClientId,
    },
    /// What a client connected here runs, ready to tell it (none: its labels could not be read).
    EventTableFor {
        told: Option<(ClientId, comms::EventTable)>,
    },
}

/// A handle to the node actor.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Msg>,
    /// `<hostname>-<port>`.
    name: String,
    entropy: Arc<dyn Entropy>,
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

/// Names a replicated completion the master is applying: the minion and the event's cursor.
type ApplyOrigin = (String, Cursor);

async fn load_json<T: serde::de::DeserializeOwned>(
    ds: &Meta,
    key: &str,
) -> Result<Option<T>, ReadError> {
    parse_json(key, ds.get(key).await.map_err(|e| e.context(key))?)
}

fn parse_hunt(id: &str) -> Result<HuntId, Status> {
    HuntId::parse(id).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The intake's bounds, from the node's settings.
fn intake_limits(opts: &NodeOptions) -> IntakeLimits {
    IntakeLimits {
        flows: opts.flows.clone(),
        settle_queue_max: talon_core::node::intake::SETTLE_QUEUE_MAX,
        settle_batch_max: talon_core::node::intake::SETTLE_BATCH_MAX,
        completions: CompletionLimits {
            value_bytes_max: opts.value_bytes_max,
            in_flight_max: talon_core::node::intake::COMPLETIONS_IN_FLIGHT_MAX,
        },
        event_stores_max: EVENT_STORES_MAX,
    }
}

/// Hands what a minion's replication link reports to its actor, until either is gone.
async fn forward_link_events(mut events: mpsc::Receiver<LinkEvent>, tx: mpsc::Sender<Msg>) {
    while let Some(e) = events.recv().await {
        if tx.send(Msg::Link(e)).await.is_err() {
            return;
        }
    }
}

impl Node {
    /// Starts the node actor. The master loads the registry, the hunts and the minions' replication
    /// cursors from its datastore first (the error says why it could not); a minion starts empty
    /// (the master holds that state).
    pub async fn start(
        opts: NodeOptions,
        datastore: Meta,
        filestore: Filestore,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        cluster: Cluster,
    ) -> Result<Node, ReadError> {
        let limits = intake_limits(&opts);
        let (tx, rx) = mpsc::channel(NODE_INBOX_MAX);
        // Results of effects in flight: bounded by the effects the machines have in flight.
        let (done_tx, done_rx) = mpsc::channel(NODE_INBOX_MAX);
        let now0 = clock.monotonic();
        let fe = |intake| {
            let (ds, fs) = (datastore.clone(), filestore.clone());
            Frontend::new(&opts, clock.clone(), ds, fs, intake, done_tx.clone())
        };
        let span = tracing::info_span!("node", node = %opts.node_name);
        match cluster {
            Cluster::Master => {
                let role = MasterDriver::start(&opts, &datastore, &filestore, &clock).await?;
                let actor = Actor {
                    fe: fe(Intake::master(limits)),
                    role,
                };
                actor.fe.reload_event_table();
                if opts.events_retention_days > 0 {
                    tokio::spawn(tracing::Instrument::instrument(
                        events::retention(
                            filestore.volume().clone(),
                            clock.clone(),
                            opts.events_retention_days,
                        ),
                        span.clone(),
                    ));
                }
                tokio::spawn(tracing::Instrument::instrument(
                    actor.run(rx, done_rx),
                    span,
                ));
            }
            Cluster::Minion { link, events } => {
                tokio::spawn(forward_link_events(events, tx.clone()));
                let actor = Actor {
                    fe: fe(Intake::minion(limits)),
                    role: MinionDriver::new(link, opts.expected_clients),
                };
                actor.fe.reload_event_table();
                tokio::spawn(tracing::Instrument::instrument(
                    actor.run(rx, done_rx),
                    span,
                ));
            }
        }
        let enrolments = talon_core::ratelimit::TokenBucket::new(
            opts.registry.enrolments_per_second,
            opts.registry.enrolment_burst,
            now0,
        );
        Ok(Node {
            name: opts.node_name.clone(),
            entropy,
            enrolments: Arc::new(std::sync::Mutex::new(enrolments)),
            enrolments_per_second: opts.registry.enrolments_per_second,
            clock,
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
        outbox: Option<OutboxReport>,
        tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
    ) -> Result<u64, Status> {
        self.ask(|reply| Msg::MinionUp {
            node,
            outbox,
            tx,
            reply,
        })
        .await
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

    /// (Master) client `client`'s labels changed: it is told again which event artifacts it runs.
    pub(crate) async fn labels_changed(&self, client: ClientId) {
        let _ = self.tx.send(Msg::LabelsChanged { client }).await;
    }

    /// API user `user`'s request, answered by the master's core (a minion refuses it).
    async fn request(&self, user: &str, req: CoreRequest) -> Result<Answer, Status> {
        let by = Analyst {
            user: user.to_owned(),
            audit_id: self.random(),
        };
        self.ask(|reply| Msg::Request { by, req, reply }).await
    }

    /// A random id.
    fn random(&self) -> u64 {
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        u64::from_le_bytes(n)
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

/// A client's outgoing queue. Boxed messages: tokio's channel allocates its slots in blocks of 32,
/// so each connected client holds a block of 8-byte pointers rather than of 120-byte messages.
type ClientTx = mpsc::Sender<Result<Box<comms::ServerMessage>, Status>>;
