//! The life of a client connection over real sockets: clients that half-close after their
//! request, the keep-alive idle and request-head timers, and the drain on shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::wire::{dechunk, read_response};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Half-closed clients

/// Sends `request`, shuts the write side (as `nc -N` or `socat` do) and reads the answer.
async fn half_closed(veer: &Veer, request: &[u8]) -> support::wire::RawResponse {
    let mut stream = raw_open(veer.addr, request).await;
    stream.shutdown().await.unwrap();
    let answer = read_response(&mut stream).await;
    let answer =
        answer.unwrap_or_else(|| panic!("no answer to {}", String::from_utf8_lossy(request)));
    // Then veer closes: nothing more comes.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?} {rest:?}");
    answer
}

/// A client that sends a whole request and then shuts its write side still gets the answer:
/// the request is forwarded and the connection closed after the response.
#[tokio::test]
async fn a_request_followed_by_a_half_close_is_answered_then_the_connection_closed() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("", upstream.addr).await;
    let requests: [&[u8]; 4] = [
        b"GET /close HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
        b"GET /keep HTTP/1.1\r\nHost: shop\r\n\r\n",
        b"GET /old HTTP/1.0\r\n\r\n",
        b"POST /post HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello",
    ];
    for request in requests {
        let answer = half_closed(&veer, request).await;
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert_eq!(answer.body, b"blue\n");
    }
    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(paths, ["/close", "/keep", "/old", "/post"]);
    assert_eq!(seen[3].body.as_deref(), Some(&b"hello"[..]));
    veer.shutdown().await;
}

/// A client that closes after its request cannot be told from one that only half-closed, so
/// its request goes on; but not past `request_timeout`.
#[tokio::test]
async fn a_client_gone_after_its_request_holds_nothing_past_request_timeout() {
    let upstream = blackhole("blue").await;
    let veer = Veer::shop("request_timeout = \"1s\"", upstream.addr).await;
    let stream = raw_open(veer.addr, b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    await_requests(&upstream, 1, Duration::from_secs(5)).await;
    drop(stream);
    let gone = eventually(Duration::from_secs(3), || async {
        veer.open_connections() == 0
    })
    .await;
    assert!(gone, "{} connections still open", veer.open_connections());
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Keep-alive: idle_timeout between requests, header_timeout for every request head

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n";

/// A keep-alive connection to veer on which one request has been answered.
async fn kept_alive(veer: &Veer) -> TcpStream {
    let mut stream = raw_open(veer.addr, GET).await;
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.head);
    stream
}

/// Waits until veer closes `stream` (reading and dropping whatever comes); fails after 10 s.
async fn await_close(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open after 10 s");
}

#[tokio::test]
async fn an_idle_connection_closes_after_idle_timeout_even_below_header_timeout() {
    let upstream = recording("blue").await;
    let veer = Veer::shop(
        "idle_timeout = \"1s\"\nheader_timeout = \"10s\"",
        upstream.addr,
    )
    .await;
    // Timed from before the request: veer's idle clock starts after it, whenever this client
    // gets to read the answer.
    let sent = tokio::time::Instant::now();
    let mut stream = kept_alive(&veer).await;
    await_close(&mut stream).await;
    let idle = sent.elapsed();
    assert!(
        idle >= Duration::from_millis(990) && idle < Duration::from_secs(3),
        "closed {idle:?} after the request, idle_timeout 1 s"
    );
    veer.shutdown().await;
}

/// A later request head on a kept-alive connection has header_timeout to arrive whole, counted
/// from its first byte, however long the connection was idle before it.
#[tokio::test]
async fn a_later_request_head_gets_header_timeout_from_its_first_byte() {
    let upstream = recording("blue").await;
    let veer = Veer::shop(
        "idle_timeout = \"60s\"\nheader_timeout = \"1s\"",
        upstream.addr,
    )
    .await;

    // Idle for longer than header_timeout, then a whole request: answered.
    let mut stream = kept_alive(&veer).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(GET).await.unwrap();
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.head);

    // Then a head that drips in a byte every 100 ms and never ends: cut at about 1 s (timed
    // from before its first bytes are sent, as veer's clock starts when they arrive).
    let started = tokio::time::Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n")
        .await
        .unwrap();
    let drip = async {
        while stream.write_all(b"x").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let cut = tokio::time::timeout(Duration::from_secs(10), drip).await;
    let after = started.elapsed();
    assert!(cut.is_ok(), "a dripping head was not cut within 10 s");
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "cut after {after:?}, header_timeout 1 s"
    );
    assert_eq!(upstream.request_count(), 2);
    veer.shutdown().await;
}

/// Neither timer cuts an exchange under way: a slow answer, a slow upload or a long streaming
/// response, each longer than both limits, and the connection still takes the next request.
#[tokio::test]
async fn exchanges_longer_than_both_timers_are_not_cut() {
    let late = Upstream::builder("late")
        .latency(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    // Ten pieces 150 ms apart.
    let streaming = Upstream::builder("streaming")
        .body("0123456789".repeat(10))
        .slow_body(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let upload = recording("upload").await;
    let routes = host_route("late", &["late"], "/", late.addr)
        + &host_route("streaming", &["streaming"], "/", streaming.addr)
        + &host_route("upload", &["upload"], "/", upload.addr);
    let veer = Veer::start("idle_timeout = \"1s\"\nheader_timeout = \"1s\"", &routes).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    for host in ["late", "streaming", "upload"] {
        if host == "upload" {
            // 1.5 s of body, a piece every 150 ms.
            let head = "POST / HTTP/1.1\r\nHost: upload\r\nContent-Length: 100\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                stream.write_all(b"0123456789").await.unwrap();
            }
        } else {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
        }
        let answer = read_response(&mut stream).await.unwrap();
        assert_eq!(answer.status, 200, "{host}: {}", answer.head);
        assert!(!answer.cut, "{host}: body cut");
        if host == "streaming" {
            let body = dechunk(&answer.body).unwrap();
            assert_eq!(body, "0123456789".repeat(10).as_bytes());
        }
    }
    assert_eq!(
        upload.seen()[0].body.as_deref(),
        Some("0123456789".repeat(10).as_bytes())
    );
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The protocol of a cleartext connection, told from its first bytes

/// Sends `pieces` on a new connection, 50 ms apart (empty ones left out).
async fn in_pieces(veer: &Veer, pieces: &[&[u8]]) -> TcpStream {
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    for (i, piece) in pieces.iter().filter(|piece| !piece.is_empty()).enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream.write_all(piece).await.unwrap();
    }
    stream
}

/// A cleartext connection is served HTTP/2 when it opens with the HTTP/2 preface (h2c with
/// prior knowledge), and HTTP/1 otherwise, however its first bytes are split: the preface in
/// pieces, an HTTP/1.1 request whose first bytes are the preface's (`P`, then `PRI` as a
/// method, a token like any other), and one whose request line breaks off where the preface's
/// version would be.
#[tokio::test]
async fn a_cleartext_connection_is_served_the_protocol_its_first_bytes_open_and_in_pieces() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("", upstream.addr).await;

    for split in [1, 8, 23] {
        answered_raw_h2_in_two(&veer, split).await;
    }

    // `PRI *` is an HTTP/1.1 request veer refuses (`*` is for OPTIONS): its own 400.
    let requests: [(&[&[u8]], u16); 3] = [
        (
            &[
                b"P",
                b"UT /put HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n",
            ],
            200,
        ),
        (&[b"PRI /pri HTTP/1.1\r\nHost: shop\r\n\r\n"], 200),
        (&[b"PRI * HTTP/", b"1.1\r\nHost: shop\r\n\r\n"], 400),
    ];
    for (pieces, status) in requests {
        let mut stream = in_pieces(&veer, pieces).await;
        let answer = read_response(&mut stream).await;
        assert_eq!(answer.map(|a| a.status), Some(status), "{pieces:?}");
    }
    let paths: Vec<String> = upstream.seen().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/", "/", "/", "/put", "/pri"]);
    veer.shutdown().await;
}

/// A cleartext connection that has sent nothing, or only the preface's first bytes, has no
/// request under way: the drain closes it about `DRAIN_SETTLE` (50 ms) after the signal,
/// not at `header_timeout` (30 s here).
#[tokio::test]
async fn cleartext_connections_without_a_request_do_not_hold_the_drain() {
    let upstream = recording("blue").await;
    let timers = "header_timeout = \"30s\"\ndrain_timeout = \"30s\"";
    let mut veer = Veer::shop(timers, upstream.addr).await;
    let mut silent = TcpStream::connect(veer.addr).await.unwrap();
    let mut partial = in_pieces(&veer, &[b"PRI * HTTP/2.0\r\n"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let running = veer.running.take().unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), running.shutdown()).await;
    assert!(stopped.is_ok(), "the drain waited for header_timeout");
    for stream in [&mut silent, &mut partial] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest));
        assert!(matches!(read.await, Ok(Ok(0))), "not closed: {rest:?}");
    }
    assert!(upstream.seen().is_empty());
}

/// The preface's first bytes, then the client's close: closed at once (the rest of the
/// preface can no longer come), not at `header_timeout` (30 s here).
#[tokio::test]
async fn half_a_preface_then_the_clients_close_is_closed_at_once() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("header_timeout = \"30s\"", upstream.addr).await;
    let mut partial = in_pieces(&veer, &[b"PRI * HTTP/2.0\r\n"]).await;
    partial.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), partial.read_to_end(&mut rest));
    assert!(matches!(read.await, Ok(Ok(0))), "not closed: {rest:?}");
    veer.shutdown().await;
}

/// The preface's first bytes and then nothing: closed at `header_timeout` (1 s here).
#[tokio::test]
async fn half_a_preface_is_closed_at_header_timeout() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("header_timeout = \"1s\"", upstream.addr).await;
    let started = tokio::time::Instant::now();
    let mut partial = in_pieces(&veer, &[b"PRI * HTTP/2.0\r\n"]).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), partial.read_to_end(&mut rest));
    assert!(matches!(read.await, Ok(Ok(0))), "not closed: {rest:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Drain

const UPGRADE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// veer (`server` in `[server]`) in front of a WebSocket echo upstream, and a tunnel through it.
async fn tunnel(server: &str) -> (Veer, Upstream, TcpStream) {
    let upstream = Upstream::builder("ws")
        .behaviour(Behaviour::WebSocketEcho)
        .start()
        .await
        .unwrap();
    let veer = Veer::shop(server, upstream.addr).await;
    let mut stream = raw_open(veer.addr, UPGRADE).await;
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 101, "{}", answer.head);
    echoes(&mut stream).await;
    (veer, upstream, stream)
}

/// Asserts that bytes sent through the tunnel come back.
async fn echoes(stream: &mut TcpStream) {
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await;
    assert!(matches!(read, Ok(Ok(4))), "{read:?}");
    assert_eq!(&echoed, b"ping");
}

/// An open tunnel is in-flight work: the drain waits for it to end, while nothing new is
/// accepted.
#[tokio::test]
async fn shutdown_waits_for_an_open_tunnel_to_end() {
    let (mut veer, _upstream, mut stream) = tunnel("drain_timeout = \"10s\"").await;
    let addr = veer.addr;
    let running = veer.running.take().unwrap();
    let started = tokio::time::Instant::now();
    let mut stopping = tokio::spawn(running.shutdown());
    let refused = eventually(Duration::from_secs(5), || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(refused, "still accepting while shutting down");
    // The tunnel still carries bytes, and the shutdown waits.
    echoes(&mut stream).await;
    assert!(!stopping.is_finished(), "stopped with a tunnel open");
    // The client ends the tunnel: the shutdown completes, well before drain_timeout.
    stream.shutdown().await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), &mut stopping).await;
    assert!(stopped.is_ok(), "not stopped 5 s after the tunnel ended");
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// A raw HTTP/2 client's first bytes: the preface, SETTINGS with `settings` (6 bytes each),
/// a WINDOW_UPDATE of the connection by `window` unless 0, and `GET http://shop/` on stream 1
/// (HEADERS with END_STREAM and END_HEADERS, HPACK-coded by hand: indexed :method GET,
/// :scheme http, :path /, and :authority shop as a literal).
fn raw_h2_get(settings: &[u8], window: u32) -> Vec<u8> {
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, settings.len() as u8, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(settings);
    if window > 0 {
        hello.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0]);
        hello.extend_from_slice(&window.to_be_bytes());
    }
    let block = [0x82, 0x86, 0x84, 0x41, 4, b's', b'h', b'o', b'p'];
    hello.extend_from_slice(&[0, 0, block.len() as u8, 1, 5, 0, 0, 0, 1]);
    hello.extend_from_slice(&block);
    hello
}

/// The next frame of a raw HTTP/2 connection: type, flags, stream (its low byte), payload.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<(u8, u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    Ok((head[3], head[4], head[8], payload))
}

/// Reads frames until stream 1 ends (a HEADERS or DATA frame with END_STREAM).
async fn read_until_stream_1_ends(stream: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let (kind, flags, id, _) = read_frame(stream).await?;
        if id == 1 && (kind == 0 || kind == 1) && flags & 1 == 1 {
            return Ok(());
        }
    }
}

/// A raw HTTP/2 connection to veer on which `GET http://shop/` was answered (within 5 s).
async fn answered_raw_h2(veer: &Veer) -> TcpStream {
    answered_raw_h2_in_two(veer, 0).await
}

/// [`answered_raw_h2`], with the client's first `split` bytes sent 50 ms before the rest.
async fn answered_raw_h2_in_two(veer: &Veer, split: usize) -> TcpStream {
    let hello = raw_h2_get(&[], 0);
    let (first, rest) = hello.split_at(split);
    let mut stream = in_pieces(veer, &[first, rest]).await;
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        read_until_stream_1_ends(&mut stream),
    )
    .await;
    assert!(
        matches!(ended, Ok(Ok(()))),
        "no answer on stream 1 (first {split} bytes sent apart): {ended:?}"
    );
    stream
}

/// An HTTP/2 client that grants its stream no window at all (SETTINGS_INITIAL_WINDOW_SIZE 0)
/// but keeps its connection busy (a PING every 100 ms) would hold
/// the stream, and its upstream connection, for good: hyper asks the answer's body for bytes
/// only when the window has room. The connection is closed gracefully after `idle_timeout`
/// (1 s here), and cut `idle_timeout` later when the client ignores the GOAWAY.
#[tokio::test]
async fn an_h2_stream_its_client_grants_no_window_is_cut_after_idle_timeout() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("idle_timeout = \"1s\"", upstream.addr).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    stream
        .write_all(&raw_h2_get(&[0, 4, 0, 0, 0, 0], 0))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let (mut read, mut write) = stream.into_split();
    let reader = tokio::spawn(async move {
        // Every frame until the connection ends (a GOAWAY first, which this client ignores):
        // whether stream 1 got its body, and whether a GOAWAY came.
        let (mut got_body, mut goaway) = (false, false);
        loop {
            let mut head = [0u8; 9];
            if read.read_exact(&mut head).await.is_err() {
                return (got_body, goaway);
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0; len];
            if read.read_exact(&mut payload).await.is_err() {
                return (got_body, goaway);
            }
            got_body |= head[3] == 0 && len > 0;
            goaway |= head[3] == 7;
        }
    });
    let pinging = tokio::spawn(async move {
        for n in 0u64..200 {
            let mut ping = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
            ping.extend_from_slice(&n.to_be_bytes());
            if write.write_all(&ping).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(8), reader).await;
    let (got_body, goaway) = ended.expect("connection still open after 8 s").unwrap();
    assert!(!got_body, "a body arrived without window");
    assert!(goaway, "cut without a GOAWAY first");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut before idle_timeout: {:?}",
        started.elapsed()
    );
    pinging.abort();
    veer.shutdown().await;
}

/// An upstream that answers `size` bytes.
async fn big(size: usize) -> Upstream {
    Upstream::builder("big")
        .body(vec![b'x'; size])
        .start()
        .await
        .unwrap()
}

/// An HTTP/2 connection to `veer` granting each stream a 64 KiB window and the connection
/// `connection_window`, ready for a request; and its task.
async fn h2_client(
    veer: &Veer,
    connection_window: u32,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(veer.addr).await.unwrap();
    // A reset and the next stream's head are two small writes: not held for an ACK.
    tcp.set_nodelay(true).unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(connection_window)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    (client.ready().await.unwrap(), task)
}

/// An HTTP/2 client that reads steadily but slowly (96 KiB/s: it releases 9.6 KiB of window
/// every 100 ms) is not taken for one that grants no window: 6 s of a 4 MiB answer at
/// `idle_timeout 1s`, never cut. (veer hands hyper an answer in pieces of 16 KiB, so the time
/// between two asks for more is the time the client takes to make room for one piece.)
#[tokio::test]
async fn a_slow_but_steady_h2_reader_is_not_cut() {
    const SIZE: usize = 4 << 20;
    let big = big(SIZE).await;
    let veer = Veer::shop("idle_timeout = \"1s\"", big.addr).await;
    let (mut client, conn) = h2_client(&veer, 65_535).await;
    let request = http::Request::get("http://shop/").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let started = tokio::time::Instant::now();
    let (mut got, mut pending) = (0usize, 0usize);
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let outcome = loop {
        if started.elapsed() > Duration::from_secs(6) {
            break Ok(());
        }
        tokio::select! {
            chunk = body.data() => match chunk {
                Some(Ok(chunk)) => {
                    got += chunk.len();
                    pending += chunk.len();
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Err("ended".to_string()),
            },
            _ = ticker.tick() => {
                let n = pending.min(9_830);
                body.flow_control().release_capacity(n).unwrap();
                pending -= n;
            }
        }
    };
    assert!(outcome.is_ok(), "cut after {got} bytes: {outcome:?}");
    assert!(
        got > 300_000,
        "read too little to test anything: {got} bytes"
    );
    drop(body);
    conn.abort();
    veer.shutdown().await;
}

/// A starved stream's connection is closed gracefully first: another stream under way on it
/// (an answer 5 s late, at `idle_timeout 2s`: the starved stream is found after 4 s or a
/// little more, the first look at a connection being `idle_timeout` after its start) still
/// gets its whole answer.
#[tokio::test]
async fn a_starved_stream_lets_its_neighbours_finish() {
    let big = big(4 << 20).await;
    let slow = Upstream::builder("slow")
        .latency(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let routes = format!(
        "{}{}",
        host_route("big", &[], "/big", big.addr),
        host_route("slow", &[], "/slow", slow.addr)
    );
    let veer = Veer::start("idle_timeout = \"2s\"", &routes).await;
    let (mut client, conn) = h2_client(&veer, 1 << 24).await;
    // A download whose reader stopped: no window released.
    let get = |path: &str| {
        http::Request::get(format!("http://shop{path}"))
            .body(())
            .unwrap()
    };
    let (paused, _) = client.send_request(get("/big"), true).unwrap();
    let paused = paused.await.unwrap();
    let mut client = client.ready().await.unwrap();
    let (other, _) = client.send_request(get("/slow"), true).unwrap();
    let other = tokio::time::timeout(Duration::from_secs(10), async move {
        let mut body = other.await?.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
        }
        Ok::<_, h2::Error>(())
    })
    .await;
    assert!(matches!(other, Ok(Ok(()))), "{other:?}");
    drop(paused);
    conn.abort();
    veer.shutdown().await;
}

/// An upstream that answers `/ok` at once and never answers `/hang` (it holds the connection
/// until veer closes it); each request it reads is sent on `seen`.
async fn ok_or_hanging_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (seen, heads) = tokio::sync::mpsc::unbounded_channel();
    let addr = support::wire::each_connection(move |mut stream| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = support::wire::next_head(&mut stream, &mut buf).await {
                let _ = seen.send(());
                if !head.starts_with("GET /ok ") {
                    // Held until veer closes the connection.
                    let _ = stream.read_to_end(&mut buf).await;
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, heads)
}

/// Sends `count` requests on one HTTP/2 connection, one at a time; those with `reset(i)` go to
/// `/hang` and are reset by the client as soon as the upstream has the request, the others to
/// `/ok` and are read to the end. Returns how many were sent before the connection failed,
/// and the connection's task.
async fn h2_resetting(
    veer: &Veer,
    heads: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    count: usize,
    reset: impl Fn(usize) -> bool,
) -> (usize, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let (mut client, conn) = h2_client(veer, 1 << 20).await;
    for i in 0..count {
        let path = if reset(i) { "/hang" } else { "/ok" };
        let request = http::Request::get(format!("http://shop{path}"))
            .body(())
            .unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(5), client.ready()).await;
        let Ok(Ok(ready)) = ready else {
            return (i, conn);
        };
        client = ready;
        let Ok((response, mut stream)) = client.send_request(request, true) else {
            return (i, conn);
        };
        if reset(i) {
            // Until the upstream has it, or the stream fails (the connection closed).
            let upstream_has_it = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::select! {
                    seen = heads.recv() => seen.is_some(),
                    _ = response => false,
                }
            })
            .await;
            if !matches!(upstream_has_it, Ok(true)) {
                return (i, conn);
            }
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                let mut body = response.await?.into_body();
                while let Some(chunk) = body.data().await {
                    body.flow_control().release_capacity(chunk?.len())?;
                }
                Ok::<_, h2::Error>(())
            })
            .await;
            if !matches!(answered, Ok(Ok(()))) {
                return (i, conn);
            }
            assert!(matches!(heads.try_recv(), Ok(())));
        }
    }
    (count, conn)
}

/// A client that opens HTTP/2 streams and resets each once veer has sent its request upstream
/// (the reset-after-accept form of rapid reset: two frames of the client's cost the upstream a
/// request each) has its connection closed once 500 streams are over and half of them were so
/// cut short: with 700 tried, at most about 500 reach the upstream.
#[tokio::test]
async fn an_h2_client_resetting_every_stream_it_opens_is_cut_off() {
    let (upstream, mut heads) = ok_or_hanging_upstream().await;
    let veer = Veer::shop("", upstream).await;
    let (sent, conn) = h2_resetting(&veer, &mut heads, 700, |_| true).await;
    assert!((500..510).contains(&sent), "{sent} streams sent");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the connection is still open");
    veer.shutdown().await;
}

/// A client that cancels some of its streams, a third of 700 here, is served on: most of
/// them were answered.
#[tokio::test]
async fn an_h2_client_cancelling_a_third_of_its_streams_is_served_on() {
    let (upstream, mut heads) = ok_or_hanging_upstream().await;
    let veer = Veer::shop("", upstream).await;
    let (sent, conn) = h2_resetting(&veer, &mut heads, 700, |i| i % 3 == 0).await;
    assert_eq!(sent, 700);
    assert!(!conn.is_finished());
    conn.abort();
    veer.shutdown().await;
}

/// An HTTP/2 client that reads nothing once answered never acknowledges the PING of the
/// graceful close at `idle_timeout`: its connection is cut another `idle_timeout` later, not
/// kept open for good.
#[tokio::test]
async fn an_idle_h2_connection_whose_client_reads_nothing_is_cut() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("idle_timeout = \"300ms\"", upstream.addr).await;
    let mut stream = answered_raw_h2(&veer).await;
    // Nothing read for twice the idle timeout and more; then what was sent, and the end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "still open 5 s later");
    veer.shutdown().await;
}

/// An HTTP/2 client that reads nothing once answered (so it never acknowledges the drain's
/// PING) does not hold the drain for `drain_timeout`: its connection, with no stream under
/// way, is closed about a second after the drain began.
#[tokio::test]
async fn a_drained_h2_connection_with_no_stream_is_closed_though_its_client_reads_nothing() {
    let upstream = recording("blue").await;
    let mut veer = Veer::shop("drain_timeout = \"30s\"", upstream.addr).await;
    // Answered; then nothing more is read.
    let _stream = answered_raw_h2(&veer).await;
    assert_eq!(upstream.seen().len(), 1);
    let running = veer.running.take().unwrap();
    let started = tokio::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    assert!(
        stopped.is_ok(),
        "drain held 10 s by a connection with no stream"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the grace"
    );
}

/// A drained HTTP/2 client that is still taking its answer slowly gets all of it: once the
/// exchange is over, the answer's last bytes may still wait in HTTP/2's send queue and in the
/// socket, and a connection still moving bytes is not closed as idle. A raw client with large
/// windows and a small receive buffer reads 512 KiB at 16 KiB per 100 ms from its socket (as
/// a slow mobile client would), acknowledging veer's SETTINGS and PINGs; the drain begins
/// after the answer's head. The tail left after the exchange ended (64 KiB of send queue and
/// what the socket holds) takes well over a second to read, past a look.
#[tokio::test]
async fn a_drained_h2_client_still_reading_its_answer_gets_all_of_it() {
    let len = 512 * 1024;
    let upstream = big(len).await;
    let mut veer = Veer::shop("drain_timeout = \"30s\"", upstream.addr).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let mut stream = socket.connect(veer.addr).await.unwrap();
    // INITIAL_WINDOW_SIZE 16 MiB, and the connection's window as large.
    let hello = raw_h2_get(&[0, 4, 1, 0, 0, 0], 1 << 24);
    stream.write_all(&hello).await.unwrap();
    let mut running = veer.running.take();
    let mut stopping = None;
    let mut got = 0;
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (kind, flags, id, payload) = read_frame(&mut stream).await?;
            match kind {
                // The answer's head: the drain begins.
                1 if id == 1 => stopping = running.take().map(|r| tokio::spawn(r.shutdown())),
                0 if id == 1 => {
                    got += payload.len();
                    if flags & 1 == 1 {
                        return Ok::<(), std::io::Error>(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                4 if flags & 1 == 0 => stream.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await?,
                6 if flags & 1 == 0 => {
                    stream.write_all(&[0, 0, 8, 6, 1, 0, 0, 0, 0]).await?;
                    stream.write_all(&payload).await?;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        matches!(read, Ok(Ok(()))),
        "{read:?} after {got} of {len} bytes"
    );
    assert_eq!(got, len);
    stopping.expect("the drain began").await.unwrap();
}

/// An HTTP/1.1 exchange under way when the drain begins is told: its answer says
/// `Connection: close`, so that the client sends its next request elsewhere instead of on a
/// connection about to close. (That a busy connection is told at once, not after the idle
/// ones' 50 ms settle, is not timed here: the answer comes 300 ms after the signal.)
#[tokio::test]
async fn an_answer_under_way_at_the_drain_says_connection_close() {
    let slow = Upstream::builder("slow")
        .latency(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let mut veer = Veer::shop("", slow.addr).await;
    let mut stream = raw_open(veer.addr, b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    await_requests(&slow, 1, Duration::from_secs(5)).await;
    let running = veer.running.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        answer.head
    );
    stopping.await.unwrap();
}

/// A keep-alive connection idle when the drain begins is closed 50 ms later if it stays idle;
/// a request its client sends meanwhile is answered with `Connection: close`, so that the
/// client does not send its next one on a connection about to close (where a close could
/// cross it, and the request be lost). The request goes 20 ms after the signal, once the
/// connection has seen it: an attempt where it came too late on a loaded machine (no answer,
/// or an answer before the connection saw the signal) is made again, five times at most.
#[tokio::test]
async fn a_request_on_an_idle_connection_after_the_drain_began_is_answered_with_connection_close() {
    let upstream = recording("blue").await;
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let mut veer = Veer::shop("", upstream.addr).await;
        let mut stream = kept_alive(&veer).await;
        let running = veer.running.take().unwrap();
        let stopping = tokio::spawn(running.shutdown());
        tokio::time::sleep(Duration::from_millis(20)).await;
        stream.write_all(GET).await.unwrap();
        let answer = read_response(&mut stream).await;
        let closes = answer.as_ref().map(|answer| {
            let head = answer.head.to_ascii_lowercase();
            (answer.status, head.contains("connection: close"))
        });
        stopping.await.unwrap();
        outcomes.push(closes);
        if closes == Some((200, true)) {
            return;
        }
    }
    panic!("no answer said Connection: close: {outcomes:?}");
}

/// A tunnel still open at `drain_timeout` is cut then.
#[tokio::test]
async fn a_tunnel_open_at_drain_timeout_is_cut() {
    let (mut veer, _upstream, mut stream) = tunnel("drain_timeout = \"1s\"").await;
    let running = veer.running.take().unwrap();
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(running.shutdown());
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        cut.is_ok(),
        "tunnel still open 5 s after the shutdown began"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "tunnel cut after {after:?}, drain_timeout 1 s"
    );
    stopping.await.unwrap();
}

/// A tunnel that carries nothing either way for `tunnel_idle_timeout` is closed, as NGINX's
/// `proxy_read_timeout` closes a WebSocket; one that keeps carrying bytes is not. Not
/// `idle_timeout`, the keep-alive limit, shorter here.
#[tokio::test]
async fn a_tunnel_idle_for_its_timeout_is_closed_and_a_busy_one_is_not() {
    let (veer, _upstream, mut stream) =
        tunnel("idle_timeout = \"300ms\"\ntunnel_idle_timeout = \"1s\"").await;
    // Busy for twice the idle timeout: a message every 300 ms. The quiet is timed from before
    // the last message is sent, so no scheduling delay of the test shortens what it measures.
    let mut quiet = tokio::time::Instant::now();
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        quiet = tokio::time::Instant::now();
        echoes(&mut stream).await;
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed {after:?} after the last byte, tunnel_idle_timeout 1 s"
    );
    veer.shutdown().await;
}

/// An upstream that answers 401 as soon as it has the request head, then reads the body as it
/// comes and drops it; the count of body bytes it read.
async fn answers_before_the_body() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&read);
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        let body_start = loop {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break head.len() - (end + 4);
            }
        };
        counted.store(body_start, Ordering::SeqCst);
        socket
            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => counted.fetch_add(n, Ordering::SeqCst),
            };
        }
    });
    (addr, read)
}

#[tokio::test]
async fn an_upload_read_on_after_an_early_answer_is_not_cut_by_header_timeout() {
    let (upstream, read) = answers_before_the_body().await;
    let routes = host_route("early", &["early"], "/", upstream);
    let veer = Veer::start("header_timeout = \"1s\"\nidle_timeout = \"5s\"", &routes).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    let head = "POST / HTTP/1.1\r\nHost: early\r\nContent-Length: 200000\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    // 20 pieces over 2 s: the answer comes at once, the body goes on past header_timeout.
    let piece = vec![b'x'; 10_000];
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(&piece)
            .await
            .unwrap_or_else(|e| panic!("upload cut after {i} pieces: {e}"));
    }
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 401, "{}", answer.head);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while read.load(Ordering::SeqCst) < 200_000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read.load(Ordering::SeqCst), 200_000, "body bytes upstream");
    veer.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_idle_timeout() {
    // 32 MiB: more than the kernel buffers on both sides of veer can hold.
    let big = big(32 << 20).await;
    let veer = Veer::shop("idle_timeout = \"1s\"", big.addr).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(veer.addr).await.unwrap();
    stream.write_all(GET).await.unwrap();
    // Read nothing for a while: veer's writes block, and after idle_timeout it gives up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    let read = read.expect("veer still writing after 14 s: the stalled client was not cut");
    // Cut: an aborted connection, or a close before the whole body.
    assert!(
        read.is_err() || got.len() < 32 << 20,
        "the whole body arrived ({} bytes)",
        got.len()
    );
    veer.shutdown().await;
}

/// A client that reads slowly but steadily a body its upstream keeps ahead of is cut neither
/// at `idle_timeout` nor at `request_timeout` (the time it takes to read is its own, not the
/// upstream's), and the slot counts no error.
#[tokio::test]
async fn a_slow_but_steady_reader_is_not_cut() {
    // 8 MiB, more than the kernel buffers hold, read at most 4 KiB at a time with a pause
    // of 1 ms: a few seconds, more than twice idle_timeout and request_timeout, with veer's
    // writes blocked most of the time.
    const SIZE: usize = 8 << 20;
    let big = big(SIZE).await;
    let server = "idle_timeout = \"1s\"\nrequest_timeout = \"1s\"";
    let veer = Veer::shop(server, big.addr).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(veer.addr).await.unwrap();
    download_at_a_pace(&veer, stream, SIZE, 4096, |_| {
        Some(Duration::from_millis(1))
    })
    .await;
    veer.shutdown().await;
}

/// A download longer than `request_timeout` because its client reads at its own pace (here
/// as curl's `--limit-rate` does: bursts of 1 MiB as fast as they come, then a pause; about
/// 10 MB/s) is not cut: the time the client takes is not the upstream's. Before, the first
/// time veer found the upstream's next bytes not read yet after `request_timeout` (in a burst)
/// cut it and counted a `timeout` against the slot.
#[tokio::test]
async fn a_download_longer_than_request_timeout_is_not_cut_while_the_client_reads() {
    const SIZE: usize = 40 << 20;
    let big = big(SIZE).await;
    let veer = Veer::shop("request_timeout = \"1s\"", big.addr).await;
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    let mut burst = 0;
    let pace = |got: usize| {
        let pause = got >> 20 > burst;
        burst = got >> 20;
        pause.then_some(Duration::from_millis(100))
    };
    download_at_a_pace(&veer, stream, SIZE, 64 << 10, pace).await;
    veer.shutdown().await;
}

/// Sends `GET /` on `stream` and reads the answer `read_len` bytes at a time, pausing after
/// each read for what `pace(bytes so far)` says, for 30 s at most. Asserts that the head and
/// the whole body of `size` bytes arrived before the close, that it took over 2 s (less tests
/// nothing), and that the upstream, never late, had no error counted against its slot.
async fn download_at_a_pace(
    veer: &Veer,
    mut stream: TcpStream,
    size: usize,
    read_len: usize,
    mut pace: impl FnMut(usize) -> Option<Duration>,
) {
    let request = b"GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; read_len];
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        if let Some(pause) = pace(got) {
            tokio::time::sleep(pause).await;
        }
    }
    assert!(
        got > size,
        "cut after {got} bytes in {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "read too fast to test anything: {:?}",
        started.elapsed()
    );
    let slot = veer.slot("shop", "blue").await;
    assert!(no_errors(&slot), "{slot}");
}

/// An upstream that answers 401 at once and then neither reads the rest nor closes.
async fn answers_then_stops_reading() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = vec![0u8; 4096];
        let _ = socket.read(&mut head).await;
        let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        socket.write_all(answer).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    });
    addr
}

#[tokio::test]
async fn a_request_body_no_one_reads_after_the_answer_is_cut_at_request_timeout() {
    let upstream = answers_then_stops_reading().await;
    let routes = host_route("early", &["early"], "/", upstream);
    let veer = Veer::start("request_timeout = \"1s\"\nmax_body_bytes = 0", &routes).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    // 64 MiB announced, written until the sockets on the way take no more for 300 ms.
    let head = "POST / HTTP/1.1\r\nHost: early\r\nContent-Length: 67108864\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let piece = vec![b'x'; 64 * 1024];
    for _ in 0..1024 {
        let wrote = tokio::time::timeout(Duration::from_millis(300), stream.write_all(&piece));
        if !matches!(wrote.await, Ok(Ok(()))) {
            break;
        }
    }
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 401, "{}", answer.head);
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "connection still held 10 s after the answer"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    veer.shutdown().await;
}

/// An HTTP/1.0 client asking for keep-alive is told the truth: a body without a length ends
/// with the connection (no `keep-alive` in the answer), one with a length keeps it open.
#[tokio::test]
async fn an_http10_keep_alive_client_is_told_when_the_connection_ends_with_the_body() {
    let (chunked, chunked_task) = support::wire::scripted_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let (sized, sized_task) = support::wire::scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    let routes = host_route("chunked", &["chunked"], "/", chunked)
        + &host_route("sized", &["sized"], "/", sized);
    let veer = Veer::start("", &routes).await;
    for (host, keeps) in [("chunked", false), ("sized", true)] {
        let mut stream = TcpStream::connect(veer.addr).await.unwrap();
        let request = format!("GET / HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_response(&mut stream).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert_eq!(answer.body, b"hello", "{host}");
        // HTTP/1.0 without `keep-alive` in the answer means close.
        let connection = answer
            .header("connection")
            .unwrap_or("")
            .to_ascii_lowercase();
        assert_eq!(connection.contains("keep-alive"), keeps, "{}", answer.head);
        if keeps {
            // And it is kept: a second request on it is answered.
            stream.write_all(request.as_bytes()).await.unwrap();
            let again = read_response(&mut stream).await.unwrap();
            assert_eq!(again.body, b"hello", "{host}");
        }
    }
    chunked_task.abort();
    sized_task.abort();
    veer.shutdown().await;
}
