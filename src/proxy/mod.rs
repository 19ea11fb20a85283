//! The request path, one phase after another (see [`Proxy::handle`]).

pub mod body;
pub mod error;
pub mod headers;
mod request;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::{self, Either, FutureExt};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::access_log::{AccessLogger, Record};
use crate::config::{Compare, ServerConfig};
use crate::listener::InFlight;
use crate::metrics::{Epoch, Sent, SlotMetrics};
use crate::routing::{Decision, Route, RoutingTable, SlotPermit};
use crate::upstream::mirror::{self, PrimaryOutcome, ShadowBody, ShadowClient, ShadowJob, Tee};
use crate::upstream::pool::{Bounds, Failed, Lease, Pool, UpstreamError};
use crate::upstream::{self, BodyState, Failure, RequestBody, Unread};
use crate::Slot;
use body::{Extra, ProxyBody, Tail};
use error::{ClientErrors, LocalError};
use headers::Forwarded;
use request::{
    body_too_large, check_request, content_length, discard_unread, effective_authority, strip_port,
};

/// An upstream's answer to a request, and the connection it came on; or why there is none.
type Answer = Result<(Response<Incoming>, Lease), UpstreamError>;

/// The downstream connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address as `X-Forwarded-For` gives it, made once per connection.
    pub forwarded_for: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        ConnInfo {
            peer,
            tls,
            forwarded_for: headers::client_address(peer.ip()),
        }
    }
}

/// The proxy of one worker: the routing snapshot, the upstream pool, the shadow client and
/// the access log.
pub struct Proxy {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pool: Pool,
    shadow_client: ShadowClient,
    access_log: Option<AccessLogger>,
    client_errors: Arc<ClientErrors>,
}

impl Proxy {
    pub fn new(
        table: Arc<ArcSwap<RoutingTable>>,
        access_log: Option<AccessLogger>,
        client_errors: Arc<ClientErrors>,
    ) -> Self {
        let server = table.load().config.server.clone();
        Self {
            pool: upstream::pool(&server),
            shadow_client: mirror::client(server.connect_timeout, server.upstream_idle_timeout),
            table,
            access_log,
            client_errors,
        }
    }

    /// Counts an answer of veer's own for the client's fault given outside the request path
    /// (plain HTTP on a TLS listener).
    pub fn count_client_error(&self, error: LocalError) {
        self.client_errors.count(error);
    }

    /// Closes the upstream connections idle for longer than `upstream_idle_timeout`.
    pub fn expire_idle(&self) {
        self.pool.expire();
    }

    /// Handles one request: validate, route, decide, forward, stream back, record.
    ///
    /// `reading` is held by the request body as it goes upstream, until the body ends or is
    /// dropped (the connection counts the exchange as under way until then). `started`: when
    /// the request arrived.
    ///
    /// Not an `async fn`, and it owns the proxy and the connection's details rather than
    /// borrow them: the future of every request is held by its connection (HTTP/1.1) or is
    /// the task of its stream (HTTP/2). An `async fn` would hold the request twice (as its
    /// argument and as the local it is moved into), and a caller's `async` block that owned
    /// what it borrowed would hold them all once more.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` holds its arguments twice"
    )]
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
        reading: Option<InFlight>,
        started: Instant,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        async move {
            let proxy: &Proxy = &self;
            let conn = &conn;
            // Phase 2: one routing snapshot for the whole request.
            let table = proxy.table.load_full();
            let server = &table.config.server;
            // A block of its own: the request's head, once moved into the upstream request, is
            // not kept in the future.
            let (mut exchange, endpoint, request) = {
                let (parts, body) = req.into_parts();
                // Phase 3: the request itself, then route, bucket and slot.
                let (route, decision, host) = match route_request(&table, &parts, conn) {
                    Ok(routed) => routed,
                    Err(error) => {
                        discard_unread(parts.version, body);
                        return proxy.unrouted_answer(&parts, error, started);
                    }
                };
                // Phase 4: the upstream request, and the shadow copy if chosen.
                let mut exchange = Exchange {
                    route,
                    decision,
                    conn,
                    started,
                    idle: server.idle_timeout,
                    tunnel_idle: server.tunnel_idle_timeout,
                    // One deadline for the whole exchange: response head and body.
                    deadline: started + server.request_timeout,
                    tunnelling: false,
                    http10: parts.version == Version::HTTP_10,
                    http2: parts.version == Version::HTTP_2,
                    downstream_upgrade: None,
                    shadow: None,
                    body_state: BodyState::default(),
                    log: proxy
                        .access_log
                        .as_ref()
                        .map(|logger| (logger.clone(), record(route, &decision, &parts))),
                    permit: None,
                };
                match proxy.upstream_request(&mut exchange, parts, (body, reading), host, server) {
                    Ok((endpoint, request)) => (exchange, endpoint, request),
                    Err(error) => return proxy.local_answer(exchange, error, Duration::ZERO),
                }
            };
            let (route, decision) = (exchange.route, exchange.decision);
            // Phase 5: forward with the deadline.
            let metrics = route.shared.slot_metrics(decision.slot);
            let sent = Instant::now();
            let pending = Pending::new(route, metrics, &mut exchange.log, started, sent);
            let bounds = Bounds {
                max_head: server.max_header_bytes,
                deadline: exchange.deadline,
            };
            let slot = decision.slot;
            let protocol = route.config.slot(slot).protocol;
            let sending = proxy.pool.send(endpoint, protocol, request, bounds);
            // Combinators, not a second `.await`: the answer of a first try would be held
            // while the rare second one is waited for, and take room in every request's future.
            let forwarding = FutureExt::then(sending, move |first| match first {
                Ok(answer) => Either::Left(future::ready((Ok(answer), None))),
                // Out of line: the rare path must not grow every request's future.
                Err(failed) => Either::Right(Box::pin(
                    proxy.recover_from(route, slot, endpoint, failed, bounds, sent),
                )),
            });
            let deadline = exchange.deadline;
            let (result, dropped_after) = match tokio::time::timeout_at(deadline, forwarding).await
            {
                Ok((answer, dropped_after)) => (Ok(answer), dropped_after),
                Err(elapsed) => (Err(elapsed), None),
            };
            if let Some(dropped_after) = dropped_after {
                // The upstream dropped the request before answering, and it went once more and
                // was answered: the drop still counts against the slot, as a failed request of
                // its own (the judge must see an upstream that drops requests). When the
                // request failed again, it counts once, as any, with its last failure. (A
                // connection closed or reset before any answer is a `reset`, as
                // `upstream::classify` has it.)
                let reset = crate::metrics::ErrorKind::Reset;
                metrics.record_failure(pending.epoch(), reset, dropped_after);
            }
            let latency = sent.elapsed();
            let epoch = pending.done();
            match result {
                // A 101 answers only an upgrade request (RFC 9110 §15.2.2), and HTTP/2 has none:
                // an upstream that switches protocols unasked sent an invalid answer. So did one
                // whose body has a coding besides chunked (`gzip, chunked`): its label would be
                // lost with the framing, and the client would take the coded bytes as the body.
                // (An answer without a body, to HEAD or a 304, may name any coding.)
                Ok(Ok((response, _lease)))
                    if (response.status() == StatusCode::SWITCHING_PROTOCOLS
                        && !exchange.tunnelling)
                        || (headers::other_coding_than_chunked(response.headers())
                            && !http_body::Body::is_end_stream(response.body())) =>
                {
                    let kind = crate::metrics::ErrorKind::Protocol;
                    metrics.record_failure(epoch, kind, latency);
                    proxy.local_answer(exchange, LocalError::Upstream(kind), latency)
                }
                Ok(Ok((response, lease))) => {
                    proxy.respond(exchange, response, lease, latency, epoch)
                }
                Ok(Err(error)) => {
                    let local = failed(route, &decision, epoch, &error, latency);
                    proxy.local_answer(exchange, local, latency)
                }
                // The deadline passed while the upstream was waiting for the client's body: the
                // client's fault (408), not the slot's.
                Err(_elapsed) if exchange.body_state.is_waiting() => {
                    proxy.local_answer(exchange, LocalError::BodyTimeout, latency)
                }
                Err(_elapsed) => {
                    let kind = crate::metrics::ErrorKind::Timeout;
                    metrics.record_failure(epoch, kind, latency);
                    proxy.local_answer(exchange, LocalError::Upstream(kind), latency)
                }
            }
        }
    }

    /// Phase 5, after the first try of `endpoint` failed. A request that reached no upstream
    /// goes to the slot's other endpoints (see [`Proxy::recover`]); an idempotent request
    /// without a body that the upstream dropped before answering goes once more (see
    /// [`Proxy::send_again`]); when that resend is answered, the answer comes with how long
    /// after `sent` the drop came.
    async fn recover_from(
        &self,
        route: &Route,
        slot: Slot,
        endpoint: &Authority,
        failed: Failed,
        bounds: Bounds,
        sent: Instant,
    ) -> (Answer, Option<Duration>) {
        match self.recover(route, slot, endpoint, failed, bounds).await {
            Ok(answer) => (Ok(answer), None),
            Err(Failed {
                error,
                again: Some(again),
                ..
            }) => {
                let dropped_after = sent.elapsed();
                debug!(route = route.name(), %slot, %error, "The upstream dropped an idempotent request before answering; sending it once more.");
                let answer = self.send_again(route, slot, *again, error, bounds).await;
                let dropped = answer.is_ok().then_some(dropped_after);
                (answer, dropped)
            }
            Err(failed) => (Err(failed.error), None),
        }
    }

    /// Phase 5, after `endpoint` failed an exchange: a request no connection could be made
    /// for goes to the slot's other endpoints in turn; an endpoint that reset the exchange on
    /// a connection made for it is passed over.
    async fn recover(
        &self,
        route: &Route,
        slot: Slot,
        endpoint: &Authority,
        failed: Failed,
        bounds: Bounds,
    ) -> Result<(Response<Incoming>, Lease), Failed> {
        match failed {
            Failed {
                error,
                unsent: Some(unsent),
                ..
            } => {
                self.next_endpoints(route, slot, endpoint, unsent, error, bounds)
                    .await
            }
            failed => {
                pass_over_if_reset(route, slot, endpoint, failed.fresh, &failed.error);
                Err(failed)
            }
        }
    }

    /// Phase 5, when no connection could be made to `refused` for `request`: the request
    /// reached no upstream, so it goes to the slot's other endpoints in turn (each at most
    /// once), and an endpoint that refused is passed over for a while.
    async fn next_endpoints(
        &self,
        route: &Route,
        slot: Slot,
        mut refused: &Authority,
        mut request: Box<Request<RequestBody>>,
        mut error: UpstreamError,
        bounds: Bounds,
    ) -> Result<(Response<Incoming>, Lease), Failed> {
        for _ in 1..route.endpoint_count(slot) {
            route.eject(slot, refused);
            let Some(next) = route.endpoint(slot) else {
                break;
            };
            debug!(route = route.name(), %slot, %error, %next, "Cannot connect; trying the slot's next endpoint.");
            let protocol = route.config.slot(slot).protocol;
            match self.pool.send(next, protocol, *request, bounds).await {
                Ok(answer) => return Ok(answer),
                Err(Failed {
                    error: failed,
                    unsent: Some(unsent),
                    ..
                }) => (refused, request, error) = (next, unsent, failed),
                Err(failed) => {
                    pass_over_if_reset(route, slot, next, failed.fresh, &failed.error);
                    return Err(failed);
                }
            }
        }
        route.eject(slot, refused);
        Err(error.into())
    }

    /// Phase 5 once more, for an idempotent request without a body that the upstream failed
    /// before answering (`error`): to the slot's next endpoint in turn (the same one when it is
    /// the only one, or the others are passed over); when no connection can be made there, on
    /// to the others as for any request. The request is marked as sent again: it is never handed
    /// back for another try (see `pool::Replay`).
    async fn send_again(
        &self,
        route: &Route,
        slot: Slot,
        request: Request<RequestBody>,
        error: UpstreamError,
        bounds: Bounds,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let Some(next) = route.endpoint(slot) else {
            return Err(error);
        };
        let protocol = route.config.slot(slot).protocol;
        let answered = match self.pool.send(next, protocol, request, bounds).await {
            Err(failed) => self.recover(route, slot, next, failed, bounds).await,
            answered => answered,
        };
        answered.map_err(|failed| failed.error)
    }

    /// Phase 4: rewrites the request for the chosen slot's next endpoint, prepares the shadow
    /// copy, and wraps the body (size cap, idle timeout, tee).
    fn upstream_request<'a>(
        &self,
        exchange: &mut Exchange<'a>,
        mut parts: Parts,
        (body, reading): (Incoming, Option<InFlight>),
        host: Option<HeaderValue>,
        server: &ServerConfig,
    ) -> Result<(&'a Authority, Request<RequestBody>), LocalError> {
        let route = exchange.route;
        let checked = route
            .endpoint(exchange.decision.slot)
            .ok_or(LocalError::NoEndpoint)
            .and_then(|endpoint| {
                body_too_large(&parts, server.max_body_bytes).map_or(Ok(endpoint), Err)
            })
            .and_then(|endpoint| admit(exchange).map(|()| endpoint));
        let endpoint = match checked {
            Ok(endpoint) => endpoint,
            Err(error) => {
                discard_unread(parts.version, body);
                return Err(error);
            }
        };
        exchange.tunnelling =
            parts.version == Version::HTTP_11 && headers::wants_upgrade(&parts.headers);
        if exchange.tunnelling {
            exchange.downstream_upgrade = parts.extensions.remove::<OnUpgrade>();
        }
        let forwarded = Forwarded {
            client: &exchange.conn.forwarded_for,
            tls: exchange.conn.tls,
            host: host.as_ref(),
            version: parts.version,
            override_header: route.config.sticky.override_header.as_ref(),
        };
        headers::to_upstream(&mut parts.headers, &forwarded, exchange.tunnelling);
        let empty_body = http_body::Body::is_end_stream(&body);
        if empty_body && needs_length(&parts) {
            // An HTTP/2 request ended with its head: said in HTTP/1.1, a POST with no length has
            // no body, which some servers refuse (411). RFC 9110 §8.6: send `Content-Length: 0`.
            // Before the shadow's copy of the head is taken: it goes to such a server too.
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        // An upgrade is not mirrored: its copy could only open a second tunnel.
        let shadow = (!exchange.tunnelling)
            .then(|| self.shadow_job(route, &parts, empty_body, server))
            .flatten();
        let tee = match shadow {
            Some((job, tee)) => {
                exchange.shadow = Some(job);
                tee
            }
            None => None,
        };
        if host.is_none() {
            // HTTP/1.0 without Host: the upstream still needs one on HTTP/1.1.
            if let Ok(value) = HeaderValue::from_str(endpoint.as_str()) {
                parts.headers.insert(header::HOST, value);
            }
        }
        parts.uri = origin_form(std::mem::take(&mut parts.uri));
        let body = Unread::new(body, parts.version == Version::HTTP_2);
        parts.version = Version::HTTP_11;
        if let Some((_, record)) = &mut exchange.log {
            record.shadowed = exchange.shadow.is_some();
        }
        let body = RequestBody::new(
            body,
            server.max_body_bytes,
            server.idle_timeout,
            tee,
            reading,
        )
        .without_override(route.config.sticky.override_header.as_ref());
        exchange.body_state = body.state();
        Ok((endpoint, Request::from_parts(parts, body)))
    }

    /// Phases 6 and 7: record the answer once for the chosen slot (a request sent upstream in
    /// `epoch`, answered after `latency`), rewrite its headers, start the tunnel or the shadow,
    /// and stream the body back.
    fn respond(
        &self,
        exchange: Exchange<'_>,
        response: Response<Incoming>,
        lease: Lease,
        latency: std::time::Duration,
        epoch: Epoch,
    ) -> Response<ProxyBody> {
        let Exchange {
            route,
            decision,
            conn,
            started,
            idle,
            tunnel_idle,
            deadline,
            tunnelling: _,
            http10,
            http2,
            downstream_upgrade,
            shadow,
            mut log,
            body_state: _,
            mut permit,
        } = exchange;
        let status = response.status();
        let is_error = route
            .config
            .rollout
            .error_statuses
            .contains(status.as_u16());
        let metrics = route.shared.slot_metrics(decision.slot);
        metrics.record_response(epoch, status.as_u16(), is_error, latency);
        debug!(route = route.name(), slot = %decision.slot, bucket = decision.bucket, status = status.as_u16(), "Forwarded.");
        let (mut rparts, rbody) = response.into_parts();
        let via = headers::via(rparts.version);
        // veer answers in its own HTTP version, whatever the upstream spoke: an HTTP/1.0
        // upstream must not turn a keep-alive HTTP/1.1 client into a close-delimited one
        // (hyper still answers HTTP/1.0 clients in HTTP/1.0, and HTTP/2 ones in HTTP/2).
        rparts.version = Version::HTTP_11;
        // Only a 101 the request asked for gets here (`handle` turns any other into a 502).
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if switched {
            // The tunnel's line is written when the tunnel ends, with its bytes and duration.
            let log = log.take().map(|(logger, mut record)| {
                record.status = status.as_u16();
                record.upstream_ms = millis(latency);
                (logger, record, started)
            });
            let line = tunnel::Line::new(log, permit.take());
            let upstream_upgrade = rparts.extensions.remove::<OnUpgrade>();
            if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
                tokio::spawn(tunnel::run(down, up, tunnel_idle, line));
            }
        }
        headers::to_client(status, &mut rparts.headers, switched);
        rparts.headers.append(header::VIA, via);
        if http10 && !rparts.headers.contains_key(header::CONTENT_LENGTH) {
            // An HTTP/1.0 client has no chunked framing: a body without a length ends with
            // the connection. Answered as HTTP/1.0, hyper closes it without announcing
            // keep-alive (as an HTTP/1.1 answer, it would announce it, then close).
            rparts.version = Version::HTTP_10;
        }
        add_cookie(&mut rparts.headers, route, &decision, conn);
        let mut extra: Option<Box<Extra>> = None;
        if let Some(mut job) = shadow {
            if job.config.compare == Compare::Body {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let hasher = mirror::BodyHasher::new(job.config.max_body_bytes);
                extra.get_or_insert_with(Box::default).hash = Some((hasher, tx));
                job.primary_hash = Some(rx);
            }
            let primary = PrimaryOutcome {
                status: status.as_u16(),
            };
            tokio::spawn((*job).run(self.shadow_client.clone(), primary));
        }
        if let Some((logger, mut record)) = log {
            record.status = status.as_u16();
            record.upstream_ms = millis(latency);
            extra.get_or_insert_with(Box::default).log = Some((logger, record, started));
        }
        // The connection goes back to the pool once the body has been read to its end; after a
        // 101 it belongs to the tunnel (or to nobody).
        let lease = match (switched, http2) {
            (true, _) => None,
            (false, true) => Some(lease.abandoning_unsent()),
            (false, false) => Some(lease),
        };
        let mut tail = Tail {
            route: Arc::clone(&route.shared),
            slot: decision.slot,
            epoch,
            bytes: 0,
            extra,
            idle,
            deadline,
            handed: None,
            timer: None,
            lease,
            permit,
            over: false,
        };
        if http_body::Body::is_end_stream(&rbody) {
            // Nothing to stream (HEAD, 204, 304, 101): the body is over now, its connection
            // free again, its hash (an empty body's) ready for the shadow's comparison.
            tail.end();
        } else if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
            // A 204 or 304 has no body (RFC 9110 §15.3.5, §15.4.5), but an HTTP/2 upstream can
            // still send DATA after it (HTTP/1.1's parser reads none): dropped, its stream
            // reset, as hyper drops it for an HTTP/1.1 client. Handed on, it went out to an
            // HTTP/2 client after a head without END_STREAM, which breaks the client's stream.
            tail.end();
            drop(rbody);
            return Response::from_parts(rparts, ProxyBody::local(bytes::Bytes::new()));
        }
        Response::from_parts(rparts, ProxyBody::upstream(rbody, tail))
    }

    /// veer's own answer when the exchange failed or could not start (`upstream` is how long
    /// the upstream was waited for). The sticky cookie is still set (so the next request keeps
    /// the bucket), and a chosen shadow is still sent when the failure was the upstream's: its
    /// outcome is compared with the status the client got.
    fn local_answer(
        &self,
        exchange: Exchange<'_>,
        local: LocalError,
        upstream: Duration,
    ) -> Response<ProxyBody> {
        if let (Some(job), error::Fault::Upstream) = (exchange.shadow, local.fault()) {
            let primary = PrimaryOutcome {
                status: local.status().as_u16(),
            };
            tokio::spawn((*job).run(self.shadow_client.clone(), primary));
        }
        self.client_errors.count(local);
        let mut response = local.response();
        add_cookie(
            response.headers_mut(),
            exchange.route,
            &exchange.decision,
            exchange.conn,
        );
        if let Some((logger, mut record)) = exchange.log {
            record.upstream_ms = millis(upstream);
            if local == LocalError::BodyAborted {
                logged_gone(&logger, record, exchange.started);
            } else {
                logged(&logger, record, &response, exchange.started);
            }
        }
        response
    }

    /// veer's own answer to a request that has no route (a 404, or a request refused before
    /// routing); logged without route, slot or bucket.
    fn unrouted_answer(
        &self,
        parts: &Parts,
        local: LocalError,
        started: Instant,
    ) -> Response<ProxyBody> {
        self.client_errors.count(local);
        let response = local.response();
        if let Some(logger) = &self.access_log {
            let record = Record::new(None, None, parts.method.as_str(), parts.uri.path());
            logged(logger, record, &response, started);
        }
        response
    }

    /// Chooses and prepares the shadow copy; counts drops.
    fn shadow_job(
        &self,
        route: &Route,
        parts: &Parts,
        empty_body: bool,
        server: &ServerConfig,
    ) -> Option<(Box<ShadowJob>, Option<Box<Tee>>)> {
        let config = route.config.shadow.as_ref()?;
        // A draw per request: `percent` is a share of requests, whoever sends them.
        if !config.methods.contains(&parts.method)
            || crate::routing::sticky::random_bucket() >= config.basis_points
        {
            return None;
        }
        let stats = &route.shared.shadow;
        let count = |counter: &std::sync::atomic::AtomicU64| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        count(&stats.requests);
        if content_length(parts).is_some_and(|len| len > config.max_body_bytes) {
            count(&stats.dropped_body);
            return None;
        }
        // Every endpoint rests after refusing a connection: the copy is the shadow's error.
        let Some((endpoint, rest)) = route.shadow_endpoint() else {
            count(&stats.errors);
            return None;
        };
        let permit = stats.try_acquire(config.max_in_flight)?;
        let (body, tee) = if empty_body {
            (ShadowBody::Empty, None)
        } else {
            let (tee, rx) = Tee::new(config.max_body_bytes);
            (ShadowBody::Teed(rx), Some(tee))
        };
        let mut request = Request::new(());
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = upstream_uri(endpoint, &parts.uri);
        *request.headers_mut() = parts.headers.clone();
        mirror::mark(&mut request);
        if let Some(suffix) = &config.host_suffix {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            if let Some(value) =
                host.and_then(|h| HeaderValue::from_str(&format!("{h}{suffix}")).ok())
            {
                request.headers_mut().insert(header::HOST, value);
            }
        }
        let timeout = if config.timeout.is_zero() {
            server.request_timeout
        } else {
            config.timeout
        };
        let job = Box::new(ShadowJob {
            request,
            body,
            permit,
            route: Arc::clone(&route.shared),
            rest: Arc::clone(rest),
            config: config.clone(),
            timeout,
            primary_hash: None,
        });
        Some((job, tee))
    }
}

/// One request's context from routing to the response.
struct Exchange<'a> {
    route: &'a Route,
    decision: Decision,
    conn: &'a ConnInfo,
    started: Instant,
    /// How long the upstream's response body may send nothing.
    idle: std::time::Duration,
    /// How long a tunnel may carry nothing.
    tunnel_idle: std::time::Duration,
    /// When the exchange with the upstream must be over (`request_timeout`).
    deadline: Instant,
    tunnelling: bool,
    /// The client speaks HTTP/1.0.
    http10: bool,
    /// The client speaks HTTP/2: it can be told to stop sending a body no longer needed.
    http2: bool,
    downstream_upgrade: Option<OnUpgrade>,
    /// Boxed: most requests have none, and every request's future would carry its room.
    shadow: Option<Box<ShadowJob>>,
    /// Where the request body stands (waiting for the client: a timeout is its fault).
    body_state: BodyState,
    log: Option<(AccessLogger, Record)>,
    /// The request's place under the slot's `max_in_flight`, held to the end of its answer.
    permit: Option<SlotPermit>,
}

/// Phase 4, once the request passed its own checks: its place under the slot's
/// `max_in_flight`, held in the exchange to the end of its answer; past the limit, veer's own
/// 503, an `overload` failure of the slot (SPEC: "503 ... overload").
fn admit(exchange: &mut Exchange<'_>) -> Result<(), LocalError> {
    let (route, slot) = (exchange.route, exchange.decision.slot);
    let max = route.config.slot(slot).max_in_flight;
    if max == 0 {
        return Ok(());
    }
    exchange.permit = route.shared.admit(slot, max);
    if exchange.permit.is_some() {
        return Ok(());
    }
    let kind = crate::metrics::ErrorKind::Overload;
    let metrics = route.shared.slot_metrics(slot);
    // As for a request sent (see `Pending::new`): the epoch first, then the table.
    let epoch = metrics.epoch();
    let epoch = if route.is_current() {
        epoch
    } else {
        Epoch::PAST
    };
    metrics.record_failure(epoch, kind, Duration::ZERO);
    Err(LocalError::Upstream(kind))
}

/// Phase 3: the request's own checks, its route, and the slot decision.
fn route_request<'t>(
    table: &'t RoutingTable,
    parts: &Parts,
    conn: &ConnInfo,
) -> Result<(&'t Route, Decision, Option<HeaderValue>), LocalError> {
    check_request(parts, &table.config.server)?;
    let host = effective_authority(parts)?;
    let host_name = host.as_ref().and_then(|h| h.to_str().ok()).map(strip_port);
    let route = table
        .route_for(host_name, parts.uri.path())
        .map_err(|_| LocalError::BadRequest("path with both '//' and a '.' or '..' segment"))?
        .ok_or(LocalError::NoRoute)?;
    let decision = route.decide(&parts.headers, conn.peer.ip());
    Ok((route, decision, host))
}

/// Whether a request with no body is to say so with `Content-Length: 0`: one whose method gives
/// content a meaning (not GET, HEAD, DELETE, OPTIONS, TRACE or CONNECT) and that has no length.
fn needs_length(parts: &Parts) -> bool {
    const BODILESS: [http::Method; 6] = [
        http::Method::GET,
        http::Method::HEAD,
        http::Method::DELETE,
        http::Method::OPTIONS,
        http::Method::TRACE,
        http::Method::CONNECT,
    ];
    !BODILESS.contains(&parts.method) && !parts.headers.contains_key(header::CONTENT_LENGTH)
}

/// An exchange that failed before a response head: count it where it belongs, answer.
fn failed(
    route: &Route,
    decision: &Decision,
    epoch: Epoch,
    error: &UpstreamError,
    latency: std::time::Duration,
) -> LocalError {
    let metrics = route.shared.slot_metrics(decision.slot);
    let local = match upstream::classify(error) {
        Failure::Upstream(kind) => {
            metrics.record_failure(epoch, kind, latency);
            if let Some(failed) = metrics.failure_to_warn() {
                warn!(route = %route.name(), slot = %decision.slot, kind = %kind.as_str(), %error, failed, "Upstream exchange failed (told at most every 10 s per slot; `failed` counts since the last time).");
            }
            LocalError::Upstream(kind)
        }
        Failure::BodyTooLarge => LocalError::BodyTooLarge,
        Failure::BodyIdle => LocalError::BodyTimeout,
        Failure::ClientAbort => {
            metrics.record_client_abort();
            LocalError::BodyAborted
        }
        Failure::BodyMalformed => LocalError::BadRequest("malformed request body"),
    };
    debug!(route = route.name(), slot = %decision.slot, %error, status = local.status().as_u16(), "Upstream exchange failed.");
    local
}

/// An endpoint that reset an exchange on a connection made for it, before its answer, is
/// passed over for a while, as one that refused a connection is (a reused connection the
/// upstream closed as it idled says nothing about the endpoint).
fn pass_over_if_reset(
    route: &Route,
    slot: Slot,
    endpoint: &Authority,
    fresh: bool,
    error: &UpstreamError,
) {
    let reset = Failure::Upstream(crate::metrics::ErrorKind::Reset);
    if fresh && upstream::classify(error) == reset {
        route.eject(slot, endpoint);
    }
}

/// Sets veer's sticky cookie when the decision drew a new id.
fn add_cookie(headers: &mut http::HeaderMap, route: &Route, decision: &Decision, conn: &ConnInfo) {
    if let Some(id) = decision.new_cookie {
        if let Some(cookie) = route.set_cookie(&id, conn.tls) {
            headers.append(header::SET_COOKIE, cookie);
        }
    }
}

/// The request while the upstream is waited for: counted as waiting (the controller sees a
/// hanging canary by it); when the request future is dropped before the upstream answered,
/// counts a client abort and logs the request with status 499 (the client went away, as
/// NGINX logs it).
struct Pending<'a> {
    metrics: &'a SlotMetrics,
    /// Counted as waiting for its answer until dropped.
    sent: Option<Sent>,
    done: bool,
    /// The exchange's access-log line, borrowed (not moved) while the upstream is waited for.
    log: &'a mut Option<(AccessLogger, Record)>,
    started: Instant,
    /// When the request went upstream: a client gone meanwhile is logged with the wait.
    sent_at: Instant,
}

impl<'a> Pending<'a> {
    fn new(
        route: &Route,
        metrics: &'a SlotMetrics,
        log: &'a mut Option<(AccessLogger, Record)>,
        started: Instant,
        sent: Instant,
    ) -> Self {
        let counted = metrics.sent(sent);
        // Asked after the epoch was read (see `SlotMetrics::sent`): a request routed by the
        // old table and sent after the reload's reconcile began the new build's epoch is
        // seen here too.
        let counted = if route.is_current() {
            counted
        } else {
            metrics.outside_steps(counted)
        };
        Self {
            metrics,
            sent: Some(counted),
            done: false,
            log,
            started,
            sent_at: sent,
        }
    }

    /// The epoch the request was sent in.
    fn epoch(&self) -> Epoch {
        self.sent.as_ref().map_or(Epoch::CURRENT, Sent::epoch)
    }

    /// The upstream answered or failed: the epoch the request was sent in.
    fn done(mut self) -> Epoch {
        self.done = true;
        self.epoch()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(sent) = self.sent.take() {
            self.metrics.answered(sent);
        }
        if self.done {
            return;
        }
        self.metrics.record_client_abort();
        if let Some((logger, mut record)) = self.log.take() {
            record.upstream_ms = millis(self.sent_at.elapsed());
            logged_gone(&logger, record, self.started);
        }
    }
}

/// The access log's status for a client that went away before the answer.
const CLIENT_WENT_AWAY: u16 = 499;

/// The request target as an origin server expects it: path and query only (an HTTP/1.1
/// request in origin form is passed through as it is).
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
}

/// An absolute URI on `endpoint` (for the shadow client, which connects by URI).
fn upstream_uri(endpoint: &Authority, uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint.clone());
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn record(route: &Route, decision: &Decision, parts: &Parts) -> Record {
    Record::new(
        Some(route.name()),
        Some((decision.slot, decision.bucket)),
        parts.method.as_str(),
        parts.uri.path(),
    )
}

/// Logs a local answer, whose body is all there is to send.
fn logged(
    logger: &AccessLogger,
    mut record: Record,
    response: &Response<ProxyBody>,
    started: Instant,
) {
    record.status = response.status().as_u16();
    record.total_ms = millis(started.elapsed());
    record.bytes = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    logger.log(record);
}

/// Logs a request whose client went away before its answer, with status 499.
fn logged_gone(logger: &AccessLogger, mut record: Record, started: Instant) {
    record.status = CLIENT_WENT_AWAY;
    record.total_ms = millis(started.elapsed());
    logger.log(record);
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
