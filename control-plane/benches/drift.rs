//! Drift scoring and gate cost: one window of sketches from N devices (F features, 10
//! bins) read from SQLite, merged per device, per site and fleet-wide, scored (PSI and
//! chi-square) and stored; and the evaluation gate scoring a model with tract on held-out
//! rows.
//!
//! cargo bench -p drover-control-plane --bench drift -- [--devices N] [--features F]
//!     [--rows R]

use std::collections::BTreeMap;
use std::time::Instant;

use drover_control_plane::continuous::{evaluate, Engine};
use drover_control_plane::jobs::Row;
use drover_control_plane::registry::{self, PublishRequest};
use drover_control_plane::store::{Db, Inbound, Store};
use drover_control_plane::trainer::{self, TrainParams};
use drover_protocol::envelope::UplinkFrame;
use drover_protocol::messages::{DriftReport, FeatureSketch, ModelRef, Uplink};
use drover_protocol::{DeviceId, DeviceKey};

fn arg(name: &str, default: usize, smoke: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    if !argv.iter().any(|a| a == "--bench") {
        return smoke;
    }
    argv.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let devices = arg("--devices", 10_000, 20);
    let features = arg("--features", 10, 3);
    let rows = arg("--rows", 100_000, 100);
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("server");
    std::fs::create_dir_all(data.join("models"))?;
    let keys = drover_control_plane::keys::init(&data, &tmp.path().join("root.key"), 1, 365)?;
    let mut store = Store::open(&data.join("drover.db"))?;

    // A model with an F-feature baseline.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut unif = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f32 / (1u64 << 53) as f32
    };
    let train: Vec<Vec<f32>> = (0..2000)
        .map(|_| (0..features).map(|_| unif()).collect())
        .collect();
    let labels: Vec<u32> = train.iter().map(|r| u32::from(r[0] > 0.5)).collect();
    let model = trainer::train(
        &trainer::Dataset {
            features: train.clone(),
            labels: labels.clone(),
        },
        &TrainParams::default(),
    )?;
    let header: Vec<String> = (0..features).map(|i| format!("f{i}")).collect();
    let mut csv = header.join(",") + "\n";
    for r in &train {
        csv += &(r.iter().map(f32::to_string).collect::<Vec<_>>().join(",") + "\n");
    }
    let onnx = model.to_onnx();
    let row = registry::publish(
        &mut store,
        &data.join("models"),
        &PublishRequest {
            name: "bench".into(),
            version: "1.0.0".into(),
            model: onnx.clone(),
            baseline_csv: Some(csv),
            ..Default::default()
        },
        &keys.signing,
        1,
    )?;

    // One window: a sketch per device, devices spread over 20 sites.
    let mut batch = Vec::with_capacity(devices);
    for d in 0..devices {
        let id = DeviceId::new(format!("dev-{d:05}"))?;
        let site = BTreeMap::from([("site".to_string(), format!("s{}", d % 20))]);
        store.enroll_device(&id, &DeviceKey([1; 32]), &site, 1)?;
        let sketch = FeatureSketch {
            counts: (0..10).map(|_| (unif() * 50.0) as u64).collect(),
            missing: 0,
            out_of_range: 0,
        };
        batch.push(Inbound {
            frame: UplinkFrame {
                device: id,
                seq: 1,
                sent_at_ms: 1_000,
                msg: Uplink::Drift(DriftReport {
                    model: ModelRef {
                        name: row.name.clone(),
                        version: row.version.clone(),
                        digest: row.digest,
                    },
                    window_start_ms: 0,
                    window_end_ms: 1_000,
                    features: vec![sketch; features],
                    predictions: vec![40, 60],
                }),
            },
            received_at_ms: 1_000,
        });
    }
    for chunk in batch.chunks(4096) {
        store.apply_batch(chunk)?;
    }

    let policy_dir = tmp.path().join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(
        policy_dir.join("policy.toml"),
        "version = 1\nmodel = \"bench\"\njob = \"job.toml\"\n[drift]\ngroup_by = [\"site\"]\n",
    )?;
    let engine = Engine::from_policy_file(
        Db::new(store),
        data.clone(),
        &keys.signing,
        &policy_dir.join("policy.toml"),
        1,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t = Instant::now();
    let scores = rt.block_on(engine.score_drift(0, 2_000))?;
    let took = t.elapsed();
    println!(
        "drift window: {devices} devices x {features} features (+ predictions), 20 sites: \
         {} scores read, merged, scored and stored in {:.0} ms ({:.1} µs per device)",
        scores.len(),
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / devices as f64
    );

    let held: Vec<Row> = (0..rows)
        .map(|_| {
            let f: Vec<f32> = (0..features).map(|_| unif()).collect();
            let label = u32::from(f[0] > 0.5);
            Row {
                features: f,
                label,
                recent: false,
            }
        })
        .collect();
    let t = Instant::now();
    let m = evaluate(&onnx, &held)?;
    let took = t.elapsed();
    println!(
        "gate: {rows} held-out rows scored with tract in {:.0} ms ({:.0} rows/s), accuracy {:.3}",
        took.as_secs_f64() * 1e3,
        rows as f64 / took.as_secs_f64(),
        m.metrics.accuracy
    );
    Ok(())
}
