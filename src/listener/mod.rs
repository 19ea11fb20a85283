//! Accept loops and per-connection tasks: TLS (in the connection's own task, with a deadline),
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN) on one port, graceful drain.

pub mod tls;
pub mod workers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use pin_project_lite::pin_project;
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
                let stream = crate::io::send_flat(stream);
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
    /// once no stream has been open for `idle_timeout` (HTTP/1.1 idling is hyper's own
    /// timer).
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
        let info = ConnInfo::new(self.peer, tls);
        let proxy = self.proxy;
        let activity = Arc::new(Activity::new());
        let seen = Arc::clone(&activity);
        let service = service_fn(move |req: Request<Incoming>| {
            // Held until the response body is done with (or the request is dropped).
            let stream = Activity::request(&seen, req.version());
            let proxy = Arc::clone(&proxy);
            let info = info.clone();
            async move {
                let response = proxy.handle(req, &info).await;
                Ok::<_, Infallible>(response.map(|body| Tracked { body, stream }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut shutdown = self.shutdown;
        let mut head_deadline = Some(head_deadline);
        let mut closing = false;
        let result = loop {
            // Until the first request tells the protocol, look every idle_timeout.
            let check_at = match activity.protocol() {
                Protocol::Http1 => None,
                Protocol::Http2 | Protocol::Unknown => Some(
                    activity
                        .h2_idle_at(idle_timeout)
                        .unwrap_or_else(|| Instant::now() + idle_timeout),
                ),
            };
            tokio::select! {
                biased;
                result = conn.as_mut() => break Some(result),
                () = crate::app::stopped(&mut shutdown), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = sleep_until(head_deadline) => {
                    if activity.protocol() == Protocol::Unknown {
                        debug!(peer = %self.peer, "No request head within header_timeout; closing.");
                        break None;
                    }
                    head_deadline = None;
                }
                () = sleep_until(check_at), if !closing => {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// What a connection's requests tell its task: the protocol, and for HTTP/2 whether a stream
/// is open and since when none is.
struct Activity {
    opened: Instant,
    /// A `Protocol` as a number, known once a request head arrived.
    protocol: AtomicU8,
    /// HTTP/2 streams whose exchange is under way (request not yet answered or response body
    /// not yet done).
    open: AtomicUsize,
    /// When the last open stream ended, in milliseconds after `opened`.
    quiet_since: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            protocol: AtomicU8::new(Protocol::Unknown as u8),
            open: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
        }
    }

    fn protocol(&self) -> Protocol {
        match self.protocol.load(Ordering::Relaxed) {
            1 => Protocol::Http1,
            2 => Protocol::Http2,
            _ => Protocol::Unknown,
        }
    }

    /// Notes a request; for HTTP/2, its stream counts as open while the guard lives.
    fn request(this: &Arc<Self>, version: Version) -> Option<OpenStream> {
        if version != Version::HTTP_2 {
            this.protocol
                .store(Protocol::Http1 as u8, Ordering::Relaxed);
            return None;
        }
        this.protocol
            .store(Protocol::Http2 as u8, Ordering::Relaxed);
        this.open.fetch_add(1, Ordering::Relaxed);
        Some(OpenStream(Arc::clone(this)))
    }

    /// When an HTTP/2 connection with no stream open becomes idle; `None` while one is open.
    fn h2_idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.protocol() != Protocol::Http2 || self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let quiet = Duration::from_millis(self.quiet_since.load(Ordering::Relaxed));
        Some(self.opened + quiet + idle)
    }
}

/// One open HTTP/2 stream of a connection.
struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let activity = &self.0;
        let ms = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.quiet_since.store(ms, Ordering::Relaxed);
        activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A response body that keeps its stream counted as open until it is dropped.
    struct Tracked<B> {
        #[pin]
        body: B,
        stream: Option<OpenStream>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
        // A client that shuts its write side after the request (`nc -N`, socat, scripts)
        // still reads the answer. Such a client cannot be told from one that has gone: that
        // one's request ends at `request_timeout` at the latest.
        .half_close(true)
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
