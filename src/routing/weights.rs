//! Where the weight is decided: a bucket goes to the canary iff `bucket < canary basis points`.
//!
//! Buckets never move between slots except across the weight boundary, so raising the weight
//! only moves buckets stable → canary and lowering it only canary → stable. After a promotion
//! the roles swap with the weight at 100 %: every bucket was on the canary (the new stable)
//! and the weight becomes 0, so every bucket stays where it was. The next rollout again moves
//! the lowest buckets first, now from the new stable to the new canary.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::Slot;

use super::sticky::BUCKETS;

/// The route's split: which slot is stable, and the canary weight in basis points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub stable: Slot,
    pub canary_bp: u32,
}

impl Split {
    pub fn canary(self) -> Slot {
        self.stable.other()
    }

    /// The slot for a bucket.
    pub fn slot_for(self, bucket: u32) -> Slot {
        if bucket < self.canary_bp {
            self.canary()
        } else {
            self.stable
        }
    }

    pub fn canary_percent(self) -> f64 {
        f64::from(self.canary_bp) / 100.0
    }

    fn pack(self) -> u32 {
        let green = u32::from(self.stable == Slot::Green) << 31;
        green | self.canary_bp.min(BUCKETS)
    }

    fn unpack(bits: u32) -> Split {
        Split {
            stable: if bits >> 31 == 1 {
                Slot::Green
            } else {
                Slot::Blue
            },
            canary_bp: bits & 0x7fff_ffff,
        }
    }
}

/// A [`Split`] readable on the request path with one atomic load (stable slot and weight
/// change together, never torn).
#[derive(Debug)]
pub struct SharedSplit(AtomicU32);

impl SharedSplit {
    pub fn new(split: Split) -> Self {
        Self(AtomicU32::new(split.pack()))
    }

    pub fn load(&self) -> Split {
        Split::unpack(self.0.load(Ordering::Acquire))
    }

    pub fn store(&self, split: Split) {
        self.0.store(split.pack(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot() -> impl Strategy<Value = Slot> {
        prop_oneof![Just(Slot::Blue), Just(Slot::Green)]
    }

    proptest! {
        #[test]
        fn raising_the_weight_only_moves_buckets_stable_to_canary(
            stable in slot(), bucket in 0..BUCKETS, a in 0..=BUCKETS, b in 0..=BUCKETS
        ) {
            let (low, high) = (a.min(b), a.max(b));
            let before = Split { stable, canary_bp: low }.slot_for(bucket);
            let after = Split { stable, canary_bp: high }.slot_for(bucket);
            if before != after {
                prop_assert_eq!(before, stable);
                prop_assert_eq!(after, stable.other());
            }
        }

        #[test]
        fn weight_zero_is_all_stable_and_full_is_all_canary(stable in slot(), bucket in 0..BUCKETS) {
            prop_assert_eq!(Split { stable, canary_bp: 0 }.slot_for(bucket), stable);
            prop_assert_eq!(Split { stable, canary_bp: BUCKETS }.slot_for(bucket), stable.other());
        }

        #[test]
        fn promotion_keeps_every_bucket_in_place(stable in slot(), bucket in 0..BUCKETS) {
            let at_full = Split { stable, canary_bp: BUCKETS }.slot_for(bucket);
            let promoted = Split { stable: stable.other(), canary_bp: 0 }.slot_for(bucket);
            prop_assert_eq!(at_full, promoted);
        }

        #[test]
        fn packing_round_trips(stable in slot(), canary_bp in 0..=BUCKETS) {
            let split = Split { stable, canary_bp };
            let shared = SharedSplit::new(split);
            prop_assert_eq!(shared.load(), split);
        }
    }
}
