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

/// An `Origin` whose host:port is not the one the request was sent to (browsers send it on
/// cross-site POSTs; CLIs and scripts send none).
fn foreign_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or("null");
    let origin_authority = origin
        .split_once("://")
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
