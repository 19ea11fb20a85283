//! The shadow scenario: the same fixed-rate load through veer three times, with the shadow off,
//! mirroring every request to a healthy shadow, and mirroring every request to a shadow that
//! never answers. The primary's latency and errors must not care.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use veer::demo::upstream::{Behaviour, Upstream};
use veer_loadtest::chart::{self, Line, Mark, Panel};
use veer_loadtest::load::{self, Sample};
use veer_loadtest::series::{self, Point, Sampler, PERIOD};

use crate::report::{self, Outcome, Report};

pub const NAME: &str = "shadow_blackholed";
const ROUTE: &str = "catalog";
const STAGE_TIME: Duration = Duration::from_secs(8);

const SHADOW: &str = r#"[route.shadow]
endpoints = ["{shadow}"]
percent = 100
max_in_flight = 64
timeout = "1s"
compare = "status"
"#;

#[derive(Clone, Copy)]
enum Stage {
    Off,
    Healthy,
    Blackholed,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Off => "off",
            Stage::Healthy => "healthy",
            Stage::Blackholed => "blackholed",
        }
    }
}

fn config_text(blue: &Upstream, green: &Upstream, shadow: Option<&Upstream>, dir: &str) -> String {
    let shadow = shadow
        .map(|s| SHADOW.replace("{shadow}", &s.addr.to_string()))
        .unwrap_or_default();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\ndrain_timeout = \"2s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{dir}\"\n\n\
         [[route]]\nname = \"{ROUTE}\"\n\
         [route.blue]\nendpoints = [\"{}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{}\"]\nversion = \"v2\"\n\
         [route.sticky]\nby = \"header:x-user\"\n\
         [route.rollout]\nmode = \"manual\"\nweight = 10\n{shadow}",
        blue.addr, green.addr
    )
}

/// One stage: its own veer, the same load; returns its points (t from `offset`) and samples.
async fn stage(
    stage: Stage,
    rate: f64,
    offset: Duration,
    upstreams: (&Upstream, &Upstream),
) -> anyhow::Result<(Vec<Point>, Vec<Sample>, Value)> {
    let shadow = match stage {
        Stage::Off => None,
        Stage::Healthy => Some(Upstream::builder("shadow").start().await?),
        Stage::Blackholed => Some(
            Upstream::builder("shadow")
                .behaviour(Behaviour::Blackhole)
                .start()
                .await?,
        ),
    };
    let state = report::state_dir(&format!("{NAME}-{}", stage.as_str()));
    let text = config_text(
        upstreams.0,
        upstreams.1,
        shadow.as_ref(),
        &state.display().to_string(),
    );
    let config = veer::config::parse(&text, None).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let running = veer::app::start(config, None).await?;
    let proxy = *running.proxy_addrs.first().context("no listener")?;
    let load = crate::start_load(proxy, rate, STAGE_TIME);
    let start = load.start;
    let mut sampler = Sampler::default();
    let mut points = Vec::new();
    let mut tick = tokio::time::interval_at(start + PERIOD, PERIOD);
    let mut counters = Value::Null;
    while start.elapsed() < STAGE_TIME {
        tick.tick().await;
        let table = running.app.table.load_full();
        let route = table.route(ROUTE).context("route missing")?;
        let mut point = sampler.sample(route, offset + start.elapsed());
        counters = shadow_counters(route);
        point.extra = json!({"stage": stage.as_str(), "shadow": counters});
        points.push(point);
    }
    let samples = load.finish().await.context("load task")?;
    series::attach_client(&mut points, &samples, offset);
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&state);
    let all: Vec<&Sample> = samples.iter().collect();
    let summary = json!({
        "requests": all.len(),
        "errors": all.iter().filter(|s| !s.ok).count(),
        "p50_ms": series::round(load::quantile_ms(all.iter().copied(), 0.5), 3),
        "p99_ms": series::round(load::quantile_ms(all.iter().copied(), 0.99), 3),
        "shadow": counters,
    });
    Ok((points, samples, summary))
}

fn shadow_counters(route: &veer::routing::Route) -> Value {
    let s = &route.shared.shadow;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "eligible": get(&s.requests),
        "sent": get(&s.sent),
        "match": get(&s.matched),
        "mismatch": get(&s.mismatched),
        "error": get(&s.errors),
        "dropped_busy": get(&s.dropped_busy),
        "in_flight": s.in_flight(),
    })
}

pub async fn run(rate: f64) -> anyhow::Result<Report> {
    let blue = Upstream::builder("blue").start().await?;
    let green = Upstream::builder("green").start().await?;
    let mut points = Vec::new();
    let mut samples = Vec::new();
    let mut marks = Vec::new();
    let mut stages = serde_json::Map::new();
    for (i, s) in [Stage::Off, Stage::Healthy, Stage::Blackholed]
        .into_iter()
        .enumerate()
    {
        let offset = STAGE_TIME * i as u32;
        marks.push(Mark {
            t: offset.as_secs_f64(),
            label: format!("shadow {}", s.as_str()),
        });
        let (p, mut x, summary) = stage(s, rate, offset, (&blue, &green)).await?;
        points.extend(p);
        for sample in &mut x {
            sample.due += offset;
        }
        samples.extend(x);
        stages.insert(s.as_str().to_string(), summary);
    }
    let f = |stage: &str, key: &str| stages[stage][key].as_f64().unwrap_or(f64::NAN);
    let (off, blackholed) = (f("off", "p99_ms"), f("blackholed", "p99_ms"));
    let bound = (2.0 * off).max(off + 10.0);
    let errors: f64 = ["off", "healthy", "blackholed"]
        .iter()
        .map(|s| f(s, "errors"))
        .sum();
    let ok = errors == 0.0 && blackholed <= bound;
    let observed = format!(
        "primary p99 {off:.2} ms (shadow off), {:.2} ms (healthy), {blackholed:.2} ms \
         (blackholed); {errors} primary errors",
        f("healthy", "p99_ms")
    );
    Ok(Report {
        name: NAME,
        about: "primary latency with the shadow off, healthy, and blackholed, at a fixed rate; \
                every request mirrored, at most 64 shadows in flight, shadow timeout 1 s",
        config: json!({
            "load": {"rate": rate, "users": 20_000, "open_loop": true,
                     "stage_s": STAGE_TIME.as_secs_f64()},
            "shadow": SHADOW.replace("{shadow}", "<shadow upstream>"),
            "split": "manual, 10 % green",
        }),
        outcome: Outcome {
            expected: format!(
                "no primary errors; blackholed p99 <= max(2 x off, off + 10 ms) = {bound:.2} ms"
            ),
            observed,
            ok,
            decided_after_s: None,
            details: Value::Object(stages),
        },
        panels: panels(&points),
        marks,
        samples,
        points,
        decisions: Vec::new(),
    })
}

fn panels(points: &[Point]) -> Vec<Panel> {
    let line = |name: &str, colour, value: &dyn Fn(&Point) -> f64| Line {
        name: name.to_string(),
        colour,
        points: points.iter().map(|p| (p.t, value(p))).collect(),
    };
    vec![
        Panel {
            title: "shadow requests in flight (cap 64)".into(),
            y_label: "requests".into(),
            lines: vec![line("in flight", chart::ORANGE, &|p| {
                p.extra["shadow"]["in_flight"].as_f64().unwrap_or(0.0)
            })],
        },
        Panel {
            title: "primary error rate (client, per 500 ms)".into(),
            y_label: "%".into(),
            lines: vec![line("primary", chart::BLUE, &|p| {
                p.client_all.error_rate * 100.0
            })],
        },
        Panel {
            title: "primary p99 latency (client, from the due time, per 500 ms)".into(),
            y_label: "ms".into(),
            lines: vec![line("primary", chart::BLUE, &|p| p.client_all.p99_ms)],
        },
    ]
}
