//! The minion's role: its clients' connections, task acknowledgements and completions go to the
//! master through the replication link; what the master broadcasts comes back through it.

use super::*;

/// A minion's part of the node.
pub(super) struct MinionDriver {
    link: Link,
    /// The keys of clients seen here (the master's registry refuses a different key too, but a
    /// minion refuses it before anything is replicated).
    keys: KeyCache,
    /// Events not handed to the link because it had stopped (the process is stopping): the first
    /// is logged, the rest counted (a clean stop of a minion with 1,000 clients logged
    /// 1,000 errors, one per client gone).
    unreplicated: u64,
}

impl MinionDriver {
    pub(super) fn new(link: Link, expected_clients: usize) -> MinionDriver {
        MinionDriver {
            link,
            keys: KeyCache::new(expected_clients.max(1)),
            unreplicated: 0,
        }
    }

    /// Hands an event to the replication link. Waits while the outbox is full.
    async fn replicate(&mut self, event: Event, applied: Option<oneshot::Sender<()>>) {
        if let Err(e) = self.link.push(event, applied).await {
            self.unreplicated += 1;
            if self.unreplicated == 1 {
                // The link stops only with the process: what is left are clients going away as the
                // minion stops, which the master learns when they reconnect (to any node).
                tracing::info!(error = %e, "stopping: events from now on are not replicated (counted at debug level)");
            } else {
                tracing::debug!(error = %e, unreplicated = self.unreplicated, "cannot replicate an event");
            }
        }
    }

    /// A client connected here: told welcome at once, and the master told it was seen (which
    /// sends its tasks and offers it the running hunts).
    async fn connected(
        &mut self,
        fe: &mut Frontend,
        peer: Peer,
        hello: codec::Hello,
        tx: ClientTx,
        conn: u64,
    ) -> Result<(), Status> {
        let id = peer.client_id.clone();
        if self.keys.check(&id, &peer.public_key) == KeyCheck::Mismatch {
            return Err(Status::permission_denied(format!(
                "client {id} presented a key it did not enrol with"
            )));
        }
        tracing::info!(client = %id, host = %crate::text::Printable(&hello.info.hostname), addr = %peer.addr, "client connected");
        let i = &hello.info;
        let seen = pc::ClientSeen {
            client_id: id.to_string(),
            public_key: peer.public_key.clone().into(),
            info: Some(comms::ClientInfo {
                hostname: i.hostname.clone(),
                fqdn: i.fqdn.clone(),
                os: i.os.clone(),
                kernel: i.kernel.clone(),
                arch: i.arch.clone(),
                ips: i.ips.clone(),
                ..Default::default()
            }),
            last_ip: peer.addr.ip().to_string(),
            connected_unix_ms: fe.now().as_ms(),
            running_flows: hello.running_flows.iter().map(|f| f.to_string()).collect(),
        };
        self.keys.insert(
            id.clone(),
            talon_core::ids::key_fingerprint(&peer.public_key),
        );
        let c = Conn {
            id: conn,
            tx,
            seen: Some(seen.clone()),
        };
        fe.accept(&id, c);
        self.replicate(Event::ClientSeen(seen), None).await;
        Ok(())
    }

    /// What the replication link reports.
    async fn link_event(&mut self, fe: &mut Frontend, e: LinkEvent) {
        match e {
            LinkEvent::Connected => {
                if let Meta::Remote(r) = &fe.datastore {
                    r.clear(); // Broadcasts may have been missed while the stream was down.
                }
                fe.reload_event_table(); // Its changes among them.
                // The master may have restarted and lost who is connected here: tell it again.
                let seen: Vec<pc::ClientSeen> =
                    fe.conns.values().filter_map(|c| c.seen.clone()).collect();
                tracing::info!(
                    clients = seen.len(),
                    "re-announcing connected clients to the master"
                );
                for cs in seen {
                    self.replicate(Event::ClientSeen(cs), None).await;
                }
            }
            LinkEvent::Disconnected => {}
            LinkEvent::BroadcastsLost => {
                if let Meta::Remote(r) = &fe.datastore {
                    r.clear(); // An invalidation may have been among them.
                }
            }
            LinkEvent::Broadcast(b) => match b.kind {
                Some(broadcast::Kind::TaskQueued(t)) => {
                    if let (Ok(id), Some(task)) = (ClientId::parse(&t.client_id), t.task) {
                        // Not connected here any more: the master sends it again where it connects.
                        fe.notify_task(&id, task);
                    }
                }
                Some(broadcast::Kind::FlowCancelled(c)) => {
                    if let (Ok(id), Some(cancel)) = (ClientId::parse(&c.client_id), c.cancel) {
                        // Not connected here any more: lost, the flow runs on (docs/api.md).
                        fe.push(&id, server_message::Kind::Cancel(cancel));
                    }
                }
                Some(broadcast::Kind::DatastoreChanged(d)) => {
                    if let Meta::Remote(r) = &fe.datastore {
                        r.invalidate(&d.key);
                    }
                    if d.key.starts_with(paths::CLIENT_EVENTS) {
                        fe.reload_event_table();
                    }
                }
                Some(broadcast::Kind::HuntStarted(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt started on the master");
                }
                Some(broadcast::Kind::HuntStopped(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt stopped on the master");
                }
                Some(broadcast::Kind::LabelsChanged(l)) => {
                    if let Ok(client) = ClientId::parse(&l.client_id) {
                        fe.send_event_table_with(&client, l.labels.into_iter().collect());
                    }
                }
                None => {}
            },
        }
    }
}

/// What a minion answers where only the master can.
fn not_master<T>(reply: Reply<T>) {
    let _ = reply.send(Err(Status::failed_precondition(
        "this node is a minion; ask the master's API",
    )));
}

impl RoleDriver for MinionDriver {
    async fn handle(&mut self, fe: &mut Frontend, msg: Msg) {
        match msg {
            Msg::Connected {
                peer,
                hello,
                tx,
                conn,
                reply,
            } => {
                let r = self.connected(fe, peer, hello, tx, conn).await;
                let _ = reply.send(r);
            }
            Msg::Disconnected { client, conn } => {
                if fe.gone(&client, conn) {
                    let ev = Event::ClientGone(pc::ClientGone {
                        client_id: client.to_string(),
                    });
                    self.replicate(ev, None).await;
                }
            }
            Msg::TaskAck { client, flow } => {
                let ev = Event::TaskDelivered(pc::TaskDelivered {
                    client_id: client.to_string(),
                    flow_id: flow.to_string(),
                });
                self.replicate(ev, None).await;
            }
            Msg::Link(e) => self.link_event(fe, e).await,
            Msg::Replicated { token, applied } => fe.intake.handle_replicated(token, applied),
            Msg::MinionUp { reply, .. } => not_master(reply),
            Msg::Request { reply, .. } => not_master(reply),
            Msg::MinionDown { .. }
            | Msg::MinionEvents { .. }
            | Msg::Written { .. }
            | Msg::RecordRead { .. }
            | Msg::RecordWritten { .. }
            | Msg::DatastoreChanged { .. }
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

    async fn intake_action(&mut self, fe: &mut Frontend, a: IntakeAction<RunRef, ApplyOrigin>) {
        if let IntakeAction::Replicate {
            token,
            outcome: o,
            runs,
        } = a
        {
            tracing::info!(client = %o.key.client, flow = %o.key.flow, rows = o.rows, "flow completed; replicating");
            let (tx, rx) = oneshot::channel();
            self.replicate(completion_event(o, runs), Some(tx)).await;
            // Dropped unsent if the link failed before the master applied it.
            fe.spawn_then(async move { rx.await.is_ok() }, move |applied| {
                Msg::Replicated { token, applied }
            });
        }
    }

    async fn drain(&mut self, _: &mut Frontend) -> usize {
        0
    }

    fn poll_timeout(&self) -> (Option<Monotonic>, Option<Timestamp>) {
        (None, None)
    }

    fn handle_timeout(&mut self, _: &mut Frontend) {}
}
