//! The master's node policy as one machine (docs/architecture.md, "The node").
//!
//! [`Master`] combines the client registry, the hunt manager, the task book and the replication
//! inbox with the glue that used to live in the shell: which writes go together, what an analyst's
//! request waits for before it is answered, where a task is sent, how a minion's events are
//! applied. Every effect is an action ([`MasterAction`]) carrying a token, and its result comes back
//! as an input; nothing here awaits.
//!
//! # Rules
//!
//! - **A reply is durable.** A request (a client connecting here, a label, a collection, a hunt
//!   created, stopped or listed) is answered only once every write it caused has ended, and only
//!   with success if all of them are done: a refused write is a retryable error, a maybe-written one
//!   says that it may have happened. A hunt whose creation record was not written is forgotten.
//! - **A participant has a durable task** (see [`hunt_tasks`]): its participant record, its flow
//!   record and its task are one atomic write; a participant whose write is refused, or whose client
//!   is at its task bound, is undone in the hunt manager and offered again later.
//! - **A replicated event is applied when its writes have ended**, and only then does the inbox
//!   persist the cursor covering it; acknowledgements never pass the durable cursor
//!   ([`Inbox`]). A minion's completion is recorded by the intake's completions machine
//!   ([`MasterAction::Complete`]), whose result comes back through [`Master::handle_applied`].
//! - **A change has its audit entry.** A change an analyst asks for (a label, a collection, a hunt
//!   created or stopped) writes an [`AuditEntry`] naming the analyst with its other writes, and is
//!   answered with success only once that entry is durable too.
//! - **A relabelled client is offered the running hunts once its record is durable.**
//! - A task goes toward its client wherever that is connected: pushed here, or sent to the minion
//!   holding it; it stays pending in the task book (sent again) until acknowledged.

use super::completions::HuntOutcome;
use super::hunt_tasks::{self, TaskOrigin};
use super::tasks::{TaskAction, TaskBook, TaskLimits};
use super::{Outcome, Token};
use crate::cluster_codec::{MinionBatch, OutboxReport};
use crate::flows::FinalState;
use crate::hunts::{
    ClientFacts, Hunt, HuntAction, HuntError, HuntLimits, HuntManager, HuntRecord, HuntSpec,
    HuntStats, OutcomeEffect, Participation,
};
use crate::registry::{
    ClientRecord, Query, Registry, RegistryAction, RegistryError, RegistryLimits, Sighting,
};
use crate::replication::{Cursor, Inbox, InboxAction, InboxError, InboxLimits};
use crate::time::{Monotonic, Timestamp};
use crate::{ClientId, FlowId, HuntId, paths};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use talon_proto::cluster::{self as pc, broadcast, master_message, replicated_event::Event};
use talon_proto::comms;

/// The two clocks an input happens at: the wall clock (recorded, shown, hunt expiry) and the
/// monotonic one (deadlines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    /// Wall clock.
    pub now: Timestamp,
    /// Monotonic clock.
    pub at: Monotonic,
}

/// The master's bounds.
#[derive(Clone, Debug)]
pub struct MasterLimits {
    /// The task book's.
    pub tasks: TaskLimits,
    /// The hunt manager's.
    pub hunts: HuntLimits,
    /// The registry's.
    pub registry: RegistryLimits,
    /// The replication inbox's.
    pub inbox: InboxLimits,
    /// Largest upload a task allows (`max_upload_bytes` of every task).
    pub upload_bytes_max: u64,
}

/// What a master restarts from (its datastore).
#[derive(Debug)]
pub struct Restored {
    /// Client records.
    pub clients: Vec<ClientRecord>,
    /// Hunts and their participants ([`HuntManager::restore`]).
    pub hunts: HuntManager,
    /// Each minion's durable replication cursor.
    pub cursors: Vec<(String, Cursor)>,
    /// Tasks not yet acknowledged: `(client, flow, task)`.
    pub pending: Vec<(ClientId, FlowId, comms::Task)>,
}

/// A flow record created queued (a collection, a hunt participant's flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFlow {
    /// The client.
    pub client: ClientId,
    /// The flow.
    pub flow: FlowId,
    /// The artifact (validated).
    pub artifact: String,
    /// Its parameters (validated).
    pub params: BTreeMap<String, String>,
    /// The hunt it belongs to.
    pub hunt: Option<HuntId>,
    /// When it was created.
    pub created: Timestamp,
}

/// One value of an atomic write.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A client record ([`paths::client_record`]).
    Client(Box<ClientRecord>),
    /// A hunt record ([`paths::hunt_record`]).
    Hunt(Box<HuntRecord>),
    /// A hunt participant ([`paths::hunt_participant`]).
    Participant {
        /// The hunt.
        hunt: HuntId,
        /// The client.
        client: ClientId,
        /// Its part.
        participation: Participation,
    },
    /// A task not yet acknowledged.
    Task {
        /// The client.
        client: ClientId,
        /// Its flow.
        flow: FlowId,
        /// The task.
        task: comms::Task,
    },
    /// A new flow record, queued ([`paths::flow_record`]).
    Flow(Box<NewFlow>),
    /// A minion's replication cursor.
    Cursor {
        /// The minion.
        node: String,
        /// Its cursor.
        cursor: Cursor,
    },
    /// An audit-log entry ([`paths::audit_entry`]).
    Audit(Box<AuditEntry>),
    /// A custom artifact's definition ([`paths::artifact_definition`]); `None` deletes it.
    Artifact {
        /// Its name.
        name: String,
        /// Its definition (YAML), as added.
        definition: Option<String>,
    },
    /// An entry of the client event table ([`paths::client_event`]); `None` deletes it.
    ClientEvent {
        /// Whose clients (a label, or `events::ALL_CLIENTS`).
        label: String,
        /// The event artifact.
        artifact: String,
        /// The entry (JSON, as the shell wrote it).
        entry: Option<String>,
    },
}

/// The datastore key an [`Item`] is stored under, as the master orders writes by it: at most one
/// write per key is in flight, so two writes of one key land in the order they were asked for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A client record.
    Client(ClientId),
    /// A hunt record.
    Hunt(HuntId),
    /// A hunt participant.
    Participant(HuntId, ClientId),
    /// A task not yet acknowledged.
    Task(ClientId, FlowId),
    /// A flow record.
    Flow(ClientId, FlowId),
    /// A minion's cursor.
    Cursor(String),
    /// An audit entry: its time and id.
    Audit(Timestamp, u64),
    /// A custom artifact's definition.
    Artifact(String),
    /// An entry of the client event table: its label and artifact.
    ClientEvent(String, String),
}

impl Item {
    /// The key it is stored under.
    pub fn key(&self) -> Key {
        match self {
            Item::Client(r) => Key::Client(r.id.clone()),
            Item::Hunt(r) => Key::Hunt(r.id.clone()),
            Item::Participant { hunt, client, .. } => {
                Key::Participant(hunt.clone(), client.clone())
            }
            Item::Task { client, flow, .. } => Key::Task(client.clone(), flow.clone()),
            Item::Flow(f) => Key::Flow(f.client.clone(), f.flow.clone()),
            Item::Cursor { node, .. } => Key::Cursor(node.clone()),
            Item::Audit(e) => Key::Audit(e.time, e.id),
            Item::Artifact { name, .. } => Key::Artifact(name.clone()),
            Item::ClientEvent {
                label, artifact, ..
            } => Key::ClientEvent(label.clone(), artifact.clone()),
        }
    }
}

/// What the master asks its shell to do.
#[derive(Clone, Debug, PartialEq)]
pub enum MasterAction {
    /// Write these items atomically, then call [`Master::handle_written`] with the token.
    Write {
        /// Names the write.
        token: Token,
        /// What to write.
        items: Vec<Item>,
    },
    /// Delete an acknowledged task's record, then call [`Master::handle_written`] with the token.
    DeleteTask {
        /// Names the delete.
        token: Token,
        /// The client.
        client: ClientId,
        /// The task's flow.
        flow: FlowId,
    },
    /// Push a task to a client connected to this node (paced; a drop is made good by the resend).
    Push {
        /// The client.
        client: ClientId,
        /// The task.
        task: comms::Task,
    },
    /// Send a message on a minion's replication stream; if it cannot be queued, drop the stream
    /// ([`Master::handle_minion_down`] with `conn`): the minion resynchronises when it reconnects.
    ToMinion {
        /// The minion.
        node: String,
        /// Its stream.
        conn: u64,
        /// The message.
        message: pc::MasterMessage,
    },
    /// Warm the cache with these flow records (a batch of events about to read them).
    Prefetch {
        /// The flows.
        flows: Vec<(ClientId, FlowId)>,
    },
    /// Record a minion's completed flow (the intake's completions machine), then call
    /// [`Master::handle_applied`] with `origin`.
    Complete {
        /// The minion and the event's cursor.
        origin: (String, Cursor),
        /// The completion.
        completed: pc::FlowCompleted,
    },
    /// A hunt outcome asked for with [`Master::handle_hunt_outcome`] is recorded (`Done`) or not.
    HuntRecorded {
        /// The intake's token.
        token: Token,
        /// How it ended.
        outcome: Outcome,
    },
    /// Mark a flow's record failed with `error`, unless it is final already (its agent finished
    /// it first), then call [`Master::handle_written`] with the token.
    FailFlow {
        /// Names the write.
        token: Token,
        /// The client.
        client: ClientId,
        /// The flow.
        flow: FlowId,
        /// Why it failed.
        error: String,
    },
    /// Tell a client connected here to stop a flow (a drop is harmless: the flow just runs on).
    CancelHere {
        /// The client.
        client: ClientId,
        /// The message.
        cancel: comms::CancelFlow,
    },
    /// Answer a request.
    Reply {
        /// The request's token (the caller's).
        request: Token,
        /// The answer.
        result: Result<Answer, RequestError>,
    },
    /// Something worth logging.
    Notice(Notice),
}

/// Who asks: the analyst behind a request, and the id of the audit entry a change writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analyst {
    /// The API user (the common name of the certificate the call came over).
    pub user: String,
    /// A fresh random id (the shell draws it): with the time, it names the audit entry.
    pub audit_id: u64,
}

/// What an audited change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuditAction {
    /// Collected an artifact from a client (`target`: the client; `detail`: flow, artifact and
    /// parameters).
    Collect,
    /// Added a label (`target`: the client; `detail`: the label).
    LabelAdd,
    /// Removed a label.
    LabelRemove,
    /// Created a hunt (`target`: the hunt; `detail`: the artifact and parameters).
    HuntCreate,
    /// Stopped a hunt.
    HuntStop,
    /// Cancelled a flow (`target`: the client; `detail`: the flow and the reason).
    Cancel,
    /// Added or replaced a custom artifact (`target`: its name; `detail`: its definition).
    ArtifactAdd,
    /// Removed a custom artifact (`target`: its name).
    ArtifactRemove,
    /// Set an entry of the client event table (`target`: the artifact and label; `detail`: the
    /// entry's parameters).
    EventsSet,
    /// Removed an entry of the client event table.
    EventsUnset,
    /// Added a GUI user (`target`: the user; `detail`: the role).
    UserAdd,
    /// Changed a GUI user's password or role (`detail`: what changed).
    UserChange,
    /// Removed a GUI user.
    UserRemove,
}

impl AuditAction {
    /// Its name in the audit log.
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::Collect => "collect",
            AuditAction::LabelAdd => "label-add",
            AuditAction::LabelRemove => "label-remove",
            AuditAction::HuntCreate => "hunt-create",
            AuditAction::HuntStop => "hunt-stop",
            AuditAction::Cancel => "cancel",
            AuditAction::ArtifactAdd => "artifact-add",
            AuditAction::ArtifactRemove => "artifact-remove",
            AuditAction::EventsSet => "events-set",
            AuditAction::EventsUnset => "events-unset",
            AuditAction::UserAdd => "user-add",
            AuditAction::UserChange => "user-change",
            AuditAction::UserRemove => "user-remove",
        }
    }

    /// The action named `name`.
    pub fn parse(name: &str) -> Option<AuditAction> {
        [
            AuditAction::Collect,
            AuditAction::LabelAdd,
            AuditAction::LabelRemove,
            AuditAction::HuntCreate,
            AuditAction::HuntStop,
            AuditAction::Cancel,
            AuditAction::ArtifactAdd,
            AuditAction::ArtifactRemove,
            AuditAction::EventsSet,
            AuditAction::EventsUnset,
            AuditAction::UserAdd,
            AuditAction::UserChange,
            AuditAction::UserRemove,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }
}

/// One entry of the audit log: a change an analyst asked for and the master accepted. Written
/// with the change's own writes; a change answered with success has its entry on storage (one
/// answered `unavailable` may have an entry and not have happened: the log records what was asked
/// and accepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// With `time`, names the entry.
    pub id: u64,
    /// When the master accepted it.
    pub time: Timestamp,
    /// Who asked.
    pub user: String,
    /// What.
    pub action: AuditAction,
    /// On what: a client id or a hunt id.
    pub target: String,
    /// Details: the label, or the flow and artifact.
    pub detail: String,
}

/// An analyst's request (the API's calls on the master).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Clients matching a query (`all`, `host:`, `label:`, `ip:`, an id, a bare word).
    Search {
        /// The query.
        query: String,
        /// The order of the matches.
        sort: crate::registry::SortKey,
        /// Reversed.
        descending: bool,
        /// Skip this many matches.
        offset: usize,
        /// At most this many.
        limit: usize,
    },
    /// Clients enrolled and connected, per node (the node holding each client's connection, or
    /// that last held it).
    ClientCounts,
    /// How many enrolled clients a hunt of these labels and OS would take now.
    Estimate {
        /// A client must carry every one.
        include_labels: BTreeSet<String>,
        /// A client carrying any is left out.
        exclude_labels: BTreeSet<String>,
        /// Only this OS (any case).
        os: Option<String>,
    },
    /// Add or remove a client's label.
    Label {
        /// The client.
        client: ClientId,
        /// The label.
        label: String,
        /// Remove it.
        remove: bool,
    },
    /// Collect an artifact (validated) from a client.
    Collect(Box<NewFlow>),
    /// Start a hunt.
    CreateHunt {
        /// Its id (the shell draws it).
        id: HuntId,
        /// What it runs where.
        spec: HuntSpec,
    },
    /// Stop a hunt.
    StopHunt(HuntId),
    /// Cancel a client's flow: one not yet started is marked failed and never runs; one running
    /// is told to stop (its agent reports it failed).
    Cancel {
        /// The client.
        client: ClientId,
        /// The flow.
        flow: FlowId,
        /// Why (shown in the flow's error).
        reason: String,
    },
    /// Every hunt, or one.
    Hunts(Option<HuntId>),
    /// A hunt's participants and their flows.
    HuntFlows(HuntId),
    /// The minions known.
    Minions,
    /// Add (or replace) a custom artifact's definition, or remove it (`definition` none). The shell
    /// has checked the definition and whether the name is taken; this writes it with its audit
    /// entry.
    PutArtifact {
        /// The artifact's name.
        name: String,
        /// Its definition (YAML); `None` removes it.
        definition: Option<String>,
    },
    /// Records a change of a GUI user in the audit log (the users' files are the shell's, outside
    /// the datastore): answered once the entry is durable, before the shell changes the file.
    RecordUser {
        /// What was done: [`AuditAction::UserAdd`], [`AuditAction::UserChange`] or
        /// [`AuditAction::UserRemove`] (anything else is refused).
        action: AuditAction,
        /// The user.
        name: String,
        /// What the audit log shows of it (the role; never a password).
        detail: String,
    },
    /// Set (or replace) an entry of the client event table, or remove it (`entry` none). The shell
    /// has checked the artifact and its parameters and made the entry; this writes it with its
    /// audit entry (`detail`: what the audit log shows of it).
    SetClientEvent {
        /// Whose clients (a label, or `events::ALL_CLIENTS`).
        label: String,
        /// The event artifact.
        artifact: String,
        /// The entry (JSON); `None` removes it.
        entry: Option<String>,
        /// Its parameters as the audit log shows them.
        detail: String,
    },
}

/// A request's successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A client connected here is recorded.
    Connected,
    /// Search results.
    Clients {
        /// The records of the page, in the order asked for.
        clients: Vec<ClientRecord>,
        /// More matched after them.
        truncated: bool,
        /// How many matched in all.
        total: usize,
    },
    /// Per node: (node, clients enrolled whose connection it holds or last held, of them connected
    /// now), by node name.
    ClientCounts(Vec<(String, u64, u64)>),
    /// A hunt estimate: enrolled clients that match, and of them connected now.
    Estimate {
        /// Matching clients.
        clients: u64,
        /// Of them connected.
        connected: u64,
    },
    /// A client's record.
    Client(Box<ClientRecord>),
    /// A collection is scheduled.
    Flow(Box<NewFlow>),
    /// One hunt.
    Hunt(Box<HuntView>),
    /// Hunts.
    Hunts(Vec<HuntView>),
    /// A hunt's participants (by client id) and their flows, with the rows each stored once it
    /// ended (None while it runs): the counts the hunt's stats add up.
    Participants(Vec<(ClientId, FlowId, Option<u64>)>),
    /// The minions known.
    Minions(Vec<MinionView>),
    /// A custom artifact's definition is written (or removed).
    ArtifactPut,
    /// An entry of the client event table is written (or removed).
    ClientEventSet,
    /// A user change's audit entry is durable.
    Recorded,
    /// A flow is cancelled.
    Cancelled {
        /// Its task had not been acknowledged: it is marked failed and will not run.
        before_start: bool,
        /// Its client was connected and is told to stop it.
        told: bool,
    },
}

/// A hunt as answered: its record and exact figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuntView {
    /// The record.
    pub record: HuntRecord,
    /// Its statistics.
    pub stats: HuntStats,
}

/// A minion as answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinionView {
    /// Its name.
    pub node: String,
    /// Its replication stream is up.
    pub connected: bool,
    /// Its cursor as last made durable.
    pub durable: Option<Cursor>,
    /// What it holds that this master has not made durable, as of its last message on the stream
    /// up now (None: not connected, or it did not say).
    pub backlog: Option<Backlog>,
}

/// A minion's replication backlog (docs/operations.md, "Cluster status").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Events it holds that are not durable here.
    pub events: u64,
    /// When the oldest of them was made, on this master's clock (None when there are none).
    pub oldest_ms: Option<u64>,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What to tell the caller.
    pub message: String,
}

/// The kinds of request errors (each maps to a gRPC status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed.
    Invalid,
    /// What it names does not exist.
    NotFound,
    /// Not in the state the request needs.
    Precondition,
    /// Storage did not take it: try again.
    Unavailable,
    /// A bound is reached.
    Exhausted,
    /// Refused (a client's key).
    Denied,
}

impl RequestError {
    fn new(kind: ErrorKind, message: impl fmt::Display) -> RequestError {
        RequestError {
            kind,
            message: message.to_string(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How bad a [`Notice`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Expected, worth a line.
    Info,
    /// Retried or degraded.
    Warn,
    /// A bug or lost data.
    Error,
}

/// Something the master decided that an operator should see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// How bad.
    pub level: Level,
    /// What happened.
    pub message: String,
}

/// A write's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFailure {
    /// `Refused` (certainly not written) or `Unknown` (maybe written).
    pub outcome: Outcome,
    /// The datastore's error.
    pub message: String,
}

/// A planted fault, to prove the harness's checks catch it.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plant {
    None,
    /// A refused participant group is not undone in the hunt manager.
    KeepRefused,
    /// At the task bound the participant is recorded with no task.
    KeepAtBound,
    /// A request is answered before its writes end.
    ReplyEarly,
    /// A minion's cursor counts as durable without being written.
    CursorUnwritten,
    /// Writes of one key are not held behind the one in flight.
    Unordered,
    /// A change is answered without its audit entry.
    NoAudit,
}

#[derive(Debug)]
enum Effect {
    /// A task's record (the book's token).
    Task(Token),
    Delete(ClientId, FlowId),
    Client(ClientId),
    Participant(HuntId, ClientId, Participation),
    Hunt,
    Cursor(String, Cursor),
    /// An audit entry written alone (its change wrote nothing).
    Audit,
    /// A cancelled flow's record marked failed.
    FailFlow,
    /// A custom artifact's definition.
    Artifact,
    /// Written by a plant without a task.
    #[cfg(test)]
    Planted,
}

#[derive(Debug)]
struct InFlight {
    effect: Effect,
    /// The waits it belongs to.
    waits: Vec<u64>,
    /// The keys it writes (busy while it is in flight).
    keys: Vec<Key>,
}

/// What ends when a wait's writes have ended.
#[derive(Debug)]
enum Then {
    Reply(Token, Asked),
    /// A cancelled task is withdrawn (if the writes before it are done).
    Withdraw(Box<Withdrawal>),
    Applied(String, Cursor),
    /// A hunt outcome is recorded (or not): the intake's token, the participant.
    HuntOutcome(Token, HuntId, ClientId),
}

impl Then {
    /// Whether a write of `key` in flight bears on what this answers (see [`Master::finish`]).
    fn answers_about(&self, key: &Key) -> bool {
        match (self, key) {
            (Then::Reply(_, Asked::Connected(id) | Asked::Label(id)), Key::Client(c)) => id == c,
            (Then::Reply(_, Asked::Hunts | Asked::Hunt(_)), Key::Hunt(_)) => true,
            (Then::Withdraw(w), Key::Participant(h, c)) => {
                w.hunt.as_ref() == Some(h) && &w.client == c
            }
            (Then::HuntOutcome(_, h, c), Key::Participant(kh, kc)) => h == kh && c == kc,
            _ => false,
        }
    }
}

/// A cancelled task to withdraw ([`Master::withdraw`]).
#[derive(Debug)]
struct Withdrawal {
    request: Token,
    client: ClientId,
    flow: FlowId,
    /// The hunt whose participant it is.
    hunt: Option<HuntId>,
    error: String,
    told: bool,
}

#[derive(Debug)]
enum Asked {
    Connected(ClientId),
    Label(ClientId),
    Collect(Box<NewFlow>),
    CreateHunt(HuntId),
    StopHunt(HuntId),
    Cancel { before_start: bool, told: bool },
    Hunts,
    Hunt(HuntId),
    Artifact,
    ClientEvent,
    Recorded,
}

#[derive(Debug)]
struct Wait {
    left: usize,
    worst: Outcome,
    why: String,
    then: Then,
}

#[derive(Debug)]
struct Link {
    conn: u64,
    /// How far the minion's clock is behind ours (ms; negative: ahead), measured on its last batch.
    behind_ms: i128,
    /// Its outbox as of its last message: epoch, newest event, and when the oldest event it held
    /// unacknowledged was made (on our clock).
    outbox: Option<(u64, u64, Option<u64>)>,
}

impl Link {
    /// Takes a minion's report of its outbox (with its clock offset measured on the same message).
    fn reported(&mut self, now_ms: u64, report: OutboxReport) {
        if report.sent_unix_ms != 0 {
            self.behind_ms = i128::from(now_ms) - i128::from(report.sent_unix_ms);
        }
        let oldest = (report.oldest_unix_ms != 0).then(|| {
            let ours = i128::from(report.oldest_unix_ms) + self.behind_ms;
            u64::try_from(ours.clamp(0, i128::from(now_ms))).unwrap_or(0)
        });
        self.outbox = Some((report.epoch, report.head, oldest));
    }
}

/// The master's policy (module docs).
#[derive(Debug)]
pub struct Master {
    node: String,
    limits: MasterLimits,
    time: Time,
    registry: Registry,
    hunts: HuntManager,
    tasks: TaskBook<comms::Task, TaskOrigin>,
    inbox: Inbox<Result<Event, String>>,
    links: BTreeMap<String, Link>,
    next_conn: u64,
    next_token: u64,
    next_wait: u64,
    in_flight: BTreeMap<Token, InFlight>,
    waits: BTreeMap<u64, Wait>,
    /// Tokens of the writes the request being handled causes (see [`Master::finish`]).
    capture: Option<Vec<Token>>,
    /// The audit entry of the change being handled, until it rides with the change's first write.
    audit: Option<Box<AuditEntry>>,
    /// The items a task's write carries with it, by the book's token.
    groups: BTreeMap<Token, Vec<Item>>,
    /// The latest client-record write in flight per client, and whether its labels changed.
    relabelled: BTreeMap<ClientId, (Token, bool)>,
    /// Keys with a write in flight, and writes held until their keys are free (in order).
    busy: BTreeSet<Key>,
    held: VecDeque<(Vec<Key>, MasterAction)>,
    actions: VecDeque<MasterAction>,
    #[cfg(test)]
    pub(crate) plant: Plant,
}

impl Master {
    /// A master named `node` (`<hostname>-<port>`), restarted from `restored`.
    pub fn restore(node: String, limits: MasterLimits, time: Time, restored: Restored) -> Master {
        Master {
            registry: Registry::restore(limits.registry.clone(), restored.clients),
            hunts: restored.hunts,
            tasks: TaskBook::restore(limits.tasks.clone(), time.at, restored.pending),
            inbox: Inbox::recover(limits.inbox.clone(), restored.cursors),
            node,
            limits,
            time,
            links: BTreeMap::new(),
            next_conn: 1,
            next_token: 1,
            next_wait: 1,
            in_flight: BTreeMap::new(),
            waits: BTreeMap::new(),
            capture: None,
            audit: None,
            groups: BTreeMap::new(),
            relabelled: BTreeMap::new(),
            busy: BTreeSet::new(),
            held: VecDeque::new(),
            actions: VecDeque::new(),
            #[cfg(test)]
            plant: Plant::None,
        }
    }

    /// The client registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The hunts.
    pub fn hunts(&self) -> &HuntManager {
        &self.hunts
    }

    /// Tasks not yet acknowledged.
    pub fn tasks(&self) -> &TaskBook<comms::Task, TaskOrigin> {
        &self.tasks
    }

    /// Every minion known (connected now, or with a cursor).
    pub fn minions(&self) -> Vec<MinionView> {
        let names: BTreeSet<&str> = self
            .inbox
            .minions()
            .map(|(n, _)| n)
            .chain(self.links.keys().map(String::as_str))
            .collect();
        names
            .into_iter()
            .map(|n| {
                let durable = self.inbox.durable(n);
                let backlog =
                    self.links
                        .get(n)
                        .and_then(|l| l.outbox)
                        .map(|(epoch, head, oldest)| {
                            let done = durable.filter(|c| c.epoch == epoch).map_or(0, |c| c.hwm);
                            let events = head.saturating_sub(done);
                            Backlog {
                                events,
                                oldest_ms: oldest.filter(|_| events > 0),
                            }
                        });
                MinionView {
                    node: n.to_owned(),
                    connected: self.links.contains_key(n),
                    durable,
                    backlog,
                }
            })
            .collect()
    }

    // ---- Clients connected to this node.

    /// A client connected here. Refused at once if the registry refuses it; else answered
    /// (`request`) once its record is written, and then sent its pending tasks and offered the
    /// running hunts.
    pub fn handle_connected(
        &mut self,
        time: Time,
        request: Token,
        sighting: Sighting,
    ) -> Result<(), RegistryError> {
        self.time = time;
        let id = sighting.id.clone();
        self.begin();
        if let Err(e) = self.registry.handle_seen(time.now, time.at, sighting) {
            self.capture = None;
            return Err(e);
        }
        self.finish(Then::Reply(request, Asked::Connected(id)));
        self.drain();
        Ok(())
    }

    /// A client's connection here ended.
    pub fn handle_disconnected(&mut self, time: Time, client: &ClientId) {
        self.time = time;
        self.registry
            .set_disconnected(time.now, client, &self.node.clone());
        self.drain();
    }

    /// A client connected here acknowledged a task.
    pub fn handle_task_acked(&mut self, time: Time, client: &ClientId, flow: &FlowId) {
        self.time = time;
        self.task_acked(client, flow);
        self.drain();
    }

    /// A completed flow was delivered, whether or not its task's acknowledgement arrived.
    pub fn handle_delivered(&mut self, time: Time, client: &ClientId, flow: &FlowId) {
        self.time = time;
        self.tasks.handle_acked(client, flow);
        self.drain();
    }

    /// Counts a participant's outcome (the completions machine's step); answered with
    /// [`MasterAction::HuntRecorded`] once it is durable.
    pub fn handle_hunt_outcome(&mut self, time: Time, token: Token, o: &HuntOutcome) {
        self.time = time;
        self.begin();
        self.hunts.handle_outcome(
            time.now,
            &o.hunt,
            &o.client,
            o.state,
            o.rows,
            o.uploaded_bytes,
        );
        self.finish(Then::HuntOutcome(token, o.hunt.clone(), o.client.clone()));
        self.drain();
    }

    // ---- Requests.

    /// An analyst's request; answered with a [`MasterAction::Reply`] naming `request` — at once for
    /// a query, once its writes have ended for a change.
    pub fn handle_request(&mut self, time: Time, request: Token, by: Analyst, req: Request) {
        match req {
            Request::Search {
                query,
                sort,
                descending,
                offset,
                limit,
            } => {
                let r =
                    search(&self.registry, &query, (sort, descending), offset, limit).map(|res| {
                        Answer::Clients {
                            clients: res.clients.into_iter().cloned().collect(),
                            truncated: res.truncated,
                            total: res.total,
                        }
                    });
                self.reply(request, r);
            }
            Request::RecordUser {
                action,
                name,
                detail,
            } => {
                if !matches!(
                    action,
                    AuditAction::UserAdd | AuditAction::UserChange | AuditAction::UserRemove
                ) {
                    let e = RequestError::new(
                        ErrorKind::Invalid,
                        format!("{} is not a user change", action.name()),
                    );
                    return self.reply(request, Err(e));
                }
                self.time = time;
                self.begin();
                self.audit(by, action, name, detail);
                self.finish(Then::Reply(request, Asked::Recorded));
                self.drain();
            }
            Request::ClientCounts => {
                let r = Ok(Answer::ClientCounts(self.registry.counts_by_node()));
                self.reply(request, r);
            }
            Request::Estimate {
                include_labels,
                exclude_labels,
                os,
            } => {
                let (clients, connected) =
                    self.registry
                        .count_matching(&include_labels, &exclude_labels, os.as_deref());
                self.reply(request, Ok(Answer::Estimate { clients, connected }));
            }
            Request::Label {
                client,
                label,
                remove,
            } => self.label(time, request, by, &client, &label, remove),
            Request::Collect(flow) => self.collect(time, request, by, *flow),
            Request::CreateHunt { id, spec } => self.create_hunt(time, request, by, id, spec),
            Request::StopHunt(id) => self.stop_hunt(time, request, by, &id),
            Request::Cancel {
                client,
                flow,
                reason,
            } => self.cancel(time, request, by, client, flow, reason),
            Request::PutArtifact { name, definition } => {
                self.put_artifact(time, request, by, name, definition)
            }
            Request::SetClientEvent {
                label,
                artifact,
                entry,
                detail,
            } => {
                self.time = time;
                self.begin();
                let action = if entry.is_some() {
                    AuditAction::EventsSet
                } else {
                    AuditAction::EventsUnset
                };
                let target = if label == crate::events::ALL_CLIENTS {
                    format!("{artifact} (all clients)")
                } else {
                    format!("{artifact} (label {label})")
                };
                self.audit(by, action, target, detail);
                let item = Item::ClientEvent {
                    label,
                    artifact,
                    entry,
                };
                self.write(Effect::Artifact, vec![item]);
                self.finish(Then::Reply(request, Asked::ClientEvent));
                self.drain();
            }
            Request::Hunts(one) => self.get_hunts(time, request, one),
            Request::HuntFlows(id) => {
                let r = match self.hunts.get(&id) {
                    Some(h) => Ok(Answer::Participants(
                        h.participants()
                            .map(|(c, p)| {
                                let rows = match p {
                                    Participation::Scheduled => None,
                                    Participation::Completed { rows, .. }
                                    | Participation::Error { rows, .. } => Some(*rows),
                                };
                                (c.clone(), FlowId::for_hunt(&id, c), rows)
                            })
                            .collect(),
                    )),
                    None => Err(no_hunt(&id)),
                };
                self.reply(request, r);
            }
            Request::Minions => {
                let r = Ok(Answer::Minions(self.minions()));
                self.reply(request, r);
            }
        }
    }

    /// Adds or removes a client's label.
    fn label(
        &mut self,
        time: Time,
        request: Token,
        by: Analyst,
        client: &ClientId,
        label: &str,
        remove: bool,
    ) {
        self.time = time;
        self.begin();
        let action = if remove {
            AuditAction::LabelRemove
        } else {
            AuditAction::LabelAdd
        };
        self.audit(by, action, client.to_string(), label.to_owned());
        if let Err(e) = self.registry.set_label(client, label, remove) {
            self.capture = None;
            self.audit = None;
            let kind = match e {
                RegistryError::UnknownClient(_) => ErrorKind::NotFound,
                RegistryError::TooManyLabels { .. } => ErrorKind::Exhausted,
                _ => ErrorKind::Invalid,
            };
            return self.reply(request, Err(RequestError::new(kind, e)));
        }
        self.finish(Then::Reply(request, Asked::Label(client.clone())));
        self.drain();
    }

    /// Collects `artifact` (validated) from a client: its task and flow record are written
    /// together, then it is sent toward the client.
    fn collect(&mut self, time: Time, request: Token, by: Analyst, flow: NewFlow) {
        self.time = time;
        if self.registry.get(&flow.client).is_none() {
            let e = format!(
                "no client {} (search with `talon clients search all`)",
                flow.client
            );
            return self.reply(request, Err(RequestError::new(ErrorKind::NotFound, e)));
        }
        let upload_max = self.limits.upload_bytes_max;
        let task = hunt_tasks::task(&flow.flow, &flow.artifact, &flow.params, None, upload_max);
        self.begin();
        let detail = format!(
            "{} {}{}",
            flow.flow,
            flow.artifact,
            audit_params(&flow.params)
        );
        self.audit(by, AuditAction::Collect, flow.client.to_string(), detail);
        let created = self.tasks.create(
            flow.client.clone(),
            flow.flow.clone(),
            task,
            TaskOrigin::Collect,
        );
        match created {
            Ok(token) => {
                self.groups
                    .insert(token, vec![Item::Flow(Box::new(flow.clone()))]);
                self.finish(Then::Reply(request, Asked::Collect(Box::new(flow))));
                self.drain();
            }
            Err(e) => {
                self.capture = None;
                self.audit = None;
                self.reply(request, Err(RequestError::new(ErrorKind::Exhausted, e)));
            }
        }
    }

    /// Creates a running hunt; answered once its record is durable, then offered to every
    /// connected client.
    fn create_hunt(&mut self, time: Time, request: Token, by: Analyst, id: HuntId, spec: HuntSpec) {
        self.time = time;
        self.begin();
        let detail = format!("{}{}", spec.artifact, audit_params(&spec.params));
        self.audit(by, AuditAction::HuntCreate, id.to_string(), detail);
        if let Err(e) = self.hunts.create(time.now, id.clone(), spec) {
            self.capture = None;
            self.audit = None;
            return self.reply(request, Err(hunt_error(e)));
        }
        self.finish(Then::Reply(request, Asked::CreateHunt(id)));
        self.drain();
    }

    /// Writes (or removes) a custom artifact's definition with its audit entry; answered once
    /// both are durable.
    fn put_artifact(
        &mut self,
        time: Time,
        request: Token,
        by: Analyst,
        name: String,
        definition: Option<String>,
    ) {
        self.time = time;
        self.begin();
        let (action, detail) = match &definition {
            Some(d) => (AuditAction::ArtifactAdd, d.clone()),
            None => (AuditAction::ArtifactRemove, String::new()),
        };
        self.audit(by, action, name.clone(), detail);
        self.write(Effect::Artifact, vec![Item::Artifact { name, definition }]);
        self.finish(Then::Reply(request, Asked::Artifact));
        self.drain();
    }

    /// Stops a hunt; answered once its record is written.
    fn stop_hunt(&mut self, time: Time, request: Token, by: Analyst, id: &HuntId) {
        self.time = time;
        self.begin();
        self.audit(by, AuditAction::HuntStop, id.to_string(), String::new());
        if let Err(e) = self.hunts.stop(time.now, id) {
            self.capture = None;
            self.audit = None;
            return self.reply(request, Err(hunt_error(e)));
        }
        self.broadcast(broadcast::Kind::HuntStopped(pc::HuntStopped {
            hunt_id: id.to_string(),
        }));
        self.finish(Then::Reply(request, Asked::StopHunt(id.clone())));
        self.drain();
    }

    /// Cancels a flow: a task not yet acknowledged is withdrawn (its record deleted, the flow's
    /// record marked failed, a hunt participant counted as an error); a client connected anywhere
    /// is told to stop it. A started flow of an offline client cannot be reached: refused.
    fn cancel(
        &mut self,
        time: Time,
        request: Token,
        by: Analyst,
        client: ClientId,
        flow: FlowId,
        reason: String,
    ) {
        self.time = time;
        let Some(rec) = self.registry.get(&client) else {
            let e = RequestError::new(ErrorKind::NotFound, format!("no client {client}"));
            return self.reply(request, Err(e));
        };
        let (connected, node) = (rec.connected, rec.node.clone());
        let pending = self
            .tasks
            .pending(&client)
            .find(|(f, _)| **f == flow)
            .map(|(_, t)| t.clone());
        let refuse = |kind, m: String| Err(RequestError::new(kind, m));
        if self.tasks.is_writing(&client, &flow) {
            let m = format!("flow {flow} is still being scheduled; try again in a moment");
            return self.reply(request, refuse(ErrorKind::Unavailable, m));
        }
        if pending.is_none() && !connected {
            let m = format!(
                "client {client} is offline and flow {flow} already reached it (or never \
                 existed): a started flow can be cancelled only while its client is connected"
            );
            return self.reply(request, refuse(ErrorKind::Precondition, m));
        }
        let error = format!("cancelled by {}: {reason}", by.user);
        self.begin();
        let detail = format!("{flow} {reason}");
        self.audit(by, AuditAction::Cancel, client.to_string(), detail);
        let hunt = pending
            .as_ref()
            .and_then(|t| HuntId::parse(&t.hunt_id).ok());
        let mut pending = pending;
        if let Some(hunt) = &hunt {
            // Counted as failed first; the task is withdrawn only once that is durable (a
            // participant without its outcome keeps its task: see `withdraw`). A task of a hunt
            // this master does not know (its record was never written) is not withdrawn: its
            // participant record would be left scheduled without a task.
            let counted =
                self.hunts
                    .handle_outcome(time.now, hunt, &client, FinalState::Error, 0, 0);
            if counted == OutcomeEffect::NotParticipant {
                pending = None;
            }
        }
        if connected {
            let cancel = comms::CancelFlow {
                flow_id: flow.to_string(),
                reason: error.clone(),
            };
            if node == self.node {
                let client = client.clone();
                self.actions
                    .push_back(MasterAction::CancelHere { client, cancel });
            } else {
                let kind = broadcast::Kind::FlowCancelled(pc::FlowCancelled {
                    client_id: client.to_string(),
                    cancel: Some(cancel),
                });
                self.send_minion(&node, broadcast_message(kind));
            }
        }
        let told = connected;
        let then = match pending {
            Some(_) => Then::Withdraw(Box::new(Withdrawal {
                request,
                client,
                flow,
                hunt,
                error: format!("{error} (before it started)"),
                told,
            })),
            None => Then::Reply(
                request,
                Asked::Cancel {
                    before_start: false,
                    told,
                },
            ),
        };
        self.finish(then);
        self.drain();
    }

    /// A cancelled flow's task is withdrawn once its audit entry (and a hunt participant's
    /// outcome) are durable: sent no more, its record deleted, the flow's record marked failed.
    /// Answered once those writes ended.
    fn withdraw(&mut self, w: Withdrawal) {
        self.begin();
        let outcome_undone = w.hunt.as_ref().is_some_and(|h| {
            self.hunts.get(h).is_some_and(|h| {
                h.participants()
                    .any(|(c, p)| *c == w.client && *p == Participation::Scheduled)
            })
        });
        if outcome_undone || !self.tasks.handle_acked(&w.client, &w.flow) {
            // Acknowledged by its agent meanwhile (it was told to stop), or withdrawn by another
            // cancel: nothing to withdraw here. Or its participant's failed outcome was not
            // written after all (another cancel's write, refused): it keeps its task.
            let asked = Asked::Cancel {
                before_start: false,
                told: w.told,
            };
            return self.finish(Then::Reply(w.request, asked));
        }
        let keys = [Key::Flow(w.client.clone(), w.flow.clone())];
        let token = self.track(Effect::FailFlow, &keys);
        let fail = MasterAction::FailFlow {
            token,
            client: w.client,
            flow: w.flow,
            error: w.error,
        };
        self.emit(keys.to_vec(), fail);
        let asked = Asked::Cancel {
            before_start: true,
            told: w.told,
        };
        self.finish(Then::Reply(w.request, asked));
    }

    /// Lists the hunts (`one`: one hunt), answered once what expired by now is recorded: nothing
    /// is reported that is not durable.
    fn get_hunts(&mut self, time: Time, request: Token, one: Option<HuntId>) {
        self.time = time;
        self.begin();
        self.hunts.handle_timeout(time.now, time.at);
        let asked = match one {
            Some(h) => Asked::Hunt(h),
            None => Asked::Hunts,
        };
        self.finish(Then::Reply(request, asked));
        self.drain();
    }

    /// Sends a message to every connected minion.
    pub fn broadcast(&mut self, kind: broadcast::Kind) {
        let nodes: Vec<String> = self.links.keys().cloned().collect();
        for n in nodes {
            self.send_minion(&n, broadcast_message(kind.clone()));
        }
    }

    // ---- Minions.

    /// A minion's replication stream is up; returns its connection number. Tasks that may have
    /// been lost with its previous stream go again to its clients.
    /// `outbox` is the minion's, as its hello reported it.
    pub fn handle_minion_up(
        &mut self,
        time: Time,
        node: &str,
        outbox: Option<OutboxReport>,
    ) -> u64 {
        self.time = time;
        let conn = self.next_conn;
        self.next_conn += 1;
        let mut link = Link {
            conn,
            behind_ms: 0,
            outbox: None,
        };
        if let Some(report) = outbox {
            link.reported(time.now.as_ms(), report);
        }
        self.links.insert(node.to_owned(), link);
        let clients: Vec<ClientId> = self
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
        conn
    }

    /// A minion's replication stream `conn` ended (a later one is kept).
    pub fn handle_minion_down(&mut self, node: &str, conn: u64) -> bool {
        if self.links.get(node).is_some_and(|l| l.conn == conn) {
            self.links.remove(node);
            return true;
        }
        false
    }

    /// A batch of a minion's events on stream `conn`: applied in order, its cursor persisted after
    /// their effects, acknowledged no further than the durable cursor.
    pub fn handle_batch(&mut self, time: Time, node: &str, conn: u64, batch: MinionBatch) {
        self.time = time;
        let MinionBatch {
            epoch,
            events,
            sent_unix_ms,
            outbox,
        } = batch;
        // How far the minion's clock is behind ours, measured on this batch (with its transit:
        // milliseconds, against clocks that may differ by hours). Times it reports are moved onto
        // our clock with it.
        let behind_ms = if sent_unix_ms == 0 {
            0
        } else {
            i128::from(time.now.as_ms()) - i128::from(sent_unix_ms)
        };
        match self.links.get_mut(node) {
            Some(l) if l.conn == conn => {
                l.behind_ms = behind_ms;
                if let Some(report) = outbox {
                    l.reported(time.now.as_ms(), report);
                }
            }
            _ => return, // A stream that was replaced; the minion resends on the new one.
        }
        let flows: Vec<(ClientId, FlowId)> = events
            .iter()
            .filter_map(|(_, e)| {
                let (c, f) = match e {
                    Ok(Event::TaskDelivered(t)) => (&t.client_id, &t.flow_id),
                    Ok(Event::FlowCompleted(f)) => (&f.client_id, &f.flow_id),
                    _ => return None,
                };
                Some((ClientId::parse(c).ok()?, FlowId::parse(f).ok()?))
            })
            .collect();
        if let Err(e) = self.inbox.handle_batch(time.at, node, epoch, events) {
            self.notice(
                Level::Warn,
                format!("refused a replication batch from {node}: {e}"),
            );
            let expected = self.inbox.cursor(node).map_or(1, |c| c.hwm + 1);
            let current_epoch = match e {
                InboxError::StaleEpoch { current, .. } => current,
                InboxError::TooManyMinions { .. } => 0,
            };
            let message = pc::MasterMessage {
                kind: Some(master_message::Kind::Error(pc::ReplError {
                    message: e.to_string(),
                    expected_seq: expected,
                    current_epoch,
                })),
            };
            return self.send_minion(node, message);
        }
        if flows.len() > 1 {
            self.actions.push_back(MasterAction::Prefetch { flows });
        }
        self.drain();
    }

    /// A minion's completion asked for with [`MasterAction::Complete`] was recorded (`Done`) or
    /// not (it stays unacknowledged, and the minion sends it again).
    pub fn handle_applied(&mut self, time: Time, origin: (String, Cursor), outcome: Outcome) {
        self.time = time;
        let (node, cursor) = origin;
        self.inbox.handle_applied(&node, cursor, outcome);
        self.drain();
    }

    // ---- Effects' results and time.

    /// A write or delete asked for with `token` ended.
    pub fn handle_written(&mut self, time: Time, token: Token, result: Result<(), WriteFailure>) {
        self.time = time;
        let Some(f) = self.in_flight.remove(&token) else {
            return;
        };
        let (outcome, why) = match result {
            Ok(()) => (Outcome::Done, String::new()),
            Err(e) => (e.outcome, e.message),
        };
        self.release(&f.keys);
        self.effect_ended(token, f.effect, outcome);
        self.drain();
        for w in f.waits {
            self.wait_ended(w, outcome, why.clone());
        }
        self.drain();
    }

    /// Deadlines: tasks sent again, hunt schedules retried, hunts expired.
    pub fn handle_timeout(&mut self, time: Time) {
        self.time = time;
        if self.tasks.poll_timeout().is_some_and(|t| time.at >= t) {
            self.tasks.handle_timeout(time.at);
        }
        self.hunts.handle_timeout(time.now, time.at);
        self.drain();
    }

    /// The next monotonic deadline.
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        crate::time::earliest(self.tasks.poll_timeout(), self.hunts.poll_retry())
    }

    /// The next hunt expiry (wall clock).
    pub fn poll_expiry(&self) -> Option<Timestamp> {
        self.hunts.poll_timeout()
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<MasterAction> {
        self.actions.pop_front()
    }

    // ---- Internals.

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn reply(&mut self, request: Token, result: Result<Answer, RequestError>) {
        self.actions
            .push_back(MasterAction::Reply { request, result });
    }

    fn notice(&mut self, level: Level, message: String) {
        self.actions
            .push_back(MasterAction::Notice(Notice { level, message }));
    }

    fn send_minion(&mut self, node: &str, message: pc::MasterMessage) {
        if let Some(l) = self.links.get(node) {
            let conn = l.conn;
            self.actions.push_back(MasterAction::ToMinion {
                node: node.to_owned(),
                conn,
                message,
            });
        }
    }

    /// Starts capturing the writes the input being handled causes.
    fn begin(&mut self) {
        debug_assert!(self.capture.is_none(), "captures do not nest");
        self.capture = Some(Vec::new());
    }

    /// Ends the capture: `then` happens once the writes captured (after draining the machines'
    /// actions) have ended — at once if there are none. A request also waits for the writes in
    /// flight of what it answers about (a client's record written for an earlier connection, a
    /// hunt's record), so that its answer is durable.
    fn finish(&mut self, then: Then) {
        self.drain_machines();
        if let Some(entry) = self.audit.take() {
            // The change wrote nothing (a label already there): the entry goes alone.
            self.write(Effect::Audit, vec![Item::Audit(entry)]);
        }
        let mut tokens = self.capture.take().unwrap_or_default();
        // Besides its own writes, it waits for the writes in flight (or held) of what it answers
        // about: a client's record written for an earlier connection or label; a hunt's record;
        // a participant's outcome counted by another cancel or another node's report (a task is
        // withdrawn, an outcome reported recorded, only once that is durable).
        tokens.extend(
            self.in_flight
                .iter()
                .filter(|(_, f)| f.keys.iter().any(|k| then.answers_about(k)))
                .map(|(t, _)| *t),
        );
        tokens.sort();
        tokens.dedup();
        #[cfg(test)]
        if self.plant == Plant::ReplyEarly && matches!(then, Then::Reply(..)) {
            tokens.clear();
        }
        let id = self.next_wait;
        self.next_wait += 1;
        let mut left = 0;
        for t in tokens {
            if let Some(f) = self.in_flight.get_mut(&t) {
                f.waits.push(id);
                left += 1;
            }
        }
        let wait = Wait {
            left,
            worst: Outcome::Done,
            why: String::new(),
            then,
        };
        if left == 0 {
            self.fire(wait);
        } else {
            self.waits.insert(id, wait);
        }
    }

    fn wait_ended(&mut self, id: u64, outcome: Outcome, why: String) {
        let Some(w) = self.waits.get_mut(&id) else {
            return;
        };
        w.left -= 1;
        let rank = |o: Outcome| match o {
            Outcome::Done => 0,
            Outcome::Refused => 1,
            Outcome::Unknown => 2,
        };
        if rank(outcome) > rank(w.worst) {
            w.worst = outcome;
            w.why = why;
        }
        if w.left == 0
            && let Some(w) = self.waits.remove(&id)
        {
            self.fire(w);
        }
    }

    /// A wait's writes have all ended, the worst way `w.worst`.
    fn fire(&mut self, w: Wait) {
        match w.then {
            Then::Reply(request, asked) => {
                let result = self.answer(asked, w.worst, &w.why);
                self.reply(request, result);
            }
            Then::Withdraw(c) if w.worst == Outcome::Done => self.withdraw(*c),
            Then::Withdraw(c) => {
                // Not withdrawn: the task stays pending and runs; the analyst may try again.
                let asked = Asked::Cancel {
                    before_start: true,
                    told: c.told,
                };
                let result = self.answer(asked, w.worst, &w.why);
                self.reply(c.request, result);
            }
            // Its writes ended (a client record not written is written with its next change; a
            // task delete is retried by the book): the cursor may cover it.
            Then::Applied(node, cursor) => self.inbox.handle_applied(&node, cursor, Outcome::Done),
            Then::HuntOutcome(token, ..) => {
                // A participant record not written was undone (`handle_outcome_failed`) and comes
                // again with the resend.
                let outcome = if w.worst == Outcome::Done {
                    Outcome::Done
                } else {
                    Outcome::Unknown
                };
                self.actions
                    .push_back(MasterAction::HuntRecorded { token, outcome });
            }
        }
    }

    fn answer(&mut self, asked: Asked, worst: Outcome, why: &str) -> Result<Answer, RequestError> {
        let unavailable = |what: &str| {
            let maybe = if worst == Outcome::Unknown {
                " (the master stopped while writing it: it may have happened; look again once the \
                 master is back)"
            } else {
                ""
            };
            Err(RequestError::new(
                ErrorKind::Unavailable,
                format!("datastore: {why}; {what}, try again{maybe}"),
            ))
        };
        match asked {
            Asked::Connected(id) => {
                if worst != Outcome::Done {
                    return unavailable("the client's record was not written");
                }
                self.send_pending(&id);
                self.offer_hunts(&id);
                Ok(Answer::Connected)
            }
            Asked::Label(id) => match (worst, self.registry.get(&id)) {
                (Outcome::Done, Some(r)) => Ok(Answer::Client(Box::new(r.clone()))),
                (Outcome::Done, None) => Err(RequestError::new(
                    ErrorKind::NotFound,
                    format!("no client {id}"),
                )),
                _ => unavailable("the label is not recorded"),
            },
            Asked::Artifact => match worst {
                Outcome::Done => Ok(Answer::ArtifactPut),
                _ => unavailable("the artifact's definition is not recorded"),
            },
            Asked::Recorded => match worst {
                Outcome::Done => Ok(Answer::Recorded),
                _ => unavailable("the change's audit entry is not recorded"),
            },
            Asked::ClientEvent => match worst {
                Outcome::Done => Ok(Answer::ClientEventSet),
                _ => unavailable("the client event table's entry is not recorded"),
            },
            Asked::Collect(flow) => match worst {
                Outcome::Done => Ok(Answer::Flow(flow)),
                _ => unavailable("the collection was not scheduled"),
            },
            Asked::CreateHunt(id) => {
                if worst != Outcome::Done {
                    // Forgotten, not left running with nothing on storage.
                    self.hunts.handle_create_failed(&id);
                    return unavailable("the hunt was not created");
                }
                self.notice(Level::Info, format!("hunt {id} created"));
                // As durable now: the offers below schedule participants whose writes follow.
                let answer = self.hunt_view(&id);
                self.broadcast(broadcast::Kind::HuntStarted(pc::HuntStarted {
                    hunt_id: id.to_string(),
                }));
                // Every client connected to any node is offered it now; later ones on connecting.
                let connected: Vec<ClientId> =
                    self.registry.connected().map(|r| r.id.clone()).collect();
                for c in connected {
                    self.offer_to_connected(&id, &c);
                }
                answer
            }
            Asked::Cancel { before_start, told } => match worst {
                Outcome::Done => Ok(Answer::Cancelled { before_start, told }),
                _ => unavailable("the cancellation is not recorded"),
            },
            Asked::StopHunt(id) => match worst {
                Outcome::Done => self.hunt_view(&id),
                _ => unavailable("the hunt's stop is not recorded yet"),
            },
            Asked::Hunts | Asked::Hunt(_) if worst != Outcome::Done => {
                unavailable("a hunt's change is not recorded yet")
            }
            Asked::Hunts => Ok(Answer::Hunts(self.hunts.list().map(view).collect())),
            Asked::Hunt(id) => self.hunt_view(&id),
        }
    }

    fn hunt_view(&self, id: &HuntId) -> Result<Answer, RequestError> {
        match self.hunts.get(id) {
            Some(h) => Ok(Answer::Hunt(Box::new(view(h)))),
            None => Err(no_hunt(id)),
        }
    }

    /// Notes the audit entry of the change being handled: it rides with the change's first write
    /// (atomically: the entry and the change are on storage together or neither is), or goes alone
    /// when the capture ends.
    fn audit(&mut self, by: Analyst, action: AuditAction, target: String, detail: String) {
        #[cfg(test)]
        if self.plant == Plant::NoAudit {
            return;
        }
        self.audit = Some(Box::new(AuditEntry {
            id: by.audit_id,
            time: self.time.now,
            user: by.user,
            action,
            target,
            detail,
        }));
    }

    /// Asks for an atomic write (with the pending audit entry, if a change is being handled).
    fn write(&mut self, effect: Effect, mut items: Vec<Item>) -> Token {
        if self.capture.is_some()
            && let Some(entry) = self.audit.take()
        {
            items.push(Item::Audit(entry));
        }
        let keys: Vec<Key> = items.iter().map(Item::key).collect();
        let token = self.track(effect, &keys);
        self.emit(keys, MasterAction::Write { token, items });
        token
    }

    /// Names an effect in flight (captured for the request being handled, if any).
    fn track(&mut self, effect: Effect, keys: &[Key]) -> Token {
        let token = self.token();
        let keys = keys.to_vec();
        let waits = Vec::new();
        self.in_flight.insert(
            token,
            InFlight {
                effect,
                waits,
                keys,
            },
        );
        if let Some(c) = &mut self.capture {
            c.push(token);
        }
        token
    }

    /// Asks for a write of `keys` now, or holds it until no earlier write of its keys is in
    /// flight or held.
    fn emit(&mut self, keys: Vec<Key>, action: MasterAction) {
        #[cfg(test)]
        if self.plant == Plant::Unordered {
            return self.actions.push_back(action);
        }
        let blocked = keys.iter().any(|k| self.busy.contains(k))
            || self
                .held
                .iter()
                .any(|(h, _)| h.iter().any(|k| keys.contains(k)));
        if blocked {
            self.held.push_back((keys, action));
        } else {
            self.busy.extend(keys);
            self.actions.push_back(action);
        }
    }

    /// A write ended: its keys are free, and held writes whose keys all are go, in order.
    fn release(&mut self, keys: &[Key]) {
        for k in keys {
            self.busy.remove(k);
        }
        let mut blocked: BTreeSet<Key> = BTreeSet::new();
        let mut still = VecDeque::new();
        while let Some((keys, action)) = self.held.pop_front() {
            if keys
                .iter()
                .any(|k| self.busy.contains(k) || blocked.contains(k))
            {
                blocked.extend(keys.iter().cloned());
                still.push_back((keys, action));
            } else {
                self.busy.extend(keys);
                self.actions.push_back(action);
            }
        }
        self.held = still;
    }

    fn effect_ended(&mut self, token: Token, effect: Effect, outcome: Outcome) {
        match effect {
            Effect::Task(book) => self.tasks.handle_written(book, outcome),
            Effect::Delete(client, flow) => self.tasks.handle_deleted(&client, &flow, outcome),
            Effect::Client(id) => {
                let relabelled = match self.relabelled.get(&id) {
                    Some((t, r)) if *t == token => {
                        let r = *r;
                        self.relabelled.remove(&id);
                        r
                    }
                    _ => false,
                };
                if outcome != Outcome::Done {
                    // Written again with its next sighting or label change.
                    self.registry.handle_persist_failed(&id);
                }
                if outcome != Outcome::Refused {
                    // Minions drop their cached copy.
                    let key = paths::client_record(&id);
                    self.broadcast(broadcast::Kind::DatastoreChanged(pc::DatastoreChanged {
                        key,
                        version: 0,
                    }));
                }
                if relabelled
                    && outcome == Outcome::Done
                    && self.registry.get(&id).is_some_and(|c| c.connected)
                {
                    self.offer_hunts(&id);
                }
            }
            Effect::Participant(hunt, client, participation) => {
                if outcome != Outcome::Done {
                    // Not counted until recorded: the outcome comes again with the resend.
                    self.hunts
                        .handle_outcome_failed(&hunt, &client, participation);
                }
            }
            Effect::Cursor(node, cursor) => self.inbox.handle_persisted(&node, cursor, outcome),
            Effect::Hunt | Effect::Audit | Effect::FailFlow | Effect::Artifact => {}
            #[cfg(test)]
            Effect::Planted => {}
        }
    }

    /// Performs the machines' actions until none has any.
    fn drain(&mut self) {
        loop {
            self.drain_machines();
            let mut any = false;
            while let Some(a) = self.inbox.poll_action() {
                any = true;
                self.inbox_action(a);
            }
            if !any {
                return;
            }
        }
    }

    /// The registry's, hunt manager's and task book's actions (not the inbox's: applying an event
    /// begins a capture of its own).
    fn drain_machines(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.registry.poll_action() {
                any = true;
                self.registry_action(a);
            }
            while let Some(a) = self.hunts.poll_action() {
                any = true;
                self.hunt_action(a);
            }
            while let Some(a) = self.tasks.poll_action() {
                any = true;
                self.task_action(a);
            }
            if !any {
                return;
            }
        }
    }

    fn registry_action(&mut self, a: RegistryAction) {
        match a {
            RegistryAction::Persist(rec) => {
                let id = rec.id.clone();
                let t = self.write(Effect::Client(id.clone()), vec![Item::Client(rec)]);
                self.relabelled.insert(id, (t, false));
            }
            RegistryAction::LabelsChanged(id) => match self.relabelled.get_mut(&id) {
                Some((_, r)) => *r = true,
                None => {
                    if self.registry.get(&id).is_some_and(|c| c.connected) {
                        self.offer_hunts(&id);
                    }
                }
            },
        }
    }

    fn hunt_action(&mut self, a: HuntAction) {
        match a {
            HuntAction::Schedule { hunt, client, flow } => self.schedule(hunt, client, flow),
            HuntAction::Participant {
                hunt,
                client,
                participation,
            } => {
                let effect = Effect::Participant(hunt.clone(), client.clone(), participation);
                let item = Item::Participant {
                    hunt,
                    client,
                    participation,
                };
                self.write(effect, vec![item]);
            }
            HuntAction::Record(r) => {
                self.write(Effect::Hunt, vec![Item::Hunt(Box::new(r))]);
            }
            HuntAction::Offer { hunt, client } => self.offer_to_connected(&hunt, &client),
        }
    }

    /// A participant the hunt manager chose: its task is created, and written with its records.
    fn schedule(&mut self, hunt: HuntId, client: ClientId, flow: FlowId) {
        let Some(h) = self.hunts.get(&hunt) else {
            return;
        };
        let spec = h.record().spec.clone();
        let items = vec![
            Item::Participant {
                hunt: hunt.clone(),
                client: client.clone(),
                participation: Participation::Scheduled,
            },
            Item::Flow(Box::new(NewFlow {
                client: client.clone(),
                flow: flow.clone(),
                artifact: spec.artifact.clone(),
                params: spec.params.clone(),
                hunt: Some(hunt.clone()),
                created: self.time.now,
            })),
        ];
        let upload_max = self.limits.upload_bytes_max;
        #[cfg(test)]
        if self.plant == Plant::KeepAtBound {
            // Planted: the old glue, which wrote the participant's records whether or not its
            // task could be queued.
            let task = hunt_tasks::hunt_task(&hunt, &spec, &flow, upload_max);
            let origin = TaskOrigin::Hunt(hunt.clone());
            match self.tasks.create(client, flow, task, origin) {
                Ok(t) => {
                    self.groups.insert(t, items);
                }
                Err(_) => {
                    self.write(Effect::Planted, items);
                }
            }
            return;
        }
        let at = self.time.at;
        let r = hunt_tasks::schedule(
            &mut self.hunts,
            &mut self.tasks,
            at,
            &hunt,
            &client,
            &flow,
            upload_max,
        );
        match r {
            Ok(token) => {
                self.groups.insert(token, items);
            }
            // At the client's task bound it is no participant: undone, offered again later.
            Err(e) => self.notice(
                Level::Warn,
                format!(
                    "hunt {hunt}: task for {client} not queued yet ({e}); offering it again later"
                ),
            ),
        }
    }

    fn task_action(&mut self, a: TaskAction<comms::Task, TaskOrigin>) {
        match a {
            TaskAction::Write {
                token,
                client,
                flow,
                task,
            } => {
                let mut items = self.groups.remove(&token).unwrap_or_default();
                items.push(Item::Task { client, flow, task });
                self.write(Effect::Task(token), items);
            }
            TaskAction::Created {
                client,
                outcome,
                context,
                ..
            } => {
                #[cfg(test)]
                if self.plant == Plant::KeepRefused {
                    return;
                }
                hunt_tasks::created(&mut self.hunts, self.time.at, &client, outcome, &context);
            }
            TaskAction::Deliver { client, task } => self.send_task(&client, task),
            TaskAction::Delete { client, flow } => {
                let keys = vec![Key::Task(client.clone(), flow.clone())];
                let token = self.track(Effect::Delete(client.clone(), flow.clone()), &keys);
                let action = MasterAction::DeleteTask {
                    token,
                    client,
                    flow,
                };
                self.emit(keys, action);
            }
        }
    }

    fn inbox_action(&mut self, a: InboxAction<Result<Event, String>>) {
        match a {
            InboxAction::Apply {
                node,
                cursor,
                event,
            } => self.apply(node, cursor, event),
            InboxAction::Persist { node, cursor } => {
                #[cfg(test)]
                if self.plant == Plant::CursorUnwritten {
                    return self.inbox.handle_persisted(&node, cursor, Outcome::Done);
                }
                let items = vec![Item::Cursor {
                    node: node.clone(),
                    cursor,
                }];
                self.write(Effect::Cursor(node, cursor), items);
            }
            InboxAction::Ack { node, epoch, upto } => {
                let message = pc::MasterMessage {
                    kind: Some(master_message::Kind::Ack(pc::ReplAck {
                        epoch,
                        upto_seq: upto,
                    })),
                };
                self.send_minion(&node, message);
            }
        }
    }

    /// One replicated event's effects; each is idempotent (a crash between them and the cursor
    /// applies it again).
    fn apply(&mut self, node: String, cursor: Cursor, event: Result<Event, String>) {
        let event = match event {
            Ok(Event::FlowCompleted(completed)) => {
                let origin = (node, cursor);
                return self
                    .actions
                    .push_back(MasterAction::Complete { origin, completed });
            }
            Ok(e) => e,
            Err(reason) => {
                // Skipped so that the minion's later events are not stuck behind it.
                let m = format!("skipping a malformed event from {node}: {reason}");
                self.notice(Level::Error, m);
                return self.inbox.handle_applied(&node, cursor, Outcome::Done);
            }
        };
        self.begin();
        self.apply_event(&node, event);
        self.finish(Then::Applied(node, cursor));
    }

    fn apply_event(&mut self, node: &str, event: Event) {
        let now = self.time.now;
        let client = |id: &str| ClientId::parse(id).ok();
        match event {
            Event::ClientSeen(cs) => {
                let Some(id) = client(&cs.client_id) else {
                    return self.notice(Level::Warn, format!("{node} saw a malformed client id"));
                };
                let behind_ms = self.links.get(node).map_or(0, |l| l.behind_ms);
                let sighting = sighting(node, cs, id.clone(), behind_ms, self.time);
                if let Err(e) = self.registry.handle_seen_admitted(now, sighting) {
                    let m = format!("refused client {id} seen on {node}: {e}");
                    return self.notice(Level::Warn, m);
                }
                self.send_pending(&id);
                self.offer_hunts(&id);
            }
            Event::ClientGone(g) => {
                if let Some(id) = client(&g.client_id) {
                    self.registry.set_disconnected(now, &id, node);
                }
            }
            Event::TaskDelivered(t) => {
                if let (Some(id), Ok(flow)) = (client(&t.client_id), FlowId::parse(&t.flow_id)) {
                    self.task_acked(&id, &flow);
                }
            }
            Event::FlowCompleted(_) => unreachable!("completions go to the intake"),
            Event::NodeStarted(_) => {
                let n = self.registry.disconnect_node(now, node);
                let m = format!(
                    "minion {node} restarted: its {n} clients are disconnected until they reconnect"
                );
                self.notice(Level::Info, m);
            }
        }
    }

    /// A client acknowledged a task (a duplicate is ignored: tasks are resent until acknowledged).
    fn task_acked(&mut self, client: &ClientId, flow: &FlowId) {
        self.tasks.handle_acked(client, flow);
    }

    /// Sends a task toward its client: pushed if connected here, sent to its minion if connected
    /// there; else it goes when the client connects.
    fn send_task(&mut self, client: &ClientId, task: comms::Task) {
        let Some(rec) = self.registry.get(client).filter(|r| r.connected) else {
            return;
        };
        if rec.node == self.node {
            self.actions.push_back(MasterAction::Push {
                client: client.clone(),
                task,
            });
            return;
        }
        let node = rec.node.clone();
        let kind = broadcast::Kind::TaskQueued(pc::TaskQueued {
            client_id: client.to_string(),
            task: Some(task),
        });
        self.send_minion(&node, broadcast_message(kind));
    }

    /// Sends a client's pending tasks toward it (it acknowledges duplicates and runs each once).
    fn send_pending(&mut self, client: &ClientId) {
        let tasks: Vec<comms::Task> = self.tasks.pending(client).map(|(_, t)| t.clone()).collect();
        for t in tasks {
            self.send_task(client, t);
        }
    }

    /// Offers a client every running hunt.
    fn offer_hunts(&mut self, id: &ClientId) {
        if let Some((os, labels)) = self.facts(id, false) {
            let facts = ClientFacts {
                id,
                os: &os,
                labels: &labels,
            };
            self.hunts.offer(self.time.now, facts);
        }
    }

    /// Offers a hunt to a client if it is connected (else it is offered every running hunt when
    /// it connects).
    fn offer_to_connected(&mut self, hunt: &HuntId, id: &ClientId) {
        if let Some((os, labels)) = self.facts(id, true) {
            let facts = ClientFacts {
                id,
                os: &os,
                labels: &labels,
            };
            self.hunts.offer_to(self.time.now, hunt, facts);
        }
    }

    /// What a hunt's conditions look at of a client (its OS and labels, copied out of the
    /// registry), if it is enrolled — and connected, if `connected`.
    fn facts(&self, id: &ClientId, connected: bool) -> Option<(String, BTreeSet<String>)> {
        let rec = self
            .registry
            .get(id)
            .filter(|r| r.connected || !connected)?;
        Some((rec.os.clone(), rec.labels.clone()))
    }
}

fn broadcast_message(kind: broadcast::Kind) -> pc::MasterMessage {
    pc::MasterMessage {
        kind: Some(master_message::Kind::Broadcast(pc::Broadcast {
            seq: 0,
            kind: Some(kind),
        })),
    }
}

fn view(h: &Hunt) -> HuntView {
    HuntView {
        record: h.record().clone(),
        stats: h.stats(),
    }
}

fn no_hunt(id: &HuntId) -> RequestError {
    RequestError::new(ErrorKind::NotFound, format!("no hunt {id}"))
}

fn hunt_error(e: HuntError) -> RequestError {
    let kind = match e {
        HuntError::NotFound(_) => ErrorKind::NotFound,
        HuntError::TooManyHunts { .. } => ErrorKind::Exhausted,
        _ => ErrorKind::Precondition,
    };
    RequestError::new(kind, e)
}

/// A client a minion saw, as the registry takes it: its connection time moved onto our wall clock
/// (recorded, shown) and, to order it against other nodes' sightings, onto our monotonic clock —
/// its age (by the minion's clock, over a span of seconds) before now.
fn sighting(node: &str, cs: pc::ClientSeen, id: ClientId, behind_ms: i128, t: Time) -> Sighting {
    let info = cs.info.unwrap_or_default();
    let connected_ms = u64::try_from(i128::from(cs.connected_unix_ms) + behind_ms).unwrap_or(0);
    let age = t.now.as_ms().saturating_sub(connected_ms);
    Sighting {
        id,
        public_key: cs.public_key.to_vec(),
        hostname: info.hostname,
        fqdn: info.fqdn,
        os: info.os,
        ips: info.ips,
        last_ip: cs.last_ip,
        node: node.to_owned(),
        connected_at: Timestamp(connected_ms),
        connected_order: Monotonic(t.at.as_ms().saturating_sub(age)),
    }
}

/// Parses an analyst's search query and runs it (at most `limit` results).
fn search<'a>(
    registry: &'a Registry,
    query: &str,
    (sort, descending): (crate::registry::SortKey, bool),
    offset: usize,
    limit: usize,
) -> Result<crate::registry::SearchResult<'a>, RequestError> {
    let q = Query::parse(query).map_err(|e| RequestError::new(ErrorKind::Invalid, e))?;
    Ok(registry.search_sorted(&q, sort, descending, offset, limit))
}

#[cfg(test)]
mod tests;

/// An artifact's parameters as the audit log shows them: ` name="value"` each (what exactly was
/// run, an ad-hoc query's text included).
fn audit_params(params: &BTreeMap<String, String>) -> String {
    // A custom artifact's compiled definition is in the flow's record; its addition is audited
    // with the whole text.
    params
        .iter()
        .filter(|(k, _)| k.as_str() != crate::artifacts::DEFINITION_PARAM)
        .map(|(k, v)| format!(" {k}={v:?}"))
        .collect()
}
