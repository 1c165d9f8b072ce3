//! The filestore as a frontend writes it: flow messages (result rows, file chunks, logs, final
//! statuses) go through a write-behind buffer on the node's fast local disk, so that the shared
//! volume's 40–60 ms per operation is not in a client's acknowledgement path.
//!
//! The buffer is the datastore's machinery ([`Datastore`] over [`talon_core::datastore::Cache`])
//! pointed at the filestore volume, with no clean cache: a stored message is journalled (group
//! commit, one fsync for every store waiting) and acknowledged, then copied to the volume in
//! coalesced, concurrent batches. A crash loses nothing acknowledged: the next start replays the
//! journal and copies what is left (writes are idempotent: a message's key names client, flow and
//! sequence number).
//!
//! Visibility: only the node that stored a message sees it before it is copied, so a flow is
//! reported complete only after [`Filestore::settled`] — every message stored before it is on the
//! volume, where the master, the API and other frontends read. Readers therefore use
//! [`Filestore::volume`] directly. Uploaded files are reassembled from the stored chunks after
//! completion, straight on the volume (bulk, off the acknowledgement path).
//!
//! Bound: unflushed bytes ≤ `Datastore.filestore_buffer_bytes`; beyond it a store fails as busy
//! (the message is not acknowledged and the client resends it).

use crate::clock::Clock;
use crate::datastore::{Datastore, DatastoreError, DatastoreOptions, RecoveryReport};
use crate::storage::local::LocalDisk;
use crate::storage::volume::SharedVolume;
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use talon_core::datastore::CacheLimits;
use tokio::task::JoinHandle;

/// The buffer's journal directory on the local disk.
pub const BUFFER_DIR: &str = "filestore-buffer";

/// How the buffer is set up.
#[derive(Clone, Debug)]
pub struct FilestoreOptions {
    /// Unflushed bytes at most (`Datastore.filestore_buffer_bytes`).
    pub buffer_bytes: u64,
    /// Largest message stored (`Frontend.resources.max_message_size`).
    pub message_bytes_max: u64,
}

/// A frontend's filestore: the shared volume, and the write-behind buffer in front of it.
#[derive(Clone)]
pub struct Filestore {
    volume: SharedVolume,
    buffer: Datastore,
}

impl Filestore {
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
                ..defaults.limits
            },
            ..defaults
        };
        let (buffer, task, report) = Datastore::open(disk, volume.clone(), clock, opts)?;
        Ok((Filestore { volume, buffer }, task, report))
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
