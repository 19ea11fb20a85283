//! A route's state sampled at a fixed period from the running process (canary weight, phase,
//! and per-slot requests, error rate and p99 over the last period from veer's own telemetry),
//! merged with the client's measurements of the same periods.

use std::time::Duration;

use serde_json::{json, Value};
use veer::metrics::Totals;
use veer::routing::Route;
use veer::Slot;

use crate::load::{self, Sample};

/// How often the series is sampled.
pub const PERIOD: Duration = Duration::from_millis(500);

/// One slot over one period.
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotStats {
    pub requests: u64,
    pub error_rate: f64,
    pub p99_ms: f64,
}

impl SlotStats {
    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "error_rate": round(self.error_rate, 5),
            "p99_ms": round(self.p99_ms, 3),
        })
    }
}

/// One sample: the state at `t` and what happened in the period before it.
#[derive(Clone, Debug)]
pub struct Point {
    /// Seconds since the start of the scenario.
    pub t: f64,
    /// The canary's weight (the canary is the slot that is not `stable`).
    pub weight: f64,
    pub stable: Slot,
    /// Share of users on green, whichever slot is stable.
    pub green_share: f64,
    pub phase: &'static str,
    pub step: usize,
    /// Per slot (blue, green), as veer recorded it (upstream latency).
    pub veer: [SlotStats; 2],
    /// Per slot (blue, green), as the client saw it (from the due time, see `load`).
    pub client: [SlotStats; 2],
    /// Every client request of the period, whichever slot answered.
    pub client_all: SlotStats,
    /// Scenario-specific figures (shadow counters, stage).
    pub extra: Value,
}

/// Samples one route, diffing veer's monotone totals between calls.
#[derive(Default)]
pub struct Sampler {
    previous: [Option<Totals>; 2],
}

impl Sampler {
    /// The route's state now; per-slot figures cover the time since the previous call.
    pub fn sample(&mut self, route: &Route, t: Duration) -> Point {
        let view = route.shared.rollout.view();
        let split = view.state.split();
        let mut veer = [SlotStats::default(); 2];
        for slot in Slot::BOTH {
            let now = route.shared.slot_metrics(slot).totals();
            let previous = self.previous[slot.index()].replace(now.clone());
            veer[slot.index()] = delta(&now, previous.as_ref());
        }
        Point {
            t: t.as_secs_f64(),
            weight: split.canary_percent(),
            stable: split.stable,
            green_share: match split.stable {
                Slot::Green => 100.0 - split.canary_percent(),
                Slot::Blue => split.canary_percent(),
            },
            phase: view.state.phase.as_str(),
            step: view.state.step,
            veer,
            client: [SlotStats::default(); 2],
            client_all: SlotStats::default(),
            extra: Value::Null,
        }
    }
}

fn delta(now: &Totals, previous: Option<&Totals>) -> SlotStats {
    let (requests, errors, histogram) = match previous {
        Some(p) => {
            let mut h = now.histogram.clone();
            let _ = h.subtract(&p.histogram);
            (
                now.requests().saturating_sub(p.requests()),
                now.errors().saturating_sub(p.errors()),
                h,
            )
        }
        None => (now.requests(), now.errors(), now.histogram.clone()),
    };
    SlotStats {
        requests,
        error_rate: if requests == 0 {
            0.0
        } else {
            (errors as f64 / requests as f64).min(1.0)
        },
        p99_ms: if histogram.is_empty() {
            0.0
        } else {
            histogram.value_at_quantile(0.99) as f64 / 1000.0
        },
    }
}

/// Fills each point's client figures from the samples due in the period before it; `offset`
/// is added to the samples' due times (a stage that started later than the scenario).
pub fn attach_client(points: &mut [Point], samples: &[Sample], offset: Duration) {
    for point in points.iter_mut() {
        let end = Duration::from_secs_f64(point.t);
        let begin = end.saturating_sub(PERIOD);
        let in_period: Vec<&Sample> = samples
            .iter()
            .filter(|s| (begin..end).contains(&(offset + s.due)))
            .collect();
        if in_period.is_empty() {
            continue;
        }
        point.client_all = stats(in_period.iter().copied());
        for slot in Slot::BOTH {
            point.client[slot.index()] =
                stats(in_period.iter().copied().filter(|s| s.slot == Some(slot)));
        }
    }
}

fn stats<'a>(samples: impl Iterator<Item = &'a Sample> + Clone) -> SlotStats {
    SlotStats {
        requests: samples.clone().count() as u64,
        error_rate: load::error_rate(samples.clone()),
        p99_ms: load::quantile_ms(samples, 0.99),
    }
}

/// The series as JSON: one object per point.
pub fn to_json(points: &[Point]) -> Value {
    Value::Array(
        points
            .iter()
            .map(|p| {
                json!({
                    "t": round(p.t, 3),
                    "canary_weight": p.weight,
                    "stable": p.stable.as_str(),
                    "green_share": p.green_share,
                    "phase": p.phase,
                    "step": p.step,
                    "veer": {"blue": p.veer[0].json(), "green": p.veer[1].json()},
                    "client": {
                        "blue": p.client[0].json(),
                        "green": p.client[1].json(),
                        "all": p.client_all.json(),
                    },
                    "extra": p.extra,
                })
            })
            .collect(),
    )
}

pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    if value.is_finite() {
        (value * scale).round() / scale
    } else {
        0.0
    }
}
