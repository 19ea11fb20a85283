//! The rollout scenarios: blue stable, green the canary (healthy, erroring, slow, or with too
//! little traffic), a rollout started, an open-loop load until the controller decides (or a
//! time bound), then a short tail so the chart shows what followed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use veer::demo::upstream::Upstream;
use veer::rollout::state::{Action, Phase, RolloutState};
use veer::Slot;
use veer_loadtest::series::{self, Sampler, PERIOD};

use crate::report::{self, Outcome, Report};

pub const ROUTE: &str = "checkout";

/// The policy every rollout scenario uses: three steps, short enough for seconds per step.
pub const POLICY: &str = r#"[route.rollout]
mode = "auto"
steps = [10, 50, 100]
min_step_time = "3s"
min_requests = 150
max_step_time = "30s"
interval = "500ms"
failure_threshold = 2
"#;

/// How long the load goes on after the decision.
const TAIL: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Promoted,
    RolledBack,
    /// Still ramping at the first step when the time bound is reached.
    Holds,
}

impl Expect {
    fn as_str(self) -> &'static str {
        match self {
            Expect::Promoted => "promoted",
            Expect::RolledBack => "rolled_back",
            Expect::Holds => "held at step 1",
        }
    }
}

/// One rollout scenario.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub green_error_rate: f64,
    pub green_latency: Duration,
    /// Load rate; `None` uses the command line's.
    pub rate: Option<f64>,
    /// The scenario stops here if the controller has not decided.
    pub max_time: Duration,
    pub expect: Expect,
}

pub const SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "healthy_promoted",
        about: "green as good as blue: every step passes and green is promoted",
        green_error_rate: 0.0,
        green_latency: Duration::ZERO,
        rate: None,
        max_time: Duration::from_secs(60),
        expect: Expect::Promoted,
    },
    Scenario {
        name: "errors_rolled_back",
        about: "green answers 5 % of requests with 500: rolled back",
        green_error_rate: 0.05,
        green_latency: Duration::ZERO,
        rate: None,
        max_time: Duration::from_secs(60),
        expect: Expect::RolledBack,
    },
    Scenario {
        name: "latency_rolled_back",
        about: "green adds 50 ms to every answer (p99 +50 ms): rolled back",
        green_error_rate: 0.0,
        green_latency: Duration::from_millis(50),
        rate: None,
        max_time: Duration::from_secs(60),
        expect: Expect::RolledBack,
    },
    Scenario {
        name: "hang_rolled_back",
        about: "green never answers (1 h added): rolled back on the requests it keeps waiting, \
                long before request_timeout (60 s) could make errors of them",
        green_error_rate: 0.0,
        green_latency: Duration::from_secs(3600),
        rate: None,
        max_time: Duration::from_secs(30),
        expect: Expect::RolledBack,
    },
    Scenario {
        name: "low_traffic_holds",
        about: "20 req/s: the canary cannot reach min_requests in 15 s, so the step holds \
                (too little evidence is never a failure)",
        green_error_rate: 0.0,
        green_latency: Duration::ZERO,
        rate: Some(20.0),
        max_time: Duration::from_secs(15),
        expect: Expect::Holds,
    },
];

pub fn config_text(blue: SocketAddr, green: SocketAddr, state: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [state]\ndir = \"{}\"\n\n[[route]]\nname = \"{ROUTE}\"\n\
         [route.blue]\nendpoints = [\"{blue}\"]\nversion = \"v1\"\n\
         [route.green]\nendpoints = [\"{green}\"]\nversion = \"v2\"\n\
         [route.sticky]\nby = \"header:x-user\"\n{POLICY}",
        state.display()
    )
}

/// The decision, once there is one.
fn decided(state: &RolloutState) -> Option<&'static str> {
    match state.phase {
        Phase::RolledBack => Some("rolled_back"),
        Phase::Idle if state.stable == Slot::Green => Some("promoted"),
        _ => None,
    }
}

pub async fn run(scenario: &Scenario, default_rate: f64) -> anyhow::Result<Report> {
    let rate = scenario.rate.unwrap_or(default_rate);
    let blue = Upstream::builder("blue").start().await?;
    let green = Upstream::builder("green")
        .error_rate(scenario.green_error_rate)
        .latency(scenario.green_latency)
        .start()
        .await?;
    let state = report::state_dir(scenario.name);
    let text = config_text(blue.addr, green.addr, &state);
    let config = veer::config::parse(&text, None).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    let running = veer::app::start(config, None).await?;
    let proxy = *running.proxy_addrs.first().context("no listener")?;
    {
        let table = running.app.table.load_full();
        let route = table.route(ROUTE).context("route missing")?;
        veer::rollout::act(&route.shared, &route.config, Action::Start, "load test")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let load = crate::start_load(proxy, rate, scenario.max_time + TAIL);
    let start = load.start;
    let mut sampler = Sampler::default();
    let mut points = Vec::new();
    let mut decision: Option<(&'static str, Duration)> = None;
    let mut tick = tokio::time::interval_at(start + PERIOD, PERIOD);
    let last_state = loop {
        tick.tick().await;
        let t = start.elapsed();
        let table = running.app.table.load_full();
        let route = table.route(ROUTE).context("route missing")?;
        points.push(sampler.sample(route, t));
        let view = route.shared.rollout.view();
        if decision.is_none() {
            decision = decided(&view.state).map(|d| (d, t));
        }
        let end = decision.map_or(scenario.max_time, |(_, at)| at + TAIL);
        if t >= end {
            break view.state;
        }
    };
    let samples = load.finish().await.context("load task")?;
    series::attach_client(&mut points, &samples, Duration::ZERO);
    running.shutdown().await;
    let observed = match decision {
        Some((d, _)) => d.to_string(),
        None if last_state.phase == Phase::Ramping && last_state.step == 0 => {
            "held at step 1".into()
        }
        None => format!(
            "{} at step {}",
            last_state.phase.as_str(),
            last_state.step + 1
        ),
    };
    let decisions = report::decisions(&state);
    let _ = std::fs::remove_dir_all(&state);
    let expected = scenario.expect.as_str();
    Ok(Report {
        name: scenario.name,
        about: scenario.about,
        config: json!({
            "policy": POLICY,
            "sticky": "header:x-user",
            "load": {"rate": rate, "users": crate::USERS, "open_loop": true,
                     "max_time_s": scenario.max_time.as_secs_f64()},
            "green": {"error_rate": scenario.green_error_rate,
                      "added_latency_ms": scenario.green_latency.as_secs_f64() * 1000.0},
        }),
        outcome: Outcome {
            ok: observed == expected,
            expected: expected.to_string(),
            observed,
            decided_after_s: decision.map(|(_, at)| at.as_secs_f64()),
            details: json!({
                "final_weight": points.last().map(|p| p.weight),
                "final_phase": points.last().map(|p| p.phase),
                "upstream_requests": {"blue": blue.request_count(), "green": green.request_count()},
            }),
        },
        panels: report::rollout_panels(&points),
        marks: report::phase_marks(&points),
        samples,
        points,
        decisions,
    })
}
