//! A bounded client load over keep-alive HTTP/1.1: a few tasks, each with its own pooled
//! client, sending GETs until a request budget, a time budget or `stop` ends it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 client (connections are pooled and reused).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request on `client`: the status and whole body, or the transport error as text.
pub async fn request(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), String> {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// What a load is made of.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub url: String,
    pub tasks: usize,
    /// Requests over all tasks, split evenly between them.
    pub max_requests: u64,
    pub max_time: Duration,
    /// Wait between two requests of one task (zero: back to back).
    pub pause: Duration,
    /// When set, every request carries this header with a value unique to the request
    /// (`t<task>-<n>`), so that every request is a distinct sticky key.
    pub key_header: Option<&'static str>,
}

impl LoadSpec {
    pub fn new(url: String) -> Self {
        Self {
            url,
            tasks: 4,
            max_requests: 10_000,
            max_time: Duration::from_secs(20),
            pause: Duration::ZERO,
            key_header: None,
        }
    }
}

/// What a load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Responses by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Transport failures (no response at all), with the first few messages.
    pub failed: u64,
    pub failures: Vec<String>,
}

impl LoadReport {
    /// Responses plus failures.
    pub fn sent(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.failed
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn merge(&mut self, other: LoadReport) {
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.failed += other.failed;
        self.failures.extend(other.failures);
    }
}

/// A running load.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + spec.max_time;
        let tasks_n = spec.tasks.max(1) as u64;
        let tasks = (0..spec.tasks)
            .map(|task| {
                // The budget split exactly: the first `max % tasks` tasks send one more.
                let share = spec.max_requests / tasks_n
                    + u64::from((task as u64) < spec.max_requests % tasks_n);
                let spec = spec.clone();
                let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
                tokio::spawn(async move {
                    let client = client();
                    let mut report = LoadReport::default();
                    for n in 0..share {
                        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                            break;
                        }
                        let key = format!("t{task}-{n}");
                        let headers: Vec<(&str, &str)> = match spec.key_header {
                            Some(name) => vec![(name, key.as_str())],
                            None => Vec::new(),
                        };
                        match request(&client, Method::GET, &spec.url, &headers).await {
                            Ok((status, _)) => {
                                *report.statuses.entry(status.as_u16()).or_default() += 1;
                            }
                            Err(error) => {
                                report.failed += 1;
                                if report.failures.len() < 5 {
                                    report.failures.push(error);
                                }
                            }
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                        if !spec.pause.is_zero() {
                            tokio::time::sleep(spec.pause).await;
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }

    /// Requests finished so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// True once every task has ended by itself (budget or deadline).
    pub fn finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }

    /// Stops the load (each task finishes its current request) and reports.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut report = LoadReport::default();
        for task in self.tasks {
            report.merge(task.await.expect("load task panicked"));
        }
        report
    }

    /// Waits until the load ends by itself, then reports.
    pub async fn finish(self) -> LoadReport {
        let mut report = LoadReport::default();
        for task in self.tasks {
            report.merge(task.await.expect("load task panicked"));
        }
        report
    }
}
