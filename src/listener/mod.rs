//! Accept loops and per-connection tasks: TLS (in the connection's own task, with a deadline),
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN) on one port, graceful drain.

pub mod tls;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};

/// One proxy listener.
pub struct Listener {
    pub addr: SocketAddr,
    pub name: String,
    pub connections: Arc<AtomicI64>,
    tcp: TcpListener,
}

impl Listener {
    /// Wraps a bound, non-blocking std listener; must run inside the worker's runtime.
    pub fn from_std(
        tcp: std::net::TcpListener,
        connections: Arc<AtomicI64>,
    ) -> std::io::Result<Listener> {
        let tcp = TcpListener::from_std(tcp)?;
        let addr = tcp.local_addr()?;
        Ok(Listener {
            addr,
            name: addr.to_string(),
            connections,
            tcp,
        })
    }

    /// Accepts until `shutdown` turns true; every connection is watched by `graceful`.
    pub async fn serve(
        self,
        proxy: Arc<Proxy>,
        tls: Arc<ArcSwapOption<TlsAcceptor>>,
        graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                () = crate::app::stopped(&mut shutdown) => return,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(listener = %self.name, %error, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                proxy: Arc::clone(&proxy),
                tls: tls.load_full(),
                watcher: graceful.watcher(),
                gauge: Gauge::new(&self.connections),
                peer,
            };
            tokio::spawn(connection.run(stream));
        }
    }
}

/// Counts a live connection while it exists.
struct Gauge(Arc<AtomicI64>);

impl Gauge {
    fn new(counter: &Arc<AtomicI64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Gauge(Arc::clone(counter))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Connection {
    proxy: Arc<Proxy>,
    tls: Option<Arc<TlsAcceptor>>,
    watcher: Watcher,
    gauge: Gauge,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        // Settings from the current snapshot; the snapshot itself is not held for the
        // connection's lifetime.
        let (builder, header_timeout) = {
            let table = self.proxy.table.load();
            let server = &table.config.server;
            (builder(server), server.header_timeout)
        };
        let head_deadline = Instant::now() + header_timeout;
        match self.tls.clone() {
            None => self.serve(stream, false, builder, head_deadline).await,
            Some(acceptor) => {
                let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(stream)) => self.serve(stream, true, builder, head_deadline).await,
                    Ok(Err(error)) => debug!(peer = %self.peer, %error, "TLS handshake failed."),
                    Err(_) => debug!(peer = %self.peer, "TLS handshake timed out."),
                }
            }
        }
    }

    async fn serve<I>(
        self,
        io: I,
        tls: bool,
        builder: auto::Builder<TokioExecutor>,
        head_deadline: Instant,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = ConnInfo {
            peer: self.peer,
            tls,
        };
        let proxy = self.proxy;
        let first_request = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&first_request);
        let service = service_fn(move |req: Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(req, info).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        let conn = self.watcher.watch(conn.into_owned());
        tokio::pin!(conn);
        // The first request's head must arrive within header_timeout of the accept; later
        // heads within idle_timeout of the previous response (hyper's own timer).
        let result = tokio::select! {
            result = &mut conn => Some(result),
            () = tokio::time::sleep_until(head_deadline) => {
                if first_request.load(Ordering::Relaxed) {
                    Some(conn.await)
                } else {
                    debug!(peer = %self.peer, "No request head within header_timeout; closing.");
                    None
                }
            }
        };
        if let Some(Err(error)) = result {
            debug!(peer = %self.peer, %error, "Connection closed with an error.");
        }
        drop(self.gauge);
    }
}

/// The per-connection protocol settings from the current config.
fn builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    // Room for a head up to twice the limits, so that veer itself answers one that is over
    // them, with its reason (414 or 431); hyper refuses larger ones (HTTP/1.1: a bare 431).
    let head_room = (server.max_header_bytes.max(server.max_uri_bytes))
        .saturating_mul(2)
        .max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this timer while waiting for the next head, so it is the keep-alive
        // idle limit; the first head's deadline (header_timeout) is enforced in `serve`.
        .header_read_timeout(server.idle_timeout.max(server.header_timeout))
        .max_buf_size(head_room)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_room).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(server.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
