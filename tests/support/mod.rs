//! Shared helpers for the integration tests: an in-process veer on `127.0.0.1:0` with its config
//! in a temporary directory, in-process upstreams (`veer::demo::upstream::Upstream`), and small
//! HTTP clients (hyper, and raw sockets for malformed input).
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use veer::demo::upstream::{Behaviour, Seen, Upstream};

pub mod load;
pub mod wire;

/// A running veer with its config file and state dir in a temporary directory.
pub struct Veer {
    pub running: Option<veer::app::Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// The config text for `routes` (one or more `[[route]]` tables) with the server on
/// `127.0.0.1:0`, the admin API on `127.0.0.1:0` and the state dir in `dir`. `server_extra`
/// goes into `[server]`.
pub fn config_text(dir: &std::path::Path, server_extra: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [state]\ndir = \"{}\"\n\n{routes}",
        dir.join("state").display()
    )
}

/// A route on any host and `/` with the given blue and green endpoints; `extra` is appended
/// (e.g. `[route.rollout]\nmode = \"manual\"\nweight = 10`).
pub fn route(name: &str, blue: SocketAddr, green: SocketAddr, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\n[route.blue]\nendpoints = [\"{blue}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{green}\"]\nversion = \"v2\"\n{extra}\n"
    )
}

/// A route on `hosts` (empty = any host) and `prefix` with both slots on `upstream`.
pub fn host_route(name: &str, hosts: &[&str], prefix: &str, upstream: SocketAddr) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[route]]\nname = \"{name}\"\nhosts = [{}]\npath_prefix = \"{prefix}\"\n\
         [route.blue]\nendpoints = [\"{upstream}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{upstream}\"]\nversion = \"v2\"\n\n",
        hosts.join(", ")
    )
}

/// An upstream named `name` (it answers `name` and a newline) that records every request.
pub async fn recording(name: &str) -> Upstream {
    Upstream::builder(name).record(true).start().await.unwrap()
}

/// An upstream named `name` that takes connections and requests and never answers.
pub async fn blackhole(name: &str) -> Upstream {
    Upstream::builder(name)
        .behaviour(Behaviour::Blackhole)
        .start()
        .await
        .unwrap()
}

/// A port on loopback that refuses connections.
pub async fn closed_addr() -> SocketAddr {
    // Bound but not listening: connecting is refused, and no other test can take the port
    // while the socket is held, which is for the rest of the test process.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

impl Veer {
    /// veer with `server_extra` in `[server]` and one route, `shop`, on any host and `/`, with
    /// both slots on `upstream`.
    pub async fn shop(server_extra: &str, upstream: SocketAddr) -> Veer {
        Self::start(server_extra, &route("shop", upstream, upstream, "")).await
    }

    /// Starts veer from config text written to `<tempdir>/veer.toml` (so reloads work).
    pub async fn start(server_extra: &str, routes: &str) -> Veer {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), server_extra, routes);
        Self::start_in(dir, &text).await
    }

    /// Starts veer from full config text in an existing directory.
    pub async fn start_in(dir: tempfile::TempDir, text: &str) -> Veer {
        let config_path = dir.path().join("veer.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = veer::config::Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
        let running = veer::app::start(config, Some(config_path.clone()))
            .await
            .unwrap();
        Veer {
            addr: running.proxy_addrs[0],
            admin: running.admin_addr,
            running: Some(running),
            dir,
            config_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let (status, _, body) = send(Method::GET, &self.admin_url(path), &[], Bytes::new()).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn admin_post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let (status, _, body) = send(
            Method::POST,
            &self.admin_url(path),
            &[],
            Bytes::from(body.to_string()),
        )
        .await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// The admin API's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let (status, _, body) = get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The route JSON of `/api/v1/routes/{name}`.
    pub async fn route_status(&self, name: &str) -> Value {
        let (status, value) = self.admin_get(&format!("/api/v1/routes/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value
    }

    /// `slots.<slot>` of the route JSON of `route`.
    pub async fn slot(&self, route: &str, slot: &str) -> Value {
        self.route_status(route).await["slots"][slot].clone()
    }

    /// Client connections open on the proxy listeners now.
    pub fn open_connections(&self) -> i64 {
        let running = self.running.as_ref().expect("veer is running");
        running
            .app
            .connections
            .iter()
            .map(|(_, open)| open.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

pub type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 (prior knowledge) connection to `addr`, and the task that drives it (it ends when
/// the connection does).
pub async fn h2c_to(addr: SocketAddr) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// One request with hyper's client (HTTP/1.1); returns status, headers and the whole body.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(request.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("request timed out")
    .expect("request failed");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    send(Method::GET, url, headers, Bytes::new()).await
}

/// Writes raw bytes to `addr` and reads until the peer closes or 3 s pass.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects to `addr` and writes `bytes`; the connection stays open for the test to go on.
pub async fn raw_open(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// The status code of a raw HTTP/1.1 answer (`HTTP/1.1 400 ...`).
pub fn raw_status(answer: &str) -> Option<u16> {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// True when a slot's JSON (`slots.<slot>` of a route) counts no error of any kind.
pub fn no_errors(slot: &Value) -> bool {
    slot["errors"].as_object().unwrap().values().all(|n| n == 0)
}

/// Asserts that `upstream` has received exactly `n` requests within `timeout` (polled).
pub async fn await_requests(upstream: &Upstream, n: u64, timeout: Duration) {
    let reached = eventually(timeout, || async { upstream.request_count() == n }).await;
    assert!(
        reached,
        "{} requests after {timeout:?}, expected {n}",
        upstream.request_count()
    );
}

/// The one request a recording upstream has seen, once it has finished recording it (up to
/// 5 s: a request is recorded when its body has ended or failed). Fails when there is none
/// or more than one.
pub async fn only_request(upstream: &Upstream) -> Seen {
    let recorded = eventually(Duration::from_secs(5), || async {
        !upstream.seen().is_empty()
    })
    .await;
    assert!(recorded, "no request recorded within 5 s");
    let mut seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.remove(0)
}

/// GETs `url` once per header list, `concurrency` at a time over one pool of keep-alive
/// connections; the answers come back in the order of `requests`.
pub async fn get_many(
    url: &str,
    requests: Vec<Vec<(String, String)>>,
    concurrency: usize,
) -> Vec<(StatusCode, HeaderMap, Bytes)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, requests, next) = (client.clone(), Arc::clone(&requests), Arc::clone(&next));
        let url = url.to_string();
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(headers) = requests.get(i) else {
                    return done;
                };
                let mut request = Request::get(url.as_str());
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let response = tokio::time::timeout(
                    Duration::from_secs(20),
                    client.request(request.body(Full::new(Bytes::new())).unwrap()),
                )
                .await
                .expect("request timed out")
                .expect("request failed");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                done.push((i, (parts.status, parts.headers, body)));
            }
        });
    }
    let mut answers: Vec<Option<(StatusCode, HeaderMap, Bytes)>> = vec![None; requests.len()];
    while let Some(done) = workers.join_next().await {
        for (i, answer) in done.unwrap() {
            answers[i] = Some(answer);
        }
    }
    answers.into_iter().map(Option::unwrap).collect()
}
