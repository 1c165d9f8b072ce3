//! The shared volume's primitive operations: what one request to a network filesystem does. The
//! volume's logic ([`super::volume::FsVolume`]: which files, which directories, which syncs, in what
//! order, how many at once) is written once over this trait and runs unchanged on the real
//! filesystem ([`OsFs`]), on the latency model ([`LatencyFs`]) and on the simulator's in-memory
//! volume, so that each charges per operation what the real one pays (docs/architecture.md, "The
//! shared volume").
//!
//! Paths are relative to the volume's root, `/`-separated, already validated by the caller; `""` is
//! the root itself.

use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Up to `len` bytes of `b` from `offset` (fewer at its end, none past it): what a ranged read
/// of a file holding `b` returns.
pub fn range_of(b: &Bytes, offset: u64, len: u64) -> Bytes {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
    let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    b.slice(start..end.min(b.len()))
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Its name within the directory.
    pub name: String,
    /// Whether it is a directory.
    pub dir: bool,
}

/// The primitive operations of a filesystem, each about one request to a network file server.
/// Errors follow `std::fs`: `NotFound` when a path or its directory is missing, `AlreadyExists`
/// from `mkdir` of an existing directory.
pub trait Fs: Send + Sync + 'static {
    /// A file's contents; `None` if it does not exist.
    fn read(&self, path: &str) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Up to `len` bytes of a file from `offset` (fewer at its end); `None` if it does not exist.
    /// One request, however large the file.
    fn read_range(
        &self,
        path: &str,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Option<Bytes>>> + Send {
        async move { Ok(self.read(path).await?.map(|b| range_of(&b, offset, len))) }
    }
    /// Creates `path` holding `data` (replacing a file there); when `durable`, its data is on stable
    /// storage before it returns (`fdatasync` before close). `NotFound` if its directory is missing.
    fn create(
        &self,
        path: &str,
        data: Bytes,
        durable: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Appends `data` to `path`, creating it; when `durable`, the file's data is on stable storage
    /// before it returns (`fdatasync` before close: one open for both). `NotFound` if its directory
    /// is missing.
    fn append(
        &self,
        path: &str,
        data: Bytes,
        durable: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes a file's data, or a directory's entries, durable (`fsync`).
    fn sync(&self, path: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes everything written to the filesystem durable (`syncfs`). Only local filesystems honour
    /// it: a FUSE mount sends its server nothing for it ([`super::volume::SyncMode`]).
    fn sync_all(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Renames a file over another, atomically.
    fn rename(&self, from: &str, to: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes one directory: `AlreadyExists` if it exists, `NotFound` if its parent does not.
    fn mkdir(&self, path: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// A directory's entries (hidden ones too), in no particular order.
    fn list(&self, dir: &str) -> impl Future<Output = io::Result<Vec<Entry>>> + Send;
    /// Removes a file: `NotFound` if it is absent.
    fn remove(&self, path: &str) -> impl Future<Output = io::Result<()>> + Send;
}

/// A directory of this machine's filesystem (local or mounted), each operation a blocking syscall
/// sequence on tokio's blocking pool.
#[derive(Clone, Debug)]
pub struct OsFs {
    root: PathBuf,
}

impl OsFs {
    /// The directory `root`, made if missing.
    pub fn new(root: &std::path::Path) -> io::Result<OsFs> {
        std::fs::create_dir_all(root)?;
        Ok(OsFs {
            root: root.to_owned(),
        })
    }

    /// Its root directory.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    fn abs(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl Fs for OsFs {
    async fn read(&self, path: &str) -> io::Result<Option<Bytes>> {
        let p = self.abs(path);
        blocking(move || match std::fs::read(&p) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        let p = self.abs(path);
        blocking(move || {
            use std::io::{Read, Seek};
            let mut f = match std::fs::File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            f.seek(io::SeekFrom::Start(offset))?;
            let mut out = Vec::with_capacity(usize::try_from(len.min(64 << 20)).unwrap_or(0));
            f.take(len).read_to_end(&mut out)?;
            Ok(Some(Bytes::from(out)))
        })
        .await
    }

    async fn create(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || {
            let f = crate::fsutil::write_unsynced(&p, &data, 0o640)?;
            if durable {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn append(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)?;
            f.write_all(&data)?;
            if durable {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn sync(&self, path: &str) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || std::fs::File::open(&p)?.sync_all()).await
    }

    async fn sync_all(&self) -> io::Result<()> {
        let p = self.root.clone();
        blocking(move || Ok(rustix::fs::syncfs(std::fs::File::open(&p)?)?)).await
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.abs(from), self.abs(to));
        blocking(move || std::fs::rename(&from, &to)).await
    }

    async fn mkdir(&self, path: &str) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || std::fs::create_dir(&p)).await
    }

    async fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        let p = self.abs(dir);
        blocking(move || {
            let mut out = Vec::new();
            for e in std::fs::read_dir(&p)? {
                let e = e?;
                out.push(Entry {
                    name: e.file_name().to_string_lossy().into_owned(),
                    dir: e.file_type()?.is_dir(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn remove(&self, path: &str) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || std::fs::remove_file(&p)).await
    }
}

/// Another [`Fs`] with a fixed latency added to each primitive: the latency model
/// (`Datastore.volume_latency_ms`, `talon bench storage-latency`). Each primitive is charged once,
/// a durable `create` twice (the data, then the sync): about one request each to an NFS server.
/// Concurrent primitives wait their latencies concurrently, as requests in flight to a file server
/// do; the volume bounds how many are in flight. Except in one directory: the client's kernel
/// holds a directory's lock for the whole round trip of an operation that adds or removes an entry
/// in it (create, mkdir, rename, remove), so those run one at a time per directory (measured on
/// slowfs at 12 ms one way, 32 callers: creates of new files in one directory 12.8/s, in distinct
/// directories 69.8/s; appends and syncs in one directory are not serialized, 85.6/s), and the
/// model serializes them the same way.
#[derive(Clone, Debug)]
pub struct LatencyFs<F> {
    inner: F,
    latency: Duration,
    dirs: Arc<DirLocks>,
}

/// One lock per directory with an entry operation in flight (entries go once unused, so the map
/// holds at most the operations in flight).
#[derive(Debug, Default)]
struct DirLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl DirLocks {
    /// Holds the locks of the directories of `paths` (each once, in name order: no deadlock).
    async fn hold(&self, paths: &[&str]) -> Held<'_> {
        let mut dirs: Vec<String> = paths
            .iter()
            .map(|p| p.rsplit_once('/').map_or("", |(d, _)| d).to_owned())
            .collect();
        dirs.sort();
        dirs.dedup();
        let mut guards = Vec::with_capacity(dirs.len());
        for d in &dirs {
            let m = {
                let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
                map.entry(d.clone()).or_default().clone()
            };
            guards.push(m.lock_owned().await);
        }
        Held {
            locks: self,
            dirs,
            guards,
        }
    }
}

/// Directory locks held for one operation; released (and forgotten when unused) on drop.
struct Held<'a> {
    locks: &'a DirLocks,
    dirs: Vec<String>,
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.guards.clear();
        // Clones are taken under the map's lock, so a count of one here means no one else holds
        // or waits for the lock.
        let mut map = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        for d in &self.dirs {
            if map.get(d).is_some_and(|m| Arc::strong_count(m) == 1) {
                map.remove(d);
            }
        }
    }
}

impl<F: Fs> LatencyFs<F> {
    /// Wraps `inner`, delaying each primitive by `latency`.
    pub fn new(inner: F, latency: Duration) -> Self {
        LatencyFs {
            inner,
            latency,
            dirs: Arc::default(),
        }
    }

    async fn wait(&self, requests: u32) {
        tokio::time::sleep(self.latency * requests).await;
    }

    /// Directories whose entry locks are held now (for tests of the bound).
    #[cfg(test)]
    fn locked_dirs(&self) -> usize {
        self.dirs.0.lock().unwrap().len()
    }
}

impl<F: Fs> Fs for LatencyFs<F> {
    async fn read(&self, path: &str) -> io::Result<Option<Bytes>> {
        self.wait(1).await;
        self.inner.read(path).await
    }
    async fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        self.wait(1).await;
        self.inner.read_range(path, offset, len).await
    }
    async fn create(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        let _held = self.dirs.hold(&[path]).await;
        self.wait(1 + u32::from(durable)).await;
        self.inner.create(path, data, durable).await
    }
    async fn append(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        self.wait(1 + u32::from(durable)).await;
        self.inner.append(path, data, durable).await
    }
    async fn sync(&self, path: &str) -> io::Result<()> {
        self.wait(1).await;
        self.inner.sync(path).await
    }
    async fn sync_all(&self) -> io::Result<()> {
        self.wait(1).await;
        self.inner.sync_all().await
    }
    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let _held = self.dirs.hold(&[from, to]).await;
        self.wait(1).await;
        self.inner.rename(from, to).await
    }
    async fn mkdir(&self, path: &str) -> io::Result<()> {
        let _held = self.dirs.hold(&[path]).await;
        self.wait(1).await;
        self.inner.mkdir(path).await
    }
    async fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        self.wait(1).await;
        self.inner.list(dir).await
    }
    async fn remove(&self, path: &str) -> io::Result<()> {
        let _held = self.dirs.hold(&[path]).await;
        self.wait(1).await;
        self.inner.remove(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Awaits every future (all polled together).
    async fn join_all<Fut: Future>(futs: Vec<Fut>) -> Vec<Fut::Output> {
        crate::storage::volume::bounded(usize::MAX, futs).await
    }

    /// Entry operations in one directory take one latency each, one after another; in distinct
    /// directories, and appends in one directory, they overlap. (Virtual time: exact, not a
    /// wall-clock threshold.)
    #[tokio::test(start_paused = true)]
    async fn the_model_serializes_entry_operations_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LatencyFs::new(OsFs::new(dir.path()).unwrap(), Duration::from_millis(50));
        for d in ["a", "b0", "b1", "b2", "b3"] {
            fs.inner.mkdir(d).await.unwrap();
        }
        let elapsed = |t: tokio::time::Instant| t.elapsed().as_millis();
        let t = tokio::time::Instant::now();
        let names = |f: fn(usize) -> String| (0..4).map(f).collect::<Vec<_>>();
        let (a, b) = (names(|i| format!("a/f{i}")), names(|i| format!("b{i}/f")));
        let same: Vec<_> = a
            .iter()
            .map(|p| fs.create(p, Bytes::from_static(b"x"), false))
            .collect();
        for r in join_all(same).await {
            r.unwrap();
        }
        assert_eq!(elapsed(t), 200, "four creates in one directory, serialized");
        assert_eq!(fs.locked_dirs(), 0, "unused locks are forgotten");
        let t = tokio::time::Instant::now();
        let spread: Vec<_> = b
            .iter()
            .map(|p| fs.create(p, Bytes::from_static(b"x"), false))
            .collect();
        for r in join_all(spread).await {
            r.unwrap();
        }
        assert_eq!(elapsed(t), 50, "creates in four directories overlap");
        let t = tokio::time::Instant::now();
        let appends: Vec<_> = a
            .iter()
            .map(|p| fs.append(p, Bytes::from_static(b"y"), false))
            .collect();
        for r in join_all(appends).await {
            r.unwrap();
        }
        assert_eq!(
            elapsed(t),
            50,
            "appends to existing files in one directory overlap"
        );
        let t = tokio::time::Instant::now();
        let (r1, r2) = tokio::join!(fs.rename("a/f0", "b0/g"), fs.mkdir("b0/sub"));
        r1.unwrap();
        r2.unwrap();
        assert_eq!(elapsed(t), 100, "a rename holds both directories");
        assert_eq!(fs.locked_dirs(), 0);
        assert_eq!(
            fs.read_range("a/f1", 1, 10).await.unwrap(),
            Some(Bytes::from_static(b"y"))
        );
        assert_eq!(fs.read_range("a/none", 0, 1).await.unwrap(), None);
    }
}
