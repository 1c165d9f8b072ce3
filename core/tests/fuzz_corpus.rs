//! The fuzz targets' properties (`fuzz/props/`) run on stable as regular tests: over every input in
//! each target's corpus (`fuzz/corpus/<target>/`, where cargo-fuzz keeps what it found and any
//! crashing input is added once fixed) and over seeds built from real messages and hostile names.
//! `TALON_WRITE_CORPUS=1 cargo test -p talon-core --test fuzz_corpus` writes those seeds into the
//! corpus directories to start a fuzzing campaign from them.

// The core's no-I/O rule is for its logic; this harness reads (and on request writes) the corpus.
#![allow(clippy::disallowed_methods)]

#[path = "../../fuzz/props/client_message.rs"]
mod client_message;
#[path = "../../fuzz/props/filestore_path.rs"]
mod filestore_path;
#[path = "../../fuzz/props/remote_datastore.rs"]
mod remote_datastore;
#[path = "../../fuzz/props/replication.rs"]
mod replication;

use bytes::Bytes;
use prost::Message;
use std::path::PathBuf;
use talon_core::ClientId;
use talon_proto::cluster as pc;
use talon_proto::comms::{self, client_message::Kind, flow_message::Payload};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `check` over the seeds and every file of the target's corpus; returns how many inputs ran.
fn run(target: &str, seeds: &[Vec<u8>], check: fn(&[u8])) -> usize {
    let dir = corpus(target);
    if std::env::var_os("TALON_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).unwrap();
        }
    }
    for s in seeds {
        check(s);
    }
    let mut n = seeds.len();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{target}: {} fails the property", path.display());
            n += 1;
        }
    }
    n
}

fn enc(kind: Kind) -> Vec<u8> {
    comms::ClientMessage { kind: Some(kind) }.encode_to_vec()
}

fn flow(seq: u64, payload: Payload) -> Vec<u8> {
    enc(Kind::Flow(comms::FlowMessage {
        flow_id: "F.1A2B3C.H".into(),
        seq,
        payload: Some(payload),
    }))
}

#[test]
fn client_message_corpus() {
    let hello = comms::Hello {
        client_id: ClientId::from_public_key(b"key").to_string(),
        deployment_nonce: "nonce".into(),
        info: Some(comms::ClientInfo {
            hostname: "web01".into(),
            fqdn: "web01.corp.example".into(),
            os: "linux".into(),
            ips: vec!["10.0.0.1".into(), "fe80::1".into()],
            ..Default::default()
        }),
        running_flows: vec!["F.1".into()],
    };
    let rows = comms::ResultRows {
        source: "Generic.Test.Rows".into(),
        rows: (0..8)
            .map(|i| Bytes::from(format!("{{\"row\":{i},\"pad\":\"xxxx\"}}")))
            .collect(),
    };
    let seeds = vec![
        enc(Kind::Hello(hello)),
        flow(0, Payload::Rows(rows)),
        flow(
            1,
            Payload::FileChunk(comms::FileChunk {
                upload_id: 1,
                name: "/var/log/../../etc/passwd".into(),
                offset: 0,
                data: Bytes::from_static(b"root:x:0:0"),
                eof: true,
                ..Default::default()
            }),
        ),
        flow(
            2,
            Payload::Status(comms::FlowStatus {
                state: comms::FlowState::Completed as i32,
                total_rows: 8,
                ..Default::default()
            }),
        ),
        enc(Kind::TaskAck(comms::TaskAck {
            flow_id: "F.1A2B3C.H".into(),
        })),
        enc(Kind::Ping(comms::Ping {
            time_unix_ms: 1_790_000_000_000,
        })),
        vec![],
        vec![0xff; 64],
    ];
    let n = run("client_message", &seeds, client_message::check);
    assert!(n >= seeds.len());
}

#[test]
fn filestore_path_corpus() {
    let seeds: Vec<Vec<u8>> = [
        "../../etc/passwd",
        "/etc/shadow",
        "C:\\Windows\\System32\\config\\SAM",
        "a\0b",
        ".",
        "..",
        "%2e%2e/%2e%2e",
        "clients/C.0000000000000000/record.json",
        "ünïcödé/файл.txt",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([vec![b'a'; 300], vec![0xff, 0xfe, b'/', b'.']])
    .collect();
    let n = run("filestore_path", &seeds, filestore_path::check);
    assert!(n >= seeds.len());
}

/// One frame of the cluster targets' input: `[tag][length LE u16][protobuf]`.
fn frame(tag: u8, msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut f = vec![tag];
    f.extend_from_slice(&(body.len() as u16).to_le_bytes());
    f.extend_from_slice(&body);
    f
}

fn events(epoch: u64, seqs: std::ops::RangeInclusive<u64>) -> pc::MinionMessage {
    use pc::replicated_event::Event;
    let key = b"client public key".to_vec();
    let id = ClientId::from_public_key(&key).to_string();
    let body = |seq: u64| match seq % 4 {
        0 => Event::ClientSeen(pc::ClientSeen {
            client_id: id.clone(),
            public_key: key.clone().into(),
            last_ip: "10.0.0.7".into(),
            connected_unix_ms: 1_790_000_000_000,
            ..Default::default()
        }),
        1 => Event::TaskDelivered(pc::TaskDelivered {
            client_id: id.clone(),
            flow_id: "F.1A2B3C.H".into(),
        }),
        2 => Event::FlowCompleted(pc::FlowCompleted {
            client_id: id.clone(),
            flow_id: "F.1A2B3C.H".into(),
            state: comms::FlowState::Completed as i32,
            rows: 100,
            ..Default::default()
        }),
        _ => Event::ClientGone(pc::ClientGone {
            client_id: id.clone(),
        }),
    };
    pc::MinionMessage {
        kind: Some(pc::minion_message::Kind::Events(pc::EventBatch {
            epoch,
            events: seqs
                .map(|seq| pc::ReplicatedEvent {
                    seq,
                    time_unix_ms: 1_790_000_000_000 + seq,
                    event: Some(body(seq)),
                })
                .collect(),
            outbox: None,
        })),
    }
}

#[test]
fn replication_corpus() {
    let hello = pc::MinionMessage {
        kind: Some(pc::minion_message::Kind::Hello(pc::MinionHello {
            node: "minion-8100".into(),
            epoch: 5,
            acked_broadcast_seq: 0,
            outbox: None,
        })),
    };
    // As minions send them since they report their outbox.
    let reporting = |m: pc::MinionMessage| {
        let state = Some(pc::OutboxState {
            head_seq: 12,
            oldest_unix_ms: 1_790_000_000_000,
            sent_unix_ms: 1_790_000_000_500,
        });
        let kind = match m.kind {
            Some(pc::minion_message::Kind::Hello(h)) => {
                pc::minion_message::Kind::Hello(pc::MinionHello { outbox: state, ..h })
            }
            Some(pc::minion_message::Kind::Events(b)) => {
                pc::minion_message::Kind::Events(pc::EventBatch { outbox: state, ..b })
            }
            other => return pc::MinionMessage { kind: other },
        };
        pc::MinionMessage { kind: Some(kind) }
    };
    let seeds: Vec<Vec<u8>> = vec![
        // In order; a resend overlapping what was applied; a gap; a new epoch; a stale epoch.
        [
            frame(0, &hello),
            frame(0, &events(5, 1..=4)),
            frame(0, &events(5, 3..=6)),
            frame(0, &events(5, 9..=10)),
            frame(0, &events(6, 1..=2)),
            frame(0, &events(5, 7..=8)),
        ]
        .concat(),
        // Four minions interleaved (the inbox holds three).
        (0..4u8).flat_map(|m| frame(m, &events(1, 1..=3))).collect(),
        frame(1, &events(2, 1..=300)),
        [
            frame(0, &reporting(hello.clone())),
            frame(0, &reporting(events(5, 1..=4))),
        ]
        .concat(),
    ];
    let n = run("replication", &seeds, replication::check);
    assert!(n >= seeds.len());
}

#[test]
fn remote_datastore_corpus() {
    let set = |key: &str, parts: &[&[u8]]| -> Vec<u8> {
        let total = parts.iter().map(|p| p.len() as u64).sum();
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let chunk = pc::SetChunk {
                key: if i == 0 { key.into() } else { String::new() },
                total_len: if i == 0 { total } else { 0 },
                data: Bytes::copy_from_slice(p),
            };
            out.extend(frame(1, &chunk));
        }
        out.extend(frame(2, &pc::SetChunk::default()));
        out
    };
    let get = |key: &str| frame(0, &pc::GetRequest { key: key.into() });
    let del = |key: &str| frame(3, &pc::DeleteRequest { key: key.into() });
    let list = |prefix: &str| {
        frame(
            4,
            &pc::ListRequest {
                prefix: prefix.into(),
                limit: 0,
            },
        )
    };
    let seeds: Vec<Vec<u8>> = vec![
        [
            set(
                "clients/C.0123456789abcdef/record.json",
                &[b"{\"a\":", b"1}"],
            ),
            get("clients/C.0123456789abcdef/record.json"),
            list("clients/"),
            del("clients/C.0123456789abcdef/record.json"),
            get("clients/C.0123456789abcdef/record.json"),
        ]
        .concat(),
        [
            set("../../etc/passwd", &[b"root"]),
            set("/abs/key", &[b"x"]),
            set("a/./b", &[b"x"]),
            get("a\0b"),
            del(".."),
        ]
        .concat(),
        // More bytes than announced, and a value over the bound.
        [
            frame(
                1,
                &pc::SetChunk {
                    key: "k".into(),
                    total_len: 2,
                    data: Bytes::from_static(b"abc"),
                },
            ),
            frame(
                1,
                &pc::SetChunk {
                    key: "big".into(),
                    total_len: 1 << 40,
                    data: Bytes::new(),
                },
            ),
            frame(2, &pc::SetChunk::default()),
        ]
        .concat(),
        (0..12)
            .flat_map(|i| set(&format!("hunts/H.{i:02}/record.json"), &[b"{}"]))
            .chain(list("hunts/"))
            .collect(),
    ];
    let n = run("remote_datastore", &seeds, remote_datastore::check);
    assert!(n >= seeds.len());
}
