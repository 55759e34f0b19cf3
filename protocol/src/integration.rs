//! The integration stream's JSON (schema version [`SCHEMA_VERSION`]): what the control plane
//! republishes, for every authenticated uplink, on `drover/v1/json/<device>/<kind>`
//! ([`crate::topics::json_uplink`]), so Node-RED, Telegraf or Home Assistant read plain
//! JSON instead of MAC'd postcard frames. Flat on purpose: one object per uplink,
//!
//! ```json
//! {"schema": 1, "ts": 1733500000123, "device": "gw-01", "seq": 17, "kind": "telemetry",
//!  "model": "dense@1.0.0", "metrics": {"inferences": 42, "latency_p99_ms": 2.0, ...}}
//! ```
//!
//! Delivery is at least once: a frame an agent resends after a reconnect is republished
//! again; `(device, seq)` identifies a record. `ts` is the time the control plane received
//! the frame (Unix ms), `model` is
//! `name@version` or `null`, `metrics` holds numbers only (one level, so Telegraf's
//! `json_v2` and Node-RED's JSON node read it without a schema). Text that is not a number
//! (a phase, a reason) goes in `info`. Fields are only ever added; a removal or a changed
//! meaning bumps `schema`. docs/INTEGRATIONS.md is the reference.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::messages::{ModelRef, Presence, Uplink};
use crate::topics::DeviceId;

/// Bumped on any change other than an added field.
pub const SCHEMA_VERSION: u32 = 1;

/// A runtime report's text fields: `runtime` (`tract 0.23.9`) and `formats`.
fn runtime_info(r: &crate::messages::RuntimeReport, info: &mut BTreeMap<&'static str, String>) {
    info.insert("runtime", format!("{} {}", r.engine, r.version));
    let formats: Vec<String> = (r.formats.iter())
        .map(|f| format!("{} {}", f.format, f.version))
        .collect();
    info.insert("formats", formats.join(", "));
}

#[derive(Serialize)]
struct Record<'a> {
    schema: u32,
    ts: u64,
    device: &'a str,
    seq: u64,
    kind: &'static str,
    model: Option<String>,
    metrics: BTreeMap<&'static str, f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    info: BTreeMap<&'static str, String>,
}

fn name(m: &ModelRef) -> String {
    format!("{}@{}", m.name, m.version)
}

/// Bytes on disk and in memory of every slot, and the active models as `a@1,b@2`.
fn slot_totals(r: &crate::messages::ModelsReport) -> (f64, f64, String) {
    let disk: u64 = r.slots.iter().map(|s| s.disk_bytes).sum();
    let memory: u64 = r.slots.iter().map(|s| s.memory_bytes).sum();
    let active: Vec<String> = r
        .slots
        .iter()
        .filter_map(|s| s.active.as_ref().map(name))
        .collect();
    (disk as f64, memory as f64, active.join(","))
}

/// The JSON record of one authenticated uplink (the bytes published).
pub fn uplink_json(device: &DeviceId, seq: u64, ts_ms: u64, msg: &Uplink) -> Vec<u8> {
    let mut metrics: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut info: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut m = |k: &'static str, v: f64| {
        metrics.insert(k, v);
    };
    let model = match msg {
        Uplink::Hello(h) => {
            info.insert("agent_version", h.agent_version.clone());
            info.insert("arch", h.arch.clone());
            h.active.as_ref().map(name)
        }
        Uplink::Status(s) => {
            m(
                "online",
                f64::from(u8::from(s.presence == Presence::Online)),
            );
            m("uptime_s", s.uptime_s as f64);
            s.active.as_ref().map(name)
        }
        Uplink::Telemetry(t) => {
            m("window_start_ms", t.window_start_ms as f64);
            m("window_end_ms", t.window_end_ms as f64);
            m("inferences", t.inferences as f64);
            m("errors", t.errors as f64);
            m("data_quality_errors", t.data_quality_errors as f64);
            let n = t.latency.total();
            if n > 0 {
                m("latency_mean_ms", t.latency.sum_us as f64 / n as f64 / 1e3);
            }
            if let Some(p) = t.latency.quantile_upper_us(0.5) {
                m("latency_p50_ms", p as f64 / 1e3);
            }
            if let Some(p) = t.latency.quantile_upper_us(0.99) {
                m("latency_p99_ms", p as f64 / 1e3);
            }
            let s = &t.system;
            // Unknown facts are left out, never written as 0.
            if let Some(c) = s.cpu() {
                m("cpu_percent", f64::from(c));
            }
            if let Some((used, _)) = s.memory() {
                m("mem_used_bytes", used as f64);
            }
            m("agent_rss_bytes", s.agent_rss_bytes as f64);
            m("disk_free_bytes", s.disk_free_bytes as f64);
            if let Some(c) = s.temperature_c {
                m("temperature_c", f64::from(c));
            }
            m("spool_dropped", t.spool_dropped as f64);
            t.model.as_ref().map(name)
        }
        Uplink::Progress(p) => {
            m("command_seq", p.command_seq as f64);
            m("chunks_done", f64::from(p.chunks_done));
            m("chunks_total", f64::from(p.chunks_total));
            info.insert("phase", format!("{:?}", p.phase).to_lowercase());
            if let Some(d) = &p.detail {
                info.insert("detail", d.clone());
            }
            p.model.as_ref().map(name)
        }
        Uplink::ChunkRequest(c) => {
            m("chunks", c.indices.len() as f64);
            None
        }
        Uplink::Shadow(s) => {
            m("compared", s.compared as f64);
            m("agreed", s.agreed as f64);
            m("candidate_errors", s.candidate_errors as f64);
            info.insert("candidate", name(&s.candidate));
            Some(name(&s.active))
        }
        Uplink::Drift(d) => {
            m("window_start_ms", d.window_start_ms as f64);
            m("window_end_ms", d.window_end_ms as f64);
            m("features", d.features.len() as f64);
            m("predictions", d.predictions.iter().sum::<u64>() as f64);
            Some(name(&d.model))
        }
        Uplink::Samples(s) => {
            m("samples", s.samples.len() as f64);
            Some(name(&s.model))
        }
        Uplink::Labels(l) => {
            m("labels", l.labels.len() as f64);
            None
        }
        Uplink::KeyringRefused(k) => {
            m("offered_version", k.offered_version as f64);
            info.insert("reason", k.reason.clone());
            None
        }
        Uplink::Models(r) => {
            let (disk, memory, active) = slot_totals(r);
            m("models", r.slots.len() as f64);
            m("disk_bytes", disk);
            m("memory_bytes", memory);
            info.insert("active", active);
            None
        }
        Uplink::Runtime(r) => {
            runtime_info(r, &mut info);
            None
        }
    };
    let record = Record {
        schema: SCHEMA_VERSION,
        ts: ts_ms,
        device: device.as_str(),
        seq,
        kind: msg.kind().as_str(),
        model,
        metrics,
        info,
    };
    // Serializing a struct of strings, numbers and string maps cannot fail.
    serde_json::to_vec(&record).unwrap_or_default()
}

#[derive(Serialize)]
struct Registration<'a> {
    schema: u32,
    ts: u64,
    device: &'a str,
    kind: &'static str,
    model: Option<&'a str>,
    labels: &'a BTreeMap<String, String>,
}

/// A device's registration, published retained on
/// [`crate::topics::json_registration`] so a reader that subscribes later learns every
/// device's labels and model at once.
pub fn registration_json(
    device: &DeviceId,
    ts_ms: u64,
    labels: &BTreeMap<String, String>,
    model: Option<&str>,
) -> Vec<u8> {
    let r = Registration {
        schema: SCHEMA_VERSION,
        ts: ts_ms,
        device: device.as_str(),
        kind: "registration",
        model,
        labels,
    };
    serde_json::to_vec(&r).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{LabelBatch, LatencyHistogram, SystemFacts, TelemetryBatch};

    #[test]
    fn telemetry_is_one_flat_object_with_numbers_in_metrics() {
        let mut latency = LatencyHistogram::new();
        for us in [800, 900, 1_900] {
            latency.record(us);
        }
        let t = Uplink::Telemetry(TelemetryBatch {
            window_start_ms: 1_000,
            window_end_ms: 11_000,
            model: Some(ModelRef {
                name: "dense".into(),
                version: "1.0.0".into(),
                digest: [0; 32],
            }),
            inferences: 3,
            errors: 1,
            data_quality_errors: 0,
            latency,
            outputs: vec![2, 1],
            system: SystemFacts {
                cpu_percent: 12.5,
                mem_used_bytes: 1,
                mem_total_bytes: 2,
                agent_rss_bytes: 3,
                temperature_c: None,
                disk_free_bytes: 4,
                disk_total_bytes: 5,
            },
            spool_dropped: 0,
        });
        let dev = DeviceId::new("gw-01").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&uplink_json(&dev, 7, 42, &t)).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["ts"], 42);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["device"], "gw-01");
        assert_eq!(v["kind"], "telemetry");
        assert_eq!(v["model"], "dense@1.0.0");
        assert_eq!(v["metrics"]["inferences"], 3.0);
        assert_eq!(v["metrics"]["errors"], 1.0);
        assert_eq!(v["metrics"]["latency_p99_ms"], 2.0);
        assert_eq!(v["metrics"]["cpu_percent"], 12.5);
        assert_eq!(v["metrics"]["mem_used_bytes"], 1.0);
        assert!(v.get("info").is_none());
        assert!(v["metrics"]
            .as_object()
            .unwrap()
            .values()
            .all(serde_json::Value::is_number));

        // A device that cannot read its host's CPU and memory (hidden /proc): left out,
        // never written as 0 or -1.
        let Uplink::Telemetry(mut hidden) = t else {
            unreachable!()
        };
        hidden.system.cpu_percent = SystemFacts::CPU_UNKNOWN;
        hidden.system.mem_used_bytes = 0;
        hidden.system.mem_total_bytes = 0;
        assert_eq!((hidden.system.cpu(), hidden.system.memory()), (None, None));
        let v: serde_json::Value =
            serde_json::from_slice(&uplink_json(&dev, 8, 43, &Uplink::Telemetry(hidden))).unwrap();
        assert!(v["metrics"].get("cpu_percent").is_none(), "{v}");
        assert!(v["metrics"].get("mem_used_bytes").is_none(), "{v}");
        assert_eq!(v["metrics"]["agent_rss_bytes"], 3.0);
    }

    #[test]
    fn an_uplink_without_a_model_says_null() {
        let dev = DeviceId::new("gw-01").unwrap();
        let l = Uplink::Labels(LabelBatch { labels: vec![] });
        let v: serde_json::Value = serde_json::from_slice(&uplink_json(&dev, 8, 1, &l)).unwrap();
        assert!(v["model"].is_null());
        assert_eq!(v["kind"], "labels");
        assert_eq!(v["metrics"]["labels"], 0.0);
    }
}
