//! The training triggers other than drift (covered end to end in `continuous_e2e`), one
//! test per kind, against a real store.

use drover_protocol::messages::{Label, LabelBatch, Uplink};

use super::*;
use crate::store::test_support::{enrolled, frame, model};
use crate::store::{Db, JobRow, JobState, Store};

const HOUR: u64 = 3_600_000;

fn engine(store: Store, triggers: &str) -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("version = 1\nmodel = \"cls\"\njob = \"job.toml\"\n[triggers]\n{triggers}");
    let policy = Policy::parse(&text, "test").unwrap();
    let e = Engine::new(
        Db::new(store),
        dir.path().to_owned(),
        &SecretKey::from_seed([3; 32]),
        policy,
        dir.path().to_owned(),
        1,
    );
    (dir, Arc::new(e))
}

fn job(created_at_ms: u64, state: JobState) -> JobRow {
    JobRow {
        name: "j".into(),
        trigger: "manual".into(),
        executor: "local".into(),
        spec: "name = \"j\"".into(),
        created_at_ms,
        state,
        ..Default::default()
    }
}

async fn insert(e: &Engine, j: JobRow) {
    e.with_store(move |s| Ok(s.insert_job(&j)?)).await.unwrap();
}

#[tokio::test]
async fn a_schedule_counts_from_the_last_job_else_the_models_registration() {
    let (_d, store) = enrolled(&[]);
    let (_dir, e) = engine(store, "every_hours = 1\n");
    // Nothing trained, nothing published: the schedule makes the first model.
    assert_eq!(
        e.due_trigger(10).await.unwrap().as_deref(),
        Some("schedule")
    );
    // A published model (another policy's model does not count): a server started now
    // waits for the period instead of training at every start.
    let t0 = 100 * HOUR;
    let mut m = model("cls", "1.0.0", 1);
    m.created_at_ms = t0;
    let mut other = model("other", "9.0.0", 2);
    other.created_at_ms = 0;
    e.with_store(move |s| {
        s.insert_model(&m)?;
        Ok(s.insert_model(&other)?)
    })
    .await
    .unwrap();
    assert_eq!(e.due_trigger(t0 + HOUR / 2).await.unwrap(), None);
    assert_eq!(
        e.due_trigger(t0 + HOUR).await.unwrap().as_deref(),
        Some("schedule")
    );
    // A job stored later resets the count.
    let t1 = t0 + 2 * HOUR;
    insert(&e, job(t1, JobState::Succeeded)).await;
    assert_eq!(e.due_trigger(t1 + HOUR - 1).await.unwrap(), None);
    assert_eq!(
        e.due_trigger(t1 + HOUR).await.unwrap().as_deref(),
        Some("schedule")
    );
    // Never while a job is queued or running.
    insert(&e, job(t1 + 1, JobState::Running)).await;
    assert_eq!(e.due_trigger(t1 + 10 * HOUR).await.unwrap(), None);
}

#[tokio::test]
async fn enough_new_labels_trigger_and_only_those_after_the_last_job_count() {
    let (_d, store) = enrolled(&["gw-1"]);
    let (_dir, e) = engine(store, "min_new_labels = 3\n");
    let label = |seq: u64, at_ms: u64| {
        frame(
            "gw-1",
            seq,
            at_ms,
            Uplink::Labels(LabelBatch {
                labels: vec![Label {
                    request_id: seq,
                    at_ms,
                    value: 1.0,
                }],
            }),
        )
    };
    let batch = vec![label(1, 100), label(2, 200)];
    e.with_store(move |s| Ok(s.apply_batch(&batch).map(|_| ())?))
        .await
        .unwrap();
    assert_eq!(e.due_trigger(1_000).await.unwrap(), None, "2 of 3 labels");
    let batch = vec![label(3, 300)];
    e.with_store(move |s| Ok(s.apply_batch(&batch).map(|_| ())?))
        .await
        .unwrap();
    assert_eq!(
        e.due_trigger(1_000).await.unwrap().as_deref(),
        Some("labels")
    );
    // A job at 250 answered the first two: one new label is not enough.
    insert(&e, job(250, JobState::Succeeded)).await;
    assert_eq!(e.due_trigger(1_000).await.unwrap(), None);
}

/// A stored model row whose payload is a real manifest with a one-feature baseline (50/50
/// around 0) and, if given, the accuracy its gate measured.
fn model_with_baseline(version: &str, digest: u8) -> crate::store::ModelRow {
    use drover_protocol::manifest::{Baseline, FeatureBaseline, Lineage, Manifest};
    let mut row = model("cls", version, digest);
    let m = Manifest {
        name: "cls".into(),
        version: version.into(),
        sha256: [digest; 32],
        size: 1234,
        chunk_size: 256,
        chunk_hashes: vec![],
        inputs: vec![],
        outputs: vec![],
        baseline: Some(Baseline {
            rows: 100,
            features: vec![FeatureBaseline::Numeric {
                name: "x".into(),
                edges: vec![0.0],
                counts: vec![50, 50],
                min: -1.0,
                max: 1.0,
            }],
            predictions: vec![],
        }),
        test_vectors: vec![],
        lineage: Lineage {
            metrics: std::collections::BTreeMap::from([("accuracy".to_owned(), 0.9)]),
            ..Default::default()
        },
        created_at_ms: 1,
        sampled_vectors: vec![],
        artifact: None,
    };
    row.payload = SecretKey::from_seed([3; 32]).sign_manifest(&m).payload;
    row
}

#[test]
fn drift_windows_are_aligned_scored_once_and_never_overlap() {
    let w = 60_000;
    // A tick every 20 s with a 60 s window: one window per 60 s, not three sliding ones.
    let mut last = None;
    let mut scored = Vec::new();
    for now in (0..=200_000).step_by(20_000) {
        for win in next_windows(last, now, w) {
            last = Some(win.1);
            scored.push(win);
        }
    }
    assert_eq!(scored, [(0, 60_000), (60_000, 120_000), (120_000, 180_000)]);
    // A tick longer than the window catches up on the windows it missed, in order.
    assert_eq!(
        next_windows(Some(60_000), 250_000, w),
        [(60_000, 120_000), (120_000, 180_000), (180_000, 240_000)]
    );
    // A window scored by an explicit call that ended off the grid is not scored again.
    assert_eq!(
        next_windows(Some(130_000), 185_000, w),
        [(130_000, 180_000)]
    );
    assert!(next_windows(Some(180_000), 239_999, w).is_empty());
    // A server down for days scores the latest windows only.
    assert_eq!(next_windows(Some(0), 1_000 * w + 5, w).len(), 12);
}

#[tokio::test]
async fn tick_scores_each_window_once_and_sustained_alerts_count_windows_not_ticks() {
    use drover_protocol::messages::{DriftReport, FeatureSketch};
    let (_d, mut store) = enrolled(&["gw-1"]);
    // The policy's model with a baseline of 50/50 on one feature.
    let m = model_with_baseline("1.0.0", 9);
    store.insert_model(&m).unwrap();
    let (_dir, e) = engine(store, "sustained_windows = 2\n");
    let baseline_digest = m.digest;
    let report = |seq: u64, end: u64| {
        frame(
            "gw-1",
            seq,
            end,
            Uplink::Drift(DriftReport {
                model: drover_protocol::messages::ModelRef {
                    name: "cls".into(),
                    version: "1.0.0".into(),
                    digest: baseline_digest,
                },
                window_start_ms: end - 1_000,
                window_end_ms: end,
                features: vec![FeatureSketch {
                    counts: vec![900, 100],
                    missing: 0,
                    out_of_range: 0,
                }],
                predictions: vec![],
            }),
        )
    };
    // A drifted sketch every 10 s; the engine ticks every 100 s with a 300 s window.
    let w = 300_000;
    let batch: Vec<_> = (1..=90).map(|i| report(i, i * 10_000)).collect();
    e.with_store(move |s| Ok(s.apply_batch(&batch).map(|_| ())?))
        .await
        .unwrap();
    let mut fired_at = None;
    for now in (100_000..=900_000).step_by(100_000) {
        e.score_due_windows(now).await.unwrap();
        if fired_at.is_none() && e.due_trigger(now).await.unwrap().is_some() {
            fired_at = Some(now);
        }
    }
    let windows: std::collections::BTreeSet<(u64, u64)> = e
        .with_store(|s| Ok(s.drift_history(Some("fleet"), 0, 1000)?))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.window_start_ms, r.window_end_ms))
        .collect();
    assert_eq!(
        windows.into_iter().collect::<Vec<_>>(),
        [(0, w), (w, 2 * w), (2 * w, 3 * w)]
    );
    // Two alert windows are two whole windows: the second ends at 600 s.
    assert_eq!(fired_at, Some(600_000));
}

#[tokio::test]
async fn labels_that_disagree_for_two_windows_trigger_an_accuracy_drop() {
    use drover_protocol::messages::{ModelRef, Sample, SampleBatch};
    let (_d, mut store) = enrolled(&["gw-1"]);
    let m = model_with_baseline("1.0.0", 9);
    store.insert_model(&m).unwrap();
    // The gate measured 0.9; a drop of more than 0.1 counts.
    let (_dir, e) = engine(
        store,
        "accuracy_drop_windows = 2\n[accuracy]\nmax_drop = 0.1\nmin_labels = 20\n",
    );
    let w = 300_000;
    let mut seq = 0;
    // 60 sampled inputs per window, all predicted class 1; `right` of them labelled 1.
    let mut window = |k: u64, right: u64| {
        let mut frames = Vec::new();
        let base = k * w;
        let samples: Vec<Sample> = (0..60)
            .map(|j| Sample {
                request_id: base + j,
                at_ms: base + 1_000 + j,
                features: vec![0.5],
                prediction: vec![0.2, 0.8],
            })
            .collect();
        let labels: Vec<Label> = (0..60)
            .map(|j| Label {
                request_id: base + j,
                at_ms: base + 2_000 + j,
                value: if j < right { 1.0 } else { 0.0 },
            })
            .collect();
        seq += 1;
        frames.push(frame(
            "gw-1",
            seq,
            base + 3_000,
            Uplink::Samples(SampleBatch {
                model: ModelRef {
                    name: "cls".into(),
                    version: "1.0.0".into(),
                    digest: m.digest,
                },
                samples,
            }),
        ));
        seq += 1;
        frames.push(frame(
            "gw-1",
            seq,
            base + 3_000,
            Uplink::Labels(LabelBatch { labels }),
        ));
        frames
    };
    let batches = [window(0, 57), window(1, 30), window(2, 28)];
    let mut triggers = Vec::new();
    for (k, batch) in batches.into_iter().enumerate() {
        e.with_store(move |s| Ok(s.apply_batch(&batch).map(|_| ())?))
            .await
            .unwrap();
        let now = (k as u64 + 1) * w + 10;
        let t = e.score_due_windows(now).await.unwrap();
        let fleet = t
            .scores
            .iter()
            .find(|s| s.scope == "fleet" && s.feature == crate::drift::accuracy::ACCURACY)
            .cloned()
            .unwrap();
        let acc = fleet.accuracy.unwrap();
        assert_eq!(fleet.count, 60);
        assert!(acc.low < acc.correct as f64 / 60.0 && acc.high > acc.correct as f64 / 60.0);
        triggers.push((fleet.level, e.due_trigger(now).await.unwrap()));
    }
    assert_eq!(
        triggers,
        [
            (Level::Ok, None),
            (Level::Alert, None),
            (Level::Alert, Some("accuracy_drop:fleet".to_owned())),
        ]
    );
}
