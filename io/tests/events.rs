//! Client event monitoring as a user runs it (docs/events.md): real `talon` processes on
//! loopback, real process starts on this machine.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};

mod common;
use common::*;

/// The process starts stored for a client, by pid.
fn process_starts(d: &Deployment, id: &str) -> BTreeMap<u64, serde_json::Value> {
    d.api(&["events", "show", id, "Linux.Events.ProcessStarts", "--json"])
        .lines()
        .map(json)
        .map(|v| (v["pid"].as_u64().unwrap(), v))
        .collect()
}

#[test]
fn process_starts_and_test_events_reach_the_day_files_once_through_an_agent_restart() {
    let d = Deployment::new();
    let (_master, client, id) = d.master_and_client();

    // Refused, naming why, before anything is stored.
    let err = d.api_refused(&["events", "set", "Linux.Sys.Pslist"]);
    assert!(err.contains("not an event artifact"), "{err}");
    let err = d.api_refused(&["collect", &id, "Generic.Events.Test"]);
    assert!(err.contains("is an event artifact"), "{err}");
    let err = d.api_refused(&["events", "set", "Generic.Events.Test", "--param", "rate=-1"]);
    assert!(err.contains("rate"), "{err}");
    let err = d.api_refused(&["events", "set", "Generic.Events.Test", "--label", "no way"]);
    assert!(err.contains("label"), "{err}");
    let err = d.api_refused(&["events", "unset", "Generic.Events.Test"]);
    assert!(err.contains("not set"), "{err}");

    d.api(&["events", "set", "Generic.Events.Test", "--param", "rate=20"]);
    d.api(&["events", "set", "Linux.Events.ProcessStarts"]);
    let table = json(&d.api(&["events", "list", "--json"]));
    let names: BTreeSet<&str> = table
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["artifact"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["Generic.Events.Test", "Linux.Events.ProcessStarts"])
    );
    assert_eq!(table[0]["params"]["rate"], "20", "{table}");

    // The connected agent was told within seconds: its events arrive.
    d.wait_until("test events are stored", || {
        test_events_exactly_once(&d, &id).len() >= 40
    });

    // A process started on this machine arrives as a process start.
    let mut child = std::process::Command::new("sleep")
        .arg("7.25")
        .spawn()
        .unwrap();
    let pid = u64::from(child.id());
    d.wait_until("the process start is stored", || {
        process_starts(&d, &id).contains_key(&pid)
    });
    let start = &process_starts(&d, &id)[&pid];
    assert_eq!(start["name"], "sleep", "{start}");
    assert_eq!(start["cmdline"], "sleep 7.25", "{start}");
    child.kill().unwrap();
    child.wait().unwrap();

    // The agent is killed and started again: a new stream; what the old one stored stays, once.
    let before = test_events_exactly_once(&d, &id);
    let old_streams: BTreeSet<u64> = before.iter().map(|(s, _)| *s).collect();
    drop(client);
    let _client = d.start_client(&d.path("client.config.yaml"), "c1");
    d.wait_until("the restarted agent's events are stored", || {
        test_events_exactly_once(&d, &id)
            .iter()
            .filter(|(s, _)| !old_streams.contains(s))
            .count()
            >= 20
    });
    // No event twice, no gap within a stream (nothing was lost on the way), the old ones kept.
    let after = test_events_exactly_once(&d, &id);
    assert!(after.is_superset(&before));

    // Text output: the time, then the row.
    let text = d.api(&[
        "events",
        "show",
        &id,
        "Generic.Events.Test",
        "--since",
        "1h",
    ]);
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("Z  {") && first.contains("\"n\":"),
        "{first}"
    );

    // Unset: the table is empty again, the agent stops the artifact, the audit log has both.
    d.api(&["events", "unset", "Generic.Events.Test"]);
    d.api(&["events", "unset", "Linux.Events.ProcessStarts"]);
    assert_eq!(
        json(&d.api(&["events", "list", "--json"])),
        serde_json::json!([])
    );
    d.wait_until("the agent stops the artifacts", || {
        let log = std::fs::read_to_string(d.path("c1.log")).unwrap_or_default();
        log.matches("event artifact stopped").count() >= 2
    });
    let audit = d.api(&["audit", "list", "--json"]);
    assert_eq!(audit.matches("events-set").count(), 2, "{audit}");
    assert_eq!(audit.matches("events-unset").count(), 2, "{audit}");
}
