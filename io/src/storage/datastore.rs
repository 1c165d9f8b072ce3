//! The master's datastore (`MemcacheFileDataStore`): the core's cache policy
//! ([`talon_core::datastore::Cache`]) driven over a journal on fast local disk and the slow shared
//! volume.
//!
//! One task owns the cache and the journal. It takes the inputs that are ready (every waiting request,
//! up to 1,024, or a volume completion, or the cache's deadline), then drains the cache's actions in
//! order. Journal appends made during a drain are synced together with one fsync (group commit: many
//! callers' writes share it) before the cache is told, so a
//! write is acknowledged only once durable on local disk, and the 40–60 ms volume is never on the
//! write path. Volume reads, lists and flushes run as spawned tasks (their number is bounded by the
//! cache's limits) and report back through a channel.
//!
//! Failure policy: if the journal cannot be written or synced, durability can no longer be promised,
//! so the task stops with the error (fail-stop) and callers of in-flight writes get
//! [`DatastoreError::Stopped`], which is indeterminate (the write may or may not have been journalled).

use crate::clock::Clock;
use crate::storage::journal::Journal;
use crate::storage::local::LocalDisk;
use crate::storage::volume::Volume;
use bytes::Bytes;
use image::Keeper;
pub use image::{ImageOptions, ImageReport};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use talon_core::datastore::{
    Cache, CacheAction, CacheError, CacheLimits, CacheReply, FlushWrite, GroupPart, JournalRecord,
    RequestId,
};
use talon_core::{Monotonic, Timestamp};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How the datastore is set up.
#[derive(Clone, Debug)]
pub struct DatastoreOptions {
    /// The journal's directory on the local disk (relative to the disk's root).
    pub journal_dir: String,
    /// Journal segment size.
    pub segment_bytes_max: u64,
    /// The cache's bounds and timings.
    pub limits: CacheLimits,
    /// Requests queued for the datastore task; callers wait (back-pressure) beyond it.
    pub requests_max: usize,
    /// Keep a start image of these keys beside the journal (the master's datastore).
    pub image: Option<ImageOptions>,
    /// The buffer's name in metrics (`talon_writebehind_backlog_bytes{buffer}`).
    pub metrics_name: &'static str,
}

impl Default for DatastoreOptions {
    fn default() -> Self {
        DatastoreOptions {
            journal_dir: "journal".into(),
            segment_bytes_max: 64 << 20,
            limits: CacheLimits::default(),
            requests_max: 4096,
            image: None,
            metrics_name: "datastore",
        }
    }
}

/// Why a datastore call failed.
#[derive(Debug, PartialEq, Eq)]
pub enum DatastoreError {
    /// The cache refused it; determinate (nothing happened).
    Refused(CacheError),
    /// The datastore task has stopped, for this reason; for a write, indeterminate.
    Stopped(String),
}

impl fmt::Display for DatastoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatastoreError::Refused(e) => write!(f, "{e}"),
            DatastoreError::Stopped(why) => write!(f, "the datastore has stopped: {why}"),
        }
    }
}

impl std::error::Error for DatastoreError {}

/// What recovery found in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Journal records replayed (writes that were acknowledged, or durable, but maybe not flushed).
    pub replayed: usize,
    /// Bytes of a torn final record that were cut off.
    pub torn_bytes: u64,
    /// Records dropped as parts of an atomic group the journal does not hold whole (a write that
    /// was never acknowledged and did not happen).
    pub dropped: usize,
    /// What became of the start image.
    pub image: ImageReport,
}

type Reply = oneshot::Sender<Result<CacheReply, CacheError>>;

enum Request {
    Get(String, Reply),
    Set(String, Bytes, Reply),
    WriteAll(Vec<(String, Option<Bytes>)>, Reply),
    Delete(String, Reply),
    List(String, Option<usize>, Reply),
    Flushed(oneshot::Sender<()>),
    TakeImage(oneshot::Sender<Option<image::Entries>>),
    SeedImage(Vec<(String, Bytes)>, oneshot::Sender<Result<u64, String>>),
}

enum Done {
    Read(String, Result<Option<Bytes>, String>),
    List(RequestId, Result<Vec<String>, String>),
    Flush(u64, Result<(), String>),
}

/// A failing shared volume is logged at most this often (the count of failures in between is in
/// the line).
pub const VOLUME_ERROR_LOG_EVERY_MS: u64 = 10_000;

/// A handle to the datastore task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Datastore {
    tx: mpsc::Sender<Request>,
    /// The shared volume's last flush failure not yet followed by a success: when (ms) and why.
    volume_error: Arc<std::sync::Mutex<Option<(u64, String)>>>,
    /// Set once by [`Datastore::fail_stop`]; the task ends with it as its error.
    stop: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

/// Journal record flags (the first byte): bit 0 says a value follows (else a delete); a record that
/// starts an atomic group carries [`FIRST_OF_GROUP`] and the group's length (u32 LE) next; a later
/// record of a group carries [`NEXT_IN_GROUP`]. A record on its own is `0` or `1`, as before groups.
const HAS_VALUE: u8 = 1;
const NEXT_IN_GROUP: u8 = 2;
const FIRST_OF_GROUP: u8 = 4;

/// A datastore journal record: what `decode` reads back (checkers and tests build journals with it).
pub fn encode(key: &str, value: &Option<Bytes>, part: GroupPart) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len() + value.as_ref().map_or(0, |v| v.len()));
    let mut flags = u8::from(value.is_some());
    match part {
        GroupPart::Whole => out.push(flags),
        GroupPart::First { len } => {
            flags |= FIRST_OF_GROUP;
            out.push(flags);
            out.extend_from_slice(&len.to_le_bytes());
        }
        GroupPart::Next => out.push(flags | NEXT_IN_GROUP),
    }
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Some(v) = value {
        out.extend_from_slice(v);
    }
    out
}

fn decode(seq: u64, rec: &[u8]) -> io::Result<JournalRecord> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("journal record {seq} is malformed"),
        )
    };
    let u32_at = |b: &[u8], at: usize| -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            b.get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    let (&flags, mut rest) = rec.split_first().ok_or_else(bad)?;
    if flags & !(HAS_VALUE | NEXT_IN_GROUP | FIRST_OF_GROUP) != 0 {
        return Err(bad());
    }
    let part = match (flags & FIRST_OF_GROUP != 0, flags & NEXT_IN_GROUP != 0) {
        (false, false) => GroupPart::Whole,
        (true, false) => {
            let len = u32_at(rest, 0)?;
            rest = &rest[4..];
            GroupPart::First { len }
        }
        (false, true) => GroupPart::Next,
        (true, true) => return Err(bad()),
    };
    let len = u32_at(rest, 0)? as usize;
    let key = rest.get(4..4 + len).ok_or_else(bad)?;
    let key = String::from_utf8(key.to_vec()).map_err(|_| bad())?;
    let value = (flags & HAS_VALUE != 0).then(|| Bytes::copy_from_slice(&rest[4 + len..]));
    Ok(JournalRecord {
        seq,
        key,
        value,
        part,
    })
}

/// The writes the datastore journal in `dir` on `disk` holds, as a restart would replay them: the
/// records after the truncation mark that belong to whole groups, in order (what a crash leaves when
/// `disk` is a crashed copy). For checkers and tools: opening repairs a torn tail, so pass a copy of
/// a disk that must not change.
pub fn replay_journal<D: LocalDisk>(disk: D, dir: &str) -> io::Result<Vec<JournalRecord>> {
    let (_, recovered) = Journal::open(disk, dir, DatastoreOptions::default().segment_bytes_max)?;
    let records = recovered
        .records
        .iter()
        .map(|(seq, rec)| decode(*seq, rec))
        .collect::<io::Result<Vec<_>>>()?;
    Ok(talon_core::datastore::whole_groups(records).0)
}

impl Datastore {
    /// Recovers from the journal on `disk` and starts the datastore task.
    pub fn open<D, V>(
        disk: D,
        volume: V,
        clock: Arc<dyn Clock>,
        opts: DatastoreOptions,
    ) -> io::Result<(Datastore, JoinHandle<io::Result<()>>, RecoveryReport)>
    where
        D: LocalDisk + 'static,
        V: Volume,
    {
        let mut disk = disk;
        let found_image = opts
            .image
            .map(|_| Keeper::read(&mut disk, &opts.journal_dir));
        let keep_from = match &found_image {
            Some((_, Some(Ok((generation, _))))) => Some(*generation),
            _ => None,
        };
        let (mut journal, recovered) =
            Journal::open_keeping(disk, &opts.journal_dir, opts.segment_bytes_max, keep_from)?;
        let decode_all = |rs: &[(u64, Vec<u8>)]| {
            rs.iter()
                .map(|(seq, rec)| decode(*seq, rec))
                .collect::<io::Result<Vec<_>>>()
        };
        let records = decode_all(&recovered.records)?;
        let (image, image_report) = match (opts.image, found_image) {
            (Some(o), Some((path, found))) => {
                let mut from_g = if found.is_some() {
                    decode_all(&recovered.earlier)?
                } else {
                    Vec::new()
                };
                if found.is_some() {
                    from_g.extend(records.iter().cloned());
                }
                let next = journal.next_seq();
                let (k, r) = Keeper::open(o, journal.disk_mut(), path, found, from_g, next)?;
                (Some(k), r)
            }
            _ => (None, ImageReport::Off),
        };
        let now = clock.monotonic();
        let found = records.len();
        let cache = Cache::recover(
            opts.limits.clone(),
            now,
            recovered.truncated_upto,
            journal.next_seq(),
            records,
        );
        let report = RecoveryReport {
            replayed: found - cache.dropped_on_recovery(),
            torn_bytes: recovered.torn_bytes,
            dropped: cache.dropped_on_recovery(),
            image: image_report,
        };
        let (tx, rx) = mpsc::channel(opts.requests_max);
        let (stop, stop_rx) = tokio::sync::watch::channel(None);
        // Completions are bounded by the cache: one read per distinct missing key (readers_max), one
        // list per waiting lister (readers_max), flushes_in_flight_max flushes.
        let done_cap = 2 * opts.limits.readers_max + opts.limits.flushes_in_flight_max + 1;
        let (done_tx, done_rx) = mpsc::channel(done_cap);
        let stop = Arc::new(stop);
        let volume_error = Arc::new(std::sync::Mutex::new(None));
        let driver = Driver {
            stop_tx: stop.clone(),
            volume_error: volume_error.clone(),
            volume_errors_logged: None,
            volume_errors_unlogged: 0,
            cache,
            journal,
            volume: Arc::new(volume),
            clock,
            rx,
            done_tx,
            done_rx,
            stop_rx,
            replies: BTreeMap::new(),
            flush_waiters: std::collections::VecDeque::new(),
            next_req: 0,
            metrics_name: opts.metrics_name,
            image,
        };
        let task = tokio::spawn(driver.run());
        Ok((
            Datastore {
                tx,
                volume_error,
                stop,
            },
            task,
            report,
        ))
    }

    /// Stops the datastore for good (fail-stop): the caller could not make durable a write whose
    /// effects it already applied in memory, so the process must restart from what is durable.
    /// Requests after this get [`DatastoreError::Stopped`]; the task ends with `why` as its error.
    pub fn fail_stop(&self, why: &str) {
        self.stop.send_if_modified(|s| {
            let first = s.is_none();
            if first {
                *s = Some(why.to_owned());
            }
            first
        });
    }

    /// The shared volume's last flush failure, if no flush has succeeded since: when and why.
    pub fn volume_error(&self) -> Option<(Timestamp, String)> {
        let e = self.volume_error.lock().ok()?.clone()?;
        Some((Timestamp(e.0), e.1))
    }

    /// The error for a call the stopped task did not answer, with the reason it stopped.
    fn gone(&self) -> DatastoreError {
        let why = self.stop.borrow().clone();
        DatastoreError::Stopped(why.unwrap_or_else(|| "see the master's log".into()))
    }

    /// True once the datastore has stopped (fail-stop, or its journal failed): nothing it holds in
    /// memory beyond the journal may be acted on any more.
    pub fn stopped(&self) -> bool {
        self.tx.is_closed() || self.stop.borrow().is_some()
    }

    async fn call(
        &self,
        make: impl FnOnce(Reply) -> Request,
    ) -> Result<CacheReply, DatastoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| self.gone())?;
        rx.await
            .map_err(|_| self.gone())?
            .map_err(DatastoreError::Refused)
    }

    /// Reads a key.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, DatastoreError> {
        match self.call(|r| Request::Get(key.to_owned(), r)).await? {
            CacheReply::Value(v) => Ok(v),
            other => unreachable!("get answered with {other:?}"),
        }
    }

    /// Writes a key; returns once the write is durable in the journal (its version).
    pub async fn set(&self, key: &str, value: Bytes) -> Result<u64, DatastoreError> {
        match self
            .call(|r| Request::Set(key.to_owned(), value, r))
            .await?
        {
            CacheReply::Written { version } => Ok(version),
            other => unreachable!("set answered with {other:?}"),
        }
    }

    /// Writes (or, for `None`, deletes) several keys atomically: all of them happen or none, also
    /// across a crash at any point. Returns once all are durable in the journal (the last one's
    /// version).
    pub async fn write_all(
        &self,
        writes: Vec<(String, Option<Bytes>)>,
    ) -> Result<u64, DatastoreError> {
        match self.call(|r| Request::WriteAll(writes, r)).await? {
            CacheReply::Written { version } => Ok(version),
            other => unreachable!("write_all answered with {other:?}"),
        }
    }

    /// Deletes a key; returns once durable in the journal.
    pub async fn delete(&self, key: &str) -> Result<u64, DatastoreError> {
        match self.call(|r| Request::Delete(key.to_owned(), r)).await? {
            CacheReply::Written { version } => Ok(version),
            other => unreachable!("delete answered with {other:?}"),
        }
    }

    /// Lists keys under a prefix; the flag says the list was cut at the cache's bound.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<String>, bool), DatastoreError> {
        self.list_within(prefix, None).await
    }

    /// Lists keys under a prefix with at most `depth` components after it
    /// ([`talon_core::datastore::within_depth`]): the volume is not walked deeper.
    pub async fn list_within(
        &self,
        prefix: &str,
        depth: Option<usize>,
    ) -> Result<(Vec<String>, bool), DatastoreError> {
        match self
            .call(|r| Request::List(prefix.to_owned(), depth, r))
            .await?
        {
            CacheReply::Keys { keys, truncated } => Ok((keys, truncated)),
            other => unreachable!("list answered with {other:?}"),
        }
    }

    /// The start image's keys as they stood when the datastore opened (journal replayed), once:
    /// `None` if it keeps none, none was valid, or it was taken already.
    pub async fn take_start_image(&self) -> Result<Option<image::Entries>, DatastoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::TakeImage(tx))
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    /// Seeds the start image with every tracked key the caller read after the datastore opened
    /// (the master's listing path at start); returns the image's generation, or why none was
    /// written.
    pub async fn seed_start_image(&self, entries: Vec<(String, Bytes)>) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::SeedImage(entries, tx))
            .await
            .map_err(|_| self.gone().to_string())?;
        rx.await.map_err(|_| self.gone().to_string())?
    }

    /// Waits until every write acknowledged before this call is on the shared volume (or overwritten
    /// there by a later write). Writes arriving meanwhile do not delay it: under steady load it
    /// returns after about one flush cycle (`flush_age_max_ms` plus the volume's latency).
    pub async fn flushed(&self) -> Result<(), DatastoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Flushed(tx))
            .await
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }
}

struct Driver<D: LocalDisk, V: Volume> {
    cache: Cache,
    journal: Journal<D>,
    volume: Arc<V>,
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<Request>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    stop_rx: tokio::sync::watch::Receiver<Option<String>>,
    /// Where the reason goes when the driver stops on its own (its journal failed), so callers'
    /// errors and the process's exit say why.
    stop_tx: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// See [`Datastore::volume_error`].
    volume_error: Arc<std::sync::Mutex<Option<(u64, String)>>>,
    /// When a flush failure was last logged; failures since then not logged.
    volume_errors_logged: Option<Monotonic>,
    volume_errors_unlogged: u64,
    /// Callers waiting for a reply: bounded by the request channel plus the cache's own bounds.
    replies: BTreeMap<RequestId, Reply>,
    /// Callers of `flushed`, with the version each waits for: one per caller waiting (each held a
    /// request slot to get here; callers are bounded by their own limits, e.g. flows in flight).
    flush_waiters: std::collections::VecDeque<(u64, oneshot::Sender<()>)>,
    next_req: u64,
    /// The start image, if this datastore keeps one.
    image: Option<Keeper>,
    /// Its name in metrics.
    metrics_name: &'static str,
}

/// Requests taken from the queue at once before the journal is synced.
const GROUP_COMMIT_MAX: usize = 1024;

impl<D: LocalDisk, V: Volume> Driver<D, V> {
    /// Serves until every handle is gone or it stops; a failure's reason is published before the
    /// pending replies are dropped, so every caller's error says why.
    async fn run(mut self) -> io::Result<()> {
        let r = self.serve().await;
        if let Err(e) = &r {
            let why = format!("the journal on the local disk failed: {e}");
            tracing::error!(error = %e, "the datastore stops");
            self.stop_tx.send_if_modified(|s| {
                let first = s.is_none();
                if first {
                    *s = Some(why);
                }
                first
            });
        }
        r
    }

    async fn serve(&mut self) -> io::Result<()> {
        self.drain()?;
        let mut stop_open = true;
        loop {
            let now = self.clock.monotonic();
            let wait = self
                .cache
                .poll_timeout()
                .map(|t| Duration::from_millis(t.since_ms(now)));
            tokio::select! {
                req = self.rx.recv() => match req {
                    Some(req) => {
                        // Take every request already waiting (up to a bound) before draining: their
                        // journal appends then share one sync (group commit across callers).
                        self.request(req);
                        for _ in 1..GROUP_COMMIT_MAX {
                            match self.rx.try_recv() {
                                Ok(req) => self.request(req),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                Some(done) = self.done_rx.recv() => self.completion(done),
                r = self.stop_rx.changed(), if stop_open => match r {
                    Ok(()) => {
                        let why = self.stop_rx.borrow().clone().unwrap_or_default();
                        return Err(io::Error::other(format!("stopped: {why}")));
                    }
                    // Every handle is gone: the request channel closes too.
                    Err(_) => stop_open = false,
                },
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                    self.cache.handle_timeout(self.clock.monotonic());
                }
            }
            self.drain()?;
            self.publish();
        }
        Ok(())
    }

    /// The backlog for the node's metrics: bytes not yet on the shared volume, and how long the
    /// oldest has waited.
    fn publish(&self) {
        crate::metrics::metrics().set_writebehind(
            self.metrics_name,
            self.cache.dirty_bytes(),
            self.cache.oldest_dirty_since(),
        );
    }

    fn request(&mut self, req: Request) {
        let now = self.clock.monotonic();
        let mut id = || {
            self.next_req += 1;
            RequestId(self.next_req)
        };
        match req {
            Request::Get(key, reply) => {
                let r = id();
                self.replies.insert(r, reply);
                self.cache.handle_get(now, r, &key);
            }
            Request::Set(key, value, reply) => {
                let r = id();
                self.replies.insert(r, reply);
                self.cache.handle_set(now, r, &key, value);
            }
            Request::WriteAll(writes, reply) => {
                let r = id();
                self.replies.insert(r, reply);
                self.cache.handle_write_all(now, r, writes);
            }
            Request::Delete(key, reply) => {
                let r = id();
                self.replies.insert(r, reply);
                self.cache.handle_delete(now, r, &key);
            }
            Request::List(prefix, depth, reply) => {
                let r = id();
                self.replies.insert(r, reply);
                self.cache.handle_list_within(now, r, &prefix, depth);
            }
            Request::Flushed(tx) => self
                .flush_waiters
                .push_back((self.cache.acknowledged_upto(), tx)),
            Request::TakeImage(tx) => {
                let _ = tx.send(self.image.as_mut().and_then(Keeper::take_loaded));
            }
            Request::SeedImage(entries, tx) => {
                let r = match self.image.as_mut() {
                    Some(k) => k.seed(self.journal.disk_mut(), entries),
                    None => Err("this datastore keeps no start image".into()),
                };
                let _ = tx.send(r);
            }
        }
    }

    fn completion(&mut self, done: Done) {
        let now = self.clock.monotonic();
        match done {
            Done::Read(key, result) => self.cache.handle_read_done(now, &key, result),
            Done::List(req, result) => self.cache.handle_list_done(now, req, result),
            Done::Flush(batch, result) => {
                self.note_flush(now, &result);
                self.cache.handle_flush_done(now, batch, result)
            }
        }
    }

    /// Keeps the volume's health for operators: a failed flush (a full or unreachable volume) is
    /// logged at most every [`VOLUME_ERROR_LOG_EVERY_MS`] with how many failed meanwhile, and
    /// remembered until a flush succeeds (`cluster status` shows it). The data stays journalled and
    /// the flush is retried either way.
    fn note_flush(&mut self, now: Monotonic, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                if let Ok(mut e) = self.volume_error.lock()
                    && e.take().is_some()
                {
                    tracing::info!("the shared volume accepts writes again");
                }
                self.volume_errors_unlogged = 0;
            }
            Err(why) => {
                if let Ok(mut e) = self.volume_error.lock() {
                    // When, on the wall clock: shown to operators.
                    *e = Some((self.clock.now().as_ms(), why.clone()));
                }
                self.volume_errors_unlogged += 1;
                let due = self
                    .volume_errors_logged
                    .is_none_or(|t| now.since_ms(t) >= VOLUME_ERROR_LOG_EVERY_MS);
                if due {
                    tracing::warn!(error = %why, failures = self.volume_errors_unlogged, "cannot write to the shared volume; the data stays in the local journal and is retried");
                    self.volume_errors_logged = Some(now);
                    self.volume_errors_unlogged = 0;
                }
            }
        }
    }

    /// Performs the cache's actions in order, group-committing journal appends.
    fn drain(&mut self) -> io::Result<()> {
        loop {
            let mut appended = false;
            while let Some(action) = self.cache.poll_action() {
                match action {
                    CacheAction::JournalAppend {
                        seq,
                        key,
                        value,
                        part,
                    } => {
                        self.journal.append(seq, &encode(&key, &value, part))?;
                        if let Some(k) = self.image.as_mut() {
                            k.appended(seq, &key, &value);
                        }
                        appended = true;
                    }
                    CacheAction::ReadShared { key } => {
                        let (v, tx) = (self.volume.clone(), self.done_tx.clone());
                        tokio::spawn(async move {
                            let r = v.read(&key).await.map_err(|e| e.to_string());
                            let _ = tx.send(Done::Read(key, r)).await;
                        });
                    }
                    CacheAction::ListShared { req, prefix, depth } => {
                        let (v, tx) = (self.volume.clone(), self.done_tx.clone());
                        tokio::spawn(async move {
                            let r = v
                                .list_within(&prefix, depth)
                                .await
                                .map_err(|e| e.to_string());
                            let _ = tx.send(Done::List(req, r)).await;
                        });
                    }
                    CacheAction::Flush { batch, writes } => {
                        let (v, tx) = (self.volume.clone(), self.done_tx.clone());
                        tokio::spawn(async move {
                            let r = flush(&*v, writes).await;
                            let _ = tx.send(Done::Flush(batch, r)).await;
                        });
                    }
                    CacheAction::JournalTruncate { upto } => {
                        if let Some(k) = self.image.as_mut() {
                            let keep_from = self.journal.kept_from_after(upto);
                            k.before_truncate(self.journal.disk_mut(), keep_from);
                        }
                        self.journal.truncate(upto)?
                    }
                    CacheAction::Reply { req, result } => {
                        if let Some(tx) = self.replies.remove(&req) {
                            let _ = tx.send(result);
                        }
                    }
                }
            }
            if !appended {
                break;
            }
            let upto = self.journal.sync()?;
            self.cache
                .handle_journal_synced(self.clock.monotonic(), upto);
        }
        // Waiters are in order of the version they wait for (acknowledged versions only grow), and
        // `flushed_through` holds for every version below one it holds for: release from the front.
        while let Some((upto, _)) = self.flush_waiters.front()
            && self.cache.flushed_through(*upto)
        {
            let (_, w) = self.flush_waiters.pop_front().expect("a front");
            let _ = w.send(());
        }
        Ok(())
    }
}

/// Writes a batch to the volume (`Volume::write_many`: each write atomic, all durable when it
/// returns); the batch fails if any write fails (the cache keeps every entry of a failed batch dirty
/// and retries: the writes are idempotent overwrites).
async fn flush<V: Volume>(volume: &V, writes: Vec<FlushWrite>) -> Result<(), String> {
    let writes = writes.into_iter().map(|w| (w.key, w.value)).collect();
    volume.write_many(writes).await.map_err(|e| e.to_string())
}

pub mod image;
#[cfg(test)]
mod tests;
