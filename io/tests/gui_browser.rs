//! The GUI in a real browser: `io/tests/browser/gui.test.mjs` drives Debian's Chromium (through
//! playwright-core) against a real master, a minion, a real agent and virtual clients whose host
//! names are markup; three users, one of each role.
//!
//! Ignored by default: it needs Chromium and the test's node packages. `scripts/browser-test.sh`
//! installs both and runs it (CI does). Screenshots go to `target/gui-screenshots/` (docs/gui.md
//! shows copies).
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use sha2::{Digest, Sha256};
use std::process::Command;

mod common;
use common::*;

/// The virtual clients' host-name prefix: markup that must reach the page as text.
const HOSTILE: &str = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>";

fn add_user(d: &Deployment, name: &str, role: &str, password: &str) {
    let config = d.s("server.config.yaml");
    let args = ["-c", &config, "user", "add", name, "--role", role];
    let out = run_with_stdin(&args, &format!("{password}\n"));
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs Chromium and node packages (scripts/browser-test.sh)"]
fn the_gui_works_in_chromium_for_each_role_and_keeps_agent_text_inert() {
    let node = std::env::var("TALON_NODE").unwrap_or_else(|_| "node".into());
    let d = Deployment::new();
    let (minion, _) = d.add_minion();
    let _minion = d.start_minion(&minion);
    let _master = d.start_master();
    let _agent = d.start_client(&d.path("client.config.yaml"), "c1");
    let _pool = d.start_pool_with(12, "pool", &["--hostname-prefix", HOSTILE]);
    d.wait_until("the agent and 12 virtual clients are connected", || {
        d.clients()
            .iter()
            .filter(|c| c["connected"] == true)
            .count()
            == 13
    });
    let real = d
        .clients()
        .iter()
        .find(|c| !c["hostname"].as_str().unwrap().starts_with("<script>"))
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .unwrap();
    let users = [
        ("ada", "administrator", "ada-password-1"),
        ("ivan", "investigator", "ivan-password-1"),
        ("rita", "reader", "rita-password-1"),
    ];
    for (name, role, password) in users {
        add_user(&d, name, role, password);
    }
    let passwords: serde_json::Map<String, serde_json::Value> = users
        .iter()
        .map(|(n, _, p)| (n.to_string(), serde_json::Value::from(*p)))
        .collect();
    // Several hundred KiB, not a multiple of the upload's chunk size.
    let evidence: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.path("evidence.bin"), &evidence).unwrap();
    let port = talon_io::deploy::config::ServerConfig::load(&d.path("server.config.yaml"))
        .unwrap()
        .gui
        .bind_port;
    let shots = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/gui-screenshots");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/gui.test.mjs");
    let out = Command::new(&node)
        .arg(script)
        .env("TALON_GUI_URL", format!("https://127.0.0.1:{port}"))
        .env(
            "TALON_USERS",
            serde_json::Value::Object(passwords).to_string(),
        )
        .env("TALON_REAL_CLIENT", &real)
        .env("TALON_EVIDENCE", d.s("evidence.bin"))
        .env(
            "TALON_EVIDENCE_SHA256",
            format!("{:x}", Sha256::digest(&evidence)),
        )
        .env("TALON_HOSTILE", HOSTILE)
        .env("TALON_SHOTS", shots)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the browser tests failed:\n{stdout}\n{stderr}\n(master log: {})",
        std::fs::read_to_string(d.path("master.log")).unwrap_or_default()
    );
    assert!(stdout.contains("all passed"), "{stdout}");
    // The GUI's changes are audited under the GUI users' names, seen through the API too.
    let audit = d.api(&["audit", "list", "--json"]);
    for who in ["\"ada\"", "\"ivan\""] {
        assert!(audit.contains(who), "audit lacks {who}: {audit}");
    }
}
