//! An append-only journal of numbered records on a node's local disk: what makes a write durable
//! before it is acknowledged (the master's datastore) or before it is sent (a minion's outbox).
//!
//! # Format
//!
//! A journal is a directory of segments `seg-<first seq, 20 digits>.log` plus a `MARK` file.
//! Each record is framed as `len: u32 LE | crc32: u32 LE | seq: u64 LE | payload`, where `len` counts
//! `seq` and the payload and the CRC covers them. Sequence numbers are consecutive across segments.
//! `MARK` holds the truncation point (`seq: u64 LE | crc32`): records at or below it are no longer
//! needed; whole segments below it are deleted.
//!
//! # Recovery
//!
//! [`Journal::open`] reads every segment in order. A frame that is incomplete or fails its CRC at the
//! end of the *last* segment, with no valid frame after it, is a torn write from a crash: the file
//! is cut there and recovery continues. Damage anywhere else — in an earlier segment, or followed by
//! valid records — is real corruption and an error naming the segment and offset, the files left as
//! they are: cutting there would drop records that may have been acknowledged, and skipping the
//! damage could resurrect stale data. The records after the mark must be numbered
//! `mark + 1, mark + 2, …` without a gap; records at or below the mark are not needed and not
//! checked. Every segment is synced before `open` returns: a record read back may never have been
//! made durable (the last run stopped after a failed fsync, its appends still in the page cache), and
//! whoever recovers it acts on it as durable.
//!
//! # Failure
//!
//! A failed append, sync or truncation leaves the files in a state the journal cannot know (a short
//! write, an fsync whose data may or may not be on the platter). From then on every call fails with
//! that first error: the owner stops, and the next [`Journal::open`] finds out what is there.

use super::local::LocalDisk;
use std::io;

const FRAME_HEADER_BYTES: usize = 4 + 4 + 8;
/// Largest payload a record may carry.
pub const PAYLOAD_BYTES_MAX: usize = 128 << 20;

/// A record read back at recovery.
pub type Record = (u64, Vec<u8>);

/// What `open` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records at or below this are no longer needed.
    pub truncated_upto: u64,
    /// Records after the mark, in order.
    pub records: Vec<Record>,
    /// Bytes of a torn final record that were cut off.
    pub torn_bytes: u64,
    /// Records at or below the mark still on disk from the sequence number `open_keeping` was
    /// asked to keep, in order (the datastore's start image replays them).
    pub earlier: Vec<Record>,
}

#[derive(Debug)]
struct Segment {
    name: String,
    /// The sequence number in its name: its first record's.
    first_seq: u64,
    last_seq: Option<u64>,
    bytes: u64,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal<D: LocalDisk> {
    disk: D,
    dir: String,
    segment_bytes_max: u64,
    segments: Vec<Segment>,
    truncated_upto: u64,
    next_seq: u64,
    /// Segments with appends not yet synced: at most the newest (older ones are synced on roll).
    unsynced: Vec<String>,
    /// The first failed operation: every later call fails with it.
    failed: Option<String>,
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + payload.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(payload);
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The whole, CRC-checked frame starting at `at` in `buf`, if there is one: its body (`seq u64 |
/// payload`). The frame's length is `8 + body.len()`.
fn frame_at(buf: &[u8], at: usize) -> Option<&[u8]> {
    let rest = buf.get(at..)?;
    if rest.len() < FRAME_HEADER_BYTES {
        return None;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if !(8..=8 + PAYLOAD_BYTES_MAX).contains(&len) || rest.len() < 8 + len {
        return None;
    }
    let body = &rest[8..8 + len];
    (crc32fast::hash(body) == crc).then_some(body)
}

/// The records framed in `buf` and where the first damaged one starts, if any. Payloads of records
/// below `copy_from` are checked but not copied (left empty): recovery drops them, and a segment is
/// mostly such records once flushed.
fn parse(buf: &[u8], copy_from: u64) -> (Vec<Record>, Option<usize>) {
    let mut records = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let Some(body) = frame_at(buf, at) else {
            return (records, Some(at));
        };
        let seq = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
        let payload = if seq >= copy_from {
            body[8..].to_vec()
        } else {
            Vec::new()
        };
        records.push((seq, payload));
        at += 8 + body.len();
    }
    (records, None)
}

/// Where a valid frame starts in `buf` after the damaged one at `at`, if any: one whose sequence
/// number could follow `last_good` (frames are at least a header long, so it lies within the
/// number of frames that fit) and that [`frame_at`] accepts. The sequence number is compared
/// first, so garbage costs an 8-byte compare per byte, not a CRC.
fn valid_frame_after(buf: &[u8], at: usize, last_good: u64) -> Option<usize> {
    let most = ((buf.len() - at) / FRAME_HEADER_BYTES) as u64 + 1;
    (at + 1..buf.len().saturating_sub(FRAME_HEADER_BYTES - 1)).find(|&off| {
        let seq = u64::from_le_bytes(buf[off + 8..off + 16].try_into().expect("8 bytes"));
        seq > last_good && seq <= last_good + most && frame_at(buf, off).is_some()
    })
}

impl<D: LocalDisk> Journal<D> {
    /// Opens (or creates) the journal in `dir`, repairing a torn tail, and returns what it holds.
    pub fn open(disk: D, dir: &str, segment_bytes_max: u64) -> io::Result<(Journal<D>, Recovered)> {
        Journal::open_keeping(disk, dir, segment_bytes_max, None)
    }

    /// [`Journal::open`], also returning in [`Recovered::earlier`] the records from `keep_from` up
    /// to the mark that are still on disk (segments are deleted only once wholly below the mark).
    pub fn open_keeping(
        mut disk: D,
        dir: &str,
        segment_bytes_max: u64,
        keep_from: Option<u64>,
    ) -> io::Result<(Journal<D>, Recovered)> {
        assert!(segment_bytes_max as usize > FRAME_HEADER_BYTES);
        let mark_path = format!("{dir}/MARK");
        let truncated_upto = match disk.read(&mark_path)? {
            None => 0,
            Some(b)
                if b.len() == 12
                    && crc32fast::hash(&b[..8])
                        == u32::from_le_bytes(b[8..12].try_into().expect("4")) =>
            {
                u64::from_le_bytes(b[..8].try_into().expect("8"))
            }
            Some(_) => return Err(corrupt(format!("{mark_path}: damaged truncation mark"))),
        };
        let names: Vec<String> = disk
            .list(&format!("{dir}/seg-"))?
            .into_iter()
            .filter(|n| n.ends_with(".log"))
            .collect();
        let mut recovered = Recovered {
            truncated_upto,
            ..Recovered::default()
        };
        let mut segments = Vec::new();
        // The next record needed after the mark; records at or below the mark are not checked.
        let mut expect = truncated_upto + 1;
        for (i, name) in names.iter().enumerate() {
            let first_seq: u64 = name
                .trim_start_matches(&format!("{dir}/seg-"))
                .trim_end_matches(".log")
                .parse()
                .map_err(|_| corrupt(format!("{name}: not a journal segment name")))?;
            let buf = disk.read(name)?.unwrap_or_default();
            let copy_from = keep_from.map_or(truncated_upto + 1, |k| k.min(truncated_upto + 1));
            let (records, bad_at) = parse(&buf, copy_from);
            let last = i + 1 == names.len();
            let mut bytes = buf.len() as u64;
            if let Some(at) = bad_at {
                if !last {
                    return Err(corrupt(format!(
                        "{name}: damaged record at byte {at} (not at the journal's end)"
                    )));
                }
                // A torn write is the journal's last record. Damage that valid records follow is
                // not: cutting there would drop records that may have been acknowledged.
                let last_good = records.last().map_or(first_seq.saturating_sub(1), |r| r.0);
                if let Some(next) = valid_frame_after(&buf, at, last_good) {
                    return Err(corrupt(format!(
                        "{name}: damaged record at byte {at}, followed by valid records (the next \
                         at byte {next}); the file is left as it is. If this machine lost power, \
                         the records after the damage may be writes never acknowledged: to start \
                         anyway, keep a copy of the file and cut it to {at} bytes"
                    )));
                }
                recovered.torn_bytes = (buf.len() - at) as u64;
                disk.truncate(name, at as u64)?;
                bytes = at as u64;
            }
            if let Some((s, _)) = records.first()
                && *s != first_seq
            {
                return Err(corrupt(format!(
                    "{name}: first record is {s}, name says {first_seq}"
                )));
            }
            for w in records.windows(2) {
                if w[1].0 != w[0].0 + 1 {
                    return Err(corrupt(format!(
                        "{name}: record {} follows record {}",
                        w[1].0, w[0].0
                    )));
                }
            }
            for (seq, _) in records.iter().filter(|r| r.0 > truncated_upto) {
                if *seq != expect {
                    return Err(corrupt(format!(
                        "{name}: record {seq} where {expect} was expected"
                    )));
                }
                expect = seq + 1;
            }
            let last_seq = records.last().map(|r| r.0);
            for r in records {
                if r.0 > truncated_upto {
                    recovered.records.push(r);
                } else if keep_from.is_some_and(|k| r.0 >= k) {
                    recovered.earlier.push(r);
                }
            }
            segments.push(Segment {
                name: name.clone(),
                first_seq,
                last_seq,
                bytes,
            });
        }
        // Numbering continues after the last record kept (or after the mark, if every record is
        // at or below it).
        let next_seq = segments
            .iter()
            .filter_map(|s| s.last_seq)
            .max()
            .map_or(expect, |l| (l + 1).max(expect));
        // What is recovered is acted on as durable: make it so.
        for s in &segments {
            if s.bytes > 0 {
                disk.sync(&s.name)?;
            }
        }
        let j = Journal {
            disk,
            dir: dir.to_owned(),
            segment_bytes_max,
            segments,
            truncated_upto,
            next_seq,
            unsynced: Vec::new(),
            failed: None,
        };
        Ok((j, recovered))
    }

    /// Fails if an earlier operation failed; otherwise runs `op` (see [`blocking_io`]), remembering
    /// its failure.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(format!(
                "journal {} failed earlier: {e}",
                self.dir
            )));
        }
        let r = blocking_io(|| op(self));
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// The sequence number the next record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The truncation mark.
    pub fn truncated_upto(&self) -> u64 {
        self.truncated_upto
    }

    /// Gives the disk back (the simulator crashes it and reopens).
    pub fn into_disk(self) -> D {
        self.disk
    }

    /// The oldest record [`Journal::truncate`]`(upto)` would leave on disk (`next_seq()` if none):
    /// whoever replays records from the journal beyond the mark must have them before then.
    pub fn kept_from_after(&self, upto: u64) -> u64 {
        let upto = upto.max(self.truncated_upto).min(self.next_seq - 1);
        let mut kept = self.segments.iter().enumerate().skip_while(|(i, s)| {
            *i + 1 < self.segments.len() && s.last_seq.is_none_or(|l| l <= upto)
        });
        match kept.next() {
            Some((_, s)) if s.last_seq.is_some() => s.first_seq,
            _ => self.next_seq,
        }
    }

    /// The disk the journal lives on, for files kept beside it (the datastore's start image).
    pub fn disk_mut(&mut self) -> &mut D {
        &mut self.disk
    }

    /// Segments on disk.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends record `seq` (which must be `next_seq()`); durable only after `sync`.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        if self.failed.is_some() {
            return self.guarded(|_| Ok(()));
        }
        if seq != self.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "journal {}: record {seq} appended where {} was expected",
                    self.dir, self.next_seq
                ),
            ));
        }
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("record of {} bytes is too large", payload.len()),
            ));
        }
        let f = frame(seq, payload);
        // A new segment when the newest is full, or when its records do not lead up to this one
        // (every record it holds is at or below the mark, and the numbering resumed above it):
        // within a segment, records are consecutive.
        let roll = self.segments.last().is_none_or(|s| {
            (s.bytes > 0 && s.bytes + f.len() as u64 > self.segment_bytes_max)
                || s.last_seq.is_some_and(|l| l + 1 != seq)
        });
        self.guarded(|j| {
            if roll {
                // A segment is complete and durable before the next one starts: otherwise a crash
                // could keep the new segment's records and tear the old one's, leaving a hole
                // mid-journal.
                j.sync_unsynced()?;
                let name = format!("{}/seg-{seq:020}.log", j.dir);
                j.segments.push(Segment {
                    name,
                    first_seq: seq,
                    last_seq: None,
                    bytes: 0,
                });
            }
            let seg = j.segments.last_mut().expect("a segment exists");
            if !j.unsynced.contains(&seg.name) {
                j.unsynced.push(seg.name.clone());
            }
            j.disk.append(&seg.name, &f)?;
            seg.bytes += f.len() as u64;
            seg.last_seq = Some(seq);
            j.next_seq += 1;
            Ok(())
        })
    }

    fn sync_unsynced(&mut self) -> io::Result<()> {
        while let Some(name) = self.unsynced.first() {
            self.disk.sync(name)?;
            self.unsynced.remove(0);
        }
        Ok(())
    }

    /// Makes every appended record durable; returns the last durable sequence number.
    pub fn sync(&mut self) -> io::Result<u64> {
        self.guarded(|j| {
            j.sync_unsynced()?;
            Ok(j.next_seq - 1)
        })
    }

    /// Records up to `upto` are no longer needed: persist the mark, delete segments wholly below it.
    pub fn truncate(&mut self, upto: u64) -> io::Result<()> {
        if upto <= self.truncated_upto && self.failed.is_none() {
            return Ok(());
        }
        self.guarded(|j| {
            let upto = upto.min(j.next_seq - 1);
            let mut mark = upto.to_le_bytes().to_vec();
            mark.extend_from_slice(&crc32fast::hash(&mark).to_le_bytes());
            j.disk.write_atomic(&format!("{}/MARK", j.dir), &mark)?;
            j.truncated_upto = upto;
            // Keep the newest segment (appends go there); drop older ones that hold nothing needed.
            while j.segments.len() > 1 && j.segments[0].last_seq.is_none_or(|l| l <= upto) {
                let s = j.segments.remove(0);
                j.disk.remove(&s.name)?;
                j.unsynced.retain(|n| *n != s.name);
            }
            Ok(())
        })
    }
}

/// Runs `f`, which blocks on the local disk (a write, an `fdatasync`: seconds on a disk busy with
/// other writes). On a multi-threaded runtime the worker thread first hands its other tasks to
/// another thread (`block_in_place`): the journals' drivers are async tasks, and with both worker
/// threads of a 2-core master in `fdatasync` nothing else ran — in a 100,000-client hunt the master
/// answered no HTTP/2 ping for over a minute and its API connections were dropped. Elsewhere (the
/// simulator's single thread, single-threaded tests) it just runs `f`.
pub fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests;
