//! The node harness: a master and a minion, each its real `Intake`, the master's real
//! `HuntManager`, clients that are the agent's real `FlowOutbox`, over model storage (each node's
//! write-behind buffer and the shared volume, the master's datastore) whose effects end done,
//! refused or unknown (landing or not) in any order, a replication link that loses notifications,
//! failovers, and crashes of either node.

use super::*;
use crate::agent::{FlowOutbox, OutboxAction, OutboxLimits};
use crate::flows::FinalState;
use crate::hunts::{
    ClientFacts, HuntAction, HuntLimits, HuntManager, HuntRecord, HuntSpec, Participation,
};
use crate::node::testing::{Ending, Rec, ending};
use crate::seqset::Weight;
use crate::time::Monotonic;
use crate::{ClientId, FlowId, HuntId};
use proptest::prelude::*;
use std::collections::BTreeSet;

const CLIENTS: u8 = 3;
const MASTER: usize = 0;
const MINION: usize = 1;
const MAX_IN_FLIGHT: usize = 3;

fn client(i: u8) -> ClientId {
    ClientId::from_public_key(&[i + 1; 32])
}

fn limits() -> IntakeLimits {
    IntakeLimits {
        flows: FlowLimits {
            seq_window: 64,
            stores_in_flight_max: 64,
            ..FlowLimits::default()
        },
        // Small, so the harness reaches the bound.
        settle_queue_max: 4,
        settle_batch_max: 2,
        completions: CompletionLimits {
            value_bytes_max: 4096,
            in_flight_max: 2,
        },
        event_stores_max: 2,
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// Client n produces its next message (refused while it keeps `MAX_IN_FLIGHT`).
    Produce(u8),
    /// The i-th message on client n's stream reaches its node (or stays there too: duplication).
    Deliver(u8, usize, bool),
    /// Node n's i-th effect in flight ends.
    Complete(usize, usize, Ending),
    /// Node n's write-behind buffer copies what it holds to the shared volume.
    Flush(usize),
    /// Client n fails over to the other node (its stream and what was on it are gone).
    Failover(u8),
    /// Node n crashes: effects in flight land (all) or not (none); its memory is gone.
    Crash(usize, bool),
    /// The replication link hands its next event to the master.
    Link,
    /// The link stops telling the minion what the master applied (the event stays in its outbox).
    LinkDrop,
    /// Time passes: clients resend what has no acknowledgement.
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..CLIENTS).prop_map(Step::Produce),
        5 => ((0..CLIENTS), any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(c, i, k)| Step::Deliver(c, i, k)),
        8 => ((0usize..2), any::<usize>(), ending(6, 1, 1)).prop_map(|(n, i, e)| Step::Complete(n, i, e)),
        2 => (0usize..2).prop_map(Step::Flush),
        1 => (0..CLIENTS).prop_map(Step::Failover),
        1 => ((0usize..2), any::<bool>()).prop_map(|(n, l)| Step::Crash(n, l)),
        2 => Just(Step::Link),
        1 => Just(Step::LinkDrop),
        1 => (1u64..800).prop_map(Step::Tick),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plant {
    None,
    /// The master's shell reports the hunt's outcome recorded without writing it.
    SkipHuntOutcome,
    /// A node's shell reports a settle wait done without waiting for its buffer.
    SettleWithoutFlush,
    /// The minion's shell reports a completion applied as soon as it hands it to the link.
    ReplicatedAtOnce,
}

#[derive(Clone, Debug)]
enum Effect {
    Store(FlowKey, u64),
    Audit(FlowKey),
    Settle(Token),
    Locate(Token),
    Read(Token, FlowKey),
    Write(Token, FlowKey, Vec<u8>),
    Hunt(Token, HuntId, ClientId, Participation),
}

struct Node {
    intake: Intake<Rec, u64>,
    incarnation: u64,
    effects: Vec<Effect>,
    /// The write-behind buffer (journalled on local disk: it survives a crash).
    buffered: BTreeSet<(ClientId, u64)>,
}

struct Agent {
    outbox: FlowOutbox<Payload, ()>,
    flow: FlowId,
    weights: Vec<u64>,
    produced: u64,
    node: usize,
    wire: Vec<(u64, Payload)>,
    ended: bool,
}

impl Agent {
    fn total(&self) -> u64 {
        self.weights.len() as u64 + 1
    }

    fn payload(&self, seq: u64) -> Payload {
        match self.weights.get(seq as usize) {
            Some(&rows) => Payload::Data(Weight {
                rows,
                ..Weight::default()
            }),
            None => Payload::Final {
                state: FinalState::Completed,
                error: String::new(),
            },
        }
    }

    fn reconnect(&mut self, now: Timestamp) {
        self.wire.clear();
        self.outbox.handle_disconnected();
        self.outbox
            .handle_connected(Monotonic(now.0), MAX_IN_FLIGHT);
    }
}

struct LinkEntry {
    id: u64,
    incarnation: u64,
    token: Token,
    outcome: FlowOutcome,
    runs: Vec<u32>,
}

struct World {
    plant: Plant,
    now: Timestamp,
    hunt: HuntId,
    agents: Vec<Agent>,
    nodes: [Node; 2],
    hunts: HuntManager,
    /// The shared volume's flow messages.
    volume: BTreeMap<(ClientId, u64), Payload>,
    /// The master's datastore.
    records: BTreeMap<FlowKey, Vec<u8>>,
    participants: BTreeMap<ClientId, Participation>,
    hunt_record: HuntRecord,
    /// The minion's replication outbox (durable) and what the master is applying.
    link: VecDeque<LinkEntry>,
    applying: BTreeMap<u64, LinkEntry>,
    next_entry: u64,
}

fn node(intake: Intake<Rec, u64>) -> Node {
    Node {
        intake,
        incarnation: 0,
        effects: Vec::new(),
        buffered: BTreeSet::new(),
    }
}

impl World {
    fn new(plant: Plant, weights: Vec<Vec<u64>>) -> World {
        let now = Timestamp(1_000);
        let hunt = HuntId::from_u64(42);
        let mut hunts = HuntManager::new(HuntLimits::default());
        let spec = HuntSpec {
            artifact: "Generic.Test.Rows".into(),
            params: BTreeMap::new(),
            include_labels: BTreeSet::new(),
            exclude_labels: BTreeSet::new(),
            os: None,
            expires: now.plus_ms(3_600_000),
            client_limit: None,
            description: "harness".into(),
            creator: String::new(),
        };
        hunts.create(now, hunt.clone(), spec).unwrap();
        let labels = BTreeSet::new();
        for i in 0..CLIENTS {
            let id = client(i);
            hunts.offer(
                now,
                ClientFacts {
                    id: &id,
                    os: "linux",
                    labels: &labels,
                },
            );
        }
        let (mut agents, mut records, mut participants) =
            (Vec::new(), BTreeMap::new(), BTreeMap::new());
        let mut hunt_record = None;
        while let Some(a) = hunts.poll_action() {
            match a {
                HuntAction::Schedule {
                    client: c, flow, ..
                } => {
                    // The participant, its flow record and its task are on storage together.
                    let i = (0..CLIENTS).find(|&i| client(i) == c).unwrap();
                    let rec = Rec {
                        hunt: Some(hunt.clone()),
                        state: None,
                        runs: vec![],
                        error: String::new(),
                    };
                    records.insert(
                        FlowKey {
                            client: c.clone(),
                            flow: flow.clone(),
                        },
                        rec.encode(),
                    );
                    participants.insert(c, Participation::Scheduled);
                    let mut outbox = FlowOutbox::new(OutboxLimits {
                        resend_after_ms: 500,
                        done_max: 4,
                        flows_max: 4,
                    });
                    assert_eq!(outbox.begin(flow.as_str()), crate::agent::Begin::Started);
                    let node = usize::from(i % 2);
                    outbox.handle_connected(Monotonic(now.0), MAX_IN_FLIGHT);
                    agents.push(Agent {
                        outbox,
                        flow,
                        weights: weights[usize::from(i)].clone(),
                        produced: 0,
                        node,
                        wire: vec![],
                        ended: false,
                    });
                }
                HuntAction::Record(r) => hunt_record = Some(r),
                _ => {}
            }
        }
        World {
            plant,
            now,
            hunt,
            agents,
            nodes: [
                node(Intake::master(limits())),
                node(Intake::minion(limits())),
            ],
            hunts,
            volume: BTreeMap::new(),
            records,
            participants,
            hunt_record: hunt_record.unwrap(),
            link: VecDeque::new(),
            applying: BTreeMap::new(),
            next_entry: 1,
        }
    }

    fn agent_of(&self, c: &ClientId) -> usize {
        (0..CLIENTS).position(|i| &client(i) == c).unwrap()
    }

    fn flush(&mut self, n: usize) {
        for (c, seq) in std::mem::take(&mut self.nodes[n].buffered) {
            let p = self.agents[self.agent_of(&c)].payload(seq);
            self.volume.insert((c, seq), p);
        }
    }

    /// What must be durable when a client's final status is acknowledged: every message on the
    /// shared volume, the flow's record final with exact totals, its hunt's outcome.
    fn check_final(&self, key: &FlowKey, final_seq: u64) -> Result<(), String> {
        let a = &self.agents[self.agent_of(&key.client)];
        for s in 0..=final_seq {
            if !self.volume.contains_key(&(key.client.clone(), s)) {
                return Err(format!(
                    "{key:?}: final acknowledged, message {s} not on the volume"
                ));
            }
        }
        let rows: u64 = a.weights.iter().sum();
        let rec = self.records.get(key).map(|b| Rec::decode(b));
        if rec.as_ref().and_then(|r| r.state).map(|s| s.1) != Some(rows) {
            return Err(format!(
                "{key:?}: final acknowledged, its record says {rec:?}"
            ));
        }
        if !matches!(self.participants.get(&key.client), Some(Participation::Completed { rows: r, .. }) if *r == rows)
        {
            return Err(format!(
                "{key:?}: final acknowledged, its hunt's outcome is {:?}",
                self.participants.get(&key.client)
            ));
        }
        Ok(())
    }

    fn ack(&mut self, n: usize, key: FlowKey, seq: u64, settled: bool) -> Result<(), String> {
        let k = (key.client.clone(), seq);
        if settled && !self.volume.contains_key(&k) {
            return Err(format!(
                "{key:?} {seq}: acknowledged settled, not on the volume"
            ));
        }
        if !settled && !self.volume.contains_key(&k) && !self.nodes[n].buffered.contains(&k) {
            return Err(format!("{key:?} {seq}: acknowledged, not stored"));
        }
        let i = self.agent_of(&key.client);
        if seq + 1 == self.agents[i].total() {
            self.check_final(&key, seq)?;
        }
        let (now, a) = (self.now, &mut self.agents[i]);
        if a.node == n {
            a.outbox
                .handle_ack(Monotonic(now.0), a.flow.as_str(), seq, settled);
        }
        Ok(())
    }

    fn hunt_outcome(
        &mut self,
        token: Token,
        hunt: HuntId,
        c: ClientId,
        state: FinalState,
        rows: u64,
        bytes: u64,
    ) {
        self.hunts
            .handle_outcome(self.now, &hunt, &c, state, rows, bytes);
        let mut asked = false;
        while let Some(a) = self.hunts.poll_action() {
            match a {
                HuntAction::Participant {
                    hunt,
                    client,
                    participation,
                } => {
                    asked = true;
                    if self.plant == Plant::SkipHuntOutcome {
                        self.nodes[MASTER]
                            .intake
                            .handle_hunt_recorded(token, Outcome::Done);
                    } else {
                        self.nodes[MASTER].effects.push(Effect::Hunt(
                            token,
                            hunt,
                            client,
                            participation,
                        ));
                    }
                }
                HuntAction::Record(r) => self.hunt_record = r,
                _ => {}
            }
        }
        if !asked {
            // The hunt has this outcome already (durable: a failed write is undone in memory).
            self.nodes[MASTER]
                .intake
                .handle_hunt_recorded(token, Outcome::Done);
        }
    }

    /// Performs both nodes' actions until neither has any.
    fn drain(&mut self) -> Result<(), String> {
        loop {
            let mut any = false;
            for n in [MASTER, MINION] {
                while let Some(a) = self.nodes[n].intake.poll_action() {
                    any = true;
                    self.action(n, a)?;
                }
            }
            if !any {
                return Ok(());
            }
        }
    }

    fn action(&mut self, n: usize, a: IntakeAction<u32, u64>) -> Result<(), String> {
        let effects = &mut self.nodes[n].effects;
        match a {
            IntakeAction::Store { key, seq } => effects.push(Effect::Store(key, seq)),
            IntakeAction::StoreRefusal { .. } => return Err("no budget is reached here".into()),
            IntakeAction::StoreEvent { .. } | IntakeAction::EventAck { .. } => {
                return Err("this harness sends no events".into());
            }
            IntakeAction::Audit { key } => effects.push(Effect::Audit(key)),
            IntakeAction::Settle { token } => {
                if self.plant == Plant::SettleWithoutFlush {
                    self.nodes[n].intake.handle_settled(token, true);
                } else {
                    effects.push(Effect::Settle(token));
                }
            }
            IntakeAction::Locate { token, .. } => effects.push(Effect::Locate(token)),
            IntakeAction::Record(RecordStep::Read { token, key }) => {
                effects.push(Effect::Read(token, key))
            }
            IntakeAction::Record(RecordStep::Write {
                token, key, record, ..
            }) => effects.push(Effect::Write(token, key, record)),
            IntakeAction::Record(RecordStep::HuntOutcome { token, outcome: o }) => {
                self.hunt_outcome(token, o.hunt, o.client, o.state, o.rows, o.uploaded_bytes)
            }
            IntakeAction::Ack { key, seq, settled } => self.ack(n, key, seq, settled)?,
            IntakeAction::Replicate {
                token,
                outcome,
                runs,
            } => {
                if self.plant == Plant::ReplicatedAtOnce {
                    self.nodes[n].intake.handle_replicated(token, true);
                }
                let id = self.next_entry;
                self.next_entry += 1;
                let incarnation = self.nodes[n].incarnation;
                self.link.push_back(LinkEntry {
                    id,
                    incarnation,
                    token,
                    outcome,
                    runs,
                });
            }
            IntakeAction::Applied { origin, result } => {
                let Some(e) = self.applying.remove(&origin) else {
                    return Err(format!("applied {origin}, not being applied"));
                };
                if !result.ok() {
                    self.link.push_front(e); // The master did not acknowledge it: resent.
                } else if e.incarnation == self.nodes[MINION].incarnation
                    && self.plant != Plant::ReplicatedAtOnce
                {
                    self.nodes[MINION].intake.handle_replicated(e.token, true);
                }
            }
            IntakeAction::Record(
                RecordStep::Delivered { .. } | RecordStep::StartUploads { .. },
            )
            | IntakeAction::Recorded { .. }
            | IntakeAction::NotRecorded { .. } => {}
        }
        Ok(())
    }

    fn complete(&mut self, n: usize, i: usize, ending: Ending) {
        let effects = &mut self.nodes[n].effects;
        if effects.is_empty() {
            return;
        }
        let e = effects.remove(i % effects.len());
        let (outcome, lands) = ending.resolve(false);
        let now = self.now;
        match e {
            Effect::Store(key, seq) => {
                if lands {
                    self.nodes[n].buffered.insert((key.client.clone(), seq));
                }
                self.nodes[n].intake.handle_stored(
                    Monotonic(now.0),
                    &key,
                    seq,
                    outcome == Outcome::Done,
                );
            }
            Effect::Audit(key) => {
                let found = (outcome == Outcome::Done).then(|| {
                    self.volume
                        .iter()
                        .filter(|((c, _), _)| c == &key.client)
                        .map(|((_, seq), p)| StoredMessage {
                            seq: *seq,
                            payload: p.clone(),
                        })
                        .collect()
                });
                self.nodes[n]
                    .intake
                    .handle_audit(Monotonic(now.0), &key, found);
            }
            Effect::Settle(token) => {
                self.flush(n);
                self.nodes[n].intake.handle_settled(token, true);
            }
            Effect::Locate(token) => {
                let runs = if outcome == Outcome::Done {
                    self.flush(n);
                    Ok(vec![n as u32])
                } else {
                    Err("the volume failed".into())
                };
                self.nodes[n].intake.handle_located(token, runs);
            }
            Effect::Read(token, key) => {
                let got = (outcome == Outcome::Done)
                    .then(|| self.records.get(&key).map(|b| Rec::decode(b)))
                    .ok_or(());
                self.nodes[n].intake.handle_read(now, token, got);
            }
            Effect::Write(token, key, record) => {
                if lands {
                    self.records.insert(key, record);
                }
                self.nodes[n].intake.handle_written(token, outcome);
            }
            Effect::Hunt(token, hunt, c, participation) => {
                if lands {
                    self.participants.insert(c.clone(), participation);
                }
                if outcome != Outcome::Done {
                    self.hunts.handle_outcome_failed(&hunt, &c, participation);
                }
                self.nodes[n].intake.handle_hunt_recorded(token, outcome);
            }
        }
    }

    fn crash(&mut self, n: usize, lands: bool) {
        for e in std::mem::take(&mut self.nodes[n].effects) {
            match e {
                Effect::Store(key, seq) if lands => {
                    self.nodes[n].buffered.insert((key.client, seq));
                }
                Effect::Write(_, key, record) if lands => {
                    self.records.insert(key, record);
                }
                Effect::Hunt(_, _, c, participation) if lands => {
                    self.participants.insert(c, participation);
                }
                _ => {}
            }
        }
        let incarnation = self.nodes[n].incarnation + 1;
        if n == MASTER {
            self.nodes[n].intake = Intake::master(limits());
            self.hunts = HuntManager::restore(
                HuntLimits::default(),
                self.now,
                [self.hunt_record.clone()],
                self.participants
                    .iter()
                    .map(|(c, p)| (self.hunt.clone(), c.clone(), *p)),
            );
            // Nothing it was applying was acknowledged: the minion resends it.
            for (_, e) in std::mem::take(&mut self.applying).into_iter().rev() {
                self.link.push_front(e);
            }
        } else {
            self.nodes[n].intake = Intake::minion(limits());
        }
        self.nodes[n].incarnation = incarnation;
        let now = self.now;
        for a in self.agents.iter_mut().filter(|a| a.node == n) {
            a.reconnect(now);
        }
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
        let now = self.now;
        match s {
            Step::Produce(c) => {
                let a = &mut self.agents[usize::from(c)];
                if a.produced < a.total() {
                    let seq = a.produced;
                    let is_final = seq + 1 == a.total();
                    let p = a.payload(seq);
                    if a.outbox
                        .push(Monotonic(now.0), a.flow.as_str(), p, is_final, ())
                        .is_ok()
                    {
                        a.produced += 1;
                    }
                }
            }
            Step::Deliver(c, i, keep) => {
                let a = &mut self.agents[usize::from(c)];
                if !a.wire.is_empty() {
                    let i = i % a.wire.len();
                    let (seq, p) = if keep {
                        a.wire[i].clone()
                    } else {
                        a.wire.remove(i)
                    };
                    let key = FlowKey {
                        client: client(c),
                        flow: a.flow.clone(),
                    };
                    let n = a.node;
                    let _ = self.nodes[n]
                        .intake
                        .handle_message(Monotonic(now.0), key, seq, p);
                }
            }
            Step::Complete(n, i, ending) => self.complete(n, i, ending),
            Step::Flush(n) => self.flush(n),
            Step::Failover(c) => {
                let a = &mut self.agents[usize::from(c)];
                a.node = 1 - a.node;
                a.reconnect(now);
            }
            Step::Crash(n, lands) => self.crash(n, lands),
            Step::Link => {
                if let Some(e) = self.link.pop_front() {
                    let (id, outcome, runs) = (e.id, e.outcome.clone(), e.runs.clone());
                    self.applying.insert(id, e);
                    self.nodes[MASTER]
                        .intake
                        .handle_completion(id, outcome, runs);
                }
            }
            Step::LinkDrop => {
                if let Some(e) = self.link.front()
                    && e.incarnation == self.nodes[MINION].incarnation
                {
                    let token = e.token;
                    self.nodes[MINION].intake.handle_replicated(token, false);
                }
            }
            Step::Tick(ms) => {
                self.now = now.plus_ms(ms);
                for a in &mut self.agents {
                    a.outbox.handle_timeout(Monotonic(self.now.0));
                }
                for n in &mut self.nodes {
                    n.intake.handle_timeout(Monotonic(self.now.0));
                }
            }
        }
        self.drain()?;
        for a in &mut self.agents {
            while let Some(o) = a.outbox.poll_action() {
                match o {
                    OutboxAction::Send { seq, payload, .. } => a.wire.push((seq, payload)),
                    OutboxAction::FirstAck { .. } | OutboxAction::Settled { .. } => {}
                    OutboxAction::Ended { .. } => a.ended = true,
                }
            }
        }
        for n in &self.nodes {
            if n.intake.settle_backlog() > limits().settle_queue_max + limits().settle_batch_max {
                return Err(format!("settle backlog {}", n.intake.settle_backlog()));
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
        }
        // Heal: every effect ends done, buffers flush, the link delivers, clients send everything.
        for _ in 0..60 {
            for n in [MASTER, MINION] {
                while !self.nodes[n].effects.is_empty() {
                    self.step(Step::Complete(n, 0, Ending::Done))?;
                }
                self.step(Step::Flush(n))?;
            }
            // (Once each: an event the master refuses as busy goes back to the link.)
            for _ in 0..self.link.len() {
                self.step(Step::Link)?;
            }
            for c in 0..CLIENTS {
                self.step(Step::Produce(c))?;
                while !self.agents[usize::from(c)].wire.is_empty() {
                    self.step(Step::Deliver(c, 0, false))?;
                }
            }
            self.step(Step::Tick(600))?;
        }
        for (i, a) in self.agents.iter().enumerate() {
            if !a.ended || a.outbox.unsettled() != 0 {
                return Err(format!(
                    "client {i}: its flow did not end ({} unsettled)",
                    a.outbox.unsettled()
                ));
            }
        }
        // Hunt statistics equal an independent count, in memory and on storage.
        let stats = self.hunts.get(&self.hunt).unwrap().stats();
        let rows: u64 = self
            .agents
            .iter()
            .map(|a| a.weights.iter().sum::<u64>())
            .sum();
        let expect = (u64::from(CLIENTS), u64::from(CLIENTS), rows);
        if (stats.scheduled, stats.completed, stats.rows) != expect {
            return Err(format!(
                "hunt stats {stats:?}, expected (scheduled, completed, rows) {expect:?}"
            ));
        }
        let restored = HuntManager::restore(
            HuntLimits::default(),
            self.now,
            [self.hunt_record.clone()],
            self.participants
                .iter()
                .map(|(c, p)| (self.hunt.clone(), c.clone(), *p)),
        );
        if restored.get(&self.hunt).unwrap().stats() != stats {
            return Err("the participant records on storage disagree with memory".into());
        }
        Ok(())
    }
}

fn weights() -> impl Strategy<Value = Vec<Vec<u64>>> {
    prop::collection::vec(prop::collection::vec(0u64..50, 0..5), usize::from(CLIENTS))
}

fn history() -> Vec<Step> {
    use Step::*;
    let mut h = vec![];
    for c in 0..CLIENTS {
        for _ in 0..3 {
            h.push(Produce(c));
            h.push(Deliver(c, 0, false));
            h.push(Complete(0, 0, Ending::Done));
            h.push(Complete(1, 0, Ending::Done));
        }
    }
    h
}

#[test]
fn the_checks_catch_an_early_final_ack_and_a_settled_ack_before_the_volume() {
    let w = || vec![vec![3, 4], vec![5], vec![1, 1]];
    assert_eq!(World::new(Plant::None, w()).run(history()), Ok(()));
    for (plant, says) in [
        (Plant::SkipHuntOutcome, "its hunt's outcome"),
        (Plant::SettleWithoutFlush, "settled, not on the volume"),
        (Plant::ReplicatedAtOnce, "its record says"),
    ] {
        let r = World::new(plant, w()).run(history());
        assert!(
            r.as_ref().is_err_and(|e| e.contains(says)),
            "{plant:?}: {r:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Whatever storage, the link, failovers and crashes do: an acknowledgement is for a stored
    /// message, a settled one for a message on the shared volume; a final status is acknowledged
    /// only once the flow's messages are on the volume, its record is final with exact totals and
    /// its hunt's outcome is durable; settle backlogs stay bounded; after healing every client's
    /// flow ends and the hunt's statistics equal an independent count, in memory and on storage.
    #[test]
    fn a_final_status_is_acknowledged_only_once_all_of_its_flow_is_durable(
        weights in weights(),
        steps in prop::collection::vec(step(), 0..200),
    ) {
        let r = World::new(Plant::None, weights).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}

/// invariant 7 for the settle queue: while the buffer does not settle, the intake keeps one batch
/// waiting and at most `settle_queue_max` acks behind it, dropping (and counting) the rest; once
/// the waits end, exactly the kept acks are sent again as settled, a batch per wait.
#[test]
fn the_settle_queue_is_bounded_and_settles_what_it_kept() {
    let mut intake: Intake<Rec, u64> = Intake::minion(limits());
    let now = Monotonic(1);
    let key = FlowKey {
        client: client(0),
        flow: FlowId::from_u64(1),
    };
    let data = || {
        Payload::Data(Weight {
            rows: 1,
            ..Weight::default()
        })
    };
    let mut settles = Vec::new();
    let mut settled = Vec::new();
    let mut take = |intake: &mut Intake<Rec, u64>, settles: &mut Vec<Token>| {
        while let Some(a) = intake.poll_action() {
            match a {
                IntakeAction::Store { key, seq } => intake.handle_stored(now, &key, seq, true),
                IntakeAction::Settle { token } => settles.push(token),
                IntakeAction::Ack {
                    seq, settled: true, ..
                } => settled.push(seq),
                _ => {}
            }
        }
    };
    for seq in 0..10u64 {
        intake
            .handle_message(now, key.clone(), seq, data())
            .unwrap();
        take(&mut intake, &mut settles);
    }
    assert_eq!(settles.len(), 1, "one wait in flight");
    // The first wait took the one ack there was; the queue behind it filled to its bound.
    let kept = 1 + limits().settle_queue_max;
    assert_eq!(intake.settle_backlog(), kept);
    assert_eq!(intake.settle_dropped(), 10 - kept as u64);
    while let Some(t) = settles.pop() {
        intake.handle_settled(t, true);
        take(&mut intake, &mut settles);
    }
    assert_eq!(settled, (0..kept as u64).collect::<Vec<_>>());
    assert_eq!(intake.settle_backlog(), 0);
}

fn event(seq: u64) -> crate::events::EventKey {
    crate::events::EventKey {
        client: client(0),
        artifact: "Linux.Events.ProcessStarts".into(),
        day: "2026-12-06".into(),
        stream: 7,
        seq,
    }
}

/// An event batch is stored, acknowledged unsettled, and acknowledged settled only after the
/// buffer's wait; at most `event_stores_max` are stored at once (one more is refused as busy, and
/// taken once a store ends); a resend of a batch being stored is not stored twice; a failed store
/// is not acknowledged.
#[test]
fn event_batches_are_stored_bounded_and_acknowledged_twice() {
    let mut i: Intake<Rec, u64> = Intake::minion(limits());
    let actions =
        |i: &mut Intake<Rec, u64>| std::iter::from_fn(|| i.poll_action()).collect::<Vec<_>>();
    i.handle_event(event(0)).unwrap();
    i.handle_event(event(0)).unwrap(); // A resend while it is stored: nothing more.
    i.handle_event(event(1)).unwrap();
    assert_eq!(
        actions(&mut i),
        vec![
            IntakeAction::StoreEvent { key: event(0) },
            IntakeAction::StoreEvent { key: event(1) }
        ]
    );
    assert_eq!(i.handle_event(event(2)), Err(EventsBusy { max: 2 }));
    i.handle_event_stored(&event(1), false); // Not stored: not acknowledged.
    assert_eq!(actions(&mut i), vec![]);
    i.handle_event(event(2)).unwrap();
    i.handle_event_stored(&event(0), true);
    let a = actions(&mut i);
    assert_eq!(a[0], IntakeAction::StoreEvent { key: event(2) });
    assert_eq!(
        a[1],
        IntakeAction::EventAck {
            key: event(0),
            settled: false
        }
    );
    let IntakeAction::Settle { token } = a[2] else {
        panic!("{a:?}");
    };
    assert_eq!(a.len(), 3);
    i.handle_settled(token, true);
    assert_eq!(
        actions(&mut i),
        vec![IntakeAction::EventAck {
            key: event(0),
            settled: true
        }]
    );
    assert_eq!(i.events_storing(), 1);
}
