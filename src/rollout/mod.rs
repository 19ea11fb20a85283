//! The rollout controller: per route, judge canary against stable over the current step's
//! window every `interval`, and ramp, hold or revert.
//!
//! - `judge`: the pure verdict (stats in, verdict out).
//! - `state`: the state machine and its persistence.
//! - `journal`: the decision journal.
//!
//! All writers of a route's rollout state (this controller, the admin API, reloads) go through
//! [`act`], which applies one legal transition, moves the split, resets the step windows,
//! saves the state and writes the journal line.

pub mod journal;
pub mod judge;
pub mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Mode, RolloutConfig, RouteConfig, StateConfig};
use crate::metrics::{ErrorKind, WindowStats};
use crate::routing::{RouteShared, RoutingTable, Split};
use journal::{Entry, Journal};
use judge::{Evidence, Judgement, Policy, SlotEvidence, Verdict};
use state::{Action, Baseline, IllegalTransition, Phase, RolloutState, StateFiles};

/// Where rollout state and the journal are written.
#[derive(Debug)]
pub struct Store {
    pub files: StateFiles,
    pub journal: Journal,
}

impl Store {
    pub fn new(config: &StateConfig) -> Self {
        Self {
            files: StateFiles::new(&config.dir),
            journal: Journal::new(&config.dir),
        }
    }

    /// Creates the state dir and opens the journal, so that a dir that cannot be written is
    /// found at start rather than at the first save. The error names the path that failed.
    pub fn open(config: &StateConfig) -> Result<Self, (PathBuf, std::io::Error)> {
        let store = Self::new(config);
        let files = store.files.dir().to_path_buf();
        store.files.create_dir().map_err(|e| (files, e))?;
        let journal = store.journal.path().to_path_buf();
        store.journal.open().map_err(|e| (journal, e))?;
        Ok(store)
    }
}

/// The last analysis of a route, for the admin API.
#[derive(Clone, Debug)]
pub struct LastVerdict {
    pub at: String,
    pub judgement: Judgement,
}

struct Inner {
    state: RolloutState,
    step_started: Instant,
    /// When the slots' step windows began: at the step's start, and while no rollout is under
    /// way, at the last [`roll_idle_window`].
    window_started: Instant,
    last: Option<LastVerdict>,
    hold_warned: bool,
    /// Why the state in memory is not the one in `state.dir`: its last save failed. Saved
    /// again at every look of the controller and at shutdown until it is.
    unsaved: Option<Arc<str>>,
}

/// A route's rollout state, shared by the controller, the admin API and reloads.
pub struct RouteRollout {
    inner: Mutex<Inner>,
    store: Option<Arc<Store>>,
    pub promoted: AtomicU64,
    pub rolled_back: AtomicU64,
    /// Failed saves of the state file, and journal lines that could not be written.
    pub state_write_errors: AtomicU64,
    pub journal_write_errors: AtomicU64,
}

/// A read-only view for the admin API and metrics.
#[derive(Clone, Debug)]
pub struct View {
    pub state: RolloutState,
    pub last: Option<LastVerdict>,
    pub step_elapsed: Duration,
    /// Why the state is not saved, when its last save failed.
    pub unsaved: Option<Arc<str>>,
}

impl RouteRollout {
    fn with_state(state: RolloutState, store: Option<Arc<Store>>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                state,
                step_started: Instant::now(),
                window_started: Instant::now(),
                last: None,
                hold_warned: false,
                unsaved: None,
            }),
            store,
            promoted: AtomicU64::new(0),
            rolled_back: AtomicU64::new(0),
            state_write_errors: AtomicU64::new(0),
            journal_write_errors: AtomicU64::new(0),
        }
    }

    /// Fresh state from the config, never saved (tests and tools).
    pub fn detached(config: &RouteConfig) -> Self {
        Self::with_state(initial_state(config), None)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-written (every write
        // replaces it whole), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn view(&self) -> View {
        let inner = self.lock();
        View {
            state: inner.state.clone(),
            last: inner.last.clone(),
            step_elapsed: inner.step_started.elapsed(),
            unsaved: inner.unsaved.clone(),
        }
    }

    /// Writes the state to `state.dir`. A failure is logged once, counted, shown by the API,
    /// and the write is tried again by [`save_if_unsaved`] until it succeeds: else a restart
    /// would restore an older state (a rollback undone, a canary back at its weight).
    fn save(&self, name: &str, inner: &mut Inner) {
        let Some(store) = &self.store else {
            return;
        };
        match store.files.save(name, &inner.state) {
            Ok(()) => {
                if inner.unsaved.take().is_some() {
                    info!(route = %name, "Rollout state saved again.");
                }
            }
            Err(error) => {
                self.state_write_errors.fetch_add(1, Ordering::Relaxed);
                if inner.unsaved.is_none() {
                    warn!(route = %name, %error, "Cannot save rollout state; trying again every interval and at shutdown. A restart now would restore an older state.");
                }
                inner.unsaved = Some(error.to_string().into());
            }
        }
    }
}

/// Saves a route's state again if its last save failed; the state it leaves in `state.dir`
/// (false: still not saved).
pub fn save_if_unsaved(shared: &RouteShared) -> bool {
    let mut inner = shared.rollout.lock();
    if inner.unsaved.is_some() {
        shared.rollout.save(&shared.name, &mut inner);
    }
    inner.unsaved.is_none()
}

/// A route's first state: all traffic on `stable`. A manual route's weight is then applied by
/// [`reconcile`], as any weight from the config is, and journaled.
fn initial_state(config: &RouteConfig) -> RolloutState {
    RolloutState::new(config.stable, 0, versions(config))
}

fn versions(config: &RouteConfig) -> [String; 2] {
    [config.blue.version.clone(), config.green.version.clone()]
}

/// Long-lived state for a route appearing in the config: restored from `state.dir` when saved
/// there, else from the config and saved at once, so that a restart keeps what this start chose
/// (`stable` is read at a route's first start only). A corrupt file is set aside and reported.
pub fn restore(config: &RouteConfig, store: &Arc<Store>) -> Arc<RouteShared> {
    // `save`: a state this start chose or mended, saved at once.
    let (state, save) = match store.files.load(&config.name) {
        Ok(Some(mut state)) => {
            // Taken as it is, a rolled-back route could serve its canary.
            let mended = state.repair();
            if let Some(mended) = mended {
                warn!(route = %config.name, mended, "Rollout state file holds a weight veer never writes; mended.");
            }
            info!(route = %config.name, phase = state.phase.as_str(), weight = state.split().canary_percent(), "Rollout state restored.");
            if state.stable != config.stable {
                info!(route = %config.name, stable = %state.stable, config = %config.stable, "The stable slot is the restored one: the config's `stable` applies at a route's first start only.");
            }
            (state, mended.is_some())
        }
        loaded => {
            if let Err(error) = loaded {
                warn!(route = %config.name, %error, "Rollout state unreadable; starting fresh.");
            }
            (initial_state(config), true)
        }
    };
    let split = state.split();
    let rollout = RouteRollout::with_state(state, Some(Arc::clone(store)));
    if save {
        rollout.save(&config.name, &mut rollout.lock());
    }
    Arc::new(RouteShared::new(config.name.clone(), split, rollout))
}

/// Applies one transition: moves the split, resets the step window when the step or weight
/// changes, saves the state, journals it.
pub fn act(
    shared: &RouteShared,
    config: &RouteConfig,
    action: Action,
    reason: &str,
) -> Result<RolloutState, IllegalTransition> {
    if config.rollout.mode == Mode::Manual && matches!(action, Action::Start | Action::Resume) {
        return Err(IllegalTransition::Manual {
            action: action.as_str(),
        });
    }
    let mut inner = shared.rollout.lock();
    let next = inner.state.apply(action, &config.rollout.steps)?;
    let why = Why {
        action: action.as_str(),
        reason,
        judgement: None,
    };
    commit(shared, &mut inner, next, &config.rollout, why);
    Ok(inner.state.clone())
}

/// What a transition is called in the log and the journal, and why it happens.
struct Why<'a> {
    action: &'static str,
    reason: &'a str,
    judgement: Option<&'a Judgement>,
}

fn commit(
    shared: &RouteShared,
    inner: &mut Inner,
    mut next: RolloutState,
    policy: &RolloutConfig,
    why: Why<'_>,
) {
    let Why {
        action,
        reason,
        judgement,
    } = why;
    let steps = &policy.steps;
    // A step index changed alone (steps changed by a reload) moves nobody: the step goes on.
    // A start always begins a fresh step, even at the weight the route had (a new canary
    // version at the first step).
    let moved = inner.state.canary_bp != next.canary_bp
        || inner.state.stable != next.stable
        || inner.state.phase != next.phase
        || action == "start";
    // The same stable version still serving: its figures stay a fair baseline.
    let same_stable = inner.state.stable == next.stable
        && inner.state.versions[next.stable.index()] == next.versions[next.stable.index()];
    if !same_stable {
        next.baseline = None;
    }
    // Another canary build from now on (a start, a new version label on the canary slot, a
    // rollback): the canary's requests in flight are the last build's, and count in no step
    // window when they end. (Stable's build does not change: its late answers count on, and a
    // promotion's next rollout begins with a start.)
    let canary = inner.state.canary();
    let new_canary = action == "start"
        || inner.state.versions[canary.index()] != next.versions[canary.index()]
        || (next.phase == Phase::RolledBack && inner.state.phase != Phase::RolledBack);
    if new_canary {
        shared.slot_metrics(canary).next_epoch();
    }
    if moved {
        // Read and reset in one go, so that nothing recorded in between is lost to both steps.
        let window = shared.slot_metrics(inner.state.stable).take_step();
        shared.slot_metrics(inner.state.stable.other()).reset_step();
        // Only a step in which stable served everyone not on the canary: at 100 % it serves
        // only requests the override header sends there.
        let served = inner.state.canary_bp < 10_000;
        if same_stable && served {
            // A start from idle takes the figures kept while no rollout was under way (see
            // `roll_idle_window`), which the new state dropped with the last rollout's. (A
            // start over for a new canary label keeps nothing of the withdrawn rollout's.)
            let after_idle =
                action == "start" && matches!(inner.state.phase, Phase::Idle | Phase::RolledBack);
            let kept = if after_idle {
                inner.state.baseline.clone()
            } else {
                next.baseline.clone()
            };
            match next_baseline(&window, kept.as_deref(), policy) {
                Some(baseline) => next.baseline = Some(Arc::new(baseline)),
                None if after_idle => next.baseline = kept,
                None => {}
            }
        }
    }
    let prev = std::mem::replace(&mut inner.state, next);
    let state = &inner.state;
    // A new rollout, or a new canary: the last verdict was about another one. A rollout ended
    // by hand (promote, rollback, a weight from the config): the controller's last look, often
    // a hold, no longer says where the route stands.
    let canary = state.canary().index();
    let ended_by_hand = judgement.is_none()
        && prev.phase != state.phase
        && (matches!(state.phase, Phase::Idle | Phase::RolledBack)
            || (prev.phase == Phase::Ramping && action == "weight"));
    if action == "start" || prev.versions[canary] != state.versions[canary] || ended_by_hand {
        inner.last = None;
    }
    if moved {
        inner.step_started = Instant::now();
        inner.window_started = inner.step_started;
        inner.hold_warned = false;
        shared.split.store(state.split());
    }
    if prev.stable != state.stable {
        shared.rollout.promoted.fetch_add(1, Ordering::Relaxed);
    }
    if state.phase == Phase::RolledBack && prev.phase != Phase::RolledBack {
        shared.rollout.rolled_back.fetch_add(1, Ordering::Relaxed);
    }
    let from_split = prev.split();
    let to_split = state.split();
    if moved {
        info!(
            route = %shared.name,
            action,
            from = prev.phase.as_str(),
            to = state.phase.as_str(),
            weight_from = from_split.canary_percent(),
            weight_to = to_split.canary_percent(),
            stable = %state.stable,
            reason,
            "Rollout changed."
        );
    }
    shared.rollout.save(&shared.name, inner);
    let Some(store) = &shared.rollout.store else {
        return;
    };
    let state = &inner.state;
    let entry = Entry {
        at: journal::now_rfc3339(),
        route: &shared.name,
        // An operator's action is a transition even when it changes nothing (a hand-set
        // weight equal to the current one).
        event: match (moved, action) {
            (false, "reload") => "reload",
            (false, "analysis" | "hold") => "analysis",
            _ => "transition",
        },
        action,
        from: prev.phase.as_str(),
        to: state.phase.as_str(),
        stable: state.stable.as_str(),
        weight_from: from_split.canary_percent(),
        weight_to: to_split.canary_percent(),
        step: state.step_number(steps),
        // A failing analysis counts itself, also the one that rolls back (after which the
        // state's count is 0 again).
        failures: match judgement.map(|j| &j.verdict) {
            Some(Verdict::Fail | Verdict::Abort) => prev.failures.saturating_add(1),
            _ => state.failures,
        },
        reason,
        judgement,
    };
    if let Err(error) = store.journal.append(&entry) {
        shared
            .rollout
            .journal_write_errors
            .fetch_add(1, Ordering::Relaxed);
        warn!(route = %shared.name, %error, "Cannot append to the journal; this entry is lost.");
    }
}

/// Stable's figures for the 100 % step, from its window of the step just left (SPEC §3: the
/// previous step; an older window may come from before a change both versions share). When
/// that window has fewer samples than every test needs (`10 / (1 − q)` for the latency
/// quantile, 1,000 for p99, and `min_requests`), it is topped up with a proportional share of
/// the figures kept before it (themselves a blend in which older steps fade out): with too few
/// samples the latency test could never fail a canary at 100 %. `None` (keep what is kept)
/// when stable served nothing.
fn next_baseline(
    window: &WindowStats,
    kept: Option<&Baseline>,
    policy: &RolloutConfig,
) -> Option<Baseline> {
    if window.requests == 0 {
        return None;
    }
    let mut baseline = baseline_of(window, policy);
    let enough = judge::min_latency_samples(policy.latency_quantile)
        .unwrap_or(0)
        .max(policy.min_requests)
        .max(judge::MIN_TEST_REQUESTS);
    let Some(kept) = kept.filter(|k| k.requests > 0 && window.requests < enough) else {
        return Some(baseline);
    };
    let share = ((enough - window.requests) as f64 / kept.requests as f64).min(1.0);
    let part = |n: u64| (n as f64 * share).round() as u64;
    baseline.requests = baseline.requests.saturating_add(part(kept.requests));
    baseline.errors = baseline.errors.saturating_add(part(kept.errors));
    // Scaled on the running total, so that the rare slow values of the tail are kept in
    // proportion instead of rounding to nothing bucket by bucket.
    let mut total = 0;
    let mut taken = 0;
    for &(value, count) in &kept.latency_us {
        total = u64::saturating_add(total, count);
        let upto = part(total);
        if upto > taken {
            baseline.latency_us.push((value, upto - taken));
            taken = upto;
        }
    }
    Some(baseline)
}

fn baseline_of(window: &WindowStats, policy: &RolloutConfig) -> Baseline {
    Baseline {
        requests: window.requests,
        errors: window.errors,
        latency_us: window
            .histogram
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
        error_statuses: Some(policy.error_statuses),
    }
}

fn baseline_histogram(baseline: &Baseline) -> Histogram<u64> {
    let mut histogram = crate::metrics::empty_histogram();
    for &(value, count) in &baseline.latency_us {
        crate::metrics::record_micros_n(&mut histogram, value, count);
    }
    histogram
}

/// Brings a route's rollout state in line with a (new or reloaded) config, as a restart with
/// that config would: see [`manual_weight`] and [`new_canary`].
pub fn reconcile(shared: &RouteShared, config: &RouteConfig, previous: Option<&RouteConfig>) {
    let mut inner = shared.rollout.lock();
    if previous.is_some_and(|p| p.stable != config.stable) && inner.state.stable != config.stable {
        info!(route = %config.name, stable = %inner.state.stable, config = %config.stable, "The config's `stable` changed; it applies at a route's first start only: the stable slot stays (promote to swap the roles).");
    }
    let mut next = inner.state.clone();
    next.versions = versions(config);
    // Steps changed by a reload: show the step at or above the current weight (the weight
    // itself stays; the next pass moves to the first step above it).
    if next.phase == Phase::Ramping {
        next.step = state::step_at_or_above(&config.rollout.steps, next.canary_bp);
    }
    let change = match config.rollout.mode {
        Mode::Manual => manual_weight(&mut next, &inner.state, config, previous),
        Mode::Auto => {
            next.config_weight = None;
            new_canary(&mut next, &inner.state, &config.rollout.steps)
        }
    };
    // Stable's kept figures counted errors by other `error_statuses`: a canary that errs as
    // stable does would look worse (or better) than it is.
    let recounted = next.baseline.as_ref().is_some_and(|baseline| {
        baseline
            .error_statuses
            .is_some_and(|counted| counted != config.rollout.error_statuses)
    });
    if recounted {
        next.baseline = None;
    }
    let (action, reason) = change.unwrap_or_else(|| {
        let reason = if recounted {
            "error_statuses changed: stable's figures kept for the 100 % step counted errors \
             otherwise and are dropped"
        } else {
            "version labels or steps changed by a reload"
        };
        ("reload", reason.to_string())
    });
    if next == inner.state {
        return;
    }
    let noted_only = RolloutState {
        config_weight: inner.state.config_weight,
        ..next.clone()
    } == inner.state;
    if noted_only {
        // Only the record of the config's weight: nothing moved, nothing to journal.
        inner.state.config_weight = next.config_weight;
        shared.rollout.save(&config.name, &mut inner);
    } else {
        let why = Why {
            action,
            reason: &reason,
            judgement: None,
        };
        commit(shared, &mut inner, next, &config.rollout, why);
    }
}

/// Manual mode: the config's weight applies when a reload changes it, when a reload turns the
/// route manual, and at start when it is not the one applied last (or the route was not manual
/// then): a restart keeps a weight set by hand or a rollback since, as a reload does. A rollout
/// the controller no longer ramps stops there, even at the weight it had.
fn manual_weight(
    next: &mut RolloutState,
    current: &RolloutState,
    config: &RouteConfig,
    previous: Option<&RouteConfig>,
) -> Option<(&'static str, String)> {
    let weight = config.rollout.weight;
    next.config_weight = Some(weight);
    // At start, a rollout under way shows a route that was auto; a state without a weight
    // applied (fresh, or from an older release) gets the config's as a changed one.
    let (turned_manual, changed) = match previous {
        Some(p) => (p.rollout.mode != Mode::Manual, p.rollout.weight != weight),
        None => (
            current.phase == Phase::Ramping,
            current.config_weight != Some(weight),
        ),
    };
    if !(turned_manual || changed) || (next.canary_bp == weight && next.phase != Phase::Ramping) {
        return None;
    }
    next.canary_bp = weight;
    next.phase = if weight > 0 {
        Phase::Paused
    } else {
        Phase::Idle
    };
    next.step = 0;
    next.failures = 0;
    let reason = if turned_manual {
        "mode changed to manual: the config's weight applies"
    } else {
        "manual weight from the config"
    };
    Some(("weight", reason.to_string()))
}

/// Auto mode: a new version label on the canary slot starts a rollout. During one the old
/// canary leaves at once. Ramping, the new one starts over as from idle: first step, fresh
/// step clock and window, and not the last rollout's kept baseline. Paused, it gets no
/// traffic (weight 0, still paused: nothing would analyse it) until `resume` starts it at the
/// first step. A new label on the stable slot starts nothing.
fn new_canary(
    next: &mut RolloutState,
    current: &RolloutState,
    steps: &[u32],
) -> Option<(&'static str, String)> {
    let canary = current.canary();
    let (was, now) = (
        &current.versions[canary.index()],
        &next.versions[canary.index()],
    );
    if was == now {
        return None;
    }
    // Rollback is legal while ramping or paused; idle or rolled back, nothing is to withdraw.
    let mut withdrawn = next
        .apply(Action::Rollback, steps)
        .unwrap_or_else(|_| next.clone());
    withdrawn.baseline = None;
    let start =
        |reason: String| Some(("start", withdrawn.apply(Action::Start, steps).ok()?, reason));
    let (action, state, reason) = match current.phase {
        Phase::Idle | Phase::RolledBack => start("new version label on the idle slot".into())?,
        Phase::Ramping => start(format!(
            "new version on the canary slot during a rollout ({canary} {was} -> {now}): \
             starting over"
        ))?,
        Phase::Paused => (
            "weight",
            RolloutState {
                step: 0,
                ..withdrawn.apply(Action::SetWeight(0), steps).ok()?
            },
            format!(
                "new version on the canary slot during a paused rollout ({canary} {was} -> \
                 {now}): no traffic until resume, which starts it at the first step"
            ),
        ),
    };
    *next = state;
    Some((action, reason))
}

/// Policy for the judge from a route's config.
pub fn policy(config: &RouteConfig) -> Policy {
    let r = &config.rollout;
    Policy {
        min_step_time: r.min_step_time,
        min_requests: r.min_requests,
        error_rate_margin: r.error_rate_margin,
        confidence: r.confidence,
        max_error_rate: r.max_error_rate,
        latency_quantile: r.latency_quantile,
        max_latency_ratio: r.max_latency_ratio,
        min_latency_delta: r.min_latency_delta,
    }
}

/// One analysis of one route: judge, then ramp, hold or revert.
pub fn analyse(shared: &RouteShared, config: &RouteConfig) {
    analyse_if(shared, config, || true);
}

/// [`analyse`], when `current` (asked under the route's lock) says `config` is still the
/// route's.
fn analyse_if(shared: &RouteShared, config: &RouteConfig, current: impl FnOnce() -> bool) {
    if config.rollout.mode != Mode::Auto {
        return;
    }
    let mut inner = shared.rollout.lock();
    if !current() {
        return;
    }
    if inner.state.phase != Phase::Ramping {
        roll_idle_window(shared, &mut inner, &config.rollout);
        return;
    }
    let split: Split = inner.state.split();
    let canary = shared.slot_metrics(split.canary()).step();
    let full = split.canary_bp >= 10_000;
    // At 100 % stable serves nothing: the canary is judged against the kept baseline.
    let frozen = full && inner.state.baseline.is_some();
    let (stable_requests, stable_errors, stable_latency) = match &inner.state.baseline {
        Some(baseline) if frozen => (
            baseline.requests,
            baseline.errors,
            baseline_histogram(baseline),
        ),
        _ => {
            let now = shared.slot_metrics(split.stable).step();
            (now.requests, now.errors, now.histogram)
        }
    };
    let step_elapsed = inner.step_started.elapsed();
    // Requests of this step still waiting for their answer, on both sides (a stall of a
    // dependency both versions share shows on both). At 100 % stable serves nothing.
    let canary_waiting = shared
        .slot_metrics(split.canary())
        .waiting(inner.step_started);
    let stable_waiting = match frozen {
        true => Vec::new(),
        false => shared
            .slot_metrics(split.stable)
            .waiting(inner.step_started),
    };
    let mut judgement = judge::judge(
        &policy(config),
        &Evidence {
            canary: SlotEvidence {
                requests: canary.requests,
                errors: canary.errors,
                latency_us: &canary.histogram,
                waiting: &canary_waiting,
            },
            stable: SlotEvidence {
                requests: stable_requests,
                errors: stable_errors,
                latency_us: &stable_latency,
                waiting: &stable_waiting,
            },
            stable_frozen: frozen,
            step_elapsed,
        },
    );
    judgement.canary.errors_by_kind = ErrorKind::ALL
        .iter()
        .zip(canary.errors_by_kind)
        .filter(|(_, count)| *count > 0)
        .map(|(kind, count)| (kind.as_str().to_string(), count))
        .collect();
    if full && inner.state.baseline.is_none() && judgement.verdict == Verdict::Hold {
        judgement.reason.push_str(
            "; at 100 % stable serves nothing and no stable figures from an earlier step are \
             kept: promote or roll back by hand",
        );
    }
    inner.last = Some(LastVerdict {
        at: journal::now_rfc3339(),
        judgement: judgement.clone(),
    });
    let steps = &config.rollout.steps;
    let state = inner.state.clone();
    let (next, action) = match judgement.verdict {
        Verdict::Abort => (state.apply(Action::Rollback, steps), "rollback"),
        Verdict::Fail if state.failures.saturating_add(1) >= config.rollout.failure_threshold => {
            (state.apply(Action::Rollback, steps), "rollback")
        }
        Verdict::Fail => {
            let mut next = state.clone();
            next.failures = next.failures.saturating_add(1);
            (Ok(next), "analysis")
        }
        Verdict::Pass => {
            let next = state.apply(Action::StepPassed, steps);
            // The last step's pass promotes the canary: journaled as a promotion, as one by
            // hand is (and as rollbacks of both kinds are), with the figures it was decided on.
            let promoted = matches!(&next, Ok(next) if next.phase == Phase::Idle);
            (next, if promoted { "promote" } else { "step_passed" })
        }
        Verdict::Hold => {
            let overdue = step_elapsed > config.rollout.max_step_time && !inner.hold_warned;
            if overdue {
                inner.hold_warned = true;
                warn!(route = %shared.name, reason = %judgement.reason, "Step is past max_step_time without a decision; holding.");
            }
            if state.failures == 0 && !overdue {
                return;
            }
            // Failures must be consecutive analyses: a hold breaks the run, saved and
            // journaled like any other change of the count (a restart must not resume it).
            // A step held past max_step_time is journaled once, with its evidence.
            let mut next = state.clone();
            next.failures = 0;
            (Ok(next), if overdue { "hold" } else { "analysis" })
        }
    };
    match next {
        Ok(next) => {
            let why = Why {
                action,
                reason: &judgement.reason,
                judgement: Some(&judgement),
            };
            commit(shared, &mut inner, next, &config.rollout, why);
        }
        Err(error) => warn!(route = %shared.name, %error, "Controller transition refused."),
    }
}

/// How long stable's figures gather while no rollout is under way before they are folded into
/// the kept baseline (see [`roll_idle_window`]).
const IDLE_WINDOW: Duration = Duration::from_secs(600);

/// While no rollout is under way (idle, or rolled back), every [`IDLE_WINDOW`] stable's step
/// window is folded into the kept baseline as a step's is when it ends ([`next_baseline`]:
/// taken alone when it has enough samples, else topped up from the older figures). A start
/// then takes as stable's figures the window since the last fold, topped up from recent ones:
/// without the folds its window ran from the last transition, hours or days of figures of
/// which the oldest may no longer say how stable serves (an endpoint moved, a dependency
/// changed).
fn roll_idle_window(shared: &RouteShared, inner: &mut Inner, policy: &RolloutConfig) {
    let idle = matches!(inner.state.phase, Phase::Idle | Phase::RolledBack);
    if !idle || inner.window_started.elapsed() < IDLE_WINDOW {
        return;
    }
    let stable = inner.state.stable;
    let window = shared.slot_metrics(stable).take_step();
    shared.slot_metrics(stable.other()).reset_step();
    inner.window_started = Instant::now();
    if let Some(baseline) = next_baseline(&window, inner.state.baseline.as_deref(), policy) {
        // Kept in memory: saved with the next change of the state (a restart keeps the one
        // saved last).
        inner.state.baseline = Some(Arc::new(baseline));
    }
}

/// The controller task: analyses every route at its own `interval`, forever.
pub async fn run(table: Arc<ArcSwap<RoutingTable>>) {
    let mut looks = Looks::default();
    loop {
        let snapshot = table.load_full();
        let now = Instant::now();
        looks.keep_only(|name| snapshot.route(name).is_some());
        for route in snapshot.routes() {
            if looks.is_due(&route.config.name, route.config.rollout.interval, now) {
                save_if_unsaved(&route.shared);
                // Not by the config of a table a reload is replacing: the reload brings the
                // state in line with the new config (under this lock) before it publishes it.
                analyse_if(&route.shared, &route.config, || route.is_current());
            }
        }
        tokio::time::sleep_until(looks.next(now)).await;
    }
}

/// The shortest `interval` the controller keeps (a shorter one is taken as this): each look
/// takes the route's lock and may write the journal.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The longest the controller sleeps: a route a reload added, or whose `interval` it changed,
/// is seen within this.
const PICK_UP: Duration = Duration::from_millis(100);

/// When each route, by name, is next analysed.
#[derive(Default)]
struct Looks {
    due: HashMap<String, Instant>,
}

impl Looks {
    /// Whether the route `name`, analysed every `interval`, is due at `now` (its first look
    /// is an `interval` after it is first seen); if so, its next look is set.
    fn is_due(&mut self, name: &str, interval: Duration, now: Instant) -> bool {
        let interval = interval.max(MIN_INTERVAL);
        let Some(next) = self.due.get_mut(name) else {
            self.due.insert(name.to_string(), now + interval);
            return false;
        };
        // An `interval` shortened by a reload counts from now.
        if now >= *next || *next > now + interval {
            let due = now >= *next;
            *next = now + interval;
            return due;
        }
        false
    }

    /// Forgets the routes `exists` does not know (removed by a reload).
    fn keep_only(&mut self, exists: impl Fn(&str) -> bool) {
        self.due.retain(|name, _| exists(name));
    }

    /// When to look again after `now`: the next route's look, within [`PICK_UP`].
    fn next(&self, now: Instant) -> Instant {
        let soonest = self.due.values().min().copied();
        soonest.map_or(now + PICK_UP, |at| at.min(now + PICK_UP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the controller's schedule from `start` until `until` after it, as `run` does, with
    /// `routes` (name, interval) present from the given offset on; the looks each got.
    fn looks_over(routes: &[(&str, u64, u64)], until: u64) -> Vec<(String, Vec<u64>)> {
        let start = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut looks = Looks::default();
        let mut seen: Vec<(String, Vec<u64>)> =
            routes.iter().map(|r| (r.0.to_string(), vec![])).collect();
        let mut now = start;
        while now <= start + ms(until) {
            for (i, &(name, interval, from)) in routes.iter().enumerate() {
                if now >= start + ms(from) && looks.is_due(name, ms(interval), now) {
                    seen[i].1.push((now - start).as_millis() as u64);
                }
            }
            now = looks.next(now);
        }
        seen
    }

    /// Each route is analysed every `interval`, to the millisecond (not on a coarser tick:
    /// 150 ms were looks every 200 ms); a route a reload adds is first looked at `interval`
    /// after the controller saw it, within 100 ms of its arrival.
    #[test]
    fn each_route_is_looked_at_every_interval() {
        let seen = looks_over(&[("a", 150, 0), ("b", 1000, 0), ("late", 300, 1250)], 2000);
        assert_eq!(
            seen[0].1,
            [150, 300, 450, 600, 750, 900, 1050, 1200, 1350, 1500, 1650, 1800, 1950]
        );
        assert_eq!(seen[1].1, [1000, 2000]);
        // An interval under 10 ms is taken as 10 ms.
        let fast = looks_over(&[("fast", 0, 0)], 50);
        assert_eq!(fast[0].1, [10, 20, 30, 40, 50]);
        // Seen at 1300 (the first look after 1250), looked at 300 ms later.
        assert_eq!(seen[2].1, [1600, 1900]);
    }

    /// A reload that shortens a route's interval takes effect from the next look of the
    /// controller, not after the longer interval; removed routes are forgotten.
    #[test]
    fn a_shortened_interval_counts_from_now() {
        let start = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut looks = Looks::default();
        assert!(!looks.is_due("a", ms(60_000), start));
        assert!(!looks.is_due("a", ms(200), start + ms(100)));
        assert!(looks.is_due("a", ms(200), start + ms(300)));
        looks.keep_only(|name| name != "a");
        assert_eq!(looks.next(start + ms(300)), start + ms(400));
        assert!(!looks.is_due("a", ms(200), start + ms(300)));
    }
}
