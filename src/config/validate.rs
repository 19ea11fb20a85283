//! Raw config → [`Config`]: every invariant checked, every problem reported with its key path
//! (`route[1].rollout.steps`) and the line it stands on. `veer check` and reload share this.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};

use super::file::{RawConfig, RawRollout, RawRoute, RawShadow, RawSlot, RawSteps, RawSticky};
use super::*;
use crate::Slot;

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    /// Key path such as `route[1].rollout.steps`; empty for file-level problems.
    pub path: String,
    /// 1-based line, when the key is present in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => f.write_str(&self.message),
            (false, Some(line)) => write!(f, "{}: {}, line {line}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The longest duration any key takes: 100 years (of 365.25 days, as `humantime` counts them).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// Parses and validates config text for a start (or `veer check`). `base` resolves relative
/// file paths (TLS files, state dir, access log); pass the config file's directory.
pub fn parse(text: &str, base: Option<&Path>) -> Result<Config, ConfigErrors> {
    parse_for(text, base, Purpose::Start)
}

/// What a config is validated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A start or `veer check`: the state dir and the access log's directory must be usable.
    Start,
    /// A reload: those two need a restart to change, so they are not looked at again (a log
    /// directory renamed since the start must not reject an unrelated route change).
    Reload,
}

/// Parses and validates config text for `purpose`.
pub fn parse_for(
    text: &str,
    base: Option<&Path>,
    purpose: Purpose,
) -> Result<Config, ConfigErrors> {
    let doc = toml_edit::ImDocument::parse(text).ok();
    let mut v = Validator {
        text,
        doc: doc.as_ref(),
        base: base.map(Path::to_path_buf),
        errors: Vec::new(),
        left_out: Vec::new(),
        purpose,
    };
    let (raw, keys) = deserialize_all(text, &v);
    v.left_out = keys.removed;
    let config = raw.and_then(|raw| v.config(raw));
    // What follows from a key being left out (a required key or table now missing, an array
    // now empty) is not a second problem.
    let Validator {
        mut errors,
        left_out,
        ..
    } = v;
    errors.retain(|error| !under_any(&error.path, &left_out));
    errors.extend(keys.errors);
    if errors.is_empty() {
        if let Some(config) = config {
            return Ok(config);
        }
    }
    errors.sort_by(|a, b| {
        let line = |e: &ConfigError| e.line.unwrap_or(usize::MAX);
        line(a).cmp(&line(b)).then_with(|| a.path.cmp(&b.path))
    });
    Err(ConfigErrors(errors))
}

/// Whether key path `path` is `key` or lies under it (`route[0].rollout` under `route[0]`).
fn within(path: &str, key: &str) -> bool {
    path.strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// Whether key path `path` is one of `keys` or lies under one.
fn under_any(path: &str, keys: &[String]) -> bool {
    keys.iter().any(|key| within(path, key))
}

/// How many key-level problems one file reports at most.
const MAX_KEY_ERRORS: usize = 100;

/// The key-level problems of one file, and the keys left out to read the rest.
#[derive(Default)]
struct KeyProblems {
    errors: Vec<ConfigError>,
    /// Key paths removed from the document (`route[0].blue.endpoints`).
    removed: Vec<String>,
}

impl KeyProblems {
    /// Whether `path` was left out, itself or with a key above it.
    fn left_out(&self, path: &str) -> bool {
        under_any(path, &self.removed)
    }
}

/// Deserializes `text`, reporting every key-level problem (an unknown key, a wrong type, a
/// missing key serde requires), not just the first: the offending key is left out and the rest
/// deserialized again. Lines are those of the original text. The raw config is `None` when what
/// is left cannot be read (a file that is not TOML, or too many problems).
fn deserialize_all(text: &str, v: &Validator<'_>) -> (Option<RawConfig>, KeyProblems) {
    let mut found = KeyProblems::default();
    // The text with the offending keys removed, once there is one.
    let mut edited: Option<toml_edit::DocumentMut> = None;
    loop {
        let source = edited.as_ref().map(ToString::to_string);
        let deserializer = toml::Deserializer::new(source.as_deref().unwrap_or(text));
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(deserializer) {
            Ok(raw) => return (Some(raw), found),
            Err(error) => error,
        };
        let segments = segments(error.path());
        let borrowed: Vec<Seg<'_>> = segments.iter().map(Segment::as_seg).collect();
        let path = render(&borrowed);
        let inner = error.into_inner();
        let message = plain_message(inner.message());
        let line = match &source {
            None => inner.span().map(|span| line_of(text, span.start)),
            Some(_) => v.line(&borrowed),
        };
        // Not TOML at all: the key written on that line, or the key whose value (an array
        // across lines) is still open there, if it tells.
        let path = match line {
            Some(line) if path.is_empty() && source.is_none() => key_written_at(text, line)
                .or_else(|| key_left_open_above(text, line))
                .unwrap_or(path),
            _ => path,
        };
        // A table that lacks a key because its wrong value was left out: already reported.
        let consequence = missing_field(&message).is_some_and(|field| {
            let key = if path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            found.left_out(&key)
        });
        if !consequence {
            found.errors.push(ConfigError {
                path,
                line,
                message,
            });
        }
        if found.errors.len() >= MAX_KEY_ERRORS {
            found.errors.push(ConfigError {
                path: String::new(),
                line: None,
                message: format!("more problems not shown: the first {MAX_KEY_ERRORS} are"),
            });
            return (None, found);
        }
        let doc = match &mut edited {
            Some(doc) => doc,
            None => match text.parse::<toml_edit::DocumentMut>() {
                Ok(doc) => edited.insert(doc),
                Err(_) => return (None, found),
            },
        };
        // Each pass removes a key, so the loop ends.
        match remove_key(doc, &segments) {
            Some(removed) => found.removed.push(removed),
            None => return (None, found),
        }
    }
}

/// A serde key path as owned segments.
fn segments(path: &serde_path_to_error::Path) -> Vec<Segment> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
            _ => None,
        })
        .collect()
}

/// `route[1].rollout.steps`.
fn render(path: &[Seg<'_>]) -> String {
    let mut rendered = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !rendered.is_empty() {
                    rendered.push('.');
                }
                rendered.push_str(key);
            }
            Seg::Index(i) => rendered.push_str(&format!("[{i}]")),
        }
    }
    rendered
}

/// The key a "missing field `name`" message names.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// serde's and toml's message on one line, in words rather than type names: "expected struct
/// RawSlot" reads "expected a table", "expected usize" "expected a non-negative integer".
fn plain_message(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).collect();
    let message = lines
        .iter()
        .filter(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(": ");
    // The TOML parser says nothing of a key whose value the file ends before (`key =`).
    if message.is_empty() {
        return "a value is missing (the file ends after `=`)".into();
    }
    if let Some(at) = message.find("expected struct Raw") {
        return format!("{}expected a table", &message[..at]);
    }
    for (rust, words) in TYPE_WORDS {
        if let Some(start) = message.strip_suffix(rust) {
            return format!("{start}{words}");
        }
    }
    message
}

/// The Rust types of config values, as a message puts them to a person.
const TYPE_WORDS: [(&str, &str); 6] = [
    ("expected usize", "expected a non-negative integer"),
    ("expected u64", "expected a non-negative integer"),
    ("expected u32", "expected a non-negative integer"),
    ("expected i64", "expected an integer"),
    ("expected i32", "expected an integer"),
    ("expected f64", "expected a number"),
];

/// An owned key path segment, as serde reports it.
enum Segment {
    Key(String),
    Index(usize),
}

impl Segment {
    fn as_seg(&self) -> Seg<'_> {
        match self {
            Segment::Key(key) => Seg::Key(key),
            Segment::Index(i) => Seg::Index(*i),
        }
    }
}

/// Removes the key at `path` from `doc`: the last key of the path (an array element takes its
/// whole array, so that the other elements keep their indexes). The removed key's path; `None`
/// when there is no such key.
fn remove_key(doc: &mut toml_edit::DocumentMut, path: &[Segment]) -> Option<String> {
    let last_key = path.iter().rposition(|s| matches!(s, Segment::Key(_)))?;
    let mut item = doc.as_item_mut();
    for segment in &path[..last_key] {
        item = match segment {
            Segment::Key(key) => item.as_table_like_mut()?.get_mut(key)?,
            Segment::Index(i) => item.get_mut(*i)?,
        };
    }
    let Segment::Key(key) = &path[last_key] else {
        return None;
    };
    item.as_table_like_mut()?.remove(key)?;
    let removed: Vec<Seg<'_>> = path[..=last_key].iter().map(Segment::as_seg).collect();
    Some(render(&removed))
}

/// The line of `key` (dotted, array elements indexed: `server.workers`,
/// `route[1].rollout.weight`) in config `text`, or of the deepest table above it that is there.
pub fn key_line(text: &str, key: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut path: Vec<Seg<'_>> = Vec::new();
    for part in key.split('.') {
        match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
            Some((name, index)) => {
                path.push(Seg::Key(name));
                path.push(Seg::Index(index.parse().ok()?));
            }
            None => path.push(Seg::Key(part)),
        }
    }
    line_in(text, &doc, &path)
}

/// What a valid config (parsed from `text`) holds that does nothing, or not what it says, for
/// `veer check` and the log: an auto route's `weight`, which is manual mode's (the controller
/// sets the weight); an `interval` under the controller's shortest; a shadow beside slots that
/// speak HTTP/2 (its copies go over HTTP/1.1).
pub fn warnings(config: &Config, text: &str) -> Vec<ConfigError> {
    let warning = |path: String, message: String| ConfigError {
        line: key_line(text, &path),
        path,
        message,
    };
    let mut warnings = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        if route.rollout.mode == Mode::Auto && route.rollout.weight != 0 {
            warnings.push(warning(
                format!("route[{i}].rollout.weight"),
                "ignored in auto mode (the controller sets the weight; it is manual mode's)".into(),
            ));
        }
        let shortest = crate::rollout::MIN_INTERVAL;
        if route.rollout.interval < shortest {
            warnings.push(warning(
                format!("route[{i}].rollout.interval"),
                format!("taken as {shortest:?} (the controller looks at most that often)"),
            ));
        }
        let h2 = [&route.blue, &route.green]
            .iter()
            .any(|slot| slot.protocol == Protocol::H2c);
        if h2 && route.shadow.is_some() {
            warnings.push(warning(
                format!("route[{i}].shadow.endpoints"),
                "copies go over HTTP/1.1 (a shadow has no `protocol`), while a slot of this \
                 route speaks HTTP/2"
                    .into(),
            ));
        }
    }
    warnings
}

/// The line of the deepest part of `path` that is present in `doc`, parsed from `text`.
fn line_in(text: &str, doc: &toml_edit::ImDocument<&str>, path: &[Seg<'_>]) -> Option<usize> {
    let mut item: &toml_edit::Item = doc.as_item();
    let mut span = None;
    for seg in path {
        let next = match seg {
            Seg::Key(key) => {
                let entry = item.as_table_like().and_then(|t| t.get_key_value(key));
                if let Some((key, _)) = entry {
                    span = key.span().or(span);
                }
                entry.map(|(_, value)| value)
            }
            Seg::Index(i) => {
                let value = item.get(*i);
                span = value.and_then(toml_edit::Item::span).or(span);
                value
            }
        };
        let Some(next) = next else { break };
        item = next;
    }
    span.map(|s| line_of(text, s.start))
}

/// The key path written at `line` of a file that is not valid TOML from there on
/// (`route[0].blue.version` for `version = v1` after the first `[route.blue]`): its text up to
/// `=`, under the last table header above it. `None` when the line does not start with a key or
/// the lines above it are not valid TOML by themselves (a value left open).
fn key_written_at(text: &str, line: usize) -> Option<String> {
    let start = line_start(text, line);
    let written = text[start..].lines().next()?;
    let (key, _) = written.split_once('=')?;
    let keys = toml_edit::Key::parse(key.trim()).ok()?;
    let above = toml_edit::ImDocument::parse(&text[..start]).ok()?;
    // The table header that starts last is the one the line is in.
    fn last_header(
        table: &toml_edit::Table,
        path: &mut Vec<String>,
        last: &mut (usize, Vec<String>),
    ) {
        for (key, item) in table.iter() {
            let mut visit = |table: &toml_edit::Table, segment: String| {
                path.push(segment);
                if let Some(span) = table.span().filter(|span| span.start >= last.0) {
                    *last = (span.start, path.clone());
                }
                last_header(table, path, last);
                path.pop();
            };
            match item {
                toml_edit::Item::Table(table) => visit(table, format!(".{key}")),
                toml_edit::Item::ArrayOfTables(tables) => {
                    for (i, table) in tables.iter().enumerate() {
                        visit(table, format!(".{key}[{i}]"));
                    }
                }
                _ => {}
            }
        }
    }
    let mut last = (0, Vec::new());
    last_header(above.as_table(), &mut Vec::new(), &mut last);
    let mut path: String = last.1.concat();
    for key in keys {
        path.push('.');
        path.push_str(key.get());
    }
    Some(path.trim_start_matches('.').to_string())
}

/// The key whose value, begun on a line above `line` (1-based), is still open at `line`: the
/// nearest line above at which the text before it is whole TOML, when a key is written there.
/// Looks at most 200 lines up.
fn key_left_open_above(text: &str, line: usize) -> Option<String> {
    let whole_before =
        |line: usize| toml_edit::ImDocument::parse(&text[..line_start(text, line)]).is_ok();
    if line <= 1 || whole_before(line) {
        return None;
    }
    let opened = (line.saturating_sub(200).max(1)..line)
        .rev()
        .find(|&above| whole_before(above))?;
    key_written_at(text, opened)
}

/// The byte offset in `text` at which line `line` (1-based) starts.
fn line_start(text: &str, line: usize) -> usize {
    text.split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum()
}

/// Why a `path_prefix` could never match a request path (which is ASCII, and matched with its
/// escapes in one form and its dot segments resolved), if it could not.
fn path_prefix_problem(prefix: &str) -> Option<String> {
    let in_path = |c: char| !(c == '?' || c == '#' || c.is_whitespace() || c.is_control());
    if !(prefix.starts_with('/') && prefix.chars().all(in_path)) {
        return Some(
            "must start with '/' and have no '?', '#', spaces or control characters".into(),
        );
    }
    if !prefix.is_ascii() {
        let encoded: String = prefix
            .bytes()
            .map(|b| match b {
                0x80.. => format!("%{b:02X}"),
                _ => char::from(b).to_string(),
            })
            .collect();
        return Some(format!(
            "write it {encoded:?}: request paths carry other characters than ASCII percent-encoded"
        ));
    }
    if prefix.contains("//") {
        return Some("must have no '//': paths are matched with runs of '/' taken as one".into());
    }
    let normalized = crate::routing::decoded_unreserved(prefix);
    if normalized.split('/').any(is_dot_segment) {
        return Some(
            "must have no '.' or '..' segment: paths are matched with them resolved".into(),
        );
    }
    match normalized {
        std::borrow::Cow::Owned(normalized) => Some(format!(
            "write it {normalized:?}: paths are matched with escapes of letters, digits and -._~ \
             decoded, and the others in upper case"
        )),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

/// `.` or `..`, as request paths are resolved before matching.
fn is_dot_segment(segment: &str) -> bool {
    segment == "." || segment == ".."
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// One segment of a key path.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

struct Validator<'a> {
    text: &'a str,
    doc: Option<&'a toml_edit::ImDocument<&'a str>>,
    base: Option<PathBuf>,
    errors: Vec<ConfigError>,
    /// Key paths left out for a problem already reported: checks that compare them with
    /// another key are not made.
    left_out: Vec<String>,
    purpose: Purpose,
}

/// The route names seen so far, and which route (index, name) each (host, path_prefix) went
/// to (an empty host for a route of any host).
#[derive(Default)]
struct Unique {
    names: HashSet<String>,
    matches: HashMap<(String, String), (usize, String)>,
}

impl Validator<'_> {
    /// Whether the key at `path` was read as written (not left out for a problem).
    fn read(&self, path: &[Seg<'_>]) -> bool {
        !under_any(&render(path), &self.left_out)
    }

    fn error(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        let line = self.line(path);
        self.errors.push(ConfigError {
            path: render(path),
            line,
            message: message.into(),
        });
    }

    /// The line of the deepest part of `path` that is present in the file.
    fn line(&self, path: &[Seg<'_>]) -> Option<usize> {
        line_in(self.text, self.doc?, path)
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let server = match raw.server {
            Some(server) => self.server(server),
            None => {
                self.error(
                    &[Seg::Key("server")],
                    "missing table (server.listen is required)",
                );
                None
            }
        };
        let admin = self.admin(raw.admin);
        if raw.state.dir.is_empty() {
            self.error(
                &[Seg::Key("state"), Seg::Key("dir")],
                "must name a directory",
            );
        }
        let state = StateConfig {
            dir: self.path_of(&raw.state.dir),
        };
        if self.purpose == Purpose::Start {
            self.state_dir(&state.dir);
        }
        if raw.route.is_empty() {
            self.error(&[Seg::Key("route")], "at least one [[route]] is required");
        }
        let mut routes = Vec::with_capacity(raw.route.len());
        let mut unique = Unique::default();
        for (i, route) in raw.route.into_iter().enumerate() {
            // Checked on what the file says, so that a route's other problems hide nothing.
            self.check_unique(i, &route, &mut unique);
            if let (Some(server), Some(admin)) = (&server, &admin) {
                self.not_to_itself(i, &route, &server.listen, admin.listen);
            }
            if let Some(route) = self.route(i, route) {
                routes.push(route);
            }
        }
        if let (Some(server), Some(admin)) = (&server, &admin) {
            self.admin_apart(&server.listen, admin.listen);
        }
        Some(Config {
            server: server?,
            admin: admin?,
            state,
            routes,
        })
    }

    /// The admin API cannot listen where the proxy does: the same port on the same address,
    /// or on any address when either is unspecified (`0.0.0.0`, `[::]`).
    fn admin_apart(&mut self, listen: &[SocketAddr], admin: SocketAddr) {
        if let Some(addr) = listen.iter().find(|addr| clash(addr, &admin)) {
            self.error(
                &[Seg::Key("admin"), Seg::Key("listen")],
                format!("{admin} takes the port of server.listen {addr}"),
            );
        }
    }

    /// No endpoint of route `i` may be veer itself: one of `listen` would send every request
    /// round again until connections ran out, and `admin` would open the admin API to anyone
    /// who can reach the proxy. Checked for IP addresses and `localhost`; other host names
    /// are resolved only when connected to.
    fn not_to_itself(
        &mut self,
        i: usize,
        route: &RawRoute,
        listen: &[SocketAddr],
        admin: SocketAddr,
    ) {
        let lists = [
            ("blue", route.blue.as_ref().map(|s| &s.endpoints)),
            ("green", route.green.as_ref().map(|s| &s.endpoints)),
            ("shadow", route.shadow.as_ref().map(|s| &s.endpoints)),
        ];
        for (key, endpoints) in lists {
            for (j, endpoint) in endpoints.into_iter().flatten().enumerate() {
                let addresses = addresses_of(endpoint);
                let own = listen
                    .iter()
                    .map(|addr| (addr, "server.listen"))
                    .chain([(&admin, "admin.listen")])
                    .find(|(addr, _)| addresses.iter().any(|e| reaches(e, addr)));
                if let Some((addr, whose)) = own {
                    let at = [
                        Seg::Key("route"),
                        Seg::Index(i),
                        Seg::Key(key),
                        Seg::Key("endpoints"),
                        Seg::Index(j),
                    ];
                    self.error(&at, format!("{endpoint:?} is veer's own {whose} {addr}"));
                }
            }
        }
    }

    /// `state.dir` must be a directory or one that can be made: the nearest part of the path
    /// that exists must be a directory that files can be made in (tried with a file removed
    /// again at once).
    fn state_dir(&mut self, dir: &Path) {
        let at = [Seg::Key("state"), Seg::Key("dir")];
        let existing = dir
            .ancestors()
            .find(|p| !p.as_os_str().is_empty() && p.exists());
        match existing {
            Some(file) if !file.is_dir() => {
                self.error(&at, format!("{file:?} exists and is not a directory"));
            }
            Some(existing) => {
                if let Err(error) = can_make_files_in(existing) {
                    self.error(&at, format!("cannot write in {existing:?}: {error}"));
                }
            }
            None => {}
        }
    }

    /// Route `i`'s name and its hosts and path_prefix must differ from those of the routes
    /// before it.
    fn check_unique(&mut self, i: usize, route: &RawRoute, unique: &mut Unique) {
        let r = |key| [Seg::Key("route"), Seg::Index(i), Seg::Key(key)];
        // A route without a name has that problem already.
        if let Some(name) = route.name.as_ref().filter(|name| !name.is_empty()) {
            if !unique.names.insert(name.clone()) {
                self.error(&r("name"), format!("duplicate route name {name:?}"));
            }
        }
        if !(self.read(&r("hosts")) && self.read(&r("path_prefix"))) {
            return;
        }
        // Host names match in any letter case.
        let mut hosts: Vec<String> = route.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        if hosts.is_empty() {
            hosts.push(String::new());
        }
        let name = route.name.clone().unwrap_or_default();
        for host in hosts {
            let taken = (host, route.path_prefix.clone());
            if let Some((_, first)) = unique.matches.get(&taken).filter(|(j, _)| *j != i) {
                let whose = match taken.0.as_str() {
                    "" => "any host".to_string(),
                    host => format!("host {host:?}"),
                };
                self.error(
                    &r("path_prefix"),
                    format!("route {first:?} has {whose} with this path_prefix already: such requests would all go to it"),
                );
                return;
            }
            unique.matches.insert(taken, (i, name.clone()));
        }
    }

    /// Both files named, and loadable.
    fn tls(&mut self, raw: super::file::RawTls) -> Option<TlsConfig> {
        let mut file = |key, name: Option<String>| {
            if name.is_none() {
                let path = [Seg::Key("server"), Seg::Key("tls"), Seg::Key(key)];
                self.error(&path, "required: a PEM file");
            }
            name.map(|name| self.path_of(&name))
        };
        let cert = file("cert", raw.cert);
        let key = file("key", raw.key);
        let tls = TlsConfig {
            cert: cert?,
            key: key?,
        };
        self.tls_files(&tls);
        Some(tls)
    }

    /// The certificate chain and key must load into a TLS config, as they will at start: each
    /// file's problem at its own key.
    fn tls_files(&mut self, tls: &TlsConfig) {
        use crate::listener::tls::{certificates, private_key, server_config};
        let at = |key| [Seg::Key("server"), Seg::Key("tls"), Seg::Key(key)];
        let certs = certificates(&tls.cert).map_err(|e| self.error(&at("cert"), e.to_string()));
        let key = private_key(&tls.key).map_err(|e| self.error(&at("key"), e.to_string()));
        if let (Ok(certs), Ok(key)) = (certs, key) {
            // rustls refuses a key of a kind it cannot use or that is not the certificate's,
            // and a certificate it cannot use.
            if let Err(error) = server_config(certs, key) {
                let file = if error.is_certificate() {
                    "cert"
                } else {
                    "key"
                };
                self.error(&at(file), error.to_string());
            }
        }
    }

    fn path_of(&self, text: &str) -> PathBuf {
        let path = PathBuf::from(text);
        match &self.base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        }
    }

    fn server(&mut self, raw: super::file::RawServer) -> Option<ServerConfig> {
        let s = |key| [Seg::Key("server"), Seg::Key(key)];
        let mut listen = Vec::new();
        match &raw.listen {
            None => self.error(&s("listen"), "required: one or more addresses"),
            Some(list) if list.is_empty() => {
                self.error(&s("listen"), "required: one or more addresses")
            }
            Some(list) => {
                for (i, addr) in list.iter().enumerate() {
                    let path = [Seg::Key("server"), Seg::Key("listen"), Seg::Index(i)];
                    if let Some(addr) = self.socket_addr(&path, addr) {
                        if listen.contains(&addr) {
                            self.error(&path, format!("{addr} is listed twice"));
                        } else if let Some(other) = listen.iter().find(|a| clash(a, &addr)) {
                            self.error(
                                &path,
                                format!("{addr} and {other} cannot both be bound: one covers the other's port"),
                            );
                        }
                        listen.push(addr);
                    }
                }
            }
        }
        let tls = raw.tls.and_then(|tls| self.tls(tls));
        let access_log = match raw.access_log.as_str() {
            "off" => AccessLog::Off,
            "" => {
                let at = [Seg::Key("server"), Seg::Key("access_log")];
                self.error(&at, "must be \"off\", \"stderr\" or a file path");
                AccessLog::Off
            }
            "stderr" => AccessLog::Stderr,
            keyword
                if ["off", "stderr"]
                    .iter()
                    .any(|k| keyword.eq_ignore_ascii_case(k)) =>
            {
                let at = [Seg::Key("server"), Seg::Key("access_log")];
                let lower = keyword.to_ascii_lowercase();
                self.error(
                    &at,
                    format!(
                        "must be \"{lower}\" in lowercase, or \"./{keyword}\" for a file of that name"
                    ),
                );
                AccessLog::Off
            }
            path => {
                let path = self.path_of(path);
                if self.purpose == Purpose::Start {
                    self.access_log_file(&path);
                }
                AccessLog::File(path)
            }
        };
        let header_timeout = self.duration(&s("header_timeout"), &raw.header_timeout, false);
        let request_timeout = self.duration(&s("request_timeout"), &raw.request_timeout, false);
        let connect_timeout = self.duration(&s("connect_timeout"), &raw.connect_timeout, false);
        let idle_timeout = self.duration(&s("idle_timeout"), &raw.idle_timeout, false);
        let upstream_idle_timeout = self.duration(
            &s("upstream_idle_timeout"),
            &raw.upstream_idle_timeout,
            false,
        );
        let tunnel_idle_timeout =
            self.duration(&s("tunnel_idle_timeout"), &raw.tunnel_idle_timeout, false);
        let drain_timeout = self.duration(&s("drain_timeout"), &raw.drain_timeout, true);
        let max_header_bytes =
            self.int_range(&s("max_header_bytes"), raw.max_header_bytes, 1024, 16 << 20);
        let max_body_bytes = self.int_range(&s("max_body_bytes"), raw.max_body_bytes, 0, i64::MAX);
        let max_uri_bytes = self.int_range(&s("max_uri_bytes"), raw.max_uri_bytes, 64, 65534);
        if raw.workers > 1024 {
            self.error(&s("workers"), "must be at most 1024 (0 = one per core)");
        }
        Some(ServerConfig {
            listen,
            workers: raw.workers,
            tls,
            header_timeout: header_timeout?,
            request_timeout: request_timeout?,
            connect_timeout: connect_timeout?,
            idle_timeout: idle_timeout?,
            upstream_idle_timeout: upstream_idle_timeout?,
            tunnel_idle_timeout: tunnel_idle_timeout?,
            max_header_bytes: usize::try_from(max_header_bytes?).ok()?,
            max_body_bytes: u64::try_from(max_body_bytes?).ok()?,
            max_uri_bytes: usize::try_from(max_uri_bytes?).ok()?,
            drain_timeout: drain_timeout?,
            access_log,
        })
    }

    /// The access log must be one that can be opened for appending: not a directory, in one
    /// that exists; a regular file is opened as at start (which writes nothing); for one not
    /// there yet, a file must be makeable in its directory. A FIFO, device or socket, and a
    /// link to nothing yet, are left for the start to open (trying could block or create).
    fn access_log_file(&mut self, path: &Path) {
        let at = [Seg::Key("server"), Seg::Key("access_log")];
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
        if path.is_dir() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
            self.error(&at, format!("{path:?} is a directory"));
        } else if let Some(dir) = dir.filter(|dir| !dir.is_dir()) {
            let reason = if dir.exists() {
                "is not a directory"
            } else {
                "does not exist"
            };
            self.error(&at, format!("cannot open {path:?}: {dir:?} {reason}"));
        } else {
            let problem = match std::fs::symlink_metadata(path) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    can_make_files_in(dir.unwrap_or(Path::new("."))).err()
                }
                Err(error) => Some(error),
                Ok(_) => match std::fs::metadata(path) {
                    Ok(file) if file.is_file() => {
                        std::fs::OpenOptions::new().append(true).open(path).err()
                    }
                    // A FIFO, device or socket; or a link to a file not made yet.
                    Ok(_) => None,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                    // A loop of links, say.
                    Err(error) => Some(error),
                },
            };
            if let Some(error) = problem {
                self.error(&at, format!("cannot open {path:?}: {error}"));
            }
        }
    }

    fn admin(&mut self, raw: super::file::RawAdmin) -> Option<AdminConfig> {
        let listen = self.socket_addr(&[Seg::Key("admin"), Seg::Key("listen")], &raw.listen);
        let raw_token_env = raw.token.is_none() && raw.token_env.is_some();
        let token_env_name = raw.token_env.clone();
        let token_given = raw.token.is_some() || raw.token_env.is_some();
        let token = match (raw.token, raw.token_env) {
            (Some(_), Some(_)) => {
                self.error(
                    &[Seg::Key("admin"), Seg::Key("token_env")],
                    "set either token or token_env, not both",
                );
                None
            }
            (Some(token), None) => Some(token),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(token) => Some(token),
                Err(_) => {
                    self.error(
                        &[Seg::Key("admin"), Seg::Key("token_env")],
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        // The key the token came from: a problem with the value is that key's.
        let key = if raw_token_env { "token_env" } else { "token" };
        match token.as_deref() {
            Some("") => {
                let message = match token_env_name.filter(|_| raw_token_env) {
                    Some(var) => format!("environment variable {var} is empty"),
                    None => "must not be empty".to_string(),
                };
                self.error(&[Seg::Key("admin"), Seg::Key(key)], message)
            }
            Some(token) if !token.bytes().all(|b| b.is_ascii_graphic()) => self.error(
                &[Seg::Key("admin"), Seg::Key(key)],
                "must be visible ASCII, without spaces or control characters: \
                 it is sent in an Authorization header",
            ),
            _ => {}
        }
        let listen = listen?;
        let token_read = self.read(&[Seg::Key("admin"), Seg::Key("token")])
            && self.read(&[Seg::Key("admin"), Seg::Key("token_env")]);
        // A token_env that names an unset variable has that problem only.
        if !listen.ip().is_loopback() && !token_given && token_read {
            self.error(
                &[Seg::Key("admin"), Seg::Key("listen")],
                "a non-loopback admin address needs admin.token or admin.token_env",
            );
        }
        Some(AdminConfig { listen, token })
    }

    fn route(&mut self, i: usize, raw: RawRoute) -> Option<RouteConfig> {
        let r = |key| [Seg::Key("route"), Seg::Index(i), Seg::Key(key)];
        let name = raw.name.unwrap_or_default();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            let problem = if name.is_empty() {
                "required: 1 to 64 characters of [a-z0-9_-]".to_string()
            } else {
                format!("{name:?} is not 1 to 64 characters of [a-z0-9_-]")
            };
            self.error(&r("name"), problem);
        }
        let mut hosts = Vec::with_capacity(raw.hosts.len());
        for (j, host) in raw.hosts.iter().enumerate() {
            let path = [
                Seg::Key("route"),
                Seg::Index(i),
                Seg::Key("hosts"),
                Seg::Index(j),
            ];
            if raw.hosts[..j].iter().any(|h| h.eq_ignore_ascii_case(host)) {
                self.error(&path, format!("{host:?} is listed twice"));
                continue;
            }
            match host_pattern(host) {
                Some(pattern) => hosts.push(pattern),
                None => self.error(
                    &path,
                    format!("{host:?} is not a host name or *.suffix pattern"),
                ),
            }
        }
        if let Some(problem) = path_prefix_problem(&raw.path_prefix) {
            self.error(&r("path_prefix"), problem);
        }
        let stable = Slot::parse(&raw.stable);
        if stable.is_none() {
            self.error(&r("stable"), "must be \"blue\" or \"green\"");
        }
        let blue = self.slot(i, "blue", raw.blue);
        let green = self.slot(i, "green", raw.green);
        let sticky = self.sticky(i, raw.sticky, &name);
        // Every section is checked before any is given up on, so that all problems show.
        let shadow = raw.shadow.map(|shadow| self.shadow(i, shadow));
        let rollout = self.rollout(i, raw.rollout);
        Some(RouteConfig {
            name,
            hosts,
            path_prefix: raw.path_prefix,
            stable: stable?,
            blue: blue?,
            green: green?,
            sticky: sticky?,
            shadow: match shadow {
                Some(shadow) => Some(shadow?),
                None => None,
            },
            rollout: rollout?,
        })
    }

    fn slot(&mut self, i: usize, key: &'static str, raw: Option<RawSlot>) -> Option<SlotConfig> {
        let path = [Seg::Key("route"), Seg::Index(i), Seg::Key(key)];
        let Some(raw) = raw else {
            self.error(&path, "missing table (endpoints are required)");
            return None;
        };
        let endpoints = self.endpoints(&path, &raw.endpoints);
        let mut at = path.to_vec();
        at.push(Seg::Key("max_in_flight"));
        let max_in_flight = self.int_range(&at, raw.max_in_flight, 0, 1 << 30);
        at.pop();
        at.push(Seg::Key("protocol"));
        let protocol = match raw.protocol.as_deref() {
            None | Some("http/1.1") => Some(Protocol::Http1),
            Some("h2c" | "h2") => Some(Protocol::H2c),
            Some(_) => {
                self.error(
                    &at,
                    "must be \"http/1.1\" or \"h2c\" (HTTP/2 without TLS, also written \"h2\")",
                );
                None
            }
        };
        Some(SlotConfig {
            endpoints: endpoints?,
            version: raw.version,
            max_in_flight: usize::try_from(max_in_flight?).ok()?,
            protocol: protocol?,
        })
    }

    fn endpoints(&mut self, at: &[Seg<'_>], list: &[String]) -> Option<Vec<String>> {
        let mut path = at.to_vec();
        path.push(Seg::Key("endpoints"));
        if list.is_empty() {
            self.error(&path, "required: one or more host:port");
            return None;
        }
        let mut ok = true;
        for (j, endpoint) in list.iter().enumerate() {
            let port = endpoint
                .parse::<http::uri::Authority>()
                .ok()
                .filter(|a| !a.host().is_empty() && !endpoint.contains('@'))
                .and_then(|a| a.port_u16());
            let problem = match port {
                None => "is not host:port",
                Some(0) => "has port 0, which cannot be connected to",
                Some(_) => continue,
            };
            let mut at = path.clone();
            at.push(Seg::Index(j));
            self.error(&at, format!("{endpoint:?} {problem}"));
            ok = false;
        }
        ok.then(|| list.to_vec())
    }

    fn sticky(&mut self, i: usize, raw: RawSticky, route: &str) -> Option<StickyConfig> {
        let p = |key| {
            [
                Seg::Key("route"),
                Seg::Index(i),
                Seg::Key("sticky"),
                Seg::Key(key),
            ]
        };
        let by = match raw.by.as_str() {
            "cookie" => Some(StickyBy::Cookie),
            "client-ip" => Some(StickyBy::ClientIp),
            "none" => Some(StickyBy::None),
            other => match other.strip_prefix("header:").map(HeaderName::try_from) {
                Some(Ok(name)) => Some(StickyBy::Header(name)),
                _ => {
                    self.error(
                        &p("by"),
                        "must be \"cookie\", \"header:<name>\", \"client-ip\" or \"none\"",
                    );
                    None
                }
            },
        };
        // The default name comes from the route's name: a bad one is that key's problem alone.
        let derived = raw.cookie.is_none();
        let cookie = raw.cookie.unwrap_or_else(|| format!("veer_{route}"));
        let cookie_ok = derived
            || !cookie.is_empty()
                && cookie
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !cookie_ok {
            self.error(
                &p("cookie"),
                "must be a non-empty cookie name (RFC 6265 token)",
            );
        }
        let cookie_max_age = self.duration(&p("cookie_max_age"), &raw.cookie_max_age, false);
        let override_header = if raw.override_header.is_empty() {
            Some(None)
        } else {
            match HeaderName::try_from(raw.override_header.as_str()) {
                Ok(name) if RESERVED_HEADERS.contains(&name.as_str()) => {
                    self.error(
                        &p("override_header"),
                        format!("{name} is a hop-by-hop or framing header; choose another (\"\" disables)"),
                    );
                    None
                }
                Ok(name) => Some(Some(name)),
                Err(_) => {
                    self.error(
                        &p("override_header"),
                        "not a valid header name (\"\" disables)",
                    );
                    None
                }
            }
        };
        Some(StickyConfig {
            by: by?,
            cookie,
            cookie_max_age: cookie_max_age?,
            override_header: override_header?,
            salt: raw.salt.unwrap_or_else(|| route.to_string()),
        })
    }

    fn shadow(&mut self, i: usize, raw: RawShadow) -> Option<ShadowConfig> {
        let at = [Seg::Key("route"), Seg::Index(i), Seg::Key("shadow")];
        let p = |key| {
            [
                Seg::Key("route"),
                Seg::Index(i),
                Seg::Key("shadow"),
                Seg::Key(key),
            ]
        };
        let endpoints = self.endpoints(&at, &raw.endpoints);
        let basis_points = self.percent(&p("percent"), raw.percent);
        let mut methods = Vec::with_capacity(raw.methods.len());
        if raw.methods.is_empty() {
            self.error(
                &p("methods"),
                "empty: no request would be mirrored (to mirror none, set percent = 0)",
            );
        }
        for method in &raw.methods {
            match Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => self.error(&p("methods"), format!("{method:?} is not an HTTP method")),
            }
        }
        let max_body_bytes = self.int_range(&p("max_body_bytes"), raw.max_body_bytes, 0, 1 << 30);
        let max_in_flight = self.int_range(&p("max_in_flight"), raw.max_in_flight, 1, 1 << 20);
        let compare = match raw.compare.as_str() {
            "off" => Some(Compare::Off),
            "status" => Some(Compare::Status),
            "body" => Some(Compare::Body),
            _ => {
                self.error(&p("compare"), "must be \"off\", \"status\" or \"body\"");
                None
            }
        };
        let timeout = match &raw.timeout {
            Some(t) => self.duration(&p("timeout"), t, false),
            None => Some(Duration::ZERO),
        };
        let host_char = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
        if let Some(suffix) = &raw.host_suffix {
            if suffix.is_empty() || !suffix.bytes().all(host_char) {
                self.error(
                    &p("host_suffix"),
                    format!("{suffix:?} is not a host name suffix: letters, digits, '-', '.', '_'"),
                );
            }
        }
        Some(ShadowConfig {
            endpoints: endpoints?,
            basis_points: basis_points?,
            methods,
            max_body_bytes: u64::try_from(max_body_bytes?).ok()?,
            max_in_flight: usize::try_from(max_in_flight?).ok()?,
            compare: compare?,
            timeout: timeout?,
            host_suffix: raw.host_suffix,
        })
    }

    fn rollout(&mut self, i: usize, raw: RawRollout) -> Option<RolloutConfig> {
        let p = |key| {
            [
                Seg::Key("route"),
                Seg::Index(i),
                Seg::Key("rollout"),
                Seg::Key(key),
            ]
        };
        let mode = match raw.mode.as_str() {
            "auto" => Some(Mode::Auto),
            "manual" => Some(Mode::Manual),
            _ => {
                self.error(&p("mode"), "must be \"auto\" or \"manual\"");
                None
            }
        };
        let weight = self.percent(&p("weight"), raw.weight);
        let steps = self.steps(&p("steps"), &raw.steps);
        if mode == Some(Mode::Auto) && steps.as_deref() == Some(&[10_000]) {
            self.error(
                &p("steps"),
                "needs a step below 100 in auto mode: the canary is judged against stable, \
                 which serves nobody at 100 % (use mode = \"manual\" to switch all at once)",
            );
        }
        let min_step_time = self.duration(&p("min_step_time"), &raw.min_step_time, true);
        let max_step_time = self.duration(&p("max_step_time"), &raw.max_step_time, false);
        let interval = self.duration(&p("interval"), &raw.interval, false);
        let min_latency_delta =
            self.duration(&p("min_latency_delta"), &raw.min_latency_delta, true);
        let min_requests = self.int_range(&p("min_requests"), raw.min_requests, 0, i64::MAX);
        let failure_threshold =
            self.int_range(&p("failure_threshold"), raw.failure_threshold, 1, 1000);
        let error_statuses = match parse_statuses(&raw.error_statuses) {
            Some(set) => Some(set),
            None => {
                self.error(
                    &p("error_statuses"),
                    "must be a comma list of classes (\"5xx\"), codes (\"429\") or ranges (\"500-504\")",
                );
                None
            }
        };
        let max_error_rate = self.fraction(&p("max_error_rate"), raw.max_error_rate, true);
        let error_rate_margin = self.fraction(&p("error_rate_margin"), raw.error_rate_margin, true);
        let confidence = self.open_fraction(&p("confidence"), raw.confidence);
        let latency_quantile = self.open_fraction(&p("latency_quantile"), raw.latency_quantile);
        if !(raw.max_latency_ratio.is_finite() && raw.max_latency_ratio >= 1.0) {
            self.error(&p("max_latency_ratio"), "must be a number >= 1");
        }
        if let (Some(min), Some(max)) = (min_step_time, max_step_time) {
            if max < min && self.read(&p("min_step_time")) && self.read(&p("max_step_time")) {
                self.error(
                    &p("max_step_time"),
                    format!(
                        "must be at least min_step_time (here {:?} and {:?}; max_step_time is \
                         15m when not set)",
                        raw.max_step_time, raw.min_step_time
                    ),
                );
            }
        }
        Some(RolloutConfig {
            mode: mode?,
            weight: weight?,
            steps: steps?,
            min_step_time: min_step_time?,
            min_requests: u64::try_from(min_requests?).ok()?,
            max_step_time: max_step_time?,
            failure_threshold: u32::try_from(failure_threshold?).ok()?,
            interval: interval?,
            error_statuses: error_statuses?,
            max_error_rate: max_error_rate?,
            error_rate_margin: error_rate_margin?,
            confidence: confidence?,
            latency_quantile: latency_quantile?,
            max_latency_ratio: raw.max_latency_ratio,
            min_latency_delta: min_latency_delta?,
        })
    }

    fn steps(&mut self, path: &[Seg<'_>], raw: &RawSteps) -> Option<Vec<u32>> {
        let steps = match raw {
            RawSteps::List(list) => {
                let mut out = Vec::with_capacity(list.len());
                for &percent in list {
                    out.push(basis_points(percent).filter(|&bp| bp > 0));
                }
                if out.iter().any(Option::is_none) {
                    self.error(
                        path,
                        "each step must be a percent in (0, 100] with 0.01 steps",
                    );
                    return None;
                }
                out.into_iter().flatten().collect::<Vec<_>>()
            }
            RawSteps::Spec(spec) => match geometric(spec) {
                Some(steps) => steps,
                None => {
                    self.error(
                        path,
                        "must be a list of percents or \"geometric:START:FACTOR\" (START in (0,100], FACTOR > 1)",
                    );
                    return None;
                }
            },
        };
        if steps.len() > MAX_STEPS {
            let n = steps.len();
            self.error(
                path,
                format!("makes {n} steps; at most {MAX_STEPS} are allowed"),
            );
            return None;
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            self.error(path, "must be increasing");
            return None;
        }
        if steps.last() != Some(&10_000) {
            self.error(path, "must end at 100");
            return None;
        }
        Some(steps)
    }

    fn percent(&mut self, path: &[Seg<'_>], percent: f64) -> Option<u32> {
        let bp = basis_points(percent);
        if bp.is_none() {
            self.error(path, "must be a percent in [0, 100] with 0.01 steps");
        }
        bp
    }

    fn fraction(&mut self, path: &[Seg<'_>], value: f64, zero_ok: bool) -> Option<f64> {
        let ok = value.is_finite()
            && value < 1.0 + f64::EPSILON
            && (value > 0.0 || zero_ok && value == 0.0);
        if !ok {
            let range = if zero_ok { "[0, 1]" } else { "(0, 1]" };
            self.error(path, format!("must be a number in {range}"));
            return None;
        }
        Some(value)
    }

    fn open_fraction(&mut self, path: &[Seg<'_>], value: f64) -> Option<f64> {
        if !(value.is_finite() && value > 0.0 && value < 1.0) {
            self.error(path, "must be a number in (0, 1)");
            return None;
        }
        Some(value)
    }

    fn int_range(&mut self, path: &[Seg<'_>], value: i64, min: i64, max: i64) -> Option<i64> {
        if value < min || value > max {
            self.error(path, format!("must be between {min} and {max}"));
            return None;
        }
        Some(value)
    }

    fn duration(&mut self, path: &[Seg<'_>], text: &str, zero_ok: bool) -> Option<Duration> {
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.error(path, "must be longer than 0");
                None
            }
            // A deadline this far off is "never"; much further and adding it to the clock
            // overflows.
            Ok(d) if d > MAX_DURATION => {
                self.error(path, "must be at most 100 years");
                None
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.error(
                    path,
                    format!("{text:?} is not a duration like \"250ms\", \"30s\", \"5m\""),
                );
                None
            }
        }
    }

    fn socket_addr(&mut self, path: &[Seg<'_>], text: &str) -> Option<SocketAddr> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(addr);
        }
        if let Some(port) = text.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Some(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        match text
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
        {
            Some(addr) => Some(addr),
            None => {
                self.error(path, format!("{text:?} is not an ip:port address"));
                None
            }
        }
    }
}

/// Headers the connection or the framing owns: no config key may take one of them over.
const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
];

/// How many steps a rollout may have.
const MAX_STEPS: usize = 100;

/// Percent with 0.01 steps → basis points.
pub fn basis_points(percent: f64) -> Option<u32> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return None;
    }
    let scaled = percent * 100.0;
    let rounded = scaled.round();
    // Room for the error of the decimal's binary form (33.33 * 100 = 3332.9999999999995), no
    // more: 1e-9 is not a weight of 0.
    if (scaled - rounded).abs() > 1e-9 {
        return None;
    }
    // In range 0..=10000 by the checks above.
    Some(rounded as u32)
}

/// Whether files can be made in `dir`: one of a name nobody else uses is made and removed at
/// once (one that somehow exists already shows the same).
fn can_make_files_in(dir: &Path) -> std::io::Result<()> {
    let name = format!(
        ".veer-check-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let probe = dir.join(name);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// `geometric:START:FACTOR` → START, START·F, START·F², … capped at 100 (basis points).
fn geometric(spec: &str) -> Option<Vec<u32>> {
    let mut parts = spec.strip_prefix("geometric:")?.split(':');
    let start: f64 = parts.next()?.trim().parse().ok()?;
    let factor: f64 = parts.next()?.trim().parse().ok()?;
    if parts.next().is_some() || !(factor > 1.0 && factor.is_finite()) {
        return None;
    }
    let mut step = basis_points(start).filter(|&bp| bp > 0)?;
    let mut steps = vec![step];
    while step < 10_000 {
        let next = ((f64::from(step) * factor).round() as u32).clamp(step + 1, 10_000);
        steps.push(next);
        step = next;
    }
    Some(steps)
}

fn parse_statuses(text: &str) -> Option<StatusSet> {
    let mut set = StatusSet::default();
    let mut any = false;
    for part in text.split(',').map(str::trim) {
        // A class in either case: `5xx` or `5XX`.
        let class = part.strip_suffix("xx").or_else(|| part.strip_suffix("XX"));
        let (lo, hi) = if let Some(class) = class {
            let c: u16 = class.parse().ok().filter(|c| (1..=5).contains(c))?;
            (c * 100, c * 100 + 99)
        } else if let Some((a, b)) = part.split_once('-') {
            (a.trim().parse().ok()?, b.trim().parse().ok()?)
        } else {
            // An empty part (`"5xx,"`) fails here too.
            let code: u16 = part.parse().ok()?;
            (code, code)
        };
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return None;
        }
        for code in lo..=hi {
            set.insert(code);
        }
        any = true;
    }
    any.then_some(set)
}

/// Whether connecting to `endpoint` reaches a socket bound to `listen` on this host: the same
/// port, and the same address, or an unspecified one (`0.0.0.0` connects to this host), or a
/// loopback address when `listen` is unspecified. Another host's address on the same port is
/// not veer, even with `listen` on `0.0.0.0`.
fn reaches(endpoint: &SocketAddr, listen: &SocketAddr) -> bool {
    let (e, l) = (endpoint.ip(), listen.ip());
    let family = e.is_ipv6() == l.is_ipv6() || (l.is_ipv6() && dual_stack());
    endpoint.port() == listen.port()
        && listen.port() != 0
        && (e == l || (family && (e.is_unspecified() || (l.is_unspecified() && e.is_loopback()))))
}

/// The addresses a `host:port` endpoint is known to connect to without a lookup: an IP
/// address, or both loopback addresses for `localhost`.
fn addresses_of(endpoint: &str) -> Vec<SocketAddr> {
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return vec![addr];
    }
    let port = endpoint
        .rsplit_once(':')
        .filter(|(host, _)| host.eq_ignore_ascii_case("localhost"))
        .and_then(|(_, port)| port.parse::<u16>().ok());
    match port {
        Some(port) => vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ],
        None => Vec::new(),
    }
}

/// Two listen addresses the kernel would not both bind: the same port (not 0) on the same
/// address, or with one of them the wildcard of its family (`[::]` covers IPv4 too, unless
/// Linux's `net.ipv6.bindv6only` is set).
fn clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    let covers = |wild: &SocketAddr, other: &SocketAddr| {
        wild.ip().is_unspecified()
            && (wild.is_ipv6() == other.is_ipv6() || (wild.is_ipv6() && dual_stack()))
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// Whether the kernel binds `[::]` for IPv4 too (Linux's default, `net.ipv6.bindv6only = 0`).
fn dual_stack() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
        .map_or(true, |value| value.trim() != "1")
}

fn host_pattern(text: &str) -> Option<HostPattern> {
    let text = text.trim();
    // An IPv6 literal, with or without brackets, is kept in the canonical bracketed form the
    // routing table compares request hosts in.
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    if let Ok(v6) = bare.unwrap_or(text).parse::<std::net::Ipv6Addr>() {
        return Some(HostPattern::Exact(format!("[{v6}]")));
    }
    let lower = text.to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return None;
    }
    Some(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[route]]
name = "shop"
[route.blue]
endpoints = ["127.0.0.1:9001"]
[route.green]
endpoints = ["127.0.0.1:9002"]
"#;

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse(text, None) {
            Ok(_) => Vec::new(),
            Err(e) => e.0,
        }
    }

    #[test]
    fn minimal_config_gets_spec_defaults() {
        let config = parse(MINIMAL, None).unwrap();
        let route = &config.routes[0];
        assert_eq!(route.rollout.steps, vec![100, 500, 1000, 2500, 5000, 10000]);
        assert_eq!(route.rollout.min_step_time, Duration::from_secs(30));
        assert_eq!(route.sticky.cookie, "veer_shop");
        assert_eq!(
            route.sticky.override_header.as_ref().unwrap(),
            "x-veer-slot"
        );
        assert_eq!(route.stable, Slot::Blue);
        assert!(route.rollout.error_statuses.contains(503));
        assert!(!route.rollout.error_statuses.contains(404));
        assert_eq!(config.server.max_body_bytes, 10_485_760);
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn a_slots_max_in_flight_is_zero_by_default_and_never_negative() {
        let config = parse(MINIMAL, None).unwrap();
        assert_eq!(config.routes[0].blue.max_in_flight, 0);
        let text = MINIMAL.replace("[route.green]", "max_in_flight = 64\n[route.green]");
        assert_eq!(parse(&text, None).unwrap().routes[0].blue.max_in_flight, 64);
        let text = MINIMAL.replace("[route.green]\n", "[route.green]\nmax_in_flight = -1\n");
        let errs = errors(&text);
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            ["route[0].green.max_in_flight: must be between 0 and 1073741824, line 10"],
        );
    }

    #[test]
    fn a_slots_protocol_is_http1_by_default_or_h2c() {
        let config = parse(MINIMAL, None).unwrap();
        assert_eq!(config.routes[0].blue.protocol, Protocol::Http1);
        for (written, protocol) in [
            ("http/1.1", Protocol::Http1),
            ("h2c", Protocol::H2c),
            ("h2", Protocol::H2c),
        ] {
            let text = MINIMAL.replace(
                "[route.green]\n",
                &format!("[route.green]\nprotocol = \"{written}\"\n"),
            );
            let config = parse(&text, None).unwrap();
            assert_eq!(config.routes[0].green.protocol, protocol, "{written}");
            assert_eq!(config.routes[0].blue.protocol, Protocol::Http1);
        }
        let text = MINIMAL.replace("[route.green]\n", "[route.green]\nprotocol = \"h3\"\n");
        let rendered: Vec<String> = errors(&text).iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "route[0].green.protocol: must be \"http/1.1\" or \"h2c\" (HTTP/2 without TLS, \
              also written \"h2\"), line 10"
            ],
        );
    }

    #[test]
    fn unknown_key_is_an_error_with_path_and_line() {
        let text = MINIMAL.replace("[route.green]", "[route.green]\nendpoint = []");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.contains("unknown field `endpoint`"),
            "{errs:?}"
        );
        assert_eq!(errs[0].path, "route[0].green.endpoint");
        assert_eq!(errs[0].line, Some(10));
    }

    #[test]
    fn every_problem_is_reported_with_key_path_and_line() {
        let text = format!(
            "{MINIMAL}[route.rollout]\nsteps = [5, 1, 100]\nconfidence = 1.5\nmin_step_time = \"soon\"\n"
        );
        let errs = errors(&text);
        let rendered: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            rendered.contains(&"route[0].rollout.steps: must be increasing, line 12".to_string()),
            "{rendered:?}"
        );
        assert!(
            rendered
                .iter()
                .any(|e| e.starts_with("route[0].rollout.confidence:") && e.ends_with("line 13")),
            "{rendered:?}"
        );
        assert!(rendered.iter().any(|e| e.starts_with("route[0].rollout.min_step_time:") && e.ends_with("line 14")), "{rendered:?}");
    }

    #[test]
    fn a_duration_over_100_years_is_refused_by_name_and_line() {
        // Over about 9.2e18 s, adding the timeout to the clock panicked at the first request
        // (the interval: at start).
        let got = rendered(&with_server("request_timeout = \"9223372036854775807s\"\n"));
        assert_eq!(
            got,
            ["server.request_timeout: must be at most 100 years, line 3"]
        );
        let text = format!("{MINIMAL}[route.rollout]\ninterval = \"101y\"\n");
        only_problem(
            &rendered(&text),
            "route[0].rollout.interval: must be at most 100 years",
        );
        assert!(parse(&with_server("request_timeout = \"100y\"\n"), None).is_ok());
    }

    #[test]
    fn a_keys_line_is_found_or_that_of_its_table() {
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\n";
        assert_eq!(key_line(text, "server.workers"), Some(3));
        assert_eq!(key_line(text, "admin"), Some(5));
        assert_eq!(key_line(text, "admin.listen"), Some(6));
        // Left out: the line of the table it would be in.
        assert_eq!(key_line(text, "server.access_log"), Some(1));
        assert_eq!(key_line(text, "state.dir"), None);
        assert_eq!(key_line("not [ toml", "server"), None);
    }

    /// MINIMAL with `lines` (each ending in a newline) at the top of `[server]`.
    fn with_server(lines: &str) -> String {
        MINIMAL.replace("listen = [", &format!("{lines}listen = ["))
    }

    /// Asserts that `got` is one problem, starting with `start`.
    fn only_problem(got: &[String], start: &str) {
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with(start), "{got:#?}");
    }

    /// Rendered problems, in the order `veer check` prints them.
    fn rendered(text: &str) -> Vec<String> {
        errors(text).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_and_mistyped_keys_do_not_hide_each_other_or_other_problems() {
        let text = MINIMAL
            .replace("listen = [", "foo = 1\nlisten = [")
            .replace("name = \"shop\"", "name = \"shop\"\nstable = 3")
            + "[route.rollout]\nsteps = [5, 1]\nbar = 2\n";
        let got = rendered(&text);
        let paths: Vec<&str> = got
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            [
                "server.foo",
                "route[0].stable",
                "route[0].rollout.steps",
                "route[0].rollout.bar"
            ],
            "{got:#?}"
        );
        // Lines are those of the file as written.
        for (error, line) in got.iter().zip([3, 8, 14, 15]) {
            assert!(error.ends_with(&format!(", line {line}")), "{error}");
        }
    }

    #[test]
    fn a_key_left_out_for_its_type_is_not_reported_again_as_missing() {
        let text = MINIMAL.replace("listen = [\"127.0.0.1:8080\"]", "listen = 5");
        let got = rendered(&text);
        only_problem(&got, "server.listen: invalid type");
        // A key serde requires: left out, then missing; reported once.
        let text = with_server("tls = { cert = 5, key = \"key.pem\" }\n");
        let got = rendered(&text);
        only_problem(&got, "server.tls.cert: invalid type");
    }

    #[test]
    fn a_key_required_by_its_table_and_left_out_hides_nothing_else() {
        let text = with_server("tls = { cert = 5, key = \"key.pem\" }\nfoo = 1\n")
            + "[route.rollout]\nsteps = [5, 1]\n";
        let got = rendered(&text);
        let paths: Vec<&str> = got
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            ["server.tls.cert", "server.foo", "route[0].rollout.steps"],
            "{got:#?}"
        );
        for (error, line) in got.iter().zip([3, 4, 14]) {
            assert!(error.ends_with(&format!(", line {line}")), "{error}");
        }
    }

    #[test]
    fn a_missing_tls_key_is_reported_beside_a_mistyped_one() {
        let text = with_server("tls = { cert = 5 }\n");
        let got = rendered(&text);
        assert_eq!(
            got,
            [
                "server.tls.cert: invalid type: integer `5`, expected a string, line 3",
                "server.tls.key: required: a PEM file, line 3",
            ],
        );
    }

    #[test]
    fn a_key_left_out_does_not_fail_the_checks_that_compare_it_with_another() {
        let text = MINIMAL.replace("name = \"shop\"", "name = 5")
            + "[route.rollout]\nmin_step_time = 5\nmax_step_time = \"10s\"\n\
               [[route]]\nhosts = 5\n\
               [route.blue]\nendpoints = [\"127.0.0.1:1\"]\n\
               [route.green]\nendpoints = [\"127.0.0.1:1\"]\n\
               [admin]\nlisten = \"0.0.0.0:9901\"\ntoken = 5\n";
        let got = rendered(&text);
        let paths: Vec<&str> = got
            .iter()
            .map(|e| e.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            paths,
            [
                "route[0].name",
                "route[0].rollout.min_step_time",
                "route[1].name",
                "route[1].hosts",
                "admin.token",
            ],
            "{got:#?}"
        );
    }

    #[test]
    fn a_mistyped_array_element_is_not_reported_again_as_an_empty_array() {
        let text = MINIMAL
            .replace("[\"127.0.0.1:8080\"]", "[5]")
            .replace("[\"127.0.0.1:9001\"]", "[\"127.0.0.1:9001\", 5]");
        let got = rendered(&text);
        assert_eq!(
            got,
            [
                "server.listen[0]: invalid type: integer `5`, expected a string, line 3",
                "route[0].blue.endpoints[1]: invalid type: integer `5`, expected a string, line 8",
            ],
        );
    }

    #[test]
    fn messages_name_no_internal_types_and_say_when_problems_were_left_out() {
        let text = MINIMAL
            .replace("[route.green]\nendpoints = [\"127.0.0.1:9002\"]\n", "")
            .replace("name = \"shop\"\n", "name = \"shop\"\ngreen = 5\n");
        let got = rendered(&text);
        assert!(
            got.iter()
                .any(|e| e
                    .starts_with("route[0].green: invalid type: integer `5`, expected a table")),
            "{got:#?}"
        );
        assert!(got.iter().all(|e| !e.contains("Raw")), "{got:#?}");
        let many: String = (0..150).map(|i| format!("k{i} = 1\n")).collect();
        let got = rendered(&with_server(&many));
        assert_eq!(got.len(), MAX_KEY_ERRORS + 1, "{got:#?}");
        assert_eq!(
            got.last().map(String::as_str),
            Some("more problems not shown: the first 100 are")
        );
    }

    /// A bound broken by a default says what the default is.
    #[test]
    fn a_min_step_time_over_the_default_max_names_both() {
        let got = rendered(&format!(
            "{MINIMAL}[route.rollout]\nmin_step_time = \"1h30m\"\n"
        ));
        only_problem(
            &got,
            "route[0].rollout.max_step_time: must be at least min_step_time (here \"15m\" and \
             \"1h30m\"; max_step_time is 15m when not set)",
        );
    }

    /// An auto rollout straight to 100 % could never be judged: stable serves nobody there,
    /// and no earlier step gave its figures. Manual mode has no use for the steps.
    #[test]
    fn an_auto_rollout_needs_a_step_below_100() {
        for steps in ["[100]", "\"geometric:100:2\""] {
            let got = rendered(&format!("{MINIMAL}[route.rollout]\nsteps = {steps}\n"));
            only_problem(
                &got,
                "route[0].rollout.steps: needs a step below 100 in auto mode",
            );
            assert!(got[0].ends_with("line 12"), "{got:?}");
        }
        let manual = format!("{MINIMAL}[route.rollout]\nmode = \"manual\"\nsteps = [100]\n");
        assert!(errors(&manual).is_empty());
        assert!(errors(&format!("{MINIMAL}[route.rollout]\nsteps = [50, 100]\n")).is_empty());
    }

    #[test]
    fn steps_of_another_type_are_told_what_steps_can_be() {
        let got = rendered(&format!("{MINIMAL}[route.rollout]\nsteps = true\n"));
        assert_eq!(
            got,
            ["route[0].rollout.steps: invalid type: boolean `true`, expected a list of percents \
              or \"geometric:START:FACTOR\", line 12"],
        );
        let got = rendered(&format!("{MINIMAL}[route.rollout]\nsteps = [5, \"x\"]\n"));
        only_problem(
            &got,
            "route[0].rollout.steps[1]: invalid type: string \"x\"",
        );
    }

    #[test]
    fn a_key_that_is_really_missing_is_reported_beside_other_problems_of_its_table() {
        let text = with_server("tls = { cert = \"cert.pem\", colour = \"red\" }\n");
        let got = rendered(&text);
        assert_eq!(
            got,
            [
                "server.tls.colour: unknown field `colour`, expected `cert` or `key`, line 3",
                "server.tls.key: required: a PEM file, line 3",
            ],
        );
    }

    #[test]
    fn a_host_and_path_prefix_another_route_has_already_is_reported_by_host() {
        let route = |name: &str, hosts: &str| {
            format!(
                "[[route]]\nname = \"{name}\"\nhosts = {hosts}\n[route.blue]\n\
                 endpoints = [\"127.0.0.1:9001\"]\n[route.green]\nendpoints = [\"127.0.0.1:9002\"]\n"
            )
        };
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{}{}",
            route("shop", "[\"shop.example.com\"]"),
            route("other", "[\"other.example.com\", \"SHOP.example.com\"]")
        );
        let got = rendered(&text);
        only_problem(
            &got,
            "route[1].path_prefix: route \"shop\" has host \"shop.example.com\" with this path_prefix already",
        );
        // Any host twice, and hosts that differ: the first is an error, the second is not.
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{}{}",
            route("a", "[]"),
            route("b", "[]")
        );
        only_problem(
            &rendered(&text),
            "route[1].path_prefix: route \"a\" has any host",
        );
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{}{}",
            route("a", "[\"a.example.com\", \"*.example.com\"]"),
            route("b", "[\"b.example.com\"]")
        );
        assert_eq!(rendered(&text), Vec::<String>::new());
    }

    #[test]
    fn a_toml_syntax_error_names_the_key_written_on_its_line() {
        let text = format!(
            "{MINIMAL}[[route]]\nname = \"b\"\n[route.blue]\nendpoints = [\"127.0.0.1:9001\"]\n\
             [route.green]\nendpoints = [\"127.0.0.1:9002\"]\nversion = v2\n"
        );
        only_problem(&rendered(&text), "route[1].green.version: invalid string");
        let text = MINIMAL.replace("listen = [", "workers = 99999999999999999999\nlisten = [");
        only_problem(&rendered(&text), "server.workers: number too large");
        let text = MINIMAL.replace(
            "listen = [",
            "tls.cert = \"c.pem\"\n\"tls\" . key = k.pem\nlisten = [",
        );
        only_problem(&rendered(&text), "server.tls.key: ");
        // An array left open on the lines above: the key it belongs to, in its table.
        let text = MINIMAL.replace("listen = [\"127.0.0.1:8080\"]", "listen = [\n\"a\" \"b\"]");
        only_problem(&rendered(&text), "server.listen: invalid array");
        let text = format!("{MINIMAL}[route.rollout]\nsteps = [\n  1,\n  5\n  10,\n]\n");
        only_problem(&rendered(&text), "route[0].rollout.steps: ");
        // A broken header, or a stray value after a whole one: only the line.
        let text = MINIMAL.replace("[route.blue]", "[route.blue");
        only_problem(&rendered(&text), "line 7: ");
        let text = MINIMAL.replace("listen = [\"127.0.0.1:8080\"]", "listen = []\n\"a\"");
        only_problem(&rendered(&text), "line 4: ");
    }

    #[test]
    fn a_host_listed_twice_in_a_route_and_a_shadow_without_methods_are_errors() {
        let text = MINIMAL.replace(
            "name = \"shop\"",
            "name = \"shop\"\nhosts = [\"a.example.com\", \"b.example.com\", \"A.example.com\"]",
        );
        only_problem(
            &rendered(&text),
            "route[0].hosts[2]: \"A.example.com\" is listed twice, line 7",
        );
        let shadow = "[route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\n";
        let text = format!("{MINIMAL}{shadow}methods = []\n");
        only_problem(&rendered(&text), "route[0].shadow.methods: empty");
        let text = format!("{MINIMAL}{shadow}methods = [\"GET\"]\npercent = 0.0\n");
        assert_eq!(rendered(&text), Vec::<String>::new());
    }

    #[test]
    fn a_route_with_problems_still_gets_its_duplicate_reported() {
        let second = "[[route]]\nname = \"shop\"\n[route.blue]\nendpoints = []\n\
                      [route.green]\nendpoints = [\"127.0.0.1:9002\"]\n";
        let errs = errors(&format!("{MINIMAL}{second}"));
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "route[1].path_prefix",
                "route[1].name",
                "route[1].blue.endpoints"
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn a_bad_route_name_is_not_also_a_bad_cookie_name() {
        let errs = errors(&MINIMAL.replace("name = \"shop\"", "name = \"Bad Name\""));
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["route[0].name"], "{errs:?}");
    }

    #[test]
    fn a_shadow_problem_does_not_hide_the_rollouts() {
        let text = format!(
            "{MINIMAL}[route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\ncompare = \"bogus\"\n\
             [route.rollout]\nsteps = [5, 1, 100]\nconfidence = 1.5\n"
        );
        let errs = errors(&text);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "route[0].shadow.compare",
                "route[0].rollout.steps",
                "route[0].rollout.confidence"
            ],
            "{errs:?}"
        );
    }

    /// A self-signed certificate and its key, written to `dir`; their paths.
    fn self_signed(dir: &Path) -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    }

    #[test]
    fn tls_files_that_cannot_be_loaded_are_reported_at_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let with_tls = |cert: &str, key: &str| {
            with_server(&format!("tls = {{ cert = \"{cert}\", key = \"{key}\" }}\n"))
        };
        assert!(parse(&with_tls(&cert, &key), None).is_ok());
        let missing = dir.path().join("missing.pem").display().to_string();
        let cases = [
            (with_tls(&missing, &key), "server.tls.cert", "cannot read"),
            (with_tls(&cert, &missing), "server.tls.key", "cannot read"),
            (with_tls(&key, &key), "server.tls.cert", "no certificate"),
            (with_tls(&cert, &cert), "server.tls.key", "no private key"),
        ];
        for (text, path, message) in cases {
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].path, path, "{errs:?}");
            assert!(errs[0].message.contains(message), "{errs:?}");
            assert_eq!(errs[0].line, Some(3), "{errs:?}");
        }
    }

    #[test]
    fn a_bad_tls_certificate_does_not_hide_a_bad_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(dir.path());
        let missing = dir.path().join("missing.pem").display().to_string();
        let text = MINIMAL.replace(
            "8080\"]\n",
            &format!("8080\"]\n[server.tls]\ncert = \"{missing}\"\nkey = \"{cert}\"\n"),
        );
        let errs = errors(&text);
        let got: Vec<(&str, Option<usize>)> =
            errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [("server.tls.cert", Some(5)), ("server.tls.key", Some(6))],
            "{errs:?}"
        );
        assert!(errs[0].message.starts_with("cannot read"), "{errs:?}");
        assert!(
            errs[1].message.ends_with("no private key found"),
            "{errs:?}"
        );
        // A key that loads but is not the certificate's.
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = self_signed(other.path());
        let text = with_server(&format!(
            "tls = {{ cert = \"{cert}\", key = \"{other_key}\" }}\n"
        ));
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "server.tls.key", "{errs:?}");
    }

    #[test]
    fn the_shipped_config_files_are_valid() {
        // As `veer check -c config/NAME.toml` reads them: gateway.toml's TLS files are
        // config/tls/, relative to the file.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for name in ["example", "sidecar", "gateway"] {
            let path = dir.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(errors) = parse(&text, Some(&dir)) {
                panic!("{}:\n{errors}", path.display());
            }
        }
    }

    /// SPEC: `config/example.toml` shows every key with its default. Read with only what it
    /// must set (the listen address, the route's name, host, endpoints and labels), the same
    /// file must give the same config.
    #[test]
    fn the_example_config_shows_every_default() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let text = std::fs::read_to_string(dir.join("example.toml")).unwrap();
        let example = parse(&text, Some(&dir)).unwrap_or_else(|errors| panic!("{errors}"));
        let bare = "[server]\nlisten = [\"0.0.0.0:8080\"]\n\
                    [[route]]\nname = \"shop\"\nhosts = [\"shop.example.com\"]\n\
                    [route.blue]\nendpoints = [\"127.0.0.1:9001\"]\nversion = \"v41\"\n\
                    [route.green]\nendpoints = [\"127.0.0.1:9002\"]\nversion = \"v42\"\n\
                    [route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\n";
        let defaults = parse(bare, Some(&dir)).unwrap_or_else(|errors| panic!("{errors}"));
        assert_eq!(example.server, defaults.server);
        assert_eq!(example.admin, defaults.admin);
        assert_eq!(example.state, defaults.state);
        assert_eq!(example.routes, defaults.routes);
    }

    #[test]
    fn second_route_errors_name_its_index() {
        let text = format!(
            "{MINIMAL}\n[[route]]\nname = \"Bad Name\"\n[route.blue]\nendpoints = [\"nope\"]\n"
        );
        let errs = errors(&text);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"route[1].name"), "{errs:?}");
        assert!(paths.contains(&"route[1].blue.endpoints[0]"), "{errs:?}");
        assert!(paths.contains(&"route[1].green"), "{errs:?}");
        let name = errs.iter().find(|e| e.path == "route[1].name").unwrap();
        assert_eq!(name.line, Some(13));
    }

    #[test]
    fn an_overlap_is_reported_at_its_own_route_after_a_route_with_problems() {
        let route = |name: &str, endpoint: &str| {
            format!(
                "[[route]]\nname = \"{name}\"\n[route.blue]\nendpoints = [\"{endpoint}\"]\n\
                 [route.green]\nendpoints = [\"127.0.0.1:1\"]\n"
            )
        };
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n{}{}{}",
            route("a", "nope"),
            route("b", "127.0.0.1:1"),
            route("c", "127.0.0.1:1"),
        );
        let errs = errors(&text);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        // A route's own problems do not take it out of the overlap check: b and c both repeat a.
        assert_eq!(
            paths,
            [
                "route[0].blue.endpoints[0]",
                "route[1].path_prefix",
                "route[2].path_prefix"
            ],
            "{errs:?}"
        );
        assert_eq!(errs[2].line, Some(15), "{errs:?}");
    }

    #[test]
    fn syntax_error_reports_line() {
        let errs = errors("[server]\nlisten = [\"127.0.0.1:1\"\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].line.is_some());
    }

    #[test]
    fn geometric_steps_double_up_to_100() {
        assert_eq!(
            geometric("geometric:1:2").unwrap(),
            vec![100, 200, 400, 800, 1600, 3200, 6400, 10000]
        );
        assert!(geometric("geometric:0:2").is_none());
        assert!(geometric("geometric:1:1").is_none());
    }

    #[test]
    fn weights_take_hundredths_of_a_percent_only() {
        assert_eq!(basis_points(12.34), Some(1234));
        assert_eq!(basis_points(0.01), Some(1));
        assert_eq!(basis_points(100.0), Some(10000));
        assert_eq!(basis_points(0.001), None);
        assert_eq!(basis_points(100.01), None);
        assert_eq!(basis_points(-1.0), None);
        assert_eq!(basis_points(1e-9), None);
        assert_eq!(basis_points(99.999_999_9), None);
        // Every hundredth as a client would write it, parsed from its decimal.
        for bp in 0..=10_000u32 {
            let text = format!("{}.{:02}", bp / 100, bp % 100);
            assert_eq!(basis_points(text.parse().unwrap()), Some(bp), "{text}");
        }
    }

    #[test]
    fn an_auto_routes_weight_is_warned_of_with_its_line() {
        let text = format!("{MINIMAL}[route.rollout]\nmode = \"auto\"\nweight = 30\n");
        let config = parse(&text, None).unwrap();
        let warned = warnings(&config, &text);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert_eq!(warned[0].path, "route[0].rollout.weight");
        let line = text
            .lines()
            .position(|l| l.starts_with("weight"))
            .map(|i| i + 1);
        assert_eq!(warned[0].line, line);
        let manual = text.replace("\"auto\"", "\"manual\"");
        assert_eq!(warnings(&parse(&manual, None).unwrap(), &manual), []);
        let unset = format!("{MINIMAL}[route.rollout]\nmode = \"auto\"\n");
        assert_eq!(warnings(&parse(&unset, None).unwrap(), &unset), []);
    }

    #[test]
    fn an_interval_under_the_controllers_shortest_is_warned_of_with_its_line() {
        let text = format!("{MINIMAL}[route.rollout]\ninterval = \"1ms\"\n");
        let warned = warnings(&parse(&text, None).unwrap(), &text);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert_eq!(warned[0].path, "route[0].rollout.interval");
        assert_eq!(
            warned[0].message,
            "taken as 10ms (the controller looks at most that often)"
        );
        let line = text.lines().position(|l| l.starts_with("interval"));
        assert_eq!(warned[0].line, line.map(|i| i + 1));
        let shortest = text.replace("1ms", "10ms");
        assert_eq!(warnings(&parse(&shortest, None).unwrap(), &shortest), []);
    }

    #[test]
    fn a_shadow_beside_http2_slots_is_warned_of_with_its_line() {
        let shadow = "[route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\n";
        let text = format!("{MINIMAL}{shadow}");
        assert_eq!(warnings(&parse(&text, None).unwrap(), &text), []);
        let h2 = MINIMAL.replace("[route.green]\n", "[route.green]\nprotocol = \"h2c\"\n");
        let text = format!("{h2}{shadow}");
        let warned = warnings(&parse(&text, None).unwrap(), &text);
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert_eq!(warned[0].path, "route[0].shadow.endpoints");
        let line = text
            .lines()
            .position(|l| l.starts_with("endpoints = [\"127.0.0.1:9003"));
        assert_eq!(warned[0].line, line.map(|i| i + 1));
        assert_eq!(warnings(&parse(&h2, None).unwrap(), &h2), []);
    }

    #[test]
    fn status_sets_accept_classes_codes_and_ranges() {
        let set = parse_statuses("5xx, 429,400-401").unwrap();
        assert!(set.contains(500) && set.contains(599) && set.contains(429));
        assert!(set.contains(400) && set.contains(401) && !set.contains(402));
        assert_eq!(parse_statuses("5XX"), parse_statuses("5xx"));
        assert!(parse_statuses("6xx").is_none());
        assert!(parse_statuses("").is_none());
        assert!(parse_statuses("abc").is_none());
        assert!(parse_statuses("5xx,").is_none());
        assert!(parse_statuses(",5xx").is_none());
        assert!(parse_statuses("5xx,,429").is_none());
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let text = format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9901\"\n");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, "admin.listen");
        let ok = format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"s3cret\"\n");
        assert!(parse(&ok, None).is_ok());
    }

    #[test]
    fn a_state_dir_that_is_a_file_or_under_one_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        for state in [file.clone(), file.join("state")] {
            let text = format!("{MINIMAL}[state]\ndir = \"{}\"\n", state.display());
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].path, "state.dir", "{errs:?}");
            assert_eq!(errs[0].line, Some(12), "{errs:?}");
            let said = format!("{file:?} exists and is not a directory");
            assert_eq!(errs[0].message, said, "{errs:?}");
        }
        // A dir that is there, or can be made in one that is, is fine, and left as it was.
        for state in [dir.path().to_path_buf(), dir.path().join("a/b")] {
            let text = format!("{MINIMAL}[state]\ndir = \"{}\"\n", state.display());
            assert!(parse(&text, None).is_ok(), "{text}");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // One in which no file can be made, even by root.
        let text = format!("{MINIMAL}[state]\ndir = \"/proc/self/veer-state\"\n");
        one_problem_at(&text, "state.dir", 12, "cannot write in \"/proc/self\": ");
    }

    #[test]
    fn listen_addresses_that_cover_each_other_are_refused() {
        let with = |list: &str| MINIMAL.replace("\"127.0.0.1:8080\"", list);
        // `[::]` covers IPv4 too only where the kernel binds it dual-stack (the default).
        let dual_stack = dual_stack();
        let v6_wildcard_over_v4 = [r#""[::]:8080", "127.0.0.1:8080""#];
        for list in [
            r#""127.0.0.1:8080", "0.0.0.0:8080""#,
            r#""0.0.0.0:8080", "127.0.0.1:8080""#,
            r#""[::1]:8080", "[::]:8080""#,
        ]
        .into_iter()
        .chain(v6_wildcard_over_v4.into_iter().filter(|_| dual_stack))
        {
            let errs = errors(&with(list));
            assert_eq!(errs.len(), 1, "{list}: {errs:?}");
            assert_eq!(errs[0].path, "server.listen[1]", "{errs:?}");
            assert!(errs[0].message.contains("cannot both be bound"), "{errs:?}");
        }
        for list in [
            r#""127.0.0.1:8080", "127.0.0.2:8080""#,
            r#""0.0.0.0:8080", "[::1]:8080""#,
            r#""127.0.0.1:8080", "0.0.0.0:8081""#,
            r#""127.0.0.1:0", "0.0.0.0:0""#,
        ] {
            assert!(errors(&with(list)).is_empty(), "{list}");
        }
    }

    #[test]
    fn the_admin_api_cannot_listen_where_the_proxy_does() {
        let with = |server: &str, admin: &str| {
            MINIMAL.replace("127.0.0.1:8080", server)
                + &format!("[admin]\nlisten = \"{admin}\"\ntoken = \"t\"\n")
        };
        for (server, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("[::]:8080", "[::1]:8080"),
        ] {
            let errs = errors(&with(server, admin));
            assert_eq!(errs.len(), 1, "{server} {admin}: {errs:?}");
            assert_eq!(errs[0].path, "admin.listen", "{errs:?}");
            assert_eq!(errs[0].line, Some(12), "{errs:?}");
            assert!(
                errs[0].message.contains("takes the port of server.listen"),
                "{errs:?}"
            );
        }
        for (server, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:9901"),
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            assert!(
                parse(&with(server, admin), None).is_ok(),
                "{server} {admin}"
            );
        }
    }

    #[test]
    fn an_access_log_that_cannot_be_opened_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let missing = dir.path().join("missing");
        for (log, message) in [
            (
                missing.join("x.log"),
                format!(
                    "cannot open {:?}: {missing:?} does not exist",
                    missing.join("x.log")
                ),
            ),
            (
                file.join("x.log"),
                format!(
                    "cannot open {:?}: {file:?} is not a directory",
                    file.join("x.log")
                ),
            ),
            (
                dir.path().to_path_buf(),
                format!("{:?} is a directory", dir.path()),
            ),
        ] {
            let text = with_server(&format!("access_log = \"{}\"\n", log.display()));
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert_eq!(errs[0].path, "server.access_log", "{errs:?}");
            assert_eq!(errs[0].line, Some(3), "{errs:?}");
            assert_eq!(errs[0].message, message, "{errs:?}");
            // A reload keeps the log the process opened at start: not looked at again.
            assert!(parse_for(&text, None, Purpose::Reload).is_ok(), "{text}");
        }
        let text = with_server(&format!("access_log = \"{}\"\n", file.display()));
        assert!(parse(&text, None).is_ok(), "{text}");
        // Tried as `run` opens it: here no file can be made at all, even by root.
        let text = with_server("access_log = \"/proc/self/veer-access.log\"\n");
        one_problem_at(
            &text,
            "server.access_log",
            3,
            "cannot open \"/proc/self/veer-access.log\": No such file or directory",
        );
        // A file that can be made passes, and is not left behind.
        let fresh = dir.path().join("fresh.log");
        let text = with_server(&format!("access_log = \"{}\"\n", fresh.display()));
        assert!(parse(&text, None).is_ok(), "{text}");
        assert!(!fresh.exists());
    }

    /// A link to a file not made yet and a FIFO are left as they are: no file is made or
    /// removed through the link, and no open waits for a FIFO's reader.
    #[test]
    fn an_access_log_link_or_fifo_is_left_for_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (link, target) = (dir.path().join("link.log"), dir.path().join("real.log"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = dir.path().join("fifo.log");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for log in [&link, &fifo] {
            let text = with_server(&format!("access_log = \"{}\"\n", log.display()));
            assert!(parse(&text, None).is_ok(), "{text}");
        }
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!target.exists());
        // What the start could not open either: a loop of links, a name ending in a slash.
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let new_dir = format!("{}/new/", dir.path().display());
        for (log, says) in [
            (a.display().to_string(), "cannot open"),
            (new_dir, "is a directory"),
        ] {
            let text = with_server(&format!("access_log = \"{log}\"\n"));
            one_problem_at(&text, "server.access_log", 3, says);
        }
    }

    /// A keyword in another case is most likely meant as the keyword, not as a file's name.
    #[test]
    fn an_access_log_keyword_in_capitals_is_refused_with_both_spellings() {
        for (value, says) in [
            (
                "STDERR",
                "must be \"stderr\" in lowercase, or \"./STDERR\" for a file",
            ),
            (
                "Off",
                "must be \"off\" in lowercase, or \"./Off\" for a file",
            ),
        ] {
            let text = with_server(&format!("access_log = \"{value}\"\n"));
            one_problem_at(&text, "server.access_log", 3, says);
        }
    }

    /// Asserts that `text` has exactly one problem, at `path` on `line`, saying `says`.
    fn one_problem_at(text: &str, path: &str, line: usize, says: &str) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{text}\n{errs:#?}");
        assert_eq!(errs[0].path, path, "{text}\n{errs:#?}");
        assert_eq!(errs[0].line, Some(line), "{text}\n{errs:#?}");
        assert!(errs[0].message.contains(says), "{text}\n{errs:#?}");
    }

    #[test]
    fn an_endpoint_that_is_veer_itself_is_refused() {
        // Line 8 is blue's endpoints, line 10 green's.
        let blue = |endpoint: &str| MINIMAL.replace("127.0.0.1:9001", endpoint);
        for endpoint in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LocalHost:8080",
            "0.0.0.0:8080",
        ] {
            let says = format!("{endpoint:?} is veer's own server.listen 127.0.0.1:8080");
            one_problem_at(&blue(endpoint), "route[0].blue.endpoints[0]", 8, &says);
        }
        let admin = MINIMAL.replace("127.0.0.1:9002", "127.0.0.1:9901");
        let says = "\"127.0.0.1:9901\" is veer's own admin.listen 127.0.0.1:9901";
        one_problem_at(&admin, "route[0].green.endpoints[0]", 10, says);
        let shadow = format!("{MINIMAL}[route.shadow]\nendpoints = [\"x:1\", \"[::1]:9901\"]\n");
        let shadow = shadow.replace("[server]", "[admin]\nlisten = \"[::1]:9901\"\n[server]");
        one_problem_at(
            &shadow,
            "route[0].shadow.endpoints[1]",
            14,
            "admin.listen [::1]:9901",
        );
        // Another address or port of this host, another host on veer's port (also with veer on
        // every address), or a name, is not known to be veer.
        let wildcard = MINIMAL.replace("\"127.0.0.1:8080\"", "\"0.0.0.0:8080\"");
        let wildcard6 = MINIMAL.replace("\"127.0.0.1:8080\"", "\"[::]:8080\"");
        for (text, endpoint) in [
            (wildcard.as_str(), "[::1]:8080"),
            (&wildcard, "127.0.0.1:8081"),
            (&wildcard, "10.1.2.3:8080"),
            (&wildcard6, "[2001:db8::1]:8080"),
            (&wildcard6, "10.1.2.3:8080"),
        ]
        .into_iter()
        .chain([(MINIMAL, "127.0.0.2:8080"), (MINIMAL, "veer.local:8080")])
        {
            let text = text.replace("127.0.0.1:9001", endpoint);
            assert!(parse(&text, None).is_ok(), "{text}");
        }
        // Told with the route's other problems, not only once they are mended.
        let text = blue("127.0.0.1:8080").replace("name = \"shop\"", "name = \"Shop\"");
        let paths: Vec<_> = errors(&text).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            ["route[0].name", "route[0].blue.endpoints[0]"],
            "{text}"
        );
    }

    #[test]
    fn an_invalid_route_name_is_named_in_its_error() {
        let long = "a".repeat(65);
        for (name, says) in [
            ("", "required: 1 to 64 characters"),
            ("Shop", "\"Shop\" is not 1 to 64 characters"),
            (long.as_str(), "is not 1 to 64 characters"),
        ] {
            let text = MINIMAL.replace("name = \"shop\"", &format!("name = \"{name}\""));
            one_problem_at(&text, "route[0].name", 6, says);
        }
    }

    #[test]
    fn values_veer_could_not_use_are_reported_at_their_key() {
        let endpoint = MINIMAL.replace("127.0.0.1:9001", "127.0.0.1:0");
        one_problem_at(&endpoint, "route[0].blue.endpoints[0]", 8, "port 0");
        for prefix in ["shop", "/a?b", "/a#b", "/a b", "/a\\u0001"] {
            let text = MINIMAL.replace(
                "name = \"shop\"",
                &format!("name = \"shop\"\npath_prefix = \"{prefix}\""),
            );
            one_problem_at(&text, "route[0].path_prefix", 7, "must start with '/'");
        }
        for prefix in ["/a/../b/", "/a/./b", "/..", "/a/%2E%2e/b", "/a/.%2e"] {
            let text = MINIMAL.replace(
                "name = \"shop\"",
                &format!("name = \"shop\"\npath_prefix = \"{prefix}\""),
            );
            one_problem_at(&text, "route[0].path_prefix", 7, "'..' segment");
        }
        // A file that ends after `=` (written in place, read half-written).
        let cut = MINIMAL.replace("endpoints = [\"127.0.0.1:9002\"]\n", "endpoints = ");
        one_problem_at(&cut, "route[0].green.endpoints", 10, "a value is missing");
        for prefix in ["//", "/api//v2/", "/api//"] {
            let text = MINIMAL.replace(
                "name = \"shop\"",
                &format!("name = \"shop\"\npath_prefix = \"{prefix}\""),
            );
            one_problem_at(&text, "route[0].path_prefix", 7, "must have no '//'");
        }
        for (prefix, decoded) in [
            ("/%61pi/%7E", "/api/~"),
            ("/a/%2e%2ex", "/a/..x"),
            ("/caf%c3%a9/", "/caf%C3%A9/"),
            ("/café/", "/caf%C3%A9/"),
        ] {
            let text = MINIMAL.replace(
                "name = \"shop\"",
                &format!("name = \"shop\"\npath_prefix = \"{prefix}\""),
            );
            one_problem_at(
                &text,
                "route[0].path_prefix",
                7,
                &format!("write it {decoded:?}"),
            );
        }
        let text = MINIMAL.replace(
            "name = \"shop\"",
            "name = \"shop\"\npath_prefix = \"/a/..b/.c/..x/caf%C3%A9/%2F\"",
        );
        assert_eq!(
            errors(&text),
            [],
            "dots inside a segment are plain characters"
        );
        let text = with_server("access_log = \"\"\n");
        one_problem_at(
            &text,
            "server.access_log",
            3,
            "\"off\", \"stderr\" or a file path",
        );
        let text = format!("{MINIMAL}[state]\ndir = \"\"\n");
        one_problem_at(&text, "state.dir", 12, "must name a directory");
        for statuses in ["5xx,", ",5xx", "5xx,,429"] {
            let text = format!("{MINIMAL}[route.rollout]\nerror_statuses = \"{statuses}\"\n");
            one_problem_at(&text, "route[0].rollout.error_statuses", 12, "comma list");
        }
        for token in ["a b", "a\\tb", "a\\u007f", "caf\u{e9}"] {
            let text = format!("{MINIMAL}[admin]\ntoken = \"{token}\"\n");
            one_problem_at(&text, "admin.token", 12, "visible ASCII");
        }
        for suffix in ["", ".sha dow", "a/b", ".x:1"] {
            let text = format!(
                "{MINIMAL}[route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\n\
                 host_suffix = \"{suffix}\"\n"
            );
            one_problem_at(&text, "route[0].shadow.host_suffix", 13, "host name suffix");
        }
        for name in RESERVED_HEADERS.iter().copied().chain(["Content-Length"]) {
            let text = format!("{MINIMAL}[route.sticky]\noverride_header = \"{name}\"\n");
            one_problem_at(&text, "route[0].sticky.override_header", 12, "hop-by-hop");
        }
        let text = format!("{MINIMAL}[route.rollout]\nsteps = \"geometric:0.01:1.0001\"\n");
        one_problem_at(&text, "route[0].rollout.steps", 12, "at most 100");
        // What they may be.
        let text = MINIMAL.replace(
            "name = \"shop\"",
            "name = \"shop\"\nhosts = [\"a_b.internal\"]\npath_prefix = \"/api/v1\"",
        ) + "[admin]\ntoken = \"s3cret-~!\"\n\
             [route.shadow]\nendpoints = [\"127.0.0.1:9003\"]\nhost_suffix = \".shadow_1\"\n\
             [route.rollout]\nerror_statuses = \" 5xx , 429\"\nsteps = \"geometric:1:1.1\"\n";
        assert!(parse(&text, None).is_ok(), "{text}\n{:#?}", errors(&text));
    }

    #[test]
    fn an_unset_token_env_is_the_only_problem_of_a_non_loopback_admin() {
        let text = format!(
            "{MINIMAL}[admin]\nlisten = \"0.0.0.0:9901\"\n\
             token_env = \"VEER_TEST_VARIABLE_THAT_IS_NOT_SET\"\n"
        );
        one_problem_at(&text, "admin.token_env", 13, "is not set");
    }

    #[test]
    fn type_errors_name_kinds_of_value_not_rust_types() {
        let text = with_server(
            "workers = -1
max_header_bytes = \"x\"\n",
        ) + "[route.rollout]\nweight = \"a\"\nmin_requests = 1.5\n";
        assert_eq!(
            rendered(&text),
            [
                "server.workers: invalid value: integer `-1`, expected a non-negative integer, \
                 line 3",
                "server.max_header_bytes: invalid type: string \"x\", expected an integer, line 4",
                "route[0].rollout.weight: invalid type: string \"a\", expected a number, line 14",
                "route[0].rollout.min_requests: invalid type: floating point `1.5`, expected an \
                 integer, line 15",
            ]
        );
    }

    #[test]
    fn a_syntax_error_is_one_line() {
        let got = rendered(&format!("{MINIMAL}[route.x\n"));
        assert_eq!(got, ["line 11: invalid table header: expected `.`, `]`"]);
    }

    #[test]
    fn wildcard_hosts_become_suffixes() {
        assert_eq!(
            host_pattern("*.Example.com"),
            Some(HostPattern::Suffix(".example.com".into()))
        );
        assert_eq!(host_pattern("a..b"), None);
        // Internal names use underscores.
        assert_eq!(
            host_pattern("a_b.com"),
            Some(HostPattern::Exact("a_b.com".into()))
        );
        assert_eq!(host_pattern("a b.com"), None);
        assert_eq!(host_pattern("*"), None);
    }

    #[test]
    fn ipv6_literal_hosts_are_kept_bracketed_and_canonical() {
        for text in ["::1", "[::1]", "[0:0::1]", " [::1] "] {
            assert_eq!(
                host_pattern(text),
                Some(HostPattern::Exact("[::1]".into())),
                "{text}"
            );
        }
        assert_eq!(
            host_pattern("[FE80::A]"),
            Some(HostPattern::Exact("[fe80::a]".into()))
        );
        assert_eq!(host_pattern("[::1]:80"), None);
        assert_eq!(host_pattern("[zz]"), None);
    }
}
