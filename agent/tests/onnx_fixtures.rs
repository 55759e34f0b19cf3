//! Real ONNX models made by outside tools (skl2onnx, the onnx package; see
//! `fixtures/make_fixtures.py`) run through tract and match onnxruntime's outputs.

use std::path::PathBuf;

use drover_protocol::manifest::{DType, TensorData, TensorValue, TestVector};
use drover_runtime::{compare, self_test, Model, RuntimeError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensors(v: &serde_json::Value) -> Vec<TensorValue> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let data = t["data"].as_array().unwrap();
            let data = if t["dtype"] == "F32" {
                TensorData::F32(data.iter().map(|x| x.as_f64().unwrap() as f32).collect())
            } else {
                TensorData::I64(data.iter().map(|x| x.as_i64().unwrap()).collect())
            };
            TensorValue {
                name: t["name"].as_str().unwrap().to_owned(),
                shape,
                data,
            }
        })
        .collect()
}

/// Loads `name.onnx` and checks tract against onnxruntime's reference outputs.
fn matches_onnxruntime(name: &str, tolerance: f32) {
    let bytes = std::fs::read(fixture(&format!("{name}.onnx"))).unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{name}.json"))).unwrap()).unwrap();
    let model = Model::load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = tensors(&doc["inputs"]);
    let want = tensors(&doc["outputs"]);
    let got = model.run(&inputs).unwrap();
    for w in &want {
        let g = got.iter().find(|g| g.name == w.name).unwrap();
        compare(g, w, tolerance).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The same reference works as a manifest test vector.
    self_test(
        &model,
        &[TestVector {
            inputs,
            outputs: want,
            tolerance,
        }],
    )
    .unwrap();
}

#[test]
fn skl2onnx_random_forest_matches_onnxruntime() {
    matches_onnxruntime("forest", 1e-4);
}

#[test]
fn onnx_built_cnn_matches_onnxruntime() {
    matches_onnxruntime("cnn", 1e-4);
}

#[test]
fn skl2onnx_mlp_matches_onnxruntime() {
    matches_onnxruntime("mlp", 1e-4);
}

#[test]
fn dense_models_match_onnxruntime() {
    matches_onnxruntime("dense_v1", 1e-4);
    matches_onnxruntime("dense_v2", 1e-4);
}

#[test]
fn skl2onnx_scaler_logistic_regression_matches_onnxruntime() {
    // Needs ai.onnx.ml:Scaler and LinearClassifier, which tract lacks; ours (onnx_ml) run it.
    matches_onnxruntime("scaler_logreg", 1e-4);
}

#[test]
fn model_with_external_data_is_refused() {
    let bytes = std::fs::read(fixture("external_data.onnx")).unwrap();
    assert_eq!(
        Model::load(&bytes).unwrap_err(),
        RuntimeError::ExternalData { tensor: "w".into() }
    );
}

#[test]
fn truncated_model_is_refused_without_panicking() {
    let bytes = std::fs::read(fixture("dense_v1.onnx")).unwrap();
    for cut in [1, 100, bytes.len() / 2, bytes.len() - 3] {
        assert!(Model::load(&bytes[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn specs_describe_symbolic_batch_and_types() {
    let model = Model::load(&std::fs::read(fixture("dense_v1.onnx")).unwrap()).unwrap();
    assert_eq!(model.inputs().len(), 1);
    assert_eq!(model.inputs()[0].name, "x");
    assert_eq!(model.inputs()[0].dtype, DType::F32);
    assert_eq!(model.outputs()[0].name, "y");
    let bad = TensorValue {
        name: "x".into(),
        shape: vec![1, 15],
        data: TensorData::F32(vec![0.0; 15]),
    };
    assert!(matches!(
        model.run(&[bad]),
        Err(RuntimeError::InputShape { .. })
    ));
}
