//! A simulated local disk with crash semantics.
//!
//! File contents written since the last `fsync` of that file are volatile: a crash drops them, or,
//! with the torn-write fault, keeps a random prefix of them (the tail of the last write half made it
//! to the platter). Namespace operations (create, rename, remove) are durable when they return: the
//! model of a journalled filesystem with directory syncs folded in; the journal and outbox files that
//! matter are append-only, and atomic replacement relies on fsync-then-rename, which this model
//! honours (a renamed file carries only its synced contents across a crash).

use crate::rng::SimRng;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, Default)]
struct File {
    /// What a crash keeps.
    durable: Durable,
    /// What reads see.
    current: Vec<u8>,
}

/// A file's durable contents. Journals only append and sync, so the durable contents are almost
/// always a prefix of the current ones: kept as a length, an fsync costs nothing instead of a copy
/// of the whole file (16 MiB journal segments made that quadratic).
#[derive(Clone, Debug)]
enum Durable {
    /// `current[..len]`.
    Prefix(usize),
    /// Contents that differ from the current ones (after a rewrite or a cut not yet synced).
    Other(Vec<u8>),
}

impl Default for Durable {
    fn default() -> Self {
        Durable::Prefix(0)
    }
}

impl File {
    /// Keeps the durable contents as they are before `current` changes other than by appending.
    fn detach(&mut self) {
        if let Durable::Prefix(len) = self.durable {
            self.durable = Durable::Other(self.current[..len].to_vec());
        }
    }
}

/// Why a disk operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// No such file.
    NotFound(String),
    /// The disk's capacity would be exceeded.
    Full {
        /// The bound.
        capacity_bytes: u64,
    },
    /// An injected I/O error.
    Injected(String),
    /// The machine lost power (an armed crash tripped); nothing works until it restarts.
    PowerLost,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::NotFound(p) => write!(f, "{p}: no such file"),
            DiskError::Full { capacity_bytes } => write!(f, "disk full ({capacity_bytes} bytes)"),
            DiskError::Injected(p) => write!(f, "{p}: injected I/O error"),
            DiskError::PowerLost => write!(f, "simulated power loss"),
        }
    }
}

impl std::error::Error for DiskError {}

/// Fault knobs of one disk, drawn from the run's seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskFaults {
    /// Probability that an operation fails with an injected error. A failed append may have written
    /// a prefix of its data (a short write: half of them do); a failed fsync made nothing durable
    /// (what it covered stays volatile: a later crash may drop it); any other failed operation had
    /// no effect.
    pub error_p: f64,
    /// Probability that a crash tears a file's unsynced tail instead of dropping it whole.
    pub torn_write_p: f64,
}

/// One node's local disk.
#[derive(Clone, Debug)]
pub struct SimDisk {
    files: BTreeMap<String, File>,
    capacity_bytes: u64,
    faults: DiskFaults,
    rng: SimRng,
    power: Power,
}

/// A crash aimed at a durability point: armed, the next fsync never happens — the disk crashes in
/// its place (losing what that fsync would have saved) and every later operation fails until the
/// node restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    On,
    Armed,
    Lost,
}

impl SimDisk {
    /// An empty disk holding at most `capacity_bytes` of current contents.
    pub fn new(capacity_bytes: u64, faults: DiskFaults, rng: SimRng) -> SimDisk {
        SimDisk {
            files: BTreeMap::new(),
            capacity_bytes,
            faults,
            rng,
            power: Power::On,
        }
    }

    /// The next fsync crashes the disk instead (see [`SimDisk::power_lost`]).
    pub fn arm_power_loss(&mut self) {
        if self.power == Power::On {
            self.power = Power::Armed;
        }
    }

    /// An armed crash did not trip: back to normal.
    pub fn disarm(&mut self) {
        if self.power == Power::Armed {
            self.power = Power::On;
        }
    }

    /// Whether an armed crash tripped (the node must now be stopped and restarted).
    pub fn power_lost(&self) -> bool {
        self.power == Power::Lost
    }

    /// The node restarts: the disk works again, with what survived.
    pub fn restore_power(&mut self) {
        self.power = Power::On;
    }

    /// A copy holding only the files whose path starts with one of `prefixes`.
    pub fn clone_under(&self, prefixes: &[&str]) -> SimDisk {
        SimDisk {
            files: self
                .under(prefixes)
                .map(|(k, f)| (k.clone(), f.clone()))
                .collect(),
            capacity_bytes: self.capacity_bytes,
            faults: self.faults.clone(),
            rng: self.rng.clone(),
            power: self.power,
        }
    }

    /// A copy holding only what a power cut now would leave of the files under `prefixes` (no torn
    /// tail), with no faults and power on: what a checker opens. Copies the durable bytes only, not
    /// the unsynced tails a later crash would drop.
    pub fn durable_under(&self, prefixes: &[&str]) -> SimDisk {
        SimDisk {
            files: self
                .under(prefixes)
                .map(|(k, f)| {
                    let kept = match &f.durable {
                        Durable::Prefix(len) => f.current[..*len].to_vec(),
                        Durable::Other(d) => d.clone(),
                    };
                    let file = File {
                        durable: Durable::Prefix(kept.len()),
                        current: kept,
                    };
                    (k.clone(), file)
                })
                .collect(),
            capacity_bytes: self.capacity_bytes,
            faults: DiskFaults::default(),
            rng: self.rng.clone(),
            power: Power::On,
        }
    }

    /// The files whose path starts with one of `prefixes`.
    fn under<'a>(&'a self, prefixes: &'a [&str]) -> impl Iterator<Item = (&'a String, &'a File)> {
        self.files
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
    }

    /// Sets the probability of injected errors (the harness turns them off when it heals the world).
    pub fn set_error_p(&mut self, p: f64) {
        self.faults.error_p = p;
    }

    /// The disk is lost (replaced by an empty one): every file is gone, durable or not.
    pub fn wipe(&mut self) {
        self.files.clear();
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| f.current.len() as u64).sum()
    }

    fn inject(&mut self, path: &str) -> Result<(), DiskError> {
        if self.power == Power::Lost {
            return Err(DiskError::PowerLost);
        }
        if self.rng.chance(self.faults.error_p) {
            return Err(DiskError::Injected(path.to_owned()));
        }
        Ok(())
    }

    /// Appends to a file, creating it.
    pub fn append(&mut self, path: &str, data: &[u8]) -> Result<(), DiskError> {
        if let Err(e) = self.inject(path) {
            // A short write: part of the data reached the file before the error.
            if matches!(e, DiskError::Injected(_)) && !data.is_empty() && self.rng.chance(0.5) {
                let n = self.rng.range(0, data.len() as u64 - 1) as usize;
                self.files
                    .entry(path.to_owned())
                    .or_default()
                    .current
                    .extend_from_slice(&data[..n]);
            }
            return Err(e);
        }
        if self.used() + data.len() as u64 > self.capacity_bytes {
            return Err(DiskError::Full {
                capacity_bytes: self.capacity_bytes,
            });
        }
        self.files
            .entry(path.to_owned())
            .or_default()
            .current
            .extend_from_slice(data);
        Ok(())
    }

    /// Replaces a file's contents (not durable until `fsync`).
    pub fn write(&mut self, path: &str, data: &[u8]) -> Result<(), DiskError> {
        self.inject(path)?;
        let old = self.files.get(path).map_or(0, |f| f.current.len() as u64);
        if self.used() - old + data.len() as u64 > self.capacity_bytes {
            return Err(DiskError::Full {
                capacity_bytes: self.capacity_bytes,
            });
        }
        let f = self.files.entry(path.to_owned()).or_default();
        f.detach();
        f.current = data.to_vec();
        Ok(())
    }

    /// Makes a file's current contents durable.
    pub fn fsync(&mut self, path: &str) -> Result<(), DiskError> {
        self.inject(path)?;
        if self.power == Power::Armed {
            self.crash();
            self.power = Power::Lost;
            return Err(DiskError::PowerLost);
        }
        let f = self
            .files
            .get_mut(path)
            .ok_or_else(|| DiskError::NotFound(path.to_owned()))?;
        f.durable = Durable::Prefix(f.current.len());
        Ok(())
    }

    /// Reads a file's current contents.
    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, DiskError> {
        self.inject(path)?;
        self.files
            .get(path)
            .map(|f| f.current.clone())
            .ok_or_else(|| DiskError::NotFound(path.to_owned()))
    }

    /// Atomically renames `from` over `to`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), DiskError> {
        self.inject(from)?;
        let f = self
            .files
            .remove(from)
            .ok_or_else(|| DiskError::NotFound(from.to_owned()))?;
        self.files.insert(to.to_owned(), f);
        Ok(())
    }

    /// Cuts a file to `len` bytes (not durable until `fsync`).
    pub fn truncate(&mut self, path: &str, len: u64) -> Result<(), DiskError> {
        self.inject(path)?;
        let f = self
            .files
            .get_mut(path)
            .ok_or_else(|| DiskError::NotFound(path.to_owned()))?;
        if matches!(f.durable, Durable::Prefix(d) if d > len as usize) {
            f.detach();
        }
        f.current.truncate(len as usize);
        Ok(())
    }

    /// Removes a file.
    pub fn remove(&mut self, path: &str) -> Result<(), DiskError> {
        self.inject(path)?;
        self.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| DiskError::NotFound(path.to_owned()))
    }

    /// Files whose path starts with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.files
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The node crashed: each file keeps its durable contents, plus, with the torn-write fault, a
    /// random prefix of what was appended after them. A file never synced survives empty (its
    /// creation, a namespace operation, was durable).
    pub fn crash(&mut self) {
        let torn_p = self.faults.torn_write_p;
        let mut next = BTreeMap::new();
        for (path, f) in std::mem::take(&mut self.files) {
            let kept = match f.durable {
                // Only appended since the last sync: the tail may be torn.
                Durable::Prefix(len) => {
                    let mut kept = f.current;
                    let extra = if kept.len() > len && self.rng.chance(torn_p) {
                        self.rng.range(0, (kept.len() - len) as u64) as usize
                    } else {
                        0
                    };
                    kept.truncate(len + extra);
                    kept
                }
                Durable::Other(d) => d,
            };
            next.insert(
                path,
                File {
                    durable: Durable::Prefix(kept.len()),
                    current: kept,
                },
            );
        }
        self.files = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(faults: DiskFaults, seed: u64) -> SimDisk {
        SimDisk::new(1 << 20, faults, SimRng::new(seed))
    }

    #[test]
    fn a_durable_copy_holds_what_a_crash_keeps_without_a_torn_tail() {
        let always_torn = DiskFaults {
            error_p: 0.0,
            torn_write_p: 1.0,
        };
        let mut d = disk(always_torn, 5);
        d.append("j/a", b"synced").unwrap();
        d.fsync("j/a").unwrap();
        d.append("j/a", b" volatile").unwrap();
        d.write("j/b", b"new").unwrap();
        d.append("other", b"x").unwrap();
        d.fsync("other").unwrap();
        let mut c = d.durable_under(&["j/"]);
        assert_eq!(c.read("j/a").unwrap(), b"synced");
        assert_eq!(
            c.read("j/b").unwrap(),
            b"",
            "created (durable), never synced"
        );
        assert!(c.read("other").is_err(), "outside the prefixes");
        // The original is untouched: its volatile tail is still there.
        assert_eq!(d.read("j/a").unwrap(), b"synced volatile");
    }

    #[test]
    fn crash_keeps_synced_and_drops_unsynced() {
        let mut d = disk(DiskFaults::default(), 1);
        d.append("j", b"one;").unwrap();
        d.fsync("j").unwrap();
        d.append("j", b"two;").unwrap();
        d.write("tmp", b"x").unwrap();
        d.crash();
        assert_eq!(d.read("j").unwrap(), b"one;");
        assert_eq!(d.read("tmp").unwrap(), b"");
    }

    #[test]
    fn torn_writes_keep_a_prefix_of_the_unsynced_tail() {
        let mut seen_partial = false;
        for seed in 0..64 {
            let mut d = disk(
                DiskFaults {
                    torn_write_p: 1.0,
                    ..DiskFaults::default()
                },
                seed,
            );
            d.append("j", b"AAAA").unwrap();
            d.fsync("j").unwrap();
            d.append("j", b"BBBBBBBB").unwrap();
            d.crash();
            let got = d.read("j").unwrap();
            assert!(
                got.starts_with(b"AAAA") && b"AAAABBBBBBBB".starts_with(&got),
                "{got:?}"
            );
            seen_partial |= got.len() > 4 && got.len() < 12;
        }
        assert!(seen_partial, "some seed tears mid-write");
    }

    #[test]
    fn an_armed_crash_takes_the_place_of_the_next_fsync() {
        let mut d = disk(DiskFaults::default(), 5);
        d.append("j", b"one;").unwrap();
        d.fsync("j").unwrap();
        d.arm_power_loss();
        d.append("j", b"two;").unwrap();
        assert!(!d.power_lost());
        assert_eq!(d.fsync("j"), Err(DiskError::PowerLost));
        assert!(d.power_lost());
        // Nothing works until the node restarts; then only what was synced is there.
        assert_eq!(d.read("j"), Err(DiskError::PowerLost));
        assert_eq!(d.append("j", b"x"), Err(DiskError::PowerLost));
        d.restore_power();
        assert_eq!(d.read("j").unwrap(), b"one;");
        // Disarmed before any fsync: nothing happens.
        d.arm_power_loss();
        d.disarm();
        d.fsync("j").unwrap();
        assert!(!d.power_lost());
    }

    #[test]
    fn atomic_replace_survives_crash_only_if_synced_before_rename() {
        let mut d = disk(DiskFaults::default(), 2);
        d.write("f", b"old").unwrap();
        d.fsync("f").unwrap();
        d.write("f.tmp", b"new").unwrap();
        d.fsync("f.tmp").unwrap();
        d.rename("f.tmp", "f").unwrap();
        d.crash();
        assert_eq!(d.read("f").unwrap(), b"new");
    }

    #[test]
    fn capacity_and_injected_errors_refuse_without_effect() {
        let mut d = SimDisk::new(8, DiskFaults::default(), SimRng::new(3));
        d.append("a", b"12345678").unwrap();
        assert_eq!(
            d.append("a", b"9"),
            Err(DiskError::Full { capacity_bytes: 8 })
        );
        assert_eq!(d.read("a").unwrap(), b"12345678");
        let mut e = disk(
            DiskFaults {
                error_p: 1.0,
                ..DiskFaults::default()
            },
            4,
        );
        assert!(matches!(e.append("a", b"x"), Err(DiskError::Injected(_))));
        assert!(e.list("").is_empty());
    }

    #[test]
    fn a_failed_append_may_leave_a_short_write_and_a_failed_fsync_saves_nothing() {
        let mut short = false;
        for seed in 0..32 {
            let mut d = disk(DiskFaults::default(), seed);
            d.append("j", b"AAAA").unwrap();
            d.fsync("j").unwrap();
            d.set_error_p(1.0);
            assert!(matches!(
                d.append("j", b"BBBBBBBB"),
                Err(DiskError::Injected(_))
            ));
            assert!(matches!(d.fsync("j"), Err(DiskError::Injected(_))));
            d.set_error_p(0.0);
            let got = d.read("j").unwrap();
            assert!(
                got.starts_with(b"AAAA") && b"AAAABBBBBBB".starts_with(&got),
                "{got:?}"
            );
            short |= got.len() > 4;
            // The failed fsync made nothing durable: a crash keeps only the synced prefix.
            d.crash();
            if d.read("j").unwrap() != b"AAAA" {
                // Torn writes are off here: the unsynced tail is dropped whole.
                panic!("seed {seed}: a failed fsync made data durable");
            }
        }
        assert!(short, "some seed leaves a short write");
    }

    #[test]
    fn a_wiped_disk_holds_nothing() {
        let mut d = disk(DiskFaults::default(), 6);
        d.append("j", b"one;").unwrap();
        d.fsync("j").unwrap();
        d.wipe();
        assert!(d.list("").is_empty());
        assert!(matches!(d.read("j"), Err(DiskError::NotFound(_))));
    }
}
