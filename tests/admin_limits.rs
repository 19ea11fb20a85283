//! The admin port holds no connection for free (its own test binary: it opens a few hundred
//! sockets): a connection with no request under way for `IDLE_TIMEOUT` is closed, whether it
//! sent nothing, half a head, or an HTTP/2 preface; beyond `MAX_CONNECTIONS` open at once a new
//! one is closed as it is accepted; a POST body over 64 KiB is a 413 on every endpoint; heads
//! are held to 64 KiB and one Host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer::admin::{IDLE_TIMEOUT, MAX_CONNECTIONS};

/// Reads from `stream` until the peer closes it (or resets it); `Err` when it is still open
/// after `within`. Returns what was read before the close.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<String, String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got).into_owned();
    read.map(|()| got.clone()).map_err(|_| got)
}

#[tokio::test]
async fn admin_connections_are_bounded_in_time_and_number() {
    let blue = Upstream::builder("blue").start().await.unwrap();
    let veer = Veer::start("", &route("shop", blue.addr, blue.addr, "")).await;
    let admin = veer.admin;
    let mut silent = TcpStream::connect(admin).await.unwrap();
    let mut partial = TcpStream::connect(admin).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // An HTTP/2 connection that sends its preface and settings, then nothing.
    let mut h2 = TcpStream::connect(admin).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut idle = Vec::new();
    for _ in 3..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // veer accepts in the order of the backlog: this one is over the limit.
    let mut over = TcpStream::connect(admin).await.unwrap();
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let answer = closed_within(&mut over, Duration::from_secs(5)).await;
    assert_eq!(answer, Ok(String::new()), "not closed without an answer");
    let within = IDLE_TIMEOUT + Duration::from_secs(5);
    for (name, stream) in [
        ("silent", &mut silent),
        ("partial head", &mut partial),
        ("h2", &mut h2),
    ] {
        let closed = closed_within(stream, within).await;
        assert!(closed.is_ok(), "{name}: still open after {within:?}");
    }
    drop(idle);
    let answered = eventually(Duration::from_secs(5), || async {
        get(&veer.admin_url("/healthz"), &[]).await.0 == StatusCode::OK
    })
    .await;
    assert!(answered);
    veer.shutdown().await;
}

/// A body over 64 KiB is a 413 on every POST endpoint, used or not (the reload endpoint takes
/// none, and a body there was read on regardless); nothing is applied.
#[tokio::test]
async fn admin_post_bodies_over_64_kib_are_413() {
    let blue = Upstream::builder("blue").start().await.unwrap();
    let veer = Veer::start("", &route("shop", blue.addr, blue.addr, "")).await;
    let big = bytes::Bytes::from(vec![b' '; 65 * 1024]);
    for path in [
        "/api/v1/config/reload",
        "/api/v1/routes/shop/rollout/start",
        "/api/v1/routes/shop/weight",
    ] {
        let (status, _, body) = send(Method::POST, &veer.admin_url(path), &[], big.clone()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body:?}");
    }
    assert_eq!(veer.route_status("shop").await["phase"], "idle");
    let (status, _) = veer.admin_post("/api/v1/config/reload", "").await;
    assert_eq!(status, StatusCode::OK);
    veer.shutdown().await;
}

/// A client that writes its whole over-limit body before reading gets the admin API's 413, not
/// a reset (the connection lingers as the proxy's do): also when the 413 came before the body.
/// 32 MiB, more than loopback's socket buffers hold.
#[tokio::test]
async fn an_admin_client_that_sends_its_whole_refused_body_first_gets_the_413() {
    let blue = Upstream::builder("blue").start().await.unwrap();
    let veer = Veer::start("", &route("shop", blue.addr, blue.addr, "")).await;
    const LEN: usize = 32 << 20;
    let head = format!(
        "POST /api/v1/config/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {LEN}\r\n\r\n"
    );
    for after_answer in [false, true] {
        let how = wire::Upload {
            chunked: false,
            after_answer,
        };
        let answer = wire::upload_then_read(veer.admin, &head, LEN, how).await;
        let status = answer.as_deref().ok().and_then(raw_status);
        assert_eq!(status, Some(413), "{how:?}: {answer:?}");
    }
    veer.shutdown().await;
}

/// The admin port reads heads as the proxy does: an HTTP/1.1 request without a Host, or any
/// with two, is a 400 (the checks against DNS rebinding read the Host: a second one must not
/// hide behind the first); a head over 64 KiB is a 431. HTTP/1.0 needs no Host.
#[tokio::test]
async fn admin_heads_need_one_host_and_at_most_64_kib() {
    let blue = Upstream::builder("blue").start().await.unwrap();
    let veer = Veer::start("", &route("shop", blue.addr, blue.addr, "")).await;
    let big = format!("x-big: {}\r\n", "a".repeat(100 * 1024));
    for (request, status) in [
        ("GET /healthz HTTP/1.1\r\n\r\n".to_string(), 400),
        (
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n".to_string(),
            400,
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{big}\r\n"),
            431,
        ),
        (
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".to_string(),
            200,
        ),
        ("GET /healthz HTTP/1.0\r\n\r\n".to_string(), 200),
        (
            "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n".to_string(),
            400,
        ),
    ] {
        let answer = raw(veer.admin, request.as_bytes()).await;
        assert_eq!(
            raw_status(&answer),
            Some(status),
            "{}: {answer}",
            &request[..40]
        );
    }
    veer.shutdown().await;
}
