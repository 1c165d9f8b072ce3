//! Event sources (docs/events.md, "Event tables"): what collects each event table's rows on the
//! agent, polled once a second by the runner of the artifact reading it. A source exists only
//! while an assigned artifact runs over its table, and each bounds its cost per poll.

use crate::query::{Host, table::Value};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Directories and files one `file_events` source watches at most (inotify watches cost kernel
/// memory, and the user's limit, `fs.inotify.max_user_watches`, is shared).
pub const WATCHES_MAX: usize = 4096;
/// `file_events` rows one poll reads at most (plus what is left of the read buffer); the rest
/// wait in the kernel's queue for the next poll.
pub const FILE_EVENTS_PER_POLL_MAX: usize = 10_000;
/// Bytes read from the inotify descriptor at once.
const INOTIFY_BUFFER_BYTES: usize = 64 << 10;

/// What collects an event table's rows.
pub(super) enum Source {
    /// `talon_test_events`: `rate` per second.
    Test {
        rate: u64,
        payload: String,
        started: talon_core::Monotonic,
        /// `started` on the wall clock: event `n` is due `n / rate` seconds after it.
        started_wall: talon_core::Timestamp,
        made: u64,
    },
    /// `process_events`: pids seen at the last scan (none before the first).
    Processes { seen: Option<BTreeSet<i32>> },
    /// `socket_events`: sockets seen at the last scan (none before the first).
    Sockets {
        seen: Option<BTreeMap<u64, crate::query::linux::SocketSeen>>,
    },
    /// `file_events`.
    Files(Box<FileWatch>),
    /// A table this host has nothing for (a virtual agent's processes, files and sockets).
    Nothing,
}

impl Source {
    /// The source of `table`, configured by the artifact's `params`.
    pub(super) fn new(
        table: &str,
        params: &BTreeMap<String, String>,
        now: talon_core::Monotonic,
        wall: talon_core::Timestamp,
        host: &Host,
    ) -> Result<Source, String> {
        let int = |k: &str, d: u64| params.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        let virtual_host = matches!(host, Host::Virtual { .. });
        Ok(match table {
            "talon_test_events" => Source::Test {
                rate: int("rate", 10),
                payload: "x".repeat(int("payload_bytes", 0).min(64 << 10) as usize),
                started: now,
                started_wall: wall,
                made: 0,
            },
            // A virtual agent has no processes, files or sockets of its own.
            _ if virtual_host => Source::Nothing,
            "process_events" => Source::Processes { seen: None },
            "socket_events" => Source::Sockets { seen: None },
            "file_events" => Source::Files(Box::new(FileWatch::new(params)?)),
            other => return Err(format!("no event source for table {other}")),
        })
    }

    /// What happened since the last poll, as rows of the event table, and when the oldest of
    /// them happened (ms since the epoch).
    pub(super) fn poll(
        &mut self,
        now: talon_core::Monotonic,
        wall: talon_core::Timestamp,
    ) -> Result<(Vec<Vec<Value>>, u64), String> {
        match self {
            Source::Test {
                rate,
                payload,
                started,
                started_wall,
                made,
            } => {
                let due = now.since_ms(*started).saturating_mul(*rate) / 1000;
                // At most ten seconds' worth at once (a stalled runner does not flood).
                let n = due
                    .saturating_sub(*made)
                    .min(rate.saturating_mul(10).max(1));
                // Each event is stamped with when it was due, not when the poll found it.
                let due_ms =
                    |k: u64| started_wall.as_ms() + k.saturating_mul(1000) / (*rate).max(1);
                let rows = (0..n)
                    .map(|i| {
                        let t = due_ms(*made + i);
                        vec![
                            Value::from(t / 1000),
                            Value::from(t),
                            Value::from(*made + i),
                            Value::from(payload.as_str()),
                        ]
                    })
                    .collect();
                let oldest = due_ms(*made);
                *made += n;
                Ok((rows, oldest))
            }
            Source::Processes { seen } => {
                let now_pids = crate::query::linux::pids().map_err(|e| e.0)?;
                let new: Vec<i32> = match seen {
                    Some(before) => now_pids.difference(before).copied().collect(),
                    None => Vec::new(),
                };
                *seen = Some(now_pids);
                if new.is_empty() {
                    return Ok((Vec::new(), wall.as_ms()));
                }
                // Found now; started within the last poll.
                let rows = crate::query::linux::process_event_rows(&new).map_err(|e| e.0)?;
                Ok((rows, wall.as_ms()))
            }
            Source::Sockets { seen } => {
                let now_socks = crate::query::linux::sockets().map_err(|e| e.0)?;
                let new: Vec<(u64, crate::query::linux::SocketSeen)> = match seen {
                    Some(before) => now_socks
                        .iter()
                        .filter(|(inode, _)| **inode != 0 && !before.contains_key(inode))
                        .map(|(i, s)| (*i, s.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                *seen = Some(now_socks);
                let rows = crate::query::linux::socket_event_rows(&new, wall.as_ms() / 1000);
                Ok((rows, wall.as_ms()))
            }
            Source::Files(w) => Ok((w.poll(wall.as_ms() / 1000)?, wall.as_ms())),
            Source::Nothing => Ok((Vec::new(), wall.as_ms())),
        }
    }
}

/// `file_events`' inotify watches: the paths the artifact's `paths` parameter names
/// (comma-separated, absolute), and with `recursive` true every directory under them (at most
/// [`WATCHES_MAX`] in all). A path that does not exist yet, or stops existing, is watched again
/// from the first poll that finds it.
pub(super) struct FileWatch {
    fd: OwnedFd,
    roots: Vec<PathBuf>,
    recursive: bool,
    /// Watch descriptor → the path it watches.
    wds: HashMap<i32, PathBuf>,
    /// The paths watched.
    watched: BTreeSet<PathBuf>,
    buf: Vec<MaybeUninit<u8>>,
    /// The bound was reported.
    full_said: bool,
}

fn watch_flags() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::MODIFY
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::DELETE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::ATTRIB
        | WatchFlags::EXCL_UNLINK
}

impl FileWatch {
    /// Watches the paths `params` names.
    pub(super) fn new(params: &BTreeMap<String, String>) -> Result<FileWatch, String> {
        let text = params.get("paths").map(String::as_str).unwrap_or_default();
        let roots: Vec<PathBuf> = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if roots.is_empty() {
            return Err(
                "file_events watches the paths in the artifact's parameter `paths` \
                 (comma-separated absolute paths), and it names none"
                    .into(),
            );
        }
        if let Some(p) = roots.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "file_events: the path {:?} in `paths` is not absolute",
                p.display()
            ));
        }
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)
            .map_err(|e| format!("file_events: cannot start inotify: {e}"))?;
        let mut w = FileWatch {
            fd,
            roots,
            recursive: params.get("recursive").is_some_and(|v| v == "true"),
            wds: HashMap::new(),
            watched: BTreeSet::new(),
            buf: vec![MaybeUninit::uninit(); INOTIFY_BUFFER_BYTES],
            full_said: false,
        };
        w.watch_roots();
        Ok(w)
    }

    /// Watches the roots not watched now (missing at the last try, or deleted since).
    fn watch_roots(&mut self) {
        for root in self.roots.clone() {
            if !self.watched.contains(&root) && root.exists() {
                self.add(&root, self.recursive);
            }
        }
    }

    /// Watches `path`, and with `deep` the directories under it, while the bound allows.
    fn add(&mut self, path: &Path, deep: bool) {
        if self.watched.len() >= WATCHES_MAX {
            if !self.full_said {
                self.full_said = true;
                tracing::warn!(path = %path.display(), max = WATCHES_MAX, "file_events watches its most paths; changes under the rest are not seen");
            }
            return;
        }
        match inotify::add_watch(&self.fd, path, watch_flags()) {
            Ok(wd) => {
                self.wds.insert(wd, path.to_owned());
                self.watched.insert(path.to_owned());
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "file_events cannot watch a path; trying again at the next poll");
                return;
            }
        }
        if deep && let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.add(&e.path(), true);
                }
            }
        }
    }

    /// The changes the kernel queued since the last poll, as `file_events` rows.
    fn poll(&mut self, time: u64) -> Result<Vec<Vec<Value>>, String> {
        self.watch_roots();
        let mut rows: Vec<Vec<Value>> = Vec::new();
        // A file written in many pieces is reported UPDATED once per poll.
        let mut updated: BTreeSet<(PathBuf, &'static str)> = BTreeSet::new();
        let mut gone_wds = Vec::new();
        let mut new_dirs = Vec::new();
        {
            let mut reader = inotify::Reader::new(&self.fd, &mut self.buf);
            loop {
                // Stop at the bound, but only between reads: a read's events are all taken.
                if rows.len() >= FILE_EVENTS_PER_POLL_MAX && reader.is_buffer_empty() {
                    break;
                }
                let ev = match reader.next() {
                    Ok(ev) => ev,
                    Err(e) if e == rustix::io::Errno::AGAIN => break,
                    Err(e) => return Err(format!("file_events: reading inotify: {e}")),
                };
                let flags = ev.events();
                if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                    rows.push(file_row("", "OVERFLOW", false, 0, -1, time));
                    continue;
                }
                if flags.contains(ReadFlags::IGNORED) {
                    gone_wds.push(ev.wd());
                    continue;
                }
                let Some(base) = self.wds.get(&ev.wd()) else {
                    continue;
                };
                let path = match ev.file_name() {
                    Some(name) if !name.is_empty() => {
                        use std::os::unix::ffi::OsStrExt;
                        base.join(std::ffi::OsStr::from_bytes(name.to_bytes()))
                    }
                    _ => base.clone(),
                };
                let is_dir = flags.contains(ReadFlags::ISDIR);
                let action = if flags.contains(ReadFlags::CREATE) {
                    if is_dir && self.recursive {
                        new_dirs.push(path.clone());
                    }
                    "CREATED"
                } else if flags.intersects(ReadFlags::MODIFY | ReadFlags::CLOSE_WRITE) {
                    "UPDATED"
                } else if flags.contains(ReadFlags::DELETE) {
                    "DELETED"
                } else if flags.contains(ReadFlags::DELETE_SELF) {
                    // Reported by its parent's watch too, unless it is a root.
                    if !self.roots.contains(&path) {
                        continue;
                    }
                    "DELETED"
                } else if flags.contains(ReadFlags::MOVED_FROM) {
                    "MOVED_FROM"
                } else if flags.contains(ReadFlags::MOVED_TO) {
                    if is_dir && self.recursive {
                        new_dirs.push(path.clone());
                    }
                    "MOVED_TO"
                } else if flags.contains(ReadFlags::ATTRIB) {
                    "ATTRIBUTES_MODIFIED"
                } else {
                    continue;
                };
                if matches!(action, "UPDATED" | "ATTRIBUTES_MODIFIED")
                    && !updated.insert((path.clone(), action))
                {
                    continue;
                }
                let size = std::fs::symlink_metadata(&path).map_or(-1, |m| m.len() as i64);
                let cookie = u64::from(ev.cookie());
                rows.push(file_row(
                    &path.to_string_lossy(),
                    action,
                    is_dir,
                    cookie,
                    size,
                    time,
                ));
            }
        }
        for wd in gone_wds {
            if let Some(p) = self.wds.remove(&wd) {
                self.watched.remove(&p);
            }
        }
        for d in new_dirs {
            if !self.watched.contains(&d) {
                self.add(&d, true);
            }
        }
        Ok(rows)
    }
}

fn file_row(
    path: &str,
    action: &str,
    is_dir: bool,
    transaction: u64,
    size: i64,
    time: u64,
) -> Vec<Value> {
    vec![
        path.into(),
        action.into(),
        i64::from(is_dir).into(),
        transaction.into(),
        size.into(),
        time.into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn actions(rows: &[Vec<Value>]) -> Vec<(String, String)> {
        rows.iter()
            .map(|r| (r[0].to_string(), r[1].to_string()))
            .collect()
    }

    /// Created, written, moved (paired) and deleted files come back as rows, a file written in
    /// pieces once; with `recursive`, a directory made after the start is watched too.
    #[test]
    fn file_changes_become_rows() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let mut w = FileWatch::new(&params(&[
            ("paths", root.to_str().unwrap()),
            ("recursive", "true"),
        ]))
        .unwrap();
        let a = root.join("a.txt");
        std::fs::write(&a, "one").unwrap();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
            for _ in 0..10 {
                f.write_all(b"more").unwrap();
            }
        }
        let b = root.join("b.txt");
        std::fs::rename(&a, &b).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let rows = w.poll(7).unwrap();
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let got = actions(&rows);
        assert_eq!(
            got,
            [
                (s(&a), "CREATED".into()),
                (s(&a), "UPDATED".into()),
                (s(&a), "MOVED_FROM".into()),
                (s(&b), "MOVED_TO".into()),
                (s(&root.join("sub")), "CREATED".into()),
            ]
        );
        assert_eq!(rows[2][3], rows[3][3], "a move's halves are paired");
        assert_ne!(rows[2][3].to_string(), "0");
        assert_eq!(rows[4][2].to_string(), "1", "sub is a directory");
        // The new directory is watched: a file made in it is seen.
        let c = root.join("sub").join("c.txt");
        std::fs::write(&c, "x").unwrap();
        std::fs::remove_file(&b).unwrap();
        let got = actions(&w.poll(8).unwrap());
        assert!(got.contains(&(s(&c), "CREATED".into())), "{got:?}");
        assert!(got.contains(&(s(&b), "DELETED".into())), "{got:?}");
    }

    /// A root that does not exist yet is watched once it does; bad `paths` are refused, naming
    /// what is wrong.
    #[test]
    fn missing_roots_are_watched_later_and_bad_paths_refused() {
        let dir = tempfile::tempdir().unwrap();
        let later = dir.path().join("later");
        let mut w = FileWatch::new(&params(&[("paths", later.to_str().unwrap())])).unwrap();
        assert!(w.poll(1).unwrap().is_empty());
        std::fs::create_dir(&later).unwrap();
        assert!(w.poll(2).unwrap().is_empty(), "watched from this poll on");
        std::fs::write(later.join("f"), "x").unwrap();
        let got = actions(&w.poll(3).unwrap());
        assert_eq!(got[0].1, "CREATED");
        let e = FileWatch::new(&params(&[("paths", "etc/passwd")]))
            .err()
            .unwrap();
        assert!(e.contains("not absolute"), "{e}");
        let e = FileWatch::new(&params(&[])).err().unwrap();
        assert!(e.contains("`paths`"), "{e}");
    }

    /// The bound on watches: a tree with more directories than it gets that many watches, no more.
    #[test]
    fn watches_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..(WATCHES_MAX + 10) {
            std::fs::create_dir(dir.path().join(format!("d{i}"))).unwrap();
        }
        let w = FileWatch::new(&params(&[
            ("paths", dir.path().to_str().unwrap()),
            ("recursive", "true"),
        ]))
        .unwrap();
        assert_eq!(w.watched.len(), WATCHES_MAX);
    }
}
