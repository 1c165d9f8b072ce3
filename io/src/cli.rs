//! The command line: parsing and the commands that need no running cluster.

use crate::clock::{OsEntropy, SystemClock};
use crate::config::{self, ServerConfig};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talon_core::artifacts::{self, ArtifactSpec, ParamKind};

/// Talon: endpoint visibility across one master and many minion frontends.
#[derive(Debug, Parser)]
#[command(name = "talon", version, about, long_about = None)]
pub struct Cli {
    /// The server or client config file.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The endpoint artifacts built into the client.
    Artifacts {
        /// What to do with them.
        #[command(subcommand)]
        command: ArtifactsCommand,
    },
    /// Create and derive configuration files.
    Config {
        /// What to do with them.
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `talon config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Create a deployment: CA, frontend certificate, server.config.yaml and client.config.yaml.
    Generate {
        /// The master's public name or IP (what clients and minions connect to).
        #[arg(long)]
        hostname: String,
        /// Port clients connect to.
        #[arg(long, alias = "frontend_port", default_value_t = 8000)]
        frontend_port: u16,
        /// Port of the API (and of the master for minions).
        #[arg(long, alias = "api_port", default_value_t = 8001)]
        api_port: u16,
        /// Port of the GUI.
        #[arg(long, alias = "gui_port", default_value_t = 8889)]
        gui_port: u16,
        /// The shared volume's mount point, the same path on every node.
        #[arg(long, default_value = config::DEFAULT_DATASTORE)]
        datastore: PathBuf,
        /// Where to write the two config files.
        #[arg(long, alias = "out_dir")]
        out_dir: PathBuf,
        /// Overwrite existing config files (their keys are lost).
        #[arg(long)]
        force: bool,
    },
    /// Derive the multi-frontend config in place: add minions, and rewrite client.config.yaml beside it.
    Frontend {
        /// A minion's HOST:PORT; repeat for several.
        #[arg(long, required = true, value_name = "HOST:PORT")]
        add: Vec<String>,
    },
    /// Issue an API user's certificate and write its config.
    #[command(alias = "api_client")]
    ApiClient {
        /// The user's name.
        #[arg(long)]
        name: String,
        /// Where to write the API config.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// `talon artifacts ...`
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List every artifact with its parameters.
    List {
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line; errors go to stderr with a non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(text) => match writeln!(std::io::stdout().lock(), "{text}") {
            Ok(()) => ExitCode::SUCCESS,
            // A closed pipe (e.g. `| head`) is not an error worth a message.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("talon: cannot write output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("talon: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns what to print.
pub fn run(cli: Cli) -> Result<String, String> {
    match cli.command {
        Command::Artifacts {
            command: ArtifactsCommand::List { json },
        } => Ok(if json {
            artifacts_json()
        } else {
            artifacts_table()
        }),
        Command::Config { command } => run_config(cli.config.as_deref(), command),
    }
}

fn refuse_overwrite(path: &Path, force: bool) -> Result<(), String> {
    if path.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to overwrite it (its keys will be lost)",
            path.display()
        ));
    }
    Ok(())
}

fn need_config(config: Option<&Path>) -> Result<&Path, String> {
    config.ok_or_else(|| "this command needs --config server.config.yaml".to_string())
}

fn run_config(config_path: Option<&Path>, command: ConfigCommand) -> Result<String, String> {
    match command {
        ConfigCommand::Generate {
            hostname,
            frontend_port,
            api_port,
            gui_port,
            datastore,
            out_dir,
            force,
        } => {
            let server = out_dir.join("server.config.yaml");
            let client = out_dir.join("client.config.yaml");
            refuse_overwrite(&server, force)?;
            refuse_overwrite(&client, force)?;
            std::fs::create_dir_all(&out_dir)
                .map_err(|e| format!("{}: cannot create: {e}", out_dir.display()))?;
            let opts = config::GenerateOptions {
                hostname,
                frontend_port,
                api_port,
                gui_port,
                datastore,
            };
            let c = config::generate(&opts, &SystemClock, &OsEntropy::default())
                .map_err(|e| e.to_string())?;
            config::write_yaml(&server, &c).map_err(|e| e.to_string())?;
            config::write_yaml(&client, &c.client_config()).map_err(|e| e.to_string())?;
            Ok(format!(
                "wrote {} (keep it private: it holds the CA key) and {}",
                server.display(),
                client.display()
            ))
        }
        ConfigCommand::Frontend { add } => {
            let path = need_config(config_path)?;
            let mut c = ServerConfig::load(path).map_err(|e| e.to_string())?;
            let adds = add
                .iter()
                .map(|a| config::parse_host_port(a))
                .collect::<Result<Vec<_>, _>>()?;
            let change = config::add_frontends(&mut c, &adds, &SystemClock)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            config::write_yaml(path, &c).map_err(|e| e.to_string())?;
            let client = path.with_file_name("client.config.yaml");
            config::write_yaml(&client, &c.client_config()).map_err(|e| e.to_string())?;
            let mut out = String::new();
            for n in &change.added {
                out.push_str(&format!("added minion {n} (its node name)\n"));
            }
            for n in &change.already_present {
                out.push_str(&format!("minion {n} was already configured\n"));
            }
            out.push_str(&format!(
                "rewrote {} and {} (clients now use {} frontends); reissued the frontend certificate",
                path.display(),
                client.display(),
                c.client.server_urls.len()
            ));
            Ok(out)
        }
        ConfigCommand::ApiClient { name, out, force } => {
            let path = need_config(config_path)?;
            refuse_overwrite(&out, force)?;
            let c = ServerConfig::load(path).map_err(|e| e.to_string())?;
            let api = config::api_client(&c, &name, &SystemClock)?;
            config::write_yaml(&out, &api).map_err(|e| e.to_string())?;
            Ok(format!(
                "wrote {} for API user {name:?} (connects to {})",
                out.display(),
                api.api_connection_string
            ))
        }
    }
}

fn kind_detail(kind: ParamKind) -> String {
    match kind {
        ParamKind::Int { min, max } => format!("int {min}..={max}"),
        k => k.name().to_owned(),
    }
}

/// The catalogue as a JSON array of `{name, description, params: [{name, kind, default, description}]}`.
pub fn artifacts_json() -> String {
    let list: Vec<serde_json::Value> = artifacts::CATALOGUE
        .iter()
        .map(|a: &ArtifactSpec| {
            let params: Vec<serde_json::Value> = a
                .params
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name,
                        "kind": p.kind.name(),
                        "default": p.default,
                        "description": p.description,
                    })
                })
                .collect();
            serde_json::json!({"name": a.name, "description": a.description, "params": params})
        })
        .collect();
    serde_json::to_string_pretty(&list).expect("JSON values always serialise")
}

/// The catalogue as a readable table.
pub fn artifacts_table() -> String {
    let mut s = String::new();
    for a in artifacts::CATALOGUE {
        s.push_str(&format!("{}\n    {}\n", a.name, a.description));
        for p in a.params {
            let default = if p.default.is_empty() {
                "\"\""
            } else {
                p.default
            };
            s.push_str(&format!(
                "    --param {}=<{}>  (default {})  {}\n",
                p.name,
                kind_detail(p.kind),
                default,
                p.description
            ));
        }
    }
    s.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_every_artifact_with_its_params() {
        let v: serde_json::Value = serde_json::from_str(&artifacts_json()).unwrap();
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        for required in [
            "Generic.Client.Info",
            "Linux.Sys.Pslist",
            "Generic.Forensic.FileFinder",
            "Linux.Network.Netstat",
            "Linux.Sys.Users",
            "Generic.Test.Rows",
        ] {
            assert!(names.contains(&required), "{required} missing");
        }
        let rows = v
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "Generic.Test.Rows")
            .unwrap();
        let params: Vec<&str> = rows["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(params, vec!["count", "size"]);
    }

    #[test]
    fn table_shows_params_with_kinds_and_defaults() {
        let t = artifacts_table();
        assert!(
            t.contains("--param count=<int 0..=10000000>  (default 10)"),
            "{t}"
        );
        assert!(t.contains("--param upload=<bool>  (default false)"), "{t}");
    }

    #[test]
    fn cli_parses_the_contract_spelling() {
        let cli = Cli::try_parse_from(["talon", "artifacts", "list", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Artifacts {
                command: ArtifactsCommand::List { json: true }
            }
        ));
        assert!(Cli::try_parse_from(["talon", "artifacts", "frobnicate"]).is_err());
    }
}
