//! veer: a Layer-7 reverse proxy that moves traffic from a stable version (blue) to a new one
//! (green) by itself, on evidence it measures in-process.
//!
//! # Architecture
//!
//! - [`config`]: the TOML file (`file`), its validation into [`config::Config`] with key paths
//!   and lines (`validate`), and the file watcher (`watch`).
//! - [`routing`]: the immutable [`routing::RoutingTable`] snapshot behind one `ArcSwap`, route
//!   matching, the sticky bucket (`sticky`) and the slot decision (`weights`).
//! - [`listener`]: accept loops, per-connection tasks, TLS, graceful drain.
//! - [`io`]: small gathered writes sent as one `send`, on both sides of the proxy.
//! - [`proxy`]: the request path, one phase after another (`handle`), header rewriting
//!   (`headers`) and the single error → status mapping (`error`).
//! - [`upstream`]: each worker's pool of upstream HTTP/1.1 connections (`pool`), the request
//!   body wrapper, error classification; the shadow copy (`mirror`).
//! - [`metrics`]: per route × slot counters and sliding HdrHistogram windows; Prometheus text.
//! - [`rollout`]: the controller task, the pure judge, the state machine with persistence and
//!   the decision journal.
//! - [`admin`]: the admin API and its auth.
//! - [`app`]: wiring, reload and shutdown. [`demo`]: the self-contained demo.
//! - [`warn_every`]: warnings of storms (failed accepts, failed upstreams) told at most once
//!   per period, with a count.
//!
//! # The request path
//!
//! 1. accept (TLS if configured) in the connection's own task;
//! 2. load ONE routing snapshot for the whole request;
//! 3. match the route, compute the bucket from the sticky key, choose the slot;
//! 4. build the upstream request (hop-by-hop removal, forwarded headers) and, if chosen, start
//!    the shadow copy without waiting for it;
//! 5. forward with timeouts on a pooled connection of this worker;
//! 6. stream the response back, setting the sticky cookie if new; the connection returns to
//!    the pool when the body has ended;
//! 7. record once, per slot, lock-free.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod rollout;
pub mod routing;
pub mod upstream;
pub mod warn_every;

use serde::{Deserialize, Serialize};

/// One of the two upstream slots of a route. Which one is stable is rollout state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    Blue,
    Green,
}

impl Slot {
    pub const BOTH: [Slot; 2] = [Slot::Blue, Slot::Green];

    pub fn other(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Slot::Blue => 0,
            Slot::Green => 1,
        }
    }

    pub fn parse(text: &str) -> Option<Slot> {
        match text {
            "blue" => Some(Slot::Blue),
            "green" => Some(Slot::Green),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
