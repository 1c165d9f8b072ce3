//! The node's policy, as machines the node's shell drives (docs/architecture.md, "The node").
//!
//! A node combines the core machines (registry, flows, hunts, replication) with policy of its own:
//! which tasks wait for which client and when they are sent again, in what order replicated events,
//! cursors and acknowledgements happen. That policy lives here, in the same handle/poll style: every
//! side effect is an action carrying what identifies it, and its result comes back as an input with
//! an [`Outcome`] — done, certainly not done, or maybe done.

pub mod completions;
pub mod hunt_tasks;
pub mod intake;
pub mod master;
pub mod tasks;

#[cfg(test)]
pub(crate) mod testing;

/// How an effect the shell was asked for ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done and durable.
    Done,
    /// Certainly not done (refused as busy, or failed before anything was written): safe to retry
    /// or revert.
    Refused,
    /// Maybe done (the write was sent and no answer came, or the node is stopping): treated as
    /// either — whatever follows must be right whether it happened or not.
    Unknown,
}

/// Names one effect in flight, so its result finds what asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);
