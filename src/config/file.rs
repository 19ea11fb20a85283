//! The config file as written: plain serde structs, every table `deny_unknown_fields`.
//!
//! Nothing here is checked beyond TOML types; `validate.rs` turns a [`RawConfig`] into a
//! [`super::Config`] and reports every problem with its key path.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Vec<String>>,
    #[serde(default)]
    pub workers: usize,
    pub tls: Option<RawTls>,
    #[serde(default = "d_header_timeout")]
    pub header_timeout: String,
    #[serde(default = "d_request_timeout")]
    pub request_timeout: String,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: String,
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout: String,
    #[serde(default = "d_upstream_idle_timeout")]
    pub upstream_idle_timeout: String,
    #[serde(default = "d_tunnel_idle_timeout")]
    pub tunnel_idle_timeout: String,
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: i64,
    #[serde(default = "d_max_body_bytes")]
    pub max_body_bytes: i64,
    #[serde(default = "d_max_uri_bytes")]
    pub max_uri_bytes: i64,
    #[serde(default = "d_drain_timeout")]
    pub drain_timeout: String,
    #[serde(default = "d_access_log")]
    pub access_log: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "d_admin_listen")]
    pub listen: String,
    pub token: Option<String>,
    pub token_env: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: d_admin_listen(),
            token: None,
            token_env: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    #[serde(default = "d_state_dir")]
    pub dir: String,
}

impl Default for RawState {
    fn default() -> Self {
        Self { dir: d_state_dir() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "d_path_prefix")]
    pub path_prefix: String,
    #[serde(default = "d_stable")]
    pub stable: String,
    pub blue: Option<RawSlot>,
    pub green: Option<RawSlot>,
    #[serde(default)]
    pub sticky: RawSticky,
    pub shadow: Option<RawShadow>,
    #[serde(default)]
    pub rollout: RawRollout,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlot {
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub max_in_flight: i64,
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    #[serde(default = "d_sticky_by")]
    pub by: String,
    pub cookie: Option<String>,
    #[serde(default = "d_cookie_max_age")]
    pub cookie_max_age: String,
    #[serde(default = "d_override_header")]
    pub override_header: String,
    pub salt: Option<String>,
}

impl Default for RawSticky {
    fn default() -> Self {
        Self {
            by: d_sticky_by(),
            cookie: None,
            cookie_max_age: d_cookie_max_age(),
            override_header: d_override_header(),
            salt: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShadow {
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default = "d_shadow_percent")]
    pub percent: f64,
    #[serde(default = "d_shadow_methods")]
    pub methods: Vec<String>,
    #[serde(default = "d_shadow_body")]
    pub max_body_bytes: i64,
    #[serde(default = "d_shadow_in_flight")]
    pub max_in_flight: i64,
    #[serde(default = "d_compare")]
    pub compare: String,
    pub timeout: Option<String>,
    pub host_suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    #[serde(default = "d_mode")]
    pub mode: String,
    #[serde(default)]
    pub weight: f64,
    #[serde(default = "d_steps")]
    pub steps: RawSteps,
    #[serde(default = "d_min_step_time")]
    pub min_step_time: String,
    #[serde(default = "d_min_requests")]
    pub min_requests: i64,
    #[serde(default = "d_max_step_time")]
    pub max_step_time: String,
    #[serde(default = "d_failure_threshold")]
    pub failure_threshold: i64,
    #[serde(default = "d_interval")]
    pub interval: String,
    #[serde(default = "d_error_statuses")]
    pub error_statuses: String,
    #[serde(default = "d_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "d_error_rate_margin")]
    pub error_rate_margin: f64,
    #[serde(default = "d_confidence")]
    pub confidence: f64,
    #[serde(default = "d_latency_quantile")]
    pub latency_quantile: f64,
    #[serde(default = "d_max_latency_ratio")]
    pub max_latency_ratio: f64,
    #[serde(default = "d_min_latency_delta")]
    pub min_latency_delta: String,
}

impl Default for RawRollout {
    fn default() -> Self {
        Self {
            mode: d_mode(),
            weight: 0.0,
            steps: d_steps(),
            min_step_time: d_min_step_time(),
            min_requests: d_min_requests(),
            max_step_time: d_max_step_time(),
            failure_threshold: d_failure_threshold(),
            interval: d_interval(),
            error_statuses: d_error_statuses(),
            max_error_rate: d_max_error_rate(),
            error_rate_margin: d_error_rate_margin(),
            confidence: d_confidence(),
            latency_quantile: d_latency_quantile(),
            max_latency_ratio: d_max_latency_ratio(),
            min_latency_delta: d_min_latency_delta(),
        }
    }
}

/// `steps = [1, 5, 100]` or `steps = "geometric:1:2"`.
#[derive(Debug)]
pub enum RawSteps {
    List(Vec<f64>),
    Spec(String),
}

impl<'de> Deserialize<'de> for RawSteps {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StepsVisitor)
    }
}

/// Reads either form of `steps`, so that a value of another type is told what steps can be.
struct StepsVisitor;

impl<'de> serde::de::Visitor<'de> for StepsVisitor {
    type Value = RawSteps;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of percents or \"geometric:START:FACTOR\"")
    }

    fn visit_str<E: serde::de::Error>(self, spec: &str) -> Result<RawSteps, E> {
        Ok(RawSteps::Spec(spec.to_string()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawSteps, A::Error> {
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(percent) = seq.next_element::<f64>()? {
            list.push(percent);
        }
        Ok(RawSteps::List(list))
    }
}

fn d_header_timeout() -> String {
    "10s".into()
}
fn d_request_timeout() -> String {
    "60s".into()
}
fn d_connect_timeout() -> String {
    "5s".into()
}
fn d_idle_timeout() -> String {
    "60s".into()
}
fn d_tunnel_idle_timeout() -> String {
    "60s".into()
}
fn d_upstream_idle_timeout() -> String {
    "4s".into()
}
fn d_max_header_bytes() -> i64 {
    65536
}
fn d_max_body_bytes() -> i64 {
    10_485_760
}
fn d_max_uri_bytes() -> i64 {
    8192
}
fn d_drain_timeout() -> String {
    "30s".into()
}
fn d_access_log() -> String {
    "off".into()
}
fn d_admin_listen() -> String {
    "127.0.0.1:9901".into()
}
fn d_state_dir() -> String {
    "veer-state".into()
}
fn d_path_prefix() -> String {
    "/".into()
}
fn d_stable() -> String {
    "blue".into()
}
fn d_sticky_by() -> String {
    "cookie".into()
}
fn d_cookie_max_age() -> String {
    "30days".into()
}
fn d_override_header() -> String {
    "x-veer-slot".into()
}
fn d_shadow_percent() -> f64 {
    5.0
}
fn d_shadow_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}
fn d_shadow_body() -> i64 {
    65536
}
fn d_shadow_in_flight() -> i64 {
    64
}
fn d_compare() -> String {
    "status".into()
}
fn d_mode() -> String {
    "auto".into()
}
fn d_steps() -> RawSteps {
    RawSteps::List(vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0])
}
fn d_min_step_time() -> String {
    "30s".into()
}
fn d_min_requests() -> i64 {
    500
}
fn d_max_step_time() -> String {
    "15m".into()
}
fn d_failure_threshold() -> i64 {
    2
}
fn d_interval() -> String {
    "1s".into()
}
fn d_error_statuses() -> String {
    "5xx".into()
}
fn d_max_error_rate() -> f64 {
    0.2
}
fn d_error_rate_margin() -> f64 {
    0.005
}
fn d_confidence() -> f64 {
    0.99
}
fn d_latency_quantile() -> f64 {
    0.99
}
fn d_max_latency_ratio() -> f64 {
    1.25
}
fn d_min_latency_delta() -> String {
    "5ms".into()
}
