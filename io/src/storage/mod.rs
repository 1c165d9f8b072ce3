//! Storage as the shell sees it: a node's fast local disk ([`local`]), and the append-only journal
//! built on it ([`journal`]). Both are traits or generic over one, so the simulator substitutes its
//! own disks and runs this same code.

pub mod journal;
pub mod local;
pub mod volume;

use local::{LocalDisk, StdDisk};
use std::path::Path;
use volume::{FsVolume, SharedVolume};

/// The storage one node uses, injected so the simulator can substitute its own.
pub struct NodeStorage {
    /// The node's fast local disk: the master's datastore journal, a minion's outbox.
    pub local: Box<dyn LocalDisk>,
    /// `Datastore.location` (metadata; read and written by the master only).
    pub metadata: SharedVolume,
    /// `Datastore.filestore_directory` (bulk data; written by every node).
    pub filestore: SharedVolume,
    /// Where the local disk is, for logs.
    pub local_name: String,
}

impl NodeStorage {
    /// The real directories: `local_dir` on this machine, the shared volume's paths from the config.
    pub fn real(
        cfg: &crate::config::ServerConfig,
        local_dir: &Path,
    ) -> Result<NodeStorage, String> {
        let local = StdDisk::new(local_dir).map_err(|e| format!("{}: {e}", local_dir.display()))?;
        let ds = &cfg.datastore.location;
        let fs = &cfg.datastore.filestore_directory;
        let metadata =
            FsVolume::new(ds).map_err(|e| format!("Datastore.location {}: {e}", ds.display()))?;
        let filestore = FsVolume::new(fs)
            .map_err(|e| format!("Datastore.filestore_directory {}: {e}", fs.display()))?;
        Ok(NodeStorage {
            local: Box::new(local),
            metadata: SharedVolume::new(metadata),
            filestore: SharedVolume::new(filestore),
            local_name: local_dir.display().to_string(),
        })
    }
}
