//! The agent's event buffer on its local disk (docs/events.md, "The agent's buffer"): every event
//! batch is written here when it is made, before it is sent, and its file is deleted once every
//! batch in it is settled. An agent that restarts — killed, upgraded, the machine rebooted after a
//! clean shutdown — reads what is left and sends it again under the same stream and numbers, so
//! the frontend stores each batch once (a resend writes the same name). A crash of the machine
//! itself can lose what the kernel had not yet written (no fsync per batch: it would cost a disk
//! flush per artifact per second on every endpoint).
//!
//! Layout: one directory per agent (next to its writeback file), one *segment* file per stream
//! and run of batches, named `<stream>-<first seq>.seg` (hex). A segment is records of
//! `[u32 length][u32 crc32][EventBatch]`, little-endian; a torn last record (the agent killed in a
//! write) is cut off when the directory is opened. A stream's current segment takes batches until
//! it holds [`SEGMENT_BYTES`]; segments are deleted oldest first, once each batch in them is
//! settled, so what is left of a stream is always one unbroken run of numbers.
//!
//! Bounded: the segments together hold at most the agent's `Client.events_buffer_bytes`; a batch
//! beyond it is not written, and the caller drops and counts it.

use prost::Message;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use talon_proto::comms::EventBatch;

/// A stream's current segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// The default bound on the buffer (`Client.events_buffer_bytes`).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// A record's header: length and crc32.
const HEADER: u64 = 8;
/// A record larger than this is taken as damage (a batch is at most 1 MiB of rows).
const RECORD_MAX: u32 = 4 << 20;

/// Where one batch is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    stream: u64,
    first: u64,
    offset: u64,
    len: u32,
}

/// Why a batch was not written.
#[derive(Debug, PartialEq, Eq)]
pub enum SpoolError {
    /// The buffer holds `max` bytes.
    Full {
        /// The bound.
        max: u64,
    },
    /// The disk refused (named).
    Io(String),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full { max } => write!(f, "the event buffer holds its {max} bytes"),
            SpoolError::Io(e) => f.write_str(e),
        }
    }
}

struct Segment {
    file: File,
    bytes: u64,
    /// Batches in it not yet settled.
    unsettled: usize,
    /// Its last batch's number.
    last: u64,
    /// Still taking batches.
    current: bool,
}

/// A stream found on disk when the buffer was opened: its batches not known to be settled, in
/// order of number (an unbroken run).
#[derive(Debug)]
pub struct Recovered {
    /// The event artifact.
    pub artifact: String,
    /// The stream.
    pub stream: u64,
    /// Each batch's number and place.
    pub batches: Vec<(u64, Loc)>,
}

/// The buffer.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    bytes: u64,
    /// Per stream, its segments by first number.
    streams: BTreeMap<u64, BTreeMap<u64, Segment>>,
}

fn seg_name(stream: u64, first: u64) -> String {
    format!("{stream:016x}-{first:016x}.seg")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (s, f) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(f, 16).ok()?,
    ))
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

impl Spool {
    /// Opens (creating) the buffer in `dir`, bounded to `max_bytes`; answers the streams it holds.
    /// A damaged record ends its segment there (the rest is cut off and logged).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Vec<Recovered>), String> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut names: Vec<(u64, u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_name(&name) {
                Some((stream, first)) => names.push((stream, first, entry.path())),
                None => {
                    tracing::warn!(file = %entry.path().display(), "not an event buffer segment; left alone")
                }
            }
        }
        names.sort();
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            bytes: 0,
            streams: BTreeMap::new(),
        };
        let mut found: BTreeMap<u64, Recovered> = BTreeMap::new();
        for (stream, first, path) in names {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            let mut data = Vec::new();
            file.read_to_end(&mut data).map_err(|e| io_err(&path, e))?;
            let (records, good) = parse_records(&data);
            if good < data.len() as u64 {
                tracing::warn!(file = %path.display(), cut = data.len() as u64 - good, "a torn record at the end of an event buffer segment is cut off");
                file.set_len(good).map_err(|e| io_err(&path, e))?;
            }
            let rec = found.entry(stream).or_insert_with(|| Recovered {
                artifact: String::new(),
                stream,
                batches: Vec::new(),
            });
            let mut last = first;
            let mut n = 0;
            for (offset, len, batch) in records {
                // Segments of a stream follow on one another: a number out of turn is damage.
                let want = rec.batches.last().map_or(batch.seq, |(s, _)| s + 1);
                if batch.seq != want || batch.stream != stream {
                    tracing::warn!(file = %path.display(), seq = batch.seq, "an event buffer record out of turn is skipped");
                    continue;
                }
                rec.artifact = batch.artifact;
                let loc = Loc {
                    stream,
                    first,
                    offset,
                    len,
                };
                rec.batches.push((batch.seq, loc));
                last = batch.seq;
                n += 1;
            }
            if n == 0 {
                // Nothing usable: no batch of it can be wanted.
                drop(file);
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                continue;
            }
            spool.bytes += good;
            spool.streams.entry(stream).or_default().insert(
                first,
                Segment {
                    file,
                    bytes: good,
                    unsettled: n,
                    last,
                    current: false,
                },
            );
        }
        let recovered = found
            .into_values()
            .filter(|r| !r.batches.is_empty())
            .collect();
        Ok((spool, recovered))
    }

    /// Bytes the segments hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Writes `batch` (numbered: `batch.seq` is the one after the stream's last) at the end of
    /// its stream's current segment, starting a new one when that is full.
    pub fn append(&mut self, batch: &EventBatch) -> Result<Loc, SpoolError> {
        let body = batch.encode_to_vec();
        let size = HEADER + body.len() as u64;
        if self.bytes + size > self.max_bytes {
            return Err(SpoolError::Full {
                max: self.max_bytes,
            });
        }
        let stream = batch.stream;
        let segs = self.streams.entry(stream).or_default();
        let open = segs
            .iter()
            .next_back()
            .filter(|(_, s)| s.current && s.bytes < SEGMENT_BYTES)
            .map(|(f, _)| *f);
        let first = match open {
            Some(f) => f,
            None => {
                if let Some((_, s)) = segs.iter_mut().next_back() {
                    s.current = false;
                }
                let path = self.dir.join(seg_name(stream, batch.seq));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| SpoolError::Io(io_err(&path, e)))?;
                segs.insert(
                    batch.seq,
                    Segment {
                        file,
                        bytes: 0,
                        unsettled: 0,
                        last: batch.seq,
                        current: true,
                    },
                );
                batch.seq
            }
        };
        let seg = segs.get_mut(&first).expect("the segment just found");
        let mut rec = Vec::with_capacity(size as usize);
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        let offset = seg.bytes;
        let path = self.dir.join(seg_name(stream, first));
        seg.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| seg.file.write_all(&rec))
            .map_err(|e| SpoolError::Io(io_err(&path, e)))?;
        seg.bytes += size;
        seg.unsettled += 1;
        seg.last = batch.seq;
        self.bytes += size;
        Ok(Loc {
            stream,
            first,
            offset: offset + HEADER,
            len: body.len() as u32,
        })
    }

    /// Reads back the batch at `loc`.
    pub fn read(&self, loc: Loc) -> Result<EventBatch, String> {
        let path = self.dir.join(seg_name(loc.stream, loc.first));
        let seg = self
            .streams
            .get(&loc.stream)
            .and_then(|s| s.get(&loc.first))
            .ok_or_else(|| format!("{}: the segment is gone", path.display()))?;
        let mut body = vec![0u8; loc.len as usize];
        seg.file
            .read_exact_at(&mut body, loc.offset)
            .map_err(|e| io_err(&path, e))?;
        EventBatch::decode(body.as_slice()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Batch `seq` of `stream` is settled: segments whose every batch is settled go, oldest first
    /// (the current one too, once full).
    pub fn settled(&mut self, stream: u64, seq: u64) {
        let Some(segs) = self.streams.get_mut(&stream) else {
            return;
        };
        if let Some((_, seg)) = segs.range_mut(..=seq).next_back()
            && seq <= seg.last
        {
            seg.unsettled = seg.unsettled.saturating_sub(1);
        }
        while let Some(entry) = segs.first_entry() {
            let s = entry.get();
            if s.unsettled > 0 || (s.current && s.bytes < SEGMENT_BYTES) {
                break;
            }
            let first = *entry.key();
            let gone = entry.remove();
            self.bytes -= gone.bytes;
            let path = self.dir.join(seg_name(stream, first));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a settled event buffer segment");
            }
        }
        if segs.is_empty() {
            self.streams.remove(&stream);
        }
    }

    /// Deletes every segment of `stream` (its artifact no longer runs here).
    pub fn forget(&mut self, stream: u64) {
        for (first, seg) in self.streams.remove(&stream).unwrap_or_default() {
            self.bytes -= seg.bytes;
            let path = self.dir.join(seg_name(stream, first));
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete an event buffer segment");
            }
        }
    }
}

/// The whole records at the start of `data` (offset of the body, its length, the batch) and
/// where they end.
fn parse_records(data: &[u8]) -> (Vec<(u64, u32, EventBatch)>, u64) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while data.len() - at >= HEADER as usize {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
        let start = at + HEADER as usize;
        if len > RECORD_MAX || data.len() - start < len as usize {
            break;
        }
        let body = &data[start..start + len as usize];
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(batch) = EventBatch::decode(body) else {
            break;
        };
        out.push((start as u64, len, batch));
        at = start + len as usize;
    }
    (out, at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(stream: u64, seq: u64, bytes: usize) -> EventBatch {
        EventBatch {
            artifact: "Generic.Events.Test".into(),
            stream,
            seq,
            day: "2026-12-06".into(),
            time_unix_ms: 1,
            rows: vec![bytes::Bytes::from(vec![b'x'; bytes])],
            dropped: 0,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("talon-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn files(d: &Path) -> usize {
        std::fs::read_dir(d).unwrap().count()
    }

    /// What is written is read back; after a reopen (an agent restart) the streams come back
    /// with every batch not settled, in order, readable.
    #[test]
    fn batches_come_back_after_a_reopen() {
        let d = dir("reopen");
        let (mut s, rec) = Spool::open(&d, 1 << 30).unwrap();
        assert!(rec.is_empty());
        let a = s.append(&batch(7, 0, 10)).unwrap();
        s.append(&batch(7, 1, 10)).unwrap();
        s.append(&batch(9, 0, 10)).unwrap();
        assert_eq!(s.read(a).unwrap(), batch(7, 0, 10));
        drop(s);
        let (s, rec) = Spool::open(&d, 1 << 30).unwrap();
        let got: Vec<(u64, Vec<u64>)> = rec
            .iter()
            .map(|r| (r.stream, r.batches.iter().map(|b| b.0).collect()))
            .collect();
        assert_eq!(got, [(7, vec![0, 1]), (9, vec![0])]);
        assert_eq!(rec[0].artifact, "Generic.Events.Test");
        assert_eq!(s.read(rec[0].batches[1].1).unwrap(), batch(7, 1, 10));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A record torn by a kill mid-write is cut off; the whole ones before it stay.
    #[test]
    fn a_torn_record_is_cut_off() {
        let d = dir("torn");
        let (mut s, _) = Spool::open(&d, 1 << 30).unwrap();
        s.append(&batch(7, 0, 10)).unwrap();
        s.append(&batch(7, 1, 10)).unwrap();
        drop(s);
        let path = d.join(seg_name(7, 0));
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut s, rec) = Spool::open(&d, 1 << 30).unwrap();
        assert_eq!(rec[0].batches.len(), 1);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER + u64::from(rec[0].batches[0].1.len)
        );
        // Writing goes on in a new segment; both read back after another reopen.
        s.append(&batch(7, 1, 10)).unwrap();
        drop(s);
        let (_, rec) = Spool::open(&d, 1 << 30).unwrap();
        let seqs: Vec<u64> = rec[0].batches.iter().map(|b| b.0).collect();
        assert_eq!(seqs, [0, 1]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Segments go once all their batches are settled, oldest first: a settled later segment
    /// waits for the one before it, so what is left is an unbroken run.
    #[test]
    fn settled_segments_are_deleted_oldest_first() {
        let d = dir("settle");
        let (mut s, _) = Spool::open(&d, 1 << 30).unwrap();
        let big = SEGMENT_BYTES as usize / 2;
        for seq in 0..6 {
            s.append(&batch(7, seq, big)).unwrap();
        }
        // Two batches per segment: 0-1, 2-3, 4-5 (the last still current).
        assert_eq!(files(&d), 3);
        for seq in [2, 3] {
            s.settled(7, seq);
        }
        assert_eq!(files(&d), 3, "the second waits for the first");
        for seq in [0, 1] {
            s.settled(7, seq);
        }
        assert_eq!(files(&d), 1);
        for seq in [4, 5] {
            s.settled(7, seq);
        }
        assert_eq!(files(&d), 0, "the full current segment goes too");
        assert_eq!(s.bytes(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The bound: a batch beyond it is refused, naming it; settling makes room again.
    #[test]
    fn the_bound_refuses_and_settling_makes_room() {
        let d = dir("bound");
        let one = batch(7, 1, 1000).encode_to_vec().len() as u64 + HEADER;
        let (mut s, _) = Spool::open(&d, one * 2).unwrap();
        s.append(&batch(7, 1, 1000)).unwrap();
        s.append(&batch(7, 2, 1000)).unwrap();
        assert_eq!(
            s.append(&batch(7, 3, 1000)),
            Err(SpoolError::Full { max: one * 2 })
        );
        s.forget(7);
        assert_eq!(s.bytes(), 0);
        assert_eq!(files(&d), 0);
        s.append(&batch(7, 3, 1000)).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
