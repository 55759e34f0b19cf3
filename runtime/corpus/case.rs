//! Reads the corpus the fixture script `runtime/corpus/fetch.py` writes (lockfile, models,
//! onnxruntime references), for the `real_models` test and bench. Shared by `#[path]`.

use std::path::{Path, PathBuf};

use drover_protocol::manifest::{TensorData, TensorValue};
use serde_json::Value;

/// One corpus model as the lockfile and the cache describe it.
pub struct Case {
    pub name: String,
    pub family: String,
    pub ci: bool,
    pub model: PathBuf,
    /// The `--input-shape` arguments an operator gives for it.
    pub input_shapes: Vec<String>,
    pub inputs: Vec<TensorValue>,
    pub outputs: Vec<TensorValue>,
}

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The cache `fetch.py` fills (`$DROVER_CORPUS_DIR`, default `~/.cache/drover-corpus`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("DROVER_CORPUS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/drover-corpus")
        }
    }
}

/// Runs `fetch.py fetch [args]`: downloads what is missing, checks every sha256, writes
/// the references. Panics with the script's own message when it fails.
pub fn fetch(args: &[&str]) {
    let out = std::process::Command::new("python3")
        .arg(corpus_dir().join("fetch.py"))
        .arg("fetch")
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "fetch.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tensor(dir: &Path, t: &Value) -> TensorValue {
    let name = t["name"].as_str().unwrap().to_owned();
    let shape: Vec<u64> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    let raw = std::fs::read(dir.join(t["file"].as_str().unwrap())).unwrap();
    let data = match t["dtype"].as_str().unwrap() {
        "f32" => TensorData::F32(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ),
        "i64" => TensorData::I64(
            raw.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        ),
        "i32" => TensorData::I64(
            raw.chunks_exact(4)
                .map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap())))
                .collect(),
        ),
        "bool" => TensorData::I64(raw.iter().map(|b| i64::from(*b)).collect()),
        other => panic!("dtype {other}"),
    };
    TensorValue { name, shape, data }
}

/// Every lockfile entry whose model and reference are in the cache (run `fetch` first).
pub fn cases() -> Vec<Case> {
    let lock: Value =
        serde_json::from_slice(&std::fs::read(corpus_dir().join("corpus.lock.json")).unwrap())
            .unwrap();
    let cache = cache_dir();
    let mut cases = Vec::new();
    for m in lock["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap().to_owned();
        let dir = cache.join("ref").join(&name);
        let Ok(case) = std::fs::read(dir.join("case.json")) else {
            continue;
        };
        let case: Value = serde_json::from_slice(&case).unwrap();
        cases.push(Case {
            family: m["family"].as_str().unwrap().to_owned(),
            ci: m["ci"].as_bool().unwrap_or(false),
            model: cache.join("models").join(format!("{name}.onnx")),
            input_shapes: m["input_shapes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            inputs: case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| tensor(&dir, t))
                .collect(),
            outputs: case["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| tensor(&dir, t))
                .collect(),
            name,
        });
    }
    cases
}

/// Largest absolute difference between `got` and `want`, output by output (by position:
/// tract may name an output differently from onnxruntime), or why they cannot be compared.
pub fn max_abs_error(got: &[TensorValue], want: &[TensorValue]) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} outputs, onnxruntime has {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        if g.shape != w.shape {
            return Err(format!(
                "output {:?} shape {:?}, onnxruntime {:?}",
                w.name, g.shape, w.shape
            ));
        }
        let f = |d: &TensorData| -> Vec<f64> {
            match d {
                TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
                TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
            }
        };
        for (a, b) in f(&g.data).iter().zip(f(&w.data)) {
            worst = worst.max((a - b).abs());
        }
    }
    Ok(worst)
}
