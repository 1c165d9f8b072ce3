//! Reassembling uploaded files. A file reaches the filestore as numbered `FileChunk` flow messages
//! (each stored and acknowledged like any other message). When the flow completes, each upload is
//! rebuilt into `clients/<id>/flows/<flow>/uploads/<nnnnn>-<safe name>` by streaming its chunks, in
//! order, from the runs that hold them into a scratch file that is verified (contiguous offsets,
//! total size, SHA-256) and then committed atomically. Memory is a run at a time (at most
//! [`crate::storage::segments::RUN_BYTES_MAX`] or one chunk), whatever the file's size.

use crate::storage::segments::{MessageReader, RunRef};
use crate::storage::volume::Volume;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use talon_core::{ClientId, FlowId, paths};
use talon_proto::comms::{self, flow_message::Payload};

/// One reassembled (or failed) upload, as recorded in the flow record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadJson {
    /// Its number within the flow.
    pub upload_id: u32,
    /// The client-side path.
    pub name: String,
    /// The filestore key of the reassembled file (empty if it failed).
    pub stored_as: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex, as verified.
    pub sha256: String,
    /// Why it failed, if it did.
    pub error: String,
}

struct Partial {
    name: String,
    scratch: String,
    target: String,
    next_offset: u64,
    hasher: Sha256,
    error: Option<String>,
}

/// Rebuilds every upload of a flow from its messages in `runs` (none: the flow predates the segment
/// log, its messages are listed); returns what happened to each. `Err` only if the filestore
/// itself fails.
pub async fn assemble<V: Volume>(
    fs: &V,
    client: &ClientId,
    flow: &FlowId,
    runs: &[RunRef],
) -> std::io::Result<Vec<UploadJson>> {
    let dir = paths::flow_messages_dir(client, flow);
    let mut messages = MessageReader::new(fs, &dir, runs).await?;
    let mut open: BTreeMap<u32, Partial> = BTreeMap::new();
    let mut done = Vec::new();
    while let Some((_, bytes)) = messages.next().await? {
        let Ok(msg) = comms::FlowMessage::decode(bytes) else {
            continue;
        };
        let Some(Payload::FileChunk(c)) = msg.payload else {
            continue;
        };
        if let std::collections::btree_map::Entry::Vacant(slot) = open.entry(c.upload_id) {
            let target = paths::upload(client, flow, c.upload_id, &c.name);
            let scratch = format!("{target}.partial");
            fs.delete(&scratch).await?; // Left by an earlier, interrupted assembly: start over.
            let hasher = Sha256::new();
            slot.insert(Partial {
                name: c.name.clone(),
                scratch,
                target,
                next_offset: 0,
                hasher,
                error: None,
            });
        }
        let p = open.get_mut(&c.upload_id).expect("inserted above");
        if p.error.is_none() {
            if c.offset != p.next_offset {
                p.error = Some(format!(
                    "chunk at offset {} where {} was expected",
                    c.offset, p.next_offset
                ));
            } else {
                p.hasher.update(&c.data);
                p.next_offset += c.data.len() as u64;
                fs.append(&p.scratch, c.data).await?;
            }
        }
        if c.eof {
            let p = open.remove(&c.upload_id).expect("present");
            let sha = p.hasher.finalize();
            let error = p.error.or_else(|| {
                if c.total_size != p.next_offset {
                    Some(format!(
                        "{} bytes received, {} announced",
                        p.next_offset, c.total_size
                    ))
                } else if sha.as_slice() != c.sha256.as_ref() {
                    Some("SHA-256 does not match the client's".into())
                } else {
                    None
                }
            });
            let stored_as = if error.is_none() {
                fs.commit(&p.scratch, &p.target).await?;
                p.target
            } else {
                fs.delete(&p.scratch).await?;
                String::new()
            };
            done.push(UploadJson {
                upload_id: c.upload_id,
                name: p.name,
                stored_as,
                size: p.next_offset,
                sha256: crate::clock::hex(&sha),
                error: error.unwrap_or_default(),
            });
        }
    }
    for (id, p) in open {
        fs.delete(&p.scratch).await?;
        done.push(UploadJson {
            upload_id: id,
            name: p.name,
            stored_as: String::new(),
            size: p.next_offset,
            sha256: String::new(),
            error: "the upload never finished (no final chunk)".into(),
        });
    }
    done.sort_by_key(|u| u.upload_id);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::volume::FsVolume;
    use bytes::Bytes;

    async fn put(fs: &FsVolume, c: &ClientId, f: &FlowId, seq: u64, chunk: comms::FileChunk) {
        let m = comms::FlowMessage {
            flow_id: f.to_string(),
            seq,
            payload: Some(Payload::FileChunk(chunk)),
        };
        fs.write(
            &paths::flow_message(c, f, seq),
            Bytes::from(m.encode_to_vec()),
        )
        .await
        .unwrap();
    }

    fn chunk(
        id: u32,
        name: &str,
        offset: u64,
        data: &'static [u8],
        end: Option<(u64, &[u8])>,
    ) -> comms::FileChunk {
        comms::FileChunk {
            upload_id: id,
            name: name.into(),
            offset,
            data: Bytes::from_static(data),
            eof: end.is_some(),
            total_size: end.map_or(0, |e| e.0),
            sha256: end.map_or(Bytes::new(), |e| Bytes::copy_from_slice(e.1)),
        }
    }

    #[tokio::test]
    async fn uploads_are_rebuilt_verified_and_named_safely() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FsVolume::new(dir.path()).unwrap();
        let (c, f) = (ClientId::from_public_key(b"k"), FlowId::from_u64(1));
        let good = Sha256::digest(b"hello world");
        put(
            &fs,
            &c,
            &f,
            0,
            chunk(0, "/etc/../hosts", 0, b"hello ", None),
        )
        .await;
        put(
            &fs,
            &c,
            &f,
            1,
            chunk(0, "/etc/../hosts", 6, b"world", Some((11, &good))),
        )
        .await;
        put(
            &fs,
            &c,
            &f,
            2,
            chunk(1, "/bad", 0, b"abc", Some((3, &[0u8; 32]))),
        )
        .await;
        put(
            &fs,
            &c,
            &f,
            3,
            chunk(2, "/gap", 5, b"x", Some((6, &[0u8; 32]))),
        )
        .await;
        put(&fs, &c, &f, 4, chunk(3, "/unfinished", 0, b"x", None)).await;
        let r = assemble(&fs, &c, &f, &[]).await.unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].error.as_str(), r[0].size), ("", 11));
        assert_eq!(
            fs.read(&r[0].stored_as).await.unwrap(),
            Some(Bytes::from_static(b"hello world"))
        );
        assert!(
            r[0].stored_as
                .ends_with("/uploads/00000-%2Fetc%2F..%2Fhosts"),
            "{}",
            r[0].stored_as
        );
        assert!(r[1].error.contains("SHA-256") && r[1].stored_as.is_empty());
        assert!(r[2].error.contains("offset 5"));
        assert!(r[3].error.contains("never finished"));
        // Nothing but the good file and the messages remain.
        let left = fs.list("clients/").await.unwrap();
        assert_eq!(
            left.iter().filter(|k| k.contains("/uploads/")).count(),
            1,
            "{left:?}"
        );
        // Running it again (e.g. after a crash mid-assembly) gives the same result.
        assert_eq!(assemble(&fs, &c, &f, &[]).await.unwrap(), r);
    }

    /// The same chunks written by the segment log, in two flushes, the later chunk first: the
    /// runs are read in chunk order and the file is rebuilt.
    #[tokio::test]
    async fn uploads_are_rebuilt_from_segment_runs() {
        use crate::storage::segments::SegmentLog;
        use crate::storage::volume::SharedVolume;
        let dir = tempfile::tempdir().unwrap();
        let fs = SharedVolume::new(FsVolume::new(dir.path()).unwrap());
        let log = SegmentLog::new(fs.clone(), "w", 10).unwrap();
        let (c, f) = (ClientId::from_public_key(b"k"), FlowId::from_u64(2));
        let good = Sha256::digest(b"hello world");
        let message = |seq: u64, chunk: comms::FileChunk| {
            let m = comms::FlowMessage {
                flow_id: f.to_string(),
                seq,
                payload: Some(Payload::FileChunk(chunk)),
            };
            (
                paths::flow_message(&c, &f, seq),
                Some(Bytes::from(m.encode_to_vec())),
            )
        };
        log.write_many(vec![message(
            1,
            chunk(0, "/a", 6, b"world", Some((11, &good))),
        )])
        .await
        .unwrap();
        log.write_many(vec![message(0, chunk(0, "/a", 0, b"hello ", None))])
            .await
            .unwrap();
        let runs = log
            .runs_covering(&paths::flow_messages_dir(&c, &f), 2)
            .unwrap();
        let r = assemble(&fs, &c, &f, &runs).await.unwrap();
        assert_eq!((r.len(), r[0].error.as_str(), r[0].size), (1, "", 11));
        assert_eq!(
            fs.read(&r[0].stored_as).await.unwrap(),
            Some(Bytes::from_static(b"hello world"))
        );
    }
}
