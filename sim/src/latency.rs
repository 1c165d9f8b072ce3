//! The shared volume's latency: every operation costs a draw from `min_ms..=max_ms` (the seed's
//! 40–60 ms for NFS/EFS), plus a bandwidth term for large transfers.

use crate::rng::SimRng;

/// Per-operation latency of a simulated storage device.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyModel {
    /// Fastest operation.
    pub min_ms: u64,
    /// Slowest operation.
    pub max_ms: u64,
    /// Transfer rate; 0 means size does not matter.
    pub bytes_per_ms: u64,
}

impl LatencyModel {
    /// The seed document's network volume: 40–60 ms per operation, ~100 MB/s.
    pub fn network_volume() -> LatencyModel {
        LatencyModel {
            min_ms: 40,
            max_ms: 60,
            bytes_per_ms: 100_000,
        }
    }

    /// A local SSD: well under a millisecond per operation, ~1 GB/s.
    pub fn local_ssd() -> LatencyModel {
        LatencyModel {
            min_ms: 0,
            max_ms: 1,
            bytes_per_ms: 1_000_000,
        }
    }

    /// The latency of one operation moving `bytes`.
    pub fn draw_ms(&self, rng: &mut SimRng, bytes: u64) -> u64 {
        let transfer = bytes.checked_div(self.bytes_per_ms).unwrap_or(0);
        rng.range(self.min_ms, self.max_ms) + transfer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_range_and_cover_it() {
        let m = LatencyModel::network_volume();
        let mut rng = SimRng::new(42);
        let draws: Vec<u64> = (0..2000).map(|_| m.draw_ms(&mut rng, 0)).collect();
        assert!(draws.iter().all(|d| (40..=60).contains(d)));
        assert!(draws.contains(&40) && draws.contains(&60));
        assert_eq!(
            m.draw_ms(&mut SimRng::new(1), 1_000_000) - 10,
            m.draw_ms(&mut SimRng::new(1), 0)
        );
    }
}
