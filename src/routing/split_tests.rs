//! Properties of the split through [`Route::decide`] (key extraction, hash, weight): the share
//! of distinct keys on the canary, stickiness, and monotonicity under a changing weight.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

use super::sticky::BUCKETS;
use super::{Route, RouteShared, RoutingTable, Split};
use crate::config::parse;
use crate::rollout::RouteRollout;
use crate::Slot;

/// Distinct keys per share measurement.
const KEYS: u32 = 100_000;

/// Allowed distance between the canary share and the weight, in percentage points.
///
/// At `n = 100_000` distinct keys the share is binomial: its standard deviation is
/// `sqrt(p (1 - p) / n)`, at most 0.158 points (at `p = 0.5`), so 0.5 points is more than
/// 3.16 sd (a chance below 0.16 % per weight for a fair hash). A weight is a whole number of
/// buckets (0.01 % each) and `bucket < weight` holds for exactly `weight` of the 10000
/// buckets, so the expected share equals the weight with no rounding term.
const SHARE_BOUND_POINTS: f64 = 0.5;

fn table(by: &str) -> RoutingTable {
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\nname = \"shop\"\n\
         [route.blue]\nendpoints = [\"127.0.0.1:1\"]\n[route.green]\nendpoints = [\"127.0.0.1:2\"]\n\
         [route.sticky]\nby = \"{by}\"\ncookie = \"veer_shop\"\n"
    );
    let config = parse(&text, None).unwrap();
    RoutingTable::new(config, |rc| {
        Arc::new(RouteShared::new(
            rc.name.clone(),
            Split {
                stable: rc.stable,
                canary_bp: 0,
            },
            RouteRollout::detached(rc),
        ))
    })
}

fn only_route(table: &RoutingTable) -> &Route {
    &table.routes()[0]
}

fn set_weight(route: &Route, stable: Slot, canary_bp: u32) {
    route.shared.split.store(Split { stable, canary_bp });
}

const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn header(name: &'static str, value: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_str(value).unwrap());
    headers
}

/// Percentage of `KEYS` distinct `x-user` keys (prefixed by `nonce`) that `decide` sends to
/// the canary.
fn canary_share(route: &Route, nonce: u64) -> f64 {
    let canary = route.shared.split.load().canary();
    let mut headers = HeaderMap::new();
    let mut on_canary = 0u32;
    for i in 0..KEYS {
        let key = format!("{nonce:016x}-{i}");
        headers.insert("x-user", HeaderValue::from_str(&key).unwrap());
        if route.decide(&headers, PEER).slot == canary {
            on_canary += 1;
        }
    }
    f64::from(on_canary) * 100.0 / f64::from(KEYS)
}

#[test]
fn canary_share_of_distinct_keys_matches_several_weights() {
    let table = table("header:x-user");
    let route = only_route(&table);
    let nonce = fastrand::u64(..);
    for weight_bp in [0, 1, 100, 1_000, 2_500, 3_333, 5_000, 9_000, 9_999, BUCKETS] {
        set_weight(route, Slot::Blue, weight_bp);
        let share = canary_share(route, nonce);
        let weight = f64::from(weight_bp) / 100.0;
        assert!(
            (share - weight).abs() <= SHARE_BOUND_POINTS,
            "weight {weight} %: {share} % of {KEYS} keys (nonce {nonce:x}) on the canary"
        );
        if weight_bp == 0 || weight_bp == BUCKETS {
            assert_eq!(share, weight, "0 and 100 % are exact");
        }
    }
}

proptest! {
    // The seed is fixed so that the small chance of a > 3 sd excursion (see
    // `SHARE_BOUND_POINTS`) cannot make a run fail at random; the keys are still arbitrary.
    #![proptest_config(ProptestConfig {
        cases: 6,
        rng_seed: RngSeed::Fixed(0x7665_6572),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn canary_share_of_random_keys_matches_any_weight(
        nonce in any::<u64>(), weight_bp in 0..=BUCKETS, green_stable in any::<bool>()
    ) {
        let table = table("header:x-user");
        let route = only_route(&table);
        let stable = if green_stable { Slot::Green } else { Slot::Blue };
        set_weight(route, stable, weight_bp);
        let share = canary_share(route, nonce);
        let weight = f64::from(weight_bp) / 100.0;
        prop_assert!(
            (share - weight).abs() <= SHARE_BOUND_POINTS,
            "weight {} %: {} % on the canary", weight, share
        );
    }
}

proptest! {
    #[test]
    fn a_keys_slot_never_changes_while_the_weight_is_unchanged(
        user in "[!-~]{1,40}",
        cookie in "[0-9a-f]{32}",
        ip in any::<[u8; 16]>(),
        ip4 in any::<[u8; 4]>(),
        weight_bp in 0..=BUCKETS,
    ) {
        let cases = [
            ("header:x-user", header("x-user", &user), PEER),
            ("cookie", header("cookie", &format!("other=1; veer_shop={cookie}")), PEER),
            ("client-ip", HeaderMap::new(), IpAddr::from(ip)),
            ("client-ip", HeaderMap::new(), IpAddr::from(ip4)),
        ];
        for (by, headers, peer) in cases {
            // A second snapshot from the same config: a reload, or another veer instance.
            let (first, second) = (table(by), table(by));
            set_weight(only_route(&first), Slot::Blue, weight_bp);
            set_weight(only_route(&second), Slot::Blue, weight_bp);
            let decision = only_route(&first).decide(&headers, peer);
            prop_assert!(decision.keyed, "{}", by);
            prop_assert_eq!(decision.new_cookie, None);
            for _ in 0..3 {
                prop_assert_eq!(only_route(&first).decide(&headers, peer), decision);
            }
            prop_assert_eq!(only_route(&second).decide(&headers, peer), decision);
        }
    }

    #[test]
    fn a_new_cookie_keeps_the_slot_of_the_first_visit(weight_bp in 0..=BUCKETS) {
        let table = table("cookie");
        let route = only_route(&table);
        set_weight(route, Slot::Blue, weight_bp);
        let first = route.decide(&HeaderMap::new(), PEER);
        let id = first.new_cookie.unwrap();
        let cookie = format!("veer_shop={}", std::str::from_utf8(&id).unwrap());
        let next = route.decide(&header("cookie", &cookie), PEER);
        prop_assert_eq!(next.new_cookie, None);
        prop_assert_eq!((next.slot, next.bucket), (first.slot, first.bucket));
    }

    #[test]
    fn a_changing_weight_moves_keys_only_across_its_boundary(
        users in proptest::collection::vec("[!-~]{1,24}", 1..64),
        mut weights in proptest::collection::vec(0..=BUCKETS, 2..8),
        green_stable in any::<bool>(),
    ) {
        let table = table("header:x-user");
        let route = only_route(&table);
        let stable = if green_stable { Slot::Green } else { Slot::Blue };
        let headers: Vec<HeaderMap> = users.iter().map(|u| header("x-user", u)).collect();
        let slots = |weight_bp| {
            set_weight(route, stable, weight_bp);
            headers.iter().map(|h| route.decide(h, PEER).slot).collect::<Vec<_>>()
        };
        weights.sort_unstable();
        let rising: Vec<Vec<Slot>> = weights.iter().map(|&w| slots(w)).collect();
        for pair in rising.windows(2) {
            for (before, after) in pair[0].iter().zip(&pair[1]) {
                prop_assert!(
                    before == after || (*before == stable && *after == stable.other()),
                    "raising the weight moved a key {} -> {}", before, after
                );
            }
        }
        let falling: Vec<Vec<Slot>> = weights.iter().rev().map(|&w| slots(w)).collect();
        for pair in falling.windows(2) {
            for (before, after) in pair[0].iter().zip(&pair[1]) {
                prop_assert!(
                    before == after || (*before == stable.other() && *after == stable),
                    "lowering the weight moved a key {} -> {}", before, after
                );
            }
        }
        // Back at a weight, every key is where it was at that weight before.
        let mut back = falling;
        back.reverse();
        prop_assert_eq!(back, rising);
    }
}

/// A reload that moves green to new endpoints and starts its rollout there: a request that
/// took the old table just before the new one was published must not go to green's old
/// endpoints at the new weight, nor one of the new table to its new endpoints at the old
/// weight (a reload that lowers the weight while moving the endpoints).
#[test]
fn requests_of_a_replaced_table_keep_its_weight() {
    let old = table("header:x-user");
    let shared = Arc::clone(&only_route(&old).shared);
    set_weight(only_route(&old), Slot::Blue, 2500);
    let new = RoutingTable::new((*old.config).clone(), |_| Arc::clone(&shared));
    // The reload's reconcile sets the new weight; then the new table is published.
    set_weight(only_route(&new), Slot::Blue, 7500);
    assert!(!only_route(&old).is_current() && only_route(&new).is_current());
    for (table, weight_bp) in [(&old, 2500), (&new, 7500), (&old, 2500)] {
        for i in 0..1000 {
            let decision = only_route(table).decide(&header("x-user", &format!("user-{i}")), PEER);
            let green = decision.bucket < weight_bp;
            assert_eq!(
                decision.slot == Slot::Green,
                green,
                "{decision:?} at {weight_bp}"
            );
        }
    }
    assert_eq!(shared.split.load().canary_bp, 7500);
}
