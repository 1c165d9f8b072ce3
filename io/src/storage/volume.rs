//! The shared volume (`Datastore.location` / `filestore_directory`): NFS/EFS in production, where
//! every operation costs 40–60 ms. An async trait so that the simulator's volume can charge virtual
//! latency and the production one can keep slow syscalls off the async workers.

use super::fs::{Entry, Fs, OsFs};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use talon_core::paths::validate_key;

/// Key-value access to the shared volume. Keys are validated datastore keys (relative, no `..`).
pub trait Volume: Send + Sync + 'static {
    /// Reads a key; `None` if absent.
    fn read(&self, key: &str) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Replaces a key's value atomically (a reader or a crash sees old or new, never a mix).
    fn write(&self, key: &str, value: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Removes a key (no error if absent).
    fn delete(&self, key: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Keys under `prefix` (a `/`-terminated directory prefix or a key prefix), sorted.
    fn list(&self, prefix: &str) -> impl Future<Output = io::Result<Vec<String>>> + Send;
    /// Keys under `prefix` with at most `depth` components after it
    /// ([`talon_core::datastore::within_depth`]), sorted; a file volume does not look deeper.
    fn list_within(
        &self,
        prefix: &str,
        depth: Option<usize>,
    ) -> impl Future<Output = io::Result<Vec<String>>> + Send {
        async move {
            let mut keys = self.list(prefix).await?;
            keys.retain(|k| talon_core::datastore::within_depth(k, prefix, depth));
            Ok(keys)
        }
    }
    /// Appends to a key, creating it (for assembling large files piece by piece; not atomic: write
    /// to a scratch key and `commit` it).
    fn append(&self, key: &str, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes `from` durable and atomically renames it over `to`.
    fn commit(&self, from: &str, to: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Up to `len` bytes of a key's value from `offset` (fewer at its end); `None` if absent. One
    /// request on a file volume, however large the value.
    fn read_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Option<Bytes>>> + Send {
        async move {
            Ok(self
                .read(key)
                .await?
                .map(|b| super::fs::range_of(&b, offset, len)))
        }
    }
    /// Appends to an existing key and makes the appended data durable (the key itself must have
    /// been made durable already, by `write`). Not atomic: a failure may leave part of `data`.
    fn append_synced(&self, key: &str, data: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        self.append(key, data)
    }
    /// Writes (`Some`) or deletes (`None`) several keys, each atomically as `write`/`delete` do; all
    /// are durable when it returns `Ok`. The default runs them concurrently; a volume may do better
    /// (the real directory makes them durable with two filesystem syncs for the whole batch).
    fn write_many(
        &self,
        writes: Vec<(String, Option<Bytes>)>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let futs = writes.into_iter().map(|(key, value)| async move {
                let r = match value {
                    Some(v) => self.write(&key, v).await,
                    None => self.delete(&key).await,
                };
                r.map_err(|e| io::Error::new(e.kind(), format!("{key}: {e}")))
            });
            bounded(VOLUME_CONCURRENCY, futs.collect())
                .await
                .into_iter()
                .collect()
        }
    }
}

/// A [`Volume`] behind a pointer, chosen at run time (the real directory, a latency-injecting one, the
/// simulator's). One boxed future per operation: noise next to a volume's milliseconds.
#[derive(Clone)]
pub struct SharedVolume(std::sync::Arc<dyn DynVolume>);

impl SharedVolume {
    /// Shares `volume`.
    pub fn new(volume: impl Volume) -> SharedVolume {
        SharedVolume(std::sync::Arc::new(volume))
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Volume`] in a form that can be a trait object; every `Volume` is one.
pub trait DynVolume: Send + Sync + 'static {
    /// [`Volume::read`].
    fn dyn_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>>;
    /// [`Volume::write`].
    fn dyn_write<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::delete`].
    fn dyn_delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::list`].
    fn dyn_list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>>;
    /// [`Volume::list_within`].
    fn dyn_list_within<'a>(
        &'a self,
        prefix: &'a str,
        depth: Option<usize>,
    ) -> BoxFuture<'a, io::Result<Vec<String>>>;
    /// [`Volume::append`].
    fn dyn_append<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::commit`].
    fn dyn_commit<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::write_many`].
    fn dyn_write_many<'a>(
        &'a self,
        writes: Vec<(String, Option<Bytes>)>,
    ) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::read_range`].
    fn dyn_read_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<Bytes>>>;
    /// [`Volume::append_synced`].
    fn dyn_append_synced<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>>;
}

impl<V: Volume> DynVolume for V {
    fn dyn_read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(self.read(key))
    }
    fn dyn_write<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.write(key, value))
    }
    fn dyn_delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.delete(key))
    }
    fn dyn_list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>> {
        Box::pin(self.list(prefix))
    }
    fn dyn_list_within<'a>(
        &'a self,
        prefix: &'a str,
        depth: Option<usize>,
    ) -> BoxFuture<'a, io::Result<Vec<String>>> {
        Box::pin(self.list_within(prefix, depth))
    }
    fn dyn_append<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.append(key, data))
    }
    fn dyn_commit<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.commit(from, to))
    }
    fn dyn_write_many<'a>(
        &'a self,
        writes: Vec<(String, Option<Bytes>)>,
    ) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.write_many(writes))
    }
    fn dyn_read_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(self.read_range(key, offset, len))
    }
    fn dyn_append_synced<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.append_synced(key, data))
    }
}

impl Volume for SharedVolume {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.0.dyn_read(key).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        self.0.dyn_write(key, value).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.0.dyn_delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.0.dyn_list(prefix).await
    }
    async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
        self.0.dyn_list_within(prefix, depth).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.0.dyn_append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.0.dyn_commit(from, to).await
    }
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        self.0.dyn_write_many(writes).await
    }
    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        self.0.dyn_read_range(key, offset, len).await
    }
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.0.dyn_append_synced(key, data).await
    }
}

/// A volume whose every call is timed and counted in the node's metrics
/// (`talon_volume_operation_duration_seconds{store,op}`, `..._errors_total`,
/// `talon_volume_written_bytes_total`): what an operator watches to see the network filesystem's
/// latency and failures. `store` is `datastore` or `filestore`.
pub struct Metered {
    inner: SharedVolume,
    store: &'static str,
}

impl Metered {
    /// Meters `inner` as `store`.
    pub fn new(inner: SharedVolume, store: &'static str) -> Metered {
        Metered { inner, store }
    }

    async fn time<T>(&self, op: &str, f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let m = crate::metrics::metrics();
        let start = crate::metrics::started();
        let r = f.await;
        m.volume_seconds
            .with_label_values(&[self.store, op])
            .observe(crate::metrics::seconds_since(start));
        if r.is_err() {
            m.volume_errors.with_label_values(&[self.store, op]).inc();
        }
        r
    }

    fn written(&self, n: usize) {
        crate::metrics::metrics()
            .volume_written_bytes
            .with_label_values(&[self.store])
            .inc_by(n as u64);
    }
}

impl Volume for Metered {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.time("read", self.inner.read(key)).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        let n = value.len();
        self.time("write", self.inner.write(key, value)).await?;
        self.written(n);
        Ok(())
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.time("delete", self.inner.delete(key)).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.time("list", self.inner.list(prefix)).await
    }
    async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
        self.time("list", self.inner.list_within(prefix, depth))
            .await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        let n = data.len();
        self.time("append", self.inner.append(key, data)).await?;
        self.written(n);
        Ok(())
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.time("commit", self.inner.commit(from, to)).await
    }
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        let n = writes
            .iter()
            .map(|(_, v)| v.as_ref().map_or(0, Bytes::len))
            .sum();
        self.time("write_many", self.inner.write_many(writes))
            .await?;
        self.written(n);
        Ok(())
    }
    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        self.time("read", self.inner.read_range(key, offset, len))
            .await
    }
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        let n = data.len();
        self.time("append", self.inner.append_synced(key, data))
            .await?;
        self.written(n);
        Ok(())
    }
}

/// A shared volume is a volume (the filestore keeps its segment log both as its buffer's volume
/// and for the runs it remembers).
impl<V: Volume> Volume for Arc<V> {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        (**self).read(key).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        (**self).write(key, value).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        (**self).delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        (**self).list(prefix).await
    }
    async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
        (**self).list_within(prefix, depth).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        (**self).append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        (**self).commit(from, to).await
    }
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        (**self).write_many(writes).await
    }
    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        (**self).read_range(key, offset, len).await
    }
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        (**self).append_synced(key, data).await
    }
}

/// Primitive operations one volume call ([`Volume::write_many`], `list`) has in flight at once. A
/// network filesystem (NFS, EFS, sshfs) serves independent requests in parallel: its throughput
/// grows with the number in flight, not with a faster single request (slowfs at 12 ms one way:
/// ~18 stats/s from one caller, ~188 from 32).
pub const VOLUME_CONCURRENCY: usize = 32;

/// Whose primitives a call issues: background batch work (`write_many`, `list`), which shares the
/// volume's gate, or one key someone waits for (`write`, `commit`), which does not queue behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Batch,
    Single,
}

/// How [`FsVolume::write_many`] makes a batch durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// One `syncfs` after the data, one after the renames: cheapest on a local filesystem (ext4
    /// charged 82 % kernel CPU for two `fsync`s per file), and exact there, because `syncfs`
    /// flushes every dirty page and the journal.
    Filesystem,
    /// Each file `fdatasync`ed and each changed directory `fsync`ed, up to the volume's concurrency
    /// at once: what a network filesystem needs, since a FUSE mount (sshfs) sends nothing to its
    /// server for `syncfs` while it forwards `fsync`, and its throughput grows with the requests in
    /// flight rather than with a faster single request.
    PerFile,
}

impl SyncMode {
    /// [`SyncMode::Filesystem`] for the local filesystems known to flush all of themselves on
    /// `syncfs` (ext2/3/4, XFS, Btrfs, tmpfs, overlay, F2FS, ZFS), [`SyncMode::PerFile`] for any
    /// other (NFS, SMB, FUSE, or unknown): the safe choice where we do not know.
    pub fn detect(root: &Path) -> io::Result<SyncMode> {
        const LOCAL: [u64; 8] = [
            0xEF53,      // ext2/3/4
            0x5846_5342, // XFS
            0x9123_683E, // Btrfs
            0x0102_1994, // tmpfs
            0x794C_7630, // overlayfs
            0xF2F5_2010, // F2FS
            0x2FC1_2FC1, // ZFS
            0x858_458F6, // ramfs
        ];
        let st = rustix::fs::statfs(root)?;
        #[allow(clippy::unnecessary_cast)] // `f_type`'s width and sign differ between targets.
        let kind = st.f_type as u64 & 0xFFFF_FFFF;
        Ok(if LOCAL.contains(&kind) {
            SyncMode::Filesystem
        } else {
            SyncMode::PerFile
        })
    }
}

/// Distinguishes the temp files of volumes in one process (and, with the process id, across the
/// processes sharing a volume).
static VOLUME_INSTANCE: AtomicU64 = AtomicU64::new(0);

/// The shared volume's logic over a filesystem's primitives ([`Fs`]): keys are files under the
/// root, a write is a temp file beside its key renamed over it, directories are made when a
/// primitive reports them missing (no lookups for directories that exist), durability is by the
/// [`SyncMode`], and independent primitives are issued concurrently, at most `in_flight` at once.
/// The same code runs on the real directory ([`OsFs`]), on the latency model ([`LatencyFs`](super::fs::LatencyFs)) and
/// on the simulator's volume.
#[derive(Clone, Debug)]
pub struct FsVolume<F = OsFs> {
    fs: Arc<F>,
    sync: SyncMode,
    /// Names this volume's temp files (unique per volume and process).
    tag: Arc<str>,
    /// Numbers temp files, also for two batches writing one key at once.
    temp_seq: Arc<AtomicU64>,
    in_flight: usize,
    /// Bounds the primitives of this volume's batch work (every call's concurrent part: the
    /// steps of `write_many`, a `list`'s directories) at `in_flight` across all its calls: the
    /// datastore runs several flushes at once, and without it they had 8 x 32 requests queued on
    /// the mount ahead of everything else (a filestore append waited ~1 s on slowfs behind them, a
    /// lease beat would have too). Single-key calls (`read`, `write`, `append_synced`, ...) do not
    /// queue here: they are what someone waits for.
    gate: Arc<tokio::sync::Semaphore>,
}

impl FsVolume<OsFs> {
    /// A volume rooted at `root` (created if missing), its [`SyncMode`] detected from the
    /// filesystem holding it.
    pub fn new(root: &Path) -> io::Result<FsVolume<OsFs>> {
        let fs = OsFs::new(root)?;
        let sync = SyncMode::detect(root)?;
        Ok(FsVolume::over(fs, sync, &process_tag()))
    }
}

/// A temp-file tag unique to this volume among the processes and volumes sharing a directory:
/// the process id and a per-process count.
pub fn process_tag() -> String {
    let n = VOLUME_INSTANCE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

impl<F: Fs> FsVolume<F> {
    /// The volume's logic over `fs`, making batches durable by `sync`; `tag` names its temp files
    /// and must differ between the volumes (nodes, processes) that may write one key at once.
    pub fn over(fs: F, sync: SyncMode, tag: &str) -> FsVolume<F> {
        FsVolume {
            fs: Arc::new(fs),
            sync,
            tag: tag.into(),
            temp_seq: Arc::default(),
            in_flight: VOLUME_CONCURRENCY,
            gate: Arc::new(tokio::sync::Semaphore::new(VOLUME_CONCURRENCY)),
        }
    }

    /// The primitives it runs on.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// How this volume makes a batch durable.
    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    /// The same volume making batches durable by `mode` instead.
    pub fn with_sync_mode(mut self, mode: SyncMode) -> Self {
        self.sync = mode;
        self
    }

    /// The same volume with at most `n` primitives of batch work in flight at once (at least 1),
    /// across all its calls.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self.gate = Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        self
    }

    /// Runs `work`, if it is `batch` work once fewer than `in_flight` pieces of batch work are in
    /// flight on this volume.
    async fn gated<T>(&self, batch: bool, work: impl Future<Output = T>) -> T {
        // The semaphore is never closed: `acquire` cannot fail.
        let _permit = if batch {
            self.gate.acquire().await.ok()
        } else {
            None
        };
        work.await
    }

    /// A fresh hidden temp path beside `key` (`list` never shows it).
    fn temp_for(&self, key: &str) -> String {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let (dir, name) = split(key);
        let tmp = format!(".{name}.tmp-{}-{n}", self.tag);
        if dir.is_empty() {
            tmp
        } else {
            format!("{dir}/{tmp}")
        }
    }

    /// Makes `dir` and any missing ancestors, walking up only as far as they are missing; returns
    /// the parents of the directories it made (their entries are durable once those are synced).
    async fn make_dirs(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut missing = vec![dir.to_owned()];
        let mut made_in = Vec::new();
        while let Some(d) = missing.last() {
            if d.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the volume's root directory is missing",
                ));
            }
            match self.fs.mkdir(d).await {
                Ok(()) => {
                    made_in.push(split(d).0.to_owned());
                    missing.pop();
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    missing.pop();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let parent = split(d).0.to_owned();
                    missing.push(parent);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(made_in)
    }

    /// Runs `op`, which creates an entry in `dir`; if `dir` is missing, makes it and runs `op` once
    /// more. Returns what `op` returned and the parents of the directories made.
    async fn in_dir<R, Fut>(&self, dir: &str, op: impl Fn() -> Fut) -> io::Result<(R, Vec<String>)>
    where
        Fut: Future<Output = io::Result<R>>,
    {
        match op().await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let made_in = self.make_dirs(dir).await?;
                Ok((op().await?, made_in))
            }
            r => Ok((r?, Vec::new())),
        }
    }

    /// Runs every future, at most `in_flight` at once (batch work also through the volume's gate), and
    /// returns their outcomes in order. It returns only when all have finished (none is left
    /// running after an error).
    async fn bounded<Fut: Future>(&self, work: Work, futs: Vec<Fut>) -> Vec<Fut::Output> {
        let gated = futs
            .into_iter()
            .map(|f| self.gated(work == Work::Batch, f))
            .collect();
        bounded(self.in_flight, gated).await
    }

    /// Creates a new value's temp file (its directory made if missing), synced if `durable`;
    /// returns the temp path and the parents of directories made.
    async fn stage(
        &self,
        key: &str,
        data: Bytes,
        durable: bool,
    ) -> io::Result<(String, Vec<String>)> {
        let tmp = self.temp_for(key);
        let (_, made_in) = self
            .in_dir(split(key).0, || self.fs.create(&tmp, data.clone(), durable))
            .await?;
        Ok((tmp, made_in))
    }

    /// Every change of `last`, durable by the volume's [`SyncMode`]: the new values into temp
    /// files, concurrently (synced each, or then one `syncfs`); the renames over the keys and the
    /// removals; then each changed directory synced (or one `syncfs`).
    async fn apply(
        &self,
        work: Work,
        last: Vec<(String, Option<Bytes>)>,
        per_file: bool,
    ) -> io::Result<()> {
        let (puts, removes): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, v)| v.is_some());
        let staged = self
            .bounded(
                work,
                puts.iter()
                    .map(|(k, v)| self.stage(k, v.clone().unwrap_or_default(), per_file))
                    .collect(),
            )
            .await;
        if staged.iter().any(|r| r.is_err()) {
            // The temp files that were written go (`list` never shows them: this saves the space).
            let written: Vec<&str> = staged
                .iter()
                .filter_map(|r| r.as_ref().ok().map(|(tmp, _)| tmp.as_str()))
                .collect();
            self.bounded(
                work,
                written.into_iter().map(|t| self.fs.remove(t)).collect(),
            )
            .await;
        }
        let staged = staged.into_iter().collect::<io::Result<Vec<_>>>()?;
        if !per_file
            && !staged.is_empty()
            && let Err(e) = self.fs.sync_all().await
        {
            self.bounded(
                work,
                staged.iter().map(|(t, _)| self.fs.remove(t)).collect(),
            )
            .await;
            return Err(e);
        }
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        for ((key, _), (_, made_in)) in puts.iter().zip(&staged) {
            dirs.extend(made_in.iter().cloned());
            dirs.insert(split(key).0.to_owned());
        }
        for (key, _) in &removes {
            dirs.insert(split(key).0.to_owned());
        }
        let renames = puts
            .iter()
            .zip(&staged)
            .map(|((key, _), (tmp, _))| self.fs.rename(tmp, key));
        let renamed = self.bounded(work, renames.collect()).await;
        // Leave no temp file behind (best effort: a crash may still leave one).
        let failed: Vec<&str> = renamed
            .iter()
            .zip(&staged)
            .filter(|(r, _)| r.is_err())
            .map(|(_, (tmp, _))| tmp.as_str())
            .collect();
        self.bounded(
            work,
            failed.into_iter().map(|t| self.fs.remove(t)).collect(),
        )
        .await;
        renamed.into_iter().collect::<io::Result<()>>()?;
        self.bounded(
            work,
            removes
                .iter()
                .map(|(k, _)| absent_ok(self.fs.remove(k)))
                .collect(),
        )
        .await
        .into_iter()
        .collect::<io::Result<()>>()?;
        if per_file {
            self.sync_dirs(work, &dirs).await
        } else {
            self.fs.sync_all().await
        }
    }

    /// Syncs each directory in `dirs`, concurrently; a directory a concurrent removal took holds
    /// nothing of ours any more.
    async fn sync_dirs(&self, work: Work, dirs: &BTreeSet<String>) -> io::Result<()> {
        self.bounded(
            work,
            dirs.iter().map(|d| absent_ok(self.fs.sync(d))).collect(),
        )
        .await
        .into_iter()
        .collect()
    }
}

/// `Ok` for a `NotFound` outcome.
async fn absent_ok(f: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    match f.await {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// A key's directory (`""` for the root) and name.
fn split(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or(("", key))
}

fn bad_key(e: talon_core::paths::KeyError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Runs every future, at most `limit` at once (started in order), and returns their outcomes in
/// order once all have finished. Deterministic: it polls in index order.
pub async fn bounded<Fut: Future>(limit: usize, futs: Vec<Fut>) -> Vec<Fut::Output> {
    let limit = limit.max(1);
    let total = futs.len();
    let mut waiting = futs.into_iter().enumerate();
    let mut running: Vec<(usize, std::pin::Pin<Box<Fut>>)> = Vec::new();
    let mut out: Vec<Option<Fut::Output>> = (0..total).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        loop {
            while running.len() < limit {
                match waiting.next() {
                    Some((i, f)) => running.push((i, Box::pin(f))),
                    None => break,
                }
            }
            let before = running.len();
            running.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
                std::task::Poll::Ready(v) => {
                    out[*i] = Some(v);
                    false
                }
                std::task::Poll::Pending => true,
            });
            if running.is_empty() && waiting.len() == 0 {
                return std::task::Poll::Ready(());
            }
            if running.len() == before {
                return std::task::Poll::Pending;
            }
            // Some finished: start the next ones and poll them now.
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

impl<F: Fs> Volume for FsVolume<F> {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        validate_key(key).map_err(bad_key)?;
        self.fs.read(key).await
    }

    /// Always per file (the temp file synced, renamed, its directory synced), whatever the
    /// [`SyncMode`]: one `syncfs` would flush every other writer's data too.
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        validate_key(key).map_err(bad_key)?;
        self.apply(Work::Single, vec![(key.to_owned(), Some(value))], true)
            .await
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        validate_key(key).map_err(bad_key)?;
        absent_ok(self.fs.remove(key)).await
    }

    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.list_within(prefix, None).await
    }

    /// Walks only the deepest directory the prefix names and, level by level, the directories
    /// below it that can hold matching keys (within `depth`), listing each level's directories
    /// concurrently.
    async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
        let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        // A directory at `depth` components after the prefix holds only deeper keys.
        let shallow =
            |dir: &str| talon_core::datastore::within_depth(dir, prefix, depth.map(|d| d - 1));
        let mut out = Vec::new();
        let mut level = vec![dir_part.to_owned()];
        while !level.is_empty() {
            let listed = self
                .bounded(Work::Batch, level.iter().map(|d| self.fs.list(d)).collect())
                .await;
            let mut next = Vec::new();
            for (rel, entries) in level.iter().zip(listed) {
                let entries = match entries {
                    Ok(e) => e,
                    // Removed since its parent was listed, or never made.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for Entry { name, dir } in entries {
                    if name.starts_with('.') {
                        continue; // Temp files of in-progress atomic writes.
                    }
                    let child = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    if dir {
                        if prefix.starts_with(&format!("{child}/"))
                            || (child.starts_with(prefix) && depth != Some(0) && shallow(&child))
                        {
                            next.push(child);
                        }
                    } else if talon_core::datastore::within_depth(&child, prefix, depth) {
                        out.push(child);
                    }
                }
            }
            level = next;
        }
        out.sort();
        Ok(out)
    }

    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        validate_key(key).map_err(bad_key)?;
        self.in_dir(split(key).0, || self.fs.append(key, data.clone(), false))
            .await
            .map(|_| ())
    }

    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        validate_key(key).map_err(bad_key)?;
        self.fs.read_range(key, offset, len).await
    }

    /// A durable append (`fdatasync` of the file), whatever the [`SyncMode`] (a `syncfs` would
    /// flush every other writer's data too). No directory is made or synced: the key exists.
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        validate_key(key).map_err(bad_key)?;
        self.fs.append(key, data, true).await
    }

    /// Every key holds its old value or its new one, never a mix, and all are durable on return,
    /// by the volume's [`SyncMode`]. A key changed twice in one batch gets its last change.
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        let mut last: BTreeMap<String, Option<Bytes>> = BTreeMap::new();
        for (k, v) in writes {
            validate_key(&k)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{k}: {e}")))?;
            last.insert(k, v);
        }
        self.apply(
            Work::Batch,
            last.into_iter().collect(),
            self.sync == SyncMode::PerFile,
        )
        .await
    }

    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        validate_key(from).map_err(bad_key)?;
        validate_key(to).map_err(bad_key)?;
        self.fs.sync(from).await?;
        let (_, made_in) = self
            .in_dir(split(to).0, || self.fs.rename(from, to))
            .await?;
        let mut dirs: BTreeSet<String> = made_in.into_iter().collect();
        dirs.insert(split(to).0.to_owned());
        self.sync_dirs(Work::Single, &dirs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::LatencyFs;
    use std::path::PathBuf;
    use std::time::Duration;

    #[tokio::test]
    async fn fs_volume_reads_writes_lists_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let v = FsVolume::new(dir.path()).unwrap();
        assert_eq!(v.read("a/b.json").await.unwrap(), None);
        v.write("a/b.json", Bytes::from_static(b"1")).await.unwrap();
        v.write("a/c/d.json", Bytes::from_static(b"2"))
            .await
            .unwrap();
        v.write("z.json", Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(
            v.read("a/b.json").await.unwrap(),
            Some(Bytes::from_static(b"1"))
        );
        assert_eq!(v.list("a/").await.unwrap(), vec!["a/b.json", "a/c/d.json"]);
        assert_eq!(v.list("a/c").await.unwrap(), vec!["a/c/d.json"]);
        assert_eq!(v.list("").await.unwrap().len(), 3);
        v.delete("a/b.json").await.unwrap();
        v.delete("a/b.json").await.unwrap();
        assert_eq!(v.list("a/").await.unwrap(), vec!["a/c/d.json"]);
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(v.write(bad, Bytes::new()).await.is_err(), "{bad}");
        }
        assert!(!dir.path().parent().unwrap().join("x").exists());
        v.append("big/f.partial", Bytes::from_static(b"ab"))
            .await
            .unwrap();
        v.append("big/f.partial", Bytes::from_static(b"cd"))
            .await
            .unwrap();
        v.commit("big/f.partial", "big/f").await.unwrap();
        assert_eq!(
            v.read("big/f").await.unwrap(),
            Some(Bytes::from_static(b"abcd"))
        );
        assert_eq!(v.read("big/f.partial").await.unwrap(), None);
    }

    #[tokio::test]
    async fn fs_volume_writes_a_batch_atomically_and_leaves_no_temp() {
        // Both ways of making a batch durable keep the same promises.
        for mode in [SyncMode::Filesystem, SyncMode::PerFile] {
            let dir = tempfile::tempdir().unwrap();
            let v = FsVolume::new(dir.path()).unwrap().with_sync_mode(mode);
            v.write("a/old", Bytes::from_static(b"0")).await.unwrap();
            v.write("a/gone", Bytes::from_static(b"x")).await.unwrap();
            v.write_many(vec![
                ("a/old".into(), Some(Bytes::from_static(b"1"))),
                ("a/b/new".into(), Some(Bytes::from_static(b"2"))),
                ("a/gone".into(), None),
                ("a/never".into(), None),
            ])
            .await
            .unwrap();
            assert_eq!(v.list("").await.unwrap(), vec!["a/b/new", "a/old"]);
            assert_eq!(
                v.read("a/old").await.unwrap(),
                Some(Bytes::from_static(b"1"))
            );
            assert_eq!(
                v.read("a/b/new").await.unwrap(),
                Some(Bytes::from_static(b"2"))
            );
            // A bad key fails the whole batch before anything is written.
            let bad = v
                .write_many(vec![
                    ("a/c".into(), Some(Bytes::from_static(b"3"))),
                    ("../escape".into(), Some(Bytes::from_static(b"4"))),
                ])
                .await;
            assert!(bad.is_err());
            assert_eq!(v.read("a/c").await.unwrap(), None);
            let hidden: Vec<_> = walk(dir.path())
                .into_iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect();
            assert!(hidden.is_empty(), "temp files left: {hidden:?}");
        }
    }

    #[tokio::test]
    async fn fs_volume_batch_keeps_the_last_change_of_a_key_and_cleans_up_after_a_failure() {
        // Both ways of making a batch durable keep the same promises.
        for mode in [SyncMode::Filesystem, SyncMode::PerFile] {
            let dir = tempfile::tempdir().unwrap();
            let v = FsVolume::new(dir.path()).unwrap().with_sync_mode(mode);
            v.write_many(vec![
                ("k/x".into(), Some(Bytes::from_static(b"1"))),
                ("k/x".into(), None),
                ("k/y".into(), None),
                ("k/y".into(), Some(Bytes::from_static(b"2"))),
            ])
            .await
            .unwrap();
            assert_eq!(v.list("k/").await.unwrap(), vec!["k/y"]);
            // `k/y` is a file, so `k/y/z` cannot be made: the batch fails, naming why, and leaves no
            // temp file of the values it had written.
            let e = v
                .write_many(
                    (0..20)
                        .map(|i| (format!("k/w{i}"), Some(Bytes::from_static(b"w"))))
                        .chain([("k/y/z".to_string(), Some(Bytes::from_static(b"3")))])
                        .collect(),
                )
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotADirectory, "{e}");
            let hidden: Vec<_> = walk(dir.path())
                .into_iter()
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect();
            assert!(hidden.is_empty(), "temp files left: {hidden:?}");
            // A directory the volume made and remembers, removed behind its back, is made again.
            std::fs::remove_dir_all(dir.path().join("k")).unwrap();
            v.write_many(vec![("k/y".into(), Some(Bytes::from_static(b"4")))])
                .await
                .unwrap();
            assert_eq!(v.read("k/y").await.unwrap(), Some(Bytes::from_static(b"4")));
        }
    }

    #[test]
    fn sync_mode_is_detected_from_the_filesystem_and_a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mode = SyncMode::detect(dir.path()).unwrap();
        assert_eq!(FsVolume::new(dir.path()).unwrap().sync_mode(), mode);
        let gone = dir.path().join("missing");
        assert_eq!(
            SyncMode::detect(&gone).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_keeps_at_most_its_bound_in_flight_and_finishes_all() {
        let now = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let futs = (0..40u64)
            .map(|i| {
                let (n, m) = (now.clone(), most.clone());
                async move {
                    let at = n.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(at, Ordering::SeqCst);
                    // Uneven durations, so that later ones overtake earlier ones.
                    tokio::time::sleep(Duration::from_millis(1 + (i * 7) % 5)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    if i == 7 {
                        Err(io::Error::other("seven"))
                    } else {
                        Ok(i)
                    }
                }
            })
            .collect();
        let outcomes = bounded(3, futs).await;
        assert_eq!(outcomes.len(), 40, "every item ran, also after an error");
        assert_eq!(now.load(Ordering::SeqCst), 0, "none left running");
        // The bound is reached and never exceeded.
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(outcomes[39].as_ref().unwrap(), &39, "outcomes in order");
        let first_error = outcomes.into_iter().collect::<io::Result<Vec<_>>>();
        assert_eq!(first_error.unwrap_err().to_string(), "seven");
    }

    /// Primitives that take 10 ms each and succeed, counting how many are in flight at once.
    #[derive(Default)]
    struct Watched {
        now: AtomicU64,
        most: AtomicU64,
    }

    impl Watched {
        async fn op<T>(&self, out: T) -> io::Result<T> {
            let at = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(at, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(out)
        }
    }

    impl Fs for Watched {
        async fn read(&self, _: &str) -> io::Result<Option<Bytes>> {
            self.op(None).await
        }
        async fn create(&self, _: &str, _: Bytes, _: bool) -> io::Result<()> {
            self.op(()).await
        }
        async fn append(&self, _: &str, _: Bytes, _: bool) -> io::Result<()> {
            self.op(()).await
        }
        async fn sync(&self, _: &str) -> io::Result<()> {
            self.op(()).await
        }
        async fn sync_all(&self) -> io::Result<()> {
            self.op(()).await
        }
        async fn rename(&self, _: &str, _: &str) -> io::Result<()> {
            self.op(()).await
        }
        async fn mkdir(&self, _: &str) -> io::Result<()> {
            self.op(()).await
        }
        async fn list(&self, _: &str) -> io::Result<Vec<crate::storage::fs::Entry>> {
            self.op(Vec::new()).await
        }
        async fn remove(&self, _: &str) -> io::Result<()> {
            self.op(()).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batch_work_shares_one_bound_per_volume_and_a_single_write_does_not_queue_behind_it() {
        let v = FsVolume::over(Watched::default(), SyncMode::PerFile, "t").with_concurrency(8);
        let v = Arc::new(v);
        let batch = |b: usize| {
            let v = v.clone();
            tokio::spawn(async move {
                let writes = (0..40)
                    .map(|i| (format!("b{b}/k{i}"), Some(Bytes::from_static(b"x"))))
                    .collect();
                v.write_many(writes).await
            })
        };
        // Four flushes at once (the datastore runs several): each alone may have 8 in flight.
        let flushes: Vec<_> = (0..4).map(batch).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(v.fs().now.load(Ordering::SeqCst), 8, "the gate is full");
        // A single-key write someone waits for (a lease beat, a segment file) goes at once: its
        // three primitives (create, rename, directory sync) take 30 ms, not the batches' 400.
        let t0 = tokio::time::Instant::now();
        v.write("lease", Bytes::from_static(b"beat")).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(30));
        assert!(flushes.iter().all(|f| !f.is_finished()));
        for f in flushes {
            f.await.unwrap().unwrap();
        }
        // Never more than the bound, plus the one single write's primitive.
        assert_eq!(v.fs().most.load(Ordering::SeqCst), 9);
        // 4 batches x 40 keys x 2 primitives (create, rename) + 4 directory syncs at 8 at once.
        assert_eq!(t0.elapsed().as_millis() / 10, (4 * 40 * 2 + 4) / 8);
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    /// A list within a depth does not walk below it: with the latency model, two levels cost two
    /// latencies where the whole tree costs four.
    #[tokio::test(start_paused = true)]
    async fn a_list_within_a_depth_walks_no_deeper() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LatencyFs::new(OsFs::new(dir.path()).unwrap(), Duration::from_millis(50));
        let v = FsVolume::over(fs, SyncMode::PerFile, "t");
        for k in [
            "c/A/record.json",
            "c/A/flows/F/record.json",
            "c/B/record.json",
        ] {
            v.write(k, Bytes::from_static(b"x")).await.unwrap();
        }
        let t = tokio::time::Instant::now();
        assert_eq!(
            v.list_within("c/", Some(2)).await.unwrap(),
            vec!["c/A/record.json", "c/B/record.json"]
        );
        assert_eq!(t.elapsed(), Duration::from_millis(2 * 50));
        let t = tokio::time::Instant::now();
        assert_eq!(v.list("c/").await.unwrap().len(), 3);
        assert_eq!(t.elapsed(), Duration::from_millis(4 * 50));
        assert!(v.list_within("c/", Some(0)).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_latency_model_charges_each_primitive_of_the_volume_logic() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LatencyFs::new(OsFs::new(dir.path()).unwrap(), Duration::from_millis(50));
        let v = FsVolume::over(fs, SyncMode::PerFile, "t");
        let t0 = tokio::time::Instant::now();
        // A write into a missing directory: create + sync (two, refused: NotFound), mkdir,
        // create + sync (two),
        // rename, then the directory and its parent synced concurrently (one).
        v.write("d/k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(7 * 50));
        // Into a directory that exists: no lookups, no mkdir.
        let t1 = tokio::time::Instant::now();
        v.write("d/k2", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(t1.elapsed(), Duration::from_millis(4 * 50));
        let t2 = tokio::time::Instant::now();
        v.read("d/k").await.unwrap();
        assert_eq!(t2.elapsed(), Duration::from_millis(50));
        // A batch of 100 keys in one existing directory: their creates and renames hold the
        // directory's lock, so they run one at a time (as on a real mount), the syncs overlap.
        let t3 = tokio::time::Instant::now();
        v.write_many(
            (0..100)
                .map(|i| (format!("d/b{i}"), Some(Bytes::from_static(b"x"))))
                .collect(),
        )
        .await
        .unwrap();
        // 100 durable creates (2 each), 100 renames, 1 directory sync.
        assert_eq!(
            t3.elapsed(),
            Duration::from_millis((100 * 2 + 100 + 1) * 50)
        );
        // The same batch spread over 4 existing directories, all in flight at once: 4 lanes of 25.
        for d in 0..4 {
            v.fs().mkdir(&format!("e{d}")).await.unwrap();
        }
        let v = v.with_concurrency(100);
        let t4 = tokio::time::Instant::now();
        v.write_many(
            (0..100)
                .map(|i| (format!("e{}/b{i}", i % 4), Some(Bytes::from_static(b"x"))))
                .collect(),
        )
        .await
        .unwrap();
        assert_eq!(t4.elapsed(), Duration::from_millis((25 * 2 + 25 + 1) * 50));
    }
}
