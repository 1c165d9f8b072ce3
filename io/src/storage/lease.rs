//! Exclusive use of a node's directories: a lock on its local directory, and the master's lease on
//! the shared datastore (docs/operations.md, "One master per datastore").
//!
//! - **Local directory**: `LOCK` in it, held with `flock` for the life of the process (the kernel
//!   drops it when the process dies, however it dies). A second process on the same directory is
//!   refused with the holder's pid and node.
//! - **Datastore lease**: `cluster/master.lease.json` on the metadata volume names the master that
//!   uses it (node, machine, local directory, pid, a random token) and a beat counter it renews every
//!   [`LEASE_BEAT`]. Network filesystems do not carry `flock` reliably, so liveness is judged by the
//!   counter moving, not by clocks (which differ between machines): a master that finds another's
//!   lease waits two beats and refuses to start if it moved. A lease left by this same node, machine
//!   and local directory is its own from before a crash (the local lock proves that process is
//!   gone) and is taken at once. A running master re-reads the lease before each renewal and stops
//!   if another master's token is there: of two masters that raced to start, one stops within a
//!   beat.

use crate::clock::Entropy;
use crate::storage::volume::{SharedVolume, Volume};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

/// How often the master renews its lease.
pub const LEASE_BEAT: Duration = Duration::from_secs(5);

/// The lease's key on the metadata volume.
pub const LEASE_KEY: &str = "cluster/master.lease.json";

/// A held lock on a local directory; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Locks `dir` (created if missing) for this process, writing `who` into its `LOCK` file; fails
    /// naming the holder if another process has it.
    pub fn acquire(dir: &Path, who: &str) -> Result<DirLock, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            // Who holds it, for the message (best effort: an unreadable file names no one).
            let mut holder = String::new();
            if file.read_to_string(&mut holder).is_err() {
                holder.clear();
            }
            let holder = holder.trim().replace('\n', ", ");
            return Err(if e == rustix::io::Errno::WOULDBLOCK {
                format!(
                    "local directory {} is in use by another talon process ({holder}); stop it, \
                     or give this node its own --local-dir",
                    dir.display()
                )
            } else {
                format!("cannot lock {}: {e}", path.display())
            });
        }
        let text = format!("pid {}\nnode {who}\n", std::process::id());
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all());
        written.map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(DirLock { _file: file })
    }
}

/// Who holds the datastore, as written in the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseJson {
    /// The master's node name.
    pub node: String,
    /// The machine it runs on.
    pub host: String,
    /// Its local directory.
    pub local_dir: String,
    /// Its process id.
    pub pid: u32,
    /// Random, per start: tells two starts of the same master apart.
    pub token: String,
    /// Renewals so far: a lease whose count moves is alive.
    pub beat: u64,
}

impl LeaseJson {
    /// A lease for master `node` on `host` (process `pid`, local directory `local_dir`); its token
    /// and beat are set when it is taken.
    pub fn new(node: String, host: String, local_dir: String, pid: u32) -> LeaseJson {
        LeaseJson {
            node,
            host,
            local_dir,
            pid,
            token: String::new(),
            beat: 0,
        }
    }

    fn same_master(&self, o: &LeaseJson) -> bool {
        self.node == o.node && self.host == o.host && self.local_dir == o.local_dir
    }

    fn describe(&self) -> String {
        format!(
            "node {}, host {}, pid {}, local directory {}",
            self.node, self.host, self.pid, self.local_dir
        )
    }
}

/// This machine's name (for the lease; "unknown" if the kernel does not say).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

async fn read(vol: &SharedVolume) -> Result<Option<LeaseJson>, String> {
    let bytes = vol
        .read(LEASE_KEY)
        .await
        .map_err(|e| format!("reading the datastore lease {LEASE_KEY}: {e}"))?;
    Ok(bytes.and_then(|b| match serde_json::from_slice(&b) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "the datastore lease is unreadable; replacing it");
            None
        }
    }))
}

async fn write(vol: &SharedVolume, l: &LeaseJson) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(l).map_err(std::io::Error::other)?;
    vol.write(LEASE_KEY, Bytes::from(bytes)).await
}

/// Attempts at each volume operation while taking the lease (a start must ride out a volume that
/// fails now and then), 50 ms apart and doubling.
const TAKE_ATTEMPTS: u32 = 5;

async fn retrying<T, F: std::future::Future<Output = Result<T, String>>>(
    mut op: impl FnMut() -> F,
) -> Result<T, String> {
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= TAKE_ATTEMPTS => {
                return Err(format!("{e} (after {attempt} attempts)"));
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "a datastore lease operation failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// The master's lease on the datastore, once taken.
pub struct Lease {
    vol: SharedVolume,
    mine: LeaseJson,
}

impl Lease {
    /// Takes the lease for `me` (its token and beat are set here), waiting up to two beats
    /// ([`LEASE_BEAT`]) to tell a live holder from a stale one.
    pub async fn take(
        vol: SharedVolume,
        mut me: LeaseJson,
        entropy: &dyn Entropy,
        beat: Duration,
    ) -> Result<Lease, String> {
        if let Some(held) = retrying(|| read(&vol)).await?
            && !held.same_master(&me)
        {
            tracing::info!(holder = %held.describe(), "the datastore lease names another master; checking whether it is alive");
            tokio::time::sleep(2 * beat + Duration::from_secs(1)).await;
            match retrying(|| read(&vol)).await? {
                Some(now) if now != held => {
                    return Err(format!(
                        "the datastore is in use by another master ({}): its lease \
                         ({LEASE_KEY} on Datastore.location) is being renewed. Stop that master \
                         first, or give this one its own Datastore.location",
                        now.describe()
                    ));
                }
                _ => {
                    tracing::warn!(holder = %held.describe(), "taking over a stale datastore lease (not renewed for two beats)")
                }
            }
        }
        let mut token = [0u8; 8];
        entropy.fill(&mut token);
        me.token = crate::clock::hex(&token);
        me.beat = 0;
        retrying(|| async {
            write(&vol, &me)
                .await
                .map_err(|e| format!("writing the datastore lease {LEASE_KEY}: {e}"))
        })
        .await?;
        Ok(Lease { vol, mine: me })
    }

    /// Renews the lease every `beat` until another master's token is found in it, which it returns
    /// as an error (the node must stop). A failed read or write is logged and tried again.
    pub async fn keep(mut self, beat: Duration) -> String {
        loop {
            tokio::time::sleep(beat).await;
            match read(&self.vol).await {
                Ok(Some(l)) if l.token != self.mine.token => {
                    return format!(
                        "another master took the datastore lease ({}); this one stops",
                        l.describe()
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the datastore lease; trying again");
                    continue;
                }
            }
            self.mine.beat += 1;
            if let Err(e) = write(&self.vol, &self.mine).await {
                tracing::warn!(error = %e, "cannot renew the datastore lease; trying again");
            }
        }
    }

    /// Gives the lease up (a clean stop): the next master starts without waiting. Bounded by
    /// [`LEASE_BEAT`]: a stop never hangs on a volume that does not answer (a lease left behind
    /// costs the next master of another name two beats).
    pub async fn release(vol: &SharedVolume, token: &str) {
        let release = async {
            if let Ok(Some(l)) = read(vol).await
                && l.token == token
                && let Err(e) = vol.delete(LEASE_KEY).await
            {
                tracing::warn!(error = %e, "cannot release the datastore lease");
            }
        };
        if tokio::time::timeout(LEASE_BEAT, release).await.is_err() {
            tracing::warn!("the volume did not answer; the datastore lease is left to expire");
        }
    }

    /// This start's token.
    pub fn token(&self) -> String {
        self.mine.token.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path(), "master-1").unwrap();
        let e = DirLock::acquire(dir.path(), "master-2").unwrap_err();
        assert!(e.contains("in use by another talon process"), "{e}");
        assert!(e.contains("node master-1"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        DirLock::acquire(dir.path(), "master-2").expect("free once the holder is gone");
    }
}
