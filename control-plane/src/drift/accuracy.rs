//! Accuracy from labels: concept drift the inputs do not show. Per window, per device,
//! label group and fleet, the share of labelled predictions that were right, with its
//! Wilson interval; and the live-accuracy rollout gate's three-valued verdict on a canary
//! against a control group still on the champion.
//!
//! A scope's accuracy level is `alert` when the whole interval lies below the model's
//! floor (the accuracy is below it at the policy's confidence), `warn` when only the point
//! estimate does, `ok` otherwise, and `ok` with fewer than `min_labels` labels (too little
//! to say; the row still records the count). Pure; the intervals are checked against
//! scipy in `tests/gate_fixture.rs`.

use std::collections::BTreeMap;

use super::{scope_device, scope_group, AccuracyStat, Level, Score, SCOPE_FLEET};
use crate::stats::wilson;

/// The pseudo-feature accuracy rows are stored under in the drift history.
pub const ACCURACY: &str = "__accuracy__";

/// One labelled prediction, as the drift loop scores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    pub device: String,
    pub labels: BTreeMap<String, String>,
    pub model_digest: [u8; 32],
    /// The model's output for the sampled input.
    pub prediction: Vec<f32>,
    /// The label that came back (a class number).
    pub label: f64,
}

/// The class an output names: a single score is a probability split at 0.5, several
/// are per-class scores (argmax). `None` for an empty or non-finite output.
pub fn predicted_class(output: &[f32]) -> Option<u32> {
    if output.is_empty() || output.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(if output.len() == 1 {
        u32::from(output[0] >= 0.5)
    } else {
        crate::trainer::argmax(output)
    })
}

/// The class a label names (a non-negative whole number), else `None`.
pub fn label_class(label: f64) -> Option<u32> {
    (label.is_finite() && label >= 0.0 && label.fract() == 0.0 && label <= f64::from(u32::MAX))
        .then_some(label as u32)
}

/// How accuracy levels are decided.
#[derive(Clone, Debug, PartialEq)]
pub struct AccuracyRules {
    /// The accuracy each model is expected to hold (absent: rows are recorded, never
    /// raised above `ok`).
    pub floors: BTreeMap<[u8; 32], f64>,
    /// Confidence of the Wilson interval, e.g. 0.95.
    pub confidence: f64,
    /// Fewer labels than this in a scope and window give no level.
    pub min_labels: u64,
}

/// The level of `correct` right out of `n` against `floor` (see the module doc).
pub fn level(correct: u64, n: u64, floor: Option<f64>, rules: &AccuracyRules) -> Level {
    let Some(floor) = floor else {
        return Level::Ok;
    };
    if n == 0 || n < rules.min_labels {
        return Level::Ok;
    }
    let (_, high) = wilson(correct, n, rules.confidence);
    if high < floor {
        Level::Alert
    } else if (correct as f64) / (n as f64) < floor {
        Level::Warn
    } else {
        Level::Ok
    }
}

/// Accuracy rows for one window `[start, end)`: one per (model, scope) with labels.
/// Predictions or labels that name no class are left out.
pub fn score_accuracy(
    rows: &[Labelled],
    group_by: &[String],
    window: (u64, u64),
    rules: &AccuracyRules,
) -> Vec<Score> {
    let mut tally: BTreeMap<([u8; 32], String), (u64, u64)> = BTreeMap::new();
    for r in rows {
        let (Some(p), Some(y)) = (predicted_class(&r.prediction), label_class(r.label)) else {
            continue;
        };
        let mut scopes = vec![scope_device(&r.device), SCOPE_FLEET.to_owned()];
        for key in group_by {
            if let Some(v) = r.labels.get(key) {
                scopes.push(scope_group(key, v));
            }
        }
        for scope in scopes {
            let t = tally.entry((r.model_digest, scope)).or_default();
            t.0 += u64::from(p == y);
            t.1 += 1;
        }
    }
    tally
        .into_iter()
        .map(|((digest, scope), (correct, n))| {
            let (low, high) = wilson(correct, n, rules.confidence);
            Score {
                scope,
                model_digest: drover_protocol::topics::hex32(&digest),
                window_start_ms: window.0,
                window_end_ms: window.1,
                feature: ACCURACY.to_owned(),
                count: n,
                psi: None,
                chi2: None,
                p_value: None,
                missing: 0,
                out_of_range: 0,
                level: level(correct, n, rules.floors.get(&digest).copied(), rules),
                accuracy: Some(AccuracyStat { correct, low, high }),
            }
        })
        .collect()
}

/// Newcombe's hybrid score interval (method 10) for the difference of two independent
/// accuracies `a - b`, built from each side's Wilson interval; `None` if a side is empty.
pub fn difference_interval(a: (u64, u64), b: (u64, u64), confidence: f64) -> Option<(f64, f64)> {
    if a.1 == 0 || b.1 == 0 {
        return None;
    }
    let (pa, pb) = (a.0 as f64 / a.1 as f64, b.0 as f64 / b.1 as f64);
    let (la, ua) = wilson(a.0, a.1, confidence);
    let (lb, ub) = wilson(b.0, b.1, confidence);
    let d = pa - pb;
    Some((
        d - ((pa - la).powi(2) + (ub - pb).powi(2)).sqrt(),
        d + ((ua - pa).powi(2) + (pb - lb).powi(2)).sqrt(),
    ))
}

/// A gate's three-valued verdict. No data is never a pass.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    NoData(String),
}

/// The live-accuracy gate: the candidate's labelled predictions on the canary, `(right,
/// labelled)`, against the control group's on the champion over the same span. Fails when
/// the candidate is worse by more than `max_drop` at `confidence` (the whole interval of
/// the difference below `-max_drop`), passes when it is not (the whole interval above),
/// and has no verdict with fewer than `min_labels` labels on a side or while the interval
/// spans `-max_drop`. Errors are stated per 1,000 labelled requests, so canary and control
/// of different sizes compare.
pub fn live_accuracy_verdict(
    canary: (u64, u64),
    control: (u64, u64),
    max_drop: f64,
    confidence: f64,
    min_labels: u64,
) -> Verdict {
    let per_1000 = |(k, n): (u64, u64)| {
        if n == 0 {
            0.0
        } else {
            1000.0 * (n - k.min(n)) as f64 / n as f64
        }
    };
    let said = format!(
        "candidate {:.0} wrong per 1,000 labelled ({} labels), champion control {:.0} ({} labels)",
        per_1000(canary),
        canary.1,
        per_1000(control),
        control.1
    );
    let need = min_labels.max(1);
    if canary.1 < need || control.1 < need {
        return Verdict::NoData(format!("{said}: fewer than {need} labels on a side"));
    }
    let Some((low, high)) = difference_interval(canary, control, confidence) else {
        return Verdict::NoData(said);
    };
    let ci = format!(
        "difference in [{low:.3}, {high:.3}] at {:.0} %",
        confidence * 100.0
    );
    if high < -max_drop {
        Verdict::Fail(format!(
            "{said}: {ci}, worse than the allowed drop {max_drop}"
        ))
    } else if low >= -max_drop {
        Verdict::Pass(format!("{said}: {ci}"))
    } else {
        Verdict::NoData(format!("{said}: {ci}, not yet conclusive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(floor: f64) -> AccuracyRules {
        AccuracyRules {
            floors: BTreeMap::from([([1; 32], floor)]),
            confidence: 0.95,
            min_labels: 20,
        }
    }

    fn labelled(device: &str, site: &str, right: bool) -> Labelled {
        Labelled {
            device: device.into(),
            labels: BTreeMap::from([("site".into(), site.into())]),
            model_digest: [1; 32],
            prediction: vec![0.2, 0.8],
            label: if right { 1.0 } else { 0.0 },
        }
    }

    #[test]
    fn classes_come_from_argmax_or_a_split_score_and_bad_values_are_skipped() {
        assert_eq!(predicted_class(&[0.7]), Some(1));
        assert_eq!(predicted_class(&[0.3]), Some(0));
        assert_eq!(predicted_class(&[0.1, 0.5, 0.4]), Some(1));
        assert_eq!(predicted_class(&[]), None);
        assert_eq!(predicted_class(&[f32::NAN, 1.0]), None);
        assert_eq!(label_class(2.0), Some(2));
        assert_eq!(label_class(0.5), None);
        assert_eq!(label_class(-1.0), None);
    }

    #[test]
    fn a_site_whose_labels_disagree_alerts_and_the_other_does_not() {
        let mut rows = Vec::new();
        for i in 0..100 {
            rows.push(labelled("a1", "a", i % 10 != 0)); // 90 %
            rows.push(labelled("b1", "b", i % 2 == 0)); // 50 %
        }
        rows.push(Labelled {
            prediction: vec![],
            ..labelled("b1", "b", true)
        });
        let scores = score_accuracy(&rows, &["site".into()], (0, 10), &rules(0.8));
        let get = |scope: &str| scores.iter().find(|s| s.scope == scope).unwrap();
        let b = get("site=b");
        assert_eq!((b.count, b.accuracy.unwrap().correct), (100, 50));
        assert_eq!(b.level, Level::Alert);
        assert_eq!(get("device:b1").level, Level::Alert);
        assert_eq!(get("site=a").level, Level::Ok);
        assert_eq!(get("fleet").count, 200);
        // 70 % on 200: the whole interval (0.63, 0.76) lies below 0.8, alert; against a
        // floor of 0.72 only the point does, warn.
        assert_eq!(get("fleet").level, Level::Alert);
        let scores = score_accuracy(&rows, &["site".into()], (0, 10), &rules(0.72));
        let fleet = scores.iter().find(|s| s.scope == "fleet").unwrap();
        assert_eq!(fleet.level, Level::Warn);
        // Too few labels, or no floor: no level.
        assert_eq!(level(5, 10, Some(0.9), &rules(0.9)), Level::Ok);
        assert_eq!(level(0, 100, None, &rules(0.9)), Level::Ok);
    }

    #[test]
    fn the_live_gate_fails_passes_or_waits_and_no_data_is_never_a_pass() {
        let v = live_accuracy_verdict((0, 0), (0, 0), 0.02, 0.95, 1);
        assert!(matches!(v, Verdict::NoData(_)), "{v:?}");
        let v = live_accuracy_verdict((5, 10), (90, 100), 0.02, 0.95, 30);
        assert!(
            matches!(v, Verdict::NoData(ref r) if r.contains("fewer than 30")),
            "{v:?}"
        );
        let v = live_accuracy_verdict((300, 500), (450, 500), 0.02, 0.95, 30);
        assert!(
            matches!(v, Verdict::Fail(ref r) if r.contains("400 wrong per 1,000")),
            "{v:?}"
        );
        let v = live_accuracy_verdict((460, 500), (4_500, 5_000), 0.05, 0.95, 30);
        assert!(matches!(v, Verdict::Pass(_)), "{v:?}");
        let v = live_accuracy_verdict((27, 30), (28, 30), 0.02, 0.95, 30);
        assert!(
            matches!(v, Verdict::NoData(ref r) if r.contains("not yet")),
            "{v:?}"
        );
    }
}
