//! Storage as the shell sees it: a node's fast local disk ([`local`]), and the append-only journal
//! built on it ([`journal`]). Both are traits or generic over one, so the simulator substitutes its
//! own disks and runs this same code.

pub mod journal;
pub mod local;
pub mod volume;
