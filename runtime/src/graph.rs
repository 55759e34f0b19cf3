//! Small ONNX graphs built in code: the built-in trainer's logistic regression, the fleet
//! simulator's sized MLPs and the benchmarks' floor models. One set of builders so every
//! producer writes the same opset and the same value-info shape.

use tract_onnx::pb;

pub use pb::tensor_proto::DataType;

/// A dimension of a graph input or output: fixed, or a named symbol (`N` for a batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphDim {
    Fixed(i64),
    Symbol(String),
}

impl GraphDim {
    /// The usual batch dimension.
    pub fn batch() -> Self {
        GraphDim::Symbol("N".into())
    }
}

/// A node with one output, named after its output.
pub fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// An integer attribute (`axis`, …).
pub fn attr_int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// A float initializer.
pub fn tensor_f32(name: &str, dims: Vec<i64>, data: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims,
        data_type: DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

/// A graph input or output of element type `elem` and shape `dims`.
pub fn value_info(name: &str, elem: DataType, dims: &[GraphDim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::dimension::Value as D;
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(match d {
                GraphDim::Fixed(n) => D::DimValue(*n),
                GraphDim::Symbol(s) => D::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The encoded model file (IR 8, default-domain opset 13).
pub fn model_bytes(graph: pb::GraphProto, producer: &str, producer_version: &str) -> Vec<u8> {
    use prost::Message as _;
    pb::ModelProto {
        ir_version: 8,
        producer_name: producer.into(),
        producer_version: producer_version.into(),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_graph_loads_and_runs_in_tract() {
        let mut softmax = node("Softmax", &["z"], "p");
        softmax.attribute.push(attr_int("axis", 1));
        let graph = pb::GraphProto {
            name: "t".into(),
            node: vec![node("MatMul", &["x", "w"], "z"), softmax],
            initializer: vec![tensor_f32("w", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0])],
            input: vec![value_info(
                "x",
                DataType::Float,
                &[GraphDim::batch(), GraphDim::Fixed(2)],
            )],
            output: vec![value_info(
                "p",
                DataType::Float,
                &[GraphDim::batch(), GraphDim::Fixed(2)],
            )],
            ..Default::default()
        };
        let bytes = model_bytes(graph, "test", "0");
        let m = crate::Model::load(&bytes).unwrap();
        assert_eq!(m.inputs().len(), 1);
        assert_eq!(m.inputs()[0].name, "x");
    }
}
