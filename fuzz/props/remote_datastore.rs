// The property the `remote_datastore` fuzz target checks, shared with the corpus regression test
// (`core/tests/fuzz_corpus.rs`): the master's remote-datastore handler — decode a minion's request,
// reassemble a chunked value (`cluster_codec::ValueAssembly`), run it through the master's datastore
// cache (`datastore::Cache`, the real state machine, over an in-memory volume) — never panics, stores
// only keys that stay inside the datastore root, stores exactly the bytes sent, and answers every
// Get and List as a plain map of the acknowledged writes would.
//
// Input: frames of [kind: 1 byte][length: 2 bytes LE][protobuf]; kind % 5: 0 = GetRequest,
// 1 = SetChunk (starts a Set if none is open, else continues it), 2 = end of the open Set,
// 3 = DeleteRequest, 4 = ListRequest.

use bytes::Bytes;
use prost::Message;
use std::collections::BTreeMap;
use talon_core::Monotonic;
use talon_core::cluster_codec::ValueAssembly;
use talon_core::datastore::{Cache, CacheAction, CacheError, CacheLimits, CacheReply, RequestId};
use talon_core::paths::validate_key;
use talon_proto::cluster::{DeleteRequest, GetRequest, ListRequest, SetChunk};

const VALUE_MAX: u64 = 4096;

/// The master's datastore over an in-memory volume whose I/O completes at once.
struct Master {
    cache: Cache,
    volume: BTreeMap<String, Bytes>,
    next: u64,
}

impl Master {
    /// Runs one request to its reply.
    fn call(
        &mut self,
        start: impl FnOnce(&mut Cache, RequestId),
    ) -> Result<CacheReply, CacheError> {
        self.next += 1;
        let req = RequestId(self.next);
        start(&mut self.cache, req);
        let now = Monotonic(0);
        let mut reply = None;
        while let Some(a) = self.cache.poll_action() {
            match a {
                CacheAction::JournalAppend { seq, .. } => {
                    self.cache.handle_journal_synced(now, seq)
                }
                CacheAction::ReadShared { key } => {
                    let v = self.volume.get(&key).cloned();
                    self.cache.handle_read_done(now, &key, Ok(v));
                }
                CacheAction::ListShared { req, prefix, .. } => {
                    let keys = self
                        .volume
                        .keys()
                        .filter(|k| k.starts_with(&prefix))
                        .cloned()
                        .collect();
                    self.cache.handle_list_done(now, req, Ok(keys));
                }
                CacheAction::Flush { batch, writes } => {
                    for w in writes {
                        assert!(
                            validate_key(&w.key).is_ok(),
                            "flushed a bad key {:?}",
                            w.key
                        );
                        match w.value {
                            Some(v) => self.volume.insert(w.key, v),
                            None => self.volume.remove(&w.key),
                        };
                    }
                    self.cache.handle_flush_done(now, batch, Ok(()));
                }
                CacheAction::JournalTruncate { .. } => {}
                CacheAction::Reply { req: r, result } => {
                    assert_eq!(r, req, "a reply to a request not made");
                    reply = Some(result);
                }
            }
        }
        reply.expect("every request is answered")
    }
}

/// Panics if the property fails for `data`.
pub fn check(data: &[u8]) {
    let limits = CacheLimits {
        clean_bytes_max: 16 << 10,
        dirty_bytes_max: 64 << 10,
        value_bytes_max: VALUE_MAX,
        flush_batch_max: 4,
        list_keys_max: 8,
        ..CacheLimits::default()
    };
    let mut m = Master {
        cache: Cache::new(limits, 0),
        volume: BTreeMap::new(),
        next: 0,
    };
    // What the master acknowledged: the truth every answer must match.
    let mut model: BTreeMap<String, Bytes> = BTreeMap::new();
    let mut open: Option<(ValueAssembly, Vec<u8>)> = None;
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0] % 5;
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let body = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[(3 + len).min(rest.len())..];
        match kind {
            0 => {
                let Ok(r) = GetRequest::decode(body) else {
                    continue;
                };
                match m.call(|c, req| c.handle_get(Monotonic(0), req, &r.key)) {
                    Ok(CacheReply::Value(v)) => assert_eq!(v.as_ref(), model.get(&r.key)),
                    Ok(other) => panic!("a get answered {other:?}"),
                    Err(CacheError::BadKey(_)) => assert!(validate_key(&r.key).is_err()),
                    Err(e) => panic!("get {:?}: {e}", r.key),
                }
            }
            1 => {
                let Ok(c) = SetChunk::decode(body) else {
                    open = None; // A malformed message ends the call.
                    continue;
                };
                match open.as_mut() {
                    None => match ValueAssembly::start(&c.key, c.total_len, VALUE_MAX) {
                        Ok(mut a) => {
                            assert!(validate_key(&c.key).is_ok() && c.total_len <= VALUE_MAX);
                            if a.push(&c.data).is_ok() {
                                open = Some((a, c.data.to_vec()));
                            } else {
                                assert!(c.data.len() as u64 > c.total_len);
                            }
                        }
                        Err(_) => assert!(validate_key(&c.key).is_err() || c.total_len > VALUE_MAX),
                    },
                    Some((a, sent)) => {
                        if a.push(&c.data).is_ok() {
                            sent.extend_from_slice(&c.data);
                            assert!(sent.len() as u64 <= VALUE_MAX);
                        } else {
                            open = None;
                        }
                    }
                }
            }
            2 => {
                let Some((a, sent)) = open.take() else {
                    continue;
                };
                let Ok((key, value)) = a.finish() else {
                    continue;
                };
                assert_eq!(value, sent, "assembled bytes differ from those sent");
                let value = Bytes::from(value);
                match m.call(|c, req| c.handle_set(Monotonic(0), req, &key, value.clone())) {
                    Ok(CacheReply::Written { .. }) => {
                        model.insert(key, value);
                    }
                    other => panic!("set {key:?}: {other:?}"),
                }
            }
            3 => {
                let Ok(r) = DeleteRequest::decode(body) else {
                    continue;
                };
                match m.call(|c, req| c.handle_delete(Monotonic(0), req, &r.key)) {
                    Ok(CacheReply::Written { .. }) => {
                        model.remove(&r.key);
                    }
                    Err(CacheError::BadKey(_)) => assert!(validate_key(&r.key).is_err()),
                    other => panic!("delete {:?}: {other:?}", r.key),
                }
            }
            _ => {
                let Ok(r) = ListRequest::decode(body) else {
                    continue;
                };
                match m.call(|c, req| c.handle_list(Monotonic(0), req, &r.prefix)) {
                    Ok(CacheReply::Keys { keys, truncated }) => {
                        let want: Vec<&String> =
                            model.keys().filter(|k| k.starts_with(&r.prefix)).collect();
                        assert_eq!(truncated, want.len() > 8);
                        assert_eq!(keys.iter().collect::<Vec<_>>(), want[..want.len().min(8)]);
                    }
                    other => panic!("list {:?}: {other:?}", r.prefix),
                }
            }
        }
    }
    for k in m.volume.keys() {
        assert!(
            !k.starts_with('/') && !k.split('/').any(|p| p == ".." || p == "." || p.is_empty())
        );
    }
}
