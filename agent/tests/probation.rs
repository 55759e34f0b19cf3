//! A model that passes its self-test but fails on live traffic (here tract even panics)
//! is rolled back to the previous slot automatically at the end of its probation, and
//! the agent keeps serving throughout.

mod common;

use std::time::Duration;

use common::*;
use drover_protocol::messages::{DeployMode, Phase};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failing_live_requests_during_probation_is_rolled_back() {
    let mut h = Harness::start_with_probation("gw-probation", |_| {}, Duration::from_secs(3)).await;
    let v1 = publish(&h.keys, "dense_v1", "dense", "1.0.0", 4096);
    let c1 = h.deploy(&v1, DeployMode::Activate).await;
    h.cp.wait_phase(c1.digest(), Phase::Healthy).await;

    // fragile.onnx answers its test vector (inputs < 1) and fails on inputs >= 3.
    let bad = publish(&h.keys, "fragile", "dense", "2.0.0", 1024);
    let c2 = h.deploy(&bad, DeployMode::Activate).await;
    h.cp.wait_phase(c2.digest(), Phase::Active).await;
    let http = reqwest::Client::new();
    let batch2 = json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": vec![5.0f32; 32]}]});
    let url = format!("{}/v2/models/dense/infer", h.base);
    let mut server_errors = 0;
    for _ in 0..10 {
        let r = http.post(&url).json(&batch2).send().await.unwrap();
        if r.status() == 500 {
            let v: serde_json::Value = r.json().await.unwrap();
            // tract panics on this out-of-range Gather; the agent catches it per request.
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("tract panicked while running the model"),
                "{v}"
            );
            server_errors += 1;
        }
    }
    assert!(
        server_errors > 0,
        "the fragile model should have failed live requests"
    );

    let rolled =
        h.cp.wait_for("rollback", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                drover_protocol::messages::Uplink::Progress(p)
                    if p.command_digest == c2.digest() && p.phase == Phase::RolledBack =>
                {
                    Some(p.clone())
                }
                _ => None,
            })
        })
        .await;
    assert_eq!(rolled.model.unwrap().version, "1.0.0");
    assert!(rolled.detail.unwrap().contains("errors in"));
    let v: serde_json::Value = http
        .post(&url)
        .json(&batch2)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model_version"], "1.0.0");
    h.stop().await;
}
