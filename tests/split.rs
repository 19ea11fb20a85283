//! The split through the proxy over real sockets: sticky keys (cookie, header, client IP, none),
//! a weight that moves users only across its boundary, the override header, agreement between
//! two instances, and promotion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;

use http::HeaderMap;
use serde_json::Value;
use support::*;
use veer::routing::sticky;

/// `[route.sticky]` and a manual `[route.rollout]` at `weight` percent.
fn manual(weight: f64, sticky: &str) -> String {
    format!("[route.sticky]\n{sticky}\n[route.rollout]\nmode = \"manual\"\nweight = {weight:?}\n")
}

async fn upstreams() -> (Upstream, Upstream) {
    (recording("blue").await, recording("green").await)
}

/// veer with the route `split` between recording blue and green upstreams, `extra` appended
/// to the route (e.g. `manual(..)`); returns veer, blue and green.
async fn split(extra: &str) -> (Veer, Upstream, Upstream) {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("split", blue.addr, green.addr, extra)).await;
    (veer, blue, green)
}

/// The slot that answered, from the upstream's `x-upstream` header.
fn slot_of(headers: &HeaderMap) -> String {
    headers["x-upstream"].to_str().unwrap().to_string()
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

/// The slot that answered each request (GETs of `/` with these header lists), each a 200.
async fn slots_of(veer: &Veer, requests: Vec<Vec<(String, String)>>) -> Vec<String> {
    get_many(&veer.url("/"), requests, 16)
        .await
        .into_iter()
        .map(|(status, headers, _)| {
            assert_eq!(status, 200);
            slot_of(&headers)
        })
        .collect()
}

/// The slot of each user (`x-user` header), one request each.
async fn slots_of_users(veer: &Veer, users: &[String]) -> Vec<String> {
    let requests = users
        .iter()
        .map(|u| vec![("x-user".to_string(), u.clone())])
        .collect();
    slots_of(veer, requests).await
}

fn count(slots: &[String], slot: &str) -> usize {
    slots.iter().filter(|s| *s == slot).count()
}

/// The percentage of `slots` on green.
fn green_share(slots: &[String]) -> f64 {
    count(slots, "green") as f64 * 100.0 / slots.len() as f64
}

async fn set_weight(veer: &Veer, route: &str, percent: f64) {
    let (status, body) = veer
        .admin_post(
            &format!("/api/v1/routes/{route}/weight"),
            &format!("{{\"canary_percent\": {percent}}}"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["canary_weight"], percent, "{body}");
}

/// POSTs `/api/v1/routes/split/rollout/{action}`; the answer must be a 200.
async fn rollout(veer: &Veer, action: &str) -> Value {
    let path = format!("/api/v1/routes/split/rollout/{action}");
    let (status, body) = veer.admin_post(&path, "").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// `(name, value, attributes)` of a `Set-Cookie` value.
fn parse_set_cookie(value: &str) -> (String, String, Vec<String>) {
    let mut parts = value.split(';').map(str::trim);
    let (name, id) = parts.next().unwrap().split_once('=').unwrap();
    (
        name.to_string(),
        id.to_string(),
        parts.map(str::to_string).collect(),
    )
}

fn is_veer_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn first_visit_sets_a_cookie_that_keeps_its_slot() {
    let sticky = "by = \"cookie\"\ncookie = \"veer_sess\"\ncookie_max_age = \"1h\"";
    let (veer, _blue, _green) = split(&manual(50.0, sticky)).await;
    let mut first_slots = HashSet::new();
    for _ in 0..20 {
        let (status, headers, _) = get(&veer.url("/"), &[]).await;
        assert_eq!(status, 200);
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies.len(), 1, "{cookies:?}");
        let (name, id, attributes) = parse_set_cookie(cookies[0].to_str().unwrap());
        assert_eq!(name, "veer_sess");
        assert!(is_veer_id(&id), "{id}");
        for wanted in ["Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=3600"] {
            assert!(attributes.iter().any(|a| a == wanted), "{attributes:?}");
        }
        assert!(!attributes.iter().any(|a| a == "Secure"), "plain HTTP");
        let slot = slot_of(&headers);
        let again = vec![vec![("cookie".to_string(), format!("veer_sess={id}"))]; 10];
        for (status, headers, _) in get_many(&veer.url("/"), again, 4).await {
            assert_eq!(status, 200);
            assert_eq!(slot_of(&headers), slot, "cookie {id} changed slot");
            assert!(!headers.contains_key("set-cookie"), "cookie set twice");
        }
        first_slots.insert(slot);
    }
    // At 50 %, 20 fresh cookies all in one slot has a chance of 2^-19.
    assert_eq!(first_slots.len(), 2, "{first_slots:?}");
    veer.shutdown().await;
}

#[tokio::test]
async fn malformed_or_foreign_cookie_is_treated_as_absent() {
    let sticky = "by = \"cookie\"\ncookie = \"veer_sess\"";
    let (veer, _blue, _green) = split(&manual(50.0, sticky)).await;
    let sent = [
        "veer_sess=evil",
        "veer_sess=",
        "veer_sess=0123456789ABCDEF0123456789ABCDEF",
        "veer_sess=0123456789abcdef0123456789abcdef0",
        "veer_other=0123456789abcdef0123456789abcdef",
        "a=1; b; =x; veer_sess",
    ];
    for cookie in sent {
        let (status, headers, body) = get(&veer.url("/"), &[("cookie", cookie)]).await;
        assert_eq!(status, 200, "{cookie}");
        assert!(body == "blue\n" || body == "green\n", "{cookie}: {body:?}");
        let set = headers["set-cookie"].to_str().unwrap();
        let (name, id, _) = parse_set_cookie(set);
        assert_eq!(name, "veer_sess", "{cookie}");
        assert!(is_veer_id(&id), "{cookie}: {id}");
        assert!(!cookie.contains(&id), "{cookie}: id reused");
    }
    veer.shutdown().await;
}

#[tokio::test]
async fn a_valid_cookie_wins_over_a_malformed_one_of_the_same_name() {
    let sticky = "by = \"cookie\"\ncookie = \"veer_sess\"";
    let (veer, _blue, _green) = split(&manual(50.0, sticky)).await;
    for _ in 0..10 {
        let (_, headers, _) = get(&veer.url("/"), &[]).await;
        let (_, id, _) = parse_set_cookie(headers["set-cookie"].to_str().unwrap());
        let slot = slot_of(&headers);
        // Browsers send several cookies of one name (other paths or domains), in any order.
        for cookie in [
            format!("veer_sess=stale; veer_sess={id}"),
            format!("veer_sess={id}; veer_sess=stale"),
        ] {
            let (status, headers, _) = get(&veer.url("/"), &[("cookie", &cookie)]).await;
            assert_eq!(status, 200);
            assert!(!headers.contains_key("set-cookie"), "{cookie}");
            assert_eq!(slot_of(&headers), slot, "{cookie}");
        }
    }
    veer.shutdown().await;
}

#[tokio::test]
async fn header_key_keeps_its_slot_and_a_missing_header_is_random() {
    let (veer, blue, green) = split(&manual(50.0, "by = \"header:x-user\"")).await;
    let users = users(200);
    let repeated: Vec<String> = users.iter().flat_map(|u| vec![u.clone(); 5]).collect();
    let slots = slots_of_users(&veer, &repeated).await;
    for (user, answers) in users.iter().zip(slots.chunks(5)) {
        assert!(
            answers.iter().all(|s| *s == answers[0]),
            "{user}: {answers:?}"
        );
    }
    // 200 users at 50 %: both slots are used (one slot only: chance 2^-199).
    assert!(count(&slots, "green") > 0 && count(&slots, "blue") > 0);
    assert!(!blue.seen().is_empty() && !green.seen().is_empty());

    let keyless = slots_of(&veer, vec![vec![]; 200]).await;
    // Without the header each request draws a bucket: 200 requests at 50 % all in one slot
    // has a chance of 2^-199.
    assert!(count(&keyless, "green") > 0 && count(&keyless, "blue") > 0);
    // An empty value is no key either (else every client sending one would share a bucket):
    // the same chance of 2^-199 per value.
    for empty in ["", "   "] {
        let requests = vec![vec![("x-user".to_string(), empty.to_string())]; 200];
        let slots = slots_of(&veer, requests).await;
        assert!(
            count(&slots, "green") > 0 && count(&slots, "blue") > 0,
            "{empty:?}"
        );
    }
    veer.shutdown().await;
}

#[tokio::test]
async fn client_ip_puts_every_request_from_one_address_in_one_slot() {
    let (veer, _blue, _green) = split(&manual(50.0, "by = \"client-ip\"")).await;
    let slots = slots_of(&veer, vec![vec![]; 200]).await;
    let bucket = sticky::bucket(sticky::seed("split"), &[127, 0, 0, 1]);
    let expected = if bucket < 5_000 { "green" } else { "blue" };
    assert_eq!(count(&slots, expected), 200, "bucket {bucket}");
    veer.shutdown().await;
}

#[tokio::test]
async fn sticky_none_splits_each_request_by_the_weight() {
    let (veer, _blue, green) = split(&manual(30.0, "by = \"none\"")).await;
    // One and the same `x-user` on every request: with `none` it does not matter.
    let requests = vec![vec![("x-user".to_string(), "same".to_string())]; 2_000];
    let slots = slots_of(&veer, requests).await;
    // N = 2000 requests at 30 %: sd = sqrt(0.3 * 0.7 / 2000) = 1.02 points; bound 5 points
    // (4.9 sd).
    let share = green_share(&slots);
    assert!((share - 30.0).abs() <= 5.0, "{share} % on the canary");
    assert_eq!(green.request_count() as usize, count(&slots, "green"));
    veer.shutdown().await;
}

/// Keys that changed slot between two assignments, as `(from, to)` pairs.
fn moves(before: &[String], after: &[String]) -> HashSet<(String, String)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b != a)
        .map(|(b, a)| (b.clone(), a.clone()))
        .collect()
}

#[tokio::test]
async fn changing_the_weight_moves_users_only_across_its_boundary() {
    let (veer, _blue, _green) = split(&manual(10.0, "by = \"header:x-user\"")).await;
    // N = 2000 distinct users. At 10 % the canary share has sd 0.67 points, at 50 % 1.12
    // points; the bounds below (3 and 5 points) are above 4.4 sd.
    let users = users(2_000);
    let at_10 = slots_of_users(&veer, &users).await;
    let share = green_share(&at_10);
    assert!((share - 10.0).abs() <= 3.0, "{share}");

    set_weight(&veer, "split", 50.0).await;
    let at_50 = slots_of_users(&veer, &users).await;
    let share = green_share(&at_50);
    assert!((share - 50.0).abs() <= 5.0, "{share}");
    let up = moves(&at_10, &at_50);
    assert_eq!(
        up,
        HashSet::from([("blue".to_string(), "green".to_string())])
    );

    set_weight(&veer, "split", 10.0).await;
    let back = slots_of_users(&veer, &users).await;
    let down = moves(&at_50, &back);
    assert_eq!(
        down,
        HashSet::from([("green".to_string(), "blue".to_string())])
    );
    assert_eq!(back, at_10, "the same weight puts every user back in place");

    set_weight(&veer, "split", 0.0).await;
    assert_eq!(count(&slots_of_users(&veer, &users).await, "blue"), 2_000);
    set_weight(&veer, "split", 100.0).await;
    assert_eq!(count(&slots_of_users(&veer, &users).await, "green"), 2_000);
    veer.shutdown().await;
}

#[tokio::test]
async fn override_header_forces_a_slot_and_is_not_forwarded() {
    let (veer, blue, green) = split(&manual(0.0, "by = \"header:x-user\"")).await;
    for _ in 0..10 {
        let (status, headers, _) = get(&veer.url("/"), &[("x-veer-slot", "green")]).await;
        assert_eq!(status, 200);
        assert_eq!(slot_of(&headers), "green");
    }
    let (_, headers, _) = get(&veer.url("/"), &[("x-veer-slot", " GREEN")]).await;
    assert_eq!(
        slot_of(&headers),
        "green",
        "the value's letter case does not matter"
    );
    let (_, headers, _) = get(&veer.url("/"), &[("x-veer-slot", "purple")]).await;
    assert_eq!(slot_of(&headers), "blue", "an unknown value is ignored");
    set_weight(&veer, "split", 100.0).await;
    let (_, headers, _) = get(&veer.url("/"), &[("x-veer-slot", "blue")]).await;
    assert_eq!(slot_of(&headers), "blue", "the override wins at 100 % too");

    let seen: Vec<_> = blue.seen().into_iter().chain(green.seen()).collect();
    assert_eq!(seen.len(), 13);
    assert!(seen.iter().all(|s| !s.headers.contains_key("x-veer-slot")));
    assert_eq!(green.seen().len(), 11);
    veer.shutdown().await;
}

#[tokio::test]
async fn an_empty_override_header_disables_the_override() {
    let extra = manual(0.0, "by = \"header:x-user\"\noverride_header = \"\"");
    let (veer, blue, green) = split(&extra).await;
    for _ in 0..10 {
        let (_, headers, _) = get(&veer.url("/"), &[("x-veer-slot", "green")]).await;
        assert_eq!(slot_of(&headers), "blue");
    }
    assert_eq!(green.request_count(), 0);
    // Not veer's header any more: it reaches the application like any other.
    assert!(blue
        .seen()
        .iter()
        .all(|s| s.headers["x-veer-slot"] == "green"));
    veer.shutdown().await;
}

#[tokio::test]
async fn two_instances_with_the_same_config_agree_on_every_key() {
    let (blue, green) = upstreams().await;
    let routes = route(
        "split",
        blue.addr,
        green.addr,
        &manual(50.0, "by = \"header:x-user\""),
    );
    let one = Veer::start("", &routes).await;
    let two = Veer::start("", &routes).await;
    let users = users(10_000);
    let (a, b) = tokio::join!(slots_of_users(&one, &users), slots_of_users(&two, &users));
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(differ, 0, "{differ} of 10000 users differ");
    // And both agree with the documented hash: bucket(xxh3(route name), key) < weight.
    let seed = sticky::seed("split");
    for (user, slot) in users.iter().zip(&a) {
        let canary = sticky::bucket(seed, user.as_bytes()) < 5_000;
        assert_eq!(slot == "green", canary, "{user}");
    }
    // N = 10000 at 50 %: sd 0.5 points; bound 3 points.
    let share = green_share(&a);
    assert!((share - 50.0).abs() <= 3.0, "{share}");
    one.shutdown().await;
    two.shutdown().await;
}

/// Users on `slot` in an assignment.
fn on(slots: &[String], slot: &str) -> HashSet<usize> {
    (0..slots.len()).filter(|&i| slots[i] == slot).collect()
}

#[tokio::test]
async fn promotion_while_ramping_keeps_users_where_they_are_at_full_weight() {
    // `interval = "1h"`: the controller never analyses during the test, the step holds.
    let extra = "[route.sticky]\nby = \"header:x-user\"\n[route.rollout]\nmode = \"auto\"\n\
                 steps = [10, 50, 100]\ninterval = \"1h\"\n";
    let (veer, _blue, _green) = split(extra).await;
    let users = users(2_000);
    let body = rollout(&veer, "start").await;
    assert_eq!(
        (body["phase"].as_str(), body["canary_weight"].as_f64()),
        (Some("ramping"), Some(10.0))
    );
    let ramping = slots_of_users(&veer, &users).await;
    let first_canary = on(&ramping, "green");
    assert!(!first_canary.is_empty() && first_canary.len() < 2_000);

    let body = rollout(&veer, "promote").await;
    assert_eq!(body["stable"], "green", "{body}");
    assert_eq!(body["canary_weight"], 0.0, "{body}");
    let promoted = slots_of_users(&veer, &users).await;
    assert_eq!(count(&promoted, "green"), 2_000, "everyone as at 100 %");

    // The next rollout moves the lowest buckets first again: the same users as before.
    let body = rollout(&veer, "start").await;
    assert_eq!(body["canary"], "blue", "{body}");
    let next = slots_of_users(&veer, &users).await;
    assert_eq!(on(&next, "blue"), first_canary);
    veer.shutdown().await;
}

#[tokio::test]
async fn promotion_from_a_hand_weight_moves_nobody_who_was_at_full_weight() {
    let (veer, _blue, _green) = split(&manual(30.0, "by = \"header:x-user\"")).await;
    let users = users(2_000);
    let at_30 = slots_of_users(&veer, &users).await;
    set_weight(&veer, "split", 100.0).await;
    let at_100 = slots_of_users(&veer, &users).await;
    assert_eq!(count(&at_100, "green"), 2_000);
    let body = rollout(&veer, "promote").await;
    assert_eq!(body["stable"], "green", "{body}");
    assert_eq!(body["phase"], "idle", "{body}");
    let promoted = slots_of_users(&veer, &users).await;
    assert_eq!(promoted, at_100, "nobody moves at promotion");

    // A hand weight on the new canary (blue) takes the same buckets as before.
    set_weight(&veer, "split", 30.0).await;
    let again = slots_of_users(&veer, &users).await;
    assert_eq!(on(&again, "blue"), on(&at_30, "green"));
    veer.shutdown().await;
}

/// A first visit answered by veer itself (the stable slot refuses connections) still gets its
/// sticky cookie, so the user keeps the same bucket on the next request.
#[tokio::test]
async fn a_local_error_still_sets_the_sticky_cookie() {
    let green = Upstream::builder("green").start().await.unwrap();
    let veer = Veer::start("", &route("shop", closed_addr().await, green.addr, "")).await;
    let (status, headers, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, 502);
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.starts_with("veer_shop="), "{cookie}");
    veer.shutdown().await;
}
