//! Models exported by the real tools (scikit-learn + skl2onnx, LightGBM + onnxmltools; see
//! `sklearn/make_sklearn.py`) load through the agent's runtime, with our `ai.onnx.ml`
//! operators, and match onnxruntime's outputs on a fixed 16-row batch: floats within 1e-5
//! relative (1e-6 absolute near zero), labels exactly. The fixtures are committed, so these
//! tests need no Python; `make_sklearn.py --check` rebuilds and compares them.

use std::path::PathBuf;

use drover_protocol::manifest::{TensorData, TensorValue, TestVector};
use drover_runtime::{self_test, Model, RuntimeError};

const RELATIVE: f64 = 1e-5;
const ABSOLUTE: f64 = 1e-6;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sklearn")
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
                TensorData::F32(
                    data.iter()
                        .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
                        .collect(),
                )
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

/// Element-wise comparison within the relative tolerance; integers (labels) exactly.
fn assert_close(family: &str, got: &TensorValue, want: &TensorValue) {
    assert_eq!(
        got.shape, want.shape,
        "{family}: output {:?} shape",
        want.name
    );
    match (&got.data, &want.data) {
        (TensorData::F32(g), TensorData::F32(w)) => {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                let (a, b) = (f64::from(*a), f64::from(*b));
                let ok = (a - b).abs() <= RELATIVE * a.abs().max(b.abs()) + ABSOLUTE
                    || (a.is_nan() && b.is_nan());
                assert!(
                    ok,
                    "{family}: output {:?} element {i} is {a}, onnxruntime says {b}",
                    want.name
                );
            }
        }
        (TensorData::I64(g), TensorData::I64(w)) => {
            assert_eq!(g, w, "{family}: output {:?}", want.name)
        }
        _ => panic!("{family}: output {:?} has the wrong type", want.name),
    }
}

/// Loads `<family>.onnx` and checks every output against onnxruntime's, on the whole batch
/// and row by row (the batch axis is symbolic, so one plan serves every batch size).
fn matches_onnxruntime(family: &str) -> Vec<String> {
    let bytes = std::fs::read(fixture(&format!("{family}.onnx"))).unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{family}.json"))).unwrap())
            .unwrap();
    let model = Model::load(&bytes).unwrap_or_else(|e| panic!("{family}: {e}"));
    let inputs = tensors(&doc["inputs"]);
    let want = tensors(&doc["outputs"]);
    let got = model
        .run(&inputs)
        .unwrap_or_else(|e| panic!("{family}: {e}"));
    assert_eq!(got.len(), want.len(), "{family}: output count");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.name, w.name, "{family}: output order");
        assert_close(family, g, w);
    }
    // The first row alone gives the first row of every output.
    let row = |t: &TensorValue| -> TensorValue {
        let per_row: u64 = t.shape[1..].iter().product();
        let n = per_row as usize;
        TensorValue {
            name: t.name.clone(),
            shape: std::iter::once(1)
                .chain(t.shape[1..].iter().copied())
                .collect(),
            data: match &t.data {
                TensorData::F32(d) => TensorData::F32(d[..n].to_vec()),
                TensorData::I64(d) => TensorData::I64(d[..n].to_vec()),
            },
        }
    };
    let one: Vec<TensorValue> = inputs.iter().map(row).collect();
    let got_one = model.run(&one).unwrap_or_else(|e| panic!("{family}: {e}"));
    for (g, w) in got_one.iter().zip(&want) {
        assert_close(family, g, &row(w));
    }
    // And the reference doubles as a manifest test vector (what publish stores).
    self_test(
        &model,
        &[TestVector {
            inputs,
            outputs: want,
            tolerance: 1e-3,
        }],
    )
    .unwrap_or_else(|e| panic!("{family}: {e}"));
    doc["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_owned())
        .collect()
}

fn uses(ops: &[String], op: &str) {
    assert!(
        ops.iter().any(|o| o == op),
        "fixture does not use {op}: {ops:?}"
    );
}

#[test]
fn skl2onnx_standard_scaler_logistic_regression_matches_onnxruntime() {
    let ops = matches_onnxruntime("scaler_logreg");
    uses(&ops, "ai.onnx.ml:Scaler");
    uses(&ops, "ai.onnx.ml:LinearClassifier");
    uses(&ops, "ai.onnx.ml:Normalizer");
}

#[test]
fn skl2onnx_binary_logistic_regression_matches_onnxruntime() {
    let ops = matches_onnxruntime("logreg_binary");
    uses(&ops, "ai.onnx.ml:LinearClassifier");
}

#[test]
fn skl2onnx_standard_scaler_mlp_classifier_matches_onnxruntime() {
    let ops = matches_onnxruntime("scaler_mlp");
    uses(&ops, "ai.onnx.ml:ArrayFeatureExtractor");
}

#[test]
fn skl2onnx_linear_regression_matches_onnxruntime() {
    let ops = matches_onnxruntime("linreg");
    uses(&ops, "ai.onnx.ml:LinearRegressor");
}

#[test]
fn skl2onnx_imputer_normalizer_pipeline_matches_onnxruntime() {
    let ops = matches_onnxruntime("imputer_normalizer_linreg");
    uses(&ops, "ai.onnx.ml:Imputer");
}

#[test]
fn skl2onnx_binarizer_pipeline_matches_onnxruntime() {
    let ops = matches_onnxruntime("binarizer_logreg");
    uses(&ops, "ai.onnx.ml:Binarizer");
}

#[test]
fn skl2onnx_max_normalizer_pipeline_matches_onnxruntime() {
    // onnxruntime divides by the signed row max; tract's own Normalizer by the absolute max.
    let ops = matches_onnxruntime("normalizer_max_logreg");
    uses(&ops, "ai.onnx.ml:Normalizer");
}

#[test]
fn skl2onnx_one_hot_encoder_pipeline_matches_onnxruntime() {
    // The batch holds a category never seen in training (an all-zero one-hot row).
    let ops = matches_onnxruntime("onehot_linreg");
    uses(&ops, "ai.onnx.ml:OneHotEncoder");
}

#[test]
fn skl2onnx_label_encoder_matches_onnxruntime() {
    // The batch holds keys the encoder does not know (the default value).
    let ops = matches_onnxruntime("label_encoder");
    uses(&ops, "ai.onnx.ml:LabelEncoder");
}

#[test]
fn skl2onnx_random_forest_classifier_matches_onnxruntime() {
    let ops = matches_onnxruntime("forest_clf");
    uses(&ops, "ai.onnx.ml:TreeEnsembleClassifier");
}

#[test]
fn skl2onnx_gradient_boosting_classifiers_match_onnxruntime() {
    matches_onnxruntime("gb_clf");
    let ops = matches_onnxruntime("gb_clf_binary");
    uses(&ops, "ai.onnx.ml:TreeEnsembleClassifier");
}

#[test]
fn skl2onnx_tree_regressors_match_onnxruntime() {
    matches_onnxruntime("forest_reg");
    let ops = matches_onnxruntime("gb_reg");
    uses(&ops, "ai.onnx.ml:TreeEnsembleRegressor");
}

#[test]
fn onnxmltools_lightgbm_models_match_onnxruntime() {
    let ops = matches_onnxruntime("lgbm_clf");
    uses(&ops, "ai.onnx.ml:TreeEnsembleClassifier");
    let ops = matches_onnxruntime("lgbm_reg");
    uses(&ops, "ai.onnx.ml:TreeEnsembleRegressor");
}

#[test]
fn default_zipmap_export_is_refused_naming_the_operator() {
    let bytes = std::fs::read(fixture("zipmap_refused.onnx")).unwrap();
    let err = Model::load(&bytes).unwrap_err();
    assert_eq!(
        err,
        RuntimeError::UnsupportedOperator("ai.onnx.ml:ZipMap".into())
    );
}
