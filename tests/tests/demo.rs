//! `drover demo` (README's first command) runs the whole embedded default to the end and
//! reports what happened: a failing step anywhere in the loop fails this test.

use drover_tests::workspace_bin;

#[test]
fn demo_runs_end_to_end_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report.md");
    let out = std::process::Command::new(workspace_bin("drover").unwrap())
        .args([
            "demo",
            "--devices",
            "4",
            "--requests",
            "5",
            "--seed",
            "3",
            "--report",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drover demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&report).unwrap();
    for want in [
        "4 devices across 2 sites, seed 3",
        "failure-predictor@1.0.0",
        "live accuracy, plant-a",
        "live accuracy, plant-b",
        "| inferences reported in telemetry | 20 |",
    ] {
        assert!(text.contains(want), "report lacks {want:?}:\n{text}");
    }
    // The trained model is useful, not a constant: held-out accuracy is reported and high.
    let acc: f64 = text
        .lines()
        .find(|l| l.starts_with("| accuracy, held-out history"))
        .and_then(|l| l.split('|').nth(2))
        .and_then(|v| v.trim().trim_end_matches('%').trim().parse().ok())
        .unwrap();
    assert!(acc > 80.0, "held-out accuracy {acc} %");
}

#[test]
fn demo_refuses_a_bad_device_count_with_a_clear_error() {
    let out = std::process::Command::new(workspace_bin("drover").unwrap())
        .args(["demo", "--devices", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--devices must be between 1 and 2000"),
        "{err}"
    );
}
