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
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Creates `path` holding `data` (replacing a file there); when `durable`, its data is on stable
    /// storage before it returns (`fdatasync` before close). `NotFound` if its directory is missing.
    fn create(
        &self,
        path: &str,
        data: Bytes,
        durable: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Appends `data` to `path`, creating it; not made durable. `NotFound` if its directory is
    /// missing.
    fn append(&self, path: &str, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
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

    async fn append(&self, path: &str, data: Bytes) -> io::Result<()> {
        let p = self.abs(path);
        blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)?
                .write_all(&data)
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
/// do; the volume bounds how many are in flight.
#[derive(Clone, Debug)]
pub struct LatencyFs<F> {
    inner: F,
    latency: Duration,
}

impl<F: Fs> LatencyFs<F> {
    /// Wraps `inner`, delaying each primitive by `latency`.
    pub fn new(inner: F, latency: Duration) -> Self {
        LatencyFs { inner, latency }
    }

    async fn wait(&self, requests: u32) {
        tokio::time::sleep(self.latency * requests).await;
    }
}

impl<F: Fs> Fs for LatencyFs<F> {
    async fn read(&self, path: &str) -> io::Result<Option<Bytes>> {
        self.wait(1).await;
        self.inner.read(path).await
    }
    async fn create(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        self.wait(1 + u32::from(durable)).await;
        self.inner.create(path, data, durable).await
    }
    async fn append(&self, path: &str, data: Bytes) -> io::Result<()> {
        self.wait(1).await;
        self.inner.append(path, data).await
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
        self.wait(1).await;
        self.inner.rename(from, to).await
    }
    async fn mkdir(&self, path: &str) -> io::Result<()> {
        self.wait(1).await;
        self.inner.mkdir(path).await
    }
    async fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        self.wait(1).await;
        self.inner.list(dir).await
    }
    async fn remove(&self, path: &str) -> io::Result<()> {
        self.wait(1).await;
        self.inner.remove(path).await
    }
}
