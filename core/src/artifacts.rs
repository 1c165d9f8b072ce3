//! The built-in endpoint artifacts: names, parameters, defaults, and validation.
//!
//! Validation happens before anything is scheduled: an unknown artifact or parameter, or a value of
//! the wrong kind, is an error naming what was wrong.

use std::collections::BTreeMap;
use std::fmt;

/// What values a parameter accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Any UTF-8 string up to [`PARAM_VALUE_BYTES_MAX`].
    String,
    /// A decimal integer in `min..=max`.
    Int {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// `true` or `false`.
    Bool,
    /// A file glob: an absolute path that may contain `*`, `?` and `**`.
    Glob,
    /// One SQL `SELECT` over the endpoint tables. Checked here as a string; the shell prepares it
    /// against the tables before anything is scheduled (the core has no SQL engine).
    Sql,
}

impl ParamKind {
    /// The kind's name, as `talon artifacts list` shows it.
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::String => "string",
            ParamKind::Int { .. } => "int",
            ParamKind::Bool => "bool",
            ParamKind::Glob => "glob",
            ParamKind::Sql => "sql",
        }
    }
}

/// One parameter of an artifact.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    /// The parameter's name, as given in `--param name=value`.
    pub name: &'static str,
    /// What values it accepts.
    pub kind: ParamKind,
    /// The value used when the parameter is not given.
    pub default: &'static str,
    /// One line for `talon artifacts list`.
    pub description: &'static str,
}

/// One artifact the client can collect.
#[derive(Clone, Copy, Debug)]
pub struct ArtifactSpec {
    /// The artifact's name.
    pub name: &'static str,
    /// One line for `talon artifacts list`.
    pub description: &'static str,
    /// Its parameters.
    pub params: &'static [ParamSpec],
}

/// Longest parameter value accepted (bytes).
pub const PARAM_VALUE_BYTES_MAX: usize = 4096;
/// Most parameters one request may carry.
pub const PARAMS_MAX: usize = 32;

/// The artifact an ad-hoc query is collected as: one `query` parameter of kind [`ParamKind::Sql`].
pub const QUERY_ARTIFACT: &str = "Generic.Query";

/// Every artifact the client knows.
pub const CATALOGUE: &[ArtifactSpec] = &[
    ArtifactSpec {
        name: "Generic.Client.Info",
        description: "Host facts: hostname, fqdn, os, kernel, arch, boot time, ips, macs, agent version.",
        params: &[],
    },
    ArtifactSpec {
        name: "Generic.Forensic.FileFinder",
        description: "Files matching a glob: path, size, mtime, sha256; optionally uploads them.",
        params: &[
            ParamSpec {
                name: "glob",
                kind: ParamKind::Glob,
                default: "/etc/*.conf",
                description: "Absolute path glob (* ? and ** allowed).",
            },
            ParamSpec {
                name: "upload",
                kind: ParamKind::Bool,
                default: "false",
                description: "Upload each matching file into the filestore.",
            },
            ParamSpec {
                name: "max_files",
                kind: ParamKind::Int {
                    min: 1,
                    max: 100_000,
                },
                default: "1000",
                description: "Stop after this many matches.",
            },
        ],
    },
    ArtifactSpec {
        name: "Generic.Test.Rows",
        description: "Synthetic rows for load tests.",
        params: &[
            ParamSpec {
                name: "count",
                kind: ParamKind::Int {
                    min: 0,
                    max: 10_000_000,
                },
                default: "10",
                description: "Number of rows.",
            },
            ParamSpec {
                name: "size",
                kind: ParamKind::Int {
                    min: 0,
                    max: 1_048_576,
                },
                default: "32",
                description: "Bytes of padding per row.",
            },
            ParamSpec {
                name: "pause_ms",
                kind: ParamKind::Int {
                    min: 0,
                    max: 60_000,
                },
                default: "0",
                description: "Pause after every 100 rows (paced load for latency tests).",
            },
            ParamSpec {
                name: "uploads",
                kind: ParamKind::Int { min: 0, max: 16 },
                default: "0",
                description: "Synthetic files to upload after the rows.",
            },
            ParamSpec {
                name: "upload_size",
                kind: ParamKind::Int {
                    min: 0,
                    max: 64 << 20,
                },
                default: "1024",
                description: "Bytes of each synthetic upload (its content is a function of the \
                              upload's number and offset, so a reader can verify it).",
            },
        ],
    },
    ArtifactSpec {
        name: QUERY_ARTIFACT,
        description: "An ad-hoc SQL query over the endpoint tables (`talon query`, `hunt create \
                      --query`); its rows are the query's columns.",
        params: &[ParamSpec {
            name: "query",
            kind: ParamKind::Sql,
            default: "SELECT * FROM system_info",
            description: "One SELECT over the endpoint tables (docs/artifacts.md).",
        }],
    },
    ArtifactSpec {
        name: "Linux.Network.Netstat",
        description: "Open TCP and UDP sockets: protocol, local and remote address, state, inode.",
        params: &[],
    },
    ArtifactSpec {
        name: "Linux.Sys.Pslist",
        description: "Processes: pid, ppid, name, exe, cmdline, user, rss, start time.",
        params: &[ParamSpec {
            name: "name",
            kind: ParamKind::String,
            default: "",
            description: "Only processes whose name contains this (empty: all).",
        }],
    },
    ArtifactSpec {
        name: "Linux.Sys.Users",
        description: "Local user accounts from /etc/passwd: name, uid, gid, home, shell.",
        params: &[],
    },
];

/// Why a collection request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactError {
    /// No artifact has this name.
    UnknownArtifact(String),
    /// The artifact has no parameter of this name.
    UnknownParam {
        /// The artifact.
        artifact: &'static str,
        /// The parameter given.
        param: String,
    },
    /// The value does not fit the parameter's kind.
    BadValue {
        /// The parameter.
        param: &'static str,
        /// The value given.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// More parameters than [`PARAMS_MAX`].
    TooManyParams(usize),
}

impl fmt::Display for ArtifactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactError::UnknownArtifact(name) => {
                write!(f, "unknown artifact {name:?} (see `talon artifacts list`)")
            }
            ArtifactError::UnknownParam { artifact, param } => {
                write!(f, "artifact {artifact} has no parameter {param:?}")
            }
            ArtifactError::BadValue {
                param,
                value,
                expected,
            } => {
                let shown: String = value.chars().take(64).collect();
                write!(
                    f,
                    "parameter {param}={shown:?} is invalid: expected {expected}"
                )
            }
            ArtifactError::TooManyParams(n) => {
                write!(f, "{n} parameters given; at most {PARAMS_MAX} are accepted")
            }
        }
    }
}

impl std::error::Error for ArtifactError {}

/// Looks an artifact up by its exact name.
pub fn find(name: &str) -> Option<&'static ArtifactSpec> {
    CATALOGUE.iter().find(|a| a.name == name)
}

fn check_value(p: &ParamSpec, value: &str) -> Result<(), ArtifactError> {
    let bad = |expected: String| ArtifactError::BadValue {
        param: p.name,
        value: value.to_owned(),
        expected,
    };
    if value.len() > PARAM_VALUE_BYTES_MAX || value.contains('\0') {
        return Err(bad(format!(
            "at most {PARAM_VALUE_BYTES_MAX} bytes and no NUL"
        )));
    }
    match p.kind {
        ParamKind::String | ParamKind::Sql => Ok(()),
        ParamKind::Bool => match value {
            "true" | "false" => Ok(()),
            _ => Err(bad("true or false".into())),
        },
        ParamKind::Int { min, max } => match value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(()),
            _ => Err(bad(format!("an integer in {min}..={max}"))),
        },
        ParamKind::Glob => {
            if value.starts_with('/') && !value.split('/').any(|c| c == "..") {
                Ok(())
            } else {
                Err(bad("an absolute path glob without '..'".into()))
            }
        }
    }
}

/// Validates a request and returns the full parameter set, defaults filled in.
pub fn validate(
    artifact: &str,
    params: &BTreeMap<String, String>,
) -> Result<(&'static ArtifactSpec, BTreeMap<String, String>), ArtifactError> {
    let spec = find(artifact).ok_or_else(|| ArtifactError::UnknownArtifact(artifact.to_owned()))?;
    if params.len() > PARAMS_MAX {
        return Err(ArtifactError::TooManyParams(params.len()));
    }
    if let Some(unknown) = params
        .keys()
        .find(|k| !spec.params.iter().any(|p| p.name == *k))
    {
        return Err(ArtifactError::UnknownParam {
            artifact: spec.name,
            param: unknown.clone(),
        });
    }
    let mut full = BTreeMap::new();
    for p in spec.params {
        let value = params.get(p.name).map(String::as_str).unwrap_or(p.default);
        check_value(p, value)?;
        full.insert(p.name.to_owned(), value.to_owned());
    }
    Ok((spec, full))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn catalogue_names_are_unique_and_defaults_are_valid() {
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
            for p in a.params {
                check_value(p, p.default).unwrap();
            }
            validate(a.name, &BTreeMap::new()).unwrap();
        }
    }

    #[test]
    fn fills_defaults_and_keeps_given_values() {
        let (_, full) = validate("Generic.Test.Rows", &params(&[("count", "5")])).unwrap();
        assert_eq!(
            full,
            params(&[
                ("count", "5"),
                ("pause_ms", "0"),
                ("size", "32"),
                ("upload_size", "1024"),
                ("uploads", "0")
            ])
        );
    }

    #[test]
    fn refuses_unknown_artifacts_params_and_bad_values() {
        assert_eq!(
            validate("No.Such", &BTreeMap::new()).unwrap_err(),
            ArtifactError::UnknownArtifact("No.Such".into())
        );
        assert!(matches!(
            validate("Generic.Test.Rows", &params(&[("rows", "5")])),
            Err(ArtifactError::UnknownParam { param, .. }) if param == "rows"
        ));
        for (k, v) in [("count", "-1"), ("count", "10000001"), ("size", "x")] {
            assert!(matches!(
                validate("Generic.Test.Rows", &params(&[(k, v)])),
                Err(ArtifactError::BadValue { .. })
            ));
        }
        for glob in ["etc/*", "/etc/../root/*"] {
            assert!(validate("Generic.Forensic.FileFinder", &params(&[("glob", glob)])).is_err());
        }
        assert!(validate("Generic.Forensic.FileFinder", &params(&[("upload", "yes")])).is_err());
    }
}
