//! Continuous training: from drifting data on devices to a validated, signed model.
//!
//! One [`Engine`] per policy file. [`Engine::tick`] scores the latest drift window,
//! stores the scores (the history `drover drift` shows), checks the policy's triggers and
//! starts a training job when one fires. [`Engine::run_job`] carries a job through its
//! life: dataset (base CSV + labeled fleet samples, held-out split), executor (local
//! process or Slurm), then the evaluation gate, where the control plane itself scores the
//! candidate and the champion with tract on the same held-out rows. An accepted candidate
//! goes through [`on_candidate_accepted`]: signed, registered with its lineage, and
//! returned with the policy's rollout plan template for the rollout engine.
//!
//! Invariant: a job that fails, times out, is cancelled or is refused by the gate changes
//! nothing but its own row (state, log tail, reason).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_protocol::manifest::{self, Lineage, Manifest, TensorData, TensorValue};
use drover_protocol::messages::ModelRef;
use drover_protocol::trust::SecretKey;
use drover_runtime::Model;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::drift::{self, Level, Score, Thresholds};
use crate::jobs::{
    self, dataset, local::LocalExecutor, slurm::SlurmConfig, slurm::SlurmState, ExecutorKind,
    JobError, JobPaths, JobSpec, Outcome, Row,
};
use crate::registry::{self, PublishRequest, RegistryError};
use crate::store::{Db, JobOutcome, JobRow, JobState, ModelRow, Store, StoreError};

/// Log lines a failed job is reported with.
pub const LOG_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ContinuousError {
    #[error("policy {path}: {detail}")]
    Policy { path: String, detail: String },
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("stored model {0} has an undecodable manifest")]
    BadManifest(String),
    #[error("{0}")]
    Eval(String),
    #[error("background task failed: {0}")]
    Task(String),
}

type Result<T> = std::result::Result<T, ContinuousError>;

/// Drift scoring settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftPolicy {
    /// Length of one scoring window (sketches whose window ends inside it are merged).
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Device labels scores are also grouped by (e.g. `["site"]`).
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default = "default_warn")]
    pub psi_warn: f64,
    #[serde(default = "default_alert")]
    pub psi_alert: f64,
    /// A level is raised only at this chi-square p-value or lower (lower it when many
    /// scopes and features are scored per window, so chance alerts stay rare).
    #[serde(default = "default_max_p")]
    pub max_p_value: f64,
    /// Stored scores older than this are deleted.
    #[serde(default = "default_retention")]
    pub retention_hours: u64,
}

fn default_retention() -> u64 {
    24 * 7
}

fn default_window() -> u64 {
    300
}
fn default_warn() -> f64 {
    drift::DEFAULT_PSI_WARN
}
fn default_alert() -> f64 {
    drift::DEFAULT_PSI_ALERT
}
fn default_max_p() -> f64 {
    drift::DEFAULT_MAX_P_VALUE
}

impl Default for DriftPolicy {
    fn default() -> Self {
        Self {
            window_secs: default_window(),
            group_by: Vec::new(),
            psi_warn: default_warn(),
            psi_alert: default_alert(),
            max_p_value: default_max_p(),
            retention_hours: default_retention(),
        }
    }
}

/// When a job starts by itself (each `0` turns that trigger off).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// This many consecutive windows at `alert` in one scope.
    #[serde(default)]
    pub sustained_windows: u32,
    /// This many labels received since the last job.
    #[serde(default)]
    pub min_new_labels: u64,
    /// A job at least this often.
    #[serde(default)]
    pub every_hours: f64,
    /// After a job that drift started, drift starts no other for this long: its model
    /// needs time to roll out and be judged on fresh data (0: no pause).
    #[serde(default)]
    pub cooldown_secs: u64,
}

/// What a candidate must show to replace the champion.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePolicy {
    /// How much the main metric (accuracy on all held-out rows) may drop.
    #[serde(default)]
    pub max_regression: f64,
    /// How much accuracy on the recent (fleet) held-out rows must improve.
    #[serde(default = "default_margin")]
    pub min_recent_improvement: f64,
}

fn default_margin() -> f64 {
    0.01
}

impl Default for GatePolicy {
    fn default() -> Self {
        Self {
            max_regression: 0.0,
            min_recent_improvement: default_margin(),
        }
    }
}

/// A continuous-training policy file (TOML).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    /// The model this policy retrains: its latest published version is the champion.
    pub model: String,
    /// Job spec file, relative to the policy file.
    pub job: PathBuf,
    #[serde(default)]
    pub drift: DriftPolicy,
    #[serde(default)]
    pub triggers: Triggers,
    #[serde(default)]
    pub gate: GatePolicy,
    /// Rollout plan template for accepted candidates, handed to the rollout engine as is.
    pub rollout: Option<toml::Table>,
}

impl Policy {
    pub fn parse(text: &str, origin: &str) -> Result<Policy> {
        let err = |detail: String| ContinuousError::Policy {
            path: origin.to_owned(),
            detail,
        };
        let p: Policy = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut problems = Vec::new();
        if p.version != 1 {
            problems.push(format!("version = {} (this build reads 1)", p.version));
        }
        if manifest::validate_model_name(&p.model).is_err() {
            problems.push(format!("model {:?} is not a valid model name", p.model));
        }
        if p.drift.window_secs == 0 {
            problems.push("drift.window_secs must be above 0".into());
        }
        if !(p.drift.psi_warn > 0.0 && p.drift.psi_warn <= p.drift.psi_alert) {
            problems.push(format!(
                "drift.psi_warn = {} must be above 0 and at most psi_alert = {}",
                p.drift.psi_warn, p.drift.psi_alert
            ));
        }
        if !(p.drift.max_p_value > 0.0 && p.drift.max_p_value <= 1.0) {
            problems.push(format!(
                "drift.max_p_value = {} must be within (0, 1]",
                p.drift.max_p_value
            ));
        }
        if !(p.triggers.every_hours >= 0.0 && p.triggers.every_hours.is_finite()) {
            problems.push("triggers.every_hours must be >= 0".into());
        }
        if !(0.0..1.0).contains(&p.gate.max_regression)
            || !(0.0..1.0).contains(&p.gate.min_recent_improvement)
        {
            problems.push("gate margins must be within [0, 1)".into());
        }
        if problems.is_empty() {
            Ok(p)
        } else {
            Err(err(problems.join("; ")))
        }
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| ContinuousError::Policy {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Policy::parse(&text, &path.display().to_string())
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            psi_warn: self.drift.psi_warn,
            psi_alert: self.drift.psi_alert,
            max_p_value: self.drift.max_p_value,
        }
    }
}

// ---- evaluation ----

/// A model's scores on the held-out rows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The main metric: accuracy over every held-out row.
    pub accuracy: f64,
    /// Accuracy over the held-out rows that came from the fleet.
    pub recent_accuracy: Option<f64>,
    pub rows: u64,
    pub recent_rows: u64,
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
    };
    let model = registry::publish(store, models_dir, &req, signing, now_ms)?;
    Ok(Accepted {
        model,
        rollout_plan: policy.rollout.clone(),
    })
}

// ---- the engine ----

/// What one tick did.
#[derive(Debug, Default)]
pub struct Tick {
    pub window: (u64, u64),
    pub scores: Vec<Score>,
    /// Why a job was started, if one was.
    pub trigger: Option<String>,
    pub job: Option<tokio::task::JoinHandle<Result<JobRow>>>,
}

/// Gives the current signing key.
pub type SigningKeySource = Arc<dyn Fn() -> SecretKey + Send + Sync>;

fn fixed_key(key: &SecretKey) -> SigningKeySource {
    let seed = key.seed();
    Arc::new(move || SecretKey::from_seed(seed))
}

/// Runs one policy: drift scoring, triggers, jobs, the gate.
pub struct Engine {
    store: Db,
    data_dir: PathBuf,
    /// The key accepted candidates are signed with, read at signing time (a running
    /// server swaps in a rotated key without restarting the engine).
    signing: SigningKeySource,
    pub policy: Policy,
    policy_dir: PathBuf,
    local: LocalExecutor,
    pub slurm: SlurmConfig,
    /// How often a Slurm job's state is polled.
    pub poll_interval: Duration,
    cancels: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Where accepted candidates are rolled out by the policy's `[rollout]` plan (set by
    /// `drover serve`; without it an accepted candidate is only registered).
    pub rollouts: Option<crate::rollout::driver::WeakRolloutHandle>,
}

/// The policy's `[rollout]` table as a rollout plan for `model` (`name@version`).
pub fn rollout_plan(
    template: &toml::Table,
    model: &str,
) -> std::result::Result<crate::rollout::Plan, String> {
    let mut t = template.clone();
    t.insert("model".into(), toml::Value::String(model.to_owned()));
    let plan: crate::rollout::Plan = toml::Value::Table(t)
        .try_into()
        .map_err(|e| format!("the policy's [rollout] plan is invalid: {e}"))?;
    plan.validate().map_err(|e| e.to_string())?;
    Ok(plan)
}

impl Engine {
    pub fn new(
        store: Db,
        data_dir: PathBuf,
        signing: &SecretKey,
        policy: Policy,
        policy_dir: PathBuf,
        local_concurrency: usize,
    ) -> Self {
        Self {
            store,
            data_dir,
            signing: fixed_key(signing),
            policy,
            policy_dir,
            local: LocalExecutor::new(local_concurrency),
            slurm: SlurmConfig::default(),
            poll_interval: Duration::from_millis(500),
            cancels: Mutex::new(HashMap::new()),
            rollouts: None,
        }
    }

    /// Signs accepted candidates with whatever key `source` gives at signing time.
    pub fn set_signing_source(&mut self, source: SigningKeySource) {
        self.signing = source;
    }

    /// Loads a policy file and builds its engine.
    pub fn from_policy_file(
        store: Db,
        data_dir: PathBuf,
        signing: &SecretKey,
        path: &Path,
        local_concurrency: usize,
    ) -> Result<Self> {
        let policy = Policy::load(path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        Ok(Self::new(
            store,
            data_dir,
            signing,
            policy,
            dir,
            local_concurrency,
        ))
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.store.run(f).await?
    }

    /// Scores the window `[from, to)` for every scope and stores the scores.
    pub async fn score_drift(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Score>> {
        let window = (from_ms, to_ms);
        let group_by = self.policy.drift.group_by.clone();
        let t = self.policy.thresholds();
        let keep_ms = self.policy.drift.retention_hours.saturating_mul(3_600_000);
        let scores = self
            .with_store(move |s| {
                let sketches: Vec<drift::SketchRow> = s
                    .drift_sketches(window.0, window.1)?
                    .into_iter()
                    .map(Into::into)
                    .collect();
                let mut baselines = BTreeMap::new();
                for d in sketches.iter().map(|k| k.model_digest) {
                    if baselines.contains_key(&d) {
                        continue;
                    }
                    let Some(row) = s.model_by_digest(&d)? else {
                        continue;
                    };
                    let m: Manifest = postcard::from_bytes(&row.payload).map_err(|_| {
                        ContinuousError::BadManifest(format!("{}@{}", row.name, row.version))
                    })?;
                    if let Some(b) = m.baseline {
                        baselines.insert(d, b);
                    }
                }
                let scores = drift::score_window(&baselines, &sketches, &group_by, window, &t);
                s.insert_drift_scores(&scores.iter().map(Into::into).collect::<Vec<_>>())?;
                s.prune_drift_scores(to_ms.saturating_sub(keep_ms))?;
                Ok(scores)
            })
            .await?;
        Ok(scores)
    }

    /// The first trigger that fires now, if no job of this policy is under way.
    pub async fn due_trigger(&self, now_ms: u64) -> Result<Option<String>> {
        let tr = self.policy.triggers.clone();
        let w = self.policy.drift.window_secs * 1000;
        let model = self.policy.model.clone();
        self.with_store(move |s| {
            if !s
                .jobs_in_state(&[JobState::Queued, JobState::Running])?
                .is_empty()
            {
                return Ok(None);
            }
            let recent = s.jobs(100)?;
            let last_job = recent.first().map(|j| j.created_at_ms);
            let cooling = tr.cooldown_secs > 0
                && recent
                    .iter()
                    .find(|j| j.trigger.starts_with("drift:"))
                    .is_some_and(|j| {
                        now_ms.saturating_sub(j.created_at_ms) < tr.cooldown_secs * 1000
                    });
            if tr.sustained_windows > 0 && !cooling {
                let n = u64::from(tr.sustained_windows);
                // Only windows after the last job count: its data already answered them.
                let since = now_ms
                    .saturating_sub(w * (n + 1))
                    .max(last_job.map_or(0, |t| t + 1));
                let levels = s.drift_window_levels(since)?;
                // Only drift of this policy's model (any version) triggers its training.
                let digests: std::collections::HashSet<String> = s
                    .models()?
                    .into_iter()
                    .filter(|m| m.name == model)
                    .map(|m| drover_protocol::topics::hex32(&m.digest))
                    .collect();
                let mut by_scope: BTreeMap<&str, BTreeMap<u64, Level>> = BTreeMap::new();
                for w in &levels {
                    if !digests.contains(&w.model_digest) {
                        continue;
                    }
                    let l = by_scope
                        .entry(&w.scope)
                        .or_default()
                        .entry(w.window_end_ms)
                        .or_insert(Level::Ok);
                    *l = (*l).max(w.level.into());
                }
                // Of the scopes in sustained drift, name a label group first (it says
                // where), then the fleet, then a single device.
                let rank = |scope: &str| {
                    if scope.starts_with("device:") {
                        2
                    } else if scope == drift::SCOPE_FLEET {
                        1
                    } else {
                        0
                    }
                };
                let sustained = by_scope
                    .into_iter()
                    .filter(|(_, windows)| {
                        let last: Vec<&Level> = windows.values().rev().take(n as usize).collect();
                        last.len() as u64 == n && last.iter().all(|l| **l == Level::Alert)
                    })
                    .map(|(scope, _)| scope)
                    .min_by_key(|scope| rank(scope));
                if let Some(scope) = sustained {
                    return Ok(Some(format!("drift:{scope}")));
                }
            }
            if tr.min_new_labels > 0 && s.labels_since(last_job.unwrap_or(0))? >= tr.min_new_labels
            {
                return Ok(Some("labels".into()));
            }
            if tr.every_hours > 0.0 {
                let every = (tr.every_hours * 3_600_000.0) as u64;
                if last_job.is_none_or(|t| now_ms.saturating_sub(t) >= every) {
                    return Ok(Some("schedule".into()));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Scores the policy's window ending now, then starts a job if a trigger fires.
    pub async fn tick(self: &Arc<Self>, now_ms: u64) -> Result<Tick> {
        let w = self.policy.drift.window_secs * 1000;
        self.tick_window(now_ms.saturating_sub(w), now_ms).await
    }

    /// [`Engine::tick`] for an explicit window `[from, to)` (`to` is "now" for triggers).
    pub async fn tick_window(self: &Arc<Self>, from_ms: u64, now_ms: u64) -> Result<Tick> {
        let scores = self.score_drift(from_ms, now_ms).await?;
        let mut tick = Tick {
            window: (from_ms, now_ms),
            scores,
            ..Default::default()
        };
        if let Some(trigger) = self.due_trigger(now_ms).await? {
            tracing::info!(%trigger, model = %self.policy.model, "training triggered");
            let spec = self.load_job_spec()?;
            let this = Arc::clone(self);
            let t = trigger.clone();
            tick.job = Some(tokio::spawn(
                async move { this.run_job(spec, &t, now_ms).await },
            ));
            tick.trigger = Some(trigger);
        }
        Ok(tick)
    }

    /// The policy's job spec.
    pub fn load_job_spec(&self) -> Result<(JobSpec, String, PathBuf)> {
        let path = self.policy_dir.join(&self.policy.job);
        let text = std::fs::read_to_string(&path).map_err(|source| JobError::Io {
            what: "cannot read job spec",
            path: path.clone(),
            source,
        })?;
        let spec = JobSpec::parse(&text, &path.display().to_string())?;
        Ok((
            spec,
            text,
            path.parent().unwrap_or(Path::new(".")).to_owned(),
        ))
    }

    /// Asks a running job to stop (local: kill; Slurm: scancel).
    pub fn cancel(&self, job_id: u64) -> bool {
        let n = self
            .cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&job_id)
            .cloned();
        n.map(|n| n.notify_one()).is_some()
    }

    /// Runs a job from start to gate. Returns its final row; the job's own failure is in
    /// the row (`state`, `detail`), not an `Err`.
    pub async fn run_job(
        self: &Arc<Self>,
        spec: (JobSpec, String, PathBuf),
        trigger: &str,
        now_ms: u64,
    ) -> Result<JobRow> {
        self.run_job_inner(spec, trigger, now_ms, None).await
    }

    /// [`Engine::run_job`], sending the job's id on `id` as soon as it is recorded.
    pub async fn run_job_reporting(
        self: &Arc<Self>,
        spec: (JobSpec, String, PathBuf),
        trigger: &str,
        now_ms: u64,
        id: tokio::sync::oneshot::Sender<u64>,
    ) -> Result<JobRow> {
        self.run_job_inner(spec, trigger, now_ms, Some(id)).await
    }

    async fn run_job_inner(
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
                let champion = s
                    .models()?
                    .into_iter()
                    .filter(|m| m.name == model)
                    .max_by_key(|m| (manifest::parse_semver(&m.version), m.created_at_ms));
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

    async fn save(&self, row: JobRow) -> Result<JobRow> {
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
        let holdout = dataset::read_holdout(&paths.holdout).map_err(JobError::from)?;
        let train_csv = std::fs::read_to_string(&paths.train).map_err(|source| JobError::Io {
            what: "cannot read",
            path: paths.train.clone(),
            source,
        })?;
        let models_dir = self.data_dir.join("models");
        let champion_bytes = match &champion {
            Some(c) => Some(
                std::fs::read(models_dir.join(drover_protocol::topics::hex32(&c.sha256))).map_err(
                    |source| JobError::Io {
                        what: "cannot read champion model",
                        path: models_dir.clone(),
                        source,
                    },
                )?,
            ),
            None => None,
        };
        let gate = self.policy.gate.clone();
        let cand_bytes = candidate.clone();
        let scored = tokio::task::spawn_blocking(move || {
            let c = evaluate(&cand_bytes, &holdout);
            let p = champion_bytes.map(|b| evaluate(&b, &holdout)).transpose();
            (c, p)
        })
        .await
        .map_err(|e| ContinuousError::Task(e.to_string()))?;
        let cand_m = match scored.0 {
            Ok(m) => m,
            Err(e) => {
                row.outcome = Some(JobOutcome::Refused);
                row.detail = Some(format!("candidate cannot be evaluated: {e}"));
                return self.save(row).await;
            }
        };
        let champ_m = scored.1?;
        row.metrics = Some(
            serde_json::json!({
                "candidate": cand_m,
                "champion": champ_m,
                "trainer": trainer_metrics,
            })
            .to_string(),
        );
        if let Err(reason) = decide(&gate, &cand_m, champ_m.as_ref()) {
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
            Ok(a) => {
                row.outcome = Some(JobOutcome::Accepted);
                row.candidate_model = Some(format!("{}@{}", a.model.name, a.model.version));
                row.rollout_plan = a
                    .rollout_plan
                    .as_ref()
                    .and_then(|t| serde_json::to_string(t).ok());
                row.detail = Some("candidate beats the champion; signed and registered".into());
                let model = format!("{}@{}", a.model.name, a.model.version);
                let handle = self.rollouts.as_ref().and_then(|w| w.upgrade());
                match (&a.rollout_plan, handle) {
                    (Some(_), Some(_)) if first => {
                        row.detail = Some(format!(
                            "first model of the policy: signed and registered; with no champion to \
                             compare it with in production it is not rolled out by policy \
                             (start its first rollout with `drover rollout start --model {model}`)"
                        ));
                    }
                    (Some(t), Some(h)) => match rollout_plan(t, &model) {
                        Ok(plan) => match h.start(plan, "continuous-training").await {
                            Ok(r) => {
                                tracing::info!(job = row.id, rollout = r.id, %model, "rollout started by policy");
                                row.detail = Some(format!(
                                    "candidate beats the champion; signed, registered and rolled out by policy (rollout {})",
                                    r.id
                                ));
                            }
                            Err(e) => {
                                row.detail = Some(format!(
                                    "candidate beats the champion; signed and registered; rollout not started: {e}"
                                ))
                            }
                        },
                        Err(e) => {
                            row.detail = Some(format!(
                                "candidate beats the champion; signed and registered; rollout not started: {e}"
                            ))
                        }
                    },
                    (Some(_), None) => {}
                    (None, _) => {}
                }
            }
            Err(e) => {
                row.outcome = Some(JobOutcome::Refused);
                row.detail = Some(format!("registry refused the candidate: {e}"));
            }
        }
        self.save(row).await
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

/// Starts drift scoring and continuous training when a policy is configured: re-attaches
/// to Slurm jobs left running, then ticks until `stop` turns true. A policy that does not
/// load stops the server with the reason (the operator asked for it to run).
pub async fn start(
    app: &crate::app::App,
    store: &crate::store::Db,
    rollouts: crate::rollout::driver::WeakRolloutHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Option<Arc<Engine>>, Option<tokio::task::JoinHandle<()>>)> {
    let Some(cfg) = app.settings.continuous.clone() else {
        return Ok((None, None));
    };
    let mut engine = Engine::from_policy_file(
        store.clone(),
        app.paths.data_dir().to_owned(),
        &app.keys.current().signing,
        &cfg.policy,
        cfg.local_jobs,
    )?;
    engine.slurm = SlurmConfig {
        bin_dir: cfg.slurm_bin_dir.clone(),
        slurm_conf: cfg.slurm_conf.clone(),
    };
    engine.rollouts = Some(rollouts);
    // After `drover keys rotate` the engine signs with the new key, like the rest of serve.
    let keys = app.keys.clone();
    engine.set_signing_source(Arc::new(move || {
        SecretKey::from_seed(keys.current().signing.seed())
    }));
    let engine = Arc::new(engine);
    if let Err(e) = engine.reattach().await {
        tracing::error!(error = %e, "cannot re-attach to training jobs");
    }
    let e = Arc::clone(&engine);
    let clock = Arc::clone(&app.clock);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.tick);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match e.tick(clock.unix_ms()).await {
                Ok(t) => {
                    if let Some(trigger) = t.trigger {
                        tracing::info!(%trigger, "training job started");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "continuous tick failed"),
            }
        }
    });
    Ok((Some(engine), Some(task)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn shipped_example_policy_and_job_specs_parse() {
        let p = Policy::parse(
            include_str!("../trainers/examples/policy.toml"),
            "policy.toml",
        );
        assert!(p.as_ref().is_ok_and(|p| p.rollout.is_some()), "{p:?}");
        let template = p.unwrap().rollout.unwrap();
        let plan = rollout_plan(&template, "classifier@1.0.1").unwrap();
        assert!(plan.shadow.is_some() && plan.waves.len() == 3, "{plan:?}");
        assert!(rollout_plan(&toml::Table::new(), "classifier@1.0.1").is_err());
        for (name, text) in [
            (
                "builtin",
                include_str!("../trainers/examples/job-builtin.toml"),
            ),
            (
                "sklearn",
                include_str!("../trainers/examples/job-sklearn.toml"),
            ),
            ("slurm", include_str!("../trainers/examples/job-slurm.toml")),
        ] {
            let j = JobSpec::parse(text, name);
            assert!(j.is_ok(), "{name}: {j:?}");
        }
    }

    #[test]
    fn versions_count_up_by_patch() {
        assert_eq!(next_version(Some("1.2.3")), "1.2.4");
        assert_eq!(next_version(None), "1.0.0");
    }

    #[test]
    fn policy_problems_are_reported_together() {
        let e = Policy::parse(
            "version = 3\nmodel = \"a b\"\njob = \"j.toml\"\n[drift]\nwindow_secs = 0\n",
            "p.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        for n in ["version = 3", "model \"a b\"", "window_secs"] {
            assert!(e.contains(n), "{n} in {e}");
        }
    }
}
