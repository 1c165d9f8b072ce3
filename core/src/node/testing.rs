//! What the node machines' harnesses share: how a model store ends an effect a machine asked for.

use super::Outcome;
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
