//! The read side of a slot: time slices for the sliding window, the step window and the totals,
//! all fed by draining the recording shards. Only `Aggregate::record_past_step` runs on the
//! request path (rarely: see `Epoch`).

use std::collections::VecDeque;
use std::mem;
use std::sync::Arc;

use hdrhistogram::{Counter, Histogram};
use tokio::time::{Duration, Instant};

use super::{ErrorKind, Totals, WindowStats, SLICE, WINDOW};

/// Latencies are recorded in microseconds and clamped to this (60 s).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Significant decimal digits kept by every latency histogram.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Closed slices kept besides the open one: the window spans at most `WINDOW`.
const CLOSED_SLICES: usize = (WINDOW.as_secs() / SLICE.as_secs()) as usize - 1;

/// An empty auto-resizing histogram: values from 1 (µs), 3 significant digits, starting at
/// 2048 counters and growing one power of two at a time as larger values arrive.
pub fn empty_histogram<T: Counter>() -> Histogram<T> {
    // `new` fails only for invalid parameters, and these are constants pinned by a test. The
    // `Sum` of no histograms builds the same histogram without a fallible call.
    Histogram::new(SIGNIFICANT_DIGITS).unwrap_or_else(|_| std::iter::empty().sum())
}

/// `latency` in whole microseconds, clamped to [`MAX_LATENCY_US`].
pub fn latency_micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .min(MAX_LATENCY_US)
}

/// Records one value; never fails (clamps if the histogram somehow cannot grow).
pub fn record_micros<T: Counter>(hist: &mut Histogram<T>, micros: u64) {
    if hist.record(micros).is_err() {
        hist.saturating_record(micros);
    }
}

/// Adds `src` into `dst`; counters saturate instead of overflowing.
fn merge<T: Counter>(dst: &mut Histogram<T>, src: &Histogram<T>) {
    if dst.add(src).is_err() {
        for value in src.iter_recorded() {
            dst.saturating_record_n(value.value_iterated_to(), value.count_at_value());
        }
    }
}

/// Adds a slice histogram (32-bit counters) into a long-lived one (64-bit counters).
fn widen(dst: &mut Histogram<u64>, src: &Histogram<u32>) {
    for value in src.iter_recorded() {
        let count = u64::from(value.count_at_value());
        record_micros_n(dst, value.value_iterated_to(), count);
    }
}

/// Records `count` times one value; never fails (grows the histogram, or clamps if it somehow
/// cannot).
pub fn record_micros_n<T: Counter>(hist: &mut Histogram<T>, micros: u64, count: T) {
    if hist.record_n(micros, count).is_err() {
        hist.saturating_record_n(micros, count);
    }
}

fn heap_bytes<T: Counter>(hist: &Histogram<T>) -> usize {
    hist.distinct_values() * mem::size_of::<T>()
}

/// Counters kept per shard, per slice, per step and in total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests by status class: 1xx..5xx, then "error" (no response head).
    pub by_class: [u64; 6],
    pub errors_by_kind: [u64; ErrorKind::ALL.len()],
    pub client_aborts: u64,
}

impl Counts {
    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }

    fn add(&mut self, other: &Counts) {
        add_each(&mut self.by_class, &other.by_class);
        add_each(&mut self.errors_by_kind, &other.errors_by_kind);
        self.client_aborts += other.client_aborts;
    }
}

fn add_each(into: &mut [u64], from: &[u64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Seconds of sending a shard keeps waiting requests for (see [`Waiting`]).
pub const WAITING_SECONDS: usize = 64;

/// Requests sent upstream in one second (counted from the slot's creation) and how many of
/// them have had their answer. A shard reuses the entry of second `s` for `s + 64`: requests
/// waiting longer than that are no longer seen.
#[derive(Clone, Copy, Debug, Default)]
pub struct Waiting {
    pub second: u64,
    pub sent: u32,
    pub answered: u32,
}

/// What a recording shard holds between two drains, and its waiting requests.
#[derive(Debug)]
pub struct Shard {
    pub counts: Counts,
    pub hist: Histogram<u32>,
    /// Indexed by second modulo [`WAITING_SECONDS`]; never drained.
    pub waiting: [Waiting; WAITING_SECONDS],
}

impl Shard {
    pub fn new() -> Self {
        Shard {
            counts: Counts::default(),
            hist: empty_histogram(),
            waiting: [Waiting::default(); WAITING_SECONDS],
        }
    }

    pub fn heap_bytes(&self) -> usize {
        heap_bytes(&self.hist)
    }
}

/// One time slice of the sliding window. 32-bit counters suffice for one `SLICE`.
#[derive(Debug)]
struct Slice {
    counts: Counts,
    hist: Histogram<u32>,
    start: Instant,
}

impl Slice {
    fn new(start: Instant) -> Self {
        Slice {
            counts: Counts::default(),
            hist: empty_histogram(),
            start,
        }
    }
}

/// A long-lived accumulation (the step, the totals) with 64-bit counters.
#[derive(Debug)]
struct Accumulation {
    counts: Counts,
    hist: Histogram<u64>,
    start: Instant,
}

impl Accumulation {
    fn new(start: Instant) -> Self {
        Accumulation {
            counts: Counts::default(),
            hist: empty_histogram(),
            start,
        }
    }

    fn absorb(&mut self, counts: &Counts, hist: &Histogram<u32>) {
        self.counts.add(counts);
        widen(&mut self.hist, hist);
    }

    fn stats(&self, now: Instant) -> WindowStats {
        window_stats(
            &self.counts,
            self.hist.clone(),
            now.saturating_duration_since(self.start),
        )
    }
}

/// Everything drained from the shards, behind one mutex that readers, `rotate` and
/// `reset_step` take, and the request path for a request of an earlier epoch.
#[derive(Debug)]
pub struct Aggregate {
    /// The slice being filled since the last rotation.
    open: Slice,
    /// Up to `CLOSED_SLICES` finished slices, oldest first.
    closed: VecDeque<Slice>,
    step: Accumulation,
    totals: Accumulation,
    /// The slot's `version` label and its requests by class since the slot got it.
    version: Arc<str>,
    version_by_class: [u64; 6],
    /// Swapped with a shard's histogram to drain it without holding the shard's lock.
    pub spare: Histogram<u32>,
}

impl Aggregate {
    pub fn new(now: Instant) -> Self {
        Aggregate {
            open: Slice::new(now),
            closed: VecDeque::with_capacity(CLOSED_SLICES),
            step: Accumulation::new(now),
            totals: Accumulation::new(now),
            version: Arc::from(""),
            version_by_class: [0; 6],
            spare: empty_histogram(),
        }
    }

    /// Gives the slot a new `version` label at `now`: the label's requests and the sliding
    /// window start empty; the step and the lifetime totals go on. False (and nothing changes)
    /// when the label is the same.
    pub fn relabel(&mut self, version: &str, now: Instant) -> bool {
        if *self.version == *version {
            return false;
        }
        self.version = Arc::from(version);
        self.version_by_class = [0; 6];
        self.closed.clear();
        self.open.counts = Counts::default();
        self.open.hist.reset();
        self.open.start = now;
        true
    }

    /// Takes in one shard's counts, whose histogram was just swapped into `spare`.
    pub fn absorb_spare(&mut self, counts: &Counts) {
        self.open.counts.add(counts);
        merge(&mut self.open.hist, &self.spare);
        self.step.absorb(counts, &self.spare);
        self.totals.absorb(counts, &self.spare);
        add_each(&mut self.version_by_class, &counts.by_class);
        self.spare.reset();
    }

    /// Records one request's counts (`add`) and latency into the sliding window and the
    /// totals, not the step window: a request of an earlier epoch (on the request path, rare).
    pub fn record_past_step(&mut self, add: impl Fn(&mut Counts), micros: Option<u64>) {
        add(&mut self.open.counts);
        add(&mut self.totals.counts);
        let mut counts = Counts::default();
        add(&mut counts);
        add_each(&mut self.version_by_class, &counts.by_class);
        if let Some(micros) = micros {
            record_micros(&mut self.open.hist, micros);
            record_micros(&mut self.totals.hist, micros);
        }
    }

    /// Closes the open slice and drops the oldest one past the window, reusing its memory.
    pub fn rotate(&mut self, now: Instant) {
        let next = if self.closed.len() >= CLOSED_SLICES {
            self.closed.pop_front().map(|mut oldest| {
                oldest.counts = Counts::default();
                oldest.hist.reset();
                oldest.start = now;
                oldest
            })
        } else {
            None
        };
        let next = next.unwrap_or_else(|| Slice::new(now));
        self.closed.push_back(mem::replace(&mut self.open, next));
    }

    /// The open slice plus the closed ones kept, from the oldest kept slice's start to `now`.
    pub fn sliding(&self, now: Instant) -> WindowStats {
        let mut counts = Counts::default();
        // Adding same-shaped 32-bit histograms is a tight loop; widening walks values.
        let mut narrow = empty_histogram();
        for slice in self.closed.iter().chain([&self.open]) {
            counts.add(&slice.counts);
            merge(&mut narrow, &slice.hist);
        }
        let mut hist = empty_histogram();
        widen(&mut hist, &narrow);
        let start = self.closed.front().unwrap_or(&self.open).start;
        window_stats(&counts, hist, now.saturating_duration_since(start))
    }

    pub fn step(&self, now: Instant) -> WindowStats {
        self.step.stats(now)
    }

    /// Ends the step: returns it and starts an empty one at `now`.
    pub fn take_step(&mut self, now: Instant) -> WindowStats {
        let done = mem::replace(&mut self.step, Accumulation::new(now));
        window_stats(
            &done.counts,
            done.hist,
            now.saturating_duration_since(done.start),
        )
    }

    /// Starts an empty step at `now`, keeping the histogram's memory.
    pub fn reset_step(&mut self, now: Instant) {
        self.step.counts = Counts::default();
        self.step.hist.reset();
        self.step.start = now;
    }

    /// The requests of [`Self::totals`], without copying the histogram.
    pub fn total_requests(&self) -> u64 {
        self.totals.counts.requests()
    }

    pub fn totals(&self) -> Totals {
        let counts = &self.totals.counts;
        Totals {
            by_class: counts.by_class,
            errors_by_kind: counts.errors_by_kind,
            client_aborts: counts.client_aborts,
            histogram: self.totals.hist.clone(),
            version: Arc::clone(&self.version),
            version_by_class: self.version_by_class,
        }
    }

    pub fn heap_bytes(&self) -> usize {
        let slices: usize = (self.closed.iter().chain([&self.open]))
            .map(|slice| heap_bytes(&slice.hist))
            .sum();
        slices
            + heap_bytes(&self.step.hist)
            + heap_bytes(&self.totals.hist)
            + heap_bytes(&self.spare)
    }
}

fn window_stats(counts: &Counts, histogram: Histogram<u64>, elapsed: Duration) -> WindowStats {
    WindowStats {
        requests: counts.requests(),
        errors: counts.errors_by_kind.iter().sum(),
        errors_by_kind: counts.errors_by_kind,
        client_aborts: counts.client_aborts,
        histogram,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{rotate_every_slice, Epoch, ErrorKind, SlotMetrics};
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn record(m: &SlotMetrics, n: u64) {
        for _ in 0..n {
            m.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(5));
        }
    }

    async fn next_slice(m: &SlotMetrics) {
        tokio::time::advance(SLICE).await;
        m.rotate();
    }

    #[test]
    fn the_window_keeps_five_closed_slices_of_ten_seconds() {
        assert_eq!((SLICE, CLOSED_SLICES), (Duration::from_secs(10), 5));
    }

    #[tokio::test(start_paused = true)]
    async fn rps_uses_the_time_actually_covered() {
        let m = SlotMetrics::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        record(&m, 50);
        let stats = m.last_60s();
        assert_eq!(stats.elapsed, Duration::from_secs(5));
        assert_eq!(stats.rps(), 10.0);
        assert_eq!(m.step().rps(), 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn steady_traffic_reads_as_its_rate_once_the_window_is_full() {
        let m = SlotMetrics::new();
        for _ in 0..12 {
            record(&m, 100);
            next_slice(&m).await;
        }
        let stats = m.last_60s();
        assert_eq!(stats.elapsed, Duration::from_secs(50));
        assert_eq!(stats.requests, 500);
        assert_eq!(stats.rps(), 10.0);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(m.last_60s().elapsed, Duration::from_secs(59));
    }

    #[tokio::test(start_paused = true)]
    async fn records_leave_the_window_after_sixty_seconds() {
        let m = SlotMetrics::new();
        record(&m, 7);
        for slices in 1..=5 {
            next_slice(&m).await;
            let stats = m.last_60s();
            assert_eq!(stats.requests, 7, "after {slices} slices");
            assert_eq!(stats.elapsed, SLICE * slices);
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(m.last_60s().requests, 7);
        tokio::time::advance(Duration::from_secs(1)).await;
        m.rotate();
        let stats = m.last_60s();
        assert_eq!((stats.requests, stats.histogram.len()), (0, 0));
        assert_eq!(stats.elapsed, Duration::from_secs(50));
        assert_eq!(m.totals().requests(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn step_resets_independently_of_the_sliding_window() {
        let m = SlotMetrics::new();
        record(&m, 10);
        tokio::time::advance(Duration::from_secs(3)).await;
        m.reset_step();
        m.record_failure(Epoch::CURRENT, ErrorKind::Connect, Duration::from_millis(1));
        record(&m, 4);
        tokio::time::advance(Duration::from_secs(2)).await;

        let (step, window) = (m.step(), m.last_60s());
        assert_eq!((step.requests, step.errors), (5, 1));
        assert_eq!(step.elapsed, Duration::from_secs(2));
        assert_eq!((window.requests, window.errors), (15, 1));
        assert_eq!(window.elapsed, Duration::from_secs(5));

        // Two minutes on, the window has forgotten everything; the step has not.
        for _ in 0..12 {
            next_slice(&m).await;
        }
        assert_eq!(m.last_60s().requests, 0);
        let step = m.step();
        assert_eq!((step.requests, step.histogram.len()), (5, 4));
        assert_eq!(step.elapsed, Duration::from_secs(122));
    }

    #[tokio::test(start_paused = true)]
    async fn take_step_returns_the_finished_step_and_starts_an_empty_one() {
        let m = SlotMetrics::new();
        record(&m, 3);
        tokio::time::advance(Duration::from_secs(30)).await;
        let done = m.take_step();
        assert_eq!((done.requests, done.elapsed), (3, Duration::from_secs(30)));
        record(&m, 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        let next = m.step();
        assert_eq!((next.requests, next.elapsed), (2, Duration::from_secs(1)));
        assert_eq!(m.last_60s().requests, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_version_label_starts_the_version_counts_and_the_window_fresh() {
        let m = SlotMetrics::new();
        assert!(m.set_version("a"));
        record(&m, 5);
        next_slice(&m).await;
        record(&m, 2);
        assert!(m.set_version("b"));
        let (window, totals) = (m.last_60s(), m.totals());
        assert_eq!((window.requests, window.elapsed), (0, Duration::ZERO));
        assert_eq!((&*totals.version, totals.version_by_class[1]), ("b", 0));
        assert_eq!((totals.requests(), totals.histogram.len()), (7, 7));
        assert_eq!(m.step().requests, 7);

        record(&m, 3);
        tokio::time::advance(Duration::from_secs(2)).await;
        let window = m.last_60s();
        assert_eq!(
            (window.requests, window.elapsed),
            (3, Duration::from_secs(2))
        );
        assert_eq!(window.rps(), 1.5);
        assert_eq!(m.totals().version_by_class, [0, 3, 0, 0, 0, 0]);
        assert_eq!((m.totals().requests(), m.step().requests), (10, 10));

        // The same label again changes nothing.
        assert!(!m.set_version("b"));
        assert_eq!(m.last_60s().requests, 3);
        assert_eq!(m.totals().version_by_class, [0, 3, 0, 0, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn rotate_every_slice_rotates_once_per_slice() {
        let rotations = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&rotations);
        let task = tokio::spawn(rotate_every_slice(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(rotations.load(Ordering::Relaxed), 3);
        task.abort();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Response(u16, bool, u64),
        Failure(usize, u64),
        BodyFailure(usize),
        Abort,
        Rotate,
        ResetStep,
        TakeStep,
        Relabel(&'static str),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (100u16..600, any::<bool>(), 0u64..70_000_000)
                .prop_map(|(s, e, us)| Op::Response(s, e, us)),
            2 => (0usize..ErrorKind::ALL.len(), 0u64..70_000_000)
                .prop_map(|(k, us)| Op::Failure(k, us)),
            // A body fails after a connection was made: never as a connect error or an
            // overload.
            1 => (0usize..ErrorKind::ALL.len())
                .prop_filter("not connect or overload", |&k| {
                    !matches!(ErrorKind::ALL[k], ErrorKind::Connect | ErrorKind::Overload)
                })
                .prop_map(Op::BodyFailure),
            1 => Just(Op::Abort),
            1 => Just(Op::Rotate),
            1 => Just(Op::ResetStep),
            1 => Just(Op::TakeStep),
            1 => prop_oneof![Just("a"), Just("b")].prop_map(Op::Relabel),
        ]
    }

    /// The slot's behaviour spelled out with plain counters.
    #[derive(Default)]
    struct Model {
        totals: Counts,
        step: Counts,
        slices: VecDeque<Counts>,
        version: &'static str,
        version_by_class: [u64; 6],
    }

    impl Model {
        fn apply(&mut self, op: &Op) {
            let mut delta = Counts::default();
            match *op {
                Op::Response(status, is_error, _) => {
                    delta.by_class[usize::from(status / 100) - 1] += 1;
                    delta.errors_by_kind[0] += u64::from(is_error);
                }
                Op::Failure(kind, _) => {
                    delta.by_class[5] += 1;
                    delta.errors_by_kind[kind] += 1;
                }
                Op::BodyFailure(kind) => delta.errors_by_kind[kind] += 1,
                Op::Abort => delta.client_aborts += 1,
                Op::Rotate => {
                    self.slices.push_back(Counts::default());
                    if self.slices.len() > CLOSED_SLICES + 1 {
                        self.slices.pop_front();
                    }
                }
                Op::ResetStep | Op::TakeStep => self.step = Counts::default(),
                Op::Relabel(version) if version != self.version => {
                    self.version = version;
                    self.version_by_class = [0; 6];
                    self.slices.clear();
                }
                Op::Relabel(_) => {}
            }
            add_each(&mut self.version_by_class, &delta.by_class);
            for counts in [&mut self.totals, &mut self.step] {
                counts.add(&delta);
            }
            if self.slices.is_empty() {
                self.slices.push_back(Counts::default());
            }
            if let Some(open) = self.slices.back_mut() {
                open.add(&delta);
            }
        }

        fn window(&self) -> Counts {
            let mut sum = Counts::default();
            self.slices.iter().for_each(|c| sum.add(c));
            sum
        }
    }

    fn apply(m: &SlotMetrics, op: &Op) {
        let kind = |k: usize| ErrorKind::ALL[k];
        match *op {
            Op::Response(s, e, us) => {
                m.record_response(Epoch::CURRENT, s, e, Duration::from_micros(us))
            }
            Op::Failure(k, us) => {
                m.record_failure(Epoch::CURRENT, kind(k), Duration::from_micros(us))
            }
            Op::BodyFailure(k) => m.record_body_failure(Epoch::CURRENT, kind(k)),
            Op::Abort => m.record_client_abort(),
            Op::Rotate => m.rotate(),
            Op::ResetStep => m.reset_step(),
            Op::TakeStep => drop(m.take_step()),
            Op::Relabel(version) => drop(m.set_version(version)),
        }
    }

    fn assert_matches(stats: &WindowStats, want: &Counts) {
        assert_eq!(stats.requests, want.requests());
        assert_eq!(stats.errors_by_kind, want.errors_by_kind);
        assert_eq!(stats.errors, want.errors_by_kind.iter().sum::<u64>());
        assert_eq!(stats.client_aborts, want.client_aborts);
        assert_eq!(stats.histogram.len(), samples(want));
    }

    /// Latency samples: every request but those whose connection was never made or tried.
    fn samples(counts: &Counts) -> u64 {
        counts.requests()
            - counts.errors_by_kind[ErrorKind::Connect.index()]
            - counts.errors_by_kind[ErrorKind::Overload.index()]
    }

    proptest! {
        // Few cases: each op drains and copies histograms up to 60 s wide (slow in debug builds).
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn windows_and_totals_follow_the_model_and_totals_never_decrease(
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let m = SlotMetrics::with_shards(2);
            let mut model = Model::default();
            let mut last = Counts::default();
            for op in &ops {
                apply(&m, op);
                model.apply(op);
                let totals = m.totals();
                let now = Counts {
                    by_class: totals.by_class,
                    errors_by_kind: totals.errors_by_kind,
                    client_aborts: totals.client_aborts,
                };
                prop_assert_eq!(now, model.totals);
                prop_assert_eq!(totals.histogram.len(), samples(&now));
                prop_assert_eq!(&*totals.version, model.version);
                prop_assert_eq!(totals.version_by_class, model.version_by_class);
                let grew = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x >= y);
                prop_assert!(grew(&now.by_class, &last.by_class));
                prop_assert!(grew(&now.errors_by_kind, &last.errors_by_kind));
                prop_assert!(now.client_aborts >= last.client_aborts);
                last = now;
            }
            assert_matches(&m.step(), &model.step);
            assert_matches(&m.last_60s(), &model.window());
        }
    }
}
