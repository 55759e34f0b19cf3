//! The drift statistics against values computed independently with numpy/scipy
//! (`fixtures/drift/make_fixture.py`, output committed as `fixtures/drift/cases.json`).

use drover_control_plane::drift::{chi2_sf, chi_square, psi};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    expected: Vec<u64>,
    actual: Vec<u64>,
    psi: f64,
    chi2: f64,
    dof: u32,
    p_value: f64,
}

#[derive(Deserialize)]
struct Sf {
    x: f64,
    k: f64,
    sf: f64,
}

#[derive(Deserialize)]
struct Fixture {
    epsilon: f64,
    cases: Vec<Case>,
    chi2_sf: Vec<Sf>,
}

fn close(got: f64, want: f64, what: &str) {
    let tol = 1e-12 + 1e-7 * want.abs();
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, scipy/numpy say {want:e}"
    );
}

fn fixture() -> Fixture {
    let text = include_str!("fixtures/drift/cases.json");
    serde_json::from_str(text).expect("fixture parses")
}

#[test]
fn psi_matches_numpy_on_every_fixture_case() {
    let f = fixture();
    assert!(f.cases.len() >= 20);
    for (n, c) in f.cases.iter().enumerate() {
        let got = psi(&c.expected, &c.actual, f.epsilon).expect("both sides non-empty");
        close(got, c.psi, &format!("case {n} psi"));
    }
}

#[test]
fn chi_square_statistic_dof_and_p_value_match_scipy() {
    let f = fixture();
    for (n, c) in f.cases.iter().enumerate() {
        let got = chi_square(&c.expected, &c.actual).expect("test defined");
        close(got.statistic, c.chi2, &format!("case {n} chi2"));
        assert_eq!(got.dof, c.dof, "case {n} dof");
        close(got.p_value, c.p_value, &format!("case {n} p-value"));
    }
}

#[test]
fn chi2_survival_function_matches_scipy() {
    for s in fixture().chi2_sf {
        close(
            chi2_sf(s.x, s.k),
            s.sf,
            &format!("chi2.sf({}, {})", s.x, s.k),
        );
    }
}
