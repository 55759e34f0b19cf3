//! The same training job as the local-executor tests, through a real Slurm (Debian
//! `slurm-wlm`, one node on loopback): submitted with sbatch, followed with
//! squeue/scontrol, accepted and registered; and a control plane that "restarts" while
//! the job runs re-attaches to it from the store and finishes the gate.

use std::path::Path;
use std::time::Duration;

use drover_control_plane::store::{JobOutcome, JobState};
use drover_tests::slurm::{installed, SlurmCluster};
use drover_tests::training::{job_spec, labeled_csv, policy, toml_args, world, Rig, Rng};
use drover_tests::{peers_required, wait_until, workspace_bin};

const MODEL: &str = "shift";

fn setup(dir: &Path) -> (Rig, std::path::PathBuf) {
    let rig = Rig::new(dir).unwrap();
    let mut rng = Rng::new(11);
    let old: Vec<_> = (0..600).map(|_| world(&mut rng, false)).collect();
    let champion = rig.publish_champion(MODEL, "1.0.0", &old).unwrap();
    let base = dir.join("base.csv");
    std::fs::write(&base, labeled_csv(&old)).unwrap();
    let shifted: Vec<_> = (0..400).map(|_| world(&mut rng, true)).collect();
    rig.ingest_labeled(
        "b-1",
        &[("site", "b")],
        &champion,
        &shifted,
        drover_host::clock::now_ms(),
    )
    .unwrap();
    (rig, base)
}

fn have_slurm() -> bool {
    if installed() {
        return true;
    }
    assert!(
        !peers_required(),
        "slurm-wlm and munge are required (run .ci/install-deps.sh)"
    );
    eprintln!("skipping: slurm-wlm not installed");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_job_runs_through_real_slurm_and_survives_a_control_plane_restart() {
    if !have_slurm() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cluster = SlurmCluster::start(&tmp.path().join("slurm"))
        .await
        .unwrap();
    let (rig, base) = setup(tmp.path());
    let drover = workspace_bin("drover").unwrap();
    let train = [
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ];

    // 1. Straight through: sbatch, squeue, the exit-code file, the gate.
    let e = rig
        .engine_with(
            "p1",
            &policy(MODEL, ""),
            &job_spec("slurm", &toml_args(&train), 300, Some(&base)),
            Some(cluster.config()),
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
    assert_eq!(job.executor, "slurm");
    assert!(job
        .external_id
        .as_deref()
        .is_some_and(|id| id.parse::<u64>().is_ok()));
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.detail);
    assert_eq!(job.outcome, Some(JobOutcome::Accepted), "{:?}", job.detail);
    assert_eq!(rig.versions(MODEL), ["1.0.0", "1.0.1"]);
    let log = std::fs::read_to_string(Path::new(&job.dir).join("job.log")).unwrap();
    assert!(
        log.contains("trained on"),
        "the trainer's output is in the Slurm log: {log}"
    );

    // 2. The control plane goes away while the job is queued or running; a new one
    //    re-attaches from the store and carries it to the gate.
    let slow = format!(
        "sleep 3; exec {}",
        train
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let e = rig
        .engine_with(
            "p2",
            &policy(MODEL, ""),
            &job_spec(
                "slurm",
                &toml_args(&["bash", "-c", &slow]),
                300,
                Some(&base),
            ),
            Some(cluster.config()),
        )
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let e2 = e.clone();
    let first = tokio::spawn(async move {
        e2.run_job_reporting(
            e2.load_job_spec().unwrap(),
            "manual",
            drover_host::clock::now_ms(),
            tx,
        )
        .await
    });
    let id = rx.await.unwrap();
    wait_until(
        "the job submitted to slurm",
        Duration::from_secs(60),
        || async {
            rig.lock()
                .job(id)
                .ok()
                .flatten()
                .and_then(|j| j.external_id)
        },
    )
    .await
    .unwrap();
    first.abort();
    let _ = first.await;
    drop(e);
    let restarted = rig
        .engine_with(
            "p2",
            &policy(MODEL, ""),
            &job_spec(
                "slurm",
                &toml_args(&["bash", "-c", &slow]),
                300,
                Some(&base),
            ),
            Some(cluster.config()),
        )
        .unwrap();
    let handles = restarted.reattach().await.unwrap();
    assert_eq!(handles.len(), 1, "one slurm job to re-attach to");
    let mut finished = Vec::new();
    for h in handles {
        finished.push(h.await.unwrap().unwrap());
    }
    let job = &finished[0];
    assert_eq!(job.id, id);
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.detail);
    // The second candidate's champion is 1.0.1; whatever the gate says, it says why.
    assert!(job.outcome.is_some() && job.detail.is_some(), "{job:?}");
    drop(cluster);
}
