//! Prometheus text exposition (format 0.0.4), shared by the agent's and the control
//! plane's `/metrics`, so both pass `promtool check metrics` for the same reasons:
//! durations in seconds, counters ending `_total`, histograms with `_bucket`/`_sum`/
//! `_count`, label values escaped, one `# HELP`/`# TYPE` per family.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket bounds in seconds for request and inference durations: 50 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Bucket bounds in seconds for slow work (training jobs): 1 s to 6 h.
pub const SLOW_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// A lock-free histogram of durations over fixed bounds (seconds); the sum is kept in
/// nanoseconds so it adds without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts, one per bound and one for +Inf.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add((seconds * 1e9).min(u64::MAX as f64) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Renders `{k="v",...}` (empty for no labels).
pub fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one sample; a non-finite value is written as Prometheus spells it.
pub fn sample(out: &mut String, name: &str, pairs: &[(&str, &str)], v: f64) {
    let l = labels(pairs);
    if v.is_nan() {
        let _ = writeln!(out, "{name}{l} NaN");
    } else if v.is_infinite() {
        let _ = writeln!(out, "{name}{l} {}Inf", if v > 0.0 { "+" } else { "-" });
    } else {
        let _ = writeln!(out, "{name}{l} {v}");
    }
}

/// A one-sample family.
pub fn single(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    header(out, name, kind, help);
    sample(out, name, &[], v);
}

/// Writes one histogram's `_bucket`, `_sum` and `_count` samples (the family's header is
/// written once by the caller).
pub fn histogram(out: &mut String, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
    let mut cumulative = 0u64;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c.load(Relaxed);
        let le = match h.bounds.get(i) {
            Some(b) => format!("{b}"),
            None => "+Inf".to_owned(),
        };
        let mut with_le: Vec<(&str, &str)> = pairs.to_vec();
        with_le.push(("le", &le));
        sample(out, &format!("{name}_bucket"), &with_le, cumulative as f64);
    }
    let sum = h.sum_ns.load(Relaxed) as f64 / 1e9;
    sample(out, &format!("{name}_sum"), pairs, sum);
    sample(out, &format!("{name}_count"), pairs, cumulative as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_sum_and_count() {
        static B: [f64; 2] = [0.1, 1.0];
        let h = Histogram::new(&B);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(3.0);
        let mut s = String::new();
        histogram(&mut s, "x_seconds", &[("model", "m\"1")], &h);
        assert_eq!(
            s,
            "x_seconds_bucket{model=\"m\\\"1\",le=\"0.1\"} 1\n\
             x_seconds_bucket{model=\"m\\\"1\",le=\"1\"} 2\n\
             x_seconds_bucket{model=\"m\\\"1\",le=\"+Inf\"} 3\n\
             x_seconds_sum{model=\"m\\\"1\"} 3.55\n\
             x_seconds_count{model=\"m\\\"1\"} 3\n"
        );
    }
}
