//! The life of a client connection over real sockets: clients that half-close after their
//! request, the keep-alive idle and request-head timers, and the drain on shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::wire::read_response;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let upstream = Upstream::builder("blue")
        .behaviour(Behaviour::Blackhole)
        .start()
        .await
        .unwrap();
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
