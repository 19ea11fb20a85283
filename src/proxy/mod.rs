//! The request path, one phase after another (see [`Proxy::handle`]).

pub mod body;
pub mod error;
pub mod headers;
mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use crate::access_log::{AccessLogger, Record};
use crate::config::Compare;
use crate::metrics::SlotMetrics;
use crate::routing::{Decision, Route, RoutingTable};
use crate::upstream::mirror::{self, PrimaryOutcome, ShadowBody, ShadowClient, ShadowJob, Tee};
use crate::upstream::{self, Failure, RequestBody, UpstreamClient};
use body::{Extra, ProxyBody, Tail};
use error::LocalError;
use headers::Forwarded;
use request::{body_too_large, check_request, content_length, effective_authority, strip_port};

/// The downstream connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// The proxy: the routing snapshot, the upstream clients and the access log.
pub struct Proxy {
    pub table: Arc<ArcSwap<RoutingTable>>,
    client: UpstreamClient,
    shadow_client: ShadowClient,
    access_log: Option<AccessLogger>,
}

impl Proxy {
    pub fn new(table: Arc<ArcSwap<RoutingTable>>, access_log: Option<AccessLogger>) -> Self {
        let server = table.load().config.server.clone();
        Self {
            client: upstream::client(&server),
            shadow_client: mirror::client(server.connect_timeout, server.upstream_idle_timeout),
            table,
            access_log,
        }
    }

    /// Handles one request: validate, route, decide, forward, stream back, record.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        // Phase 2: one routing snapshot for the whole request.
        let table = self.table.load_full();
        let server = &table.config.server;
        let (mut parts, body) = req.into_parts();
        // Phase 3: the request itself, then route, bucket and slot.
        if let Err(error) = check_request(&parts, server) {
            return error.response();
        }
        let host = match effective_authority(&parts) {
            Ok(host) => host,
            Err(error) => return error.response(),
        };
        let host_name = host.as_ref().and_then(|h| h.to_str().ok()).map(strip_port);
        let Some(route) = table.find(host_name, parts.uri.path()) else {
            return LocalError::NoRoute.response();
        };
        let decision = route.decide(&parts.headers, conn.peer.ip());
        let metrics = route.shared.slot_metrics(decision.slot);
        let Some(endpoint) = route.endpoint(decision.slot) else {
            return LocalError::NoEndpoint.response();
        };
        if let Some(error) = body_too_large(&parts, server.max_body_bytes) {
            return error.response();
        }
        // Phase 4: the upstream request, and the shadow copy if chosen.
        let tunnelling =
            parts.version == Version::HTTP_11 && headers::wants_upgrade(&parts.headers);
        let downstream_upgrade = if tunnelling {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        headers::to_upstream(
            &mut parts.headers,
            &Forwarded {
                client_ip: conn.peer.ip(),
                tls: conn.tls,
                host: host.as_ref(),
                version: parts.version,
                override_header: route.config.sticky.override_header.as_ref(),
            },
            tunnelling,
        );
        let empty_body = http_body::Body::is_end_stream(&body);
        let (shadow, tee) = match self.shadow_job(route, &decision, &parts, empty_body) {
            Some((job, tee)) => (Some(job), tee),
            None => (None, None),
        };
        if host.is_none() {
            // HTTP/1.0 without Host: the upstream still needs one on HTTP/1.1.
            if let Ok(value) = HeaderValue::from_str(endpoint.as_str()) {
                parts.headers.insert(header::HOST, value);
            }
        }
        parts.uri = upstream_uri(endpoint, &parts.uri);
        parts.version = Version::HTTP_11;
        let log = self.access_log.as_ref().map(|logger| {
            (
                logger.clone(),
                record(route, &decision, &parts, shadow.is_some()),
            )
        });
        let request = Request::from_parts(
            parts,
            RequestBody::new(body, server.max_body_bytes, server.idle_timeout, tee),
        );
        // Phase 5: forward with the deadline.
        let mut pending = Pending::new(metrics);
        let sent = Instant::now();
        let result =
            tokio::time::timeout(server.request_timeout, self.client.request(request)).await;
        let latency = sent.elapsed();
        pending.done();
        let response = match result {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let local = self.failed(route, &decision, &error, latency);
                return self.local_answer(route, &decision, conn, local, shadow);
            }
            Err(_elapsed) => {
                let kind = crate::metrics::ErrorKind::Timeout;
                metrics.record_failure(kind, latency);
                let local = LocalError::Upstream(kind);
                return self.local_answer(route, &decision, conn, local, shadow);
            }
        };
        // Phase 7 (head): record once, for the chosen slot.
        let status = response.status();
        let is_error = route
            .config
            .rollout
            .error_statuses
            .contains(status.as_u16());
        metrics.record_response(status.as_u16(), is_error, latency);
        debug!(route = route.name(), slot = %decision.slot, bucket = decision.bucket, status = status.as_u16(), "Forwarded.");
        // Phase 6: stream the response back.
        let (mut rparts, rbody) = response.into_parts();
        let upgraded = status == StatusCode::SWITCHING_PROTOCOLS && tunnelling;
        if upgraded {
            let upstream_upgrade = rparts.extensions.remove::<OnUpgrade>();
            if let (Some(down), Some(up)) = (downstream_upgrade, upstream_upgrade) {
                tokio::spawn(tunnel(down, up));
            }
        }
        headers::to_client(&mut rparts.headers, upgraded);
        if let Some(id) = decision.new_cookie {
            if let Some(cookie) = set_cookie(route, &id, conn.tls) {
                rparts.headers.append(header::SET_COOKIE, cookie);
            }
        }
        let mut extra: Option<Box<Extra>> = None;
        let primary_hash = match &shadow {
            Some(job) if job.config.compare == Compare::Body => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let hasher = mirror::BodyHasher::new(job.config.max_body_bytes);
                extra.get_or_insert_with(Box::default).hash = Some((hasher, tx));
                Some(rx)
            }
            _ => None,
        };
        if let Some((logger, mut record)) = log {
            record.status = status.as_u16();
            record.upstream_ms = latency.as_secs_f64() * 1000.0;
            extra.get_or_insert_with(Box::default).log = Some((logger, record, started));
        }
        if let Some(mut job) = shadow {
            job.primary_hash = primary_hash;
            let client = self.shadow_client.clone();
            let primary = PrimaryOutcome {
                status: status.as_u16(),
            };
            tokio::spawn(job.run(client, primary));
        }
        let tail = Tail {
            route: Arc::clone(&route.shared),
            slot: decision.slot,
            bytes: 0,
            extra,
            idle: server.idle_timeout,
            timer: None,
        };
        Response::from_parts(rparts, ProxyBody::upstream(rbody, tail))
    }

    /// An exchange that failed before a response head: count it where it belongs, answer.
    fn failed(
        &self,
        route: &Route,
        decision: &Decision,
        error: &hyper_util::client::legacy::Error,
        latency: std::time::Duration,
    ) -> LocalError {
        let metrics = route.shared.slot_metrics(decision.slot);
        let local = match upstream::classify(error) {
            Failure::Upstream(kind) => {
                metrics.record_failure(kind, latency);
                LocalError::Upstream(kind)
            }
            Failure::BodyTooLarge => LocalError::BodyTooLarge,
            Failure::BodyIdle => LocalError::BodyTimeout,
            Failure::ClientAbort => {
                metrics.record_client_abort();
                LocalError::BadRequest("request body aborted")
            }
        };
        debug!(route = route.name(), slot = %decision.slot, %error, status = local.status().as_u16(), "Upstream exchange failed.");
        local
    }

    /// veer's own answer after a failed exchange. The sticky cookie is still set (so the next
    /// request keeps the bucket), and a chosen shadow is still sent when the failure was the
    /// upstream's: its outcome is compared with the status the client got.
    fn local_answer(
        &self,
        route: &Route,
        decision: &Decision,
        conn: ConnInfo,
        local: LocalError,
        shadow: Option<ShadowJob>,
    ) -> Response<ProxyBody> {
        if let (Some(job), error::Fault::Upstream) = (shadow, local.fault()) {
            let primary = PrimaryOutcome {
                status: local.status().as_u16(),
            };
            tokio::spawn(job.run(self.shadow_client.clone(), primary));
        }
        let mut response = local.response();
        if let Some(id) = decision.new_cookie {
            if let Some(cookie) = set_cookie(route, &id, conn.tls) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
        response
    }

    /// Chooses and prepares the shadow copy; counts drops.
    fn shadow_job(
        &self,
        route: &Arc<Route>,
        decision: &Decision,
        parts: &Parts,
        empty_body: bool,
    ) -> Option<(ShadowJob, Option<Box<Tee>>)> {
        let config = route.config.shadow.as_ref()?;
        if decision.shadow_bucket >= config.basis_points || !config.methods.contains(&parts.method)
        {
            return None;
        }
        let stats = &route.shared.shadow;
        if content_length(parts).is_some_and(|len| len > config.max_body_bytes) {
            stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats
                .dropped_body
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        let permit = stats.try_acquire(config.max_in_flight)?;
        let endpoint = route.shadow_endpoint()?;
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
            self.table.load().config.server.request_timeout
        } else {
            config.timeout
        };
        let job = ShadowJob {
            request,
            body,
            permit,
            route: Arc::clone(&route.shared),
            config: config.clone(),
            timeout,
            primary_hash: None,
        };
        Some((job, tee))
    }
}

/// Counts a client abort when the request future is dropped before the upstream answered.
struct Pending<'a> {
    metrics: &'a SlotMetrics,
    done: bool,
}

impl<'a> Pending<'a> {
    fn new(metrics: &'a SlotMetrics) -> Self {
        Self {
            metrics,
            done: false,
        }
    }

    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.record_client_abort();
        }
    }
}

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

/// `Set-Cookie` for a new sticky id. Max-Age comes from `sticky.cookie_max_age` (30 days by
/// default).
fn set_cookie(route: &Route, id: &[u8], tls: bool) -> Option<HeaderValue> {
    let sticky = &route.config.sticky;
    let value = format!(
        "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        sticky.cookie,
        std::str::from_utf8(id).ok()?,
        sticky.cookie_max_age.as_secs(),
        if tls { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&value).ok()
}

fn record(route: &Route, decision: &Decision, parts: &Parts, shadowed: bool) -> Record {
    Record {
        time: SystemTime::now(),
        route: route.name().to_string(),
        slot: decision.slot.as_str(),
        bucket: decision.bucket,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        status: 0,
        upstream_ms: 0.0,
        total_ms: 0.0,
        bytes: 0,
        shadowed,
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
async fn tunnel(down: OnUpgrade, up: OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(error) => {
            debug!(%error, "Upgrade failed.");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(error) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        debug!(%error, "Tunnel closed with an error.");
    }
}
