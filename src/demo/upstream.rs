//! A small in-process HTTP upstream with injectable faults, for the demo, the integration tests
//! and the load tests: fixed status, error rate, added latency, blackhole, a body cut short,
//! a body sent slowly, and a record of what it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What the upstream does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers normally.
    Answer,
    /// Accepts connections and requests but never answers.
    Blackhole,
    /// Sends the head and half of a declared body, then resets the connection.
    CutBody,
    /// Answers 101 to an upgrade and echoes every byte back.
    WebSocketEcho,
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    /// `None` when the body did not arrive complete.
    pub body: Option<Bytes>,
}

#[derive(Clone, Debug)]
pub struct UpstreamBuilder {
    name: String,
    status: u16,
    error_rate: f64,
    error_status: u16,
    latency: Duration,
    behaviour: Behaviour,
    body: Bytes,
    record: bool,
    listen: SocketAddr,
    slow_body: Duration,
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub fn builder(name: &str) -> UpstreamBuilder {
        UpstreamBuilder {
            name: name.to_string(),
            status: 200,
            error_rate: 0.0,
            error_status: 500,
            latency: Duration::ZERO,
            behaviour: Behaviour::Answer,
            body: Bytes::new(),
            record: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            slow_body: Duration::ZERO,
        }
    }

    /// Requests seen so far (only with `record(true)`).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UpstreamBuilder {
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    /// Fraction of requests answered with `error_status` (500 unless set).
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }
    pub fn error_status(mut self, status: u16) -> Self {
        self.error_status = status;
        self
    }
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
    pub fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }
    /// The response body (default: the upstream's name and a newline).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
    /// Keep a copy of every request (method, URI, headers, body).
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// The address to bind (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }
    /// Sends the head at once and the body in ten pieces spread evenly over `duration`.
    pub fn slow_body(mut self, duration: Duration) -> Self {
        self.slow_body = duration;
        self
    }

    /// Binds the listen address (`127.0.0.1:0` unless set) and serves HTTP/1.1 and h2c.
    pub async fn start(self) -> std::io::Result<Upstream> {
        let socket = match self.listen {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.listen)?;
        // A queue as deep as veer's own: the std default (128) drops the SYNs of a burst of new
        // connections (a proxy opening one per stream of many clients at once), and each lost
        // SYN costs that connect a second.
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let body = if self.body.is_empty() {
            Bytes::from(format!("{}\n", self.name))
        } else {
            self.body.clone()
        };
        let shared = Arc::new(Shared {
            config: UpstreamBuilder { body, ..self },
            requests: Arc::new(AtomicU64::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        });
        let upstream = Upstream {
            addr,
            requests: Arc::clone(&shared.requests),
            in_flight: Arc::clone(&shared.in_flight),
            max_in_flight: Arc::clone(&shared.max_in_flight),
            seen: Arc::clone(&shared.seen),
            task: tokio::spawn(accept_loop(listener, shared)),
        };
        Ok(upstream)
    }
}

struct Shared {
    config: UpstreamBuilder,
    requests: Arc<AtomicU64>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(answer(&shared, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _in_flight = InFlight(&shared.in_flight);
    let config = &shared.config;
    let upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = body.collect().await.ok().map(|b| b.to_bytes());
    if config.record {
        if let Ok(mut seen) = shared.seen.lock() {
            seen.push(Seen {
                method: parts.method.clone(),
                uri: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
        }
    }
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    match config.behaviour {
        Behaviour::Blackhole => std::future::pending::<Response<Body>>().await,
        Behaviour::CutBody => cut_body(config),
        Behaviour::WebSocketEcho if parts.headers.contains_key(http::header::UPGRADE) => {
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            );
            headers.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            response
        }
        _ => {
            let failing = config.error_rate > 0.0 && fastrand::f64() < config.error_rate;
            let status = if failing {
                config.error_status
            } else {
                config.status
            };
            let body = if config.slow_body.is_zero() {
                full(config.body.clone())
            } else {
                slow(config.body.clone(), config.slow_body)
            };
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            response.headers_mut().insert(
                "x-upstream",
                http::HeaderValue::from_str(&config.name)
                    .unwrap_or(http::HeaderValue::from_static("upstream")),
            );
            response
        }
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// `body` in ten pieces (fewer when shorter), one every `total / 10`.
fn slow(body: Bytes, total: Duration) -> Body {
    const PIECES: usize = 10;
    let size = body.len().div_ceil(PIECES).max(1);
    let pause = total / PIECES as u32;
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(size)
        .map(|start| body.slice(start..(start + size).min(body.len())))
        .collect();
    let stream = futures_util::stream::unfold(pieces.into_iter(), move |mut rest| async move {
        let piece = rest.next()?;
        tokio::time::sleep(pause).await;
        Some((Ok(Frame::data(piece)), rest))
    });
    StreamBody::new(stream).boxed()
}

/// A response that declares 2x its body and then fails: the connection is reset mid-body.
fn cut_body(config: &UpstreamBuilder) -> Response<Body> {
    let half = config.body.clone();
    let frames = futures_stream(half);
    let mut response = Response::new(StreamBody::new(frames).boxed());
    let declared = (config.body.len() * 2).max(2);
    response.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(declared),
    );
    response
}

fn futures_stream(
    half: Bytes,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
{
    let mut half = Some(half);
    // The failure waits a moment so that the head and the first half are flushed first: hyper
    // would drop them unsent if the error came in the same poll.
    let mut pause = Box::pin(tokio::time::sleep(Duration::from_millis(20)));
    let mut failed = false;
    futures_util::stream::poll_fn(move |cx| {
        if let Some(h) = half.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(h))));
        }
        if failed {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
        failed = true;
        std::task::Poll::Ready(Some(Err(std::io::Error::other("upstream died mid-body"))))
    })
}
