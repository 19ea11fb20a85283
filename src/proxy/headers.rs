//! Header rewriting both ways: hop-by-hop removal, forwarded headers, veer's own headers.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::upstream::mirror::{remove_own_fields, SHADOW_HEADER};

/// Hop-by-hop headers (RFC 9110 §7.6.1) that are never forwarded, besides those that
/// `Connection` lists. `Trailer` is end to end: it declares the trailer fields that HTTP/1.1
/// framing then carries.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers; `Upgrade` (and `Connection: upgrade`) stay when tunnelling.
/// Returns whether a `TE` header accepted trailers.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, tunnelling: bool) -> bool {
    // Most messages carry none of them: one pass over the names costs less than a hashed
    // lookup per name. `Connection` is among them, so listed names are found too.
    let any = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    let trailers = any && remove_present_hop_by_hop(headers, tunnelling);
    if tunnelling {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    trailers
}

/// The items of a comma-separated field value, trimmed. Split as bytes: a value with other
/// bytes than visible ASCII in it (obs-text, which hyper lets through) still names its items.
fn list_items(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
}

fn remove_present_hop_by_hop(headers: &mut HeaderMap, tunnelling: bool) -> bool {
    // Read before `Connection: TE` takes it away.
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .flat_map(list_items)
        .any(|token| {
            let coding = token.split(|&b| b == b';').next().unwrap_or_default();
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        });
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(list_items)
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .filter(|name| !(tunnelling && name == header::UPGRADE))
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if !tunnelling {
        headers.remove(header::UPGRADE);
    }
    trailers
}

/// True when a request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade`).
/// An `Upgrade: h2c` (HTTP/2 over cleartext by upgrade) is not tunnelled: veer speaks h2c
/// itself (prior knowledge), so the request is forwarded as plain HTTP/1.1.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers.get(header::UPGRADE);
    upgrade.is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(list_items)
            .any(|token| token.eq_ignore_ascii_case(b"upgrade"))
}

/// What the forwarded headers say about the downstream side.
pub struct Forwarded<'a> {
    /// The client's address as `X-Forwarded-For` gives it ([`client_address`]).
    pub client: &'a HeaderValue,
    pub tls: bool,
    /// The effective authority the client asked for (host[:port]).
    pub host: Option<&'a HeaderValue>,
    /// The downstream protocol version, for `Via`.
    pub version: http::Version,
    /// The route's override header, stripped before forwarding.
    pub override_header: Option<&'a HeaderName>,
}

/// Rewrites a client request's headers for the upstream.
pub fn to_upstream(headers: &mut HeaderMap, fwd: &Forwarded<'_>, tunnelling: bool) {
    if remove_hop_by_hop(headers, tunnelling) && !tunnelling {
        // The client takes trailers, and veer passes them on: the upstream may send them. TE
        // goes with its connection option (RFC 9110 §10.1.4).
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
    }
    if fwd.version == http::Version::HTTP_2 {
        join_cookies(headers);
        // An HTTP/2 request may repeat an equal length; strict HTTP/1.1 servers refuse that.
        single_content_length(headers);
    }
    remove_own_fields(headers, fwd.override_header);
    if headers.contains_key(header::TRAILER) {
        let own = |name: &str| {
            name.eq_ignore_ascii_case(SHADOW_HEADER)
                || fwd
                    .override_header
                    .is_some_and(|n| name.eq_ignore_ascii_case(n.as_str()))
        };
        unannounce(headers, |name| {
            let set_by_veer = SET_BY_VEER
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f.as_str()));
            own(name) || is_hop_by_hop(name) || set_by_veer
        });
    }
    append_forwarded_for(headers, fwd.client);
    let proto = if fwd.tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = fwd.host {
        headers.insert(X_FORWARDED_HOST, host.clone());
        headers.insert(header::HOST, host.clone());
    }
    headers.append(header::VIA, via(fwd.version));
}

/// The fields veer sets on a request for its upstream. A client's trailers lose them: an
/// upstream that reads trailers with the head would take the client's word for its address.
const SET_BY_VEER: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::VIA,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes from a client's trailers the fields veer sets in the head ([`SET_BY_VEER`]).
pub fn remove_set_by_veer(trailers: &mut HeaderMap) {
    for name in &SET_BY_VEER {
        trailers.remove(name);
    }
}

/// Takes the field names trailers lose (`dropped`: veer's own, hop-by-hop ones) out of
/// `Trailer`, so that they are not announced either. Allocates only when `Trailer` names one.
fn unannounce(headers: &mut HeaderMap, dropped: impl Fn(&str) -> bool) {
    fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
        let text = v.to_str().unwrap_or("");
        text.split(',').map(str::trim).filter(|t| !t.is_empty())
    }
    let is_dropped = |token: &&str| dropped(token);
    let announced = headers.get_all(header::TRAILER);
    if !announced.iter().flat_map(tokens).any(|t| is_dropped(&t)) {
        return;
    }
    let kept = announced
        .iter()
        .flat_map(tokens)
        .filter(|t| !is_dropped(t))
        .collect::<Vec<_>>()
        .join(", ");
    headers.remove(header::TRAILER);
    if let Ok(value) = HeaderValue::from_str(&kept) {
        if !kept.is_empty() {
            headers.insert(header::TRAILER, value);
        }
    }
}

/// veer's `Via` entry for a message received in `version` (RFC 9110 §7.6.3), added to what
/// it forwards both ways.
pub fn via(version: http::Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        http::Version::HTTP_2 => "2 veer",
        http::Version::HTTP_10 => "1.0 veer",
        _ => "1.1 veer",
    })
}

/// HTTP/2 clients may send their cookies as several `cookie` fields; on HTTP/1.1 they go as
/// one, joined with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let cookies = headers.get_all(header::COOKIE);
    let (count, len) = cookies
        .iter()
        .fold((0, 0), |(n, len), v| (n + 1, len + v.len() + 2));
    if count < 2 {
        return;
    }
    let mut joined = Vec::with_capacity(len);
    for (i, value) in cookies.iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

/// A client address as `X-Forwarded-For` gives it (an IPv4-mapped IPv6 address as IPv4).
/// Made once per connection: formatting an address costs more than the rest of the rewrite.
pub fn client_address(ip: IpAddr) -> HeaderValue {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    // An address's text is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Appends the client to `X-Forwarded-For`; a list sent on several lines becomes one, in
/// order.
fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    let name = X_FORWARDED_FOR;
    let hops = headers.get_all(&name);
    let len: usize = hops.iter().map(|hop| hop.len() + 2).sum();
    if len == 0 {
        headers.insert(name, client.clone());
        return;
    }
    // One allocation: the buffer becomes the header value's storage without a copy.
    let mut value = Vec::with_capacity(len + client.len());
    for hop in hops.iter().filter(|hop| !hop.is_empty()) {
        value.extend_from_slice(hop.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(client.as_bytes());
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(name, value);
    }
}

/// Rewrites an upstream response's headers for the client.
pub fn to_client(status: StatusCode, headers: &mut HeaderMap, tunnelling: bool) {
    if headers.contains_key(header::TRANSFER_ENCODING)
        || (status.is_informational() && !tunnelling)
        || status == StatusCode::NO_CONTENT
    {
        // Both framings present: the length is not to be trusted; hyper re-frames. A 1xx or
        // 204 has no body and must not carry a length (HTTP/2 clients reset the stream).
        headers.remove(header::CONTENT_LENGTH);
    } else {
        single_content_length(headers);
    }
    remove_hop_by_hop(headers, tunnelling);
    if headers.contains_key(header::TRAILER) {
        unannounce(headers, is_hop_by_hop);
    }
}

/// Whether a field name is one `remove_hop_by_hop` always removes (outside a tunnel): trailers
/// lose these, so `Trailer` does not announce them either.
fn is_hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case(header::UPGRADE.as_str())
        || HOP_BY_HOP
            .iter()
            .any(|hop| name.eq_ignore_ascii_case(hop.as_str()))
}

/// Whether an answer's `Transfer-Encoding` names any coding but one `chunked`: `gzip, chunked`,
/// `identity`, `chunked, chunked`; or ends in anything but `chunked` (`chunked,`), which hyper's
/// client then does not read as chunked either.
pub fn other_coding_than_chunked(headers: &HeaderMap) -> bool {
    let values = headers.get_all(header::TRANSFER_ENCODING);
    let Some(last) = values.iter().next_back() else {
        return false;
    };
    let mut codings = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    let chunked = |coding: &[u8]| coding.eq_ignore_ascii_case(b"chunked");
    let ends_chunked = last
        .as_bytes()
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|coding| chunked(coding.trim_ascii()));
    !(codings.next().is_some_and(chunked) && codings.next().is_none() && ends_chunked)
}

/// A length sent as a list (`2, 2`) or on several lines, which the HTTP/1.1 client accepted
/// because every value agreed, becomes one value: HTTP/2 clients reset a stream that carries
/// anything else. One plain value (the usual case) is left as it is.
fn single_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let length = first
        .to_str()
        .ok()
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(length) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        None => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(*k, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let mut headers = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "yes"),
            ("trailer", "x-checksum"),
        ]);
        assert!(remove_hop_by_hop(&mut headers, false));
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["x-kept", "trailer"]);
    }

    /// A byte outside visible ASCII (obs-text, which hyper accepts) in a `Connection` or `TE`
    /// value leaves the fields and codings it lists as they are: still removed, still seen.
    #[test]
    fn lists_with_other_bytes_than_ascii_still_name_their_fields() {
        for connection in [&b"X-Secret, \xe9t\xe9"[..], b"keep-alive, X-Secret, \x80"] {
            let mut headers = map(&[("x-secret", "1"), ("x-kept", "yes")]);
            let value = HeaderValue::from_bytes(connection).unwrap();
            headers.insert(header::CONNECTION, value);
            headers.insert(
                header::TE,
                HeaderValue::from_bytes(b"\xff, trailers").unwrap(),
            );
            assert!(remove_hop_by_hop(&mut headers, false));
            let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
            assert_eq!(names, vec!["x-kept"], "{connection:?}");
        }
    }

    #[test]
    fn te_trailers_is_seen_in_any_spelling_and_passed_on_alone() {
        for (te, connection, trailers) in [
            ("trailers", "", true),
            ("gzip;q=0.5, Trailers", "", true),
            ("trailers", "TE", true),
            ("gzip, deflate", "", false),
            ("trailersx", "", false),
        ] {
            let mut headers = map(&[("te", te)]);
            if !connection.is_empty() {
                headers.insert(header::CONNECTION, HeaderValue::from_static(connection));
            }
            let client = client_address(IpAddr::from([127, 0, 0, 1]));
            let fwd = Forwarded {
                client: &client,
                tls: false,
                host: None,
                version: http::Version::HTTP_11,
                override_header: None,
            };
            to_upstream(&mut headers, &fwd, false);
            let sent = headers.get(header::TE).map(|v| v.to_str().unwrap());
            assert_eq!(sent, trailers.then_some("trailers"), "TE: {te}");
            let connection = headers.get(header::CONNECTION).map(|v| v.to_str().unwrap());
            assert_eq!(connection, trailers.then_some("te"), "TE: {te}");
        }
    }

    proptest::proptest! {
        /// The scan that skips the removals must never skip one that was needed.
        #[test]
        fn skipping_the_removals_changes_nothing(
            picks in proptest::collection::vec((0..HEADER_NAMES.len(), 0..HEADER_VALUES.len()), 0..8),
            tunnelling: bool,
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in picks {
                headers.append(HEADER_NAMES[name], HeaderValue::from_static(HEADER_VALUES[value]));
            }
            let mut every_removal = headers.clone();
            let trailers = remove_present_hop_by_hop(&mut every_removal, tunnelling);
            if tunnelling {
                every_removal.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            proptest::prop_assert_eq!(remove_hop_by_hop(&mut headers, tunnelling), trailers);
            proptest::prop_assert_eq!(headers, every_removal);
        }
    }

    const HEADER_NAMES: [&str; 10] = [
        "connection",
        "te",
        "trailer",
        "transfer-encoding",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "x-listed",
        "x-kept",
        "host",
    ];
    const HEADER_VALUES: [&str; 5] = [
        "close",
        "keep-alive, x-listed",
        "Upgrade",
        "websocket",
        "trailers",
    ];

    #[test]
    fn h2c_upgrades_are_not_tunnelled() {
        let mut headers = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ]);
        assert!(!wants_upgrade(&headers));
        remove_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn tunnelling_keeps_upgrade() {
        let mut headers = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&headers));
        remove_hop_by_hop(&mut headers, true);
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["connection"], "upgrade");
    }

    #[test]
    fn forwarded_headers_are_set_and_internal_ones_stripped() {
        let override_header = HeaderName::from_static("x-veer-slot");
        let mut headers = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-veer-slot", "green"),
            ("x-veer-shadow", "1"),
            ("host", "shop.example.com"),
        ]);
        let host = HeaderValue::from_static("shop.example.com");
        let client = client_address("::ffff:127.0.0.1".parse().unwrap());
        let fwd = Forwarded {
            client: &client,
            tls: true,
            host: Some(&host),
            version: http::Version::HTTP_11,
            override_header: Some(&override_header),
        };
        to_upstream(&mut headers, &fwd, false);
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "shop.example.com");
        assert_eq!(headers["via"], "1.1 veer");
        assert!(!headers.contains_key("x-veer-slot"));
        assert!(!headers.contains_key("x-veer-shadow"));
    }

    /// An HTTP/2 request may repeat an equal `content-length`; strict HTTP/1.1 servers refuse a
    /// repeated one (RFC 9112 §6.3): it goes on once.
    #[test]
    fn a_repeated_http2_length_goes_upstream_once() {
        let client = client_address(IpAddr::from([127, 0, 0, 1]));
        for (version, want) in [(http::Version::HTTP_2, 1), (http::Version::HTTP_11, 2)] {
            let mut headers = map(&[("content-length", "3"), ("content-length", "3")]);
            let fwd = Forwarded {
                client: &client,
                tls: false,
                host: None,
                version,
                override_header: None,
            };
            to_upstream(&mut headers, &fwd, false);
            let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
            assert_eq!(lengths, want, "{version:?}");
            assert_eq!(headers[header::CONTENT_LENGTH], "3");
        }
    }

    #[test]
    fn forwarded_for_sent_on_several_lines_keeps_every_hop_in_order() {
        let client = client_address(IpAddr::from([127, 0, 0, 1]));
        for (lines, expected) in [
            (&["1.1.1.1", "2.2.2.2"][..], "1.1.1.1, 2.2.2.2, 127.0.0.1"),
            (
                &["1.1.1.1, 2.2.2.2", "3.3.3.3"][..],
                "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1",
            ),
            (&["1.1.1.1"][..], "1.1.1.1, 127.0.0.1"),
            (&[""][..], "127.0.0.1"),
            (&[][..], "127.0.0.1"),
        ] {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append("x-forwarded-for", HeaderValue::from_static(line));
            }
            append_forwarded_for(&mut headers, &client);
            let sent: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
            assert_eq!(sent, [expected], "{lines:?}");
        }
    }

    #[test]
    fn only_chunked_alone_is_a_coding_veer_passes_on() {
        for (codings, other) in [
            (&[][..], false),
            (&["chunked"][..], false),
            (&["Chunked "][..], false),
            (&["gzip, chunked"][..], true),
            (&["gzip", "chunked"][..], true),
            (&["identity"][..], true),
            (&["chunked, chunked"][..], true),
            (&["chunked", ""][..], true),
            (&["chunked,"][..], true),
            (&[", chunked"][..], false),
        ] {
            let mut headers = HeaderMap::new();
            for coding in codings {
                headers.append(header::TRANSFER_ENCODING, HeaderValue::from_static(coding));
            }
            assert_eq!(other_coding_than_chunked(&headers), other, "{codings:?}");
        }
    }

    #[test]
    fn response_with_both_framings_loses_content_length() {
        let mut headers = map(&[("transfer-encoding", "chunked"), ("content-length", "10")]);
        to_client(StatusCode::OK, &mut headers, false);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_repeated_or_listed_content_length_becomes_one_value() {
        for pairs in [
            &[("content-length", "2"), ("content-length", "2")][..],
            &[("content-length", "2, 2")][..],
            &[("content-length", "2")][..],
        ] {
            let mut headers = map(pairs);
            to_client(StatusCode::OK, &mut headers, false);
            let values: Vec<_> = headers.get_all("content-length").iter().collect();
            assert_eq!(values, ["2"], "{pairs:?}");
        }
    }

    #[test]
    fn a_204_or_1xx_loses_its_content_length_a_304_keeps_it() {
        for (status, kept) in [(204, false), (103, false), (304, true), (200, true)] {
            let mut headers = map(&[("content-length", "5")]);
            let status = StatusCode::from_u16(status).unwrap();
            to_client(status, &mut headers, false);
            assert_eq!(headers.contains_key("content-length"), kept, "{status}");
        }
    }
}
