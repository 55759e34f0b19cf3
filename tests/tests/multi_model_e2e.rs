//! Several models per device (issue 17) end to end: four real agents (in-process, each
//! with its own MQTT session, keys, store and tract runtime) hold three models each. Three
//! staged rollouts, one per model, run at once on the same devices: two complete, the
//! third (a model that fails on some live inputs) is rolled back by its error-rate gate,
//! and the other two models are untouched by it. An app calling all three models on every
//! device throughout sees zero failed requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use drover_tests::fleet::{
    fixture, publish, roll_out_everywhere, rollout_cli, serve_local, start_sites, Api,
};
use drover_tests::wait_until;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(240);
const MODELS: [&str; 3] = ["vibration", "acoustic", "thermal"];

/// The app: every device, every model, one good request each round; counts failures.
struct App {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_failure: Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn infer_body(v: f32) -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![v; 16]}]})
}

impl App {
    fn start(targets: Vec<SocketAddr>) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let last_failure = Arc::new(std::sync::Mutex::new(None));
        let http = reqwest::Client::new();
        let (s, n, f, l) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            last_failure.clone(),
        );
        let task = tokio::spawn(async move {
            while !s.load(Relaxed) {
                for a in &targets {
                    for m in MODELS {
                        let r = http
                            .post(format!("http://{a}/v2/models/{m}/infer"))
                            .json(&infer_body(0.25))
                            .send()
                            .await;
                        n.fetch_add(1, Relaxed);
                        let why = match r {
                            Ok(r) if r.status().is_success() => None,
                            Ok(r) => Some(format!(
                                "{a} {m}: {} {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => Some(format!("{a} {m}: {e}")),
                        };
                        if let Some(why) = why {
                            f.fetch_add(1, Relaxed);
                            *l.lock().unwrap() = Some(why);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        App {
            stop,
            sent,
            failed,
            last_failure,
            task,
        }
    }

    async fn stop(self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Relaxed);
        let _ = self.task.await;
        let last = self.last_failure.lock().unwrap().clone();
        (self.sent.load(Relaxed), self.failed.load(Relaxed), last)
    }
}

/// Another client of the thermal model whose every other input is out of range: a
/// healthy model answers it, the fragile candidate fails it (what its gate sees).
fn edge_traffic(targets: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        let mut round = 0u32;
        while !stop.load(Relaxed) {
            round += 1;
            let v = if round % 2 == 0 { 5.0 } else { 0.25 };
            for a in &targets {
                let _ = http
                    .post(format!("http://{a}/v2/models/thermal/infer"))
                    .json(&infer_body(v))
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    })
}

/// Every device's slots: device → model name → active `name@version`.
async fn slots(api: &Api, ids: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for id in ids {
        let d = api.get(&format!("/v1/devices/{id}")).await.unwrap();
        let mut m = BTreeMap::new();
        for s in d["models"].as_array().cloned().unwrap_or_default() {
            m.insert(
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["active"].as_str().unwrap_or("-").to_owned(),
            );
        }
        out.insert(id.clone(), m);
    }
    out
}

async fn wait_status(api: &Api, id: u64, want: &str) -> Value {
    let got = wait_until(&format!("rollout {id} to be {want}"), WAIT, || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
        (r["status"] == want).then_some(r)
    })
    .await;
    match got {
        Ok(r) => r,
        Err(e) => {
            let r = api
                .get(&format!("/v1/rollouts/{id}?devices=true"))
                .await
                .unwrap_or_default();
            let report = api
                .get(&format!("/v1/rollouts/{id}/report"))
                .await
                .unwrap_or_default();
            panic!("{e}: {r:#}\nevents: {:#}", report["events"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_models_on_each_device_three_rollouts_one_rolled_back_the_app_never_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_server, api) = serve_local(dir, |c| c.rollout_tick_ms = 200).await.unwrap();
    let fleet = start_sites(&api, dir, &["plant-a"], 4, WAIT).await.unwrap();
    let ids: Vec<String> = fleet.iter().map(|d| d.id.clone()).collect();
    let targets: Vec<SocketAddr> = fleet.iter().filter_map(|d| d.api_addr()).collect();

    // Three models side by side on every device, each through its own rollout.
    for m in MODELS {
        roll_out_everywhere(&api, &fixture("dense_v1.onnx"), m, "1.0.0", WAIT)
            .await
            .unwrap();
    }
    wait_until("every device reports three slots", WAIT, || async {
        let s = slots(&api, &ids).await;
        s.values()
            .all(|m| {
                MODELS
                    .iter()
                    .all(|n| m.get(*n) == Some(&format!("{n}@1.0.0")))
            })
            .then_some(())
    })
    .await
    .unwrap();
    let d = api.get(&format!("/v1/devices/{}", ids[0])).await.unwrap();
    assert_eq!(d["protocol"], drover_protocol::PROTOCOL_VERSION, "{d:#}");
    // The agents loaded compiled models: they report the runtime, and what was published
    // and sent to them is the compiled form (issue 25).
    let formats = d["runtime"]["formats"].to_string();
    assert!(formats.contains("tract-nnef 1"), "{d:#}");
    let m = api.get("/v1/models/vibration/1.0.0").await.unwrap();
    assert_eq!(m["summary"]["format"], "tract-nnef 1", "{m:#}");

    let app = App::start(targets.clone());
    let stop_edge = Arc::new(AtomicBool::new(false));
    let edge = edge_traffic(targets.clone(), stop_edge.clone());
    // The latency gate compares with the previous model's telemetry from before the
    // rollout (at least 100 latencies); until then it has no verdict and the wave holds.
    tokio::time::sleep(Duration::from_secs(12)).await;

    // v2 of each at once: two good models, and a thermal model that fails on the
    // out-of-range inputs the edge client sends.
    publish(&api, &fixture("dense_v2.onnx"), "vibration", "2.0.0").unwrap();
    publish(&api, &fixture("dense_v2.onnx"), "acoustic", "2.0.0").unwrap();
    let bad = publish(&api, &fixture("fragile.onnx"), "thermal", "2.0.0").unwrap();
    let bad_digest = bad["digest"].as_str().unwrap().to_owned();
    let mut started = BTreeMap::new();
    for m in MODELS {
        let model = format!("{m}@2.0.0");
        let r = rollout_cli(
            &api,
            &[
                "start",
                "--model",
                &model,
                "--selector",
                "site=plant-a",
                "--waves",
                "25,100",
                "--bake",
                "3s",
                "--min-inferences",
                "5",
                "--max-error-rate",
                "0.05",
                // Debug builds on a loaded 2-core machine: latency is judged coarsely here.
                "--max-p99-latency-ratio",
                "50",
                "--on-failure",
                "rollback",
            ],
        )
        .unwrap();
        started.insert(m, r["id"].as_u64().unwrap_or_else(|| panic!("{r:#}")));
    }
    let done_v = wait_status(&api, started["vibration"], "completed").await;
    let done_a = wait_status(&api, started["acoustic"], "completed").await;
    let stopped = wait_status(&api, started["thermal"], "rolled-back").await;
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("wave 1"),
        "{stopped:#}"
    );
    for r in [&done_v, &done_a] {
        assert_eq!(r["devices"]["healthy"], 4, "{r:#}");
    }

    wait_until(
        "vibration and acoustic on v2, thermal back on v1 everywhere",
        WAIT,
        || async {
            let s = slots(&api, &ids).await;
            s.values()
                .all(|m| {
                    m.get("vibration").map(String::as_str) == Some("vibration@2.0.0")
                        && m.get("acoustic").map(String::as_str) == Some("acoustic@2.0.0")
                        && m.get("thermal").map(String::as_str) == Some("thermal@1.0.0")
                })
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Only the thermal canary ever received the bad model.
    let canary: Vec<String> = stopped["device_slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(canary.len(), 1, "25 % of 4: {stopped:#}");
    for id in &ids {
        let cmds = api
            .get(&format!("/v1/devices/{id}/commands"))
            .await
            .unwrap();
        let got_bad = cmds
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["model_digest"] == bad_digest.as_str());
        assert_eq!(got_bad, canary.contains(id), "{id}: {cmds:#}");
    }

    // The app's requests kept being served through six swaps and a rollback per device.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_edge.store(true, Relaxed);
    let _ = edge.await;
    let (sent, failed, last) = app.stop().await;
    eprintln!("the app: {sent} requests to three models on four devices, {failed} failed");
    assert!(sent > 300, "the app sent {sent} requests");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} app requests failed; last: {last:?}"
    );
    drop(fleet);
}
