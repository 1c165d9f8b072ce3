//! A fixed-size latency histogram: log-linear buckets (16 per power of two, so a reported quantile is
//! within 1/16 ≈ 6% of the true value) over microseconds, from 0 to about 2^40 µs (12 days). Memory
//! is fixed (a few KiB) however many values are recorded; merging two is adding their buckets.

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Powers of two covered above the linear range.
const EXPONENTS: usize = 40;
const BUCKETS: usize = (SUB as usize) * (EXPONENTS + 1);

/// Counts of values by bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    // v has `bits` significant bits; keep the top SUB_BITS + 1 of them.
    let bits = 64 - v.leading_zeros();
    let shift = bits - SUB_BITS - 1;
    let idx = (u64::from(shift) + 1) * SUB + ((v >> shift) - SUB);
    (idx as usize).min(BUCKETS - 1)
}

/// The largest value that lands in bucket `i` (what a quantile reports: never an underestimate).
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let mantissa = SUB + i % SUB;
    ((mantissa + 1) << shift) - 1
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// Records one value (microseconds).
    pub fn record(&mut self, micros: u64) {
        self.counts[bucket(micros)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest value recorded.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0.0–1.0): the upper edge of the bucket holding it, capped at the
    /// maximum recorded; 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(i).min(self.max);
            }
        }
        self.max
    }

    /// Adds another histogram's values.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000u64 {
            h.record(v * 1000); // 1..1000 ms
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((500_000..=500_000 * 17 / 16).contains(&p50), "{p50}");
        assert!((990_000..=1_000_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1_000_000);
        let mut other = Histogram::new();
        other.record(5_000_000);
        h.merge(&other);
        assert_eq!(
            (h.count(), h.max(), h.quantile(1.0)),
            (1001, 5_000_000, 5_000_000)
        );
    }

    proptest! {
        /// Every value lands in a bucket whose range holds it, within 1/16 of the value.
        #[test]
        fn buckets_hold_their_values(v in any::<u64>().prop_map(|v| v >> (v % 64))) {
            let i = bucket(v);
            prop_assume!(i < BUCKETS - 1);
            let high = bucket_high(i);
            prop_assert!(v <= high, "{} above its bucket's top {}", v, high);
            let low = if i == 0 { 0 } else { bucket_high(i - 1) + 1 };
            prop_assert!(v >= low, "{} below its bucket's bottom {}", v, low);
            prop_assert!(high - low <= v / 16 + 1);
        }
    }
}
