//! Users and roles: `talon user add|list|passwd|remove` (the GUI's users), and API certificates
//! that carry a role, refused by the master for what their role does not allow.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use std::process::Output;

mod common;
use common::*;

/// Runs `talon -c server.config.yaml user ARGS` with `stdin` as its input.
fn user(d: &Deployment, args: &[&str], stdin: &str) -> Output {
    let config = d.s("server.config.yaml");
    let mut a = vec!["-c", &config, "user"];
    a.extend(args);
    run_with_stdin(&a, stdin)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn users_are_added_listed_changed_and_removed_with_clear_refusals() {
    let d = Deployment::new();
    let o = user(&d, &["list"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no users"));

    let o = user(
        &d,
        &["add", "ada", "--role", "administrator"],
        "long-password\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = user(&d, &["add", "rita", "--role", "reader"], "rita-password\n");
    assert!(o.status.success(), "{}", stderr(&o));

    // Refusals name what is wrong and change nothing.
    let o = user(
        &d,
        &["add", "ada", "--role", "reader"],
        "another-password\n",
    );
    assert!(
        !o.status.success() && stderr(&o).contains("exists"),
        "{}",
        stderr(&o)
    );
    let o = user(&d, &["add", "bob", "--role", "reader"], "short\n");
    assert!(stderr(&o).contains("at least 8"), "{}", stderr(&o));
    let o = user(&d, &["add", "../x", "--role", "reader"], "long-password\n");
    assert!(stderr(&o).contains("not valid"), "{}", stderr(&o));
    let o = user(&d, &["add", "bob", "--role", "root"], "long-password\n");
    assert!(
        !o.status.success() && stderr(&o).contains("root"),
        "{}",
        stderr(&o)
    );
    let o = user(&d, &["add", "bob", "--role", "reader"], "");
    assert!(stderr(&o).contains("no password"), "{}", stderr(&o));

    let list = |d: &Deployment| -> serde_json::Value {
        let o = user(d, &["list", "--json"], "");
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let before = list(&d);
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");
    assert_eq!(before[0]["name"], "ada");
    assert_eq!(before[0]["role"], "administrator");
    assert_eq!(before[1]["role"], "reader");
    // The stored record holds a hash, never the password.
    let stored = std::fs::read_to_string(d.path("shared/metadata/users/ada.json")).unwrap();
    assert!(stored.contains("$argon2id$") && !stored.contains("long-password"));

    let o = user(
        &d,
        &["passwd", "rita", "--role", "investigator"],
        "new-password\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let after = list(&d);
    assert_eq!(after[1]["role"], "investigator");
    assert!(after[1]["changed_ms"].as_u64() > before[1]["changed_ms"].as_u64());

    let o = user(&d, &["remove", "rita"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = user(&d, &["remove", "rita"], "");
    assert!(!o.status.success() && stderr(&o).contains("no user"));
    let o = user(&d, &["passwd", "rita"], "new-password\n");
    assert!(!o.status.success() && stderr(&o).contains("no user"));
    assert_eq!(list(&d).as_array().unwrap().len(), 1);
}

#[test]
fn an_api_certificate_s_role_limits_what_it_may_do() {
    let d = Deployment::new();
    let (_master, _client, id) = d.master_and_client();
    for role in ["reader", "investigator"] {
        ok(&[
            "-c",
            &d.s("server.config.yaml"),
            "config",
            "api-client",
            "--name",
            role,
            "--role",
            role,
            "--out",
            &d.s(&format!("{role}.yaml")),
        ]);
    }
    let as_ = |role: &str, args: &[&str]| {
        let mut a = vec!["--api-config".to_owned(), d.s(&format!("{role}.yaml"))];
        a.extend(args.iter().map(|s| s.to_string()));
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // A reader reads (sorted too; an unknown order is refused naming it).
    let o = as_("reader", &["clients", "search", "all", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id));
    let o = as_(
        "reader",
        &[
            "clients",
            "search",
            "all",
            "--sort",
            "last_seen",
            "--descending",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&id));
    let o = as_(
        "reader",
        &["clients", "search", "all", "--sort", "shoe_size"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("shoe_size"),
        "{}",
        stderr(&o)
    );
    // ... and is refused every change, with the role it lacks named.
    for args in [
        vec!["collect", id.as_str(), "Generic.Client.Info"],
        vec!["hunt", "create", "Generic.Client.Info"],
        vec!["label", "add", id.as_str(), "x"],
    ] {
        let o = as_("reader", &args);
        assert!(!o.status.success(), "{args:?} as a reader succeeded");
        let e = stderr(&o);
        assert!(
            e.contains("reader") && e.contains("investigator"),
            "{args:?}: {e}"
        );
    }
    // An investigator collects but may not read the audit log or add artifacts.
    let o = as_(
        "investigator",
        &["collect", &id, "Generic.Client.Info", "--wait", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_("investigator", &["audit", "list"]);
    assert!(stderr(&o).contains("administrator"), "{}", stderr(&o));
    // A certificate made before roles existed (no role attribute) is an administrator's: alice.
    let audit = d.api(&["audit", "list", "--json"]);
    assert!(audit.contains("\"investigator\""), "{audit}");
}
