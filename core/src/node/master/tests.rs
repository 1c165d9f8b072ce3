//! The master's harness: the real [`Master`] (registry, hunt manager, task book, replication inbox
//! and their glue) over a model store whose atomic writes and deletes end done, refused or unknown
//! (landing or not), model clients connected to the master or to a minion, a minion replicating
//! events, and master crashes that lose what was in flight.

use super::*;
use crate::hunts::HuntState;
use crate::node::testing::{Ending, ending};
use proptest::prelude::*;

const CLIENTS: u8 = 4;
const TASKS_MAX: usize = 2;
const MINION: &str = "m1";
const ANALYST: &str = "alice";

/// The analyst behind request `request` (its audit entry takes the request's number as its id).
fn analyst(request: Token) -> Analyst {
    Analyst {
        user: ANALYST.into(),
        audit_id: request.0,
    }
}

fn client(i: u8) -> ClientId {
    ClientId::from_public_key(&[i; 32])
}

fn limits() -> MasterLimits {
    MasterLimits {
        tasks: TaskLimits {
            per_client_max: TASKS_MAX,
            resend_ms: 100,
        },
        hunts: HuntLimits {
            hunts_max: 16,
            participants_max: 1000,
            schedule_retry_ms: 100,
        },
        registry: RegistryLimits::default(),
        inbox: InboxLimits::default(),
        upload_bytes_max: 1 << 20,
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// An analyst collects from client n (filling its task slots).
    Collect(u8),
    /// An analyst starts a hunt over every client.
    Hunt,
    /// An analyst labels client n (a relabelled client is offered the running hunts).
    Label(u8),
    /// Client n connects to the master.
    Connect(u8),
    /// Client n connects to the minion, which replicates it.
    Roam(u8),
    /// Client n acknowledges (and completes) the oldest task it received.
    Ack(u8),
    /// An analyst cancels client n's newest flow.
    Cancel(u8),
    /// An administrator adds (true) or removes the custom artifact `Custom.A`.
    Artifact(bool),
    /// An administrator sets (true) or unsets event artifact `E.A` for label `x`.
    Events(bool),
    /// An administrator adds (true) or removes GUI user `u`: only an audit entry.
    User(bool),
    /// A write in flight ends (the n-th, modulo how many: the store ends them in any order).
    Complete(Ending, usize),
    /// The minion sends its unacknowledged events again (its stream comes up first if down).
    Resend,
    /// The store starts or stops refusing every write.
    Busy(bool),
    Tick(u64),
    /// The master crashes; its writes in flight all land or none does.
    Crash(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..CLIENTS).prop_map(Step::Collect),
        1 => Just(Step::Hunt),
        1 => (0..CLIENTS).prop_map(Step::Label),
        2 => (0..CLIENTS).prop_map(Step::Connect),
        2 => (0..CLIENTS).prop_map(Step::Roam),
        3 => (0..CLIENTS).prop_map(Step::Ack),
        1 => (0..CLIENTS).prop_map(Step::Cancel),
        1 => any::<bool>().prop_map(Step::Artifact),
        1 => any::<bool>().prop_map(Step::Events),
        1 => any::<bool>().prop_map(Step::User),
        8 => (ending(6, 2, 1), 0usize..4).prop_map(|(e, n)| Step::Complete(e, n)),
        2 => Just(Step::Resend),
        1 => any::<bool>().prop_map(Step::Busy),
        2 => (1u64..150).prop_map(Step::Tick),
        1 => any::<bool>().prop_map(Step::Crash),
    ]
}

/// What a request in flight asked, to check its answer against storage.
#[derive(Clone, Debug)]
enum Asked {
    Connect(ClientId),
    Label(ClientId, bool),
    Collect(ClientId, FlowId),
    Hunt(HuntId),
    Cancel(ClientId, FlowId),
    Artifact(Option<String>),
    Events(Option<String>),
    User(bool),
}

#[derive(Clone, Debug)]
enum Op {
    Write(Token, Vec<Item>),
    Delete(Token, ClientId, FlowId),
    Fail(Token, ClientId, FlowId),
}

impl Op {
    fn keys(&self) -> Vec<Key> {
        match self {
            Op::Write(_, items) => items.iter().map(Item::key).collect(),
            Op::Delete(_, c, f) => vec![Key::Task(c.clone(), f.clone())],
            Op::Fail(_, c, f) => vec![Key::Flow(c.clone(), f.clone())],
        }
    }
}

/// The model store: what is durable.
#[derive(Clone, Debug, Default)]
struct Store {
    clients: BTreeMap<ClientId, ClientRecord>,
    hunts: BTreeMap<HuntId, HuntRecord>,
    participants: BTreeMap<(HuntId, ClientId), Participation>,
    tasks: BTreeMap<(ClientId, FlowId), comms::Task>,
    flows: BTreeSet<(ClientId, FlowId)>,
    cursor: Option<Cursor>,
    /// Audit entries by id.
    audit: BTreeMap<u64, AuditEntry>,
    /// Flow records marked failed (cancelled before they started).
    failed: BTreeSet<(ClientId, FlowId)>,
    /// Custom artifact definitions by name.
    artifacts: BTreeMap<String, String>,
    /// The client event table's entries by (label, artifact).
    events: BTreeMap<(String, String), String>,
}

impl Store {
    fn land(&mut self, op: &Op) {
        match op {
            Op::Write(_, items) => {
                for i in items.clone() {
                    match i {
                        Item::Client(r) => {
                            self.clients.insert(r.id.clone(), *r);
                        }
                        Item::Hunt(r) => {
                            self.hunts.insert(r.id.clone(), *r);
                        }
                        Item::Participant {
                            hunt,
                            client,
                            participation,
                        } => {
                            self.participants.insert((hunt, client), participation);
                        }
                        Item::Task { client, flow, task } => {
                            self.tasks.insert((client, flow), task);
                        }
                        Item::Flow(f) => {
                            self.flows.insert((f.client, f.flow));
                        }
                        Item::Cursor { cursor, .. } => self.cursor = Some(cursor),
                        Item::Audit(e) => {
                            self.audit.insert(e.id, *e);
                        }
                        Item::Artifact {
                            name,
                            definition: Some(d),
                        } => {
                            self.artifacts.insert(name, d);
                        }
                        Item::Artifact {
                            name,
                            definition: None,
                        } => {
                            self.artifacts.remove(&name);
                        }
                        Item::ClientEvent {
                            label,
                            artifact,
                            entry: Some(e),
                        } => {
                            self.events.insert((label, artifact), e);
                        }
                        Item::ClientEvent {
                            label,
                            artifact,
                            entry: None,
                        } => {
                            self.events.remove(&(label, artifact));
                        }
                    }
                }
            }
            Op::Delete(_, c, f) => {
                self.tasks.remove(&(c.clone(), f.clone()));
            }
            Op::Fail(_, c, f) => {
                self.failed.insert((c.clone(), f.clone()));
            }
        }
    }
}

/// The minion's side, modelled: its events and what the master acknowledged.
#[derive(Debug, Default)]
struct Minion {
    conn: Option<u64>,
    /// Events numbered from 1; those up to `acked` are acknowledged.
    events: Vec<Event>,
    /// When each event was made (ms).
    made_ms: Vec<u64>,
    acked: u64,
}

impl Minion {
    /// Its outbox as it reports it with a message sent at `now_ms`.
    fn report(&self, now_ms: u64) -> OutboxReport {
        OutboxReport {
            epoch: 1,
            head: self.events.len() as u64,
            oldest_unix_ms: self
                .made_ms
                .get(usize::try_from(self.acked).unwrap())
                .copied()
                .unwrap_or(0),
            sent_unix_ms: now_ms,
        }
    }
}

struct World {
    plant: Plant,
    time: Time,
    master: Master,
    store: Store,
    busy: bool,
    in_flight: VecDeque<Op>,
    next_id: u64,
    requests: BTreeMap<Token, Asked>,
    /// Clients connected to the master (answered) and to the minion.
    here: BTreeSet<ClientId>,
    roaming: BTreeSet<ClientId>,
    /// Tasks each client received and has not acknowledged yet, in order.
    received: BTreeMap<ClientId, Vec<comms::Task>>,
    /// Tasks each client acknowledged.
    acked: BTreeSet<(ClientId, FlowId)>,
    minion: Minion,
    /// Hunt outcomes being recorded, and those to report again (the agent resends a final status
    /// until its completion is recorded).
    reporting: BTreeMap<Token, (HuntId, ClientId)>,
    unreported: BTreeSet<(HuntId, ClientId)>,
}

impl World {
    fn new(plant: Plant) -> World {
        let time = Time {
            now: Timestamp(1_000_000),
            at: Monotonic(1_000),
        };
        World {
            plant,
            time,
            master: World::boot(plant, time, &Store::default()),
            store: Store::default(),
            busy: false,
            in_flight: VecDeque::new(),
            next_id: 1,
            requests: BTreeMap::new(),
            here: BTreeSet::new(),
            roaming: BTreeSet::new(),
            received: BTreeMap::new(),
            acked: BTreeSet::new(),
            minion: Minion::default(),
            reporting: BTreeMap::new(),
            unreported: BTreeSet::new(),
        }
    }

    fn boot(plant: Plant, time: Time, store: &Store) -> Master {
        let parts = store
            .participants
            .iter()
            .map(|((h, c), p)| (h.clone(), c.clone(), *p));
        let hunts = HuntManager::restore(
            limits().hunts,
            time.now,
            store.hunts.values().cloned(),
            parts,
        );
        let restored = Restored {
            clients: store.clients.values().cloned().collect(),
            hunts,
            cursors: store
                .cursor
                .map(|c| (MINION.to_owned(), c))
                .into_iter()
                .collect(),
            pending: store
                .tasks
                .iter()
                .map(|((c, f), t)| (c.clone(), f.clone(), t.clone()))
                .collect(),
        };
        let mut m = Master::restore("master".into(), limits(), time, restored);
        m.plant = plant;
        m
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn sighting(&self, i: u8, node: &str) -> Sighting {
        Sighting {
            id: client(i),
            public_key: vec![i; 32],
            hostname: format!("host{i}"),
            fqdn: String::new(),
            os: "linux".into(),
            ips: vec![],
            last_ip: "127.0.0.1".into(),
            node: node.into(),
            connected_at: self.time.now,
            connected_order: self.time.at,
        }
    }

    /// Performs the master's actions; checks each answer against storage.
    fn drain(&mut self) -> Result<(), String> {
        while let Some(a) = self.master.poll_action() {
            match a {
                MasterAction::Write { token, items } => self.start(Op::Write(token, items))?,
                MasterAction::DeleteTask {
                    token,
                    client,
                    flow,
                } => self.start(Op::Delete(token, client, flow))?,
                MasterAction::FailFlow {
                    token,
                    client,
                    flow,
                    ..
                } => self.start(Op::Fail(token, client, flow))?,
                MasterAction::CancelHere { .. } => {}
                MasterAction::Push { client, task } => {
                    if self.here.contains(&client) {
                        self.receive(&client, task);
                    }
                }
                MasterAction::ToMinion { conn, message, .. } => {
                    if self.minion.conn == Some(conn) {
                        self.minion_receives(message)?;
                    }
                }
                MasterAction::Complete { .. } => return Err("no completions here".into()),
                MasterAction::Reply { request, result } => {
                    if let (Some(asked), Ok(answer)) = (self.requests.remove(&request), &result) {
                        self.check_answer(request, &asked, answer)?;
                        if let Asked::Connect(c) = asked {
                            self.here.insert(c);
                        }
                    }
                }
                MasterAction::HuntRecorded { token, outcome } => {
                    if let Some(o) = self.reporting.remove(&token)
                        && outcome != Outcome::Done
                    {
                        self.unreported.insert(o);
                    }
                }
                MasterAction::Prefetch { .. } | MasterAction::Notice(_) => {}
            }
        }
        Ok(())
    }

    /// A write starts; none of its keys may have one in flight (they would land in any order).
    fn start(&mut self, op: Op) -> Result<(), String> {
        let keys = op.keys();
        if let Some(k) = self
            .in_flight
            .iter()
            .flat_map(Op::keys)
            .find(|k| keys.contains(k))
        {
            return Err(format!("two writes of {k:?} in flight at once"));
        }
        self.in_flight.push_back(op);
        Ok(())
    }

    fn receive(&mut self, client: &ClientId, task: comms::Task) {
        // The agent acknowledges a duplicate again (and resends the flow's final status until it
        // is acknowledged): a task it ran comes back here after a master lost the acknowledgement.
        let r = self.received.entry(client.clone()).or_default();
        if !r.contains(&task) {
            r.push(task);
        }
    }

    fn minion_receives(&mut self, message: pc::MasterMessage) -> Result<(), String> {
        match message.kind {
            Some(master_message::Kind::Ack(a)) => {
                let durable = self.store.cursor.map_or(0, |c| c.hwm);
                if a.upto_seq > durable {
                    return Err(format!(
                        "acknowledged {} beyond the durable cursor {durable}",
                        a.upto_seq
                    ));
                }
                self.minion.acked = self.minion.acked.max(a.upto_seq);
            }
            Some(master_message::Kind::Broadcast(b)) => {
                if let Some(broadcast::Kind::TaskQueued(q)) = b.kind {
                    let c = ClientId::parse(&q.client_id).expect("a client id");
                    if self.roaming.contains(&c) {
                        self.receive(&c, q.task.expect("a task"));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A request answered with success is durable, and a change's audit entry with it.
    fn check_answer(&self, request: Token, asked: &Asked, answer: &Answer) -> Result<(), String> {
        let s = &self.store;
        let audited = |action: AuditAction, target: String| {
            s.audit
                .get(&request.0)
                .is_some_and(|e| e.user == ANALYST && (e.action, &e.target) == (action, &target))
        };
        let entry = match asked {
            Asked::Connect(_) => true,
            Asked::Label(c, true) => audited(AuditAction::LabelAdd, c.to_string()),
            Asked::Label(c, false) => audited(AuditAction::LabelRemove, c.to_string()),
            Asked::Collect(c, _) => audited(AuditAction::Collect, c.to_string()),
            Asked::Hunt(h) => audited(AuditAction::HuntCreate, h.to_string()),
            Asked::Cancel(c, _) => audited(AuditAction::Cancel, c.to_string()),
            Asked::Artifact(Some(_)) => audited(AuditAction::ArtifactAdd, "Custom.A".into()),
            Asked::Artifact(None) => audited(AuditAction::ArtifactRemove, "Custom.A".into()),
            Asked::Events(Some(_)) => audited(AuditAction::EventsSet, "E.A (label x)".into()),
            Asked::Events(None) => audited(AuditAction::EventsUnset, "E.A (label x)".into()),
            Asked::User(true) => audited(AuditAction::UserAdd, "u".into()),
            Asked::User(false) => audited(AuditAction::UserRemove, "u".into()),
        };
        if !entry {
            return Err(format!(
                "answered {asked:?} without its audit entry on storage"
            ));
        }
        let ok = match asked {
            Asked::Connect(c) => s.clients.contains_key(c),
            Asked::Label(c, on) => s
                .clients
                .get(c)
                .is_some_and(|r| r.labels.contains("x") == *on),
            Asked::Collect(c, f) => {
                let key = (c.clone(), f.clone());
                s.flows.contains(&key) && (s.tasks.contains_key(&key) || self.acked.contains(&key))
            }
            Asked::Hunt(h) => s.hunts.contains_key(h),
            // Two changes of one definition land in the order asked: the last answered holds.
            Asked::Artifact(d) => s.artifacts.get("Custom.A") == d.as_ref(),
            Asked::Events(e) => s.events.get(&("x".into(), "E.A".into())) == e.as_ref(),
            Asked::User(_) => true,
            // Withdrawn before it started: failed on storage, its task gone.
            Asked::Cancel(c, f) => match answer {
                Answer::Cancelled {
                    before_start: true, ..
                } => {
                    let key = (c.clone(), f.clone());
                    s.failed.contains(&key) && !s.tasks.contains_key(&key)
                }
                _ => true,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(format!("answered {asked:?} before it was durable"))
        }
    }

    /// A hunt participant's flow completed (recorded here as the completions machine would).
    fn report(&mut self, h: &HuntId, c: &ClientId) {
        let token = Token(self.id());
        self.reporting.insert(token, (h.clone(), c.clone()));
        let o = HuntOutcome {
            hunt: h.clone(),
            client: c.clone(),
            state: crate::flows::FinalState::Completed,
            rows: 1,
            uploaded_bytes: 0,
        };
        self.master.handle_hunt_outcome(self.time, token, &o);
    }

    fn replicate(&mut self, e: Event) {
        self.minion.events.push(e);
        self.minion.made_ms.push(self.time.now.as_ms());
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
        // Every step takes a millisecond: connections are ordered.
        self.time = Time {
            now: self.time.now.plus_ms(1),
            at: self.time.at.plus_ms(1),
        };
        let t = self.time;
        match s {
            Step::Collect(i) => {
                let request = Token(self.id());
                let flow = FlowId::from_u64(self.id());
                self.requests
                    .insert(request, Asked::Collect(client(i), flow.clone()));
                let f = NewFlow {
                    client: client(i),
                    flow,
                    artifact: "Generic.Client.Info".into(),
                    params: BTreeMap::new(),
                    hunt: None,
                    created: t.now,
                };
                self.master.handle_request(
                    t,
                    request,
                    analyst(request),
                    Request::Collect(Box::new(f)),
                );
            }
            Step::Hunt => {
                let request = Token(self.id());
                let id = HuntId::from_u64(self.id());
                self.requests.insert(request, Asked::Hunt(id.clone()));
                let spec = HuntSpec {
                    artifact: "Generic.Client.Info".into(),
                    params: BTreeMap::new(),
                    include_labels: BTreeSet::new(),
                    exclude_labels: BTreeSet::new(),
                    os: None,
                    expires: t.now.plus_ms(1 << 40),
                    client_limit: None,
                    description: String::new(),
                    creator: String::new(),
                };
                self.master.handle_request(
                    t,
                    request,
                    analyst(request),
                    Request::CreateHunt { id, spec },
                );
            }
            Step::Artifact(add) => {
                let request = Token(self.id());
                let definition = add.then(|| format!("name: Custom.A # {}", request.0));
                self.requests
                    .insert(request, Asked::Artifact(definition.clone()));
                let req = Request::PutArtifact {
                    name: "Custom.A".into(),
                    definition,
                };
                self.master
                    .handle_request(t, request, analyst(request), req);
            }
            Step::User(add) => {
                let request = Token(self.id());
                self.requests.insert(request, Asked::User(add));
                let action = if add {
                    AuditAction::UserAdd
                } else {
                    AuditAction::UserRemove
                };
                let req = Request::RecordUser {
                    action,
                    name: "u".into(),
                    detail: "reader".into(),
                };
                self.master
                    .handle_request(t, request, analyst(request), req);
            }
            Step::Events(set) => {
                let request = Token(self.id());
                let entry = set.then(|| format!("{{\"n\":{}}}", request.0));
                self.requests.insert(request, Asked::Events(entry.clone()));
                let req = Request::SetClientEvent {
                    label: "x".into(),
                    artifact: "E.A".into(),
                    entry,
                    detail: String::new(),
                };
                self.master
                    .handle_request(t, request, analyst(request), req);
            }
            Step::Label(i) => {
                let request = Token(self.id());
                let on = !self
                    .master
                    .registry()
                    .get(&client(i))
                    .is_some_and(|r| r.labels.contains("x"));
                self.requests.insert(request, Asked::Label(client(i), on));
                let req = Request::Label {
                    client: client(i),
                    label: "x".into(),
                    remove: !on,
                };
                self.master
                    .handle_request(t, request, analyst(request), req);
            }
            Step::Connect(i) => {
                let request = Token(self.id());
                if self.roaming.remove(&client(i)) {
                    self.replicate(Event::ClientGone(pc::ClientGone {
                        client_id: client(i).to_string(),
                    }));
                }
                self.requests.insert(request, Asked::Connect(client(i)));
                let s = self.sighting(i, "master");
                self.master
                    .handle_connected(t, request, s)
                    .map_err(|e| format!("connect refused: {e}"))?;
            }
            Step::Roam(i) => {
                if self.here.remove(&client(i)) {
                    self.master.handle_disconnected(t, &client(i));
                }
                self.roaming.insert(client(i));
                self.replicate(Event::ClientSeen(pc::ClientSeen {
                    client_id: client(i).to_string(),
                    public_key: vec![i; 32].into(),
                    info: Some(comms::ClientInfo {
                        hostname: format!("host{i}"),
                        os: "linux".into(),
                        ..Default::default()
                    }),
                    last_ip: "127.0.0.2".into(),
                    connected_unix_ms: t.now.as_ms(),
                    running_flows: vec![],
                }));
            }
            Step::Ack(i) => {
                let c = client(i);
                let again: Vec<_> = self
                    .unreported
                    .iter()
                    .filter(|(_, cc)| *cc == c)
                    .cloned()
                    .collect();
                for (h, c) in again {
                    self.unreported.remove(&(h.clone(), c.clone()));
                    self.report(&h, &c);
                }
                let first = self.received.get_mut(&c).filter(|r| !r.is_empty());
                if let Some(task) = first.map(|r| r.remove(0)) {
                    let flow = FlowId::parse(&task.flow_id).expect("a flow id");
                    self.acked.insert((c.clone(), flow.clone()));
                    if self.roaming.contains(&c) {
                        self.replicate(Event::TaskDelivered(pc::TaskDelivered {
                            client_id: c.to_string(),
                            flow_id: flow.to_string(),
                        }));
                    } else {
                        self.master.handle_task_acked(t, &c, &flow);
                    }
                    // Its flow completes at once (recorded here as the completions machine would).
                    if let Ok(h) = HuntId::parse(&task.hunt_id) {
                        self.master.handle_delivered(t, &c, &flow);
                        self.report(&h, &c);
                    }
                }
            }
            Step::Cancel(i) => {
                // Its newest flow: one still on storage as a task, else the last it received.
                let c = client(i);
                let on_storage = self.store.tasks.keys().rfind(|(cc, _)| *cc == c);
                let received = self.received.get(&c).and_then(|r| r.last());
                let flow = match (on_storage, received) {
                    (Some((_, f)), _) => Some(f.clone()),
                    (None, Some(t)) => FlowId::parse(&t.flow_id).ok(),
                    (None, None) => None,
                };
                if let Some(flow) = flow {
                    let request = Token(self.id());
                    self.requests
                        .insert(request, Asked::Cancel(c.clone(), flow.clone()));
                    let req = Request::Cancel {
                        client: c,
                        flow,
                        reason: "test".into(),
                    };
                    self.master
                        .handle_request(t, request, analyst(request), req);
                }
            }
            Step::Complete(ending, n) => {
                let n = n % self.in_flight.len().max(1);
                if let Some(op) = self.in_flight.remove(n) {
                    let (outcome, lands) = ending.resolve(self.busy);
                    if lands {
                        self.store.land(&op);
                    }
                    let token = match op {
                        Op::Write(t, _) | Op::Delete(t, _, _) | Op::Fail(t, _, _) => t,
                    };
                    let r = match outcome {
                        Outcome::Done => Ok(()),
                        o => Err(WriteFailure {
                            outcome: o,
                            message: "model".into(),
                        }),
                    };
                    self.master.handle_written(t, token, r);
                }
            }
            Step::Resend => {
                let conn = match self.minion.conn {
                    Some(c) => c,
                    None => {
                        let report = self.minion.report(t.now.as_ms());
                        let c = self.master.handle_minion_up(t, MINION, Some(report));
                        self.minion.conn = Some(c);
                        c
                    }
                };
                let from = self.minion.acked + 1;
                let events: Vec<(u64, Result<Event, String>)> = self
                    .minion
                    .events
                    .iter()
                    .enumerate()
                    .map(|(n, e)| (n as u64 + 1, Ok(e.clone())))
                    .filter(|(n, _)| *n >= from)
                    .collect();
                if !events.is_empty() {
                    let batch = MinionBatch {
                        epoch: 1,
                        events,
                        sent_unix_ms: t.now.as_ms(),
                        outbox: Some(self.minion.report(t.now.as_ms())),
                    };
                    self.master.handle_batch(t, MINION, conn, batch);
                }
            }
            Step::Busy(b) => self.busy = b,
            Step::Tick(ms) => {
                self.time = Time {
                    now: t.now.plus_ms(ms),
                    at: t.at.plus_ms(ms),
                };
                self.master.handle_timeout(self.time);
            }
            Step::Crash(lands) => {
                for op in std::mem::take(&mut self.in_flight) {
                    if lands {
                        self.store.land(&op);
                    }
                }
                self.requests.clear();
                let lost = std::mem::take(&mut self.reporting);
                self.unreported.extend(lost.into_values());
                self.here.clear();
                self.roaming.clear();
                self.minion.conn = None;
                self.master = World::boot(self.plant, self.time, &self.store);
            }
        }
        self.drain()?;
        self.check()
    }

    /// No participant scheduled without its task, in memory and on storage; the task bound holds.
    fn check(&self) -> Result<(), String> {
        for h in self.master.hunts().list() {
            let id = &h.record().id;
            for (c, p) in h.participants() {
                let flow = FlowId::for_hunt(id, c);
                let key = (c.clone(), flow.clone());
                if *p == Participation::Scheduled
                    && !self.master.tasks().contains(c, &flow)
                    && !self.acked.contains(&key)
                {
                    return Err(format!("{c} is scheduled into {id} and has no task"));
                }
            }
        }
        for ((h, c), p) in &self.store.participants {
            let key = (c.clone(), FlowId::for_hunt(h, c));
            if *p == Participation::Scheduled
                && !self.store.tasks.contains_key(&key)
                && !self.acked.contains(&key)
            {
                return Err(format!(
                    "{c}'s participant record in {h} has no task record"
                ));
            }
        }
        for i in 0..CLIENTS {
            if self.master.tasks().waiting(&client(i)) > TASKS_MAX {
                return Err(format!("client {i} has over {TASKS_MAX} tasks"));
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
        }
        // Heal: writes succeed, clients connect (half of them through the minion) and work through
        // their tasks; retries and resends run.
        self.step(Step::Busy(false))?;
        for i in 0..CLIENTS {
            self.step(if i % 2 == 0 {
                Step::Connect(i)
            } else {
                Step::Roam(i)
            })?;
        }
        for _ in 0..60 {
            self.step(Step::Resend)?;
            self.complete_all()?;
            for i in 0..CLIENTS {
                self.step(Step::Ack(i))?;
            }
            self.step(Step::Resend)?;
            self.complete_all()?;
            self.step(Step::Tick(100))?;
        }
        self.settled()
    }

    fn complete_all(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            self.step(Step::Complete(Ending::Done, 0))?;
        }
        Ok(())
    }

    /// After healing: every event is acknowledged; every running hunt reached every client; hunt
    /// figures are those of the records on storage; no task waits unacknowledged.
    fn settled(&self) -> Result<(), String> {
        if self.minion.acked != self.minion.events.len() as u64 {
            return Err(format!(
                "{} of {} events acknowledged",
                self.minion.acked,
                self.minion.events.len()
            ));
        }
        for h in self.master.hunts().list() {
            let id = &h.record().id;
            let stored: Vec<&Participation> = self
                .store
                .participants
                .iter()
                .filter(|((hh, _), _)| hh == id)
                .map(|(_, p)| p)
                .collect();
            if h.record().state == HuntState::Running {
                for i in 0..CLIENTS {
                    if h.participation(&client(i)).is_none() {
                        return Err(format!("client {i} never joined hunt {id}"));
                    }
                }
            }
            let s = h.stats();
            let completed = stored
                .iter()
                .filter(|p| matches!(p, Participation::Completed { .. }))
                .count() as u64;
            if s.scheduled != stored.len() as u64 || s.completed != completed {
                return Err(format!(
                    "hunt {id}: stats {s:?}, storage {} participants, {completed} completed",
                    stored.len()
                ));
            }
        }
        if let Some((c, f)) = self.store.tasks.keys().next() {
            return Err(format!(
                "task {f} for {c} is still on storage after healing"
            ));
        }
        // Everything is durable and the minion said so last: it shows no backlog.
        if self.minion.conn.is_some() {
            let view = self.master.minions();
            let backlog = view
                .iter()
                .find(|m| m.node == MINION)
                .and_then(|m| m.backlog);
            let none = Backlog {
                events: 0,
                oldest_ms: None,
            };
            if backlog != Some(none) {
                return Err(format!("a healed minion shows a backlog of {backlog:?}"));
            }
        }
        Ok(())
    }
}

/// A client at its task bound when a hunt starts, and a group refused as busy.
fn history() -> Vec<Step> {
    use Step::*;
    vec![
        Connect(0),
        Connect(1),
        Complete(Ending::Done, 0),
        Complete(Ending::Done, 0),
        Collect(0),
        Collect(0),
        Complete(Ending::Done, 0),
        Complete(Ending::Done, 0),
        Hunt,
        Complete(Ending::Done, 0),
        // Client 1's group is refused; client 0 is at its bound.
        Complete(Ending::Refused, 0),
        Tick(50),
    ]
}

#[test]
fn the_checks_catch_a_participant_without_its_task() {
    assert_eq!(World::new(Plant::None).run(history()), Ok(()));
    let refused = World::new(Plant::KeepRefused).run(history());
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("has no task")),
        "{refused:?}"
    );
    let bound = World::new(Plant::KeepAtBound).run(history());
    assert!(
        bound.as_ref().is_err_and(|e| e.contains("has no task")),
        "{bound:?}"
    );
}

#[test]
fn the_checks_catch_an_answer_before_its_write() {
    let early = World::new(Plant::ReplyEarly).run(history());
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.contains("before it was durable")),
        "{early:?}"
    );
}

#[test]
fn the_checks_catch_a_change_without_its_audit_entry() {
    let missing = World::new(Plant::NoAudit).run(history());
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.contains("without its audit entry")),
        "{missing:?}"
    );
}

/// A client record whose write was refused is written again when the client reconnects, though
/// nothing about it changed: the second connection's answer must be durable too.
#[test]
fn a_refused_client_record_is_written_again() {
    use Step::*;
    let steps = vec![
        Busy(true),
        Connect(0),
        Complete(Ending::Done, 0),
        Busy(false),
        Connect(0),
        Complete(Ending::Done, 0),
    ];
    let mut w = World::new(Plant::None);
    assert_eq!(w.run(steps), Ok(()));
    assert!(w.store.clients.contains_key(&client(0)));
}

/// Two changes of one client's labels in a row: the second write waits for the first.
#[test]
fn writes_of_one_key_are_in_flight_one_at_a_time() {
    use Step::*;
    let steps = || {
        vec![
            Connect(0),
            Complete(Ending::Done, 0),
            Label(0),
            Label(0),
            Label(0),
            Complete(Ending::Done, 1),
        ]
    };
    assert_eq!(World::new(Plant::None).run(steps()), Ok(()));
    let unordered = World::new(Plant::Unordered).run(steps());
    assert!(
        unordered
            .as_ref()
            .is_err_and(|e| e.contains("in flight at once")),
        "{unordered:?}"
    );
}

/// A minion's backlog is what it reported holding beyond the master's durable cursor, with the
/// time its oldest such event was made; none once its events are durable. Unknown while its stream
/// is down.
#[test]
fn a_minion_s_backlog_is_what_it_holds_beyond_the_durable_cursor() {
    use Step::*;
    let mut w = World::new(Plant::None);
    let backlog = |w: &World| {
        w.master
            .minions()
            .into_iter()
            .find(|m| m.node == MINION)
            .and_then(|m| m.backlog)
    };
    for s in [Roam(0), Roam(1)] {
        w.step(s).unwrap();
    }
    assert_eq!(backlog(&w), None, "not connected yet");
    let first_made = w.minion.made_ms[0];
    w.step(Resend).unwrap();
    assert_eq!(
        backlog(&w),
        Some(Backlog {
            events: 2,
            oldest_ms: Some(first_made)
        })
    );
    w.complete_all().unwrap();
    w.step(Resend).unwrap();
    assert_eq!(w.minion.acked, 2);
    assert_eq!(
        backlog(&w),
        Some(Backlog {
            events: 0,
            oldest_ms: None
        })
    );
    // A new event, sent in a batch on the same stream: the backlog follows the batch's report.
    w.step(Roam(2)).unwrap();
    let third_made = w.minion.made_ms[2];
    w.step(Resend).unwrap();
    assert_eq!(
        backlog(&w),
        Some(Backlog {
            events: 1,
            oldest_ms: Some(third_made)
        })
    );
    w.step(Crash(true)).unwrap();
    assert_eq!(backlog(&w), None, "its stream went with the crash");
}

#[test]
fn a_minion_s_events_are_acknowledged_only_once_durable() {
    use Step::*;
    let steps = || {
        vec![
            Roam(0),
            Roam(1),
            Resend,
            // The client records are written; the cursor write is refused, then maybe lands.
            Complete(Ending::Done, 0),
            Complete(Ending::Done, 0),
            Complete(Ending::Refused, 0),
            Resend,
            Complete(Ending::Unknown(true), 0),
            Crash(false),
            Resend,
        ]
    };
    assert_eq!(World::new(Plant::None).run(steps()), Ok(()));
    let unwritten = World::new(Plant::CursorUnwritten).run(steps());
    assert!(
        unwritten
            .as_ref()
            .is_err_and(|e| e.contains("beyond the durable cursor")),
        "{unwritten:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// No participant is scheduled without a durable task — at the task bound, after refused and
    /// maybe-written groups, across crashes; answers are durable; acknowledgements never pass the
    /// durable cursor; every running hunt reaches every client once it has room; hunt figures equal
    /// the records on storage; every task is acknowledged and deleted in the end.
    #[test]
    fn the_master_keeps_its_invariants(steps in prop::collection::vec(step(), 0..120)) {
        let r = World::new(Plant::None).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
