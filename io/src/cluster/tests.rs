//! The minion's link against a scripted master over real TLS on loopback, and the read cache's bound.

use super::*;
use crate::clock::SystemClock;
use crate::deploy::pki;
use crate::net::{Net as _, TokioNet};
use std::path::Path;
use talon_core::Timestamp;

const NOW: Timestamp = Timestamp(1_790_000_000_000);

struct Certs {
    ca: pki::Pem,
    frontend: pki::Pem,
}

fn certs() -> Certs {
    let ca = pki::new_ca(NOW, pki::KeyType::default()).unwrap();
    let frontend = pki::issue_frontend(&ca, &["127.0.0.1".to_string()], NOW).unwrap();
    Certs { ca, frontend }
}

fn master_addr(c: &Certs, port: u16) -> MasterAddr {
    MasterAddr {
        host: "127.0.0.1".into(),
        port,
        tls: crate::net::tls::client_config(
            &c.ca.certificate,
            &c.frontend.certificate,
            &c.frontend.private_key,
        )
        .unwrap(),
        net: TokioNet::shared(),
        entropy: Arc::new(crate::clock::OsEntropy::default()),
    }
}

/// What the scripted master does with each batch.
#[derive(Clone, Copy)]
enum Script {
    /// Record the events, never acknowledge.
    Silent,
    /// Record and acknowledge everything.
    AckAll,
}

#[derive(Clone)]
struct FakeMaster {
    script: Script,
    seen: Arc<Mutex<Vec<(u64, u64)>>>, // (epoch, seq) in arrival order
    hellos: Arc<Mutex<Vec<pc::MinionHello>>>,
}

type Out = tokio_stream::wrappers::ReceiverStream<Result<pc::MasterMessage, Status>>;

#[tonic::async_trait]
impl pc::replication_server::Replication for FakeMaster {
    type StreamStream = Out;

    async fn stream(
        &self,
        req: Request<tonic::Streaming<pc::MinionMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = incoming.message().await {
                match m.kind {
                    Some(minion_message::Kind::Hello(h)) => me.hellos.lock().unwrap().push(h),
                    Some(minion_message::Kind::Events(b)) => {
                        let last = b.events.last().map(|e| e.seq);
                        for e in &b.events {
                            me.seen.lock().unwrap().push((b.epoch, e.seq));
                        }
                        if let (Script::AckAll, Some(upto)) = (me.script, last) {
                            let ack = pc::MasterMessage {
                                kind: Some(master_message::Kind::Ack(pc::ReplAck {
                                    epoch: b.epoch,
                                    upto_seq: upto,
                                })),
                            };
                            let _ = tx.send(Ok(ack)).await;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Serves `master` until the returned sender is dropped; returns its port.
async fn serve(c: &Certs, master: FakeMaster) -> (u16, oneshot::Sender<()>) {
    let l = TokioNet.bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = crate::net::tls::ca_server_config(
        &c.frontend.certificate,
        &c.frontend.private_key,
        &c.ca.certificate,
    )
    .unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming_shutdown(
            pc::replication_server::ReplicationServer::new(master),
            crate::net::tls::incoming(
                l,
                cfg,
                crate::net::tls::Handshakes {
                    max: 8,
                    ..Default::default()
                },
                None,
            ),
            async move {
                let _ = stop_rx.await;
            },
        ),
    );
    (port, stop_tx)
}

fn event(n: u64) -> Event {
    Event::ClientGone(pc::ClientGone {
        client_id: format!("C.{n:016x}"),
    })
}

fn start(
    dir: &Path,
    master: MasterAddr,
) -> (
    Link,
    LinkRecovery,
    tokio::task::JoinHandle<String>,
    mpsc::Receiver<LinkEvent>,
) {
    let (tx, rx) = mpsc::channel(64);
    let opts = LinkOptions {
        node: "m-1".into(),
        master,
        limits: OutboxLimits::default(),
    };
    let disk = Box::new(crate::storage::local::StdDisk::new(dir).unwrap());
    let (link, rec, task) = Link::start(
        opts,
        disk,
        &dir.display().to_string(),
        Arc::new(SystemClock),
        tx,
    )
    .unwrap();
    (link, rec, task, rx)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_events_survive_a_restart_and_are_resent_in_order_once_acked_gone() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    // A master that never acknowledges: events stay in the outbox, on disk.
    let silent = FakeMaster {
        script: Script::Silent,
        seen: Default::default(),
        hellos: Default::default(),
    };
    let (port, stop) = serve(&c, silent.clone()).await;
    let (link, rec, task, _events) = start(dir.path(), master_addr(&c, port));
    assert_eq!(rec.pending, 0);
    let epoch = rec.epoch;
    for n in 1..=5 {
        link.push(event(n), None).await.unwrap();
    }
    wait_for("the silent master to see 5 events", || {
        silent.seen.lock().unwrap().len() >= 5
    })
    .await;
    let seen: Vec<u64> = silent.seen.lock().unwrap().iter().map(|e| e.1).collect();
    assert_eq!(&seen[..5], &[1, 2, 3, 4, 5]);
    task.abort();
    drop(stop);
    let _ = task.await;

    // The minion restarts: the five events come back from its disk, same epoch.
    let acking = FakeMaster {
        script: Script::AckAll,
        seen: Default::default(),
        hellos: Default::default(),
    };
    let (port, _stop) = serve(&c, acking.clone()).await;
    let (link, rec, task, _events) = start(dir.path(), master_addr(&c, port));
    assert_eq!((rec.epoch, rec.pending), (epoch, 5));
    let (tx, applied) = oneshot::channel();
    link.push(event(6), Some(tx)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), applied)
        .await
        .expect("the sixth event is acknowledged")
        .unwrap();
    let seen = acking.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=6).map(|s| (epoch, s)).collect::<Vec<_>>(),
        "replayed in order, each once"
    );
    assert_eq!(acking.hellos.lock().unwrap()[0].epoch, epoch);
    // The node stops: the link finishes what it was doing (truncating) and ends.
    drop(link);
    let why = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(why, "the node stopped");

    // Acknowledged events are truncated: a third start has nothing pending.
    let (_l, rec, _t, _e) = start(dir.path(), master_addr(&c, 1));
    assert_eq!((rec.epoch, rec.pending), (epoch, 0));
}

#[tokio::test]
async fn a_lost_epoch_file_beside_a_journal_is_an_error_not_a_guess() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    {
        let (link, _, task, _e) = start(dir.path(), master_addr(&c, 1));
        link.push(event(1), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        task.abort();
    }
    std::fs::remove_file(dir.path().join(EPOCH_FILE)).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let opts = LinkOptions {
        node: "m-1".into(),
        master: master_addr(&c, 1),
        limits: OutboxLimits::default(),
    };
    let disk = Box::new(crate::storage::local::StdDisk::new(dir.path()).unwrap());
    let err = Link::start(opts, disk, "local", Arc::new(SystemClock), tx)
        .err()
        .expect("refused");
    assert!(err.contains("without its epoch file"), "{err}");
}

#[test]
fn the_read_cache_is_bounded_and_a_read_racing_an_invalidation_does_not_fill_it() {
    let c = certs();
    let r = RemoteStore::new(master_addr(&c, 1), 3, 64 << 20);
    for k in ["a", "b", "c", "d", "e"] {
        let generation = r.cache().generation;
        r.fill(generation, k, Some(Bytes::from_static(b"v")));
    }
    assert_eq!(r.cached(), 3, "bounded");
    let c2 = r.cache();
    assert!(c2.values.contains_key("e") && !c2.values.contains_key("a"));
    drop(c2);
    // A read that started before an invalidation must not insert what it read.
    let before = r.cache().generation;
    r.invalidate("x");
    r.fill(before, "x", Some(Bytes::from_static(b"stale")));
    assert!(!r.cache().values.contains_key("x"));
    r.clear();
    assert_eq!(r.cached(), 0);
}

/// A network on which the master is unreachable; counts the attempts.
struct Unreachable(std::sync::atomic::AtomicU64);

impl crate::net::Net for Unreachable {
    fn bind<'a>(
        &'a self,
        _: &'a str,
    ) -> crate::net::BoxFuture<'a, std::io::Result<Box<dyn crate::net::Listener>>> {
        Box::pin(async { Err(std::io::ErrorKind::Unsupported.into()) })
    }
    fn connect<'a>(
        &'a self,
        _: &'a str,
    ) -> crate::net::BoxFuture<'a, std::io::Result<crate::net::BoxIo>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Err(std::io::ErrorKind::ConnectionRefused.into()) })
    }
}

/// A partition or a master restart costs one connection attempt per back-off pause, not one per
/// call: calls in between fail at once (the simulator's 10,000-client run used up a minion's
/// ephemeral ports when every call reconnected).
#[tokio::test(start_paused = true)]
async fn an_unreachable_master_is_retried_with_back_off_not_on_every_call() {
    let c = certs();
    let net = Arc::new(Unreachable(Default::default()));
    let mut addr = master_addr(&c, 1);
    addr.net = net.clone();
    let r = RemoteStore::new(addr, 3, 64 << 20);
    let attempts = || net.0.load(std::sync::atomic::Ordering::SeqCst);
    assert!(r.get("k").await.is_err());
    let after_first = attempts();
    assert!(after_first >= 1);
    for _ in 0..100 {
        let e = r.get("k").await.unwrap_err();
        assert!(e.message.contains("next attempt"), "{e}");
        assert_eq!(e.kind, ReadFailure::Unavailable);
    }
    assert_eq!(attempts(), after_first, "no attempt while backing off");
    // The pauses grow to the bound: over a minute, a few dozen attempts at most, whatever the calls.
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = r.get("k").await;
        let _ = r.get("k").await;
    }
    let per_pause = after_first;
    let tries = (attempts() - after_first) / per_pause;
    assert!(
        (60_000 / REMOTE_RECONNECT_MAX_MS / 2..=60).contains(&tries),
        "{tries} attempts in a minute"
    );
}
