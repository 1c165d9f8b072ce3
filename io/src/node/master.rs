//! The master's role: it drives core `node::Master` (the registry, hunts, tasks not yet delivered
//! and the replication inbox) and the recording of completed flows, performing their writes on the
//! datastore, their messages to clients and minions, and answering the API.

use super::*;

/// A request the master's core is working on: who gets the answer.
enum Waiting {
    /// A client connecting here: accepted once its record is written.
    Connected {
        id: ClientId,
        conn: Box<Conn>,
        reply: Reply<()>,
    },
    /// An analyst's request.
    Request(Reply<Answer>),
}

/// The master's part of the node.
pub(super) struct MasterDriver {
    core: Master,
    /// Minions with a replication stream up: its number and its queue.
    minions: BTreeMap<String, (u64, mpsc::Sender<Result<pc::MasterMessage, Status>>)>,
    /// Requests waiting for their answer, by the token the core was given.
    waiting: BTreeMap<Token, Waiting>,
    next_request: u64,
    /// Completed flows' uploads being reassembled.
    uploads: Reassembly,
    /// A hunt's record was written (a hunt started, stopped, expired or completed) since the
    /// hunts-running gauge was last counted: counting walks every hunt, so only then.
    hunts_changed: bool,
}

impl MasterDriver {
    /// Loads the master's state from its datastore, and takes up reassembling the uploads a crash
    /// left unassembled.
    pub(super) async fn start(
        opts: &NodeOptions,
        datastore: &Meta,
        filestore: &Filestore,
        clock: &Arc<dyn Clock>,
    ) -> Result<MasterDriver, ReadError> {
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
            minions: BTreeMap::new(),
            waiting: BTreeMap::new(),
            next_request: 1,
            uploads,
            hunts_changed: true,
        })
    }

    fn request(&mut self, w: Waiting) -> Token {
        let t = Token(self.next_request);
        self.next_request += 1;
        self.waiting.insert(t, w);
        t
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

    /// Answers a request the core finished.
    fn answer(&mut self, fe: &mut Frontend, request: Token, result: Result<Answer, RequestError>) {
        match (self.waiting.remove(&request), result) {
            (Some(Waiting::Connected { id, conn, reply }), Ok(_)) => {
                fe.accept(&id, *conn);
                tracing::info!(client = %id, "client connected");
                let _ = reply.send(Ok(()));
            }
            (Some(Waiting::Connected { reply, .. }), Err(e)) => {
                let _ = reply.send(Err(status(e)));
            }
            (Some(Waiting::Request(reply)), r) => {
                let _ = reply.send(r.map_err(status));
            }
            (None, _) => {}
        }
    }

    /// Performs one of the core's actions; writes and deletes are gathered into `batch` (the core
    /// asks for one write per key at a time, so a batch's writes are independent).
    fn act(&mut self, fe: &mut Frontend, a: MasterAction, batch: &mut Batch) {
        match a {
            MasterAction::Write { token, items } => {
                self.hunts_changed |= items.iter().any(|i| matches!(i, Item::Hunt(_)));
                batch.tokens.push(token);
                batch.groups.push(items.iter().map(encode).collect());
            }
            MasterAction::DeleteTask {
                token,
                client,
                flow,
            } => {
                batch.tokens.push(token);
                batch.groups.push(vec![(task_key(&client, &flow), None)]);
            }
            MasterAction::Push { client, task } => fe.notify_task(&client, task),
            MasterAction::CancelHere { client, cancel } => {
                // A cancel that cannot be queued is lost: the flow runs on (the analyst is told
                // the client was reached; docs/api.md).
                fe.push(&client, server_message::Kind::Cancel(cancel));
            }
            MasterAction::FailFlow {
                token,
                client,
                flow,
                error,
            } => {
                let (ds, now) = (fe.datastore.clone(), fe.time().now);
                let work = async move {
                    let r = fail_flow(&ds, &client, &flow, error, now).await;
                    vec![(token, r)]
                };
                fe.spawn_then(work, |results| Msg::Written { results });
            }
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
                let ds = fe.datastore.clone();
                tokio::spawn(async move {
                    if let Err(e) = get_many(&ds, keys).await {
                        tracing::warn!(error = %e, "prefetching flow records failed");
                    }
                });
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

    /// Writes the batch's groups in the background (up to `LOAD_CONCURRENCY` at once: one
    /// journal sync covers many); their results come back as one `Written`.
    fn flush(&mut self, fe: &Frontend, batch: Batch) {
        let Batch { tokens, groups } = batch;
        if tokens.is_empty() {
            return;
        }
        let ds = fe.datastore.clone();
        let work = async move {
            let results = write_groups(&ds, groups).await;
            tokens.into_iter().zip(results).collect()
        };
        fe.spawn_then(work, |results| Msg::Written { results });
    }

    /// The core's writes ended (or a cancelled flow's record was marked failed).
    fn written(&mut self, fe: &Frontend, results: Vec<(Token, Result<(), WriteError>)>) {
        for (token, r) in results {
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
    fn record_step(&mut self, fe: &mut Frontend, step: RecordStep) {
        let t = fe.time();
        match step {
            // A completed flow was delivered, whether or not its TaskAck reached us.
            RecordStep::Delivered { key } => self.core.handle_delivered(t, &key.client, &key.flow),
            RecordStep::Read { token, key } => {
                let (ds, k) = (
                    fe.datastore.clone(),
                    paths::flow_record(&key.client, &key.flow),
                );
                let work = async move {
                    load_json::<FlowJson>(&ds, &k).await.map_err(|e| {
                        tracing::error!(flow = %key.flow, error = %e, "cannot read flow record");
                    })
                };
                fe.spawn_then(work, move |record| Msg::RecordRead { token, record });
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
                let ds = fe.datastore.clone();
                let work = async move {
                    match ds.write_all(writes).await {
                        Ok(_) => Outcome::Done,
                        Err(e) => {
                            tracing::warn!(error = %e, outcome = ?e.outcome, "cannot write a flow's completion yet");
                            e.outcome
                        }
                    }
                };
                fe.spawn_then(work, move |outcome| Msg::RecordWritten { token, outcome });
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
            Msg::MinionUp {
                node,
                outbox,
                tx,
                reply,
            } => {
                let conn = self.core.handle_minion_up(t, &node, outbox);
                tracing::info!(minion = %node, "minion's replication stream is up");
                let m = crate::metrics::metrics();
                m.replication_connected.with_label_values(&[&node]).set(1);
                self.minions.insert(node, (conn, tx));
                let _ = reply.send(Ok(conn));
            }
            Msg::MinionDown { node, conn } => {
                if self.core.handle_minion_down(&node, conn) {
                    let m = crate::metrics::metrics();
                    m.replication_connected.with_label_values(&[&node]).set(0);
                    self.minions.remove(&node);
                    tracing::info!(minion = %node, "minion's replication stream closed (it resynchronises when it reconnects; `cluster status` shows it down meanwhile)");
                }
            }
            Msg::MinionEvents { node, conn, batch } => {
                crate::metrics::metrics()
                    .replication_received
                    .with_label_values(&[&node])
                    .inc_by(batch.events.len() as u64);
                self.core.handle_batch(t, &node, conn, batch)
            }
            Msg::Written { results } => self.written(fe, results),
            Msg::RecordRead { token, record } => fe.intake.handle_read(t.now, token, record),
            Msg::RecordWritten { token, outcome } => fe.intake.handle_written(token, outcome),
            Msg::DatastoreChanged { key, version } => {
                if key.starts_with(paths::CLIENT_EVENTS) {
                    fe.reload_event_table();
                }
                let kind = broadcast::Kind::DatastoreChanged(pc::DatastoreChanged { key, version });
                self.core.broadcast(kind);
            }
            Msg::Request { by, req, reply } => {
                let r = self.request(Waiting::Request(reply));
                self.core.handle_request(t, r, by, req);
            }
            // Not the master's: a minion's link, its replicated completions; flows are the frontend's.
            Msg::Link(_)
            | Msg::Replicated { .. }
            | Msg::Flow { .. }
            | Msg::Stored { .. }
            | Msg::Audited { .. }
            | Msg::Settled { .. }
            | Msg::Located { .. }
            | Msg::Event { .. }
            | Msg::EventStored { .. }
            | Msg::EventTable { .. }
            | Msg::LabelsChanged { .. }
            | Msg::EventTableFor { .. } => {}
        }
    }

    fn publish(&mut self) {
        if !std::mem::take(&mut self.hunts_changed) {
            return;
        }
        let running = self
            .core
            .hunts()
            .list()
            .filter(|h| h.record().state == HuntState::Running)
            .count();
        crate::metrics::metrics()
            .hunts_running
            .set(i64::try_from(running).unwrap_or(i64::MAX));
    }

    async fn intake_action(&mut self, fe: &mut Frontend, a: IntakeAction<RunRef, ApplyOrigin>) {
        match a {
            IntakeAction::Record(step) => self.record_step(fe, step),
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
                self.act(fe, a, &mut batch);
                if batch.tokens.len() >= SCHEDULE_BATCH_MAX {
                    self.flush(fe, std::mem::take(&mut batch));
                    // A hunt over 100,000 clients is 100 batches, and the node's other work
                    // (pings, the API, other streams) gets a turn between them: scheduling all at
                    // once, a master logged nothing for 43 s and its API connection was dropped
                    // by the keep-alive.
                    tokio::task::yield_now().await;
                }
            }
            self.flush(fe, batch);
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

/// Marks a cancelled flow's record failed with `error` (finished `now`), unless it is final
/// already: its agent finished it first.
async fn fail_flow(
    ds: &Meta,
    client: &ClientId,
    flow: &FlowId,
    error: String,
    now: Timestamp,
) -> Result<(), WriteError> {
    let key = paths::flow_record(client, flow);
    let refused = |message: String| WriteError {
        outcome: Outcome::Refused,
        message,
    };
    let mut rec = match load_json::<FlowJson>(ds, &key).await {
        Ok(Some(r)) if !r.state.is_final() => r,
        Ok(_) => return Ok(()), // Final already, or no record (nothing to show).
        Err(e) => return Err(refused(format!("{key}: {e}"))),
    };
    rec.state = FlowRecordState::Error;
    rec.error = error;
    rec.finished_ms = now.as_ms();
    let bytes = Bytes::from(serde_json::to_vec(&rec).expect("a record serialises"));
    ds.set(&key, bytes).await.map(drop)
}
