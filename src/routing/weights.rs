//! Where the weight is decided: a bucket goes to the canary iff `bucket < canary basis points`.
//!
//! Buckets never move between slots except across the weight boundary, so raising the weight
//! only moves buckets stable → canary and lowering it only canary → stable. After a promotion
//! the roles swap with the weight at 100 %: every bucket was on the canary (the new stable)
//! and the weight becomes 0, so every bucket stays where it was. The next rollout again moves
//! the lowest buckets first, now from the new stable to the new canary.

use std::sync::atomic::{AtomicU64, Ordering};

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

    /// 15 bits: the stable slot above the weight (at most [`BUCKETS`], under 2^14).
    fn pack(self) -> u64 {
        let green = u64::from(self.stable == Slot::Green) << 14;
        green | u64::from(self.canary_bp.min(BUCKETS))
    }

    fn unpack(bits: u64) -> Split {
        Split {
            stable: if bits >> 14 & 1 == 1 {
                Slot::Green
            } else {
                Slot::Blue
            },
            canary_bp: (bits & 0x3fff) as u32,
        }
    }
}

/// A route's [`Split`], readable on the request path with one atomic load (stable slot and
/// weight change together, never torn).
///
/// A reload makes a new routing table, perhaps with other endpoints for a slot, and may
/// change the weight (a new canary starts its rollout). Requests that take the old table
/// while a reload makes and publishes the new one must not meet the new weight, nor requests
/// of the new table the old one. So each table's routes have a generation
/// ([`SharedSplit::next_generation`]); the old table's requests get the split as it was when
/// the reload began. A reload begins the generation, sets the new weight, then publishes the
/// table. Meanwhile the old table's requests count in no step window
/// (`SlotMetrics::outside_steps`) and the controller does not judge by its config
/// (`Route::is_current`). A request of a table two reloads old gets the split of the one
/// before the current.
///
/// Bits 0-14: the current split; 16-30: the split as it was when the current generation
/// began; 32-63: the current generation.
#[derive(Debug)]
pub struct SharedSplit(AtomicU64);

const PREVIOUS_SHIFT: u32 = 16;
const GENERATION_SHIFT: u32 = 32;
const SPLIT_BITS: u64 = 0x7fff;

impl SharedSplit {
    pub fn new(split: Split) -> Self {
        let bits = split.pack();
        Self(AtomicU64::new(bits | bits << PREVIOUS_SHIFT))
    }

    /// The current split.
    pub fn load(&self) -> Split {
        Split::unpack(self.0.load(Ordering::Acquire) & SPLIT_BITS)
    }

    /// The split for a route of `generation`: the current split, or for a route of an older
    /// table (a request that took it while a reload was making and publishing the next one),
    /// the one its table had.
    pub fn load_for(&self, generation: u32) -> Split {
        let bits = self.0.load(Ordering::Acquire);
        if (bits >> GENERATION_SHIFT) as u32 == generation {
            Split::unpack(bits & SPLIT_BITS)
        } else {
            Split::unpack(bits >> PREVIOUS_SHIFT & SPLIT_BITS)
        }
    }

    /// The current generation.
    pub fn generation(&self) -> u32 {
        (self.0.load(Ordering::Acquire) >> GENERATION_SHIFT) as u32
    }

    /// Sets the current split (the controller, the admin API, a reload's reconcile).
    pub fn store(&self, split: Split) {
        self.update(|bits| bits & !SPLIT_BITS | split.pack());
    }

    /// Begins the generation of a new routing table and returns it: the current split is kept
    /// as the one for the tables before it. A table is made to be published; one made and
    /// dropped unpublished would leave the published table's routes on the kept split.
    pub fn next_generation(&self) -> u32 {
        let bits = self.update(|bits| {
            let generation = ((bits >> GENERATION_SHIFT) as u32).wrapping_add(1);
            let current = bits & SPLIT_BITS;
            u64::from(generation) << GENERATION_SHIFT | current << PREVIOUS_SHIFT | current
        });
        (bits >> GENERATION_SHIFT) as u32
    }

    /// Applies `change` atomically; returns the new bits.
    fn update(&self, change: impl Fn(u64) -> u64) -> u64 {
        let old = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                Some(change(bits))
            })
            .unwrap_or_else(|bits| bits);
        change(old)
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

        /// A reload begins a generation while the controller and the admin API keep setting
        /// the split: the current generation always reads the last split stored, and the one
        /// before it the split current when the new one began.
        #[test]
        fn each_generation_reads_its_own_split(
            first in (slot(), 0..=BUCKETS),
            moves in proptest::collection::vec(
                (any::<bool>(), slot(), 0..=BUCKETS), 1..32
            ),
        ) {
            let split = |(stable, canary_bp)| Split { stable, canary_bp };
            let shared = SharedSplit::new(split(first));
            let mut generation = 0u32;
            let (mut current, mut before) = (split(first), split(first));
            for (reload, stable, canary_bp) in moves {
                if reload {
                    let next = shared.next_generation();
                    prop_assert_eq!(next, generation.wrapping_add(1));
                    generation = next;
                    before = current;
                }
                current = Split { stable, canary_bp };
                shared.store(current);
                prop_assert_eq!(shared.load(), current);
                prop_assert_eq!(shared.generation(), generation);
                prop_assert_eq!(shared.load_for(generation), current);
                prop_assert_eq!(shared.load_for(generation.wrapping_sub(1)), before);
            }
        }
    }
}
