//! `talon package deb` checked with Debian's own tools (`scripts/package-test.sh`, called by
//! `.ci/run`, installs lintian): `dpkg-deb --info/--contents`, lintian without errors, an install of
//! the master's, a minion's and the agent's package into scratch roots with `dpkg --root` (the
//! maintainer scripts run chrootless, honouring `DPKG_ROOT`), an upgrade that keeps data and the
//! operator's config, removal that keeps data and purge that does not, and `systemd-analyze verify`
//! on each installed unit.
//!
//! Root is needed (the scripts create a user in the scratch root and chown to it): the test says
//! so and stops if it is not root.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/package-test.sh installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn must(cmd: &mut Command) -> String {
    let (ok, text) = tool(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

/// A scratch root dpkg can install into: its database and the account files `useradd --root`
/// edits, and the host's systemd units (the targets a unit is ordered against) for
/// `systemd-analyze verify --root`.
fn scratch_root(dir: &Path) -> PathBuf {
    let r = dir.to_path_buf();
    for d in [
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "lib/systemd/system",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    for (f, line) in [
        ("passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("group", "root:x:0:\n"),
        ("shadow", "root:*:19000:0:99999:7:::\n"),
        ("gshadow", "root:*::\n"),
    ] {
        std::fs::write(r.join("etc").join(f), line).unwrap();
    }
    for e in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let to = r.join("lib/systemd/system").join(e.file_name());
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
    r
}

fn dpkg(root: &Path, args: &[&str]) -> String {
    must(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            // Maintainer scripts run here, not chrooted (the root has no shell); they honour
            // DPKG_ROOT. The root has no libc6 package to satisfy Depends.
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--force-confold",
            ])
            .args(args),
    )
}

/// The uid `useradd --root` gave `talon` in `root`.
fn talon_uid(root: &Path) -> u32 {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd
        .lines()
        .find_map(|l| l.strip_prefix("talon:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no talon user in {passwd}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn owner(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().uid()
}

fn verify_unit(root: &Path, unit: &str) -> (bool, String) {
    tool(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .arg(unit),
    )
}

#[test]
#[ignore = "needs root, dpkg, lintian and systemd-analyze (scripts/package-test.sh)"]
fn debian_packages_pass_lintian_install_into_scratch_roots_and_their_units_verify() {
    if !rustix::process::geteuid().is_root() {
        panic!("run as root: the maintainer scripts create a user in the scratch root");
    }
    let d = Deployment::new();
    let (minion, _) = d.add_minion();
    let out = d.path("debs");
    let built = json(&ok(&[
        "-c",
        &d.s("server.config.yaml"),
        "package",
        "deb",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let client = json(&ok(&[
        "-c",
        &d.s("server.config.yaml"),
        "package",
        "deb",
        "--client",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let built = built.as_array().unwrap();
    assert_eq!(built.len(), 2, "the master's and the minion's: {built:?}");
    let path_of = |role: &str| -> PathBuf {
        built
            .iter()
            .find(|b| b["role"] == role)
            .map(|b| PathBuf::from(b["path"].as_str().unwrap()))
            .unwrap()
    };
    let (master_deb, minion_deb) = (path_of("master"), path_of("minion"));
    let client_deb = PathBuf::from(client[0]["path"].as_str().unwrap());
    assert!(
        minion_deb
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .contains(&minion),
        "named after the node: {}",
        minion_deb.display()
    );

    // dpkg-deb reads them: control fields, and the files with their modes.
    for (deb, package, config) in [
        (&master_deb, "talon-server", "server.config.yaml"),
        (&minion_deb, "talon-server", "server.config.yaml"),
        (&client_deb, "talon-client", "client.config.yaml"),
    ] {
        let info = must(Command::new("dpkg-deb").arg("--info").arg(deb));
        assert!(info.contains(&format!("Package: {package}")), "{info}");
        assert!(info.contains("Depends: libc6 (>= 2."), "{info}");
        for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
            assert!(info.contains(script), "{script}: {info}");
        }
        let contents = must(Command::new("dpkg-deb").arg("--contents").arg(deb));
        let line = |path: &str| {
            contents
                .lines()
                .find(|l| l.ends_with(path))
                .unwrap_or_else(|| panic!("{path} not in {}:\n{contents}", deb.display()))
                .to_owned()
        };
        assert!(line("./usr/bin/talon").starts_with("-rwxr-xr-x root/root"));
        assert!(line(&format!("./etc/talon/{config}")).starts_with("-rw------- root/root"));
        line("/copyright");
        assert!(line("./usr/share/man/man1/talon.1.gz").starts_with("-rw-r--r-- root/root"));
    }

    // Lintian: no errors (warnings are reported, not failed on) — but one: the test packages the
    // test build of talon, which is not stripped (a release build is: Cargo.toml's
    // profile.release). That error must be found in each package, which shows the check bites.
    let (_, lint) = tool(Command::new("lintian").args([&master_deb, &minion_deb, &client_deb]));
    eprintln!("lintian:\n{lint}");
    let errors: Vec<&str> = lint.lines().filter(|l| l.starts_with("E:")).collect();
    let (unstripped, others): (Vec<&str>, Vec<&str>) = errors
        .iter()
        .partition(|l| l.contains("unstripped-binary-or-object"));
    assert!(others.is_empty(), "lintian errors:\n{}", others.join("\n"));
    assert!(
        unstripped.iter().any(|l| l.contains("talon-server"))
            && unstripped.iter().any(|l| l.contains("talon-client")),
        "lintian did not flag the unstripped test build:\n{lint}"
    );

    // The master's package in a scratch root: files, owner and modes.
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch_root(&scratch.path().join("master"));
    dpkg(&root, &["-i", master_deb.to_str().unwrap()]);
    let uid = talon_uid(&root);
    let master_node = built
        .iter()
        .find(|b| b["role"] == "master")
        .and_then(|b| b["node"].as_str())
        .unwrap()
        .to_owned();
    let config = root.join("etc/talon/server.config.yaml");
    let local = root.join(format!("var/lib/talon/{master_node}"));
    assert_eq!((mode(&config), owner(&config)), (0o600, uid));
    assert_eq!((mode(&local), owner(&local)), (0o750, uid));
    assert_eq!(mode(&root.join("usr/bin/talon")), 0o755);
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/talon-server.service")).unwrap();
    for want in [
        "User=talon",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=",
        &format!("--local-dir /var/lib/talon/{master_node}"),
    ] {
        assert!(unit.contains(want), "{want}: {unit}");
    }
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(nofile >= 65_536, "{nofile}");
    let (ok_unit, why) = verify_unit(&root, "talon-server.service");
    assert!(ok_unit, "systemd-analyze verify (master):\n{why}");

    // The check bites: a unit whose command is not there is refused.
    std::fs::write(
        root.join("lib/systemd/system/planted.service"),
        "[Service]\nExecStart=/usr/bin/no-such-talon\n",
    )
    .unwrap();
    let (planted, why) = verify_unit(&root, "planted.service");
    assert!(
        !planted,
        "systemd-analyze verify passed a unit without its binary: {why}"
    );

    // Upgrade (the package again): the node's journals and the operator's config edits stay.
    std::fs::write(local.join("journal-000001"), b"not yet on the volume").unwrap();
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("# edited by the operator\n");
    std::fs::write(&config, &edited).unwrap();
    dpkg(&root, &["-i", master_deb.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!((mode(&config), owner(&config)), (0o600, uid));
    assert!(local.join("journal-000001").exists());
    // Removal keeps data and config; purge removes both.
    dpkg(&root, &["--remove", "talon-server"]);
    assert!(!root.join("usr/bin/talon").exists());
    assert!(local.join("journal-000001").exists() && config.exists());
    dpkg(&root, &["--purge", "talon-server"]);
    assert!(!root.join("var/lib/talon").exists() && !config.exists());

    // A minion's package: its unit runs that minion.
    let root = scratch_root(&scratch.path().join("minion"));
    dpkg(&root, &["-i", minion_deb.to_str().unwrap()]);
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/talon-server.service")).unwrap();
    assert!(
        unit.contains(&format!("--minion --node {minion}")),
        "{unit}"
    );
    assert_eq!(
        owner(&root.join(format!("var/lib/talon/{minion}"))),
        talon_uid(&root)
    );
    let (ok_unit, why) = verify_unit(&root, "talon-server.service");
    assert!(ok_unit, "systemd-analyze verify (minion):\n{why}");

    // The agent's: root's unit, its state directory private.
    let root = scratch_root(&scratch.path().join("client"));
    dpkg(&root, &["-i", client_deb.to_str().unwrap()]);
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/talon-client.service")).unwrap();
    assert!(!unit.contains("User="), "the agent runs as root: {unit}");
    assert!(unit.contains("client --writeback /var/lib/talon-client/writeback.yaml"));
    assert_eq!(mode(&root.join("var/lib/talon-client")), 0o700);
    assert_eq!(mode(&root.join("etc/talon/client.config.yaml")), 0o600);
    let (ok_unit, why) = verify_unit(&root, "talon-client.service");
    assert!(ok_unit, "systemd-analyze verify (agent):\n{why}");
}
