//! Codec tests: round trips of valid messages, and one case per way a message can be wrong.

use super::*;
use proptest::prelude::*;
use talon_proto::comms::{client_message::Kind, flow_message::Payload as P};

fn enc(kind: Kind) -> Vec<u8> {
    comms::ClientMessage { kind: Some(kind) }.encode_to_vec()
}

fn hello() -> comms::Hello {
    comms::Hello {
        client_id: ClientId::from_public_key(b"k").to_string(),
        deployment_nonce: "nonce".into(),
        info: Some(comms::ClientInfo {
            hostname: "web01".into(),
            os: "Linux".into(),
            ips: vec!["10.0.0.1".into()],
            ..Default::default()
        }),
        running_flows: vec!["F.1".into()],
    }
}

fn rows(rs: &[&str]) -> Vec<u8> {
    enc(Kind::Flow(comms::FlowMessage {
        flow_id: "F.1".into(),
        seq: 3,
        payload: Some(P::Rows(comms::ResultRows {
            source: "Generic.Test.Rows".into(),
            rows: rs
                .iter()
                .map(|r| Bytes::copy_from_slice(r.as_bytes()))
                .collect(),
        })),
    }))
}

fn chunk(c: comms::FileChunk) -> Vec<u8> {
    enc(Kind::Flow(comms::FlowMessage {
        flow_id: "F.1".into(),
        seq: 0,
        payload: Some(P::FileChunk(c)),
    }))
}

fn lim() -> CodecLimits {
    CodecLimits {
        rows_per_batch_max: 2,
        row_bytes_max: 64,
        chunk_bytes_max: 8,
        upload_bytes_max: 20,
        ..CodecLimits::default()
    }
}

#[test]
fn valid_messages_decode_to_typed_inputs() {
    let ClientInput::Hello(h) = decode(&enc(Kind::Hello(hello())), &lim()).unwrap() else {
        panic!()
    };
    assert_eq!(h.info.os, "linux");
    assert_eq!(h.running_flows, vec![FlowId::parse("F.1").unwrap()]);
    let ClientInput::Flow { seq, data, .. } =
        decode(&rows(&[r#"{"a":1}"#, " {}"]), &lim()).unwrap()
    else {
        panic!()
    };
    assert_eq!(seq, 3);
    assert_eq!(
        data.tracker_payload(),
        Payload::Data(Weight {
            rows: 2,
            data_bytes: 10, // The rows' JSON, as a flow's byte budget counts it.
            ..Weight::default()
        })
    );
    let c = comms::FileChunk {
        name: "/etc/hosts".into(),
        offset: 4,
        data: Bytes::from_static(b"abcd"),
        eof: true,
        total_size: 8,
        sha256: Bytes::from(vec![0u8; 32]),
        ..Default::default()
    };
    let ClientInput::Flow { data, .. } = decode(&chunk(c), &lim()).unwrap() else {
        panic!()
    };
    assert_eq!(
        data.tracker_payload(),
        Payload::Data(Weight {
            rows: 0,
            bytes: 4,
            uploads: 1, // Its last chunk: one upload finished.
            data_bytes: 4,
        })
    );
}

#[test]
fn each_defect_has_its_own_error() {
    let l = lim();
    let big = vec![0u8; l.message_bytes_max + 1];
    assert!(matches!(
        decode(&big, &l),
        Err(DecodeError::TooLarge { .. })
    ));
    assert!(matches!(
        decode(&[0xff, 0xff, 0xff], &l),
        Err(DecodeError::Malformed(_))
    ));
    assert_eq!(
        decode(&[], &l),
        Err(DecodeError::Missing("ClientMessage.kind"))
    );
    let mut h = hello();
    h.client_id = "C.nothex".into();
    assert!(matches!(
        decode(&enc(Kind::Hello(h)), &l),
        Err(DecodeError::BadId {
            field: "Hello.client_id",
            ..
        })
    ));
    let mut h = hello();
    h.info.as_mut().unwrap().os = "plan9".into();
    assert!(matches!(
        decode(&enc(Kind::Hello(h)), &l),
        Err(DecodeError::BadValue {
            field: "Hello.info.os",
            ..
        })
    ));
    let mut h = hello();
    h.info.as_mut().unwrap().hostname = "h".repeat(300);
    assert!(matches!(
        decode(&enc(Kind::Hello(h)), &l),
        Err(DecodeError::TooLong {
            field: "Hello.info.hostname",
            ..
        })
    ));
    assert!(matches!(
        decode(&rows(&["{}", "{}", "{}"]), &l),
        Err(DecodeError::TooMany {
            field: "ResultRows.rows",
            ..
        })
    ));
    assert!(matches!(
        decode(&rows(&["[1]"]), &l),
        Err(DecodeError::RowNotJsonObject { index: 0, .. })
    ));
    assert!(matches!(
        decode(&rows(&["{}", "{\"a\":"]), &l),
        Err(DecodeError::RowNotJsonObject { index: 1, .. })
    ));
    assert!(matches!(
        decode(&rows(&["{} x"]), &l),
        Err(DecodeError::RowNotJsonObject { .. })
    ));
    let nul = comms::FileChunk {
        name: "a\0b".into(),
        ..Default::default()
    };
    assert!(matches!(
        decode(&chunk(nul), &l),
        Err(DecodeError::BadValue {
            field: "FileChunk.name",
            ..
        })
    ));
    let over = comms::FileChunk {
        name: "a".into(),
        offset: 18,
        data: Bytes::from_static(b"abc"),
        ..Default::default()
    };
    assert!(matches!(
        decode(&chunk(over), &l),
        Err(DecodeError::BadValue {
            field: "FileChunk.offset",
            ..
        })
    ));
    let wrap = comms::FileChunk {
        name: "a".into(),
        offset: u64::MAX,
        data: Bytes::from_static(b"a"),
        ..Default::default()
    };
    assert!(decode(&chunk(wrap), &l).is_err());
    let digest = comms::FileChunk {
        name: "a".into(),
        eof: true,
        total_size: 0,
        sha256: Bytes::from_static(b"short"),
        ..Default::default()
    };
    assert!(matches!(
        decode(&chunk(digest), &l),
        Err(DecodeError::BadValue {
            field: "FileChunk.sha256",
            ..
        })
    ));
    let status = enc(Kind::Flow(comms::FlowMessage {
        flow_id: "F.1".into(),
        seq: 0,
        payload: Some(P::Status(comms::FlowStatus {
            state: 1,
            ..Default::default()
        })),
    }));
    assert!(matches!(
        decode(&status, &l),
        Err(DecodeError::BadValue {
            field: "FlowStatus.state",
            ..
        })
    ));
    let no_flow = enc(Kind::TaskAck(comms::TaskAck {
        flow_id: String::new(),
    }));
    assert_eq!(
        decode(&no_flow, &l),
        Err(DecodeError::Missing("TaskAck.flow_id"))
    );
}

#[test]
fn identity_must_match_the_key() {
    let a = ClientId::from_public_key(b"a");
    let b = ClientId::from_public_key(b"b");
    assert!(check_identity(&a, &a).is_ok());
    assert!(matches!(
        check_identity(&a, &b),
        Err(DecodeError::IdentityMismatch { .. })
    ));
}

#[test]
fn deeply_nested_rows_are_refused_not_overflowed() {
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let l = CodecLimits {
        row_bytes_max: 1 << 20,
        ..lim()
    };
    assert!(matches!(
        decode(&rows(&[&deep]), &l),
        Err(DecodeError::RowNotJsonObject { .. })
    ));
    // Brackets inside strings (escaped quotes included) are not nesting.
    let in_string = format!(r#"{{"a":"\"{}"}}"#, "[".repeat(500));
    assert!(decode(&rows(&[&in_string]), &l).is_ok(), "{in_string}");
}

proptest! {
    /// Arbitrary bytes never panic the decoder, and accepted row batches respect the row bound.
    #[test]
    fn arbitrary_bytes_are_refused_or_accepted_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let l = lim();
        if let Ok(ClientInput::Flow { data: FlowData::Rows { rows, .. }, .. }) = decode(&bytes, &l) {
            prop_assert!(rows.len() <= l.rows_per_batch_max);
        }
    }

    /// Mutating one byte of a valid message never panics.
    #[test]
    fn mutated_valid_messages_never_panic(pos in any::<usize>(), val in any::<u8>()) {
        let mut m = enc(Kind::Hello(hello()));
        let i = pos % m.len();
        m[i] = val;
        let _ = decode(&m, &lim());
    }
}
