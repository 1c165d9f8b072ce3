//! The master's role: it drives core `node::Master` (the registry, hunts, tasks not yet delivered
//! and the replication inbox) and the recording of completed flows, performing their writes on the
//! datastore, their messages to clients and minions, and answering the API.

use super::*;

/// Datastore key of a minion's replication cursor (persisted after the effects it covers).
pub(super) fn cursor_key(node: &str) -> String {
    format!("cluster/minions/{}.json", paths::safe_component(node))
}

/// Datastore key of a task not yet acknowledged by its client (protobuf `Task`).
pub(super) fn task_key(client: &ClientId, flow: &FlowId) -> String {
    format!("tasks/{client}/{flow}.pb")
}

/// Hunt participants scheduled in one batch at most (their records built, written together and
/// their tasks sent) before the node yields to its other work.
pub(super) const SCHEDULE_BATCH_MAX: usize = 1024;

/// Reads at most this many keys at once when a master starts (its records are on the 40–60 ms volume:
/// one at a time, 100,000 client records would take over an hour; the datastore bounds its own
/// readers too).
pub(super) const LOAD_CONCURRENCY: usize = 256;

/// Writes each group of keys atomically ([`Meta::write_all`]), up to [`LOAD_CONCURRENCY`] groups at
/// once (so one journal sync covers many); one result per group, in order.
pub(super) async fn write_groups(
    ds: &Meta,
    groups: Vec<Vec<(String, Option<Bytes>)>>,
) -> Vec<Result<(), WriteError>> {
    // A group whose task panicked keeps this error: it may have been written.
    let mut out: Vec<Result<(), WriteError>> = (0..groups.len())
        .map(|_| {
            Err(WriteError {
                outcome: Outcome::Unknown,
                message: "the write task failed".to_owned(),
            })
        })
        .collect();
    let mut set = tokio::task::JoinSet::new();
    let mut todo = groups.into_iter().enumerate();
    loop {
        while set.len() < LOAD_CONCURRENCY {
            let Some((i, writes)) = todo.next() else {
                break;
            };
            let ds = ds.clone();
            set.spawn(async move {
                let first = writes.first().map(|w| w.0.clone()).unwrap_or_default();
                match ds.write_all(writes).await {
                    Ok(_) => (i, Ok(())),
                    Err(e) => (
                        i,
                        Err(WriteError {
                            message: format!("{first}: {e}"),
                            ..e
                        }),
                    ),
                }
            });
        }
        match set.join_next().await {
            Some(Ok((i, r))) => out[i] = r,
            Some(Err(e)) => tracing::error!(error = %e, "a datastore write task failed"),
            None => break,
        }
    }
    out
}

/// A request the master's core is working on: who gets the answer.
enum Waiting {
    /// A client connecting here: accepted once its record is written.
    Connected {
        id: ClientId,
        conn: Box<Conn>,
        reply: Reply<()>,
    },
    Client(Reply<api::ClientSummary>),
    Flow(Reply<api::FlowSummary>),
    Hunt(Reply<api::HuntSummary>),
    Hunts(Reply<api::ListHuntsResponse>),
}

/// The master's part of the node.
pub(super) struct MasterDriver {
    core: Master,
    entropy: Arc<dyn Entropy>,
    /// Minions with a replication stream up: its number and its queue.
    minions: BTreeMap<String, (u64, mpsc::Sender<Result<pc::MasterMessage, Status>>)>,
    /// Requests waiting for their answer, by the token the core was given.
    waiting: BTreeMap<Token, Waiting>,
    next_request: u64,
    /// Completed flows' uploads being reassembled.
    uploads: Reassembly,
}

impl MasterDriver {
    /// Loads the master's state from its datastore, and takes up reassembling the uploads a crash
    /// left unassembled.
    pub(super) async fn start(
        opts: &NodeOptions,
        datastore: &Meta,
        filestore: &Filestore,
        clock: &Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> Result<MasterDriver, String> {
        let loaded = load_master(datastore, &opts.hunts, clock.now()).await?;
        let limits = MasterLimits {
            tasks: TaskLimits {
                per_client_max: opts.queued_tasks_per_client_max,
                resend_ms: TASK_RESEND_MS,
            },
            hunts: opts.hunts.clone(),
            registry: opts.registry.clone(),
            inbox: InboxLimits::default(),
            upload_bytes_max: opts.codec.upload_bytes_max,
        };
        let restored = Restored {
            clients: loaded.records,
            hunts: loaded.hunts,
            cursors: loaded.cursors,
            pending: loaded.pending,
        };
        let time = Time {
            now: clock.now(),
            at: clock.monotonic(),
        };
        let core = Master::restore(opts.node_name.clone(), limits, time, restored);
        let uploads = Reassembly::new(opts.value_bytes_max);
        for key in loaded.reassembling {
            uploads.start(filestore.volume().clone(), datastore.clone(), key);
        }
        Ok(MasterDriver {
            core,
            entropy,
            minions: BTreeMap::new(),
            waiting: BTreeMap::new(),
            next_request: 1,
            uploads,
        })
    }

    fn request(&mut self, w: Waiting) -> Token {
        let t = Token(self.next_request);
        self.next_request += 1;
        self.waiting.insert(t, w);
        t
    }

    fn random(&self) -> u64 {
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        u64::from_le_bytes(n)
    }

    /// A client connected here: it is recorded in the registry, then accepted (the core's `Reply`).
    fn connected(
        &mut self,
        fe: &Frontend,
        peer: Peer,
        hello: codec::Hello,
        conn: Conn,
        reply: Reply<()>,
    ) {
        let t = fe.time();
        let id = peer.client_id.clone();
        let sighting = Sighting {
            id: id.clone(),
            public_key: peer.public_key.clone(),
            hostname: hello.info.hostname.clone(),
            fqdn: hello.info.fqdn.clone(),
            os: hello.info.os.clone(),
            ips: hello.info.ips.clone(),
            last_ip: peer.addr.ip().to_string(),
            node: fe.opts.node_name.clone(),
            connected_at: t.now,
            connected_order: t.at,
        };
        tracing::info!(client = %id, host = %crate::text::Printable(&hello.info.hostname), addr = %peer.addr, "client connecting");
        let request = self.request(Waiting::Connected {
            id,
            conn: Box::new(conn),
            reply,
        });
        if let Err(e) = self.core.handle_connected(t, request, sighting) {
            use talon_core::registry::RegistryError as E;
            let status = match e {
                // The agent backs off and tries again.
                E::EnrolmentRate { .. } => Status::unavailable(e.to_string()),
                E::Full { .. } => Status::resource_exhausted(e.to_string()),
                _ => Status::permission_denied(e.to_string()),
            };
            if let Some(Waiting::Connected { reply, .. }) = self.waiting.remove(&request) {
                let _ = reply.send(Err(status));
            }
        }
    }

    /// An analyst's request (master only).
    fn api_request(&mut self, fe: &Frontend, msg: Msg) {
        let t = fe.time();
        match msg {
            Msg::Search {
                query,
                limit,
                reply,
            } => {
                let r = talon_core::node::master::search(self.core.registry(), &query, limit)
                    .map_err(status)
                    .map(|res| api::SearchResponse {
                        clients: res.clients.iter().map(|c| summary(c)).collect(),
                        truncated: res.truncated,
                    });
                let _ = reply.send(r);
            }
            Msg::Label {
                client,
                label,
                remove,
                reply,
            } => match ClientId::parse(&client) {
                Ok(id) => {
                    let r = self.request(Waiting::Client(reply));
                    self.core.label(t, r, &id, &label, remove);
                }
                Err(e) => {
                    let _ = reply.send(Err(Status::invalid_argument(e.to_string())));
                }
            },
            Msg::Collect {
                client,
                artifact,
                params,
                reply,
            } => match self.new_flow(t.now, &client, &artifact, &params) {
                Ok(flow) => {
                    let r = self.request(Waiting::Flow(reply));
                    self.core.collect(t, r, flow);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Msg::CreateHunt { req, reply } => match hunt_spec(t.now, req) {
                Ok(spec) => {
                    let id = HuntId::from_u64(self.random());
                    let r = self.request(Waiting::Hunt(reply));
                    self.core.create_hunt(t, r, id, spec);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Msg::ListHunts { reply } => {
                let r = self.request(Waiting::Hunts(reply));
                self.core.get_hunts(t, r, None);
            }
            Msg::GetHunt { id, reply } => match parse_hunt(&id) {
                Ok(h) => {
                    let r = self.request(Waiting::Hunt(reply));
                    self.core.get_hunts(t, r, Some(h));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Msg::StopHunt { id, reply } => match parse_hunt(&id) {
                Ok(h) => {
                    let r = self.request(Waiting::Hunt(reply));
                    self.core.stop_hunt(t, r, &h);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Msg::HuntFlows { id, reply } => {
                let r = parse_hunt(&id).and_then(|h| {
                    let hunt = self
                        .core
                        .hunts()
                        .get(&h)
                        .ok_or_else(|| Status::not_found(format!("no hunt {h}")))?;
                    Ok(hunt
                        .participants()
                        .map(|(c, _)| (c.clone(), FlowId::for_hunt(&h, c)))
                        .collect())
                });
                let _ = reply.send(r);
            }
            Msg::Cluster { reply } => {
                let _ = reply.send(Ok(self.cluster_status(fe)));
            }
            _ => {}
        }
    }

    /// A collection's flow record, validated.
    fn new_flow(
        &self,
        now: Timestamp,
        client: &str,
        artifact: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<NewFlow, Status> {
        let id = ClientId::parse(client).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (spec, params) = talon_core::artifacts::validate(artifact, params)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(NewFlow {
            client: id,
            flow: FlowId::from_u64(self.random()),
            artifact: spec.name.to_owned(),
            params,
            hunt: None,
            created: now,
        })
    }

    fn cluster_status(&self, fe: &Frontend) -> api::ClusterStatus {
        let meta = match &fe.datastore {
            Meta::Local(d) => d.volume_error(),
            Meta::Remote(_) => None,
        };
        let volume_errors = [
            ("metadata", meta),
            ("filestore", fe.filestore.volume_error()),
        ]
        .into_iter()
        .filter_map(|(what, e)| e.map(|(t, why)| format!("{what}: {why} (since {})", t.as_ms())))
        .collect();
        api::ClusterStatus {
            volume_errors,
            master: fe.opts.node_name.clone(),
            minions: self
                .core
                .minions()
                .into_iter()
                .map(|(node, connected, c)| api::MinionStatus {
                    node,
                    connected,
                    epoch: c.map_or(0, |c| c.epoch),
                    applied: c.map_or(0, |c| c.hwm),
                })
                .collect(),
        }
    }

    /// Answers a request the core finished.
    fn answer(&mut self, fe: &mut Frontend, request: Token, result: Result<Answer, RequestError>) {
        let Some(w) = self.waiting.remove(&request) else {
            return;
        };
        let hunt = |core: &Master, id: &HuntId| {
            core.hunts()
                .get(id)
                .map(hunt_summary)
                .ok_or_else(|| Status::not_found(format!("no hunt {id}")))
        };
        match (w, result) {
            (Waiting::Connected { id, conn, reply }, Ok(_)) => {
                fe.accept(&id, *conn);
                tracing::info!(client = %id, "client connected");
                let _ = reply.send(Ok(()));
            }
            (Waiting::Connected { reply, .. }, Err(e)) => {
                let _ = reply.send(Err(status(e)));
            }
            (Waiting::Client(reply), r) => {
                let r = r.map_err(status).and_then(|a| match a {
                    Answer::Client(id) => self
                        .core
                        .registry()
                        .get(&id)
                        .map(summary)
                        .ok_or_else(|| Status::not_found(format!("no client {id}"))),
                    _ => Err(Status::internal("unexpected answer")),
                });
                let _ = reply.send(r);
            }
            (Waiting::Flow(reply), r) => {
                let r = r.map_err(status).and_then(|a| match a {
                    Answer::Flow(f) => {
                        tracing::info!(client = %f.client, flow = %f.flow, artifact = %f.artifact, "collection scheduled");
                        Ok(flow_summary(&flow_json(&f)))
                    }
                    _ => Err(Status::internal("unexpected answer")),
                });
                let _ = reply.send(r);
            }
            (Waiting::Hunt(reply), r) => {
                let r = r.map_err(status).and_then(|a| match a {
                    Answer::Hunt(id) => hunt(&self.core, &id),
                    _ => Err(Status::internal("unexpected answer")),
                });
                let _ = reply.send(r);
            }
            (Waiting::Hunts(reply), r) => {
                let r = r.map_err(status).map(|_| api::ListHuntsResponse {
                    hunts: self.core.hunts().list().map(hunt_summary).collect(),
                });
                let _ = reply.send(r);
            }
        }
    }

    /// Performs one of the core's actions; writes and deletes are gathered into `batch`.
    async fn act(&mut self, fe: &mut Frontend, a: MasterAction, batch: &mut Batch) {
        match a {
            MasterAction::Write { token, items } => {
                let group: Vec<_> = items.iter().map(encode).collect();
                self.flush_if_overlapping(fe, batch, &group).await;
                batch.push(token, group);
            }
            MasterAction::DeleteTask {
                token,
                client,
                flow,
            } => {
                let group = vec![(task_key(&client, &flow), None)];
                self.flush_if_overlapping(fe, batch, &group).await;
                batch.push(token, group);
            }
            MasterAction::MarkRunning { client, flow } => {
                mark_running(&fe.datastore, &client, &flow).await
            }
            MasterAction::Push { client, task } => fe.notify_task(&client, task),
            MasterAction::ToMinion {
                node,
                conn,
                message,
            } => {
                let sent = self
                    .minions
                    .get(&node)
                    .is_some_and(|(c, tx)| *c == conn && tx.try_send(Ok(message)).is_ok());
                if !sent && self.core.handle_minion_down(&node, conn) {
                    tracing::warn!(minion = %node, "minion's queue is full or closed; dropping its stream (it resynchronises on reconnect)");
                    self.minions.remove(&node);
                }
            }
            MasterAction::Prefetch { flows } => {
                let keys = flows
                    .iter()
                    .map(|(c, f)| paths::flow_record(c, f))
                    .collect();
                if let Err(e) = get_many(&fe.datastore, keys).await {
                    tracing::warn!(error = %e, "prefetching flow records failed");
                }
            }
            MasterAction::Complete { origin, completed } => {
                match replicated_completion(&origin.0, completed) {
                    Some((o, runs)) => fe.intake.handle_completion(origin, o, runs),
                    None => self.core.handle_applied(fe.time(), origin, Outcome::Done),
                }
            }
            MasterAction::HuntRecorded { token, outcome } => {
                fe.intake.handle_hunt_recorded(token, outcome)
            }
            MasterAction::Reply { request, result } => self.answer(fe, request, result),
            MasterAction::Notice(n) => match n.level {
                Level::Info => tracing::info!("{}", n.message),
                Level::Warn => tracing::warn!("{}", n.message),
                Level::Error => tracing::error!("{}", n.message),
            },
        }
    }

    /// Writes the batch's groups (many at once: one journal sync covers many) if `group` names a
    /// key one of them names (the second must follow the first).
    async fn flush_if_overlapping(
        &mut self,
        fe: &Frontend,
        batch: &mut Batch,
        group: &[(String, Option<Bytes>)],
    ) {
        if group.iter().any(|(k, _)| batch.keys.contains(k)) {
            self.flush(fe, batch).await;
        }
    }

    /// Writes the batch's groups and hands the core each one's result.
    async fn flush(&mut self, fe: &Frontend, batch: &mut Batch) {
        let Batch { tokens, groups, .. } = std::mem::take(batch);
        if tokens.is_empty() {
            return;
        }
        let results = write_groups(&fe.datastore, groups).await;
        for (token, r) in tokens.into_iter().zip(results) {
            let r = r.map_err(|e| {
                tracing::warn!(error = %e, outcome = ?e.outcome, "a metadata write did not go through");
                WriteFailure {
                    outcome: e.outcome,
                    message: e.message,
                }
            });
            self.core.handle_written(fe.time(), token, r);
        }
    }

    /// Performs a step of recording a completion (the intake's completions machine).
    async fn record_step(&mut self, fe: &mut Frontend, step: RecordStep) {
        let t = fe.time();
        match step {
            // A completed flow was delivered, whether or not its TaskAck reached us.
            RecordStep::Delivered { key } => self.core.handle_delivered(t, &key.client, &key.flow),
            // Record reads and writes are awaited here, as the inbox applies a minion's events one
            // at a time: sent round the actor's queue, each completion a minion replicates would
            // wait behind the whole queue twice (docs/architecture.md, "known shortcuts").
            RecordStep::Read { token, key } => {
                let k = paths::flow_record(&key.client, &key.flow);
                let record = load_json::<FlowJson>(&fe.datastore, &k).await.map_err(|e| {
                    tracing::error!(flow = %key.flow, error = %e, "cannot read flow record");
                });
                fe.intake.handle_read(t.now, token, record);
            }
            RecordStep::Write {
                token,
                key,
                record,
                uploads_marker,
            } => {
                let mut writes = vec![(
                    paths::flow_record(&key.client, &key.flow),
                    Some(Bytes::from(record)),
                )];
                if uploads_marker {
                    // Uploads are reassembled after the completion is recorded (bulk work on the
                    // volume); the marker written with it makes a restart finish the job.
                    let marker = paths::uploads_pending(&key.client, &key.flow);
                    writes.push((marker, Some(Bytes::from_static(b"{}"))));
                }
                let outcome = match fe.datastore.write_all(writes).await {
                    Ok(_) => Outcome::Done,
                    Err(e) => {
                        tracing::warn!(error = %e, outcome = ?e.outcome, "cannot write a flow's completion yet");
                        e.outcome
                    }
                };
                fe.intake.handle_written(token, outcome);
            }
            RecordStep::StartUploads { key } => {
                let (fs, ds) = (fe.filestore.volume().clone(), fe.datastore.clone());
                self.uploads.start(fs, ds, key);
            }
            RecordStep::HuntOutcome { token, outcome } => {
                self.core.handle_hunt_outcome(t, token, &outcome)
            }
        }
    }
}

/// Writes and deletes gathered to go together.
#[derive(Default)]
struct Batch {
    tokens: Vec<Token>,
    groups: Vec<Vec<(String, Option<Bytes>)>>,
    keys: BTreeSet<String>,
}

impl Batch {
    fn push(&mut self, token: Token, group: Vec<(String, Option<Bytes>)>) {
        self.keys.extend(group.iter().map(|(k, _)| k.clone()));
        self.tokens.push(token);
        self.groups.push(group);
    }
}

impl RoleDriver for MasterDriver {
    async fn handle(&mut self, fe: &mut Frontend, msg: Msg) {
        let t = fe.time();
        match msg {
            Msg::Connected {
                peer,
                hello,
                tx,
                conn,
                reply,
            } => {
                let c = Conn {
                    id: conn,
                    tx,
                    seen: None,
                };
                self.connected(fe, peer, hello, c, reply);
            }
            Msg::Disconnected { client, conn } => {
                if fe.gone(&client, conn) {
                    self.core.handle_disconnected(t, &client);
                }
            }
            Msg::TaskAck { client, flow } => self.core.handle_task_acked(t, &client, &flow),
            Msg::MinionUp { node, tx, reply } => {
                let conn = self.core.handle_minion_up(t, &node);
                tracing::info!(minion = %node, "minion's replication stream is up");
                self.minions.insert(node, (conn, tx));
                let _ = reply.send(Ok(conn));
            }
            Msg::MinionDown { node, conn } => {
                if self.core.handle_minion_down(&node, conn) {
                    self.minions.remove(&node);
                    tracing::warn!(minion = %node, "minion's replication stream closed");
                }
            }
            Msg::MinionEvents { node, conn, batch } => {
                self.core.handle_batch(t, &node, conn, batch)
            }
            Msg::DatastoreChanged { key, version } => {
                let kind = broadcast::Kind::DatastoreChanged(pc::DatastoreChanged { key, version });
                self.core.broadcast(kind);
            }
            msg @ (Msg::Search { .. }
            | Msg::Label { .. }
            | Msg::Collect { .. }
            | Msg::CreateHunt { .. }
            | Msg::ListHunts { .. }
            | Msg::GetHunt { .. }
            | Msg::StopHunt { .. }
            | Msg::HuntFlows { .. }
            | Msg::Cluster { .. }) => self.api_request(fe, msg),
            // Not the master's: a minion's link, its replicated completions; flows are the frontend's.
            Msg::Link(_)
            | Msg::Replicated { .. }
            | Msg::Flow { .. }
            | Msg::Stored { .. }
            | Msg::Audited { .. }
            | Msg::Settled { .. }
            | Msg::Located { .. } => {}
        }
    }

    async fn intake_action(&mut self, fe: &mut Frontend, a: IntakeAction<RunRef, ApplyOrigin>) {
        match a {
            IntakeAction::Record(step) => self.record_step(fe, step).await,
            IntakeAction::Applied { origin, result } => {
                let outcome = if result.ok() {
                    Outcome::Done
                } else {
                    // Not applied (busy, or a read failed), or in part: it stays unacknowledged,
                    // and the minion resends it and what follows.
                    tracing::warn!(minion = %origin.0, seq = origin.1.hwm, ?result, "a replicated completion could not be applied yet; the minion sends it again");
                    Outcome::Unknown
                };
                self.core.handle_applied(fe.time(), origin, outcome);
            }
            _ => {}
        }
    }

    async fn drain(&mut self, fe: &mut Frontend) -> usize {
        let mut n = 0;
        loop {
            let mut batch = Batch::default();
            let mut round = 0;
            while let Some(a) = self.core.poll_action() {
                round += 1;
                self.act(fe, a, &mut batch).await;
                if batch.tokens.len() >= SCHEDULE_BATCH_MAX {
                    self.flush(fe, &mut batch).await;
                    // A hunt over 100,000 clients is 100 batches, and the node's other work
                    // (pings, the API, other streams) gets a turn between them: scheduling all at
                    // once, a master logged nothing for 43 s and its API connection was dropped
                    // by the keep-alive.
                    tokio::task::yield_now().await;
                }
            }
            self.flush(fe, &mut batch).await;
            n += round;
            if round == 0 {
                return n;
            }
        }
    }

    fn poll_timeout(&self) -> (Option<Monotonic>, Option<Timestamp>) {
        (self.core.poll_timeout(), self.core.poll_expiry())
    }

    fn handle_timeout(&mut self, fe: &mut Frontend) {
        self.core.handle_timeout(fe.time());
    }
}

/// A core request error as a gRPC status.
fn status(e: RequestError) -> Status {
    let m = e.message;
    match e.kind {
        ErrorKind::Invalid => Status::invalid_argument(m),
        ErrorKind::NotFound => Status::not_found(m),
        ErrorKind::Precondition => Status::failed_precondition(m),
        ErrorKind::Unavailable => Status::unavailable(m),
        ErrorKind::Exhausted => Status::resource_exhausted(m),
        ErrorKind::Denied => Status::permission_denied(m),
    }
}

/// A queued flow's record.
fn flow_json(f: &NewFlow) -> FlowJson {
    FlowJson {
        client_id: f.client.to_string(),
        flow_id: f.flow.to_string(),
        artifact: f.artifact.clone(),
        params: f.params.clone(),
        hunt_id: f.hunt.as_ref().map(ToString::to_string),
        state: FlowRecordState::Queued,
        rows: 0,
        uploaded_bytes: 0,
        error: String::new(),
        created_ms: f.created.as_ms(),
        finished_ms: 0,
        uploads: vec![],
        runs: vec![],
    }
}

/// An item of the core's atomic writes, as the datastore key and value it is stored as.
fn encode(item: &Item) -> (String, Option<Bytes>) {
    fn json<T: serde::Serialize>(v: &T) -> Option<Bytes> {
        // These records are plain data; serialising them cannot fail.
        Some(Bytes::from(
            serde_json::to_vec(v).expect("a record serialises"),
        ))
    }
    match item {
        Item::Client(r) => (
            paths::client_record(&r.id),
            json(&ClientJson::from_record(r)),
        ),
        Item::Hunt(r) => (paths::hunt_record(&r.id), json(&HuntJson::from_record(r))),
        Item::Participant {
            hunt,
            client,
            participation,
        } => (
            paths::hunt_participant(hunt, client),
            json(&ParticipantJson::from(*participation)),
        ),
        Item::Task { client, flow, task } => (
            task_key(client, flow),
            Some(Bytes::from(task.encode_to_vec())),
        ),
        Item::Flow(f) => (paths::flow_record(&f.client, &f.flow), json(&flow_json(f))),
        Item::Cursor { node, cursor } => (
            cursor_key(node),
            json(&CursorJson {
                node: node.clone(),
                epoch: cursor.epoch,
                hwm: cursor.hwm,
            }),
        ),
    }
}

/// Marks a delivered flow's record running if it is still queued (shown only: not marked, it
/// shows queued until its completion is recorded, and nothing else depends on it).
async fn mark_running(ds: &Meta, client: &ClientId, flow: &FlowId) {
    let k = paths::flow_record(client, flow);
    match load_json::<FlowJson>(ds, &k).await {
        Ok(Some(mut f)) if f.state == FlowRecordState::Queued => {
            f.state = FlowRecordState::Running;
            if let Err(e) = save_json(ds, &k, &f).await {
                tracing::warn!(client = %client, flow = %flow, error = %e, "cannot mark a flow running; it shows queued until it completes");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(client = %client, flow = %flow, error = %e, "cannot read a delivered flow's record; it shows queued until it completes")
        }
    }
}

/// An analyst's hunt request as the hunt manager takes it, validated.
fn hunt_spec(now: Timestamp, req: api::CreateHuntRequest) -> Result<HuntSpec, Status> {
    let given: BTreeMap<String, String> = req.params.into_iter().collect();
    let (spec, params) = talon_core::artifacts::validate(&req.artifact, &given)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let labels = |ls: Vec<String>| -> Result<BTreeSet<String>, Status> {
        ls.iter()
            .map(|l| {
                talon_core::registry::normalize_label(l)
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .collect()
    };
    let os = match req.os.to_ascii_lowercase().as_str() {
        "" => None,
        o @ ("linux" | "windows" | "darwin") => Some(o.to_owned()),
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
        artifact: spec.name.to_owned(),
        params,
        include_labels: labels(req.include_labels)?,
        exclude_labels: labels(req.exclude_labels)?,
        os,
        expires: now.plus_ms(ttl_s.saturating_mul(1000)),
        client_limit: (req.client_limit > 0).then_some(req.client_limit),
        description: req.description,
    })
}

/// A minion's replicated completion as the intake takes it; `None` if it names a malformed client or
/// flow (skipped, so that the minion's later events are not stuck behind it).
fn replicated_completion(
    node: &str,
    f: pc::FlowCompleted,
) -> Option<(talon_core::flows::FlowOutcome, Vec<RunRef>)> {
    let (Ok(client), Ok(flow)) = (ClientId::parse(&f.client_id), FlowId::parse(&f.flow_id)) else {
        tracing::warn!(minion = %node, client = %f.client_id, flow = %f.flow_id, "a replicated completion names a malformed client or flow");
        return None;
    };
    let state = if f.state == comms::FlowState::Completed as i32 {
        FinalState::Completed
    } else {
        FinalState::Error
    };
    let mut runs = Vec::with_capacity(f.runs.len());
    for r in f.runs {
        match RunRef::from_proto(r) {
            Ok(r) => runs.push(r),
            // A minion is one of ours: this is a bug, not an attack. The flow's results would
            // miss this run's messages.
            Err(e) => {
                tracing::error!(%client, %flow, error = %e, "a replicated completion names a bad run")
            }
        }
    }
    let o = talon_core::flows::FlowOutcome {
        key: FlowKey { client, flow },
        state,
        error: f.error,
        rows: f.rows,
        uploaded_bytes: f.uploaded_bytes,
        uploads: f.uploads,
        messages: f.messages,
    };
    Some((o, runs))
}
