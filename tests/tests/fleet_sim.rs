//! The fleet simulator in CI: 200 protocol-true virtual devices in two label groups, with
//! churn (devices dropping off abruptly and coming back) and five devices running real
//! tract, against an in-process control plane with its embedded broker.
//!
//! (a) A good 256 KB model goes through three cumulative waves with gates passing; every
//!     device ends on it (in the simulator's view and the control plane's), and every
//!     telemetry window the fleet produced is stored: stored == sent.
//! (b) A model the simulator makes misbehave ("bad model") is stopped on the canary wave
//!     and rolled back; no device outside the canary ever ran it.
//!
//! Outcomes only: no assertion on time (the figures live in BENCHMARKS.md).

use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{serve_local, Api};
use drover_tests::sim::{self, scenario, Fleet, Group, SimConfig, Stats};

const DEVICES: usize = 200;
const WAIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_simulated_devices_converge_and_lose_no_telemetry() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        data_dir: tmp.path().join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        // Simulated devices log in with passwords, not client certificates.
        allow_plaintext: true,
        rollout_tick_ms: 250,
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());

    let cfg = SimConfig {
        devices: DEVICES,
        prefix: "ci".into(),
        groups: vec![
            Group::parse("site=plant-a:3:0.001:1500").unwrap(),
            Group::parse("site=plant-b:1:0.004:3000").unwrap(),
        ],
        inference_rate: 20.0,
        telemetry_interval: Duration::from_millis(500),
        bad_models: vec!["sim@2.0.0".into()],
        bad_error_rate: 0.4,
        churn_probability: 0.05,
        churn_period: Duration::from_secs(5),
        churn_downtime: Duration::from_secs(2),
        tract_devices: 5,
        ..SimConfig::default()
    };
    let ids = sim::enroll(&api, &cfg, 16).await.unwrap();
    assert_eq!(ids.len(), DEVICES);
    let fleet = Fleet::start(cfg, ids, WAIT).await.unwrap();

    // (a) the good model, everywhere.
    let onnx = sim::onnx_model_of_size(256 * 1024, 1);
    scenario::publish_model(
        &api,
        "sim",
        "1.0.0",
        &onnx,
        Some(sim::model::baseline_csv(200, 1)),
    )
    .await
    .unwrap();
    let plan = scenario::plan("sim@1.0.0", &[5.0, 50.0, 100.0], Duration::from_secs(1), 20);
    let id = scenario::start_rollout(&api, &plan).await.unwrap();
    let run = scenario::follow(&api, id, WAIT).await.unwrap();
    assert_eq!(run.status, "completed", "{:#}", run.last);
    assert_eq!(run.waves.len(), 3, "{:?}", run.waves);

    // Devices that churned off while their wave ran are picked up when they return.
    let converged = drover_tests::wait_until(
        "every simulated device healthy on sim@1.0.0",
        WAIT,
        || async {
            fleet
                .active()
                .iter()
                .all(|a| {
                    a.as_ref()
                        .is_some_and(|(m, healthy)| m == "sim@1.0.0" && *healthy)
                })
                .then_some(())
        },
    )
    .await;
    if let Err(e) = converged {
        let active = fleet.active();
        let behind: Vec<usize> = (0..DEVICES)
            .filter(|i| {
                !active[*i]
                    .as_ref()
                    .is_some_and(|(m, h)| m == "sim@1.0.0" && *h)
            })
            .collect();
        let slots = api
            .get(&format!("/v1/rollouts/{id}?devices=true"))
            .await
            .unwrap();
        for i in behind.iter().take(5) {
            let name = format!("ci-{i:05}");
            let cmds = api
                .get(&format!("/v1/devices/{name}/commands"))
                .await
                .unwrap();
            let slot: Vec<_> = slots["device_slots"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter(|d| d["device"] == name.as_str())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            eprintln!(
                "{name}: sim {:?}; commands {cmds}; rollout slot {slot:?}",
                active[*i]
            );
        }
        let st = &fleet.shared.stats;
        panic!(
            "{e}: {} devices behind: {behind:?}; self-rollbacks {}, install failures {}, \
             commands refused {}; rollout {:#}",
            behind.len(),
            Stats::get(&st.self_rollbacks),
            Stats::get(&st.install_failures),
            Stats::get(&st.commands_refused),
            run.last
        );
    }
    let st = &fleet.shared.stats;
    eprintln!(
        "good rollout: installs {}, self-rollbacks {}, install failures {}, connects {}, churn drops {}",
        Stats::get(&st.installs),
        Stats::get(&st.self_rollbacks),
        Stats::get(&st.install_failures),
        Stats::get(&st.connects),
        Stats::get(&st.churn_drops),
    );
    // A good model is judged on evidence: no device's probation rolled it back, however
    // few requests it served (a plain 10 % ratio failed devices that served a handful).
    assert_eq!(
        Stats::get(&st.self_rollbacks),
        0,
        "self-rollbacks of a good model"
    );
    assert_eq!(Stats::get(&st.install_failures), 0, "failed installs");
    drover_tests::wait_until(
        "the control plane sees every device on sim@1.0.0",
        WAIT,
        || async {
            let models = api.active_models().await.ok()?;
            (models.len() == DEVICES && models.values().all(|m| m.as_deref() == Some("sim@1.0.0")))
                .then_some(())
        },
    )
    .await
    .unwrap();
    let s = &fleet.shared.stats;
    assert!(
        Stats::get(&s.chunks_verified) >= DEVICES as u64 * 4,
        "every device verified its chunks"
    );
    assert_eq!(Stats::get(&s.chunks_refused), 0);
    assert!(
        Stats::get(&s.tract_inferences) > 0,
        "tract devices ran the model for real"
    );

    // (b) a bad model stops at the canary and is rolled back.
    let bad = sim::onnx_model_of_size(256 * 1024, 2);
    scenario::publish_model(&api, "sim", "2.0.0", &bad, None)
        .await
        .unwrap();
    let plan = scenario::plan("sim@2.0.0", &[5.0, 100.0], Duration::from_secs(3), 20);
    let id = scenario::start_rollout(&api, &plan).await.unwrap();
    let run = scenario::follow(&api, id, WAIT).await.unwrap();
    assert_eq!(run.status, "rolled-back", "{:#}", run.last);
    let report = api.get(&format!("/v1/rollouts/{id}")).await.unwrap();
    let canary = report["waves"][0]["target"].as_u64().unwrap();
    assert!(canary < DEVICES as u64 / 2, "{report:#}");
    let mut got_bad = 0;
    for d in 0..DEVICES {
        let cmds = api
            .get(&format!("/v1/devices/ci-{d:05}/commands"))
            .await
            .unwrap();
        if cmds.as_array().unwrap().len() > 1 {
            got_bad += 1;
        }
    }
    assert!(
        got_bad as u64 <= canary,
        "{got_bad} devices got sim@2.0.0, canary {canary}"
    );
    drover_tests::wait_until("every device back on sim@1.0.0", WAIT, || async {
        fleet
            .active()
            .iter()
            .all(|a| a.as_ref().is_some_and(|(m, _)| m == "sim@1.0.0"))
            .then_some(())
    })
    .await
    .unwrap();

    // No lost telemetry: once every durable frame is acknowledged, the control plane holds
    // exactly the telemetry windows the fleet produced.
    fleet.quiesce(WAIT).await.unwrap();
    let sent = Stats::get(&fleet.shared.stats.telemetry_sent);
    let mut stored = 0u64;
    for d in 0..DEVICES {
        let rows = api
            .get(&format!("/v1/devices/ci-{d:05}/telemetry?limit=10000"))
            .await
            .unwrap();
        stored += rows.as_array().unwrap().len() as u64;
    }
    assert!(sent > DEVICES as u64 * 10, "{sent} telemetry windows");
    assert_eq!(stored, sent, "telemetry stored == sent");
    assert!(
        Stats::get(&fleet.shared.stats.churn_drops) > 0,
        "churn happened"
    );
    fleet.stop().await;
    server.shutdown().await;
}

/// Several models per simulated device (issue 17): two models, each through its own
/// staged rollout at the same time on the same 60 devices; every device ends serving both
/// (each in its own slot, in the simulator's view and in the control plane's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_serve_two_models_rolled_out_side_by_side() {
    const N: usize = 60;
    let tmp = tempfile::tempdir().unwrap();
    let (_server, api) = serve_local(tmp.path(), |c| {
        // Simulated devices log in with passwords, not client certificates.
        c.allow_plaintext = true;
        c.rollout_tick_ms = 250;
    })
    .await
    .unwrap();
    let cfg = SimConfig {
        devices: N,
        prefix: "mm".into(),
        groups: vec![Group::parse("site=plant-a:1:0.001:1500").unwrap()],
        inference_rate: 20.0,
        telemetry_interval: Duration::from_millis(500),
        tract_devices: 2,
        ..SimConfig::default()
    };
    let ids = sim::enroll(&api, &cfg, 16).await.unwrap();
    let fleet = Fleet::start(cfg, ids, WAIT).await.unwrap();
    let mut rollouts = Vec::new();
    for (name, seed) in [("vibration", 1), ("acoustic", 2)] {
        let onnx = sim::onnx_model_of_size(64 * 1024, seed);
        scenario::publish_model(
            &api,
            name,
            "1.0.0",
            &onnx,
            Some(sim::model::baseline_csv(200, 1)),
        )
        .await
        .unwrap();
        let plan = scenario::plan(
            &format!("{name}@1.0.0"),
            &[10.0, 100.0],
            Duration::from_secs(1),
            20,
        );
        rollouts.push(scenario::start_rollout(&api, &plan).await.unwrap());
    }
    for id in rollouts {
        let run = scenario::follow(&api, id, WAIT).await.unwrap();
        assert_eq!(run.status, "completed", "{:#}", run.last);
    }
    let both = |m: &std::collections::BTreeMap<String, (String, bool)>| {
        m.get("vibration")
            .is_some_and(|(v, h)| v == "vibration@1.0.0" && *h)
            && m.get("acoustic")
                .is_some_and(|(v, h)| v == "acoustic@1.0.0" && *h)
    };
    drover_tests::wait_until(
        "every simulated device healthy on both models",
        WAIT,
        || async { fleet.slots().iter().all(both).then_some(()) },
    )
    .await
    .unwrap();
    // The control plane's view: each device reports both slots (its Models report).
    drover_tests::wait_until("the control plane lists both slots", WAIT, || async {
        let d = api.get("/v1/devices/mm-00000").await.ok()?;
        let names: Vec<&str> = d["models"]
            .as_array()?
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        (names == ["acoustic", "vibration"]).then_some(())
    })
    .await
    .unwrap();
    fleet.stop().await;
}
