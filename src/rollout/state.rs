//! The rollout state machine of one route, and its persistence.
//!
//! Every transition goes through [`RolloutState::apply`], a pure function over a table of legal
//! moves; anything else is an [`IllegalTransition`] (409 in the admin API). The state is saved
//! atomically (write to a temporary file, fsync, rename) on every change.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::runtime::RuntimeFlavor;

use crate::config::StatusSet;
use crate::routing::Split;
use crate::Slot;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// All traffic on stable (or a manual weight of 0).
    Idle,
    /// Step `step` of the policy; the controller judges and advances.
    Ramping,
    /// Weight frozen (API/CLI, a hand-set weight, or a manual-mode weight).
    Paused,
    /// Canary at 0 after a failure or by hand, until `start` or a new version label.
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Idle,
        Phase::Ramping,
        Phase::Paused,
        Phase::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Ramping => "ramping",
            Phase::Paused => "paused",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// What can happen to a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Pause,
    Resume,
    Promote,
    Rollback,
    /// A weight set by hand (basis points): pauses the controller.
    SetWeight(u32),
    /// The current step passed its analysis.
    StepPassed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
            Action::Rollback => "rollback",
            Action::SetWeight(_) => "weight",
            Action::StepPassed => "step_passed",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        Some(match text {
            "start" => Action::Start,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "promote" => Action::Promote,
            "rollback" => Action::Rollback,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IllegalTransition {
    #[error("cannot {action} a rollout that is {phase}")]
    Phase {
        action: &'static str,
        phase: &'static str,
    },
    #[error(
        "cannot {action} a rollout in manual mode: the controller does not ramp it; set the \
         weight instead"
    )]
    Manual { action: &'static str },
}

/// Stable's figures from the last step in which it served traffic: the baseline at 100 %,
/// where stable gets none. Saved with the state, so that a restart, or a pause and resume at
/// 100 %, keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub requests: u64,
    pub errors: u64,
    /// Upstream latency in microseconds: `[value, count]` per recorded histogram bucket.
    pub latency_us: Vec<(u64, u64)>,
    /// The `error_statuses` its errors were counted by: with others, it compares no more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_statuses: Option<StatusSet>,
}

/// The persisted rollout state of one route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub stable: Slot,
    pub phase: Phase,
    /// Index into the policy's steps (meaningful while ramping or paused mid-rollout).
    pub step: usize,
    pub canary_bp: u32,
    /// Consecutive failing analyses in this step.
    pub failures: u32,
    /// Version labels last seen per slot (`[blue, green]`): a new label on the canary slot
    /// starts a rollout (over again, when one is under way).
    pub versions: [String; 2],
    /// Stable's baseline for the 100 % step (see [`Baseline`]); kept by the controller
    /// ([`RolloutState::apply`] only clears it when a rollout starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Arc<Baseline>>,
    /// Manual mode: the config's `weight` last applied. A restart applies the config's weight
    /// only when it differs from this one (or the route was not manual): a weight set by hand
    /// or a rollback since is kept, as a reload would keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_weight: Option<u32>,
}

impl RolloutState {
    pub fn new(stable: Slot, canary_bp: u32, versions: [String; 2]) -> Self {
        Self {
            stable,
            phase: if canary_bp > 0 {
                Phase::Paused
            } else {
                Phase::Idle
            },
            step: 0,
            canary_bp,
            failures: 0,
            versions,
            baseline: None,
            config_weight: None,
        }
    }

    /// Mends a weight the machine never leaves (a file edited by hand, or another program's):
    /// above 100 %, or on the canary while no rollout is under way. Everything else, the stable
    /// slot first of all, is kept. What was mended, if anything.
    pub fn repair(&mut self) -> Option<&'static str> {
        if self.canary_bp > 10_000 {
            self.canary_bp = 10_000;
            return Some("canary_bp above 10000 (100 %) set to 10000");
        }
        match self.phase {
            Phase::Idle | Phase::RolledBack if self.canary_bp != 0 => {
                self.canary_bp = 0;
                Some("canary_bp in phase idle or rolled_back set to 0")
            }
            _ => None,
        }
    }

    pub fn split(&self) -> Split {
        Split {
            stable: self.stable,
            canary_bp: self.canary_bp,
        }
    }

    pub fn canary(&self) -> Slot {
        self.stable.other()
    }

    /// The step as the admin API, the journal and the CLI show it: `i` for the i-th of `steps`
    /// (counting from 1) while ramping, or while paused at that step's weight (where `resume`
    /// goes on); 0 when no rollout is under way (idle, rolled back) or a hand-set weight is
    /// off the steps.
    pub fn step_number(&self, steps: &[u32]) -> usize {
        match self.phase {
            Phase::Ramping => self.step.saturating_add(1).min(steps.len()),
            Phase::Paused => steps
                .iter()
                .position(|&bp| bp == self.canary_bp)
                .map_or(0, |i| i + 1),
            Phase::Idle | Phase::RolledBack => 0,
        }
    }

    /// The legal moves. `steps` are the policy's canary weights (basis points, increasing,
    /// ending at 10000).
    pub fn apply(&self, action: Action, steps: &[u32]) -> Result<RolloutState, IllegalTransition> {
        let mut next = self.clone();
        let first = steps.first().copied().unwrap_or(10_000);
        match (self.phase, action) {
            (Phase::Idle | Phase::RolledBack, Action::Start) => {
                // A new rollout does not inherit the last one's baseline: the stable window
                // just before it (the idle time, with the figures folded while idle: see
                // `rollout::commit`) becomes the first one.
                next.baseline = None;
                next.phase = Phase::Ramping;
                next.step = 0;
                next.canary_bp = first;
                next.failures = 0;
            }
            (Phase::Ramping, Action::Pause) => next.phase = Phase::Paused,
            (Phase::Paused, Action::Resume) => {
                // Go on at the weight as it is (a weight set by hand is analysed before it
                // grows; the next pass moves to the first step above it), shown as the step
                // at or above it. At 0 the canary would get nothing to judge: the first step.
                if self.canary_bp == 0 {
                    next.canary_bp = first;
                }
                next.phase = Phase::Ramping;
                next.step = step_at_or_above(steps, next.canary_bp);
                next.failures = 0;
            }
            (Phase::Ramping | Phase::Paused, Action::Promote) => next.promote(),
            (Phase::Idle, Action::Promote) if self.canary_bp > 0 => next.promote(),
            (Phase::Ramping | Phase::Paused, Action::Rollback) => next.roll_back(),
            (Phase::Idle, Action::Rollback) if self.canary_bp > 0 => next.roll_back(),
            (_, Action::SetWeight(bp)) => {
                next.canary_bp = bp.min(10_000);
                next.phase = Phase::Paused;
                next.failures = 0;
            }
            (Phase::Ramping, Action::StepPassed) => {
                // The next step is the first weight above the current one (not index + 1: the
                // steps may have changed by a reload), so a passed step never lowers it.
                match steps.iter().position(|&bp| bp > self.canary_bp) {
                    Some(step) if self.canary_bp < 10_000 => {
                        next.step = step;
                        next.canary_bp = steps[step];
                        next.failures = 0;
                    }
                    _ => next.promote(),
                }
            }
            (phase, action) => {
                return Err(IllegalTransition::Phase {
                    action: action.as_str(),
                    phase: phase.as_str(),
                })
            }
        }
        Ok(next)
    }

    fn promote(&mut self) {
        self.stable = self.stable.other();
        self.canary_bp = 0;
        self.phase = Phase::Idle;
        self.step = 0;
        self.failures = 0;
    }

    fn roll_back(&mut self) {
        self.canary_bp = 0;
        self.phase = Phase::RolledBack;
        self.failures = 0;
    }
}

/// Where rollout states are saved: `state.dir/routes/<route>.json`.
#[derive(Debug)]
pub struct StateFiles {
    dir: PathBuf,
}

impl StateFiles {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("routes"),
        }
    }

    /// Creates `state.dir/routes` if it is not there.
    pub fn create_dir(&self) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)
    }

    /// `state.dir/routes`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.json"))
    }

    /// The saved state of a route. A missing file is `Ok(None)`; a corrupt or unreadable one
    /// is moved aside (`<route>.json.corrupt`) and reported, never a crash, and never written
    /// over: it may be the only record of a promotion.
    pub fn load(&self, route: &str) -> Result<Option<RolloutState>, StateError> {
        let path = self.path(route);
        let set_aside = |path: &Path| {
            let aside = path.with_extension("json.corrupt");
            fs::rename(path, &aside).is_ok().then_some(aside)
        };
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                let aside = set_aside(&path);
                return Err(StateError::Unreadable {
                    path,
                    aside,
                    source,
                });
            }
        };
        // Bytes, not text: a file that is not UTF-8 is corrupt like any other.
        match serde_json::from_slice(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(source) => {
                let aside = set_aside(&path);
                Err(StateError::Corrupt {
                    path,
                    aside,
                    source,
                })
            }
        }
    }

    /// Saves atomically: write a temporary file, fsync it, rename over the old one. The fsync
    /// may take seconds on a busy disk: on a multi-threaded runtime (the control plane's) this
    /// worker's other tasks and the I/O driver go to another meanwhile, so that the admin API
    /// (`/healthz`, a liveness probe) still answers.
    pub fn save(&self, route: &str, state: &RolloutState) -> Result<(), StateError> {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.write(route, state))
            }
            _ => self.write(route, state),
        }
    }

    fn write(&self, route: &str, state: &RolloutState) -> Result<(), StateError> {
        let path = self.path(route);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self.dir.join(format!(".{route}.json.tmp"));
        // Compact: the baseline's histogram has up to a few thousand buckets.
        let text = serde_json::to_vec(state).unwrap_or_default();
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(dir) = fs::File::open(&self.dir) {
            // Persist the rename itself; failure here only weakens durability.
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt rollout state {} ({}): {source}", path.display(), set_aside(aside.as_deref()))]
    Corrupt {
        path: PathBuf,
        aside: Option<PathBuf>,
        source: serde_json::Error,
    },
    #[error("cannot read rollout state {} ({}): {source}", path.display(), set_aside(aside.as_deref()))]
    Unreadable {
        path: PathBuf,
        aside: Option<PathBuf>,
        source: std::io::Error,
    },
}

/// The index of the first step at or above `canary_bp` (the last when none is): the step a
/// ramping weight between two steps is shown as, and the next pass moves on from.
pub fn step_at_or_above(steps: &[u32], canary_bp: u32) -> usize {
    steps
        .iter()
        .position(|&bp| bp >= canary_bp)
        .unwrap_or(steps.len().saturating_sub(1))
}

/// Where a corrupt state file went, for its error message.
fn set_aside(aside: Option<&Path>) -> String {
    match aside {
        Some(path) => format!("set aside as {}", path.display()),
        None => "it could not be set aside".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STEPS: [u32; 4] = [100, 1000, 5000, 10_000];

    fn idle() -> RolloutState {
        RolloutState::new(Slot::Blue, 0, ["v1".into(), "v2".into()])
    }

    #[test]
    fn a_rollout_ramps_through_every_step_then_promotes() {
        let mut state = idle().apply(Action::Start, &STEPS).unwrap();
        let mut weights = vec![state.canary_bp];
        while state.phase == Phase::Ramping {
            state = state.apply(Action::StepPassed, &STEPS).unwrap();
            weights.push(state.canary_bp);
        }
        assert_eq!(weights, vec![100, 1000, 5000, 10_000, 0]);
        assert_eq!(state.phase, Phase::Idle);
        assert_eq!(state.stable, Slot::Green);
    }

    #[test]
    fn illegal_moves_name_the_current_phase() {
        let error = idle().apply(Action::Pause, &STEPS).unwrap_err();
        assert_eq!(error.to_string(), "cannot pause a rollout that is idle");
        let ramping = idle().apply(Action::Start, &STEPS).unwrap();
        assert!(ramping.apply(Action::Start, &STEPS).is_err());
        assert!(ramping.apply(Action::Resume, &STEPS).is_err());
    }

    #[test]
    fn resume_goes_on_at_a_hand_set_weight_until_a_pass() {
        let paused = idle().apply(Action::SetWeight(2000), &STEPS).unwrap();
        assert_eq!(paused.phase, Phase::Paused);
        let resumed = paused.apply(Action::Resume, &STEPS).unwrap();
        // Neither lowered nor raised: shown as the step above it, analysed at 20 %.
        assert_eq!(
            (resumed.phase, resumed.step, resumed.canary_bp),
            (Phase::Ramping, 2, 2000)
        );
        let passed = resumed.apply(Action::StepPassed, &STEPS).unwrap();
        assert_eq!((passed.step, passed.canary_bp), (2, 5000));
        // At 0 there would be nothing to judge: the first step.
        let at_zero = idle().apply(Action::SetWeight(0), &STEPS).unwrap();
        let resumed = at_zero.apply(Action::Resume, &STEPS).unwrap();
        assert_eq!((resumed.step, resumed.canary_bp), (0, STEPS[0]));
    }

    #[test]
    fn a_passed_step_never_lowers_the_weight_when_the_steps_changed() {
        // Ramping at 50 % (step 1 of [10, 50, 100]); a reload makes the steps finer.
        let coarse = [1000, 5000, 10_000];
        let fine = [1000, 2000, 3000, 6000, 10_000];
        let mut state = idle().apply(Action::Start, &coarse).unwrap();
        state = state.apply(Action::StepPassed, &coarse).unwrap();
        assert_eq!((state.step, state.canary_bp), (1, 5000));
        let next = state.apply(Action::StepPassed, &fine).unwrap();
        assert_eq!(
            (next.phase, next.step, next.canary_bp),
            (Phase::Ramping, 3, 6000)
        );
        // Past the last step below 100 %, the next pass is the 100 % step, then promotion.
        let last = RolloutState {
            canary_bp: 9000,
            ..next.clone()
        };
        let full = last.apply(Action::StepPassed, &fine).unwrap();
        assert_eq!((full.step, full.canary_bp), (4, 10_000));
        let promoted = full.apply(Action::StepPassed, &fine).unwrap();
        assert_eq!(
            (promoted.phase, promoted.stable),
            (Phase::Idle, Slot::Green)
        );
    }

    #[test]
    fn a_new_rollout_starts_without_the_last_ones_baseline() {
        let mut rolled_back = idle().apply(Action::Start, &STEPS).unwrap();
        rolled_back = rolled_back.apply(Action::Rollback, &STEPS).unwrap();
        rolled_back.baseline = Some(Arc::new(Baseline {
            requests: 10,
            errors: 0,
            latency_us: vec![(1000, 10)],
            error_statuses: None,
        }));
        let started = rolled_back.apply(Action::Start, &STEPS).unwrap();
        assert_eq!(started.baseline, None);
    }

    #[test]
    fn rollback_sets_weight_zero_and_start_retries() {
        let ramping = idle().apply(Action::Start, &STEPS).unwrap();
        let ramping = ramping.apply(Action::StepPassed, &STEPS).unwrap();
        let back = ramping.apply(Action::Rollback, &STEPS).unwrap();
        assert_eq!(
            (back.phase, back.canary_bp, back.stable),
            (Phase::RolledBack, 0, Slot::Blue)
        );
        let again = back.apply(Action::Start, &STEPS).unwrap();
        assert_eq!((again.phase, again.canary_bp), (Phase::Ramping, 100));
    }

    #[test]
    fn the_shown_step_counts_from_one_and_is_zero_without_a_rollout() {
        let shown = |state: &RolloutState| state.step_number(&STEPS);
        let idle = idle();
        assert_eq!(shown(&idle), 0);
        let first = idle.apply(Action::Start, &STEPS).unwrap();
        assert_eq!((first.step, shown(&first)), (0, 1));
        let second = first.apply(Action::StepPassed, &STEPS).unwrap();
        assert_eq!((second.step, shown(&second)), (1, 2));
        let paused = second.apply(Action::Pause, &STEPS).unwrap();
        assert_eq!(shown(&paused), 2);
        let on_a_step = paused.apply(Action::SetWeight(5000), &STEPS).unwrap();
        assert_eq!((on_a_step.phase, shown(&on_a_step)), (Phase::Paused, 3));
        let off_steps = paused.apply(Action::SetWeight(2000), &STEPS).unwrap();
        assert_eq!((off_steps.phase, shown(&off_steps)), (Phase::Paused, 0));
        let resumed = off_steps.apply(Action::Resume, &STEPS).unwrap();
        assert_eq!((resumed.phase, shown(&resumed)), (Phase::Ramping, 3));
        let back = resumed.apply(Action::Rollback, &STEPS).unwrap();
        assert_eq!((back.step, shown(&back)), (2, 0));
        let mut last = back.apply(Action::Start, &STEPS).unwrap();
        while last.canary_bp < 10_000 {
            last = last.apply(Action::StepPassed, &STEPS).unwrap();
        }
        assert_eq!(shown(&last), STEPS.len());
        let promoted = last.apply(Action::StepPassed, &STEPS).unwrap();
        assert_eq!((promoted.phase, shown(&promoted)), (Phase::Idle, 0));
        // A saved index beyond a shortened steps list shows the last step.
        let shortened = RolloutState { step: 7, ..first };
        assert_eq!(shown(&shortened), STEPS.len());
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Start),
            Just(Action::Pause),
            Just(Action::Resume),
            Just(Action::Promote),
            Just(Action::Rollback),
            Just(Action::StepPassed),
            (0u32..=10_000).prop_map(Action::SetWeight),
        ]
    }

    proptest! {
        #[test]
        fn the_machine_never_leaves_a_legal_state(actions in proptest::collection::vec(action(), 0..60)) {
            let mut state = idle();
            for action in actions {
                if let Ok(next) = state.apply(action, &STEPS) {
                    state = next;
                }
                prop_assert_eq!(state.clone().repair(), None);
                match state.phase {
                    Phase::Idle => prop_assert_eq!(state.canary_bp, 0),
                    Phase::RolledBack => prop_assert_eq!(state.canary_bp, 0),
                    Phase::Ramping => {
                        // On a step, or (resumed at a hand-set weight) between the step
                        // below and the shown step.
                        prop_assert!(state.step < STEPS.len());
                        prop_assert!(state.canary_bp > 0);
                        prop_assert!(state.canary_bp <= STEPS[state.step]);
                        prop_assert!(state.step == 0 || state.canary_bp > STEPS[state.step - 1]);
                    }
                    Phase::Paused => {}
                }
            }
        }
    }

    #[test]
    fn state_files_round_trip_and_set_corrupt_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let files = StateFiles::new(dir.path());
        assert!(files.load("shop").unwrap().is_none());
        let state = idle().apply(Action::Start, &STEPS).unwrap();
        files.save("shop", &state).unwrap();
        assert_eq!(files.load("shop").unwrap(), Some(state));
        fs::write(dir.path().join("routes/shop.json"), "{ not json").unwrap();
        let error = files.load("shop").unwrap_err();
        assert!(matches!(error, StateError::Corrupt { aside: Some(_), .. }));
        let message = error.to_string();
        assert!(
            message.contains("shop.json (set aside as ") && message.contains("shop.json.corrupt)"),
            "{message}"
        );
        assert!(files.load("shop").unwrap().is_none());
        assert!(dir.path().join("routes/shop.json.corrupt").exists());
        // Not UTF-8: corrupt too, set aside, not written over.
        fs::write(
            dir.path().join("routes/shop.json"),
            b"{\"stable\": \"\xff\"}",
        )
        .unwrap();
        let error = files.load("shop").unwrap_err();
        assert!(matches!(error, StateError::Corrupt { aside: Some(_), .. }));
        // Not readable at all (here: a directory in its place): set aside as well.
        fs::remove_file(dir.path().join("routes/shop.json.corrupt")).unwrap();
        fs::create_dir(dir.path().join("routes/shop.json")).unwrap();
        let error = files.load("shop").unwrap_err();
        assert!(
            matches!(error, StateError::Unreadable { aside: Some(_), .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("cannot read rollout state"));
        assert!(dir.path().join("routes/shop.json.corrupt").is_dir());
        assert!(files.load("shop").unwrap().is_none());
    }

    /// A weight the machine never leaves is mended, the rest (the stable slot) kept.
    #[test]
    fn a_weight_the_machine_never_leaves_is_mended_and_the_rest_kept() {
        let rolled_back = idle()
            .apply(Action::Start, &STEPS)
            .and_then(|s| s.apply(Action::Rollback, &STEPS))
            .unwrap();
        let paused = idle().apply(Action::SetWeight(5000), &STEPS).unwrap();
        let green = |state: RolloutState| RolloutState {
            stable: Slot::Green,
            ..state
        };
        let cases = [
            (green(rolled_back.clone()), 7000, 0),
            (green(idle()), 5000, 0),
            (green(paused.clone()), 20_000, 10_000),
        ];
        for (state, written, mended) in cases {
            let mut state = RolloutState {
                canary_bp: written,
                ..state
            };
            let before = state.clone();
            assert!(state.repair().is_some(), "{before:?}");
            assert_eq!(state.canary_bp, mended);
            assert_eq!((state.stable, state.phase), (Slot::Green, before.phase));
        }
        let mut fine = paused.clone();
        assert_eq!(fine.repair(), None);
        assert_eq!(fine, paused);
    }
}
