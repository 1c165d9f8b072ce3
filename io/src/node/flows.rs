//! Client flows on every node: the frontend's flow messages and the intake actions every role
//! performs the same way — storing messages, the two-phase acknowledgement (stored, then settled on
//! the shared volume), audits, locating a completed flow's runs.

use super::*;

/// How a completion's recording ended (the intake's `Recorded`).
fn log_recorded(key: &FlowKey, result: &Recorded) {
    let (client, flow) = (&key.client, &key.flow);
    match result {
        Recorded::Written { unlisted: None } => tracing::info!(%client, %flow, "flow completed"),
        Recorded::Written {
            unlisted: Some(why),
        } => tracing::warn!(%client, %flow, "flow completed: {why}"),
        // Nothing to record it in (not a flow this master created): acknowledged, or the client
        // would resend forever.
        Recorded::NoRecord => tracing::warn!(%client, %flow, "completed flow has no record"),
        _ => {}
    }
}

impl Frontend {
    /// A client flow's message, or a result of storing one (every node).
    pub(super) fn handle_flow(&mut self, msg: Msg) {
        let at = self.clock.monotonic();
        match msg {
            Msg::Flow {
                client,
                flow,
                seq,
                data,
                raw,
            } => {
                let key = FlowKey { client, flow };
                match self
                    .intake
                    .handle_message(at, key.clone(), seq, data.tracker_payload())
                {
                    // A Store action takes the bytes (the actor drops them after its drain).
                    Ok(()) => {
                        self.raw.insert((key, seq), raw);
                    }
                    Err(e) => self.refuse(&key, seq, e),
                }
            }
            Msg::Stored { key, seq, ok } => self.intake.handle_stored(at, &key, seq, ok),
            Msg::Audited { key, found } => self.intake.handle_audit(at, &key, found),
            Msg::Settled { token, ok } => self.intake.handle_settled(token, ok),
            Msg::Located { token, runs } => self.intake.handle_located(token, runs),
            _ => {}
        }
    }

    /// Tells a client why its message was not taken. A message after the final status is its
    /// mistake; the rest are back-pressure it should retry.
    pub(super) fn refuse(&mut self, key: &FlowKey, seq: u64, e: talon_core::flows::FlowError) {
        let code = match e {
            talon_core::flows::FlowError::AfterFinal { .. } => comms::ErrorCode::InvalidMessage,
            // Not stored, never will be: its refusal is acknowledged in its place.
            talon_core::flows::FlowError::OverBudget(_) => comms::ErrorCode::TooLarge,
            _ => comms::ErrorCode::Busy,
        } as i32;
        let m = comms::ServerError {
            code,
            message: e.to_string(),
            flow_id: key.flow.to_string(),
            seq,
        };
        self.push(&key.client, server_message::Kind::Error(m));
    }

    /// Stores message `seq` of a flow in the filestore in the background, then reports `Stored`.
    pub(super) fn store_flow_message(&self, key: FlowKey, seq: u64, raw: Bytes) {
        let (fs, tx) = (self.filestore.clone(), self.done_tx.clone());
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

    /// Runs `work` in the background and hands its result to the actor as a message.
    pub(super) fn spawn_then<F, T>(&self, work: F, msg: impl FnOnce(T) -> Msg + Send + 'static)
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(msg(work.await)).await;
        });
    }

    /// Performs an intake action every node performs the same way; hands back those the role
    /// performs (recording or replicating a completion).
    pub(super) fn intake_action(
        &mut self,
        a: IntakeAction<RunRef, ApplyOrigin>,
    ) -> Option<IntakeAction<RunRef, ApplyOrigin>> {
        match a {
            IntakeAction::Store { key, seq } => {
                let Some(raw) = self.raw.remove(&(key.clone(), seq)) else {
                    // The bytes are gone (cannot happen: stored right after handle_message).
                    self.intake
                        .handle_stored(self.clock.monotonic(), &key, seq, false);
                    return None;
                };
                self.store_flow_message(key, seq, raw);
            }
            IntakeAction::StoreRefusal { key, seq, reason } => {
                tracing::warn!(client = %key.client, flow = %key.flow, seq, %reason, "refused a flow message; the flow fails");
                // (No bytes were kept for it: a refused message is never stored.)
                let refusal = refusal_record(&key.flow, seq, self.now(), &reason);
                self.store_flow_message(key, seq, refusal);
            }
            IntakeAction::StoreEvent { key } => self.store_event(key),
            IntakeAction::EventAck { key, settled } => self.ack_event(key, settled),
            IntakeAction::Ack { key, seq, settled } => {
                let ack = comms::FlowAck {
                    flow_id: key.flow.to_string(),
                    seq,
                    settled,
                };
                self.push(&key.client, server_message::Kind::Ack(ack));
            }
            IntakeAction::Audit { key } => {
                let (fs, limits) = (self.filestore.clone(), self.opts.codec.clone());
                let k = key.clone();
                self.spawn_then(async move { audit(&fs, &k, &limits).await }, |found| {
                    Msg::Audited { key, found }
                });
            }
            IntakeAction::Settle { token } => {
                let fs = self.filestore.clone();
                self.spawn_then(async move { fs.settled().await.is_ok() }, move |ok| {
                    Msg::Settled { token, ok }
                });
            }
            IntakeAction::Locate {
                token,
                key,
                messages,
            } => {
                // Reported only once every message is on the shared volume, where the master, the
                // API and other frontends read.
                let fs = self.filestore.clone();
                let work = async move {
                    fs.settled().await.map_err(|e| e.to_string())?;
                    fs.runs(&key.client, &key.flow, messages)
                        .await
                        .map_err(|e| e.to_string())
                };
                self.spawn_then(work, move |runs| Msg::Located { token, runs });
            }
            IntakeAction::Recorded { key, result } => {
                self.filestore.forget_runs(&key.client, &key.flow);
                log_recorded(&key, &result);
            }
            IntakeAction::NotRecorded { key, why } => {
                tracing::warn!(client = %key.client, flow = %key.flow, %why, "a flow's completion is not recorded yet; the client's resend brings it again");
            }
            a @ (IntakeAction::Replicate { .. }
            | IntakeAction::Record(_)
            | IntakeAction::Applied { .. }) => return Some(a),
        }
        None
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

    /// What a `Settle` or `Locate` waits on: `Filestore::settled` does not return while the volume
    /// is hung, and returns once it recovers, with the message on the volume. (The settle queue's
    /// bound is the core intake's: `node/intake/tests.rs`.)
    #[tokio::test]
    async fn settled_waits_for_a_hung_volume_and_returns_once_it_recovers() {
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
        let waiting = tokio::spawn({
            let fs = fs.clone();
            async move { fs.settled().await }
        });
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "settled while the volume is hung");
        open_tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("settled within 30 s of the volume's recovery")
            .unwrap()
            .unwrap();
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
