//! The whole system end to end on the embedded default: `drover serve` (embedded rumqttd,
//! SQLite in a temp dir), the `drover` CLI, and two real agents — one in-process through
//! `drover_agent::run`, one a real `drover-agent` process — over real MQTT, with real
//! signatures and a real ONNX model run by tract.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::{cli_devices, cli_enroll, drover_cli, free_port, wait_until, workspace_bin};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures")
        .join(name)
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn devices(server: &[&str]) -> Vec<Value> {
    cli_devices(server)
}

fn device<'a>(list: &'a [Value], id: &str) -> Option<&'a Value> {
    list.iter().find(|d| d["id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_enroll_deploy_serve_report_and_go_offline_by_last_will() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];

    // Enroll two devices at two sites; start one in-process and one as a real process.
    let cfg_a = cli_enroll(&srv, dir, "gw-a", &["site=plant-a"], "127.0.0.1:0").unwrap();
    let port_b = free_port();
    cli_enroll(
        &srv,
        dir,
        "gw-b",
        &["site=plant-b"],
        &format!("127.0.0.1:{port_b}"),
    )
    .unwrap();
    let (stop_a, stop_a_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_a = drover_agent::run(cfg_a, async {
        let _ = stop_a_rx.await;
    })
    .await
    .unwrap();
    let mut agent_b = KillOnDrop(
        Command::new(workspace_bin("drover-agent").unwrap())
            .args(["--config", dir.join("gw-b.toml").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    wait_until("both devices online", WAIT, || async {
        let l = devices(&srv);
        let on = |id| device(&l, id).is_some_and(|d| d["online"] == true);
        (on("gw-a") && on("gw-b")).then_some(())
    })
    .await
    .unwrap();

    // Publish a real ONNX model (exported by outside tools) and deploy it to both.
    let published = drover_cli(
        &[
            &[
                "model",
                "publish",
                fixture("dense_v1.onnx").to_str().unwrap(),
                "--name",
                "dense",
                "--version",
                "1.0.0",
                "--output",
                "json",
            ][..],
            &srv,
        ]
        .concat(),
    )
    .unwrap();
    let published: Value = serde_json::from_str(&published).unwrap();
    assert_eq!(published["version"], "1.0.0", "{published}");
    for id in ["gw-a", "gw-b"] {
        drover_cli(
            &[
                &["device", "deploy", id, "--model", "dense@1.0.0"][..],
                &srv,
            ]
            .concat(),
        )
        .unwrap();
    }
    wait_until("both devices report dense@1.0.0 active", WAIT, || async {
        let l = devices(&srv);
        let active = |id| {
            device(&l, id).is_some_and(|d| {
                d["active_model"]
                    .as_str()
                    .is_some_and(|m| m.contains("1.0.0"))
            })
        };
        (active("gw-a") && active("gw-b")).then_some(())
    })
    .await
    .unwrap();

    // Both agents serve the model over KServe v2 with onnxruntime's outputs.
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("dense_v1.json")).unwrap()).unwrap();
    let input = &reference["inputs"][0];
    let want: Vec<f64> = reference["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let http = reqwest::Client::new();
    for addr in [
        agent_a.api_addr().to_string(),
        format!("127.0.0.1:{port_b}"),
    ] {
        let body = json!({"id": "e2e-1", "inputs": [{
            "name": input["name"], "shape": input["shape"], "datatype": "FP32", "data": input["data"]
        }]});
        let resp: Value = wait_until("agent answers inference", WAIT, || {
            let http = http.clone();
            let body = body.clone();
            let addr = addr.clone();
            async move {
                let r = http
                    .post(format!("http://{addr}/v2/models/dense/infer"))
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                if !r.status().is_success() {
                    return None;
                }
                r.json::<Value>().await.ok()
            }
        })
        .await
        .unwrap();
        let got: Vec<f64> = resp["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4,
                "{addr}: {got:?} vs onnxruntime {want:?}"
            );
        }
    }

    // Telemetry rows reach the store for both devices, counting the inference.
    for id in ["gw-a", "gw-b"] {
        let tele_url = format!("{url}/v1/devices/{id}/telemetry");
        wait_until(
            &format!("telemetry with an inference from {id}"),
            WAIT,
            || {
                let http = http.clone();
                let tele_url = tele_url.clone();
                let token = token.clone();
                async move {
                    let v: Value = http
                        .get(&tele_url)
                        .bearer_auth(&token)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    let rows = v.as_array()?;
                    rows.iter()
                        .any(|r| r["inferences"].as_u64().unwrap_or(0) > 0)
                        .then_some(())
                }
            },
        )
        .await
        .unwrap();
    }

    // SIGKILL the process agent: the broker publishes its last will, and it goes offline.
    agent_b.0.kill().unwrap();
    let _ = agent_b.0.wait();
    wait_until("gw-b offline by last will", WAIT, || async {
        let l = devices(&srv);
        device(&l, "gw-b")
            .is_some_and(|d| d["online"] == false)
            .then_some(())
    })
    .await
    .unwrap();
    let l = devices(&srv);
    assert_eq!(
        device(&l, "gw-a").unwrap()["online"],
        true,
        "gw-a stays online"
    );

    // A clean stop of the in-process agent also marks it offline.
    let _ = stop_a.send(());
    agent_a.wait().await.unwrap();
    wait_until("gw-a offline after shutdown", WAIT, || async {
        let l = devices(&srv);
        device(&l, "gw-a")
            .is_some_and(|d| d["online"] == false)
            .then_some(())
    })
    .await
    .unwrap();
    server.shutdown().await;
}
