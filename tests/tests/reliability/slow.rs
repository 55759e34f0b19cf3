//! Slow and silent connections: 200 TCP connections to the mutual-TLS front that never
//! speak or drip a TLS record a byte at a time, held open while a real device connects,
//! sends a telemetry frame and receives the control plane's acknowledgement. The outcome
//! is asserted (connected, acknowledged, stored), not how long it took.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::envelope::open_downlink;
use drover_protocol::messages::Downlink;
use drover_protocol::topics::{self, UplinkKind};
use drover_tests::wait_until;
use rumqttc::{Event, Packet, QoS};
use tokio::io::AsyncWriteExt;

use crate::common::*;

const SILENT: usize = 100;
const DRIPPING: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connects_and_is_acknowledged_while_hundreds_of_connections_stall_the_front() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), false);
    let api = server.api();
    let dev = Dev::enroll(&api, tmp.path(), "slow-a").await;
    let port = dev.broker_port();

    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    // A TLS handshake record header and then a byte every 200 ms: never complete.
    let open = Arc::new(AtomicUsize::new(0));
    let mut drips = Vec::new();
    for _ in 0..DRIPPING {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let open = open.clone();
        drips.push(tokio::spawn(async move {
            open.fetch_add(1, Relaxed);
            let mut bytes = [0x16u8, 0x03, 0x01, 0x3f, 0xff]
                .into_iter()
                .chain(std::iter::repeat(0x01));
            loop {
                let b = bytes.next().unwrap_or(0);
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            open.fetch_sub(1, Relaxed);
        }));
    }
    wait_until("every dripping connection started", WAIT, || async {
        (open.load(Relaxed) == DRIPPING).then_some(())
    })
    .await
    .unwrap();

    // The real device: connect, subscribe to its downlink, send, get the ack.
    let (c, mut el) = dev.connect().await;
    c.subscribe(topics::downlink(&dev.id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let topic = topics::uplink(&dev.id, UplinkKind::Telemetry);
    c.publish(topic, QoS::AtLeastOnce, false, dev.telemetry(1))
        .await
        .unwrap();
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                if let Ok(f) = open_downlink(&p.payload, &dev.id, &dev.key) {
                    if let Downlink::UplinkAck(a) = f.msg {
                        if a.ranges.iter().any(|(lo, hi)| *lo <= 1 && 1 <= *hi) {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "the device's frame was never acknowledged");
    assert_eq!(stored(&api, "slow-a").await, Some(1));
    eprintln!(
        "{} of {DRIPPING} dripping connections still open after the exchange",
        open.load(Relaxed)
    );
    assert!(healthy(&api).await);
    for d in drips {
        d.abort();
    }
    drop(silent);
    drop(server);
}
