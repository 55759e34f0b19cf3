//! The integration stream end to end (issue 20): with `integration.stream` on, the control
//! plane republishes a real agent's authenticated uplinks as flat JSON on
//! `drover/v1/json/<device>/<kind>` and its registration (operator labels) retained on
//! `drover/v1/json/<device>/registration`, read here by a plain MQTT client through a real
//! mosquitto, logged in as the control plane's user. The read-only integration identity
//! and a real Node-RED consumer: `integration_nodered_e2e.rs`.

use std::time::Duration;

use drover_agent::config::AgentConfig;
use drover_control_plane::config::{IntegrationConfig, ServeConfig};
use drover_control_plane::serve;
use drover_protocol::topics;
use drover_protocol::DeviceKey;
use drover_tests::mosquitto::{self, Mosquitto, CONTROL_PLANE_USER};
use drover_tests::{cli_devices as devices, cli_enroll, peers_required, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn device_password(cfg: &AgentConfig) -> String {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&cfg.device_key[2 * i..2 * i + 2], 16).unwrap();
    }
    DeviceKey(key).mqtt_password()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uplinks_are_republished_as_flat_json_with_retained_registrations() {
    if mosquitto::binary().is_none() {
        assert!(
            !peers_required(),
            "mosquitto is required (DROVER_REQUIRE_PEERS=1)"
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
        integration: IntegrationConfig { stream: true },
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cfg = cli_enroll(&srv, dir, "gw-a", &["site=plant-a"], "127.0.0.1:0").unwrap();
    broker
        .add_users(&[("gw-a".into(), device_password(&cfg))])
        .unwrap();
    let _agent = drover_agent::run(cfg, std::future::pending())
        .await
        .unwrap();
    wait_until("gw-a online", WAIT, || async {
        devices(&srv)
            .iter()
            .any(|d| d["id"] == "gw-a" && d["online"] == true)
            .then_some(())
    })
    .await
    .unwrap();

    // A reader that subscribes after the hello still gets the registration (retained),
    // then the telemetry windows as they come.
    let mut o = MqttOptions::new("json-reader", "127.0.0.1", broker.port);
    o.set_credentials(CONTROL_PLANE_USER, cp_pass);
    let (client, mut events) = AsyncClient::new(o, 64);
    client
        .subscribe(topics::json_filter_all(), QoS::AtMostOnce)
        .await
        .unwrap();
    let mut registration: Option<(bool, Value)> = None;
    let mut telemetry: Option<Value> = None;
    let dev = drover_protocol::DeviceId::new("gw-a").unwrap();
    let reg_topic = topics::json_registration(&dev);
    let tel_topic = topics::json_uplink(&dev, topics::UplinkKind::Telemetry);
    tokio::time::timeout(WAIT, async {
        while registration.is_none() || telemetry.is_none() {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap() {
                let v: Value = serde_json::from_slice(&p.payload).unwrap();
                if p.topic == reg_topic {
                    registration = Some((p.retain, v));
                } else if p.topic == tel_topic {
                    telemetry = Some(v);
                }
            }
        }
    })
    .await
    .expect("registration and telemetry JSON within the wait");
    let (_, reg) = registration.unwrap();
    // The first reader may have seen the registration live (the hello's republish can
    // land after its subscription). A reader that subscribes now, after it was
    // published, must get it as a retained message.
    let mut o = MqttOptions::new("json-reader-late", "127.0.0.1", broker.port);
    o.set_credentials(CONTROL_PLANE_USER, cp_pass);
    let (late, mut late_events) = AsyncClient::new(o, 64);
    late.subscribe(reg_topic.clone(), QoS::AtMostOnce)
        .await
        .unwrap();
    let retained = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = late_events.poll().await.unwrap() {
                if p.topic == reg_topic {
                    return p.retain;
                }
            }
        }
    })
    .await
    .expect("the retained registration for a late reader");
    assert!(retained, "the registration is retained: {reg}");
    assert_eq!(reg["schema"], 1);
    assert_eq!(reg["kind"], "registration");
    assert_eq!(reg["device"], "gw-a");
    assert_eq!(reg["labels"]["site"], "plant-a");
    let t = telemetry.unwrap();
    assert_eq!(t["schema"], 1, "{t}");
    assert_eq!(t["device"], "gw-a");
    assert_eq!(t["kind"], "telemetry");
    assert!(t["ts"].as_u64().unwrap() > 0, "{t}");
    assert!(t["seq"].as_u64().is_some(), "{t}");
    let metrics = t["metrics"].as_object().unwrap();
    assert!(metrics.values().all(Value::is_number), "{t}");
    assert!(metrics.contains_key("inferences"), "{t}");
    assert!(metrics.contains_key("window_end_ms"), "{t}");
    let published = server
        .metrics()
        .json_published
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(published >= 2, "{published}");
}
