//! The end-to-end flow on a production-style external broker: a real Debian mosquitto
//! with password authentication, `%u` pattern ACLs and persistence; `drover serve
//! --broker-url` is then only an MQTT client; two real agents.
//!
//! Needs mosquitto (`.ci/install-deps.sh`). With `DROVER_REQUIRE_PEERS=1` (CI) a missing
//! mosquitto fails the test; otherwise it is reported and skipped.

use std::path::Path;
use std::time::Duration;

use drover_agent::config::AgentConfig;
use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{self, Mosquitto, CONTROL_PLANE_USER};
use drover_tests::{cli_devices as devices, cli_enroll, drover_cli, peers_required, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(90);

fn device_password(cfg: &AgentConfig) -> String {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&cfg.device_key[2 * i..2 * i + 2], 16).unwrap();
    }
    DeviceKey(key).mqtt_password()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_and_control_plane_work_through_mosquitto_with_acls() {
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
    let cp_pass = "cp-secret-for-test";
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

    let cfg_a = cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap();
    let cfg_b = cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap();
    broker
        .add_users(&[
            ("gw-a".into(), device_password(&cfg_a)),
            ("gw-b".into(), device_password(&cfg_b)),
        ])
        .unwrap();
    let pass_a = device_password(&cfg_a);
    let agent_a = drover_agent::run(cfg_a, std::future::pending())
        .await
        .unwrap();
    let agent_b = drover_agent::run(cfg_b, std::future::pending())
        .await
        .unwrap();

    wait_until("both devices online through mosquitto", WAIT, || async {
        let l = devices(&srv);
        let n = l.iter().filter(|d| d["online"] == true).count();
        (n == 2).then_some(())
    })
    .await
    .unwrap();

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/dense_v1.onnx");
    drover_cli(
        &[
            &[
                "model",
                "publish",
                model.to_str().unwrap(),
                "--name",
                "dense",
                "--version",
                "1.0.0",
            ][..],
            &srv,
        ]
        .concat(),
    )
    .unwrap();
    for id in ["gw-a", "gw-b"] {
        drover_cli(
            &[
                &["device", "deploy", id, "--model", "dense@1.0.0"][..],
                &srv,
            ]
            .concat(),
        )
        .unwrap();
    }
    wait_until(
        "both devices run dense@1.0.0 via mosquitto",
        WAIT,
        || async {
            let l = devices(&srv);
            let n = l
                .iter()
                .filter(|d| {
                    d["active_model"]
                        .as_str()
                        .is_some_and(|m| m.contains("1.0.0"))
                })
                .count();
            (n == 2).then_some(())
        },
    )
    .await
    .unwrap();
    for a in [&agent_a, &agent_b] {
        let r = reqwest::get(format!("http://{}/v2/models/dense/ready", a.api_addr()))
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    // The broker's ACL: gw-a may not publish as gw-b. An observer with the control
    // plane's identity sees gw-a's own message but never the forged one, which gw-a sent
    // first on the same connection (mosquitto keeps per-client order).
    let observer = {
        let mut o = MqttOptions::new("acl-observer", "127.0.0.1", broker.port);
        o.set_credentials(CONTROL_PLANE_USER, cp_pass);
        o
    };
    let (obs, mut obs_loop) = AsyncClient::new(observer, 10);
    let gw_a = DeviceId::new("gw-a").unwrap();
    let gw_b = DeviceId::new("gw-b").unwrap();
    obs.subscribe("drover/v1/dev/+/up/labels", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut a_opts = MqttOptions::new("gw-a-rogue", "127.0.0.1", broker.port);
    a_opts.set_credentials("gw-a", pass_a);
    let (rogue, mut rogue_loop) = AsyncClient::new(a_opts, 10);
    tokio::spawn(async move { while rogue_loop.poll().await.is_ok() {} });
    let own_topic = topics::uplink(&gw_a, UplinkKind::Labels);
    let seen = tokio::spawn(async move {
        let mut topics_seen = Vec::new();
        loop {
            match obs_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    rogue
                        .publish(
                            topics::uplink(&gw_b, UplinkKind::Labels),
                            QoS::AtLeastOnce,
                            false,
                            b"forged".to_vec(),
                        )
                        .await
                        .unwrap();
                    rogue
                        .publish(
                            topics::uplink(&gw_a, UplinkKind::Labels),
                            QoS::AtLeastOnce,
                            false,
                            b"own".to_vec(),
                        )
                        .await
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    topics_seen.push(p.topic.clone());
                    if p.topic == topics::uplink(&gw_a, UplinkKind::Labels) {
                        return topics_seen;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("observer: {e}"),
            }
        }
    });
    let topics_seen = tokio::time::timeout(WAIT, seen).await.unwrap().unwrap();
    assert_eq!(topics_seen, vec![own_topic]);

    server.shutdown().await;
    drop(agent_a);
    drop(agent_b);
}
