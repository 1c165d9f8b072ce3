//! The shared volume (`Datastore.location` / `filestore_directory`): NFS/EFS in production, where
//! every operation costs 40–60 ms. An async trait so that the simulator's volume can charge virtual
//! latency and the production one can keep slow syscalls off the async workers.

use bytes::Bytes;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
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

/// A directory on a (possibly network) filesystem. Blocking syscalls run on tokio's blocking pool.
#[derive(Clone, Debug)]
pub struct FsVolume {
    root: PathBuf,
}

impl FsVolume {
    /// A volume rooted at `root` (created if missing).
    pub fn new(root: &Path) -> io::Result<FsVolume> {
        std::fs::create_dir_all(root)?;
        Ok(FsVolume {
            root: root.to_owned(),
        })
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
        blocking(move || {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::fsutil::write_atomic(&p, &value, 0o640)
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
        blocking(move || {
            use std::io::Write;
            FsVolume::parent_dirs(&p)?;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)?
                .write_all(&data)
        })
        .await
    }

    /// Every new value into a temp file beside its key, one `syncfs` for all their data, the renames
    /// and removals, one `syncfs` for those: two filesystem syncs per batch instead of two `fsync`s
    /// per file, with the same guarantee (a key holds its old value or its new one, never a mix, and
    /// all are durable on return).
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        let items = writes
            .into_iter()
            .map(|(k, v)| Ok((self.path(&k)?, v)))
            .collect::<io::Result<Vec<(PathBuf, Option<Bytes>)>>>()?;
        let root = self.root.clone();
        blocking(move || {
            let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
            let result = (|| {
                for (p, v) in &items {
                    if let Some(data) = v {
                        FsVolume::parent_dirs(p)?;
                        let tmp = crate::fsutil::temp_path(p)?;
                        staged.push((tmp.clone(), p));
                        crate::fsutil::write_unsynced(&tmp, data, 0o640)?;
                    }
                }
                let fs = std::fs::File::open(&root)?;
                rustix::fs::syncfs(&fs)?;
                for (tmp, p) in staged.drain(..) {
                    std::fs::rename(&tmp, p)?;
                }
                for (p, v) in &items {
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

    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        let (src, dst) = (self.path(from)?, self.path(to)?);
        blocking(move || {
            std::fs::File::open(&src)?.sync_all()?;
            FsVolume::parent_dirs(&dst)?;
            std::fs::rename(&src, &dst)?;
            match dst.parent() {
                Some(d) => std::fs::File::open(d)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
    }
}

impl FsVolume {
    fn parent_dirs(p: &Path) -> io::Result<()> {
        match p.parent() {
            Some(d) => std::fs::create_dir_all(d),
            None => Ok(()),
        }
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
        let dir = tempfile::tempdir().unwrap();
        let v = FsVolume::new(dir.path()).unwrap();
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
