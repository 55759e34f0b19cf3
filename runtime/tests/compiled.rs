//! Models compiled to tract's own format (issue 25) behave as the ONNX they come from:
//! every `ai.onnx.ml` family fixture (scikit-learn, LightGBM; `agent/tests/sklearn`) and
//! the agent's ONNX fixtures compile, load with `Model::load_compiled`, give the same specs
//! and the same outputs as `Model::load` (and onnxruntime's within the fixtures'
//! tolerance), pass their self-test and a sampled self-test made on the ONNX path; compiling
//! is deterministic; damaged artifacts are refused with a reason.

use std::path::{Path, PathBuf};

use drover_protocol::manifest::{Dim, PatternInput, TensorData, TensorValue, TestVector};
use drover_runtime::compiled::compile;
use drover_runtime::sampled::sampled_vector;
use drover_runtime::{self_test, self_test_sampled, Model, RuntimeError, Threads};

fn agent_tests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests")
}

/// Every `ai.onnx.ml` family the fixtures cover, with onnxruntime's reference outputs.
const SKLEARN: &[&str] = &[
    "binarizer_logreg",
    "forest_clf",
    "forest_reg",
    "gb_clf",
    "gb_clf_binary",
    "gb_reg",
    "imputer_normalizer_linreg",
    "label_encoder",
    "lgbm_clf",
    "lgbm_reg",
    "linreg",
    "logreg_binary",
    "normalizer_max_logreg",
    "onehot_linreg",
    "scaler_logreg",
    "scaler_mlp",
];

/// The agent's ONNX fixtures (dense, CNN, MLP, tree, preprocessing).
const FIXTURES: &[&str] = &[
    "cnn",
    "dense_v1",
    "dense_v2",
    "forest",
    "fragile",
    "mlp",
    "scaler_logreg",
];

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

/// Outputs equal, bit for bit (NaN equal to NaN): both paths optimize the same graph.
fn assert_same(what: &str, got: &[TensorValue], want: &[TensorValue]) {
    assert_eq!(got.len(), want.len(), "{what}: output count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            (&g.name, &g.shape),
            (&w.name, &w.shape),
            "{what}: output name/shape"
        );
        match (&g.data, &w.data) {
            (TensorData::F32(a), TensorData::F32(b)) => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!(
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                        "{what}: output {:?} element {i}: compiled {x}, ONNX {y}",
                        w.name
                    );
                }
            }
            (a, b) => assert_eq!(a, b, "{what}: output {:?}", w.name),
        }
    }
}

/// A sampled vector made on the ONNX path (what the registry does at publish), symbolic
/// axes given 3.
fn sampled_on(onnx: &Model) -> drover_protocol::manifest::SampledVector {
    let inputs = onnx
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, s)| PatternInput {
            name: s.name.clone(),
            shape: s
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(v) => *v,
                    Dim::Symbolic(_) => 3,
                })
                .collect(),
            dtype: s.dtype,
            seed: 7 + i as u32,
        })
        .collect();
    sampled_vector(onnx, inputs)
        .unwrap()
        .expect("generated inputs")
}

/// Compiles `path`, loads both ways and checks the compiled model against the ONNX one on
/// the fixture's inputs (and against `want`, onnxruntime's, by self-test).
fn compiled_matches(name: &str, path: &Path, json: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    let onnx = Model::load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let artifact = compile(&bytes).unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    let compiled =
        Model::load_compiled(&artifact, Threads::One).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(compiled.inputs(), onnx.inputs(), "{name}: input specs");
    assert_eq!(compiled.outputs(), onnx.outputs(), "{name}: output specs");
    // The same computing operators (constants aside: the ONNX path keeps duplicates).
    let ops =
        |m: &Model| -> Vec<String> { m.plan_ops().into_iter().filter(|o| o != "Const").collect() };
    assert_eq!(ops(&compiled), ops(&onnx), "{name}: optimized plans");
    assert_eq!(compiled.threads(), 1);
    let inputs = tensors(&doc["inputs"]);
    let want = onnx.run(&inputs).unwrap();
    let got = compiled
        .run(&inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_same(name, &got, &want);
    let outputs = tensors(&doc["outputs"]);
    if !outputs.is_empty() {
        let vector = TestVector {
            inputs: inputs.clone(),
            outputs,
            tolerance: 1e-3,
        };
        self_test(&compiled, &[vector]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    self_test_sampled(&compiled, &[sampled_on(&onnx)]).unwrap_or_else(|e| panic!("{name}: {e}"));
    // Another thread count: same outputs.
    let two = Model::load_compiled(&artifact, Threads::Fixed(2)).unwrap();
    assert_eq!(two.threads(), 2);
    assert_same(name, &two.run(&inputs).unwrap(), &want);
    artifact
}

#[test]
fn every_ml_family_fixture_compiles_and_runs_as_its_onnx() {
    for family in SKLEARN {
        let dir = agent_tests().join("sklearn");
        compiled_matches(
            family,
            &dir.join(format!("{family}.onnx")),
            &dir.join(format!("{family}.json")),
        );
    }
}

#[test]
fn the_agents_onnx_fixtures_compile_and_run_as_their_onnx() {
    for name in FIXTURES {
        let dir = agent_tests().join("fixtures");
        compiled_matches(
            name,
            &dir.join(format!("{name}.onnx")),
            &dir.join(format!("{name}.json")),
        );
    }
}

#[test]
fn compiling_is_deterministic() {
    for family in ["forest_clf", "label_encoder", "onehot_linreg", "scaler_mlp"] {
        let bytes = std::fs::read(agent_tests().join(format!("sklearn/{family}.onnx"))).unwrap();
        let a = compile(&bytes).unwrap();
        let b = compile(&bytes).unwrap();
        assert!(a == b, "{family}: two compiles differ");
    }
}

/// The committed artifact (loaded by `compiled_device.rs` without the `onnx` feature) is
/// what `compile` makes today: compiling is stable across runs and builds.
#[test]
fn the_committed_compiled_fixture_is_up_to_date() {
    let onnx = std::fs::read(agent_tests().join("sklearn/gb_clf.onnx")).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compiled/gb_clf.nnef.tar");
    let fresh = compile(&onnx).unwrap();
    if std::env::var_os("DROVER_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read(&path).expect("run with DROVER_BLESS=1 to write it");
    assert!(
        committed == fresh,
        "{path:?} differs from a fresh compile: DROVER_BLESS=1 rewrites it"
    );
}

#[test]
fn damaged_artifacts_are_refused_with_a_reason() {
    let onnx = std::fs::read(agent_tests().join("sklearn/forest_clf.onnx")).unwrap();
    let artifact = compile(&onnx).unwrap();
    assert!(Model::load_compiled(&artifact, Threads::One).is_ok());
    // ONNX where a compiled artifact is expected.
    let e = Model::load_compiled(&onnx, Threads::One).unwrap_err();
    assert!(matches!(e, RuntimeError::Compiled(_)), "{e}");
    // Truncated anywhere (on and off block boundaries).
    let len = artifact.len();
    for cut in [
        1,
        511,
        512,
        1024,
        len / 3,
        len / 2,
        len - 1024,
        len - 512,
        len - 1,
    ] {
        let e = Model::load_compiled(&artifact[..cut], Threads::One)
            .err()
            .unwrap_or_else(|| panic!("truncated at {cut} of {len} loaded"));
        assert!(e.to_string().contains("re-publish"), "cut {cut}: {e}");
    }
    // A byte flipped in every 512-byte block in turn: an error or (data bytes of a
    // weight) a model, never a panic.
    for block in 0..len / 512 {
        let mut bad = artifact.clone();
        bad[block * 512 + 100] ^= 0x5a;
        if let Err(e) = Model::load_compiled(&bad, Threads::One) {
            assert!(
                !matches!(e, RuntimeError::Panicked(_)),
                "block {block}: {e}"
            );
        }
    }
}

/// An ONNX `If` on a run-time condition (tract has no NNEF form for it; ours writes each
/// branch as a fragment, its weights as tensors): both branches give the ONNX path's
/// outputs, on a symbolic batch.
#[test]
fn a_run_time_if_compiles_with_both_branches() {
    use drover_runtime::graph::{model_bytes, node, tensor_f32, value_info, DataType, GraphDim};
    use tract_onnx::pb;

    let n = || vec![GraphDim::batch(), GraphDim::Fixed(4)];
    let branch = |op: &str, k: f32, out: &str| pb::GraphProto {
        name: out.into(),
        node: vec![node(op, &["x", &format!("{out}_k")], out)],
        initializer: vec![tensor_f32(
            &format!("{out}_k"),
            vec![4],
            vec![k, k + 1.0, k, k],
        )],
        output: vec![value_info(out, DataType::Float, &n())],
        ..Default::default()
    };
    let graph_attr = |name: &str, g: pb::GraphProto| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    };
    let mut iff = node("If", &["c"], "y");
    iff.attribute = vec![
        graph_attr("then_branch", branch("Add", 1.0, "y_then")),
        graph_attr("else_branch", branch("Mul", 2.0, "y_else")),
    ];
    let graph = pb::GraphProto {
        name: "if".into(),
        node: vec![node("Greater", &["s", "zero"], "c"), iff],
        initializer: vec![tensor_f32("zero", vec![1], vec![0.0])],
        input: vec![
            value_info("x", DataType::Float, &n()),
            value_info("s", DataType::Float, &[GraphDim::Fixed(1)]),
        ],
        output: vec![value_info("y", DataType::Float, &n())],
        ..Default::default()
    };
    let bytes = model_bytes(graph, "if-test", "0");
    let onnx = Model::load(&bytes).unwrap();
    let artifact = compile(&bytes).unwrap();
    let compiled = Model::load_compiled(&artifact, Threads::One).unwrap();
    assert_eq!(compiled.inputs(), onnx.inputs());
    assert_eq!(compiled.outputs(), onnx.outputs());
    for (s, want) in [(1.0, 2.5), (-1.0, 1.5)] {
        let inputs = vec![
            TensorValue {
                name: "x".into(),
                shape: vec![3, 4],
                data: TensorData::F32((0..12).map(|i| i as f32 / 2.0).collect()),
            },
            TensorValue {
                name: "s".into(),
                shape: vec![1],
                data: TensorData::F32(vec![s]),
            },
        ];
        let got = compiled.run(&inputs).unwrap();
        assert_same("if", &got, &onnx.run(&inputs).unwrap());
        // Row 0 element 1 is 0.5: + 2 (then) or * 3 (else).
        let TensorData::F32(v) = &got[0].data else {
            panic!("float output")
        };
        assert_eq!(v[1], want, "branch for s = {s}");
    }
}

/// tract's own CategoryMapper (tract-onnx-opl) writes in both directions but tract 0.23.9
/// cannot read either back (int to string: a string scalar `.dat`; string to int: its
/// loader reads the keys as a number), so `compile` refuses such a model with a reason
/// instead of handing out an artifact no device can load. (The wire carries no strings:
/// such a mapper is only ever inside a model.)
#[test]
fn category_mapper_is_refused_at_compile_not_at_load() {
    use drover_runtime::graph::{model_bytes, value_info, DataType, GraphDim};
    use tract_onnx::pb;

    let strings = |name: &str, v: &[&str]| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Strings as i32,
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    };
    let ints = |name: &str, v: &[i64]| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    };
    let model = |from: DataType, to: DataType| {
        let mut mapper = drover_runtime::graph::node("CategoryMapper", &["x"], "y");
        mapper.domain = "ai.onnx.ml".into();
        let default = if to == DataType::String {
            pb::AttributeProto {
                name: "default_string".into(),
                r#type: pb::attribute_proto::AttributeType::String as i32,
                s: b"?".to_vec(),
                ..Default::default()
            }
        } else {
            drover_runtime::graph::attr_int("default_int64", -1)
        };
        mapper.attribute = vec![
            strings("cats_strings", &["a", "b"]),
            ints("cats_int64s", &[1, 2]),
            default,
        ];
        let graph = pb::GraphProto {
            name: "cm".into(),
            node: vec![mapper],
            input: vec![value_info("x", from, &[GraphDim::batch()])],
            output: vec![value_info("y", to, &[GraphDim::batch()])],
            ..Default::default()
        };
        let mut bytes = model_bytes(graph, "cm-test", "0");
        // model_bytes imports the default domain only; add ai.onnx.ml.
        use prost::Message as _;
        let mut m = pb::ModelProto::decode(&*bytes).unwrap();
        m.opset_import.push(pb::OperatorSetIdProto {
            domain: "ai.onnx.ml".into(),
            version: 2,
        });
        bytes = m.encode_to_vec();
        bytes
    };
    for (from, to) in [
        (DataType::Int64, DataType::String),
        (DataType::String, DataType::Int64),
    ] {
        let bytes = model(from, to);
        Model::load(&bytes).unwrap();
        let e = compile(&bytes).unwrap_err();
        assert!(
            e.to_string().contains("reading the compiled form back"),
            "{e}"
        );
    }
}
