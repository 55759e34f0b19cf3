//! End to end against an in-process `drover serve` with scripted devices: enroll, hello,
//! telemetry and acks, publish, signed deploy, coalesced chunk serving, progress, last
//! will, and the CLI binary listing the fleet.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::process::Command as Proc;

use common::*;
use drover_protocol::envelope::decode_chunk;
use drover_protocol::messages::{
    Action, ChunkRequest, Downlink, ModelRef, Phase, Progress, Uplink,
};
use drover_protocol::topics::{self, parse_hex32};
use drover_protocol::trust::{verify_chunk, TrustStore};

fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Proc::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lifecycle_from_enroll_to_deploy_chunks_and_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let root = server.root_public_key();

    // Enroll gw-01 with the CLI (writes the agent's config), gw-02 over the API.
    let agent_toml = dir.path().join("agent.toml");
    let d = dir.path().to_owned();
    let t = agent_toml.clone();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &d,
            &[
                "device",
                "enroll",
                "gw-01",
                "--label",
                "site=plant-a",
                "--out",
                t.to_str().unwrap(),
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = drover_agent::config::AgentConfig::from_toml(
        &std::fs::read_to_string(&agent_toml).unwrap(),
    )
    .unwrap();
    let valid = cfg.validate().unwrap();
    assert_eq!(valid.root_public_key, root);
    assert_eq!(cfg.labels["site"], "plant-a");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&agent_toml).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let e2 = api.enroll("gw-02", &[("site", "plant-b")]).await;

    let mut dev1 = FakeDevice::connect(server.mqtt_addr(), valid.device_id, valid.device_key).await;
    let (id2, key2) = FakeDevice::from_enrollment(&e2);
    let mut dev2 = FakeDevice::connect(server.mqtt_addr(), id2, key2).await;

    // Hello → online, HelloAck and the root-signed keyring.
    let hello_seq = dev1.send(hello()).await;
    dev2.send(hello()).await;
    let ack = dev1
        .recv_downlink("HelloAck", |f| match &f.msg {
            Downlink::HelloAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert_eq!(ack.protocol_version, 1);
    assert!(ack.stored_up_to >= hello_seq);
    let keyring = dev1
        .recv_downlink("Keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(root).unwrap();
    trust.accept_keyring(&keyring, now_ms()).unwrap();
    eventually("both devices online", || async {
        let a = api.device("gw-01").await;
        let b = api.device("gw-02").await;
        (a["online"] == true && b["online"] == true && a["arch"] == "x86_64").then_some(())
    })
    .await;

    // Telemetry rows appear and are acknowledged.
    let mut last = 0;
    for n in 0..5 {
        last = dev1.send(telemetry(n)).await;
    }
    dev1.recv_downlink("UplinkAck covering the telemetry", |f| match &f.msg {
        Downlink::UplinkAck(a) => a
            .ranges
            .iter()
            .any(|(lo, hi)| *lo <= last && last <= *hi)
            .then_some(()),
        _ => None,
    })
    .await;
    let rows = api.get("/v1/devices/gw-01/telemetry").await;
    assert_eq!(rows.as_array().unwrap().len(), 5);

    // Publish a model (validated by tract, baseline derived, signed).
    let model = dense_model(128, 32, 7, "MatMul");
    let (status, published) = api
        .post(
            "/v1/models",
            &serde_json::json!({
                "name": "dense",
                "version": "1.0.0",
                "model_hex": hex::encode(&model),
                "baseline_csv": baseline_csv(128, 200),
                "chunk_size": 1024,
                // The scripted device speaks protocol 1: an agent that loads ONNX only.
                "format": "onnx",
            }),
        )
        .await;
    assert_eq!(status, 201, "{published}");
    let digest = parse_hex32(published["digest"].as_str().unwrap()).unwrap();
    assert_eq!(published["summary"]["baseline"]["rows"], 200);
    assert_eq!(published["summary"]["test_vectors"], 3);

    // Deploy with the CLI; the device verifies the signed command and manifest.
    let d = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &d,
            &[
                "device",
                "deploy",
                "gw-01",
                "--model",
                "dense@1.0.0",
                "--output",
                "json",
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resp["seq"], 1);
    let cmd_blob = dev1
        .recv_downlink("Command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let cmd = trust
        .verify_command(&cmd_blob, &dev1.id, 0, now_ms())
        .unwrap();
    assert_eq!(cmd.seq, 1);
    let Action::Deploy { manifest, .. } = cmd.action else {
        panic!("expected a deploy action")
    };
    assert_eq!(manifest.digest(), digest);
    let manifest = trust.verify_manifest(&manifest, now_ms()).unwrap();
    assert_eq!(manifest.size, model.len() as u64);
    let chunks = manifest.chunk_count();
    assert!(chunks >= 8, "{chunks} chunks");

    // 20 devices ask for every chunk of the same model at once: coalesced publishes.
    let mut fleet = Vec::new();
    for i in 0..20 {
        let e = api.enroll(&format!("dl-{i:02}"), &[]).await;
        let (id, key) = FakeDevice::from_enrollment(&e);
        let d = FakeDevice::connect(server.mqtt_addr(), id, key).await;
        d.subscribe(topics::model_chunks(&digest)).await;
        // Chunks are served only for a model the device was commanded to fetch.
        let (status, r) = api
            .post(
                &format!("/v1/devices/dl-{i:02}/deploy"),
                &serde_json::json!({"model": "dense@1.0.0"}),
            )
            .await;
        assert_eq!(status, 200, "{r}");
        fleet.push(d);
    }
    // A round trip through the broker orders each device's subscription before its request.
    for d in &mut fleet {
        d.send(hello()).await;
        d.recv_downlink("HelloAck", |f| {
            matches!(f.msg, Downlink::HelloAck(_)).then_some(())
        })
        .await;
    }
    for d in &mut fleet {
        d.send(Uplink::ChunkRequest(ChunkRequest {
            manifest_digest: digest,
            indices: (0..chunks).collect(),
        }))
        .await;
    }
    let mut assembled = Vec::new();
    for d in &mut fleet {
        let mut got = vec![None; chunks as usize];
        while got.iter().any(Option::is_none) {
            let (topic, bytes) =
                tokio::time::timeout(std::time::Duration::from_secs(60), d.other.recv())
                    .await
                    .expect("chunks never arrived")
                    .unwrap();
            if topic != topics::model_chunks(&digest) {
                continue;
            }
            let c = decode_chunk(&bytes).unwrap();
            verify_chunk(&manifest, c.index, &c.data).unwrap();
            got[c.index as usize] = Some(c.data);
        }
        assembled.push(got.into_iter().flatten().flatten().collect::<Vec<u8>>());
    }
    assert!(assembled.iter().all(|a| *a == model));
    let publishes = server
        .metrics()
        .chunk_publishes
        .load(std::sync::atomic::Ordering::Relaxed);
    let bytes = server
        .metrics()
        .chunk_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    // 20 devices × chunks requested; served with about one model's worth of egress.
    assert!(
        publishes <= 2 * u64::from(chunks),
        "{publishes} publishes for {chunks} chunks and 20 devices"
    );
    assert!(
        bytes <= 2 * (model.len() as u64 + 200 * u64::from(chunks)),
        "{bytes} bytes"
    );

    // Progress to Active updates the device's state.
    dev1.send(Uplink::Progress(Progress {
        command_seq: 1,
        command_digest: cmd_blob.digest(),
        model: Some(ModelRef {
            name: "dense".into(),
            version: "1.0.0".into(),
            digest,
        }),
        phase: Phase::Active,
        chunks_done: chunks,
        chunks_total: chunks,
        detail: None,
    }))
    .await;
    eventually("gw-01 reports dense active", || async {
        (api.device("gw-01").await["active_model"] == "dense@1.0.0").then_some(())
    })
    .await;

    // The CLI lists the fleet as JSON, filtered by label.
    let d = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &d,
            &[
                "device",
                "list",
                "--label",
                "site=plant-a",
                "--online",
                "--output",
                "json",
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<drover_control_plane::api::DeviceView> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, "gw-01");
    assert_eq!(list[0].active_model.as_deref(), Some("dense@1.0.0"));

    // A crashed device goes offline through its last will.
    dev2.crash();
    eventually("gw-02 offline via last will", || async {
        (api.device("gw-02").await["online"] == false).then_some(())
    })
    .await;
    assert_eq!(api.device("gw-01").await["online"], true);

    let metrics = api.metrics().await;
    assert!(metrics.contains("drover_uplink_stored_total"), "{metrics}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_unsupported_operators_by_name_and_duplicate_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let bad = dense_model(4, 2, 1, "DroverNoSuchOp");
    let (status, body) = api
        .post(
            "/v1/models",
            &serde_json::json!({"name": "bad", "version": "1.0.0", "model_hex": hex::encode(&bad)}),
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        body["error"].as_str().unwrap().contains("DroverNoSuchOp"),
        "{body}"
    );
    let good = dense_model(4, 2, 1, "MatMul");
    let body =
        serde_json::json!({"name": "good", "version": "1.0.0", "model_hex": hex::encode(&good)});
    assert_eq!(api.post("/v1/models", &body).await.0, 201);
    assert_eq!(api.post("/v1/models", &body).await.0, 409);
    // A wrong token is refused; health and metrics need none.
    let r = api
        .http
        .get(format!("{}/v1/models", api.base))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A path parameter that is not a number gets a JSON error naming the problem.
    for path in [
        "/v1/rollouts/abc",
        "/v1/rollouts/abc/report",
        "/v1/train/jobs/-1",
    ] {
        let r = api
            .http
            .get(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("Cannot parse")),
            "{path}: {body}"
        );
    }
    let (status, body) = api
        .post("/v1/rollouts/x/pause", &serde_json::json!({}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].is_string(), "{body}");
    server.shutdown().await;
}
