//! The whole request path in-process: a keep-alive GET round trip through veer (started with
//! `app::start` on 127.0.0.1:0) to an in-process upstream, against the same round trip straight
//! to the upstream with the same client; the ratio of the two is printed. Plus the header
//! rewrite of one typical browser request (`proxy::headers::to_upstream`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::browser_headers;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::runtime::Runtime;
use tokio::time::Instant;
use veer::demo::upstream::Upstream;
use veer::proxy::headers::{client_address, to_upstream, Forwarded};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn round_trip(client: &HttpClient, uri: &http::Uri) {
    let response = client.get(uri.clone()).await.unwrap();
    assert!(response.status().is_success());
    black_box(response.into_body().collect().await.unwrap().to_bytes());
}

/// `iters` sequential round trips on one keep-alive connection.
async fn timed(client: &HttpClient, uri: &http::Uri, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        round_trip(client, uri).await;
    }
    start.elapsed()
}

fn config(upstream: SocketAddr, state: &std::path::Path) -> veer::config::Config {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [state]\ndir = \"{}\"\n[[route]]\nname = \"bench\"\n\
         [route.blue]\nendpoints = [\"{upstream}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{upstream}\"]\nversion = \"v2\"\n\
         [route.sticky]\nby = \"none\"\n[route.rollout]\nmode = \"manual\"\nweight = 10\n",
        state.display()
    );
    veer::config::parse(&text, None).unwrap()
}

fn pipeline(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (upstream, running) = rt.block_on(async {
        let upstream = Upstream::builder("blue").start().await.unwrap();
        let running = veer::app::start(config(upstream.addr, state.path()), None)
            .await
            .unwrap();
        (upstream, running)
    });
    let direct: http::Uri = format!("http://{}/", upstream.addr).parse().unwrap();
    let through: http::Uri = format!("http://{}/", running.proxy_addrs[0])
        .parse()
        .unwrap();
    let client = client();
    let mut group = c.benchmark_group("pipeline");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| rt.block_on(timed(&client, &direct, iters)))
    });
    group.bench_function("through_veer", |b| {
        b.iter_custom(|iters| rt.block_on(timed(&client, &through, iters)))
    });
    group.finish();
    print_ratio(&rt, &client, &direct, &through);
    rt.block_on(running.shutdown());
    drop(upstream);
}

/// Median over interleaved rounds of 2,000 round trips each: veer's round trip / direct.
fn print_ratio(rt: &Runtime, client: &HttpClient, direct: &http::Uri, through: &http::Uri) {
    const ROUNDS: usize = 5;
    const PER_ROUND: u64 = 2_000;
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut per_request = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let d = rt.block_on(timed(client, direct, PER_ROUND));
        let v = rt.block_on(timed(client, through, PER_ROUND));
        ratios.push(v.as_secs_f64() / d.as_secs_f64());
        per_request.push((d / PER_ROUND as u32, v / PER_ROUND as u32));
    }
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[ROUNDS / 2];
    println!(
        "pipeline: round trip through veer / direct = {median:.2} (median of {ROUNDS} rounds of \
         {PER_ROUND}; rounds: {:?})",
        per_request
    );
}

fn header_rewrite(c: &mut Criterion) {
    // A 10-header browser GET.
    let headers = browser_headers(&[
        ("connection", "keep-alive"),
        (
            "cookie",
            "veer_shop=0123456789abcdef0123456789abcdef; session=abc123; theme=dark",
        ),
        ("upgrade-insecure-requests", "1"),
        ("x-request-id", "7f0c7a9e-2b1d-4c55-9a3e-0d6f3b1e8a42"),
        ("x-forwarded-for", "203.0.113.9"),
    ]);
    let host = HeaderValue::from_static("shop.example.com");
    let override_header = HeaderName::from_static("x-veer-slot");
    // Made once per connection in veer, so outside the measured loop.
    let client = client_address("192.0.2.10".parse().unwrap());
    let fwd = Forwarded {
        client: &client,
        tls: false,
        host: Some(&host),
        version: http::Version::HTTP_11,
        override_header: Some(&override_header),
    };
    let mut group = c.benchmark_group("headers");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("to_upstream/browser_get", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                to_upstream(&mut h, &fwd, false);
                h
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline, header_rewrite);
criterion_main!(benches);
