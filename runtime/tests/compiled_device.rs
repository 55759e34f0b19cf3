//! The device side of compiled models (issue 25), which builds without the `onnx` feature
//! (`cargo test -p drover-runtime --no-default-features --test compiled_device`): a
//! committed artifact (`tests/compiled/gb_clf.nnef.tar`, kept equal to a fresh compile by
//! `compiled.rs`) loads with tract-core, tract-nnef and tract-onnx-opl only and passes its
//! self-test against onnxruntime's outputs.

use std::path::Path;

use drover_protocol::manifest::Artifact;
use drover_protocol::manifest::{TensorData, TensorValue, TestVector};
use drover_runtime::compiled::{
    check_compatible, runtime_version, COMPILED_FORMAT, COMPILED_FORMAT_VERSION,
};
use drover_runtime::{self_test, Model, RuntimeError, Threads};

fn tensors(v: &serde_json::Value) -> Vec<TensorValue> {
    v.as_array()
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
            data: if t["dtype"] == "F32" {
                TensorData::F32(
                    t["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect(),
                )
            } else {
                TensorData::I64(
                    t["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_i64().unwrap())
                        .collect(),
                )
            },
        })
        .collect()
}

#[test]
fn a_committed_artifact_loads_runs_and_self_tests_on_the_device_runtime() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let artifact = std::fs::read(dir.join("tests/compiled/gb_clf.nnef.tar")).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("../agent/tests/sklearn/gb_clf.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        check_compatible(&Artifact {
            format: COMPILED_FORMAT.into(),
            format_version: COMPILED_FORMAT_VERSION,
            runtime_version: runtime_version().into(),
            source_sha256: [0; 32],
        }),
        Ok(())
    );
    let model = Model::load_compiled(&artifact, Threads::One).unwrap();
    assert_eq!(model.inputs()[0].name, "X");
    let names: Vec<&str> = model.outputs().iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["label", "probabilities"]);
    let vector = TestVector {
        inputs: tensors(&doc["inputs"]),
        outputs: tensors(&doc["outputs"]),
        tolerance: 1e-5,
    };
    self_test(&model, &[vector]).unwrap();
    // A damaged tree layout (every "false" child pointing back to the first node: a walk
    // that would never end) is refused at load by the layout check, not walked.
    let mut bad = artifact.clone();
    let next = dat_data(&mut bad, "TreeEnsembleClassifier.node_next.dat");
    next.fill(0);
    let e = Model::load_compiled(&bad, Threads::One).unwrap_err();
    assert!(matches!(e, RuntimeError::Compiled(_)), "{e}");
    assert!(e.to_string().contains("children out of order"), "{e}");
}

/// The values of a `.dat` tensor in the tar (after its 128-byte NNEF header).
fn dat_data<'a>(tar: &'a mut [u8], name: &str) -> &'a mut [u8] {
    let at = (0..tar.len() / 512)
        .map(|b| b * 512)
        .find(|o| tar[*o..].starts_with(name.as_bytes()))
        .unwrap_or_else(|| panic!("{name} not in the artifact"));
    let size = std::str::from_utf8(&tar[at + 124..at + 135]).unwrap();
    let size =
        usize::from_str_radix(size.trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap();
    &mut tar[at + 512 + 128..at + 512 + size]
}

/// What a device runtime reports and loads by manifest: the compiled artifact through its
/// version check, and, only when built with the importer, plain ONNX.
#[test]
fn the_device_runtime_reports_its_formats_and_loads_by_manifest() {
    use drover_protocol::manifest::Artifact;
    use drover_runtime::compiled::{load_artifact, runtime_report, COMPILED_FORMAT};
    let report = runtime_report();
    assert_eq!(report.version, runtime_version());
    assert!(report.loads(COMPILED_FORMAT, COMPILED_FORMAT_VERSION));
    assert_eq!(report.loads("onnx", 1), cfg!(feature = "onnx"));
    let tar =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compiled/gb_clf.nnef.tar"))
            .unwrap();
    let artifact = |runtime: &str| Artifact {
        format: COMPILED_FORMAT.into(),
        format_version: COMPILED_FORMAT_VERSION,
        runtime_version: runtime.into(),
        source_sha256: [0; 32],
    };
    load_artifact(&tar, Some(&artifact(runtime_version())), Threads::One).unwrap();
    let newer = load_artifact(&tar, Some(&artifact("99.0.0")), Threads::One);
    assert!(
        matches!(&newer, Err(RuntimeError::Load(m)) if m.contains("99.0.0")),
        "{newer:?}"
    );
    // The artifact's bytes as plain ONNX: without the importer, refused saying what to do.
    let plain = load_artifact(&tar, None, Threads::One);
    if !cfg!(feature = "onnx") {
        assert!(
            matches!(&plain, Err(RuntimeError::Load(m)) if m.contains("compiled models only")),
            "{plain:?}"
        );
    } else {
        assert!(plain.is_err(), "a tar is not an ONNX file");
    }
}
