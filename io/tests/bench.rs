//! `talon bench` at a small scale (the CI smoke of issue 5): each scenario starts its deployment,
//! prints one JSON object with the documented fields, and the figures are consistent with each other.
//! Timing is printed, never asserted (figures live in docs/performance.md).

mod common;
use common::*;

fn bench(args: &[&str]) -> serde_json::Value {
    let keys = tempfile::tempdir().unwrap();
    let mut a = vec!["bench"];
    a.extend_from_slice(args);
    a.extend(["--json", "--keys", keys.path().to_str().unwrap()]);
    let out = ok(&a);
    eprintln!("talon {a:?}:\n{out}");
    json(out.trim())
}

#[test]
fn bench_connections_and_hunt_print_their_figures() {
    let c = bench(&["connections", "--clients", "40"]);
    assert_eq!(c["scenario"], "connections");
    assert_eq!(c["clients"], 40);
    for k in [
        "frontend_rss_bytes",
        "rss_per_client_bytes",
        "connect_rate_per_s",
        "frontend_rss_baseline_bytes",
    ] {
        assert!(c[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {c}");
    }
    assert!(c["frontend_rss_bytes"].as_u64() > c["frontend_rss_baseline_bytes"].as_u64());

    let h = bench(&["hunt", "--clients", "40"]);
    assert_eq!(h["scenario"], "hunt");
    assert_eq!(
        h["rows"], 40,
        "Generic.Test.Rows count=1 on 40 clients: {h}"
    );
    let t = |k: &str| h[k].as_f64().unwrap_or_else(|| panic!("{k}: {h}"));
    assert!(t("tasked_all_s") <= t("completed_100_s"));
    assert!(t("completed_95_s") <= t("completed_100_s"));
    assert!(t("rows_per_s") > 0.0);

    let e = run(&["bench", "connections", "--clients", "0"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--clients must be at least 1"));
}

#[test]
fn bench_storage_latency_prints_both_runs() {
    let s = bench(&[
        "storage-latency",
        "--clients",
        "20",
        "--rows",
        "300",
        "--pause-ms",
        "100",
    ]);
    assert_eq!(s["scenario"], "storage-latency");
    let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k}: {s}"));
    for k in [
        "throughput_0ms",
        "throughput_50ms",
        "throughput_ratio",
        "p50_ms_0ms",
        "p99_ms_0ms",
        "p50_ms_50ms",
        "p99_ms_50ms",
    ] {
        assert!(f(k) > 0.0, "{k}: {s}");
    }
    assert!(f("p50_ms_50ms") <= f("p99_ms_50ms"));
    // Every row of both runs arrived, and service times were recorded for each client's messages:
    // one to three batches of rows (100-row bursts, merged when a pause is shorter than the agent's
    // batching age) and exactly one final status per client.
    for run in ["run_0ms", "run_50ms"] {
        assert_eq!(s[run]["hunt"]["rows"], 20 * 300, "{run}: {s}");
        let data = s[run]["service_times"]["data"]["count"].as_u64().unwrap();
        assert!((20..=60).contains(&data), "{run}: {s}");
        assert_eq!(s[run]["service_times"]["finals"]["count"], 20, "{run}: {s}");
    }
    assert_eq!(s["run_50ms"]["hunt"]["rows"], s["run_0ms"]["hunt"]["rows"]);
}

#[test]
fn bench_replication_counts_the_backlog_it_applies() {
    let r = bench(&["replication", "--clients", "20", "--outage-s", "2"]);
    assert_eq!(r["scenario"], "replication");
    // Each client connected, dropped and reconnected while the master was down: at least three
    // events each, all applied after the restart.
    let backlog = r["backlog_events"].as_u64().unwrap();
    assert!(backlog >= 3 * 20, "{r}");
    let catchup = r["catchup_s"].as_f64().unwrap();
    assert!(catchup > 0.0, "{r}");
    // The drain lies within the catch-up: it starts at or after the restart.
    assert!(
        r["drain_s"]
            .as_f64()
            .is_some_and(|d| (0.0..=catchup).contains(&d)),
        "{r}"
    );
    assert!(r["events_per_s"].as_f64().is_some(), "{r}");
}

#[test]
fn bench_events_prints_both_runs() {
    let e = bench(&[
        "events",
        "--clients",
        "20",
        "--rate",
        "20",
        "--seconds",
        "10",
        "--latency-ms",
        "50",
    ]);
    assert_eq!(e["scenario"], "events");
    assert_eq!(e["offered_events_per_s"], 400);
    for run in ["run_0ms", "run_50ms"] {
        let r = &e[run];
        // Every client's events arrive: some settled, none dropped, a latency for them.
        assert!(r["events_settled"].as_u64().is_some_and(|n| n > 0), "{r}");
        assert_eq!(r["dropped"], 0, "{r}");
        assert!(r["p99_ms"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        assert_eq!(r["samples"].as_array().map(Vec::len), Some(2), "{r}");
    }
    assert!(
        e["throughput_ratio"].as_f64().is_some_and(|v| v > 0.0),
        "{e}"
    );
    let bad = run(&["bench", "events", "--clients", "1", "--rate", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--rate and --seconds"));
}

#[test]
fn bench_gui_times_every_call_a_page_makes() {
    // With the shared volume elsewhere (`--volume`, a network mount in real use): a scratch
    // directory there holds it, removed after.
    let volume = tempfile::tempdir().unwrap();
    let v = volume.path().to_str().unwrap();
    let g = bench(&["gui", "--clients", "30", "--volume", v]);
    assert_eq!(g["scenario"], "gui");
    assert!(
        g["volume"].as_str().is_some_and(|p| p.starts_with(v)),
        "{g}"
    );
    assert_eq!(
        std::fs::read_dir(volume.path()).unwrap().count(),
        0,
        "the scratch is removed"
    );
    assert_eq!(g["clients_enrolled"], 30);
    assert_eq!(g["clients_connected"], 30);
    assert_eq!(g["hunt_rows"], 300, "30 clients x 10 rows");
    let calls = g["calls"].as_object().unwrap();
    for name in [
        "clients, first page",
        "clients by host name",
        "search label:bench",
        "hunt estimate, label bench",
        "cluster",
        "audit log",
        "hunt results, first page",
        "hunt results, last page",
        "hunt results, filtered",
    ] {
        let c = &calls[name];
        assert!(c["p50_ms"].as_f64().is_some(), "{name}: {c}");
        assert!(c["p99_ms"].as_f64() >= c["p50_ms"].as_f64(), "{name}: {c}");
        assert!(c["bytes"].as_u64().is_some_and(|b| b > 0), "{name}: {c}");
    }
}
