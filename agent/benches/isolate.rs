//! Benchmark (not a test): what isolated loading (issue 25) costs per deploy. For each model,
//! the median over runs of
//! - in-process: read the file, load, self-test (what the agent did before `runtime.isolate`);
//! - isolated: `isolate::Loader::check` (spawn `drover-agent check-model`, which limits
//!   itself, reads the manifest, loads and self-tests) and then the in-process load the
//!   agent serves from (what the core does now);
//!
//! with the child's own load and self-test times and peak RSS / address space (VmHWM,
//! VmPeak) from its report. Models: the agent's dense fixture and every corpus model in
//! the cache (`$DROVER_CORPUS_DIR`, default `~/.cache/drover-corpus`; fill it with
//! `python3 runtime/corpus/fetch.py fetch`), each published as the control plane does
//! (`publish::prepare` with the lockfile's `--input-shape`s), self-tested on its reference
//! input with tract's own outputs.
//!
//! Run: `cargo bench -p drover-agent --bench isolate` (`--bench` takes 5 runs per model;
//! without it, one run). `DROVER_ISOLATE_LOADER=PATH` runs another agent binary as the
//! child (e.g. a `release-size` build): "check ms" is then that binary's wall time per
//! check, and its own load and self-test times are what an in-process deploy costs in it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_agent::isolate::Loader;
use drover_protocol::manifest::{Lineage, Manifest, TensorData, TensorValue, TestVector};
use drover_runtime::publish::{parse_input_shape, prepare, PublishOptions};
use drover_runtime::{self_test, Model, Threads};
use serde_json::Value;

fn cache_dir() -> PathBuf {
    std::env::var_os("DROVER_CORPUS_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/drover-corpus"),
        PathBuf::from,
    )
}

fn ref_tensor(dir: &Path, t: &Value) -> TensorValue {
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
        other => panic!("dtype {other} not read by this bench"),
    };
    let shape = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect();
    TensorValue {
        name: t["name"].as_str().unwrap().to_owned(),
        shape,
        data,
    }
}

/// Name, ONNX bytes, `--input-shape`s, reference inputs.
type Case = (String, Vec<u8>, Vec<String>, Vec<TensorValue>);

/// Every model to measure.
fn models() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("tests/fixtures");
    let doc: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("dense_v1.json")).unwrap()).unwrap();
    let dense_in = doc["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| TensorValue {
            name: t["name"].as_str().unwrap().to_owned(),
            shape: t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect(),
            data: TensorData::F32(
                t["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            ),
        })
        .collect();
    let mut out = vec![(
        "dense_v1 (fixture)".to_owned(),
        std::fs::read(fixture.join("dense_v1.onnx")).unwrap(),
        vec![],
        dense_in,
    )];
    let lock: Value = serde_json::from_slice(
        &std::fs::read(root.join("../runtime/corpus/corpus.lock.json")).unwrap(),
    )
    .unwrap();
    let cache = cache_dir();
    for m in lock["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap().to_owned();
        let dir = cache.join("ref").join(&name);
        let (Ok(case), Ok(bytes)) = (
            std::fs::read(dir.join("case.json")),
            std::fs::read(cache.join("models").join(format!("{name}.onnx"))),
        ) else {
            continue;
        };
        let case: Value = serde_json::from_slice(&case).unwrap();
        let shapes = m["input_shapes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| Some(v.as_str()?.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let inputs = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| ref_tensor(&dir, t))
            .collect();
        out.push((name, bytes, shapes, inputs));
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runs = if std::env::args().any(|a| a == "--bench") {
        5
    } else {
        1
    };
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader {
        exe: std::env::var_os("DROVER_ISOLATE_LOADER")
            .map_or_else(|| env!("CARGO_BIN_EXE_drover-agent").into(), PathBuf::from),
        memory_bytes: 0,
        timeout: Duration::from_secs(600),
        crash_at: None,
    };
    // The agent's default `runtime.threads = 0`: the cores, at most 4.
    let threads = Threads::from_config(0);
    println!(
        "{:<20} {:>8} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "model",
        "MB",
        "in-proc ms",
        "isolated ms",
        "extra ms",
        "check ms",
        "child load",
        "child test",
        "child RSS",
        "child VM"
    );
    for (name, bytes, shapes, inputs) in models() {
        let opts = PublishOptions {
            input_shapes: shapes
                .iter()
                .map(|a| parse_input_shape(a).unwrap())
                .collect(),
        };
        let Ok(p) = prepare(&bytes, &opts) else {
            println!("{name:<20} refused at publish");
            continue;
        };
        let outputs = p.model.run(&inputs).unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, &p.bytes).unwrap();
        let manifest = Manifest {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: [0; 32],
            size: p.bytes.len() as u64,
            chunk_size: 65536,
            chunk_hashes: vec![],
            inputs: vec![],
            outputs: vec![],
            baseline: None,
            test_vectors: vec![TestVector {
                inputs,
                outputs,
                tolerance: 1e-4,
            }],
            lineage: Lineage::default(),
            created_at_ms: 0,
            sampled_vectors: vec![],
            artifact: None,
        };
        let (mut inproc, mut isolated, mut checks, mut reports) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let t = Instant::now();
            let b = std::fs::read(&path).unwrap();
            let m = Model::load_with(&b, threads).unwrap();
            self_test(&m, &manifest.test_vectors).unwrap();
            inproc.push(t.elapsed().as_secs_f64() * 1e3);
            drop(m);
            let t = Instant::now();
            let r = loader.check(&path, &manifest, 0).unwrap();
            checks.push(t.elapsed().as_secs_f64() * 1e3);
            let b = std::fs::read(&path).unwrap();
            let m = Model::load_with(&b, threads).unwrap();
            isolated.push(t.elapsed().as_secs_f64() * 1e3);
            drop(m);
            reports.push(r);
        }
        let (a, b) = (median(inproc), median(isolated));
        let r = &reports[reports.len() / 2];
        println!(
            "{:<20} {:>8.2} {:>11.1} {:>11.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1}",
            name,
            p.bytes.len() as f64 / 1e6,
            a,
            b,
            b - a,
            median(checks),
            median(reports.iter().map(|r| r.load_ms).collect()),
            median(reports.iter().map(|r| r.self_test_ms).collect()),
            r.peak_rss_bytes as f64 / 1048576.0,
            r.peak_vm_bytes as f64 / 1048576.0,
        );
    }
}
