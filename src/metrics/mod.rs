//! Per route × slot telemetry: request counts by status class, errors by kind, and HdrHistograms
//! of upstream latency, read as a sliding window (`last_60s`), the controller's step window
//! (`step`) and process totals (`totals`, for Prometheus). A slot carries its `version` label;
//! a new label starts the per-version figures fresh (`set_version`).
//!
//! Recording locks only the calling thread's shard (one per core, so rarely contended) and
//! allocates nothing (a shard's histogram may grow a few times while it first meets larger
//! latencies). Readers, `rotate` and `reset_step` drain the shards into an aggregate behind a
//! separate mutex, so counts are exact and every window's histogram holds exactly `requests`
//! latencies. The one exception: a request sent before the judged build changed (see
//! [`Epoch`]), or routed by a table a reload was replacing ([`SlotMetrics::outside_steps`]),
//! is recorded into the aggregate directly, under its mutex, past the step window; only the
//! canary's requests in flight at a start, a rollback or a new version, and requests sent
//! while a reload makes and publishes its table, get there.
//! Failures before a response head are requests too, with their latency.

pub mod prometheus;
mod window;

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use hdrhistogram::Histogram;
use tokio::time::{Duration, Instant, MissedTickBehavior};

pub use window::{empty_histogram, record_micros_n, MAX_LATENCY_US, SIGNIFICANT_DIGITS};
use window::{Aggregate, Counts, Shard, Waiting, WAITING_SECONDS};

use crate::warn_every::WarnEvery;

/// Length of one time slice of the sliding window; `rotate` is due this often.
pub const SLICE: Duration = Duration::from_secs(10);

/// Longest span `last_60s` covers.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most recording shards per slot.
const MAX_SHARDS: usize = 8;

/// Why an exchange with an upstream counts as an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A response whose status is in the route's `error_statuses`.
    Status,
    /// The connection could not be established.
    Connect,
    /// No response (head or body) within the timeout.
    Timeout,
    /// The connection was reset or closed mid-exchange.
    Reset,
    /// The upstream broke HTTP.
    Protocol,
    /// The slot had `max_in_flight` requests under way: veer answered 503 itself, without
    /// trying the upstream.
    Overload,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Status,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Protocol,
        ErrorKind::Overload,
    ];

    /// The Prometheus `kind` label and admin JSON key.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Status => "status",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Overload => "overload",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Labels of `Totals::by_class`, in order.
pub const CLASS_LABELS: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

const ERROR_CLASS: usize = 5;

/// Index in `CLASS_LABELS`: below 200 is 1xx, 500 and above is 5xx.
fn class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// Counts and latencies of one window.
#[derive(Clone, Debug)]
pub struct WindowStats {
    /// Responses and failures (not client aborts).
    pub requests: u64,
    /// Sum of `errors_by_kind`.
    pub errors: u64,
    /// Indexed like `ErrorKind::ALL`.
    pub errors_by_kind: [u64; ErrorKind::ALL.len()],
    /// Exchanges the client abandoned; neither requests nor errors.
    pub client_aborts: u64,
    /// Upstream latency in microseconds, one value per request.
    pub histogram: Histogram<u64>,
    /// Wall time the window covers.
    pub elapsed: Duration,
}

impl WindowStats {
    /// Errors per request, 0 without requests, at most 1 (a body failure may be counted in a
    /// later window than its request).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        (self.errors as f64 / self.requests as f64).min(1.0)
    }

    /// Requests per second over `elapsed`; 0 when no time has passed.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` (clamped to 0..=1) in ms, 0 when empty. HdrHistogram reports the
    /// top of the value's bucket: at most 0.1 % above the true value.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Monotone totals since the slot was created, and the requests of its current `version`.
#[derive(Clone, Debug)]
pub struct Totals {
    /// Requests by class, labelled by `CLASS_LABELS`: 1xx..5xx, then "error" (no response).
    pub by_class: [u64; 6],
    /// Indexed like `ErrorKind::ALL`.
    pub errors_by_kind: [u64; ErrorKind::ALL.len()],
    pub client_aborts: u64,
    /// Upstream latency in microseconds, one value per request.
    pub histogram: Histogram<u64>,
    /// The slot's `version` label (see [`SlotMetrics::set_version`]); empty until given one.
    pub version: Arc<str>,
    /// Like `by_class`, but only the requests recorded since the slot got `version`: what
    /// `veer_requests_total{version}` exports, so that a build is never charged with the
    /// requests of the one it replaced. Monotone while the label stays.
    pub version_by_class: [u64; 6],
}

impl Totals {
    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    pub fn errors(&self) -> u64 {
        self.errors_by_kind.iter().sum()
    }
}

/// An empty latency histogram as used in `WindowStats` and `Totals`: microseconds, 3
/// significant digits, auto-resizing.
pub fn latency_histogram() -> Histogram<u64> {
    window::empty_histogram()
}

/// Telemetry of one route × slot. Share it in an `Arc`; it outlives config reloads.
///
/// Memory: every histogram starts at 2048 counters and doubles its range as larger latencies
/// arrive; covering 60 s takes 17,408 counters. A slot holds S + 7 histograms with 32-bit
/// counters (S shards, a spare, six slices) and 2 with 64-bit counters (step, totals), S being
/// the core count rounded up to a power of two, at most 8. That is (S + 7) × 8 KiB + 32 KiB
/// idle, (S + 7) × 44 KiB + 176 KiB once latencies reach 1 s, and at most
/// (S + 7) × 68 KiB + 272 KiB once they reach 60 s (a timeout does): 884 KiB at S = 2,
/// 1.0 MiB at S = 4, 1.3 MiB at S = 8. `heap_bytes` tells the current figure.
pub struct SlotMetrics {
    shards: Box<[Padded<Mutex<Shard>>]>,
    aggregate: Mutex<Aggregate>,
    /// Second 0 of the waiting requests' clock.
    born: Instant,
    /// The current epoch's number (see [`Epoch`]).
    epoch: AtomicU64,
    /// Failed exchanges, warned of at most every [`FAILURE_WARN_EVERY`].
    failures: WarnEvery,
}

/// Upstream failures of a slot are warned of at most this often.
pub const FAILURE_WARN_EVERY: Duration = Duration::from_secs(10);

/// A request sent upstream, waiting for its answer: hand it back to
/// [`SlotMetrics::answered`].
#[derive(Debug)]
pub struct Sent {
    shard: usize,
    second: u64,
    epoch: Epoch,
}

impl Sent {
    /// The epoch the request was sent in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// The epoch a request was sent in: a new one begins on the canary slot whenever the build the
/// controller judges there changes (a rollout starts, a new version label on it, a rollback;
/// see [`SlotMetrics::next_epoch`]). The answer, failure or body failure of a request sent in an
/// earlier epoch (the last build's, still in flight when it was withdrawn) counts in the
/// sliding window and the totals but in no step window, so a build is never judged on
/// another's requests. A step that passes to the next one of the same build keeps the epoch:
/// a request sent in one step and failing in the next counts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch(u64);

impl Epoch {
    /// Whatever epoch is current when the record is made: for figures no controller judges
    /// (the shadow's) and for records made as they happen (tests, benches).
    pub const CURRENT: Epoch = Epoch(u64::MAX);

    /// An epoch that is never current: for a request routed by a table that a reload was
    /// replacing (`Route::is_current`), which counts in no step window.
    pub const PAST: Epoch = Epoch(u64::MAX - 1);
}

/// Keeps each shard on its own cache lines.
#[repr(align(128))]
struct Padded<T>(T);

impl SlotMetrics {
    /// A slot with one shard per core (rounded up to a power of two, at most 8).
    pub fn new() -> Self {
        Self::with_shards(default_shards())
    }

    /// A slot with `shards` recording shards, rounded up to a power of two.
    pub fn with_shards(shards: usize) -> Self {
        let shards = shards.clamp(1, 64).next_power_of_two();
        SlotMetrics {
            shards: (0..shards)
                .map(|_| Padded(Mutex::new(Shard::new())))
                .collect(),
            aggregate: Mutex::new(Aggregate::new(Instant::now())),
            born: Instant::now(),
            epoch: AtomicU64::new(0),
            failures: WarnEvery::new(FAILURE_WARN_EVERY),
        }
    }

    /// An upstream failure happened: whether to warn of it (the first, then at most one per
    /// [`FAILURE_WARN_EVERY`], so that an outage is told without a line per request), with how
    /// many failed since the last warning, this one included.
    pub fn failure_to_warn(&self) -> Option<u64> {
        self.failures.happened(Instant::now())
    }

    /// A request is sent upstream `at` (the caller's clock reading: no second one): it counts
    /// as waiting (see [`SlotMetrics::waiting`]) until [`SlotMetrics::answered`].
    pub fn sent(&self, at: Instant) -> Sent {
        let shard = thread_shard() & (self.shards.len() - 1);
        let second = at.saturating_duration_since(self.born).as_secs();
        if let Some(padded) = self.shards.get(shard) {
            let mut locked = lock(&padded.0);
            let entry = &mut locked.waiting[second as usize % WAITING_SECONDS];
            if entry.second != second {
                *entry = Waiting {
                    second,
                    ..Waiting::default()
                };
            }
            entry.sent = entry.sent.saturating_add(1);
        }
        Sent {
            shard,
            second,
            // Acquire, with `next_epoch`'s Release: a request that sees the epoch a reload's
            // reconcile began sees the generation the reload began before it
            // (`Route::is_current`).
            epoch: Epoch(self.epoch.load(Ordering::Acquire)),
        }
    }

    /// The current epoch (read as [`SlotMetrics::sent`] reads it).
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// The request `sent` stands for was routed by a table that a reload was replacing: it
    /// counts in no step window ([`Epoch::PAST`]), and not as waiting (an old build that hangs
    /// must not look like the new one hanging).
    pub fn outside_steps(&self, sent: Sent) -> Sent {
        let past = Sent {
            epoch: Epoch::PAST,
            ..sent
        };
        self.answered(sent);
        past
    }

    /// The request `sent` stands for got its answer head, failed, or was given up.
    pub fn answered(&self, sent: Sent) {
        if sent.epoch == Epoch::PAST {
            // Taken off the waiting by `outside_steps`.
            return;
        }
        if let Some(padded) = self.shards.get(sent.shard) {
            let mut locked = lock(&padded.0);
            let entry = &mut locked.waiting[sent.second as usize % WAITING_SECONDS];
            if entry.second == sent.second && entry.answered < entry.sent {
                entry.answered += 1;
            }
        }
    }

    /// Requests sent upstream since `since`, at most 64 s ago, and still without an answer, as
    /// `(waited at least, how many)`, longest waiting first: how the controller sees a slot
    /// that hangs before any timeout ends its requests. Counted by whole seconds from the
    /// first one that starts at or after `since`, so that no request from before it (the
    /// last build's, after a rollback) is counted.
    pub fn waiting(&self, since: Instant) -> Vec<(Duration, u64)> {
        let now = self.born.elapsed();
        let this_second = now.as_secs();
        let from_birth = since.saturating_duration_since(self.born);
        let first_second = from_birth.as_secs() + u64::from(from_birth.subsec_nanos() > 0);
        let mut by_age = [0u64; WAITING_SECONDS];
        for padded in self.shards.iter() {
            let locked = lock(&padded.0);
            for entry in &locked.waiting {
                let age = this_second.checked_sub(entry.second);
                let recent = |&age: &u64| age < WAITING_SECONDS as u64;
                if let Some(age) = age.filter(recent).filter(|_| entry.second >= first_second) {
                    by_age[age as usize] += u64::from(entry.sent - entry.answered);
                }
            }
        }
        // Sent within second `s`: waited at least from the end of `s` until now.
        (0..WAITING_SECONDS)
            .rev()
            .filter(|&age| by_age[age] > 0)
            .map(|age| {
                let end_of_second = Duration::from_secs(this_second - age as u64 + 1);
                (now.saturating_sub(end_of_second), by_age[age])
            })
            .collect()
    }

    /// An upstream response head arrived for a request sent in `epoch`. `latency` = request
    /// sent upstream -> response head received. `is_error` = status counts as an error per the
    /// route's error_statuses (then kind Status).
    pub fn record_response(&self, epoch: Epoch, status: u16, is_error: bool, latency: Duration) {
        let class = class_index(status);
        let add = |counts: &mut Counts| {
            counts.by_class[class] += 1;
            if is_error {
                counts.errors_by_kind[ErrorKind::Status.index()] += 1;
            }
        };
        self.record(epoch, add, Some(window::latency_micros(latency)));
    }

    /// The exchange failed before a response head (connect refused, timeout, reset, protocol
    /// error): a request of class "error". Its latency (e.g. the timeout) enters the histogram,
    /// unless no connection was made: nothing was sent, so nothing was waited for (a refused
    /// endpoint would otherwise make a slot look fast).
    pub fn record_failure(&self, epoch: Epoch, kind: ErrorKind, latency: Duration) {
        let add = |counts: &mut Counts| {
            counts.by_class[ERROR_CLASS] += 1;
            counts.errors_by_kind[kind.index()] += 1;
        };
        // Nothing was waited for when no connection was made, or none was tried.
        let tried = !matches!(kind, ErrorKind::Connect | ErrorKind::Overload);
        let waited = tried.then(|| window::latency_micros(latency));
        self.record(epoch, add, waited);
    }

    /// A response whose head was recorded failed later, mid-body: an error of `kind`, not a new
    /// request. Call it at most once per exchange, and not when the head already counted as an
    /// error, so that errors never exceed requests.
    pub fn record_body_failure(&self, epoch: Epoch, kind: ErrorKind) {
        let add = |counts: &mut Counts| counts.errors_by_kind[kind.index()] += 1;
        self.record(epoch, add, None);
    }

    /// The client went away; not the slot's fault; counted apart from requests and errors.
    pub fn record_client_abort(&self) {
        self.with_shard(|shard| shard.counts.client_aborts += 1);
    }

    /// The sliding window: the open slice plus the five slices before it, i.e. from the start of
    /// the oldest kept slice to now. With `rotate` every `SLICE` that is 50 s to 60 s (less
    /// while the slot is younger); `elapsed` tells the exact span.
    pub fn last_60s(&self) -> WindowStats {
        self.drain().sliding(Instant::now())
    }

    /// Everything since the last `reset_step` (or creation): the window the controller judges.
    pub fn step(&self) -> WindowStats {
        self.drain().step(Instant::now())
    }

    /// Returns the step window and starts a new one, losing no record in between.
    pub fn take_step(&self) -> WindowStats {
        self.drain().take_step(Instant::now())
    }

    /// Starts a new, empty step window now. Leaves the sliding window and totals alone.
    pub fn reset_step(&self) {
        self.drain().reset_step(Instant::now());
    }

    /// Monotone totals since the slot was created, for Prometheus, with the current `version`
    /// label and the requests counted under it, read together.
    pub fn totals(&self) -> Totals {
        self.drain().totals()
    }

    /// The requests of [`Self::totals`], without copying the histogram.
    pub fn requests(&self) -> u64 {
        self.drain().total_requests()
    }

    /// Labels the slot with `version`. When the label changes, what is reported per version
    /// starts empty: `Totals::version_by_class` (and with it `veer_requests_total` under the
    /// new label) and the sliding window (`last_60s`, shown next to the version). The lifetime
    /// totals, their histogram and the step window (the controller's, reset when it starts a
    /// rollout) go on. Returns whether the label changed; the same label changes nothing.
    ///
    /// Recording is untouched: every shard is drained into the old label first, so a request
    /// recorded before this call counts under the old label and one recorded after it under
    /// the new one, even if it was sent before the reload.
    pub fn set_version(&self, version: &str) -> bool {
        self.drain().relabel(version, Instant::now())
    }

    /// Closes the current slice and forgets the one that left the window. Call it every
    /// `SLICE` from a background ticker (see `rotate_every_slice`), never on the request path.
    pub fn rotate(&self) {
        self.drain().rotate(Instant::now());
    }

    /// Bytes of histogram counters this slot holds now.
    pub fn heap_bytes(&self) -> usize {
        let aggregate = self.drain().heap_bytes();
        let shards: usize = self.shards.iter().map(|s| lock(&s.0).heap_bytes()).sum();
        aggregate + shards
    }

    /// The number of recording shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn with_shard(&self, record: impl FnOnce(&mut Shard)) {
        let index = thread_shard() & (self.shards.len() - 1);
        if let Some(shard) = self.shards.get(index) {
            record(&mut lock(&shard.0));
        }
    }

    /// Records what a request sent in `epoch` adds (`add` to the counts, and a latency) into
    /// the calling thread's shard; when that epoch is over, into the aggregate instead, past
    /// the step window. That takes the slot's aggregate lock for a few counter updates: rare,
    /// as only requests in flight when the judged build changed, and those sent while a reload
    /// makes and publishes its table, get there.
    fn record(&self, epoch: Epoch, add: impl Fn(&mut Counts), micros: Option<u64>) {
        let mut past = false;
        self.with_shard(|shard| {
            // Compared under the shard's lock: the drain that follows `next_epoch` takes it
            // too, so a record either reaches the shard before that drain or sees the new
            // epoch.
            if epoch == Epoch::CURRENT || epoch.0 == self.epoch.load(Ordering::Relaxed) {
                add(&mut shard.counts);
                if let Some(micros) = micros {
                    window::record_micros(&mut shard.hist, micros);
                }
            } else {
                past = true;
            }
        });
        if past {
            lock(&self.aggregate).record_past_step(add, micros);
        }
    }

    /// Begins a new epoch (see [`Epoch`]): the requests in flight now count in no step window
    /// when they end. Call it before the step windows are reset for the new build.
    pub fn next_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// Moves what every shard recorded into the aggregate and returns the aggregate, locked.
    /// A shard's lock is held only to swap its histogram with the spare.
    fn drain(&self) -> MutexGuard<'_, Aggregate> {
        let mut aggregate = lock(&self.aggregate);
        for shard in self.shards.iter() {
            let counts = {
                let mut shard = lock(&shard.0);
                if shard.counts.is_zero() {
                    continue;
                }
                std::mem::swap(&mut shard.hist, &mut aggregate.spare);
                std::mem::take(&mut shard.counts)
            };
            aggregate.absorb_spare(&counts);
        }
        aggregate
    }
}

impl Default for SlotMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SlotMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotMetrics")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// Calls `rotate_all` every `SLICE`, forever; spawn it once for all slots.
pub async fn rotate_every_slice(mut rotate_all: impl FnMut()) {
    let mut ticker = tokio::time::interval_at(Instant::now() + SLICE, SLICE);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        rotate_all();
    }
}

/// A poisoned lock still holds consistent counters: every update under it is a plain add.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn default_shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .next_power_of_two()
            .min(MAX_SHARDS)
    })
}

/// This thread's shard number, handed out round-robin on a thread's first record.
fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
    }
    SHARD
        .try_with(|shard| match shard.get() {
            Some(index) => index,
            None => {
                let index = NEXT.fetch_add(1, Ordering::Relaxed);
                shard.set(Some(index));
                index
            }
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_without_an_answer_are_seen_waiting_by_how_long() {
        let m = SlotMetrics::with_shards(2);
        let born = Instant::now();
        let waiting = || m.waiting(born);
        assert!(waiting().is_empty());
        let (a, b) = (m.sent(Instant::now()), m.sent(Instant::now()));
        tokio::time::advance(ms(1500)).await;
        let c = m.sent(Instant::now());
        // Sent in second 0: waited at least 0.5 s; in second 1: at least nothing yet.
        assert_eq!(waiting(), [(ms(500), 2), (ms(0), 1)]);
        m.answered(a);
        assert_eq!(waiting(), [(ms(500), 1), (ms(0), 1)]);
        tokio::time::advance(ms(10_000)).await;
        assert_eq!(waiting(), [(ms(10_500), 1), (ms(9_500), 1)]);
        m.answered(b);
        m.answered(c);
        assert!(waiting().is_empty());
        // Answers on another thread's shard land where the request was counted.
        let d = m.sent(Instant::now());
        std::thread::scope(|s| {
            s.spawn(|| m.answered(d));
        });
        assert!(waiting().is_empty());
        // Past 64 s a request is no longer seen, and its second's entry is reused.
        let _hung = m.sent(Instant::now());
        tokio::time::advance(ms(64_000)).await;
        assert!(waiting().is_empty());
        let e = m.sent(Instant::now());
        assert_eq!(waiting(), [(ms(0), 1)]);
        // Only requests sent in whole seconds from the given time on are counted: not those
        // of the second it falls in.
        tokio::time::advance(ms(2_000)).await;
        let step = Instant::now();
        let f = m.sent(Instant::now());
        assert!(m.waiting(step).is_empty());
        tokio::time::advance(ms(600)).await;
        let g = m.sent(Instant::now());
        assert_eq!(m.waiting(step), [(ms(0), 1)]);
        assert_eq!(waiting(), [(ms(2_100), 1), (ms(100), 1), (ms(0), 1)]);
        for sent in [e, f, g] {
            m.answered(sent);
        }
        assert!(waiting().is_empty());
    }

    #[test]
    fn error_kinds_are_listed_in_index_order_with_stable_names() {
        let names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            ["status", "connect", "timeout", "reset", "protocol", "overload"]
        );
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }

    /// A request sent before the epoch began counts, when it ends, in the sliding window and
    /// the totals, not in the step; one sent after counts everywhere. So does a body failure.
    /// A new step of the same build keeps the epoch.
    #[test]
    fn a_request_of_an_earlier_epoch_counts_outside_the_step() {
        let m = SlotMetrics::with_shards(2);
        let before = m.sent(Instant::now());
        m.next_epoch();
        m.reset_step();
        let after = m.sent(Instant::now());
        m.record_response(before.epoch(), 200, false, ms(1));
        m.record_body_failure(before.epoch(), ErrorKind::Reset);
        m.record_failure(after.epoch(), ErrorKind::Timeout, ms(5));
        let in_step = |w: WindowStats| (w.requests, w.errors, w.histogram.len());
        assert_eq!(in_step(m.step()), (1, 1, 1));
        assert_eq!(in_step(m.last_60s()), (2, 2, 2));
        assert_eq!(m.totals().requests(), 2);
        // Sent in one step, ending in the next of the same build: counted there.
        let in_flight = m.sent(Instant::now());
        assert_eq!(m.take_step().requests, 1);
        m.record_response(in_flight.epoch(), 503, true, ms(1));
        m.record_response(Epoch::CURRENT, 200, false, ms(1));
        assert_eq!(in_step(m.step()), (2, 1, 2));
        assert_eq!((m.requests(), m.last_60s().histogram.len()), (4, 4));
    }

    /// A request routed by a table a reload was replacing counts outside the step, in the
    /// epoch it was sent in and in the next, and is not waiting; one of the current table
    /// sent beside it counts in the step.
    #[test]
    fn a_request_sent_outside_the_steps_counts_in_none() {
        // Before the slot's birth: `waiting` counts from its second 0.
        let step = Instant::now();
        let m = SlotMetrics::with_shards(2);
        let old_table = m.outside_steps(m.sent(Instant::now()));
        let current = m.sent(Instant::now());
        assert_eq!(m.waiting(step).iter().map(|w| w.1).sum::<u64>(), 1);
        m.record_response(old_table.epoch(), 500, true, ms(1));
        m.record_response(current.epoch(), 200, false, ms(1));
        m.answered(old_table);
        m.answered(current);
        let in_step = |w: WindowStats| (w.requests, w.errors, w.histogram.len());
        assert_eq!(in_step(m.step()), (1, 0, 1));
        m.next_epoch();
        m.reset_step();
        let again = m.outside_steps(m.sent(Instant::now()));
        assert!(m.waiting(step).is_empty());
        m.record_failure(again.epoch(), ErrorKind::Reset, ms(2));
        m.answered(again);
        assert_eq!(in_step(m.step()), (0, 0, 0));
        assert_eq!(in_step(m.last_60s()), (3, 2, 3));
        assert_eq!(m.totals().requests(), 3);
        // Its `answered` took no other request off the waiting.
        let waiting = m.sent(Instant::now());
        m.answered(m.outside_steps(m.sent(Instant::now())));
        assert_eq!(m.waiting(step).iter().map(|w| w.1).sum::<u64>(), 1);
        m.answered(waiting);
    }

    #[test]
    fn statuses_are_counted_by_class_and_failures_as_error() {
        let m = SlotMetrics::new();
        for status in [100, 101, 200, 204, 301, 404, 499, 500, 503, 599, 999] {
            m.record_response(Epoch::CURRENT, status, false, ms(1));
        }
        m.record_failure(Epoch::CURRENT, ErrorKind::Connect, ms(1));
        assert_eq!(m.totals().by_class, [2, 2, 1, 2, 4, 1]);
        assert_eq!((m.totals().requests(), m.requests()), (12, 12));
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let m = SlotMetrics::new();
        m.record_response(Epoch::CURRENT, 200, false, ms(1));
        m.record_response(Epoch::CURRENT, 503, true, ms(1));
        m.record_response(Epoch::CURRENT, 502, true, ms(1));
        m.record_failure(Epoch::CURRENT, ErrorKind::Connect, ms(1));
        m.record_failure(Epoch::CURRENT, ErrorKind::Timeout, ms(30_000));
        m.record_failure(Epoch::CURRENT, ErrorKind::Reset, ms(2));
        m.record_failure(Epoch::CURRENT, ErrorKind::Protocol, ms(2));
        m.record_response(Epoch::CURRENT, 200, false, ms(1));
        m.record_body_failure(Epoch::CURRENT, ErrorKind::Reset);
        for stats in [m.last_60s(), m.step()] {
            assert_eq!(stats.requests, 8);
            assert_eq!(stats.errors, 7);
            assert_eq!(stats.errors_by_kind, [2, 1, 1, 2, 1, 0]);
            assert!((stats.error_rate() - 7.0 / 8.0).abs() < 1e-12);
        }
        assert_eq!(m.totals().errors_by_kind, [2, 1, 1, 2, 1, 0]);
        assert_eq!(m.totals().by_class[ERROR_CLASS], 4);
        // Latency samples: every answer and failure but the connect one.
        assert_eq!(m.step().histogram.len(), 7);
    }

    #[test]
    fn body_failure_counts_an_error_but_not_a_request() {
        let m = SlotMetrics::new();
        m.record_response(Epoch::CURRENT, 200, false, ms(3));
        m.record_body_failure(Epoch::CURRENT, ErrorKind::Timeout);
        let stats = m.step();
        assert_eq!((stats.requests, stats.errors), (1, 1));
        assert_eq!(stats.histogram.len(), 1);
        assert_eq!(m.totals().by_class, [0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn client_aborts_are_neither_requests_nor_errors() {
        let m = SlotMetrics::new();
        m.record_client_abort();
        m.record_client_abort();
        let stats = m.last_60s();
        assert_eq!(
            (stats.requests, stats.errors, stats.client_aborts),
            (0, 0, 2)
        );
        assert_eq!(stats.error_rate(), 0.0);
        assert_eq!(m.totals().client_aborts, 2);
        assert_eq!(m.totals().requests(), 0);
    }

    #[test]
    fn known_latencies_land_at_their_quantiles() {
        let m = SlotMetrics::new();
        // 1..=1000 ms once each: quantile q is q * 1000 ms.
        for n in 1..=1000 {
            m.record_response(Epoch::CURRENT, 200, false, ms(n));
        }
        let stats = m.step();
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0), (0.999, 999.0)] {
            let got = stats.quantile_ms(q);
            assert!(
                got >= want && got <= want * 1.001,
                "p{q}: {got} ms, want {want}"
            );
        }
        assert_eq!(stats.quantile_ms(0.0), 1.0);
        assert!((stats.quantile_ms(1.0) - 1000.0).abs() <= 1.0);
    }

    #[test]
    fn microsecond_latencies_keep_their_precision() {
        let m = SlotMetrics::new();
        for micros in [0, 1, 250, 1999] {
            m.record_response(Epoch::CURRENT, 200, false, Duration::from_micros(micros));
        }
        m.record_response(Epoch::CURRENT, 200, false, Duration::from_nanos(999));
        let stats = m.step();
        assert_eq!(stats.histogram.min(), 0);
        assert_eq!(stats.histogram.count_at(0), 2);
        assert_eq!(stats.histogram.count_at(250), 1);
        assert_eq!(stats.histogram.max(), 1999);
    }

    #[test]
    fn latency_beyond_sixty_seconds_is_clamped_not_rejected() {
        let m = SlotMetrics::new();
        m.record_response(Epoch::CURRENT, 200, false, Duration::from_secs(300));
        m.record_failure(Epoch::CURRENT, ErrorKind::Timeout, Duration::MAX);
        let stats = m.last_60s();
        assert_eq!(stats.histogram.len(), 2);
        assert!((stats.quantile_ms(1.0) - 60_000.0).abs() <= 60.0);
    }

    #[test]
    fn empty_window_reports_zeros() {
        let stats = SlotMetrics::new().last_60s();
        assert_eq!((stats.requests, stats.errors), (0, 0));
        assert_eq!(stats.error_rate(), 0.0);
        assert_eq!(stats.rps(), 0.0);
        assert_eq!(stats.quantile_ms(0.99), 0.0);
        assert_eq!(stats.quantile_ms(f64::NAN), 0.0);
    }

    #[test]
    fn histograms_use_the_documented_configuration() {
        let h = latency_histogram();
        assert_eq!((h.low(), h.sigfig(), h.is_auto_resize()), (1, 3, true));
        assert_eq!(
            window::latency_micros(Duration::from_secs(61)),
            MAX_LATENCY_US
        );
    }

    #[test]
    fn shard_count_is_a_power_of_two() {
        assert_eq!(SlotMetrics::with_shards(0).shard_count(), 1);
        assert_eq!(SlotMetrics::with_shards(3).shard_count(), 4);
        let n = SlotMetrics::new().shard_count();
        assert!(n.is_power_of_two() && n <= MAX_SHARDS);
    }

    #[test]
    fn memory_matches_the_documented_figures() {
        const KIB: usize = 1024;
        let idle = SlotMetrics::with_shards(4);
        for _ in 0..5 {
            idle.rotate();
        }
        assert_eq!(idle.heap_bytes(), (4 + 7) * 8 * KIB + 32 * KIB);

        // One shard: every histogram of the slot meets a latency of 60 s.
        let full = SlotMetrics::with_shards(1);
        for _ in 0..6 {
            full.record_response(Epoch::CURRENT, 200, false, Duration::from_secs(60));
            full.rotate();
        }
        full.record_response(Epoch::CURRENT, 200, false, Duration::from_secs(60));
        assert_eq!(full.heap_bytes(), (1 + 7) * 68 * KIB + 272 * KIB);

        let second = SlotMetrics::with_shards(1);
        for _ in 0..6 {
            second.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(1000));
            second.rotate();
        }
        second.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(1000));
        assert_eq!(second.heap_bytes(), (1 + 7) * 44 * KIB + 176 * KIB);
    }

    #[test]
    fn concurrent_recorders_lose_no_count() {
        const THREADS: u64 = 4;
        const PER_THREAD: u64 = 50_000;
        let m = SlotMetrics::new();
        let start = Barrier::new(THREADS as usize + 1);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (m, start) = (&m, &start);
                scope.spawn(move || {
                    start.wait();
                    for i in 0..PER_THREAD {
                        match i % 4 {
                            0 => m.record_failure(Epoch::CURRENT, ErrorKind::Timeout, ms(t + 1)),
                            1 => m.record_response(Epoch::CURRENT, 503, true, ms(i % 100)),
                            2 => m.record_client_abort(),
                            _ => m.record_response(
                                Epoch::CURRENT,
                                200,
                                false,
                                Duration::from_micros(i),
                            ),
                        }
                    }
                });
            }
            // A reader drains and rotates (within the window) while they record.
            let (m, start) = (&m, &start);
            scope.spawn(move || {
                start.wait();
                let mut last = 0;
                for round in 0..200 {
                    let now = m.totals().requests();
                    assert!(now >= last, "totals went back from {last} to {now}");
                    last = now;
                    let _ = (m.step(), m.last_60s());
                    if round % 50 == 0 {
                        m.rotate();
                    }
                }
            });
        });
        let quarter = THREADS * PER_THREAD / 4;
        let totals = m.totals();
        assert_eq!(totals.requests(), 3 * quarter);
        assert_eq!(totals.by_class, [0, quarter, 0, 0, quarter, quarter]);
        assert_eq!(totals.errors_by_kind, [quarter, 0, quarter, 0, 0, 0]);
        assert_eq!(totals.client_aborts, quarter);
        assert_eq!(totals.histogram.len(), 3 * quarter);
        for stats in [m.step(), m.last_60s()] {
            assert_eq!(stats.requests, 3 * quarter);
            assert_eq!(stats.errors, 2 * quarter);
            assert_eq!(stats.histogram.len(), 3 * quarter);
        }
    }

    /// Upstream failures are warned of at once, then at most once per 10 s with how many failed
    /// meanwhile (an outage is not a line per request).
    #[tokio::test(start_paused = true)]
    async fn upstream_failures_are_warned_of_at_most_every_10_s() {
        let m = SlotMetrics::with_shards(1);
        assert_eq!(m.failure_to_warn(), Some(1));
        assert_eq!(m.failure_to_warn(), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(m.failure_to_warn(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(m.failure_to_warn(), Some(3));
        assert_eq!(m.failure_to_warn(), None);
        tokio::time::advance(FAILURE_WARN_EVERY).await;
        assert_eq!(m.failure_to_warn(), Some(2));
    }
}
