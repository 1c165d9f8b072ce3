//! TLS for every Talon connection (rustls with the ring provider; no OpenSSL).
//!
//! - **Client-facing port** ([`endpoint_server_config`]): the server presents the frontend
//!   certificate. Every endpoint must present a certificate over its *own* key (self-signed, made on
//!   first start). The verifier accepts any such certificate but rustls still checks the handshake
//!   signature, which proves the client holds the key; the client id is derived from the
//!   certificate's public key ([`ClientId::from_public_key`] of the SubjectPublicKeyInfo DER). So a
//!   client can only ever speak as the id of its own key (invariant 6 (docs/architecture.md)).
//! - **API / cluster port** ([`ca_server_config`]): both sides present CA-signed certificates; the
//!   peer's role (OU: `api` or `frontend`) decides which services it may call.
//! - **Clients of either** ([`client_config`]): verify the server against the deployment CA (pinned)
//!   and present their certificate.
//!
//! Accepted connections carry a [`Peer`] into every gRPC request's extensions.

use crate::deploy::pki::Role;
use crate::metrics::Refusal;
use crate::net::{BoxIo, Listener, Net};
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use talon_core::ClientId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a TLS handshake may take before the connection is dropped (a client that connects and
/// stalls must not hold a slot).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on TLS handshakes of one listener (`Frontend.resources.max_pending_handshakes`,
/// `handshake_timeout_s`).
#[derive(Clone, Copy, Debug)]
pub struct Handshakes {
    /// Handshakes in progress at once; beyond it a connection waits for a slot (within `timeout`).
    pub max: usize,
    /// A handshake not finished within this is dropped.
    pub timeout: Duration,
    /// A connection that opens no HTTP/2 stream within this after its handshake is closed.
    pub stream_timeout: Duration,
    /// Connections open at once from one address (`max_connections_per_address`); more are closed
    /// before any TLS work.
    pub per_address_max: usize,
    /// Connections open at once on this listener: past it, new ones are closed before any TLS
    /// work (the frontend's is set below the process's file limit, keeping headroom for the API
    /// port and the cluster link).
    pub open_max: usize,
    /// The listener's name in metrics (`frontend`, `api`).
    pub listener: &'static str,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            listener: "frontend",
            max: 1024,
            timeout: HANDSHAKE_TIMEOUT,
            stream_timeout: HANDSHAKE_TIMEOUT,
            per_address_max: usize::MAX,
            open_max: usize::MAX,
        }
    }
}

/// Open connections of one listener, in total and per source address; a connection's
/// [`Admitted`] gives its place back when dropped.
#[derive(Default)]
struct Open {
    total: usize,
    by_address: std::collections::BTreeMap<std::net::IpAddr, usize>,
}

/// A connection's place in its listener's [`Open`] count.
struct Admitted {
    open: Arc<std::sync::Mutex<Open>>,
    ip: std::net::IpAddr,
}

impl Admitted {
    /// Counts a new connection from `ip`, or says which bound it is past.
    fn take(
        open: &Arc<std::sync::Mutex<Open>>,
        ip: std::net::IpAddr,
        h: &Handshakes,
    ) -> Result<Admitted, (Refusal, String)> {
        let mut o = open
            .lock()
            .map_err(|_| (Refusal::ListenerFull, "poisoned".to_owned()))?;
        if o.total >= h.open_max {
            return Err((
                Refusal::ListenerFull,
                format!(
                    "{} connections open on this listener, its bound (kept below the file limit)",
                    o.total
                ),
            ));
        }
        let n = o.by_address.entry(ip).or_insert(0);
        if *n >= h.per_address_max {
            return Err((
                Refusal::PerAddress,
                format!("{n} connections open from this address (max_connections_per_address)"),
            ));
        }
        *n += 1;
        o.total += 1;
        Ok(Admitted {
            open: open.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut o) = self.open.lock() {
            o.total -= 1;
            if let Some(n) = o.by_address.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    o.by_address.remove(&self.ip);
                }
            }
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(what: &str) -> impl Fn(rustls::Error) -> io::Error + '_ {
    move |e| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
}

/// Parses a PEM certificate chain.
pub fn certs(pem: &str, what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}: no certificate"),
        ));
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub fn key(pem: &str, what: &str) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}")))
}

fn roots(ca_pem: &str) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots.add(c).map_err(bad("CA certificate"))?;
    }
    Ok(roots)
}

/// Accepts any client certificate, checking only that the client holds its key (rustls verifies the
/// handshake signature against the certificate's key with these algorithms).
#[derive(Debug)]
struct AnyKeyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Identity is the key, not a chain: only require a parseable certificate.
        x509_parser::parse_x509_certificate(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server config presenting the frontend certificate, checking clients with `verifier`, HTTP/2.
fn server_config(
    p: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    cert_pem: &str,
    key_pem: &str,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let mut c = rustls::ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(bad("TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "Frontend.certificate")?,
            key(key_pem, "Frontend.private_key")?,
        )
        .map_err(bad("Frontend.certificate"))?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// The GUI port: the server's certificate only (browsers present none; users log in), HTTP/1.1.
/// `what` names the config keys the certificate came from, for errors.
pub fn gui_server_config(
    cert_pem: &str,
    key_pem: &str,
    what: (&str, &str),
) -> io::Result<Arc<rustls::ServerConfig>> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad("TLS versions"))?
        .with_no_client_auth()
        .with_single_cert(certs(cert_pem, what.0)?, key(key_pem, what.1)?)
        .map_err(bad(what.0))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// The client-facing port: frontend certificate; clients authenticate with their own key.
pub fn endpoint_server_config(
    cert_pem: &str,
    key_pem: &str,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let p = provider();
    let verifier = Arc::new(AnyKeyVerifier {
        algorithms: p.signature_verification_algorithms,
    });
    server_config(p, verifier, cert_pem, key_pem)
}

/// The API / cluster port: peers must present a certificate signed by the deployment CA.
pub fn ca_server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let p = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        p.clone(),
    )
    .build()
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("CA certificate: {e}")))?;
    server_config(p, verifier, cert_pem, key_pem)
}

/// A browser's view of the GUI port, for tests and benchmarks: trusts `ca_pem`, presents no
/// certificate, HTTP/1.1.
pub fn gui_client_config(ca_pem: &str) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad("TLS versions"))?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A client of a Talon server: pins the deployment CA, presents `cert_pem`/`key_pem`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad("TLS versions"))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs(cert_pem, "client certificate")?,
            key(key_pem, "client key")?,
        )
        .map_err(bad("client certificate"))?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The id derived from the peer's public key.
    pub client_id: ClientId,
    /// The peer certificate's SubjectPublicKeyInfo (DER).
    pub public_key: Vec<u8>,
    /// The certificate's role (OU), if it has a known one.
    pub role: Option<Role>,
    /// The certificate's CN.
    pub common_name: String,
    /// An API certificate's role (`crate::deploy::pki::access_of`).
    pub access: crate::deploy::pki::Access,
}

/// Reads who the peer of a finished handshake is.
pub fn peer_of(addr: SocketAddr, cert: &CertificateDer<'_>) -> io::Result<Peer> {
    use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_ORGANIZATIONAL_UNIT};
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("peer certificate: {e}"))
    })?;
    let ou = crate::deploy::pki::first_attr(x.subject(), &OID_X509_ORGANIZATIONAL_UNIT);
    let common_name = crate::deploy::pki::first_attr(x.subject(), &OID_X509_COMMON_NAME);
    let role = match ou.as_str() {
        "api" => Some(Role::Api),
        "frontend" => Some(Role::Frontend),
        "ca" => Some(Role::Ca),
        _ => None,
    };
    let public_key = x.public_key().raw.to_vec();
    Ok(Peer {
        addr,
        client_id: ClientId::from_public_key(&public_key),
        public_key,
        role,
        common_name,
        access: crate::deploy::pki::access_of(x.subject()),
    })
}

/// Checks that a request came over a certificate of `role` (`what` names it in the refusal), and
/// returns the certificate's common name (an API user's name).
pub fn require_role<T>(
    req: &tonic::Request<T>,
    role: Role,
    what: &str,
) -> Result<String, tonic::Status> {
    match req.extensions().get::<Peer>() {
        Some(p) if p.role == Some(role) => Ok(p.common_name.clone()),
        Some(p) => Err(tonic::Status::permission_denied(format!(
            "certificate {:?} is not {what}",
            p.common_name
        ))),
        None => Err(tonic::Status::unauthenticated("no client certificate")),
    }
}

/// An accepted TLS connection that tells tonic who the peer is.
pub struct Conn {
    inner: tokio_rustls::server::TlsStream<BoxIo>,
    peer: Peer,
    /// Until the client opens a stream: what it sent so far, and when it must have.
    idle: Option<(talon_core::h2scan::StreamScan, Pin<Box<tokio::time::Sleep>>)>,
    log: Arc<std::sync::Mutex<RefusalLog>>,
    /// The listener's name in metrics.
    listener: &'static str,
    _admitted: Admitted,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some((_, deadline)) = &mut this.idle
            && deadline.as_mut().poll(cx).is_ready()
        {
            // No stream opened in time: end of input closes the connection.
            let why = "no stream opened within the hello timeout after the handshake";
            RefusalLog::refused(&this.log, this.peer.addr, why);
            crate::metrics::refused(this.listener, Refusal::NoStream.label());
            this.idle = None;
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((scan, _))) = (&r, &mut this.idle)
            && scan.feed(&buf.filled()[before..])
        {
            this.idle = None;
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Admission control for a listener: connections beyond the bucket's rate are closed at once, before
/// any TLS work (`Frontend.resources.connections_per_second`); clients back off and retry.
pub struct Admission {
    /// The rate.
    pub bucket: talon_core::ratelimit::TokenBucket,
    /// Time for the bucket.
    pub clock: Arc<dyn crate::clock::Clock>,
}

/// Accepts TCP connections and completes TLS handshakes concurrently (at most `handshakes.max` at
/// once, each within its timeout); yields finished connections for `serve_with_incoming`.
/// Failed handshakes are logged and dropped: one bad client cannot stop the listener.
pub fn incoming(
    mut listener: Box<dyn Listener>,
    config: Arc<rustls::ServerConfig>,
    handshakes: Handshakes,
    mut admission: Option<Admission>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(handshakes.max);
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(handshakes.max));
    let refusals = Arc::new(std::sync::Mutex::new(RefusalLog::default()));
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    tokio::spawn(async move {
        let mut refused = 0u64;
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(a) = admission.as_mut()
                && !a.bucket.try_take(a.clock.monotonic())
            {
                refused += 1;
                crate::metrics::refused(handshakes.listener, Refusal::RateLimit.label());
                if refused == 1 || refused.is_multiple_of(1000) {
                    tracing::warn!(%addr, refused, "connection rate limit reached; closing new connections");
                }
                drop(tcp);
                continue;
            }
            // Before any TLS work, and before waiting for a handshake slot: one source cannot
            // hold them all.
            let listener = handshakes.listener;
            let admitted = match Admitted::take(&open, addr.ip(), &handshakes) {
                Ok(a) => a,
                Err((reason, why)) => {
                    crate::metrics::refused(listener, reason.label());
                    RefusalLog::refused(&refusals, addr, &why);
                    drop(tcp);
                    continue;
                }
            };
            let (acceptor, tx, log, slots) = (
                acceptor.clone(),
                tx.clone(),
                refusals.clone(),
                slots.clone(),
            );
            // The accept loop never waits: a connection waits for a handshake slot in its own task
            // (counted in `open`), so refusals above keep working however many handshakes stall.
            tokio::spawn(async move {
                let handshake = async {
                    let _permit = slots.acquire_owned().await;
                    acceptor.accept(tcp).await
                };
                let tls = match tokio::time::timeout(handshakes.timeout, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        crate::metrics::refused(listener, Refusal::Handshake.label());
                        let why = format!("handshake failed: {}", explain_server(&e));
                        return RefusalLog::refused(&log, addr, &why);
                    }
                    Err(_) => {
                        crate::metrics::refused(listener, Refusal::HandshakeTimeout.label());
                        let why = format!("handshake not finished in {:?}", handshakes.timeout);
                        return RefusalLog::refused(&log, addr, &why);
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .cloned();
                let Some(cert) = cert else {
                    crate::metrics::refused(listener, Refusal::NoCertificate.label());
                    return RefusalLog::refused(&log, addr, "no client certificate");
                };
                match peer_of(addr, &cert) {
                    Ok(peer) => {
                        crate::metrics::metrics()
                            .connections_accepted
                            .with_label_values(&[listener])
                            .inc();
                        let deadline = Box::pin(tokio::time::sleep(handshakes.stream_timeout));
                        let conn = Conn {
                            inner: tls,
                            peer,
                            idle: Some((talon_core::h2scan::StreamScan::new(), deadline)),
                            log,
                            listener,
                            _admitted: admitted,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => {
                        crate::metrics::refused(listener, Refusal::BadCertificate.label());
                        RefusalLog::refused(&log, addr, &format!("bad peer certificate: {e}"))
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why a handshake this server accepted failed, in the server's words (the client's certificate
/// expired, unknown issuer, ...; or the client's alert about ours).
fn explain_server(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("the client's certificate is refused ({why:?})")
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the client refused this server's certificate ({alert:?})")
        }
        Some(rustls::Error::NoCertificatesPresented) => "no client certificate".into(),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// Says which side of a TLS connection refused it and why, from an error and its sources
/// (`tonic`'s "transport error" hides the reason a level or three down). For a client's error.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut chain: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let found = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = found {
            return match r {
                rustls::Error::InvalidCertificate(why) => format!(
                    "this side refused the server's certificate ({why:?}): it is not signed by the \
                     CA in this config's ca_certificate, or it does not name the host connected \
                     to; is this the right deployment's config?"
                ),
                rustls::Error::AlertReceived(alert) => format!(
                    "the server refused the TLS handshake ({alert:?}): it does not accept this \
                     side's certificate (expired, or not signed by the deployment's CA, or of \
                     the wrong role); the server's log says why"
                ),
                other => format!("TLS failed: {other}"),
            };
        }
        let text = err.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        cur = err.source().or_else(|| {
            err.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static))
        });
    }
    // Some layers (h2) keep the TLS error only as text.
    if let Some(alert) = chain
        .iter()
        .find_map(|t| t.split("received fatal alert: ").nth(1))
    {
        return format!(
            "the server refused the TLS handshake ({alert}): it does not accept this side's \
             certificate (expired, or not signed by the deployment's CA, or of the wrong role); \
             the server's log says why"
        );
    }
    // TLS 1.3 checks a client's certificate after the client has finished its side: a refusal
    // then reaches the client as a connection closed under its first request.
    let text = chain.join(": ");
    if [
        "broken pipe",
        "connection reset",
        "connection closed",
        "unexpected end of file",
        // hyper's words when the connection closed before the request could be sent on it.
        "connection was not ready",
    ]
    .iter()
    .any(|t| text.to_lowercase().contains(t))
    {
        return format!(
            "{text} — the server closed the connection right after the TLS handshake, which is how \
             it refuses a certificate it does not accept (expired, not signed by the deployment's \
             CA, or of the wrong role); the server's log says why"
        );
    }
    text
}

/// Logs refused TLS handshakes at warn level, each reason at most once per
/// [`REFUSALS_LOG_EVERY`] per listener with the number refused for it since its last line: an
/// operator sees who is turned away and why, and a flood of bad handshakes cannot flood the log.
/// At most [`REFUSAL_REASONS_MAX`] reasons are remembered (then forgotten together).
#[derive(Default)]
struct RefusalLog {
    reasons: std::collections::BTreeMap<String, (tokio::time::Instant, u64)>,
}

/// See [`RefusalLog`].
const REFUSALS_LOG_EVERY: Duration = Duration::from_secs(10);
/// See [`RefusalLog`].
const REFUSAL_REASONS_MAX: usize = 64;

impl RefusalLog {
    fn refused(log: &std::sync::Mutex<RefusalLog>, addr: SocketAddr, why: &str) {
        let Ok(mut l) = log.lock() else { return };
        let now = tokio::time::Instant::now();
        if l.reasons.len() >= REFUSAL_REASONS_MAX && !l.reasons.contains_key(why) {
            l.reasons.clear();
        }
        let (last, since) = l.reasons.entry(why.to_owned()).or_insert((now, 0));
        *since += 1;
        if *since == 1 || now.duration_since(*last) >= REFUSALS_LOG_EVERY {
            tracing::warn!(%addr, reason = %why, refused = *since, "refused a TLS connection");
            *last = now;
            *since = 0;
        } else {
            tracing::debug!(%addr, reason = %why, "refused a TLS connection");
        }
    }
}

/// Opens a gRPC channel to `host:port` over TLS with `config`, verifying the server as `host`.
pub async fn connect(
    net: &Arc<dyn Net>,
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let ping = Duration::from_secs(20);
    connect_with_keepalive(
        net,
        host,
        port,
        config,
        timeout,
        ping,
        Duration::from_secs(10),
    )
    .await
}

/// [`connect`] with an HTTP/2 ping every `keepalive`, each to be answered within `answer_within`:
/// how soon a connection that died silently (a partition, a peer that vanished) is noticed.
pub async fn connect_with_keepalive(
    net: &Arc<dyn Net>,
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
    keepalive: Duration,
    answer_within: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let server_name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("invalid.host").expect("a valid name"));
    let target = crate::deploy::config::host_port(host, port);
    let connector = TlsConnector::from(config);
    let net = net.clone();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(timeout)
        .timeout(Duration::from_secs(3600))
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(answer_within)
        .keep_alive_while_idle(true);
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
            let (connector, name, target, net) = (
                connector.clone(),
                server_name.clone(),
                target.clone(),
                net.clone(),
            );
            async move {
                let io = net.connect(&target).await?;
                let tls = connector.connect(name, io).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

#[cfg(test)]
mod tests;
