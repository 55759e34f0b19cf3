//! Deploy over a real broker (in-process rumqttd) against a scripted control plane:
//! signed deploy, inference over HTTP, hot swap under load, refused commands.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use drover_agent::Tuning;
use drover_protocol::messages::{Action, Command, Phase};
use drover_protocol::topics::DeviceId;
use drover_protocol::trust::{SecretKey, TrustError};

async fn infer(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    http.post(format!("{base}/v2/models/{name}/infer"))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_infer_hot_swap_under_load_and_refuse_bad_commands() {
    let port = start_broker();
    let keys = Arc::new(Keys::new());
    let dev = "gw-deploy";
    let cp = ControlPlane::start(port, dev, keys.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config(dir.path(), dev, port, &keys);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = drover_agent::run_with(
        cfg,
        Tuning {
            probation: Duration::from_millis(300),
            ..Default::default()
        },
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}", agent.api_addr());
    let http = reqwest::Client::new();

    // Not ready before a model is deployed.
    let r = http
        .get(format!("{base}/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    cp.wait_hello(1).await;
    let hello = cp
        .wait_for("hello", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                drover_protocol::messages::Uplink::Hello(h) => Some(h.clone()),
                _ => None,
            })
        })
        .await;
    assert_eq!(hello.labels.get("site").map(String::as_str), Some("test"));
    assert_eq!(hello.arch, std::env::consts::ARCH);
    assert_eq!(
        (hello.protocol_min, hello.protocol_max),
        (
            drover_protocol::MIN_PROTOCOL_VERSION,
            drover_agent::machine::SPEAKS_PROTOCOL
        )
    );
    assert_eq!((hello.last_command_seq, hello.active.clone()), (0, None));
    let v1 = publish(&keys, "dense_v1", "dense", "1.0.0", 1024);
    let v2 = publish(&keys, "dense_v2", "dense", "2.0.0", 1024);
    cp.add_model(&v1);
    cp.add_model(&v2);

    // 1. Deploy v1 and infer over HTTP.
    let c1 = deploy_command(&keys, dev, 1, &v1);
    cp.command(1, c1.clone()).await;
    let healthy = cp.wait_phase(c1.digest(), Phase::Healthy).await;
    assert_eq!(healthy.model.unwrap().version, "1.0.0");
    let phases: Vec<Phase> = progress_for(&cp.progress(), &c1.digest())
        .iter()
        .map(|p| p.phase)
        .collect();
    for p in [
        Phase::Received,
        Phase::Downloading,
        Phase::Verified,
        Phase::SelfTested,
        Phase::Active,
        Phase::Healthy,
    ] {
        assert!(phases.contains(&p), "{p:?} missing from {phases:?}");
    }
    let (in1, out1) = reference("dense_v1");
    // v2's expected output on the same inputs, computed by tract directly.
    let out2 = drover_runtime::Model::load(&v2.bytes)
        .unwrap()
        .run(&in1)
        .unwrap();
    let body = infer_body(&in1);
    let r: serde_json::Value = infer(&http, &base, "dense", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["model_version"], "1.0.0");
    assert!(close(&first_output(&r), &f32s(&out1[0])), "{r}");

    // 2. Swap to v2 under concurrent load: zero failed requests.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let served_v2 = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures, served_v2, total) = (
            stop.clone(),
            failures.clone(),
            served_v2.clone(),
            total.clone(),
        );
        let (http, base, body) = (http.clone(), base.clone(), body.clone());
        let (o1, o2) = (f32s(&out1[0]), f32s(&out2[0]));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                total.fetch_add(1, Ordering::SeqCst);
                let r = infer(&http, &base, "dense", &body).await;
                if r.status() != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let v: serde_json::Value = r.json().await.unwrap();
                let out = first_output(&v);
                let ok = match v["model_version"].as_str() {
                    Some("1.0.0") => close(&out, &o1),
                    Some("2.0.0") => {
                        served_v2.fetch_add(1, Ordering::SeqCst);
                        close(&out, &o2)
                    }
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let c2 = deploy_command(&keys, dev, 2, &v2);
    cp.command(2, c2.clone()).await;
    cp.wait_phase(c2.digest(), Phase::Healthy).await;
    // Keep the load on until v2 has served some requests, then stop.
    while served_v2.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "failed requests during swap"
    );
    assert!(total.load(Ordering::SeqCst) > 20);

    // 3. Refusals, each with its exact reason; v2 keeps serving.
    let device = DeviceId::new(dev).unwrap();
    let cmd = |seq: u64, expires_at_ms: u64| Command {
        target: device.clone(),
        seq,
        issued_at_ms: now_ms(),
        expires_at_ms,
        rollout_id: None,
        action: Action::Deploy {
            manifest: v1.blob.clone(),
            mode: drover_protocol::messages::DeployMode::Activate,
        },
    };
    let mut tampered = keys.signer.sign_command(&cmd(3, now_ms() + 60_000));
    let last = tampered.payload.len() - 1;
    tampered.payload[last] ^= 1;
    let rogue = SecretKey::from_seed([66; 32]);
    // Distinct expiries give each case its own payload digest.
    let unknown_key = rogue.sign_command(&cmd(3, now_ms() + 61_000));
    let mut forged = rogue.sign_command(&cmd(3, now_ms() + 62_000));
    forged.key_id = keys.signer.id();
    let expires = now_ms() - 1000;
    let expired = keys.signer.sign_command(&cmd(3, expires));
    let cases = vec![
        (tampered, TrustError::BadSignature.to_string()),
        (
            unknown_key,
            TrustError::UnknownKey { key_id: rogue.id() }.to_string(),
        ),
        (forged, TrustError::BadSignature.to_string()),
        (
            c1.clone(),
            TrustError::Replayed { seq: 1, last: 2 }.to_string(),
        ),
        (expired, format!("command expired at {expires} ms (now ")),
    ];
    // The broker redelivering the last accepted command is not an attack: it is ignored
    // (no refusal report, no action); the refusals below are handled after it, in order.
    cp.send(drover_protocol::messages::Downlink::Command(c2.clone()))
        .await;
    for (blob, reason) in cases {
        cp.send(drover_protocol::messages::Downlink::Command(blob.clone()))
            .await;
        let p = cp
            .wait_for("refusal", |s| {
                s.frames.iter().find_map(|f| match &f.msg {
                    drover_protocol::messages::Uplink::Progress(p)
                        if p.command_digest == blob.digest() && p.phase == Phase::Refused =>
                    {
                        Some(p.clone())
                    }
                    _ => None,
                })
            })
            .await;
        let detail = p.detail.unwrap();
        assert!(detail.starts_with(&reason), "{detail:?} vs {reason:?}");
        let r: serde_json::Value = infer(&http, &base, "dense", &body)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["model_version"], "2.0.0");
    }

    assert!(progress_for(&cp.progress(), &c2.digest())
        .iter()
        .all(|p| p.phase != Phase::Refused));

    // 4. Rollback command returns to v1.
    let rb = keys.signer.sign_command(&Command {
        target: device.clone(),
        seq: 3,
        issued_at_ms: now_ms(),
        expires_at_ms: now_ms() + 60_000,
        rollout_id: None,
        action: Action::Rollback { to: None },
    });
    cp.command(3, rb.clone()).await;
    cp.wait_phase(rb.digest(), Phase::Done).await;
    let r: serde_json::Value = infer(&http, &base, "dense", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["model_version"], "1.0.0");

    let _ = stop_tx.send(());
    agent.wait().await.unwrap();
}
