//! The master's part of the node: the task book and hunt scheduling, collections, labels, the
//! replication inbox (applying minions' events) and recording completed flows.

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
    groups: Vec<Vec<(String, Bytes)>>,
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
                let writes = writes.into_iter().map(|(k, v)| (k, Some(v))).collect();
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

impl Actor {
    /// A client acknowledged a task, on this node or (master) on a minion.
    pub(super) async fn task_delivered(&mut self, client: &ClientId, flow: &FlowId) {
        match &mut self.role {
            NodeRole::Minion(_) => {
                let ev = Event::TaskDelivered(pc::TaskDelivered {
                    client_id: client.to_string(),
                    flow_id: flow.to_string(),
                });
                self.replicate(ev, None).await;
                return;
            }
            NodeRole::Master(m) => {
                if !m.tasks.handle_acked(client, flow) {
                    return; // A duplicate acknowledgement (tasks are resent until acknowledged).
                }
                self.drain_tasks(BTreeMap::new()).await;
            }
        }
        // Shown as running from now on. Not marked (a refused write, a failed read), it shows
        // queued until its completion is recorded: nothing else depends on it.
        let k = paths::flow_record(client, flow);
        match load_json::<FlowJson>(&self.datastore, &k).await {
            Ok(Some(mut f)) if f.state == FlowRecordState::Queued => {
                f.state = FlowRecordState::Running;
                if let Err(e) = save_json(&self.datastore, &k, &f).await {
                    tracing::warn!(client = %client, flow = %flow, error = %e, "cannot mark a flow running; it shows queued until it completes");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(client = %client, flow = %flow, error = %e, "cannot read a delivered flow's record; it shows queued until it completes")
            }
        }
    }

    /// Performs the task book's actions (master): writes each new task's record together with
    /// what goes with it (`groups`, by the creation's token) — up to [`LOAD_CONCURRENCY`] groups at
    /// once, so one journal sync covers many; sends tasks toward their clients; deletes the records
    /// of acknowledged ones. Returns how each creation ended, with the datastore's error if its
    /// write failed.
    pub(super) async fn drain_tasks(
        &mut self,
        mut groups: BTreeMap<Token, Vec<(String, Bytes)>>,
    ) -> BTreeMap<Token, (Outcome, Option<String>)> {
        let mut created = BTreeMap::new();
        let mut why: BTreeMap<Token, String> = BTreeMap::new();
        loop {
            let actions: Vec<_> = match &mut self.role {
                NodeRole::Master(m) => std::iter::from_fn(|| m.tasks.poll_action()).collect(),
                NodeRole::Minion(_) => return created,
            };
            if actions.is_empty() {
                return created;
            }
            let (mut writes, mut deletes) = (Vec::new(), Vec::new());
            for a in actions {
                match a {
                    TaskAction::Write {
                        token,
                        client,
                        flow,
                        task,
                    } => {
                        let mut g = groups.remove(&token).unwrap_or_default();
                        g.push((task_key(&client, &flow), Bytes::from(task.encode_to_vec())));
                        writes.push((token, g));
                    }
                    TaskAction::Created {
                        token,
                        client,
                        flow,
                        outcome,
                        context,
                    } => {
                        if outcome == Outcome::Refused
                            && let TaskOrigin::Hunt(h) = &context
                        {
                            tracing::warn!(hunt = %h, client = %client, flow = %flow, "cannot record a hunt participant yet; offering it again later");
                        }
                        // Not a participant without its task: undone, offered again later.
                        let at = self.clock.monotonic();
                        hunt_tasks::created(&mut self.hunts, at, &client, outcome, &context);
                        created.insert(token, (outcome, why.remove(&token)));
                    }
                    TaskAction::Deliver { client, task } => self.send_task(&client, task),
                    TaskAction::Delete { client, flow } => deletes.push((client, flow)),
                }
            }
            let (tokens, writes): (Vec<Token>, Vec<_>) = writes.into_iter().unzip();
            let results = write_groups(&self.datastore, writes).await;
            let mut outcomes = Vec::with_capacity(tokens.len());
            for (token, r) in tokens.into_iter().zip(results) {
                if let Err(e) = &r {
                    why.insert(token, e.to_string());
                }
                outcomes.push((token, self.write_outcome("a task's record", r)));
            }
            for (client, flow) in deletes {
                let r = self.datastore.delete(&task_key(&client, &flow)).await;
                let outcome =
                    self.write_outcome("a delivered task's record (deleting)", r.map(|_| ()));
                if let NodeRole::Master(m) = &mut self.role {
                    m.tasks.handle_deleted(&client, &flow, outcome);
                }
            }
            if let NodeRole::Master(m) = &mut self.role {
                for (token, outcome) in outcomes {
                    m.tasks.handle_written(token, outcome);
                }
            }
        }
    }

    /// How a metadata write ended (logged if it failed).
    pub(super) fn write_outcome(&self, what: &str, r: Result<(), WriteError>) -> Outcome {
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => {
                tracing::warn!(error = %e, outcome = ?e.outcome, "cannot write {what} yet");
                e.outcome
            }
        }
    }

    /// Persists a client record (master) and tells the minions to drop their cached copy.
    pub(super) async fn persist_client(
        &mut self,
        rec: &talon_core::registry::ClientRecord,
    ) -> Result<(), Status> {
        let key = paths::client_record(&rec.id);
        save_json(&self.datastore, &key, &ClientJson::from_record(rec)).await?;
        self.broadcast(broadcast::Kind::DatastoreChanged(pc::DatastoreChanged {
            key,
            version: 0,
        }));
        Ok(())
    }

    /// Performs the registry's actions (master): persists changed records; a client whose labels
    /// changed is offered the running hunts (a new label may put it in one), once its record is
    /// durable and if it is connected.
    pub(super) async fn persist_registry(&mut self) -> Result<(), Status> {
        let mut relabelled = Vec::new();
        while let Some(a) = self.registry.poll_action() {
            match a {
                RegistryAction::Persist(rec) => self.persist_client(&rec).await?,
                RegistryAction::LabelsChanged(id) => relabelled.push(id),
            }
        }
        for id in relabelled {
            if self.registry.get(&id).is_some_and(|c| c.connected) {
                self.offer_hunts(self.now(), &id).await;
            }
        }
        Ok(())
    }

    /// Sends one message to a minion; a full or closed queue drops its stream (it resynchronises).
    pub(super) fn send_to_minion(&mut self, node: &str, kind: broadcast::Kind) {
        let NodeRole::Master(m) = &mut self.role else {
            return;
        };
        let Some(c) = m.minions.get(node) else {
            return;
        };
        let msg = pc::MasterMessage {
            kind: Some(master_message::Kind::Broadcast(pc::Broadcast {
                seq: 0,
                kind: Some(kind),
            })),
        };
        if c.tx.try_send(Ok(msg)).is_err() {
            tracing::warn!(minion = %node, "minion's queue is full or closed; dropping its stream (it resynchronises on reconnect)");
            m.minions.remove(node);
        }
    }

    pub(super) fn broadcast(&mut self, kind: broadcast::Kind) {
        let nodes: Vec<String> = match &self.role {
            NodeRole::Master(m) => m.minions.keys().cloned().collect(),
            NodeRole::Minion(_) => return,
        };
        for n in nodes {
            self.send_to_minion(&n, kind.clone());
        }
    }

    /// Records a new task (master) together with its flow record, atomically, and sends it toward
    /// its client wherever that is connected. It stays pending until the client acknowledges it,
    /// and is sent again whenever the client (or its minion) reconnects.
    pub(super) async fn deliver(
        &mut self,
        client: &ClientId,
        flow: &FlowId,
        task: comms::Task,
        record: &FlowJson,
    ) -> Result<(), Status> {
        // Durable before it can be delivered: a master restart still delivers it. The flow record
        // goes with it, so its results always have a record and a record never waits for a task
        // that was not written.
        let group = vec![(paths::flow_record(client, flow), json_bytes(record)?)];
        let NodeRole::Master(m) = &mut self.role else {
            return Err(Status::internal("tasks are created on the master"));
        };
        let token = m
            .tasks
            .create(client.clone(), flow.clone(), task, TaskOrigin::Collect)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let mut created = self.drain_tasks([(token, group)].into()).await;
        let (outcome, why) = created.remove(&token).unwrap_or((Outcome::Unknown, None));
        let why = why.unwrap_or_default();
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Refused => Err(Status::unavailable(format!(
                "datastore: {why}; the collection was not scheduled, try again"
            ))),
            Outcome::Unknown => Err(Status::unavailable(format!(
                "datastore: {why}; the master stopped while scheduling the collection, which \
                 may have happened (see the client's flows once the master is back)"
            ))),
        }
    }

    pub(super) fn send_task(&mut self, client: &ClientId, task: comms::Task) {
        if self.conns.contains_key(client) {
            return self.notify_task(client, task);
        }
        let Some(rec) = self.registry.get(client) else {
            return;
        };
        if !rec.connected || rec.node == self.opts.node_name {
            return; // Sent when it connects.
        }
        let node = rec.node.clone();
        self.send_to_minion(
            &node,
            broadcast::Kind::TaskQueued(pc::TaskQueued {
                client_id: client.to_string(),
                task: Some(task),
            }),
        );
    }

    /// Sends a client's pending tasks toward it (it acknowledges duplicates and runs each once).
    pub(super) fn send_pending(&mut self, client: &ClientId) {
        let tasks: Vec<comms::Task> = match &self.role {
            NodeRole::Master(m) => m.tasks.pending(client).map(|(_, t)| t.clone()).collect(),
            NodeRole::Minion(_) => return,
        };
        for t in tasks {
            self.send_task(client, t);
        }
    }

    pub(super) fn minion_up(
        &mut self,
        node: String,
        tx: mpsc::Sender<Result<pc::MasterMessage, Status>>,
    ) -> Result<u64, Status> {
        let NodeRole::Master(m) = &mut self.role else {
            return Err(Status::failed_precondition("this node is not the master"));
        };
        let conn = m.next_minion_conn;
        m.next_minion_conn += 1;
        m.minions.insert(
            node.clone(),
            MinionConn {
                conn,
                tx,
                behind_ms: 0,
            },
        );
        tracing::info!(minion = %node, cursor = ?m.inbox.cursor(&node), "minion's replication stream is up");
        // Tasks that may have been lost with the previous stream go again to its clients.
        let clients: Vec<ClientId> = m
            .tasks
            .clients()
            .filter(|c| {
                self.registry
                    .get(c)
                    .is_some_and(|r| r.connected && r.node == node)
            })
            .cloned()
            .collect();
        for c in clients {
            self.send_pending(&c);
        }
        Ok(conn)
    }

    /// Applies a batch of a minion's events in order, persists its cursor, then acknowledges.
    pub(super) async fn minion_events(
        &mut self,
        now: Timestamp,
        node: String,
        conn: u64,
        batch: MinionBatch,
    ) {
        let MinionBatch {
            epoch,
            events,
            sent_unix_ms,
        } = batch;
        // How far the minion's clock is behind ours (negative: ahead), measured on this batch (it
        // includes the batch's transit and queueing: milliseconds, against machines' clocks that
        // may differ by hours). Times the minion reports are moved onto our clock with it.
        let behind_ms = if sent_unix_ms == 0 {
            0
        } else {
            i128::from(now.as_ms()) - i128::from(sent_unix_ms)
        };
        let NodeRole::Master(m) = &mut self.role else {
            return;
        };
        match m.minions.get_mut(&node) {
            Some(c) if c.conn == conn => c.behind_ms = behind_ms,
            // A stream that was replaced; the minion resends on the new one.
            _ => return,
        }
        // The flow records this batch's events read: fetched together below, not one 40–60 ms
        // volume read after another (the master's cache is cold after a restart).
        let warm: BTreeSet<String> = events
            .iter()
            .filter_map(|(_, e)| {
                let (c, f) = match e {
                    Ok(Event::TaskDelivered(t)) => (&t.client_id, &t.flow_id),
                    Ok(Event::FlowCompleted(f)) => (&f.client_id, &f.flow_id),
                    _ => return None,
                };
                Some(paths::flow_record(
                    &ClientId::parse(c).ok()?,
                    &FlowId::parse(f).ok()?,
                ))
            })
            .collect();
        if let Err(e) = m
            .inbox
            .handle_batch(self.clock.monotonic(), &node, epoch, events)
        {
            tracing::warn!(minion = %node, error = %e, "refused a replication batch");
            let expected = m.inbox.cursor(&node).map_or(1, |c| c.hwm + 1);
            let current_epoch = match e {
                talon_core::replication::InboxError::StaleEpoch { current, .. } => current,
                _ => 0,
            };
            if let Some(c) = m.minions.get(&node) {
                let _ = c.tx.try_send(Ok(pc::MasterMessage {
                    kind: Some(master_message::Kind::Error(pc::ReplError {
                        message: e.to_string(),
                        expected_seq: expected,
                        current_epoch,
                    })),
                }));
            }
            return;
        }
        if warm.len() > 1
            && let Err(e) = get_many(&self.datastore, warm.into_iter().collect()).await
        {
            tracing::warn!(minion = %node, error = %e, "prefetching flow records failed");
        }
        self.drain().await;
    }

    /// Performs the replication inbox's actions (master); returns how many. A replicated
    /// completion goes to the intake, whose `Applied` hands its outcome back to the inbox.
    pub(super) async fn drain_inbox(&mut self) -> usize {
        let mut done = 0;
        loop {
            let NodeRole::Master(m) = &mut self.role else {
                return done;
            };
            let Some(a) = m.inbox.poll_action() else {
                return done;
            };
            done += 1;
            match a {
                InboxAction::Apply {
                    node: n,
                    cursor,
                    event,
                } => {
                    let behind_ms = m.minions.get(&n).map_or(0, |c| c.behind_ms);
                    if let Ok(Event::FlowCompleted(f)) = event {
                        // Recorded by the intake's completions machine; its `Applied` ends it.
                        match replicated_completion(&n, f) {
                            Some((o, runs)) => self.intake.handle_completion((n, cursor), o, runs),
                            None => m.inbox.handle_applied(&n, cursor, Outcome::Done),
                        }
                        continue;
                    }
                    let outcome = if self.apply_event(&n, event, behind_ms).await {
                        Outcome::Done
                    } else {
                        // Not applied (busy, or a read failed), or in part: it stays
                        // unacknowledged, and the minion resends it and what follows.
                        tracing::warn!(minion = %n, seq = cursor.hwm, "a replicated event could not be applied yet; the minion sends it again");
                        Outcome::Unknown
                    };
                    if let NodeRole::Master(m) = &mut self.role {
                        m.inbox.handle_applied(&n, cursor, outcome);
                    }
                }
                InboxAction::Persist { node: n, cursor } => {
                    // The effects it covers are journalled (each write awaited). A crash before
                    // this write re-applies them: effects are idempotent.
                    let j = CursorJson {
                        node: n.clone(),
                        epoch: cursor.epoch,
                        hwm: cursor.hwm,
                    };
                    let r = match serde_json::to_vec(&j) {
                        Ok(v) => self
                            .datastore
                            .set(&cursor_key(&n), Bytes::from(v))
                            .await
                            .map(|_| ()),
                        Err(e) => Err(WriteError {
                            outcome: Outcome::Refused,
                            message: e.to_string(),
                        }),
                    };
                    let outcome = self.write_outcome("a replication cursor (not acknowledging)", r);
                    if let NodeRole::Master(m) = &mut self.role {
                        m.inbox.handle_persisted(&n, cursor, outcome);
                    }
                }
                InboxAction::Ack {
                    node: n,
                    epoch,
                    upto,
                } => {
                    // The inbox acknowledges only what its durable cursor covers.
                    if let NodeRole::Master(m) = &mut self.role
                        && let Some(c) = m.minions.get(&n)
                    {
                        let ack = pc::MasterMessage {
                            kind: Some(master_message::Kind::Ack(pc::ReplAck {
                                epoch,
                                upto_seq: upto,
                            })),
                        };
                        if c.tx.try_send(Ok(ack)).is_err() {
                            m.minions.remove(&n);
                        }
                    }
                }
            }
        }
    }

    /// One replicated event's effects on the master. Each is idempotent (a crash between the effects
    /// and the cursor re-applies it). False if they could not be made durable now (the datastore
    /// refused as busy, a read failed): the event must be applied again later. The minion's clock
    /// is `behind_ms` behind ours.
    pub(super) async fn apply_event(
        &mut self,
        node: &str,
        event: Result<Event, String>,
        behind_ms: i128,
    ) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(reason) => {
                // Skipped so that the minion's later events are not stuck behind it.
                tracing::error!(minion = %node, %reason, "skipping a malformed replicated event");
                return true;
            }
        };
        let now = self.now();
        let client_of = |id: &str| -> Option<ClientId> {
            ClientId::parse(id)
                .inspect_err(|e| tracing::warn!(minion = %node, error = %e, "event names a malformed client id"))
                .ok()
        };
        match event {
            Event::ClientSeen(cs) => {
                let Some(id) = client_of(&cs.client_id) else {
                    return true;
                };
                let info = cs.info.unwrap_or_default();
                let connected_ms =
                    u64::try_from(i128::from(cs.connected_unix_ms) + behind_ms).unwrap_or(0);
                let sighting = Sighting {
                    id: id.clone(),
                    public_key: cs.public_key.to_vec(),
                    hostname: info.hostname,
                    fqdn: info.fqdn,
                    os: info.os,
                    ips: info.ips,
                    last_ip: cs.last_ip,
                    node: node.to_owned(),
                    // On our wall clock (recorded, shown) ...
                    connected_at: Timestamp(connected_ms),
                    // ... and, to order it against other nodes' sightings, on our monotonic
                    // clock: its age (by the minion's clock, over a span of seconds) before now.
                    connected_order: Monotonic(
                        self.clock
                            .monotonic()
                            .as_ms()
                            .saturating_sub(now.as_ms().saturating_sub(connected_ms)),
                    ),
                };
                if let Err(e) = self.registry.handle_seen_admitted(now, sighting) {
                    tracing::warn!(minion = %node, client = %id, error = %e, "refused a client seen on a minion");
                    return true;
                }
                self.keys
                    .insert(id.clone(), talon_core::ids::key_fingerprint(&cs.public_key));
                if let Err(e) = self.persist_registry().await {
                    tracing::error!(client = %id, error = %e, "cannot record a client");
                }
                self.send_pending(&id);
                self.offer_hunts(now, &id).await;
            }
            Event::ClientGone(g) => {
                if let Some(id) = client_of(&g.client_id) {
                    self.registry.set_disconnected(now, &id, node);
                }
            }
            Event::TaskDelivered(t) => {
                if let (Some(id), Ok(flow)) = (client_of(&t.client_id), FlowId::parse(&t.flow_id)) {
                    self.task_delivered(&id, &flow).await;
                }
            }
            // `drain_inbox` hands completions to the intake before this; one that got here would
            // be acknowledged unrecorded, so it is refused (the minion resends it) and said.
            Event::FlowCompleted(f) => {
                tracing::error!(minion = %node, flow = %f.flow_id, "a replicated completion reached the generic apply path; not applied");
                return false;
            }
            Event::NodeStarted(_) => {
                let n = self.registry.disconnect_node(now, node);
                tracing::info!(minion = %node, clients = n, "minion restarted: its clients are disconnected until they reconnect");
            }
        }
        true
    }

    /// Offers a connected client to every running hunt.
    /// Offers a hunt to a client if it is connected (else it is offered every running hunt when it
    /// connects): at the hunt's creation, and when a failed schedule is retried.
    pub(super) fn offer_to_connected(&mut self, now: Timestamp, hunt: &HuntId, id: &ClientId) {
        let Some(rec) = self.registry.get(id).filter(|r| r.connected) else {
            return;
        };
        let (os, labels) = (rec.os.clone(), rec.labels.clone());
        let facts = ClientFacts {
            id,
            os: &os,
            labels: &labels,
        };
        self.hunts.offer_to(now, hunt, facts);
    }

    pub(super) async fn offer_hunts(&mut self, now: Timestamp, id: &ClientId) {
        let Some(rec) = self.registry.get(id) else {
            return;
        };
        let (os, labels) = (rec.os.clone(), rec.labels.clone());
        self.hunts.offer(
            now,
            ClientFacts {
                id,
                os: &os,
                labels: &labels,
            },
        );
        // A refused schedule was undone in the hunt manager (offered again later) and logged where
        // it failed; nothing else is owed to anyone here.
        if let Err(e) = self.drain_hunts().await {
            tracing::debug!(client = %id, error = %e, "offering the running hunts to a client did not all go through");
        }
    }

    pub(super) async fn create_hunt(
        &mut self,
        now: Timestamp,
        req: api::CreateHuntRequest,
    ) -> Result<api::HuntSummary, Status> {
        let given: BTreeMap<String, String> = req.params.into_iter().collect();
        let (spec, params) = talon_core::artifacts::validate(&req.artifact, &given)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let labels = |ls: Vec<String>| -> Result<std::collections::BTreeSet<String>, Status> {
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
        let hunt_spec = HuntSpec {
            artifact: spec.name.to_owned(),
            params,
            include_labels: labels(req.include_labels)?,
            exclude_labels: labels(req.exclude_labels)?,
            os,
            expires: now.plus_ms(ttl_s.saturating_mul(1000)),
            client_limit: (req.client_limit > 0).then_some(req.client_limit),
            description: req.description,
        };
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        let id = HuntId::from_u64(u64::from_le_bytes(n));
        self.hunts
            .create(now, id.clone(), hunt_spec)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Acknowledged only once its record is durable (invariant 5 (docs/architecture.md)); if it
        // is not, the hunt is forgotten, not left running with nothing on storage.
        if let Err(e) = self.drain_hunts().await {
            self.hunts.handle_create_failed(&id);
            return Err(Status::unavailable(format!(
                "the hunt was not created ({}); try again (if the master stopped while writing                  it, it may appear after the restart)",
                e.message()
            )));
        }
        tracing::info!(hunt = %id, artifact = spec.name, "hunt created");
        self.broadcast(broadcast::Kind::HuntStarted(pc::HuntStarted {
            hunt_id: id.to_string(),
        }));
        // Every client connected to any node is offered the hunt now; later ones when they connect.
        let connected: Vec<ClientId> = self.registry.connected().map(|r| r.id.clone()).collect();
        for c in connected {
            self.offer_to_connected(now, &id, &c);
        }
        self.drain_hunts().await?;
        let h = self
            .hunts
            .get(&id)
            .ok_or_else(|| Status::internal("the new hunt vanished"))?;
        Ok(hunt_summary(h))
    }

    /// Records and tasks newly scheduled hunt participants. For each client one atomic write: its
    /// participant record, its flow record and its pending task — all of them or none, whatever
    /// crash follows (a restart that finds the participant finds its task; its frontend finds the
    /// flow tasked) — durable before the task is sent. Up to [`LOAD_CONCURRENCY`] clients are
    /// written at once, so one journal sync covers many of them. A client whose write is refused,
    /// or that already has `max_queued_tasks_per_client` tasks waiting, is no participant: the hunt
    /// manager undoes it and offers it again later (docs/architecture.md, "Invariants").
    pub(super) async fn schedule(
        &mut self,
        batch: Vec<(HuntId, ClientId, FlowId)>,
    ) -> Result<(), Status> {
        let now = self.now();
        let mut groups = BTreeMap::new();
        for (hunt, client, flow) in batch {
            let Some(h) = self.hunts.get(&hunt) else {
                continue;
            };
            let spec = h.record().spec.clone();
            let record = FlowJson {
                client_id: client.to_string(),
                flow_id: flow.to_string(),
                artifact: spec.artifact.clone(),
                params: spec.params.clone(),
                hunt_id: Some(hunt.to_string()),
                state: FlowRecordState::Queued,
                rows: 0,
                uploaded_bytes: 0,
                error: String::new(),
                created_ms: now.as_ms(),
                finished_ms: 0,
                uploads: vec![],
                runs: vec![],
            };
            let group = vec![
                (
                    paths::hunt_participant(&hunt, &client),
                    json_bytes(&ParticipantJson::Scheduled)?,
                ),
                (paths::flow_record(&client, &flow), json_bytes(&record)?),
            ];
            let NodeRole::Master(m) = &mut self.role else {
                return Err(Status::internal("hunts are scheduled on the master"));
            };
            // At the client's task bound it is no participant: undone, offered again later.
            let upload_max = self.opts.codec.upload_bytes_max;
            match hunt_tasks::schedule(
                &mut self.hunts,
                &mut m.tasks,
                self.clock.monotonic(),
                &hunt,
                &client,
                &flow,
                upload_max,
            ) {
                Ok(token) => {
                    groups.insert(token, group);
                }
                Err(e) => {
                    tracing::warn!(client = %client, hunt = %hunt, error = %e, "hunt task not queued yet; offering it again later");
                }
            }
        }
        // Refused groups are undone in the hunt manager as their `Created` comes back.
        self.drain_tasks(groups).await;
        Ok(())
    }

    /// Performs the hunt manager's actions: a participant is journalled before its task is delivered.
    /// `Err` carries the first write that failed (the node fail-stops on it, see `Meta::set`): what
    /// the caller was about to acknowledge is not durable.
    pub(super) async fn drain_hunts(&mut self) -> Result<(), Status> {
        let mut failed = None;
        // Consecutive Schedule actions are written together (each client's records in order, many
        // clients at once, so the journal's group commit covers them); anything else waits for them.
        let mut batch: Vec<(HuntId, ClientId, FlowId)> = Vec::new();
        loop {
            let a = self.hunts.poll_action();
            if !matches!(a, Some(HuntAction::Schedule { .. }))
                && !batch.is_empty()
                && let Err(e) = self.schedule(std::mem::take(&mut batch)).await
            {
                failed.get_or_insert(e);
            }
            let Some(a) = a else { break };
            match a {
                HuntAction::Schedule { hunt, client, flow } => {
                    batch.push((hunt, client, flow));
                    if batch.len() >= SCHEDULE_BATCH_MAX {
                        if let Err(e) = self.schedule(std::mem::take(&mut batch)).await {
                            failed.get_or_insert(e);
                        }
                        // A hunt over 100,000 clients is 100 batches, and the node's other work
                        // (pings, the API, other streams) gets a turn between them: scheduling
                        // all at once, a master logged nothing for 43 s and its API connection
                        // was dropped by the keep-alive.
                        tokio::task::yield_now().await;
                    }
                }
                HuntAction::Participant {
                    hunt,
                    client,
                    participation,
                } => {
                    let key = paths::hunt_participant(&hunt, &client);
                    if let Err(e) =
                        save_json(&self.datastore, &key, &ParticipantJson::from(participation))
                            .await
                    {
                        // Not counted until it is recorded: the completion fails with it, and the
                        // client's (or minion's) resend brings the outcome again.
                        tracing::warn!(hunt = %hunt, client = %client, error = %e, "cannot record a hunt outcome yet");
                        self.hunts
                            .handle_outcome_failed(&hunt, &client, participation);
                        failed.get_or_insert(e);
                    }
                }
                HuntAction::Offer { hunt, client } => {
                    self.offer_to_connected(self.now(), &hunt, &client)
                }
                HuntAction::Record(r) => {
                    if let Err(e) = save_json(
                        &self.datastore,
                        &paths::hunt_record(&r.id),
                        &HuntJson::from_record(&r),
                    )
                    .await
                    {
                        tracing::error!(hunt = %r.id, error = %e, "cannot record a hunt");
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    pub(super) async fn label(
        &mut self,
        client: &str,
        label: &str,
        remove: bool,
    ) -> Result<api::ClientSummary, Status> {
        let id = ClientId::parse(client).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let rec = self
            .registry
            .set_label(&id, label, remove)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let out = summary(rec);
        self.persist_registry().await?;
        Ok(out)
    }

    pub(super) async fn collect(
        &mut self,
        now: Timestamp,
        client: &str,
        artifact: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<api::FlowSummary, Status> {
        let id = ClientId::parse(client).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.registry.get(&id).is_none() {
            return Err(Status::not_found(format!(
                "no client {id} (search with `talon clients search all`)"
            )));
        }
        let (spec, params) = talon_core::artifacts::validate(artifact, params)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut n = [0u8; 8];
        self.entropy.fill(&mut n);
        let flow = FlowId::from_u64(u64::from_le_bytes(n));
        let record = FlowJson {
            client_id: id.to_string(),
            flow_id: flow.to_string(),
            artifact: spec.name.to_owned(),
            params: params.clone(),
            hunt_id: None,
            state: FlowRecordState::Queued,
            rows: 0,
            uploaded_bytes: 0,
            error: String::new(),
            created_ms: now.as_ms(),
            finished_ms: 0,
            uploads: vec![],
            runs: vec![],
        };
        let upload_max = self.opts.codec.upload_bytes_max;
        let task = hunt_tasks::task(&flow, spec.name, &params, None, upload_max);
        self.deliver(&id, &flow, task, &record).await?;
        tracing::info!(client = %id, flow = %flow, artifact = spec.name, "collection scheduled");
        Ok(flow_summary(&record))
    }

    /// Performs a step of recording a completion (the intake's completions machine, master).
    pub(super) async fn record_step(&mut self, step: RecordStep) {
        let now = self.now();
        match step {
            RecordStep::Delivered { key } => {
                // A completed flow was delivered, whether or not its TaskAck reached us.
                if let NodeRole::Master(m) = &mut self.role
                    && m.tasks.handle_acked(&key.client, &key.flow)
                {
                    self.drain_tasks(BTreeMap::new()).await;
                }
            }
            // Record reads and writes are awaited here, as the inbox applies a minion's events one
            // at a time: sent round the actor's queue, each completion a minion replicates would
            // wait behind the whole queue twice (docs/architecture.md, "known shortcuts").
            RecordStep::Read { token, key } => {
                let k = paths::flow_record(&key.client, &key.flow);
                let record = load_json::<FlowJson>(&self.datastore, &k)
                    .await
                    .map_err(|e| {
                        tracing::error!(flow = %key.flow, error = %e, "cannot read flow record");
                    });
                self.intake.handle_read(now, token, record);
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
                let r = self.datastore.write_all(writes).await.map(|_| ());
                let outcome = self.write_outcome("a flow's completion", r);
                self.intake.handle_written(token, outcome);
            }
            RecordStep::StartUploads { key } => {
                let (fs, ds) = (self.filestore.volume().clone(), self.datastore.clone());
                self.uploads.start(fs, ds, key);
            }
            RecordStep::HuntOutcome {
                token,
                hunt,
                client,
                state,
                rows,
                uploaded_bytes,
            } => {
                self.hunts
                    .handle_outcome(now, &hunt, &client, state, rows, uploaded_bytes);
                // A participant record not written is undone in the hunt manager
                // (`handle_outcome_failed`) and comes again with the resend.
                let outcome = match self.drain_hunts().await {
                    Ok(()) => Outcome::Done,
                    Err(_) => Outcome::Unknown,
                };
                self.intake.handle_hunt_recorded(token, outcome);
            }
        }
    }
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
