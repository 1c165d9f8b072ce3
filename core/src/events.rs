//! Client event monitoring: the names, bounds and rules every shell shares (docs/events.md).
//!
//! An *event artifact* runs continuously on an endpoint: its one query runs over each batch of an
//! event table (process starts, test events, ...) and its rows are forwarded as `EventBatch`es.
//! A *stream* is one event artifact in one run of the agent; its batches are numbered 0, 1, 2, ...
//! and kept by the agent until a frontend says they are settled on the shared volume, exactly as a
//! flow's messages (core `agent::FlowOutbox` does the numbering, keeping and resending for both).
//!
//! # Exactly once
//!
//! A batch is stored under a name derived from `(client, artifact, day, stream, seq)`
//! ([`crate::paths::event_batch`]): storing a resend again — on the same frontend or on another after
//! a failover — writes the same name, and a reader takes each name once. The day is chosen by the
//! agent when it makes the batch (UTC), so every copy of a batch lands in the same day.
//!
//! # The client event table
//!
//! Which event artifacts run where: entries `(label, artifact, params)` in the datastore under
//! `client-events/` ([`crate::paths::client_event`]), written by the master with an audit entry.
//! A client runs an artifact if an entry names it for all clients or for one of its labels; when
//! several do, the entry of its first matching label (in label order) wins over the one for all.

use crate::ClientId;
use std::collections::{BTreeMap, BTreeSet};

/// Entries the client event table may hold (cluster-wide).
pub const TABLE_ENTRIES_MAX: usize = 256;
/// Event artifacts one client runs at once.
pub const PER_CLIENT_MAX: usize = 32;
/// The label of an entry for every client (stored as the directory `%all`, which no real label's
/// [`crate::paths::safe_component`] can be).
pub const ALL_CLIENTS: &str = "";

/// One stored batch: names its place on storage.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventKey {
    /// The client that sent it.
    pub client: ClientId,
    /// The event artifact.
    pub artifact: String,
    /// The UTC day the agent made it (`YYYY-MM-DD`).
    pub day: String,
    /// The stream: the agent's run of the artifact.
    pub stream: u64,
    /// Its number in the stream.
    pub seq: u64,
}

/// True if `day` is a real date written `YYYY-MM-DD` (years 1970..=9999).
pub fn valid_day(day: &str) -> bool {
    let b = day.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = &day[r];
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1970..=9999).contains(&y) && (1..=days).contains(&d)
}

/// One entry of the client event table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Whose clients: a label, or [`ALL_CLIENTS`].
    pub label: String,
    /// The event artifact.
    pub artifact: String,
    /// Its parameters, validated, defaults filled (and for a custom artifact its compiled
    /// definition in [`crate::artifacts::DEFINITION_PARAM`]).
    pub params: BTreeMap<String, String>,
}

/// The entries of `table` a client with `labels` runs: at most one per artifact (its first
/// matching label's entry, else the one for all clients), in artifact order, at most
/// [`PER_CLIENT_MAX`] (the rest are left out, and counted in the second value).
pub fn for_client<'a>(
    table: &'a [Assignment],
    labels: &BTreeSet<String>,
) -> (Vec<&'a Assignment>, usize) {
    // A label's entry beats the one for all; of two labels', the first label in order: the
    // entry of the smallest rank wins.
    fn rank(a: &Assignment) -> (bool, &str) {
        (a.label == ALL_CLIENTS, &a.label)
    }
    let mut chosen: BTreeMap<&str, &Assignment> = BTreeMap::new();
    for a in table {
        if a.label != ALL_CLIENTS && !labels.contains(&a.label) {
            continue;
        }
        let have = chosen.entry(&a.artifact).or_insert(a);
        if rank(a) < rank(have) {
            *have = a;
        }
    }
    let total = chosen.len();
    let out: Vec<&Assignment> = chosen.into_values().take(PER_CLIENT_MAX).collect();
    let left = total - out.len();
    (out, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(label: &str, artifact: &str, v: &str) -> Assignment {
        Assignment {
            label: label.into(),
            artifact: artifact.into(),
            params: [("v".to_owned(), v.to_owned())].into(),
        }
    }

    #[test]
    fn days_are_real_dates() {
        for ok in ["2026-12-06", "2024-02-29", "1970-01-01", "9999-12-31"] {
            assert!(valid_day(ok), "{ok}");
        }
        for bad in [
            "2026-12-6",
            "2025-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-04-31",
            "1969-12-31",
            "2026/12/06",
            "../../etc",
            "+026-12-06",
            "",
        ] {
            assert!(!valid_day(bad), "{bad}");
        }
    }

    #[test]
    fn a_client_runs_each_artifact_once_its_labels_entry_first() {
        let table = vec![
            a(ALL_CLIENTS, "E.One", "all"),
            a("web", "E.One", "web"),
            a("db", "E.One", "db"),
            a("db", "E.Two", "db"),
            a("mail", "E.Three", "mail"),
        ];
        let labels = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>();
        let (got, left) = for_client(&table, &labels(&[]));
        assert_eq!(left, 0);
        assert_eq!(got, vec![&table[0]]);
        let (got, _) = for_client(&table, &labels(&["web", "db"]));
        // "db" < "web": the first label in order wins, and beats the entry for all.
        assert_eq!(got, vec![&table[2], &table[3]]);
        let (got, _) = for_client(&table, &labels(&["web"]));
        assert_eq!(got, vec![&table[1]]);
    }

    #[test]
    fn a_client_runs_at_most_the_bound() {
        let table: Vec<Assignment> = (0..PER_CLIENT_MAX + 3)
            .map(|i| a(ALL_CLIENTS, &format!("E.A{i:03}"), ""))
            .collect();
        let (got, left) = for_client(&table, &BTreeSet::new());
        assert_eq!((got.len(), left), (PER_CLIENT_MAX, 3));
    }
}
