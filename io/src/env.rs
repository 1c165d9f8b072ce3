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
    /// The machine's name (who holds a lease; a simulated node's own name).
    pub host: String,
    /// This process's id (a simulated node's incarnation).
    pub pid: u32,
}

impl Env {
    /// The real clock, the OS's randomness, tokio TCP.
    pub fn real() -> Env {
        Env {
            clock: Arc::new(SystemClock),
            entropy: Arc::new(OsEntropy::default()),
            net: TokioNet::shared(),
            host: crate::storage::lease::host_name(),
            pid: std::process::id(),
        }
    }
}

/// Raises this process's open-file limit to at least `wanted` if it is lower (the soft limit up to
/// the hard one, and the hard one too where permitted, e.g. as root). Returns the limit now in force;
/// a server or load generator holding many connections calls it at start.
pub fn raise_fd_limit(wanted: u64) -> Result<u64, String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return Ok(current);
    }
    let max = now.maximum.unwrap_or(u64::MAX);
    // Above the hard limit only a privileged process may go; try, then settle for the hard limit.
    if max < wanted
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: Some(wanted),
            },
        )
        .is_ok()
    {
        return Ok(wanted);
    }
    let target = wanted.min(max);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: now.maximum,
        },
    )
    .map_err(|e| format!("cannot raise the open-file limit to {target}: {e}"))?;
    Ok(target)
}
