//! A node's local disk: the few operations the journal and the outbox need, behind a trait so the
//! simulator can run the same code over `talon_sim::disk::SimDisk`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Blocking local-disk operations on paths relative to the disk's root (`/`-separated).
pub trait LocalDisk: Send {
    /// Appends to a file, creating it.
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Makes a file's contents durable.
    fn sync(&mut self, path: &str) -> io::Result<()>;
    /// Reads a whole file; `None` if it does not exist.
    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces a file atomically and durably.
    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Cuts a file to `len` bytes and makes that durable.
    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()>;
    /// Removes a file (no error if it is already gone).
    fn remove(&mut self, path: &str) -> io::Result<()>;
    /// Files whose relative path starts with `prefix`, sorted.
    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>>;
}

impl<D: LocalDisk + ?Sized> LocalDisk for Box<D> {
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        (**self).append(path, data)
    }
    fn sync(&mut self, path: &str) -> io::Result<()> {
        (**self).sync(path)
    }
    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        (**self).read(path)
    }
    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        (**self).write_atomic(path, data)
    }
    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()> {
        (**self).truncate(path, len)
    }
    fn remove(&mut self, path: &str) -> io::Result<()> {
        (**self).remove(path)
    }
    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>> {
        (**self).list(prefix)
    }
}

/// The real filesystem under a root directory.
#[derive(Debug)]
pub struct StdDisk {
    root: PathBuf,
    /// Files open for append (bounded by how many journals a node keeps: a handful).
    open: BTreeMap<String, File>,
}

impl StdDisk {
    /// A disk rooted at `root` (created if missing).
    pub fn new(root: &Path) -> io::Result<StdDisk> {
        fs::create_dir_all(root)?;
        Ok(StdDisk {
            root: root.to_owned(),
            open: BTreeMap::new(),
        })
    }

    fn path(&self, rel: &str) -> io::Result<PathBuf> {
        let ok = !rel.is_empty()
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !ok || rel.starts_with('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad relative path {rel:?}"),
            ));
        }
        Ok(self.root.join(rel))
    }

    fn file(&mut self, rel: &str) -> io::Result<&mut File> {
        if !self.open.contains_key(rel) {
            let p = self.path(rel)?;
            if let Some(dir) = p.parent() {
                fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().append(true).create(true).open(&p)?;
            self.open.insert(rel.to_owned(), f);
        }
        Ok(self.open.get_mut(rel).expect("inserted above"))
    }
}

impl LocalDisk for StdDisk {
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.file(path)?.write_all(data)
    }

    fn sync(&mut self, path: &str) -> io::Result<()> {
        self.file(path)?.sync_data()
    }

    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        match File::open(self.path(path)?) {
            Ok(mut f) => f.read_to_end(&mut buf).map(|_| Some(buf)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let p = self.path(path)?;
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        self.open.remove(path);
        crate::fsutil::write_atomic(&p, data, 0o600)
    }

    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()> {
        let f = self.file(path)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&mut self, path: &str) -> io::Result<()> {
        self.open.remove(path);
        match fs::remove_file(self.path(path)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>> {
        // Only the directory part of the prefix is walked (one level: journals are flat).
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let abs = if dir.is_empty() {
            self.root.clone()
        } else {
            self.path(dir)?
        };
        let mut out = Vec::new();
        let entries = match fs::read_dir(&abs) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            if rel.starts_with(prefix) {
                out.push(rel);
            }
        }
        out.sort();
        Ok(out)
    }
}
