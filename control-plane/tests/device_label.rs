//! `drover device label` through the API (issue 18): labels are set and removed within
//! the enroll bounds, every change is in the device's audit log with who made it, bad
//! requests say what to do, and a device relabelled into a running rollout's selector
//! joins it late when the plan takes late joiners. Devices never connect here, so the
//! rollout never gets past its first wave.

mod common;

use common::*;
use drover_control_plane::rollout::plan::bucket;
use serde_json::{json, Value};

async fn label(api: &Api, id: &str, body: Value) -> (u16, Value) {
    api.post(&format!("/v1/devices/{id}/labels?by=alice"), &body)
        .await
}

fn error(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_set_removed_bounded_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    api.enroll("gw-1", &[("site", "a"), ("tier", "gold")]).await;

    let (status, d) = label(
        &api,
        "gw-1",
        json!({"set": {"site": "b", "floor": "2"}, "remove": ["tier"]}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["labels"], json!({"site": "b", "floor": "2"}));
    assert!(d["labels_changed_at_ms"].as_u64().is_some(), "{d}");
    let events = api.get("/v1/devices/gw-1/events").await;
    assert_eq!(events[0]["kind"], "labels", "{events}");
    assert_eq!(events[0]["by"], "alice", "{events}");
    assert_eq!(
        events[0]["detail"], "labels {site=a,tier=gold} -> {floor=2,site=b}",
        "{events}"
    );

    // Refusals name the rule and change nothing.
    let too_many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (body, want) in [
        (json!({}), "nothing to change"),
        (json!({"set": {"agent.arch": "x"}}), "are the agent's own"),
        (json!({"set": {"a b": "x"}}), "must be 1-64 bytes"),
        (
            json!({"set": {"k": "x".repeat(257)}}),
            "must be 1-256 bytes",
        ),
        (json!({"set": too_many}), "at most 32 are allowed"),
        (
            json!({"set": {"site": "c"}, "remove": ["site"]}),
            "both set and removed",
        ),
    ] {
        let (status, e) = label(&api, "gw-1", body.clone()).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert!(error(&e).contains(want), "{body}: {e}");
    }
    let (status, e) = label(&api, "gw-9", json!({"set": {"site": "a"}})).await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(
        api.device("gw-1").await["labels"],
        json!({"site": "b", "floor": "2"})
    );
    // Enroll keeps to the same bounds.
    let (status, e) = api
        .post(
            "/v1/devices",
            &json!({"id": "gw-2", "labels": {"agent.x": "1"}}),
        )
        .await;
    assert_eq!(status, 400, "{e}");

    // Decommissioning is audited too.
    let (status, e) = api
        .post("/v1/devices/gw-1/decommission?by=bob", &json!({}))
        .await;
    assert!(status < 300, "{e}");
    let events = api.get("/v1/devices/gw-1/events").await;
    assert_eq!(
        (&events[0]["kind"], &events[0]["by"]),
        (&json!("decommissioned"), &json!("bob")),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_relabelled_into_a_running_rollouts_selector_joins_it_late() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    // The relabelled device must rank after the canary, so only the late-joiner rule can
    // put it into the first wave (1 % of 2 devices is one device).
    let (canary, joiner) = if bucket("gw-1") < bucket("gw-2") {
        ("gw-1", "gw-2")
    } else {
        ("gw-2", "gw-1")
    };
    api.enroll(canary, &[("site", "a")]).await;
    api.enroll(joiner, &[("site", "b")]).await;
    let model = dense_model(8, 3, 5, "MatMul");
    let (status, _) = api
        .post(
            "/v1/models",
            &json!({"name": "m", "version": "1.0.0", "model_hex": hex::encode(&model)}),
        )
        .await;
    assert_eq!(status, 201);
    let plan = json!({
        "model": "m@1.0.0",
        "selector": "site=a",
        "late_joiners": true,
        "waves": [{"percent": 1, "bake": "1h"}, {"percent": 100}],
    });
    let (status, r) = api.post("/v1/rollouts", &plan).await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_u64().unwrap();
    let slots = |r: &Value| -> Vec<String> {
        r["device_slots"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s["device"].as_str().unwrap().to_owned())
            .collect()
    };
    eventually("the canary assigned", || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await;
        (slots(&r) == [canary]).then_some(())
    })
    .await;

    let (status, d) = label(&api, joiner, json!({"set": {"site": "a"}})).await;
    assert_eq!(status, 200, "{d}");
    let r = eventually("the relabelled device joins the first wave", || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await;
        (slots(&r).len() == 2).then_some(r)
    })
    .await;
    assert_eq!(r["wave"], 1, "still the first wave: {r}");
    let report = api.get(&format!("/v1/rollouts/{id}/report")).await;
    assert!(
        report.to_string().contains("late-joiners"),
        "the report says why: {report}"
    );
    let commands = api.get(&format!("/v1/devices/{joiner}/commands")).await;
    assert_eq!(commands[0]["kind"], "deploy", "{commands}");
}
