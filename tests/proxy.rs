//! The forwarding core over real sockets (SPEC §3 Routing, Forwarding): route matching, header
//! rewriting both ways, streaming, graceful shutdown and the access log. HTTP/2, TLS and
//! WebSocket are in `proxy_protocols.rs`; bad input and upstream failures in `proxy_errors.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use support::wire::{chunked_upstream, dechunk, read_response, scripted_upstream};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A body of `len` bytes that is not all alike, so that a reordering or a gap shows.
fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn exact_host_beats_wildcard_beats_any_host_and_the_longest_prefix_wins() {
    let names = ["exact", "exact-api", "wild", "any", "any-static"];
    let mut upstreams = Vec::new();
    for name in names {
        upstreams.push(recording(name).await);
    }
    let routes = [
        host_route("exact", &["shop.example.com"], "/", upstreams[0].addr),
        host_route(
            "exact-api",
            &["shop.example.com"],
            "/api",
            upstreams[1].addr,
        ),
        host_route("wild", &["*.example.com"], "/", upstreams[2].addr),
        host_route("any", &[], "/", upstreams[3].addr),
        host_route("any-static", &[], "/static", upstreams[4].addr),
    ];
    let veer = Veer::start("", &routes.concat()).await;
    let cases = [
        ("shop.example.com", "/", "exact"),
        ("shop.example.com", "/api/items", "exact-api"),
        // Port and case do not matter.
        ("SHOP.Example.COM:8080", "/api", "exact-api"),
        // The wildcard tier has no /api prefix, but its "/" matches before any-host.
        ("www.example.com", "/api", "wild"),
        ("a.b.example.com", "/", "wild"),
        ("WWW.EXAMPLE.COM:1234", "/x", "wild"),
        // A wildcard does not match the bare domain.
        ("example.com", "/", "any"),
        ("other.org", "/static/site.css", "any-static"),
        ("other.org", "/stat", "any"),
    ];
    for (host, path, expected) in cases {
        let (status, _, body) = get(&veer.url(path), &[("host", host)]).await;
        assert_eq!(status, 200, "{host}{path}");
        assert_eq!(body, format!("{expected}\n"), "{host}{path}");
    }
    veer.shutdown().await;
}

/// `OPTIONS *` (about the server as a whole) goes to the route of the host's root, as sent;
/// a host whose routes do not cover `/` has none for it.
#[tokio::test]
async fn options_asterisk_goes_to_the_route_of_the_root() {
    let root = recording("root").await;
    let sub = recording("sub").await;
    let routes = host_route("root", &["root"], "/", root.addr)
        + &host_route("sub", &["sub"], "/sub/", sub.addr);
    let veer = Veer::start("", &routes).await;
    let ask =
        |host: &str| format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let answer = raw(veer.addr, ask("root").as_bytes()).await;
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = only_request(&root).await;
    assert_eq!((seen.method.as_str(), seen.uri.as_str()), ("OPTIONS", "*"));
    let answer = raw(veer.addr, ask("sub").as_bytes()).await;
    assert_eq!(raw_status(&answer), Some(404), "{answer}");
    assert_eq!(sub.request_count(), 0);
    veer.shutdown().await;
}

/// A path with both a run of `/` and a dot segment is read two ways by upstreams
/// (`/admin//../x`: `/admin/x` by RFC 3986, `/x` by NGINX and Go): refused with a 400, sent
/// nowhere. `//` alone, or dot segments alone, are routed.
#[tokio::test]
async fn a_path_with_both_double_slashes_and_dot_segments_is_refused() {
    let admin = recording("admin").await;
    let root = recording("root").await;
    let routes =
        host_route("admin", &[], "/admin/", admin.addr) + &host_route("root", &[], "/", root.addr);
    let veer = Veer::start("", &routes).await;
    let ask = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for (path, status) in [
        ("/admin//../x", 400),
        ("/admin//%2e%2e/x", 400),
        ("//admin/x", 200),
        ("/public/../admin/x", 200),
    ] {
        let answer = raw(veer.addr, ask(path).as_bytes()).await;
        assert_eq!(raw_status(&answer), Some(status), "{path}: {answer}");
    }
    assert_eq!((admin.request_count(), root.request_count()), (2, 0));
    veer.shutdown().await;
}

#[tokio::test]
async fn a_request_no_route_matches_gets_a_short_404_from_veer() {
    let upstream = recording("shop").await;
    let route = host_route("shop", &["shop.example.com"], "/shop", upstream.addr);
    let veer = Veer::start("", &route).await;
    for (host, path) in [("other.example.com", "/shop"), ("shop.example.com", "/")] {
        let (status, headers, body) = get(&veer.url(path), &[("host", host)]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{host}{path}");
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert!(!body.is_empty() && body.len() < 100, "{body:?}");
    }
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

#[tokio::test]
async fn http11_without_host_or_with_two_hosts_is_400_in_any_form_and_http10_without_host_is_routed(
) {
    let upstream = recording("blue").await;
    let veer = Veer::start("", &host_route("any", &[], "/", upstream.addr)).await;
    let missing = raw(veer.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(raw_status(&missing), Some(400), "{missing}");
    let twice =
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n";
    let duplicate = raw(veer.addr, twice).await;
    assert_eq!(raw_status(&duplicate), Some(400), "{duplicate}");
    // The same rules for an absolute-form target, whose authority is the one routed by.
    let absolute = b"GET http://a.example/ HTTP/1.1\r\nConnection: close\r\n\r\n";
    let missing = raw(veer.addr, absolute).await;
    assert_eq!(raw_status(&missing), Some(400), "{missing}");
    let twice = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\
                  Connection: close\r\n\r\n";
    let duplicate = raw(veer.addr, twice).await;
    assert_eq!(raw_status(&duplicate), Some(400), "{duplicate}");
    assert_eq!(upstream.request_count(), 0);
    let old = raw(veer.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&old), Some(200), "{old}");
    assert_eq!(upstream.request_count(), 1);
    veer.shutdown().await;
}

#[tokio::test]
async fn a_request_target_that_is_not_a_path_or_an_http_uri_is_400() {
    let upstream = recording("blue").await;
    let veer = Veer::start("", &host_route("any", &[], "/", upstream.addr)).await;
    for target in ["example.com", "example.com:80", "ftp://example.com/", "*"] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n");
        let answer = raw(veer.addr, request.as_bytes()).await;
        assert_eq!(raw_status(&answer), Some(400), "{target}: {answer}");
    }
    assert_eq!(upstream.request_count(), 0);
    for target in ["/", "http://example.com/", "https://example.com/x"] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n");
        let answer = raw(veer.addr, request.as_bytes()).await;
        assert_eq!(raw_status(&answer), Some(200), "{target}: {answer}");
    }
    veer.shutdown().await;
}

/// Over HTTP/2 the target `*` comes as `:path` beside `:scheme` and `:authority`: still for
/// OPTIONS only (RFC 9113 §8.3.1), a 400 for any other method, as over HTTP/1.1.
#[tokio::test]
async fn an_http2_asterisk_target_is_for_options_only() {
    let upstream = recording("blue").await;
    let veer = Veer::start("", &host_route("any", &[], "/", upstream.addr)).await;
    let (mut sender, conn) = h2c_to(veer.addr).await;
    let asterisk = || {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some("example.com".parse().unwrap());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("*"));
        http::Uri::from_parts(parts).unwrap()
    };
    for (method, status) in [
        (Method::GET, 400),
        (Method::POST, 400),
        (Method::OPTIONS, 200),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(asterisk())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), status, "{method} *");
    }
    let seen = only_request(&upstream).await;
    assert_eq!((seen.method.as_str(), seen.uri.as_str()), ("OPTIONS", "*"));
    drop(sender);
    let _ = conn.await;
    veer.shutdown().await;
}

#[tokio::test]
async fn an_absolute_form_authority_wins_over_the_host_header() {
    let shop = recording("shop").await;
    let other = recording("other").await;
    let routes = host_route("shop", &["shop.example.com"], "/", shop.addr)
        + &host_route("other", &["other.example.com"], "/", other.addr);
    let veer = Veer::start("", &routes).await;
    let request = b"GET http://shop.example.com/cart?id=7 HTTP/1.1\r\n\
                    Host: other.example.com\r\nConnection: close\r\n\r\n";
    let answer = raw(veer.addr, request).await;
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    assert!(answer.ends_with("shop\n"), "{answer}");
    assert_eq!(other.request_count(), 0);
    let seen = shop.seen();
    assert_eq!(seen[0].uri, "/cart?id=7");
    assert_eq!(seen[0].headers["host"], "shop.example.com");
    assert_eq!(seen[0].headers["x-forwarded-host"], "shop.example.com");
    veer.shutdown().await;
}

#[tokio::test]
async fn dot_segments_do_not_steer_a_request_past_its_route() {
    let public = recording("public").await;
    let admin = recording("admin").await;
    let routes = host_route("public", &[], "/public/", public.addr)
        + &host_route("admin", &[], "/admin/", admin.addr);
    let veer = Veer::start("", &routes).await;
    for target in ["/public/../admin/users", "/public/%2E%2e/admin/users"] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw(veer.addr, request.as_bytes()).await;
        assert_eq!(raw_status(&answer), Some(200), "{answer}");
        assert!(answer.ends_with("admin\n"), "{target}: {answer}");
        // Forwarded as sent.
        assert_eq!(admin.seen().last().unwrap().uri, target);
    }
    assert_eq!(public.request_count(), 0);
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Headers

#[tokio::test]
async fn hop_by_hop_and_internal_headers_stay_behind_and_forwarded_headers_are_set() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("", upstream.addr).await;
    let request = b"GET /h HTTP/1.1\r\nHost: shop.example.com\r\n\
        Connection: close, x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
        Trailer: x-checksum\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n\
        X-Forwarded-For: 203.0.113.9\r\nx-veer-slot: blue\r\nx-veer-shadow: 1\r\n\
        X-Kept: yes\r\n\r\n";
    let answer = raw(veer.addr, request).await;
    assert_eq!(raw_status(&answer), Some(200), "{answer}");
    let seen = upstream.seen();
    let headers = &seen[0].headers;
    for gone in [
        "x-secret",
        "keep-alive",
        "upgrade",
        "proxy-connection",
        "x-veer-slot",
        "x-veer-shadow",
    ] {
        assert!(!headers.contains_key(gone), "{gone} reached the upstream");
    }
    assert_eq!(headers["x-kept"], "yes");
    // `Trailer` is end to end; `TE` (with its connection option) is veer's own, saying that it
    // takes trailers too. Nothing else of the client's `Connection` goes on.
    assert_eq!(headers["trailer"], "x-checksum");
    assert_eq!(headers["te"], "trailers");
    assert_eq!(headers["connection"], "te");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(headers["via"], "1.1 veer");
    veer.shutdown().await;
}

/// `Via` names the version veer received the answer in (RFC 9110 §7.6.3), not the one it
/// answers in: an HTTP/1.0 upstream is `1.0 veer`.
#[tokio::test]
async fn via_on_an_answer_names_the_version_it_came_in() {
    let (upstream, _task) =
        scripted_upstream(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let veer = Veer::shop("", upstream).await;
    let (status, headers, body) = get(&veer.url("/"), &[]).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    assert_eq!(headers["via"], "1.0 veer");
    veer.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_response_stay_behind() {
    let (upstream, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: x-up-secret\r\nX-Up-Secret: 1\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n\
          Trailer: x-checksum\r\nX-Up-Kept: yes\r\nVia: 1.1 inner\r\n\
          Content-Length: 2\r\n\r\nok",
    )
    .await;
    let veer = Veer::shop("", upstream).await;
    let (status, headers, body) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"ok");
    assert_eq!(headers["x-up-kept"], "yes");
    // veer adds itself to the response's Via too, after the proxies before it.
    let via: Vec<_> = headers.get_all("via").iter().collect();
    assert_eq!(via, ["1.1 inner", "1.1 veer"]);
    for gone in ["x-up-secret", "keep-alive", "proxy-connection", "upgrade"] {
        assert!(!headers.contains_key(gone), "{gone} reached the client");
    }
    // `Trailer` is end to end (it declares the trailer fields).
    assert_eq!(headers["trailer"], "x-checksum");
    if let Some(connection) = headers.get("connection") {
        assert!(!connection.to_str().unwrap().contains("x-up-secret"));
    }
    task.abort();
    veer.shutdown().await;
}

/// Answers that are invalid from a proxy's side: a 502 counted as a protocol error of the slot.
/// A 101 answers only an upgrade request; a coding besides chunked (`gzip, chunked`) would be
/// lost with the framing, and the client would take the coded bytes for the body.
#[tokio::test]
async fn an_unasked_101_or_a_coding_besides_chunked_is_a_502_protocol_error() {
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nhi",
        // Not chunked to hyper either: the chunk framing would be the body.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\nConnection: close\r\n\r\n\
          2\r\nhi\r\n0\r\n\r\n",
    ] {
        let (upstream, task) = scripted_upstream(answer).await;
        let veer = Veer::shop("", upstream).await;
        let (status, _, body) = get(&veer.url("/"), &[]).await;
        let said = String::from_utf8_lossy(answer);
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{said}");
        assert_eq!(&body[..], b"upstream sent an invalid response\n", "{said}");
        let blue = veer.slot("shop", "blue").await;
        assert_eq!(blue["errors"]["protocol"], 1, "{said}: {blue}");
        task.abort();
        veer.shutdown().await;
    }
    // An answer without a body (to HEAD) may name any coding: there is nothing to misread.
    let (upstream, task) =
        scripted_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").await;
    let veer = Veer::shop("", upstream).await;
    let (status, _, body) = send(Method::HEAD, &veer.url("/"), &[], Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    task.abort();
    veer.shutdown().await;
}

/// Trailer fields go through both ways on HTTP/1.1: the request's to the upstream, and the
/// response's to a client that said `TE: trailers` (the upstream is told it may send them).
/// veer's own fields (the override header, the shadow marker) are removed from trailers as
/// from the head, and so are the fields veer sets in the head (`X-Forwarded-*`, `Via`): an
/// upstream reading trailers with the head would take a client's word for its address.
#[tokio::test]
async fn trailers_pass_both_ways() {
    let (upstream, request, task) = chunked_upstream(
        b"HTTP/1.1 200 OK\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n\
          2\r\nok\r\n0\r\nx-sum: 42\r\n\r\n",
    )
    .await;
    let veer = Veer::shop("", upstream).await;
    let mut stream = raw_open(
        veer.addr,
        b"POST / HTTP/1.1\r\nHost: shop\r\nTE: trailers\r\nConnection: TE, close\r\n\
          Trailer: x-checksum, x-veer-shadow, x-veer-slot, connection, keep-alive\r\n\
          Trailer: X-Forwarded-For, via\r\n\
          Transfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-veer-shadow: 1\r\nx-checksum: abc\r\nx-veer-slot: green\r\n\
          Connection: close\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nVia: 1.1 evil\r\n\r\n",
    )
    .await;
    let response = read_response(&mut stream).await.unwrap();
    let request = String::from_utf8(request.await.unwrap())
        .unwrap()
        .to_ascii_lowercase();
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("\r\nte: trailers\r\n"), "{head}");
    // Nor announced in `Trailer`, as the hop-by-hop fields are not.
    assert!(head.contains("\r\ntrailer: x-checksum\r\n"), "{head}");
    assert!(
        body.ends_with("\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "{body:?}"
    );
    assert_eq!(response.status, 200);
    let raw_body = String::from_utf8_lossy(&response.body).to_ascii_lowercase();
    assert!(raw_body.ends_with("0\r\nx-sum: 42\r\n\r\n"), "{raw_body:?}");
    task.abort();
    veer.shutdown().await;
}

/// Answers delivered whole count no client abort, however they end: with trailers (after which
/// hyper polls the body no further), close-delimited to an HTTP/1.0 client, without a body
/// (204, 304, HEAD).
#[tokio::test]
async fn answers_delivered_whole_count_no_client_abort() {
    let cases: [(&'static [u8], &[u8], u16); 5] = [
        (
            b"HTTP/1.1 200 OK\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\nx-sum: 42\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: shop\r\nTE: trailers\r\nConnection: close\r\n\r\n",
            200,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: shop\r\n\r\n",
            200,
        ),
        (
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"DELETE / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
            204,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: shop\r\nIf-None-Match: \"a\"\r\nConnection: close\r\n\r\n",
            304,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
            200,
        ),
    ];
    for (answer, request, status) in cases {
        let (upstream, task) = scripted_upstream(answer).await;
        let veer = Veer::shop("", upstream).await;
        let said = String::from_utf8_lossy(request);
        let got = raw(veer.addr, request).await;
        assert_eq!(raw_status(&got), Some(status), "{said}: {got}");
        let blue = veer.slot("shop", "blue").await;
        assert_eq!(blue["client_aborts"], 0, "{said}: {blue}");
        task.abort();
        veer.shutdown().await;
    }
}

/// Fields of the upstream's connection in its trailers (RFC 9113 §8.2.2) are not passed on: an
/// HTTP/2 client would reset the stream after a complete answer.
#[tokio::test]
async fn connection_fields_in_upstream_trailers_do_not_reach_an_http2_client() {
    let (upstream, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nTrailer: x-sum, connection, keep-alive, upgrade\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 42\r\n\
          Connection: close\r\nKeep-Alive: timeout=5\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let veer = Veer::shop("", upstream).await;
    let (mut sender, conn) = h2c_to(veer.addr).await;
    let request = Request::get("http://shop/")
        .header("te", "trailers")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["trailer"], "x-sum");
    let collected = response.into_body().collect().await.expect("a whole body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(collected.to_bytes(), "hello");
    let names: Vec<&str> = trailers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-sum"]);
    // Delivered whole: no client abort (hyper drops a body after its trailers unpolled).
    assert_eq!(veer.slot("shop", "blue").await["client_aborts"], 0);
    conn.abort();
    task.abort();
    veer.shutdown().await;
}

#[tokio::test]
async fn a_response_with_both_framings_reaches_the_client_well_framed() {
    let (upstream, task) = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\
          Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let veer = Veer::shop("", upstream).await;
    let request = b"GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n";
    let mut stream = raw_open(veer.addr, request).await;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(raw_status(head), Some(200), "{text}");
    let chunked = head.contains("transfer-encoding: chunked");
    let length = head.contains("content-length:");
    assert!(chunked != length, "exactly one framing expected: {head}");
    if chunked {
        assert_eq!(dechunk(body.as_bytes()).as_deref(), Some(&b"hello"[..]));
    } else {
        assert!(head.contains("content-length: 5"), "{head}");
        assert_eq!(body, "hello");
    }
    task.abort();
    veer.shutdown().await;
}

/// An HTTP/1.0 upstream that ends its body by closing the connection: an HTTP/1.1 client still
/// gets HTTP/1.1 answers (chunked) and keeps its connection from one request to the next.
#[tokio::test]
async fn an_http_1_0_upstream_answers_an_http_1_1_client_in_http_1_1() {
    let (upstream, task) = scripted_upstream(b"HTTP/1.0 200 OK\r\n\r\nhello-until-eof").await;
    let veer = Veer::shop("", upstream).await;
    let mut stream = TcpStream::connect(veer.addr).await.unwrap();
    for i in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while !answer.ends_with(b"\r\n0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("request {i}: answer incomplete after 5 s: {answer:?}"))
                .unwrap();
            assert!(n > 0, "request {i}: connection closed: {answer:?}");
            answer.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(
            dechunk(body.as_bytes()).as_deref(),
            Some(&b"hello-until-eof"[..])
        );
    }
    task.abort();
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Streaming

#[tokio::test]
async fn an_8_mib_body_streams_through_intact_both_ways() {
    let large = pattern(8 << 20);
    let upstream = Upstream::builder("blue")
        .body(large.clone())
        .record(true)
        .start()
        .await
        .unwrap();
    let veer = Veer::shop("", upstream.addr).await;
    let (status, _, body) = send(Method::POST, &veer.url("/up"), &[], large.clone()).await;
    assert_eq!(status, 200);
    assert!(body == large, "download differs ({} bytes)", body.len());
    let seen = upstream.seen();
    let uploaded = seen[0].body.as_ref().unwrap();
    assert!(
        *uploaded == large,
        "upload differs ({} bytes)",
        uploaded.len()
    );
    veer.shutdown().await;
}

/// A recording upstream, veer with `server_extra` in front of it, and a raw connection to veer.
async fn shop_connection(server_extra: &str) -> (Upstream, Veer, TcpStream) {
    let upstream = recording("blue").await;
    let veer = Veer::shop(server_extra, upstream.addr).await;
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    (upstream, veer, stream)
}

/// Requests pipelined in one write (a POST with its body among them) are each forwarded once,
/// in order, and answered in order on the same connection.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (upstream, veer, mut stream) = shop_connection("").await;
    stream
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: shop\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    // All three answers, up to the close the last one asked for.
    let mut answers = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answers))
        .await
        .expect("connection still open after 5 s")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    let heads: Vec<&str> = answers
        .split("\r\n\r\n")
        .filter(|part| part.contains("HTTP/1.1 "))
        .collect();
    assert_eq!(heads.len(), 3, "{answers}");
    assert!(
        heads.iter().all(|h| h.contains("HTTP/1.1 200 OK")),
        "{answers}"
    );
    assert!(heads[2].contains("connection: close"), "{answers}");
    await_requests(&upstream, 3, Duration::from_secs(5)).await;
    let seen = upstream.seen();
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(uris, ["/a", "/b", "/c"]);
    assert_eq!(seen[1].body.as_deref(), Some(&b"hello"[..]));
    veer.shutdown().await;
}

/// Reads from `stream` until a head ends (5 s at most); `None` when it does not.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// curl sends `Expect: 100-continue` before an upload over 1 MiB and waits for the go-ahead
/// (up to a second) before sending it: veer says `100 Continue` when it starts forwarding, and
/// the body arrives whole.
#[tokio::test]
async fn an_upload_that_expects_100_continue_gets_it_and_arrives_whole() {
    let (upstream, veer, mut stream) = shop_connection("").await;
    let body = pattern(100_000);
    let head = format!(
        "PUT /up HTTP/1.1\r\nHost: shop\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = read_head(&mut stream).await.expect("no answer to the head");
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "not a go-ahead: {interim:?}"
    );
    stream.write_all(&body).await.unwrap();
    let answer = read_response(&mut stream).await.expect("no final answer");
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(only_request(&upstream).await.body.as_ref(), Some(&body));
    veer.shutdown().await;
}

/// An upload veer refuses from its head alone gets the refusal instead of the go-ahead: the
/// client need not send the body at all.
#[tokio::test]
async fn an_upload_refused_by_its_head_gets_no_100_continue() {
    let (upstream, veer, mut stream) = shop_connection("max_body_bytes = 1000").await;
    stream
        .write_all(
            b"PUT /up HTTP/1.1\r\nHost: shop\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let first = read_head(&mut stream).await.expect("no answer to the head");
    assert!(first.starts_with("HTTP/1.1 413 "), "{first:?}");
    assert_eq!(upstream.request_count(), 0);
    veer.shutdown().await;
}

#[tokio::test]
async fn an_upstream_dying_mid_body_reaches_the_client_as_an_aborted_response() {
    let upstream = Upstream::builder("blue")
        .behaviour(Behaviour::CutBody)
        .body(vec![b'x'; 1000])
        .start()
        .await
        .unwrap();
    let veer = Veer::shop("", upstream.addr).await;
    // A raw client sees fewer bytes than the declared length, then the connection ends.
    let mut stream = raw_open(veer.addr, b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let answer = read_response(&mut stream).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-length"), Some("2000"));
    assert!(answer.cut, "the connection stayed open after a short body");
    assert!(answer.body.len() < 2000);
    // hyper's client sees a body error, not a clean end.
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(Request::get(veer.url("/")).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.into_body().collect().await.is_err());
    let slot_errors = || async {
        veer.slot("shop", "blue").await["errors"]["reset"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            slot_errors().await >= 2
        })
        .await
    );
    veer.shutdown().await;
}

#[tokio::test]
async fn a_client_upload_aborted_mid_body_reaches_the_upstream_as_aborted() {
    let upstream = recording("blue").await;
    let veer = Veer::shop("", upstream.addr).await;
    let head = b"POST /up HTTP/1.1\r\nHost: shop\r\nContent-Length: 1000\r\n\r\n";
    let mut stream = raw_open(veer.addr, head).await;
    stream.write_all(&[b'a'; 400]).await.unwrap();
    await_requests(&upstream, 1, Duration::from_secs(5)).await;
    drop(stream);
    let seen = only_request(&upstream).await;
    assert!(seen.body.is_none(), "a shorter body arrived as complete");
    // The client's abort is not the slot's fault.
    let aborted = || async {
        let slot = veer.slot("shop", "blue").await;
        slot["client_aborts"].as_u64() == Some(1)
    };
    assert!(eventually(Duration::from_secs(5), aborted).await);
    let slot = veer.slot("shop", "blue").await;
    assert!(no_errors(&slot), "{slot}");
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

/// veer (`drain_timeout` 10 s) before an upstream that answers after `latency`, and a request
/// to it that the upstream has received.
async fn with_a_request_in_flight(
    latency: Duration,
) -> (
    Veer,
    Upstream,
    tokio::task::JoinHandle<(http::StatusCode, http::HeaderMap, Bytes)>,
) {
    let upstream = Upstream::builder("blue")
        .latency(latency)
        .start()
        .await
        .unwrap();
    let veer = Veer::shop("drain_timeout = \"10s\"", upstream.addr).await;
    let url = veer.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    await_requests(&upstream, 1, Duration::from_secs(5)).await;
    (veer, upstream, in_flight)
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish_and_refuses_new_connections() {
    let (veer, _upstream, in_flight) = with_a_request_in_flight(Duration::from_millis(500)).await;
    let addr = veer.addr;
    veer.shutdown().await;
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"blue\n");
    assert!(TcpStream::connect(addr).await.is_err());
}

/// During the drain the admin API still answers: a load balancer's readiness probe sees 503
/// (take veer out), its liveness probe 200, and the metrics can be read.
#[tokio::test]
async fn while_draining_readyz_is_503_and_healthz_and_metrics_answer() {
    let (veer, _upstream, in_flight) = with_a_request_in_flight(Duration::from_millis(1500)).await;
    let (addr, admin) = (veer.addr, veer.admin_url(""));
    let draining = tokio::spawn(veer.shutdown());
    // The drain has begun once the proxy port refuses.
    let refused = || async move { TcpStream::connect(addr).await.is_err() };
    assert!(eventually(Duration::from_secs(5), refused).await);
    assert!(
        !in_flight.is_finished(),
        "the request did not wait for its upstream"
    );
    let probe = |path: &str| {
        let url = format!("{admin}{path}");
        async move { get(&url, &[]).await.0 }
    };
    assert_eq!(probe("/readyz").await, 503);
    assert_eq!(probe("/healthz").await, 200);
    assert_eq!(probe("/metrics").await, 200);
    let (status, _, _) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    draining.await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Access log

/// veer with `routes`, `server_extra` in `[server]`, and an access log to a file: veer and the
/// log's path.
async fn with_access_log(server_extra: &str, routes: &str) -> (Veer, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let server = format!("{server_extra}\naccess_log = \"{}\"", log.display());
    let text = config_text(dir.path(), &server, routes);
    (Veer::start_in(dir, &text).await, log)
}

#[tokio::test]
async fn a_request_writes_one_json_access_log_line() {
    let upstream = recording("blue").await;
    let (veer, log) = with_access_log("", &route("shop", upstream.addr, upstream.addr, "")).await;
    let (status, _, body) = get(&veer.url("/logged?q=1"), &[]).await;
    assert_eq!(status, 200);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || async { read().ends_with('\n') }).await);
    let text = read();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(line["route"], "shop");
    assert_eq!(line["slot"], "blue");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/logged");
    assert_eq!(line["bytes"], body.len());
    veer.shutdown().await;
}

/// A WebSocket's line is written when its tunnel closes, not at the 101: status 101, the
/// bytes sent to the client through the tunnel, and the tunnel's whole duration.
#[tokio::test]
async fn a_tunnel_is_logged_when_it_closes_with_its_bytes_and_duration() {
    let upstream = Upstream::builder("ws")
        .behaviour(Behaviour::WebSocketEcho)
        .start()
        .await
        .unwrap();
    let (veer, log) = with_access_log("", &host_route("ws", &[], "/", upstream.addr)).await;
    let (mut stream, answer) = support::wire::open_tunnel(veer.addr, "ws").await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, 101, "{}", answer.head);
    for _ in 0..3 {
        stream.write_all(b"0123456789").await.unwrap();
        let mut echoed = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(read(), "", "logged while the tunnel is open");
    drop(stream);
    assert!(eventually(Duration::from_secs(5), || async { read().ends_with('\n') }).await);
    let text = read();
    let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(line["status"], 101, "{text}");
    assert_eq!(line["bytes"], 30, "{text}");
    assert!(line["total_ms"].as_f64().unwrap() >= 300.0, "{text}");
    veer.shutdown().await;
}

/// A client that goes away before the answer still gets its line, with status 499. (An HTTP/2
/// one here: on HTTP/1.1 a close after a whole request is taken as a half-close, and the
/// request goes on.)
#[tokio::test]
async fn a_client_gone_before_the_answer_is_logged_as_499() {
    let slow = Upstream::builder("blue")
        .latency(Duration::from_secs(3))
        .start()
        .await
        .unwrap();
    let (veer, log) = with_access_log("", &host_route("shop", &[], "/", slow.addr)).await;
    let (mut sender, conn) = h2c_to(veer.addr).await;
    let request = Request::get("http://shop/gone")
        .body(Full::<Bytes>::default())
        .unwrap();
    let waiting = tokio::spawn(async move { sender.send_request(request).await });
    await_requests(&slow, 1, Duration::from_secs(5)).await;
    // Gone after 200 ms of waiting for the upstream: the line says how long it waited.
    tokio::time::sleep(Duration::from_millis(200)).await;
    waiting.abort();
    conn.abort();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || async { read().ends_with('\n') }).await);
    let line: serde_json::Value = serde_json::from_str(read().trim()).unwrap();
    assert_eq!(line["status"], 499, "{line}");
    let waited = line["upstream_ms"].as_f64().unwrap();
    assert!(
        waited >= 200.0 && waited <= line["total_ms"].as_f64().unwrap(),
        "{line}"
    );
    assert_eq!(line["path"], "/gone", "{line}");
    assert_eq!(line["route"], "shop", "{line}");
    assert_eq!(veer.slot("shop", "blue").await["client_aborts"], 1);
    veer.shutdown().await;
}

/// A chunked body that breaks its framing is the client's bad request, not a client gone: a
/// 400 with its reason, logged as 400, the connection closed; no client abort counted.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_logged_as_400() {
    let upstream = recording("blue").await;
    let (veer, log) = with_access_log("", &host_route("shop", &[], "/", upstream.addr)).await;
    for chunks in ["5\r\nhelloXX\r\n0\r\n\r\n", "FFFFFFFFFFFFFFFFF1\r\nx\r\n"] {
        let request = format!(
            "POST /bad HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}"
        );
        let answer = raw(veer.addr, request.as_bytes()).await;
        assert_eq!(raw_status(&answer), Some(400), "{chunks:?}: {answer}");
        assert!(answer.ends_with("malformed request body\n"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(5), || async {
            read().lines().count() == 2
        })
        .await
    );
    for line in read().lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(line["status"], 400, "{line}");
    }
    assert_eq!(veer.slot("shop", "blue").await["client_aborts"], 0);
    veer.shutdown().await;
}

/// An HTTP/1.1 client that closes in the middle of its request body went away too: logged as
/// 499 and counted as a client abort, like an HTTP/2 reset.
#[tokio::test]
async fn a_client_gone_in_the_middle_of_its_body_is_logged_as_499() {
    let upstream = recording("blue").await;
    let (veer, log) = with_access_log("", &host_route("shop", &[], "/", upstream.addr)).await;
    let mut stream = tokio::net::TcpStream::connect(veer.addr).await.unwrap();
    let head = "POST /cut HTTP/1.1\r\nHost: shop\r\nContent-Length: 100\r\n\r\nhello";
    stream.write_all(head.as_bytes()).await.unwrap();
    drop(stream);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || async { read().ends_with('\n') }).await);
    let line: serde_json::Value = serde_json::from_str(read().trim()).unwrap();
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["path"], "/cut", "{line}");
    assert_eq!(veer.slot("shop", "blue").await["client_aborts"], 1);
    veer.shutdown().await;
}

#[tokio::test]
async fn answers_veer_gives_itself_are_logged_too() {
    let upstream = recording("blue").await;
    let routes = host_route("shop", &[], "/ok", upstream.addr)
        + &host_route("dead", &[], "/dead", closed_addr().await);
    let (veer, log) = with_access_log("max_body_bytes = 10", &routes).await;
    let asks = [
        (Method::GET, "/ok/1", Bytes::new(), 200),
        (Method::GET, "/nothing", Bytes::new(), 404),
        (Method::GET, "/dead/1", Bytes::new(), 502),
        (Method::POST, "/ok/2", Bytes::from_static(&[b'x'; 20]), 413),
    ];
    for (method, path, body, status) in &asks {
        let (got, _, _) = send(method.clone(), &veer.url(path), &[], body.clone()).await;
        assert_eq!(got, *status, "{method} {path}");
    }
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let all_logged = || async { read().lines().count() == asks.len() };
    assert!(
        eventually(Duration::from_secs(5), all_logged).await,
        "{}",
        read()
    );
    let mut lines: Vec<serde_json::Value> = read()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    lines.sort_by_key(|line| line["path"].as_str().unwrap_or_default().to_string());
    // (path, status, route, slot) of every line.
    let seen: Vec<String> = lines
        .iter()
        .map(|l| format!("{} {} {} {}", l["path"], l["status"], l["route"], l["slot"]))
        .collect();
    let expected = [
        r#""/dead/1" 502 "dead" "blue""#,
        r#""/nothing" 404 null null"#,
        r#""/ok/1" 200 "shop" "blue""#,
        r#""/ok/2" 413 "shop" "blue""#,
    ];
    assert_eq!(seen, expected);
    for line in &lines {
        assert!(line["bytes"].as_u64().unwrap() > 0, "{line}");
        assert!(line["total_ms"].as_f64().unwrap() >= 0.0, "{line}");
    }
    veer.shutdown().await;
}
