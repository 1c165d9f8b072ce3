//! Starting a node: the master or a minion.

use crate::clock::Clock;
use crate::cluster::{ClusterService, Link, LinkOptions, MasterAddr, Meta, RemoteStore};
use crate::deploy::config::ServerConfig;
use crate::env::Env;
use crate::net::tls;
use crate::node::{ApiService, Cluster, CommsService, Node, NodeOptions};
use crate::storage::NodeStorage;
use crate::storage::datastore::{Datastore, DatastoreOptions};
use crate::storage::filestore::{Filestore, FilestoreOptions};
use crate::storage::lease::{LEASE_BEAT, Lease, LeaseJson};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use talon_core::codec::CodecLimits;
use talon_core::flows::FlowLimits;
use talon_core::registry::RegistryLimits;
use talon_proto::cluster::{
    remote_datastore_server::RemoteDatastoreServer, replication_server::ReplicationServer,
};
use talon_proto::{api::api_server::ApiServer, comms::comms_server::CommsServer};

/// How long a stopping node waits for open streams to finish.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a stopping node waits for its journals' backlog to reach the shared volume. Whatever is
/// not there by then stays in the node's local journal and is copied by the next start, so a stop
/// on a slow volume is bounded (docs/operations.md, "Stopping").
pub const STOP_FLUSH_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits up to [`STOP_FLUSH_MAX`] for `flush`; says what it left to the next start.
async fn flush_for_stop(what: &str, flush: impl Future<Output = Result<(), String>>) {
    match tokio::time::timeout(STOP_FLUSH_MAX, flush).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "{what} did not flush; the next start continues"),
        Err(_) => tracing::info!(
            "{what} still flushing after {} s; its journal keeps the rest for the next start",
            STOP_FLUSH_MAX.as_secs()
        ),
    }
}

/// Where a started node listens.
#[derive(Clone, Debug)]
pub struct Listening {
    /// The client-facing address.
    pub frontend: SocketAddr,
    /// The API address.
    pub api: SocketAddr,
    /// The GUI address (the master only).
    pub gui: Option<SocketAddr>,
    /// The metrics address (none with `Monitoring.bind_port` 0).
    pub monitoring: Option<SocketAddr>,
}

/// Binds `Monitoring.bind_address:bind_port` (none if the port is 0): a port in use fails the
/// node's start, naming `Monitoring`.
async fn bind_monitoring(
    cfg: &ServerConfig,
    net: &Arc<dyn crate::net::Net>,
) -> Result<Option<Box<dyn crate::net::Listener>>, String> {
    let m = &cfg.monitoring;
    if m.bind_port == 0 {
        return Ok(None);
    }
    let addr = crate::deploy::config::host_port(&m.bind_address, m.bind_port);
    net.bind(&addr)
        .await
        .map(Some)
        .map_err(|e| format!("Monitoring {addr}: {e}"))
}

/// Serves the metrics on `listener` (if any) until `stop` changes or its sender is dropped;
/// returns where.
fn serve_monitoring(
    listener: Option<Box<dyn crate::net::Listener>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, String> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(crate::metrics::serve(listener, stop));
    Ok(Some(addr))
}

/// The services of the master's API port, dispatched on the gRPC path (tonic's router would pull in
/// axum for three fixed prefixes).
#[derive(Clone)]
struct ApiPort {
    api: ApiServer<ApiService>,
    replication: ReplicationServer<ClusterService>,
    datastore: RemoteDatastoreServer<ClusterService>,
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl tower::Service<HttpRequest> for ApiPort {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The generated servers are always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let path = req.uri().path();
        let method = path.rsplit('/').next().unwrap_or_default().to_owned();
        let call = if path.starts_with("/talon.api.Api/") {
            self.api.call(req)
        } else if path.starts_with("/talon.cluster.Replication/") {
            self.replication.call(req)
        } else if path.starts_with("/talon.cluster.RemoteDatastore/") {
            self.datastore.call(req)
        } else {
            let status = tonic::Status::unimplemented(format!("no service at {path}"));
            Box::pin(async move { Ok(status.into_http()) })
        };
        let start = crate::metrics::started();
        Box::pin(async move {
            let r = call.await;
            Ok(match r {
                Ok(resp) => count_api_call(method, resp, crate::metrics::seconds_since(start)),
                Err(never) => match never {},
            })
        })
    }
}

/// Counts an API-port call in the metrics (docs/operations.md, "Metrics"): its time to the
/// response's headers, and its method and final status. A call refused or failed at once carries
/// its status in the headers; any other call's status comes in the trailers after its body (a
/// stream that fails midway, too), so the body is wrapped to read them. A body dropped before its
/// end (the caller went away) counts as `Cancelled`. An unknown method is `unknown` (12,
/// UNIMPLEMENTED), so callers cannot add series.
fn count_api_call(method: String, resp: HttpResponse, seconds: f64) -> HttpResponse {
    let code = grpc_status(resp.headers());
    let method = if code == Some(tonic::Code::Unimplemented) {
        "unknown".to_owned()
    } else {
        method
    };
    crate::metrics::metrics()
        .api_request_seconds
        .with_label_values(&[method.as_str()])
        .observe(seconds);
    match code {
        Some(code) => {
            count_api_status(&method, code);
            resp
        }
        None => resp.map(|body| {
            tonic::body::Body::new(StatusAtEnd {
                body,
                method: Some(method),
            })
        }),
    }
}

/// The `grpc-status` among `headers` (or trailers), if any.
fn grpc_status(headers: &tonic::codegen::http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

fn count_api_status(method: &str, code: tonic::Code) {
    crate::metrics::metrics()
        .api_requests
        .with_label_values(&[method, &format!("{code:?}")])
        .inc();
}

/// A response body that counts its call once: with the status its trailers carry, `Unknown` if it
/// ends without one or fails, `Cancelled` if dropped before its end.
struct StatusAtEnd {
    body: tonic::body::Body,
    /// The method, until the call is counted.
    method: Option<String>,
}

impl StatusAtEnd {
    fn count(&mut self, code: tonic::Code) {
        if let Some(method) = self.method.take() {
            count_api_status(&method, code);
        }
    }
}

impl hyper::body::Body for StatusAtEnd {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.count(grpc_status(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            std::task::Poll::Ready(Some(Err(_))) | std::task::Poll::Ready(None) => {
                self.count(tonic::Code::Unknown)
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for StatusAtEnd {
    fn drop(&mut self) {
        let code = if hyper::body::Body::is_end_stream(&self.body) {
            tonic::Code::Unknown // Ended without trailers: not gRPC's way.
        } else {
            tonic::Code::Cancelled
        };
        self.count(code);
    }
}

type StorageTask = tokio::task::JoinHandle<std::io::Result<()>>;

/// Recovers the node's filestore write-behind buffer from its local disk and starts copying it.
fn open_filestore(
    cfg: &ServerConfig,
    buffer: Box<dyn crate::storage::local::LocalDisk>,
    volume: crate::storage::volume::SharedVolume,
    clock: &Arc<dyn Clock>,
    entropy: &dyn crate::clock::Entropy,
    node: &str,
    local_name: &str,
) -> Result<(Filestore, StorageTask), String> {
    let mut r = [0u8; 4];
    entropy.fill(&mut r);
    // Unique to this start: segment files are never shared by two writers.
    let writer = format!(
        "{}-{}-{}",
        talon_core::paths::safe_component(node),
        clock.now().as_ms(),
        crate::clock::hex(&r)
    );
    let opts = FilestoreOptions {
        buffer_bytes: cfg.datastore.filestore_buffer_bytes,
        message_bytes_max: cfg.frontend.resources.max_message_size,
        writer,
        flows_remembered: usize::try_from(cfg.frontend.resources.max_concurrent_flows)
            .unwrap_or(usize::MAX)
            .saturating_mul(2),
    };
    let (fs, task, report) = Filestore::open(buffer, volume, clock.clone(), &opts)
        .map_err(|e| format!("filestore buffer in {local_name}: {e}"))?;
    tracing::info!(
        replayed = report.replayed,
        torn_bytes = report.torn_bytes,
        dropped = report.dropped,
        "filestore buffer recovered"
    );
    Ok((fs, task))
}

/// How long a frontend keeps clients waiting for its segment files before it serves them anyway
/// (the first flush then makes them, retrying until the volume takes them).
const SEGMENTS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until the node's segment files are made or [`SEGMENTS_WAIT`] has passed, logging which.
async fn segments_ready(filestore: &Filestore) {
    let t0 = tokio::time::Instant::now();
    match filestore.prepared(SEGMENTS_WAIT).await {
        Some(true) => {
            let ms = t0.elapsed().as_millis() as u64;
            tracing::debug!(ms, "segment files made; accepting clients");
        }
        // Logged where it failed; the first flush retries.
        Some(false) => {}
        None => tracing::warn!(
            waited_s = SEGMENTS_WAIT.as_secs(),
            "the filestore volume has not taken this node's segment files yet; accepting clients anyway (their results stay in the local buffer until it does)"
        ),
    }
}

/// Serves the client port once the node's segment files exist (clients wait in the listen backlog
/// until the node can store what they send; see [`segments_ready`]), until `stop` turns true.
fn serve_clients(
    cfg: &ServerConfig,
    filestore: Filestore,
    comms: CommsServer<CommsService>,
    (listener, tls_config, admission): (
        Box<dyn crate::net::Listener>,
        Arc<rustls::ServerConfig>,
        tls::Admission,
    ),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl Future<Output = Result<(), tonic::transport::Error>> {
    let handshakes = handshakes(cfg, Port::Clients);
    async move {
        segments_ready(&filestore).await;
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .serve_with_incoming_shutdown(
                comms,
                tls::incoming(listener, tls_config, handshakes, Some(admission)),
                async move {
                    let _ = stop.changed().await;
                },
            )
            .await
    }
}

/// Why a storage task ended (it only ends on failure: fail-stop).
fn stopped(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it ended".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

fn node_options(cfg: &ServerConfig, node_name: String) -> NodeOptions {
    let r = &cfg.frontend.resources;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    NodeOptions {
        node_name,
        nonce: cfg.client.nonce.clone(),
        expected_clients: n(r.expected_clients),
        codec: CodecLimits {
            message_bytes_max: n(r.max_message_size),
            rows_per_batch_max: n(r.max_rows_per_batch),
            row_bytes_max: n(r.max_row_size),
            chunk_bytes_max: n(r.max_chunk_size),
            upload_bytes_max: r.max_upload_size,
            upload_name_bytes_max: n(r.max_upload_name_length),
            ..CodecLimits::default()
        },
        flows: FlowLimits {
            flows_max: n(r.max_concurrent_flows),
            stores_in_flight_max: n(r.max_in_flight_per_flow),
            // The window a client may run ahead of the stored prefix covers its in-flight messages.
            seq_window: FlowLimits::default()
                .seq_window
                .max(4 * r.max_in_flight_per_flow),
            flow_bytes_max: r.max_flow_bytes,
            uploads_per_flow_max: r.max_uploads_per_flow,
            ..FlowLimits::default()
        },
        registry: RegistryLimits {
            clients_max: n(r.max_clients),
            enrolments_per_second: r.enrolments_per_second,
            enrolment_burst: r.enrolments_per_second.saturating_mul(60),
            ..RegistryLimits::default()
        },
        hunts: talon_core::hunts::HuntLimits::default(),
        queued_tasks_per_client_max: n(r.max_queued_tasks_per_client),
        notifications_per_second: r.notifications_per_second.max(1),
        hello_timeout: std::time::Duration::from_secs(r.hello_timeout_s),
        value_bytes_max: cfg.datastore.max_value_size,
        events_retention_days: cfg.datastore.events_retention_days,
    }
}

/// File descriptors kept free for the API port, the cluster link, the journals and the volume when
/// the client port is at its bound.
pub const FD_HEADROOM: u64 = 1024;

/// Connections the API port keeps open at once (analysts and minions: far fewer).
pub const API_OPEN_MAX: usize = 4096;

/// Which listener [`handshakes`] is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Clients,
    Api,
}

fn handshakes(cfg: &ServerConfig, port: Port) -> tls::Handshakes {
    let r = &cfg.frontend.resources;
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let (per_address_max, open_max) = match port {
        Port::Clients => {
            // Below the process's open-file limit, so the API port and the cluster link still
            // get descriptors when clients take all they can.
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX);
            let open_max = limit.saturating_sub(FD_HEADROOM).max(64);
            (n(r.max_connections_per_address), n(open_max))
        }
        Port::Api => (n(r.max_api_connections_per_address), API_OPEN_MAX),
    };
    tls::Handshakes {
        listener: match port {
            Port::Clients => "frontend",
            Port::Api => "api",
        },
        max: n(r.max_pending_handshakes),
        timeout: std::time::Duration::from_secs(r.handshake_timeout_s),
        stream_timeout: std::time::Duration::from_secs(r.hello_timeout_s),
        per_address_max,
        open_max,
    }
}

fn datastore_options(cfg: &ServerConfig) -> DatastoreOptions {
    let d = &cfg.datastore;
    let defaults = DatastoreOptions::default();
    DatastoreOptions {
        limits: talon_core::datastore::CacheLimits {
            clean_bytes_max: d.memcache_bytes,
            dirty_bytes_max: d.memcache_dirty_bytes,
            value_bytes_max: d.max_value_size,
            ..defaults.limits
        },
        image: Some(crate::storage::datastore::ImageOptions {
            tracks: crate::node::start_key,
        }),
        ..defaults
    }
}

fn admission(cfg: &ServerConfig, clock: &Arc<dyn Clock>) -> tls::Admission {
    let cps = cfg.frontend.resources.connections_per_second.max(1);
    tls::Admission {
        bucket: talon_core::ratelimit::TokenBucket::new(cps, cps, clock.monotonic()),
        clock: clock.clone(),
    }
}

/// The master's background tasks: if any ends, the master stops.
struct MasterTasks {
    ds: tokio::task::JoinHandle<std::io::Result<()>>,
    fs: tokio::task::JoinHandle<std::io::Result<()>>,
    lease: HeldLease,
}

/// The datastore lease while the master holds it: the task renewing it, and what releases it.
struct HeldLease {
    task: tokio::task::JoinHandle<String>,
    vol: crate::storage::volume::SharedVolume,
    token: String,
}

impl MasterTasks {
    /// Stops them and gives the lease back.
    async fn end(self) {
        self.ds.abort();
        self.fs.abort();
        self.lease.task.abort();
        Lease::release(&self.lease.vol, &self.lease.token).await;
    }
}

/// Starts the master and serves until `shutdown` completes.
pub async fn run_master(
    env: Env,
    cfg: ServerConfig,
    storage: NodeStorage,
    started: impl FnOnce(Listening),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let Env {
        clock,
        entropy,
        net,
        host,
        pid,
    } = env;
    let NodeStorage {
        local,
        buffer,
        metadata,
        filestore,
        local_name,
        lock: _lock,
    } = storage;
    let node_name = cfg.master_node_name();
    crate::metrics::metrics().set_node(&node_name, "master");
    tokio::pin!(shutdown);
    let me = LeaseJson::new(node_name.clone(), host, local_name.clone(), pid);
    // Before anything is written to the datastore: one master per datastore.
    let Some(lease) = take_lease(&metadata, me, entropy.as_ref(), shutdown.as_mut()).await? else {
        return Ok(());
    };
    let (datastore, ds) = open_datastore(&cfg, local, metadata, &clock, &local_name)?;
    let (filestore, fs) = open_filestore(
        &cfg,
        buffer,
        filestore,
        &clock,
        entropy.as_ref(),
        &node_name,
        &local_name,
    )?;
    let tasks = MasterTasks { ds, fs, lease };
    // The ports first: a port in use fails the start at once, and clients and minions connecting
    // while the master loads wait in the listen backlog instead of being refused.
    let listeners = bind_master(&cfg, &net).await?;
    let opts = node_options(&cfg, node_name.clone());
    // Loading may take long on a slow volume: a stop request ends it (it only reads; the journals
    // keep everything for the next start).
    let meta = Meta::Local(datastore.clone());
    let gui_entropy = entropy.clone();
    let node = tokio::select! {
        n = Node::start(opts, meta, filestore.clone(), clock.clone(), entropy, Cluster::Master) => {
            n.map_err(|e| format!("loading the master's state: {e}"))?
        }
        _ = &mut shutdown => {
            tracing::info!("stopped while loading");
            tasks.end().await;
            return Ok(());
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let servers = serve_master(
        &cfg,
        (&clock, gui_entropy),
        node,
        &datastore,
        &filestore,
        listeners,
        stop_rx,
        started,
    )?;
    let servers = tracing::Instrument::instrument(
        servers,
        tracing::info_span!("node", node = %node_name, role = "master"),
    );
    run_until_stopped(servers, tasks, shutdown, stop_tx, &datastore, &filestore).await
}

/// Takes the datastore lease as `me` and keeps renewing it; `None` if `shutdown` came first.
async fn take_lease(
    metadata: &crate::storage::volume::SharedVolume,
    me: LeaseJson,
    entropy: &dyn crate::clock::Entropy,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<HeldLease>, String> {
    let lease = tokio::select! {
        l = Lease::take(metadata.clone(), me, entropy, LEASE_BEAT) => l?,
        _ = shutdown => {
            tracing::info!("stopped while taking the datastore lease");
            return Ok(None);
        }
    };
    let token = lease.token();
    Ok(Some(HeldLease {
        task: tokio::spawn(lease.keep(LEASE_BEAT)),
        vol: metadata.clone(),
        token,
    }))
}

/// Opens the master's datastore: its journal on the local disk, replayed, over the shared volume.
fn open_datastore(
    cfg: &ServerConfig,
    local: Box<dyn crate::storage::local::LocalDisk>,
    metadata: crate::storage::volume::SharedVolume,
    clock: &Arc<dyn Clock>,
    local_name: &str,
) -> Result<(Datastore, tokio::task::JoinHandle<std::io::Result<()>>), String> {
    let (datastore, task, report) =
        Datastore::open(local, metadata, clock.clone(), datastore_options(cfg))
            .map_err(|e| format!("datastore journal in {local_name}: {e}"))?;
    tracing::info!(
        local = %local_name,
        replayed = report.replayed,
        torn_bytes = report.torn_bytes,
        dropped = report.dropped,
        image = ?report.image,
        "datastore journal recovered"
    );
    Ok((datastore, task))
}

/// The master's listeners: clients, API (and minions), GUI.
struct MasterListeners {
    frontend: Box<dyn crate::net::Listener>,
    api: Box<dyn crate::net::Listener>,
    gui: Box<dyn crate::net::Listener>,
    monitoring: Option<Box<dyn crate::net::Listener>>,
}

/// Binds the master's client port, API port and GUI port.
async fn bind_master(
    cfg: &ServerConfig,
    net: &Arc<dyn crate::net::Net>,
) -> Result<MasterListeners, String> {
    let bind = |what: &'static str, addr: String| async move {
        net.bind(&addr)
            .await
            .map_err(|e| format!("{what} {addr}: {e}"))
    };
    Ok(MasterListeners {
        frontend: bind(
            "Frontend",
            format!("{}:{}", cfg.frontend.bind_address, cfg.frontend.bind_port),
        )
        .await?,
        api: bind(
            "API",
            format!("{}:{}", cfg.api.bind_address, cfg.api.bind_port),
        )
        .await?,
        gui: bind(
            "GUI",
            format!("{}:{}", cfg.gui.bind_address, cfg.gui.bind_port),
        )
        .await?,
        monitoring: bind_monitoring(cfg, net).await?,
    })
}

/// The GUI's TLS: `GUI.certificate` if set, else the frontend certificate.
fn gui_tls(cfg: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let r = if cfg.gui.certificate.is_empty() {
        tls::gui_server_config(
            &cfg.frontend.certificate,
            &cfg.frontend.private_key,
            ("Frontend.certificate", "Frontend.private_key"),
        )
    } else {
        tls::gui_server_config(
            &cfg.gui.certificate,
            &cfg.gui.private_key,
            ("GUI.certificate", "GUI.private_key"),
        )
    };
    r.map_err(|e| e.to_string())
}

/// The master's servers on its two ports, once it has loaded: clients on one; analysts (API
/// certificates) and minions (the frontend certificate) on the other, each service checking the
/// role of the certificate it is called with. Tells `started` where it listens.
#[allow(clippy::too_many_arguments)]
fn serve_master(
    cfg: &ServerConfig,
    (clock, entropy): (&Arc<dyn Clock>, Arc<dyn crate::clock::Entropy>),
    node: Node,
    datastore: &Datastore,
    filestore: &Filestore,
    listeners: MasterListeners,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    started: impl FnOnce(Listening),
) -> Result<impl Future<Output = Result<(), String>>, String> {
    let MasterListeners {
        frontend: fe_listener,
        api: api_listener,
        gui: gui_listener,
        monitoring,
    } = listeners;
    let listening = Listening {
        frontend: fe_listener.local_addr().map_err(|e| e.to_string())?,
        api: api_listener.local_addr().map_err(|e| e.to_string())?,
        gui: Some(gui_listener.local_addr().map_err(|e| e.to_string())?),
        monitoring: serve_monitoring(monitoring, stop_rx.clone())?,
    };
    let gui_tls = gui_tls(cfg)?;
    let stop_gui = stop_rx.clone();
    let fe_tls = tls::endpoint_server_config(&cfg.frontend.certificate, &cfg.frontend.private_key)
        .map_err(|e| e.to_string())?;
    let api_tls = tls::ca_server_config(
        &cfg.frontend.certificate,
        &cfg.frontend.private_key,
        &cfg.ca.certificate,
    )
    .map_err(|e| e.to_string())?;
    let minions: BTreeSet<String> = cfg.extra_frontends.iter().map(|x| x.node_name()).collect();
    announce_master(cfg, &listening, &minions);
    started(listening);
    let max_message = node_options(cfg, cfg.master_node_name())
        .codec
        .message_bytes_max;
    let comms =
        CommsServer::new(CommsService::new(node.clone())).max_decoding_message_size(max_message);
    let cluster = ClusterService::new(
        node.clone(),
        datastore.clone(),
        minions,
        cfg.datastore.max_value_size,
    );
    let mut stop_b = stop_rx.clone();
    let admission = admission(cfg, clock);
    let fe = serve_clients(
        cfg,
        filestore.clone(),
        comms,
        (fe_listener, fe_tls, admission),
        stop_rx,
    );
    let api_service =
        ApiService::new(node).with_users(crate::gui::users::Users::at(&cfg.datastore.location));
    let gui = Arc::new(crate::gui::Gui::new(
        api_service.clone(),
        &cfg.datastore.location,
        clock.clone(),
        entropy,
    ));
    tokio::spawn(crate::gui::serve(gui, gui_listener, gui_tls, stop_gui));
    let api_port = ApiPort {
        api: ApiServer::new(api_service),
        replication: ReplicationServer::new(cluster.clone()).max_decoding_message_size(64 << 20),
        datastore: RemoteDatastoreServer::new(cluster)
            .max_decoding_message_size(2 * crate::cluster::VALUE_CHUNK_BYTES),
    };
    let api = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .serve_with_incoming_shutdown(
            api_port,
            tls::incoming(api_listener, api_tls, handshakes(cfg, Port::Api), None),
            async move {
                let _ = stop_b.changed().await;
            },
        );
    Ok(async move {
        tokio::try_join!(fe, api)
            .map(|_| ())
            .map_err(|e| format!("server failed: {e}"))
    })
}

fn announce_master(cfg: &ServerConfig, listening: &Listening, minions: &BTreeSet<String>) {
    tracing::info!(
        role = "master",
        node = %cfg.master_node_name(),
        frontend = %listening.frontend,
        api = %listening.api,
        gui = ?listening.gui,
        monitoring = ?listening.monitoring,
        minions = ?minions,
        datastore = %cfg.datastore.location.display(),
        filestore = %cfg.datastore.filestore_directory.display(),
        "talon frontend started"
    );
}

/// Serves until `shutdown` (then stops the streams, flushes and gives the lease back) or until a
/// background task ends — fail-stop: the journal failed, or a write the node had applied in memory
/// could not be made durable, or another master took the datastore. The process then exits; its
/// supervisor restarts it from what is durable.
async fn run_until_stopped(
    servers: impl Future<Output = Result<(), String>>,
    mut tasks: MasterTasks,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    datastore: &Datastore,
    filestore: &Filestore,
) -> Result<(), String> {
    tokio::pin!(servers);
    tokio::select! {
        r = &mut servers => r?,
        r = &mut tasks.ds => {
            let why = stopped(r);
            tracing::error!(error = %why, "the datastore stopped; exiting");
            return Err(format!("the datastore stopped: {why}"));
        }
        r = &mut tasks.fs => {
            let why = stopped(r);
            tracing::error!(error = %why, "the filestore buffer stopped; exiting");
            return Err(format!("the filestore buffer stopped: {why}"));
        }
        // Two masters on one datastore would lose each other's writes.
        r = &mut tasks.lease.task => {
            let why = r.unwrap_or_else(|e| format!("the lease task failed: {e}"));
            tracing::error!(error = %why, "exiting");
            tasks.ds.abort();
            tasks.fs.abort();
            return Err(why);
        }
        _ = shutdown => {
            tracing::info!("shutting down: flushing the datastore");
            let _ = stop_tx.send(true);
            // Graceful shutdown waits for open streams; clients and minions reconnect elsewhere or
            // later, so it is bounded.
            if tokio::time::timeout(SHUTDOWN_GRACE, servers).await.is_err() {
                tracing::info!("streams still open after the grace period; closing them");
            }
            flush_for_stop("the datastore", async {
                datastore.flushed().await.map_err(|e| e.to_string())?;
                filestore.settled().await.map_err(|e| e.to_string())
            })
            .await;
        }
    }
    tasks.end().await;
    Ok(())
}

/// Starts the minion `node` (a name from `ExtraFrontends`) and serves until `shutdown` completes.
/// It serves clients whether or not the master is up; its replication outbox rides out outages.
pub async fn run_minion(
    env: Env,
    cfg: ServerConfig,
    node: String,
    storage: NodeStorage,
    started: impl FnOnce(Listening),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let (clock, entropy, net) = (env.clock, env.entropy, env.net);
    let fe_addr = minion_address(&cfg, &node)?;
    crate::metrics::metrics().set_node(&node, "minion");
    // Served until this returns (the sender's drop ends it).
    let (_monitoring_stop, monitoring_stop) = tokio::sync::watch::channel(false);
    let monitoring = serve_monitoring(bind_monitoring(&cfg, &net).await?, monitoring_stop)?;
    // The lock on the local directory is held until this returns.
    let NodeStorage {
        local,
        buffer,
        filestore,
        local_name,
        lock: _lock,
        ..
    } = storage;
    let master = master_addr(&cfg, &net, &entropy)?;
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
    let opts = LinkOptions {
        node: node.clone(),
        master: master.clone(),
        limits: talon_core::replication::OutboxLimits::default(),
    };
    let (link, link_task) = start_link(opts, local, &local_name, &clock, events_tx).await?;
    let opts = node_options(&cfg, node.clone());
    let max_message = opts.codec.message_bytes_max;
    let (filestore, fs_task) = open_filestore(
        &cfg,
        buffer,
        filestore,
        &clock,
        entropy.as_ref(),
        &node,
        &local_name,
    )?;
    let meta = remote_meta(&cfg, master);
    let cluster = Cluster::Minion {
        link,
        events: events_rx,
    };
    let handle = Node::start(
        opts,
        meta,
        filestore.clone(),
        clock.clone(),
        entropy,
        cluster,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (fe_listener, fe_tls) = listen_minion(
        &cfg,
        &net,
        (&node, &fe_addr, monitoring),
        &local_name,
        started,
    )
    .await?;
    let comms = CommsServer::new(CommsService::new(handle)).max_decoding_message_size(max_message);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = (fe_listener, fe_tls, admission(&cfg, &clock));
    let fe = serve_clients(&cfg, filestore.clone(), comms, listener, stop_rx);
    let span = tracing::info_span!("node", node = %node, role = "minion");
    let fe = tracing::Instrument::instrument(fe, span);
    let tasks = (link_task, fs_task);
    serve_minion_until_stopped(fe, tasks, shutdown, stop_tx, &filestore).await
}

/// The address minion `node` listens on for clients (its `ExtraFrontends` entry).
fn minion_address(cfg: &ServerConfig, node: &str) -> Result<String, String> {
    match cfg.extra_frontends.iter().find(|x| x.node_name() == node) {
        Some(me) => Ok(format!("{}:{}", me.bind_address, me.bind_port)),
        None => {
            let known: Vec<String> = cfg.extra_frontends.iter().map(|x| x.node_name()).collect();
            Err(format!(
                "--node {node:?} is not in ExtraFrontends (known minions: {known:?})"
            ))
        }
    }
}

/// Where the minion reaches the master (the API port, with the frontend certificate).
fn master_addr(
    cfg: &ServerConfig,
    net: &Arc<dyn crate::net::Net>,
    entropy: &Arc<dyn crate::clock::Entropy>,
) -> Result<MasterAddr, String> {
    let tls = tls::client_config(
        &cfg.ca.certificate,
        &cfg.frontend.certificate,
        &cfg.frontend.private_key,
    )
    .map_err(|e| format!("frontend certificate: {e}"))?;
    Ok(MasterAddr {
        host: cfg.api.hostname.clone(),
        port: cfg.api.bind_port,
        tls,
        net: net.clone(),
        entropy: entropy.clone(),
    })
}

/// Starts the minion's replication link over its outbox journal, and tells the master (after the
/// previous run's events) that this node started: it forgets which clients were here.
async fn start_link(
    opts: LinkOptions,
    local: Box<dyn crate::storage::local::LocalDisk>,
    local_name: &str,
    clock: &Arc<dyn Clock>,
    events_tx: tokio::sync::mpsc::Sender<crate::cluster::LinkEvent>,
) -> Result<(Link, tokio::task::JoinHandle<String>), String> {
    let (link, recovery, task) = Link::start(opts, local, local_name, clock.clone(), events_tx)?;
    tracing::info!(
        epoch = recovery.epoch,
        pending = recovery.pending,
        torn_bytes = recovery.torn_bytes,
        "replication outbox recovered"
    );
    let started = talon_proto::cluster::replicated_event::Event::NodeStarted(
        talon_proto::cluster::NodeStarted {},
    );
    link.push(started, None).await?;
    Ok((link, task))
}

/// The master's datastore as a minion reaches it (through the master, with a read cache).
fn remote_meta(cfg: &ServerConfig, master: MasterAddr) -> Meta {
    let value_max = cfg.datastore.max_value_size;
    Meta::Remote(RemoteStore::new(
        master,
        crate::cluster::READ_CACHE_MAX,
        value_max,
    ))
}

/// Binds the minion's client port and tells `started` (and the log) where it listens.
async fn listen_minion(
    cfg: &ServerConfig,
    net: &Arc<dyn crate::net::Net>,
    (node, fe_addr, monitoring): (&str, &str, Option<SocketAddr>),
    local_name: &str,
    started: impl FnOnce(Listening),
) -> Result<(Box<dyn crate::net::Listener>, Arc<rustls::ServerConfig>), String> {
    let fe_listener = net
        .bind(fe_addr)
        .await
        .map_err(|e| format!("ExtraFrontends {node} {fe_addr}: {e}"))?;
    let frontend = fe_listener.local_addr().map_err(|e| e.to_string())?;
    let fe_tls = tls::endpoint_server_config(&cfg.frontend.certificate, &cfg.frontend.private_key)
        .map_err(|e| e.to_string())?;
    announce_minion(cfg, node, frontend, local_name, monitoring);
    started(Listening {
        frontend,
        api: frontend,
        gui: None,
        monitoring,
    });
    Ok((fe_listener, fe_tls))
}

fn announce_minion(
    cfg: &ServerConfig,
    node: &str,
    frontend: SocketAddr,
    local_name: &str,
    monitoring: Option<SocketAddr>,
) {
    tracing::info!(
        role = "minion",
        node = %node,
        frontend = %frontend,
        monitoring = ?monitoring,
        master = %crate::deploy::config::host_port(&cfg.api.hostname, cfg.api.bind_port),
        filestore = %cfg.datastore.filestore_directory.display(),
        local = %local_name,
        "talon frontend started"
    );
}

/// Serves the minion's clients until `shutdown` (then stops the client streams first, the link
/// after: the clients' "gone" events go into the outbox instead of meeting a stopped link, which
/// logged an error for the first of them on every clean stop), or until the link or the filestore
/// buffer ends.
async fn serve_minion_until_stopped(
    fe: impl Future<Output = Result<(), tonic::transport::Error>>,
    (mut link_task, mut fs_task): (
        tokio::task::JoinHandle<String>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    shutdown: impl Future<Output = ()>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    filestore: &Filestore,
) -> Result<(), String> {
    tokio::pin!(fe);
    tokio::select! {
        r = &mut fe => r.map_err(|e| format!("server failed: {e}"))?,
        r = &mut link_task => {
            let why = r.unwrap_or_else(|e| format!("replication link panicked: {e}"));
            let _ = stop_tx.send(true);
            return Err(format!("stopping: {why}"));
        }
        r = &mut fs_task => {
            let why = stopped(r);
            tracing::error!(error = %why, "the filestore buffer stopped; exiting");
            let _ = stop_tx.send(true);
            return Err(format!("the filestore buffer stopped: {why}"));
        }
        _ = shutdown => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
            if tokio::time::timeout(SHUTDOWN_GRACE, fe).await.is_err() {
                tracing::info!("client streams still open after the grace period; closing them");
            }
            link_task.abort();
            flush_for_stop("the filestore buffer", async {
                filestore.settled().await.map_err(|e| e.to_string())
            })
            .await;
        }
    }
    fs_task.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::{Entry, Fs};
    use crate::storage::local::StdDisk;
    use crate::storage::volume::{FsVolume, SharedVolume, SyncMode};
    use bytes::Bytes;
    use std::io;

    /// A shared volume that never answers (a hung NFS server).
    struct Hung;

    impl Fs for Hung {
        async fn read(&self, _: &str) -> io::Result<Option<Bytes>> {
            std::future::pending().await
        }
        async fn create(&self, _: &str, _: Bytes, _: bool) -> io::Result<()> {
            std::future::pending().await
        }
        async fn append(&self, _: &str, _: Bytes, _: bool) -> io::Result<()> {
            std::future::pending().await
        }
        async fn sync(&self, _: &str) -> io::Result<()> {
            std::future::pending().await
        }
        async fn sync_all(&self) -> io::Result<()> {
            std::future::pending().await
        }
        async fn rename(&self, _: &str, _: &str) -> io::Result<()> {
            std::future::pending().await
        }
        async fn mkdir(&self, _: &str) -> io::Result<()> {
            std::future::pending().await
        }
        async fn list(&self, _: &str) -> io::Result<Vec<Entry>> {
            std::future::pending().await
        }
        async fn remove(&self, _: &str) -> io::Result<()> {
            std::future::pending().await
        }
    }

    /// A stop request ends a master still loading its records from a volume that does not answer
    /// (it had already bound its ports). The outer timeout only turns a hang into a failure.
    #[tokio::test]
    async fn a_master_stops_on_request_while_loading_from_a_hung_volume() {
        let env = Env::real();
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::deploy::config::GenerateOptions {
            hostname: "127.0.0.1".into(),
            frontend_port: crate::cli::demo::free_port().unwrap(),
            api_port: crate::cli::demo::free_port().unwrap(),
            gui_port: crate::cli::demo::free_port().unwrap(),
            monitoring_port: 0,
            datastore: dir.path().join("shared"),
            key_type: crate::deploy::pki::KeyType::default(),
        };
        let cfg = crate::deploy::config::generate(&opts, &*env.clock, &*env.entropy).unwrap();
        let hung = || SharedVolume::new(FsVolume::over(Hung, SyncMode::PerFile, "t"));
        let storage = NodeStorage {
            local: Box::new(StdDisk::new(&dir.path().join("local")).unwrap()),
            buffer: Box::new(StdDisk::new(&dir.path().join("local")).unwrap()),
            metadata: hung(),
            filestore: hung(),
            local_name: "local".into(),
            lock: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(run_master(env, cfg, storage, |_| {}, async move {
            let _ = stop_rx.await;
        }));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!run.is_finished(), "the master is still loading");
        stop_tx.send(()).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("the master stopped")
            .unwrap();
        assert_eq!(r, Ok(()));
    }

    /// A response whose body yields `frames` and then ends.
    fn response(frames: Vec<hyper::body::Frame<Bytes>>) -> HttpResponse {
        let frames = tokio_stream::iter(frames.into_iter().map(Ok::<_, tonic::Status>));
        HttpResponse::new(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
    }

    fn trailers(code: tonic::Code) -> hyper::body::Frame<Bytes> {
        let mut t = tonic::codegen::http::HeaderMap::new();
        t.insert("grpc-status", (code as i32).to_string().parse().unwrap());
        hyper::body::Frame::trailers(t)
    }

    fn counted(method: &str, code: &str) -> u64 {
        crate::metrics::metrics()
            .api_requests
            .with_label_values(&[method, code])
            .get()
    }

    /// A call whose status comes in its trailers (a stream failing after it began) is counted with
    /// that status once its body ends, not as the `Ok` its headers imply; a status in the headers
    /// is counted at once. (Each case has its own method label: the registry is the process's.)
    #[tokio::test]
    async fn api_calls_are_counted_with_their_final_status() {
        use http_body_util::BodyExt;
        let failed = count_api_call(
            "TestTrailersFailed".into(),
            response(vec![
                hyper::body::Frame::data(Bytes::from_static(b"page")),
                trailers(tonic::Code::NotFound),
            ]),
            0.0,
        );
        assert_eq!(
            counted("TestTrailersFailed", "NotFound"),
            0,
            "not before its end"
        );
        failed.into_body().collect().await.unwrap();
        assert_eq!(counted("TestTrailersFailed", "NotFound"), 1);
        assert_eq!(counted("TestTrailersFailed", "Ok"), 0);

        let fine = count_api_call(
            "TestTrailersOk".into(),
            response(vec![trailers(tonic::Code::Ok)]),
            0.0,
        );
        fine.into_body().collect().await.unwrap();
        assert_eq!(counted("TestTrailersOk", "Ok"), 1);

        let at_once = tonic::Status::permission_denied("no").into_http::<tonic::body::Body>();
        let at_once = count_api_call("TestHeaders".into(), at_once, 0.0);
        assert_eq!(counted("TestHeaders", "PermissionDenied"), 1);
        drop(at_once);
        assert_eq!(counted("TestHeaders", "Cancelled"), 0, "counted once");
    }

    /// A response dropped before its body ended (the caller went away) counts as `Cancelled`; an
    /// unknown method's calls share one series.
    #[tokio::test]
    async fn abandoned_calls_and_unknown_methods() {
        let abandoned = count_api_call(
            "TestAbandoned".into(),
            response(vec![hyper::body::Frame::data(Bytes::from_static(b"page"))]),
            0.0,
        );
        drop(abandoned);
        assert_eq!(counted("TestAbandoned", "Cancelled"), 1);

        let before = counted("unknown", "Unimplemented");
        let status =
            tonic::Status::unimplemented("no such method").into_http::<tonic::body::Body>();
        drop(count_api_call("NoSuchMethod".into(), status, 0.0));
        assert!(counted("unknown", "Unimplemented") > before);
        assert_eq!(counted("NoSuchMethod", "Unimplemented"), 0);
    }
}
