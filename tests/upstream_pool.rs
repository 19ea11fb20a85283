//! The upstream connection pool, seen from the upstream: connections are reused once their
//! exchange is over, never shared by two exchanges at once, closed when idle for too long, and
//! an upstream that closes idle connections costs no request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::wire::next_head;
use support::{eventually, get, route, Veer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A bare HTTP/1.1 upstream that counts what the pool does to it: connections accepted,
/// requests answered, connections that reached their end. GET `/` gets `ok`, `/empty` a 204;
/// every answer waits `delay` first.
#[derive(Clone, Default)]
struct Counts {
    accepted: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
}

impl Counts {
    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Starts the upstream; with `close_after_answer` it closes every connection right after its
/// first answer, without saying so (like an upstream whose keep-alive timeout has just run out).
async fn upstream(delay: Duration, close_after_answer: bool) -> (SocketAddr, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Counts::default();
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            let counts = shared.clone();
            tokio::spawn(async move {
                serve(stream, &counts, delay, close_after_answer).await;
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

async fn serve(mut stream: TcpStream, counts: &Counts, delay: Duration, close_after_answer: bool) {
    let mut buf = Vec::new();
    while let Some(head) = next_head(&mut stream, &mut buf).await {
        counts.requests.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        let answer: &[u8] = if head.starts_with("GET /empty ") {
            b"HTTP/1.1 204 No Content\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if stream.write_all(answer).await.is_err() || close_after_answer {
            return;
        }
    }
}

/// veer with one worker (one pool) in front of `upstream`, with `server_extra` in `[server]`.
async fn veer(server_extra: &str, upstream: SocketAddr) -> Veer {
    let extra = format!("workers = 1\n{server_extra}");
    Veer::start(&extra, &route("shop", upstream, upstream, "")).await
}

#[tokio::test]
async fn sequential_exchanges_reuse_one_upstream_connection() {
    let (addr, counts) = upstream(Duration::ZERO, false).await;
    let veer = veer("", addr).await;
    for path in ["/", "/empty"] {
        for _ in 0..10 {
            let (status, _, _) = get(&veer.url(path), &[]).await;
            assert!(status.is_success(), "{status}");
        }
    }
    assert_eq!(counts.requests(), 20);
    assert_eq!(
        counts.accepted(),
        1,
        "a finished exchange gives its connection back"
    );
    veer.shutdown().await;
}

#[tokio::test]
async fn concurrent_exchanges_never_share_a_connection() {
    let (addr, counts) = upstream(Duration::from_millis(200), false).await;
    let veer = veer("", addr).await;
    for round in 1..=2 {
        let url = veer.url("/");
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { get(&url, &[]).await.0 })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(counts.requests(), 8 * round);
        // 8 exchanges at once need 8 connections; the second round reuses them.
        assert_eq!(counts.accepted(), 8, "round {round}");
    }
    veer.shutdown().await;
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let (addr, counts) = upstream(Duration::ZERO, true).await;
    let veer = veer("", addr).await;
    for i in 1..=10 {
        let (status, _, body) = get(&veer.url("/"), &[]).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(&body[..], b"ok");
        // Give veer the time to see the close before the next request.
        assert!(eventually(Duration::from_secs(5), || async { counts.closed() == i }).await);
    }
    // Every request reached the upstream exactly once, each on a connection of its own.
    assert_eq!(counts.requests(), 10);
    assert_eq!(counts.accepted(), 10);
    let slot = veer.slot("shop", "blue").await;
    assert!(support::no_errors(&slot), "{slot}");
    veer.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_upstream_idle_timeout() {
    let (addr, counts) = upstream(Duration::ZERO, false).await;
    let veer = veer("upstream_idle_timeout = \"300ms\"", addr).await;
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Closed by veer (the upstream itself never closes): within a few idle periods.
    assert!(eventually(Duration::from_secs(5), || async { counts.closed() == 1 }).await);
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counts.accepted(), 2);
    veer.shutdown().await;
}

/// An upstream that answers the first request of every connection and, on the same connection,
/// takes the next one and closes (`reset`: resets) without answering it, as an upstream whose
/// keep-alive timeout runs out just as a request arrives. Returns the heads of every request it
/// took, in order, and the number of connections accepted.
async fn closing_upstream(reset: bool) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>, Counts) {
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counts = Counts::default();
    let (seen, shared) = (Arc::clone(&heads), counts.clone());
    let addr = support::wire::each_connection(move |mut stream| {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let seen = Arc::clone(&seen);
        async move {
            let mut buf = Vec::new();
            for answered in [true, false] {
                let Some(head) = next_head(&mut stream, &mut buf).await else {
                    return;
                };
                // A body, if any, is small and came with its head: it is dropped with `buf`.
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.parse::<usize>().unwrap());
                buf.drain(..length.min(buf.len()));
                seen.lock().unwrap().push(head);
                if answered {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    stream.write_all(answer).await.unwrap();
                }
            }
            if reset {
                stream.set_zero_linger().unwrap();
            }
        }
    })
    .await;
    (addr, heads, counts)
}

#[tokio::test]
async fn a_bodiless_get_is_sent_again_when_a_reused_connection_closes_unanswered() {
    for reset in [false, true] {
        let (addr, heads, counts) = closing_upstream(reset).await;
        let veer = veer("", addr).await;
        for i in 1..=2 {
            // Idle for a while first, as a connection whose keep-alive timeout runs out is.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (status, _, body) = get(&veer.url("/page?q=1"), &[("x-trace", "t1")]).await;
            assert_eq!(status, StatusCode::OK, "request {i}, reset {reset}");
            assert_eq!(&body[..], b"ok");
        }
        // The second request met the closing connection, then went on a new one, whole.
        assert_eq!(counts.accepted(), 2, "reset {reset}");
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3, "{heads:?}");
        assert_eq!(heads[1], heads[2], "sent again as it was");
        assert!(
            heads[2].starts_with("GET /page?q=1 HTTP/1.1\r\n"),
            "{}",
            heads[2]
        );
        assert!(heads[2].contains("x-trace: t1\r\n"), "{}", heads[2]);
        assert_eq!(
            heads[2].matches("x-forwarded-for:").count(),
            1,
            "{}",
            heads[2]
        );
        let slot = veer.slot("shop", "blue").await;
        assert!(support::no_errors(&slot), "{slot}");
        veer.shutdown().await;
    }
}

/// Sends `method` to `path` with each of `bodies` in turn, each after 20 ms idle (as a
/// connection whose keep-alive timeout runs out is); returns the statuses.
async fn after_idling(
    veer: &Veer,
    method: http::Method,
    path: &str,
    bodies: &[&'static [u8]],
) -> Vec<StatusCode> {
    let client = support::load::client();
    let mut statuses = Vec::new();
    for body in bodies {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let request = http::Request::builder()
            .method(method.clone())
            .uri(veer.url(path))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
            .unwrap();
        statuses.push(client.request(request).await.unwrap().status());
    }
    statuses
}

#[tokio::test]
async fn a_post_is_never_sent_again_when_a_reused_connection_closes_unanswered() {
    let (addr, heads, counts) = closing_upstream(false).await;
    let veer = veer("", addr).await;
    let statuses = after_idling(&veer, http::Method::POST, "/order", &[b"one", b"one"]).await;
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    // The upstream may have acted on the second POST: it is not sent again.
    assert_eq!(heads.lock().unwrap().len(), 2);
    assert_eq!(counts.accepted(), 1);
    let slot = veer.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["reset"], 1, "{slot}");
    veer.shutdown().await;
}

/// A DELETE without a body is idempotent (RFC 9110 §9.2.2): lost to the keep-alive race, it is
/// sent again on a new connection, as a GET is; a DELETE with a body is not.
#[tokio::test]
async fn a_bodiless_delete_is_sent_again_when_a_reused_connection_closes_unanswered() {
    let (addr, heads, counts) = closing_upstream(false).await;
    let veer = veer("", addr).await;
    let statuses = after_idling(&veer, http::Method::DELETE, "/item/7", &[b"", b"", b"x"]).await;
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::BAD_GATEWAY]
    );
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 4, "{heads:?}");
    assert_eq!(heads[1], heads[2], "sent again as it was");
    assert_eq!(counts.accepted(), 2);
    assert!(
        heads[2].starts_with("DELETE /item/7 HTTP/1.1\r\n"),
        "{}",
        heads[2]
    );
    veer.shutdown().await;
}

/// The body a server sends after its answer to a HEAD is not read as the answer to the next
/// request: a HEAD's connection is not reused.
#[tokio::test]
async fn a_late_body_after_a_head_answer_never_reaches_the_next_request() {
    let (addr, accepted) = support::wire::late_head_body_upstream().await;
    let veer = veer("", addr).await;
    let client = support::load::client();
    for i in 0..3 {
        let head = http::Request::head(veer.url(&format!("/head{i}")))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let answer = client.request(head).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let path = format!("/next{i}");
        let (status, _, body) = get(&veer.url(&path), &[]).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(body, path.as_bytes(), "request {i}");
    }
    let slot = veer.slot("shop", "blue").await;
    assert!(support::no_errors(&slot), "{slot}");
    // A HEAD's connection is closed after it (each GET after the first takes the connection
    // its HEAD used): 4 connections for 6 requests.
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    veer.shutdown().await;
}

/// An upstream that closes the connection without an answer for each request it takes whose
/// number (from 0, over all connections) and head `drops` picks (as a handler that crashes),
/// and answers every other one with `ok`, keeping the connection open unless `close_after`.
/// Returns the number of requests it took.
async fn failing_upstream(
    drops: fn(u64, &str) -> bool,
    close_after: bool,
) -> (SocketAddr, Arc<AtomicU64>) {
    let taken = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&taken);
    let addr = support::wire::each_connection(move |mut stream| {
        let counted = Arc::clone(&counted);
        async move {
            let mut buf = Vec::new();
            while let Some(head) = next_head(&mut stream, &mut buf).await {
                if drops(counted.fetch_add(1, Ordering::SeqCst), &head) {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() || close_after {
                    return;
                }
            }
        }
    })
    .await;
    (addr, taken)
}

/// A GET the upstream fails before answering (on a connection made for it) is sent once more,
/// and the client gets the answer to that; the failure still counts against the slot, so that
/// the judge sees an upstream that drops requests. A POST is not sent again (see above).
#[tokio::test]
async fn a_get_the_upstream_drops_unanswered_is_sent_once_more_and_counted() {
    let (addr, taken) = failing_upstream(|n, _| n == 0, false).await;
    let once = veer("", addr).await;
    let (status, _, body) = get(&once.url("/page"), &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(taken.load(Ordering::SeqCst), 2);
    let slot = once.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["reset"], 1, "{slot}");
    assert_eq!(slot["requests"], 2, "{slot}");
    once.shutdown().await;
    // The same for a client over HTTP/2.
    let (addr, taken) = failing_upstream(|n, _| n == 0, false).await;
    let h2 = veer("", addr).await;
    let (mut sender, _conn) = support::h2c_to(h2.addr).await;
    let request = http::Request::get(h2.url("/page"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(taken.load(Ordering::SeqCst), 2);
    let slot = h2.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["reset"], 1, "{slot}");
    h2.shutdown().await;
    // Sent once more at most: dropped twice, it is a 502.
    let (addr, taken) = failing_upstream(|n, _| n < 2, false).await;
    let twice = veer("", addr).await;
    let (status, _, _) = get(&twice.url("/page"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(taken.load(Ordering::SeqCst), 2);
    twice.shutdown().await;
    // Also when the first drop was the keep-alive race: the second try, on a new connection,
    // is the last.
    let (addr, taken) = failing_upstream(|n, _| n == 1 || n == 2, false).await;
    let race = veer("", addr).await;
    let (status, _, _) = get(&race.url("/page"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _, _) = get(&race.url("/page"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(taken.load(Ordering::SeqCst), 3);
    race.shutdown().await;
}

/// With two endpoints, the GET an endpoint drops goes once more to the other one, and the one
/// that dropped it is passed over.
#[tokio::test]
async fn a_get_dropped_by_one_endpoint_is_answered_by_the_next() {
    let (bad, bad_taken) = failing_upstream(|_, _| true, false).await;
    let (good, good_taken) = failing_upstream(|_, _| false, false).await;
    let routes = format!(
        "[[route]]\nname = \"shop\"\n[route.blue]\nendpoints = [\"{bad}\", \"{good}\"]\n\
         [route.green]\nendpoints = [\"{good}\"]\n"
    );
    let veer = Veer::start("workers = 1", &routes).await;
    for i in 0..4 {
        let (status, _, body) = get(&veer.url("/page"), &[]).await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"ok"[..]),
            "request {i}"
        );
    }
    assert_eq!(
        bad_taken.load(Ordering::SeqCst),
        1,
        "passed over after dropping one"
    );
    assert_eq!(good_taken.load(Ordering::SeqCst), 4);
    let slot = veer.slot("shop", "blue").await;
    assert_eq!(slot["errors"]["reset"], 1, "{slot}");
    veer.shutdown().await;
}

/// Two endpoints; one answers and closes every connection, the other keeps its connections
/// open; both drop `/crash`. The request sent once more after a drop is not sent a third time,
/// whichever connection it finds (here, after the first drop, an idle one that a drop there
/// would take for the keep-alive race).
#[tokio::test]
async fn a_get_sent_once_more_is_never_sent_a_third_time() {
    let crash = |_: u64, head: &str| head.starts_with("GET /crash ");
    let (closing, closing_taken) = failing_upstream(crash, true).await;
    let (open, open_taken) = failing_upstream(crash, false).await;
    let routes = format!(
        "[[route]]\nname = \"shop\"\n[route.blue]\nendpoints = [\"{closing}\", \"{open}\"]\n\
         [route.green]\nendpoints = [\"{open}\"]\n"
    );
    let veer = Veer::start("workers = 1", &routes).await;
    for _ in 0..2 {
        assert_eq!(get(&veer.url("/warm"), &[]).await.0, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, _, _) = get(&veer.url("/crash"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let crashes = closing_taken.load(Ordering::SeqCst) + open_taken.load(Ordering::SeqCst) - 2;
    assert_eq!(crashes, 2, "tries of /crash");
    veer.shutdown().await;
}

/// A GET that goes to the next endpoint because the first refused the connection, and that
/// the next one drops, is sent once more too.
#[tokio::test]
async fn a_get_dropped_after_a_refused_connection_is_sent_once_more() {
    let refused = support::closed_addr().await;
    let (flaky, taken) = failing_upstream(|n, _| n == 0, false).await;
    let routes = format!(
        "[[route]]\nname = \"shop\"\n[route.blue]\nendpoints = [\"{refused}\", \"{flaky}\"]\n\
         [route.green]\nendpoints = [\"{flaky}\"]\n"
    );
    let veer = Veer::start("workers = 1", &routes).await;
    let (status, _, body) = get(&veer.url("/page"), &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(taken.load(Ordering::SeqCst), 2);
    veer.shutdown().await;
}

/// Interim answers before the final one are read and passed over; an upstream that sends
/// them without end fails the exchange (502, a `protocol` error) once 1 MiB of them came,
/// instead of keeping the worker parsing them until `request_timeout` (30 s here; the client
/// waits 10 s). The same for a shadow after 100 of them: its copy counts as an `error` then,
/// not at the timeout (the answers' long reason phrases are not in what hyper shows of them).
#[tokio::test]
async fn endless_interim_answers_fail_the_exchange_at_once() {
    let few = support::wire::interim_upstream(Some(3)).await;
    let endless = support::wire::interim_upstream(None).await;
    let shadow = format!("[route.shadow]\nendpoints = [\"{endless}\"]\npercent = 100.0");
    let routes =
        route("shop", few, few, &shadow) + &support::host_route("flood", &[], "/flood", endless);
    let veer = Veer::start("workers = 1\nrequest_timeout = \"30s\"", &routes).await;
    let (status, _, body) = get(&veer.url("/page"), &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let flood_url = veer.url("/flood");
    let answer = tokio::time::timeout(Duration::from_secs(10), get(&flood_url, &[]));
    let (status, _, body) = answer.await.expect("no answer within 10 s");
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body:?}");
    let flood = veer.slot("flood", "blue").await;
    assert_eq!(flood["errors"]["protocol"], 1, "{flood}");
    let shop = veer.slot("shop", "blue").await;
    assert!(support::no_errors(&shop), "{shop}");
    // The copy of `/page` failed as the shadow's error (its timeout is request_timeout).
    let settled = eventually(Duration::from_secs(10), || async {
        let shadow = veer.route_status("shop").await["shadow"].clone();
        shadow["error"] == 1 && shadow["in_flight"] == 0
    })
    .await;
    let shadow = veer.route_status("shop").await["shadow"].clone();
    assert!(settled, "{shadow}");
    veer.shutdown().await;
}
