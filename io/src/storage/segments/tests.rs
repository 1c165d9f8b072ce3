use super::*;
use crate::storage::volume::FsVolume;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The real volume, counting ranged reads and able to tear the next append to a data file (half
/// of it written, then an error).
struct Spy {
    inner: SharedVolume,
    tear_next_data_append: Arc<AtomicBool>,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl Volume for Spy {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.inner.read(key).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        self.inner.write(key, value).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.inner.list(prefix).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.inner.append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.commit(from, to).await
    }
    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_range(key, offset, len).await
    }
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        if key.ends_with(".data") && self.tear_next_data_append.swap(false, Ordering::SeqCst) {
            self.inner.append(key, data.slice(..data.len() / 2)).await?;
            return Err(io::Error::other("injected: the link dropped"));
        }
        self.inner.append_synced(key, data).await
    }
}

fn vol(dir: &std::path::Path) -> SharedVolume {
    SharedVolume::new(FsVolume::new(dir).unwrap())
}

fn msg(flow: u32, seq: u64) -> String {
    format!("clients/C.1/flows/F.{flow}/messages/{seq:020}")
}

fn dir(flow: u32) -> String {
    format!("clients/C.1/flows/F.{flow}/messages")
}

fn value(flow: u32, seq: u64) -> Bytes {
    Bytes::from(format!("flow {flow} message {seq}"))
}

fn batch(items: &[(u32, u64)]) -> Vec<(String, Option<Bytes>)> {
    items
        .iter()
        .map(|&(f, s)| (msg(f, s), Some(value(f, s))))
        .collect()
}

async fn read_all<V: Volume>(v: &V, d: &str, runs: &[RunRef]) -> Vec<Record> {
    let mut r = MessageReader::new(v, d, runs).await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = r.next().await.unwrap() {
        out.push(m);
    }
    out
}

#[tokio::test]
async fn flushes_are_runs_that_read_back_in_order_and_are_found_by_an_audit() {
    let t = tempfile::tempdir().unwrap();
    let v = vol(t.path());
    let log = SegmentLog::new(v.clone(), "node-1", 100).unwrap();
    // Flow 1's messages arrive out of order across three flushes, interleaved with flow 2's.
    log.write_many(batch(&[(1, 0), (1, 2), (2, 0)]))
        .await
        .unwrap();
    log.write_many(batch(&[(1, 1), (2, 1)])).await.unwrap();
    log.write_many(batch(&[(1, 3), (1, 2)])).await.unwrap(); // 2 again: a retried flush
    // Two files (data, index) for every flush: no file per message, no directory per flow.
    let files = v.list("").await.unwrap();
    assert_eq!(
        files,
        vec![
            "segments/node-1-000001.data".to_owned(),
            "segments/node-1-000001.index".to_owned()
        ]
    );
    assert_eq!(
        log.runs_covering(&dir(1), 5),
        None,
        "seq 4 was never written"
    );
    let runs = log.runs_covering(&dir(2), 2).expect("flow 2 is covered");
    assert_eq!(runs.len(), 2);
    let got = read_all(&v, &dir(2), &runs).await;
    assert_eq!(
        got,
        vec![(msg(2, 0), value(2, 0)), (msg(2, 1), value(2, 1))]
    );
    // Another node, which never saw flow 1, finds it from the index files (an audit).
    log.forget(&dir(1));
    assert_eq!(log.runs_covering(&dir(1), 4), None);
    let (found_runs, found) = locate(&v, &dir(1)).await.unwrap();
    let want: Vec<Record> = (0..4).map(|s| (msg(1, s), value(1, s))).collect();
    assert_eq!(found, want);
    assert_eq!(found_runs.len(), 3);
    log.learn(&dir(1), &found_runs);
    let runs = log
        .runs_covering(&dir(1), 4)
        .expect("learned runs cover 0..4");
    assert_eq!(
        read_all(&v, &dir(1), &runs).await,
        want,
        "in key order, seq 2 once"
    );
}

#[tokio::test]
async fn a_failed_append_moves_to_new_files_and_its_torn_run_is_skipped() {
    let t = tempfile::tempdir().unwrap();
    let inner = vol(t.path());
    let fail = Arc::new(AtomicBool::new(false));
    let flaky = SharedVolume::new(Spy {
        inner: inner.clone(),
        tear_next_data_append: fail.clone(),
        reads: Arc::default(),
    });
    let log = SegmentLog::new(flaky, "n2", 100).unwrap();
    log.write_many(batch(&[(1, 0)])).await.unwrap();
    // The next flush tears.
    fail.store(true, Ordering::SeqCst);
    let err = log.write_many(batch(&[(1, 1), (1, 2)])).await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(
        log.runs_covering(&dir(1), 3),
        None,
        "the torn flush recorded nothing"
    );
    // The buffer retries the flush: it lands in new files.
    log.write_many(batch(&[(1, 1), (1, 2)])).await.unwrap();
    let files = inner.list("segments/").await.unwrap();
    assert!(
        files.contains(&"segments/n2-000002.data".to_owned()),
        "{files:?}"
    );
    // The torn run's index entry survives in file 1 and is skipped: every message once.
    let (_, found) = locate(&inner, &dir(1)).await.unwrap();
    let want: Vec<Record> = (0..3).map(|s| (msg(1, s), value(1, s))).collect();
    assert_eq!(found, want);
}

#[tokio::test]
async fn files_rotate_at_their_bound_and_a_run_stays_under_its_bound() {
    let t = tempfile::tempdir().unwrap();
    let v = vol(t.path());
    let log = SegmentLog::new(v.clone(), "r", 100)
        .unwrap()
        .with_file_bytes_max(200);
    for s in 0..4 {
        log.write_many(batch(&[(1, s)])).await.unwrap();
    }
    let data: Vec<String> = v
        .list("segments/")
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".data"))
        .collect();
    assert!(data.len() >= 2, "{data:?}");
    let runs = log.runs_covering(&dir(1), 4).unwrap();
    let want: Vec<Record> = (0..4).map(|s| (msg(1, s), value(1, s))).collect();
    assert_eq!(read_all(&v, &dir(1), &runs).await, want);
    // One flush larger than a run's bound is split into several runs.
    let big = Bytes::from(vec![7u8; (RUN_BYTES_MAX / 3) as usize]);
    let writes: Vec<_> = (0..5).map(|s| (msg(2, s), Some(big.clone()))).collect();
    log.write_many(writes).await.unwrap();
    let runs = log.runs_covering(&dir(2), 5).unwrap();
    assert!(
        runs.len() >= 2 && runs.iter().all(|r| r.len <= RUN_BYTES_MAX),
        "{runs:?}"
    );
    assert_eq!(read_all(&v, &dir(2), &runs).await.len(), 5);
}

#[tokio::test]
async fn messages_of_the_old_layout_stay_readable() {
    let t = tempfile::tempdir().unwrap();
    let v = vol(t.path());
    for s in 0..3 {
        v.write(&msg(1, s), value(1, s)).await.unwrap();
    }
    let want: Vec<Record> = (0..3).map(|s| (msg(1, s), value(1, s))).collect();
    assert_eq!(read_all(&v, &dir(1), &[]).await, want, "no runs: listed");
    // A flow that spans an upgrade: old files, then runs; an audit finds both.
    let log = SegmentLog::new(v.clone(), "u", 10).unwrap();
    log.write_many(batch(&[(1, 3)])).await.unwrap();
    let (runs, found) = locate(&v, &dir(1)).await.unwrap();
    assert_eq!(found.len(), 4);
    assert_eq!(runs.iter().filter(|(r, _)| r.whole).count(), 3);
    let refs: Vec<RunRef> = runs.into_iter().map(|(r, _)| r).collect();
    assert_eq!(read_all(&v, &dir(1), &refs).await.len(), 4);
}

#[test]
fn the_run_index_is_bounded_and_a_forgotten_flow_is_not_claimed_covered() {
    let mut idx = RunIndex::new(2);
    let run = |n: u64| RunRef {
        file: "segments/x-000001.data".into(),
        offset: n,
        len: 1,
        first: format!("{n:020}"),
        last: format!("{n:020}"),
        whole: false,
    };
    let name = |n: u64| format!("{n:020}");
    idx.record("a", run(0), [name(0).as_str()].into_iter());
    idx.record("b", run(1), [name(0).as_str()].into_iter());
    idx.record("a", run(2), [name(1).as_str()].into_iter());
    idx.record("c", run(3), [name(0).as_str()].into_iter());
    assert_eq!(idx.len(), 2, "at the bound, the oldest updated (b) goes");
    assert_eq!(idx.covering("b", 1), None);
    // "a" evicted and written again: it must not claim coverage from the later run alone.
    idx.record("d", run(4), [name(0).as_str()].into_iter());
    idx.record("e", run(5), [name(0).as_str()].into_iter());
    idx.record("a", run(6), [name(2).as_str()].into_iter());
    assert_eq!(idx.covering("a", 3), None);
    assert_eq!(idx.covering("e", 1).map(|r| r.len()), Some(1));
    // Coverage merges ranges in any order.
    let mut k = Known::default();
    for s in [3, 0, 2, 1, 5] {
        k.add_seq(s);
    }
    assert!(k.covers(4) && !k.covers(6));
    k.add_seq(4);
    assert!(k.covers(6));
    assert_eq!(k.seqs.len(), 1);
}

#[test]
fn parsing_stops_at_a_torn_or_corrupt_record() {
    let mut b = BytesMut::new();
    put_record(&mut b, &msg(1, 0), b"one");
    put_record(&mut b, &msg(1, 1), b"two");
    let whole = b.clone().freeze();
    let (r, used) = parse_records(&whole);
    assert_eq!((r.len(), used), (2, whole.len()));
    let torn = whole.slice(..whole.len() - 1);
    assert_eq!(parse_records(&torn).0.len(), 1);
    let mut bad = whole.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(parse_records(&Bytes::from(bad)).0.len(), 1, "crc");
    let mut i = BytesMut::from(INDEX_HEADER);
    let e = IndexEntry {
        dir: dir(1),
        offset: 21,
        len: 40,
    };
    put_entry(&mut i, &e);
    put_entry(&mut i, &e);
    assert_eq!(parse_index(&i), vec![e.clone(), e.clone()]);
    assert_eq!(parse_index(&i[..i.len() - 2]), vec![e]);
    assert!(parse_index(b"not an index").is_empty());
}

#[tokio::test]
async fn the_log_refuses_what_it_cannot_do() {
    let t = tempfile::tempdir().unwrap();
    let v = vol(t.path());
    assert!(SegmentLog::new(v.clone(), "a/b", 1).is_err());
    assert!(SegmentLog::new(v.clone(), "..", 1).is_err());
    let log = SegmentLog::new(v, "ok", 1).unwrap();
    let e = log.write_many(vec![(msg(1, 0), None)]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    let e = log
        .write_many(vec![("../x".into(), Some(Bytes::new()))])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn the_block_cache_reads_each_block_once_within_its_bound_and_rereads_a_short_one() {
    let t = tempfile::tempdir().unwrap();
    let v = vol(t.path());
    let log = SegmentLog::new(v.clone(), "c", 100).unwrap();
    // Ten flows of 2 messages, 300 KiB each: about 6 MiB in one data file.
    let big = |f: u32, s: u64| Bytes::from(vec![(f * 10 + s as u32) as u8; 300 << 10]);
    for f in 0..10 {
        log.write_many((0..2).map(|s| (msg(f, s), Some(big(f, s)))).collect())
            .await
            .unwrap();
    }
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cache = BlockCache::new(
        Spy {
            inner: v.clone(),
            tear_next_data_append: Arc::default(),
            reads: reads.clone(),
        },
        4,
    );
    for f in 0..10 {
        let runs = log.runs_covering(&dir(f), 2).unwrap();
        let got = read_all(&cache, &dir(f), &runs).await;
        assert_eq!(
            got,
            vec![(msg(f, 0), big(f, 0)), (msg(f, 1), big(f, 1))],
            "flow {f}"
        );
        assert!(cache.cached() <= 4, "bounded");
    }
    // 6 MiB in 1 MiB blocks: each block read about once (a flow's run may straddle two), not
    // once per message.
    let n = reads.load(Ordering::SeqCst);
    assert!((6..=8).contains(&n), "{n} block reads");
    // The file grows after a short last block was cached: a run past it reads the block again.
    let last = log.files(SEGMENTS_DIR, 1).0;
    let end = v.read(&last).await.unwrap().unwrap().len() as u64;
    let short = cache
        .read_range(&last, end - 10, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short.len(), 10);
    log.write_many(batch(&[(11, 0)])).await.unwrap();
    let runs = log.runs_covering(&dir(11), 1).unwrap();
    assert_eq!(
        read_all(&cache, &dir(11), &runs).await,
        vec![(msg(11, 0), value(11, 0))]
    );
}

fn event(client: &str, day: &str, seq: u64) -> String {
    format!(
        "clients/{client}/events/Generic.Events.Test/{day}/{:020}-{seq:020}",
        7
    )
}

/// Event batches go to files of their own per UTC day (one flush with flows and two days is three
/// pairs of files); a day's reader scans only that day's index files; retention deletes the days
/// before a cutoff as whole files, leaving the later day and every flow message readable.
#[tokio::test]
async fn event_days_have_files_of_their_own_and_retention_deletes_them_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let v = vol(tmp.path());
    let log = SegmentLog::new(v.clone(), "w1", 16).unwrap();
    let (old, new) = ("2026-12-01", "2026-12-06");
    let mut writes: Vec<(String, Option<Bytes>)> = vec![
        (msg(1, 0), Some(value(1, 0))),
        (event("C.1", old, 0), Some(Bytes::from("old 0"))),
        (event("C.2", old, 0), Some(Bytes::from("old c2"))),
        (event("C.1", new, 0), Some(Bytes::from("new 0"))),
    ];
    log.write_many(writes.clone()).await.unwrap();
    let mut keys = v.list("segments/").await.unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "segments/events/2026-12-01/w1-000001.data",
            "segments/events/2026-12-01/w1-000001.index",
            "segments/events/2026-12-06/w1-000001.data",
            "segments/events/2026-12-06/w1-000001.index",
            "segments/w1-000001.data",
            "segments/w1-000001.index",
        ]
    );
    // A second flush appends to the same files.
    writes = vec![(event("C.1", old, 1), Some(Bytes::from("old 1")))];
    log.write_many(writes).await.unwrap();
    let old_dir = format!("clients/C.1/events/Generic.Events.Test/{old}");
    let runs = index_runs(&v, &old_dir).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert!(
        runs.iter()
            .all(|r| r.file.starts_with("segments/events/2026-12-01/"))
    );
    let mut got = Vec::new();
    let mut reader = crate::storage::events::DayReader::new(&old_dir);
    reader
        .read_new(&v, &mut |(_, b)| {
            got.push(b);
            true
        })
        .await
        .unwrap();
    assert_eq!(got, [Bytes::from("old 0"), Bytes::from("old 1")]);

    // Retention from the new day: the old day goes, whole; flows and the new day stay.
    assert_eq!(delete_event_days_before(&v, new).await.unwrap(), [old]);
    assert!(index_runs(&v, &old_dir).await.unwrap().is_empty());
    let new_dir = format!("clients/C.1/events/Generic.Events.Test/{new}");
    assert_eq!(index_runs(&v, &new_dir).await.unwrap().len(), 1);
    let (_, found) = locate(&v, &dir(1)).await.unwrap();
    assert_eq!(found, [(msg(1, 0), value(1, 0))]);
    assert!(delete_event_days_before(&v, new).await.unwrap().is_empty());
    // A day never written has no runs (not an error).
    let never = "clients/C.1/events/Generic.Events.Test/2026-01-01";
    assert!(index_runs(&v, never).await.unwrap().is_empty());
}
