//! Helpers shared by the process tests: real `talon` processes on loopback, killed when dropped.
// Waiting for real processes needs the wall clock (timeouts only; nothing asserts on timing).
#![allow(clippy::disallowed_methods, dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn talon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_talon"))
}

pub fn run(args: &[&str]) -> Output {
    talon().args(args).output().expect("run talon")
}

/// Runs `talon ARGS` with `stdin` as its input (a password, say).
pub fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = talon()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run talon");
    // A command that exits before reading its input closes the pipe: not the test's failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().expect("run talon")
}

pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "talon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `N` distinct free ports (each held until all are picked, so no two are the same).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Deployment {
    pub dir: tempfile::TempDir,
}

impl Deployment {
    pub fn new() -> Deployment {
        Deployment::with_datastore(None)
    }

    /// A deployment whose shared volume is `shared` (default: `shared/` in its directory).
    pub fn with_datastore(shared: Option<&Path>) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: u16| n.to_string();
        let (fe, api, gui) = (free_port(), free_port(), free_port());
        let out = dir.path().to_str().unwrap().to_owned();
        let shared = shared.map_or_else(|| dir.path().join("shared"), Path::to_owned);
        ok(&[
            "config",
            "generate",
            "--hostname",
            "127.0.0.1",
            "--frontend-port",
            &p(fe),
            "--api-port",
            &p(api),
            "--gui-port",
            &p(gui),
            // No metrics listener unless a test asks for one (`--monitoring-port` on a node):
            // tests run in parallel and would all take the default port.
            "--monitoring-port",
            "0",
            "--datastore",
            shared.to_str().unwrap(),
            "--out-dir",
            &out,
        ]);
        let d = Deployment { dir };
        ok(&[
            "-c",
            d.path("server.config.yaml").to_str().unwrap(),
            "config",
            "api-client",
            "--name",
            "alice",
            "--out",
            d.path("api.yaml").to_str().unwrap(),
        ]);
        d
    }

    /// Adds a minion on a free loopback port to the deployment's configs; returns its node name
    /// and port.
    pub fn add_minion(&self) -> (String, u16) {
        // A free port may be one the master's config names but has not bound yet: the command
        // refuses that ("clashes with a master port"), and another is tried.
        for _ in 0..20 {
            let port = free_port();
            let out = run(&[
                "-c",
                &self.s("server.config.yaml"),
                "config",
                "frontend",
                "--add",
                &format!("127.0.0.1:{port}"),
            ]);
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return (format!("127.0.0.1-{port}"), port);
            }
            assert!(err.contains("clashes with"), "config frontend --add: {err}");
        }
        panic!("no free port that the master does not use");
    }

    /// Every (client, row) pair of a hunt's export, asserting none appears twice.
    pub fn hunt_export(&self, hunt: &str) -> std::collections::BTreeSet<(String, u64)> {
        let out = self.api(&["hunt", "results", hunt]);
        let pairs: std::collections::BTreeSet<(String, u64)> = out
            .lines()
            .map(|l| {
                let v = json(l);
                (
                    v["client_id"].as_str().unwrap().to_owned(),
                    v["row"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(out.lines().count(), pairs.len(), "a row appears twice");
        pairs
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    pub fn start_master(&self) -> Proc {
        self.start_master_with(&[])
    }

    /// [`Deployment::start_master`] with more `frontend` arguments.
    pub fn start_master_with(&self, more: &[&str]) -> Proc {
        let local = self.s("local");
        let mut args = vec!["--local-dir", local.as_str()];
        args.extend_from_slice(more);
        let p = self.start_frontend("master", &args);
        self.wait_until("the API answers", || {
            run(&[
                "--api-config",
                &self.s("api.yaml"),
                "clients",
                "search",
                "all",
            ])
            .status
            .success()
        });
        p
    }

    /// Starts the master and one agent (`c1`, logging to `c1.log`), and waits until it enrolled;
    /// returns both processes and the agent's client id.
    pub fn master_and_client(&self) -> (Proc, Proc, String) {
        let master = self.start_master();
        let client = self.start_client(&self.path("client.config.yaml"), "c1");
        self.wait_until("the client enrols", || self.clients().len() == 1);
        let id = self.clients()[0]["client_id"].as_str().unwrap().to_owned();
        (master, client, id)
    }

    /// Starts the minion `node` (HOST-PORT) with its own local disk; it logs to `<node>.log`.
    pub fn start_minion(&self, node: &str) -> Proc {
        let local = self.s(&format!("local-{node}"));
        self.start_frontend(node, &["--minion", "--node", node, "--local-dir", &local])
    }

    /// Starts a frontend with `args`, logging to `<name>.log`; it does not wait for it to answer.
    pub fn start_frontend(&self, name: &str, args: &[&str]) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{name}.log")))
            .unwrap();
        let child = talon()
            .args(["-c", &self.s("server.config.yaml"), "frontend"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    pub fn start_client(&self, config: &Path, name: &str) -> Proc {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = talon()
            .args([
                "-c",
                config.to_str().unwrap(),
                "client",
                "--writeback",
                &self.s(&format!("{name}.wb.yaml")),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// Starts `pool-client` with `n` virtual clients keyed in `dir`; it logs to `<dir>.log`.
    pub fn start_pool(&self, n: usize, dir: &str) -> Proc {
        self.start_pool_with(n, dir, &[])
    }

    /// [`Deployment::start_pool`] with more `pool-client` arguments.
    pub fn start_pool_with(&self, n: usize, dir: &str, more: &[&str]) -> Proc {
        let log = std::fs::File::create(self.path(&format!("{dir}.log"))).unwrap();
        Proc(
            talon()
                .args([
                    "-c",
                    &self.s("client.config.yaml"),
                    "pool-client",
                    "--number",
                    &n.to_string(),
                    "--writeback-dir",
                    &self.s(dir),
                    "--start-rate",
                    "0",
                ])
                .args(more)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    pub fn api(&self, args: &[&str]) -> String {
        let mut a = vec!["--api-config".to_string(), self.s("api.yaml")];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ok(&a)
    }

    /// An API command that must succeed: its standard output and standard error.
    #[allow(dead_code)]
    pub fn api_with_stderr(&self, args: &[&str]) -> (String, String) {
        let mut a = vec!["--api-config".to_string(), self.s("api.yaml")];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "talon {a:?}: {err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    }

    /// An API command that must fail: its standard error.
    #[allow(dead_code)]
    pub fn api_refused(&self, args: &[&str]) -> String {
        let mut a = vec!["--api-config".to_string(), self.s("api.yaml")];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        err
    }

    pub fn clients(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<Vec<serde_json::Value>>(
            &self.api(&["clients", "search", "all", "--json"]),
        )
        .unwrap()
    }

    pub fn wait_until(&self, what: &str, f: impl FnMut() -> bool) {
        self.wait_until_within(what, Duration::from_secs(120), f)
    }

    /// [`Deployment::wait_until`], giving up after `limit`.
    pub fn wait_until_within(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            if start.elapsed() > limit {
                let mut logs = String::new();
                for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "log") {
                        let text = std::fs::read_to_string(&p).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        logs.push_str(&format!("--- {} (last 40 lines)\n", p.display()));
                        for l in tail.into_iter().rev() {
                            logs.push_str(l);
                            logs.push('\n');
                        }
                    }
                }
                panic!("timed out waiting until {what}; logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `GET path` from a plain-HTTP server on loopback `port`: the status and the body (one request,
/// `Connection: close`; enough for the metrics endpoint and Prometheus's API).
#[allow(dead_code)]
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A sample's value in Prometheus text: the line starting `series ` (name and labels as printed).
#[allow(dead_code)]
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Every stored test event of a client as `(stream, n)`, asserting none appears twice and no
/// stream has a gap.
#[allow(dead_code)]
pub fn test_events_exactly_once(d: &Deployment, id: &str) -> BTreeSet<(u64, u64)> {
    let out = d.api(&["events", "show", id, "Generic.Events.Test", "--json"]);
    let all: Vec<(u64, u64)> = out
        .lines()
        .map(|l| {
            let v = json(l);
            (v["_stream"].as_u64().unwrap(), v["n"].as_u64().unwrap())
        })
        .collect();
    let set: BTreeSet<(u64, u64)> = all.iter().copied().collect();
    assert_eq!(set.len(), all.len(), "{id}: an event is stored twice");
    let mut by_stream: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (s, n) in &set {
        by_stream.entry(*s).or_default().push(*n);
    }
    for (s, ns) in &by_stream {
        let want: Vec<u64> = (0..ns.len() as u64).collect();
        assert_eq!(ns, &want, "{id}: stream {s} has a gap");
    }
    set
}
