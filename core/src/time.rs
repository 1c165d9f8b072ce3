//! Time as the core sees it: numbers the shell hands in, never read from a clock here.
//!
//! Two kinds, kept apart by type (docs/architecture.md, "Time"): [`Timestamp`] is the wall clock,
//! for what is persisted or shown (when a client was last seen, when a hunt expires, when a flow
//! finished); [`Monotonic`] is a clock that never goes backwards nor jumps, for deadlines (resends,
//! pacing, idle sweeps). A wall clock stepped back an hour must not stall every timer for an hour.

use std::fmt;

/// The arithmetic both kinds share (they differ in what they mean, not in how they add up).
macro_rules! milliseconds {
    ($t:ident, $show:literal) => {
        impl $t {
            /// The time in milliseconds (from the Unix epoch, or from the clock's origin).
            pub const fn as_ms(self) -> u64 {
                self.0
            }

            /// `self + ms`, saturating at the far future.
            pub const fn plus_ms(self, ms: u64) -> $t {
                $t(self.0.saturating_add(ms))
            }

            /// Milliseconds from `earlier` to `self`; zero if `earlier` is later.
            pub const fn since_ms(self, earlier: $t) -> u64 {
                self.0.saturating_sub(earlier.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $show, self.0)
            }
        }
    };
}

/// Milliseconds since the Unix epoch, as read by the shell (real or simulated clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

milliseconds!(Timestamp, "{}ms");

/// Milliseconds on a monotonic clock from an arbitrary origin (the shell's start; the simulator's
/// virtual time). Only differences mean anything: never persisted, never shown, never compared
/// with a [`Timestamp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Monotonic(pub u64);

milliseconds!(Monotonic, "+{}ms");

/// The earlier of two optional deadlines.
pub fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
