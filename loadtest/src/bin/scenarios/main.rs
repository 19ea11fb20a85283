//! The five rollout scenarios against an in-process veer, each with its own open-loop
//! constant-rate load, bounded in time and requests:
//!
//! 1. `healthy_promoted`: green as good as blue is promoted;
//! 2. `errors_rolled_back`: green with 5 % errors is rolled back;
//! 3. `latency_rolled_back`: green with +50 ms is rolled back;
//! 4. `low_traffic_holds`: too little traffic holds at step 1 (never fails);
//! 5. `shadow_blackholed`: the primary's p99 with the shadow off, healthy and blackholed;
//! 6. `hang_rolled_back`: green that never answers is rolled back within seconds.
//!
//! Each writes `results/<scenario>.json` (outcome, decisions, a time series sampled every
//! 500 ms) and `results/<scenario>.svg`. Exit code 1 when any outcome is not the expected one.
//!
//! `cargo run --release -p veer-loadtest --bin scenarios [-- --only NAME --rate N]`

mod report;
mod rollout;
mod shadow;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use veer_loadtest::load::{Load, Plan};

#[derive(Parser)]
#[command(
    name = "scenarios",
    about = "Rollout scenarios against an in-process veer."
)]
struct Args {
    /// Run only these scenarios (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Requests per second of the load (the low-traffic scenario uses 20).
    #[arg(long, default_value_t = 800.0)]
    rate: f64,
    /// Where the JSON and SVG files go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime.map(|rt| rt.block_on(run_all(&args))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            ExitCode::from(2)
        }
    }
}

/// Runs the chosen scenarios one after the other; true when every outcome was the expected one.
async fn run_all(args: &Args) -> bool {
    let chosen = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut all_ok = true;
    for scenario in rollout::SCENARIOS.iter().filter(|s| chosen(s.name)) {
        all_ok &= finish(scenario.name, rollout::run(scenario, args.rate).await, args);
    }
    if chosen(shadow::NAME) {
        all_ok &= finish(shadow::NAME, shadow::run(args.rate).await, args);
    }
    all_ok
}

fn finish(name: &str, result: anyhow::Result<report::Report>, args: &Args) -> bool {
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            println!("{name:<22} ERROR  {error:#}");
            return false;
        }
    };
    let o = &report.outcome;
    let decided = o
        .decided_after_s
        .map(|s| format!(" after {s:.1} s"))
        .unwrap_or_default();
    println!(
        "{name:<22} {}  {}{decided} (expected {}); {} requests",
        if o.ok { "ok   " } else { "FAIL " },
        o.observed,
        o.expected,
        report.samples.len(),
    );
    if let Err(error) = report::write(&report, &args.out) {
        println!("{name:<22} cannot write the results: {error:#}");
        return false;
    }
    o.ok
}

/// Distinct users of the scenarios' load.
const USERS: u32 = 20_000;

/// Starts the scenarios' load on `proxy`: `rate` requests per second for at most `duration`,
/// [`USERS`] distinct users, 5 s to answer.
fn start_load(proxy: std::net::SocketAddr, rate: f64, duration: std::time::Duration) -> Load {
    let plan = Plan {
        rate,
        duration,
        timeout: std::time::Duration::from_secs(5),
        users: USERS,
    };
    Load::start(proxy, plan)
}
