//! What the drift loop reads beside the sketches: reference windows per (model, label
//! group), when a model's rollout completed healthy, and labelled predictions (a sampled
//! input's prediction joined with the label that came back for it) for accuracy.

use std::collections::BTreeMap;

use drover_protocol::messages::FeatureSketch;
use drover_protocol::topics::{hex32, parse_hex32};
use rusqlite::params;

use super::drift::parse_sketch;
use super::{i, u64_at, unpack_f32s, Result, Store, StoreError};

/// A reference window: merged bin counts of one label group's sketches for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct DriftReferenceRow {
    pub model_digest: [u8; 32],
    /// The group scope, e.g. `site=b`.
    pub scope: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub recorded_at_ms: u64,
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
}

/// One labelled prediction: what the model answered for a sampled input and the label
/// that came back for it, with the device's labels.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledPrediction {
    pub device: String,
    pub labels: BTreeMap<String, String>,
    pub model_digest: [u8; 32],
    /// When the label arrived (the window it counts in).
    pub at_ms: u64,
    pub prediction: Vec<f32>,
    pub label: f64,
}

fn digest(table: &'static str, hex: &str) -> Result<[u8; 32]> {
    parse_hex32(hex).ok_or_else(|| StoreError::Corrupt {
        table,
        detail: format!("bad digest {hex:?}"),
    })
}

impl Store {
    /// Every recorded reference window.
    pub fn drift_references(&self) -> Result<Vec<DriftReferenceRow>> {
        let mut st = self.conn.prepare(
            "SELECT model_digest, scope, window_start_ms, window_end_ms, recorded_at_ms, sketch
             FROM drift_references ORDER BY model_digest, scope",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                u64_at(r, 2)?,
                u64_at(r, 3)?,
                u64_at(r, 4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, scope, window_start_ms, window_end_ms, recorded_at_ms, sketch) = row?;
            let (features, predictions) = parse_sketch(&sketch)?;
            out.push(DriftReferenceRow {
                model_digest: digest("drift_references", &d)?,
                scope,
                window_start_ms,
                window_end_ms,
                recorded_at_ms,
                features,
                predictions,
            });
        }
        Ok(out)
    }

    /// Records reference windows; a (model, scope) that has one keeps it (the first
    /// healthy window after the rollout is the reference, later windows are judged by it).
    pub fn insert_drift_references(&mut self, refs: &[DriftReferenceRow]) -> Result<()> {
        let tx = self.write_tx()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO drift_references VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for r in refs {
                let sketch = serde_json::json!({
                    "features": r.features.iter().map(|f| serde_json::json!({
                        "counts": f.counts,
                        "missing": f.missing,
                        "out_of_range": f.out_of_range,
                    })).collect::<Vec<_>>(),
                    "predictions": r.predictions,
                });
                st.execute(params![
                    hex32(&r.model_digest),
                    r.scope,
                    i(r.window_start_ms),
                    i(r.window_end_ms),
                    i(r.recorded_at_ms),
                    sketch.to_string()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Models with a rollout that completed and still stands (not rolled back since),
    /// with when it first completed.
    pub fn completed_rollouts(&self) -> Result<BTreeMap<[u8; 32], u64>> {
        let mut st = self.conn.prepare(
            "SELECT r.model_digest, MIN(e.at_ms)
             FROM rollouts r JOIN rollout_events e ON e.rollout_id = r.id
             WHERE r.status = 'completed' AND e.kind = 'completed'
             GROUP BY r.model_digest",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, u64_at(r, 1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (d, at) = row?;
            out.insert(digest("rollouts", &d)?, at);
        }
        Ok(out)
    }

    /// Labels that arrived in `[from_ms, to_ms)`, each with the prediction of the latest
    /// sample it attaches to (same device and request id, taken before the label).
    /// Labels of inputs that were not sampled carry no prediction and are left out.
    pub fn labeled_predictions(&self, from_ms: u64, to_ms: u64) -> Result<Vec<LabeledPrediction>> {
        // SQLite takes the bare columns from the row holding MAX(s.at_ms).
        let mut st = self.conn.prepare(
            "SELECT l.device, v.labels, s.model_digest, l.at_ms, s.prediction, l.value,
                    MAX(s.at_ms)
             FROM labels l
             JOIN samples s ON s.device = l.device AND s.request_id = l.request_id
                           AND s.at_ms <= l.at_ms
             JOIN devices v ON v.id = l.device
             WHERE l.at_ms >= ?1 AND l.at_ms < ?2
             GROUP BY l.device, l.seq, l.idx
             ORDER BY l.at_ms, l.device, l.seq, l.idx",
        )?;
        let rows = st.query_map(params![i(from_ms), i(to_ms)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                u64_at(r, 3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, f64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, labels, d, at_ms, prediction, label) = row?;
            out.push(LabeledPrediction {
                device,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                model_digest: digest("samples", &d)?,
                at_ms,
                prediction: unpack_f32s(&prediction),
                label,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::messages::{Label, LabelBatch, Sample, SampleBatch, Uplink};

    use super::super::ingest::tests::{enrolled, frame, model_ref};
    use super::*;

    #[test]
    fn the_first_reference_of_a_model_and_group_is_kept() {
        let (_dir, mut s) = enrolled(&[]);
        let r = |end: u64, counts: Vec<u64>| DriftReferenceRow {
            model_digest: [4; 32],
            scope: "site=b".into(),
            window_start_ms: end - 10,
            window_end_ms: end,
            recorded_at_ms: end + 1,
            features: vec![FeatureSketch {
                counts,
                missing: 1,
                out_of_range: 2,
            }],
            predictions: vec![5, 6],
        };
        let first = r(100, vec![1, 2, 3]);
        s.insert_drift_references(std::slice::from_ref(&first))
            .unwrap();
        s.insert_drift_references(&[r(200, vec![9, 9, 9])]).unwrap();
        assert_eq!(s.drift_references().unwrap(), vec![first]);
        assert!(s.completed_rollouts().unwrap().is_empty());
    }

    #[test]
    fn a_label_takes_the_prediction_of_the_latest_sample_before_it() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        let sample = |request_id, at_ms, p: f32| Sample {
            request_id,
            at_ms,
            features: vec![0.0],
            prediction: vec![p],
        };
        // Request 1 was sampled twice (the agent restarted and numbered from 1 again).
        let samples = Uplink::Samples(SampleBatch {
            model: model_ref(3),
            samples: vec![
                sample(1, 100, 0.9),
                sample(1, 300, 0.1),
                sample(2, 310, 0.2),
            ],
        });
        let label = |request_id, at_ms, value| Label {
            request_id,
            at_ms,
            value,
        };
        let labels = Uplink::Labels(LabelBatch {
            labels: vec![label(1, 200, 1.0), label(1, 400, 0.0), label(7, 400, 1.0)],
        });
        s.apply_batch(&[
            frame("gw-1", 1, 500, samples),
            frame("gw-1", 2, 500, labels),
        ])
        .unwrap();
        let got = s.labeled_predictions(0, 1_000).unwrap();
        let seen: Vec<(u64, Vec<f32>, f64)> = got
            .iter()
            .map(|p| (p.at_ms, p.prediction.clone(), p.label))
            .collect();
        assert_eq!(
            seen,
            vec![(200, vec![0.9], 1.0), (400, vec![0.1], 0.0)],
            "request 7 was never sampled"
        );
        assert_eq!(got[0].labels["site"], "s0");
        assert_eq!(got[0].model_digest, [3; 32]);
        assert_eq!(s.labeled_predictions(200, 400).unwrap().len(), 1);
    }
}
