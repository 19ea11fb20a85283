//! The admin API (JSON) on `admin.listen`: health, Prometheus metrics, route status, rollout
//! actions, hand-set weights, the journal, reload. Never reachable through proxy listeners.

mod auth;
pub mod prometheus;
pub mod status;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::listener::{keep_unsent_small, Activity, InFlight, Timers, Tracked, Watched};
use crate::rollout::{self, state::Action};

const MAX_BODY: usize = 64 * 1024;
/// The largest request head the admin API reads (the proxy's default `max_header_bytes`).
const MAX_HEAD: usize = 64 * 1024;
/// Admin connections open at once; more are closed as they are accepted. The admin port may
/// face a network (with a token), and each connection holds a descriptor the proxy needs too.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection with no request under way for this long (from the accept, or from the end of
/// its last request: a silent one, one with half a head, an idle keep-alive or HTTP/2 one) is
/// closed; a POST body must arrive whole within it too.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin API until `shutdown`.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut warned: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, "Admin accept failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::app::stopped(&mut shutdown) => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Once a minute at most: a flood must not flood the log too.
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                warn!("{MAX_CONNECTIONS} admin connections are open; closing new ones.");
                warned = Some(Instant::now());
            }
            continue;
        };
        let app = Arc::clone(&app);
        tokio::spawn(serve_connection(stream, app, slot, shutdown.clone(), peer));
    }
}

/// One admin connection, on the proxy listeners' timers (see [`crate::listener::drive`]), all
/// at `IDLE_TIMEOUT`: a request head (the first counted from the accept) must arrive whole
/// within it, a connection with no request under way for it is closed, and one whose client
/// takes nothing of its answer for it is cut. A slow reader of a large answer keeps its
/// connection while it reads.
async fn serve_connection(
    stream: TcpStream,
    app: Arc<App>,
    slot: OwnedSemaphorePermit,
    shutdown: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) {
    let timers = Timers {
        header: IDLE_TIMEOUT,
        idle: IDLE_TIMEOUT,
        exchange: IDLE_TIMEOUT,
    };
    keep_unsent_small(&stream);
    let activity = Arc::new(Activity::new(Instant::now()));
    let io = Watched::new(stream, Arc::clone(&activity), None);
    let seen = Arc::clone(&activity);
    let service = service_fn(move |req: Request<Incoming>| {
        // Held until the answer is written or dropped.
        let exchange = Activity::request(&seen, req.version(), Instant::now());
        // Let go unread, the body makes the connection linger at its close (see `Watched`).
        let reading = exchange.body_hold(req.body());
        let app = Arc::clone(&app);
        async move {
            let answer = handle(&app, req, reading).await;
            Ok::<_, Infallible>(answer.map(|body| Tracked::new(body, exchange)))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The proxy's default head limit (hyper's is about 400 KiB): larger heads get a 431.
    builder.http1().max_buf_size(MAX_HEAD);
    builder
        .http2()
        .max_header_list_size(u32::try_from(MAX_HEAD).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    crate::listener::drive(std::pin::pin!(conn), &activity, timers, shutdown, peer).await;
    drop(slot);
}

type Answer = Response<Full<Bytes>>;

/// The admin endpoints, each served for one method.
enum Endpoint<'a> {
    Healthz,
    Readyz,
    Metrics,
    Routes,
    Route(&'a str),
    Rollout(&'a str, Action),
    Weight(&'a str),
    Events,
    Reload,
}

impl<'a> Endpoint<'a> {
    /// The endpoint at `path`, or the message of the 404 when there is none.
    fn parse(path: &'a str) -> Result<Self, &'static str> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        Ok(match segments.as_slice() {
            ["healthz"] => Endpoint::Healthz,
            ["readyz"] => Endpoint::Readyz,
            ["metrics"] => Endpoint::Metrics,
            ["api", "v1", "routes"] => Endpoint::Routes,
            ["api", "v1", "routes", name] => Endpoint::Route(name),
            ["api", "v1", "routes", name, "rollout", action] => match Action::parse(action) {
                Some(action) => Endpoint::Rollout(name, action),
                None => return Err("unknown action (start, pause, resume, promote, rollback)"),
            },
            ["api", "v1", "routes", name, "weight"] => Endpoint::Weight(name),
            ["api", "v1", "events"] => Endpoint::Events,
            ["api", "v1", "config", "reload"] => Endpoint::Reload,
            _ => return Err("no such admin endpoint"),
        })
    }

    /// Whether the endpoint only reads (GET) rather than acts (POST).
    fn reads(&self) -> bool {
        !matches!(
            self,
            Endpoint::Rollout(..) | Endpoint::Weight(_) | Endpoint::Reload
        )
    }

    /// Every reading endpoint also answers HEAD (the same head, no body), as HTTP asks of
    /// every server.
    fn answers(&self, method: &Method) -> bool {
        match *method {
            Method::GET | Method::HEAD => self.reads(),
            Method::POST => !self.reads(),
            _ => false,
        }
    }

    /// The `Allow` header of a 405.
    fn allow(&self) -> &'static str {
        if self.reads() {
            "GET, HEAD"
        } else {
            "POST"
        }
    }
}

/// Answers one admin request; a HEAD gets the head GET would get, without the body.
/// `reading`: the connection's hold on the request's body, if it has one (see
/// [`InFlight::body_hold`]).
pub async fn handle(app: &App, req: Request<Incoming>, reading: Option<InFlight>) -> Answer {
    let head = req.method() == Method::HEAD;
    let mut answer = route(app, req, reading).await;
    if head {
        // hyper leaves the body out of a HEAD answer on HTTP/1.1, but not on HTTP/2.
        let length = http_body::Body::size_hint(answer.body())
            .exact()
            .unwrap_or(0);
        *answer.body_mut() = Full::default();
        answer
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    answer
}

/// Routes one admin request: 404 for a path that is no endpoint, 405 with `Allow` for an
/// endpoint asked with another method.
async fn route(app: &App, req: Request<Incoming>, reading: Option<InFlight>) -> Answer {
    // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host, and no request two (the checks
    // of `auth` read it: a second one must not hide behind the first).
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version() == Version::HTTP_11) {
        let mut answer = json_error(
            StatusCode::BAD_REQUEST,
            "a request has at most one Host header (HTTP/1.1: exactly one)",
        );
        // A client that sends such heads is not one to go on with.
        answer
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return answer;
    }
    let token = app.table.load().config.admin.token.clone();
    if let Err(answer) = auth::check(&req, token.as_deref()) {
        return *answer;
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let endpoint = match Endpoint::parse(&path) {
        Ok(endpoint) => endpoint,
        Err(message) => return json_error(StatusCode::NOT_FOUND, message),
    };
    if !endpoint.answers(req.method()) {
        let mut answer = json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here");
        answer
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(endpoint.allow()));
        return answer;
    }
    // Every POST's body is read whole (bounded in size and time), used or not.
    let body = match req.method() == Method::POST {
        true => match read_body(req.into_body()).await {
            Ok(body) => {
                if let Some(reading) = reading {
                    reading.body_read();
                }
                body
            }
            Err(answer) => return answer,
        },
        false => Bytes::new(),
    };
    match endpoint {
        Endpoint::Healthz => text(StatusCode::OK, "ok\n"),
        Endpoint::Readyz => {
            if app.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        Endpoint::Metrics => {
            let mut response = Response::new(Full::new(Bytes::from(prometheus::render(app))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::prometheus::CONTENT_TYPE),
            );
            response
        }
        Endpoint::Routes => routes(app),
        Endpoint::Route(name) => match app.table.load().route(name) {
            Some(route) => json_answer(StatusCode::OK, &status::route_json(route)),
            None => not_found(name),
        },
        Endpoint::Rollout(name, action) => {
            let _steady = app.between_reloads().await;
            apply(app, name, action, "requested through the admin API")
        }
        Endpoint::Weight(name) => {
            let _steady = app.between_reloads().await;
            set_weight(app, name, &body)
        }
        Endpoint::Events => events(app, &query).await,
        Endpoint::Reload => match app.reload().await {
            Ok(()) => json_answer(StatusCode::OK, &json!({ "result": "applied" })),
            Err(errors) => json_answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({ "result": "rejected", "errors": errors.0 }),
            ),
        },
    }
}

fn routes(app: &App) -> Answer {
    let table = app.table.load();
    let routes: Vec<Value> = table
        .routes()
        .iter()
        .map(|r| status::route_json(r))
        .collect();
    let reload = app
        .last_reload
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    json_answer(
        StatusCode::OK,
        &json!({ "routes": routes, "reload": reload }),
    )
}

/// A POST's body, whole: at most `MAX_BODY` bytes (413 above), within `IDLE_TIMEOUT` (408).
async fn read_body(body: Incoming) -> Result<Bytes, Answer> {
    let too_large = || {
        let reason = format!("body larger than {MAX_BODY} bytes");
        json_error(StatusCode::PAYLOAD_TOO_LARGE, &reason)
    };
    // A declared length over the limit is refused from the head, before any of the body.
    if http_body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let read = tokio::time::timeout(IDLE_TIMEOUT, Limited::new(body, MAX_BODY).collect());
    match read.await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(json_error(
            StatusCode::BAD_REQUEST,
            "body cut short by the client",
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "body not sent in time",
        )),
    }
}

/// The body of `POST /api/v1/routes/{name}/weight`: that one field, nothing else (a misspelt
/// or extra field is refused, not ignored).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    canary_percent: f64,
}

fn set_weight(app: &App, name: &str, body: &[u8]) -> Answer {
    const EXPECTED: &str = "expected {\"canary_percent\": N} with N in [0, 100], 0.01 steps";
    // An object only (serde would take `[10]` for the struct too).
    let parsed = serde_json::from_slice::<Value>(body).and_then(|value| match value {
        Value::Object(_) => serde_json::from_value::<WeightBody>(value),
        _ => Err(serde::de::Error::custom("not a JSON object")),
    });
    let percent = match parsed {
        Ok(body) => body.canary_percent,
        Err(error) => {
            return json_error(StatusCode::BAD_REQUEST, &format!("{EXPECTED} ({error})"));
        }
    };
    match crate::config::basis_points(percent) {
        Some(bp) => apply(
            app,
            name,
            Action::SetWeight(bp),
            "weight set through the admin API",
        ),
        None => json_error(StatusCode::BAD_REQUEST, EXPECTED),
    }
}

/// One rollout transition on a route: 200 with the new state, 409 with the current phase.
fn apply(app: &App, name: &str, action: Action, reason: &str) -> Answer {
    let table = app.table.load();
    let Some(route) = table.route(name) else {
        return not_found(name);
    };
    match rollout::act(&route.shared, &route.config, action, reason) {
        Ok(_) => {
            info!(
                route = name,
                action = action.as_str(),
                "Rollout changed through the admin API."
            );
            json_answer(StatusCode::OK, &status::route_json(route))
        }
        Err(error) => {
            let phase = route.shared.rollout.view().state.phase.as_str();
            json_answer(
                StatusCode::CONFLICT,
                &json!({ "error": error.to_string(), "phase": phase }),
            )
        }
    }
}

async fn events(app: &App, query: &str) -> Answer {
    const MAX_LIMIT: usize = 10_000;
    // Decoded as a form is (`%33` is `3`), as clients may send it.
    let limit = form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "limit")
        .map(|(_, value)| value.parse::<usize>());
    let limit = match limit {
        None => 50,
        // 0 asks for none: an empty list.
        Some(Ok(n)) => n.min(MAX_LIMIT),
        Some(Err(e)) if *e.kind() == std::num::IntErrorKind::PosOverflow => MAX_LIMIT,
        Some(Err(_)) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "limit must be a whole number from 0 (larger ones are read as 10000)",
            )
        }
    };
    // Up to 10,000 decisions (a dozen MB of journal): read on a blocking thread, not on the
    // runtime that also runs the controller and the config watcher.
    let store = Arc::clone(&app.store);
    let read = tokio::task::spawn_blocking(move || store.journal.tail(limit)).await;
    match read.unwrap_or_else(|error| Err(std::io::Error::other(error))) {
        Ok(events) => json_answer(StatusCode::OK, &json!({ "events": events })),
        Err(error) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot read the journal: {error}"),
        ),
    }
}

fn not_found(name: &str) -> Answer {
    json_error(StatusCode::NOT_FOUND, &format!("no route named {name:?}"))
}

fn text(status: StatusCode, body: &'static str) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_answer(status: StatusCode, value: &impl serde::Serialize) -> Answer {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) fn json_error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}
