//! The endpoint artifacts, as the client runs them: every artifact is a definition
//! (`crate::definitions`) whose queries the engine runs (`crate::query`), but for
//! `Generic.Test.Rows`, the load generator, which is this module's code. Also what the agent reports
//! on connecting ([`client_info`]) and the glob walker the tables use. Linux only.
//!
//! Each artifact streams its rows (JSON objects) and uploads to an [`Emit`] callback, which may stop
//! it early (row limit reached, flow cancelled) by returning `Err(Stop)`.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The agent's version, reported by `Generic.Client.Info`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What an artifact produces.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// One result row.
    Row(Map<String, Value>),
    /// A file to upload into the filestore.
    Upload(PathBuf),
    /// Synthetic content to upload (load tests and the simulator): `size` bytes, byte `j` of upload
    /// number `index` being [`synthetic_byte`]`(index, j)`.
    SyntheticUpload {
        /// The name it is uploaded under.
        name: String,
        /// Which synthetic upload (its content depends on it).
        index: u64,
        /// Its length.
        size: u64,
    },
}

/// Byte `offset` of synthetic upload `index` (`Generic.Test.Rows uploads=`): cheap to make, and to
/// check by whoever reads the upload back.
pub fn synthetic_byte(index: u64, offset: u64) -> u8 {
    (index
        .wrapping_mul(131)
        .wrapping_add(offset.wrapping_mul(7))
        .wrapping_add(offset / 251)
        % 256) as u8
}

/// The name synthetic upload `index` is uploaded under.
pub fn synthetic_upload_name(index: u64) -> String {
    format!("/synthetic/upload-{index}.bin")
}

/// The consumer asked the artifact to stop.
#[derive(Debug, PartialEq, Eq)]
pub struct Stop;

/// Where an artifact sends its output.
pub type Emit<'a> = dyn FnMut(Output) -> Result<(), Stop> + 'a;

fn row(v: Value) -> Output {
    match v {
        Value::Object(m) => Output::Row(m),
        _ => unreachable!("rows are built as objects"),
    }
}

fn param<'a>(p: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    p.get(k).map(String::as_str).unwrap_or_default()
}

fn int(p: &BTreeMap<String, String>, k: &str) -> u64 {
    param(p, k).parse().unwrap_or(0)
}

/// What a task allows its artifact beyond its parameters.
pub struct Budget {
    /// Rows at most (0: the query engine's own bound).
    pub max_rows: u64,
    /// True once the task's time is up (looked at while a query runs).
    pub expired: Box<dyn FnMut() -> bool + Send>,
    /// Whose machine a query reads.
    pub host: crate::query::Host,
}

impl Budget {
    /// No limit of the task's own.
    pub fn unlimited() -> Budget {
        Budget {
            max_rows: 0,
            expired: Box::new(|| false),
            host: crate::query::Host::Real,
        }
    }
}

/// Runs an artifact with validated parameters: a custom one from the definition its task carries,
/// a built-in from the definition shipped in this binary (its queries, or this module's code for
/// the native ones). `Err` is the flow's error text.
pub fn run(
    name: &str,
    params: &BTreeMap<String, String>,
    budget: Budget,
    emit: &mut Emit<'_>,
) -> Result<(), String> {
    if let Some(compiled) = params.get(talon_core::artifacts::DEFINITION_PARAM) {
        let spec = crate::definitions::from_task(compiled)?;
        return crate::query::run_artifact(&spec, params, budget, emit);
    }
    if name == talon_core::artifacts::QUERY_ARTIFACT {
        return crate::query::run_query(param(params, "query"), budget, emit);
    }
    match crate::definitions::builtin(name) {
        Some(b) if !b.native => {
            return crate::query::run_artifact(&b.spec, params, budget, emit);
        }
        Some(_) => {}
        None => return Err(format!("this agent does not know artifact {name:?}")),
    }
    let r = match name {
        "Generic.Test.Rows" => test_rows(
            int(params, "count"),
            int(params, "size") as usize,
            int(params, "pause_ms"),
            emit,
        )
        .and_then(|()| {
            (0..int(params, "uploads")).try_for_each(|index| {
                emit(Output::SyntheticUpload {
                    name: synthetic_upload_name(index),
                    index,
                    size: int(params, "upload_size"),
                })
            })
        }),
        other => return Err(format!("built-in artifact {other:?} has no native code")),
    };
    match r {
        Ok(()) | Err(Stop) => Ok(()),
    }
}

pub(crate) fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The host's addresses: IPv4 from `/proc/net/fib_trie` (local host routes), IPv6 from
/// `/proc/net/if_inet6`, loopback excluded.
pub fn host_ips() -> Vec<String> {
    let mut ips = Vec::new();
    let trie = fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last = None;
    for line in trie.lines() {
        let t = line.trim();
        if let Some(ip) = t.strip_prefix("|-- ") {
            last = Some(ip.to_owned());
        } else if t.contains("/32 host LOCAL")
            && let Some(ip) = last.take()
            && !ip.starts_with("127.")
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    for line in fs::read_to_string("/proc/net/if_inet6")
        .unwrap_or_default()
        .lines()
    {
        let hex = line.split_whitespace().next().unwrap_or_default();
        if hex.len() == 32 && hex != "00000000000000000000000000000001" {
            let groups: Vec<String> = (0..8).map(|i| hex[i * 4..i * 4 + 4].to_owned()).collect();
            if let Ok(ip) = groups.join(":").parse::<std::net::Ipv6Addr>() {
                ips.push(ip.to_string());
            }
        }
    }
    ips
}

fn macs() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let mac = read_trim(&format!(
                "/sys/class/net/{}/address",
                e.file_name().to_string_lossy()
            ));
            if !mac.is_empty() && mac != "00:00:00:00:00:00" {
                out.push(mac);
            }
        }
    }
    out.sort();
    out
}

/// When this host booted (`/proc/stat` btime), seconds since the Unix epoch.
pub(crate) fn boot_time_unix_s() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// This host's name and its fully qualified name (with the kernel's domain name when set).
pub(crate) fn host_names() -> (String, String) {
    let hostname = read_trim("/proc/sys/kernel/hostname");
    let domain = read_trim("/proc/sys/kernel/domainname");
    let fqdn = if domain.is_empty() || domain == "(none)" {
        hostname.clone()
    } else {
        format!("{hostname}.{domain}")
    };
    (hostname, fqdn)
}

/// This host's facts, as one row.
pub fn client_info() -> Value {
    let (hostname, fqdn) = host_names();
    json!({
        "hostname": hostname,
        "fqdn": fqdn,
        "os": std::env::consts::OS,
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "arch": std::env::consts::ARCH,
        "boot_time": boot_time_unix_s(),
        "ips": host_ips(),
        "macs": macs(),
        "agent_version": AGENT_VERSION,
    })
}

/// Rows emitted between two pauses of `Generic.Test.Rows pause_ms=…`.
const TEST_ROWS_PER_PAUSE: u64 = 100;

fn test_rows(count: u64, size: usize, pause_ms: u64, emit: &mut Emit<'_>) -> Result<(), Stop> {
    let pad = "x".repeat(size);
    for i in 0..count {
        emit(row(json!({"row": i, "pad": pad})))?;
        // Paced load for real agents only: inline (the simulator) would block its host.
        if pause_ms > 0 && (i + 1) % TEST_ROWS_PER_PAUSE == 0 && i + 1 < count {
            std::thread::sleep(std::time::Duration::from_millis(pause_ms));
        }
    }
    Ok(())
}

/// TCP states by the number `/proc/net/tcp` shows (the kernel's `TCP_*` order).
pub(crate) const TCP_STATES: [&str; 13] = [
    "UNKNOWN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// Matches one path component against a pattern with `*` and `?`.
fn component_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Expands an absolute glob (`*`, `?` within a component, `**` for any depth) to the files it
/// matches, without following symlinked directories, up to `max` matches.
pub fn glob(pattern: &str, max: usize) -> Vec<PathBuf> {
    glob_keeping(pattern, max, |p| p.is_file())
}

/// [`glob`], keeping the matches for which `keep` holds (files, directories, both).
pub fn glob_keeping(pattern: &str, max: usize, keep: fn(&Path) -> bool) -> Vec<PathBuf> {
    let parts: Vec<&str> = pattern
        .trim_start_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let mut out = Vec::new();
    walk(Path::new("/"), &parts, max, keep, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, parts: &[&str], max: usize, keep: fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    if out.len() >= max {
        return;
    }
    let Some((first, rest)) = parts.split_first() else {
        if dir != Path::new("/") && keep(dir) {
            out.push(dir.to_owned());
        }
        return;
    };
    if *first == "**" {
        walk(dir, rest, max, keep, out); // Zero directories.
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut subdirs: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        for d in subdirs {
            walk(&d, parts, max, keep, out);
        }
        return;
    }
    if !first.contains(['*', '?']) {
        walk(&dir.join(first), rest, max, keep, out);
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        if component_matches(first, &n) {
            walk(&dir.join(n), rest, max, keep, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(name: &str, params: &[(&str, &str)]) -> Vec<Output> {
        let given = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let spec = &crate::definitions::builtin(name).unwrap().spec;
        let full = talon_core::artifacts::validate(spec, &given).unwrap();
        let mut out = Vec::new();
        run(name, &full, Budget::unlimited(), &mut |o| {
            out.push(o);
            Ok(())
        })
        .unwrap();
        out
    }

    fn rows(out: &[Output]) -> Vec<&Map<String, Value>> {
        out.iter()
            .filter_map(|o| {
                if let Output::Row(r) = o {
                    Some(r)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn every_catalogue_artifact_runs_here() {
        for b in crate::definitions::builtins() {
            let _ = collect(&b.spec.name, &[]);
        }
    }

    #[test]
    fn client_info_and_test_rows_have_their_fields() {
        let info = collect("Generic.Client.Info", &[]);
        let r = rows(&info)[0];
        // The artifact (SQL over the tables) says what the agent's own code reports on connecting.
        let hello = client_info();
        for k in [
            "hostname",
            "fqdn",
            "os",
            "kernel",
            "arch",
            "boot_time",
            "agent_version",
        ] {
            assert_eq!(r[k], hello[k], "{k}");
        }
        let set = |v: &Value| -> std::collections::BTreeSet<String> {
            v.as_array()
                .unwrap_or_else(|| panic!("{v}"))
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(set(&r["macs"]), set(&hello["macs"]));
        assert_eq!(set(&r["ips"]), set(&hello["ips"]));
        // The same columns, none missing.
        let keys: Vec<&String> = r.keys().collect();
        assert_eq!(keys, hello.as_object().unwrap().keys().collect::<Vec<_>>());
        assert_eq!(r["os"], "linux");
        let t = collect("Generic.Test.Rows", &[("count", "5"), ("size", "3")]);
        assert_eq!(rows(&t).len(), 5);
        assert_eq!(rows(&t)[4]["pad"], "xxx");
        // Paced: the same rows, in order, whatever the pauses.
        let paced = collect("Generic.Test.Rows", &[("count", "250"), ("pause_ms", "1")]);
        let n: Vec<u64> = rows(&paced)
            .iter()
            .map(|r| r["row"].as_u64().unwrap())
            .collect();
        assert_eq!(n, (0..250).collect::<Vec<u64>>());
    }

    #[test]
    fn pslist_finds_this_process_and_users_finds_root() {
        let me = std::process::id() as u64;
        let ps = collect("Linux.Sys.Pslist", &[]);
        let mine = rows(&ps)
            .into_iter()
            .find(|r| r["pid"] == me)
            .expect("this process is listed");
        assert!(mine["rss"].as_u64().unwrap() > 0);
        let users = collect("Linux.Sys.Users", &[]);
        assert!(
            rows(&users)
                .iter()
                .any(|r| r["name"] == "root" && r["uid"] == 0)
        );
    }

    #[test]
    fn netstat_sees_a_listening_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port() as u64;
        let ns = collect("Linux.Network.Netstat", &[]);
        let keys: Vec<&str> = rows(&ns)[0].keys().map(String::as_str).collect();
        let mut want = [
            "protocol",
            "local_address",
            "local_port",
            "remote_address",
            "remote_port",
            "state",
            "uid",
            "inode",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert!(rows(&ns).iter().any(|r| r["local_port"] == port
            && r["protocol"] == "tcp"
            && r["state"] == "LISTEN"
            && r["local_address"] == "127.0.0.1"));
    }

    #[test]
    fn file_finder_globs_hashes_and_uploads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/x.log"), b"abc").unwrap();
        std::fs::write(dir.path().join("a/y.log"), b"").unwrap();
        std::fs::write(dir.path().join("a/y.txt"), b"").unwrap();
        let g = format!("{}/**/*.log", dir.path().display());
        let out = collect(
            "Generic.Forensic.FileFinder",
            &[("glob", &g), ("upload", "true")],
        );
        let r = rows(&out);
        assert_eq!(r.len(), 2);
        let x = r
            .iter()
            .find(|r| r["path"].as_str().unwrap().ends_with("x.log"))
            .unwrap();
        assert_eq!(
            x["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Output::Upload(_)))
                .count(),
            2
        );
    }

    #[test]
    fn glob_components() {
        assert!(component_matches("*.log", "a.log"));
        assert!(component_matches("a?c", "abc"));
        assert!(!component_matches("*.log", "a.txt"));
        assert!(component_matches("*", ""));
        assert!(component_matches("a*b*c", "aXbYc"));
        assert!(!component_matches("a*b", "ac"));
    }

    #[test]
    fn a_stop_ends_the_artifact_early() {
        let p = talon_core::artifacts::validate(
            &crate::definitions::builtin("Generic.Test.Rows")
                .unwrap()
                .spec,
            &BTreeMap::from([("count".into(), "1000".into())]),
        )
        .unwrap();
        let mut n = 0;
        run("Generic.Test.Rows", &p, Budget::unlimited(), &mut |_| {
            n += 1;
            if n == 3 { Err(Stop) } else { Ok(()) }
        })
        .unwrap();
        assert_eq!(n, 3);
    }
}
