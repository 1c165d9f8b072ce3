//! File primitives the shell builds on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The directory holding `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The temp file `write_atomic` stages `path` in: hidden (listings skip dot files), beside it.
pub fn temp_path(path: &Path) -> io::Result<std::path::PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(parent(path).join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Like [`temp_path`], numbered `n` as well: unique among temp files of one process.
pub fn temp_path_n(path: &Path, n: u64) -> io::Result<std::path::PathBuf> {
    let mut p = temp_path(path)?.into_os_string();
    p.push(format!("-{n}"));
    Ok(p.into())
}

/// Creates or truncates `path` and writes `data`, without syncing (the caller syncs).
pub fn write_unsynced(path: &Path, data: &[u8], mode: u32) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    Ok(f)
}

/// Replaces `path` with `data` atomically: a reader (or a crash) sees the old contents or the new,
/// never a mix. Writes a temp file beside it, fsyncs it, renames it over `path`, fsyncs the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path)?;
    let result = (|| {
        write_unsynced(&tmp, data, mode)?.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err()
        && let Err(e) = fs::remove_file(&tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        // The write's error is the one to report; a temporary file left behind is only noted.
        tracing::debug!(file = %tmp.display(), error = %e, "could not remove a temporary file");
    }
    result
}

/// Removes the tree at `root` with up to `threads` file operations in flight: a network filesystem
/// charges a round trip per operation and serves many at once, so a tree of thousands of entries
/// removed one entry at a time takes minutes. Directories are listed level by level, then files
/// removed, then directories deepest first. A missing `root` is not an error.
pub fn remove_tree_concurrently(root: &Path, threads: usize) -> io::Result<()> {
    use std::path::PathBuf;
    fn in_parallel<T: Sync, R: Send>(
        items: &[T],
        threads: usize,
        op: impl Fn(&T) -> io::Result<R> + Sync,
    ) -> io::Result<Vec<R>> {
        let chunk = items.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|c| s.spawn(|| c.iter().map(&op).collect::<io::Result<Vec<R>>>()))
                .collect();
            let mut out = Vec::with_capacity(items.len());
            for h in handles {
                out.extend(
                    h.join()
                        .map_err(|_| io::Error::other("a remover panicked"))??,
                );
            }
            Ok(out)
        })
    }
    if !root.exists() {
        return Ok(());
    }
    let mut levels: Vec<Vec<PathBuf>> = vec![vec![root.to_owned()]];
    let mut files = Vec::new();
    loop {
        let listed = in_parallel(levels.last().expect("one level"), threads, |d| {
            let mut dirs = Vec::new();
            let mut plain = Vec::new();
            for e in fs::read_dir(d)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    dirs.push(e.path());
                } else {
                    plain.push(e.path());
                }
            }
            Ok((dirs, plain))
        })?;
        let mut next = Vec::new();
        for (dirs, plain) in listed {
            next.extend(dirs);
            files.extend(plain);
        }
        if next.is_empty() {
            break;
        }
        levels.push(next);
    }
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    in_parallel(&files, threads, |f| gone(fs::remove_file(f)))?;
    for level in levels.iter().rev() {
        in_parallel(level, threads, |d| gone(fs::remove_dir(d)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_contents_with_the_given_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.yaml");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("no/such/f"), b"x", 0o600).is_err());
    }

    #[test]
    fn removes_a_tree_concurrently_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        for i in 0..50 {
            let d = root.join(format!("a{}/b{}", i % 7, i % 3));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join(format!("f{i}")), b"x").unwrap();
        }
        fs::create_dir_all(root.join("empty/deeper")).unwrap();
        remove_tree_concurrently(&root, 8).unwrap();
        assert!(!root.exists());
        remove_tree_concurrently(&root, 8).unwrap();
        assert!(dir.path().exists(), "only the tree itself goes");
    }
}
