//! Publish as shipped (issue 16) through the HTTP API behind `drover model publish`: the
//! operator's `--input-shape` is written into the file that is signed and stored, the fixes
//! are listed in the model's summary, bad shapes are refused saying why, and a model tract
//! cannot analyse is refused naming the node and the operator, with tract's chain only
//! under `verbose`.

mod common;

use common::*;
use drover_runtime::graph::{model_bytes, node, value_info, DataType, GraphDim};
use tract_onnx::pb;

/// `y = Relu(x)`, `x` of rank 2 with both dims unnamed.
fn relu_open_dims() -> Vec<u8> {
    let mut x = value_info("x", DataType::Float, &[]);
    if let Some(pb::type_proto::Value::TensorType(tt)) =
        x.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        tt.shape = Some(pb::TensorShapeProto {
            dim: vec![pb::tensor_shape_proto::Dimension::default(); 2],
        });
    }
    let graph = pb::GraphProto {
        name: "t".into(),
        node: vec![node("Relu", &["x"], "y")],
        input: vec![x],
        output: vec![value_info("y", DataType::Float, &[])],
        ..Default::default()
    };
    model_bytes(graph, "test", "0")
}

/// `If(c) then x else Shape(x)` with `c` a graph input: tract cannot unify the branches.
fn if_on_an_input() -> Vec<u8> {
    let branch = |n: pb::NodeProto, out: &str| pb::GraphProto {
        name: out.into(),
        node: vec![n],
        output: vec![value_info(out, DataType::Undefined, &[])],
        ..Default::default()
    };
    let mut iff = node("If", &["c"], "y");
    iff.name = "the_if".into();
    for (name, g) in [
        ("then_branch", branch(node("Identity", &["x"], "t"), "t")),
        ("else_branch", branch(node("Shape", &["x"], "e"), "e")),
    ] {
        iff.attribute.push(pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Graph as i32,
            g: Some(g),
            ..Default::default()
        });
    }
    let graph = pb::GraphProto {
        name: "t".into(),
        node: vec![iff],
        input: vec![
            value_info(
                "x",
                DataType::Float,
                &[GraphDim::Fixed(2), GraphDim::Fixed(3)],
            ),
            value_info("c", DataType::Bool, &[]),
        ],
        output: vec![value_info("y", DataType::Float, &[])],
        ..Default::default()
    };
    model_bytes(graph, "test", "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_shapes_are_written_into_the_signed_file_and_refusals_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let original = relu_open_dims();

    let (status, body) = api
        .post(
            "/v1/models",
            &serde_json::json!({"name": "relu", "version": "1.0.0",
                                "model_hex": hex::encode(&original),
                                "input_shapes": ["x=1,W"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let shape = &body["summary"]["inputs"][0]["shape"];
    assert_eq!(shape, &serde_json::json!([1, "W"]), "{body}");
    assert_eq!(
        body["summary"]["publish_fixes"],
        serde_json::json!(["input \"x\": shape [?, ?] -> [1, W] (--input-shape)"])
    );
    // The ONNX kept in the registry is the fixed one, not the upload, and the shipped,
    // signed file is its compiled form: both have the fixed shape.
    let source = body["summary"]["source_sha256"].as_str().unwrap();
    assert_ne!(
        source,
        hex::encode(drover_protocol::trust::sha256(&original))
    );
    let onnx = std::fs::read(dir.path().join("models").join(source)).unwrap();
    assert_eq!(hex::encode(drover_protocol::trust::sha256(&onnx)), source);
    let sha = body["sha256"].as_str().unwrap();
    let shipped = std::fs::read(dir.path().join("models").join(sha)).unwrap();
    assert_eq!(hex::encode(drover_protocol::trust::sha256(&shipped)), sha);
    let want = vec![
        drover_protocol::manifest::Dim::Fixed(1),
        drover_protocol::manifest::Dim::Symbolic("W".into()),
    ];
    let m = drover_runtime::Model::load(&onnx).unwrap();
    assert_eq!(m.inputs()[0].shape, want);
    let m = drover_runtime::Model::load_compiled(&shipped, drover_runtime::Threads::One).unwrap();
    assert_eq!(m.inputs()[0].shape, want);

    for (shapes, want) in [
        (
            vec!["y=1,2"],
            "--input-shape y: the model has no such input; its inputs are [\"x\"]",
        ),
        (
            vec!["x=1"],
            "--input-shape x: the model's input has 2 axes [?, ?], --input-shape gives 1",
        ),
        (vec!["x=1,-2"], "is neither a number nor a symbol name"),
    ] {
        let (status, body) = api
            .post(
                "/v1/models",
                &serde_json::json!({"name": "relu", "version": "1.0.1",
                                    "model_hex": hex::encode(&original), "input_shapes": shapes}),
            )
            .await;
        assert!(status == 400 || status == 422, "{status} {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains(want), "{msg}");
    }

    let refused = |verbose: bool| {
        serde_json::json!({"name": "iff", "version": "1.0.0",
                           "model_hex": hex::encode(if_on_an_input()), "verbose": verbose})
    };
    let (status, body) = api.post("/v1/models", &refused(false)).await;
    assert_eq!(status, 422, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.starts_with("model refused: node \"the_if\" (If) cannot be analysed: "),
        "{msg}"
    );
    assert!(!msg.contains("node #"), "a raw tract trace: {msg}");
    let (_, body) = api.post("/v1/models", &refused(true)).await;
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("tract's error chain:\n") && msg.contains("node #"),
        "{msg}"
    );
}
