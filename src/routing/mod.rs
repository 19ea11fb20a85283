//! The routing snapshot: routes matched by host then longest path prefix, and the slot decision.
//!
//! A [`RoutingTable`] is immutable; the app keeps the current one behind one `ArcSwap` and a
//! request loads it once. State that must outlive a reload (split, metrics, rollout state,
//! shadow counters) lives in [`RouteShared`], carried from one table to the next by route name.

pub mod sticky;
pub mod weights;

#[cfg(test)]
mod split_tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

use crate::config::{Config, HostPattern, RouteConfig, StickyBy};
use crate::metrics::SlotMetrics;
use crate::rollout::RouteRollout;
use crate::upstream::mirror::{self, ShadowStats};
use crate::Slot;
pub use weights::{SharedSplit, Split};

/// Per-route state that survives reloads.
pub struct RouteShared {
    pub name: String,
    pub split: SharedSplit,
    /// Indexed by [`Slot::index`].
    pub metrics: [SlotMetrics; 2],
    pub shadow_metrics: SlotMetrics,
    pub shadow: Arc<ShadowStats>,
    pub rollout: RouteRollout,
    round_robin: [AtomicUsize; 3],
    /// Requests under way per slot, counted only while the slot has a `max_in_flight`.
    in_flight: [AtomicUsize; 2],
}

impl RouteShared {
    pub fn new(name: String, split: Split, rollout: RouteRollout) -> Self {
        Self {
            name,
            split: SharedSplit::new(split),
            metrics: [SlotMetrics::new(), SlotMetrics::new()],
            shadow_metrics: SlotMetrics::new(),
            shadow: Arc::default(),
            rollout,
            round_robin: Default::default(),
            in_flight: Default::default(),
        }
    }

    pub fn slot_metrics(&self, slot: Slot) -> &SlotMetrics {
        &self.metrics[slot.index()]
    }

    /// One more request under way to `slot`, unless `max` already are.
    pub fn admit(self: &Arc<Self>, slot: Slot, max: usize) -> Option<SlotPermit> {
        let count = &self.in_flight[slot.index()];
        let mut now = count.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match count.compare_exchange_weak(now, now + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(SlotPermit {
                        shared: Arc::clone(self),
                        slot,
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }
}

/// A request under way to a slot with a `max_in_flight` ([`RouteShared::admit`]): it counts
/// until dropped, with the end of its answer (or of its tunnel).
pub struct SlotPermit {
    shared: Arc<RouteShared>,
    slot: Slot,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.shared.in_flight[self.slot.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route of one snapshot: its config and its long-lived state.
pub struct Route {
    pub config: RouteConfig,
    pub shared: Arc<RouteShared>,
    /// This snapshot's generation of the route's split ([`SharedSplit::next_generation`]).
    generation: u32,
    seed: u64,
    endpoints: [Vec<Authority>; 2],
    /// Per endpoint of `endpoints`: ejected after it failed.
    down: [Box<[PassedOver]>; 2],
    /// The shadow's endpoints, each with its rest after a refused connection.
    shadow_endpoints: Vec<(Authority, Arc<PassedOver>)>,
    /// What follows the id in veer's sticky cookie (`; Path=/; Max-Age=...`).
    cookie_attributes: Box<str>,
}

/// Where a request goes and why; shared by forwarding, telemetry, shadowing and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub slot: Slot,
    pub bucket: u32,
    /// Set when veer must set its sticky cookie with this id.
    pub new_cookie: Option<[u8; sticky::COOKIE_ID_LEN]>,
    pub overridden: bool,
    /// True when the bucket came from a sticky key (not a fresh random draw).
    pub keyed: bool,
}

impl Route {
    fn new(config: RouteConfig, shared: Arc<RouteShared>) -> Self {
        let parse = |list: &[String]| {
            list.iter()
                .filter_map(|e| e.parse::<Authority>().ok())
                .collect::<Vec<_>>()
        };
        let endpoints = [
            parse(&config.blue.endpoints),
            parse(&config.green.endpoints),
        ];
        let never_ejected =
            |list: &Vec<Authority>| list.iter().map(|_| PassedOver::default()).collect();
        let cookie_attributes = format!(
            "; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
            config.sticky.cookie_max_age.as_secs()
        )
        .into();
        Self {
            generation: shared.split.next_generation(),
            seed: sticky::seed(&config.sticky.salt),
            cookie_attributes,
            down: [never_ejected(&endpoints[0]), never_ejected(&endpoints[1])],
            endpoints,
            shadow_endpoints: config
                .shadow
                .as_ref()
                .map(|s| parse(&s.endpoints))
                .unwrap_or_default()
                .into_iter()
                .map(|endpoint| (endpoint, Arc::default()))
                .collect(),
            config,
            shared,
        }
    }

    /// Picks the slot for a request. The override header wins over the bucket.
    pub fn decide(&self, headers: &HeaderMap, peer: IpAddr) -> Decision {
        let (bucket, new_cookie, keyed) = self.bucket(headers, peer);
        let split = self.shared.split.load_for(self.generation);
        let forced = self
            .config
            .sticky
            .override_header
            .as_ref()
            .and_then(|name| headers.get(name))
            .and_then(|value| forced_slot(value.as_bytes()));
        Decision {
            slot: forced.unwrap_or_else(|| split.slot_for(bucket)),
            bucket,
            new_cookie,
            overridden: forced.is_some(),
            keyed,
        }
    }

    /// Whether this is the route's table still: no reload has begun to replace it. A request
    /// routed by a table that is not counts in no step window (`SlotMetrics::outside_steps`):
    /// it went by the old table's split, to the old table's endpoints.
    pub fn is_current(&self) -> bool {
        self.shared.split.generation() == self.generation
    }

    /// `(bucket, new cookie id, keyed)`.
    fn bucket(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> (u32, Option<[u8; sticky::COOKIE_ID_LEN]>, bool) {
        let keyed = |key: &[u8], cookie| (sticky::bucket(self.seed, key), cookie, true);
        let random = || (sticky::random_bucket(), None, false);
        match &self.config.sticky.by {
            StickyBy::Cookie => match sticky::cookie_value(headers, &self.config.sticky.cookie) {
                Some(id) => keyed(id, None),
                None => {
                    let id = sticky::new_cookie_id();
                    keyed(&id, Some(id))
                }
            },
            // An empty value is no key: every client sending one would share a bucket.
            StickyBy::Header(name) => match headers.get(name).map(|v| v.as_bytes().trim_ascii()) {
                Some(key) if !key.is_empty() => keyed(key, None),
                _ => random(),
            },
            StickyBy::ClientIp => {
                let mut buf = [0u8; 16];
                keyed(sticky::ip_key(peer, &mut buf), None)
            }
            StickyBy::None => random(),
        }
    }

    /// The next endpoint of a slot, round robin, passing over endpoints ejected in the last
    /// [`EJECTED_FOR`] (unless all of them are). A turn that falls on an ejected endpoint goes
    /// to the live ones in rotation, so they share the load evenly: the turns of a dead one
    /// do not all fall to its neighbour.
    pub fn endpoint(&self, slot: Slot) -> Option<&Authority> {
        let list = &self.endpoints[slot.index()];
        let down = &self.down[slot.index()];
        let n = list.len();
        if n < 2 {
            return list.first();
        }
        let turn = self.shared.round_robin[slot.index()].fetch_add(1, Ordering::Relaxed);
        let first = turn % n;
        // The clock is read only when an endpoint has been ejected at all.
        let now = std::cell::OnceCell::new();
        let up = |i: &usize| down[*i].is_up(|| *now.get_or_init(clock_ms));
        if up(&first) {
            return list.get(first);
        }
        let live = (0..n).filter(up).count();
        if live == 0 {
            return list.get(first);
        }
        // The dead one's turns (every n-th) go to each live one in turn.
        (0..n)
            .filter(up)
            .nth((turn / n) % live)
            .and_then(|i| list.get(i))
    }

    /// `endpoint` of `slot` refused a connection or reset an exchange: pass over it for
    /// [`EJECTED_FOR`]. A slot with one endpoint keeps trying it.
    pub fn eject(&self, slot: Slot, endpoint: &Authority) {
        let list = &self.endpoints[slot.index()];
        if list.len() < 2 {
            return;
        }
        if let Some(i) = list.iter().position(|e| e == endpoint) {
            self.down[slot.index()][i].start(EJECTED_FOR);
        }
    }

    /// How many endpoints `slot` has.
    pub fn endpoint_count(&self, slot: Slot) -> usize {
        self.endpoints[slot.index()].len()
    }

    /// The next shadow endpoint, round robin, passing over those resting after a refused
    /// connection (see [`mirror::REFUSED_REST`]); `None` when all of them rest.
    pub fn shadow_endpoint(&self) -> Option<(&Authority, &Arc<PassedOver>)> {
        let list = &self.shadow_endpoints;
        let n = list.len();
        let first = match n {
            0 => return None,
            1 => 0,
            n => self.shared.round_robin[2].fetch_add(1, Ordering::Relaxed) % n,
        };
        (0..n)
            .map(|i| &list[(first + i) % n])
            .find(|(_, rest)| rest.admits_one(mirror::REFUSED_REST))
            .map(|(endpoint, rest)| (endpoint, rest))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The `Set-Cookie` value that gives a client the sticky id `id` (`Secure` over TLS);
    /// Max-Age comes from `sticky.cookie_max_age` (30 days by default).
    pub fn set_cookie(&self, id: &[u8], tls: bool) -> Option<HeaderValue> {
        let name = self.config.sticky.cookie.as_bytes();
        let secure: &[u8] = if tls { b"; Secure" } else { b"" };
        let parts = [name, b"=", id, self.cookie_attributes.as_bytes(), secure];
        let mut value = Vec::with_capacity(parts.iter().map(|part| part.len()).sum());
        parts.iter().for_each(|part| value.extend_from_slice(part));
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
    }
}

/// The slot an override header's value names, in any letter case.
fn forced_slot(value: &[u8]) -> Option<Slot> {
    let value = value.trim_ascii();
    [Slot::Blue, Slot::Green]
        .into_iter()
        .find(|slot| value.eq_ignore_ascii_case(slot.as_str().as_bytes()))
}

/// How long an endpoint that refused a connection or reset an exchange is passed over.
pub const EJECTED_FOR: Duration = Duration::from_secs(10);

/// `path` as the upstream will read it, for matching: percent-encoded unreserved characters
/// decoded (RFC 3986 §6.2.2.2: `/%61pi` is `/api`, `%2e` a dot), `.` and `..` segments
/// resolved (§5.2.4) and a segment's `;parameters` left out of that (`..;x` is `..` to Tomcat
/// and Jetty), so that `/public/../admin` is routed as `/admin`, not by its first segment.
/// Borrowed when there is nothing to do, which is the usual case.
fn resolved(path: &str) -> Result<Cow<'_, str>, AmbiguousPath> {
    Ok(match decoded_unreserved(path) {
        Cow::Borrowed(path) => without_dot_segments(path)?,
        Cow::Owned(path) => Cow::Owned(without_dot_segments(&path)?.into_owned()),
    })
}

/// A path with both a run of `/` and a `.` or `..` segment (escaped or not). Upstreams read
/// such a path two ways: RFC 3986 keeps the empty segment for `..` to remove (`/admin//../x`
/// is `/admin/x`), NGINX and Go merge the slashes first (`/x`). No route can be chosen that
/// matches what the upstream will serve: such a request is refused (400).
#[derive(Debug, PartialEq, Eq)]
pub struct AmbiguousPath;

/// `path` with its escapes in one form (RFC 3986 §6.2.2): `%XX` decoded where it stands for a
/// letter, a digit, `-`, `.`, `_` or `~`, other escapes (`%2F` among them) with upper-case hex
/// digits (`%c3%a9` is `%C3%A9`).
pub(crate) fn decoded_unreserved(path: &str) -> Cow<'_, str> {
    /// The escape's byte, when `escape` starts with one (`%` and two hex digits).
    fn escaped(escape: &[u8]) -> Option<u8> {
        let hex = |b: u8| (b as char).to_digit(16);
        if escape.first() != Some(&b'%') {
            return None;
        }
        Some((hex(*escape.get(1)?)? * 16 + hex(*escape.get(2)?)?) as u8)
    }
    fn unreserved(byte: u8) -> bool {
        byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
    }
    let bytes = path.as_bytes();
    // An escape to rewrite: of an unreserved character, or with a lower-case hex digit.
    let rewritten = |i: usize| {
        escaped(&bytes[i..]).is_some_and(|byte| {
            unreserved(byte) || bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase)
        })
    };
    let Some(first) = (0..bytes.len()).find(|&i| bytes[i] == b'%' && rewritten(i)) else {
        return Cow::Borrowed(path);
    };
    let mut out = Vec::with_capacity(path.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        match escaped(&bytes[i..]) {
            Some(byte) if unreserved(byte) => out.push(byte),
            Some(_) => {
                out.push(b'%');
                out.extend(bytes[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
            }
            None => {
                out.push(bytes[i]);
                i += 1;
                continue;
            }
        }
        i += 3;
    }
    // Only ASCII escapes became ASCII bytes: the rest is the valid UTF-8 it was.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| path.to_string()))
}

/// `path` with its `.` and `..` segments resolved, or its runs of `/` taken as one (as NGINX's
/// `merge_slashes` and Go's `path.Clean` take them: `//api` is matched as `/api`); a path with
/// both is [`AmbiguousPath`].
fn without_dot_segments(path: &str) -> Result<Cow<'_, str>, AmbiguousPath> {
    // Most paths have no dot and no `//` at all: a `memchr` and a `memmem` tell.
    let bytes = path.as_bytes();
    let runs = memchr::memmem::find(bytes, b"//").is_some();
    let dotted =
        memchr::memchr(b'.', bytes).is_some() && path.split('/').any(|segment| dots(segment) > 0);
    match (runs, dotted) {
        (false, false) => return Ok(Cow::Borrowed(path)),
        (true, true) => return Err(AmbiguousPath),
        _ => {}
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    let mut trailing_slash = false;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match dots(segment) {
            // Between two slashes of a run; the last: after a trailing slash.
            _ if segment.is_empty() => trailing_slash = last,
            0 => kept.push(segment),
            1 => trailing_slash = last,
            _ => {
                kept.pop();
                trailing_slash = last;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// 1 for a `.` segment, 2 for `..`, else 0; `;parameters` are left out.
fn dots(segment: &str) -> usize {
    match segment.split(';').next().unwrap_or_default() {
        "." => 1,
        ".." => 2,
        _ => 0,
    }
}

/// The address of a bracketed IPv6 host (`[::1]`).
fn ipv6_literal(host: &str) -> Option<std::net::Ipv6Addr> {
    host.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Milliseconds on a monotonic clock, from 1 (0 marks an endpoint never passed over).
pub(crate) fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// An endpoint passed over for a while after it failed (a primary ejected, a shadow resting):
/// until when, on [`clock_ms`]; 0 when it is not.
#[derive(Debug, Default)]
pub struct PassedOver(AtomicU64);

impl PassedOver {
    /// Passes the endpoint over for `span` from now.
    pub fn start(&self, span: Duration) {
        self.0
            .store(clock_ms() + span.as_millis() as u64, Ordering::Relaxed);
    }

    /// Takes it back at once.
    pub fn end(&self) {
        if self.0.load(Ordering::Relaxed) != 0 {
            self.0.store(0, Ordering::Relaxed);
        }
    }

    /// Whether it is up at `now` (read only when it was passed over at all).
    fn is_up(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.0.load(Ordering::Relaxed);
        until == 0 || until <= now()
    }

    /// Whether one request may go to it now: it is up; or its time is over and this request is
    /// the one that probes it, the next probe being `span` later.
    pub fn admits_one(&self, span: Duration) -> bool {
        let until = self.0.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = clock_ms();
        let next = now + span.as_millis() as u64;
        until <= now
            && self
                .0
                .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// One immutable routing snapshot.
pub struct RoutingTable {
    pub config: Arc<Config>,
    routes: Vec<Arc<Route>>,
    /// Route indexes per exact host, longest path prefix first.
    exact: HashMap<String, Vec<usize>>,
    /// `(".suffix", routes)`, longest suffix first.
    suffix: Vec<(String, Vec<usize>)>,
    any: Vec<usize>,
}

impl RoutingTable {
    /// Builds a snapshot; `shared` provides each route's long-lived state (the previous
    /// snapshot's for a route that still exists, fresh or restored otherwise). A snapshot is
    /// made to be published: its routes begin a new generation of their splits, and requests
    /// of the snapshots before it get the split as it was then ([`SharedSplit`]).
    pub fn new(config: Config, mut shared: impl FnMut(&RouteConfig) -> Arc<RouteShared>) -> Self {
        let routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .map(|rc| Arc::new(Route::new(rc.clone(), shared(rc))))
            .collect();
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut suffix: HashMap<String, Vec<usize>> = HashMap::new();
        let mut any = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            if route.config.hosts.is_empty() {
                any.push(i);
            }
            for host in &route.config.hosts {
                match host {
                    HostPattern::Exact(h) => exact.entry(h.clone()).or_default().push(i),
                    HostPattern::Suffix(s) => suffix.entry(s.clone()).or_default().push(i),
                }
            }
        }
        let by_prefix = |list: &mut Vec<usize>| {
            list.sort_by_key(|&i| std::cmp::Reverse(routes[i].config.path_prefix.len()));
        };
        exact.values_mut().for_each(by_prefix);
        by_prefix(&mut any);
        let mut suffix: Vec<(String, Vec<usize>)> = suffix.into_iter().collect();
        suffix.iter_mut().for_each(|(_, list)| by_prefix(list));
        suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Self {
            config: Arc::new(config),
            routes,
            exact,
            suffix,
            any,
        }
    }

    /// The route for a host (without port, any case) and path: exact host beats wildcard
    /// beats any host; within a tier the longest matching `path_prefix` wins, and a tier
    /// with no matching prefix falls through to the next. The path is matched with its dot
    /// segments resolved, as the upstream will read it.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.route_for(host, path).ok().flatten()
    }

    /// [`RoutingTable::find`], telling an [`AmbiguousPath`] from one that no route matches.
    pub fn route_for(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<&Arc<Route>>, AmbiguousPath> {
        // `OPTIONS *` asks about the server as a whole: the route of the host's root answers.
        let path = if path == "*" {
            Cow::Borrowed("/")
        } else {
            resolved(path)?
        };
        let by_path = |list: &[usize]| {
            list.iter()
                .map(|&i| &self.routes[i])
                .find(|route| path.starts_with(route.config.path_prefix.as_str()))
        };
        if let Some(host) = host {
            let canonical;
            let host = if let Some(v6) = ipv6_literal(host) {
                // `[0:0::1]` and `[::1]` are one host.
                canonical = format!("[{v6}]");
                canonical.as_str()
            } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
                canonical = host.to_ascii_lowercase();
                canonical.as_str()
            } else {
                host
            };
            let host = host.strip_suffix('.').unwrap_or(host);
            if let Some(route) = self.exact.get(host).and_then(|list| by_path(list)) {
                return Ok(Some(route));
            }
            for (suffix, list) in &self.suffix {
                if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                    if let Some(route) = by_path(list) {
                        return Ok(Some(route));
                    }
                }
            }
        }
        Ok(by_path(&self.any))
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn route(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.config.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn table(text: &str) -> RoutingTable {
        let config = parse(text, None).unwrap();
        RoutingTable::new(config, |rc| {
            Arc::new(RouteShared::new(
                rc.name.clone(),
                Split {
                    stable: rc.stable,
                    canary_bp: rc.rollout.weight,
                },
                RouteRollout::detached(rc),
            ))
        })
    }

    fn route(name: &str, hosts: &str, prefix: &str) -> String {
        format!(
            "[[route]]\nname = \"{name}\"\nhosts = [{hosts}]\npath_prefix = \"{prefix}\"\n\
             [route.blue]\nendpoints = [\"127.0.0.1:1\"]\n[route.green]\nendpoints = [\"127.0.0.1:2\"]\n"
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_is_passed_over_until_its_time_is_up() {
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\nname = \"r\"\n\
             [route.blue]\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n\
             [route.green]\nendpoints = [\"127.0.0.1:4\"]\n";
        let t = table(text);
        let r = &t.routes()[0];
        let picks = |n: usize| -> Vec<String> {
            (0..n)
                .filter_map(|_| r.endpoint(Slot::Blue).map(ToString::to_string))
                .collect()
        };
        let all: std::collections::HashSet<_> = picks(3).into_iter().collect();
        assert_eq!(all.len(), 3, "round robin over all three: {all:?}");
        let two: Authority = "127.0.0.1:2".parse().unwrap();
        r.eject(Slot::Blue, &two);
        let after = picks(30);
        assert!(after.iter().all(|e| e != "127.0.0.1:2"), "{after:?}");
        // The live two share the load evenly: the dead one's turns do not all go to one.
        let ones = after.iter().filter(|e| *e == "127.0.0.1:1").count();
        assert_eq!((ones, after.len() - ones), (15, 15), "{after:?}");
        // Every endpoint ejected: still one to try, round robin.
        for e in ["127.0.0.1:1", "127.0.0.1:3"] {
            r.eject(Slot::Blue, &e.parse().unwrap());
        }
        assert_eq!(picks(30).len(), 30);
        // A slot's only endpoint is never passed over.
        let four: Authority = "127.0.0.1:4".parse().unwrap();
        r.eject(Slot::Green, &four);
        assert_eq!(r.endpoint(Slot::Green), Some(&four));
        // Back in turn once EJECTED_FOR has passed.
        tokio::time::advance(EJECTED_FOR + Duration::from_millis(1)).await;
        let back: std::collections::HashSet<_> = picks(3).into_iter().collect();
        assert_eq!(back.len(), 3, "{back:?}");
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_then_longest_prefix() {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}{}{}{}{}{}",
            route("any", "", "/"),
            route("wild", "\"*.example.com\"", "/"),
            route("exact", "\"shop.example.com\"", "/"),
            route("exact-api", "\"shop.example.com\"", "/api"),
            route("any-static", "", "/static"),
            route("v6", "\"::1\"", "/"),
        );
        let t = table(&text);
        let name = |host: Option<&str>, path| t.find(host, path).map(|r| r.name().to_string());
        assert_eq!(
            name(Some("shop.example.com"), "/x").as_deref(),
            Some("exact")
        );
        assert_eq!(
            name(Some("SHOP.example.com."), "/api/1").as_deref(),
            Some("exact-api")
        );
        assert_eq!(name(Some("a.example.com"), "/").as_deref(), Some("wild"));
        assert_eq!(name(Some("[0:0::1]"), "/").as_deref(), Some("v6"));
        assert_eq!(name(Some("[::2]"), "/").as_deref(), Some("any"));
        assert_eq!(name(Some("example.com"), "/").as_deref(), Some("any"));
        assert_eq!(name(None, "/static/a.css").as_deref(), Some("any-static"));
        assert_eq!(
            name(Some("other"), "/static/a.css").as_deref(),
            Some("any-static")
        );
    }

    /// Threads drawing turns at once never get the ejected endpoint while a live one is left.
    /// 4 threads x 20,000 picks over 3 endpoints, one ejected.
    #[test]
    fn concurrent_picks_pass_over_an_ejected_endpoint() {
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\nname = \"r\"\n\
             [route.blue]\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n\
             [route.green]\nendpoints = [\"127.0.0.1:4\"]\n";
        let t = table(text);
        let r = &t.routes()[0];
        let dead: Authority = "127.0.0.1:2".parse().unwrap();
        r.eject(Slot::Blue, &dead);
        let counts: Vec<[usize; 3]> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut seen = [0; 3];
                        for _ in 0..20_000 {
                            let port = r.endpoint(Slot::Blue).unwrap().port_u16().unwrap();
                            seen[usize::from(port) - 1] += 1;
                        }
                        seen
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let total = counts
            .iter()
            .fold([0; 3], |a, c| [a[0] + c[0], a[1] + c[1], a[2] + c[2]]);
        assert_eq!(total[1], 0, "{total:?}");
        // Even to within 10 % of the 40,000 each would get.
        assert!(total[0].abs_diff(40_000) < 4_000, "{total:?}");
    }

    #[test]
    fn dot_segments_are_resolved_before_matching() {
        for (path, want) in [
            ("/a/b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/a/.b/..c/...", "/a/.b/..c/..."),
            ("//api/v2", "/api/v2"),
            ("/a///b//", "/a/b/"),
            ("//", "/"),
            ("/a/b/", "/a/b/"),
            ("/a/..;/b", "/b"),
            ("/a/..;x=1/b", "/b"),
            ("/a/.;/b", "/a/b"),
            ("/a/b;v=1/c", "/a/b;v=1/c"),
            ("/%61pi/x", "/api/x"),
            ("/%7E%2D%5f%30/%2F%25%zz%4", "/~-_0/%2F%25%zz%4"),
            ("/caf%C3%A9/%61", "/caf%C3%A9/a"),
            ("/caf%c3%a9/a%2fb", "/caf%C3%A9/a%2Fb"),
            ("/x/%2E%2e%2f", "/x/..%2F"),
        ] {
            assert_eq!(resolved(path), Ok(Cow::Borrowed(want)), "{path}");
        }
        assert!(matches!(resolved("/plain/path"), Ok(Cow::Borrowed(_))));
        for (path, ambiguous) in [
            ("/admin//../x", true),
            ("/a//../b", true),
            ("//a/./b", true),
            ("/a//b/%2e%2E/c", true),
            ("/a//b", false),
            ("/a/../b", false),
            ("/a//.b/..c", false),
        ] {
            assert_eq!(resolved(path).is_err(), ambiguous, "{path}");
        }

        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}{}",
            route("public", "", "/public/"),
            route("admin", "", "/admin/"),
        ) + &route("cafe", "", "/caf%C3%A9/");
        let t = table(&text);
        let name = |path| t.find(None, path).map(|r| r.name().to_string());
        assert_eq!(name("/public/../admin/x").as_deref(), Some("admin"));
        assert_eq!(name("//admin//x").as_deref(), Some("admin"));
        assert_eq!(name("/public/%2e%2e/admin/x").as_deref(), Some("admin"));
        assert_eq!(name("/public/..;/admin/x").as_deref(), Some("admin"));
        assert_eq!(name("/%61dmin/x").as_deref(), Some("admin"));
        assert_eq!(name("/caf%c3%a9/x").as_deref(), Some("cafe"));
        assert_eq!(name("/admin/../public/./a").as_deref(), Some("public"));
        assert_eq!(name("/public/../other"), None);
    }

    #[test]
    fn no_matching_route_is_none() {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}",
            route("only", "\"a.test\"", "/app")
        );
        let t = table(&text);
        assert!(t.find(Some("a.test"), "/other").is_none());
        assert!(t.find(Some("b.test"), "/app").is_none());
        assert!(t.find(None, "/app").is_none());
    }
}
