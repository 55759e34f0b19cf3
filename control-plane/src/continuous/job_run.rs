//! A training job's life under the engine: dataset, executor (local or Slurm),
//! re-attaching after a restart, and the evaluation gate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::manifest::Lineage;
use drover_protocol::messages::ModelRef;
use tokio::sync::Notify;

use super::*;
use crate::jobs::{
    self, dataset, slurm::SlurmState, ExecutorKind, JobError, JobPaths, JobSpec, Outcome,
};
use crate::store::{JobOutcome, JobRow, JobState, ModelRow};

impl Engine {
    pub(super) async fn run_job_inner(
        self: &Arc<Self>,
        (spec, spec_text, spec_dir): (JobSpec, String, PathBuf),
        trigger: &str,
        now_ms: u64,
        report: Option<tokio::sync::oneshot::Sender<u64>>,
    ) -> Result<JobRow> {
        let model = self.policy.model.clone();
        let jobs_dir = self.data_dir.join("jobs");
        let row = JobRow {
            name: spec.name.clone(),
            trigger: trigger.to_owned(),
            executor: spec.executor.as_str().to_owned(),
            spec: spec_text,
            state: JobState::Queued,
            created_at_ms: now_ms,
            ..Default::default()
        };
        let (mut row, champion) = self
            .with_store(move |s| {
                let champion = super::champion(s.models()?, &model);
                let mut row = row;
                row.parent_model = champion
                    .as_ref()
                    .map(|c| format!("{}@{}", c.name, c.version));
                row.id = s.insert_job(&row)?;
                row.dir = jobs_dir.join(row.id.to_string()).display().to_string();
                s.update_job(&row)?;
                Ok((row, champion))
            })
            .await?;
        if let Some(tx) = report {
            let _ = tx.send(row.id);
        }
        let paths = JobPaths::new(Path::new(&row.dir));
        // Dataset.
        let since = now_ms.saturating_sub((spec.dataset.fleet_since_hours * 3_600_000.0) as u64);
        let base = spec.dataset.base.as_ref().map(|b| spec_dir.join(b));
        let fraction = spec.dataset.holdout_fraction;
        let p2 = paths.clone();
        let model_name = self.policy.model.clone();
        let fleet = self
            .with_store(move |s| Ok(s.labeled_samples(since, &model_name)?))
            .await?;
        // Parsing and writing datasets is blocking work: off the async runtime.
        let built = tokio::task::spawn_blocking(move || write_dataset(base, &fleet, fraction, &p2))
            .await
            .map_err(|e| ContinuousError::Task(e.to_string()))?;
        let data = match built {
            Ok(d) => d,
            Err(e) => {
                row.state = JobState::Failed;
                row.detail = Some(format!("dataset: {e}"));
                row.finished_at_ms = Some(drover_host::clock::now_ms());
                return self.save(row).await;
            }
        };
        row.dataset_hash = Some(data.hash.clone());
        if data.skipped > 0 {
            tracing::info!(
                job = row.id,
                skipped = data.skipped,
                "fleet samples left out of the dataset"
            );
        }
        row.state = JobState::Running;
        let cancel = Arc::new(Notify::new());
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.id, Arc::clone(&cancel));
        let argv = spec.argv(&paths);
        let timeout = Duration::from_secs(spec.timeout_secs);
        let outcome = match spec.executor {
            ExecutorKind::Local => {
                row = self.save(row).await?;
                self.local.run(&paths, &argv, timeout, &cancel).await
            }
            ExecutorKind::Slurm => {
                match self
                    .slurm
                    .submit(
                        &spec.name,
                        &paths,
                        &argv,
                        &spec.resources,
                        spec.timeout_secs,
                    )
                    .await
                {
                    Ok(id) => {
                        row.external_id = Some(id);
                        row = self.save(row).await?;
                        self.follow_slurm(&row, &paths, timeout, &cancel).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.id);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                row.state = JobState::Failed;
                row.detail = Some(e.to_string());
                row.finished_at_ms = Some(drover_host::clock::now_ms());
                return self.save(row).await;
            }
        };
        self.finish(row, &paths, outcome, champion, data.features.clone())
            .await
    }

    pub(super) async fn save(&self, row: JobRow) -> Result<JobRow> {
        self.with_store(move |s| {
            s.update_job(&row)?;
            Ok(row)
        })
        .await
    }

    /// Polls Slurm until the job ends; past the timeout it is cancelled.
    async fn follow_slurm(
        &self,
        row: &JobRow,
        paths: &JobPaths,
        timeout: Duration,
        cancel: &Notify,
    ) -> std::result::Result<Outcome, JobError> {
        let id = row.external_id.clone().unwrap_or_default();
        let deadline = row.created_at_ms + timeout.as_millis() as u64;
        loop {
            if let SlurmState::Done(o) = self.slurm.poll(&id, paths).await? {
                return Ok(o);
            }
            if drover_host::clock::now_ms() > deadline {
                self.slurm.cancel(&id).await?;
                return Ok(Outcome::TimedOut);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = cancel.notified() => {
                    self.slurm.cancel(&id).await?;
                    return Ok(Outcome::Cancelled);
                }
            }
        }
    }

    /// After a restart: follows Slurm jobs that were running, and marks local jobs that
    /// were running as failed (their process died with the old control plane).
    pub async fn reattach(
        self: &Arc<Self>,
    ) -> Result<Vec<tokio::task::JoinHandle<Result<JobRow>>>> {
        let open = self
            .with_store(|s| Ok(s.jobs_in_state(&[JobState::Queued, JobState::Running])?))
            .await?;
        let mut handles = Vec::new();
        for mut row in open {
            let slurm_id = (row.executor == "slurm")
                .then(|| row.external_id.clone())
                .flatten();
            if slurm_id.is_none() {
                row.state = JobState::Failed;
                row.detail = Some(
                    "the control plane restarted while this job ran locally; nothing was published"
                        .into(),
                );
                row.finished_at_ms = Some(drover_host::clock::now_ms());
                self.save(row).await?;
                continue;
            }
            tracing::info!(job = row.id, slurm_job = ?slurm_id, "re-attaching to slurm job");
            let this = Arc::clone(self);
            handles.push(tokio::spawn(async move {
                let paths = JobPaths::new(Path::new(&row.dir));
                // The spec as submitted (the file may have changed since).
                let spec = JobSpec::parse(&row.spec, &format!("job {}", row.id))?;
                let model = this.policy.model.clone();
                let parent = row.parent_model.clone();
                let champion = this
                    .with_store(move |s| {
                        Ok(s.models()?.into_iter().find(|m| {
                            m.name == model && Some(format!("{}@{}", m.name, m.version)) == parent
                        }))
                    })
                    .await?;
                let cancel = Arc::new(Notify::new());
                let timeout = Duration::from_secs(spec.timeout_secs);
                let outcome = match this.follow_slurm(&row, &paths, timeout, &cancel).await {
                    Ok(o) => o,
                    Err(e) => {
                        row.state = JobState::Failed;
                        row.detail = Some(e.to_string());
                        return this.save(row).await;
                    }
                };
                let features = std::fs::read_to_string(&paths.train)
                    .ok()
                    .and_then(|t| t.lines().next().map(str::to_owned))
                    .map(|h| h.split(',').map(str::to_owned).collect::<Vec<_>>())
                    .map(|mut h| {
                        h.pop();
                        h
                    })
                    .unwrap_or_default();
                this.finish(row, &paths, outcome, champion, features).await
            }));
        }
        Ok(handles)
    }

    /// A job ended: record a failure with its log tail, or run the gate.
    async fn finish(
        &self,
        mut row: JobRow,
        paths: &JobPaths,
        outcome: Outcome,
        champion: Option<ModelRow>,
        features: Vec<String>,
    ) -> Result<JobRow> {
        row.finished_at_ms = Some(drover_host::clock::now_ms());
        row.state = outcome.state();
        if let Outcome::Failed { exit_code } = outcome {
            row.exit_code = exit_code;
        }
        if outcome != Outcome::Succeeded {
            let tail = jobs::log_tail(&paths.log, LOG_TAIL_LINES);
            row.detail = Some(format!("job {}; last log lines:\n{tail}", row.state));
            tracing::warn!(job = row.id, state = %row.state, "training job did not succeed");
            return self.save(row).await;
        }
        row.exit_code = Some(0);
        let (candidate, trainer_metrics) = match jobs::check_outputs(paths) {
            Ok(x) => x,
            Err(e) => {
                row.state = JobState::Failed;
                row.detail = Some(e);
                return self.save(row).await;
            }
        };
        let before = row.clone();
        match self
            .gate(row, paths, champion, features, candidate, trainer_metrics)
            .await
        {
            Ok(row) => Ok(row),
            // Whatever broke in the gate, the job ends refused with the reason, not stuck.
            Err(e) => {
                let mut row = before;
                row.outcome = Some(JobOutcome::Refused);
                row.detail = Some(format!("evaluation failed: {e}"));
                self.save(row).await
            }
        }
    }

    /// Scores candidate and champion on the held-out rows, decides, registers.
    async fn gate(
        &self,
        mut row: JobRow,
        paths: &JobPaths,
        champion: Option<ModelRow>,
        features: Vec<String>,
        candidate: Vec<u8>,
        trainer_metrics: serde_json::Value,
    ) -> Result<JobRow> {
        let train_csv = std::fs::read_to_string(&paths.train).map_err(|source| JobError::Io {
            what: "cannot read",
            path: paths.train.clone(),
            source,
        })?;
        let models_dir = self.data_dir.join("models");
        let gate = self.policy.gate.clone();
        let scored = self
            .score(paths, &models_dir, champion.as_ref(), candidate.clone())
            .await?;
        let cand = match scored.0 {
            Ok(m) => m,
            Err(e) => {
                row.outcome = Some(JobOutcome::Refused);
                row.detail = Some(format!("candidate cannot be evaluated: {e}"));
                return self.save(row).await;
            }
        };
        let champ = scored.1;
        let decision = decide(&gate, &cand, champ.as_ref());
        let (cand_m, champ_m) = (cand.metrics, champ.as_ref().map(|c| c.metrics));
        row.metrics = Some(
            serde_json::json!({
                "candidate": metrics_json(&cand_m),
                "champion": champ_m.as_ref().map(metrics_json),
                "trainer": trainer_metrics,
                "gate": match &decision { Ok(e) | Err(e) => e },
            })
            .to_string(),
        );
        if let Err(reason) = decision {
            tracing::info!(job = row.id, %reason, "candidate refused");
            row.outcome = Some(JobOutcome::Refused);
            row.detail = Some(reason);
            return self.save(row).await;
        }
        let mut metrics = BTreeMap::from([
            ("accuracy".to_owned(), cand_m.accuracy),
            ("holdout_rows".to_owned(), cand_m.rows as f64),
        ]);
        if let Some(r) = cand_m.recent_accuracy {
            metrics.insert("recent_accuracy".into(), r);
        }
        if let Some(c) = &champ_m {
            metrics.insert("champion_accuracy".into(), c.accuracy);
            if let Some(r) = c.recent_accuracy {
                metrics.insert("champion_recent_accuracy".into(), r);
            }
        }
        let lineage = Lineage {
            parent: champion.as_ref().map(|c| ModelRef {
                name: c.name.clone(),
                version: c.version.clone(),
                digest: c.digest,
            }),
            training_job: Some(format!("job-{}", row.id)),
            dataset: row.dataset_hash.clone(),
            metrics,
        };
        // The first model of a policy was compared with no champion that ran in
        // production, so it is registered but not rolled out by itself.
        let first = champion.is_none();
        // The candidate's drift baseline is what it trained on (features only).
        let baseline_csv = strip_label_column(&train_csv, features.len());
        let signing = (self.signing)();
        let policy = self.policy.clone();
        let accepted = self
            .store
            .run(move |s| {
                on_candidate_accepted(
                    s,
                    &models_dir,
                    &signing,
                    &policy,
                    champion.as_ref(),
                    candidate,
                    baseline_csv,
                    lineage,
                    drover_host::clock::now_ms(),
                )
            })
            .await?;
        match accepted {
            Ok(a) => self.accepted(&mut row, a, first).await,
            Err(e) => {
                row.outcome = Some(JobOutcome::Refused);
                row.detail = Some(format!("registry refused the candidate: {e}"));
            }
        }
        self.save(row).await
    }

    /// Scores the candidate and the champion (if any) on the held-out rows, off the async
    /// runtime. The outer error is the champion's or the files'; the candidate's own
    /// failure to evaluate is a refusal, returned inside.
    async fn score(
        &self,
        paths: &JobPaths,
        models_dir: &Path,
        champion: Option<&ModelRow>,
        candidate: Vec<u8>,
    ) -> Result<(Result<Scores>, Option<Scores>)> {
        let holdout = dataset::read_holdout(&paths.holdout).map_err(JobError::from)?;
        let champion_bytes = match champion {
            Some(c) => Some(
                std::fs::read(crate::registry::onnx_path(models_dir, c)).map_err(|source| {
                    JobError::Io {
                        what: "cannot read champion model",
                        path: models_dir.to_owned(),
                        source,
                    }
                })?,
            ),
            None => None,
        };
        let (c, p) = tokio::task::spawn_blocking(move || {
            let c = evaluate(&candidate, &holdout);
            let p = champion_bytes.map(|b| evaluate(&b, &holdout)).transpose();
            (c, p)
        })
        .await
        .map_err(|e| ContinuousError::Task(e.to_string()))?;
        Ok((c, p?))
    }

    /// Records an accepted candidate on its job row and, by policy, starts its rollout.
    async fn accepted(&self, row: &mut JobRow, a: Accepted, first: bool) {
        row.outcome = Some(JobOutcome::Accepted);
        row.candidate_model = Some(format!("{}@{}", a.model.name, a.model.version));
        row.rollout_plan = a
            .rollout_plan
            .as_ref()
            .and_then(|t| serde_json::to_string(t).ok());
        row.detail = Some("candidate beats the champion; signed and registered".into());
        let model = format!("{}@{}", a.model.name, a.model.version);
        let handle = self.rollouts.as_ref().and_then(|w| w.upgrade());
        let (Some(template), Some(h)) = (&a.rollout_plan, handle) else {
            return;
        };
        if first {
            row.detail = Some(format!(
                "first model of the policy: signed and registered; with no champion to \
                 compare it with in production it is not rolled out by policy \
                 (start its first rollout with `drover rollout start --model {model}`)"
            ));
            return;
        }
        let started = match rollout_plan(template, &model) {
            Ok(plan) => h
                .start(plan, "continuous-training")
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        row.detail = Some(match started {
            Ok(r) => {
                tracing::info!(job = row.id, rollout = r.id, %model, "rollout started by policy");
                format!(
                    "candidate beats the champion; signed, registered and rolled out by policy (rollout {})",
                    r.id
                )
            }
            Err(e) => format!(
                "candidate beats the champion; signed and registered; rollout not started: {e}"
            ),
        });
    }
}

/// Builds the job's dataset and writes `train.csv` (for the trainer) and `holdout.csv`
/// (for the gate) into its directory.
fn write_dataset(
    base: Option<PathBuf>,
    fleet: &[crate::store::LabeledSample],
    holdout_fraction: f64,
    p: &JobPaths,
) -> std::result::Result<jobs::Dataset, JobError> {
    let base = match &base {
        Some(b) => {
            let text = std::fs::read_to_string(b).map_err(|source| JobError::Io {
                what: "cannot read base dataset",
                path: b.clone(),
                source,
            })?;
            Some(dataset::parse_labeled_csv(&text, &b.display().to_string())?)
        }
        None => None,
    };
    let d = dataset::build(base, fleet, holdout_fraction)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| JobError::Io {
            what: "cannot write",
            path,
            source,
        }
    };
    std::fs::create_dir_all(&p.dir).map_err(io(&p.dir))?;
    std::fs::write(&p.train, dataset::to_csv(&d.features, &d.train, false))
        .map_err(io(&p.train))?;
    std::fs::write(&p.holdout, dataset::to_csv(&d.features, &d.holdout, true))
        .map_err(io(&p.holdout))?;
    Ok(d)
}

fn strip_label_column(csv: &str, features: usize) -> String {
    csv.lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').take(features).collect();
            cells.join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
