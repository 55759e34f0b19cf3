//! No command the control plane cannot deliver is ever issued (issue 16): a model whose
//! deploy command would exceed the downlink limit is refused at publish with the figures
//! and what to do; one already in the registry (published before the check) is refused at
//! deploy and at rollout start, before a command exists, never "sent" and then lost.

mod common;

use common::*;
use drover_protocol::envelope::{MAX_DOWNLINK_LEN, MAX_MANIFEST_LEN};
use serde_json::json;

/// A test vector for `dense_model(8, 3, ..)` with `rows` rows of zeros: the output is the
/// bias, so the publish-time self-test passes and only the size can refuse it.
fn zero_vector(rows: usize) -> serde_json::Value {
    let out: Vec<f32> = (0..rows).flat_map(|_| [0.0, 0.1, 0.2]).collect();
    json!({
        "inputs": [{"name": "x", "shape": [rows, 8], "data": {"F32": vec![0.0f32; rows * 8]}}],
        "outputs": [{"name": "y", "shape": [rows, 3], "data": {"F32": out}}],
        "tolerance": 1e-4,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_large_to_deploy_is_refused_at_publish_deploy_and_rollout_with_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    api.enroll("gw-1", &[("site", "a")]).await;
    let model = hex::encode(dense_model(8, 3, 5, "MatMul"));

    // 4.4 MB of explicit vectors: refused at publish, naming sizes and the fix.
    let rows = 100_000;
    let (status, e) = api
        .post(
            "/v1/models",
            &json!({"name": "big", "version": "1.0.0", "model_hex": model,
                    "test_vectors": [zero_vector(rows)]}),
        )
        .await;
    assert_eq!(status, 422, "{e}");
    let msg = e["error"].as_str().unwrap();
    for part in [
        MAX_DOWNLINK_LEN.to_string(),
        MAX_MANIFEST_LEN.to_string(),
        "its test vectors take".into(),
        "--test-vectors".into(),
    ] {
        assert!(msg.contains(&part), "{part:?} missing: {msg}");
    }
    // Small vectors publish.
    let (status, e) = api
        .post(
            "/v1/models",
            &json!({"name": "big", "version": "1.0.0", "model_hex": model,
                    "test_vectors": [zero_vector(4)]}),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    server.shutdown().await;

    // A row that got in before publish checked the size (its payload grown past the
    // limit, as an old registry could hold it).
    let db = dir.path().join(drover_control_plane::app::paths::DB_FILE);
    {
        let mut store = drover_control_plane::store::Store::open(&db).unwrap();
        let mut row = store.model("big", "1.0.0").unwrap().unwrap();
        row.version = "2.0.0".into();
        row.payload.resize(MAX_MANIFEST_LEN + 1, 0);
        row.digest = drover_protocol::trust::sha256(&row.payload);
        store.insert_model(&row).unwrap();
    }
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let (status, e) = api
        .post("/v1/devices/gw-1/deploy", &json!({"model": "big@2.0.0"}))
        .await;
    assert_eq!(status, 413, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{} bytes", MAX_MANIFEST_LEN + 1))
            && msg.contains("nothing was sent")
            && msg.contains("Republish"),
        "{msg}"
    );
    let commands = api.get("/v1/devices/gw-1/commands").await;
    assert_eq!(commands, json!([]), "no command was issued");
    let (status, e) = api
        .post(
            "/v1/rollouts",
            &json!({"model": "big@2.0.0", "selector": "site=a", "waves": [{"percent": 100}]}),
        )
        .await;
    assert_eq!(status, 413, "{e}");
    assert_eq!(api.get("/v1/rollouts").await, json!([]));
    // The model that fits still deploys.
    let (status, e) = api
        .post("/v1/devices/gw-1/deploy", &json!({"model": "big@1.0.0"}))
        .await;
    assert_eq!(status, 200, "{e}");
    server.shutdown().await;
}
