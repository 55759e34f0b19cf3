//! The training gate's statistics against values computed independently with numpy/scipy
//! (`fixtures/gate/make_fixture.py`, output committed as `fixtures/gate/cases.json`): the
//! training gate's, and the accuracy monitoring's per-scope intervals and live-accuracy
//! gate's interval of a difference.

use std::collections::BTreeMap;

use drover_control_plane::drift::accuracy::{
    difference_interval, score_accuracy, AccuracyRules, Labelled,
};
use drover_control_plane::stats::{normal_quantile, paired_difference, wilson};
use serde::Deserialize;

#[derive(Deserialize)]
struct Quantile {
    p: f64,
    z: f64,
}

#[derive(Deserialize)]
struct Wilson {
    k: u64,
    n: u64,
    confidence: f64,
    low: f64,
    high: f64,
}

#[derive(Deserialize)]
struct Paired {
    a: Vec<bool>,
    b: Vec<bool>,
    confidence: f64,
    mean: f64,
    lower_bound: f64,
}

#[derive(Deserialize)]
struct AccuracyRow {
    device: String,
    site: String,
    right: bool,
}

#[derive(Deserialize)]
struct AccuracyScope {
    scope: String,
    correct: u64,
    n: u64,
    low: f64,
    high: f64,
}

#[derive(Deserialize)]
struct AccuracyCase {
    confidence: f64,
    rows: Vec<AccuracyRow>,
    scopes: Vec<AccuracyScope>,
}

#[derive(Deserialize)]
struct Difference {
    a: (u64, u64),
    b: (u64, u64),
    confidence: f64,
    low: f64,
    high: f64,
}

#[derive(Deserialize)]
struct Fixture {
    quantiles: Vec<Quantile>,
    wilson: Vec<Wilson>,
    paired: Vec<Paired>,
    accuracy: AccuracyCase,
    difference: Vec<Difference>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gate/cases.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-3)
}

#[test]
fn normal_quantiles_match_scipy() {
    for q in fixture().quantiles {
        let got = normal_quantile(q.p);
        assert!(close(got, q.z, 1e-8), "p={} got {got} want {}", q.p, q.z);
    }
}

#[test]
fn wilson_intervals_match_scipy_binomtest() {
    for w in fixture().wilson {
        let (low, high) = wilson(w.k, w.n, w.confidence);
        assert!(
            close(low, w.low, 1e-7) && close(high, w.high, 1e-7),
            "{}/{} at {}: got ({low}, {high}) want ({}, {})",
            w.k,
            w.n,
            w.confidence,
            w.low,
            w.high
        );
    }
}

#[test]
fn paired_bounds_match_numpy() {
    for p in fixture().paired {
        let got = paired_difference(&p.a, &p.b, p.confidence).unwrap();
        assert_eq!(got.rows, p.a.len() as u64);
        assert!(
            (got.mean - p.mean).abs() < 1e-12,
            "mean {} vs {}",
            got.mean,
            p.mean
        );
        assert!(
            (got.lower_bound - p.lower_bound).abs() < 1e-8,
            "n={} bound {} vs {}",
            p.a.len(),
            got.lower_bound,
            p.lower_bound
        );
    }
    assert_eq!(paired_difference(&[], &[], 0.95), None);
}

#[test]
fn accuracy_per_scope_matches_scipy_wilson() {
    let case = fixture().accuracy;
    let rows: Vec<Labelled> = case
        .rows
        .iter()
        .map(|r| Labelled {
            device: r.device.clone(),
            labels: BTreeMap::from([("site".to_owned(), r.site.clone())]),
            model_digest: [1; 32],
            // Predicted class 1; the label says whether that was right.
            prediction: vec![0.1, 0.9],
            label: if r.right { 1.0 } else { 0.0 },
        })
        .collect();
    let rules = AccuracyRules {
        floors: BTreeMap::new(),
        confidence: case.confidence,
        min_labels: 1,
    };
    let mut got = score_accuracy(&rows, &["site".to_owned()], (0, 1), &rules);
    got.sort_by(|a, b| a.scope.cmp(&b.scope));
    assert_eq!(
        got.iter().map(|s| s.scope.as_str()).collect::<Vec<_>>(),
        case.scopes
            .iter()
            .map(|s| s.scope.as_str())
            .collect::<Vec<_>>()
    );
    for (g, want) in got.iter().zip(&case.scopes) {
        let a = g.accuracy.unwrap();
        assert_eq!(
            (a.correct, g.count),
            (want.correct, want.n),
            "{}",
            want.scope
        );
        assert!(
            close(a.low, want.low, 1e-7) && close(a.high, want.high, 1e-7),
            "{}: got ({}, {}) want ({}, {})",
            want.scope,
            a.low,
            a.high,
            want.low,
            want.high
        );
    }
}

#[test]
fn live_accuracy_difference_interval_matches_newcombe_from_scipy() {
    for d in fixture().difference {
        let (low, high) = difference_interval(d.a, d.b, d.confidence).unwrap();
        assert!(
            (low - d.low).abs() < 1e-7 && (high - d.high).abs() < 1e-7,
            "{:?} vs {:?}: got ({low}, {high}) want ({}, {})",
            d.a,
            d.b,
            d.low,
            d.high
        );
    }
    assert_eq!(difference_interval((0, 0), (1, 2), 0.95), None);
}
