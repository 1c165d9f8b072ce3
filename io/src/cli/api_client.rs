//! The analyst's side of the API: what `talon --api-config ... <command>` runs.

use crate::deploy::config::{ApiClientConfig, read_yaml};
use crate::net::tls;
use crate::text::csv_value;
use std::borrow::Cow;
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

/// Clients asked for per search call (the server's most).
pub const SEARCH_PAGE: u32 = 10_000;

/// Items asked for per call of the other list calls (the server's most).
pub const LIST_PAGE: u32 = 1000;

/// Every item of a paged list call: `page(offset)` answers one page and how many items there are.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, String>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, u64), String>>,
{
    let mut all = Vec::new();
    loop {
        let (items, total) = page(all.len() as u32).await?;
        let got = items.len();
        all.extend(items);
        if got == 0 || all.len() as u64 >= total {
            return Ok(all);
        }
    }
}

fn status(e: tonic::Status) -> String {
    // A transport failure's reason (a refused certificate, a closed connection) is in its source.
    let why = match std::error::Error::source(&e) {
        Some(src) => tls::explain(src),
        None => e.message().to_owned(),
    };
    match e.code() {
        tonic::Code::Unavailable if e.message().contains("connect") => {
            format!("cannot reach the master's API: {why}")
        }
        _ => why,
    }
}

impl Api {
    /// Connects with an API config file.
    pub async fn connect(path: &Path) -> Result<Api, String> {
        let c: ApiClientConfig = read_yaml(path).map_err(|e| e.to_string())?;
        Api::connect_with(&c, &crate::net::TokioNet::shared())
            .await
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Connects with an API config over `net`.
    pub async fn connect_with(
        c: &ApiClientConfig,
        net: &std::sync::Arc<dyn crate::net::Net>,
    ) -> Result<Api, String> {
        let (host, port) = crate::deploy::config::parse_host_port(&c.api_connection_string)
            .map_err(|_| {
                format!(
                    "api_connection_string {:?} is not HOST:PORT",
                    c.api_connection_string
                )
            })?;
        let cfg = tls::client_config(&c.ca_certificate, &c.client_cert, &c.client_private_key)
            .map_err(|e| e.to_string())?;
        let ch = tls::connect(net, &host, port, cfg, Duration::from_secs(10))
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the master's API at {}: {}",
                    c.api_connection_string,
                    tls::explain(&e)
                )
            })?;
        Ok(Api {
            inner: ApiClient::new(ch).max_decoding_message_size(256 << 20),
        })
    }

    /// Every client matching `query`, a page of [`SEARCH_PAGE`] at a time.
    pub async fn search(&mut self, query: &str) -> Result<api::SearchResponse, String> {
        self.search_sorted(query, "", false).await
    }

    /// Every client matching `query` in the order of `sort` (`SearchClients`' names; empty: id),
    /// a page of [`SEARCH_PAGE`] at a time.
    pub async fn search_sorted(
        &mut self,
        query: &str,
        sort: &str,
        descending: bool,
    ) -> Result<api::SearchResponse, String> {
        let mut all = api::SearchResponse::default();
        loop {
            let req = api::SearchRequest {
                query: query.into(),
                limit: SEARCH_PAGE,
                offset: all.clients.len() as u32,
                sort: sort.into(),
                descending,
            };
            let r = self
                .inner
                .search_clients(req)
                .await
                .map_err(status)?
                .into_inner();
            all.clients.extend(r.clients);
            all.total = r.total;
            if !r.truncated {
                return Ok(all);
            }
        }
    }

    /// One page of a search, as asked.
    pub async fn search_page(
        &mut self,
        req: api::SearchRequest,
    ) -> Result<api::SearchResponse, String> {
        Ok(self
            .inner
            .search_clients(req)
            .await
            .map_err(status)?
            .into_inner())
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

    /// Waits until a flow has finished (watching it), up to `timeout`.
    pub async fn wait(
        &mut self,
        client: &str,
        flow: &str,
        timeout: Duration,
    ) -> Result<api::FlowSummary, String> {
        let watched = self.watch_flow(client, flow, |_| Ok(()));
        match tokio::time::timeout(timeout, watched).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "flow {flow} still running after {}s (see `talon flow show {client} {flow}`)",
                timeout.as_secs()
            )),
        }
    }

    /// Calls `each` with the flow now and each time it changes, until it has finished; returns
    /// it as it finished.
    pub async fn watch_flow(
        &mut self,
        client: &str,
        flow: &str,
        mut each: impl FnMut(&api::FlowSummary) -> Result<(), String>,
    ) -> Result<api::FlowSummary, String> {
        let req = api::FlowRequest {
            client_id: client.into(),
            flow_id: flow.into(),
        };
        let mut s = self
            .inner
            .watch_flow(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut last = None;
        while let Some(f) = s.message().await.map_err(status)? {
            each(&f)?;
            last = Some(f);
        }
        match last {
            Some(f) if f.state != FlowState::Running as i32 => Ok(f),
            _ => Err(format!(
                "the master ended the watch of flow {flow} before it finished"
            )),
        }
    }

    /// Calls `each` with the hunt now and each time it changes, until it is no longer running;
    /// returns it as it ended.
    pub async fn watch_hunt(
        &mut self,
        id: &str,
        mut each: impl FnMut(&api::HuntSummary) -> Result<(), String>,
    ) -> Result<api::HuntSummary, String> {
        let req = api::HuntRequest { hunt_id: id.into() };
        let mut s = self
            .inner
            .watch_hunt(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut last = None;
        while let Some(h) = s.message().await.map_err(status)? {
            each(&h)?;
            last = Some(h);
        }
        last.ok_or_else(|| format!("the master ended the watch of hunt {id} at once"))
    }

    /// A client's flows, newest first (every page).
    pub async fn list_flows(&mut self, client: &str) -> Result<Vec<api::FlowSummary>, String> {
        let c = self.inner.clone();
        all_pages(|offset| {
            let (mut c, client_id) = (c.clone(), client.to_owned());
            async move {
                let req = api::ListFlowsRequest {
                    client_id,
                    offset,
                    limit: LIST_PAGE,
                };
                let r = c.list_flows(req).await.map_err(status)?.into_inner();
                Ok((r.flows, r.total))
            }
        })
        .await
    }

    /// Cancels a flow.
    pub async fn cancel(
        &mut self,
        client: &str,
        flow: &str,
        reason: &str,
    ) -> Result<api::CancelFlowResponse, String> {
        let req = api::CancelFlowRequest {
            client_id: client.into(),
            flow_id: flow.into(),
            reason: reason.into(),
        };
        let r = self.inner.cancel_flow(req).await.map_err(status)?;
        Ok(r.into_inner())
    }

    /// A flow's uploads.
    pub async fn list_uploads(
        &mut self,
        client: &str,
        flow: &str,
    ) -> Result<Vec<api::UploadInfo>, String> {
        let req = api::FlowRequest {
            client_id: client.into(),
            flow_id: flow.into(),
        };
        let r = self.inner.list_uploads(req).await.map_err(status)?;
        Ok(r.into_inner().uploads)
    }

    /// Streams an upload's bytes into `each` in order (the server checks its SHA-256 at the end;
    /// a mismatch is an error after the last bytes).
    pub async fn download(
        &mut self,
        client: &str,
        flow: &str,
        upload_id: u32,
        mut each: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<u64, String> {
        let req = api::DownloadRequest {
            client_id: client.into(),
            flow_id: flow.into(),
            upload_id,
        };
        let mut s = self
            .inner
            .download_upload(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut n = 0;
        while let Some(c) = s.message().await.map_err(status)? {
            if c.offset != n {
                return Err(format!("the master sent bytes at {} after {n}", c.offset));
            }
            each(&c.data)?;
            n += c.data.len() as u64;
        }
        Ok(n)
    }

    /// The audit log, newest first (every page).
    pub async fn audit(&mut self) -> Result<Vec<api::AuditEntry>, String> {
        let c = self.inner.clone();
        all_pages(|offset| {
            let mut c = c.clone();
            async move {
                let req = api::ListAuditRequest {
                    offset,
                    limit: LIST_PAGE,
                };
                let r = c.list_audit(req).await.map_err(status)?.into_inner();
                Ok((r.entries, r.total))
            }
        })
        .await
    }

    /// Calls `each` with every result row of a flow as its page arrives (memory: one page, however
    /// many rows); returns how many there were. An error from `each` stops the stream.
    pub async fn each_flow_row(
        &mut self,
        client: &str,
        flow: &str,
        mut each: impl FnMut(serde_json::Value) -> Result<(), String>,
    ) -> Result<u64, String> {
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
        let mut n = 0;
        while let Some(page) = s.message().await.map_err(status)? {
            for r in page.rows {
                each(
                    serde_json::from_slice(&r)
                        .map_err(|e| format!("a stored row is not JSON: {e}"))?,
                )?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// `{client_id, hostname, os, labels, last_seen, last_ip, node, connected}`.
pub fn client_json(c: &api::ClientSummary) -> serde_json::Value {
    serde_json::json!({
        "client_id": c.client_id,
        "hostname": c.hostname,
        "os": c.os,
        "labels": c.labels,
        "last_seen_ms": c.last_seen_unix_ms,
        "last_ip": c.last_ip,
        "node": c.node,
        "connected": c.connected,
        "fqdn": c.fqdn,
        "ips": c.ips,
        "first_seen_ms": c.first_seen_unix_ms,
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

/// `{client_id, flow_id, artifact, state, rows, uploaded_bytes, error, created_ms, finished_ms,
/// hunt_id}` (times in ms since the Unix epoch; `finished_ms` 0 while it runs, `hunt_id` empty
/// for a collection).
pub fn flow_json(f: &api::FlowSummary) -> serde_json::Value {
    serde_json::json!({
        "client_id": f.client_id,
        "flow_id": f.flow_id,
        "artifact": f.artifact,
        "state": state_name(f.state),
        "rows": f.rows,
        "uploaded_bytes": f.uploaded_bytes,
        "error": f.error,
        "created_ms": f.created_unix_ms,
        "finished_ms": f.finished_unix_ms,
        "hunt_id": f.hunt_id,
        "params": f.params.iter().collect::<BTreeMap<_, _>>(),
    })
}

/// `{upload_id, name, size, sha256, error}`.
pub fn upload_json(u: &api::UploadInfo) -> serde_json::Value {
    serde_json::json!({
        "upload_id": u.upload_id,
        "name": u.name,
        "size": u.size,
        "sha256": u.sha256,
        "error": u.error,
    })
}

/// `{time_ms, user, action, target, detail}`.
pub fn audit_json(e: &api::AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "time_ms": e.time_unix_ms,
        "user": e.user,
        "action": e.action,
        "target": e.target,
        "detail": e.detail,
    })
}

impl Api {
    /// Creates a hunt.
    pub async fn create_hunt(
        &mut self,
        req: api::CreateHuntRequest,
    ) -> Result<api::HuntSummary, String> {
        Ok(self
            .inner
            .create_hunt(req)
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Every hunt, newest first.
    pub async fn list_hunts(&mut self) -> Result<Vec<api::HuntSummary>, String> {
        let c = self.inner.clone();
        all_pages(|offset| {
            let mut c = c.clone();
            async move {
                let req = api::ListHuntsRequest {
                    offset,
                    limit: LIST_PAGE,
                };
                let r = c.list_hunts(req).await.map_err(status)?.into_inner();
                Ok((r.hunts, r.total))
            }
        })
        .await
    }

    /// One hunt.
    pub async fn hunt(&mut self, id: &str) -> Result<api::HuntSummary, String> {
        Ok(self
            .inner
            .get_hunt(api::HuntRequest { hunt_id: id.into() })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// The master's view of its minions' replication.
    pub async fn cluster(&mut self) -> Result<api::ClusterStatus, String> {
        Ok(self
            .inner
            .get_cluster(api::ClusterRequest {})
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Every artifact the master knows: built-in and custom.
    pub async fn artifacts(&mut self) -> Result<Vec<api::ArtifactInfo>, String> {
        Ok(self
            .inner
            .list_artifacts(api::ListArtifactsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .artifacts)
    }

    /// One artifact, with its definition.
    pub async fn artifact(&mut self, name: &str) -> Result<api::ArtifactInfo, String> {
        Ok(self
            .inner
            .get_artifact(api::ArtifactRequest { name: name.into() })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Adds a custom artifact from its YAML definition.
    pub async fn add_artifact(
        &mut self,
        definition: String,
        replace: bool,
    ) -> Result<api::ArtifactInfo, String> {
        Ok(self
            .inner
            .add_artifact(api::AddArtifactRequest {
                definition,
                replace,
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Removes a custom artifact.
    pub async fn remove_artifact(&mut self, name: &str) -> Result<(), String> {
        self.inner
            .remove_artifact(api::ArtifactRequest { name: name.into() })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// Sets (or with `remove`, removes) an entry of the client event table.
    pub async fn set_client_event(
        &mut self,
        req: api::SetClientEventRequest,
    ) -> Result<api::ClientEventEntry, String> {
        Ok(self
            .inner
            .set_client_event(req)
            .await
            .map_err(status)?
            .into_inner())
    }

    /// The client event table.
    pub async fn client_events(&mut self) -> Result<Vec<api::ClientEventEntry>, String> {
        Ok(self
            .inner
            .list_client_events(api::ListClientEventsRequest {})
            .await
            .map_err(status)?
            .into_inner()
            .entries)
    }

    /// Calls `each` with every stored batch of a client's event artifact as it arrives (memory:
    /// one batch); returns how many batches. With `follow` it ends only when `each` fails or the
    /// stream breaks.
    pub async fn each_event_page(
        &mut self,
        req: api::GetEventsRequest,
        mut each: impl FnMut(api::EventPage) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut s = self
            .inner
            .get_events(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut n = 0;
        while let Some(page) = s.message().await.map_err(status)? {
            each(page)?;
            n += 1;
        }
        Ok(n)
    }

    /// Calls `each` with every page of a search across clients as it arrives; returns how
    /// many pages there were.
    pub async fn each_search_page(
        &mut self,
        req: api::SearchEventsRequest,
        mut each: impl FnMut(api::EventPage) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut s = self
            .inner
            .search_events(req)
            .await
            .map_err(status)?
            .into_inner();
        let mut n = 0;
        while let Some(page) = s.message().await.map_err(status)? {
            each(page)?;
            n += 1;
        }
        Ok(n)
    }

    /// Stops a hunt.
    pub async fn stop_hunt(&mut self, id: &str) -> Result<api::HuntSummary, String> {
        Ok(self
            .inner
            .stop_hunt(api::HuntRequest { hunt_id: id.into() })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Calls `each(client_id, flow_id, row)` with every row a hunt collected as its page arrives
    /// (memory: one page, however many rows); returns how many there were. An error from `each`
    /// stops the stream.
    pub async fn each_hunt_row(
        &mut self,
        id: &str,
        mut each: impl FnMut(&str, &str, serde_json::Value) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut s = self
            .inner
            .get_hunt_results(api::HuntRequest { hunt_id: id.into() })
            .await
            .map_err(status)?
            .into_inner();
        let mut n = 0;
        while let Some(page) = s.message().await.map_err(status)? {
            for r in page.rows {
                let v = serde_json::from_slice(&r)
                    .map_err(|e| format!("a stored row is not JSON: {e}"))?;
                each(&page.client_id, &page.flow_id, v)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The name of a hunt state as printed.
pub fn hunt_state_name(state: i32) -> &'static str {
    match api::HuntState::try_from(state) {
        Ok(api::HuntState::Running) => "running",
        Ok(api::HuntState::Stopped) => "stopped",
        Ok(api::HuntState::Expired) => "expired",
        Ok(api::HuntState::Complete) => "complete",
        _ => "unknown",
    }
}

/// `{hunt_id, state, artifact, created, expires, stats: {scheduled, completed, errors, rows, uploaded_bytes}, ...}`.
pub fn hunt_json(h: &api::HuntSummary) -> serde_json::Value {
    let s = h.stats.unwrap_or_default();
    serde_json::json!({
        "hunt_id": h.hunt_id,
        "state": hunt_state_name(h.state),
        "artifact": h.artifact,
        "params": h.params.iter().collect::<BTreeMap<_, _>>(),
        "created_ms": h.created_unix_ms,
        "expires_ms": h.expires_unix_ms,
        "include_labels": h.include_labels,
        "exclude_labels": h.exclude_labels,
        "os": h.os,
        "client_limit": h.client_limit,
        "description": h.description,
        "creator": h.creator,
        "stats": {
            "scheduled": s.scheduled,
            "completed": s.completed,
            "errors": s.errors,
            "rows": s.rows,
            "uploaded_bytes": s.uploaded_bytes,
        },
    })
}

/// Parses `90`, `30s`, `10m`, `2h`, `7d` into seconds.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let bad = || format!("duration {s:?}: use e.g. 90, 30s, 10m, 2h or 7d");
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    n.checked_mul(mult).ok_or_else(bad)
}

/// Writes rows as CSV (through the `csv` crate): `client_id,flow_id,` then the given columns (a
/// row's other keys are not shown), strings through [`crate::text::csv_value`] (formulas
/// neutralised unless `raw`), other values as JSON.
pub struct Csv {
    keys: Vec<String>,
    raw: bool,
}

impl Csv {
    /// CSV with these columns after `client_id,flow_id`.
    pub fn new(keys: impl IntoIterator<Item = String>, raw: bool) -> Csv {
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort();
        keys.dedup();
        Csv { keys, raw }
    }

    /// One record as a line (no line break).
    fn line<'a>(fields: impl IntoIterator<Item = Cow<'a, str>>) -> String {
        let mut w = csv::WriterBuilder::new()
            .buffer_capacity(1024)
            .from_writer(Vec::new());
        let fields: Vec<Cow<'a, str>> = fields.into_iter().collect();
        // Into memory: neither can fail.
        w.write_record(fields.iter().map(|f| f.as_bytes()))
            .expect("a CSV record is written to memory");
        let mut bytes = w.into_inner().expect("a CSV record is written to memory");
        bytes.pop(); // The record's terminator.
        String::from_utf8(bytes).expect("UTF-8 fields make a UTF-8 line")
    }

    /// The header line (no line break).
    pub fn header(&self) -> String {
        let names = ["client_id", "flow_id"].into_iter().map(Cow::Borrowed);
        let keys = self.keys.iter().map(|k| csv_value(k, self.raw));
        Csv::line(names.chain(keys))
    }

    /// One row's line (no line break); false in the second place if the row has keys that are not
    /// columns.
    pub fn row(&self, client: &str, flow: &str, r: &serde_json::Value) -> (String, bool) {
        let ids = [csv_value(client, self.raw), csv_value(flow, self.raw)];
        let cells = self.keys.iter().map(|k| match r.get(k) {
            None | Some(serde_json::Value::Null) => Cow::Borrowed(""),
            Some(serde_json::Value::String(s)) => csv_value(s, self.raw),
            // Numbers, booleans, arrays and objects cannot start a formula.
            Some(v) => Cow::Owned(v.to_string()),
        });
        let line = Csv::line(ids.into_iter().chain(cells));
        let covered = r
            .as_object()
            .is_none_or(|o| o.keys().all(|k| self.keys.binary_search(k).is_ok()));
        (line, covered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert_eq!(parse_duration_s("10m"), Ok(600));
        assert_eq!(parse_duration_s("7d"), Ok(604_800));
        for bad in ["", "0", "5w", "m", "-1h", "99999999999999999999d"] {
            assert!(parse_duration_s(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_quotes_what_needs_it_and_takes_the_given_columns() {
        let rows: Vec<(String, String, serde_json::Value)> = vec![
            (
                "C.1".into(),
                "F.1".into(),
                serde_json::json!({"a": 1, "b": "x,y"}),
            ),
            (
                "C.2".into(),
                "F.2".into(),
                serde_json::json!({"c": "say \"hi\""}),
            ),
        ];
        assert_eq!(
            {
                let csv = Csv::new(
                    rows.iter()
                        .filter_map(|(_, _, r)| r.as_object())
                        .flat_map(|o| o.keys().cloned()),
                    false,
                );
                let mut out = csv.header();
                for (c, f, r) in &rows {
                    out.push('\n');
                    out.push_str(&csv.row(c, f, r).0);
                }
                out
            },
            "client_id,flow_id,a,b,c\nC.1,F.1,1,\"x,y\",\nC.2,F.2,,,\"say \"\"hi\"\"\""
        );
    }
}
