//! The simulated world the production shell runs in: turmoil sockets behind `Net`, a virtual clock, a
//! seeded `Entropy`, crashable local disks behind `LocalDisk`, and the shared volume's primitives behind `Fs`,
//! charging every operation the seed's 40–60 ms of virtual time.

use crate::disk::{DiskError, SimDisk};
use crate::latency::LatencyModel;
use crate::rng::SimRng;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use talon_core::{Monotonic, Timestamp};
use talon_io::clock::{Clock, Entropy};
use talon_io::net::{BoxFuture, BoxIo, Listener, Net};
use talon_io::storage::fs::{Entry, Fs};
use talon_io::storage::local::LocalDisk;

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

/// Virtual wall-clock time: a fixed epoch plus the simulation's elapsed time, on a machine whose
/// clock may be `behind` slow, by an amount that may change while it runs (a replacement machine's
/// clock: `Fault::DiskLoss`; a clock stepped back: `Fault::ClockStep`). Its monotonic clock is the
/// virtual time itself, whatever the wall clock does.
#[derive(Clone, Debug)]
pub struct SimClock {
    /// Unix ms at virtual time zero.
    pub epoch_ms: u64,
    /// How far this machine's wall clock is behind the true time (ms), read at every `now`.
    pub behind: Arc<AtomicU64>,
}

impl SimClock {
    /// A clock showing the true time.
    pub fn exact(epoch_ms: u64) -> SimClock {
        SimClock {
            epoch_ms,
            behind: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Clock for SimClock {
    fn now(&self) -> Timestamp {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        let behind = self.behind.load(std::sync::atomic::Ordering::Relaxed);
        Timestamp((self.epoch_ms + elapsed.as_millis() as u64).saturating_sub(behind))
    }

    fn monotonic(&self) -> Monotonic {
        Monotonic(turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64)
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
    /// Every file whose name is not hidden: the keys the volume holds.
    files: BTreeMap<String, Bytes>,
    /// Hidden files (a name starting with `.`): temp files of writes in progress, or left by a
    /// crash; `list` shows them, the volume's logic skips them, checkers never see them.
    temps: BTreeMap<String, Bytes>,
    /// Directories (the root, `""`, always exists).
    dirs: BTreeSet<String>,
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
    fn set(&mut self, path: &str, value: Bytes) {
        if hidden(path) {
            self.temps.insert(path.to_owned(), value);
        } else {
            self.changed.insert(path.to_owned());
            self.files.insert(path.to_owned(), value);
        }
    }

    fn unset(&mut self, path: &str) -> Option<Bytes> {
        if hidden(path) {
            self.temps.remove(path)
        } else {
            let old = self.files.remove(path);
            if old.is_some() {
                self.changed.insert(path.to_owned());
            }
            old
        }
    }

    fn get(&self, path: &str) -> Option<&Bytes> {
        if hidden(path) {
            self.temps.get(path)
        } else {
            self.files.get(path)
        }
    }

    fn is_dir(&self, path: &str) -> bool {
        path.is_empty() || self.dirs.contains(path)
    }

    /// `NotFound` unless `path`'s directory exists.
    fn dir_of(&self, path: &str) -> io::Result<()> {
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        if self.is_dir(dir) {
            Ok(())
        } else {
            Err(not_found(dir))
        }
    }

    /// Makes `path`'s directory and its ancestors (the harness's own writes).
    fn make_parents(&mut self, path: &str) {
        let mut d = path;
        while let Some((parent, _)) = d.rsplit_once('/') {
            self.dirs.insert(parent.to_owned());
            d = parent;
        }
    }
}

/// Whether a path's last component is hidden (starts with `.`).
fn hidden(path: &str) -> bool {
    path.rsplit('/').next().is_some_and(|n| n.starts_with('.'))
}

fn not_found(path: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{path}: no such file or directory"),
    )
}

/// The immediate children of directory `prefix` (`""` or ending in `/`) among sorted `keys` (found
/// by `seek`: the first key at or after a bound): each key is a file when `files`, a directory
/// otherwise, and deeper keys imply a directory; each child costs one seek, nothing below it is
/// scanned.
fn children<'a>(
    seek: impl Fn(&str) -> Option<&'a String>,
    files: bool,
    prefix: &str,
    out: &mut BTreeMap<String, bool>,
) {
    let mut from = prefix.to_owned();
    while let Some(k) = seek(&from) {
        let Some(rest) = k.strip_prefix(prefix) else {
            return;
        };
        match rest.split_once('/') {
            None => {
                out.insert(rest.to_owned(), !files);
                from = format!("{k}\0");
            }
            Some((child, _)) => {
                out.insert(child.to_owned(), true);
                // Past every key under `child/` ('0' follows '/').
                from = format!("{prefix}{child}0");
            }
        }
    }
}

fn seek_map<'a, V>(m: &'a BTreeMap<String, V>) -> impl Fn(&str) -> Option<&'a String> {
    move |from| {
        m.range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .next()
            .map(|(k, _)| k)
    }
}

fn seek_set<'a>(m: &'a BTreeSet<String>) -> impl Fn(&str) -> Option<&'a String> {
    move |from| {
        m.range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
            .next()
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
                temps: BTreeMap::new(),
                dirs: BTreeSet::new(),
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

    /// Waits the latency of `requests` requests moving `bytes`, and draws the operation's fate.
    async fn charge(&self, bytes: usize, requests: u32) -> io::Result<Fate> {
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
            let mut ms = self.latency.draw_ms(rng, bytes as u64);
            for _ in 1..requests {
                ms += self.latency.draw_ms(rng, 0);
            }
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

    /// Writes a file directly (and its directories), outside the simulated world (no latency, no
    /// faults): for checker tests.
    pub fn put(&self, key: &str, value: Bytes) {
        let mut s = lock(&self.state);
        s.make_parents(key);
        s.set(key, value);
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

/// The primitives the production volume logic (`FsVolume`) runs on, each charged one draw of the
/// latency model (a durable create two: the data, then the sync), with the fate the seed gives it.
impl Fs for SimVolume {
    async fn read(&self, path: &str) -> io::Result<Option<Bytes>> {
        self.charge(0, 1).await?;
        Ok(lock(&self.state).get(path).cloned())
    }
    async fn read_range(&self, path: &str, offset: u64, len: u64) -> io::Result<Option<Bytes>> {
        self.charge(0, 1).await?;
        Ok(lock(&self.state)
            .get(path)
            .map(|b| talon_io::storage::fs::range_of(b, offset, len)))
    }
    async fn create(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        let fate = self.charge(data.len(), 1 + u32::from(durable)).await?;
        let mut s = lock(&self.state);
        s.dir_of(path)?;
        if s.is_dir(path) {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, path.to_owned()));
        }
        s.set(path, data);
        drop(s);
        self.after(fate)
    }
    async fn append(&self, path: &str, data: Bytes, durable: bool) -> io::Result<()> {
        // An append is not idempotent: an error is reported only when it had no effect.
        self.charge(data.len(), 1 + u32::from(durable)).await?;
        let mut s = lock(&self.state);
        s.dir_of(path)?;
        let mut v = s.get(path).map(|b| b.to_vec()).unwrap_or_default();
        v.extend_from_slice(&data);
        s.set(path, Bytes::from(v));
        Ok(())
    }
    async fn sync(&self, path: &str) -> io::Result<()> {
        let fate = self.charge(0, 1).await?;
        let s = lock(&self.state);
        if s.get(path).is_none() && !s.is_dir(path) {
            return Err(not_found(path));
        }
        drop(s);
        self.after(fate)
    }
    async fn sync_all(&self) -> io::Result<()> {
        let fate = self.charge(0, 1).await?;
        self.after(fate)
    }
    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let fate = self.charge(0, 1).await?;
        let mut s = lock(&self.state);
        s.dir_of(to)?;
        match s.unset(from) {
            Some(v) => {
                s.set(to, v);
                drop(s);
                self.after(fate)
            }
            None => Err(not_found(from)),
        }
    }
    async fn mkdir(&self, path: &str) -> io::Result<()> {
        let fate = self.charge(0, 1).await?;
        let mut s = lock(&self.state);
        if s.is_dir(path) || s.get(path).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                path.to_owned(),
            ));
        }
        s.dir_of(path)?;
        s.dirs.insert(path.to_owned());
        drop(s);
        self.after(fate)
    }
    async fn list(&self, dir: &str) -> io::Result<Vec<Entry>> {
        self.charge(0, 1).await?;
        let s = lock(&self.state);
        if !s.is_dir(dir) {
            return Err(not_found(dir));
        }
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut found = BTreeMap::new();
        children(seek_map(&s.files), true, &prefix, &mut found);
        children(seek_map(&s.temps), true, &prefix, &mut found);
        children(seek_set(&s.dirs), false, &prefix, &mut found);
        Ok(found
            .into_iter()
            .map(|(name, dir)| Entry { name, dir })
            .collect())
    }
    async fn remove(&self, path: &str) -> io::Result<()> {
        let fate = self.charge(0, 1).await?;
        if lock(&self.state).unset(path).is_none() {
            return Err(not_found(path));
        }
        self.after(fate)
    }
}
