//! What a connection's task needs to know to enforce its timers without a timer per request:
//! the protocol, whether an exchange is under way and since when none is, when the first byte
//! of an HTTP/1.1 request head arrived, and since when the client's socket has taken nothing.
//! The requests and the connection's reads and writes note it; the task reads it only when
//! its one sleep fires.

use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::Version;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Open;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// `head_at` while no head is awaited (an exchange is under way, or HTTP/2).
const NO_HEAD: u64 = u64::MAX;
/// `head_at` while an idle HTTP/1.1 connection waits for the first byte of the next head.
const AWAITING_HEAD: u64 = u64::MAX - 1;

/// The connection's timers, from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timers {
    /// A request head must arrive whole within this of its first byte (the first head: of
    /// the accept).
    pub header: Duration,
    /// A connection with no exchange under way is closed after this.
    pub idle: Duration,
    /// An HTTP/1.1 request body still being read this long after its answer ended is cut
    /// (`request_timeout`: the exchange is over for the client, and the upstream may have
    /// stopped reading without closing).
    pub exchange: Duration,
}

/// What the connection's task is to do when its sleep fires.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing yet: look again then.
    At(Instant),
    /// No exchange for `idle`: close gracefully.
    Idle,
    /// A request head did not arrive whole in time: close at once.
    SlowHead,
    /// The client's socket has taken nothing of what veer writes for `idle`: close at once
    /// (the exchange's upstream connection goes with it).
    Stalled,
    /// An HTTP/1.1 request body is still being read `exchange` after its answer ended: close
    /// at once.
    BodyOverdue,
}

/// `write_blocked_at` while the socket takes what veer writes.
const NOT_BLOCKED: u64 = u64::MAX;

pub(crate) struct Activity {
    opened: Instant,
    /// A `Protocol` as a number, known once a request head arrived.
    protocol: AtomicU8,
    /// Holds on exchanges under way: response bodies not yet done, and request bodies.
    open: AtomicUsize,
    /// Of those, the response bodies (and requests not yet answered).
    answering: AtomicUsize,
    /// When the last exchange ended, in milliseconds after `opened`.
    quiet_since: AtomicU64,
    /// When the first byte of the awaited request head arrived, in milliseconds after
    /// `opened`, or `AWAITING_HEAD`, or `NO_HEAD`. The first head counts from `opened`.
    head_at: AtomicU64,
    /// Since when writes have found the socket full with none taken since, in milliseconds
    /// after `opened`, or `NOT_BLOCKED`.
    write_blocked_at: AtomicU64,
    /// Reads and writes that moved bytes, counted: whether a connection is still sending or
    /// taking anything between two looks.
    moved: AtomicU64,
    /// HTTP/2 response bodies waiting for the client to take what they have (a stream with
    /// no window), by the tick of [`Starving`] they began waiting in, modulo [`TICKS`].
    waiting: [AtomicU32; TICKS],
    /// The current tick of [`Starving`].
    tick: AtomicU32,
    /// HTTP/2: the streams whose exchange is over, and of those the ones the client cut short
    /// (see [`Activity::stream_closed`]).
    streams_closed: AtomicU64,
    cut_short: AtomicU64,
    /// Set once the client has cut short too many streams: the connection is to close.
    flooded: AtomicBool,
    /// Set when a request body was let go before its end (answered without being read, cut at
    /// a limit, failed): its client may still be sending (see [`linger`]).
    body_unread: AtomicBool,
    /// Set when the connection is cut for a timeout or abuse: it does not linger.
    cut: AtomicBool,
    /// Set once the connection's task saw the drain signal (see [`InFlight::drained`]).
    draining: AtomicBool,
}

/// HTTP/2 streams a connection must have closed before the share of them its client cut short
/// is looked at (Envoy's `premature_reset_total_stream_count`).
const FLOOD_STREAMS: u64 = 500;

/// A stream the client resets within this many milliseconds of its request, before its answer
/// has ended, is cut short (Envoy's `premature_reset_min_stream_lifetime`, 1 s).
const CUT_SHORT_MS: u32 = 1000;

/// Ticks of the starved-stream clock kept (see [`Starving`]).
const TICKS: usize = 16;

impl Activity {
    /// A connection accepted at `opened`.
    pub(crate) fn new(opened: Instant) -> Self {
        Activity {
            opened,
            protocol: AtomicU8::new(Protocol::Unknown as u8),
            open: AtomicUsize::new(0),
            answering: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            head_at: AtomicU64::new(0),
            write_blocked_at: AtomicU64::new(NOT_BLOCKED),
            moved: AtomicU64::new(0),
            waiting: Default::default(),
            tick: AtomicU32::new(0),
            streams_closed: AtomicU64::new(0),
            cut_short: AtomicU64::new(0),
            flooded: AtomicBool::new(false),
            body_unread: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// The drain began: HTTP/1 answers from now on end their connection.
    pub(super) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(super) fn protocol(&self) -> Protocol {
        match self.protocol.load(Ordering::Relaxed) {
            1 => Protocol::Http1,
            2 => Protocol::Http2,
            _ => Protocol::Unknown,
        }
    }

    fn millis(&self) -> u64 {
        self.millis_at(Instant::now())
    }

    /// `at`, in milliseconds after `opened`.
    fn millis_at(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.opened);
        u64::try_from(since.as_millis()).unwrap_or(AWAITING_HEAD - 1)
    }

    /// Notes a request that arrived `at`: its exchange is under way while the guard lives.
    pub(crate) fn request(this: &Arc<Self>, version: Version, at: Instant) -> InFlight {
        // Over HTTP/2 the exchange's start is kept, to tell a stream the client cut short.
        let (protocol, began) = if version == Version::HTTP_2 {
            (Protocol::Http2, this.millis_at(at) as u32)
        } else {
            (Protocol::Http1, 0)
        };
        this.protocol.store(protocol as u8, Ordering::Relaxed);
        this.head_at.store(NO_HEAD, Ordering::Relaxed);
        this.open.fetch_add(1, Ordering::Relaxed);
        this.answering.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: Arc::clone(this),
            answering: true,
            waiting: NOT_WAITING,
            ended: false,
            began,
        }
    }

    /// Whether an exchange is under way.
    pub(super) fn is_busy(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }

    /// How many reads and writes have moved bytes so far (see [`Activity::moved`]).
    pub(super) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    pub(super) fn is_h2(&self) -> bool {
        self.protocol() == Protocol::Http2
    }

    /// No request head has arrived on the connection yet.
    pub(super) fn no_request_yet(&self) -> bool {
        self.protocol() == Protocol::Unknown
    }

    /// Ready once the client has cut short most of its streams (see
    /// [`Activity::stream_closed`]). It registers no waker: the flag is set by a stream's own
    /// task, after the connection's task read the client's reset, and the client's next frame
    /// wakes the connection's task again (a client that sends nothing more costs nothing more).
    pub(super) fn flooded(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|_| {
            if self.flooded.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// An HTTP/2 stream's exchange is over, at `now` (milliseconds after `opened`). One whose
    /// answer had not ended and that lasted under [`CUT_SHORT_MS`] was cut short by its client
    /// (a reset, or the connection's end). A client that opens streams and resets them at once,
    /// after veer accepted them, costs the upstreams a request each and itself two frames
    /// (the reset-after-accept form of HTTP/2's rapid reset, CVE-2023-44487; h2 itself bounds
    /// resets of streams not yet accepted): once at least [`FLOOD_STREAMS`] streams are over and
    /// half of them were cut short, the connection is flagged to close (Envoy's rule).
    fn stream_closed(&self, ended: bool, began: u32, now: u64) {
        let closed = self.streams_closed.fetch_add(1, Ordering::Relaxed) + 1;
        if ended || (now as u32).wrapping_sub(began) >= CUT_SHORT_MS {
            return;
        }
        let cut_short = self.cut_short.fetch_add(1, Ordering::Relaxed) + 1;
        if closed >= FLOOD_STREAMS && cut_short * 2 >= closed {
            self.flooded.store(true, Ordering::Relaxed);
        }
    }

    /// The connection is being cut (a timeout, a flood): its socket closes at once, without
    /// lingering for what its client still sends (as NGINX closes at its timeouts).
    pub(super) fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// An HTTP/2 connection with no stream under way.
    pub(super) fn is_idle_h2(&self) -> bool {
        self.is_h2() && !self.is_busy()
    }

    /// Bytes were read: if they start an awaited request head, its clock starts.
    fn read(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
        if self.head_at.load(Ordering::Relaxed) == AWAITING_HEAD {
            self.head_at.store(self.millis(), Ordering::Relaxed);
        }
    }

    /// Notes a write to the socket. `Pending`: the socket is full, and the stall clock starts
    /// unless it runs. Bytes taken: the kernel made room for them, so the client read (the
    /// socket is written to directly, with no buffer in between), and the clock stops.
    fn wrote(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => {
                if self.write_blocked_at.load(Ordering::Relaxed) == NOT_BLOCKED {
                    self.write_blocked_at
                        .store(self.millis(), Ordering::Relaxed);
                }
            }
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.moved.fetch_add(1, Ordering::Relaxed);
                if self.write_blocked_at.load(Ordering::Relaxed) != NOT_BLOCKED {
                    self.write_blocked_at.store(NOT_BLOCKED, Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {}
        }
    }

    /// A response body begins to wait for the client to take what it has: counted in the
    /// current tick's bucket until [`Activity::taken`] with the bucket returned.
    fn waits(&self) -> u8 {
        let bucket = self.tick.load(Ordering::Relaxed) as usize % TICKS;
        self.waiting[bucket].fetch_add(1, Ordering::Relaxed);
        bucket as u8
    }

    /// The body counted in `bucket` waits no more.
    fn taken(&self, bucket: u8) {
        self.waiting[usize::from(bucket)].fetch_sub(1, Ordering::Relaxed);
    }

    /// What is due at `now`.
    pub(super) fn due(&self, now: Instant, timers: Timers) -> Due {
        let blocked = self.write_blocked_at.load(Ordering::Relaxed);
        let stall_at = (blocked != NOT_BLOCKED)
            .then(|| self.opened + Duration::from_millis(blocked) + timers.idle);
        match (stall_at, self.due_reading(now, timers)) {
            (Some(at), _) if at <= now => Due::Stalled,
            (Some(at), Due::At(next)) => Due::At(next.min(at)),
            (_, due) => due,
        }
    }

    /// What is due at `now` on the reading side: a head in time, an idle close.
    fn due_reading(&self, now: Instant, timers: Timers) -> Due {
        // Look again soon enough to see in time whatever may happen until then: a head
        // that starts, an exchange that ends.
        let next_look = now + timers.idle.min(timers.header).min(timers.exchange);
        // While an exchange is under way no head is awaited, whatever `head_at` says: the
        // last hold to go re-arms it.
        if self.open.load(Ordering::Acquire) > 0 {
            let reading_only = self.answering.load(Ordering::Acquire) == 0;
            if reading_only && self.protocol() == Protocol::Http1 {
                let answered = Duration::from_millis(self.quiet_since.load(Ordering::Relaxed));
                let cut_at = self.opened + answered + timers.exchange;
                return if cut_at <= now {
                    Due::BodyOverdue
                } else {
                    Due::At(cut_at.min(next_look))
                };
            }
            return Due::At(next_look);
        }
        let head = self.head_at.load(Ordering::Relaxed);
        if head < AWAITING_HEAD {
            let at = self.opened + Duration::from_millis(head) + timers.header;
            return if at <= now {
                Due::SlowHead
            } else {
                Due::At(at.min(next_look))
            };
        }
        let quiet = Duration::from_millis(self.quiet_since.load(Ordering::Relaxed));
        let idle_at = self.opened + quiet + timers.idle;
        if idle_at <= now {
            Due::Idle
        } else {
            Due::At(idle_at.min(next_look))
        }
    }
}

/// A hold on one exchange under way on a connection. The exchange is over when its last hold
/// is dropped: the response body's, and the request body's, which may be read on after the
/// answer (an upstream that answered before the upload ended).
pub struct InFlight {
    activity: Arc<Activity>,
    /// The response's hold (not the request body's).
    answering: bool,
    /// HTTP/2: the bucket of [`Activity::waiting`] its response body is counted in while it
    /// waits for the client, or `NOT_WAITING`. Here, not in [`Tracked`], so that it fits in
    /// this struct's padding (as do the two fields below).
    waiting: u8,
    /// HTTP/2: the answer has ended (or failed): the exchange was not cut short by the client.
    /// For a request body's hold: the body was read to its end.
    ended: bool,
    /// HTTP/2: when the request arrived, in milliseconds after the connection's `opened`
    /// (truncated: only differences of under 49 days are taken).
    began: u32,
}

/// `InFlight::waiting` while the body does not wait for its client.
const NOT_WAITING: u8 = u8::MAX;

impl InFlight {
    /// The hold of a request's `body` on the same exchange, when there is a body: let go with
    /// [`InFlight::body_read`] when the body has been read to its end; dropped before, it marks
    /// the connection as having bytes of its client unread.
    pub(crate) fn body_hold(&self, body: &impl Body) -> Option<InFlight> {
        (!body.is_end_stream()).then(|| self.also())
    }

    /// Whether the drain began (an HTTP/1 answer then says `Connection: close`).
    pub(crate) fn drained(&self) -> bool {
        self.activity.draining.load(Ordering::Relaxed)
    }

    fn also(&self) -> InFlight {
        self.activity.open.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: Arc::clone(&self.activity),
            answering: false,
            waiting: NOT_WAITING,
            ended: false,
            began: 0,
        }
    }

    /// Lets go of a request body's hold (see [`InFlight::body_hold`]): the body was read whole.
    pub(crate) fn body_read(mut self) {
        self.ended = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        if !self.answering && !self.ended {
            activity.body_unread.store(true, Ordering::Relaxed);
        }
        if self.waiting != NOT_WAITING {
            activity.taken(self.waiting);
        }
        let now = activity.millis();
        activity.quiet_since.fetch_max(now, Ordering::Relaxed);
        if self.answering {
            activity.answering.fetch_sub(1, Ordering::AcqRel);
            if activity.protocol() == Protocol::Http2 {
                activity.stream_closed(self.ended, self.began, now);
            }
        }
        let last = activity.open.fetch_sub(1, Ordering::AcqRel) == 1;
        // HTTP/1.1 has one exchange at a time: once it is over, the next head is awaited.
        if last && activity.protocol() == Protocol::Http1 {
            activity.head_at.store(AWAITING_HEAD, Ordering::Relaxed);
        }
    }
}

pin_project! {
    /// A response body that keeps its exchange under way until it is dropped. Over HTTP/2 it
    /// also tells its connection's [`Activity`] while it waits for the client to take what it
    /// has: hyper asks a stream's body for more only when the client's window has room, so a
    /// client that grants a stream none would hold it, and its upstream connection, for good
    /// (see [`Starving`]).
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        exchange: InFlight,
        // HTTP/2: the rest of a data frame handed over in pieces of `PIECE`.
        rest: Option<Box<Bytes>>,
    }
}

/// The most an HTTP/2 answer hands hyper at once: hyper asks for more only once what it has
/// is nearly sent, so the time between two asks is the time the client takes to make room for
/// this much, and a slow reader is told from one that takes nothing. (An upstream read can be
/// 400 KiB: a client taking 100 KB/s would seem to wait 4 s.)
const PIECE: usize = 16 << 10;

impl<B: Body> Tracked<B> {
    /// `body`, handed to the client's connection: over HTTP/2 it waits from now until hyper
    /// first asks it for a frame (an empty one is not asked: the answer has ended).
    pub(crate) fn new(body: B, mut exchange: InFlight) -> Self {
        if exchange.activity.is_h2() {
            exchange.waiting = exchange.activity.waits();
            exchange.ended = body.is_end_stream();
        }
        Tracked {
            body,
            exchange,
            rest: None,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let exchange = this.exchange;
        if exchange.waiting != NOT_WAITING {
            exchange.activity.taken(exchange.waiting);
            exchange.waiting = NOT_WAITING;
        }
        let polled = match this.rest.take() {
            Some(rest) => Poll::Ready(Some(Ok(Frame::data(*rest)))),
            None => this.body.as_mut().poll_frame(cx),
        };
        match polled {
            // Data handed over: until hyper asks again, the client's window is what it waits
            // for.
            Poll::Ready(Some(Ok(frame))) if frame.is_data() && exchange.activity.is_h2() => {
                let mut data = frame.into_data().unwrap_or_default();
                if data.len() > PIECE {
                    *this.rest = Some(Box::new(data.split_off(PIECE)));
                }
                exchange.waiting = exchange.activity.waits();
                // hyper asks no more of a body that says it has ended.
                exchange.ended = this.rest.is_none() && this.body.is_end_stream();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
            // The end, trailers (the end too), or a failure of the upstream's body.
            polled => {
                exchange.ended = true;
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        if let Some(rest) = &self.rest {
            let n = rest.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + n);
            }
            hint.set_lower(hint.lower() + n);
        }
        hint
    }
}

/// The starved-stream clock of one connection, kept by its task: an HTTP/2 response body that
/// has waited `idle_timeout` for the client to take what it has (its stream granted no window
/// all that time, while the client kept the connection busy otherwise) gets its connection
/// closed: gracefully first, so that its other streams can end, then at once `idle_timeout`
/// later if it is still open (hyper cannot end one stream from outside; NGINX's `send_timeout`
/// ends the stream alone).
///
/// Bodies note the tick they begin waiting in (a relaxed load and an add, no clock read); the
/// task advances the tick at most every `idle_timeout / 8` when it looks (at least that often
/// on an HTTP/2 connection), and a body counted in a tick began waiting before the next one
/// began: it is found after waiting `idle_timeout` at least, and at most about
/// `idle_timeout / 4` later (a body that began waiting before the connection's first look,
/// `header_timeout` or `idle_timeout` after it opened, whichever is less, up to that much
/// later).
pub(super) struct Starving {
    /// When each of the last `TICKS` ticks began.
    began: [Instant; TICKS],
    current: u32,
}

impl Starving {
    pub(super) fn new(now: Instant) -> Self {
        Starving {
            began: [now; TICKS],
            current: 0,
        }
    }

    /// Whether a body of `activity`'s connection has waited for its client for `idle` at
    /// least, looked at `now`; moves the clock on.
    pub(super) fn starved(&mut self, activity: &Activity, now: Instant, idle: Duration) -> bool {
        // Ticks older than about 10 are never counted in: their bodies would have been found
        // (and the clock is not looked at once one is).
        for age in 1..TICKS as u32 {
            let Some(tick) = self.current.checked_sub(age) else {
                break;
            };
            let next_began = self.began[(tick + 1) as usize % TICKS];
            if activity.waiting[tick as usize % TICKS].load(Ordering::Relaxed) > 0
                && now.saturating_duration_since(next_began) >= idle
            {
                return true;
            }
        }
        let began = self.began[self.current as usize % TICKS];
        if now.saturating_duration_since(began) >= idle / 8 {
            self.current += 1;
            self.began[self.current as usize % TICKS] = now;
            activity.tick.store(self.current, Ordering::Relaxed);
        }
        false
    }
}

/// The connection's socket, telling its `Activity` when bytes arrive (a relaxed load per read;
/// a clock read only for the first byte of a head) and whether writes find room, and holding
/// what an open connection holds until it is closed. It sits right on the socket, under TLS and
/// any write buffer, so that a write taken is a write the kernel took (and over TLS a read is a
/// record's bytes: any record starts an awaited head's clock). Closed while its client may
/// still be sending, it lingers (see [`linger`]).
pub(crate) struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
    // A proxy connection's hold on the drain and the connection gauge, let go when it drops.
    _open: Option<Open>,
}

impl Watched {
    pub(crate) fn new(io: TcpStream, activity: Arc<Activity>, open: Option<Open>) -> Self {
        Watched {
            io,
            activity,
            _open: open,
        }
    }

    /// Ready once the socket has bytes to read (or is closed, or failed).
    pub(crate) async fn readable(&self) -> std::io::Result<()> {
        self.io.readable().await
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.activity.cut.load(Ordering::Relaxed) {
            linger(&self.io, self.activity.body_unread.load(Ordering::Relaxed));
        }
    }
}

/// How long a closed connection's socket is kept to read and discard what its client still
/// sends, at most, and without a byte (NGINX's `lingering_time` and `lingering_timeout`).
const LINGER_MAX: Duration = Duration::from_secs(30);
const LINGER_QUIET: Duration = Duration::from_secs(5);

/// Keeps a closed connection's socket open to read and discard what its client still sends,
/// when bytes of the client are unread at the close or `body_unread` (a request body of the
/// connection was let go before its end: one veer answered 413 to, or refused before reading,
/// while the client still uploads it), unless the connection was cut for a timeout or abuse
/// (see [`Activity::cut`]). Closed at once, such a socket would answer the client
/// with a reset, and a client that writes its whole body before it reads (Python's `requests`,
/// say) would get the reset instead of the answer waiting for it. The write side is shut (the
/// answer, all of it written, ends with a FIN), then the socket is read until the client
/// closes, `LINGER_QUIET` passes without a byte, or `LINGER_MAX` is over. It no longer counts
/// as a connection (gauge, drain). One `recv` per closed connection finds out.
fn linger(io: &TcpStream, body_unread: bool) {
    let mut probe = [0u8; 1024];
    // The socket is non-blocking: `WouldBlock` when nothing is waiting. A body left unread may
    // still be on its way (veer can answer its head before its first bytes arrive).
    match (&*socket2::SockRef::from(io)).read(&mut probe) {
        Ok(n) if n > 0 => {}
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock && body_unread => {}
        _ => return,
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // A second descriptor of the socket: it stays open when hyper's is closed.
    let Ok(fd) = io.as_fd().try_clone_to_owned() else {
        return;
    };
    let _runtime = handle.enter();
    let Ok(mut socket) = TcpStream::from_std(std::net::TcpStream::from(fd)) else {
        return;
    };
    handle.spawn(async move {
        let _ = socket.shutdown().await;
        let end = Instant::now() + LINGER_MAX;
        let mut sink = [0u8; 8192];
        loop {
            let quiet_end = (Instant::now() + LINGER_QUIET).min(end);
            match tokio::time::timeout_at(quiet_end, socket.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    });
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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

    /// A connection (server side, wrapped as veer wraps it) whose client sent bytes it did not
    /// read, and the client's next writes after veer drops it, for 1 s: whether they all
    /// succeeded (the socket lingered) or one failed (it was closed at once, the kernel
    /// answering with a reset).
    async fn writes_after_the_close(cut: bool) -> bool {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let activity = Arc::new(Activity::new(Instant::now()));
        let watched = Watched::new(server, Arc::clone(&activity), None);
        client.write_all(b"POST / HTTP/1.1\r\n").await.unwrap();
        // Until the bytes are in the server's socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if cut {
            activity.cut();
        }
        drop(watched);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if client.write_all(&[b'x'; 1024]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Closed with bytes of its client unread, a connection lingers, reading what still comes;
    /// cut for a timeout or abuse, it is closed at once.
    #[tokio::test]
    async fn a_closed_connection_lingers_unless_cut() {
        assert!(writes_after_the_close(false).await, "did not linger");
        assert!(!writes_after_the_close(true).await, "lingered after a cut");
    }

    const TIMERS: Timers = Timers {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        exchange: Duration::from_secs(60),
    };

    fn after(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    /// The second, of looks `every` apart, at which `starving` finds a body of `activity`
    /// starved for `idle`, or `None` within 100 s; `each_look` runs before every look.
    async fn starved_at(
        activity: &Activity,
        every: Duration,
        idle: Duration,
        mut each_look: impl FnMut(),
    ) -> Option<u64> {
        let start = Instant::now();
        let mut starving = Starving::new(start);
        while start.elapsed() < Duration::from_secs(100) {
            tokio::time::advance(every).await;
            each_look();
            if starving.starved(activity, Instant::now(), idle) {
                return Some(start.elapsed().as_secs());
            }
        }
        None
    }

    /// An HTTP/2 body that waits for its client from the moment it is handed over is found
    /// starved after `idle` at least and `idle + idle / 8` plus two looks at most (the task
    /// looks at least every `idle / 8` on an HTTP/2 connection); one that waits no more, or is
    /// dropped, never; nor one handed a piece every 3 s (a slow reader's window).
    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_for_its_client_for_idle_timeout_is_starved() {
        let idle = Duration::from_secs(8);
        let body = || http_body_util::Empty::<Bytes>::new();
        for every in [Duration::from_millis(500), idle / 8] {
            let activity = Arc::new(Activity::new(Instant::now()));
            let exchange = Activity::request(&activity, Version::HTTP_2, Instant::now());
            let waiting = Tracked::new(body(), exchange);
            let at = starved_at(&activity, every, idle, || {}).await;
            assert!(
                at.is_some_and(|s| (8..=11).contains(&s)),
                "{every:?}: {at:?}"
            );
            drop(waiting);
            let at = starved_at(&activity, every, idle, || {}).await;
            assert_eq!(at, None, "{every:?}");
        }
        let activity = Arc::new(Activity::new(Instant::now()));
        let mut bucket = activity.waits();
        let mut n = 0;
        let at = starved_at(&activity, Duration::from_secs(1), idle, || {
            n += 1;
            if n % 3 == 0 {
                activity.taken(bucket);
                bucket = activity.waits();
            }
        })
        .await;
        assert_eq!(at, None);
        activity.taken(bucket);
        // HTTP/1.1 bodies are not counted: a full socket is the stall clock's.
        let exchange = Activity::request(&activity, Version::HTTP_11, Instant::now());
        let _body = Tracked::new(body(), exchange);
        let at = starved_at(&activity, Duration::from_secs(1), idle, || {}).await;
        assert_eq!(at, None);
    }

    /// Over HTTP/2 a data frame is handed over in pieces of `PIECE` bytes, all of it, with
    /// the size hint still exact; over HTTP/1.1 whole.
    #[tokio::test]
    async fn an_http2_answer_is_handed_over_in_pieces() {
        use http_body_util::BodyExt;
        let data = Bytes::from(vec![7u8; 2 * PIECE + 5]);
        for (version, sizes) in [
            (Version::HTTP_2, vec![PIECE, PIECE, 5]),
            (Version::HTTP_11, vec![2 * PIECE + 5]),
        ] {
            let activity = Arc::new(Activity::new(Instant::now()));
            let exchange = Activity::request(&activity, version, Instant::now());
            let full = http_body_util::Full::new(data.clone());
            let mut body = Tracked::new(full, exchange);
            let mut got = Vec::new();
            while let Some(frame) = body.frame().await {
                let hint = body.size_hint();
                let chunk = frame.unwrap().into_data().unwrap();
                got.push(chunk.len());
                let left = (data.len() - got.iter().sum::<usize>()) as u64;
                assert_eq!(
                    (hint.lower(), hint.upper()),
                    (left, Some(left)),
                    "{version:?}"
                );
            }
            assert_eq!(got, sizes, "{version:?}");
            assert!(body.is_end_stream());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_runs_from_the_first_blocked_write_until_the_socket_takes_bytes() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let _exchange = Activity::request(&activity, Version::HTTP_11, Instant::now());
        activity.wrote(&Poll::Pending);
        tokio::time::advance(Duration::from_secs(30)).await;
        // A later write that finds the socket still full, or that fails, moves nothing.
        activity.wrote(&Poll::Pending);
        activity.wrote(&Poll::Ready(Ok(0)));
        activity.wrote(&Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::Stalled);
        activity.wrote(&Poll::Ready(Ok(1)));
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn no_head_is_timed_while_an_exchange_is_under_way() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let exchange = Activity::request(&activity, Version::HTTP_11, Instant::now());
        // Even with a head clock left running (a late store from another hold's drop).
        activity.head_at.store(0, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
        drop(exchange);
        activity.read();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::SlowHead);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_due_header_timeout_after_the_accept() {
        let activity = Activity::new(Instant::now());
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::SlowHead);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_connection_idles_then_times_its_next_head_from_the_first_byte() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let exchange = Activity::request(&activity, Version::HTTP_11, Instant::now());
        // Reads during the exchange (its body) start no head.
        activity.read();
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
        drop(exchange);
        let idle_at = after(60);
        // Looked at every 10 s while idle, to see a head start in time.
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
        activity.read();
        let head_due = after(10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(head_due));
        // A byte more does not move the head's deadline.
        activity.read();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::SlowHead);
        assert!(idle_at > Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_looked_at_again_within_idle_timeout() {
        let activity = Activity::new(Instant::now());
        let timers = Timers {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(1),
            exchange: Duration::from_secs(60),
        };
        assert_eq!(activity.due(Instant::now(), timers), Due::At(after(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_due_idle_timeout_after_its_last_exchange() {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let activity = Arc::new(Activity::new(Instant::now()));
            drop(Activity::request(&activity, version, Instant::now()));
            let timers = Timers {
                header: Duration::from_secs(10),
                idle: Duration::from_secs(1),
                exchange: Duration::from_secs(60),
            };
            assert_eq!(activity.due(Instant::now(), timers), Due::At(after(1)));
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(
                activity.due(Instant::now(), timers),
                Due::Idle,
                "{version:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn http2_reads_start_no_head() {
        let activity = Arc::new(Activity::new(Instant::now()));
        drop(Activity::request(
            &activity,
            Version::HTTP_2,
            Instant::now(),
        ));
        activity.read();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(activity.due(Instant::now(), TIMERS), Due::At(after(10)));
    }

    /// Ends `n` exchanges of `version` on `activity` at once: answered, or cut short (their
    /// hold dropped before the answer ended).
    fn close_streams(activity: &Arc<Activity>, version: Version, n: usize, answered: bool) {
        for _ in 0..n {
            let mut exchange = Activity::request(activity, version, Instant::now());
            exchange.ended = answered;
            drop(exchange);
        }
    }

    fn flooded(activity: &Activity) -> bool {
        activity.flooded.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2_connection_is_flooded_once_half_of_500_streams_were_cut_short() {
        let activity = Arc::new(Activity::new(Instant::now()));
        close_streams(&activity, Version::HTTP_2, 499, false);
        assert!(!flooded(&activity), "499 streams");
        close_streams(&activity, Version::HTTP_2, 1, false);
        assert!(flooded(&activity));

        let activity = Arc::new(Activity::new(Instant::now()));
        close_streams(&activity, Version::HTTP_2, 251, true);
        close_streams(&activity, Version::HTTP_2, 249, false);
        assert!(!flooded(&activity), "249 of 500 cut short");
        close_streams(&activity, Version::HTTP_2, 1, false);
        assert!(!flooded(&activity), "250 of 501 cut short");
        close_streams(&activity, Version::HTTP_2, 1, false);
        assert!(flooded(&activity), "251 of 502 cut short");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_cut_short_after_a_second_and_http1_exchanges_do_not_count() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let long: Vec<_> = (0..500)
            .map(|_| Activity::request(&activity, Version::HTTP_2, Instant::now()))
            .collect();
        tokio::time::advance(Duration::from_millis(1000)).await;
        drop(long);
        close_streams(&activity, Version::HTTP_2, 499, false);
        assert!(!flooded(&activity), "499 of 999 cut short within a second");

        let activity = Arc::new(Activity::new(Instant::now()));
        close_streams(&activity, Version::HTTP_11, 1000, false);
        assert!(!flooded(&activity));
    }
}
