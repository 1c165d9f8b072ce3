//! Reading stored event batches (docs/events.md, "Storage"): one client's artifact's batches of
//! one UTC day live in the directory `paths::events_day`, as records of the nodes' segment runs
//! (the write-behind buffer appends every flush's batches as one run per directory). A batch
//! stored twice — resent after a lost acknowledgement, or to another frontend after a failover —
//! has the same name both times; a reader takes each name once.
//!
//! [`DayReader`] finds a day's runs through the segment index files and reads them in two passes
//! so that memory is bounded by names, not by events: the first reads each new run and keeps only
//! its records' names; the second hands out the batches in name order (stream, then number),
//! holding at most [`RUNS_HELD_MAX`] runs (each at most `segments::RUN_BYTES_MAX`). Called again
//! (to follow a day), it reads only runs it has not read before and hands out only names it has
//! not handed out.

use super::segments::{Record, RunRef, index_runs, read_run};
use super::volume::Volume;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;

/// Runs held in memory at once by the second pass.
pub const RUNS_HELD_MAX: usize = 8;
/// Batch names one day's reader remembers having handed out; beyond it a follow starts its day
/// again from what is new (a day holding more batches is read whole, but not followed exactly).
pub const NAMES_REMEMBERED_MAX: usize = 4_000_000;

/// One day directory's batches, read as they are stored.
pub struct DayReader {
    dir: String,
    /// Runs read (by file and offset).
    read: BTreeSet<(String, u64)>,
    /// Names handed out.
    emitted: BTreeSet<String>,
    /// Runs that did not parse whole (left by a failed flush; their batches were written again).
    pub skipped: u64,
}

impl DayReader {
    /// A reader of directory `dir`.
    pub fn new(dir: &str) -> DayReader {
        DayReader {
            dir: dir.to_owned(),
            read: BTreeSet::new(),
            emitted: BTreeSet::new(),
            skipped: 0,
        }
    }

    /// Every batch stored in runs not read before and not handed out before, in name order, to
    /// `emit` (which stops the read by answering false). Answers how many were handed out.
    pub async fn read_new<V: Volume>(
        &mut self,
        volume: &V,
        emit: &mut (dyn FnMut(Record) -> bool + Send),
    ) -> io::Result<u64> {
        let runs = index_runs(volume, &self.dir).await?;
        self.read_runs(volume, runs, emit).await
    }

    /// [`DayReader::read_new`] over `runs`, the day's runs found by the caller (one pass over the
    /// index files for many days: `segments::index_runs_where`).
    pub async fn read_runs<V: Volume>(
        &mut self,
        volume: &V,
        runs: Vec<RunRef>,
        emit: &mut (dyn FnMut(Record) -> bool + Send),
    ) -> io::Result<u64> {
        let runs: Vec<RunRef> = runs
            .into_iter()
            .filter(|r| !self.read.contains(&(r.file.clone(), r.offset)))
            .collect();
        // Pass 1: the names each new run holds.
        let mut order: BTreeMap<String, usize> = BTreeMap::new();
        let mut good: Vec<Option<RunRef>> = Vec::with_capacity(runs.len());
        for (i, run) in runs.iter().enumerate() {
            self.read.insert((run.file.clone(), run.offset));
            match read_run(volume, &self.dir, run).await {
                Ok(records) => {
                    for (k, _) in records {
                        if !self.emitted.contains(&k) {
                            order.entry(k).or_insert(i);
                        }
                    }
                    good.push(Some(run.clone()));
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.skipped += 1;
                    good.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        // Pass 2: in name order, a few runs held at a time.
        let mut held: VecDeque<(usize, BTreeMap<String, Bytes>)> = VecDeque::new();
        let mut n = 0;
        for (name, i) in order {
            let pos = match held.iter().position(|(j, _)| *j == i) {
                Some(p) => p,
                None => {
                    let Some(run) = &good[i] else { continue };
                    let records = read_run(volume, &self.dir, run).await?;
                    if held.len() >= RUNS_HELD_MAX {
                        held.pop_front();
                    }
                    held.push_back((i, records.into_iter().collect()));
                    held.len() - 1
                }
            };
            let Some(value) = held[pos].1.remove(&name) else {
                continue;
            };
            if self.emitted.len() >= NAMES_REMEMBERED_MAX {
                self.emitted.clear();
            }
            self.emitted.insert(name.clone());
            n += 1;
            if !emit((name, value)) {
                break;
            }
        }
        Ok(n)
    }
}
