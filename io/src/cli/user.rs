//! `talon --config server.config.yaml user add|list|remove|passwd`: the GUI's users (docs/gui.md).
//! Run on the master's machine (or any with the shared volume mounted); the running master picks
//! changes up within seconds.

use crate::clock::{Clock, Entropy, OsEntropy, SystemClock};
use crate::deploy::config::ServerConfig;
use crate::deploy::pki::Access;
use crate::gui::users::{self, User, Users};
use clap::Subcommand;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

/// `talon user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a GUI user; the password is read from the terminal (twice, not shown) or from the
    /// first line of stdin.
    Add {
        /// The login name (letters, digits, '.', '_', '-').
        name: String,
        /// reader (views), investigator (also collects, hunts, cancels, labels one client) or
        /// administrator (also labels in bulk, manages artifacts and client events, reads the
        /// audit log).
        #[arg(long, value_enum)]
        role: Access,
        /// Replace the user if it exists.
        #[arg(long)]
        force: bool,
        /// Print the user as JSON ({name, role, created_ms, changed_ms}).
        #[arg(long)]
        json: bool,
    },
    /// List the users and their roles.
    List {
        /// As a JSON array of {name, role, created_ms, changed_ms}.
        #[arg(long)]
        json: bool,
    },
    /// Remove a user (its sessions end within seconds).
    Remove {
        /// The login name.
        name: String,
        /// Print {removed: NAME} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password (and with --role its role); its sessions end within seconds.
    Passwd {
        /// The login name.
        name: String,
        /// A new role as well.
        #[arg(long, value_enum)]
        role: Option<Access>,
        /// Print the user as JSON ({name, role, created_ms, changed_ms}).
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `user` command against the deployment of the server config at `config`.
pub fn run(config: &Path, command: UserCommand) -> Result<String, String> {
    let cfg = ServerConfig::load(config).map_err(|e| e.to_string())?;
    let store = Users::at(&cfg.datastore.location);
    let now = SystemClock.now().as_ms();
    match command {
        UserCommand::Add {
            name,
            role,
            force,
            json,
        } => {
            users::check_name(&name)?;
            if !force && store.get(&name)?.is_some() {
                return Err(format!(
                    "user {name:?} exists; use `user passwd {name}` or `user add --force`"
                ));
            }
            let user = User::new(&name, role, &read_password(&name)?, salt(), now)?;
            store.put(&user)?;
            if json {
                return Ok(user_json(&user).to_string());
            }
            Ok(format!(
                "added user {name:?} with role {role} ({})",
                store.dir().display()
            ))
        }
        UserCommand::List { json } => {
            let list = store.list()?;
            if json {
                let v: Vec<_> = list.iter().map(user_json).collect();
                return Ok(serde_json::to_string_pretty(&v).expect("JSON values serialise"));
            }
            if list.is_empty() {
                return Ok(format!(
                    "no users in {} (add one with `talon --config {} user add NAME --role administrator`)",
                    store.dir().display(),
                    config.display()
                ));
            }
            let width = list.iter().map(|u| u.name.len()).max().unwrap_or(4).max(4);
            let mut out = format!("{:width$}  role\n", "name");
            for u in &list {
                out.push_str(&format!("{:width$}  {}\n", u.name, u.role));
            }
            Ok(out.trim_end().to_owned())
        }
        UserCommand::Remove { name, json } => {
            if store.remove(&name)? {
                if json {
                    return Ok(serde_json::json!({ "removed": name }).to_string());
                }
                Ok(format!("removed user {name:?}"))
            } else {
                Err(format!("no user {name:?} (see `user list`)"))
            }
        }
        UserCommand::Passwd { name, role, json } => {
            let Some(mut user) = store.get(&name)? else {
                return Err(format!("no user {name:?} (add it with `user add`)"));
            };
            user.set_password(&read_password(&name)?, salt())?;
            if let Some(r) = role {
                user.role = r;
            }
            // Strictly later, so that the master sees a change even within one millisecond.
            user.changed_ms = now.max(user.changed_ms + 1);
            store.put(&user)?;
            if json {
                return Ok(user_json(&user).to_string());
            }
            Ok(format!(
                "set the password of {name:?} (role {}); its sessions end",
                user.role
            ))
        }
    }
}

/// `{name, role, created_ms, changed_ms}` (never the hash).
fn user_json(u: &User) -> serde_json::Value {
    serde_json::json!({
        "name": u.name, "role": u.role, "created_ms": u.created_ms, "changed_ms": u.changed_ms,
    })
}

/// A fresh salt for a password hash.
fn salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    OsEntropy::default().fill(&mut salt);
    salt
}

/// The new password: typed twice at the terminal (echo off), or the first line of stdin.
fn read_password(name: &str) -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password from stdin: {e}"))?;
        let p = line.trim_end_matches(['\n', '\r']).to_owned();
        if p.is_empty() {
            return Err("no password on stdin (give it as the first line)".into());
        }
        return Ok(p);
    }
    let first = prompt(&format!("password for {name}: "))?;
    let second = prompt("again: ")?;
    if first != second {
        return Err("the two passwords differ; nothing changed".into());
    }
    Ok(first)
}

/// Reads a line from the terminal with echo off (restored afterwards, even on error).
fn prompt(text: &str) -> Result<String, String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let mut err = std::io::stderr();
    let _ = write!(err, "{text}");
    let _ = err.flush();
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(|e| format!("reading the terminal's mode: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    tcsetattr(&stdin, OptionalActions::Now, &quiet)
        .map_err(|e| format!("turning echo off: {e}"))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    let _ = writeln!(err);
    read.map_err(|e| format!("reading the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}
