//! What the simulator keeps per model instead of per device, and how it models inference.
//!
//! - [`ChunkCache`]: every chunk a device verified is kept once per model for the whole
//!   process (devices still receive and verify every chunk themselves); a completed
//!   download is assembled and checked against the manifest (`verify_file`) once.
//! - [`sample_latency_us`], [`drift_sketches`]: modelled inference.
//! - [`onnx_model_of_size`]: a real MLP of about the requested size, for rollouts of a
//!   "1 MB model" that tract on the control plane and on devices actually runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use drover_protocol::manifest::{Baseline, FeatureBaseline, Manifest};
use drover_protocol::messages::FeatureSketch;
use drover_protocol::trust::{sha256, verify_file, Digest};
use rand::Rng;
use tract_onnx::pb;

/// Verified chunks of the models being downloaded, once per model for the process.
#[derive(Default)]
pub struct ChunkCache {
    models: Mutex<HashMap<Digest, Arc<ModelBytes>>>,
}

/// One model's verified chunks, and the assembled file once complete.
pub struct ModelBytes {
    chunks: Vec<OnceLock<Arc<[u8]>>>,
    file: OnceLock<Result<Arc<Vec<u8>>, String>>,
}

impl ChunkCache {
    /// The entry for the model whose signed manifest has digest `digest`.
    pub fn model(&self, digest: Digest, m: &Manifest) -> Arc<ModelBytes> {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models
            .entry(digest)
            .or_insert_with(|| {
                Arc::new(ModelBytes {
                    chunks: (0..m.chunk_count()).map(|_| OnceLock::new()).collect(),
                    file: OnceLock::new(),
                })
            })
            .clone()
    }

    /// Bytes held (for the simulator's own memory report).
    pub fn bytes(&self) -> usize {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .map(|m| {
                m.chunks
                    .iter()
                    .filter_map(|c| c.get().map(|b| b.len()))
                    .sum::<usize>()
            })
            .sum()
    }
}

impl ModelBytes {
    /// Keeps a chunk the caller has verified against the manifest.
    pub fn keep(&self, index: u32, data: &[u8]) {
        if let Some(slot) = self.chunks.get(index as usize) {
            slot.get_or_init(|| Arc::from(data));
        }
    }

    /// The whole file, assembled from verified chunks and checked against the manifest's
    /// size and SHA-256 (once per model).
    pub fn file(&self, m: &Manifest) -> Result<Arc<Vec<u8>>, String> {
        self.file
            .get_or_init(|| {
                let mut bytes = Vec::with_capacity(m.size as usize);
                for (i, c) in self.chunks.iter().enumerate() {
                    let c = c
                        .get()
                        .ok_or_else(|| format!("chunk {i} was never verified"))?;
                    bytes.extend_from_slice(c);
                }
                verify_file(m, bytes.len() as u64, &sha256(&bytes)).map_err(|e| e.to_string())?;
                Ok(Arc::new(bytes))
            })
            .clone()
    }
}

/// A log-normal latency around `p50_us` (sigma 0.35: p99 ≈ 2.3 × p50).
pub fn sample_latency_us(rng: &mut impl Rng, p50_us: f64) -> u64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (p50_us * (0.35 * z).exp()).max(1.0) as u64
}

/// Per-feature sketches of `n` inputs drawn from the baseline, with `drift` of each
/// feature's mass moved to its top bin.
pub fn drift_sketches(b: &Baseline, n: u64, drift: f64) -> Vec<FeatureSketch> {
    b.features
        .iter()
        .map(|f| {
            let (counts, bins) = match f {
                FeatureBaseline::Numeric { edges, counts, .. } => (counts, edges.len() + 1),
                FeatureBaseline::Categorical {
                    categories, counts, ..
                } => (counts, categories.len() + 1),
            };
            let total: u64 = counts.iter().sum::<u64>().max(1);
            let mut out: Vec<u64> = (0..bins)
                .map(|i| {
                    let c = counts.get(i).copied().unwrap_or(0);
                    ((1.0 - drift) * n as f64 * c as f64 / total as f64).round() as u64
                })
                .collect();
            let placed: u64 = out.iter().sum();
            if let Some(last) = out.last_mut() {
                *last += n.saturating_sub(placed);
            }
            FeatureSketch {
                counts: out,
                missing: 0,
                out_of_range: 0,
            }
        })
        .collect()
}

/// A two-layer MLP (`x [N, 16]` → hidden → 4 classes, softmax) whose ONNX file is about
/// `bytes` long, with deterministic weights from `seed`. Small inputs and outputs keep
/// the signed manifest (test vectors ride in every deploy command) small however big the
/// model is.
pub fn onnx_model_of_size(bytes: usize, seed: u64) -> Vec<u8> {
    const IN: usize = 16;
    const OUT: usize = 4;
    let hidden = (bytes / 4 / (IN + OUT)).max(1);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut weights = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    };
    let w1 = weights(IN * hidden, 0.5);
    let w2 = weights(hidden * OUT, 1.0 / (hidden as f32).sqrt());
    use drover_runtime::graph::{
        attr_int, model_bytes, node, tensor_f32, value_info, DataType, GraphDim,
    };
    let io = |name: &str, width: usize| {
        value_info(
            name,
            DataType::Float,
            &[GraphDim::batch(), GraphDim::Fixed(width as i64)],
        )
    };
    let mut softmax = node("Softmax", &["logits"], "probabilities");
    softmax.attribute.push(attr_int("axis", 1));
    let graph = pb::GraphProto {
        name: "drover_sim_mlp".into(),
        node: vec![
            node("MatMul", &["x", "w1"], "h"),
            node("Relu", &["h"], "hr"),
            node("MatMul", &["hr", "w2"], "logits"),
            softmax,
        ],
        initializer: vec![
            tensor_f32("w1", vec![IN as i64, hidden as i64], w1),
            tensor_f32("w2", vec![hidden as i64, OUT as i64], w2),
        ],
        input: vec![io("x", IN)],
        output: vec![io("probabilities", OUT)],
        ..Default::default()
    };
    model_bytes(graph, "drover-fleet-sim", "")
}

/// A baseline CSV for the 16 inputs of [`onnx_model_of_size`] (uniform in [0, 1)), so
/// published models carry a drift baseline the simulator's drift reports compare with.
pub fn baseline_csv(rows: usize, seed: u64) -> String {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut s: String = (0..16)
        .map(|i| format!("f{i}"))
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    for _ in 0..rows {
        let row: Vec<String> = (0..16)
            .map(|_| format!("{:.4}", rng.gen::<f64>()))
            .collect();
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_model_has_the_requested_size_and_runs_in_tract() {
        let bytes = onnx_model_of_size(256 * 1024, 7);
        assert!(
            (250_000..275_000).contains(&bytes.len()),
            "{} bytes",
            bytes.len()
        );
        let m = drover_runtime::Model::load(&bytes).unwrap();
        assert_eq!(m.inputs().len(), 1);
    }

    #[test]
    fn drift_moves_mass_to_the_top_bin_and_keeps_the_total() {
        let b = Baseline {
            rows: 100,
            features: vec![FeatureBaseline::Numeric {
                name: "f".into(),
                edges: vec![0.5],
                counts: vec![50, 50],
                min: 0.0,
                max: 1.0,
            }],
            predictions: vec![],
        };
        assert_eq!(drift_sketches(&b, 100, 0.0)[0].counts, vec![50, 50]);
        assert_eq!(drift_sketches(&b, 100, 0.5)[0].counts, vec![25, 75]);
    }

    #[test]
    fn latency_samples_center_on_the_median() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let mut v: Vec<u64> = (0..10_001)
            .map(|_| sample_latency_us(&mut rng, 1000.0))
            .collect();
        let p50 = super::super::quantile(&mut v, 0.5);
        assert!((900..1100).contains(&p50), "{p50}");
    }
}
