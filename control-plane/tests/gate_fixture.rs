//! The training gate's statistics against values computed independently with numpy/scipy
//! (`fixtures/gate/make_fixture.py`, output committed as `fixtures/gate/cases.json`).

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
struct Fixture {
    quantiles: Vec<Quantile>,
    wilson: Vec<Wilson>,
    paired: Vec<Paired>,
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
