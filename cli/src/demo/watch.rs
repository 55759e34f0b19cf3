//! Waiting on the control plane through its HTTP API, with progress bars: devices online,
//! training jobs, rollouts; and the report rows read back from it (accepted models, rollout
//! waves).

use std::time::{Duration, Instant};

use anyhow::bail;
use drover_control_plane::api::JobView;
use drover_control_plane::api::{ModelView, RolloutReport, RolloutView};
use indicatif::{ProgressBar, ProgressStyle};

use super::report::{ModelRow, RolloutRow};
use super::WAIT;
use crate::client::Client;

/// A progress bar in the demo's style.
pub(super) fn bar(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("  {msg:<40} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Prints a chapter heading.
pub(super) fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

/// The version of a `name@version` model reference.
pub(super) fn version_of(model: &str) -> String {
    model.rsplit_once('@').map_or(model, |(_, v)| v).to_owned()
}

/// Waits for a training job to end.
pub(super) async fn wait_job(client: &Client, id: u64) -> anyhow::Result<JobView> {
    let deadline = Instant::now() + WAIT;
    loop {
        let j: JobView = client.get(&format!("/v1/train/jobs/{id}")).await?;
        if !matches!(j.state.as_str(), "queued" | "running") {
            return Ok(j);
        }
        if Instant::now() > deadline {
            bail!("training job {id} still {} after {WAIT:?}", j.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The model an accepted job registered, or why there is none.
pub(super) async fn accepted_model(
    client: &Client,
    job: &JobView,
    since: Instant,
) -> anyhow::Result<ModelRow> {
    let (Some("accepted"), Some(model)) = (job.outcome.as_deref(), job.candidate_model.as_deref())
    else {
        bail!(
            "training job {} ended {} ({}): {}",
            job.id,
            job.state,
            job.outcome.as_deref().unwrap_or("no outcome"),
            job.detail.as_deref().unwrap_or("")
        );
    };
    let (name, version) = model.split_once('@').unwrap_or((model, ""));
    let m: ModelView = client.get(&format!("/v1/models/{name}/{version}")).await?;
    let metric = |who: &str, what: &str| job.metrics.as_ref().and_then(|v| v[who][what].as_f64());
    Ok(ModelRow {
        model: model.to_owned(),
        job: job.id,
        trigger: job.trigger.clone(),
        parent: job.parent_model.clone(),
        holdout_accuracy: metric("candidate", "accuracy"),
        recent_accuracy: metric("candidate", "recent_accuracy"),
        champion_recent_accuracy: metric("champion", "recent_accuracy"),
        train_secs: since.elapsed().as_secs_f64(),
        key_id: m.key_id,
    })
}

/// A rollout's waves and durations from its report.
pub(super) async fn rollout_row(client: &Client, id: u64) -> anyhow::Result<RolloutRow> {
    let r: RolloutReport = client.get(&format!("/v1/rollouts/{id}/report")).await?;
    let mut bounds = vec![r.rollout.created_at_ms];
    let mut agreement = None;
    for e in &r.events {
        if matches!(e.kind.as_str(), "advanced" | "completed") {
            bounds.push(e.at_ms);
        }
        if e.kind == "promoted" && agreement.is_none() {
            agreement = e
                .gates
                .iter()
                .find(|g| g.gate == "shadow_agreement")
                .and_then(|g| g.value);
        }
    }
    let waves = r
        .rollout
        .waves
        .iter()
        .zip(bounds.windows(2))
        .map(|(w, b)| (w.wave, w.target, b[1].saturating_sub(b[0]) as f64 / 1000.0))
        .collect();
    let end = bounds.last().copied().unwrap_or(r.rollout.created_at_ms);
    let started_by = r
        .events
        .iter()
        .find(|e| e.kind == "started")
        .and_then(|e| {
            e.detail
                .split(" started a rollout")
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "-".into());
    Ok(RolloutRow {
        id,
        model: r.rollout.model.clone(),
        started_by,
        status: r.rollout.status.clone(),
        secs: end.saturating_sub(r.rollout.created_at_ms) as f64 / 1000.0,
        waves,
        shadow_agreement: agreement,
    })
}

/// Follows a rollout with one progress bar per wave until it completes.
pub(super) async fn follow_rollout(client: &Client, id: u64) -> anyhow::Result<RolloutView> {
    let multi = indicatif::MultiProgress::new();
    let mut bars: Vec<ProgressBar> = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let r: RolloutView = client.get(&format!("/v1/rollouts/{id}")).await?;
        while bars.len() < r.waves.len() {
            let w = &r.waves[bars.len()];
            let b = multi.add(bar(
                w.target as usize,
                &format!("wave {} ({} devices)", w.wave, w.target),
            ));
            bars.push(b);
        }
        for (b, w) in bars.iter().zip(&r.waves) {
            b.set_position(w.healthy.min(w.target));
            if w.wave == r.wave && r.status == "running" {
                b.set_message(format!(
                    "wave {} ({} devices): {}",
                    w.wave, w.target, r.stage
                ));
            } else {
                b.set_message(format!("wave {} ({} devices)", w.wave, w.target));
            }
        }
        match r.status.as_str() {
            "completed" => {
                for b in &bars {
                    b.finish();
                }
                return Ok(r);
            }
            "paused" | "rolled-back" | "rolling-back" | "aborted" => {
                bail!(
                    "rollout {id} stopped: {}",
                    r.reason.as_deref().unwrap_or(r.status.as_str())
                )
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("rollout {id} still {} after {WAIT:?}", r.status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `count` reaches `want`, showing it on `pb`.
pub(super) async fn wait_for<F, Fut>(
    pb: &ProgressBar,
    mut count: F,
    want: usize,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let n = count().await.unwrap_or(0);
        pb.set_position(n as u64);
        if n >= want {
            pb.finish();
            return Ok(());
        }
        if Instant::now() > deadline {
            pb.abandon();
            bail!("only {n} of {want} devices got there within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
