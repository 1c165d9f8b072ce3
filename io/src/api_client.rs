//! The analyst's side of the API: what `talon --api-config ... <command>` runs.

use crate::config::{ApiClientConfig, read_yaml};
use crate::tls;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use talon_proto::api::{self, api_client::ApiClient};
use talon_proto::comms::FlowState;
use tonic::transport::Channel;

/// A connected API client.
pub struct Api {
    inner: ApiClient<Channel>,
}

fn status(e: tonic::Status) -> String {
    match e.code() {
        tonic::Code::Unavailable if e.message().contains("connect") => {
            format!("cannot reach the master's API: {}", e.message())
        }
        _ => e.message().to_owned(),
    }
}

impl Api {
    /// Connects with an API config file.
    pub async fn connect(path: &Path) -> Result<Api, String> {
        let c: ApiClientConfig = read_yaml(path).map_err(|e| e.to_string())?;
        let (host, port) =
            crate::config::parse_host_port(&c.api_connection_string).map_err(|_| {
                format!(
                    "{}: api_connection_string {:?} is not HOST:PORT",
                    path.display(),
                    c.api_connection_string
                )
            })?;
        let cfg = tls::client_config(&c.ca_certificate, &c.client_cert, &c.client_private_key)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let ch = tls::connect(&host, port, cfg, Duration::from_secs(10))
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the master's API at {}: {e}",
                    c.api_connection_string
                )
            })?;
        Ok(Api {
            inner: ApiClient::new(ch).max_decoding_message_size(256 << 20),
        })
    }

    /// Searches clients.
    pub async fn search(&mut self, query: &str) -> Result<api::SearchResponse, String> {
        let r = self
            .inner
            .search_clients(api::SearchRequest {
                query: query.into(),
                limit: 0,
            })
            .await
            .map_err(status)?;
        Ok(r.into_inner())
    }

    /// Adds or removes a label.
    pub async fn label(
        &mut self,
        client: &str,
        label: &str,
        remove: bool,
    ) -> Result<api::ClientSummary, String> {
        let req = api::LabelRequest {
            client_id: client.into(),
            label: label.into(),
            remove,
        };
        Ok(self
            .inner
            .modify_label(req)
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Schedules a collection.
    pub async fn collect(
        &mut self,
        client: &str,
        artifact: &str,
        params: BTreeMap<String, String>,
    ) -> Result<api::FlowSummary, String> {
        let req = api::CollectRequest {
            client_id: client.into(),
            artifact: artifact.into(),
            params: params.into_iter().collect(),
        };
        Ok(self.inner.collect(req).await.map_err(status)?.into_inner())
    }

    /// A flow's summary.
    pub async fn flow(&mut self, client: &str, flow: &str) -> Result<api::FlowSummary, String> {
        let req = api::FlowRequest {
            client_id: client.into(),
            flow_id: flow.into(),
        };
        Ok(self.inner.get_flow(req).await.map_err(status)?.into_inner())
    }

    /// Waits until a flow has finished (polling), up to `timeout`.
    pub async fn wait(
        &mut self,
        client: &str,
        flow: &str,
        timeout: Duration,
    ) -> Result<api::FlowSummary, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let f = self.flow(client, flow).await?;
            if f.state != FlowState::Running as i32 {
                return Ok(f);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "flow {flow} still running after {}s (see `talon flow show {client} {flow}`)",
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A flow's rows.
    pub async fn rows(
        &mut self,
        client: &str,
        flow: &str,
    ) -> Result<Vec<serde_json::Value>, String> {
        let req = api::FlowRequest {
            client_id: client.into(),
            flow_id: flow.into(),
        };
        let mut s = self
            .inner
            .get_flow_results(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(page) = s.message().await.map_err(status)? {
            for r in page.rows {
                out.push(
                    serde_json::from_slice(&r)
                        .map_err(|e| format!("a stored row is not JSON: {e}"))?,
                );
            }
        }
        Ok(out)
    }
}

/// `{client_id, hostname, os, labels, last_seen, last_ip, node, connected}`.
pub fn client_json(c: &api::ClientSummary) -> serde_json::Value {
    serde_json::json!({
        "client_id": c.client_id,
        "hostname": c.hostname,
        "os": c.os,
        "labels": c.labels,
        "last_seen": c.last_seen_unix_ms,
        "last_ip": c.last_ip,
        "node": c.node,
        "connected": c.connected,
    })
}

/// The name of a flow state as printed.
pub fn state_name(state: i32) -> &'static str {
    match FlowState::try_from(state) {
        Ok(FlowState::Completed) => "completed",
        Ok(FlowState::Error) => "error",
        _ => "running",
    }
}

/// `{client_id, flow_id, artifact, state, rows, uploaded_bytes, error}`.
pub fn flow_json(f: &api::FlowSummary) -> serde_json::Value {
    serde_json::json!({
        "client_id": f.client_id,
        "flow_id": f.flow_id,
        "artifact": f.artifact,
        "state": state_name(f.state),
        "rows": f.rows,
        "uploaded_bytes": f.uploaded_bytes,
        "error": f.error,
    })
}
