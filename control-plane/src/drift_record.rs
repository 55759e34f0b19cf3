//! The edge between the drift statistics and the store: conversions between
//! [`crate::drift`]'s types and the store's drift rows. It lives here, not in `drift.rs`
//! (a pure core imports no store) nor in `store/` (the store imports no domain module).

use crate::drift::accuracy::Labelled;
use crate::drift::{AccuracyStat, Level, Score, Sketch, SketchRow};
use crate::store::{
    DriftLevel, DriftReferenceRow, DriftScoreRow, DriftSketchRow, LabeledPrediction,
};

impl From<DriftSketchRow> for SketchRow {
    fn from(r: DriftSketchRow) -> Self {
        SketchRow {
            device: r.device,
            labels: r.labels,
            model_digest: r.model_digest,
            window_end_ms: r.window_end_ms,
            features: r.features,
            predictions: r.predictions,
        }
    }
}

impl From<DriftLevel> for Level {
    fn from(l: DriftLevel) -> Self {
        match l {
            DriftLevel::Ok => Level::Ok,
            DriftLevel::Warn => Level::Warn,
            DriftLevel::Alert => Level::Alert,
        }
    }
}

impl From<Level> for DriftLevel {
    fn from(l: Level) -> Self {
        match l {
            Level::Ok => DriftLevel::Ok,
            Level::Warn => DriftLevel::Warn,
            Level::Alert => DriftLevel::Alert,
        }
    }
}

impl From<DriftScoreRow> for Score {
    fn from(r: DriftScoreRow) -> Self {
        Score {
            scope: r.scope,
            model_digest: r.model_digest,
            window_start_ms: r.window_start_ms,
            window_end_ms: r.window_end_ms,
            feature: r.feature,
            count: r.count,
            psi: r.psi,
            chi2: r.chi2,
            p_value: r.p_value,
            missing: r.missing,
            out_of_range: r.out_of_range,
            level: r.level.into(),
            accuracy: r
                .accuracy
                .map(|(correct, low, high)| AccuracyStat { correct, low, high }),
        }
    }
}

impl From<LabeledPrediction> for Labelled {
    fn from(r: LabeledPrediction) -> Self {
        Labelled {
            device: r.device,
            labels: r.labels,
            model_digest: r.model_digest,
            prediction: r.prediction,
            label: r.label,
        }
    }
}

impl From<DriftReferenceRow> for Sketch {
    fn from(r: DriftReferenceRow) -> Self {
        Sketch {
            features: r.features,
            predictions: r.predictions,
        }
    }
}

impl From<&Score> for DriftScoreRow {
    fn from(s: &Score) -> Self {
        DriftScoreRow {
            scope: s.scope.clone(),
            model_digest: s.model_digest.clone(),
            window_start_ms: s.window_start_ms,
            window_end_ms: s.window_end_ms,
            feature: s.feature.clone(),
            count: s.count,
            psi: s.psi,
            chi2: s.chi2,
            p_value: s.p_value,
            missing: s.missing,
            out_of_range: s.out_of_range,
            level: s.level.into(),
            accuracy: s.accuracy.map(|a| (a.correct, a.low, a.high)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_keep_their_stored_strings_both_ways() {
        for l in [Level::Ok, Level::Warn, Level::Alert] {
            let stored = DriftLevel::from(l);
            assert_eq!(stored.as_str(), l.as_str());
            assert_eq!(Level::from(stored), l);
        }
    }

    #[test]
    fn a_score_survives_the_round_trip_through_its_row() {
        let s = Score {
            scope: "site=a".into(),
            model_digest: "ab".repeat(32),
            window_start_ms: 1,
            window_end_ms: 2,
            feature: "x0".into(),
            count: 3,
            psi: Some(0.5),
            chi2: Some(9.0),
            p_value: None,
            missing: 4,
            out_of_range: 5,
            level: Level::Warn,
            accuracy: Some(AccuracyStat {
                correct: 2,
                low: 0.1,
                high: 0.9,
            }),
        };
        assert_eq!(Score::from(DriftScoreRow::from(&s)), s);
    }
}
