//! Ingest: [`Store::apply_batch`] stores a batch of authenticated uplink frames in one
//! transaction, one helper per uplink kind. Every table keyed by (device, seq) is written
//! with `INSERT OR IGNORE`, so a frame an agent re-sends (its ack was lost) is recognised
//! and not stored twice.

use std::collections::HashMap;

use drover_protocol::envelope::UplinkFrame;
use drover_protocol::messages::{
    DriftReport, Hello, LabelBatch, ModelRef, Phase, Presence, Progress, SampleBatch, ShadowReport,
    Status, TelemetryBatch, Uplink,
};
use drover_protocol::topics::hex32;
use drover_protocol::DeviceId;
use rusqlite::{params, Connection};

use super::{i, pack_f32s, pack_u64s, Result, Store};

/// An authenticated uplink frame waiting to be stored.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub frame: UplinkFrame,
    pub received_at_ms: u64,
}

/// What one batch did, per device.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Sequence numbers now durably stored (including duplicates stored earlier), per device.
    pub stored: HashMap<DeviceId, Vec<u64>>,
    /// Rows newly written (duplicates excluded).
    pub new_rows: u64,
    pub duplicates: u64,
}

const HOUR_MS: u64 = 3_600_000;

/// One device-hour of telemetry, summed over the batch before it is added to the rollup.
#[derive(Default)]
struct Rollup {
    windows: u64,
    inferences: u64,
    errors: u64,
    dq: u64,
    latency_sum: u64,
    cpu_sum: f64,
    mem_max: u64,
}

/// What the batch learned about each device: highest sequence, latest receipt, and
/// whether its last frame in this batch said it went offline (a last will).
#[derive(Clone, Copy, Default)]
struct Seen {
    seq: u64,
    at_ms: u64,
    offline: bool,
}

/// Where a frame's rows go: its device and sequence, and when it was received.
struct Key<'a> {
    dev: &'a str,
    seq: i64,
    recv: i64,
}

/// Progress phases as stored (`progress.phase`, `devices.last_phase`).
pub fn phase_text(p: Phase) -> &'static str {
    match p {
        Phase::Received => "received",
        Phase::Downloading => "downloading",
        Phase::Verified => "verified",
        Phase::SelfTested => "self-tested",
        Phase::Active => "active",
        Phase::Healthy => "healthy",
        Phase::Failed => "failed",
        Phase::RolledBack => "rolled-back",
        Phase::Refused => "refused",
        Phase::Done => "done",
        Phase::Shadowing => "shadowing",
    }
}

pub(super) fn parse_phase(s: &str) -> Option<Phase> {
    [
        Phase::Received,
        Phase::Downloading,
        Phase::Verified,
        Phase::SelfTested,
        Phase::Active,
        Phase::Healthy,
        Phase::Failed,
        Phase::RolledBack,
        Phase::Refused,
        Phase::Done,
        Phase::Shadowing,
    ]
    .into_iter()
    .find(|p| phase_text(*p) == s)
}

/// A model as the device columns hold it: `name@version` and the digest in hex.
fn model_text(m: &Option<ModelRef>) -> (Option<String>, Option<String>) {
    match m {
        Some(m) => (
            Some(format!("{}@{}", m.name, m.version)),
            Some(hex32(&m.digest)),
        ),
        None => (None, None),
    }
}

impl Store {
    /// Stores a batch of authenticated uplink frames in one transaction. Duplicates (same
    /// device and sequence) are recognised and not stored twice.
    pub fn apply_batch(&mut self, batch: &[Inbound]) -> Result<BatchOutcome> {
        let mut out = BatchOutcome::default();
        let tx = self.write_tx()?;
        let mut seen: HashMap<&DeviceId, Seen> = HashMap::new();
        let mut rollups: HashMap<(&str, u64), Rollup> = HashMap::new();
        for item in batch {
            let f = &item.frame;
            let s = seen.entry(&f.device).or_default();
            s.seq = s.seq.max(f.seq);
            s.at_ms = s.at_ms.max(item.received_at_ms);
            s.offline = matches!(&f.msg, Uplink::Status(s) if s.presence == Presence::Offline);
            if store_frame(&tx, item, &mut rollups)? {
                out.new_rows += 1;
            } else {
                out.duplicates += 1;
            }
            out.stored.entry(f.device.clone()).or_default().push(f.seq);
        }
        add_rollups(&tx, &rollups)?;
        mark_seen(&tx, &seen)?;
        tx.commit()?;
        Ok(out)
    }
}

/// Stores one frame; false when it was stored before (a duplicate).
fn store_frame<'a>(
    tx: &Connection,
    item: &'a Inbound,
    rollups: &mut HashMap<(&'a str, u64), Rollup>,
) -> Result<bool> {
    let f = &item.frame;
    let at = Key {
        dev: f.device.as_str(),
        seq: i(f.seq),
        recv: i(item.received_at_ms),
    };
    match &f.msg {
        Uplink::Telemetry(t) => {
            let new = insert_telemetry(tx, &at, t)?;
            if new {
                add_to_rollup(rollups, at.dev, t);
            }
            Ok(new)
        }
        Uplink::Hello(h) => update_hello(tx, at.dev, h),
        Uplink::Status(s) => update_status(tx, at.dev, s),
        Uplink::Progress(p) => insert_progress(tx, &at, p),
        Uplink::Shadow(s) => insert_shadow(tx, &at, s),
        Uplink::Drift(d) => insert_drift(tx, &at, d),
        Uplink::Samples(s) => insert_samples(tx, &at, s),
        Uplink::Labels(l) => insert_labels(tx, &at, l),
        Uplink::Models(r) => super::slots::update_models(tx, at.dev, at.seq, r),
        Uplink::Runtime(r) => super::slots::update_runtime(tx, at.dev, r),
        // Not stored: served or logged by the caller.
        Uplink::ChunkRequest(_) | Uplink::KeyringRefused(_) => Ok(true),
    }
}

fn insert_telemetry(tx: &Connection, at: &Key<'_>, t: &TelemetryBatch) -> Result<bool> {
    let mut ins = tx.prepare_cached(
        "INSERT OR IGNORE INTO telemetry VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
    )?;
    let n = ins.execute(params![
        at.dev,
        at.seq,
        at.recv,
        i(t.window_start_ms),
        i(t.window_end_ms),
        t.model.as_ref().map(|m| hex32(&m.digest)),
        i(t.inferences),
        i(t.errors),
        i(t.data_quality_errors),
        i(t.latency.sum_us),
        pack_u64s(&t.latency.counts),
        pack_u64s(&t.outputs),
        f64::from(t.system.cpu_percent),
        i(t.system.mem_used_bytes),
        i(t.system.mem_total_bytes),
        i(t.system.agent_rss_bytes),
        t.system.temperature_c.map(f64::from),
        i(t.system.disk_free_bytes),
        i(t.system.disk_total_bytes),
        i(t.spool_dropped),
    ])?;
    Ok(n == 1)
}

/// Adds a newly stored telemetry window to its device-hour.
fn add_to_rollup<'a>(
    rollups: &mut HashMap<(&'a str, u64), Rollup>,
    dev: &'a str,
    t: &TelemetryBatch,
) {
    let r = rollups
        .entry((dev, t.window_start_ms / HOUR_MS * HOUR_MS))
        .or_default();
    r.windows += 1;
    r.inferences = r.inferences.saturating_add(t.inferences);
    r.errors = r.errors.saturating_add(t.errors);
    r.dq = r.dq.saturating_add(t.data_quality_errors);
    r.latency_sum = r.latency_sum.saturating_add(t.latency.sum_us);
    // Unknown host facts (a hidden /proc) add nothing, rather than a negative CPU use.
    r.cpu_sum += t.system.cpu().map_or(0.0, f64::from);
    r.mem_max = r.mem_max.max(t.system.memory().map_or(0, |(used, _)| used));
}

fn update_hello(tx: &Connection, dev: &str, h: &Hello) -> Result<bool> {
    let (am, ad) = model_text(&h.active);
    let (sm, sd) = model_text(&h.staged);
    // The agent's own labels are kept apart from the operator's: shown, never selected
    // on (docs/FLEET.md). The frame size limit bounds them. Its runtime is forgotten until
    // it reports it again in this session (an agent may have been replaced by an older one).
    let agent_labels = serde_json::to_string(&h.labels).unwrap_or_else(|_| "{}".into());
    tx.execute(
        "UPDATE devices SET arch=?2, os=?3, agent_version=?4, online=1, active_model=?5, active_digest=?6, staged_model=?7, staged_digest=?8, reported_command_seq=max(reported_command_seq, ?9), agent_labels=?10, runtime=NULL WHERE id=?1",
        params![dev, h.arch, h.os, h.agent_version, am, ad, sm, sd, i(h.last_command_seq), agent_labels],
    )?;
    Ok(true)
}

fn update_status(tx: &Connection, dev: &str, s: &Status) -> Result<bool> {
    let (am, ad) = model_text(&s.active);
    let (sm, sd) = model_text(&s.staged);
    let online = s.presence == Presence::Online;
    tx.execute(
        "UPDATE devices SET online=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest), staged_model=?5, staged_digest=?6 WHERE id=?1",
        params![dev, online, am, ad, sm, sd],
    )?;
    Ok(true)
}

/// Stores a progress report and, when it is new, moves the device's phase and models.
fn insert_progress(tx: &Connection, at: &Key<'_>, p: &Progress) -> Result<bool> {
    let (m, d) = model_text(&p.model);
    let phase = phase_text(p.phase);
    let n = tx.execute(
        "INSERT OR IGNORE INTO progress VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
        params![
            at.dev,
            at.seq,
            at.recv,
            i(p.command_seq),
            phase,
            d,
            p.chunks_done,
            p.chunks_total,
            p.detail
        ],
    )?;
    if n != 1 {
        return Ok(false);
    }
    match p.phase {
        Phase::Active | Phase::Healthy => tx.execute(
            "UPDATE devices SET last_phase=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest), staged_model=NULL, staged_digest=NULL WHERE id=?1",
            params![at.dev, phase, m, d],
        )?,
        // The model the device returned to (its report names it).
        Phase::RolledBack | Phase::Done => tx.execute(
            "UPDATE devices SET last_phase=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest) WHERE id=?1",
            params![at.dev, phase, m, d],
        )?,
        Phase::Verified | Phase::SelfTested | Phase::Shadowing => tx.execute(
            "UPDATE devices SET last_phase=?2, staged_model=coalesce(?3, staged_model), staged_digest=coalesce(?4, staged_digest) WHERE id=?1",
            params![at.dev, phase, m, d],
        )?,
        _ => tx.execute(
            "UPDATE devices SET last_phase=?2 WHERE id=?1",
            params![at.dev, phase],
        )?,
    };
    Ok(true)
}

fn insert_shadow(tx: &Connection, at: &Key<'_>, s: &ShadowReport) -> Result<bool> {
    Ok(tx.execute(
        "INSERT OR IGNORE INTO shadow (device, seq, received_at_ms, active_digest, candidate_digest, compared, agreed, candidate_errors, active_latency, candidate_latency) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
        params![
            at.dev,
            at.seq,
            at.recv,
            hex32(&s.active.digest),
            hex32(&s.candidate.digest),
            i(s.compared),
            i(s.agreed),
            i(s.candidate_errors),
            pack_u64s(&s.active_latency.counts),
            pack_u64s(&s.candidate_latency.counts)
        ],
    )? == 1)
}

/// Stores a drift sketch as JSON (`drift.rs` reads it back).
fn insert_drift(tx: &Connection, at: &Key<'_>, d: &DriftReport) -> Result<bool> {
    let sketch = serde_json::json!({
        "features": d.features.iter().map(|s| serde_json::json!({
            "counts": s.counts, "missing": s.missing, "out_of_range": s.out_of_range
        })).collect::<Vec<_>>(),
        "predictions": d.predictions,
    });
    Ok(tx.execute(
        "INSERT OR IGNORE INTO drift VALUES (?1,?2,?3,?4,?5,?6,?7)",
        params![
            at.dev,
            at.seq,
            at.recv,
            hex32(&d.model.digest),
            i(d.window_start_ms),
            i(d.window_end_ms),
            sketch.to_string()
        ],
    )? == 1)
}

/// Stores every sample of the frame; new when any of them was.
fn insert_samples(tx: &Connection, at: &Key<'_>, s: &SampleBatch) -> Result<bool> {
    let mut any = false;
    for (idx, x) in s.samples.iter().enumerate() {
        any |= tx.execute(
            "INSERT OR IGNORE INTO samples VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            params![
                at.dev,
                at.seq,
                idx as i64,
                hex32(&s.model.digest),
                i(x.request_id),
                i(x.at_ms),
                pack_f32s(&x.features),
                pack_f32s(&x.prediction)
            ],
        )? == 1;
    }
    Ok(any)
}

/// Stores every label of the frame; new when any of them was.
fn insert_labels(tx: &Connection, at: &Key<'_>, l: &LabelBatch) -> Result<bool> {
    let mut any = false;
    for (idx, x) in l.labels.iter().enumerate() {
        any |= tx.execute(
            "INSERT OR IGNORE INTO labels VALUES (?1,?2,?3,?4,?5,?6)",
            params![
                at.dev,
                at.seq,
                idx as i64,
                i(x.request_id),
                i(x.at_ms),
                x.value
            ],
        )? == 1;
    }
    Ok(any)
}

/// Adds the batch's device-hours to the hourly rollup (kept past raw-telemetry retention).
fn add_rollups(tx: &Connection, rollups: &HashMap<(&str, u64), Rollup>) -> Result<()> {
    let mut up = tx.prepare_cached(
        "INSERT INTO telemetry_rollup VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)
         ON CONFLICT (device, bucket_ms) DO UPDATE SET
           windows = windows + excluded.windows,
           inferences = inferences + excluded.inferences,
           errors = errors + excluded.errors,
           data_quality_errors = data_quality_errors + excluded.data_quality_errors,
           latency_sum_us = latency_sum_us + excluded.latency_sum_us,
           cpu_percent_sum = cpu_percent_sum + excluded.cpu_percent_sum,
           mem_used_max = max(mem_used_max, excluded.mem_used_max)",
    )?;
    for ((dev, bucket), r) in rollups {
        up.execute(params![
            dev,
            i(*bucket),
            i(r.windows),
            i(r.inferences),
            i(r.errors),
            i(r.dq),
            i(r.latency_sum),
            r.cpu_sum,
            i(r.mem_max)
        ])?;
    }
    Ok(())
}

/// Raises each device's uplink high-water mark and last-seen time, and sets presence.
fn mark_seen(tx: &Connection, seen: &HashMap<&DeviceId, Seen>) -> Result<()> {
    let mut up = tx.prepare_cached(
        // A device that speaks is online, even if it never said hello to this
        // process (it stayed connected to an external broker across a restart).
        "UPDATE devices SET max_uplink_seq = max(max_uplink_seq, ?2), last_seen_ms = max(coalesce(last_seen_ms, 0), ?3), online = CASE WHEN ?4 THEN 0 ELSE 1 END WHERE id = ?1 AND decommissioned = 0",
    )?;
    for (dev, s) in seen {
        up.execute(params![dev.as_str(), i(s.seq), i(s.at_ms), s.offline])?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use drover_protocol::messages::{FeatureSketch, Label, LatencyHistogram, Sample, SystemFacts};
    use drover_protocol::DeviceKey;

    use super::*;

    pub(crate) fn frame(dev: &str, seq: u64, received_at_ms: u64, msg: Uplink) -> Inbound {
        Inbound {
            frame: UplinkFrame {
                device: DeviceId::new(dev).unwrap(),
                seq,
                sent_at_ms: 1,
                msg,
            },
            received_at_ms,
        }
    }

    pub(crate) fn telemetry(model: Option<ModelRef>, seq: u64) -> Uplink {
        let mut latency = LatencyHistogram::new();
        latency.counts[3] = 10;
        Uplink::Telemetry(TelemetryBatch {
            window_start_ms: 1000 * seq,
            window_end_ms: 1000 * seq + 999,
            model,
            inferences: 10,
            errors: 1,
            data_quality_errors: 0,
            latency,
            outputs: vec![1, 2],
            system: SystemFacts::default(),
            spool_dropped: 0,
        })
    }

    pub(crate) fn enrolled(devices: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        for (n, d) in devices.iter().enumerate() {
            let labels = BTreeMap::from([("site".to_owned(), format!("s{n}"))]);
            s.enroll_device(&DeviceId::new(*d).unwrap(), &DeviceKey([1; 32]), &labels, 1)
                .unwrap();
        }
        (dir, s)
    }

    pub(crate) fn model_ref(digest: u8) -> ModelRef {
        ModelRef {
            name: "cls".into(),
            version: format!("1.0.{digest}"),
            digest: [digest; 32],
        }
    }

    #[test]
    fn migrations_run_once_and_telemetry_is_deduplicated_by_device_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let dev = DeviceId::new("gw-1").unwrap();
        let tel = |seq| frame("gw-1", seq, 5, telemetry(None, seq));
        {
            let mut s = Store::open(&path).unwrap();
            s.enroll_device(&dev, &DeviceKey([1; 32]), &BTreeMap::new(), 1)
                .unwrap();
            let o = s.apply_batch(&[tel(1), tel(2)]).unwrap();
            assert_eq!((o.new_rows, o.duplicates), (2, 0));
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(
            s.schema_version().unwrap(),
            super::super::MIGRATIONS.len() as i64
        );
        let o = s.apply_batch(&[tel(2), tel(3)]).unwrap();
        assert_eq!((o.new_rows, o.duplicates), (1, 1));
        assert_eq!(o.stored[&dev], vec![2, 3]);
        assert_eq!(s.telemetry_count().unwrap(), 3);
        assert_eq!(s.rollup_windows("gw-1").unwrap(), 3);
        assert_eq!(s.device("gw-1").unwrap().unwrap().max_uplink_seq, 3);
    }

    #[test]
    fn agent_labels_from_a_hello_are_kept_apart_from_the_operators() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        let hello = Uplink::Hello(Hello {
            agent_version: "0.1.0".into(),
            protocol_min: 1,
            protocol_max: 1,
            arch: "aarch64".into(),
            os: "linux".into(),
            labels: BTreeMap::from([("site".to_owned(), "claimed".to_owned())]),
            active: None,
            staged: None,
            last_command_seq: 0,
            keyring_version: 1,
        });
        s.apply_batch(&[frame("gw-1", 1, 10, hello)]).unwrap();
        let d = s.device("gw-1").unwrap().unwrap();
        // Selectors read `labels` only.
        assert_eq!(d.agent_labels["site"], "claimed");
        assert_eq!(d.labels["site"], "s0");
    }

    #[test]
    fn each_uplink_kind_lands_in_its_table_once_and_moves_the_device() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        let m = model_ref(4);
        let hello = Uplink::Hello(Hello {
            agent_version: "0.1.0".into(),
            protocol_min: 1,
            protocol_max: 1,
            arch: "aarch64".into(),
            os: "linux".into(),
            labels: BTreeMap::new(),
            active: Some(model_ref(3)),
            staged: None,
            last_command_seq: 9,
            keyring_version: 1,
        });
        let progress = |phase| {
            Uplink::Progress(Progress {
                command_seq: 10,
                command_digest: [8; 32],
                phase,
                model: Some(m.clone()),
                chunks_done: 4,
                chunks_total: 4,
                detail: None,
            })
        };
        let samples = Uplink::Samples(SampleBatch {
            model: m.clone(),
            samples: vec![
                Sample {
                    request_id: 1,
                    at_ms: 100,
                    features: vec![0.5, 1.5],
                    prediction: vec![1.0],
                },
                Sample {
                    request_id: 2,
                    at_ms: 200,
                    features: vec![2.5, 3.5],
                    prediction: vec![0.0],
                },
            ],
        });
        let labels = Uplink::Labels(LabelBatch {
            labels: vec![Label {
                request_id: 1,
                at_ms: 150,
                value: 1.0,
            }],
        });
        let drift = Uplink::Drift(DriftReport {
            model: m.clone(),
            window_start_ms: 0,
            window_end_ms: 1000,
            features: vec![FeatureSketch {
                counts: vec![1, 2],
                missing: 3,
                out_of_range: 4,
            }],
            predictions: vec![5, 6],
        });
        let batch = [
            frame("gw-1", 1, 10, hello),
            frame("gw-1", 2, 11, progress(Phase::Verified)),
            frame("gw-1", 3, 12, samples),
            frame("gw-1", 4, 13, labels),
            frame("gw-1", 5, 14, drift),
            frame("gw-1", 6, 15, progress(Phase::Active)),
        ];
        let o = s.apply_batch(&batch).unwrap();
        assert_eq!((o.new_rows, o.duplicates), (6, 0));

        let d = s.device("gw-1").unwrap().unwrap();
        assert_eq!(d.arch.as_deref(), Some("aarch64"));
        assert_eq!(d.reported_command_seq, 9);
        assert_eq!(d.last_phase.as_deref(), Some("active"));
        assert_eq!(d.active_model.as_deref(), Some("cls@1.0.4"));
        assert_eq!(
            (d.staged_model, d.max_uplink_seq, d.last_seen_ms),
            (None, 6, Some(15))
        );
        assert!(d.online);
        let p = s.progress_since(0).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].phase, p[1].phase),
            (Some(Phase::Verified), Some(Phase::Active))
        );
        assert_eq!(s.labels_since(0).unwrap(), 1);
        let ls = s.labeled_samples(0, "cls").unwrap();
        assert!(
            ls.is_empty(),
            "model cls@1.0.4 is not published: samples join models"
        );
        assert_eq!(s.drift_sketches(0, 2000).unwrap().len(), 1);

        // The same frames again (acks lost): only the hello, which is state, not a
        // record, is applied again; every record is recognised as stored.
        let o = s.apply_batch(&batch).unwrap();
        assert_eq!((o.new_rows, o.duplicates), (1, 5));
        assert_eq!(
            o.stored[&DeviceId::new("gw-1").unwrap()],
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(s.progress_since(0).unwrap().len(), 2);
        assert_eq!(s.labels_since(0).unwrap(), 1);
        assert_eq!(s.drift_sketches(0, 2000).unwrap().len(), 1);
        // A last will takes the device offline.
        let bye = Uplink::Status(Status {
            presence: Presence::Offline,
            active: None,
            staged: None,
            shadow: None,
            uptime_s: 5,
        });
        s.apply_batch(&[frame("gw-1", 7, 20, bye)]).unwrap();
        assert!(!s.device("gw-1").unwrap().unwrap().online);
    }

    #[test]
    fn the_reason_a_device_gave_up_a_deploy_is_its_last_detail() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        assert_eq!(s.device("gw-1").unwrap().unwrap().last_detail, None);
        let report = |phase, detail: Option<&str>| {
            Uplink::Progress(Progress {
                command_seq: 11,
                command_digest: [9; 32],
                phase,
                model: Some(model_ref(4)),
                chunks_done: 0,
                chunks_total: 4,
                detail: detail.map(str::to_owned),
            })
        };
        let why = "failed after 5 attempts: chunk 2: chunk 2 hash mismatch";
        s.apply_batch(&[
            frame("gw-1", 1, 10, report(Phase::Downloading, None)),
            frame("gw-1", 2, 11, report(Phase::Failed, Some(why))),
        ])
        .unwrap();
        let d = s.device("gw-1").unwrap().unwrap();
        assert_eq!(
            (d.last_phase.as_deref(), d.last_detail.as_deref()),
            (Some("failed"), Some(why))
        );
    }
}
