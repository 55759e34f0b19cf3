//! Gate evaluation: the health gates over every device that runs the candidate and the
//! shadow gates over the current wave's shadowing devices, each a [`GateValue`] with its
//! three-valued verdict, what it was computed over and, without a verdict, why.
//!
//! Latency quantiles come from the agents' fixed-bucket histograms, interpolated inside
//! the bucket (see [`quantile_us`]) rather than read off a bucket's upper edge, which made
//! a 190 µs → 210 µs change look like 200 → 350 µs.
//!
//! Pure like the rest of the engine: a function of the rollout state and the observations.

use drover_protocol::messages::{LatencyHistogram, LATENCY_BUCKETS_US};

use super::engine::{DevState, GateValue, Health, Observations, RolloutState, ShadowObs, Verdict};
use super::plan::OnNoData;
use crate::drift::accuracy::{self, live_accuracy_verdict};

/// Why the rollout must stop, if any gate failed: every failed gate with its value and
/// limit, in evaluation order.
pub(super) fn failure_reason(wave: usize, gates: &[GateValue]) -> Option<String> {
    let failed: Vec<&GateValue> = gates
        .iter()
        .filter(|g| g.verdict == Verdict::Fail)
        .collect();
    if failed.is_empty() {
        return None;
    }
    Some(format!(
        "gate failed in wave {}: {}",
        wave + 1,
        failed
            .iter()
            .map(|g| format!(
                "{} = {} (limit {})",
                g.gate,
                g.value.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
                g.threshold
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Gates without a verdict, as one line ("error_rate: needs 100 inferences, has 12").
pub(super) fn without_verdict(gates: &[GateValue]) -> Option<String> {
    let open: Vec<String> = gates
        .iter()
        .filter(|g| g.verdict == Verdict::NoData)
        .map(|g| format!("{}: {}", g.gate, g.reason.as_deref().unwrap_or("no data")))
        .collect();
    (!open.is_empty()).then(|| open.join("; "))
}

/// Why a stage whose time is over must still wait, under the plan's `on_no_data`.
pub(super) fn hold_reason(policy: OnNoData, gates: &[GateValue]) -> Option<String> {
    match policy {
        OnNoData::Pass => None,
        OnNoData::Hold => without_verdict(gates).map(|g| format!("no verdict yet: {g}")),
    }
}

/// How a stage's gates let it end: "every gate passed", or which gates had no verdict
/// and passed because the plan says `on_no_data = "pass"`.
pub(super) fn passed_how(gates: &[GateValue]) -> String {
    match without_verdict(gates) {
        None => "every gate passed".into(),
        Some(open) => format!("gates passed, without a verdict (on_no_data = \"pass\"): {open}"),
    }
}

/// A gate comparing `value` to `limit`; `short` says why there is no verdict yet.
fn ratio_gate(
    gate: &str,
    value: Option<f64>,
    limit: f64,
    at_most: bool,
    short: Option<String>,
    basis: String,
) -> GateValue {
    let (verdict, reason) = match (value, short) {
        (_, Some(why)) => (Verdict::NoData, Some(why)),
        (None, None) => (Verdict::NoData, Some("no value yet".into())),
        (Some(v), None) => {
            let ok = if at_most { v <= limit } else { v >= limit };
            (if ok { Verdict::Pass } else { Verdict::Fail }, None)
        }
    };
    GateValue {
        gate: gate.into(),
        value,
        threshold: format!("{} {limit}", if at_most { "<=" } else { ">=" }),
        verdict,
        basis,
        reason,
    }
}

/// `Some("needs {need} {what}, has {have}")` while `have < need`.
fn short_of(need: u64, have: u64, what: &str) -> Option<String> {
    (have < need).then(|| format!("needs {need} {what}, has {have}"))
}

/// Quantile `q` of a latency histogram in µs, interpolated inside its bucket.
///
/// Where inside a bucket the samples sit comes from the histogram's sum: one position
/// `a` (0 = bucket's lower edge, 1 = upper) is fitted so that the buckets' counts at
/// their positions add up to the sum, and the samples of a bucket are taken as spread
/// evenly over the part of it whose mean is that position. A narrow model (every
/// sample near 210 µs in the 200–350 µs bucket) then gets a p99 near 210 µs, not 350.
/// Without a sum (`sum_us = 0`) the samples spread over the whole bucket, as in
/// Prometheus' `histogram_quantile`. The overflow bucket reports its lower edge.
pub fn quantile_us(h: &LatencyHistogram, q: f64) -> Option<f64> {
    let total = h.total();
    if total == 0 {
        return None;
    }
    let edges = |i: usize| {
        let lo = if i == 0 { 0 } else { LATENCY_BUCKETS_US[i - 1] };
        (lo as f64, LATENCY_BUCKETS_US[i] as f64)
    };
    let finite = LATENCY_BUCKETS_US.len() - 1;
    let counts = &h.counts[..h.counts.len().min(LATENCY_BUCKETS_US.len())];
    let (mut at_lo, mut width, mut over) = (0.0, 0.0, 0.0);
    for (i, &c) in counts.iter().enumerate() {
        let (lo, hi) = edges(i);
        if i < finite {
            at_lo += c as f64 * lo;
            width += c as f64 * (hi - lo);
        } else {
            over += c as f64 * lo;
        }
    }
    let a = if h.sum_us > 0 && width > 0.0 {
        ((h.sum_us as f64 - over - at_lo) / width).clamp(0.0, 1.0)
    } else {
        0.5
    };
    // The part of a bucket its samples spread over: [lo + from*w, lo + to*w], mean a.
    let (from, to) = if a <= 0.5 {
        (0.0, 2.0 * a)
    } else {
        (2.0 * a - 1.0, 1.0)
    };
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let c = c as f64;
        if c > 0.0 && below + c >= rank {
            let (lo, hi) = edges(i);
            if i >= finite {
                return Some(lo);
            }
            let frac = ((rank - below) / c).clamp(0.0, 1.0);
            let w = hi - lo;
            return Some(lo + w * (from + (to - from) * frac));
        }
        below += c;
    }
    None
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} us"))
}

/// "p50 205 us, p99 219 us over 1000"
fn quantiles(h: &LatencyHistogram) -> String {
    format!(
        "p50 {}, p99 {} over {}",
        fmt_us(quantile_us(h, 0.5)),
        fmt_us(quantile_us(h, 0.99)),
        h.total()
    )
}

/// The candidate's p99 over the reference's, when both have one.
fn p99_ratio(cand: &LatencyHistogram, reference: &LatencyHistogram) -> Option<f64> {
    match (quantile_us(cand, 0.99), quantile_us(reference, 0.99)) {
        (Some(c), Some(r)) if r > 0.0 => Some(c / r),
        _ => None,
    }
}

/// The install-success gate: fails as soon as failures exceed what the threshold allows
/// of all assigned devices; passes once a device finished and none too many failed.
fn install_gate(s: &RolloutState, obs: &Observations, min: f64) -> GateValue {
    let installed = s
        .devices
        .values()
        .filter(|d| d.state.runs_candidate())
        .count();
    let failed = s
        .devices
        .values()
        .filter(|d| d.state == DevState::Failed)
        .count();
    let assigned = s
        .devices
        .iter()
        .filter(|(id, d)| d.state != DevState::Queued || obs.online(id))
        .count();
    let finished = installed + failed;
    let value = (finished > 0).then(|| installed as f64 / finished as f64);
    let budget = ((1.0 - min) * assigned as f64 + 1e-9).floor() as usize;
    let (verdict, reason) = if failed > budget {
        (Verdict::Fail, None)
    } else if finished > 0 {
        (Verdict::Pass, None)
    } else {
        (
            Verdict::NoData,
            Some(format!(
                "no device finished installing yet ({assigned} assigned)"
            )),
        )
    };
    GateValue {
        gate: "install_success".into(),
        value,
        threshold: format!(">= {min}"),
        verdict,
        basis: format!("{installed} installed, {failed} failed of {assigned} assigned"),
        reason,
    }
}

/// The health gates over every device of the rollout that runs the candidate.
pub fn evaluate(s: &RolloutState, obs: &Observations) -> Vec<GateValue> {
    let g = &s.plan.gates;
    let mut out = Vec::new();
    if let Some(min) = g.min_install_success {
        out.push(install_gate(s, obs, min));
    }
    let mut cand = Health::default();
    let mut base = Health::default();
    let mut n = 0;
    let mut psi: Option<f64> = None;
    for (id, d) in &s.devices {
        if !d.state.runs_candidate() {
            continue;
        }
        if let Some(o) = obs.devices.get(id) {
            n += 1;
            cand.merge(&o.candidate);
            base.merge(&o.baseline);
            if let Some(p) = o.drift_psi {
                psi = Some(psi.map_or(p, |q: f64| q.max(p)));
            }
        }
    }
    if let Some(max) = g.max_error_rate {
        let value = (cand.inferences > 0).then(|| cand.errors as f64 / cand.inferences as f64);
        out.push(ratio_gate(
            "error_rate",
            value,
            max,
            true,
            short_of(
                g.min_inferences.max(1),
                cand.inferences,
                "inferences on the candidate",
            ),
            format!(
                "{} errors in {} inferences on {n} devices",
                cand.errors, cand.inferences
            ),
        ));
    }
    if let Some(max) = g.max_p99_latency_ratio {
        let need = g.min_inferences.max(P99_MIN_SAMPLES);
        let short =
            short_of(need, cand.latency.total(), "latencies on the candidate").or_else(|| {
                short_of(
                    need,
                    base.latency.total(),
                    "latencies of the previous model (its telemetry before the rollout)",
                )
            });
        out.push(ratio_gate(
            "p99_latency_ratio",
            p99_ratio(&cand.latency, &base.latency),
            max,
            true,
            short,
            format!(
                "candidate {}; previous model {}",
                quantiles(&cand.latency),
                quantiles(&base.latency)
            ),
        ));
    }
    if let Some(max) = g.max_drift_psi {
        out.push(ratio_gate(
            "drift_psi",
            psi,
            max,
            true,
            psi.is_none()
                .then(|| "no drift sketch from the candidate yet".into()),
            format!("largest feature PSI over {n} devices"),
        ));
    }
    if let Some(max_drop) = g.max_live_accuracy_drop {
        out.push(live_accuracy_gate(obs, max_drop, g.min_labels));
    }
    out
}

/// Labels each side needs before the live-accuracy gate gives a verdict, by default.
pub const DEFAULT_MIN_LABELS: u64 = 100;

/// The live-accuracy gate: the candidate's accuracy on labelled inputs minus the control
/// group's, judged by [`live_accuracy_verdict`] (no data is never a pass).
fn live_accuracy_gate(obs: &Observations, max_drop: f64, min_labels: Option<u64>) -> GateValue {
    let live = obs.live_accuracy.unwrap_or_default();
    let share = |(k, n): (u64, u64)| (n > 0).then(|| k as f64 / n as f64);
    let value = share(live.candidate)
        .zip(share(live.control))
        .map(|(a, b)| a - b);
    let (verdict, text) = match live_accuracy_verdict(
        live.candidate,
        live.control,
        max_drop,
        0.95,
        min_labels.unwrap_or(DEFAULT_MIN_LABELS),
    ) {
        accuracy::Verdict::Pass(t) => (Verdict::Pass, t),
        accuracy::Verdict::Fail(t) => (Verdict::Fail, t),
        accuracy::Verdict::NoData(t) => (Verdict::NoData, t),
    };
    GateValue {
        gate: "live_accuracy".into(),
        value,
        threshold: format!(">= -{max_drop}"),
        reason: (verdict == Verdict::NoData).then(|| text.clone()),
        verdict,
        basis: text,
    }
}

/// Observations a p99 needs before a latency gate judges it: below 100 the p99 is the
/// maximum, and one preempted request (or a cold first run) decides the verdict.
pub const P99_MIN_SAMPLES: u64 = 100;

/// The shadow gates over the current wave's shadowing devices. Agreement has no verdict
/// below `min_compared` comparisons, and the shadow stage never promotes without one.
pub fn evaluate_shadow(s: &RolloutState, obs: &Observations) -> Vec<GateValue> {
    let Some(p) = &s.plan.shadow else {
        return Vec::new();
    };
    let mut total = ShadowObs::default();
    let mut n = 0;
    for (id, d) in &s.devices {
        if d.wave != s.wave || d.state != DevState::Shadowing {
            continue;
        }
        if let Some(o) = obs.devices.get(id) {
            n += 1;
            total.compared = total.compared.saturating_add(o.shadow.compared);
            total.agreed = total.agreed.saturating_add(o.shadow.agreed);
            total.active_latency.merge(&o.shadow.active_latency);
            total.candidate_latency.merge(&o.shadow.candidate_latency);
        }
    }
    let mut out = vec![ratio_gate(
        "shadow_agreement",
        (total.compared > 0).then(|| total.agreed as f64 / total.compared as f64),
        p.min_agreement,
        false,
        short_of(p.min_compared.max(1), total.compared, "compared inputs"),
        format!(
            "{} of {} compared inputs agreed on {n} devices",
            total.agreed, total.compared
        ),
    )];
    if let Some(max) = p.max_latency_ratio {
        let need = p.min_compared.max(P99_MIN_SAMPLES);
        out.push(ratio_gate(
            "shadow_p99_latency_ratio",
            p99_ratio(&total.candidate_latency, &total.active_latency),
            max,
            true,
            short_of(need, total.compared, "compared inputs"),
            format!(
                "candidate {}; active {} on the same inputs",
                quantiles(&total.candidate_latency),
                quantiles(&total.active_latency)
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(values: impl Iterator<Item = u64>) -> LatencyHistogram {
        let mut h = LatencyHistogram::new();
        for v in values {
            h.record(v);
        }
        h
    }

    #[test]
    fn p99_is_interpolated_inside_the_bucket_not_its_upper_edge() {
        // A ~200 µs model: the previous one ran 180–199 µs (the 100–200 bucket), the
        // candidate 201–220 µs (the 200–350 bucket). Upper edges said 350/200 = 1.75.
        let before = spread((0..1000).map(|i| 180 + i % 20));
        let after = spread((0..1000).map(|i| 201 + i % 20));
        assert_eq!(before.quantile_upper_us(0.99), Some(200));
        assert_eq!(after.quantile_upper_us(0.99), Some(350));
        let b = quantile_us(&before, 0.99).unwrap();
        let a = quantile_us(&after, 0.99).unwrap();
        assert!((195.0..=200.0).contains(&b), "previous p99 {b}");
        assert!((215.0..=222.0).contains(&a), "candidate p99 {a}");
        assert!(a / b < 1.15, "ratio {}", a / b);
        // A spread-out distribution lands inside the bucket, in rank order.
        let wide = spread(1..=1000);
        let p50 = quantile_us(&wide, 0.5).unwrap();
        let p99 = quantile_us(&wide, 0.99).unwrap();
        assert!((450.0..=560.0).contains(&p50), "p50 {p50}");
        assert!((950.0..=1000.0).contains(&p99), "p99 {p99}");
        assert!(p50 < p99);
        // Without a sum: evenly over the bucket, as Prometheus does.
        let no_sum = LatencyHistogram {
            sum_us: 0,
            ..after.clone()
        };
        let even = quantile_us(&no_sum, 0.5).unwrap();
        assert!((200.0..=350.0).contains(&even), "{even}");
        assert_eq!(quantile_us(&LatencyHistogram::new(), 0.99), None);
        // The overflow bucket reports its lower edge.
        let huge = spread(std::iter::repeat_n(10_000_000, 10));
        assert_eq!(quantile_us(&huge, 0.99), Some(5_000_000.0));
    }
}
