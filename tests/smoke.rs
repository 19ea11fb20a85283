//! The shortest path through veer: one request forwarded to the stable slot.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

#[tokio::test]
async fn a_request_reaches_the_stable_slot() {
    let blue = Upstream::builder("blue")
        .record(true)
        .start()
        .await
        .unwrap();
    let green = Upstream::builder("green").start().await.unwrap();
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, "")).await;
    let (status, headers, body) = get(&veer.url("/hello?x=1"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"blue\n");
    assert!(headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("veer_shop="));
    let seen = blue.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/hello?x=1");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    assert_eq!(seen[0].headers["via"], "1.1 veer");
    assert_eq!(green.request_count(), 0);
    veer.shutdown().await;
}
