//! The local inference API speaks KServe v2: proven with the real `tritonclient[http]`
//! Python client when it is installed (plain HTTP otherwise), and every malformed request
//! gets a 4xx with a JSON error.

mod common;

use common::*;
use drover_protocol::messages::{DeployMode, Phase, Uplink};
use serde_json::json;

fn tritonclient_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import tritonclient.http, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

const TRITON_SCRIPT: &str = r#"
import json, sys
import numpy as np
import tritonclient.http as httpclient
url, data = sys.argv[1], json.loads(sys.argv[2])
c = httpclient.InferenceServerClient(url=url)
assert c.is_server_live()
assert c.is_server_ready()
assert c.is_model_ready("dense")
meta = c.get_model_metadata("dense")
server = c.get_server_metadata()
x = np.array(data, dtype=np.float32).reshape(2, 16)
inp = httpclient.InferInput("x", [2, 16], "FP32")
inp.set_data_from_numpy(x, binary_data=False)
out = httpclient.InferRequestedOutput("y", binary_data=False)
r = c.infer("dense", [inp], outputs=[out], request_id="req-7")
print(json.dumps({"y": r.as_numpy("y").ravel().tolist(), "meta": meta, "server": server,
                  "id": r.get_response()["id"]}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v2_api_works_with_tritonclient_and_refuses_malformed_requests() {
    let mut h = Harness::start("gw-api", |c| c.telemetry.interval_ms = 200).await;
    let v1 = publish(&h.keys, "dense_v1", "dense", "1.0.0", 4096);
    let c = h.deploy(&v1, DeployMode::Activate).await;
    h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    let (inputs, outputs) = reference("dense_v1");
    let http = reqwest::Client::new();
    let base = h.base.clone();

    // Metadata and health.
    let m: serde_json::Value = http
        .get(format!("{base}/v2/models/dense"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        m["inputs"][0],
        json!({"name": "x", "datatype": "FP32", "shape": [-1, 16]})
    );
    assert_eq!(m["outputs"][0]["name"], "y");
    assert_eq!(m["versions"], json!(["1.0.0"]));
    for p in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/dense/ready",
        "/v2",
    ] {
        assert_eq!(
            http.get(format!("{base}{p}"))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{p}"
        );
    }

    // The real Triton client, if it installs here.
    let x = f32s(&inputs[0]);
    if tritonclient_available() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                TRITON_SCRIPT,
                base.trim_start_matches("http://"),
                &json!(x).to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tritonclient: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let y: Vec<f32> = v["y"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert!(close(&y, &f32s(&outputs[0])), "{v}");
        assert_eq!(v["id"], "req-7");
        assert_eq!(v["meta"]["name"], "dense");
        eprintln!("tritonclient[http] round trip ok");
    } else {
        // CI installs the real client (.ci/install-deps.sh); there its absence is a failure.
        assert!(
            std::env::var_os("DROVER_REQUIRE_PEERS").is_none_or(|v| v != "1"),
            "tritonclient[http] is required (DROVER_REQUIRE_PEERS=1) but not importable"
        );
        eprintln!("tritonclient not installed: checked with plain HTTP only");
    }

    // Plain HTTP inference and feedback on its request id.
    let r: serde_json::Value = http
        .post(format!("{base}/v2/models/dense/infer"))
        .json(&infer_body(&inputs))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(close(&first_output(&r), &f32s(&outputs[0])));
    let id = r["id"].as_str().unwrap().parse::<u64>().unwrap();
    let fb = http
        .post(format!("{base}/v2/models/dense/feedback"))
        .json(&json!({"id": id, "label": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(fb.status(), 200);
    let unknown = http
        .post(format!("{base}/v2/models/dense/feedback"))
        .json(&json!({"id": 999_999, "label": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    h.cp.wait_for("label uplink", |s| {
        s.frames.iter().find_map(|f| match &f.msg {
            Uplink::Labels(l)
                if l.labels
                    .iter()
                    .any(|l| l.request_id == id && l.value == 2.0) =>
            {
                Some(())
            }
            _ => None,
        })
    })
    .await;

    // Malformed requests: 4xx with a JSON error naming the problem.
    let ok_data: Vec<f32> = vec![0.5; 32];
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("dense", "not json".into(), 400, "malformed inference request"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [2, 15], "datatype": "FP32", "data": vec![0.5; 30]}]}).to_string(), 400, "shape"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "INT64", "data": vec![1; 32]}]}).to_string(), 400, "expected F32, got I64"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": vec![0.5; 31]}]}).to_string(), 400, "needs 32 values, got 31"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": ["a"]}]}).to_string(), 400, "non-numeric"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [-2, 16], "datatype": "FP32", "data": ok_data}]}).to_string(), 400, "negative dimension"),
        ("dense", json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "STRANGE", "data": ok_data}]}).to_string(), 400, "unsupported datatype"),
        ("dense", json!({"inputs": []}).to_string(), 400, "expects 1 inputs, got 0"),
        ("nope", json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": ok_data}]}).to_string(), 404, "not served here"),
    ];
    for (model, body, status, needle) in cases {
        let r = http
            .post(format!("{base}/v2/models/{model}/infer"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    // Prometheus metrics count what happened above, on their own listener: the inference
    // API has no /metrics, the metrics listener nothing of the inference API.
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!("{}/v2/models/dense", h.metrics_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = http
        .get(format!("{}/metrics", h.metrics_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("drover_agent_model_info{name=\"dense\",version=\"1.0.0\"} 1"),
        "{text}"
    );
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(count("drover_agent_inferences_total") >= 2);
    assert!(count("drover_agent_inference_rejected_total") >= 3);
    assert_eq!(count("drover_agent_inference_errors_total"), 0);
    // Run time in seconds, a histogram per model version: every inference that reached
    // the model is in its count.
    let runs = count(
        "drover_agent_inference_duration_seconds_count{model=\"dense\",version=\"1.0.0\",role=\"active\"}",
    );
    assert_eq!(runs, count("drover_agent_inferences_total"));
    assert!(text.contains("# TYPE drover_agent_inference_duration_seconds histogram"));
    assert!(!text.contains("microseconds"), "{text}");
    assert_eq!(count("drover_agent_broker_connected"), 1);
    assert!(count("drover_agent_self_tests_total") >= 1);

    // Nested data (KServe allows it) is accepted.
    let nested: Vec<Vec<f32>> = x.chunks(16).map(<[f32]>::to_vec).collect();
    let r = http
        .post(format!("{base}/v2/models/dense/infer"))
        .json(&json!({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": nested}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}
