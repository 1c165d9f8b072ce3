//! Reassembling completed flows' uploads on the shared volume (master).

use super::*;

/// Reassembles completed flows' uploads on the volume, a bounded number at a time, each retried
/// until it is recorded (the volume may fail or be cut off for a while).
#[derive(Clone)]
pub(super) struct Reassembly {
    permits: Arc<tokio::sync::Semaphore>,
    /// A flow record with its uploads listed stays within this (`Datastore.max_value_size`).
    value_bytes_max: u64,
}

/// Uploads reassembled at once (each reads its flow's chunks and writes its files on the volume).
pub(super) const REASSEMBLY_CONCURRENCY: usize = 64;

/// The longest pause between two attempts at one flow's uploads.
pub(super) const REASSEMBLY_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

impl Reassembly {
    pub(super) fn new(value_bytes_max: u64) -> Reassembly {
        Reassembly {
            permits: Arc::new(tokio::sync::Semaphore::new(REASSEMBLY_CONCURRENCY)),
            value_bytes_max,
        }
    }

    /// Reassembles `key`'s uploads in the background: retried until the flow record lists them and
    /// its [`paths::uploads_pending`] marker is gone (or the process stops; then the next start
    /// takes it up again from the marker).
    pub(super) fn start(&self, fs: SharedVolume, ds: Meta, key: FlowKey) {
        let (permits, max) = (self.permits.clone(), self.value_bytes_max);
        tokio::spawn(async move {
            let mut pause = std::time::Duration::from_secs(1);
            loop {
                let r = {
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    record_uploads(&fs, &ds, &key, max).await
                };
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(client = %key.client, flow = %key.flow, error = %e, retry_in_s = pause.as_secs(), "cannot reassemble uploads yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(REASSEMBLY_RETRY_MAX);
                    }
                }
            }
        });
    }
}

/// Rebuilds a completed flow's uploaded files and records them in its flow record, dropping its
/// [`paths::uploads_pending`] marker in the same atomic write. A record that would not fit in
/// `value_bytes_max` lists the uploads that fit, and the flow fails saying how many are unlisted
/// (their files are still in the filestore): a large record is the writer's doing, and stops
/// nothing but its own flow.
pub(super) async fn record_uploads(
    fs: &SharedVolume,
    ds: &Meta,
    key: &FlowKey,
    value_bytes_max: u64,
) -> Result<(), String> {
    let k = paths::flow_record(&key.client, &key.flow);
    let record = load_json::<FlowJson>(ds, &k)
        .await
        .map_err(|e| e.to_string())?;
    let runs = record.as_ref().map(|f| f.runs.clone()).unwrap_or_default();
    let uploads = crate::storage::uploads::assemble(fs, &key.client, &key.flow, &runs)
        .await
        .map_err(|e| format!("reading the flow's chunks: {e}"))?;
    for u in uploads.iter().filter(|u| !u.error.is_empty()) {
        tracing::warn!(client = %key.client, flow = %key.flow, file = %crate::text::Printable(&u.name), error = %crate::text::Printable(&u.error), "upload not stored");
    }
    let marker = paths::uploads_pending(&key.client, &key.flow);
    let mut writes = vec![(marker, None)];
    if let Some(mut f) = record {
        f.uploads = uploads;
        let bytes = json_within(&mut f, value_bytes_max)?;
        writes.push((k, Some(bytes)));
    }
    ds.write_all(writes)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `f` as JSON of at most `max` bytes: if its upload list makes it larger, the list keeps the
/// uploads that fit (half the bound, leaving room for the rest of the record) and the flow is
/// marked failed with the number left out.
pub(super) fn json_within(f: &mut FlowJson, max: u64) -> Result<Bytes, String> {
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 <= max {
        return Ok(Bytes::from(bytes));
    }
    let total = f.uploads.len();
    let mut room = max / 2;
    let mut kept = 0;
    for u in &f.uploads {
        let len = serde_json::to_vec(u).map_err(|e| e.to_string())?.len() as u64 + 1;
        if len > room {
            break;
        }
        room -= len;
        kept += 1;
    }
    f.uploads.truncate(kept);
    f.state = FlowRecordState::Error;
    let why = format!(
        "{} of {total} uploads are not listed: the flow record would exceed \
         Datastore.max_value_size ({max} bytes)",
        total - kept
    );
    tracing::warn!(client = %f.client_id, flow = %f.flow_id, "{why}");
    f.error = if f.error.is_empty() {
        why
    } else {
        format!("{}; {why}", f.error)
    };
    let bytes = serde_json::to_vec(&*f).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "the flow record is {} bytes without its uploads, over Datastore.max_value_size ({max})",
            bytes.len()
        ));
    }
    Ok(Bytes::from(bytes))
}
