//! Accept loops and per-connection tasks: TLS (in the connection's own task, with a deadline),
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN) on one port, graceful drain.

pub mod tls;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Version};
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
                shutdown: shutdown.clone(),
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
    /// Held while the connection lives: the drain waits for every watcher to go.
    watcher: Watcher,
    shutdown: watch::Receiver<bool>,
    gauge: Gauge,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        // Settings from the current snapshot; the snapshot itself is not held for the
        // connection's lifetime.
        let (builder, header_timeout, idle_timeout) = {
            let table = self.proxy.table.load();
            let server = &table.config.server;
            (builder(server), server.header_timeout, server.idle_timeout)
        };
        let head_deadline = Instant::now() + header_timeout;
        match self.tls.clone() {
            None => {
                self.serve(stream, false, builder, head_deadline, idle_timeout)
                    .await
            }
            Some(acceptor) => {
                let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(stream)) => {
                        self.serve(stream, true, builder, head_deadline, idle_timeout)
                            .await
                    }
                    Ok(Err(error)) => debug!(peer = %self.peer, %error, "TLS handshake failed."),
                    Err(_) => debug!(peer = %self.peer, "TLS handshake timed out."),
                }
            }
        }
    }

    /// Serves the connection until it ends: closed at `head_deadline` when no request came;
    /// shut down gracefully (in-flight requests finish) on the drain signal, and for HTTP/2
    /// once no request has started for `idle_timeout` (HTTP/1.1 idling is hyper's own timer).
    async fn serve<I>(
        self,
        io: I,
        tls: bool,
        builder: auto::Builder<TokioExecutor>,
        head_deadline: Instant,
        idle_timeout: Duration,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = ConnInfo {
            peer: self.peer,
            tls,
        };
        let proxy = self.proxy;
        let activity = Arc::new(Activity::new());
        let seen = Arc::clone(&activity);
        let service = service_fn(move |req: Request<Incoming>| {
            seen.request(req.version());
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(req, info).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut shutdown = self.shutdown;
        let mut head_deadline = Some(head_deadline);
        let mut closing = false;
        let result = loop {
            // HTTP/2 or not is known from the first request: until then, look every
            // idle_timeout.
            let check_at = activity
                .h2_idle_at(idle_timeout)
                .unwrap_or_else(|| Instant::now() + idle_timeout);
            tokio::select! {
                result = conn.as_mut() => break Some(result),
                () = crate::app::stopped(&mut shutdown), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = sleep_until(head_deadline) => {
                    if !activity.seen.load(Ordering::Relaxed) {
                        debug!(peer = %self.peer, "No request head within header_timeout; closing.");
                        break None;
                    }
                    head_deadline = None;
                }
                () = tokio::time::sleep_until(check_at), if !closing => {
                    let idle_at = activity.h2_idle_at(idle_timeout);
                    if idle_at.is_some_and(|at| at <= Instant::now()) {
                        debug!(peer = %self.peer, "HTTP/2 connection idle for idle_timeout; closing.");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        };
        if let Some(Err(error)) = result {
            debug!(peer = %self.peer, %error, "Connection closed with an error.");
        }
        drop(self.gauge);
        drop(self.watcher);
    }
}

/// What a connection's requests tell its task.
struct Activity {
    opened: Instant,
    /// A request head arrived.
    seen: AtomicBool,
    /// When the latest HTTP/2 request started, in milliseconds after `opened`, plus one (0:
    /// none yet).
    last_h2: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            seen: AtomicBool::new(false),
            last_h2: AtomicU64::new(0),
        }
    }

    fn request(&self, version: Version) {
        self.seen.store(true, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_h2.store(ms.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// When an HTTP/2 connection becomes idle: `idle` after its latest request started.
    fn h2_idle_at(&self, idle: Duration) -> Option<Instant> {
        match self.last_h2.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.opened + Duration::from_millis(ms - 1) + idle),
        }
    }
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
