//! The analyst's `Api` gRPC service (master) and the API's views of clients, flows and hunts.

use super::api_reads::{self, PAGE_DEFAULT, PAGE_MAX, Watches, page};
use super::*;

/// Longest reason a cancel accepts (it is stored in the flow's record and the audit log).
pub const CANCEL_REASON_BYTES_MAX: usize = 1024;

/// Default and largest page of a client search.
pub const SEARCH_DEFAULT: u32 = 1000;
/// See [`SEARCH_DEFAULT`].
pub const SEARCH_MAX: u32 = 10_000;

/// Default hunt lifetime when the request gives none.
pub const HUNT_EXPIRES_DEFAULT_S: u64 = 7 * 24 * 3600;

/// The API's view of a hunt.
pub fn hunt_summary(h: &HuntView) -> api::HuntSummary {
    let (r, s) = (&h.record, h.stats);
    let state = match r.state {
        HuntState::Running => api::HuntState::Running,
        HuntState::Stopped => api::HuntState::Stopped,
        HuntState::Expired => api::HuntState::Expired,
        HuntState::Complete => api::HuntState::Complete,
    };
    api::HuntSummary {
        hunt_id: r.id.to_string(),
        state: state as i32,
        artifact: r.spec.artifact.clone(),
        params: r.spec.params.clone().into_iter().collect(),
        created_unix_ms: r.created.as_ms(),
        expires_unix_ms: r.spec.expires.as_ms(),
        stats: Some(api::HuntStats {
            scheduled: s.scheduled,
            completed: s.completed,
            errors: s.errors,
            rows: s.rows,
            uploaded_bytes: s.uploaded_bytes,
        }),
        include_labels: r.spec.include_labels.iter().cloned().collect(),
        exclude_labels: r.spec.exclude_labels.iter().cloned().collect(),
        os: r.spec.os.clone().unwrap_or_default(),
        client_limit: r.spec.client_limit.unwrap_or(0),
        description: r.spec.description.clone(),
        creator: r.spec.creator.clone(),
    }
}

pub(super) fn summary(r: &talon_core::registry::ClientRecord) -> api::ClientSummary {
    api::ClientSummary {
        client_id: r.id.to_string(),
        hostname: r.hostname.clone(),
        os: r.os.clone(),
        labels: r.labels.iter().cloned().collect(),
        last_seen_unix_ms: r.last_seen.as_ms(),
        last_ip: r.last_ip.clone(),
        node: r.node.clone(),
        connected: r.connected,
        fqdn: r.fqdn.clone(),
        ips: r.ips.clone(),
        first_seen_unix_ms: r.first_seen.as_ms(),
    }
}

/// The API's view of a flow record.
pub fn flow_summary(f: &FlowJson) -> api::FlowSummary {
    let state = match f.state {
        FlowRecordState::Queued | FlowRecordState::Running => comms::FlowState::Running,
        FlowRecordState::Completed => comms::FlowState::Completed,
        FlowRecordState::Error => comms::FlowState::Error,
    };
    api::FlowSummary {
        client_id: f.client_id.clone(),
        flow_id: f.flow_id.clone(),
        artifact: f.artifact.clone(),
        state: state as i32,
        rows: f.rows,
        uploaded_bytes: f.uploaded_bytes,
        error: f.error.clone(),
        created_unix_ms: f.created_ms,
        finished_unix_ms: f.finished_ms,
        hunt_id: f.hunt_id.clone().unwrap_or_default(),
        params: f.params.clone().into_iter().collect(),
    }
}

/// Flows whose results `stream_flows` reads ahead of the one it is sending: on a network volume
/// each read is a round trip, so reading flows one after another costs a hunt one round trip per
/// message and per flow.
pub const RESULT_FLOWS_AHEAD: usize = 16;

/// Blocks of segment data files one results request keeps (each
/// [`crate::storage::segments::CACHE_BLOCK_BYTES`]): 32 MiB.
pub const RESULT_CACHE_BLOCKS: usize = 32;

/// Pages each flow read ahead may hold.
pub const RESULT_PAGES_AHEAD: usize = 4;

/// Streams the result rows of `flows` from the filestore, one page per stored rows message: flows in
/// the order given, each in sequence order, from the runs its flow record names (a flow not yet
/// complete has none, and shows no rows), through a [`crate::storage::segments::BlockCache`] of
/// [`RESULT_CACHE_BLOCKS`]. Up to [`RESULT_FLOWS_AHEAD`] flows are read at once,
/// each into its own channel of [`RESULT_PAGES_AHEAD`] pages, so memory stays bounded whatever the
/// flows' size; a reader stops when the caller goes away.
pub(super) fn stream_flows(fs: SharedVolume, ds: Meta, flows: Vec<(ClientId, FlowId)>) -> Pages {
    // The flows' runs lie side by side in a few data files: read them in large shared blocks.
    let fs = SharedVolume::new(crate::storage::segments::BlockCache::new(
        fs,
        RESULT_CACHE_BLOCKS,
    ));
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut flows = flows.into_iter();
        let mut ahead = std::collections::VecDeque::new();
        loop {
            while ahead.len() < RESULT_FLOWS_AHEAD {
                let Some((client, flow)) = flows.next() else {
                    break;
                };
                let (ftx, frx) = mpsc::channel(RESULT_PAGES_AHEAD);
                tokio::spawn(read_flow_pages(fs.clone(), ds.clone(), client, flow, ftx));
                ahead.push_back(frx);
            }
            let Some(mut next) = ahead.pop_front() else {
                return;
            };
            while let Some(page) = next.recv().await {
                let failed = page.is_err();
                // Returning drops the readers' channels: each stops at its next send.
                if tx.send(page).await.is_err() || failed {
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Sends one flow's rows pages into `tx` in sequence order (an error ends it).
pub(super) async fn read_flow_pages(
    fs: SharedVolume,
    ds: Meta,
    client: ClientId,
    flow: FlowId,
    tx: mpsc::Sender<Result<api::ResultPage, Status>>,
) {
    let unavailable = |e: String| Err(Status::unavailable(format!("filestore: {e}")));
    let runs = match load_json::<FlowJson>(&ds, &paths::flow_record(&client, &flow)).await {
        Ok(Some(f)) if f.state.is_final() => f.runs,
        Ok(_) => return, // Not complete: nothing to show yet.
        Err(e) => {
            let _ = tx.send(Err(e.status())).await;
            return;
        }
    };
    let dir = paths::flow_messages_dir(&client, &flow);
    let mut reader = match MessageReader::new(&fs, &dir, &runs).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.send(unavailable(e.to_string())).await;
            return;
        }
    };
    loop {
        let msg = match reader.next().await {
            Ok(Some((name, bytes))) => comms::FlowMessage::decode(bytes)
                .map_err(|e| Status::data_loss(format!("{name}: {e}"))),
            Ok(None) => return,
            Err(e) => Err(Status::unavailable(format!("filestore: {e}"))),
        };
        let page = match msg {
            Ok(comms::FlowMessage {
                payload: Some(comms::flow_message::Payload::Rows(r)),
                ..
            }) => Ok(api::ResultPage {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                rows: r.rows,
            }),
            Ok(_) => continue,
            Err(e) => Err(e),
        };
        let failed = page.is_err();
        if tx.send(page).await.is_err() || failed {
            return;
        }
    }
}

fn user_info(u: &crate::gui::users::User) -> api::UserInfo {
    api::UserInfo {
        name: u.name.clone(),
        role: u.role.to_string(),
        created_unix_ms: u.created_ms,
        changed_unix_ms: u.changed_ms,
    }
}

/// The analyst's gRPC API (master only); every call needs an API certificate.
#[derive(Clone)]
pub struct ApiService {
    node: Node,
    watches: Watches,
    /// The GUI's users (the master's; `None`: `ListUsers`/`SetUser` are refused).
    users: Option<crate::gui::users::Users>,
}

impl ApiService {
    /// Serves the API through `node`.
    pub fn new(node: Node) -> ApiService {
        let watches = Watches::new(api_reads::WATCHES_MAX);
        ApiService {
            node,
            watches,
            users: None,
        }
    }

    /// Serves the GUI's users in `users` too.
    pub fn with_users(mut self, users: crate::gui::users::Users) -> ApiService {
        self.users = Some(users);
        self
    }

    fn users(&self) -> Result<crate::gui::users::Users, Status> {
        self.users
            .clone()
            .ok_or_else(|| Status::unimplemented("this node keeps no GUI users"))
    }

    /// Rows `offset..offset + limit` of a hunt's results, in `GetHuntResults`' order, and the
    /// hunt's total rows (the GUI's results pages without a filter or a sort). The master knows
    /// the rows each participant stored, so only the flows the window overlaps are read: reading
    /// every flow before it cost each page the whole hunt's results (docs/gui.md, "Results").
    pub(crate) async fn hunt_rows_window(
        &self,
        req: Request<api::HuntRequest>,
        offset: u64,
        limit: usize,
    ) -> Result<(u64, Vec<api::ResultPage>), Status> {
        use tokio_stream::StreamExt;
        let user = require(&req, Access::Reader)?;
        let id = parse_hunt(&req.into_inner().hunt_id)?;
        let flows = match self.node.request(&user, CoreRequest::HuntFlows(id)).await? {
            Answer::Participants(flows) => flows,
            a => return Err(unexpected(a)),
        };
        let w = rows_window(flows, offset, limit);
        let mut pages = stream_flows(
            self.node.filestore.volume().clone(),
            self.node.datastore.clone(),
            w.flows,
        );
        let (mut skip, mut left, mut out) = (w.skip, limit, Vec::new());
        while left > 0 {
            let Some(page) = pages.next().await else {
                break;
            };
            let mut page = page?;
            let skipped = usize::try_from(skip)
                .unwrap_or(usize::MAX)
                .min(page.rows.len());
            page.rows.drain(..skipped);
            skip -= skipped as u64;
            page.rows.truncate(left);
            left -= page.rows.len();
            if !page.rows.is_empty() {
                out.push(page);
            }
        }
        Ok((w.total, out))
    }
}

/// Which flows a window of a hunt's rows reads.
#[derive(Debug, PartialEq, Eq)]
struct RowsWindow<C, F> {
    /// Rows of every ended flow.
    total: u64,
    /// The ended flows with rows that overlap the window, in order.
    flows: Vec<(C, F)>,
    /// Rows of the first of them that come before the window.
    skip: u64,
}

/// The flows (in order, each with the rows it stored once it ended; None while it runs) that
/// rows `offset..offset + limit` of their concatenation lie in.
fn rows_window<C, F>(
    flows: impl IntoIterator<Item = (C, F, Option<u64>)>,
    offset: u64,
    limit: usize,
) -> RowsWindow<C, F> {
    let end = offset.saturating_add(limit as u64);
    let (mut total, mut window, mut skip) = (0u64, Vec::new(), 0u64);
    for (c, f, rows) in flows {
        let n = rows.unwrap_or(0);
        if n > 0 && total < end && total.saturating_add(n) > offset {
            if window.is_empty() {
                skip = offset.saturating_sub(total);
            }
            window.push((c, f));
        }
        total = total.saturating_add(n);
    }
    RowsWindow {
        total,
        flows: window,
        skip,
    }
}

/// A GUI user on whose behalf the GUI calls the API in-process (a request extension: only code in
/// this process can set it, never a peer).
#[derive(Clone, Debug)]
pub struct GuiUser {
    /// The user's name (as it appears in the audit log).
    pub name: String,
    /// The user's role.
    pub access: Access,
}

/// Checks that a call came from a GUI session or over an API certificate, and that its user's role
/// allows `need`; returns the user's name (the certificate's CN, or the GUI user's name).
pub(super) fn require<T>(req: &Request<T>, need: Access) -> Result<String, Status> {
    let (user, has) = match req.extensions().get::<GuiUser>() {
        Some(u) => (u.name.clone(), u.access),
        None => {
            let user = crate::net::tls::require_role(req, Role::Api, "an API certificate")?;
            let peer = req.extensions().get::<crate::net::tls::Peer>();
            (user, peer.map_or(Access::Reader, |p| p.access))
        }
    };
    if has < need {
        return Err(Status::permission_denied(format!(
            "{user:?} has the {has} role; this needs {need}"
        )));
    }
    Ok(user)
}

pub(super) type Pages = tokio_stream::wrappers::ReceiverStream<Result<api::ResultPage, Status>>;

impl ApiService {
    /// A request whose answer is one hunt.
    async fn hunt(&self, user: &str, req: CoreRequest) -> Result<api::HuntSummary, Status> {
        hunt_request(&self.node, user, req).await
    }
}

/// `user`'s request whose answer is one hunt.
async fn hunt_request(
    node: &Node,
    user: &str,
    req: CoreRequest,
) -> Result<api::HuntSummary, Status> {
    match node.request(user, req).await? {
        Answer::Hunt(h) => Ok(hunt_summary(&h)),
        a => Err(unexpected(a)),
    }
}

/// A flow request's ids.
fn flow_ids(r: &api::FlowRequest) -> Result<(ClientId, FlowId), Status> {
    let client = ClientId::parse(&r.client_id).map_err(invalid)?;
    let flow = FlowId::parse(&r.flow_id).map_err(invalid)?;
    Ok((client, flow))
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// An answer of the wrong kind: a bug.
fn unexpected(a: Answer) -> Status {
    Status::internal(format!("unexpected answer from the node: {a:?}"))
}

/// A hunt request's labels, normalised (a bad one is `INVALID_ARGUMENT` naming it).
fn labels(ls: Vec<String>) -> Result<BTreeSet<String>, Status> {
    ls.iter()
        .map(|l| talon_core::registry::normalize_label(l).map_err(invalid))
        .collect()
}

/// An analyst's hunt request as the hunt manager takes it, validated.
async fn hunt_spec(
    ds: &Meta,
    (now, user): (Timestamp, &str),
    req: api::CreateHuntRequest,
) -> Result<HuntSpec, Status> {
    let given: BTreeMap<String, String> = req.params.into_iter().collect();
    let (spec, params, queries) =
        super::repository::prepare(ds, &req.artifact, &given, false).await?;
    let os = match req.os.to_ascii_lowercase().as_str() {
        "" => None,
        o @ ("linux" | "windows" | "darwin") => {
            // A hunt for a platform its artifact cannot run on would only collect errors.
            let on = crate::query::platforms(&queries);
            if !on.contains(o) {
                return Err(Status::invalid_argument(format!(
                    "--os {o}: {} runs on {} only (no artifact or endpoint table supports {o} \
                     yet; see `talon artifacts tables`)",
                    spec.name,
                    on.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
            Some(o.to_owned())
        }
        o => {
            return Err(Status::invalid_argument(format!(
                "--os {o:?}: use linux, windows or darwin"
            )));
        }
    };
    let ttl_s = if req.expires_in_s == 0 {
        HUNT_EXPIRES_DEFAULT_S
    } else {
        req.expires_in_s
    };
    Ok(HuntSpec {
        artifact: spec.name,
        params,
        include_labels: labels(req.include_labels)?,
        exclude_labels: labels(req.exclude_labels)?,
        os,
        expires: now.plus_ms(ttl_s.saturating_mul(1000)),
        client_limit: (req.client_limit > 0).then_some(req.client_limit),
        description: req.description,
        creator: user.to_owned(),
    })
}

#[tonic::async_trait]
impl api::api_server::Api for ApiService {
    async fn search_clients(
        &self,
        req: Request<api::SearchRequest>,
    ) -> Result<Response<api::SearchResponse>, Status> {
        let user = require(&req, Access::Reader)?;
        let r = req.into_inner();
        let (offset, limit) = page(r.offset, r.limit, SEARCH_DEFAULT, SEARCH_MAX)?;
        let sort = talon_core::registry::SortKey::parse(&r.sort).map_err(invalid)?;
        let req = CoreRequest::Search {
            query: r.query,
            sort,
            descending: r.descending,
            offset,
            limit,
        };
        match self.node.request(&user, req).await? {
            Answer::Clients {
                clients,
                truncated,
                total,
            } => Ok(Response::new(api::SearchResponse {
                clients: clients.iter().map(summary).collect(),
                truncated,
                total: total as u64,
            })),
            a => Err(unexpected(a)),
        }
    }

    async fn modify_label(
        &self,
        req: Request<api::LabelRequest>,
    ) -> Result<Response<api::ClientSummary>, Status> {
        let user = require(&req, Access::Investigator)?;
        let r = req.into_inner();
        let client = ClientId::parse(&r.client_id).map_err(invalid)?;
        let (label, remove) = (r.label, r.remove);
        let req = CoreRequest::Label {
            client,
            label,
            remove,
        };
        match self.node.request(&user, req).await? {
            Answer::Client(c) => {
                self.node.labels_changed(c.id.clone()).await;
                Ok(Response::new(summary(&c)))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn collect(
        &self,
        req: Request<api::CollectRequest>,
    ) -> Result<Response<api::FlowSummary>, Status> {
        let user = require(&req, Access::Investigator)?;
        let r = req.into_inner();
        let client = ClientId::parse(&r.client_id).map_err(invalid)?;
        let given = r.params.into_iter().collect();
        let (spec, params, queries) =
            super::repository::prepare(&self.node.datastore, &r.artifact, &given, false).await?;
        // OS honesty: a client of a platform the artifact cannot run on would only report an error.
        let on = crate::query::platforms(&queries);
        let key = paths::client_record(&client);
        if let Some(c) =
            load_json::<crate::storage::records::ClientJson>(&self.node.datastore, &key)
                .await
                .map_err(|e| e.status())?
            && !c.os.is_empty()
            && !on.contains(c.os.as_str())
        {
            return Err(Status::failed_precondition(format!(
                "client {client} runs {}; {} runs on {} only (no artifact or endpoint table \
                 supports {} yet; see `talon artifacts tables`)",
                crate::text::printable(&c.os),
                spec.name,
                on.into_iter().collect::<Vec<_>>().join(", "),
                crate::text::printable(&c.os)
            )));
        }
        let flow = NewFlow {
            client,
            flow: FlowId::from_u64(self.node.random()),
            artifact: spec.name,
            params,
            hunt: None,
            created: self.node.clock.now(),
        };
        let req = CoreRequest::Collect(Box::new(flow));
        match self.node.request(&user, req).await? {
            Answer::Flow(f) => {
                tracing::info!(client = %f.client, flow = %f.flow, artifact = %f.artifact, %user, "collection scheduled");
                Ok(Response::new(flow_summary(&flow_json(&f))))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn get_flow(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<api::FlowSummary>, Status> {
        require(&req, Access::Reader)?;
        let (client, flow) = flow_ids(req.get_ref())?;
        let rec = api_reads::flow_record(&self.node.datastore, &client, &flow).await?;
        Ok(Response::new(flow_summary(&rec)))
    }

    type GetFlowResultsStream = Pages;

    async fn get_flow_results(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<Pages>, Status> {
        require(&req, Access::Reader)?;
        let (client, flow) = flow_ids(req.get_ref())?;
        Ok(Response::new(stream_flows(
            self.node.filestore.volume().clone(),
            self.node.datastore.clone(),
            vec![(client, flow)],
        )))
    }

    async fn create_hunt(
        &self,
        req: Request<api::CreateHuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        let user = require(&req, Access::Investigator)?;
        let spec = hunt_spec(
            &self.node.datastore,
            (self.node.clock.now(), &user),
            req.into_inner(),
        )
        .await?;
        let id = HuntId::from_u64(self.node.random());
        let h = self
            .hunt(&user, CoreRequest::CreateHunt { id, spec })
            .await?;
        tracing::info!(hunt = %h.hunt_id, artifact = %h.artifact, %user, "hunt created");
        Ok(Response::new(h))
    }

    async fn list_hunts(
        &self,
        req: Request<api::ListHuntsRequest>,
    ) -> Result<Response<api::ListHuntsResponse>, Status> {
        let user = require(&req, Access::Reader)?;
        let r = req.into_inner();
        let (offset, limit) = page(r.offset, r.limit, PAGE_DEFAULT, PAGE_MAX)?;
        match self.node.request(&user, CoreRequest::Hunts(None)).await? {
            Answer::Hunts(mut hunts) => {
                // Newest first (ties by id).
                hunts.sort_by(|a, b| {
                    (b.record.created, &b.record.id).cmp(&(a.record.created, &a.record.id))
                });
                Ok(Response::new(api::ListHuntsResponse {
                    total: hunts.len() as u64,
                    hunts: hunts
                        .iter()
                        .skip(offset)
                        .take(limit)
                        .map(hunt_summary)
                        .collect(),
                }))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn get_hunt(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        let user = require(&req, Access::Reader)?;
        let id = parse_hunt(&req.into_inner().hunt_id)?;
        self.hunt(&user, CoreRequest::Hunts(Some(id)))
            .await
            .map(Response::new)
    }

    async fn stop_hunt(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<api::HuntSummary>, Status> {
        let user = require(&req, Access::Investigator)?;
        let id = parse_hunt(&req.into_inner().hunt_id)?;
        let h = self.hunt(&user, CoreRequest::StopHunt(id)).await?;
        tracing::info!(hunt = %h.hunt_id, %user, "hunt stopped");
        Ok(Response::new(h))
    }

    type GetHuntResultsStream = Pages;

    async fn get_hunt_results(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<Pages>, Status> {
        let user = require(&req, Access::Reader)?;
        let id = parse_hunt(&req.into_inner().hunt_id)?;
        let flows = match self.node.request(&user, CoreRequest::HuntFlows(id)).await? {
            Answer::Participants(flows) => flows,
            a => return Err(unexpected(a)),
        };
        Ok(Response::new(stream_flows(
            self.node.filestore.volume().clone(),
            self.node.datastore.clone(),
            flows.into_iter().map(|(c, f, _)| (c, f)).collect(),
        )))
    }

    async fn get_cluster(
        &self,
        req: Request<api::ClusterRequest>,
    ) -> Result<Response<api::ClusterStatus>, Status> {
        let user = require(&req, Access::Reader)?;
        let minions = match self.node.request(&user, CoreRequest::Minions).await? {
            Answer::Minions(m) => m,
            a => return Err(unexpected(a)),
        };
        let now = self.node.clock.now().as_ms();
        let nodes = match self.node.request(&user, CoreRequest::ClientCounts).await? {
            Answer::ClientCounts(c) => c,
            a => return Err(unexpected(a)),
        };
        let meta = match &self.node.datastore {
            Meta::Local(d) => d.volume_error(),
            Meta::Remote(_) => None,
        };
        let volume_failures = [
            ("metadata", meta),
            ("filestore", self.node.filestore.volume_error()),
        ]
        .into_iter()
        .filter_map(|(store, e)| {
            e.map(|(t, why)| api::VolumeFailure {
                store: store.into(),
                error: why.to_string(),
                since_unix_ms: t.as_ms(),
            })
        })
        .collect();
        Ok(Response::new(api::ClusterStatus {
            nodes: nodes
                .into_iter()
                .map(|(node, enrolled, connected)| api::NodeClients {
                    node,
                    enrolled,
                    connected,
                })
                .collect(),
            volume_failures,
            master: self.node.name.clone(),
            minions: minions
                .into_iter()
                .map(|m| api::MinionStatus {
                    node: m.node,
                    connected: m.connected,
                    epoch: m.durable.map_or(0, |c| c.epoch),
                    applied: m.durable.map_or(0, |c| c.hwm),
                    backlog_events: m.backlog.map(|b| b.events),
                    lag_ms: m
                        .backlog
                        .and_then(|b| b.oldest_ms)
                        .map_or(0, |t| now.saturating_sub(t)),
                })
                .collect(),
        }))
    }

    async fn list_artifacts(
        &self,
        req: Request<api::ListArtifactsRequest>,
    ) -> Result<Response<api::ListArtifactsResponse>, Status> {
        use super::repository as repo;
        require(&req, Access::Reader)?;
        let ds = &self.node.datastore;
        let mut artifacts = crate::definitions::builtin_infos();
        for r in repo::customs(ds).await? {
            let on = crate::query::check_artifact(&r.spec, &BTreeMap::new())
                .map(|q| repo::platforms_of(&q))
                .unwrap_or_default();
            artifacts.push(repo::info(&r.spec, false, on, None));
        }
        Ok(Response::new(api::ListArtifactsResponse { artifacts }))
    }

    async fn get_artifact(
        &self,
        req: Request<api::ArtifactRequest>,
    ) -> Result<Response<api::ArtifactInfo>, Status> {
        use super::repository as repo;
        require(&req, Access::Reader)?;
        let r = repo::resolve(&self.node.datastore, &req.get_ref().name).await?;
        let on = crate::query::check_artifact(&r.spec, &BTreeMap::new())
            .map(|q| repo::platforms_of(&q))
            .unwrap_or_default();
        Ok(Response::new(repo::info(
            &r.spec,
            r.builtin,
            on,
            Some(&r.text),
        )))
    }

    async fn add_artifact(
        &self,
        req: Request<api::AddArtifactRequest>,
    ) -> Result<Response<api::ArtifactInfo>, Status> {
        use super::repository as repo;
        let user = require(&req, Access::Administrator)?;
        let r = req.into_inner();
        let (spec, queries) =
            repo::check_new(&self.node.datastore, &r.definition, r.replace).await?;
        let put = CoreRequest::PutArtifact {
            name: spec.name.clone(),
            definition: Some(r.definition.clone()),
        };
        match self.node.request(&user, put).await? {
            Answer::ArtifactPut => {
                tracing::info!(artifact = %spec.name, %user, "artifact added");
                let on = repo::platforms_of(&queries);
                Ok(Response::new(repo::info(
                    &spec,
                    false,
                    on,
                    Some(&r.definition),
                )))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn set_client_event(
        &self,
        req: Request<api::SetClientEventRequest>,
    ) -> Result<Response<api::ClientEventEntry>, Status> {
        let user = require(&req, Access::Administrator)?;
        super::events::set_entry(&self.node, &user, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_client_events(
        &self,
        req: Request<api::ListClientEventsRequest>,
    ) -> Result<Response<api::ListClientEventsResponse>, Status> {
        require(&req, Access::Reader)?;
        let entries = super::events::load_table(&self.node.datastore)
            .await
            .map_err(|e| e.status())?;
        Ok(Response::new(api::ListClientEventsResponse {
            entries: entries.into_iter().map(super::events::entry_view).collect(),
        }))
    }

    type GetEventsStream = super::events::EventPages;

    async fn get_events(
        &self,
        req: Request<api::GetEventsRequest>,
    ) -> Result<Response<Self::GetEventsStream>, Status> {
        require(&req, Access::Reader)?;
        super::events::get_events(&self.node, req.into_inner()).map(Response::new)
    }

    type SearchEventsStream = super::events::EventPages;

    async fn search_events(
        &self,
        req: Request<api::SearchEventsRequest>,
    ) -> Result<Response<Self::SearchEventsStream>, Status> {
        require(&req, Access::Reader)?;
        super::events::search_events(&self.node, req.into_inner()).map(Response::new)
    }

    async fn remove_artifact(
        &self,
        req: Request<api::ArtifactRequest>,
    ) -> Result<Response<api::RemoveArtifactResponse>, Status> {
        use super::repository as repo;
        let user = require(&req, Access::Administrator)?;
        let name = req.into_inner().name;
        if crate::definitions::builtin(&name).is_some() {
            return Err(Status::failed_precondition(format!(
                "{name} is a built-in artifact; built-ins cannot be removed"
            )));
        }
        if !repo::custom_names(&self.node.datastore)
            .await?
            .contains(&name)
        {
            return Err(Status::not_found(format!("no custom artifact {name:?}")));
        }
        let put = CoreRequest::PutArtifact {
            name: name.clone(),
            definition: None,
        };
        match self.node.request(&user, put).await? {
            Answer::ArtifactPut => {
                tracing::info!(artifact = %name, %user, "artifact removed");
                Ok(Response::new(api::RemoveArtifactResponse {}))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn list_flows(
        &self,
        req: Request<api::ListFlowsRequest>,
    ) -> Result<Response<api::ListFlowsResponse>, Status> {
        require(&req, Access::Reader)?;
        let r = req.into_inner();
        let client = ClientId::parse(&r.client_id).map_err(invalid)?;
        let (offset, limit) = page(r.offset, r.limit, PAGE_DEFAULT, PAGE_MAX)?;
        let (flows, total) =
            api_reads::client_flows(&self.node.datastore, &client, offset, limit).await?;
        Ok(Response::new(api::ListFlowsResponse {
            flows: flows.iter().map(flow_summary).collect(),
            total,
        }))
    }

    async fn list_uploads(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<api::ListUploadsResponse>, Status> {
        require(&req, Access::Reader)?;
        let (client, flow) = flow_ids(req.get_ref())?;
        let rec = api_reads::flow_record(&self.node.datastore, &client, &flow).await?;
        Ok(Response::new(api::ListUploadsResponse {
            uploads: rec.uploads.iter().map(api_reads::upload_info).collect(),
        }))
    }

    type DownloadUploadStream = api_reads::Chunks;

    async fn download_upload(
        &self,
        req: Request<api::DownloadRequest>,
    ) -> Result<Response<api_reads::Chunks>, Status> {
        require(&req, Access::Reader)?;
        let r = req.into_inner();
        let client = ClientId::parse(&r.client_id).map_err(invalid)?;
        let flow = FlowId::parse(&r.flow_id).map_err(invalid)?;
        let rec = api_reads::flow_record(&self.node.datastore, &client, &flow).await?;
        let Some(u) = rec.uploads.into_iter().find(|u| u.upload_id == r.upload_id) else {
            return Err(Status::not_found(format!(
                "flow {flow} of client {client} has no upload {} (list them with ListUploads)",
                r.upload_id
            )));
        };
        if !u.error.is_empty() {
            return Err(Status::failed_precondition(format!(
                "upload {} ({}) could not be reassembled: {}",
                u.upload_id, u.name, u.error
            )));
        }
        let fs = self.node.filestore.volume().clone();
        Ok(Response::new(api_reads::download(fs, u)))
    }

    async fn cancel_flow(
        &self,
        req: Request<api::CancelFlowRequest>,
    ) -> Result<Response<api::CancelFlowResponse>, Status> {
        let user = require(&req, Access::Investigator)?;
        let r = req.into_inner();
        let client = ClientId::parse(&r.client_id).map_err(invalid)?;
        let flow = FlowId::parse(&r.flow_id).map_err(invalid)?;
        let reason = match r.reason.trim() {
            "" => "cancelled".to_owned(),
            why if why.len() > CANCEL_REASON_BYTES_MAX => {
                return Err(Status::invalid_argument(format!(
                    "the reason is {} bytes; at most {CANCEL_REASON_BYTES_MAX}",
                    why.len()
                )));
            }
            why => why.to_owned(),
        };
        // Refused at once if there is no such flow (nor a task for it being written).
        let rec = api_reads::flow_record(&self.node.datastore, &client, &flow).await?;
        if rec.state.is_final() {
            return Err(Status::failed_precondition(format!(
                "flow {flow} has finished already ({})",
                flow_summary(&rec).state().as_str_name()
            )));
        }
        let req = CoreRequest::Cancel {
            client,
            flow,
            reason,
        };
        match self.node.request(&user, req).await? {
            Answer::Cancelled { before_start, told } => {
                tracing::info!(client = %r.client_id, flow = %r.flow_id, %user, before_start, told, "flow cancelled");
                Ok(Response::new(api::CancelFlowResponse {
                    before_start,
                    told,
                }))
            }
            a => Err(unexpected(a)),
        }
    }

    type WatchFlowStream = tokio_stream::wrappers::ReceiverStream<Result<api::FlowSummary, Status>>;

    async fn watch_flow(
        &self,
        req: Request<api::FlowRequest>,
    ) -> Result<Response<Self::WatchFlowStream>, Status> {
        require(&req, Access::Reader)?;
        let (client, flow) = flow_ids(req.get_ref())?;
        let ds = self.node.datastore.clone();
        // Refused now, not as the stream's first message, if there is no such flow; else it is
        // the first message.
        let first = flow_summary(&api_reads::flow_record(&ds, &client, &flow).await?);
        let permit = self.watches.enter()?;
        let look = move || {
            let (ds, client, flow) = (ds.clone(), client.clone(), flow.clone());
            async move {
                let rec = api_reads::flow_record(&ds, &client, &flow).await?;
                Ok(flow_summary(&rec))
            }
        };
        let done = |f: &api::FlowSummary| f.state != comms::FlowState::Running as i32;
        Ok(Response::new(api_reads::watch(permit, first, look, done)))
    }

    type WatchHuntStream = tokio_stream::wrappers::ReceiverStream<Result<api::HuntSummary, Status>>;

    async fn watch_hunt(
        &self,
        req: Request<api::HuntRequest>,
    ) -> Result<Response<Self::WatchHuntStream>, Status> {
        let user = require(&req, Access::Reader)?;
        let id = parse_hunt(&req.into_inner().hunt_id)?;
        let first = self
            .hunt(&user, CoreRequest::Hunts(Some(id.clone())))
            .await?;
        let permit = self.watches.enter()?;
        let node = self.node.clone();
        let look = move || {
            let (node, user, id) = (node.clone(), user.clone(), id.clone());
            async move { hunt_request(&node, &user, CoreRequest::Hunts(Some(id))).await }
        };
        // Done: no longer running, and every participant scheduled has reported.
        let done = |h: &api::HuntSummary| {
            h.state != api::HuntState::Running as i32
                && h.stats
                    .is_none_or(|s| s.completed + s.errors >= s.scheduled)
        };
        Ok(Response::new(api_reads::watch(permit, first, look, done)))
    }

    async fn estimate_hunt(
        &self,
        req: Request<api::CreateHuntRequest>,
    ) -> Result<Response<api::HuntEstimate>, Status> {
        let user = require(&req, Access::Reader)?;
        let r = req.into_inner();
        let req = CoreRequest::Estimate {
            include_labels: labels(r.include_labels)?,
            exclude_labels: labels(r.exclude_labels)?,
            os: Some(r.os).filter(|o| !o.is_empty()),
        };
        match self.node.request(&user, req).await? {
            Answer::Estimate { clients, connected } => {
                Ok(Response::new(api::HuntEstimate { clients, connected }))
            }
            a => Err(unexpected(a)),
        }
    }

    async fn list_hunt_flows(
        &self,
        req: Request<api::ListHuntFlowsRequest>,
    ) -> Result<Response<api::ListFlowsResponse>, Status> {
        let user = require(&req, Access::Reader)?;
        let r = req.into_inner();
        let id = parse_hunt(&r.hunt_id)?;
        let (offset, limit) = page(r.offset, r.limit, PAGE_DEFAULT, PAGE_MAX)?;
        let flows = match self
            .node
            .request(&user, CoreRequest::HuntFlows(id.clone()))
            .await?
        {
            Answer::Participants(flows) => flows,
            a => return Err(unexpected(a)),
        };
        let total = flows.len() as u64;
        let page: Vec<(ClientId, FlowId)> = flows
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(c, f, _)| (c, f))
            .collect();
        let keys = page.iter().map(|(c, f)| paths::flow_record(c, f)).collect();
        let records: Vec<Option<FlowJson>> =
            api_reads::load_each(&self.node.datastore, keys).await?;
        let flows = page
            .iter()
            .zip(records)
            .map(|((c, f), rec)| match rec {
                Some(rec) => flow_summary(&rec),
                // Scheduled; its record is not written yet.
                None => api::FlowSummary {
                    client_id: c.to_string(),
                    flow_id: f.to_string(),
                    state: comms::FlowState::Running as i32,
                    hunt_id: id.to_string(),
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(api::ListFlowsResponse { flows, total }))
    }

    async fn list_users(
        &self,
        req: Request<api::ListUsersRequest>,
    ) -> Result<Response<api::ListUsersResponse>, Status> {
        require(&req, Access::Administrator)?;
        let users = self.users()?;
        let list = tokio::task::spawn_blocking(move || users.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        Ok(Response::new(api::ListUsersResponse {
            users: list.iter().map(user_info).collect(),
        }))
    }

    async fn set_user(
        &self,
        req: Request<api::SetUserRequest>,
    ) -> Result<Response<api::UserInfo>, Status> {
        use crate::gui::users;
        use talon_core::node::master::AuditAction;
        let by = require(&req, Access::Administrator)?;
        let store = self.users()?;
        let r = req.into_inner();
        users::check_name(&r.name).map_err(invalid)?;
        let role = match r.role.as_str() {
            "" => None,
            s => Some(Access::parse(s).map_err(invalid)?),
        };
        if !r.password.is_empty() {
            users::check_password(&r.password).map_err(invalid)?;
        }
        let (s, name) = (store.clone(), r.name.clone());
        let old = tokio::task::spawn_blocking(move || s.get(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        let now = self.node.clock.now().as_ms();
        let (action, detail, next) = match (old, r.remove) {
            (None, true) => return Err(Status::not_found(format!("no user {:?}", r.name))),
            (Some(u), true) => (AuditAction::UserRemove, String::new(), u),
            (None, false) => {
                let role = role.ok_or_else(|| invalid("a new user needs a role"))?;
                if r.password.is_empty() {
                    return Err(invalid("a new user needs a password"));
                }
                let user = users::User {
                    name: r.name.clone(),
                    role,
                    hash: String::new(),
                    created_ms: now,
                    changed_ms: now,
                };
                (AuditAction::UserAdd, format!("role {role}"), user)
            }
            (Some(mut u), false) => {
                if role.is_none() && r.password.is_empty() {
                    return Err(invalid("give a new role, a new password, or both"));
                }
                let mut what = Vec::new();
                if let Some(role) = role {
                    what.push(format!("role {} -> {role}", u.role));
                    u.role = role;
                }
                if !r.password.is_empty() {
                    what.push("password".to_owned());
                }
                u.changed_ms = now.max(u.changed_ms + 1);
                (AuditAction::UserChange, what.join(", "), u)
            }
        };
        // Audited first: a change that is made is always in the log.
        let rec = CoreRequest::RecordUser {
            action,
            name: r.name.clone(),
            detail,
        };
        match self.node.request(&by, rec).await? {
            Answer::Recorded => {}
            a => return Err(unexpected(a)),
        }
        let mut salt = [0u8; 16];
        self.node.entropy.fill(&mut salt);
        let (password, remove) = (r.password, r.remove);
        let done = tokio::task::spawn_blocking(move || -> Result<users::User, String> {
            let mut user = next;
            if remove {
                store.remove(&user.name)?;
                return Ok(user);
            }
            if !password.is_empty() {
                user.set_password(&password, salt)?;
            }
            store.put(&user)?;
            Ok(user)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::unavailable)?;
        tracing::info!(user = %done.name, action = action.name(), by = %by, "GUI user changed");
        Ok(Response::new(user_info(&done)))
    }

    async fn list_audit(
        &self,
        req: Request<api::ListAuditRequest>,
    ) -> Result<Response<api::ListAuditResponse>, Status> {
        require(&req, Access::Administrator)?;
        let r = req.into_inner();
        let (offset, limit) = page(r.offset, r.limit, PAGE_DEFAULT, PAGE_MAX)?;
        let (entries, total) = api_reads::audit(&self.node.datastore, offset, limit).await?;
        Ok(Response::new(api::ListAuditResponse { entries, total }))
    }
}

#[cfg(test)]
mod results_tests {
    use super::*;
    use crate::storage::fs::{LatencyFs, OsFs};
    use crate::storage::volume::Volume;
    use crate::storage::volume::{FsVolume, SyncMode};
    use tokio_stream::StreamExt;

    /// A window of a hunt's rows names exactly the flows whose rows a naive expansion puts in it,
    /// and where in the first one it starts: every offset and limit over flows with no rows,
    /// running flows (no count yet) and flows of one and several rows.
    #[test]
    fn a_rows_window_reads_only_the_flows_it_overlaps() {
        let flows: Vec<(usize, (), Option<u64>)> =
            [Some(3), None, Some(0), Some(1), Some(4), None, Some(2)]
                .into_iter()
                .enumerate()
                .map(|(i, n)| (i, (), n))
                .collect();
        // Each row as (flow, its index in the flow).
        let rows: Vec<(usize, u64)> = flows
            .iter()
            .flat_map(|(i, _, n)| (0..n.unwrap_or(0)).map(move |r| (*i, r)))
            .collect();
        for offset in 0..=rows.len() as u64 + 2 {
            for limit in 1..=rows.len() + 2 {
                let w = rows_window(flows.clone(), offset, limit);
                assert_eq!(w.total, rows.len() as u64);
                let want: Vec<(usize, u64)> = rows
                    .iter()
                    .skip(offset as usize)
                    .take(limit)
                    .copied()
                    .collect();
                let mut want_flows: Vec<usize> = want.iter().map(|(f, _)| *f).collect();
                want_flows.dedup();
                let got: Vec<usize> = w.flows.iter().map(|(f, _)| *f).collect();
                assert_eq!(got, want_flows, "offset {offset} limit {limit}");
                assert_eq!(
                    w.skip,
                    want.first().map_or(0, |(_, r)| *r),
                    "offset {offset} limit {limit}"
                );
            }
        }
    }

    /// Hunt results come in the order of the flows, each flow's pages in sequence order, with
    /// non-row messages skipped, however many flows are read ahead and whichever finish first;
    /// from the runs in the flow records (written in two flushes each, the later one first), or
    /// listed for a flow of the old one-file-per-message layout; a flow not complete shows nothing.
    #[tokio::test(start_paused = true)]
    async fn results_keep_the_flows_order_while_reading_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let fs = LatencyFs::new(
            OsFs::new(&dir.path().join("fs")).unwrap(),
            std::time::Duration::from_millis(50),
        );
        let vol = SharedVolume::new(FsVolume::over(fs, SyncMode::PerFile, "t"));
        let log = crate::storage::segments::SegmentLog::new(vol.clone(), "w", 1000).unwrap();
        let disk = crate::storage::local::StdDisk::new(&dir.path().join("local")).unwrap();
        let meta = SharedVolume::new(FsVolume::new(&dir.path().join("meta")).unwrap());
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (ds, _task, _) = crate::storage::datastore::Datastore::open(
            disk,
            meta,
            clock,
            crate::storage::datastore::DatastoreOptions::default(),
        )
        .unwrap();
        let client = ClientId::from_public_key(b"k");
        // More flows than are read ahead; the early ones have the most messages (finish last).
        let n_flows = RESULT_FLOWS_AHEAD as u64 * 2 + 3;
        let mut flows = Vec::new();
        let mut expected = Vec::new();
        for f in 0..n_flows {
            let flow = FlowId::from_u64(f + 1);
            let msgs = (n_flows - f) % 7 + 1;
            let mut writes = Vec::new();
            for seq in 0..msgs {
                let row = format!("{{\"f\":{f},\"seq\":{seq}}}");
                let m = comms::FlowMessage {
                    flow_id: flow.to_string(),
                    seq,
                    payload: Some(comms::flow_message::Payload::Rows(comms::ResultRows {
                        source: "a".into(),
                        rows: vec![Bytes::from(row.clone())],
                    })),
                };
                writes.push((
                    paths::flow_message(&client, &flow, seq),
                    Some(Bytes::from(m.encode_to_vec())),
                ));
                if f != 5 {
                    expected.push(row);
                }
            }
            let status = comms::FlowMessage {
                flow_id: flow.to_string(),
                seq: msgs,
                payload: Some(comms::flow_message::Payload::Status(Default::default())),
            };
            writes.push((
                paths::flow_message(&client, &flow, msgs),
                Some(Bytes::from(status.encode_to_vec())),
            ));
            let mut record = FlowJson {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                artifact: "Generic.Test.Rows".into(),
                params: BTreeMap::new(),
                hunt_id: None,
                state: FlowRecordState::Completed,
                rows: msgs,
                uploaded_bytes: 0,
                error: String::new(),
                created_ms: 0,
                finished_ms: 1,
                uploads: vec![],
                runs: vec![],
            };
            if f == 3 {
                vol.write_many(writes).await.unwrap(); // The old layout: runs stay empty.
            } else {
                let later = writes.split_off(writes.len() / 2);
                log.write_many(later).await.unwrap();
                log.write_many(writes).await.unwrap();
                let dir = paths::flow_messages_dir(&client, &flow);
                record.runs = log.runs_covering(&dir, msgs + 1).unwrap();
            }
            if f == 5 {
                record.state = FlowRecordState::Running;
            }
            let key = paths::flow_record(&client, &flow);
            ds.set(&key, Bytes::from(serde_json::to_vec(&record).unwrap()))
                .await
                .unwrap();
            flows.push((client.clone(), flow));
        }
        let mut pages = stream_flows(vol, Meta::Local(ds), flows);
        let mut got = Vec::new();
        while let Some(p) = pages.next().await {
            for r in p.unwrap().rows {
                got.push(String::from_utf8(r.to_vec()).unwrap());
            }
        }
        assert_eq!(got, expected);
    }
}
