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

use bytes::Bytes;
use prost::Message;
use std::path::PathBuf;
use talon_core::ClientId;
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
