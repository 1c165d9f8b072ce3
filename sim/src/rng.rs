//! Seeded randomness: one seed per run, a named sub-stream per component.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic random stream.
#[derive(Clone, Debug)]
pub struct SimRng(ChaCha8Rng);

impl SimRng {
    /// The run's root stream.
    pub fn new(seed: u64) -> SimRng {
        SimRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// An independent stream for one component, derived from this one's seed material and a label
    /// (FNV-1a of the label), without consuming draws from this stream.
    pub fn fork(&self, label: &str) -> SimRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut seed = self.0.get_seed();
        for (i, b) in h.to_le_bytes().iter().enumerate() {
            seed[i] ^= b;
        }
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(self.0.get_stream() ^ h);
        SimRng(r)
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi);
        self.0.random_range(lo..=hi)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.0.random_bool(p.min(1.0))
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Fills `buf` with random bytes (keys, nonces).
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_forks_are_independent() {
        let draws = |seed| {
            let root = SimRng::new(seed);
            let mut a = root.fork("disk");
            let mut b = root.fork("net");
            (0..8)
                .map(|_| (a.next_u64(), b.next_u64()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
        let root = SimRng::new(1);
        assert_ne!(root.fork("disk").next_u64(), root.fork("net").next_u64());
        // Forking consumes nothing from the parent.
        let mut p1 = SimRng::new(3);
        let _ = p1.fork("x");
        assert_eq!(p1.next_u64(), SimRng::new(3).next_u64());
    }
}
