//! Talon's sans-IO core.
//!
//! Everything here is pure: no tokio, no sockets, no files, no clock reads, no OS randomness
//! (`clippy.toml` forbids them; `.ci/run` checks the dependency tree). The shells (`talon-io` in
//! production, `talon-sim` under simulation) own all I/O.
//!
//! # The driving rule
//!
//! Every state machine here is driven the same way, after quinn-proto and str0m:
//!
//! 1. The shell calls exactly one `handle_*` method with one input. Every input carries `now`
//!    (a [`Timestamp`] or, for deadlines, a [`Monotonic`] the shell read from its clocks, real or simulated).
//! 2. The shell then drains `poll_action()` until it returns `None`, performing each action in the
//!    order given (order matters: e.g. "journal, then reply").
//! 3. The shell asks `poll_timeout()` for the next deadline and calls `handle_timeout(now)` when it
//!    passes.
//!
//! Results of actions (a journal sync, a storage read, a network ack) come back as new inputs.
//! Because the output queue is drained after every input, it never holds more than the output of one
//! input; each module documents what bounds that.

pub mod agent;
pub mod artifacts;
pub mod cluster_codec;
pub mod codec;
pub mod datastore;
pub mod events;
pub mod flows;
pub mod h2scan;
pub mod histogram;
pub mod hunts;
pub mod ids;
pub mod node;
pub mod paths;
pub mod ratelimit;
pub mod registry;
pub mod replication;
pub mod seqset;
pub mod time;

pub use ids::{ClientId, FlowId, HuntId, IdError};
pub use time::{Monotonic, Timestamp};
