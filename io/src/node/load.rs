//! How a master starts: its registry, hunts, replication cursors and pending tasks, from the
//! datastore's start image (one local file) or by listing the shared volume.

use super::*;

/// Attempts at one start-up read. A read is idempotent, and one failure among a 10,000-client
/// master's 10,000 start-up reads must not stop it: the simulator's 10,000-client run, with a volume
/// failing 0.2 % of its operations, restarted the master 382 times in 600 virtual s and it never
/// finished starting.
pub(super) const LOAD_READ_ATTEMPTS: u32 = 5;

/// Reads a key, retrying a failure that may pass after 50, 100, 200, 400 ms (a stopped datastore or
/// a malformed value is not retried); the error names the key.
pub(super) async fn get_retrying(ds: &Meta, key: &str) -> Result<Option<Bytes>, ReadError> {
    let mut attempt = 1;
    loop {
        match ds.get(key).await {
            Ok(v) => return Ok(v),
            Err(e) if e.kind != ReadFailure::Unavailable => return Err(e.context(key)),
            Err(e) if attempt >= LOAD_READ_ATTEMPTS => {
                return Err(e.context(&format!("{key} (after {attempt} attempts)")));
            }
            Err(e) => {
                tracing::debug!(key, error = %e, attempt, "a start-up read failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// Reads `keys` with up to [`LOAD_CONCURRENCY`] reads in flight; the values come back in key order.
pub(super) async fn get_many(
    ds: &Meta,
    keys: Vec<String>,
) -> Result<Vec<(String, Option<Bytes>)>, ReadError> {
    let mut out: Vec<(usize, String, Option<Bytes>)> = Vec::with_capacity(keys.len());
    let mut set = tokio::task::JoinSet::new();
    let mut todo = keys.into_iter().enumerate();
    loop {
        while set.len() < LOAD_CONCURRENCY {
            let Some((i, k)) = todo.next() else { break };
            let ds = ds.clone();
            set.spawn(async move {
                let v = get_retrying(&ds, &k).await;
                (i, k, v)
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (i, k, v) =
            r.map_err(|e| ReadError::unavailable(format!("a read task failed: {e}")))?;
        out.push((i, k, v?));
    }
    out.sort_by_key(|(i, ..)| *i);
    Ok(out.into_iter().map(|(_, k, v)| (k, v)).collect())
}

pub(super) fn parse_value<T: serde::de::DeserializeOwned>(
    key: &str,
    v: &[u8],
) -> Result<T, ReadError> {
    serde_json::from_slice(v).map_err(|e| ReadError::malformed(format!("{key}: {e}")))
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    key: &str,
    v: Option<Bytes>,
) -> Result<Option<T>, ReadError> {
    v.map(|b| parse_value(key, &b)).transpose()
}

/// The keys a master reads when it starts: client records, hunt records and participants,
/// replication cursors, tasks awaiting delivery and uploads awaiting reassembly. Its datastore keeps
/// a start image of exactly these (docs/architecture.md, "The start image").
pub fn start_key(k: &str) -> bool {
    let parts: Vec<&str> = k.split('/').collect();
    matches!(
        parts.as_slice(),
        ["clients", _, "record.json"] | ["hunts", _, "record.json"] | ["hunts", _, "clients", _]
    ) || k.starts_with("cluster/minions/")
        || k.starts_with("tasks/")
        || k.starts_with(paths::UPLOADS_PENDING)
}

/// Where the start keys live on the volume, and how deep under each prefix they lie (the listing
/// never walks deeper: below `clients/C/` lie every flow's directories).
pub(super) const START_PREFIXES: [(&str, Option<usize>); 5] = [
    ("clients/", Some(2)),
    ("hunts/", Some(3)),
    ("cluster/minions/", None),
    ("tasks/", None),
    (paths::UPLOADS_PENDING, None),
];

/// Reads every start key by listing the volume (a master's first start, or one whose start image
/// was lost): the entries in key order, and whether the listing was complete (a list the datastore
/// cut at its bound is not, and must not seed the start image).
pub(super) async fn list_start_keys(ds: &Meta) -> Result<(Vec<(String, Bytes)>, bool), ReadError> {
    let mut keys = Vec::new();
    let mut complete = true;
    for (prefix, depth) in START_PREFIXES {
        let (found, truncated) = ds
            .list_within(prefix, depth)
            .await
            .map_err(|e| e.context(&format!("listing {prefix}")))?;
        if truncated {
            tracing::warn!(
                prefix,
                "more keys than the datastore lists at once; some wait for a later restart"
            );
            complete = false;
        }
        keys.extend(found.into_iter().filter(|k| start_key(k)));
    }
    keys.sort();
    keys.dedup();
    let entries = get_many(ds, keys)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    Ok((entries, complete))
}

/// The master's start keys and values: from the datastore's start image when it has a valid one,
/// else by listing the volume (which then seeds the image, if the listing was complete).
async fn start_entries(ds: &Meta) -> Result<Vec<(String, Bytes)>, ReadError> {
    let image = match ds {
        Meta::Local(d) => d.take_start_image().await?,
        Meta::Remote(_) => None,
    };
    if let Some(e) = image {
        tracing::info!(keys = e.len(), "loading from the start image");
        return Ok(e.into_iter().collect());
    }
    let (entries, complete) = list_start_keys(ds).await?;
    if let (Meta::Local(d), true) = (ds, complete) {
        match d.seed_start_image(entries.clone()).await {
            Ok(generation) => {
                tracing::info!(keys = entries.len(), generation, "start image written")
            }
            Err(e) => tracing::warn!(error = %e, "no start image written"),
        }
    }
    Ok(entries)
}

/// A pending task's record (`tasks/<client>/<flow>.pb`); `None`, logged, if its key or flow id is
/// malformed (skipped: it names no client that could take it).
fn pending_task(k: &str, v: &[u8]) -> Result<Option<(ClientId, FlowId, comms::Task)>, ReadError> {
    let Some(client) = k.split('/').nth(1).and_then(|c| ClientId::parse(c).ok()) else {
        tracing::warn!(key = %k, "ignoring a malformed pending task key");
        return Ok(None);
    };
    let task = comms::Task::decode(v).map_err(|e| ReadError::malformed(format!("{k}: {e}")))?;
    let Ok(flow) = FlowId::parse(&task.flow_id) else {
        tracing::warn!(key = %k, "ignoring a pending task with a malformed flow id");
        return Ok(None);
    };
    Ok(Some((client, flow, task)))
}

/// The flow an uploads-pending marker's key names.
fn uploads_pending(k: &str) -> Option<FlowKey> {
    let (c, f) = k
        .strip_prefix(paths::UPLOADS_PENDING)?
        .strip_suffix(".json")?
        .split_once('/')?;
    Some(FlowKey {
        client: ClientId::parse(c).ok()?,
        flow: FlowId::parse(f).ok()?,
    })
}

/// What a master starts from.
pub(super) struct MasterStart {
    pub(super) records: Vec<talon_core::registry::ClientRecord>,
    pub(super) hunts: HuntManager,
    pub(super) cursors: Vec<(String, Cursor)>,
    pub(super) pending: Vec<(ClientId, FlowId, comms::Task)>,
    pub(super) reassembling: Vec<FlowKey>,
}

/// Loads the master's state: from the datastore's start image when it has a valid one (one local
/// file), else by listing and reading the volume, which then seeds the image for the next start.
pub(super) async fn load_master(
    ds: &Meta,
    limits: &HuntLimits,
    now: Timestamp,
) -> Result<MasterStart, ReadError> {
    let entries = start_entries(ds).await?;
    let mut records = Vec::new();
    let mut cursors = Vec::new();
    let mut pending = Vec::new();
    let mut reassembling = Vec::new();
    let mut hunt_entries = Vec::new();
    for (k, v) in entries {
        let parts: Vec<&str> = k.split('/').collect();
        match parts.as_slice() {
            ["clients", _, "record.json"] => {
                let j: ClientJson = parse_value(&k, &v)?;
                records.push(j.to_record().ok_or_else(|| {
                    ReadError::malformed(format!("{k}: malformed client record"))
                })?);
            }
            ["hunts", ..] => hunt_entries.push((k, v)),
            ["cluster", "minions", ..] => {
                let c: CursorJson = parse_value(&k, &v)?;
                cursors.push((
                    c.node,
                    Cursor {
                        epoch: c.epoch,
                        hwm: c.hwm,
                    },
                ));
            }
            ["tasks", ..] => pending.extend(pending_task(&k, &v)?),
            _ => match uploads_pending(&k) {
                Some(key) => reassembling.push(key),
                None => tracing::warn!(key = %k, "ignoring a malformed uploads-pending key"),
            },
        }
    }
    tracing::info!(clients = records.len(), "loaded client registry");
    let hunts = restore_hunts(hunt_entries, limits, now)?;
    tracing::info!(minions = cursors.len(), "loaded replication cursors");
    tracing::info!(tasks = pending.len(), "loaded tasks awaiting delivery");
    if !reassembling.is_empty() {
        tracing::info!(
            flows = reassembling.len(),
            "reassembling uploads a restart interrupted"
        );
    }
    Ok(MasterStart {
        records,
        hunts,
        cursors,
        pending,
        reassembling,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CursorJson {
    pub(super) node: String,
    pub(super) epoch: u64,
    pub(super) hwm: u64,
}

/// Rebuilds the hunt manager from the hunt and participant records.
pub(super) fn restore_hunts(
    entries: Vec<(String, Bytes)>,
    limits: &HuntLimits,
    now: Timestamp,
) -> Result<HuntManager, ReadError> {
    let mut records = Vec::new();
    let mut participants = Vec::new();
    for (k, v) in entries {
        let parts: Vec<&str> = k.split('/').collect();
        match parts.as_slice() {
            ["hunts", _, "record.json"] => {
                let j: HuntJson = parse_value(&k, &v)?;
                records.push(
                    j.to_record().ok_or_else(|| {
                        ReadError::malformed(format!("{k}: malformed hunt record"))
                    })?,
                );
            }
            ["hunts", hunt, "clients", file] => {
                let hunt =
                    HuntId::parse(hunt).map_err(|e| ReadError::malformed(format!("{k}: {e}")))?;
                let client = ClientId::parse(file.trim_end_matches(".json"))
                    .map_err(|e| ReadError::malformed(format!("{k}: {e}")))?;
                let p: ParticipantJson = parse_value(&k, &v)?;
                participants.push((hunt, client, p.into()));
            }
            _ => {}
        }
    }
    tracing::info!(
        hunts = records.len(),
        participants = participants.len(),
        "restored hunts"
    );
    Ok(HuntManager::restore(
        limits.clone(),
        now,
        records,
        participants,
    ))
}

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::storage::datastore::DatastoreOptions;
    use crate::storage::local::StdDisk;
    use crate::storage::volume::FsVolume;
    use crate::storage::volume::Volume;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A volume whose reads fail while `failing` is above zero (each failure counts it down).
    struct Flaky {
        failing: Arc<AtomicU32>,
        inner: FsVolume,
    }

    impl Volume for Flaky {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            let left = self.failing.load(Ordering::SeqCst);
            if left > 0 {
                self.failing.store(left - 1, Ordering::SeqCst);
                return Err(io::Error::other("injected read error"));
            }
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.inner.list(prefix).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.commit(from, to).await
        }
    }

    /// A start-up read that fails is retried (a transient volume error must not stop a master
    /// loading thousands of records); one that keeps failing is reported with its key.
    #[tokio::test(start_paused = true)]
    async fn start_up_reads_retry_transient_failures_and_name_a_lasting_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = FsVolume::new(&dir.path().join("volume")).unwrap();
        let keys: Vec<String> = (0..8).map(|i| format!("hunts/H.{i}/record.json")).collect();
        for k in &keys {
            shared.write(k, Bytes::from(k.clone())).await.unwrap();
        }
        let failing = Arc::new(AtomicU32::new(0));
        let volume = Flaky {
            failing: failing.clone(),
            inner: shared,
        };
        let disk = StdDisk::new(&dir.path().join("local")).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let (ds, _task, _) = crate::storage::datastore::Datastore::open(
            disk,
            volume,
            clock,
            DatastoreOptions::default(),
        )
        .unwrap();
        let meta = Meta::Local(ds);
        // Fewer failures than attempts per read: every value arrives, in key order.
        failing.store(LOAD_READ_ATTEMPTS - 1, Ordering::SeqCst);
        let got = get_many(&meta, keys.clone()).await.unwrap();
        assert_eq!(failing.load(Ordering::SeqCst), 0, "the failures were hit");
        assert_eq!(
            got,
            keys.iter()
                .map(|k| (k.clone(), Some(Bytes::from(k.clone()))))
                .collect::<Vec<_>>()
        );
        // A read that fails every attempt fails the load, naming the key.
        failing.store(LOAD_READ_ATTEMPTS, Ordering::SeqCst);
        let e = get_many(&meta, vec!["hunts/H.new/record.json".into()])
            .await
            .unwrap_err();
        assert!(
            e.message.contains("hunts/H.new/record.json") && e.message.contains("after 5 attempts"),
            "{e}"
        );
        assert_eq!(e.kind, ReadFailure::Unavailable);
    }
}

#[cfg(test)]
mod start_image_tests {
    use super::*;
    use crate::storage::datastore::{Datastore, DatastoreOptions, ImageOptions, ImageReport};
    use crate::storage::local::StdDisk;
    use crate::storage::records::{HuntJson, ParticipantJson};
    use crate::storage::volume::{FsVolume, Volume};
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the volume's reads and lists.
    struct Counting {
        reads: Arc<AtomicU32>,
        inner: FsVolume,
    }

    impl Volume for Counting {
        async fn read(&self, key: &str) -> io::Result<Option<Bytes>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.read(key).await
        }
        async fn write(&self, key: &str, value: Bytes) -> io::Result<()> {
            self.inner.write(key, value).await
        }
        async fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.list(prefix).await
        }
        async fn list_within(&self, prefix: &str, depth: Option<usize>) -> io::Result<Vec<String>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.list_within(prefix, depth).await
        }
        async fn append(&self, key: &str, data: Bytes) -> io::Result<()> {
            self.inner.append(key, data).await
        }
        async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.commit(from, to).await
        }
    }

    fn client_json(i: u8) -> Bytes {
        let id = ClientId::from_public_key(&[i]);
        let r = talon_core::registry::ClientRecord {
            id,
            key_fingerprint: [i; 32],
            hostname: format!("host{i}"),
            fqdn: format!("host{i}.example"),
            os: "linux".into(),
            labels: ["lab".to_owned()].into(),
            ips: vec![],
            first_seen: Timestamp(1),
            last_seen: Timestamp(2),
            last_ip: "127.0.0.1".into(),
            node: "m".into(),
            connected: false,
            persisted_seen: Timestamp(2),
            connected_at: Timestamp(0),
        };
        Bytes::from(serde_json::to_vec(&ClientJson::from_record(&r)).unwrap())
    }

    fn start_keys() -> Vec<(String, Bytes)> {
        let c = |i: u8| ClientId::from_public_key(&[i]);
        let hunt = HuntJson {
            hunt_id: "H.1".into(),
            artifact: "Generic.Client.Info".into(),
            params: Default::default(),
            include_labels: Default::default(),
            exclude_labels: Default::default(),
            os: None,
            expires_ms: 10_000_000,
            client_limit: None,
            description: String::new(),
            created_ms: 5,
            state: "running".into(),
            creator: "alice".into(),
        };
        let json = |v: &dyn erased::Json| Bytes::from(v.to_json());
        let task = comms::Task {
            flow_id: "F.7".into(),
            ..Default::default()
        };
        vec![
            (format!("clients/{}/record.json", c(1)), client_json(1)),
            (format!("clients/{}/record.json", c(2)), client_json(2)),
            ("hunts/H.1/record.json".into(), json(&hunt)),
            (
                format!("hunts/H.1/clients/{}.json", c(1)),
                json(&ParticipantJson::Completed {
                    rows: 3,
                    uploaded_bytes: 0,
                }),
            ),
            (
                format!("hunts/H.1/clients/{}.json", c(2)),
                json(&ParticipantJson::Scheduled),
            ),
            (
                "cluster/minions/m1.json".into(),
                json(&CursorJson {
                    node: "m1".into(),
                    epoch: 4,
                    hwm: 9,
                }),
            ),
            (
                format!("tasks/{}/F.7.pb", c(2)),
                Bytes::from(task.encode_to_vec()),
            ),
            (
                paths::uploads_pending(&c(1), &FlowId::from_u64(3)),
                Bytes::from_static(b"{}"),
            ),
        ]
    }

    mod erased {
        pub trait Json {
            fn to_json(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Json for T {
            fn to_json(&self) -> Vec<u8> {
                serde_json::to_vec(self).unwrap()
            }
        }
    }

    /// What a start loaded, comparable.
    fn digest(m: &MasterStart) -> String {
        let hunts: Vec<String> = m
            .hunts
            .list()
            .map(|h| {
                let mut p: Vec<String> = h
                    .participants()
                    .map(|(c, p)| format!("{c}={p:?}"))
                    .collect();
                p.sort();
                format!("{:?} {:?} {p:?}", h.record(), h.stats())
            })
            .collect();
        format!(
            "{:?}\n{hunts:?}\n{:?}\n{:?}\n{:?}",
            m.records, m.cursors, m.pending, m.reassembling
        )
    }

    /// A master restarted with a valid start image loads its state from that one local file: the
    /// volume is neither listed nor read, and what it loads is what listing the volume loads, also
    /// after writes made since the image was seeded (replayed from the journal).
    #[tokio::test]
    async fn a_restart_loads_from_the_start_image_without_touching_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let reads = Arc::new(AtomicU32::new(0));
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
        let opts = HuntLimits::default();
        let open = |image: bool| {
            let volume = Counting {
                reads: reads.clone(),
                inner: FsVolume::new(&dir.path().join("volume")).unwrap(),
            };
            let ds_opts = DatastoreOptions {
                image: image.then_some(ImageOptions { tracks: start_key }),
                ..DatastoreOptions::default()
            };
            let disk = StdDisk::new(&dir.path().join("local")).unwrap();
            Datastore::open(disk, volume, clock.clone(), ds_opts).unwrap()
        };
        // Records on the volume from an earlier life (written by a datastore keeping no image), with
        // keys the start does not read beside them.
        let (ds, task, _) = open(false);
        for (k, v) in start_keys() {
            ds.set(&k, v).await.unwrap();
        }
        let c1 = ClientId::from_public_key(&[1]);
        ds.set(
            &format!("clients/{c1}/flows/F.3/record.json"),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        ds.flushed().await.unwrap();
        drop(ds);
        task.await.unwrap().unwrap();

        // First start keeping an image: it lists the volume and seeds the image.
        let (ds, task, report) = open(true);
        assert_eq!(report.image, ImageReport::Absent);
        let listed = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert!(reads.load(Ordering::SeqCst) > 0);
        assert_eq!(listed.records.len(), 2);
        assert_eq!(listed.hunts.list().count(), 1);
        assert_eq!(listed.reassembling.len(), 1);
        // Written after the seed: a third client, a delivered task.
        ds.set(
            &format!("clients/{}/record.json", ClientId::from_public_key(&[3])),
            client_json(3),
        )
        .await
        .unwrap();
        ds.delete(&format!("tasks/{}/F.7.pb", ClientId::from_public_key(&[2])))
            .await
            .unwrap();
        drop(ds);
        task.await.unwrap().unwrap();

        // Restart: from the image, nothing read from the volume.
        let (ds, task, report) = open(true);
        assert!(
            matches!(report.image, ImageReport::Loaded { keys: 8, .. }),
            "{:?}",
            report.image
        );
        reads.store(0, Ordering::SeqCst);
        let imaged = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert_eq!(
            reads.load(Ordering::SeqCst),
            0,
            "the volume was not touched"
        );
        assert_eq!(imaged.records.len(), 3);
        assert!(imaged.pending.is_empty());
        drop(ds);
        task.await.unwrap().unwrap();

        // The listing path over the same journal and volume loads the same state.
        let (ds, task, _) = open(false);
        let relisted = load_master(&Meta::Local(ds.clone()), &opts, Timestamp(10))
            .await
            .unwrap();
        assert_eq!(digest(&imaged), digest(&relisted));
        drop(ds);
        task.await.unwrap().unwrap();
    }
}
