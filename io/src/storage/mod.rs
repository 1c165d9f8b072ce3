//! Storage as the shell sees it: a node's fast local disk ([`local`]), and the append-only journal
//! built on it ([`journal`]). Both are traits or generic over one, so the simulator substitutes its
//! own disks and runs this same code.

pub mod datastore;
pub mod events;
pub mod filestore;
pub mod records;
pub mod uploads;

pub mod fs;
pub mod journal;
pub mod lease;
pub mod local;
pub mod segments;
pub mod volume;

use fs::{LatencyFs, OsFs};
use local::{LocalDisk, StdDisk};
use std::path::Path;
use volume::{FsVolume, SharedVolume, SyncMode};

/// The storage one node uses, injected so the simulator can substitute its own.
pub struct NodeStorage {
    /// The node's fast local disk: the master's datastore journal, a minion's outbox.
    pub local: Box<dyn LocalDisk>,
    /// The same local disk, for the filestore's write-behind buffer (its own journal directory).
    pub buffer: Box<dyn LocalDisk>,
    /// `Datastore.location` (metadata; read and written by the master only).
    pub metadata: SharedVolume,
    /// `Datastore.filestore_directory` (bulk data; written by every node).
    pub filestore: SharedVolume,
    /// Where the local disk is, for logs.
    pub local_name: String,
    /// This process's lock on the local directory (none in the simulator, whose crashes are its own).
    pub lock: Option<lease::DirLock>,
}

impl NodeStorage {
    /// The real directories: `local_dir` on this machine, the shared volume's paths from the config
    /// (each operation delayed by `Datastore.volume_latency_ms` when that test knob is set).
    pub fn real(
        cfg: &crate::deploy::config::ServerConfig,
        local_dir: &Path,
        node: &str,
    ) -> Result<NodeStorage, String> {
        // First: a second process on this directory would corrupt its journals.
        let lock = lease::DirLock::acquire(local_dir, node)?;
        let disk = || StdDisk::new(local_dir).map_err(|e| format!("{}: {e}", local_dir.display()));
        let ds = &cfg.datastore.location;
        let fs = &cfg.datastore.filestore_directory;
        let latency = std::time::Duration::from_millis(cfg.datastore.volume_latency_ms);
        let shared = |root: &Path| -> std::io::Result<SharedVolume> {
            if latency.is_zero() {
                return Ok(SharedVolume::new(FsVolume::new(root)?));
            }
            // The model of a network filesystem: its latency on every primitive, and its sync
            // semantics (per file) whatever the local filesystem underneath.
            let fs = LatencyFs::new(OsFs::new(root)?, latency);
            Ok(SharedVolume::new(FsVolume::over(
                fs,
                SyncMode::PerFile,
                &volume::process_tag(),
            )))
        };
        let metadata =
            shared(ds).map_err(|e| format!("Datastore.location {}: {e}", ds.display()))?;
        let filestore = shared(fs)
            .map_err(|e| format!("Datastore.filestore_directory {}: {e}", fs.display()))?;
        // Every call timed and counted for the node's metrics (docs/operations.md, "Metrics").
        let metadata = SharedVolume::new(volume::Metered::new(metadata, "datastore"));
        let filestore = SharedVolume::new(volume::Metered::new(filestore, "filestore"));
        Ok(NodeStorage {
            local: Box::new(disk()?),
            buffer: Box::new(disk()?),
            metadata,
            filestore,
            local_name: local_dir.display().to_string(),
            lock: Some(lock),
        })
    }
}
