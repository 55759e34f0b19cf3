//! The binary tensor data extension and the spec's error objects, with a raw HTTP client:
//! framing edge cases (header length past the body, `binary_data_size` that does not add
//! up or does not match the shape), NaN/Inf round trips bit for bit, per-output binary or
//! JSON, unknown outputs (400), versions, the repository index, and a JSON error object
//! on every 4xx (404 and 405 included).

mod common;

use common::*;
use drover_protocol::manifest::{TensorData, TensorValue};
use drover_protocol::messages::{DeployMode, Phase};
use drover_runtime::graph::{model_bytes, node, tensor_f32, value_info, DataType, GraphDim};
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use serde_json::{json, Value};
use tract_onnx::pb;

/// `y = x + 0` and `z = 2x` over `x: [N, 4]`: outputs carry the inputs' NaN and Inf.
fn echo_model() -> Vec<u8> {
    let dims = [GraphDim::batch(), GraphDim::Fixed(4)];
    let graph = pb::GraphProto {
        name: "echo".into(),
        node: vec![
            node("Add", &["x", "zero"], "y"),
            node("Mul", &["x", "two"], "z"),
        ],
        initializer: vec![
            tensor_f32("zero", vec![4], vec![0.0; 4]),
            tensor_f32("two", vec![4], vec![2.0; 4]),
        ],
        input: vec![value_info("x", DataType::Float, &dims)],
        output: vec![
            value_info("y", DataType::Float, &dims),
            value_info("z", DataType::Float, &dims),
        ],
        ..Default::default()
    };
    model_bytes(graph, "drover-tests", "1")
}

fn tensor(name: &str, data: Vec<f32>) -> TensorValue {
    TensorValue {
        name: name.into(),
        shape: vec![data.len() as u64 / 4, 4],
        data: TensorData::F32(data),
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_le(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A binary request body: the JSON header, then `binary`; and the header's length.
fn framed(header: &Value, binary: &[u8]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let n = body.len();
    body.extend_from_slice(binary);
    (body, n)
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    /// The error object's message; every error status must carry one.
    fn error(&self) -> String {
        let v: Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} without a JSON error ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        v["error"].as_str().unwrap_or_default().to_owned()
    }
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.unwrap();
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap().to_vec(),
    }
}

async fn post_framed(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    header_len: Option<&str>,
) -> Reply {
    let mut req = http
        .post(url)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(body);
    if let Some(n) = header_len {
        req = req.header("Inference-Header-Content-Length", n);
    }
    send(req).await
}

fn x_binary(size: usize) -> Value {
    json!({"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensors_round_trip_nan_and_inf_and_every_refusal_is_a_json_error() {
    let mut h = Harness::start("gw-binary", |_| {}).await;
    let probe: Vec<f32> = (1..=8).map(|v| v as f32).collect();
    let twice: Vec<f32> = probe.iter().map(|v| v * 2.0).collect();
    let echo = publish_bytes(
        &h.keys,
        echo_model(),
        "echo",
        "1.0.0",
        4096,
        (
            vec![tensor("x", probe.clone())],
            vec![tensor("y", probe.clone()), tensor("z", twice)],
        ),
    );
    let c = h.deploy(&echo, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    let http = reqwest::Client::new();
    let base = h.base.clone();
    let infer = format!("{base}/v2/models/echo/infer");

    // NaN, ±Inf, -0 and extremes round trip bit for bit through binary inputs and outputs.
    let x = [
        1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        f32::MAX,
        f32::MIN_POSITIVE,
        -3.5,
    ];
    let header = json!({"inputs": [x_binary(32)], "parameters": {"binary_data_output": true}});
    let (body, n) = framed(&header, &le_bytes(&x));
    let r = post_framed(&http, &infer, body, Some(&n.to_string())).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers[CONTENT_TYPE], "application/octet-stream");
    let hl: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..hl]).unwrap();
    assert_eq!(head["model_version"], "1.0.0");
    assert_eq!(
        head["outputs"],
        json!([
            {"name": "y", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}},
            {"name": "z", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}},
        ])
    );
    let (y, z) = (from_le(&r.body[hl..hl + 32]), from_le(&r.body[hl + 32..]));
    assert!(y[1].is_nan() && z[1].is_nan());
    assert_eq!((y[0], &y[2..]), (x[0], &x[2..]));
    assert_eq!(
        z[2..],
        [
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::INFINITY,
            2.0 * f32::MIN_POSITIVE,
            -7.0
        ]
    );

    // Per output: z as JSON, y binary; requested order kept.
    let header = json!({"inputs": [x_binary(32)], "outputs": [
        {"name": "z", "parameters": {"binary_data": false}}, {"name": "y", "parameters": {"binary_data": true}}]});
    let (body, n) = framed(&header, &le_bytes(&probe));
    let r = post_framed(&http, &infer, body, Some(&n.to_string())).await;
    assert_eq!(r.status, 200);
    let hl: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&r.body[..hl]).unwrap();
    assert_eq!(head["outputs"][0]["name"], "z");
    assert_eq!(
        head["outputs"][0]["data"],
        json!([2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0])
    );
    assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 32);
    assert_eq!(from_le(&r.body[hl..]), probe);

    // Framing and data refusals: 400 with an error object naming the problem.
    let ok = le_bytes(&probe);
    let cases: Vec<(Value, Vec<u8>, Option<String>, &str)> = vec![
        (
            json!({"inputs": [x_binary(32)]}),
            ok.clone(),
            Some("9999".into()),
            "exceeds the body's",
        ),
        (
            json!({"inputs": [x_binary(32)]}),
            ok.clone(),
            Some("ten".into()),
            "not a byte count",
        ),
        (
            json!({"inputs": [x_binary(36)]}),
            ok.clone(),
            None,
            "runs past the body's binary section",
        ),
        (
            json!({"inputs": [x_binary(28)]}),
            ok.clone(),
            None,
            "4 bytes of binary data beyond",
        ),
        (
            json!({"inputs": [x_binary(28)]}),
            ok[..28].to_vec(),
            None,
            "binary_data_size is 28 bytes but shape [2, 4] of FP32 needs 32",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": probe, "parameters": {"binary_data_size": 32}}]}),
            ok.clone(),
            None,
            "both data and",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "UINT8", "parameters": {"binary_data_size": 8}}]}),
            vec![1; 8],
            None,
            "binary UINT8 data is not taken",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]}),
            [3, 0, 0, 0, b'a', b'b', b'c'].to_vec(),
            None,
            "input \"x\" is BYTES but the model's input \"x\" is FP32",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}),
            [9, 0, 0, 0, b'a', b'b'].to_vec(),
            None,
            "claims 9 bytes but 2 remain",
        ),
        (
            json!({"inputs": [x_binary(32)], "outputs": [{"name": "w"}]}),
            ok.clone(),
            None,
            "has no output \"w\" (its outputs: y, z)",
        ),
    ];
    for (header, binary, claimed, needle) in cases {
        let (body, n) = framed(&header, &binary);
        let claimed = claimed.unwrap_or_else(|| n.to_string());
        let r = post_framed(&http, &infer, body, Some(&claimed)).await;
        assert_eq!(r.status, 400, "{header}");
        let e = r.error();
        assert!(e.contains(needle), "{header}: {e:?} lacks {needle:?}");
    }
    // binary_data_size without the header; a JSON request naming an unknown output;
    // a compressed body.
    let r = post_framed(
        &http,
        &infer,
        serde_json::to_vec(&json!({"inputs": [x_binary(32)]})).unwrap(),
        None,
    )
    .await;
    assert!(
        r.error().contains("no Inference-Header-Content-Length"),
        "{}",
        r.error()
    );
    let r = send(http.post(&infer).json(&json!({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": probe}], "outputs": [{"name": "w"}]}))).await;
    assert_eq!(
        (r.status, r.error().contains("no output \"w\"")),
        (400, true)
    );
    let r = send(
        http.post(&infer)
            .header("content-encoding", "gzip")
            .body("x"),
    )
    .await;
    assert_eq!((r.status, r.error().contains("not supported")), (400, true));

    // Versions: the served one answers, others are 404 with an error object.
    let r = send(http.post(format!("{base}/v2/models/echo/versions/1.0.0/infer")).json(&json!({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": probe}]}))).await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (
            v["model_version"].as_str(),
            v["outputs"][1]["data"][0].as_f64()
        ),
        (Some("1.0.0"), Some(2.0))
    );
    let index = send(http.post(format!("{base}/v2/repository/index"))).await;
    let index: Value = serde_json::from_slice(&index.body).unwrap();
    assert_eq!(
        index,
        json!([{"name": "echo", "version": "1.0.0", "state": "READY"}])
    );
    let server: Value =
        serde_json::from_slice(&send(http.get(format!("{base}/v2"))).await.body).unwrap();
    assert!(server["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));

    // Every 404 and 405 carries an error object.
    let not_found = [
        (
            http.post(format!("{base}/v2/models/echo/versions/9.9.9/infer"))
                .json(&json!({"inputs": []})),
            "no version \"9.9.9\"",
        ),
        (
            http.post(format!("{base}/v2/models/nope/infer"))
                .json(&json!({"inputs": []})),
            "not served here",
        ),
        (
            http.get(format!("{base}/v2/models/echo/versions/9.9.9")),
            "no version \"9.9.9\"",
        ),
        (
            http.get(format!("{base}/v2/models/echo/versions/9.9.9/ready")),
            "no version \"9.9.9\"",
        ),
        (
            http.get(format!("{base}/v2/models/nope/ready")),
            "not served here",
        ),
        (
            http.get(format!("{base}/v2/nothing/here")),
            "no such endpoint",
        ),
    ];
    for (req, needle) in not_found {
        let r = send(req).await;
        assert_eq!(r.status, 404);
        assert!(
            r.error().contains(needle),
            "{:?} lacks {needle:?}",
            r.error()
        );
    }
    let r = send(http.get(&infer)).await;
    assert_eq!(
        (r.status, r.error().contains("method not allowed")),
        (405, true)
    );
    h.stop().await;
}
