//! The filestore as a frontend writes it: flow messages (result rows, file chunks, logs, final
//! statuses) go through a write-behind buffer on the node's fast local disk, so that the shared
//! volume's 40–60 ms per operation is not in a client's acknowledgement path.
//!
//! The buffer is the datastore's machinery ([`Datastore`] over [`talon_core::datastore::Cache`])
//! pointed at this node's segment log on the filestore volume ([`SegmentLog`]), with no clean
//! cache: a stored message is journalled (group commit, one fsync for every store waiting) and
//! acknowledged, then copied to the volume, everything waiting at once, as one append to the
//! node's data and index files. A crash loses nothing acknowledged: the next start replays the
//! journal and copies what is left (a message written twice is read once: its key names client,
//! flow and sequence number).
//!
//! Visibility: only the node that stored a message sees it before it is copied, so a flow is
//! reported complete only after [`Filestore::settled`] — every message stored before it is on the
//! volume — and with the runs that hold its messages ([`Filestore::runs`]), recorded in its flow
//! record, where the master, the API and other frontends read them. Uploaded files are
//! reassembled from the stored chunks after completion, straight on the volume (bulk, off the
//! acknowledgement path).
//!
//! Bound: unflushed bytes ≤ `Datastore.filestore_buffer_bytes`; beyond it a store fails as busy
//! (the message is not acknowledged and the client resends it).

use crate::clock::Clock;
use crate::storage::datastore::{Datastore, DatastoreError, DatastoreOptions, RecoveryReport};
use crate::storage::local::LocalDisk;
use crate::storage::segments::{self, Record, RunRef, SegmentLog};
use crate::storage::volume::SharedVolume;
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use talon_core::datastore::CacheLimits;
use talon_core::{ClientId, FlowId, paths};
use tokio::task::JoinHandle;

/// The buffer's journal directory on the local disk.
pub const BUFFER_DIR: &str = "filestore-buffer";

/// Messages one flush appends at most.
pub const FLUSH_BATCH_MAX: usize = 4096;

/// How the buffer is set up.
#[derive(Clone, Debug)]
pub struct FilestoreOptions {
    /// Unflushed bytes at most (`Datastore.filestore_buffer_bytes`).
    pub buffer_bytes: u64,
    /// Largest message stored (`Frontend.resources.max_message_size`).
    pub message_bytes_max: u64,
    /// Names this node's segment files: unique to the process start (node name, time, random).
    pub writer: String,
    /// Flows whose runs the node remembers until they complete (beyond it, the flow updated longest
    /// ago is forgotten and located again by an audit when it completes).
    pub flows_remembered: usize,
}

/// A frontend's filestore: the shared volume, and the write-behind buffer in front of it.
#[derive(Clone)]
pub struct Filestore {
    volume: SharedVolume,
    log: Arc<SegmentLog>,
    buffer: Datastore,
    /// How the first attempt to make this node's segment files ended (`None` while it runs).
    prepared: tokio::sync::watch::Receiver<Option<bool>>,
}

impl Filestore {
    /// The shared volume's last failure to take this node's buffered messages, if no copy has
    /// succeeded since: when and why.
    pub fn volume_error(&self) -> Option<(talon_core::Timestamp, String)> {
        self.buffer.volume_error()
    }

    /// Recovers the buffer's journal from `disk` and starts copying it to `volume`. The task ends
    /// with an error if the journal fails (fail-stop: durability can no longer be promised).
    pub fn open(
        disk: impl LocalDisk + 'static,
        volume: SharedVolume,
        clock: Arc<dyn Clock>,
        o: &FilestoreOptions,
    ) -> io::Result<(Filestore, JoinHandle<io::Result<()>>, RecoveryReport)> {
        let defaults = DatastoreOptions::default();
        let opts = DatastoreOptions {
            journal_dir: BUFFER_DIR.into(),
            limits: CacheLimits {
                // Nothing is read through the buffer: a copied message leaves memory at once.
                clean_bytes_max: 0,
                dirty_bytes_max: o.buffer_bytes,
                value_bytes_max: o.message_bytes_max,
                // Completions wait for a copy: start one soon, not when a batch fills.
                flush_age_max_ms: 20,
                // One append at a time, of everything waiting: a network volume charges per
                // request, not per byte, so what arrives during a flush goes in the next one.
                flush_batch_max: FLUSH_BATCH_MAX,
                flushes_in_flight_max: 1,
                ..defaults.limits
            },
            metrics_name: "filestore",
            ..defaults
        };
        let log = Arc::new(SegmentLog::new(
            volume.clone(),
            &o.writer,
            o.flows_remembered,
        )?);
        let today = clock.now().utc_day();
        let (buffer, task, report) =
            Datastore::open(disk, SharedVolume::new(log.clone()), clock, opts)?;
        // The first flush then appends at once (on slowfs a hunt's first results waited ~1.5 s for
        // these files to be made). See `Filestore::prepared`.
        let first = log.clone();
        let (done, prepared) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let made = first.prepare(Some(&today)).await;
            if let Err(e) = &made {
                tracing::warn!(error = %e, "cannot create this node's segment files yet; the first flush retries");
            }
            let _ = done.send(Some(made.is_ok()));
        });
        Ok((
            Filestore {
                volume,
                log,
                buffer,
                prepared,
            },
            task,
            report,
        ))
    }

    /// Waits, at most `limit`, until the first attempt to make this node's segment files has ended:
    /// whether it made them, `None` if it had not ended by then. A node accepts clients only after it (docs/architecture.md,
    /// "The segment log"): made while clients enrol, the files wait behind the enrolments' writes
    /// on a network volume (on slowfs the first flush of a hunt started just after 500 enrolments
    /// waited ~0.8 s for them), and alone they take a few round trips.
    pub async fn prepared(&self, limit: std::time::Duration) -> Option<bool> {
        let mut rx = self.prepared.clone();
        match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
            Ok(Ok(made)) => *made,
            // The task ended without a word (it panicked): as a failure.
            Ok(Err(_)) => Some(false),
            Err(_) => None,
        }
    }

    /// Where a completed flow's messages `0..messages` are: the runs this node wrote or learned by
    /// an audit, or, if it does not know them all (it restarted, or forgot the flow at its bound),
    /// the runs an audit finds now. An error if the volume fails or the messages are not all there.
    /// The node remembers them until [`Filestore::forget_runs`] (the completion is recorded).
    pub async fn runs(
        &self,
        client: &ClientId,
        flow: &FlowId,
        messages: u64,
    ) -> io::Result<Vec<RunRef>> {
        let dir = paths::flow_messages_dir(client, flow);
        if let Some(runs) = self.log.runs_covering(&dir, messages) {
            return Ok(runs);
        }
        let (runs, _) = segments::locate(&self.volume, &dir).await?;
        // Remembered until the completion is recorded: a retry does not locate them again.
        self.log.learn(&dir, &runs);
        self.log.runs_covering(&dir, messages).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the filestore does not hold all {messages} messages of flow {flow}"),
            )
        })
    }

    /// Forgets where a flow's messages are: its completion is recorded (with them).
    pub fn forget_runs(&self, client: &ClientId, flow: &FlowId) {
        self.log.forget(&paths::flow_messages_dir(client, flow));
    }

    /// Every stored message of a flow, wherever it was written (an audit: reads every node's index
    /// files); remembers where they are for the flow's completion.
    pub async fn audit(&self, client: &ClientId, flow: &FlowId) -> io::Result<Vec<Record>> {
        let dir = paths::flow_messages_dir(client, flow);
        let (runs, found) = segments::locate(&self.volume, &dir).await?;
        self.log.learn(&dir, &runs);
        Ok(found)
    }

    /// The shared volume, for reading and for bulk work (upload reassembly).
    pub fn volume(&self) -> &SharedVolume {
        &self.volume
    }

    /// Stores a message under `key`: durable on local disk when this returns, on the volume soon.
    pub async fn store(&self, key: &str, bytes: Bytes) -> Result<(), DatastoreError> {
        self.buffer.set(key, bytes).await.map(|_| ())
    }

    /// True once the buffer has stopped (its journal failed): the node must stop with it.
    pub fn stopped(&self) -> bool {
        self.buffer.stopped()
    }

    /// Waits until everything stored before this call is on the shared volume.
    pub async fn settled(&self) -> Result<(), DatastoreError> {
        self.buffer.flushed().await
    }
}
