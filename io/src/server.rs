//! Starting a node: the master (single-server mode in this build).

use crate::clock::{Clock, Entropy};
use crate::config::ServerConfig;
use crate::datastore::{Datastore, DatastoreOptions};
use crate::frontend::{ApiService, CommsService, Node, NodeOptions};
use crate::storage::local::StdDisk;
use crate::storage::volume::FsVolume;
use crate::tls;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use talon_core::codec::CodecLimits;
use talon_core::flows::FlowLimits;
use talon_core::registry::RegistryLimits;
use talon_proto::{api::api_server::ApiServer, comms::comms_server::CommsServer};
use tokio::net::TcpListener;

/// Concurrent TLS handshakes per listener.
pub const HANDSHAKES_MAX: usize = 1024;

/// Where a started node listens.
#[derive(Clone, Debug)]
pub struct Listening {
    /// The client-facing address.
    pub frontend: SocketAddr,
    /// The API address.
    pub api: SocketAddr,
}

/// Starts the master and serves until `shutdown` completes.
pub async fn run_master(
    cfg: ServerConfig,
    local_dir: PathBuf,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    started: impl FnOnce(Listening),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    if !cfg.extra_frontends.is_empty() {
        return Err(format!(
            "this config lists {} minions (ExtraFrontends); this build of Talon runs single-server mode only",
            cfg.extra_frontends.len()
        ));
    }
    let node_name = cfg.master_node_name();
    let ds_root = &cfg.datastore.location;
    let fs_root = &cfg.datastore.filestore_directory;
    let disk = StdDisk::new(&local_dir).map_err(|e| format!("{}: {e}", local_dir.display()))?;
    let volume = FsVolume::new(ds_root)
        .map_err(|e| format!("Datastore.location {}: {e}", ds_root.display()))?;
    let filestore = FsVolume::new(fs_root)
        .map_err(|e| format!("Datastore.filestore_directory {}: {e}", fs_root.display()))?;
    let (datastore, ds_task, report) =
        Datastore::open(disk, volume, clock.clone(), DatastoreOptions::default())
            .map_err(|e| format!("datastore journal in {}: {e}", local_dir.display()))?;
    tracing::info!(
        replayed = report.replayed,
        torn_bytes = report.torn_bytes,
        "datastore journal recovered"
    );
    let opts = NodeOptions {
        node_name: node_name.clone(),
        nonce: cfg.client.nonce.clone(),
        expected_clients: cfg.frontend.resources.expected_clients as usize,
        codec: CodecLimits::default(),
        flows: FlowLimits::default(),
        registry: RegistryLimits::default(),
        hunts: talon_core::hunts::HuntLimits::default(),
    };
    let max_message = opts.codec.message_bytes_max;
    let cps = cfg.frontend.resources.connections_per_second.max(1);
    let admission = tls::Admission {
        bucket: talon_core::ratelimit::TokenBucket::new(cps, cps, clock.now()),
        clock: clock.clone(),
    };
    let node = Node::start(opts, datastore.clone(), filestore, clock, entropy).await?;

    let fe_addr = format!("{}:{}", cfg.frontend.bind_address, cfg.frontend.bind_port);
    let api_addr = format!("{}:{}", cfg.api.bind_address, cfg.api.bind_port);
    let fe_listener = TcpListener::bind(&fe_addr)
        .await
        .map_err(|e| format!("Frontend {fe_addr}: {e}"))?;
    let api_listener = TcpListener::bind(&api_addr)
        .await
        .map_err(|e| format!("API {api_addr}: {e}"))?;
    let listening = Listening {
        frontend: fe_listener.local_addr().map_err(|e| e.to_string())?,
        api: api_listener.local_addr().map_err(|e| e.to_string())?,
    };
    let fe_tls = tls::endpoint_server_config(&cfg.frontend.certificate, &cfg.frontend.private_key)
        .map_err(|e| e.to_string())?;
    let api_tls = tls::ca_server_config(
        &cfg.frontend.certificate,
        &cfg.frontend.private_key,
        &cfg.ca.certificate,
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        role = "master",
        node = %node_name,
        frontend = %listening.frontend,
        api = %listening.api,
        datastore = %ds_root.display(),
        filestore = %fs_root.display(),
        local = %local_dir.display(),
        "talon frontend started"
    );
    started(listening);

    let comms =
        CommsServer::new(CommsService::new(node.clone())).max_decoding_message_size(max_message);
    let api = ApiServer::new(ApiService::new(node));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_a = stop_rx.clone();
    let mut stop_b = stop_rx;
    // One service per port, so no router: each server serves its service directly.
    let fe = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .serve_with_incoming_shutdown(
            comms,
            tls::incoming(fe_listener, fe_tls, HANDSHAKES_MAX, Some(admission)),
            async move {
                let _ = stop_a.changed().await;
            },
        );
    let api = tonic::transport::Server::builder().serve_with_incoming_shutdown(
        api,
        tls::incoming(api_listener, api_tls, HANDSHAKES_MAX, None),
        async move {
            let _ = stop_b.changed().await;
        },
    );
    let span = tracing::info_span!("node", node = %node_name, role = "master");
    let servers = tracing::Instrument::instrument(async { tokio::try_join!(fe, api) }, span);
    tokio::pin!(servers);
    tokio::select! {
        r = &mut servers => r.map(|_| ()).map_err(|e| format!("server failed: {e}"))?,
        _ = shutdown => {
            tracing::info!("shutting down: flushing the datastore");
            let _ = stop_tx.send(true);
            let _ = servers.await;
            if let Err(e) = datastore.flushed().await {
                tracing::warn!(error = %e, "datastore did not flush");
            }
        }
    }
    drop(datastore);
    ds_task.abort();
    Ok(())
}
