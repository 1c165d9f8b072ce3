//! The master's hunt scheduling harness: the real hunt manager and task book, glued by
//! `hunt_tasks`, over a model store whose atomic groups (participant + task records) and deletes
//! end done, refused or unknown, clients at their task bound, and master crashes.

use super::*;
use crate::hunts::{ClientFacts, HuntAction, HuntLimits, HuntRecord, HuntState, Participation};
use crate::node::tasks::{TaskAction, TaskLimits};
use crate::node::testing::{Ending, ending};
use crate::time::{Monotonic, Timestamp};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const CLIENTS: u8 = 4;
const TASKS_MAX: usize = 2;
const UPLOAD_MAX: u64 = 1 << 20;

fn client(i: u8) -> ClientId {
    ClientId::from_public_key(&[i; 32])
}

fn hunt_limits() -> HuntLimits {
    HuntLimits {
        hunts_max: 16,
        participants_max: 1000,
        schedule_retry_ms: 100,
    }
}

fn task_limits() -> TaskLimits {
    TaskLimits {
        per_client_max: TASKS_MAX,
        resend_ms: 100,
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// An analyst collects from client n (filling its task slots).
    Collect(u8),
    /// An analyst starts a hunt over every client.
    Hunt,
    /// Client n connects (it is offered every running hunt).
    Connect(u8),
    /// Client n acknowledges (and completes) its oldest task.
    Ack(u8),
    /// The oldest write in flight ends.
    Complete(Ending),
    /// The store starts or stops refusing every write.
    Busy(bool),
    Tick(u64),
    /// The master crashes; its writes in flight all land or none does.
    Crash(bool),
}

fn step() -> impl Strategy<Value = Step> {
    let ending = ending(6, 2, 1);
    prop_oneof![
        3 => (0..CLIENTS).prop_map(Step::Collect),
        1 => Just(Step::Hunt),
        2 => (0..CLIENTS).prop_map(Step::Connect),
        3 => (0..CLIENTS).prop_map(Step::Ack),
        8 => ending.prop_map(Step::Complete),
        1 => any::<bool>().prop_map(Step::Busy),
        2 => (1u64..150).prop_map(Step::Tick),
        1 => any::<bool>().prop_map(Step::Crash),
    ]
}

/// A fault planted in the glue, to prove the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plant {
    None,
    /// A refused group is not undone in the hunt manager (the first defect of issue #15).
    KeepRefused,
    /// At the task bound the participant is kept with no task (the second defect).
    KeepAtBound,
}

#[derive(Clone, Debug)]
enum Op {
    /// A task's record, with a participant's when `hunt` is set: one atomic group.
    Group {
        token: Token,
        client: ClientId,
        flow: FlowId,
        hunt: Option<HuntId>,
    },
    Delete {
        client: ClientId,
        flow: FlowId,
    },
}

struct World {
    plant: Plant,
    now: Timestamp,
    hunts: HuntManager,
    tasks: TaskBook<comms::Task, TaskOrigin>,
    next_id: u64,
    connected: BTreeSet<ClientId>,
    in_flight: VecDeque<Op>,
    busy: bool,
    /// What the master's shell knows of each creation in flight: the hunt whose participant goes
    /// with the task.
    group_of: BTreeMap<Token, Option<HuntId>>,
    // The model store.
    hunt_records: BTreeMap<HuntId, HuntRecord>,
    participants: BTreeMap<(HuntId, ClientId), Participation>,
    task_records: BTreeSet<(ClientId, FlowId)>,
    /// Tasks each client acknowledged (its flow then completes).
    acked: BTreeSet<(ClientId, FlowId)>,
}

impl World {
    fn new(plant: Plant) -> World {
        World {
            plant,
            now: Timestamp(1_000),
            hunts: HuntManager::new(hunt_limits()),
            tasks: TaskBook::restore(task_limits(), Monotonic(1_000), []),
            next_id: 1,
            connected: BTreeSet::new(),
            in_flight: VecDeque::new(),
            busy: false,
            group_of: BTreeMap::new(),
            hunt_records: BTreeMap::new(),
            participants: BTreeMap::new(),
            task_records: BTreeSet::new(),
            acked: BTreeSet::new(),
        }
    }

    fn offer(&mut self, hunt: Option<&HuntId>, c: &ClientId) {
        let (os, labels) = ("linux".to_owned(), BTreeSet::new());
        let facts = ClientFacts {
            id: c,
            os: &os,
            labels: &labels,
        };
        match hunt {
            Some(h) => {
                self.hunts.offer_to(self.now, h, facts);
            }
            None => {
                self.hunts.offer(self.now, facts);
            }
        }
    }

    /// Drives the machines the way the master's shell does, until neither has an action.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(a) = self.hunts.poll_action() {
                any = true;
                match a {
                    HuntAction::Schedule { hunt, client, flow } => {
                        if self.plant == Plant::KeepAtBound {
                            // Planted: the old glue, which wrote the participant's records
                            // whether or not its task could be queued.
                            let spec = &self.hunts.get(&hunt).expect("a hunt").record().spec;
                            let task = hunt_task(&hunt, spec, &flow, UPLOAD_MAX);
                            let origin = TaskOrigin::Hunt(hunt.clone());
                            match self.tasks.create(client.clone(), flow, task, origin) {
                                Ok(t) => {
                                    self.group_of.insert(t, Some(hunt));
                                }
                                Err(_) => {
                                    self.participants
                                        .insert((hunt, client), Participation::Scheduled);
                                }
                            }
                            continue;
                        }
                        let r = schedule(
                            &mut self.hunts,
                            &mut self.tasks,
                            Monotonic(self.now.0),
                            &hunt,
                            &client,
                            &flow,
                            UPLOAD_MAX,
                        );
                        if let Ok(token) = r {
                            self.group_of.insert(token, Some(hunt));
                        }
                    }
                    HuntAction::Participant {
                        hunt,
                        client,
                        participation,
                    } => {
                        // Outcomes are written at once here (their refusal is the hunt
                        // manager's own property).
                        self.participants.insert((hunt, client), participation);
                    }
                    HuntAction::Record(r) => {
                        self.hunt_records.insert(r.id.clone(), r);
                    }
                    HuntAction::Offer { hunt, client } => {
                        if self.connected.contains(&client) {
                            self.offer(Some(&hunt), &client);
                        }
                    }
                }
            }
            while let Some(a) = self.tasks.poll_action() {
                any = true;
                match a {
                    TaskAction::Write {
                        token,
                        client,
                        flow,
                        ..
                    } => {
                        let hunt = self.group_of.remove(&token).flatten();
                        self.in_flight.push_back(Op::Group {
                            token,
                            client,
                            flow,
                            hunt,
                        });
                    }
                    TaskAction::Created {
                        client,
                        outcome,
                        context,
                        ..
                    } => {
                        if self.plant != Plant::KeepRefused {
                            created(
                                &mut self.hunts,
                                Monotonic(self.now.0),
                                &client,
                                outcome,
                                &context,
                            );
                        }
                    }
                    TaskAction::Deliver { .. } => {}
                    TaskAction::Delete { client, flow } => {
                        self.in_flight.push_back(Op::Delete { client, flow });
                    }
                }
            }
            if !any {
                return;
            }
        }
    }

    fn land(&mut self, op: &Op) {
        match op {
            Op::Group {
                client, flow, hunt, ..
            } => {
                self.task_records.insert((client.clone(), flow.clone()));
                if let Some(h) = hunt {
                    self.participants
                        .entry((h.clone(), client.clone()))
                        .or_insert(Participation::Scheduled);
                }
            }
            Op::Delete { client, flow } => {
                self.task_records.remove(&(client.clone(), flow.clone()));
            }
        }
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
        match s {
            Step::Collect(i) => {
                let flow = FlowId::from_u64(self.next_id);
                self.next_id += 1;
                let task = comms::Task {
                    flow_id: flow.to_string(),
                    ..Default::default()
                };
                if let Ok(t) = self
                    .tasks
                    .create(client(i), flow, task, TaskOrigin::Collect)
                {
                    self.group_of.insert(t, None);
                }
            }
            Step::Hunt => {
                let id = HuntId::from_u64(self.next_id);
                self.next_id += 1;
                let spec = HuntSpec {
                    artifact: "Generic.Client.Info".into(),
                    params: BTreeMap::new(),
                    include_labels: BTreeSet::new(),
                    exclude_labels: BTreeSet::new(),
                    os: None,
                    expires: self.now.plus_ms(1 << 40),
                    client_limit: None,
                    description: String::new(),
                };
                if self.hunts.create(self.now, id.clone(), spec).is_ok() {
                    for c in self.connected.clone() {
                        self.offer(Some(&id), &c);
                    }
                }
            }
            Step::Connect(i) => {
                let c = client(i);
                self.connected.insert(c.clone());
                self.offer(None, &c);
            }
            Step::Ack(i) => {
                let c = client(i);
                let first = self
                    .tasks
                    .pending(&c)
                    .next()
                    .map(|(f, t)| (f.clone(), t.clone()));
                if let Some((flow, task)) = first {
                    self.acked.insert((c.clone(), flow.clone()));
                    self.tasks.handle_acked(&c, &flow);
                    if let Ok(h) = HuntId::parse(&task.hunt_id) {
                        let done = crate::flows::FinalState::Completed;
                        self.hunts.handle_outcome(self.now, &h, &c, done, 1, 0);
                    }
                }
            }
            Step::Complete(ending) => {
                if let Some(op) = self.in_flight.pop_front() {
                    let (outcome, lands) = ending.resolve(self.busy);
                    if lands {
                        self.land(&op);
                    }
                    match op {
                        Op::Group { token, .. } => self.tasks.handle_written(token, outcome),
                        Op::Delete { client, flow } => {
                            self.tasks.handle_deleted(&client, &flow, outcome)
                        }
                    }
                }
            }
            Step::Busy(b) => self.busy = b,
            Step::Tick(ms) => {
                self.now = self.now.plus_ms(ms);
                self.hunts.handle_timeout(self.now, Monotonic(self.now.0));
                self.tasks.handle_timeout(Monotonic(self.now.0));
            }
            Step::Crash(lands) => {
                for op in std::mem::take(&mut self.in_flight) {
                    if lands {
                        self.land(&op);
                    }
                }
                self.group_of.clear();
                self.connected.clear();
                let parts: Vec<_> = self
                    .participants
                    .iter()
                    .map(|((h, c), p)| (h.clone(), c.clone(), *p))
                    .collect();
                self.hunts = HuntManager::restore(
                    hunt_limits(),
                    self.now,
                    self.hunt_records.values().cloned(),
                    parts,
                );
                let tasks: Vec<_> = self
                    .task_records
                    .iter()
                    .map(|(c, f)| {
                        let t = comms::Task {
                            flow_id: f.to_string(),
                            hunt_id: self.hunt_of(c, f).unwrap_or_default(),
                            ..Default::default()
                        };
                        (c.clone(), f.clone(), t)
                    })
                    .collect();
                self.tasks = TaskBook::restore(task_limits(), Monotonic(self.now.0), tasks);
            }
        }
        self.drain();
        self.check()
    }

    fn hunt_of(&self, c: &ClientId, f: &FlowId) -> Option<String> {
        self.hunt_records
            .keys()
            .find(|h| &FlowId::for_hunt(h, c) == f)
            .map(ToString::to_string)
    }

    /// No participant scheduled without its task, in memory and on storage; the task bound holds.
    fn check(&self) -> Result<(), String> {
        for h in self.hunts.list() {
            let id = &h.record().id;
            for (c, p) in h.participants() {
                let flow = FlowId::for_hunt(id, c);
                let key = (c.clone(), flow.clone());
                if *p == Participation::Scheduled
                    && !self.tasks.contains(c, &flow)
                    && !self.acked.contains(&key)
                {
                    return Err(format!("{c} is scheduled into {id} and has no task"));
                }
            }
        }
        for ((h, c), p) in &self.participants {
            let key = (c.clone(), FlowId::for_hunt(h, c));
            if *p == Participation::Scheduled
                && !self.task_records.contains(&key)
                && !self.acked.contains(&key)
            {
                return Err(format!(
                    "{c}'s participant record in {h} has no task record"
                ));
            }
        }
        for i in 0..CLIENTS {
            if self.tasks.waiting(&client(i)) > TASKS_MAX {
                return Err(format!("client {i} has over {TASKS_MAX} tasks"));
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
        }
        // Heal: writes succeed, every client connects and works through its tasks; retries run.
        self.step(Step::Busy(false))?;
        for i in 0..CLIENTS {
            self.step(Step::Connect(i))?;
        }
        for _ in 0..60 {
            while !self.in_flight.is_empty() {
                self.step(Step::Complete(Ending::Done))?;
            }
            for i in 0..CLIENTS {
                self.step(Step::Ack(i))?;
            }
            self.step(Step::Tick(100))?;
        }
        // Every running hunt reached every client once it had room, and its figures are those of
        // the records on storage.
        for h in self.hunts.list() {
            let id = &h.record().id;
            let stored: Vec<&Participation> = self
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
        Ok(())
    }
}

/// A client at its task bound when a hunt starts, and a group refused as busy.
fn history() -> Vec<Step> {
    use Step::*;
    vec![
        Connect(0),
        Connect(1),
        Collect(0),
        Collect(0),
        Complete(Ending::Done),
        Complete(Ending::Done),
        Hunt,
        // Client 1's group is refused; client 0 is at its bound.
        Complete(Ending::Refused),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// No participant is scheduled without a durable task — at the task bound, after refused and
    /// maybe-written groups, across crashes; every running hunt reaches every client once it has
    /// room; hunt figures equal the records on storage.
    #[test]
    fn no_participant_is_scheduled_without_its_task(steps in prop::collection::vec(step(), 0..120)) {
        let r = World::new(Plant::None).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
