//! The admin-API commands of the CLI: `veer status` and `veer rollout ACTION ROUTE`.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0:?} is not an admin URL like http://127.0.0.1:9901")]
    Url(String),
    #[error("the token cannot be sent in an Authorization header (control characters?)")]
    Token,
    #[error("{0:?} is not a route name (1 to 64 characters of [a-z0-9_-])")]
    Route(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("admin API answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("admin API answered something that is not JSON")]
    NotJson,
}

impl CliError {
    /// A usage error (exit 1: what the command was given cannot work), as opposed to a
    /// failure at run time (exit 2: the admin API is unreachable or refused).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CliError::Url(_) | CliError::Token | CliError::Route(_)
        )
    }
}

/// The admin request `method admin+path` with the token, if any, as a bearer token.
fn admin_request(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
) -> Result<http::request::Builder, CliError> {
    let base = admin.trim_end_matches('/');
    // The API's paths are added at the end: a query or fragment would swallow them.
    if base.contains(['?', '#']) {
        return Err(CliError::Url(admin.to_string()));
    }
    // `127.0.0.1:9901` (as `admin.listen` and `veer demo --admin` write it) or
    // `localhost:9901`, without a scheme, is meant as http; a bare name without a port is
    // taken for a mistake.
    let host_and_port = base
        .parse::<http::uri::Authority>()
        .is_ok_and(|authority| authority.port().is_some());
    let scheme = if host_and_port { "http://" } else { "" };
    let uri: Uri = format!("{scheme}{base}{path}")
        .parse()
        .map_err(|_| CliError::Url(admin.to_string()))?;
    let Some(authority) = uri.authority().filter(|_| uri.scheme_str() == Some("http")) else {
        return Err(CliError::Url(admin.to_string()));
    };
    // A port that is not one (`:http`, `:99999`, `:0`) is the URL's fault, not the API's.
    let after_host = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, r)| r);
    if after_host.contains(':') && authority.port_u16().is_none_or(|port| port == 0) {
        return Err(CliError::Url(admin.to_string()));
    }
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        let value =
            http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| CliError::Token)?;
        request = request.header(header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// How long an admin command waits for the connection, the answer and its body together.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `request` to the admin API at `admin`: the answer's status and body, or
/// [`CliError::Unreachable`] when there is none within [`ANSWER_TIMEOUT`].
async fn send(admin: &str, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), CliError> {
    let unreachable = |reason: String| CliError::Unreachable {
        url: admin.trim_end_matches('/').to_string(),
        reason,
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            let within = humantime::format_duration(ANSWER_TIMEOUT);
            unreachable(format!("no answer within {within}"))
        })?
}

/// The URL of an admin API listening on `listen`; an unspecified address (`0.0.0.0`, `[::]`)
/// is reached on loopback.
pub fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// One admin request; the answer's status and JSON body.
pub async fn call(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), CliError> {
    let mut request = admin_request(admin, token, method, path)?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    if !payload.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(payload)))
        .map_err(|_| CliError::Url(admin.to_string()))?;
    let (status, bytes) = send(admin, request).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| CliError::NotJson)?;
    if !status.is_success() {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request refused")
            .to_string();
        return Err(CliError::Refused { status, message });
    }
    Ok((status, value))
}

/// Writes `text` to stdout and flushes it. A closed stdout (`veer status | head -1`) is an
/// error for the caller, not the panic that `print!` makes of it.
pub fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// `veer status`: prints one table of every route.
pub async fn status(admin: &str, token: Option<&str>) -> anyhow::Result<()> {
    let (_, value) = call(admin, token, Method::GET, "/api/v1/routes", None).await?;
    let routes = value
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut text = render_table(&routes, std::io::stdout().is_terminal());
    if let Some(line) = rejected_reload(&value["reload"]) {
        text.push_str(&line);
    }
    text.push_str(&unsaved_states(&routes));
    // A reader that went away (`| head -1`) needed no more.
    let _ = out(&text);
    Ok(())
}

/// A line under the table when the last reload was rejected (the previous config still
/// serves): when, how many problems, and the first of them.
fn rejected_reload(reload: &Value) -> Option<String> {
    if reload["result"] != "rejected" {
        return None;
    }
    let errors = reload["errors"].as_array().map_or(&[][..], Vec::as_slice);
    let first = errors.first().map_or(String::new(), |e| {
        let line = e["line"]
            .as_u64()
            .map_or(String::new(), |n| format!(" (line {n})"));
        // A problem with the file as a whole (it cannot be read) names no key.
        let key = match e["path"].as_str().unwrap_or("-") {
            "" => String::new(),
            path => format!("{path}{line}: "),
        };
        format!("; first: {key}{}", e["message"].as_str().unwrap_or("-"))
    });
    Some(format!(
        "\nlast reload rejected at {}: {} problem(s), the previous config keeps serving{first}\n",
        reload["at"].as_str().unwrap_or("-"),
        errors.len()
    ))
}

/// A line under the table for each route whose rollout state could not be saved to
/// `state.dir`: a restart would restore an older one.
fn unsaved_states(routes: &[Value]) -> String {
    let lines: String = routes
        .iter()
        .filter(|route| route["state_saved"] == false)
        .map(|route| {
            format!(
                "rollout state of {} not saved (a restart now restores an older one): {}\n",
                route["name"].as_str().unwrap_or("-"),
                route["state_error"].as_str().unwrap_or("-")
            )
        })
        .collect();
    if lines.is_empty() {
        lines
    } else {
        format!("\n{lines}")
    }
}

/// `veer health`: `GET /healthz` answers 200 within [`ANSWER_TIMEOUT`].
pub async fn health(admin: &str, token: Option<&str>) -> anyhow::Result<()> {
    let request = admin_request(admin, token, Method::GET, "/healthz")?
        .body(Full::new(Bytes::new()))
        .map_err(|_| CliError::Url(admin.to_string()))?;
    let (status, _) = send(admin, request).await?;
    if status != StatusCode::OK {
        anyhow::bail!("admin API answered {status} to /healthz");
    }
    let _ = out("ok\n");
    Ok(())
}

/// `veer rollout ACTION ROUTE`.
pub async fn rollout(
    admin: &str,
    token: Option<&str>,
    action: &str,
    route: &str,
) -> anyhow::Result<()> {
    let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if route.is_empty() || route.len() > 64 || !route.bytes().all(valid) {
        return Err(CliError::Route(route.to_string()).into());
    }
    let path = format!("/api/v1/routes/{route}/rollout/{action}");
    let (_, value) = call(admin, token, Method::POST, &path, None).await?;
    let _ = out(&render_table(
        std::slice::from_ref(&value),
        std::io::stdout().is_terminal(),
    ));
    Ok(())
}

/// A route's step as `i/n` while a rollout is under way (`step` of the route JSON counts from
/// 1), else `-`.
pub fn step_label(route: &Value) -> String {
    let steps = route["steps"].as_array().map_or(0, Vec::len);
    match route["step"].as_u64().unwrap_or(0) {
        0 => "-".into(),
        _ if steps == 0 => "-".into(),
        step => format!("{step}/{steps}"),
    }
}

/// A text cell of the status table: `-` when empty (a slot without a version label), control
/// characters escaped (a label is free text: a newline would break the row).
fn cell(text: &str) -> String {
    if text.is_empty() {
        return "-".into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The status table: one row per route and slot.
pub fn render_table(routes: &[Value], colour: bool) -> String {
    let header = [
        "ROUTE", "SLOT", "VERSION", "ROLE", "WEIGHT", "PHASE", "STEP", "REQ/S", "ERR%", "P99MS",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut verdicts = Vec::new();
    for route in routes {
        let s = |v: &Value| cell(v.as_str().unwrap_or(""));
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        let name = s(&route["name"]);
        let stable = s(&route["stable"]);
        let weight = f(&route["canary_weight"]);
        for slot in ["blue", "green"] {
            let stats = &route["slots"][slot];
            let (role, share) = if slot == stable {
                ("stable", 100.0 - weight)
            } else {
                ("canary", weight)
            };
            rows.push(vec![
                name.clone(),
                slot.to_string(),
                s(&route["versions"][slot]),
                role.to_string(),
                format!("{share:.2}%"),
                s(&route["phase"]),
                step_label(route),
                format!("{:.1}", f(&stats["rps"])),
                format!("{:.2}", f(&stats["error_rate"]) * 100.0),
                format!("{:.1}", f(&stats["latency_ms"]["p99"])),
            ]);
        }
        if let Some(verdict) = route["last_verdict"].as_object() {
            let result = verdict.get("result").and_then(Value::as_str).unwrap_or("-");
            let reason = verdict.get("reason").and_then(Value::as_str).unwrap_or("");
            verdicts.push(format!("{name}: last verdict {result}: {reason}"));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    if colour {
        out.push_str("\x1b[1m");
    }
    line(head, &mut out);
    if colour {
        out.push_str("\x1b[0m");
    }
    for row in rows {
        let colour_code = match row[3].as_str() {
            "canary" if colour => Some("\x1b[32m"),
            _ => None,
        };
        if let Some(code) = colour_code {
            out.push_str(code);
        }
        line(row, &mut out);
        if colour_code.is_some() {
            out.push_str("\x1b[0m");
        }
    }
    for verdict in verdicts {
        out.push_str(&verdict);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_route_whose_state_is_not_saved_gets_a_line_under_the_table() {
        let routes = [
            json!({"name": "shop", "state_saved": true, "state_error": null}),
            json!({"name": "api", "state_saved": false,
                   "state_error": "cannot access /s/routes/api.json: No space left on device"}),
        ];
        assert_eq!(
            unsaved_states(&routes),
            "\nrollout state of api not saved (a restart now restores an older one): cannot \
             access /s/routes/api.json: No space left on device\n"
        );
        assert_eq!(unsaved_states(&routes[..1]), "");
        let both = [routes[1].clone(), routes[1].clone()];
        // One blank line above them (the table ends with a line break), none between.
        let text = unsaved_states(&both);
        assert!(text.starts_with('\n') && !text.contains("\n\n"), "{text:?}");
    }

    #[test]
    fn a_rejected_reload_gets_a_line_under_the_table() {
        let rejected = json!({"at": "2026-12-06T05:00:00Z", "result": "rejected", "errors": [
            {"path": "route[0].rollout.steps", "line": 14, "message": "must end at 100"},
            {"path": "server.listen", "line": null, "message": "needs a restart"}]});
        assert_eq!(
            rejected_reload(&rejected).unwrap(),
            "\nlast reload rejected at 2026-12-06T05:00:00Z: 2 problem(s), the previous config \
             keeps serving; first: route[0].rollout.steps (line 14): must end at 100\n"
        );
        let unreadable = json!({"at": "2026-12-06T05:00:00Z", "result": "rejected", "errors": [
            {"path": "", "line": null, "message": "cannot read veer.toml: gone"}]});
        assert_eq!(
            rejected_reload(&unreadable).unwrap(),
            "\nlast reload rejected at 2026-12-06T05:00:00Z: 1 problem(s), the previous config \
             keeps serving; first: cannot read veer.toml: gone\n"
        );
        for fine in [
            json!({"at": "2026-12-06T05:00:00Z", "result": "applied", "errors": []}),
            json!({"at": null, "result": null, "errors": []}),
            json!(null),
        ] {
            assert_eq!(rejected_reload(&fine), None, "{fine}");
        }
    }

    #[test]
    fn an_admin_api_on_an_unspecified_address_is_reached_on_loopback() {
        for (listen, url) in [
            ("0.0.0.0:9901", "http://127.0.0.1:9901"),
            ("[::]:9901", "http://[::1]:9901"),
            ("10.0.0.5:9000", "http://10.0.0.5:9000"),
            ("[::1]:9901", "http://[::1]:9901"),
        ] {
            let listen: SocketAddr = listen.parse().unwrap();
            assert_eq!(admin_url(listen), url);
        }
    }

    #[test]
    fn table_has_a_row_per_slot_with_aligned_columns() {
        let route = json!({
            "name": "shop", "stable": "blue", "canary_weight": 10.0, "phase": "ramping",
            "step": 1, "steps": [1.0, 10.0, 100.0],
            "versions": {"blue": "v41", "green": "v42"},
            "slots": {
                "blue": {"rps": 90.0, "error_rate": 0.001, "latency_ms": {"p99": 9.8}},
                "green": {"rps": 10.0, "error_rate": 0.02, "latency_ms": {"p99": 12.5}}
            },
            "last_verdict": {"result": "hold", "reason": "waiting for evidence"}
        });
        let table = render_table(&[route], false);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ROUTE"));
        assert!(
            lines[1].contains("blue") && lines[1].contains("stable") && lines[1].contains("90.00%")
        );
        assert!(
            lines[2].contains("green") && lines[2].contains("canary") && lines[2].contains("2.00")
        );
        assert!(lines[2].contains("1/3"));
        assert_eq!(lines[0].find("SLOT"), lines[1].find("blue"));
        assert!(lines[3].contains("last verdict hold"));
    }

    #[test]
    fn a_missing_or_empty_version_shows_as_a_dash_and_control_characters_are_escaped() {
        let route = json!({
            "name": "shop", "stable": "blue", "phase": "idle",
            "versions": {"blue": "", "green": "v2\nbeta"},
        });
        let table = render_table(&[route], false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        let version = |line: &str| line.split_whitespace().nth(2).map(str::to_string);
        assert_eq!(version(lines[1]).as_deref(), Some("-"), "{table}");
        assert_eq!(version(lines[2]).as_deref(), Some("v2\\nbeta"), "{table}");
        // Every row has every column.
        for line in &lines {
            assert_eq!(line.split_whitespace().count(), 10, "{table}");
        }
    }

    #[test]
    fn the_step_column_shows_i_of_n_only_while_a_rollout_is_under_way() {
        let steps = json!([10.0, 50.0, 100.0]);
        for (phase, step, label) in [
            ("idle", 0, "-"),
            ("ramping", 1, "1/3"),
            ("ramping", 3, "3/3"),
            ("paused", 2, "2/3"),
            ("paused", 0, "-"),
            ("rolled_back", 0, "-"),
        ] {
            let route = json!({"phase": phase, "step": step, "steps": steps});
            assert_eq!(step_label(&route), label, "{phase} {step}");
            let table = render_table(&[route], false);
            let column = |line: &str| line.split_whitespace().nth(6).map(str::to_string);
            let header = table
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().position(|c| c == "STEP"));
            assert_eq!(header, Some(6), "{table}");
            for row in table.lines().skip(1) {
                assert_eq!(column(row).as_deref(), Some(label), "{table}");
            }
        }
    }
}
