//! One identity, many sessions, on mosquitto configured by `drover broker config
//! mosquitto` (mutual TLS, certificate identity as username and client id, `%u` ACLs):
//! 100 concurrent connects with one device's certificate leave at most one session of
//! it, the rest closed by the broker, while another device still connects and reads its
//! commands and the control plane keeps working. (Client-id takeover on this broker is
//! `broker_abuse.rs`'s `mosquitto_from_broker_config_binds_the_client_id_to_the_certificate`;
//! the certificate/ACL/CRL matrix is `security.rs`'s.)

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::topics;
use drover_tests::mosquitto::{self, Mosquitto};
use drover_tests::{cli_devices, cli_enroll, drover_cli, free_port, peers_required, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

use crate::common::WAIT;

const STORM: usize = 100;

fn options(cfg: &drover_agent::config::AgentConfig, port: u16) -> MqttOptions {
    let t = cfg.tls.as_ref().unwrap();
    let tls = drover_control_plane::mqtt::tls_config(
        &t.ca_file,
        Some((
            t.client_cert_file.as_ref().unwrap(),
            t.client_key_file.as_ref().unwrap(),
        )),
    )
    .unwrap();
    let mut o = MqttOptions::new(cfg.device_id.as_str(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_keeps_one_session_per_identity_through_a_connect_storm() {
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
    let (port_s, cp_port_s) = (port.to_string(), cp_port.to_string());
    let (data_s, mq_s) = (data.to_str().unwrap(), mq.to_str().unwrap());
    drover_cli(&[
        "broker",
        "config",
        "mosquitto",
        "--data-dir",
        data_s,
        "--out",
        mq_s,
        "--host",
        "127.0.0.1",
        "--port",
        &port_s,
        "--control-plane-port",
        &cp_port_s,
        "--bind",
        "127.0.0.1",
        "--persistence-dir",
        mq_s,
        "--user",
        "root",
    ])
    .unwrap();
    let broker = Mosquitto::start_with_config(&mq, &mq.join("mosquitto.conf"), port).unwrap();
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        broker_url: std::fs::read_to_string(mq.join(drover_cli::broker::CONTROL_PLANE_URL_FILE))
            .unwrap()
            .trim()
            .to_string(),
        advertised_broker_url: format!("mqtts://127.0.0.1:{port}"),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let a = cli_enroll(&srv, dir, "storm-a", &[], "127.0.0.1:0").unwrap();
    let b = cli_enroll(&srv, dir, "storm-b", &[], "127.0.0.1:0").unwrap();

    // Every client holds on to what it got and stops at its first error (rumqttc would
    // reconnect on the next poll).
    let (answered, alive) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let accepted = Arc::new(AtomicUsize::new(0));
    let storm: Vec<_> = (0..STORM)
        .map(|_| {
            let (answered, alive, accepted) = (answered.clone(), alive.clone(), accepted.clone());
            let (_c, mut el) = AsyncClient::new(options(&a, port), 16);
            tokio::spawn(async move {
                let _c = _c;
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        alive.fetch_add(1, Relaxed);
                        accepted.fetch_add(1, Relaxed);
                        answered.fetch_add(1, Relaxed);
                    }
                    _ => {
                        answered.fetch_add(1, Relaxed);
                        return;
                    }
                }
                while el.poll().await.is_ok() {}
                alive.fetch_sub(1, Relaxed);
            })
        })
        .collect();
    wait_until("every connect of the storm answered", WAIT, || async {
        (answered.load(Relaxed) == STORM).then_some(())
    })
    .await
    .unwrap();
    let live = wait_until("at most one session of storm-a", WAIT, || async {
        let n = alive.load(Relaxed);
        (n <= 1).then_some(n)
    })
    .await;
    assert!(
        live.is_ok(),
        "{} sessions of one identity: {}",
        alive.load(Relaxed),
        broker.log()
    );
    // The identity itself is welcome: its connects were accepted, each replacing the last.
    let accepted = accepted.load(Relaxed);
    eprintln!("mosquitto storm: {accepted} of {STORM} connects accepted, {live:?} left open");
    assert!(accepted >= 2, "only {accepted} connects accepted");

    // Another device connects and reads its commands; the control plane still answers.
    let (bc, mut bel) = AsyncClient::new(options(&b, port), 16);
    let down = topics::downlink(&drover_protocol::DeviceId::new("storm-b").unwrap());
    bc.subscribe(down.as_str(), QoS::AtLeastOnce).await.unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/dense_v1.onnx");
    let args = [
        "model",
        "publish",
        model.to_str().unwrap(),
        "--name",
        "dense",
        "--version",
        "1.0.0",
    ];
    drover_cli(&[&args[..], &srv].concat()).unwrap();
    let mut deployed = false;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match bel.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) if !deployed => {
                    deployed = true;
                    let args = ["device", "deploy", "storm-b", "--model", "dense@1.0.0"];
                    drover_cli(&[&args[..], &srv].concat()).unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == down => return,
                Ok(_) => {}
                Err(e) => panic!("storm-b: {e}"),
            }
        }
    })
    .await;
    assert!(got.is_ok(), "storm-b never received its command");
    assert_eq!(cli_devices(&srv).len(), 2);
    for t in storm {
        t.abort();
    }
    server.shutdown().await;
}
