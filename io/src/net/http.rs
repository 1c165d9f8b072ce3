//! The plain HTTP/1.1 servers' shared parts (the GUI over TLS, the metrics in the clear): a
//! bounded accept loop, and one connection served until it ends or the node stops.

use super::{BoxIo, Listener};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioTimer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accepts connections on `listener` until `stop` changes, each handed to `handle` in its own task
/// with a receiver of `stop`. At most `max` are handled at once: more wait in the listen backlog
/// until one ends. `what` names the listener in logs.
pub async fn accept_bounded<F, Fut>(
    mut listener: Box<dyn Listener>,
    max: usize,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
    handle: F,
) where
    F: Fn(BoxIo, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (io, addr) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let conn = handle(io, addr, stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            conn.await;
        });
    }
}

/// Serves HTTP/1.1 on one connection (request headers within `header_timeout`) until it ends, or
/// until `stop` changes: then it finishes the request in progress and closes.
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    (what, addr): (&'static str, SocketAddr),
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            tracing::debug!(%addr, error = %e, "{what} connection ended");
        },
        _ = stop.changed() => conn.as_mut().graceful_shutdown(),
    }
}
