//! Isolated loading (issue 25) with the real `drover-agent` process: a new model whose
//! load or self-test runs away in memory, or whose self-test child crashes, fails its
//! deployment with the reason while the same agent process serves the old model on.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use drover_protocol::messages::Phase;
use drover_runtime::graph::{model_bytes, node, value_info, DataType, GraphDim};
use tract_onnx::pb;

const DEVICE: &str = "gw-isolate";
/// The self-test child's memory limit in these tests.
const LIMIT: u64 = 1 << 30;

/// A model that needs 4 GiB: `ConstantOfShape([2^30])` plus the input.
fn runaway_model() -> Vec<u8> {
    let shape = pb::TensorProto {
        name: "shape".into(),
        dims: vec![1],
        data_type: DataType::Int64 as i32,
        int64_data: vec![1 << 30],
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "runaway".into(),
        node: vec![
            node("ConstantOfShape", &["shape"], "big"),
            node("Add", &["big", "x"], "y"),
        ],
        initializer: vec![shape],
        input: vec![value_info("x", DataType::Float, &[GraphDim::Fixed(1)])],
        output: vec![value_info(
            "y",
            DataType::Float,
            &[GraphDim::Fixed(1 << 30)],
        )],
        ..Default::default()
    };
    model_bytes(graph, "drover-tests", "1")
}

fn spawn(dir: &Path, port: u16, keys: &Keys, loader_crash_at: Option<&str>) -> (Child, String) {
    let mut cfg = agent_config(dir, DEVICE, port, keys);
    cfg.runtime.load_memory_bytes = LIMIT;
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover-agent"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--probation-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(c) = loader_crash_at {
        cmd.args(["--loader-crash-at", c]);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("api_addr=").unwrap().to_owned();
    (child, format!("http://{addr}"))
}

async fn served_version(base: &str, body: &serde_json::Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/v2/models/dense/infer"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["model_version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_or_crashing_model_fails_its_deployment_and_the_agent_serves_on() {
    let port = start_broker();
    let keys = Arc::new(Keys::new());
    let cp = ControlPlane::start(port, DEVICE, keys.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = publish(&keys, "dense_v1", "dense", "1.0.0", 4096);
    let (in1, _) = reference("dense_v1");
    let body = infer_body(&in1);
    let runaway = publish_bytes(
        &keys,
        runaway_model(),
        "dense",
        "2.0.0",
        4096,
        (in1.clone(), vec![]),
    );
    let v3 = publish(&keys, "dense_v2", "dense", "3.0.0", 4096);
    for m in [&v1, &runaway, &v3] {
        cp.add_model(m);
    }

    // The normal path, isolated: v1 passes its self-test in a child and serves.
    let (mut agent, base) = spawn(dir.path(), port, &keys, None);
    let pid = agent.id();
    let c1 = deploy_command(&keys, DEVICE, 1, &v1);
    cp.command(1, c1.clone()).await;
    cp.wait_phase(c1.digest(), Phase::Healthy).await;
    assert_eq!(served_version(&base, &body).await, "1.0.0");

    // A model that needs 4 GiB: its child hits the limit; the agent fails the deployment.
    let c2 = deploy_command(&keys, DEVICE, 2, &runaway);
    cp.command(2, c2.clone()).await;
    let failed = cp.wait_phase(c2.digest(), Phase::Failed).await;
    assert_eq!(
        failed.detail.as_deref(),
        Some(
            "self-test failed: self-test child exceeded the 1024 MiB memory limit \
             (runtime.load_memory_bytes)"
        )
    );
    assert!(agent.try_wait().unwrap().is_none(), "the agent died");
    assert_eq!(agent.id(), pid);
    assert_eq!(served_version(&base, &body).await, "1.0.0");
    agent.kill().unwrap();
    agent.wait().unwrap();

    // The same data dir; every self-test child SIGKILLs itself once the model is loaded.
    let (mut agent, base) = spawn(dir.path(), port, &keys, Some("check_model.loaded:1"));
    assert_eq!(served_version(&base, &body).await, "1.0.0");
    let c3 = deploy_command(&keys, DEVICE, 3, &v3);
    cp.command(3, c3.clone()).await;
    let failed = cp.wait_phase(c3.digest(), Phase::Failed).await;
    assert_eq!(
        failed.detail.as_deref(),
        Some("self-test failed: self-test child killed by SIGKILL")
    );
    assert!(agent.try_wait().unwrap().is_none(), "the agent died");
    assert_eq!(served_version(&base, &body).await, "1.0.0");
    agent.kill().unwrap();
    agent.wait().unwrap();

    // Without the crash point the same model passes, so the crash was the child's alone.
    let (mut agent, base) = spawn(dir.path(), port, &keys, None);
    let c4 = deploy_command(&keys, DEVICE, 4, &v3);
    cp.command(4, c4.clone()).await;
    cp.wait_phase(c4.digest(), Phase::Healthy).await;
    assert_eq!(served_version(&base, &body).await, "3.0.0");
    agent.kill().unwrap();
    agent.wait().unwrap();
}
