//! `veer demo`: blue, green and shadow upstreams, the proxy and a synthetic load with many
//! distinct users, all in this process on loopback, and a live view of the rollout until it is
//! promoted or rolled back.

pub mod upstream;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::app;
use crate::cli::out;
use crate::config;
use crate::metrics::SlotMetrics;
use crate::rollout::state::{Action, Phase};
use crate::Slot;
use upstream::Upstream;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Fraction of green's answers that are 500s, from 0 to 1 (e.g. 0.05): watch the rollback.
    #[arg(long, value_parser = fraction, default_value_t = 0.0, allow_hyphen_values = true)]
    pub green_errors: f64,
    /// Latency added to every green answer (e.g. 50ms): watch the rollback.
    #[arg(long, value_parser = duration, default_value = "0ms", allow_hyphen_values = true)]
    pub green_latency: Duration,
    /// Keep the admin API on this loopback address while the demo runs (e.g. 127.0.0.1:9901;
    /// an http:// URL is taken too).
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:9901", value_parser = loopback)]
    pub admin: Option<SocketAddr>,
    /// Requests per second of the synthetic load (1 to 1,000,000).
    #[arg(long, default_value_t = 800, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: u32,
    /// Give up after this long (more than 0).
    #[arg(long, value_parser = positive_duration, default_value = "3m", allow_hyphen_values = true)]
    pub timeout: Duration,
    /// How long each step lasts at least (more than 0).
    #[arg(long, value_parser = positive_duration, default_value = "3s", allow_hyphen_values = true)]
    pub min_step_time: Duration,
}

/// `--green-errors`: a number from 0 to 1.
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err("must be a fraction from 0 to 1, e.g. 0.05".into()),
    }
}

/// A duration such as `50ms`, `2s` or `1m`, of at most 100 years as in the config (a clock
/// cannot count to humantime's largest).
fn duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d > config::MAX_DURATION => Err("must be at most 100 years".into()),
        Ok(d) => Ok(d),
        Err(_) => Err("must be a duration such as 50ms, 2s or 1m".into()),
    }
}

/// A duration above zero.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        Duration::ZERO => Err("must be more than 0".into()),
        positive => Ok(positive),
    }
}

/// `--admin`: a loopback ip:port (or `http://ip:port`, as `status` and `rollout` take it). The
/// demo's admin API has no token, so it stays on this host.
fn loopback(text: &str) -> Result<SocketAddr, String> {
    let text = text.strip_prefix("http://").unwrap_or(text);
    let text = text.strip_suffix('/').unwrap_or(text);
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Ok(addr),
        Ok(_) => Err("must be a loopback address such as 127.0.0.1:9901: \
                      the demo's admin API has no token"
            .into()),
        Err(_) => Err("must be an ip:port address such as 127.0.0.1:9901".into()),
    }
}

/// How the demo ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Promoted,
    RolledBack,
}

/// The demo's config: one route, a short policy, a 10 % shadow.
fn demo_config(
    blue: SocketAddr,
    green: SocketAddr,
    shadow: SocketAddr,
    admin: SocketAddr,
    state: &std::path::Path,
    min_step_time: Duration,
) -> anyhow::Result<config::Config> {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
# Once the rollout is decided, the demo does not wait for hanging answers.
drain_timeout = "1s"
[admin]
listen = "{admin}"
[state]
dir = "{state}"
[[route]]
name = "demo"
[route.blue]
endpoints = ["{blue}"]
version = "v1"
[route.green]
endpoints = ["{green}"]
version = "v2"
[route.sticky]
by = "header:x-user"
[route.shadow]
endpoints = ["{shadow}"]
percent = 10
[route.rollout]
steps = [10, 50, 100]
min_step_time = "{step}"
min_requests = 200
interval = "500ms"
failure_threshold = 2
"#,
        state = state.display(),
        step = humantime::format_duration(min_step_time),
    );
    config::parse(&text, None).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// The demo was stopped by a signal, and cleaned up after itself; `code` is the exit code a
/// shell gives a process ended by that signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {signal}")]
pub struct Interrupted {
    pub signal: &'static str,
    pub code: u8,
}

/// Resolves at the first SIGINT or SIGTERM. Listening starts when this is called, so that from
/// then on neither ends the process before the demo has cleaned up.
fn interrupted() -> anyhow::Result<impl std::future::Future<Output = Interrupted>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => Interrupted { signal: "SIGINT", code: 130 },
            _ = term.recv() => Interrupted { signal: "SIGTERM", code: 143 },
        }
    })
}

/// The demo's state dir, removed when dropped: however the demo ends.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo to its end; `Ok` with the outcome (rolled back is a success too: it is what
/// a bad green should get). A SIGINT or SIGTERM ends it early with [`Interrupted`].
pub async fn run(options: DemoOptions) -> anyhow::Result<Outcome> {
    let interrupted = interrupted()?;
    let state = StateDir(std::env::temp_dir().join(format!("veer-demo-{}", std::process::id())));
    let blue = Upstream::builder("blue v1").start().await?;
    let green = Upstream::builder("green v2")
        .error_rate(options.green_errors)
        .latency(options.green_latency)
        .start()
        .await?;
    let shadow = Upstream::builder("shadow v2").start().await?;
    let admin = options
        .admin
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let config = demo_config(
        blue.addr,
        green.addr,
        shadow.addr,
        admin,
        &state.0,
        options.min_step_time,
    )?;
    let running = app::start(config, None)
        .await
        .context("cannot start the demo")?;
    let proxy = running
        .proxy_addrs
        .first()
        .copied()
        .context("no listener")?;
    if options.admin.is_some() {
        let _ = out(&format!(
            "admin API: http://{}/api/v1/routes\n",
            running.admin_addr
        ));
    }
    let table = running.app.table.load_full();
    let route = table.route("demo").context("demo route missing")?;
    crate::rollout::act(&route.shared, &route.config, Action::Start, "demo started")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(load(
        proxy,
        options.rate,
        Arc::clone(&stop),
        Arc::clone(&sent),
    ));
    let outcome = tokio::select! {
        outcome = watch(&running, options.timeout) => outcome,
        signal = interrupted => Err(signal.into()),
    };
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let json = crate::admin::status::route_json(route);
    let summary = summary(
        outcome.as_ref().ok().copied(),
        json["last_verdict"]["reason"].as_str().unwrap_or("-"),
        sent.load(Ordering::Relaxed),
        [Slot::Blue, Slot::Green].map(|slot| route.shared.slot_metrics(slot)),
    );
    let mut journal = running.app.store.journal.tail(20).unwrap_or_default();
    journal.reverse();
    running.shutdown().await;
    drop(state);
    if outcome.as_ref().is_err_and(|e| e.is::<Interrupted>()) {
        return outcome;
    }
    let _ = out(&(summary + &journal_text(&journal)));
    outcome
}

/// Polls the route, draws the live view, returns when the rollout is over.
async fn watch(running: &app::Running, timeout: Duration) -> anyhow::Result<Outcome> {
    let tty = std::io::stdout().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut piped = PipedFrames::default();
    let mut rates = Rates::default();
    let mut drawn = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let table = running.app.table.load_full();
        let route = table.route("demo").context("demo route missing")?;
        let view = route.shared.rollout.view();
        let mut json = crate::admin::status::route_json(route);
        let served =
            [Slot::Blue, Slot::Green].map(|slot| route.shared.slot_metrics(slot).requests());
        if let Some(rates) = rates.update(tokio::time::Instant::now(), served) {
            for (slot, rate) in ["blue", "green"].into_iter().zip(rates) {
                json["slots"][slot]["rps"] = rate.into();
            }
        }
        let frame = render(&json);
        // A closed stdout (`veer demo | head`) ends the demo like a signal would.
        let closed = |_| anyhow::anyhow!("stdout was closed");
        if tty {
            let up = match drawn {
                0 => String::new(),
                n => format!("\x1b[{n}A\x1b[J"),
            };
            // One row per line, or the cursor would not get back to the top of the frame.
            let width = terminal_size::terminal_size_of(std::io::stdout())
                .map_or(80, |(terminal_size::Width(w), _)| usize::from(w));
            let frame = clipped(&frame, width.saturating_sub(1).max(1));
            out(&(up + &frame)).map_err(closed)?;
            drawn = frame.lines().count();
        } else if piped.due((view.state.phase, view.state.step, view.state.canary_bp)) {
            out(&frame).map_err(closed)?;
        }
        match view.state.phase {
            Phase::RolledBack => return Ok(Outcome::RolledBack),
            Phase::Idle if view.state.stable == crate::Slot::Green => return Ok(Outcome::Promoted),
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the rollout did not finish within {}",
                humantime::format_duration(timeout)
            );
        }
    }
}

/// Each slot's requests per second over about the last second, from its monotone totals. The
/// API's `rps` is the average over 60 s, which in a demo of a few seconds still showed blue
/// busy after green had taken all the traffic.
#[derive(Default)]
struct Rates {
    /// (when, requests served by blue and green), oldest first, the last second's and one more.
    samples: VecDeque<(tokio::time::Instant, [u64; 2])>,
}

impl Rates {
    /// Adds the totals seen at `now`; the rates since the oldest sample kept, once there is one.
    fn update(&mut self, now: tokio::time::Instant, served: [u64; 2]) -> Option<[f64; 2]> {
        while self.samples.len() > 1 && self.samples[1].0 + Duration::from_secs(1) <= now {
            self.samples.pop_front();
        }
        let rates = self.samples.front().and_then(|&(then, before)| {
            let secs = now.checked_duration_since(then)?.as_secs_f64();
            (secs > 0.0).then(|| [0, 1].map(|i| served[i].saturating_sub(before[i]) as f64 / secs))
        });
        self.samples.push_back((now, served));
        rates
    }
}

/// `frame` with each line cut to `width` characters.
fn clipped(frame: &str, width: usize) -> String {
    let mut out = String::with_capacity(frame.len());
    for line in frame.lines() {
        out.extend(line.chars().take(width));
        out.push('\n');
    }
    out
}

/// When a pipe or a file gets the next frame (the live view is drawn every 500 ms): when the
/// phase, step or weight changes, and every 2 s. Not on every change of the text: the step
/// line's evidence counter changes at every draw.
#[derive(Default)]
struct PipedFrames {
    last: Option<(Phase, usize, u32)>,
    skipped: u32,
}

impl PipedFrames {
    fn due(&mut self, now: (Phase, usize, u32)) -> bool {
        let due = self.last != Some(now) || self.skipped == 3;
        self.last = Some(now);
        self.skipped = if due { 0 } else { self.skipped + 1 };
        due
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The live view: a progress bar of the canary weight, the phase and step, per-slot figures and
/// the last verdict.
fn render(route: &Value) -> String {
    // Green's share, whichever slot is stable (after a promotion green is stable).
    let canary = f(&route["canary_weight"]);
    let weight = if route["stable"] == "green" {
        100.0 - canary
    } else {
        canary
    };
    let filled = (weight / 100.0 * 40.0).round() as usize;
    let bar: String = "#".repeat(filled.min(40)) + &"-".repeat(40 - filled.min(40));
    let mut out = format!(
        "[{bar}] green {weight:>6.2}%  phase {}  step {}  {}\n",
        route["phase"].as_str().unwrap_or("-"),
        crate::cli::step_label(route),
        route["waiting"].as_str().unwrap_or(""),
    );
    for slot in ["blue", "green"] {
        let s = &route["slots"][slot];
        // No latency sample yet (nothing answered): no p99 to show.
        let p99 = match s["latency_ms"]["p99"].as_f64() {
            Some(p99) if f(&s["requests"]) > 0.0 => format!("{p99:>7.1} ms"),
            _ => format!("{:>7}   ", "-"),
        };
        out.push_str(&format!(
            "  {slot:<5} {:>8.1} req/s  errors {:>6.2}%  p99 {p99}\n",
            f(&s["rps"]),
            f(&s["error_rate"]) * 100.0,
        ));
    }
    let shadow = &route["shadow"];
    let count = |key: &str| shadow[key].as_u64().unwrap_or(0);
    let mut line = format!(
        "  shadow {} mirrored, {} match, {} mismatch, {} error",
        count("requests"),
        count("match"),
        count("mismatch"),
        count("error")
    );
    let dropped = count("dropped_busy") + count("dropped_body");
    if dropped > 0 {
        line.push_str(&format!(", {dropped} dropped"));
    }
    if count("in_flight") > 0 {
        line.push_str(&format!(", {} under way", count("in_flight")));
    }
    out.push_str(&line);
    out.push('\n');
    if let Some(reason) = route["last_verdict"]["reason"].as_str() {
        out.push_str(&format!(
            "  last verdict: {} ({reason})\n",
            route["last_verdict"]["result"].as_str().unwrap_or("-")
        ));
    }
    out
}

/// How the rollout ended, and the requests of the whole demo: sent, and served per slot.
fn summary(
    outcome: Option<Outcome>,
    verdict: &str,
    sent: u64,
    [blue, green]: [&SlotMetrics; 2],
) -> String {
    let ended = match outcome {
        Some(Outcome::Promoted) => format!("Promoted: green (v2) is now stable. {verdict}"),
        Some(Outcome::RolledBack) => format!("Rolled back: all traffic is on blue (v1). {verdict}"),
        None => "The rollout did not finish.".into(),
    };
    let (blue, green) = (blue.requests(), green.requests());
    let unanswered = match sent.saturating_sub(blue + green) {
        0 => String::new(),
        n => format!("; {n} still without an answer when the demo stopped"),
    };
    format!("\n{ended}\n{sent} requests sent; blue served {blue}, green {green}{unanswered}.\n")
}

/// The decisions, oldest first, as the journal recorded them.
fn journal_text(entries: &[Value]) -> String {
    let mut text = "\nDecision journal:\n".to_string();
    for e in entries.iter().filter(|e| e["event"] == "transition") {
        text.push_str(&format!(
            "  {}  {:<12} {:>11} -> {:<11} canary weight {:>6.2}% -> {:>6.2}%  {}\n",
            e["at"].as_str().unwrap_or("-"),
            e["action"].as_str().unwrap_or("-"),
            e["from"].as_str().unwrap_or("-"),
            e["to"].as_str().unwrap_or("-"),
            f(&e["weight_from"]),
            f(&e["weight_to"]),
            e["reason"].as_str().unwrap_or(""),
        ));
    }
    text
}

/// An open-loop load of many distinct users (`x-user` header) at `rate` requests per second,
/// until `stop`: each request on its own task, so that slow or hanging answers do not slow
/// the others down (at most `MAX_IN_FLIGHT` at once). Requests still under way at the end are
/// dropped.
async fn load(proxy: SocketAddr, rate: u32, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    const MAX_IN_FLIGHT: usize = 2_000;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        while in_flight.try_join_next().is_some() {}
        if in_flight.len() >= MAX_IN_FLIGHT {
            continue;
        }
        let user = fastrand::u32(0..20_000);
        let request = http::Request::builder()
            .uri(format!("http://{proxy}/"))
            .header("x-user", format!("user-{user}"))
            .body(Empty::new());
        let Ok(request) = request else { continue };
        sent.fetch_add(1, Ordering::Relaxed);
        let client = client.clone();
        in_flight.spawn(async move {
            if let Ok(response) = client.request(request).await {
                let _ = response.into_body().collect().await;
            }
        });
    }
    // The answers under way get a moment to arrive; the summary counts those that did not.
    let drained = async { while in_flight.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Epoch;

    /// The live rates cover about the last second: after green took all the traffic, blue
    /// shows 0 req/s within a second, however busy it was before.
    #[test]
    fn live_rates_cover_the_last_second() {
        let start = tokio::time::Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut rates = Rates::default();
        assert_eq!(rates.update(at(0), [0, 0]), None);
        // 500 ms later: blue 400 more, green 100 more.
        assert_eq!(rates.update(at(500), [400, 100]), Some([800.0, 200.0]));
        assert_eq!(rates.update(at(1000), [800, 200]), Some([800.0, 200.0]));
        // From here on green serves everything.
        assert_eq!(rates.update(at(1500), [800, 600]), Some([400.0, 500.0]));
        let [blue, green] = rates.update(at(2000), [800, 1000]).unwrap_or_default();
        assert_eq!(blue, 0.0);
        assert_eq!(green, 800.0);
    }

    /// Piped, a step that waits 3 s for evidence is printed when it starts and every 2 s, not at
    /// every draw; a new step is printed at once.
    #[test]
    fn a_pipe_gets_a_frame_on_each_change_and_every_two_seconds() {
        let mut piped = PipedFrames::default();
        let ramping = |step| (Phase::Ramping, step, 1000 * (step as u32 + 1));
        let first: Vec<bool> = (0..6).map(|_| piped.due(ramping(0))).collect();
        assert_eq!(first, [true, false, false, false, true, false]);
        assert!(piped.due(ramping(1)));
        assert!(!piped.due(ramping(1)));
    }

    /// A demo longer than the 60 s the admin API shows still sums up all of its requests.
    #[test]
    fn the_summary_counts_every_request_of_the_demo() {
        let (blue, green) = (SlotMetrics::new(), SlotMetrics::new());
        for _ in 0..10 {
            blue.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(1));
        }
        // Past the sliding window.
        for _ in 0..20 {
            blue.rotate();
        }
        blue.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(1));
        green.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(1));
        assert_eq!(blue.last_60s().requests, 1);
        let text = summary(Some(Outcome::Promoted), "passed", 12, [&blue, &green]);
        assert!(
            text.contains("12 requests sent; blue served 11, green 1."),
            "{text}"
        );
        let text = summary(Some(Outcome::Promoted), "passed", 15, [&blue, &green]);
        assert!(
            text.contains(
                "15 requests sent; blue served 11, green 1; 3 still without an answer when the demo stopped."
            ),
            "{text}"
        );
    }

    /// The shadow line adds up (copies dropped or under way shown), and a slot with nothing
    /// answered shows no p99.
    #[test]
    fn the_live_view_shows_every_copy_and_no_p99_without_answers() {
        let route = serde_json::json!({
            "canary_weight": 10.0, "stable": "blue", "phase": "ramping",
            "slots": {
                "blue": {"rps": 90.0, "error_rate": 0.0, "requests": 900, "latency_ms": {"p99": 1.5}},
                "green": {"rps": 0.0, "error_rate": 0.0, "requests": 0, "latency_ms": {"p99": 0.0}}
            },
            "shadow": {"requests": 251, "match": 220, "mismatch": 0, "error": 1,
                       "dropped_busy": 2, "dropped_body": 3, "in_flight": 25}
        });
        let frame = render(&route);
        assert!(frame.contains("p99     1.5 ms"), "{frame}");
        assert!(
            frame.contains("green      0.0 req/s  errors   0.00%  p99       -"),
            "{frame}"
        );
        assert!(
            frame.contains(
                "shadow 251 mirrored, 220 match, 0 mismatch, 1 error, 5 dropped, 25 under way"
            ),
            "{frame}"
        );
    }

    /// The live view on a terminal takes one row per line: longer lines are cut.
    #[test]
    fn a_frame_is_clipped_to_the_terminal_width() {
        let frame = "short\n0123456789abcdef\n\nlast verdict: é très long\n";
        assert_eq!(clipped(frame, 10), "short\n0123456789\n\nlast verdi\n");
        assert_eq!(clipped("é très long", 3), "é t\n");
    }
}
