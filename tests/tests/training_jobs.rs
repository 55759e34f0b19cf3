//! Training jobs through the local executor: the shipped trainers (built-in Rust, and the
//! scikit-learn example) produce candidates the gate accepts and registers; a job that
//! fails, times out or is cancelled is reported with its log tail and changes nothing.

use std::path::Path;
use std::time::Duration;

use drover_control_plane::store::{JobOutcome, JobState};
use drover_tests::training::{job_spec, policy, toml_args, world, Rig, Rng};
use drover_tests::{peers_required, wait_until, workspace_bin};

const MODEL: &str = "shift";

/// A rig with a champion trained before the shift, a base dataset from the old world and
/// labeled fleet samples from a shifted site.
fn setup(dir: &Path) -> (Rig, std::path::PathBuf) {
    let rig = Rig::new(dir).unwrap();
    let mut rng = Rng::new(7);
    let old: Vec<_> = (0..600).map(|_| world(&mut rng, false)).collect();
    let champion = rig.publish_champion(MODEL, "1.0.0", &old).unwrap();
    let base = dir.join("base.csv");
    std::fs::write(&base, drover_tests::training::labeled_csv(&old)).unwrap();
    let shifted: Vec<_> = (0..400).map(|_| world(&mut rng, true)).collect();
    let now = drover_host::clock::now_ms();
    rig.ingest_labeled("b-1", &[("site", "b")], &champion, &shifted, now)
        .unwrap();
    (rig, base)
}

fn no_new_version(rig: &Rig) {
    assert_eq!(
        rig.versions(MODEL),
        vec!["1.0.0".to_string()],
        "nothing published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_reported_with_its_log_tail_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let cmd = toml_args(&[
        "sh",
        "-c",
        "echo loading $DROVER_DATASET; echo 'fatal: out of memory in epoch 3' >&2; exit 3",
    ]);
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 60, Some(&base)),
        )
        .unwrap();
    let spec = e.load_job_spec().unwrap();
    let job = e
        .run_job(spec, "manual", drover_host::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.exit_code, Some(3));
    let detail = job.detail.unwrap_or_default();
    assert!(
        detail.contains("fatal: out of memory in epoch 3"),
        "{detail}"
    );
    assert!(
        detail.contains("loading "),
        "stdout is captured too: {detail}"
    );
    assert_eq!(job.outcome, None);
    no_new_version(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_past_its_timeout_is_killed_with_its_children_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let marker = tmp.path().join("child-survived");
    // The child of the shell would write the marker if the process group outlived the kill.
    let script = format!(
        "echo started; (sleep 3; touch {}) & sleep 60",
        marker.display()
    );
    let cmd = toml_args(&["sh", "-c", &script]);
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 1, Some(&base)),
        )
        .unwrap();
    let spec = e.load_job_spec().unwrap();
    let job = e
        .run_job(spec, "manual", drover_host::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(job.state, JobState::TimedOut);
    let detail = job.detail.unwrap_or_default();
    assert!(
        detail.contains("job timed-out") && detail.contains("started"),
        "{detail}"
    );
    no_new_version(&rig);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!marker.exists(), "the job's process group was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_job_stops_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let cmd = toml_args(&["sh", "-c", "echo waiting; sleep 60"]);
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 600, Some(&base)),
        )
        .unwrap();
    let spec = e.load_job_spec().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let e2 = e.clone();
    let run = tokio::spawn(async move {
        e2.run_job_reporting(spec, "manual", drover_host::clock::now_ms(), tx)
            .await
    });
    let id = rx.await.unwrap();
    wait_until(
        "the job to be cancellable",
        Duration::from_secs(30),
        || async { e.cancel(id).then_some(()) },
    )
    .await
    .unwrap();
    let job = run.await.unwrap().unwrap();
    assert_eq!(job.id, id);
    assert_eq!(job.state, JobState::Cancelled);
    no_new_version(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_trainer_job_beats_the_champion_and_is_registered_with_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let drover = workspace_bin("drover").unwrap();
    let cmd = toml_args(&[
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    let rollout = "[rollout]\n[[rollout.waves]]\npercent = 1\n[[rollout.waves]]\npercent = 100\n";
    let e = rig
        .engine(
            "p",
            &policy(MODEL, rollout),
            &job_spec("local", &cmd, 300, Some(&base)),
        )
        .unwrap();
    let spec = e.load_job_spec().unwrap();
    let job = e
        .run_job(spec, "manual", drover_host::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.detail);
    assert_eq!(job.outcome, Some(JobOutcome::Accepted), "{:?}", job.detail);
    assert_eq!(job.candidate_model.as_deref(), Some("shift@1.0.1"));
    assert_eq!(rig.versions(MODEL), ["1.0.0", "1.0.1"]);
    let plan: serde_json::Value =
        serde_json::from_str(job.rollout_plan.as_deref().unwrap()).unwrap();
    assert_eq!(plan["waves"][1]["percent"], 100);
    // The template is a valid rollout plan for the accepted version.
    let template: toml::Table =
        toml::from_str("selector = \"all\"\n[[waves]]\npercent = 1\n[[waves]]\npercent = 100\n")
            .unwrap();
    let p = drover_control_plane::continuous::rollout_plan(&template, "shift@1.0.1").unwrap();
    assert_eq!(p.model, "shift@1.0.1");
    // Lineage in the signed manifest: parent, job, dataset hash, the gate's metrics.
    let row = rig.lock().model(MODEL, "1.0.1").unwrap().unwrap();
    let m = drover_protocol::manifest::Manifest::decode(&row.payload).unwrap();
    assert_eq!(
        m.lineage.parent.as_ref().map(|p| p.version.as_str()),
        Some("1.0.0")
    );
    assert_eq!(m.lineage.training_job, Some(format!("job-{}", job.id)));
    assert_eq!(m.lineage.dataset, job.dataset_hash);
    let acc = m.lineage.metrics["recent_accuracy"];
    let champ = m.lineage.metrics["champion_recent_accuracy"];
    assert!(acc > champ + 0.2, "candidate {acc} vs champion {champ}");
    assert!(
        m.baseline.is_some(),
        "the candidate carries a drift baseline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sklearn_example_trainer_runs_through_the_local_executor() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import sklearn, skl2onnx, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !peers_required(),
            "python3 with scikit-learn and skl2onnx is required (run .ci/install-deps.sh)"
        );
        eprintln!("skipping: scikit-learn/skl2onnx not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../control-plane/trainers/sklearn/train.py");
    let cmd = toml_args(&[
        "python3",
        script.to_str().unwrap(),
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 300, Some(&base)),
        )
        .unwrap();
    let spec = e.load_job_spec().unwrap();
    let job = e
        .run_job(spec, "manual", drover_host::clock::now_ms())
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.detail);
    assert_eq!(job.outcome, Some(JobOutcome::Accepted), "{:?}", job.detail);
    let metrics: serde_json::Value = serde_json::from_str(job.metrics.as_deref().unwrap()).unwrap();
    assert_eq!(metrics["trainer"]["trainer"], "sklearn-logistic-regression");
    assert!(
        metrics["candidate"]["recent_accuracy"].as_f64().unwrap()
            > metrics["champion"]["recent_accuracy"].as_f64().unwrap() + 0.2,
        "{metrics}"
    );
    assert_eq!(rig.versions(MODEL), ["1.0.0", "1.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_job_left_running_by_a_restart_is_marked_failed_and_publishes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, base) = setup(tmp.path());
    let cmd = toml_args(&["true"]);
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 60, Some(&base)),
        )
        .unwrap();
    // What a control plane that died mid-job leaves behind.
    let id = {
        let mut s = rig.lock();
        let mut row = drover_control_plane::store::JobRow {
            name: "retrain".into(),
            trigger: "manual".into(),
            executor: "local".into(),
            spec: String::new(),
            state: JobState::Running,
            external_id: Some("4242".into()),
            created_at_ms: 1,
            ..Default::default()
        };
        row.id = s.insert_job(&row).unwrap();
        s.update_job(&row).unwrap();
        row.id
    };
    let handles = e.reattach().await.unwrap();
    assert!(handles.is_empty(), "nothing to follow for a local job");
    let row = rig.lock().job(id).unwrap().unwrap();
    assert_eq!(row.state, JobState::Failed);
    assert!(row.detail.unwrap_or_default().contains("restarted"));
    no_new_version(&rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_whose_dataset_cannot_be_built_fails_with_the_reason_and_runs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (rig, _) = setup(tmp.path());
    let marker = tmp.path().join("trainer-ran");
    let cmd = toml_args(&["touch", marker.to_str().unwrap()]);
    let missing = tmp.path().join("no-such-base.csv");
    let e = rig
        .engine(
            "p",
            &policy(MODEL, ""),
            &job_spec("local", &cmd, 60, Some(&missing)),
        )
        .unwrap();
    let job = e
        .run_job(
            e.load_job_spec().unwrap(),
            "manual",
            drover_host::clock::now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    let detail = job.detail.unwrap_or_default();
    assert!(
        detail.contains("cannot read base dataset") && detail.contains("no-such-base.csv"),
        "{detail}"
    );
    assert!(!marker.exists(), "the trainer never ran");
    no_new_version(&rig);
}
