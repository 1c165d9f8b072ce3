//! Journal tests on the real filesystem, and a crash property on the simulator's disk.

use super::*;
use crate::storage::local::StdDisk;

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

#[test]
fn numbering_resumes_above_the_mark_in_a_new_segment() {
    // The mark covers records the segment lost (the last run replayed them from the page cache,
    // flushed and truncated them, then the machine crashed before they were ever synced).
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    for seq in 1..=6u64 {
        j.append(seq, &[seq as u8; 10]).unwrap();
    }
    j.sync().unwrap();
    j.truncate(6).unwrap();
    drop(j);
    let seg = dir.path().join("j/seg-00000000000000000001.log");
    let kept: Vec<u8> = (1..=3u64).flat_map(|s| frame(s, &[s as u8; 10])).collect();
    std::fs::write(&seg, kept).unwrap();
    let (mut j, rec) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    assert!(rec.records.is_empty());
    assert_eq!(j.next_seq(), 7);
    j.append(7, b"seven").unwrap();
    j.sync().unwrap();
    let (j, rec) = Journal::open(j.into_disk(), "j", 1 << 20).unwrap();
    assert_eq!(rec.records, vec![(7, b"seven".to_vec())]);
    assert_eq!(j.segment_count(), 2, "record 7 starts its own segment");
}

#[test]
fn a_gap_after_the_mark_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    j.append(1, b"one").unwrap();
    j.sync().unwrap();
    drop(j);
    let seg = dir.path().join("j/seg-00000000000000000001.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend(frame(3, b"three"));
    std::fs::write(&seg, bytes).unwrap();
    let err = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap_err();
    assert!(
        err.to_string().contains("record 3 follows record 1"),
        "{err}"
    );
}

// The crash property (the journal over the simulator's crashable disk) lives in
// sim/tests/journal_crash.rs, beside the disk it needs.

#[test]
fn records_below_the_mark_are_checked_but_not_returned() {
    // Three records per segment: 1–3 in the first, 4–5 in the second; 1–2 flushed and truncated
    // (still in the first segment, beside the live record 3).
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 64).unwrap();
    for seq in 1..=5u64 {
        j.append(seq, format!("v{seq}").as_bytes()).unwrap();
    }
    j.sync().unwrap();
    j.truncate(2).unwrap();
    assert_eq!(j.segment_count(), 2);
    drop(j);
    let (j, rec) = Journal::open(std_disk(&dir), "j", 64).unwrap();
    assert_eq!(rec.truncated_upto, 2);
    let live: Vec<Record> = (3..=5u64)
        .map(|s| (s, format!("v{s}").into_bytes()))
        .collect();
    assert_eq!(rec.records, live);
    assert_eq!(j.next_seq(), 6);
    drop(j);
    // Damage inside a truncated record (record 2: frames of 18 bytes) of a segment that is not the
    // last: still an error.
    let seg = dir.path().join("j/seg-00000000000000000001.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[18 + FRAME_HEADER_BYTES] ^= 0xFF;
    std::fs::write(&seg, bytes).unwrap();
    let e = Journal::open(std_disk(&dir), "j", 64).unwrap_err();
    assert!(e.to_string().contains("damaged record at byte 18"), "{e}");
}

/// A flipped bit in record 13 of 20 of the last segment is not a torn tail: the 7 valid records
/// after it may have been acknowledged. Opening fails naming the file and the offset, and the file
/// is left as it was; damage in the very last record is still cut as torn.
#[test]
fn damage_that_valid_records_follow_is_an_error_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut j, _) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    for seq in 1..=20u64 {
        j.append(seq, format!("label write {seq}").as_bytes())
            .unwrap();
    }
    j.sync().unwrap();
    drop(j);
    let seg = dir.path().join("j/seg-00000000000000000001.log");
    let good = std::fs::read(&seg).unwrap();
    let (records, _) = parse(&good, 0);
    assert_eq!(records.len(), 20);
    let offset = |n: usize| -> usize {
        records[..n]
            .iter()
            .map(|(_, p)| FRAME_HEADER_BYTES + p.len())
            .sum()
    };
    let at = offset(12);
    let mut bad = good.clone();
    bad[at + 20] ^= 0x04; // inside record 13's payload
    std::fs::write(&seg, &bad).unwrap();
    let err = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let msg = err.to_string();
    assert!(
        msg.contains("seg-00000000000000000001.log") && msg.contains(&format!("byte {at}")),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bad,
        "the file is kept as it was"
    );
    // The same flip in the last record is a torn tail.
    let last_at = offset(19);
    let mut torn = good.clone();
    torn[last_at + 20] ^= 0x04;
    std::fs::write(&seg, &torn).unwrap();
    let (_, rec) = Journal::open(std_disk(&dir), "j", 1 << 20).unwrap();
    assert_eq!(rec.records.len(), 19);
    assert_eq!(rec.torn_bytes as usize, good.len() - last_at);
}

/// A journal operation blocked on the disk does not stop the node's other tasks: with one worker
/// thread, another task still runs while it blocks (without the hand-off it could only run after
/// the 10 s wait gave up).
#[test]
fn a_blocked_disk_leaves_the_runtime_running_other_tasks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let unblocked = rt.block_on(async {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let blocked = tokio::spawn(async move {
            super::blocking_io(move || {
                started_tx.send(()).unwrap();
                wait.recv_timeout(std::time::Duration::from_secs(10))
                    .is_ok()
            })
        });
        started.await.unwrap();
        tokio::spawn(async move { release.send(()).unwrap() })
            .await
            .unwrap();
        blocked.await.unwrap()
    });
    assert!(
        unblocked,
        "the other task ran only after the blocked one gave up"
    );
}
