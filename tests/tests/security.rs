//! Production security end to end (issue 9): mutual TLS with fleet-CA certificates on the
//! embedded broker and on a real Debian mosquitto configured by `drover broker config
//! mosquitto`; identity-bound ACLs, revocation, refused foreign/expired/absent
//! certificates and plaintext; key rotation without a restart, including an agent that was
//! offline through it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::pki::{FleetCa, CONTROL_PLANE_IDENTITY};
use drover_control_plane::serve;
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{self, Mosquitto};
use drover_tests::{cli_devices, cli_enroll, drover_cli, free_port, peers_required, wait_until};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};

const WAIT: Duration = Duration::from_secs(90);

use drover_host::clock::now_ms;

/// Client TLS material on disk: CA, certificate, key.
struct Identity {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn identity_files(dir: &Path, name: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Identity {
    let id = Identity {
        ca: dir.join(format!("{name}.ca.pem")),
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    drover_host::fs::write_private(&id.ca, ca_pem.as_bytes()).unwrap();
    drover_host::fs::write_private(&id.cert, cert_pem.as_bytes()).unwrap();
    drover_host::fs::write_private(&id.key, key_pem.as_bytes()).unwrap();
    id
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
    DeviceKey(drover_protocol::topics::parse_hex32(&cfg.device_key).unwrap()).mqtt_password()
}

fn client(
    port: u16,
    client_id: &str,
    tls: Option<&Identity>,
    login: Option<(&str, &str)>,
) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(id) = tls {
        let cfg =
            drover_control_plane::mqtt::tls_config(&id.ca, Some((&id.cert, &id.key))).unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    AsyncClient::new(o, 16)
}

/// Connects and returns the live session, or the broker's refusal as text.
async fn connect(
    port: u16,
    client_id: &str,
    tls: Option<&Identity>,
    login: Option<(&str, &str)>,
) -> Result<(AsyncClient, EventLoop), String> {
    let (c, mut el) = client(port, client_id, tls, login);
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

/// A certificate for `device` from a CA the fleet does not trust.
fn foreign_identity(dir: &Path, device: &str, real_ca_pem: &str) -> Identity {
    let other = FleetCa::load_or_init(&dir.join("foreign-ca"), now_ms()).unwrap();
    let f = other.issue_client(device, now_ms(), 30).unwrap();
    identity_files(dir, "foreign", real_ca_pem, &f.cert_pem, &f.key_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_broker_requires_mutual_tls_bound_to_the_device_and_cuts_revoked_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    assert!(
        server.broker_url().starts_with("mqtts://"),
        "{}",
        server.broker_url()
    );
    let port = server.mqtt_addr().port();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cfg_a = cli_enroll(&srv, dir, "gw-a", &[], "127.0.0.1:0").unwrap();
    let cfg_b = cli_enroll(&srv, dir, "gw-b", &[], "127.0.0.1:0").unwrap();
    let (a, b) = (enrolled_identity(&cfg_a), enrolled_identity(&cfg_b));
    let (pass_a, pass_b) = (password(&cfg_a), password(&cfg_b));
    let ca_pem = std::fs::read_to_string(&a.ca).unwrap();

    // Plaintext MQTT is refused when TLS is required.
    let plain = connect(port, "gw-a", None, Some(("gw-a", &pass_a))).await;
    assert!(plain.is_err(), "plaintext connected");
    // A's certificate cannot log in as B, even with B's password.
    let as_b = connect(port, "gw-b", Some(&a), Some(("gw-b", &pass_b))).await;
    assert!(as_b.is_err(), "gw-a's certificate logged in as gw-b");
    // B's certificate with a wrong password: rumqttd's hook still checks the key.
    let wrong = connect(port, "gw-b", Some(&b), Some(("gw-b", &pass_a))).await;
    assert!(wrong.is_err(), "wrong password accepted");
    // A certificate from another CA, and an expired one from the right CA.
    let foreign = foreign_identity(dir, "gw-a", &ca_pem);
    assert!(
        connect(port, "gw-a", Some(&foreign), Some(("gw-a", &pass_a)))
            .await
            .is_err()
    );
    let ca = FleetCa::load_or_init(&dir.join("server"), now_ms()).unwrap();
    let old = ca
        .issue_client("gw-a", now_ms() - 40 * 86_400_000, 1)
        .unwrap();
    let expired = identity_files(dir, "expired", &ca_pem, &old.cert_pem, &old.key_pem);
    assert!(
        connect(port, "gw-a", Some(&expired), Some(("gw-a", &pass_a)))
            .await
            .is_err()
    );

    // rumqttd's private loopback port does not take a device's password: only the
    // front's token, which it issues after the certificate checks.
    let backend = server.embedded_backend_addr().unwrap();
    assert_ne!(backend.port(), port);
    let direct = connect(backend.port(), "gw-a", None, Some(("gw-a", &pass_a))).await;
    assert!(
        direct.is_err(),
        "the private broker port took a device password"
    );

    // A real agent runs over mutual TLS.
    let agent_b = drover_agent::run(cfg_b, std::future::pending())
        .await
        .unwrap();
    wait_until("gw-b online over mutual TLS", WAIT, || async {
        cli_devices(&srv)
            .iter()
            .any(|d| d["id"] == "gw-b" && d["online"] == true)
            .then_some(())
    })
    .await
    .unwrap();

    // The embedded broker's ACL: gw-a may not subscribe to gw-b's commands nor publish
    // as gw-b (the front closes the connection: MQTT 3.1.1 has no per-publish refusal);
    // its own downlink and the keyring are fine.
    let gw_a = DeviceId::new("gw-a").unwrap();
    let gw_b = DeviceId::new("gw-b").unwrap();
    let (c, el_sub) = connect(port, "gw-a", Some(&a), Some(("gw-a", &pass_a)))
        .await
        .unwrap();
    c.subscribe(topics::downlink(&gw_b), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        next_ack_or_close(el_sub).await,
        "closed",
        "gw-a subscribed to gw-b's commands"
    );
    let (c, el_pub) = connect(port, "gw-a", Some(&a), Some(("gw-a", &pass_a)))
        .await
        .unwrap();
    c.publish(
        topics::uplink(&gw_b, UplinkKind::Labels),
        QoS::AtLeastOnce,
        false,
        b"forged".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(
        next_ack_or_close(el_pub).await,
        "closed",
        "gw-a published as gw-b"
    );
    let (c, el_own) = connect(port, "gw-a", Some(&a), Some(("gw-a", &pass_a)))
        .await
        .unwrap();
    c.subscribe(topics::downlink(&gw_a), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        next_ack_or_close(el_own).await,
        "ack",
        "gw-a's own subscription"
    );

    // The real identity works (its client id is its device id); each connect above
    // replaced the one before, so this is gw-a's only session.
    let (_c, mut el) = connect(port, "gw-a", Some(&a), Some(("gw-a", &pass_a)))
        .await
        .unwrap();
    wait_until("gw-a holds one session", WAIT, || async {
        (server.open_tls_sessions("gw-a") == 1).then_some(())
    })
    .await
    .unwrap();

    // Decommission cuts the open session at once and refuses the next connect.
    drover_cli(&[&["device", "decommission", "gw-a"][..], &srv].concat()).unwrap();
    let cut = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(e) = el.poll().await {
                return e.to_string();
            }
        }
    })
    .await
    .expect("the decommissioned device's session stayed open");
    assert!(!cut.is_empty());
    assert!(connect(port, "gw-a", Some(&a), Some(("gw-a", &pass_a)))
        .await
        .is_err());
    // B is unaffected.
    assert!(connect(port, "gw-b", Some(&b), Some(("gw-b", &pass_b)))
        .await
        .is_ok());
    server.shutdown().await;
    drop(agent_b);
}

/// Polls until the broker acknowledges (SUBACK/PUBACK) or closes the connection.
async fn next_ack_or_close(mut el: EventLoop) -> &'static str {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_) | Packet::PubAck(_))) => return "ack",
                Ok(_) => {}
                Err(_) => return "closed",
            }
        }
    })
    .await
    .unwrap_or("neither")
}

fn publish_model(srv: &[&str], version: &str) {
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
                version,
            ][..],
            srv,
        ]
        .concat(),
    )
    .unwrap();
}

fn deploy(srv: &[&str], device: &str, version: &str) {
    let m = format!("dense@{version}");
    drover_cli(
        &[
            &["device", "deploy", device, "--model", m.as_str()][..],
            srv,
        ]
        .concat(),
    )
    .unwrap();
}

async fn wait_phase(
    srv: &[&str],
    device: &str,
    want: impl Fn(&serde_json::Value) -> bool,
    what: &str,
) {
    wait_until(what, WAIT, || async {
        cli_devices(srv)
            .into_iter()
            .find(|d| d["id"] == device)
            .filter(|d| want(d))
            .map(|_| ())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_rotate_reaches_running_and_returning_agents_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("server");
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
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
    let agent_a = drover_agent::run(cfg_a, std::future::pending())
        .await
        .unwrap();
    publish_model(&srv, "1.0.0");
    deploy(&srv, "gw-a", "1.0.0");
    let active = |v: &'static str| {
        move |d: &serde_json::Value| d["active_model"].as_str().is_some_and(|m| m.contains(v))
    };
    wait_phase(&srv, "gw-a", active("1.0.0"), "gw-a runs 1.0.0 (key 1)").await;

    // Rotate with no grace: key 1 retires now. gw-b is offline throughout.
    let out = drover_cli(&[
        "keys",
        "rotate",
        "--data-dir",
        data.to_str().unwrap(),
        "--grace-days",
        "0",
        "--server",
        &url,
        "--token",
        &token,
    ])
    .unwrap();
    assert!(
        out.contains("running server signs with the new key"),
        "{out}"
    );
    let ring: serde_json::Value = serde_json::from_str(
        &drover_cli(&[
            "keys",
            "show",
            "--data-dir",
            data.to_str().unwrap(),
            "--output",
            "json",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(ring["version"], 2);

    // A model signed by the new key deploys to the running agent (it took keyring v2).
    publish_model(&srv, "2.0.0");
    deploy(&srv, "gw-a", "2.0.0");
    // Healthy, not only active: its probation ending reports `healthy`, which would
    // overwrite the refusal below before a slow poll saw it.
    wait_phase(
        &srv,
        "gw-a",
        |d| active("2.0.0")(d) && d["last_phase"] == "healthy",
        "gw-a runs 2.0.0 healthy (key 2, no restart)",
    )
    .await;

    // 1.0.0's manifest is signed by the retired key: refused now.
    deploy(&srv, "gw-a", "1.0.0");
    wait_phase(
        &srv,
        "gw-a",
        // `refused` is the phase of a signature/trust refusal (before any download).
        |d| d["last_phase"] == "refused",
        "gw-a refuses the retired key's manifest",
    )
    .await;
    let d = cli_devices(&srv)
        .into_iter()
        .find(|d| d["id"] == "gw-a")
        .unwrap();
    assert!(d["active_model"].as_str().unwrap().contains("2.0.0"), "{d}");

    // gw-b was offline through the rotation: it catches up and runs a key-2 model.
    let agent_b = drover_agent::run(cfg_b, std::future::pending())
        .await
        .unwrap();
    deploy(&srv, "gw-b", "2.0.0");
    wait_phase(&srv, "gw-b", active("2.0.0"), "returning gw-b runs 2.0.0").await;
    server.shutdown().await;
    drop(agent_a);
    drop(agent_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_from_broker_config_enforces_certificate_identity_acl_and_crl() {
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
        "--host",
        "localhost",
        "--port",
        &port_s,
        "--control-plane-port",
        &cp_port_s,
        "--bind",
        "127.0.0.1",
        "--persistence-dir",
        mq.to_str().unwrap(),
        // The CRL stays in the server's 0700 key directory, read in place.
        "--user",
        "root",
    ])
    .unwrap();
    let broker = Mosquitto::start_with_config(&mq, &mq.join("mosquitto.conf"), port).unwrap();
    // The control plane's own listener: certificate plus the password in this URL.
    let cp_url = std::fs::read_to_string(mq.join(drover_cli::broker::CONTROL_PLANE_URL_FILE))
        .unwrap()
        .trim()
        .to_string();
    let cp_login = drover_control_plane::config::parse_broker_url(&cp_url).unwrap();
    let cp_user = cp_login.username.clone().unwrap();
    let cp_pass = cp_login.password.clone().unwrap();
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        broker_url: cp_url.clone(),
        advertised_broker_url: format!("mqtts://127.0.0.1:{port}"),
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
    // The ACL probe's identity: a device with no agent (the client id is the
    // certificate's CN on mosquitto too, so probing as gw-a would replace its agent).
    let cfg_c = cli_enroll(&srv, dir, "gw-c", &[], "127.0.0.1:0").unwrap();
    let c_identity = enrolled_identity(&cfg_c);
    assert!(
        cfg_a.broker_url.starts_with("mqtts://"),
        "{}",
        cfg_a.broker_url
    );
    let (a, b) = (enrolled_identity(&cfg_a), enrolled_identity(&cfg_b));
    let ca_pem = std::fs::read_to_string(&a.ca).unwrap();
    let agent_a = drover_agent::run(cfg_a.clone(), std::future::pending())
        .await
        .unwrap();
    let agent_b = drover_agent::run(cfg_b.clone(), std::future::pending())
        .await
        .unwrap();
    publish_model(&srv, "1.0.0");
    for id in ["gw-a", "gw-b"] {
        deploy(&srv, id, "1.0.0");
    }
    for id in ["gw-a", "gw-b"] {
        wait_phase(
            &srv,
            id,
            |d| {
                d["active_model"]
                    .as_str()
                    .is_some_and(|m| m.contains("1.0.0"))
            },
            "deploy through mosquitto mTLS",
        )
        .await;
    }

    // Plaintext, foreign CA and expired certificates are refused by mosquitto.
    assert!(connect(port, "plain", None, Some(("gw-a", "x")))
        .await
        .is_err());
    let foreign = foreign_identity(dir, "gw-a", &ca_pem);
    assert!(connect(port, "foreign", Some(&foreign), None)
        .await
        .is_err());
    let ca = FleetCa::load_or_init(&data, now_ms()).unwrap();
    let old = ca
        .issue_client("gw-a", now_ms() - 40 * 86_400_000, 1)
        .unwrap();
    let expired = identity_files(dir, "expired", &ca_pem, &old.cert_pem, &old.key_pem);
    assert!(connect(port, "expired", Some(&expired), None)
        .await
        .is_err());

    // ACL: with gw-c's certificate (username = client id = CN, whatever the client
    // claims), nothing published as gw-b reaches the control plane's identity, and gw-b's
    // commands never reach gw-c. Per-connection order makes the "own" message the fence.
    let cp = {
        let keys = data.join("keys");
        Identity {
            ca: keys.join("ca.pem"),
            cert: keys.join("control-plane.pem"),
            key: keys.join("control-plane.key"),
        }
    };
    let (obs, mut obs_el) = connect(
        cp_port,
        "acl-observer",
        Some(&cp),
        Some((&cp_user, &cp_pass)),
    )
    .await
    .unwrap();
    let (rogue, mut rogue_el) = connect(port, "gw-b", Some(&c_identity), Some(("gw-b", "claimed")))
        .await
        .unwrap();
    let gw_c = DeviceId::new("gw-c").unwrap();
    let gw_b = DeviceId::new("gw-b").unwrap();
    rogue
        .subscribe(topics::downlink(&gw_b), QoS::AtLeastOnce)
        .await
        .unwrap();
    rogue
        .subscribe(topics::downlink(&gw_c), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Both SUBACKs. mosquitto 2.0 grants a denied MQTT 3.1.1 subscription in its SUBACK
    // and then never delivers on it: the delivery check below is the refusal.
    let mut acks = 0;
    while acks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = rogue_el.poll().await.unwrap() {
            acks += 1;
        }
    }
    obs.subscribe(topics::uplink_filter_all(), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = obs_el.poll().await.unwrap() {
            break;
        }
    }
    let own_down = topics::downlink(&gw_c);
    let rogue_task = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match rogue_el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    got.push(p.topic.clone());
                    if p.topic == own_down {
                        return got;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("rogue: {e}"),
            }
        }
    });
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
            topics::uplink(&gw_c, UplinkKind::Labels),
            QoS::AtLeastOnce,
            false,
            b"own".to_vec(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = obs_el.poll().await {
                if p.topic.ends_with("/up/labels") {
                    seen.push(p.topic.clone());
                    if p.topic == topics::uplink(&gw_c, UplinkKind::Labels) {
                        return;
                    }
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, vec![topics::uplink(&gw_c, UplinkKind::Labels)]);
    obs.publish(
        topics::downlink(&gw_b),
        QoS::AtLeastOnce,
        false,
        b"for b".to_vec(),
    )
    .await
    .unwrap();
    obs.publish(
        topics::downlink(&gw_c),
        QoS::AtLeastOnce,
        false,
        b"for c".to_vec(),
    )
    .await
    .unwrap();
    let obs_pump = tokio::spawn(async move { while obs_el.poll().await.is_ok() {} });
    let got = tokio::time::timeout(WAIT, rogue_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, vec![topics::downlink(&gw_c)]);
    obs_pump.abort();

    // Revocation: decommission rewrites the CRL; mosquitto reloads it and refuses gw-b.
    assert!(connect(port, "gw-b-probe", Some(&b), None).await.is_ok());
    drover_cli(&[&["device", "decommission", "gw-b"][..], &srv].concat()).unwrap();
    broker.reload().unwrap();
    wait_until(
        "mosquitto refuses the revoked certificate",
        WAIT,
        || async {
            connect(port, "gw-b-probe2", Some(&b), None)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        connect(port, "gw-a-probe", Some(&a), None).await.is_ok(),
        "{}",
        broker.log()
    );
    assert_eq!(CONTROL_PLANE_IDENTITY, "drover-control-plane");
    server.shutdown().await;
    drop(agent_a);
    drop(agent_b);
}
