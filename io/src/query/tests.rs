//! The engine's guarantees (only reads, bounded, clear errors) and its tables against tools
//! nobody here wrote (`ps`, `getent`, `sha256sum`, `md5sum`, `stat`, `ss`, `dpkg-query`).

use super::*;
use serde_json::Value as J;
use std::collections::BTreeSet;
use std::process::Command;

fn rows(e: &mut Engine, sql: &str) -> Result<Vec<serde_json::Map<String, J>>, QueryError> {
    rows_with(e, sql, &BTreeMap::new())
}

fn rows_with(
    e: &mut Engine,
    sql: &str,
    params: &BTreeMap<String, String>,
) -> Result<Vec<serde_json::Map<String, J>>, QueryError> {
    let mut out = Vec::new();
    let params: Bindings = params
        .iter()
        .map(|(k, v)| (k.clone(), table::Value::Text(v.clone())))
        .collect();
    e.run(sql, &params, Limits::default(), || false, &mut |r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

fn engine() -> Engine {
    Engine::new().expect("the engine starts")
}

/// A tool's standard output; panics naming the tool if it cannot run (CI installs them).
fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (installed by .ci/run): {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn text(r: &serde_json::Map<String, J>, k: &str) -> String {
    match &r[k] {
        J::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[test]
fn every_table_answers_a_select() {
    let mut e = engine();
    for t in tables() {
        let sql = if t.required.is_empty() {
            format!("SELECT * FROM {}", t.name)
        } else {
            format!(
                "SELECT * FROM {} WHERE {} = '/etc/hostname'",
                t.name, t.required[0]
            )
        };
        let got = rows(&mut e, &sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        if let Some(r) = got.first() {
            let names: Vec<&str> = r.keys().map(String::as_str).collect();
            let want: Vec<&str> = t.columns.iter().map(|c| c.name).collect();
            assert_eq!(
                names.iter().collect::<BTreeSet<_>>(),
                want.iter().collect::<BTreeSet<_>>(),
                "{}",
                t.name
            );
        }
    }
    // One-row tables have their row.
    for t in ["system_info", "os_version", "uptime"] {
        assert_eq!(
            rows(&mut e, &format!("SELECT * FROM {t}")).unwrap().len(),
            1,
            "{t}"
        );
    }
}

#[test]
fn queries_only_read_and_say_what_they_may_not_do() {
    let mut e = engine();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("copy.db");
    for (sql, want) in [
        ("INSERT INTO users VALUES (1)", "not allowed"),
        ("DELETE FROM processes", "not allowed"),
        ("CREATE TABLE t(x)", "not allowed"),
        ("CREATE TEMP TABLE t(x)", "not allowed"),
        ("CREATE TEMP VIEW v AS SELECT 1", "not allowed"),
        (
            &format!("ATTACH DATABASE '{}' AS x", target.display()),
            "ATTACH",
        ),
        (
            &format!("VACUUM INTO '{}'", target.display()),
            "not allowed",
        ),
        ("PRAGMA hard_heap_limit = 0", "PRAGMA hard_heap_limit"),
        ("SELECT * FROM pragma_table_info('users')", "PRAGMA"),
        ("SELECT load_extension('/tmp/x.so')", "load_extension"),
        ("BEGIN", "not allowed"),
        ("SELECT 1; DELETE FROM users", "not allowed"),
        ("SELECT 1; SELECT 2", "one statement"),
    ] {
        let err = rows(&mut e, sql).expect_err(sql);
        assert!(err.message.contains(want), "{sql}: {err}");
    }
    assert!(!target.exists(), "nothing was written");
    // The engine still serves.
    assert_eq!(rows(&mut e, "SELECT 1 AS one").unwrap()[0]["one"], 1);
}

#[test]
fn a_runaway_query_is_stopped_by_its_clock_and_the_engine_keeps_serving() {
    let mut e = engine();
    let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) \
               SELECT count(*) FROM c";
    // The clock says "expired" at its fifth look: deterministic, no wall time involved.
    let mut looks = 0;
    let err = e
        .run(
            sql,
            &BTreeMap::new(),
            Limits::default(),
            move || {
                looks += 1;
                looks >= 5
            },
            &mut |_| Ok(()),
        )
        .unwrap_err();
    assert!(err.message.contains("ran out of time"), "{err}");
    assert_eq!(rows(&mut e, "SELECT 2 AS two").unwrap()[0]["two"], 2);
}

#[test]
fn rows_and_bytes_are_bounded() {
    let mut e = engine();
    let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000) \
               SELECT x FROM c";
    let mut n = 0;
    let limits = Limits {
        rows: 10,
        ..Limits::default()
    };
    let err = e
        .run(sql, &Bindings::new(), limits, || false, &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap_err();
    assert_eq!(n, 10);
    assert!(err.message.contains("stopped after 10 rows"), "{err}");
    let limits = Limits {
        rows: 1000,
        bytes: 100,
    };
    let err = e
        .run(sql, &Bindings::new(), limits, || false, &mut |_| Ok(()))
        .unwrap_err();
    assert!(err.message.contains("exceed 100 bytes"), "{err}");
    // A value longer than the string bound fails (memory), not the process.
    let err = rows(&mut e, "SELECT length(zeroblob(100000000))").unwrap_err();
    assert!(err.message.contains("too big"), "{err}");
    // The output may stop the run early.
    let mut n = 0;
    e.run(
        sql,
        &BTreeMap::new(),
        Limits::default(),
        || false,
        &mut |_| {
            n += 1;
            if n == 3 { Err(Stop) } else { Ok(()) }
        },
    )
    .unwrap();
    assert_eq!(n, 3);
}

#[test]
fn errors_name_the_table_the_column_or_the_position() {
    let e = engine();
    let err = e.check("SELECT * FROM file").unwrap_err();
    assert!(
        err.message.contains("table file needs a constraint") && err.message.contains("path"),
        "{err}"
    );
    let err = e
        .check("SELECT md5 FROM hash WHERE sha256 = 'x'")
        .unwrap_err();
    assert!(err.message.contains("table hash needs"), "{err}");
    let err = e.check("SELECT * FROM no_such").unwrap_err();
    assert!(err.message.contains("no such table: no_such"), "{err}");
    let err = e.check("SELECT nope FROM users").unwrap_err();
    assert!(err.message.contains("no such column: nope"), "{err}");
    assert_eq!(err.offset, Some(7), "{err}");
    let err = e
        .check("SELECT pid FROM processes WHER pid = 1")
        .unwrap_err();
    assert!(err.message.contains("syntax error"), "{err}");
    assert!(err.offset.is_some(), "{err}");
    assert!(e.check("").unwrap_err().message.contains("empty"));
    let long = format!("SELECT '{}'", "x".repeat(SQL_BYTES_MAX));
    assert!(e.check(&long).unwrap_err().message.contains("at most"));
    // What a check tells the master.
    let c = e
        .check("SELECT p.name, u.username FROM processes p JOIN users u ON p.uid = u.uid WHERE u.username = :who")
        .unwrap();
    assert_eq!(c.columns, vec!["name", "username"]);
    assert_eq!(c.params, vec!["who"]);
    assert_eq!(c.tables, vec!["processes", "users"]);
}

#[test]
fn required_constraints_come_from_where_in_like_or_a_join() {
    let mut e = engine();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.txt"), "alpha").unwrap();
    std::fs::write(dir.path().join("b.log"), "beta").unwrap();
    std::fs::write(dir.path().join("sub/c.txt"), "gamma").unwrap();
    let names = |rs: Vec<serde_json::Map<String, J>>, k: &str| -> Vec<String> {
        let mut v: Vec<String> = rs.iter().map(|r| text(r, k)).collect();
        v.sort();
        v
    };
    let got = rows(
        &mut e,
        &format!("SELECT filename FROM file WHERE directory = '{d}'"),
    )
    .unwrap();
    assert_eq!(names(got, "filename"), vec!["a.txt", "b.log", "sub"]);
    // % is one level, %% any depth (osquery's rule); SQLite's LIKE then filters exactly.
    let got = rows(
        &mut e,
        &format!("SELECT filename FROM file WHERE path LIKE '{d}/%.txt'"),
    )
    .unwrap();
    assert_eq!(names(got, "filename"), vec!["a.txt"]);
    let got = rows(
        &mut e,
        &format!("SELECT filename FROM file WHERE path LIKE '{d}/%%.txt'"),
    )
    .unwrap();
    assert_eq!(names(got, "filename"), vec!["a.txt", "c.txt"]);
    let got = rows(
        &mut e,
        &format!("SELECT path FROM file WHERE path IN ('{d}/a.txt', '{d}/b.log', '{d}/none')"),
    )
    .unwrap();
    assert_eq!(got.len(), 2);
    // A join supplies hash.path from file.
    let got = rows(
        &mut e,
        &format!(
            "SELECT f.filename, h.sha256 FROM file f JOIN hash h ON h.path = f.path \
             WHERE f.directory = '{d}' AND f.type = 'regular'"
        ),
    )
    .unwrap();
    assert_eq!(names(got.clone(), "filename"), vec!["a.txt", "b.log"]);
    assert!(got.iter().all(|r| text(r, "sha256").len() == 64));
    // Parameters are bound, never spliced.
    let params = BTreeMap::from([("p".to_owned(), format!("{d}/a.txt"))]);
    let got = rows_with(&mut e, "SELECT md5 FROM hash WHERE path = :p", &params).unwrap();
    assert_eq!(text(&got[0], "md5"), "2c1743a391305fbf367df8e4f069f9f9");
    let err = rows(&mut e, "SELECT md5 FROM hash WHERE path = :p").unwrap_err();
    assert!(err.message.contains("parameter :p"), "{err}");
}

#[test]
fn processes_match_ps() {
    let mut e = engine();
    let ours: BTreeMap<i64, (i64, String)> =
        rows(&mut e, "SELECT pid, parent, name FROM processes")
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["pid"].as_i64().unwrap(),
                    (r["parent"].as_i64().unwrap(), text(r, "name")),
                )
            })
            .collect();
    let ps = tool("ps", &["-e", "-o", "pid=,ppid=,comm="]);
    let theirs: Vec<(i64, i64, String)> = ps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.collect::<Vec<_>>().join(" "),
            ))
        })
        .collect();
    // Processes come and go between the two reads: those alive at both agree exactly (a kernel
    // worker's name is the work it does now, so for kernel threads only the parent is compared).
    let mut both = 0;
    for (pid, ppid, comm) in &theirs {
        if let Some((parent, name)) = ours.get(pid) {
            assert_eq!(parent, ppid, "pid {pid}");
            if *pid != 2 && *ppid != 2 {
                assert_eq!(name, comm, "pid {pid}");
            }
            both += 1;
        }
    }
    assert!(
        both * 10 >= theirs.len() * 9,
        "{both} of {} seen by both",
        theirs.len()
    );
    // This process is there, with its own pid.
    let me = std::process::id();
    let mine = rows(
        &mut e,
        &format!("SELECT pid, path FROM processes WHERE pid = {me}"),
    )
    .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        text(&mine[0], "path"),
        std::env::current_exe().unwrap().display().to_string()
    );
}

#[test]
fn users_and_groups_match_getent() {
    let mut e = engine();
    let ours: BTreeSet<String> = rows(
        &mut e,
        "SELECT username || ':' || uid || ':' || gid || ':' || directory || ':' || shell AS l FROM users",
    )
    .unwrap()
    .iter()
    .map(|r| text(r, "l"))
    .collect();
    let theirs: BTreeSet<String> = tool("getent", &["passwd"])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            format!("{}:{}:{}:{}:{}", f[0], f[2], f[3], f[5], f[6])
        })
        .collect();
    assert_eq!(ours, theirs);
    let ours: BTreeSet<String> = rows(&mut e, "SELECT groupname || ':' || gid AS l FROM groups")
        .unwrap()
        .iter()
        .map(|r| text(r, "l"))
        .collect();
    let theirs: BTreeSet<String> = tool("getent", &["group"])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            format!("{}:{}", f[0], f[2])
        })
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn hash_and_file_match_sha256sum_md5sum_sha1sum_and_stat() {
    let mut e = engine();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let ps = p.display().to_string();
    let r = &rows(&mut e, &format!("SELECT * FROM hash WHERE path = '{ps}'")).unwrap()[0];
    for (col, cmd) in [
        ("sha256", "sha256sum"),
        ("md5", "md5sum"),
        ("sha1", "sha1sum"),
    ] {
        let want = tool(cmd, &[&ps]);
        assert_eq!(
            text(r, col),
            want.split_whitespace().next().unwrap(),
            "{col}"
        );
    }
    for path in [ps.as_str(), "/etc/passwd", "/etc", "/usr/bin/env"] {
        let r = &rows(&mut e, &format!("SELECT * FROM file WHERE path = '{path}'")).unwrap()[0];
        let want = tool("stat", &["-c", "%s %Y %X %Z %i %u %g %a %h", path]);
        let got = format!(
            "{} {} {} {} {} {} {} {} {}",
            text(r, "size"),
            text(r, "mtime"),
            text(r, "atime"),
            text(r, "ctime"),
            text(r, "inode"),
            text(r, "uid"),
            text(r, "gid"),
            text(r, "mode").trim_start_matches('0'),
            text(r, "hard_links"),
        );
        assert_eq!(got, want.trim(), "{path}");
    }
}

#[test]
fn listening_ports_match_ss() {
    // One TCP listener and one UDP socket of our own, so there is something to compare.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut e = engine();
    let ours: BTreeSet<(i64, String, i64)> = rows(
        &mut e,
        "SELECT protocol, address, port FROM listening_ports",
    )
    .unwrap()
    .iter()
    .map(|r| {
        (
            r["protocol"].as_i64().unwrap(),
            text(r, "address"),
            r["port"].as_i64().unwrap(),
        )
    })
    .collect();
    let ss = tool("ss", &["-ltnuH"]);
    let theirs: BTreeSet<(i64, String, i64)> = ss
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let proto = if f.first()? == &"tcp" { 6 } else { 17 };
            let (addr, port) = f.get(4)?.rsplit_once(':')?;
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            // ss writes an interface scope (`%lo`) and `*` for any address.
            let addr = addr.split('%').next()?;
            let addr = match addr {
                "*" if proto == 6 || proto == 17 => return None,
                a => a.to_owned(),
            };
            Some((proto, addr, port.parse().ok()?))
        })
        .collect();
    for want in [
        (
            6,
            "127.0.0.1".to_owned(),
            i64::from(tcp.local_addr().unwrap().port()),
        ),
        (
            17,
            "127.0.0.1".to_owned(),
            i64::from(udp.local_addr().unwrap().port()),
        ),
    ] {
        assert!(ours.contains(&want), "{want:?} not in {ours:?}");
        assert!(theirs.contains(&want), "{want:?} not in ss: {ss}");
    }
    // Every socket ss lists with an address is ours too (sockets may open between the reads,
    // not ours to list; those closed between them are the only ones allowed missing).
    let missing: Vec<_> = theirs.difference(&ours).collect();
    assert!(missing.len() <= 2, "missing {missing:?}\nss: {ss}");
    // Our own sockets are attributed to this process.
    let me = std::process::id();
    let port = tcp.local_addr().unwrap().port();
    let r = rows(
        &mut e,
        &format!("SELECT pid, fd FROM listening_ports WHERE port = {port} AND protocol = 6"),
    )
    .unwrap();
    assert_eq!(r[0]["pid"].as_i64(), Some(i64::from(me)));
}

#[test]
fn deb_packages_match_dpkg_query() {
    let mut e = engine();
    let ours: BTreeSet<String> = rows(
        &mut e,
        "SELECT name || ' ' || version || ' ' || arch AS l FROM deb_packages",
    )
    .unwrap()
    .iter()
    .map(|r| text(r, "l"))
    .collect();
    let dq = tool(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${db:Status-Status} ${Package} ${Version} ${Architecture}\n",
        ],
    );
    let theirs: BTreeSet<String> = dq
        .lines()
        .filter_map(|l| l.strip_prefix("installed "))
        .map(str::to_owned)
        .collect();
    assert!(!theirs.is_empty());
    let only_dpkg: Vec<_> = theirs.difference(&ours).collect();
    assert!(only_dpkg.is_empty(), "not listed: {only_dpkg:?}");
}

#[test]
fn osquery_pack_queries_run_unchanged() {
    // Written as osquery's published packs write them (incident-response, ossec-rootkit, ...).
    let mut e = engine();
    for sql in [
        "SELECT * FROM listening_ports;",
        "SELECT pid, name, path, cmdline FROM processes WHERE on_disk = 0;",
        "SELECT username, uid, gid, directory, shell FROM users WHERE uid = 0;",
        "SELECT p.name, p.pid, lp.port, lp.address FROM listening_ports lp JOIN processes p USING (pid) WHERE lp.port != 0;",
        "SELECT * FROM kernel_modules;",
        "SELECT name, version FROM deb_packages WHERE name LIKE 'lib%';",
        "SELECT * FROM mounts WHERE type NOT IN ('proc', 'sysfs', 'cgroup2');",
        "SELECT path, md5, sha256 FROM hash WHERE path IN (SELECT path FROM file WHERE directory = '/etc' AND type = 'regular') LIMIT 5;",
        "SELECT * FROM file WHERE path LIKE '/etc/%%' AND filename = 'hostname';",
        "SELECT days, hours FROM uptime;",
        "SELECT hostname, cpu_brand, physical_memory FROM system_info;",
        "SELECT name, version, platform FROM os_version;",
        "SELECT * FROM etc_hosts WHERE address NOT IN ('127.0.0.1', '::1');",
        "SELECT g.groupname, count(*) AS members FROM users u JOIN groups g ON u.gid = g.gid GROUP BY g.groupname;",
        "SELECT * FROM crontab;",
        "SELECT * FROM shell_history;",
        "SELECT * FROM authorized_keys;",
        "SELECT DISTINCT pid, family, protocol, local_address, local_port, remote_address, remote_port, path FROM process_open_sockets WHERE path <> '' OR remote_address <> '';",
        "SELECT * FROM routes WHERE destination = '0.0.0.0';",
        "SELECT interface, address, mask FROM interface_addresses WHERE address NOT LIKE '127.%';",
        "SELECT u.username, ak.key_file, ak.algorithm FROM users u JOIN authorized_keys ak USING (uid);",
        "SELECT liu.*, p.name, p.cmdline, p.cwd, p.root FROM logged_in_users liu, processes p WHERE liu.pid = p.pid;",
    ] {
        rows(&mut e, sql).unwrap_or_else(|err| panic!("{sql}: {err}"));
    }
}

#[test]
fn docs_list_every_table_and_column() {
    let read = |f: &str| {
        std::fs::read_to_string(format!("{}/../docs/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let (tables_doc, events_doc) = (read("artifacts.md"), read("events.md"));
    for t in tables() {
        // Event tables are described with the rest of event monitoring.
        let doc = if is_event_table(t.name) {
            &events_doc
        } else {
            &tables_doc
        };
        let head = format!("### `{}`", t.name);
        let start = doc
            .find(&head)
            .unwrap_or_else(|| panic!("docs (artifacts.md or events.md) lack {head}"));
        let section = &doc[start + head.len()..];
        let section = &section[..section.find("### ").unwrap_or(section.len())];
        for c in t.columns {
            let row = format!("| `{}` | {} |", c.name, c.ty.sql());
            assert!(
                section.contains(&row),
                "docs/artifacts.md, {}: lacks {row}",
                t.name
            );
        }
    }
}

#[test]
fn virtual_agents_share_scans_and_show_their_own_host_name() {
    let cache = TableCache::new(std::sync::Arc::new(crate::clock::SystemClock));
    let host = |n: &str| Host::Virtual {
        hostname: n.into(),
        cache: cache.clone(),
    };
    let mut a = Engine::for_host(host("pool-1")).unwrap();
    let mut b = Engine::for_host(host("pool-2")).unwrap();
    let sql = "SELECT hostname, computer_name, cpu_logical_cores FROM system_info";
    let ra = rows(&mut a, sql).unwrap();
    let rb = rows(&mut b, sql).unwrap();
    assert_eq!(
        (text(&ra[0], "hostname"), text(&ra[0], "computer_name")),
        ("pool-1".into(), "pool-1".into())
    );
    assert_eq!(text(&rb[0], "hostname"), "pool-2");
    assert_eq!(ra[0]["cpu_logical_cores"], rb[0]["cpu_logical_cores"]);
    assert_eq!(cache.len(), 1, "one scan served both");
    // Constraints are part of a scan's identity.
    rows(&mut a, "SELECT pid FROM processes WHERE pid = 1").unwrap();
    rows(&mut b, "SELECT pid FROM processes WHERE pid = 1").unwrap();
    assert_eq!(cache.len(), 2);
    // The real machine's engine shows the real name.
    let real = rows(&mut engine(), sql).unwrap();
    assert_eq!(
        text(&real[0], "hostname"),
        crate::agent::artifacts::host_names().1
    );
}

#[test]
fn interface_addresses_and_routes_match_ip() {
    let mut e = engine();
    let ours: BTreeSet<(String, String)> =
        rows(&mut e, "SELECT interface, address FROM interface_addresses")
            .unwrap()
            .iter()
            .map(|r| (text(r, "interface"), text(r, "address")))
            .collect();
    let theirs: BTreeSet<(String, String)> = tool("ip", &["-o", "addr", "show"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = f.get(3)?.split('/').next()?;
            // An IPv6 link-local address carries its interface as scope (fe80::1%eth0) in some
            // tools; ip writes it bare, as getifaddrs does.
            Some((f.get(1)?.trim_end_matches(':').to_owned(), addr.to_owned()))
        })
        .collect();
    assert_eq!(ours, theirs);
    let ours: BTreeSet<String> = rows(
        &mut e,
        "SELECT destination, netmask, interface, gateway FROM routes",
    )
    .unwrap()
    .iter()
    .map(|r| {
        let via = match text(r, "gateway").as_str() {
            "0.0.0.0" => String::new(),
            g => format!(" via {g}"),
        };
        format!(
            "{}/{}{via} dev {}",
            text(r, "destination"),
            text(r, "netmask"),
            text(r, "interface")
        )
    })
    .collect();
    let theirs: BTreeSet<String> = tool("ip", &["-4", "route", "show", "table", "main"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = match f.first()? {
                &"default" => "0.0.0.0/0".to_owned(),
                d if d.contains('/') => d.to_string(),
                d => format!("{d}/32"),
            };
            let via = f
                .iter()
                .position(|w| *w == "via")
                .map(|i| format!(" via {}", f[i + 1]));
            let dev = f[f.iter().position(|w| *w == "dev")? + 1];
            Some(format!("{dest}{} dev {dev}", via.unwrap_or_default()))
        })
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn process_open_sockets_show_a_connection_of_ours_as_ss_does() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_server, _) = listener.accept().unwrap();
    let local = client.local_addr().unwrap().port();
    let mut e = engine();
    let sql = format!(
        "SELECT pid, state, remote_port FROM process_open_sockets WHERE local_port = {local} AND protocol = 6"
    );
    let r = rows(&mut e, &sql).unwrap();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["pid"].as_i64(), Some(i64::from(std::process::id())));
    assert_eq!(text(&r[0], "state"), "ESTABLISHED");
    assert_eq!(r[0]["remote_port"].as_i64(), Some(i64::from(port)));
    let ss = tool("ss", &["-tanH", &format!("sport = :{local}")]);
    assert!(ss.starts_with("ESTAB"), "{ss}");
    assert!(ss.contains(&format!("127.0.0.1:{port}")), "{ss}");
}

fn definition_rows(
    spec: &talon_core::artifacts::ArtifactSpec,
    params: &[(&str, &str)],
    max_rows: u64,
) -> Result<Vec<serde_json::Map<String, J>>, String> {
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let params = talon_core::artifacts::validate(spec, &params).map_err(|e| e.to_string())?;
    let mut budget = crate::agent::artifacts::Budget::unlimited();
    budget.max_rows = max_rows;
    let mut out = Vec::new();
    run_artifact(spec, &params, budget, &mut |o| {
        if let crate::agent::artifacts::Output::Row(r) = o {
            out.push(r);
        }
        Ok(())
    })?;
    Ok(out)
}

const TWO_SOURCES: &str = r#"
name: Custom.Test.Two
parameters:
  - {name: n, type: int, max: 100, default: 3}
  - {name: on, type: bool, default: true}
  - {name: word, default: "x"}
json_columns: [list]
sources:
  - name: counted
    query: |
      WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < :n)
      SELECT i, :on AS flag, typeof(:n) AS t FROM c
  - name: shaped
    query: SELECT json_array(1, 'a') AS list, :word AS word, json_array(1) AS plain
"#;

#[test]
fn a_definition_binds_its_parameters_runs_every_source_and_keeps_json_columns() {
    let spec = crate::definitions::parse(TWO_SOURCES).unwrap();
    check_artifact(&spec, &BTreeMap::new()).unwrap();
    // A value that would change the query if it were spliced into the text stays a value.
    let hostile = "x' UNION SELECT username FROM users --";
    let rows = definition_rows(&spec, &[("n", "4"), ("word", hostile)], 0).unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    for (i, r) in rows[..4].iter().enumerate() {
        assert_eq!(r["i"], J::from(i as i64 + 1));
        assert_eq!(r["flag"], J::from(1), "bool bound as 1");
        assert_eq!(r["t"], "integer", "int bound as an integer");
        assert_eq!(r["_source"], "counted");
    }
    let last = &rows[4];
    assert_eq!(last["list"], serde_json::json!([1, "a"]), "a JSON column");
    assert_eq!(last["plain"], "[1]", "not a JSON column: text");
    assert_eq!(last["word"], hostile);
    assert_eq!(last["_source"], "shaped");
    // The task's row bound covers every source together.
    assert_eq!(definition_rows(&spec, &[("n", "4")], 5).unwrap().len(), 5);
    let e = definition_rows(&spec, &[("n", "4")], 4).unwrap_err();
    assert!(
        e.contains("source shaped failed") && e.contains("stopped after 0 rows"),
        "{e}"
    );
    let e = definition_rows(&spec, &[("n", "4")], 3).unwrap_err();
    assert!(e.contains("source counted failed"), "{e}");
    // One source: its rows as they are, no source column.
    let one = crate::definitions::parse(
        "name: Custom.One\nsources: [{query: SELECT username FROM users WHERE uid = 0}]",
    )
    .unwrap();
    let rows = definition_rows(&one, &[], 0).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].keys().collect::<Vec<_>>(), ["username"]);
}

#[test]
fn a_definition_is_refused_naming_the_source_and_what() {
    let refused = |text: &str, says: &str, at: bool| {
        let spec = crate::definitions::parse(text).unwrap();
        let e = check_artifact(&spec, &BTreeMap::new()).unwrap_err();
        assert!(
            e.to_string().contains(says),
            "{text}: {e} should say {says}"
        );
        assert_eq!(e.offset.is_some(), at, "{text}: {e:?}");
    };
    refused(
        "name: X\nsources: [{name: a, query: SELECT 1}, {name: b, query: SELEC 1}]",
        "source b: near \"SELEC\"",
        true,
    );
    refused(
        "name: X\nsources: [{query: 'SELECT uid FROM users WHERE uid = :who'}]",
        "parameter :who, which artifact X does not declare",
        false,
    );
    refused(
        "name: X\nsources: [{query: SELECT path FROM file}]",
        "table file needs a constraint",
        false,
    );
    refused(
        "name: X\nsources: [{query: SELECT nope FROM users}]",
        "no such column: nope",
        true,
    );
    refused(
        "name: X\nsources: [{query: 'SELECT uid FROM users WHERE uid = ?'}]",
        "has no name",
        false,
    );
}

#[test]
fn the_builtin_queries_keep_the_row_shapes_of_the_code_they_replace() {
    let users = &crate::definitions::builtin("Linux.Sys.Users").unwrap().spec;
    let rows = definition_rows(users, &[], 0).unwrap();
    let root = rows.iter().find(|r| r["name"] == "root").expect("root");
    let keys = |r: &serde_json::Map<String, J>| r.keys().cloned().collect::<BTreeSet<String>>();
    let set = |k: &[&str]| {
        k.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(
        keys(root),
        set(&["name", "uid", "gid", "description", "home", "shell"])
    );
    assert_eq!(
        (&root["uid"], &root["home"]),
        (&J::from(0), &J::from("/root"))
    );
    let ps = &crate::definitions::builtin("Linux.Sys.Pslist")
        .unwrap()
        .spec;
    let me = std::process::id();
    let rows = definition_rows(ps, &[], 0).unwrap();
    let mine = rows.iter().find(|r| r["pid"] == me).expect("this process");
    assert_eq!(
        keys(mine),
        set(&[
            "pid",
            "ppid",
            "name",
            "exe",
            "cmdline",
            "user",
            "rss",
            "start_time"
        ])
    );
    assert!(mine["rss"].as_u64().unwrap() > 0 && mine["start_time"].as_u64().unwrap() > 0);
    assert_eq!(mine["ppid"], J::from(std::os::unix::process::parent_id()));
    // Pids ascend, and the name filter keeps only names containing it.
    let pids: Vec<u64> = rows.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    assert!(pids.windows(2).all(|w| w[0] < w[1]));
    let name = mine["name"].as_str().unwrap().to_owned();
    let some = definition_rows(ps, &[("name", &name[..3])], 0).unwrap();
    assert!(some.iter().any(|r| r["pid"] == me));
    assert!(
        some.iter()
            .all(|r| r["name"].as_str().unwrap().contains(&name[..3]))
    );
}

/// What a run sends, in order: `R` for a row (its `path` or first value), `U` for an upload.
fn outputs(sql: &str) -> Result<Vec<(char, String)>, String> {
    let mut out = Vec::new();
    run_query(
        sql,
        crate::agent::artifacts::Budget::unlimited(),
        &mut |o| {
            out.push(match o {
                crate::agent::artifacts::Output::Row(r) => {
                    ('R', r.values().next().map(text_of).unwrap_or_default())
                }
                crate::agent::artifacts::Output::Upload(p) => ('U', p.display().to_string()),
                other => panic!("{other:?}"),
            });
            Ok(())
        },
    )?;
    Ok(out)
}

fn text_of(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[test]
fn talon_upload_uploads_each_file_after_the_row_that_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    for n in ["a.log", "b.log", "c.txt"] {
        std::fs::write(dir.path().join(n), n).unwrap();
    }
    let got = outputs(&format!(
        "SELECT talon_upload(path) AS path FROM file WHERE directory = '{d}' AND filename LIKE \
         '%.log'"
    ))
    .unwrap();
    let (a, b) = (format!("{d}/a.log"), format!("{d}/b.log"));
    assert_eq!(
        got,
        [
            ('R', a.clone()),
            ('U', a.clone()),
            ('R', b.clone()),
            ('U', b.clone())
        ]
    );
    // Sorted, every value is made before the first row is sent: the files follow that row.
    let got = outputs(&format!(
        "SELECT talon_upload(path) AS path FROM file WHERE directory = '{d}' AND filename LIKE \
         '%.log' ORDER BY path DESC"
    ))
    .unwrap();
    assert_eq!(
        got,
        [
            ('R', b.clone()),
            ('U', a.clone()),
            ('U', b.clone()),
            ('R', a.clone())
        ]
    );
    // An aggregate sends its row, then the files its rows asked for.
    let got = outputs(&format!(
        "SELECT count(talon_upload(path)) AS n FROM file WHERE directory = '{d}'"
    ))
    .unwrap();
    assert_eq!(got[0], ('R', "3".into()));
    assert_eq!(got.iter().filter(|(k, _)| *k == 'U').count(), 3);
    // NULL uploads nothing; a relative path or '..' is refused, naming the function.
    assert_eq!(
        outputs("SELECT talon_upload(NULL) AS p").unwrap(),
        [('R', "null".into())]
    );
    for bad in ["etc/passwd", "/etc/../root/x"] {
        let e = outputs(&format!("SELECT talon_upload('{bad}')")).unwrap_err();
        assert!(
            e.contains("talon_upload") && e.contains("absolute path"),
            "{e}"
        );
    }
    // One query uploads at most UPLOADS_PER_RUN_MAX files.
    let e = outputs(&format!(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i <= {UPLOADS_PER_RUN_MAX}) \
         SELECT talon_upload('/etc/hostname') FROM c"
    ))
    .unwrap_err();
    assert!(
        e.contains(&format!("more than {UPLOADS_PER_RUN_MAX} files")),
        "{e}"
    );
}

#[test]
fn talon_glob_matches_the_agents_glob_and_takes_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    for f in ["a/x.log", "a/b/y.log", "a/b/z.txt", "top.log"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    std::os::unix::fs::symlink(root.join("top.log"), root.join("a/link.log")).unwrap();
    let d = root.display();
    let paths = |sql: String| -> Vec<String> {
        outputs(&sql)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p.replace(&d.to_string(), ""))
            .collect()
    };
    assert_eq!(
        paths(format!(
            "SELECT path FROM talon_glob WHERE pattern = '{d}/**/*.log'"
        )),
        ["/a/b/y.log", "/a/link.log", "/a/x.log", "/top.log"]
    );
    assert_eq!(
        paths(format!(
            "SELECT path FROM talon_glob WHERE pattern = '{d}/**/*.log' AND type = 'regular'"
        )),
        ["/a/b/y.log", "/a/x.log", "/top.log"]
    );
    assert_eq!(
        paths(format!(
            "SELECT path FROM talon_glob WHERE pattern = '{d}/**/*' AND type = 'regular' AND \
             max_matches = 2"
        ))
        .len(),
        2
    );
    assert_eq!(
        paths(format!(
            "SELECT type FROM talon_glob WHERE pattern = '{d}/a/*'"
        )),
        ["directory", "symlink", "regular"]
    );
    let e = outputs("SELECT path FROM talon_glob WHERE pattern = 'etc/*'").unwrap_err();
    assert!(e.contains("must be an absolute path"), "{e}");
    // FileFinder (SQL over talon_glob, file and hash) stops at max_files.
    let ff = &crate::definitions::builtin("Generic.Forensic.FileFinder")
        .unwrap()
        .spec;
    let g = format!("{d}/**/*");
    let rows = definition_rows(ff, &[("glob", &g), ("max_files", "2")], 0).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
}

/// One glibc x86-64 utmp record (384 bytes): type, pid, line, id, user, host, session, time.
fn utmp_record(ty: i16, pid: i32, line: &str, user: &str, host: &str, secs: i32) -> Vec<u8> {
    let mut r = vec![0u8; 384];
    r[0..2].copy_from_slice(&ty.to_le_bytes());
    r[4..8].copy_from_slice(&pid.to_le_bytes());
    r[8..8 + line.len()].copy_from_slice(line.as_bytes());
    r[40..44].copy_from_slice(b"ts/0");
    r[44..44 + user.len()].copy_from_slice(user.as_bytes());
    r[76..76 + host.len()].copy_from_slice(host.as_bytes());
    r[340..344].copy_from_slice(&secs.to_le_bytes());
    r
}

/// `logged_in_users` reads utmp as `who` does: the same sessions from the same file (this machine
/// has none of its own, so the file is made here in glibc's layout).
#[cfg(target_arch = "x86_64")]
#[test]
fn logged_in_users_match_who() {
    const USER_PROCESS: i16 = 7;
    const BOOT_TIME: i16 = 2;
    const DEAD_PROCESS: i16 = 8;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("utmp");
    let mut bytes = utmp_record(BOOT_TIME, 0, "~", "reboot", "6.1.0", 1_700_000_000);
    bytes.extend(utmp_record(
        USER_PROCESS,
        4242,
        "pts/0",
        "alice",
        "10.0.0.7",
        1_700_000_100,
    ));
    bytes.extend(utmp_record(
        USER_PROCESS,
        4343,
        "tty1",
        "bob",
        "",
        1_700_000_200,
    ));
    bytes.extend(utmp_record(
        DEAD_PROCESS,
        4444,
        "pts/1",
        "",
        "",
        1_700_000_300,
    ));
    std::fs::write(&file, &bytes).unwrap();
    let mut rows = Vec::new();
    linux::utmp_rows(
        &file,
        &mut table::Rows::new("logged_in_users", 6, &mut rows),
    )
    .unwrap();
    let ours: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r[0] == table::Value::from("user"))
        .map(|r| (r[1].to_string(), r[2].to_string()))
        .collect();
    let who = tool("who", &[file.to_str().unwrap()]);
    let theirs: Vec<(String, String)> = who
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_owned(), w.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(ours, theirs, "who says:\n{who}");
    assert_eq!(
        ours,
        [
            ("alice".into(), "pts/0".into()),
            ("bob".into(), "tty1".into())
        ]
    );
    let alice = &rows[1];
    assert_eq!(alice[3], table::Value::from("10.0.0.7"));
    assert_eq!(alice[4], table::Value::Int(1_700_000_100));
    assert_eq!(alice[5], table::Value::Int(4242));
    let types: Vec<String> = rows.iter().map(|r| r[0].to_string()).collect();
    assert_eq!(types, ["boot_time", "user", "user", "dead"]);
    // No utmp (a container without logins): no rows, no error.
    let mut none = Vec::new();
    linux::utmp_rows(
        &dir.path().join("absent"),
        &mut table::Rows::new("logged_in_users", 6, &mut none),
    )
    .unwrap();
    assert!(none.is_empty());
}

fn event_spec(query: &str) -> talon_core::artifacts::ArtifactSpec {
    crate::definitions::parse(&format!(
        "name: Custom.Events\ntype: event\nparameters:\n  - name: min\n    type: int\n    default: 0\nsources:\n  - query: \"{query}\"\n"
    ))
    .unwrap()
}

/// An event artifact's query runs over one batch of its event table at a time, its parameters
/// bound; joins with the machine's tables work; the batch is gone after the run.
#[test]
fn an_event_query_runs_over_each_batch() {
    let spec = event_spec(
        "SELECT e.n, e.payload, u.username FROM talon_test_events e LEFT JOIN users u ON u.uid = 0 WHERE e.n >= :min",
    );
    let params = BTreeMap::from([("min".to_owned(), "2".to_owned())]);
    let mut q = EventQuery::new(&spec, &params, Host::Real).unwrap();
    assert_eq!(q.table(), "talon_test_events");
    let batch = |ns: std::ops::Range<i64>| -> Vec<Vec<table::Value>> {
        ns.map(|n| {
            vec![
                table::Value::Int(1),
                table::Value::Int(1000),
                table::Value::Int(n),
                table::Value::Text(format!("p{n}")),
            ]
        })
        .collect()
    };
    let out = q.run(batch(0..5), || false).unwrap();
    let ns: Vec<i64> = out.iter().map(|r| r["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, [2, 3, 4]);
    assert_eq!(out[0]["username"], "root");
    assert_eq!(out[0]["payload"], "p2");
    // The next batch replaces it.
    let out = q.run(batch(10..12), || false).unwrap();
    assert_eq!(out.len(), 2);
    assert!(q.run(Vec::new(), || false).unwrap().is_empty());
}

/// Event tables are read only by event artifacts, and an event artifact reads exactly one.
#[test]
fn event_tables_are_only_for_event_artifacts() {
    let collect = crate::definitions::parse(
        "name: Custom.X\nsources:\n  - query: SELECT * FROM process_events\n",
    )
    .unwrap();
    let e = check_artifact(&collect, &BTreeMap::new()).unwrap_err();
    assert!(
        e.message.contains("process_events is an event table"),
        "{e}"
    );
    let e = check_artifact(&event_spec("SELECT * FROM processes"), &BTreeMap::new()).unwrap_err();
    assert!(e.message.contains("reads none"), "{e}");
    let e = check_artifact(
        &event_spec("SELECT * FROM process_events, talon_test_events"),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(
        e.message
            .contains("reads process_events and talon_test_events"),
        "{e}"
    );
    check_artifact(
        &event_spec("SELECT pid FROM process_events"),
        &BTreeMap::new(),
    )
    .unwrap();
    // Outside an event artifact's run, an event table holds nothing.
    assert!(
        rows(&mut engine(), "SELECT * FROM talon_test_events")
            .unwrap()
            .is_empty()
    );
}

/// `process_events`' rows come from the processes a scan finds, in its own column order.
#[test]
fn process_event_rows_describe_the_process() {
    let me = std::process::id() as i32;
    assert!(linux::pids().unwrap().contains(&me));
    let rows = linux::process_event_rows(&[me]).unwrap();
    assert_eq!(rows.len(), 1);
    let col = |name: &str| events::PROCESS_EVENTS.column(name).unwrap();
    assert_eq!(rows[0][col("pid")], table::Value::Int(i64::from(me)));
    let table::Value::Text(path) = &rows[0][col("path")] else {
        panic!("{:?}", rows[0]);
    };
    assert_eq!(
        path,
        &std::env::current_exe().unwrap().display().to_string()
    );
    assert!(matches!(rows[0][col("time")], table::Value::Int(t) if t > 1_600_000_000));
}

/// Event queries borrow engines from a pool per host, keeping at most `EVENT_ENGINES_IDLE_MAX`
/// idle; a query that shows the host's name keeps an engine of its own (virtual agents differ).
#[test]
fn event_queries_share_a_bounded_pool_of_engines() {
    let host = Host::Virtual {
        hostname: "v-1".into(),
        cache: TableCache::new(Arc::new(crate::clock::SystemClock)),
    };
    let key = match &host {
        Host::Virtual { cache, .. } => Some(Arc::as_ptr(cache) as usize),
        Host::Real => None,
    };
    let idle = || {
        event_engines()
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, Vec::len)
    };
    let spec = event_spec("SELECT n FROM talon_test_events");
    let mut q = EventQuery::new(&spec, &BTreeMap::new(), host.clone()).unwrap();
    assert_eq!(idle(), 1, "the engine that prepared it is idle again");
    let held: Vec<Engine> = (0..EVENT_ENGINES_IDLE_MAX + 4)
        .map(|_| q.engine().unwrap())
        .collect();
    assert_eq!(idle(), 0);
    for e in held {
        q.give_back(e);
    }
    assert_eq!(idle(), EVENT_ENGINES_IDLE_MAX);
    let row = vec![
        table::Value::Int(1),
        table::Value::Int(1000),
        table::Value::Int(7),
        table::Value::Text(String::new()),
    ];
    assert_eq!(q.run(vec![row.clone()], || false).unwrap()[0]["n"], 7);
    assert_eq!(idle(), EVENT_ENGINES_IDLE_MAX);
    // Shows the host's name: its own engine, the virtual agent's name in it.
    let spec = event_spec("SELECT e.n, s.hostname FROM talon_test_events e, system_info s");
    let mut own = EventQuery::new(&spec, &BTreeMap::new(), host).unwrap();
    assert!(own.pooled.is_none());
    let out = own.run(vec![row], || false).unwrap();
    assert_eq!(out[0]["hostname"], "v-1");
    // It took an idle engine for its own, and keeps it.
    assert_eq!(idle(), EVENT_ENGINES_IDLE_MAX - 1);
}
