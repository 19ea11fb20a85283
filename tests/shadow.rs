//! Shadow traffic over real sockets: the mirrored share, which methods and bodies are mirrored,
//! the marker header, isolation of the client from the shadow (slow, dead or different), and
//! the outcome counters in the admin API and in Prometheus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use support::*;
use tokio::io::AsyncReadExt;

/// A route on `prefix` (any host) with `sticky.by = "none"`, all traffic on blue, and a
/// shadow at `shadow` with `shadow_extra` in `[route.shadow]`.
fn shadow_route(
    name: &str,
    prefix: &str,
    blue: SocketAddr,
    green: SocketAddr,
    shadow: Option<(SocketAddr, &str)>,
) -> String {
    let shadow = shadow.map_or(String::new(), |(addr, extra)| {
        format!("[route.shadow]\nendpoints = [\"{addr}\"]\n{extra}\n")
    });
    format!(
        "[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\n\
         [route.blue]\nendpoints = [\"{blue}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{green}\"]\nversion = \"v2\"\n\
         [route.sticky]\nby = \"none\"\n{shadow}"
    )
}

/// veer with the route `mirror` on `/` between recording blue and green upstreams (all traffic
/// on blue), mirroring to `shadow` with `extra` in `[route.shadow]`; returns veer, blue, green
/// and the shadow.
async fn mirror(shadow: Upstream, extra: &str) -> (Veer, Upstream, Upstream, Upstream) {
    mirror_keyed(shadow, extra, "none").await
}

/// [`mirror`] with the route's sticky key `by`.
async fn mirror_keyed(
    shadow: Upstream,
    extra: &str,
    by: &str,
) -> (Veer, Upstream, Upstream, Upstream) {
    let (veer, blue, green) = mirror_to(shadow.addr, extra, by).await;
    (veer, blue, green, shadow)
}

/// veer with the route `mirror` on `/` keyed `by`, between recording blue and green upstreams
/// (all traffic on blue), mirroring to whatever is at `shadow`; returns veer, blue and green.
async fn mirror_to(shadow: SocketAddr, extra: &str, by: &str) -> (Veer, Upstream, Upstream) {
    let (blue, green) = (recording("blue").await, recording("green").await);
    let routes = shadow_route("mirror", "/", blue.addr, green.addr, Some((shadow, extra)))
        .replace("by = \"none\"", &format!("by = \"{by}\""));
    (Veer::start("", &routes).await, blue, green)
}

/// veer with the route `mirror` on `/`, all traffic on `blue`, mirrored to a recording shadow
/// with `extra` in `[route.shadow]`; returns veer and the shadow.
async fn mirror_from(blue: &Upstream, extra: &str) -> (Veer, Upstream) {
    let green = recording("green").await;
    let shadow = recording("shadow").await;
    let routes = shadow_route(
        "mirror",
        "/",
        blue.addr,
        green.addr,
        Some((shadow.addr, extra)),
    );
    (Veer::start("", &routes).await, shadow)
}

/// The route's shadow JSON as it is now.
async fn shadow_stats(veer: &Veer, route: &str) -> Value {
    veer.route_status(route).await["shadow"].clone()
}

fn counter(shadow: &Value, key: &str) -> u64 {
    shadow[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key}: {shadow}"))
}

/// Every chosen shadow has an outcome and none is in flight.
fn settled(shadow: &Value) -> bool {
    let outcomes: u64 = [
        "match",
        "mismatch",
        "sent",
        "error",
        "dropped_busy",
        "dropped_body",
    ]
    .iter()
    .map(|key| counter(shadow, key))
    .sum();
    outcomes == counter(shadow, "requests") && counter(shadow, "in_flight") == 0
}

/// The route's shadow JSON once every chosen shadow has an outcome (polled for up to 10 s).
async fn settled_shadow(veer: &Veer, route: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shadow = shadow_stats(veer, route).await;
        if settled(&shadow) {
            return shadow;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shadow of {route} never settled: {shadow}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_n(veer: &Veer, path: &str, n: usize) -> Vec<(http::StatusCode, Bytes)> {
    get_many(&veer.url(path), vec![vec![]; n], 8)
        .await
        .into_iter()
        .map(|(status, _, body)| (status, body))
        .collect()
}

/// How many answers are not blue's `200 blue`.
fn not_from_blue(answers: &[(http::StatusCode, Bytes)]) -> usize {
    answers
        .iter()
        .filter(|(status, body)| *status != 200 || body != "blue\n")
        .count()
}

/// Ten requests of each of `methods` to `/m` with `body`, each answered 200.
async fn ten_of_each(veer: &Veer, methods: &[Method], body: Bytes) {
    for method in methods {
        for _ in 0..10 {
            let (status, _, _) = send(method.clone(), &veer.url("/m"), &[], body.clone()).await;
            assert_eq!(status, 200, "{method}");
        }
    }
}

/// 2,000 GETs through a route keyed `by`; asserts the mirrored share is `percent = 20`.
async fn mirrored_share_is_percent(by: &str) {
    let extra = "percent = 20.0\nmax_in_flight = 10000";
    let (veer, blue, _green, shadow) = mirror_keyed(recording("shadow").await, extra, by).await;
    let answers = get_n(&veer, "/share", 2_000).await;
    assert_eq!(not_from_blue(&answers), 0);
    let stats = settled_shadow(&veer, "mirror").await;
    let mirrored = counter(&stats, "requests");
    // N = 2000 GETs at 20 %: sd = sqrt(2000 * 0.2 * 0.8) = 17.9 requests; bound 90 (5 sd).
    assert!(
        mirrored.abs_diff(400) <= 90,
        "{mirrored} of 2000 mirrored ({by})"
    );
    assert_eq!(shadow.request_count(), mirrored);
    assert_eq!(counter(&stats, "match"), mirrored);
    assert_eq!(blue.request_count(), 2_000);
    veer.shutdown().await;
}

/// A route without a shadow has the shadow's counters too, at zero (SPEC's route JSON has
/// them on every route), marked `configured: false`; one with a shadow is marked `true`.
#[tokio::test]
async fn a_route_without_a_shadow_shows_its_counters_at_zero() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("", upstream.addr).await;
    get_n(&veer, "/", 3).await;
    let shadow = shadow_stats(&veer, "shop").await;
    assert_eq!(shadow["configured"], false, "{shadow}");
    for key in [
        "requests",
        "match",
        "mismatch",
        "error",
        "dropped_busy",
        "dropped_body",
    ] {
        assert_eq!(counter(&shadow, key), 0, "{key}");
    }
    // The same fields as with a shadow.
    assert_eq!(
        shadow["recent_mismatches"],
        serde_json::json!([]),
        "{shadow}"
    );
    assert!(shadow["latency"].is_object(), "{shadow}");
    veer.shutdown().await;
    let (veer, _blue, _green, _shadow) = mirror(recording("shadow").await, "percent = 100.0").await;
    assert_eq!(shadow_stats(&veer, "mirror").await["configured"], true);
    veer.shutdown().await;
}

#[tokio::test]
async fn mirrored_share_matches_percent() {
    mirrored_share_is_percent("none").await;
}

/// `percent` is a share of requests: one user (every request from one client IP) is mirrored
/// at that share too, not always or never.
#[tokio::test]
async fn one_users_requests_are_mirrored_at_percent() {
    mirrored_share_is_percent("client-ip").await;
}

#[tokio::test]
async fn only_the_listed_methods_are_mirrored() {
    let (veer, blue, _green, shadow) = mirror(recording("shadow").await, "percent = 100.0").await;
    let unlisted = [Method::POST, Method::PUT, Method::DELETE];
    ten_of_each(&veer, &unlisted, "x".into()).await;
    // The shadow draw and the method check happen before the primary is forwarded.
    let stats = shadow_stats(&veer, "mirror").await;
    assert_eq!(counter(&stats, "requests"), 0, "{stats}");
    ten_of_each(&veer, &[Method::GET, Method::HEAD], Bytes::new()).await;
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "requests"), 20, "{stats}");
    let methods: Vec<Method> = shadow.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(methods.len(), 20);
    assert!(methods
        .iter()
        .all(|m| m == Method::GET || m == Method::HEAD));
    assert_eq!(blue.request_count(), 50);
    // The per-slot families count the 50 client requests only; the 20 copies have their own.
    let metrics = prometheus(&veer).await;
    let requests: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("veer_requests_total{route=\"mirror\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 50.0, "{metrics}");
    assert!(!metrics.contains("slot=\"shadow\""), "{metrics}");
    assert!(
        metrics.contains("veer_shadow_duration_seconds_count{route=\"mirror\"} 20"),
        "{metrics}"
    );
    veer.shutdown().await;
}

#[tokio::test]
async fn shadow_copy_is_marked_and_never_reaches_the_client() {
    let shadow = Upstream::builder("shadow")
        .status(201)
        .body("from the shadow\n")
        .record(true)
        .start()
        .await
        .unwrap();
    let (veer, blue, _green, shadow) = mirror(shadow, "percent = 100.0").await;
    let path = "/some/path?q=1&r=two";
    for _ in 0..10 {
        // A client cannot pass itself off as a shadow copy.
        let headers = [("x-veer-shadow", "1"), ("x-custom", "abc")];
        let (status, headers, body) = get(&veer.url(path), &headers).await;
        assert_eq!(status, 200);
        assert_eq!(body, "blue\n");
        assert_eq!(headers["x-upstream"], "blue");
        assert!(!headers.contains_key("x-veer-shadow"));
    }
    await_requests(&shadow, 10, Duration::from_secs(10)).await;
    for seen in blue.seen() {
        assert!(!seen.headers.contains_key("x-veer-shadow"), "{seen:?}");
        assert_eq!(seen.uri, path);
    }
    for seen in shadow.seen() {
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.uri, path);
        let marks: Vec<_> = seen.headers.get_all("x-veer-shadow").iter().collect();
        assert_eq!(marks, ["1"]);
        assert_eq!(seen.headers["x-custom"], "abc");
    }
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "mismatch"), 10, "201 vs 200: {stats}");
    veer.shutdown().await;
}

#[tokio::test]
async fn a_blackholed_shadow_is_capped_and_never_fails_the_primary() {
    let blue = recording("blue").await;
    let green = recording("green").await;
    let shadow = blackhole("shadow").await;
    // The shadow timeout outlasts the test: the first 4 copies hold their permits throughout.
    let extra = "percent = 100.0\nmax_in_flight = 4\ntimeout = \"60s\"";
    let routes = shadow_route(
        "mirrored",
        "/mirrored",
        blue.addr,
        green.addr,
        Some((shadow.addr, extra)),
    ) + &shadow_route("plain", "/plain", blue.addr, green.addr, None);
    let veer = Veer::start("", &routes).await;
    let mirrored = get_n(&veer, "/mirrored", 40).await;
    let plain = get_n(&veer, "/plain", 40).await;
    assert_eq!((not_from_blue(&mirrored), not_from_blue(&plain)), (0, 0));
    for route in ["mirrored", "plain"] {
        let status = veer.route_status(route).await;
        let blue = &status["slots"]["blue"];
        assert_eq!(blue["requests"], 40, "{route}: {blue}");
        assert_eq!(blue["error_rate"], 0.0, "{route}: {blue}");
    }
    await_requests(&shadow, 4, Duration::from_secs(10)).await;
    let stats = shadow_stats(&veer, "mirrored").await;
    assert_eq!(counter(&stats, "requests"), 40, "{stats}");
    assert_eq!(counter(&stats, "dropped_busy"), 36, "{stats}");
    assert_eq!(counter(&stats, "in_flight"), 4, "{stats}");
    assert_eq!(
        shadow
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    let metrics = prometheus(&veer).await;
    assert_eq!(sample(&metrics, "mirrored", "dropped_busy"), Some(36.0));
    veer.shutdown().await;
}

async fn prometheus(veer: &Veer) -> String {
    let (status, _, body) = get(&veer.admin_url("/metrics"), &[]).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of `veer_shadow_total{route, outcome}`.
fn sample(metrics: &str, route: &str, outcome: &str) -> Option<f64> {
    let prefix = format!("veer_shadow_total{{route=\"{route}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|value| value.parse().unwrap())
}

#[tokio::test]
async fn shadow_outcomes_are_counted_in_the_api_and_in_prometheus() {
    let blue = recording("blue").await;
    let green = recording("green").await;
    let failing = Upstream::builder("shadow")
        .status(500)
        .start()
        .await
        .unwrap();
    let same = Upstream::builder("shadow").start().await.unwrap();
    let other_body = Upstream::builder("shadow")
        .body("something else\n")
        .start()
        .await
        .unwrap();
    let same_body = Upstream::builder("shadow")
        .body("blue\n")
        .start()
        .await
        .unwrap();
    let dead = closed_addr().await;
    let status = "percent = 100.0\ncompare = \"status\"";
    let body = "percent = 100.0\ncompare = \"body\"";
    // A route named `name` on `/name`, mirrored to `shadow`.
    let mirrored = |name: &str, shadow: SocketAddr, extra: &str| {
        let prefix = format!("/{name}");
        shadow_route(name, &prefix, blue.addr, green.addr, Some((shadow, extra)))
    };
    let routes = [
        mirrored("status-diff", failing.addr, status),
        mirrored("status-same", same.addr, status),
        mirrored("body-diff", other_body.addr, body),
        mirrored("body-same", same_body.addr, body),
        mirrored("dead", dead, status),
    ]
    .concat();
    let veer = Veer::start("", &routes).await;
    // (route, match, mismatch, error)
    let expected = [
        ("status-diff", 0, 10, 0),
        ("status-same", 10, 0, 0),
        ("body-diff", 0, 10, 0),
        ("body-same", 10, 0, 0),
        ("dead", 0, 0, 10),
    ];
    for (route, _, _, _) in expected {
        let answers = get_n(&veer, &format!("/{route}/x"), 10).await;
        assert_eq!(not_from_blue(&answers), 0, "{route}");
    }
    for (route, matched, mismatched, errors) in expected {
        let stats = settled_shadow(&veer, route).await;
        let counts = (
            counter(&stats, "match"),
            counter(&stats, "mismatch"),
            counter(&stats, "error"),
        );
        assert_eq!(counts, (matched, mismatched, errors), "{route}: {stats}");
        let recent = stats["recent_mismatches"].as_array().unwrap();
        assert_eq!(recent.len() as u64, mismatched, "{route}: {stats}");
        for mismatch in recent {
            assert_eq!(mismatch["path"], format!("/{route}/x"));
            assert_eq!(mismatch["method"], "GET");
            assert_eq!(mismatch["primary_status"], 200);
        }
    }
    let recent = veer.route_status("status-diff").await["shadow"]["recent_mismatches"].clone();
    assert_eq!(recent[0]["shadow_status"], 500, "{recent}");
    let recent = veer.route_status("body-diff").await["shadow"]["recent_mismatches"].clone();
    assert_eq!(recent[0]["shadow_status"], 200, "{recent}");
    assert_eq!(recent[0]["body_differs"], true, "{recent}");

    let metrics = prometheus(&veer).await;
    for (route, matched, mismatched, errors) in expected {
        let got = (
            sample(&metrics, route, "match"),
            sample(&metrics, route, "mismatch"),
            sample(&metrics, route, "error"),
            sample(&metrics, route, "dropped_busy"),
            sample(&metrics, route, "dropped_body"),
        );
        let want = (
            Some(matched as f64),
            Some(mismatched as f64),
            Some(errors as f64),
            Some(0.0),
            Some(0.0),
        );
        assert_eq!(got, want, "{route}");
    }
    veer.shutdown().await;
}

#[tokio::test]
async fn large_bodies_are_not_mirrored_and_small_ones_are_copied_intact() {
    let extra = "percent = 100.0\nmethods = [\"POST\"]\nmax_body_bytes = 1024";
    let (veer, blue, _green, shadow) = mirror(recording("shadow").await, extra).await;
    let large: Bytes = (0..65_536u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let (status, _, _) = send(Method::POST, &veer.url("/upload"), &[], large.clone()).await;
    assert_eq!(status, 200);
    // Declared too large: dropped on the request path.
    let stats = shadow_stats(&veer, "mirror").await;
    assert_eq!(counter(&stats, "dropped_body"), 1, "{stats}");

    // Chunked, so only seen too large while it streams.
    let chunk = vec![b'c'; 4096];
    let mut request = b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\
                        Connection: close\r\n\r\n1000\r\n"
        .to_vec();
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(raw_status(&raw(veer.addr, &request).await), Some(200));

    let small = Bytes::from_static(b"a small body, mirrored whole");
    let (status, _, _) = send(Method::POST, &veer.url("/small"), &[], small.clone()).await;
    assert_eq!(status, 200);

    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "dropped_body"), 2, "{stats}");
    assert_eq!(counter(&stats, "match"), 1, "{stats}");
    let seen = shadow.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/small");
    assert_eq!(seen[0].body.as_ref(), Some(&small));
    let primary: Vec<(String, Option<Bytes>)> =
        blue.seen().into_iter().map(|s| (s.uri, s.body)).collect();
    assert_eq!(
        primary,
        [
            ("/upload".to_string(), Some(large)),
            ("/chunked".to_string(), Some(Bytes::from(chunk))),
            ("/small".to_string(), Some(small)),
        ]
    );
    veer.shutdown().await;
}

/// An upgrade request is not mirrored: a copy could only open a second tunnel, or be a plain
/// request that differs from the handshake the client made.
#[tokio::test]
async fn an_upgrade_request_is_not_mirrored() {
    use tokio::io::AsyncWriteExt;
    let ws = Upstream::builder("ws")
        .behaviour(Behaviour::WebSocketEcho)
        .start()
        .await
        .unwrap();
    let shadow = recording("shadow").await;
    let route = shadow_route(
        "ws",
        "/",
        ws.addr,
        ws.addr,
        Some((shadow.addr, "percent = 100")),
    );
    let veer = Veer::start("", &route).await;
    let mut stream = tokio::net::TcpStream::connect(veer.addr).await.unwrap();
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = wire::read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 101, "{}", answer.head);
    drop(stream);
    // A plain request after it is mirrored, so the shadow is not simply off.
    assert_eq!(get_n(&veer, "/plain", 1).await[0].0, 200);
    let state = settled_shadow(&veer, "ws").await;
    assert_eq!(counter(&state, "requests"), 1, "{state}");
    let seen = shadow.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/plain");
    veer.shutdown().await;
}

/// When the primary fails (its slot refuses connections), the chosen shadow is still sent and
/// compared with the status the client got: every chosen shadow ends with an outcome.
#[tokio::test]
async fn a_failed_primary_still_gets_its_shadow_compared() {
    let dead = closed_addr().await;
    let green = recording("green").await;
    let shadow = recording("shadow").await;
    let route = shadow_route(
        "failing",
        "/",
        dead,
        green.addr,
        Some((shadow.addr, "percent = 100")),
    );
    let veer = Veer::start("", &route).await;
    for (status, _) in get_n(&veer, "/x", 10).await {
        assert_eq!(status, 502);
    }
    let state = settled_shadow(&veer, "failing").await;
    assert_eq!(counter(&state, "requests"), 10, "{state}");
    assert_eq!(counter(&state, "mismatch"), 10, "{state}");
    assert_eq!(shadow.request_count(), 10);
    veer.shutdown().await;
}

/// A shadow that refuses connections gets one attempt a second (`REFUSED_REST`), not one per
/// copy: copies in between count as errors without costing a connect. 80 requests; with
/// `max_in_flight = 8` at most 8 attempts can be under way before the first refusal is seen
/// (copies past those are dropped busy), then one probe a second.
#[tokio::test]
async fn a_shadow_that_refuses_connections_is_rested_not_retried_per_copy() {
    let refused = closed_addr().await;
    let shadow = "percent = 100.0\nmax_in_flight = 8";
    let (veer, _blue, _green) = mirror_to(refused, shadow, "none").await;
    let started = tokio::time::Instant::now();
    let answers = get_n(&veer, "/", 80).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(not_from_blue(&answers), 0);
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "requests"), 80, "{stats}");
    let (errors, busy) = (counter(&stats, "error"), counter(&stats, "dropped_busy"));
    assert_eq!(errors + busy, 80, "{stats}");
    let attempts = stats["latency"]["errors"]["connect"].as_u64().unwrap();
    let bound = 8 + took.ceil() as u64;
    assert!(
        (1..=bound).contains(&attempts),
        "{attempts} connection attempts for 80 copies in {took:.2} s: {stats}"
    );
    veer.shutdown().await;
}

/// A refused connection rests only the endpoint that refused it: with one of two shadow
/// endpoints dead, the live one gets every copy the dead one does not. 80 requests, 8 at a
/// time, `max_in_flight = 8`: the dead endpoint gets at most 8 attempts before its first
/// refusal is seen, then one probe a second; every other copy not dropped busy reaches the live
/// one.
#[tokio::test]
async fn a_refusing_shadow_endpoint_rests_alone() {
    let refused = closed_addr().await;
    let live = recording("shadow").await;
    let blue = recording("blue").await;
    let route = shadow_route(
        "mirror",
        "/",
        blue.addr,
        refused,
        Some((refused, "percent = 100.0\nmax_in_flight = 8")),
    )
    .replace(
        &format!("endpoints = [\"{refused}\"]\npercent"),
        &format!("endpoints = [\"{refused}\", \"{}\"]\npercent", live.addr),
    );
    let veer = Veer::start("", &route).await;
    let started = tokio::time::Instant::now();
    let answers = get_n(&veer, "/", 80).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(not_from_blue(&answers), 0);
    let stats = settled_shadow(&veer, "mirror").await;
    let attempts = stats["latency"]["errors"]["connect"].as_u64().unwrap();
    let bound = 8 + took.ceil() as u64;
    assert!(
        (1..=bound).contains(&attempts),
        "{attempts} connection attempts to the dead endpoint in {took:.2} s: {stats}"
    );
    assert_eq!(counter(&stats, "error"), attempts, "{stats}");
    let busy = counter(&stats, "dropped_busy");
    assert_eq!(live.request_count(), 80 - attempts - busy, "{stats}");
    veer.shutdown().await;
}

/// An HTTP/2 request reset by its client before the answer takes its drawn copy with it: the
/// copy is counted (`dropped_body`, as for an aborted upload), so the outcomes still add up.
#[tokio::test]
async fn a_copy_of_a_request_aborted_before_its_answer_is_counted() {
    let blue = Upstream::builder("blue")
        .latency(Duration::from_millis(500))
        .start()
        .await
        .unwrap();
    let (veer, shadow) = mirror_from(&blue, "percent = 100.0").await;
    let (mut sender, _conn) = h2c_to(veer.addr).await;
    let request = http::Request::get(veer.url("/"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_millis(100), sender.send_request(request));
    assert!(
        answer.await.is_err(),
        "answered before the upstream's latency"
    );
    // The dropped answer resets the stream.
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "requests"), 1, "{stats}");
    assert_eq!(counter(&stats, "dropped_body"), 1, "{stats}");
    assert_eq!(shadow.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    veer.shutdown().await;
}

/// With `compare = "body"`, a HEAD's answer has no body on either side, and the copies match.
/// (hyper never polls an answer body that has ended from the start: the primary's hash, made
/// at the end of its body, was never made, and every HEAD counted as a shadow `error`.)
#[tokio::test]
async fn head_requests_compared_by_body_match() {
    let shadow = Upstream::builder("shadow")
        .body("blue\n")
        .start()
        .await
        .unwrap();
    let (veer, blue, _green, shadow) = mirror(shadow, "percent = 100.0\ncompare = \"body\"").await;
    for _ in 0..5 {
        let (status, _, body) = send(Method::HEAD, &veer.url("/h"), &[], Bytes::new()).await;
        assert_eq!((status, body.len()), (http::StatusCode::OK, 0));
    }
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "match"), 5, "{stats}");
    assert_eq!(counter(&stats, "error"), 0, "{stats}");
    assert_eq!(blue.request_count(), 5);
    assert_eq!(shadow.request_count(), 5);
    veer.shutdown().await;
}

/// A shadow that sends a body to a HEAD too, late, has it read by no other copy: a HEAD's copy
/// asks for its connection to be closed after the answer. (Reused, the connection handed the
/// late bytes to the next copy as its answer: a shadow `error` for a healthy shadow.)
#[tokio::test]
async fn a_late_body_after_a_heads_copy_never_reaches_the_next_copy() {
    let (shadow, _accepted) = wire::late_head_body_upstream().await;
    let (veer, blue, _green) =
        mirror_to(shadow, "percent = 100.0\ncompare = \"status\"", "none").await;
    for i in 0..3 {
        for method in [Method::HEAD, Method::GET] {
            let url = veer.url(&format!("/{i}"));
            let (status, _, _) = send(method, &url, &[], Bytes::new()).await;
            assert_eq!(status, http::StatusCode::OK);
            settled_shadow(&veer, "mirror").await;
        }
    }
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "match"), 6, "{stats}");
    assert_eq!(counter(&stats, "error"), 0, "{stats}");
    assert_eq!(blue.request_count(), 6);
    veer.shutdown().await;
}

/// A client that leaves in the middle of the primary's body leaves nothing to compare the
/// copy's body with: the copy, sent and answered, counts as `sent`, not as the shadow's
/// `error`; the client's leaving counts as a client abort of the slot, not as its error.
#[tokio::test]
async fn a_client_gone_mid_answer_leaves_its_copy_uncompared_and_counts_an_abort() {
    let blue = Upstream::builder("blue")
        .body(vec![b'x'; 20_000])
        .slow_body(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let (veer, shadow) = mirror_from(&blue, "percent = 100.0\ncompare = \"body\"").await;
    // HTTP/1.1: the head and the first piece of the body, then the connection closed.
    let mut stream = raw_open(veer.addr, b"GET /h1 HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let mut first = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first)).await;
    assert!(matches!(read, Ok(Ok(1..))), "{read:?}");
    drop(stream);
    // HTTP/2: the head, then the stream reset.
    let (mut sender, _conn) = h2c_to(veer.addr).await;
    let request = http::Request::get(veer.url("/h2"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    drop(answer);
    let stats = settled_shadow(&veer, "mirror").await;
    assert_eq!(counter(&stats, "sent"), 2, "{stats}");
    assert_eq!(counter(&stats, "error"), 0, "{stats}");
    assert_eq!(shadow.request_count(), 2);
    let aborted = eventually(Duration::from_secs(5), || async {
        veer.slot("mirror", "blue").await["client_aborts"] == 2
    })
    .await;
    let slot = veer.slot("mirror", "blue").await;
    assert!(aborted, "{slot}");
    assert!(no_errors(&slot), "{slot}");
    veer.shutdown().await;
}

/// A shadow that refused connections and then listens gets every copy again once a probe got
/// through: the rest does not outlive the refusals.
#[tokio::test]
async fn a_shadow_that_comes_back_gets_every_copy_again() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Bound, not yet listening: refused until `listen`.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    let (veer, _blue, _green) = mirror_to(addr, "percent = 100.0", "none").await;
    assert_eq!(not_from_blue(&get_n(&veer, "/", 8).await), 0);
    assert!(counter(&settled_shadow(&veer, "mirror").await, "error") >= 1);
    // Now it answers every request 200, counting them.
    let listener = socket.listen(64).unwrap();
    let served = std::sync::Arc::new(AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let heads = buf[..n].windows(4).filter(|w| w == b"\r\n\r\n").count();
                    for _ in 0..heads {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    tokio::time::sleep(veer::upstream::mirror::REFUSED_REST).await;
    // 40 requests a second after the rest: one probe, then copies for all that follow it.
    for _ in 0..40 {
        let (status, _, _) = get(&veer.url("/"), &[]).await;
        assert_eq!(status, 200);
    }
    let stats = settled_shadow(&veer, "mirror").await;
    let through = served.load(Ordering::SeqCst);
    assert!(
        through >= 35,
        "{through} of 40 copies reached the shadow: {stats}"
    );
    veer.shutdown().await;
}

/// A reload that points the shadow at another endpoint gives it its own `max_in_flight` slots:
/// copies still hanging at a blackholed old endpoint no longer get every new copy dropped as
/// busy until they time out (60 s here).
#[tokio::test]
async fn a_shadow_moved_by_a_reload_gets_its_own_in_flight_slots() {
    let blue = recording("blue").await;
    let green = recording("green").await;
    let blackhole = blackhole("blackhole").await;
    let healthy = recording("shadow").await;
    let extra = "percent = 100.0\nmax_in_flight = 2\ntimeout = \"60s\"";
    let route = |shadow| {
        shadow_route(
            "mirrored",
            "/",
            blue.addr,
            green.addr,
            Some((shadow, extra)),
        )
    };
    let veer = Veer::start("", &route(blackhole.addr)).await;
    assert_eq!(not_from_blue(&get_n(&veer, "/", 5).await), 0);
    await_requests(&blackhole, 2, Duration::from_secs(10)).await;
    let stats = shadow_stats(&veer, "mirrored").await;
    assert_eq!(counter(&stats, "dropped_busy"), 3, "{stats}");

    let text = config_text(veer.dir.path(), "", &route(healthy.addr));
    std::fs::write(&veer.config_path, text).unwrap();
    let (status, body) = veer.admin_post("/api/v1/config/reload", "").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    // One at a time, each copy seen before the next request: at most two under way.
    for n in 1..=5 {
        assert_eq!(not_from_blue(&get_n(&veer, "/", 1).await), 0);
        await_requests(&healthy, n, Duration::from_secs(10)).await;
    }
    let stats = shadow_stats(&veer, "mirrored").await;
    assert_eq!(counter(&stats, "dropped_busy"), 3, "{stats}");
    assert_eq!(blackhole.request_count(), 2);
    veer.shutdown().await;
}
