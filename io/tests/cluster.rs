//! Talon as a multi-frontend cluster: a master and two minions sharing one data directory, a real
//! agent and a pool of virtual ones, as separate `talon` processes on loopback.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

mod common;
use common::*;

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const POOL: usize = 50;
const CLIENTS: usize = POOL + 1;

fn connected_by_node(d: &Deployment) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in d.clients().iter().filter(|c| c["connected"] == true) {
        *m.entry(c["node"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    m
}

fn show(d: &Deployment, hunt: &str) -> serde_json::Value {
    json(&d.api(&["hunt", "show", hunt, "--json"]))
}

/// Waits for a row hunt to complete on every client; stats and export hold every row exactly once.
fn assert_rows_exactly_once(d: &Deployment, hunt: &str, rows: u64) {
    let s = wait_complete(d, hunt, CLIENTS);
    let all = CLIENTS as u64;
    assert_eq!(
        (
            s["scheduled"].as_u64(),
            s["completed"].as_u64(),
            s["rows"].as_u64()
        ),
        (Some(all), Some(all), Some(all * rows)),
        "{s}"
    );
    assert_eq!(d.hunt_export(hunt).len() as u64, all * rows);
}

fn rows_hunt(d: &Deployment, count: u64) -> String {
    json(&d.api(&[
        "hunt",
        "create",
        "Generic.Test.Rows",
        "--param",
        &format!("count={count}"),
        "--param",
        "size=4",
        "--json",
    ]))["hunt_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn wait_complete(d: &Deployment, hunt: &str, n: usize) -> serde_json::Value {
    d.wait_until(&format!("hunt {hunt} completes on {n} clients"), || {
        let s = show(d, hunt)["stats"].clone();
        s["completed"].as_u64().unwrap_or(0) + s["errors"].as_u64().unwrap_or(0) >= n as u64
    });
    std::thread::sleep(Duration::from_millis(300)); // Nothing more may arrive.
    show(d, hunt)["stats"].clone()
}

#[test]
fn hunts_span_master_and_minions_and_survive_minion_and_master_kills() {
    let d = Deployment::new();
    let (m1, p1) = d.add_minion();
    let (m2, p2) = d.add_minion();
    let client_cfg = std::fs::read_to_string(d.path("client.config.yaml")).unwrap();
    assert!(
        client_cfg.contains(&format!("{p1}/")) && client_cfg.contains(&format!("{p2}/")),
        "every frontend's URL is in the client config: {client_cfg}"
    );

    // Minions and clients first: a minion serves before its master exists and catches up later.
    let minion1 = d.start_minion(&m1);
    let _minion2 = d.start_minion(&m2);
    let _real = d.start_client(&d.path("client.config.yaml"), "real");
    let _pool = d.start_pool(POOL, "pool");
    std::thread::sleep(Duration::from_secs(1));
    let master = d.start_master();
    d.wait_until("every client is connected and known to the master", || {
        connected_by_node(&d).values().sum::<usize>() == CLIENTS
    });
    let by_node = connected_by_node(&d);
    eprintln!("clients per node: {by_node:?}");
    for m in [&m1, &m2] {
        assert!(by_node.get(m).is_some_and(|n| *n > 0), "{by_node:?}");
    }

    // 1. A hunt reaches every client on every node; exact stats; every client's row once.
    let info = d
        .api(&["hunt", "create", "Generic.Client.Info"])
        .trim()
        .to_owned();
    let s = wait_complete(&d, &info, CLIENTS);
    assert_eq!(
        (
            s["scheduled"].as_u64(),
            s["completed"].as_u64(),
            s["errors"].as_u64(),
            s["rows"].as_u64()
        ),
        (
            Some(CLIENTS as u64),
            Some(CLIENTS as u64),
            Some(0),
            Some(CLIENTS as u64)
        ),
        "{s}"
    );
    let clients: BTreeSet<String> = d.hunt_export(&info).into_iter().map(|(c, _)| c).collect();
    assert_eq!(clients.len(), CLIENTS);

    // A collection from a client held by a minion: the task goes to its node, the result comes back.
    let on_minion = d
        .clients()
        .into_iter()
        .find(|c| c["node"] == m2.as_str() && c["connected"] == true)
        .expect("a client on minion 2");
    let id = on_minion["client_id"].as_str().unwrap();
    let f = json(&d.api(&["collect", id, "Generic.Client.Info", "--wait", "--json"]));
    assert_eq!(
        (f["state"].as_str(), f["rows"].as_u64()),
        (Some("completed"), Some(1)),
        "{f}"
    );
    let row = json(
        d.api(&["flow", "results", id, f["flow_id"].as_str().unwrap()])
            .trim(),
    );
    assert_eq!(
        (f["client_id"].as_str(), &row["os"]),
        (Some(id), &json!("linux")),
        "{row}"
    );

    // 2. A minion is SIGKILLed while a row hunt runs: its clients fail over, rows stay exact.
    const ROWS: u64 = 20_000;
    let big = rows_hunt(&d, ROWS);
    std::thread::sleep(Duration::from_millis(300));
    drop(minion1);
    eprintln!("minion killed at {}", show(&d, &big)["stats"]);
    assert_rows_exactly_once(&d, &big, ROWS);
    d.wait_until(
        "the killed minion's clients are connected elsewhere",
        || {
            let by_node = connected_by_node(&d);
            !by_node.contains_key(&m1) && by_node.values().sum::<usize>() == CLIENTS
        },
    );

    // 3. The master is SIGKILLed mid-hunt and restarted: stats exact, replicated events replayed.
    let third = rows_hunt(&d, ROWS);
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("master killed at {}", show(&d, &third)["stats"]);
    drop(master);
    std::thread::sleep(Duration::from_millis(500));
    let _master = d.start_master();
    assert_rows_exactly_once(&d, &third, ROWS);
    // Earlier hunts' stats were durable across the kill.
    let s = show(&d, &big)["stats"].clone();
    assert_eq!(s["rows"].as_u64(), Some(CLIENTS as u64 * ROWS), "{s}");

    // 4. The killed minion restarts: it rejoins and serves again.
    let _minion1 = d.start_minion(&m1);
    let log = || std::fs::read_to_string(d.path(&format!("{m1}.log"))).unwrap_or_default();
    d.wait_until("the restarted minion reconnects to the master", || {
        log()
            .matches("replication stream to the master is up")
            .count()
            >= 2
    });
}

#[test]
fn a_minion_refuses_a_node_name_not_in_the_config() {
    let d = Deployment::new();
    let out = run(&[
        "-c",
        &d.s("server.config.yaml"),
        "frontend",
        "--minion",
        "--node",
        "127.0.0.1-1",
        "--local-dir",
        &d.s("local-x"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in ExtraFrontends"), "{err}");
}

/// Client events through a minion's SIGKILL (docs/events.md, "Forwarding: exactly once"): the
/// minion's clients fail over to the master and resend what the minion had not settled; every
/// event is stored once, none is lost — also after the killed minion restarts and copies its
/// buffer to the volume.
#[test]
fn events_are_stored_exactly_once_through_a_minion_sigkill() {
    let d = Deployment::new();
    let (m1, _) = d.add_minion();
    let _master = d.start_master();
    let minion = d.start_minion(&m1);
    let _pool = d.start_pool(8, "pool");
    d.wait_until("the pool connects, some of it to the minion", || {
        let by = connected_by_node(&d);
        by.values().sum::<usize>() == 8 && by.get(&m1).is_some_and(|n| *n > 0)
    });
    let on_minion: Vec<String> = d
        .clients()
        .into_iter()
        .filter(|c| c["node"] == m1.as_str() && c["connected"] == true)
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect();
    d.api(&["events", "set", "Generic.Events.Test", "--param", "rate=50"]);
    d.wait_until("the minion's clients' events are stored", || {
        on_minion
            .iter()
            .all(|id| test_events_exactly_once(&d, id).len() >= 100)
    });
    let before: BTreeMap<&String, BTreeSet<(u64, u64)>> = on_minion
        .iter()
        .map(|id| (id, test_events_exactly_once(&d, id)))
        .collect();
    drop(minion); // SIGKILL
    d.wait_until(
        "the master sees the minion down, its backlog unknown",
        || {
            json(&d.api(&["cluster", "status", "--json"]))["minions"]
                .as_array()
                .is_some_and(|ms| {
                    ms.iter().any(|m| {
                        m["node"] == m1.as_str()
                            && m["connected"] == false
                            && m["backlog_events"].is_null()
                    })
                })
        },
    );
    d.wait_until("the minion's clients fail over and go on", || {
        on_minion
            .iter()
            .all(|id| test_events_exactly_once(&d, id).len() >= before[id].len() + 200)
    });
    for id in &on_minion {
        assert!(test_events_exactly_once(&d, id).is_superset(&before[id]));
    }
    // The killed minion restarts: its journal's batches reach the volume too, stored once.
    let _minion = d.start_minion(&m1);
    d.wait_until("the restarted minion is connected to the master", || {
        json(&d.api(&["cluster", "status", "--json"]))["minions"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["connected"] == true))
    });
    std::thread::sleep(Duration::from_secs(2)); // Its replayed buffer is flushed by now.
    for id in &on_minion {
        test_events_exactly_once(&d, id);
    }

    // A search across clients finds every client's events, each once; a condition picks rows.
    let all: Vec<String> = d
        .clients()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect();
    let found = d.api(&[
        "events",
        "search",
        "Generic.Events.Test",
        "--since",
        "1h",
        "--where",
        "n=7",
        "--json",
    ]);
    let mut rows: Vec<(String, u64)> = found
        .lines()
        .map(json)
        .map(|v| {
            assert_eq!(v["n"], 7, "{v}");
            (
                v["_client"].as_str().unwrap().to_owned(),
                v["_stream"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    let before = rows.len();
    rows.dedup();
    assert_eq!(rows.len(), before, "an event found twice: {found}");
    let clients: BTreeSet<&String> = rows.iter().map(|(c, _)| c).collect();
    assert_eq!(clients, all.iter().collect(), "{found}");
    // The limit stops the stream, and says so.
    let (out, err) = d.api_with_stderr(&[
        "events",
        "search",
        "Generic.Events.Test",
        "--since",
        "1h",
        "--limit",
        "5",
    ]);
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(err.contains("--limit 5"), "{err}");
    let err = d.api_refused(&[
        "events",
        "search",
        "Generic.Events.Test",
        "--since",
        "1h",
        "--where",
        "n 7=1",
    ]);
    assert!(err.contains("COLUMN=VALUE"), "{err}");
    let none = d.api(&[
        "events",
        "search",
        "Generic.Events.Test",
        "--since",
        "1h",
        "--label",
        "nobody",
    ]);
    assert!(none.contains("no events match"), "{none}");
}
