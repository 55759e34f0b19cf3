//! Benchmark (not a test): the agent's runtime (tract + our `ai.onnx.ml` operators) against
//! onnxruntime (Python package, one intra-op and one inter-op thread, sequential) on the
//! same exported models and the same inputs: the fixture's batch and its first row. The
//! families are the scikit-learn exports of `tests/sklearn` (linear models, an MLP, tree
//! ensembles) plus the runtime fixtures' MLP and small CNN built with the onnx
//! package (`tests/fixtures`).
//! Prints per-call times and the ratio tract / onnxruntime per family.
//!
//! Run: `cargo bench -p drover-agent --bench onnx_ml` (needs `python3` with onnxruntime;
//! without `--bench` it is a quick smoke run whose figures mean nothing).
//!
//! Both sides are timed the way an application calls them: tract through
//! `drover_runtime::Model::run` (wire tensors in and out, as the local API does),
//! onnxruntime through `InferenceSession.run` from Python (numpy in and out), so each figure
//! includes its binding's per-call overhead ("call" ratio). To see past the bindings, each
//! side also times a "floor" model, an Identity graph over the same inputs, and the "net"
//! ratio compares (model − floor) on both sides: an estimate of the operators' own cost.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use drover_protocol::manifest::{TensorData, TensorValue};
use drover_runtime::Model;
use tract_onnx::pb;

const FAMILIES: &[&str] = &[
    "scaler_logreg",
    "logreg_binary",
    "scaler_mlp",
    "linreg",
    "imputer_normalizer_linreg",
    "binarizer_logreg",
    "normalizer_max_logreg",
    "onehot_linreg",
    "label_encoder",
    "forest_clf",
    "gb_clf",
    "gb_clf_binary",
    "forest_reg",
    "gb_reg",
    "lgbm_clf",
    "lgbm_reg",
    // The agent's runtime fixtures (`tests/fixtures/make_fixtures.py`): a dense MLP and a
    // small CNN (Conv, Relu, MaxPool, Gemm).
    "../fixtures/mlp",
    "../fixtures/cnn",
];

/// The floor model's file name for `family` (which may hold a `/`).
fn floor_file(family: &str) -> String {
    format!("{}.onnx", family.replace('/', "_"))
}

fn iterations() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        20_000
    } else {
        20
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sklearn")
}

fn inputs(family: &str) -> Vec<TensorValue> {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join(format!("{family}.json"))).unwrap())
            .unwrap();
    doc["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let data = t["data"].as_array().unwrap();
            TensorValue {
                name: t["name"].as_str().unwrap().to_owned(),
                shape: t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect(),
                data: if t["dtype"] == "F32" {
                    TensorData::F32(
                        data.iter()
                            .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
                            .collect(),
                    )
                } else {
                    TensorData::I64(data.iter().map(|x| x.as_i64().unwrap()).collect())
                },
            }
        })
        .collect()
}

fn first_row(t: &TensorValue) -> TensorValue {
    let n: u64 = t.shape[1..].iter().product();
    let n = n as usize;
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
}

/// Median over 5 rounds of the mean time per call, in seconds.
fn per_call(model: &Model, inputs: &[TensorValue], iterations: usize) -> f64 {
    for _ in 0..iterations.div_ceil(10).max(10) {
        model.run(inputs).unwrap();
    }
    let mut samples: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..iterations {
                std::hint::black_box(model.run(std::hint::black_box(inputs)).unwrap());
            }
            t0.elapsed().as_secs_f64() / iterations as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[2]
}

/// An Identity graph over the same inputs (names, element types, `[N, …]` shapes): what a
/// call costs when the model does nothing.
fn floor_model(inputs: &[TensorValue]) -> Vec<u8> {
    use drover_runtime::graph::{model_bytes, node, value_info, DataType, GraphDim};
    let value_info = |name: &str, t: &TensorValue| {
        let elem = match t.data {
            TensorData::F32(_) => DataType::Float,
            TensorData::I64(_) => DataType::Int64,
        };
        let dims: Vec<GraphDim> = t
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i == 0 {
                    GraphDim::batch()
                } else {
                    GraphDim::Fixed(*d as i64)
                }
            })
            .collect();
        value_info(name, elem, &dims)
    };
    let graph = pb::GraphProto {
        name: "floor".into(),
        node: inputs
            .iter()
            .map(|t| node("Identity", &[t.name.as_str()], &format!("{}_out", t.name)))
            .collect(),
        input: inputs.iter().map(|t| value_info(&t.name, t)).collect(),
        output: inputs
            .iter()
            .map(|t| value_info(&format!("{}_out", t.name), t))
            .collect(),
        ..Default::default()
    };
    model_bytes(graph, "", "")
}

fn onnxruntime(iterations: usize, floors: &std::path::Path) -> Option<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/onnx_ml_ort.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir())
        .arg(floors)
        .arg(iterations.to_string())
        .args(FAMILIES)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).unwrap()),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var("DROVER_REQUIRE_PEERS").as_deref() != Ok("1"),
                "onnxruntime (python3 -m pip install onnxruntime numpy) is required: {why}"
            );
            eprintln!("onnxruntime unavailable, tract figures only: {why}");
            None
        }
    }
}

fn main() {
    let iterations = iterations();
    let floors = tempfile::tempdir().unwrap();
    let mut tract = Vec::new();
    for family in FAMILIES {
        let model = Model::load(&std::fs::read(dir().join(format!("{family}.onnx"))).unwrap())
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let batch = inputs(family);
        let row: Vec<TensorValue> = batch.iter().map(first_row).collect();
        let floor_bytes = floor_model(&batch);
        std::fs::write(floors.path().join(floor_file(family)), &floor_bytes).unwrap();
        let floor = Model::load(&floor_bytes).unwrap();
        tract.push([
            per_call(&model, &batch, iterations),
            per_call(&model, &row, iterations),
            per_call(&floor, &batch, iterations),
            per_call(&floor, &row, iterations),
        ]);
    }
    let ort = onnxruntime(iterations, floors.path());
    println!(
        "{:<26} {:>10} {:>10} {:>6} {:>6}   {:>10} {:>10} {:>6} {:>6}",
        "family", "tract 16", "ort 16", "call", "net", "tract 1", "ort 1", "call", "net"
    );
    let us = |s: f64| format!("{:.2} µs", s * 1e6);
    // Net ratio: (model − floor) on each side, each floored at 0.1 µs.
    let net = |t: f64, tf: f64, o: f64, of: f64| (t - tf).max(1e-7) / (o - of).max(1e-7);
    let (mut worst_call, mut worst_net): (f64, f64) = (0.0, 0.0);
    for (family, [tb, tr, tbf, trf]) in FAMILIES.iter().zip(tract) {
        let o = |k: &str| {
            ort.as_ref()
                .and_then(|o| o[family][k].as_f64())
                .unwrap_or(f64::NAN)
        };
        let (ob, or, obf, orf) = (o("batch"), o("row"), o("batch_floor"), o("row_floor"));
        let (nb, nr) = (net(tb, tbf, ob, obf), net(tr, trf, or, orf));
        worst_call = worst_call.max(tb / ob).max(tr / or);
        worst_net = worst_net.max(nb).max(nr);
        println!(
            "{:<26} {:>10} {:>10} {:>5.2}x {:>5.2}x   {:>10} {:>10} {:>5.2}x {:>5.2}x",
            family.trim_start_matches("../fixtures/"),
            us(tb),
            us(ob),
            tb / ob,
            nb,
            us(tr),
            us(or),
            tr / or,
            nr
        );
    }
    println!(
        "worst ratio tract / onnxruntime: {worst_call:.2}x per call, {worst_net:.2}x net of the floor \
         ({iterations} calls per round)"
    );
}
