//! The `Engine`: one per policy file. Scores drift windows, checks triggers, starts and
//! cancels jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_protocol::manifest::Manifest;
use drover_protocol::trust::SecretKey;
use tokio::sync::Notify;

use super::*;
use crate::drift::accuracy::{score_accuracy, AccuracyRules, Labelled};
use crate::drift::{self, Level, References, Score};
use crate::jobs::{local::LocalExecutor, slurm::SlurmConfig, JobError, JobSpec};
use crate::store::{Db, DriftReferenceRow, DriftWindowLevel, JobRow, JobState, Store};

/// The trigger an accuracy drop starts a job with (`accuracy_drop:<scope>`).
pub const ACCURACY_DROP: &str = "accuracy_drop";

/// At most this many missed windows are scored in one tick (a server that was down for
/// days does not score them all at once; older ones stay unscored).
const MAX_CATCH_UP: u64 = 12;

/// The drift windows due at `now_ms`: windows are `window_ms` long and aligned to
/// multiples of it since the Unix epoch, each scored once, after it ends. Those that
/// ended after `last_end` (the end of the last one scored) and by `now_ms`, oldest first,
/// at most [`MAX_CATCH_UP`]. A window that would reach back before `last_end` (scored by
/// an older build or an explicit call) starts there instead: windows never overlap.
pub fn next_windows(last_end: Option<u64>, now_ms: u64, window_ms: u64) -> Vec<(u64, u64)> {
    if window_ms == 0 {
        return Vec::new();
    }
    let newest_end = now_ms - now_ms % window_ms;
    let mut out = Vec::new();
    let mut end = newest_end;
    while end >= window_ms && (out.len() as u64) < MAX_CATCH_UP {
        if last_end.is_some_and(|l| l >= end) {
            break;
        }
        let start = (end - window_ms).max(last_end.unwrap_or(0));
        out.push((start, end));
        end -= window_ms;
    }
    out.reverse();
    out
}

/// Of the scopes whose last `n` windows since the levels' start are all at `alert` (for
/// the policy's own model versions), a label group first (it says where), then the
/// fleet, then a single device.
fn sustained(levels: &[DriftWindowLevel], digests: &HashSet<String>, n: u64) -> Option<String> {
    let mut by_scope: BTreeMap<&str, BTreeMap<u64, Level>> = BTreeMap::new();
    for w in levels {
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
    let rank = |scope: &str| {
        if scope.starts_with("device:") {
            2
        } else if scope == drift::SCOPE_FLEET {
            1
        } else {
            0
        }
    };
    by_scope
        .into_iter()
        .filter(|(_, windows)| {
            let last: Vec<&Level> = windows.values().rev().take(n as usize).collect();
            last.len() as u64 == n && last.iter().all(|l| **l == Level::Alert)
        })
        .map(|(scope, _)| scope)
        .min_by_key(|scope| rank(scope))
        .map(str::to_owned)
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
    pub(super) store: Db,
    pub(super) data_dir: PathBuf,
    /// The key accepted candidates are signed with, read at signing time (a running
    /// server swaps in a rotated key without restarting the engine).
    pub(super) signing: SigningKeySource,
    pub policy: Policy,
    pub(super) policy_dir: PathBuf,
    pub(super) local: LocalExecutor,
    pub slurm: SlurmConfig,
    /// How often a Slurm job's state is polled.
    pub poll_interval: Duration,
    pub(super) cancels: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Where accepted candidates are rolled out by the policy's `[rollout]` plan (set by
    /// `drover serve`; without it an accepted candidate is only registered).
    pub rollouts: Option<crate::rollout::driver::WeakRolloutHandle>,
    /// The end of the last window [`Engine::tick`] scored (read from the store first).
    pub(super) last_window_end: Mutex<Option<u64>>,
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
            last_window_end: Mutex::new(None),
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

    pub(super) async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.store.run(f).await?
    }

    /// Scores the window `[from, to)` for every scope and stores the scores: data drift
    /// against each model's reference (recording new reference windows for models whose
    /// rollout completed), and accuracy from the labels that came back in the window.
    pub async fn score_drift(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Score>> {
        let window = (from_ms, to_ms);
        let group_by = self.policy.drift.group_by.clone();
        let t = self.policy.thresholds();
        let keep_ms = self.policy.drift.retention_hours.saturating_mul(3_600_000);
        let min_rows = self.policy.drift.reference_min_rows;
        let acc = self.policy.accuracy.clone();
        self.with_store(move |s| {
            let sketches: Vec<drift::SketchRow> = s
                .drift_sketches(window.0, window.1)?
                .into_iter()
                .map(Into::into)
                .collect();
            let labelled: Vec<Labelled> = s
                .labeled_predictions(window.0, window.1)?
                .into_iter()
                .map(Into::into)
                .collect();
            let digests: BTreeSet<[u8; 32]> = sketches
                .iter()
                .map(|k| k.model_digest)
                .chain(labelled.iter().map(|l| l.model_digest))
                .collect();
            let mut baselines = BTreeMap::new();
            let mut floors = BTreeMap::new();
            for d in digests {
                let Some(row) = s.model_by_digest(&d)? else {
                    continue;
                };
                let m = Manifest::decode(&row.payload).map_err(|_| {
                    ContinuousError::BadManifest(format!("{}@{}", row.name, row.version))
                })?;
                if let Some(f) = acc.floor(m.lineage.metrics.get("accuracy").copied()) {
                    floors.insert(d, f);
                }
                if let Some(b) = m.baseline {
                    baselines.insert(d, b);
                }
            }
            let references: References = s
                .drift_references()?
                .into_iter()
                .map(|r| ((r.model_digest, r.scope.clone()), r.into()))
                .collect();
            let mut scores =
                drift::score_window_with(&baselines, &references, &sketches, &group_by, window, &t);
            if min_rows > 0 {
                let done = s.completed_rollouts()?;
                let fresh =
                    drift::new_references(&sketches, &group_by, &references, &done, window, min_rows);
                let rows: Vec<DriftReferenceRow> = fresh
                    .into_iter()
                    .map(|((model_digest, scope), sk)| DriftReferenceRow {
                        model_digest,
                        scope,
                        window_start_ms: window.0,
                        window_end_ms: window.1,
                        recorded_at_ms: window.1,
                        features: sk.features,
                        predictions: sk.predictions,
                    })
                    .collect();
                for r in &rows {
                    tracing::info!(scope = %r.scope, model = %drover_protocol::topics::hex32(&r.model_digest),
                        "drift reference window recorded");
                }
                s.insert_drift_references(&rows)?;
            }
            let rules = AccuracyRules {
                floors,
                confidence: acc.confidence,
                min_labels: acc.min_labels,
            };
            scores.extend(score_accuracy(&labelled, &group_by, window, &rules));
            s.insert_drift_scores(&scores.iter().map(Into::into).collect::<Vec<_>>())?;
            s.prune_drift_scores(to_ms.saturating_sub(keep_ms))?;
            Ok(scores)
        })
        .await
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
            // The policy's model, every version: what drift is scored on and when it was
            // last registered.
            let own_models: Vec<_> = s
                .models()?
                .into_iter()
                .filter(|m| m.name == model)
                .collect();
            let digests: HashSet<String> = own_models
                .iter()
                .map(|m| drover_protocol::topics::hex32(&m.digest))
                .collect();
            let cooling = tr.cooldown_secs > 0
                && recent
                    .iter()
                    .find(|j| {
                        j.trigger.starts_with("drift:") || j.trigger.starts_with(ACCURACY_DROP)
                    })
                    .is_some_and(|j| {
                        now_ms.saturating_sub(j.created_at_ms) < tr.cooldown_secs * 1000
                    });
            for (n, accuracy, name) in [
                (tr.sustained_windows, false, "drift"),
                (tr.accuracy_drop_windows, true, ACCURACY_DROP),
            ] {
                if n == 0 || cooling {
                    continue;
                }
                let n = u64::from(n);
                // Only windows after the last job count: its data already answered them.
                let since = now_ms
                    .saturating_sub(w * (n + 1))
                    .max(last_job.map_or(0, |t| t + 1));
                let levels = s.drift_window_levels(since, accuracy)?;
                if let Some(scope) = sustained(&levels, &digests, n) {
                    return Ok(Some(format!("{name}:{scope}")));
                }
            }
            if tr.min_new_labels > 0 && s.labels_since(last_job.unwrap_or(0))? >= tr.min_new_labels
            {
                return Ok(Some("labels".into()));
            }
            if tr.every_hours > 0.0 {
                let every = (tr.every_hours * 3_600_000.0) as u64;
                // Counted from the last job stored, else from the newest registration of
                // the policy's model, so a restart never fires it early; with neither
                // (nothing trained, nothing published) it fires to make the first model.
                let newest_model = own_models.iter().map(|m| m.created_at_ms).max();
                if last_job
                    .or(newest_model)
                    .is_none_or(|t| now_ms.saturating_sub(t) >= every)
                {
                    return Ok(Some("schedule".into()));
                }
            }
            Ok(None)
        })
        .await
    }

    /// What `drover serve` calls every tick: scores the windows due (see
    /// [`Engine::score_due_windows`]), then starts a job if a trigger fires now.
    pub async fn tick(self: &Arc<Self>, now_ms: u64) -> Result<Tick> {
        let tick = self.score_due_windows(now_ms).await?;
        self.start_if_due(tick, now_ms).await
    }

    /// Scores each policy window that ended since the last one scored (see
    /// [`next_windows`]: windows never overlap, whatever the tick); the tick reports the
    /// last of them.
    pub async fn score_due_windows(&self, now_ms: u64) -> Result<Tick> {
        let w = self.policy.drift.window_secs * 1000;
        let last = *self
            .last_window_end
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last = match last {
            Some(l) => Some(l),
            None => self.with_store(|s| Ok(s.last_drift_window_end()?)).await?,
        };
        let mut tick = Tick::default();
        for (from, to) in next_windows(last, now_ms, w) {
            tick.scores = self.score_drift(from, to).await?;
            tick.window = (from, to);
            *self
                .last_window_end
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(to);
        }
        Ok(tick)
    }

    /// [`Engine::tick`] for an explicit window `[from, to)` (`to` is "now" for triggers).
    pub async fn tick_window(self: &Arc<Self>, from_ms: u64, now_ms: u64) -> Result<Tick> {
        let scores = self.score_drift(from_ms, now_ms).await?;
        let tick = Tick {
            window: (from_ms, now_ms),
            scores,
            ..Default::default()
        };
        self.start_if_due(tick, now_ms).await
    }

    async fn start_if_due(self: &Arc<Self>, mut tick: Tick, now_ms: u64) -> Result<Tick> {
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
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
