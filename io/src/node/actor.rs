//! The node actor: one task that owns the node's state — the [`Frontend`] every node has and its
//! role ([`RoleDriver`]: `master.rs` or `minion.rs`) — takes its inputs from a bounded channel
//! ([`Msg`]), performs the core machines' actions and feeds their results back.

use super::*;

/// What every node has, whatever its role: its client connections, their flows (core
/// `node::intake`) and the task notifications pushed to them.
pub(super) struct Frontend {
    pub(super) opts: NodeOptions,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) datastore: Meta,
    pub(super) filestore: Filestore,
    /// Client flows: stores, the two-phase acknowledgement, completions and their recording.
    pub(super) intake: Intake<FlowJson, ApplyOrigin>,
    pub(super) conns: BTreeMap<ClientId, Conn>,
    /// Tasks for clients connected here, pushed at `notifications_per_second`.
    pub(super) notify: Paced<(ClientId, String), comms::Task>,
    /// The bytes of the flow message being handled, until a Store action takes them (at most one).
    pub(super) raw: BTreeMap<(FlowKey, u64), Bytes>,
    /// The bytes of the event batch being handled, until a StoreEvent action takes them (at most
    /// one).
    pub(super) raw_events: BTreeMap<talon_core::events::EventKey, Bytes>,
    /// The client event table (docs/events.md), as last read (shared with the tasks that read a
    /// connecting client's labels, not copied for each).
    pub(super) event_table: Arc<Vec<talon_core::events::Assignment>>,
    /// The event table was read since the node started: until then a connecting client is told
    /// nothing (an empty table would stop its artifacts and discard what they had not sent) and
    /// its batches are refused as busy (it sends them again).
    pub(super) event_table_loaded: bool,
    /// Where effects performed in the background report their results: the actor takes these
    /// before any new input (an effect's result never waits behind a queue of client messages).
    pub(super) done_tx: mpsc::Sender<Msg>,
}

/// What a role adds to the [`Frontend`]: the master's policy (`master.rs`, over core
/// `node::Master`) or a minion's replication link (`minion.rs`). The actor drives either the same
/// way, and nothing outside a role asks which role it is.
pub(super) trait RoleDriver: Send + 'static {
    /// Handles a message about client connections, the API or the cluster.
    fn handle(&mut self, fe: &mut Frontend, msg: Msg) -> impl Future<Output = ()> + Send;

    /// Performs an intake action the frontend leaves to the role (recording or replicating a
    /// completion).
    fn intake_action(
        &mut self,
        fe: &mut Frontend,
        a: IntakeAction<RunRef, ApplyOrigin>,
    ) -> impl Future<Output = ()> + Send;

    /// Performs the role's own actions; returns how many.
    fn drain(&mut self, fe: &mut Frontend) -> impl Future<Output = usize> + Send;

    /// The role's next deadline on the monotonic clock, and on the wall clock.
    fn poll_timeout(&self) -> (Option<Monotonic>, Option<Timestamp>);

    /// A deadline passed.
    fn handle_timeout(&mut self, fe: &mut Frontend);

    /// Sets the role's gauges in the node's metrics (after each message or deadline, once its
    /// actions are performed): cheap, or only when something changed.
    fn publish(&mut self) {}
}

pub(super) struct Actor<R> {
    pub(super) fe: Frontend,
    pub(super) role: R,
}

impl Frontend {
    pub(super) fn new(
        opts: &NodeOptions,
        clock: Arc<dyn Clock>,
        datastore: Meta,
        filestore: Filestore,
        intake: Intake<FlowJson, ApplyOrigin>,
        done_tx: mpsc::Sender<Msg>,
    ) -> Frontend {
        let per_s = opts.notifications_per_second.max(1);
        let queued = per_s.saturating_mul(NOTIFY_QUEUE_SECONDS).max(1024);
        let notify = Paced::new(
            per_s,
            usize::try_from(queued).unwrap_or(usize::MAX),
            clock.monotonic(),
        );
        Frontend {
            opts: opts.clone(),
            clock,
            datastore,
            filestore,
            intake,
            conns: BTreeMap::new(),
            notify,
            raw: BTreeMap::new(),
            raw_events: BTreeMap::new(),
            event_table: Arc::default(),
            event_table_loaded: false,
            done_tx,
        }
    }
}

impl Frontend {
    /// Sets the node's client and flow gauges (two atomic stores: cheap after every message).
    pub(super) fn publish(&self) {
        let m = crate::metrics::metrics();
        m.clients_connected
            .set(i64::try_from(self.conns.len()).unwrap_or(i64::MAX));
        m.flows_in_flight
            .set(i64::try_from(self.intake.tracker().len()).unwrap_or(i64::MAX));
    }
}

impl<R: RoleDriver> Actor<R> {
    /// Takes inputs from `rx` (connections, client messages, requests) and results of the
    /// effects it started from `done` (first), until every sender of `rx` is gone or the node has
    /// fail-stopped (`stopped`): the process is exiting, and requests still queued get "shutting
    /// down".
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Msg>, mut done: mpsc::Receiver<Msg>) {
        while !self.fe.stopped() {
            let wait = self.next_deadline();
            tokio::select! {
                biased;
                Some(m) = done.recv() => {
                    if self.fe.stopped() {
                        break;
                    }
                    self.handle(m).await;
                }
                msg = rx.recv() => match msg {
                    Some(m) => {
                        if self.fe.stopped() {
                            break;
                        }
                        self.handle(m).await;
                    }
                    None => break,
                },
                _ = tokio::time::sleep(wait) => {
                    if self.fe.stopped() {
                        break;
                    }
                    self.fe.intake.handle_timeout(self.fe.clock.monotonic());
                    self.role.handle_timeout(&mut self.fe);
                    self.drain().await;
                    self.publish();
                }
            }
            // Also under a steady stream of messages, which keeps the timer from firing.
            let at = self.fe.clock.monotonic();
            if self.role.poll_timeout().0.is_some_and(|t| at >= t) {
                self.role.handle_timeout(&mut self.fe);
                self.drain().await;
            }
            self.fe.release_notifications(at);
        }
    }

    /// Sets the node's gauges: the frontend's and the role's.
    fn publish(&mut self) {
        self.fe.publish();
        self.role.publish();
    }

    /// How long until the next deadline (at most 30 s).
    fn next_deadline(&mut self) -> std::time::Duration {
        let (at, now) = (self.fe.clock.monotonic(), self.fe.clock.now());
        let (mono, wall) = self.role.poll_timeout();
        let next = [
            self.fe.intake.poll_timeout(),
            mono,
            self.fe.notify.poll_timeout(at),
        ]
        .into_iter()
        .fold(None, talon_core::time::earliest)
        .map_or(30_000, |t| t.since_ms(at));
        let wall = wall.map_or(30_000, |t| t.since_ms(now));
        std::time::Duration::from_millis(next.min(wall).min(30_000))
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Flow { .. }
            | Msg::Stored { .. }
            | Msg::Audited { .. }
            | Msg::Settled { .. }
            | Msg::Located { .. } => self.fe.handle_flow(msg),
            Msg::Event { .. }
            | Msg::EventStored { .. }
            | Msg::EventTable { .. }
            | Msg::LabelsChanged { .. }
            | Msg::EventTableFor { .. } => self.fe.handle_events(msg),
            other => self.role.handle(&mut self.fe, other).await,
        }
        self.drain().await;
        self.publish();
        // A Store action took the message's bytes; a resend that was only re-acknowledged left
        // them: at most one entry lives between messages.
        self.fe.raw.clear();
        self.fe.raw_events.clear();
    }

    /// Performs the intake's and the role's actions until neither asks for anything: a
    /// replicated completion goes from the master's inbox into the intake, and its end back.
    async fn drain(&mut self) {
        loop {
            let mut n = 0;
            while let Some(a) = self.fe.intake.poll_action() {
                n += 1;
                if let Some(a) = self.fe.intake_action(a) {
                    self.role.intake_action(&mut self.fe, a).await;
                }
            }
            n += self.role.drain(&mut self.fe).await;
            if n == 0 {
                return;
            }
        }
    }
}

impl Frontend {
    pub(super) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(super) fn time(&self) -> Time {
        Time {
            now: self.clock.now(),
            at: self.clock.monotonic(),
        }
    }

    /// Fail-stop: once the datastore (or the filestore buffer) has stopped, memory may be ahead of
    /// what is durable (a participant scheduled whose write failed), and the process is about to
    /// exit. Nothing more is acted on or answered: a dropped request's caller gets "shutting down",
    /// never figures a restart would not find.
    pub(super) fn stopped(&self) -> bool {
        self.filestore.stopped() || matches!(&self.datastore, Meta::Local(d) if d.stopped())
    }

    /// Queues a task notification for a client connected here (paced by
    /// `notifications_per_second`). Dropped at the queue's bound: the master sends it again.
    pub(super) fn notify_task(&mut self, client: &ClientId, task: comms::Task) {
        if !self.conns.contains_key(client) {
            return; // Not connected here (any more): the master sends it where it connects.
        }
        let key = (client.clone(), task.flow_id.clone());
        if let Err(full) = self.notify.push(key, task) {
            tracing::warn!(client = %client, max = full.max, "task notification queue is full; the task is sent again later");
        }
    }

    /// Pushes the notifications the rate allows now.
    pub(super) fn release_notifications(&mut self, at: Monotonic) {
        while let Some(((client, _), task)) = self.notify.poll(at) {
            self.push(&client, server_message::Kind::Task(task));
        }
    }

    pub(super) fn push(&self, client: &ClientId, kind: server_message::Kind) -> bool {
        match self.conns.get(client) {
            Some(c) => {
                c.tx.try_send(Ok(Box::new(comms::ServerMessage { kind: Some(kind) })))
                    .is_ok()
            }
            None => false,
        }
    }

    /// A client's stream is accepted: it is connected here, and told so.
    pub(super) fn accept(&mut self, id: &ClientId, conn: Conn) {
        // A reconnect replaces the old stream.
        self.conns.insert(id.clone(), conn);
        let welcome = comms::Welcome {
            client_id: id.to_string(),
            node: self.opts.node_name.clone(),
            max_message_bytes: self.opts.codec.message_bytes_max as u32,
            max_rows_per_batch: self.opts.codec.rows_per_batch_max as u32,
            max_in_flight: self.opts.flows.stores_in_flight_max as u32,
        };
        self.push(id, server_message::Kind::Welcome(welcome));
        self.send_event_table(id);
    }

    /// A client's stream `conn` ended; true if it was the one connected here.
    pub(super) fn gone(&mut self, client: &ClientId, conn: u64) -> bool {
        if self.conns.get(client).is_some_and(|c| c.id == conn) {
            self.conns.remove(client);
            tracing::info!(client = %client, "client disconnected");
            return true;
        }
        false
    }
}
