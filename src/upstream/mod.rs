//! Upstream side: the connection pool, the streamed request body, and error classification.
//!
//! Each worker has its own pool of keep-alive HTTP/1.1 connections for every slot of every
//! route ([`pool`], keyed by endpoint, so a reload that keeps an endpoint keeps its
//! connections). The shadow has its own client and pool (`mirror`).

pub mod mirror;
pub mod pool;

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::config::ServerConfig;
use crate::listener::InFlight;
use crate::metrics::ErrorKind;
use mirror::Tee;

/// The pool for primary requests of one worker.
pub fn pool(server: &ServerConfig) -> pool::Pool {
    pool::Pool::new(
        connector(server.connect_timeout),
        server.upstream_idle_timeout,
    )
}

pub(crate) fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector
}

/// How much a primary's upstream may send before veer has its answer's head, beyond the head
/// itself: room for interim (1xx) answers, which hyper reads and passes over while it waits
/// for the answer, and for the body bytes that arrive with the head (hyper may read up to
/// about 408 KiB more before veer sees the head; see [`crate::io::Link`]): so the interim
/// answers an upstream may send before its exchange fails are between about 600 KiB and 1 MiB.
/// Servers send one or two (100 Continue, 103 Early Hints) or a 102 Processing now and then;
/// one that sent them without end kept a worker parsing them at full speed until
/// `request_timeout`, and every other request on that worker waited behind it (0.3-0.8 s
/// each). Past this, the exchange fails as an invalid answer (502, a `protocol` error of the
/// slot).
pub const MAX_EARLY_BYTES: usize = 1 << 20;

/// The most header fields veer takes in a head, a request's or an answer's: `http::HeaderMap`
/// holds at most 24,576 names and panics when one more is added, as veer adds its own fields
/// (`X-Forwarded-*`, `Via`, a cookie). Only HTTP/2 heads come near it: hyper's HTTP/1.1
/// parser takes 100 fields at most. A request with more is a 431; an answer, a 502 and a
/// `protocol` error of the slot. (HTTP/2 trailers are only ever taken from, never added to.)
pub const MAX_FIELDS: usize = 1000;

/// The error of an exchange whose upstream sent more than its answer's head and
/// [`MAX_EARLY_BYTES`] before the head was in.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent too much before its answer's head (interim (1xx) answers without end?)")]
pub struct TooManyInterim;

/// Why a downstream request body stopped early: always the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than max_body_bytes")]
    TooLarge,
    #[error("request body idle for longer than the idle timeout")]
    Idle,
    #[error("client aborted the request body: {0}")]
    Aborted(#[source] hyper::Error),
}

/// How much of an HTTP/2 request body left unread is read and dropped, at most ...
const DISCARD_BYTES: usize = 16 << 20;
/// ... and for how long at most.
const DISCARD_TIME: Duration = Duration::from_secs(5);

/// A client's request body that, when dropped before its end over HTTP/2, is read on and
/// dropped in the background, up to `DISCARD_BYTES` or `DISCARD_TIME`, then the stream is
/// reset. This is the case when veer answers before the body is in (413, 404, ...) or the
/// upstream answered or failed before reading it all. Dropped unread, the body would have the
/// stream reset right after the answer (RST_STREAM NO_ERROR, which RFC 9113 §8.1 allows), and
/// some clients (curl 7.88) report that as a failure instead of the answer. HTTP/1.1 bodies
/// are left to hyper.
pub struct Unread {
    body: Option<Incoming>,
    http2: bool,
}

impl Unread {
    pub fn new(body: Incoming, http2: bool) -> Self {
        Unread {
            body: Some(body),
            http2,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if !self.http2 || body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(tokio::time::timeout(DISCARD_TIME, async move {
            let mut left = DISCARD_BYTES;
            while let Some(Ok(frame)) = body.frame().await {
                let len = frame.data_ref().map_or(0, Bytes::len);
                if len > left {
                    return;
                }
                left -= len;
            }
        }));
    }
}

pin_project! {
    /// The client's request body on its way upstream: streamed frame by frame, never buffered,
    /// with a size cap, an inactivity timeout and an optional capped copy for the shadow. Any
    /// failure is an error frame, so the upstream sees an aborted request, never a complete
    /// shorter one.
    pub struct RequestBody {
        inner: Unread,
        limit: u64,
        seen: u64,
        idle: Duration,
        // Armed only while the body is actually waiting for the client.
        timer: Option<Pin<Box<Sleep>>>,
        tee: Option<Box<Tee>>,
        state: BodyState,
        // The connection's exchange stays under way while the body is being read.
        reading: Option<InFlight>,
        // The route's override header, removed from trailers as from the head.
        override_header: Option<HeaderName>,
    }
}

impl RequestBody {
    /// `limit` 0 = unlimited. [`RequestBody::state`] tells where the body stands.
    pub fn new(
        inner: Unread,
        limit: u64,
        idle: Duration,
        tee: Option<Box<Tee>>,
        reading: Option<InFlight>,
    ) -> Self {
        Self {
            state: BodyState::new(!inner.is_end_stream()),
            inner,
            limit,
            seen: 0,
            idle,
            timer: None,
            tee,
            reading,
            override_header: None,
        }
    }

    /// A body already at its end: that of a request sent again (see `pool`).
    pub(crate) fn ended() -> Self {
        let none = Unread {
            body: None,
            http2: false,
        };
        Self::new(none, 0, Duration::ZERO, None, None)
    }

    /// Removes the route's override header from the client's trailers too (the shadow marker
    /// always is): veer's own fields reach no upstream from a client, whichever section
    /// carries them.
    pub fn without_override(mut self, name: Option<&HeaderName>) -> Self {
        self.override_header = name.filter(|_| !self.inner.is_end_stream()).cloned();
        self
    }
}

/// Where a request body stands: shared between the body, polled by the upstream connection,
/// the exchange, which decides whose fault a timeout is, and the connection's lease, which
/// goes back to the pool only once the whole request was sent. Nothing to share (and no
/// allocation) for a request without a body.
#[derive(Clone, Debug, Default)]
pub struct BodyState(Option<Arc<AtomicU8>>);

const SENDING: u8 = 0;
const WAITING: u8 = 1;
const ENDED: u8 = 2;
// The body failed on the client's side (see `BodyError`).
const TOO_LARGE: u8 = 3;
const IDLE: u8 = 4;
const ABORTED: u8 = 5;
const MALFORMED: u8 = 6;

impl BodyState {
    fn new(has_body: bool) -> Self {
        Self(has_body.then(|| Arc::new(AtomicU8::new(SENDING))))
    }

    /// The body is waiting for the client to send more (or stopped waiting at its idle
    /// timeout).
    pub fn is_waiting(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|state| matches!(state.load(Ordering::Relaxed), WAITING | IDLE))
    }

    /// The body was read to its end (or there was none).
    pub fn ended(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|state| state.load(Ordering::Relaxed) == ENDED)
    }

    /// How the body failed on the client's side, if it did. An HTTP/2 upstream's error does not
    /// carry the body's own (hyper resets the stream), so the exchange asks here.
    pub fn failure(&self) -> Option<Failure> {
        match self.0.as_ref()?.load(Ordering::Relaxed) {
            TOO_LARGE => Some(Failure::BodyTooLarge),
            IDLE => Some(Failure::BodyIdle),
            ABORTED => Some(Failure::ClientAbort),
            MALFORMED => Some(Failure::BodyMalformed),
            _ => None,
        }
    }

    fn failed(&self, error: &BodyError) {
        self.set(match error {
            BodyError::TooLarge => TOO_LARGE,
            BodyError::Idle => IDLE,
            BodyError::Aborted(error) if is_malformed(error) => MALFORMED,
            BodyError::Aborted(_) => ABORTED,
        });
    }

    fn set(&self, to: u8) {
        if let Some(state) = &self.0 {
            state.store(to, Ordering::Relaxed);
        }
    }
}

/// A request body read to its end: the shadow's copy is complete, the connection's hold on the
/// body is let go as read whole, and the body is marked `ENDED`.
fn read_whole(tee: &mut Option<Box<Tee>>, reading: &mut Option<InFlight>, state: &BodyState) {
    if let Some(mut tee) = tee.take() {
        tee.finish();
    }
    if let Some(reading) = reading.take() {
        reading.body_read();
    }
    state.set(ENDED);
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        this.state.set(if polled.is_pending() {
            WAITING
        } else {
            SENDING
        });
        let frame = match polled {
            Poll::Pending => {
                let idle = *this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(timer.as_mut().poll(cx));
                this.state.failed(&BodyError::Idle);
                return Poll::Ready(Some(Err(BodyError::Idle)));
            }
            Poll::Ready(frame) => frame,
        };
        if let Some(timer) = this.timer.as_mut() {
            timer.as_mut().reset(Instant::now() + *this.idle);
        }
        let frame = match frame {
            None => {
                read_whole(this.tee, this.reading, this.state);
                return Poll::Ready(None);
            }
            Some(Err(error)) => {
                let error = BodyError::Aborted(error);
                this.state.failed(&error);
                return Poll::Ready(Some(Err(error)));
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_trailers() {
            Ok(mut trailers) => {
                mirror::remove_own_fields(&mut trailers, this.override_header.as_ref());
                crate::proxy::headers::remove_hop_by_hop(&mut trailers, false);
                crate::proxy::headers::remove_set_by_veer(&mut trailers);
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        };
        if let Some(data) = frame.data_ref() {
            *this.seen += data.len() as u64;
            if *this.limit > 0 && *this.seen > *this.limit {
                this.state.failed(&BodyError::TooLarge);
                return Poll::Ready(Some(Err(BodyError::TooLarge)));
            }
            if let Some(tee) = this.tee.as_mut() {
                tee.push(data);
            }
        }
        // The end as the stream marks it, or the declared length met: hyper's client stops
        // polling then, and an HTTP/2 client may send its END_STREAM in a DATA frame of its own.
        if this.inner.is_end_stream() || this.inner.size_hint().exact() == Some(0) {
            read_whole(this.tee, this.reading, this.state);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl RequestBody {
    /// Where this body stands (see [`BodyState`]).
    pub fn state(&self) -> BodyState {
        self.state.clone()
    }
}

/// What went wrong with an upstream exchange, and whose fault it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream (counts against the slot).
    Upstream(ErrorKind),
    /// The client's body was too large.
    BodyTooLarge,
    /// The client's body stalled.
    BodyIdle,
    /// The client went away.
    ClientAbort,
    /// The client's body broke its own framing (a bad chunk size line).
    BodyMalformed,
}

/// Whether a client's body failed on bytes that break HTTP/1.1 framing, which hyper tells as
/// invalid data or input (an end too early is `UnexpectedEof`, a reset is not an I/O error).
fn is_malformed(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput};
    StdError::source(error)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.kind(), InvalidData | InvalidInput))
}

/// Classifies an error of an exchange with an upstream by walking its source chain.
pub fn classify(error: &(dyn StdError + 'static)) -> Failure {
    let mut connect = false;
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        match e.downcast_ref() {
            Some(pool::UpstreamError::ClientBody(failure)) => return *failure,
            Some(pool::UpstreamError::TooManyFields) => {
                return Failure::Upstream(ErrorKind::Protocol)
            }
            _ => {}
        }
        if let Some(body) = e.downcast_ref::<BodyError>() {
            return match body {
                BodyError::TooLarge => Failure::BodyTooLarge,
                BodyError::Idle => Failure::BodyIdle,
                BodyError::Aborted(error) if is_malformed(error) => Failure::BodyMalformed,
                BodyError::Aborted(_) => Failure::ClientAbort,
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return Failure::Upstream(ErrorKind::Timeout);
            }
            if io.get_ref().is_some_and(|e| e.is::<TooManyInterim>()) {
                return Failure::Upstream(ErrorKind::Protocol);
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return Failure::Upstream(ErrorKind::Timeout);
            }
            if h.is_parse() || h.is_parse_status() {
                return Failure::Upstream(ErrorKind::Protocol);
            }
        }
        // An HTTP/2 upstream that broke the protocol (a malformed or oversized head, a body
        // longer or shorter than its length): an invalid answer, as over HTTP/1.1.
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            use h2::Reason;
            let broken = [
                Reason::PROTOCOL_ERROR,
                Reason::COMPRESSION_ERROR,
                Reason::FRAME_SIZE_ERROR,
                Reason::FLOW_CONTROL_ERROR,
            ];
            // Not a reset of veer's own making (a client's body that broke its framing).
            let theirs = h2.is_remote() || h2.is_library();
            if theirs && h2.reason().is_some_and(|reason| broken.contains(&reason)) {
                return Failure::Upstream(ErrorKind::Protocol);
            }
            // h2's own defences against a peer that floods it (a head in more CONTINUATION
            // frames than its size allows, streams reset without end): the upstream's abuse.
            if h2.is_library() && h2.reason() == Some(Reason::ENHANCE_YOUR_CALM) {
                return Failure::Upstream(ErrorKind::Protocol);
            }
        }
        connect |= matches!(
            e.downcast_ref::<pool::UpstreamError>(),
            Some(pool::UpstreamError::Connect { .. })
        ) || e
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|e| e.is_connect());
        current = e.source();
    }
    if connect {
        // "connection refused", or a connect timeout (io TimedOut is caught above).
        Failure::Upstream(ErrorKind::Connect)
    } else {
        Failure::Upstream(ErrorKind::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_are_the_clients_fault() {
        let error = BodyError::TooLarge;
        assert_eq!(classify(&error), Failure::BodyTooLarge);
        assert_eq!(classify(&BodyError::Idle), Failure::BodyIdle);
    }

    #[test]
    fn io_timeouts_are_upstream_timeouts() {
        let error = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert_eq!(classify(&error), Failure::Upstream(ErrorKind::Timeout));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(classify(&reset), Failure::Upstream(ErrorKind::Reset));
    }
}
