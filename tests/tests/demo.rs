//! `drover demo` (README's first command) plays the whole loop on the embedded default;
//! this test runs it with a small fleet and checks the outcomes its report states: drift
//! only at the retrofitted site, a retrained model published, shadowed and rolled out by
//! the policy, accuracy there recovering, and its drift alert clearing.

use drover_tests::workspace_bin;
use serde_json::Value;

fn accuracy(report: &Value, phase: &str, site: &str) -> (f64, u64) {
    let row = report["accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["phase"] == phase && a["site"] == site)
        .unwrap_or_else(|| panic!("no {phase} accuracy for {site}: {report}"));
    (
        row["accuracy"].as_f64().unwrap(),
        row["served"].as_u64().unwrap(),
    )
}

#[test]
fn demo_closes_the_loop_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let md = tmp.path().join("report.md");
    let out = std::process::Command::new(workspace_bin("drover").unwrap())
        .args(["demo", "--devices", "6", "--seed", "3", "--report"])
        .arg(&md)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drover demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.starts_with("# Drover demo report"), "{text}");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(md.with_extension("json")).unwrap()).unwrap();
    eprintln!("{text}");

    // Drift was detected at the retrofitted site only.
    assert_eq!(r["shifted_site"], "plant-b");
    assert_eq!(r["alerting_sites"], serde_json::json!(["plant-b"]), "{r}");
    assert_eq!(r["alerting_devices"]["plant-a"], 0, "{r}");
    assert!(
        r["alerting_devices"]["plant-b"].as_u64().unwrap() >= 1,
        "{r}"
    );
    assert!(r["retraining_trigger"]
        .as_str()
        .is_some_and(|t| t.starts_with("drift:")));

    // The first model came from a job; the retrained one from the drift trigger, gated
    // against it, signed and registered with its lineage.
    let models = r["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{r}");
    assert_eq!(models[0]["model"], "failure-predictor@1.0.0");
    assert_eq!(models[1]["model"], "failure-predictor@1.0.1");
    assert_eq!(models[1]["parent"], "failure-predictor@1.0.0");
    assert!(models[1]["trigger"]
        .as_str()
        .is_some_and(|t| t.starts_with("drift:")));
    assert!(
        models[1]["recent_accuracy"].as_f64().unwrap()
            > models[1]["champion_recent_accuracy"].as_f64().unwrap(),
        "{r}"
    );

    // Rolled out: the first by the operator in waves, the retrained one by the policy,
    // with a shadow phase on its canary.
    let rollouts = r["rollouts"].as_array().unwrap();
    assert_eq!(rollouts.len(), 2, "{r}");
    assert_eq!(rollouts[0]["status"], "completed");
    assert_eq!(rollouts[0]["waves"].as_array().map(Vec::len), Some(3));
    assert_eq!(rollouts[1]["model"], "failure-predictor@1.0.1");
    assert_eq!(rollouts[1]["status"], "completed");
    assert_eq!(rollouts[1]["started_by"], "continuous-training");
    assert!(rollouts[1]["shadow_agreement"].as_f64().is_some(), "{r}");

    // The alert that started the retraining clears once the retrained model is live: the
    // last window plant-b was scored with it is at ok (against its reference window),
    // after windows with it at alert against the mixed baseline; plant-a never alerted.
    assert!(r["alert_cleared_after_secs"].as_f64().is_some(), "{r}");
    let windows = r["drift_windows"].as_array().unwrap();
    let b_new: Vec<&str> = windows
        .iter()
        .filter(|w| w["site"] == "plant-b" && w["model"] == "failure-predictor@1.0.1")
        .map(|w| w["level"].as_str().unwrap())
        .collect();
    assert_eq!(b_new.last(), Some(&"ok"), "{b_new:?}");
    assert!(
        windows
            .iter()
            .all(|w| w["site"] != "plant-a" || w["level"] != "alert"),
        "{r}"
    );

    // The site's accuracy: fine before the retrofit, wrong under drift, recovered after
    // retraining; the other site was never disturbed.
    let (no_drift, _) = accuracy(&r, "no drift", "plant-b");
    let (under, n_under) = accuracy(&r, "under drift", "plant-b");
    let (after, n_after) = accuracy(&r, "after retraining", "plant-b");
    let (stable, _) = accuracy(&r, "no drift", "plant-a");
    assert!(n_under > 0 && n_after > 0);
    assert!(
        after > under + 0.1 && after > 0.8,
        "plant-b: under drift {under}, after retraining {after}"
    );
    assert!(no_drift > under && stable > 0.8, "{r}");

    // Two models on every gateway (issue 17): the companion in its own slot and rollout,
    // asked with every reading; none of its requests failed either (counted below).
    assert_eq!(r["companion_model"], "pump-anomaly@1.0.0", "{r}");
    assert_eq!(r["models_per_device"], 2, "{r}");

    // Telemetry: every answered request was counted and stored; none failed.
    let t = &r["telemetry"];
    assert_eq!(t["requests_failed"], 0, "{r}");
    assert!(t["requests_answered"].as_u64().unwrap() > 0);
    assert!(t["inferences_stored"].as_u64() >= t["requests_answered"].as_u64());
}

#[test]
fn demo_refuses_a_bad_device_count_with_a_clear_error() {
    let out = std::process::Command::new(workspace_bin("drover").unwrap())
        .args(["demo", "--devices", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--devices must be between 2 and 2000"),
        "{err}"
    );
}
