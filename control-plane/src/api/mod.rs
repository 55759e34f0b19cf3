//! The HTTP API (axum). Everything but `/healthz` and `/metrics` needs
//! `Authorization: Bearer <token>` (the token is in `<data>/api-token`).
//!
//! API boundary: the JSON view types here are the CLI's contract; store rows, domain
//! types (rollout engine, drift) and wire types are converted at this edge, never
//! serialized as they are. The one exception is the rollout `Plan`, the operator's own
//! document (TOML or JSON), which is accepted and shown in its file format.
//!
//! Layout: this module holds the state, errors, auth and router; one file per resource
//! holds its view types and handlers: [`devices`], [`models`], [`keys`], [`rollouts`],
//! [`continuous`] (drift and training).

mod continuous;
mod devices;
mod keys;
mod models;
mod rollouts;

pub use self::continuous::{JobView, RunResponse, ScoreView};
pub use self::devices::{
    CommandView, DeployRequest, DeployResponse, DeviceEventView, DeviceQuery, DeviceView,
    EnrollRequest, EnrollResponse, LabelRequest, LimitQuery, ProgressQuery, ProgressView,
    TelemetryView,
};
pub use self::keys::{keyring_view, KeyView, KeyringView};
pub use self::models::{ModelView, PublishBody};
pub use self::rollouts::{
    ByQuery, EventView, GateView, HeldView, PreviewView, RolloutDeviceView, RolloutReport,
    RolloutView, VerdictView, WavePreviewView, WaveView,
};

use std::sync::Arc;

use crate::app::App;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::fleet::FleetError;
use crate::registry::RegistryError;
use crate::store::{Db, Store, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub app: App,
    pub store: Db,
    pub rollouts: crate::rollout::driver::RolloutHandle,
    /// The continuous-training engine, when a policy is configured.
    pub continuous: Option<Arc<crate::continuous::Engine>>,
}

/// An API error: status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// A path parameter that does not parse (say, `/v1/rollouts/abc`) gets the JSON error body
/// every other refusal has, not axum's plain text.
impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::DeviceExists(_) | StoreError::ModelExists { .. } => StatusCode::CONFLICT,
            StoreError::UnknownDevice(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Store(s) => s.into(),
            FleetError::UnknownModel(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            FleetError::ManifestTooLarge { .. } => {
                ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            FleetError::Pki(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            _ => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(s) => s.into(),
            RegistryError::Io { .. } => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            _ => ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        }
    }
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    st: &AppState,
    f: impl FnOnce(&App, &mut Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = st.app.clone();
    st.store.run(move |s| f(&app, s)).await?
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| drover_host::ct_eq(t.trim().as_bytes(), st.app.api_token.as_bytes()));
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: pass --token, set DROVER_TOKEN, or use --data-dir of the server".into(),
        )
        .into_response();
    }
    next.run(req).await
}

pub fn router(st: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/devices",
            get(devices::list_devices).post(devices::enroll),
        )
        .route("/v1/devices/{id}", get(devices::show_device))
        .route("/v1/devices/{id}/decommission", post(devices::decommission))
        .route("/v1/devices/{id}/deploy", post(devices::deploy))
        .route("/v1/devices/{id}/labels", post(devices::label))
        .route("/v1/devices/{id}/events", get(devices::events))
        .route("/v1/devices/{id}/progress", get(devices::progress))
        .route("/v1/devices/{id}/telemetry", get(devices::telemetry))
        .route("/v1/devices/{id}/commands", get(devices::commands))
        .route("/v1/models", get(models::list_models).post(models::publish))
        .route("/v1/models/{name}/{version}", get(models::show_model))
        .route("/v1/keyring", get(keys::keyring))
        .route(
            "/v1/rollouts",
            get(rollouts::list_rollouts).post(rollouts::start_rollout),
        )
        .route("/v1/rollouts/preview", post(rollouts::preview_rollout))
        .route("/v1/rollouts/{id}", get(rollouts::show_rollout))
        .route("/v1/rollouts/{id}/report", get(rollouts::rollout_report))
        .route("/v1/rollouts/{id}/{op}", post(rollouts::operate_rollout))
        .merge(continuous::routes())
        .route("/v1/keyring/reload", post(keys::reload_keyring))
        .layer(middleware::from_fn_with_state(st.clone(), require_token))
        .layer(DefaultBodyLimit::max(600 * 1024 * 1024));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(st)
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.app.metrics.render(),
    )
}
