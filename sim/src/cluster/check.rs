//! The checkers: the invariants of docs/architecture.md ("Invariants"), read from what the simulated
//! world holds — the shared volume and the nodes' local disks, as a crash would leave them — and
//! compared with what the users were told (the API's answers, the agents' acknowledgements), never
//! with what the nodes say about themselves. [`Samples`] runs every virtual second, [`converged`]
//! decides the liveness phase, [`final_state`] runs once at the end.
//!
//! The master's metadata is read as a restart would read it ([`MetaView`]): the volume, overlaid
//! with the writes its datastore journal holds durably (acknowledged, maybe not yet flushed).

use super::driver::{LabelState, Told};
use crate::world::{SimLocalDisk, SimVolume, under};
use bytes::Bytes;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use talon_core::{ClientId, FlowId, HuntId, paths};
use talon_io::cluster::{EPOCH_FILE, JOURNAL_DIR, OUTBOX_SEGMENT_BYTES};
use talon_io::storage::datastore::{DatastoreOptions, replay_journal};
use talon_io::storage::filestore::BUFFER_DIR;
use talon_io::storage::journal::Journal;
use talon_io::storage::local::LocalDisk;
use talon_io::storage::records::{
    ClientJson, FlowJson, FlowRecordState, HuntJson, ParticipantJson,
};
use talon_io::storage::segments;
use talon_proto::api;
use talon_proto::comms::{self, flow_message};

/// The deployment the checkers judge.
#[derive(Clone, Debug)]
pub struct Deployment {
    /// Every legitimate client, in index order (client `i` reports hostname `sim-i`).
    pub clients: Vec<ClientId>,
    /// Clients that leave for good during the safety phase: their unfinished work stays unfinished.
    pub departed: BTreeSet<ClientId>,
    /// The minions' node names (`<host>-<port>`).
    pub minions: Vec<String>,
    /// The replication outbox's bound (events held).
    pub outbox_events_max: usize,
}

type Files = BTreeMap<String, Bytes>;

fn is_message(k: &str) -> bool {
    k.starts_with("clients/") && k.contains("/messages/")
}

/// The records of the run at `offset..offset + len` of `data`, if it parses whole (a run that
/// does not, left by a failed flush, holds nothing: its messages were flushed again).
fn run_records(files: &Files, data: &str, offset: u64, len: u64) -> Option<Vec<segments::Record>> {
    let bytes = files.get(data)?;
    let (start, end) = (
        usize::try_from(offset).ok()?,
        usize::try_from(offset + len).ok()?,
    );
    if end > bytes.len() {
        return None;
    }
    let (records, used) = segments::parse_records(&bytes.slice(start..end));
    (used == end - start && !records.is_empty()).then_some(records)
}

/// Every flow message the filestore holds as an audit finds it: the message files of the old
/// layout, and the records of the runs every segment index file names (a message stored twice
/// once, the first found).
pub fn messages(files: &Files) -> Files {
    let mut out: Files = files
        .iter()
        .filter(|(k, _)| is_message(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in under(files, &format!("{}/", segments::SEGMENTS_DIR)) {
        let Some(data) = segments::data_file_of(k) else {
            continue;
        };
        for e in segments::parse_index(v) {
            for (key, value) in run_records(files, &data, e.offset, e.len).unwrap_or_default() {
                out.entry(key).or_insert(value);
            }
        }
    }
    out
}

/// What a reader of a completed flow finds through the runs its record names (or, with none, by
/// listing its message files): what `flow results`, `hunt results` and upload reassembly read.
fn stored_via_runs(files: &Files, f: &FlowJson) -> Result<Stored, String> {
    let dir = format!("clients/{}/flows/{}/messages", f.client_id, f.flow_id);
    if f.runs.is_empty() {
        return stored(files, &f.client_id, &f.flow_id);
    }
    let mut found = Files::new();
    for r in &f.runs {
        let records = if r.whole {
            files
                .get(&r.file)
                .map(|v| vec![(r.file.clone(), v.clone())])
        } else {
            run_records(files, &r.file, r.offset, r.len)
        };
        let Some(records) = records else {
            return Err(format!(
                "readers: the record of flow {} of {} names run {r:?}, which the volume does not hold",
                f.flow_id, f.client_id
            ));
        };
        for (k, v) in records {
            if k.rsplit_once('/').map(|(d, _)| d) == Some(dir.as_str()) {
                found.entry(k).or_insert(v);
            }
        }
    }
    stored(&found, &f.client_id, &f.flow_id)
}

/// The master's datastore journal as a crash would leave it: the writes a restart replays on top of
/// the volume.
#[derive(Clone, Debug, Default)]
pub struct MetaView {
    journal: BTreeMap<String, Option<Bytes>>,
}

impl MetaView {
    /// Reads the durable part of the master's journal from `master` (a copy, crashed).
    pub fn read(master: &SimLocalDisk) -> Result<MetaView, String> {
        let dir = DatastoreOptions::default().journal_dir;
        let copy = master.durable_copy_under(&[&format!("{dir}/")]);
        let records = replay_journal(copy, &dir)
            .map_err(|e| format!("the master's datastore journal cannot be recovered: {e}"))?;
        let mut journal = BTreeMap::new();
        for r in records {
            journal.insert(r.key, r.value);
        }
        Ok(MetaView { journal })
    }

    /// The metadata over `files` (the volume's contents).
    pub fn on<'a>(&'a self, files: &'a Files) -> Meta<'a> {
        Meta {
            volume: files,
            journal: &self.journal,
        }
    }
}

/// The master's metadata as a restart would read it.
#[derive(Clone, Copy)]
pub struct Meta<'a> {
    volume: &'a Files,
    journal: &'a BTreeMap<String, Option<Bytes>>,
}

impl<'a> Meta<'a> {
    /// A key's value.
    pub fn get(&self, key: &str) -> Option<&'a Bytes> {
        match self.journal.get(key) {
            Some(v) => v.as_ref(),
            None => self.volume.get(key),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        serde_json::from_slice(self.get(key)?).ok()
    }

    /// Keys under `prefix` whose name ends with `suffix`, sorted.
    fn keys(&self, prefix: &str, suffix: &str) -> Vec<&'a str> {
        let from = (
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        );
        let mut out: BTreeSet<&'a str> = self
            .volume
            .range::<str, _>(from)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.as_str())
            .filter(|k| k.ends_with(suffix) && !self.journal.contains_key(*k))
            .collect();
        for (k, v) in self.journal.range::<str, _>(from) {
            if !k.starts_with(prefix) {
                break;
            }
            if v.is_some() && k.ends_with(suffix) {
                out.insert(k.as_str());
            }
        }
        out.into_iter().collect()
    }

    fn flow_records(&self) -> Vec<FlowJson> {
        self.keys("clients/", "/record.json")
            .into_iter()
            .filter(|k| k.contains("/flows/"))
            .filter_map(|k| self.json::<FlowJson>(k))
            .collect()
    }

    fn hunts(&self) -> Vec<HuntJson> {
        self.keys("hunts/", "/record.json")
            .into_iter()
            .filter(|k| k.matches('/').count() == 2)
            .filter_map(|k| self.json::<HuntJson>(k))
            .collect()
    }

    /// A hunt's participants: client → participation.
    fn participants(&self, hunt: &str) -> BTreeMap<String, ParticipantJson> {
        let prefix = format!("hunts/{hunt}/clients/");
        self.keys(&prefix, ".json")
            .into_iter()
            .filter_map(|k| {
                let client = k.strip_prefix(&prefix)?.strip_suffix(".json")?;
                Some((client.to_owned(), self.json::<ParticipantJson>(k)?))
            })
            .collect()
    }
}

/// What the filestore on the volume holds of one flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Result rows, each stored message counted once.
    pub rows: u64,
    /// Bytes of upload chunks.
    pub upload_bytes: u64,
    /// The final status, if stored: (completed?, total rows, total upload bytes it claims).
    pub status: Option<(bool, u64, u64)>,
}

fn stored(files: &Files, client: &str, flow: &str) -> Result<Stored, String> {
    let mut s = Stored::default();
    for (k, bytes) in under(files, &format!("clients/{client}/flows/{flow}/messages/")) {
        let msg = comms::FlowMessage::decode(bytes.clone())
            .map_err(|e| format!("invariant 1: {k} does not decode: {e}"))?;
        match msg.payload {
            Some(flow_message::Payload::Rows(r)) => s.rows += r.rows.len() as u64,
            Some(flow_message::Payload::FileChunk(c)) => s.upload_bytes += c.data.len() as u64,
            Some(flow_message::Payload::Status(st)) => {
                let done = st.state == comms::FlowState::Completed as i32;
                s.status = Some((done, st.total_rows, st.total_uploaded_bytes));
            }
            _ => {}
        }
    }
    Ok(s)
}

/// What a `Generic.Test.Rows` flow with these parameters returns: (rows, uploads, bytes each).
fn expected(params: &BTreeMap<String, String>) -> (u64, u64, u64) {
    let n = |k: &str, d: u64| params.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    (n("count", 10), n("uploads", 0), n("upload_size", 1024))
}

/// A minion's outbox as its local disk holds it: (epoch, highest sequence number assigned, events
/// not yet truncated, the truncation mark: what the master acknowledged).
fn outbox(disk: &SimLocalDisk, durable_only: bool) -> Result<(u64, u64, Vec<u64>, u64), String> {
    let prefixes = [EPOCH_FILE, &format!("{JOURNAL_DIR}/")];
    let copy = if durable_only {
        // What would survive a power cut now: only that may be known to the master.
        disk.durable_copy_under(&prefixes)
    } else {
        disk.copy_under(&prefixes)
    };
    let mut c = copy.clone();
    let epoch = match c.read(EPOCH_FILE).map_err(|e| e.to_string())? {
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{EPOCH_FILE}: {e}"))?,
        None => return Ok((0, 0, vec![], 0)),
    };
    let (_, rec) = Journal::open(copy, JOURNAL_DIR, OUTBOX_SEGMENT_BYTES)
        .map_err(|e| format!("outbox journal: {e}"))?;
    let seqs: Vec<u64> = rec.records.iter().map(|r| r.0).collect();
    let top = seqs.last().copied().unwrap_or(0).max(rec.truncated_upto);
    Ok((epoch, top, seqs, rec.truncated_upto))
}

/// The keys a frontend's write-behind buffer holds durably (not yet, or not known to be, on the
/// volume).
fn buffered(disk: &SimLocalDisk) -> Result<BTreeSet<String>, String> {
    let copy = disk.durable_copy_under(&[&format!("{BUFFER_DIR}/")]);
    let records = replay_journal(copy, BUFFER_DIR)
        .map_err(|e| format!("a filestore buffer cannot be recovered: {e}"))?;
    Ok(records
        .into_iter()
        .filter(|r| r.value.is_some())
        .map(|r| r.key)
        .collect())
}

fn host_of(node: &str) -> &str {
    node.rsplit_once('-').map_or(node, |(h, _)| h)
}

/// The master's replication cursor for `node`: (epoch, high-water mark).
fn cursor(meta: &Meta<'_>, node: &str) -> Option<(u64, u64)> {
    let key = format!("cluster/minions/{}.json", paths::safe_component(node));
    let v: serde_json::Value = meta.json(&key)?;
    Some((v.get("epoch")?.as_u64()?, v.get("hwm")?.as_u64()?))
}

/// Per hunt on storage: (participants, completed, errors, rows, uploaded bytes).
type Counts = (u64, u64, u64, u64, u64);

fn counts(participants: &BTreeMap<String, ParticipantJson>) -> Counts {
    let mut c = (participants.len() as u64, 0, 0, 0, 0);
    for p in participants.values() {
        match *p {
            ParticipantJson::Completed {
                rows,
                uploaded_bytes,
            } => {
                c.1 += 1;
                c.3 += rows;
                c.4 += uploaded_bytes;
            }
            ParticipantJson::Error {
                rows,
                uploaded_bytes,
            } => {
                c.2 += 1;
                c.3 += rows;
                c.4 += uploaded_bytes;
            }
            ParticipantJson::Scheduled => {}
        }
    }
    c
}

/// State the checkers carry between samples. It follows the volume through its change feed
/// ([`SimVolume::take_changes`]), so a sample costs what changed, not what is stored.
#[derive(Default)]
pub struct Samples {
    /// Every stored flow message seen so far: it must stay, unchanged.
    seen: BTreeMap<String, Bytes>,
    /// Segment index files: the entries followed so far.
    indexed: BTreeMap<String, usize>,
    /// Segment index entries whose runs did not parse yet (their data was still being appended,
    /// or a failed flush left them): index file → entry numbers.
    unresolved: BTreeMap<String, Vec<usize>>,
    /// The highest durable replication cursor seen per minion: (epoch, high-water mark).
    cursors: BTreeMap<String, (u64, u64)>,
    /// Flows (`client/flow`) whose reported completion was found on the volume: they stay so.
    visible: BTreeSet<String>,
    /// The participant records on the volume: hunt → client → participation.
    participants: BTreeMap<String, BTreeMap<String, ParticipantJson>>,
    /// Acknowledged (unsettled) messages not on the volume at the last sample: checked against the
    /// frontends' durable buffers now if still not on the volume.
    deferred: Vec<String>,
    /// The master's metadata as the last sample read it (`converged` reads it too, right after).
    view: MetaView,
}

/// What the harness passes to a sample.
pub struct World<'a> {
    /// The shared volume.
    pub volume: &'a SimVolume,
    /// Each frontend's local disk, by host.
    pub disks: &'a BTreeMap<String, SimLocalDisk>,
    /// A frontend lost its local disk since the last sample (its unsettled acknowledgements may
    /// be gone: the clients resend them).
    pub disk_lost: bool,
}

/// `hunts/<hunt>/clients/<client>.json` → (hunt, client).
fn participant_key(k: &str) -> Option<(&str, &str)> {
    let rest = k.strip_prefix("hunts/")?;
    let (hunt, rest) = rest.split_once("/clients/")?;
    Some((hunt, rest.strip_suffix(".json")?))
}

fn is_flow_record(k: &str) -> bool {
    k.starts_with("clients/") && k.contains("/flows/") && k.ends_with("/record.json")
}

impl Samples {
    /// Checks what must hold at every instant, appending what broke to `out`. Takes the driver's and
    /// the agents' new observations out of `told`.
    pub fn sample(
        &mut self,
        now_ms: u64,
        w: &World<'_>,
        d: &Deployment,
        told: &mut Told,
        out: &mut Vec<String>,
    ) {
        let at = format!("at {:.1} virtual s", now_ms as f64 / 1000.0);
        let view = match w.disks.get("master").map(MetaView::read) {
            Some(Ok(v)) => v,
            Some(Err(e)) => return out.push(format!("invariant 5 {at}: {e}")),
            None => MetaView::default(),
        };
        // Kept for `converged` (put back at the end of the sample).
        let changes = w.volume.take_changes();
        let acks = std::mem::take(&mut told.acks);
        let stats = std::mem::take(&mut told.seen_stats);
        let done = std::mem::take(&mut told.seen_done);
        let deferred = std::mem::take(&mut self.deferred);
        let mut unbuffered = Vec::new();
        let cursors = w.volume.inspect(|files| {
            let meta = view.on(files);
            self.follow(files, &changes, &at, out);
            // 1. What a client was told is settled is on the volume; what it was told is
            // acknowledged is on the volume or in a frontend's durable buffer (looked for there
            // only if it is still not on the volume a sample later: usually it is by then).
            for (client, flow, seq, settled) in &acks {
                let (Ok(c), Ok(f)) = (ClientId::parse(client), FlowId::parse(flow)) else {
                    out.push(format!("an agent was acknowledged a malformed flow {flow}"));
                    continue;
                };
                let key = paths::flow_message(&c, &f, *seq);
                if self.seen.contains_key(&key) {
                    continue;
                }
                if *settled {
                    out.push(format!(
                        "invariant 1 {at}: {client} was told message {seq} of {flow} is settled; it is not on the volume"
                    ));
                } else if !w.disk_lost {
                    // (An acknowledgement in flight when its frontend lost its disk may name a
                    // message that is gone: the client still holds it and resends it.)
                    self.deferred.push(key);
                }
            }
            if !w.disk_lost {
                unbuffered.extend(deferred.into_iter().filter(|k| !self.seen.contains_key(k)));
            }
            self.live_stats(&meta, &stats, d, &at, out);
            self.visibility(&meta, &view, &changes, &done, &at, out);
            d.minions
                .iter()
                .map(|m| (m.clone(), cursor(&meta, m)))
                .collect::<BTreeMap<_, _>>()
        });
        if !unbuffered.is_empty() {
            let mut held = BTreeSet::new();
            for disk in w.disks.values() {
                match buffered(disk) {
                    Ok(keys) => held.extend(keys),
                    Err(e) => out.push(format!("invariant 1 {at}: {e}")),
                }
            }
            for key in unbuffered.into_iter().filter(|k| !held.contains(k)) {
                out.push(format!(
                    "invariant 1 {at}: acknowledged message {key} is neither on the volume nor in a frontend's durable buffer"
                ));
            }
        }
        for (node, c) in cursors {
            self.replication(&node, c, w, d, &at, out);
        }
        self.view = view;
    }

    /// Follows the volume's changes: invariant 1 (a stored, hence acknowledged, flow message is
    /// never lost or changed), and the participant records the other checks count.
    fn follow(
        &mut self,
        files: &Files,
        changes: &BTreeSet<String>,
        at: &str,
        out: &mut Vec<String>,
    ) {
        for k in changes {
            let now = files.get(k);
            if is_message(k) {
                match (self.seen.get(k), now) {
                    (Some(_), None) => {
                        out.push(format!("invariant 1 {at}: stored message {k} disappeared"))
                    }
                    (Some(old), Some(now)) if now.as_ptr() != old.as_ptr() && now != old => {
                        out.push(format!("invariant 1 {at}: stored message {k} changed"))
                    }
                    (None, Some(now)) => {
                        self.seen.insert(k.clone(), now.clone());
                    }
                    _ => {}
                }
            } else if let Some(index) = k
                .strip_prefix(&format!("{}/", segments::SEGMENTS_DIR))
                .map(|_| k.replace(".data", ".index"))
                .filter(|i| i.ends_with(".index"))
            {
                // A segment file grew: the messages of the runs its index names are stored now. A
                // writer appends to the data and the index files concurrently, so an entry may be
                // seen before its run: it is looked at again when either file changes (a failed
                // flush's run never parses, and stays pending).
                self.follow_index(files, &index, at, out);
            } else if let Some((hunt, client)) = participant_key(k) {
                let of_hunt = self.participants.entry(hunt.to_owned()).or_default();
                match now.and_then(|b| serde_json::from_slice::<ParticipantJson>(b).ok()) {
                    Some(p) => of_hunt.insert(client.to_owned(), p),
                    None => of_hunt.remove(client),
                };
            }
        }
    }

    /// Takes the new entries of a segment index, and the pending ones, whose runs now parse.
    fn follow_index(&mut self, files: &Files, index: &str, at: &str, out: &mut Vec<String>) {
        let Some(data) = segments::data_file_of(index) else {
            return;
        };
        let entries = files
            .get(index)
            .map(|b| segments::parse_index(b))
            .unwrap_or_default();
        let done = self.indexed.get(index).copied().unwrap_or(0);
        if entries.len() < done {
            out.push(format!(
                "invariant 1 {at}: segment index {index} lost entries ({done} followed, {} now)",
                entries.len()
            ));
        }
        let pending = self.unresolved.remove(index).unwrap_or_default();
        let mut still = Vec::new();
        for i in pending.into_iter().chain(done..entries.len()) {
            let Some(e) = entries.get(i) else { continue };
            let Some(records) = run_records(files, &data, e.offset, e.len) else {
                still.push(i);
                continue;
            };
            for (key, value) in records {
                match self.seen.get(&key) {
                    Some(old) if *old != value => out.push(format!(
                        "invariant 1 {at}: stored message {key} changed (in {data})"
                    )),
                    Some(_) => {}
                    None => {
                        self.seen.insert(key, value);
                    }
                }
            }
        }
        if !still.is_empty() {
            self.unresolved.insert(index.to_owned(), still);
        }
        self.indexed
            .insert(index.to_owned(), entries.len().max(done));
    }

    /// A hunt's participants as a restart would read them: the volume's, under the journal's.
    fn participants_of(&self, meta: &Meta<'_>, hunt: &str) -> BTreeMap<String, ParticipantJson> {
        let mut all = self.participants.get(hunt).cloned().unwrap_or_default();
        let prefix = format!("hunts/{hunt}/clients/");
        let from = (
            std::ops::Bound::Included(prefix.as_str()),
            std::ops::Bound::Unbounded,
        );
        for (k, v) in meta.journal.range::<str, _>(from) {
            if !k.starts_with(&prefix) {
                break;
            }
            let Some((_, client)) = participant_key(k) else {
                continue;
            };
            match v.as_ref().and_then(|b| serde_json::from_slice(b).ok()) {
                Some(p) => all.insert(client.to_owned(), p),
                None => all.remove(client),
            };
        }
        all
    }

    /// Invariant 2 while hunts move: every figure the API reported is consistent and backed by
    /// participant records on storage (an in-memory double count shows up here before a restart
    /// recounts it away).
    fn live_stats(
        &self,
        meta: &Meta<'_>,
        seen: &[(u64, String, api::HuntStats)],
        d: &Deployment,
        at: &str,
        out: &mut Vec<String>,
    ) {
        let mut cache: BTreeMap<&str, Counts> = BTreeMap::new();
        for (t, hunt, s) in seen {
            let (n, completed, errors, rows, bytes) = *cache
                .entry(hunt.as_str())
                .or_insert_with(|| counts(&self.participants_of(meta, hunt)));
            let told = format!(
                "invariant 2 {at}: hunt {hunt} reported at {:.1} s scheduled/completed/errors/rows/bytes {:?}",
                *t as f64 / 1000.0,
                (s.scheduled, s.completed, s.errors, s.rows, s.uploaded_bytes)
            );
            let clients = d.clients.len() as u64;
            if s.completed + s.errors > s.scheduled || s.scheduled > n || n > clients {
                out.push(format!(
                    "{told}; storage holds {n} participants of {clients} clients"
                ));
            }
            if s.completed > completed
                || s.errors > errors
                || s.rows > rows
                || s.uploaded_bytes > bytes
            {
                out.push(format!(
                    "{told}; more than storage holds: completed/errors/rows/bytes {:?}",
                    (completed, errors, rows, bytes)
                ));
            }
        }
    }

    /// Visibility order: a flow reported finished anywhere readable (its record, its hunt
    /// participant, the API) has all of its messages on the shared volume. Looks at what changed
    /// on the volume, what the master's journal holds, and what the API said.
    #[allow(clippy::too_many_arguments)]
    fn visibility(
        &mut self,
        meta: &Meta<'_>,
        view: &MetaView,
        changes: &BTreeSet<String>,
        done: &[(String, String, u64, u64)],
        at: &str,
        out: &mut Vec<String>,
    ) {
        let mut reported: Vec<(String, String, u64, u64, &str)> = Vec::new();
        let candidates = changes.iter().chain(view.journal.keys());
        for k in candidates {
            if is_flow_record(k) {
                let Some(f) = meta.json::<FlowJson>(k) else {
                    continue;
                };
                if matches!(f.state, FlowRecordState::Completed | FlowRecordState::Error) {
                    reported.push((
                        f.client_id,
                        f.flow_id,
                        f.rows,
                        f.uploaded_bytes,
                        "its record",
                    ));
                }
            } else if let Some((hunt, client)) = participant_key(k) {
                let Some(
                    ParticipantJson::Completed {
                        rows,
                        uploaded_bytes,
                    }
                    | ParticipantJson::Error {
                        rows,
                        uploaded_bytes,
                    },
                ) = meta.json::<ParticipantJson>(k)
                else {
                    continue;
                };
                let (Ok(h), Ok(c)) = (HuntId::parse(hunt), ClientId::parse(client)) else {
                    continue;
                };
                let flow = FlowId::for_hunt(&h, &c).to_string();
                reported.push((
                    client.to_owned(),
                    flow,
                    rows,
                    uploaded_bytes,
                    "its hunt participant",
                ));
            }
        }
        for (c, f, rows, bytes) in done {
            reported.push((c.clone(), f.clone(), *rows, *bytes, "the API"));
        }
        for (client, flow, rows, bytes, by) in reported {
            let id = format!("{client}/{flow}");
            if self.visible.contains(&id) {
                continue;
            }
            match stored(&self.seen, &client, &flow) {
                Ok(s) if s.status.is_some() && s.rows == rows && s.upload_bytes == bytes => {
                    self.visible.insert(id);
                }
                Ok(s) => out.push(format!(
                    "visibility {at}: {by} reports flow {flow} of {client} finished with {rows} rows and {bytes} upload bytes; the volume holds {s:?}"
                )),
                Err(e) => out.push(e),
            }
        }
    }

    /// Invariant 4 on both sides of each minion's stream: the master's durable cursor only moves
    /// forward and never passes what the minion holds durably; and the minion never dropped from
    /// its outbox (what the master acknowledged) more than the master's durable cursor covers.
    fn replication(
        &mut self,
        node: &str,
        c: Option<(u64, u64)>,
        w: &World<'_>,
        d: &Deployment,
        at: &str,
        out: &mut Vec<String>,
    ) {
        let Some(disk) = w.disks.get(host_of(node)) else {
            return;
        };
        let (epoch, top, pending, truncated) = match outbox(disk, true) {
            Ok(o) => o,
            Err(e) => return out.push(format!("{node} {at}: its outbox cannot be recovered: {e}")),
        };
        // 7. The outbox holds at most its bound.
        if pending.len() > d.outbox_events_max {
            out.push(format!(
                "invariant 7 {at}: {node}'s outbox holds {} events, bound {}",
                pending.len(),
                d.outbox_events_max
            ));
        }
        // What the master has durably applied of this epoch (an older epoch's cursor: nothing).
        let applied = match c {
            Some((ce, hwm)) if ce == epoch => Some(hwm),
            Some((ce, _)) if ce > epoch => None, // The minion's disk is older than the master's view.
            _ => Some(0),
        };
        if let Some(applied) = applied
            && truncated > applied
        {
            out.push(format!(
                "invariant 4 {at}: {node} dropped its events up to {truncated} (epoch {epoch}) as acknowledged; the master's durable cursor covers only {applied}"
            ));
        }
        let Some((ce, hwm)) = c else { return };
        if let Some(&prev) = self.cursors.get(node)
            && (ce, hwm) < prev
        {
            out.push(format!(
                "invariant 4 {at}: {node}'s cursor went back from {prev:?} to {:?}",
                (ce, hwm)
            ));
        }
        self.cursors.insert(node.to_owned(), (ce, hwm));
        if ce == epoch && hwm > top {
            out.push(format!(
                "invariant 4 {at}: the master applied {node}'s events up to {hwm}, its durable outbox reaches only {top} (epoch {epoch})"
            ));
        }
    }
}

/// Whether a client's final labels put it in a hunt's population.
fn matches(h: &HuntJson, labels: &BTreeSet<String>) -> bool {
    h.include_labels.iter().all(|l| labels.contains(l))
        && !h.exclude_labels.iter().any(|l| labels.contains(l))
}

impl Samples {
    /// Whether the healed deployment has converged; `Err` names the first thing still missing. Call it
    /// right after a sample (it counts participants from the sample's view of the volume and reads
    /// the master's metadata as that sample did).
    pub fn converged(
        &self,
        volume: &SimVolume,
        disks: &BTreeMap<String, SimLocalDisk>,
        d: &Deployment,
        told: &Told,
        now_unix_ms: u64,
    ) -> Result<(), String> {
        if !told.quiet {
            return Err("the analyst's last calls answered".into());
        }
        let view = &self.view;
        volume.inspect(|files| {
        let meta = view.on(files);
        // 5. Everything the master acknowledged is on storage.
        for h in &told.hunts {
            let id = HuntId::parse(h).map_err(|e| format!("hunt id {h}: {e}"))?;
            if meta.get(&paths::hunt_record(&id)).is_none() {
                return Err(format!("acknowledged hunt {h} on storage"));
            }
        }
        for ((client, label), state) in &told.labels {
            let id = ClientId::parse(client).map_err(|e| e.to_string())?;
            let rec: Option<ClientJson> = meta.json(&paths::client_record(&id));
            let has = rec.is_some_and(|r| r.labels.contains(label));
            match state {
                LabelState::Present if !has => {
                    return Err(format!("acknowledged label {label} on {client}'s record"));
                }
                LabelState::Absent if has => {
                    return Err(format!("label {label} removed from {client}'s record"));
                }
                _ => {}
            }
        }
        let staying = |c: &str| !d.departed.iter().any(|x| x.as_str() == c);
        // Every participant of every hunt (also of hunts whose creation was not confirmed, stopped
        // or expired) has finished, but for clients that left.
        let enrolled: BTreeMap<String, ClientJson> = d
            .clients
            .iter()
            .filter_map(|c| Some((c.to_string(), meta.json(&paths::client_record(c))?)))
            .collect();
        // Every client that stays has enrolled (a late one may start just before healing).
        if let Some(c) = d.clients.iter().find(|c| staying(c.as_str()) && !enrolled.contains_key(c.as_str())) {
            return Err(format!("client {c} enrolled"));
        }
        for h in meta.hunts() {
            let parts = self.participants_of(&meta, &h.hunt_id);
            let unfinished = parts
                .iter()
                .filter(|(c, p)| staying(c) && matches!(p, ParticipantJson::Scheduled))
                .count();
            if unfinished > 0 {
                return Err(format!(
                    "hunt {} finished on {unfinished} more of its {} participants",
                    h.hunt_id,
                    parts.len()
                ));
            }
            // A running hunt reaches every enrolled client it matches (all are connected now).
            if h.state == "running" && h.expires_ms > now_unix_ms {
                let missing: Vec<&String> = enrolled
                    .iter()
                    .filter(|(c, r)| {
                        staying(c) && matches(&h, &r.labels) && !parts.contains_key(*c)
                    })
                    .map(|(c, _)| c)
                    .collect();
                if let Some(c) = missing.first() {
                    return Err(format!(
                        "running hunt {} scheduled on {} more matching clients (first {c})",
                        h.hunt_id,
                        missing.len()
                    ));
                }
            }
        }
        for (client, flow) in &told.collections {
            if !staying(client) {
                continue;
            }
            let (Ok(c), Ok(f)) = (ClientId::parse(client), FlowId::parse(flow)) else {
                return Err(format!("collection {client}/{flow} has a malformed id"));
            };
            let rec: Option<FlowJson> = meta.json(&paths::flow_record(&c, &f));
            if !rec.is_some_and(|r| r.state == FlowRecordState::Completed) {
                return Err(format!("collection {flow} on {client} completed"));
            }
        }
        // Every finished flow with uploads has them reassembled and recorded (whether it has all
        // of them is for the final check).
        if let Some(k) = meta.keys(paths::UPLOADS_PENDING, ".json").first() {
            return Err(format!("uploads reassembled ({k})"));
        }
        for k in meta.keys("tasks/", ".pb") {
            let client = k.split('/').nth(1).unwrap_or_default();
            if staying(client) {
                return Err(format!("pending task {k} delivered"));
            }
        }
        // Outboxes drained: nothing the minion holds is beyond what the master applied.
        for node in &d.minions {
            let Some(disk) = disks.get(host_of(node)) else {
                continue;
            };
            let (epoch, _, pending, _) = outbox(disk, false)?;
            let c = cursor(&meta, node);
            let applied = match c {
                Some((e, hwm)) if e == epoch => hwm,
                _ => 0,
            };
            let left = pending.iter().filter(|&&s| s > applied).count();
            if left > 0 {
                return Err(format!(
                    "{node}'s outbox drained ({left} events beyond the master's cursor {c:?}, epoch {epoch})"
                ));
            }
        }
        // Every flow of a client that stays has finished, also one whose creation was never
        // acknowledged (its task may still have been written: maybe happened). Last: it parses
        // every flow record.
        if let Some(f) = meta
            .flow_records()
            .into_iter()
            .find(|f| staying(&f.client_id) && matches!(f.state, FlowRecordState::Queued | FlowRecordState::Running))
        {
            return Err(format!("flow {} on {} finished", f.flow_id, f.client_id));
        }
        Ok(())
    })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SHA-256 of synthetic upload `index` of `size` bytes.
fn synthetic_sha256(index: u64, size: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = Vec::with_capacity(64 << 10);
    let mut at = 0;
    while at < size {
        buf.clear();
        let n = (size - at).min(64 << 10);
        buf.extend((0..n).map(|j| talon_io::agent::artifacts::synthetic_byte(index, at + j)));
        h.update(&buf);
        at += n;
    }
    hex(&h.finalize())
}

/// An event batch as the volume holds it: its name's parts and what it carries.
struct StoredBatch {
    day: String,
    /// The test events' numbers (`n`).
    ns: Vec<u64>,
    /// Events its stream had dropped before it.
    dropped: u64,
}

/// Client event streams (docs/events.md, "Forwarding: exactly once"), read from `msgs` (what
/// [`messages`] finds: every record of every segment run) and held to what the agents were
/// told (`settled`: client and `<artifact>/<stream>` → the batches acknowledged settled):
/// - every batch acknowledged settled is on the volume;
/// - a batch is stored under its own name (its stream and number are the name's);
/// - exactly once: no test event (its `n`) is in two batches of its stream;
/// - nothing lost silently: over the batches `0..=k` of a stream all acknowledged settled, the
///   numbers missing are exactly those the agent counted as dropped before batch `k`.
///
/// Answers the batches and events the volume holds.
pub fn check_events(
    msgs: &Files,
    settled: &BTreeMap<(String, String), BTreeSet<u64>>,
    out: &mut Vec<String>,
) -> (u64, u64) {
    // (client, `<artifact>/<stream>`) → seq → the batch.
    let mut streams: BTreeMap<(String, String), BTreeMap<u64, StoredBatch>> = BTreeMap::new();
    for (k, v) in msgs {
        let parts: Vec<&str> = k.split('/').collect();
        if parts.len() != 6 || parts[0] != "clients" || parts[2] != "events" {
            continue;
        }
        let (client, artifact, day) = (parts[1], parts[3], parts[4]);
        let Some((Ok(stream), Ok(seq))) = parts[5]
            .split_once('-')
            .map(|(a, b)| (a.parse::<u64>(), b.parse::<u64>()))
        else {
            out.push(format!("events: {k} is not named <stream>-<seq>"));
            continue;
        };
        let b = match comms::EventBatch::decode(v.clone()) {
            Ok(b) => b,
            Err(e) => {
                out.push(format!("events: {k} does not decode: {e}"));
                continue;
            }
        };
        if (b.artifact.as_str(), b.stream, b.seq, b.day.as_str()) != (artifact, stream, seq, day) {
            out.push(format!(
                "events: {k} holds batch {} of stream {} of {} (day {}): stored under another name",
                b.seq, b.stream, b.artifact, b.day
            ));
        }
        let ns = b
            .rows
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(r).ok()?["n"].as_u64())
            .collect();
        let batch = StoredBatch {
            day: day.to_owned(),
            ns,
            dropped: b.dropped,
        };
        let stream_key = (client.to_owned(), format!("{artifact}/{stream}"));
        if let Some(other) = streams.entry(stream_key).or_default().insert(seq, batch) {
            out.push(format!(
                "events: batch {seq} of stream {artifact}/{stream} of {client} is stored in day {} and day {}",
                other.day, day
            ));
        }
    }
    for ((client, stream), seqs) in settled {
        let stored = streams.get(&(client.clone(), stream.clone()));
        for seq in seqs {
            if !stored.is_some_and(|s| s.contains_key(seq)) {
                out.push(format!(
                    "events: batch {seq} of stream {stream} of {client} was acknowledged settled; the volume does not hold it"
                ));
            }
        }
    }
    for ((client, stream), batches) in &streams {
        let mut first: BTreeMap<u64, u64> = BTreeMap::new();
        for (seq, b) in batches {
            for n in &b.ns {
                if let Some(before) = first.insert(*n, *seq) {
                    out.push(format!(
                        "events: event {n} of stream {stream} of {client} is stored twice, in batches {before} and {seq}"
                    ));
                }
            }
        }
        // The run of batches from 0 all acknowledged settled.
        let acked = settled.get(&(client.clone(), stream.clone()));
        let upto = (0u64..)
            .take_while(|s| acked.is_some_and(|a| a.contains(s)))
            .last();
        let Some(k) = upto else { continue };
        let (mut count, mut newest) = (0u64, None::<u64>);
        for (_, b) in batches.range(..=k) {
            count += b.ns.len() as u64;
            newest = newest.max(b.ns.iter().copied().max());
        }
        let dropped = batches.get(&k).map_or(0, |b| b.dropped);
        let missing = newest.map_or(0, |n| n + 1).saturating_sub(count);
        if missing != dropped {
            out.push(format!(
                "events: stream {stream} of {client}: {missing} events are missing from batches 0..={k} (all acknowledged settled), {dropped} counted as dropped"
            ));
        }
    }
    let batches = streams.values().map(|b| b.len() as u64).sum();
    let events = streams
        .values()
        .flat_map(|b| b.values())
        .map(|b| b.ns.len() as u64)
        .sum();
    (batches, events)
}

/// The end state, from storage (invariants 1, 2, 3, 6), compared with what the API reported after
/// convergence (`told.stats`, `told.flows`), and the client event streams
/// ([`check_events`]).
pub fn final_state(
    files: &Files,
    view: &MetaView,
    d: &Deployment,
    told: &Told,
    out: &mut Vec<String>,
) -> (u64, u64) {
    let meta = view.on(files);
    let msgs = messages(files);
    let events = check_events(&msgs, &told.events_settled, out);
    let staying = |c: &str| !d.departed.iter().any(|x| x.as_str() == c);
    let mut flow_dirs = BTreeSet::new();
    let mut hunt_flows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in meta.flow_records() {
        flow_dirs.insert(format!("clients/{}/flows/{}", f.client_id, f.flow_id));
        if let Some(h) = &f.hunt_id {
            hunt_flows
                .entry((h.clone(), f.client_id.clone()))
                .or_default()
                .push(f.flow_id.clone());
        }
        let s = match stored(&msgs, &f.client_id, &f.flow_id) {
            Ok(s) => s,
            Err(e) => {
                out.push(e);
                continue;
            }
        };
        // What readers find through the record is what the filestore holds.
        if f.state.is_final() {
            match stored_via_runs(files, &f) {
                Ok(r) if r == s => {}
                Ok(r) => out.push(format!(
                    "readers: flow {} of {} reads as {r:?} through its record's runs; the filestore holds {s:?}",
                    f.flow_id, f.client_id
                )),
                Err(e) => out.push(e),
            }
        }
        let (rows, uploads, size) = expected(&f.params);
        let id = format!("flow {} of {}", f.flow_id, f.client_id);
        match f.state {
            FlowRecordState::Completed => {
                // 1. Every row and byte the client sent is stored, once, and the flow ended.
                let want = Stored {
                    rows,
                    upload_bytes: uploads * size,
                    status: Some((true, rows, uploads * size)),
                };
                if s != want {
                    out.push(format!(
                        "invariant 1: {id}: the volume holds {s:?}, expected {want:?}"
                    ));
                }
                if (f.rows, f.uploaded_bytes) != (s.rows, s.upload_bytes) {
                    out.push(format!(
                        "invariant 2: {id} recorded with {} rows and {} upload bytes, storage holds {} and {}",
                        f.rows, f.uploaded_bytes, s.rows, s.upload_bytes
                    ));
                }
                check_uploads(files, &f, uploads, size, out);
            }
            FlowRecordState::Error => out.push(format!("{id} ended in error: {}", f.error)),
            FlowRecordState::Queued | FlowRecordState::Running if staying(&f.client_id) => {
                out.push(format!("{id} never finished ({})", f.state.as_str()));
            }
            _ => {}
        }
    }
    // Nothing stored outside a flow that was created.
    let mut dirs = BTreeSet::new();
    for (k, _) in under(files, "clients/") {
        if let Some((dir, _)) = k.rsplit_once("/messages/") {
            dirs.insert(dir.to_owned());
        }
    }
    for dir in dirs.difference(&flow_dirs) {
        out.push(format!("{dir}: stored messages of a flow nobody created"));
    }
    for h in meta.hunts() {
        let Ok(hunt) = HuntId::parse(&h.hunt_id) else {
            out.push(format!("hunt {}: malformed id", h.hunt_id));
            continue;
        };
        let parts = meta.participants(&h.hunt_id);
        for c in &d.clients {
            // 3. Scheduled at most once: one flow per client per hunt, the hunt's own.
            let flows = hunt_flows
                .get(&(h.hunt_id.clone(), c.to_string()))
                .map_or(&[][..], Vec::as_slice);
            let own = FlowId::for_hunt(&hunt, c).to_string();
            if flows.len() > 1 || flows.iter().any(|f| *f != own) {
                out.push(format!(
                    "invariant 3: hunt {} has flows {flows:?} on {c}",
                    h.hunt_id
                ));
            }
            let Some(p) = parts.get(c.as_str()) else {
                continue;
            };
            if flows.is_empty() {
                out.push(format!(
                    "hunt {}: {c} participates but has no flow record",
                    h.hunt_id
                ));
                continue;
            }
            if let ParticipantJson::Completed {
                rows,
                uploaded_bytes,
            } = *p
            {
                match stored(&msgs, c.as_str(), &own) {
                    Ok(s) if (s.rows, s.upload_bytes) == (rows, uploaded_bytes) => {}
                    Ok(s) => out.push(format!(
                        "invariant 2: hunt {}: {c} recorded with {rows} rows and {uploaded_bytes} upload bytes, storage holds {s:?}",
                        h.hunt_id
                    )),
                    Err(e) => out.push(e),
                }
            }
        }
        // 2. The master's stats are exact: what it reports equals what storage holds.
        if let Some(s) = told.stats.get(&h.hunt_id) {
            let reported = (s.scheduled, s.completed, s.errors, s.rows, s.uploaded_bytes);
            let storage = counts(&parts);
            if reported != storage {
                out.push(format!(
                    "invariant 2: hunt {}: the master reports scheduled/completed/errors/rows/bytes {reported:?}, storage holds {storage:?}",
                    h.hunt_id
                ));
            }
        }
    }
    for h in &told.hunts {
        if !told.stats.contains_key(h) {
            out.push(format!("hunt {h}: the master did not report its stats"));
        }
    }
    for ((client, flow), summary) in &told.flows {
        let s = stored(&msgs, client, flow).unwrap_or_default();
        if staying(client) && (summary.rows, summary.uploaded_bytes) != (s.rows, s.upload_bytes) {
            out.push(format!(
                "invariant 2: the API reports collection {flow} on {client} with {} rows and {} upload bytes, storage holds {s:?}",
                summary.rows, summary.uploaded_bytes
            ));
        }
    }
    // 6. Only the legitimate clients enrolled, each under the id derived from its own key (the
    // impostor, which claims the first client's id with another key, never did).
    let mut enrolled = BTreeMap::new();
    for k in meta.keys("clients/", "/record.json") {
        if k.matches('/').count() == 2
            && let Some(r) = meta.json::<ClientJson>(k)
        {
            enrolled.insert(r.client_id.clone(), r.hostname);
        }
    }
    for (i, c) in d.clients.iter().enumerate() {
        match enrolled.remove(c.as_str()) {
            Some(h) if h == format!("sim-{i}") => {}
            Some(h) => out.push(format!(
                "invariant 6: {c} is recorded with hostname {h:?}, it is sim-{i}"
            )),
            None if d.departed.contains(c) => {}
            None => out.push(format!("{c} (sim-{i}) never enrolled")),
        }
    }
    for (c, h) in enrolled {
        out.push(format!("invariant 6: an unknown client {c} ({h}) enrolled"));
    }
    events
}

/// A completed flow's uploads: each reassembled whole, verified, and readable on the volume with
/// the content the agent sent.
fn check_uploads(files: &Files, f: &FlowJson, uploads: u64, size: u64, out: &mut Vec<String>) {
    let id = format!("flow {} of {}", f.flow_id, f.client_id);
    if f.uploads.len() as u64 != uploads {
        return out.push(format!(
            "{id}: {} uploads recorded, {uploads} sent",
            f.uploads.len()
        ));
    }
    for (i, u) in f.uploads.iter().enumerate() {
        let want = synthetic_sha256(i as u64, size);
        let content = files.get(&u.stored_as);
        let got = content.map(|b| hex(&Sha256::digest(b)));
        if !u.error.is_empty() || u.size != size || u.sha256 != want || got.as_ref() != Some(&want)
        {
            out.push(format!(
                "invariant 1: {id}: upload {i} recorded as {u:?}; the volume holds {} bytes with SHA-256 {got:?}; sent {size} bytes with {want}",
                content.map_or(0, |b| b.len())
            ));
        }
    }
}

#[cfg(test)]
mod tests;
