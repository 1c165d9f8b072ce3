//! Hostile input against a real deployment (a master and a minion as `talon` processes on loopback):
//! impersonation, replays, malformed and oversized messages, floods, stalls, certificates that are
//! not what they should be, and names that try to leave the filestore. Each case asserts the clear
//! refusal a person or agent gets, and that what was stored before is byte-for-byte intact.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

mod common;
use common::*;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use talon_core::Timestamp;
use talon_io::deploy::config::{ApiClientConfig, ClientConfig, ServerConfig, read_yaml};
use talon_io::deploy::pki;
use talon_io::net::tls;
use talon_io::net::{Net, TokioNet};
use talon_proto::api::{SearchRequest, api_client::ApiClient};
use talon_proto::cluster::{self as pc, replication_client::ReplicationClient};
use talon_proto::comms::{
    self, ClientMessage, ServerMessage, client_message::Kind, flow_message::Payload,
    server_message::Kind as Down,
};
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status, Streaming};

// ---------------------------------------------------------------------------------------------
// A raw client: sends any bytes as gRPC messages on `Comms.Connect`, reads the server's replies.

/// Sends pre-encoded bytes (valid or not); decodes `ServerMessage`.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ServerMessage;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ServerMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ServerMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        ServerMessage::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

struct Raw {
    tx: mpsc::Sender<Vec<u8>>,
    rx: Streaming<ServerMessage>,
}

/// Connects to `port` with `identity`, sends `first`, and returns the stream (or the refusal).
async fn raw(port: u16, ca: &str, identity: &pki::Pem, first: Vec<u8>) -> Result<Raw, Status> {
    let cfg = tls::client_config(ca, &identity.certificate, &identity.private_key).unwrap();
    let net: Arc<dyn Net> = TokioNet::shared();
    let ch = tls::connect(&net, "127.0.0.1", port, cfg, Duration::from_secs(10))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(ch).max_decoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(64);
    tx.send(first).await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/talon.comms.Comms/Connect");
    let rx = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            RawCodec,
        )
        .await?
        .into_inner();
    Ok(Raw { tx, rx })
}

impl Raw {
    async fn send(&self, m: Vec<u8>) {
        let _ = self.tx.send(m).await;
    }

    /// The next message that is not a Pong, or the stream's end (`Err`).
    async fn next(&mut self) -> Result<ServerMessage, Status> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
                .await
                .map_err(|_| Status::deadline_exceeded("test: nothing from the server in 20 s"))??
                .ok_or_else(|| Status::cancelled("stream ended"))?;
            if !matches!(m.kind, Some(Down::Pong(_))) {
                return Ok(m);
            }
        }
    }

    /// Waits for a message matching `want`, skipping others (acks, tasks).
    async fn until<T>(&mut self, mut want: impl FnMut(&Down) -> Option<T>) -> T {
        loop {
            let m = self.next().await.expect("the stream stays open");
            if let Some(t) = m.kind.as_ref().and_then(&mut want) {
                return t;
            }
        }
    }

    async fn error_for(&mut self, seq: u64) -> comms::ServerError {
        self.until(|k| match k {
            Down::Error(e) if e.seq == seq => Some(e.clone()),
            _ => None,
        })
        .await
    }

    async fn ack_for(&mut self, flow: &str, seq: u64) {
        self.until(|k| match k {
            Down::Ack(a) if a.flow_id == flow && a.seq == seq => Some(()),
            _ => None,
        })
        .await
    }
}

/// A raw client's stream on `port` once the frontend has welcomed it, trying for up to 60 s while
/// the frontend starts.
async fn welcomed(port: u16, ca: &str, key: &pki::Pem, id: &str, nonce: &str) -> Raw {
    welcomed_as(port, ca, key, hello(id, nonce)).await
}

/// [`welcomed`], saying `hello`.
async fn welcomed_as(port: u16, ca: &str, key: &pki::Pem, hello: Vec<u8>) -> Raw {
    let started = Instant::now();
    let mut s = loop {
        match raw(port, ca, key, hello.clone()).await {
            Ok(s) => break s,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("waiting for the frontend on port {port}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("the frontend on port {port} does not answer: {e}"),
        }
    };
    s.until(|k| matches!(k, Down::Welcome(_)).then_some(()))
        .await;
    s
}

fn enc(kind: Kind) -> Vec<u8> {
    ClientMessage { kind: Some(kind) }.encode_to_vec()
}

/// The frontend port, CA certificate and deployment nonce a raw client of `d` needs.
fn endpoint(d: &Deployment) -> (u16, String, String) {
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    (
        cfg.frontend.bind_port,
        client.client.ca_certificate,
        client.client.nonce,
    )
}

fn hello(claimed: &str, nonce: &str) -> Vec<u8> {
    enc(Kind::Hello(comms::Hello {
        client_id: claimed.into(),
        deployment_nonce: nonce.into(),
        info: Some(comms::ClientInfo {
            hostname: "raw-client".into(),
            os: "linux".into(),
            ..Default::default()
        }),
        running_flows: vec![],
    }))
}

fn flow_msg(flow: &str, seq: u64, payload: Payload) -> Vec<u8> {
    enc(Kind::Flow(comms::FlowMessage {
        flow_id: flow.into(),
        seq,
        payload: Some(payload),
    }))
}

fn rows(n: usize) -> Payload {
    Payload::Rows(comms::ResultRows {
        source: "Generic.Test.Rows".into(),
        rows: (0..n)
            .map(|i| Bytes::from(format!("{{\"forged\":{i}}}")))
            .collect(),
    })
}

fn chunk(name: &str, offset: u64, data: &[u8], eof: bool) -> Payload {
    use sha2::Digest;
    Payload::FileChunk(comms::FileChunk {
        upload_id: 1,
        name: name.into(),
        offset,
        data: Bytes::copy_from_slice(data),
        eof,
        total_size: if eof { offset + data.len() as u64 } else { 0 },
        sha256: if eof {
            Bytes::copy_from_slice(&sha2::Sha256::digest(data))
        } else {
            Bytes::new()
        },
    })
}

fn identity() -> (pki::Pem, String) {
    let (pem, id) = pki::new_endpoint_identity(Timestamp(now_ms())).unwrap();
    (pem, id.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every file a client has on the shared volume, metadata and filestore (the generated config keeps
/// them in `shared/metadata` and `shared/filestore`), and every flow message of it the filestore's
/// segment files hold: `metadata/…` or `filestore/…` → bytes.
fn client_files(d: &Deployment, client: &str) -> BTreeMap<String, Vec<u8>> {
    use talon_io::storage::segments;
    let mut out = BTreeMap::new();
    let seg = d.path(&format!("shared/filestore/{}", segments::SEGMENTS_DIR));
    let files = snapshot(&seg);
    for (name, index) in files.iter().filter(|(n, _)| n.ends_with(".index")) {
        let data = bytes::Bytes::from(files[&segments::data_file_of(name).unwrap()].clone());
        for e in segments::parse_index(index) {
            let end = (e.offset + e.len) as usize;
            if end > data.len() {
                continue;
            }
            let (records, _) = segments::parse_records(&data.slice(e.offset as usize..end));
            for (k, v) in records {
                if k.starts_with(&format!("clients/{client}/")) {
                    out.insert(format!("filestore/{k}"), v.to_vec());
                }
            }
        }
    }
    for part in ["metadata", "filestore"] {
        let dir = d.path(&format!("shared/{part}/clients/{client}"));
        out.extend(
            snapshot(&dir)
                .into_iter()
                .map(|(k, v)| (format!("{part}/{k}"), v)),
        );
    }
    out
}

/// Every file under `dir`, relative path → bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, bytes);
            }
        }
    }
    out
}

fn set_key(yaml: &str, key: &str, value: &str) -> String {
    let line = yaml
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in the config"));
    let indent = &line[..line.len() - line.trim_start().len()];
    yaml.replacen(line, &format!("{indent}{key}: {value}"), 1)
}

/// Collects `count` rows from `client` and waits for them: the deployment still works end to end.
fn collects(d: &Deployment, client: &str, count: u64) -> serde_json::Value {
    let v = json(&d.api(&[
        "collect",
        client,
        "Generic.Test.Rows",
        "--param",
        &format!("count={count}"),
        "--wait",
        "--json",
    ]));
    assert_eq!(v["rows"], count, "{v}");
    v
}

/// Sets `Frontend.resources` / `Datastore` keys in the deployment's server config.
fn configure(d: &Deployment, keys: &[(&str, &str)]) {
    let mut yaml = std::fs::read_to_string(d.path("server.config.yaml")).unwrap();
    for (k, v) in keys {
        yaml = set_key(&yaml, k, v);
    }
    std::fs::write(d.path("server.config.yaml"), &yaml).unwrap();
}

struct Setup {
    d: Deployment,
    master_port: u16,
    minion_port: u16,
    minion: String,
    ca: String,
    nonce: String,
}

/// A master and one minion with small limits, and a real agent that has run one collection.
fn deployment() -> Setup {
    let d = Deployment::new();
    let (minion, p1) = d.add_minion();
    configure(
        &d,
        &[
            ("max_upload_size", "100000"),
            ("connections_per_second", "20"),
            ("hello_timeout_s", "2"),
            ("handshake_timeout_s", "3"),
            ("max_in_flight_per_flow", "4"),
        ],
    );
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    Setup {
        master_port: cfg.frontend.bind_port,
        minion_port: p1,
        minion,
        ca: client.client.ca_certificate,
        nonce: client.client.nonce,
        d,
    }
}

#[test]
fn hostile_clients_are_refused_and_stored_data_is_intact() {
    let s = deployment();
    let d = &s.d;
    let _master = d.start_master();
    let _minion = d.start_minion(&s.minion);
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    d.wait_until("the agent enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let victim = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    let before = collects(d, &victim, 5);
    let victim_flow = before["flow_id"].as_str().unwrap().to_owned();
    let victim_rows = d.api(&["flow", "results", &victim, &victim_flow]);
    // The master writes metadata to the volume behind its journal: wait for the completed record.
    let record = format!("metadata/flows/{victim_flow}/record.json");
    d.wait_until("the victim's flow record is on the volume", || {
        client_files(d, &victim)
            .get(&record)
            .is_some_and(|b| String::from_utf8_lossy(b).contains("\"state\":\"completed\""))
    });
    let victim_files = client_files(d, &victim);
    assert!(victim_files.keys().any(|k| k.starts_with("metadata/")));
    assert!(victim_files.keys().any(|k| k.starts_with("filestore/")));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ca, nonce) = (s.ca.clone(), s.nonce.clone());
    let (mallory, mallory_id) = identity();
    rt.block_on(async {
        // 1. Claiming the victim's id with another key: refused on every frontend.
        for port in [s.master_port, s.minion_port] {
            let e = raw(port, &ca, &mallory, hello(&victim, &nonce))
                .await
                .err()
                .expect("an impostor must be refused");
            assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
            assert!(e.message().contains("but its key derives"), "{e:?}");
        }
        // Another deployment's nonce.
        let e = raw(
            s.master_port,
            &ca,
            &mallory,
            hello(&mallory_id, "not-the-nonce"),
        )
        .await
        .err()
        .expect("a foreign nonce must be refused");
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("nonce"), "{e:?}");

        // 2. Malformed and truncated protobufs as the first message.
        for garbage in [
            vec![0x0a, 0xff, 0xff, 0x01],
            vec![0x0a, 0x05, 0x0a],
            vec![0xff; 16],
        ] {
            let e = raw(s.master_port, &ca, &mallory, garbage)
                .await
                .err()
                .expect("garbage must be refused");
            assert!(
                matches!(e.code(), Code::Internal | Code::InvalidArgument),
                "{e:?}"
            );
        }
        // A first message that is not a Hello.
        let e = raw(
            s.master_port,
            &ca,
            &mallory,
            enc(Kind::Ping(comms::Ping { time_unix_ms: 1 })),
        )
        .await
        .err()
        .expect("a Ping first must be refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("must be a Hello"), "{e:?}");

        // 3. Mallory enrols as herself and replays the victim's flow: stored only as Mallory's.
        let mut m = raw(s.minion_port, &ca, &mallory, hello(&mallory_id, &nonce))
            .await
            .expect("a client with its own key is welcome");
        let w = m
            .until(|k| match k {
                Down::Welcome(w) => Some(w.clone()),
                _ => None,
            })
            .await;
        assert_eq!(w.client_id, mallory_id, "the id is derived from the key");
        assert_eq!(w.max_in_flight, 4, "the configured limit is announced");
        m.send(flow_msg(&victim_flow, 0, rows(3))).await;
        let e = m.error_for(0).await;
        assert_eq!(e.code, comms::ErrorCode::UnknownFlow as i32, "{e:?}");
        assert!(e.message.contains("never tasked"), "{e:?}");

        // 4. Malformed messages on an open stream: refused one by one, the stream stays usable.
        let bad_id = flow_msg("../../etc", 0, rows(1));
        m.send(bad_id).await;
        let e = m.error_for(0).await;
        assert_eq!(e.code, comms::ErrorCode::InvalidMessage as i32, "{e:?}");
        m.send(flow_msg("F.AAAA01.H", 1, rows(10_001))).await;
        let e = m.error_for(1).await;
        assert!(e.message.contains("rows"), "{e:?}");
        m.send(flow_msg("F.AAAA01.H", 2, chunk("a\0b", 0, b"x", true)))
            .await;
        let e = m.error_for(2).await;
        assert_eq!(e.code, comms::ErrorCode::InvalidMessage as i32, "{e:?}");
        // An upload past max_upload_size (100,000 bytes here).
        m.send(flow_msg(
            "F.AAAA01.H",
            3,
            chunk("big.bin", 99_000, &[7; 2000], false),
        ))
        .await;
        let e = m.error_for(3).await;
        assert!(e.message.contains("max_upload_size"), "{e:?}");
        // A second Hello ends the stream.
        m.send(hello(&mallory_id, &nonce)).await;
        let end = loop {
            match m.next().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(end.message().contains("second Hello"), "{end:?}");

        // 5. A message over max_message_size (8 MiB) ends the stream; nothing of it is stored.
        let mut m = raw(s.master_port, &ca, &mallory, hello(&mallory_id, &nonce))
            .await
            .unwrap();
        let huge = flow_msg(
            "F.AAAA03.H",
            0,
            Payload::Rows(comms::ResultRows {
                source: "x".into(),
                rows: vec![Bytes::from(vec![b' '; 9 << 20])],
            }),
        );
        m.send(huge).await;
        let end = loop {
            match m.next().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(end.code(), Code::OutOfRange, "{end:?}");
        assert!(end.message().contains("too large"), "{end:?}");

        // 6. A client that opens the stream and stalls is cut off after hello_timeout_s (2 s).
        let started = Instant::now();
        let cfg = tls::client_config(&ca, &mallory.certificate, &mallory.private_key).unwrap();
        let net: Arc<dyn Net> = TokioNet::shared();
        let ch = tls::connect(
            &net,
            "127.0.0.1",
            s.master_port,
            cfg,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let mut c = comms::comms_client::CommsClient::new(ch);
        let (_keep_open, rx) = mpsc::channel::<ClientMessage>(1);
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            c.connect(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .expect("the server answers a stalled stream");
        let e = r.expect_err("a stalled stream is refused");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(e.message().contains("hello_timeout_s"), "{e:?}");
        eprintln!("stalled stream closed after {:?}", started.elapsed());
    });

    // 7. A TCP connection that never starts TLS is dropped after handshake_timeout_s (3 s).
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.master_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server closes a connection that stalls before TLS"
    );

    // 8. A connection flood past connections_per_second (20): most are closed before any TLS work.
    std::thread::sleep(Duration::from_secs(2)); // let the bucket refill
    let mut conns = Vec::new();
    for _ in 0..200 {
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", s.master_port)) {
            conns.push(c);
        }
    }
    let mut closed = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                closed += 1
            }
            _ => {}
        }
    }
    drop(conns);
    eprintln!("flood: {closed} of 200 connections closed before TLS");
    assert!(
        closed >= 150,
        "only {closed} of 200 flood connections were refused"
    );

    // 9. Names that try to leave the filestore, through a real collection's upload path.
    let outside = d.path("escape-target");
    let names = [
        format!("../../../../../../{}", outside.display()),
        outside.display().to_string(),
        "x".repeat(4000), // Within max_upload_name_length (4,096), far over a file name's 255.
        "..".into(),
    ];
    let expected_files = names.len();
    let (eve, eve_id) = identity();
    let uploads_flow = rt.block_on(async {
        let mut e = raw(s.master_port, &ca, &eve, hello(&eve_id, &nonce))
            .await
            .unwrap();
        e.until(|k| matches!(k, Down::Welcome(_)).then_some(()))
            .await;
        e
    });
    let mut eve_stream = uploads_flow;
    d.wait_until("eve is enrolled", || {
        d.clients()
            .iter()
            .any(|c| c["client_id"] == eve_id.as_str())
    });
    let collect = json(&d.api(&["collect", &eve_id, "Generic.Test.Rows", "--json"]));
    let flow = collect["flow_id"].as_str().unwrap().to_owned();
    rt.block_on(async {
        let task = eve_stream
            .until(|k| match k {
                Down::Task(t) => Some(t.clone()),
                _ => None,
            })
            .await;
        assert_eq!(task.flow_id, flow);
        eve_stream
            .send(enc(Kind::TaskAck(comms::TaskAck {
                flow_id: flow.clone(),
            })))
            .await;
        // More in flight than allowed: a message far ahead of what is stored is refused as BUSY.
        eve_stream.send(flow_msg(&flow, 5_000, rows(1))).await;
        let e = eve_stream.error_for(5_000).await;
        assert_eq!(e.code, comms::ErrorCode::Busy as i32, "{e:?}");
        for (seq, n) in names.iter().enumerate() {
            let mut c = chunk(n, 0, format!("payload {seq}").as_bytes(), true);
            if let Payload::FileChunk(fc) = &mut c {
                fc.upload_id = seq as u32 + 1;
            }
            eve_stream.send(flow_msg(&flow, seq as u64, c)).await;
            eve_stream.ack_for(&flow, seq as u64).await;
        }
        let last = names.len() as u64;
        eve_stream
            .send(flow_msg(
                &flow,
                last,
                Payload::Status(comms::FlowStatus {
                    state: comms::FlowState::Completed as i32,
                    ..Default::default()
                }),
            ))
            .await;
        eve_stream.ack_for(&flow, last).await;
    });
    let done = json(&d.api(&["flow", "show", &eve_id, &flow, "--json"]));
    assert_eq!(done["state"], "completed", "{done}");
    let uploads = d.path(&format!(
        "shared/filestore/clients/{eve_id}/flows/{flow}/uploads"
    ));
    d.wait_until("the uploads are rebuilt", || {
        snapshot(&uploads).len() == expected_files
    });
    for (name, bytes) in snapshot(&uploads) {
        eprintln!("upload stored as {name:.80}");
        assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
        assert!(name.len() <= 255, "{name}");
        assert!(
            String::from_utf8_lossy(&bytes).starts_with("payload "),
            "{name}"
        );
    }
    assert!(
        !outside.exists(),
        "nothing is written outside the filestore"
    );
    // Hostile artifact names and parameters are refused before anything is scheduled (through the
    // API itself: a command line cannot carry a NUL byte).
    rt.block_on(async {
        let mut api = talon_io::cli::api_client::Api::connect(&d.path("api.yaml"))
            .await
            .unwrap();
        let p = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        for (artifact, params, want) in [
            ("../../etc/passwd", BTreeMap::new(), "unknown artifact"),
            ("Generic.Test.Rows", p("count", "1\0"), "count"),
            ("Generic.Test.Rows", p("../x", "1"), "no parameter"),
            ("Generic.Test.Rows", p("size", &"9".repeat(5000)), "size"),
            (
                "Generic.Forensic.FileFinder",
                p("glob\0", "/etc/*"),
                "no parameter",
            ),
        ] {
            let e = api
                .collect(&eve_id, artifact, params.clone())
                .await
                .expect_err("a hostile collection must be refused");
            assert!(e.contains(want), "{artifact} {params:?}: {e}");
        }
    });
    let out = run(&[
        "--api-config",
        &d.s("api.yaml"),
        "hunt",
        "create",
        "Generic.Test.Rows/../../x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown artifact"));

    // Mallory's replay and invented flows stored nothing at all.
    let mallory_files = client_files(d, &mallory_id);
    assert!(
        mallory_files.keys().all(|k| !k.contains("/flows/")),
        "{:?}",
        mallory_files.keys().collect::<Vec<_>>()
    );
    // Stored data is intact: the victim's files byte for byte, its results, and it still works.
    assert_eq!(
        client_files(d, &victim),
        victim_files,
        "the victim's stored data changed"
    );
    assert_eq!(
        d.api(&["flow", "results", &victim, &victim_flow]),
        victim_rows
    );
    collects(d, &victim, 2);
}

#[test]
fn certificates_that_are_not_what_they_should_be_are_refused() {
    let s = deployment();
    let d = &s.d;
    let master = d.start_master();
    let other = Deployment::new();
    let api: ApiClientConfig = read_yaml(&d.path("api.yaml")).unwrap();
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let (host, port) =
        talon_io::deploy::config::parse_host_port(&api.api_connection_string).unwrap();
    let net: Arc<dyn Net> = TokioNet::shared();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let search = |tls_cfg: Arc<rustls::ClientConfig>| {
        let (net, host) = (net.clone(), host.clone());
        rt.block_on(async move {
            let ch = tls::connect(&net, &host, port, tls_cfg, Duration::from_secs(10))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            ApiClient::new(ch)
                .search_clients(SearchRequest {
                    query: "all".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
        })
    };
    // The real API user works.
    let good = tls::client_config(
        &api.ca_certificate,
        &api.client_cert,
        &api.client_private_key,
    )
    .unwrap();
    search(good).expect("the API user is served");

    // No certificate at all: the handshake is refused.
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::certs(&api.ca_certificate, "CA").unwrap() {
        roots.add(c).unwrap();
    }
    let mut none = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    none.alpn_protocols = vec![b"h2".to_vec()];
    assert!(
        search(Arc::new(none)).is_err(),
        "no certificate must be refused"
    );

    // An endpoint (client) certificate: self-signed, not the CA's.
    let (endpoint, _) = identity();
    let as_client = tls::client_config(
        &api.ca_certificate,
        &endpoint.certificate,
        &endpoint.private_key,
    )
    .unwrap();
    assert!(
        search(as_client).is_err(),
        "a client certificate must be refused"
    );

    // An API certificate of this CA that has expired.
    let ca = pki::Pem {
        certificate: cfg.ca.certificate.clone(),
        private_key: cfg.ca.private_key.clone(),
    };
    let long_ago = Timestamp(now_ms() - (pki::LEAF_VALID_DAYS as u64 + 30) * 86_400_000);
    let expired = pki::issue_api_client(&ca, "mallory", long_ago).unwrap();
    let e = search(
        tls::client_config(
            &api.ca_certificate,
            &expired.certificate,
            &expired.private_key,
        )
        .unwrap(),
    )
    .expect_err("an expired certificate must be refused");
    eprintln!("expired: {e}");

    // An API certificate of another deployment's CA.
    let foreign: ApiClientConfig = read_yaml(&other.path("api.yaml")).unwrap();
    let foreign_cfg = tls::client_config(
        &api.ca_certificate,
        &foreign.client_cert,
        &foreign.client_private_key,
    )
    .unwrap();
    assert!(
        search(foreign_cfg).is_err(),
        "a foreign CA's certificate must be refused"
    );

    // A "minion" presenting the API user's certificate (CA-signed, but not the frontend's) is
    // refused the replication stream and the remote datastore.
    let as_api = tls::client_config(
        &api.ca_certificate,
        &api.client_cert,
        &api.client_private_key,
    )
    .unwrap();
    let (repl, ds) = rt.block_on(async {
        let ch = tls::connect(&net, &host, port, as_api, Duration::from_secs(10))
            .await
            .unwrap();
        let hello = pc::MinionMessage {
            kind: Some(pc::minion_message::Kind::Hello(pc::MinionHello {
                node: s.minion.clone(),
                epoch: 1,
                acked_broadcast_seq: 0,
                outbox: None,
            })),
        };
        let repl = ReplicationClient::new(ch.clone())
            .stream(tokio_stream::iter(vec![hello]))
            .await
            .expect_err("the replication stream must be refused");
        let ds = pc::remote_datastore_client::RemoteDatastoreClient::new(ch)
            .delete(pc::DeleteRequest {
                key: format!("clients/{}", "C.0123456789abcdef"),
            })
            .await
            .expect_err("the remote datastore must be refused");
        (repl, ds)
    });
    for e in [&repl, &ds] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("frontend certificate"), "{e:?}");
    }
    // Another deployment's frontend certificate: the TLS handshake itself fails.
    let theirs = ServerConfig::load(&other.path("server.config.yaml")).unwrap();
    let foreign_fe = tls::client_config(
        &api.ca_certificate,
        &theirs.frontend.certificate,
        &theirs.frontend.private_key,
    )
    .unwrap();
    assert!(
        search(foreign_fe).is_err(),
        "a foreign frontend certificate must be refused"
    );

    // Rotating the CA (docs/security.md): between the steps old and new API users both work; after
    // `--finish` the old ones and agents that never got the new client config are refused.
    drop(master);
    let pre_rotation_client = d.path("client.before-rotation.yaml");
    std::fs::copy(d.path("client.config.yaml"), &pre_rotation_client).unwrap();
    let out = ok(&["-c", &d.s("server.config.yaml"), "config", "rotate-ca"]);
    assert!(out.contains("rotation begun"), "{out}");
    let master = d.start_master(); // waits for the pre-rotation API user to be served
    ok(&[
        "-c",
        &d.s("server.config.yaml"),
        "config",
        "api-client",
        "--name",
        "bob",
        "--out",
        &d.s("api-bob.yaml"),
    ]);
    ok(&[
        "--api-config",
        &d.s("api-bob.yaml"),
        "clients",
        "search",
        "all",
    ]);
    drop(master);
    let out = ok(&[
        "-c",
        &d.s("server.config.yaml"),
        "config",
        "rotate-ca",
        "--finish",
    ]);
    assert!(out.contains("rotation finished"), "{out}");
    std::fs::rename(d.path("api.yaml"), d.path("api-alice-old.yaml")).unwrap();
    std::fs::copy(d.path("api-bob.yaml"), d.path("api.yaml")).unwrap();
    let _master = d.start_master(); // now waits for bob
    let old = run(&[
        "--api-config",
        &d.s("api-alice-old.yaml"),
        "clients",
        "search",
        "all",
    ]);
    assert!(
        !old.status.success(),
        "an API user of the old CA must be refused"
    );
    let _new_agent = d.start_client(&d.path("client.config.yaml"), "rotated-agent");
    let _old_agent = d.start_client(&pre_rotation_client, "stale-agent");
    d.wait_until("the agent with the new client config enrols", || {
        d.clients().len() == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        d.clients().len(),
        1,
        "an agent pinning only the old CA cannot connect"
    );
    let log = std::fs::read_to_string(d.path("stale-agent.log")).unwrap();
    assert!(log.contains("connection failed"), "{log}");
}

/// Frames of a journal segment: (offset, seq) of each (`len u32 | crc u32 | seq u64 | payload`).
fn journal_frames(bytes: &[u8]) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        out.push((at, seq));
        at += 8 + len;
    }
    out
}

/// A flipped bit in the middle of the master's journal (a record with valid records after it) is
/// not a torn tail: the master refuses to start, naming the file and the offset, and leaves the
/// file as it was; once the damage is repaired, every acknowledged label write is there. (Before,
/// the file was cut at the damage with one INFO line, and the acknowledged writes after it lost.)
#[test]
fn damage_in_the_middle_of_the_journal_stops_the_start_and_loses_nothing() {
    let d = Deployment::new();
    let mut master = d.start_master();
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    d.wait_until("the agent enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let client = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    for i in 0..20 {
        d.api(&["label", "add", &client, &format!("l{i}")]);
    }
    master.0.kill().unwrap();
    master.0.wait().unwrap();
    let journal = d.path("local/journal");
    let last = std::fs::read_dir(&journal)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .expect("a journal segment");
    let good = std::fs::read(&last).unwrap();
    let frames = journal_frames(&good);
    assert!(frames.len() >= 20, "{} records", frames.len());
    let (at, _) = frames[frames.len() / 2];
    let mut bad = good.clone();
    bad[at + 17] ^= 0x01; // a payload byte of a record in the middle
    std::fs::write(&last, &bad).unwrap();

    let mut start = d.start_frontend("damaged", &["--local-dir", &d.s("local")]);
    d.wait_until_within(
        "the master refuses the damaged journal (it is still running)",
        Duration::from_secs(60),
        || start.0.try_wait().unwrap().is_some(),
    );
    let status = start.0.wait().unwrap();
    let err = std::fs::read_to_string(d.path("damaged.log")).unwrap();
    assert!(
        !status.success(),
        "the master started on a damaged journal: {err}"
    );
    let name = last.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains(name) && err.contains(&format!("damaged record at byte {at}")),
        "the error names the file and offset: {err}"
    );
    assert_eq!(
        std::fs::read(&last).unwrap(),
        bad,
        "the file is left as it was"
    );

    // Repaired (the byte put back): nothing acknowledged was lost.
    std::fs::write(&last, &good).unwrap();
    let _master = d.start_master();
    let labels = d
        .clients()
        .iter()
        .find(|c| c["client_id"] == client.as_str())
        .map(|c| c["labels"].clone())
        .unwrap();
    for i in 0..20 {
        let l = format!("l{i}");
        assert!(
            labels.as_array().unwrap().iter().any(|x| x == l.as_str()),
            "label {l} lost: {labels}"
        );
    }
}

/// Item 1 of the hostile review: a tasked agent whose flow grows its record past
/// `Datastore.max_value_size` (many uploads with long names of control bytes, six bytes each in
/// JSON) used to stop the master. Now names are bounded, uploads per flow are bounded (the one past
/// the bound is refused and its refusal acknowledged in its place), a record that would not fit
/// fails its flow, and the master goes on serving with nothing acknowledged lost.
#[test]
fn a_flow_that_outgrows_its_record_fails_alone() {
    let d = Deployment::new();
    configure(
        &d,
        &[
            ("max_value_size", "65536"),
            ("max_uploads_per_flow", "30"),
            ("max_upload_name_length", "4000"),
        ],
    );
    let (port, ca, nonce) = endpoint(&d);
    let master = d.start_master();
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    d.wait_until("the agent enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let victim = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    let before = json(&d.api(&[
        "collect",
        &victim,
        "Generic.Test.Rows",
        "--param",
        "count=5",
        "--wait",
        "--json",
    ]));
    let victim_flow = before["flow_id"].as_str().unwrap().to_owned();
    let victim_rows = d.api(&["flow", "results", &victim, &victim_flow]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (eve, eve_id) = identity();
    let mut eve_stream = rt.block_on(async {
        let mut e = raw(port, &ca, &eve, hello(&eve_id, &nonce)).await.unwrap();
        e.until(|k| matches!(k, Down::Welcome(_)).then_some(()))
            .await;
        e
    });
    d.wait_until("eve is enrolled", || {
        d.clients()
            .iter()
            .any(|c| c["client_id"] == eve_id.as_str())
    });
    let collect = json(&d.api(&["collect", &eve_id, "Generic.Test.Rows", "--json"]));
    let flow = collect["flow_id"].as_str().unwrap().to_owned();
    let name = |i: usize| format!("{i:04}{}", "\u{1}".repeat(3996)); // 4,000 bytes, 24,000 in JSON
    rt.block_on(async {
        eve_stream
            .until(|k| matches!(k, Down::Task(t) if t.flow_id == flow).then_some(()))
            .await;
        // A name over max_upload_name_length is refused, and says which limit.
        let mut long = chunk(&"n".repeat(4001), 0, b"x", true);
        if let Payload::FileChunk(fc) = &mut long {
            fc.upload_id = 99;
        }
        eve_stream.send(flow_msg(&flow, 0, long)).await;
        let e = eve_stream.error_for(0).await;
        assert_eq!(e.code, comms::ErrorCode::InvalidMessage as i32, "{e:?}");
        assert!(e.message.contains("max_upload_name_length"), "{e:?}");
        // 30 uploads are stored; the 31st is refused, its refusal acknowledged in its place.
        for seq in 0..31u64 {
            let mut c = chunk(
                &name(seq as usize),
                0,
                format!("file {seq}").as_bytes(),
                true,
            );
            if let Payload::FileChunk(fc) = &mut c {
                fc.upload_id = seq as u32 + 1;
            }
            eve_stream.send(flow_msg(&flow, seq, c)).await;
            if seq == 30 {
                let e = eve_stream.error_for(30).await;
                assert_eq!(e.code, comms::ErrorCode::TooLarge as i32, "{e:?}");
                assert!(e.message.contains("max_uploads_per_flow (30)"), "{e:?}");
            }
            eve_stream.ack_for(&flow, seq).await;
        }
        eve_stream
            .send(flow_msg(
                &flow,
                31,
                Payload::Status(comms::FlowStatus {
                    state: comms::FlowState::Completed as i32,
                    ..Default::default()
                }),
            ))
            .await;
        eve_stream.ack_for(&flow, 31).await;
    });
    // The record with 30 such names would be ~720 KB: the flow fails, listing what fits.
    let mut shown = serde_json::Value::Null;
    d.wait_until("the flow records why it failed", || {
        shown = json(&d.api(&["flow", "show", &eve_id, &flow, "--json"]));
        shown["error"]
            .as_str()
            .is_some_and(|e| e.contains("not listed"))
    });
    eprintln!("attacked flow: {:.300}", shown["error"]);
    assert_eq!(shown["state"], "error", "{shown}");
    let error = shown["error"].as_str().unwrap();
    assert!(error.contains("max_uploads_per_flow (30)"), "{error}");
    assert!(error.contains("Datastore.max_value_size (65536"), "{error}");
    // The files themselves are all in the filestore.
    let uploads = d.path(&format!(
        "shared/filestore/clients/{eve_id}/flows/{flow}/uploads"
    ));
    assert_eq!(snapshot(&uploads).len(), 30);

    // The master never stopped: same process, earlier results intact, a new collection works.
    let mut master = master;
    assert!(
        master.0.try_wait().unwrap().is_none(),
        "the master exited: {}",
        std::fs::read_to_string(d.path("master.log")).unwrap_or_default()
    );
    assert_eq!(
        d.api(&["flow", "results", &victim, &victim_flow]),
        victim_rows
    );
    collects(&d, &victim, 2);
}

/// Item 2 of the hostile review: a master whose unflushed backlog is at its bound (a slow volume,
/// a small `memcache_dirty_bytes`) refuses a replicated flow completion as busy. That used to stop
/// the master; now the event stays unacknowledged, the minion sends it again, and it is applied once
/// the backlog drains — the client's final status is acknowledged then, and nothing is lost.
#[test]
fn a_busy_master_applies_a_replicated_completion_later_instead_of_stopping() {
    let d = Deployment::new();
    let (minion, minion_port) = d.add_minion();
    let mut yaml = std::fs::read_to_string(d.path("server.config.yaml")).unwrap();
    for (k, v) in [
        ("memcache_dirty_bytes", "1048576"),
        ("max_value_size", "65536"),
        ("max_queued_tasks_per_client", "65536"),
    ] {
        yaml = set_key(&yaml, k, v);
    }
    // The minion reaches the volume at once; the master pays 3 s per volume operation, so its
    // backlog drains slowly (the knob is read by each node from its own config).
    std::fs::write(d.path("minion.config.yaml"), &yaml).unwrap();
    let slow = yaml.replacen(
        "  max_value_size: 65536",
        "  max_value_size: 65536\n  volume_latency_ms: 3000",
        1,
    );
    assert_ne!(slow, yaml, "the datastore section holds max_value_size");
    std::fs::write(d.path("server.config.yaml"), &slow).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    let (ca, nonce) = (client.client.ca_certificate, client.client.nonce);
    let mut master = d.start_master();
    let log = std::fs::File::create(d.path("minion.log")).unwrap();
    let _minion = Proc(
        talon()
            .args(["-c", &d.s("minion.config.yaml"), "frontend", "--minion"])
            .args(["--node", &minion, "--local-dir", &d.s("local-minion")])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    // Two clients: eve on the minion runs a collection; "offline" only receives the collections that
    // fill the master's backlog (it is not connected, so they queue).
    let (eve, eve_id) = identity();
    let (off, off_id) = identity();
    let mut eve_stream = rt.block_on(async {
        drop(welcomed(minion_port, &ca, &off, &off_id, &nonce).await);
        let mut e = raw(minion_port, &ca, &eve, hello(&eve_id, &nonce))
            .await
            .unwrap();
        e.until(|k| matches!(k, Down::Welcome(_)).then_some(()))
            .await;
        e
    });
    d.wait_until("both are enrolled", || {
        let c = d.clients();
        [&eve_id, &off_id]
            .iter()
            .all(|id| c.iter().any(|x| x["client_id"] == id.as_str()))
    });
    let collect = json(&d.api(&["collect", &eve_id, "Generic.Test.Rows", "--json"]));
    let flow = collect["flow_id"].as_str().unwrap().to_owned();
    let busy = rt.block_on(async {
        eve_stream
            .until(|k| matches!(k, Down::Task(t) if t.flow_id == flow).then_some(()))
            .await;
        eve_stream
            .send(enc(Kind::TaskAck(comms::TaskAck {
                flow_id: flow.clone(),
            })))
            .await;
        eve_stream.send(flow_msg(&flow, 0, rows(3))).await;
        eve_stream.ack_for(&flow, 0).await;
        // Eve's flow record must be on the volume first: a rewrite of a value still unflushed
        // costs the backlog only its growth, and might fit.
        let record = d.path(&format!(
            "shared/metadata/clients/{eve_id}/flows/{flow}/record.json"
        ));
        let started = Instant::now();
        while !std::fs::read_to_string(&record).is_ok_and(|r| r.contains("\"state\":\"queued\"")) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the record is never flushed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Fill the master's unflushed backlog with flow records (4 KiB globs) until it says busy.
        let mut api = talon_io::cli::api_client::Api::connect(&d.path("api.yaml"))
            .await
            .unwrap();
        let glob = format!("/{}", "g".repeat(4000));
        let mut busy = None;
        for _ in 0..2000 {
            let p = BTreeMap::from([("glob".to_owned(), glob.clone())]);
            if let Err(e) = api.collect(&off_id, "Generic.Forensic.FileFinder", p).await {
                busy = Some(e);
                break;
            }
        }
        // Then with small ones, so that even a flow record's rewrite no longer fits.
        for _ in 0..2000 {
            let p = BTreeMap::new();
            if api.collect(&off_id, "Generic.Test.Rows", p).await.is_err() {
                break;
            }
        }
        // The final status now: the minion stores it, replicates the completion, and the master
        // cannot record it until its backlog drains.
        eve_stream
            .send(flow_msg(
                &flow,
                1,
                Payload::Status(comms::FlowStatus {
                    state: comms::FlowState::Completed as i32,
                    ..Default::default()
                }),
            ))
            .await;
        let started = Instant::now();
        // A bound on liveness, not a speed figure: the backlog drains at 3 s per volume operation,
        // and each collection above left three keys to flush (flow record, task, audit entry):
        // 215 s measured on 2 cores (was under 180 s before the audit log).
        loop {
            let m = tokio::time::timeout(Duration::from_secs(420), eve_stream.rx.message())
                .await
                .expect("the final status is acknowledged within 420 s")
                .expect("the stream stays open")
                .expect("the stream stays open");
            if matches!(&m.kind, Some(Down::Ack(a)) if a.flow_id == flow && a.seq == 1) {
                break;
            }
        }
        eprintln!("final status acknowledged after {:?}", started.elapsed());
        busy
    });
    let busy = busy.expect("the backlog filled up");
    assert!(busy.contains("unflushed bytes"), "{busy}");
    assert!(
        master.0.try_wait().unwrap().is_none(),
        "the master exited: {}",
        std::fs::read_to_string(d.path("master.log")).unwrap_or_default()
    );
    let shown = json(&d.api(&["flow", "show", &eve_id, &flow, "--json"]));
    assert_eq!(shown["state"], "completed", "{shown}");
    assert_eq!(shown["rows"], 3, "{shown}");
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    assert!(
        log.contains("could not be applied yet"),
        "the completion met a busy master (else this test proves nothing)"
    );
}

/// Peak resident memory (kB) of process `pid`, sampled until it exits; returns it with the output.
fn run_sampling_memory(args: &[&str]) -> (std::process::Output, u64) {
    let child = talon()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (p, done) = (
        peak.clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let d2 = done.clone();
    let sampler = std::thread::spawn(move || {
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(kb) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                p.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    (out, peak.load(std::sync::atomic::Ordering::Relaxed))
}

/// Items 7 and 9 of the hostile review: agent text (a hostname with terminal escapes and a forged
/// line, rows that are spreadsheet formulas) is shown escaped in listings and the server's log and
/// neutralised in CSV unless `--raw`; and a hunt's export streams (memory does not grow with rows).
#[test]
fn agent_text_is_shown_escaped_and_exports_stream() {
    let d = Deployment::new();
    let (port, ca, nonce) = endpoint(&d);
    let _master = d.start_master();
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mallory, mallory_id) = identity();
    let evil_host = "pc\u{1b}[2J\u{1b}[H\nC.FORGED00000000  forged-host  linux  connected";
    let hello = enc(Kind::Hello(comms::Hello {
        client_id: mallory_id.clone(),
        deployment_nonce: nonce.clone(),
        info: Some(comms::ClientInfo {
            hostname: evil_host.into(),
            os: "linux".into(),
            fqdn: "bell\u{7}.example".into(),
            ..Default::default()
        }),
        running_flows: vec![],
    }));
    let mut m = rt.block_on(welcomed_as(port, &ca, &mallory, hello));
    d.wait_until("both are enrolled", || d.clients().len() == 2);
    let listing = d.api(&["clients", "search", "all"]);
    eprintln!("{listing}");
    assert!(
        !listing.contains('\u{1b}') && !listing.contains('\u{7}'),
        "{listing:?}"
    );
    assert!(
        listing.lines().all(|l| !l.starts_with("C.FORGED")),
        "a forged line: {listing}"
    );
    assert!(listing.contains("pc\\u{1b}[2J"), "{listing}");
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    let escaped: Vec<&str> = log.lines().filter(|l| l.contains('\u{1b}')).collect();
    assert!(
        escaped.is_empty(),
        "terminal escapes reached the log: {escaped:?}"
    );
    assert!(
        log.lines().all(|l| !l.starts_with("C.FORGED")),
        "a forged log line"
    );

    // One hunt: the real agent sends 300,000 rows, Mallory sends formulas.
    let hunt = d
        .api(&[
            "hunt",
            "create",
            "Generic.Test.Rows",
            "--param",
            "count=300000",
        ])
        .trim()
        .to_owned();
    rt.block_on(async {
        let t = m
            .until(|k| match k {
                Down::Task(t) => Some(t.clone()),
                _ => None,
            })
            .await;
        m.send(enc(Kind::TaskAck(comms::TaskAck {
            flow_id: t.flow_id.clone(),
        })))
        .await;
        let formulas = [
            r#"{"i":"=HYPERLINK(\"http://evil.example\",\"click\")"}"#,
            r#"{"i":"+cmd|' /C calc'!A0"}"#,
            r#"{"i":"@SUM(1+1)*cmd|' /C calc'!A0"}"#,
        ];
        let rows = Payload::Rows(comms::ResultRows {
            source: "Generic.Test.Rows".into(),
            rows: formulas.iter().map(|r| Bytes::from(*r)).collect(),
        });
        m.send(flow_msg(&t.flow_id, 0, rows)).await;
        m.ack_for(&t.flow_id, 0).await;
        let done = Payload::Status(comms::FlowStatus {
            state: comms::FlowState::Completed as i32,
            ..Default::default()
        });
        m.send(flow_msg(&t.flow_id, 1, done)).await;
        m.ack_for(&t.flow_id, 1).await;
    });
    d.wait_until("the hunt's rows are stored", || {
        json(&d.api(&["hunt", "show", &hunt, "--json"]))["stats"]["rows"] == 300_003
    });

    let api = d.s("api.yaml");
    let csv = ok(&[
        "--api-config",
        &api,
        "hunt",
        "results",
        &hunt,
        "--format",
        "csv",
    ]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 300_004, "a header and every row");
    assert_eq!(lines[0], "client_id,flow_id,i,pad,row");
    for f in ["'=HYPERLINK(", "'+cmd|", "'@SUM("] {
        assert!(csv.contains(f), "{f} is neutralised");
    }
    for l in &lines {
        let value = l.splitn(3, ',').nth(2).unwrap_or_default();
        assert!(
            !value.starts_with(['=', '+', '@', '-']),
            "a formula reaches the spreadsheet: {l}"
        );
    }
    let raw_csv = ok(&[
        "--api-config",
        &api,
        "hunt",
        "results",
        &hunt,
        "--format",
        "csv",
        "--raw",
    ]);
    assert!(raw_csv.contains(r#","=HYPERLINK(""http://evil.example"",""click"")""#));
    assert!(raw_csv.contains(",+cmd|' /C calc'!A0"));

    // JSONL, streamed: memory stays flat whatever the hunt's size (held whole, 300,000 rows took
    // several hundred MB).
    let (out, peak_kb) = run_sampling_memory(&["--api-config", &api, "hunt", "results", &hunt]);
    assert!(out.status.success());
    let n = out.stdout.iter().filter(|b| **b == b'\n').count();
    eprintln!(
        "hunt results: {n} rows, {} MB out, peak RSS {} MB",
        out.stdout.len() >> 20,
        peak_kb >> 10
    );
    assert_eq!(n, 300_003);
    assert!(
        peak_kb < 64 << 10,
        "exporting 300,000 rows peaked at {peak_kb} kB: rows are held, not streamed"
    );
}

/// Runs `cmd` to its end, or kills it after `limit` (a process that should have refused to start
/// but serves instead): its exit status (`None`: killed) and stderr.
fn output_within(
    mut cmd: std::process::Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (status, err)
}

/// Item 6 of the hostile review: two masters on one datastore lost one's acknowledged writes. Now
/// a local directory is locked by its process, and the master holds a lease on the datastore: a
/// second master (other ports, other local directory) refuses to start naming the holder; after
/// the holder dies, a new master takes the stale lease over and finds everything acknowledged.
#[test]
fn a_second_master_on_one_datastore_is_refused() {
    let d = Deployment::new();
    let (minion, _) = d.add_minion();
    let yaml = std::fs::read_to_string(d.path("server.config.yaml")).unwrap();
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let mut master = d.start_master();
    let pid = master.0.id();
    let client = json(&d.api(&["clients", "search", "all", "--json"]));
    assert_eq!(client, serde_json::json!([]));
    // Something acknowledged to keep: a hunt.
    let hunt = d
        .api(&["hunt", "create", "Generic.Client.Info"])
        .trim()
        .to_owned();

    // The same local directory: refused at once, naming the holder.
    let mut cmd = talon();
    cmd.args(["-c", &d.s("server.config.yaml"), "frontend", "--local-dir"])
        .arg(d.path("local"));
    let (status, err) = output_within(cmd, Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(err.contains("is in use by another talon process"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    // A minion's directory too.
    let _m = d.start_minion(&minion);
    d.wait_until("the minion holds its directory", || {
        std::fs::read_to_string(d.path(&format!("local-{minion}/LOCK")))
            .is_ok_and(|l| l.contains("pid"))
    });
    let mut cmd = talon();
    cmd.args([
        "-c",
        &d.s("server.config.yaml"),
        "frontend",
        "--minion",
        "--node",
        &minion,
    ])
    .arg("--local-dir")
    .arg(d.path(&format!("local-{minion}")));
    let (status, err) = output_within(cmd, Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(err.contains("is in use by another talon process"), "{err}");

    // Another master (its own ports and local directory) on the same datastore: refused, naming
    // the running one, while that one keeps serving.
    let [fe, api] = free_ports();
    let other = yaml
        .replace(
            &format!(": {}\n", cfg.frontend.bind_port),
            &format!(": {fe}\n"),
        )
        .replace(&format!(":{}", cfg.frontend.bind_port), &format!(":{fe}"))
        .replace(&format!(": {}\n", cfg.api.bind_port), &format!(": {api}\n"))
        .replace(&format!(":{}", cfg.api.bind_port), &format!(":{api}"));
    std::fs::write(d.path("other.config.yaml"), &other).unwrap();
    let started = Instant::now();
    let mut cmd = talon();
    cmd.args(["-c", &d.s("other.config.yaml"), "frontend", "--local-dir"])
        .arg(d.path("local-other"));
    let (status, err) = output_within(cmd, Duration::from_secs(60));
    eprintln!("second master refused after {:?}", started.elapsed());
    assert!(status.is_some_and(|s| !s.success()), "{status:?} {err}");
    assert!(err.contains("in use by another master"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(
        master.0.try_wait().unwrap().is_none(),
        "the first master runs on"
    );
    assert_eq!(
        json(&d.api(&["hunt", "show", &hunt, "--json"]))["hunt_id"],
        hunt.as_str()
    );

    // The holder dies without releasing its lease: the next master (another name) waits two beats,
    // sees the lease is not renewed, takes it over and has the hunt.
    master.0.kill().unwrap();
    master.0.wait().unwrap();
    let log = std::fs::File::create(d.path("other.log")).unwrap();
    let _other = Proc(
        talon()
            .args(["-c", &d.s("other.config.yaml"), "frontend", "--local-dir"])
            .arg(d.path("local-other"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    std::fs::write(
        d.path("other.api.yaml"),
        std::fs::read_to_string(d.path("api.yaml"))
            .unwrap()
            .replace(&format!(":{}", cfg.api.bind_port), &format!(":{api}")),
    )
    .unwrap();
    let other_api = d.s("other.api.yaml");
    d.wait_until("the second master serves", || {
        run(&["--api-config", &other_api, "hunt", "show", &hunt])
            .status
            .success()
    });
    let log = std::fs::read_to_string(d.path("other.log")).unwrap();
    assert!(log.contains("taking over a stale datastore lease"), "{log}");
}

/// Item 11 of the hostile review: fake enrolments were cheap (1,500 identities in 54 s, each
/// joining every running hunt). Enrolment admission is now a named limit per node
/// (`enrolments_per_second`, after a burst of 60 seconds' worth; `max_clients` in total): past it a
/// new identity is refused with UNAVAILABLE naming the key, on the master and on a minion alike,
/// while enrolled clients are untouched.
#[test]
fn enrolments_past_the_admission_rate_are_refused() {
    let d = Deployment::new();
    let (minion, minion_port) = d.add_minion();
    let yaml = std::fs::read_to_string(d.path("server.config.yaml")).unwrap();
    std::fs::write(
        d.path("server.config.yaml"),
        set_key(&yaml, "enrolments_per_second", "1"),
    )
    .unwrap();
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    let (ca, nonce) = (client.client.ca_certificate, client.client.nonce);
    let _master = d.start_master();
    let _minion = d.start_minion(&minion);
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    d.wait_until("the agent enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut admitted = 0;
    for port in [cfg.frontend.bind_port, minion_port] {
        let (mut ok, mut refused) = (0, 0);
        rt.block_on(async {
            // Wait for the minion to listen.
            let started = Instant::now();
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                assert!(started.elapsed() < Duration::from_secs(60), "port {port}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for _ in 0..100 {
                let (pem, id) = identity();
                match raw(port, &ca, &pem, hello(&id, &nonce)).await {
                    Ok(mut s) => {
                        s.until(|k| matches!(k, Down::Welcome(_)).then_some(()))
                            .await;
                        ok += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        assert!(e.message().contains("enrolments_per_second"), "{e:?}");
                        refused += 1;
                    }
                }
            }
        });
        eprintln!("port {port}: {ok} enrolled, {refused} refused");
        // A burst of 60 (the master's first went to the agent), then one a second.
        assert!(
            (55..100).contains(&ok),
            "{ok} of 100 admitted at 1/s after a burst of 60"
        );
        admitted += ok;
    }
    // The refused are not enrolled; the agent still works.
    d.wait_until("the admitted are enrolled", || {
        d.clients().len() == admitted + 1
    });
    let victim = d
        .clients()
        .iter()
        .find(|c| c["hostname"] != "raw-client")
        .unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    collects(&d, &victim, 2);
}

/// Item 10 of the hostile review: a foreign-CA API certificate printed "transport error", and the
/// server logged refused handshakes at debug level only. Now each side says which side refused
/// and why; the server logs it at warn level (rate-limited).
#[test]
fn tls_refusals_say_which_side_refused_and_why() {
    let d = Deployment::new();
    let other = Deployment::new();
    let _master = d.start_master();
    // Another deployment's API config pointed at this master: this side refuses the server.
    let foreign = std::fs::read_to_string(other.path("api.yaml")).unwrap();
    let ours: ApiClientConfig = read_yaml(&d.path("api.yaml")).unwrap();
    let theirs: ApiClientConfig = read_yaml(&other.path("api.yaml")).unwrap();
    let foreign = foreign.replace(&theirs.api_connection_string, &ours.api_connection_string);
    std::fs::write(d.path("foreign.api.yaml"), foreign).unwrap();
    let out = run(&[
        "--api-config",
        &d.s("foreign.api.yaml"),
        "clients",
        "search",
        "all",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("this side refused the server's certificate"),
        "{err}"
    );
    assert!(!err.trim_end().ends_with("transport error"), "{err}");
    // Our CA, another deployment's API certificate: the server refuses it, and says so.
    let mut cfg = ours.clone();
    cfg.client_cert = theirs.client_cert.clone();
    cfg.client_private_key = theirs.client_private_key.clone();
    talon_io::deploy::config::write_yaml(&d.path("mixed.api.yaml"), &cfg).unwrap();
    let out = run(&[
        "--api-config",
        &d.s("mixed.api.yaml"),
        "clients",
        "search",
        "all",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(!out.status.success());
    assert!(err.contains("the server's log says why"), "{err}");
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    for why in [
        "the client refused this server's certificate",
        "the client's certificate is refused",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("refused a TLS connection") && l.contains(why))
            .unwrap_or_else(|| panic!("no warning that {why} in the master's log:\n{log}"));
        eprintln!("{line}");
        assert!(line.contains("WARN"), "{line}");
    }
}

/// A TCP connection to `port` from the loopback address `from` (tests use 127.0.0.2 and up as
/// other hosts).
async fn tcp_from(from: [u8; 4], port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(std::net::SocketAddr::from((from, 0)))?;
    s.connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
}

/// True if the server closes `s` within `within` (end of input or a reset).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Opens `n` silent sockets to `port` from `from`; returns them and how many the server closed at
/// once (within 150 ms each).
async fn crowd(from: [u8; 4], port: u16, n: usize) -> (Vec<tokio::net::TcpStream>, usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(tcp_from(from, port).await.unwrap());
    }
    let mut closed = 0;
    for s in &mut held {
        if closed_within(s, Duration::from_millis(150)).await {
            closed += 1;
        }
    }
    (held, closed)
}

/// Items 4 and 5 of the hostile review: connections that never open a stream were kept forever,
/// and silent sockets on the API port (which minions replicate through) made API calls fail. Now a
/// connection that opens no stream within the hello timeout is closed, each port caps connections
/// per source address before any TLS work, and the client port stays below the file limit.
#[test]
fn idle_and_crowding_connections_are_closed_and_the_api_stays_up() {
    let d = Deployment::new();
    configure(
        &d,
        &[
            ("hello_timeout_s", "2"),
            ("handshake_timeout_s", "30"),
            ("max_pending_handshakes", "16"),
            ("max_connections_per_address", "50"),
            ("max_api_connections_per_address", "8"),
        ],
    );
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    let _master = d.start_master();
    let (fe, api) = (cfg.frontend.bind_port, cfg.api.bind_port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // 1. TLS and the HTTP/2 preface, then nothing: closed after hello_timeout_s (2 s).
        let (pem, _) = identity();
        let tls_cfg = tls::client_config(
            &client.client.ca_certificate,
            &pem.certificate,
            &pem.private_key,
        )
        .unwrap();
        let tcp = tcp_from([127, 0, 0, 1], fe).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls_cfg)
            .connect(name, tcp)
            .await
            .expect("the handshake completes");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue, // the server's SETTINGS
            }
        };
        assert!(closed, "a connection with no stream is kept open");
        eprintln!("idle connection closed after {:?}", started.elapsed());

        // 2. 60 silent sockets from one other host on the client port: 50 wait for TLS, 10 are
        //    closed at once.
        let (held, closed) = crowd([127, 0, 0, 2], fe, 60).await;
        eprintln!("client port: {closed} of 60 from one address closed at once");
        assert_eq!(closed, 10);

        // 3. 40 silent sockets from another host on the API port: only 8 may wait for TLS, so
        //    the handshake slots (16) stay free for the analyst, whose call is answered.
        let (api_held, closed) = crowd([127, 0, 0, 3], api, 40).await;
        eprintln!("API port: {closed} of 40 from one address closed at once");
        assert_eq!(closed, 32);
        drop(held);
        // Keep the API crowd while the analyst calls.
        let started = Instant::now();
        let out = tokio::task::spawn_blocking({
            let api_yaml = d.s("api.yaml");
            move || run(&["--api-config", &api_yaml, "clients", "search", "all"])
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "API call answered in {:?} with 8 silent sockets held",
            started.elapsed()
        );
        drop(api_held);
    });
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    for why in [
        "no stream opened within the hello timeout",
        "connections open from this address (max_connections_per_address)",
    ] {
        assert!(log.contains(why), "the log says {why:?}");
    }
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallVolume(std::path::PathBuf);

impl SmallVolume {
    /// Mounts `bytes` of tmpfs at a fresh directory; `None` when not root (mounting needs it).
    fn mount(bytes: u64) -> Option<SmallVolume> {
        if rustix::process::geteuid().as_raw() != 0 {
            return None;
        }
        let dir =
            std::env::temp_dir().join(format!("talon-full-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", dir.display());
        Some(SmallVolume(dir))
    }

    /// Fills what is left of it; returns the filler's path.
    fn fill(&self) -> std::path::PathBuf {
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        p
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Item 8 of the hostile review: with the shared volume full, a hunt stalled with no log line at
/// all. Now the failing volume is logged (rate-limited) and shown in `cluster status`; nothing
/// acknowledged is lost, and once there is room the flow completes with exact totals.
#[test]
fn a_full_shared_volume_is_reported_and_nothing_is_lost() {
    let Some(vol) = SmallVolume::mount(4 << 20) else {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    };
    let d = Deployment::with_datastore(Some(&vol.0));
    let mut master = d.start_master();
    let _agent = d.start_client(&d.path("client.config.yaml"), "agent");
    d.wait_until("the agent enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let id = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    let filler = vol.fill();
    let f = json(&d.api(&[
        "collect",
        &id,
        "Generic.Test.Rows",
        "--param",
        "count=3000",
        "--json",
    ]));
    let flow = f["flow_id"].as_str().unwrap().to_owned();
    let mut status = String::new();
    d.wait_until("cluster status shows the failing volume", || {
        status = d.api(&["cluster", "status"]);
        status.contains("shared volume failing")
    });
    eprintln!("{status}");
    assert!(
        status.contains("no storage space") || status.contains("No space"),
        "{status}"
    );
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    assert!(
        log.contains("cannot write to the shared volume"),
        "no log line"
    );
    // A stop while the volume is full is bounded: what is not flushed stays in the journals.
    let pid = master.0.id();
    let stop = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exited = loop {
        if let Some(s) = master.0.try_wait().unwrap() {
            break Some(s);
        }
        if stop.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "SIGTERM with the volume full: exited {exited:?} after {:?}",
        stop.elapsed()
    );
    assert!(
        exited.is_some(),
        "the master does not stop while the volume is full"
    );
    // Room again, and the master started again: the flow completes, every row once, and the
    // status clears.
    std::fs::remove_file(&filler).unwrap();
    let _master = d.start_master();
    d.wait_until("the flow completes", || {
        json(&d.api(&["flow", "show", &id, &flow, "--json"]))["state"] == "completed"
    });
    let shown = json(&d.api(&["flow", "show", &id, &flow, "--json"]));
    assert_eq!(shown["rows"], 3000, "{shown}");
    let rows = d.api(&["flow", "results", &id, &flow]);
    assert_eq!(rows.lines().count(), 3000);
    d.wait_until("the status clears", || {
        !d.api(&["cluster", "status"])
            .contains("shared volume failing")
    });
}

/// Item 4, the file limit: under a low open-file limit, client connections used to take every
/// descriptor, and then nobody was accepted and the API failed. The client port now stays
/// `FD_HEADROOM` (1,024) below the limit: past that it closes new connections before any TLS work,
/// and the API still answers.
#[test]
fn client_connections_leave_descriptors_for_the_api() {
    talon_io::env::raise_fd_limit(20_000).unwrap();
    let d = Deployment::new();
    configure(
        &d,
        &[
            ("expected_clients", "10"),
            ("handshake_timeout_s", "60"),
            ("connections_per_second", "100000"),
        ],
    );
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    // The master under a limit of 4,200 descriptors (it raises a lower limit to what
    // expected_clients needs, 4,116, and keeps a higher one): 3,176 for client connections.
    let log = std::fs::File::create(d.path("master.log")).unwrap();
    let _master = Proc(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 4200 && exec {} -c {} frontend --local-dir {}",
                env!("CARGO_BIN_EXE_talon"),
                d.s("server.config.yaml"),
                d.s("local")
            ))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    d.wait_until("the API answers", || {
        run(&["--api-config", &d.s("api.yaml"), "clients", "search", "all"])
            .status
            .success()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // 3,400 silent sockets from eight hosts (425 each: under the per-address cap).
        let mut held = Vec::new();
        for i in 0..3_400u32 {
            let from = [127, 0, 0, 10 + (i % 8) as u8];
            held.push(tcp_from(from, cfg.frontend.bind_port).await.unwrap());
        }
        let mut closed = 0;
        for s in held.iter_mut().rev().take(400) {
            if closed_within(s, Duration::from_millis(50)).await {
                closed += 1;
            }
        }
        eprintln!("{closed} of the last 400 of 3,400 connections closed at once");
        assert!(
            closed >= 200,
            "only {closed} refused: the client port takes every descriptor"
        );
        // The API still has descriptors, and answers.
        let out = tokio::task::spawn_blocking({
            let api = d.s("api.yaml");
            move || run(&["--api-config", &api, "clients", "search", "all"])
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(held);
    });
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    assert!(
        log.contains("connections open on this listener"),
        "no log line"
    );
}

/// A client at its bound of queued tasks (`max_queued_tasks_per_client`) when a hunt starts used to
/// become a participant with records but no task, counted `scheduled` and never tasked (until the
/// master restarted). Now it is no participant yet; the hunt offers itself again 5 s later and the
/// client gets its task once its queue has room.
#[test]
fn a_client_at_its_task_bound_joins_a_hunt_once_it_has_room() {
    let d = Deployment::new();
    configure(&d, &[("max_queued_tasks_per_client", "2")]);
    let cfg = ServerConfig::load(&d.path("server.config.yaml")).unwrap();
    let client: ClientConfig = read_yaml(&d.path("client.config.yaml")).unwrap();
    let (ca, nonce) = (client.client.ca_certificate, client.client.nonce);
    let _master = d.start_master();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (key, id) = identity();
    let mut stream = rt.block_on(welcomed(cfg.frontend.bind_port, &ca, &key, &id, &nonce));
    d.wait_until("the client is enrolled", || {
        d.clients().iter().any(|c| c["client_id"] == id.as_str())
    });
    // Two collections fill its queue: their tasks arrive and are not acknowledged.
    let flows: Vec<String> = (0..2)
        .map(|_| {
            let v = json(&d.api(&["collect", &id, "Generic.Test.Rows", "--json"]));
            v["flow_id"].as_str().unwrap().to_owned()
        })
        .collect();
    rt.block_on(async {
        for f in &flows {
            stream
                .until(|k| matches!(k, Down::Task(t) if &t.flow_id == f).then_some(()))
                .await;
        }
    });
    let hunt = json(&d.api(&["hunt", "create", "Generic.Test.Rows", "--json"]));
    let hunt_id = hunt["hunt_id"].as_str().unwrap().to_owned();
    let stats =
        |d: &Deployment| json(&d.api(&["hunt", "show", &hunt_id, "--json"]))["stats"].clone();
    // No participant without a task: it is not counted while it cannot be tasked.
    assert_eq!(stats(&d)["scheduled"], 0, "{}", stats(&d));
    let log = std::fs::read_to_string(d.path("master.log")).unwrap();
    assert!(
        log.contains("tasks already wait for"),
        "the hunt met the bound (else this test proves nothing)"
    );
    // Room again: the client acknowledges its two tasks; the hunt's task follows.
    rt.block_on(async {
        for f in &flows {
            stream
                .send(enc(Kind::TaskAck(comms::TaskAck { flow_id: f.clone() })))
                .await;
        }
        let started = Instant::now();
        let task = loop {
            let m = tokio::time::timeout(Duration::from_secs(60), stream.rx.message())
                .await
                .expect("the hunt's task arrives within 60 s")
                .expect("the stream stays open")
                .expect("the stream stays open");
            if let Some(Down::Task(t)) = m.kind
                && t.hunt_id == hunt_id
            {
                break t;
            }
        };
        eprintln!(
            "the hunt's task arrived {:?} after the queue had room",
            started.elapsed()
        );
        stream
            .send(enc(Kind::TaskAck(comms::TaskAck {
                flow_id: task.flow_id.clone(),
            })))
            .await;
        stream.send(flow_msg(&task.flow_id, 0, rows(2))).await;
        stream
            .send(flow_msg(
                &task.flow_id,
                1,
                Payload::Status(comms::FlowStatus {
                    state: comms::FlowState::Completed as i32,
                    ..Default::default()
                }),
            ))
            .await;
        stream.ack_for(&task.flow_id, 1).await;
    });
    d.wait_until("the hunt counts the client's completion", || {
        let s = stats(&d);
        s["completed"] == 1 && s["rows"] == 2
    });
    assert_eq!(stats(&d)["scheduled"], 1, "{}", stats(&d));
}

/// Issue #18 item 5: a collection from a client whose OS the artifact cannot run on (every
/// artifact and table is Linux's today) is refused before anything is scheduled, naming both.
#[test]
fn a_collection_from_a_client_of_another_os_is_refused() {
    let d = Deployment::new();
    let (port, ca, nonce) = endpoint(&d);
    let _master = d.start_master();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (win, win_id) = identity();
    let hello = enc(Kind::Hello(comms::Hello {
        client_id: win_id.clone(),
        deployment_nonce: nonce,
        info: Some(comms::ClientInfo {
            hostname: "desk".into(),
            os: "windows".into(),
            ..Default::default()
        }),
        running_flows: vec![],
    }));
    let _w = rt.block_on(welcomed_as(port, &ca, &win, hello));
    d.wait_until("it is enrolled", || d.clients().len() == 1);
    for args in [
        vec!["collect", &win_id, "Linux.Sys.Users"],
        vec!["collect", &win_id, "Generic.Client.Info"],
        vec!["query", &win_id, "SELECT username FROM users"],
    ] {
        let mut a = vec!["--api-config", d.s("api.yaml").leak() as &str];
        a.extend(args.iter().copied());
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains(&format!("client {win_id} runs windows;"))
                && err.contains("runs on linux only"),
            "{args:?}: {err}"
        );
    }
    let flows = d.api(&["flow", "list", &win_id, "--json"]);
    assert_eq!(json(&flows), serde_json::json!([]), "nothing was scheduled");
}
