//! Drift statistics: live sketches from devices against the baseline in the signed
//! manifest, per device, per label group (e.g. `site`) and fleet-wide, per feature and for
//! the predictions.
//!
//! A model's drift is scored against a reference: the manifest's baseline, or, once a
//! rollout of the model completed healthy, the first window of at least
//! `reference_min_rows` observations each label group (e.g. `site=b`) reported with it
//! (see [`new_references`] and [`score_window_with`]). A model retrained on a mix of sites
//! then stops alerting at a site that simply differs from the mix, while a later change
//! at that site still alerts. References are merged bin counts, never raw inputs.
//!
//! Pure functions of `(baselines, references, sketches, window)`: the caller ([`crate::continuous`])
//! reads the store and keeps the history. Two statistics per feature:
//! - PSI (population stability index) with the usual epsilon floor on empty bins, graded
//!   by the common thresholds 0.1 (warn) and 0.25 (alert);
//! - Pearson's chi-square test of homogeneity on the same bins (reference vs live counts),
//!   as `scipy.stats.chi2_contingency(correction=False)` computes it, with its p-value.
//!
//! `control-plane/tests/fixtures/drift/make_fixture.py` computes both with numpy/scipy;
//! `control-plane/tests/drift_fixture.rs` checks these functions against its outputs.

use std::collections::{BTreeMap, BTreeSet};

pub mod accuracy;

use drover_protocol::manifest::{Baseline, FeatureBaseline};
use drover_protocol::messages::FeatureSketch;

/// Floor for bin proportions in PSI, so an empty bin does not make it infinite.
pub const PSI_EPSILON: f64 = 1e-4;
pub const DEFAULT_PSI_WARN: f64 = 0.1;
pub const DEFAULT_PSI_ALERT: f64 = 0.25;
/// A score raises its level only when the chi-square test finds the live counts differ
/// from the baseline at this p-value or lower: on a small sample (one device, a short
/// window) PSI is high by chance, and that is not drift.
pub const DEFAULT_MAX_P_VALUE: f64 = 0.01;
/// The pseudo-feature name under which prediction drift is reported.
pub const PREDICTIONS: &str = "__predictions__";

/// Population stability index of `actual` against `expected` (same bins).
///
/// `None` when either side has no observations. Proportions below `eps` are raised to it.
pub fn psi(expected: &[u64], actual: &[u64], eps: f64) -> Option<f64> {
    let n = expected.len().max(actual.len());
    let te: u64 = expected.iter().sum();
    let ta: u64 = actual.iter().sum();
    if te == 0 || ta == 0 {
        return None;
    }
    let mut s = 0.0;
    for i in 0..n {
        let p = (*expected.get(i).unwrap_or(&0) as f64 / te as f64).max(eps);
        let q = (*actual.get(i).unwrap_or(&0) as f64 / ta as f64).max(eps);
        s += (q - p) * (q / p).ln();
    }
    Some(s)
}

/// Result of a chi-square test of homogeneity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChiSquare {
    pub statistic: f64,
    pub dof: u32,
    pub p_value: f64,
}

/// Chi-square test that `expected` and `actual` counts come from one distribution (2×k
/// contingency table, bins empty on both sides dropped, no continuity correction).
/// `None` when a side is empty or fewer than two bins are non-empty.
pub fn chi_square(expected: &[u64], actual: &[u64]) -> Option<ChiSquare> {
    let n = expected.len().max(actual.len());
    let cols: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            (
                *expected.get(i).unwrap_or(&0) as f64,
                *actual.get(i).unwrap_or(&0) as f64,
            )
        })
        .filter(|(a, b)| *a + *b > 0.0)
        .collect();
    let r0: f64 = cols.iter().map(|c| c.0).sum();
    let r1: f64 = cols.iter().map(|c| c.1).sum();
    if r0 == 0.0 || r1 == 0.0 || cols.len() < 2 {
        return None;
    }
    let total = r0 + r1;
    let mut stat = 0.0;
    for (a, b) in &cols {
        let col = a + b;
        for (o, row) in [(*a, r0), (*b, r1)] {
            let e = row * col / total;
            stat += (o - e) * (o - e) / e;
        }
    }
    let dof = (cols.len() - 1) as u32;
    Some(ChiSquare {
        statistic: stat,
        dof,
        p_value: chi2_sf(stat, f64::from(dof)),
    })
}

/// Survival function of the chi-square distribution: `Q(k/2, x/2)`.
pub fn chi2_sf(x: f64, k: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(k / 2.0, x / 2.0)
}

/// Regularized upper incomplete gamma `Q(a, x)` (series for `x < a + 1`, continued
/// fraction otherwise; Numerical Recipes §6.2). Written here rather than pulling `statrs`
/// (and nalgebra with it) for one function; checked against scipy by the fixture test.
fn gamma_q(a: f64, x: f64) -> f64 {
    if x < a + 1.0 {
        let mut sum = 1.0 / a;
        let mut del = sum;
        let mut ap = a;
        for _ in 0..1000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        let p = sum * (-x + a * x.ln() - libm::lgamma(a)).exp();
        (1.0 - p).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ((-x + a * x.ln() - libm::lgamma(a)).exp() * h).clamp(0.0, 1.0)
    }
}

/// Warn and alert levels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub psi_warn: f64,
    pub psi_alert: f64,
    /// See [`DEFAULT_MAX_P_VALUE`].
    pub max_p_value: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            psi_warn: DEFAULT_PSI_WARN,
            psi_alert: DEFAULT_PSI_ALERT,
            max_p_value: DEFAULT_MAX_P_VALUE,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Alert,
}

impl Level {
    /// The level of a PSI whose chi-square test gave `p_value` (`None`: no test possible,
    /// PSI alone decides).
    pub fn of(psi: Option<f64>, p_value: Option<f64>, t: &Thresholds) -> Level {
        if p_value.is_some_and(|p| p > t.max_p_value) {
            return Level::Ok;
        }
        match psi {
            Some(p) if p >= t.psi_alert => Level::Alert,
            Some(p) if p >= t.psi_warn => Level::Warn,
            _ => Level::Ok,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "ok" => Some(Level::Ok),
            "warn" => Some(Level::Warn),
            "alert" => Some(Level::Alert),
            _ => None,
        }
    }
}

/// One device's drift sketch for one window, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct SketchRow {
    pub device: String,
    pub labels: BTreeMap<String, String>,
    pub model_digest: [u8; 32],
    pub window_end_ms: u64,
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
}

/// Where a score applies: `device:<id>`, `<label>=<value>` or `fleet`.
pub fn scope_device(id: &str) -> String {
    format!("device:{id}")
}
pub fn scope_group(key: &str, value: &str) -> String {
    format!("{key}={value}")
}
pub const SCOPE_FLEET: &str = "fleet";

/// One drift score: one scope, one model, one window, one feature (or the predictions).
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub scope: String,
    pub model_digest: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub feature: String,
    /// Live observations in the window.
    pub count: u64,
    pub psi: Option<f64>,
    pub chi2: Option<f64>,
    pub p_value: Option<f64>,
    /// Data-quality counts: NaN/missing and outside the baseline's range.
    pub missing: u64,
    pub out_of_range: u64,
    pub level: Level,
    /// Set on accuracy rows (feature [`crate::accuracy::ACCURACY`]): `count` labelled
    /// predictions, this many right, and the Wilson interval of the accuracy.
    pub accuracy: Option<AccuracyStat>,
}

/// Accuracy of one scope in one window (see [`Score::accuracy`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccuracyStat {
    pub correct: u64,
    pub low: f64,
    pub high: f64,
}

/// Merged bin counts of one or more device sketches: what a live window holds and what a
/// reference window keeps (counts only, never raw inputs).
#[derive(Default, Clone, Debug, PartialEq)]
pub struct Sketch {
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
}

/// Reference windows recorded after a rollout completed healthy, per (model digest,
/// group scope such as `site=b`). Drift of that model in that group is scored against
/// them instead of the manifest's baseline.
pub type References = BTreeMap<([u8; 32], String), Sketch>;

impl Sketch {
    /// Observations the sketch holds: the predictions counted, else the first feature's.
    pub fn rows(&self) -> u64 {
        if self.predictions.is_empty() {
            self.features
                .first()
                .map_or(0, |f| f.counts.iter().sum::<u64>() + f.missing)
        } else {
            self.predictions.iter().sum()
        }
    }
}

/// A live sketch per (model, scope) and what it is scored against: the references of
/// the groups its rows belong to, unless some row has none (then the manifest baseline).
#[derive(Default, Clone)]
struct Merged {
    live: Sketch,
    reference_groups: BTreeSet<String>,
    unreferenced: bool,
}

fn add_counts(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

impl Sketch {
    pub fn add(&mut self, features: &[FeatureSketch], predictions: &[u64]) {
        if self.features.len() < features.len() {
            self.features
                .resize(features.len(), FeatureSketch::default());
        }
        for (m, f) in self.features.iter_mut().zip(features) {
            add_counts(&mut m.counts, &f.counts);
            m.missing += f.missing;
            m.out_of_range += f.out_of_range;
        }
        add_counts(&mut self.predictions, predictions);
    }
}

fn reference_counts(f: &FeatureBaseline) -> (&str, &[u64]) {
    match f {
        FeatureBaseline::Numeric { name, counts, .. } => (name, counts),
        FeatureBaseline::Categorical { name, counts, .. } => (name, counts),
    }
}

/// Scores every scope for every model seen in `sketches` (already restricted to one
/// window `[start, end)`), against that model's baseline. Models without a baseline are
/// skipped. `group_by` names the device labels to group on (e.g. `["site"]`).
pub fn score_window(
    baselines: &BTreeMap<[u8; 32], Baseline>,
    sketches: &[SketchRow],
    group_by: &[String],
    window: (u64, u64),
    t: &Thresholds,
) -> Vec<Score> {
    score_window_with(baselines, &References::new(), sketches, group_by, window, t)
}

/// The group scopes of a sketch's device, in `group_by` order.
fn groups_of(s: &SketchRow, group_by: &[String]) -> Vec<String> {
    group_by
        .iter()
        .filter_map(|k| s.labels.get(k).map(|v| scope_group(k, v)))
        .collect()
}

/// [`score_window`] with reference windows: a group scope with a reference for the model
/// is scored against it; a device or the fleet against the sum of the references of the
/// groups its devices belong to (each device counted under its first `group_by` group
/// that has one), when every device has one; anything else against the baseline.
pub fn score_window_with(
    baselines: &BTreeMap<[u8; 32], Baseline>,
    references: &References,
    sketches: &[SketchRow],
    group_by: &[String],
    window: (u64, u64),
    t: &Thresholds,
) -> Vec<Score> {
    // (model, scope) → merged sketch. BTreeMap: deterministic output order.
    let mut merged: BTreeMap<([u8; 32], String), Merged> = BTreeMap::new();
    for s in sketches {
        if !baselines.contains_key(&s.model_digest) {
            continue;
        }
        let d = s.model_digest;
        let groups = groups_of(s, group_by);
        let has_ref = |g: &String| references.contains_key(&(d, g.clone()));
        let own_ref = groups.iter().find(|g| has_ref(g)).cloned();
        let mut scopes = vec![
            (scope_device(&s.device), own_ref.clone()),
            (SCOPE_FLEET.to_owned(), own_ref),
        ];
        for g in groups {
            let r = has_ref(&g).then(|| g.clone());
            scopes.push((g, r));
        }
        for (scope, reference) in scopes {
            let m = merged.entry((d, scope)).or_default();
            m.live.add(&s.features, &s.predictions);
            match reference {
                Some(g) => {
                    m.reference_groups.insert(g);
                }
                None => m.unreferenced = true,
            }
        }
    }
    let mut out = Vec::new();
    for ((digest, scope), m) in merged {
        let Some(b) = baselines.get(&digest) else {
            continue;
        };
        let reference = (!m.unreferenced && !m.reference_groups.is_empty()).then(|| {
            let mut sum = Sketch::default();
            for g in &m.reference_groups {
                if let Some(r) = references.get(&(digest, g.clone())) {
                    sum.add(&r.features, &r.predictions);
                }
            }
            sum
        });
        let hex = drover_protocol::topics::hex32(&digest);
        let mut push = |feature: &str, expected: &[u64], live: &[u64], missing, oor| {
            let p = psi(expected, live, PSI_EPSILON);
            let c = chi_square(expected, live);
            out.push(Score {
                scope: scope.clone(),
                model_digest: hex.clone(),
                window_start_ms: window.0,
                window_end_ms: window.1,
                feature: feature.to_owned(),
                count: live.iter().sum(),
                psi: p,
                chi2: c.map(|c| c.statistic),
                p_value: c.map(|c| c.p_value),
                missing,
                out_of_range: oor,
                level: Level::of(p, c.map(|c| c.p_value), t),
                accuracy: None,
            });
        };
        let empty = FeatureSketch::default();
        for (i, (f, live)) in b.features.iter().zip(&m.live.features).enumerate() {
            let (name, base) = reference_counts(f);
            let expected = match &reference {
                Some(r) => &r.features.get(i).unwrap_or(&empty).counts[..],
                None => base,
            };
            push(
                name,
                expected,
                &live.counts,
                live.missing,
                live.out_of_range,
            );
        }
        if !b.predictions.is_empty() {
            let expected = reference
                .as_ref()
                .map_or(&b.predictions[..], |r| &r.predictions);
            push(PREDICTIONS, expected, &m.live.predictions, 0, 0);
        }
    }
    out
}

/// Reference windows to record from this window's sketches: for every model in
/// `eligible` (digest → when a rollout of it completed healthy) whose rollout completed
/// before the window started, every group scope without a reference yet whose merged
/// sketch holds at least `min_rows` observations.
pub fn new_references(
    sketches: &[SketchRow],
    group_by: &[String],
    existing: &References,
    eligible: &BTreeMap<[u8; 32], u64>,
    window: (u64, u64),
    min_rows: u64,
) -> References {
    let mut merged = References::new();
    for s in sketches {
        if eligible
            .get(&s.model_digest)
            .is_none_or(|done| *done > window.0)
        {
            continue;
        }
        for g in groups_of(s, group_by) {
            let key = (s.model_digest, g);
            if !existing.contains_key(&key) {
                merged
                    .entry(key)
                    .or_default()
                    .add(&s.features, &s.predictions);
            }
        }
    }
    merged.retain(|_, sk| min_rows > 0 && sk.rows() >= min_rows);
    merged
}

/// Worst level of a scope's scores in one window.
pub fn worst(scores: &[Score]) -> Level {
    scores.iter().map(|s| s.level).max().unwrap_or(Level::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_identical_proportions_and_none_for_empty_sides() {
        assert_eq!(psi(&[10, 20, 30], &[1, 2, 3], PSI_EPSILON), Some(0.0));
        assert_eq!(psi(&[0, 0], &[1, 2], PSI_EPSILON), None);
        assert_eq!(psi(&[1, 2], &[0, 0], PSI_EPSILON), None);
        // An empty live bin is floored, not infinite.
        let p = psi(&[50, 50], &[100, 0], PSI_EPSILON).unwrap_or(f64::NAN);
        assert!(p.is_finite() && p > 1.0, "{p}");
    }

    #[test]
    fn chi_square_needs_two_non_empty_bins() {
        assert_eq!(chi_square(&[5, 0], &[7, 0]), None);
        let c = chi_square(&[50, 50], &[50, 50]);
        assert_eq!(
            c.map(|c| (c.statistic, c.dof, c.p_value)),
            Some((0.0, 1, 1.0))
        );
    }

    #[test]
    fn a_high_psi_on_a_small_sample_is_not_drift_until_it_is_significant() {
        let t = Thresholds::default();
        // 10 live rows, 8 in one bin: PSI (0.42) is above the alert level by chance alone.
        let (e, small) = ([500, 500], [8, 2]);
        let p = psi(&e, &small, PSI_EPSILON);
        let c = chi_square(&e, &small).map(|c| c.p_value);
        assert!(p.is_some_and(|p| p >= t.psi_alert), "{p:?}");
        assert!(c.is_some_and(|c| c > t.max_p_value), "{c:?}");
        assert_eq!(Level::of(p, c, &t), Level::Ok);
        // The same proportions over 1,000 rows are significant: alert.
        let big = [800, 200];
        let p = psi(&e, &big, PSI_EPSILON);
        let c = chi_square(&e, &big).map(|c| c.p_value);
        assert_eq!(Level::of(p, c, &t), Level::Alert, "{p:?} {c:?}");
        // A stricter significance keeps a moderately significant sample at ok.
        let mid = [24, 6];
        let p = psi(&e, &mid, PSI_EPSILON);
        let c = chi_square(&e, &mid).map(|c| c.p_value);
        assert!(c.is_some_and(|c| c < 0.01 && c > 1e-6), "{c:?}");
        assert_eq!(Level::of(p, c, &t), Level::Alert);
        let strict = Thresholds {
            max_p_value: 1e-6,
            ..t
        };
        assert_eq!(Level::of(p, c, &strict), Level::Ok);
    }

    fn baseline() -> Baseline {
        Baseline {
            rows: 100,
            features: vec![FeatureBaseline::Numeric {
                name: "x".into(),
                edges: vec![0.0],
                counts: vec![50, 50],
                min: -1.0,
                max: 1.0,
            }],
            predictions: vec![50, 50],
        }
    }

    #[test]
    fn one_drifting_site_alerts_its_group_and_device_but_not_the_other_site() {
        let d = [7u8; 32];
        let bl = BTreeMap::from([(d, baseline())]);
        let row = |dev: &str, site: &str, counts: Vec<u64>| SketchRow {
            device: dev.into(),
            labels: BTreeMap::from([("site".into(), site.into())]),
            model_digest: d,
            window_end_ms: 10,
            features: vec![FeatureSketch {
                counts,
                missing: 0,
                out_of_range: 0,
            }],
            predictions: vec![10, 10],
        };
        let rows = vec![
            row("a1", "a", vec![10, 10]),
            row("a2", "a", vec![11, 9]),
            row("b1", "b", vec![1, 19]),
        ];
        let scores = score_window(
            &bl,
            &rows,
            &["site".into()],
            (0, 10),
            &Thresholds::default(),
        );
        let level = |scope: &str| {
            worst(
                &scores
                    .iter()
                    .filter(|s| s.scope == scope)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(level("site=b"), Level::Alert);
        assert_eq!(level("device:b1"), Level::Alert);
        assert_eq!(level("site=a"), Level::Ok);
        assert_eq!(level("device:a1"), Level::Ok);
    }

    #[test]
    fn a_group_with_a_reference_window_is_scored_against_it_and_clears() {
        let d = [7u8; 32];
        let bl = BTreeMap::from([(d, baseline())]);
        let row = |dev: &str, site: &str, counts: Vec<u64>| SketchRow {
            device: dev.into(),
            labels: BTreeMap::from([("site".into(), site.into())]),
            model_digest: d,
            window_end_ms: 10,
            features: vec![FeatureSketch {
                counts: counts.clone(),
                missing: 0,
                out_of_range: 0,
            }],
            predictions: counts,
        };
        let group_by = ["site".to_owned()];
        let t = Thresholds::default();
        // Site b runs a different mix than the baseline (20/80 against 50/50).
        let first = vec![
            row("a1", "a", vec![100, 100]),
            row("b1", "b", vec![40, 160]),
        ];
        let scores = score_window(&bl, &first, &group_by, (0, 10), &t);
        let level = |scores: &[Score], scope: &str| {
            worst(
                &scores
                    .iter()
                    .filter(|s| s.scope == scope)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(level(&scores, "site=b"), Level::Alert);
        // A rollout of the model completed at 5: windows starting before it record
        // nothing; the next window records one reference per group with enough rows.
        let done = BTreeMap::from([(d, 5)]);
        let none = new_references(&first, &group_by, &References::new(), &done, (0, 10), 100);
        assert!(none.is_empty(), "{none:?}");
        let refs = new_references(&first, &group_by, &References::new(), &done, (5, 10), 100);
        assert_eq!(
            refs.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["site=a", "site=b"]
        );
        assert!(
            new_references(&first, &group_by, &References::new(), &done, (5, 10), 201).is_empty(),
            "too few rows for a reference"
        );
        assert!(new_references(&first, &group_by, &refs, &done, (5, 10), 100).is_empty());
        // Against its reference, site b is ok (and so are its device and the fleet); a
        // change at site b from there still alerts, and site a is untouched.
        let same = vec![row("a1", "a", vec![95, 105]), row("b1", "b", vec![42, 158])];
        let scores = score_window_with(&bl, &refs, &same, &group_by, (10, 20), &t);
        for scope in ["site=a", "site=b", "device:b1", "fleet"] {
            assert_eq!(level(&scores, scope), Level::Ok, "{scope}: {scores:?}");
        }
        let moved = vec![row("a1", "a", vec![95, 105]), row("b1", "b", vec![160, 40])];
        let scores = score_window_with(&bl, &refs, &moved, &group_by, (20, 30), &t);
        assert_eq!(level(&scores, "site=b"), Level::Alert);
        assert_eq!(level(&scores, "device:b1"), Level::Alert);
        assert_eq!(level(&scores, "site=a"), Level::Ok);
        // A device of a group without a reference keeps the fleet on the baseline.
        let only_b = References::from([(
            (d, "site=b".to_owned()),
            refs[&(d, "site=b".to_owned())].clone(),
        )]);
        let scores = score_window_with(&bl, &only_b, &same, &group_by, (10, 20), &t);
        assert_eq!(level(&scores, "site=b"), Level::Ok);
        let on_baseline = score_window(&bl, &same, &group_by, (10, 20), &t);
        let fleet = |s: &[Score]| {
            s.iter()
                .filter(|s| s.scope == "fleet")
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(fleet(&scores), fleet(&on_baseline));
        assert_eq!(level(&scores, "fleet"), Level::Warn, "{scores:?}");
    }
}
