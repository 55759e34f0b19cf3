//! Host facts a device cannot read (its /proc hidden by systemd's `ProcSubset=pid`) come
//! out of the API as `null`, never as 0: a window with them unknown next to one with them
//! known.

mod common;

use common::*;
use drover_protocol::messages::{SystemFacts, Uplink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cpu_and_memory_are_null_in_the_api_never_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let api = Api::new(&server);
    let (id, key) = FakeDevice::from_enrollment(&api.enroll("gw-hidden", &[]).await);
    let mut dev = FakeDevice::connect(server.mqtt_addr(), id, key).await;
    dev.send(telemetry(1)).await;
    let Uplink::Telemetry(mut hidden) = telemetry(2) else {
        unreachable!()
    };
    hidden.system = SystemFacts {
        cpu_percent: SystemFacts::CPU_UNKNOWN,
        agent_rss_bytes: 9 << 20,
        ..Default::default()
    };
    dev.send(Uplink::Telemetry(hidden)).await;
    let rows = eventually("both windows stored", || async {
        let v = api.get("/v1/devices/gw-hidden/telemetry").await;
        (v.as_array().map_or(0, Vec::len) == 2).then_some(v)
    })
    .await;
    // Newest first: the hidden window, then the visible one.
    assert!(rows[0]["cpu_percent"].is_null(), "{rows:#}");
    assert!(rows[0]["mem_used_bytes"].is_null(), "{rows:#}");
    assert_eq!(rows[1]["cpu_percent"], 12.5);
    assert_eq!(rows[1]["mem_used_bytes"], 1 << 20);
}
