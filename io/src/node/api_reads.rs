//! The API's reads of storage beyond one record: a client's flows, a flow's uploads and their bytes,
//! the audit log, and the watches that follow a flow or a hunt until it ends (docs/api.md).

use super::*;
use crate::storage::records::AuditJson;
use crate::storage::uploads::UploadJson;
use crate::storage::volume::Volume;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Records read at once when a call loads many (each is a round trip on a network volume).
pub const LOAD_PARALLEL: usize = 16;

/// Bytes per [`api::DownloadChunk`] (well under gRPC's default 4 MiB message limit).
pub const DOWNLOAD_CHUNK_BYTES: u64 = 1 << 20;

/// Chunks a download reads ahead of the one it is sending.
pub const DOWNLOAD_AHEAD: usize = 2;

/// How often a watch looks at what it follows. A change reaches the watcher within this.
pub const WATCH_POLL_MS: u64 = 500;

/// Watches open at once on the master; one more is refused with `RESOURCE_EXHAUSTED`.
pub const WATCHES_MAX: usize = 256;

/// Default and largest page of the list calls.
pub const PAGE_DEFAULT: u32 = 100;
/// See [`PAGE_DEFAULT`].
pub const PAGE_MAX: u32 = 1000;

/// A list call's page: `(offset, limit)`, the limit defaulted (0) and bounded by `max`.
pub fn page(offset: u32, limit: u32, default: u32, max: u32) -> Result<(usize, usize), Status> {
    match limit {
        0 => Ok((offset as usize, default as usize)),
        l if l > max => Err(Status::invalid_argument(format!(
            "limit {l} is more than the most one call returns ({max}): page with offset"
        ))),
        l => Ok((offset as usize, l as usize)),
    }
}

/// Loads the JSON records under `keys`, in their order, [`LOAD_PARALLEL`] at a time; a key with
/// no value is left out.
async fn load_many<T>(ds: &Meta, keys: Vec<String>) -> Result<Vec<T>, Status>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    Ok(load_each(ds, keys).await?.into_iter().flatten().collect())
}

/// Each key's value (`None` where there is none), in the keys' order, read as [`load_many`] reads.
pub(super) async fn load_each<T>(ds: &Meta, keys: Vec<String>) -> Result<Vec<Option<T>>, Status>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let mut out: Vec<Option<T>> = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(LOAD_PARALLEL) {
        let mut set = tokio::task::JoinSet::new();
        for (i, key) in chunk.iter().enumerate() {
            let (ds, key) = (ds.clone(), key.clone());
            set.spawn(async move { (i, load_json::<T>(&ds, &key).await) });
        }
        let mut got: Vec<Option<T>> = std::iter::repeat_with(|| None).take(chunk.len()).collect();
        while let Some(r) = set.join_next().await {
            let (i, v) = r.map_err(|e| Status::internal(format!("a read task failed: {e}")))?;
            got[i] = v.map_err(|e| e.status())?;
        }
        out.extend(got);
    }
    Ok(out)
}

/// A client's flow records, newest first (ties by flow id), and how many it has.
pub(super) async fn client_flows(
    ds: &Meta,
    client: &ClientId,
    offset: usize,
    limit: usize,
) -> Result<(Vec<FlowJson>, u64), Status> {
    let known = ds
        .get(&paths::client_record(client))
        .await
        .map_err(|e| e.status())?;
    if known.is_none() {
        return Err(Status::not_found(format!("no client {client}")));
    }
    let prefix = format!("clients/{client}/flows/");
    let (mut keys, _) = ds
        .list_within(&prefix, Some(2))
        .await
        .map_err(|e| e.status())?;
    keys.retain(|k| k.ends_with("/record.json"));
    let mut flows: Vec<FlowJson> = load_many(ds, keys).await?;
    flows.sort_by(|a, b| (b.created_ms, &b.flow_id).cmp(&(a.created_ms, &a.flow_id)));
    let total = flows.len() as u64;
    Ok((flows.into_iter().skip(offset).take(limit).collect(), total))
}

/// A flow's record, or `NOT_FOUND`.
pub(super) async fn flow_record(
    ds: &Meta,
    client: &ClientId,
    flow: &FlowId,
) -> Result<FlowJson, Status> {
    load_json::<FlowJson>(ds, &paths::flow_record(client, flow))
        .await
        .map_err(|e| e.status())?
        .ok_or_else(|| Status::not_found(format!("no flow {flow} on client {client}")))
}

/// The API's view of an upload.
pub(super) fn upload_info(u: &UploadJson) -> api::UploadInfo {
    api::UploadInfo {
        upload_id: u.upload_id,
        name: u.name.clone(),
        size: u.size,
        sha256: u.sha256.clone(),
        error: u.error.clone(),
    }
}

/// The chunks of one download.
pub(super) type Chunks = tokio_stream::wrappers::ReceiverStream<Result<api::DownloadChunk, Status>>;

/// Streams upload `upload_id` of a completed flow from the filestore, [`DOWNLOAD_CHUNK_BYTES`] at
/// a time, [`DOWNLOAD_AHEAD`] chunks read ahead; the bytes are hashed as they go and the stream
/// ends with `DATA_LOSS` if they are not the recorded size and SHA-256.
pub(super) fn download(fs: SharedVolume, u: UploadJson) -> Chunks {
    let (tx, rx) = mpsc::channel(DOWNLOAD_AHEAD);
    tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut offset = 0;
        loop {
            let len = DOWNLOAD_CHUNK_BYTES.min(u.size - offset);
            let chunk = if len == 0 {
                None
            } else {
                match fs.read_range(&u.stored_as, offset, len).await {
                    Ok(Some(b)) if !b.is_empty() => Some(Ok(b)),
                    Ok(_) => Some(Err(Status::data_loss(format!(
                        "upload {} ({}): the stored file ends at byte {offset} of {}",
                        u.upload_id, u.name, u.size
                    )))),
                    Err(e) => Some(Err(Status::unavailable(format!("filestore: {e}")))),
                }
            };
            let msg = match chunk {
                Some(Ok(data)) => {
                    hasher.update(&data);
                    let at = offset;
                    offset += data.len() as u64;
                    Ok(api::DownloadChunk { offset: at, data })
                }
                Some(Err(e)) => Err(e),
                None => {
                    let sha = crate::clock::hex(&hasher.finalize_reset());
                    if sha == u.sha256 {
                        return;
                    }
                    Err(Status::data_loss(format!(
                        "upload {} ({}): the stored bytes' SHA-256 is {sha}, the record says {}",
                        u.upload_id, u.name, u.sha256
                    )))
                }
            };
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The audit log, newest first, and how many entries it has.
pub(super) async fn audit(
    ds: &Meta,
    offset: usize,
    limit: usize,
) -> Result<(Vec<api::AuditEntry>, u64), Status> {
    let (mut keys, _) = ds.list(paths::AUDIT).await.map_err(|e| e.status())?;
    keys.retain(|k| k.ends_with(".json"));
    // Keys sort by day, then time, then id: newest first is the reverse.
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let total = keys.len() as u64;
    let keys = keys.into_iter().skip(offset).take(limit).collect();
    let entries: Vec<AuditJson> = load_many(ds, keys).await?;
    let entries = entries
        .into_iter()
        .map(|e| api::AuditEntry {
            time_unix_ms: e.time_ms,
            user: e.user,
            action: e.action,
            target: e.target,
            detail: e.detail,
        })
        .collect();
    Ok((entries, total))
}

/// Bounds the watches open at once ([`WATCHES_MAX`]).
#[derive(Clone)]
pub struct Watches {
    open: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Watches {
    /// Room for `max` watches.
    pub fn new(max: usize) -> Watches {
        let open = Arc::new(tokio::sync::Semaphore::new(max));
        Watches { open, max }
    }

    /// A place for one more watch, held until it is dropped; `RESOURCE_EXHAUSTED` when all are
    /// taken.
    pub fn enter(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.open.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} watches are open on the master, the most it keeps: try again when one ends",
                self.max
            ))
        })
    }
}

/// Streams `first` (what the caller looked at to accept the watch), then `look()` each time it
/// changes, looking every [`WATCH_POLL_MS`], until `done` says the last one sent was final (or
/// `look` fails, or the watcher goes away).
pub(super) fn watch<T, F, Fut>(
    permit: tokio::sync::OwnedSemaphorePermit,
    first: T,
    mut look: F,
    done: fn(&T) -> bool,
) -> tokio_stream::wrappers::ReceiverStream<Result<T, Status>>
where
    T: PartialEq + Clone + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Status>> + Send,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _permit = permit;
        let mut last: Option<T> = None;
        let mut now = Ok(first);
        loop {
            let end = match &now {
                Ok(v) => done(v),
                Err(_) => true,
            };
            if now.as_ref().ok() != last.as_ref() || end {
                last = now.as_ref().ok().cloned();
                if tx.send(now).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(WATCH_POLL_MS)) => {}
                _ = tx.closed() => return,
            }
            now = look().await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_default_and_refuse_more_than_their_maximum() {
        assert_eq!(page(0, 0, 100, 1000).unwrap(), (0, 100));
        assert_eq!(page(5, 1000, 100, 1000).unwrap(), (5, 1000));
        let e = page(0, 1001, 100, 1000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("1000"), "{}", e.message());
    }

    #[test]
    fn watches_beyond_the_bound_are_refused_until_one_ends() {
        let w = Watches::new(2);
        let a = w.enter().unwrap();
        let _b = w.enter().unwrap();
        let e = w.enter().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        drop(a);
        assert!(w.enter().is_ok());
    }

    /// A watch sends the first value and each change, not repeats, and ends after the final one.
    #[tokio::test(start_paused = true)]
    async fn a_watch_sends_changes_and_ends_at_the_final_value() {
        use tokio_stream::StreamExt;
        let w = Watches::new(1);
        let seq = Arc::new(std::sync::Mutex::new(vec![1, 2, 2, 2, 3, 9, 9]));
        let s = seq.clone();
        let stream = watch(
            w.enter().unwrap(),
            1,
            move || {
                let s = s.clone();
                async move { Ok::<u32, Status>(s.lock().unwrap().remove(0)) }
            },
            |v| *v == 3,
        );
        let got: Vec<u32> = stream.map(|r| r.unwrap()).collect().await;
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(
            *seq.lock().unwrap(),
            vec![9, 9],
            "it stopped looking at the end"
        );
        assert!(w.enter().is_ok(), "its place is free again");
    }
}
