//! Risky rollout starts are refused or previewed (issue 18): a selector that matches no
//! device, a plan without a selector, devices held by another rollout, and a direct
//! deploy to a device a rollout holds. Devices are enrolled but never connect, so no
//! rollout gets past its first step here.

mod common;

use common::*;
use serde_json::{json, Value};

fn plan(selector: Option<&str>) -> Value {
    let mut p = json!({
        "model": "m@1.0.0",
        "waves": [{"percent": 1, "bake": "1m"}, {"percent": 10, "bake": "1m"}, {"percent": 100}],
    });
    if let Some(s) = selector {
        p["selector"] = json!(s);
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risky_rollout_starts_are_refused_and_previews_show_what_a_plan_would_take() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    for (id, site) in [("gw-a1", "a"), ("gw-a2", "a"), ("gw-b1", "b")] {
        api.enroll(id, &[("site", site)]).await;
    }
    let model = dense_model(8, 3, 5, "MatMul");
    let (status, _) = api
        .post(
            "/v1/models",
            &json!({"name": "m", "version": "1.0.0", "model_hex": hex::encode(&model)}),
        )
        .await;
    assert_eq!(status, 201);

    // No selector: the whole fleet must be asked for by name.
    let (status, e) = api.post("/v1/rollouts", &plan(None)).await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("give `all` to target the whole fleet"),
        "{e}"
    );
    // A selector that matches nothing is refused, not "rolled back".
    let (status, e) = api.post("/v1/rollouts", &plan(Some("site=c"))).await;
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("selector \"site=c\" matches no device"),
        "{e}"
    );
    assert_eq!(
        api.get("/v1/rollouts").await,
        json!([]),
        "nothing was started"
    );

    // Preview: site=a is two devices; 1 % and 10 % are both the canary.
    let (status, p) = api
        .post("/v1/rollouts/preview", &plan(Some("site=a")))
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["matched"], 2);
    assert_eq!(p["targets"].as_array().unwrap().len(), 2);
    let adds: Vec<u64> = p["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["adds"].as_u64().unwrap())
        .collect();
    assert_eq!(adds, vec![1, 0, 1]);

    let (status, r) = api.post("/v1/rollouts", &plan(Some("site=a"))).await;
    assert_eq!(status, 201, "{r}");
    let first = r["id"].as_u64().unwrap();
    let canary = eventually("the canary assigned", || async {
        let r = api.get(&format!("/v1/rollouts/{first}")).await;
        let slots = r["device_slots"].as_array()?.clone();
        (!slots.is_empty()).then(|| slots[0]["device"].as_str().unwrap().to_owned())
    })
    .await;

    // The whole fleet, while rollout 1 holds the canary: the preview says who holds what.
    let (status, p) = api.post("/v1/rollouts/preview", &plan(Some("all"))).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["matched"], 3);
    assert_eq!(p["held"], json!([{"device": canary, "rollout": first}]));
    assert_eq!(p["targets"].as_array().unwrap().len(), 2);

    // A direct deploy to the held device is refused and says what to do.
    let (status, e) = api
        .post(
            &format!("/v1/devices/{canary}/deploy"),
            &json!({"model": "m@1.0.0"}),
        )
        .await;
    assert_eq!(status, 409, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains(&format!("is in rollout {first}")), "{msg}");
    assert!(msg.contains("drover rollout abort"), "{msg}");

    // Once the rollout is aborted and rolled back, the device is free again.
    let (status, _) = api
        .post(&format!("/v1/rollouts/{first}/abort"), &json!({}))
        .await;
    assert_eq!(status, 200);
    eventually("rollout 1 no longer holds its canary", || async {
        let (status, p) = api.post("/v1/rollouts/preview", &plan(Some("all"))).await;
        (status == 200 && p["held"] == json!([])).then_some(())
    })
    .await;
}
