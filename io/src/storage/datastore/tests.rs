//! Datastore service tests: the core's cache over a real journal and volumes.

use super::*;
use crate::clock::SystemClock;
use crate::storage::local::StdDisk;
use crate::storage::volume::FsVolume;
use std::sync::atomic::{AtomicU64, Ordering};

fn opts(flush_age_ms: u64) -> DatastoreOptions {
    let limits = CacheLimits {
        flush_age_max_ms: flush_age_ms,
        ..CacheLimits::default()
    };
    DatastoreOptions {
        limits,
        ..DatastoreOptions::default()
    }
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A volume whose writes never complete (a hung NFS server), and whose reads find nothing.
struct StuckVolume;

impl Volume for StuckVolume {
    async fn read(&self, _: &str) -> io::Result<Option<Bytes>> {
        Ok(None)
    }
    async fn write(&self, _: &str, _: Bytes) -> io::Result<()> {
        std::future::pending().await
    }
    async fn delete(&self, _: &str) -> io::Result<()> {
        std::future::pending().await
    }
    async fn list(&self, _: &str) -> io::Result<Vec<String>> {
        Ok(vec![])
    }
    async fn append(&self, _: &str, _: Bytes) -> io::Result<()> {
        std::future::pending().await
    }
    async fn commit(&self, _: &str, _: &str) -> io::Result<()> {
        std::future::pending().await
    }
}

/// Counts reads of an inner volume.
struct Counting(FsVolume, Arc<AtomicU64>);

impl Volume for Counting {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.read(key).await
    }
    async fn write(&self, key: &str, v: Bytes) -> io::Result<()> {
        self.0.write(key, v).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.0.list(prefix).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.0.append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.0.commit(from, to).await
    }
}

#[tokio::test]
async fn writes_are_readable_at_once_and_reach_the_volume() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let disk = StdDisk::new(local.path()).unwrap();
    let (ds, task, report) = Datastore::open(
        disk,
        FsVolume::new(shared.path()).unwrap(),
        clock(),
        opts(10),
    )
    .unwrap();
    assert_eq!(report.replayed, 0);
    let v1 = ds
        .set("hunts/H.1/record.json", Bytes::from_static(b"{\"a\":1}"))
        .await
        .unwrap();
    let v2 = ds
        .set("hunts/H.2/record.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(
        ds.get("hunts/H.1/record.json").await.unwrap(),
        Some(Bytes::from_static(b"{\"a\":1}"))
    );
    ds.delete("hunts/H.2/record.json").await.unwrap();
    assert_eq!(
        ds.list("hunts/").await.unwrap(),
        (vec!["hunts/H.1/record.json".to_string()], false)
    );
    ds.flushed().await.unwrap();
    let on_volume = std::fs::read(shared.path().join("hunts/H.1/record.json")).unwrap();
    assert_eq!(on_volume, b"{\"a\":1}");
    assert!(!shared.path().join("hunts/H.2/record.json").exists());
    assert!(matches!(
        ds.set("../escape", Bytes::new()).await,
        Err(DatastoreError::Refused(CacheError::BadKey(_)))
    ));
    drop(ds);
    task.await.unwrap().unwrap();
    // Everything was flushed, so the journal holds nothing to replay.
    let disk = StdDisk::new(local.path()).unwrap();
    let (_ds, _task, report) = Datastore::open(
        disk,
        FsVolume::new(shared.path()).unwrap(),
        clock(),
        opts(10),
    )
    .unwrap();
    assert_eq!(report.replayed, 0);
}

#[tokio::test]
async fn acknowledged_writes_survive_a_crash_before_any_flush() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let (ds, task, _) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        StuckVolume,
        clock(),
        opts(1),
    )
    .unwrap();
    for i in 0..50 {
        ds.set(
            &format!("clients/C.{i:016x}/record.json"),
            Bytes::from(format!("v{i}")),
        )
        .await
        .unwrap();
    }
    ds.delete("clients/C.0000000000000000/record.json")
        .await
        .unwrap();
    // The master dies: the task is gone, nothing reached the (hung) volume.
    task.abort();
    let _ = task.await;
    drop(ds);

    let volume = FsVolume::new(shared.path()).unwrap();
    let (ds, _task, report) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        volume,
        clock(),
        opts(1),
    )
    .unwrap();
    assert_eq!(report.replayed, 51);
    assert_eq!(
        ds.get("clients/C.0000000000000000/record.json")
            .await
            .unwrap(),
        None
    );
    for i in 1..50 {
        let got = ds
            .get(&format!("clients/C.{i:016x}/record.json"))
            .await
            .unwrap();
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))), "key {i}");
    }
    ds.flushed().await.unwrap();
    assert_eq!(
        std::fs::read(shared.path().join("clients/C.0000000000000031/record.json")).unwrap(),
        b"v49"
    );
}

#[tokio::test]
async fn a_hung_volume_fills_the_dirty_bound_and_writes_are_refused() {
    let local = tempfile::tempdir().unwrap();
    let limits = CacheLimits {
        dirty_bytes_max: 64 << 10,
        value_bytes_max: 16 << 10,
        flush_age_max_ms: 1,
        ..CacheLimits::default()
    };
    let o = DatastoreOptions {
        limits,
        ..DatastoreOptions::default()
    };
    let (ds, _task, _) =
        Datastore::open(StdDisk::new(local.path()).unwrap(), StuckVolume, clock(), o).unwrap();
    let mut refused = None;
    for i in 0..100 {
        match ds
            .set(&format!("k/{i}"), Bytes::from(vec![0u8; 4096]))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = refused.expect("the dirty bound must refuse writes");
    assert!(
        matches!(e, DatastoreError::Refused(CacheError::Busy { .. })),
        "{e}"
    );
    assert!((10..20).contains(&i), "refused at write {i}");
    // Reads still work while writes are refused.
    assert_eq!(
        ds.get("k/0").await.unwrap(),
        Some(Bytes::from(vec![0u8; 4096]))
    );
}

#[tokio::test]
async fn concurrent_misses_share_one_volume_read() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(shared.path().join("a")).unwrap();
    std::fs::write(shared.path().join("a/k"), b"v").unwrap();
    let reads = Arc::new(AtomicU64::new(0));
    let volume = Counting(FsVolume::new(shared.path()).unwrap(), reads.clone());
    let (ds, _task, _) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        volume,
        clock(),
        opts(10),
    )
    .unwrap();
    let gets: Vec<_> = (0..20)
        .map(|_| {
            let ds = ds.clone();
            tokio::spawn(async move { ds.get("a/k").await })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap().unwrap(), Some(Bytes::from_static(b"v")));
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    ds.get("a/k").await.unwrap();
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "cached after the first read"
    );
}

#[tokio::test]
async fn fail_stop_ends_the_task_with_the_reason_and_refuses_later_requests() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let (ds, task, _) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        FsVolume::new(shared.path()).unwrap(),
        clock(),
        opts(10),
    )
    .unwrap();
    ds.set("a", Bytes::from_static(b"1")).await.unwrap();
    ds.fail_stop("a write could not be made durable");
    let err = task.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("a write could not be made durable"), "{err}");
    assert!(matches!(
        ds.set("b", Bytes::new()).await,
        Err(DatastoreError::Stopped(why)) if why.contains("could not be made durable")
    ));
}

/// A local disk whose appends fail as a full disk does, once `full` is set.
struct FillingDisk {
    inner: StdDisk,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::storage::local::LocalDisk for FillingDisk {
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        if self.full.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        self.inner.append(path, data)
    }
    fn sync(&mut self, path: &str) -> io::Result<()> {
        self.inner.sync(path)
    }
    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read(path)
    }
    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.inner.write_atomic(path, data)
    }
    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()> {
        self.inner.truncate(path, len)
    }
    fn remove(&mut self, path: &str) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>> {
        self.inner.list(prefix)
    }
}

#[tokio::test]
async fn a_full_local_disk_stops_the_datastore_and_every_caller_is_told_why() {
    let local = tempfile::tempdir().unwrap();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let disk = FillingDisk {
        inner: StdDisk::new(local.path()).unwrap(),
        full: full.clone(),
    };
    let (ds, task, _) = Datastore::open(disk, StuckVolume, clock(), opts(10)).unwrap();
    ds.set("a", Bytes::from_static(b"1")).await.unwrap();
    full.store(true, Ordering::Relaxed);
    let e = ds.set("b", Bytes::from_static(b"2")).await.unwrap_err();
    // Before: "the datastore has stopped (see the master's log)", and nothing in the log either.
    assert!(
        e.to_string().contains("journal on the local disk failed")
            && e.to_string().contains("no storage space"),
        "{e}"
    );
    let later = ds.get("a").await.unwrap_err().to_string();
    assert!(later.contains("no storage space"), "{later}");
    assert!(task.await.unwrap().is_err());
}

/// A volume that is full (writes fail) while `full` is set.
struct FullVolume(FsVolume, Arc<std::sync::atomic::AtomicBool>);

impl FullVolume {
    fn check(&self) -> io::Result<()> {
        if self.1.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl Volume for FullVolume {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.0.read(key).await
    }
    async fn write(&self, key: &str, v: Bytes) -> io::Result<()> {
        self.check()?;
        self.0.write(key, v).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.check()?;
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.0.list(prefix).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.check()?;
        self.0.append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.check()?;
        self.0.commit(from, to).await
    }
}

#[tokio::test]
async fn a_full_volume_is_reported_until_a_flush_succeeds() {
    let (local, shared) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let volume = FullVolume(FsVolume::new(shared.path()).unwrap(), full.clone());
    let (ds, _task, _) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        volume,
        clock(),
        opts(1),
    )
    .unwrap();
    assert_eq!(ds.volume_error(), None);
    ds.set("k", Bytes::from_static(b"v")).await.unwrap();
    let mut seen = None;
    for _ in 0..500 {
        seen = ds.volume_error();
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, why) = seen.expect("the failing flush is reported");
    assert!(why.contains("no storage space"), "{why}");
    // The write is still acknowledged and readable; once the volume has room it lands.
    assert_eq!(ds.get("k").await.unwrap(), Some(Bytes::from_static(b"v")));
    full.store(false, Ordering::Relaxed);
    ds.flushed().await.unwrap();
    assert_eq!(ds.volume_error(), None);
    assert_eq!(std::fs::read(shared.path().join("k")).unwrap(), b"v");
}

#[test]
fn journal_records_round_trip_with_their_group_part() {
    let v = Some(Bytes::from_static(b"value"));
    for part in [
        GroupPart::Whole,
        GroupPart::First { len: 3 },
        GroupPart::Next,
    ] {
        for value in [v.clone(), None] {
            let r = decode(9, &encode("tasks/C.1/F.2.pb", &value, part)).unwrap();
            assert_eq!(
                r,
                JournalRecord {
                    seq: 9,
                    key: "tasks/C.1/F.2.pb".into(),
                    value,
                    part
                }
            );
        }
    }
    // A record written before groups existed reads as a write on its own.
    let mut old = vec![1u8];
    old.extend_from_slice(&1u32.to_le_bytes());
    old.extend_from_slice(b"k");
    old.extend_from_slice(b"v");
    assert_eq!(decode(1, &old).unwrap().part, GroupPart::Whole);
    assert!(decode(1, &[8, 0, 0, 0, 0]).is_err(), "unknown flags");
    assert!(
        decode(1, &[6, 0, 0, 0, 0]).is_err(),
        "first and next at once"
    );
}

#[tokio::test]
async fn an_atomic_group_is_replayed_whole_or_not_at_all() {
    let local = tempfile::tempdir().unwrap();
    let (ds, task, _) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        StuckVolume,
        clock(),
        opts(1),
    )
    .unwrap();
    let w = |k: &str| (k.to_owned(), Some(Bytes::from(k.to_owned())));
    ds.write_all(vec![w("g/a"), w("g/b"), w("g/c")])
        .await
        .unwrap();
    drop(ds);
    task.abort();
    // What a failed append leaves at the end: the first two records of a second group.
    let disk = StdDisk::new(local.path()).unwrap();
    let (mut journal, rec) = Journal::open(disk, "journal", 64 << 20).unwrap();
    assert_eq!(rec.records.len(), 3);
    let seq = journal.next_seq();
    journal
        .append(seq, &encode("g/d", &None, GroupPart::First { len: 3 }))
        .unwrap();
    journal
        .append(seq + 1, &encode("g/a", &None, GroupPart::Next))
        .unwrap();
    journal.sync().unwrap();
    drop(journal);
    let (ds, _task, report) = Datastore::open(
        StdDisk::new(local.path()).unwrap(),
        StuckVolume,
        clock(),
        opts(1),
    )
    .unwrap();
    assert_eq!((report.replayed, report.dropped), (3, 2));
    assert_eq!(
        ds.get("g/a").await.unwrap(),
        Some(Bytes::from_static(b"g/a")),
        "the torn group's delete of g/a did not happen"
    );
    // Numbering continues after the dropped records.
    ds.set("g/e", Bytes::from_static(b"e")).await.unwrap();
}

// The start image (docs/architecture.md, "The start image").

fn tracks_t(k: &str) -> bool {
    k.starts_with("t/")
}

fn image_opts(segment_bytes_max: u64) -> DatastoreOptions {
    DatastoreOptions {
        segment_bytes_max,
        image: Some(ImageOptions { tracks: tracks_t }),
        ..opts(1)
    }
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

async fn crash(ds: Datastore, task: JoinHandle<io::Result<()>>) {
    drop(ds);
    task.abort();
    let _ = task.await;
}

/// Seeded from what the start read, plus every tracked write journalled since the open (also those
/// before the seed), and loaded after a crash with the journal replayed: untracked keys stay out.
#[tokio::test]
async fn the_start_image_is_seeded_then_loaded_with_later_writes_replayed() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let open = || {
        Datastore::open(
            StdDisk::new(local.path()).unwrap(),
            FsVolume::new(shared.path()).unwrap(),
            clock(),
            image_opts(64 << 20),
        )
        .unwrap()
    };
    let (ds, task, report) = open();
    assert_eq!(report.image, ImageReport::Absent);
    assert_eq!(ds.take_start_image().await.unwrap(), None);
    ds.set("t/a", b("1")).await.unwrap();
    ds.set("t/b", b("2")).await.unwrap();
    ds.set("u/x", b("x")).await.unwrap();
    // What the start's listing found (it read t/a after the write above, and t/old from the volume).
    let seeded = vec![
        ("t/a".to_owned(), b("1")),
        ("t/old".to_owned(), b("o")),
        ("u/x".to_owned(), b("x")),
    ];
    let generation = ds.seed_start_image(seeded.clone()).await.unwrap();
    assert_eq!(
        generation, 1,
        "seeded at the journal's next record when it opened"
    );
    assert!(ds.seed_start_image(seeded).await.is_err(), "seeded once");
    ds.set("t/a", b("3")).await.unwrap();
    ds.delete("t/old").await.unwrap();
    ds.write_all(vec![("t/c".into(), Some(b("c"))), ("u/y".into(), None)])
        .await
        .unwrap();
    crash(ds, task).await;

    let (ds, task, report) = open();
    assert!(matches!(
        report.image,
        ImageReport::Loaded {
            generation: 1,
            keys: 3
        }
    ));
    let want: image::Entries = [("t/a", "3"), ("t/b", "2"), ("t/c", "c")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), b(v)))
        .collect();
    assert_eq!(ds.take_start_image().await.unwrap(), Some(want));
    assert_eq!(ds.take_start_image().await.unwrap(), None, "taken once");
    crash(ds, task).await;
}

/// Drives the journal through many segment deletions: each one folds the records it drops into the
/// image first, so a restart finds every tracked write (and the image's generation moved on).
#[tokio::test]
async fn the_image_is_folded_before_the_journal_drops_its_records() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let open = || {
        Datastore::open(
            StdDisk::new(local.path()).unwrap(),
            FsVolume::new(shared.path()).unwrap(),
            clock(),
            image_opts(512),
        )
        .unwrap()
    };
    let (ds, task, _) = open();
    ds.seed_start_image(vec![]).await.unwrap();
    let mut want = image::Entries::new();
    for round in 0..20u32 {
        for i in 0..10u32 {
            let k = format!("t/{}", (round * 7 + i) % 37);
            if (round + i) % 5 == 0 {
                ds.delete(&k).await.unwrap();
                want.remove(&k);
            } else {
                let v = format!("{round}.{i}");
                ds.set(&k, b(&v)).await.unwrap();
                want.insert(k, b(&v));
            }
            ds.set(&format!("u/{i}"), b("untracked")).await.unwrap();
        }
        ds.flushed().await.unwrap();
    }
    // One more write after the last flush: replayed from the journal on top of the image.
    ds.set("t/last", b("L")).await.unwrap();
    want.insert("t/last".into(), b("L"));
    crash(ds, task).await;

    let (ds, task, report) = open();
    let ImageReport::Loaded { generation, .. } = report.image else {
        panic!("no image loaded: {:?}", report.image);
    };
    assert!(generation > 1, "folds moved the image on ({generation})");
    assert_eq!(ds.take_start_image().await.unwrap(), Some(want));
    crash(ds, task).await;
}

/// The open's check is what catches an image the journal can no longer bring up to date (planted:
/// an image at generation 1 after the journal deleted those records) and a damaged one: each is
/// removed, nothing is loaded, and the listing path can seed a new one.
#[tokio::test]
async fn a_stale_or_damaged_image_is_discarded() {
    let local = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let open = || {
        Datastore::open(
            StdDisk::new(local.path()).unwrap(),
            FsVolume::new(shared.path()).unwrap(),
            clock(),
            image_opts(512),
        )
        .unwrap()
    };
    let path = local.path().join("journal").join(image::FILE);
    let (ds, task, _) = open();
    for i in 0..100u32 {
        ds.set(&format!("t/{i}"), b("v")).await.unwrap();
        if i % 10 == 9 {
            ds.flushed().await.unwrap();
        }
    }
    crash(ds, task).await;
    // Planted: an image whose records the journal has deleted since (the fold skipped).
    std::fs::write(&path, image::encode(1, &image::Entries::new())).unwrap();
    let (ds, task, report) = open();
    assert_eq!(report.image, ImageReport::Discarded);
    assert!(!path.exists(), "the stale image is removed");
    assert_eq!(ds.take_start_image().await.unwrap(), None);
    ds.seed_start_image(vec![("t/0".into(), b("v"))])
        .await
        .unwrap();
    crash(ds, task).await;
    let (ds, task, report) = open();
    assert!(matches!(report.image, ImageReport::Loaded { keys: 1, .. }));
    crash(ds, task).await;
    // Damaged: one flipped bit.
    let mut buf = std::fs::read(&path).unwrap();
    let mid = buf.len() / 2;
    buf[mid] ^= 1;
    std::fs::write(&path, buf).unwrap();
    let (ds, task, report) = open();
    assert_eq!(report.image, ImageReport::Discarded);
    assert_eq!(ds.take_start_image().await.unwrap(), None);
    crash(ds, task).await;
}
