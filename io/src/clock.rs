//! The shell's only sources of time and randomness. Everything that may run under simulation takes
//! a [`Clock`] and an [`Entropy`]; the simulator passes seeded ones. `io/clippy.toml` forbids reading
//! the system clock anywhere else.

use talon_core::{Monotonic, Timestamp};

/// A source of the current time: the wall clock for what is recorded or shown, a monotonic one for
/// deadlines (docs/architecture.md, "Time").
pub trait Clock: Send + Sync {
    /// Now, in milliseconds since the Unix epoch (may step backwards or forwards).
    fn now(&self) -> Timestamp;
    /// Now on a clock that never goes backwards, in milliseconds from an arbitrary origin.
    fn monotonic(&self) -> Monotonic;
}

/// The real wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one sanctioned read of the system clock.
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since.as_millis() as u64)
    }

    #[allow(clippy::disallowed_methods)] // The one sanctioned read of the monotonic clock.
    fn monotonic(&self) -> Monotonic {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(std::time::Instant::now);
        Monotonic(origin.elapsed().as_millis() as u64)
    }
}

impl SystemClock {
    /// The monotonic clock in microseconds, for benchmarks that time sub-millisecond work (not
    /// part of [`Clock`]: nothing that runs under simulation may need it).
    #[allow(clippy::disallowed_methods)] // The monotonic clock, as in `monotonic`.
    pub fn micros(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(std::time::Instant::now);
        origin.elapsed().as_micros() as u64
    }
}

/// A source of random bytes.
pub trait Entropy: Send + Sync {
    /// Fills `buf` with random bytes.
    fn fill(&self, buf: &mut [u8]);
}

/// The operating system's random source.
#[derive(Debug)]
pub struct OsEntropy(ring::rand::SystemRandom);

impl Default for OsEntropy {
    fn default() -> Self {
        OsEntropy(ring::rand::SystemRandom::new())
    }
}

impl Entropy for OsEntropy {
    fn fill(&self, buf: &mut [u8]) {
        use ring::rand::SecureRandom;
        self.0.fill(buf).expect("the OS random source failed");
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
