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
