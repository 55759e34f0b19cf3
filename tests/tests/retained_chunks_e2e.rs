//! Retained chunks on the embedded broker (issue 23): a rolled-out model reaches every
//! device from the broker's retained copy, with no chunk request, and the control plane
//! publishes it once whatever the number of devices; `chunk_retain` after the last deploy
//! command it is cleared from the broker.
//!
//! Devices: the fleet simulator (the agent's own deployment machine) on rumqttd behind
//! the control plane. A plain MQTT client (rumqttc, as a device identity) checks what the
//! broker holds. The server runs on a clock the test can move forward (the retention
//! period is an hour).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_host::clock::{now_ms, Clock};
use drover_protocol::envelope::decode_chunk;
use drover_protocol::topics::{self, parse_hex32};
use drover_tests::fleet::Api;
use drover_tests::serve_process::{metrics, prom_counter};
use drover_tests::sim::{self, scenario, Fleet, Group, Identity, SimConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const DEVICES: usize = 40;
const WAIT: Duration = Duration::from_secs(240);

/// The wall clock plus an offset the test sets.
#[derive(Debug, Default)]
struct Shifted(AtomicU64);

impl Clock for Shifted {
    fn unix_ms(&self) -> u64 {
        now_ms() + self.0.load(SeqCst)
    }
}

/// What a fresh subscriber to the model's retained chunk topics gets within `wait`:
/// chunk index → data length.
async fn retained_chunks(
    who: &Identity,
    digest: &[u8; 32],
    wait: Duration,
) -> BTreeMap<u32, usize> {
    let mut o = MqttOptions::new(who.id.as_str(), who.broker_host.clone(), who.broker_port);
    o.set_credentials(who.id.as_str(), who.key.mqtt_password());
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut events) = AsyncClient::new(o, 64);
    client
        .subscribe(topics::model_chunk_filter(digest), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = BTreeMap::new();
    let _ = tokio::time::timeout(wait, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let c = decode_chunk(&p.payload).expect("a retained chunk frame");
                    assert_eq!(c.manifest_digest, *digest);
                    assert_eq!(p.topic, topics::model_chunk(digest, c.index));
                    got.insert(c.index, c.data.len());
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_delivered_from_the_brokers_retained_copy_then_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("server");
    let config = ServeConfig {
        data_dir: data_dir.clone(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        // Simulated devices log in with passwords, not client certificates.
        allow_plaintext: true,
        rollout_tick_ms: 250,
        ..Default::default()
    };
    let shift = Arc::new(Shifted::default());
    let server = serve::run_with_clock(
        config.validate().unwrap(),
        shift.clone(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let url = format!("http://{}", server.http_addr());
    let api = Api::new(url.clone(), server.api_token());

    let cfg = SimConfig {
        devices: DEVICES,
        prefix: "rc".into(),
        groups: vec![Group::parse("site=plant-a:1:0:1500").unwrap()],
        inference_rate: 20.0,
        telemetry_interval: Duration::from_millis(500),
        ..SimConfig::default()
    };
    let ids = sim::enroll(&api, &cfg, 16).await.unwrap();
    // The test's own client: a device outside the rollout's selector.
    let observer = sim::enroll(
        &api,
        &SimConfig {
            devices: 1,
            prefix: "observer".into(),
            groups: vec![Group::parse("site=lab:1:0:1500").unwrap()],
            ..SimConfig::default()
        },
        1,
    )
    .await
    .unwrap()
    .pop()
    .unwrap();
    let fleet = Fleet::start(cfg, ids, WAIT).await.unwrap();

    let onnx = sim::onnx_model_of_size(256 * 1024, 1);
    let published = scenario::publish_model(&api, "sim", "1.0.0", &onnx, None)
        .await
        .unwrap();
    let digest = parse_hex32(published["digest"].as_str().unwrap()).unwrap();
    let size = published["size"].as_u64().unwrap();
    let chunks = published["summary"]["chunks"].as_u64().unwrap();
    assert!(chunks >= 4, "{published:#}");

    let mut plan = scenario::plan("sim@1.0.0", &[25.0, 100.0], Duration::from_secs(1), 20);
    plan["selector"] = "site=plant-a".into();
    let id = scenario::start_rollout(&api, &plan).await.unwrap();
    let run = scenario::follow(&api, id, WAIT).await.unwrap();
    assert_eq!(run.status, "completed", "{:#}", run.last);
    drover_tests::wait_until(
        "the control plane sees every device on sim@1.0.0",
        WAIT,
        || async {
            let models = api.active_models().await.ok()?;
            let on = models
                .values()
                .filter(|m| m.as_deref() == Some("sim@1.0.0"))
                .count();
            (on == DEVICES).then_some(())
        },
    )
    .await
    .unwrap();

    // Nobody asked, and the control plane published the model once for the whole fleet.
    let page = metrics(&url).await.unwrap();
    let counter = |name| prom_counter(&page, name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(counter("drover_chunk_requests_total"), 0, "{page}");
    assert_eq!(counter("drover_chunk_retained_publishes_total"), chunks);
    assert_eq!(counter("drover_chunk_publishes_total"), chunks);
    let egress = counter("drover_chunk_egress_bytes_total");
    assert!(
        egress >= size && egress < size + chunks * 1024,
        "egress {egress} for a {size}-byte model"
    );

    // The broker holds the whole model for any device that subscribes now.
    let held = retained_chunks(&observer, &digest, Duration::from_secs(10)).await;
    assert_eq!(held.len() as u64, chunks, "{held:?}");
    assert_eq!(held.values().sum::<usize>() as u64, size);

    // An hour after the last deploy command the retained copy is cleared.
    shift.0.store(61 * 60 * 1000, SeqCst);
    let record = data_dir.join("retained-chunks.json");
    drover_tests::wait_until("the retained record is empty", WAIT, || async {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        v.as_object().is_some_and(|m| m.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let left = retained_chunks(&observer, &digest, Duration::from_secs(3)).await;
    assert!(left.is_empty(), "still retained: {left:?}");

    fleet.stop().await;
    server.shutdown().await;
}
