// The property the `replication` fuzz target checks, shared with the corpus regression test
// (`core/tests/fuzz_corpus.rs`): the master's replication handler — decode a minion's message, check
// it (`cluster_codec::validate_minion_message`), feed its events to the `Inbox` — never panics, and
// whatever arrives, each minion's events are applied exactly once, in order, within one epoch at a
// time, and acknowledgements never run ahead of what was applied and its cursor written.
//
// Input: frames of [minion: 1 byte][length: 2 bytes LE][MinionMessage protobuf], up to 4 minions.

use prost::Message;
use std::collections::BTreeMap;
use talon_core::ClientId;
use talon_core::Monotonic;
use talon_core::cluster_codec::{ClusterLimits, MinionInput, validate_minion_message};
use talon_core::replication::{Cursor, Inbox, InboxAction, InboxLimits, Outcome};
use talon_proto::cluster::{MinionMessage, replicated_event::Event};

/// Panics if the property fails for `data`.
pub fn check(data: &[u8]) {
    let limits = ClusterLimits::default();
    let mut inbox: Inbox<Result<Event, String>> = Inbox::recover(
        InboxLimits {
            minions_max: 3,
            ..InboxLimits::default()
        },
        [],
    );
    // The model: each minion's epoch and last applied seq.
    let mut model: BTreeMap<String, Cursor> = BTreeMap::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let node = format!("minion-{}", rest[0] % 4);
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let body = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[(3 + len).min(rest.len())..];
        let Ok(msg) = MinionMessage::decode(body) else {
            continue;
        };
        let Ok(input) = validate_minion_message(msg, &limits) else {
            continue;
        };
        let MinionInput::Events(talon_core::cluster_codec::MinionBatch { epoch, events, .. }) =
            input
        else {
            continue;
        };
        let mut last = 0;
        for (seq, e) in &events {
            assert!(*seq > last, "validated seqs ascend");
            last = *seq;
            if let Ok(Event::ClientSeen(cs)) = e {
                let id = ClientId::parse(&cs.client_id).expect("a checked sighting's id parses");
                assert_eq!(ClientId::from_public_key(&cs.public_key), id);
            }
        }
        let before = model.get(&node).copied();
        match inbox.handle_batch(Monotonic(0), &node, epoch, events) {
            Err(_) => {
                // Refused: a stale epoch, or a fourth minion. Nothing applied.
                assert!(inbox.poll_action().is_none());
                continue;
            }
            Ok(()) => {
                let known = before.is_some() || model.len() < 3;
                assert!(known, "a fourth minion must be refused");
                assert!(
                    before.is_none_or(|c| epoch >= c.epoch),
                    "stale epoch accepted"
                );
            }
        }
        let cur = model.entry(node.clone()).or_default();
        if epoch > cur.epoch {
            *cur = Cursor { epoch, hwm: 0 };
        }
        while let Some(a) = inbox.poll_action() {
            match a {
                InboxAction::Apply {
                    node: n, cursor, ..
                } => {
                    assert_eq!(n, node);
                    assert_eq!(cursor.epoch, cur.epoch);
                    assert_eq!(cursor.hwm, cur.hwm + 1, "applied out of order or twice");
                    cur.hwm = cursor.hwm;
                    inbox.handle_applied(&n, cursor, Outcome::Done);
                }
                InboxAction::Persist { node: n, cursor } => {
                    assert_eq!(n, node);
                    assert_eq!(cursor, *cur, "the cursor written covers what is applied");
                    inbox.handle_persisted(&n, cursor, Outcome::Done);
                }
                InboxAction::Ack {
                    node: n,
                    epoch: e,
                    upto,
                } => {
                    assert_eq!(n, node);
                    assert_eq!(e, cur.epoch);
                    assert_eq!(upto, cur.hwm, "ack must equal what is applied");
                }
            }
        }
        assert_eq!(inbox.cursor(&node), Some(*cur));
    }
}
