//! rmqtt as the embedded broker (`embedded_broker = "rmqtt"`, feature `rmqtt`; issue 23):
//! mutual TLS with the fleet CA on the public address, the login bound to the
//! certificate, the per-topic ACL in its hooks, its private loopback port taking only the
//! control plane's login, the retained keyring, and a real agent running over it; and the
//! front's per-identity rules in its hooks: one live session per identity, the connect
//! rate, publishes paced by the message rate, a decommission closing the open session.
//!
//! cargo test -p drover-tests --features rmqtt --test broker_rmqtt

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::metrics::BrokerRefusal;
use drover_control_plane::pki::FleetCa;
use drover_control_plane::serve;
use drover_host::clock::now_ms;
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::{cli_devices, cli_enroll, drover_cli, wait_until};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration,
    Transport,
};

const WAIT: Duration = Duration::from_secs(90);

struct Identity {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn enrolled_identity(cfg: &drover_agent::config::AgentConfig) -> Identity {
    let tls = cfg.tls.as_ref().expect("enrollment wrote a [tls] section");
    Identity {
        ca: tls.ca_file.clone(),
        cert: tls.client_cert_file.clone().unwrap(),
        key: tls.client_key_file.clone().unwrap(),
    }
}

fn password(cfg: &drover_agent::config::AgentConfig) -> String {
    DeviceKey(topics::parse_hex32(&cfg.device_key).unwrap()).mqtt_password()
}

/// Connects and returns the live session, or the broker's refusal as text.
async fn connect(
    port: u16,
    client_id: &str,
    tls: Option<&Identity>,
    login: (&str, &str),
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_credentials(login.0, login.1);
    if let Some(id) = tls {
        let cfg =
            drover_control_plane::mqtt::tls_config(&id.ca, Some((&id.cert, &id.key))).unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    let (c, mut el) = AsyncClient::new(o, 16);
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return match a.code {
                        rumqttc::ConnectReturnCode::Success => Ok(()),
                        code => Err(format!("{code:?}")),
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer".into()));
    r.map(|()| (c, el))
}

/// The SUBACK's return code, a PUBACK, a retained keyring message or the connection
/// closing, whichever comes first.
async fn next(el: &mut EventLoop) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    return match s.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => "granted".to_string(),
                        other => format!("refused {other:?}"),
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => return "puback".to_string(),
                Ok(Event::Incoming(Packet::Publish(p))) => return format!("message {}", p.topic),
                Ok(_) => {}
                Err(_) => return "closed".to_string(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "nothing".into())
}

fn foreign_identity(dir: &Path, device: &str, real_ca: &Path) -> Identity {
    let other = FleetCa::load_or_init(&dir.join("foreign-ca"), now_ms()).unwrap();
    let f = other.issue_client(device, now_ms(), 30).unwrap();
    let id = Identity {
        ca: real_ca.to_owned(),
        cert: dir.join("foreign.crt"),
        key: dir.join("foreign.key"),
    };
    drover_host::fs::write_private(&id.cert, f.cert_pem.as_bytes()).unwrap();
    drover_host::fs::write_private(&id.key, f.key_pem.as_bytes()).unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rmqtt_requires_mutual_tls_bound_to_the_device_and_applies_the_acl() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        embedded_broker: "rmqtt".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    assert!(server.broker_url().starts_with("mqtts://"));
    let port = server.mqtt_addr().port();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cfg_a = cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap();
    let mut cfg_b = cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap();
    // No model is deployed here: nothing to load in a separate process.
    cfg_b.runtime.isolate = false;
    let (a, b) = (enrolled_identity(&cfg_a), enrolled_identity(&cfg_b));
    let (pass_a, pass_b) = (password(&cfg_a), password(&cfg_b));

    // No certificate, another device's certificate, a wrong password, a foreign CA.
    assert!(connect(port, "gw-a", None, ("gw-a", &pass_a))
        .await
        .is_err());
    assert!(
        connect(port, "gw-b", Some(&a), ("gw-b", &pass_b))
            .await
            .is_err(),
        "gw-a's certificate logged in as gw-b"
    );
    assert!(connect(port, "gw-b", Some(&b), ("gw-b", &pass_a))
        .await
        .is_err());
    assert!(
        connect(port, "gw-x", Some(&a), ("gw-a", &pass_a))
            .await
            .is_err(),
        "a client id other than the device id"
    );
    let foreign = foreign_identity(dir, "gw-a", &a.ca);
    assert!(connect(port, "gw-a", Some(&foreign), ("gw-a", &pass_a))
        .await
        .is_err());
    // The private loopback port takes the control plane's login only.
    let backend = server.embedded_backend_addr().unwrap();
    assert_ne!(backend.port(), port);
    assert!(
        connect(backend.port(), "gw-a", None, ("gw-a", &pass_a))
            .await
            .is_err(),
        "the private broker port took a device password"
    );

    // The ACL: gw-a's own downlink and the keyring (retained: it arrives at once), not
    // gw-b's downlink; publishing as gw-b closes the connection.
    let (gw_a, gw_b) = (
        DeviceId::new("gw-a").unwrap(),
        DeviceId::new("gw-b").unwrap(),
    );
    let (c, mut el) = connect(port, "gw-a", Some(&a), ("gw-a", &pass_a))
        .await
        .unwrap();
    c.subscribe(topics::downlink(&gw_b), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        next(&mut el).await.starts_with("refused"),
        "gw-b's downlink"
    );
    c.subscribe(topics::downlink(&gw_a), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(next(&mut el).await, "granted");
    c.subscribe(topics::keyring(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = vec![next(&mut el).await, next(&mut el).await];
    got.sort();
    assert_eq!(got, ["granted", &format!("message {}", topics::keyring())]);
    c.publish(
        topics::uplink(&gw_b, UplinkKind::Labels),
        QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(next(&mut el).await, "closed", "gw-a published as gw-b");

    // A real agent runs over it: connects, reports, is seen online.
    let agent_b = drover_agent::run(cfg_b, std::future::pending())
        .await
        .unwrap();
    wait_until("gw-b online over rmqtt", WAIT, || async {
        cli_devices(&srv)
            .iter()
            .any(|d| d["id"] == "gw-b" && d["online"] == true)
            .then_some(())
    })
    .await
    .unwrap();

    // A decommissioned device's next connect is refused.
    drover_cli(&[&["device", "decommission", "gw-a"][..], &srv].concat()).unwrap();
    assert!(connect(port, "gw-a", Some(&a), ("gw-a", &pass_a))
        .await
        .is_err());
    server.shutdown().await;
    drop(agent_b);
}

/// Waits for the connection to close (`true`), or `false` after `WAIT`.
async fn closes(el: &mut EventLoop) -> bool {
    tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rmqtt_holds_each_identity_to_one_session_its_rates_and_a_decommission() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        embedded_broker: "rmqtt".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let port = server.mqtt_addr().port();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cfg_a = cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap();
    let cfg_b = cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap();
    let (a, b) = (enrolled_identity(&cfg_a), enrolled_identity(&cfg_b));
    let (pass_a, pass_b) = (password(&cfg_a), password(&cfg_b));

    // One live session per identity: the second closes the first.
    let (_c1, mut el1) = connect(port, "gw-a", Some(&a), ("gw-a", &pass_a))
        .await
        .unwrap();
    let (c2, mut el2) = connect(port, "gw-a", Some(&a), ("gw-a", &pass_a))
        .await
        .unwrap();
    assert!(
        closes(&mut el1).await,
        "the older session of gw-a stayed open"
    );
    wait_until("one open session of gw-a", WAIT, || async {
        (server.open_tls_sessions("gw-a") == 1).then_some(())
    })
    .await
    .unwrap();

    // Publishes past the message rate are held back, and counted.
    let pump = tokio::spawn(async move { while el2.poll().await.is_ok() {} });
    let topic = topics::uplink(&DeviceId::new("gw-a").unwrap(), UplinkKind::Telemetry);
    let flood = tokio::spawn(async move {
        for _ in 0..1500 {
            if c2
                .publish(topic.as_str(), QoS::AtMostOnce, false, vec![0u8; 512])
                .await
                .is_err()
            {
                return;
            }
        }
    });
    wait_until("gw-a's flood throttled", WAIT, || async {
        (server.metrics().broker_throttled_messages.load(Relaxed) > 0).then_some(())
    })
    .await
    .unwrap();
    flood.abort();
    pump.abort();

    // The connect rate: a burst of 20, then one a second; gw-b connects 30 times in a row.
    let mut refused = 0;
    for _ in 0..30 {
        match connect(port, "gw-b", Some(&b), ("gw-b", &pass_b)).await {
            Ok((c, _el)) => drop(c),
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "30 connects in a row were all taken");
    assert!(server.metrics().broker_refused(BrokerRefusal::ConnectRate) > 0);

    // A decommission closes gw-a's open session at once, with no packet from it.
    // (gw-a's connect bucket still has room: 3 connects so far.)
    let (_c3, mut el3) = connect(port, "gw-a", Some(&a), ("gw-a", &pass_a))
        .await
        .unwrap();
    drover_cli(&[&["device", "decommission", "gw-a"][..], &srv].concat()).unwrap();
    assert!(
        closes(&mut el3).await,
        "a decommissioned device's open session stayed open"
    );
    wait_until("no open session of gw-a", WAIT, || async {
        (server.open_tls_sessions("gw-a") == 0).then_some(())
    })
    .await
    .unwrap();
    server.shutdown().await;
}
