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
fn process_starts_file_changes_sockets_and_test_events_reach_the_day_files_once_through_an_agent_restart()
 {
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

    // Files changed under a watched directory, and sockets opened on this machine.
    let watched = d.path("watched");
    std::fs::create_dir(&watched).unwrap();
    let paths = format!("paths={}", watched.display());
    d.api(&[
        "events",
        "set",
        "Linux.Events.FileChanges",
        "--param",
        &paths,
        "--param",
        "recursive=true",
    ]);
    d.api(&["events", "set", "Linux.Events.Sockets"]);
    let changes = || -> Vec<(String, String)> {
        d.api(&["events", "show", &id, "Linux.Events.FileChanges", "--json"])
            .lines()
            .map(json)
            .map(|v| {
                let path = v["path"].as_str().unwrap();
                let rel = path.strip_prefix(watched.to_str().unwrap()).unwrap();
                (rel.to_owned(), v["action"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    // The agent watches from when it is told: a file made until a change is seen.
    d.wait_until("a file change is stored", || {
        std::fs::write(watched.join("probe"), "x").unwrap();
        !changes().is_empty()
    });
    std::fs::create_dir(watched.join("sub")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::write(watched.join("sub/new.txt"), "hello").unwrap();
    std::fs::rename(watched.join("sub/new.txt"), watched.join("moved.txt")).unwrap();
    std::fs::remove_file(watched.join("moved.txt")).unwrap();
    let want = [
        ("/sub".to_owned(), "CREATED".to_owned()),
        ("/sub/new.txt".into(), "CREATED".into()),
        ("/sub/new.txt".into(), "MOVED_FROM".into()),
        ("/moved.txt".into(), "MOVED_TO".into()),
        ("/moved.txt".into(), "DELETED".into()),
    ];
    d.wait_until("the file changes are stored, in order", || {
        let got = changes();
        let mut at = 0;
        for c in &got {
            if at < want.len() && *c == want[at] {
                at += 1;
            }
        }
        at == want.len()
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sockets = |action: &str| -> usize {
        d.api(&["events", "show", &id, "Linux.Events.Sockets", "--json"])
            .lines()
            .map(json)
            .filter(|v| v["action"] == action && v["local_port"] == port)
            .count()
    };
    d.wait_until("the listening socket is stored", || sockets("listen") == 1);
    let _conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_accepted, _) = listener.accept().unwrap();
    d.wait_until("the accepted connection is stored", || {
        sockets("accept") == 1
    });
    d.api(&["events", "unset", "Linux.Events.FileChanges"]);
    d.api(&["events", "unset", "Linux.Events.Sockets"]);

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
    assert_eq!(audit.matches("events-set").count(), 4, "{audit}");
    assert_eq!(audit.matches("events-unset").count(), 4, "{audit}");
}

/// Stored test events of a client, per stream: each event's number and the count of events its
/// stream had dropped before its batch; asserts none is stored twice.
fn stored_test_events(d: &Deployment, id: &str) -> BTreeMap<u64, BTreeMap<u64, u64>> {
    let mut by_stream: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    for l in d
        .api(&["events", "show", id, "Generic.Events.Test", "--json"])
        .lines()
    {
        let v = json(l);
        let (s, n) = (v["_stream"].as_u64().unwrap(), v["n"].as_u64().unwrap());
        let dropped = v["_dropped"].as_u64().unwrap();
        let again = by_stream.entry(s).or_default().insert(n, dropped);
        assert!(
            again.is_none(),
            "{id}: event {n} of stream {s} is stored twice"
        );
    }
    by_stream
}

/// Each event of a stream up to its newest is stored, or counted as dropped by the agent: the
/// numbers missing are exactly the count the newest batch carries.
fn nothing_lost_silently(stream: u64, events: &BTreeMap<u64, u64>) -> bool {
    let (&newest, &dropped) = events.last_key_value().unwrap();
    let missing = newest + 1 - events.len() as u64;
    assert!(
        missing >= dropped,
        "stream {stream}: {dropped} events reported dropped, but only {missing} are missing"
    );
    missing == dropped
}

/// While no frontend is up the agent buffers on its disk, to its bound, and counts what it drops
/// beyond (the count reaches storage and `events show`); killed and started again, it sends what
/// it had buffered under the old stream, once, and deletes it from its disk once stored.
#[test]
fn the_agent_buffers_on_disk_through_a_restart_and_counts_what_it_drops() {
    let d = Deployment::new();
    // The smallest bound the agent takes (4 MiB): filled in seconds at ~1 MB/s.
    let config = std::fs::read_to_string(d.path("client.config.yaml")).unwrap();
    let default = "events_buffer_bytes: 67108864";
    assert!(config.contains(default), "{config}");
    let small = config.replacen(default, "events_buffer_bytes: 4194304", 1);
    std::fs::write(d.path("small.config.yaml"), small).unwrap();
    let master = d.start_master();
    let client = d.start_client(&d.path("small.config.yaml"), "c1");
    d.wait_until("the client enrols", || d.clients().len() == 1);
    let id = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    let buffer = d.path("c1.wb.events");
    d.api(&[
        "events",
        "set",
        "Generic.Events.Test",
        "--param",
        "rate=100",
        "--param",
        "payload_bytes=10000",
    ]);
    d.wait_until("test events are stored", || {
        stored_test_events(&d, &id).values().any(|s| s.len() >= 100)
    });

    // No frontend: the buffer fills to its bound, then the agent drops and says so.
    drop(master);
    let log = || std::fs::read_to_string(d.path("c1.log")).unwrap_or_default();
    d.wait_until("the agent drops events at its bound", || {
        log().contains("events are dropped")
    });
    let on_disk: u64 = std::fs::read_dir(&buffer)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 4 << 20, "the buffer holds {on_disk} bytes");
    let master = d.start_master();
    d.wait_until("the count of dropped events is stored", || {
        stored_test_events(&d, &id)
            .values()
            .any(|s| s.values().any(|&dropped| dropped > 0))
    });
    let (out, err) = d.api_with_stderr(&["events", "show", &id, "Generic.Events.Test"]);
    assert!(!out.is_empty());
    assert!(err.contains("the agent dropped"), "{err}");
    // (Polled: a read can fall between two batches stored at once, the later one first.)
    d.wait_until("every missing event is counted as dropped", || {
        stored_test_events(&d, &id)
            .iter()
            .all(|(s, events)| nothing_lost_silently(*s, events))
    });

    // No frontend again, and the agent is killed with batches only on its disk.
    let streams: BTreeSet<u64> = stored_test_events(&d, &id).keys().copied().collect();
    assert_eq!(streams.len(), 1);
    let old = *streams.first().unwrap();
    let newest_before = *stored_test_events(&d, &id)[&old]
        .last_key_value()
        .unwrap()
        .0;
    drop(master);
    std::thread::sleep(std::time::Duration::from_secs(3));
    drop(client);
    let old_files = || {
        std::fs::read_dir(&buffer)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with(&format!("{old:016x}-"))
            })
            .count()
    };
    assert!(old_files() > 0, "the old stream's batches are on disk");
    // The master restarts keeping one day of events: a day long past (planted) is deleted, today
    // stays.
    let cfg = std::fs::read_to_string(d.path("server.config.yaml")).unwrap();
    assert!(cfg.contains("\nDatastore:\n"), "{cfg}");
    let cfg = cfg.replacen(
        "\nDatastore:\n",
        "\nDatastore:\n  events_retention_days: 1\n",
        1,
    );
    std::fs::write(d.path("server.config.yaml"), cfg).unwrap();
    let past = d.path("shared/filestore/segments/events/2000-01-01");
    std::fs::create_dir_all(&past).unwrap();
    for f in ["w-000001.data", "w-000001.index"] {
        std::fs::write(past.join(f), "old").unwrap();
    }
    let _master = d.start_master();
    d.wait_until("the day past retention is deleted", || {
        std::fs::read_dir(&past).map_or(true, |mut e| e.next().is_none())
    });
    assert!(
        std::fs::read_to_string(d.path("master.log"))
            .unwrap()
            .contains("client event days past retention deleted")
    );
    let _client = d.start_client(&d.path("small.config.yaml"), "c1");
    d.wait_until("what the old stream buffered is stored", || {
        let all = stored_test_events(&d, &id);
        all.len() == 2 && old_files() == 0
    });
    let all = stored_test_events(&d, &id);
    let newest_after = *all[&old].last_key_value().unwrap().0;
    assert!(
        newest_after > newest_before + 100,
        "events made while no frontend was up arrive after the restart ({newest_before} → {newest_after})"
    );
    d.wait_until("every missing event is counted as dropped", || {
        stored_test_events(&d, &id)
            .iter()
            .all(|(s, events)| nothing_lost_silently(*s, events))
    });
}
