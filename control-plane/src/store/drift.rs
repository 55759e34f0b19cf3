//! Drift: the sketches devices report (written by `ingest.rs` as JSON, read back here with
//! their device's labels) and the history of drift scores. The rows are the store's own;
//! the drift statistics convert at their own edge (the control plane's `drift_record` module).

use std::collections::BTreeMap;

use drover_protocol::messages::FeatureSketch;
use drover_protocol::topics::parse_hex32;
use rusqlite::params;

use super::{i, u64_at, Result, Store, StoreError};

/// One device's drift sketch for one window, with the device's labels.
#[derive(Clone, Debug, PartialEq)]
pub struct DriftSketchRow {
    pub device: String,
    pub labels: BTreeMap<String, String>,
    pub model_digest: [u8; 32],
    pub window_end_ms: u64,
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
}

/// A drift level as stored in `drift_scores.level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DriftLevel {
    Ok,
    Warn,
    Alert,
}

impl DriftLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftLevel::Ok => "ok",
            DriftLevel::Warn => "warn",
            DriftLevel::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<DriftLevel> {
        [DriftLevel::Ok, DriftLevel::Warn, DriftLevel::Alert]
            .into_iter()
            .find(|l| l.as_str() == s)
    }
}

/// One stored drift score: one scope, one model, one window, one feature.
#[derive(Clone, Debug, PartialEq)]
pub struct DriftScoreRow {
    pub scope: String,
    pub model_digest: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub feature: String,
    pub count: u64,
    pub psi: Option<f64>,
    pub chi2: Option<f64>,
    pub p_value: Option<f64>,
    pub missing: u64,
    pub out_of_range: u64,
    pub level: DriftLevel,
    /// Accuracy rows only: labelled predictions right, and the accuracy's Wilson interval.
    pub accuracy: Option<(u64, f64, f64)>,
}

/// The worst level of one scope's scores for one model and window.
#[derive(Clone, Debug, PartialEq)]
pub struct DriftWindowLevel {
    pub scope: String,
    pub model_digest: String,
    pub window_end_ms: u64,
    pub level: DriftLevel,
}

/// A sketch as `ingest.rs` stored it: `{"features": [{counts, missing, out_of_range}],
/// "predictions": [..]}`.
pub(super) fn parse_sketch(sketch: &str) -> Result<(Vec<FeatureSketch>, Vec<u64>)> {
    let v: serde_json::Value = serde_json::from_str(sketch).map_err(|e| StoreError::Corrupt {
        table: "drift",
        detail: e.to_string(),
    })?;
    let u64s = |x: &serde_json::Value| -> Vec<u64> {
        x.as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
            .unwrap_or_default()
    };
    let features = v["features"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| FeatureSketch {
                    counts: u64s(&f["counts"]),
                    missing: f["missing"].as_u64().unwrap_or(0),
                    out_of_range: f["out_of_range"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((features, u64s(&v["predictions"])))
}

fn score_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DriftScoreRow> {
    let level: String = r.get(11)?;
    Ok(DriftScoreRow {
        scope: r.get(0)?,
        model_digest: r.get(1)?,
        window_start_ms: u64_at(r, 2)?,
        window_end_ms: u64_at(r, 3)?,
        feature: r.get(4)?,
        count: u64_at(r, 5)?,
        psi: r.get(6)?,
        chi2: r.get(7)?,
        p_value: r.get(8)?,
        missing: u64_at(r, 9)?,
        out_of_range: u64_at(r, 10)?,
        // A level this build does not know reads as ok: it cannot trigger anything.
        level: DriftLevel::parse(&level).unwrap_or(DriftLevel::Ok),
        accuracy: match (r.get::<_, Option<i64>>(12)?, r.get(13)?, r.get(14)?) {
            (Some(k), Some(lo), Some(hi)) => Some((super::u(k), lo, hi)),
            _ => None,
        },
    })
}

impl Store {
    /// Drift sketches whose window ends in `[from_ms, to_ms)`, with their device's labels.
    pub fn drift_sketches(&self, from_ms: u64, to_ms: u64) -> Result<Vec<DriftSketchRow>> {
        let mut st = self.conn.prepare(
            "SELECT d.device, v.labels, d.model_digest, d.window_end_ms, d.sketch
             FROM drift d JOIN devices v ON v.id = d.device
             WHERE d.window_end_ms >= ?1 AND d.window_end_ms < ?2
             ORDER BY d.device, d.seq",
        )?;
        let rows = st.query_map(params![i(from_ms), i(to_ms)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                u64_at(r, 3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, labels, digest, window_end_ms, sketch) = row?;
            let (features, predictions) = parse_sketch(&sketch)?;
            out.push(DriftSketchRow {
                device,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                model_digest: parse_hex32(&digest).ok_or_else(|| StoreError::Corrupt {
                    table: "drift",
                    detail: format!("bad digest {digest:?}"),
                })?,
                window_end_ms,
                features,
                predictions,
            });
        }
        Ok(out)
    }

    /// Stores one window's scores (a recomputed window replaces its earlier scores).
    pub fn insert_drift_scores(&mut self, scores: &[DriftScoreRow]) -> Result<()> {
        let tx = self.write_tx()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO drift_scores VALUES
                 (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)",
            )?;
            for s in scores {
                st.execute(params![
                    s.scope,
                    s.model_digest,
                    i(s.window_start_ms),
                    i(s.window_end_ms),
                    s.feature,
                    i(s.count),
                    s.psi,
                    s.chi2,
                    s.p_value,
                    i(s.missing),
                    i(s.out_of_range),
                    s.level.as_str(),
                    s.accuracy.map(|a| i(a.0)),
                    s.accuracy.map(|a| a.1),
                    s.accuracy.map(|a| a.2),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The worst level of every (scope, model digest, window end) since `since_ms`:
    /// what the sustained-drift trigger needs, without reading every score. `accuracy`
    /// picks the accuracy rows (the accuracy trigger) or every other row (data drift).
    pub fn drift_window_levels(
        &self,
        since_ms: u64,
        accuracy: bool,
    ) -> Result<Vec<DriftWindowLevel>> {
        let mut st = self.conn.prepare(
            "SELECT scope, model_digest, window_end_ms,
                    MAX(CASE level WHEN 'alert' THEN 2 WHEN 'warn' THEN 1 ELSE 0 END)
             FROM drift_scores WHERE window_end_ms >= ?1 AND (correct IS NOT NULL) = ?2
             GROUP BY scope, model_digest, window_end_ms",
        )?;
        let rows = st.query_map(params![i(since_ms), accuracy], |r| {
            let level = match r.get::<_, i64>(3)? {
                2 => DriftLevel::Alert,
                1 => DriftLevel::Warn,
                _ => DriftLevel::Ok,
            };
            Ok(DriftWindowLevel {
                scope: r.get(0)?,
                model_digest: r.get(1)?,
                window_end_ms: u64_at(r, 2)?,
                level,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The end of the latest window scored, if any (where the next window starts).
    pub fn last_drift_window_end(&self) -> Result<Option<u64>> {
        let v: Option<i64> =
            self.conn
                .query_row("SELECT MAX(window_end_ms) FROM drift_scores", [], |r| {
                    r.get(0)
                })?;
        Ok(v.map(super::u))
    }

    /// Deletes scores of windows that ended before `before_ms`.
    pub fn prune_drift_scores(&mut self, before_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM drift_scores WHERE window_end_ms < ?1",
            [i(before_ms)],
        )?)
    }

    /// Scores, newest window first; `scope` filters exactly; at most `limit` rows.
    pub fn drift_history(
        &self,
        scope: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<DriftScoreRow>> {
        let mut st = self.conn.prepare(
            "SELECT * FROM drift_scores WHERE (?1 IS NULL OR scope = ?1) AND window_end_ms >= ?2
             ORDER BY window_end_ms DESC, scope, feature LIMIT ?3",
        )?;
        let rows = st.query_map(params![scope, i(since_ms), limit], score_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The scores of the most recent scored window of every scope.
    pub fn drift_status(&self) -> Result<Vec<DriftScoreRow>> {
        let mut st = self.conn.prepare(
            "SELECT s.* FROM drift_scores s
             JOIN (SELECT scope, MAX(window_end_ms) AS last FROM drift_scores GROUP BY scope) l
               ON l.scope = s.scope AND l.last = s.window_end_ms
             ORDER BY s.scope, s.model_digest, s.feature",
        )?;
        let rows = st.query_map([], score_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::messages::{DriftReport, Uplink};

    use super::super::ingest::tests::{enrolled, frame, model_ref};
    use super::*;

    fn score(scope: &str, end: u64, feature: &str, level: DriftLevel) -> DriftScoreRow {
        DriftScoreRow {
            scope: scope.into(),
            model_digest: "ab".repeat(32),
            window_start_ms: end - 100,
            window_end_ms: end,
            feature: feature.into(),
            count: 50,
            psi: Some(0.3),
            chi2: None,
            p_value: Some(0.01),
            missing: 1,
            out_of_range: 2,
            level,
            accuracy: None,
        }
    }

    #[test]
    fn sketches_read_back_with_labels_and_scores_round_trip() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        let sketch = FeatureSketch {
            counts: vec![3, 4],
            missing: 1,
            out_of_range: 2,
        };
        let report = Uplink::Drift(DriftReport {
            model: model_ref(5),
            window_start_ms: 0,
            window_end_ms: 1_000,
            features: vec![sketch.clone()],
            predictions: vec![7, 8],
        });
        s.apply_batch(&[frame("gw-1", 1, 5, report)]).unwrap();
        let rows = s.drift_sketches(1_000, 1_001).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].labels["site"], "s0");
        assert_eq!(rows[0].model_digest, [5; 32]);
        assert_eq!(
            (rows[0].features.clone(), rows[0].predictions.clone()),
            (vec![sketch], vec![7, 8])
        );
        assert!(
            s.drift_sketches(0, 1_000).unwrap().is_empty(),
            "the window end is exclusive"
        );

        let old = score("fleet", 500, "x0", DriftLevel::Warn);
        let new = [
            score("fleet", 900, "x0", DriftLevel::Alert),
            score("fleet", 900, "x1", DriftLevel::Ok),
            score("site=a", 800, "x0", DriftLevel::Warn),
        ];
        s.insert_drift_scores(std::slice::from_ref(&old)).unwrap();
        s.insert_drift_scores(&new).unwrap();
        // A recomputed window replaces its scores.
        s.insert_drift_scores(&new[..1]).unwrap();
        assert_eq!(
            s.drift_history(Some("fleet"), 0, 10).unwrap(),
            vec![new[0].clone(), new[1].clone(), old]
        );
        assert_eq!(s.drift_status().unwrap(), new.to_vec());
        let mut acc = score("site=a", 900, "__accuracy__", DriftLevel::Alert);
        acc.accuracy = Some((30, 0.5, 0.8));
        s.insert_drift_scores(std::slice::from_ref(&acc)).unwrap();
        assert_eq!(s.drift_history(Some("site=a"), 900, 10).unwrap(), vec![acc]);
        let acc_levels = s.drift_window_levels(600, true).unwrap();
        assert_eq!(acc_levels.len(), 1);
        assert_eq!(acc_levels[0].level, DriftLevel::Alert);
        let levels = s.drift_window_levels(600, false).unwrap();
        let fleet = levels.iter().find(|l| l.scope == "fleet").unwrap();
        assert_eq!((fleet.window_end_ms, fleet.level), (900, DriftLevel::Alert));
        assert_eq!(levels.len(), 2);
        assert_eq!(s.last_drift_window_end().unwrap(), Some(900));
        assert_eq!(s.prune_drift_scores(600).unwrap(), 1);
        assert_eq!(s.drift_history(None, 0, 10).unwrap().len(), 4);
    }
}
