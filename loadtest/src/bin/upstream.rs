//! A standalone fault-injecting HTTP upstream on loopback (HTTP/1.1 and h2c), for load tests
//! and for trying veer by hand: a fixed status, a share of errors, added latency, a blackhole,
//! a body sent slowly.
//!
//! Prints `listening on ADDR` on stdout once bound (so `--listen 127.0.0.1:0` works from
//! scripts), then serves until SIGTERM, Ctrl-C or `--max-time`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use veer::demo::upstream::{Behaviour, Upstream};

#[derive(Parser)]
#[command(
    name = "upstream",
    about = "A fault-injecting HTTP upstream on loopback."
)]
struct Args {
    /// Loopback address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Name sent in the `x-upstream` header and, unless --body is given, as the body.
    #[arg(long, default_value = "upstream")]
    name: String,
    /// Status of normal answers.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Fraction of answers that are errors (e.g. 0.05).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Status of those errors.
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Added to every answer (e.g. 50ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    latency: Duration,
    /// Accept connections and requests, never answer.
    #[arg(long)]
    blackhole: bool,
    /// Send the body in ten pieces spread over this long (e.g. 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    slow_body: Option<Duration>,
    /// Response body.
    #[arg(long)]
    body: Option<String>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Stop by itself after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    max_time: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!("error: --listen must be a loopback address");
        return ExitCode::from(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build();
    let result = runtime
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(serve(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut builder = Upstream::builder(&args.name)
        .listen(args.listen)
        .status(args.status)
        .error_rate(args.error_rate)
        .error_status(args.error_status)
        .latency(args.latency);
    if args.blackhole {
        builder = builder.behaviour(Behaviour::Blackhole);
    }
    if let Some(duration) = args.slow_body {
        builder = builder.slow_body(duration);
    }
    if let Some(body) = args.body {
        builder = builder.body(body);
    }
    let upstream = builder
        .start()
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("listening on {}", upstream.addr);
    std::io::stdout().flush().context("stdout")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = tokio::time::sleep(args.max_time) => {}
    }
    eprintln!("served {} requests", upstream.request_count());
    Ok(())
}
