//! Poison downlinks: with the control plane's own broker identity (mosquitto, password
//! file and `%u` ACLs, as `mosquitto_e2e.rs` runs it), garbage, empty, oversized,
//! truncated, wrongly MAC'd, forged-signature and replayed frames are published to a
//! running `drover-agent` process's downlink topic. The agent refuses each (its log says
//! so), acknowledges it and reports it to the control plane (a `refused` progress report
//! per frame, naming its size and why: issue 16), stays connected (mosquitto saw no new
//! connection from it), keeps serving its model, and still carries out the next genuine
//! deploy.

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::envelope::{seal_downlink, DownlinkFrame, MAX_DOWNLINK_LEN};
use drover_protocol::messages::Downlink;
use drover_protocol::topics::{self, parse_hex32};
use drover_protocol::trust::{SecretKey, SigKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{self, Mosquitto, CONTROL_PLANE_USER};
use drover_tests::{cli_enroll, free_port, peers_required, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::common::*;

const DEVICE: &str = "poison-a";

/// Connections mosquitto logged for the device's client id.
fn connections(broker: &Mosquitto) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {DEVICE} ")))
        .count()
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
    publish_dense(&srv);

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
    deploy_dense(&srv, DEVICE, "1.0.0");
    healthy_on(&srv, DEVICE, "1.0.0", &log).await.unwrap();
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
    deploy_dense(&srv, DEVICE, "2.0.0");
    healthy_on(&srv, DEVICE, "2.0.0", &log).await.unwrap();

    // Each frame that is not a valid downlink is reported once (acknowledged: never
    // redelivered, so never reported twice), with its size and the reason.
    let http = reqwest::Client::new();
    let reports = wait_until("the refusals reported", WAIT, || async {
        let rows: serde_json::Value = http
            .get(format!("{url}/v1/devices/{DEVICE}/progress?command=0"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let details: Vec<String> = rows
            .as_array()?
            .iter()
            .filter(|r| r["phase"] == "refused")
            .filter_map(|r| r["detail"].as_str().map(str::to_owned))
            .filter(|d| d.contains("downlink topic was refused and acknowledged"))
            .collect();
        (details.len() >= 5).then_some(details)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; agent log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(reports.len(), 5, "{reports:#?}");
    let oversized_len = MAX_DOWNLINK_LEN + 4096;
    assert!(
        reports
            .iter()
            .any(|d| d.contains(&format!("a {oversized_len}-byte message"))
                && d.contains("above the")),
        "{reports:#?}"
    );
    assert!(
        reports.iter().any(|d| d.contains("bad magic")),
        "{reports:#?}"
    );

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
    assert_eq!(device_view(&srv, DEVICE)["online"], true);
    let served = wait_until("the agent serving", WAIT, || served_version(&api_addr)).await;
    assert_eq!(served.ok().as_deref(), Some("2.0.0"));
    pump.abort();
    agent.kill().unwrap();
    agent.wait().unwrap();
    server.shutdown().await;
}
