//! The command line: parsing and the commands that need no running cluster.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;
use talon_core::artifacts::{self, ArtifactSpec, ParamKind};

/// Talon: endpoint visibility across one master and many minion frontends.
#[derive(Debug, Parser)]
#[command(name = "talon", version, about, long_about = None)]
pub struct Cli {
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
    let mut out = std::io::stdout().lock();
    let result = match cli.command {
        Command::Artifacts {
            command: ArtifactsCommand::List { json },
        } => {
            let text = if json {
                artifacts_json()
            } else {
                artifacts_table()
            };
            writeln!(out, "{text}")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (e.g. `| head`) is not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("talon: cannot write output: {e}");
            ExitCode::FAILURE
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
