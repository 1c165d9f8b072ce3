//! Where things live: the one place that names datastore keys and filestore paths.
//!
//! Keys are relative, `/`-separated, and made only of characters in `[0-9A-Za-z._-]` per component,
//! so the shells can map them to files under `Datastore.location` / `filestore_directory` without
//! any component escaping the root. Client-supplied names (upload paths) are never used raw: they are
//! encoded by [`safe_component`].

use crate::ids::{ClientId, FlowId, HuntId};

/// Longest component [`safe_component`] produces (bytes), well under common NAME_MAX (255).
pub const COMPONENT_BYTES_MAX: usize = 200;

/// The datastore key of a client's record.
pub fn client_record(client: &ClientId) -> String {
    format!("clients/{client}/record.json")
}

/// The datastore key of a hunt's record (spec, state).
pub fn hunt_record(hunt: &HuntId) -> String {
    format!("hunts/{hunt}/record.json")
}

/// The datastore key of one client's participation in a hunt.
pub fn hunt_participant(hunt: &HuntId, client: &ClientId) -> String {
    format!("hunts/{hunt}/clients/{client}.json")
}

/// The datastore key of a flow's record (request, state, stats).
pub fn flow_record(client: &ClientId, flow: &FlowId) -> String {
    format!("clients/{client}/flows/{flow}/record.json")
}

/// The datastore key marking a completed flow whose uploads are still to be reassembled: written
/// with the completion, removed with the uploads' record, so a restart finishes what a crash
/// interrupted.
pub fn uploads_pending(client: &ClientId, flow: &FlowId) -> String {
    format!("{UPLOADS_PENDING}{client}/{flow}.json")
}

/// The datastore key of an audit-log entry: one directory per UTC day, entries named by time (ms)
/// and a random id, so a listing sorts by time.
pub fn audit_entry(time: crate::Timestamp, id: u64) -> String {
    format!(
        "{AUDIT}{}/{:013}-{id:016x}.json",
        time.utc_day(),
        time.as_ms()
    )
}

/// The datastore key of a custom artifact's definition (its YAML, as added).
pub fn artifact_definition(name: &str) -> String {
    format!("{ARTIFACTS}{name}.yaml")
}

/// The datastore key of one entry of the client event table (docs/events.md): the label's
/// directory (`%all` for every client, [`crate::events::ALL_CLIENTS`]), then the artifact.
pub fn client_event(label: &str, artifact: &str) -> String {
    let dir = if label == crate::events::ALL_CLIENTS {
        "%all".to_owned()
    } else {
        safe_component(label)
    };
    format!("{CLIENT_EVENTS}{dir}/{artifact}.json")
}

/// The prefix of every [`client_event`] key.
pub const CLIENT_EVENTS: &str = "client-events/";

/// The filestore directory of a client's event artifact's batches made on one UTC day.
pub fn events_day(client: &ClientId, artifact: &str, day: &str) -> String {
    format!("{}/{day}", events_dir(client, artifact))
}

/// The filestore directory of a client's event artifact (one directory per day below it).
pub fn events_dir(client: &ClientId, artifact: &str) -> String {
    format!("clients/{client}/events/{artifact}")
}

/// True if `dir` is a day directory of event batches ([`events_day`]).
pub fn is_events_dir(dir: &str) -> bool {
    let parts: Vec<&str> = dir.split('/').collect();
    parts.len() == 5 && parts[0] == "clients" && parts[2] == "events"
}

/// The filestore object of one event batch: named by its stream and number, zero-padded so a
/// listing sorts by stream, then number. The same batch always has the same name (docs/events.md,
/// "Exactly once").
pub fn event_batch(key: &crate::events::EventKey) -> String {
    format!(
        "{}/{:020}-{:020}",
        events_day(&key.client, &key.artifact, &key.day),
        key.stream,
        key.seq
    )
}

/// The prefix of every [`artifact_definition`] key.
pub const ARTIFACTS: &str = "artifacts/";

/// The prefix of every [`audit_entry`] key.
pub const AUDIT: &str = "audit/";

/// The prefix of every [`uploads_pending`] key.
pub const UPLOADS_PENDING: &str = "uploads-pending/";

/// The filestore directory holding a flow's durable messages, one object per sequence number.
pub fn flow_messages_dir(client: &ClientId, flow: &FlowId) -> String {
    format!("clients/{client}/flows/{flow}/messages")
}

/// The filestore object for one flow message: zero-padded so a listing sorts by sequence number.
pub fn flow_message(client: &ClientId, flow: &FlowId, seq: u64) -> String {
    format!("{}/{seq:020}", flow_messages_dir(client, flow))
}

/// The filestore path of an uploaded file, its client-side name made safe.
pub fn upload(client: &ClientId, flow: &FlowId, upload_id: u32, client_name: &str) -> String {
    format!(
        "clients/{client}/flows/{flow}/uploads/{upload_id:05}-{}",
        safe_component(client_name)
    )
}

/// Encodes any string as one safe path component: `[0-9A-Za-z._-]` kept, every other byte as
/// `%XX`, no leading `.`, at most [`COMPONENT_BYTES_MAX`] bytes (long names keep their tail, which
/// carries the file name and extension, after a `~` marker).
pub fn safe_component(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(COMPONENT_BYTES_MAX));
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%00empty");
    }
    if out.len() > COMPONENT_BYTES_MAX {
        // Cut on a char boundary that is not inside a %XX escape.
        let mut start = out.len() - (COMPONENT_BYTES_MAX - 1);
        while !out.is_char_boundary(start) || out[..start].ends_with('%') || {
            let pre = &out[..start];
            pre.len() >= 2 && pre.as_bytes()[pre.len() - 2] == b'%'
        } {
            start += 1;
        }
        out = format!("~{}", &out[start..]);
    }
    out
}

/// Longest datastore key (bytes).
pub const KEY_BYTES_MAX: usize = 1024;

/// Why a datastore key is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Empty, or longer than [`KEY_BYTES_MAX`].
    BadLength(usize),
    /// A component is empty, `.` or `..`, or has a character outside `[0-9A-Za-z._%~-]`.
    BadComponent(String),
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::BadLength(n) => write!(f, "key length {n} is not in 1..={KEY_BYTES_MAX}"),
            KeyError::BadComponent(c) => {
                let shown: String = c.chars().take(64).collect();
                write!(f, "key component {shown:?} is not allowed")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// Checks that a key is relative, has no `.`/`..`/empty components and only safe characters, so
/// mapping it under a storage root can never escape the root.
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(KeyError::BadLength(key.len()));
    }
    for c in key.split('/') {
        let safe =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%' | b'~');
        if c.is_empty() || c == "." || c == ".." || !c.bytes().all(safe) {
            return Err(KeyError::BadComponent(c.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_batches_live_in_day_directories() {
        let key = crate::events::EventKey {
            client: ClientId::from_public_key(&[1; 32]),
            artifact: "Linux.Events.ProcessStarts".into(),
            day: "2026-12-06".into(),
            stream: 7,
            seq: 42,
        };
        let name = event_batch(&key);
        validate_key(&name).unwrap();
        let (dir, file) = name.rsplit_once('/').unwrap();
        assert_eq!(dir, events_day(&key.client, &key.artifact, &key.day));
        assert_eq!(file, "00000000000000000007-00000000000000000042");
        assert!(is_events_dir(dir));
        assert!(!is_events_dir(&flow_messages_dir(
            &key.client,
            &FlowId::for_hunt(&HuntId::from_u64(1), &key.client)
        )));
        assert!(!is_events_dir(&events_dir(&key.client, &key.artifact)));
    }

    #[test]
    fn hostile_names_stay_one_component() {
        for name in [
            "../../etc/passwd",
            "/etc/shadow",
            "a\0b",
            "..",
            ".",
            "",
            "C:\\x",
            "%2e%2e",
        ] {
            let c = safe_component(name);
            assert!(
                !c.contains('/') && !c.contains('\\') && !c.contains('\0'),
                "{name:?} -> {c}"
            );
            assert!(!c.starts_with('.'), "{name:?} -> {c}");
            assert!(!c.is_empty());
        }
        assert_eq!(safe_component("report.txt"), "report.txt");
        assert_eq!(safe_component("/a b"), "%2Fa%20b");
    }

    #[test]
    fn long_names_are_cut_to_the_bound_and_keep_their_tail() {
        let long = format!("{}/end.log", "x/".repeat(500));
        let c = safe_component(&long);
        assert!(c.len() <= COMPONENT_BYTES_MAX, "{}", c.len());
        assert!(c.ends_with("end.log"));
        let unicode = "é".repeat(300);
        assert!(safe_component(&unicode).len() <= COMPONENT_BYTES_MAX);
    }

    #[test]
    fn keys_cannot_escape_the_root() {
        for bad in [
            "", "/abs", "a//b", "a/../b", "..", "./a", "a/b/", "a\0b", "a b", "a\\b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        let c = ClientId::from_public_key(b"k");
        let f = FlowId::from_u64(3);
        for good in [
            client_record(&c),
            flow_message(&c, &f, 1),
            upload(&c, &f, 0, "/etc/../x y"),
        ] {
            assert_eq!(validate_key(&good), Ok(()), "{good}");
        }
        assert!(validate_key(&"a".repeat(KEY_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn message_objects_sort_by_seq() {
        let c = ClientId::from_public_key(b"k");
        let f = FlowId::from_u64(1);
        assert!(flow_message(&c, &f, 9) < flow_message(&c, &f, 10));
    }
}
