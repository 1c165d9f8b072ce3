use super::*;
use crate::FlowId;
use crate::node::testing::{Ending, Rec, ending};
use proptest::prelude::*;
use std::collections::BTreeMap;

const FLOWS: u8 = 4;
/// Big enough for a few runs, not for flow 2's two hundred.
const VALUE_MAX: u64 = 400;

fn key(i: u8) -> FlowKey {
    FlowKey {
        client: ClientId::from_public_key(&[i; 32]),
        flow: FlowId::from_u64(u64::from(i) + 1),
    }
}

fn hunt() -> HuntId {
    HuntId::from_u64(7)
}

/// Flows 0 and 1 are a hunt's; 2 a collection whose runs do not fit; 3 has no record.
fn outcome(i: u8) -> FlowOutcome {
    FlowOutcome {
        key: key(i),
        state: if i == 1 {
            FinalState::Error
        } else {
            FinalState::Completed
        },
        error: String::new(),
        rows: u64::from(i) * 10 + 1,
        uploaded_bytes: if i == 0 { 5 } else { 0 },
        uploads: u64::from(i == 0),
        messages: 3,
    }
}

fn runs(i: u8) -> Vec<u32> {
    if i == 2 {
        (100..300).collect()
    } else {
        vec![u32::from(i)]
    }
}

fn initial_record(i: u8) -> Option<Rec> {
    (i != 3).then(|| Rec {
        hunt: (i < 2).then(hunt),
        state: None,
        runs: vec![],
        error: String::new(),
    })
}

#[derive(Clone, Debug)]
enum Step {
    /// A node reports flow n complete (again).
    Report(u8),
    /// The oldest effect in flight ends.
    Complete(Ending),
    /// The master crashes: effects in flight land (all) or not (none); completions in flight are
    /// forgotten (their reports come again).
    Crash(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..FLOWS).prop_map(Step::Report),
        6 => ending(5, 2, 2).prop_map(Step::Complete),
        1 => any::<bool>().prop_map(Step::Crash),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plant {
    None,
    /// The shell reports the hunt's outcome recorded without writing it.
    SkipHuntOutcome,
    /// The shell reports every record write done.
    WriteAlwaysDone,
}

enum Effect {
    Read(Token, FlowKey),
    Write(Token, FlowKey, Vec<u8>, bool),
    Hunt(Token, ClientId),
}

struct World {
    m: Completions<Rec, u8>,
    plant: Plant,
    now: Timestamp,
    in_flight: VecDeque<Effect>,
    records: BTreeMap<FlowKey, Vec<u8>>,
    markers: BTreeSet<FlowKey>,
    hunt_outcomes: BTreeSet<ClientId>,
    /// Flows reported, and those whose report ended recorded.
    reported: BTreeSet<u8>,
    recorded: BTreeSet<u8>,
}

fn limits() -> CompletionLimits {
    CompletionLimits {
        value_bytes_max: VALUE_MAX,
        in_flight_max: 3,
    }
}

impl World {
    fn new(plant: Plant) -> World {
        World {
            m: Completions::new(limits()),
            plant,
            now: Timestamp(1),
            in_flight: VecDeque::new(),
            records: (0..FLOWS)
                .filter_map(|i| Some((key(i), initial_record(i)?.encode())))
                .collect(),
            markers: BTreeSet::new(),
            hunt_outcomes: BTreeSet::new(),
            reported: BTreeSet::new(),
            recorded: BTreeSet::new(),
        }
    }

    fn stored(&self, k: &FlowKey) -> Option<Rec> {
        self.records.get(k).map(|b| Rec::decode(b))
    }

    /// What must be durable when flow `i`'s completion is reported recorded.
    fn check_durable(&self, i: u8) -> Result<(), String> {
        let (k, o) = (key(i), outcome(i));
        let Some(rec) = self.stored(&k) else {
            return if i == 3 {
                Ok(())
            } else {
                Err(format!("flow {i}: recorded with no record"))
            };
        };
        match rec.state {
            Some((_, rows, bytes)) if rows == o.rows && bytes == o.uploaded_bytes => {}
            _ => return Err(format!("flow {i}: recorded, its record says {rec:?}")),
        }
        if i == 2 && (rec.state.unwrap().0 != FinalState::Error || !rec.runs.is_empty()) {
            return Err(format!("flow {i}: too large, recorded as {rec:?}"));
        }
        if i != 2 && rec.runs != runs(i) {
            return Err(format!("flow {i}: runs {:?}", rec.runs));
        }
        if o.uploads > 0 && !self.markers.contains(&k) {
            return Err(format!("flow {i}: recorded without its uploads marker"));
        }
        if rec.hunt.is_some() && !self.hunt_outcomes.contains(&k.client) {
            return Err(format!(
                "flow {i}: recorded before its hunt's outcome is durable"
            ));
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), String> {
        while let Some(a) = self.m.poll_action() {
            match a {
                CompletionAction::Step(RecordStep::Delivered { .. }) => {}
                CompletionAction::Step(RecordStep::Read { token, key }) => {
                    self.in_flight.push_back(Effect::Read(token, key))
                }
                CompletionAction::Step(RecordStep::Write {
                    token,
                    key,
                    record,
                    uploads_marker,
                }) => {
                    if Rec::decode(&record).state.is_none() {
                        return Err(format!("{key:?}: wrote a running record"));
                    }
                    if record.len() as u64 > VALUE_MAX {
                        return Err(format!("{key:?}: wrote {} bytes", record.len()));
                    }
                    self.in_flight
                        .push_back(Effect::Write(token, key, record, uploads_marker));
                }
                CompletionAction::Step(RecordStep::StartUploads { key }) => {
                    if !self.markers.contains(&key)
                        || self.stored(&key).is_none_or(|r| r.state.is_none())
                    {
                        return Err(format!("{key:?}: uploads started before the record"));
                    }
                }
                CompletionAction::Step(RecordStep::HuntOutcome { token, outcome }) => {
                    let client = outcome.client;
                    if self.plant == Plant::SkipHuntOutcome {
                        self.m.handle_hunt_recorded(token, Outcome::Done);
                    } else {
                        self.in_flight.push_back(Effect::Hunt(token, client));
                    }
                }
                CompletionAction::Done {
                    origin,
                    key: k,
                    result,
                } => {
                    if k != key(origin) {
                        return Err(format!("report of {origin} ended as {k:?}"));
                    }
                    if result.ok() {
                        self.check_durable(origin)?;
                        self.recorded.insert(origin);
                    }
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, s: Step) -> Result<(), String> {
        match s {
            Step::Report(i) => {
                self.reported.insert(i);
                self.m.handle_completed(i, outcome(i), runs(i));
            }
            Step::Complete(ending) => {
                if let Some(e) = self.in_flight.pop_front() {
                    let (outcome, lands) = ending.resolve(false);
                    match e {
                        Effect::Read(t, k) => {
                            let got = match outcome {
                                Outcome::Done => Ok(self.stored(&k)),
                                _ => Err(()),
                            };
                            self.m.handle_read(self.now, t, got);
                        }
                        Effect::Write(t, k, record, marker) => {
                            if lands {
                                self.records.insert(k.clone(), record);
                                if marker {
                                    self.markers.insert(k);
                                }
                            }
                            let told = if self.plant == Plant::WriteAlwaysDone {
                                Outcome::Done
                            } else {
                                outcome
                            };
                            self.m.handle_written(t, told);
                        }
                        Effect::Hunt(t, client) => {
                            if lands {
                                self.hunt_outcomes.insert(client);
                            }
                            self.m.handle_hunt_recorded(t, outcome);
                        }
                    }
                }
            }
            Step::Crash(lands) => {
                if lands {
                    while !self.in_flight.is_empty() {
                        self.step(Step::Complete(Ending::Unknown(true)))?;
                    }
                }
                self.in_flight.clear();
                self.m = Completions::new(limits());
            }
        }
        self.now = self.now.plus_ms(1);
        self.drain()
    }

    fn run(&mut self, steps: Vec<Step>) -> Result<(), String> {
        for s in steps {
            self.step(s)?;
        }
        // Heal: every effect ends done, and every flow reported and not recorded is reported again
        // (the client resends its final status, the minion its event) until it is.
        for _ in 0..10 {
            while !self.in_flight.is_empty() {
                self.step(Step::Complete(Ending::Done))?;
            }
            let left: Vec<u8> = self.reported.difference(&self.recorded).copied().collect();
            for i in left {
                self.step(Step::Report(i))?;
            }
        }
        if self.reported != self.recorded {
            return Err(format!(
                "reported {:?}, recorded {:?}",
                self.reported, self.recorded
            ));
        }
        if self.m.in_flight() != 0 {
            return Err("completions left in flight".into());
        }
        Ok(())
    }
}

fn history() -> Vec<Step> {
    use Step::*;
    vec![Report(0), Report(1), Report(2), Report(3)]
}

#[test]
fn a_second_report_of_a_flow_in_flight_is_refused_as_busy() {
    let mut m: Completions<Rec, u8> = Completions::new(limits());
    m.handle_completed(1, outcome(0), runs(0));
    m.handle_completed(2, outcome(0), runs(0));
    let actions: Vec<_> = std::iter::from_fn(|| m.poll_action()).collect();
    assert!(actions.contains(&CompletionAction::Done {
        origin: 2,
        key: key(0),
        result: Recorded::Busy
    }));
    assert_eq!(m.in_flight(), 1);
}

#[test]
fn the_checks_catch_a_completion_reported_before_its_record_or_hunt_outcome_is_durable() {
    assert_eq!(World::new(Plant::None).run(history()), Ok(()));
    let hunt = World::new(Plant::SkipHuntOutcome).run(history());
    assert!(
        hunt.as_ref().is_err_and(|e| e.contains("hunt's outcome")),
        "{hunt:?}"
    );
    use Step::*;
    let refused = vec![Report(2), Complete(Ending::Done), Complete(Ending::Refused)];
    let lied = World::new(Plant::WriteAlwaysDone).run(refused.clone());
    assert!(
        lied.as_ref().is_err_and(|e| e.contains("its record says")),
        "{lied:?}"
    );
    assert_eq!(World::new(Plant::None).run(refused), Ok(()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Whatever storage and crashes do: a completion is reported recorded only when its record (in
    /// its final state, with exact totals, fitted to the value bound), its uploads marker and its
    /// hunt's outcome are durable; no running record is ever written; and resent reports end
    /// recorded once storage heals.
    #[test]
    fn a_completion_is_recorded_only_once_all_of_it_is_durable(steps in prop::collection::vec(step(), 0..120)) {
        let r = World::new(Plant::None).run(steps);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
