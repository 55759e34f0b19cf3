//! The models serving traffic: one lane per model name (issue 17), each with its active
//! model and an optional shadow, swapped atomically.
//!
//! Hot swap: a request clones the `Arc` of its lane's active model when it starts and runs
//! on it to the end, so swapping never fails an in-flight request; the old model is freed
//! when its last request finishes. A swap replaces one lane's model: requests to the other
//! names never see it (the lane map is only written when a name is added or removed).
//!
//! Also accumulates the per-window monitoring counters the telemetry tick drains, per
//! lane: each model's telemetry, drift sketches, samples (with their own capture budget)
//! and labels stay apart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use drover_host::prom::{Histogram, DURATION_BUCKETS};

use drover_protocol::manifest::{Baseline, FeatureBaseline, Manifest, TensorData, TensorValue};
use drover_protocol::messages::{FeatureSketch, Label, LatencyHistogram, ModelRef, Sample};

use thiserror::Error;

use drover_runtime::{Model, RuntimeError};

use crate::capture::{self, Budget, CaptureConfig, Dropped};

/// Samples one telemetry window carries at most.
const MAX_WINDOW_SAMPLES: usize = 1000;

/// A model loaded and ready, with the manifest it was verified against.
pub struct Loaded {
    pub model_ref: ModelRef,
    pub manifest: Manifest,
    pub model: Model,
}

#[derive(Debug, Error)]
pub enum InferError {
    #[error("no model is loaded yet")]
    NoModel,
    #[error("model {0:?} is not served here")]
    UnknownModel(String),
    #[error("model {name:?} version {version:?} is not served here (serving version {serving:?})")]
    UnknownVersion {
        name: String,
        version: String,
        serving: String,
    },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl InferError {
    /// Whether the client is at fault (4xx) rather than the server (5xx).
    pub fn is_client_error(&self) -> bool {
        match self {
            InferError::NoModel => false,
            InferError::UnknownModel(_) | InferError::UnknownVersion { .. } => true,
            InferError::Runtime(e) => matches!(
                e,
                RuntimeError::InputCount { .. }
                    | RuntimeError::InputType { .. }
                    | RuntimeError::InputShape { .. }
                    | RuntimeError::DataLength { .. }
            ),
        }
    }
}

/// Counters of one telemetry window.
#[derive(Default)]
pub struct Window {
    pub inferences: u64,
    pub errors: u64,
    pub data_quality_errors: u64,
    pub latency: LatencyHistogram,
    pub outputs: Vec<u64>,
    /// Drift sketches against the active model's baseline (one per baseline feature).
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
    pub samples: Vec<Sample>,
    pub labels: Vec<Label>,
    pub shadow: ShadowWindow,
    /// Errors of the model currently on probation since it was activated.
    pub probation_errors: u64,
    pub probation_ok: u64,
}

#[derive(Default)]
pub struct ShadowWindow {
    pub compared: u64,
    pub agreed: u64,
    pub candidate_errors: u64,
    pub active_latency: LatencyHistogram,
    pub candidate_latency: LatencyHistogram,
}

/// A run-time histogram's labels: model name, version and role (`active`, `shadow`).
pub type RunKey = (String, String, &'static str);

/// Cumulative counters since start, for the Prometheus endpoint (telemetry windows are
/// drained; these never are).
#[derive(Default)]
pub struct Totals {
    /// Sampled inputs kept for retraining, and those the capture budget refused by
    /// reason (`capture::Dropped::ALL` order).
    pub samples_kept: AtomicU64,
    pub samples_dropped: [AtomicU64; 5],
    pub inferences: AtomicU64,
    pub errors: AtomicU64,
    pub client_errors: AtomicU64,
    /// Run time per (model, version, role): role is `active` or `shadow`.
    latency: Mutex<BTreeMap<RunKey, Arc<Histogram>>>,
    pub swaps: AtomicU64,
    pub shadow_compared: AtomicU64,
    pub shadow_agreed: AtomicU64,
    pub shadow_candidate_errors: AtomicU64,
    /// 1 while the MQTT session is up.
    pub broker_connected: AtomicU64,
    /// Bytes the uplink spool holds.
    pub spool_bytes: AtomicU64,
    /// The download in progress: chunks verified and chunks in all (0 and 0 when none).
    pub download_chunks_verified: AtomicU64,
    pub download_chunks: AtomicU64,
    pub self_tests: AtomicU64,
    /// The last self-test's run time, in nanoseconds.
    pub self_test_ns: AtomicU64,
    /// Uplink records the spool dropped (full, or a write failed); cumulative.
    pub spool_dropped: AtomicU64,
    /// Failed writes of the agent's state file.
    pub state_write_failures: AtomicU64,
    /// 1 while the last state write failed (a full disk), else 0.
    pub disk_full: AtomicU64,
    /// Bytes the model store's collection removed.
    pub store_collected_bytes: AtomicU64,
}

impl Totals {
    /// Records one model run of `seconds`.
    pub fn observe(&self, m: &ModelRef, role: &'static str, seconds: f64) {
        let h = {
            let mut map = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            map.entry((m.name.clone(), m.version.clone(), role))
                .or_insert_with(|| Arc::new(Histogram::new(&DURATION_BUCKETS)))
                .clone()
        };
        h.observe(seconds);
    }

    /// Every run-time histogram, by (model, version, role).
    pub fn latency_snapshot(&self) -> Vec<(RunKey, Arc<Histogram>)> {
        let map = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, h)| (k.clone(), h.clone())).collect()
    }

    pub fn set_connected(&self, up: bool) {
        self.broker_connected
            .store(u64::from(up), Ordering::Relaxed);
    }

    pub fn set_spool(&self, dropped: u64, bytes: u64) {
        self.spool_dropped.store(dropped, Ordering::Relaxed);
        self.spool_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The download in progress, as its verified-chunk map (`None`: no download).
    pub fn set_download(&self, have: Option<&[bool]>) {
        let have = have.unwrap_or_default();
        let verified = have.iter().filter(|h| **h).count() as u64;
        self.download_chunks_verified
            .store(verified, Ordering::Relaxed);
        self.download_chunks
            .store(have.len() as u64, Ordering::Relaxed);
    }

    pub fn self_tested(&self, took: std::time::Duration) {
        self.self_tests.fetch_add(1, Ordering::Relaxed);
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.self_test_ns.store(ns, Ordering::Relaxed);
    }

    pub fn last_self_test_seconds(&self) -> f64 {
        self.self_test_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

pub struct Serving {
    pub totals: Totals,
    lanes: RwLock<BTreeMap<String, Arc<Lane>>>,
    next_id: AtomicU64,
    sample_rate_ppm: AtomicU64,
    capture: Mutex<CaptureConfig>,
}

/// One model's drained window: its name, active model, shadow candidate and counters.
pub type ModelWindow = (String, Option<Arc<Loaded>>, Option<Arc<Loaded>>, Window);

/// One model name's serving: active, shadow, and its window and capture budget.
#[derive(Default)]
struct Lane {
    active: RwLock<Option<Arc<Loaded>>>,
    shadow: RwLock<Option<Arc<Loaded>>>,
    window: Mutex<Window>,
    budget: Mutex<Budget>,
    /// Since the lane was created: requests that reached its model, and runtime failures
    /// (`/metrics`, labelled by model).
    inferences: AtomicU64,
    errors: AtomicU64,
}

fn read(l: &RwLock<Option<Arc<Loaded>>>) -> Option<Arc<Loaded>> {
    match l.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn replace(l: &RwLock<Option<Arc<Loaded>>>, new: Option<Arc<Loaded>>) -> Option<Arc<Loaded>> {
    match l.write() {
        Ok(mut g) => std::mem::replace(&mut *g, new),
        Err(p) => std::mem::replace(&mut *p.into_inner(), new),
    }
}

/// Result of one served inference.
pub struct Served {
    pub model: Arc<Loaded>,
    pub outputs: Vec<TensorValue>,
    pub request_id: u64,
}

fn argmax_counts(outputs: &[TensorValue], counts: &mut Vec<u64>) {
    // Classification convention: an I64 label output counts its labels; else the first
    // F32 output of shape [N, C] counts its argmax per row.
    let label = outputs
        .iter()
        .find(|o| matches!(o.data, TensorData::I64(_)));
    let mut bump = |class: usize| {
        if class < 1024 {
            if counts.len() <= class {
                counts.resize(class + 1, 0);
            }
            counts[class] += 1;
        }
    };
    if let Some(TensorValue {
        data: TensorData::I64(v),
        ..
    }) = label
    {
        for l in v {
            if let Ok(c) = usize::try_from(*l) {
                bump(c);
            }
        }
        return;
    }
    if let Some(o) = outputs.first() {
        if let (TensorData::F32(v), [_, c]) = (&o.data, o.shape.as_slice()) {
            let c = *c as usize;
            if c > 0 {
                for row in v.chunks(c) {
                    let best = row.iter().enumerate().fold((0, f32::MIN), |b, (i, x)| {
                        if *x > b.1 {
                            (i, *x)
                        } else {
                            b
                        }
                    });
                    bump(best.0);
                }
            }
        }
    }
}

/// Bins one row of features into the baseline's sketches (pure).
pub fn sketch_row(baseline: &Baseline, row: &[f32], sketches: &mut Vec<FeatureSketch>) {
    if sketches.len() != baseline.features.len() {
        *sketches = baseline
            .features
            .iter()
            .map(|f| FeatureSketch {
                counts: vec![
                    0;
                    match f {
                        FeatureBaseline::Numeric { edges, .. } => edges.len() + 1,
                        FeatureBaseline::Categorical { categories, .. } => categories.len() + 1,
                    }
                ],
                missing: 0,
                out_of_range: 0,
            })
            .collect();
    }
    for (i, (f, s)) in baseline
        .features
        .iter()
        .zip(sketches.iter_mut())
        .enumerate()
    {
        let Some(x) = row.get(i).copied() else {
            s.missing += 1;
            continue;
        };
        if x.is_nan() {
            s.missing += 1;
            continue;
        }
        let x = f64::from(x);
        let bin = match f {
            FeatureBaseline::Numeric {
                edges, min, max, ..
            } => {
                if x < *min || x > *max {
                    s.out_of_range += 1;
                }
                edges.partition_point(|e| *e <= x)
            }
            FeatureBaseline::Categorical { categories, .. } => categories
                .iter()
                .position(|c| *c as f64 == x)
                .unwrap_or(categories.len()),
        };
        if let Some(c) = s.counts.get_mut(bin) {
            *c += 1;
        }
    }
}

fn first_rows(inputs: &[TensorValue]) -> Vec<Vec<f32>> {
    match inputs.first() {
        Some(TensorValue {
            data: TensorData::F32(v),
            shape,
            ..
        }) if shape.len() == 2 && shape[1] > 0 => {
            v.chunks(shape[1] as usize).map(<[f32]>::to_vec).collect()
        }
        Some(TensorValue {
            data: TensorData::F32(v),
            ..
        }) => vec![v.clone()],
        _ => vec![],
    }
}

fn has_nan(inputs: &[TensorValue]) -> bool {
    inputs.iter().any(|t| match &t.data {
        TensorData::F32(v) => v.iter().any(|x| !x.is_finite()),
        TensorData::I64(_) => false,
    })
}

fn flat_f32(outputs: &[TensorValue]) -> Vec<f32> {
    match outputs
        .iter()
        .find(|o| matches!(o.data, TensorData::F32(_)))
    {
        Some(TensorValue {
            data: TensorData::F32(v),
            ..
        }) => v.iter().take(64).copied().collect(),
        _ => vec![],
    }
}

fn agree(a: &[TensorValue], b: &[TensorValue]) -> bool {
    let mut ca = Vec::new();
    let mut cb = Vec::new();
    argmax_counts(a, &mut ca);
    argmax_counts(b, &mut cb);
    if !ca.is_empty() || !cb.is_empty() {
        return ca == cb;
    }
    let (fa, fb) = (flat_f32(a), flat_f32(b));
    fa.len() == fb.len() && fa.iter().zip(&fb).all(|(x, y)| (x - y).abs() <= 1e-3)
}

impl Serving {
    pub fn new(sample_rate_ppm: u32) -> Self {
        Self {
            totals: Totals::default(),
            lanes: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            sample_rate_ppm: AtomicU64::new(u64::from(sample_rate_ppm)),
            capture: Mutex::new(CaptureConfig::default()),
        }
    }

    /// Sets which sampled inputs are kept and the budget they are kept within (each
    /// model's budget is its own).
    pub fn set_capture(&self, cfg: CaptureConfig) {
        if let Ok(mut c) = self.capture.lock() {
            *c = cfg;
        }
    }

    fn lane(&self, name: &str) -> Option<Arc<Lane>> {
        let lanes = self.lanes.read().unwrap_or_else(|p| p.into_inner());
        lanes.get(name).cloned()
    }

    /// The lane of `name`, created if it is new.
    fn lane_or_new(&self, name: &str) -> Arc<Lane> {
        if let Some(l) = self.lane(name) {
            return l;
        }
        let mut lanes = self.lanes.write().unwrap_or_else(|p| p.into_inner());
        lanes.entry(name.to_owned()).or_default().clone()
    }

    fn all_lanes(&self) -> Vec<(String, Arc<Lane>)> {
        let lanes = self.lanes.read().unwrap_or_else(|p| p.into_inner());
        lanes.iter().map(|(n, l)| (n.clone(), l.clone())).collect()
    }

    /// Keeps a sampled input if the capture policy wants it and the model's budget
    /// allows, else counts why not.
    fn capture(
        &self,
        (lane, w): (&Lane, &mut Window),
        (request_id, now_ms): (u64, u64),
        inputs: &[TensorValue],
        outputs: &[TensorValue],
        disagreed: Option<bool>,
    ) {
        let Ok(cfg) = self.capture.lock().map(|c| c.clone()) else {
            return;
        };
        let Ok(mut budget) = lane.budget.lock() else {
            return;
        };
        if !capture::wanted(&cfg, outputs, disagreed) {
            return;
        }
        let sample = Sample {
            request_id,
            at_ms: now_ms,
            features: first_rows(inputs)
                .into_iter()
                .flatten()
                .take(4096)
                .collect(),
            prediction: flat_f32(outputs),
        };
        let bytes = 4 * (sample.features.len() + sample.prediction.len()) as u64;
        let admitted = if w.samples.len() >= MAX_WINDOW_SAMPLES {
            Err(Dropped::Window)
        } else {
            budget.admit(&cfg, sample.at_ms, bytes)
        };
        match admitted {
            Ok(()) => {
                w.samples.push(sample);
                self.totals.samples_kept.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => {
                let ix = Dropped::ALL.iter().position(|d| *d == why).unwrap_or(0);
                self.totals.samples_dropped[ix].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn set_sample_rate(&self, ppm: u32) {
        self.sample_rate_ppm
            .store(u64::from(ppm.min(1_000_000)), Ordering::Relaxed);
    }

    /// The active model of `name`.
    pub fn active(&self, name: &str) -> Option<Arc<Loaded>> {
        self.lane(name).and_then(|l| read(&l.active))
    }

    /// The shadow candidate beside `name`'s active model.
    pub fn shadow(&self, name: &str) -> Option<Arc<Loaded>> {
        self.lane(name).and_then(|l| read(&l.shadow))
    }

    /// Every active model, in name order.
    pub fn actives(&self) -> Vec<Arc<Loaded>> {
        (self.all_lanes().iter())
            .filter_map(|(_, l)| read(&l.active))
            .collect()
    }

    /// Every shadow candidate, in name order.
    pub fn shadows(&self) -> Vec<Arc<Loaded>> {
        (self.all_lanes().iter())
            .filter_map(|(_, l)| read(&l.shadow))
            .collect()
    }

    /// Whether any model serves.
    pub fn any_active(&self) -> bool {
        !self.actives().is_empty()
    }

    /// Atomically replaces the active model of `name`; returns the old one. Other names
    /// are not touched.
    pub fn swap_active(&self, name: &str, new: Option<Arc<Loaded>>) -> Option<Arc<Loaded>> {
        self.totals.swaps.fetch_add(1, Ordering::Relaxed);
        let lane = self.lane_or_new(name);
        let old = replace(&lane.active, new);
        if let Ok(mut w) = lane.window.lock() {
            w.probation_errors = 0;
            w.probation_ok = 0;
            w.features.clear();
            w.predictions.clear();
        }
        old
    }

    pub fn set_shadow(&self, name: &str, new: Option<Arc<Loaded>>) -> Option<Arc<Loaded>> {
        let lane = self.lane_or_new(name);
        replace(&lane.shadow, new)
    }

    /// Stops serving `name` (a removed model): its lane, with its window, is dropped;
    /// requests in flight finish on the model they hold.
    pub fn remove(&self, name: &str) {
        let mut lanes = self.lanes.write().unwrap_or_else(|p| p.into_inner());
        if lanes.remove(name).is_some() {
            self.totals.swaps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drains every model's window: (name, active model, shadow, window), in name order.
    pub fn take_windows(&self) -> Vec<ModelWindow> {
        let mut out = Vec::new();
        for (name, lane) in self.all_lanes() {
            let w = match lane.window.lock() {
                Ok(mut w) => {
                    let (pe, po) = (w.probation_errors, w.probation_ok);
                    let mut out = std::mem::take(&mut *w);
                    w.probation_errors = pe;
                    w.probation_ok = po;
                    out.probation_errors = pe;
                    out.probation_ok = po;
                    out
                }
                Err(_) => Window::default(),
            };
            out.push((name, read(&lane.active), read(&lane.shadow), w));
        }
        out
    }

    /// Per model name, (errors, successes) of its active model since it was activated.
    pub fn probation(&self) -> BTreeMap<String, (u64, u64)> {
        (self.all_lanes().into_iter())
            .map(|(n, l)| {
                let c = (l.window.lock())
                    .map(|w| (w.probation_errors, w.probation_ok))
                    .unwrap_or((0, 0));
                (n, c)
            })
            .collect()
    }

    /// Per model name, in name order: (inferences, runtime failures) since it was first
    /// served here.
    pub fn model_counts(&self) -> Vec<(String, u64, u64)> {
        (self.all_lanes().into_iter())
            .map(|(n, l)| {
                let (i, e) = (&l.inferences, &l.errors);
                (n, i.load(Ordering::Relaxed), e.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Keeps a label in the window of the model it is about.
    pub fn add_label(&self, name: &str, label: Label) {
        let Some(lane) = self.lane(name) else { return };
        let mut w = lane.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.labels.len() < 10_000 {
            w.labels.push(label);
        }
    }

    /// The next request id handed out is `last + 1` (set at boot from the reservation).
    pub fn continue_request_ids_after(&self, last: u64) {
        self.next_id
            .store(last.saturating_add(1), Ordering::Relaxed);
    }

    pub(crate) fn alloc_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Highest request id handed out so far.
    pub fn last_request_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Runs one inference on the active model, which must be `version` when one is asked
    /// for (blocking: call from a blocking thread).
    pub fn infer(
        &self,
        name: &str,
        version: Option<&str>,
        inputs: &[TensorValue],
        now_ms: u64,
    ) -> Result<Served, InferError> {
        let lane = match self.lane(name) {
            Some(l) => l,
            None if !self.any_active() => return Err(InferError::NoModel),
            None => return Err(InferError::UnknownModel(name.to_owned())),
        };
        let model = read(&lane.active).ok_or_else(|| InferError::UnknownModel(name.to_owned()))?;
        if let Some(v) = version.filter(|v| *v != model.model_ref.version) {
            return Err(InferError::UnknownVersion {
                name: name.to_owned(),
                version: v.to_owned(),
                serving: model.model_ref.version.clone(),
            });
        }
        let request_id = self.alloc_request_id();
        let started = Instant::now();
        let result = model.model.run(inputs);
        let took = started.elapsed();
        let us = took.as_micros() as u64;
        self.totals.inferences.fetch_add(1, Ordering::Relaxed);
        lane.inferences.fetch_add(1, Ordering::Relaxed);
        self.totals
            .observe(&model.model_ref, "active", took.as_secs_f64());
        if let Err(e) = &result {
            if InferError::Runtime(e.clone()).is_client_error() {
                self.totals.client_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.totals.errors.fetch_add(1, Ordering::Relaxed);
                lane.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let shadow = read(&lane.shadow).filter(|_| result.is_ok());
        let shadow_result = shadow.as_ref().map(|s| {
            let t = Instant::now();
            let r = s.model.run(inputs);
            let took = t.elapsed();
            self.totals
                .observe(&s.model_ref, "shadow", took.as_secs_f64());
            let totals = &self.totals;
            totals.shadow_compared.fetch_add(1, Ordering::Relaxed);
            match &r {
                Ok(b) if result.as_ref().is_ok_and(|a| agree(a, b)) => {
                    totals.shadow_agreed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
                    totals
                        .shadow_candidate_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            (r, took.as_micros() as u64)
        });
        let rate = self.sample_rate_ppm.load(Ordering::Relaxed);
        let sampled =
            rate > 0 && (request_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_000_000) < rate;
        if let Ok(mut w) = lane.window.lock() {
            w.inferences += 1;
            w.latency.record(us);
            if has_nan(inputs) {
                w.data_quality_errors += 1;
            }
            match &result {
                Ok(outputs) => {
                    w.probation_ok += 1;
                    let mut counts = std::mem::take(&mut w.outputs);
                    argmax_counts(outputs, &mut counts);
                    w.outputs = counts;
                    if let Some(b) = &model.manifest.baseline {
                        let mut sk = std::mem::take(&mut w.features);
                        for row in first_rows(inputs) {
                            sketch_row(b, &row, &mut sk);
                        }
                        w.features = sk;
                        let mut p = std::mem::take(&mut w.predictions);
                        argmax_counts(outputs, &mut p);
                        w.predictions = p;
                    }
                    if sampled {
                        let disagreed = shadow_result.as_ref().map(|(sr, _)| match sr {
                            Ok(b) => !agree(outputs, b),
                            Err(_) => true,
                        });
                        let at = (request_id, now_ms);
                        self.capture((&lane, &mut w), at, inputs, outputs, disagreed);
                    }
                    if let (Some((sr, sus)), Ok(a)) = (&shadow_result, &result) {
                        w.shadow.compared += 1;
                        w.shadow.active_latency.record(us);
                        w.shadow.candidate_latency.record(*sus);
                        match sr {
                            Ok(b) if agree(a, b) => w.shadow.agreed += 1,
                            Ok(_) => {}
                            Err(_) => w.shadow.candidate_errors += 1,
                        }
                    }
                }
                Err(e) => {
                    if !InferError::Runtime(e.clone()).is_client_error() {
                        w.errors += 1;
                        w.probation_errors += 1;
                    } else {
                        w.data_quality_errors += 1;
                    }
                }
            }
        }
        let outputs = result?;
        Ok(Served {
            model,
            outputs,
            request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_counts_bins_missing_and_out_of_range() {
        let b = Baseline {
            rows: 10,
            features: vec![FeatureBaseline::Numeric {
                name: "a".into(),
                edges: vec![0.0, 1.0],
                counts: vec![1, 1, 1],
                min: -1.0,
                max: 2.0,
            }],
            predictions: vec![],
        };
        let mut sk = Vec::new();
        for x in [-0.5, 0.5, 1.5, 5.0, f32::NAN] {
            sketch_row(&b, &[x], &mut sk);
        }
        assert_eq!(sk[0].counts, vec![1, 1, 2]);
        assert_eq!(sk[0].missing, 1);
        assert_eq!(sk[0].out_of_range, 1);
    }

    /// `p = softmax(x · I)` over 2 features: its scores are the input's softmax.
    fn softmax_model(name: &str) -> Arc<Loaded> {
        use drover_runtime::graph::DataType;
        use drover_runtime::graph::{
            attr_int, model_bytes, node, tensor_f32, value_info, GraphDim,
        };
        use tract_onnx::pb::GraphProto;
        let mut softmax = node("Softmax", &["z"], "p");
        softmax.attribute.push(attr_int("axis", 1));
        let dims = [GraphDim::batch(), GraphDim::Fixed(2)];
        let graph = GraphProto {
            name: "t".into(),
            node: vec![node("MatMul", &["x", "w"], "z"), softmax],
            initializer: vec![tensor_f32("w", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0])],
            input: vec![value_info("x", DataType::Float, &dims)],
            output: vec![value_info("p", DataType::Float, &dims)],
            ..Default::default()
        };
        let bytes = model_bytes(graph, "test", "0");
        Arc::new(Loaded {
            model_ref: ModelRef {
                name: name.into(),
                version: "1.0.0".into(),
                digest: [1; 32],
            },
            manifest: Manifest {
                name: name.into(),
                version: "1.0.0".into(),
                sha256: [0; 32],
                size: bytes.len() as u64,
                chunk_size: 1024,
                chunk_hashes: vec![],
                inputs: vec![],
                outputs: vec![],
                baseline: None,
                test_vectors: vec![],
                lineage: Default::default(),
                created_at_ms: 0,
                sampled_vectors: vec![],
                artifact: None,
            },
            model: Model::load(&bytes).unwrap(),
        })
    }

    fn x(a: f32, b: f32) -> Vec<TensorValue> {
        vec![TensorValue {
            name: "x".into(),
            shape: vec![1, 2],
            data: TensorData::F32(vec![a, b]),
        }]
    }

    #[test]
    fn sampled_inputs_are_kept_by_the_capture_policy_within_its_budget() {
        let s = Serving::new(1_000_000);
        s.swap_active("m", Some(softmax_model("m")));
        s.set_capture(CaptureConfig {
            keep: capture::Keep::LowConfidence,
            per_minute: 2,
            ..CaptureConfig::default()
        });
        // Confident answers (top score 0.99) are not wanted, so they use no budget.
        for _ in 0..3 {
            s.infer("m", None, &x(5.0, 0.0), 1_000).unwrap();
        }
        // Five uncertain ones (0.5/0.5) in one minute: two kept, three refused by the cap.
        for _ in 0..5 {
            s.infer("m", None, &x(0.0, 0.0), 2_000).unwrap();
        }
        // The next minute has room again.
        s.infer("m", None, &x(0.0, 0.0), 61_000).unwrap();
        let (_, _, _, w) = s.take_windows().pop().unwrap();
        assert_eq!(w.samples.len(), 3);
        assert!(w.samples.iter().all(|x| x.features == [0.0, 0.0]));
        let t = &s.totals;
        assert_eq!(t.samples_kept.load(Ordering::Relaxed), 3);
        assert_eq!(
            t.samples_dropped[0].load(Ordering::Relaxed),
            3,
            "per_minute"
        );
        assert_eq!(Dropped::ALL[0], Dropped::Minute);
    }

    #[test]
    fn each_model_has_its_own_window_and_capture_budget() {
        let s = Serving::new(1_000_000);
        s.swap_active("a", Some(softmax_model("a")));
        s.swap_active("b", Some(softmax_model("b")));
        s.set_capture(CaptureConfig {
            keep: capture::Keep::LowConfidence,
            per_minute: 2,
            ..CaptureConfig::default()
        });
        // Three uncertain requests each in one minute: two kept per model, not two in all.
        for _ in 0..3 {
            s.infer("a", None, &x(0.0, 0.0), 1_000).unwrap();
            s.infer("b", None, &x(0.0, 0.0), 1_000).unwrap();
        }
        s.infer("b", None, &x(5.0, 0.0), 1_000).unwrap();
        let w = s.take_windows();
        let names: Vec<&str> = w.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!((w[0].3.inferences, w[1].3.inferences), (3, 4));
        assert_eq!((w[0].3.samples.len(), w[1].3.samples.len()), (2, 2));
        let counts = s.model_counts();
        assert_eq!(counts, [("a".to_owned(), 3, 0), ("b".to_owned(), 4, 0)]);
        assert_eq!(w[0].1.as_ref().unwrap().model_ref.name, "a");
        // Removing one model leaves the other serving.
        s.remove("a");
        assert!(matches!(
            s.infer("a", None, &x(0.0, 0.0), 2_000),
            Err(InferError::UnknownModel(_))
        ));
        s.infer("b", None, &x(0.0, 0.0), 2_000).unwrap();
    }

    #[test]
    fn argmax_counts_rows() {
        let o = TensorValue {
            name: "y".into(),
            shape: vec![2, 3],
            data: TensorData::F32(vec![0.1, 0.9, 0.0, 0.7, 0.2, 0.1]),
        };
        let mut c = Vec::new();
        argmax_counts(&[o], &mut c);
        assert_eq!(c, vec![1, 1]);
    }
}
