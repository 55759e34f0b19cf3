//! Poison downlinks: with the control plane's own broker identity (mosquitto, password
//! file and `%u` ACLs, as `mosquitto_e2e.rs` runs it), garbage, empty, oversized,
//! truncated, wrongly MAC'd, forged-signature and replayed frames are published to a
//! running `drover-agent` process's downlink topic. The agent refuses each (its log says
//! so), stays connected (mosquitto saw no new connection from it), keeps serving its
//! model, and still carries out the next genuine deploy.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::envelope::{seal_downlink, DownlinkFrame, MAX_DOWNLINK_LEN};
use drover_protocol::messages::Downlink;
use drover_protocol::topics::{self, parse_hex32};
use drover_protocol::trust::{SecretKey, SigKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{self, Mosquitto, CONTROL_PLANE_USER};
use drover_tests::{cli_devices, cli_enroll, drover_cli, free_port, peers_required, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::common::WAIT;

const DEVICE: &str = "poison-a";

fn device(srv: &[&str]) -> serde_json::Value {
    cli_devices(srv)
        .into_iter()
        .find(|d| d["id"] == DEVICE)
        .unwrap_or_default()
}

fn deploy(srv: &[&str], version: &str) {
    let m = format!("dense@{version}");
    drover_cli(
        &[
            &["device", "deploy", DEVICE, "--model", m.as_str()][..],
            srv,
        ]
        .concat(),
    )
    .unwrap();
}

async fn healthy_on(srv: &[&str], version: &str) {
    let want = format!("dense@{version}");
    wait_until(&format!("{DEVICE} healthy on {want}"), WAIT, || async {
        let d = device(srv);
        (d["active_model"] == want.as_str() && d["last_phase"] == "healthy").then_some(())
    })
    .await
    .unwrap();
}

async fn served_version(api: &str) -> Option<String> {
    let body = json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![0.25f32; 16]}]});
    let r = reqwest::Client::new()
        .post(format!("http://{api}/v2/models/dense/infer"))
        .json(&body)
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    Some(v["model_version"].as_str()?.to_owned())
}

/// Connections mosquitto logged for the device's client id.
fn connections(broker: &Mosquitto) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {DEVICE} ")))
        .count()
}

fn spawn_agent(config: &Path, log: &Path) -> Child {
    Command::new(drover_tests::workspace_bin("drover-agent").unwrap())
        .arg("--config")
        .arg(config)
        .args(["--probation-ms", "300"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_downlinks_are_refused_and_the_agent_stays_connected_and_serving() {
    if mosquitto::binary().is_none() {
        assert!(
            !peers_required(),
            "mosquitto is required (DROVER_REQUIRE_PEERS=1) but not installed"
        );
        eprintln!("skipped: mosquitto not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cp_pass = "cp-secret-for-poison";
    let broker = Mosquitto::start(
        &dir.join("mosquitto"),
        &[(CONTROL_PLANE_USER.to_string(), cp_pass.to_string())],
    )
    .unwrap();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        broker_url: broker.url(CONTROL_PLANE_USER, cp_pass),
        advertised_broker_url: format!("mqtt://127.0.0.1:{}", broker.port),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let api_addr = format!("127.0.0.1:{}", free_port());
    let cfg = cli_enroll(&srv, dir, DEVICE, &[], &api_addr).unwrap();
    let key = DeviceKey(parse_hex32(&cfg.device_key).unwrap());
    broker
        .add_users(&[(DEVICE.into(), key.mqtt_password())])
        .unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures");
    for (file, version) in [("dense_v1.onnx", "1.0.0"), ("dense_v2.onnx", "2.0.0")] {
        let f = fixtures.join(file);
        let args = [
            "model",
            "publish",
            f.to_str().unwrap(),
            "--name",
            "dense",
            "--version",
            version,
        ];
        drover_cli(&[&args[..], &srv].concat()).unwrap();
    }

    // The control plane's identity, watching the device's downlink to capture a genuine
    // command for the replay.
    let id = DeviceId::new(DEVICE).unwrap();
    let down = topics::downlink(&id);
    let mut o = MqttOptions::new("poisoner", "127.0.0.1", broker.port);
    o.set_credentials(CONTROL_PLANE_USER, cp_pass)
        .set_max_packet_size(16 << 20, 16 << 20);
    let (cp, mut cp_el) = AsyncClient::new(o, 64);
    cp.subscribe(down.as_str(), QoS::AtLeastOnce).await.unwrap();
    let (tx, mut captured) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        while let Ok(ev) = cp_el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send(p.payload.to_vec());
            }
        }
    });

    let log = dir.join("agent.log");
    let mut agent = spawn_agent(&dir.join(format!("{DEVICE}.toml")), &log);
    deploy(&srv, "1.0.0");
    healthy_on(&srv, "1.0.0").await;
    let genuine = tokio::time::timeout(WAIT, async {
        loop {
            let f = captured.recv().await.unwrap();
            if let Ok(DownlinkFrame {
                msg: Downlink::Command(_),
                ..
            }) = drover_protocol::envelope::open_downlink(&f, &id, &key)
            {
                return f;
            }
        }
    })
    .await
    .unwrap();
    let connects_before = connections(&broker);
    assert!(connects_before >= 1, "{}", broker.log());

    let frame = |msg: Downlink, key: &DeviceKey| {
        seal_downlink(
            key,
            &DownlinkFrame {
                device: id.clone(),
                sent_at_ms: drover_host::clock::now_ms(),
                msg,
            },
        )
    };
    let forged =
        SecretKey::from_seed([3; 32]).sign(SigKind::Command, b"deploy everything".to_vec());
    let mut oversized = genuine.clone();
    oversized.resize(MAX_DOWNLINK_LEN + 4096, 0);
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x01 not a frame at all".to_vec()),
        ("empty", Vec::new()),
        ("truncated", genuine[..genuine.len() / 2].to_vec()),
        (
            "wrong MAC",
            frame(Downlink::Command(forged.clone()), &DeviceKey([5; 32])),
        ),
        ("forged signature", frame(Downlink::Command(forged), &key)),
        ("replayed command", genuine.clone()),
        ("oversized", oversized),
    ];
    for (what, bytes) in &poison {
        cp.publish(down.as_str(), QoS::AtLeastOnce, false, bytes.clone())
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // A fence: the next genuine command, published after the poison on the same
    // connection, is handled after it. The agent carries it out.
    deploy(&srv, "2.0.0");
    healthy_on(&srv, "2.0.0").await;

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let refusals = text.matches("refused").count();
    assert!(
        refusals >= 4,
        "the agent logged {refusals} refusals: {text}"
    );
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent exited: {text}"
    );
    assert_eq!(
        connections(&broker),
        connects_before,
        "the agent reconnected during the poison: {text}"
    );
    assert_eq!(device(&srv)["online"], true);
    let served = wait_until("the agent serving", WAIT, || served_version(&api_addr)).await;
    assert_eq!(served.ok().as_deref(), Some("2.0.0"));
    pump.abort();
    agent.kill().unwrap();
    agent.wait().unwrap();
    server.shutdown().await;
}
