//! Datastore cache tests: unit cases, and the property for invariants 5 and 7 (docs/architecture.md) across crashes.

use super::*;
use proptest::prelude::*;

fn small() -> CacheLimits {
    CacheLimits {
        clean_bytes_max: 400,
        dirty_bytes_max: 1400,
        value_bytes_max: 200,
        flush_batch_max: 3,
        flush_age_max_ms: 100,
        flushes_in_flight_max: 2,
        flush_retry_ms: 50,
        readers_max: 3,
        list_keys_max: 100,
        group_writes_max: 4,
    }
}

fn drain(c: &mut Cache) -> Vec<CacheAction> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn replies(acts: &[CacheAction]) -> Vec<(RequestId, Result<CacheReply, CacheError>)> {
    acts.iter()
        .filter_map(|a| match a {
            CacheAction::Reply { req, result } => Some((*req, result.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn write_is_acked_only_after_journal_sync_then_readable() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "a", b("1"));
    let acts = drain(&mut c);
    assert_eq!(
        acts,
        vec![CacheAction::JournalAppend {
            seq: 1,
            key: "a".into(),
            value: Some(b("1")),
            part: GroupPart::Whole,
        }]
    );
    // Not visible before the ack: the read goes to the volume.
    c.handle_get(t, RequestId(2), "a");
    assert_eq!(
        drain(&mut c),
        vec![CacheAction::ReadShared { key: "a".into() }]
    );
    c.handle_journal_synced(t, 1);
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(RequestId(1), Ok(CacheReply::Written { version: 1 }))]
    );
    // The volume's stale answer loses to the acknowledged write.
    c.handle_read_done(t, "a", Ok(None));
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(RequestId(2), Ok(CacheReply::Value(Some(b("1")))))]
    );
}

#[test]
fn concurrent_misses_share_one_read_and_absent_keys_are_cached() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_get(t, RequestId(1), "x");
    c.handle_get(t, RequestId(2), "x");
    assert_eq!(
        drain(&mut c),
        vec![CacheAction::ReadShared { key: "x".into() }]
    );
    c.handle_read_done(t, "x", Ok(None));
    assert_eq!(replies(&drain(&mut c)).len(), 2);
    c.handle_get(t, RequestId(3), "x");
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(RequestId(3), Ok(CacheReply::Value(None)))]
    );
}

#[test]
fn flushes_coalesce_by_count_and_age_and_truncate_the_journal() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    for (i, k) in ["a", "b", "a"].iter().enumerate() {
        c.handle_set(t, RequestId(i as u64), k, b("v"));
    }
    c.handle_journal_synced(t, 3);
    drain(&mut c);
    // Two dirty keys (a rewritten): below the count trigger, so wait for age.
    assert_eq!(c.poll_timeout(), Some(Monotonic(100)));
    c.handle_timeout(Monotonic(100));
    let acts = drain(&mut c);
    let CacheAction::Flush { batch, writes } = &acts[0] else {
        panic!("{acts:?}")
    };
    let keys: Vec<(&str, u64)> = writes.iter().map(|w| (w.key.as_str(), w.version)).collect();
    assert_eq!(keys, vec![("b", 2), ("a", 3)]);
    c.handle_flush_done(Monotonic(150), *batch, Ok(()));
    assert_eq!(
        drain(&mut c),
        vec![CacheAction::JournalTruncate { upto: 3 }]
    );
    assert!(c.is_flushed());
}

#[test]
fn rewrite_during_flush_keeps_entry_dirty_and_never_double_flushes_a_key() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "a", b("1"));
    c.handle_journal_synced(t, 1);
    c.handle_timeout(Monotonic(100));
    let acts = drain(&mut c);
    let batch = acts
        .iter()
        .find_map(|a| match a {
            CacheAction::Flush { batch, .. } => Some(*batch),
            _ => None,
        })
        .unwrap();
    c.handle_set(Monotonic(100), RequestId(2), "a", b("2"));
    c.handle_journal_synced(Monotonic(100), 2);
    c.handle_timeout(Monotonic(300));
    assert!(
        !drain(&mut c)
            .iter()
            .any(|a| matches!(a, CacheAction::Flush { .. })),
        "a is in flight"
    );
    c.handle_flush_done(Monotonic(300), batch, Ok(()));
    let acts = drain(&mut c);
    assert!(acts.contains(&CacheAction::JournalTruncate { upto: 1 }));
    assert!(
        matches!(&acts.last(), Some(CacheAction::Flush { writes, .. }) if writes[0].version == 2)
    );
    // Version 1 is on the volume, version 2 is not: a waiter for 1 is released, one for 2 is not.
    assert!(c.flushed_through(1) && !c.flushed_through(2));
    assert_eq!(c.acknowledged_upto(), 2);
    c.handle_flush_done(Monotonic(300), batch + 1, Ok(()));
    assert!(c.flushed_through(2) && c.is_flushed());
}

#[test]
fn an_overwrite_keeps_an_unflushed_write_from_counting_as_flushed() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "a", b("1"));
    c.handle_set(t, RequestId(2), "b", b("1"));
    c.handle_set(t, RequestId(3), "a", b("2"));
    c.handle_journal_synced(t, 3);
    // "a" holds version 3 now; its first unflushed write (1) still counts against waiters for 1.
    assert!(!c.flushed_through(1));
    c.handle_timeout(Monotonic(100));
    let batch = drain(&mut c)
        .iter()
        .find_map(|a| match a {
            CacheAction::Flush { batch, writes } => {
                assert_eq!(writes.len(), 2);
                Some(*batch)
            }
            _ => None,
        })
        .unwrap();
    assert!(!c.flushed_through(1));
    c.handle_flush_done(Monotonic(100), batch, Ok(()));
    assert!(c.flushed_through(3));
}

#[test]
fn failed_flush_is_retried_after_a_pause() {
    let mut c = Cache::new(small(), 0);
    c.handle_set(Monotonic(0), RequestId(1), "a", b("1"));
    c.handle_journal_synced(Monotonic(0), 1);
    c.handle_timeout(Monotonic(100));
    drain(&mut c);
    c.handle_flush_done(Monotonic(110), 1, Err("EIO".into()));
    assert!(drain(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), Some(Monotonic(160)));
    c.handle_timeout(Monotonic(160));
    assert!(matches!(
        drain(&mut c)[..],
        [CacheAction::Flush { batch: 2, .. }]
    ));
}

#[test]
fn bounds_refuse_with_determinate_errors() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "big", Bytes::from(vec![0u8; 201]));
    assert!(matches!(
        replies(&drain(&mut c))[0].1,
        Err(CacheError::TooLarge { len: 201, max: 200 })
    ));
    c.handle_set(t, RequestId(2), "../etc", b("x"));
    assert!(matches!(
        replies(&drain(&mut c))[0].1,
        Err(CacheError::BadKey(_))
    ));
    // Dirty bound: each entry charges value + key + overhead; the journal never syncs here.
    let mut refused = 0;
    for i in 0..20 {
        c.handle_set(
            t,
            RequestId(10 + i),
            &format!("k{i}"),
            Bytes::from(vec![1u8; 150]),
        );
        refused += replies(&drain(&mut c))
            .iter()
            .filter(|r| matches!(r.1, Err(CacheError::Busy { .. })))
            .count();
        assert!(c.dirty_bytes() <= small().dirty_bytes_max);
    }
    assert!(refused > 0);
    for i in 0..4 {
        c.handle_get(t, RequestId(100 + i), &format!("r{i}"));
    }
    assert!(matches!(
        replies(&drain(&mut c))[0].1,
        Err(CacheError::ReadersBusy { max: 3 })
    ));
}

#[test]
fn clean_entries_are_evicted_lru_and_dirty_ones_kept() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    for i in 0..6 {
        let k = format!("k{i}");
        c.handle_get(t, RequestId(i), &k);
        c.handle_read_done(t, &k, Ok(Some(b("0123456789"))));
    }
    assert!(c.clean_bytes() <= small().clean_bytes_max);
    c.handle_get(t, RequestId(50), "k0");
    assert!(
        matches!(drain(&mut c).last(), Some(CacheAction::ReadShared { .. })),
        "k0 was evicted"
    );
}

#[test]
fn a_list_within_a_depth_keeps_only_keys_that_shallow() {
    assert!(within_depth("c/C.1/record.json", "c/", Some(2)));
    assert!(!within_depth("c/C.1/flows/F.1/record.json", "c/", Some(2)));
    assert!(within_depth("c/C.1/flows/F.1/record.json", "c/", None));
    assert!(!within_depth("d/x", "c/", None));
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "c/new/record.json", b("1"));
    c.handle_set(t, RequestId(2), "c/new/flows/f/record.json", b("2"));
    c.handle_journal_synced(t, 2);
    c.handle_list_within(t, RequestId(3), "c/", Some(2));
    let asked = drain(&mut c);
    assert!(
        asked
            .iter()
            .any(|a| matches!(a, CacheAction::ListShared { depth: Some(2), .. })),
        "the volume is told the depth: {asked:?}"
    );
    c.handle_list_done(
        t,
        RequestId(3),
        Ok(vec![
            "c/old/record.json".into(),
            "c/old/flows/f/record.json".into(),
        ]),
    );
    let keys = vec![
        "c/new/record.json".to_string(),
        "c/old/record.json".to_string(),
    ];
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(
            RequestId(3),
            Ok(CacheReply::Keys {
                keys,
                truncated: false
            })
        )]
    );
}

#[test]
fn list_merges_unflushed_writes_and_deletes() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    c.handle_set(t, RequestId(1), "h/new", b("1"));
    c.handle_delete(t, RequestId(2), "h/old");
    c.handle_journal_synced(t, 2);
    c.handle_list(t, RequestId(3), "h/");
    drain(&mut c);
    c.handle_list_done(
        t,
        RequestId(3),
        Ok(vec!["h/old".into(), "h/kept".into(), "x/other".into()]),
    );
    let keys = vec!["h/kept".to_string(), "h/new".to_string()];
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(
            RequestId(3),
            Ok(CacheReply::Keys {
                keys,
                truncated: false
            })
        )]
    );
}

fn rec(seq: u64, key: &str, value: Option<&str>, part: GroupPart) -> JournalRecord {
    JournalRecord {
        seq,
        key: key.into(),
        value: value.map(b),
        part,
    }
}

#[test]
fn recovery_replays_journal_after_truncation() {
    let recs = vec![
        rec(5, "a", Some("old"), GroupPart::Whole),
        rec(7, "a", Some("new"), GroupPart::Whole),
        rec(3, "z", None, GroupPart::Whole),
    ];
    let mut c = Cache::recover(small(), Monotonic(0), 4, 8, recs);
    c.handle_get(Monotonic(0), RequestId(1), "a");
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(RequestId(1), Ok(CacheReply::Value(Some(b("new")))))]
    );
    c.handle_set(Monotonic(0), RequestId(2), "b", b("x"));
    assert!(matches!(
        drain(&mut c)[0],
        CacheAction::JournalAppend { seq: 8, .. }
    ));
}

#[test]
fn a_group_is_acknowledged_whole_once_all_of_it_is_synced() {
    let mut c = Cache::new(small(), 0);
    let t = Monotonic(0);
    let w = |k: &str, v: &str| (k.to_owned(), Some(b(v)));
    c.handle_write_all(t, RequestId(1), vec![w("p", "1"), w("f", "1"), w("t", "1")]);
    let parts: Vec<_> = drain(&mut c)
        .into_iter()
        .map(|a| match a {
            CacheAction::JournalAppend { seq, part, .. } => (seq, part),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        parts,
        vec![
            (1, GroupPart::First { len: 3 }),
            (2, GroupPart::Next),
            (3, GroupPart::Next)
        ]
    );
    // Two of three synced: nothing is visible or acknowledged.
    c.handle_journal_synced(t, 2);
    assert!(replies(&drain(&mut c)).is_empty());
    c.handle_get(t, RequestId(2), "p");
    assert_eq!(
        drain(&mut c),
        vec![CacheAction::ReadShared { key: "p".into() }]
    );
    c.handle_journal_synced(t, 3);
    assert_eq!(
        replies(&drain(&mut c)),
        vec![(RequestId(1), Ok(CacheReply::Written { version: 3 }))]
    );
    // Bounds: an empty group, a group over the bound, one bad key refuses all of it.
    c.handle_write_all(t, RequestId(3), vec![]);
    c.handle_write_all(
        t,
        RequestId(4),
        (0..5).map(|i| w(&format!("k{i}"), "x")).collect(),
    );
    c.handle_write_all(t, RequestId(5), vec![w("ok", "1"), w("../bad", "1")]);
    let r = replies(&drain(&mut c));
    assert!(matches!(
        r[0],
        (RequestId(3), Err(CacheError::BadGroup { len: 0, .. }))
    ));
    assert!(matches!(
        r[1],
        (RequestId(4), Err(CacheError::BadGroup { len: 5, max: 4 }))
    ));
    assert!(matches!(r[2], (RequestId(5), Err(CacheError::BadKey(_)))));
    assert_eq!(r.len(), 3, "nothing appended for a refused group");
}

#[test]
fn recovery_drops_groups_the_journal_does_not_hold_whole() {
    use GroupPart::{First, Next, Whole};
    let recs = vec![
        // Its First was truncated: the group was acknowledged whole.
        rec(5, "lead", Some("1"), Next),
        rec(6, "lead2", Some("1"), Next),
        rec(7, "a", Some("1"), Whole),
        // Torn mid-journal: its third record never made it, numbering went on after it.
        rec(8, "torn1", Some("1"), First { len: 3 }),
        rec(9, "torn2", Some("1"), Next),
        rec(10, "g1", Some("1"), First { len: 2 }),
        rec(11, "g2", Some("1"), Next),
        // Torn at the end.
        rec(12, "end1", Some("1"), First { len: 2 }),
    ];
    let (kept, dropped) = whole_groups(recs.clone());
    let keys: Vec<&str> = kept.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["lead", "lead2", "a", "g1", "g2"]);
    assert_eq!(dropped, 3);
    let mut c = Cache::recover(small(), Monotonic(0), 4, 13, recs);
    assert_eq!(c.dropped_on_recovery(), 3);
    for (i, k) in ["torn1", "end1", "g2"].into_iter().enumerate() {
        c.handle_get(Monotonic(0), RequestId(i as u64), k);
    }
    // The dropped keys go to the volume; the whole group's is served from memory.
    let acts = drain(&mut c);
    assert!(acts.contains(&CacheAction::ReadShared {
        key: "torn1".into()
    }));
    assert!(acts.contains(&CacheAction::ReadShared { key: "end1".into() }));
    assert!(replies(&acts).contains(&(RequestId(2), Ok(CacheReply::Value(Some(b("1")))))));
    // Numbering continues after every record the journal holds.
    c.handle_set(Monotonic(0), RequestId(9), "b", b("x"));
    assert!(
        drain(&mut c)
            .iter()
            .any(|a| matches!(a, CacheAction::JournalAppend { seq: 13, .. }))
    );
}

// ---- Property: invariant 5 (acknowledged writes survive crashes) and 7 (bounds hold). ----

#[derive(Clone, Debug)]
enum Op {
    Set(u8, u8),
    Delete(u8),
    /// An atomic group of writes (a value of 0 deletes).
    SetMany(Vec<(u8, u8)>),
    Get(u8),
    Sync,
    ReadDone(usize),
    FlushDone(usize, bool),
    Tick(u64),
    /// Crash; in-flight flush writes land per the bit mask, and the first `keep` (mod their
    /// number + 1) unsynced journal records survive (the page cache reached the disk after all).
    Crash(u32, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        1 => (0u8..6).prop_map(Op::Delete),
        2 => prop::collection::vec((0u8..6, any::<u8>()), 2..4).prop_map(Op::SetMany),
        4 => (0u8..6).prop_map(Op::Get),
        3 => Just(Op::Sync),
        3 => any::<usize>().prop_map(Op::ReadDone),
        3 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(i, ok)| Op::FlushDone(i, ok)),
        2 => (1u64..150).prop_map(Op::Tick),
        1 => (any::<u32>(), any::<usize>()).prop_map(|(m, k)| Op::Crash(m, k)),
    ]
}

fn key(k: u8) -> String {
    format!("k/{k}")
}

struct Shell {
    cache: Cache,
    /// Journal on local disk: truncation mark, synced records, unsynced tail.
    truncated: u64,
    journal: Vec<JournalRecord>,
    unsynced: Vec<JournalRecord>,
    volume: BTreeMap<String, Bytes>,
    reads: Vec<String>,
    flushes: Vec<(u64, Vec<FlushWrite>)>,
    /// Requests in flight: what each write (or atomic group) would set, in order.
    writes: BTreeMap<RequestId, Vec<(String, Option<Bytes>)>>,
    gets: BTreeMap<RequestId, String>,
    /// The model: every acknowledged write, latest per key.
    acked: BTreeMap<String, Option<Bytes>>,
    /// Every acknowledged write: (version, key, value).
    history: Vec<(u64, String, Option<Bytes>)>,
    next_req: u64,
    now: Monotonic,
}

impl Shell {
    fn expect(&self, k: &str) -> Option<Bytes> {
        self.acked.get(k).cloned().flatten()
    }

    fn drain(&mut self) -> Result<(), TestCaseError> {
        while let Some(a) = self.cache.poll_action() {
            match a {
                CacheAction::JournalAppend {
                    seq,
                    key,
                    value,
                    part,
                } => self.unsynced.push(JournalRecord {
                    seq,
                    key,
                    value,
                    part,
                }),
                CacheAction::ReadShared { key } => self.reads.push(key),
                CacheAction::ListShared { .. } => unreachable!(),
                CacheAction::Flush { batch, writes } => {
                    for (_, other) in &self.flushes {
                        for w in &writes {
                            prop_assert!(
                                !other.iter().any(|o| o.key == w.key),
                                "{} in two flushes",
                                w.key
                            );
                        }
                    }
                    self.flushes.push((batch, writes));
                }
                CacheAction::JournalTruncate { upto } => {
                    prop_assert!(upto > self.truncated);
                    self.truncated = upto;
                    self.journal.retain(|r| r.seq > upto);
                }
                CacheAction::Reply { req, result } => {
                    if let Some(group) = self.writes.remove(&req) {
                        match result {
                            Ok(CacheReply::Written { version }) => {
                                let first = version + 1 - group.len() as u64;
                                for (i, (k, v)) in group.into_iter().enumerate() {
                                    self.history.push((first + i as u64, k.clone(), v.clone()));
                                    self.acked.insert(k, v);
                                }
                            }
                            Err(CacheError::Busy { .. }) => {}
                            other => prop_assert!(false, "write reply {other:?}"),
                        }
                    } else if let Some(k) = self.gets.remove(&req) {
                        match result {
                            Ok(CacheReply::Value(v)) => {
                                prop_assert_eq!(v, self.expect(&k), "get {}", k)
                            }
                            Err(CacheError::ReadersBusy { .. }) => {}
                            other => prop_assert!(false, "get reply {other:?}"),
                        }
                    }
                }
            }
        }
        prop_assert!(self.cache.dirty_bytes() <= self.cache.limits.dirty_bytes_max);
        prop_assert!(self.cache.clean_bytes() <= self.cache.limits.clean_bytes_max);
        // `flushed_through(t)` promises every write up to t is on the volume, or a later write of
        // its key is: the volume holds, per key, its last write at or below t or a later one.
        for &(t, _, _) in &self.history {
            if !self.cache.flushed_through(t) {
                continue;
            }
            for k in (0..6u8).map(key) {
                let of_k = || self.history.iter().filter(|h| h.1 == k);
                let Some(from) = of_k().filter(|h| h.0 <= t).map(|h| h.0).max() else {
                    continue;
                };
                let on_volume = self.volume.get(&k).cloned();
                prop_assert!(
                    of_k().any(|h| h.0 >= from && h.2 == on_volume),
                    "{} flushed through {} but the volume holds {:?}",
                    k,
                    t,
                    on_volume
                );
            }
        }
        let newest = self.history.iter().map(|h| h.0).max().unwrap_or(0);
        prop_assert!(self.cache.acknowledged_upto() >= newest);
        Ok(())
    }

    fn req(&mut self) -> RequestId {
        self.next_req += 1;
        RequestId(self.next_req)
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        let now = self.now;
        match op {
            Op::Set(k, v) => {
                let r = self.req();
                let val = Bytes::from(vec![v; (v % 40) as usize]);
                self.writes.insert(r, vec![(key(k), Some(val.clone()))]);
                self.cache.handle_set(now, r, &key(k), val);
            }
            Op::Delete(k) => {
                let r = self.req();
                self.writes.insert(r, vec![(key(k), None)]);
                self.cache.handle_delete(now, r, &key(k));
            }
            Op::SetMany(ws) => {
                let r = self.req();
                let group: Vec<(String, Option<Bytes>)> = ws
                    .iter()
                    .map(|&(k, v)| {
                        (
                            key(k),
                            (v > 0).then(|| Bytes::from(vec![v; (v % 40) as usize])),
                        )
                    })
                    .collect();
                self.writes.insert(r, group.clone());
                self.cache.handle_write_all(now, r, group);
            }
            Op::Get(k) => {
                let r = self.req();
                self.gets.insert(r, key(k));
                self.cache.handle_get(now, r, &key(k));
            }
            Op::Sync => {
                if let Some(last) = self.unsynced.last().map(|r| r.seq) {
                    self.journal.append(&mut self.unsynced);
                    self.cache.handle_journal_synced(now, last);
                }
            }
            Op::ReadDone(i) => {
                if !self.reads.is_empty() {
                    let k = self.reads.remove(i % self.reads.len());
                    let v = self.volume.get(&k).cloned();
                    self.cache.handle_read_done(now, &k, Ok(v));
                }
            }
            Op::FlushDone(i, ok) => {
                if !self.flushes.is_empty() {
                    let (batch, writes) = self.flushes.remove(i % self.flushes.len());
                    if ok {
                        for w in writes {
                            match w.value {
                                Some(v) => self.volume.insert(w.key, v),
                                None => self.volume.remove(&w.key),
                            };
                        }
                    }
                    let res = if ok { Ok(()) } else { Err("EIO".to_string()) };
                    self.cache.handle_flush_done(now, batch, res);
                }
            }
            Op::Tick(ms) => {
                self.now = now.plus_ms(ms);
                self.cache.handle_timeout(self.now);
            }
            Op::Crash(mask, keep) => {
                let mut bit = 0;
                for (_, writes) in self.flushes.drain(..) {
                    for w in writes {
                        if mask & (1 << (bit % 32)) != 0 {
                            match w.value {
                                Some(v) => self.volume.insert(w.key, v),
                                None => self.volume.remove(&w.key),
                            };
                        }
                        bit += 1;
                    }
                }
                // Unsynced records survive as a prefix; a write in it happened if its whole group
                // did (the unsynced tail always starts a group: syncs cover whole drains).
                let keep = keep % (self.unsynced.len() + 1);
                let kept: Vec<JournalRecord> = self.unsynced.drain(..).take(keep).collect();
                let mut i = 0;
                while i < kept.len() {
                    let n = match kept[i].part {
                        GroupPart::First { len } => len as usize,
                        _ => 1,
                    };
                    if i + n <= kept.len() {
                        for r in &kept[i..i + n] {
                            self.history.push((r.seq, r.key.clone(), r.value.clone()));
                            self.acked.insert(r.key.clone(), r.value.clone());
                        }
                    }
                    i += n;
                }
                self.journal.extend(kept);
                self.reads.clear();
                self.writes.clear();
                self.gets.clear();
                let next = self.journal.last().map_or(self.truncated, |r| r.seq) + 1;
                let recs = self.journal.clone();
                self.cache = Cache::recover(small(), now, self.truncated, next, recs);
            }
        }
        self.drain()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Invariant 5: a write acknowledged by the cache is what every later read returns, across any
    /// number of crashes at any point; after healing, the volume holds exactly the acknowledged state
    /// and the journal is empty. A write never acknowledged but found whole in the journal after a
    /// crash happened (later reads return it); an atomic group happens whole or not at all.
    /// Invariant 7: dirty and clean bytes stay within their bounds.
    #[test]
    fn acknowledged_writes_survive_crashes(ops in prop::collection::vec(op(), 0..200)) {
        let mut s = Shell {
            cache: Cache::new(small(), 0),
            truncated: 0,
            journal: vec![],
            unsynced: vec![],
            volume: BTreeMap::new(),
            reads: vec![],
            flushes: vec![],
            writes: BTreeMap::new(),
            gets: BTreeMap::new(),
            acked: BTreeMap::new(),
            history: Vec::new(),
            next_req: 0,
            now: Monotonic(0),
        };
        for op in ops {
            s.step(op)?;
        }
        // Liveness: heal (sync, reads and flushes succeed, time passes) until flushed.
        for _ in 0..100 {
            s.step(Op::Sync)?;
            while !s.reads.is_empty() { s.step(Op::ReadDone(0))?; }
            while !s.flushes.is_empty() { s.step(Op::FlushDone(0, true))?; }
            if s.cache.is_flushed() { break; }
            s.step(Op::Tick(1000))?;
        }
        prop_assert!(s.cache.is_flushed());
        prop_assert!(s.journal.is_empty(), "journal not truncated: {:?}", s.journal.len());
        for k in 0..6u8 {
            prop_assert_eq!(s.volume.get(&key(k)).cloned(), s.expect(&key(k)), "volume {}", key(k));
        }
        // And reads after one more crash agree.
        s.step(Op::Crash(0, 0))?;
        for k in 0..6u8 {
            s.step(Op::Get(k))?;
            while !s.reads.is_empty() { s.step(Op::ReadDone(0))?; }
        }
    }
}

#[test]
fn the_oldest_unflushed_write_is_known_until_it_reaches_the_volume() {
    let mut c = Cache::new(small(), 0);
    assert_eq!(c.oldest_dirty_since(), None);
    c.handle_set(Monotonic(10), RequestId(1), "a", b("1"));
    c.handle_journal_synced(Monotonic(10), 1);
    c.handle_set(Monotonic(20), RequestId(2), "b", b("1"));
    c.handle_journal_synced(Monotonic(20), 2);
    // A rewrite of the oldest key keeps its age: its first write still waits.
    c.handle_set(Monotonic(30), RequestId(3), "a", b("2"));
    c.handle_journal_synced(Monotonic(30), 3);
    drain(&mut c);
    assert_eq!(c.oldest_dirty_since(), Some(Monotonic(10)));
    c.handle_timeout(Monotonic(200));
    let batch = drain(&mut c)
        .iter()
        .find_map(|a| match a {
            CacheAction::Flush { batch, .. } => Some(*batch),
            _ => None,
        })
        .unwrap();
    // In flight is not on the volume yet.
    assert_eq!(c.oldest_dirty_since(), Some(Monotonic(10)));
    c.handle_flush_done(Monotonic(250), batch, Ok(()));
    drain(&mut c);
    assert_eq!(c.oldest_dirty_since(), None);
    assert!(c.is_flushed());
}
