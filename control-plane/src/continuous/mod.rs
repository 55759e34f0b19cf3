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
//! Layout: [`policy`] (the policy file), [`evaluation`] (held-out scoring, the gate's
//! decision, registration of an accepted candidate), [`engine`] (the `Engine`: drift
//! windows, triggers, job control), [`job_run`] (a job's life: dataset, executor, gate).
//!
//! Invariant: a job that fails, times out, is cancelled or is refused by the gate changes
//! nothing but its own row (state, log tail, reason).

use std::sync::Arc;

use drover_protocol::trust::SecretKey;

use crate::jobs::{slurm::SlurmConfig, JobError};
use crate::registry::RegistryError;
use crate::store::StoreError;

mod engine;
mod evaluation;
mod job_run;
mod policy;

pub use self::engine::next_windows;
pub use self::engine::{Engine, SigningKeySource, Tick};
pub use self::evaluation::{
    champion, decide, evaluate, metrics_json, on_candidate_accepted, Accepted, Metrics, Scores,
};
pub use self::policy::{rollout_plan, AccuracyPolicy, DriftPolicy, GatePolicy, Policy, Triggers};

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
