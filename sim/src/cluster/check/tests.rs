//! The checkers, each shown failing on a state that breaks the invariant it checks (a
//! hand-corrupted store, a mis-ordered acknowledgement), and passing on a consistent one.

use super::*;
use crate::disk::SimDisk;
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use talon_core::datastore::GroupPart;

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

fn json(v: serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

fn disk() -> SimLocalDisk {
    SimLocalDisk::new(SimDisk::new(1 << 24, Default::default(), SimRng::new(2)))
}

fn flow_record(c: &ClientId, flow: &FlowId, hunt: Option<&HuntId>) -> Bytes {
    json(serde_json::json!({
        "client_id": c.to_string(), "flow_id": flow.to_string(), "artifact": "Generic.Test.Rows",
        "params": {"count": ROWS.to_string()}, "hunt_id": hunt.map(|h| h.to_string()),
        "state": "completed", "rows": ROWS, "uploaded_bytes": 0, "error": "", "created_ms": 0,
        "finished_ms": 1,
    }))
}

fn status() -> Bytes {
    msg(flow_message::Payload::Status(comms::FlowStatus {
        state: comms::FlowState::Completed as i32,
        total_rows: ROWS,
        ..Default::default()
    }))
}

/// A consistent end state: one hunt, two clients, each with its flow of `ROWS` rows and a status.
fn world() -> (Files, Deployment, HuntId) {
    let hunt = HuntId::parse("H.1").unwrap();
    let clients = vec![client(1), client(2)];
    let mut f = Files::new();
    f.insert(
        paths::hunt_record(&hunt),
        json(serde_json::json!({
            "hunt_id": "H.1", "artifact": "Generic.Test.Rows", "params": {}, "include_labels": [],
            "exclude_labels": [], "os": null, "expires_ms": 0, "client_limit": null,
            "description": "", "created_ms": 0, "state": "stopped",
        })),
    );
    for (i, c) in clients.iter().enumerate() {
        let flow = FlowId::for_hunt(&hunt, c);
        f.insert(
            paths::hunt_participant(&hunt, c),
            Bytes::from(
                serde_json::to_vec(&ParticipantJson::Completed {
                    rows: ROWS,
                    uploaded_bytes: 0,
                })
                .unwrap(),
            ),
        );
        f.insert(
            paths::flow_record(c, &flow),
            flow_record(c, &flow, Some(&hunt)),
        );
        f.insert(
            paths::client_record(c),
            json(serde_json::json!({
                "client_id": c.to_string(), "key_fingerprint": "00".repeat(32),
                "hostname": format!("sim-{i}"), "fqdn": "", "os": "linux", "labels": [],
                "ips": [], "first_seen_ms": 0, "last_seen_ms": 0, "last_ip": "", "node": "master",
            })),
        );
        let rows = comms::ResultRows {
            rows: vec![Default::default(); ROWS as usize],
            ..Default::default()
        };
        f.insert(
            paths::flow_message(c, &flow, 0),
            msg(flow_message::Payload::Rows(rows)),
        );
        f.insert(paths::flow_message(c, &flow, 1), status());
    }
    let d = Deployment {
        clients,
        departed: BTreeSet::new(),
        minions: vec![],
        outbox_events_max: 10,
    };
    (f, d, hunt)
}

fn told_stats(hunt: &HuntId, reported: (u64, u64, u64)) -> Told {
    let stats = api::HuntStats {
        scheduled: reported.0,
        completed: reported.1,
        rows: reported.2,
        ..Default::default()
    };
    Told {
        hunts: vec![hunt.to_string()],
        stats: [(hunt.to_string(), stats)].into(),
        ..Told::default()
    }
}

fn check(files: &Files, d: &Deployment, hunt: &HuntId, reported: (u64, u64, u64)) -> Vec<String> {
    let mut out = vec![];
    final_state(
        files,
        &MetaView::default(),
        d,
        &told_stats(hunt, reported),
        &mut out,
    );
    out
}

/// What the driver has told once the safety phase is over and its calls have returned.
fn quiet() -> Told {
    Told {
        quiet: true,
        ..Told::default()
    }
}

/// Convergence as the harness decides it: right after a sample of the same volume.
fn converged(
    volume: &SimVolume,
    disks: &BTreeMap<String, SimLocalDisk>,
    d: &Deployment,
    told: &Told,
    now_unix_ms: u64,
) -> Result<(), String> {
    let mut s = Samples::default();
    let w = World {
        volume,
        disks,
        disk_lost: false,
    };
    s.sample(0, &w, d, &mut Told::default(), &mut vec![]);
    s.converged(volume, disks, d, told, now_unix_ms)
}

fn has(v: &[String], prefix: &str) -> bool {
    v.iter().any(|v| v.starts_with(prefix))
}

#[test]
fn final_state_passes_a_consistent_state_and_names_each_broken_invariant() {
    let (files, d, hunt) = world();
    assert_eq!(check(&files, &d, &hunt, (2, 2, 6)), Vec::<String>::new());

    // 2: the master's stats disagree with storage.
    let v = check(&files, &d, &hunt, (2, 1, 3));
    assert!(has(&v, "invariant 2"), "{v:?}");

    // 1: a stored row message is gone.
    let mut lost = files.clone();
    let c = &d.clients[0];
    lost.remove(&paths::flow_message(c, &FlowId::for_hunt(&hunt, c), 0));
    let v = check(&lost, &d, &hunt, (2, 2, 6));
    assert!(has(&v, "invariant 1"), "{v:?}");

    // 3: a second flow of the same hunt on one client.
    let mut twice = files.clone();
    let other = FlowId::parse("F.OTHER").unwrap();
    twice.insert(
        paths::flow_record(c, &other),
        flow_record(c, &other, Some(&hunt)),
    );
    let v = check(&twice, &d, &hunt, (2, 2, 6));
    assert!(has(&v, "invariant 3"), "{v:?}");

    // 6: a client nobody expected enrolled, or one under another's hostname.
    let mut impostor = files.clone();
    let mut j: serde_json::Value =
        serde_json::from_slice(&files[&paths::client_record(c)]).unwrap();
    j["hostname"] = "impostor".into();
    impostor.insert(paths::client_record(c), json(j.clone()));
    let stranger = client(9);
    j["client_id"] = stranger.to_string().into();
    impostor.insert(paths::client_record(&stranger), json(j));
    let v = check(&impostor, &d, &hunt, (2, 2, 6));
    assert_eq!(
        v.iter().filter(|v| v.starts_with("invariant 6")).count(),
        2,
        "{v:?}"
    );

    // Messages stored for a flow nobody created.
    let mut stray = files.clone();
    stray.insert(
        paths::flow_message(c, &FlowId::parse("F.STRAY").unwrap(), 0),
        status(),
    );
    let v = check(&stray, &d, &hunt, (2, 2, 6));
    assert!(v.iter().any(|v| v.contains("nobody created")), "{v:?}");
}

#[test]
fn an_upload_that_differs_from_what_the_agent_sent_is_caught() {
    let (mut files, d, hunt) = world();
    let c = d.clients[0].clone();
    let flow = FlowId::parse("F.UP").unwrap();
    let size = 600u64;
    let content: Vec<u8> = (0..size)
        .map(|j| talon_io::agent::artifacts::synthetic_byte(0, j))
        .collect();
    let chunk = comms::FileChunk {
        upload_id: 0,
        name: "/synthetic/upload-0.bin".into(),
        data: Bytes::from(content.clone()),
        eof: true,
        total_size: size,
        ..Default::default()
    };
    files.insert(
        paths::flow_message(&c, &flow, 0),
        msg(flow_message::Payload::FileChunk(chunk)),
    );
    files.insert(
        paths::flow_message(&c, &flow, 1),
        msg(flow_message::Payload::Status(comms::FlowStatus {
            state: comms::FlowState::Completed as i32,
            total_uploaded_bytes: size,
            ..Default::default()
        })),
    );
    let stored_as = paths::upload(&c, &flow, 0, "/synthetic/upload-0.bin");
    files.insert(stored_as.clone(), Bytes::from(content));
    let record = |sha: &str| {
        json(serde_json::json!({
            "client_id": c.to_string(), "flow_id": "F.UP", "artifact": "Generic.Test.Rows",
            "params": {"count": "0", "uploads": "1", "upload_size": size.to_string()},
            "state": "completed", "rows": 0, "uploaded_bytes": size, "error": "",
            "created_ms": 0, "finished_ms": 1,
            "uploads": [{"upload_id": 0, "name": "/synthetic/upload-0.bin",
                         "stored_as": stored_as, "size": size, "sha256": sha, "error": ""}],
        }))
    };
    let good = synthetic_sha256(0, size);
    files.insert(paths::flow_record(&c, &flow), record(&good));
    assert_eq!(check(&files, &d, &hunt, (2, 2, 6)), Vec::<String>::new());
    // The reassembled file on the volume is not what was sent.
    let mut bad = files.clone();
    bad.insert(stored_as.clone(), Bytes::from_static(b"other"));
    let v = check(&bad, &d, &hunt, (2, 2, 6));
    assert!(
        v.iter()
            .any(|v| v.starts_with("invariant 1") && v.contains("upload 0")),
        "{v:?}"
    );
    // Never reassembled: the end state says so, and while its marker is there liveness waits.
    let mut none = files.clone();
    let mut j: serde_json::Value =
        serde_json::from_slice(&files[&paths::flow_record(&c, &flow)]).unwrap();
    j["uploads"] = serde_json::json!([]);
    none.insert(paths::flow_record(&c, &flow), json(j));
    let v = check(&none, &d, &hunt, (2, 2, 6));
    assert!(
        v.iter().any(|v| v.contains("0 uploads recorded, 1 sent")),
        "{v:?}"
    );
    none.insert(
        paths::uploads_pending(&c, &flow),
        json(serde_json::json!({})),
    );
    let volume = SimVolume::new(LatencyModel::network_volume(), SimRng::new(1));
    for (k, v) in &none {
        volume.put(k, v.clone());
    }
    let e = converged(&volume, &BTreeMap::new(), &d, &quiet(), 0).unwrap_err();
    assert!(e.contains("uploads reassembled"), "{e}");
}

/// A master disk whose datastore journal holds `writes` (synced or not).
fn master_with(writes: &[(&str, Option<&str>)], synced: bool) -> SimLocalDisk {
    let disk = disk();
    let dir = DatastoreOptions::default().journal_dir;
    let (mut j, _) = Journal::open(disk.clone(), &dir, 1 << 20).unwrap();
    for (k, v) in writes {
        let seq = j.next_seq();
        let v = v.map(|v| Bytes::from(v.to_owned()));
        j.append(
            seq,
            &talon_io::storage::datastore::encode(k, &v, GroupPart::Whole),
        )
        .unwrap();
    }
    if synced {
        j.sync().unwrap();
    }
    disk
}

#[test]
fn the_meta_view_is_the_volume_under_the_masters_durable_journal() {
    let mut files = Files::new();
    files.insert("a".into(), Bytes::from_static(b"old"));
    files.insert("b".into(), Bytes::from_static(b"kept"));
    let synced = master_with(&[("a", Some("new")), ("b", None), ("c", Some("1"))], true);
    let view = MetaView::read(&synced).unwrap();
    let m = view.on(&files);
    assert_eq!(m.get("a").unwrap().as_ref(), b"new");
    assert_eq!(m.get("b"), None, "deleted in the journal");
    assert_eq!(m.keys("", ""), vec!["a", "c"]);
    // Appended but never synced: a crash loses it, so it is not storage.
    let unsynced = master_with(&[("a", Some("new"))], false);
    let view = MetaView::read(&unsynced).unwrap();
    assert_eq!(view.on(&files).get("a").unwrap().as_ref(), b"old");
}

fn samples_world(files: &Files) -> (SimVolume, BTreeMap<String, SimLocalDisk>) {
    let volume = SimVolume::new(LatencyModel::network_volume(), SimRng::new(1));
    for (k, v) in files {
        volume.put(k, v.clone());
    }
    (volume, BTreeMap::from([("master".to_owned(), disk())]))
}

fn sample(
    s: &mut Samples,
    volume: &SimVolume,
    disks: &BTreeMap<String, SimLocalDisk>,
    d: &Deployment,
    told: &mut Told,
    disk_lost: bool,
) -> Vec<String> {
    let mut out = vec![];
    let w = World {
        volume,
        disks,
        disk_lost,
    };
    s.sample(1_000, &w, d, told, &mut out);
    out
}

#[test]
fn samples_catch_a_lost_message_and_a_cursor_that_goes_back() {
    let (files, mut d, _) = world();
    let (volume, mut disks) = samples_world(&files);
    d.minions = vec!["minion1-8000".into()];
    disks.insert("minion1".into(), disk());
    let cursor =
        |hwm: u64| json(serde_json::json!({"node": "minion1-8000", "epoch": 7, "hwm": hwm}));
    volume.put("cluster/minions/minion1-8000.json", cursor(5));
    let mut s = Samples::default();
    let mut told = Told::default();
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, false),
        Vec::<String>::new()
    );
    let (k, _) = files
        .iter()
        .find(|(k, _)| k.contains("/messages/"))
        .unwrap();
    volume.remove(k);
    volume.put("cluster/minions/minion1-8000.json", cursor(4));
    let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
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

#[test]
fn samples_catch_a_minion_that_dropped_events_the_master_has_not_made_durable() {
    let (files, mut d, _) = world();
    let (volume, mut disks) = samples_world(&files);
    d.minions = vec!["minion1-8000".into()];
    // The minion's outbox: epoch 7, events 1..=5, the master's acknowledgement of 5 truncated them.
    let minion = disk();
    {
        let mut m = minion.clone();
        m.write_atomic(EPOCH_FILE, b"7\n").unwrap();
        let (mut j, _) = Journal::open(minion.clone(), JOURNAL_DIR, OUTBOX_SEGMENT_BYTES).unwrap();
        for seq in 1..=5 {
            j.append(seq, b"event").unwrap();
        }
        j.sync().unwrap();
        j.truncate(5).unwrap();
    }
    disks.insert("minion1".into(), minion);
    let cursor =
        |hwm: u64| json(serde_json::json!({"node": "minion1-8000", "epoch": 7, "hwm": hwm}));
    // The master's durable cursor covers the acknowledgement: fine.
    volume.put("cluster/minions/minion1-8000.json", cursor(5));
    let mut told = Told::default();
    let out = sample(
        &mut Samples::default(),
        &volume,
        &disks,
        &d,
        &mut told,
        false,
    );
    assert_eq!(out, Vec::<String>::new());
    // It acknowledged 5 while its durable cursor says 3 (the cursor write was not yet synced when
    // the ack went out, and the master crashed): the minion dropped events 4 and 5 for good.
    volume.put("cluster/minions/minion1-8000.json", cursor(3));
    let out = sample(
        &mut Samples::default(),
        &volume,
        &disks,
        &d,
        &mut told,
        false,
    );
    assert!(
        out.iter()
            .any(|v| v.starts_with("invariant 4") && v.contains("dropped its events up to 5")),
        "{out:?}"
    );
    // Only the master's journal has the cursor, unsynced: still a violation; synced: fine.
    for (synced, bad) in [(false, true), (true, false)] {
        disks.insert(
            "master".into(),
            master_with(
                &[(
                    "cluster/minions/minion1-8000.json",
                    Some(r#"{"node":"minion1-8000","epoch":7,"hwm":5}"#),
                )],
                synced,
            ),
        );
        let out = sample(
            &mut Samples::default(),
            &volume,
            &disks,
            &d,
            &mut told,
            false,
        );
        assert_eq!(has(&out, "invariant 4"), bad, "synced {synced}: {out:?}");
    }
}

#[test]
fn samples_hold_acknowledgements_to_storage() {
    let (files, d, hunt) = world();
    let (volume, mut disks) = samples_world(&files);
    let c = d.clients[0].to_string();
    let flow = FlowId::for_hunt(&hunt, &d.clients[0]).to_string();
    let ack = |seq, settled| (c.clone(), flow.clone(), seq, settled);
    let mut s = Samples::default();
    // On the volume: fine, settled or not.
    let mut told = Told {
        acks: vec![ack(0, false), ack(1, true)],
        ..Told::default()
    };
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, false),
        Vec::<String>::new()
    );
    assert!(told.acks.is_empty(), "the sample takes what it checked");
    // Told settled, not on the volume.
    told.acks = vec![ack(7, true)];
    let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
    assert!(
        out.iter()
            .any(|v| v.starts_with("invariant 1") && v.contains("settled")),
        "{out:?}"
    );
    // Acknowledged, neither on the volume nor in a buffer: looked for in the buffers a sample
    // later (usually it is on the volume by then).
    told.acks = vec![ack(8, false)];
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, false),
        Vec::<String>::new()
    );
    let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
    assert!(
        out.iter()
            .any(|v| v.starts_with("invariant 1") && v.contains("durable buffer")),
        "{out:?}"
    );
    // ... unless a frontend lost its disk meanwhile (the client resends it).
    told.acks = vec![ack(8, false)];
    sample(&mut s, &volume, &disks, &d, &mut told, false);
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, true),
        Vec::<String>::new()
    );
    // In a frontend's durable buffer: fine.
    let key = paths::flow_message(&d.clients[0], &FlowId::parse(&flow).unwrap(), 8);
    let buffer = disk();
    let (mut j, _) = Journal::open(buffer.clone(), BUFFER_DIR, 1 << 20).unwrap();
    j.append(
        1,
        &talon_io::storage::datastore::encode(&key, &Some(status()), GroupPart::Whole),
    )
    .unwrap();
    j.sync().unwrap();
    disks.insert("minion1".into(), buffer);
    told.acks = vec![ack(8, false)];
    for _ in 0..2 {
        assert_eq!(
            sample(&mut s, &volume, &disks, &d, &mut told, false),
            Vec::<String>::new()
        );
    }
}

#[test]
fn samples_check_hunt_stats_while_they_move() {
    let (mut files, d, hunt) = world();
    // One of the two participants has not finished yet.
    let c = &d.clients[1];
    files.insert(
        paths::hunt_participant(&hunt, c),
        Bytes::from(serde_json::to_vec(&ParticipantJson::Scheduled).unwrap()),
    );
    let (volume, disks) = samples_world(&files);
    let stats = |scheduled, completed, rows| api::HuntStats {
        scheduled,
        completed,
        rows,
        ..Default::default()
    };
    let mut told = Told {
        seen_stats: vec![(500, hunt.to_string(), stats(2, 1, ROWS))],
        ..Told::default()
    };
    let mut s = Samples::default();
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, false),
        Vec::<String>::new()
    );
    // Counted twice in memory: more completed than storage holds.
    for bad in [stats(2, 2, 2 * ROWS), stats(3, 1, ROWS), stats(1, 2, ROWS)] {
        told.seen_stats = vec![(500, hunt.to_string(), bad)];
        let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
        assert!(has(&out, "invariant 2"), "{bad:?}: {out:?}");
    }
}

#[test]
fn samples_catch_a_completion_reported_before_its_messages_are_on_the_volume() {
    let (files, d, hunt) = world();
    let c = &d.clients[0];
    let flow = FlowId::for_hunt(&hunt, c);
    let mut early = files.clone();
    // The final status is still in a frontend's buffer, but the flow is recorded complete.
    early.remove(&paths::flow_message(c, &flow, 1));
    let (volume, disks) = samples_world(&early);
    let mut told = Told::default();
    let out = sample(
        &mut Samples::default(),
        &volume,
        &disks,
        &d,
        &mut told,
        false,
    );
    assert!(
        out.iter()
            .any(|v| v.starts_with("visibility") && v.contains("its record")),
        "{out:?}"
    );
    assert!(
        out.iter()
            .any(|v| v.starts_with("visibility") && v.contains("its hunt participant")),
        "{out:?}"
    );
    // The API said so too (a collection's flow, say).
    let (volume, disks) = samples_world(&files);
    let mut told = Told {
        seen_done: vec![(c.to_string(), "F.NOWHERE".into(), 1, 0)],
        ..Told::default()
    };
    let out = sample(
        &mut Samples::default(),
        &volume,
        &disks,
        &d,
        &mut told,
        false,
    );
    assert!(
        out.iter()
            .any(|v| v.starts_with("visibility") && v.contains("the API")),
        "{out:?}"
    );
}

#[test]
fn convergence_waits_for_labels_tasks_and_matching_clients() {
    let (mut files, mut d, hunt) = world();
    let volume = |files: &Files| {
        let v = SimVolume::new(LatencyModel::network_volume(), SimRng::new(1));
        for (k, x) in files {
            v.put(k, x.clone());
        }
        v
    };
    let none = BTreeMap::new();
    assert_eq!(converged(&volume(&files), &none, &d, &quiet(), 0), Ok(()));
    // A label the driver removed (acknowledged) is still on the record.
    let c = d.clients[0].clone();
    let mut j: serde_json::Value =
        serde_json::from_slice(&files[&paths::client_record(&c)]).unwrap();
    j["labels"] = serde_json::json!(["x"]);
    files.insert(paths::client_record(&c), json(j));
    let told = Told {
        labels: [((c.to_string(), "x".to_string()), LabelState::Absent)].into(),
        ..quiet()
    };
    let e = converged(&volume(&files), &none, &d, &told, 0).unwrap_err();
    assert!(e.contains("label x removed"), "{e}");
    // A task still waits for a client: not converged, unless the client left for good.
    files.insert(format!("tasks/{c}/F.1.pb"), Bytes::from_static(b""));
    let e = converged(&volume(&files), &none, &d, &quiet(), 0).unwrap_err();
    assert!(e.contains("pending task"), "{e}");
    d.departed.insert(c.clone());
    assert_eq!(converged(&volume(&files), &none, &d, &quiet(), 0), Ok(()));
    // A running hunt that a matching client never joined.
    let mut j: serde_json::Value =
        serde_json::from_slice(&files[&paths::hunt_record(&hunt)]).unwrap();
    j["state"] = "running".into();
    j["expires_ms"] = 10.into();
    files.insert(paths::hunt_record(&hunt), json(j));
    files.remove(&paths::hunt_participant(&hunt, &d.clients[1]));
    let e = converged(&volume(&files), &none, &d, &quiet(), 0).unwrap_err();
    assert!(e.contains("matching clients"), "{e}");
    // Once expired, nobody more is due.
    assert_eq!(converged(&volume(&files), &none, &d, &quiet(), 10), Ok(()));
    // Not while the analyst's last call may still create work.
    let e = converged(&volume(&files), &none, &d, &Told::default(), 10).unwrap_err();
    assert!(e.contains("last calls answered"), "{e}");
    // Not before every client that stays has enrolled (a late one).
    let late = d.clients[1].clone();
    let record = files.remove(&paths::client_record(&late)).unwrap();
    let e = converged(&volume(&files), &none, &d, &quiet(), 10).unwrap_err();
    assert!(e.contains(&format!("client {late} enrolled")), "{e}");
    files.insert(paths::client_record(&late), record);
    // Not while a flow of a client that stays still runs, acknowledged to the analyst or not.
    let flow = FlowId::parse("F.0000000000000ABC").unwrap();
    let mut running: serde_json::Value =
        serde_json::from_slice(&flow_record(&late, &flow, None)).unwrap();
    running["state"] = "running".into();
    files.insert(paths::flow_record(&late, &flow), json(running));
    let e = converged(&volume(&files), &none, &d, &quiet(), 10).unwrap_err();
    assert!(
        e.contains(&format!("flow {flow} on {late} finished")),
        "{e}"
    );
}

/// `world()` with every flow's messages moved into one segment data file (a run per flow) and
/// the runs recorded in the flow records, as the segment log and a completion leave them.
fn segmented() -> (Files, Deployment, HuntId) {
    let (mut f, d, hunt) = world();
    let data_key = "segments/w-000001.data".to_owned();
    let mut runs = Vec::new();
    for c in &d.clients {
        let flow = FlowId::for_hunt(&hunt, c);
        let dir = paths::flow_messages_dir(c, &flow);
        let run: Vec<(String, Bytes)> = under(&f, &format!("{dir}/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, _) in &run {
            f.remove(k);
        }
        runs.push(run);
    }
    let (data, index) = segments::encode_files(&runs);
    let entries = segments::parse_index(&index);
    for (c, e) in d.clients.iter().zip(&entries) {
        let flow = FlowId::for_hunt(&hunt, c);
        let mut record: serde_json::Value =
            serde_json::from_slice(&f[&paths::flow_record(c, &flow)]).unwrap();
        record["runs"] = serde_json::json!([{
            "file": data_key, "offset": e.offset, "len": e.len,
            "first": format!("{:020}", 0), "last": format!("{:020}", 1),
        }]);
        f.insert(paths::flow_record(c, &flow), json(record));
    }
    f.insert(data_key, data);
    f.insert("segments/w-000001.index".into(), index);
    (f, d, hunt)
}

#[test]
fn final_state_reads_segments_and_checks_what_readers_find_through_the_runs() {
    let (f, d, hunt) = segmented();
    assert!(f.keys().all(|k| !k.contains("/messages/")), "moved");
    assert_eq!(check(&f, &d, &hunt, (2, 2, 2 * ROWS)), Vec::<String>::new());
    // A record whose runs miss the rows: readers would show none.
    let c = &d.clients[0];
    let key = paths::flow_record(c, &FlowId::for_hunt(&hunt, c));
    let mut record: serde_json::Value = serde_json::from_slice(&f[&key]).unwrap();
    let run = record["runs"][0].clone();
    let mut short = run.clone();
    short["len"] = serde_json::json!(run["len"].as_u64().unwrap() / 2);
    for bad in [
        serde_json::json!([]),
        serde_json::json!([short]),
        serde_json::json!([{"file": "segments/gone.data", "offset": 0, "len": 9, "first": "", "last": ""}]),
    ] {
        record["runs"] = bad.clone();
        let mut g = f.clone();
        g.insert(key.clone(), json(record.clone()));
        let out = check(&g, &d, &hunt, (2, 2, 2 * ROWS));
        assert!(has(&out, "readers"), "{bad}: {out:?}");
    }
    // A run the index names that does not parse (a failed flush) holds nothing: the rows are
    // then missing from storage, which the totals catch.
    let mut g = f.clone();
    let data = g["segments/w-000001.data"].to_vec();
    let mut torn = data.clone();
    torn.truncate(data.len() - 3);
    g.insert("segments/w-000001.data".into(), Bytes::from(torn));
    assert!(!check(&g, &d, &hunt, (2, 2, 2 * ROWS)).is_empty());
}

#[test]
fn samples_follow_segment_indexes_and_catch_a_message_changed_or_an_index_shrunk() {
    let (f, d, _) = segmented();
    let (volume, disks) = samples_world(&f);
    let mut s = Samples::default();
    let mut told = Told::default();
    assert_eq!(
        sample(&mut s, &volume, &disks, &d, &mut told, false),
        Vec::<String>::new()
    );
    assert!(s.seen.keys().any(|k| k.contains("/messages/")), "followed");
    // Another writer stores one of those messages with other contents.
    let (k, v) = s
        .seen
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let mut other = v.to_vec();
    other.push(0);
    let (data, index) = segments::encode_files(&[vec![(k, Bytes::from(other))]]);
    volume.put("segments/x-000001.data", data);
    volume.put("segments/x-000001.index", index);
    let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
    assert!(
        out.iter()
            .any(|v| v.starts_with("invariant 1") && v.contains("changed")),
        "{out:?}"
    );
    // An index loses its entries.
    volume.put("segments/w-000001.index", segments::encode_files(&[]).1);
    let out = sample(&mut s, &volume, &disks, &d, &mut told, false);
    assert!(
        out.iter()
            .any(|v| v.starts_with("invariant 1") && v.contains("lost entries")),
        "{out:?}"
    );
}

/// One stored test-event batch of stream 7 of client 1: events `ns`, `dropped` counted before it.
fn event_batch(seq: u64, ns: std::ops::Range<u64>, dropped: u64) -> (String, Bytes) {
    let c = client(1);
    let key = talon_core::events::EventKey {
        client: c,
        artifact: "Generic.Events.Test".into(),
        day: "2026-09-21".into(),
        stream: 7,
        seq,
    };
    let rows = ns
        .map(|n| Bytes::from(serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap()))
        .collect();
    let b = comms::EventBatch {
        artifact: key.artifact.clone(),
        stream: 7,
        seq,
        day: key.day.clone(),
        time_unix_ms: 1,
        rows,
        dropped,
    };
    (paths::event_batch(&key), Bytes::from(b.encode_to_vec()))
}

fn settled(seqs: &[u64]) -> BTreeMap<(String, String), BTreeSet<u64>> {
    BTreeMap::from([(
        (client(1).to_string(), "Generic.Events.Test/7".to_owned()),
        seqs.iter().copied().collect(),
    )])
}

fn check_events_on(batches: &[(String, Bytes)], acked: &[u64]) -> Vec<String> {
    // Stored as the write-behind buffer stores them: records of a segment run.
    let (data, index) = segments::encode_files(&[batches.to_vec()]);
    let files = Files::from([
        ("segments/w-000001.data".to_owned(), data),
        ("segments/w-000001.index".to_owned(), index),
    ]);
    let mut out = Vec::new();
    check_events(&messages(&files), &settled(acked), &mut out);
    out
}

/// The event checker passes a stream stored once, in segment runs, with what was dropped counted,
/// and names each planted violation: a settled batch missing, an event in two batches (a stream
/// renumbered after a restart would do it), a batch under another batch's name, and events lost
/// without a count.
#[test]
fn the_event_checker_catches_lost_twice_stored_misnamed_and_silently_dropped_events() {
    let good = [
        event_batch(0, 0..5, 0),
        event_batch(1, 5..9, 0),
        // Events 9..12 dropped at the agent's bound: the next batch counts them.
        event_batch(2, 12..14, 3),
    ];
    assert_eq!(check_events_on(&good, &[0, 1, 2]), Vec::<String>::new());
    // A batch acknowledged unsettled and not stored yet (the last) is not a violation.
    assert_eq!(check_events_on(&good[..2], &[0, 1]), Vec::<String>::new());

    // Acknowledged settled, not on the volume.
    let out = check_events_on(&good[..2], &[0, 1, 2]);
    assert!(has(&out, "events: batch 2 of stream"), "{out:?}");
    assert!(out[0].contains("acknowledged settled"), "{out:?}");

    // The same events under two numbers.
    let twice = [good[0].clone(), good[1].clone(), event_batch(2, 5..9, 0)];
    let out = check_events_on(&twice, &[0, 1, 2]);
    assert!(out.iter().any(|v| v.contains("stored twice")), "{out:?}");

    // A batch stored under another's name.
    let (k, _) = event_batch(1, 0..0, 0);
    let (_, v) = event_batch(0, 5..9, 0);
    let out = check_events_on(&[good[0].clone(), (k, v), good[2].clone()], &[0, 1, 2]);
    assert!(out.iter().any(|v| v.contains("another name")), "{out:?}");

    // Events missing and not counted.
    let lost = [
        event_batch(0, 0..5, 0),
        event_batch(1, 6..9, 0),
        event_batch(2, 12..14, 3),
    ];
    let out = check_events_on(&lost, &[0, 1, 2]);
    assert!(
        out.iter()
            .any(|v| v.contains("4 events are missing") && v.contains("3 counted")),
        "{out:?}"
    );
}
