//! The response body to the client: veer's own short answers, or the upstream's body streamed
//! frame by frame. An upstream failure mid-body is passed on as an error, so the client sees an
//! aborted response (connection closed or stream reset), never a clean truncated one; so is an
//! upstream body that sends nothing for `idle_timeout`, or that keeps the client waiting past
//! the exchange's deadline (`request_timeout`, moved on by the time the client takes to read).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::access_log::{AccessLogger, Record};
use crate::metrics::{Epoch, ErrorKind};
use crate::routing::{RouteShared, SlotPermit};
use crate::upstream::mirror::BodyHasher;
use crate::upstream::pool::Lease;
use crate::Slot;

pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Local { data: Option<Bytes> },
        Upstream { #[pin] inner: Incoming, tail: Tail },
    }
}

impl ProxyBody {
    pub fn local(data: Bytes) -> Self {
        ProxyBody::Local { data: Some(data) }
    }

    pub fn upstream(inner: Incoming, tail: Tail) -> Self {
        ProxyBody::Upstream { inner, tail }
    }
}

/// What happens as the upstream body streams: byte count, mid-body failure recording, the
/// optional hash for shadow comparison and the optional access-log line.
pub struct Tail {
    pub route: Arc<RouteShared>,
    pub slot: Slot,
    /// The slot's epoch the request was sent in.
    pub epoch: Epoch,
    pub bytes: u64,
    pub extra: Option<Box<Extra>>,
    /// How long the upstream body may send nothing.
    pub idle: Duration,
    /// When the exchange must be over: the body may not make the client wait after it. It
    /// moves on by the time the client takes to take the body's frames: `request_timeout`
    /// bounds the upstream's slowness, not the client's.
    pub deadline: Instant,
    /// When the last frame went to the client with more to come: the time until the next
    /// poll is the client's, taking it (a slow reader's connection blocks hyper's writes, and
    /// hyper asks for the next frame only then).
    pub handed: Option<Instant>,
    /// Armed only once the upstream body actually makes the client wait.
    pub timer: Option<Pin<Box<Sleep>>>,
    /// The upstream connection, back to the pool when the body has ended.
    pub lease: Option<Lease>,
    /// The request's place under its slot's `max_in_flight`, given back when this is dropped.
    pub permit: Option<SlotPermit>,
    /// The body ended, or failed on the upstream's side; dropped before that, the client
    /// left mid-answer.
    pub over: bool,
}

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("upstream body failed: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("upstream body sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("upstream body not done within request_timeout")]
    Deadline,
}

#[derive(Default)]
pub struct Extra {
    pub hash: Option<(BodyHasher, oneshot::Sender<u64>)>,
    /// The line to log when the body is done, and when the request started (for `total_ms`).
    pub log: Option<(AccessLogger, Record, tokio::time::Instant)>,
}

impl Tail {
    fn data(&mut self, data: &Bytes) {
        self.bytes += data.len() as u64;
        if let Some((hasher, _)) = self.extra.as_mut().and_then(|e| e.hash.as_mut()) {
            hasher.update(data);
        }
    }

    /// When the upstream body, waited for from `now`, has kept the client waiting too long.
    fn wait_until(&self, now: Instant) -> Instant {
        (now + self.idle).min(self.deadline)
    }

    /// The client took the frame handed to it at `handed`: the deadline moves on by that
    /// time, and so does a wait armed before it (its clocks run while veer waits for the
    /// upstream only).
    fn client_took(&mut self, handed: Instant) {
        let now = Instant::now();
        let taken = now.duration_since(handed);
        self.deadline = self.deadline.checked_add(taken).unwrap_or(self.deadline);
        let until = self.wait_until(now);
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(until);
        }
    }

    /// The upstream body has nothing yet: wait, up to `idle` and at most until the deadline.
    fn wait(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let until = self.wait_until(Instant::now());
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.over = true;
        self.route
            .slot_metrics(self.slot)
            .record_body_failure(self.epoch, ErrorKind::Timeout);
        tracing::debug!(route = %self.route.name, slot = %self.slot, "Upstream body stalled.");
        let error = if timer.deadline() >= self.deadline {
            ResponseBodyError::Deadline
        } else {
            ResponseBodyError::Stalled(self.idle)
        };
        Poll::Ready(Some(Err(error)))
    }

    /// The body has ended (also when it had nothing from the start: hyper does not poll the
    /// body of a HEAD, 204 or 304 answer).
    pub fn end(&mut self) {
        self.over = true;
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        if let Some(extra) = self.extra.as_mut() {
            if let Some((hasher, tx)) = extra.hash.take() {
                let _ = tx.send(hasher.finish());
            }
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if !self.over {
            // The client reset the stream or closed the connection mid-answer. The access log
            // keeps the status sent, with the bytes sent (as NGINX logs it).
            self.route.slot_metrics(self.slot).record_client_abort();
            if let Some(lease) = self.lease.take() {
                lease.abandon();
            }
        }
        if let Some((logger, mut record, started)) = self.extra.as_mut().and_then(|e| e.log.take())
        {
            record.bytes = self.bytes;
            record.total_ms = started.elapsed().as_secs_f64() * 1000.0;
            logger.log(record);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.project() {
            ProxyBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Upstream { mut inner, tail } => {
                if let Some(handed) = tail.handed.take() {
                    tail.client_took(handed);
                }
                let mut polled = match inner.as_mut().poll_frame(cx) {
                    Poll::Pending => return tail.wait(cx),
                    Poll::Ready(polled) => polled,
                };
                if let Some(Ok(frame)) = &mut polled {
                    if let Some(trailers) = frame.trailers_mut() {
                        // Fields of the upstream's connection have no place on the client's
                        // (an HTTP/2 client resets a stream whose trailers carry them).
                        crate::proxy::headers::remove_hop_by_hop(trailers, false);
                    }
                }
                if tail.timer.is_some() {
                    let until = tail.wait_until(Instant::now());
                    if let Some(timer) = tail.timer.as_mut() {
                        timer.as_mut().reset(until);
                    }
                }
                match &polled {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            tail.data(data);
                        }
                        // Trailers are the last frame: hyper polls no further after them (and
                        // a chunked body never tells its end otherwise).
                        if frame.is_trailers() || inner.is_end_stream() {
                            tail.end();
                        } else {
                            tail.handed = Some(Instant::now());
                        }
                    }
                    Some(Err(error)) => {
                        tail.over = true;
                        // A timeout, an invalid body (an HTTP/2 one longer or shorter than
                        // its length), else a reset.
                        let kind = match crate::upstream::classify(error) {
                            crate::upstream::Failure::Upstream(kind) => kind,
                            _ => ErrorKind::Reset,
                        };
                        tail.route
                            .slot_metrics(tail.slot)
                            .record_body_failure(tail.epoch, kind);
                        tracing::debug!(route = %tail.route.name, slot = %tail.slot, %error, "Upstream body failed.");
                    }
                    None => tail.end(),
                }
                Poll::Ready(polled.map(|frame| frame.map_err(ResponseBodyError::from)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local { data } => data.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
