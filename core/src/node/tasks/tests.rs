//! The task book: unit cases, and a harness property over a model store whose writes and deletes end
//! done, refused or unknown, clients that come and go and acknowledge, and master crashes.

use super::*;
use crate::node::testing::{Ending, ending};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn limits(max: usize) -> TaskLimits {
    TaskLimits {
        per_client_max: max,
        resend_ms: 100,
    }
}

fn client(i: u8) -> ClientId {
    ClientId::from_public_key(&[i; 32])
}

fn flow(i: u64) -> FlowId {
    FlowId::from_u64(i)
}

fn drain(b: &mut TaskBook<u64, u64>) -> Vec<TaskAction<u64, u64>> {
    std::iter::from_fn(|| b.poll_action()).collect()
}

#[test]
fn a_task_is_sent_only_once_written_and_a_refused_one_leaves_nothing() {
    let mut b = TaskBook::restore(limits(2), Monotonic(0), []);
    let c = client(1);
    let t1 = b.create(c.clone(), flow(1), 10, 100).unwrap();
    assert!(matches!(
        &drain(&mut b)[..],
        [TaskAction::Write { task: 10, .. }]
    ));
    b.handle_timeout(Monotonic(1000));
    assert_eq!(b.pending(&c).count(), 0);
    assert_eq!(
        drain(&mut b),
        vec![],
        "nothing is sent before its write ends"
    );
    b.handle_written(t1, Outcome::Done);
    assert_eq!(
        drain(&mut b),
        vec![
            TaskAction::Created {
                token: t1,
                client: c.clone(),
                flow: flow(1),
                outcome: Outcome::Done,
                context: 100
            },
            TaskAction::Deliver {
                client: c.clone(),
                task: 10
            }
        ]
    );
    let t2 = b.create(c.clone(), flow(2), 20, 200).unwrap();
    drain(&mut b);
    b.handle_written(t2, Outcome::Refused);
    assert!(matches!(
        &drain(&mut b)[..],
        [TaskAction::Created {
            outcome: Outcome::Refused,
            context: 200,
            ..
        }]
    ));
    assert_eq!(b.waiting(&c), 1);
    assert_eq!(b.pending(&c).count(), 1);
}

#[test]
fn the_per_client_bound_counts_writes_and_deletes_in_flight() {
    let mut b = TaskBook::restore(limits(2), Monotonic(0), []);
    let c = client(1);
    let t1 = b.create(c.clone(), flow(1), 10, 0).unwrap();
    b.create(c.clone(), flow(2), 20, 0).unwrap();
    assert_eq!(
        b.create(c.clone(), flow(3), 30, 0),
        Err(TaskError::Full {
            client: c.clone(),
            max: 2
        })
    );
    assert_eq!(
        b.create(c.clone(), flow(2), 20, 0),
        Err(TaskError::Duplicate { flow: flow(2) })
    );
    b.handle_written(t1, Outcome::Done);
    assert!(b.handle_acked(&c, &flow(1)));
    assert!(!b.handle_acked(&c, &flow(1)), "a duplicate ack");
    drain(&mut b);
    // The delete's outcome is unknown: the slot is kept, and the delete is tried again.
    b.handle_deleted(&c, &flow(1), Outcome::Unknown);
    assert!(b.create(c.clone(), flow(3), 30, 0).is_err());
    b.handle_timeout(Monotonic(100));
    assert!(drain(&mut b).contains(&TaskAction::Delete {
        client: c.clone(),
        flow: flow(1)
    }));
    b.handle_deleted(&c, &flow(1), Outcome::Done);
    assert!(b.create(c.clone(), flow(3), 30, 0).is_ok());
}

#[test]
fn pending_tasks_are_sent_again_until_acknowledged() {
    let c = client(1);
    let mut b: TaskBook<u64, u64> =
        TaskBook::restore(limits(4), Monotonic(0), [(c.clone(), flow(1), 10)]);
    assert_eq!(b.poll_timeout(), Some(Monotonic(100)));
    b.handle_timeout(Monotonic(99));
    assert_eq!(drain(&mut b), vec![]);
    b.handle_timeout(Monotonic(100));
    let deliver = TaskAction::Deliver {
        client: c.clone(),
        task: 10,
    };
    assert_eq!(drain(&mut b), vec![deliver]);
    b.handle_acked(&c, &flow(1));
    drain(&mut b);
    b.handle_timeout(Monotonic(200));
    assert_eq!(drain(&mut b), vec![], "acknowledged: sent no more");
    b.handle_deleted(&c, &flow(1), Outcome::Done);
    assert_eq!(b.poll_timeout(), None);
}

// ---- Harness property ----

#[derive(Clone, Debug)]
enum Step {
    /// Create a task for client n (a collection or a hunt's schedule).
    Create(u8),
    /// The oldest write or delete in flight ends.
    Complete(Ending),
    /// Client n connects or disconnects.
    Connect(u8, bool),
    /// Client n acknowledges the oldest task it received.
    Ack(u8),
    /// Client n's stream loses what was sent to it and not yet acknowledged (it died silently).
    Lose(u8),
    Tick(u64),
    /// The master crashes: writes in flight land (all) or not (none); it restores from storage.
    Crash(bool),
}

const CLIENTS: u8 = 3;
const MAX: usize = 3;

fn step() -> impl Strategy<Value = Step> {
    let ending = ending(6, 2, 1);
    prop_oneof![
        4 => (0..CLIENTS).prop_map(Step::Create),
        6 => ending.prop_map(Step::Complete),
        2 => ((0..CLIENTS), any::<bool>()).prop_map(|(c, up)| Step::Connect(c, up)),
        4 => (0..CLIENTS).prop_map(Step::Ack),
        1 => (0..CLIENTS).prop_map(Step::Lose),
        2 => (1u64..150).prop_map(Step::Tick),
        1 => any::<bool>().prop_map(Step::Crash),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plant {
    None,
    /// The shell sends a task when asked to write it.
    SendOnWrite,
    /// The shell never deletes an acknowledged task's record.
    SkipDelete,
}

#[derive(Clone, Debug)]
enum InFlight {
    Write(Token, ClientId, FlowId),
    Delete(ClientId, FlowId),
}

/// The task book driven by a model shell: storage, clients, the wire.
struct World {
    book: TaskBook<u64, u64>,
    plant: Plant,
    now: Monotonic,
    next_flow: u64,
    /// Each flow's task (its number).
    tasks: BTreeMap<FlowId, u64>,
    in_flight: VecDeque<InFlight>,
    /// Task records on storage.
    stored: BTreeSet<(ClientId, FlowId)>,
    /// Creations the caller was told are done (or maybe): they must be delivered and acknowledged.
    created: BTreeSet<(ClientId, FlowId)>,
    /// Connected clients and what each received, not yet acknowledged.
    connected: BTreeMap<ClientId, VecDeque<FlowId>>,
    acked: BTreeSet<(ClientId, FlowId)>,
}

impl World {
    fn new(plant: Plant) -> World {
        World {
            book: TaskBook::restore(limits(MAX), Monotonic(0), []),
            plant,
            now: Monotonic(0),
            next_flow: 1,
            tasks: BTreeMap::new(),
            in_flight: VecDeque::new(),
            stored: BTreeSet::new(),
            created: BTreeSet::new(),
            connected: BTreeMap::new(),
            acked: BTreeSet::new(),
        }
    }

    fn deliver(&mut self, c: &ClientId, f: FlowId) -> Result<(), String> {
        let key = (c.clone(), f.clone());
        // Durable before sent.
        if !self.stored.contains(&key) && !self.created.contains(&key) {
            return Err(format!("{f} sent to {c} with no record written"));
        }
        // Acknowledged: sent no more — unless a restart found its record again.
        if self.acked.contains(&key) && !self.stored.contains(&key) {
            return Err(format!("{f} sent to {c} after its acknowledgement"));
        }
        if let Some(q) = self.connected.get_mut(c)
            && !q.contains(&f)
        {
            q.push_back(f);
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        while let Some(a) = self.book.poll_action() {
            match a {
                TaskAction::Write {
                    token,
                    client,
                    flow,
                    ..
                } => {
                    if self.plant == Plant::SendOnWrite {
                        self.deliver(&client, flow.clone())?;
                    }
                    self.in_flight
                        .push_back(InFlight::Write(token, client, flow));
                }
                TaskAction::Created {
                    client,
                    flow,
                    outcome,
                    ..
                } => {
                    let key = (client, flow);
                    match outcome {
                        Outcome::Done if !self.stored.contains(&key) => {
                            return Err(format!("{key:?} reported created, not on storage"));
                        }
                        Outcome::Done | Outcome::Unknown => {
                            self.created.insert(key);
                        }
                        Outcome::Refused => {}
                    }
                }
                TaskAction::Deliver { client, task } => self.deliver(&client, flow(task))?,
                TaskAction::Delete { client, flow } => {
                    if self.plant != Plant::SkipDelete {
                        self.in_flight.push_back(InFlight::Delete(client, flow));
                    }
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
        match s {
            Step::Create(i) => {
                let n = self.next_flow;
                self.next_flow += 1;
                self.tasks.insert(flow(n), n);
                let _ = self.book.create(client(i), flow(n), n, 0);
            }
            Step::Complete(ending) => {
                if let Some(op) = self.in_flight.pop_front() {
                    let (outcome, lands) = ending.resolve(false);
                    match op {
                        InFlight::Write(t, c, f) => {
                            if lands {
                                self.stored.insert((c, f));
                            }
                            self.book.handle_written(t, outcome);
                        }
                        InFlight::Delete(c, f) => {
                            if lands {
                                self.stored.remove(&(c.clone(), f.clone()));
                            }
                            self.book.handle_deleted(&c, &f, outcome);
                        }
                    }
                }
            }
            Step::Connect(i, up) => {
                let c = client(i);
                if up {
                    self.connected.entry(c.clone()).or_default();
                    // The shell sends a connecting client's pending tasks.
                    let pending: Vec<FlowId> =
                        self.book.pending(&c).map(|(f, _)| f.clone()).collect();
                    for f in pending {
                        self.deliver(&c, f)?;
                    }
                } else {
                    self.connected.remove(&c);
                }
            }
            Step::Ack(i) => {
                let c = client(i);
                if let Some(f) = self.connected.get_mut(&c).and_then(VecDeque::pop_front) {
                    self.acked.insert((c.clone(), f.clone()));
                    self.book.handle_acked(&c, &f);
                }
            }
            Step::Lose(i) => {
                if let Some(q) = self.connected.get_mut(&client(i)) {
                    q.clear();
                }
            }
            Step::Tick(ms) => {
                self.now = self.now.plus_ms(ms);
                self.book.handle_timeout(self.now);
            }
            Step::Crash(lands) => {
                for op in std::mem::take(&mut self.in_flight) {
                    match op {
                        InFlight::Write(_, c, f) if lands => {
                            self.stored.insert((c, f));
                        }
                        InFlight::Delete(c, f) if lands => {
                            self.stored.remove(&(c, f));
                        }
                        _ => {}
                    }
                }
                // A maybe-created task that did not land is gone with the crash (nobody holds it).
                self.created
                    .retain(|k| self.stored.contains(k) || self.acked.contains(k));
                let tasks: Vec<_> = self
                    .stored
                    .iter()
                    .map(|(c, f)| (c.clone(), f.clone(), self.tasks[f]))
                    .collect();
                self.book = TaskBook::restore(limits(MAX), self.now, tasks);
                for q in self.connected.values_mut() {
                    q.clear(); // Streams are gone; clients reconnect.
                }
                self.connected.clear();
            }
        }
        self.drain()?;
        for i in 0..CLIENTS {
            if self.book.waiting(&client(i)) > MAX {
                return Err(format!("client {i} has over {MAX} tasks waiting"));
            }
        }
        // Every task on storage not acknowledged is pending in the book.
        for (c, f) in &self.stored {
            if !self.acked.contains(&(c.clone(), f.clone()))
                && !self.book.pending(c).any(|(p, _)| p == f)
            {
                return Err(format!("{f} of {c} is on storage and not in the book"));
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
        }
        // Heal: every write ends, every client connects (one still connected is not told again:
        // what its stream lost must come from the resends) and acknowledges what it gets.
        for i in 0..CLIENTS {
            if !self.connected.contains_key(&client(i)) {
                self.step(Step::Connect(i, true))?;
            }
        }
        for _ in 0..100 {
            while !self.in_flight.is_empty() {
                self.step(Step::Complete(Ending::Done))?;
            }
            for i in 0..CLIENTS {
                while self
                    .connected
                    .get(&client(i))
                    .is_some_and(|q| !q.is_empty())
                {
                    self.step(Step::Ack(i))?;
                }
            }
            self.step(Step::Tick(100))?;
        }
        let unacked: Vec<_> = self.created.difference(&self.acked).collect();
        if !unacked.is_empty() {
            return Err(format!("created and never acknowledged: {unacked:?}"));
        }
        if !self.stored.is_empty() {
            return Err(format!(
                "records left after acknowledgement: {:?}",
                self.stored
            ));
        }
        if self.book.poll_timeout().is_some() {
            return Err("the book still holds tasks".into());
        }
        Ok(())
    }
}

fn history() -> Vec<Step> {
    use Step::*;
    vec![
        Connect(0, true),
        Create(0),
        Complete(Ending::Done),
        Ack(0),
        Tick(100),
    ]
}

#[test]
fn the_checks_catch_a_task_sent_before_its_write_and_a_record_never_deleted() {
    assert_eq!(World::new(Plant::None).run(history()), Ok(()));
    let early = World::new(Plant::SendOnWrite).run(history());
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.contains("no record written")),
        "{early:?}"
    );
    let kept = World::new(Plant::SkipDelete).run(history());
    assert!(
        kept.as_ref().is_err_and(|e| e.contains("records left")),
        "{kept:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// A task is sent only once its record is (maybe) written, and to the caller's "done" only
    /// when it is; at most `per_client_max` wait per client; whatever storage and crashes do, every
    /// task created is delivered until acknowledged, then sent no more and its record deleted.
    #[test]
    fn tasks_are_durable_before_sent_and_sent_until_acknowledged(steps in prop::collection::vec(step(), 0..150)) {
        let r = World::new(Plant::None).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
