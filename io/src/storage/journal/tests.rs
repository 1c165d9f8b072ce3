//! Journal tests on the real filesystem, and a crash property on the simulator's disk.

use super::*;
use crate::storage::local::StdDisk;
use proptest::prelude::*;
use talon_sim::disk::{DiskError, DiskFaults, SimDisk};
use talon_sim::rng::SimRng;

fn std_disk(dir: &tempfile::TempDir) -> StdDisk {
    StdDisk::new(dir.path()).unwrap()
}

#[test]
fn records_survive_reopen_and_numbering_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, rec) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    assert_eq!(rec, Recovered::default());
    for seq in 1..=5u64 {
        j.append(seq, format!("v{seq}").as_bytes()).unwrap();
    }
    assert_eq!(j.sync().unwrap(), 5);
    drop(j);
    let (mut j, rec) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    assert_eq!(rec.records.len(), 5);
    assert_eq!(rec.records[4], (5, b"v5".to_vec()));
    assert_eq!(j.next_seq(), 6);
    assert!(
        j.append(7, b"gap").is_err(),
        "out-of-order appends are refused"
    );
    j.append(6, b"v6").unwrap();
}

#[test]
fn a_torn_tail_is_cut_and_the_journal_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    j.append(1, b"one").unwrap();
    j.append(2, b"two").unwrap();
    j.sync().unwrap();
    let mut disk = j.into_disk();
    // Half a frame: what a crash mid-append leaves.
    disk.append("j/seg-00000000000000000001.log", &frame(3, b"three")[..9])
        .unwrap();
    let (mut j, rec) = Journal::open(disk, "j", 1 << 20).unwrap();
    assert_eq!(
        rec.records.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(rec.torn_bytes, 9);
    j.append(3, b"three").unwrap();
    j.sync().unwrap();
    let (_, rec) = Journal::open(j.into_disk(), "j", 1 << 20).unwrap();
    assert_eq!((rec.records.len(), rec.torn_bytes), (3, 0));
}

#[test]
fn damage_before_the_end_is_an_error_naming_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 64).unwrap();
    for seq in 1..=6u64 {
        j.append(seq, &[seq as u8; 30]).unwrap();
    }
    j.sync().unwrap();
    assert!(j.segment_count() > 2);
    let first = dir.path().join("j/seg-00000000000000000001.log");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    let err = Journal::open(std_disk(&dir), "j", 64).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string().contains("seg-00000000000000000001.log"),
        "{err}"
    );
}

#[test]
fn truncation_persists_and_drops_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 100).unwrap();
    for seq in 1..=20u64 {
        j.append(seq, &[0u8; 40]).unwrap();
    }
    j.sync().unwrap();
    let before = j.segment_count();
    j.truncate(15).unwrap();
    assert!(j.segment_count() < before);
    let (j, rec) = Journal::open(j.into_disk(), "j", 100).unwrap();
    assert_eq!(rec.truncated_upto, 15);
    assert_eq!(
        rec.records.iter().map(|r| r.0).collect::<Vec<_>>(),
        (16..=20).collect::<Vec<_>>()
    );
    assert_eq!(j.next_seq(), 21);
    // Fully truncated: numbering still continues after the mark.
    let mut j = j;
    j.truncate(20).unwrap();
    let (j, rec) = Journal::open(j.into_disk(), "j", 100).unwrap();
    assert!(rec.records.is_empty());
    assert_eq!(j.next_seq(), 21);
}

/// The simulator's disk as a `LocalDisk`.
struct Sim(SimDisk);

fn io_err(e: DiskError) -> io::Error {
    io::Error::other(e.to_string())
}

impl LocalDisk for Sim {
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.0.append(path, data).map_err(io_err)
    }
    fn sync(&mut self, path: &str) -> io::Result<()> {
        self.0.fsync(path).map_err(io_err)
    }
    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        match self.0.read(path) {
            Ok(b) => Ok(Some(b)),
            Err(DiskError::NotFound(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }
    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let tmp = format!("{path}.tmp");
        self.0.write(&tmp, data).map_err(io_err)?;
        self.0.fsync(&tmp).map_err(io_err)?;
        self.0.rename(&tmp, path).map_err(io_err)
    }
    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()> {
        self.0.truncate(path, len).map_err(io_err)?;
        self.0.fsync(path).map_err(io_err)
    }
    fn remove(&mut self, path: &str) -> io::Result<()> {
        match self.0.remove(path) {
            Err(DiskError::NotFound(_)) | Ok(()) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self.0.list(prefix))
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append(u8),
    Sync,
    Truncate,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![6 => any::<u8>().prop_map(Op::Append), 3 => Just(Op::Sync), 1 => Just(Op::Truncate), 1 => Just(Op::Crash)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// After any crash (unsynced data dropped or torn at a random byte), recovery returns a
    /// consecutive run of the appended records after the mark, with their payloads, and every
    /// record that was synced (and not truncated) is in it.
    #[test]
    fn recovery_is_a_prefix_holding_everything_synced(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..80)) {
        let faults = DiskFaults { error_p: 0.0, torn_write_p: 0.7 };
        let disk = Sim(SimDisk::new(1 << 30, faults, SimRng::new(seed)));
        let (mut j, _) = Journal::open(disk, "j", 200).unwrap();
        let mut appended: Vec<(u64, Vec<u8>)> = vec![];
        let mut synced_upto = 0u64;
        for op in ops {
            match op {
                Op::Append(b) => {
                    let seq = j.next_seq();
                    let payload = vec![b; (b % 50) as usize];
                    j.append(seq, &payload).unwrap();
                    appended.retain(|r| r.0 < seq); // Records lost in a crash were renumbered.
                    appended.push((seq, payload));
                }
                Op::Sync => synced_upto = j.sync().unwrap(),
                Op::Truncate => j.truncate(synced_upto / 2).unwrap(),
                Op::Crash => {
                    let mut disk = j.into_disk();
                    disk.0.crash();
                    let (j2, rec) = Journal::open(disk, "j", 200).unwrap();
                    let expected: Vec<_> = appended.iter().filter(|r| r.0 > rec.truncated_upto).cloned().collect();
                    prop_assert!(expected.starts_with(&rec.records), "recovered {:?} is not a prefix", rec.records.iter().map(|r| r.0).collect::<Vec<_>>());
                    let last = rec.records.last().map_or(rec.truncated_upto, |r| r.0);
                    prop_assert!(last >= synced_upto, "synced {} but recovered up to {}", synced_upto, last);
                    j = j2;
                }
            }
        }
    }
}
