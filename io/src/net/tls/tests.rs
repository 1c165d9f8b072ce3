//! TLS identity tests over real loopback sockets.

use super::*;
use crate::deploy::pki;
use talon_core::Timestamp;
use tokio_stream::StreamExt;

const NOW: Timestamp = Timestamp(1_790_000_000_000);

struct Deployment {
    ca: pki::Pem,
    frontend: pki::Pem,
}

fn deployment() -> Deployment {
    let ca = pki::new_ca(NOW, pki::KeyType::default()).unwrap();
    let frontend = pki::issue_frontend(&ca, &["127.0.0.1".to_string()], NOW).unwrap();
    Deployment { ca, frontend }
}

/// Starts a listener with `config`; returns its port and the stream of accepted peers.
async fn serve(
    config: Arc<rustls::ServerConfig>,
) -> (
    u16,
    tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>,
) {
    let l = crate::net::TokioNet.bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (
        port,
        incoming(
            l,
            config,
            Handshakes {
                max: 8,
                ..Default::default()
            },
            None,
        ),
    )
}

/// Connects with `client` and completes the handshake (sending a byte so TLS 1.3 client auth is done).
async fn dial(port: u16, client: Arc<rustls::ClientConfig>) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let tcp = crate::net::TokioNet
        .connect(&format!("127.0.0.1:{port}"))
        .await?;
    let mut tls = TlsConnector::from(client)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    tls.write_all(b"x").await?;
    tls.flush().await?;
    // Keep the connection open long enough for the server to finish its side.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

async fn next_peer(
    s: &mut tokio_stream::wrappers::ReceiverStream<io::Result<Conn>>,
) -> Option<Peer> {
    tokio::time::timeout(Duration::from_millis(500), s.next())
        .await
        .ok()
        .flatten()
        .map(|c| c.unwrap().peer)
}

#[tokio::test]
async fn an_endpoint_is_known_by_the_id_of_its_own_key() {
    let d = deployment();
    let (port, mut peers) =
        serve(endpoint_server_config(&d.frontend.certificate, &d.frontend.private_key).unwrap())
            .await;
    let (me, id) = pki::new_endpoint_identity(NOW).unwrap();
    dial(
        port,
        client_config(&d.ca.certificate, &me.certificate, &me.private_key).unwrap(),
    )
    .await
    .unwrap();
    let peer = next_peer(&mut peers).await.expect("accepted");
    assert_eq!(peer.client_id, id);
    assert_eq!(peer.role, None);
    // The same key next start (new self-signed certificate) is the same client.
    let (again, id2) = pki::endpoint_certificate(&me.private_key, NOW.plus_ms(1000)).unwrap();
    assert_eq!(id2, id);
    dial(
        port,
        client_config(&d.ca.certificate, &again.certificate, &again.private_key).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(next_peer(&mut peers).await.unwrap().client_id, id);
}

#[tokio::test]
async fn a_client_pinning_another_ca_refuses_the_server() {
    let d = deployment();
    let (port, _peers) =
        serve(endpoint_server_config(&d.frontend.certificate, &d.frontend.private_key).unwrap())
            .await;
    let other = pki::new_ca(NOW, pki::KeyType::default()).unwrap();
    let (me, _) = pki::new_endpoint_identity(NOW).unwrap();
    let err = dial(
        port,
        client_config(&other.certificate, &me.certificate, &me.private_key).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn the_api_port_admits_only_ca_signed_certificates_with_their_role() {
    let d = deployment();
    let cfg = ca_server_config(
        &d.frontend.certificate,
        &d.frontend.private_key,
        &d.ca.certificate,
    )
    .unwrap();
    let (port, mut peers) = serve(cfg).await;
    let alice = pki::issue_api_client(&d.ca, "alice", NOW).unwrap();
    dial(
        port,
        client_config(&d.ca.certificate, &alice.certificate, &alice.private_key).unwrap(),
    )
    .await
    .unwrap();
    let peer = next_peer(&mut peers).await.expect("alice accepted");
    assert_eq!(
        (peer.role, peer.common_name.as_str()),
        (Some(Role::Api), "alice")
    );

    // An endpoint's self-signed certificate, and an API certificate from a foreign CA: refused.
    let (endpoint, _) = pki::new_endpoint_identity(NOW).unwrap();
    let _ = dial(
        port,
        client_config(
            &d.ca.certificate,
            &endpoint.certificate,
            &endpoint.private_key,
        )
        .unwrap(),
    )
    .await;
    let foreign = pki::new_ca(NOW, pki::KeyType::default()).unwrap();
    let mallory = pki::issue_api_client(&foreign, "mallory", NOW).unwrap();
    let _ = dial(
        port,
        client_config(
            &d.ca.certificate,
            &mallory.certificate,
            &mallory.private_key,
        )
        .unwrap(),
    )
    .await;
    assert_eq!(next_peer(&mut peers).await, None, "neither may connect");
}

/// An Ed25519 deployment (as made before ECDSA was the default) part way through `rotate-ca` to an
/// ECDSA CA: its Ed25519 frontend certificate still serves, and API certificates of either CA and
/// key type are admitted.
#[tokio::test]
async fn an_ed25519_deployment_rotating_to_ecdsa_admits_both_key_types() {
    let old = pki::new_ca(NOW, pki::KeyType::Ed25519).unwrap();
    let new = pki::new_ca(NOW, pki::KeyType::EcdsaP256).unwrap();
    let frontend = pki::issue_frontend(&old, &["127.0.0.1".to_string()], NOW).unwrap();
    let bundle = format!("{}{}", new.certificate, old.certificate);
    let cfg = ca_server_config(&frontend.certificate, &frontend.private_key, &bundle).unwrap();
    let (port, mut peers) = serve(cfg).await;
    for (ca, user) in [(&old, "ed"), (&new, "ec")] {
        let api = pki::issue_api_client(ca, user, NOW).unwrap();
        let client = client_config(&bundle, &api.certificate, &api.private_key).unwrap();
        dial(port, client).await.unwrap();
        let peer = next_peer(&mut peers).await.expect("admitted");
        assert_eq!(
            (peer.role, peer.common_name.as_str()),
            (Some(Role::Api), user)
        );
    }
}

struct FrozenClock;

impl crate::clock::Clock for FrozenClock {
    fn now(&self) -> Timestamp {
        NOW
    }
    fn monotonic(&self) -> talon_core::Monotonic {
        talon_core::Monotonic(NOW.0)
    }
}

#[tokio::test]
async fn connections_beyond_the_rate_are_closed_before_any_handshake() {
    let d = deployment();
    let l = crate::net::TokioNet.bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = endpoint_server_config(&d.frontend.certificate, &d.frontend.private_key).unwrap();
    // Time stands still, so exactly the burst is admitted.
    let admission = Admission {
        bucket: talon_core::ratelimit::TokenBucket::new(1000, 3, talon_core::Monotonic(NOW.0)),
        clock: Arc::new(FrozenClock),
    };
    let mut peers = incoming(
        l,
        cfg,
        Handshakes {
            max: 8,
            ..Default::default()
        },
        Some(admission),
    );
    let (me, _) = pki::new_endpoint_identity(NOW).unwrap();
    let client = client_config(&d.ca.certificate, &me.certificate, &me.private_key).unwrap();
    let mut ok = 0;
    for _ in 0..6 {
        if dial(port, client.clone()).await.is_ok() {
            ok += 1;
        }
    }
    let mut accepted = 0;
    while next_peer(&mut peers).await.is_some() {
        accepted += 1;
    }
    assert_eq!((ok, accepted), (3, 3));
}

#[test]
fn open_connections_are_bounded_per_address_and_in_total() {
    let open = Arc::new(std::sync::Mutex::new(Open::default()));
    let h = Handshakes {
        per_address_max: 2,
        open_max: 3,
        ..Handshakes::default()
    };
    let a: std::net::IpAddr = [10, 0, 0, 1].into();
    let b: std::net::IpAddr = [10, 0, 0, 2].into();
    let a1 = Admitted::take(&open, a, &h).unwrap();
    let _a2 = Admitted::take(&open, a, &h).unwrap();
    let (why, e) = Admitted::take(&open, a, &h).err().unwrap();
    assert!(e.contains("max_connections_per_address"), "{e}");
    assert_eq!(why, Refusal::PerAddress);
    let _b1 = Admitted::take(&open, b, &h).unwrap();
    let (why, e) = Admitted::take(&open, b, &h).err().unwrap();
    assert!(e.contains("on this listener"), "{e}");
    assert_eq!(why, Refusal::ListenerFull);
    // A closed connection gives its place back.
    drop(a1);
    let _a3 = Admitted::take(&open, a, &h).unwrap();
    assert_eq!(open.lock().unwrap().total, 3);
}

/// A certificate the server refuses under TLS 1.3 reaches the client as a connection that closed
/// under its first request; each layer words that differently (hyper: "connection was not
/// ready"), and each wording is explained as the server's refusal.
#[test]
fn a_connection_closed_after_the_handshake_is_explained_as_the_servers_refusal() {
    for text in [
        "operation was canceled: connection was not ready",
        "connection reset by peer",
        "broken pipe",
        "unexpected end of file",
    ] {
        let e = io::Error::other(text);
        let why = explain(&e);
        assert!(why.contains("the server's log says why"), "{text}: {why}");
    }
    let e = io::Error::other("dns error: no such host");
    assert!(!explain(&e).contains("the server's log says why"));
}
