//! Test vectors that test (issue 16): a model whose input is over 1 Mi elements (a
//! 1×3×640×640 image) used to get no vectors at all, so its devices' self-test checked
//! nothing. Publish now derives sampled vectors (seeded inputs, outputs sampled with a
//! tolerance relative to each output's scale) that fit in a few kilobytes of manifest,
//! pass on the same model and catch a model that computes something else.

use drover_control_plane::registry::{prepare, PublishRequest};
use drover_protocol::envelope::MAX_MANIFEST_LEN;
use drover_protocol::trust::SecretKey;
use drover_runtime::graph::{model_bytes, node, tensor_f32, value_info, DataType, GraphDim};
use drover_runtime::{self_test_sampled, Model, RuntimeError};
use tract_onnx::pb;

/// `y = x · scale + shift` per channel, on a 1×3×640×640 image; `score = mean(y)`.
fn image_model(gain: f32) -> Vec<u8> {
    let img = [1, 3, 640, 640].map(GraphDim::Fixed);
    let graph = pb::GraphProto {
        name: "image".into(),
        node: vec![
            node("Mul", &["x", "scale"], "scaled"),
            node("Add", &["scaled", "shift"], "y"),
            node("ReduceMean", &["y"], "score"),
        ],
        initializer: vec![
            tensor_f32(
                "scale",
                vec![1, 3, 1, 1],
                vec![0.5 * gain, 2.0 * gain, 40.0 * gain],
            ),
            tensor_f32("shift", vec![1, 3, 1, 1], vec![0.1, -0.2, 3.0]),
        ],
        input: vec![value_info("x", DataType::Float, &img)],
        output: vec![
            value_info("y", DataType::Float, &img),
            value_info("score", DataType::Float, &[1, 1, 1, 1].map(GraphDim::Fixed)),
        ],
        ..Default::default()
    };
    model_bytes(graph, "drover-test", "1")
}

#[test]
fn a_model_with_a_large_input_gets_small_sampled_vectors_that_catch_a_wrong_model() {
    let bytes = image_model(1.0);
    let req = PublishRequest {
        name: "detector".into(),
        version: "1.0.0".into(),
        model: bytes.clone(),
        ..Default::default()
    };
    let p = prepare(&req, &SecretKey::from_seed([1; 32]), 0).unwrap();
    let (m, blob) = (p.manifest, p.blob);
    assert!(m.test_vectors.is_empty());
    assert_eq!(m.sampled_vectors.len(), 3);
    for v in &m.sampled_vectors {
        assert_eq!(v.inputs[0].shape, vec![1, 3, 640, 640]);
        let y = &v.outputs[0];
        assert_eq!((y.stride, y.values.len()), (300, 4096));
        // The scale of `y` is set by the 40× channel: the tolerance follows it.
        assert!(y.scale > 40.0 && y.scale < 44.0, "{}", y.scale);
        assert_eq!(v.outputs[1].values.len(), 1);
    }
    // Three vectors for a 4.9 MB input in a manifest of a few kilobytes.
    println!("manifest {} bytes", blob.payload.len());
    assert!(blob.payload.len() < 128 * 1024, "{}", blob.payload.len());
    assert!(blob.payload.len() < MAX_MANIFEST_LEN);
    let decoded = drover_protocol::manifest::Manifest::decode(&blob.payload).unwrap();
    assert_eq!(decoded, m);

    // The same model passes on the device's check; one whose weights are 1 % off fails,
    // naming the output and element; one 0.01 % off is within the relative tolerance.
    let same = Model::load(&bytes).unwrap();
    assert!(self_test_sampled(&same, &m.sampled_vectors).is_ok());
    let off = Model::load(&image_model(1.01)).unwrap();
    match self_test_sampled(&off, &m.sampled_vectors) {
        Err(RuntimeError::SelfTest { vector: 0, detail }) => {
            assert!(detail.contains("output \"y\" element"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    let close = Model::load(&image_model(1.0001)).unwrap();
    assert!(self_test_sampled(&close, &m.sampled_vectors).is_ok());
}
