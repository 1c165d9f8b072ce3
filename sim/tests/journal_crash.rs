//! The journal's crash property: the production journal over the simulator's crashable disk.

use proptest::prelude::*;
use talon_io::storage::journal::Journal;
use talon_sim::disk::{DiskFaults, SimDisk};
use talon_sim::rng::SimRng;
use talon_sim::world::SimLocalDisk;

#[derive(Clone, Debug)]
enum Op {
    Append(u8),
    Sync,
    Truncate,
    Crash,
    /// An I/O error in the next append (0), sync (1) or truncation (2); then the process exits and
    /// restarts without a crash (what it wrote stays in the page cache).
    Fail(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![6 => any::<u8>().prop_map(Op::Append), 3 => Just(Op::Sync), 1 => Just(Op::Truncate), 1 => Just(Op::Crash), 1 => (0u8..3).prop_map(Op::Fail)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// After any crash (unsynced data dropped or torn at a random byte) or failed operation (a
    /// short write, an fsync that saved nothing) and restart, recovery returns a consecutive run of
    /// the appended records after the mark, with their payloads, and every record that was synced,
    /// or recovered by an earlier start (and not truncated), is in it. After a failure the journal
    /// refuses every operation until it is opened again.
    #[test]
    fn recovery_is_a_prefix_holding_everything_synced(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..80)) {
        let faults = DiskFaults { error_p: 0.0, torn_write_p: 0.7 };
        let disk = SimLocalDisk::new(SimDisk::new(1 << 30, faults, SimRng::new(seed)));
        let handle = disk.clone(); // The same disk: the test injects errors through it.
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
                Op::Crash | Op::Fail(_) => {
                    let disk = if let Op::Fail(which) = op {
                        handle.set_error_p(1.0);
                        {
                            let seq = j.next_seq();
                            let failed = match which {
                                0 => j.append(seq, b"lost").is_err(),
                                1 => j.sync().is_err(),
                                _ => j.truncate(synced_upto.max(1)).is_err(),
                            };
                            handle.set_error_p(0.0);
                            // Only an operation that touches the disk fails (a sync with nothing
                            // to sync, a truncation below the mark do not).
                            if failed {
                                prop_assert!(j.sync().is_err(), "a failed journal is refused");
                                prop_assert!(j.append(j.next_seq(), b"x").is_err());
                            }
                        }
                        j.into_disk()
                    } else {
                        let disk = j.into_disk();
                        disk.crash();
                        disk
                    };
                    let (j2, rec) = Journal::open(disk, "j", 200).unwrap();
                    let expected: Vec<_> = appended.iter().filter(|r| r.0 > rec.truncated_upto).cloned().collect();
                    prop_assert!(expected.starts_with(&rec.records), "recovered {:?} is not a prefix", rec.records.iter().map(|r| r.0).collect::<Vec<_>>());
                    let last = rec.records.last().map_or(rec.truncated_upto, |r| r.0);
                    prop_assert!(last >= synced_upto, "synced {} but recovered up to {}", synced_upto, last);
                    // What a start recovered is durable: a later crash keeps it.
                    synced_upto = last;
                    j = j2;
                }
            }
        }
    }
}
