//! The request as it arrived: bad-input checks that answer before anything is forwarded,
//! and the effective authority used for routing.

use http::request::Parts;
use http::{header, HeaderValue, Method, Version};
use hyper::body::Incoming;

use super::error::LocalError;
use crate::config::ServerConfig;
use crate::upstream::{Unread, MAX_FIELDS};

/// Bad-input checks that answer before anything is forwarded.
pub(super) fn check_request(parts: &Parts, server: &ServerConfig) -> Result<(), LocalError> {
    if parts.method == Method::CONNECT {
        return Err(LocalError::BadRequest("CONNECT is not supported"));
    }
    // The target is a path, `*` for OPTIONS, or an absolute http(s) URI: an authority alone
    // (`GET example.com`) is CONNECT's form, and another scheme is not a reverse proxy's.
    match parts.uri.scheme_str() {
        Some("http" | "https") => {}
        Some(_) => return Err(LocalError::BadRequest("request target scheme is not http")),
        None if parts.uri.authority().is_some() => {
            return Err(LocalError::BadRequest("request target is not a path"));
        }
        None => {}
    }
    // Over HTTP/2 a `*` comes as `:path` beside `:scheme` and `:authority`.
    if parts.uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err(LocalError::BadRequest(
            "request target * is for OPTIONS only",
        ));
    }
    let uri_len = parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    if uri_len > server.max_uri_bytes {
        return Err(LocalError::UriTooLong);
    }
    if parts.headers.len() > MAX_FIELDS {
        return Err(LocalError::HeadersTooLarge);
    }
    let h2 = parts.version == Version::HTTP_2;
    let mut header_bytes = 0;
    for (name, value) in &parts.headers {
        header_bytes += name.as_str().len() + value.len() + 4;
        // Malformed over HTTP/2 (RFC 9113 §8.2.1); HTTP/1.1's parser trims it.
        let padded = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        if h2 && (padded(value.as_bytes().first()) || padded(value.as_bytes().last())) {
            return Err(LocalError::BadRequest(
                "header value with leading or trailing whitespace",
            ));
        }
    }
    // The whole head: hyper bounds only the buffer it reads into (twice the limit), so a method
    // of 100 KiB would pass if the method were not counted.
    if parts.method.as_str().len() + uri_len + header_bytes > server.max_header_bytes {
        return Err(LocalError::HeadersTooLarge);
    }
    let mut te = parts.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        let chunked = first
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || te.next().is_some() {
            return Err(LocalError::BadRequest("unsupported Transfer-Encoding"));
        }
        if parts.headers.contains_key(header::CONTENT_LENGTH) {
            return Err(LocalError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
    }
    let mut lengths = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let valid = first
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if valid.is_none() || lengths.any(|other| other != first) {
            return Err(LocalError::BadRequest("invalid Content-Length"));
        }
    }
    Ok(())
}

pub(super) fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub(super) fn body_too_large(parts: &Parts, max: u64) -> Option<LocalError> {
    (max > 0 && content_length(parts).is_some_and(|len| len > max))
        .then_some(LocalError::BodyTooLarge)
}

/// The body of a request veer answered itself before forwarding it (413, 404, ...): read on
/// and dropped in the background over HTTP/2 (see [`Unread`]).
pub(super) fn discard_unread(version: Version, body: Incoming) {
    drop(Unread::new(body, version == Version::HTTP_2));
}

/// The effective authority: the URI's (absolute form or HTTP/2), else the single Host
/// header. HTTP/1.1 without a Host header, or any request with two, is a 400, whatever the form
/// of its target (RFC 9112 §3.2). An HTTP/2 request whose Host names another host than its
/// `:authority` is malformed (RFC 9113 §8.3.1): a 400, not routed by one and read by the
/// upstream as the other.
pub(super) fn effective_authority(parts: &Parts) -> Result<Option<HeaderValue>, LocalError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(LocalError::BadRequest("duplicate Host header"));
    }
    if host.is_none() && parts.version == Version::HTTP_11 {
        return Err(LocalError::BadRequest("missing Host header"));
    }
    // An `http` URI needs a host (RFC 9110 §4.2.1): HTTP/2 carries it in `:authority` or Host.
    if host.is_none() && parts.version == Version::HTTP_2 && parts.uri.authority().is_none() {
        return Err(LocalError::BadRequest("missing :authority"));
    }
    if let Some(authority) = parts.uri.authority() {
        // As strict as for Host: no userinfo (RFC 9113 §8.3.1), no empty host.
        if !valid_host(authority.as_str().as_bytes()) {
            return Err(LocalError::BadRequest("invalid authority"));
        }
        fn dotless(name: &str) -> &str {
            name.strip_suffix('.').unwrap_or(name)
        }
        let other_host = |host: &HeaderValue| {
            let name = host.to_str().map(strip_port).unwrap_or_default();
            !dotless(name).eq_ignore_ascii_case(dotless(authority.host()))
        };
        if parts.version == Version::HTTP_2 && host.is_some_and(other_host) {
            return Err(LocalError::BadRequest("Host differs from :authority"));
        }
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| LocalError::BadRequest("invalid authority"));
    }
    match host {
        Some(host) if valid_host(host.as_bytes()) => Ok(Some(host.clone())),
        Some(_) => Err(LocalError::BadRequest("invalid Host header")),
        None => Ok(None),
    }
}

/// A Host header value that can be an authority: `host[:port]` with a name, IPv4 or
/// bracketed IPv6 host, and a port up to 65535. A name has no empty label (`a..b`, `.a`; a
/// trailing dot is fine), as NGINX checks it, and only the characters of host names (letters,
/// digits, `-`, `.`, `_`, `~`, `%`): RFC 3986 allows sub-delimiters such as `,` in a reg-name,
/// but no host has them, and a `,` in a Host copied into `X-Forwarded-Host`, a list, would
/// name another host to the upstream than the one veer routed by. Checked without allocating.
fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(i) if !value.starts_with(b"[") || value.get(i.wrapping_sub(1)) == Some(&b']') => {
            (&value[..i], &value[i + 1..])
        }
        _ => (value, &b""[..]),
    };
    let port_ok = port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX);
    let host_ok = match host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        Some(v6) => {
            !v6.is_empty()
                && v6
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => {
            !host.is_empty()
                && !host.starts_with(b".")
                && !host.windows(2).any(|w| w == b"..")
                && host
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
        }
    };
    host_ok && port_ok
}

/// `host[:port]` → `host` (IPv6 literals keep their brackets).
pub(super) fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_are_checked_without_parsing_into_an_authority() {
        for good in [
            "shop.example.com",
            "shop.example.com:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "[::1]",
            "a_b",
            "shop.example.com.",
            "host:65535",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "a/b",
            "a@b",
            "[::1",
            "host:80x",
            "host:123456",
            "host:65536",
            "host:99999",
            "a..test",
            ".a.test",
            "[zz]:1",
            "secret.example.com,x",
            "a;b",
            "a=b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn an_h2_host_naming_another_host_than_the_authority_is_400() {
        let parts = |version, host: &str| {
            let mut request = http::Request::builder()
                .version(version)
                .uri("https://Shop.example.com:8443/x");
            if !host.is_empty() {
                request = request.header(header::HOST, host);
            }
            request.body(()).unwrap().into_parts().0
        };
        for host in [
            "",
            "shop.example.com",
            "SHOP.example.com:8443",
            "shop.example.com:1",
            "shop.example.com.",
        ] {
            let authority = effective_authority(&parts(Version::HTTP_2, host)).unwrap();
            assert_eq!(authority.unwrap(), "Shop.example.com:8443", "{host}");
        }
        for host in ["other.example.com", "shop.example.com.evil", "[::1]"] {
            assert!(
                matches!(
                    effective_authority(&parts(Version::HTTP_2, host)),
                    Err(LocalError::BadRequest("Host differs from :authority"))
                ),
                "{host}"
            );
        }
        // HTTP/1.1 absolute form: the target's authority wins, the Host header is ignored.
        let authority = effective_authority(&parts(Version::HTTP_11, "other.example.com"));
        assert_eq!(authority.unwrap().unwrap(), "Shop.example.com:8443");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("shop.example.com:8080"), "shop.example.com");
        assert_eq!(strip_port("shop.example.com"), "shop.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
