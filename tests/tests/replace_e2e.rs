//! Issue 18's acceptance: a replaced device re-enrolls under its old id. The hardware
//! behind `plant-a-00` dies, the operator decommissions it and enrolls the replacement
//! with `drover device enroll --replace` (run as a binary); the new agent's telemetry is
//! stored (not taken for replays of the old device's frames) and a deploy reaches it.

use std::process::{Command, Output};
use std::time::Duration;

use drover_agent::config::AgentConfig;
use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{fixture, roll_out_everywhere, start_sites, Api};
use drover_tests::{wait_until, workspace_bin};

const WAIT: Duration = Duration::from_secs(120);
const ID: &str = "plant-a-00";

fn drover(api: &Api, args: &[&str]) -> Output {
    Command::new(workspace_bin("drover").unwrap())
        .args(args)
        .args(api.cli_args())
        .output()
        .unwrap()
}

/// The highest telemetry sequence stored for the device, and how many windows.
async fn telemetry(api: &Api) -> (u64, usize) {
    let v = api
        .get(&format!("/v1/devices/{ID}/telemetry?limit=10000"))
        .await
        .unwrap();
    let rows = v.as_array().unwrap();
    let max = rows.iter().filter_map(|r| r["seq"].as_u64()).max();
    (max.unwrap_or(0), rows.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_device_re_enrolls_under_its_old_id() {
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
    let mut fleet = start_sites(&api, dir, &["plant-a"], 1, WAIT).await.unwrap();
    roll_out_everywhere(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0", WAIT)
        .await
        .unwrap();
    // The old hardware restarted once (its uplink sequence jumps past its reserved block
    // of 1,000), so a replacement starting its sequence at 1 would send frames that sort
    // before the old device's for a long while (the newest telemetry, the last progress
    // detail), and those at sequences the old device used would be dropped as duplicates.
    fleet[0].stop().await.unwrap();
    fleet[0].start().await.unwrap();
    wait_until(
        "the old device's telemetry after its restart",
        WAIT,
        || async { (telemetry(&api).await.0 > 1000).then_some(()) },
    )
    .await
    .unwrap();

    // It dies; the operator decommissions it.
    fleet[0].stop().await.unwrap();
    let out = drover(&api, &["device", "decommission", ID]);
    assert!(out.status.success(), "{out:?}");
    let (old_max, old_count) = telemetry(&api).await;

    // Enrolling the id again without --replace says how.
    let cfg_path = dir.join("replacement").join(format!("{ID}.toml"));
    std::fs::create_dir_all(cfg_path.parent().unwrap()).unwrap();
    let data_dir = dir.join("replacement-data");
    let enroll = |replace: bool| {
        let mut args = vec![
            "device",
            "enroll",
            ID,
            "--out",
            cfg_path.to_str().unwrap(),
            "--agent-data-dir",
            data_dir.to_str().unwrap(),
        ];
        if replace {
            args.push("--replace");
        }
        drover(&api, &args)
    };
    let refused = enroll(false);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--replace"), "{err}");
    let replaced = enroll(true);
    assert!(replaced.status.success(), "{replaced:?}");
    assert!(String::from_utf8_lossy(&replaced.stdout).contains("replacement"));

    // The replacement's config continues the old device's sequences.
    // Loaded as the agent loads it: its TLS paths are relative to the file.
    let mut cfg = AgentConfig::load(Some(&cfg_path), &Default::default(), &[])
        .unwrap()
        .raw;
    assert_eq!(cfg.replacement.uplink_seq_start, old_max + 1);
    assert!(cfg.replacement.command_seq_floor >= 1);
    assert_eq!(cfg.labels.len(), 0);
    cfg.api_addr = "127.0.0.1:0".into();
    cfg.telemetry.interval_ms = 300;
    let d = api.get(&format!("/v1/devices/{ID}")).await.unwrap();
    assert_eq!(d["decommissioned"], false, "{d:#}");
    assert_eq!(d["labels"]["site"], "plant-a", "labels kept: {d:#}");
    assert!(d["active_model"].is_null(), "{d:#}");

    let agent = drover_agent::run(cfg, std::future::pending())
        .await
        .unwrap();
    wait_until("the replacement's telemetry stored", WAIT, || async {
        let (max, count) = telemetry(&api).await;
        (max > old_max && count >= old_count + 3).then_some(())
    })
    .await
    .unwrap();

    // A deploy reaches it and it reports healthy.
    let out = drover(
        &api,
        &[
            "device",
            "deploy",
            ID,
            "--model",
            "dense@1.0.0",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let d = api.get(&format!("/v1/devices/{ID}")).await.unwrap();
    assert_eq!(d["active_model"], "dense@1.0.0", "{d:#}");
    let events = api.get(&format!("/v1/devices/{ID}/events")).await.unwrap();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"decommissioned"), "{events:#}");
    assert!(kinds.contains(&"replaced"), "{events:#}");

    agent.shutdown();
    agent.wait().await.unwrap();
}
