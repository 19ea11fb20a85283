//! Sticky key → bucket in `0..10000`.
//!
//! `bucket = xxh3_64_with_seed(key, seed) % 10000` where `seed = xxh3_64(salt)` and the salt is
//! the route name unless `[route.sticky] salt` is set. XXH3 is specified and frozen, so every
//! veer instance, on any machine and any version, puts a key in the same bucket; the test
//! vectors below pin it so that a dependency upgrade cannot silently reshuffle users.

use std::net::IpAddr;

use http::HeaderMap;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Buckets per route: weights have 0.01 % steps.
pub const BUCKETS: u32 = 10_000;

/// Length of the random id veer puts in its sticky cookie (hex of 128 bits).
pub const COOKIE_ID_LEN: usize = 32;

/// The hash seed for a route's salt.
pub fn seed(salt: &str) -> u64 {
    xxh3_64(salt.as_bytes())
}

/// The bucket of a sticky key.
pub fn bucket(seed: u64, key: &[u8]) -> u32 {
    // The modulo bias of 2^64 mod 10^4 is below 10^-15: irrelevant.
    (xxh3_64_with_seed(key, seed) % u64::from(BUCKETS)) as u32
}

/// A fresh uniformly random bucket, for requests without a sticky key.
pub fn random_bucket() -> u32 {
    fastrand::u32(0..BUCKETS)
}

/// A new cookie id: 128 random bits as 32 lowercase hex digits.
pub fn new_cookie_id() -> [u8; COOKIE_ID_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; COOKIE_ID_LEN];
    let bits = fastrand::u128(..);
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
    out
}

/// veer's cookie value in the request: the first well-formed one of that name, quoted or not.
/// Foreign or malformed values (veer's ids are lowercase hex) are treated as absent (a new id
/// will be set when none is left), never as an error; a browser may send several cookies of
/// one name (other paths or domains).
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let id = |pair: &'a [u8]| {
        let value = pair
            .trim_ascii()
            .strip_prefix(name.as_bytes())?
            .strip_prefix(b"=")?;
        // RFC 6265 lets a cookie's value be quoted: the same value.
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        // Without a branch per byte, so that the compiler can vectorize it (266 fewer
        // instructions per request than `all`, counted with loadtest/instructions.sh).
        let hex = |all: bool, b: &u8| all & matches!(b, b'0'..=b'9' | b'a'..=b'f');
        (value.len() == COOKIE_ID_LEN && value.iter().fold(true, hex)).then_some(value)
    };
    // Pairs found with `memchr`: a browser's cookie header often runs to a kilobyte.
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .find_map(|value| {
            let bytes = value.as_bytes();
            let mut start = 0;
            memchr::memchr_iter(b';', bytes)
                .chain([bytes.len()])
                .find_map(|end| {
                    let pair = &bytes[start..end];
                    start = end + 1;
                    id(pair)
                })
        })
}

/// The key bytes of a client address: 4 bytes for IPv4 (also when IPv4-mapped), else 16.
pub fn ip_key(ip: IpAddr, out: &mut [u8; 16]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            &out[..4]
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                &out[..4]
            }
            None => {
                *out = v6.octets();
                &out[..]
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bucket_is_pinned_by_test_vectors() {
        // Changing these values reshuffles every user of every deployment: never update them
        // to make a test pass; keep the old hash instead.
        let s = seed("shop");
        assert_eq!(s, xxh3_64(b"shop"));
        let vectors: Vec<u32> = ["alice", "bob", "", "0123456789abcdef0123456789abcdef"]
            .iter()
            .map(|key| bucket(s, key.as_bytes()))
            .collect();
        assert_eq!(vectors, PINNED.to_vec());
    }

    /// Cross-checked with an independent XXH3 implementation (Python `xxhash`):
    /// `xxh3_64_intdigest(key, seed=xxh3_64_intdigest(b"shop")) % 10000`.
    const PINNED: [u32; 4] = [3959, 1646, 6419, 749];

    #[test]
    fn cookie_value_accepts_only_veer_ids() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; veer_shop=0123456789abcdef0123456789abcdef; b=2"),
        );
        assert_eq!(
            cookie_value(&headers, "veer_shop"),
            Some(&b"0123456789abcdef0123456789abcdef"[..])
        );
        assert_eq!(cookie_value(&headers, "veer_other"), None);
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("veer_shop=evil"),
        );
        assert_eq!(cookie_value(&headers, "veer_shop"), None);
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("veer_shop=0123456789ABCDEF0123456789abcdef"),
        );
        assert_eq!(cookie_value(&headers, "veer_shop"), None);
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; veer_shop=\"0123456789abcdef0123456789abcdef\""),
        );
        assert_eq!(
            cookie_value(&headers, "veer_shop"),
            Some(&b"0123456789abcdef0123456789abcdef"[..])
        );
        for half_quoted in [
            "veer_shop=\"0123456789abcdef0123456789abcdef",
            "veer_shop=0123456789abcdef0123456789abcdef\"",
        ] {
            headers.insert(http::header::COOKIE, HeaderValue::from_static(half_quoted));
            assert_eq!(cookie_value(&headers, "veer_shop"), None, "{half_quoted}");
        }
    }

    /// Found among a browser's kilobyte of other cookies, by its exact name only: not in a
    /// name that ends or begins with it, nor in another cookie's value.
    #[test]
    fn cookie_value_is_found_by_its_exact_name_among_many() {
        let id = "0123456789abcdef0123456789abcdef";
        let other = "fedcba9876543210fedcba9876543210";
        let many: String = (0..40)
            .map(|i| format!("_ga{i}=GA1.2.{i}0000000; "))
            .collect();
        let header = format!(
            "{many}xveer_shop={other}; veer_shopx={other}; a=veer_shop={other};\t veer_shop={id} ;z=1"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&header).unwrap(),
        );
        assert!(header.len() > 1_000);
        assert_eq!(cookie_value(&headers, "veer_shop"), Some(id.as_bytes()));
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("{many}veer_shop= {id}; veer_shop={id}g")).unwrap(),
        );
        assert_eq!(cookie_value(&headers, "veer_shop"), None);
    }

    #[test]
    fn a_well_formed_cookie_wins_over_malformed_ones_of_the_same_name() {
        let id = &b"0123456789abcdef0123456789abcdef"[..];
        for value in [
            "veer_shop=stale; veer_shop=0123456789abcdef0123456789abcdef",
            "veer_shop=0123456789abcdef0123456789abcdef; veer_shop=stale",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::COOKIE, HeaderValue::from_static(value));
            assert_eq!(cookie_value(&headers, "veer_shop"), Some(id), "{value}");
        }
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("veer_shop=x"),
        );
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("veer_shop=0123456789abcdef0123456789abcdef"),
        );
        assert_eq!(cookie_value(&headers, "veer_shop"), Some(id));
    }

    #[test]
    fn new_cookie_ids_are_valid_and_distinct() {
        let a = new_cookie_id();
        let b = new_cookie_id();
        assert_ne!(a, b);
        let mut headers = HeaderMap::new();
        let value = format!("veer_x={}", std::str::from_utf8(&a).unwrap());
        headers.insert(http::header::COOKIE, HeaderValue::from_str(&value).unwrap());
        assert_eq!(cookie_value(&headers, "veer_x"), Some(&a[..]));
    }

    #[test]
    fn ipv4_mapped_addresses_share_the_ipv4_key() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_key(v4, &mut a), ip_key(mapped, &mut b));
    }
}
