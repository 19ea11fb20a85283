//! `GET /metrics`: every family of SPEC §5, from the live state.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::app::App;
use crate::metrics::prometheus::{write_slot, Kind, PromWriter, LATENCY_BOUNDS};
use crate::rollout::state::Phase;
use crate::Slot;

pub fn render(app: &App) -> String {
    let mut w = PromWriter::new();
    let table = app.table.load();
    w.family(
        "veer_canary_weight_percent",
        Kind::Gauge,
        "Canary weight per route.",
    );
    w.family(
        "veer_rollout_phase",
        Kind::Gauge,
        "1 for the route's current rollout phase (promoted is a passage to idle: always 0).",
    );
    w.family(
        "veer_rollouts_total",
        Kind::Counter,
        "Finished rollouts by outcome.",
    );
    w.family(
        "veer_shadow_total",
        Kind::Counter,
        "Shadow requests by outcome.",
    );
    w.family(
        "veer_state_write_errors_total",
        Kind::Counter,
        "Failed writes to state.dir: the rollout state (tried again until saved) or a journal \
         line (lost).",
    );
    w.family(
        "veer_rollout_state_saved",
        Kind::Gauge,
        "0 while the route's rollout state in state.dir is older than the one in force.",
    );
    for route in table.routes() {
        let name = route.name();
        let shared = &route.shared;
        for slot in Slot::BOTH {
            // The version label comes with the counts (not from `route.config`), so that a
            // reload between the two reads cannot put one version's counts under another.
            let totals = shared.slot_metrics(slot).totals();
            write_slot(&mut w, name, slot.as_str(), &totals);
        }
        if route.config.shadow.is_some() {
            // Its own family: the per-slot ones count what clients were answered with.
            w.family(
                "veer_shadow_duration_seconds",
                Kind::Histogram,
                "Shadow upstream latency to the response head.",
            );
            w.histogram_seconds(
                "veer_shadow_duration_seconds",
                &[("route", name)],
                &shared.shadow_metrics.totals().histogram,
                LATENCY_BOUNDS,
            );
        }
        let view = shared.rollout.view();
        w.sample(
            "veer_canary_weight_percent",
            &[("route", name)],
            view.state.split().canary_percent(),
        );
        for phase in Phase::ALL {
            let value = if phase == view.state.phase { 1.0 } else { 0.0 };
            w.sample(
                "veer_rollout_phase",
                &[("route", name), ("phase", phase.as_str())],
                value,
            );
        }
        // A promotion is a passage, not a phase a route rests in: the canary becomes stable
        // and the route is `idle` again (counted by `veer_rollouts_total`). Its series is
        // there, always 0, so that every phase of the state machine can be queried.
        w.sample(
            "veer_rollout_phase",
            &[("route", name), ("phase", "promoted")],
            0.0,
        );
        w.sample(
            "veer_rollout_state_saved",
            &[("route", name)],
            if view.unsaved.is_none() { 1.0 } else { 0.0 },
        );
        for (file, counter) in [
            ("state", &shared.rollout.state_write_errors),
            ("journal", &shared.rollout.journal_write_errors),
        ] {
            let value = counter.load(Ordering::Relaxed) as f64;
            w.sample(
                "veer_state_write_errors_total",
                &[("route", name), ("file", file)],
                value,
            );
        }
        for (outcome, counter) in [
            ("promoted", &shared.rollout.promoted),
            ("rolled_back", &shared.rollout.rolled_back),
        ] {
            let value = counter.load(Ordering::Relaxed) as f64;
            w.sample(
                "veer_rollouts_total",
                &[("route", name), ("outcome", outcome)],
                value,
            );
        }
        if let Some(shadow) = &route.config.shadow {
            let s = &shared.shadow;
            let mut outcomes = vec![
                ("error", &s.errors),
                ("dropped_busy", &s.dropped_busy),
                ("dropped_body", &s.dropped_body),
            ];
            // The outcomes of the compare mode in force, and those a reload changed it from
            // (a counter series does not vanish while its count stands).
            let off = shadow.compare == crate::config::Compare::Off;
            let counted = |c: &AtomicU64| c.load(Ordering::Relaxed) > 0;
            if off || counted(&s.sent) {
                outcomes.push(("sent", &s.sent));
            }
            if !off || counted(&s.matched) || counted(&s.mismatched) {
                outcomes.push(("match", &s.matched));
                outcomes.push(("mismatch", &s.mismatched));
            }
            for (outcome, counter) in outcomes {
                let value = counter.load(Ordering::Relaxed) as f64;
                w.sample(
                    "veer_shadow_total",
                    &[("route", name), ("outcome", outcome)],
                    value,
                );
            }
        }
    }
    w.family(
        "veer_config_reloads_total",
        Kind::Counter,
        "Config reloads by result.",
    );
    for (result, counter) in [
        ("applied", &app.reloads_applied),
        ("rejected", &app.reloads_rejected),
    ] {
        let value = counter.load(Ordering::Relaxed) as f64;
        w.sample("veer_config_reloads_total", &[("result", result)], value);
    }
    w.family(
        "veer_client_errors_total",
        Kind::Counter,
        "Requests veer refused itself for the client's fault, by status and reason.",
    );
    for (reason, status, count) in app.client_errors.counts() {
        let status = status.to_string();
        w.sample(
            "veer_client_errors_total",
            &[("status", &status), ("reason", reason)],
            count as f64,
        );
    }
    w.family(
        "veer_connections",
        Kind::Gauge,
        "Open downstream connections per listener.",
    );
    for (listener, gauge) in &app.connections {
        let value = gauge.load(Ordering::Relaxed) as f64;
        w.sample("veer_connections", &[("listener", listener)], value);
    }
    let not_after = app.tls_not_after.load(Ordering::Relaxed);
    if not_after != crate::app::NO_CERTIFICATE {
        w.family(
            "veer_tls_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the served TLS certificate expires, in Unix seconds.",
        );
        let value = not_after as f64;
        w.sample("veer_tls_certificate_expiry_timestamp_seconds", &[], value);
    }
    if let Some(log) = &app.access_log {
        w.family(
            "veer_access_log_dropped_total",
            Kind::Counter,
            "Access log lines dropped because the writer fell behind.",
        );
        let value = log.dropped.load(Ordering::Relaxed) as f64;
        w.sample("veer_access_log_dropped_total", &[], value);
    }
    w.finish()
}
