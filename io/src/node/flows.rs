//! Client flows on every node: storing messages, the two-phase acknowledgement (stored, then
//! settled on the shared volume), completion, audits, and reassembling uploads (master).

use super::*;

/// Acknowledgements settled by one wait for the filestore buffer.
pub(super) const SETTLE_BATCH_MAX: usize = 4096;

/// What the filestore holds in place of a flow message the server refused: a log line at error
/// level saying why (results and uploads skip it; a person reading the flow's logs sees it).
pub(super) fn refusal_record(flow: &FlowId, seq: u64, now: Timestamp, reason: &str) -> Bytes {
    let m = comms::FlowMessage {
        flow_id: flow.to_string(),
        seq,
        payload: Some(comms::flow_message::Payload::Logs(comms::LogLines {
            lines: vec![comms::LogLine {
                time_unix_ms: now.as_ms(),
                level: "ERROR".into(),
                message: format!("message {seq} refused by the server: {reason}"),
            }],
        })),
    };
    Bytes::from(m.encode_to_vec())
}

/// Acknowledgements waiting to be sent again as settled, and the task that sends them.
#[derive(Clone)]
pub(super) struct Settler(mpsc::Sender<(ClientTx, comms::FlowAck)>);

impl Settler {
    /// Starts the task; at most `max` acknowledgements wait for it.
    pub(super) fn start(fs: Filestore, max: usize) -> Settler {
        let (tx, rx) = mpsc::channel(max);
        tokio::spawn(settle(fs, rx));
        Settler(tx)
    }

    /// Queues `ack` to be sent on `tx` once settled; false if the queue is full (dropped: the client
    /// resends the message, and its re-acknowledgement is offered again).
    pub(super) fn offer(&self, tx: ClientTx, ack: comms::FlowAck) -> bool {
        self.0.try_send((tx, ack)).is_ok()
    }
}

/// Sends acknowledgements again as settled, a batch at a time: everything queued is waited for with
/// one `Filestore::settled` (each acknowledgement was queued after its message was stored, so the
/// wait covers it). One wait at a time per node, whatever the rate of acknowledgements.
pub(super) async fn settle(fs: Filestore, mut rx: mpsc::Receiver<(ClientTx, comms::FlowAck)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, SETTLE_BATCH_MAX).await > 0 {
        if fs.settled().await.is_err() {
            return; // The buffer stopped: the node exits (fail-stop); clients resend.
        }
        for (tx, mut ack) in batch.drain(..) {
            ack.settled = true;
            let m = comms::ServerMessage {
                kind: Some(server_message::Kind::Ack(ack)),
            };
            // A full queue drops it: the client resends the message after 2 s, and it is
            // acknowledged and settled again.
            let _ = tx.try_send(Ok(Box::new(m)));
        }
    }
}

/// Reassembles completed flows' uploads on the volume, a bounded number at a time, each retried
/// until it is recorded (the volume may fail or be cut off for a while).
#[derive(Clone)]
pub(super) struct Reassembly {
    permits: Arc<tokio::sync::Semaphore>,
    /// A flow record with its uploads listed stays within this (`Datastore.max_value_size`).
    value_bytes_max: u64,
}

/// Uploads reassembled at once (each reads its flow's chunks and writes its files on the volume).
pub(super) const REASSEMBLY_CONCURRENCY: usize = 64;

/// The longest pause between two attempts at one flow's uploads.
pub(super) const REASSEMBLY_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl Reassembly {
    pub(super) fn new(value_bytes_max: u64) -> Reassembly {
        Reassembly {
            permits: Arc::new(tokio::sync::Semaphore::new(REASSEMBLY_CONCURRENCY)),
            value_bytes_max,
        }
    }

    /// Reassembles `key`'s uploads in the background: retried until the flow record lists them and
    /// its [`paths::uploads_pending`] marker is gone (or the process stops; then the next start
    /// takes it up again from the marker).
    pub(super) fn start(&self, fs: SharedVolume, ds: Meta, key: FlowKey) {
        let (permits, max) = (self.permits.clone(), self.value_bytes_max);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_secs(1);
            loop {
                let r = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    record_uploads(&fs, &ds, &key, max).await
                };
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(client = %key.client, flow = %key.flow, error = %e, retry_in_s = pause.as_secs(), "cannot reassemble uploads yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(REASSEMBLY_RETRY_MAX);
                    }
                }
            }
        });
    }
}

/// Rebuilds a completed flow's uploaded files and records them in its flow record, dropping its
/// [`paths::uploads_pending`] marker in the same atomic write. A record that would not fit in
/// `value_bytes_max` lists the uploads that fit, and the flow fails saying how many are unlisted
/// (their files are still in the filestore): a large record is the writer's doing, and stops
/// nothing but its own flow.
pub(super) async fn record_uploads(
    fs: &SharedVolume,
    ds: &Meta,
    key: &FlowKey,
    value_bytes_max: u64,
) -> Result<(), String> {
    let k = paths::flow_record(&key.client, &key.flow);
    let record = load_json::<FlowJson>(ds, &k).await?;
    let runs = record.as_ref().map(|f| f.runs.clone()).unwrap_or_default();
    let uploads = crate::storage::uploads::assemble(fs, &key.client, &key.flow, &runs)
        .await
        .map_err(|e| format!("reading the flow's chunks: {e}"))?;
    for u in uploads.iter().filter(|u| !u.error.is_empty()) {
        tracing::warn!(client = %key.client, flow = %key.flow, file = %crate::text::Printable(&u.name), error = %crate::text::Printable(&u.error), "upload not stored");
    }
    let marker = paths::uploads_pending(&key.client, &key.flow);
    let mut writes = vec![(marker, None)];
    if let Some(mut f) = record {
        f.uploads = uploads;
        let bytes = json_within(&mut f, value_bytes_max)?;
        writes.push((k, Some(bytes)));
    }
    ds.write_all(writes)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `f` as JSON of at most `max` bytes: if its upload list makes it larger, the list keeps the
/// uploads that fit (half the bound, leaving room for the rest of the record) and the flow is
/// marked failed with the number left out.
pub(super) fn json_within(f: &mut FlowJson, max: u64) -> Result<Bytes, String> {
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 <= max {
        return Ok(Bytes::from(bytes));
    }
    let total = f.uploads.len();
    let mut room = max / 2;
    let mut kept = 0;
    for u in &f.uploads {
        let len = serde_json::to_vec(u).map_err(|e| e.to_string())?.len() as u64 + 1;
        if len > room {
            break;
        }
        room -= len;
        kept += 1;
    }
    f.uploads.truncate(kept);
    f.state = FlowRecordState::Error;
    let why = format!(
        "{} of {total} uploads are not listed: the flow record would exceed \
         Datastore.max_value_size ({max} bytes)",
        total - kept
    );
    tracing::warn!(client = %f.client_id, flow = %f.flow_id, "{why}");
    f.error = if f.error.is_empty() {
        why
    } else {
        format!("{}; {why}", f.error)
    };
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "the flow record is {} bytes without its uploads, over Datastore.max_value_size ({max})",
            bytes.len()
        ));
    }
    Ok(Bytes::from(bytes))
}

/// Finds and decodes a flow's stored messages, wherever they were written (`None` if the
/// filestore failed).
pub(super) async fn audit(
    fs: &Filestore,
    key: &FlowKey,
    limits: &CodecLimits,
) -> Option<Vec<StoredMessage>> {
    let found = match fs.audit(&key.client, &key.flow).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(client = %key.client, flow = %key.flow, error = %e, "cannot audit a flow's stored messages");
            return None;
        }
    };
    let mut out = Vec::new();
    for (_, bytes) in found {
        let msg = comms::FlowMessage::decode(bytes).ok()?;
        let seq = msg.seq;
        let input = codec::validate(
            comms::ClientMessage {
                kind: Some(client_message::Kind::Flow(msg)),
            },
            limits,
        )
        .ok()?;
        if let ClientInput::Flow { data, .. } = input {
            out.push(StoredMessage {
                seq,
                payload: data.tracker_payload(),
            });
        }
    }
    Some(out)
}

impl Actor {
    /// Stores message `seq` of a flow in the filestore in the background, then reports `Stored`.
    pub(super) fn store_flow_message(&self, key: FlowKey, seq: u64, raw: Bytes) {
        let (fs, tx) = (self.filestore.clone(), self.self_tx.clone());
        tokio::spawn(async move {
            let path = paths::flow_message(&key.client, &key.flow, seq);
            let ok = match fs.store(&path, raw).await {
                Ok(()) => true,
                Err(e) => {
                    // Not acknowledged: the client resends it.
                    tracing::warn!(client = %key.client, flow = %key.flow, seq, error = %e, "cannot store a flow message");
                    false
                }
            };
            let _ = tx.send(Msg::Stored { key, seq, ok }).await;
        });
    }

    /// Performs the flow tracker's actions.
    pub(super) async fn drain_flows(&mut self) {
        while let Some(a) = self.flows.poll_action() {
            match a {
                FlowAction::Store { key, seq } => {
                    let Some(raw) = self.raw.remove(&(key.clone(), seq)) else {
                        // The bytes are gone (cannot happen: stored right after handle_message); fail the store.
                        self.flows.handle_stored(self.now(), &key, seq, false);
                        continue;
                    };
                    self.store_flow_message(key, seq, raw);
                }
                FlowAction::StoreRefusal { key, seq, reason } => {
                    tracing::warn!(client = %key.client, flow = %key.flow, seq, %reason, "refused a flow message; the flow fails");
                    // (No bytes were kept for it: a refused message is never stored.)
                    let refusal = refusal_record(&key.flow, seq, self.now(), &reason);
                    self.store_flow_message(key, seq, refusal);
                }
                FlowAction::Ack { key, seq } => {
                    let ack = comms::FlowAck {
                        flow_id: key.flow.to_string(),
                        seq,
                        settled: false,
                    };
                    // Acknowledged now (durable in the local buffer); settled once the buffer
                    // has copied it.
                    self.push(&key.client, server_message::Kind::Ack(ack.clone()));
                    if let Some(c) = self.conns.get(&key.client)
                        && !self.settler.offer(c.tx.clone(), ack)
                    {
                        tracing::debug!("settle queue full; the client's resend is settled later");
                    }
                }
                FlowAction::Audit { key } => {
                    let (fs, tx, limits) = (
                        self.filestore.clone(),
                        self.self_tx.clone(),
                        self.opts.codec.clone(),
                    );
                    tokio::spawn(async move {
                        let found = audit(&fs, &key, &limits).await;
                        let _ = tx.send(Msg::Audited { key, found }).await;
                    });
                }
                FlowAction::Completed(o) => {
                    // Reported only once every message is on the shared volume, where the master,
                    // the API and other frontends read.
                    let (fs, tx) = (self.filestore.clone(), self.self_tx.clone());
                    tokio::spawn(async move {
                        let runs = match fs.settled().await {
                            Ok(()) => fs
                                .runs(&o.key.client, &o.key.flow, o.messages)
                                .await
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.to_string()),
                        };
                        let (runs, ok) = match runs {
                            Ok(r) => (r, true),
                            Err(e) => {
                                tracing::error!(client = %o.key.client, flow = %o.key.flow, error = %e, "cannot copy or locate a flow's messages in the filestore");
                                (Vec::new(), false)
                            }
                        };
                        let _ = tx
                            .send(Msg::Settled {
                                outcome: o,
                                runs,
                                ok,
                            })
                            .await;
                    });
                }
            }
        }
    }

    /// A flow completed and its messages are on the shared volume: record it (master) or replicate
    /// its completion (minion); the tracker acknowledges the final status once that is durable.
    pub(super) async fn completed(&mut self, o: talon_core::flows::FlowOutcome, runs: Vec<RunRef>) {
        match &mut self.role {
            NodeRole::Master(_) => {
                let key = o.key.clone();
                let ok = self.flow_completed(o, runs).await;
                if ok {
                    self.filestore.forget_runs(&key.client, &key.flow);
                }
                self.flows.handle_recorded(&key, ok);
            }
            NodeRole::Minion(_) => {
                tracing::info!(client = %o.key.client, flow = %o.key.flow, rows = o.rows, "flow completed; replicating");
                let (tx, rx) = oneshot::channel();
                let ev = Event::FlowCompleted(pc::FlowCompleted {
                    client_id: o.key.client.to_string(),
                    flow_id: o.key.flow.to_string(),
                    hunt_id: String::new(),
                    state: match o.state {
                        FinalState::Completed => comms::FlowState::Completed,
                        FinalState::Error => comms::FlowState::Error,
                    } as i32,
                    error: o.error,
                    rows: o.rows,
                    uploaded_bytes: o.uploaded_bytes,
                    uploads: o.uploads,
                    messages: o.messages,
                    runs: runs.into_iter().map(Into::into).collect(),
                });
                self.replicate(ev, Some(tx)).await;
                let (me, key) = (self.self_tx.clone(), o.key);
                tokio::spawn(async move {
                    // Dropped unsent if the link failed before the master applied it.
                    let ok = rx.await.is_ok();
                    let _ = me.send(Msg::CompletionApplied { key, ok }).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod settle_tests {
    use super::*;
    use crate::storage::filestore::FilestoreOptions;
    use crate::storage::local::StdDisk;
    use crate::storage::volume::FsVolume;
    use crate::storage::volume::Volume;
    use std::io;

    /// A volume whose writes wait until the gate opens (a hung NFS server that recovers).
    struct Gate {
        open: tokio::sync::watch::Receiver<bool>,
        inner: FsVolume,
    }

    impl Gate {
        async fn wait(&self) {
            let mut open = self.open.clone();
            while !*open.borrow_and_update() {
                if open.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    impl Volume for Gate {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.wait().await;
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.wait().await;
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.wait().await;
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.wait().await;
            self.inner.commit(from, to).await
        }
    }

    fn ack(seq: u64) -> comms::FlowAck {
        comms::FlowAck {
            flow_id: "F.1".into(),
            seq,
            settled: false,
        }
    }

    /// invariant 7 (docs/architecture.md) for the settle queue: with the volume hung, it takes `max` acknowledgements
    /// and refuses the next; once the volume recovers, exactly those are sent again as settled.
    #[tokio::test]
    async fn settle_queue_is_bounded_and_settles_once_the_volume_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let volume = SharedVolume::new(Gate {
            open,
            inner: FsVolume::new(&dir.path().join("volume")).unwrap(),
        });
        let disk = StdDisk::new(&dir.path().join("local")).unwrap();
        let opts = FilestoreOptions {
            buffer_bytes: 16 << 20,
            message_bytes_max: 1 << 20,
            writer: "test".into(),
            flows_remembered: 100,
        };
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (fs, _task, _) =
            crate::storage::filestore::Filestore::open(disk, volume, clock, &opts).unwrap();
        // Stored (journalled, acknowledged) but not settled: the volume is hung.
        fs.store("clients/C.1/flows/F.1/messages/0", Bytes::from_static(b"m"))
            .await
            .unwrap();
        const MAX: usize = 4;
        let settler = Settler::start(fs.clone(), MAX);
        let (tx, mut rx) = mpsc::channel(16);
        // The settle task has not run yet (this runtime runs one task at a time): the queue fills.
        for seq in 0..MAX as u64 {
            assert!(
                settler.offer(tx.clone(), ack(seq)),
                "ack {seq} refused below the bound"
            );
        }
        assert!(
            !settler.offer(tx.clone(), ack(99)),
            "the bound was not enforced"
        );
        // Nothing is settled while the volume is hung.
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        open_tx.send(true).unwrap();
        for seq in 0..MAX as u64 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(30), rx.recv())
                .await
                .expect("settled within 30 s")
                .unwrap()
                .unwrap();
            match m.kind {
                Some(server_message::Kind::Ack(a)) => {
                    assert_eq!((a.seq, a.settled), (seq, true));
                }
                other => panic!("expected a settled ack, got {other:?}"),
            }
        }
        // The refused one never comes (the client's resend would be offered again).
        drop(settler);
        drop(tx);
        assert!(rx.recv().await.is_none());
        let (_, found) =
            crate::storage::segments::locate(fs.volume(), "clients/C.1/flows/F.1/messages")
                .await
                .unwrap();
        assert_eq!(
            found,
            vec![(
                "clients/C.1/flows/F.1/messages/0".to_owned(),
                Bytes::from_static(b"m")
            )]
        );
    }
}
