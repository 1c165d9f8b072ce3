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

impl Timestamp {
    /// The UTC calendar date it falls on: (year, month 1–12, day 1–31).
    pub const fn utc_date(self) -> (u64, u32, u32) {
        // Days since 1970-01-01, counted in 400-year eras from 0000-03-01 (a year starting in
        // March puts the leap day last).
        let days = self.0 / 86_400_000 + 719_468;
        let era = days / 146_097;
        let doe = days % 146_097; // 0..146_096
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..365
        let mp = (5 * doy + 2) / 153; // 0 = March .. 11 = February
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
        (year, month, day)
    }

    /// Its UTC date as `YYYY-MM-DD`.
    pub fn utc_day(self) -> String {
        let (y, m, d) = self.utc_date();
        format!("{y:04}-{m:02}-{d:02}")
    }
}

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

#[cfg(test)]
mod date_tests {
    use super::Timestamp;

    #[test]
    fn utc_dates_match_the_calendar() {
        let day = |ms: u64| Timestamp(ms).utc_day();
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(86_399_999), "1970-01-01");
        assert_eq!(day(86_400_000), "1970-01-02");
        assert_eq!(day(951_782_400_000), "2000-02-29"); // a leap day of a century leap year
        assert_eq!(day(951_868_800_000), "2000-03-01");
        assert_eq!(day(1_709_164_800_000), "2024-02-29");
        assert_eq!(day(1_798_761_599_999), "2026-12-31");
        assert_eq!(day(1_798_761_600_000), "2027-01-01");
        assert_eq!(day(4_107_542_400_000), "2100-03-01"); // 2100 is not a leap year
    }
}
