//! Prometheus text exposition (format 0.0.4), so that no other module formats metrics by hand.
//!
//! Samples are grouped under their family whatever the order of calls, so a caller may walk
//! routes in the outer loop and families in the inner one.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::{ErrorKind, Totals, CLASS_LABELS};

/// The `Content-Type` of the output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency bucket bounds in seconds, 100 µs to 60 s (a sidecar's upstream on the same host
/// often answers within a millisecond).
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The `# TYPE` of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds one exposition. Metric and label names come from code and must be valid
/// (`[a-zA-Z_:][a-zA-Z0-9_:]*`); label values and help texts are escaped here.
#[derive(Debug, Default)]
pub struct PromWriter {
    families: Vec<Family>,
}

#[derive(Debug)]
struct Family {
    name: String,
    header: String,
    samples: String,
}

impl PromWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a family (`# HELP` and `# TYPE`); declaring it again changes nothing.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        if self.find(name).is_none() {
            self.declare(name, kind.as_str(), help);
        }
    }

    /// Writes `name{labels} value`. A name never declared gets an `untyped` family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let index = self.find_or_declare(name, "untyped");
        write_sample(&mut self.families[index].samples, name, labels, None, value);
    }

    /// Writes a histogram of microsecond values in seconds: cumulative `_bucket`s for
    /// `bounds_seconds` (ascending) and `+Inf`, then `_sum` and `_count`. A value counts
    /// towards a bound when the low end of its HdrHistogram bucket does (at most 0.1 % off).
    pub fn histogram_seconds(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        hist: &Histogram<u64>,
        bounds_seconds: &[f64],
    ) {
        let index = self.find_or_declare(name, Kind::Histogram.as_str());
        let out = &mut self.families[index].samples;
        let bucket = format!("{name}_bucket");
        let count = hist.len() as f64;
        for (bound, below) in cumulative_counts(hist, bounds_seconds) {
            let le = format_value(bound);
            write_sample(out, &bucket, labels, Some(&le), below as f64);
        }
        write_sample(out, &bucket, labels, Some("+Inf"), count);
        write_sample(out, &format!("{name}_sum"), labels, None, sum_seconds(hist));
        write_sample(out, &format!("{name}_count"), labels, None, count);
    }

    /// The exposition: every family's header followed by its samples.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for family in self.families {
            out.push_str(&family.header);
            out.push_str(&family.samples);
        }
        out
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.families.iter().position(|family| family.name == name)
    }

    fn find_or_declare(&mut self, name: &str, type_name: &str) -> usize {
        match self.find(name) {
            Some(index) => index,
            None => self.declare(name, type_name, ""),
        }
    }

    fn declare(&mut self, name: &str, type_name: &str, help: &str) -> usize {
        let mut header = String::new();
        if !help.is_empty() {
            let _ = writeln!(header, "# HELP {name} {}", escape(help, false));
        }
        let _ = writeln!(header, "# TYPE {name} {type_name}");
        self.families.push(Family {
            name: name.to_owned(),
            header,
            samples: String::new(),
        });
        self.families.len() - 1
    }
}

fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], le: Option<&str>, v: f64) {
    out.push_str(name);
    let le = le.map(|le| ("le", le));
    let mut all = labels.iter().copied().chain(le).peekable();
    if all.peek().is_some() {
        out.push('{');
        for (i, (label, value)) in all.enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(out, "{comma}{label}=\"{}\"", escape(value, true));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(v));
}

/// Escapes `\` and newline, and `"` too in label values.
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A float as Prometheus reads it: `+Inf`, `-Inf`, `NaN`, or the shortest decimal; zero is
/// `0` whatever its sign (an empty sum is `-0.0` in Rust).
pub fn format_value(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        value.to_string()
    }
}

/// (bound, values at or below it) for each strictly ascending bound.
fn cumulative_counts(hist: &Histogram<u64>, bounds_seconds: &[f64]) -> Vec<(f64, u64)> {
    let mut values = hist
        .iter_recorded()
        .map(|v| {
            (
                hist.lowest_equivalent(v.value_iterated_to()),
                v.count_at_value(),
            )
        })
        .peekable();
    let mut below = 0;
    let mut previous = f64::NEG_INFINITY;
    let mut out = Vec::with_capacity(bounds_seconds.len());
    for &bound in bounds_seconds {
        if bound.is_nan() || bound <= previous {
            continue;
        }
        previous = bound;
        let bound_micros = bound * 1e6;
        while let Some(&(value, count)) = values.peek() {
            if value as f64 > bound_micros {
                break;
            }
            below += count;
            values.next();
        }
        out.push((bound, below));
    }
    out
}

/// Sum of all values in seconds, each taken at the middle of its bucket.
fn sum_seconds(hist: &Histogram<u64>) -> f64 {
    let micros: f64 = hist
        .iter_recorded()
        .map(|v| hist.median_equivalent(v.value_iterated_to()) as f64 * v.count_at_value() as f64)
        .sum();
    micros / 1e6
}

pub const REQUESTS_TOTAL: &str = "veer_requests_total";
pub const REQUEST_DURATION: &str = "veer_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "veer_upstream_errors_total";
pub const CLIENT_ABORTS_TOTAL: &str = "veer_client_aborts_total";

/// Writes one slot's totals as veer's per-slot families (SPEC §5). `veer_requests_total` is the
/// one family that carries `version`: it shows the requests of the slot's current label only
/// (`Totals::version_by_class`), so a relabelled slot's old series ends and a new one starts
/// at 0. The other families are per slot and count over the slot's lifetime.
pub fn write_slot(w: &mut PromWriter, route: &str, slot: &str, totals: &Totals) {
    w.family(
        REQUESTS_TOTAL,
        Kind::Counter,
        "Upstream exchanges by status class, or error.",
    );
    w.family(
        REQUEST_DURATION,
        Kind::Histogram,
        "Upstream latency to the response head.",
    );
    w.family(
        UPSTREAM_ERRORS_TOTAL,
        Kind::Counter,
        "Upstream errors by kind.",
    );
    w.family(
        CLIENT_ABORTS_TOTAL,
        Kind::Counter,
        "Exchanges the client abandoned.",
    );
    for (class, count) in CLASS_LABELS.iter().zip(totals.version_by_class) {
        let labels = [
            ("route", route),
            ("slot", slot),
            ("version", &totals.version),
            ("class", class),
        ];
        w.sample(REQUESTS_TOTAL, &labels, count as f64);
    }
    let labels = [("route", route), ("slot", slot)];
    w.histogram_seconds(REQUEST_DURATION, &labels, &totals.histogram, LATENCY_BOUNDS);
    for (kind, count) in ErrorKind::ALL.iter().zip(totals.errors_by_kind) {
        let labels = [("route", route), ("slot", slot), ("kind", kind.as_str())];
        w.sample(UPSTREAM_ERRORS_TOTAL, &labels, count as f64);
    }
    w.sample(CLIENT_ABORTS_TOTAL, &labels, totals.client_aborts as f64);
}

#[cfg(test)]
mod tests {
    use super::super::{Epoch, ErrorKind, SlotMetrics};
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    type Labels = Vec<(String, String)>;

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Labels,
        value: f64,
    }

    /// Parses the text format strictly: every line is a HELP, a TYPE or a sample, each family is
    /// declared once before its samples, and samples follow their own family's header.
    fn parse(text: &str) -> Result<(HashMap<String, String>, Vec<Sample>), String> {
        let mut types = HashMap::new();
        let mut helps = HashMap::new();
        let mut current: Option<(String, String)> = None;
        let mut samples = Vec::new();
        let body = text.strip_suffix('\n').ok_or("no final newline")?;
        for line in body.split('\n') {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').ok_or(format!("bad HELP: {line}"))?;
                check_name(name)?;
                if helps.insert(name.to_owned(), ()).is_some() {
                    return Err(format!("second HELP for {name}"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
                check_name(name)?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(format!("unknown type {kind}"));
                }
                if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(format!("second TYPE for {name}"));
                }
                current = Some((name.to_owned(), kind.to_owned()));
            } else {
                let sample = parse_sample(line)?;
                let (family, kind) = current.as_ref().ok_or(format!("no family: {line}"))?;
                let suffix = sample.name.strip_prefix(family.as_str());
                let allowed: &[&str] = match kind.as_str() {
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                if !suffix.is_some_and(|s| allowed.contains(&s)) {
                    return Err(format!("{} outside family {family}", sample.name));
                }
                samples.push(sample);
            }
        }
        Ok((types, samples))
    }

    fn check_name(name: &str) -> Result<(), String> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            Ok(())
        } else {
            Err(format!("bad name {name:?}"))
        }
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let end = line.find(['{', ' ']).ok_or(format!("bad sample: {line}"))?;
        let (name, mut rest) = line.split_at(end);
        check_name(name)?;
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            while let Some((label, after)) = rest.split_once("=\"") {
                check_name(label)?;
                let (value, after) = unescape_until_quote(after)?;
                labels.push((label.to_owned(), value));
                rest = after.strip_prefix(',').unwrap_or(after);
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or(format!("no value: {line}"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
        };
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    fn unescape_until_quote(text: &str) -> Result<(String, &str), String> {
        let mut out = String::new();
        let mut chars = text.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => return Ok((out, &text[i + 1..])),
                '\n' => return Err("raw newline in label value".into()),
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some('n') => out.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                c => out.push(c),
            }
        }
        Err("unterminated label value".into())
    }

    fn label<'a>(sample: &'a Sample, name: &str) -> Option<&'a str> {
        sample
            .labels
            .iter()
            .find(|(l, _)| l == name)
            .map(|(_, v)| v.as_str())
    }

    fn busy_slot(version: &str) -> SlotMetrics {
        let m = SlotMetrics::new();
        m.set_version(version);
        for ms in [1, 2, 3, 7, 20, 80, 300, 1200, 90_000] {
            m.record_response(Epoch::CURRENT, 200, false, Duration::from_millis(ms));
        }
        m.record_response(Epoch::CURRENT, 503, true, Duration::from_millis(4));
        m.record_failure(Epoch::CURRENT, ErrorKind::Timeout, Duration::from_secs(30));
        m.record_client_abort();
        m
    }

    #[test]
    fn exposition_parses_and_every_sample_belongs_to_a_declared_family() -> Result<(), String> {
        let mut w = PromWriter::new();
        w.family(
            "veer_canary_weight_percent",
            Kind::Gauge,
            "Canary share of traffic.",
        );
        for (route, version) in [("shop", "v41"), ("we\"ird\\route\nname", "v\"2")] {
            write_slot(&mut w, route, "blue", &busy_slot(version).totals());
            let idle = SlotMetrics::new();
            idle.set_version(version);
            write_slot(&mut w, route, "green", &idle.totals());
            w.sample("veer_canary_weight_percent", &[("route", route)], 12.5);
        }
        w.sample("undeclared_thing", &[], 1.0);
        let text = w.finish();
        let (types, samples) = parse(&text).map_err(|e| format!("{e}\n{text}"))?;

        assert_eq!(types["veer_requests_total"], "counter");
        assert_eq!(types["veer_request_duration_seconds"], "histogram");
        assert_eq!(types["undeclared_thing"], "untyped");
        let routes: Vec<_> = samples.iter().filter_map(|s| label(s, "route")).collect();
        assert!(routes.contains(&"we\"ird\\route\nname"));
        let requests = samples.iter().find(|s| {
            s.name == REQUESTS_TOTAL
                && label(s, "route") == Some("shop")
                && label(s, "slot") == Some("blue")
                && label(s, "class") == Some("2xx")
        });
        assert_eq!(requests.map(|s| s.value), Some(9.0));
        assert_eq!(requests.and_then(|s| label(s, "version")), Some("v41"));
        let timeouts = samples.iter().find(|s| {
            s.name == UPSTREAM_ERRORS_TOTAL
                && label(s, "route") == Some("shop")
                && label(s, "slot") == Some("blue")
                && label(s, "kind") == Some("timeout")
        });
        assert_eq!(timeouts.map(|s| s.value), Some(1.0));
        Ok(())
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf_equal_to_count() -> Result<(), String> {
        let mut w = PromWriter::new();
        write_slot(&mut w, "shop", "blue", &busy_slot("v1").totals());
        write_slot(&mut w, "api", "green", &SlotMetrics::new().totals());
        let (_, samples) = parse(&w.finish())?;
        let mut series = 0;
        for route in ["shop", "api"] {
            let of = |suffix: &'static str| {
                let name = format!("{REQUEST_DURATION}{suffix}");
                samples
                    .iter()
                    .filter(move |s| s.name == name && label(s, "route") == Some(route))
            };
            let buckets: Vec<_> = of("_bucket").collect();
            assert_eq!(buckets.len(), LATENCY_BOUNDS.len() + 1);
            let mut previous = (f64::NEG_INFINITY, 0.0);
            for bucket in &buckets {
                let le: f64 = match label(bucket, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::NAN),
                    None => f64::NAN,
                };
                assert!(le > previous.0, "le not ascending at {le}");
                assert!(bucket.value >= previous.1, "not cumulative at {le}");
                previous = (le, bucket.value);
            }
            assert_eq!(previous.0, f64::INFINITY);
            let count: Vec<_> = of("_count").map(|s| s.value).collect();
            assert_eq!(count, [previous.1]);
            assert_eq!(of("_sum").count(), 1);
            series += 1;
        }
        assert_eq!(series, 2);
        // busy_slot: 1, 2, 3 and 4 ms are at or below 5 ms, none below 1 ms (the buckets start
        // at 100 µs); 90 s is clamped into le="60".
        let at = |le: &str| {
            let shop = samples.iter().filter(|s| label(s, "route") == Some("shop"));
            shop.filter(|s| label(s, "le") == Some(le))
                .map(|s| s.value)
                .next()
        };
        assert_eq!(
            (
                at("0.0001"),
                at("0.0005"),
                at("0.005"),
                at("60"),
                at("+Inf")
            ),
            (Some(0.0), Some(0.0), Some(4.0), Some(11.0), Some(11.0))
        );
        Ok(())
    }

    #[test]
    fn a_new_version_label_starts_its_request_series_at_zero() -> Result<(), String> {
        let slot = busy_slot("e1");
        let before = slot.totals();
        assert!(slot.set_version("e2"));
        slot.record_response(Epoch::CURRENT, 503, true, Duration::from_millis(4));
        let mut w = PromWriter::new();
        write_slot(&mut w, "err", "green", &slot.totals());
        let (_, samples) = parse(&w.finish())?;
        let requests: Vec<_> = samples
            .iter()
            .filter(|s| s.name == REQUESTS_TOTAL)
            .collect();
        // Only the new label is exported, with only what was recorded under it.
        assert!(requests.iter().all(|s| label(s, "version") == Some("e2")));
        let count = |class| {
            let of = requests.iter().find(|s| label(s, "class") == Some(class));
            of.map(|s| s.value)
        };
        assert_eq!((count("2xx"), count("5xx")), (Some(0.0), Some(1.0)));
        // The families without a version label go on over the slot's lifetime.
        let value = |name: &str, key: &str, want: &str| {
            let of = samples
                .iter()
                .find(|s| s.name == name && label(s, key) == Some(want));
            of.map(|s| s.value)
        };
        let total = before.histogram.len() as f64 + 1.0;
        let duration_count = format!("{REQUEST_DURATION}_count");
        assert_eq!(value(&duration_count, "slot", "green"), Some(total));
        assert_eq!(value(UPSTREAM_ERRORS_TOTAL, "kind", "status"), Some(2.0));
        Ok(())
    }

    #[test]
    fn the_test_parser_rejects_malformed_expositions() {
        for bad in [
            "m 1\n",
            "# TYPE m counter\nm 1",
            "# TYPE m counter\nother 1\n",
            "# TYPE m counter\n# TYPE m counter\nm 1\n",
            "# TYPE m gauge\nm_bucket 1\n",
            "# TYPE m gauge\nm{a=\"x\\q\"} 1\n",
            "# TYPE m gauge\nm{a=\"x} 1\n",
            "# TYPE m gauge\nm{a=\"x\"} one\n",
            "# TYPE m summit\n",
            "# TYPE 9m gauge\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn buckets_place_values_by_their_bound_in_seconds() {
        let mut hist = super::super::latency_histogram();
        for micros in [1000, 1001, 2500, 60_000_000] {
            hist.record(micros).unwrap_or_default();
        }
        let counts = cumulative_counts(&hist, &[0.001, 0.0025, 30.0, 60.0]);
        assert_eq!(counts, [(0.001, 1), (0.0025, 3), (30.0, 3), (60.0, 4)]);
        assert!((sum_seconds(&hist) - 60.0045).abs() < 60.0 * 0.001);
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut w = PromWriter::new();
        w.family("m", Kind::Counter, "a \\ back\nslash \"quoted\"");
        w.sample("m", &[("a", "x\\y\"z\nw")], 1.0);
        let text = w.finish();
        assert_eq!(
            text,
            "# HELP m a \\\\ back\\nslash \"quoted\"\n# TYPE m counter\nm{a=\"x\\\\y\\\"z\\nw\"} 1\n"
        );
    }

    #[test]
    fn samples_group_under_their_family_whatever_the_call_order() {
        let mut w = PromWriter::new();
        w.family("a", Kind::Gauge, "A.");
        w.family("b", Kind::Gauge, "B.");
        w.sample("b", &[("r", "1")], 1.0);
        w.sample("a", &[("r", "1")], 2.0);
        w.family("a", Kind::Gauge, "A again, ignored.");
        w.sample("b", &[("r", "2")], 3.0);
        assert_eq!(
            w.finish(),
            "# HELP a A.\n# TYPE a gauge\na{r=\"1\"} 2\n\
             # HELP b B.\n# TYPE b gauge\nb{r=\"1\"} 1\nb{r=\"2\"} 3\n"
        );
    }

    #[test]
    fn values_use_prometheus_spellings() {
        let spelled: Vec<_> = [
            1.0,
            0.0025,
            1e9,
            0.0,
            -0.0,
            -2.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ]
        .into_iter()
        .map(format_value)
        .collect();
        assert_eq!(
            spelled,
            [
                "1",
                "0.0025",
                "1000000000",
                "0",
                "0",
                "-2.5",
                "+Inf",
                "-Inf",
                "NaN"
            ]
        );
    }

    #[test]
    fn an_empty_histogram_sums_to_zero_not_negative_zero() {
        let mut w = PromWriter::new();
        write_slot(&mut w, "shop", "green", &SlotMetrics::new().totals());
        let text = w.finish();
        let sum = format!("{REQUEST_DURATION}_sum{{route=\"shop\",slot=\"green\"}} 0\n");
        assert!(text.contains(&sum), "{text}");
        assert!(!text.contains(" -0"), "{text}");
    }
}
