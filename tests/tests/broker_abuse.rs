//! Broker abuse by devices holding valid credentials (issue 24, faults 1, 2 and 9): session
//! takeover through another device's MQTT client id, one identity opening sessions without
//! end, publish floods, and ordinary disconnects miscounted as refused logins. On the
//! embedded broker (TLS front and plaintext mode) and on a real mosquitto configured by
//! `drover broker config mosquitto`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use drover_cli::broker::CONTROL_PLANE_URL_FILE;
use drover_control_plane::config::ServeConfig;
use drover_control_plane::metrics::BrokerRefusal;
use drover_control_plane::serve::{self, ServeHandle};
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{self, Mosquitto};
use drover_tests::{cli_enroll, drover_cli, free_port, peers_required, wait_until};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};

const WAIT: Duration = Duration::from_secs(90);

/// A device's credentials as a raw MQTT client uses them.
struct Creds {
    id: String,
    password: String,
    /// CA, certificate, key (`None` in plaintext mode).
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

fn creds(cfg: &drover_agent::config::AgentConfig) -> Creds {
    let key = DeviceKey(topics::parse_hex32(&cfg.device_key).unwrap());
    Creds {
        id: cfg.device_id.clone(),
        password: key.mqtt_password(),
        tls: cfg.tls.as_ref().map(|t| {
            (
                t.ca_file.clone(),
                t.client_cert_file.clone().unwrap(),
                t.client_key_file.clone().unwrap(),
            )
        }),
    }
}

/// A client logging in with `creds` under `client_id`, persistent session.
fn client(port: u16, creds: &Creds, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_credentials(creds.id.clone(), creds.password.clone())
        .set_max_packet_size(8 << 20, 8 << 20);
    if let Some((ca, cert, key)) = &creds.tls {
        let cfg = drover_control_plane::mqtt::tls_config(ca, Some((cert, key))).unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    AsyncClient::new(o, 4096)
}

/// Connects; returns the session and the publishes that arrived with the CONNACK's
/// batch, or the broker's refusal as text.
async fn connect(
    port: u16,
    creds: &Creds,
    client_id: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    let (c, mut el) = client(port, creds, client_id);
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer".into()));
    r.map(|()| (c, el))
}

/// Subscribes to `filter` and polls until the SUBACK: returns the topics of the
/// publishes received before it (on one connection the broker sends a session's queued
/// messages right after CONNACK, so they all come first), or `Err` if the connection
/// closed.
async fn subscribe_and_collect(
    c: &AsyncClient,
    el: &mut EventLoop,
    filter: &str,
) -> Result<Vec<String>, String> {
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(got),
                Ok(Event::Incoming(Packet::Publish(p))) => got.push(p.topic.clone()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no SUBACK".into()))
}

/// Polls until a publish on `topic` arrives.
async fn receive_on(el: &mut EventLoop, topic: &str) -> Result<(), String> {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("nothing on {topic}")))
}

/// Sends DISCONNECT and waits until the connection is gone.
async fn disconnect(c: AsyncClient, mut el: EventLoop) {
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} }).await;
}

async fn embedded(dir: &Path, allow_plaintext: bool) -> (ServeHandle, Vec<String>) {
    embedded_with(
        dir,
        ServeConfig {
            allow_plaintext,
            ..Default::default()
        },
    )
    .await
}

async fn embedded_with(dir: &Path, config: ServeConfig) -> (ServeHandle, Vec<String>) {
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..config
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let srv = vec![
        "--server".to_string(),
        format!("http://{}", server.http_addr()),
        "--token".to_string(),
        server.api_token().to_string(),
    ];
    (server, srv)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn publish_model(srv: &[&str]) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/dense_v1.onnx");
    let m = model.to_str().unwrap();
    let args = [
        "model",
        "publish",
        m,
        "--name",
        "dense",
        "--version",
        "1.0.0",
    ];
    drover_cli(&[&args[..], srv].concat()).unwrap();
}

fn deploy(srv: &[&str], device: &str) {
    let args = ["device", "deploy", device, "--model", "dense@1.0.0"];
    drover_cli(&[&args[..], srv].concat()).unwrap();
}

/// The takeover attempt, whatever the broker: `victim` holds a persistent session with a
/// signed command queued while it was away, and `attacker` logs in with its own valid
/// credentials but the victim's client id, once while the victim is offline and once
/// while it is online. Returns what the attacker read of the victim's downlink (its
/// connection may be refused, then it read nothing).
async fn attempt_takeover(port: u16, srv: &[&str], victim: &Creds, attacker: &Creds) {
    let victim_down = topics::downlink(&DeviceId::new(victim.id.as_str()).unwrap());
    let attacker_down = topics::downlink(&DeviceId::new(attacker.id.as_str()).unwrap());
    let (c, mut el) = connect(port, victim, &victim.id).await.unwrap();
    subscribe_and_collect(&c, &mut el, &victim_down)
        .await
        .unwrap();
    disconnect(c, el).await;

    // Offline: a command is queued in the victim's session.
    deploy(srv, &victim.id);
    if let Ok((c, mut el)) = connect(port, attacker, &victim.id).await {
        // Accepted only if the broker made it the attacker's own session.
        let stolen = subscribe_and_collect(&c, &mut el, &attacker_down).await;
        assert_eq!(
            stolen,
            Ok(vec![]),
            "the attacker read from the victim's session"
        );
        disconnect(c, el).await;
    }
    // The command is still the victim's.
    let (c, mut el) = connect(port, victim, &victim.id).await.unwrap();
    receive_on(&mut el, &victim_down)
        .await
        .expect("the victim's queued command was taken");

    // Online: the attacker does not kick the victim off.
    let attack = connect(port, attacker, &victim.id).await;
    subscribe_and_collect(&c, &mut el, &victim_down)
        .await
        .expect("the victim was kicked offline by another device using its client id");
    if let Ok((ac, ael)) = attack {
        disconnect(ac, ael).await;
    }
    disconnect(c, el).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_broker_refuses_another_devices_client_id_so_sessions_cannot_be_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, false).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let b = creds(&cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap());
    publish_model(&srv);
    let port = server.mqtt_addr().port();

    let refused = connect(port, &a, "gw-b").await.err().unwrap_or_default();
    assert!(refused.contains("BadClientId"), "{refused}");
    attempt_takeover(port, &srv, &b, &a).await;
    assert!(server.metrics().broker_refused(BrokerRefusal::ClientId) >= 3);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_broker_refuses_a_device_login_with_another_devices_client_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, true).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let b = creds(&cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap());
    assert!(a.tls.is_none());
    publish_model(&srv);
    let port = server.mqtt_addr().port();
    assert!(connect(port, &a, "gw-b").await.is_err());
    attempt_takeover(port, &srv, &b, &a).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_identity_keeps_one_session_through_a_connect_storm_and_others_still_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, false).await;
    let srv = refs(&srv);
    let a = std::sync::Arc::new(creds(
        &cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap(),
    ));
    let b = creds(&cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap());
    let port = server.mqtt_addr().port();

    // A new session replaces the old one of the same identity.
    let (_c1, mut el1) = connect(port, &b, "gw-b").await.unwrap();
    let (c2, mut el2) = connect(port, &b, "gw-b").await.unwrap();
    let old = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(e) = el1.poll().await {
                return e.to_string();
            }
        }
    })
    .await;
    assert!(old.is_ok(), "the replaced session stayed open");
    subscribe_and_collect(&c2, &mut el2, &topics::keyring())
        .await
        .unwrap();
    assert_eq!(server.open_tls_sessions("gw-b"), 1);

    // 200 concurrent connects of one identity; each client holds on to whatever it got.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let storm: Vec<_> = (0..200)
        .map(|_| {
            let a = std::sync::Arc::clone(&a);
            let answered = std::sync::Arc::clone(&answered);
            tokio::spawn(async move {
                let (_c, mut el) = client(port, &a, "gw-a");
                let mut first = true;
                // rumqttc reconnects on the poll after an error: stop at the first one.
                loop {
                    let r = el.poll().await;
                    if first && matches!(r, Ok(Event::Incoming(Packet::ConnAck(_))) | Err(_)) {
                        first = false;
                        answered.fetch_add(1, Relaxed);
                    }
                    if r.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    wait_until("every connect of the storm answered", WAIT, || async {
        (answered.load(Relaxed) == 200).then_some(())
    })
    .await
    .unwrap();
    wait_until("at most one session of gw-a", WAIT, || async {
        (server.open_tls_sessions("gw-a") <= 1).then_some(())
    })
    .await
    .unwrap();
    assert!(
        server.metrics().broker_refused(BrokerRefusal::ConnectRate) > 0,
        "the connect rate was not limited"
    );
    // Another device still connects and the HTTP API answers.
    let c = creds(&cli_enroll(&srv, dir, "gw-c", &[], "127.0.0.1:0").unwrap());
    let (cc, mut cel) = connect(port, &c, "gw-c").await.unwrap();
    subscribe_and_collect(&cc, &mut cel, &topics::keyring())
        .await
        .unwrap();
    assert!(drover_tests::cli_devices(&srv).len() >= 3);
    for t in storm {
        t.abort();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_flood_is_throttled_and_counted_while_another_devices_telemetry_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, false).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let cfg_b = cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap();
    let agent_b = drover_agent::run(cfg_b, std::future::pending())
        .await
        .unwrap();
    let port = server.mqtt_addr().port();
    let (c, mut el) = connect(port, &a, "gw-a").await.unwrap();
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let topic = topics::uplink(&DeviceId::new("gw-a").unwrap(), UplinkKind::Telemetry);
    let flood = tokio::spawn(async move {
        for _ in 0..1500 {
            if c.publish(topic.as_str(), QoS::AtMostOnce, false, vec![0u8; 512])
                .await
                .is_err()
            {
                return;
            }
        }
    });
    wait_until("the flood is throttled", WAIT, || async {
        (server.metrics().broker_throttled_messages.load(Relaxed) > 0).then_some(())
    })
    .await
    .unwrap();
    // gw-b's telemetry keeps being stored while gw-a is held back.
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/devices/gw-b/telemetry", server.http_addr());
    let stored = || async {
        let rows: Vec<serde_json::Value> = http
            .get(&url)
            .bearer_auth(server.api_token())
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(rows.len())
    };
    let before = stored().await.unwrap_or(0);
    wait_until("gw-b's telemetry stored during the flood", WAIT, || async {
        stored().await.filter(|n| *n > before)
    })
    .await
    .unwrap();
    assert_eq!(server.metrics().broker_auth_refused.load(Relaxed), 0);
    flood.abort();
    pump.abort();
    server.shutdown().await;
    drop(agent_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ordinary_disconnects_are_not_counted_as_refused_logins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, false).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let port = server.mqtt_addr().port();
    for _ in 0..3 {
        // Clean: DISCONNECT.
        let (c, el) = connect(port, &a, "gw-a").await.unwrap();
        disconnect(c, el).await;
        // Abrupt: the socket closes without DISCONNECT or TLS close_notify.
        let (c, el) = connect(port, &a, "gw-a").await.unwrap();
        drop((c, el));
        // A TCP probe that never starts TLS.
        drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    wait_until("every session closed", WAIT, || async {
        (server.open_tls_sessions("gw-a") == 0).then_some(())
    })
    .await
    .unwrap();
    let m = server.metrics();
    assert_eq!(m.broker_auth_refused.load(Relaxed), 0);
    for r in BrokerRefusal::ALL {
        assert_eq!(m.broker_refused(r), 0, "{}", r.as_str());
    }
    // A real refusal is still counted.
    assert!(connect(port, &a, "gw-x").await.is_err());
    assert_eq!(m.broker_auth_refused.load(Relaxed), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_fill_their_address_quota_and_a_device_still_connects() {
    use drover_control_plane::broker::handshakes::MAX_PENDING_PER_IP;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (server, srv) = embedded(dir, false).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let port = server.mqtt_addr().port();
    // 500 silent TCP connections: the device still connects (the figures of how much
    // later are in the handshake_flood bench; here only that it does).
    let mut silent: Vec<tokio::net::TcpStream> = Vec::new();
    for _ in 0..500 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let (c, el) = connect(port, &a, "gw-a").await.unwrap();
    disconnect(c, el).await;
    // Fill this address's quota: the next connection is closed on accept, counted.
    while silent.len() < MAX_PENDING_PER_IP {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let m = server.metrics();
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    wait_until("the over-quota connection refused", WAIT, || async {
        (m.broker_refused(BrokerRefusal::Handshakes) >= 1).then_some(())
    })
    .await
    .unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::io::AsyncReadExt::read(&mut over, &mut byte)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    // The flood goes away: its slots are freed and the device connects again.
    drop(silent);
    let (c, el) = wait_until("a device connects after the flood", WAIT, || async {
        connect(port, &a, "gw-a").await.ok()
    })
    .await
    .unwrap();
    disconnect(c, el).await;
    server.shutdown().await;
}

/// Past `broker_max_connections` (by default what the open-file limit carries) the
/// front closes a connection at accept, counted, instead of letting rumqttd's accept fail
/// and spin; places come back as connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_brokers_capacity_are_closed_at_accept_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        broker_max_connections: 3,
        ..Default::default()
    };
    let (server, srv) = embedded_with(dir, config).await;
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "cap-a", &[], "127.0.0.1:0").unwrap());
    let port = server.mqtt_addr().port();
    // Three connections hold every place (silent: they wait in their handshakes).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let m = server.metrics();
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    wait_until("the connection past capacity refused", WAIT, || async {
        (m.broker_refused(BrokerRefusal::Capacity) >= 1).then_some(())
    })
    .await
    .unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::io::AsyncReadExt::read(&mut over, &mut byte)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(
        connect(port, &a, "cap-a").await.is_err(),
        "a device got past a full broker"
    );
    assert_eq!(
        m.broker_refused(BrokerRefusal::Handshakes),
        0,
        "refused by the capacity, not the handshake bound"
    );
    // The three close: their places come back and the device connects.
    drop(held);
    let (c, el) = wait_until(
        "a device connects after the others closed",
        WAIT,
        || async { connect(port, &a, "cap-a").await.ok() },
    )
    .await
    .unwrap();
    disconnect(c, el).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_from_broker_config_binds_the_client_id_to_the_certificate() {
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
    drover_cli(&[
        "broker",
        "config",
        "mosquitto",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        mq.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        &port_s,
        "--control-plane-port",
        &cp_port_s,
        "--bind",
        "127.0.0.1",
        "--persistence-dir",
        mq.to_str().unwrap(),
        "--user",
        "root",
    ])
    .unwrap();
    let broker = Mosquitto::start_with_config(&mq, &mq.join("mosquitto.conf"), port).unwrap();
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        broker_url: std::fs::read_to_string(mq.join(CONTROL_PLANE_URL_FILE))
            .unwrap()
            .trim()
            .to_string(),
        advertised_broker_url: format!("mqtts://127.0.0.1:{port}"),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let srv = [
        "--server".to_string(),
        format!("http://{}", server.http_addr()),
        "--token".to_string(),
        server.api_token().to_string(),
    ];
    let srv = refs(&srv);
    let a = creds(&cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap());
    let b = creds(&cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap());
    publish_model(&srv);
    attempt_takeover(port, &srv, &b, &a).await;
    // The control plane's listener wants its password: a device certificate alone, with
    // any client id, gets nothing there.
    assert!(
        connect(cp_port, &a, "gw-b").await.is_err(),
        "{}",
        broker.log()
    );
    server.shutdown().await;
}
