//! `talon bench gui`: the GUI's calls with N clients enrolled (default 100,000).
//!
//! The clients enrol through the real path, in batches of [`BATCH`] virtual clients that connect to
//! the master and leave (the last batch stays connected); 1,000 of them get the label `bench`. Then
//! one logged-in GUI session (HTTPS, one kept-alive connection, as a browser's) times each call a
//! page makes, [`RUNS`] times: what the server and the network take, not the browser's drawing of
//! at most 50 rows.

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// Clients connected at once while enrolling.
pub const BATCH: usize = 10_000;
/// Times each call is made.
pub const RUNS: usize = 30;
/// Clients labelled `bench`.
const LABELLED: usize = 1_000;
/// Rows each connected client returns to the bench's hunt, whose results pages are timed.
const HUNT_ROWS: usize = 10;

/// A logged-in GUI session over one HTTP/1.1 connection.
struct Session {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    cookie: String,
    csrf: String,
}

impl Session {
    async fn open(addr: &str, ca: &str, user: &str, password: &str) -> Result<Session, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("GUI {addr}: {e}"))?;
        let tls = crate::net::tls::gui_client_config(ca).map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1".to_owned())
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("GUI TLS: {e}"))?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("GUI HTTP: {e}"))?;
        tokio::spawn(conn);
        let mut s = Session {
            send,
            cookie: String::new(),
            csrf: String::new(),
        };
        let body = serde_json::json!({ "user": user, "password": password }).to_string();
        let (status, headers, v) = s.call("POST", "/api/login", Some(body)).await?;
        if status != 200 {
            return Err(format!(
                "GUI login: {status} {}",
                String::from_utf8_lossy(&v)
            ));
        }
        let set = headers
            .get(http::header::SET_COOKIE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        s.cookie = set.split(';').next().unwrap_or_default().to_owned();
        s.csrf =
            serde_json::from_slice::<serde_json::Value>(&v).map_err(|e| e.to_string())?["csrf"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        Ok(s)
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, http::HeaderMap, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "127.0.0.1")
            .header(http::header::COOKIE, &self.cookie)
            .header("x-csrf-token", &self.csrf);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        self.send
            .ready()
            .await
            .map_err(|e| format!("GUI connection: {e}"))?;
        let r = self
            .send
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let (parts, body) = r.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?
            .to_bytes();
        Ok((parts.status.as_u16(), parts.headers, bytes))
    }
}

/// p50, p99 and max of `times` (microseconds) in milliseconds.
fn spread(mut times: Vec<u64>) -> serde_json::Value {
    times.sort_unstable();
    let at = |q: f64| {
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
        round2(times[i] as f64 / 1000.0)
    };
    serde_json::json!({ "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0) })
}

pub(super) async fn gui_bench(
    o: &BenchOptions,
    dir: &Path,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let on_volume = match &o.volume {
        Some(v) => Some(scratch_on_volume(v, dir)?),
        None => None,
    };
    let r = gui_calls(o, dir, on_volume.as_deref(), env).await;
    if let Some(d) = &on_volume {
        remove_scratch(d);
    }
    r
}

/// [`gui_bench`] with the shared volume in `volume` (else inside `dir`).
async fn gui_calls(
    o: &BenchOptions,
    dir: &Path,
    volume: Option<&Path>,
    env: &Env,
) -> Result<serde_json::Value, String> {
    let n = o.clients;
    let shared = volume.map_or_else(|| dir.join("shared"), Path::to_path_buf);
    let s = Setup::on(dir, &shared, n, env, |_| Ok(()))?;
    let mut master = s.start_master()?;
    let mut api = wait_for_api(&s.api_cfg, &mut master, 120.0, env).await?;
    let rss_before = master.rss_bytes()?;

    // Enrol through the real path, BATCH at a time.
    let watch = Watch::start(env);
    let mut pool = None;
    let (mut first, mut last_batch) = (0, 0);
    while first < n {
        let batch = BATCH.min(n - first);
        last_batch = batch;
        drop(pool.take()); // The previous batch leaves.
        let mut p = s.start_pool_on(o, &s.client_cfg, first, batch, None, "pool")?;
        first += batch;
        loop {
            p.check_alive()?;
            master.check_alive()?;
            let c = api.cluster().await?;
            let (enrolled, connected) = c
                .nodes
                .iter()
                .fold((0, 0), |(e, on), x| (e + x.enrolled, on + x.connected));
            if enrolled as usize >= first && connected as usize >= batch {
                progress(&format!(
                    "{enrolled} clients enrolled ({:.0} s)",
                    watch.secs()
                ));
                break;
            }
            if watch.secs() > (n as f64 / 50.0).max(300.0) {
                return Err(format!(
                    "only {enrolled} of {first} clients enrolled after {:.0} s",
                    watch.secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        pool = Some(p);
    }
    let enrol_s = watch.secs();
    let rss_enrolled = master.rss_bytes()?;

    // Labels on the first LABELLED clients (in id order), for a label search and an estimate.
    let some = api
        .search_page(talon_proto::api::SearchRequest {
            query: "all".into(),
            limit: LABELLED.min(n) as u32,
            ..Default::default()
        })
        .await?;
    for c in &some.clients {
        api.label(&c.client_id, "bench", false).await?;
    }
    let a_client = some
        .clients
        .get(LABELLED.min(n) / 2)
        .or(some.clients.first())
        .map(|c| c.client_id.clone())
        .ok_or("no client enrolled")?;

    // A hunt the connected clients (the last batch) answer with HUNT_ROWS rows each, for the
    // results pages.
    let hunt = api
        .create_hunt(talon_proto::api::CreateHuntRequest {
            artifact: "Generic.Test.Rows".into(),
            params: [("count".to_owned(), HUNT_ROWS.to_string())]
                .into_iter()
                .collect(),
            description: "talon bench gui".into(),
            ..Default::default()
        })
        .await?;
    let hunt_watch = Watch::start(env);
    let hunt_rows = loop {
        master.check_alive()?;
        let st = api.hunt(&hunt.hunt_id).await?.stats.unwrap_or_default();
        if st.completed as usize >= last_batch {
            progress(&format!(
                "hunt complete on {} clients, {} rows ({:.0} s)",
                st.completed,
                st.rows,
                hunt_watch.secs()
            ));
            break st.rows;
        }
        if hunt_watch.secs() > 300.0 {
            return Err(format!(
                "the hunt completed on {} of {last_batch} clients in 300 s",
                st.completed
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let hunt_id = hunt.hunt_id;
    let deep_row = hunt_rows.saturating_sub(50);

    // A GUI user, written as `talon user add` writes it.
    let mut secret = [0u8; 16];
    env.entropy.fill(&mut secret);
    let password = crate::clock::hex(&secret);
    let bench = crate::gui::users::User::new(
        "bench",
        crate::deploy::pki::Access::Administrator,
        &password,
        [7; 16],
        env.clock.now().as_ms(),
    )?;
    crate::gui::users::Users::at(&s.cfg.datastore.location).put(&bench)?;
    let addr = format!("127.0.0.1:{}", s.cfg.gui.bind_port);
    let login_watch = crate::clock::SystemClock.micros();
    let mut gui = Session::open(&addr, &s.cfg.ca.certificate, "bench", &password).await?;
    let login_ms = round2((crate::clock::SystemClock.micros() - login_watch) as f64 / 1000.0);

    let deep = n.saturating_sub(50);
    let calls: Vec<(&str, &str, String, Option<String>)> = vec![
        ("page", "GET", "/".into(), None),
        ("script", "GET", "/assets/app.js".into(), None),
        (
            "clients, first page",
            "GET",
            "/api/clients?q=all&limit=50".into(),
            None,
        ),
        (
            "clients, last page",
            "GET",
            format!("/api/clients?q=all&offset={deep}&limit=50"),
            None,
        ),
        (
            "clients by host name",
            "GET",
            "/api/clients?q=all&limit=50&sort=hostname".into(),
            None,
        ),
        (
            "clients by last seen, newest",
            "GET",
            "/api/clients?q=all&limit=50&sort=last_seen&desc=1".into(),
            None,
        ),
        (
            "search host:pool-9",
            "GET",
            "/api/clients?q=host%3Apool-9&limit=50".into(),
            None,
        ),
        (
            "search label:bench",
            "GET",
            "/api/clients?q=label%3Abench&limit=50".into(),
            None,
        ),
        (
            "search ip:127.0.1.1",
            "GET",
            "/api/clients?q=ip%3A127.0.1.1&limit=50".into(),
            None,
        ),
        ("client", "GET", format!("/api/clients/{a_client}"), None),
        (
            "client's flows",
            "GET",
            format!("/api/clients/{a_client}/flows?limit=20"),
            None,
        ),
        ("artifacts", "GET", "/api/artifacts".into(), None),
        ("hunts", "GET", "/api/hunts?limit=20".into(), None),
        (
            "hunt estimate, every client",
            "POST",
            "/api/hunts/estimate".into(),
            Some("{}".into()),
        ),
        (
            "hunt estimate, label bench",
            "POST",
            "/api/hunts/estimate".into(),
            Some(r#"{"include_labels":["bench"]}"#.into()),
        ),
        ("cluster", "GET", "/api/cluster".into(), None),
        ("audit log", "GET", "/api/audit?limit=50".into(), None),
        (
            "hunt results, first page",
            "GET",
            format!("/api/hunts/{hunt_id}/results?limit=50"),
            None,
        ),
        (
            "hunt results, last page",
            "GET",
            format!("/api/hunts/{hunt_id}/results?offset={deep_row}&limit=50"),
            None,
        ),
        (
            // A filter reads every row (as a sort does).
            "hunt results, filtered",
            "GET",
            format!("/api/hunts/{hunt_id}/results?limit=50&column=row&filter=7"),
            None,
        ),
    ];
    let mut figures = serde_json::Map::new();
    let mut worst: f64 = 0.0;
    for (name, method, path, body) in calls {
        let mut times = Vec::with_capacity(RUNS);
        let mut size = 0;
        for _ in 0..RUNS {
            let t = crate::clock::SystemClock.micros();
            let (status, _, bytes) = gui.call(method, &path, body.clone()).await?;
            times.push(crate::clock::SystemClock.micros() - t);
            if status != 200 {
                return Err(format!(
                    "{method} {path}: {status} {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            size = bytes.len();
        }
        let mut v = spread(times);
        worst = worst.max(v["p99_ms"].as_f64().unwrap_or(0.0));
        v["bytes"] = size.into();
        progress(&format!("{name}: {v}"));
        figures.insert(name.into(), v);
    }
    master.check_alive()?;
    let rss_after = master.rss_bytes()?;
    drop(pool);
    Ok(serde_json::json!({
        "scenario": "gui",
        "volume": volume.map(|v| v.display().to_string()),
        "clients_enrolled": n,
        "clients_connected": last_batch,
        "enrol_s": round2(enrol_s),
        "login_ms": login_ms,
        "hunt_rows": hunt_rows,
        "runs_per_call": RUNS,
        "calls": figures,
        "worst_p99_ms": round2(worst),
        "master_rss_mib": {
            "start": rss_before >> 20,
            "enrolled": rss_enrolled >> 20,
            "after": rss_after >> 20,
        },
    }))
}
