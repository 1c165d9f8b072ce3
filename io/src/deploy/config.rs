//! Configuration files: the server config (master and minions share one), the client config, and API
//! client configs. YAML in the seed's shape; unknown keys and missing required keys are errors that
//! name the key (and the file), and values are checked after parsing.

use crate::clock::{Clock, Entropy, hex};
use crate::deploy::pki::{self, Pem};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// The only master datastore implementation.
pub const MASTER_IMPLEMENTATION: &str = "MemcacheFileDataStore";
/// The only minion datastore implementation.
pub const MINION_IMPLEMENTATION: &str = "RemoteFileDataStore";
/// Where `config generate` puts `Datastore.location` under the shared volume's mount point.
pub const METADATA_SUBDIR: &str = "metadata";
/// Where `config generate` puts `Datastore.filestore_directory` under the mount point.
pub const FILESTORE_SUBDIR: &str = "filestore";
/// The shared volume's mount point `config generate` uses when `--datastore` is not given.
pub const DEFAULT_DATASTORE: &str = "/opt/talon";

/// The server config: every node of a deployment runs from the same file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// What clients are told.
    #[serde(rename = "Client")]
    pub client: ClientSection,
    /// The master's API (also where minions reach the master).
    #[serde(rename = "API")]
    pub api: ApiSection,
    /// The master's GUI.
    #[serde(rename = "GUI")]
    pub gui: GuiSection,
    /// Every node's Prometheus metrics listener; absent: loopback, port 8003.
    #[serde(rename = "Monitoring", default)]
    pub monitoring: MonitoringSection,
    /// The master's client-facing frontend.
    #[serde(rename = "Frontend")]
    pub frontend: FrontendSection,
    /// Minion frontends; empty in single-server mode.
    #[serde(
        rename = "ExtraFrontends",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub extra_frontends: Vec<ExtraFrontend>,
    /// Where data lives.
    #[serde(rename = "Datastore")]
    pub datastore: DatastoreSection,
    /// The deployment CA.
    #[serde(rename = "CA")]
    pub ca: CaSection,
}

/// `Client`: what endpoint agents need to find and trust the frontends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// Every frontend's URL; clients pick one at random and fail over to the next.
    pub server_urls: Vec<String>,
    /// The deployment CA (PEM) that clients pin.
    pub ca_certificate: String,
    /// A deployment secret clients present in their hello; refuses agents of another deployment.
    pub nonce: String,
    /// Bytes of event batches an agent keeps on its local disk until the frontends have stored
    /// them (docs/events.md, "The agent's buffer"); beyond it new batches are dropped and counted.
    #[serde(default = "events_buffer_bytes")]
    pub events_buffer_bytes: u64,
}

fn events_buffer_bytes() -> u64 {
    crate::agent::spool::DEFAULT_MAX_BYTES
}

/// `API`: the master's gRPC API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The name minions and API clients use to reach the master.
    pub hostname: String,
    /// Listen address (`0.0.0.0` once minions exist).
    pub bind_address: String,
    /// Listen port.
    pub bind_port: u16,
}

/// `GUI`: the master's web interface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuiSection {
    /// Listen address.
    pub bind_address: String,
    /// Listen port.
    pub bind_port: u16,
    /// The certificate the GUI presents (PEM), e.g. one a public CA issued for the name analysts
    /// type; empty: the frontend certificate (signed by the deployment CA).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate: String,
    /// Its private key (PEM); set with `certificate`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_key: String,
}

/// `Monitoring`: where every node serves its Prometheus metrics (docs/operations.md, "Metrics"):
/// plain HTTP, `GET /metrics`. Loopback by default: expose it on another interface only to a
/// network the operators' Prometheus is on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSection {
    /// Listen address.
    #[serde(default = "loopback")]
    pub bind_address: String,
    /// Listen port (each node on its own machine uses the same one); 0: no metrics listener.
    #[serde(default = "monitoring_port")]
    pub bind_port: u16,
}

impl Default for MonitoringSection {
    fn default() -> Self {
        MonitoringSection {
            bind_address: loopback(),
            bind_port: monitoring_port(),
        }
    }
}

fn loopback() -> String {
    "127.0.0.1".into()
}

fn monitoring_port() -> u16 {
    crate::metrics::DEFAULT_PORT
}

/// `Frontend`: the master's client-facing service and the certificate all frontends share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendSection {
    /// The master's public name.
    pub hostname: String,
    /// Listen address.
    pub bind_address: String,
    /// Listen port.
    pub bind_port: u16,
    /// The frontend certificate (PEM); its SANs name every frontend.
    pub certificate: String,
    /// Its private key (PEM).
    pub private_key: String,
    /// Sizing and rate limits.
    #[serde(default)]
    pub resources: Resources,
}

/// `Frontend.resources`: every size and rate limit a frontend applies to what clients send it.
/// Each key is optional; the defaults suit a deployment of tens of thousands of endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// Size of each node's client key cache (the seed's setting of the same name).
    pub expected_clients: u64,
    /// New client connections accepted per second per node; beyond it clients back off.
    pub connections_per_second: u64,
    /// Task notifications pushed to connected clients per second per node; beyond it they wait.
    pub notifications_per_second: u64,
    /// Largest file one upload may be (bytes).
    pub max_upload_size: u64,
    /// Longest upload name (the client-side path, bytes); a chunk with a longer name is refused.
    pub max_upload_name_length: u64,
    /// Uploads one flow may finish; the flow fails at the next one (its record lists each upload).
    pub max_uploads_per_flow: u64,
    /// Bytes of data one flow may store (rows, file chunks, log text): its byte budget. A message
    /// that would go past it is refused, and the flow fails.
    pub max_flow_bytes: u64,
    /// Largest encoded client message (bytes).
    pub max_message_size: u64,
    /// Result rows per client message.
    pub max_rows_per_batch: u64,
    /// Largest single result row (bytes of JSON).
    pub max_row_size: u64,
    /// Largest file chunk in one client message (bytes).
    pub max_chunk_size: u64,
    /// Unacknowledged messages one flow may have in flight.
    pub max_in_flight_per_flow: u64,
    /// Flows tracked at once per node; beyond it new flows are refused with BUSY.
    pub max_concurrent_flows: u64,
    /// Tasks waiting for one client; beyond it a new collection for it is refused.
    pub max_queued_tasks_per_client: u64,
    /// Clients enrolled at most; a new client beyond it is refused (RESOURCE_EXHAUSTED).
    pub max_clients: u64,
    /// New clients (first contact) admitted per second per node, after a burst of 60 seconds'
    /// worth; beyond it a new client is refused with UNAVAILABLE and retries with backoff. Known
    /// clients are never limited.
    pub enrolments_per_second: u64,
    /// TLS handshakes in progress at once per listener; beyond it new connections wait.
    pub max_pending_handshakes: u64,
    /// Client-port connections open at once from one address; more are closed before any TLS
    /// work. High by default: many endpoints may share one address behind NAT.
    pub max_connections_per_address: u64,
    /// API-port connections (analysts, minions) open at once from one address; more are closed
    /// before any TLS work, so silent sockets from one host cannot crowd out the API.
    pub max_api_connections_per_address: u64,
    /// A TLS handshake not finished within this many seconds is dropped.
    pub handshake_timeout_s: u64,
    /// A client stream whose first message (Hello) does not arrive within this many seconds is
    /// closed.
    pub hello_timeout_s: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            expected_clients: 10_000,
            connections_per_second: 1_000,
            notifications_per_second: 5_000,
            max_upload_size: 1 << 30,
            max_upload_name_length: 4096,
            max_uploads_per_flow: 10_000,
            max_flow_bytes: 4 << 30,
            max_message_size: 8 << 20,
            max_rows_per_batch: 10_000,
            max_row_size: 1 << 20,
            max_chunk_size: 4 << 20,
            max_in_flight_per_flow: 64,
            max_concurrent_flows: 100_000,
            max_queued_tasks_per_client: 256,
            max_clients: 2_000_000,
            enrolments_per_second: 1_000,
            max_pending_handshakes: 1024,
            max_connections_per_address: 20_000,
            max_api_connections_per_address: 256,
            handshake_timeout_s: 10,
            hello_timeout_s: 10,
        }
    }
}

impl Resources {
    /// Each key's name, value and allowed range (inclusive). The lower bounds of the message, batch
    /// and chunk sizes keep what the built-in agent sends (batches of up to 1,000 rows and 1 MiB,
    /// 512 KiB file chunks) within them.
    pub fn bounds(&self) -> [(&'static str, u64, u64, u64); 21] {
        const K: u64 = 1 << 10;
        const M: u64 = 1 << 20;
        [
            ("expected_clients", self.expected_clients, 1, 10_000_000),
            (
                "connections_per_second",
                self.connections_per_second,
                1,
                1_000_000,
            ),
            (
                "notifications_per_second",
                self.notifications_per_second,
                1,
                10_000_000,
            ),
            ("max_upload_size", self.max_upload_size, 1, 1 << 40),
            (
                "max_upload_name_length",
                self.max_upload_name_length,
                255,
                16 * K,
            ),
            (
                "max_uploads_per_flow",
                self.max_uploads_per_flow,
                1,
                1_000_000,
            ),
            ("max_flow_bytes", self.max_flow_bytes, M, 1 << 44),
            ("max_message_size", self.max_message_size, 2 * M, 256 * M),
            (
                "max_rows_per_batch",
                self.max_rows_per_batch,
                1000,
                1_000_000,
            ),
            ("max_row_size", self.max_row_size, K, 64 * M),
            ("max_chunk_size", self.max_chunk_size, 512 * K, 64 * M),
            (
                "max_in_flight_per_flow",
                self.max_in_flight_per_flow,
                1,
                4096,
            ),
            (
                "max_concurrent_flows",
                self.max_concurrent_flows,
                1,
                10_000_000,
            ),
            (
                "max_queued_tasks_per_client",
                self.max_queued_tasks_per_client,
                1,
                65_536,
            ),
            ("max_clients", self.max_clients, 1, 100_000_000),
            (
                "enrolments_per_second",
                self.enrolments_per_second,
                1,
                1_000_000,
            ),
            (
                "max_pending_handshakes",
                self.max_pending_handshakes,
                1,
                1_000_000,
            ),
            (
                "max_connections_per_address",
                self.max_connections_per_address,
                1,
                10_000_000,
            ),
            (
                "max_api_connections_per_address",
                self.max_api_connections_per_address,
                1,
                1_000_000,
            ),
            ("handshake_timeout_s", self.handshake_timeout_s, 1, 600),
            ("hello_timeout_s", self.hello_timeout_s, 1, 600),
        ]
    }

    fn validate(&self) -> Result<(), String> {
        for (key, v, lo, hi) in self.bounds() {
            if v < lo || v > hi {
                return Err(format!(
                    "Frontend.resources.{key}: {v} is out of range (use {lo} to {hi})"
                ));
            }
        }
        if self.max_chunk_size >= self.max_message_size
            || self.max_row_size >= self.max_message_size
        {
            return Err(format!(
                "Frontend.resources.max_message_size: {} must exceed max_chunk_size ({}) and \
                 max_row_size ({}) so that one chunk or row fits in a message",
                self.max_message_size, self.max_chunk_size, self.max_row_size
            ));
        }
        Ok(())
    }
}

/// One entry of `ExtraFrontends`: a minion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraFrontend {
    /// The minion's public name.
    pub hostname: String,
    /// Listen address.
    pub bind_address: String,
    /// Listen port.
    pub bind_port: u16,
}

impl ExtraFrontend {
    /// The minion's node name: `<hostname>-<bind_port>`.
    pub fn node_name(&self) -> String {
        format!("{}-{}", self.hostname, self.bind_port)
    }
}

/// `Datastore`: the shared volume, mounted at the same path on every node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreSection {
    /// Metadata (the master's datastore) lives here.
    pub location: PathBuf,
    /// Bulk data (result rows, uploads) lives here.
    pub filestore_directory: PathBuf,
    /// Must be `MemcacheFileDataStore`.
    #[serde(default = "master_impl")]
    pub master_implementation: String,
    /// Must be `RemoteFileDataStore`.
    #[serde(default = "minion_impl")]
    pub minion_implementation: String,
    /// Master memory for cached clean metadata (bytes); the least recently used is evicted beyond it.
    #[serde(default = "memcache_bytes")]
    pub memcache_bytes: u64,
    /// Master memory for metadata journalled but not yet flushed to the volume (bytes); writes are
    /// refused with "busy" beyond it until flushing catches up.
    #[serde(default = "memcache_dirty_bytes")]
    pub memcache_dirty_bytes: u64,
    /// Largest metadata value (bytes), on the master and through the remote datastore.
    #[serde(default = "max_value_size")]
    pub max_value_size: u64,
    /// Each frontend's local write-behind buffer for the filestore (bytes): flow messages are
    /// acknowledged once journalled on the node's local disk and copied to the shared volume in the
    /// background; stores are refused as busy beyond it until copying catches up.
    #[serde(default = "filestore_buffer_bytes")]
    pub filestore_buffer_bytes: u64,
    /// Test knob: every shared-volume operation (metadata and filestore) first waits this long,
    /// to reproduce NFS/EFS latency on a local disk (`talon bench storage-latency`). 0 in production.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub volume_latency_ms: u64,
    /// Client events older than this many UTC days are deleted from the filestore by the master,
    /// hourly (docs/events.md, "Retention"); 0 keeps them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events_retention_days: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn filestore_buffer_bytes() -> u64 {
    256 << 20
}

fn memcache_bytes() -> u64 {
    512 << 20
}

fn memcache_dirty_bytes() -> u64 {
    128 << 20
}

fn max_value_size() -> u64 {
    64 << 20
}

impl DatastoreSection {
    fn validate(&self) -> Result<(), String> {
        const M: u64 = 1 << 20;
        for (key, v, lo, hi) in [
            ("memcache_bytes", self.memcache_bytes, M, 1 << 40),
            (
                "memcache_dirty_bytes",
                self.memcache_dirty_bytes,
                M,
                1 << 40,
            ),
            ("max_value_size", self.max_value_size, 64 << 10, 1 << 30),
            (
                "filestore_buffer_bytes",
                self.filestore_buffer_bytes,
                16 * M,
                1 << 40,
            ),
            ("volume_latency_ms", self.volume_latency_ms, 0, 10_000),
            (
                "events_retention_days",
                self.events_retention_days,
                0,
                100_000,
            ),
        ] {
            if v < lo || v > hi {
                return Err(format!(
                    "Datastore.{key}: {v} is out of range (use {lo} to {hi})"
                ));
            }
        }
        if self.max_value_size > self.memcache_dirty_bytes {
            return Err(format!(
                "Datastore.max_value_size: {} must not exceed memcache_dirty_bytes ({})",
                self.max_value_size, self.memcache_dirty_bytes
            ));
        }
        Ok(())
    }
}

fn master_impl() -> String {
    MASTER_IMPLEMENTATION.to_owned()
}

fn minion_impl() -> String {
    MINION_IMPLEMENTATION.to_owned()
}

/// `CA`: the deployment CA. Keep the server config private: it holds this key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    /// The CA certificate (PEM).
    pub certificate: String,
    /// The CA private key (PEM).
    pub private_key: String,
}

/// The client config (`client.config.yaml`): only the `Client` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// What the agent needs.
    #[serde(rename = "Client")]
    pub client: ClientSection,
}

/// An API user's config (`talon config api-client`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClientConfig {
    /// The user's name (the certificate's CN).
    pub name: String,
    /// The deployment CA (PEM), to verify the master.
    pub ca_certificate: String,
    /// The user's certificate (PEM).
    pub client_cert: String,
    /// The user's private key (PEM).
    pub client_private_key: String,
    /// `host:port` of the master's API.
    pub api_connection_string: String,
}

/// A configuration problem, naming the file and what in it is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file concerned, if any.
    pub path: Option<PathBuf>,
    /// What is wrong, naming the key.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn in_file(path: &Path) -> impl Fn(String) -> ConfigError + '_ {
    move |message| ConfigError {
        path: Some(path.to_owned()),
        message,
    }
}

/// Reads and parses a YAML file into `T`, naming the file and the offending key on error.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let e = in_file(path);
    let text = std::fs::read_to_string(path).map_err(|err| e(format!("cannot read: {err}")))?;
    parse_yaml(&text).map_err(e)
}

/// Parses YAML text into `T`; the error names the offending key, line and column.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_yaml_ng::from_str(text).map_err(|err| err.to_string())
}

/// `value` as YAML text.
pub fn to_yaml<T: Serialize>(value: &T) -> Result<String, String> {
    serde_yaml_ng::to_string(value).map_err(|err| format!("cannot encode: {err}"))
}

/// Writes `value` as YAML to `path` atomically (temp file, fsync, rename), readable by the owner only.
pub fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<(), ConfigError> {
    let e = in_file(path);
    let text = to_yaml(value).map_err(&e)?;
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o600)
        .map_err(|err| e(format!("cannot write: {err}")))
}

fn check_port(key: &str, port: u16) -> Result<(), String> {
    if port == 0 {
        return Err(format!("{key}: 0 is not a usable port (1..=65535)"));
    }
    Ok(())
}

fn check_nonempty(key: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{key} must not be empty"));
    }
    Ok(())
}

fn check_pem(key: &str, value: &str, kind: &str) -> Result<(), String> {
    if !value.contains(&format!("-----BEGIN {kind}")) {
        return Err(format!("{key} is not a PEM {}", kind.to_lowercase()));
    }
    Ok(())
}

impl ServerConfig {
    /// Loads and validates a server config.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let e = in_file(path);
        let text = std::fs::read_to_string(path).map_err(|err| e(format!("cannot read: {err}")))?;
        Self::parse(&text).map_err(e)
    }

    /// Parses and validates a server config's text (what [`ServerConfig::load`] does after reading).
    pub fn parse(text: &str) -> Result<ServerConfig, String> {
        let c: ServerConfig = parse_yaml(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values serde cannot: ports, required text, PEM blocks, implementations, clashes.
    pub fn validate(&self) -> Result<(), String> {
        check_port("API.bind_port", self.api.bind_port)?;
        check_port("GUI.bind_port", self.gui.bind_port)?;
        if self.gui.certificate.is_empty() != self.gui.private_key.is_empty() {
            return Err(
                "GUI.certificate and GUI.private_key: set both (or neither, for the frontend certificate)"
                    .into(),
            );
        }
        check_port("Frontend.bind_port", self.frontend.bind_port)?;
        check_nonempty("API.hostname", &self.api.hostname)?;
        check_nonempty("Frontend.hostname", &self.frontend.hostname)?;
        check_nonempty("Client.nonce", &self.client.nonce)?;
        self.frontend.resources.validate()?;
        self.datastore.validate()?;
        let message = self.frontend.resources.max_message_size;
        if self.datastore.filestore_buffer_bytes < 2 * message {
            return Err(format!(
                "Datastore.filestore_buffer_bytes: {} must be at least twice \
                 Frontend.resources.max_message_size ({message})",
                self.datastore.filestore_buffer_bytes
            ));
        }
        check_pem(
            "Frontend.certificate",
            &self.frontend.certificate,
            "CERTIFICATE",
        )?;
        check_pem(
            "Frontend.private_key",
            &self.frontend.private_key,
            "PRIVATE KEY",
        )?;
        check_pem("CA.certificate", &self.ca.certificate, "CERTIFICATE")?;
        check_pem("CA.private_key", &self.ca.private_key, "PRIVATE KEY")?;
        check_pem(
            "Client.ca_certificate",
            &self.client.ca_certificate,
            "CERTIFICATE",
        )?;
        if self.client.server_urls.is_empty() {
            return Err("Client.server_urls must list at least one frontend".into());
        }
        if let Some(u) = self
            .client
            .server_urls
            .iter()
            .find(|u| !u.starts_with("https://"))
        {
            return Err(format!(
                "Client.server_urls: {u:?} must start with https://"
            ));
        }
        if self.datastore.master_implementation != MASTER_IMPLEMENTATION {
            return Err(format!(
                "Datastore.master_implementation: {:?} is unknown (use {MASTER_IMPLEMENTATION})",
                self.datastore.master_implementation
            ));
        }
        if self.datastore.minion_implementation != MINION_IMPLEMENTATION {
            return Err(format!(
                "Datastore.minion_implementation: {:?} is unknown (use {MINION_IMPLEMENTATION})",
                self.datastore.minion_implementation
            ));
        }
        for (key, p) in [
            ("Datastore.location", &self.datastore.location),
            (
                "Datastore.filestore_directory",
                &self.datastore.filestore_directory,
            ),
        ] {
            if !p.is_absolute() {
                return Err(format!(
                    "{key}: {} must be an absolute path (the same mount on every node)",
                    p.display()
                ));
            }
        }
        check_nonempty("Monitoring.bind_address", &self.monitoring.bind_address)?;
        let mut master_ports = vec![
            ("Frontend.bind_port", self.frontend.bind_port),
            ("API.bind_port", self.api.bind_port),
            ("GUI.bind_port", self.gui.bind_port),
        ];
        if self.monitoring.bind_port != 0 {
            master_ports.push(("Monitoring.bind_port", self.monitoring.bind_port));
        }
        for (i, (k1, p1)) in master_ports.iter().enumerate() {
            if let Some((k2, _)) = master_ports[i + 1..].iter().find(|(_, p2)| p2 == p1) {
                return Err(format!(
                    "{k1} and {k2} are both {p1}: the master needs distinct ports"
                ));
            }
        }
        for (i, x) in self.extra_frontends.iter().enumerate() {
            let key = format!("ExtraFrontends[{i}]");
            check_port(&format!("{key}.bind_port"), x.bind_port)?;
            check_nonempty(&format!("{key}.hostname"), &x.hostname)?;
            if x.hostname == self.frontend.hostname
                && master_ports.iter().any(|(_, p)| *p == x.bind_port)
            {
                return Err(format!(
                    "{key}: {}:{} clashes with a master port",
                    x.hostname, x.bind_port
                ));
            }
            if self.extra_frontends[..i]
                .iter()
                .any(|y| y.node_name() == x.node_name())
            {
                return Err(format!("{key}: {} is listed twice", x.node_name()));
            }
        }
        Ok(())
    }

    /// The master's node name: `<Frontend.hostname>-<Frontend.bind_port>`.
    pub fn master_node_name(&self) -> String {
        format!("{}-{}", self.frontend.hostname, self.frontend.bind_port)
    }

    /// Every frontend's URL, master first.
    pub fn server_urls(&self) -> Vec<String> {
        std::iter::once((&self.frontend.hostname, self.frontend.bind_port))
            .chain(
                self.extra_frontends
                    .iter()
                    .map(|x| (&x.hostname, x.bind_port)),
            )
            .map(|(h, p)| format!("https://{}/", host_port(h, p)))
            .collect()
    }

    /// Every frontend's hostname, deduplicated, master first (the frontend certificate's SANs).
    pub fn frontend_hostnames(&self) -> Vec<String> {
        let mut names = vec![self.frontend.hostname.clone()];
        for x in &self.extra_frontends {
            if !names.contains(&x.hostname) {
                names.push(x.hostname.clone());
            }
        }
        names
    }

    /// The signing CA: `CA.private_key` and the first certificate of `CA.certificate` (during a
    /// rotation the bundle also holds the previous CA, still trusted, no longer signing).
    fn ca_pem(&self) -> Pem {
        Pem {
            certificate: pem_certificates(&self.ca.certificate)
                .into_iter()
                .next()
                .unwrap_or_default(),
            private_key: self.ca.private_key.clone(),
        }
    }

    /// The client config derived from this server config.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            client: self.client.clone(),
        }
    }
}

/// The address a node listens on for a public name: a loopback name (`localhost`, `127.x.y.z`,
/// `::1`) listens only there — a deployment reached over loopback is not exposed to the network —
/// anything else on every interface.
pub fn bind_address_for(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => host.to_owned(),
        _ if host.eq_ignore_ascii_case("localhost") => "127.0.0.1".to_owned(),
        _ => "0.0.0.0".to_owned(),
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Options of `talon config generate`.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// The master's public name (or IP).
    pub hostname: String,
    /// Client-facing port.
    pub frontend_port: u16,
    /// API port.
    pub api_port: u16,
    /// GUI port.
    pub gui_port: u16,
    /// Every node's metrics port (0: none).
    pub monitoring_port: u16,
    /// The shared volume's mount point.
    pub datastore: PathBuf,
    /// The CA's key type (the frontend and API certificates take it).
    pub key_type: pki::KeyType,
}

/// Creates a single-server deployment's server config (CA, frontend certificate, nonce).
pub fn generate(
    opts: &GenerateOptions,
    clock: &dyn Clock,
    entropy: &dyn Entropy,
) -> Result<ServerConfig, ConfigError> {
    let plain = |message: String| ConfigError {
        path: None,
        message,
    };
    check_nonempty("--hostname", &opts.hostname).map_err(plain)?;
    let now = clock.now();
    let ca = pki::new_ca(now, opts.key_type).map_err(|e| plain(e.to_string()))?;
    let fe = pki::issue_frontend(&ca, std::slice::from_ref(&opts.hostname), now)
        .map_err(|e| plain(format!("--hostname {:?}: {e}", opts.hostname)))?;
    let mut nonce = [0u8; 16];
    entropy.fill(&mut nonce);
    let mut c = ServerConfig {
        client: ClientSection {
            server_urls: vec![],
            ca_certificate: ca.certificate.clone(),
            nonce: hex(&nonce),
            events_buffer_bytes: events_buffer_bytes(),
        },
        api: ApiSection {
            hostname: opts.hostname.clone(),
            bind_address: "127.0.0.1".into(),
            bind_port: opts.api_port,
        },
        gui: GuiSection {
            bind_address: "127.0.0.1".into(),
            bind_port: opts.gui_port,
            certificate: String::new(),
            private_key: String::new(),
        },
        monitoring: MonitoringSection {
            bind_address: loopback(),
            bind_port: opts.monitoring_port,
        },
        frontend: FrontendSection {
            hostname: opts.hostname.clone(),
            bind_address: bind_address_for(&opts.hostname),
            bind_port: opts.frontend_port,
            certificate: fe.certificate,
            private_key: fe.private_key,
            resources: Resources::default(),
        },
        extra_frontends: vec![],
        datastore: DatastoreSection {
            // Metadata and bulk data apart: listing metadata (the master's start lists `clients/`)
            // never walks the filestore's per-flow directories, which a network volume charges a
            // round trip each.
            location: opts.datastore.join(METADATA_SUBDIR),
            filestore_directory: opts.datastore.join(FILESTORE_SUBDIR),
            master_implementation: master_impl(),
            minion_implementation: minion_impl(),
            memcache_bytes: memcache_bytes(),
            memcache_dirty_bytes: memcache_dirty_bytes(),
            max_value_size: max_value_size(),
            filestore_buffer_bytes: filestore_buffer_bytes(),
            volume_latency_ms: 0,
            events_retention_days: 0,
        },
        ca: CaSection {
            certificate: ca.certificate,
            private_key: ca.private_key,
        },
    };
    c.client.server_urls = c.server_urls();
    c.validate().map_err(plain)?;
    Ok(c)
}

/// Parses `HOST:PORT` (IPv6 as `[addr]:PORT`).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("--add {s:?}: expected HOST:PORT, e.g. minion1.example.com:8100");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// What `config frontend --add` changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendChange {
    /// Minions added.
    pub added: Vec<String>,
    /// Minions that were already configured.
    pub already_present: Vec<String>,
}

/// Derives the multi-frontend config: adds minions, opens the API to them, lists every frontend for
/// clients, and re-issues the frontend certificate for every frontend hostname.
pub fn add_frontends(
    c: &mut ServerConfig,
    adds: &[(String, u16)],
    clock: &dyn Clock,
) -> Result<FrontendChange, String> {
    let mut change = FrontendChange {
        added: vec![],
        already_present: vec![],
    };
    for (host, port) in adds {
        let x = ExtraFrontend {
            hostname: host.clone(),
            bind_address: bind_address_for(host),
            bind_port: *port,
        };
        if c.extra_frontends.contains(&x) {
            change.already_present.push(x.node_name());
            continue;
        }
        change.added.push(x.node_name());
        c.extra_frontends.push(x);
    }
    // Minions must reach the API: open it, unless the whole deployment is on loopback.
    let all_loopback = std::iter::once(&c.api.hostname)
        .chain(c.extra_frontends.iter().map(|x| &x.hostname))
        .all(|h| bind_address_for(h) != "0.0.0.0");
    c.api.bind_address = if all_loopback {
        bind_address_for(&c.api.hostname)
    } else {
        "0.0.0.0".into()
    };
    c.datastore.master_implementation = master_impl();
    c.datastore.minion_implementation = minion_impl();
    c.client.server_urls = c.server_urls();
    c.validate()?;
    let fe = pki::issue_frontend(&c.ca_pem(), &c.frontend_hostnames(), clock.now())
        .map_err(|e| e.to_string())?;
    c.frontend.certificate = fe.certificate;
    c.frontend.private_key = fe.private_key;
    Ok(change)
}

/// The PEM certificate blocks of a bundle, in order.
pub fn pem_certificates(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|b| b.contains(END))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

/// A step of `talon config rotate-ca`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaRotation {
    /// A new CA, with keys of this type, signs from now on; the old one stays trusted (first in
    /// every bundle: the new). The frontend and API certificates it issues take its key type.
    Begin(pki::KeyType),
    /// The frontend certificate is reissued by the new CA and the old CA is dropped: whatever it
    /// signed (old API certificates, an old frontend certificate) is refused from then on.
    Finish,
}

/// Rotates the deployment CA in two steps (see `docs/security.md`). Between them, every node gets
/// the new server config and every agent the new client config: agents keep trusting the old CA
/// (which still signs the frontend certificate) and learn the new one.
pub fn rotate_ca(c: &mut ServerConfig, step: CaRotation, clock: &dyn Clock) -> Result<(), String> {
    let trusted = pem_certificates(&c.ca.certificate);
    match step {
        CaRotation::Begin(key_type) => {
            if trusted.len() > 1 {
                return Err(
                    "a CA rotation is already in progress (CA.certificate holds two CAs): \
                     finish it with `config rotate-ca --finish`"
                        .into(),
                );
            }
            let new = pki::new_ca(clock.now(), key_type).map_err(|e| e.to_string())?;
            let bundle = format!("{}{}", new.certificate, trusted.concat());
            c.ca.certificate = bundle.clone();
            c.ca.private_key = new.private_key;
            c.client.ca_certificate = bundle;
        }
        CaRotation::Finish => {
            if trusted.len() < 2 {
                return Err(
                    "no CA rotation is in progress: begin one with `config rotate-ca`".into(),
                );
            }
            let new = trusted[0].clone();
            c.ca.certificate = new.clone();
            c.client.ca_certificate = new;
            let fe = pki::issue_frontend(&c.ca_pem(), &c.frontend_hostnames(), clock.now())
                .map_err(|e| e.to_string())?;
            c.frontend.certificate = fe.certificate;
            c.frontend.private_key = fe.private_key;
        }
    }
    c.validate()
}

/// Checks an API user name: 1..=64 of `[A-Za-z0-9_.@-]`.
pub fn check_api_user(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err(format!(
            "--name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ . @ -"
        ));
    }
    Ok(())
}

/// Issues an API user's certificate (with the administrator role) and config.
pub fn api_client(
    c: &ServerConfig,
    name: &str,
    clock: &dyn Clock,
) -> Result<ApiClientConfig, String> {
    api_user(c, name, pki::Access::Administrator, clock)
}

/// Issues an API user's certificate carrying `access`, and its config.
pub fn api_user(
    c: &ServerConfig,
    name: &str,
    access: pki::Access,
    clock: &dyn Clock,
) -> Result<ApiClientConfig, String> {
    check_api_user(name)?;
    let pem =
        pki::issue_api_user(&c.ca_pem(), name, access, clock.now()).map_err(|e| e.to_string())?;
    Ok(ApiClientConfig {
        name: name.to_owned(),
        ca_certificate: c.ca.certificate.clone(),
        client_cert: pem.certificate,
        client_private_key: pem.private_key,
        api_connection_string: host_port(&c.api.hostname, c.api.bind_port),
    })
}

#[cfg(test)]
mod tests;
