//! Where a shadow is sent or dropped.
//!
//! A mirrored request is chosen on the request path (a draw, a method check, a concurrency
//! permit) and copied cheaply (headers; the body is teed frame by frame up to a cap, by
//! reference-counted `Bytes`, never delaying the primary). After the primary's response head
//! arrives, a detached task sends the copy to the shadow with its own client, pool and timeout,
//! reads (and optionally hashes) the answer, compares it with the primary and counts the outcome.
//! Nothing in here can delay, fail or change the primary.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;
use xxhash_rust::xxh3::Xxh3;

use crate::config::{Compare, ShadowConfig};
use crate::metrics::{Epoch, ErrorKind};
use crate::routing::{PassedOver, RouteShared};

pub type ShadowClient = Client<HttpConnector, Full<Bytes>>;

/// The header that marks a shadow copy.
pub const SHADOW_HEADER: &str = "x-veer-shadow";

/// Removes veer's own fields a client sent (the shadow marker, the route's override header):
/// they reach no upstream from a client, in the head or in the trailers.
pub fn remove_own_fields(fields: &mut http::HeaderMap, override_header: Option<&http::HeaderName>) {
    if let Some(name) = override_header {
        fields.remove(name);
    }
    fields.remove(SHADOW_HEADER);
}

/// How many recent mismatches are kept per route.
const RECENT_MISMATCHES: usize = 16;

pub fn client(connect_timeout: Duration, idle: Duration) -> ShadowClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .pool_timer(TokioTimer::new())
        .set_host(false)
        .build(super::connector(connect_timeout))
}

/// Per-route shadow counters (monotone) and the in-flight gauge.
#[derive(Debug, Default)]
pub struct ShadowStats {
    pub requests: AtomicU64,
    pub sent: AtomicU64,
    pub matched: AtomicU64,
    pub mismatched: AtomicU64,
    pub errors: AtomicU64,
    pub dropped_busy: AtomicU64,
    pub dropped_body: AtomicU64,
    /// Copies under way to the shadow's current endpoints (see [`Self::new_endpoints`]).
    in_flight: ArcSwap<AtomicUsize>,
    recent: Mutex<VecDeque<Mismatch>>,
}

/// How long no copy is sent to a shadow endpoint that refused a connection (then one probes
/// it): a dead shadow would otherwise cost a connection attempt per copy, on the workers that
/// serve the primaries.
pub const REFUSED_REST: Duration = Duration::from_secs(1);

/// One recent mismatch, for an operator to look at.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Mismatch {
    pub at: String,
    pub method: String,
    pub path: String,
    pub primary_status: u16,
    pub shadow_status: u16,
    pub body_differs: bool,
}

impl ShadowStats {
    /// Takes an in-flight slot, or counts a `dropped_busy` and returns `None`.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Permit> {
        let in_flight = self.in_flight.load();
        if in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            self.dropped_busy.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Permit {
            stats: Arc::clone(self),
            in_flight: Arc::clone(&in_flight),
            started: false,
        })
    }

    /// Copies under way to the shadow's current endpoints.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load().load(Ordering::Relaxed)
    }

    /// The shadow's endpoints changed (a reload): copies still under way to the old ones no
    /// longer hold the new ones' `max_in_flight` slots. A blackholed endpoint replaced by a
    /// working one would otherwise have every new copy dropped as busy until the old copies
    /// time out. Those end as before, each freeing its slot in the old count.
    pub fn new_endpoints(&self) {
        self.in_flight.store(Arc::default());
    }

    pub fn recent(&self) -> Vec<Mismatch> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn push_mismatch(&self, mismatch: Mismatch) {
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == RECENT_MISMATCHES {
                recent.pop_front();
            }
            recent.push_back(mismatch);
        }
    }
}

/// An in-flight shadow slot, released on drop. A copy whose job never started (its request
/// was aborted before the answer, so there is nothing whole to mirror or compare with) is
/// counted as `dropped_body` then, as a copy of an aborted upload is.
#[derive(Debug)]
pub struct Permit {
    stats: Arc<ShadowStats>,
    /// The count the slot was taken from.
    in_flight: Arc<AtomicUsize>,
    /// Set when the job runs: from then on it counts its own outcome.
    started: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self.started {
            self.stats.dropped_body.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The capped copy of a request body, filled as the primary streams it.
#[derive(Debug)]
pub struct Tee {
    chunks: Vec<Bytes>,
    size: u64,
    limit: u64,
    overflow: bool,
    done: Option<oneshot::Sender<Option<Bytes>>>,
}

impl Tee {
    /// A tee and the receiver of the finished copy (`None` when the body exceeded `limit`;
    /// the sender is dropped when the client aborts).
    pub fn new(limit: u64) -> (Box<Tee>, oneshot::Receiver<Option<Bytes>>) {
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            chunks: Vec::new(),
            size: 0,
            limit,
            overflow: false,
            done: Some(tx),
        };
        (Box::new(tee), rx)
    }

    pub fn push(&mut self, data: &Bytes) {
        if self.overflow {
            return;
        }
        self.size += data.len() as u64;
        if self.size > self.limit {
            self.overflow = true;
            self.chunks = Vec::new();
        } else {
            self.chunks.push(data.clone());
        }
    }

    pub fn finish(&mut self) {
        let body = (!self.overflow).then(|| match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(self.size as usize);
                self.chunks.iter().for_each(|c| all.extend_from_slice(c));
                all.freeze()
            }
        });
        if let Some(tx) = self.done.take() {
            // The shadow task may be gone (dropped busy); nothing to do then.
            let _ = tx.send(body);
        }
    }
}

/// The shadow's copy of a request body.
pub enum ShadowBody {
    Empty,
    /// Filled when the primary finished streaming it.
    Teed(oneshot::Receiver<Option<Bytes>>),
}

/// Everything a shadow task needs, prepared on the request path.
pub struct ShadowJob {
    pub request: Request<()>,
    pub body: ShadowBody,
    pub permit: Permit,
    pub route: Arc<RouteShared>,
    /// The rest of the shadow endpoint the copy goes to (after a refused connection).
    pub rest: Arc<PassedOver>,
    pub config: ShadowConfig,
    pub timeout: Duration,
    /// The primary's body hash when `compare = "body"`.
    pub primary_hash: Option<oneshot::Receiver<u64>>,
}

/// The primary's outcome, as the shadow compares it.
#[derive(Clone, Copy, Debug)]
pub struct PrimaryOutcome {
    pub status: u16,
}

impl ShadowJob {
    /// Runs the shadow to completion; never touches the primary.
    pub async fn run(self, client: ShadowClient, primary: PrimaryOutcome) {
        let ShadowJob {
            request,
            body,
            mut permit,
            route,
            rest,
            config,
            timeout,
            primary_hash,
        } = self;
        permit.started = true;
        let stats = &route.shadow;
        let body = match body {
            ShadowBody::Empty => Bytes::new(),
            ShadowBody::Teed(rx) => match rx.await {
                Ok(Some(body)) => body,
                Ok(None) => {
                    stats.dropped_body.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // The body never completed (the client aborted its upload, or the primary's
                // exchange ended before reading it): nothing whole to mirror.
                Err(_) => {
                    stats.dropped_body.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        let (parts, ()) = request.into_parts();
        let method = parts.method.clone();
        let path = parts.uri.path().to_string();
        let mut request = Request::from_parts(parts, Full::new(body));
        let interim = Interim::watch(&mut request);
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            let response = tokio::select! {
                response = client.request(request) => response,
                () = interim.too_many() => return Err(ErrorKind::Protocol),
            };
            let response = response.map_err(|e| match super::classify(&e) {
                super::Failure::Upstream(kind) => kind,
                _ => ErrorKind::Reset,
            })?;
            let status = response.status().as_u16();
            rest.end();
            route.shadow_metrics.record_response(
                Epoch::CURRENT,
                status,
                status >= 500,
                started.elapsed(),
            );
            let hash = read_hashed(response.into_body(), config.max_body_bytes).await;
            Ok::<_, ErrorKind>((status, hash))
        })
        .await;
        // The endpoint rests before the copy's place is given back: no other copy takes the
        // place and tries the endpoint in between.
        if matches!(result, Ok(Err(ErrorKind::Connect))) {
            rest.start(REFUSED_REST);
        }
        drop(permit);
        let (status, hash) = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(kind)) => {
                route
                    .shadow_metrics
                    .record_failure(Epoch::CURRENT, kind, started.elapsed());
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                route.shadow_metrics.record_failure(
                    Epoch::CURRENT,
                    ErrorKind::Timeout,
                    started.elapsed(),
                );
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let body_differs = match (config.compare, primary_hash) {
            (Compare::Body, Some(rx)) => {
                // The shadow's body failed midway.
                let Some(shadow) = hash else {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                match rx.await {
                    Ok(primary) => primary != shadow,
                    // The primary's body never ended (its client left mid-answer, or its
                    // upstream failed): no body to compare the copy's with, and no fault of
                    // the shadow's. The statuses still are compared: a different one is a
                    // mismatch, the same one leaves the copy `sent`.
                    Err(_) if status == primary.status => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if config.compare == Compare::Off {
            stats.sent.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if status == primary.status && !body_differs {
            stats.matched.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.mismatched.fetch_add(1, Ordering::Relaxed);
            debug!(route = %route.name, %path, primary = primary.status, shadow = status, body_differs, "Shadow mismatch.");
            stats.push_mismatch(Mismatch {
                at: crate::rollout::journal::now_rfc3339(),
                method: method.to_string(),
                path,
                primary_status: primary.status,
                shadow_status: status,
                body_differs,
            });
        }
    }
}

/// Reads a body to the end, hashing at most `limit` bytes. `None` when the body failed.
async fn read_hashed(mut body: hyper::body::Incoming, limit: u64) -> Option<u64> {
    let mut hasher = BodyHasher::new(limit);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.ok()?.data_ref() {
            hasher.update(data);
        }
    }
    Some(hasher.finish())
}

/// A hash of the first `limit` bytes of a body.
pub struct BodyHasher {
    hasher: Box<Xxh3>,
    left: u64,
}

impl BodyHasher {
    pub fn new(limit: u64) -> Self {
        Self {
            hasher: Box::new(Xxh3::new()),
            left: limit,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let take = data
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.hasher.update(&data[..take]);
        self.left -= take as u64;
    }

    pub fn finish(&self) -> u64 {
        self.hasher.digest()
    }
}

/// How many interim (1xx) answers a shadow copy may get: it is dropped (closing its
/// connection) past them, as an `error`, rather than have a worker parse them until the
/// timeout. Counted, not measured: the callback hyper calls for each does not see its reason
/// phrase, which can be long. A primary's are measured in bytes by its connection's reader
/// instead, see [`crate::io::Link`] (about 36 instructions per request under callgrind, where
/// this callback on every request cost 856).
const MAX_INTERIM: usize = 100;

/// The interim answers to one shadow copy, counted by a callback hyper calls for each.
struct Interim {
    count: AtomicUsize,
    over: tokio::sync::Notify,
}

impl Interim {
    /// Counts the interim answers to `request`.
    fn watch<B>(request: &mut Request<B>) -> Arc<Interim> {
        let interim = Arc::new(Interim {
            count: AtomicUsize::new(0),
            over: tokio::sync::Notify::new(),
        });
        let counted = Arc::clone(&interim);
        hyper::ext::on_informational(request, move |_| {
            if counted.count.fetch_add(1, Ordering::Relaxed) == MAX_INTERIM {
                counted.over.notify_one();
            }
        });
        interim
    }

    /// Resolves once more than [`MAX_INTERIM`] interim answers came.
    async fn too_many(&self) {
        self.over.notified().await;
    }
}

/// Marks a request as a shadow copy. The copy of a HEAD asks for its connection to be closed
/// after the answer: a body the shadow sends to a HEAD too, late, would be read as the next
/// copy's answer on a reused connection (as for the primary, see `pool::Pool::send`).
pub fn mark(request: &mut Request<()>) {
    let head = request.method() == Method::HEAD;
    let headers = request.headers_mut();
    headers.insert(SHADOW_HEADER, HeaderValue::from_static("1"));
    if head {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tee_copies_up_to_the_limit_and_reports_overflow() {
        let (mut tee, mut rx) = Tee::new(8);
        tee.push(&Bytes::from_static(b"abcd"));
        tee.push(&Bytes::from_static(b"efgh"));
        tee.finish();
        assert_eq!(
            rx.try_recv().unwrap(),
            Some(Bytes::from_static(b"abcdefgh"))
        );

        let (mut tee, mut rx) = Tee::new(8);
        tee.push(&Bytes::from_static(b"abcdefghi"));
        tee.finish();
        assert_eq!(rx.try_recv().unwrap(), None);
    }

    #[test]
    fn permits_are_capped_and_released() {
        let stats = Arc::new(ShadowStats::default());
        let a = stats.try_acquire(2).unwrap();
        let _b = stats.try_acquire(2).unwrap();
        assert!(stats.try_acquire(2).is_none());
        assert_eq!(stats.dropped_busy.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(stats.try_acquire(2).is_some());
        assert_eq!(stats.in_flight(), 1);
    }

    #[test]
    fn new_endpoints_get_their_own_slots() {
        let stats = Arc::new(ShadowStats::default());
        let old = [stats.try_acquire(2).unwrap(), stats.try_acquire(2).unwrap()];
        assert!(stats.try_acquire(2).is_none());
        stats.new_endpoints();
        assert_eq!(stats.in_flight(), 0);
        let new = stats.try_acquire(2).unwrap();
        // The old copies end into their own count, not the new one.
        drop(old);
        assert_eq!(stats.in_flight(), 1);
        let _second = stats.try_acquire(2).unwrap();
        assert!(stats.try_acquire(2).is_none());
        drop(new);
        assert_eq!(stats.in_flight(), 1);
    }

    #[test]
    fn body_hash_covers_only_the_limit() {
        let mut a = BodyHasher::new(4);
        a.update(b"abcdXYZ");
        let mut b = BodyHasher::new(4);
        b.update(b"ab");
        b.update(b"cd");
        b.update(b"other");
        assert_eq!(a.finish(), b.finish());
    }
}
