//! Request bodies are bounded per route: a model upload may be large, every other route
//! takes at most `MAX_BODY_BYTES` and answers a larger body with 413 before storing
//! anything.

mod common;

use common::*;
use drover_control_plane::api::MAX_BODY_BYTES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_outside_model_upload_and_a_large_model_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    api.enroll("gw-1", &[("site", "a")]).await;

    let big = "x".repeat(MAX_BODY_BYTES + 1);
    let (status, _) = api
        .post(
            "/v1/devices/gw-1/labels",
            &serde_json::json!({"set": {"site": big}}),
        )
        .await;
    assert_eq!(status, 413);
    assert_eq!(
        api.device("gw-1").await["labels"]["site"],
        "a",
        "nothing stored"
    );

    // A model body over that limit is still taken by /v1/models.
    let model = dense_model(512, 300, 3, "MatMul");
    let body =
        serde_json::json!({"name": "big", "version": "1.0.0", "model_hex": hex::encode(&model)});
    assert!(
        body.to_string().len() > MAX_BODY_BYTES,
        "the test model is large enough"
    );
    let (status, published) = api.post("/v1/models", &body).await;
    assert_eq!(status, 201, "{published}");
}
