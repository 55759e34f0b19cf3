//! `/v1/rollouts`: start, list, show, report, pause/resume/abort.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{blocking, not_found, ApiError, AppState};
use crate::rollout::{Event, GateValue, Verdict};

/// A gate's verdict: `pass`, `fail` or `no-data` (no verdict yet; the gate's `reason`
/// says what is missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictView {
    Pass,
    Fail,
    /// No verdict: not enough data yet.
    NoData,
}

impl From<Verdict> for VerdictView {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Pass => VerdictView::Pass,
            Verdict::Fail => VerdictView::Fail,
            Verdict::NoData => VerdictView::NoData,
        }
    }
}

/// One gate's value against its threshold at one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateView {
    pub gate: String,
    pub value: Option<f64>,
    /// `<=` or `>=` and the threshold, e.g. "<= 0.02".
    pub threshold: String,
    pub verdict: VerdictView,
    /// What the value was computed over ("48 inferences on 3 devices").
    pub basis: String,
    /// Why there is no verdict ("needs 100 inferences, has 48").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&GateValue> for GateView {
    fn from(g: &GateValue) -> Self {
        Self {
            gate: g.gate.clone(),
            value: g.value,
            threshold: g.threshold.clone(),
            verdict: g.verdict.into(),
            basis: g.basis.clone(),
            reason: g.reason.clone(),
        }
    }
}

/// A line of a rollout's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub at_ms: u64,
    pub kind: String,
    pub detail: String,
    /// Gate values at the decision, if it was one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateView>,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        Self {
            at_ms: e.at_ms,
            kind: e.kind.clone(),
            detail: e.detail.clone(),
            gates: e.gates.iter().map(GateView::from).collect(),
        }
    }
}

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
    /// When the current stage's time (shadow duration or bake) is over; it may still
    /// wait for devices or, under `on_no_data = "hold"`, for gates without a verdict.
    pub stage_ends_ms: Option<u64>,
    /// Why the stage, its time over, still waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub selected: u64,
    /// Devices per state (queued, deploying, healthy, failed, ...).
    pub devices: BTreeMap<String, u64>,
    pub gates: Vec<GateView>,
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
    pub events: Vec<EventView>,
}

impl RolloutView {
    pub fn from_state(s: &crate::rollout::RolloutState, with_devices: bool) -> Self {
        use crate::rollout::{DevState, Status};
        let reason = match &s.status {
            Status::Paused { reason }
            | Status::RollingBack { reason }
            | Status::RolledBack { reason }
            | Status::Aborting { reason }
            | Status::Aborted { reason } => Some(reason.clone()),
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
            stage_ends_ms: stage_ends_ms(s),
            waiting: s.waiting.clone(),
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
            selected: s.selected,
            devices,
            gates: s.gates.iter().map(GateView::from).collect(),
            plan: s.plan.clone(),
            device_slots,
        }
    }
}

/// When the running stage's own time is over (`None` while installing or once stopped).
fn stage_ends_ms(s: &crate::rollout::RolloutState) -> Option<u64> {
    use crate::rollout::{Stage, Status};
    if s.status != Status::Running {
        return None;
    }
    let d = match s.stage {
        Stage::Shadow => s.plan.shadow.as_ref()?.duration,
        Stage::Bake => s.plan.waves.get(s.wave)?.bake,
        Stage::Install => return None,
    };
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Some(s.stage_since_ms.saturating_add(ms))
}

impl From<crate::rollout::driver::RolloutError> for ApiError {
    fn from(e: crate::rollout::driver::RolloutError) -> Self {
        use crate::rollout::driver::RolloutError as E;
        match e {
            E::Plan(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            E::Fleet(f) => f.into(),
            E::Store(s) => s.into(),
            E::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            E::NoTargets(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            E::Conflict(_) | E::CannotLoad(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            E::Refused(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            E::Corrupt(_) | E::Record(_) | E::Stopped => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

pub(super) async fn start_rollout(
    State(st): State<AppState>,
    super::Actor(by): super::Actor,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let plan = plan_of(&body)?;
    let s = st.rollouts.start(plan, &by).await?;
    Ok((
        StatusCode::CREATED,
        Json(RolloutView::from_state(&s, false)),
    ))
}

/// What a plan would target now: `POST /v1/rollouts/preview` with the plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreviewView {
    pub selector: String,
    /// Devices the selector matches.
    pub matched: u64,
    /// Matched devices the rollout would take, in wave order.
    pub targets: Vec<String>,
    /// Matched devices another open rollout holds (left out until it ends).
    pub held: Vec<HeldView>,
    pub waves: Vec<WavePreviewView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldView {
    pub device: String,
    pub rollout: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WavePreviewView {
    pub wave: usize,
    /// Devices after this wave (cumulative).
    pub cumulative: u64,
    /// Devices this wave adds; 0 means it passes at once.
    pub adds: u64,
    pub bake: String,
}

fn plan_of(body: &[u8]) -> Result<crate::rollout::Plan, ApiError> {
    let plan: crate::rollout::Plan = serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid rollout plan: {e}"),
        )
    })?;
    plan.validate()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(plan)
}

pub(super) async fn preview_rollout(
    State(st): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<PreviewView>, ApiError> {
    let plan = plan_of(&body)?;
    let p = st.rollouts.preview(plan.clone()).await?;
    Ok(Json(PreviewView {
        selector: plan.selector.clone(),
        matched: p.matched as u64,
        targets: p.targets.clone(),
        held: p
            .held
            .iter()
            .map(|(device, rollout)| HeldView {
                device: device.clone(),
                rollout: *rollout,
            })
            .collect(),
        waves: p
            .waves
            .iter()
            .zip(&plan.waves)
            .enumerate()
            .map(|(i, (w, pw))| WavePreviewView {
                wave: i + 1,
                cumulative: w.cumulative as u64,
                adds: w.adds as u64,
                bake: humantime::format_duration(pw.bake).to_string(),
            })
            .collect(),
    }))
}

pub(super) async fn list_rollouts(
    State(st): State<AppState>,
) -> Result<Json<Vec<RolloutView>>, ApiError> {
    let all = blocking(&st, |_, s| Ok(crate::rollout::driver::list(s)?)).await?;
    Ok(Json(
        all.iter()
            .map(|r| RolloutView::from_state(r, false))
            .collect(),
    ))
}

pub(super) async fn show_rollout(
    State(st): State<AppState>,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path(id) = id?;
    let r = blocking(&st, move |_, s| Ok(crate::rollout::driver::load(s, id)?)).await?;
    let r = r.ok_or_else(|| not_found(&format!("rollout {id}")))?;
    Ok(Json(RolloutView::from_state(&r, true)))
}

pub(super) async fn rollout_report(
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
        events: events.iter().map(EventView::from).collect(),
    }))
}

pub(super) async fn operate_rollout(
    State(st): State<AppState>,
    path: Result<Path<(u64, String)>, axum::extract::rejection::PathRejection>,
    super::Actor(by): super::Actor,
) -> Result<Json<RolloutView>, ApiError> {
    use crate::rollout::Op;
    let Path((id, op)) = path?;
    let op = match op.as_str() {
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "abort" => Op::Abort,
        "retry" => Op::Retry,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no rollout operation {other:?}: use pause, resume, abort or retry"),
            ))
        }
    };
    let s = st.rollouts.operate(id, op, &by).await?;
    Ok(Json(RolloutView::from_state(&s, false)))
}
