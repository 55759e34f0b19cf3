//! Several models per device (issue 17), control-plane side, against an in-process `drover
//! serve` with scripted devices: what a protocol-1 (one model) and a protocol-2 (named
//! slots) device may be sent, the slots a device reports, `remove`, the re-offer of every
//! unaccepted command on reconnect, and rollouts keyed by model name.

mod common;

use common::*;
use drover_control_plane::serve::ServeHandle;
use drover_protocol::messages::{
    Action, Downlink, ModelBudget, ModelRef, ModelsReport, SlotStatus, Uplink,
};
use drover_protocol::topics::parse_hex32;
use drover_protocol::trust::TrustStore;
/// The protocol of an agent with named slots (these devices report no runtime).
const SLOTS_PROTOCOL: u16 = 2;

/// Published as ONNX: these scripted devices speak protocols 1 and 2, which load ONNX only
/// (`compiled_models.rs` covers what is sent to which runtime).
async fn publish(api: &Api, name: &str) -> ModelRef {
    let model = dense_model(8, 3, 3, "MatMul");
    let (status, published) = api
        .post(
            "/v1/models",
            &serde_json::json!({
                "name": name, "version": "1.0.0", "model_hex": hex::encode(&model), "format": "onnx",
            }),
        )
        .await;
    assert_eq!(status, 201, "{published}");
    ModelRef {
        name: name.into(),
        version: "1.0.0".into(),
        digest: parse_hex32(published["digest"].as_str().unwrap()).unwrap(),
    }
}

/// A device that said hello with protocol `max` and holds `active`; returns it with the
/// trust store that verifies its commands.
async fn device(
    server: &ServeHandle,
    api: &Api,
    id: &str,
    max: u16,
    active: Option<ModelRef>,
) -> (FakeDevice, TrustStore) {
    let e = api.enroll(id, &[("site", "a")]).await;
    let (id, key) = FakeDevice::from_enrollment(&e);
    let mut d = FakeDevice::connect(server.mqtt_addr(), id, key).await;
    d.send(hello_with(max, active, 0)).await;
    finish_hello(d, server).await
}

fn hello_with(max: u16, active: Option<ModelRef>, last_command_seq: u64) -> Uplink {
    let mut h = hello();
    if let Uplink::Hello(h) = &mut h {
        h.protocol_max = max;
        h.active = active;
        h.last_command_seq = last_command_seq;
    }
    h
}

async fn finish_hello(mut d: FakeDevice, server: &ServeHandle) -> (FakeDevice, TrustStore) {
    let keyring = d
        .recv_downlink("Keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(server.root_public_key()).unwrap();
    trust.accept_keyring(&keyring, now_ms()).unwrap();
    (d, trust)
}

/// The next command the device receives, verified.
async fn next_action((d, trust): &mut (FakeDevice, TrustStore)) -> (u64, Action) {
    let blob = d
        .recv_downlink("Command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let cmd = trust.verify_command(&blob, &d.id, 0, now_ms()).unwrap();
    (cmd.seq, cmd.action)
}

fn slot(m: &ModelRef) -> SlotStatus {
    SlotStatus {
        name: m.name.clone(),
        active: Some(m.clone()),
        previous: None,
        staged: None,
        shadow: None,
        disk_bytes: 4096,
        memory_bytes: 8192,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_model_device_is_never_sent_a_second_name_or_a_slot_command() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let a = publish(&api, "vibration").await;
    publish(&api, "acoustic").await;
    let mut old = device(&server, &api, "gw-old", 1, Some(a.clone())).await;
    eventually("the hello stored", || async {
        (api.device("gw-old").await["protocol"] == 1).then_some(())
    })
    .await;

    let (status, body) = api
        .post(
            "/v1/devices/gw-old/deploy",
            &serde_json::json!({"model": "acoustic@1.0.0"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let msg = body.to_string();
    assert!(
        msg.contains("would replace it") && msg.contains("--replace"),
        "{msg}"
    );
    let (status, body) = api
        .post(
            "/v1/devices/gw-old/remove",
            &serde_json::json!({"model": "vibration"}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("speaks protocol 1"), "{body}");

    // The same name is an upgrade, and --replace is the operator's explicit choice.
    let (status, body) = api
        .post(
            "/v1/devices/gw-old/deploy",
            &serde_json::json!({"model": "acoustic@1.0.0", "replace": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, action) = next_action(&mut old).await;
    assert!(matches!(action, Action::Deploy { .. }), "{action:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slots_device_reports_its_models_and_a_slot_is_removed_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let a = publish(&api, "vibration").await;
    let b = publish(&api, "acoustic").await;
    let mut new = device(&server, &api, "gw-new", SLOTS_PROTOCOL, Some(a.clone())).await;
    new.0
        .send(Uplink::Models(ModelsReport {
            slots: vec![slot(&a), slot(&b)],
            budget: ModelBudget {
                max_models: Some(3),
                memory_bytes: Some(64 << 20),
                disk_bytes: None,
            },
        }))
        .await;
    let shown = eventually("the slots stored", || async {
        let d = api.device("gw-new").await;
        (d["models"].as_array().map_or(0, Vec::len) == 2).then_some(d)
    })
    .await;
    assert_eq!(shown["protocol"], 2);
    assert_eq!(shown["models"][0]["name"], "acoustic");
    assert_eq!(shown["models"][1]["active"], "vibration@1.0.0");
    assert_eq!(shown["models"][1]["phase"], "active");
    assert_eq!(shown["budget"]["max_models"], 3);

    // A second name is deployed beside the first, not refused.
    let (status, body) = api
        .post(
            "/v1/devices/gw-new/deploy",
            &serde_json::json!({"model": "acoustic@1.0.0"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(matches!(
        next_action(&mut new).await.1,
        Action::Deploy { .. }
    ));

    let (status, body) = api
        .post(
            "/v1/devices/gw-new/remove",
            &serde_json::json!({"model": "thermal"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.to_string().contains("it holds: acoustic, vibration"),
        "{body}"
    );
    let (status, body) = api
        .post(
            "/v1/devices/gw-new/remove",
            &serde_json::json!({"model": "acoustic@1.0.0"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .post(
            "/v1/devices/gw-new/remove",
            &serde_json::json!({"model": "vibration"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, action) = next_action(&mut new).await;
    assert_eq!(
        action,
        Action::RemoveModel {
            model: "vibration".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_slots_device_is_offered_every_unaccepted_command_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let a = publish(&api, "vibration").await;
    publish(&api, "acoustic").await;
    let e = api.enroll("gw-away", &[("site", "a")]).await;
    let (id, key) = FakeDevice::from_enrollment(&e);
    // Say hello once as protocol 2, then go away.
    let mut d = FakeDevice::connect(server.mqtt_addr(), id.clone(), key.clone()).await;
    d.send(hello_with(SLOTS_PROTOCOL, Some(a.clone()), 0)).await;
    let (d, _) = finish_hello(d, &server).await;
    eventually("protocol 2 stored", || async {
        (api.device("gw-away").await["protocol"] == 2).then_some(())
    })
    .await;
    d.disconnect().await;
    for m in ["vibration@1.0.0", "acoustic@1.0.0"] {
        let (status, body) = api
            .post(
                "/v1/devices/gw-away/deploy",
                &serde_json::json!({"model": m}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // Back: both deploys arrive, oldest first (a one-model agent got only the newest).
    let mut d = FakeDevice::connect(server.mqtt_addr(), id, key).await;
    d.send(hello_with(SLOTS_PROTOCOL, Some(a), 0)).await;
    let mut back = finish_hello(d, &server).await;
    let mut names = Vec::new();
    for _ in 0..2 {
        if let (_, Action::Deploy { manifest, .. }) = next_action(&mut back).await {
            let m = drover_protocol::Manifest::decode(&manifest.payload).unwrap();
            names.push(m.name);
        }
    }
    assert_eq!(names, ["vibration", "acoustic"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_of_two_models_share_devices_and_two_of_one_model_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    publish(&api, "vibration").await;
    publish(&api, "acoustic").await;
    let _d = device(&server, &api, "gw-1", SLOTS_PROTOCOL, None).await;
    let plan = |m: &str| {
        serde_json::json!({"model": m, "selector": "site=a", "waves": [{"percent": 100}],
                           "gates": {"min_inferences": 1000000}})
    };
    let (status, first) = api.post("/v1/rollouts", &plan("vibration@1.0.0")).await;
    assert_eq!(status, 201, "{first}");
    let (status, other) = api.post("/v1/rollouts", &plan("acoustic@1.0.0")).await;
    assert_eq!(status, 201, "another model proceeds beside it: {other}");
    let (status, same) = api.post("/v1/rollouts", &plan("vibration@1.0.0")).await;
    assert_eq!(status, 409, "{same}");
    let msg = same.to_string();
    assert!(
        msg.contains("of the same model already hold") && msg.contains("rollout(s) 1"),
        "{msg}"
    );
}
