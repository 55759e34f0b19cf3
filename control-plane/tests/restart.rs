//! Stop and restart `drover serve` on the same data directory: devices, keys, models,
//! command sequences and telemetry survive, and sequences continue.

mod common;

use common::*;
use drover_protocol::messages::Downlink;
use drover_protocol::trust::TrustStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_data_dir_loses_nothing_and_sequences_continue() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let root = server.root_public_key();
    let token = server.api_token().to_owned();
    let e = api.enroll("gw-r", &[("site", "lab")]).await;
    let (id, key) = FakeDevice::from_enrollment(&e);
    let mut dev = FakeDevice::connect(server.mqtt_addr(), id.clone(), key.clone()).await;
    dev.send(hello()).await;
    let mut last = 0;
    for n in 0..3 {
        last = dev.send(telemetry(n)).await;
    }
    dev.recv_downlink("ack", |f| match &f.msg {
        Downlink::UplinkAck(a) => a.ranges.iter().any(|(_, hi)| *hi >= last).then_some(()),
        _ => None,
    })
    .await;
    let model = dense_model(8, 3, 5, "MatMul");
    let (status, _) = api
        .post(
            "/v1/models",
            &serde_json::json!({"name": "m", "version": "1.0.0", "model_hex": hex::encode(&model), "format": "onnx"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, r) = api
        .post(
            "/v1/devices/gw-r/deploy",
            &serde_json::json!({"model": "m@1.0.0"}),
        )
        .await;
    assert_eq!((status, r["seq"].as_u64()), (200, Some(1)));
    dev.disconnect().await;
    server.shutdown().await;

    // Second life on the same directory (a new broker port: rumqttd cannot be stopped).
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    assert_eq!(server.root_public_key(), root, "keys persisted");
    assert_eq!(server.api_token(), token, "token persisted");
    let d = api.device("gw-r").await;
    assert_eq!(d["labels"]["site"], "lab");
    assert_eq!(
        d["online"], false,
        "presence is unknown until the device says hello"
    );
    assert_eq!(d["arch"], "x86_64");
    let rows = api.get("/v1/devices/gw-r/telemetry").await;
    assert_eq!(rows.as_array().unwrap().len(), 3);
    let models = api.get("/v1/models").await;
    assert_eq!(models.as_array().unwrap().len(), 1);

    // The device key still works with the new broker; the hello ack reports what is stored.
    let mut dev = FakeDevice::connect(server.mqtt_addr(), id.clone(), key).await;
    dev.seq = last;
    dev.send(hello()).await;
    let ack = dev
        .recv_downlink("HelloAck", |f| match &f.msg {
            Downlink::HelloAck(a) => Some(a.clone()),
            _ => None,
        })
        .await;
    assert!(ack.stored_up_to >= last);
    let keyring = dev
        .recv_downlink("keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    // The unaccepted command (hello says last_command_seq 0) is re-sent after hello.
    let resent = dev
        .recv_downlink("re-sent command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(root).unwrap();
    trust.accept_keyring(&keyring, now_ms()).unwrap();
    assert_eq!(
        trust.verify_command(&resent, &id, 0, now_ms()).unwrap().seq,
        1
    );

    // Resent telemetry is de-duplicated; new sequences continue.
    let (status, r) = api
        .post(
            "/v1/devices/gw-r/deploy",
            &serde_json::json!({"model": "m@1.0.0"}),
        )
        .await;
    assert_eq!((status, r["seq"].as_u64()), (200, Some(2)));
    let cmd = dev
        .recv_downlink("command 2", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(trust.verify_command(&cmd, &id, 1, now_ms()).unwrap().seq, 2);
    let dup = {
        dev.seq = last - 1;
        dev.send(telemetry(2)).await
    };
    assert_eq!(dup, last);
    dev.seq = 100;
    let newest = dev.send(telemetry(9)).await;
    dev.recv_downlink("ack of the new frame", |f| match &f.msg {
        Downlink::UplinkAck(a) => a
            .ranges
            .iter()
            .any(|(lo, hi)| *lo <= newest && newest <= *hi)
            .then_some(()),
        _ => None,
    })
    .await;
    eventually("duplicate counted, new row stored", || async {
        (server
            .metrics()
            .uplink_duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1)
            .then_some(())
    })
    .await;
    let rows = api.get("/v1/devices/gw-r/telemetry").await;
    assert_eq!(rows.as_array().unwrap().len(), 4);
    server.shutdown().await;
}
