//! Artifact definitions (docs/artifacts.md, "Artifact definitions"): the YAML an analyst writes,
//! the built-in artifacts shipped in this binary as such definitions, and the compiled form a task
//! carries to the agent so that any agent runs any artifact.
//!
//! The definition's shape is checked by [`talon_core::artifacts::check_definition`]; its queries are
//! prepared against the endpoint tables by [`crate::query::check_artifact`].

use serde::Deserialize;
use std::sync::LazyLock;
use talon_core::artifacts::{
    ArtifactSpec, DEFINITION_PARAM, ParamKind, ParamSpec, Source, check_definition,
};

/// Longest definition accepted (bytes of YAML).
pub const DEFINITION_BYTES_MAX: usize = 64 << 10;

/// The built-in definitions, as shipped (`io/artifacts/*.yaml`).
const BUILTIN_TEXTS: &[&str] = &[
    include_str!("../artifacts/Generic.Client.Info.yaml"),
    include_str!("../artifacts/Generic.Events.Test.yaml"),
    include_str!("../artifacts/Generic.Forensic.FileFinder.yaml"),
    include_str!("../artifacts/Generic.Query.yaml"),
    include_str!("../artifacts/Generic.Test.Rows.yaml"),
    include_str!("../artifacts/Linux.Events.FileChanges.yaml"),
    include_str!("../artifacts/Linux.Events.ProcessStarts.yaml"),
    include_str!("../artifacts/Linux.Events.Sockets.yaml"),
    include_str!("../artifacts/Linux.Network.Netstat.yaml"),
    include_str!("../artifacts/Linux.Sys.Pslist.yaml"),
    include_str!("../artifacts/Linux.Sys.Users.yaml"),
];

/// A built-in artifact: its definition and text.
#[derive(Debug)]
pub struct Builtin {
    /// The parsed definition.
    pub spec: ArtifactSpec,
    /// Its YAML, as shipped.
    pub text: &'static str,
    /// Run by the agent's own code (no sources).
    pub native: bool,
}

static BUILTINS: LazyLock<Vec<Builtin>> = LazyLock::new(|| {
    BUILTIN_TEXTS
        .iter()
        .map(|text| {
            let (spec, native) = parse_any(text, true)
                .unwrap_or_else(|e| panic!("a built-in definition is invalid: {e}\n{text}"));
            Builtin { spec, text, native }
        })
        .collect()
});

/// Every built-in artifact, by name.
pub fn builtins() -> &'static [Builtin] {
    &BUILTINS
}

/// The built-in artifact named `name`.
pub fn builtin(name: &str) -> Option<&'static Builtin> {
    builtins().iter().find(|b| b.spec.name == name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Yaml {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    parameters: Vec<YamlParam>,
    #[serde(default)]
    sources: Vec<YamlSource>,
    #[serde(default)]
    json_columns: Vec<String>,
    #[serde(default)]
    native: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlParam {
    name: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    default: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    min: Option<u64>,
    #[serde(default)]
    max: Option<u64>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlSource {
    #[serde(default)]
    name: Option<String>,
    query: String,
}

/// Parses and checks an analyst's definition (not its queries: see
/// [`crate::query::check_artifact`]). `Err` names what is wrong.
pub fn parse(text: &str) -> Result<ArtifactSpec, String> {
    parse_any(text, false).map(|(spec, _)| spec)
}

fn parse_any(text: &str, builtin: bool) -> Result<(ArtifactSpec, bool), String> {
    if text.len() > DEFINITION_BYTES_MAX {
        return Err(format!(
            "the definition is {} bytes; at most {DEFINITION_BYTES_MAX}",
            text.len()
        ));
    }
    let y: Yaml = serde_yaml_ng::from_str(text).map_err(|e| format!("not a definition: {e}"))?;
    if y.native && !builtin {
        return Err(
            "native: only built-in artifacts are run by the agent's own code; a \
                    definition has sources, each with a query"
                .into(),
        );
    }
    let event = match y.kind.as_deref() {
        None | Some("client") => false,
        Some("event") => true,
        Some(other) => {
            return Err(format!(
                "type {other:?} is not supported: use client (one collection per task) or event \
                 (runs continuously over an event table)"
            ));
        }
    };
    let mut params = Vec::with_capacity(y.parameters.len());
    for p in y.parameters {
        let kind = match (p.kind.as_deref().unwrap_or("string"), p.min, p.max) {
            ("int", min, max) => ParamKind::Int {
                min: min.unwrap_or(0),
                max: max.unwrap_or(i64::MAX as u64),
            },
            (k, Some(_), _) | (k, _, Some(_)) => {
                return Err(format!(
                    "parameter {}: min and max apply to type int, not {k}",
                    p.name
                ));
            }
            ("string", ..) => ParamKind::String,
            ("bool", ..) => ParamKind::Bool,
            ("glob", ..) => ParamKind::Glob,
            ("sql", ..) => ParamKind::Sql,
            (other, ..) => {
                return Err(format!(
                    "parameter {}: type {other:?} is unknown: use string, int, bool or glob",
                    p.name
                ));
            }
        };
        let default = match p.default {
            None => match kind {
                ParamKind::Int { min, .. } => min.to_string(),
                ParamKind::Bool => "false".into(),
                _ => String::new(),
            },
            Some(serde_yaml_ng::Value::String(s)) => s,
            Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
            Some(serde_yaml_ng::Value::Bool(b)) => b.to_string(),
            Some(_) => {
                return Err(format!(
                    "parameter {}: the default must be a string, a number or true/false",
                    p.name
                ));
            }
        };
        params.push(ParamSpec {
            name: p.name,
            kind,
            default,
            description: p.description.trim().to_owned(),
        });
    }
    let many = y.sources.len() > 1;
    let sources = y
        .sources
        .into_iter()
        .enumerate()
        .map(|(i, s)| Source {
            name: s.name.unwrap_or_else(|| {
                if many {
                    format!("source_{}", i + 1)
                } else {
                    "default".into()
                }
            }),
            query: s.query,
        })
        .collect();
    let spec = ArtifactSpec {
        name: y.name,
        description: y.description.trim().to_owned(),
        params,
        sources,
        json_columns: y.json_columns,
        event,
    };
    check_definition(&spec, y.native).map_err(|e| e.to_string())?;
    Ok((spec, y.native))
}

/// A custom artifact as its task carries it (parameter [`DEFINITION_PARAM`]): compact JSON of what
/// the agent needs to run it — parameter names and kinds (to bind them), sources, JSON columns.
pub fn compile(spec: &ArtifactSpec) -> String {
    let params: Vec<serde_json::Value> = spec
        .params
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "type": p.kind.name()}))
        .collect();
    let sources: Vec<serde_json::Value> = spec
        .sources
        .iter()
        .map(|s| serde_json::json!({"name": s.name, "query": s.query}))
        .collect();
    serde_json::json!({
        "name": spec.name,
        "params": params,
        "sources": sources,
        "json_columns": spec.json_columns,
        "event": spec.event,
    })
    .to_string()
}

#[derive(Deserialize)]
struct Compiled {
    name: String,
    params: Vec<CompiledParam>,
    sources: Vec<CompiledSource>,
    #[serde(default)]
    json_columns: Vec<String>,
    #[serde(default)]
    event: bool,
}

#[derive(Deserialize)]
struct CompiledParam {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct CompiledSource {
    name: String,
    query: String,
}

/// The definition a task carries ([`compile`]), as the agent runs it.
pub fn from_task(compiled: &str) -> Result<ArtifactSpec, String> {
    let c: Compiled = serde_json::from_str(compiled)
        .map_err(|e| format!("the task's artifact definition is malformed: {e}"))?;
    let params = c
        .params
        .into_iter()
        .map(|p| ParamSpec {
            kind: match p.kind.as_str() {
                // Bounds were checked on the server; here a kind only says how to bind.
                "int" => ParamKind::Int {
                    min: 0,
                    max: u64::MAX,
                },
                "bool" => ParamKind::Bool,
                "glob" => ParamKind::Glob,
                _ => ParamKind::String,
            },
            name: p.name,
            default: String::new(),
            description: String::new(),
        })
        .collect();
    let spec = ArtifactSpec {
        name: c.name,
        description: String::new(),
        params,
        sources: c
            .sources
            .into_iter()
            .map(|s| Source {
                name: s.name,
                query: s.query,
            })
            .collect(),
        json_columns: c.json_columns,
        event: c.event,
    };
    if spec.sources.is_empty() {
        return Err("the task's artifact definition has no sources".into());
    }
    Ok(spec)
}

/// The API's view of an artifact (`definition`: with its YAML).
pub fn info(
    spec: &ArtifactSpec,
    builtin: bool,
    platforms: Vec<String>,
    definition: Option<&str>,
) -> talon_proto::api::ArtifactInfo {
    talon_proto::api::ArtifactInfo {
        name: spec.name.clone(),
        description: spec.description.clone(),
        params: spec
            .params
            .iter()
            .map(|p| {
                let (min, max) = match p.kind {
                    ParamKind::Int { min, max } => (min, max),
                    _ => (0, 0),
                };
                talon_proto::api::ArtifactParam {
                    name: p.name.clone(),
                    kind: p.kind.name().into(),
                    default: p.default.clone(),
                    description: p.description.clone(),
                    min,
                    max,
                }
            })
            .collect(),
        builtin,
        definition: definition.unwrap_or_default().to_owned(),
        platforms,
        event: spec.event,
    }
}

/// The built-in artifacts as the API lists them, with where each runs: prepared once per process
/// (each needs its queries prepared), not on every list.
pub fn builtin_infos() -> Vec<talon_proto::api::ArtifactInfo> {
    static INFOS: LazyLock<Vec<talon_proto::api::ArtifactInfo>> = LazyLock::new(|| {
        builtins()
            .iter()
            .map(|b| {
                let queries = crate::query::check_artifact(&b.spec, &Default::default())
                    .unwrap_or_else(|e| panic!("built-in {} does not prepare: {e}", b.spec.name));
                let on = crate::query::platforms(&queries)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                info(&b.spec, true, on, None)
            })
            .collect()
    });
    INFOS.clone()
}

/// True if `params` carry a compiled definition (a custom artifact's task).
pub fn carries_definition(params: &std::collections::BTreeMap<String, String>) -> bool {
    params.contains_key(DEFINITION_PARAM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_keep_their_names_and_params() {
        let names: Vec<&str> = builtins().iter().map(|b| b.spec.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Generic.Client.Info",
                "Generic.Events.Test",
                "Generic.Forensic.FileFinder",
                "Generic.Query",
                "Generic.Test.Rows",
                "Linux.Events.FileChanges",
                "Linux.Events.ProcessStarts",
                "Linux.Events.Sockets",
                "Linux.Network.Netstat",
                "Linux.Sys.Pslist",
                "Linux.Sys.Users"
            ]
        );
        let events: Vec<&str> = builtins()
            .iter()
            .filter(|b| b.spec.event)
            .map(|b| b.spec.name.as_str())
            .collect();
        assert_eq!(
            events,
            [
                "Generic.Events.Test",
                "Linux.Events.FileChanges",
                "Linux.Events.ProcessStarts",
                "Linux.Events.Sockets"
            ]
        );
        let rows = &builtin("Generic.Test.Rows").unwrap().spec;
        let p: Vec<(&str, ParamKind, &str)> = rows
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.kind, p.default.as_str()))
            .collect();
        assert_eq!(
            p[0],
            (
                "count",
                ParamKind::Int {
                    min: 0,
                    max: 10_000_000
                },
                "10"
            )
        );
        assert_eq!(p.len(), 5);
        assert!(!builtin("Linux.Sys.Users").unwrap().native);
        assert_eq!(
            builtin("Generic.Forensic.FileFinder").unwrap().spec.params[1].default,
            "false"
        );
    }

    const GOOD: &str = "
name: Custom.Linux.Shells
description: Users with a login shell.
parameters:
  - name: shell
    default: /bin/bash
    description: The shell.
  - name: min_uid
    type: int
    max: 65535
    default: 1000
sources:
  - query: SELECT username, uid FROM users WHERE shell = :shell AND uid >= :min_uid
";

    #[test]
    fn a_definition_parses_and_compiles_to_what_the_agent_runs() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.name, "Custom.Linux.Shells");
        assert_eq!(spec.sources[0].name, "default");
        assert_eq!(spec.params[1].kind, ParamKind::Int { min: 0, max: 65535 });
        assert_eq!(spec.params[0].kind, ParamKind::String);
        let back = from_task(&compile(&spec)).unwrap();
        assert_eq!(back.sources, spec.sources);
        assert_eq!(back.params[1].name, "min_uid");
        assert!(matches!(back.params[1].kind, ParamKind::Int { .. }));
    }

    #[test]
    fn bad_definitions_are_refused_naming_what() {
        let cases = [
            (
                "name: X\nsources: [{query: SELECT 1}]\nnative: true",
                "native",
            ),
            ("name: X\nsourcs: []", "unknown field `sourcs`"),
            (
                "name: X\ntype: events\nsources: [{query: SELECT 1}]",
                "type \"events\"",
            ),
            (
                "name: X\ntype: event\nsources: [{query: SELECT 1}, {query: SELECT 2}]",
                "an event artifact has one",
            ),
            ("name: X\nsources: []", "0 sources"),
            (
                "name: X\nparameters: [{name: a, type: float}]\nsources: [{query: SELECT 1}]",
                "type \"float\" is unknown",
            ),
            (
                "name: X\nparameters: [{name: a, type: string, min: 1}]\nsources: [{query: SELECT 1}]",
                "min and max apply to type int",
            ),
            (
                "name: X\nparameters: [{name: a, type: int, max: 5, default: 9}]\nsources: [{query: SELECT 1}]",
                "the default of parameter a=\"9\"",
            ),
            (
                "name: X\nparameters: [{name: q, type: sql}]\nsources: [{query: SELECT 1}]",
                "reserved for Generic.Query",
            ),
            ("- not a mapping", "not a definition"),
            (
                "name: bad name\nsources: [{query: SELECT 1}]",
                "name \"bad name\"",
            ),
        ];
        for (text, says) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e:?} should say {says:?}");
        }
        let huge = format!(
            "name: X\ndescription: {}\n",
            "x".repeat(DEFINITION_BYTES_MAX)
        );
        assert!(parse(&huge).unwrap_err().contains("bytes; at most"));
        assert!(from_task("{").is_err());
        assert!(
            from_task(r#"{"name":"X","params":[],"sources":[]}"#)
                .unwrap_err()
                .contains("no sources")
        );
    }
}
