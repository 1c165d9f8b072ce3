//! The GUI's JSON calls (docs/gui.md, "HTTP calls"): each maps onto the analyst's gRPC API, called in
//! process as the session's user, and answers JSON of the same shapes as the CLI's `--json`.

use super::{Body, Caller, Gui, allow, body_json, json};
use crate::cli::api_client::{
    Csv, audit_json, client_json, flow_json, hunt_json, parse_duration_s, upload_json,
};
use crate::deploy::pki::Access;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use std::collections::{BTreeMap, HashMap};
use talon_proto::api::{self, api_server::Api};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

/// Rows a results page may hold.
pub const ROWS_PAGE_MAX: usize = 1000;
/// Rows sorted at most: sorting a flow's or hunt's results reads every matching row into memory.
pub const SORT_ROWS_MAX: usize = 100_000;
/// Columns a results page lists at most.
pub const COLUMNS_MAX: usize = 256;
/// Clients labelled by one bulk request at most.
pub const BULK_MAX: usize = 1000;

/// `{user, role, csrf}`: who is logged in, and the token the page sends with changes.
pub fn whoami(c: &Caller) -> serde_json::Value {
    serde_json::json!({ "user": c.user.name, "role": c.user.access, "csrf": c.csrf })
}

/// A refused request: its HTTP status and a sentence saying why (sent as `{"error": why}`).
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl Refusal {
    /// As a response.
    pub fn response(self) -> Response<Body> {
        super::error(self.0, self.1)
    }
}

fn error(status: StatusCode, why: impl Into<String>) -> Refusal {
    Refusal(status, why.into())
}

/// A request to the API on behalf of `caller`.
fn call<T>(caller: &Caller, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller.user.clone());
    r
}

/// An API refusal as an HTTP one, with the API's message.
fn status(s: &Status) -> Refusal {
    let code = match s.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, s.message())
}

/// The answer of an API call, or its refusal as an HTTP one.
async fn reply<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Refusal> {
    call.await
        .map(tonic::Response::into_inner)
        .map_err(|s| status(&s))
}

/// The query string's parameters (percent-decoded; later repeats win).
fn query(req: &http::Request<Incoming>) -> HashMap<String, String> {
    let mut q = HashMap::new();
    for kv in req.uri().query().unwrap_or("").split('&') {
        if kv.is_empty() {
            continue;
        }
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        q.insert(decode(k), decode(v));
    }
    q
}

/// Percent-decoding (`+` is a space); malformed escapes are kept as they are.
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A numeric query parameter (absent: `default`).
fn number(q: &HashMap<String, String>, key: &str, default: u64) -> Result<u64, Refusal> {
    match q.get(key).map(String::as_str) {
        None | Some("") => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{key}={v:?} is not a whole number"),
            )
        }),
    }
}

fn u32_of(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A string field of a JSON body.
fn field<'a>(body: &'a serde_json::Value, key: &str) -> &'a str {
    body[key].as_str().unwrap_or_default()
}

/// A list-of-strings field of a JSON body (absent: empty).
fn strings(body: &serde_json::Value, key: &str) -> Result<Vec<String>, Refusal> {
    match &body[key] {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("{key}: give a list of strings"),
                    )
                })
            })
            .collect(),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            format!("{key}: give a list of strings"),
        )),
    }
}

/// A `{name: value}` parameters field (values as text).
fn params(body: &serde_json::Value) -> Result<BTreeMap<String, String>, Refusal> {
    match &body["params"] {
        serde_json::Value::Null => Ok(BTreeMap::new()),
        serde_json::Value::Object(o) => Ok(o
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "params: give an object of parameter names and values",
        )),
    }
}

/// Routes one API call of a logged-in caller.
pub async fn route(
    gui: &Gui,
    caller: &Caller,
    req: http::Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let parts: Vec<String> = path
        .trim_start_matches("/api/")
        .split('/')
        .map(decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let api = gui.api();
    let r = match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["session"]) => Ok(json(StatusCode::OK, &whoami(caller))),
        (Method::GET, ["clients"]) => clients(api, caller, &query(&req)).await,
        (Method::GET, ["clients", id]) => client(api, caller, id).await,
        (Method::GET, ["clients", id, "flows"]) => flows(api, caller, id, &query(&req)).await,
        (Method::POST, ["labels"]) => labels(api, caller, req).await,
        (Method::GET, ["artifacts"]) => artifacts(api, caller).await,
        (Method::POST, ["collect"]) => collect(api, caller, req).await,
        (Method::GET, ["flows", c, f]) => flow(api, caller, c, f).await,
        (Method::GET, ["flows", c, f, "results"]) => match RowsQuery::parse(&query(&req)) {
            Ok(q) => rows_page(flow_rows(api, caller, c, f).await, q).await,
            Err(e) => Err(e),
        },
        (Method::GET, ["flows", c, f, "results.csv"]) => {
            let name = format!("{c}-{f}.csv");
            download_csv(api, caller, Rows::Flow(c, f), name).await
        }
        (Method::GET, ["flows", c, f, "results.json"]) => {
            let rows = flow_rows(api, caller, c, f).await;
            download_jsonl(rows, format!("{c}-{f}.jsonl"))
        }
        (Method::GET, ["flows", c, f, "uploads", n]) => upload(api, caller, c, f, n).await,
        (Method::GET, ["flows", c, f, "watch"]) => watch_flow(api, caller, c, f).await,
        (Method::POST, ["flows", c, f, "cancel"]) => cancel(api, caller, c, f, req).await,
        (Method::GET, ["hunts"]) => hunts(api, caller, &query(&req)).await,
        (Method::POST, ["hunts"]) => create_hunt(api, caller, req).await,
        (Method::POST, ["hunts", "estimate"]) => estimate(api, caller, req).await,
        (Method::GET, ["hunts", id]) => hunt(api, caller, id).await,
        (Method::POST, ["hunts", id, "stop"]) => stop_hunt(api, caller, id).await,
        (Method::GET, ["hunts", id, "watch"]) => watch_hunt(api, caller, id).await,
        (Method::GET, ["hunts", id, "flows"]) => hunt_flows(api, caller, id, &query(&req)).await,
        (Method::GET, ["hunts", id, "results"]) => match RowsQuery::parse(&query(&req)) {
            Ok(q) if q.filter.is_empty() && q.sort.is_none() => {
                hunt_window(api, caller, id, q).await
            }
            Ok(q) => rows_page(hunt_rows(api, caller, id).await, q).await,
            Err(e) => Err(e),
        },
        (Method::GET, ["hunts", id, "results.csv"]) => {
            download_csv(api, caller, Rows::Hunt(id), format!("{id}.csv")).await
        }
        (Method::GET, ["hunts", id, "results.json"]) => {
            let rows = hunt_rows(api, caller, id).await;
            download_jsonl(rows, format!("{id}.jsonl"))
        }
        (Method::GET, ["cluster"]) => cluster(api, caller).await,
        (Method::GET, ["users"]) => users(api, caller).await,
        (Method::POST, ["users"]) => set_user(api, caller, req).await,
        (Method::GET, ["audit"]) => audit(api, caller, &query(&req)).await,
        (m, _) => Err(error(StatusCode::NOT_FOUND, format!("no call {m} {path}"))),
    };
    r.unwrap_or_else(Refusal::response)
}

type Answer = Result<Response<Body>, Refusal>;

fn ok(v: serde_json::Value) -> Answer {
    Ok(json(StatusCode::OK, &v))
}

async fn clients(
    api: &crate::node::ApiService,
    caller: &Caller,
    q: &HashMap<String, String>,
) -> Answer {
    let offset = number(q, "offset", 0)?;
    let limit = number(q, "limit", 50)?;
    let query = q.get("q").map(String::as_str).unwrap_or("all");
    let query = if query.trim().is_empty() {
        "all"
    } else {
        query.trim()
    };
    let r = reply(api.search_clients(call(
        caller,
        api::SearchRequest {
            query: query.to_owned(),
            limit: u32_of(limit),
            offset: u32_of(offset),
            sort: q.get("sort").cloned().unwrap_or_default(),
            descending: q.get("desc").is_some_and(|d| d == "1" || d == "true"),
        },
    )))
    .await?;
    let clients: Vec<_> = r.clients.iter().map(client_json).collect();
    ok(serde_json::json!({
        "query": query, "offset": offset, "clients": clients, "truncated": r.truncated,
        "total": r.total,
    }))
}

async fn client(api: &crate::node::ApiService, caller: &Caller, id: &str) -> Answer {
    if !id.starts_with("C.") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a client id (C.…)"),
        ));
    }
    let r = reply(api.search_clients(call(
        caller,
        api::SearchRequest {
            query: id.to_owned(),
            limit: 2,
            ..Default::default()
        },
    )))
    .await?;
    match r.clients.iter().find(|c| c.client_id == id) {
        Some(c) => ok(client_json(c)),
        None => Err(error(StatusCode::NOT_FOUND, format!("no client {id}"))),
    }
}

async fn flows(
    api: &crate::node::ApiService,
    caller: &Caller,
    id: &str,
    q: &HashMap<String, String>,
) -> Answer {
    let r = reply(api.list_flows(call(
        caller,
        api::ListFlowsRequest {
            client_id: id.to_owned(),
            offset: u32_of(number(q, "offset", 0)?),
            limit: u32_of(number(q, "limit", 20)?),
        },
    )))
    .await?;
    let flows: Vec<_> = r.flows.iter().map(flow_json).collect();
    ok(serde_json::json!({ "flows": flows, "total": r.total }))
}

async fn labels(
    api: &crate::node::ApiService,
    caller: &Caller,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let clients = strings(&body, "clients")?;
    let label = field(&body, "label").trim().to_owned();
    let remove = body["remove"].as_bool().unwrap_or(false);
    if clients.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "choose at least one client"));
    }
    if clients.len() > BULK_MAX {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} clients chosen; label at most {BULK_MAX} at once",
                clients.len()
            ),
        ));
    }
    allow(
        caller,
        if clients.len() > 1 {
            Access::Administrator
        } else {
            Access::Investigator
        },
    )?;
    let mut changed = Vec::new();
    for c in clients {
        let r = reply(api.modify_label(call(
            caller,
            api::LabelRequest {
                client_id: c.clone(),
                label: label.clone(),
                remove,
            },
        )))
        .await?;
        changed.push(client_json(&r));
    }
    ok(serde_json::json!({ "clients": changed }))
}

async fn artifacts(api: &crate::node::ApiService, caller: &Caller) -> Answer {
    let r = reply(api.list_artifacts(call(caller, api::ListArtifactsRequest {}))).await?;
    let list: Vec<_> = r.artifacts.iter().map(crate::cli::artifact_json).collect();
    ok(serde_json::json!({ "artifacts": list }))
}

async fn collect(
    api: &crate::node::ApiService,
    caller: &Caller,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let r = reply(api.collect(call(
        caller,
        api::CollectRequest {
            client_id: field(&body, "client_id").to_owned(),
            artifact: field(&body, "artifact").to_owned(),
            params: params(&body)?,
        },
    )))
    .await?;
    ok(flow_json(&r))
}

fn flow_request(c: &str, f: &str) -> api::FlowRequest {
    api::FlowRequest {
        client_id: c.to_owned(),
        flow_id: f.to_owned(),
    }
}

async fn flow(api: &crate::node::ApiService, caller: &Caller, c: &str, f: &str) -> Answer {
    let flow = reply(api.get_flow(call(caller, flow_request(c, f)))).await?;
    let uploads = reply(api.list_uploads(call(caller, flow_request(c, f)))).await?;
    let mut v = flow_json(&flow);
    v["uploads"] = uploads.uploads.iter().map(upload_json).collect();
    ok(v)
}

async fn cancel(
    api: &crate::node::ApiService,
    caller: &Caller,
    c: &str,
    f: &str,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let r = reply(api.cancel_flow(call(
        caller,
        api::CancelFlowRequest {
            client_id: c.to_owned(),
            flow_id: f.to_owned(),
            reason: field(&body, "reason").to_owned(),
        },
    )))
    .await?;
    ok(serde_json::json!({ "before_start": r.before_start, "told": r.told }))
}

/// A stream of result pages, or the API's refusal.
type RowStream =
    Result<std::pin::Pin<Box<dyn Stream<Item = Result<api::ResultPage, Status>> + Send>>, Refusal>;

async fn flow_rows(api: &crate::node::ApiService, caller: &Caller, c: &str, f: &str) -> RowStream {
    let s = reply(api.get_flow_results(call(caller, flow_request(c, f)))).await?;
    Ok(Box::pin(s))
}

async fn hunt_rows(api: &crate::node::ApiService, caller: &Caller, id: &str) -> RowStream {
    let s = reply(api.get_hunt_results(call(
        caller,
        api::HuntRequest {
            hunt_id: id.to_owned(),
        },
    )))
    .await?;
    Ok(Box::pin(s))
}

/// A row's column as text, for filtering and sorting.
fn cell_text(row: &serde_json::Value, col: &str) -> String {
    match row.get(col) {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// What a results page asks for, checked before any row is read.
struct RowsQuery {
    offset: usize,
    limit: usize,
    filter: String,
    column: String,
    sort: Option<String>,
    desc: bool,
}

impl RowsQuery {
    fn parse(q: &HashMap<String, String>) -> Result<RowsQuery, Refusal> {
        let offset = usize::try_from(number(q, "offset", 0)?).unwrap_or(usize::MAX);
        let limit = usize::try_from(number(q, "limit", 100)?).unwrap_or(usize::MAX);
        if limit == 0 || limit > ROWS_PAGE_MAX {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("limit={limit}: give 1 to {ROWS_PAGE_MAX}"),
            ));
        }
        Ok(RowsQuery {
            offset,
            limit,
            filter: q
                .get("filter")
                .map(|f| f.to_lowercase())
                .unwrap_or_default(),
            column: q.get("column").cloned().unwrap_or_default(),
            sort: q.get("sort").cloned().filter(|s| !s.is_empty()),
            desc: q.get("desc").is_some_and(|d| d == "1" || d == "true"),
        })
    }
}

/// One page of rows: `offset`, `limit` (≤ [`ROWS_PAGE_MAX`]), optionally only rows whose `column`
/// (or any column) contains `filter` (case-insensitive), optionally sorted by `sort` (`desc=1`
/// for descending; at most [`SORT_ROWS_MAX`] matching rows). Answers `{columns, rows: [{client_id,
/// flow_id, row}], total, offset}`, `total` the matching rows.
async fn rows_page(rows: RowStream, q: RowsQuery) -> Answer {
    let mut rows = rows?;
    let RowsQuery {
        offset,
        limit,
        filter,
        column,
        sort,
        desc,
    } = q;
    let mut columns: Vec<String> = Vec::new();
    let mut kept: Vec<serde_json::Value> = Vec::new();
    let mut total = 0usize;
    while let Some(page) = rows.next().await {
        let page = page.map_err(|s| status(&s))?;
        for raw in &page.rows {
            let row = parse_row(raw);
            if !filter.is_empty() {
                let hit = match row.as_object() {
                    Some(o) if column.is_empty() => o
                        .keys()
                        .any(|k| cell_text(&row, k).to_lowercase().contains(&filter)),
                    Some(_) => cell_text(&row, &column).to_lowercase().contains(&filter),
                    None => false,
                };
                if !hit {
                    continue;
                }
            }
            add_columns(&mut columns, &row);
            let item = serde_json::json!({
                "client_id": page.client_id, "flow_id": page.flow_id, "row": row,
            });
            if sort.is_some() {
                if kept.len() == SORT_ROWS_MAX {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        format!("more than {SORT_ROWS_MAX} rows match: filter them before sorting"),
                    ));
                }
                kept.push(item);
            } else if total >= offset && total < offset.saturating_add(limit) {
                kept.push(item);
            }
            total += 1;
        }
    }
    if let Some(col) = &sort {
        let key = |v: &serde_json::Value| {
            let cell = &v["row"][col.as_str()];
            (cell.as_f64(), cell_text(&v["row"], col))
        };
        kept.sort_by(|a, b| {
            let (ka, kb) = (key(a), key(b));
            let o = match (ka.0, kb.0) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                _ => ka.1.cmp(&kb.1),
            };
            if desc { o.reverse() } else { o }
        });
        kept = kept.into_iter().skip(offset).take(limit).collect();
    }
    ok(serde_json::json!({
        "columns": columns, "rows": kept, "total": total, "offset": offset,
    }))
}

/// A stored row as JSON (one that is not JSON is shown as text under `_raw`).
fn parse_row(raw: &[u8]) -> serde_json::Value {
    serde_json::from_slice(raw)
        .unwrap_or_else(|_| serde_json::json!({ "_raw": String::from_utf8_lossy(raw) }))
}

/// Adds `row`'s columns not yet in `columns` (at most [`COLUMNS_MAX`]).
fn add_columns(columns: &mut Vec<String>, row: &serde_json::Value) {
    if let Some(o) = row.as_object() {
        for k in o.keys() {
            if columns.len() < COLUMNS_MAX && !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
}

/// A page of a hunt's rows without a filter or a sort, as [`rows_page`] answers it: only the flows
/// the page overlaps are read (the master knows each participant's rows), so a page costs the same
/// however far into a large hunt it is. `columns` are those of the rows shown.
async fn hunt_window(
    api: &crate::node::ApiService,
    caller: &Caller,
    id: &str,
    q: RowsQuery,
) -> Answer {
    let req = call(
        caller,
        api::HuntRequest {
            hunt_id: id.to_owned(),
        },
    );
    let offset = u64::try_from(q.offset).unwrap_or(u64::MAX);
    let (total, pages) = api
        .hunt_rows_window(req, offset, q.limit)
        .await
        .map_err(|s| status(&s))?;
    let mut columns: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for page in &pages {
        for raw in &page.rows {
            let row = parse_row(raw);
            add_columns(&mut columns, &row);
            rows.push(serde_json::json!({
                "client_id": page.client_id, "flow_id": page.flow_id, "row": row,
            }));
        }
    }
    ok(serde_json::json!({
        "columns": columns, "rows": rows, "total": total, "offset": q.offset,
    }))
}

fn attachment(mut r: Response<Body>, name: &str) -> Response<Body> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

/// A streamed body from a stream of byte chunks (an error ends the body early: the download is
/// cut short rather than silently complete).
fn streamed(
    content_type: &'static str,
    s: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response<Body> {
    let body = StreamBody::new(s.map(|c| c.map(Frame::data)));
    let mut r = Response::new(BodyExt::boxed_unsync(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn io_error(s: Status) -> std::io::Error {
    std::io::Error::other(s.message().to_owned())
}

/// Every row as one JSON object a line, with `client_id` and `flow_id`.
fn download_jsonl(rows: RowStream, name: String) -> Answer {
    let rows = rows?;
    let lines = rows.map(|page| {
        let page = page.map_err(io_error)?;
        let mut out = String::new();
        for raw in &page.rows {
            let mut v = parse_row(raw);
            if let Some(o) = v.as_object_mut() {
                o.insert("client_id".into(), page.client_id.clone().into());
                o.insert("flow_id".into(), page.flow_id.clone().into());
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        Ok(Bytes::from(out))
    });
    Ok(attachment(streamed("application/x-ndjson", lines), &name))
}

/// Which results a CSV download reads.
enum Rows<'a> {
    Flow(&'a str, &'a str),
    Hunt(&'a str),
}

/// Every row as CSV: a first pass over the results learns the columns (memory: their names), the
/// second writes the rows (the CLI's `--format csv`: formulas neutralised).
async fn download_csv(
    api: &crate::node::ApiService,
    caller: &Caller,
    which: Rows<'_>,
    name: String,
) -> Answer {
    let open = || async {
        match which {
            Rows::Flow(c, f) => flow_rows(api, caller, c, f).await,
            Rows::Hunt(id) => hunt_rows(api, caller, id).await,
        }
    };
    let mut first = open().await?;
    let mut keys = std::collections::BTreeSet::new();
    while let Some(page) = first.next().await {
        let page = page.map_err(|s| status(&s))?;
        for raw in &page.rows {
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(raw) {
                for k in o.keys() {
                    if keys.len() < COLUMNS_MAX || keys.contains(k) {
                        keys.insert(k.clone());
                    }
                }
            }
        }
    }
    let csv = std::sync::Arc::new(Csv::new(keys, false));
    let header = Bytes::from(format!("{}\n", csv.header()));
    let second = open().await?;
    let body = tokio_stream::once(Ok(header)).chain(second.map(move |page| {
        let page = page.map_err(io_error)?;
        let mut out = String::new();
        for raw in &page.rows {
            let v: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
            out.push_str(&csv.row(&page.client_id, &page.flow_id, &v).0);
            out.push('\n');
        }
        Ok(Bytes::from(out))
    }));
    Ok(attachment(streamed("text/csv; charset=utf-8", body), &name))
}

async fn upload(
    api: &crate::node::ApiService,
    caller: &Caller,
    c: &str,
    f: &str,
    n: &str,
) -> Answer {
    let id: u32 = n.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            format!("{n:?} is not an upload number"),
        )
    })?;
    let list = reply(api.list_uploads(call(caller, flow_request(c, f)))).await?;
    let Some(info) = list.uploads.iter().find(|u| u.upload_id == id) else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("flow {f} has no upload {id}"),
        ));
    };
    let chunks = reply(api.download_upload(call(
        caller,
        api::DownloadRequest {
            client_id: c.to_owned(),
            flow_id: f.to_owned(),
            upload_id: id,
        },
    )))
    .await?;
    let body = chunks.map(|c| c.map(|c| c.data).map_err(io_error));
    let mut r = streamed("application/octet-stream", body);
    if let Ok(v) = HeaderValue::from_str(&info.size.to_string()) {
        r.headers_mut().insert(header::CONTENT_LENGTH, v);
    }
    let base = info.name.rsplit(['/', '\\']).next().unwrap_or("upload");
    Ok(attachment(r, base))
}

/// Server-sent events: each item as `data: JSON`, then `event: end` when the stream ends (or
/// `event: error` with the reason).
fn sse<T: Send + 'static>(
    s: impl Stream<Item = Result<T, Status>> + Send + 'static,
    to_json: fn(&T) -> serde_json::Value,
) -> Response<Body> {
    let events = s
        .map(move |item| match item {
            Ok(v) => Ok(Bytes::from(format!("data: {}\n\n", to_json(&v)))),
            Err(e) => Ok(Bytes::from(format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({ "error": e.message() })
            ))),
        })
        .chain(tokio_stream::once(Ok(Bytes::from_static(
            b"event: end\ndata: {}\n\n",
        ))));
    let mut r = streamed("text/event-stream", events);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn watch_flow(api: &crate::node::ApiService, caller: &Caller, c: &str, f: &str) -> Answer {
    let s = reply(api.watch_flow(call(caller, flow_request(c, f)))).await?;
    Ok(sse(s, flow_json))
}

async fn hunts(
    api: &crate::node::ApiService,
    caller: &Caller,
    q: &HashMap<String, String>,
) -> Answer {
    let r = reply(api.list_hunts(call(
        caller,
        api::ListHuntsRequest {
            offset: u32_of(number(q, "offset", 0)?),
            limit: u32_of(number(q, "limit", 20)?),
        },
    )))
    .await?;
    let hunts: Vec<_> = r.hunts.iter().map(hunt_json).collect();
    ok(serde_json::json!({ "hunts": hunts, "total": r.total }))
}

async fn create_hunt(
    api: &crate::node::ApiService,
    caller: &Caller,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let expires = field(&body, "expires");
    let expires_in_s = if expires.trim().is_empty() {
        0
    } else {
        parse_duration_s(expires.trim())
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("expires: {e}")))?
    };
    let client_limit = match &body["client_limit"] {
        serde_json::Value::Null => 0,
        v => v
            .as_u64()
            .or_else(|| {
                v.as_str().and_then(|s| {
                    if s.is_empty() {
                        Some(0)
                    } else {
                        s.parse().ok()
                    }
                })
            })
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "client_limit: give a whole number"))?,
    };
    let r = reply(api.create_hunt(call(
        caller,
        api::CreateHuntRequest {
            artifact: field(&body, "artifact").to_owned(),
            params: params(&body)?,
            include_labels: strings(&body, "include_labels")?,
            exclude_labels: strings(&body, "exclude_labels")?,
            os: field(&body, "os").to_owned(),
            expires_in_s,
            client_limit,
            description: field(&body, "description").to_owned(),
        },
    )))
    .await?;
    ok(hunt_json(&r))
}

/// How many enrolled clients a hunt with these labels and OS would take now.
async fn estimate(
    api: &crate::node::ApiService,
    caller: &Caller,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let r = reply(api.estimate_hunt(call(
        caller,
        api::CreateHuntRequest {
            include_labels: strings(&body, "include_labels")?,
            exclude_labels: strings(&body, "exclude_labels")?,
            os: field(&body, "os").to_owned(),
            ..Default::default()
        },
    )))
    .await?;
    ok(serde_json::json!({ "clients": r.clients, "connected": r.connected }))
}

async fn hunt_flows(
    api: &crate::node::ApiService,
    caller: &Caller,
    id: &str,
    q: &HashMap<String, String>,
) -> Answer {
    let r = reply(api.list_hunt_flows(call(
        caller,
        api::ListHuntFlowsRequest {
            hunt_id: id.to_owned(),
            offset: u32_of(number(q, "offset", 0)?),
            limit: u32_of(number(q, "limit", 20)?),
        },
    )))
    .await?;
    let flows: Vec<_> = r.flows.iter().map(flow_json).collect();
    ok(serde_json::json!({ "flows": flows, "total": r.total }))
}

fn hunt_request(id: &str) -> api::HuntRequest {
    api::HuntRequest {
        hunt_id: id.to_owned(),
    }
}

async fn hunt(api: &crate::node::ApiService, caller: &Caller, id: &str) -> Answer {
    let h = reply(api.get_hunt(call(caller, hunt_request(id)))).await?;
    ok(hunt_json(&h))
}

async fn stop_hunt(api: &crate::node::ApiService, caller: &Caller, id: &str) -> Answer {
    let h = reply(api.stop_hunt(call(caller, hunt_request(id)))).await?;
    ok(hunt_json(&h))
}

async fn watch_hunt(api: &crate::node::ApiService, caller: &Caller, id: &str) -> Answer {
    let s = reply(api.watch_hunt(call(caller, hunt_request(id)))).await?;
    Ok(sse(s, hunt_json))
}

async fn cluster(api: &crate::node::ApiService, caller: &Caller) -> Answer {
    let c = reply(api.get_cluster(call(caller, api::ClusterRequest {}))).await?;
    let minions: Vec<_> = c
        .minions
        .iter()
        .map(|m| {
            serde_json::json!({
                "node": m.node, "connected": m.connected, "epoch": m.epoch, "applied": m.applied,
                "backlog_events": m.backlog_events, "lag_ms": m.lag_ms,
            })
        })
        .collect();
    let failures: Vec<_> = c
        .volume_failures
        .iter()
        .map(|f| serde_json::json!({ "store": f.store, "error": f.error, "since_ms": f.since_unix_ms }))
        .collect();
    let nodes: Vec<_> = c
        .nodes
        .iter()
        .map(|n| serde_json::json!({ "node": n.node, "clients": n.enrolled, "connected": n.connected }))
        .collect();
    ok(serde_json::json!({
        "master": c.master, "minions": minions, "volume_failures": failures, "nodes": nodes,
    }))
}

fn user_json(u: &api::UserInfo) -> serde_json::Value {
    serde_json::json!({
        "name": u.name, "role": u.role,
        "created_ms": u.created_unix_ms, "changed_ms": u.changed_unix_ms,
    })
}

async fn users(api: &crate::node::ApiService, caller: &Caller) -> Answer {
    let r = reply(api.list_users(call(caller, api::ListUsersRequest {}))).await?;
    let users: Vec<_> = r.users.iter().map(user_json).collect();
    ok(serde_json::json!({ "users": users }))
}

async fn set_user(
    api: &crate::node::ApiService,
    caller: &Caller,
    req: http::Request<Incoming>,
) -> Answer {
    let body = body_json(req).await?;
    let r = reply(api.set_user(call(
        caller,
        api::SetUserRequest {
            name: field(&body, "name").to_owned(),
            role: field(&body, "role").to_owned(),
            password: field(&body, "password").to_owned(),
            remove: body["remove"].as_bool().unwrap_or(false),
        },
    )))
    .await?;
    ok(user_json(&r))
}

async fn audit(
    api: &crate::node::ApiService,
    caller: &Caller,
    q: &HashMap<String, String>,
) -> Answer {
    let r = reply(api.list_audit(call(
        caller,
        api::ListAuditRequest {
            offset: u32_of(number(q, "offset", 0)?),
            limit: u32_of(number(q, "limit", 50)?),
        },
    )))
    .await?;
    let entries: Vec<_> = r.entries.iter().map(audit_json).collect();
    ok(serde_json::json!({ "entries": entries, "total": r.total }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_percent_decoded() {
        assert_eq!(decode("host%3Aweb+01"), "host:web 01");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("%zz%41"), "%zzA");
        assert_eq!(decode("%E2%9C%93"), "✓");
    }
}
