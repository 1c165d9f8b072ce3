//! The JSON records the shell keeps in the datastore (small metadata, the seed's "datastore" class).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use talon_core::registry::ClientRecord;
use talon_core::{ClientId, Timestamp};

/// A client's enrolment record (`clients/<id>/record.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientJson {
    /// The client id.
    pub client_id: String,
    /// SHA-256 of its key, hex.
    pub key_fingerprint: String,
    /// Hostname.
    pub hostname: String,
    /// Fully qualified name.
    pub fqdn: String,
    /// OS.
    pub os: String,
    /// Labels.
    pub labels: BTreeSet<String>,
    /// Interface addresses.
    pub ips: Vec<String>,
    /// Enrolment time (ms).
    pub first_seen_ms: u64,
    /// Last contact (ms).
    pub last_seen_ms: u64,
    /// Address it last connected from.
    pub last_ip: String,
    /// Node that last held it.
    pub node: String,
}

impl ClientJson {
    /// From the core's record.
    pub fn from_record(r: &ClientRecord) -> ClientJson {
        ClientJson {
            client_id: r.id.to_string(),
            key_fingerprint: crate::clock::hex(&r.key_fingerprint),
            hostname: r.hostname.clone(),
            fqdn: r.fqdn.clone(),
            os: r.os.clone(),
            labels: r.labels.clone(),
            ips: r.ips.clone(),
            first_seen_ms: r.first_seen.as_ms(),
            last_seen_ms: r.last_seen.as_ms(),
            last_ip: r.last_ip.clone(),
            node: r.node.clone(),
        }
    }

    /// Into the core's record (disconnected); `None` if the id or fingerprint is malformed.
    pub fn to_record(&self) -> Option<ClientRecord> {
        let fp = self.key_fingerprint.as_bytes();
        if fp.len() != 64 {
            return None;
        }
        let mut key_fingerprint = [0u8; 32];
        for (i, b) in key_fingerprint.iter_mut().enumerate() {
            *b = u8::from_str_radix(std::str::from_utf8(&fp[2 * i..2 * i + 2]).ok()?, 16).ok()?;
        }
        Some(ClientRecord {
            id: ClientId::parse(&self.client_id).ok()?,
            key_fingerprint,
            hostname: self.hostname.clone(),
            fqdn: self.fqdn.clone(),
            os: self.os.clone(),
            labels: self.labels.clone(),
            ips: self.ips.clone(),
            first_seen: Timestamp(self.first_seen_ms),
            last_seen: Timestamp(self.last_seen_ms),
            last_ip: self.last_ip.clone(),
            node: self.node.clone(),
            connected: false,
            persisted_seen: Timestamp(self.last_seen_ms),
        })
    }
}

/// Where a flow stands, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowRecordState {
    /// Waiting for the client to connect.
    Queued,
    /// Delivered to the client.
    Running,
    /// Completed.
    Completed,
    /// Ended in error.
    Error,
}

impl FlowRecordState {
    /// The name the CLI prints.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowRecordState::Queued => "queued",
            FlowRecordState::Running => "running",
            FlowRecordState::Completed => "completed",
            FlowRecordState::Error => "error",
        }
    }
}

/// A flow's record (`clients/<id>/flows/<flow>/record.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowJson {
    /// The client.
    pub client_id: String,
    /// The flow.
    pub flow_id: String,
    /// The artifact.
    pub artifact: String,
    /// Its parameters, defaults filled in.
    pub params: BTreeMap<String, String>,
    /// The hunt, for hunt flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hunt_id: Option<String>,
    /// Where it stands.
    pub state: FlowRecordState,
    /// Rows stored.
    pub rows: u64,
    /// Upload bytes stored.
    pub uploaded_bytes: u64,
    /// The error, if any.
    pub error: String,
    /// When it was created (ms).
    pub created_ms: u64,
    /// When it finished (ms), 0 while running.
    pub finished_ms: u64,
}
