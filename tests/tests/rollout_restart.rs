//! A rollout survives `drover serve` being killed mid-wave: the restarted control plane
//! resumes from SQLite exactly where the last committed step left it, and no device gets
//! a duplicate or stale command. 50 real in-process agents; the server is a real
//! `drover` process killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_tests::fleet::{enroll, fixture, publish, rollout_cli, Api};
use drover_tests::{free_port, wait_until, workspace_bin};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(180);
const PER_SITE: usize = 25;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(config: &Path) -> Server {
    Server(
        Command::new(workspace_bin("drover").unwrap())
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn healthy(url: &str) {
    wait_until("drover serve to answer /healthz", WAIT, || async {
        let r = reqwest::get(format!("{url}/healthz")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .unwrap();
}

fn ids(site: &str) -> Vec<String> {
    (0..PER_SITE).map(|i| format!("{site}-{i:02}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_killed_mid_wave_resumes_without_duplicate_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (http_port, mqtt_port) = (free_port(), free_port());
    let data = dir.join("server");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\ndata_dir = {:?}\nhttp_listen = \"127.0.0.1:{http_port}\"\nmqtt_listen = \"127.0.0.1:{mqtt_port}\"\nrollout_tick_ms = 200\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{http_port}");
    let mut server = start_server(&config);
    healthy(&url).await;
    let token = std::fs::read_to_string(data.join("api-token")).unwrap();
    let api = Api::new(url.clone(), token.trim());

    let mut fleet = Vec::new();
    for site in ["plant-a", "plant-b"] {
        for id in ids(site) {
            let mut d = enroll(&api, dir, &id, &[("site", site)]).await.unwrap();
            d.start().await.unwrap();
            fleet.push(d);
        }
    }
    wait_until("50 devices online", WAIT, || async {
        let v = api.get("/v1/devices?online=true").await.ok()?;
        (v.as_array()?.len() == 2 * PER_SITE).then_some(())
    })
    .await
    .unwrap();
    publish(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0").unwrap();
    let r = rollout_cli(
        &api,
        &[
            "start",
            "--model",
            "dense@1.0.0",
            "--waves",
            "100",
            "--bake",
            "0s",
        ],
    )
    .unwrap();
    let first = r["id"].as_u64().unwrap();
    wait_until("everyone on dense@1.0.0", WAIT, || async {
        let r = api.get(&format!("/v1/rollouts/{first}")).await.ok()?;
        (r["status"] == "completed").then_some(())
    })
    .await
    .unwrap();

    // A rollout with small concurrency and a bake, so it is caught in the middle.
    let v2 = publish(&api, &fixture("dense_v2.onnx"), "dense", "2.0.0").unwrap();
    let v2_digest = v2["digest"].as_str().unwrap().to_owned();
    let r = rollout_cli(
        &api,
        &[
            "start",
            "--model",
            "dense@2.0.0",
            "--selector",
            "site=plant-a",
            "--waves",
            "10,50,100",
            "--bake",
            "2s",
            "--max-concurrent",
            "3",
        ],
    )
    .unwrap();
    let id = r["id"].as_u64().unwrap();
    let before: Value = wait_until(
        "the rollout in wave 2 with devices in flight",
        WAIT,
        || async {
            let r = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
            let in_flight = r["waves"][1]["in_flight"].as_u64().unwrap_or(0);
            (r["wave"] == 2 && in_flight > 0).then_some(r)
        },
    )
    .await
    .unwrap();
    assert_eq!(before["status"], "running");

    // SIGKILL: no graceful anything.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    let _server = start_server(&config);
    healthy(&url).await;

    let done: Value = wait_until("the resumed rollout to complete", WAIT, || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
        assert!(
            !matches!(r["status"].as_str(), Some("paused" | "rolled-back")),
            "{r:#}"
        );
        (r["status"] == "completed").then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(done["devices"]["healthy"], 25, "{done:#}");
    assert!(done["wave"].as_u64().unwrap() >= before["wave"].as_u64().unwrap());

    // Exactly one v2 deploy command per plant-a device, none for plant-b.
    let mut per_device: BTreeMap<String, usize> = BTreeMap::new();
    for site in ["plant-a", "plant-b"] {
        for dev in ids(site) {
            let cmds = api
                .get(&format!("/v1/devices/{dev}/commands"))
                .await
                .unwrap();
            let cmds = cmds.as_array().unwrap();
            let seqs: Vec<u64> = cmds.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{dev}: {seqs:?}");
            let n = cmds
                .iter()
                .filter(|c| c["model_digest"] == v2_digest.as_str())
                .count();
            per_device.insert(dev, n);
        }
    }
    for dev in ids("plant-a") {
        assert_eq!(per_device[&dev], 1, "{dev}: {per_device:?}");
    }
    for dev in ids("plant-b") {
        assert_eq!(per_device[&dev], 0, "{dev}");
    }
    let models = api.active_models().await.unwrap();
    for dev in ids("plant-a") {
        assert_eq!(models[&dev].as_deref(), Some("dense@2.0.0"), "{dev}");
    }
    let report = api.get(&format!("/v1/rollouts/{id}/report")).await.unwrap();
    let kinds: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "advanced").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");

    for d in &mut fleet {
        d.stop().await.unwrap();
    }
}
