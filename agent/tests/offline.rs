//! Offline test: a TCP proxy between agent and broker is cut; the broker publishes the
//! agent's last will; telemetry is spooled on disk; when the link returns every record
//! arrives (duplicates detectable by seq).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use drover_protocol::messages::{
    Action, AgentSettings, Downlink, HelloAck, Phase, Presence, TelemetryBatch, Uplink, UplinkAck,
};
use tokio::net::{TcpListener, TcpStream};

/// A loopback TCP proxy that can be cut (existing connections closed, new ones refused).
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                conns2.lock().unwrap().push(h.abort_handle());
            }
        });
        Proxy { port, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn spool_len(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("spool"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .map(|e| e.file_name().to_string_lossy().ends_with(".frame"))
                    .unwrap_or(false)
            })
            .count()
        })
        .unwrap_or(0)
}

/// Sequence numbers of the records in the spool (`<seq>.frame` files).
fn spooled_seqs(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join("spool"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".frame")?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_is_spooled_while_offline_and_all_arrives_after() {
    let port = start_broker();
    let proxy = Proxy::start(port).await;
    let keys = Arc::new(Keys::new());
    let dev = "gw-offline";
    let cp = ControlPlane::start(port, dev, keys.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = agent_config(dir.path(), dev, proxy.port, &keys);
    cfg.telemetry.interval_ms = 100;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = drover_agent::run(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();

    let telemetry = |s: &Seen| -> Vec<(u64, TelemetryBatch)> {
        s.frames
            .iter()
            .filter_map(|f| match &f.msg {
                Uplink::Telemetry(t) => Some((f.seq, t.clone())),
                _ => None,
            })
            .collect()
    };
    cp.wait_for("telemetry online", |s| {
        (telemetry(s).len() >= 3).then_some(())
    })
    .await;

    proxy.cut();
    let received_at_cut = telemetry(&cp.seen.lock().unwrap()).len();
    // The broker publishes the agent's last will: an authenticated Offline status.
    cp.wait_for("last will", |s| {
        s.frames.iter().find_map(|f| match &f.msg {
            Uplink::Status(st) if st.presence == Presence::Offline => Some(()),
            _ => None,
        })
    })
    .await;
    // Wait until a dozen records are held on disk while offline.
    while spool_len(dir.path()) < 12 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = spooled_seqs(dir.path());
    assert!(held.len() >= 12);
    proxy.restore();

    // Back online: every record held on disk while offline arrives, and the spool drains.
    cp.wait_for("every spooled record", |s| {
        let got: std::collections::BTreeSet<u64> = s.frames.iter().map(|f| f.seq).collect();
        (held.iter().all(|q| got.contains(q)) && spool_len(dir.path()) <= 1).then_some(())
    })
    .await;
    let _ = stop_tx.send(());
    agent.wait().await.unwrap();

    // ...and every window arrived: de-duplicated by seq, the windows tile time with no
    // gap. Duplicates are byte-for-byte the same record.
    let all = telemetry(&cp.seen.lock().unwrap());
    let mut by_seq: BTreeMap<u64, TelemetryBatch> = BTreeMap::new();
    let mut dups = 0;
    for (seq, t) in &all {
        if let Some(prev) = by_seq.insert(*seq, t.clone()) {
            assert_eq!(&prev, t, "seq {seq} reused for a different record");
            dups += 1;
        }
    }
    let windows: Vec<&TelemetryBatch> = by_seq.values().collect();
    for w in windows.windows(2) {
        assert_eq!(
            w[0].window_end_ms, w[1].window_start_ms,
            "a telemetry window is missing"
        );
    }
    assert!(held.iter().all(|q| by_seq.contains_key(q)));
    assert!(windows.len() > received_at_cut.min(3));
    assert!(windows.iter().all(|w| w.spool_dropped == 0));
    eprintln!(
        "{} windows, {} duplicates (detected by seq)",
        windows.len(),
        dups
    );
}

/// `HelloAck.stored_up_to` is the highest sequence the control plane stored, not a
/// gap-free watermark (a frame below it may have died with a control-plane crash). The
/// agent must keep every spooled record until an exact `UplinkAck` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_records_survive_a_hello_ack_and_leave_only_on_exact_acks() {
    let mut h = Harness::start("gw-gap", |_| {}).await;
    h.cp.behaviour.lock().unwrap().ack = false;
    let c = h
        .command(Action::Configure(AgentSettings {
            telemetry_interval_ms: 100,
            sample_rate_ppm: 0,
        }))
        .await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;
    let spool = h.dir.path().join("spool");
    let frames = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".frame"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    h.cp.wait_for("three unacked telemetry records spooled", |_| {
        (frames(&spool).len() >= 3).then_some(())
    })
    .await;
    let before = frames(&spool);

    // A HelloAck claiming everything up to a high sequence is stored, then a command
    // whose completion proves the agent has handled the HelloAck before it.
    h.cp.send(Downlink::HelloAck(HelloAck {
        protocol_version: 1,
        server_time_ms: now_ms(),
        stored_up_to: 1 << 40,
    }))
    .await;
    let c = h
        .command(Action::Configure(AgentSettings {
            telemetry_interval_ms: 60_000,
            sample_rate_ppm: 0,
        }))
        .await;
    h.cp.wait_phase(c.digest(), Phase::Done).await;
    let after = frames(&spool);
    for f in &before {
        assert!(
            after.contains(f),
            "{f} left the spool without an exact ack: {after:?}"
        );
    }

    // Exact acks empty it.
    h.cp.behaviour.lock().unwrap().ack = true;
    h.cp.send(Downlink::UplinkAck(UplinkAck {
        ranges: vec![(0, 1 << 40)],
    }))
    .await;
    h.cp.wait_for("spool emptied by an exact ack", |_| {
        frames(&spool).is_empty().then_some(())
    })
    .await;
    h.stop().await;
}
