//! `drover model publish` (the HTTP API behind it) with models exported by scikit-learn
//! tools: supported `ai.onnx.ml` families are accepted and self-tested against onnxruntime's
//! outputs; a still-unsupported operator is refused with its name, before anything is stored
//! or reaches a device. Fixtures: `agent/tests/sklearn/make_sklearn.py`.

mod common;

use std::path::PathBuf;

use common::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/sklearn")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// onnxruntime's inputs and outputs as a manifest test vector (`TensorData` is externally
/// tagged: `{"F32": [...]}`).
fn test_vector(name: &str) -> serde_json::Value {
    let doc: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
    let tensors = |v: &serde_json::Value| -> serde_json::Value {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t["name"],
                    "shape": t["shape"],
                    "data": { t["dtype"].as_str().unwrap(): t["data"] },
                })
            })
            .collect()
    };
    serde_json::json!({
        "inputs": tensors(&doc["inputs"]),
        "outputs": tensors(&doc["outputs"]),
        "tolerance": 1e-4,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_accepts_sklearn_families_and_refuses_unsupported_ml_operators_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);

    for (name, file, op) in [
        ("zipmap", "zipmap_refused.onnx", "ai.onnx.ml:ZipMap"),
        ("svm", "svm_refused.onnx", "ai.onnx.ml:SVMClassifier"),
    ] {
        let (status, body) = api
            .post(
                "/v1/models",
                &serde_json::json!({"name": name, "version": "1.0.0",
                                    "model_hex": hex::encode(fixture(file))}),
            )
            .await;
        assert_eq!(status, 422, "{name}: {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains(op), "{name}: {msg}");
    }
    assert_eq!(
        api.get("/v1/models").await.as_array().map(Vec::len),
        Some(0)
    );

    for family in ["scaler_logreg", "forest_clf", "lgbm_reg"] {
        let (status, body) = api
            .post(
                "/v1/models",
                &serde_json::json!({
                    "name": family.replace('_', "-"),
                    "version": "1.0.0",
                    "model_hex": hex::encode(fixture(&format!("{family}.onnx"))),
                    "test_vectors": [test_vector(&format!("{family}.json"))],
                }),
            )
            .await;
        assert_eq!(status, 201, "{family}: {body}");
        assert_eq!(body["summary"]["test_vectors"], 1, "{family}: {body}");
    }
    server.shutdown().await;
}
