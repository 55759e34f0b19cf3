//! Helpers for the continuous-training tests: a control plane's store and keys in a temp
//! dir (no server needed), a synthetic world whose data shifts, a champion model, labeled
//! fleet samples fed through the store's real ingest path, and policy/job files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_control_plane::continuous::Engine;
use drover_control_plane::keys::{self, Keys};
use drover_control_plane::registry::{self, PublishRequest};
use drover_control_plane::store::{Db, Inbound, ModelRow, Store};
use drover_control_plane::trainer::{self, TrainParams};
use drover_protocol::envelope::UplinkFrame;
use drover_protocol::messages::{Label, LabelBatch, ModelRef, Sample, SampleBatch, Uplink};
use drover_protocol::DeviceId;

/// A deterministic normal generator (xorshift + Box-Muller): tests need reproducible data,
/// not a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        mean + sd * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The synthetic world. Before the shift every site sees `x0 ~ N(0,1)`, `x1 ~ N(0,0.05)`
/// and the label is `x0 > 0`. After it, the shifted site sees `x0 ~ N(2,1)`,
/// `x1 ~ N(3,0.05)` and the label is `x0 > 2`. One linear rule, `x0 - 2/3 x1 > 0`, fits
/// both; a model trained before the shift cannot know it.
pub fn world(rng: &mut Rng, shifted: bool) -> (Vec<f32>, u32) {
    if shifted {
        let x0 = rng.normal(2.0, 1.0);
        let x1 = rng.normal(3.0, 0.05);
        (vec![x0 as f32, x1 as f32], u32::from(x0 > 2.0))
    } else {
        let x0 = rng.normal(0.0, 1.0);
        let x1 = rng.normal(0.0, 0.05);
        (vec![x0 as f32, x1 as f32], u32::from(x0 > 0.0))
    }
}

pub fn labeled_csv(rows: &[(Vec<f32>, u32)]) -> String {
    let mut s = String::from("x0,x1,label\n");
    for (x, y) in rows {
        s += &format!("{},{},{y}\n", x[0], x[1]);
    }
    s
}

pub fn features_csv(rows: &[(Vec<f32>, u32)]) -> String {
    let mut s = String::from("x0,x1\n");
    for (x, _) in rows {
        s += &format!("{},{}\n", x[0], x[1]);
    }
    s
}

/// A control plane's data dir without a server: keys, store, models dir.
pub struct Rig {
    pub dir: PathBuf,
    pub keys: Keys,
    pub store: Db,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Rig {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let data = dir.join("server");
        std::fs::create_dir_all(data.join("models"))?;
        let root = dir.join("root.key");
        let keys = keys::init(&data, &root, drover_host::clock::now_ms(), 365)?;
        let store = Store::open(&data.join("drover.db"))?;
        Ok(Self {
            dir: data,
            keys,
            store: Db::new(store),
            next_seq: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock_blocking()
    }

    /// Trains the built-in model on `rows` and publishes it with a baseline from them.
    pub fn publish_champion(
        &self,
        name: &str,
        version: &str,
        rows: &[(Vec<f32>, u32)],
    ) -> anyhow::Result<ModelRow> {
        let d = trainer::Dataset {
            features: rows.iter().map(|r| r.0.clone()).collect(),
            labels: rows.iter().map(|r| r.1).collect(),
        };
        let m = trainer::train(&d, &TrainParams::default())?;
        let req = PublishRequest {
            name: name.into(),
            version: version.into(),
            model: m.to_onnx(),
            baseline_csv: Some(features_csv(rows)),
            ..Default::default()
        };
        Ok(registry::publish(
            &mut self.lock(),
            &self.dir.join("models"),
            &req,
            &self.keys.signing,
            drover_host::clock::now_ms(),
        )?)
    }

    /// Stores labeled samples from `device` through the store's ingest path (the same
    /// `apply_batch` MQTT ingest calls), enrolling the device first if needed.
    pub fn ingest_labeled(
        &self,
        device: &str,
        labels: &[(&str, &str)],
        model: &ModelRow,
        rows: &[(Vec<f32>, u32)],
        at_ms: u64,
    ) -> anyhow::Result<()> {
        let id = DeviceId::new(device)?;
        let mut s = self.lock();
        if s.device(device)?.is_none() {
            let labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            s.enroll_device(&id, &drover_protocol::DeviceKey([7; 32]), &labels, at_ms)?;
        }
        let seq0 = self
            .next_seq
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let first_id = seq0 * 100_000;
        let model_ref = ModelRef {
            name: model.name.clone(),
            version: model.version.clone(),
            digest: model.digest,
        };
        let samples = rows
            .iter()
            .enumerate()
            .map(|(i, (x, _))| Sample {
                request_id: first_id + i as u64,
                at_ms,
                features: x.clone(),
                prediction: vec![],
            })
            .collect();
        let labels = rows
            .iter()
            .enumerate()
            .map(|(i, (_, y))| Label {
                request_id: first_id + i as u64,
                at_ms,
                value: f64::from(*y),
            })
            .collect();
        let frame = |seq, msg| Inbound {
            frame: UplinkFrame {
                device: id.clone(),
                seq,
                sent_at_ms: at_ms,
                msg,
            },
            received_at_ms: at_ms,
        };
        s.apply_batch(&[
            frame(
                seq0,
                Uplink::Samples(SampleBatch {
                    model: model_ref,
                    samples,
                }),
            ),
            frame(seq0 + 1, Uplink::Labels(LabelBatch { labels })),
        ])?;
        Ok(())
    }

    /// Writes `policy.toml` and `job.toml` and builds the engine.
    pub fn engine(&self, name: &str, policy: &str, job: &str) -> anyhow::Result<Arc<Engine>> {
        self.engine_with(name, policy, job, None)
    }

    /// [`Rig::engine`] with the Slurm executor pointed at a cluster.
    pub fn engine_with(
        &self,
        name: &str,
        policy: &str,
        job: &str,
        slurm: Option<drover_control_plane::jobs::slurm::SlurmConfig>,
    ) -> anyhow::Result<Arc<Engine>> {
        let dir = self.dir.parent().unwrap_or(&self.dir).join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("job.toml"), job)?;
        std::fs::write(dir.join("policy.toml"), policy)?;
        let mut e = Engine::from_policy_file(
            self.store.clone(),
            self.dir.clone(),
            &self.keys.signing,
            &dir.join("policy.toml"),
            2,
        )?;
        if let Some(s) = slurm {
            e.slurm = s;
        }
        e.poll_interval = std::time::Duration::from_millis(200);
        Ok(Arc::new(e))
    }

    /// Models named `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.lock()
            .models()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.name == name)
            .map(|m| m.version)
            .collect()
    }
}

/// A policy for model `model` with the given extra TOML.
pub fn policy(model: &str, extra: &str) -> String {
    format!("version = 1\nmodel = \"{model}\"\njob = \"job.toml\"\n{extra}")
}

/// A job spec running `command` (TOML array body) on `executor`.
pub fn job_spec(executor: &str, command: &str, timeout_secs: u64, base: Option<&Path>) -> String {
    let base = base.map_or(String::new(), |b| {
        format!("base = {:?}\n", b.display().to_string())
    });
    format!(
        "version = 1\nname = \"retrain\"\nexecutor = \"{executor}\"\ntimeout_secs = {timeout_secs}\n\
         command = [{command}]\n[dataset]\n{base}fleet_since_hours = 24\nholdout_fraction = 0.3\n"
    )
}

/// `"a", "b"` for a TOML array.
pub fn toml_args(args: &[&str]) -> String {
    args.iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
