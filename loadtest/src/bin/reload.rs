//! Reload under load: closed-loop HTTP/1.1 keep-alive and HTTP/2 clients drive an in-process
//! veer as fast as this machine allows for a bounded time, while the config file is rewritten
//! (temp file + rename) a fixed number of times, alternating the manual canary weight.
//!
//! Pass criteria, checked at the end and printed as JSON: no failed request; the upstreams
//! together saw exactly as many requests as the clients sent; `veer_requests_total` (summed)
//! never went backwards between samples; no reload was rejected. Each rewrite is also applied
//! with an explicit reload, so `reloads_applied` is at least `rewrites` (the file watcher adds
//! its own reloads on top).
//!
//! `cargo run --release -p veer-loadtest --bin reload -- --seconds 20 --rewrites 100`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use veer::demo::upstream::Upstream;

#[derive(Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// How many times the config file is rewritten during the run.
    #[arg(long, default_value_t = 100)]
    rewrites: u32,
    /// Concurrent HTTP/1.1 keep-alive clients.
    #[arg(long, default_value_t = 32)]
    h1: usize,
    /// Concurrent HTTP/2 streams (over one connection per 8 streams).
    #[arg(long, default_value_t = 32)]
    h2: usize,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

fn config(dir: &Path, blue: SocketAddr, green: SocketAddr, weight: u32) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{}\"\n\
         [[route]]\nname = \"load\"\n[route.blue]\nendpoints = [\"{blue}\"]\n[route.green]\n\
         endpoints = [\"{green}\"]\n[route.sticky]\nby = \"none\"\n[route.rollout]\nmode = \"manual\"\n\
         weight = {weight}\n",
        dir.join("state").display()
    )
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let blue = Upstream::builder("blue").start().await?;
    let green = Upstream::builder("green").start().await?;
    let dir: PathBuf = std::env::temp_dir().join(format!("veer-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("veer.toml");
    std::fs::write(&path, config(&dir, blue.addr, green.addr, 10))?;
    let cfg = veer::config::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = veer::app::start(cfg, Some(path.clone())).await?;
    let proxy = *running.proxy_addrs.first().context("no listener")?;
    let app = Arc::clone(&running.app);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut clients = Vec::new();
    let h1: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..args.h1 {
        clients.push(tokio::spawn(drive(
            h1.clone(),
            proxy,
            Arc::clone(&stop),
            Arc::clone(&counts),
        )));
    }
    // HTTP/2: a new client (one connection) per 8 concurrent streams.
    let new_h2 = || -> Client<_, Empty<Bytes>> {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http()
    };
    let mut h2 = new_h2();
    for i in 0..args.h2 {
        if i % 8 == 0 {
            h2 = new_h2();
        }
        clients.push(tokio::spawn(drive(
            h2.clone(),
            proxy,
            Arc::clone(&stop),
            Arc::clone(&counts),
        )));
    }

    // Counters must never go backwards while the config changes under them.
    let monotone = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (app, stop, monotone) = (Arc::clone(&app), Arc::clone(&stop), Arc::clone(&monotone));
        tokio::spawn(async move {
            let mut last = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let now: u64 = app
                    .table
                    .load()
                    .routes()
                    .iter()
                    .flat_map(|r| r.shared.metrics.iter().map(|m| m.totals().requests()))
                    .sum();
                if now < last {
                    monotone.store(false, Ordering::Relaxed);
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let run = Duration::from_secs(args.seconds);
    let every = run / (args.rewrites + 1);
    let started = tokio::time::Instant::now();
    for i in 0..args.rewrites {
        tokio::time::sleep(every).await;
        let weight = if i % 2 == 0 { 50 } else { 10 };
        write_atomically(&path, &config(&dir, blue.addr, green.addr, weight))?;
        // Also reload explicitly (as `POST /api/v1/config/reload` does), so that every rewrite
        // is swapped in even when rewrites come faster than the watcher's debounce.
        if let Err(errors) = app.reload().await {
            bail!("reload rejected: {errors}");
        }
    }
    tokio::time::sleep_until(started + run).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let _ = sampler.await;
    // Let the watcher see the last rewrite.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let applied = app.reloads_applied.load(Ordering::Relaxed);
    let rejected = app.reloads_rejected.load(Ordering::Relaxed);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let sent = counts.sent.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let upstream = blue.request_count() + green.request_count();
    let result = serde_json::json!({
        "seconds": elapsed,
        "rewrites": args.rewrites,
        "reloads_applied": applied,
        "reloads_rejected": rejected,
        "requests": sent,
        "ok": counts.ok.load(Ordering::Relaxed),
        "failed": failed,
        "req_per_s": sent as f64 / elapsed,
        "upstream_requests": upstream,
        "counters_monotone": monotone.load(Ordering::Relaxed),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if failed > 0 || upstream != sent || !monotone.load(Ordering::Relaxed) || rejected > 0 {
        bail!("reload under load failed its criteria");
    }
    Ok(())
}

async fn drive(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let uri: http::Uri = match format!("http://{proxy}/").parse() {
        Ok(uri) => uri,
        Err(_) => return,
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(request) = http::Request::builder().uri(uri.clone()).body(Empty::new()) else {
            return;
        };
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let ok = match client.request(request).await {
            Ok(response) => {
                let status = response.status();
                response.into_body().collect().await.is_ok() && status.is_success()
            }
            Err(_) => false,
        };
        let counter = if ok { &counts.ok } else { &counts.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
