//! The traffic a virtual device's models serve, modelled: requests at the configured
//! rate, errors and latency per label group (worse for a "bad model"), predicted classes,
//! shadow comparisons, drift, and the telemetry window they add up to. Devices that run
//! tract serve every modelled request with a real inference on the manifest's first test
//! vector. The outcomes feed the deployment machine's probation verdict.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use drover_host::clock::now_ms;
use drover_protocol::manifest::Dim;
use drover_protocol::messages::{
    DriftReport, LatencyHistogram, ModelRef, ShadowReport, SystemFacts, TelemetryBatch, Uplink,
};
use rand::Rng;

use super::device::{Device, SimModel};
use super::model::{drift_sketches, sample_latency_us};

/// Counters of one telemetry window.
#[derive(Default)]
pub(super) struct Window {
    inferences: u64,
    errors: u64,
    latency: LatencyHistogram,
    outputs: Vec<u64>,
    /// Shadow comparison on the same inputs.
    compared: u64,
    agreed: u64,
    candidate_errors: u64,
    active_latency: LatencyHistogram,
    candidate_latency: LatencyHistogram,
}

impl Device {
    fn is_bad(&self, m: &ModelRef) -> bool {
        let name = format!("{}@{}", m.name, m.version);
        self.shared.cfg.bad_models.contains(&name)
    }

    /// (error rate, median latency) of a model on this device.
    fn behaviour(&self, m: &ModelRef) -> (f64, f64) {
        let cfg = &self.shared.cfg;
        let g = cfg
            .groups
            .get(self.ident.group)
            .cloned()
            .unwrap_or_default();
        if self.is_bad(m) {
            (
                cfg.bad_error_rate.max(g.error_rate),
                g.latency_p50_us as f64 * cfg.bad_latency_factor,
            )
        } else {
            (g.error_rate, g.latency_p50_us as f64)
        }
    }

    /// One inference on `slot`: real tract on tract devices, modelled otherwise.
    /// Returns (error, latency µs, predicted class).
    fn infer(&mut self, slot: &SimModel) -> (bool, u64, usize) {
        let (err_rate, p50) = self.behaviour(&slot.model);
        let classes = slot
            .manifest
            .outputs
            .first()
            .and_then(|o| o.shape.last())
            .and_then(|d| match d {
                Dim::Fixed(n) => Some(*n as usize),
                Dim::Symbolic(_) => None,
            })
            .unwrap_or(2)
            .clamp(1, 1024);
        if let (Some(model), Some(tv)) = (&slot.tract, slot.manifest.test_vectors.first()) {
            let t0 = Instant::now();
            let out = model.run(&tv.inputs);
            let us = t0.elapsed().as_micros() as u64;
            self.shared.stats.tract_inferences.fetch_add(1, Relaxed);
            let class = out
                .ok()
                .and_then(|o| o.into_iter().next())
                .and_then(|t| match t.data {
                    drover_protocol::manifest::TensorData::F32(v) => v
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i),
                    _ => None,
                });
            let err = class.is_none() || self.rng.gen_bool(err_rate.clamp(0.0, 1.0));
            return (err, us.max(1), class.unwrap_or(0) % classes);
        }
        let err = self.rng.gen_bool(err_rate.clamp(0.0, 1.0));
        (
            err,
            sample_latency_us(&mut self.rng, p50),
            self.rng.gen_range(0..classes),
        )
    }

    /// The inferences apps asked for since the last tick: every request goes to every
    /// model the device serves (one app per model, at the configured rate each).
    pub(super) fn serve_traffic(&mut self) {
        // Requests arrive with wall time, not with ticks: a device whose task ran late
        // (a busy simulator) serves everything that arrived meanwhile.
        let now = Instant::now();
        let elapsed = now.duration_since(std::mem::replace(&mut self.last_served, now));
        if self.active.is_empty() {
            return;
        }
        self.pending_inferences += self.shared.cfg.inference_rate * elapsed.as_secs_f64();
        let n = self.pending_inferences.floor() as u64;
        self.pending_inferences -= n as f64;
        let names: Vec<String> = self.active.keys().cloned().collect();
        for name in names {
            let Some(active) = self.active.get(&name).cloned() else {
                continue;
            };
            let shadow = self.shadow.get(&name).cloned();
            let mut w = self.win.remove(&name).unwrap_or_default();
            let mut counts = self.probation_counts.get(&name).copied().unwrap_or((0, 0));
            for _ in 0..n {
                self.serve_one(&active, shadow.as_ref(), &mut w, &mut counts);
            }
            self.win.insert(name.clone(), w);
            self.probation_counts.insert(name, counts);
            self.shared.stats.inferences.fetch_add(n, Relaxed);
        }
    }

    /// One request on `active` (and its shadow), counted in `w` and the probation counts.
    fn serve_one(
        &mut self,
        active: &SimModel,
        shadow: Option<&SimModel>,
        w: &mut Window,
        counts: &mut (u64, u64),
    ) {
        let (err, us, class) = self.infer(active);
        w.inferences += 1;
        w.latency.record(us);
        if err {
            w.errors += 1;
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        if w.outputs.len() <= class {
            w.outputs.resize(class + 1, 0);
        }
        w.outputs[class] += 1;
        if let Some(s) = shadow {
            let (cerr, cus, cclass) = self.infer(s);
            w.compared += 1;
            w.active_latency.record(us);
            w.candidate_latency.record(cus);
            if cerr {
                w.candidate_errors += 1;
            }
            // Modelled classes are independent draws; agreement follows the
            // candidate's health instead (a bad candidate disagrees when it errs).
            if !cerr && (s.tract.is_some() || !self.is_bad(&s.model) || cclass == class) {
                w.agreed += 1;
            }
        }
    }

    /// One telemetry window per model slot (a device serving none reports one without a
    /// model), with its drift sketches and shadow report.
    pub(super) fn emit_window(&mut self) {
        let end = now_ms();
        let start = std::mem::replace(&mut self.window_start_ms, end);
        let mut windows = std::mem::take(&mut self.win);
        let facts = SystemFacts {
            cpu_percent: self.rng.gen_range(5.0..25.0),
            mem_used_bytes: 300 << 20,
            mem_total_bytes: 1 << 30,
            agent_rss_bytes: 18 << 20,
            temperature_c: Some(self.rng.gen_range(40.0..60.0)),
            disk_free_bytes: 4 << 30,
            disk_total_bytes: 8 << 30,
        };
        let slots: Vec<(Option<SimModel>, Window)> = if self.active.is_empty() {
            vec![(None, Window::default())]
        } else {
            self.active
                .iter()
                .map(|(name, a)| (Some(a.clone()), windows.remove(name).unwrap_or_default()))
                .collect()
        };
        for (active, w) in slots {
            self.report(Uplink::Telemetry(TelemetryBatch {
                window_start_ms: start,
                window_end_ms: end,
                model: active.as_ref().map(|a| a.model.clone()),
                inferences: w.inferences,
                errors: w.errors,
                data_quality_errors: 0,
                latency: w.latency.clone(),
                outputs: w.outputs.clone(),
                system: facts.clone(),
                spool_dropped: 0,
            }));
            if let Some(a) = &active {
                self.report_model_window(a, start, end, w);
            }
        }
    }

    /// The drift sketches and shadow report of one slot's window.
    fn report_model_window(&mut self, a: &SimModel, start: u64, end: u64, w: Window) {
        if let Some(b) = &a.manifest.baseline {
            if w.inferences > 0 {
                let features = drift_sketches(b, w.inferences, self.shared.cfg.drift);
                self.report(Uplink::Drift(DriftReport {
                    model: a.model.clone(),
                    window_start_ms: start,
                    window_end_ms: end,
                    features,
                    predictions: w.outputs.clone(),
                }));
            }
        }
        if let Some(s) = self.shadow.get(&a.model.name).cloned() {
            if w.compared > 0 {
                self.report(Uplink::Shadow(ShadowReport {
                    active: a.model.clone(),
                    candidate: s.model.clone(),
                    compared: w.compared,
                    agreed: w.agreed,
                    candidate_errors: w.candidate_errors,
                    active_latency: w.active_latency,
                    candidate_latency: w.candidate_latency,
                }));
            }
        }
    }
}
