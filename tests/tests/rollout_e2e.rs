//! Staged rollouts end to end: 50 real agents (in-process, each with its own MQTT session,
//! keys, store and tract runtime) at two sites, the embedded broker, the `drover` CLI.
//!
//! (a) a good model reaches 100 % of its site through every wave; the other site is
//!     untouched; devices offline during the rollout are picked up when they return;
//! (b) a model that raises the error rate on the canary wave is stopped there and rolled
//!     back, and no device outside the canary ever received it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{
    fixture, publish, roll_out_everywhere, rollout_cli, start_sites, Api, Device, Traffic,
};
use drover_tests::wait_until;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(180);
const PER_SITE: usize = 25;

async fn rollout(api: &Api, id: u64) -> Value {
    api.get(&format!("/v1/rollouts/{id}")).await.unwrap()
}

async fn wait_status(api: &Api, id: u64, want: &str) -> Value {
    let what = format!("rollout {id} to be {want}");
    wait_until(&what, WAIT, || async {
        let r = rollout(api, id).await;
        let status = r["status"].as_str().unwrap_or_default().to_owned();
        if status == want {
            return Some(r);
        }
        assert!(
            !matches!(status.as_str(), "paused" | "rolled-back" | "completed"),
            "rollout {id} ended {status} while waiting for {want}: {r:#}"
        );
        None
    })
    .await
    .unwrap()
}

fn ids(site: &str) -> Vec<String> {
    (0..PER_SITE).map(|i| format!("{site}-{i:02}")).collect()
}

fn refresh(targets: &Arc<Mutex<Vec<std::net::SocketAddr>>>, fleet: &[Device]) {
    *targets.lock().unwrap() = fleet.iter().filter_map(Device::api_addr).collect();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_agents_good_model_reaches_its_site_bad_model_stops_at_the_canary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        rollout_tick_ms: 200,
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());

    let mut fleet = start_sites(&api, dir, &["plant-a", "plant-b"], PER_SITE, WAIT)
        .await
        .unwrap();
    // Everyone on v1 first, through a one-wave rollout.
    roll_out_everywhere(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0", WAIT)
        .await
        .unwrap();
    let models = api.active_models().await.unwrap();
    assert!(
        models.values().all(|m| m.as_deref() == Some("dense@1.0.0")),
        "{models:?}"
    );

    // Live traffic on every device, so gates have inferences and latencies to judge.
    let targets = Arc::new(Mutex::new(Vec::new()));
    refresh(&targets, &fleet);
    let traffic = Traffic::start(targets.clone(), "dense", Duration::from_millis(150), 2);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Three plant-a devices go offline before the rollout.
    let offline: Vec<String> = ids("plant-a").into_iter().rev().take(3).collect();
    for d in fleet.iter_mut().filter(|d| offline.contains(&d.id)) {
        d.stop().await.unwrap();
    }
    refresh(&targets, &fleet);
    wait_until("3 devices offline", WAIT, || async {
        let v = api.get("/v1/devices?online=true").await.ok()?;
        (v.as_array()?.len() == 2 * PER_SITE - 3).then_some(())
    })
    .await
    .unwrap();

    // (a) A good model to plant-a in three cumulative waves.
    publish(&api, &fixture("dense_v2.onnx"), "dense", "2.0.0").unwrap();
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
            "1s",
            "--min-inferences",
            "5",
            // Debug builds on a loaded 2-core machine: latency is judged coarsely here;
            // the engine tests check the ratio gate exactly.
            "--max-p99-latency-ratio",
            "50",
            "--by",
            "release-bot",
        ],
    )
    .unwrap();
    let good = r["id"].as_u64().unwrap();
    let done = wait_status(&api, good, "completed").await;
    let waves = done["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3);
    assert_eq!(
        waves
            .iter()
            .map(|w| w["target"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![3, 13, 25],
        "cumulative 10/50/100 % of 25 selected"
    );
    let models = api.active_models().await.unwrap();
    for id in ids("plant-a") {
        let want = if offline.contains(&id) {
            "dense@1.0.0"
        } else {
            "dense@2.0.0"
        };
        assert_eq!(models[&id].as_deref(), Some(want), "{id}");
    }
    for id in ids("plant-b") {
        assert_eq!(
            models[&id].as_deref(),
            Some("dense@1.0.0"),
            "{id} untouched"
        );
        let cmds = api
            .get(&format!("/v1/devices/{id}/commands"))
            .await
            .unwrap();
        assert_eq!(
            cmds.as_array().unwrap().len(),
            1,
            "{id}: only the v1 command"
        );
    }
    let report = rollout_cli(&api, &["report", &good.to_string()]).unwrap();
    assert!(
        report["events"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("release-bot started"),
        "who started it: {:#}",
        report["events"][0]
    );
    let kinds: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "advanced").count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.contains(&"completed"), "{kinds:?}");
    let advanced = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "advanced")
        .unwrap();
    let error_gate = advanced["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == "error_rate")
        .unwrap();
    assert_eq!(error_gate["verdict"], "pass", "{advanced:#}");
    assert!(
        error_gate["value"].as_f64().is_some(),
        "gates judged real traffic"
    );

    // The offline devices come back and are picked up by the completed rollout.
    for d in fleet.iter_mut().filter(|d| offline.contains(&d.id)) {
        d.start().await.unwrap();
    }
    refresh(&targets, &fleet);
    wait_until("late devices install dense@2.0.0", WAIT, || async {
        let m = api.active_models().await.ok()?;
        offline
            .iter()
            .all(|id| m[id].as_deref() == Some("dense@2.0.0"))
            .then_some(())
    })
    .await
    .unwrap();
    wait_until(
        "the rollout counts the late devices healthy",
        WAIT,
        || async {
            let r = rollout(&api, good).await;
            (r["devices"]["healthy"] == 25).then_some(())
        },
    )
    .await
    .unwrap();

    // (b) A model that fails on half the live inputs, to plant-b, rollback on failure.
    let bad = publish(&api, &fixture("fragile.onnx"), "dense", "3.0.0").unwrap();
    let bad_digest = bad["digest"].as_str().unwrap().to_owned();
    let r = rollout_cli(
        &api,
        &[
            "start",
            // Written before gates without a verdict held a stage; keeps that behaviour.
            "--on-no-data",
            "pass",
            "--model",
            "dense@3.0.0",
            "--selector",
            "site=plant-b",
            "--waves",
            "8,100",
            "--bake",
            "5s",
            "--on-failure",
            "rollback",
            "--max-error-rate",
            "0.05",
            "--min-inferences",
            "5",
        ],
    )
    .unwrap();
    let bad_id = r["id"].as_u64().unwrap();
    let stopped = wait_status(&api, bad_id, "rolled-back").await;
    assert!(
        stopped["reason"].as_str().unwrap().contains("wave 1"),
        "{stopped:#}"
    );
    let canary: BTreeSet<String> = stopped["device_slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(canary.len(), 2, "8 % of 25 is the canary: {stopped:#}");
    for id in ids("plant-b") {
        let cmds = api
            .get(&format!("/v1/devices/{id}/commands"))
            .await
            .unwrap();
        let got_bad = cmds
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["model_digest"] == bad_digest.as_str());
        assert_eq!(got_bad, canary.contains(&id), "{id}: {cmds:#}");
    }
    wait_until("every plant-b device back on dense@1.0.0", WAIT, || async {
        let m = api.active_models().await.ok()?;
        ids("plant-b")
            .iter()
            .all(|id| m[id].as_deref() == Some("dense@1.0.0"))
            .then_some(())
    })
    .await
    .unwrap();
    let report = rollout_cli(&api, &["report", &bad_id.to_string()]).unwrap();
    let rollback = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rollback")
        .expect("a rollback decision in the report");
    assert!(
        rollback["gates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["verdict"] == "fail"),
        "{rollback:#}"
    );
    // plant-a never saw v3.
    let models = api.active_models().await.unwrap();
    for id in ids("plant-a") {
        assert_eq!(models[&id].as_deref(), Some("dense@2.0.0"), "{id}");
    }

    // (c) A shadow phase: plant-b runs v2 beside v1 on live inputs, the shadow gates judge
    //     the comparisons the agents report, then each wave is promoted.
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
            "site=plant-b",
            "--waves",
            "20,100",
            "--bake",
            "1s",
            "--shadow",
            "2s",
            "--min-agreement",
            "0",
            "--max-shadow-latency-ratio",
            "50",
            "--max-p99-latency-ratio",
            "50",
        ],
    )
    .unwrap();
    let shadow_id = r["id"].as_u64().unwrap();
    wait_status(&api, shadow_id, "completed").await;
    let report = rollout_cli(&api, &["report", &shadow_id.to_string()]).unwrap();
    let promoted: Vec<&Value> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "promoted")
        .collect();
    assert_eq!(promoted.len(), 2, "one promotion per wave: {report:#}");
    for p in promoted {
        let agreement = p["gates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["gate"] == "shadow_agreement")
            .unwrap();
        assert!(
            agreement["basis"]
                .as_str()
                .is_some_and(|b| !b.contains("of 0 compared")),
            "the shadow gate judged real comparisons: {p:#}"
        );
    }
    let models = api.active_models().await.unwrap();
    assert!(
        models.values().all(|m| m.as_deref() == Some("dense@2.0.0")),
        "{models:?}"
    );

    // (d) The drift gate: a model whose baseline (standard normal features) is far from
    //     the live inputs (0.25 and 5.0) pauses its rollout on the agents' drift sketches.
    let mut csv = (0..16)
        .map(|i| format!("f{i}"))
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..400 {
        let row: Vec<String> = (0..16)
            .map(|_| {
                // Irwin–Hall: the sum of 12 uniforms minus 6 is close to standard normal.
                let z: f64 = (0..12)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 11) as f64 / (1u64 << 53) as f64
                    })
                    .sum::<f64>()
                    - 6.0;
                format!("{z:.4}")
            })
            .collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let baseline = tmp.path().join("baseline.csv");
    std::fs::write(&baseline, csv).unwrap();
    let mut args: Vec<String> = [
        "model",
        "publish",
        fixture("dense_v1.onnx").to_str().unwrap(),
        "--name",
        "dense",
        "--version",
        "5.0.0",
        "--baseline",
        baseline.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(api.cli_args());
    drover_tests::drover_cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let r = rollout_cli(
        &api,
        &[
            "start",
            // Written before gates without a verdict held a stage; keeps that behaviour.
            "--on-no-data",
            "pass",
            "--model",
            "dense@5.0.0",
            "--selector",
            "site=plant-a",
            "--waves",
            "10,100",
            "--bake",
            "20s",
            "--max-drift-psi",
            "0.25",
            "--max-p99-latency-ratio",
            "50",
        ],
    )
    .unwrap();
    let drift_id = r["id"].as_u64().unwrap();
    let paused = wait_status(&api, drift_id, "paused").await;
    assert!(
        paused["reason"].as_str().unwrap().contains("drift_psi"),
        "{paused:#}"
    );
    assert_eq!(paused["wave"], 1, "stopped in the canary");

    traffic.stop().await;
    for d in &mut fleet {
        d.stop().await.unwrap();
    }
    server.shutdown().await;
}
