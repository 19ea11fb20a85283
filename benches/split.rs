//! Cost of the slot decision on the request path: sticky key extraction, hash and weight
//! (`Route::decide`) for a cookie, a header and a client-IP route; and the routing snapshot
//! lookup (`RoutingTable::find`) among 50 routes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::browser_headers;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use veer::config::parse;
use veer::rollout::RouteRollout;
use veer::routing::{RouteShared, RoutingTable, Split};

/// A snapshot of `routes` with every route at a 25 % canary weight.
fn table(routes: &str) -> RoutingTable {
    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{routes}");
    let config = parse(&text, None).unwrap_or_else(|e| panic!("{e}"));
    RoutingTable::new(config, |rc| {
        Arc::new(RouteShared::new(
            rc.name.clone(),
            Split {
                stable: rc.stable,
                canary_bp: 2_500,
            },
            RouteRollout::detached(rc),
        ))
    })
}

fn route(name: &str, hosts: &str, prefix: &str, sticky: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nhosts = [{hosts}]\npath_prefix = \"{prefix}\"\n\
         [route.blue]\nendpoints = [\"127.0.0.1:1\"]\n[route.green]\nendpoints = [\"127.0.0.1:2\"]\n\
         [route.sticky]\n{sticky}\n"
    )
}

fn decide(c: &mut Criterion) {
    let routes = [
        route("cookie", "\"c.test\"", "/", "by = \"cookie\""),
        route("header", "\"h.test\"", "/", "by = \"header:x-user\""),
        route("ip", "\"i.test\"", "/", "by = \"client-ip\""),
    ]
    .concat();
    let table = table(&routes);
    let by = |name| table.route(name).unwrap();
    let v4: IpAddr = "203.0.113.7".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();

    let returning = browser_headers(&[(
        "cookie",
        "_ga=GA1.2.123456789.1700000000; veer_cookie=0123456789abcdef0123456789abcdef; theme=dark",
    )]);
    let first_visit = browser_headers(&[("cookie", "_ga=GA1.2.123456789.1700000000")]);
    let user = browser_headers(&[("x-user", "customer-8f3a2c91")]);
    let plain = browser_headers(&[]);

    let mut group = c.benchmark_group("decide");
    let cases = [
        ("cookie", by("cookie"), &returning, v4),
        ("cookie_first_visit", by("cookie"), &first_visit, v4),
        ("header", by("header"), &user, v4),
        ("header_missing", by("header"), &plain, v4),
        ("client_ip_v4", by("ip"), &plain, v4),
        ("client_ip_v6", by("ip"), &plain, v6),
    ];
    for (name, route, headers, peer) in cases {
        group.bench_function(name, |b| {
            b.iter(|| black_box(route.decide(black_box(headers), black_box(peer))))
        });
    }
    group.finish();
}

/// 50 routes: 20 exact hosts with `/` and `/api`, 5 wildcard domains, 5 prefixes on any host.
fn fifty_routes() -> String {
    let mut routes = String::new();
    for i in 0..20 {
        let host = format!("\"svc{i}.example.com\"");
        routes += &route(&format!("svc{i}"), &host, "/", "");
        routes += &route(&format!("svc{i}-api"), &host, "/api", "");
    }
    for j in 0..5 {
        let host = format!("\"*.zone{j}.example.org\"");
        routes += &route(&format!("zone{j}"), &host, "/", "");
    }
    for prefix in ["/static", "/assets", "/media", "/docs", "/"] {
        let name = format!("any{}", prefix.replace('/', "-"));
        routes += &route(&name, "", prefix, "");
    }
    routes
}

fn find(c: &mut Criterion) {
    let table = table(&fifty_routes());
    assert_eq!(table.routes().len(), 50);
    let mut group = c.benchmark_group("find_50_routes");
    let cases = [
        (
            "exact_host_longest_prefix",
            Some("svc17.example.com"),
            "/api/orders/42",
        ),
        ("exact_host_root", Some("svc3.example.com"), "/cart"),
        ("wildcard_host", Some("eu.zone3.example.org"), "/"),
        ("any_host_prefix", Some("unknown.test"), "/static/app.css"),
        (
            "upper_case_host",
            Some("SVC17.Example.com"),
            "/api/orders/42",
        ),
        ("no_host", None, "/docs/intro"),
    ];
    for (name, host, path) in cases {
        assert!(table.find(host, path).is_some(), "{name}");
        group.bench_function(name, |b| {
            b.iter(|| black_box(table.find(black_box(host), black_box(path)).is_some()))
        });
    }
    group.finish();
}

criterion_group!(benches, decide, find);
criterion_main!(benches);
