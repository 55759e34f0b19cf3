//! The HTTP API (axum). Everything but `/healthz` and `/metrics` needs
//! `Authorization: Bearer <token>` (the token is in `<data>/api-token`).
//!
//! API boundary: the JSON view types here are the CLI's contract; store rows and wire
//! types are converted at this edge, never serialized as they are.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_protocol::manifest::{Lineage, TestVector};
use drover_protocol::messages::DeployMode;
use drover_protocol::topics::hex32;
use drover_protocol::DeviceId;
use serde::{Deserialize, Serialize};

use crate::fleet::{self, FleetError};
use crate::mqtt::MqttLink;
use crate::registry::{self, PublishRequest, RegistryError};
use crate::serve::Shared;
use crate::store::{Db, DeviceRow, ModelRow, Store, StoreError};
use drover_host::clock::now_ms;

#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub store: Db,
    pub mqtt: Arc<MqttLink>,
    pub rollouts: crate::rollout::driver::RolloutHandle,
    /// The continuous-training engine, when a policy is configured.
    pub continuous: Option<Arc<crate::continuous::Engine>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub online: bool,
    pub decommissioned: bool,
    pub arch: Option<String>,
    pub os: Option<String>,
    pub agent_version: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub active_model: Option<String>,
    pub staged_model: Option<String>,
    pub last_phase: Option<String>,
    pub enrolled_at_ms: u64,
    pub last_command_seq: u64,
}

impl From<DeviceRow> for DeviceView {
    fn from(d: DeviceRow) -> Self {
        Self {
            id: d.id,
            labels: d.labels,
            online: d.online,
            decommissioned: d.decommissioned,
            arch: d.arch,
            os: d.os,
            agent_version: d.agent_version,
            last_seen_ms: d.last_seen_ms,
            active_model: d.active_model,
            staged_model: d.staged_model,
            last_phase: d.last_phase,
            enrolled_at_ms: d.enrolled_at_ms,
            last_command_seq: d.reported_command_seq,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    /// Secret: goes into the agent's config file only.
    pub device_key: String,
    pub root_public_key: String,
    pub broker_url: String,
    /// The fleet CA (PEM) the agent trusts for the broker.
    #[serde(default)]
    pub ca_pem: String,
    /// The device's client certificate (PEM, CN = device id).
    #[serde(default)]
    pub client_cert_pem: String,
    /// Secret: the certificate's private key (PEM); goes into a 0600 file only.
    #[serde(default)]
    pub client_key_pem: String,
}

impl std::fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("device_id", &self.device_id)
            .field("broker_url", &self.broker_url)
            .field("device_key", &"<redacted>")
            .field("client_key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployRequest {
    /// `NAME@X.Y.Z`.
    pub model: String,
    /// `activate` (default) or `shadow`.
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployResponse {
    pub device: String,
    pub seq: u64,
    pub model: String,
    pub digest: String,
    pub expires_at_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelView {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u32,
    pub created_at_ms: u64,
    pub key_id: String,
    pub summary: serde_json::Value,
}

impl From<ModelRow> for ModelView {
    fn from(m: ModelRow) -> Self {
        Self {
            name: m.name,
            version: m.version,
            digest: hex32(&m.digest),
            sha256: hex32(&m.sha256),
            size: m.size,
            chunk_size: m.chunk_size,
            created_at_ms: m.created_at_ms,
            key_id: m.key_id,
            summary: serde_json::from_str(&m.summary).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PublishBody {
    pub name: String,
    pub version: String,
    /// The ONNX file, hex-encoded.
    pub model_hex: String,
    #[serde(default)]
    pub baseline_csv: Option<String>,
    /// Test vectors in the protocol's JSON form (`[{inputs, outputs, tolerance}]`).
    #[serde(default)]
    pub test_vectors: Option<Vec<TestVector>>,
    #[serde(default)]
    pub chunk_size: Option<u32>,
    #[serde(default)]
    pub training_job: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TelemetryView {
    pub seq: u64,
    pub received_at_ms: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    pub cpu_percent: f64,
    pub mem_used_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandView {
    pub seq: u64,
    pub kind: String,
    pub model_digest: Option<String>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

#[derive(Debug, Deserialize)]
pub struct DeviceQuery {
    /// Comma-separated `k=v` pairs; a device must carry all of them.
    pub label: Option<String>,
    pub online: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct LimitQuery {
    pub limit: Option<u32>,
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
    f: impl FnOnce(&Shared, &mut Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = Arc::clone(&st.shared);
    st.store.run(move |s| f(&shared, s)).await?
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            let a = t.trim().as_bytes();
            let b = st.shared.api_token.as_bytes();
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        });
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
        .route("/v1/devices", get(list_devices).post(enroll))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/decommission", post(decommission))
        .route("/v1/devices/{id}/deploy", post(deploy))
        .route("/v1/devices/{id}/telemetry", get(telemetry))
        .route("/v1/devices/{id}/commands", get(commands))
        .route("/v1/models", get(list_models).post(publish))
        .route("/v1/models/{name}/{version}", get(show_model))
        .route("/v1/keyring", get(keyring))
        .route("/v1/rollouts", get(list_rollouts).post(start_rollout))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/report", get(rollout_report))
        .route("/v1/rollouts/{id}/{op}", post(operate_rollout))
        .merge(crate::api_continuous::routes())
        .route("/v1/keyring/reload", post(reload_keyring))
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
        st.shared.metrics.render(),
    )
}

async fn list_devices(
    State(st): State<AppState>,
    Query(q): Query<DeviceQuery>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let mut want: Vec<(String, String)> = Vec::new();
    for pair in q.label.iter().flat_map(|l| l.split(',')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("label filter {pair:?} must look like key=value"),
            )
        })?;
        want.push((k.to_owned(), v.to_owned()));
    }
    let devices = blocking(&st, |_, s| Ok(s.devices()?)).await?;
    Ok(Json(
        devices
            .into_iter()
            .filter(|d| q.online.is_none_or(|o| d.online == o))
            .filter(|d| want.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
            .map(DeviceView::from)
            .collect(),
    ))
}

async fn show_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let idc = id.clone();
    let d = blocking(&st, move |_, s| Ok(s.device(&idc)?)).await?;
    d.map(|d| Json(d.into()))
        .ok_or_else(|| not_found(&format!("device {id}")))
}

async fn enroll(
    State(st): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let e = blocking(&st, move |sh, s| {
        Ok(fleet::enroll(sh, s, &req.id, &req.labels, now_ms())?)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            device_id: e.device_id.to_string(),
            device_key: hex32(&e.device_key.0),
            root_public_key: hex32(&st.shared.keys().root_public),
            broker_url: st.shared.agent_broker_url.clone(),
            ca_pem: st.shared.ca.ca_pem().to_owned(),
            client_cert_pem: e.cert.cert_pem,
            client_key_pem: e.cert.key_pem,
        }),
    ))
}

async fn decommission(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&st, move |sh, s| {
        Ok(fleet::decommission(sh, s, &id, now_ms())?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn deploy(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<DeployRequest>,
) -> Result<Json<DeployResponse>, ApiError> {
    let mode = match req.mode.as_deref() {
        None | Some("activate") => DeployMode::Activate,
        Some("shadow") => DeployMode::Shadow,
        Some(m) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("mode {m:?} must be activate or shadow"),
            ))
        }
    };
    let device =
        DeviceId::new(id.clone()).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let model_ref = req.model.clone();
    let (row, blob, model) = blocking(&st, move |sh, s| {
        let model = fleet::find_model(s, &model_ref)?;
        let (row, blob) = fleet::deploy(sh, s, &id, &model, mode, now_ms())?;
        Ok((row, blob, model))
    })
    .await?;
    st.shared
        .metrics
        .commands_issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::serve::send_command(&st.shared, &st.mqtt, &device, blob).await;
    Ok(Json(DeployResponse {
        device: row.device,
        seq: row.seq,
        model: format!("{}@{}", model.name, model.version),
        digest: hex32(&model.digest),
        expires_at_ms: row.expires_at_ms,
    }))
}

async fn telemetry(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<Vec<TelemetryView>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = blocking(&st, move |_, s| Ok(s.telemetry(&id, limit)?)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| TelemetryView {
                seq: r.seq,
                received_at_ms: r.received_at_ms,
                window_start_ms: r.window_start_ms,
                window_end_ms: r.window_end_ms,
                inferences: r.inferences,
                errors: r.errors,
                cpu_percent: r.cpu_percent,
                mem_used_bytes: r.mem_used_bytes,
            })
            .collect(),
    ))
}

async fn commands(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<CommandView>>, ApiError> {
    let rows = blocking(&st, move |_, s| Ok(s.commands(&id)?)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|c| CommandView {
                seq: c.seq,
                kind: c.kind,
                model_digest: c.model_digest.as_ref().map(hex32),
                issued_at_ms: c.issued_at_ms,
                expires_at_ms: c.expires_at_ms,
            })
            .collect(),
    ))
}

async fn list_models(State(st): State<AppState>) -> Result<Json<Vec<ModelView>>, ApiError> {
    let rows = blocking(&st, |_, s| Ok(s.models()?)).await?;
    Ok(Json(rows.into_iter().map(ModelView::from).collect()))
}

async fn show_model(
    State(st): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelView>, ApiError> {
    let (n, v) = (name.clone(), version.clone());
    let row = blocking(&st, move |_, s| Ok(s.model(&n, &v)?)).await?;
    row.map(|r| Json(r.into()))
        .ok_or_else(|| not_found(&format!("model {name}@{version}")))
}

async fn publish(
    State(st): State<AppState>,
    Json(body): Json<PublishBody>,
) -> Result<(StatusCode, Json<ModelView>), ApiError> {
    let model = hex::decode(body.model_hex.trim()).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("model_hex is not hex: {e}"),
        )
    })?;
    let req = PublishRequest {
        name: body.name,
        version: body.version,
        model,
        baseline_csv: body.baseline_csv,
        test_vectors: body.test_vectors,
        chunk_size: body.chunk_size,
        lineage: Lineage {
            parent: None,
            training_job: body.training_job,
            dataset: body.dataset,
            metrics: body.metrics,
        },
    };
    let row = blocking(&st, move |sh, s| {
        Ok(registry::publish(
            s,
            &sh.data_dir.join("models"),
            &req,
            &sh.keys().signing,
            now_ms(),
        )?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: String,
    pub roles: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: Option<u64>,
    pub revoked: bool,
    pub current: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyringView {
    pub root_key_id: String,
    pub version: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub keys: Vec<KeyView>,
}

/// The keyring as shown by `keys show` (never a secret).
pub fn keyring_view(keys: &crate::keys::Keys) -> KeyringView {
    let root_id = drover_protocol::trust::KeyId::of(&keys.root_public);
    KeyringView {
        root_key_id: root_id.to_string(),
        version: keys.keyring.version,
        issued_at_ms: keys.keyring.issued_at_ms,
        expires_at_ms: keys.keyring.expires_at_ms,
        keys: keys
            .keyring
            .keys
            .iter()
            .map(|k| KeyView {
                key_id: k.key_id.to_string(),
                roles: k.roles.iter().map(|r| format!("{r:?}")).collect(),
                not_before_ms: k.not_before_ms,
                not_after_ms: (k.not_after_ms != u64::MAX).then_some(k.not_after_ms),
                revoked: k.revoked,
                current: k.key_id == keys.signing.id(),
            })
            .collect(),
    }
}

async fn keyring(State(st): State<AppState>) -> Json<KeyringView> {
    Json(keyring_view(&st.shared.keys()))
}

/// `POST /v1/keyring/reload`: `drover keys rotate` tells the running server to load the
/// rotated key files and publish the new keyring, so no restart is needed.
async fn reload_keyring(State(st): State<AppState>) -> Result<Json<KeyringView>, ApiError> {
    let keys = crate::serve::reload_keys(&st.shared, &st.mqtt)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(keyring_view(&keys)))
}

// ---- rollouts ----

/// A rollout as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub id: u64,
    pub model: String,
    pub digest: String,
    pub selector: String,
    pub status: String,
    /// Why it paused or rolled back.
    pub reason: Option<String>,
    /// One-based current wave.
    pub wave: usize,
    pub waves: Vec<WaveView>,
    pub stage: String,
    pub stage_since_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub selected: u64,
    /// Devices per state (queued, deploying, healthy, failed, ...).
    pub devices: BTreeMap<String, u64>,
    pub gates: Vec<crate::rollout::GateValue>,
    pub plan: crate::rollout::Plan,
    /// Per-device detail (`show` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_slots: Vec<RolloutDeviceView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveView {
    pub wave: usize,
    /// Cumulative devices this wave reaches (of those selected now).
    pub target: u64,
    pub bake: String,
    pub assigned: u64,
    pub healthy: u64,
    pub failed: u64,
    pub in_flight: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutDeviceView {
    pub device: String,
    pub wave: usize,
    pub state: String,
    pub command_seq: Option<u64>,
    pub previous: Option<String>,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutReport {
    pub rollout: RolloutView,
    pub events: Vec<crate::rollout::Event>,
}

impl RolloutView {
    pub fn from_state(s: &crate::rollout::RolloutState, with_devices: bool) -> Self {
        use crate::rollout::{DevState, Status};
        let reason = match &s.status {
            Status::Paused { reason }
            | Status::RollingBack { reason }
            | Status::RolledBack { reason } => Some(reason.clone()),
            _ => None,
        };
        let mut devices: BTreeMap<String, u64> = BTreeMap::new();
        for d in s.devices.values() {
            *devices.entry(d.state.name().to_owned()).or_default() += 1;
        }
        let waves = s
            .plan
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let of = s.devices.values().filter(|d| d.wave == i);
                let count = |f: &dyn Fn(DevState) -> bool| {
                    s.devices
                        .values()
                        .filter(|d| d.wave == i && f(d.state))
                        .count() as u64
                };
                WaveView {
                    wave: i + 1,
                    target: w.cumulative(s.selected as usize) as u64,
                    bake: humantime::format_duration(w.bake).to_string(),
                    assigned: of.count() as u64,
                    healthy: count(&|d| matches!(d, DevState::Healthy | DevState::Active)),
                    failed: count(&|d| d == DevState::Failed),
                    in_flight: count(&|d| {
                        matches!(
                            d,
                            DevState::Queued
                                | DevState::Deploying
                                | DevState::Shadowing
                                | DevState::Promoting
                        )
                    }),
                }
            })
            .collect();
        let device_slots = if with_devices {
            s.devices
                .iter()
                .map(|(id, d)| RolloutDeviceView {
                    device: id.clone(),
                    wave: d.wave + 1,
                    state: d.state.name().to_owned(),
                    command_seq: d.command_seq,
                    previous: d.previous.clone(),
                    detail: d.detail.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        RolloutView {
            id: s.id,
            model: format!("{}@{}", s.candidate.name, s.candidate.version),
            digest: s.candidate.digest.clone(),
            selector: s.plan.selector.clone(),
            status: s.status.name().to_owned(),
            reason,
            wave: s.wave + 1,
            waves,
            stage: format!("{:?}", s.stage).to_lowercase(),
            stage_since_ms: s.stage_since_ms,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
            selected: s.selected,
            devices,
            gates: s.gates.clone(),
            plan: s.plan.clone(),
            device_slots,
        }
    }
}

impl From<crate::rollout::driver::RolloutError> for ApiError {
    fn from(e: crate::rollout::driver::RolloutError) -> Self {
        use crate::rollout::driver::RolloutError as E;
        match e {
            E::Plan(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            E::Fleet(f) => f.into(),
            E::Store(s) => s.into(),
            E::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            E::Refused(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            E::Corrupt(_) | E::Stopped => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// Who asked (`?by=alice`), recorded in the rollout's report. The API has one bearer
/// token, so this is the operator's word, not an authenticated identity.
#[derive(Debug, Deserialize)]
pub struct ByQuery {
    pub by: Option<String>,
}

fn actor(q: &ByQuery) -> String {
    match q.by.as_deref().map(str::trim) {
        Some(b) if !b.is_empty() && b.len() <= 64 && !b.chars().any(char::is_control) => {
            b.to_owned()
        }
        _ => "api".to_owned(),
    }
}

async fn start_rollout(
    State(st): State<AppState>,
    Query(by): Query<ByQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let plan: crate::rollout::Plan = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid rollout plan: {e}"),
        )
    })?;
    plan.validate()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let s = st.rollouts.start(plan, &actor(&by)).await?;
    Ok((
        StatusCode::CREATED,
        Json(RolloutView::from_state(&s, false)),
    ))
}

async fn list_rollouts(State(st): State<AppState>) -> Result<Json<Vec<RolloutView>>, ApiError> {
    let all = blocking(&st, |_, s| Ok(crate::rollout::driver::list(s)?)).await?;
    Ok(Json(
        all.iter()
            .map(|r| RolloutView::from_state(r, false))
            .collect(),
    ))
}

async fn show_rollout(
    State(st): State<AppState>,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path(id) = id?;
    let r = blocking(&st, move |_, s| Ok(crate::rollout::driver::load(s, id)?)).await?;
    let r = r.ok_or_else(|| not_found(&format!("rollout {id}")))?;
    Ok(Json(RolloutView::from_state(&r, true)))
}

async fn rollout_report(
    State(st): State<AppState>,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<RolloutReport>, ApiError> {
    let Path(id) = id?;
    let (r, events) = blocking(&st, move |_, s| {
        Ok((
            crate::rollout::driver::load(s, id)?,
            crate::rollout::driver::events(s, id)?,
        ))
    })
    .await?;
    let r = r.ok_or_else(|| not_found(&format!("rollout {id}")))?;
    Ok(Json(RolloutReport {
        rollout: RolloutView::from_state(&r, true),
        events,
    }))
}

async fn operate_rollout(
    State(st): State<AppState>,
    path: Result<Path<(u64, String)>, axum::extract::rejection::PathRejection>,
    Query(by): Query<ByQuery>,
) -> Result<Json<RolloutView>, ApiError> {
    use crate::rollout::Op;
    let Path((id, op)) = path?;
    let op = match op.as_str() {
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "abort" => Op::Abort,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no rollout operation {other:?}: use pause, resume or abort"),
            ))
        }
    };
    let s = st.rollouts.operate(id, op, &actor(&by)).await?;
    Ok(Json(RolloutView::from_state(&s, false)))
}
