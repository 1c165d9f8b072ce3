//! The `talon config` commands as a user runs them: the real binary, real files.

use std::path::Path;
use std::process::{Command, Output};

fn talon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_talon"))
        .args(args)
        .output()
        .expect("run talon")
}

fn ok(args: &[&str]) -> String {
    let out = talon(args);
    assert!(
        out.status.success(),
        "talon {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = talon(args);
    assert!(!out.status.success(), "talon {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_derive_minions_and_issue_an_api_user() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = dir.path().join("server.config.yaml");
    ok(&[
        "config",
        "generate",
        "--hostname",
        "127.0.0.1",
        "--datastore",
        s(&data),
        "--out-dir",
        s(dir.path()),
    ]);
    let client = std::fs::read_to_string(dir.path().join("client.config.yaml")).unwrap();
    assert!(
        client.contains("https://127.0.0.1:8000/") && !client.contains("private_key"),
        "{client}"
    );

    let out = ok(&[
        "--config",
        s(&server),
        "config",
        "frontend",
        "--add",
        "127.0.0.1:8100",
        "--add",
        "127.0.0.1:8200",
    ]);
    assert!(
        out.contains("added minion 127.0.0.1-8100") && out.contains("3 frontends"),
        "{out}"
    );
    let client = std::fs::read_to_string(dir.path().join("client.config.yaml")).unwrap();
    for url in [
        "https://127.0.0.1:8000/",
        "https://127.0.0.1:8100/",
        "https://127.0.0.1:8200/",
    ] {
        assert!(client.contains(url), "{url} missing: {client}");
    }
    let text = std::fs::read_to_string(&server).unwrap();
    assert!(
        text.contains("ExtraFrontends:") && text.contains("RemoteFileDataStore"),
        "{text}"
    );

    let api = dir.path().join("api.config.yaml");
    ok(&[
        "-c",
        s(&server),
        "config",
        "api-client",
        "--name",
        "alice",
        "--out",
        s(&api),
    ]);
    let text = std::fs::read_to_string(&api).unwrap();
    assert!(
        text.contains("api_connection_string: 127.0.0.1:8001"),
        "{text}"
    );
    // The underscore spelling of the seed is accepted too.
    let api2 = dir.path().join("api2.config.yaml");
    ok(&[
        "-c",
        s(&server),
        "config",
        "api_client",
        "--name",
        "bob",
        "--out",
        s(&api2),
    ]);
}

#[test]
fn mistakes_are_refused_with_a_sentence_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = s(dir.path());
    ok(&[
        "config",
        "generate",
        "--hostname",
        "m",
        "--datastore",
        "/srv/talon",
        "--out-dir",
        out_dir,
    ]);
    let e = fails(&[
        "config",
        "generate",
        "--hostname",
        "m",
        "--out-dir",
        out_dir,
    ]);
    assert!(e.contains("exists; pass --force"), "{e}");

    let server = dir.path().join("server.config.yaml");
    let text = std::fs::read_to_string(&server).unwrap();
    std::fs::write(&server, text.replace("GUI:\n", "GUI:\n  colour: blue\n")).unwrap();
    let e = fails(&["-c", s(&server), "config", "frontend", "--add", "m2:8100"]);
    assert!(
        e.contains("server.config.yaml") && e.contains("unknown field `colour`"),
        "{e}"
    );

    let e = fails(&[
        "-c",
        "/nonexistent/server.config.yaml",
        "config",
        "frontend",
        "--add",
        "m2:8100",
    ]);
    assert!(
        e.contains("/nonexistent/server.config.yaml: cannot read"),
        "{e}"
    );
    let e = fails(&["config", "frontend", "--add", "m2:8100"]);
    assert!(e.contains("needs --config"), "{e}");
    let e = fails(&[
        "config",
        "generate",
        "--hostname",
        "m",
        "--frontend-port",
        "99999",
        "--out-dir",
        out_dir,
    ]);
    assert!(e.contains("99999"), "{e}");
}
