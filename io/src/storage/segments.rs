//! The filestore's segment log: how flow messages reach the shared volume in a few requests per
//! flush, not several per message (docs/architecture.md, "The filestore's segment log").
//!
//! A network filesystem charges a round trip per operation, and the client's kernel runs the
//! operations that add an entry to one directory one at a time (slowfs: 12.8 creates/s in one
//! directory). One file per message paid both: a temp file, a rename, directories per client and
//! per flow. Here each node appends every flush of its write-behind buffer to one data file and
//! one index file of its own, both in `segments/`:
//!
//! - `segments/<writer>-<n>.data`: a header, then records `[key len u32][value len u32][crc32 of
//!   lengths, key and value][key][value]`, grouped into *runs*: the consecutive records of one
//!   directory (one flow's messages) written by one flush, in key order, at most
//!   [`RUN_BYTES_MAX`] each (a larger message is a run of its own).
//! - `segments/<writer>-<n>.index`: a header, then one entry per run `[dir len u32][offset
//!   u64][len u64][crc32][dir]`: what an audit scans to find a flow's messages without reading
//!   the data.
//!
//! A flush is one append and one `fdatasync` to each file, the two files concurrently; the files
//! are created (atomically, directory synced) once per writer and rotation. Any failed append
//! rotates both files, so a torn write can only be a file's tail, which parsing stops at. Writers
//! never share a file: `<writer>` is unique per process start.
//!
//! Client event batches (directories `clients/<id>/events/<artifact>/<day>`) go to files of their
//! own per UTC day, `segments/events/<day>/<writer>-<n>.data` and `.index` (same formats): a
//! day's reader scans only that day's index files, and retention deletes a day as whole files
//! ([`delete_event_days_before`]). A flush holding flow messages and one day's events is two
//! appends to each pair of files, all four at once.
//!
//! Where a flow's messages are is recorded with its completion ([`RunRef`]s in the flow record),
//! so readers read a few ranges; the node that completes a flow knows the runs it wrote
//! ([`RunIndex`]) and learns the others' by an audit ([`locate`]). Messages written by older
//! versions, one file per message under the flow's `messages/` directory, stay readable: a run
//! may name such a file whole.

use super::volume::{SharedVolume, Volume, bounded};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use talon_core::paths::{self, validate_key};

/// The directory of every node's segment files, under the filestore's root.
pub const SEGMENTS_DIR: &str = "segments";
/// The directory of the event days' segment files, one directory per UTC day below it.
pub const EVENT_SEGMENTS_DIR: &str = "segments/events";
/// Event days whose files one writer keeps open at once (a flush rarely spans more than two:
/// around midnight, or batches an agent buffered for days); beyond it the oldest is closed.
const EVENT_DAYS_OPEN_MAX: usize = 4;

/// The segment directory holding the runs of `dir`: its day's for an event directory, else the
/// flows' (`segments`).
pub fn segments_dir_of(dir: &str) -> String {
    if paths::is_events_dir(dir)
        && let Some((_, day)) = dir.rsplit_once('/')
    {
        return format!("{EVENT_SEGMENTS_DIR}/{day}");
    }
    SEGMENTS_DIR.to_owned()
}
/// A run's largest size (bytes), unless one message is larger: what a reader holds of a run.
pub const RUN_BYTES_MAX: u64 = 4 << 20;
/// A data file is rotated once it holds this many bytes.
pub const DATA_FILE_BYTES_MAX: u64 = 1 << 30;

const DATA_HEADER: &[u8] = b"TALON-SEGMENT-DATA 1\n";
const INDEX_HEADER: &[u8] = b"TALON-SEGMENT-INDEX 1\n";
const RECORD_HEADER: usize = 12;
const ENTRY_HEADER: usize = 24;

/// Where some of a flow's messages are: a range of a segment data file holding consecutive
/// records of the flow's directory, or (`whole`) one message file of the old layout.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunRef {
    /// The data file's key (or the message file's, when `whole`).
    pub file: String,
    /// Where the run starts in it.
    pub offset: u64,
    /// Its length (bytes).
    pub len: u64,
    /// The name (last key component) of its first record.
    pub first: String,
    /// The name of its last record.
    pub last: String,
    /// The run is a whole file of the old one-file-per-message layout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
}

impl From<RunRef> for talon_proto::cluster::RunRef {
    fn from(r: RunRef) -> Self {
        talon_proto::cluster::RunRef {
            file: r.file,
            offset: r.offset,
            len: r.len,
            first: r.first,
            last: r.last,
            whole: r.whole,
        }
    }
}

impl RunRef {
    /// The run that is one message file `key` of the old layout.
    fn whole_file(key: String) -> RunRef {
        let name = split(&key).1.to_owned();
        RunRef {
            file: key,
            offset: 0,
            len: 0,
            first: name.clone(),
            last: name,
            whole: true,
        }
    }

    /// A run as replicated, checked: its file must be a valid filestore key (a segment data file,
    /// or a message file when `whole`).
    pub fn from_proto(r: talon_proto::cluster::RunRef) -> Result<RunRef, String> {
        validate_key(&r.file).map_err(|e| format!("run file {:?}: {e}", r.file))?;
        if !(r.whole || is_data_file(&r.file)) {
            return Err(format!("run file {:?} is not a segment data file", r.file));
        }
        Ok(RunRef {
            file: r.file,
            offset: r.offset,
            len: r.len,
            first: r.first,
            last: r.last,
            whole: r.whole,
        })
    }
}

/// One record read back: its key and value.
pub type Record = (String, Bytes);

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn put_record(buf: &mut BytesMut, key: &str, value: &[u8]) {
    let (kl, vl) = (key.len() as u32, value.len() as u32);
    let sum = crc(&[&kl.to_le_bytes(), &vl.to_le_bytes(), key.as_bytes(), value]);
    buf.put_u32_le(kl);
    buf.put_u32_le(vl);
    buf.put_u32_le(sum);
    buf.put_slice(key.as_bytes());
    buf.put_slice(value);
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The records at the start of `bytes`, up to the first that is torn or corrupt (a key that is not
/// a valid filestore key counts as corrupt). Returns them and the bytes they span.
pub fn parse_records(bytes: &Bytes) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= RECORD_HEADER {
        let (kl, vl) = (u32_at(bytes, at) as usize, u32_at(bytes, at + 4) as usize);
        let sum = u32_at(bytes, at + 8);
        let end = at + RECORD_HEADER + kl + vl;
        if kl == 0 || end > bytes.len() {
            break;
        }
        let key = &bytes[at + RECORD_HEADER..at + RECORD_HEADER + kl];
        let value = bytes.slice(at + RECORD_HEADER + kl..end);
        if crc(&[&bytes[at..at + 8], key, &value]) != sum {
            break;
        }
        let Ok(key) = std::str::from_utf8(key) else {
            break;
        };
        if validate_key(key).is_err() {
            break;
        }
        out.push((key.to_owned(), value));
        at = end;
    }
    (out, at)
}

/// One index entry: a run of `dir` in a data file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The directory whose records the run holds.
    pub dir: String,
    /// Where the run starts in the data file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

fn put_entry(buf: &mut BytesMut, e: &IndexEntry) {
    let dl = e.dir.len() as u32;
    let sum = crc(&[
        &dl.to_le_bytes(),
        &e.offset.to_le_bytes(),
        &e.len.to_le_bytes(),
        e.dir.as_bytes(),
    ]);
    buf.put_u32_le(dl);
    buf.put_u64_le(e.offset);
    buf.put_u64_le(e.len);
    buf.put_u32_le(sum);
    buf.put_slice(e.dir.as_bytes());
}

/// The entries of an index file's contents (header included), up to a torn or corrupt one.
pub fn parse_index(bytes: &[u8]) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    if !bytes.starts_with(INDEX_HEADER) {
        return out;
    }
    let mut at = INDEX_HEADER.len();
    while bytes.len() - at >= ENTRY_HEADER {
        let dl = u32_at(bytes, at) as usize;
        let (offset, len) = (u64_at(bytes, at + 4), u64_at(bytes, at + 12));
        let sum = u32_at(bytes, at + 20);
        let end = at + ENTRY_HEADER + dl;
        if end > bytes.len() {
            break;
        }
        let dir = &bytes[at + ENTRY_HEADER..end];
        if crc(&[&bytes[at..at + 20], dir]) != sum {
            break;
        }
        let Ok(dir) = std::str::from_utf8(dir) else {
            break;
        };
        out.push(IndexEntry {
            dir: dir.to_owned(),
            offset,
            len,
        });
        at = end;
    }
    out
}

/// A data file holding `runs` (each a directory's records), and its index file: what a writer
/// appends, in one piece (for tools and the checkers' tests).
pub fn encode_files(runs: &[Vec<Record>]) -> (Bytes, Bytes) {
    let mut data = BytesMut::from(DATA_HEADER);
    let mut index = BytesMut::from(INDEX_HEADER);
    for run in runs {
        let offset = data.len() as u64;
        for (k, v) in run {
            put_record(&mut data, k, v);
        }
        let dir = run.first().map_or("", |(k, _)| split(k).0).to_owned();
        let len = data.len() as u64 - offset;
        put_entry(&mut index, &IndexEntry { dir, offset, len });
    }
    (data.freeze(), index.freeze())
}

/// The data file an index file describes.
pub fn data_file_of(index_file: &str) -> Option<String> {
    Some(format!("{}.data", index_file.strip_suffix(".index")?))
}

/// A key's directory and name.
fn split(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or(("", key))
}

/// The flow messages a node wrote or learned, by directory, kept until the flow completes: which
/// runs hold them, and which sequence numbers (message names are zero-padded numbers) they cover.
/// Bounded: beyond `dirs_max` directories the one updated longest ago is forgotten, and a flow
/// whose runs are not all known is located again by an audit ([`locate`]).
#[derive(Debug)]
pub struct RunIndex {
    dirs: BTreeMap<String, Known>,
    /// Directories by their last update (a counter), oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    dirs_max: usize,
}

#[derive(Debug, Default)]
struct Known {
    runs: Vec<RunRef>,
    /// Covered sequence numbers as half-open ranges: start → end.
    seqs: BTreeMap<u64, u64>,
    tick: u64,
}

impl Known {
    fn add_seq(&mut self, seq: u64) {
        let (mut start, mut end) = (seq, seq + 1);
        if let Some((&s, &e)) = self.seqs.range(..=seq).next_back()
            && e >= seq
        {
            if e > seq {
                return; // Already covered.
            }
            start = s;
        }
        if let Some(&e) = self.seqs.get(&end) {
            self.seqs.remove(&end);
            end = e;
        }
        self.seqs.insert(start, end);
    }

    fn covers(&self, n: u64) -> bool {
        n == 0 || self.seqs.get(&0).is_some_and(|&e| e >= n)
    }
}

impl RunIndex {
    /// An empty index of at most `dirs_max` directories (at least 1).
    pub fn new(dirs_max: usize) -> RunIndex {
        RunIndex {
            dirs: BTreeMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            dirs_max: dirs_max.max(1),
        }
    }

    /// Records that `run` of `dir` holds the messages named `names`.
    pub fn record<'a>(&mut self, dir: &str, run: RunRef, names: impl Iterator<Item = &'a str>) {
        self.tick += 1;
        let tick = self.tick;
        let known = self.dirs.entry(dir.to_owned()).or_default();
        self.order.remove(&known.tick);
        known.tick = tick;
        self.order.insert(tick, dir.to_owned());
        if !known.runs.contains(&run) {
            known.runs.push(run);
        }
        for name in names {
            if let Ok(seq) = name.parse::<u64>() {
                known.add_seq(seq);
            }
        }
        while self.dirs.len() > self.dirs_max {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.dirs.remove(&oldest);
        }
    }

    /// The runs of `dir` if they cover messages `0..n`, in the order recorded.
    pub fn covering(&self, dir: &str, n: u64) -> Option<Vec<RunRef>> {
        let known = self.dirs.get(dir)?;
        known.covers(n).then(|| known.runs.clone())
    }

    /// Forgets `dir`.
    pub fn forget(&mut self, dir: &str) {
        if let Some(k) = self.dirs.remove(dir) {
            self.order.remove(&k.tick);
        }
    }

    /// Directories known.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// True if none is known.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

/// The write side: one writer's data and index files. It is the [`Volume`] the filestore's
/// write-behind buffer flushes to: `write_many` appends a flush as runs; nothing else is
/// supported (the buffer only writes).
pub struct SegmentLog {
    volume: SharedVolume,
    writer: String,
    file_bytes_max: u64,
    state: tokio::sync::Mutex<LogFiles>,
    runs: std::sync::Mutex<RunIndex>,
}

/// The open files of each segment directory written to (`segments`, and event days).
#[derive(Debug, Default)]
struct LogFiles {
    by_dir: BTreeMap<String, LogState>,
    /// Event days in the order they were last written (oldest first).
    days: VecDeque<String>,
}

#[derive(Debug, Default)]
struct LogState {
    /// The current files' number.
    file: u64,
    /// The data file's length as written by us.
    data_len: u64,
    /// False before the first flush and after a failed one: the next flush starts new files.
    open: bool,
}

impl SegmentLog {
    /// The log of `writer` (a name unique to this process start, made of `[0-9A-Za-z._-]`) on
    /// `volume`, remembering the runs of at most `dirs_max` flows.
    pub fn new(volume: SharedVolume, writer: &str, dirs_max: usize) -> io::Result<SegmentLog> {
        validate_key(writer)
            .ok()
            .filter(|()| !writer.contains('/'))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("segment writer name {writer:?} is not one safe path component"),
                )
            })?;
        Ok(SegmentLog {
            volume,
            writer: writer.to_owned(),
            file_bytes_max: DATA_FILE_BYTES_MAX,
            state: tokio::sync::Mutex::new(LogFiles::default()),
            runs: std::sync::Mutex::new(RunIndex::new(dirs_max)),
        })
    }

    /// The same log rotating its data file at `bytes` (tests and the simulator use small files).
    pub fn with_file_bytes_max(mut self, bytes: u64) -> SegmentLog {
        self.file_bytes_max = bytes.max(1);
        self
    }

    fn files(&self, seg_dir: &str, n: u64) -> (String, String) {
        let base = format!("{seg_dir}/{}-{n:06}", self.writer);
        (format!("{base}.data"), format!("{base}.index"))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, RunIndex> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records runs learned elsewhere (an audit) for `dir`.
    pub fn learn(&self, dir: &str, runs: &[(RunRef, Vec<String>)]) {
        let mut index = self.index();
        for (run, names) in runs {
            index.record(dir, run.clone(), names.iter().map(String::as_str));
        }
    }

    /// The runs of `dir` if this node knows them all for messages `0..n` (kept until
    /// [`SegmentLog::forget`]).
    pub fn runs_covering(&self, dir: &str, n: u64) -> Option<Vec<RunRef>> {
        self.index().covering(dir, n)
    }

    /// Forgets what it knows of `dir`.
    pub fn forget(&self, dir: &str) {
        self.index().forget(dir);
    }

    /// Creates the data and index files the next flush appends to, unless they exist. A node calls
    /// it as it starts ([`SegmentLog::prepare`]): on a network filesystem creating the two files
    /// costs several round trips in one directory (about 1.5 s on slowfs, measured), which the
    /// first flush of a hunt's results would otherwise wait for.
    async fn ensure_open(&self, seg_dir: &str, st: &mut LogState) -> io::Result<()> {
        if st.open
            && !(st.data_len > DATA_HEADER.len() as u64 && st.data_len >= self.file_bytes_max)
        {
            return Ok(());
        }
        let next = st.file + 1;
        let (d, i) = self.files(seg_dir, next);
        let made = bounded(
            2,
            vec![
                self.volume.write(&d, Bytes::from_static(DATA_HEADER)),
                self.volume.write(&i, Bytes::from_static(INDEX_HEADER)),
            ],
        )
        .await;
        made.into_iter().collect::<io::Result<()>>()?;
        *st = LogState {
            file: next,
            data_len: DATA_HEADER.len() as u64,
            open: true,
        };
        Ok(())
    }

    /// Creates the files the first flush appends to now rather than then (see `ensure_open`); a
    /// failure is left for that flush to meet and retry.
    /// With `event_day`, that UTC day's event files too (a node starting: today's), so the first
    /// flush of events does not wait for them either.
    pub async fn prepare(&self, event_day: Option<&str>) -> io::Result<()> {
        let mut files = self.state.lock().await;
        let st = files.by_dir.entry(SEGMENTS_DIR.to_owned()).or_default();
        self.ensure_open(SEGMENTS_DIR, st).await?;
        if let Some(day) = event_day {
            let dir = format!("{EVENT_SEGMENTS_DIR}/{day}");
            files.days.push_back(dir.clone());
            let st = files.by_dir.entry(dir.clone()).or_default();
            self.ensure_open(&dir, st).await?;
        }
        Ok(())
    }

    async fn append(&self, writes: BTreeMap<String, Bytes>) -> io::Result<()> {
        // Per segment directory, the runs: consecutive records of one directory, each at most
        // RUN_BYTES_MAX.
        type Runs = Vec<(String, u64, u64, Vec<String>)>;
        let mut groups: BTreeMap<String, (BytesMut, Runs)> = BTreeMap::new();
        for (key, value) in &writes {
            let (dir, name) = split(key);
            let (data, runs) = groups.entry(segments_dir_of(dir)).or_default();
            let start = data.len() as u64;
            put_record(data, key, value);
            let len = data.len() as u64 - start;
            match runs.last_mut() {
                Some((d, _, l, names)) if d == dir && *l + len <= RUN_BYTES_MAX => {
                    *l += len;
                    names.push(name.to_owned());
                }
                _ => runs.push((dir.to_owned(), start, len, vec![name.to_owned()])),
            }
        }
        let mut files = self.state.lock().await;
        // Open (or rotate) each group's files, then append to all of them at once.
        let mut jobs: Vec<(String, Bytes)> = Vec::new();
        let mut placed: Vec<(String, String, u64, Runs)> = Vec::new();
        for (seg_dir, (data, runs)) in groups {
            if seg_dir != SEGMENTS_DIR {
                files.days.retain(|d| *d != seg_dir);
                files.days.push_back(seg_dir.clone());
                while files.days.len() > EVENT_DAYS_OPEN_MAX {
                    if let Some(old) = files.days.pop_front() {
                        files.by_dir.remove(&old);
                    }
                }
            }
            let st = files.by_dir.entry(seg_dir.clone()).or_default();
            if let Err(e) = self.ensure_open(&seg_dir, st).await {
                // The groups placed before this one counted bytes not written: new files.
                for (placed_dir, ..) in &placed {
                    if let Some(st) = files.by_dir.get_mut(placed_dir) {
                        st.open = false;
                    }
                }
                return Err(e);
            }
            let base = st.data_len;
            let mut index = BytesMut::new();
            for (dir, off, len, _) in &runs {
                put_entry(
                    &mut index,
                    &IndexEntry {
                        dir: dir.clone(),
                        offset: base + off,
                        len: *len,
                    },
                );
            }
            let (d, i) = self.files(&seg_dir, st.file);
            // Both ends logged: the lines' times give a flush's duration (profiling on a mount).
            tracing::debug!(file = %d, runs = runs.len(), bytes = data.len(), "segment append starts");
            st.data_len += data.len() as u64;
            jobs.push((d.clone(), data.freeze()));
            jobs.push((i, index.freeze()));
            placed.push((seg_dir, d, base, runs));
        }
        let appends = jobs
            .iter()
            .map(|(k, b)| self.volume.append_synced(k, b.clone()))
            .collect();
        let done = bounded(jobs.len(), appends).await;
        if let Err(e) = done.into_iter().collect::<io::Result<()>>() {
            // Any file may now end in a torn write: every group continues in new ones.
            for (seg_dir, ..) in &placed {
                if let Some(st) = files.by_dir.get_mut(seg_dir) {
                    st.open = false;
                }
            }
            return Err(e);
        }
        drop(files);
        let mut known = self.index();
        for (_, d, base, runs) in placed {
            tracing::debug!(file = %d, "segment append done");
            for (dir, off, rl, names) in runs {
                if paths::is_events_dir(&dir) {
                    // Never completed, so never located: remembering its runs would only grow.
                    continue;
                }
                let run = RunRef {
                    file: d.clone(),
                    offset: base + off,
                    len: rl,
                    first: names.first().cloned().unwrap_or_default(),
                    last: names.last().cloned().unwrap_or_default(),
                    whole: false,
                };
                known.record(&dir, run, names.iter().map(String::as_str));
            }
        }
        Ok(())
    }
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("the segment log only appends flushes ({what})"),
    )
}

impl Volume for SegmentLog {
    async fn read(&self, _key: &str) -> io::Result<Option<Bytes>> {
        Err(unsupported("read"))
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        self.write_many(vec![(key.to_owned(), Some(value))]).await
    }
    async fn delete(&self, _key: &str) -> io::Result<()> {
        Err(unsupported("delete"))
    }
    async fn list(&self, _prefix: &str) -> io::Result<Vec<String>> {
        Err(unsupported("list"))
    }
    async fn append(&self, _key: &str, _data: Bytes) -> io::Result<()> {
        Err(unsupported("append"))
    }
    async fn commit(&self, _from: &str, _to: &str) -> io::Result<()> {
        Err(unsupported("commit"))
    }
    /// Appends the writes as runs (a key written twice keeps its last value); durable on `Ok`.
    async fn write_many(&self, writes: Vec<(String, Option<Bytes>)>) -> io::Result<()> {
        let mut last = BTreeMap::new();
        for (k, v) in writes {
            validate_key(&k)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{k}: {e}")))?;
            let v = v.ok_or_else(|| unsupported("delete"))?;
            last.insert(k, v);
        }
        if last.is_empty() {
            return Ok(());
        }
        self.append(last).await
    }
}

/// Reads one run: its records of `dir`, in key order. A segment run that does not parse whole is
/// an error (`InvalidData`): a run is recorded only once its flush is durable.
pub async fn read_run<V: Volume>(volume: &V, dir: &str, run: &RunRef) -> io::Result<Vec<Record>> {
    if run.whole {
        return Ok(match volume.read(&run.file).await? {
            Some(b) if split(&run.file).0 == dir => vec![(run.file.clone(), b)],
            _ => vec![],
        });
    }
    let bytes = volume
        .read_range(&run.file, run.offset, run.len)
        .await?
        .unwrap_or_default();
    let (records, used) = parse_records(&bytes);
    if used as u64 != run.len || records.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} at {}: {} of {} bytes parse as records",
                run.file, run.offset, used, run.len
            ),
        ));
    }
    Ok(records
        .into_iter()
        .filter(|(k, _)| split(k).0 == dir)
        .collect())
}

/// Deletes the event segment files of every UTC day before `day` (`YYYY-MM-DD`): each day's
/// directory is whole files of that day's batches only, so a day goes as a listing and a delete
/// per file, whatever else the volume holds. Answers the days deleted (a day whose files could not
/// all be deleted is an error, and is tried again by the next call).
pub async fn delete_event_days_before<V: Volume>(volume: &V, day: &str) -> io::Result<Vec<String>> {
    let prefix = format!("{EVENT_SEGMENTS_DIR}/");
    let keys = volume.list_within(&prefix, Some(2)).await?;
    let mut by_day: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in keys {
        if let Some((d, _)) = k.strip_prefix(&prefix).and_then(|r| r.split_once('/'))
            && talon_core::events::valid_day(d)
            && d < day
        {
            by_day.entry(d.to_owned()).or_default().push(k);
        }
    }
    let mut gone = Vec::new();
    for (d, files) in by_day {
        for chunk in files.chunks(super::volume::VOLUME_CONCURRENCY) {
            let done = bounded(
                chunk.len(),
                chunk.iter().map(|k| volume.delete(k)).collect(),
            )
            .await;
            done.into_iter().collect::<io::Result<()>>()?;
        }
        gone.push(d);
    }
    Ok(gone)
}

/// The runs every writer's index files name for `dir`, unread (their first and last names are
/// unknown until read: [`read_run`]). Costs a read of every index file of `dir`'s segment
/// directory ([`segments_dir_of`]: the flows', or the event day's), at most `VOLUME_CONCURRENCY`
/// of them in memory at once (only `dir`'s entries stay).
pub async fn index_runs<V: Volume>(volume: &V, dir: &str) -> io::Result<Vec<RunRef>> {
    Ok(
        index_runs_where(volume, &segments_dir_of(dir), &|d| d == dir)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect(),
    )
}

/// The runs the index files of segment directory `seg_dir` (not below it) name for the
/// directories `wanted` accepts, with their directory, unread: one pass over the index files for
/// any number of directories (a search of every client's day). As [`index_runs`] otherwise.
pub async fn index_runs_where<V: Volume>(
    volume: &V,
    seg_dir: &str,
    wanted: &(dyn Fn(&str) -> bool + Sync),
) -> io::Result<Vec<(String, RunRef)>> {
    let indexes: Vec<String> = volume
        .list_within(&format!("{seg_dir}/"), Some(1))
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".index"))
        .collect();
    let mut runs = Vec::new();
    for chunk in indexes.chunks(super::volume::VOLUME_CONCURRENCY) {
        let read = bounded(chunk.len(), chunk.iter().map(|k| volume.read(k)).collect()).await;
        for (k, r) in chunk.iter().zip(read) {
            let (Some(bytes), Some(data)) = (r?, data_file_of(k)) else {
                continue;
            };
            runs.extend(
                parse_index(&bytes)
                    .into_iter()
                    .filter(|e| wanted(&e.dir))
                    .map(|e| {
                        let run = RunRef {
                            file: data.clone(),
                            offset: e.offset,
                            len: e.len,
                            first: String::new(),
                            last: String::new(),
                            whole: false,
                        };
                        (e.dir, run)
                    }),
            );
        }
    }
    Ok(runs)
}

/// Finds every stored message of `dir` on the volume (an audit): the message files of the old
/// layout, and the runs every writer's index files name, read and checked (a run that does not
/// parse, left by a failed flush, is skipped). Returns the runs with the names each holds, and the
/// messages in key order (a message stored twice once). Costs a read of every index file.
pub async fn locate<V: Volume>(
    volume: &V,
    dir: &str,
) -> io::Result<(Vec<(RunRef, Vec<String>)>, Vec<Record>)> {
    let mut runs = Vec::new();
    let mut found: BTreeMap<String, Bytes> = BTreeMap::new();
    let old: Vec<String> = volume
        .list(&format!("{dir}/"))
        .await?
        .into_iter()
        .filter(|k| split(k).0 == dir)
        .collect();
    let read = bounded(
        super::volume::VOLUME_CONCURRENCY,
        old.iter().map(|k| volume.read(k)).collect(),
    )
    .await;
    for (key, r) in old.into_iter().zip(read) {
        let Some(b) = r? else { continue };
        let mut run = RunRef::whole_file(key.clone());
        run.len = b.len() as u64;
        let name = run.first.clone();
        runs.push((run, vec![name]));
        found.insert(key, b);
    }
    let wanted = index_runs(volume, dir).await?;
    let reads = bounded(
        super::volume::VOLUME_CONCURRENCY,
        wanted
            .iter()
            .map(|r| volume.read_range(&r.file, r.offset, r.len))
            .collect(),
    )
    .await;
    for (mut run, r) in wanted.into_iter().zip(reads) {
        let bytes = r?.unwrap_or_default();
        let (records, used) = parse_records(&bytes);
        if used as u64 != run.len || records.iter().any(|(k, _)| split(k).0 != dir) {
            continue; // A failed flush's run: its messages were written again elsewhere.
        }
        let names: Vec<String> = records.iter().map(|(k, _)| split(k).1.to_owned()).collect();
        run.first = names.first().cloned().unwrap_or_default();
        run.last = names.last().cloned().unwrap_or_default();
        runs.push((run, names));
        for (k, v) in records {
            found.entry(k).or_insert(v);
        }
    }
    Ok((runs, found.into_iter().collect()))
}

/// Reads a flow's messages from `runs` in key order, one run at a time where runs do not overlap
/// (memory: the runs overlapping the next key, each at most [`RUN_BYTES_MAX`] or one message). A
/// message in two runs (written twice) is returned once. `runs` empty: the flow predates the
/// segment log, and its directory is listed.
pub struct MessageReader<'a, V> {
    volume: &'a V,
    dir: String,
    /// Runs not yet read, by first name.
    pending: VecDeque<RunRef>,
    /// Records read, by key.
    loaded: BTreeMap<String, Bytes>,
    last: Option<String>,
}

impl<'a, V: Volume> MessageReader<'a, V> {
    /// Reads `dir`'s messages from `runs`, or from its listing if there are none.
    pub async fn new(volume: &'a V, dir: &str, runs: &[RunRef]) -> io::Result<Self> {
        let mut runs = runs.to_vec();
        if runs.is_empty() {
            runs = volume
                .list(&format!("{dir}/"))
                .await?
                .into_iter()
                .filter(|k| split(k).0 == dir)
                .map(RunRef::whole_file)
                .collect();
        }
        runs.sort_by(|a, b| a.first.cmp(&b.first));
        Ok(MessageReader {
            volume,
            dir: dir.to_owned(),
            pending: runs.into(),
            loaded: BTreeMap::new(),
            last: None,
        })
    }

    /// The next message (key, value) in key order; `None` at the end.
    pub async fn next(&mut self) -> io::Result<Option<Record>> {
        loop {
            // Load every run that may hold a key at or before the smallest loaded one.
            let mut batch = Vec::new();
            while let Some(r) = self.pending.front() {
                let smallest = self.loaded.keys().next().map(|k| split(k).1);
                if smallest.is_some_and(|s| r.first.as_str() > s) {
                    break;
                }
                batch.push(self.pending.pop_front().expect("front exists"));
                if smallest.is_none() {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            let read = bounded(
                batch.len(),
                batch
                    .iter()
                    .map(|r| read_run(self.volume, &self.dir, r))
                    .collect(),
            )
            .await;
            for records in read {
                for (k, v) in records? {
                    if self.last.as_ref().is_none_or(|l| &k > l) {
                        self.loaded.entry(k).or_insert(v);
                    }
                }
            }
        }
        let Some((k, v)) = self.loaded.pop_first() else {
            return Ok(None);
        };
        self.last = Some(k.clone());
        Ok(Some((k, v)))
    }
}

/// Bytes [`BlockCache`] reads at once from a data file (aligned).
pub const CACHE_BLOCK_BYTES: u64 = 1 << 20;

/// Reads of segment data files in aligned blocks shared by the readers of one request (`hunt
/// results`): the flows of a hunt completed together, so their runs lie side by side in a few
/// data files, and a network volume serves one large read about as fast as one small one. Holds at
/// most `blocks_max` blocks (the oldest loaded goes); concurrent readers of a block wait for one
/// read. Data files are append-only and never rewritten, so a block never changes; one read short
/// of a block (the file's end then) is read again when a run reaches past it. Other keys, and
/// everything else, go straight to the volume.
pub struct BlockCache<V> {
    inner: V,
    blocks_max: usize,
    state: std::sync::Mutex<CacheState>,
}

type Block = std::sync::Arc<tokio::sync::OnceCell<Bytes>>;

#[derive(Default)]
struct CacheState {
    blocks: std::collections::HashMap<(String, u64), Block>,
    order: VecDeque<(String, u64)>,
}

impl<V: Volume> BlockCache<V> {
    /// A cache of at most `blocks_max` blocks (at least 1) in front of `inner`.
    pub fn new(inner: V, blocks_max: usize) -> Self {
        BlockCache {
            inner,
            blocks_max: blocks_max.max(1),
            state: std::sync::Mutex::default(),
        }
    }

    fn cell(&self, file: &str, n: u64, fresh: bool) -> Block {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = (file.to_owned(), n);
        if !fresh && let Some(b) = st.blocks.get(&key) {
            return b.clone();
        }
        let b = Block::default();
        if st.blocks.insert(key.clone(), b.clone()).is_none() {
            st.order.push_back(key);
        }
        while st.blocks.len() > self.blocks_max {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            st.blocks.remove(&old);
        }
        b
    }

    /// Block `n` of `file`, holding at least `need` bytes if the file does (read again if a
    /// cached one is shorter).
    async fn block(&self, file: &str, n: u64, need: u64) -> io::Result<Bytes> {
        let load = |cell: Block| async move {
            cell.get_or_try_init(|| async {
                Ok::<_, io::Error>(
                    self.inner
                        .read_range(file, n * CACHE_BLOCK_BYTES, CACHE_BLOCK_BYTES)
                        .await?
                        .unwrap_or_default(),
                )
            })
            .await
            .cloned()
        };
        let b = load(self.cell(file, n, false)).await?;
        if (b.len() as u64) < need {
            return load(self.cell(file, n, true)).await;
        }
        Ok(b)
    }

    /// The cached blocks (for tests of the bound).
    pub fn cached(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocks
            .len()
    }
}

fn is_data_file(key: &str) -> bool {
    key.starts_with(&format!("{SEGMENTS_DIR}/")) && key.ends_with(".data")
}

impl<V: Volume> Volume for BlockCache<V> {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.inner.read(key).await
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        self.inner.write(key, value).await
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.inner.list(prefix).await
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.inner.append(key, data).await
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.commit(from, to).await
    }
    async fn append_synced(&self, key: &str, data: Bytes) -> io::Result<()> {
        self.inner.append_synced(key, data).await
    }
    async fn read_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        if !is_data_file(key) || len == 0 {
            return self.inner.read_range(key, offset, len).await;
        }
        let end = offset.saturating_add(len);
        let (first, last) = (offset / CACHE_BLOCK_BYTES, (end - 1) / CACHE_BLOCK_BYTES);
        let blocks = bounded(
            super::volume::VOLUME_CONCURRENCY,
            (first..=last)
                .map(|n| {
                    let need = (end - n * CACHE_BLOCK_BYTES).min(CACHE_BLOCK_BYTES);
                    self.block(key, n, need)
                })
                .collect(),
        )
        .await;
        let mut out = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        for (n, b) in (first..=last).zip(blocks) {
            let b = b?;
            let base = n * CACHE_BLOCK_BYTES;
            let from = offset.saturating_sub(base).min(b.len() as u64) as usize;
            let to = (end - base).min(b.len() as u64) as usize;
            out.extend_from_slice(&b[from..to]);
            if (b.len() as u64) < CACHE_BLOCK_BYTES {
                break; // The file ends here.
            }
        }
        Ok(Some(out.freeze()))
    }
}

#[cfg(test)]
mod tests;
