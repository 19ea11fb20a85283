//! An open-loop constant-rate client. Request `i` is due at `start + i / rate` whatever happened
//! to the requests before it, each runs in its own task, and its latency counts from its due
//! time, not from when it was actually sent: a stall in the proxy (or in this client) shows up
//! in the latency of every request it delayed, so there is no coordinated omission.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::Instant;
use veer::Slot;

/// What to send.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Requests per second.
    pub rate: f64,
    /// The schedule ends after this long (or earlier, when stopped).
    pub duration: Duration,
    /// A request not answered within this (from its due time) counts as an error.
    pub timeout: Duration,
    /// Distinct users, sent as `x-user: user-N` (the routes stick by that header).
    pub users: u32,
}

/// One request's outcome.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Due time, from the start of the run.
    pub due: Duration,
    /// Which upstream answered (from its `x-upstream` header), if any did.
    pub slot: Option<Slot>,
    /// A 2xx-4xx answer with its whole body; anything else is an error.
    pub ok: bool,
    /// From the due time to the end of the body (or the failure).
    pub latency: Duration,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A load started in its own task by [`Load::start`]; [`Load::finish`] stops it and returns
/// its samples.
pub struct Load {
    /// When request 0 was due.
    pub start: Instant,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Load {
    /// Starts `plan` against `target` now.
    pub fn start(target: SocketAddr, plan: Plan) -> Load {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(target, plan, start, Arc::clone(&stop)));
        Load { start, stop, task }
    }

    /// Stops the schedule and waits for the requests under way; every sample, in due order.
    pub async fn finish(self) -> Result<Vec<Sample>, tokio::task::JoinError> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await
    }
}

/// Sends `plan` to `target` from `start` on, until the schedule ends or `stop` is set, then waits
/// for the requests still in flight (each bounded by `plan.timeout`). At most
/// `rate × duration` requests.
pub async fn run(
    target: SocketAddr,
    plan: Plan,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let total = (plan.rate * plan.duration.as_secs_f64()).ceil() as u64;
    let samples = Arc::new(Mutex::new(Vec::with_capacity(
        usize::try_from(total).unwrap_or(0),
    )));
    let mut tasks = JoinSet::new();
    for i in 0..total {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / plan.rate);
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        let samples = Arc::clone(&samples);
        let user = fastrand::u32(0..plan.users.max(1));
        tasks.spawn(async move {
            let sample = one(&client, target, user, due, start, plan.timeout).await;
            if let Ok(mut samples) = samples.lock() {
                samples.push(sample);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    samples.sort_by_key(|s| s.due);
    samples
}

async fn one(
    client: &HttpClient,
    target: SocketAddr,
    user: u32,
    due: Instant,
    start: Instant,
    timeout: Duration,
) -> Sample {
    let exchange = async {
        let request = http::Request::builder()
            .uri(format!("http://{target}/"))
            .header("x-user", format!("user-{user}"))
            .body(Empty::new())
            .ok()?;
        let response = client.request(request).await.ok()?;
        let slot = response
            .headers()
            .get("x-upstream")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Slot::parse(v.split_whitespace().next().unwrap_or("")));
        let status = response.status();
        let complete = response.into_body().collect().await.is_ok();
        Some((slot, complete && status.as_u16() < 500))
    };
    let outcome = tokio::time::timeout_at(due + timeout, exchange).await;
    let (slot, ok) = outcome.ok().flatten().unwrap_or((None, false));
    Sample {
        due: due.saturating_duration_since(start),
        slot,
        ok,
        latency: due.elapsed(),
    }
}

/// Latency quantile `q` of `samples` in ms (0 when empty).
pub fn quantile_ms<'a>(samples: impl IntoIterator<Item = &'a Sample>, q: f64) -> f64 {
    let mut histogram = veer::metrics::latency_histogram();
    for sample in samples {
        let micros = u64::try_from(sample.latency.as_micros()).unwrap_or(u64::MAX);
        let _ = histogram.record(micros.max(1));
    }
    if histogram.is_empty() {
        0.0
    } else {
        histogram.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Errors per request of `samples` (0 when empty).
pub fn error_rate<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> f64 {
    let (mut n, mut errors) = (0u64, 0u64);
    for sample in samples {
        n += 1;
        errors += u64::from(!sample.ok);
    }
    if n == 0 {
        0.0
    } else {
        errors as f64 / n as f64
    }
}
