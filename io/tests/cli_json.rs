//! Every command that prints has `--json`, and its output parses: the command tree is walked, so a
//! new command without `--json`, or without a run here, fails this test.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods)]

use clap::CommandFactory;
use std::collections::{BTreeMap, BTreeSet};

mod common;
use common::*;

/// Commands that serve or run until stopped, or always print JSON lines (no `--json` needed).
const NO_JSON: &[&str] = &["frontend", "client", "pool-client", "demo", "hunt results"];

/// Commands with `--json` that are too slow to run here (a whole benchmark deployment).
const NOT_RUN: &[&str] = &["bench"];

fn leaves(cmd: &clap::Command, path: &str, out: &mut BTreeMap<String, bool>) {
    for sc in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        let p = if path.is_empty() {
            sc.get_name().to_owned()
        } else {
            format!("{path} {}", sc.get_name())
        };
        if sc.has_subcommands() {
            leaves(sc, &p, out);
        } else {
            let json = sc.get_arguments().any(|a| a.get_long() == Some("json"));
            out.insert(p, json);
        }
    }
}

/// The leaves of `cmd` that print without `--json` (beyond [`NO_JSON`]).
fn lacking_json(all: &BTreeMap<String, bool>) -> Vec<&String> {
    all.iter()
        .filter(|(c, json)| !**json && !NO_JSON.contains(&c.as_str()))
        .map(|(c, _)| c)
        .collect()
}

/// The walk finds a nested command that lacks `--json` (a planted one).
#[test]
fn the_walk_finds_a_command_without_json() {
    let json = clap::Arg::new("json")
        .long("json")
        .action(clap::ArgAction::SetTrue);
    let cmd = clap::Command::new("t")
        .subcommand(clap::Command::new("demo"))
        .subcommand(
            clap::Command::new("flow")
                .subcommand(clap::Command::new("show").arg(json))
                .subcommand(clap::Command::new("planted")),
        );
    let mut all = BTreeMap::new();
    leaves(&cmd, "", &mut all);
    assert_eq!(lacking_json(&all), vec!["flow planted"]);
}

/// One JSON document, or JSON lines (watches, results): every line parses.
fn parses(cmd: &str, out: &str) {
    if serde_json::from_str::<serde_json::Value>(out).is_ok() {
        return;
    }
    assert!(!out.trim().is_empty(), "`{cmd} --json` printed nothing");
    for l in out.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| {
            panic!("`{cmd} --json` printed a line that is not JSON ({e}): {l}")
        });
    }
}

#[test]
fn every_command_that_prints_has_json_output_that_parses() {
    let mut all = BTreeMap::new();
    leaves(&talon_io::cli::Cli::command(), "", &mut all);
    let lacking = lacking_json(&all);
    assert!(
        lacking.is_empty(),
        "commands that print without --json: {lacking:?}"
    );

    let d = Deployment::new();
    let (_master, _client, id) = d.master_and_client();
    let mut ran: BTreeSet<String> = BTreeSet::new();
    let mut api = |cmd: &str, args: &[&str]| -> serde_json::Value {
        let mut a: Vec<&str> = cmd.split(' ').collect();
        a.extend(args);
        a.push("--json");
        let out = d.api(&a);
        parses(cmd, &out);
        ran.insert(cmd.to_owned());
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    };

    api("artifacts list", &[]);
    api("artifacts tables", &[]);
    std::fs::write(
        d.path("walked.yaml"),
        "name: Custom.Walked\nsources: [{query: SELECT 1 AS one}]\n",
    )
    .unwrap();
    api("artifacts add", &[&d.s("walked.yaml")]);
    api("artifacts show", &["Custom.Walked"]);
    api("artifacts remove", &["Custom.Walked"]);
    api("clients search", &["all"]);
    api("label add", &[&id, "walked"]);
    api("label remove", &[&id, "walked"]);
    let f = api("collect", &[&id, "Generic.Client.Info", "--wait"]);
    let flow = f["flow_id"].as_str().unwrap().to_owned();
    api("flow show", &[&id, &flow]);
    api("flow results", &[&id, &flow]);
    api("flow list", &[&id]);
    api("flow watch", &[&id, &flow]);
    api("query", &[&id, "SELECT username FROM users WHERE uid = 0"]);
    api("events set", &["Generic.Events.Test", "--param", "rate=50"]);
    api("events list", &[]);
    d.wait_until("test events are stored", || {
        !d.api(&["events", "show", &id, "Generic.Events.Test", "--json"])
            .trim()
            .is_empty()
    });
    api("events show", &[&id, "Generic.Events.Test"]);
    api(
        "events search",
        &["Generic.Events.Test", "--since", "1h", "--limit", "3"],
    );
    api("events unset", &["Generic.Events.Test"]);
    std::fs::write(d.path("up.txt"), "walked").unwrap();
    let glob = d.s("up.txt");
    let ff = api(
        "collect",
        &[
            &id,
            "Generic.Forensic.FileFinder",
            "--param",
            &format!("glob={glob}"),
            "--param",
            "upload=true",
            "--wait",
        ],
    );
    let up_flow = ff["flow_id"].as_str().unwrap().to_owned();
    api("flow uploads", &[&id, &up_flow]);
    api(
        "flow download",
        &[&id, &up_flow, "0", "--out", &d.s("down.txt")],
    );
    let long = api(
        "collect",
        &[
            &id,
            "Generic.Test.Rows",
            "--param",
            "count=100000",
            "--param",
            "pause_ms=100",
        ],
    );
    api("flow cancel", &[&id, long["flow_id"].as_str().unwrap()]);
    let h = api(
        "hunt create",
        &["Generic.Client.Info", "--client-limit", "1"],
    );
    let hunt = h["hunt_id"].as_str().unwrap().to_owned();
    api("hunt watch", &[&hunt]);
    api("hunt list", &[]);
    api("hunt show", &[&hunt]);
    api("hunt stop", &[&hunt]);
    api("cluster status", &[]);
    api("audit list", &[]);

    // The config commands, on a deployment of their own.
    let dir = d.path("other");
    let other = dir.to_str().unwrap();
    let mut config = |cmd: &str, args: &[&str]| {
        let mut a: Vec<&str> = cmd.split(' ').collect();
        a.extend(args);
        a.push("--json");
        parses(cmd, &ok(&a));
        ran.insert(cmd.to_owned());
    };
    config(
        "config generate",
        &["--hostname", "127.0.0.1", "--out-dir", other],
    );
    let server = format!("{other}/server.config.yaml");
    config("config frontend", &["-c", &server, "--add", "127.0.0.1:1"]);
    config("config rotate-ca", &["-c", &server]);
    config(
        "config api-client",
        &[
            "-c",
            &server,
            "--name",
            "bob",
            "--out",
            &format!("{other}/bob.yaml"),
        ],
    );
    // The agent's package (the server nodes' are built and checked in tests/package.rs).
    config(
        "package deb",
        &["-c", &server, "--client", "--out", &format!("{other}/debs")],
    );

    // The GUI's users (the password on stdin).
    for (cmd, args) in [
        ("user add", vec!["carol", "--role", "reader"]),
        ("user passwd", vec!["carol", "--role", "investigator"]),
        ("user list", vec![]),
        ("user remove", vec!["carol"]),
    ] {
        let mut a = vec!["-c", &server];
        a.extend(cmd.split(' '));
        a.extend(args);
        a.push("--json");
        let out = run_with_stdin(&a, "carol-password\n");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parses(cmd, &String::from_utf8_lossy(&out.stdout));
        ran.insert(cmd.to_owned());
    }

    let expected: BTreeSet<String> = all
        .into_iter()
        .filter(|(c, json)| *json && !NOT_RUN.contains(&c.as_str()))
        .map(|(c, _)| c)
        .collect();
    assert_eq!(ran, expected, "every command with --json is run here");
}

/// `--log-format json`: every line a node and an agent log is one JSON object with a level and
/// its fields; the agent says which frontend it connected to.
#[test]
fn logs_are_json_lines_when_asked() {
    let d = Deployment::new();
    let _master = d.start_frontend(
        "master",
        &["--local-dir", &d.s("local"), "--log-format", "json"],
    );
    d.wait_until("the API answers", || {
        run(&["--api-config", &d.s("api.yaml"), "clients", "search", "all"])
            .status
            .success()
    });
    let _client = Proc(
        talon()
            .args([
                "--log-format",
                "json",
                "-c",
                &d.s("client.config.yaml"),
                "client",
            ])
            .args(["--writeback", &d.s("c1.wb.yaml")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.path("c1.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    d.wait_until("the agent logs its connection", || {
        std::fs::read_to_string(d.path("c1.log")).is_ok_and(|l| l.contains("connected"))
    });
    for name in ["master.log", "c1.log"] {
        let log = std::fs::read_to_string(d.path(name)).unwrap();
        assert!(!log.is_empty(), "{name} is empty");
        for l in log.lines() {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}: a line that is not JSON ({e}): {l}"));
            assert!(
                v["level"].is_string() && v["fields"].is_object(),
                "{name}: {l}"
            );
        }
    }
    let log = std::fs::read_to_string(d.path("c1.log")).unwrap();
    let connected = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == "connected")
        .expect("a connected line");
    assert!(
        connected["fields"]["frontend"]
            .as_str()
            .is_some_and(|f| f.starts_with("127.0.0.1:")),
        "{connected}"
    );
}
