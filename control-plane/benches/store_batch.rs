//! Ingest's SQLite stage alone: `Store::apply_batch` fed the telemetry frames of N enrolled
//! devices, interleaved as a fleet sends them (every device's first frame, then every
//! device's second, ...), in batches of the ingest thread's size. No broker, no MAC check:
//! what is left is what the ingest thread does under its lock, so the rate is the ceiling
//! the store puts on ingest at that fleet size. Fleet sizes run side by side in one run.
//!
//! cargo bench -p drover-control-plane --bench store_batch -- [--devices 1000,10000]
//!     [--messages M] [--batch B] [--history H]
//!
//! `--batch` defaults to the server's `[ingest] batch_max` default. `--history H` first
//! stores H hours of past reporting (one window per device and hour, untimed), so the
//! timed frames land in a store that has run for a while: every device then has rows of
//! its own in every per-device table, as on a server after days, not a fresh file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drover_control_plane::config::IngestConfig;
use drover_control_plane::store::{Inbound, Store};
use drover_protocol::envelope::UplinkFrame;
use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch, Uplink};
use drover_protocol::{DeviceId, DeviceKey};

struct Args {
    devices: Vec<usize>,
    messages: usize,
    batch: usize,
    history: u64,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    // Without `--bench` (`cargo test --all-targets` runs bench targets too): a smoke run.
    if !argv.iter().any(|a| a == "--bench") {
        return Args {
            devices: vec![20],
            messages: 3,
            batch: 16,
            history: 2,
        };
    }
    let value = |name: &str| argv.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let number = |name: &str, default: usize| {
        value(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
        })
    };
    let devices = value("--devices").map_or(vec![1000, 10_000], |v| {
        v.split(',')
            .map(|n| {
                n.trim().parse().unwrap_or_else(|_| {
                    panic!("--devices takes numbers like 1000,10000, not {v:?}")
                })
            })
            .collect()
    });
    Args {
        devices,
        messages: number("--messages", 20),
        batch: number("--batch", IngestConfig::default().batch_max).max(1),
        history: number("--history", 0) as u64,
    }
}

const HOUR_MS: u64 = 3_600_000;

/// Telemetry frame `seq` of a device, its window starting at `start_ms`.
fn frame(device: &DeviceId, seq: u64, start_ms: u64) -> Inbound {
    let mut latency = LatencyHistogram::new();
    latency.counts[4] = 50;
    Inbound {
        frame: UplinkFrame {
            device: device.clone(),
            seq,
            sent_at_ms: start_ms + 10_000,
            msg: Uplink::Telemetry(TelemetryBatch {
                window_start_ms: start_ms,
                window_end_ms: start_ms + 9_999,
                model: None,
                inferences: 50,
                errors: 0,
                data_quality_errors: 0,
                latency,
                outputs: vec![25, 25],
                system: SystemFacts::default(),
                spool_dropped: 0,
            }),
        },
        received_at_ms: start_ms + 10_000,
    }
}

struct Run {
    stored: u64,
    took: Duration,
    batches: Vec<Duration>,
    db_bytes: u64,
}

fn run(devices: usize, messages: usize, batch: usize, history: u64) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("drover.db");
    let mut store = Store::open(&path).expect("open store");
    let ids: Vec<DeviceId> = (0..devices)
        .map(|n| DeviceId::new(format!("dev-{n:06}")).expect("device id"))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let labels = BTreeMap::from([("site".to_owned(), format!("site-{}", n % 50))]);
        store
            .enroll_device(id, &DeviceKey([7; 32]), &labels, 1)
            .expect("enroll");
    }
    // The past: one window per device and hour, stored as the server would (untimed).
    let past: Vec<Inbound> = (0..history)
        .flat_map(|h| ids.iter().map(move |id| frame(id, h + 1, h * HOUR_MS)))
        .collect();
    for chunk in past.chunks(batch) {
        store.apply_batch(chunk).expect("apply history batch");
    }
    let now_ms = history * HOUR_MS;
    let frames: Vec<Inbound> = (1..=messages as u64)
        .flat_map(|k| {
            ids.iter()
                .map(move |id| frame(id, history + k, now_ms + k * 10_000))
        })
        .collect();
    let mut stored = 0;
    let mut batches = Vec::new();
    let started = Instant::now();
    for chunk in frames.chunks(batch) {
        let t = Instant::now();
        let outcome = store.apply_batch(chunk).expect("apply batch");
        batches.push(t.elapsed());
        stored += outcome.new_rows;
    }
    let took = started.elapsed();
    drop(store);
    let db_bytes = ["drover.db", "drover.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum();
    Run {
        stored,
        took,
        batches,
        db_bytes,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let a = args();
    println!(
        "| devices | history h | frames | batch | stored | took s | frames/s | batch ms median | batch ms max | db + wal MB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &n in &a.devices {
        let r = run(n, a.messages, a.batch, a.history);
        let frames = (n * a.messages) as u64;
        assert_eq!(
            r.stored, frames,
            "every frame is new, so every frame is stored"
        );
        let mut sorted = r.batches.clone();
        sorted.sort();
        println!(
            "| {n} | {} | {frames} | {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} |",
            a.history,
            a.batch,
            r.stored,
            r.took.as_secs_f64(),
            r.stored as f64 / r.took.as_secs_f64(),
            ms(sorted[sorted.len() / 2]),
            ms(*sorted.last().expect("one batch at least")),
            r.db_bytes as f64 / 1e6,
        );
    }
}
