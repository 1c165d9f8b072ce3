//! What the node machines' harnesses share: how a model store ends an effect a machine asked for.

use super::Outcome;
use super::completions::FlowRecord;
use crate::HuntId;
use crate::flows::{FinalState, FlowOutcome};
use crate::time::Timestamp;
use proptest::prelude::*;

/// How a model store ends an effect: done, refused, or unknown — having happened (`true`) or not.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ending {
    Done,
    Refused,
    Unknown(bool),
}

impl Ending {
    /// What the machine is told, and whether the effect landed on storage. A `busy` store refuses
    /// everything.
    pub(crate) fn resolve(self, busy: bool) -> (Outcome, bool) {
        match self {
            _ if busy => (Outcome::Refused, false),
            Ending::Done => (Outcome::Done, true),
            Ending::Refused => (Outcome::Refused, false),
            Ending::Unknown(landed) => (Outcome::Unknown, landed),
        }
    }
}

/// Endings drawn with weights `done : refused : unknown`.
pub(crate) fn ending(done: u32, refused: u32, unknown: u32) -> impl Strategy<Value = Ending> {
    prop_oneof![
        done => Just(Ending::Done),
        refused => Just(Ending::Refused),
        unknown => any::<bool>().prop_map(Ending::Unknown),
    ]
}

/// A model record: `state` none while the flow runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rec {
    pub(crate) hunt: Option<HuntId>,
    pub(crate) state: Option<(FinalState, u64, u64)>,
    pub(crate) runs: Vec<u32>,
    pub(crate) error: String,
}

impl Rec {
    pub(crate) fn decode(b: &[u8]) -> Rec {
        let s = std::str::from_utf8(b).unwrap();
        let mut f = s.split('|');
        let mut next = || f.next().unwrap().to_owned();
        let hunt = Some(next())
            .filter(|h| !h.is_empty())
            .map(|h| HuntId::parse(&h).unwrap());
        let state = match next().as_str() {
            "" => None,
            st => {
                let (rows, bytes) = (next().parse().unwrap(), next().parse().unwrap());
                let st = if st == "c" {
                    FinalState::Completed
                } else {
                    FinalState::Error
                };
                Some((st, rows, bytes))
            }
        };
        let runs = next()
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| r.parse().unwrap())
            .collect();
        Rec {
            hunt,
            state,
            runs,
            error: next(),
        }
    }
}

impl FlowRecord for Rec {
    type Run = u32;
    fn says(&self, o: &FlowOutcome) -> bool {
        self.state
            .is_some_and(|(_, rows, bytes)| rows == o.rows && bytes == o.uploaded_bytes)
    }
    fn finish(&mut self, o: &FlowOutcome, _at: Timestamp, runs: Vec<u32>) {
        self.state = Some((o.state, o.rows, o.uploaded_bytes));
        self.runs = runs;
        self.error = o.error.clone();
    }
    fn fail_unlisted(&mut self, why: String) {
        self.runs.clear();
        if let Some(s) = &mut self.state {
            s.0 = FinalState::Error;
        }
        self.error = why;
    }
    fn runs(&self) -> usize {
        self.runs.len()
    }
    fn encode(&self) -> Vec<u8> {
        let hunt = self
            .hunt
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let state = match self.state {
            None => String::new(),
            Some((s, r, b)) => {
                format!(
                    "{}|{r}|{b}",
                    if s == FinalState::Completed { "c" } else { "e" }
                )
            }
        };
        let runs: Vec<String> = self.runs.iter().map(ToString::to_string).collect();
        format!("{hunt}|{state}|{}|{}", runs.join(","), self.error).into_bytes()
    }
    fn hunt(&self) -> Option<HuntId> {
        self.hunt.clone()
    }
}
