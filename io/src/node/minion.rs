//! The minion's part of the node: its replication link to the master.

use super::*;

impl Actor {
    /// Hands an event to the replication link (minion only). Waits while the outbox is full.
    pub(super) async fn replicate(&self, event: Event, applied: Option<oneshot::Sender<()>>) {
        if let NodeRole::Minion(m) = &self.role
            && let Err(e) = m.link.push(event, applied).await
        {
            let before = m
                .unreplicated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if before == 0 {
                tracing::error!(error = %e, "cannot replicate an event; events that follow are not replicated either (counted at debug level)");
            } else {
                tracing::debug!(error = %e, unreplicated = before + 1, "cannot replicate an event");
            }
        }
    }

    /// What the replication link reports (minion).
    pub(super) async fn link_event(&mut self, e: LinkEvent) {
        match e {
            LinkEvent::Connected => {
                if let Meta::Remote(r) = &self.datastore {
                    r.clear(); // Broadcasts may have been missed while the stream was down.
                }
                // The master may have restarted and lost who is connected here: tell it again.
                let seen: Vec<pc::ClientSeen> =
                    self.conns.values().filter_map(|c| c.seen.clone()).collect();
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
                if let Meta::Remote(r) = &self.datastore {
                    r.clear(); // An invalidation may have been among them.
                }
            }
            LinkEvent::Broadcast(b) => match b.kind {
                Some(broadcast::Kind::TaskQueued(t)) => {
                    if let (Ok(id), Some(task)) = (ClientId::parse(&t.client_id), t.task) {
                        // Not connected here any more: the master sends it again where it connects.
                        self.notify_task(&id, task);
                    }
                }
                Some(broadcast::Kind::DatastoreChanged(d)) => {
                    if let Meta::Remote(r) = &self.datastore {
                        r.invalidate(&d.key);
                    }
                }
                Some(broadcast::Kind::HuntStarted(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt started on the master");
                }
                Some(broadcast::Kind::HuntStopped(h)) => {
                    tracing::info!(hunt = %h.hunt_id, "hunt stopped on the master");
                }
                Some(broadcast::Kind::LabelsChanged(_)) | None => {}
            },
        }
    }
}
