//! Reload: by rewriting the file in place, by write-then-rename, by the admin endpoint and by
//! SIGHUP; invalid files and restart-only changes are rejected whole while the old config keeps
//! serving; routes that stay keep their state, removed ones get it back if they return (as after
//! a restart); certificates rotate;
//! no request fails while the file is rewritten under load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use support::load::{Load, LoadSpec};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn manual(weight: u32) -> String {
    format!(
        "[route.sticky]\nby = \"none\"\n[route.rollout]\nmode = \"manual\"\nweight = {weight}\n"
    )
}

/// The config text `veer` would be started with for `routes` (no `[server]` extras).
fn text_for(veer: &Veer, routes: &str) -> String {
    config_text(veer.dir.path(), "", routes)
}

async fn canary_weight(veer: &Veer, name: &str) -> f64 {
    veer.route_status(name).await["canary_weight"]
        .as_f64()
        .unwrap()
}

/// Polls until the route's canary weight is `weight` (at most 5 s).
async fn weight_becomes(veer: &Veer, weight: f64) -> bool {
    let veer = &veer;
    eventually(Duration::from_secs(5), move || async move {
        canary_weight(veer, "shop").await == weight
    })
    .await
}

async fn reload(veer: &Veer) -> (StatusCode, Value) {
    veer.admin_post("/api/v1/config/reload", "").await
}

/// A sample's value from `/metrics`, by its exact series text.
async fn metric(veer: &Veer, series: &str) -> f64 {
    let (status, _, body) = get(&veer.admin_url("/metrics"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

async fn upstreams() -> (Upstream, Upstream) {
    (
        Upstream::builder("blue").start().await.unwrap(),
        Upstream::builder("green").start().await.unwrap(),
    )
}

#[tokio::test]
async fn a_file_rewritten_in_place_is_reloaded() {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, &manual(0))).await;
    std::fs::write(
        &veer.config_path,
        text_for(&veer, &route("shop", blue.addr, green.addr, &manual(30))),
    )
    .unwrap();
    assert!(weight_becomes(&veer, 30.0).await);
    let (_, routes) = veer.admin_get("/api/v1/routes").await;
    assert_eq!(routes["reload"]["result"], "applied", "{routes}");
    assert_eq!(veer.route_status("shop").await["phase"], "paused");
    veer.shutdown().await;
}

/// A reload that turns shadow comparison on keeps the `sent` count of the copies sent while it
/// was off (a counter series does not vanish), and every copy has one outcome.
#[tokio::test]
async fn shadow_counts_survive_a_reload_that_changes_compare() {
    let (blue, green) = upstreams().await;
    let shadow = Upstream::builder("blue").start().await.unwrap();
    let with = |compare: &str| {
        let extra = format!(
            "[route.shadow]\nendpoints = [\"{}\"]\npercent = 100.0\ncompare = \"{compare}\"\n{}",
            shadow.addr,
            manual(0)
        );
        route("shop", blue.addr, green.addr, &extra)
    };
    let veer = Veer::start("", &with("off")).await;
    get_many(&veer.url("/"), vec![Vec::new(); 5], 1).await;
    await_requests(&shadow, 5, Duration::from_secs(5)).await;
    std::fs::write(&veer.config_path, text_for(&veer, &with("status"))).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    get_many(&veer.url("/"), vec![Vec::new(); 3], 1).await;
    await_requests(&shadow, 8, Duration::from_secs(5)).await;
    let veer_ref = &veer;
    let matched = "veer_shadow_total{route=\"shop\",outcome=\"match\"}";
    let settled = eventually(Duration::from_secs(5), move || async move {
        metric(veer_ref, matched).await == 3.0
    })
    .await;
    assert!(settled, "3 copies not compared");
    let sent = "veer_shadow_total{route=\"shop\",outcome=\"sent\"}";
    assert_eq!(metric(&veer, sent).await, 5.0);
    let shadow = &veer.route_status("shop").await["shadow"];
    let outcomes = [
        "sent",
        "match",
        "mismatch",
        "error",
        "dropped_busy",
        "dropped_body",
    ];
    let sum: u64 = outcomes.iter().map(|o| shadow[o].as_u64().unwrap()).sum();
    assert_eq!((shadow["requests"].as_u64(), sum), (Some(8), 8), "{shadow}");
    veer.shutdown().await;
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_reloaded() {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, &manual(0))).await;
    let tmp = veer.dir.path().join(".veer.toml.new");
    std::fs::write(
        &tmp,
        text_for(&veer, &route("shop", blue.addr, green.addr, &manual(40))),
    )
    .unwrap();
    std::fs::rename(&tmp, &veer.config_path).unwrap();
    assert!(weight_becomes(&veer, 40.0).await);
    veer.shutdown().await;
}

#[tokio::test]
async fn the_reload_endpoint_applies_or_rejects_a_file_whole() {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, &manual(0))).await;
    let valid = text_for(&veer, &route("shop", blue.addr, green.addr, &manual(20)));
    std::fs::write(&veer.config_path, &valid).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"], "applied");
    assert_eq!(canary_weight(&veer, "shop").await, 20.0);

    // Invalid: a weight change (valid on its own) next to steps that are not increasing. Nothing
    // of it applies.
    let invalid = text_for(
        &veer,
        &route(
            "shop",
            blue.addr,
            green.addr,
            &format!("{}steps = [50, 10, 100]\n", manual(70)),
        ),
    );
    let line = invalid
        .lines()
        .position(|l| l.starts_with("steps ="))
        .unwrap()
        + 1;
    std::fs::write(&veer.config_path, &invalid).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["result"], "rejected");
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["path"], "route[0].rollout.steps");
    assert_eq!(errors[0]["line"], line);
    assert_eq!(errors[0]["message"], "must be increasing");

    // The old config keeps serving and the rejection is shown and counted.
    assert_eq!(canary_weight(&veer, "shop").await, 20.0);
    let (status, _, _) = get(&veer.url("/"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (_, routes) = veer.admin_get("/api/v1/routes").await;
    assert_eq!(routes["reload"]["result"], "rejected", "{routes}");
    assert_eq!(
        routes["reload"]["errors"][0]["path"],
        "route[0].rollout.steps"
    );
    let rejected = metric(&veer, "veer_config_reloads_total{result=\"rejected\"}").await;
    assert!(rejected >= 1.0, "{rejected}");
    assert!(metric(&veer, "veer_config_reloads_total{result=\"applied\"}").await >= 1.0);
    veer.shutdown().await;
}

#[tokio::test]
async fn changing_the_listeners_is_rejected_as_needing_a_restart() {
    let (blue, green) = upstreams().await;
    let routes = route("shop", blue.addr, green.addr, "");
    let veer = Veer::start("", &routes).await;
    // A second listener (never bound: the reload is refused before anything is bound).
    let text = text_for(&veer, &routes).replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]",
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("listen = [\"127.0.0.1:0\", "))
        .expect("the new listen line")
        + 1;
    std::fs::write(&veer.config_path, text).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["path"], "server.listen");
    assert_eq!(body["errors"][0]["line"], line, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("needs a restart"), "{message}");
    let (status, _, body) = get(&veer.url("/"), &[]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue\n"[..]));
    veer.shutdown().await;
}

/// A file that changes several keys needing a restart gets each named, with its line, and
/// nothing of it applied (the manual weight it also changes neither).
#[tokio::test]
async fn every_key_that_needs_a_restart_is_named() {
    let (blue, green) = upstreams().await;
    let manual = "[route.rollout]\nmode = \"manual\"\nweight = 0\n";
    let routes = route("shop", blue.addr, green.addr, manual);
    let veer = Veer::start("", &routes).await;
    let text = text_for(&veer, &routes)
        .replace(
            "[server]\n",
            "[server]\nworkers = 3\naccess_log = \"stderr\"\n",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.2:0\"",
        )
        .replace("weight = 0", "weight = 100");
    std::fs::write(&veer.config_path, &text).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let named: Vec<(&str, Option<u64>)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap(), e["line"].as_u64()))
        .collect();
    let line = |start: &str| {
        text.lines()
            .position(|l| l.starts_with(start))
            .map(|i| i as u64 + 1)
    };
    assert_eq!(
        named,
        [
            ("server.workers", line("workers = 3")),
            ("server.access_log", line("access_log")),
            ("admin.listen", line("listen = \"127.0.0.2:0\"")),
        ],
        "{body}"
    );
    assert_eq!(veer.route_status("shop").await["canary_weight"], 0.0);
    veer.shutdown().await;
}

/// A short auto policy, sticky users by header.
const AUTO: &str =
    "[route.sticky]\nby = \"header:x-user\"\n[route.rollout]\nsteps = [10, 50, 100]\n\
                    min_step_time = \"10m\"\n";

/// The slot that served user `key`.
async fn slot_of(veer: &Veer, path: &str, key: &str) -> String {
    let (status, _, body) = get(&veer.url(path), &[("x-user", key)]).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap().trim().to_string()
}

fn other_route(blue: SocketAddr, green: SocketAddr) -> String {
    route("other", blue, green, AUTO).replacen(
        "name = \"other\"\n",
        "name = \"other\"\npath_prefix = \"/other\"\n",
        1,
    )
}

/// veer with the auto-mode route `shop` (its text returned too) whose rollout has started,
/// and its two upstreams, kept alive by the caller.
async fn ramping_shop() -> (Veer, String, (Upstream, Upstream)) {
    let (blue, green) = upstreams().await;
    let shop = route("shop", blue.addr, green.addr, AUTO);
    let veer = Veer::start("", &shop).await;
    let (status, _) = veer
        .admin_post("/api/v1/routes/shop/rollout/start", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    (veer, shop, (blue, green))
}

#[tokio::test]
async fn an_unchanged_route_keeps_its_state_across_a_reload() {
    let (veer, shop, (blue, green)) = ramping_shop().await;
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for user in &users {
        before.push(slot_of(&veer, "/", user).await);
    }
    assert!(before.iter().any(|s| s == "green") && before.iter().any(|s| s == "blue"));
    let status_before = veer.route_status("shop").await;

    let with_other = format!("{shop}{}", other_route(blue.addr, green.addr));
    std::fs::write(&veer.config_path, text_for(&veer, &with_other)).unwrap();
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = veer.admin_get("/api/v1/routes/other").await;
    assert_eq!(status, StatusCode::OK);

    let after = veer.route_status("shop").await;
    for key in ["phase", "step", "canary_weight", "stable"] {
        assert_eq!(after[key], status_before[key], "{key}");
    }
    assert_eq!(after["phase"], "ramping");
    assert_eq!(after["canary_weight"], 10.0);
    for slot in ["blue", "green"] {
        let (b, a) = (
            &status_before["slots"][slot]["requests"],
            &after["slots"][slot]["requests"],
        );
        assert_eq!(a, b, "{slot} requests");
    }
    let requests = |v: &Value| {
        v["slots"]["blue"]["requests"].as_u64().unwrap()
            + v["slots"]["green"]["requests"].as_u64().unwrap()
    };
    assert_eq!(requests(&after), 40);
    // Sticky assignments survive too.
    for (user, slot) in users.iter().zip(&before) {
        assert_eq!(&slot_of(&veer, "/", user).await, slot, "{user}");
    }
    veer.shutdown().await;
}

/// A route removed by a reload and added back gets its rollout back as a restart with either
/// file would give it (its state file is kept): same phase, weight and users' slots; only its
/// live figures start over. It used to start idle with the config's `stable`, which could send
/// everyone back to a build a rollout had replaced.
#[tokio::test]
async fn a_removed_then_readded_route_gets_its_rollout_back() {
    let (blue, green) = upstreams().await;
    let shop = route("shop", blue.addr, green.addr, AUTO);
    let both = format!("{shop}{}", other_route(blue.addr, green.addr));
    let veer = Veer::start("", &both).await;
    let (status, _) = veer
        .admin_post("/api/v1/routes/other/rollout/start", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut before = Vec::new();
    for i in 0..10 {
        before.push(slot_of(&veer, "/other/x", &format!("user-{i}")).await);
    }
    let other = veer.route_status("other").await;
    assert_eq!(other["phase"], "ramping");
    let weight = other["canary_weight"].clone();

    std::fs::write(&veer.config_path, text_for(&veer, &shop)).unwrap();
    assert_eq!(reload(&veer).await.0, StatusCode::OK);
    let (status, _) = veer.admin_get("/api/v1/routes/other").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    std::fs::write(&veer.config_path, text_for(&veer, &both)).unwrap();
    assert_eq!(reload(&veer).await.0, StatusCode::OK);
    let other = veer.route_status("other").await;
    assert_eq!(other["phase"], "ramping", "{other}");
    assert_eq!(other["canary_weight"], weight);
    for slot in ["blue", "green"] {
        assert_eq!(other["slots"][slot]["requests"], 0, "{other}");
    }
    for (i, slot) in before.iter().enumerate() {
        assert_eq!(
            &slot_of(&veer, "/other/x", &format!("user-{i}")).await,
            slot
        );
    }
    // The unchanged route was never disturbed.
    assert_eq!(veer.route_status("shop").await["phase"], "idle");
    veer.shutdown().await;
}

/// `routes` with `stable = "green"` added to every route.
fn green_stable(routes: &str) -> String {
    routes.replace("[route.blue]\n", "stable = \"green\"\n[route.blue]\n")
}

/// `stable` is read at a route's first start only: a route that never had a rollout keeps its
/// stable slot across a reload that changes the key, and across a restart after it too, both
/// when it was there at start and when a reload added it.
#[tokio::test]
async fn a_routes_first_stable_slot_is_kept_by_a_restart_as_by_a_reload() {
    let (blue, green) = upstreams().await;
    let shop = route("shop", blue.addr, green.addr, AUTO);
    let veer = Veer::start("", &shop).await;
    assert_eq!(slot_of(&veer, "/", "user-1").await, "blue");
    let both = format!("{shop}{}", other_route(blue.addr, green.addr));
    std::fs::write(&veer.config_path, text_for(&veer, &both)).unwrap();
    assert_eq!(reload(&veer).await.0, StatusCode::OK);
    assert_eq!(slot_of(&veer, "/other/x", "user-1").await, "blue");

    let on_green = green_stable(&both);
    assert_eq!(on_green.matches("stable = \"green\"").count(), 2);
    std::fs::write(&veer.config_path, text_for(&veer, &on_green)).unwrap();
    assert_eq!(reload(&veer).await.0, StatusCode::OK);
    for path in ["/", "/other/x"] {
        assert_eq!(slot_of(&veer, path, "user-1").await, "blue", "{path}");
    }

    let Veer { running, dir, .. } = veer;
    running.unwrap().shutdown().await;
    let text = config_text(dir.path(), "", &on_green);
    let veer = Veer::start_in(dir, &text).await;
    for (name, path) in [("shop", "/"), ("other", "/other/x")] {
        assert_eq!(slot_of(&veer, path, "user-1").await, "blue", "{path}");
        assert_eq!(veer.route_status(name).await["stable"], "blue", "{name}");
    }
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TLS certificate rotation: by the watcher, by the admin endpoint and by SIGHUP.
// ---------------------------------------------------------------------------------------------

/// A TLS client verifier that accepts any certificate and remembers the one it was shown.
#[derive(Debug)]
struct Remember {
    seen: Mutex<Option<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

impl ServerCertVerifier for Remember {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One HTTPS request on a new connection: the certificate the server showed and the answer.
async fn https_get(addr: SocketAddr) -> (Vec<u8>, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Remember {
        seen: Mutex::new(None),
        provider: Arc::clone(&provider),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let seen = verifier.seen.lock().unwrap().clone().unwrap();
    (seen, String::from_utf8_lossy(&answer).into_owned())
}

/// A fresh self-signed certificate for `localhost`, written to `cert.pem`/`key.pem` in `dir`;
/// its DER.
fn write_certificate(dir: &std::path::Path) -> Vec<u8> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    certified.cert.der().to_vec()
}

async fn tls_veer(blue: &Upstream, green: &Upstream) -> (Veer, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let first = write_certificate(dir.path());
    let text = config_text(
        dir.path(),
        "tls = { cert = \"cert.pem\", key = \"key.pem\" }",
        &route("shop", blue.addr, green.addr, ""),
    );
    let veer = Veer::start_in(dir, &text).await;
    let (seen, answer) = https_get(veer.addr).await;
    assert_eq!(seen, first, "the first certificate is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("blue\n"), "{answer}");
    (veer, first)
}

#[tokio::test]
async fn a_reload_rotates_the_tls_certificate() {
    let (blue, green) = upstreams().await;
    let (veer, first) = tls_veer(&blue, &green).await;
    let second = write_certificate(veer.dir.path());
    assert_ne!(first, second);
    // The watcher may apply it first: then this reload applies it again.
    let (status, body) = reload(&veer).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (seen, answer) = https_get(veer.addr).await;
    assert_eq!(seen, second, "a new client sees the new certificate");
    assert!(answer.ends_with("blue\n"), "{answer}");
    veer.shutdown().await;
}

/// The config file is unchanged: the watcher sees the certificate and key it names change.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_reload_by_hand() {
    let (blue, green) = upstreams().await;
    let (veer, first) = tls_veer(&blue, &green).await;
    let second = write_certificate(veer.dir.path());
    assert_ne!(first, second);
    let addr = veer.addr;
    let second_ref = &second;
    let served = eventually(Duration::from_secs(5), move || async move {
        https_get(addr).await.0 == *second_ref
    })
    .await;
    assert!(served, "the renewed certificate was not served within 5 s");
    let applied = "veer_config_reloads_total{result=\"applied\"}";
    assert!(metric(&veer, applied).await >= 1.0);
    veer.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads() {
    use tokio::signal::unix::{signal, SignalKind};
    // Listening for SIGHUP here too keeps this test process alive should veer's own listener
    // ever be missing (SIGHUP's default action ends the process); veer must still see it.
    let mut hups = signal(SignalKind::hangup()).unwrap();
    let (blue, green) = upstreams().await;
    let (veer, first) = tls_veer(&blue, &green).await;
    let applied = "veer_config_reloads_total{result=\"applied\"}";
    assert_eq!(metric(&veer, applied).await, 0.0);
    // One signal: veer listens for SIGHUP from the moment `start` returns. Nothing changed, so
    // only the signal can reload.
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::timeout(Duration::from_secs(5), hups.recv())
        .await
        .expect("SIGHUP delivered to this process");
    let veer_ref = &veer;
    let reloaded = eventually(Duration::from_secs(5), move || async move {
        metric(veer_ref, applied).await >= 1.0
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload");
    let (seen, answer) = https_get(veer.addr).await;
    assert_eq!(seen, first, "the same certificate is served");
    assert!(answer.ends_with("blue\n"), "{answer}");
    veer.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Reload under load.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_file_twenty_times_under_load_fails_no_request() {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, &manual(0))).await;
    // 4 keep-alive clients, at most 100,000 requests or 30 s (room for the rewrites on a slow
    // machine); stopped after the rewrites.
    let load = Load::start(LoadSpec {
        tasks: 4,
        max_requests: 100_000,
        max_time: Duration::from_secs(30),
        pause: Duration::from_millis(2),
        ..LoadSpec::new(veer.url("/"))
    });
    for i in 0..20u32 {
        let weight = if i % 2 == 0 { 50 } else { 0 };
        let text = text_for(
            &veer,
            &route("shop", blue.addr, green.addr, &manual(weight)),
        );
        // Alternately in place and by rename; the watcher sees each, and the endpoint makes
        // sure each is applied before the next.
        if i % 4 < 2 {
            std::fs::write(&veer.config_path, text).unwrap();
        } else {
            let tmp = veer.dir.path().join(".veer.toml.new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &veer.config_path).unwrap();
        }
        let (status, body) = reload(&veer).await;
        assert_eq!(status, StatusCode::OK, "rewrite {i}: {body}");
        assert_eq!(canary_weight(&veer, "shop").await, f64::from(weight));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(!load.finished(), "the load must last through every rewrite");
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(report.count(200), report.sent(), "{:?}", report.statuses);
    let upstream = blue.request_count() + green.request_count();
    assert_eq!(upstream, report.sent());
    assert!(green.request_count() > 0 && blue.request_count() > 0);
    let shop = veer.route_status("shop").await;
    let counted = shop["slots"]["blue"]["requests"].as_u64().unwrap()
        + shop["slots"]["green"]["requests"].as_u64().unwrap();
    assert_eq!(counted, report.sent());
    veer.shutdown().await;
}

/// A reload that gives the canary slot a new version during a rollout that a weight set by hand
/// paused: the new build gets no traffic until `resume` starts it at the first step, from the
/// file on disk to the journal.
#[tokio::test]
async fn a_reload_with_a_new_canary_version_mid_rollout_starts_it_over() {
    let (veer, shop, _upstreams) = ramping_shop().await;
    let (status, body) = veer
        .admin_post("/api/v1/routes/shop/weight", r#"{"canary_percent": 50}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(canary_weight(&veer, "shop").await, 50.0);

    let v3 = shop.replace("version = \"v2\"", "version = \"v3\"");
    assert_ne!(v3, shop);
    std::fs::write(&veer.config_path, text_for(&veer, &v3)).unwrap();
    assert_eq!(reload(&veer).await.0, StatusCode::OK);
    let status = veer.route_status("shop").await;
    assert_eq!(status["phase"], "paused", "{status}");
    assert_eq!(status["canary_weight"], 0.0, "{status}");
    assert_eq!(status["versions"]["green"], "v3", "{status}");
    let (_, events) = veer.admin_get("/api/v1/events?limit=1").await;
    let last = &events["events"][0];
    assert_eq!(last["action"], "weight", "{last}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("v2 -> v3"), "{reason}");
    let (status, body) = veer
        .admin_post("/api/v1/routes/shop/rollout/resume", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "ramping", "{body}");
    assert_eq!(body["canary_weight"], 10.0, "{body}");
    veer.shutdown().await;
}

/// A reload that gives the idle slot a new version on new endpoints starts the rollout there:
/// no request goes to the slot's old endpoints at the new weight. Five times under load, each
/// rollout rolled back before the next reload moves green to the other upstream (the first
/// reload finds the route idle). The weight is raised before the new routing table is
/// published (the state file's fsyncs between): requests routed by the old table in that gap
/// keep its weight (see `SharedSplit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_started_by_a_reload_reaches_only_the_new_endpoints() {
    let (blue, a) = upstreams().await;
    let b = Upstream::builder("b").start().await.unwrap();
    let policy =
        "[route.sticky]\nby = \"none\"\n[route.rollout]\nsteps = [50, 100]\nmin_step_time = \"10m\"\n";
    let shop = route("shop", blue.addr, a.addr, policy);
    let veer = Veer::start("", &shop).await;
    // 4 keep-alive clients, at most 1,000,000 requests or 60 s; stopped after the reloads.
    let load = Load::start(LoadSpec {
        tasks: 4,
        max_requests: 1_000_000,
        max_time: Duration::from_secs(60),
        ..LoadSpec::new(veer.url("/"))
    });
    let (mut old, mut new) = (&a, &b);
    for version in 3..8 {
        // Idle at first; then the last reload's rollout is rolled back.
        if version > 3 {
            let (status, body) = veer
                .admin_post("/api/v1/routes/shop/rollout/rollback", "")
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        // Requests already sent to the old endpoints end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = old.request_count();
        let moved = route("shop", blue.addr, new.addr, policy)
            .replace("version = \"v2\"", &format!("version = \"v{version}\""));
        std::fs::write(&veer.config_path, text_for(&veer, &moved)).unwrap();
        let (status, body) = reload(&veer).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(canary_weight(&veer, "shop").await, 50.0);
        let sent = load.sent();
        let sent_on = eventually(Duration::from_secs(5), || async {
            load.sent() > sent + 500
        });
        assert!(sent_on.await, "the load stalled");
        assert_eq!(
            old.request_count(),
            before,
            "reload {version}: the old endpoints got requests"
        );
        assert!(new.request_count() > 0);
        (old, new) = (new, old);
    }
    assert!(!load.finished(), "the load must last through every reload");
    let report = load.stop().await;
    assert_eq!(report.count(200), report.sent(), "{:?}", report.statuses);
    veer.shutdown().await;
}

/// An admin rollout action (here a weight) waits for a reload under way, held open by hand
/// for 300 ms, and is answered once it ends, with the weight applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_action_waits_for_a_reload_under_way() {
    let (blue, green) = upstreams().await;
    let veer = Veer::start("", &route("shop", blue.addr, green.addr, "")).await;
    let app = Arc::clone(&veer.running.as_ref().unwrap().app);
    let reloading = app.between_reloads().await;
    {
        let posting = veer.admin_post("/api/v1/routes/shop/weight", "{\"canary_percent\": 30}");
        tokio::pin!(posting);
        let early = tokio::time::timeout(Duration::from_millis(300), &mut posting).await;
        assert!(early.is_err(), "answered during the reload: {early:?}");
        assert_eq!(canary_weight(&veer, "shop").await, 0.0);
        drop(reloading);
        let (status, body) = tokio::time::timeout(Duration::from_secs(5), posting)
            .await
            .expect("answered once the reload ended");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["canary_weight"], 30.0, "{body}");
    }
    veer.shutdown().await;
}
