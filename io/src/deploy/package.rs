//! `talon package deb`: Debian packages of a deployment (docs/operations.md, "Installing from
//! packages") — one per server node (the master and each minion, named after the node), each
//! holding the `talon` binary, the server config and a systemd unit that runs that node; or, with
//! `--client`, the agent's package.
//!
//! Built here, not by `dpkg-deb`: a `.deb` is an `ar` archive of `debian-binary`,
//! `control.tar.gz` and `data.tar.gz` (deb(5)); the tar and gzip members come from the `tar` and
//! `flate2` crates, and the `ar` container (a fixed 60-byte header per member) is written below.
//!
//! What the packages do on a machine (their maintainer scripts):
//! - install: create the `talon` system user if missing (an existing one is kept: on a network
//!   volume every node must share its uid), make the node's local directory under
//!   `/var/lib/talon` (0750, the user's), give the config to the user (0600), enable and start the
//!   unit where systemd runs;
//! - upgrade: the config is a conffile (an operator's edits are kept), the local directory (the
//!   journals not yet on the volume) and the agent's writeback are never in the package, so
//!   nothing of them changes; the unit restarts on the new binary;
//! - remove: the unit stops; data and config stay. Purge: the local directory and the config go.
//!
//! The scripts honour `DPKG_ROOT` (dpkg `--root` with `--force-script-chrootless`), so an install
//! into a scratch root works without a container, which the tests use.

use crate::deploy::config::{ClientConfig, ServerConfig};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use md5::{Digest, Md5};
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the packages install the binary.
pub const BINARY: &str = "/usr/bin/talon";
/// The server config's installed path.
pub const SERVER_CONFIG: &str = "/etc/talon/server.config.yaml";
/// The client config's installed path.
pub const CLIENT_CONFIG: &str = "/etc/talon/client.config.yaml";
/// Every server node's local directories live under this (one per node name).
pub const STATE_DIR: &str = "/var/lib/talon";
/// The agent's state (its writeback and event buffer).
pub const CLIENT_STATE_DIR: &str = "/var/lib/talon-client";
/// The server packages' name (one per machine: the same name on every node, so a newer build
/// upgrades it).
pub const SERVER_PACKAGE: &str = "talon-server";
/// The agent package's name.
pub const CLIENT_PACKAGE: &str = "talon-client";
/// The server unit's name.
pub const SERVER_UNIT: &str = "talon-server.service";
/// The agent unit's name.
pub const CLIENT_UNIT: &str = "talon-client.service";
/// The open-file limit a unit gets at least.
pub const NOFILE_MIN: u64 = 65_536;

/// One package written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Built {
    /// The node it runs (`client` for the agent's).
    pub node: String,
    /// Its role: `master`, `minion` or `client`.
    pub role: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What goes into every package besides its node's files.
pub struct Inputs<'a> {
    /// The `talon` binary to ship (the running one).
    pub binary: &'a Path,
    /// The package version (the binary's).
    pub version: &'a str,
    /// Debian's name for the binary's architecture.
    pub arch: &'a str,
    /// The files' modification time (seconds since the epoch).
    pub mtime: u64,
    /// `talon(1)`, in roff (installed gzipped as `/usr/share/man/man1/talon.1.gz`).
    pub man_page: &'a [u8],
}

/// Debian's architecture name for the one this binary was built for.
pub fn debian_arch() -> Result<&'static str, String> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        "x86" => Ok("i386"),
        "arm" => Ok("armhf"),
        "riscv64" => Ok("riscv64"),
        "powerpc64" => Ok("ppc64el"),
        "s390x" => Ok("s390x"),
        other => Err(format!("no Debian architecture name for {other}")),
    }
}

/// Writes one package per server node of `cfg` into `out`: `talon-server-<node>_<version>_<arch>.deb`.
/// `config_text` is the server config as the operator keeps it (comments included).
pub fn server_packages(
    cfg: &ServerConfig,
    config_text: &[u8],
    inputs: &Inputs<'_>,
    out: &Path,
) -> Result<Vec<Built>, String> {
    let mut nodes = vec![(cfg.master_node_name(), "master")];
    nodes.extend(
        cfg.extra_frontends
            .iter()
            .map(|x| (x.node_name(), "minion")),
    );
    // Read and scanned once; every package shares the bytes.
    let binary = Binary::read(inputs.binary)?;
    let depends = format!("{}, passwd", binary.depends);
    let mut built = Vec::new();
    for (node, role) in nodes {
        let unit = server_unit(cfg, &node, role == "minion");
        let files = vec![
            File::new(BINARY, 0o755, binary.bytes.clone()),
            File::new(SERVER_CONFIG, 0o600, config_text.to_vec()),
            File::new(
                &format!("/lib/systemd/system/{SERVER_UNIT}"),
                0o644,
                unit.into_bytes(),
            ),
        ];
        let control = Control {
            package: SERVER_PACKAGE,
            description: format!(
                "Talon endpoint-visibility server: the {role} node {node}\n \
                 Runs `talon frontend` for this node of the deployment (systemd unit\n \
                 {SERVER_UNIT}); its local journals live in {STATE_DIR}. Every node\n \
                 mounts the same shared volume at {}.",
                cfg.datastore.location.display()
            ),
            depends: depends.clone(),
        };
        let scripts = server_scripts(&node);
        let path = out.join(format!(
            "{SERVER_PACKAGE}-{}_{}_{}.deb",
            package_safe(&node),
            inputs.version,
            inputs.arch
        ));
        let bytes = write_deb(&path, &control, inputs, files, &scripts, &[SERVER_CONFIG])?;
        built.push(Built {
            node,
            role,
            path,
            bytes,
        });
    }
    Ok(built)
}

/// Writes the agent's package into `out`: `talon-client_<version>_<arch>.deb`.
pub fn client_package(
    client: &ClientConfig,
    inputs: &Inputs<'_>,
    out: &Path,
) -> Result<Built, String> {
    let binary = Binary::read(inputs.binary)?;
    let config = serde_yaml_ng::to_string(client).map_err(|e| e.to_string())?;
    let files = vec![
        File::new(BINARY, 0o755, binary.bytes),
        File::new(CLIENT_CONFIG, 0o600, config.into_bytes()),
        File::new(
            &format!("/lib/systemd/system/{CLIENT_UNIT}"),
            0o644,
            client_unit().into_bytes(),
        ),
    ];
    let control = Control {
        package: CLIENT_PACKAGE,
        description: "Talon endpoint agent\n \
             Keeps a connection to the deployment's frontends and runs the\n \
             collections and hunts analysts task it with (systemd unit\n \
             talon-client.service, as root: it reads the host)."
            .into(),
        depends: binary.depends,
    };
    let path = out.join(format!(
        "{CLIENT_PACKAGE}_{}_{}.deb",
        inputs.version, inputs.arch
    ));
    let bytes = write_deb(
        &path,
        &control,
        inputs,
        files,
        &client_scripts(),
        &[CLIENT_CONFIG],
    )?;
    Ok(Built {
        node: "client".into(),
        role: "client",
        path,
        bytes,
    })
}

/// A node name as it may appear in a file name.
fn package_safe(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The unit running server node `node`.
pub fn server_unit(cfg: &ServerConfig, node: &str, minion: bool) -> String {
    let local = format!("{STATE_DIR}/{}", node);
    let mut exec = format!("{BINARY} --config {SERVER_CONFIG} frontend --local-dir {local}");
    if minion {
        let _ = write!(exec, " --minion --node {node}");
    }
    // One descriptor per client connection, plus files and the volume's (as `frontend` asks).
    let nofile = (2 * cfg.frontend.resources.expected_clients + 4096).max(NOFILE_MIN);
    let mut ports = vec![cfg.monitoring.bind_port];
    if minion {
        ports.extend(
            cfg.extra_frontends
                .iter()
                .filter(|x| x.node_name() == node)
                .map(|x| x.bind_port),
        );
    } else {
        ports.extend([cfg.frontend.bind_port, cfg.api.bind_port, cfg.gui.bind_port]);
    }
    // A port below 1024 needs the one capability; otherwise the service has none.
    let caps = if ports.iter().any(|p| *p != 0 && *p < 1024) {
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
    } else {
        "CapabilityBoundingSet=\n"
    };
    let shared = [&cfg.datastore.location, &cfg.datastore.filestore_directory]
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let role = if minion { "minion" } else { "master" };
    format!(
        "[Unit]\n\
         Description=Talon frontend ({role} {node})\n\
         Documentation=https://example.invalid/talon/docs/operations.md\n\
         Wants=network-online.target\n\
         After=network-online.target remote-fs.target\n\
         RequiresMountsFor={shared}\n\
         \n\
         [Service]\n\
         Type=simple\n\
         User=talon\n\
         Group=talon\n\
         ExecStart={exec}\n\
         Restart=always\n\
         RestartSec=5\n\
         TimeoutStopSec=30\n\
         LimitNOFILE={nofile}\n\
         StateDirectory=talon\n\
         StateDirectoryMode=0750\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ReadWritePaths={shared}\n\
         PrivateTmp=yes\n\
         ProtectHome=yes\n\
         PrivateDevices=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelLogs=yes\n\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         RestrictSUIDSGID=yes\n\
         RestrictRealtime=yes\n\
         RestrictNamespaces=yes\n\
         LockPersonality=yes\n\
         RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n\
         {caps}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The agent's unit: root (it reads the whole host), its state in [`CLIENT_STATE_DIR`].
pub fn client_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Talon endpoint agent\n\
         Documentation=https://example.invalid/talon/docs/operations.md\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={BINARY} --config {CLIENT_CONFIG} client --writeback {CLIENT_STATE_DIR}/writeback.yaml\n\
         Restart=always\n\
         RestartSec=5\n\
         StateDirectory=talon-client\n\
         StateDirectoryMode=0700\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=read-only\n\
         PrivateTmp=yes\n\
         ProtectKernelTunables=yes\n\
         ProtectKernelModules=yes\n\
         ProtectControlGroups=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The lines every maintainer script starts with: strict, and the scratch root dpkg installs into
/// (empty on a real install).
const SCRIPT_HEAD: &str = "#!/bin/sh\nset -e\nroot=\"${DPKG_ROOT:-}\"\n";

/// Enables `unit` (unless the administrator disabled it) and (re)starts it where systemd runs,
/// with Debian's helpers (init-system-helpers), as debhelper's generated scripts do; nothing in a
/// scratch root.
fn systemd_start(unit: &str) -> String {
    format!(
        "if [ -z \"$root\" ] && [ \"$1\" = configure ] && command -v deb-systemd-helper >/dev/null; then\n\
         \tdeb-systemd-helper unmask {unit} >/dev/null || true\n\
         \tif deb-systemd-helper --quiet was-enabled {unit}; then\n\
         \t\tdeb-systemd-helper enable {unit} >/dev/null || true\n\
         \telse\n\
         \t\tdeb-systemd-helper update-state {unit} >/dev/null || true\n\
         \tfi\n\
         \tif [ -d /run/systemd/system ]; then\n\
         \t\tsystemctl --system daemon-reload >/dev/null || true\n\
         \t\tif [ -n \"$2\" ]; then action=restart; else action=start; fi\n\
         \t\tdeb-systemd-invoke \"$action\" {unit} >/dev/null || true\n\
         \tfi\n\
         fi\n"
    )
}

fn stop_script(unit: &str) -> String {
    format!(
        "{SCRIPT_HEAD}\
         # Removal stops the service; an upgrade leaves it to the new postinst's restart.\n\
         if [ \"$1\" = remove ] && [ -z \"$root\" ] && [ -d /run/systemd/system ] && command -v deb-systemd-invoke >/dev/null; then\n\
         \tdeb-systemd-invoke stop {unit} >/dev/null || true\n\
         fi\n"
    )
}

/// After removal: the unit is masked while its file is gone (as debhelper does), and forgotten
/// on purge.
fn systemd_forget(unit: &str) -> String {
    format!(
        "if [ -z \"$root\" ] && command -v deb-systemd-helper >/dev/null; then\n\
         \tif [ -d /run/systemd/system ]; then systemctl --system daemon-reload >/dev/null || true; fi\n\
         \tif [ \"$1\" = remove ]; then deb-systemd-helper mask {unit} >/dev/null || true; fi\n\
         \tif [ \"$1\" = purge ]; then\n\
         \t\tdeb-systemd-helper purge {unit} >/dev/null || true\n\
         \t\tdeb-systemd-helper unmask {unit} >/dev/null || true\n\
         \tfi\n\
         fi\n"
    )
}

/// A package's maintainer scripts: `configure` (shell run on install and upgrade, before the unit
/// starts), the unit's start, stop and forgetting, and purge deleting `state_dir` (and `/etc/talon`
/// if nothing else is left in it).
fn scripts(unit: &str, configure: &str, state_dir: &str) -> Vec<(&'static str, String)> {
    let postinst = format!(
        "{SCRIPT_HEAD}\
         if [ \"$1\" = configure ]; then\n\
         {configure}\
         fi\n\
         {}",
        systemd_start(unit)
    );
    let postrm = format!(
        "{SCRIPT_HEAD}\
         if [ \"$1\" = purge ]; then\n\
         \trm -rf \"$root{state_dir}\"\n\
         \trmdir \"$root/etc/talon\" 2>/dev/null || true\n\
         fi\n\
         {}",
        systemd_forget(unit)
    );
    vec![
        ("postinst", postinst),
        ("prerm", stop_script(unit)),
        ("postrm", postrm),
    ]
}

fn server_scripts(node: &str) -> Vec<(&'static str, String)> {
    let local = format!("{STATE_DIR}/{node}");
    let configure = format!(
        "\t# The user the node runs as. An existing one is kept: every node must give it the\n\
         \t# same uid, since they share the volume.\n\
         \tif [ -n \"$root\" ]; then\n\
         \t\tgrep -q '^talon:' \"$root/etc/passwd\" || useradd --root \"$root\" --system --user-group --home-dir {STATE_DIR} --no-create-home --shell /usr/sbin/nologin talon\n\
         \t\tuid=$(awk -F: '$1 == \"talon\" {{ print $3 }}' \"$root/etc/passwd\")\n\
         \t\tgid=$(awk -F: '$1 == \"talon\" {{ print $4 }}' \"$root/etc/passwd\")\n\
         \telse\n\
         \t\tgetent passwd talon >/dev/null || useradd --system --user-group --home-dir {STATE_DIR} --no-create-home --shell /usr/sbin/nologin talon\n\
         \t\tuid=$(getent passwd talon | cut -d: -f3)\n\
         \t\tgid=$(getent passwd talon | cut -d: -f4)\n\
         \tfi\n\
         \tmkdir -p \"$root{STATE_DIR}\" \"$root{local}\"\n\
         \tchown \"$uid:$gid\" \"$root{STATE_DIR}\" \"$root{local}\" \"$root{SERVER_CONFIG}\"\n\
         \tchmod 0750 \"$root{STATE_DIR}\" \"$root{local}\"\n\
         \tchmod 0600 \"$root{SERVER_CONFIG}\"\n"
    );
    scripts(SERVER_UNIT, &configure, STATE_DIR)
}

/// The agent's: purge deletes its key, so a reinstalled machine enrols as a new client.
fn client_scripts() -> Vec<(&'static str, String)> {
    let configure = format!(
        "\tmkdir -p \"$root{CLIENT_STATE_DIR}\"\n\
         \tchmod 0700 \"$root{CLIENT_STATE_DIR}\"\n\
         \tchmod 0600 \"$root{CLIENT_CONFIG}\"\n"
    );
    scripts(CLIENT_UNIT, &configure, CLIENT_STATE_DIR)
}

/// A file of the package: its absolute installed path, mode and bytes.
struct File {
    path: String,
    mode: u32,
    data: Bytes,
}

impl File {
    fn new(path: &str, mode: u32, data: impl Into<Bytes>) -> File {
        File {
            path: path.to_owned(),
            mode,
            data: data.into(),
        }
    }
}

/// The binary to ship, and the libraries it links as a Depends value.
struct Binary {
    bytes: Bytes,
    /// `libc6 (>= <newest GLIBC_ version it references>), libgcc-s1`.
    depends: String,
}

impl Binary {
    fn read(path: &Path) -> Result<Binary, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("{}: cannot read the binary: {e}", path.display()))?;
        let libc = match glibc_needed(&bytes) {
            Some(v) => format!("libc6 (>= {v})"),
            None => "libc6".to_owned(),
        };
        Ok(Binary {
            bytes: Bytes::from(bytes),
            depends: format!("{libc}, libgcc-s1"),
        })
    }
}

struct Control {
    package: &'static str,
    /// The synopsis, then the long description's lines (each starting with a space).
    description: String,
    /// The Depends field.
    depends: String,
}

/// The newest glibc symbol version `binary` needs (`2.34` from `GLIBC_2.34`), from the version
/// names its dynamic section carries.
pub fn glibc_needed(binary: &[u8]) -> Option<String> {
    let mut best: Option<(Vec<u32>, String)> = None;
    for at in memchr::memmem::find_iter(binary, b"GLIBC_2.") {
        let tail = &binary[at + 6..binary.len().min(at + 6 + 12)];
        let end = tail
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .unwrap_or(tail.len());
        let Ok(v) = std::str::from_utf8(&tail[..end]) else {
            continue;
        };
        let v = v.trim_end_matches('.');
        let Ok(key) = v
            .split('.')
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, v.to_owned()));
        }
    }
    best.map(|(_, v)| v)
}

/// Writes the `.deb` at `path` (atomically: a partial file never has the name); its size.
fn write_deb(
    path: &Path,
    control: &Control,
    inputs: &Inputs<'_>,
    mut files: Vec<File>,
    scripts: &[(&str, String)],
    conffiles: &[&str],
) -> Result<u64, String> {
    let doc = format!("/usr/share/doc/{}", control.package);
    files.push(File::new(
        &format!("{doc}/copyright"),
        0o644,
        copyright().into_bytes(),
    ));
    files.push(File::new(
        "/usr/share/man/man1/talon.1.gz",
        0o644,
        gzip_best(inputs.man_page)?,
    ));
    files.push(File::new(
        &format!("/usr/share/lintian/overrides/{}", control.package),
        0o644,
        lintian_overrides(control.package, conffiles).into_bytes(),
    ));
    files.push(File::new(
        &format!("{doc}/changelog.gz"),
        0o644,
        gzip_best(changelog(control.package, inputs.version).as_bytes())?,
    ));
    let installed_kib: u64 = files
        .iter()
        .map(|f| (f.data.len() as u64).div_ceil(1024))
        .sum();
    let data = data_tar(&files, inputs.mtime)?;
    let mut md5sums = String::new();
    for f in &files {
        let _ = writeln!(
            md5sums,
            "{}  {}",
            crate::clock::hex(&Md5::digest(&f.data)),
            f.path.trim_start_matches('/')
        );
    }
    let mut text = format!(
        "Package: {}\nVersion: {}\nArchitecture: {}\nMaintainer: Talon maintainers <talon@example.org>\n\
         Installed-Size: {installed_kib}\nSection: admin\nPriority: optional\n",
        control.package, inputs.version, inputs.arch
    );
    let _ = writeln!(text, "Depends: {}", control.depends);
    let _ = writeln!(text, "Homepage: https://example.invalid/talon");
    let _ = writeln!(text, "Description: {}", control.description);
    let mut members: Vec<(&str, u32, Vec<u8>)> = vec![
        ("control", 0o644, text.into_bytes()),
        ("md5sums", 0o644, md5sums.into_bytes()),
    ];
    let conf: String = conffiles.iter().map(|c| format!("{c}\n")).collect();
    members.push(("conffiles", 0o644, conf.into_bytes()));
    for (name, body) in scripts {
        members.push((name, 0o755, body.clone().into_bytes()));
    }
    let control_tar = control_tar(&members, inputs.mtime)?;
    let mut ar = b"!<arch>\n".to_vec();
    for (name, body) in [
        ("debian-binary", b"2.0\n".to_vec()),
        ("control.tar.gz", control_tar),
        ("data.tar.gz", data),
    ] {
        ar_member(&mut ar, name, inputs.mtime, &body);
    }
    let tmp = path.with_extension("deb.partial");
    std::fs::write(&tmp, &ar).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(ar.len() as u64)
}

/// One `ar` member: a 60-byte header (name, mtime, uid, gid, octal mode, size, magic), the bytes,
/// and a newline to an even offset.
fn ar_member(out: &mut Vec<u8>, name: &str, mtime: u64, body: &[u8]) {
    let header = format!(
        "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
        name,
        mtime,
        0,
        0,
        "100644",
        body.len()
    );
    debug_assert_eq!(header.len(), 60);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    if body.len() % 2 == 1 {
        out.push(b'\n');
    }
}

fn tar_header(
    path: &str,
    mode: u32,
    size: u64,
    mtime: u64,
    dir: bool,
) -> Result<tar::Header, String> {
    let mut h = tar::Header::new_gnu();
    // Written as is: `set_path` would drop the leading `./` Debian's archives keep.
    let name = &mut h.as_old_mut().name;
    if path.len() >= name.len() {
        return Err(format!("{path}: longer than a tar header holds"));
    }
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_cksum();
    Ok(h)
}

/// `data.tar.gz`: every file and, before it, each directory above it (0755, root's).
fn data_tar(files: &[File], mtime: u64) -> Result<Vec<u8>, String> {
    // The fast level: the binary is most of it, and level 6 took twice as long (a 269 MB debug
    // build: 23 s against 12 s a package) for a package a fifth smaller.
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut dirs = std::collections::BTreeSet::new();
    dirs.insert("./".to_owned());
    for f in files {
        let mut at = String::from(".");
        let parts: Vec<&str> = f.path.trim_start_matches('/').split('/').collect();
        for p in &parts[..parts.len() - 1] {
            at.push('/');
            at.push_str(p);
            dirs.insert(format!("{at}/"));
        }
    }
    let err = |e: std::io::Error| format!("data.tar: {e}");
    for d in &dirs {
        let h = tar_header(d, 0o755, 0, mtime, true)?;
        tar.append(&h, std::io::empty()).map_err(err)?;
    }
    for f in files {
        let name = format!(".{}", f.path);
        let h = tar_header(&name, f.mode, f.data.len() as u64, mtime, false)?;
        tar.append(&h, &f.data[..]).map_err(err)?;
    }
    tar.into_inner().and_then(GzEncoder::finish).map_err(err)
}

/// `control.tar.gz`: the control files at its root.
fn control_tar(members: &[(&str, u32, Vec<u8>)], mtime: u64) -> Result<Vec<u8>, String> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let err = |e: std::io::Error| format!("control.tar: {e}");
    tar.append(&tar_header("./", 0o755, 0, mtime, true)?, std::io::empty())
        .map_err(err)?;
    for (name, mode, body) in members {
        let h = tar_header(&format!("./{name}"), *mode, body.len() as u64, mtime, false)?;
        tar.append(&h, body.as_slice()).map_err(err)?;
    }
    tar.into_inner().and_then(GzEncoder::finish).map_err(err)
}

/// Gzip at the best level with no name and no time in its header (what Debian's tools expect of
/// a changelog).
fn gzip_best(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut z = GzEncoder::new(Vec::new(), Compression::best());
    z.write_all(data)
        .and_then(|()| z.finish())
        .map_err(|e| format!("gzip: {e}"))
}

/// What Debian's checker flags in these packages by design, each with why.
fn lintian_overrides(package: &str, configs: &[&str]) -> String {
    let mut s = format!(
        "# The YAML parser is unsafe-libyaml, a Rust translation of libyaml linked statically\n\
         # like every Rust dependency, not a copy of the C library.\n\
         {package}: embedded-library libyaml [usr/bin/talon]\n\
         # The `packages` endpoint table reads dpkg's status file (read only).\n\
         {package}: uses-dpkg-database-directly [usr/bin/talon]\n\
         # The config holds the deployment's keys: readable by its service user only.\n"
    );
    for c in configs {
        let _ = writeln!(
            s,
            "{package}: non-standard-file-perm 0600 != 0644 [{}]",
            c.trim_start_matches('/')
        );
    }
    s
}

fn copyright() -> String {
    "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
     Upstream-Name: talon\n\
     Source: https://example.invalid/talon\n\
     \n\
     Files: *\n\
     Copyright: 2026 The Talon authors\n\
     License: Apache-2.0\n \
     On Debian systems, the full text of the Apache License, Version 2.0 can be\n \
     found in /usr/share/common-licenses/Apache-2.0.\n"
        .to_owned()
}

fn changelog(package: &str, version: &str) -> String {
    format!(
        "{package} ({version}) unstable; urgency=medium\n\n  \
         * Built by `talon package deb` from this deployment's config.\n\n \
         -- Talon maintainers <talon@example.org>  Thu, 01 Jan 2026 00:00:00 +0000\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ar_member_header_is_sixty_bytes_and_bodies_are_padded_to_even_offsets() {
        let mut out = Vec::new();
        ar_member(&mut out, "debian-binary", 1_700_000_000, b"2.0\n");
        ar_member(&mut out, "odd", 0, b"abc");
        assert_eq!(&out[..16], b"debian-binary   ");
        assert_eq!(&out[58..60], b"`\n");
        assert_eq!(out.len(), 60 + 4 + 60 + 3 + 1);
        assert_eq!(&out[48..58], b"4         ");
    }

    #[test]
    fn node_names_become_file_name_parts() {
        assert_eq!(
            package_safe("Web-1.example.com-8000"),
            "web-1.example.com-8000"
        );
        assert_eq!(package_safe("a_b:c"), "a-b-c");
    }
}
