//! The network, injected. Every listener and outgoing connection of the shell goes through a [`Net`]:
//! production uses [`TokioNet`] (tokio TCP); the simulator supplies one over turmoil's simulated
//! sockets, so the same server, minion and agent code runs on simulated hosts.

pub mod http;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream: one TCP connection (or its simulated counterpart).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed connection.
pub type BoxIo = Box<dyn Io>;

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A bound listener.
pub trait Listener: Send + 'static {
    /// The next incoming connection and its peer's address.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, SocketAddr)>>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Binds listeners and opens connections.
pub trait Net: Send + Sync + 'static {
    /// Listens on `addr` (`HOST:PORT`).
    fn bind<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>>;
    /// Connects to `addr` (`HOST:PORT`).
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxIo>>;
    /// Connects to `addr` from the local address `local` (a networkless implementation may ignore it).
    fn connect_from<'a>(
        &'a self,
        addr: &'a str,
        local: IpAddr,
    ) -> BoxFuture<'a, io::Result<BoxIo>> {
        let _ = local;
        self.connect(addr)
    }
}

/// A [`Net`] whose outgoing connections all leave from one local address. A load generator holding
/// more connections to one frontend than a source address has ephemeral ports (about 28,000 on
/// Linux) spreads its clients over several loopback addresses with it.
pub struct FromAddr {
    /// The network underneath.
    pub inner: Arc<dyn Net>,
    /// The local address connections leave from.
    pub local: IpAddr,
}

impl Net for FromAddr {
    fn bind<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        self.inner.bind(addr)
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxIo>> {
        self.inner.connect_from(addr, self.local)
    }
}

/// The real network: tokio TCP, Nagle off (small messages are latency-bound).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioNet;

impl TokioNet {
    /// As a shared [`Net`].
    pub fn shared() -> Arc<dyn Net> {
        Arc::new(TokioNet)
    }
}

struct TokioListener(tokio::net::TcpListener);

impl Listener for TokioListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxIo, SocketAddr)>> {
        Box::pin(async move {
            let (s, addr) = self.0.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Box::new(s) as BoxIo, addr))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Net for TokioNet {
    fn bind<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let l = tokio::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TokioListener(l)) as Box<dyn Listener>)
        })
    }

    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<BoxIo>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxIo)
        })
    }

    fn connect_from<'a>(
        &'a self,
        addr: &'a str,
        local: IpAddr,
    ) -> BoxFuture<'a, io::Result<BoxIo>> {
        Box::pin(async move {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
            for target in tokio::net::lookup_host(addr).await? {
                let socket = match target {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                if target.is_ipv4() == local.is_ipv4() {
                    socket.bind(SocketAddr::new(local, 0))?;
                }
                match socket.connect(target).await {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return Ok(Box::new(s) as BoxIo);
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}
