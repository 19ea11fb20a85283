//! A warning of something that can happen many times a second (a failing accept, a failing
//! upstream): told the first time, then at most once per period with how many times it
//! happened since, so that a storm is told without a log line per event.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::{Duration, Instant};

pub struct WarnEvery {
    every: Duration,
    origin: Instant,
    /// When it was last told, in milliseconds after `origin` plus one (0: never).
    told_at: AtomicU64,
    /// The times it happened since it was last told.
    since: AtomicU64,
}

impl WarnEvery {
    pub fn new(every: Duration) -> Self {
        WarnEvery {
            every,
            origin: Instant::now(),
            told_at: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// It happened at `now`: `Some(times since it was last told, this one included)` when it
    /// is time to tell it. Lock-free, for threads that share it: one wins the race to tell,
    /// the others' times go into the next count.
    pub fn happened(&self, now: Instant) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1);
        let at = millis(now.saturating_duration_since(self.origin)) + 1;
        let last = self.told_at.load(Ordering::Relaxed);
        if last != 0 && at < last.saturating_add(millis(self.every)) {
            return None;
        }
        self.told_at
            .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.since.swap(0, Ordering::Relaxed))
    }
}
