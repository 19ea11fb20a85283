//! The bytes of an upgraded connection (a WebSocket), carried both ways until either side
//! closes, or until no byte moved either way for `tunnel_idle_timeout` (as NGINX's
//! `proxy_read_timeout` bounds a WebSocket): an idle tunnel must not hold two connections for
//! ever.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::routing::clock_ms;

/// Copies bytes both ways between an upgraded client and upstream connection.
pub(super) async fn run(down: OnUpgrade, up: OnUpgrade, idle: Duration) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(error) => {
            debug!(%error, "Upgrade failed.");
            return;
        }
    };
    let last = Arc::new(AtomicU64::new(clock_ms()));
    let mut down = Touched::new(TokioIo::new(down), &last);
    let mut up = Touched::new(TokioIo::new(up), &last);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let quiet = async {
        loop {
            let since = clock_ms().saturating_sub(last.load(Ordering::Relaxed));
            if since >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - since)).await;
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut down, &mut up) => {
            if let Err(error) = copied {
                debug!(%error, "Tunnel closed with an error.");
            }
        }
        () = quiet => debug!("Tunnel idle for tunnel_idle_timeout; closed."),
    }
}

/// A connection that notes when it last read or wrote a byte.
struct Touched<I> {
    io: I,
    last: Arc<AtomicU64>,
}

impl<I> Touched<I> {
    fn new(io: I, last: &Arc<AtomicU64>) -> Self {
        Touched {
            io,
            last: Arc::clone(last),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Touched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(clock_ms(), Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Touched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last.store(clock_ms(), Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
