//! A set of sequence numbers with per-number weights, stored as a contiguous prefix plus a bounded
//! sparse window above it. Used to know which flow messages are durably stored (and how many rows and
//! bytes they carry) without growing with the length of the flow.

use std::collections::BTreeMap;

/// Rows, uploaded bytes and finished uploads one stored message carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Weight {
    /// Result rows.
    pub rows: u64,
    /// Uploaded file bytes.
    pub bytes: u64,
    /// Uploads this message finishes (its last chunk: an empty file is one chunk of no bytes).
    pub uploads: u64,
    /// Bytes of data the message carries (rows' JSON, chunk data, log text): what a flow's byte
    /// budget counts.
    pub data_bytes: u64,
}

impl Weight {
    /// Adds `o` to this weight.
    pub fn add(&mut self, o: Weight) {
        self.rows += o.rows;
        self.bytes += o.bytes;
        self.uploads += o.uploads;
        self.data_bytes += o.data_bytes;
    }
}

/// Why an insert was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqSetError {
    /// `seq` is further above the contiguous prefix than the window allows.
    OutOfWindow {
        /// The sequence number.
        seq: u64,
        /// The first sequence number not yet in the prefix.
        next: u64,
        /// The window size.
        window: u64,
    },
}

/// The set. Invariant: every key of `above` is `> next`, and `above.len() <= window`.
#[derive(Clone, Debug)]
pub struct SeqSet {
    next: u64,
    prefix: Weight,
    above: BTreeMap<u64, Weight>,
    window: u64,
}

impl SeqSet {
    /// An empty set accepting numbers up to `next + window - 1`.
    pub fn new(window: u64) -> SeqSet {
        assert!(window > 0);
        SeqSet {
            next: 0,
            prefix: Weight::default(),
            above: BTreeMap::new(),
            window,
        }
    }

    /// True if `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        seq < self.next || self.above.contains_key(&seq)
    }

    /// Whether `seq` may be inserted now (not already in, and within the window).
    pub fn check(&self, seq: u64) -> Result<bool, SeqSetError> {
        if self.contains(seq) {
            return Ok(false);
        }
        if seq >= self.next + self.window {
            return Err(SeqSetError::OutOfWindow {
                seq,
                next: self.next,
                window: self.window,
            });
        }
        Ok(true)
    }

    /// Inserts `seq`; returns false if it was already present (its weight is then not added again).
    pub fn insert(&mut self, seq: u64, w: Weight) -> Result<bool, SeqSetError> {
        if !self.check(seq)? {
            return Ok(false);
        }
        if seq == self.next {
            self.prefix.add(w);
            self.next += 1;
            while let Some(w) = self.above.remove(&self.next) {
                self.prefix.add(w);
                self.next += 1;
            }
        } else {
            self.above.insert(seq, w);
        }
        debug_assert!(self.above.len() as u64 <= self.window);
        debug_assert!(self.above.keys().all(|k| *k > self.next));
        Ok(true)
    }

    /// Every number below this is in the set.
    pub fn contiguous_upto(&self) -> u64 {
        self.next
    }

    /// Total weight of every member.
    pub fn total(&self) -> Weight {
        let mut t = self.prefix;
        for w in self.above.values() {
            t.add(*w);
        }
        t
    }

    /// Number of members.
    pub fn len(&self) -> u64 {
        self.next + self.above.len() as u64
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_plain_set(ops in proptest::collection::vec(0u64..40, 0..200)) {
            let mut s = SeqSet::new(16);
            let mut model = std::collections::BTreeSet::new();
            for seq in ops {
                let w = Weight {
                    rows: seq + 1,
                    bytes: 2 * seq,
                    uploads: seq % 2,
                    data_bytes: 3 * seq,
                };
                match s.insert(seq, w) {
                    Ok(fresh) => prop_assert_eq!(fresh, model.insert(seq)),
                    Err(SeqSetError::OutOfWindow { .. }) => {
                        prop_assert!(seq >= s.contiguous_upto() + 16);
                    }
                }
                prop_assert!(s.above.len() <= 16);
            }
            prop_assert_eq!(s.len(), model.len() as u64);
            let rows: u64 = model.iter().map(|q| q + 1).sum();
            prop_assert_eq!(s.total().rows, rows);
            for q in 0..60 {
                prop_assert_eq!(s.contains(q), model.contains(&q));
            }
        }
    }
}
