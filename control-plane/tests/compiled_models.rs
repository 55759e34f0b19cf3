//! Models compiled at publish (issue 25), control-plane side, against an in-process `drover
//! serve` with scripted devices: the compiled artifact and its signed manifest, the ONNX
//! kept in the registry, and which devices may be sent it (from their runtime report or
//! their protocol), for a direct deploy and a rollout start.

mod common;

use common::*;
use drover_control_plane::serve::ServeHandle;
use drover_protocol::messages::{Action, ArtifactFormat, Downlink, RuntimeReport, Uplink};
use drover_protocol::trust::{sha256, TrustStore};
use drover_protocol::{Manifest, PROTOCOL_VERSION};
use serde_json::json;

async fn publish(api: &Api, name: &str, format: Option<&str>) -> serde_json::Value {
    let model = dense_model(8, 3, 3, "MatMul");
    let mut body = json!({"name": name, "version": "1.0.0", "model_hex": hex::encode(&model)});
    if let Some(f) = format {
        body["format"] = json!(f);
    }
    let (status, published) = api.post("/v1/models", &body).await;
    assert_eq!(status, 201, "{published}");
    published
}

fn runtime(version: &str) -> RuntimeReport {
    RuntimeReport {
        engine: "tract".into(),
        version: version.into(),
        formats: vec![ArtifactFormat {
            format: drover_runtime::compiled::COMPILED_FORMAT.into(),
            version: drover_runtime::compiled::COMPILED_FORMAT_VERSION,
        }],
    }
}

/// A device that said hello with protocol `max` and, when given, reported `rt`.
async fn device(
    server: &ServeHandle,
    api: &Api,
    id: &str,
    max: u16,
    rt: Option<RuntimeReport>,
) -> (FakeDevice, TrustStore) {
    let e = api.enroll(id, &[("site", "a")]).await;
    let (id, key) = FakeDevice::from_enrollment(&e);
    let mut d = FakeDevice::connect(server.mqtt_addr(), id.clone(), key).await;
    let mut h = hello();
    if let Uplink::Hello(h) = &mut h {
        h.protocol_max = max;
    }
    d.send(h).await;
    let keyring = d
        .recv_downlink("Keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(server.root_public_key()).unwrap();
    trust.accept_keyring(&keyring, now_ms()).unwrap();
    let want = max.min(PROTOCOL_VERSION);
    eventually("the hello stored", || async {
        (api.device(id.as_str()).await["protocol"] == want).then_some(())
    })
    .await;
    if let Some(rt) = rt {
        d.send(Uplink::Runtime(rt.clone())).await;
        eventually("the runtime stored", || async {
            let v = api.device(id.as_str()).await;
            (v["runtime"]["version"] == rt.version.as_str()).then_some(())
        })
        .await;
    }
    (d, trust)
}

async fn deploy(api: &Api, device: &str, model: &str) -> (u16, serde_json::Value) {
    api.post(
        &format!("/v1/devices/{device}/deploy"),
        &json!({ "model": model }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_model_ships_compiled_and_self_tested_with_its_onnx_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let compiled = publish(&api, "vision", None).await;
    let summary = &compiled["summary"];
    assert_eq!(summary["format"], "tract-nnef 1", "{summary}");
    assert_eq!(
        summary["runtime_version"],
        drover_runtime::compiled::runtime_version()
    );
    // Both files are in the registry, each under its own hash.
    let models = dir.path().join("models");
    let shipped = std::fs::read(models.join(compiled["sha256"].as_str().unwrap())).unwrap();
    let source = std::fs::read(models.join(summary["source_sha256"].as_str().unwrap())).unwrap();
    assert_ne!(shipped, source);
    // The shipped file is the compiled form of the source and loads as one, and the ONNX
    // kept is the file that was published (it needed no fix).
    assert_eq!(source, dense_model(8, 3, 3, "MatMul"));
    drover_runtime::Model::load_compiled(&shipped, drover_runtime::Threads::One).unwrap();
    // The signed manifest, as a device receives it in a deploy command.
    let (mut d, trust) = device(
        &server,
        &api,
        "gw-new",
        3,
        Some(runtime(drover_runtime::compiled::runtime_version())),
    )
    .await;
    let (status, body) = deploy(&api, "gw-new", "vision@1.0.0").await;
    assert_eq!(status, 200, "{body}");
    let blob = d
        .recv_downlink("Command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let cmd = trust.verify_command(&blob, &d.id, 0, now_ms()).unwrap();
    let Action::Deploy { manifest, .. } = cmd.action else {
        panic!("{:?}", cmd.action)
    };
    let m: Manifest = trust.verify_manifest(&manifest, now_ms()).unwrap();
    let a = m.artifact.expect("a compiled manifest names its artifact");
    assert_eq!(a.source_sha256, sha256(&source));
    assert_eq!(
        a.runtime_version,
        drover_runtime::compiled::runtime_version()
    );
    assert_eq!(m.sha256, sha256(&shipped));
    assert!(!m.test_vectors.is_empty() || !m.sampled_vectors.is_empty());

    // `--format onnx` ships the ONNX file itself.
    let onnx = publish(&api, "legacy", Some("onnx")).await;
    assert_eq!(onnx["summary"]["format"], "onnx");
    assert_eq!(
        onnx["sha256"].as_str().unwrap(),
        hex::encode(sha256(&source))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiled_model_goes_only_to_devices_that_can_load_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    publish(&api, "vision", None).await;
    publish(&api, "legacy", Some("onnx")).await;
    let _old = device(&server, &api, "gw-p2", 2, None).await;
    let _older_rt = device(&server, &api, "gw-rt-old", 3, Some(runtime("0.20.0"))).await;
    let _nnef = device(
        &server,
        &api,
        "gw-rt",
        3,
        Some(runtime(drover_runtime::compiled::runtime_version())),
    )
    .await;

    // A protocol-2 agent loads ONNX only: refused, saying what to do.
    let (status, body) = deploy(&api, "gw-p2", "vision@1.0.0").await;
    assert_eq!(status, 409, "{body}");
    let msg = body.to_string();
    assert!(
        msg.contains("plain ONNX files only") && msg.contains("--format onnx"),
        "{msg}"
    );
    // A runtime older than the one that compiled it: refused with both versions.
    let (status, body) = deploy(&api, "gw-rt-old", "vision@1.0.0").await;
    assert_eq!(status, 409, "{body}");
    let msg = body.to_string();
    assert!(
        msg.contains("0.20.0") && msg.contains(drover_runtime::compiled::runtime_version()),
        "{msg}"
    );
    // A plain ONNX file to an agent that loads compiled models only: refused.
    let (status, body) = deploy(&api, "gw-rt", "legacy@1.0.0").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("compiled models only"), "{body}");
    // What each can load is sent; nothing refused left a command behind.
    for (dev, model) in [
        ("gw-p2", "legacy@1.0.0"),
        ("gw-rt-old", "legacy@1.0.0"),
        ("gw-rt", "vision@1.0.0"),
    ] {
        // gw-rt-old reported no onnx format either: only gw-p2 and gw-rt succeed.
        let (status, body) = deploy(&api, dev, model).await;
        let want = if dev == "gw-rt-old" { 409 } else { 200 };
        assert_eq!(status, want, "{dev} {model}: {body}");
    }

    // A rollout whose targets include devices that cannot run it is refused whole.
    let plan = json!({"model": "vision@1.0.0", "selector": "site=a", "waves": [{"percent": 100}]});
    let (status, body) = api.post("/v1/rollouts", &plan).await;
    assert_eq!(status, 409, "{body}");
    let msg = body.to_string();
    assert!(
        msg.contains("2 of 3 target devices") && msg.contains("gw-p2"),
        "{msg}"
    );
    assert_eq!(api.get("/v1/rollouts").await.as_array().unwrap().len(), 0);
}
