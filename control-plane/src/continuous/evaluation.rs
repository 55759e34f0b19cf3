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

/// A model's scores and which held-out rows it got right, so two models scored on the same
/// rows can be compared row by row.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub metrics: Metrics,
    /// Per held-out row: predicted its label.
    pub right: Vec<bool>,
    /// Per held-out row: came from the fleet (recent) rather than the base dataset.
    pub recent: Vec<bool>,
}

/// Scores an ONNX model on held-out rows with tract (the runtime devices use).
pub fn evaluate(model: &[u8], rows: &[Row]) -> Result<Scores> {
    let m = Model::load(model).map_err(|e| ContinuousError::Eval(format!("cannot load: {e}")))?;
    let spec = m
        .inputs()
        .first()
        .ok_or_else(|| ContinuousError::Eval("model has no input".into()))?;
    let width = rows.first().map_or(0, |r| r.features.len());
    let mut right = 0u64;
    let mut recent_right = 0u64;
    let mut recent = 0u64;
    let mut per_row = Vec::with_capacity(rows.len());
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
            per_row.push(r.label == c);
            let ok = u64::from(r.label == c);
            right += ok;
            if r.recent {
                recent += 1;
                recent_right += ok;
            }
        }
    }
    let n = rows.len() as u64;
    Ok(Scores {
        metrics: Metrics {
            accuracy: if n == 0 { 0.0 } else { right as f64 / n as f64 },
            recent_accuracy: (recent > 0).then(|| recent_right as f64 / recent as f64),
            rows: n,
            recent_rows: recent,
        },
        right: per_row,
        recent: rows.iter().map(|r| r.recent).collect(),
    })
}

/// The gate: `Ok` with the evidence to publish, or the reason not to. The candidate may
/// not be worse than the champion on every held-out row by more than `max_regression`,
/// and must beat it by `min_recent_improvement` at the policy's confidence (the paired
/// difference's lower bound, both models scored on the same rows) on the recent (fleet)
/// held-out rows, or on every held-out row when fewer than `min_recent_rows` are recent
/// (a margin of 0 requires no improvement).
pub fn decide(
    gate: &GatePolicy,
    candidate: &Scores,
    champion: Option<&Scores>,
) -> std::result::Result<String, String> {
    let Some(champ) = champion else {
        return Ok("first model of the policy: no champion to beat".into());
    };
    let (cand_m, champ_m) = (&candidate.metrics, &champ.metrics);
    if cand_m.accuracy + 1e-12 < champ_m.accuracy - gate.max_regression {
        return Err(format!(
            "accuracy on held-out data {:.4} is worse than the champion's {:.4} (allowed regression {})",
            cand_m.accuracy, champ_m.accuracy, gate.max_regression
        ));
    }
    let recent_rows = cand_m.recent_rows;
    let on_recent = recent_rows >= gate.min_recent_rows;
    let on = if on_recent {
        "recent (fleet) held-out rows".to_owned()
    } else {
        format!(
            "all held-out rows (only {recent_rows} recent fleet rows, fewer than min_recent_rows = {})",
            gate.min_recent_rows
        )
    };
    let select = |s: &Scores| -> Vec<bool> {
        let rows = s.right.iter().zip(&candidate.recent);
        rows.filter(|(_, recent)| !on_recent || **recent)
            .map(|(r, _)| *r)
            .collect()
    };
    let (c, p) = (select(candidate), select(champ));
    let Some(d) = crate::stats::paired_difference(&c, &p, gate.confidence) else {
        return Err(format!(
            "no {on} to compare the candidate with the champion on"
        ));
    };
    let rate = |v: &[bool]| v.iter().filter(|x| **x).count() as f64 / v.len().max(1) as f64;
    let evidence = format!(
        "on {on}, {} rows: candidate {:.4} vs champion {:.4}, difference {:+.4}, {:.0} % lower bound {:+.4} (required {:+.4})",
        d.rows,
        rate(&c),
        rate(&p),
        d.mean,
        gate.confidence * 100.0,
        d.lower_bound,
        gate.min_recent_improvement
    );
    // A margin of 0 asks for no improvement: the regression check above is the gate.
    if gate.min_recent_improvement > 0.0 && d.lower_bound + 1e-12 < gate.min_recent_improvement {
        return Err(format!(
            "does not beat the champion with enough confidence {evidence}"
        ));
    }
    Ok(evidence)
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
        // The fleet runs what the champion was shipped as: an ONNX champion means agents
        // that may not load compiled models yet.
        format: match champion.map(|c| manifest::Manifest::decode(&c.payload)) {
            Some(Ok(m)) if m.artifact.is_none() => registry::ModelFormat::Onnx,
            _ => registry::ModelFormat::Compiled,
        },
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

    /// Scores over `base` base rows and `recent` fleet rows, right on the first
    /// `base_right` and `recent_right` of each.
    fn scores(base: usize, base_right: usize, recent: usize, recent_right: usize) -> Scores {
        let right: Vec<bool> = (0..base)
            .map(|i| i < base_right)
            .chain((0..recent).map(|i| i < recent_right))
            .collect();
        let is_recent: Vec<bool> = (0..base + recent).map(|i| i >= base).collect();
        let n = (base + recent) as f64;
        Scores {
            metrics: Metrics {
                accuracy: (base_right + recent_right) as f64 / n,
                recent_accuracy: (recent > 0).then(|| recent_right as f64 / recent as f64),
                rows: (base + recent) as u64,
                recent_rows: recent as u64,
            },
            right,
            recent: is_recent,
        }
    }

    #[test]
    fn gate_refuses_a_worse_candidate_and_says_why() {
        let g = GatePolicy::default();
        let e = decide(&g, &scores(100, 60, 40, 36), Some(&scores(100, 85, 40, 20)));
        assert!(
            e.as_ref()
                .is_err_and(|r| r.contains("worse than the champion's 0.7500")),
            "{e:?}"
        );
        assert!(decide(&g, &scores(10, 1, 0, 0), None).is_ok());
    }

    #[test]
    fn an_improvement_must_hold_at_the_policy_confidence() {
        let g = GatePolicy::default();
        // 40 fleet rows, 22 vs 20 right: +5 points, but not with 95 % confidence.
        let e = decide(&g, &scores(100, 85, 40, 22), Some(&scores(100, 85, 40, 20)));
        assert!(e.is_err_and(
            |r| r.contains("does not beat the champion with enough confidence")
                && r.contains("recent (fleet) held-out rows, 40 rows")
        ));
        // 36 vs 20 of 40: the bound clears the 1-point margin.
        let ok = decide(&g, &scores(100, 85, 40, 36), Some(&scores(100, 85, 40, 20)));
        assert!(
            ok.as_ref()
                .is_ok_and(|r| r.contains("candidate 0.9000 vs champion 0.5000")),
            "{ok:?}"
        );
    }

    #[test]
    fn too_few_fleet_rows_are_judged_with_every_held_out_row() {
        let g = GatePolicy::default();
        // 5 fleet rows at 0.2 each: the old gate refused; 2,000 base rows show the gain.
        let cand = scores(2000, 1300, 5, 1);
        let champ = scores(2000, 1000, 5, 1);
        let ok = decide(&g, &cand, Some(&champ));
        assert!(
            ok.as_ref()
                .is_ok_and(|r| r.contains("all held-out rows (only 5 recent fleet rows")),
            "{ok:?}"
        );
        // No fleet rows at all: the same, never "no recent rows".
        assert!(decide(
            &g,
            &scores(2000, 1300, 0, 0),
            Some(&scores(2000, 1000, 0, 0))
        )
        .is_ok());
        // And no improvement on them is still refused.
        let e = decide(
            &g,
            &scores(2000, 1000, 0, 0),
            Some(&scores(2000, 1000, 0, 0)),
        );
        assert!(e.is_err_and(|r| r.contains("all held-out rows")));
    }

    #[test]
    fn versions_count_up_by_patch() {
        assert_eq!(next_version(Some("1.2.3")), "1.2.4");
        assert_eq!(next_version(None), "1.0.0");
    }
}
