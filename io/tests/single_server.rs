//! Talon in single-server mode as a user runs it: real `talon` processes on loopback.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

mod common;
use common::*;

#[test]
fn collections_work_end_to_end_and_survive_a_master_sigkill() {
    let d = Deployment::new();
    let master = d.start_master();
    let _client = d.start_client(&d.path("client.config.yaml"), "c1");
    d.wait_until("the client enrols", || d.clients().len() == 1);
    let c = d.clients()[0].clone();
    assert_eq!(c["connected"], true);
    assert_eq!(c["os"], "linux");
    let id = c["client_id"].as_str().unwrap().to_owned();

    let info = json(&d.api(&["collect", &id, "Generic.Client.Info", "--wait", "--json"]));
    assert_eq!(
        (info["state"].as_str(), info["rows"].as_u64()),
        (Some("completed"), Some(1))
    );
    let rows = d.api(&["flow", "results", &id, info["flow_id"].as_str().unwrap()]);
    assert_eq!(json(rows.trim())["os"], "linux");

    // FileFinder with upload=true: the file is rebuilt in the filestore, byte for byte.
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect(); // > one 512 KiB chunk
    std::fs::write(d.path("evidence.bin"), &payload).unwrap();
    let glob = format!("{}/evidence.*", d.dir.path().display());
    let ff = json(&d.api(&[
        "collect",
        &id,
        "Generic.Forensic.FileFinder",
        "--param",
        &format!("glob={glob}"),
        "--param",
        "upload=true",
        "--wait",
        "--json",
    ]));
    assert_eq!(
        (
            ff["state"].as_str(),
            ff["rows"].as_u64(),
            ff["uploaded_bytes"].as_u64()
        ),
        (Some("completed"), Some(1), Some(700_000)),
        "{ff}"
    );
    let uploads = d.path(&format!(
        "shared/filestore/clients/{id}/flows/{}/uploads",
        ff["flow_id"].as_str().unwrap()
    ));
    let committed = || -> Vec<PathBuf> {
        let Ok(dir) = std::fs::read_dir(&uploads) else {
            return vec![];
        };
        dir.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.to_string_lossy().ends_with(".partial"))
            .collect()
    };
    d.wait_until("the upload is reassembled", || committed().len() == 1);
    let stored = committed().remove(0);
    assert!(
        stored
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("00000-%2F"),
        "{stored:?}"
    );
    assert_eq!(std::fs::read(&stored).unwrap(), payload);

    // A big flow; the master is killed (SIGKILL) while it runs, then restarted.
    const N: u64 = 200_000;
    let f = json(&d.api(&[
        "collect",
        &id,
        "Generic.Test.Rows",
        "--param",
        &format!("count={N}"),
        "--param",
        "size=8",
        "--json",
    ]));
    let flow = f["flow_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(300));
    drop(master);
    let stored_at_kill = std::fs::read_dir(d.path(&format!(
        "shared/filestore/clients/{id}/flows/{flow}/messages"
    )))
    .map(|r| r.count())
    .unwrap_or(0);
    eprintln!(
        "master killed with {stored_at_kill} of {} messages stored",
        N / 1000 + 1
    );
    let _master = d.start_master();
    let mut last = serde_json::Value::Null;
    d.wait_until("the flow completes after the restart", || {
        last = json(&d.api(&["flow", "show", &id, &flow, "--json"]));
        last["state"] == "completed"
    });
    assert_eq!(last["rows"].as_u64(), Some(N), "{last}");
    // Every row exactly once in the export.
    let out = d.api(&["flow", "results", &id, &flow]);
    let seen: BTreeSet<u64> = out
        .lines()
        .map(|l| json(l)["row"].as_u64().unwrap())
        .collect();
    assert_eq!(out.lines().count() as u64, N);
    assert_eq!(seen.len() as u64, N);
    // The client is still known after the restart (its enrolment was durable).
    d.wait_until("the client reconnects", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
}

#[test]
fn foreign_agents_and_api_users_are_refused_and_bad_requests_rejected() {
    let d = Deployment::new();
    let _master = d.start_master();
    let other = Deployment::new();

    // An agent of another deployment (it pins the other CA) pointed at this master.
    let cfg = std::fs::read_to_string(other.path("client.config.yaml")).unwrap();
    let ours = std::fs::read_to_string(d.path("client.config.yaml")).unwrap();
    let our_url = ours.lines().find(|l| l.contains("https://")).unwrap();
    let their_url = cfg.lines().find(|l| l.contains("https://")).unwrap();
    let foreign = d.path("foreign.client.yaml");
    std::fs::write(&foreign, cfg.replace(their_url, our_url)).unwrap();
    let _agent = d.start_client(&foreign, "foreign");
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.clients().is_empty(), "a foreign agent must not enrol");
    let log = std::fs::read_to_string(d.path("foreign.log")).unwrap();
    assert!(log.contains("connection failed"), "{log}");

    // An API user of another deployment.
    let api = std::fs::read_to_string(other.path("api.yaml")).unwrap();
    let ours = std::fs::read_to_string(d.path("api.yaml")).unwrap();
    let conn = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("api_connection_string"))
            .unwrap()
            .to_owned()
    };
    let foreign_api = d.path("foreign.api.yaml");
    std::fs::write(&foreign_api, api.replace(&conn(&api), &conn(&ours))).unwrap();
    let out = run(&[
        "--api-config",
        foreign_api.to_str().unwrap(),
        "clients",
        "search",
        "all",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the master's API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Unknown artifacts, parameters and clients are refused before anything is scheduled.
    for (args, want) in [
        (
            vec!["collect", "C.0123456789abcdef", "No.Such"],
            "unknown artifact",
        ),
        (
            vec![
                "collect",
                "C.0123456789abcdef",
                "Generic.Test.Rows",
                "--param",
                "rows=1",
            ],
            "no parameter",
        ),
        (
            vec!["collect", "C.0123456789abcdef", "Generic.Test.Rows"],
            "no client",
        ),
        (vec!["clients", "search", "hostname:x"], "bad search query"),
    ] {
        let mut a = vec![
            "--api-config",
            d.path("api.yaml").to_str().unwrap().to_owned().leak() as &str,
        ];
        a.extend(args);
        let out = run(&a);
        assert!(!out.status.success(), "{a:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{a:?}: {err}");
    }
}

#[test]
fn hunts_have_exact_stats_across_a_master_sigkill_and_late_clients() {
    let d = Deployment::new();
    let master = d.start_master();
    let _p1 = d.start_pool(20, "pool1");
    d.wait_until("20 clients connect", || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count()
            == 20
    });

    // A hunt restricted by label, and a big one; the master dies while the big one runs.
    let web = d.clients()[3]["client_id"].as_str().unwrap().to_owned();
    d.api(&["label", "add", &web, "web"]);
    let small = d
        .api(&["hunt", "create", "Generic.Client.Info", "--label", "web"])
        .trim()
        .to_owned();
    let big = json(&d.api(&[
        "hunt",
        "create",
        "Generic.Test.Rows",
        "--param",
        "count=5000",
        "--param",
        "size=4",
        "--json",
    ]));
    assert_eq!(big["state"], "running");
    let big = big["hunt_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(200));
    drop(master);
    let _master = d.start_master();
    let show = |h: &str| json(&d.api(&["hunt", "show", h, "--json"]));
    d.wait_until("the big hunt completes on 20 clients", || {
        show(&big)["stats"]["completed"] == 20
    });
    let stats = show(&big)["stats"].clone();
    assert_eq!(
        (
            stats["scheduled"].as_u64(),
            stats["rows"].as_u64(),
            stats["errors"].as_u64()
        ),
        (Some(20), Some(100_000), Some(0)),
        "{stats}"
    );
    let s = show(&small)["stats"].clone();
    assert_eq!(
        (s["scheduled"].as_u64(), s["completed"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );

    // Late clients join the running hunt; nobody is scheduled twice.
    let _p2 = d.start_pool(5, "pool2");
    d.wait_until("late clients complete", || {
        show(&big)["stats"]["completed"] == 25
    });
    std::thread::sleep(Duration::from_millis(500));
    let stats = show(&big)["stats"].clone();
    assert_eq!(
        (stats["scheduled"].as_u64(), stats["rows"].as_u64()),
        (Some(25), Some(125_000)),
        "{stats}"
    );

    // The export holds every row exactly once, per client.
    let out = d.api(&["hunt", "results", &big]);
    let pairs: BTreeSet<(String, u64)> = out
        .lines()
        .map(|l| {
            let v = json(l);
            (
                v["client_id"].as_str().unwrap().to_owned(),
                v["row"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!((out.lines().count(), pairs.len()), (125_000, 125_000));
    let csv = d.api(&["hunt", "results", &small, "--format", "csv"]);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.starts_with("client_id,flow_id,"), "{csv}");
}

#[test]
fn a_collection_for_an_offline_client_survives_a_master_restart() {
    let d = Deployment::new();
    let master = d.start_master();
    let client = d.start_client(&d.path("client.config.yaml"), "c1");
    d.wait_until("the client enrols", || {
        d.clients().first().is_some_and(|c| c["connected"] == true)
    });
    let id = d.clients()[0]["client_id"].as_str().unwrap().to_owned();
    drop(client);
    d.wait_until("the client is seen gone", || {
        d.clients()[0]["connected"] == false
    });

    // Scheduled while the client is offline; the master dies before it can deliver the task.
    let f = json(&d.api(&["collect", &id, "Generic.Client.Info", "--json"]));
    assert_eq!(f["state"], "running", "{f}");
    let flow = f["flow_id"].as_str().unwrap().to_owned();
    drop(master);
    let _master = d.start_master();
    let _client = d.start_client(&d.path("client.config.yaml"), "c1");
    let mut last = serde_json::Value::Null;
    d.wait_until(
        "the task is delivered after the restart and completes",
        || {
            last = json(&d.api(&["flow", "show", &id, &flow, "--json"]));
            last["state"] == "completed"
        },
    );
    assert_eq!(last["rows"].as_u64(), Some(1), "{last}");
}

/// A hunt over more clients than one scheduling batch (1,024) reaches each of them exactly once,
/// batch after batch, with exact stats.
#[test]
fn a_hunt_over_more_clients_than_a_scheduling_batch_reaches_each_once() {
    const N: usize = 1100;
    let d = Deployment::new();
    let _master = d.start_master();
    let _pool = d.start_pool(N, "pool");
    d.wait_until_within("1,100 clients connect", Duration::from_secs(300), || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count()
            == N
    });
    let hunt = d
        .api(&["hunt", "create", "Generic.Client.Info"])
        .trim()
        .to_owned();
    let show = || json(&d.api(&["hunt", "show", &hunt, "--json"]))["stats"].clone();
    d.wait_until_within("the hunt completes", Duration::from_secs(300), || {
        show()["completed"] == N as u64
    });
    let s = show();
    assert_eq!(
        (
            s["scheduled"].as_u64(),
            s["errors"].as_u64(),
            s["rows"].as_u64()
        ),
        (Some(N as u64), Some(0), Some(N as u64)),
        "{s}"
    );
    let clients: std::collections::BTreeSet<String> =
        d.hunt_export(&hunt).into_iter().map(|(c, _)| c).collect();
    assert_eq!(clients.len(), N);
}

/// What an analyst's script needs beyond collecting: a client's flows newest first, a flow's
/// uploads and their bytes (several MiB, byte for byte, SHA-256 as recorded), watching a flow and a
/// hunt to their end without polling, and an audit log naming the API user for every change.
#[test]
fn flows_are_listed_uploads_downloaded_watches_end_and_changes_audited() {
    use sha2::{Digest, Sha256};
    let d = Deployment::new();
    let (_master, _client, id) = d.master_and_client();
    d.api(&["label", "add", &id, "evidence"]);

    let first = json(&d.api(&["collect", &id, "Generic.Client.Info", "--wait", "--json"]));
    // Several MiB, not a multiple of the download's chunk, every byte position distinct mod 251.
    let payload: Vec<u8> = (0..(5 << 20) + 12_345u32)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(d.path("big.bin"), &payload).unwrap();
    let glob = format!("{}/big.*", d.dir.path().display());
    let ff = json(&d.api(&[
        "collect",
        &id,
        "Generic.Forensic.FileFinder",
        "--param",
        &format!("glob={glob}"),
        "--param",
        "upload=true",
        "--json",
    ]));
    let flow = ff["flow_id"].as_str().unwrap().to_owned();

    // The watch prints one JSON object per change and ends once the flow has finished.
    let watched = d.api(&["flow", "watch", &id, &flow, "--json"]);
    let states: Vec<serde_json::Value> = watched.lines().map(json).collect();
    let last = states.last().unwrap();
    assert_eq!(last["state"], "completed", "{watched}");
    assert_eq!(last["uploaded_bytes"].as_u64(), Some(payload.len() as u64));
    assert!(last["finished_ms"].as_u64().unwrap() >= last["created_ms"].as_u64().unwrap());

    // Newest first, with creation time, artifact, state, rows and bytes.
    let flows: Vec<serde_json::Value> =
        serde_json::from_str(&d.api(&["flow", "list", &id, "--json"])).unwrap();
    let ids: Vec<&str> = flows
        .iter()
        .map(|f| f["flow_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![flow.as_str(), first["flow_id"].as_str().unwrap()]);
    assert_eq!(flows[0]["artifact"], "Generic.Forensic.FileFinder");
    assert_eq!(flows[1]["rows"].as_u64(), Some(1));
    // Text: a header, then times in RFC 3339, UTC unless --local-time asks for this machine's zone
    // (here a POSIX TZ string: India, +05:30 all year).
    let text = d.api(&["flow", "list", &id]);
    assert!(text.starts_with("CREATED "), "{text}");
    let created_s = flows[0]["created_ms"].as_u64().unwrap() as i64 / 1000;
    let at = |zone: jiff::tz::TimeZone| {
        jiff::Timestamp::from_second(created_s)
            .unwrap()
            .to_zoned_datetime(zone)
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    };
    let utc = at(jiff::tz::TimeZone::UTC).replace("+00:00", "Z");
    assert!(
        text.lines().nth(1).unwrap().starts_with(&utc),
        "{utc}\n{text}"
    );
    let local = talon()
        .env("TZ", "IST-5:30")
        .args([
            "--api-config",
            &d.s("api.yaml"),
            "flow",
            "list",
            &id,
            "--local-time",
        ])
        .output()
        .unwrap();
    let local = String::from_utf8(local.stdout).unwrap();
    let india = at(jiff::tz::TimeZone::fixed(
        jiff::tz::Offset::from_seconds(5 * 3600 + 1800).unwrap(),
    ));
    assert!(india.ends_with("+05:30"), "{india}");
    assert!(
        local.lines().nth(1).unwrap().starts_with(&india),
        "{india}\n{local}"
    );

    let ups: Vec<serde_json::Value> =
        serde_json::from_str(&d.api(&["flow", "uploads", &id, &flow, "--json"])).unwrap();
    assert_eq!(ups.len(), 1, "{ups:?}");
    let sha: String = Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(ups[0]["size"].as_u64(), Some(payload.len() as u64));
    assert_eq!(ups[0]["sha256"].as_str(), Some(sha.as_str()));
    let upload_id = ups[0]["upload_id"].to_string();
    let out = d.path("downloaded.bin");
    d.api(&[
        "flow",
        "download",
        &id,
        &flow,
        &upload_id,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == payload, "byte for byte");
    // No overwrite without --force; an unknown upload is named.
    let again = run(&[
        "--api-config",
        &d.s("api.yaml"),
        "flow",
        "download",
        &id,
        &flow,
        &upload_id,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let missing = run(&[
        "--api-config",
        &d.s("api.yaml"),
        "flow",
        "download",
        &id,
        &flow,
        "7",
        "--out",
        d.path("x").to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no upload 7"),
        "{missing:?}"
    );

    // A hunt limited to one client is complete once that client reported: the watch ends there.
    let h = json(&d.api(&[
        "hunt",
        "create",
        "Generic.Client.Info",
        "--client-limit",
        "1",
        "--json",
    ]));
    let hunt = h["hunt_id"].as_str().unwrap().to_owned();
    let watched = d.api(&["hunt", "watch", &hunt, "--json"]);
    let end = json(watched.lines().last().unwrap());
    assert_eq!(end["state"], "complete", "{watched}");
    assert_eq!(end["stats"]["completed"].as_u64(), Some(1), "{watched}");
    d.api(&["hunt", "stop", &hunt]).to_string();

    // Every change, newest first, naming the API user from its certificate.
    let audit: Vec<serde_json::Value> =
        serde_json::from_str(&d.api(&["audit", "list", "--json"])).unwrap();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["user"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("hunt-stop", "alice"),
            ("hunt-create", "alice"),
            ("collect", "alice"),
            ("collect", "alice"),
            ("label-add", "alice"),
        ],
        "{audit:?}"
    );
    assert_eq!(audit[1]["target"].as_str(), Some(hunt.as_str()));
    assert_eq!(audit[4]["detail"], "evidence");
    assert!(audit[2]["detail"].as_str().unwrap().contains(&flow));
}

/// A running flow stops when cancelled and reports failed with the reason; a collection whose
/// client is offline is cancelled before it starts and never runs when the client returns; both
/// are in the audit log; a finished flow cannot be cancelled.
#[test]
fn flows_are_cancelled_running_or_before_they_start() {
    let d = Deployment::new();
    let (_master, client, id) = d.master_and_client();

    // ~100 s of paced rows: cancelled once it has sent some.
    let f = json(&d.api(&[
        "collect",
        &id,
        "Generic.Test.Rows",
        "--param",
        "count=100000",
        "--param",
        "pause_ms=100",
        "--json",
    ]));
    let running = f["flow_id"].as_str().unwrap().to_owned();
    // The agent logs each task it starts.
    d.wait_until("the agent has started it", || {
        std::fs::read_to_string(d.path("c1.log"))
            .is_ok_and(|l| l.contains("task started") && l.contains(&running))
    });
    let c = json(&d.api(&[
        "flow",
        "cancel",
        &id,
        &running,
        "--reason",
        "wrong artifact",
        "--json",
    ]));
    assert_eq!(
        (c["before_start"].as_bool(), c["told"].as_bool()),
        (Some(false), Some(true)),
        "{c}"
    );
    let end = json(
        d.api(&["flow", "watch", &id, &running, "--json"])
            .lines()
            .last()
            .unwrap(),
    );
    assert_eq!(end["state"], "error", "{end}");
    let error = end["error"].as_str().unwrap();
    assert!(
        error.contains("cancelled by alice") && error.contains("wrong artifact"),
        "{end}"
    );
    assert!(end["rows"].as_u64().unwrap() < 100_000, "{end}");
    let again = run(&[
        "--api-config",
        &d.s("api.yaml"),
        "flow",
        "cancel",
        &id,
        &running,
    ]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("finished already"),
        "{again:?}"
    );

    // A query that makes no rows for a long time (an endless count; its task's timeout is 600 s)
    // stops as soon as it is cancelled, not at a row it would never send; the agent serves on.
    let f = json(&d.api(&[
        "collect",
        &id,
        "Generic.Query",
        "--param",
        "query=WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        "--json",
    ]));
    let endless = f["flow_id"].as_str().unwrap().to_owned();
    d.wait_until("the agent has started it", || {
        std::fs::read_to_string(d.path("c1.log"))
            .is_ok_and(|l| l.contains("task started") && l.contains(&endless))
    });
    d.api(&["flow", "cancel", &id, &endless, "--reason", "too slow"]);
    let soon = Duration::from_secs(30);
    d.wait_until_within("the cancelled query has stopped", soon, || {
        let f = json(&d.api(&["flow", "show", &id, &endless, "--json"]));
        f["state"] == "error" && f["error"].as_str().unwrap().contains("too slow")
    });
    let info = json(&d.api(&["collect", &id, "Generic.Client.Info", "--wait", "--json"]));
    assert_eq!(info["state"], "completed", "{info}");

    // Offline: the task waits on the master; cancelled, it is withdrawn and never runs.
    drop(client);
    d.wait_until("the client is offline", || {
        d.clients()[0]["connected"] == false
    });
    let f = json(&d.api(&["collect", &id, "Generic.Client.Info", "--json"]));
    let queued = f["flow_id"].as_str().unwrap().to_owned();
    let c = json(&d.api(&["flow", "cancel", &id, &queued, "--json"]));
    assert_eq!(
        (c["before_start"].as_bool(), c["told"].as_bool()),
        (Some(true), Some(false)),
        "{c}"
    );
    let _client = d.start_client(&d.path("client.config.yaml"), "c1");
    d.wait_until("the client is back", || d.clients()[0]["connected"] == true);
    // Another collection after it: once that one completed, the cancelled one was not sent.
    let later = json(&d.api(&["collect", &id, "Generic.Client.Info", "--wait", "--json"]));
    assert_eq!(later["state"], "completed");
    let q = json(&d.api(&["flow", "show", &id, &queued, "--json"]));
    assert_eq!(
        (q["state"].as_str(), q["rows"].as_u64()),
        (Some("error"), Some(0)),
        "{q}"
    );
    assert!(
        q["error"].as_str().unwrap().contains("before it started"),
        "{q}"
    );

    let audit: Vec<serde_json::Value> =
        serde_json::from_str(&d.api(&["audit", "list", "--json"])).unwrap();
    let cancels: Vec<&str> = audit
        .iter()
        .filter(|e| e["action"] == "cancel")
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert_eq!(cancels.len(), 3, "{audit:?}");
    assert!(
        cancels[0].starts_with(&queued)
            && cancels[1].starts_with(&endless)
            && cancels[2].starts_with(&running),
        "{cancels:?}"
    );
}

/// Issue #18's first increment: an ad-hoc SQL query over the endpoint tables, refused before
/// anything is scheduled when it does not prepare (also by the server, for a client that skips
/// the CLI's check), collected as a flow, hunted, and audited with its text. A hostile query is
/// refused and the agent keeps serving.
#[test]
fn ad_hoc_queries_are_checked_collected_hunted_and_audited() {
    let d = Deployment::new();
    let (_master, client, id) = d.master_and_client();
    let agent_pid = client.0.id();

    // The agent's own process, read through the processes table on the agent.
    let sql = format!("SELECT pid, name, uid FROM processes WHERE pid = {agent_pid}");
    let out = d.api(&["query", &id, &sql, "--json"]);
    let rows: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["pid"].as_u64(), Some(u64::from(agent_pid)));
    assert_eq!(rows[0]["name"], "talon");
    // Text: a table in the query's column order.
    let text = d.api(&[
        "query",
        &id,
        "SELECT username, uid FROM users WHERE uid = 0",
    ]);
    assert_eq!(text.lines().next(), Some("username  uid"), "{text}");
    assert!(text.lines().nth(1).unwrap().starts_with("root"), "{text}");

    // Refused before anything is scheduled: by the CLI, and by the server when a client sends it
    // anyway (the CLI's `collect` of Generic.Query checks too, so this goes through the API).
    let flows_before = json(&d.api(&["flow", "list", &id, "--json"]))
        .as_array()
        .unwrap()
        .len();
    for (sql, want) in [
        ("SELECT nope FROM users", "no such column: nope"),
        ("SELECT * FROM file", "table file needs a constraint"),
        ("ATTACH '/tmp/x.db' AS x", "ATTACH"),
        ("SELECT 1; DELETE FROM users", "not allowed"),
    ] {
        let out = run(&["--api-config", &d.s("api.yaml"), "query", &id, sql]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{sql}: {err}");
        let api: talon_io::deploy::config::ApiClientConfig =
            talon_io::deploy::config::read_yaml(&d.path("api.yaml")).unwrap();
        let refused = tokio::runtime::Runtime::new().unwrap().block_on(async {
            let net = talon_io::net::TokioNet::shared();
            let mut a = talon_io::cli::api_client::Api::connect_with(&api, &net)
                .await
                .unwrap();
            let params = std::collections::BTreeMap::from([("query".into(), sql.into())]);
            a.collect(&id, "Generic.Query", params).await.unwrap_err()
        });
        assert!(
            refused.contains("the query is refused") && refused.contains(want),
            "{sql}: {refused}"
        );
    }
    let flows_after = json(&d.api(&["flow", "list", &id, "--json"]))
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        flows_before, flows_after,
        "a refused query scheduled nothing"
    );

    // A runaway query is stopped: by the task's time on the agent (600 s; the unit tests prove
    // that bound with a clock), or, as here, by the engine's row bound first. The rows up to the
    // bound are kept, the flow says why it stopped, and the agent serves on.
    let out = run(&[
        "--api-config",
        &d.s("api.yaml"),
        "query",
        &id,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stopped after 1000000 rows"),
        "{err}"
    );
    let flows = json(&d.api(&["flow", "list", &id, "--json"]));
    assert_eq!(flows[0]["rows"].as_u64(), Some(1_000_000), "{}", flows[0]);

    // OS honesty: a hunt for a platform its artifact cannot run on is refused.
    for args in [
        vec![
            "hunt",
            "create",
            "--query",
            "SELECT * FROM users",
            "--os",
            "windows",
        ],
        vec!["hunt", "create", "Generic.Client.Info", "--os", "darwin"],
    ] {
        let mut a = vec!["--api-config", d.s("api.yaml").leak() as &str];
        a.extend(args);
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("runs on linux only"),
            "{err}"
        );
    }

    // A hunt of a query, and the audit log names the query's text.
    let hunt = d
        .api(&[
            "hunt",
            "create",
            "--query",
            "SELECT hostname FROM system_info",
        ])
        .trim()
        .to_owned();
    d.wait_until("the hunt completes", || {
        json(&d.api(&["hunt", "show", &hunt, "--json"]))["stats"]["completed"] == 1
    });
    let exported = d.hunt_export(&hunt);
    assert_eq!(exported.len(), 1);
    let audit = json(&d.api(&["audit", "list", "--json"]));
    let details: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("query=\"SELECT hostname FROM system_info\"")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains(&format!("pid = {agent_pid}"))),
        "{details:?}"
    );
}

/// Issue #18's repository: a custom artifact added from YAML (checked first, refused with the
/// source and position of an error), known to `list`/`show`, collected and hunted with its
/// parameters bound, replaced only when asked, removed, and every change audited. Built-ins cannot
/// be shadowed or removed.
#[test]
fn custom_artifacts_are_added_checked_collected_hunted_and_removed() {
    let d = Deployment::new();
    let (_master, _client, id) = d.master_and_client();
    let def = d.path("shells.yaml");
    std::fs::write(
        &def,
        "name: Custom.Linux.Accounts
description: Accounts with a uid in a range, and this host's name.
parameters:
  - name: max_uid
    type: int
    max: 4294967295
    default: 0
    description: Highest uid listed.
sources:
  - name: accounts
    query: SELECT username, uid FROM users WHERE uid <= :max_uid ORDER BY uid
  - name: host
    query: SELECT hostname FROM system_info
",
    )
    .unwrap();
    let added = d.api(&["artifacts", "add", &d.s("shells.yaml")]);
    assert!(
        added.contains("artifact Custom.Linux.Accounts added (linux)"),
        "{added}"
    );
    let list = json(&d.api(&["artifacts", "list", "--json"]));
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "Custom.Linux.Accounts")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(mine["builtin"], false);
    assert_eq!(mine["params"][0]["max"], 4294967295u64);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "Linux.Sys.Pslist" && a["builtin"] == true)
    );
    let shown = d.api(&["artifacts", "show", "Custom.Linux.Accounts"]);
    assert!(shown.contains("WHERE uid <= :max_uid"), "{shown}");
    assert!(
        d.api(&["artifacts", "show", "Linux.Sys.Users"])
            .contains("FROM users")
    );

    // Collected: every source's rows, each naming its source; the parameter bound.
    let f = json(&d.api(&[
        "collect",
        &id,
        "Custom.Linux.Accounts",
        "--param",
        "max_uid=0",
        "--wait",
        "--json",
    ]));
    assert_eq!(f["state"], "completed", "{f}");
    let rows: Vec<serde_json::Value> = d
        .api(&["flow", "results", &id, f["flow_id"].as_str().unwrap()])
        .lines()
        .map(json)
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (&rows[0]["username"], &rows[0]["uid"], &rows[0]["_source"]),
        (&"root".into(), &0.into(), &"accounts".into())
    );
    assert_eq!(rows[1]["_source"], "host");
    // A bad value is refused before anything is scheduled.
    let err = d.api_refused(&[
        "collect",
        &id,
        "Custom.Linux.Accounts",
        "--param",
        "max_uid=-1",
    ]);
    assert!(err.contains("parameter max_uid=\"-1\" is invalid"), "{err}");

    // Hunted.
    let hunt = d
        .api(&[
            "hunt",
            "create",
            "Custom.Linux.Accounts",
            "--param",
            "max_uid=0",
        ])
        .trim()
        .to_owned();
    d.wait_until("the hunt completes", || {
        json(&d.api(&["hunt", "show", &hunt, "--json"]))["stats"]["completed"] == 1
    });
    assert_eq!(d.api(&["hunt", "results", &hunt]).lines().count(), 2);

    // Refusals: a query that does not prepare (its source and position named, nothing stored);
    // the same name again without --replace; a built-in's name; an unknown artifact.
    let refused = |text: &str, want: &str| {
        std::fs::write(d.path("bad.yaml"), text).unwrap();
        let err = d.api_refused(&["artifacts", "add", &d.s("bad.yaml")]);
        assert!(err.contains(want), "{text}: {err}");
    };
    refused(
        "name: Custom.Bad\nsources: [{name: a, query: SELECT 1}, {name: b, query: SELECT nope FROM users}]",
        "source b: no such column: nope",
    );
    refused(
        "name: Custom.Bad\nsources: [{query: SELECT path FROM file}]",
        "table file needs a constraint",
    );
    refused(
        &std::fs::read_to_string(&def).unwrap(),
        "exists; add it with --replace",
    );
    refused(
        "name: Linux.Sys.Users\nsources: [{query: SELECT 1}]",
        "is a built-in artifact",
    );
    let err = d.api_refused(&["artifacts", "show", "Custom.Bad"]);
    assert!(err.contains("unknown artifact \"Custom.Bad\""), "{err}");
    // The server refuses what the CLI would have: a client that skips the CLI's check.
    let api: talon_io::deploy::config::ApiClientConfig =
        talon_io::deploy::config::read_yaml(&d.path("api.yaml")).unwrap();
    let server_says = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let net = talon_io::net::TokioNet::shared();
        let mut a = talon_io::cli::api_client::Api::connect_with(&api, &net)
            .await
            .unwrap();
        a.add_artifact(
            "name: Custom.Bad\nsources: [{query: SELEC 1}]".into(),
            false,
        )
        .await
        .unwrap_err()
    });
    assert!(
        server_says.contains("the definition is refused") && server_says.contains("at byte 0"),
        "{server_says}"
    );

    // Replaced when asked: the next collection runs the new definition; the earlier flow keeps
    // the definition it carried.
    std::fs::write(
        &def,
        "name: Custom.Linux.Accounts\nsources: [{query: SELECT 'v2' AS version}]\n",
    )
    .unwrap();
    d.api(&["artifacts", "add", &d.s("shells.yaml"), "--replace"]);
    let f2 = json(&d.api(&["collect", &id, "Custom.Linux.Accounts", "--wait", "--json"]));
    let rows = d.api(&["flow", "results", &id, f2["flow_id"].as_str().unwrap()]);
    assert_eq!(json(rows.trim())["version"], "v2", "{rows}");
    let first = json(&d.api(&[
        "flow",
        "show",
        &id,
        f["flow_id"].as_str().unwrap(),
        "--json",
    ]));
    let carried = first["params"]["_artifact"]
        .as_str()
        .unwrap_or_else(|| panic!("{first}"));
    assert!(carried.contains("WHERE uid <= :max_uid"), "{carried}");

    // Removed: gone from the list; collecting it is refused; built-ins cannot be removed.
    assert!(
        d.api(&["artifacts", "remove", "Custom.Linux.Accounts"])
            .contains("removed")
    );
    let list = d.api(&["artifacts", "list", "--json"]);
    assert!(!list.contains("Custom.Linux.Accounts"), "{list}");
    let err = d.api_refused(&["collect", &id, "Custom.Linux.Accounts"]);
    assert!(err.contains("unknown artifact"), "{err}");
    let err = d.api_refused(&["artifacts", "remove", "Linux.Sys.Users"]);
    assert!(err.contains("built-ins cannot be removed"), "{err}");

    let audit = json(&d.api(&["audit", "list", "--json"]));
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("artifact-"))
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("artifact-remove", "Custom.Linux.Accounts"),
            ("artifact-add", "Custom.Linux.Accounts"),
            ("artifact-add", "Custom.Linux.Accounts"),
        ],
        "{audit}"
    );
}

/// The repository's bound: with `CUSTOM_MAX` custom artifacts stored (written to the datastore's
/// volume before the master starts), all are listed, and one more is refused naming the bound.
#[test]
fn the_repository_holds_at_most_its_bound_of_custom_artifacts() {
    let d = Deployment::new();
    let dir = d.path("shared/metadata/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let max = 1000;
    for i in 0..max {
        std::fs::write(
            dir.join(format!("Custom.Seeded{i}.yaml")),
            format!("name: Custom.Seeded{i}\nsources: [{{query: SELECT {i} AS n}}]\n"),
        )
        .unwrap();
    }
    let _master = d.start_master();
    let list = json(&d.api(&["artifacts", "list", "--json"]));
    let custom = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["builtin"] == false)
        .count();
    assert_eq!(custom, max);
    std::fs::write(
        d.path("one.yaml"),
        "name: Custom.OneMore\nsources: [{query: SELECT 1}]\n",
    )
    .unwrap();
    let err = d.api_refused(&["artifacts", "add", &d.s("one.yaml")]);
    assert!(
        err.contains("holds 1000 custom artifacts, its bound"),
        "{err}"
    );
    // Replacing one still works at the bound.
    std::fs::write(
        d.path("again.yaml"),
        "name: Custom.Seeded7\nsources: [{query: SELECT 'again' AS n}]\n",
    )
    .unwrap();
    d.api(&["artifacts", "add", &d.s("again.yaml"), "--replace"]);
    assert!(
        d.api(&["artifacts", "show", "Custom.Seeded7"])
            .contains("again")
    );
}

/// An ad-hoc query longer than a parameter's 4 KiB (osquery packs have such queries) is collected:
/// a query parameter is bounded by the query text's own 64 KiB.
#[test]
fn an_ad_hoc_query_may_be_longer_than_four_kib() {
    let d = Deployment::new();
    let (_master, _client, id) = d.master_and_client();
    let padding = format!("/* {} */", "x".repeat(5000));
    let sql = format!("SELECT username {padding} FROM users WHERE uid = 0");
    let out = d.api(&["query", &id, &sql, "--json"]);
    assert_eq!(json(out.trim())["username"], "root", "{out}");
}
