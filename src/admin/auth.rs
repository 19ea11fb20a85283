//! Admin auth: a bearer token when one is configured, and no cross-origin POSTs ever.

use http::{header, Method, Request, StatusCode};

use super::{json_error, Answer};

/// `Err` carries the refusal to send.
pub fn check<B>(req: &Request<B>, token: Option<&str>) -> Result<(), Box<Answer>> {
    if let Some(token) = token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials);
        if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            let mut answer = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            answer.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return Err(Box::new(answer));
        }
    }
    if token.is_none() && !names_this_machine(req) {
        // Without a token the API listens on loopback only; a page that rebinds its own DNS
        // name to 127.0.0.1 would still reach it, with its own name in Host.
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "Host must be an IP address or localhost (or configure admin.token)",
        )));
    }
    if req.method() == Method::POST && foreign_origin(req) {
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "cross-origin requests are refused",
        )));
    }
    Ok(())
}

/// The credentials of an `Authorization` value in the `Bearer` scheme, whose name is matched
/// in any letter case (RFC 9110 §11.1); the credentials themselves are taken as they are.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// An `Origin` other than the API's own: another scheme than `http` (the API speaks no TLS),
/// or another host:port than the one the request was sent to. Browsers send it on cross-site
/// POSTs; CLIs and scripts send none.
fn foreign_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("null");
    let origin_authority = origin
        .split_once("://")
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("http"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match (origin_authority, host) {
        (Some(origin), Some(host)) => !origin.eq_ignore_ascii_case(host),
        _ => true,
    }
}

/// Whether the request's Host (or URI authority) is an IP address or `localhost`, with any
/// port. No Host at all (HTTP/1.0) names nothing else either.
fn names_this_machine<B>(req: &Request<B>) -> bool {
    let host = match req.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => req.uri().host(),
    };
    let Some(host) = host else {
        return req.headers().get(header::HOST).is_none();
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(address, _)| address),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name
            .get(name.len().saturating_sub(10)..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(".localhost"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("/api/v1/routes");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn token_is_required_when_configured() {
        let status = |r: Result<(), Box<Answer>>| r.err().map(|a| a.status().as_u16());
        assert_eq!(status(check(&req(Method::GET, &[]), Some("s3"))), Some(401));
        let wrong = req(Method::GET, &[("authorization", "Bearer nope")]);
        assert_eq!(status(check(&wrong, Some("s3"))), Some(401));
        let right = req(Method::GET, &[("authorization", "Bearer s3")]);
        assert_eq!(status(check(&right, Some("s3"))), None);
        assert_eq!(status(check(&req(Method::GET, &[]), None)), None);
    }

    #[test]
    fn the_scheme_name_is_matched_in_any_case_and_the_token_exactly() {
        let status = |value: &str| {
            let r = req(Method::GET, &[("authorization", value)]);
            check(&r, Some("s3")).err().map(|a| a.status().as_u16())
        };
        for accepted in ["Bearer s3", "bearer s3", "BEARER s3", "bEaReR  s3"] {
            assert_eq!(status(accepted), None, "{accepted}");
        }
        for refused in [
            "Bearer S3",
            "Bearers3",
            "Basic s3",
            "s3",
            "Bearer",
            "Bearer s3x",
        ] {
            assert_eq!(status(refused), Some(401), "{refused}");
        }
    }

    #[test]
    fn without_a_token_only_addresses_and_localhost_are_accepted_as_host() {
        let status = |host: Option<&str>, token: Option<&str>| {
            let mut headers = vec![("authorization", "Bearer s3")];
            headers.extend(host.map(|h| ("host", h)));
            check(&req(Method::GET, &headers), token)
                .err()
                .map(|a| a.status().as_u16())
        };
        for accepted in [
            "127.0.0.1:9901",
            "127.0.0.1",
            "[::1]:9901",
            "[::1]",
            "localhost:9901",
            "LOCALHOST",
            "admin.localhost:9901",
            "10.1.2.3:9901",
        ] {
            assert_eq!(status(Some(accepted), None), None, "{accepted}");
        }
        assert_eq!(status(None, None), None);
        // A DNS name rebound to 127.0.0.1 by a web page.
        for refused in [
            "evil.example:9901",
            "evil.example",
            "localhost.evil.example",
            "[::1",
        ] {
            assert_eq!(status(Some(refused), None), Some(403), "{refused}");
        }
        // With a token, the token protects the API, whatever the name.
        assert_eq!(status(Some("admin.internal:9901"), Some("s3")), None);
    }

    #[test]
    fn foreign_origin_posts_are_refused() {
        let status = |r: Result<(), Box<Answer>>| r.err().map(|a| a.status().as_u16());
        let foreign = req(
            Method::POST,
            &[
                ("host", "127.0.0.1:9901"),
                ("origin", "https://evil.example"),
            ],
        );
        assert_eq!(status(check(&foreign, None)), Some(403));
        let same = req(
            Method::POST,
            &[
                ("host", "127.0.0.1:9901"),
                ("origin", "http://127.0.0.1:9901"),
            ],
        );
        assert_eq!(status(check(&same, None)), None);
        // The same host:port under another scheme is another origin.
        let other_scheme = req(
            Method::POST,
            &[
                ("host", "127.0.0.1:9901"),
                ("origin", "https://127.0.0.1:9901"),
            ],
        );
        assert_eq!(status(check(&other_scheme, None)), Some(403));
        let none = req(Method::POST, &[("host", "127.0.0.1:9901")]);
        assert_eq!(status(check(&none, None)), None);
        let get = req(
            Method::GET,
            &[
                ("host", "127.0.0.1:9901"),
                ("origin", "https://evil.example"),
            ],
        );
        assert_eq!(status(check(&get, None)), None);
    }
}
