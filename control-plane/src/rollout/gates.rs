//! Gate evaluation: the health gates over every device that runs the candidate and the
//! shadow gates over the current wave's shadowing devices, each a [`GateValue`] with its
//! verdict and what it was computed over.
//!
//! Pure like the rest of the engine: a function of the rollout state and the observations.

use super::engine::{DevState, GateValue, Health, Observations, RolloutState, ShadowObs, Verdict};

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

fn ratio_gate(
    gate: &str,
    value: Option<f64>,
    limit: f64,
    at_most: bool,
    enough: bool,
    basis: String,
) -> GateValue {
    let verdict = match value {
        Some(v) if enough => {
            let ok = if at_most { v <= limit } else { v >= limit };
            if ok {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        }
        _ => Verdict::NoData,
    };
    GateValue {
        gate: gate.into(),
        value,
        threshold: format!("{} {limit}", if at_most { "<=" } else { ">=" }),
        verdict,
        basis,
    }
}

/// The health gates over every device of the rollout that runs the candidate.
pub fn evaluate(s: &RolloutState, obs: &Observations) -> Vec<GateValue> {
    let g = &s.plan.gates;
    let mut out = Vec::new();
    let online = |id: &str| obs.devices.get(id).is_some_and(|o| o.online);
    if let Some(min) = g.min_install_success {
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
            .filter(|(id, d)| d.state != DevState::Queued || online(id))
            .count();
        let finished = installed + failed;
        let value = (finished > 0).then(|| installed as f64 / finished as f64);
        // Fail as soon as failures exceed what the threshold allows of all assigned devices;
        // pass once every finished device counts.
        let budget = ((1.0 - min) * assigned as f64 + 1e-9).floor() as usize;
        let verdict = if failed > budget {
            Verdict::Fail
        } else if finished > 0 {
            Verdict::Pass
        } else {
            Verdict::NoData
        };
        out.push(GateValue {
            gate: "install_success".into(),
            value,
            threshold: format!(">= {min}"),
            verdict,
            basis: format!("{installed} installed, {failed} failed of {assigned} assigned"),
        });
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
            cand.inferences >= g.min_inferences.max(1),
            format!(
                "{} errors in {} inferences on {n} devices",
                cand.errors, cand.inferences
            ),
        ));
    }
    if let Some(max) = g.max_p99_latency_ratio {
        let c = cand.latency.quantile_upper_us(0.99);
        let b = base.latency.quantile_upper_us(0.99);
        let value = match (c, b) {
            (Some(c), Some(b)) if b > 0 => Some(c as f64 / b as f64),
            _ => None,
        };
        let need = g.min_inferences.max(P99_MIN_SAMPLES);
        let enough = cand.latency.total() >= need && base.latency.total() >= need;
        out.push(ratio_gate(
            "p99_latency_ratio",
            value,
            max,
            true,
            enough,
            format!(
                "candidate p99 <= {} us over {}, previous p99 <= {} us over {}",
                c.map_or("-".into(), |v| v.to_string()),
                cand.latency.total(),
                b.map_or("-".into(), |v| v.to_string()),
                base.latency.total()
            ),
        ));
    }
    if let Some(max) = g.max_drift_psi {
        out.push(ratio_gate(
            "drift_psi",
            psi,
            max,
            true,
            psi.is_some(),
            format!("largest feature PSI over {n} devices"),
        ));
    }
    out
}

/// Observations a p99 needs before a latency gate judges it: below 100 the p99 is the
/// maximum, and one preempted request (or a cold first run) decides the verdict.
pub const P99_MIN_SAMPLES: u64 = 100;

/// The shadow gates over the current wave's shadowing devices.
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
    let enough = total.compared >= p.min_compared.max(1);
    let mut out = vec![ratio_gate(
        "shadow_agreement",
        (total.compared > 0).then(|| total.agreed as f64 / total.compared as f64),
        p.min_agreement,
        false,
        enough,
        format!(
            "{} of {} compared inputs agreed on {n} devices",
            total.agreed, total.compared
        ),
    )];
    if let Some(max) = p.max_latency_ratio {
        let enough = total.compared >= p.min_compared.max(P99_MIN_SAMPLES);
        let c = total.candidate_latency.quantile_upper_us(0.99);
        let a = total.active_latency.quantile_upper_us(0.99);
        let value = match (c, a) {
            (Some(c), Some(a)) if a > 0 => Some(c as f64 / a as f64),
            _ => None,
        };
        out.push(ratio_gate(
            "shadow_p99_latency_ratio",
            value,
            max,
            true,
            enough,
            format!(
                "candidate p99 <= {} us, active p99 <= {} us on the same inputs",
                c.map_or("-".into(), |v| v.to_string()),
                a.map_or("-".into(), |v| v.to_string())
            ),
        ));
    }
    out
}
