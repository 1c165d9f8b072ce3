//! A token bucket: at most `rate_per_s` events per second on average, `burst` at once, and a bounded
//! queue paced by one ([`Paced`]). Sans-IO: every call carries `now`. Used for
//! `Frontend.resources.connections_per_second` and `notifications_per_second`.

use crate::time::Monotonic;
use std::collections::{BTreeSet, VecDeque};

/// The bucket. Tokens are kept in thousandths so that refill is exact in integer milliseconds.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_per_s: u64,
    burst: u64,
    milli_tokens: u64,
    last: Monotonic,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, now: Monotonic) -> TokenBucket {
        assert!(rate_per_s > 0 && burst > 0);
        TokenBucket {
            rate_per_s,
            burst,
            milli_tokens: burst * 1000,
            last: now,
        }
    }

    fn refill(&mut self, now: Monotonic) {
        let elapsed_ms = now.since_ms(self.last);
        if elapsed_ms > 0 {
            // rate_per_s tokens per 1000 ms = rate_per_s milli-tokens per ms.
            self.milli_tokens = (self.milli_tokens + elapsed_ms.saturating_mul(self.rate_per_s))
                .min(self.burst * 1000);
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Monotonic) -> bool {
        self.refill(now);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }

    /// When the next token is available (`now` if one is).
    pub fn ready_at(&mut self, now: Monotonic) -> Monotonic {
        self.refill(now);
        let missing = 1000u64.saturating_sub(self.milli_tokens);
        now.plus_ms(missing.div_ceil(self.rate_per_s))
    }
}

/// Why [`Paced::push`] refused an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull {
    /// The bound.
    pub max: usize,
}

/// A bounded FIFO released at a token bucket's rate, holding each key at most once (pushing a key
/// already queued is a no-op: a task sent again while its first notification still waits).
#[derive(Clone, Debug)]
pub struct Paced<K, V> {
    bucket: TokenBucket,
    queue: VecDeque<(K, V)>,
    queued: BTreeSet<K>,
    max: usize,
}

impl<K: Ord + Clone, V> Paced<K, V> {
    /// `rate_per_s` releases per second (bursts of one second's worth), at most `max` queued.
    pub fn new(rate_per_s: u64, max: usize, now: Monotonic) -> Self {
        Paced {
            bucket: TokenBucket::new(rate_per_s, rate_per_s, now),
            queue: VecDeque::new(),
            queued: BTreeSet::new(),
            max,
        }
    }

    /// Queues `value` under `key` unless `key` is queued already. At the bound it is refused.
    pub fn push(&mut self, key: K, value: V) -> Result<(), QueueFull> {
        if self.queued.contains(&key) {
            return Ok(());
        }
        if self.queue.len() >= self.max {
            return Err(QueueFull { max: self.max });
        }
        self.queued.insert(key.clone());
        self.queue.push_back((key, value));
        Ok(())
    }

    /// The next item, if one is queued and the rate allows it now.
    pub fn poll(&mut self, now: Monotonic) -> Option<(K, V)> {
        if self.queue.is_empty() || !self.bucket.try_take(now) {
            return None;
        }
        let (k, v) = self.queue.pop_front()?;
        self.queued.remove(&k);
        Some((k, v))
    }

    /// When `poll` can next release something (`None` if nothing is queued).
    pub fn poll_timeout(&mut self, now: Monotonic) -> Option<Monotonic> {
        if self.queue.is_empty() {
            None
        } else {
            Some(self.bucket.ready_at(now))
        }
    }

    /// Items queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::new(10, 3, Monotonic(0));
        assert_eq!((0..5).filter(|_| b.try_take(Monotonic(0))).count(), 3);
        assert!(!b.try_take(Monotonic(50)));
        assert!(b.try_take(Monotonic(100)), "one token per 100 ms at 10/s");
        assert!(!b.try_take(Monotonic(150)));
    }

    #[test]
    fn paced_releases_at_the_rate_dedupes_and_refuses_at_the_bound() {
        let mut p = Paced::new(2, 3, Monotonic(0));
        p.push("a", 1).unwrap();
        p.push("a", 9).unwrap(); // already queued: no-op
        p.push("b", 2).unwrap();
        p.push("c", 3).unwrap();
        assert_eq!(p.push("d", 4), Err(QueueFull { max: 3 }));
        assert_eq!(p.len(), 3);
        assert_eq!(p.poll(Monotonic(0)), Some(("a", 1)));
        assert_eq!(p.poll(Monotonic(0)), Some(("b", 2)));
        assert_eq!(p.poll(Monotonic(0)), None, "burst of 2 spent");
        assert_eq!(p.poll_timeout(Monotonic(0)), Some(Monotonic(500)));
        assert_eq!(p.poll(Monotonic(499)), None);
        assert_eq!(p.poll(Monotonic(500)), Some(("c", 3)));
        assert_eq!(p.poll_timeout(Monotonic(500)), None);
        p.push("a", 5).unwrap(); // released earlier, so queued again
        assert_eq!(p.poll(Monotonic(1000)), Some(("a", 5)));
    }

    proptest! {
        /// Invariant 7 for admission: in any window, admitted ≤ burst + rate × window.
        #[test]
        fn never_admits_more_than_the_rate_allows(
            rate in 1u64..50, burst in 1u64..20,
            mut times in prop::collection::vec(0u64..10_000, 1..400),
        ) {
            times.sort_unstable();
            let mut b = TokenBucket::new(rate, burst, Monotonic(0));
            let admitted: Vec<u64> = times.iter().copied().filter(|t| b.try_take(Monotonic(*t))).collect();
            for (i, t0) in admitted.iter().enumerate() {
                for (j, t1) in admitted.iter().enumerate().skip(i) {
                    let n = (j - i + 1) as u64;
                    prop_assert!(n * 1000 <= burst * 1000 + rate * (t1 - t0), "{n} admitted in [{t0}, {t1}]");
                }
            }
        }
    }
}
