//! The web GUI, served by the master on `GUI.bind_address:bind_port` over TLS (docs/gui.md).
//!
//! One page (`assets/`, embedded in the binary) that talks JSON to `/api/…` on the same port. Every
//! `/api/` call but `login` needs a session cookie; every change also needs the session's CSRF token
//! in the `X-CSRF-Token` header. The handlers ([`routes`]) call the analyst's gRPC service in
//! process, on behalf of the session's user ([`crate::node::GuiUser`]): the GUI can do nothing the
//! API cannot, roles are checked in one place for both, and every change is audited with the
//! user's name.
//!
//! Bounds: [`CONNECTIONS_MAX`] connections at once (more wait for the accept loop), a TLS handshake
//! within [`crate::net::tls::HANDSHAKE_TIMEOUT`], request headers within [`HEADER_TIMEOUT`], bodies
//! of at most [`BODY_MAX`] bytes, [`HASHES_MAX`] password checks at once, and the session bounds of
//! [`session`].

pub mod routes;
pub mod session;
pub mod users;

use crate::clock::{Clock, Entropy};
use crate::deploy::pki::Access;
use crate::net::{BoxIo, Listener};
use crate::node::{ApiService, GuiUser};
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use session::Sessions;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use users::Users;

/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 256;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (a hunt's or collection's parameters, a login).
pub const BODY_MAX: usize = 64 * 1024;
/// Password hashes computed at once (each Argon2id check takes ~19 MiB and tens of ms).
pub const HASHES_MAX: usize = 2;
/// The session cookie's name.
pub const COOKIE: &str = "talon_session";

/// A response body: whole, or streamed (downloads, live progress); polled only by its connection's
/// task, so it need not be `Sync`.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The embedded page and its assets.
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The GUI's state: the API it calls, its users, sessions and back-off.
pub struct Gui {
    api: ApiService,
    users: Users,
    sessions: Mutex<Sessions>,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    hashing: tokio::sync::Semaphore,
}

/// A logged-in caller.
pub struct Caller {
    /// The session's token.
    pub token: String,
    /// The user.
    pub user: GuiUser,
    /// The session's CSRF token.
    pub csrf: String,
}

impl Gui {
    /// The GUI of a master whose API is `api` and datastore is at `location`.
    pub fn new(
        api: ApiService,
        location: &std::path::Path,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> Gui {
        Gui {
            api,
            users: Users::at(location),
            sessions: Mutex::new(Sessions::default()),
            clock,
            entropy,
            hashing: tokio::sync::Semaphore::new(HASHES_MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now().as_ms()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn random32(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        self.entropy.fill(&mut b);
        b
    }

    /// Checks a login; on success starts a session and returns (token, csrf, role).
    pub async fn login(&self, name: &str, password: &str) -> Result<Caller, (StatusCode, String)> {
        let refused = || {
            (
                StatusCode::UNAUTHORIZED,
                "wrong user name or password".to_owned(),
            )
        };
        if users::check_name(name).is_err() || password.len() > users::PASSWORD_MAX {
            return Err(refused());
        }
        if let Err(ms) = self.sessions().check_lock(name, self.now_ms()) {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many failed logins for {name:?}: try again in {} s",
                    ms.div_ceil(1000)
                ),
            ));
        }
        let users = self.users.clone();
        let (n, p) = (name.to_owned(), password.to_owned());
        let _slot = self.hashing.acquire().await.map_err(|_| refused())?;
        let checked =
            tokio::task::spawn_blocking(move || -> Result<Option<users::User>, String> {
                let user = users.get(&n)?;
                // A name with no user costs the same hash as one with a wrong password.
                let dummy = dummy_hash();
                let hash = user.as_ref().map_or(dummy, |u| u.hash.as_str());
                let ok = users::verify_password(&p, hash);
                Ok(user.filter(|_| ok))
            })
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                tracing::warn!(error = %e, "reading a GUI user");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the users directory cannot be read: {e}"),
                )
            })?;
        let now = self.now_ms();
        let Some(user) = checked else {
            let lock = self.sessions().failed(name, now);
            tracing::warn!(user = %name, locked_ms = lock, "GUI login refused");
            return Err(refused());
        };
        let (t, c) = (self.random32(), self.random32());
        let mut s = self.sessions();
        s.succeeded(name);
        let token = s.create(name, user.role, user.changed_ms, now, (t, c));
        tracing::info!(user = %name, role = %user.role, "GUI login");
        s.get(&token, now)
            .map(|session| caller_of(&token, session))
            .ok_or_else(|| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the session ended at once".into(),
                )
            })
    }

    /// The caller of a request with session cookie `token`, if its session is live (its user file
    /// read again if the last read is older than [`session::RECHECK_MS`]).
    pub async fn caller(&self, token: &str) -> Option<Caller> {
        let now = self.now_ms();
        let (caller, changed_ms) = {
            let mut s = self.sessions();
            let session = s.get(token, now)?;
            if now.saturating_sub(session.checked_ms) < session::RECHECK_MS {
                return Some(caller_of(token, session));
            }
            (caller_of(token, session), session.user_changed_ms)
        };
        let (users, name) = (self.users.clone(), caller.user.name.clone());
        let user = tokio::task::spawn_blocking(move || users.get(&name))
            .await
            .ok()?;
        let name = &caller.user.name;
        let mut s = self.sessions();
        match user {
            Ok(Some(u)) if u.changed_ms != changed_ms => {
                // A new password or role: log in again.
                s.end_user(name);
                tracing::info!(user = %name, "GUI sessions ended: the user changed");
                return None;
            }
            Ok(None) => {
                s.end_user(name);
                tracing::info!(user = %name, "GUI sessions ended: the user was removed");
                return None;
            }
            Ok(Some(_)) => {}
            // The volume cannot be read now: keep the session, read again after the interval.
            Err(e) => tracing::warn!(error = %e, "re-reading a GUI user"),
        }
        s.get(token, now)?.checked_ms = now;
        Some(caller)
    }

    /// Ends a session.
    pub fn logout(&self, token: &str) {
        self.sessions().end(token);
    }

    /// The API, for the handlers.
    pub fn api(&self) -> &ApiService {
        &self.api
    }
}

/// The caller of a live session.
fn caller_of(token: &str, s: &session::Session) -> Caller {
    Caller {
        token: token.to_owned(),
        user: GuiUser {
            name: s.user.clone(),
            access: s.access,
        },
        csrf: s.csrf.clone(),
    }
}

/// An Argon2id hash of a password nobody knows, made once: checked for names with no user, so that
/// a login of an unknown name costs what a wrong password costs.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let mut secret = [0u8; 32];
        crate::clock::OsEntropy::default().fill(&mut secret);
        users::hash_password(&crate::clock::hex(&secret), [0; 16]).unwrap_or_default()
    })
}

/// Serves the GUI on `listener` with TLS `tls` until `stop` changes.
pub async fn serve(
    gui: Arc<Gui>,
    listener: Box<dyn Listener>,
    tls: Arc<rustls::ServerConfig>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accept = move |tcp: BoxIo, addr, stop| {
        let (gui, acceptor) = (gui.clone(), acceptor.clone());
        async move {
            let tls = match tokio::time::timeout(
                crate::net::tls::HANDSHAKE_TIMEOUT,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "GUI handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let io: TokioIo<tokio_rustls::server::TlsStream<BoxIo>> = TokioIo::new(tls);
            let service = hyper::service::service_fn(move |req| {
                let gui = gui.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&gui, req).await) }
            });
            crate::net::http::serve_connection(io, service, HEADER_TIMEOUT, stop, ("GUI", addr))
                .await;
        }
    };
    crate::net::http::accept_bounded(listener, CONNECTIONS_MAX, stop, "GUI", accept).await;
}

/// A whole response.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

/// A JSON error: `{"error": why}`.
pub fn error(status: StatusCode, why: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": why.into() }))
}

/// Every response's security headers: scripts and styles only from this origin, no framing, no
/// sniffing, no referrer, HSTS; API answers are not cached.
fn secure(mut r: Response<Body>, api: bool) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    if api {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The session cookie of a request, if any.
fn cookie_token(req: &http::Request<Incoming>) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// A `Set-Cookie` value for `token` (empty and expired: logout).
fn set_cookie(token: &str) -> HeaderValue {
    let age = if token.is_empty() {
        0
    } else {
        session::LIFETIME_MS / 1000
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={age}"
    ))
    .expect("hex tokens make a valid header")
}

/// Whether a request's `Origin` (when it has one) is this server: a change from another site's
/// page is refused whatever cookies it carries.
fn same_origin(req: &http::Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(o), Some(h)) => o.strip_prefix("https://") == Some(h),
        _ => false,
    }
}

/// Reads a JSON body of at most [`BODY_MAX`] bytes.
pub async fn body_json(req: http::Request<Incoming>) -> Result<serde_json::Value, routes::Refusal> {
    use routes::Refusal as R;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(R(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request body as application/json".into(),
        ));
    }
    let body = http_body_util::Limited::new(req.into_body(), BODY_MAX);
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(R(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {BODY_MAX} bytes or was cut off"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        R(
            StatusCode::BAD_REQUEST,
            format!("the request body is not JSON: {e}"),
        )
    })
}

async fn handle(gui: &Gui, req: http::Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let api = path.starts_with("/api/");
    let r = if api {
        handle_api(gui, req, &path).await
    } else {
        match (req.method(), path.as_str()) {
            (&Method::GET, "/" | "/index.html") => {
                full(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
            }
            (&Method::GET, "/assets/app.js") => {
                full(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS)
            }
            (&Method::GET, "/assets/app.css") => {
                full(StatusCode::OK, "text/css; charset=utf-8", APP_CSS)
            }
            (&Method::GET, _) => error(StatusCode::NOT_FOUND, format!("no page at {path}")),
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "only GET outside /api/"),
        }
    };
    secure(r, api)
}

async fn handle_api(gui: &Gui, req: http::Request<Incoming>, path: &str) -> Response<Body> {
    let change = req.method() != Method::GET;
    if change && !same_origin(&req) {
        return error(
            StatusCode::FORBIDDEN,
            "the request's Origin is not this server",
        );
    }
    if path == "/api/login" {
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "log in with POST");
        }
        let body = match body_json(req).await {
            Ok(b) => b,
            Err(r) => return r.response(),
        };
        let name = body["user"].as_str().unwrap_or_default();
        let password = body["password"].as_str().unwrap_or_default();
        return match gui.login(name, password).await {
            Ok(c) => {
                let mut r = json(StatusCode::OK, &routes::whoami(&c));
                r.headers_mut()
                    .insert(header::SET_COOKIE, set_cookie(&c.token));
                r
            }
            Err((status, why)) => error(status, why),
        };
    }
    let caller = match cookie_token(&req) {
        Some(t) => gui.caller(&t).await,
        None => None,
    };
    let Some(caller) = caller else {
        let mut r = error(StatusCode::UNAUTHORIZED, "log in first");
        r.headers_mut().insert(header::SET_COOKIE, set_cookie(""));
        return r;
    };
    if change {
        let sent = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::same(sent, &caller.csrf) {
            return error(
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token header (reload the page)",
            );
        }
    }
    if path == "/api/logout" {
        gui.logout(&caller.token);
        let mut r = json(StatusCode::OK, &serde_json::json!({}));
        r.headers_mut().insert(header::SET_COOKIE, set_cookie(""));
        return r;
    }
    routes::route(gui, &caller, req, path).await
}

/// Whether a role is at least `need`, as an HTTP refusal naming both.
pub fn allow(caller: &Caller, need: Access) -> Result<(), routes::Refusal> {
    if caller.user.access >= need {
        Ok(())
    } else {
        Err(routes::Refusal(
            StatusCode::FORBIDDEN,
            format!(
                "{:?} has the {} role; this needs {need}",
                caller.user.name, caller.user.access
            ),
        ))
    }
}
