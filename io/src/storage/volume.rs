//! The shared volume (`Datastore.location` / `filestore_directory`): NFS/EFS in production, where
//! every operation costs 40–60 ms. An async trait so that the simulator's volume can charge virtual
//! latency and the production one can keep slow syscalls off the async workers.

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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
    /// Appends to a key, creating it (for assembling large files piece by piece; not atomic: write
    /// to a scratch key and `commit` it).
    fn append(&self, key: &str, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes `from` durable and atomically renames it over `to`.
    fn commit(&self, from: &str, to: &str) -> impl Future<Output = io::Result<()>> + Send;
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
            join_all(futs).await.into_iter().collect()
        }
    }
}

/// Polls a set of futures concurrently to completion, in order of the results.
async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
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
    /// [`Volume::append`].
    fn dyn_append<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::commit`].
    fn dyn_commit<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>>;
    /// [`Volume::write_many`].
    fn dyn_write_many<'a>(
        &'a self,
        writes: Vec<(String, Option<Bytes>)>,
    ) -> BoxFuture<'a, io::Result<()>>;
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
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.0.dyn_append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.0.dyn_commit(from, to).await
    }
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        self.0.dyn_write_many(writes).await
    }
}

/// File operations one batch ([`Volume::write_many`]) has in flight at once. A network filesystem
/// (NFS, EFS, sshfs) serves independent requests in parallel: its throughput grows with the number
/// in flight, not with a faster single request (slowfs at 12 ms one way: ~18 stats/s from one
/// caller, ~188 from 32). Each runs on tokio's blocking pool.
pub const VOLUME_CONCURRENCY: usize = 32;

/// Directories a volume remembers having made (a network filesystem charges a round trip per path
/// component to find out again); forgotten all at once when full.
const KNOWN_DIRS_MAX: usize = 65_536;

/// How [`FsVolume::write_many`] makes a batch durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// One `syncfs` after the data, one after the renames, the whole batch on one blocking thread:
    /// cheapest on a local filesystem (ext4 charged 82 % kernel CPU for two `fsync`s per file), and
    /// exact there, because `syncfs` flushes every dirty page and the journal.
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

/// A directory on a (possibly network) filesystem. Blocking syscalls run on tokio's blocking pool.
#[derive(Clone, Debug)]
pub struct FsVolume {
    root: PathBuf,
    sync: SyncMode,
    /// Directories known to exist (made or seen by this process); bounded by `KNOWN_DIRS_MAX`.
    known_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    /// Temp-file names unique within the process, also for two batches writing one key at once.
    temp_seq: Arc<AtomicU64>,
    in_flight: usize,
}

impl FsVolume {
    /// A volume rooted at `root` (created if missing), its [`SyncMode`] detected from the
    /// filesystem holding it.
    pub fn new(root: &Path) -> io::Result<FsVolume> {
        std::fs::create_dir_all(root)?;
        Ok(FsVolume {
            root: root.to_owned(),
            sync: SyncMode::detect(root)?,
            known_dirs: Arc::default(),
            temp_seq: Arc::default(),
            in_flight: VOLUME_CONCURRENCY,
        })
    }

    /// How this volume makes a batch durable.
    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    /// The same volume making batches durable by `mode` instead of the detected one.
    pub fn with_sync_mode(mut self, mode: SyncMode) -> FsVolume {
        self.sync = mode;
        self
    }

    /// The same volume with at most `n` file operations of a batch in flight (at least 1).
    pub fn with_concurrency(mut self, n: usize) -> FsVolume {
        self.in_flight = n.max(1);
        self
    }

    /// Makes `dir` and any missing ancestors; returns the parents of the directories it created
    /// (their entries are durable only once those parents are synced).
    fn make_dirs(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        if lock(&self.known_dirs).contains(dir) {
            return Ok(Vec::new());
        }
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.is_dir() {
            missing.push(d.to_owned());
            d = match d.parent() {
                Some(p) if p.starts_with(&self.root) => p,
                _ => break,
            };
        }
        let mut made_in = Vec::new();
        for m in missing.iter().rev() {
            match std::fs::create_dir(m) {
                Ok(()) => made_in.extend(m.parent().map(Path::to_owned)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let mut known = lock(&self.known_dirs);
        if known.len() >= KNOWN_DIRS_MAX {
            known.clear();
        }
        known.insert(dir.to_owned());
        Ok(made_in)
    }

    /// Runs `op` on every item on the blocking pool, at most `in_flight` at once; waits for all of
    /// them (none is left running when it returns) and returns every outcome.
    async fn each<T, R>(
        &self,
        items: Vec<T>,
        op: impl Fn(T) -> io::Result<R> + Send + Sync + 'static,
    ) -> Vec<io::Result<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let op = Arc::new(op);
        let mut items = items.into_iter();
        let mut running = tokio::task::JoinSet::new();
        let mut out = Vec::with_capacity(items.len());
        loop {
            while running.len() < self.in_flight {
                let Some(item) = items.next() else { break };
                let op = op.clone();
                running.spawn_blocking(move || op(item));
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            out.push(done.map_err(io::Error::other).and_then(|r| r));
        }
        out
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        validate_key(key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(self.root.join(key))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Volume for FsVolume {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        let p = self.path(key)?;
        blocking(move || match std::fs::read(&p) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        let p = self.path(key)?;
        let me = self.clone();
        blocking(move || {
            me.in_dir(&p, || crate::fsutil::write_atomic(&p, &value, 0o640))
                .map(|_| ())
        })
        .await
    }

    async fn delete(&self, key: &str) -> io::Result<()> {
        let p = self.path(key)?;
        blocking(move || match std::fs::remove_file(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        })
        .await
    }

    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            // Walk only the deepest directory the prefix names, recursively below it.
            let dir_part = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let mut out = Vec::new();
            let mut stack = vec![dir_part.to_owned()];
            while let Some(rel) = stack.pop() {
                let abs = if rel.is_empty() {
                    root.clone()
                } else {
                    root.join(&rel)
                };
                let entries = match std::fs::read_dir(&abs) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue; // Temp files of in-progress atomic writes.
                    }
                    let child = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    if entry.file_type()?.is_dir() {
                        if prefix.starts_with(&format!("{child}/")) || child.starts_with(&prefix) {
                            stack.push(child);
                        }
                    } else if child.starts_with(&prefix) {
                        out.push(child);
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        let p = self.path(key)?;
        let me = self.clone();
        blocking(move || {
            use std::io::Write;
            let open = || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
            };
            me.in_dir(&p, open)?.0.write_all(&data)
        })
        .await
    }

    /// Every key holds its old value or its new one, never a mix, and all are durable on return,
    /// by the volume's [`SyncMode`]. A key changed twice in one batch gets its last change.
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        // One change per key: the last one in the batch.
        let mut last: HashMap<PathBuf, Option<Bytes>> = HashMap::new();
        for (k, v) in writes {
            last.insert(self.path(&k)?, v);
        }
        match self.sync {
            SyncMode::Filesystem => self.write_many_syncfs(last).await,
            SyncMode::PerFile => self.write_many_per_file(last).await,
        }
    }

    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        let (src, dst) = (self.path(from)?, self.path(to)?);
        let me = self.clone();
        blocking(move || {
            std::fs::File::open(&src)?.sync_all()?;
            me.in_dir(&dst, || std::fs::rename(&src, &dst))?;
            match dst.parent() {
                Some(d) => std::fs::File::open(d)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
    }
}

impl FsVolume {
    /// Writes `data` into a fresh temp file beside `p` (making its directory if needed), synced if
    /// `sync`; returns the temp file and the parents of the directories made. On failure nothing of
    /// it is left behind.
    fn write_temp(&self, p: &Path, data: &[u8], sync: bool) -> io::Result<(PathBuf, Vec<PathBuf>)> {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = crate::fsutil::temp_path_n(p, n)?;
        let written = self
            .in_dir(&tmp, || crate::fsutil::write_unsynced(&tmp, data, 0o640))
            .and_then(|(f, made_in)| {
                if sync {
                    f.sync_data()?;
                }
                Ok(made_in)
            });
        match written {
            Ok(made_in) => Ok((tmp, made_in)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Runs `op`, which creates `path`, once `path`'s directory exists (made if this volume does not
    /// remember it); if the directory was removed since it was remembered, makes it again and runs
    /// `op` once more. Returns what `op` returned and the parents of the directories made.
    fn in_dir<R>(
        &self,
        path: &Path,
        mut op: impl FnMut() -> io::Result<R>,
    ) -> io::Result<(R, Vec<PathBuf>)> {
        let dir = crate::fsutil::parent(path);
        let mut made_in = self.make_dirs(dir)?;
        match op() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                lock(&self.known_dirs).remove(dir);
                made_in.extend(self.make_dirs(dir)?);
                Ok((op()?, made_in))
            }
            r => Ok((r?, made_in)),
        }
    }

    /// [`SyncMode::Filesystem`]: on one blocking thread, every new value into a temp file beside
    /// its key, one `syncfs` for all their data, the renames and removals, one `syncfs` for those.
    async fn write_many_syncfs(&self, last: HashMap<PathBuf, Option<Bytes>>) -> io::Result<()> {
        let me = self.clone();
        blocking(move || {
            let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
            let result = (|| {
                for (p, v) in &last {
                    if let Some(data) = v {
                        let (tmp, _) = me.write_temp(p, data, false)?;
                        staged.push((tmp, p));
                    }
                }
                let fs = std::fs::File::open(&me.root)?;
                rustix::fs::syncfs(&fs)?;
                for (tmp, p) in staged.drain(..) {
                    std::fs::rename(&tmp, p)?;
                }
                for (p, v) in &last {
                    if v.is_none() {
                        match std::fs::remove_file(p) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                            _ => {}
                        }
                    }
                }
                rustix::fs::syncfs(&fs)?;
                Ok(())
            })();
            for (tmp, _) in staged {
                let _ = std::fs::remove_file(tmp);
            }
            result
        })
        .await
    }

    /// [`SyncMode::PerFile`]: three rounds, each issuing its file operations concurrently (at most
    /// `in_flight` at once): every new value into a temp file beside its key, `fdatasync`ed; the
    /// renames over the keys and the removals; an `fsync` of every directory whose entries changed
    /// (and of the parents of directories made).
    async fn write_many_per_file(&self, last: HashMap<PathBuf, Option<Bytes>>) -> io::Result<()> {
        let (puts, removes): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, v)| v.is_some());
        let me = self.clone();
        let staged = self
            .each(puts, move |(p, v)| {
                let (tmp, made_in) = me.write_temp(&p, &v.unwrap_or_default(), true)?;
                Ok((tmp, p, made_in))
            })
            .await;
        if staged.iter().any(|r| r.is_err()) {
            // The temp files that were written go (`list` never shows them: this saves the space).
            let written: Vec<PathBuf> = staged
                .iter()
                .filter_map(|r| r.as_ref().ok().map(|(tmp, _, _)| tmp.clone()))
                .collect();
            self.each(written, std::fs::remove_file).await;
        }
        let staged = staged.into_iter().collect::<io::Result<Vec<_>>>()?;
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        let mut renames = Vec::with_capacity(staged.len());
        for (tmp, p, made_in) in staged {
            dirs.extend(made_in);
            dirs.insert(crate::fsutil::parent(&p).to_owned());
            renames.push((tmp, Some(p)));
        }
        for (p, _) in removes {
            dirs.insert(crate::fsutil::parent(&p).to_owned());
            renames.push((p, None));
        }
        self.each(renames, |(from, to)| match to {
            Some(to) => std::fs::rename(&from, &to).inspect_err(|_| {
                let _ = std::fs::remove_file(&from);
            }),
            None => match std::fs::remove_file(&from) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        })
        .await
        .into_iter()
        .collect::<io::Result<()>>()?;
        self.each(dirs.into_iter().collect(), |d| {
            match std::fs::File::open(&d) {
                Ok(f) => f.sync_all(),
                // A directory a concurrent removal took: nothing of ours is in it any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
        .into_iter()
        .collect()
    }
}

/// Adds a fixed latency to every operation of another volume: what `talon bench storage-latency`
/// selects to show that the datastore cache hides the seed's 40–60 ms.
#[derive(Clone, Debug)]
pub struct LatencyVolume<V> {
    inner: V,
    latency: Duration,
}

impl<V: Volume> LatencyVolume<V> {
    /// Wraps `inner`, delaying each operation by `latency`.
    pub fn new(inner: V, latency: Duration) -> Self {
        LatencyVolume { inner, latency }
    }
}

impl<V: Volume> Volume for LatencyVolume<V> {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        tokio::time::sleep(self.latency).await;
        self.inner.read(key).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.write(key, value).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        tokio::time::sleep(self.latency).await;
        self.inner.list(prefix).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.commit(from, to).await
    }
    /// One latency for the batch: its writes are independent operations issued at once, as the
    /// default `write_many` does (each would wait its latency concurrently).
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        tokio::time::sleep(self.latency).await;
        self.inner.write_many(writes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fs_volume_keeps_at_most_its_bound_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let v = FsVolume::new(dir.path()).unwrap().with_concurrency(3);
        let now = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        // The first three wait for each other: they can pass only if three run at once.
        let first = Arc::new(std::sync::Barrier::new(3));
        let (n, m) = (now.clone(), most.clone());
        let outcomes = v
            .each((0..40).collect(), move |i: u64| {
                let at = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(at, Ordering::SeqCst);
                if i < 3 {
                    first.wait();
                }
                std::thread::sleep(Duration::from_millis(1));
                n.fetch_sub(1, Ordering::SeqCst);
                if i == 7 {
                    Err(io::Error::other("seven"))
                } else {
                    Ok(i)
                }
            })
            .await;
        assert_eq!(outcomes.len(), 40, "every item ran, also after an error");
        assert_eq!(now.load(Ordering::SeqCst), 0, "none left running");
        // The bound is reached (the barrier) and never exceeded.
        assert_eq!(most.load(Ordering::SeqCst), 3);
        let first_error = outcomes.into_iter().collect::<io::Result<Vec<_>>>();
        assert_eq!(first_error.unwrap_err().to_string(), "seven");
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

    #[tokio::test(start_paused = true)]
    async fn latency_volume_charges_each_operation() {
        let dir = tempfile::tempdir().unwrap();
        let v = LatencyVolume::new(
            FsVolume::new(dir.path()).unwrap(),
            Duration::from_millis(50),
        );
        let t0 = tokio::time::Instant::now();
        v.write("k", Bytes::from_static(b"v")).await.unwrap();
        v.read("k").await.unwrap();
        // Virtual time (paused clock): exactly two operations' worth, whatever the machine.
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
