//! A rollout survives `drover serve` being killed mid-wave: the restarted control plane
//! resumes from SQLite exactly where the last committed step left it, and no device gets
//! a duplicate or stale command. 50 real in-process agents; the server is a real
//! `drover` process killed with SIGKILL.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_tests::fleet::{
    enroll, fixture, publish, roll_out_everywhere, rollout_cli, start_sites, Api,
};
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

    let mut fleet = start_sites(&api, dir, &["plant-a", "plant-b"], PER_SITE, WAIT)
        .await
        .unwrap();
    // Everyone on v1 first, through a one-wave rollout.
    roll_out_everywhere(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0", WAIT)
        .await
        .unwrap();

    // A rollout with small concurrency and a bake, so it is caught in the middle.
    let v2 = publish(&api, &fixture("dense_v2.onnx"), "dense", "2.0.0").unwrap();
    let v2_digest = v2["digest"].as_str().unwrap().to_owned();
    let r = rollout_cli(
        &api,
        &[
            "start",
            // Written before gates without a verdict held a stage; keeps that behaviour.
            "--on-no-data",
            "pass",
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

/// The MQTT password a device derives from its key (what mosquitto's password file holds).
fn device_password(cfg: &drover_agent::config::AgentConfig) -> String {
    let key: [u8; 32] = hex_key(&cfg.device_key);
    drover_protocol::DeviceKey(key).mqtt_password()
}

fn hex_key(s: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    key
}

/// On an external broker devices stay connected while the control plane restarts, so
/// they never say hello again: a step committed just before a crash (commands stored,
/// not yet published) must still reach them. `--crash-at` kills the server right after
/// the first step that issues commands commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_committed_before_a_crash_reach_devices_that_stay_connected() {
    use drover_tests::mosquitto::{self, Mosquitto, CONTROL_PLANE_USER};
    if mosquitto::binary().is_none() {
        assert!(
            !drover_tests::peers_required(),
            "mosquitto is required (DROVER_REQUIRE_PEERS=1) but not installed"
        );
        eprintln!("skipped: mosquitto not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cp_pass = "cp-secret-for-test";
    let broker = Mosquitto::start(
        &dir.join("mosquitto"),
        &[(CONTROL_PLANE_USER.to_string(), cp_pass.to_string())],
    )
    .unwrap();
    let http_port = free_port();
    let data = dir.join("server");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\ndata_dir = {:?}\nhttp_listen = \"127.0.0.1:{http_port}\"\nbroker_url = {:?}\nadvertised_broker_url = \"mqtt://127.0.0.1:{}\"\nrollout_tick_ms = 200\nrollout_republish_ms = 1500\n",
            data.to_str().unwrap(),
            broker.url(CONTROL_PLANE_USER, cp_pass),
            broker.port
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{http_port}");
    let spawn = |crash: bool| {
        let mut c = Command::new(workspace_bin("drover").unwrap());
        c.args(["serve", "--config", config.to_str().unwrap()]);
        if crash {
            c.args(["--crash-at", "rollout.after_commit:1"]);
        }
        Server(
            c.env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut server = spawn(true);
    healthy(&url).await;
    let token = std::fs::read_to_string(data.join("api-token")).unwrap();
    let api = Api::new(url.clone(), token.trim());

    let mut fleet = Vec::new();
    for i in 0..6 {
        let d = enroll(&api, dir, &format!("ext-{i}"), &[("site", "plant-x")])
            .await
            .unwrap();
        broker
            .add_users(&[(d.id.clone(), device_password(&d.config))])
            .unwrap();
        fleet.push(d);
    }
    for d in &mut fleet {
        d.start().await.unwrap();
    }
    wait_until("6 devices online through mosquitto", WAIT, || async {
        let v = api.get("/v1/devices?online=true").await.ok()?;
        (v.as_array()?.len() == 6).then_some(())
    })
    .await
    .unwrap();
    publish(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0").unwrap();
    // The first step that issues commands commits, then the server dies before publishing.
    let _ = rollout_cli(
        &api,
        &[
            "start",
            // Written before gates without a verdict held a stage; keeps that behaviour.
            "--on-no-data",
            "pass",
            "--selector",
            "all",
            "--model",
            "dense@1.0.0",
            "--waves",
            "100",
            "--bake",
            "0s",
        ],
    );
    let status = tokio::task::spawn_blocking(move || server.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "the crash point killed the server");
    let issued: Vec<usize> = {
        // The store holds the commands the crashed step committed.
        let _restarted = spawn(false);
        healthy(&url).await;
        let mut n = Vec::new();
        for d in &fleet {
            let c = api
                .get(&format!("/v1/devices/{}/commands", d.id))
                .await
                .unwrap();
            n.push(c.as_array().unwrap().len());
        }
        assert!(
            n.iter().all(|&k| k == 1),
            "one committed command each: {n:?}"
        );
        wait_until(
            "devices that never reconnected run dense@1.0.0",
            WAIT,
            || async {
                let m = api.active_models().await.ok()?;
                m.values()
                    .all(|v| v.as_deref() == Some("dense@1.0.0"))
                    .then_some(())
            },
        )
        .await
        .unwrap();
        wait_until("the rollout completes", WAIT, || async {
            let r = api.get("/v1/rollouts/1").await.ok()?;
            (r["status"] == "completed").then_some(())
        })
        .await
        .unwrap();
        let mut after = Vec::new();
        for d in &fleet {
            let c = api
                .get(&format!("/v1/devices/{}/commands", d.id))
                .await
                .unwrap();
            after.push(c.as_array().unwrap().len());
        }
        after
    };
    assert!(
        issued.iter().all(|&k| k == 1),
        "republished, not re-issued: {issued:?}"
    );
    for d in &mut fleet {
        d.stop().await.unwrap();
    }
}
