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
