//! What an admin connection's task needs to close it in time: requests under way (until their
//! answer is written or dropped), when the last one ended, and when the socket last moved a
//! byte.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// One connection's use, in milliseconds after its accept.
pub(super) struct Usage {
    opened: Instant,
    under_way: AtomicUsize,
    last_ended: AtomicU64,
    last_io: AtomicU64,
}

/// What the connection's task is to do now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Look again then.
    At(Instant),
    /// No request under way for `idle`: close.
    Quiet,
    /// A request under way and no byte moved either way for `idle` (a client that takes
    /// nothing of its answer): cut.
    Stuck,
}

impl Usage {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Usage {
            opened: Instant::now(),
            under_way: AtomicUsize::new(0),
            last_ended: AtomicU64::new(0),
            last_io: AtomicU64::new(0),
        })
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, millis: &AtomicU64) -> Instant {
        self.opened + Duration::from_millis(millis.load(Ordering::Relaxed))
    }

    /// A request starts: it is under way until the guard (moved into its answer) is dropped.
    pub(super) fn busy(this: &Arc<Self>) -> Busy {
        this.under_way.fetch_add(1, Ordering::AcqRel);
        Busy {
            usage: Arc::clone(this),
            counts: true,
        }
    }

    pub(super) fn due(&self, now: Instant, idle: Duration) -> Due {
        if self.under_way.load(Ordering::Acquire) > 0 {
            let stuck_at = self.at(&self.last_io) + idle;
            return if stuck_at <= now {
                Due::Stuck
            } else {
                Due::At(stuck_at)
            };
        }
        let quiet_at = self.at(&self.last_ended) + idle;
        if quiet_at <= now {
            Due::Quiet
        } else {
            Due::At(quiet_at)
        }
    }
}

/// A request under way; dropping it ends it.
pub(super) struct Busy {
    usage: Arc<Usage>,
    /// Whether its end keeps the connection open for another `idle` (not for a refused one:
    /// a peer without the token must not hold a connection with cheap requests).
    counts: bool,
}

impl Busy {
    pub(super) fn refused(&mut self) {
        self.counts = false;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let usage = &self.usage;
        if self.counts {
            usage
                .last_ended
                .fetch_max(usage.millis(), Ordering::Relaxed);
        }
        usage.under_way.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer body that keeps its request under way until hyper has written it or dropped it.
pub(super) struct Held<B> {
    pub(super) body: B,
    pub(super) _busy: Busy,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, noting when it last moved a byte either way.
pub(super) struct Metered<I> {
    pub(super) io: I,
    pub(super) usage: Arc<Usage>,
}

impl<I> Metered<I> {
    fn moved<T>(&self, polled: &Poll<std::io::Result<T>>, bytes: bool) {
        if matches!(polled, Poll::Ready(Ok(_))) && bytes {
            let usage = &self.usage;
            usage.last_io.fetch_max(usage.millis(), Ordering::Relaxed);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Metered<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.moved(&polled, buf.filled().len() > before);
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Metered<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        let bytes = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
        self.moved(&polled, bytes);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_quiet_after_its_last_answer_and_stuck_when_nothing_moves() {
        let idle = Duration::from_secs(10);
        let usage = Usage::new();
        let start = Instant::now();
        assert_eq!(usage.due(start, idle), Due::At(start + idle));
        tokio::time::advance(Duration::from_secs(5)).await;
        let busy = Usage::busy(&usage);
        // Under way: timed by the socket (nothing moved since the accept).
        assert_eq!(usage.due(Instant::now(), idle), Due::At(start + idle));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(usage.due(Instant::now(), idle), Due::Stuck);
        drop(busy);
        assert_eq!(
            usage.due(Instant::now(), idle),
            Due::At(Instant::now() + idle)
        );
        // A refused request does not keep the connection open.
        let mut refused = Usage::busy(&usage);
        refused.refused();
        tokio::time::advance(Duration::from_secs(9)).await;
        drop(refused);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(usage.due(Instant::now(), idle), Due::Quiet);
    }
}
