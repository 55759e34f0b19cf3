//! The evaluation gate: candidate and champion scored with tract on the same held-out
//! rows, the policy's decision, and registration of an accepted candidate.

use std::path::Path;

use drover_protocol::manifest::{self, Lineage, TensorData, TensorValue};
use drover_protocol::trust::SecretKey;
use drover_runtime::Model;

use super::*;
use crate::jobs::Row;
use crate::registry::{self, PublishRequest};
use crate::store::{ModelRow, Store};

// ---- evaluation ----

/// A model's scores on the held-out rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// The main metric: accuracy over every held-out row.
    pub accuracy: f64,
    /// Accuracy over the held-out rows that came from the fleet.
    pub recent_accuracy: Option<f64>,
    pub rows: u64,
    pub recent_rows: u64,
}

/// The stored form of [`Metrics`] in a job row's `metrics` JSON (shown by `drover train`),
/// written out field by field so the struct can change without changing the record.
pub fn metrics_json(m: &Metrics) -> serde_json::Value {
    serde_json::json!({
        "accuracy": m.accuracy,
        "recent_accuracy": m.recent_accuracy,
        "rows": m.rows,
        "recent_rows": m.recent_rows,
    })
}

/// The predicted class per output row: an integer output is the class, else the argmax of
/// the first float output (a single score is a probability split at 0.5).
fn classes_of(outputs: &[TensorValue], rows: usize) -> Option<Vec<u32>> {
    if let Some(TensorData::I64(v)) = outputs
        .iter()
        .map(|o| &o.data)
        .find(|d| matches!(d, TensorData::I64(_)))
    {
        return (v.len() == rows).then(|| v.iter().map(|x| (*x).max(0) as u32).collect());
    }
    let TensorData::F32(v) = &outputs.first()?.data else {
        return None;
    };
    if rows == 0 || v.len() % rows != 0 {
        return None;
    }
    let c = v.len() / rows;
    Some(
        v.chunks(c)
            .map(|r| {
                if c == 1 {
                    u32::from(r[0] >= 0.5)
                } else {
                    crate::trainer::argmax(r)
                }
            })
            .collect(),
    )
}

/// Scores an ONNX model on held-out rows with tract (the runtime devices use).
pub fn evaluate(model: &[u8], rows: &[Row]) -> Result<Metrics> {
    let m = Model::load(model).map_err(|e| ContinuousError::Eval(format!("cannot load: {e}")))?;
    let spec = m
        .inputs()
        .first()
        .ok_or_else(|| ContinuousError::Eval("model has no input".into()))?;
    let width = rows.first().map_or(0, |r| r.features.len());
    let mut right = 0u64;
    let mut recent_right = 0u64;
    let mut recent = 0u64;
    // Batches keep memory flat on large held-out sets.
    for chunk in rows.chunks(1024) {
        let data: Vec<f32> = chunk.iter().flat_map(|r| r.features.clone()).collect();
        let input = TensorValue {
            name: spec.name.clone(),
            shape: vec![chunk.len() as u64, width as u64],
            data: TensorData::F32(data),
        };
        let out = m
            .run(&[input])
            .map_err(|e| ContinuousError::Eval(format!("cannot run on held-out rows: {e}")))?;
        let classes = classes_of(&out, chunk.len())
            .ok_or_else(|| ContinuousError::Eval("model output is not a class per row".into()))?;
        for (r, c) in chunk.iter().zip(classes) {
            let ok = u64::from(r.label == c);
            right += ok;
            if r.recent {
                recent += 1;
                recent_right += ok;
            }
        }
    }
    let n = rows.len() as u64;
    Ok(Metrics {
        accuracy: if n == 0 { 0.0 } else { right as f64 / n as f64 },
        recent_accuracy: (recent > 0).then(|| recent_right as f64 / recent as f64),
        rows: n,
        recent_rows: recent,
    })
}

/// The gate: `Ok` to publish, or the reason not to.
pub fn decide(
    gate: &GatePolicy,
    candidate: &Metrics,
    champion: Option<&Metrics>,
) -> std::result::Result<(), String> {
    let Some(champ) = champion else {
        return Ok(());
    };
    if candidate.accuracy + 1e-12 < champ.accuracy - gate.max_regression {
        return Err(format!(
            "accuracy on held-out data {:.4} is worse than the champion's {:.4} (allowed regression {})",
            candidate.accuracy, champ.accuracy, gate.max_regression
        ));
    }
    match (candidate.recent_accuracy, champ.recent_accuracy) {
        (Some(c), Some(p)) if c + 1e-12 < p + gate.min_recent_improvement => Err(format!(
            "accuracy on recent held-out data {c:.4} does not beat the champion's {p:.4} by the required {}",
            gate.min_recent_improvement
        )),
        (None, _) | (_, None) if gate.min_recent_improvement > 0.0 => Err(
            "no recent (fleet) rows in the held-out data to show an improvement on".to_string(),
        ),
        _ => Ok(()),
    }
}

// ---- registration ----

/// An accepted candidate, registered: what the rollout engine needs to ship it.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub model: ModelRow,
    /// The policy's rollout plan template (shadow phase and canary first), if it has one.
    pub rollout_plan: Option<toml::Table>,
}

/// The champion of `model` among published rows: its latest version (semver, then
/// publication time), the one a candidate must beat.
pub fn champion(rows: Vec<ModelRow>, model: &str) -> Option<ModelRow> {
    rows.into_iter()
        .filter(|m| m.name == model)
        .max_by_key(|m| (manifest::parse_semver(&m.version), m.created_at_ms))
}

/// The next patch version after `v` (or `1.0.0` with no champion).
fn next_version(v: Option<&str>) -> String {
    match v.and_then(manifest::parse_semver) {
        Some((a, b, c)) => format!("{a}.{b}.{}", c + 1),
        None => "1.0.0".into(),
    }
}

/// Signs and registers an accepted candidate with its lineage; returns it with the
/// policy's rollout plan template. The lead's rollout engine takes it from here.
#[allow(clippy::too_many_arguments)]
pub fn on_candidate_accepted(
    store: &mut Store,
    models_dir: &Path,
    signing: &SecretKey,
    policy: &Policy,
    champion: Option<&ModelRow>,
    candidate: Vec<u8>,
    baseline_csv: String,
    lineage: Lineage,
    now_ms: u64,
) -> Result<Accepted> {
    let req = PublishRequest {
        name: policy.model.clone(),
        version: next_version(champion.map(|c| c.version.as_str())),
        model: candidate,
        baseline_csv: Some(baseline_csv),
        test_vectors: None,
        chunk_size: None,
        lineage,
        input_shapes: Vec::new(),
    };
    let model = registry::publish(store, models_dir, &req, signing, now_ms)?;
    Ok(Accepted {
        model,
        rollout_plan: policy.rollout.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_champion_is_the_latest_version_by_semver_not_by_text() {
        let row = |name: &str, version: &str, at: u64| ModelRow {
            digest: [0; 32],
            name: name.into(),
            version: version.into(),
            sha256: [0; 32],
            size: 0,
            chunk_size: 0,
            created_at_ms: at,
            key_id: String::new(),
            payload: Vec::new(),
            signature: Vec::new(),
            summary: String::new(),
        };
        let rows = vec![
            row("dense", "1.0.9", 3),
            row("dense", "1.0.10", 1),
            row("other", "9.0.0", 2),
        ];
        assert_eq!(champion(rows.clone(), "dense").unwrap().version, "1.0.10");
        assert!(champion(rows, "absent").is_none());
    }

    fn m(acc: f64, recent: Option<f64>) -> Metrics {
        Metrics {
            accuracy: acc,
            recent_accuracy: recent,
            rows: 100,
            recent_rows: 10,
        }
    }

    #[test]
    fn gate_refuses_a_worse_candidate_and_says_why() {
        let g = GatePolicy::default();
        let e = decide(&g, &m(0.80, Some(0.9)), Some(&m(0.85, Some(0.5))));
        assert!(e.is_err_and(|r| r.contains("worse than the champion's 0.8500")));
        let e = decide(&g, &m(0.90, Some(0.505)), Some(&m(0.85, Some(0.5))));
        assert!(e.is_err_and(|r| r.contains("does not beat")));
        assert_eq!(
            decide(&g, &m(0.90, Some(0.7)), Some(&m(0.85, Some(0.5)))),
            Ok(())
        );
        assert_eq!(decide(&g, &m(0.1, None), None), Ok(()));
    }

    #[test]
    fn versions_count_up_by_patch() {
        assert_eq!(next_version(Some("1.2.3")), "1.2.4");
        assert_eq!(next_version(None), "1.0.0");
    }
}
