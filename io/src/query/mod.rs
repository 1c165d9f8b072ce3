//! SQL over endpoint tables: the engine an agent runs a query with, and the master prepares one
//! with to refuse it before anything is scheduled (docs/artifacts.md).
//!
//! SQLite (bundled) with every endpoint table as an eponymous virtual table named as osquery names
//! it. A query only reads: an authorizer allows reading tables, calling built-in functions and
//! recursive CTEs, and refuses everything else (writes, ATTACH — also the one VACUUM INTO makes —,
//! PRAGMA, temp tables, views, triggers, `load_extension`), and a statement that would write is
//! refused even so. Each run is bounded in time (a progress handler), rows and bytes; SQLite's own
//! limits bound string length, SQL length and attached databases, and its heap is capped for the
//! whole process.

mod cache;
pub mod events;
pub mod linux;
pub mod table;
mod vtab;

pub use cache::{Host, TABLE_CACHE_ENTRIES, TABLE_CACHE_MS, TABLE_CACHE_ROWS_MAX, TableCache};
pub use events::is_event_table;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
pub use table::TableDef;

/// The SQL function that uploads a file a query selects (docs/artifacts.md, "Uploads").
pub const UPLOAD_FUNCTION: &str = "talon_upload";

/// Files one run may upload through [`UPLOAD_FUNCTION`]; one more fails the query, saying so.
pub const UPLOADS_PER_RUN_MAX: usize = 1000;

/// Files [`UPLOAD_FUNCTION`] was called for in the current run: those not yet sent (uploaded after
/// the row that asked), and how many in all.
#[derive(Default)]
struct Uploads {
    pending: Vec<std::path::PathBuf>,
    total: usize,
}

type Pending = Arc<Mutex<Uploads>>;

/// `talon_upload(path)`: queues the file at the absolute `path` for upload after the current row
/// and answers `path`, so it can stand where the path would (`SELECT talon_upload(path) AS path`).
/// NULL answers NULL and uploads nothing.
fn talon_upload(
    ctx: &rusqlite::functions::Context<'_>,
    pending: &Pending,
) -> rusqlite::Result<Option<String>> {
    let user = |m: String| rusqlite::Error::UserFunctionError(m.into());
    let path: Option<String> = ctx.get(0).map_err(|_| {
        user(format!(
            "{UPLOAD_FUNCTION}: the argument must be a path (text)"
        ))
    })?;
    let Some(path) = path else {
        return Ok(None);
    };
    if !talon_core::artifacts::absolute_without_dotdot(&path) {
        return Err(user(format!(
            "{UPLOAD_FUNCTION}({path:?}): an absolute path without '..' is needed"
        )));
    }
    let mut up = pending.lock().unwrap_or_else(|p| p.into_inner());
    let n = UPLOADS_PER_RUN_MAX;
    if up.total >= n {
        return Err(user(format!(
            "{UPLOAD_FUNCTION}: more than {n} files in one query; narrow it"
        )));
    }
    up.total += 1;
    up.pending.push(std::path::PathBuf::from(&path));
    Ok(Some(path))
}

/// Values bound to a query's parameters, by name (without the `:`).
pub type Bindings = BTreeMap<String, table::Value>;

/// Longest query text accepted (bytes).
pub const SQL_BYTES_MAX: usize = 64 << 10;
/// Longest string or blob a query may make (`zeroblob`, `printf('%.*c', …)`, a `group_concat`).
pub const VALUE_BYTES_MAX: i32 = 16 << 20;
/// What SQLite may allocate in this process, all queries together; beyond it a query fails with
/// "out of memory" (a sort of a runaway CTE, say) and nothing else is affected.
pub const HEAP_BYTES_MAX: i64 = 256 << 20;
/// Virtual-machine steps between two looks at the clock.
const PROGRESS_STEPS: i32 = 10_000;

/// What one run may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rows at most; a query with more fails after sending this many, saying so.
    pub rows: u64,
    /// Bytes of rows (as JSON) at most; beyond, the run fails naming the limit.
    pub bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rows: 1_000_000,
            bytes: 256 << 20,
        }
    }
}

/// Why a query was refused or failed, with the byte offset in its text where SQLite found the
/// error when it knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    /// What was wrong.
    pub message: String,
    /// Byte offset into the query text.
    pub offset: Option<usize>,
    /// The definition's source whose query it is (a definition with more than one).
    pub source: Option<String>,
}

impl QueryError {
    fn new(message: impl Into<String>) -> QueryError {
        QueryError {
            message: message.into(),
            offset: None,
            source: None,
        }
    }
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.source {
            write!(f, "source {s}: ")?;
        }
        match self.offset {
            Some(o) => write!(f, "{} (at byte {o} of the query)", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The output stopped the run (row limit reached elsewhere, flow cancelled).
#[derive(Debug, PartialEq, Eq)]
pub struct Stop;

/// Every endpoint table this build knows: the tables of the machine's state, then the event
/// tables.
pub fn tables() -> &'static [TableDef] {
    static ALL: std::sync::LazyLock<Vec<TableDef>> = std::sync::LazyLock::new(|| {
        linux::TABLES
            .iter()
            .chain(events::TABLES)
            .copied()
            .collect()
    });
    &ALL
}

/// The batch an event table holds while an event artifact's query runs: the table's name and its
/// rows (docs/events.md).
pub type Batch = Arc<Mutex<Option<(&'static str, cache::Scan)>>>;

/// A table by name.
pub fn table(name: &str) -> Option<&'static TableDef> {
    tables().iter().find(|t| t.name == name)
}

/// What the authorizer saw while a statement was prepared.
#[derive(Default)]
struct Seen {
    /// The last action it refused (to say what, not SQLite's "not authorized").
    denied: Option<String>,
    /// The tables read.
    read: BTreeSet<String>,
}

fn authorize(ctx: AuthContext<'_>, seen: &Mutex<Seen>) -> Authorization {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let refused = match ctx.action {
        AuthAction::Read { table_name, .. } => {
            seen.read.insert(table_name.to_owned());
            return Authorization::Allow;
        }
        AuthAction::Select | AuthAction::Recursive => return Authorization::Allow,
        AuthAction::Function { function_name } => {
            if function_name.eq_ignore_ascii_case("load_extension") {
                "load_extension (loading code)".to_owned()
            } else {
                return Authorization::Allow;
            }
        }
        AuthAction::Attach { .. } => "ATTACH (also made by VACUUM INTO)".to_owned(),
        AuthAction::Detach { .. } => "DETACH".to_owned(),
        AuthAction::Pragma { pragma_name, .. } => format!("PRAGMA {pragma_name}"),
        AuthAction::Insert { .. } | AuthAction::Update { .. } | AuthAction::Delete { .. } => {
            "writing (INSERT, UPDATE, DELETE)".to_owned()
        }
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            "transactions and savepoints".to_owned()
        }
        AuthAction::CreateTempTable { .. } | AuthAction::CreateTable { .. } => {
            "creating tables".to_owned()
        }
        other => format!("{other:?}"),
    };
    seen.denied = Some(refused);
    Authorization::Deny
}

/// A connection with every table registered, read-only by authorizer.
pub struct Engine {
    conn: Connection,
    batch: Batch,
    refused: Arc<Mutex<BTreeSet<&'static str>>>,
    seen: Arc<Mutex<Seen>>,
    uploads: Pending,
}

/// A prepared query's shape, as the master checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The result's column names.
    pub columns: Vec<String>,
    /// The named parameters it uses (`:name`, `@name`, `$name`), without their sigil.
    pub params: Vec<String>,
    /// The tables it reads.
    pub tables: Vec<&'static str>,
}

fn sqlite_error(e: rusqlite::Error) -> QueryError {
    match e {
        rusqlite::Error::SqlInputError { msg, offset, .. } => QueryError {
            message: msg,
            offset: usize::try_from(offset).ok(),
            source: None,
        },
        rusqlite::Error::SqliteFailure(_, Some(msg)) => QueryError::new(msg),
        rusqlite::Error::MultipleStatement => {
            QueryError::new("a query is one statement (found more than one)")
        }
        other => QueryError::new(other.to_string()),
    }
}

impl Engine {
    /// A new engine (an in-memory database holding nothing but the tables) reading this machine.
    pub fn new() -> Result<Engine, QueryError> {
        Engine::for_host(Host::Real)
    }

    /// A new engine whose tables are `host`'s.
    pub fn for_host(host: Host) -> Result<Engine, QueryError> {
        let fail = |e: rusqlite::Error| QueryError::new(format!("cannot start SQLite: {e}"));
        let mut conn = Connection::open_with_flags(
            ":memory:",
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail)?;
        // Process-wide, so set once, by the first engine (before its authorizer refuses PRAGMA).
        static HEAP_LIMIT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        HEAP_LIMIT
            .get_or_init(|| {
                conn.pragma_update(None, "hard_heap_limit", HEAP_BYTES_MAX)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| QueryError::new(format!("cannot start SQLite: {e}")))?;
        use rusqlite::config::DbConfig;
        for (c, on) in [
            (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false),
            (DbConfig::SQLITE_DBCONFIG_ENABLE_VIEW, false),
            (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
        ] {
            conn.set_db_config(c, on).map_err(fail)?;
        }
        for (l, v) in [
            (Limit::SQLITE_LIMIT_LENGTH, VALUE_BYTES_MAX),
            (Limit::SQLITE_LIMIT_SQL_LENGTH, SQL_BYTES_MAX as i32),
            (Limit::SQLITE_LIMIT_ATTACHED, 0),
            (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 100),
        ] {
            conn.set_limit(l, v).map_err(fail)?;
        }
        let refused = Arc::new(Mutex::new(BTreeSet::new()));
        let batch: Batch = Arc::default();
        for def in tables() {
            let aux = vtab::Aux {
                def,
                refused: refused.clone(),
                host: host.clone(),
                batch: events::is_event_table(def.name).then(|| batch.clone()),
            };
            conn.create_module(def.name, &vtab::MODULE, Some(aux))
                .map_err(fail)?;
        }
        let uploads: Pending = Arc::default();
        let pending = uploads.clone();
        conn.create_scalar_function(
            UPLOAD_FUNCTION,
            1,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8
                | rusqlite::functions::FunctionFlags::SQLITE_DIRECTONLY,
            move |ctx| talon_upload(ctx, &pending),
        )
        .map_err(fail)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| authorize(ctx, &s)))
            .map_err(fail)?;
        Ok(Engine {
            conn,
            batch,
            refused,
            seen,
            uploads,
        })
    }

    /// Sets the rows event table `table` holds (every other event table holds none) for the
    /// queries run next.
    pub fn set_batch(&self, table: &'static str, rows: Vec<Vec<table::Value>>) {
        *self.batch.lock().unwrap_or_else(|p| p.into_inner()) = Some((table, Arc::new(rows)));
    }

    /// SQLite's error as what a user can act on: what the authorizer refused, which table lacked
    /// its required constraint, where the tables are listed.
    fn explain(&self, e: rusqlite::Error) -> QueryError {
        let mut err = sqlite_error(e);
        let denied = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .denied
            .take();
        if let Some(what) = denied {
            err.message = format!("not allowed in a query (queries only read): {what}");
        } else if err.message.contains("no query solution") {
            let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            let needs: Vec<String> = refused
                .iter()
                .filter_map(|t| table(t).map(TableDef::needs))
                .collect();
            if !needs.is_empty() {
                err.message = needs.join("; ");
            }
        } else if err.message.ends_with("may not be modified") {
            err.message = format!(
                "not allowed in a query (queries only read): {}",
                err.message
            );
        } else if err.message == "interrupted" {
            err.message = "the query ran out of time (the task's timeout)".into();
        } else if let Some(name) = err.message.strip_prefix("no such table: ") {
            err.message = format!(
                "no such table: {name} (the tables: docs/artifacts.md, or `talon artifacts tables`)"
            );
        }
        err
    }

    /// Prepares `sql`, mapping SQLite's errors to what a user can act on.
    fn prepare(&self, sql: &str) -> Result<rusqlite::Statement<'_>, QueryError> {
        if sql.len() > SQL_BYTES_MAX {
            return Err(QueryError::new(format!(
                "the query is {} bytes; at most {SQL_BYTES_MAX}",
                sql.len()
            )));
        }
        if sql.trim().is_empty() {
            return Err(QueryError::new("the query is empty"));
        }
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Seen::default();
        let stmt = self.conn.prepare(sql).map_err(|e| self.explain(e))?;
        if !stmt.readonly() {
            return Err(QueryError::new(
                "not allowed in a query (queries only read): a statement that writes",
            ));
        }
        Ok(stmt)
    }

    /// Checks a query without running it: syntax, tables, columns, required constraints,
    /// allowed actions. Answers its shape.
    pub fn check(&self, sql: &str) -> Result<Checked, QueryError> {
        let stmt = self.prepare(sql)?;
        let columns = stmt.column_names().map(str::to_owned).collect();
        let params = (1..=stmt.parameter_count())
            .map(|i| {
                stmt.parameter_name(i)
                    .map(|n| n[1..].to_owned())
                    .ok_or_else(|| {
                        QueryError::new(format!(
                            "parameter {i} has no name; write parameters as :name"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let read = &self.seen.lock().unwrap_or_else(|p| p.into_inner()).read;
        let tables = tables()
            .iter()
            .map(|t| t.name)
            .filter(|n| read.contains(*n))
            .collect();
        Ok(Checked {
            columns,
            params,
            tables,
        })
    }

    /// Runs `sql` with `params` bound by name (`:name`), sending each row as a JSON object to
    /// `emit` until it stops the run, a limit is reached, or `expired()` says the time is up.
    pub fn run(
        &mut self,
        sql: &str,
        params: &Bindings,
        limits: Limits,
        expired: impl FnMut() -> bool + Send + 'static,
        emit: &mut dyn FnMut(serde_json::Map<String, serde_json::Value>) -> Result<(), Stop>,
    ) -> Result<(), QueryError> {
        *self.uploads.lock().unwrap_or_else(|p| p.into_inner()) = Uploads::default();
        self.conn
            .progress_handler(PROGRESS_STEPS, Some(expired))
            .map_err(sqlite_error)?;
        let r = self.run_inner(sql, params, limits, emit);
        let _ = self.conn.progress_handler(0, None::<fn() -> bool>);
        r
    }

    fn run_inner(
        &self,
        sql: &str,
        params: &Bindings,
        limits: Limits,
        emit: &mut dyn FnMut(serde_json::Map<String, serde_json::Value>) -> Result<(), Stop>,
    ) -> Result<(), QueryError> {
        let mut stmt = self.prepare(sql)?;
        for i in 1..=stmt.parameter_count() {
            let name = stmt.parameter_name(i).unwrap_or_default().to_owned();
            let value = params
                .get(name.get(1..).unwrap_or_default())
                .ok_or_else(|| {
                    QueryError::new(format!(
                        "the query uses parameter {name}, which was not given"
                    ))
                })?;
            let bound = match value {
                table::Value::Null => stmt.raw_bind_parameter(i, rusqlite::types::Null),
                table::Value::Int(v) => stmt.raw_bind_parameter(i, v),
                table::Value::Real(v) => stmt.raw_bind_parameter(i, v),
                table::Value::Text(v) => stmt.raw_bind_parameter(i, v.as_str()),
            };
            bound.map_err(sqlite_error)?;
        }
        let names = unique_names(&stmt.column_names().collect::<Vec<_>>());
        let mut rows = stmt.raw_query();
        let (mut n, mut bytes) = (0u64, 0u64);
        loop {
            let row = match rows.next() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.explain(e)),
            };
            if n >= limits.rows {
                return Err(QueryError::new(format!(
                    "the query was stopped after {n} rows (its row bound); narrow it or add a \
                     LIMIT"
                )));
            }
            let mut obj = serde_json::Map::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                obj.insert(
                    name.clone(),
                    json_value(row.get_ref(i).map_err(sqlite_error)?),
                );
            }
            bytes += serde_json::to_vec(&obj).map_or(0, |v| v.len() as u64);
            if bytes > limits.bytes {
                return Err(QueryError::new(format!(
                    "the query's rows exceed {} bytes (the task's limit)",
                    limits.bytes
                )));
            }
            n += 1;
            if emit(obj).is_err() {
                return Ok(());
            }
        }
    }
}

/// Runs an ad-hoc query as an agent's task (`Generic.Query`): [`run_artifact`] of a definition
/// whose one source is `sql`. `Err` is the flow's error text.
pub fn run_query(
    sql: &str,
    budget: crate::agent::artifacts::Budget,
    emit: &mut crate::agent::artifacts::Emit<'_>,
) -> Result<(), String> {
    let spec = talon_core::artifacts::ArtifactSpec {
        name: talon_core::artifacts::QUERY_ARTIFACT.into(),
        description: String::new(),
        params: Vec::new(),
        sources: vec![talon_core::artifacts::Source {
            name: "query".into(),
            query: sql.to_owned(),
        }],
        json_columns: Vec::new(),
        event: false,
    };
    run_artifact(&spec, &BTreeMap::new(), budget, emit)
}

/// An artifact's parameters as its queries bind them: an int as an integer, a bool as 1 or 0,
/// anything else as text.
pub fn bindings(
    spec: &talon_core::artifacts::ArtifactSpec,
    params: &BTreeMap<String, String>,
) -> Bindings {
    use talon_core::artifacts::ParamKind;
    spec.params
        .iter()
        .map(|p| {
            let given = params.get(&p.name).unwrap_or(&p.default);
            let v = match p.kind {
                ParamKind::Int { .. } => given
                    .parse::<i64>()
                    .map_or_else(|_| table::Value::Text(given.clone()), table::Value::Int),
                ParamKind::Bool => table::Value::Int((given == "true").into()),
                _ => table::Value::Text(given.clone()),
            };
            (p.name.clone(), v)
        })
        .collect()
}

/// Runs a definition's sources in order as an agent's task, its parameters bound
/// ([`bindings`]): one engine, the task's row bound over all sources together, its clock. With
/// more than one source each row names its own in [`talon_core::artifacts::SOURCE_COLUMN`]; a
/// column of `json_columns` holding JSON text is stored as that JSON. `Err` is the flow's error
/// text, naming the source.
pub fn run_artifact(
    spec: &talon_core::artifacts::ArtifactSpec,
    params: &BTreeMap<String, String>,
    budget: crate::agent::artifacts::Budget,
    emit: &mut crate::agent::artifacts::Emit<'_>,
) -> Result<(), String> {
    use crate::agent::artifacts::Output;
    let mut left = Limits::default().rows;
    if budget.max_rows > 0 {
        left = left.min(budget.max_rows);
    }
    let binds = bindings(spec, params);
    let mut engine = Engine::for_host(budget.host).map_err(|e| e.to_string())?;
    let uploads = engine.uploads.clone();
    // The files `talon_upload` queued, each after the row that asked for it.
    let send_uploads = |emit: &mut crate::agent::artifacts::Emit<'_>| {
        let files = std::mem::take(&mut uploads.lock().unwrap_or_else(|p| p.into_inner()).pending);
        files.into_iter().try_for_each(|f| emit(Output::Upload(f)))
    };
    let expired = Arc::new(Mutex::new(budget.expired));
    let many = spec.sources.len() > 1;
    for source in &spec.sources {
        let limits = Limits {
            rows: left,
            ..Limits::default()
        };
        let clock = expired.clone();
        let mut stopped = false;
        let mut sent = 0u64;
        let r = engine.run(
            &source.query,
            &binds,
            limits,
            move || (clock.lock().unwrap_or_else(|p| p.into_inner()))(),
            &mut |mut row| {
                for c in &spec.json_columns {
                    if let Some(serde_json::Value::String(text)) = row.get(c)
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
                        && (v.is_array() || v.is_object())
                    {
                        row.insert(c.clone(), v);
                    }
                }
                if many {
                    row.insert(
                        talon_core::artifacts::SOURCE_COLUMN.into(),
                        source.name.clone().into(),
                    );
                }
                sent += 1;
                emit(Output::Row(row))
                    .and_then(|()| send_uploads(emit))
                    .map_err(|_| {
                        stopped = true;
                        Stop
                    })
            },
        );
        // Asked for by rows not sent as such (`SELECT count(talon_upload(path)) ...`).
        if !stopped && send_uploads(emit).is_err() {
            stopped = true;
        }
        r.map_err(|e| {
            if many {
                format!("source {} failed: {e}", source.name)
            } else {
                format!("query failed: {e}")
            }
        })?;
        left = left.saturating_sub(sent);
        if stopped {
            break;
        }
    }
    Ok(())
}

/// Idle engines kept per host for event queries ([`EventQuery`]); one more returned is dropped.
pub const EVENT_ENGINES_IDLE_MAX: usize = 8;

/// Engines event queries borrow for one batch, by the host they read (`None` key: this machine;
/// else a virtual agents' pool, by its shared cache). One engine per running event artifact would
/// be one SQLite connection each — a pool of 10,000 virtual agents would hold 10,000, beyond
/// SQLite's heap bound ([`HEAP_BYTES_MAX`]) — while only as many run at once as there are threads.
type EnginePool = Mutex<BTreeMap<Option<usize>, Vec<Engine>>>;

fn event_engines() -> &'static EnginePool {
    static POOL: std::sync::OnceLock<EnginePool> = std::sync::OnceLock::new();
    POOL.get_or_init(Mutex::default)
}

/// An event artifact as the agent runs it (docs/events.md): its one query, its parameters bound,
/// run over each batch of its event table with an engine borrowed for that batch (one of its own
/// when the query shows the host's name, which differs between virtual agents).
pub struct EventQuery {
    host: Host,
    /// Where its engines come from: `Some(key)` the shared pool, `None` its own.
    pooled: Option<Option<usize>>,
    own: Option<Engine>,
    table: &'static str,
    sql: String,
    binds: Bindings,
    json_columns: Vec<String>,
}

impl EventQuery {
    /// Prepares an event artifact's query; `Err` says why it cannot run.
    pub fn new(
        spec: &talon_core::artifacts::ArtifactSpec,
        params: &BTreeMap<String, String>,
        host: Host,
    ) -> Result<EventQuery, String> {
        let [source] = spec.sources.as_slice() else {
            return Err(format!(
                "{} is not an event artifact (one source)",
                spec.name
            ));
        };
        let key = match &host {
            Host::Real => None,
            Host::Virtual { cache, .. } => Some(Arc::as_ptr(cache) as usize),
        };
        let mut q = EventQuery {
            host,
            pooled: Some(key),
            own: None,
            table: "",
            sql: source.query.clone(),
            binds: bindings(spec, params),
            json_columns: spec.json_columns.clone(),
        };
        let engine = q.engine()?;
        let checked = engine.check(&source.query);
        let shows_host = checked.as_ref().is_ok_and(|c| {
            c.tables
                .iter()
                .any(|t| cache::HOSTNAME_COLUMNS.iter().any(|(h, _)| h == t))
        });
        if shows_host && key.is_some() {
            q.pooled = None;
            q.own = Some(engine);
        } else {
            q.give_back(engine);
        }
        let checked = checked.map_err(|e| format!("query failed: {e}"))?;
        q.table = checked
            .tables
            .iter()
            .copied()
            .find(|t| is_event_table(t))
            .ok_or_else(|| format!("{}'s query reads no event table", spec.name))?;
        Ok(q)
    }

    fn engine(&mut self) -> Result<Engine, String> {
        if let Some(e) = self.own.take() {
            return Ok(e);
        }
        let idle = self.pooled.and_then(|key| {
            let mut pool = event_engines().lock().unwrap_or_else(|p| p.into_inner());
            pool.get_mut(&key).and_then(Vec::pop)
        });
        match idle {
            Some(e) => Ok(e),
            None => Engine::for_host(self.host.clone()).map_err(|e| e.to_string()),
        }
    }

    fn give_back(&mut self, engine: Engine) {
        let Some(key) = self.pooled else {
            self.own = Some(engine);
            return;
        };
        let mut pool = event_engines().lock().unwrap_or_else(|p| p.into_inner());
        let idle = pool.entry(key).or_default();
        if idle.len() < EVENT_ENGINES_IDLE_MAX {
            idle.push(engine);
        }
    }

    /// The event table it reads.
    pub fn table(&self) -> &'static str {
        self.table
    }

    /// Runs the query over one batch of the event table's rows (in the table's column order);
    /// answers the artifact's rows. Stopped with an error once `expired()` says so.
    pub fn run(
        &mut self,
        batch: Vec<Vec<table::Value>>,
        expired: impl FnMut() -> bool + Send + 'static,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, String> {
        let mut engine = self.engine()?;
        engine.set_batch(self.table, batch);
        let mut out = Vec::new();
        let json_columns = &self.json_columns;
        let r = engine.run(
            &self.sql,
            &self.binds,
            Limits::default(),
            expired,
            &mut |mut row| {
                for c in json_columns {
                    if let Some(serde_json::Value::String(text)) = row.get(c)
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(text)
                        && (v.is_array() || v.is_object())
                    {
                        row.insert(c.clone(), v);
                    }
                }
                out.push(row);
                Ok(())
            },
        );
        engine.set_batch(self.table, Vec::new());
        self.give_back(engine);
        r.map_err(|e| format!("query failed: {e}"))?;
        Ok(out)
    }
}

/// Prepares every query of an artifact against the tables (the master before it schedules
/// anything or stores a definition, the CLI before it sends): its sources, and the value of a
/// parameter of kind sql (`Generic.Query`). Answers each query's shape, or `Err` naming what is
/// wrong, where, and in which source.
pub fn check_artifact(
    spec: &talon_core::artifacts::ArtifactSpec,
    params: &BTreeMap<String, String>,
) -> Result<Vec<Checked>, QueryError> {
    use talon_core::artifacts::ParamKind;
    let mut queries: Vec<(Option<&str>, &str)> = spec
        .params
        .iter()
        .filter(|p| p.kind == ParamKind::Sql)
        .map(|p| (None, params.get(&p.name).unwrap_or(&p.default).as_str()))
        .collect();
    let many = spec.sources.len() > 1;
    queries.extend(
        spec.sources
            .iter()
            .map(|s| (many.then_some(s.name.as_str()), s.query.as_str())),
    );
    if queries.is_empty() {
        return Ok(Vec::new());
    }
    let engine = Engine::new()?;
    let mut all = Vec::new();
    for (source, sql) in queries {
        let in_source = |mut e: QueryError| {
            e.source = source.map(str::to_owned);
            e
        };
        let checked = engine.check(sql).map_err(in_source)?;
        // A query's own parameters are bound from the artifact's other parameters.
        for name in &checked.params {
            let known = spec
                .params
                .iter()
                .any(|q| q.name == *name && q.kind != ParamKind::Sql);
            if !known {
                return Err(in_source(QueryError::new(format!(
                    "the query uses parameter :{name}, which artifact {} does not declare",
                    spec.name
                ))));
            }
        }
        let read_events: Vec<&str> = checked
            .tables
            .iter()
            .copied()
            .filter(|t| is_event_table(t))
            .collect();
        match (spec.event, read_events.as_slice()) {
            (true, [_]) | (false, []) => {}
            (true, []) => {
                return Err(in_source(QueryError::new(format!(
                    "an event artifact's query reads one event table (it runs over each batch \
                     of it); this one reads none. The event tables: {}",
                    events::TABLES
                        .iter()
                        .map(|t| t.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))));
            }
            (true, many) => {
                return Err(in_source(QueryError::new(format!(
                    "an event artifact's query reads one event table; this one reads {}",
                    many.join(" and ")
                ))));
            }
            (false, read) => {
                return Err(in_source(QueryError::new(format!(
                    "{} is an event table: only an event artifact (type: event) reads it, as \
                     events happen",
                    read.join(" and ")
                ))));
            }
        }
        all.push(checked);
    }
    Ok(all)
}

/// The platforms an artifact can run on, given its checked queries ([`check_artifact`]): the
/// built-in artifacts are Linux's (they read `/proc` and `/etc`); a query runs where every table
/// it reads exists.
pub fn platforms(queries: &[Checked]) -> BTreeSet<&'static str> {
    let mut all: BTreeSet<&'static str> = BTreeSet::from(["linux"]);
    for t in queries.iter().flat_map(|q| &q.tables) {
        let on: BTreeSet<&'static str> = table(t)
            .map(|d| d.platforms.iter().copied().collect())
            .unwrap_or_default();
        all = all.intersection(&on).copied().collect();
    }
    all
}

/// The query's line holding `offset` and a caret under it, for a terminal.
pub fn caret(sql: &str, offset: usize) -> String {
    let offset = offset.min(sql.len());
    let start = sql[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = sql[offset..].find('\n').map_or(sql.len(), |i| offset + i);
    let col = sql[start..offset].chars().count();
    format!("  {}\n  {}^", &sql[start..end], " ".repeat(col))
}

/// Column names made unique for JSON objects: a repeated name gets `_2`, `_3`, ….
pub fn unique_names(names: &[&str]) -> Vec<String> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        let k = seen.entry(n).or_insert(0);
        *k += 1;
        let mut name = if *k == 1 {
            n.to_string()
        } else {
            format!("{n}_{k}")
        };
        while out.contains(&name) {
            name.push('_');
        }
        out.push(name);
    }
    out
}

fn json_value(v: rusqlite::types::ValueRef<'_>) -> serde_json::Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(r) => {
            serde_json::Number::from_f64(r).map_or(serde_json::Value::Null, Into::into)
        }
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
        ValueRef::Blob(b) => crate::clock::hex(b).into(),
    }
}

#[cfg(test)]
mod tests;
