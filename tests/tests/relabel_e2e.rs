//! Issue 18's acceptance: relabelling a device (`drover device label`, run as a binary)
//! moves it into a running rollout's selector, and the real agent on it gets the model.

use std::process::Command;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{fixture, publish, roll_out_everywhere, rollout_cli, start_sites, Api};
use drover_tests::{wait_until, workspace_bin};

const WAIT: Duration = Duration::from_secs(120);

async fn active(api: &Api, id: &str) -> Option<String> {
    let d = api.get(&format!("/v1/devices/{id}")).await.ok()?;
    d["active_model"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_relabelled_into_a_running_rollout_gets_the_model() {
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
    let mut fleet = start_sites(&api, dir, &["plant-a", "plant-b"], 1, WAIT)
        .await
        .unwrap();
    roll_out_everywhere(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0", WAIT)
        .await
        .unwrap();

    // plant-a gets 1.1.0 and bakes for an hour: the rollout runs all through the test.
    publish(&api, &fixture("dense_v1.onnx"), "dense", "1.1.0").unwrap();
    let r = rollout_cli(
        &api,
        &[
            "start",
            "--model",
            "dense@1.1.0",
            "--selector",
            "site=plant-a",
            "--waves",
            "100",
            "--bake",
            "1h",
            "--late-joiners",
        ],
    )
    .unwrap();
    let id = r["id"].as_u64().unwrap();
    wait_until("plant-a-00 on 1.1.0", WAIT, || async {
        (active(&api, "plant-a-00").await.as_deref() == Some("dense@1.1.0")).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        active(&api, "plant-b-00").await.as_deref(),
        Some("dense@1.0.0")
    );

    let out = Command::new(workspace_bin("drover").unwrap())
        .args(["device", "label", "plant-b-00", "site=plant-a"])
        .args(api.cli_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the relabelled device on 1.1.0", WAIT, || async {
        (active(&api, "plant-b-00").await.as_deref() == Some("dense@1.1.0")).then_some(())
    })
    .await
    .unwrap();
    let r = api.get(&format!("/v1/rollouts/{id}")).await.unwrap();
    assert_eq!(r["status"], "running", "{r:#}");
    assert_eq!(r["device_slots"].as_array().unwrap().len(), 2, "{r:#}");

    for d in &mut fleet {
        d.stop().await.unwrap();
    }
}
