//! The route status JSON of SPEC §4.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::metrics::{ErrorKind, WindowStats};
use crate::routing::Route;
use crate::Slot;

/// One route: slots, versions, split, phase, per-slot live stats over the last 60 s, shadow
/// counters, the last analysis.
pub fn route_json(route: &Route) -> Value {
    let shared = &route.shared;
    let view = shared.rollout.view();
    let split = view.state.split();
    let config = &route.config;
    let slots: serde_json::Map<String, Value> = Slot::BOTH
        .iter()
        .map(|&slot| {
            (
                slot.as_str().to_string(),
                window_json(&shared.slot_metrics(slot).last_60s()),
            )
        })
        .collect();
    let last_verdict = view.last.as_ref().map(|last| {
        let j = &last.judgement;
        json!({
            "at": last.at,
            "result": j.verdict.as_str(),
            "reason": j.reason,
            "canary": j.canary,
            "stable": j.stable,
            "error_test": j.error_test,
            "latency_test": j.latency_test,
        })
    });
    let waiting = (view.state.phase == crate::rollout::state::Phase::Ramping)
        .then_some(view.last.as_ref())
        .flatten()
        .filter(|last| last.judgement.verdict == crate::rollout::judge::Verdict::Hold)
        .map(|last| last.judgement.reason.clone());
    json!({
        "name": config.name,
        "hosts": config.hosts.iter().map(|h| match h {
            crate::config::HostPattern::Exact(h) => h.clone(),
            crate::config::HostPattern::Suffix(s) => format!("*{s}"),
        }).collect::<Vec<_>>(),
        "path_prefix": config.path_prefix,
        "stable": split.stable,
        "canary": split.canary(),
        "canary_weight": split.canary_percent(),
        "phase": view.state.phase.as_str(),
        "step": view.state.step_number(&config.rollout.steps),
        "steps": config.rollout.steps.iter().map(|&bp| percent_json(bp)).collect::<Vec<_>>(),
        "mode": match config.rollout.mode { crate::config::Mode::Auto => "auto", crate::config::Mode::Manual => "manual" },
        "failures": view.state.failures,
        "step_elapsed_s": view.step_elapsed.as_secs_f64(),
        "waiting": waiting,
        "versions": { "blue": config.blue.version, "green": config.green.version },
        "endpoints": { "blue": config.blue.endpoints, "green": config.green.endpoints },
        "slots": slots,
        "shadow": shadow_json(route),
        "rollouts": {
            "promoted": shared.rollout.promoted.load(Ordering::Relaxed),
            "rolled_back": shared.rollout.rolled_back.load(Ordering::Relaxed),
        },
        "last_verdict": last_verdict,
        // False while the state in `state.dir` is older than this one (its save failed; veer
        // tries again every interval): a restart now would restore the older one.
        "state_saved": view.unsaved.is_none(),
        "state_error": view.unsaved.as_deref(),
    })
}

fn window_json(w: &WindowStats) -> Value {
    let errors: serde_json::Map<String, Value> = ErrorKind::ALL
        .iter()
        .zip(w.errors_by_kind)
        .map(|(kind, n)| (kind.as_str().to_string(), json!(n)))
        .collect();
    json!({
        "requests": w.requests,
        "rps": round(w.rps(), 2),
        "error_rate": round(w.error_rate(), 6),
        "latency_ms": {
            "p50": round(w.quantile_ms(0.5), 3),
            "p90": round(w.quantile_ms(0.9), 3),
            "p99": round(w.quantile_ms(0.99), 3),
            "p999": round(w.quantile_ms(0.999), 3),
        },
        "errors": errors,
        "client_aborts": w.client_aborts,
        "window_s": round(w.elapsed.as_secs_f64(), 1),
    })
}

/// The shadow's counters; a route without a shadow has them too, at zero, with
/// `configured: false` (so that readers of SPEC's fields need no case of their own).
fn shadow_json(route: &Route) -> Value {
    let (configured, percent, compare) = match &route.config.shadow {
        Some(config) => (
            true,
            f64::from(config.basis_points) / 100.0,
            format!("{:?}", config.compare).to_lowercase(),
        ),
        None => (false, 0.0, "off".to_string()),
    };
    let s = &route.shared.shadow;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (matched, mismatched) = (get(&s.matched), get(&s.mismatched));
    let compared = matched + mismatched;
    json!({
        "configured": configured,
        "percent": percent,
        "compare": compare,
        "requests": get(&s.requests),
        "sent": get(&s.sent),
        "match": matched,
        "mismatch": mismatched,
        "mismatch_rate": if compared == 0 { 0.0 } else { mismatched as f64 / compared as f64 },
        "error": get(&s.errors),
        "dropped_busy": get(&s.dropped_busy),
        "dropped_body": get(&s.dropped_body),
        "in_flight": s.in_flight(),
        "recent_mismatches": s.recent(),
        "latency": window_json(&route.shared.shadow_metrics.last_60s()),
    })
}

/// A step's percent as SPEC writes steps: a whole percent as an integer (`10`), any other as a
/// decimal (`12.5`).
fn percent_json(bp: u32) -> Value {
    match bp % 100 {
        0 => json!(bp / 100),
        _ => json!(f64::from(bp) / 100.0),
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    if value.is_finite() {
        (value * scale).round() / scale
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_percent_steps_are_integers_and_others_decimals() {
        let steps: Vec<Value> = [1000, 1250, 1, 10_000].map(percent_json).to_vec();
        assert_eq!(Value::from(steps).to_string(), "[10,12.5,0.01,100]");
    }
}
