//! A token bucket: at most `rate_per_s` events per second on average, `burst` at once. Sans-IO: every
//! call carries `now`. Used for `Frontend.resources.connections_per_second`.

use crate::time::Timestamp;

/// The bucket. Tokens are kept in thousandths so that refill is exact in integer milliseconds.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst: u64,
    milli_tokens: u64,
    last: Timestamp,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, now: Timestamp) -> TokenBucket {
        assert!(rate_per_s > 0 && burst > 0);
        TokenBucket {
            rate_per_s,
            burst,
            milli_tokens: burst * 1000,
            last: now,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        let elapsed_ms = now.since_ms(self.last);
        if elapsed_ms > 0 {
            // rate_per_s tokens per 1000 ms = rate_per_s milli-tokens per ms.
            self.milli_tokens = (self.milli_tokens + elapsed_ms.saturating_mul(self.rate_per_s))
                .min(self.burst * 1000);
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(10, 3, Timestamp(0));
        assert_eq!((0..5).filter(|_| b.try_take(Timestamp(0))).count(), 3);
        assert!(!b.try_take(Timestamp(50)));
        assert!(b.try_take(Timestamp(100)), "one token per 100 ms at 10/s");
        assert!(!b.try_take(Timestamp(150)));
    }

    proptest! {
        /// Invariant 7 for admission: in any window, admitted ≤ burst + rate × window.
        #[test]
        fn never_admits_more_than_the_rate_allows(
            rate in 1u64..50, burst in 1u64..20,
            mut times in prop::collection::vec(0u64..10_000, 1..400),
        ) {
            times.sort_unstable();
            let mut b = TokenBucket::new(rate, burst, Timestamp(0));
            let admitted: Vec<u64> = times.iter().copied().filter(|t| b.try_take(Timestamp(*t))).collect();
            for (i, t0) in admitted.iter().enumerate() {
                for (j, t1) in admitted.iter().enumerate().skip(i) {
                    let n = (j - i + 1) as u64;
                    prop_assert!(n * 1000 <= burst * 1000 + rate * (t1 - t0), "{n} admitted in [{t0}, {t1}]");
                }
            }
        }
    }
}
