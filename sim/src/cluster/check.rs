//! The checkers: BRIEF invariants 1–7, read from what the simulated world holds — the shared volume
//! and the nodes' local disks — never from what the nodes say about themselves. [`Samples`] runs
//! during the run (every virtual second), [`converged`] decides the liveness phase, [`final_state`]
//! runs once at the end and compares storage with the stats the master's API reported.

use crate::world::{SimLocalDisk, SimVolume, under};
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use talon_core::{ClientId, HuntId, paths};
use talon_io::cluster::{EPOCH_FILE, JOURNAL_DIR, OUTBOX_SEGMENT_BYTES};
use talon_io::records::{ClientJson, FlowJson, ParticipantJson};
use talon_io::storage::journal::Journal;
use talon_io::storage::local::LocalDisk;
use talon_proto::api;
use talon_proto::comms::{self, flow_message};

/// What a run must end with.
#[derive(Clone, Debug)]
pub struct Expect {
    /// Rows per client per hunt.
    pub rows: u64,
    /// Every legitimate client, in index order (client `i` reports hostname `sim-i`).
    pub clients: Vec<ClientId>,
    /// The minions' node names (`<host>-<port>`).
    pub minions: Vec<String>,
    /// The replication outbox's bound (events held).
    pub outbox_events_max: usize,
}

/// State the checkers carry between samples.
#[derive(Default)]
pub struct Samples {
    /// Every stored flow message seen so far: it must stay, unchanged (invariant 1).
    seen: BTreeMap<String, Bytes>,
    /// The highest replication cursor seen per minion on the volume: (epoch, high-water mark).
    cursors: BTreeMap<String, (u64, u64)>,
}

/// A minion's outbox as its local disk holds it: (epoch, highest sequence number ever assigned
/// durably, events not yet truncated).
fn outbox(disk: &SimLocalDisk, durable_only: bool) -> Result<(u64, u64, Vec<u64>), String> {
    let mut copy = disk.copy();
    if durable_only {
        // What would survive a power cut now: only that may be known to the master.
        copy.crash();
    }
    let epoch = match copy.read(EPOCH_FILE).map_err(|e| e.to_string())? {
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{EPOCH_FILE}: {e}"))?,
        None => return Ok((0, 0, vec![])),
    };
    let (_, rec) = Journal::open(copy, JOURNAL_DIR, OUTBOX_SEGMENT_BYTES)
        .map_err(|e| format!("outbox journal: {e}"))?;
    let seqs: Vec<u64> = rec.records.iter().map(|r| r.0).collect();
    let top = seqs.last().copied().unwrap_or(0).max(rec.truncated_upto);
    Ok((epoch, top, seqs))
}

fn host_of(node: &str) -> &str {
    node.rsplit_once('-').map_or(node, |(h, _)| h)
}

/// The master's replication cursor for `node` on the volume: (epoch, high-water mark).
fn cursor(files: &BTreeMap<String, Bytes>, node: &str) -> Option<(u64, u64)> {
    let key = format!("cluster/minions/{}.json", paths::safe_component(node));
    let v: serde_json::Value = serde_json::from_slice(files.get(&key)?).ok()?;
    Some((v.get("epoch")?.as_u64()?, v.get("hwm")?.as_u64()?))
}

impl Samples {
    /// Checks what must hold at every instant, appending what broke to `out`.
    pub fn sample(
        &mut self,
        now_ms: u64,
        volume: &SimVolume,
        disks: &BTreeMap<String, SimLocalDisk>,
        expect: &Expect,
        out: &mut Vec<String>,
    ) {
        let at = format!("at {:.1} virtual s", now_ms as f64 / 1000.0);
        let cursors: BTreeMap<String, Option<(u64, u64)>> = volume.inspect(|files| {
            // 1. A stored (hence acknowledged) flow message is never lost or changed.
            for (k, old) in &self.seen {
                match files.get(k) {
                    None => out.push(format!("invariant 1 {at}: stored message {k} disappeared")),
                    Some(now) if now.as_ptr() != old.as_ptr() && now != old => {
                        out.push(format!("invariant 1 {at}: stored message {k} changed"))
                    }
                    Some(_) => {}
                }
            }
            for (k, v) in under(files, "clients/") {
                if k.contains("/messages/") && !self.seen.contains_key(k) {
                    self.seen.insert(k.clone(), v.clone());
                }
            }
            expect
                .minions
                .iter()
                .map(|m| (m.clone(), cursor(files, m)))
                .collect()
        });
        for (node, c) in cursors {
            let Some(disk) = disks.get(host_of(&node)) else {
                continue;
            };
            let (epoch, top, pending) = match outbox(disk, true) {
                Ok(o) => o,
                Err(e) => {
                    out.push(format!("{node} {at}: its outbox cannot be recovered: {e}"));
                    continue;
                }
            };
            // 7. The outbox holds at most its bound.
            if pending.len() > expect.outbox_events_max {
                out.push(format!(
                    "invariant 7 {at}: {node}'s outbox holds {} events, bound {}",
                    pending.len(),
                    expect.outbox_events_max
                ));
            }
            let Some((ce, hwm)) = c else { continue };
            // 4. Applied in order, never beyond what the minion durably sent: the cursor only moves
            // forward, and never past the minion's durable outbox (else an event the master applied
            // could be lost with the minion's disk, and its sequence number reused).
            if let Some(&prev) = self.cursors.get(&node)
                && (ce, hwm) < prev
            {
                out.push(format!(
                    "invariant 4 {at}: {node}'s cursor went back from {prev:?} to {:?}",
                    (ce, hwm)
                ));
            }
            self.cursors.insert(node.clone(), (ce, hwm));
            if ce == epoch && hwm > top {
                out.push(format!(
                    "invariant 4 {at}: the master applied {node}'s events up to {hwm}, its durable outbox reaches only {top} (epoch {epoch})"
                ));
            }
        }
    }
}

fn json<T: serde::de::DeserializeOwned>(files: &BTreeMap<String, Bytes>, key: &str) -> Option<T> {
    serde_json::from_slice(files.get(key)?).ok()
}

fn hunts_on_volume(files: &BTreeMap<String, Bytes>) -> Vec<HuntId> {
    under(files, "hunts/")
        .filter_map(|(k, _)| {
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["hunts", h, "record.json"] => HuntId::parse(h).ok(),
                _ => None,
            }
        })
        .collect()
}

/// Whether the healed deployment has converged; `Err` names the first thing still missing.
pub fn converged(
    volume: &SimVolume,
    disks: &BTreeMap<String, SimLocalDisk>,
    expect: &Expect,
    acked_hunts: &[String],
    labels: &BTreeSet<(String, String)>,
) -> Result<(), String> {
    volume.inspect(|files| {
        // 5. Everything the master acknowledged is on the volume.
        for h in acked_hunts {
            let id = HuntId::parse(h).map_err(|e| format!("hunt id {h}: {e}"))?;
            if !files.contains_key(&paths::hunt_record(&id)) {
                return Err(format!("acknowledged hunt {h} on the volume"));
            }
        }
        for (client, label) in labels {
            let id = ClientId::parse(client).map_err(|e| e.to_string())?;
            let rec: Option<ClientJson> = json(files, &paths::client_record(&id));
            if !rec.is_some_and(|r| r.labels.contains(label)) {
                return Err(format!("acknowledged label {label} on {client}'s record"));
            }
        }
        // Every hunt (including any whose creation the driver could not confirm) complete on every
        // client, as the volume records it.
        for h in hunts_on_volume(files) {
            let missing = expect
                .clients
                .iter()
                .filter(|c| {
                    !matches!(
                        json::<ParticipantJson>(files, &paths::hunt_participant(&h, c)),
                        Some(ParticipantJson::Completed { .. })
                    )
                })
                .count();
            if missing > 0 {
                return Err(format!(
                    "hunt {h} completed on {missing} more of {} clients",
                    expect.clients.len()
                ));
            }
        }
        if let Some((k, _)) = under(files, "tasks/").next() {
            return Err(format!("pending task {k} delivered"));
        }
        // Outboxes drained: nothing the minion holds is beyond what the master applied.
        for node in &expect.minions {
            let Some(disk) = disks.get(host_of(node)) else {
                continue;
            };
            let (epoch, _, pending) = outbox(disk, false)?;
            let c = cursor(files, node);
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
        Ok(())
    })
}

/// The end state, from the volume: invariants 1, 2, 3, 6, compared with the stats the master's API
/// reported (`stats`, per acknowledged hunt).
pub fn final_state(
    files: &BTreeMap<String, Bytes>,
    expect: &Expect,
    acked_hunts: &[String],
    stats: &BTreeMap<String, api::HuntStats>,
    out: &mut Vec<String>,
) {
    let n = expect.clients.len() as u64;
    // What the filestore holds per flow directory: (rows, final status stored).
    let mut stored: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for (k, bytes) in files {
        let Some((dir, _)) = k.rsplit_once("/messages/") else {
            continue;
        };
        let msg = match comms::FlowMessage::decode(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                out.push(format!("invariant 1: {k} does not decode: {e}"));
                continue;
            }
        };
        let e = stored.entry(dir.to_owned()).or_default();
        match msg.payload {
            Some(flow_message::Payload::Rows(r)) => e.0 += r.rows.len() as u64,
            Some(flow_message::Payload::Status(_)) => e.1 = true,
            _ => {}
        }
    }
    // Flow records per (hunt, client).
    let mut per_pair: BTreeMap<(String, String), Vec<FlowJson>> = BTreeMap::new();
    for (k, _) in under(files, "clients/") {
        if k.ends_with("/record.json")
            && k.contains("/flows/")
            && let Some(f) = json::<FlowJson>(files, k)
        {
            let hunt = f.hunt_id.clone().unwrap_or_default();
            per_pair
                .entry((hunt, f.client_id.clone()))
                .or_default()
                .push(f);
        }
    }
    let mut hunt_flow_dirs = BTreeSet::new();
    for h in hunts_on_volume(files) {
        let (mut scheduled, mut completed, mut errors, mut rows) = (0u64, 0u64, 0u64, 0u64);
        for c in &expect.clients {
            let p = json::<ParticipantJson>(files, &paths::hunt_participant(&h, c));
            let flows = per_pair
                .get(&(h.to_string(), c.to_string()))
                .map_or(&[][..], Vec::as_slice);
            // 3. Scheduled at most once: one flow per client per hunt.
            if flows.len() > 1 {
                out.push(format!(
                    "invariant 3: hunt {h} has {} flows on {c}",
                    flows.len()
                ));
            }
            let Some(p) = p else { continue };
            scheduled += 1;
            let Some(f) = flows.first() else {
                out.push(format!("hunt {h}: {c} participates but has no flow record"));
                continue;
            };
            let dir = format!("clients/{c}/flows/{}", f.flow_id);
            hunt_flow_dirs.insert(dir.clone());
            let (srows, done) = stored.get(&dir).copied().unwrap_or_default();
            // 1. Every row the client sent is stored, once, and the flow ended.
            if srows != expect.rows || !done {
                out.push(format!(
                    "invariant 1: {dir}: {srows} rows stored (expected {}), final status {}",
                    expect.rows,
                    if done { "stored" } else { "missing" }
                ));
            }
            match p {
                ParticipantJson::Completed { rows: r, .. } => {
                    completed += 1;
                    rows += r;
                    if r != srows {
                        out.push(format!(
                            "invariant 2: hunt {h}: {c} recorded with {r} rows, storage holds {srows}"
                        ));
                    }
                }
                ParticipantJson::Error { rows: r, .. } => {
                    errors += 1;
                    rows += r;
                }
                ParticipantJson::Scheduled => {}
            }
        }
        // 2. The master's stats are exact: what it reports equals what storage holds.
        if let Some(s) = stats.get(h.as_str()) {
            let reported = (s.scheduled, s.completed, s.errors, s.rows);
            if reported != (scheduled, completed, errors, rows) {
                out.push(format!(
                    "invariant 2: hunt {h}: the master reports scheduled/completed/errors/rows {reported:?}, storage holds {:?}",
                    (scheduled, completed, errors, rows)
                ));
            }
            if reported != (n, n, 0, n * expect.rows) {
                out.push(format!(
                    "hunt {h}: reported {reported:?}, expected every one of {n} clients complete with {} rows",
                    expect.rows
                ));
            }
        }
    }
    for h in acked_hunts {
        if !stats.contains_key(h) {
            out.push(format!("hunt {h}: the master did not report its stats"));
        }
    }
    // Nothing stored outside the hunts' flows (the driver starts no other work).
    for dir in stored.keys() {
        if !hunt_flow_dirs.contains(dir) {
            out.push(format!(
                "{dir}: stored messages of a flow no hunt scheduled"
            ));
        }
    }
    // 6. Only the legitimate clients enrolled, each under the id derived from its own key (the
    // impostor, which claims the first client's id with another key, never did).
    let mut enrolled = BTreeMap::new();
    for (k, _) in under(files, "clients/") {
        if k.matches('/').count() == 2
            && k.ends_with("/record.json")
            && let Some(r) = json::<ClientJson>(files, k)
        {
            enrolled.insert(r.client_id.clone(), r.hostname);
        }
    }
    for (i, c) in expect.clients.iter().enumerate() {
        match enrolled.remove(c.as_str()) {
            Some(h) if h == format!("sim-{i}") => {}
            Some(h) => out.push(format!(
                "invariant 6: {c} is recorded with hostname {h:?}, it is sim-{i}"
            )),
            None => out.push(format!("{c} (sim-{i}) never enrolled")),
        }
    }
    for (c, h) in enrolled {
        out.push(format!("invariant 6: an unknown client {c} ({h}) enrolled"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencyModel;
    use crate::rng::SimRng;
    use talon_core::FlowId;

    const ROWS: u64 = 3;

    fn client(i: u8) -> ClientId {
        ClientId::from_public_key(&[i; 32])
    }

    fn msg(payload: flow_message::Payload) -> Bytes {
        Bytes::from(
            comms::FlowMessage {
                payload: Some(payload),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    /// A consistent end state: one hunt, two clients, each with its flow of `ROWS` rows and a status.
    fn world() -> (BTreeMap<String, Bytes>, Expect, HuntId) {
        let hunt = HuntId::parse("H.1").unwrap();
        let clients = vec![client(1), client(2)];
        let mut f = BTreeMap::new();
        let put = |f: &mut BTreeMap<String, Bytes>, k: String, v: Vec<u8>| {
            f.insert(k, Bytes::from(v));
        };
        put(&mut f, paths::hunt_record(&hunt), b"{}".to_vec());
        for (i, c) in clients.iter().enumerate() {
            let flow = FlowId::for_hunt(&hunt, c);
            put(
                &mut f,
                paths::hunt_participant(&hunt, c),
                serde_json::to_vec(&ParticipantJson::Completed {
                    rows: ROWS,
                    uploaded_bytes: 0,
                })
                .unwrap(),
            );
            let rec = serde_json::json!({
                "client_id": c.to_string(), "flow_id": flow.to_string(), "artifact": "a",
                "params": {}, "hunt_id": hunt.to_string(), "state": "completed", "rows": ROWS,
                "uploaded_bytes": 0, "error": "", "created_ms": 0, "finished_ms": 1,
            });
            put(
                &mut f,
                paths::flow_record(c, &flow),
                serde_json::to_vec(&rec).unwrap(),
            );
            let cj = serde_json::json!({
                "client_id": c.to_string(), "key_fingerprint": "00".repeat(32),
                "hostname": format!("sim-{i}"), "fqdn": "", "os": "linux", "labels": [],
                "ips": [], "first_seen_ms": 0, "last_seen_ms": 0, "last_ip": "", "node": "master",
            });
            put(
                &mut f,
                paths::client_record(c),
                serde_json::to_vec(&cj).unwrap(),
            );
            let rows = comms::ResultRows {
                rows: vec![Default::default(); ROWS as usize],
                ..Default::default()
            };
            f.insert(
                paths::flow_message(c, &flow, 1),
                msg(flow_message::Payload::Rows(rows)),
            );
            f.insert(
                paths::flow_message(c, &flow, 2),
                msg(flow_message::Payload::Status(Default::default())),
            );
        }
        let expect = Expect {
            rows: ROWS,
            clients,
            minions: vec![],
            outbox_events_max: 10,
        };
        (f, expect, hunt)
    }

    fn check(
        files: &BTreeMap<String, Bytes>,
        expect: &Expect,
        hunt: &HuntId,
        reported: (u64, u64, u64),
    ) -> Vec<String> {
        let stats = api::HuntStats {
            scheduled: reported.0,
            completed: reported.1,
            rows: reported.2,
            ..Default::default()
        };
        let mut out = vec![];
        let stats = [(hunt.to_string(), stats)].into();
        final_state(files, expect, &[hunt.to_string()], &stats, &mut out);
        out
    }

    #[test]
    fn a_consistent_state_passes_and_each_broken_invariant_is_named() {
        let (files, expect, hunt) = world();
        assert_eq!(
            check(&files, &expect, &hunt, (2, 2, 6)),
            Vec::<String>::new()
        );

        // 2: the master's stats disagree with storage.
        let v = check(&files, &expect, &hunt, (2, 1, 3));
        assert!(v.iter().any(|v| v.starts_with("invariant 2")), "{v:?}");

        // 1: a stored row message is gone.
        let mut lost = files.clone();
        let c = &expect.clients[0];
        lost.remove(&paths::flow_message(c, &FlowId::for_hunt(&hunt, c), 1));
        let v = check(&lost, &expect, &hunt, (2, 2, 6));
        assert!(v.iter().any(|v| v.starts_with("invariant 1")), "{v:?}");

        // 3: a second flow of the same hunt on one client.
        let mut twice = files.clone();
        let other = FlowId::parse("F.OTHER").unwrap();
        let rec = files[&paths::flow_record(c, &FlowId::for_hunt(&hunt, c))].clone();
        let mut j: serde_json::Value = serde_json::from_slice(&rec).unwrap();
        j["flow_id"] = "F.OTHER".into();
        twice.insert(
            paths::flow_record(c, &other),
            Bytes::from(serde_json::to_vec(&j).unwrap()),
        );
        let v = check(&twice, &expect, &hunt, (2, 2, 6));
        assert!(v.iter().any(|v| v.starts_with("invariant 3")), "{v:?}");

        // 6: a client nobody expected enrolled, or one under another's hostname.
        let mut impostor = files.clone();
        let rec = files[&paths::client_record(c)].clone();
        let mut j: serde_json::Value = serde_json::from_slice(&rec).unwrap();
        j["hostname"] = "impostor".into();
        impostor.insert(
            paths::client_record(c),
            Bytes::from(serde_json::to_vec(&j).unwrap()),
        );
        let stranger = client(9);
        j["client_id"] = stranger.to_string().into();
        impostor.insert(
            paths::client_record(&stranger),
            Bytes::from(serde_json::to_vec(&j).unwrap()),
        );
        let v = check(&impostor, &expect, &hunt, (2, 2, 6));
        assert_eq!(
            v.iter().filter(|v| v.starts_with("invariant 6")).count(),
            2,
            "{v:?}"
        );
    }

    #[test]
    fn samples_catch_a_lost_message_and_a_cursor_that_goes_back() {
        let (files, mut expect, _) = world();
        let volume = SimVolume::new(LatencyModel::network_volume(), SimRng::new(1));
        for (k, v) in &files {
            volume.put(k, v.clone());
        }
        expect.minions = vec!["minion1-8000".into()];
        let disks = BTreeMap::from([(
            "minion1".to_owned(),
            SimLocalDisk::new(crate::disk::SimDisk::new(
                1 << 20,
                Default::default(),
                SimRng::new(2),
            )),
        )]);
        let cursor = |hwm: u64| {
            Bytes::from(
                serde_json::to_vec(
                    &serde_json::json!({"node": "minion1-8000", "epoch": 7, "hwm": hwm}),
                )
                .unwrap(),
            )
        };
        volume.put("cluster/minions/minion1-8000.json", cursor(5));
        let mut s = Samples::default();
        let mut out = vec![];
        s.sample(1_000, &volume, &disks, &expect, &mut out);
        assert_eq!(out, Vec::<String>::new());
        let (k, _) = files
            .iter()
            .find(|(k, _)| k.contains("/messages/"))
            .unwrap();
        volume.remove(k);
        volume.put("cluster/minions/minion1-8000.json", cursor(4));
        s.sample(2_000, &volume, &disks, &expect, &mut out);
        assert!(
            out.iter()
                .any(|v| v.starts_with("invariant 1") && v.contains("disappeared")),
            "{out:?}"
        );
        assert!(
            out.iter()
                .any(|v| v.starts_with("invariant 4") && v.contains("went back")),
            "{out:?}"
        );
    }
}
