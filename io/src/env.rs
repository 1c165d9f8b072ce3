//! What a node or an agent takes from the outside world: time, randomness and the network. The
//! production binary passes the real ones ([`Env::real`]); the simulator passes seeded, simulated
//! ones, so both run the same code.

use crate::clock::{Clock, Entropy, OsEntropy, SystemClock};
use crate::net::{Net, TokioNet};
use std::sync::Arc;

/// The injected world.
#[derive(Clone)]
pub struct Env {
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Randomness (ids, jitter, start URLs).
    pub entropy: Arc<dyn Entropy>,
    /// Listeners and connections.
    pub net: Arc<dyn Net>,
}

impl Env {
    /// The real clock, the OS's randomness, tokio TCP.
    pub fn real() -> Env {
        Env {
            clock: Arc::new(SystemClock),
            entropy: Arc::new(OsEntropy::default()),
            net: TokioNet::shared(),
        }
    }
}
