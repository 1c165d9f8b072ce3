//! The artifact repository on the master (docs/artifacts.md, "The repository"): the built-in
//! definitions shipped in the binary and the custom ones analysts add, stored in the datastore
//! under [`paths::ARTIFACTS`] (so a minion's replica and a restarted master know them too). A
//! request names an artifact; it is resolved here, its parameters validated and its queries
//! prepared, and a custom artifact's task carries its compiled definition
//! ([`talon_core::artifacts::DEFINITION_PARAM`]) so that any agent runs it as it was when asked.

use super::*;
use crate::definitions;
use talon_core::artifacts::ArtifactSpec;

/// Custom artifacts the repository holds at most; one more is refused.
pub const CUSTOM_MAX: usize = 1000;

/// An artifact as resolved for a request.
pub(super) struct Resolved {
    /// Its definition.
    pub spec: ArtifactSpec,
    /// Shipped in the binary.
    pub builtin: bool,
    /// Its YAML.
    pub text: String,
}

/// The artifact named `name`: a built-in, or a custom one from the datastore; `NOT_FOUND` names
/// where to look.
pub(super) async fn resolve(ds: &Meta, name: &str) -> Result<Resolved, Status> {
    if let Some(b) = definitions::builtin(name) {
        return Ok(Resolved {
            spec: b.spec.clone(),
            builtin: true,
            text: b.text.to_owned(),
        });
    }
    custom(ds, name).await?.ok_or_else(|| {
        Status::not_found(format!(
            "unknown artifact {name:?} (see `talon artifacts list`)"
        ))
    })
}

/// The custom artifact named `name`, if stored.
pub(super) async fn custom(ds: &Meta, name: &str) -> Result<Option<Resolved>, Status> {
    let key = paths::artifact_definition(name);
    if paths::validate_key(&key).is_err() {
        return Ok(None);
    }
    let Some(bytes) = ds.get(&key).await.map_err(|e| e.status())? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // Stored only after it was checked; a definition this build refuses (written by another
    // version) is reported, not run.
    let spec = definitions::parse(&text).map_err(|e| {
        Status::failed_precondition(format!(
            "the stored definition of artifact {name} is refused by this build: {e}"
        ))
    })?;
    Ok(Some(Resolved {
        spec,
        builtin: false,
        text,
    }))
}

/// The names of the custom artifacts stored, sorted.
pub(super) async fn custom_names(ds: &Meta) -> Result<Vec<String>, Status> {
    let (keys, _) = ds.list(paths::ARTIFACTS).await.map_err(|e| e.status())?;
    let mut names: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(paths::ARTIFACTS)?.strip_suffix(".yaml"))
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

/// Every custom artifact stored, by name, read [`super::api_reads::LOAD_PARALLEL`] at a time (each
/// read may be a round trip to the shared volume). One whose stored definition this build refuses
/// (written by another version) is left out and logged; one removed since it was listed, too.
pub(super) async fn customs(ds: &Meta) -> Result<Vec<Resolved>, Status> {
    let names = custom_names(ds).await?;
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(super::api_reads::LOAD_PARALLEL) {
        let mut set = tokio::task::JoinSet::new();
        for (i, name) in chunk.iter().enumerate() {
            let (ds, name) = (ds.clone(), name.clone());
            set.spawn(async move { (i, custom(&ds, &name).await) });
        }
        let mut got: Vec<Option<Resolved>> =
            std::iter::repeat_with(|| None).take(chunk.len()).collect();
        while let Some(r) = set.join_next().await {
            let (i, r) = r.map_err(|e| Status::internal(format!("a read task failed: {e}")))?;
            match r {
                Ok(found) => got[i] = found,
                Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(artifact = %chunk[i], error = %e.message(), "stored artifact left out");
                }
                Err(e) => return Err(e),
            }
        }
        out.extend(got.into_iter().flatten());
    }
    Ok(out)
}

/// A request for `artifact` with `given` parameters, ready to schedule: its definition, the full
/// parameters (defaults filled in; a custom artifact's compiled definition added) and its queries'
/// shapes. Refused with `INVALID_ARGUMENT` naming what is wrong — also an event artifact asked
/// for a collection or a hunt, or the reverse (`event`: for the client event table).
pub(super) async fn prepare(
    ds: &Meta,
    artifact: &str,
    given: &BTreeMap<String, String>,
    event: bool,
) -> Result<
    (
        ArtifactSpec,
        BTreeMap<String, String>,
        Vec<crate::query::Checked>,
    ),
    Status,
> {
    let r = resolve(ds, artifact).await?;
    match (r.spec.event, event) {
        (true, false) => {
            return Err(Status::invalid_argument(format!(
                "{artifact} is an event artifact: it runs continuously where the client event \
                 table sets it (`talon events set {artifact}`), it is not collected"
            )));
        }
        (false, true) => {
            return Err(Status::invalid_argument(format!(
                "{artifact} is not an event artifact (type: event); collect it or hunt it instead"
            )));
        }
        _ => {}
    }
    let mut params = talon_core::artifacts::validate(&r.spec, given)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let queries = crate::query::check_artifact(&r.spec, &params)
        .map_err(|e| Status::invalid_argument(format!("the query is refused: {e}")))?;
    if !r.builtin {
        params.insert(
            talon_core::artifacts::DEFINITION_PARAM.to_owned(),
            definitions::compile(&r.spec),
        );
    }
    Ok((r.spec, params, queries))
}

/// Checks a definition an analyst adds: its shape, every query prepared against the tables, and
/// that its name is free (a built-in's never is; a custom one's only with `replace`).
pub(super) async fn check_new(
    ds: &Meta,
    text: &str,
    replace: bool,
) -> Result<(ArtifactSpec, Vec<crate::query::Checked>), Status> {
    let spec = definitions::parse(text)
        .map_err(|e| Status::invalid_argument(format!("the definition is refused: {e}")))?;
    let queries = crate::query::check_artifact(&spec, &BTreeMap::new())
        .map_err(|e| Status::invalid_argument(format!("the definition is refused: {e}")))?;
    if definitions::builtin(&spec.name).is_some() {
        return Err(Status::already_exists(format!(
            "{} is a built-in artifact; give yours another name",
            spec.name
        )));
    }
    let names = custom_names(ds).await?;
    let exists = names.contains(&spec.name);
    if exists && !replace {
        return Err(Status::already_exists(format!(
            "artifact {} exists; add it with --replace to replace it",
            spec.name
        )));
    }
    if !exists && names.len() >= CUSTOM_MAX {
        return Err(Status::resource_exhausted(format!(
            "the repository holds {CUSTOM_MAX} custom artifacts, its bound; remove one first"
        )));
    }
    Ok((spec, queries))
}

pub(super) use crate::definitions::info;

/// Where an artifact runs, from its queries' tables (`crate::query::platforms`).
pub(super) fn platforms_of(queries: &[crate::query::Checked]) -> Vec<String> {
    crate::query::platforms(queries)
        .into_iter()
        .map(str::to_owned)
        .collect()
}
