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
    /// One SQL `SELECT` over the endpoint tables, up to [`QUERY_BYTES_MAX`]. Checked here as a
    /// string; the shell prepares it against the tables before anything is scheduled (the core
    /// has no SQL engine).
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The parameter's name, as given in `--param name=value` (and bound in a query as `:name`).
    pub name: String,
    /// What values it accepts.
    pub kind: ParamKind,
    /// The value used when the parameter is not given.
    pub default: String,
    /// One line for `talon artifacts list`.
    pub description: String,
}

/// One query of an artifact: its rows are the artifact's rows (with more than one source, each row
/// also names its source in column [`SOURCE_COLUMN`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Its name, unique within the artifact.
    pub name: String,
    /// One `SELECT` over the endpoint tables; the artifact's parameters are bound as `:name`.
    pub query: String,
}

/// One artifact the client can collect: a definition (docs/artifacts.md, "Artifact definitions").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactSpec {
    /// The artifact's name.
    pub name: String,
    /// One line for `talon artifacts list`.
    pub description: String,
    /// Its parameters.
    pub params: Vec<ParamSpec>,
    /// Its queries, run in order. Empty only for a built-in the agent runs natively.
    pub sources: Vec<Source>,
    /// Columns whose text is JSON (an array or object) and is stored as such in each row.
    pub json_columns: Vec<String>,
    /// An event artifact (`type: event`, docs/events.md): its one source runs over each batch of
    /// an event table, continuously, where the client event table assigns it; never collected.
    pub event: bool,
}

impl ArtifactSpec {
    /// The parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// Longest parameter value accepted (bytes).
pub const PARAM_VALUE_BYTES_MAX: usize = 4096;
/// Most parameters one request, or one definition, may carry.
pub const PARAMS_MAX: usize = 32;
/// Most sources one definition may have.
pub const SOURCES_MAX: usize = 16;
/// Longest artifact name (bytes).
pub const NAME_BYTES_MAX: usize = 128;
/// Longest parameter or source name (bytes).
pub const PARAM_NAME_BYTES_MAX: usize = 64;
/// Longest description (bytes).
pub const DESCRIPTION_BYTES_MAX: usize = 4096;
/// Longest query of one source (bytes).
pub const QUERY_BYTES_MAX: usize = 64 << 10;
/// The column naming a row's source, in an artifact with more than one.
pub const SOURCE_COLUMN: &str = "_source";
/// The task parameter that carries a custom artifact's compiled definition to the agent (a name
/// no declared parameter can have: those start with a lower-case letter).
pub const DEFINITION_PARAM: &str = "_artifact";

/// The artifact an ad-hoc query is collected as: one `query` parameter of kind [`ParamKind::Sql`].
pub const QUERY_ARTIFACT: &str = "Generic.Query";

/// Why a collection request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactError {
    /// No artifact has this name.
    UnknownArtifact(String),
    /// The artifact has no parameter of this name.
    UnknownParam {
        /// The artifact.
        artifact: String,
        /// The parameter given.
        param: String,
    },
    /// The value does not fit the parameter's kind.
    BadValue {
        /// The parameter.
        param: String,
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

/// True for an absolute path (or glob) with no `..` component: what a glob parameter, a glob walk
/// and an upload accept, so none of them can name a path outside the one written.
pub fn absolute_without_dotdot(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == "..")
}

fn check_value(p: &ParamSpec, value: &str) -> Result<(), ArtifactError> {
    let bad = |expected: String| ArtifactError::BadValue {
        param: p.name.clone(),
        value: value.to_owned(),
        expected,
    };
    // A query (Generic.Query's text) may be as long as a definition's source.
    let max = if p.kind == ParamKind::Sql {
        QUERY_BYTES_MAX
    } else {
        PARAM_VALUE_BYTES_MAX
    };
    if value.len() > max || value.contains('\0') {
        return Err(bad(format!("at most {max} bytes and no NUL")));
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
            if absolute_without_dotdot(value) {
                Ok(())
            } else {
                Err(bad("an absolute path glob without '..'".into()))
            }
        }
    }
}

/// Validates a request for `spec` and returns the full parameter set, defaults filled in.
pub fn validate(
    spec: &ArtifactSpec,
    params: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ArtifactError> {
    if params.len() > PARAMS_MAX {
        return Err(ArtifactError::TooManyParams(params.len()));
    }
    if let Some(unknown) = params.keys().find(|k| spec.param(k).is_none()) {
        return Err(ArtifactError::UnknownParam {
            artifact: spec.name.clone(),
            param: unknown.clone(),
        });
    }
    let mut full = BTreeMap::new();
    for p in &spec.params {
        let value = params.get(&p.name).unwrap_or(&p.default);
        check_value(p, value)?;
        full.insert(p.name.clone(), value.clone());
    }
    Ok(full)
}

/// Why a definition is refused (before any query in it is prepared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefinitionError(pub String);

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DefinitionError {}

/// True for a dotted name of letters, digits and `_` (`Custom.Linux.SuidFiles`).
pub fn artifact_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.split('.').all(|part| {
            part.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// True for a parameter or source name: a lower-case letter, then lower-case letters, digits, `_`.
fn param_name_ok(name: &str) -> bool {
    name.len() <= PARAM_NAME_BYTES_MAX
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks a definition's shape: its name, parameter names, kinds and defaults, and that it has
/// sources within bounds (`native`: a built-in the agent runs itself, which has none). The queries
/// themselves are prepared against the tables by the shell.
pub fn check_definition(spec: &ArtifactSpec, native: bool) -> Result<(), DefinitionError> {
    let err = |m: String| Err(DefinitionError(m));
    if !artifact_name_ok(&spec.name) {
        return err(format!(
            "name {:?} is invalid: dot-separated parts of letters, digits and _, each starting \
             with a letter, at most {NAME_BYTES_MAX} bytes",
            spec.name.chars().take(64).collect::<String>()
        ));
    }
    if spec.description.len() > DESCRIPTION_BYTES_MAX {
        return err(format!(
            "description is {} bytes; at most {DESCRIPTION_BYTES_MAX}",
            spec.description.len()
        ));
    }
    if spec.params.len() > PARAMS_MAX {
        return err(format!(
            "{} parameters; at most {PARAMS_MAX}",
            spec.params.len()
        ));
    }
    for (i, p) in spec.params.iter().enumerate() {
        if !param_name_ok(&p.name) {
            return err(format!(
                "parameter name {:?} is invalid: a lower-case letter, then lower-case letters, \
                 digits and _, at most {PARAM_NAME_BYTES_MAX} bytes",
                p.name.chars().take(64).collect::<String>()
            ));
        }
        if spec.params[..i].iter().any(|q| q.name == p.name) {
            return err(format!("parameter {} is declared twice", p.name));
        }
        if p.kind == ParamKind::Sql && !native {
            return err(format!(
                "parameter {}: type sql is reserved for Generic.Query (a definition's queries are \
                 its sources; parameters are values bound into them)",
                p.name
            ));
        }
        if let ParamKind::Int { min, max } = p.kind
            && min > max
        {
            return err(format!(
                "parameter {}: min {min} is above max {max}",
                p.name
            ));
        }
        if p.description.len() > DESCRIPTION_BYTES_MAX {
            return err(format!("parameter {}: description too long", p.name));
        }
        check_value(p, &p.default).map_err(|e| DefinitionError(format!("the default of {e}")))?;
    }
    if native {
        return Ok(());
    }
    if spec.event && spec.sources.len() != 1 {
        return err(format!(
            "{} sources; an event artifact has one, a query over an event table",
            spec.sources.len()
        ));
    }
    if spec.sources.is_empty() || spec.sources.len() > SOURCES_MAX {
        return err(format!(
            "{} sources; an artifact has 1 to {SOURCES_MAX}, each with a query",
            spec.sources.len()
        ));
    }
    for (i, s) in spec.sources.iter().enumerate() {
        if !param_name_ok(&s.name) {
            return err(format!(
                "source name {:?} is invalid: a lower-case letter, then lower-case letters, digits \
                 and _",
                s.name.chars().take(64).collect::<String>()
            ));
        }
        if spec.sources[..i].iter().any(|t| t.name == s.name) {
            return err(format!("source {} is declared twice", s.name));
        }
        if s.query.trim().is_empty() || s.query.len() > QUERY_BYTES_MAX {
            return err(format!(
                "source {}: a query of 1 to {QUERY_BYTES_MAX} bytes is needed",
                s.name
            ));
        }
    }
    for c in &spec.json_columns {
        if c.is_empty() || c.len() > PARAM_NAME_BYTES_MAX {
            return err(format!("json column {c:?} is invalid"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn p(name: &str, kind: ParamKind, default: &str) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            kind,
            default: default.into(),
            description: String::new(),
        }
    }

    fn spec() -> ArtifactSpec {
        ArtifactSpec {
            name: "Custom.Test".into(),
            description: "a test".into(),
            params: vec![
                p("count", ParamKind::Int { min: 0, max: 100 }, "10"),
                p("glob", ParamKind::Glob, "/etc/*"),
                p("upload", ParamKind::Bool, "false"),
                p("name", ParamKind::String, ""),
            ],
            sources: vec![Source {
                name: "rows".into(),
                query: "SELECT :count AS n".into(),
            }],
            json_columns: vec![],
            event: false,
        }
    }

    #[test]
    fn fills_defaults_and_keeps_given_values() {
        let full = validate(&spec(), &params(&[("count", "5")])).unwrap();
        assert_eq!(
            full,
            params(&[
                ("count", "5"),
                ("glob", "/etc/*"),
                ("name", ""),
                ("upload", "false")
            ])
        );
    }

    #[test]
    fn refuses_unknown_params_and_bad_values() {
        let s = spec();
        assert!(matches!(
            validate(&s, &params(&[("rows", "5")])),
            Err(ArtifactError::UnknownParam { param, .. }) if param == "rows"
        ));
        // The definition parameter cannot be smuggled in by a request.
        assert!(validate(&s, &params(&[(DEFINITION_PARAM, "{}")])).is_err());
        for (k, v) in [("count", "-1"), ("count", "101"), ("count", "x")] {
            assert!(matches!(
                validate(&s, &params(&[(k, v)])),
                Err(ArtifactError::BadValue { .. })
            ));
        }
        for glob in ["etc/*", "/etc/../root/*"] {
            assert!(validate(&s, &params(&[("glob", glob)])).is_err());
        }
        // A string is bounded at PARAM_VALUE_BYTES_MAX, a query at QUERY_BYTES_MAX.
        let long = "x".repeat(PARAM_VALUE_BYTES_MAX + 1);
        assert!(validate(&s, &params(&[("name", &long)])).is_err());
        let mut q = spec();
        q.params.push(p("query", ParamKind::Sql, "SELECT 1"));
        let query = format!("SELECT '{}'", "x".repeat(PARAM_VALUE_BYTES_MAX));
        assert!(validate(&q, &params(&[("query", &query)])).is_ok());
        let huge = "x".repeat(QUERY_BYTES_MAX + 1);
        assert!(matches!(
            validate(&q, &params(&[("query", &huge)])),
            Err(ArtifactError::BadValue { expected, .. }) if expected.contains("65536 bytes")
        ));
        assert!(validate(&s, &params(&[("upload", "yes")])).is_err());
        let many: BTreeMap<String, String> = (0..=PARAMS_MAX)
            .map(|i| (format!("p{i}"), String::new()))
            .collect();
        assert_eq!(
            validate(&s, &many),
            Err(ArtifactError::TooManyParams(PARAMS_MAX + 1))
        );
    }

    #[test]
    fn definitions_are_checked_and_each_refusal_names_what() {
        check_definition(&spec(), false).unwrap();
        let refused = |f: &dyn Fn(&mut ArtifactSpec), says: &str| {
            let mut s = spec();
            f(&mut s);
            let e = check_definition(&s, false).unwrap_err().0;
            assert!(e.contains(says), "{e:?} should say {says:?}");
        };
        refused(&|s| s.name = "Bad Name".into(), "name \"Bad Name\"");
        refused(&|s| s.name = "Custom..X".into(), "is invalid");
        refused(&|s| s.name = "1Custom".into(), "is invalid");
        refused(&|s| s.params[0].name = "Count".into(), "parameter name");
        refused(&|s| s.params[0].name = "_artifact".into(), "parameter name");
        refused(&|s| s.params[1].name = "count".into(), "declared twice");
        refused(&|s| s.params[0].default = "1000".into(), "the default of");
        refused(
            &|s| s.params[0].kind = ParamKind::Int { min: 5, max: 1 },
            "above max",
        );
        refused(&|s| s.params[3].kind = ParamKind::Sql, "reserved");
        refused(&|s| s.sources.clear(), "0 sources");
        refused(&|s| s.sources[0].query = " ".into(), "source rows");
        refused(&|s| s.sources.push(s.sources[0].clone()), "declared twice");
        refused(&|s| s.sources[0].name = "Rows".into(), "source name");
        // A native built-in has no sources.
        let mut native = spec();
        native.sources.clear();
        check_definition(&native, true).unwrap();
    }
}
