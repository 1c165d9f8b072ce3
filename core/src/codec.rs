//! Decoding and validating what a client sends, into typed core inputs.
//!
//! Everything a client sends passes through [`decode`] (raw bytes) or [`validate`] (a message the
//! gRPC layer already decoded). Sizes and counts are checked before anything is allocated in
//! proportion to them where the wire format allows, and every way a message can be wrong has its own
//! [`DecodeError`] variant naming the field, so a refusal is a sentence a person can act on.

use crate::flows::{FinalState, Payload};
use crate::ids::{ClientId, FlowId, IdError};
use crate::seqset::Weight;
use bytes::Bytes;
use prost::Message;
use std::fmt;
use talon_proto::comms;

/// Bounds on client messages.
#[derive(Clone, Debug)]
pub struct CodecLimits {
    /// Largest encoded message.
    pub message_bytes_max: usize,
    /// Rows per result batch.
    pub rows_per_batch_max: usize,
    /// Largest single row (bytes of JSON).
    pub row_bytes_max: usize,
    /// Largest file chunk.
    pub chunk_bytes_max: usize,
    /// Largest upload a flow may declare (`max_upload_size`).
    pub upload_bytes_max: u64,
    /// Longest upload name, the client-side path (`max_upload_name_length`, bytes).
    pub upload_name_bytes_max: usize,
    /// Log lines per message.
    pub log_lines_max: usize,
    /// Longest log line or error text.
    pub text_bytes_max: usize,
    /// Longest short field (hostname, os, source, nonce, ...).
    pub field_bytes_max: usize,
    /// Addresses (ips, macs) per hello.
    pub addresses_max: usize,
    /// Running flows a hello may list.
    pub running_flows_max: usize,
}

impl Default for CodecLimits {
    fn default() -> Self {
        CodecLimits {
            message_bytes_max: 8 << 20,
            rows_per_batch_max: 10_000,
            row_bytes_max: 1 << 20,
            chunk_bytes_max: 4 << 20,
            upload_bytes_max: 1 << 30,
            upload_name_bytes_max: 4096,
            log_lines_max: 1000,
            text_bytes_max: 16 << 10,
            field_bytes_max: 255,
            addresses_max: 64,
            running_flows_max: 1024,
        }
    }
}

/// Host facts a client reports in its hello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Hostname.
    pub hostname: String,
    /// Fully qualified name.
    pub fqdn: String,
    /// `linux`, `windows` or `darwin`.
    pub os: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU architecture.
    pub arch: String,
    /// Agent version.
    pub agent_version: String,
    /// Interface addresses.
    pub ips: Vec<String>,
    /// MAC addresses.
    pub macs: Vec<String>,
    /// Boot time.
    pub boot_time_unix_s: u64,
}

/// The first message on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The id the client claims; [`check_identity`] compares it with the id derived from its key.
    pub claimed_id: ClientId,
    /// The deployment nonce from the client's config.
    pub deployment_nonce: String,
    /// Host facts.
    pub info: ClientInfo,
    /// Flows the client is still running.
    pub running_flows: Vec<FlowId>,
}

/// Severity of a client log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warning.
    Warn,
    /// Error.
    Error,
}

/// One client log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// When, by the client's clock.
    pub time_unix_ms: u64,
    /// Severity.
    pub level: LogLevel,
    /// Text.
    pub message: String,
}

/// The end of an upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadEnd {
    /// The file's size.
    pub total_size: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

/// The payload of one durable flow message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowData {
    /// Result rows, each a JSON object.
    Rows {
        /// The artifact source.
        source: String,
        /// The rows.
        rows: Vec<Bytes>,
    },
    /// A piece of an uploaded file.
    FileChunk {
        /// Which upload of the flow.
        upload_id: u32,
        /// The client-side path (never used raw as a storage path; see [`crate::paths::upload`]).
        name: String,
        /// Where this chunk starts.
        offset: u64,
        /// The bytes.
        data: Bytes,
        /// Set on the last chunk.
        end: Option<UploadEnd>,
    },
    /// Log lines.
    Logs(Vec<LogLine>),
    /// The flow's final status.
    Final {
        /// How it ended.
        state: FinalState,
        /// The error, if it failed.
        error: String,
        /// Rows the client says it sent (informational; totals come from storage).
        total_rows: u64,
        /// Upload bytes the client says it sent.
        total_uploaded_bytes: u64,
        /// How long it ran.
        duration_ms: u64,
    },
}

impl FlowData {
    /// What the flow tracker needs of this message.
    pub fn tracker_payload(&self) -> Payload {
        match self {
            FlowData::Rows { rows, .. } => Payload::Data(Weight {
                rows: rows.len() as u64,
                data_bytes: rows.iter().map(|r| r.len() as u64).sum(),
                ..Weight::default()
            }),
            FlowData::FileChunk { data, end, .. } => Payload::Data(Weight {
                rows: 0,
                bytes: data.len() as u64,
                uploads: u64::from(end.is_some()),
                data_bytes: data.len() as u64,
            }),
            FlowData::Logs(lines) => Payload::Data(Weight {
                data_bytes: lines.iter().map(|l| l.message.len() as u64).sum(),
                ..Weight::default()
            }),
            FlowData::Final { state, error, .. } => Payload::Final {
                state: *state,
                error: error.clone(),
            },
        }
    }
}

/// A validated client message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientInput {
    /// The stream's first message.
    Hello(Hello),
    /// One durable flow message.
    Flow {
        /// The flow.
        flow: FlowId,
        /// Its sequence number within the flow.
        seq: u64,
        /// What it carries.
        data: FlowData,
    },
    /// The client received a task.
    TaskAck {
        /// The task's flow.
        flow: FlowId,
    },
    /// Keep-alive.
    Ping {
        /// The client's clock.
        time_unix_ms: u64,
    },
    /// A batch of an event artifact's rows (docs/events.md).
    Events(EventBatchIn),
}

/// A validated `EventBatch`: its artifact name is well formed, its day a real date, its rows JSON
/// objects within the bounds of a flow's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBatchIn {
    /// The event artifact.
    pub artifact: String,
    /// The agent's run of it.
    pub stream: u64,
    /// Its number in the stream.
    pub seq: u64,
    /// The UTC day it was made.
    pub day: String,
    /// When it was made (the agent's clock).
    pub time_unix_ms: u64,
    /// Its rows.
    pub rows: Vec<Bytes>,
    /// Events of the stream the agent dropped so far.
    pub dropped: u64,
}

/// Why a client message was refused. Nothing of a refused message is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The encoded message is larger than allowed.
    TooLarge {
        /// Its size.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The bytes are not a valid protobuf message.
    Malformed(String),
    /// A required field is absent.
    Missing(&'static str),
    /// An id field is invalid.
    BadId {
        /// The field.
        field: &'static str,
        /// What is wrong.
        error: IdError,
    },
    /// A repeated field has too many entries.
    TooMany {
        /// The field.
        field: &'static str,
        /// How many.
        count: usize,
        /// The bound.
        max: usize,
    },
    /// A field is longer than allowed.
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A row is not a JSON object.
    RowNotJsonObject {
        /// Its index in the batch.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A field holds a value outside its domain (enum, digest length, NUL in a name, ...).
    BadValue {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The claimed client id is not the one derived from the client's key.
    IdentityMismatch {
        /// What the client claimed.
        claimed: ClientId,
        /// What its key says.
        derived: ClientId,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => write!(f, "message of {len} bytes exceeds {max}"),
            DecodeError::Malformed(e) => write!(f, "malformed message: {e}"),
            DecodeError::Missing(field) => write!(f, "missing field {field}"),
            DecodeError::BadId { field, error } => write!(f, "{field}: {error}"),
            DecodeError::TooMany { field, count, max } => {
                write!(f, "{field} has {count} entries; at most {max}")
            }
            DecodeError::TooLong { field, len, max } => {
                write!(f, "{field} is {len} bytes; at most {max}")
            }
            DecodeError::RowNotJsonObject { index, reason } => {
                write!(f, "row {index} is not a JSON object: {reason}")
            }
            DecodeError::BadValue { field, reason } => write!(f, "{field}: {reason}"),
            DecodeError::IdentityMismatch { claimed, derived } => {
                write!(
                    f,
                    "client claims id {claimed} but its key derives {derived}"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes and validates one encoded `ClientMessage`.
pub fn decode(bytes: &[u8], limits: &CodecLimits) -> Result<ClientInput, DecodeError> {
    if bytes.len() > limits.message_bytes_max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: limits.message_bytes_max,
        });
    }
    let msg =
        comms::ClientMessage::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    validate(msg, limits)
}

/// Refuses a hello whose claimed id is not the one derived from the key the client authenticated with.
pub fn check_identity(claimed: &ClientId, derived: &ClientId) -> Result<(), DecodeError> {
    if claimed == derived {
        Ok(())
    } else {
        Err(DecodeError::IdentityMismatch {
            claimed: claimed.clone(),
            derived: derived.clone(),
        })
    }
}

fn field(name: &'static str, s: String, max: usize) -> Result<String, DecodeError> {
    if s.len() > max {
        return Err(DecodeError::TooLong {
            field: name,
            len: s.len(),
            max,
        });
    }
    Ok(s)
}

fn count<T>(name: &'static str, v: &[T], max: usize) -> Result<(), DecodeError> {
    if v.len() > max {
        return Err(DecodeError::TooMany {
            field: name,
            count: v.len(),
            max,
        });
    }
    Ok(())
}

fn flow_id(name: &'static str, s: &str) -> Result<FlowId, DecodeError> {
    if s.is_empty() {
        return Err(DecodeError::Missing(name));
    }
    FlowId::parse(s).map_err(|error| DecodeError::BadId { field: name, error })
}

/// Validates a decoded `ClientMessage`.
pub fn validate(
    msg: comms::ClientMessage,
    limits: &CodecLimits,
) -> Result<ClientInput, DecodeError> {
    use comms::client_message::Kind;
    match msg.kind.ok_or(DecodeError::Missing("ClientMessage.kind"))? {
        Kind::Hello(h) => validate_hello(h, limits).map(ClientInput::Hello),
        Kind::Flow(f) => validate_flow(f, limits),
        Kind::TaskAck(a) => Ok(ClientInput::TaskAck {
            flow: flow_id("TaskAck.flow_id", &a.flow_id)?,
        }),
        Kind::Ping(p) => Ok(ClientInput::Ping {
            time_unix_ms: p.time_unix_ms,
        }),
        Kind::Events(e) => validate_events(e, limits).map(ClientInput::Events),
    }
}

fn validate_events(e: comms::EventBatch, l: &CodecLimits) -> Result<EventBatchIn, DecodeError> {
    if !crate::artifacts::artifact_name_ok(&e.artifact) {
        return Err(DecodeError::BadValue {
            field: "EventBatch.artifact",
            reason: "not an artifact name".into(),
        });
    }
    if !crate::events::valid_day(&e.day) {
        return Err(DecodeError::BadValue {
            field: "EventBatch.day",
            reason: format!(
                "{:?} is not a date written YYYY-MM-DD",
                e.day.chars().take(32).collect::<String>()
            ),
        });
    }
    count("EventBatch.rows", &e.rows, l.rows_per_batch_max)?;
    for (index, row) in e.rows.iter().enumerate() {
        check_row(index, row, l.row_bytes_max)?;
    }
    Ok(EventBatchIn {
        artifact: e.artifact,
        stream: e.stream,
        seq: e.seq,
        day: e.day,
        time_unix_ms: e.time_unix_ms,
        rows: e.rows,
        dropped: e.dropped,
    })
}

fn validate_hello(h: comms::Hello, l: &CodecLimits) -> Result<Hello, DecodeError> {
    if h.client_id.is_empty() {
        return Err(DecodeError::Missing("Hello.client_id"));
    }
    let claimed_id = ClientId::parse(&h.client_id).map_err(|error| DecodeError::BadId {
        field: "Hello.client_id",
        error,
    })?;
    let i = h.info.ok_or(DecodeError::Missing("Hello.info"))?;
    count("Hello.info.ips", &i.ips, l.addresses_max)?;
    count("Hello.info.macs", &i.macs, l.addresses_max)?;
    count("Hello.running_flows", &h.running_flows, l.running_flows_max)?;
    let os = field("Hello.info.os", i.os, l.field_bytes_max)?.to_ascii_lowercase();
    if !matches!(os.as_str(), "linux" | "windows" | "darwin") {
        return Err(DecodeError::BadValue {
            field: "Hello.info.os",
            reason: format!("{os:?} is not linux, windows or darwin"),
        });
    }
    let hostname = field("Hello.info.hostname", i.hostname, l.field_bytes_max)?;
    if hostname.is_empty() {
        return Err(DecodeError::Missing("Hello.info.hostname"));
    }
    let short = |name, v: Vec<String>| -> Result<Vec<String>, DecodeError> {
        v.into_iter()
            .map(|s| field(name, s, l.field_bytes_max))
            .collect()
    };
    Ok(Hello {
        claimed_id,
        deployment_nonce: field(
            "Hello.deployment_nonce",
            h.deployment_nonce,
            l.field_bytes_max,
        )?,
        info: ClientInfo {
            hostname,
            fqdn: field("Hello.info.fqdn", i.fqdn, l.field_bytes_max)?,
            os,
            kernel: field("Hello.info.kernel", i.kernel, l.field_bytes_max)?,
            arch: field("Hello.info.arch", i.arch, l.field_bytes_max)?,
            agent_version: field(
                "Hello.info.agent_version",
                i.agent_version,
                l.field_bytes_max,
            )?,
            ips: short("Hello.info.ips", i.ips)?,
            macs: short("Hello.info.macs", i.macs)?,
            boot_time_unix_s: i.boot_time_unix_s,
        },
        running_flows: h
            .running_flows
            .iter()
            .map(|f| flow_id("Hello.running_flows", f))
            .collect::<Result<_, _>>()?,
    })
}

fn validate_flow(f: comms::FlowMessage, l: &CodecLimits) -> Result<ClientInput, DecodeError> {
    use comms::flow_message::Payload as P;
    let flow = flow_id("FlowMessage.flow_id", &f.flow_id)?;
    let data = match f
        .payload
        .ok_or(DecodeError::Missing("FlowMessage.payload"))?
    {
        P::Rows(r) => {
            count("ResultRows.rows", &r.rows, l.rows_per_batch_max)?;
            for (index, row) in r.rows.iter().enumerate() {
                check_row(index, row, l.row_bytes_max)?;
            }
            FlowData::Rows {
                source: field("ResultRows.source", r.source, l.field_bytes_max)?,
                rows: r.rows,
            }
        }
        P::FileChunk(c) => validate_chunk(c, l)?,
        P::Logs(g) => {
            count("LogLines.lines", &g.lines, l.log_lines_max)?;
            let lines = g
                .lines
                .into_iter()
                .map(|line| {
                    let level = match line.level.as_str() {
                        "DEBUG" => LogLevel::Debug,
                        "INFO" | "" => LogLevel::Info,
                        "WARN" => LogLevel::Warn,
                        "ERROR" => LogLevel::Error,
                        other => {
                            let reason = format!(
                                "{:?} is not DEBUG, INFO, WARN or ERROR",
                                other.chars().take(16).collect::<String>()
                            );
                            return Err(DecodeError::BadValue {
                                field: "LogLine.level",
                                reason,
                            });
                        }
                    };
                    Ok(LogLine {
                        time_unix_ms: line.time_unix_ms,
                        level,
                        message: field("LogLine.message", line.message, l.text_bytes_max)?,
                    })
                })
                .collect::<Result<_, _>>()?;
            FlowData::Logs(lines)
        }
        P::Status(s) => {
            let state = match comms::FlowState::try_from(s.state) {
                Ok(comms::FlowState::Completed) => FinalState::Completed,
                Ok(comms::FlowState::Error) => FinalState::Error,
                _ => {
                    let reason = format!("{} is not COMPLETED or ERROR", s.state);
                    return Err(DecodeError::BadValue {
                        field: "FlowStatus.state",
                        reason,
                    });
                }
            };
            FlowData::Final {
                state,
                error: field("FlowStatus.error", s.error, l.text_bytes_max)?,
                total_rows: s.total_rows,
                total_uploaded_bytes: s.total_uploaded_bytes,
                duration_ms: s.duration_ms,
            }
        }
    };
    Ok(ClientInput::Flow {
        flow,
        seq: f.seq,
        data,
    })
}

fn validate_chunk(c: comms::FileChunk, l: &CodecLimits) -> Result<FlowData, DecodeError> {
    if c.data.len() > l.chunk_bytes_max {
        return Err(DecodeError::TooLong {
            field: "FileChunk.data",
            len: c.data.len(),
            max: l.chunk_bytes_max,
        });
    }
    let name = field(
        "FileChunk.name (max_upload_name_length)",
        c.name,
        l.upload_name_bytes_max,
    )?;
    if name.is_empty() {
        return Err(DecodeError::Missing("FileChunk.name"));
    }
    if name.contains('\0') {
        return Err(DecodeError::BadValue {
            field: "FileChunk.name",
            reason: "contains NUL".into(),
        });
    }
    let end_of_chunk = c.offset.checked_add(c.data.len() as u64);
    if end_of_chunk.is_none_or(|e| e > l.upload_bytes_max) {
        let reason = format!(
            "upload would exceed max_upload_size ({} bytes)",
            l.upload_bytes_max
        );
        return Err(DecodeError::BadValue {
            field: "FileChunk.offset",
            reason,
        });
    }
    let end = if c.eof {
        let sha256: [u8; 32] = c
            .sha256
            .as_ref()
            .try_into()
            .map_err(|_| DecodeError::BadValue {
                field: "FileChunk.sha256",
                reason: format!("{} bytes; a SHA-256 is 32", c.sha256.len()),
            })?;
        if Some(c.total_size) != end_of_chunk {
            let reason = format!("{} does not match offset + chunk length", c.total_size);
            return Err(DecodeError::BadValue {
                field: "FileChunk.total_size",
                reason,
            });
        }
        Some(UploadEnd {
            total_size: c.total_size,
            sha256,
        })
    } else {
        None
    };
    Ok(FlowData::FileChunk {
        upload_id: c.upload_id,
        name,
        offset: c.offset,
        data: c.data,
        end,
    })
}

/// Deepest nesting of arrays and objects a row may have, so every later consumer can parse it.
pub const ROW_DEPTH_MAX: usize = 64;

/// Returns the depth reached if brackets outside strings nest deeper than `max`.
fn nesting_deeper_than(json: &[u8], max: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Some(depth);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn check_row(index: usize, row: &[u8], max: usize) -> Result<(), DecodeError> {
    if row.len() > max {
        return Err(DecodeError::TooLong {
            field: "ResultRows.rows[]",
            len: row.len(),
            max,
        });
    }
    if row.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(DecodeError::RowNotJsonObject {
            index,
            reason: "does not start with '{'".into(),
        });
    }
    if let Some(depth) = nesting_deeper_than(row, ROW_DEPTH_MAX) {
        let reason = format!("nested deeper than {ROW_DEPTH_MAX} (at {depth})");
        return Err(DecodeError::RowNotJsonObject { index, reason });
    }
    // Full syntax check without building the value.
    serde_json::from_slice::<serde::de::IgnoredAny>(row)
        .map(|_| ())
        .map_err(|e| DecodeError::RowNotJsonObject {
            index,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests;
