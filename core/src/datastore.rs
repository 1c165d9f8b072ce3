//! The master's datastore cache policy (`MemcacheFileDataStore`): a memory cache in front of the
//! slow shared volume, with a journal on fast local disk so that an acknowledged write survives a
//! master crash (invariant 5 (docs/architecture.md)).
//!
//! # Writes
//!
//! `set`/`delete` → [`CacheAction::JournalAppend`]. The shell appends records and syncs them (it may
//! group several into one fsync), then calls `handle_journal_synced(upto)`: only then is the write
//! applied to the cache and acknowledged. Dirty entries are flushed to the shared volume in coalesced
//! batches ([`CacheAction::Flush`]) when `flush_batch_max` are waiting or the oldest has waited
//! `flush_age_max_ms`. A key is never in two flushes at once, and an entry turns clean only if no newer
//! write arrived while it was being flushed. The journal is truncated below the oldest dirty version.
//!
//! # Atomic groups
//!
//! `handle_write_all` writes several keys as one: its journal records are consecutive and marked as
//! a group ([`GroupPart`]), they are acknowledged together once the last is synced, and recovery
//! replays a group only if every record of it is in the journal. A write whose outcome is unknown
//! (the shell stopped between append and acknowledgement) therefore either happened whole or not at
//! all: a hunt participant's record never survives without its flow record and its task.
//!
//! # Reads
//!
//! Served from memory when cached (including negative entries: "this key does not exist"), otherwise
//! one [`CacheAction::ReadShared`] per key however many readers wait. Only acknowledged writes are
//! visible. The master is the only writer of the datastore, so a cached entry is never stale.
//!
//! # Bounds
//!
//! Dirty bytes (acknowledged or pending, not yet flushed) are bounded: at the bound `set` fails with
//! [`CacheError::Busy`], which is determinate (nothing was written). Clean entries are evicted
//! least-recently-used first beyond `clean_bytes_max`; dirty entries are never evicted. Readers
//! waiting on the volume are bounded too.
//!
//! # Recovery
//!
//! [`Cache::recover`] replays the journal records after the last truncation as dirty entries; they are
//! flushed again (writes are idempotent overwrites).

use crate::paths::{KeyError, validate_key};
use crate::time::Monotonic;
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// True if `key` is under `prefix` with at most `depth` `/`-separated components after it (any
/// number for `None`): `clients/C.1/record.json` is within depth 2 of `clients/`, its flows' records
/// are not.
pub fn within_depth(key: &str, prefix: &str, depth: Option<usize>) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|rest| depth.is_none_or(|d| rest.split('/').count() <= d))
}

/// Bookkeeping bytes charged per entry on top of its key and value.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// Bounds and timings of the cache.
#[derive(Clone, Debug)]
pub struct CacheLimits {
    /// Memory for clean (evictable) entries.
    pub clean_bytes_max: u64,
    /// Memory for written-but-not-flushed entries; `set` fails with `Busy` beyond it.
    pub dirty_bytes_max: u64,
    /// Largest value accepted.
    pub value_bytes_max: u64,
    /// Writes per flush batch; this many waiting starts a flush.
    pub flush_batch_max: usize,
    /// The oldest waiting write starts a flush after this long.
    pub flush_age_max_ms: u64,
    /// Flush batches in flight at once.
    pub flushes_in_flight_max: usize,
    /// After a failed flush, wait this long before the next.
    pub flush_retry_ms: u64,
    /// Gets and lists waiting on the shared volume.
    pub readers_max: usize,
    /// Keys one list returns at most.
    pub list_keys_max: usize,
    /// Writes in one atomic group at most.
    pub group_writes_max: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            clean_bytes_max: 512 << 20,
            dirty_bytes_max: 128 << 20,
            value_bytes_max: 64 << 20,
            flush_batch_max: 256,
            flush_age_max_ms: 200,
            flushes_in_flight_max: 8,
            flush_retry_ms: 1000,
            readers_max: 10_000,
            list_keys_max: 1_000_000,
            group_writes_max: 64,
        }
    }
}

/// A caller's request, numbered by the shell, echoed in the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheReply {
    /// The value of a key (`None`: no such key).
    Value(Option<Bytes>),
    /// The write is durable (journalled); `version` orders writes.
    Written {
        /// The journal sequence number of the write.
        version: u64,
    },
    /// Keys under a prefix, sorted.
    Keys {
        /// The keys.
        keys: Vec<String>,
        /// True if `list_keys_max` cut the list.
        truncated: bool,
    },
}

/// A failed request. All are determinate: the operation did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheError {
    /// The key is not a valid datastore key.
    BadKey(KeyError),
    /// The value is larger than `value_bytes_max`.
    TooLarge {
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// Unflushed writes are at `dirty_bytes_max`: retry later (the volume is slow or failing).
    Busy {
        /// Dirty bytes now.
        dirty_bytes: u64,
        /// The bound.
        max: u64,
    },
    /// `readers_max` readers wait on the volume already.
    ReadersBusy {
        /// The bound.
        max: usize,
    },
    /// The shared volume failed the read or list.
    Storage(String),
    /// An atomic group is empty or has more than `group_writes_max` writes.
    BadGroup {
        /// Its writes.
        len: usize,
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::BadKey(e) => write!(f, "bad datastore key: {e}"),
            CacheError::TooLarge { len, max } => write!(f, "value of {len} bytes exceeds {max}"),
            CacheError::Busy { dirty_bytes, max } => write!(
                f,
                "datastore has {dirty_bytes} unflushed bytes (limit {max}); shared volume slow? retry"
            ),
            CacheError::ReadersBusy { max } => {
                write!(f, "{max} reads wait on the shared volume; retry")
            }
            CacheError::Storage(e) => write!(f, "shared volume: {e}"),
            CacheError::BadGroup { len, max } => {
                write!(f, "an atomic write of {len} keys (1 to {max} allowed)")
            }
        }
    }
}

impl std::error::Error for CacheError {}

/// One write in a flush batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushWrite {
    /// The key.
    pub key: String,
    /// The value to write; `None` deletes the key.
    pub value: Option<Bytes>,
    /// The journal version this write carries.
    pub version: u64,
}

/// Where a journal record stands in the atomic group it belongs to (kept in the record, so that
/// recovery can tell a whole group from a torn one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupPart {
    /// A write on its own.
    Whole,
    /// The first of `len` (at least 2) consecutive records that take effect together.
    First {
        /// Records in the group, this one included.
        len: u32,
    },
    /// A later record of the group begun by the nearest `First` before it.
    Next,
}

/// A journal record as recovery reads it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The key.
    pub key: String,
    /// The value; `None` is a delete.
    pub value: Option<Bytes>,
    /// Its place in an atomic group.
    pub part: GroupPart,
}

/// The records of `records` (sorted by `seq`, all above the journal's truncation mark) that belong
/// to whole groups, and how many were dropped as parts of a group the journal does not hold whole
/// (its last records were never written or never made durable: it did not happen). A run of `Next`
/// records right after the mark is whole: the start of its group was truncated, which happens only
/// once the whole group was acknowledged.
pub fn whole_groups(records: Vec<JournalRecord>) -> (Vec<JournalRecord>, usize) {
    let mut kept = Vec::with_capacity(records.len());
    let mut open: Vec<JournalRecord> = Vec::new();
    let mut missing = 0u32;
    let mut dropped = 0;
    // Still in the run of `Next` records that opens the journal.
    let mut leading = true;
    for r in records {
        leading &= r.part == GroupPart::Next;
        match r.part {
            GroupPart::Next if leading => kept.push(r),
            GroupPart::Next if missing > 0 => {
                open.push(r);
                missing -= 1;
                if missing == 0 {
                    kept.append(&mut open);
                }
            }
            GroupPart::Next => dropped += 1, // Belongs to a group dropped below.
            GroupPart::Whole | GroupPart::First { .. } => {
                dropped += open.len();
                open.clear();
                match r.part {
                    GroupPart::First { len } if len > 1 => {
                        missing = len - 1;
                        open.push(r);
                    }
                    _ => {
                        missing = 0;
                        kept.push(r);
                    }
                }
            }
        }
    }
    (kept, dropped + open.len())
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheAction {
    /// Append this record to the journal on local disk; report syncs with `handle_journal_synced`.
    JournalAppend {
        /// Its sequence number (consecutive).
        seq: u64,
        /// The key.
        key: String,
        /// The value; `None` is a delete.
        value: Option<Bytes>,
        /// Its place in an atomic group (recorded with it).
        part: GroupPart,
    },
    /// Read the key from the shared volume; report with `handle_read_done`.
    ReadShared {
        /// The key.
        key: String,
    },
    /// List keys under a prefix on the shared volume; report with `handle_list_done`.
    ListShared {
        /// The request.
        req: RequestId,
        /// The prefix.
        prefix: String,
        /// Only keys with at most this many components after the prefix ([`within_depth`]); the
        /// volume need not look deeper.
        depth: Option<usize>,
    },
    /// Write these to the shared volume (each atomically: temp file, fsync, rename); report with
    /// `handle_flush_done`.
    Flush {
        /// The batch's number.
        batch: u64,
        /// The writes, at most one per key.
        writes: Vec<FlushWrite>,
    },
    /// Journal records up to and including `upto` are no longer needed.
    JournalTruncate {
        /// The last record that may be dropped.
        upto: u64,
    },
    /// Answer a request.
    Reply {
        /// The request.
        req: RequestId,
        /// The answer.
        result: Result<CacheReply, CacheError>,
    },
}

#[derive(Debug)]
struct Entry {
    value: Option<Bytes>,
    /// Journal seq of the last applied write; 0 for entries loaded from the volume.
    version: u64,
    dirty: bool,
    /// The first write since it was last clean: the entry holds that write's effect (or a later
    /// one) until it turns clean.
    dirty_from: u64,
    /// The version being flushed, if any.
    flushing: Option<u64>,
    /// When it turned dirty (for the flush age bound); or its LRU tick when clean.
    dirty_since: Monotonic,
    lru_tick: u64,
}

fn entry_bytes(key: &str, value: &Option<Bytes>) -> u64 {
    key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD_BYTES
}

#[derive(Debug)]
struct PendingWrite {
    /// Whom to answer: on the last write of a group only.
    req: Option<RequestId>,
    key: String,
    value: Option<Bytes>,
    /// The sequence number of the last write of its group (its own, for a write on its own).
    group_last: u64,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    limits: CacheLimits,
    entries: BTreeMap<String, Entry>,
    /// Clean entries by LRU tick.
    lru: BTreeMap<u64, String>,
    next_tick: u64,
    /// Dirty entries by the version of their last write (oldest first).
    dirty: BTreeMap<u64, String>,
    /// Dirty entries by `dirty_from`: the oldest unflushed write, whatever overwrote it since.
    unflushed: std::collections::BTreeSet<(u64, String)>,
    /// The dirty entries not being flushed, by version: what the next flush takes, found without
    /// stepping over the (up to `flushes_in_flight_max` × `flush_batch_max`) entries in flight.
    idle: BTreeMap<u64, String>,
    pending: BTreeMap<u64, PendingWrite>,
    next_seq: u64,
    synced_upto: u64,
    truncated_upto: u64,
    readers: BTreeMap<String, Vec<RequestId>>,
    lists: BTreeMap<RequestId, (String, Option<usize>)>,
    waiting: usize,
    flushes: BTreeMap<u64, Vec<(String, u64)>>,
    next_batch: u64,
    flush_not_before: Monotonic,
    clean_bytes: u64,
    dirty_bytes: u64,
    actions: VecDeque<CacheAction>,
    /// Journal records recovery dropped as parts of torn groups.
    dropped_on_recovery: usize,
}

impl Cache {
    /// An empty cache over a journal truncated up to `truncated_upto` (0 on first start).
    pub fn new(limits: CacheLimits, truncated_upto: u64) -> Cache {
        assert!(limits.value_bytes_max + ENTRY_OVERHEAD_BYTES + 1024 <= limits.dirty_bytes_max);
        assert!(limits.flush_batch_max > 0 && limits.flushes_in_flight_max > 0);
        Cache {
            limits,
            entries: BTreeMap::new(),
            lru: BTreeMap::new(),
            next_tick: 0,
            dirty: BTreeMap::new(),
            unflushed: std::collections::BTreeSet::new(),
            idle: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_seq: truncated_upto + 1,
            synced_upto: truncated_upto,
            truncated_upto,
            readers: BTreeMap::new(),
            lists: BTreeMap::new(),
            waiting: 0,
            flushes: BTreeMap::new(),
            next_batch: 1,
            flush_not_before: Monotonic(0),
            clean_bytes: 0,
            dirty_bytes: 0,
            actions: VecDeque::new(),
            dropped_on_recovery: 0,
        }
    }

    /// Rebuilds the cache after a crash from the journal: the truncation mark, the sequence number
    /// the journal gives its next record, and the intact records after the mark. Records of a group
    /// the journal does not hold whole are dropped ([`whole_groups`]; how many:
    /// [`Cache::dropped_on_recovery`]). Replayed writes are dirty and will be flushed again.
    pub fn recover(
        limits: CacheLimits,
        now: Monotonic,
        truncated_upto: u64,
        next_seq: u64,
        records: impl IntoIterator<Item = JournalRecord>,
    ) -> Cache {
        let mut c = Cache::new(limits, truncated_upto);
        let mut records: Vec<_> = records
            .into_iter()
            .filter(|r| r.seq > truncated_upto)
            .collect();
        records.sort_by_key(|r| r.seq);
        let top = records.last().map_or(truncated_upto, |r| r.seq);
        let (records, dropped) = whole_groups(records);
        c.dropped_on_recovery = dropped;
        for r in records {
            c.apply(now, r.seq, r.key, r.value);
        }
        // Numbering continues after every record the journal holds, replayed or dropped.
        c.next_seq = next_seq.max(top + 1);
        c.synced_upto = c.next_seq - 1;
        // A replayed entry may stand for writes older than the journal still shows (truncated once
        // an overwrite covered them): it counts as unflushed since the beginning.
        c.unflushed = std::mem::take(&mut c.unflushed)
            .into_iter()
            .map(|(_, k)| (0, k))
            .collect();
        for e in c.entries.values_mut() {
            e.dirty_from = 0;
        }
        // Records before the first replayed one (dropped, or all of them) are not needed.
        c.maybe_truncate();
        c.maybe_flush(now);
        c
    }

    /// Journal records [`Cache::recover`] dropped as parts of a group it did not find whole.
    pub fn dropped_on_recovery(&self) -> usize {
        self.dropped_on_recovery
    }

    /// Bytes of unflushed writes (acknowledged or pending).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    /// When the oldest write not yet on the shared volume was made (`None`: every write is).
    pub fn oldest_dirty_since(&self) -> Option<Monotonic> {
        self.unflushed
            .first()
            .and_then(|(_, k)| self.entries.get(k))
            .map(|e| e.dirty_since)
    }

    /// Bytes of clean entries.
    pub fn clean_bytes(&self) -> u64 {
        self.clean_bytes
    }

    /// Entries in memory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True if every acknowledged write is on the shared volume and nothing is pending.
    pub fn is_flushed(&self) -> bool {
        self.dirty.is_empty() && self.pending.is_empty()
    }

    /// The version of the newest acknowledged write (0 if none since the journal's start).
    pub fn acknowledged_upto(&self) -> u64 {
        self.synced_upto
    }

    /// True if every write at or below `version` is on the shared volume: it was flushed, or it was
    /// overwritten and the overwrite was flushed. (An overwritten write still unflushed keeps its
    /// key from counting, so a caller never sees a key absent that it wrote before `version`.)
    pub fn flushed_through(&self, version: u64) -> bool {
        self.unflushed.first().is_none_or(|(v, _)| *v > version)
    }

    fn reply(&mut self, req: RequestId, result: Result<CacheReply, CacheError>) {
        self.actions.push_back(CacheAction::Reply { req, result });
    }

    /// Reads a key.
    pub fn handle_get(&mut self, now: Monotonic, req: RequestId, key: &str) {
        if let Err(e) = validate_key(key) {
            return self.reply(req, Err(CacheError::BadKey(e)));
        }
        if let Some(value) = self.touch(key) {
            return self.reply(req, Ok(CacheReply::Value(value)));
        }
        if self.waiting >= self.limits.readers_max {
            return self.reply(
                req,
                Err(CacheError::ReadersBusy {
                    max: self.limits.readers_max,
                }),
            );
        }
        self.waiting += 1;
        let first = !self.readers.contains_key(key);
        self.readers.entry(key.to_owned()).or_default().push(req);
        if first {
            self.actions.push_back(CacheAction::ReadShared {
                key: key.to_owned(),
            });
        }
        self.maybe_flush(now);
    }

    /// The cached value of `key`, bumping its LRU position; `None` if not cached.
    fn touch(&mut self, key: &str) -> Option<Option<Bytes>> {
        let e = self.entries.get_mut(key)?;
        if !e.dirty {
            self.lru.remove(&e.lru_tick);
            e.lru_tick = self.next_tick;
            self.next_tick += 1;
            self.lru.insert(e.lru_tick, key.to_owned());
        }
        Some(e.value.clone())
    }

    /// The shared volume answered a read.
    pub fn handle_read_done(
        &mut self,
        now: Monotonic,
        key: &str,
        result: Result<Option<Bytes>, String>,
    ) {
        let Some(reqs) = self.readers.remove(key) else {
            return;
        };
        self.waiting -= reqs.len();
        let result = match result {
            Err(e) => Err(CacheError::Storage(e)),
            Ok(value) => {
                // A write applied while the read was in flight wins: it is newer than the volume.
                if !self.entries.contains_key(key) {
                    self.insert_clean(key.to_owned(), value);
                }
                Ok(CacheReply::Value(self.touch(key).unwrap_or(None)))
            }
        };
        for req in reqs {
            self.reply(req, result.clone());
        }
        self.evict();
        self.maybe_flush(now);
    }

    /// Lists keys under `prefix` (shared volume merged with unflushed writes).
    pub fn handle_list(&mut self, now: Monotonic, req: RequestId, prefix: &str) {
        self.handle_list_within(now, req, prefix, None);
    }

    /// Lists keys under `prefix` with at most `depth` components after it ([`within_depth`]).
    pub fn handle_list_within(
        &mut self,
        now: Monotonic,
        req: RequestId,
        prefix: &str,
        depth: Option<usize>,
    ) {
        if self.waiting >= self.limits.readers_max {
            return self.reply(
                req,
                Err(CacheError::ReadersBusy {
                    max: self.limits.readers_max,
                }),
            );
        }
        self.waiting += 1;
        self.lists.insert(req, (prefix.to_owned(), depth));
        self.actions.push_back(CacheAction::ListShared {
            req,
            prefix: prefix.to_owned(),
            depth,
        });
        self.maybe_flush(now);
    }

    /// The shared volume answered a list.
    pub fn handle_list_done(
        &mut self,
        now: Monotonic,
        req: RequestId,
        result: Result<Vec<String>, String>,
    ) {
        let Some((prefix, depth)) = self.lists.remove(&req) else {
            return;
        };
        self.waiting -= 1;
        let result = result.map_err(CacheError::Storage).map(|found| {
            let mut keys: std::collections::BTreeSet<String> = found
                .into_iter()
                .filter(|k| within_depth(k, &prefix, depth))
                .collect();
            // The cache is authoritative where it has an entry (the master is the only writer).
            for (k, e) in self.entries.range(prefix.clone()..) {
                if !k.starts_with(&prefix) {
                    break;
                }
                if !within_depth(k, &prefix, depth) {
                    continue;
                }
                if e.value.is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
            let truncated = keys.len() > self.limits.list_keys_max;
            CacheReply::Keys {
                keys: keys.into_iter().take(self.limits.list_keys_max).collect(),
                truncated,
            }
        });
        self.reply(req, result);
        self.maybe_flush(now);
    }

    /// Writes a value.
    pub fn handle_set(&mut self, now: Monotonic, req: RequestId, key: &str, value: Bytes) {
        self.write(now, req, key, Some(value));
    }

    /// Deletes a key.
    pub fn handle_delete(&mut self, now: Monotonic, req: RequestId, key: &str) {
        self.write(now, req, key, None);
    }

    /// Writes several keys atomically: every write happens, or none (also across a crash at any
    /// point). Acknowledged once all are durable, with the version of the last.
    pub fn handle_write_all(
        &mut self,
        now: Monotonic,
        req: RequestId,
        writes: Vec<(String, Option<Bytes>)>,
    ) {
        self.write_group(now, req, writes);
    }

    fn write(&mut self, now: Monotonic, req: RequestId, key: &str, value: Option<Bytes>) {
        self.write_group(now, req, vec![(key.to_owned(), value)]);
    }

    fn write_group(
        &mut self,
        now: Monotonic,
        req: RequestId,
        writes: Vec<(String, Option<Bytes>)>,
    ) {
        let n = writes.len();
        if n == 0 || n > self.limits.group_writes_max {
            let max = self.limits.group_writes_max;
            return self.reply(req, Err(CacheError::BadGroup { len: n, max }));
        }
        let mut size = 0;
        for (key, value) in &writes {
            if let Err(e) = validate_key(key) {
                return self.reply(req, Err(CacheError::BadKey(e)));
            }
            let len = value.as_ref().map_or(0, |v| v.len() as u64);
            if len > self.limits.value_bytes_max {
                return self.reply(
                    req,
                    Err(CacheError::TooLarge {
                        len,
                        max: self.limits.value_bytes_max,
                    }),
                );
            }
            size += entry_bytes(key, value);
        }
        if self.dirty_bytes + size > self.limits.dirty_bytes_max {
            let e = CacheError::Busy {
                dirty_bytes: self.dirty_bytes,
                max: self.limits.dirty_bytes_max,
            };
            return self.reply(req, Err(e));
        }
        self.dirty_bytes += size;
        let first = self.next_seq;
        let group_last = first + n as u64 - 1;
        self.next_seq += n as u64;
        for (i, (key, value)) in writes.into_iter().enumerate() {
            let seq = first + i as u64;
            let part = match (n, i) {
                (1, _) => GroupPart::Whole,
                (_, 0) => GroupPart::First { len: n as u32 },
                _ => GroupPart::Next,
            };
            self.pending.insert(
                seq,
                PendingWrite {
                    req: (seq == group_last).then_some(req),
                    key: key.clone(),
                    value: value.clone(),
                    group_last,
                },
            );
            self.actions.push_back(CacheAction::JournalAppend {
                seq,
                key,
                value,
                part,
            });
        }
        self.maybe_flush(now);
    }

    /// Journal records up to `upto` are synced: apply and acknowledge those writes, in order, a
    /// group only once all of it is synced.
    pub fn handle_journal_synced(&mut self, now: Monotonic, upto: u64) {
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().group_last > upto {
                break;
            }
            let (seq, w) = entry.remove_entry();
            self.dirty_bytes -= entry_bytes(&w.key, &w.value);
            self.apply(now, seq, w.key, w.value);
            self.synced_upto = seq;
            if let Some(req) = w.req {
                self.reply(req, Ok(CacheReply::Written { version: seq }));
            }
        }
        self.evict();
        self.maybe_flush(now);
    }

    /// Makes a durable write visible as a dirty entry.
    fn apply(&mut self, now: Monotonic, seq: u64, key: String, value: Option<Bytes>) {
        let size = entry_bytes(&key, &value);
        self.dirty_bytes += size;
        let flushing = match self.entries.get_mut(&key) {
            Some(e) => {
                let old = entry_bytes(&key, &e.value);
                if e.dirty {
                    self.dirty_bytes -= old;
                    self.dirty.remove(&e.version);
                    self.idle.remove(&e.version);
                } else {
                    self.clean_bytes -= old;
                    self.lru.remove(&e.lru_tick);
                    e.dirty = true;
                    e.dirty_since = now;
                    e.dirty_from = seq;
                    self.unflushed.insert((seq, key.clone()));
                }
                e.value = value;
                e.version = seq;
                e.flushing.is_some()
            }
            None => {
                let e = Entry {
                    value,
                    version: seq,
                    dirty: true,
                    dirty_from: seq,
                    flushing: None,
                    dirty_since: now,
                    lru_tick: 0,
                };
                self.entries.insert(key.clone(), e);
                self.unflushed.insert((seq, key.clone()));
                false
            }
        };
        // An entry being flushed becomes flushable again when that flush completes.
        if !flushing {
            self.idle.insert(seq, key.clone());
        }
        self.dirty.insert(seq, key);
    }

    fn insert_clean(&mut self, key: String, value: Option<Bytes>) {
        self.clean_bytes += entry_bytes(&key, &value);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.lru.insert(tick, key.clone());
        let e = Entry {
            value,
            version: 0,
            dirty: false,
            dirty_from: 0,
            flushing: None,
            dirty_since: Monotonic(0),
            lru_tick: tick,
        };
        self.entries.insert(key, e);
    }

    fn evict(&mut self) {
        while self.clean_bytes > self.limits.clean_bytes_max {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                debug_assert!(!e.dirty);
                self.clean_bytes -= entry_bytes(&key, &e.value);
            }
        }
    }

    /// The shared volume finished (or failed) a flush batch.
    pub fn handle_flush_done(&mut self, now: Monotonic, batch: u64, result: Result<(), String>) {
        let Some(writes) = self.flushes.remove(&batch) else {
            return;
        };
        let ok = result.is_ok();
        for (key, version) in writes {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            debug_assert_eq!(e.flushing, Some(version));
            e.flushing = None;
            if ok && e.version == version {
                e.dirty = false;
                self.dirty.remove(&version);
                self.unflushed.remove(&(e.dirty_from, key.clone()));
                let size = entry_bytes(&key, &e.value);
                self.dirty_bytes -= size;
                self.clean_bytes += size;
                e.lru_tick = self.next_tick;
                self.next_tick += 1;
                self.lru.insert(e.lru_tick, key);
            } else {
                if ok {
                    // Written again meanwhile: what the flush carried is on the volume, so only
                    // writes after it are unflushed.
                    self.unflushed.remove(&(e.dirty_from, key.clone()));
                    e.dirty_from = version + 1;
                    self.unflushed.insert((e.dirty_from, key.clone()));
                }
                // Failed, or written again meanwhile: still dirty, flushable again.
                self.idle.insert(e.version, key);
            }
        }
        if !ok {
            self.flush_not_before = now.plus_ms(self.limits.flush_retry_ms);
        }
        self.maybe_truncate();
        self.evict();
        self.maybe_flush(now);
    }

    /// Lets the journal drop every record below the oldest unflushed write.
    fn maybe_truncate(&mut self) {
        let needed_from = self.dirty.keys().next().copied();
        let upto = needed_from.map_or(self.synced_upto, |v| (v - 1).min(self.synced_upto));
        if upto > self.truncated_upto {
            self.truncated_upto = upto;
            self.actions
                .push_back(CacheAction::JournalTruncate { upto });
        }
    }

    /// Starts flushes whose time has come.
    pub fn handle_timeout(&mut self, now: Monotonic) {
        self.maybe_flush(now);
    }

    /// The oldest dirty entry that is not being flushed: its `dirty_since`.
    fn oldest_flushable(&self) -> Option<Monotonic> {
        self.idle
            .values()
            .next()
            .and_then(|k| self.entries.get(k))
            .map(|e| e.dirty_since)
    }

    fn maybe_flush(&mut self, now: Monotonic) {
        while self.flushes.len() < self.limits.flushes_in_flight_max && now >= self.flush_not_before
        {
            let flushable = self.idle.len();
            if flushable == 0 {
                return;
            }
            let old_enough = self
                .oldest_flushable()
                .is_some_and(|t| now.since_ms(t) >= self.limits.flush_age_max_ms);
            if flushable < self.limits.flush_batch_max && !old_enough {
                return;
            }
            let batch = self.next_batch;
            self.next_batch += 1;
            let mut writes = Vec::new();
            let mut keys = Vec::new();
            while writes.len() < self.limits.flush_batch_max {
                let Some((_, key)) = self.idle.pop_first() else {
                    break;
                };
                let Some(e) = self.entries.get_mut(&key) else {
                    continue;
                };
                debug_assert!(e.flushing.is_none());
                e.flushing = Some(e.version);
                writes.push(FlushWrite {
                    key: key.clone(),
                    value: e.value.clone(),
                    version: e.version,
                });
                keys.push((key.clone(), e.version));
            }
            self.flushes.insert(batch, keys);
            self.actions.push_back(CacheAction::Flush { batch, writes });
        }
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<CacheAction> {
        self.actions.pop_front()
    }

    /// When to call `handle_timeout` next.
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        if self.flushes.len() >= self.limits.flushes_in_flight_max {
            return None; // A flush completion will wake us.
        }
        let age_due = self
            .oldest_flushable()?
            .plus_ms(self.limits.flush_age_max_ms);
        Some(age_due.max(self.flush_not_before))
    }
}

#[cfg(test)]
mod tests;
