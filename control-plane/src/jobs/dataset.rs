//! The dataset of one training job: base CSV rows plus labeled fleet samples, split into a
//! training file for the trainer and a held-out set the control plane keeps for the gate.
//!
//! The split is a function of each row's content (SHA-256 of its bytes), so the same data
//! always splits the same way, and the dataset hash names exactly what was trained on.

use std::fmt::Write as _;
use std::path::Path;

use drover_protocol::topics::hex32;
use sha2::{Digest as _, Sha256};

use crate::store::LabeledSample;

/// Rows read from a CSV at most (a guard against a runaway file).
const MAX_ROWS: usize = 5_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DatasetError {
    #[error("{origin}: {detail}")]
    Csv { origin: String, detail: String },
    #[error("no rows: the base dataset is empty and no labeled fleet samples were found")]
    Empty,
    #[error("the held-out split is empty ({rows} rows, holdout fraction {fraction}); add data or raise the fraction")]
    NoHoldout { rows: usize, fraction: f64 },
}

/// One labeled row. `recent`: it came from the fleet (live data), not the base dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub features: Vec<f32>,
    pub label: u32,
    pub recent: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Feature names (the label column excluded).
    pub features: Vec<String>,
    pub train: Vec<Row>,
    pub holdout: Vec<Row>,
    /// SHA-256 over the training and held-out rows, hex.
    pub hash: String,
    /// Fleet samples left out: a width other than the dataset's (a batched request, a
    /// model with other inputs), a non-finite value, or a label that is not a class.
    pub skipped: u64,
}

fn label_of(v: f64) -> Option<u32> {
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX)).then_some(v as u32)
}

/// Parses `feature..., label` CSV text.
pub fn parse_labeled_csv(
    text: &str,
    origin: &str,
) -> Result<(Vec<String>, Vec<Row>), DatasetError> {
    let err = |detail: String| DatasetError::Csv {
        origin: origin.to_owned(),
        detail,
    };
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| err("empty file; expected a header row".into()))?
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    if header.len() < 2 || header.last().map(String::as_str) != Some("label") {
        return Err(err(format!(
            "header {header:?} must name the features and end with a `label` column"
        )));
    }
    let width = header.len() - 1;
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate().take(MAX_ROWS) {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(err(format!(
                "row {} has {} columns, the header has {}",
                n + 2,
                cells.len(),
                header.len()
            )));
        }
        let mut features = Vec::with_capacity(width);
        for c in &cells[..width] {
            let v: f32 = c
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .ok_or_else(|| err(format!("row {}: {c:?} is not a finite number", n + 2)))?;
            features.push(v);
        }
        let label = cells[width]
            .parse::<f64>()
            .ok()
            .and_then(label_of)
            .ok_or_else(|| {
                err(format!(
                    "row {}: label {:?} is not a class number",
                    n + 2,
                    cells[width]
                ))
            })?;
        rows.push(Row {
            features,
            label,
            recent: false,
        });
    }
    Ok((header[..width].to_vec(), rows))
}

fn row_bytes(r: &Row) -> Vec<u8> {
    let mut b: Vec<u8> = r.features.iter().flat_map(|x| x.to_le_bytes()).collect();
    b.extend_from_slice(&r.label.to_le_bytes());
    b.push(u8::from(r.recent));
    b
}

/// Whether a row is held out: its content hash decides, so the split is reproducible.
fn held_out(r: &Row, occurrence: u64, fraction: f64) -> bool {
    let mut h = Sha256::new();
    h.update(row_bytes(r));
    h.update(occurrence.to_le_bytes());
    let d = h.finalize();
    let x = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (x as f64 / u64::MAX as f64) < fraction
}

/// Builds the dataset: base rows, then fleet samples that carry a class label. Fleet
/// samples that do not fit (see [`Dataset::skipped`]) are counted and left out.
pub fn build(
    base: Option<(Vec<String>, Vec<Row>)>,
    fleet: &[LabeledSample],
    holdout_fraction: f64,
) -> Result<Dataset, DatasetError> {
    let (mut features, mut rows) = base.unwrap_or_default();
    let mut skipped = 0;
    for s in fleet {
        let Some(label) = label_of(s.label) else {
            skipped += 1;
            continue;
        };
        if features.is_empty() && !s.features.is_empty() {
            features = (0..s.features.len()).map(|i| format!("f{i}")).collect();
        }
        if s.features.len() != features.len() || s.features.iter().any(|x| !x.is_finite()) {
            skipped += 1;
            continue;
        }
        rows.push(Row {
            features: s.features.clone(),
            label,
            recent: true,
        });
    }
    if rows.is_empty() {
        return Err(DatasetError::Empty);
    }
    let total = rows.len();
    let mut seen = std::collections::HashMap::<Vec<u8>, u64>::new();
    let (mut train, mut holdout) = (Vec::new(), Vec::new());
    for r in rows {
        let k = seen.entry(row_bytes(&r)).or_insert(0);
        *k += 1;
        if held_out(&r, *k, holdout_fraction) {
            holdout.push(r);
        } else {
            train.push(r);
        }
    }
    if holdout.is_empty() || train.is_empty() {
        return Err(DatasetError::NoHoldout {
            rows: total,
            fraction: holdout_fraction,
        });
    }
    let mut h = Sha256::new();
    for r in train.iter().chain(&holdout) {
        h.update(row_bytes(r));
    }
    let hash = hex32(&h.finalize().into());
    Ok(Dataset {
        features,
        train,
        holdout,
        hash,
        skipped,
    })
}

/// CSV text of rows; `with_recent` adds the `recent` column (the held-out file only).
pub fn to_csv(features: &[String], rows: &[Row], with_recent: bool) -> String {
    let mut s = features.join(",");
    s.push_str(",label");
    if with_recent {
        s.push_str(",recent");
    }
    s.push('\n');
    for r in rows {
        for x in &r.features {
            let _ = write!(s, "{x},");
        }
        let _ = write!(s, "{}", r.label);
        if with_recent {
            let _ = write!(s, ",{}", u8::from(r.recent));
        }
        s.push('\n');
    }
    s
}

/// Reads back a held-out file written by [`to_csv`] with the `recent` column.
pub fn read_holdout(path: &Path) -> Result<Vec<Row>, DatasetError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::Csv {
        origin: origin.clone(),
        detail: e.to_string(),
    })?;
    // Move `recent` out of the way so the label is last again.
    let mut out = Vec::new();
    let mut fixed = String::with_capacity(text.len());
    for (n, line) in text.lines().enumerate() {
        let Some((head, recent)) = line.rsplit_once(',') else {
            continue;
        };
        if n > 0 {
            out.push(recent.trim() == "1");
        }
        fixed.push_str(head);
        fixed.push('\n');
    }
    let (_, mut rows) = parse_labeled_csv(&fixed, &origin)?;
    for (r, recent) in rows.iter_mut().zip(out) {
        r.recent = recent;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(label: f64, x: f32) -> LabeledSample {
        LabeledSample {
            device: "d".into(),
            at_ms: 1,
            features: vec![x, x],
            label,
        }
    }

    #[test]
    fn the_split_is_reproducible_and_covers_every_row() {
        let base = parse_labeled_csv(
            &(0..200).fold("a,b,label\n".to_string(), |s, i| {
                s + &format!("{i},{},{}\n", i * 2, i % 2)
            }),
            "base",
        )
        .unwrap();
        let fleet: Vec<_> = (0..100)
            .map(|i| sample(f64::from(i % 3), i as f32))
            .collect();
        let a = build(Some(base.clone()), &fleet, 0.25).unwrap();
        let b = build(Some(base), &fleet, 0.25).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.train.len() + a.holdout.len(), 300);
        assert!(a.holdout.iter().any(|r| r.recent) && a.holdout.iter().any(|r| !r.recent));
        assert!((40..110).contains(&a.holdout.len()), "{}", a.holdout.len());
    }

    #[test]
    fn fleet_samples_that_do_not_fit_are_counted_and_left_out() {
        let mut fleet: Vec<_> = (0..40)
            .map(|i| sample(f64::from(i % 2), i as f32))
            .collect();
        fleet.push(LabeledSample {
            device: "d".into(),
            at_ms: 1,
            features: vec![1.0, 2.0, 3.0, 4.0],
            label: 1.0,
        });
        fleet.push(sample(0.5, 1.0));
        fleet.push(sample(1.0, f32::NAN));
        let d = build(None, &fleet, 0.5).unwrap();
        assert_eq!(d.skipped, 3);
        assert_eq!(d.train.len() + d.holdout.len(), 40);
    }

    #[test]
    fn holdout_file_round_trips() {
        let fleet: Vec<_> = (0..50)
            .map(|i| sample(f64::from(i % 2), i as f32))
            .collect();
        let d = build(None, &fleet, 0.5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.csv");
        std::fs::write(&p, to_csv(&d.features, &d.holdout, true)).unwrap();
        assert_eq!(read_holdout(&p).unwrap(), d.holdout);
    }

    #[test]
    fn bad_csv_names_the_row() {
        let e = parse_labeled_csv("a,label\n1,0\nx,1\n", "base.csv").err();
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some("base.csv: row 3: \"x\" is not a finite number")
        );
    }
}
