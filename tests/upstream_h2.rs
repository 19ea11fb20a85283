//! Slots whose endpoints speak HTTP/2 (`protocol = "h2c"`, SPEC §3's "optionally h2"
//! upstream): every request a stream of one connection per endpoint and worker, gRPC-like
//! exchanges with trailers, upgrades still over HTTP/1.1, failures counted as over HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request as the HTTP/2 upstream saw it.
struct Seen {
    version: Version,
    uri: String,
    headers: HeaderMap,
}

/// An upstream that speaks HTTP/2 only (prior knowledge, as gRPC servers do). It answers after
/// `delay` with the request's body (or `h2` and a newline when it had none), and with trailers
/// `grpc-status: 0` when the request said `TE: trailers`. With `close_each`, each connection is
/// closed gracefully (GOAWAY) once it has answered a request.
struct H2Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections that ended.
    closed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Answer =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

async fn h2_upstream(delay: Duration, close_each: bool) -> H2Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (accepted, recorded) = (Arc::clone(&connections), Arc::clone(&seen));
    let ended = Arc::clone(&closed);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let recorded = Arc::clone(&recorded);
            let answered = Arc::new(tokio::sync::Notify::new());
            let close = Arc::clone(&answered);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let recorded = Arc::clone(&recorded);
                let answered = Arc::clone(&answered);
                async move {
                    answered.notify_one();
                    let (parts, body) = req.into_parts();
                    recorded.lock().unwrap().push(Seen {
                        version: parts.version,
                        uri: parts.uri.to_string(),
                        headers: parts.headers.clone(),
                    });
                    tokio::time::sleep(delay).await;
                    let body = body.collect().await.unwrap().to_bytes();
                    let body = match body.is_empty() {
                        true => Bytes::from_static(b"h2\n"),
                        false => body,
                    };
                    let mut frames = vec![Ok(Frame::data(body))];
                    if parts.headers.get("te").is_some_and(|te| te == "trailers") {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        frames.push(Ok(Frame::trailers(trailers)));
                    }
                    let answer: Answer = StreamBody::new(futures_util::stream::iter(frames));
                    Ok::<_, Infallible>(Response::new(answer))
                }
            });
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            let ended = Arc::clone(&ended);
            tokio::spawn(async move {
                let mut connection = std::pin::pin!(connection);
                if close_each {
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = close.notified() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                } else {
                    let _ = connection.await;
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    H2Upstream {
        addr,
        connections,
        closed,
        seen,
    }
}

/// A route `shop` on any host whose slots are `blue` and `green`, both of `protocol`.
fn route_of(protocol: &str, blue: SocketAddr, green: SocketAddr) -> String {
    format!(
        "[[route]]\nname = \"shop\"\n\
         [route.blue]\nendpoints = [\"{blue}\"]\nversion = \"v1\"\nprotocol = \"{protocol}\"\n\
         [route.green]\nendpoints = [\"{green}\"]\nversion = \"v2\"\nprotocol = \"{protocol}\"\n"
    )
}

/// Neither slot of `shop` counted an error.
async fn assert_no_errors(veer: &Veer) {
    for slot in ["blue", "green"] {
        let slot = veer.slot("shop", slot).await;
        assert!(no_errors(&slot), "{slot}");
    }
}

/// Twenty requests at once from twenty HTTP/1.1 clients reach the upstream as HTTP/2 streams
/// of one connection (one worker), with the client's Host as `:authority` and the path and
/// query whole; each client gets its answer. An HTTP/1.1 slot would have opened twenty
/// connections, and this upstream speaks no HTTP/1.1.
#[tokio::test]
async fn an_h2c_slots_requests_are_streams_of_one_connection() {
    let upstream = h2_upstream(Duration::from_millis(200), false).await;
    let routes = route_of("h2c", upstream.addr, upstream.addr);
    let veer = Veer::start("workers = 1", &routes).await;
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let url = veer.url(&format!("/items/{i}?q=a%20b"));
            tokio::spawn(async move { get(&url, &[("host", "shop.example:8080")]).await })
        })
        .collect();
    for request in requests {
        let (status, headers, body) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"h2\n");
        assert_eq!(headers["via"], "2 veer", "{headers:?}");
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
    let seen = std::mem::take(&mut *upstream.seen.lock().unwrap());
    assert_eq!(seen.len(), 20);
    for request in &seen {
        assert_eq!(request.version, Version::HTTP_2);
        assert!(
            request.uri.starts_with("http://shop.example:8080/items/")
                && request.uri.ends_with("?q=a%20b"),
            "{}",
            request.uri
        );
        assert!(
            !request.headers.contains_key("host"),
            "{:?}",
            request.headers
        );
        assert!(!request.headers.contains_key("connection"));
        assert_eq!(request.headers["x-forwarded-host"], "shop.example:8080");
        assert_eq!(request.headers["x-forwarded-for"], "127.0.0.1");
    }
    veer.shutdown().await;
}

/// A gRPC-like exchange from an HTTP/2 client: its body goes up whole, `te: trailers` with it,
/// and the upstream's body and trailers come back.
#[tokio::test]
async fn a_grpc_like_exchange_passes_both_ways_over_an_h2c_slot() {
    let upstream = h2_upstream(Duration::ZERO, false).await;
    let veer = Veer::start("", &route_of("h2", upstream.addr, upstream.addr)).await;
    let tcp = TcpStream::connect(veer.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/shop.Cart/Add", veer.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, mut body) = client.send_request(request, false).unwrap();
    let message: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    body.send_data(Bytes::from(message.clone()), true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let mut answer = answer.into_body();
    let mut echoed = Vec::new();
    while let Some(data) = answer.data().await {
        let data = data.unwrap();
        let _ = answer.flow_control().release_capacity(data.len());
        echoed.extend_from_slice(&data);
    }
    assert!(echoed == message, "the body came back changed");
    let trailers = answer.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let seen = std::mem::take(&mut *upstream.seen.lock().unwrap());
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].headers["te"], "trailers");
    assert_eq!(seen[0].headers["content-type"], "application/grpc");
    veer.shutdown().await;
}

/// An upgrade request (a WebSocket) to an h2c slot goes over HTTP/1.1, where upgrades are: its
/// tunnel works.
#[tokio::test]
async fn an_upgrade_to_an_h2c_slot_still_goes_over_http1() {
    let upstream = Upstream::builder("ws")
        .behaviour(Behaviour::WebSocketEcho)
        .start()
        .await
        .unwrap();
    let veer = Veer::start("", &route_of("h2c", upstream.addr, upstream.addr)).await;
    let (mut stream, answer) = support::wire::open_tunnel(veer.addr, "ws.example").await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, 101, "{}", answer.head);
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
    drop(stream);
    veer.shutdown().await;
}

/// An h2c endpoint that refuses connections is a 502 counted as a `connect` error of the slot,
/// as over HTTP/1.1; the slot's other endpoint answers the next request.
#[tokio::test]
async fn a_refusing_h2c_endpoint_is_a_502_and_a_connect_error() {
    let refusing = closed_addr().await;
    let veer = Veer::start("", &route_of("h2c", refusing, refusing)).await;
    let (status, _, body) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
    let slot = veer.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["connect"], 1, "{slot}");
    veer.shutdown().await;

    let upstream = h2_upstream(Duration::ZERO, false).await;
    let routes = route_of("h2c", refusing, upstream.addr).replacen(
        &format!("[\"{refusing}\"]"),
        &format!("[\"{refusing}\", \"{}\"]", upstream.addr),
        1,
    );
    let veer = Veer::start("", &routes).await;
    for _ in 0..4 {
        let (status, _, body) = get(&veer.url("/"), &[("host", "shop.example")]).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
    }
    // The request turned away by the first endpoint keeps its authority at the second.
    for request in std::mem::take(&mut *upstream.seen.lock().unwrap()) {
        assert_eq!(request.uri, "http://shop.example/");
    }
    veer.shutdown().await;
}

/// An h2c upstream that closes its connection after each answer (GOAWAY, as servers do on a
/// restart or after a number of streams) is connected to anew: no request fails for it, none
/// counts as an error, whether it came after the close or raced it (a stream the upstream
/// refused unprocessed is sent again on a new connection).
#[tokio::test]
async fn an_h2c_connection_the_upstream_closes_is_made_anew() {
    let upstream = h2_upstream(Duration::ZERO, true).await;
    let veer = Veer::start(
        "workers = 1",
        &route_of("h2c", upstream.addr, upstream.addr),
    )
    .await;
    // Ten rounds of ten at once: streams cross each GOAWAY.
    for _ in 0..10 {
        let round: Vec<_> = (0..10)
            .map(|_| {
                let url = veer.url("/");
                tokio::spawn(async move { get(&url, &[]).await })
            })
            .collect();
        for request in round {
            let (status, _, body) = request.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body:?}");
        }
    }
    assert!(upstream.connections.load(Ordering::SeqCst) >= 10);
    assert_no_errors(&veer).await;
    veer.shutdown().await;
}

/// What a scripted HTTP/2 upstream does with a stream.
#[derive(Clone, Copy)]
enum Script {
    /// Answers `ok` and a newline.
    Answer,
    /// Resets it with REFUSED_STREAM (unprocessed, RFC 9113 §8.7).
    Refuse,
    /// Answers with a field of 70,000 bytes (over veer's `max_header_bytes`, 64 KiB).
    HugeHead,
    /// Answers a body of 3 bytes after saying `content-length: 10`.
    ShortBody,
    /// Never answers it (the connection still answers PINGs).
    Hang,
    /// Answers with this many header fields, each of its own name.
    Fields(usize),
    /// Answers with a body of 16 MiB.
    Large,
    /// Answers with a head of 1 MiB, in a HEADERS frame and 64 CONTINUATION frames.
    HeadInManyFrames,
    /// Answers with this status and still a body of 5 bytes (no answer of a 204 or 304 has one).
    BodyAfter(u16),
}

/// An HTTP/2 upstream (the h2 crate) that does `script(connection, stream)` with each stream,
/// both counted from 1; and the count of its connections.
async fn scripted_h2(script: fn(usize, usize) -> Script) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let connection = accepted.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                let mut streams = 0;
                let mut held = Vec::new();
                let ok = Bytes::from_static(b"ok\n");
                let large = Bytes::from(vec![b'x'; 16 << 20]);
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    streams += 1;
                    let mut answer = Response::new(());
                    let body = match script(connection, streams) {
                        Script::Refuse => {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        Script::Hang => {
                            held.push(respond);
                            continue;
                        }
                        Script::Answer => ok.clone(),
                        Script::HugeHead => {
                            let huge = HeaderValue::from_str(&"x".repeat(70_000)).unwrap();
                            answer.headers_mut().insert("x-huge", huge);
                            ok.clone()
                        }
                        Script::Fields(n) => {
                            for i in 0..n {
                                let name = HeaderName::try_from(format!("x-f{i}")).unwrap();
                                answer
                                    .headers_mut()
                                    .insert(name, HeaderValue::from_static("v"));
                            }
                            ok.clone()
                        }
                        Script::Large => large.clone(),
                        Script::HeadInManyFrames => {
                            let field = HeaderValue::from_str(&"x".repeat(16_000)).unwrap();
                            for i in 0..64 {
                                let name = HeaderName::try_from(format!("x-f{i}")).unwrap();
                                answer.headers_mut().insert(name, field.clone());
                            }
                            ok.clone()
                        }
                        Script::BodyAfter(status) => {
                            *answer.status_mut() = StatusCode::from_u16(status).unwrap();
                            Bytes::from_static(b"hello")
                        }
                        Script::ShortBody => {
                            let length = HeaderValue::from_static("10");
                            answer.headers_mut().insert("content-length", length);
                            ok.clone()
                        }
                    };
                    let Ok(mut stream) = respond.send_response(answer, false) else {
                        continue;
                    };
                    let _ = stream.send_data(body, true);
                }
            });
        }
    });
    (addr, connections)
}

/// A stream an HTTP/2 upstream refuses unprocessed (RST_STREAM REFUSED_STREAM, RFC 9113 §8.7:
/// safe to send again) is sent again on a new connection: answered, and not counted against
/// the slot; whether the connection refused the first stream it carried or a later one.
#[tokio::test]
async fn a_stream_refused_unprocessed_goes_on_a_new_connection() {
    let refusals: [fn(usize, usize) -> Script; 2] = [
        |connection, stream| match (connection, stream) {
            (1, 1) => Script::Refuse,
            _ => Script::Answer,
        },
        |connection, stream| match (connection, stream) {
            (1, 2) => Script::Refuse,
            _ => Script::Answer,
        },
    ];
    for script in refusals {
        let (addr, connections) = scripted_h2(script).await;
        let veer = Veer::start("workers = 1", &route_of("h2c", addr, addr)).await;
        for _ in 0..3 {
            let (status, _, body) = get(&veer.url("/"), &[]).await;
            assert_eq!(status, StatusCode::OK, "{body:?}");
            assert_eq!(&body[..], b"ok\n");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_no_errors(&veer).await;
        let slot = veer.slot("shop", "blue").await;
        assert_eq!(slot["requests"], 3, "{slot}");
        veer.shutdown().await;
    }
}

/// A request that times out waiting for its answer lets go of its connection, as a timed-out
/// HTTP/1.1 exchange closes its own: an upstream that stopped answering on it (wedged, but
/// still answering PINGs) does not hold the requests after it. Here the first connection never
/// answers; the second does.
#[tokio::test]
async fn a_request_timed_out_on_an_h2c_connection_lets_the_next_make_a_new_one() {
    let (addr, connections) = scripted_h2(|connection, _| match connection {
        1 => Script::Hang,
        _ => Script::Answer,
    })
    .await;
    let routes = route_of("h2c", addr, addr);
    let veer = Veer::start("workers = 1\nrequest_timeout = \"1s\"", &routes).await;
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    for _ in 0..3 {
        let (status, _, body) = get(&veer.url("/"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    veer.shutdown().await;
}

/// An answer that breaks HTTP/2 is an invalid answer, as over HTTP/1.1: a head over
/// `max_header_bytes` (in one frame or in many) is a 502 and a `protocol` error of the slot; so
/// is a body shorter than its `content-length` (cut off mid-answer: the client sees the error).
#[tokio::test]
async fn an_answer_that_breaks_http2_is_a_protocol_error() {
    // The second head is so large that h2 takes it for a flood of CONTINUATION frames (and
    // closes the connection with ENHANCE_YOUR_CALM): as invalid.
    let heads: [fn(usize, usize) -> Script; 2] =
        [|_, _| Script::HugeHead, |_, _| Script::HeadInManyFrames];
    for head in heads {
        let (addr, _) = scripted_h2(head).await;
        let veer = Veer::start("", &route_of("h2c", addr, addr)).await;
        let (status, _, body) = get(&veer.url("/"), &[]).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(&body[..], b"upstream sent an invalid response\n");
        let slot = veer.slot("shop", "blue").await;
        assert_eq!(slot["errors"]["protocol"], 1, "{slot}");
        veer.shutdown().await;
    }

    let (addr, _) = scripted_h2(|_, _| Script::ShortBody).await;
    let veer = Veer::start("", &route_of("h2c", addr, addr)).await;
    // The answer is cut short (the client sees that); the count is the slot's.
    let _ = support::raw(veer.addr, b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let counted = eventually(Duration::from_secs(5), || async {
        veer.slot("shop", "blue").await["errors"]["protocol"] == 1
    })
    .await;
    assert!(counted, "{}", veer.slot("shop", "blue").await);
    veer.shutdown().await;
}

/// A 204 or 304 whose HTTP/2 upstream still sends a body reaches an HTTP/2 client as a head
/// alone, as it reaches an HTTP/1.1 one: handed on, the body went out after a head without
/// END_STREAM, and the client's stream broke. Nothing is counted against the slot, and the
/// connection serves on.
#[tokio::test]
async fn a_body_sent_after_a_204_or_304_is_dropped() {
    let (addr, _) = scripted_h2(|_, stream| match stream % 3 {
        1 => Script::BodyAfter(204),
        2 => Script::BodyAfter(304),
        _ => Script::Answer,
    })
    .await;
    let veer = Veer::start("workers = 1", &route_of("h2c", addr, addr)).await;
    let (mut sender, conn) = h2c_to(veer.addr).await;
    for expected in [204, 304, 200, 204] {
        let request = Request::builder()
            .uri("http://shop/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), expected);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let want: &[u8] = if expected == 200 { b"ok\n" } else { b"" };
        assert_eq!(&body[..], want, "{expected}");
    }
    for expected in [304, 200] {
        let (status, _, body) = get(&veer.url("/"), &[]).await;
        assert_eq!(status.as_u16(), expected);
        assert_eq!(body.is_empty(), expected != 200, "{expected}: {body:?}");
    }
    assert_no_errors(&veer).await;
    drop(sender);
    let _ = conn.await;
    veer.shutdown().await;
}

/// An answer with more than 1,000 header fields is a 502 and a `protocol` error of the slot, as
/// an oversized head is (a map of header names holds at most 24,576, and veer adds its own:
/// with a large `max_header_bytes`, an answer near that many aborted the process); one with
/// 1,000 passes.
#[tokio::test]
async fn an_answer_with_over_1000_fields_is_a_protocol_error() {
    let (addr, _) = scripted_h2(|_, stream| match stream {
        1 | 3 => Script::Fields(1000),
        _ => Script::Fields(1001),
    })
    .await;
    let veer = Veer::start("workers = 1", &route_of("h2c", addr, addr)).await;
    // Raw: hyper's HTTP/1.1 client would not read a head of over 100 fields.
    let request = b"GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    for (status, body) in [
        (200, "ok\n"),
        (502, "upstream sent an invalid response\n"),
        (200, "ok\n"),
    ] {
        let answer = support::raw(veer.addr, request).await;
        assert_eq!(support::raw_status(&answer), Some(status), "{answer}");
        assert!(answer.contains(body), "{answer}");
    }
    let slot = veer.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["protocol"], 1, "{slot}");
    veer.shutdown().await;
}

/// An HTTP/2 request may carry more header fields than HTTP/1.1's 100 but not without bound: at
/// 1,000 it is forwarded, past that it is a 431 and not forwarded (a map of header names holds
/// at most 24,576, and veer adds its own: with a large `max_header_bytes`, a request near that
/// many aborted the process). The connection serves on. (To an HTTP/2 upstream: an HTTP/1.1
/// one would refuse more than 100 fields itself.)
#[tokio::test]
async fn an_http2_request_with_over_1000_fields_is_a_431() {
    let (addr, _) = scripted_h2(|_, _| Script::Answer).await;
    let veer = Veer::start("", &route_of("h2c", addr, addr)).await;
    let (mut sender, _conn) = h2c_to(veer.addr).await;
    for (fields, status, body) in [
        (1000, 200, &b"ok\n"[..]),
        (1001, 431, b"request header section too large\n"),
        (1000, 200, b"ok\n"),
    ] {
        let mut request = Request::get(veer.url("/x"));
        for i in 0..fields {
            request = request.header(format!("x-f{i}"), "v");
        }
        let request = request.body(Full::<Bytes>::default()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        let got = response.status();
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((got.as_u16(), &text[..]), (status, body), "{fields} fields");
    }
    let slot = veer.slot("shop", "blue").await;
    assert_eq!(slot["requests"], 2, "{slot}");
    veer.shutdown().await;
}

/// Clients that stop reading large answers from an HTTP/2 slot do not stall the other streams
/// of its connection: each stream's unread bytes hold the connection's flow-control window too,
/// and with hyper's windows (2 MiB a stream, 5 MiB the connection) three such clients held all
/// of it, so every other request to the endpoint waited for `idle_timeout` to cut them. Eight
/// clients (16 MiB answers, small receive buffers, never reading) on one worker's connection;
/// then a small request is answered at once.
#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_an_h2c_connection() {
    let (addr, connections) = scripted_h2(|_, stream| match stream {
        1..=8 => Script::Large,
        _ => Script::Answer,
    })
    .await;
    let veer = Veer::start("workers = 1", &route_of("h2c", addr, addr)).await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(veer.addr).await.unwrap();
        stream
            .write_all(b"GET /large HTTP/1.1\r\nHost: shop\r\n\r\n")
            .await
            .unwrap();
        stalled.push(stream);
        // One after another: the scripted upstream answers by the stream's number.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Time for the answers to fill what the clients leave unread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), get(&veer.url("/"), &[])).await;
    let (status, _, body) = answered.expect("the small request waited behind the stalled ones");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    drop(stalled);
    veer.shutdown().await;
}

/// A request body over `max_body_bytes` without a `Content-Length` (chunked, as gRPC and
/// streamed uploads send them) is the client's 413, not the slot's error: over HTTP/2 the
/// upstream's side only sees its stream reset.
#[tokio::test]
async fn a_body_over_the_limit_to_an_h2c_slot_is_the_clients_413() {
    let upstream = h2_upstream(Duration::ZERO, false).await;
    let routes = route_of("h2c", upstream.addr, upstream.addr);
    let veer = Veer::start("max_body_bytes = 65536", &routes).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
    // 8 chunks of 16 KiB, twice the limit; the answer may come before the last ones.
    for _ in 0..8 {
        if stream.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let answer = support::wire::read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert_no_errors(&veer).await;
    let metrics = veer.metrics_text().await;
    assert!(
        metrics.contains("veer_client_errors_total{status=\"413\",reason=\"body_too_large\"} 1"),
        "{metrics}"
    );
    veer.shutdown().await;
}

/// A request crossed by a GOAWAY that says the upstream processed none of the connection's
/// streams (last stream 0, as a server at its connection's request limit sends it at once) is
/// sent again on a new connection, uncounted: the upstream did not process it.
#[tokio::test]
async fn a_request_crossed_by_a_goaway_goes_on_a_new_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            if accepted.fetch_add(1, Ordering::SeqCst) == 0 {
                // By hand: SETTINGS, then at the first HEADERS a GOAWAY (last stream 0,
                // NO_ERROR), and the connection closed.
                tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                while !has_headers_frame(&read) {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
                let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                let _ = tcp.write_all(&goaway).await;
                continue;
            }
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(tcp).await.unwrap();
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let mut body = respond.send_response(Response::new(()), false).unwrap();
                    body.send_data(Bytes::from_static(b"ok\n"), true).unwrap();
                }
            });
        }
    });
    let veer = Veer::start("workers = 1", &route_of("h2c", addr, addr)).await;
    let (status, _, body) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(&body[..], b"ok\n");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_no_errors(&veer).await;
    veer.shutdown().await;
}

/// Whether `read` (a client's preface, then frames) holds a HEADERS frame.
fn has_headers_frame(read: &[u8]) -> bool {
    let mut at = 24;
    while read.len() >= at + 9 {
        let length = usize::from(read[at]) << 16
            | usize::from(read[at + 1]) << 8
            | usize::from(read[at + 2]);
        if read[at + 3] == 1 {
            return true;
        }
        at += 9 + length;
    }
    false
}

/// An HTTP/2 connection no request took for `upstream_idle_timeout` is let go (and closes),
/// as idle HTTP/1.1 ones are; the next request makes a new one.
#[tokio::test]
async fn an_idle_h2c_connection_is_closed_after_upstream_idle_timeout() {
    let upstream = h2_upstream(Duration::ZERO, false).await;
    let routes = route_of("h2c", upstream.addr, upstream.addr);
    let veer = Veer::start("workers = 1\nupstream_idle_timeout = \"1s\"", &routes).await;
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.closed.load(Ordering::SeqCst), 0);
    // Expiry runs every `upstream_idle_timeout`: closed within two of them, and some slack.
    let closed = eventually(Duration::from_secs(5), || async {
        upstream.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(closed, "the idle HTTP/2 connection stayed open");
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    veer.shutdown().await;
}
