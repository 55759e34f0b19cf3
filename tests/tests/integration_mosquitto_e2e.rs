//! The read-only integration identity on a real mosquitto configured by `drover broker
//! config mosquitto` (issue 20): after `drover integration create` and a rerun of the
//! config (which keeps the control plane's password) and SIGHUP, the identity's
//! certificate reads the JSON stream on the device listener and nothing else: no keyring,
//! no model chunks, no device downlink, and its publishes (into the JSON tree or a device
//! uplink) reach nobody. mosquitto 2.0 grants a denied MQTT 3.1.1 subscription in its
//! SUBACK and then never delivers on it, so each check is a delivery check fenced by a
//! later message on the same connection (per-connection order).
//!
//! Needs mosquitto (`.ci/install-deps.sh`); with `DROVER_REQUIRE_PEERS=1` (CI) a missing
//! mosquitto fails the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_control_plane::config::{IntegrationConfig, ServeConfig};
use drover_control_plane::serve;
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::DeviceId;
use drover_tests::mosquitto::{self, Mosquitto};
use drover_tests::{cli_enroll, drover_cli, free_port, peers_required, wait_until};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};

const WAIT: Duration = Duration::from_secs(90);
const ME: &str = "integration@grafana";

fn config_args(data: &Path, mq: &Path, port: u16, cp_port: u16) -> Vec<String> {
    ["broker", "config", "mosquitto", "--data-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            data.display().to_string(),
            "--out".into(),
            mq.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--control-plane-port".into(),
            cp_port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--user".into(),
            "root".into(),
        ])
        .collect()
}

async fn connect(port: u16, ca: &Path, cert: &Path, key: &Path) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(ME, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let cfg = drover_control_plane::mqtt::tls_config(ca, Some((cert, key))).unwrap();
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    let (c, mut el) = AsyncClient::new(o, 64);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("the integration connects");
    (c, el)
}

/// Polls until a publish on `fence` arrives; returns every topic received up to it.
async fn until(el: &mut EventLoop, fence: &str) -> Vec<String> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                got.push(p.topic.clone());
                if p.topic == fence {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing on {fence}; got {got:?}"));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_config_lets_an_integration_read_the_json_stream_and_nothing_else() {
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
    let data = dir.join("server");
    let mq = dir.join("mosquitto");
    let (port, cp_port) = (free_port(), free_port());
    let args = config_args(&data, &mq, port, cp_port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    drover_cli(&args).unwrap();
    let broker = Mosquitto::start_with_config(&mq, &mq.join("mosquitto.conf"), port).unwrap();
    let cp_url = std::fs::read_to_string(mq.join(drover_cli::broker::CONTROL_PLANE_URL_FILE))
        .unwrap()
        .trim()
        .to_string();
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        broker_url: cp_url,
        advertised_broker_url: format!("mqtts://127.0.0.1:{port}"),
        integration: IntegrationConfig { stream: true },
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cfg = cli_enroll(&srv, dir, "gw-a", &["site=a"], "127.0.0.1:0").unwrap();
    let _agent = drover_agent::run(cfg, std::future::pending())
        .await
        .unwrap();
    let gw = DeviceId::new("gw-a").unwrap();
    let ids = dir.join("grafana");
    let ids_s = ids.display().to_string();
    drover_cli(
        &[
            &["integration", "create", "grafana", "--out", &ids_s][..],
            &srv,
        ]
        .concat(),
    )
    .unwrap();
    // The rerun: the ACL gains the integration's block; the control plane keeps its login.
    drover_cli(&args).unwrap();
    broker.reload().unwrap();
    let (ca, cert, key): (PathBuf, PathBuf, PathBuf) = (
        ids.join("ca.pem"),
        ids.join("grafana.pem"),
        ids.join("grafana.key"),
    );
    let reg = topics::json_registration(&gw);

    // Allowed: the retained registration. Denied: the retained keyring, asked for first.
    let got = wait_until("the integration reads the JSON stream", WAIT, || async {
        let (c, mut el) = connect(port, &ca, &cert, &key).await;
        c.subscribe(topics::keyring(), QoS::AtLeastOnce)
            .await
            .unwrap();
        c.subscribe("drover/v1/model/+/chunks", QoS::AtLeastOnce)
            .await
            .unwrap();
        c.subscribe(topics::downlink(&gw), QoS::AtLeastOnce)
            .await
            .unwrap();
        c.subscribe(reg.clone(), QoS::AtLeastOnce).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), until(&mut el, &reg))
            .await
            .ok();
        let _ = c.disconnect().await;
        got
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nacl:\n{}\n{}",
            std::fs::read_to_string(mq.join("acl")).unwrap_or_default(),
            broker.log()
        )
    });
    assert_eq!(got, vec![reg.clone()], "only the JSON stream is readable");

    // Its publishes reach nobody: the control plane's identity (who may read everything
    // on its listener) sees its own fence message, not the forgeries.
    let (c, mut el) = connect(port, &ca, &cert, &key).await;
    let json = topics::json_uplink(&gw, UplinkKind::Telemetry);
    c.subscribe(topics::json_filter_all(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let _ = until(&mut el, &reg).await;
    for t in [
        json.clone(),
        topics::uplink(&gw, UplinkKind::Telemetry),
        format!("drover/v1/dev/{ME}/up/telemetry"),
    ] {
        c.publish(t, QoS::AtLeastOnce, false, b"{\"forged\":true}".to_vec())
            .await
            .unwrap();
    }
    // mosquitto routes a publish before it acknowledges it: once the three PUBACKs are
    // in, an allowed forgery would already be queued to this subscriber. Then one more
    // real telemetry record (from gw-a's agent, through the control plane) as a fence.
    let mut records = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut acks = 0;
        let mut fenced = false;
        while !fenced {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::PubAck(_)) => acks += 1,
                Event::Incoming(Packet::Publish(p)) => {
                    fenced = acks == 3 && p.topic == json;
                    records.push(p.payload.to_vec());
                }
                _ => {}
            }
        }
    })
    .await
    .expect("three PUBACKs and a telemetry record");
    assert!(
        records.iter().all(|r| !r.starts_with(b"{\"forged\"")),
        "a forged record reached the JSON stream's readers"
    );
    // Not ordered with the fence (another connection), so this can only miss, not flake.
    let refused: u64 = drover_control_plane::metrics::Refusal::ALL
        .iter()
        .map(|r| server.metrics().refused(*r))
        .sum();
    assert_eq!(refused, 0, "no forged uplink reached the control plane");
}
