use super::*;
use crate::graph::{model_bytes, node, value_info, DataType, GraphDim};
use drover_protocol::manifest::{TensorData, TensorValue};

/// An input whose dims the file leaves unnamed (`None` in the exporter).
fn open_input(name: &str, rank: usize) -> pb::ValueInfoProto {
    let mut v = value_info(name, DataType::Float, &[]);
    if let Some(pb::type_proto::Value::TensorType(tt)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        tt.shape = Some(pb::TensorShapeProto {
            dim: vec![pb::tensor_shape_proto::Dimension::default(); rank],
        });
    }
    v
}

fn relu_model(input: pb::ValueInfoProto) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "t".into(),
        node: vec![node("Relu", &["x"], "y")],
        input: vec![input],
        output: vec![value_info("y", DataType::Float, &[])],
        ..Default::default()
    };
    model_bytes(graph, "test", "0")
}

fn f32s(name: &str, shape: &[u64]) -> TensorValue {
    let n: u64 = shape.iter().product();
    TensorValue {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::F32((0..n).map(|i| i as f32 - 3.0).collect()),
    }
}

#[test]
fn unnamed_dims_get_distinct_symbols_so_any_shape_runs() {
    let m = Model::load(&relu_model(open_input("x", 2))).unwrap();
    assert_eq!(
        m.inputs()[0].shape,
        vec![Dim::Symbolic("N".into()), Dim::Symbolic("x_1".into())]
    );
    // One symbol for both axes answered "Clashing resolution N=2 != 5".
    let out = m.run(&[f32s("x", &[2, 5])]).unwrap();
    assert_eq!(out[0].shape, vec![2, 5]);
    assert_eq!(m.run(&[f32s("x", &[3, 3])]).unwrap()[0].shape, vec![3, 3]);
}

#[test]
fn input_shape_is_written_into_the_file() {
    let opts = PublishOptions {
        input_shapes: vec![parse_input_shape("x=2,W").unwrap()],
    };
    let p = prepare(&relu_model(open_input("x", 2)), &opts).unwrap();
    let want = vec![Dim::Fixed(2), Dim::Symbolic("W".into())];
    assert_eq!(p.model.inputs()[0].shape, want);
    assert_eq!(
        p.fixes,
        vec!["input \"x\": shape [?, ?] -> [2, W] (--input-shape)"]
    );
    // The signed bytes carry the shape: a device loading them sees the same thing.
    assert_eq!(Model::load(&p.bytes).unwrap().inputs()[0].shape, want);
}

#[test]
fn a_model_needing_no_fix_keeps_its_bytes() {
    let bytes = relu_model(open_input("x", 2));
    let p = prepare(&bytes, &PublishOptions::default()).unwrap();
    assert!(p.fixes.is_empty());
    assert_eq!(p.bytes, bytes);
}

#[test]
fn input_shape_refusals_say_what_is_wrong() {
    let fixed = relu_model(value_info(
        "x",
        DataType::Float,
        &[GraphDim::Fixed(1), GraphDim::Fixed(4)],
    ));
    let err = |arg: &str, bytes: &[u8]| {
        let opts = PublishOptions {
            input_shapes: vec![parse_input_shape(arg).unwrap()],
        };
        prepare(bytes, &opts).err().unwrap().to_string()
    };
    assert_eq!(
        err("y=1,4", &fixed),
        "--input-shape y: the model has no such input; its inputs are [\"x\"]"
    );
    assert_eq!(
        err("x=1,4,4", &fixed),
        "--input-shape x: the model's input has 2 axes [1, 4], --input-shape gives 3"
    );
    assert_eq!(
        err("x=1,5", &fixed),
        "--input-shape x: axis 1 is fixed to 4 in the file [1, 4]; it cannot be 5"
    );
    assert!(parse_input_shape("x").is_err());
    assert!(parse_input_shape("x=1,-3").is_err());
    assert!(parse_input_shape("=1").is_err());
}

/// `If(cond) then y = x else y = Shape(x)`: branches of different types and ranks.
fn if_model(cond: pb::NodeProto, extra_input: Option<pb::ValueInfoProto>) -> Vec<u8> {
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
    let mut input = vec![value_info(
        "x",
        DataType::Float,
        &[GraphDim::Fixed(2), GraphDim::Fixed(3)],
    )];
    input.extend(extra_input);
    let graph = pb::GraphProto {
        name: "t".into(),
        node: vec![cond, iff],
        input,
        output: vec![value_info("y", DataType::Float, &[])],
        ..Default::default()
    };
    model_bytes(graph, "test", "0")
}

fn bool_constant(v: bool) -> pb::NodeProto {
    let mut c = node("Constant", &[], "c");
    c.attribute.push(pb::AttributeProto {
        name: "value".into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(pb::TensorProto {
            data_type: DataType::Bool as i32,
            int32_data: vec![i32::from(v)],
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

#[test]
fn an_if_with_a_constant_condition_is_folded_at_publish() {
    let bytes = if_model(bool_constant(true), None);
    // As shipped, tract must unify both branches and cannot.
    assert!(Model::load(&bytes).is_err());
    let p = prepare(&bytes, &PublishOptions::default()).unwrap();
    assert_eq!(
        p.fixes,
        vec!["If node \"the_if\": condition is the constant true, replaced by its then_branch"]
    );
    let out = p.model.run(&[f32s("x", &[2, 3])]).unwrap();
    assert_eq!(out[0].data, f32s("x", &[2, 3]).data);
    // The else branch taken when the constant is false: Shape(x).
    let p = prepare(
        &if_model(bool_constant(false), None),
        &PublishOptions::default(),
    )
    .unwrap();
    assert_eq!(
        p.model.run(&[f32s("x", &[2, 3])]).unwrap()[0].data,
        TensorData::I64(vec![2, 3])
    );
}

#[test]
fn a_refusal_names_the_node_and_operator_not_the_trace() {
    let cond_input = value_info("c_in", DataType::Bool, &[]);
    let bytes = if_model(node("Identity", &["c_in"], "c"), Some(cond_input));
    let e = prepare(&bytes, &PublishOptions::default()).err().unwrap();
    let RuntimeError::Refused(r) = &e else {
        panic!("{e:?}")
    };
    assert_eq!((r.node.as_str(), r.op.as_str()), ("the_if", "If"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("node \"the_if\" (If) cannot be analysed: "),
        "{msg}"
    );
    // tract's chain stays available for --verbose, and is not the message.
    assert!(r.trace.contains("node #"), "{}", r.trace);
    assert!(!msg.contains("node #"), "{msg}");
}
