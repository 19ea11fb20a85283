//! Accept loops and per-connection tasks: TLS (in the connection's own task, with a deadline),
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge or ALPN) on one port, graceful drain.

mod activity;
pub mod tls;
pub mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tracing::{debug, warn};

use crate::config::ServerConfig;
use crate::proxy::error::LocalError;
use crate::proxy::{ConnInfo, Proxy};
use crate::warn_every::WarnEvery;
use activity::Due;
pub use activity::InFlight;
use activity::Starving;
pub(crate) use activity::{Activity, Timers, Tracked, Watched};

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
        // Accept failures go on while they last (out of file descriptors: every 50 ms): one
        // warning, then at most one every `ACCEPT_WARN_EVERY` with how many failed meanwhile.
        let failures = WarnEvery::new(ACCEPT_WARN_EVERY);
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                () = crate::app::stopped(&mut shutdown) => return,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    if let Some(failed) = failures.happened(Instant::now()) {
                        warn!(listener = %self.name, %error, failed, "Accept failed; retrying every 50 ms.");
                    }
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            keep_unsent_small(&stream);
            let connection = Connection {
                proxy: Arc::clone(&proxy),
                tls: tls.load_full(),
                shutdown: shutdown.clone(),
                peer,
            };
            let open = Open {
                _watcher: graceful.watcher(),
                _gauge: Gauge::new(&self.connections),
            };
            tokio::spawn(connection.run(stream, open));
        }
    }
}

/// Unsent bytes the kernel holds for a client socket before writes wait.
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Caps the bytes a client socket holds unsent (`TCP_NOTSENT_LOWAT`), so that the socket
/// takes more as soon as the client has read about half of that. Without it Linux wakes a
/// writer only when a third of the send buffer is free (up to 4 MiB with autotuning), and a
/// slow but steady reader could look like one that reads nothing for `idle_timeout`. It also
/// keeps less queued in the kernel per connection. The bytes in flight are not capped.
pub(crate) fn keep_unsent_small(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
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

/// What a client connection holds while its socket is open, whoever holds the socket: the
/// connection's task, or after an upgrade the tunnel. The socket counts as open, and holds up
/// the drain, until it is closed.
pub(super) struct Open {
    /// The drain waits for every watcher to go.
    _watcher: Watcher,
    _gauge: Gauge,
}

/// A client that speaks plain HTTP to a TLS listener (its first byte is a letter, where a TLS
/// record starts with 22) gets a 400 that says so, as NGINX answers it, instead of a TLS
/// alert it cannot read; true when it was answered (the connection is then done).
async fn plain_http_on_tls(stream: &TcpStream, deadline: Instant) -> bool {
    const ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
        content-length: 44\r\nconnection: close\r\n\r\nthis port speaks HTTPS: use an https:// URL\n";
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) || !first[0].is_ascii_uppercase() {
        return false;
    }
    // What the client sent so far is read first: closing with unread bytes would reset the
    // connection and could discard the answer. The answer fits any socket buffer; a client
    // that takes nothing is not waited for.
    let mut sent = [0u8; 8192];
    while matches!(stream.try_read(&mut sent), Ok(n) if n > 0) {}
    let _ = stream.try_write(ANSWER);
    true
}

/// What a part of a TLS handshake bounded by a deadline gave, logged when it failed.
fn handshake_done<T>(
    peer: SocketAddr,
    done: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
) -> Option<T> {
    match done {
        Ok(Ok(done)) => Some(done),
        Ok(Err(error)) => {
            debug!(peer = %peer, %error, "TLS handshake failed.");
            None
        }
        Err(_) => {
            debug!(peer = %peer, "TLS handshake timed out.");
            None
        }
    }
}

/// A client connection over TLS, its handshake done.
type TlsStream = tokio_rustls::server::TlsStream<Watched>;

struct Connection {
    proxy: Arc<Proxy>,
    tls: Option<Arc<TlsAcceptor>>,
    shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, open: Open) {
        let accepted = Instant::now();
        let (protocols, timers) = self.settings();
        let activity = Arc::new(Activity::new(accepted));
        let deadline = accepted + timers.header;
        match self.tls.take() {
            None => {
                let Some(h2) = self.opens_with_preface(&stream, deadline).await else {
                    return;
                };
                let stream = Watched::new(stream, Arc::clone(&activity), Some(open));
                let stream = crate::io::send_flat(stream);
                self.serve(stream, false, h2, protocols, activity, timers)
                    .await;
            }
            Some(acceptor) => {
                // Boxed, and let go once done: the task does not carry a handshake's state
                // for the connection's life.
                let handshake = self.handshake(&acceptor, stream, open, &activity, deadline);
                let Some(stream) = Box::pin(handshake).await else {
                    return;
                };
                // Boxed: the TLS state is over a kilobyte, and the task of every connection,
                // cleartext ones included, would carry it.
                let mut stream = Box::new(stream);
                // The protocol ALPN agreed (RFC 7301), as NGINX serves it: HTTP/2 over TLS is
                // agreed by ALPN (RFC 9113 §3.3), so a client that offered none is served
                // HTTP/1. An HTTP/2 preface on a connection served HTTP/1 is refused by hyper
                // (the connection closes without an answer).
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                // (An HTTP/2 server sends its SETTINGS first, not waiting for the client.)
                if !h2 && !self.first_bytes_over_tls(&mut stream, deadline).await {
                    return;
                }
                self.serve(stream, true, h2, protocols, activity, timers)
                    .await;
            }
        }
    }

    /// Whether a cleartext connection opens with the HTTP/2 preface (h2c with prior
    /// knowledge), told from its first bytes without reading them, so that hyper reads the
    /// connection from its first byte. (hyper-util's sniffing hands hyper the preface's
    /// length of bytes first, and hyper's read buffer then grows from 8 to 16 KiB on its
    /// next read, for the connection's life.) `None` when the connection is done: closed or
    /// failed before its first byte or within the preface, not begun by `deadline`, or still
    /// silent [`DRAIN_SETTLE`] after the drain signal.
    async fn opens_with_preface(&self, stream: &TcpStream, deadline: Instant) -> Option<bool> {
        let sniff = async {
            let mut first = [0u8; H2_PREFACE.len()];
            let mut pause = PREFACE_PAUSE;
            loop {
                let ready = stream.ready(Interest::READABLE).await.ok()?;
                let n = stream.peek(&mut first).await.ok()?;
                if n == 0 {
                    return None;
                }
                if first[..n] != H2_PREFACE[..n] {
                    return Some(false);
                }
                if n == H2_PREFACE.len() {
                    return Some(true);
                }
                // The preface's first bytes: the rest can no longer come once the client
                // closed its side.
                if ready.is_read_closed() {
                    return None;
                }
                // The rest to come (clients send it whole, so this is rare). The bytes peeked
                // keep the socket readable: the next look is after a pause, longer each time.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(PREFACE_PAUSE_MAX);
            }
        };
        let sniffed = self.before_first_bytes(sniff, deadline).await;
        if sniffed.is_none() {
            // Closed with unread bytes (what there is of the preface), the connection would be
            // reset rather than closed.
            let mut unread = [0u8; H2_PREFACE.len()];
            let _ = stream.try_read(&mut unread);
        }
        sniffed
    }

    /// Waits until a TLS client has sent something after its handshake (rustls holds
    /// plaintext, or the socket has bytes), so that hyper's buffers (16 KiB) are not made for
    /// a connection that sends nothing for a while (a browser's preconnect). False when the
    /// connection is done (see [`Connection::before_first_bytes`]).
    async fn first_bytes_over_tls(&self, stream: &mut TlsStream, deadline: Instant) -> bool {
        let (socket, tls) = stream.get_mut();
        // Bytes that came with the handshake's last message (a TLS 1.3 client sends its first
        // request with it) are in rustls already; an error is for hyper to meet.
        let held = tls.process_new_packets().map_or(true, |state| {
            state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
        });
        held || {
            let readable = async { socket.readable().await.ok() };
            self.before_first_bytes(readable, deadline).await.is_some()
        }
    }

    /// `first`, the wait for a connection's first bytes, within `deadline` (`header_timeout`
    /// from the accept) and, from the drain signal, [`DRAIN_SETTLE`] (a request sent just
    /// before the signal may not have been seen yet): `None` when either ends it first.
    async fn before_first_bytes<T>(
        &self,
        first: impl Future<Output = Option<T>>,
        deadline: Instant,
    ) -> Option<T> {
        let mut first = pin!(tokio::time::timeout_at(deadline, first));
        let mut shutdown = self.shutdown.clone();
        let done = tokio::select! {
            biased;
            done = &mut first => done,
            () = crate::app::stopped(&mut shutdown) => {
                let settled = (Instant::now() + DRAIN_SETTLE).min(deadline);
                tokio::time::timeout_at(settled, first).await.unwrap_or(Ok(None))
            }
        };
        if done.is_err() {
            debug!(peer = %self.peer, "No request began within header_timeout; closing.");
        }
        done.ok().flatten()
    }

    /// The connection's settings, from the current snapshot (not held for the connection's
    /// lifetime).
    fn settings(&self) -> (Protocols, Timers) {
        let table = self.proxy.table.load();
        let server = &table.config.server;
        let timers = Timers {
            header: server.header_timeout,
            idle: server.idle_timeout,
            exchange: server.request_timeout,
        };
        (Protocols::new(server), timers)
    }

    /// The TLS handshake, done by `deadline`; `None` when it failed, timed out, met plain
    /// HTTP (answered with a 400), or the drain came first.
    async fn handshake(
        &self,
        acceptor: &TlsAcceptor,
        stream: TcpStream,
        open: Open,
        activity: &Arc<Activity>,
        deadline: Instant,
    ) -> Option<TlsStream> {
        // A connection whose client has not sent its whole ClientHello yet has no request
        // under way (nor can it have, before veer's answer to it): the drain closes it at once
        // rather than wait for `header_timeout`. Past the ClientHello the handshake goes on
        // (within `header_timeout` from the accept): a TLS 1.3 client sends its first request
        // with its last handshake message, and the drain then ends the exchange gracefully.
        let mut shutdown = self.shutdown.clone();
        let hello = async {
            if plain_http_on_tls(&stream, deadline).await {
                debug!(peer = %self.peer, "Plain HTTP on a TLS listener: answered 400.");
                self.proxy
                    .count_client_error(LocalError::BadRequest("plain HTTP on TLS"));
                return None;
            }
            let stream = Watched::new(stream, Arc::clone(activity), Some(open));
            let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
            handshake_done(self.peer, tokio::time::timeout_at(deadline, hello).await)
        };
        let start = tokio::select! {
            biased;
            start = hello => start,
            () = crate::app::stopped(&mut shutdown) => None,
        };
        let handshake = start?.into_stream(Arc::clone(acceptor.config()));
        handshake_done(
            self.peer,
            tokio::time::timeout_at(deadline, handshake).await,
        )
    }

    /// Serves the connection, HTTP/2 or HTTP/1 (with upgrades), until it ends (see [`drive`]).
    ///
    /// Not an `async fn`: one would hold each argument twice, for the connection's life.
    fn serve<I>(
        self,
        io: I,
        tls: bool,
        h2: bool,
        protocols: Protocols,
        activity: Arc<Activity>,
        timers: Timers,
    ) -> impl Future<Output = ()> + Send
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            proxy,
            shutdown,
            peer,
            ..
        } = self;
        // Signalled before the connection was served (during its sniff or handshake): `drive`
        // would tell `activity` only after hyper's first look at the connection.
        if *shutdown.borrow() {
            activity.drain();
        }
        let info = ConnInfo::new(peer, tls);
        let seen = Arc::clone(&activity);
        let service = service_fn(move |req: Request<Incoming>| {
            // Held until the response body is done with (or the request is dropped).
            // One clock read for the connection's bookkeeping and the request's.
            let arrived = Instant::now();
            let http1 = req.version() != Version::HTTP_2;
            let exchange = Activity::request(&seen, req.version(), arrived);
            // The request body holds the exchange too, until it ends or is dropped.
            let reading = exchange.body_hold(req.body());
            let handled = Arc::clone(&proxy).handle(req, info.clone(), reading, arrived);
            // A combinator, not an `async` block: that would hold the request a second time.
            FutureExt::map(handled, move |mut response| {
                if http1 && exchange.drained() {
                    close_with(&mut response);
                }
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, exchange)))
            })
        });
        async move {
            let io = TokioIo::new(io);
            if h2 {
                let conn = protocols.http2.serve_connection(io, service);
                drive(pin!(conn), &activity, timers, shutdown, peer).await;
            } else {
                let conn = protocols
                    .http1
                    .serve_connection(io, service)
                    .with_upgrades();
                drive(pin!(conn), &activity, timers, shutdown, peer).await;
            }
        }
    }
}

/// Makes an HTTP/1 answer sent once the drain began end its connection: its client learns it
/// from the answer (hyper closes the connection after an answer that says `Connection:
/// close`), where a close of the idle connection could cross its next request. An upgrade's
/// answer is left as it is.
fn close_with<B>(response: &mut hyper::Response<B>) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let close = HeaderValue::from_static("close");
        response.headers_mut().insert(CONNECTION, close);
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a cleartext connection that sent the HTTP/2 preface's first bytes waits before
/// veer looks for the rest, at first; the pause doubles at each look, up to
/// [`PREFACE_PAUSE_MAX`] (a client that sends part of the preface and no more costs a few
/// looks, until `header_timeout` closes it).
const PREFACE_PAUSE: Duration = Duration::from_millis(1);
const PREFACE_PAUSE_MAX: Duration = Duration::from_millis(500);

/// A served connection that `drive` can close gracefully. (hyper-util's `GracefulConnection`
/// is sealed and leaves out hyper's HTTP/1 connection with upgrades.)
pub(crate) trait Graceful: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;

    /// Ends the connection once the exchanges under way are done.
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The admin API's connections.
impl<I, S, B> Graceful for auto::Connection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives a served connection until it ends, with its `activity`'s timers (see [`Due`]):
/// closed at once when a request head does not arrive whole in time, when the client takes
/// nothing of what is written for `timers.idle`, or when a request body is still read
/// `timers.exchange` after its answer; closed gracefully (in-flight requests finish) on the
/// drain signal, and once no exchange has been under way for `timers.idle` (then cut if it is
/// still open another `idle` later). The proxy listeners and the admin API both use it.
///
/// `conn` is pinned by the caller: taken by value, it would be held twice by this future (as
/// the argument and where it is pinned), for the connection's whole life.
pub(crate) async fn drive<C>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    timers: Timers,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: Graceful,
{
    // One sleep for all the timers, made once and re-armed only when it fires.
    let now = Instant::now();
    let check = tokio::time::sleep_until(match activity.due(now, timers) {
        Due::At(at) => at,
        _ => now,
    });
    let stop = crate::app::stopped(&mut shutdown);
    tokio::pin!(check, stop);
    // Made at the first look at an HTTP/2 connection (over HTTP/1.1 a client that takes
    // nothing fills the socket, and the stall clock cuts it), boxed so that the tasks of other
    // connections do not carry it.
    let mut starving: Option<Box<Starving>> = None;
    // When a starved HTTP/2 connection closed gracefully is cut if it has not ended.
    let mut starved_cut: Option<Instant> = None;
    let mut closing = false;
    let mut drain = Drain::default();
    let result = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => break Some(result),
            () = activity.flooded() => {
                warn!(%peer, "The client reset at least half of this HTTP/2 connection's streams within 1 s of their requests, before their answers (at least 250 of 500); closing.");
                break None;
            }
            // Polled until it is ready, never after.
            () = &mut stop, if !drain.signalled => {
                drain.signalled = true;
                activity.drain();
                if activity.is_busy() {
                    // Told now, an HTTP/1.1 answer under way says `Connection: close`.
                    close_gracefully(conn.as_mut(), &mut closing);
                    drain.look_from_now(activity);
                } else {
                    drain.close_at = Some(Instant::now() + DRAIN_SETTLE);
                }
            }
            () = sleep_until_some(drain.close_at) => {
                drain.close_at = None;
                close_gracefully(conn.as_mut(), &mut closing);
                drain.look_from_now(activity);
            }
            () = sleep_until_some(drain.look_at.map(|(at, _)| at)) => {
                // hyper ends a drained HTTP/2 connection once the client acknowledged its
                // PING: one that reads nothing would hold the drain for `drain_timeout`. One
                // whose client has not even sent its preface (TLS with ALPN `h2`, say) would
                // hold it for `header_timeout`, as would any that never sent a request.
                if drain.silent(activity) && (activity.is_idle_h2() || activity.no_request_yet()) {
                    debug!(%peer, "Draining, no request under way and nothing moving on this connection; closing.");
                    break None;
                }
                drain.look_from_now(activity);
            }
            () = &mut check => {
                let now = Instant::now();
                let h2 = activity.is_h2();
                if starved_cut.is_some_and(|cut| cut <= now) {
                    debug!(%peer, "Still open idle_timeout after its graceful close for a starved HTTP/2 stream; closing.");
                    break None;
                }
                // Looked for until found once: then the connection closes, gracefully first.
                let starved = h2
                    && starved_cut.is_none()
                    && starving
                        .get_or_insert_with(|| Box::new(Starving::new(now)))
                        .starved(activity, now, timers.idle);
                if starved {
                    debug!(%peer, "An HTTP/2 stream got no window from its client for idle_timeout; closing gracefully.");
                    close_gracefully(conn.as_mut(), &mut closing);
                    starved_cut = Some(now + timers.idle);
                }
                match activity.due(now, timers) {
                    Due::At(at) => {
                        // An HTTP/2 connection is looked at every `idle / 8` (see `Starving`).
                        let at = if h2 {
                            at.min(now + timers.idle / 8)
                        } else {
                            at
                        };
                        check.as_mut().reset(starved_cut.map_or(at, |cut| at.min(cut)));
                    }
                    Due::SlowHead => {
                        debug!(%peer, "Request head not complete in time; closing.");
                        break None;
                    }
                    Due::Stalled => {
                        debug!(%peer, "Client took nothing for idle_timeout; closing.");
                        break None;
                    }
                    Due::BodyOverdue => {
                        debug!(%peer, "Request body still read request_timeout after its answer; closing.");
                        break None;
                    }
                    Due::Idle if closing => {
                        // Closed gracefully, and still open: an HTTP/2 client that does not
                        // acknowledge the GOAWAY's PING.
                        debug!(%peer, "Connection still open idle_timeout after its graceful close; closing.");
                        break None;
                    }
                    Due::Idle => {
                        debug!(%peer, "Connection idle for idle_timeout; closing.");
                        close_gracefully(conn.as_mut(), &mut closing);
                        // The close flushes first: a client that takes nothing is still cut.
                        check.as_mut().reset(Instant::now() + timers.idle);
                    }
                }
            }
        }
    };
    match result {
        // Cut: a timeout, a flood, a drain that could wait no longer.
        None => activity.cut(),
        Some(Err(error)) => debug!(%peer, %error, "Connection closed with an error."),
        Some(Ok(())) => {}
    }
}

/// How long after the drain signal an idle connection is closed gracefully. Not at once: a request
/// the client sent on an idle keep-alive connection just before the signal may not have been
/// seen by this worker yet (its socket's readiness comes with the next turn of the worker's
/// I/O driver), and hyper closes an idle connection without reading it: the client got a
/// closed connection for a request sent before the signal (10 of 120 did, with the requests
/// sent while veer was stopped by SIGSTOP, then SIGTERM and SIGCONT; none with the settle).
const DRAIN_SETTLE: Duration = Duration::from_millis(50);

/// How long a drained HTTP/2 connection with no stream under way and nothing read or written
/// is left to its client to close (to read the GOAWAY and acknowledge the PING) before veer
/// closes it.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// One connection's drain, from the shutdown signal on.
#[derive(Default)]
struct Drain {
    signalled: bool,
    /// When an idle connection is to be closed gracefully (see [`DRAIN_SETTLE`]).
    close_at: Option<Instant>,
    /// When to look whether the closing connection is left with nothing moving, and how many
    /// reads and writes had moved bytes at the look before.
    look_at: Option<(Instant, u64)>,
}

impl Drain {
    fn look_from_now(&mut self, activity: &Activity) {
        self.look_at = Some((Instant::now() + DRAIN_GRACE, activity.moved()));
    }

    /// Nothing read or written since the last look: a client still taking an answer (its
    /// last bytes may wait in HTTP/2's queues after the exchange is over) is not silent.
    fn silent(&self, activity: &Activity) -> bool {
        self.look_at
            .is_some_and(|(_, moved)| moved == activity.moved())
    }
}

/// Closes `conn` gracefully (in-flight requests finish), once.
fn close_gracefully<C: Graceful>(conn: Pin<&mut C>, closing: &mut bool) {
    if !*closing {
        conn.close_gracefully();
        *closing = true;
    }
}

/// How often at most a listener warns of failing accepts.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Sleeps until `at`, or forever when there is no `at`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How much of an answer an HTTP/2 stream buffers beyond what the client's window lets it send
/// (hyper's default is about 400 KiB: 128 streams of a client that reads nothing held 50 MiB).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// A connection's protocol settings, from the current config.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(server: &ServerConfig) -> Self {
        // Room for a head up to twice the limits, so that veer itself answers one that is over
        // them, with its reason (414 or 431); hyper refuses larger ones (HTTP/1.1: a bare 431).
        let head_room = (server.max_header_bytes.max(server.max_uri_bytes))
            .saturating_mul(2)
            .max(8192);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // hyper's timer would run from the end of the previous response, so it could not
            // tell idling from a slow head: `serve` enforces both.
            .header_read_timeout(None)
            .max_buf_size(head_room)
            // A client that shuts its write side after the request (`nc -N`, socat, scripts)
            // still reads the answer. Such a client cannot be told from one that has gone: that
            // one's request ends at `request_timeout` at the latest.
            .half_close(true)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(head_room).unwrap_or(u32::MAX))
            // NGINX's 128 (HAProxy's 100): each stream may hold an upstream connection and up to
            // `H2_SEND_BUFFER` of its answer while the client takes nothing.
            .max_concurrent_streams(128)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(Some(server.idle_timeout))
            .keep_alive_timeout(Duration::from_secs(20));
        Self { http1, http2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failures every 50 ms for 25 s: warned at the first, then once per 10 s with the count
    /// since the last warning.
    #[test]
    fn accept_failures_are_warned_of_once_per_period_with_their_count() {
        let failures = WarnEvery::new(ACCEPT_WARN_EVERY);
        let start = Instant::now();
        let warnings: Vec<(u64, u64)> = (0..500u64)
            .filter_map(|i| {
                let at = start + Duration::from_millis(50 * i);
                failures.happened(at).map(|n| (i, n))
            })
            .collect();
        assert_eq!(warnings, vec![(0, 1), (200, 200), (400, 200)]);
    }
}
