//! Issue 16 acceptance: the official `tritonclient[http]` with its default settings
//! (binary tensor data both ways) passes infer, metadata, readiness, versions and
//! repository-index calls against a real `drover-agent` process, with outputs checked
//! against onnxruntime (`kserve/tritonclient_defaults.py` holds the calls).
//!
//! Needs python3 with tritonclient[http], numpy and onnxruntime (`.ci/install-deps.sh`);
//! skipped with a printed reason when absent, a failure with `DROVER_REQUIRE_PEERS=1`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use drover_protocol::messages::{DeployMode, Phase};

const DEVICE: &str = "gw-triton";

fn peers_available() -> bool {
    Command::new("python3")
        .args(["-c", "import tritonclient.http, numpy, onnxruntime"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The agent process, killed when the test ends (also on a failed assertion, so no agent
/// outlives its test holding the test's stderr open).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agent binary and reads the API address it prints.
fn spawn_agent(config: &Path) -> (Agent, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .arg("--config")
        .arg(config)
        .args(["--probation-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("api_addr=")
        .unwrap_or_else(|| panic!("unexpected stdout {line:?}"))
        .to_owned();
    (Agent(child), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_defaults_pass_infer_metadata_readiness_versions_and_repository_index() {
    if !peers_available() {
        assert!(
            std::env::var_os("DROVER_REQUIRE_PEERS").is_none_or(|v| v != "1"),
            "tritonclient[http], numpy and onnxruntime are required (DROVER_REQUIRE_PEERS=1) but not importable"
        );
        eprintln!("SKIPPED: python3 lacks tritonclient[http], numpy or onnxruntime (set DROVER_REQUIRE_PEERS=1 to fail instead)");
        return;
    }
    let port = start_broker();
    let keys = Arc::new(Keys::new());
    let cp = ControlPlane::start(port, DEVICE, keys.clone()).await;
    let v1 = publish(&keys, "dense_v1", "dense", "1.0.0", 4096);
    let v2 = publish(&keys, "dense_v2", "dense", "2.0.0", 4096);
    cp.add_model(&v1);
    cp.add_model(&v2);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let cfg = agent_config(dir.path(), DEVICE, port, &keys);
    std::fs::write(&config, cfg.to_toml().unwrap()).unwrap();
    let (agent, addr) = spawn_agent(&config);
    // Commands count only once the agent has said hello and holds the keyring.
    cp.wait_hello(1).await;

    // 1.0.0 serves; 2.0.0 is held as a shadow candidate (present, not ready).
    let c1 = deploy_command(&keys, DEVICE, 1, &v1);
    cp.command(1, c1.clone()).await;
    cp.wait_phase(c1.digest(), Phase::Healthy).await;
    let c2 = deploy_command_mode(&keys, DEVICE, 2, &v2, DeployMode::Shadow);
    cp.command(2, c2.clone()).await;
    cp.wait_phase(c2.digest(), Phase::Shadowing).await;

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kserve/tritonclient_defaults.py");
    let model = fixture("dense_v1.onnx");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .arg(&addr)
            .arg(model)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    drop(agent);
    assert!(
        out.status.success(),
        "tritonclient: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 24, "{v}");
    eprintln!("tritonclient defaults: {} checks passed", checks.len());
}
