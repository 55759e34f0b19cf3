//! `/v1/devices`: enroll, list, show, deploy, decommission, telemetry, commands.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use drover_protocol::messages::DeployMode;
use drover_protocol::topics::hex32;
use drover_protocol::DeviceId;

use super::{blocking, not_found, ApiError, AppState};
use crate::fleet;
use crate::store::{phase_text, DeviceRow};

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
    /// The detail of the latest progress report, e.g. why a deploy failed.
    #[serde(default)]
    pub last_detail: Option<String>,
    /// Labels the agent declares: shown, never used by selectors (docs/FLEET.md).
    #[serde(default)]
    pub agent_labels: BTreeMap<String, String>,
    /// When an operator last changed the labels.
    #[serde(default)]
    pub labels_changed_at_ms: Option<u64>,
    /// The protocol version the device negotiated in its last hello (2 holds several
    /// models). Filled by `GET /v1/devices/{id}`.
    #[serde(default)]
    pub protocol: Option<u16>,
    /// Every model slot the device reported (protocol 2), by name.
    #[serde(default)]
    pub models: Vec<SlotView>,
    /// The limits the device sets on the models it holds; `None` before its first report.
    #[serde(default)]
    pub budget: Option<BudgetView>,
    /// The model runtime the device reported in this session (protocol 3): which model
    /// files it can be sent. `None` before the report or from an older agent.
    #[serde(default)]
    pub runtime: Option<RuntimeView>,
}

/// A device's model runtime and the artifact formats it loads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeView {
    pub engine: String,
    pub version: String,
    /// `format version`, e.g. `tract-nnef 1`, `onnx 1`.
    pub formats: Vec<String>,
}

/// One named model slot of a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotView {
    pub name: String,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub staged: Option<String>,
    pub shadow: Option<String>,
    /// `active`, `staged`, `shadow` (a candidate runs beside the active model), or `empty`.
    pub phase: String,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
}

impl From<crate::store::SlotRow> for SlotView {
    fn from(r: crate::store::SlotRow) -> Self {
        let phase = if r.staged.is_some() {
            "staged"
        } else if r.shadow.is_some() {
            "shadow"
        } else if r.active.is_some() {
            "active"
        } else {
            "empty"
        };
        Self {
            phase: phase.into(),
            name: r.name,
            active: r.active,
            previous: r.previous,
            staged: r.staged,
            shadow: r.shadow,
            disk_bytes: r.disk_bytes,
            memory_bytes: r.memory_bytes,
        }
    }
}

/// A device's model budget; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetView {
    pub max_models: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
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
            last_detail: d.last_detail,
            agent_labels: d.agent_labels,
            labels_changed_at_ms: d.labels_changed_at_ms,
            protocol: None,
            models: Vec::new(),
            budget: None,
            runtime: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Re-enroll a decommissioned id for its replacement (history kept; the old labels
    /// when `labels` is empty). Refused for an active device.
    #[serde(default)]
    pub replace: bool,
    /// Who enrolls (audit; a replacement is recorded in the device's events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The broker URL the agent will use instead of the server's (`device enroll
    /// --broker-url`): refused before enrolling unless the broker's certificate names its
    /// host, so a config that cannot pass the agent's TLS hostname check is never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_url: Option<String>,
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
    /// A replacement's first uplink sequence: after the replaced device's last stored
    /// frame, so its frames are not taken for replays. 0 for a new device.
    #[serde(default)]
    pub uplink_seq_start: u64,
    /// A replacement ignores commands up to this sequence: they were issued to the device
    /// it replaces. 0 for a new device.
    #[serde(default)]
    pub command_seq_floor: u64,
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

/// `POST /v1/devices/{id}/labels?by=NAME`: labels to set and keys to remove.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeployRequest {
    /// `NAME@X.Y.Z`.
    pub model: String,
    /// `activate` (default) or `shadow`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Replace the one model of a protocol-1 device that holds another model name.
    #[serde(default)]
    pub replace: bool,
}

/// `POST /v1/devices/{id}/remove`: remove a model slot (protocol 2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// The model's name (the slot).
    pub model: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub device: String,
    pub seq: u64,
    pub model: String,
    pub expires_at_ms: u64,
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
pub struct TelemetryView {
    pub seq: u64,
    pub received_at_ms: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    /// Host CPU use; `null` when the device cannot read it (its /proc is hidden).
    pub cpu_percent: Option<f64>,
    /// Host memory in use; `null` when the device cannot read it.
    pub mem_used_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommandView {
    pub seq: u64,
    pub kind: String,
    pub model_digest: Option<String>,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// One line of a device's audit log (`GET /v1/devices/{id}/events`, newest first).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceEventView {
    pub at_ms: u64,
    pub kind: String,
    pub by: String,
    pub detail: String,
}

/// A progress report (`GET /v1/devices/{id}/progress?command=SEQ`), oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    pub seq: u64,
    pub received_at_ms: u64,
    pub command_seq: u64,
    /// `received`, `downloading`, `verified`, `self-tested`, `active`, `healthy`,
    /// `shadowing`, `failed`, `rolled-back`, `refused`, `done`; `unknown` from a newer agent.
    pub phase: String,
    pub detail: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ProgressQuery {
    /// Only the reports about this command.
    pub command: Option<u64>,
    pub limit: Option<u32>,
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

pub(super) async fn list_devices(
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

pub(super) async fn show_device(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let idc = id.clone();
    let d = blocking(&st, move |_, s| {
        let Some(d) = s.device(&idc)? else {
            return Ok(None);
        };
        let said_hello = d.agent_version.is_some();
        let mut v = DeviceView::from(d);
        v.protocol = if said_hello {
            Some(s.device_protocol(&idc)?)
        } else {
            None
        };
        v.models = s
            .device_slots(&idc)?
            .into_iter()
            .map(SlotView::from)
            .collect();
        v.budget = s.device_budget(&idc)?.map(|b| BudgetView {
            max_models: b.max_models,
            memory_bytes: b.memory_bytes,
            disk_bytes: b.disk_bytes,
        });
        if let crate::store::DeviceRuntime::Reported(r) = s.device_runtime(&idc)? {
            v.runtime = Some(RuntimeView {
                engine: r.engine,
                version: r.version,
                formats: (r.formats.iter())
                    .map(|f| format!("{} {}", f.format, f.version))
                    .collect(),
            });
        }
        Ok(Some(v))
    })
    .await?;
    d.map(Json)
        .ok_or_else(|| not_found(&format!("device {id}")))
}

/// A broker URL an enrolling operator gives must reach the embedded broker's TLS front by a
/// name its certificate carries (`names`; empty: the server does not issue the broker's
/// certificate, so nothing to check).
fn check_broker_url(url: &str, names: &[String]) -> Result<(), ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let u = crate::config::parse_broker_url(url).map_err(bad)?;
    if names.is_empty() {
        return Ok(());
    }
    if !u.tls {
        return Err(bad(format!(
            "broker url {url}: this server's broker takes mutual TLS only; use mqtts://{}:{}",
            u.host, u.port
        )));
    }
    let host = u.host.to_ascii_lowercase();
    if names.contains(&host) {
        return Ok(());
    }
    Err(bad(format!(
        "broker url {url}: the broker's certificate does not name {host}, so the agent's TLS \
         hostname check would refuse it (it names {}); start drover serve with --advertise \
         {host} (or add it to `advertise` in its config; the certificate is reissued at \
         start), or use one of those names",
        names.join(", ")
    )))
}

pub(super) async fn enroll(
    State(st): State<AppState>,
    axum::Extension(identity): axum::Extension<crate::access::Identity>,
    Json(req): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let broker_url = match &req.broker_url {
        Some(url) => {
            check_broker_url(url, &st.app.broker_names)?;
            url.clone()
        }
        None => st.app.agent_broker_url.to_string(),
    };
    let e = blocking(&st, move |sh, s| {
        let now = sh.clock.unix_ms();
        if req.replace {
            let labels = (!req.labels.is_empty()).then_some(&req.labels);
            let by = identity.actor(req.by.as_deref());
            Ok(fleet::replace(sh, s, &req.id, labels, &by, now)?)
        } else {
            Ok(fleet::enroll(sh, s, &req.id, &req.labels, now)?)
        }
    })
    .await?;
    let replaced = e.replaced.unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            device_id: e.device_id.to_string(),
            device_key: hex32(&e.device_key.0),
            root_public_key: hex32(&st.app.keys.current().root_public),
            broker_url,
            ca_pem: st.app.ca.ca_pem().to_owned(),
            client_cert_pem: e.cert.cert_pem,
            client_key_pem: e.cert.key_pem,
            uplink_seq_start: e.replaced.map_or(0, |_| replaced.max_uplink_seq + 1),
            command_seq_floor: replaced.max_command_seq,
        }),
    ))
}

pub(super) async fn decommission(
    State(st): State<AppState>,
    Path(id): Path<String>,
    super::Actor(by): super::Actor,
) -> Result<StatusCode, ApiError> {
    blocking(&st, move |sh, s| {
        Ok(fleet::decommission(sh, s, &id, &by, sh.clock.unix_ms())?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn label(
    State(st): State<AppState>,
    Path(id): Path<String>,
    super::Actor(by): super::Actor,
    Json(req): Json<LabelRequest>,
) -> Result<Json<DeviceView>, ApiError> {
    if req.set.is_empty() && req.remove.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "nothing to change: give labels to set (`set`: {\"k\": \"v\"}) or keys to remove (`remove`)"
                .into(),
        ));
    }
    let d = blocking(&st, move |sh, s| {
        fleet::relabel(s, &id, &req.set, &req.remove, &by, sh.clock.unix_ms())?;
        s.device(&id)?
            .ok_or_else(|| not_found(&format!("device {id}")))
    })
    .await?;
    Ok(Json(d.into()))
}

pub(super) async fn deploy(
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
    // A direct deploy would fight the rollout's own commands for this device's slot.
    let name = fleet::parse_model_ref(&req.model)?.0.to_owned();
    if let Some(r) = st.rollouts.holder(&id, &name).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "device {id} is in rollout {r}, which still runs, is paused or rolls back: \
                 wait for it (`drover rollout status {r}`) or abort it (`drover rollout abort {r}`)"
            ),
        ));
    }
    let model_ref = req.model.clone();
    let replace = req.replace;
    let (row, blob, model) = blocking(&st, move |sh, s| {
        let model = fleet::find_model(s, &model_ref)?;
        fleet::check_one_model(s, &id, &model, replace)?;
        let (row, blob) = fleet::deploy(sh, s, &id, &model, mode, sh.clock.unix_ms())?;
        Ok((row, blob, model))
    })
    .await?;
    st.app
        .metrics
        .commands_issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.app.outbox.send_command(&device, blob).await;
    Ok(Json(DeployResponse {
        device: row.device,
        seq: row.seq,
        model: format!("{}@{}", model.name, model.version),
        digest: hex32(&model.digest),
        expires_at_ms: row.expires_at_ms,
    }))
}

pub(super) async fn telemetry(
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
                cpu_percent: (r.cpu_percent >= 0.0).then_some(r.cpu_percent),
                mem_used_bytes: (r.mem_total_bytes > 0).then_some(r.mem_used_bytes),
            })
            .collect(),
    ))
}

pub(super) async fn commands(
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

pub(super) async fn events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<Vec<DeviceEventView>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = blocking(&st, move |_, s| {
        if s.device(&id)?.is_none() {
            return Err(not_found(&format!("device {id}")));
        }
        Ok(s.device_events(&id, limit)?)
    })
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|e| DeviceEventView {
                at_ms: e.at_ms,
                kind: e.kind,
                by: e.by,
                detail: e.detail,
            })
            .collect(),
    ))
}

pub(super) async fn progress(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ProgressQuery>,
) -> Result<Json<Vec<ProgressView>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = blocking(&st, move |_, s| {
        if s.device(&id)?.is_none() {
            return Err(not_found(&format!("device {id}")));
        }
        Ok(s.device_progress(&id, q.command, limit)?)
    })
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|p| ProgressView {
                seq: p.seq,
                received_at_ms: p.received_at_ms,
                command_seq: p.command_seq,
                phase: p.phase.map_or("unknown", phase_text).to_owned(),
                detail: p.detail,
            })
            .collect(),
    ))
}

pub(super) async fn remove(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<RemoveRequest>,
) -> Result<Json<RemoveResponse>, ApiError> {
    let device =
        DeviceId::new(id.clone()).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if req.model.is_empty() || req.model.contains('@') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "model {:?}: give the model's name (its slot), without @VERSION",
                req.model
            ),
        ));
    }
    if let Some(r) = st.rollouts.holder(&id, &req.model).await? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "device {id} is in rollout {r} of {}: wait for it (`drover rollout status {r}`) \
                 or abort it (`drover rollout abort {r}`) before removing the model",
                req.model
            ),
        ));
    }
    let name = req.model.clone();
    let (row, blob) = blocking(&st, move |sh, s| {
        Ok(fleet::remove(sh, s, &id, &name, sh.clock.unix_ms())?)
    })
    .await?;
    st.app
        .metrics
        .commands_issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.app.outbox.send_command(&device, blob).await;
    Ok(Json(RemoveResponse {
        device: row.device,
        seq: row.seq,
        model: req.model,
        expires_at_ms: row.expires_at_ms,
    }))
}
