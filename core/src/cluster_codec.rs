//! Checking what a minion sends the master, before anything acts on it: the replication stream's
//! messages ([`validate_minion_message`]) and remote-datastore values arriving in chunks
//! ([`ValueAssembly`]). Minions hold the frontend certificate and are trusted to speak for their
//! clients, but a bug, a version skew or a compromised minion must produce a clear refusal, never a
//! panic, an unbounded allocation or a corrupt record.

use crate::ids::{ClientId, FlowId};
use crate::paths;
use std::fmt;
use talon_proto::cluster::{self as pc, minion_message, replicated_event::Event};
use talon_proto::comms::FlowState;

/// Bounds on a minion's messages.
#[derive(Clone, Debug)]
pub struct ClusterLimits {
    /// Events per batch (a minion sends at most its outbox's `batch_max`, 256 by default).
    pub events_per_batch_max: usize,
    /// Longest node name.
    pub node_bytes_max: usize,
    /// Longest client public key (DER SubjectPublicKeyInfo).
    pub public_key_bytes_max: usize,
    /// Longest short text field (hostname, os, address, ...).
    pub field_bytes_max: usize,
    /// Longest error text.
    pub text_bytes_max: usize,
    /// Addresses per client and running flows per sighting.
    pub list_max: usize,
}

impl Default for ClusterLimits {
    fn default() -> Self {
        ClusterLimits {
            events_per_batch_max: 4096,
            node_bytes_max: 255,
            public_key_bytes_max: 1024,
            field_bytes_max: 255,
            text_bytes_max: 16 << 10,
            list_max: 1024,
        }
    }
}

/// A minion message that passed the checks.
#[derive(Clone, Debug, PartialEq)]
pub enum MinionInput {
    /// The first message of a stream.
    Hello {
        /// `<hostname>-<bind_port>`.
        node: String,
        /// The minion's outbox epoch.
        epoch: u64,
        /// Its outbox when it said hello (absent from older minions).
        outbox: Option<OutboxReport>,
    },
    /// Events to feed the inbox, in ascending `seq` order. An event whose content is malformed is
    /// `Err(reason)`: the master skips it (logged) so that replication is not stuck behind it.
    Events(MinionBatch),
    /// Broadcasts applied by the minion.
    BroadcastAck {
        /// Everything up to here.
        upto: u64,
    },
}

/// A batch of a minion's replicated events, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct MinionBatch {
    /// Outbox epoch.
    pub epoch: u64,
    /// `(seq, event)` pairs.
    pub events: Vec<(u64, Result<Event, String>)>,
    /// When the minion sent the batch, on its own clock (the latest event time; 0 if none): the
    /// master measures the minion's clock against its own with it.
    pub sent_unix_ms: u64,
    /// Its outbox when it sent the batch (absent from older minions).
    pub outbox: Option<OutboxReport>,
}

/// A minion's outbox as it reported it with a message (cluster.proto `OutboxState`): the master
/// shows the minion's backlog from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxReport {
    /// The outbox's epoch.
    pub epoch: u64,
    /// Its newest event of the epoch (0: none yet); in a batch, never below the batch's last.
    pub head: u64,
    /// When its oldest event not yet acknowledged was made, on the minion's clock (0: none).
    pub oldest_unix_ms: u64,
    /// When the message was sent, on the minion's clock (0: not said).
    pub sent_unix_ms: u64,
}

impl OutboxReport {
    fn of(epoch: u64, s: Option<pc::OutboxState>, last: u64) -> Option<OutboxReport> {
        s.map(|s| OutboxReport {
            epoch,
            head: s.head_seq.max(last),
            oldest_unix_ms: s.oldest_unix_ms,
            sent_unix_ms: s.sent_unix_ms,
        })
    }
}

/// Why a minion's message was refused as a whole (the master closes the stream), or a chunked
/// value was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterError(pub String);

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClusterError {}

fn err<T>(s: impl Into<String>) -> Result<T, ClusterError> {
    Err(ClusterError(s.into()))
}

/// Checks one message of the replication stream. Structure problems (no kind, an event without a
/// body, sequence numbers not strictly ascending, too many events, a bad node name) refuse the
/// message; content problems inside one event mark that event `Err`.
pub fn validate_minion_message(
    m: pc::MinionMessage,
    l: &ClusterLimits,
) -> Result<MinionInput, ClusterError> {
    match m.kind {
        None => err("a replication message with no content"),
        Some(minion_message::Kind::Hello(h)) => {
            if h.node.is_empty() || h.node.len() > l.node_bytes_max {
                return err(format!(
                    "node name of {} bytes (1 to {} allowed)",
                    h.node.len(),
                    l.node_bytes_max
                ));
            }
            if h.node.chars().any(char::is_control) {
                return err("a node name with control characters");
            }
            Ok(MinionInput::Hello {
                node: h.node,
                epoch: h.epoch,
                outbox: OutboxReport::of(h.epoch, h.outbox, 0),
            })
        }
        Some(minion_message::Kind::BroadcastAck(a)) => {
            Ok(MinionInput::BroadcastAck { upto: a.upto_seq })
        }
        Some(minion_message::Kind::Events(b)) => {
            if b.events.len() > l.events_per_batch_max {
                return err(format!(
                    "a batch of {} events (at most {})",
                    b.events.len(),
                    l.events_per_batch_max
                ));
            }
            let mut events = Vec::with_capacity(b.events.len());
            let mut last = 0u64;
            let mut sent_unix_ms = 0u64;
            for e in b.events {
                sent_unix_ms = sent_unix_ms.max(e.time_unix_ms);
                if e.seq == 0 || e.seq <= last {
                    return err(format!(
                        "event seq {} after {last}: sequence numbers start at 1 and ascend",
                        e.seq
                    ));
                }
                last = e.seq;
                let Some(body) = e.event else {
                    return err(format!("event {} has no body", e.seq));
                };
                let checked = check_event(&body, l).map(|()| body);
                events.push((e.seq, checked));
            }
            let outbox = OutboxReport::of(b.epoch, b.outbox, last);
            Ok(MinionInput::Events(MinionBatch {
                epoch: b.epoch,
                events,
                sent_unix_ms: sent_unix_ms.max(outbox.map_or(0, |o| o.sent_unix_ms)),
                outbox,
            }))
        }
    }
}

fn short(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} of {} bytes (at most {max})", s.len()));
    }
    Ok(())
}

fn client(id: &str) -> Result<ClientId, String> {
    ClientId::parse(id).map_err(|e| e.to_string())
}

fn flow(id: &str) -> Result<FlowId, String> {
    FlowId::parse(id).map_err(|e| e.to_string())
}

/// The content checks of one event: ids well formed, a sighting's id derived from its key, text
/// within bounds, a known final state.
pub fn check_event(e: &Event, l: &ClusterLimits) -> Result<(), String> {
    match e {
        Event::ClientSeen(cs) => {
            let id = client(&cs.client_id)?;
            if cs.public_key.is_empty() || cs.public_key.len() > l.public_key_bytes_max {
                return Err(format!(
                    "public key of {} bytes (1 to {} allowed)",
                    cs.public_key.len(),
                    l.public_key_bytes_max
                ));
            }
            if ClientId::from_public_key(&cs.public_key) != id {
                return Err(format!("{id} is not the id of the key it was seen with"));
            }
            short("last_ip", &cs.last_ip, l.field_bytes_max)?;
            if cs.running_flows.len() > l.list_max {
                return Err(format!("{} running flows listed", cs.running_flows.len()));
            }
            if let Some(i) = &cs.info {
                for (what, v) in [
                    ("hostname", &i.hostname),
                    ("fqdn", &i.fqdn),
                    ("os", &i.os),
                    ("kernel", &i.kernel),
                    ("arch", &i.arch),
                    ("agent_version", &i.agent_version),
                ] {
                    short(what, v, l.field_bytes_max)?;
                }
                if i.ips.len() > l.list_max || i.macs.len() > l.list_max {
                    return Err("too many addresses".into());
                }
            }
            Ok(())
        }
        Event::ClientGone(g) => client(&g.client_id).map(|_| ()),
        Event::TaskDelivered(t) => {
            client(&t.client_id)?;
            flow(&t.flow_id).map(|_| ())
        }
        Event::FlowCompleted(f) => {
            client(&f.client_id)?;
            flow(&f.flow_id)?;
            if f.state != FlowState::Completed as i32 && f.state != FlowState::Error as i32 {
                return Err(format!("final state {} is not COMPLETED or ERROR", f.state));
            }
            short("hunt_id", &f.hunt_id, l.field_bytes_max)?;
            short("error", &f.error, l.text_bytes_max)
        }
        Event::NodeStarted(_) => Ok(()),
    }
}

/// A datastore value arriving in chunks: the first announces its key and total length, the rest
/// must add up to exactly that length. Memory grows with the bytes received, never with the length
/// announced (a peer announcing 64 MiB and sending nothing costs nothing).
#[derive(Debug)]
pub struct ValueAssembly {
    key: String,
    total: u64,
    buf: Vec<u8>,
}

impl ValueAssembly {
    /// Starts a value for `key` (checked with [`paths::validate_key`]) of `total` bytes.
    pub fn start(key: &str, total: u64, value_bytes_max: u64) -> Result<Self, ClusterError> {
        paths::validate_key(key).map_err(|e| {
            let shown: String = key.chars().take(64).collect();
            ClusterError(format!("key {shown:?}: {e}"))
        })?;
        if total > value_bytes_max {
            return Err(ClusterError(format!(
                "{key}: a value of {total} bytes is over the {value_bytes_max}-byte bound \
                 (Datastore.max_value_size)"
            )));
        }
        Ok(ValueAssembly {
            key: key.to_owned(),
            total,
            buf: Vec::new(),
        })
    }

    /// Adds the next chunk.
    pub fn push(&mut self, data: &[u8]) -> Result<(), ClusterError> {
        if self.buf.len() as u64 + data.len() as u64 > self.total {
            return Err(ClusterError(format!(
                "{}: more bytes than the announced {}",
                self.key, self.total
            )));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The key and the whole value, if exactly the announced length arrived.
    pub fn finish(self) -> Result<(String, Vec<u8>), ClusterError> {
        if self.buf.len() as u64 != self.total {
            return Err(ClusterError(format!(
                "{}: {} bytes arrived, {} announced",
                self.key,
                self.buf.len(),
                self.total
            )));
        }
        Ok((self.key, self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use talon_proto::cluster::{ClientGone, ClientSeen, EventBatch, ReplicatedEvent};

    fn batch(events: Vec<ReplicatedEvent>) -> pc::MinionMessage {
        pc::MinionMessage {
            kind: Some(minion_message::Kind::Events(EventBatch {
                epoch: 7,
                events,
                outbox: None,
            })),
        }
    }

    fn ev(seq: u64, e: Option<Event>) -> ReplicatedEvent {
        ReplicatedEvent {
            seq,
            time_unix_ms: 0,
            event: e,
        }
    }

    fn gone(id: &str) -> Option<Event> {
        Some(Event::ClientGone(ClientGone {
            client_id: id.into(),
        }))
    }

    #[test]
    fn structure_errors_refuse_the_message() {
        let l = ClusterLimits::default();
        let id = "C.0123456789abcdef";
        for (m, want) in [
            (pc::MinionMessage { kind: None }, "no content"),
            (batch(vec![ev(2, gone(id)), ev(2, gone(id))]), "ascend"),
            (batch(vec![ev(0, gone(id))]), "start at 1"),
            (batch(vec![ev(1, None)]), "no body"),
            (
                batch((1..=4097).map(|s| ev(s, gone(id))).collect()),
                "4097 events",
            ),
        ] {
            let e = validate_minion_message(m, &l).unwrap_err();
            assert!(e.0.contains(want), "{e} lacks {want:?}");
        }
    }

    /// The outbox a minion reports with a batch: its head is never below the batch's last event
    /// (a minion claiming less is taken at the batch's word); a minion that reports none has none.
    #[test]
    fn a_batch_carries_the_minions_outbox() {
        let l = ClusterLimits::default();
        let with = |head_seq| {
            let mut m = batch(vec![
                ev(4, gone("C.0123456789abcdef")),
                ev(5, gone("C.0123456789abcdef")),
            ]);
            if let Some(minion_message::Kind::Events(b)) = &mut m.kind {
                b.outbox = Some(pc::OutboxState {
                    head_seq,
                    oldest_unix_ms: 1_000,
                    sent_unix_ms: 2_000,
                });
            }
            match validate_minion_message(m, &l).unwrap() {
                MinionInput::Events(b) => b,
                _ => panic!("events expected"),
            }
        };
        let b = with(9);
        let report = OutboxReport {
            epoch: 7,
            head: 9,
            oldest_unix_ms: 1_000,
            sent_unix_ms: 2_000,
        };
        assert_eq!(b.outbox, Some(report));
        assert_eq!(b.sent_unix_ms, 2_000);
        assert_eq!(with(3).outbox.map(|o| o.head), Some(5));
        let plain = batch(vec![ev(1, gone("C.0123456789abcdef"))]);
        let MinionInput::Events(b) = validate_minion_message(plain, &l).unwrap() else {
            panic!("events expected");
        };
        assert_eq!(b.outbox, None);
    }

    #[test]
    fn content_errors_mark_only_that_event() {
        let l = ClusterLimits::default();
        let key = b"a public key".to_vec();
        let real = ClientId::from_public_key(&key).to_string();
        let seen = |id: &str| {
            Some(Event::ClientSeen(ClientSeen {
                client_id: id.into(),
                public_key: key.clone().into(),
                ..Default::default()
            }))
        };
        let m = batch(vec![
            ev(1, seen(&real)),
            ev(2, seen("C.0123456789abcdef")),
            ev(3, gone("../../etc")),
        ]);
        let MinionInput::Events(MinionBatch { epoch, events, .. }) =
            validate_minion_message(m, &l).unwrap()
        else {
            panic!("events expected");
        };
        assert_eq!(epoch, 7);
        assert!(events[0].1.is_ok());
        assert!(
            events[1]
                .1
                .as_ref()
                .unwrap_err()
                .contains("not the id of the key")
        );
        assert!(events[2].1.is_err());
    }

    #[test]
    fn values_must_add_up_and_stay_within_bounds() {
        assert!(ValueAssembly::start("../x", 1, 10).is_err());
        assert!(
            ValueAssembly::start("a/b", 11, 10)
                .unwrap_err()
                .0
                .contains("over")
        );
        let mut a = ValueAssembly::start("a/b", 4, 10).unwrap();
        a.push(b"ab").unwrap();
        assert!(a.push(b"cde").is_err(), "more than announced");
        a.push(b"cd").unwrap();
        assert_eq!(a.finish().unwrap(), ("a/b".to_owned(), b"abcd".to_vec()));
        let mut short = ValueAssembly::start("a/b", 4, 10).unwrap();
        short.push(b"abc").unwrap();
        assert!(
            short
                .finish()
                .unwrap_err()
                .0
                .contains("3 bytes arrived, 4 announced")
        );
    }
}
