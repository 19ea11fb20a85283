//! The forwarding core over HTTP/2 (h2c prior knowledge), TLS with ALPN, and WebSocket
//! tunnels (SPEC §3 Forwarding), over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::wire::read_response;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn named(name: &str) -> Upstream {
    Upstream::builder(name).record(true).start().await.unwrap()
}

/// A body of `len` bytes that is not all alike, so that a reordering or a gap shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c prior knowledge)

/// An HTTP/2 (prior knowledge) connection to veer.
async fn h2c(veer: &Veer) -> H2Sender {
    h2c_to(veer.addr).await.0
}

/// An HTTP/2 request ended with its head has no body; said in HTTP/1.1, a POST says so with
/// `Content-Length: 0` (RFC 9110 §8.6; some servers answer 411 without it). A GET does not.
#[tokio::test]
async fn an_http2_post_without_a_body_reaches_the_upstream_with_length_0() {
    let upstream = named("a").await;
    let shadow = named("shadow").await;
    let route = host_route("a", &[], "/", upstream.addr)
        + &format!(
            "[route.shadow]\nendpoints = [\"{}\"]\npercent = 100.0\nmethods = [\"GET\", \"POST\", \"PUT\"]\n",
            shadow.addr
        );
    let veer = Veer::start("", &route).await;
    /// Ended at once, of no told length: hyper's client sends no `content-length` for it.
    struct Unsized;
    impl http_body::Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
        fn is_end_stream(&self) -> bool {
            true
        }
    }
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(TcpStream::connect(veer.addr).await.unwrap()),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for method in [http::Method::POST, http::Method::GET, http::Method::PUT] {
        let request = Request::builder()
            .method(method)
            .uri("http://a/x")
            .body(Unsized)
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    // The shadow's copies too.
    await_requests(&shadow, 3, Duration::from_secs(5)).await;
    for seen in [upstream.seen(), shadow.seen()] {
        let mut lengths: Vec<(String, Option<&str>)> = seen
            .iter()
            .map(|s| {
                let length = s.headers.get("content-length").map(|v| v.to_str().unwrap());
                assert!(!s.headers.contains_key("transfer-encoding"), "{s:?}");
                (s.method.to_string(), length)
            })
            .collect();
        lengths.sort();
        assert_eq!(
            lengths,
            [
                ("GET".to_string(), None),
                ("POST".to_string(), Some("0")),
                ("PUT".to_string(), Some("0"))
            ]
        );
    }
    conn.abort();
    veer.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_works_and_routes_by_authority() {
    let a = named("a").await;
    let b = named("b").await;
    let routes = host_route("a", &["a.example"], "/", a.addr)
        + &host_route("b", &["b.example"], "/", b.addr);
    let veer = Veer::start("", &routes).await;
    let mut sender = h2c(&veer).await;
    for (authority, expected) in [("b.example", "b\n"), ("a.example:8443", "a\n")] {
        let request = Request::get(format!("http://{authority}/x"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expected, "{authority}");
    }
    let seen = b.seen();
    assert_eq!(seen[0].headers["host"], "b.example");
    assert_eq!(seen[0].headers["via"], "2 veer");
    assert_eq!(a.request_count(), 1);
    veer.shutdown().await;
}

/// An HTTP/2 field value with leading or trailing whitespace makes the request malformed (RFC
/// 9113 §8.2.1): a 400, and nothing reaches the upstream.
#[tokio::test]
async fn an_h2_field_value_with_surrounding_whitespace_is_400() {
    let upstream = named("a").await;
    let veer = Veer::shop("", upstream.addr).await;
    let mut sender = h2c(&veer).await;
    for value in [" 1", "1 ", "\t1"] {
        let request = Request::get("http://shop/")
            .header("x-a", value)
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 400, "{value:?}");
    }
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

/// An HTTP/2 request head over `max_header_bytes` gets veer's 431 with its reason, as on
/// HTTP/1.1 (the stream used to be refused by the protocol layer, with no answer).
#[tokio::test]
async fn an_h2_head_over_max_header_bytes_is_431_with_a_reason() {
    let upstream = named("a").await;
    let veer = Veer::shop("max_header_bytes = 16384", upstream.addr).await;
    let mut sender = h2c(&veer).await;
    let request = Request::get("http://shop/")
        .header("x-big", "b".repeat(20_000))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 431);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "request header section too large\n");
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

/// HTTP/2 clients (browsers) send their cookies as several `cookie` fields; the HTTP/1.1
/// upstream gets them as one header, joined with "; " (RFC 9113 §8.2.3).
#[tokio::test]
async fn h2_cookie_fields_reach_the_upstream_as_one_header() {
    let upstream = named("a").await;
    let veer = Veer::shop("", upstream.addr).await;
    let mut sender = h2c(&veer).await;
    let request = Request::get("http://shop/")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "session=xyz")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = only_request(&upstream).await;
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; session=xyz"]);
    veer.shutdown().await;
}

/// An HTTP/2 request with neither `:authority` nor Host names no host, which an `http` URI
/// must (RFC 9110 §4.2.1): a 400, as NGINX answers it, not a request to the endpoint's own
/// address.
#[tokio::test]
async fn an_h2_request_without_any_authority_is_a_400() {
    let upstream = named("a").await;
    let veer = Veer::shop("", upstream.addr).await;
    let mut client = h2_client(veer.addr).await;
    // A relative URI: the h2 crate sends `:scheme` and `:path` only.
    let request = Request::get("/x").body(()).unwrap();
    let (answer, _) = client.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 400);
    assert_eq!(h2_text(answer).await, b"missing :authority\n");
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

/// An authority is checked as strictly as a Host header: userinfo (RFC 9113 §8.3.1) is a 400
/// and nothing is forwarded, over HTTP/2 and in an HTTP/1.1 absolute-form target alike.
#[tokio::test]
async fn an_authority_with_userinfo_is_a_400() {
    let upstream = named("a").await;
    let routes = host_route("wild", &["*.wild.test"], "/", upstream.addr);
    let veer = Veer::start("", &routes).await;
    let mut sender = h2c(&veer).await;
    let request = Request::get("http://user:pw@a.wild.test/x")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "invalid authority\n");
    let answer = raw(
        veer.addr,
        b"GET http://user:pw@a.wild.test/x HTTP/1.1\r\nHost: a.wild.test\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    // The same request without userinfo goes through.
    let request = Request::get("http://a.wild.test/x")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    assert_eq!(upstream.request_count(), 1);
    veer.shutdown().await;
}

/// HTTP/2 has no 101: an upstream's 101 to an HTTP/2 client's request is veer's 502, and the
/// connection goes on serving the client's other streams.
#[tokio::test]
async fn an_upstream_101_to_an_h2_request_is_a_502_and_the_connection_lives_on() {
    let (switching, task) =
        support::wire::scripted_upstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            .await;
    let upstream = named("a").await;
    let routes = host_route("switching", &["switching"], "/", switching)
        + &host_route("a", &["a"], "/", upstream.addr);
    let veer = Veer::start("", &routes).await;
    let mut sender = h2c(&veer).await;
    for (authority, expected) in [("switching", 502), ("a", 200)] {
        let request = Request::get(format!("http://{authority}/"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), expected, "{authority}");
    }
    task.abort();
    veer.shutdown().await;
}

/// An upstream length sent as a list, or on a 204, is legal enough for HTTP/1.1 but makes
/// HTTP/2 clients reset the stream: veer sends one plain length, and none on a 204.
#[tokio::test]
async fn odd_upstream_lengths_reach_h2_clients_as_one_plain_length() {
    let (listed, listed_task) = support::wire::scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nok",
    )
    .await;
    let (empty, empty_task) = support::wire::scripted_upstream(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
    )
    .await;
    let routes = host_route("listed", &["listed"], "/", listed)
        + &host_route("empty", &["empty"], "/", empty);
    let veer = Veer::start("", &routes).await;
    let mut sender = h2c(&veer).await;
    for (authority, status, body) in [("listed", 200, &b"ok"[..]), ("empty", 204, &b""[..])] {
        let request = Request::get(format!("http://{authority}/"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), status, "{authority}");
        let lengths: Vec<_> = response
            .headers()
            .get_all("content-length")
            .iter()
            .cloned()
            .collect();
        let got = response.into_body().collect().await;
        let got = got.unwrap_or_else(|e| panic!("{authority}: body failed: {e}"));
        assert_eq!(&got.to_bytes()[..], body, "{authority}");
        let expected: &[&str] = if status == 204 { &[] } else { &["2"] };
        assert_eq!(lengths, expected, "{authority}");
    }
    listed_task.abort();
    empty_task.abort();
    veer.shutdown().await;
}

/// Sends `len` bytes on an h2 stream as veer's flow control lets them (5 s per grant at
/// most), ending the stream: the bytes sent, or where it stopped and why.
async fn send_h2_body(body: &mut h2::SendStream<Bytes>, len: usize) -> Result<usize, String> {
    let chunk = Bytes::from(vec![b'x'; 65536]);
    let mut sent = 0;
    while sent < len {
        body.reserve_capacity(chunk.len().min(len - sent));
        let capacity = std::future::poll_fn(|cx| body.poll_capacity(cx));
        let capacity = tokio::time::timeout(Duration::from_secs(5), capacity).await;
        let granted = match capacity {
            Ok(Some(Ok(granted))) => granted,
            other => return Err(format!("after {sent} bytes: {other:?}")),
        };
        body.send_data(chunk.slice(..granted), sent + granted == len)
            .map_err(|error| format!("after {sent} bytes: {error}"))?;
        sent += granted;
    }
    Ok(sent)
}

/// An HTTP/2 connection to `addr` (prior knowledge) with the h2 crate, ready for a request.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// The whole body of an h2 response, its flow-control window given back as it is read.
async fn h2_text(response: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut answer = response.into_body();
    let mut text = Vec::new();
    while let Some(data) = answer.data().await {
        let data = data.unwrap();
        let _ = answer.flow_control().release_capacity(data.len());
        text.extend_from_slice(&data);
    }
    text
}

/// veer's own early answer to an HTTP/2 request (a 413 on its Content-Length) reads and drops
/// the rest of the body, so the client sends it all and the stream ends without a reset (which
/// curl 7.88 reports as a failure instead of the answer).
#[tokio::test]
async fn an_early_h2_413_lets_the_client_send_its_body_without_a_reset() {
    let upstream = named("a").await;
    let veer = Veer::shop("max_body_bytes = 1048576", upstream.addr).await;
    let mut client = h2_client(veer.addr).await;
    let len = 5 << 20;
    let request = Request::post("http://shop/")
        .header("content-length", len)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(h2_text(response).await, b"request body too large\n");
    // Then the whole body, as far as veer's flow control lets it.
    assert_eq!(send_h2_body(&mut body, len).await, Ok(len));
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

/// The same for an upload without a length that goes over `max_body_bytes` on the way: the
/// 413 comes once the limit is passed, and the client still sends the rest without a reset.
#[tokio::test]
async fn a_streamed_h2_upload_over_the_limit_gets_its_413_without_a_reset() {
    let upstream = named("a").await;
    let veer = Veer::shop("max_body_bytes = 1048576", upstream.addr).await;
    let mut client = h2_client(veer.addr).await;
    let len = 5 << 20;
    let request = Request::post("http://shop/").body(()).unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let sending = tokio::spawn(async move { send_h2_body(&mut body, len).await });
    let response = response.await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(h2_text(response).await, b"request body too large\n");
    assert_eq!(sending.await.unwrap(), Ok(len));
    veer.shutdown().await;
}

/// An HTTP/2 connection with no stream open for `idle_timeout` is closed (GOAWAY), as an idle
/// HTTP/1.1 one is; one in use stays open, and so does one whose response is still streaming.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_idle_timeout() {
    let upstream = named("a").await;
    // Ten pieces 150 ms apart: 1.5 s in all, past the idle limit, each piece well within it.
    let slow = Upstream::builder("slow")
        .body("0123456789".repeat(10))
        .slow_body(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let routes = host_route("a", &["a"], "/", upstream.addr)
        + &host_route("slow", &["slow"], "/", slow.addr);
    let veer = Veer::start("idle_timeout = \"1s\"", &routes).await;
    let get = |authority: &'static str| {
        Request::get(format!("http://{authority}/"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let closes = |conn: tokio::task::JoinHandle<hyper::Result<()>>| async move {
        let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
        assert!(matches!(closed, Ok(Ok(Ok(())))), "{closed:?}");
    };

    // In use: a request every 100 ms for over a second, all on the one connection.
    let (mut sender, conn) = h2c_to(veer.addr).await;
    for _ in 0..12 {
        let response = sender.send_request(get("a")).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then idle: veer closes it.
    closes(conn).await;

    // Streaming for longer than the idle limit: the body arrives whole, and the connection
    // still takes the next request.
    let (mut sender, conn) = h2c_to(veer.addr).await;
    let response = sender.send_request(get("slow")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "0123456789".repeat(10));
    let response = sender.send_request(get("a")).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    closes(conn).await;
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A self-signed certificate for `localhost`, written to `dir`; returns its DER.
fn self_signed(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    certified.cert.der().clone()
}

/// veer with a TLS listener (a new self-signed certificate for localhost, in a new config
/// dir) and `server_extra` in `[server]` (`{dir}` in it names the dir), routing `shop` to
/// `upstream`; returns veer, the certificate and the dir.
async fn tls_veer(
    server_extra: &str,
    upstream: SocketAddr,
) -> (
    Veer,
    rustls::pki_types::CertificateDer<'static>,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let cert = self_signed(&path);
    let server = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}\n{}",
        path.join("cert.pem").display(),
        path.join("key.pem").display(),
        server_extra.replace("{dir}", &path.display().to_string())
    );
    let text = config_text(&path, &server, &route("shop", upstream, upstream, ""));
    (Veer::start_in(dir, &text).await, cert, path)
}

async fn tls_connect(
    addr: SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Empty: no ALPN offered.
    let offered = (!alpn.is_empty()).then_some(alpn);
    config.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), offered);
    stream
}

/// A GET of `uri` over HTTP/2 on `tls`.
async fn tls_h2_get(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    uri: &str,
) -> http::Response<hyper::body::Incoming> {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::get(uri).body(Full::<Bytes>::default()).unwrap();
    sender.send_request(request).await.unwrap()
}

/// Writes `bytes` on `stream` and reads what comes back until the connection closes (at most
/// 5 s).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer));
    let _ = read.await;
    answer
}

/// A connection is served the protocol its ALPN agreed (RFC 7301): an HTTP/1.1 request where
/// `h2` was agreed, and an HTTP/2 one where `http/1.1` or `http/1.0` was, are not served. A
/// client that offered no ALPN is served HTTP/1 (HTTP/2 over TLS is agreed by ALPN, RFC 9113
/// §3.3).
#[tokio::test]
async fn tls_serves_only_the_protocol_alpn_agreed() {
    let upstream = named("blue").await;
    let (veer, cert, _) = tls_veer("", upstream.addr).await;
    let request = b"GET /h1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

    // HTTP/1.1 where h2 was agreed: no HTTP/1.1 answer, nothing forwarded.
    let mut tls = tls_connect(veer.addr, &cert, b"h2").await;
    let answer = exchange(&mut tls, request).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // HTTP/2 where HTTP/1.x was agreed, or no ALPN offered: the request fails, nothing
    // forwarded.
    for alpn in [&b"http/1.1"[..], b"http/1.0", b""] {
        let tls = tls_connect(veer.addr, &cert, alpn).await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = Request::get("https://localhost/h2-on-h1")
            .body(Full::<Bytes>::default())
            .unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request));
        let sent = sent.await;
        assert!(matches!(sent, Ok(Err(_))), "{sent:?}");
    }
    assert_eq!(upstream.seen().len(), 0);

    // HTTP/1.1 where it was agreed, opening with the preface's first bytes (a method `PRI`
    // is a token like any other): served.
    let mut tls = tls_connect(veer.addr, &cert, b"http/1.1").await;
    let pri = b"PRI /pri HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let answer = exchange(&mut tls, pri).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");

    // No ALPN offered: served HTTP/1.1.
    let mut tls = tls_connect(veer.addr, &cert, b"").await;
    let answer = exchange(&mut tls, request).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    let paths: Vec<String> = upstream.seen().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/pri", "/h1"]);
    veer.shutdown().await;
}

/// A TLS record that breaks in the middle of an upload is the connection failing, not a
/// malformed body (which is a 400): logged as the client gone (499).
#[tokio::test]
async fn a_tls_record_broken_mid_upload_is_a_client_gone() {
    // An upstream that says when the request head reached it, then reads on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (head_in, head_seen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = head_in.send(());
        let _ = socket.read_to_end(&mut head).await;
    });
    let (veer, cert, dir) = tls_veer("access_log = \"{dir}/access.log\"", upstream).await;
    let log = dir.join("access.log");
    let mut tls = tls_connect(veer.addr, &cert, b"http/1.1").await;
    tls.write_all(b"POST /up HTTP/1.1\r\nHost: shop\r\nContent-Length: 100\r\n\r\nhello")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let forwarded = tokio::time::timeout(Duration::from_secs(5), head_seen).await;
    assert!(
        matches!(forwarded, Ok(Ok(()))),
        "the head never reached the upstream"
    );
    // An application-data record whose bytes no key made.
    let tcp = tls.get_mut().0;
    tcp.write_all(b"\x17\x03\x03\x00\x20broken-record-broken-record-abcd")
        .await
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || async { read().ends_with('\n') }).await);
    let line: serde_json::Value = serde_json::from_str(read().trim()).unwrap();
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(veer.slot("shop", "blue").await["client_aborts"], 1);
    veer.shutdown().await;
}

#[tokio::test]
async fn tls_serves_h2_http11_and_http10_by_alpn_with_https_forwarded_and_a_secure_cookie() {
    let upstream = named("blue").await;
    let (veer, cert, _) = tls_veer("", upstream.addr).await;

    let h2 = tls_connect(veer.addr, &cert, b"h2").await;
    let response = tls_h2_get(h2, "https://localhost/secure").await;
    assert_eq!(response.version(), http::Version::HTTP_2);
    let h2_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();

    let h1 = tls_connect(veer.addr, &cert, b"http/1.1").await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(h1))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/secure")
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.status(), 200);
    let h1_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();

    for cookie in [h2_cookie, h1_cookie] {
        assert!(cookie.starts_with("veer_shop="), "{cookie}");
        assert!(cookie.contains("; Secure"), "{cookie}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.headers["x-forwarded-proto"], "https");
    }

    // A client that offers only http/1.0 (curl --http1.0) is served too.
    let mut h10 = tls_connect(veer.addr, &cert, b"http/1.0").await;
    h10.write_all(b"GET /old HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), h10.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200 "), "{answer}");
    assert_eq!(upstream.seen().len(), 3);

    // Plain HTTP to the TLS port: a readable 400, not a TLS alert; nothing forwarded.
    let answer = raw(veer.addr, b"GET /plain HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(raw_status(&answer), Some(400), "{answer}");
    assert!(answer.ends_with("use an https:// URL\n"), "{answer}");
    assert_eq!(upstream.seen().len(), 3);

    // /metrics says when the served certificate expires, and counts that 400.
    let (status, _, metrics) = get(&veer.admin_url("/metrics"), &[]).await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    let bad_requests = "veer_client_errors_total{status=\"400\",reason=\"bad_request\"} 1";
    assert!(metrics.lines().any(|l| l == bad_requests), "{metrics}");
    let expiry = metrics
        .lines()
        .find_map(|l| l.strip_prefix("veer_tls_certificate_expiry_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge: {metrics}"));
    // rcgen's default end of validity.
    let not_after = rcgen::date_time_ymd(4096, 1, 1).unix_timestamp();
    assert_eq!(expiry.parse::<f64>().unwrap(), not_after as f64);
    veer.shutdown().await;
}

/// A connection still in its TLS handshake (silent, or half a ClientHello) has no request to
/// finish: the drain closes it at once instead of waiting `header_timeout` (30 s here).
#[tokio::test]
async fn the_drain_does_not_wait_for_tls_handshakes() {
    let upstream = named("blue").await;
    let timers = "header_timeout = \"30s\"\ndrain_timeout = \"30s\"";
    let (mut veer, _, _) = tls_veer(timers, upstream.addr).await;
    let mut silent = TcpStream::connect(veer.addr).await.unwrap();
    let mut halfway = TcpStream::connect(veer.addr).await.unwrap();
    halfway
        .write_all(b"\x16\x03\x01\x02\x00\x01")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = veer.running.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    assert!(stopped.is_ok(), "the drain waited for the handshakes");
    for stream in [&mut silent, &mut halfway] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        assert!(matches!(read.await, Ok(Ok(0))), "not closed: {rest:?}");
    }
}

/// A drained connection that never sent a request does not hold the drain for
/// `header_timeout` once nothing has moved on it for a second: over TLS with ALPN `h2`, a
/// client that sent nothing after its handshake (hyper's HTTP/2 server waits for the preface),
/// and one that opened HTTP/2 but no stream.
#[tokio::test]
async fn the_drain_does_not_wait_for_connections_that_never_sent_a_request() {
    let upstream = named("blue").await;
    let timers = "header_timeout = \"30s\"\ndrain_timeout = \"30s\"";
    let (mut veer, cert, _) = tls_veer(timers, upstream.addr).await;
    let mut silent = tls_connect(veer.addr, &cert, b"h2").await;
    let mut silent_h1 = tls_connect(veer.addr, &cert, b"http/1.1").await;
    let opened = tls_connect(veer.addr, &cert, b"h2").await;
    let (_sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(opened),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = veer.running.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    assert!(stopped.is_ok(), "the drain waited for header_timeout");
    for silent in [&mut silent, &mut silent_h1] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest));
        assert!(
            read.await.is_ok(),
            "a silent client's connection is still open"
        );
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "the HTTP/2 client's connection is still open"
    );
}

/// A TLS client that sends its first request a while after its handshake is served, and one
/// that sends none is closed at `header_timeout` (1 s here).
#[tokio::test]
async fn a_tls_client_quiet_after_its_handshake_is_served_or_closed_at_header_timeout() {
    let upstream = named("blue").await;
    let (veer, cert, _) = tls_veer("header_timeout = \"1s\"", upstream.addr).await;
    let mut later = tls_connect(veer.addr, &cert, b"http/1.1").await;
    let started = tokio::time::Instant::now();
    let mut silent = tls_connect(veer.addr, &cert, b"http/1.1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let request = b"GET /later HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let answer = exchange(&mut later, request).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest));
    assert!(
        read.await.is_ok(),
        "the silent client's connection is still open"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    veer.shutdown().await;
}

/// A TLS 1.3 client whose handshake is done on its side sends its last handshake message and
/// its first request together: when the drain begins while they travel, the request is still
/// answered (with `Connection: close`), as one sent on a kept-alive connection just before
/// the signal is.
#[tokio::test]
async fn a_request_sent_with_the_last_handshake_message_at_the_drain_is_answered() {
    use std::io::{Read, Write};
    let upstream = named("blue").await;
    let timers = "header_timeout = \"30s\"\ndrain_timeout = \"5s\"";
    let (mut veer, cert, _) = tls_veer(timers, upstream.addr).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = TcpStream::connect(veer.addr).await.unwrap();
    let mut bytes = Vec::new();
    client.write_tls(&mut bytes).unwrap();
    tcp.write_all(&bytes).await.unwrap();
    // veer's answer to the ClientHello, until the client is done with the handshake.
    let mut buf = vec![0u8; 65536];
    while client.is_handshaking() {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        client.read_tls(&mut &buf[..n]).unwrap();
        client.process_new_packets().unwrap();
    }
    client
        .writer()
        .write_all(b"GET /x HTTP/1.1\r\nHost: shop\r\n\r\n")
        .unwrap();
    let mut flight = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut flight).unwrap();
    }
    let stop = tokio::spawn(veer.running.take().unwrap().shutdown());
    tokio::time::sleep(Duration::from_millis(5)).await;
    tcp.write_all(&flight).await.unwrap();
    let mut plain = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                client.read_tls(&mut &buf[..n]).unwrap();
                if client.process_new_packets().is_err() {
                    break;
                }
                let _ = client.reader().read_to_end(&mut plain);
            }
            _ => break,
        }
    }
    stop.await.unwrap();
    let answer = String::from_utf8_lossy(&plain);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(upstream.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// WebSocket / Upgrade

const UPGRADE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn an_upgrade_answered_101_becomes_a_tunnel_both_ways() {
    let upstream = Upstream::builder("ws")
        .behaviour(Behaviour::WebSocketEcho)
        .start()
        .await
        .unwrap();
    let veer = Veer::start("", &host_route("ws", &["ws.example"], "/", upstream.addr)).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    stream.write_all(UPGRADE).await.unwrap();
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 101, "{}", answer.head);
    assert_eq!(answer.header("upgrade"), Some("websocket"));
    for message in [&b"ping through the tunnel"[..], &pattern(100_000)[..]] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert!(echoed == message, "echo differs");
    }
    // An open tunnel would hold up the shutdown until drain_timeout.
    drop(stream);
    veer.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_answered_200_is_a_normal_response_and_no_tunnel() {
    let upstream = named("ws").await;
    let veer = Veer::start("", &host_route("ws", &["ws.example"], "/", upstream.addr)).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    stream.write_all(UPGRADE).await.unwrap();
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.body, b"ws\n");
    assert!(answer.header("upgrade").is_none());
    // The connection still speaks HTTP to veer: a host no route serves gets veer's own 404,
    // where a tunnel would have carried the bytes to the upstream.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
        .await
        .unwrap();
    let next = read_response(&mut stream).await.unwrap();
    assert_eq!(next.status, 404, "{}", next.head);
    assert_eq!(upstream.request_count(), 1);
    veer.shutdown().await;
}

/// veer offers at most 128 streams per HTTP/2 connection (NGINX's default): each may hold an
/// upstream connection and its buffered answer while the client takes nothing.
#[tokio::test]
async fn an_h2_connection_offers_at_most_128_streams() {
    let upstream = named("a").await;
    let veer = Veer::shop("", upstream.addr).await;
    let mut client = h2_client(veer.addr).await;
    let request = Request::get("http://shop/").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    // veer's SETTINGS are in by now.
    assert_eq!(client.current_max_send_streams(), 128);
    veer.shutdown().await;
}

/// A keep-alive HTTP/1.1 upstream that reads each request body whole and answers `ok`; counts
/// the connections it accepted.
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, accepted)
}

/// An HTTP/2 upload with a Content-Length whose END_STREAM comes in a DATA frame of its own
/// (as Go's client sends streamed bodies) still ends its upstream request in time for the
/// connection to be reused: 5 uploads in a row take one upstream connection.
#[tokio::test]
async fn an_h2_upload_ended_by_an_empty_data_frame_leaves_its_upstream_connection_reusable() {
    let (upstream, accepted) = counting_upstream().await;
    let veer = Veer::shop("", upstream).await;
    let mut client = h2_client(veer.addr).await;
    for _ in 0..5 {
        let request = Request::post("http://shop/")
            .header("content-length", 5)
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(Bytes::from_static(b"hello"), false).unwrap();
        body.send_data(Bytes::new(), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(h2_text(response).await, b"ok");
        client = client.ready().await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
    veer.shutdown().await;
}

/// An upstream that answers an HTTP/2 upload before reading it, then reads nothing more and
/// never closes, holds neither its connection nor the client's stream: veer gives the
/// connection up once the answer is over (the upstream sees its end after a small part of the
/// upload), and the client's stream is reset once veer has discarded at most 16 MiB of it.
#[tokio::test]
async fn an_upstream_that_answers_an_h2_upload_early_and_stops_reading_is_let_go() {
    const UPLOAD: usize = 64 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut received = stream.read(&mut buf).await.unwrap() as u64;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Nothing read for 2 s: veer's writes fill the sockets' buffers. Then read until veer
        // ends the connection (the whole upload, without the fix), for 10 s at most.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                received += n as u64;
            }
        })
        .await
        .is_ok();
        (ended, received)
    });
    let veer = Veer::shop("max_body_bytes = 0", addr).await;
    let (mut sender, _conn) = h2c_to(veer.addr).await;
    let request = Request::post("http://shop/upload")
        .body(Full::new(Bytes::from(vec![b'u'; UPLOAD])))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("no answer")
        .expect("the request failed");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    let (ended, received) = upstream.await.unwrap();
    assert!(ended, "veer did not end its connection to the upstream");
    assert!(
        received < UPLOAD as u64 / 4,
        "{received} bytes of the {UPLOAD}-byte upload reached the upstream"
    );
    drop(sender);
    veer.shutdown().await;
}
