//! A hunt end to end through the core, with the simulator's disk as storage: encoded client messages
//! → codec → identity check → flow tracker → durable store (with injected I/O errors and resends) →
//! hunt outcomes. Checks exact stats (invariant 2), one stored object per message (invariant 1), and
//! that the run is a pure function of its seed.

use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use talon_core::artifacts;
use talon_core::codec::{self, ClientInput, CodecLimits};
use talon_core::flows::{FlowAction, FlowKey, FlowLimits, FlowTracker, StoredMessage};
use talon_core::hunts::{ClientFacts, HuntAction, HuntLimits, HuntManager, HuntSpec};
use talon_core::registry::{Query, Registry, RegistryLimits, Sighting};
use talon_core::{ClientId, FlowId, HuntId, Timestamp, paths};
use talon_proto::comms::{self, client_message::Kind, flow_message::Payload as P};
use talon_sim::disk::{DiskFaults, SimDisk};
use talon_sim::rng::SimRng;

struct Client {
    key: Vec<u8>,
    id: ClientId,
    /// Encoded messages of its current flow and which are acknowledged.
    outbox: Vec<Vec<u8>>,
    acked: BTreeSet<u64>,
}

fn flow_message(flow: &FlowId, seq: u64, payload: P) -> Vec<u8> {
    let m = comms::FlowMessage {
        flow_id: flow.to_string(),
        seq,
        payload: Some(payload),
    };
    comms::ClientMessage {
        kind: Some(Kind::Flow(m)),
    }
    .encode_to_vec()
}

/// What the artifact produces on a client: `batches` batches of `rows` rows, then the final status.
fn run_artifact(flow: &FlowId, batches: u64, rows: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for b in 0..batches {
        let rs = (0..rows)
            .map(|r| Bytes::from(format!("{{\"batch\":{b},\"row\":{r}}}")))
            .collect();
        out.push(flow_message(
            flow,
            b,
            P::Rows(comms::ResultRows {
                source: "Generic.Test.Rows".into(),
                rows: rs,
            }),
        ));
    }
    let status = comms::FlowStatus {
        state: comms::FlowState::Completed as i32,
        total_rows: batches * rows,
        ..Default::default()
    };
    out.push(flow_message(flow, batches, P::Status(status)));
    out
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    scheduled: u64,
    completed: u64,
    rows: u64,
    stored_objects: Vec<String>,
}

fn run(seed: u64) -> Outcome {
    let root = SimRng::new(seed);
    let mut rng = root.fork("schedule");
    let faults = DiskFaults {
        error_p: 0.1,
        torn_write_p: 0.0,
    };
    let mut disk = SimDisk::new(1 << 30, faults, root.fork("disk"));
    let mut now = Timestamp(1_000);

    // Enrol 40 clients; every third carries the label the hunt wants.
    let mut registry = Registry::restore(RegistryLimits::default(), []);
    let mut clients = BTreeMap::new();
    for n in 0..40u32 {
        let mut key = vec![0u8; 32];
        root.fork(&format!("key-{n}")).fill(&mut key);
        let id = ClientId::from_public_key(&key);
        let s = Sighting {
            id: id.clone(),
            public_key: key.clone(),
            hostname: format!("host{n:02}"),
            fqdn: String::new(),
            os: "linux".into(),
            ips: vec![],
            last_ip: "127.0.0.1".into(),
            node: "master-8000".into(),
            connected_at: now,
        };
        registry.handle_seen(now, s).unwrap();
        if n % 3 == 0 {
            registry.set_label(&id, "web", false).unwrap();
        }
        clients.insert(
            id.clone(),
            Client {
                key,
                id,
                outbox: vec![],
                acked: BTreeSet::new(),
            },
        );
    }

    // The analyst's hunt, validated before anything is scheduled.
    let given = BTreeMap::from([("count".to_string(), "3".to_string())]);
    let (_, params) = artifacts::validate("Generic.Test.Rows", &given).unwrap();
    assert!(artifacts::validate("Generic.Test.Rowz", &given).is_err());
    let hunt = HuntId::from_u64(rng.next_u64());
    let spec = HuntSpec {
        artifact: "Generic.Test.Rows".into(),
        params,
        include_labels: BTreeSet::from(["web".to_string()]),
        exclude_labels: BTreeSet::new(),
        os: Some("linux".into()),
        expires: now.plus_ms(3_600_000),
        client_limit: None,
        description: "pipeline".into(),
    };
    let mut hunts = HuntManager::new(HuntLimits::default());
    hunts.create(now, hunt.clone(), spec).unwrap();
    let all: Vec<_> = registry
        .search(&Query::All, usize::MAX)
        .clients
        .into_iter()
        .cloned()
        .collect();
    for rec in &all {
        hunts.offer(
            now,
            ClientFacts {
                id: &rec.id,
                os: &rec.os,
                labels: &rec.labels,
            },
        );
    }
    while let Some(a) = hunts.poll_action() {
        if let HuntAction::Schedule { client, flow, .. } = a {
            clients.get_mut(&client).unwrap().outbox = run_artifact(&flow, 4, 3);
        }
    }

    // Deliver messages in a seeded order, with resends, until every client has every ack.
    let limits = CodecLimits::default();
    let mut tracker = FlowTracker::new(FlowLimits::default());
    let mut all_acked = false;
    for _round in 0..200 {
        let pending: Vec<(ClientId, u64)> = clients
            .values()
            .flat_map(|c| {
                (0..c.outbox.len() as u64)
                    .filter(|s| !c.acked.contains(s))
                    .map(|s| (c.id.clone(), s))
            })
            .collect();
        if pending.is_empty() {
            all_acked = true;
            break;
        }
        now = now.plus_ms(10);
        for _ in 0..pending.len() * 2 {
            let (cid, seq) = pending[rng.range(0, pending.len() as u64 - 1) as usize].clone();
            let c = &clients[&cid];
            let ClientInput::Flow {
                flow,
                seq: got,
                data,
            } = codec::decode(&c.outbox[seq as usize], &limits).unwrap()
            else {
                panic!("flow message expected");
            };
            assert_eq!(got, seq);
            // The frontend derives the id from the TLS key; a client cannot write as another.
            let derived = ClientId::from_public_key(&c.key);
            codec::check_identity(&c.id, &derived).unwrap();
            let key = FlowKey {
                client: derived,
                flow,
            };
            let _ = tracker.handle_message(now, key, seq, data.tracker_payload());
            while let Some(a) = tracker.poll_action() {
                match a {
                    FlowAction::Store { key, seq } => {
                        let path = paths::flow_message(&key.client, &key.flow, seq);
                        let bytes = &clients[&key.client].outbox[seq as usize];
                        let ok = disk
                            .write(&path, bytes)
                            .and_then(|_| disk.fsync(&path))
                            .is_ok();
                        tracker.handle_stored(now, &key, seq, ok);
                    }
                    FlowAction::StoreRefusal { .. } => {
                        unreachable!("the default budgets are far above this test's flows")
                    }
                    FlowAction::Ack { key, seq } => {
                        // Invariant 1: acknowledged means stored (listing injects no errors).
                        let path = paths::flow_message(&key.client, &key.flow, seq);
                        assert!(
                            disk.list(&path).contains(&path),
                            "acked {path} is not stored"
                        );
                        clients.get_mut(&key.client).unwrap().acked.insert(seq);
                    }
                    FlowAction::Audit { key } => {
                        let found = disk
                            .list(&paths::flow_messages_dir(&key.client, &key.flow))
                            .into_iter()
                            .filter_map(|p| {
                                let seq: u64 = p.rsplit('/').next()?.parse().ok()?;
                                let ClientInput::Flow { data, .. } =
                                    codec::decode(&disk.read(&p).ok()?, &limits).ok()?
                                else {
                                    return None;
                                };
                                Some(StoredMessage {
                                    seq,
                                    payload: data.tracker_payload(),
                                })
                            })
                            .collect();
                        tracker.handle_audit(now, &key, Some(found));
                    }
                    FlowAction::Completed(o) => {
                        hunts.handle_outcome(
                            now,
                            &hunt,
                            &o.key.client,
                            o.state,
                            o.rows,
                            o.uploaded_bytes,
                        );
                        // Recorded (the hunt outcome is in memory here): the final status is
                        // acknowledged now; without this the client would resend it forever.
                        tracker.handle_recorded(&o.key, true);
                    }
                }
            }
        }
    }
    // Every message of every client acknowledged, final statuses included.
    assert!(
        all_acked,
        "some messages were never acknowledged in 200 rounds"
    );
    let stats = hunts.get(&hunt).unwrap().stats();
    Outcome {
        scheduled: stats.scheduled,
        completed: stats.completed,
        rows: stats.rows,
        stored_objects: disk.list("clients/"),
    }
}

#[test]
fn hunt_through_codec_flows_and_storage_has_exact_stats() {
    let out = run(7);
    let labelled = (0..40).filter(|n| n % 3 == 0).count() as u64;
    assert_eq!(out.scheduled, labelled);
    assert_eq!(out.completed, labelled);
    assert_eq!(out.rows, labelled * 4 * 3);
    // One object per message (4 batches + final) per flow: resends were stored once.
    assert_eq!(out.stored_objects.len() as u64, labelled * 5);
}

#[test]
fn the_run_is_a_pure_function_of_its_seed() {
    assert_eq!(run(11), run(11));
    let (a, b) = (run(11), run(12));
    assert_eq!(
        (a.completed, a.rows),
        (b.completed, b.rows),
        "stats do not depend on the seed"
    );
}
