//! The live-accuracy rollout gate end to end: `drover serve`, two real agents at one site
//! over real MQTT, live inference and feedback through the agents' local API. A candidate
//! whose inputs look exactly like the champion's (same world, same baseline) but which is
//! wrong far more often on labelled inputs goes to the canary; the control device stays
//! on the champion. The gate compares the two on their labelled predictions and pauses
//! the rollout in the canary wave, naming `live_accuracy`, while the candidate's input
//! features, scored against its baseline, are at `ok`.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_control_plane::app::paths::DB_FILE;
use drover_control_plane::config::ServeConfig;
use drover_control_plane::drift::{self, SketchRow};
use drover_control_plane::serve;
use drover_control_plane::store::Store;
use drover_protocol::manifest::Manifest;
use drover_tests::fleet::{rollout_cli, Api};
use drover_tests::training::{features_csv, labeled_csv, world, Rng};
use drover_tests::{cli_enroll, drover_cli, wait_until};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const MODEL: &str = "shift";

/// Sends `rows` to an agent, one inference and one feedback label each; returns the
/// model version that answered and the accuracy of its predictions.
async fn traffic(http: &reqwest::Client, addr: &str, rows: &[(Vec<f32>, u32)]) -> f64 {
    let mut right = 0;
    for (x, y) in rows {
        let body =
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": x}]});
        let r: Value = http
            .post(format!("http://{addr}/v2/models/{MODEL}/infer"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let p: Vec<f64> = r["outputs"][0]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no outputs in {r}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        right += u32::from(u32::from(p[1] > p[0]) == *y);
        let fb = http
            .post(format!("http://{addr}/v2/models/{MODEL}/feedback"))
            .json(&json!({"id": r["parameters"]["drover_request_id"], "label": y}))
            .send()
            .await
            .unwrap();
        assert!(fb.status().is_success(), "{}", fb.text().await.unwrap());
    }
    f64::from(right) / rows.len() as f64
}

async fn serves(http: &reqwest::Client, addr: &str, version: &str) -> bool {
    let Ok(r) = http
        .get(format!("http://{addr}/v2/models/{MODEL}"))
        .send()
        .await
    else {
        return false;
    };
    r.json::<Value>().await.ok().is_some_and(|v| {
        v["versions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == version))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_accuracy_gate_pauses_a_candidate_worse_on_labels_whose_inputs_do_not_drift() {
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
    let api = Api::new(
        format!("http://{}", server.http_addr()),
        server.api_token().to_string(),
    );
    let srv_args = api.cli_args();
    let srv: Vec<&str> = srv_args.iter().map(String::as_str).collect();
    let cli = |args: &[&str]| drover_cli(&[args, &srv[..]].concat()).unwrap();

    // Champion: trained. Candidate: the same trainer with no epochs (it cannot tell the
    // classes apart). Both published with the same baseline: the inputs they see are one
    // distribution, so nothing about the candidate's inputs drifts.
    let mut rng = Rng::new(22);
    let old: Vec<_> = (0..1200).map(|_| world(&mut rng, false)).collect();
    std::fs::write(dir.join("base.csv"), labeled_csv(&old)).unwrap();
    std::fs::write(dir.join("baseline.csv"), features_csv(&old)).unwrap();
    for (version, epochs) in [("1.0.0", None), ("1.0.1", Some("0"))] {
        let out = dir.join(version);
        let mut args = vec!["train", "builtin"];
        if let Some(e) = epochs {
            args.extend(["--epochs", e]);
        }
        let data = dir.join("base.csv");
        args.extend([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        drover_cli(&args).unwrap();
        cli(&[
            "model",
            "publish",
            out.join("model.onnx").to_str().unwrap(),
            "--name",
            MODEL,
            "--version",
            version,
            "--baseline",
            dir.join("baseline.csv").to_str().unwrap(),
        ]);
    }

    let mut agents = Vec::new();
    let mut stops = Vec::new();
    for id in ["gw-1", "gw-2"] {
        let mut cfg = cli_enroll(&srv, dir, id, &["site=a"], "127.0.0.1:0").unwrap();
        cfg.telemetry.sample_rate_ppm = 1_000_000;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        agents.push(
            drover_agent::run(cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap(),
        );
        stops.push(tx);
        cli(&["device", "deploy", id, "--model", "shift@1.0.0"]);
    }
    let addrs: Vec<String> = agents.iter().map(|a| a.api_addr().to_string()).collect();
    let http = reqwest::Client::new();
    for addr in &addrs {
        wait_until("champion served", WAIT, || async {
            serves(&http, addr, "1.0.0").await.then_some(())
        })
        .await
        .unwrap();
    }

    // A canary of one device, then the rest after a long bake; the live-accuracy gate
    // compares the canary with the device still on the champion.
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        "model = \"shift@1.0.1\"\nselector = \"site=a\"\non_failure = \"pause\"\n\
         [gates]\nmax_live_accuracy_drop = 0.05\nmin_labels = 100\n\
         max_p99_latency_ratio = 1000.0\n\
         [[waves]]\ncount = 1\nbake = \"1h\"\n[[waves]]\npercent = 100\n",
    )
    .unwrap();
    let r = rollout_cli(&api, &["start", plan.to_str().unwrap()]).unwrap();
    let id = r["id"].as_u64().unwrap();
    let canary = wait_until("the canary serves the candidate", WAIT, || async {
        for (i, addr) in addrs.iter().enumerate() {
            if serves(&http, addr, "1.0.1").await {
                return Some(i);
            }
        }
        None
    })
    .await
    .unwrap();
    let control = 1 - canary;

    // Labelled traffic on both: the candidate is wrong about half the time, the champion
    // rarely. The rollout pauses on live accuracy in the canary wave.
    let rows: Vec<_> = (0..250).map(|_| world(&mut rng, false)).collect();
    let acc_candidate = traffic(&http, &addrs[canary], &rows).await;
    let rows: Vec<_> = (0..250).map(|_| world(&mut rng, false)).collect();
    let acc_champion = traffic(&http, &addrs[control], &rows).await;
    eprintln!("served accuracy: candidate {acc_candidate:.3}, champion {acc_champion:.3}");
    assert!(acc_candidate < acc_champion - 0.2);
    let paused = wait_until("the rollout pauses", WAIT, || async {
        let r: Value = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
        let status = r["status"].as_str().unwrap_or_default().to_owned();
        assert_ne!(status, "completed", "{r:#}");
        (status == "paused").then_some(r)
    })
    .await
    .unwrap();
    let reason = paused["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("live_accuracy"), "{paused:#}");
    assert_eq!(paused["wave"], 1, "stopped in the canary wave: {paused:#}");
    // The gates at the evaluation that paused it.
    let live = paused["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == "live_accuracy")
        .cloned()
        .unwrap_or_else(|| panic!("no live_accuracy gate: {paused:#}"));
    eprintln!("live_accuracy gate: {live}");
    assert_eq!(live["verdict"], "fail", "{live}");
    assert!(live["value"].as_f64().unwrap() < -0.2, "{live}");
    assert!(
        live["basis"]
            .as_str()
            .unwrap()
            .contains("per 1,000 labelled"),
        "{live}"
    );
    // The candidate's inputs, as its canary sketched them, against its baseline: no drift.
    let store = Store::open(&dir.join("server").join(DB_FILE)).unwrap();
    let model = store.model(MODEL, "1.0.1").unwrap().unwrap();
    let baseline = Manifest::decode(&model.payload).unwrap().baseline.unwrap();
    let sketches: Vec<SketchRow> = store
        .drift_sketches(0, u64::MAX / 2)
        .unwrap()
        .into_iter()
        .filter(|k| k.model_digest == model.digest)
        .map(Into::into)
        .collect();
    assert!(!sketches.is_empty(), "the canary sent drift sketches");
    let scores = drift::score_window(
        &BTreeMap::from([(model.digest, baseline)]),
        &sketches,
        &[],
        (0, 1),
        &drift::Thresholds::default(),
    );
    let inputs: Vec<_> = scores
        .iter()
        .filter(|s| s.scope == drift::SCOPE_FLEET && s.feature != drift::PREDICTIONS)
        .collect();
    assert_eq!(inputs.len(), 2, "{scores:?}");
    for s in inputs {
        assert_eq!(s.level, drift::Level::Ok, "{s:?}");
    }
    assert!(
        serves(&http, &addrs[control], "1.0.0").await
            && !serves(&http, &addrs[control], "1.0.1").await,
        "the control device was never given the candidate"
    );

    for s in stops {
        let _ = s.send(());
    }
    for a in agents {
        a.wait().await.unwrap();
    }
    server.shutdown().await;
}
