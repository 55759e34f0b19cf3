//! Chunk amplification (issue 24, fault 5), end to end against an in-process `drover
//! serve` with scripted devices: chunk requests are served only for a model the device
//! was commanded to fetch, and one device's flood is held to its byte budget.

mod common;

use std::sync::atomic::Ordering::Relaxed;

use common::*;
use drover_control_plane::chunks::{DEVICE_BUDGET_BYTES, DEVICE_BUDGET_WINDOW_MS};
use drover_control_plane::serve::{self, ServeHandle};
use drover_host::clock::{Clock as _, ManualClock, SharedClock};
use drover_protocol::envelope::decode_chunk;
use drover_protocol::messages::{ChunkRequest, Downlink, Uplink};
use drover_protocol::topics::{self, parse_hex32};

/// Publishes a dense model of `features × classes` weights as `name@1.0.0`; returns its
/// manifest digest and chunk count.
async fn publish(
    api: &Api,
    name: &str,
    features: u64,
    classes: u64,
    chunk_size: u32,
) -> ([u8; 32], u32) {
    let model = dense_model(features, classes, 3, "MatMul");
    let (status, published) = api
        .post(
            "/v1/models",
            &serde_json::json!({
                "name": name,
                "version": "1.0.0",
                "model_hex": hex::encode(&model),
                "format": "onnx", // scripted protocol-1 devices load ONNX only
                "chunk_size": chunk_size,
            }),
        )
        .await;
    assert_eq!(status, 201, "{published}");
    let digest = parse_hex32(published["digest"].as_str().unwrap()).unwrap();
    (digest, model.len().div_ceil(chunk_size as usize) as u32)
}

/// An enrolled, connected device that has said hello (so its requests follow its
/// subscriptions through the broker).
async fn device(server: &ServeHandle, api: &Api, id: &str) -> FakeDevice {
    let e = api.enroll(id, &[]).await;
    let (id, key) = FakeDevice::from_enrollment(&e);
    let mut d = FakeDevice::connect(server.mqtt_addr(), id, key).await;
    d.send(hello()).await;
    d.recv_downlink("HelloAck", |f| {
        matches!(f.msg, Downlink::HelloAck(_)).then_some(())
    })
    .await;
    d
}

fn request(digest: [u8; 32], chunks: u32) -> Uplink {
    Uplink::ChunkRequest(ChunkRequest {
        manifest_digest: digest,
        indices: (0..chunks).collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_requests_for_a_model_never_commanded_publish_nothing_and_a_commanded_device_downloads(
) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let (digest, chunks) = publish(&api, "dense", 64, 16, 1024).await;
    assert!(chunks >= 4, "{chunks} chunks");

    // A device never commanded to fetch the model asks for all of it, ten times.
    let mut stranger = device(&server, &api, "gw-stranger").await;
    stranger.subscribe(topics::model_chunks(&digest)).await;
    for _ in 0..10 {
        stranger.send(request(digest, chunks)).await;
    }
    let m = server.metrics();
    eventually("ten refusals counted", || async {
        (m.chunk_refused_not_commanded.load(Relaxed) == 10).then_some(())
    })
    .await;
    assert_eq!(m.chunk_publishes.load(Relaxed), 0, "nothing was published");
    let text = api.metrics().await;
    assert!(
        text.contains("drover_chunk_requests_refused_total{reason=\"not_commanded\"} 10"),
        "{text}"
    );

    // A device commanded to fetch it downloads every chunk.
    let mut fetcher = device(&server, &api, "gw-fetcher").await;
    fetcher.subscribe(topics::model_chunks(&digest)).await;
    let (status, r) = api
        .post(
            "/v1/devices/gw-fetcher/deploy",
            &serde_json::json!({"model": "dense@1.0.0"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    fetcher.send(request(digest, chunks)).await;
    let mut got = vec![false; chunks as usize];
    while got.iter().any(|g| !g) {
        let (topic, bytes) =
            tokio::time::timeout(std::time::Duration::from_secs(60), fetcher.other.recv())
                .await
                .expect("chunks never arrived")
                .unwrap();
        if topic == topics::model_chunks(&digest) {
            got[decode_chunk(&bytes).unwrap().index as usize] = true;
        }
    }
    // The stranger is still refused (its asking again changes nothing).
    stranger.send(request(digest, chunks)).await;
    eventually("the eleventh refusal", || async {
        (m.chunk_refused_not_commanded.load(Relaxed) == 11).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_flooding_chunk_requests_is_held_to_its_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    // Every request is published at once: no coalescing hides a repeated request.
    cfg.chunk_window_ms = 1;
    // The budget refills with the server's clock. A clock the test moves (1 ms per poll)
    // keeps the refill during the flood small however slowly a loaded machine runs it, so
    // the flood always outruns the budget.
    let clock = ManualClock::new(drover_host::clock::now_ms());
    let shared: SharedClock = std::sync::Arc::new(clock.clone());
    let server = serve::run_with_clock(cfg.validate().unwrap(), shared, std::future::pending())
        .await
        .unwrap();
    let api = Api::new(&server);
    let chunk_size = 64 * 1024;
    // 2 MiB of weights: the flood below asks for the whole model 100 times.
    let (digest, chunks) = publish(&api, "big", 1024, 512, chunk_size).await;
    let (other, _) = publish(&api, "other", 8, 2, 1024).await;
    let mut flooder = device(&server, &api, "gw-flood").await;
    let (status, r) = api
        .post(
            "/v1/devices/gw-flood/deploy",
            &serde_json::json!({"model": "big@1.0.0"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");

    // Repeats of a request whose chunks were published since are held: they publish
    // nothing and cost no budget.
    let m = server.metrics();
    for _ in 0..10 {
        let (published, held) = (
            m.chunk_publishes.load(Relaxed),
            m.chunk_asks_held.load(Relaxed),
        );
        flooder.send(request(digest, chunks)).await;
        eventually("the request published or held", || async {
            clock.advance(1);
            (m.chunk_publishes.load(Relaxed) >= published + u64::from(chunks)
                || m.chunk_asks_held.load(Relaxed) >= held + u64::from(chunks))
            .then_some(())
        })
        .await;
    }
    assert_eq!(m.chunk_publishes.load(Relaxed), u64::from(chunks));
    assert_eq!(m.chunk_asks_held.load(Relaxed), 9 * u64::from(chunks));
    assert_eq!(m.chunk_refused_rate_limited.load(Relaxed), 0);

    // A device saying hello before every request (as if it reconnected each time) makes
    // every ask a need again, each charged to its budget when admitted: 100 requests for
    // the whole model (200 MiB) against a 64 MiB budget. The clock stands still during
    // the flood, so nothing refills.
    let started = clock.unix_ms();
    for _ in 0..100 {
        flooder.send(hello()).await;
        flooder.send(request(digest, chunks)).await;
    }
    // The device's frames arrive in order: once its request for a model it was never
    // commanded is refused, the whole flood has been through the chunk server.
    flooder.send(request(other, 1)).await;
    eventually("the flood was handled", || async {
        (m.chunk_refused_not_commanded.load(Relaxed) == 1).then_some(())
    })
    .await;
    let elapsed_ms = clock.unix_ms() - started;
    let publishes = m.chunk_publishes.load(Relaxed);
    // The budget: its capacity plus what refilled while the flood lasted.
    let budget_bytes =
        DEVICE_BUDGET_BYTES + DEVICE_BUDGET_BYTES * elapsed_ms / DEVICE_BUDGET_WINDOW_MS;
    let max_publishes = budget_bytes / u64::from(chunk_size);
    assert!(
        publishes <= max_publishes,
        "{publishes} chunk publishes for one device in {elapsed_ms} ms of its clock; its budget allows {max_publishes}"
    );
    assert!(m.chunk_refused_rate_limited.load(Relaxed) > 0);
    server.shutdown().await;
}
