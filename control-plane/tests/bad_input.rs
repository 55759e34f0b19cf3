//! Hostile or broken uplink: each frame is refused and counted by reason, the server
//! keeps serving, and no row is written or corrupted.

mod common;

use common::*;
use drover_control_plane::metrics::Refusal;
use drover_protocol::envelope::{seal_uplink, UplinkFrame, MAX_UPLINK_LEN};
use drover_protocol::messages::Uplink;
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_frame_is_refused_by_reason_and_good_frames_still_land() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let (a_id, a_key) = FakeDevice::from_enrollment(&api.enroll("dev-a", &[]).await);
    let (b_id, b_key) = FakeDevice::from_enrollment(&api.enroll("dev-b", &[]).await);
    let (c_id, c_key) = FakeDevice::from_enrollment(&api.enroll("dev-c", &[]).await);
    let mut a = FakeDevice::connect(server.mqtt_addr(), a_id.clone(), a_key.clone()).await;
    let a_tel = topics::uplink(&a_id, UplinkKind::Telemetry);
    let b_tel = topics::uplink(&b_id, UplinkKind::Telemetry);

    // One good frame first.
    a.send(telemetry(0)).await;

    // Garbage payload.
    a.publish_raw(a_tel.clone(), b"\x00\x01 definitely not a frame".to_vec())
        .await;
    // Oversized message (the broker passes it; ingest refuses before decoding).
    a.publish_raw(a_tel.clone(), vec![b'D'; MAX_UPLINK_LEN + 1])
        .await;
    // Bad MAC: a good frame with its tag flipped.
    let mut bad_mac = a.seal(telemetry(1));
    let n = bad_mac.len();
    bad_mac[n - 1] ^= 0xff;
    a.publish_raw(a_tel.clone(), bad_mac).await;
    // Incompatible protocol version in the header.
    let mut future = a.seal(telemetry(2));
    future[2..4].copy_from_slice(&99u16.to_le_bytes());
    a.publish_raw(a_tel.clone(), future).await;
    // Forged device id: A's frame on B's topic fails B's MAC; a frame under B's key that
    // claims to be A is a device mismatch.
    let forged = a.seal(telemetry(3));
    a.publish_raw(b_tel.clone(), forged).await;
    let claims_a = seal_uplink(
        &b_key,
        &UplinkFrame {
            device: a_id.clone(),
            seq: 77,
            sent_at_ms: now_ms(),
            msg: telemetry(4),
        },
    );
    a.publish_raw(b_tel.clone(), claims_a).await;
    // Unenrolled device (a valid-looking frame for an id nobody enrolled).
    let ghost = DeviceId::new("ghost").unwrap();
    let ghost_frame = seal_uplink(
        &DeviceKey([9; 32]),
        &UplinkFrame {
            device: ghost.clone(),
            seq: 1,
            sent_at_ms: now_ms(),
            msg: telemetry(5),
        },
    );
    a.publish_raw(topics::uplink(&ghost, UplinkKind::Telemetry), ghost_frame)
        .await;
    // Decommissioned device: its own valid frame, relayed after revocation.
    let (status, _) = api
        .post("/v1/devices/dev-c/decommission", &serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    let c_frame = seal_uplink(
        &c_key,
        &UplinkFrame {
            device: c_id.clone(),
            seq: 1,
            sent_at_ms: now_ms(),
            msg: telemetry(6),
        },
    );
    a.publish_raw(topics::uplink(&c_id, UplinkKind::Telemetry), c_frame)
        .await;
    // A message on the wrong kind's topic.
    let hello_on_tel = a.seal(hello());
    a.publish_raw(a_tel.clone(), hello_on_tel).await;

    // And a good frame after all of it.
    let last = a.send(telemetry(7)).await;
    a.recv_downlink("ack of the last good frame", |f| match &f.msg {
        drover_protocol::messages::Downlink::UplinkAck(ack) => ack
            .ranges
            .iter()
            .any(|(lo, hi)| *lo <= last && last <= *hi)
            .then_some(()),
        _ => None,
    })
    .await;

    let expect = [
        (Refusal::Garbage, 2),
        (Refusal::TooLarge, 1),
        (Refusal::BadMac, 2),
        (Refusal::Incompatible, 1),
        (Refusal::DeviceMismatch, 1),
        (Refusal::UnknownDevice, 1),
        (Refusal::Decommissioned, 1),
    ];
    eventually("every refusal counted", || async {
        expect
            .iter()
            .all(|(r, n)| server.metrics().refused(*r) == *n)
            .then_some(())
    })
    .await;
    for (r, n) in expect {
        assert_eq!(server.metrics().refused(r), n, "{}", r.as_str());
    }
    let metrics = api.metrics().await;
    assert!(
        metrics.contains("drover_uplink_refused_total{reason=\"bad_mac\"} 2"),
        "{metrics}"
    );

    // Only the two good frames are stored, with their own values; B and C have nothing.
    let rows = api.get("/v1/devices/dev-a/telemetry").await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["inferences"], 107);
    assert_eq!(rows[1]["inferences"], 100);
    for d in ["dev-b", "dev-c"] {
        let rows = api.get(&format!("/v1/devices/{d}/telemetry")).await;
        assert!(rows.as_array().unwrap().is_empty(), "{d}");
    }

    // The broker refuses a decommissioned or unknown device's login.
    assert!(FakeDevice::try_connect(server.mqtt_addr(), c_id, c_key)
        .await
        .is_err());
    assert!(
        FakeDevice::try_connect(server.mqtt_addr(), ghost, DeviceKey([9; 32]))
            .await
            .is_err()
    );
    // A wrong password for an enrolled device too.
    assert!(
        FakeDevice::try_connect(server.mqtt_addr(), b_id, DeviceKey([1; 32]))
            .await
            .is_err()
    );

    // The server still serves.
    let r = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    a.send(Uplink::Telemetry(match telemetry(8) {
        Uplink::Telemetry(t) => t,
        _ => unreachable!(),
    }))
    .await;
    eventually("a later frame is stored", || async {
        (api.get("/v1/devices/dev-a/telemetry")
            .await
            .as_array()
            .unwrap()
            .len()
            == 3)
            .then_some(())
    })
    .await;
    server.shutdown().await;
}
