//! Configuration: the file as written (`file`), the validated form used everywhere else (this
//! module's types, built by `validate`), and the file watcher (`watch`).

mod file;
mod validate;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};

use crate::Slot;
pub use validate::{
    basis_points, key_line, parse, parse_for, warnings, ConfigError, ConfigErrors, Purpose,
    MAX_DURATION,
};

/// A fully validated configuration. Every invariant the rest of veer relies on holds here.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    pub tls: Option<TlsConfig>,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// An upgraded connection (a WebSocket) that carries nothing either way for this long is
    /// closed.
    pub tunnel_idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// 0 = unlimited.
    pub max_body_bytes: u64,
    pub max_uri_bytes: usize,
    pub drain_timeout: Duration,
    pub access_log: AccessLog,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateConfig {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    /// The stable slot at first start; afterwards the persisted rollout state decides.
    pub stable: Slot,
    pub blue: SlotConfig,
    pub green: SlotConfig,
    pub sticky: StickyConfig,
    pub shadow: Option<ShadowConfig>,
    pub rollout: RolloutConfig,
}

impl RouteConfig {
    pub fn slot(&self, slot: Slot) -> &SlotConfig {
        match slot {
            Slot::Blue => &self.blue,
            Slot::Green => &self.green,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `shop.example.com` (lower case, no port).
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Suffix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotConfig {
    /// `host:port` authorities, round robin.
    pub endpoints: Vec<String>,
    pub version: String,
    /// Requests under way to the slot at once (from the request to the end of its answer, or
    /// of its tunnel), across workers; above it veer answers 503 itself. 0: no limit.
    pub max_in_flight: usize,
    /// What the slot's endpoints speak.
    pub protocol: Protocol,
}

/// The protocol of a slot's upstream connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, one exchange at a time per pooled keep-alive connection.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (h2c, as gRPC servers speak it): one
    /// connection per endpoint and worker carries every exchange at once. Upgrade requests
    /// (WebSocket) still go over HTTP/1.1.
    H2c,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickyBy {
    Cookie,
    Header(HeaderName),
    ClientIp,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyConfig {
    pub by: StickyBy,
    pub cookie: String,
    pub cookie_max_age: Duration,
    /// `None` when disabled with `""`.
    pub override_header: Option<HeaderName>,
    /// Hash seed; the route name unless `salt` is set.
    pub salt: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    Off,
    Status,
    Body,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShadowConfig {
    pub endpoints: Vec<String>,
    /// Basis points (0..=10000) of eligible requests.
    pub basis_points: u32,
    pub methods: Vec<Method>,
    pub max_body_bytes: u64,
    pub max_in_flight: usize,
    pub compare: Compare,
    pub timeout: Duration,
    pub host_suffix: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Manual,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutConfig {
    pub mode: Mode,
    /// Manual weight, basis points.
    pub weight: u32,
    /// Canary weight per step in basis points, increasing, ending at 10000.
    pub steps: Vec<u32>,
    pub min_step_time: Duration,
    pub min_requests: u64,
    pub max_step_time: Duration,
    pub failure_threshold: u32,
    pub interval: Duration,
    pub error_statuses: StatusSet,
    pub max_error_rate: f64,
    pub error_rate_margin: f64,
    pub confidence: f64,
    pub latency_quantile: f64,
    pub max_latency_ratio: f64,
    pub min_latency_delta: Duration,
}

/// A set of HTTP status codes (100..=999) as a bitmap: `contains` is one shift and mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct StatusSet([u64; 16]);

impl StatusSet {
    pub fn insert(&mut self, status: u16) {
        if let Some(word) = self.0.get_mut(usize::from(status / 64)) {
            *word |= 1 << (status % 64);
        }
    }

    pub fn contains(&self, status: u16) -> bool {
        self.0
            .get(usize::from(status / 64))
            .is_some_and(|word| word & (1 << (status % 64)) != 0)
    }
}

impl Config {
    /// Reads and validates a config file for a start (or `veer check`).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_for(path, Purpose::Start)
    }

    /// [`Config::load`], with the text it was read from (for what refers to its lines, such as
    /// [`warnings`]), read once.
    pub fn load_with_text(path: &Path) -> Result<(Config, String), ConfigErrors> {
        let text = Self::read(path)?;
        let config = parse_for(&text, path.parent(), Purpose::Start)?;
        Ok((config, text))
    }

    /// Reads and validates a config file for `purpose`.
    pub fn load_for(path: &Path, purpose: Purpose) -> Result<Config, ConfigErrors> {
        parse_for(&Self::read(path)?, path.parent(), purpose)
    }

    /// The text of the config file at `path`.
    pub fn read(path: &Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path).map_err(|error| {
            ConfigErrors::single(ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read {}: {error}", path.display()),
            })
        })
    }

    pub fn route(&self, name: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|route| route.name == name)
    }
}
