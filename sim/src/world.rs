//! The simulated world the production shell runs in: turmoil sockets behind `Net`, a virtual clock, a
//! seeded `Entropy`, crashable local disks behind `LocalDisk`, and the shared volume behind `Volume`,
//! charging every operation the seed's 40–60 ms of virtual time.

use crate::disk::{DiskError, SimDisk};
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use talon_core::Timestamp;
use talon_io::clock::{Clock, Entropy};
use talon_io::net::{BoxFuture, BoxIo, Listener, Net};
use talon_io::storage::local::LocalDisk;
use talon_io::storage::volume::Volume;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turmoil's simulated TCP.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimNet;

struct SimListener(turmoil::net::TcpListener);

impl Listener for SimListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, SocketAddr)>> {
        Box::pin(async move {
            let (s, addr) = self.0.accept().await?;
            Ok((Box::new(s) as BoxIo, addr))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Net for SimNet {
    fn bind<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            // Turmoil binds the host's own address; the port is what matters.
            let port = addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, addr.to_owned()))?;
            let l = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
            Ok(Box::new(SimListener(l)) as Box<dyn Listener>)
        })
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxIo>> {
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(s) as BoxIo)
        })
    }
}

/// Virtual wall-clock time: a fixed epoch plus the simulation's elapsed time.
#[derive(Clone, Copy, Debug)]
pub struct SimClock {
    /// Unix ms at virtual time zero.
    pub epoch_ms: u64,
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        Timestamp(self.epoch_ms + elapsed.as_millis() as u64)
    }
}

/// Randomness from the seed.
#[derive(Debug)]
pub struct SimEntropy(Mutex<SimRng>);

impl SimEntropy {
    /// Draws from `rng`.
    pub fn new(rng: SimRng) -> SimEntropy {
        SimEntropy(Mutex::new(rng))
    }
}

impl Entropy for SimEntropy {
    fn fill(&self, buf: &mut [u8]) {
        lock(&self.0).fill(buf);
    }
}

/// A node's local disk: a [`SimDisk`] shared with the harness, which crashes it with the host.
#[derive(Clone, Debug)]
pub struct SimLocalDisk(Arc<Mutex<SimDisk>>);

fn io_err(e: DiskError) -> io::Error {
    io::Error::other(e.to_string())
}

impl SimLocalDisk {
    /// Wraps `disk`.
    pub fn new(disk: SimDisk) -> SimLocalDisk {
        SimLocalDisk(Arc::new(Mutex::new(disk)))
    }

    /// Loses what was not synced (and may tear the last write), as a power cut does.
    pub fn crash(&self) {
        lock(&self.0).crash();
    }

    /// Arms a crash at the next fsync ([`SimDisk::arm_power_loss`]).
    pub fn arm_power_loss(&self) {
        lock(&self.0).arm_power_loss();
    }

    /// Disarms a crash that did not trip.
    pub fn disarm(&self) {
        lock(&self.0).disarm();
    }

    /// Whether an armed crash tripped.
    pub fn power_lost(&self) -> bool {
        lock(&self.0).power_lost()
    }

    /// Sets the probability of injected I/O errors.
    pub fn set_error_p(&self, p: f64) {
        lock(&self.0).set_error_p(p);
    }

    /// The disk is lost: every file on it is gone (the node restarts on an empty disk).
    pub fn wipe(&self) {
        lock(&self.0).wipe();
    }

    /// The node restarts with what survived.
    pub fn restore_power(&self) {
        lock(&self.0).restore_power();
    }

    /// What a power cut now would leave of the files under `prefixes` (no torn tail), as a separate
    /// disk without faults: the state a checker reads "as a crash would leave it".
    pub fn durable_copy_under(&self, prefixes: &[&str]) -> SimLocalDisk {
        SimLocalDisk::new(lock(&self.0).durable_under(prefixes))
    }

    /// Like [`SimLocalDisk::copy`], holding only the files whose path starts with one of
    /// `prefixes` (a checker that opens one journal need not copy the others).
    pub fn copy_under(&self, prefixes: &[&str]) -> SimLocalDisk {
        let mut d = lock(&self.0).clone_under(prefixes);
        d.restore_power();
        d.set_error_p(0.0);
        SimLocalDisk::new(d)
    }

    /// A separate disk holding a copy of this one's current contents, for checkers to open (a
    /// journal's recovery may repair a torn tail; the node's own disk must not change under it).
    pub fn copy(&self) -> SimLocalDisk {
        let mut d = lock(&self.0).clone();
        // The copy is read as the restarted node would read it, by a checker that is outside the
        // world: no injected errors.
        d.restore_power();
        d.set_error_p(0.0);
        SimLocalDisk::new(d)
    }
}

impl LocalDisk for SimLocalDisk {
    fn append(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        lock(&self.0).append(path, data).map_err(io_err)
    }
    fn sync(&mut self, path: &str) -> io::Result<()> {
        lock(&self.0).fsync(path).map_err(io_err)
    }
    fn read(&mut self, path: &str) -> io::Result<Option<Vec<u8>>> {
        match lock(&self.0).read(path) {
            Ok(b) => Ok(Some(b)),
            Err(DiskError::NotFound(_)) => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }
    fn write_atomic(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        let mut d = lock(&self.0);
        let tmp = format!("{path}.tmp");
        d.write(&tmp, data).map_err(io_err)?;
        d.fsync(&tmp).map_err(io_err)?;
        d.rename(&tmp, path).map_err(io_err)
    }
    fn truncate(&mut self, path: &str, len: u64) -> io::Result<()> {
        let mut d = lock(&self.0);
        d.truncate(path, len).map_err(io_err)?;
        d.fsync(path).map_err(io_err)
    }
    fn remove(&mut self, path: &str) -> io::Result<()> {
        match lock(&self.0).remove(path) {
            Err(DiskError::NotFound(_)) | Ok(()) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
    fn list(&mut self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(lock(&self.0).list(prefix))
    }
}

/// How long an operation from a node cut off from the volume waits for the link to come back
/// before it fails (an NFS soft mount's `timeo` × `retrans`, in round figures).
pub const VOLUME_CUT_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug)]
struct VolumeState {
    files: BTreeMap<String, Bytes>,
    rng: SimRng,
    ops: u64,
    /// Injected errors returned so far.
    errors: u64,
    /// Probability that an operation fails (half of the failed writes fail after taking effect:
    /// the reply was lost, not the request).
    error_p: f64,
    /// Nodes that cannot reach the volume.
    cut: BTreeSet<String>,
    /// Keys written or removed since the checkers last took them ([`SimVolume::take_changes`]):
    /// what lets per-second checks follow the volume without rescanning it.
    changed: BTreeSet<String>,
}

impl VolumeState {
    fn set(&mut self, key: &str, value: Bytes) {
        self.changed.insert(key.to_owned());
        self.files.insert(key.to_owned(), value);
    }

    fn unset(&mut self, key: &str) -> Option<Bytes> {
        self.changed.insert(key.to_owned());
        self.files.remove(key)
    }
}

/// The shared volume every node mounts: in memory, each operation charged a latency drawn from the
/// seed (the seed's 40–60 ms for NFS/EFS), writes atomic as the production volume's are. Each node
/// mounts its own view ([`SimVolume::mount`]), so a fault can cut one node off from the volume.
#[derive(Clone, Debug)]
pub struct SimVolume {
    state: Arc<Mutex<VolumeState>>,
    latency: LatencyModel,
    /// The node this view belongs to (`None`: the harness's own view).
    node: Option<Arc<str>>,
}

enum Fate {
    Ok,
    /// Fails without effect.
    Before,
    /// Takes effect, then reports failure.
    After,
}

impl SimVolume {
    /// An empty volume.
    pub fn new(latency: LatencyModel, rng: SimRng) -> SimVolume {
        SimVolume {
            state: Arc::new(Mutex::new(VolumeState {
                files: BTreeMap::new(),
                rng,
                ops: 0,
                errors: 0,
                error_p: 0.0,
                cut: BTreeSet::new(),
                changed: BTreeSet::new(),
            })),
            latency,
            node: None,
        }
    }

    /// The volume as `node` mounts it.
    pub fn mount(&self, node: &str) -> SimVolume {
        SimVolume {
            node: Some(node.into()),
            ..self.clone()
        }
    }

    /// Sets the probability that an operation fails.
    pub fn set_error_p(&self, p: f64) {
        lock(&self.state).error_p = p;
    }

    /// Cuts `node` off from the volume (`false`: reconnects it).
    pub fn set_cut(&self, node: &str, cut: bool) {
        let mut s = lock(&self.state);
        if cut {
            s.cut.insert(node.to_owned());
        } else {
            s.cut.remove(node);
        }
    }

    fn is_cut(&self) -> bool {
        self.node
            .as_deref()
            .is_some_and(|n| lock(&self.state).cut.contains(n))
    }

    async fn charge(&self, bytes: usize) -> io::Result<Fate> {
        let mut waited = 0;
        while self.is_cut() {
            if waited >= VOLUME_CUT_TIMEOUT_MS {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "shared volume unreachable (simulated partition)",
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            waited += 250;
        }
        let (ms, fate) = {
            let mut s = lock(&self.state);
            s.ops += 1;
            let VolumeState { rng, error_p, .. } = &mut *s;
            let ms = self.latency.draw_ms(rng, bytes as u64);
            let fate = if rng.chance(*error_p) {
                if rng.chance(0.5) {
                    Fate::After
                } else {
                    Fate::Before
                }
            } else {
                Fate::Ok
            };
            (ms, fate)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        if let Fate::Before = fate {
            lock(&self.state).errors += 1;
            return Err(injected());
        }
        Ok(fate)
    }

    /// Every file and its contents, for checkers (no latency: the checker is outside the world).
    pub fn snapshot(&self) -> BTreeMap<String, Bytes> {
        lock(&self.state).files.clone()
    }

    /// Runs `f` over the files without copying them (checkers during the run).
    pub fn inspect<R>(&self, f: impl FnOnce(&BTreeMap<String, Bytes>) -> R) -> R {
        f(&lock(&self.state).files)
    }

    /// Writes a file directly, outside the simulated world (no latency, no faults): for checker tests.
    pub fn put(&self, key: &str, value: Bytes) {
        lock(&self.state).set(key, value);
    }

    /// Removes a file directly, outside the simulated world: for checker tests.
    pub fn remove(&self, key: &str) {
        lock(&self.state).unset(key);
    }

    /// The keys written or removed since the last call (for checkers that follow the volume).
    pub fn take_changes(&self) -> BTreeSet<String> {
        std::mem::take(&mut lock(&self.state).changed)
    }

    /// Operations served so far.
    pub fn ops(&self) -> u64 {
        lock(&self.state).ops
    }

    /// Injected errors so far.
    pub fn errors(&self) -> u64 {
        lock(&self.state).errors
    }

    fn after(&self, fate: Fate) -> io::Result<()> {
        match fate {
            Fate::After => {
                lock(&self.state).errors += 1;
                Err(injected())
            }
            _ => Ok(()),
        }
    }
}

/// The files whose key starts with `prefix`, in key order.
pub fn under<'a>(
    files: &'a BTreeMap<String, Bytes>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Bytes)> + 'a {
    files
        .range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

fn injected() -> io::Error {
    io::Error::other("injected I/O error (simulated shared volume)")
}

impl Volume for SimVolume {
    async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
        self.charge(0).await?;
        Ok(lock(&self.state).files.get(key).cloned())
    }
    async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
        let fate = self.charge(value.len()).await?;
        lock(&self.state).set(key, value);
        self.after(fate)
    }
    async fn delete(&self, key: &str) -> io::Result<()> {
        let fate = self.charge(0).await?;
        lock(&self.state).unset(key);
        self.after(fate)
    }
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.charge(0).await?;
        let s = lock(&self.state);
        Ok(under(&s.files, prefix).map(|(k, _)| k.clone()).collect())
    }
    async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
        // An append is not idempotent: an error is reported only when it had no effect.
        self.charge(data.len()).await?;
        let mut s = lock(&self.state);
        let mut v = s.files.get(key).map(|b| b.to_vec()).unwrap_or_default();
        v.extend_from_slice(&data);
        s.set(key, Bytes::from(v));
        Ok(())
    }
    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        let fate = self.charge(0).await?;
        let mut s = lock(&self.state);
        match s.unset(from) {
            Some(v) => {
                s.set(to, v);
                drop(s);
                self.after(fate)
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, from.to_owned())),
        }
    }
}
