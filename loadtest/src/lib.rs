//! Load tests for veer.
//!
//! - [`load`]: an open-loop constant-rate HTTP client (no coordinated omission).
//! - [`series`]: a route's state sampled every 500 ms from the running process, merged with the
//!   client's own measurements into one time series.
//! - [`chart`]: the time series as an SVG chart.
//!
//! The binaries: `upstream` (a standalone fault-injecting upstream) and `scenarios` (rollout
//! scenarios against an in-process veer). `compare.sh` runs the peer comparison.

pub mod chart;
pub mod load;
pub mod series;
