//! Sockets that send a small gathered write as one `send` instead of a `writev`, upstream
//! connections that read on once their peer stops taking bytes (and stop reading interim
//! answers sent without end), and whether a path still names an open file (a journal or lock
//! file deleted or moved aside).
//!
//! hyper hands a message over as several slices (the head, then each body chunk) and writes
//! them with one `writev`. On Linux `writev` on a socket goes through the VFS layer and costs
//! more than `send` (about 150 ns per call on loopback here: `writev` of a 150-byte head and a
//! 5-byte body against `send` of the same 155 bytes), and a typical API exchange makes two
//! such writes. [`SendFlat`] copies a gathered write of up to [`FLAT_MAX`] bytes into a buffer
//! on the stack and sends it with one `send`; larger ones stay vectored, so big bodies are not
//! copied. hyper hands all it has to write before a flush in one gathered write, and h2 a
//! batch of frames (with at most one DATA frame's payload) before each flush, so nothing is
//! gained by keeping bytes back until the flush, as tokio's `BufWriter` would (with a buffer
//! of its own, for the connection's life).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::upstream::{TooManyInterim, MAX_EARLY_BYTES};

/// Whether `path` still names the open `file` (the same device and inode): not once the file
/// was deleted or moved aside. An error to look at `path` other than its absence counts as
/// yes: it is no sign that the file went.
pub fn names(path: &std::path::Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
        (Err(error), _) => error.kind() != io::ErrorKind::NotFound,
        (_, Err(_)) => true,
    }
}

/// Gathered writes up to this many bytes in all are copied and sent flat.
pub const FLAT_MAX: usize = 2048;

/// `io` with small gathered writes sent flat (see [`SendFlat`]).
pub fn send_flat<T: AsyncWrite>(io: T) -> SendFlat<T> {
    SendFlat { inner: io }
}

pin_project! {
    /// A socket whose gathered writes of one slice, or of up to [`FLAT_MAX`] bytes in all, go
    /// out as one plain write (see the module's docs). Reads, flushes and other writes pass
    /// through; nothing is kept between calls.
    pub struct SendFlat<T> {
        #[pin]
        inner: T,
    }
}

impl<T> SendFlat<T> {
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for SendFlat<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendFlat<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = self.project().inner;
        if let [one] = bufs {
            return inner.poll_write(cx, one);
        }
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        if total > FLAT_MAX {
            return inner.poll_write_vectored(cx, bufs);
        }
        // Only what is copied is written (a `SmallVec`'s room is not zeroed first). A write
        // that takes part of it leaves the rest to the caller, as a gathered write would.
        let mut flat = SmallVec::<[u8; FLAT_MAX]>::new();
        bufs.iter().for_each(|buf| flat.extend_from_slice(buf));
        inner.poll_write(cx, &flat)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project! {
    /// An upstream connection that, once its peer stops taking bytes (a reset, or a pipe
    /// closed for writing) while veer still sends a request body, drops what is written until
    /// the read side ends too. An upstream that answers an upload it will not read (a 413)
    /// and hangs up gets reset by its own kernel for the unread bytes; the answer it sent
    /// first is still in veer's socket, and this is how it reaches the client, as RFC 9112
    /// §9.5 asks. Without it the write error ended the exchange before hyper read that answer.
    /// Once reads end (the answer is in, or there was none), writes fail again, so nothing
    /// (a tunnel, an upload) goes on writing into the void; and `peer_gone` tells the pool
    /// never to reuse the connection. Reads fail once the upstream sent too much before its
    /// answer's head (see [`Link`]).
    pub struct KeepReading<T> {
        #[pin]
        inner: T,
        link: Arc<Link>,
        read_ended: bool,
    }
}

impl<T> KeepReading<T> {
    pub fn new(inner: T, link: Arc<Link>) -> Self {
        KeepReading {
            inner,
            link,
            read_ended: false,
        }
    }
}

/// What the pool and an upstream connection's [`KeepReading`] share. Both run on the worker
/// that owns the pool (a single-threaded runtime), so the load and store of [`Link::read`]
/// never interleave with [`Link::awaiting`] or [`Link::answered`].
pub struct Link {
    /// The peer stopped taking bytes mid-request: the connection is never reused.
    pub peer_gone: AtomicBool,
    /// The bytes read since the request under way was sent, while the pool waits for its
    /// answer's head: interim (1xx) answers, then the head, and the body bytes hyper reads
    /// before the pool sees the head (the rest of the read that brought the head, and one
    /// more read for the body's channel: each at most hyper's read buffer, 408 KiB).
    /// `usize::MAX` when the pool waits for none.
    early: AtomicUsize,
    /// Past this many early bytes, reads fail with [`TooManyInterim`].
    early_max: usize,
    /// The answer is over while the request was still being sent, to a client that can be
    /// told to stop sending (HTTP/2): reads and writes fail from now on, so that an upstream
    /// that takes nothing more and never closes cannot hold the connection (and the client's
    /// stream) for good.
    abandoned: AtomicBool,
    /// The connection's task, registered whenever a write waits (on an upstream that takes
    /// nothing), woken to see that it is abandoned. A connection waiting for the client's body
    /// instead sees it at its next write, or its body's idle timeout ends it.
    waker: AtomicWaker,
}

impl Link {
    /// A connection whose answers' heads may be up to `max_head` bytes long.
    pub fn new(max_head: usize) -> Self {
        Link {
            peer_gone: AtomicBool::new(false),
            early: AtomicUsize::new(usize::MAX),
            early_max: max_head.saturating_add(MAX_EARLY_BYTES),
            abandoned: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Gives the connection up: its task wakes and its reads and writes fail.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    fn abandoned(&self) -> io::Result<()> {
        match self.abandoned.load(Ordering::Relaxed) {
            true => Err(io::ErrorKind::ConnectionAborted.into()),
            false => Ok(()),
        }
    }

    /// The request sent next waits for its answer's head.
    pub fn awaiting(&self) {
        self.early.store(0, Ordering::Relaxed);
    }

    /// The answer's head is in.
    pub fn answered(&self) {
        self.early.store(usize::MAX, Ordering::Relaxed);
    }

    /// Counts `read` bytes; false once too many arrived before the answer's head.
    fn read(&self, read: usize) -> bool {
        let early = self.early.load(Ordering::Relaxed);
        if early == usize::MAX {
            return true;
        }
        let early = early.saturating_add(read);
        self.early.store(early, Ordering::Relaxed);
        early <= self.early_max
    }
}

/// A write error that says the peer takes nothing more, rather than that veer's side failed.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<T: AsyncRead> AsyncRead for KeepReading<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        this.link.abandoned()?;
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() == before => *this.read_ended = true,
            Poll::Ready(Ok(())) if !this.link.read(buf.filled().len() - before) => {
                *this.read_ended = true;
                buf.set_filled(before);
                let error = io::Error::new(io::ErrorKind::InvalidData, TooManyInterim);
                return Poll::Ready(Err(error));
            }
            Poll::Ready(Err(_)) => *this.read_ended = true,
            _ => {}
        }
        polled
    }
}

impl<T: AsyncWrite> KeepReading<T> {
    /// `written` bytes are taken (or, once the peer is gone and until reads end, dropped).
    fn on_write<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        written: R,
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        this.link.abandoned()?;
        if this.link.peer_gone.load(Ordering::Relaxed) {
            return Poll::Ready(match *this.read_ended {
                false => Ok(written),
                true => Err(io::ErrorKind::BrokenPipe.into()),
            });
        }
        match write(this.inner, cx) {
            Poll::Ready(Err(error)) if peer_gone(&error) && !*this.read_ended => {
                tracing::debug!(%error, "Upstream takes no more of the request; reading its answer.");
                this.link.peer_gone.store(true, Ordering::Relaxed);
                Poll::Ready(Ok(written))
            }
            Poll::Pending => {
                this.link.waker.register(cx.waker());
                Poll::Pending
            }
            polled => polled,
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for KeepReading<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.on_write(cx, buf.len(), |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.on_write(cx, len, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.on_write(cx, (), |inner, cx| inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.on_write(cx, (), |inner, cx| inner.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, IoSlice};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Records each write it is given: (vectored or not, the bytes).
    #[derive(Default)]
    struct Recorder(Vec<(bool, Vec<u8>)>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push((false, buf.to_vec()));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let bytes = bufs
                .iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<u8>>();
            let n = bytes.len();
            self.0.push((true, bytes));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_gathered_writes_and_single_slices_go_flat_and_large_ones_stay_vectored() {
        let mut io = send_flat(Recorder::default());
        let head = vec![b'h'; 150];
        let big = vec![b'b'; FLAT_MAX];
        let n = io
            .write_vectored(&[IoSlice::new(&head), IoSlice::new(b"blue\n")])
            .await
            .unwrap();
        assert_eq!(n, 155);
        io.flush().await.unwrap();
        let n = io
            .write_vectored(&[IoSlice::new(&head), IoSlice::new(&big)])
            .await
            .unwrap();
        assert_eq!(n, 150 + FLAT_MAX);
        io.flush().await.unwrap();
        let n = io.write_vectored(&[IoSlice::new(b"one")]).await.unwrap();
        assert_eq!(n, 3);
        io.flush().await.unwrap();
        let writes = &io.get_ref().0;
        let mut small = head.clone();
        small.extend_from_slice(b"blue\n");
        let mut large = head.clone();
        large.extend_from_slice(&big);
        assert_eq!(
            writes,
            &vec![(false, small), (true, large), (false, b"one".to_vec())]
        );
        assert!(io.is_write_vectored());
    }

    /// A socket whose peer has reset: every write fails; reads give `answer`, then the end.
    struct Reset {
        answer: Option<&'static [u8]>,
    }

    impl tokio::io::AsyncRead for Reset {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(answer) = self.answer.take() {
                buf.put_slice(answer);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Reset {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Once the peer is gone, writes are dropped while its answer is read, and fail again once
    /// reads have ended; the pool is told not to reuse the connection.
    #[tokio::test]
    async fn writes_to_a_gone_peer_are_dropped_until_its_answer_is_read() {
        let link = Arc::new(Link::new(1024));
        let mut io = KeepReading::new(
            Reset {
                answer: Some(b"413"),
            },
            Arc::clone(&link),
        );
        assert_eq!(io.write(b"body").await.unwrap(), 4);
        assert!(link.peer_gone.load(Ordering::Relaxed));
        io.flush().await.unwrap();
        let mut answer = Vec::new();
        io.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"413");
        let error = io.write(b"more").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }

    /// While the pool waits for an answer's head, reads fail past the head's room and
    /// `MAX_EARLY_BYTES` (interim answers without end); once the head is in, the body is read
    /// whatever its length, as is everything when no request waits.
    #[tokio::test]
    async fn reads_before_the_answers_head_are_bounded() {
        let bytes = vec![b'x'; MAX_EARLY_BYTES + 2048];
        let link = Arc::new(Link::new(1024));
        link.awaiting();
        let mut io = KeepReading::new(&bytes[..], Arc::clone(&link));
        let error = io.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.get_ref().is_some_and(|e| e.is::<TooManyInterim>()));
        // Within the bound, all is read.
        link.awaiting();
        let within = &bytes[..MAX_EARLY_BYTES + 1024];
        let mut io = KeepReading::new(within, Arc::clone(&link));
        assert_eq!(io.read_to_end(&mut Vec::new()).await.unwrap(), within.len());
        link.answered();
        for _ in 0..2 {
            let mut io = KeepReading::new(&bytes[..], Arc::clone(&link));
            assert_eq!(io.read_to_end(&mut Vec::new()).await.unwrap(), bytes.len());
        }
    }

    /// Over a real socket, whatever the split, the bytes arrive whole and in order.
    #[tokio::test]
    async fn bytes_arrive_in_order_over_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut io = send_flat(stream);
            let mut sent = Vec::new();
            for i in 0..200usize {
                let a = vec![(i % 251) as u8; i * 7 % 300];
                let b = vec![(i % 13) as u8; i * 31 % 3000];
                let slices = [IoSlice::new(&a), IoSlice::new(&b)];
                // write_all_vectored is unstable: write until both slices are gone.
                let mut rest: Vec<u8> = [a.as_slice(), b.as_slice()].concat();
                let n = io.write_vectored(&slices).await.unwrap();
                rest.drain(..n);
                io.write_all(&rest).await.unwrap();
                sent.extend_from_slice(&a);
                sent.extend_from_slice(&b);
            }
            io.shutdown().await.unwrap();
            sent
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, sender.await.unwrap());
    }
}
