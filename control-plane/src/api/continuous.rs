//! HTTP API of drift scoring and continuous training (`drover drift`, `drover train`).
//!
//! - `GET /v1/drift/status`: the latest window's scores of every scope.
//! - `GET /v1/drift/history?scope=&since_ms=&limit=`: stored scores, newest first.
//! - `GET /v1/train/jobs`, `GET /v1/train/jobs/{id}`: training jobs and their outcome.
//! - `POST /v1/train/run`: start the policy's job now (trigger `manual`).
//! - `POST /v1/train/jobs/{id}/cancel`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};
use crate::drift::Score;
use crate::store::{JobRow, Store};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/drift/status", get(status))
        .route("/v1/drift/history", get(history))
        .route("/v1/train/jobs", get(jobs))
        .route("/v1/train/jobs/{id}", get(job))
        .route("/v1/train/jobs/{id}/cancel", post(cancel))
        .route("/v1/train/run", post(run))
}

/// A training job as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub name: String,
    pub trigger: String,
    pub executor: String,
    pub state: String,
    pub external_id: Option<String>,
    pub dir: String,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub dataset_hash: Option<String>,
    pub parent_model: Option<String>,
    pub outcome: Option<String>,
    pub candidate_model: Option<String>,
    pub metrics: Option<serde_json::Value>,
    pub rollout_plan: Option<serde_json::Value>,
}

impl From<JobRow> for JobView {
    fn from(j: JobRow) -> Self {
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        Self {
            id: j.id,
            name: j.name,
            trigger: j.trigger,
            executor: j.executor,
            state: j.state.as_str().to_owned(),
            external_id: j.external_id,
            dir: j.dir,
            created_at_ms: j.created_at_ms,
            finished_at_ms: j.finished_at_ms,
            exit_code: j.exit_code,
            detail: j.detail,
            dataset_hash: j.dataset_hash,
            parent_model: j.parent_model,
            outcome: j.outcome.map(|o| o.as_str().to_owned()),
            candidate_model: j.candidate_model,
            metrics: json(j.metrics),
            rollout_plan: json(j.rollout_plan),
        }
    }
}

/// One drift score: one scope, one model, one window, one feature (or the predictions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreView {
    /// `device:<id>`, `<label>=<value>` or `fleet`.
    pub scope: String,
    pub model_digest: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub feature: String,
    /// Live observations in the window.
    pub count: u64,
    pub psi: Option<f64>,
    pub chi2: Option<f64>,
    pub p_value: Option<f64>,
    /// Data-quality counts: NaN/missing and outside the baseline's range.
    pub missing: u64,
    pub out_of_range: u64,
    /// `ok`, `warn` or `alert`.
    pub level: String,
    /// Accuracy rows (feature `__accuracy__`): the share of the `count` labelled
    /// predictions that were right, and its Wilson interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_high: Option<f64>,
}

impl From<Score> for ScoreView {
    fn from(s: Score) -> Self {
        Self {
            scope: s.scope,
            model_digest: s.model_digest,
            window_start_ms: s.window_start_ms,
            window_end_ms: s.window_end_ms,
            feature: s.feature,
            count: s.count,
            psi: s.psi,
            chi2: s.chi2,
            p_value: s.p_value,
            missing: s.missing,
            out_of_range: s.out_of_range,
            level: s.level.as_str().to_owned(),
            accuracy: s.accuracy.map(|a| a.correct as f64 / s.count.max(1) as f64),
            accuracy_low: s.accuracy.map(|a| a.low),
            accuracy_high: s.accuracy.map(|a| a.high),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResponse {
    pub job_id: u64,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    scope: Option<String>,
    #[serde(default)]
    since_ms: u64,
    limit: Option<u32>,
}

async fn read<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&mut Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    st.store.run(f).await?
}

async fn status(State(st): State<AppState>) -> Result<Json<Vec<ScoreView>>, ApiError> {
    let rows = read(&st, |s| Ok(s.drift_status()?)).await?;
    Ok(Json(
        rows.into_iter()
            .map(Score::from)
            .map(ScoreView::from)
            .collect(),
    ))
}

async fn history(
    State(st): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<ScoreView>>, ApiError> {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let rows = read(&st, move |s| {
        Ok(s.drift_history(q.scope.as_deref(), q.since_ms, limit)?)
    })
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(Score::from)
            .map(ScoreView::from)
            .collect(),
    ))
}

async fn jobs(State(st): State<AppState>) -> Result<Json<Vec<JobView>>, ApiError> {
    let rows = read(&st, |s| Ok(s.jobs(1000)?)).await?;
    Ok(Json(rows.into_iter().map(JobView::from).collect()))
}

async fn job(
    State(st): State<AppState>,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Path(id) = id?;
    read(&st, move |s| s.job(id).map_err(ApiError::from))
        .await?
        .map(|j| Json(j.into()))
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("training job {id} not found"),
            )
        })
}

fn engine(st: &AppState) -> Result<Arc<crate::continuous::Engine>, ApiError> {
    st.continuous.clone().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            "continuous training is off: set [continuous] policy in the serve config".into(),
        )
    })
}

async fn run(State(st): State<AppState>) -> Result<(StatusCode, Json<RunResponse>), ApiError> {
    let e = engine(&st)?;
    let spec = e
        .load_job_spec()
        .map_err(|err| ApiError(StatusCode::UNPROCESSABLE_ENTITY, err.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let now = st.app.clock.unix_ms();
    tokio::spawn(async move {
        let r = e.run_job_reporting(spec, "manual", now, tx).await;
        if let Err(err) = r {
            tracing::warn!(error = %err, "manual training job failed to run");
        }
    });
    let id = rx.await.map_err(|_| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the job could not be recorded".into(),
        )
    })?;
    Ok((StatusCode::ACCEPTED, Json(RunResponse { job_id: id })))
}

async fn cancel(
    State(st): State<AppState>,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id?;
    let e = engine(&st)?;
    if e.cancel(id) {
        Ok(Json(serde_json::json!({ "cancelling": id })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("training job {id} is not running"),
        ))
    }
}
