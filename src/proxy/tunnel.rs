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
use tokio::time::Instant;
use tracing::debug;

use crate::access_log::{AccessLogger, Record};
use crate::routing::{clock_ms, SlotPermit};

/// A tunnel's access-log line (status 101), written as the tunnel ends, also when its task is
/// dropped at shutdown: its `total_ms` spans the tunnel, its `bytes` are those sent to the
/// client through it. It also holds the exchange's place under its slot's `max_in_flight`
/// until then.
pub(super) struct Line {
    log: Option<(AccessLogger, Record, Instant)>,
    sent: u64,
    _permit: Option<SlotPermit>,
}

impl Line {
    pub(super) fn new(
        log: Option<(AccessLogger, Record, Instant)>,
        permit: Option<SlotPermit>,
    ) -> Self {
        Line {
            log,
            sent: 0,
            _permit: permit,
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some((logger, mut record, started)) = self.log.take() {
            record.bytes = self.sent;
            record.total_ms = started.elapsed().as_secs_f64() * 1000.0;
            logger.log(record);
        }
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
pub(super) async fn run(down: OnUpgrade, up: OnUpgrade, idle: Duration, mut line: Line) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(error) => {
            debug!(%error, "Upgrade failed.");
            return;
        }
    };
    let last = Arc::new(AtomicU64::new(clock_ms()));
    let mut down = Touched::new(TokioIo::new(down), &last, Some(&mut line.sent));
    let mut up = Touched::new(TokioIo::new(up), &last, None);
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

/// A connection that notes when it last read or wrote a byte, and counts the bytes written
/// to it in `written` if given.
struct Touched<'a, I> {
    io: I,
    last: Arc<AtomicU64>,
    written: Option<&'a mut u64>,
}

impl<'a, I> Touched<'a, I> {
    fn new(io: I, last: &Arc<AtomicU64>, written: Option<&'a mut u64>) -> Self {
        Touched {
            io,
            last: Arc::clone(last),
            written,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Touched<'_, I> {
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

impl<I: AsyncWrite + Unpin> AsyncWrite for Touched<'_, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                self.last.store(clock_ms(), Ordering::Relaxed);
            }
            if let Some(written) = self.written.as_deref_mut() {
                *written += n as u64;
            }
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
