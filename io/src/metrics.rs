//! Prometheus metrics (docs/operations.md, "Metrics"): one registry per process — a process is one
//! node — filled where things happen (connections, client messages, the shared volume, the
//! write-behind buffers, the replication link, the node actor) and served as Prometheus text on
//! `Monitoring.bind_address:bind_port` ([`serve`]).
//!
//! Metrics only observe: nothing reads them back to decide anything, so the simulator, which runs
//! the same code, stays deterministic whatever they hold. Every label takes values from a fixed set
//! (operation names, refusal reasons, the API's methods, the deployment's minions), so the number
//! of series is bounded whatever clients send.

use crate::clock::Clock;
use crate::net::{BoxIo, Listener};
use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use talon_core::Monotonic;

/// Scrapes served at once; more wait for the accept loop.
pub const CONNECTIONS_MAX: usize = 16;
/// A scrape's request headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `Monitoring.bind_port` (Velociraptor's).
pub const DEFAULT_PORT: u16 = 8003;

/// Latency buckets (seconds) for operations that cost from a local fsync (~1 ms) to a slow
/// network volume (40–60 ms per primitive, seconds for a large batch).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric a node exports. Names follow Prometheus conventions: counters end in `_total`,
/// durations are `_seconds`, sizes `_bytes`.
pub struct Metrics {
    registry: Registry,
    /// `talon_node_info{node,role,version}` = 1.
    pub node_info: IntGaugeVec,
    /// Clients with an open stream to this node.
    pub clients_connected: IntGauge,
    /// TLS connections accepted, by listener (`frontend`, `api`).
    pub connections_accepted: IntCounterVec,
    /// Connections refused, by listener and reason.
    pub connections_refused: IntCounterVec,
    /// Client streams that passed their Hello and were taken by the node.
    pub client_streams_accepted: IntCounter,
    /// Messages received from clients, by kind.
    pub client_messages: IntCounterVec,
    /// Bytes of flow messages and event batches received from clients.
    pub client_message_bytes: IntCounter,
    /// Result rows received (a row a client sends again counts again).
    pub rows_received: IntCounter,
    /// Bytes of uploaded files received.
    pub upload_bytes_received: IntCounter,
    /// Flows this node is receiving messages for.
    pub flows_in_flight: IntGauge,
    /// Hunts running (the master).
    pub hunts_running: IntGauge,
    /// API calls by gRPC method and status code (the master's API port).
    pub api_requests: IntCounterVec,
    /// API call latency to the response's headers (the whole call for unary ones), by method.
    pub api_request_seconds: HistogramVec,
    /// Shared-volume operations' latency, by store (`datastore`, `filestore`) and operation.
    pub volume_seconds: HistogramVec,
    /// Shared-volume operations that failed, by store and operation.
    pub volume_errors: IntCounterVec,
    /// Bytes written to the shared volume, by store.
    pub volume_written_bytes: IntCounterVec,
    /// Bytes journalled on local disk and not yet on the shared volume, by buffer (`datastore`:
    /// the master's metadata; `filestore`: this node's write-behind buffer).
    pub writebehind_bytes: IntGaugeVec,
    /// Age of the oldest write not yet on the shared volume, by buffer (0 when none waits).
    pub writebehind_oldest_seconds: GaugeVec,
    /// (Minion) replication events not yet applied by the master.
    pub replication_backlog_events: IntGauge,
    /// (Minion) age of the oldest event the master has not applied (0 when none waits).
    pub replication_lag_seconds: Gauge,
    /// Replication streams up: on a minion its link to the master (label: itself); on the master
    /// one per minion.
    pub replication_connected: IntGaugeVec,
    /// (Master) replication events received, by minion (a resent event counts again).
    pub replication_received: IntCounterVec,
    process: ProcessMetrics,
    /// When the oldest write of each buffer not yet on the volume was made (monotonic ms + 1; 0:
    /// none), by [`BUFFERS`] index: its age is computed at each scrape, so it grows while the
    /// buffer's task waits.
    writebehind_since: [AtomicU64; 2],
    /// When the oldest event the master has not applied was accepted (Unix ms; 0: none).
    replication_since: AtomicU64,
}

/// The write-behind buffers, as `buffer` label values.
pub const BUFFERS: [&str; 2] = ["datastore", "filestore"];

/// The process's own figures, read from `/proc` at each scrape (the names every Prometheus client
/// library uses, so stock dashboards work).
struct ProcessMetrics {
    resident: IntGauge,
    virtual_bytes: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    threads: IntGauge,
    start_time: Gauge,
    cpu: Counter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn histogram(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
}

impl Metrics {
    #[allow(clippy::too_many_lines)]
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        Ok(Metrics {
            node_info: reg!(IntGaugeVec::new(
                opts(
                    "talon_node_info",
                    "This node: its name, role and version (always 1)."
                ),
                &["node", "role", "version"]
            )?),
            clients_connected: reg!(IntGauge::with_opts(opts(
                "talon_clients_connected",
                "Clients with an open stream to this node (Velociraptor: client_comms_current_connections)."
            ))?),
            connections_accepted: reg!(IntCounterVec::new(
                opts(
                    "talon_connections_accepted_total",
                    "TLS connections accepted (handshake done, certificate valid), by listener."
                ),
                &["listener"]
            )?),
            connections_refused: reg!(IntCounterVec::new(
                opts(
                    "talon_connections_refused_total",
                    "Connections and client streams refused, by listener and reason."
                ),
                &["listener", "reason"]
            )?),
            client_streams_accepted: reg!(IntCounter::with_opts(opts(
                "talon_client_streams_accepted_total",
                "Client streams that passed their Hello and were taken by the node."
            ))?),
            client_messages: reg!(IntCounterVec::new(
                opts(
                    "talon_client_messages_received_total",
                    "Messages received from clients, by kind."
                ),
                &["kind"]
            )?),
            client_message_bytes: reg!(IntCounter::with_opts(opts(
                "talon_client_received_bytes_total",
                "Bytes of flow messages and event batches received from clients."
            ))?),
            rows_received: reg!(IntCounter::with_opts(opts(
                "talon_rows_received_total",
                "Result rows received from clients (a row sent again counts again)."
            ))?),
            upload_bytes_received: reg!(IntCounter::with_opts(opts(
                "talon_upload_received_bytes_total",
                "Bytes of uploaded files received from clients."
            ))?),
            flows_in_flight: reg!(IntGauge::with_opts(opts(
                "talon_flows_in_flight",
                "Flows this node is receiving messages for."
            ))?),
            hunts_running: reg!(IntGauge::with_opts(opts(
                "talon_hunts_running",
                "Hunts running (exported by the master)."
            ))?),
            api_requests: reg!(IntCounterVec::new(
                opts(
                    "talon_api_requests_total",
                    "API calls on the master's API port, by gRPC method and status code."
                ),
                &["method", "code"]
            )?),
            api_request_seconds: reg!(HistogramVec::new(
                histogram(
                    "talon_api_request_duration_seconds",
                    "API call latency to the response's headers (a unary call's whole time), by method."
                ),
                &["method"]
            )?),
            volume_seconds: reg!(HistogramVec::new(
                histogram(
                    "talon_volume_operation_duration_seconds",
                    "Shared-volume operation latency, by store (datastore, filestore) and operation."
                ),
                &["store", "op"]
            )?),
            volume_errors: reg!(IntCounterVec::new(
                opts(
                    "talon_volume_operation_errors_total",
                    "Shared-volume operations that failed, by store and operation."
                ),
                &["store", "op"]
            )?),
            volume_written_bytes: reg!(IntCounterVec::new(
                opts(
                    "talon_volume_written_bytes_total",
                    "Bytes written to the shared volume, by store."
                ),
                &["store"]
            )?),
            writebehind_bytes: reg!(IntGaugeVec::new(
                opts(
                    "talon_writebehind_backlog_bytes",
                    "Bytes journalled on local disk and not yet on the shared volume, by buffer."
                ),
                &["buffer"]
            )?),
            writebehind_oldest_seconds: reg!(GaugeVec::new(
                opts(
                    "talon_writebehind_oldest_seconds",
                    "Age of the oldest write not yet on the shared volume, by buffer (0: none)."
                ),
                &["buffer"]
            )?),
            replication_backlog_events: reg!(IntGauge::with_opts(opts(
                "talon_replication_backlog_events",
                "(Minion) replication events the master has not applied yet."
            ))?),
            replication_lag_seconds: reg!(Gauge::with_opts(opts(
                "talon_replication_lag_seconds",
                "(Minion) age of the oldest event the master has not applied (0: none)."
            ))?),
            replication_connected: reg!(IntGaugeVec::new(
                opts(
                    "talon_replication_connected",
                    "Replication streams up (1) or down (0), by minion."
                ),
                &["minion"]
            )?),
            replication_received: reg!(IntCounterVec::new(
                opts(
                    "talon_replication_received_events_total",
                    "(Master) replication events received, by minion (a resent event counts again)."
                ),
                &["minion"]
            )?),
            process: ProcessMetrics {
                resident: reg!(IntGauge::with_opts(opts(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes."
                ))?),
                virtual_bytes: reg!(IntGauge::with_opts(opts(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes."
                ))?),
                open_fds: reg!(IntGauge::with_opts(opts(
                    "process_open_fds",
                    "Number of open file descriptors."
                ))?),
                max_fds: reg!(IntGauge::with_opts(opts(
                    "process_max_fds",
                    "Maximum number of open file descriptors."
                ))?),
                threads: reg!(IntGauge::with_opts(opts(
                    "process_threads",
                    "Number of OS threads in the process."
                ))?),
                start_time: reg!(Gauge::with_opts(opts(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds."
                ))?),
                cpu: reg!(Counter::with_opts(opts(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds."
                ))?),
            },
            writebehind_since: [AtomicU64::new(0), AtomicU64::new(0)],
            replication_since: AtomicU64::new(0),
            registry,
        })
    }

    /// A buffer's backlog: its bytes, and when its oldest write was made.
    pub fn set_writebehind(&self, buffer: &'static str, bytes: u64, oldest: Option<Monotonic>) {
        self.writebehind_bytes
            .with_label_values(&[buffer])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if let Some(i) = BUFFERS.iter().position(|b| *b == buffer) {
            self.writebehind_since[i].store(oldest.map_or(0, |t| t.0 + 1), Ordering::Relaxed);
        }
    }

    /// The replication outbox's backlog: events not applied, and when the oldest was accepted.
    pub fn set_replication(&self, events: usize, oldest_unix_ms: Option<u64>) {
        self.replication_backlog_events
            .set(i64::try_from(events).unwrap_or(i64::MAX));
        self.replication_since
            .store(oldest_unix_ms.map_or(0, |t| t.max(1)), Ordering::Relaxed);
    }

    /// The ages, as of now.
    fn update_ages(&self) {
        let clock = crate::clock::SystemClock;
        let now = clock.monotonic();
        for (i, buffer) in BUFFERS.iter().enumerate() {
            let since = self.writebehind_since[i].load(Ordering::Relaxed);
            let age = if since == 0 {
                0
            } else {
                now.since_ms(Monotonic(since - 1))
            };
            self.writebehind_oldest_seconds
                .with_label_values(&[buffer])
                .set(age as f64 / 1000.0);
        }
        let since = self.replication_since.load(Ordering::Relaxed);
        let lag = if since == 0 {
            0
        } else {
            clock.now().as_ms().saturating_sub(since)
        };
        self.replication_lag_seconds.set(lag as f64 / 1000.0);
    }

    /// Says which node this process is.
    pub fn set_node(&self, node: &str, role: &str) {
        self.node_info
            .with_label_values(&[node, role, env!("CARGO_PKG_VERSION")])
            .set(1);
    }

    /// Every metric in the Prometheus text format (0.0.4), the process's figures read now.
    pub fn render(&self) -> String {
        // One scrape at a time updates the process figures (the CPU counter moves by differences).
        static SCRAPE: Mutex<()> = Mutex::new(());
        let _one = SCRAPE.lock().unwrap_or_else(|p| p.into_inner());
        self.process.update();
        self.update_ages();
        let mut out = Vec::new();
        // Encoding into memory fails only on a malformed family, which registration rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl ProcessMetrics {
    fn update(&self) {
        let Ok(me) = procfs::process::Process::myself() else {
            return;
        };
        if let Ok(stat) = me.stat() {
            let page = procfs::page_size();
            let tps = procfs::ticks_per_second() as f64;
            self.resident
                .set(i64::try_from(stat.rss.saturating_mul(page)).unwrap_or(i64::MAX));
            self.virtual_bytes
                .set(i64::try_from(stat.vsize).unwrap_or(i64::MAX));
            self.threads.set(stat.num_threads);
            let cpu = (stat.utime + stat.stime) as f64 / tps;
            let seen = self.cpu.get();
            if cpu > seen {
                self.cpu.inc_by(cpu - seen);
            }
            if let Ok(boot) = procfs::boot_time_secs() {
                self.start_time
                    .set(boot as f64 + stat.starttime as f64 / tps);
            }
        }
        if let Ok(n) = me.fd_count() {
            self.open_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Ok(limits) = me.limits()
            && let procfs::process::LimitValue::Value(n) = limits.max_open_files.soft_limit
        {
            self.max_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
        // Registration fails only on a duplicate or malformed name: a bug the first test finds.
        Metrics::new().expect("the metrics' names are valid and distinct")
    });
    &METRICS
}

/// Times an operation for a histogram: seconds since [`started`] on the monotonic clock.
pub fn started() -> u64 {
    crate::clock::SystemClock.micros()
}

/// Seconds since `start` (from [`started`]).
pub fn seconds_since(start: u64) -> f64 {
    crate::clock::SystemClock.micros().saturating_sub(start) as f64 / 1e6
}

/// The reasons connections are refused at the TLS layer, as `reason` label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Beyond `connections_per_second`.
    RateLimit,
    /// Beyond the connections one address may hold.
    PerAddress,
    /// Beyond the connections the listener holds (kept below the open-file limit).
    ListenerFull,
    /// The TLS handshake failed (a certificate refused either way, a protocol error).
    Handshake,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// No client certificate.
    NoCertificate,
    /// A certificate this server cannot use (no client id, an unknown role).
    BadCertificate,
    /// No stream opened within the hello timeout after the handshake.
    NoStream,
}

impl Refusal {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::RateLimit => "rate_limit",
            Refusal::PerAddress => "per_address_limit",
            Refusal::ListenerFull => "listener_full",
            Refusal::Handshake => "handshake_failed",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NoCertificate => "no_certificate",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::NoStream => "no_stream",
        }
    }
}

/// Counts a refused connection on `listener`.
pub fn refused(listener: &str, why: &str) {
    metrics()
        .connections_refused
        .with_label_values(&[listener, why])
        .inc();
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// One scrape: `GET /metrics`; `/` says where the metrics are.
fn handle(req: &http::Request<hyper::body::Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics().render(),
        ),
        (&Method::GET | &Method::HEAD, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "Talon node metrics: GET /metrics (Prometheus text format)\n",
        ),
        (&Method::GET | &Method::HEAD, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n",
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n",
        ),
    }
}

/// Serves `GET /metrics` over plain HTTP/1.1 on `listener` until `stop` changes. At most
/// [`CONNECTIONS_MAX`] connections at once; headers within [`HEADER_TIMEOUT`].
pub async fn serve(listener: Box<dyn Listener>, stop: tokio::sync::watch::Receiver<bool>) {
    let accept = |tcp: BoxIo, addr, stop| {
        let service = hyper::service::service_fn(|req| async move {
            Ok::<_, std::convert::Infallible>(handle(&req))
        });
        crate::net::http::serve_connection(
            TokioIo::new(tcp),
            service,
            HEADER_TIMEOUT,
            stop,
            ("metrics", addr),
        )
    };
    crate::net::http::accept_bounded(listener, CONNECTIONS_MAX, stop, "metrics", accept).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family has help and a type, counters end in `_total`, and a labelled series shows
    /// once it is touched.
    #[test]
    fn the_text_names_every_family_with_help_and_type() {
        let m = metrics();
        m.rows_received.inc_by(3);
        m.volume_seconds
            .with_label_values(&["filestore", "append"])
            .observe(0.04);
        let text = m.render();
        for family in [
            "talon_rows_received_total",
            "talon_volume_operation_duration_seconds",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{family}: {text}"
            );
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        assert!(text.contains(
            "talon_volume_operation_duration_seconds_bucket{op=\"append\",store=\"filestore\",le=\"0.05\"}"
        ));
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut w = line.split(' ').skip(2);
            let (name, kind) = (w.next().unwrap(), w.next().unwrap());
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
        }
        // The process's figures are read, not left at zero.
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap();
        assert!(rss.parse::<f64>().unwrap() > 0.0, "{rss}");
    }
}
