//! The upstream connection pool of one worker: idle keep-alive HTTP/1.1 connections per
//! endpoint. Connections are made by hyper-util's `HttpConnector` (name resolution, connect
//! timeout, `TCP_NODELAY`, TCP keepalive) and driven by hyper's `client::conn::http1`; this
//! module only keeps the idle ones.
//!
//! Why not hyper-util's legacy `Client`, which pools too: on the request path it cost 15 % of
//! veer's user-space instructions per request (35.8k with it, 30.5k with this pool, `perf stat`
//! on the same build): SipHash of the authority, byte by byte, at every checkout and return; a
//! lazy connect future built and dropped for every request; a task per returned connection.
//! Here a worker's pool is used by that worker's thread only, so its lock is never contended.
//!
//! A slot whose endpoints speak HTTP/2 (`protocol = "h2c"`) gets one HTTP/2 connection per
//! endpoint and worker instead, driven by hyper's `client::conn::http2` in a task of its own,
//! every exchange a stream on it; a closed one is made anew for the next request.
//!
//! The rules for HTTP/1.1:
//! - a connection carries one exchange at a time, and goes back to the pool only when its
//!   request was sent whole and its response body read to the end ([`Lease::release`]); an
//!   exchange that ends early (client gone, timeout, upstream error, upgrade), and a HEAD,
//!   drop their connection instead;
//! - the most recently used idle connection is reused first; one idle for longer than
//!   `upstream_idle_timeout` is never reused, and [`Pool::expire`] (run by every worker each
//!   `upstream_idle_timeout`) closes it;
//! - a request that a reused connection could not even send (the upstream closed it
//!   meanwhile) is sent on the next idle connection or a new one: it never reached the
//!   upstream, so it cannot be duplicated. Once sent, a request is sent again only when it is
//!   a bodiless request of an idempotent method and the connection was closed or reset with no
//!   answer (see [`Replay`]).

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;
use xxhash_rust::xxh3::Xxh3Default;

use super::{BodyState, RequestBody};
use crate::config::Protocol;
use crate::io::Link;

/// A connection's sending half, and what it shares with the connection's reader (see
/// [`crate::io::KeepReading`]): whether its peer stopped taking bytes mid-request (such a
/// connection is never reused, even before hyper has read its end), and whether an answer's
/// head is awaited.
struct Sender {
    inner: http1::SendRequest<RequestBody>,
    link: Arc<Link>,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.inner.is_closed() || self.link.peer_gone.load(Ordering::Relaxed)
    }
}

/// Why an exchange with an upstream failed before its response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Authority,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The client's request body failed (too large, stalled, cut off) and the exchange with
    /// it: the client's doing, not the upstream's. Over HTTP/2 the upstream's error does not
    /// carry the body's (see `BodyState::failure`).
    #[error("request body failed: {0:?}")]
    ClientBody(super::Failure),
    /// An HTTP/2 answer with more than [`super::MAX_FIELDS`] header fields.
    #[error("upstream answered with more than {} header fields", super::MAX_FIELDS)]
    TooManyFields,
}

/// A failed exchange, with the request when it never reached the upstream (no connection could
/// be made): it can be sent to another endpoint.
pub struct Failed {
    pub error: UpstreamError,
    pub unsent: Option<Box<Request<RequestBody>>>,
    /// A copy of an idempotent request without a body that the upstream closed or reset the
    /// connection on before answering (see [`Replay`]): it may be sent once more.
    pub again: Option<Box<Request<RequestBody>>>,
    /// The exchange failed on a connection made for it, not on a reused one that the upstream
    /// may have closed as it idled: the endpoint itself is at fault.
    pub fresh: bool,
}

impl Failed {
    fn unsent(error: UpstreamError, request: Request<RequestBody>) -> Self {
        Failed {
            error,
            unsent: Some(Box::new(request)),
            again: None,
            fresh: true,
        }
    }

    /// `error` on a connection that was `fresh` or not; `replay` when the request may go again.
    fn sent(error: hyper::Error, replay: Option<Replay>, fresh: bool) -> Self {
        let again = replay
            .filter(|_| closed_unanswered(&error))
            .map(|replay| Box::new(replay.into_request()));
        Failed {
            error: error.into(),
            unsent: None,
            again,
            fresh,
        }
    }
}

impl From<UpstreamError> for Failed {
    fn from(error: UpstreamError) -> Self {
        Failed {
            error,
            unsent: None,
            again: None,
            fresh: false,
        }
    }
}

/// Idle connections by endpoint (`host:port`). The names come from the config, not from
/// clients, so a fast hash will do: it is taken twice per request (the take and the return).
type Idle = HashMap<Box<str>, Vec<(Sender, Instant)>, BuildHasherDefault<Xxh3Default>>;

/// How often an upstream HTTP/2 connection with nothing read for that long is sent a PING,
/// and how long its answer may take before the connection is closed as dead.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The flow-control windows veer grants an upstream HTTP/2 connection: each stream may have
/// this much of its answer on the way that its client has not taken yet ...
const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// ... and the connection, all its streams together, this much. Bytes a client has not taken
/// hold the connection's window too (the h2 crate gives both back as the body is read): with
/// hyper's 2 MiB and 5 MiB, three clients that stopped reading a large answer stalled every
/// other stream of the connection until `idle_timeout` cut them. Now it takes 128 of them (as
/// many streams as one HTTP/2 client may have open to veer), or as many as the upstream lets
/// a connection have open at once, whichever is fewer. At most this much of answers is held
/// per connection.
const H2_CONNECTION_WINDOW: u32 = 128 * H2_STREAM_WINDOW;

/// HTTP/2 connections by endpoint: one each, carrying every exchange at once.
type Multiplexed =
    HashMap<Box<str>, Arc<tokio::sync::Mutex<H2Conn>>, BuildHasherDefault<Xxh3Default>>;

/// An endpoint's HTTP/2 connection. Its lock is held while the connection is made, so that the
/// requests of a burst wait for one connection instead of each making its own.
#[derive(Default)]
struct H2Conn {
    /// The connection, numbered (the pool's count of HTTP/2 connections made) so that a
    /// request it failed can ask for another one.
    open: Option<(u64, http2::SendRequest<RequestBody>)>,
    /// When a request last took the connection: one unused for `upstream_idle_timeout` is let
    /// go by [`Pool::expire`] (it closes once the streams under way on it are over).
    used: Option<Instant>,
    /// When making one last failed: the requests that waited for it fail at once too (else
    /// each would wait its own `connect_timeout` in turn, behind the lock).
    failed_at: Option<Instant>,
}

/// One worker's pool. Cheap to share by reference; [`Lease`]s hold it weakly.
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
    multiplexed: Mutex<Multiplexed>,
    h2_made: std::sync::atomic::AtomicU64,
    connector: HttpConnector,
    idle_timeout: Duration,
}

/// What bounds one exchange with an upstream: how large its answer's head (or trailer section)
/// may be, and when it must be over (`request_timeout` from its start; the caller enforces it,
/// the pool only reads it).
#[derive(Clone, Copy)]
pub struct Bounds {
    pub max_head: usize,
    pub deadline: Instant,
}

/// What an exchange holds of its connection: give it back with [`Lease::release`] once the
/// response body has ended; dropping it closes an HTTP/1.1 connection. An HTTP/2 exchange holds
/// only its stream (in its answer's body), and this holds nothing.
pub struct Lease(Option<Held>);

impl Lease {
    /// See [`Held::abandoning_unsent`].
    pub fn abandoning_unsent(self) -> Self {
        Lease(self.0.map(Held::abandoning_unsent))
    }

    /// See [`Held::release`].
    pub fn release(self) {
        if let Some(held) = self.0 {
            held.release();
        }
    }

    /// See [`Held::abandon`].
    pub fn abandon(self) {
        if let Some(held) = self.0 {
            held.abandon();
        }
    }
}

/// An HTTP/1.1 connection carrying one exchange.
struct Held {
    sender: Sender,
    endpoint: Authority,
    pool: Weak<Mutex<Idle>>,
    request: BodyState,
    /// The exchange was a HEAD: its connection is closed, never reused (see [`Pool::send`]).
    head: bool,
    /// The client can be told to stop sending (HTTP/2): see [`Lease::release`].
    abandon_unsent: bool,
}

impl Held {
    /// For a client that can be told to stop sending its request body (HTTP/2: its stream is
    /// reset once veer has discarded what it still sends, see `Unread`).
    fn abandoning_unsent(mut self) -> Self {
        self.abandon_unsent = true;
        self
    }

    /// The response body ended: the connection can carry the next exchange, unless the
    /// request is still being sent (the upstream answered before reading it all). Then, for
    /// an HTTP/2 client, the connection is given up at once: the rest of the request is not
    /// needed, and an upstream that reads nothing more and never closes would hold it, and the
    /// client's stream, for good. For an HTTP/1.1 client it is closed once the request is
    /// through (the client may still be sending, and a connection closed on unread bytes can
    /// cost it the answer; `request_timeout` bounds that wait), and no other request waits.
    fn release(self) {
        if !self.request.ended() {
            if self.abandon_unsent {
                self.abandon();
            }
            return;
        }
        let Some(idle) = self.pool.upgrade() else {
            return;
        };
        if self.head || self.sender.is_closed() {
            return;
        }
        let entry = (self.sender, Instant::now());
        let mut idle = lock(&idle);
        // Look up by `&str` first: the owned key is allocated once per endpoint, not per release.
        match idle.get_mut(self.endpoint.as_str()) {
            Some(list) => list.push(entry),
            None => {
                idle.insert(self.endpoint.as_str().into(), vec![entry]);
            }
        }
    }

    /// The exchange ended early (the client went away mid-answer): the connection is given up
    /// at once, also when it is still sending the request to an upstream that takes nothing.
    fn abandon(self) {
        self.sender.link.abandon();
    }
}

impl Pool {
    pub fn new(connector: HttpConnector, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Arc::default(),
            multiplexed: Mutex::default(),
            h2_made: std::sync::atomic::AtomicU64::new(0),
            connector,
            idle_timeout,
        }
    }

    /// Sends `request` (its URI in origin form) to `endpoint` on an idle connection, or on a
    /// new one when none is left. A new connection refuses an answer head (or trailer section)
    /// over `bounds.max_head` bytes as a protocol error.
    ///
    /// The connection of a HEAD is not reused: many a server sends the body of the GET to a HEAD
    /// too (Python's `http.server` with `do_HEAD = do_GET`), often in a segment of its own that
    /// comes after the answer head, even tens of milliseconds later (Nagle's algorithm waiting
    /// for the ACK). On a reused connection those bytes would be read as the answer to the next
    /// request, someone else's: a 502, or an answer shifted by one. Each HEAD costs a connect
    /// instead (not measured; HEADs are a small share of most traffic).
    ///
    /// To an endpoint of `protocol` HTTP/2, the request goes as a stream of its connection
    /// (see [`Pool::send_h2`]); an upgrade request (a WebSocket) still goes over HTTP/1.1.
    ///
    /// Not an `async fn`: one would hold the request twice in its future (as its argument and
    /// as the local it is moved into), and the future of every request is held by its
    /// connection (HTTP/1.1) or its task (HTTP/2).
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` holds its arguments twice"
    )]
    pub fn send<'a>(
        &'a self,
        endpoint: &'a Authority,
        protocol: Protocol,
        mut request: Request<RequestBody>,
        bounds: Bounds,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), Failed>> + 'a {
        async move {
            if protocol == Protocol::H2c && !request.headers().contains_key(header::UPGRADE) {
                // Boxed: HTTP/1.1 exchanges do not carry its state.
                return Box::pin(self.send_h2(endpoint, request, bounds)).await;
            }
            let body = request.body().state();
            let head = request.method() == Method::HEAD;
            // One copy for the whole call: the request is sent twice at most.
            let mut replay = Replay::of(&request);
            while let Some((mut sender, idle)) = self.checkout(endpoint) {
                if sender.inner.ready().await.is_err() {
                    continue;
                }
                sender.link.awaiting();
                match sender.inner.try_send_request(request).await {
                    Ok(response) => {
                        sender.link.answered();
                        return Ok((response, self.lease(sender, endpoint, body, head)));
                    }
                    Err(mut error) => match error.take_message() {
                        // Not sent: the connection was closed under it. Next one.
                        Some(unsent) => request = unsent,
                        None => {
                            let error = error.into_error();
                            // The keep-alive race: sent again at once, on a new connection.
                            let race = idle >= Replay::IDLE && closed_unanswered(&error);
                            match replay.take() {
                                Some(copy) if race => {
                                    tracing::debug!(%endpoint, %error, "A reused connection closed before its answer; sending the request again on a new one.");
                                    request = copy.into_request();
                                    break;
                                }
                                copy => return Err(Failed::sent(error, copy, false)),
                            }
                        }
                    },
                }
            }
            let mut sender = match self.connect(endpoint, bounds.max_head).await {
                Ok(sender) => sender,
                Err(error) => return Err(Failed::unsent(error, request)),
            };
            sender.link.awaiting();
            match sender.inner.send_request(request).await {
                Ok(response) => {
                    sender.link.answered();
                    Ok((response, self.lease(sender, endpoint, body, head)))
                }
                Err(error) => Err(Failed::sent(error, replay, true)),
            }
        }
    }

    /// Sends `request` as a stream of the endpoint's HTTP/2 connection, made when there is
    /// none (or it closed). A request a connection already open could not take (it closed
    /// meanwhile), and an idempotent bodiless one the upstream refused unprocessed
    /// (`REFUSED_STREAM`, or a GOAWAY that crossed it: RFC 9113 §8.7 says it may go again),
    /// goes once more on a new connection, not counted against the slot: the HTTP/2 form of
    /// the keep-alive race. Otherwise an idempotent bodiless request the upstream dropped
    /// unanswered is handed back to be sent again, as over HTTP/1.1; and an exchange the
    /// client's body failed (too large, stalled, cut off) fails as the client's doing.
    ///
    /// A request still waiting for its answer's head at its deadline (where the exchange drops
    /// it) lets go of its connection for the requests after it, as a timed-out
    /// HTTP/1.1 exchange closes its own: an upstream that stopped answering on it (one process
    /// of several behind a load balancer, wedged) would otherwise hold every request to the
    /// endpoint, while it still answers the connection's PINGs.
    async fn send_h2(
        &self,
        endpoint: &Authority,
        mut request: Request<RequestBody>,
        Bounds { max_head, deadline }: Bounds,
    ) -> Result<(Response<Incoming>, Lease), Failed> {
        h2_form(&mut request, endpoint);
        let body = request.body().state();
        let mut replay = Replay::of(&request);
        let (mut id, mut sender, mut fresh) = match self.multiplexed(endpoint, max_head, None).await
        {
            Ok(conn) => conn,
            Err(error) => return Err(Failed::unsent(error, request)),
        };
        let mut overdue = Overdue {
            pool: self,
            endpoint,
            id,
            deadline,
            answered: false,
        };
        // Whether this is the second connection tried: no third.
        let mut again = false;
        loop {
            let error = match sender.try_send_request(request).await {
                Ok(response) if response.headers().len() > super::MAX_FIELDS => {
                    overdue.answered = true;
                    return Err(UpstreamError::TooManyFields.into());
                }
                Ok(response) => {
                    overdue.answered = true;
                    return Ok((response, Lease(None)));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if fresh || again => {
                        return Err(Failed::unsent(error.into_error().into(), unsent));
                    }
                    Some(unsent) => {
                        request = unsent;
                        error.into_error()
                    }
                    None => {
                        let error = error.into_error();
                        match replay.take() {
                            Some(copy) if !again && refused(&error) => {
                                request = copy.into_request();
                                error
                            }
                            copy => match body.failure() {
                                Some(failure) => {
                                    let mut failed =
                                        Failed::from(UpstreamError::ClientBody(failure));
                                    failed.fresh = fresh;
                                    return Err(failed);
                                }
                                None => return Err(Failed::sent(error, copy, fresh)),
                            },
                        }
                    }
                },
            };
            tracing::debug!(%endpoint, %error, "An HTTP/2 connection closed under a request; sending it on another one.");
            (id, sender, fresh) = match self.multiplexed(endpoint, max_head, Some(id)).await {
                Ok(conn) => conn,
                Err(error) => return Err(Failed::unsent(error, request)),
            };
            overdue.id = id;
            again = true;
        }
    }

    /// Lets go of connection `id` to `endpoint`, if it is still the endpoint's and not being
    /// replaced right now (its lock held): the next request makes a new one (streams under way
    /// on it go on).
    fn forget(&self, endpoint: &Authority, id: u64) {
        let Some(conn) = lock(&self.multiplexed).get(endpoint.as_str()).cloned() else {
            return;
        };
        if let Ok(mut conn) = conn.try_lock() {
            if conn.open.as_ref().is_some_and(|(open, _)| *open == id) {
                conn.open = None;
            }
        };
    }

    /// The endpoint's HTTP/2 connection (its number, and whether it was made for this call),
    /// made when there is none, it closed, or it is connection `failed` (which failed the
    /// request: closed, or going away).
    async fn multiplexed(
        &self,
        endpoint: &Authority,
        max_head: usize,
        failed: Option<u64>,
    ) -> Result<(u64, http2::SendRequest<RequestBody>, bool), UpstreamError> {
        let asked = Instant::now();
        let conn = {
            let mut multiplexed = lock(&self.multiplexed);
            match multiplexed.get(endpoint.as_str()) {
                Some(conn) => Arc::clone(conn),
                None => Arc::clone(multiplexed.entry(endpoint.as_str().into()).or_default()),
            }
        };
        let mut conn = conn.lock().await;
        conn.used = Some(asked);
        if let Some((id, sender)) = &conn.open {
            if !sender.is_closed() && failed != Some(*id) {
                return Ok((*id, sender.clone(), false));
            }
        }
        if conn.failed_at.is_some_and(|at| at >= asked) {
            return Err(UpstreamError::Connect {
                endpoint: endpoint.clone(),
                source: "connecting failed as this request waited for it".into(),
            });
        }
        conn.open = None;
        match self.connect_h2(endpoint, max_head).await {
            Ok(sender) => {
                let id = self.h2_made.fetch_add(1, Ordering::Relaxed);
                conn.open = Some((id, sender.clone()));
                conn.failed_at = None;
                Ok((id, sender, true))
            }
            Err(error) => {
                conn.failed_at = Some(Instant::now());
                Err(error)
            }
        }
    }

    /// A new HTTP/2 connection to `endpoint`; its answers' heads (and trailer sections) may be
    /// up to `max_head` bytes (HPACK-decoded) long.
    async fn connect_h2(
        &self,
        endpoint: &Authority,
        max_head: usize,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.dial(endpoint).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            // A peer gone without a word (its host down, a NAT entry dropped) would otherwise
            // hold every request to the endpoint until `request_timeout`, for as long as the
            // kernel retransmits: the connection closes when a PING goes unanswered.
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "Upstream HTTP/2 connection ended.");
            }
        });
        Ok(sender)
    }

    /// Closes the connections idle for longer than the idle timeout, and lets go of the HTTP/2
    /// connections no request took for that long.
    pub fn expire(&self) {
        let Some(oldest_kept) = Instant::now().checked_sub(self.idle_timeout) else {
            return;
        };
        lock(&self.idle).retain(|_, list| {
            list.retain(|(sender, since)| *since >= oldest_kept && !sender.is_closed());
            !list.is_empty()
        });
        // An HTTP/2 connection whose lock is held is in use (or being made).
        lock(&self.multiplexed).retain(|_, conn| match conn.try_lock() {
            Ok(conn) => conn.used.is_some_and(|used| used >= oldest_kept),
            Err(_) => true,
        });
    }

    /// The most recently used idle connection to `endpoint` that is not past the idle timeout,
    /// and how long it was idle.
    fn checkout(&self, endpoint: &Authority) -> Option<(Sender, Duration)> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(endpoint.as_str())?;
        let now = Instant::now();
        while let Some((sender, since)) = list.pop() {
            let idle = now.saturating_duration_since(since);
            if idle < self.idle_timeout && !sender.is_closed() {
                return Some((sender, idle));
            }
        }
        None
    }

    async fn connect(
        &self,
        endpoint: &Authority,
        max_head: usize,
    ) -> Result<Sender, UpstreamError> {
        let io = crate::io::send_flat(self.dial(endpoint).await?);
        let link = Arc::new(Link::new(max_head));
        let io = TokioIo::new(crate::io::KeepReading::new(io, Arc::clone(&link)));
        let (inner, connection) = http1::Builder::new()
            .max_header_size(max_head)
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "Upstream connection ended.");
            }
        });
        Ok(Sender { inner, link })
    }

    /// A new TCP connection to `endpoint`.
    async fn dial(&self, endpoint: &Authority) -> Result<tokio::net::TcpStream, UpstreamError> {
        let connect_error = |source| UpstreamError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let uri = Uri::builder()
            .scheme("http")
            .authority(endpoint.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| connect_error(e.into()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| connect_error(e.into()))?;
        let io = connector
            .call(uri)
            .await
            .map_err(|e| connect_error(e.into()))?;
        Ok(io.into_inner())
    }

    fn lease(&self, sender: Sender, endpoint: &Authority, request: BodyState, head: bool) -> Lease {
        Lease(Some(Held {
            sender,
            endpoint: endpoint.clone(),
            pool: Arc::downgrade(&self.idle),
            request,
            head,
            abandon_unsent: false,
        }))
    }
}

/// An HTTP/2 request waiting for its answer's head on connection `id`: dropped at or past
/// `deadline` (the exchange timed out), the connection is let go (see [`Pool::send_h2`]).
/// Dropped earlier, the client left: the connection is not to blame.
struct Overdue<'a> {
    pool: &'a Pool,
    endpoint: &'a Authority,
    id: u64,
    deadline: Instant,
    answered: bool,
}

impl Drop for Overdue<'_> {
    fn drop(&mut self) {
        if !self.answered && Instant::now() >= self.deadline {
            tracing::debug!(endpoint = %self.endpoint, "An HTTP/2 request timed out waiting for its answer; its connection is let go.");
            self.pool.forget(self.endpoint, self.id);
        }
    }
}

/// The request as HTTP/2 carries it: the authority it was sent with (its `Host`, else the
/// endpoint) in its URI, for `:authority`, with `:scheme` `http`; no `Host` field (RFC 9113
/// §8.3.1), nor `Connection` (HTTP/2 has no connection-specific fields: a `TE: trailers` stays).
fn h2_form(request: &mut Request<RequestBody>, endpoint: &Authority) {
    let headers = request.headers_mut();
    headers.remove(header::CONNECTION);
    // A request sent once already (to another endpoint, or again) is in this form: its
    // authority is in its URI.
    let authority = headers
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .or_else(|| request.uri().authority().cloned())
        .unwrap_or_else(|| endpoint.clone());
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build();
    if let Ok(uri) = uri {
        *request.uri_mut() = uri;
    }
}

/// The head of a request that may be sent again when the upstream closes or resets its
/// connection before answering. Only a request of an idempotent method (RFC 9110 §9.2.2: GET,
/// HEAD, OPTIONS, TRACE, PUT, DELETE) with no body: sending it twice has the effect of sending
/// it once, and its whole request is in its head. As NGINX (`proxy_next_upstream error`, which
/// resends every method but POST, LOCK and PATCH) does; Go's `net/http` and browsers resend
/// GET, HEAD, OPTIONS and TRACE. Two cases:
/// - a reused connection idle for [`Replay::IDLE`] (10 ms) or longer: the keep-alive race (the
///   upstream's keep-alive timeout ran out as the request arrived; no `is_closed` check before
///   sending can rule it out). Sent again here, on a new connection, and not the upstream's
///   fault;
/// - otherwise the upstream failed the request (it crashed, or its handler dropped the
///   connection): handed back in [`Failed::again`], counted against the slot by the caller, and
///   sent once more there.
///
/// The copy costs about 3 % of a request's instructions (31.3k to 32.2k per HTTP/1.1 request
/// under callgrind; 1.4 % of requests per second in six interleaved `wrk` rounds).
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// Marks a request made from a [`Replay`]: it was sent once already, and is never copied for
/// another try, whichever endpoint or connection it goes to next.
#[derive(Clone, Copy)]
struct SentAgain;

impl Replay {
    const IDLE: Duration = Duration::from_millis(10);

    fn of(request: &Request<RequestBody>) -> Option<Replay> {
        let idempotent = matches!(
            *request.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let first = request.extensions().get::<SentAgain>().is_none();
        (idempotent && first && http_body::Body::is_end_stream(request.body())).then(|| Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        })
    }

    fn into_request(self) -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::ended());
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        request.extensions_mut().insert(SentAgain);
        request
    }
}

/// The upstream closed or reset the connection before any answer (its keep-alive timeout ran
/// out, it crashed, its handler hung up), as opposed to an answer veer could not read (a parse
/// error) or a timeout.
fn closed_unanswered(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    error.is_incomplete_message()
        || error.is_canceled()
        || refused(error)
        || std::error::Error::source(error)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe))
}

/// An HTTP/2 upstream refused the stream, or closed the connection below it with a GOAWAY (h2
/// gives that error only to the streams above the GOAWAY's last stream): it did not process
/// the request (RFC 9113 §8.7).
fn refused(error: &hyper::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .is_some_and(|e| {
            e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
        })
}

/// A poisoned lock still holds a consistent map: every change under it is one push, pop,
/// insert or removal.
fn lock<T>(map: &Mutex<T>) -> MutexGuard<'_, T> {
    map.lock().unwrap_or_else(PoisonError::into_inner)
}
