//! Payload abuse on the uplink against a live `drover serve` process, through the
//! production mutual-TLS front: oversized, truncated, bad-varint, wrong-MAC and replayed
//! frames from an authenticated device, and MQTT packets claiming 100 MB or carrying a
//! malformed length. Each is refused and counted by reason in `/metrics`; replays are
//! stored once; the server stays healthy and keeps storing good frames.

use drover_protocol::envelope::{FrameKind, ENVELOPE_VERSION, MAGIC, MAX_UPLINK_LEN};
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::DeviceKey;
use drover_tests::wait_until;
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// A frame whose MAC is right but whose postcard body starts with an overlong varint.
fn bad_varint_frame(key: &DeviceKey) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    v.push(FrameKind::Uplink as u8);
    v.extend_from_slice(&[0xff; 12]);
    let tag = key.mac(&v);
    v.extend_from_slice(&tag);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_uplink_frames_are_refused_by_reason_and_the_live_server_keeps_storing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), false);
    let api = server.api();
    let dev = Dev::enroll(&api, tmp.path(), "abuse-a").await;
    let (c, mut el) = dev.connect().await;
    let pump = tokio::spawn(async move {
        loop {
            if let Err(e) = el.poll().await {
                eprintln!("device session: {e}");
                return;
            }
        }
    });
    let topic = topics::uplink(&dev.id, UplinkKind::Telemetry);
    let publish = |bytes: Vec<u8>| {
        let (c, topic) = (c.clone(), topic.clone());
        async move {
            c.publish(topic, QoS::AtLeastOnce, false, bytes)
                .await
                .unwrap()
        }
    };

    // A good frame, then the same bytes replayed five times: stored once.
    let first = dev.telemetry(1);
    for _ in 0..6 {
        publish(first.clone()).await;
    }
    // Oversized: a plausible header and 1 MiB + 1 bytes.
    let mut big = dev.telemetry(2);
    big.resize(MAX_UPLINK_LEN + 1, 0);
    publish(big).await;
    // Truncated: shorter than header + MAC (garbage), and cut inside the body or the MAC
    // (the MAC no longer matches).
    let whole = dev.telemetry(3);
    for len in [0, 3, 20] {
        publish(whole[..len].to_vec()).await;
    }
    for len in [whole.len() / 2, whole.len() - 1] {
        publish(whole[..len].to_vec()).await;
    }
    // A right MAC over a body that starts with an overlong varint.
    publish(bad_varint_frame(&dev.key)).await;
    // Wrong MAC: the tag flipped, and a frame sealed with another key.
    let mut flipped = dev.telemetry(4);
    *flipped.last_mut().unwrap() ^= 1;
    publish(flipped).await;
    let forged = drover_protocol::envelope::seal_uplink(
        &DeviceKey([7; 32]),
        &drover_protocol::envelope::UplinkFrame {
            device: dev.id.clone(),
            seq: 5,
            sent_at_ms: 0,
            msg: telemetry(5),
        },
    );
    publish(forged).await;
    // And a good frame after all of it.
    publish(dev.telemetry(6)).await;

    let expect = [("too_large", 1), ("garbage", 4), ("bad_mac", 4)];
    wait_until("every refusal counted", WAIT, || async {
        let mut all = true;
        for (reason, n) in expect {
            let s = format!("drover_uplink_refused_total{{reason=\"{reason}\"}}");
            all &= metric(&api, &s).await == n;
        }
        all.then_some(())
    })
    .await
    .unwrap();
    wait_until(
        "the two good frames stored, the replay once",
        WAIT,
        || async { (stored(&api, "abuse-a").await? == 2).then_some(()) },
    )
    .await
    .unwrap();
    let rows = api.get("/v1/devices/abuse-a/telemetry").await.unwrap();
    let mut seen: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["inferences"].as_u64().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, vec![101, 106], "{rows}");

    // MQTT packets the front must cut off, on authenticated TLS sessions of the same
    // identity (each replaces the one before): a PUBLISH claiming 100 MB, and a remaining length with five continuation
    // bytes. Each connection is closed by the server.
    let protocol_before = metric(&api, "drover_broker_refused_total{reason=\"protocol\"}").await;
    for header in [
        &[0x30u8, 0x80, 0x80, 0x80, 0x32][..],
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ] {
        let mut s = raw_session(&dev).await;
        s.write_all(header).await.unwrap();
        s.write_all(&[0u8; 64]).await.unwrap();
        let closed = tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the front kept a connection after {header:x?}"
        );
    }
    wait_until("the malformed packets counted", WAIT, || async {
        let n = metric(&api, "drover_broker_refused_total{reason=\"protocol\"}").await;
        (n >= protocol_before + 2).then_some(())
    })
    .await
    .unwrap();

    // Still healthy, still storing (on a new session: each raw one replaced the last).
    assert!(healthy(&api).await);
    pump.abort();
    let (c, mut el) = dev.connect().await;
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let topic = topics::uplink(&dev.id, UplinkKind::Telemetry);
    c.publish(topic, QoS::AtLeastOnce, false, dev.telemetry(7))
        .await
        .unwrap();
    wait_until("a frame after the abuse is stored", WAIT, || async {
        (stored(&api, "abuse-a").await? == 3).then_some(())
    })
    .await
    .unwrap();
    pump.abort();
    drop(server);
}

/// A TLS session with `dev`'s certificate on which a valid CONNECT was answered: the
/// raw stream, to write hand-made MQTT packets on.
async fn raw_session(dev: &Dev) -> rumqttc::tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rumqttc::tokio_rustls::rustls::pki_types::ServerName;
    let t = dev.config.tls.as_ref().unwrap();
    let cfg = drover_control_plane::mqtt::tls_config(
        &t.ca_file,
        Some((
            t.client_cert_file.as_ref().unwrap(),
            t.client_key_file.as_ref().unwrap(),
        )),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", dev.broker_port()))
        .await
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = rumqttc::tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    s.write_all(&connect_packet(dev.id.as_str(), &dev.key.mqtt_password()))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
    s
}

/// An MQTT 3.1.1 CONNECT: clean session, username and password, keep-alive 60 s.
fn connect_packet(client_id: &str, password: &str) -> Vec<u8> {
    let field = |v: &mut Vec<u8>, s: &str| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xc2, 0, 60]);
    field(&mut body, client_id);
    field(&mut body, client_id);
    field(&mut body, password);
    let mut p = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend(body);
    p
}
