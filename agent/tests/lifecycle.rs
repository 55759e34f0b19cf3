//! Model lifecycle beyond a plain deploy: configure, drift sketches against the manifest
//! baseline, sampled inputs, shadow mode with agreement reports, promote, and models
//! refused at self-test (wrong outputs, an operator tract lacks) while the old one serves.

mod common;

use common::*;
use drover_protocol::manifest::{Baseline, FeatureBaseline};
use drover_protocol::messages::{Action, AgentSettings, DeployMode, ModelRef, Phase, Uplink};

async fn infer_version(base: &str, body: &serde_json::Value) -> String {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/v2/models/dense/infer"))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["model_version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_drift_samples_shadow_promote_and_self_test_refusals() {
    let mut h = Harness::start("gw-life", |_| {}).await;
    let base = h.base.clone();

    // Configure: fast telemetry, sample everything.
    let c = h
        .command(Action::Configure(AgentSettings {
            telemetry_interval_ms: 200,
            sample_rate_ppm: 1_000_000,
        }))
        .await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;

    // v1 with a training baseline: 16 numeric features, 4 bins each.
    let mut v1 = publish(&h.keys, "dense_v1", "dense", "1.0.0", 2048);
    v1.manifest.baseline = Some(Baseline {
        rows: 100,
        features: (0..16)
            .map(|i| FeatureBaseline::Numeric {
                name: format!("f{i}"),
                edges: vec![-1.0, 0.0, 1.0],
                counts: vec![16, 34, 34, 16],
                min: -4.0,
                max: 4.0,
            })
            .collect(),
        predictions: vec![30, 40, 30],
    });
    v1.blob = h.keys.signer.sign_manifest(&v1.manifest);
    let c = h.deploy(&v1, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    let (inputs, _) = reference("dense_v1");
    let body = infer_body(&inputs);
    for _ in 0..5 {
        assert_eq!(infer_version(&base, &body).await, "1.0.0");
    }
    // Drift sketches count the 10 rows into the baseline's bins.
    let rows =
        h.cp.wait_for("drift reports covering 10 rows", |s| {
            let rows: u64 = s
                .frames
                .iter()
                .filter_map(|f| match &f.msg {
                    Uplink::Drift(d) => {
                        assert_eq!(d.features.len(), 16);
                        assert_eq!(d.features[0].counts.len(), 4);
                        Some(d.features[0].counts.iter().sum::<u64>() + d.features[0].missing)
                    }
                    _ => None,
                })
                .sum();
            (rows >= 10).then_some(rows)
        })
        .await;
    assert_eq!(rows, 10);
    h.cp.wait_for("samples", |s| {
        s.frames.iter().find_map(|f| match &f.msg {
            Uplink::Samples(b) if b.samples.iter().any(|x| x.features.len() == 32) => Some(()),
            _ => None,
        })
    })
    .await;

    // Shadow: v2 runs beside v1 and agreement is reported; v1 still answers.
    let v2 = publish(&h.keys, "dense_v2", "dense", "2.0.0", 2048);
    let c = h.deploy(&v2, DeployMode::Shadow).await;
    h.cp.wait_phase(c.digest(), Phase::Shadowing).await;
    for _ in 0..5 {
        assert_eq!(infer_version(&base, &body).await, "1.0.0");
    }
    let report =
        h.cp.wait_for("shadow report", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Shadow(r) if r.compared > 0 => Some(r.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(report.candidate.version, "2.0.0");
    assert_eq!(report.active.version, "1.0.0");
    assert_eq!(report.candidate_errors, 0);
    // The metrics listener counts the comparisons and times the candidate apart; no
    // download is left open once the shadow is loaded.
    let text = reqwest::get(format!("{}/metrics", h.metrics_base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(value("drover_agent_shadow_compared_total") >= 5.0, "{text}");
    assert_eq!(value("drover_agent_shadow_candidate_errors_total"), 0.0);
    assert!(
        value("drover_agent_inference_duration_seconds_count{model=\"dense\",version=\"2.0.0\",role=\"shadow\"}")
            >= 5.0
    );
    assert_eq!(value("drover_agent_download_chunks"), 0.0);
    assert!(value("drover_agent_self_test_seconds") > 0.0);

    // A rollback (an aborted rollout) drops the shadow, on disk too; v1 keeps serving.
    let v1_ref = ModelRef {
        name: "dense".into(),
        version: "1.0.0".into(),
        digest: v1.digest(),
    };
    let c = h.command(Action::Rollback { to: Some(v1_ref) }).await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.dir.path().join("state.json")).unwrap()).unwrap();
    assert!(
        state["shadow"].is_null(),
        "shadow kept: {}",
        state["shadow"]
    );
    for _ in 0..5 {
        assert_eq!(infer_version(&base, &body).await, "1.0.0");
    }

    // Shadow again, then promote: the shadow becomes active.
    let c = h.deploy(&v2, DeployMode::Shadow).await;
    h.cp.wait_phase(c.digest(), Phase::Shadowing).await;
    let c = h.command(Action::Promote).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    assert_eq!(infer_version(&base, &body).await, "2.0.0");

    // A model whose outputs do not match its own test vectors is refused at self-test.
    let mut wrong = publish(&h.keys, "dense_v1", "dense", "3.0.0", 2048);
    wrong.manifest.test_vectors[0].outputs = reference("dense_v2").1;
    wrong.blob = h.keys.signer.sign_manifest(&wrong.manifest);
    let c = h.deploy(&wrong, DeployMode::Activate).await;
    let p =
        h.cp.wait_for("self-test failure", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p)
                    if p.command_digest == c.digest() && p.phase == Phase::Failed =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
        })
        .await;
    assert!(p
        .detail
        .unwrap()
        .starts_with("self-test failed: self-test vector 0"));
    assert_eq!(infer_version(&base, &body).await, "2.0.0");

    // Sampled vectors are checked as well (issue 16): dense_v2's, signed into dense_v1's
    // manifest beside its correct full vector, fail the self-test.
    let mut wrong = publish(&h.keys, "dense_v1", "dense", "3.1.0", 2048);
    let other =
        drover_runtime::Model::load(&std::fs::read(fixture("dense_v2.onnx")).unwrap()).unwrap();
    let inputs = wrong.manifest.test_vectors[0]
        .inputs
        .iter()
        .map(|t| drover_protocol::manifest::PatternInput {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: drover_protocol::manifest::DType::F32,
            seed: 1,
        })
        .collect();
    let sampled = drover_runtime::sampled::sampled_vector(&other, inputs)
        .unwrap()
        .unwrap();
    wrong.manifest.sampled_vectors = vec![sampled];
    wrong.blob = h.keys.signer.sign_manifest(&wrong.manifest);
    let c = h.deploy(&wrong, DeployMode::Activate).await;
    let p =
        h.cp.wait_for("sampled self-test failure", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p)
                    if p.command_digest == c.digest() && p.phase == Phase::Failed =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
        })
        .await;
    let detail = p.detail.unwrap();
    assert!(
        detail.starts_with("self-test failed: self-test vector 0") && detail.contains("scale"),
        "{detail}"
    );
    assert_eq!(infer_version(&base, &body).await, "2.0.0");

    // A model needing an operator the runtime lacks (an skl2onnx SVC) is refused naming it.
    let scaler = publish(&h.keys, "../sklearn/svm_refused", "dense", "4.0.0", 1024);
    let c = h.deploy(&scaler, DeployMode::Activate).await;
    let p =
        h.cp.wait_for("unsupported operator", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p)
                    if p.command_digest == c.digest() && p.phase == Phase::Failed =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
        })
        .await;
    assert!(p.detail.unwrap().contains("ai.onnx.ml:SVMClassifier"));
    assert_eq!(infer_version(&base, &body).await, "2.0.0");
    h.stop().await;
}
