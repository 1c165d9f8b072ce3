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
            connected_at: Timestamp(0),
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
    /// True once the flow has ended (its runs are recorded).
    pub fn is_final(self) -> bool {
        matches!(self, FlowRecordState::Completed | FlowRecordState::Error)
    }

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
    /// Uploaded files, reassembled in the filestore after completion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uploads: Vec<crate::storage::uploads::UploadJson>,
    /// Where its messages are in the filestore, recorded with its completion (none: the flow is
    /// not complete, or predates the segment log and its messages are one file each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<crate::storage::segments::RunRef>,
}

/// A hunt's record (`hunts/<id>/record.json`): the spec and the state. Statistics are not stored
/// here; they are derived from the participant records at restore, so they are exact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HuntJson {
    /// The hunt.
    pub hunt_id: String,
    /// The artifact.
    pub artifact: String,
    /// Its parameters, defaults filled in.
    pub params: BTreeMap<String, String>,
    /// Required labels.
    pub include_labels: BTreeSet<String>,
    /// Excluding labels.
    pub exclude_labels: BTreeSet<String>,
    /// Required OS, if any.
    pub os: Option<String>,
    /// Expiry (ms).
    pub expires_ms: u64,
    /// Client limit, if any.
    pub client_limit: Option<u64>,
    /// Free text.
    pub description: String,
    /// Creation (ms).
    pub created_ms: u64,
    /// `running`, `stopped`, `expired` or `complete`.
    pub state: String,
    /// Who created it (empty for hunts stored before creators were recorded).
    #[serde(default)]
    pub creator: String,
}

impl HuntJson {
    /// From the core's record.
    pub fn from_record(r: &talon_core::hunts::HuntRecord) -> HuntJson {
        HuntJson {
            hunt_id: r.id.to_string(),
            artifact: r.spec.artifact.clone(),
            params: r.spec.params.clone(),
            include_labels: r.spec.include_labels.clone(),
            exclude_labels: r.spec.exclude_labels.clone(),
            os: r.spec.os.clone(),
            expires_ms: r.spec.expires.as_ms(),
            client_limit: r.spec.client_limit,
            description: r.spec.description.clone(),
            created_ms: r.created.as_ms(),
            state: r.state.as_str().to_owned(),
            creator: r.spec.creator.clone(),
        }
    }

    /// Into the core's record; `None` if malformed.
    pub fn to_record(&self) -> Option<talon_core::hunts::HuntRecord> {
        use talon_core::hunts::{HuntRecord, HuntSpec, HuntState};
        let state = match self.state.as_str() {
            "running" => HuntState::Running,
            "stopped" => HuntState::Stopped,
            "expired" => HuntState::Expired,
            "complete" => HuntState::Complete,
            _ => return None,
        };
        Some(HuntRecord {
            id: talon_core::HuntId::parse(&self.hunt_id).ok()?,
            spec: HuntSpec {
                artifact: self.artifact.clone(),
                params: self.params.clone(),
                include_labels: self.include_labels.clone(),
                exclude_labels: self.exclude_labels.clone(),
                os: self.os.clone(),
                expires: Timestamp(self.expires_ms),
                client_limit: self.client_limit,
                description: self.description.clone(),
                creator: self.creator.clone(),
            },
            created: Timestamp(self.created_ms),
            state,
        })
    }
}

/// One client's part in a hunt (`hunts/<id>/clients/<client>.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ParticipantJson {
    /// Tasked.
    Scheduled,
    /// Completed.
    Completed {
        /// Rows.
        rows: u64,
        /// Upload bytes.
        uploaded_bytes: u64,
    },
    /// Failed.
    Error {
        /// Rows.
        rows: u64,
        /// Upload bytes.
        uploaded_bytes: u64,
    },
}

impl From<talon_core::hunts::Participation> for ParticipantJson {
    fn from(p: talon_core::hunts::Participation) -> Self {
        use talon_core::hunts::Participation as P;
        match p {
            P::Scheduled => ParticipantJson::Scheduled,
            P::Completed {
                rows,
                uploaded_bytes,
            } => ParticipantJson::Completed {
                rows,
                uploaded_bytes,
            },
            P::Error {
                rows,
                uploaded_bytes,
            } => ParticipantJson::Error {
                rows,
                uploaded_bytes,
            },
        }
    }
}

impl From<ParticipantJson> for talon_core::hunts::Participation {
    fn from(p: ParticipantJson) -> Self {
        use talon_core::hunts::Participation as P;
        match p {
            ParticipantJson::Scheduled => P::Scheduled,
            ParticipantJson::Completed {
                rows,
                uploaded_bytes,
            } => P::Completed {
                rows,
                uploaded_bytes,
            },
            ParticipantJson::Error {
                rows,
                uploaded_bytes,
            } => P::Error {
                rows,
                uploaded_bytes,
            },
        }
    }
}

impl talon_core::node::completions::FlowRecord for FlowJson {
    type Run = crate::storage::segments::RunRef;

    fn says(&self, o: &talon_core::flows::FlowOutcome) -> bool {
        self.state.is_final() && self.rows == o.rows && self.uploaded_bytes == o.uploaded_bytes
    }

    fn finish(&mut self, o: &talon_core::flows::FlowOutcome, at: Timestamp, runs: Vec<Self::Run>) {
        self.state = match o.state {
            talon_core::flows::FinalState::Completed => FlowRecordState::Completed,
            talon_core::flows::FinalState::Error => FlowRecordState::Error,
        };
        self.rows = o.rows;
        self.uploaded_bytes = o.uploaded_bytes;
        self.error = o.error.clone();
        self.finished_ms = at.as_ms();
        self.runs = runs;
    }

    fn fail_unlisted(&mut self, why: String) {
        self.runs.clear();
        self.state = FlowRecordState::Error;
        self.error = why;
    }

    fn runs(&self) -> usize {
        self.runs.len()
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self)
            .expect("a flow record is strings, numbers and maps keyed by strings")
    }

    fn hunt(&self) -> Option<talon_core::HuntId> {
        self.hunt_id
            .as_deref()
            .and_then(|h| talon_core::HuntId::parse(h).ok())
    }
}

/// An audit-log entry (`audit/<day>/<ms>-<id>.json`, [`talon_core::paths::audit_entry`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditJson {
    /// When the master accepted the change (ms since the Unix epoch).
    pub time_ms: u64,
    /// The API user (its certificate's common name).
    pub user: String,
    /// What: `collect`, `label-add`, `label-remove`, `hunt-create`, `hunt-stop`.
    pub action: String,
    /// On what: a client id or a hunt id.
    pub target: String,
    /// Details: the label, or the flow and artifact.
    pub detail: String,
}

impl AuditJson {
    /// The stored form of `e`.
    pub fn from_entry(e: &talon_core::node::master::AuditEntry) -> AuditJson {
        AuditJson {
            time_ms: e.time.as_ms(),
            user: e.user.clone(),
            action: e.action.name().to_owned(),
            target: e.target.clone(),
            detail: e.detail.clone(),
        }
    }
}
