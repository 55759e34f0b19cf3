//! The same flow with an external broker: a real mosquitto started on a free loopback
//! port; the control plane is then only an MQTT client (`--broker-url`). Needs the
//! Debian `mosquitto` package; with `DROVER_REQUIRE_PEERS=1` (set by `.ci/test`) a
//! missing mosquitto fails the test instead of skipping it.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use drover_control_plane::serve;
use drover_protocol::messages::{Action, Downlink};
use drover_protocol::trust::TrustStore;

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn start_mosquitto(dir: &Path) -> Option<Mosquitto> {
    start_mosquitto_with(dir, "")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_mosquitto_with(dir: &Path, extra: &str) -> Option<Mosquitto> {
    let Some(bin) = mosquitto_bin() else {
        assert!(
            std::env::var_os("DROVER_REQUIRE_PEERS").is_none(),
            "mosquitto is required (DROVER_REQUIRE_PEERS is set): apt-get install mosquitto"
        );
        eprintln!("SKIPPED: mosquitto not installed (set DROVER_REQUIRE_PEERS=1 to fail instead)");
        return None;
    };
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("user root\nper_listener_settings false\nallow_anonymous true\npersistence false\nlistener {port} 127.0.0.1\n{extra}"),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
        .spawn()
        .unwrap();
    let m = Mosquitto { child, port };
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(m);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("mosquitto did not listen on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mosquitto_carries_hello_telemetry_deploy_and_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = start_mosquitto(dir.path()) else {
        return;
    };
    let mut cfg = config(&dir.path().join("data"));
    cfg.broker_url = format!("mqtt://drover-cp:unused@127.0.0.1:{}", broker.port);
    let server = serve::run(cfg.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(server.mqtt_addr().port(), broker.port);
    let api = Api::new(&server);
    let root = server.root_public_key();
    let e1 = api.enroll("m-01", &[]).await;
    assert_eq!(
        e1.broker_url,
        format!("mqtt://127.0.0.1:{}", broker.port),
        "enrolled agents are pointed at the external broker"
    );
    let e2 = api.enroll("m-02", &[]).await;
    let (id1, key1) = FakeDevice::from_enrollment(&e1);
    let (id2, key2) = FakeDevice::from_enrollment(&e2);
    let mut d1 = FakeDevice::connect(server.mqtt_addr(), id1.clone(), key1).await;
    let mut d2 = FakeDevice::connect(server.mqtt_addr(), id2, key2).await;
    d1.send(hello()).await;
    d2.send(hello()).await;
    let keyring = d1
        .recv_downlink("keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(root).unwrap();
    trust.accept_keyring(&keyring, now_ms()).unwrap();
    let last = d1.send(telemetry(1)).await;
    d1.recv_downlink("ack", |f| match &f.msg {
        Downlink::UplinkAck(a) => a
            .ranges
            .iter()
            .any(|(lo, hi)| *lo <= last && last <= *hi)
            .then_some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        api.get("/v1/devices/m-01/telemetry")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    eventually("both online", || async {
        let list = api.get("/v1/devices?online=true").await;
        (list.as_array().unwrap().len() == 2).then_some(())
    })
    .await;

    let model = dense_model(8, 2, 3, "MatMul");
    let (status, _) = api
        .post(
            "/v1/models",
            &serde_json::json!({"name": "m", "version": "0.1.0", "model_hex": hex::encode(&model), "format": "onnx"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = api
        .post(
            "/v1/devices/m-01/deploy",
            &serde_json::json!({"model": "m@0.1.0"}),
        )
        .await;
    assert_eq!(status, 200);
    let cmd = d1
        .recv_downlink("command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let cmd = trust.verify_command(&cmd, &id1, 0, now_ms()).unwrap();
    assert!(matches!(cmd.action, Action::Deploy { .. }));

    d2.crash();
    eventually("m-02 offline via mosquitto's last will", || async {
        (api.device("m-02").await["online"] == false).then_some(())
    })
    .await;
    server.shutdown().await;
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed to make test certificates");
    assert!(st.success(), "openssl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_reaches_an_mqtts_broker_with_a_pinned_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=drover-test-ca",
            ][..],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req"][..],
            &ec[..],
            &[
                "-keyout",
                "srv.key",
                "-out",
                "srv.csr",
                "-subj",
                "/CN=127.0.0.1",
            ][..],
        ]
        .concat(),
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/srv.pem\nkeyfile {0}/srv.key\n",
        d.display()
    );
    let Some(broker) = start_mosquitto_with(d, &extra) else {
        return;
    };
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut cfg = config(&d.join("data"));
    cfg.broker_url = format!("mqtts://127.0.0.1:{tls_port}");
    cfg.broker_ca_file = d.join("ca.pem").display().to_string();
    cfg.advertised_broker_url = format!("mqtt://127.0.0.1:{}", broker.port);
    let server = serve::run(cfg.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let api = Api::new(&server);
    let e = api.enroll("tls-01", &[]).await;
    assert_eq!(e.broker_url, format!("mqtt://127.0.0.1:{}", broker.port));
    // The device uses the plain listener; the control plane speaks TLS to the broker.
    let (id, key) = FakeDevice::from_enrollment(&e);
    let plain: std::net::SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let mut dev = FakeDevice::connect(plain, id, key).await;
    dev.send(hello()).await;
    let ack = dev
        .recv_downlink(
            "HelloAck over the TLS-connected control plane",
            |f| match &f.msg {
                Downlink::HelloAck(a) => Some(a.clone()),
                _ => None,
            },
        )
        .await;
    assert_eq!(ack.protocol_version, 1);
    server.shutdown().await;

    // Without a CA file, an mqtts:// URL trusts the fleet CA (`drover broker config`).
    let mut fleet = config(&d.join("data2"));
    fleet.broker_url = format!("mqtts://127.0.0.1:{tls_port}");
    assert!(fleet.validate().is_ok());
}
