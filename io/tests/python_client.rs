//! A third-party client drives Talon: the Python example (`examples/python/talon_client.py`, the
//! stock `grpcio` stack with stubs generated from `proto/`) against a real master and minion.
//!
//! Ignored by default: it needs a Python with the example's requirements, named by
//! `TALON_PYTHON`. `scripts/python-client-test.sh` installs them into a virtualenv and runs it
//! (CI does).
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use sha2::{Digest, Sha256};
use std::process::Command;

mod common;
use common::*;

#[test]
#[ignore = "needs TALON_PYTHON with grpcio (scripts/python-client-test.sh)"]
fn the_python_grpcio_example_drives_a_cluster() {
    let python = std::env::var("TALON_PYTHON")
        .expect("TALON_PYTHON must name a Python with examples/python/requirements.txt installed");
    let d = Deployment::new();
    let (minion, _) = d.add_minion();
    let _minion = d.start_minion(&minion);
    let _master = d.start_master();
    let _c1 = d.start_client(&d.path("client.config.yaml"), "c1");
    let _c2 = d.start_client(&d.path("client.config.yaml"), "c2");
    d.wait_until("both clients are connected", || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count()
            == 2
    });

    // Several MiB, not a multiple of the download's chunk size.
    let payload: Vec<u8> = (0..(3 << 20) + 777u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(d.path("evidence.bin"), &payload).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/talon_client.py"
    );
    let out = Command::new(&python)
        .args([
            script,
            "--api-config",
            &d.s("api.yaml"),
            "--upload-glob",
            &d.s("evidence.bin"),
            "--download-to",
            &d.s("downloaded.bin"),
        ])
        .output()
        .expect("run the Python example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the Python example failed:\n{stderr}");
    eprintln!("{stderr}");
    let s = json(&String::from_utf8_lossy(&out.stdout));

    assert_eq!(s["clients"], 2, "{s}");
    assert_eq!(s["collect"]["state"], "FLOW_STATE_COMPLETED", "{s}");
    assert_eq!(s["collect"]["rows"], 1, "{s}");
    let hunt = &s["hunt"];
    assert_eq!(hunt["state"], "HUNT_STATE_COMPLETE", "{s}");
    assert_eq!(
        (hunt["completed"].as_u64(), hunt["rows"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    let mut ids: Vec<String> = d
        .clients()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(hunt["clients"], serde_json::json!(ids), "{s}");
    // The hunt's figures as the CLI sees them agree with what Python streamed.
    let shown = json(&d.api(&["hunt", "show", hunt["id"].as_str().unwrap(), "--json"]));
    assert_eq!(shown["stats"]["rows"], 2);

    let sha: String = Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(s["download"]["sha256"].as_str(), Some(sha.as_str()), "{s}");
    assert_eq!(s["download"]["size"].as_u64(), Some(payload.len() as u64));
    assert!(
        std::fs::read(d.path("downloaded.bin")).unwrap() == payload,
        "byte for byte"
    );
}
