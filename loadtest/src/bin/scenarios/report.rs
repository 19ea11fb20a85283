//! What every scenario writes: `<name>.json` (outcome, client summary, decisions, series) and
//! `<name>.svg` (canary weight, error rate and p99 over time).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use veer::Slot;
use veer_loadtest::chart::{self, Line, Mark, Panel};
use veer_loadtest::load::{self, Sample};
use veer_loadtest::series::{self, Point};

/// How a scenario ended, against what it expected.
pub struct Outcome {
    pub expected: String,
    pub observed: String,
    pub ok: bool,
    /// Seconds from the start of the load to the decision, if one was taken.
    pub decided_after_s: Option<f64>,
    /// Scenario-specific figures.
    pub details: Value,
}

/// Everything a scenario produced.
pub struct Report {
    pub name: &'static str,
    pub about: &'static str,
    pub config: Value,
    pub outcome: Outcome,
    pub samples: Vec<Sample>,
    pub points: Vec<Point>,
    pub decisions: Vec<Value>,
    pub panels: Vec<Panel>,
    pub marks: Vec<Mark>,
}

/// A fresh state dir for one scenario, under the system temp dir.
pub fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("veer-loadtest-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The decision journal lines of a state dir.
pub fn decisions(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(state.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Client figures over a whole run: all requests, then per slot.
pub fn client_summary(samples: &[Sample]) -> Value {
    let part = |filter: &dyn Fn(&&Sample) -> bool| {
        let chosen: Vec<&Sample> = samples.iter().filter(filter).collect();
        json!({
            "requests": chosen.len(),
            "error_rate": series::round(load::error_rate(chosen.iter().copied()), 5),
            "p50_ms": series::round(load::quantile_ms(chosen.iter().copied(), 0.5), 3),
            "p99_ms": series::round(load::quantile_ms(chosen.iter().copied(), 0.99), 3),
            "max_ms": series::round(load::quantile_ms(chosen.iter().copied(), 1.0), 3),
        })
    };
    json!({
        "all": part(&|_| true),
        "blue": part(&|s| s.slot == Some(Slot::Blue)),
        "green": part(&|s| s.slot == Some(Slot::Green)),
        "no_answer": samples.iter().filter(|s| s.slot.is_none()).count(),
    })
}

/// The usual three panels: canary weight, per-slot error rate and per-slot p99 (client side).
pub fn rollout_panels(points: &[Point]) -> Vec<Panel> {
    let share = points.iter().map(|p| (p.t, p.green_share)).collect();
    let per_slot = |value: &dyn Fn(&Point, usize) -> f64| {
        [(Slot::Blue, chart::BLUE), (Slot::Green, chart::GREEN)]
            .into_iter()
            .map(|(slot, colour)| Line {
                name: slot.as_str().to_string(),
                colour,
                points: points
                    .iter()
                    .filter(|p| p.client[slot.index()].requests > 0)
                    .map(|p| (p.t, value(p, slot.index())))
                    .collect(),
            })
            .collect()
    };
    vec![
        Panel {
            title: "share of users on green (the canary until promoted)".into(),
            y_label: "% of users".into(),
            lines: vec![Line {
                name: "green".into(),
                colour: chart::GREEN,
                points: share,
            }],
        },
        Panel {
            title: "error rate per slot (client, per 500 ms)".into(),
            y_label: "%".into(),
            lines: per_slot(&|p, i| p.client[i].error_rate * 100.0),
        },
        Panel {
            title: "p99 latency per slot (client, from the due time, per 500 ms)".into(),
            y_label: "ms".into(),
            lines: per_slot(&|p, i| p.client[i].p99_ms),
        },
    ]
}

/// A mark wherever the phase, the stable slot or the weight changed.
pub fn phase_marks(points: &[Point]) -> Vec<Mark> {
    points
        .windows(2)
        .filter(|w| {
            w[0].phase != w[1].phase || w[0].stable != w[1].stable || w[0].weight != w[1].weight
        })
        .map(|w| {
            let p = &w[1];
            let label = if p.stable != w[0].stable {
                format!("promoted: {} stable", p.stable)
            } else {
                format!("{} {}%", p.phase.replace('_', " "), p.weight)
            };
            Mark { t: p.t, label }
        })
        .collect()
}

/// Writes `<out>/<name>.json` and `<out>/<name>.svg`.
pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let o = &report.outcome;
    let json = json!({
        "scenario": report.name,
        "about": report.about,
        "config": report.config,
        "outcome": {
            "expected": o.expected,
            "observed": o.observed,
            "ok": o.ok,
            "decided_after_s": o.decided_after_s.map(|s| series::round(s, 2)),
            "details": o.details,
        },
        "client": client_summary(&report.samples),
        "decisions": report.decisions,
        "series_period_ms": series::PERIOD.as_millis(),
        "series": series::to_json(&report.points),
    });
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(out.join(format!("{}.json", report.name)), text + "\n")?;
    let t_max = report.points.last().map_or(1.0, |p| p.t);
    let verdict = if o.ok {
        "as expected"
    } else {
        "NOT as expected"
    };
    let title = if o.observed.len() <= 40 {
        format!("{}: {} ({verdict})", report.name, o.observed)
    } else {
        format!("{}: {verdict}", report.name)
    };
    chart::write_svg(
        &out.join(format!("{}.svg", report.name)),
        &title,
        &report.panels,
        &report.marks,
        t_max,
    )
}
