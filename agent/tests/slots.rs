//! Named model slots (issue 17) on a real agent, over a real broker against the scripted
//! control plane: a state file of the single-model release keeps serving after the
//! upgrade; two models served side by side, one hot-swapped under load while the other
//! sees no failed request; the `[models]` budget refused before download; `RemoveModel`
//! frees the slot and its files; the `Models` report under protocol 2 only.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drover_protocol::messages::{Action, DeployMode, ModelsReport, Phase, Uplink};
use drover_protocol::topics::hex32;

fn models_reports(s: &Seen) -> Vec<ModelsReport> {
    s.frames
        .iter()
        .filter_map(|f| match &f.msg {
            Uplink::Models(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

async fn infer_status(base: &str, name: &str, body: &serde_json::Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v2/models/{name}/infer"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap();
    (
        status,
        v["model_version"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Waits (a guard against hangs, not a timed assertion) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_file_of_the_single_model_release_keeps_serving_and_is_reported_under_protocol_2() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::copy(
        fixture.join("state-v1/state.json"),
        dir.path().join("state.json"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
    for f in ["dense_v1", "dense_v2"] {
        let bytes = std::fs::read(fixture.join(format!("{f}.onnx"))).unwrap();
        let name = format!("{}.onnx", hex32(&drover_protocol::trust::sha256(&bytes)));
        std::fs::write(dir.path().join("blobs").join(name), bytes).unwrap();
    }
    let setup = |b: &mut Behaviour| b.protocol = 2;
    let mut h = Harness::start_in(dir, "gw-old", |_| {}, Duration::from_millis(200), setup).await;
    h.next_seq = 3;
    // It serves the model the old release served, as before.
    let (inputs, outputs) = reference("dense_v2");
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/dense/infer", h.base))
        .json(&infer_body(&inputs))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["model_version"], "2.0.0");
    assert!(close(&first_output(&v), &f32s(&outputs[0])));
    // The hello names it (protocol 1 fields), and the Models report lists its slot.
    let hello =
        h.cp.wait_for("hello", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Hello(h) => Some(h.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(hello.active.map(|m| m.version), Some("2.0.0".into()));
    assert_eq!(hello.protocol_max, drover_protocol::PROTOCOL_VERSION);
    let report =
        h.cp.wait_for("models report", |s| models_reports(s).pop())
            .await;
    assert_eq!(report.slots.len(), 1);
    let slot = &report.slots[0];
    assert_eq!(slot.name, "dense");
    assert_eq!(slot.active.as_ref().unwrap().version, "2.0.0");
    assert_eq!(slot.previous.as_ref().unwrap().version, "1.0.0");
    // Its rollback target survived the migration: RollbackModel returns to 1.0.0.
    let c = h
        .command(Action::RollbackModel {
            model: "dense".into(),
            to: None,
        })
        .await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;
    let (status, version) = infer_status(&h.base, "dense", &infer_body(&inputs)).await;
    assert_eq!((status, version.as_str()), (200, "1.0.0"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swapping_model_a_three_times_fails_no_request_to_model_b() {
    let mut h = Harness::start("gw-two", |_| {}).await;
    let a1 = publish(&h.keys, "dense_v1", "dense", "1.0.0", 1024);
    let a2 = publish(&h.keys, "dense_v2", "dense", "2.0.0", 1024);
    let a3 = publish(&h.keys, "dense_v1", "dense", "3.0.0", 1024);
    let b = publish(&h.keys, "mlp", "other", "1.0.0", 1024);
    for m in [&a1, &b] {
        let c = h.deploy(m, DeployMode::Activate).await;
        h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    }
    let b_body = infer_body(&reference("mlp").0);
    let a_body = infer_body(&reference("dense_v1").0);
    let stop = Arc::new(AtomicBool::new(false));
    let (b_ok, b_failed, a_failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = Vec::new();
    for i in 0..4 {
        let (base, stop) = (h.base.clone(), stop.clone());
        let (ok, failed, a_failed) = (b_ok.clone(), b_failed.clone(), a_failed.clone());
        let (b_body, a_body) = (b_body.clone(), a_body.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Three clients on B, one on A by name (whatever version serves).
                if i == 3 {
                    if infer_status(&base, "dense", &a_body).await.0 != 200 {
                        a_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                match infer_status(&base, "other", &b_body).await {
                    (200, v) if v == "1.0.0" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for m in [&a2, &a3, &a2] {
        let before = b_ok.load(Ordering::Relaxed);
        let c = h.deploy(m, DeployMode::Activate).await;
        h.cp.wait_phase(c.digest(), Phase::Healthy).await;
        let (_, v) = infer_status(&h.base, "dense", &a_body).await;
        assert_eq!(v, m.version);
        // B was served while A changed.
        wait_until("requests to B", || {
            b_ok.load(Ordering::Relaxed) > before + 10
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(b_failed.load(Ordering::Relaxed), 0, "failed requests to B");
    assert_eq!(a_failed.load(Ordering::Relaxed), 0, "failed requests to A");
    assert!(b_ok.load(Ordering::Relaxed) > 30);
    // The repository index lists both models.
    let index: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v2/repository/index", h.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<(&str, &str)> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["version"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("dense", "2.0.0"), ("other", "1.0.0")]);
    // /metrics: one model_info per served model, inference counts per model.
    let metrics = reqwest::get(format!("{}/metrics", h.metrics_base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "drover_agent_model_info{name=\"dense\",version=\"2.0.0\"} 1",
        "drover_agent_model_info{name=\"other\",version=\"1.0.0\"} 1",
        "drover_agent_model_inference_errors_total{model=\"other\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let b_count: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("drover_agent_model_inferences_total{model=\"other\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(b_count >= b_ok.load(Ordering::Relaxed) as f64);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deploy_past_the_budget_is_refused_before_download_and_remove_frees_the_slot() {
    let a = publish(&Keys::new(), "dense_v1", "dense", "1.0.0", 1024);
    let b = publish(&Keys::new(), "mlp", "other", "1.0.0", 1024);
    let disk = a.manifest.size + b.manifest.size - 1;
    let mut h = Harness::start("gw-budget", |c| c.models.disk_bytes = disk).await;
    let c = h.deploy(&a, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    let c = h.deploy(&b, DeployMode::Activate).await;
    let refused = h.cp.wait_phase(c.digest(), Phase::Refused).await;
    let detail = refused.detail.unwrap();
    assert!(
        detail.starts_with("model \"other\" 1.0.0 needs ")
            && detail.ends_with("remove a model or raise [models] disk_bytes"),
        "{detail}"
    );
    // Refused before download: no chunk of B was ever asked for.
    let asked_b = |s: &Seen| s.chunk_requests.iter().any(|r| r.1 == b.digest());
    assert!(!asked_b(&h.cp.seen.lock().unwrap()));
    // Remove A: its slot, its model and its file go.
    let blob = h
        .dir
        .path()
        .join("blobs")
        .join(format!("{}.onnx", hex32(&a.manifest.sha256)));
    assert!(blob.exists());
    let c = h
        .command(Action::RemoveModel {
            model: "dense".into(),
        })
        .await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;
    wait_until("A's file collected", || !blob.exists()).await;
    let body = infer_body(&reference("dense_v1").0);
    // Nothing serves at all now: 503, as before any deploy (404 once another model serves).
    assert_eq!(infer_status(&h.base, "dense", &body).await.0, 503);
    // Now B fits.
    let c = h.deploy(&b, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    assert!(asked_b(&h.cp.seen.lock().unwrap()));
    let body = infer_body(&reference("mlp").0);
    assert_eq!(infer_status(&h.base, "other", &body).await.0, 200);
    let a_body = infer_body(&reference("dense_v1").0);
    assert_eq!(infer_status(&h.base, "dense", &a_body).await.0, 404);
    // The scripted control plane negotiated protocol 1: no Models report was ever sent.
    assert!(models_reports(&h.cp.seen.lock().unwrap()).is_empty());
    h.stop().await;
}
