//! The start image: the values of the keys a master reads when it starts (client records, hunts and
//! their participants, replication cursors, tasks awaiting delivery), kept in one file beside the
//! datastore journal on local disk, so that a restart reads one local file instead of listing and
//! reading every such record on the slow shared volume (docs/architecture.md, "The start image").
//!
//! # Invariant
//!
//! An image at generation `G` holds the tracked keys as they stand after every journal record
//! numbered below `G`. The journal holds every record from `G` on (the driver folds records into the
//! image before the journal deletes the segment that holds them), so the image plus the tracked
//! records of the journal from `G` on is the tracked keys' current state. [`check`] verifies at open
//! that the journal still holds every record from `G` on, without a gap; an image that fails any
//! check is removed and the master takes the listing path, which seeds a new one.
//!
//! # Format
//!
//! `TALONIMG | version: u32 LE | generation: u64 LE | count: u64 LE | count × (key len: u32 LE | key |
//! value len: u32 LE | value) | crc32 of all before: u32 LE`.

use crate::storage::local::LocalDisk;
use bytes::Bytes;
use std::collections::BTreeMap;
use talon_core::datastore::JournalRecord;

const MAGIC: &[u8; 8] = b"TALONIMG";
const VERSION: u32 = 1;

/// The file's name inside the journal's directory.
pub const FILE: &str = "IMAGE";

/// Which keys a datastore keeps a start image of.
#[derive(Clone, Copy)]
pub struct ImageOptions {
    /// True for a key the image tracks.
    pub tracks: fn(&str) -> bool,
}

impl std::fmt::Debug for ImageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageOptions { .. }")
    }
}

/// The tracked keys' values.
pub type Entries = BTreeMap<String, Bytes>;

/// An image file as read: its generation and entries, or what is wrong with it.
pub type Found = Result<(u64, Entries), String>;

/// Encodes an image.
pub fn encode(generation: u64, entries: &Entries) -> Vec<u8> {
    let size: usize = entries.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(32 + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (k, v) in entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes an image: its generation and entries, or what is wrong with it.
pub fn decode(buf: &[u8]) -> Result<(u64, Entries), String> {
    let body_len = buf
        .len()
        .checked_sub(4)
        .ok_or("shorter than its checksum")?;
    let (body, crc) = buf.split_at(body_len);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = body
            .get(at..at.checked_add(n).ok_or("length overflow")?)
            .ok_or_else(|| format!("truncated at byte {at}"))?;
        at += n;
        Ok(s)
    };
    if take(8)? != MAGIC {
        return Err("not a start image".into());
    }
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let version = u32_of(take(4)?);
    if version != VERSION {
        return Err(format!("version {version}, this build reads {VERSION}"));
    }
    let generation = u64_of(take(8)?);
    let count = u64_of(take(8)?);
    let mut entries = Entries::new();
    for _ in 0..count {
        let klen = u32_of(take(4)?) as usize;
        let key = String::from_utf8(take(klen)?.to_vec()).map_err(|_| "a key is not UTF-8")?;
        let vlen = u32_of(take(4)?) as usize;
        let value = Bytes::copy_from_slice(take(vlen)?);
        entries.insert(key, value);
    }
    if at != body.len() {
        return Err(format!("{} bytes after the last entry", body.len() - at));
    }
    Ok((generation, entries))
}

/// Applies journal records (in order) to `entries`: a record with a value sets its key, one
/// without deletes it; keys the image does not track are skipped.
pub fn apply(entries: &mut Entries, tracks: fn(&str) -> bool, records: &[JournalRecord]) {
    for r in records.iter().filter(|r| tracks(&r.key)) {
        match &r.value {
            Some(v) => entries.insert(r.key.clone(), v.clone()),
            None => entries.remove(&r.key),
        };
    }
}

/// Whether the journal still holds what an image at `generation` needs: `from_g` (the journal's
/// records from `generation` on, as recovered, ending before `next_seq`) must be numbered
/// `generation, generation + 1, …, next_seq - 1`.
pub fn check(generation: u64, next_seq: u64, from_g: &[u64]) -> Result<(), String> {
    if generation > next_seq {
        return Err(format!(
            "generation {generation} is ahead of the journal (next record {next_seq})"
        ));
    }
    let want = next_seq - generation;
    if from_g.len() as u64 != want
        || from_g
            .iter()
            .enumerate()
            .any(|(i, s)| *s != generation + i as u64)
    {
        return Err(format!(
            "the journal no longer holds records {generation}..{next_seq} that it needs \
             (found {} of {want})",
            from_g.len()
        ));
    }
    Ok(())
}

/// What a datastore knows of its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No valid image yet: one can be seeded at generation `since` (the journal's next record when
    /// the datastore opened).
    Unseeded { since: u64 },
    /// No image, and none can be seeded in this run: journal records it would need are gone (or
    /// writing the image failed). The next start lists the volume.
    Lost,
    /// The file holds an image at this generation; `log` holds the tracked records from it on.
    Seeded { generation: u64 },
}

/// Keeps the image as the datastore journals and truncates (driven by the datastore's task).
pub struct Keeper {
    tracks: fn(&str) -> bool,
    path: String,
    state: State,
    /// Tracked journal records from the image's generation (or from `since`) on, in order: a subset
    /// of what the journal holds, so bounded by it.
    log: std::collections::VecDeque<JournalRecord>,
    /// The state loaded at open, until the master takes it.
    loaded: Option<Entries>,
}

/// What open found of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageReport {
    /// The datastore keeps no image.
    Off,
    /// There was none (first start, or one was discarded earlier).
    Absent,
    /// Loaded: the image's generation and the tracked keys it yields with the journal replayed.
    Loaded {
        /// The image file's generation.
        generation: u64,
        /// Tracked keys, journal replayed.
        keys: usize,
    },
    /// Damaged or stale (the reason is logged): removed; the master lists the volume instead.
    Discarded,
}

impl Keeper {
    /// Reads the image at open (before the journal: its generation says which records to keep).
    pub fn read<D: LocalDisk>(disk: &mut D, journal_dir: &str) -> (String, Option<Found>) {
        let path = format!("{journal_dir}/{FILE}");
        let found = match disk.read(&path) {
            Ok(None) => None,
            Ok(Some(buf)) => Some(decode(&buf)),
            Err(e) => Some(Err(format!("reading it: {e}"))),
        };
        (path, found)
    }

    /// The keeper once the journal is open: `found` is what [`Keeper::read`] returned, `records`
    /// the journal's records from the image's generation on (earlier ones and those after the mark,
    /// in order), `next_seq` the journal's next record. A bad image is removed.
    pub fn open<D: LocalDisk>(
        opts: ImageOptions,
        disk: &mut D,
        path: String,
        found: Option<Found>,
        records: Vec<JournalRecord>,
        next_seq: u64,
    ) -> std::io::Result<(Keeper, ImageReport)> {
        let mut k = Keeper {
            tracks: opts.tracks,
            path,
            state: State::Unseeded { since: next_seq },
            log: Default::default(),
            loaded: None,
        };
        let loaded = found.map(|r| {
            r.and_then(|(generation, mut entries)| {
                let seqs: Vec<u64> = records
                    .iter()
                    .map(|r| r.seq)
                    .filter(|s| *s >= generation)
                    .collect();
                check(generation, next_seq, &seqs)?;
                // The trailing group a crash cut short was never acknowledged: not applied (the
                // cache's recovery drops it the same way).
                let (whole, _) = talon_core::datastore::whole_groups(
                    records
                        .into_iter()
                        .filter(|r| r.seq >= generation)
                        .collect(),
                );
                apply(&mut entries, k.tracks, &whole);
                Ok((generation, entries, whole))
            })
        });
        let report = match loaded {
            None => ImageReport::Absent,
            Some(Ok((generation, entries, whole))) => {
                k.state = State::Seeded { generation };
                k.log = whole.into_iter().filter(|r| (k.tracks)(&r.key)).collect();
                let keys = entries.len();
                k.loaded = Some(entries);
                ImageReport::Loaded { generation, keys }
            }
            Some(Err(why)) => {
                tracing::warn!(
                    file = %k.path,
                    reason = %why,
                    "discarding the start image; the master lists the volume instead"
                );
                disk.remove(&k.path)?;
                ImageReport::Discarded
            }
        };
        Ok((k, report))
    }

    /// A record was appended to the journal (it is acknowledged only once synced; a fold only
    /// ever applies synced records).
    pub fn appended(&mut self, seq: u64, key: &str, value: &Option<Bytes>) {
        if (self.tracks)(key) && self.state != State::Lost {
            self.log.push_back(JournalRecord {
                seq,
                key: key.to_owned(),
                value: value.clone(),
                part: talon_core::datastore::GroupPart::Whole,
            });
        }
    }

    /// The journal is about to delete every record below `keep_from`: fold them into the image
    /// first. A fold that fails leaves no image (the next start lists the volume) rather than a
    /// stale one.
    pub fn before_truncate<D: LocalDisk>(&mut self, disk: &mut D, keep_from: u64) {
        match self.state {
            State::Seeded { generation } if generation < keep_from => {
                if let Err(e) = self.fold(disk, generation, keep_from) {
                    tracing::warn!(
                        file = %self.path,
                        error = %e,
                        "could not update the start image; the next start lists the volume"
                    );
                    // Left behind, the stale image is still refused at the next start: the
                    // journal no longer holds the records from its generation on (`check`).
                    if let Err(e) = disk.remove(&self.path) {
                        tracing::warn!(file = %self.path, error = %e, "could not remove the stale start image");
                    }
                    self.state = State::Lost;
                }
            }
            State::Unseeded { since } if since < keep_from => self.state = State::Lost,
            _ => {}
        }
        if self.state == State::Lost {
            self.log.clear();
        }
        while self.log.front().is_some_and(|r| r.seq < keep_from) {
            self.log.pop_front();
        }
    }

    fn fold<D: LocalDisk>(
        &mut self,
        disk: &mut D,
        generation: u64,
        upto: u64,
    ) -> Result<(), String> {
        let buf = disk
            .read(&self.path)
            .map_err(|e| format!("reading it: {e}"))?
            .ok_or("it is gone")?;
        let (g, mut entries) = decode(&buf)?;
        if g != generation {
            return Err(format!("it is at generation {g}, not {generation}"));
        }
        let n = self.log.iter().take_while(|r| r.seq < upto).count();
        apply(
            &mut entries,
            self.tracks,
            self.log.make_contiguous().get(..n).unwrap_or(&[]),
        );
        disk.write_atomic(&self.path, &encode(upto, &entries))
            .map_err(|e| format!("writing it: {e}"))?;
        self.state = State::Seeded { generation: upto };
        Ok(())
    }

    /// Writes the first image from what the master read by listing the volume at start (`entries`:
    /// every tracked key it found, read after the datastore opened). Records journalled since the
    /// open are still in the log and in the journal, so the image is seeded at the open's
    /// generation: replaying them on top is what a later start does. Returns the generation.
    pub fn seed<D: LocalDisk>(
        &mut self,
        disk: &mut D,
        entries: Vec<(String, Bytes)>,
    ) -> Result<u64, String> {
        let since = match self.state {
            State::Unseeded { since } => since,
            State::Lost => {
                return Err("the journal dropped records written since the start".into());
            }
            State::Seeded { .. } => return Err("an image is already kept".into()),
        };
        let entries: Entries = entries
            .into_iter()
            .filter(|(k, _)| (self.tracks)(k))
            .collect();
        disk.write_atomic(&self.path, &encode(since, &entries))
            .map_err(|e| format!("writing {}: {e}", self.path))?;
        self.state = State::Seeded { generation: since };
        Ok(since)
    }

    /// The tracked keys' state found at open, once.
    pub fn take_loaded(&mut self) -> Option<Entries> {
        self.loaded.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_damage() {
        let mut e = Entries::new();
        e.insert("clients/C.1/record.json".into(), Bytes::from_static(b"{}"));
        e.insert("tasks/C.1/F.1.pb".into(), Bytes::from_static(b"\x00\x01"));
        let buf = encode(42, &e);
        assert_eq!(decode(&buf).unwrap(), (42, e.clone()));
        for at in [0, 9, 20, buf.len() / 2, buf.len() - 1] {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert_eq!(
                decode(&bad).unwrap_err(),
                "checksum mismatch",
                "flip at {at}"
            );
        }
        assert!(decode(&buf[..buf.len() - 5]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn check_wants_every_record_from_the_generation_on() {
        assert!(check(5, 5, &[]).is_ok());
        assert!(check(5, 8, &[5, 6, 7]).is_ok());
        // A segment deleted before the image was folded: records 5 and 6 are gone.
        assert!(check(5, 8, &[7]).is_err());
        // A hole in the middle.
        assert!(check(5, 8, &[5, 7]).is_err());
        // The journal was replaced by a shorter one.
        assert!(check(9, 8, &[]).is_err());
    }
}
