//! The HTTP API (axum). Everything but `/healthz` and `/metrics` needs
//! `Authorization: Bearer <token>`: a per-user token with a role (`drover token create`),
//! or the bootstrap admin token in `<data>/api-token`. [`access`] checks the role each
//! route needs and writes the audit log.
//!
//! API boundary: the JSON view types here are the CLI's contract; store rows, domain
//! types (rollout engine, drift) and wire types are converted at this edge, never
//! serialized as they are. The one exception is the rollout `Plan`, the operator's own
//! document (TOML or JSON), which is accepted and shown in its file format.
//!
//! Layout: this module holds the state, errors, auth and router; one file per resource
//! holds its view types and handlers: [`devices`], [`models`], [`keys`], [`rollouts`],
//! [`continuous`] (drift and training), [`integrations`]; [`console`] is the web console
//! (HTML pages under `/console`, session login with the same tokens and roles).

mod access;
pub mod console;
mod continuous;
mod devices;
mod integrations;
mod keys;
mod metrics;
mod models;
mod rollouts;

pub use self::access::{Actor, AuditView, TokenCreated, TokenRequest, TokenView};
pub use self::continuous::{JobView, RunResponse, ScoreView};
pub use self::devices::{
    BudgetView, CommandView, DeployRequest, DeployResponse, DeviceEventView, DeviceQuery,
    DeviceView, EnrollRequest, EnrollResponse, LabelRequest, LimitQuery, ProgressQuery,
    ProgressView, RemoveRequest, RemoveResponse, RuntimeView, SlotView, TelemetryView,
};
pub use self::integrations::{IntegrationCreated, IntegrationRequest, IntegrationView};
pub use self::keys::{keyring_view, KeyView, KeyringView};
pub use self::models::{ModelView, PublishBody};
pub use self::rollouts::{
    EventView, GateView, HeldView, PreviewView, RolloutDeviceView, RolloutReport, RolloutView,
    VerdictView, WavePreviewView, WaveView,
};

use std::sync::Arc;

use crate::app::App;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
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
            StoreError::DeviceExists(_)
            | StoreError::DeviceActive(_)
            | StoreError::DeviceDecommissioned(_)
            | StoreError::ModelExists { .. }
            | StoreError::TokenExists(_)
            | StoreError::IntegrationExists(_) => StatusCode::CONFLICT,
            StoreError::UnknownDevice(_)
            | StoreError::UnknownToken(_)
            | StoreError::UnknownIntegration(_) => StatusCode::NOT_FOUND,
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
            FleetError::ProtocolTooOld { .. }
            | FleetError::WouldReplace { .. }
            | FleetError::CannotLoad { .. } => ApiError(StatusCode::CONFLICT, e.to_string()),
            FleetError::NoSuchSlot { .. } => ApiError(StatusCode::NOT_FOUND, e.to_string()),
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

/// Largest request body of any route but a model upload: a label set, a plan or a token
/// request is a few KiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest model upload body (the model, hex-encoded, in JSON).
pub const MAX_MODEL_BODY_BYTES: usize = 600 * 1024 * 1024;

/// axum answers an oversized body with a plain-text 413; the API's errors are JSON and
/// say what to do.
async fn too_large_as_json(r: axum::response::Response) -> axum::response::Response {
    if r.status() != StatusCode::PAYLOAD_TOO_LARGE
        || r.headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        return r;
    }
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body over the limit: {MAX_BODY_BYTES} bytes for this route ({} MiB for a model \
             upload); a label, plan or token request is a few KiB",
            MAX_MODEL_BODY_BYTES >> 20
        ),
    )
    .into_response()
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
        .route("/v1/devices/{id}/remove", post(devices::remove))
        .route("/v1/devices/{id}/labels", post(devices::label))
        .route("/v1/devices/{id}/events", get(devices::events))
        .route("/v1/devices/{id}/progress", get(devices::progress))
        .route("/v1/devices/{id}/telemetry", get(devices::telemetry))
        .route("/v1/devices/{id}/commands", get(devices::commands))
        // A model upload (hex in JSON) is the one large body; every other route takes
        // at most MAX_BODY_BYTES.
        .route(
            "/v1/models",
            get(models::list_models)
                .post(models::publish)
                .layer(DefaultBodyLimit::max(MAX_MODEL_BODY_BYTES)),
        )
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
        .merge(access::routes())
        .merge(integrations::routes())
        // A route layer: it runs after routing, so it knows the route's pattern (the
        // role it needs); unknown paths are 404 without it.
        .route_layer(middleware::from_fn_with_state(
            st.clone(),
            access::authorize,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response(too_large_as_json));
    let api = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics::metrics))
        .merge(v1)
        .with_state(st.clone());
    api.merge(console::router(st.clone()))
        .layer(middleware::from_fn_with_state(st, time_request))
}

/// Times every request into `drover_http_request_duration_seconds`, by route pattern
/// (a path no route matched counts as `unmatched`, so a scanner makes no new series).
async fn time_request(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = req.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let took = started.elapsed().as_secs_f64();
    let metrics = &st.app.metrics;
    metrics.http_request(&method, &route, resp.status().as_u16(), took);
    resp
}
