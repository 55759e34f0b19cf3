//! The rollout engine: a pure function of (rollout state, fleet observations, now) to the
//! next state, the commands to send and the events to record.
//!
//! Nothing here does I/O or reads a clock, so every transition is unit-tested with the
//! time passed in. The async shell (`driver.rs`) builds the observations from the store,
//! persists the new state together with the commands it issues (one transaction), and
//! publishes them.
//!
//! Invariants:
//! - A device is assigned only while the rollout runs and only up to the current wave's
//!   cumulative size; waves advance only when every gate passes after the bake time. So no
//!   device outside the waves reached so far ever receives the candidate.
//! - Each device slot records the sequence of the last command sent for it; the engine
//!   never asks twice for the same step (no duplicate commands after a restart).
//! - Offline devices are counted apart: they neither fail a gate nor block a wave; their
//!   command stays pending and they are picked up when they return.

use std::collections::BTreeMap;

use drover_protocol::messages::{LatencyHistogram, Phase};
use serde::{Deserialize, Serialize};

use super::plan::{bucket, OnFailure, Plan};

/// The model being rolled out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub version: String,
    /// Manifest digest, hex.
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Status {
    Running,
    Paused { reason: String },
    Completed,
    RollingBack { reason: String },
    RolledBack { reason: String },
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused { .. } => "paused",
            Status::Completed => "completed",
            Status::RollingBack { .. } => "rolling-back",
            Status::RolledBack { .. } => "rolled-back",
        }
    }

    /// Still needs the driver's attention (late devices, rollbacks in flight).
    pub fn is_active(&self) -> bool {
        !matches!(self, Status::RolledBack { .. })
    }
}

/// Where the current wave is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The wave's devices run the candidate in shadow; shadow gates decide promotion.
    Shadow,
    /// Devices install (or are promoted); the stage ends when every online one finished.
    Install,
    /// Every device of the wave finished; health gates must hold for the bake time.
    Bake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DevState {
    /// Assigned to a wave, waiting for a download slot.
    Queued,
    /// Deploy command sent (activate or shadow), not finished yet.
    Deploying,
    Shadowing,
    /// Promote command sent after a successful shadow phase.
    Promoting,
    /// Serving the candidate, in the agent's probation.
    Active,
    Healthy,
    Failed,
    RollingBack,
    RolledBack,
}

impl DevState {
    pub fn name(self) -> &'static str {
        match self {
            DevState::Queued => "queued",
            DevState::Deploying => "deploying",
            DevState::Shadowing => "shadowing",
            DevState::Promoting => "promoting",
            DevState::Active => "active",
            DevState::Healthy => "healthy",
            DevState::Failed => "failed",
            DevState::RollingBack => "rolling-back",
            DevState::RolledBack => "rolled-back",
        }
    }

    /// Serving the candidate.
    fn runs_candidate(self) -> bool {
        matches!(self, DevState::Active | DevState::Healthy)
    }

    /// Waiting on the device.
    fn in_flight(self) -> bool {
        matches!(
            self,
            DevState::Deploying | DevState::Promoting | DevState::Active
        )
    }
}

/// One device's part in a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Zero-based wave the device was assigned in.
    pub wave: usize,
    pub state: DevState,
    pub assigned_at_ms: u64,
    /// When the command currently awaited was issued.
    pub commanded_at_ms: Option<u64>,
    /// Sequence of the last command sent for this device (filled in by the driver when it
    /// issues the command, in the same transaction as this state).
    pub command_seq: Option<u64>,
    /// The model the device ran before (digest hex), its rollback target.
    pub previous: Option<String>,
    pub detail: Option<String>,
}

/// A rollout's whole durable state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub id: u64,
    pub plan: Plan,
    pub candidate: Candidate,
    pub status: Status,
    pub wave: usize,
    pub stage: Stage,
    pub stage_since_ms: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub devices: BTreeMap<String, Slot>,
    /// Gate values at the last evaluation, for `status` and `watch`.
    pub gates: Vec<GateValue>,
    /// Devices the selector picked at the last step.
    #[serde(default)]
    pub selected: u64,
}

impl RolloutState {
    pub fn new(id: u64, plan: Plan, candidate: Candidate, now_ms: u64) -> Self {
        let stage = first_stage(&plan, 0);
        RolloutState {
            id,
            plan,
            candidate,
            status: Status::Running,
            wave: 0,
            stage,
            stage_since_ms: now_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            devices: BTreeMap::new(),
            gates: Vec::new(),
            selected: 0,
        }
    }
}

/// A wave starts in shadow when the plan's shadow phase covers it.
fn first_stage(plan: &Plan, wave: usize) -> Stage {
    if plan.shadow.as_ref().is_some_and(|s| s.covers(wave)) {
        Stage::Shadow
    } else {
        Stage::Install
    }
}

/// Health of a model on one device over some telemetry windows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    pub inferences: u64,
    pub errors: u64,
    pub latency: LatencyHistogram,
}

impl Health {
    pub fn merge(&mut self, o: &Health) {
        self.inferences = self.inferences.saturating_add(o.inferences);
        self.errors = self.errors.saturating_add(o.errors);
        self.latency.merge(&o.latency);
    }
}

/// Shadow comparisons of the candidate on one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShadowObs {
    pub compared: u64,
    pub agreed: u64,
    pub active_latency: LatencyHistogram,
    pub candidate_latency: LatencyHistogram,
}

/// What the store knows about one selected (or already assigned) device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceObs {
    pub online: bool,
    /// Digest (hex) of the model the device reports active.
    pub active: Option<String>,
    /// Latest progress reported for the slot's `command_seq`.
    pub progress: Option<(Phase, Option<String>)>,
    /// The candidate's telemetry on this device since it was commanded.
    pub candidate: Health,
    /// The previous model's telemetry on this device before it was commanded.
    pub baseline: Health,
    pub shadow: ShadowObs,
    /// Largest per-feature PSI of the candidate's live inputs against its baseline.
    pub drift_psi: Option<f64>,
}

/// The fleet as the engine sees it: the devices the selector picks now, plus every device
/// already assigned (even if it no longer matches).
#[derive(Clone, Debug, Default)]
pub struct Observations {
    pub selected: Vec<String>,
    pub devices: BTreeMap<String, DeviceObs>,
}

/// A command the driver must issue (signed, sequence-numbered, persisted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Deploy {
        device: String,
        shadow: bool,
    },
    Promote {
        device: String,
    },
    /// Return to `to` (digest hex) or the device's previous slot.
    Rollback {
        device: String,
        to: Option<String>,
    },
}

impl Action {
    pub fn device(&self) -> &str {
        match self {
            Action::Deploy { device, .. }
            | Action::Promote { device }
            | Action::Rollback { device, .. } => device,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// Not enough data for a verdict yet.
    NoData,
}

/// One gate's value against its threshold at one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateValue {
    pub gate: String,
    pub value: Option<f64>,
    /// `<=` or `>=` and the threshold, e.g. "<= 0.02".
    pub threshold: String,
    pub verdict: Verdict,
    /// What the value was computed over ("48 inferences on 3 devices").
    pub basis: String,
}

/// Something worth a line in the rollout's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub kind: String,
    pub detail: String,
    /// Gate values at the decision, if it was one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateValue>,
}

/// The result of one engine step.
#[derive(Clone, Debug)]
pub struct Step {
    pub state: RolloutState,
    pub actions: Vec<Action>,
    pub events: Vec<Event>,
}

/// What an operator can ask of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Pause,
    Resume,
    Abort,
}

/// Why an operator request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rollout {id} is {status}: cannot {op}")]
pub struct OpRefused {
    pub id: u64,
    pub status: &'static str,
    pub op: &'static str,
}

/// Applies an operator request. Abort rolls back whatever the plan says on failure.
pub fn operate(state: &RolloutState, op: Op, who: &str, now_ms: u64) -> Result<Step, OpRefused> {
    let mut s = state.clone();
    let mut events = Vec::new();
    let mut actions = Vec::new();
    let refuse = |op: &'static str| OpRefused {
        id: state.id,
        status: state.status.name(),
        op,
    };
    match (op, &state.status) {
        (Op::Pause, Status::Running) => {
            s.status = Status::Paused {
                reason: format!("paused by {who}"),
            };
            events.push(event(now_ms, "paused", format!("paused by {who}")));
        }
        (Op::Resume, Status::Paused { .. }) => {
            s.status = Status::Running;
            s.stage_since_ms = now_ms;
            events.push(event(now_ms, "resumed", format!("resumed by {who}")));
        }
        (Op::Abort, Status::Running | Status::Paused { .. } | Status::Completed) => {
            let reason = format!("aborted by {who}");
            start_rollback(
                &mut s,
                &reason,
                now_ms,
                &mut actions,
                &mut events,
                Vec::new(),
            );
        }
        (Op::Pause, _) => return Err(refuse("pause")),
        (Op::Resume, _) => return Err(refuse("resume")),
        (Op::Abort, _) => return Err(refuse("abort")),
    }
    s.updated_at_ms = now_ms;
    Ok(Step {
        state: s,
        actions,
        events,
    })
}

fn event(at_ms: u64, kind: &str, detail: String) -> Event {
    Event {
        at_ms,
        kind: kind.into(),
        detail,
        gates: Vec::new(),
    }
}

/// One step of the engine.
pub fn step(state: &RolloutState, obs: &Observations, now_ms: u64) -> Step {
    let mut s = state.clone();
    let mut actions = Vec::new();
    let mut events = Vec::new();
    let deadline_ms = u64::try_from(s.plan.device_deadline.as_millis()).unwrap_or(u64::MAX);
    let empty = DeviceObs::default();

    // 1. Fold what devices reported into their slots.
    for (id, slot) in s.devices.iter_mut() {
        let o = obs.devices.get(id).unwrap_or(&empty);
        let before = slot.state;
        update_slot(slot, o, &state.candidate.digest, now_ms, deadline_ms);
        if slot.state != before && matches!(slot.state, DevState::Failed) {
            events.push(event(
                now_ms,
                "device-failed",
                format!(
                    "{id}: {}",
                    slot.detail.as_deref().unwrap_or("failed without detail")
                ),
            ));
        }
    }

    match s.status.clone() {
        Status::Running => run(&mut s, obs, now_ms, &mut actions, &mut events),
        Status::Completed => {}
        Status::Paused { .. } => {}
        Status::RollingBack { reason } => {
            let pending = s
                .devices
                .iter()
                .filter(|(id, d)| {
                    d.state == DevState::RollingBack
                        && obs.devices.get(*id).is_some_and(|o| o.online)
                })
                .count();
            if pending == 0 {
                s.status = Status::RolledBack {
                    reason: reason.clone(),
                };
                let done = s
                    .devices
                    .values()
                    .filter(|d| d.state == DevState::RolledBack)
                    .count();
                events.push(event(
                    now_ms,
                    "rolled-back",
                    format!("{done} devices back on their previous model ({reason})"),
                ));
            }
        }
        Status::RolledBack { .. } => {}
    }
    // Devices that finished a shadow phase their wave has moved past (late arrivals) are
    // promoted, unless the rollout was stopped.
    if matches!(s.status, Status::Running | Status::Completed) {
        let wave_done = |slot: &Slot| slot.wave < s.wave || s.stage != Stage::Shadow;
        let late: Vec<String> = s
            .devices
            .iter()
            .filter(|(_, d)| d.state == DevState::Shadowing && wave_done(d))
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            promote(&mut s, &id, now_ms, &mut actions);
        }
    }
    s.updated_at_ms = now_ms;
    Step {
        state: s,
        actions,
        events,
    }
}

fn update_slot(slot: &mut Slot, o: &DeviceObs, candidate: &str, now_ms: u64, deadline_ms: u64) {
    let phase = o.progress.as_ref().map(|(p, _)| *p);
    let detail = || o.progress.as_ref().and_then(|(_, d)| d.clone());
    match slot.state {
        DevState::Deploying | DevState::Promoting | DevState::Active => {
            let new = match phase {
                Some(Phase::Shadowing) if slot.state == DevState::Deploying => {
                    Some(DevState::Shadowing)
                }
                Some(Phase::Active) => Some(DevState::Active),
                Some(Phase::Healthy) => Some(DevState::Healthy),
                Some(Phase::Failed | Phase::Refused) => {
                    slot.detail = detail();
                    Some(DevState::Failed)
                }
                Some(Phase::RolledBack) => {
                    slot.detail = Some(format!(
                        "the agent rolled the candidate back: {}",
                        detail().unwrap_or_default()
                    ));
                    Some(DevState::Failed)
                }
                _ => None,
            };
            if let Some(n) = new {
                slot.state = n;
            } else if slot.state != DevState::Active
                && o.active.as_deref() == Some(candidate)
                && slot.state == DevState::Deploying
            {
                // The progress report was lost but the device says what it runs.
                slot.state = DevState::Active;
            }
            let late = slot
                .commanded_at_ms
                .is_some_and(|t| now_ms.saturating_sub(t) > deadline_ms);
            if matches!(slot.state, DevState::Deploying | DevState::Promoting) && late && o.online {
                slot.state = DevState::Failed;
                slot.detail = Some(format!(
                    "not installed within the device deadline (last phase: {})",
                    phase.map(|p| format!("{p:?}")).unwrap_or("none".into())
                ));
            }
        }
        DevState::RollingBack => match phase {
            Some(Phase::Done | Phase::RolledBack | Phase::Healthy | Phase::Active) => {
                slot.state = DevState::RolledBack;
            }
            Some(Phase::Failed | Phase::Refused) => {
                slot.state = DevState::Failed;
                slot.detail = Some(format!("rollback failed: {}", detail().unwrap_or_default()));
            }
            _ => {
                if o.active.is_some() && o.active == slot.previous {
                    slot.state = DevState::RolledBack;
                }
            }
        },
        DevState::Queued
        | DevState::Shadowing
        | DevState::Healthy
        | DevState::Failed
        | DevState::RolledBack => {}
    }
}

fn deploy(s: &mut RolloutState, id: &str, now_ms: u64, actions: &mut Vec<Action>) {
    // Only a wave in its shadow stage installs as a shadow; past it (or on waves the
    // shadow phase does not cover) devices activate directly.
    let shadow = s.stage == Stage::Shadow;
    if let Some(slot) = s.devices.get_mut(id) {
        slot.state = DevState::Deploying;
        slot.commanded_at_ms = Some(now_ms);
        slot.command_seq = None;
        actions.push(Action::Deploy {
            device: id.to_owned(),
            shadow,
        });
    }
}

fn promote(s: &mut RolloutState, id: &str, now_ms: u64, actions: &mut Vec<Action>) {
    if let Some(slot) = s.devices.get_mut(id) {
        slot.state = DevState::Promoting;
        slot.commanded_at_ms = Some(now_ms);
        slot.command_seq = None;
        actions.push(Action::Promote {
            device: id.to_owned(),
        });
    }
}

fn start_rollback(
    s: &mut RolloutState,
    reason: &str,
    now_ms: u64,
    actions: &mut Vec<Action>,
    events: &mut Vec<Event>,
    gates: Vec<GateValue>,
) {
    let mut sent = 0;
    for (id, slot) in s.devices.iter_mut() {
        match slot.state {
            // Never commanded: nothing to undo.
            DevState::Queued => {
                slot.state = DevState::RolledBack;
                slot.detail = Some("never commanded".into());
            }
            // A shadow never served traffic, but it still runs beside the active model:
            // the rollback command (back to that same active model) makes the agent drop it.
            DevState::Deploying
            | DevState::Promoting
            | DevState::Active
            | DevState::Healthy
            | DevState::Shadowing => {
                if slot.previous.is_none() {
                    slot.state = DevState::Failed;
                    slot.detail = Some("no previous model to return to".into());
                    continue;
                }
                slot.state = DevState::RollingBack;
                slot.commanded_at_ms = Some(now_ms);
                slot.command_seq = None;
                actions.push(Action::Rollback {
                    device: id.clone(),
                    to: slot.previous.clone(),
                });
                sent += 1;
            }
            DevState::Failed | DevState::RollingBack | DevState::RolledBack => {}
        }
    }
    s.status = Status::RollingBack {
        reason: reason.to_owned(),
    };
    events.push(Event {
        at_ms: now_ms,
        kind: "rollback".into(),
        detail: format!("{reason}; rollback sent to {sent} devices"),
        gates,
    });
}

/// Devices selected now, in stable bucket order.
fn ranked(obs: &Observations) -> Vec<&str> {
    let mut v: Vec<(u32, &str)> = obs
        .selected
        .iter()
        .map(|id| (bucket(id), id.as_str()))
        .collect();
    v.sort_unstable();
    v.into_iter().map(|(_, id)| id).collect()
}

fn run(
    s: &mut RolloutState,
    obs: &Observations,
    now_ms: u64,
    actions: &mut Vec<Action>,
    events: &mut Vec<Event>,
) {
    let online = |id: &str| obs.devices.get(id).is_some_and(|o| o.online);

    // 2. Assign devices up to the current wave's cumulative size.
    let ranked = ranked(obs);
    s.selected = ranked.len() as u64;
    let want = s.plan.waves[s.wave].cumulative(ranked.len());
    let mut newly = 0;
    for id in ranked.iter().take(want) {
        if !s.devices.contains_key(*id) {
            let o = obs.devices.get(*id);
            s.devices.insert(
                (*id).to_owned(),
                Slot {
                    wave: s.wave,
                    state: DevState::Queued,
                    assigned_at_ms: now_ms,
                    commanded_at_ms: None,
                    command_seq: None,
                    previous: o.and_then(|o| o.active.clone()),
                    detail: None,
                },
            );
            newly += 1;
        }
    }
    if newly > 0 {
        events.push(event(
            now_ms,
            "assigned",
            format!(
                "wave {}: {newly} devices assigned ({want} of {} selected)",
                s.wave + 1,
                ranked.len()
            ),
        ));
    }

    // 3. Command queued devices, online first, within the concurrency limit. Offline
    //    devices get their command too (delivered when they return) without taking a slot.
    let limit = match s.plan.max_concurrent {
        0 => usize::MAX,
        n => n as usize,
    };
    let busy = s
        .devices
        .iter()
        .filter(|(id, d)| d.state == DevState::Deploying && online(id))
        .count();
    let mut free = limit.saturating_sub(busy);
    let queued: Vec<String> = s
        .devices
        .iter()
        .filter(|(_, d)| d.state == DevState::Queued)
        .map(|(id, _)| id.clone())
        .collect();
    for id in queued {
        if online(&id) {
            if free == 0 {
                continue;
            }
            free -= 1;
        }
        deploy(s, &id, now_ms, actions);
    }

    // 4. Gates over every device that took the candidate.
    let gates = evaluate(s, obs);
    let shadow_gates = if s.stage == Stage::Shadow {
        evaluate_shadow(s, obs)
    } else {
        Vec::new()
    };
    let failed: Vec<&GateValue> = gates
        .iter()
        .chain(&shadow_gates)
        .filter(|g| g.verdict == Verdict::Fail)
        .collect();
    let mut all_gates = gates.clone();
    all_gates.extend(shadow_gates.iter().cloned());
    s.gates = all_gates.clone();
    if !failed.is_empty() {
        let reason = format!(
            "gate failed in wave {}: {}",
            s.wave + 1,
            failed
                .iter()
                .map(|g| format!(
                    "{} = {} (limit {})",
                    g.gate,
                    g.value.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
                    g.threshold
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        match s.plan.on_failure {
            OnFailure::Pause => {
                s.status = Status::Paused {
                    reason: reason.clone(),
                };
                events.push(Event {
                    at_ms: now_ms,
                    kind: "paused".into(),
                    detail: reason,
                    gates: all_gates,
                });
            }
            OnFailure::Rollback => start_rollback(s, &reason, now_ms, actions, events, all_gates),
        }
        return;
    }

    // 5. Stage progress for the current wave.
    let wave = s.wave;
    let in_wave = |d: &&Slot| d.wave == wave;
    let since = now_ms.saturating_sub(s.stage_since_ms);
    match s.stage {
        Stage::Shadow => {
            let Some(shadow) = s.plan.shadow.clone() else {
                s.stage = Stage::Install;
                return;
            };
            let waiting = s.devices.iter().any(|(id, d)| {
                d.wave == wave
                    && matches!(d.state, DevState::Queued | DevState::Deploying)
                    && online(id)
            });
            let shadowing = s
                .devices
                .values()
                .filter(in_wave)
                .filter(|d| d.state == DevState::Shadowing)
                .count();
            let min = u64::try_from(shadow.duration.as_millis()).unwrap_or(u64::MAX);
            let data_ok = !s.plan.gates.require_data
                || shadow_gates.iter().all(|g| g.verdict == Verdict::Pass);
            if !waiting && shadowing > 0 && since >= min && data_ok {
                let ids: Vec<String> = s
                    .devices
                    .iter()
                    .filter(|(_, d)| d.wave == wave && d.state == DevState::Shadowing)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in &ids {
                    promote(s, id, now_ms, actions);
                }
                events.push(Event {
                    at_ms: now_ms,
                    kind: "promoted".into(),
                    detail: format!(
                        "wave {}: shadow gates passed; promoting {} devices",
                        wave + 1,
                        ids.len()
                    ),
                    gates: shadow_gates,
                });
                s.stage = Stage::Install;
                s.stage_since_ms = now_ms;
            }
        }
        Stage::Install => {
            let waiting = s.devices.iter().any(|(id, d)| {
                d.wave <= wave
                    && (d.state == DevState::Queued
                        || (d.state.in_flight() && online(id))
                        || (d.state == DevState::Shadowing && d.wave == wave))
            });
            let healthy = s
                .devices
                .values()
                .filter(|d| d.state.runs_candidate())
                .count();
            if !waiting && healthy > 0 {
                s.stage = Stage::Bake;
                s.stage_since_ms = now_ms;
                events.push(event(
                    now_ms,
                    "baking",
                    format!(
                        "wave {}: every online device finished; baking for {}",
                        wave + 1,
                        humantime::format_duration(s.plan.waves[wave].bake)
                    ),
                ));
            }
        }
        Stage::Bake => {
            let bake = u64::try_from(s.plan.waves[wave].bake.as_millis()).unwrap_or(u64::MAX);
            let data_ok =
                !s.plan.gates.require_data || gates.iter().all(|g| g.verdict == Verdict::Pass);
            if since >= bake && data_ok {
                if wave + 1 >= s.plan.waves.len() {
                    s.status = Status::Completed;
                    events.push(Event {
                        at_ms: now_ms,
                        kind: "completed".into(),
                        detail: format!(
                            "all {} waves passed; {} devices run {}@{}",
                            s.plan.waves.len(),
                            s.devices
                                .values()
                                .filter(|d| d.state.runs_candidate())
                                .count(),
                            s.candidate.name,
                            s.candidate.version
                        ),
                        gates,
                    });
                } else {
                    s.wave += 1;
                    s.stage = first_stage(&s.plan, s.wave);
                    s.stage_since_ms = now_ms;
                    events.push(Event {
                        at_ms: now_ms,
                        kind: "advanced".into(),
                        detail: format!(
                            "wave {} passed every gate; starting wave {}",
                            wave + 1,
                            wave + 2
                        ),
                        gates,
                    });
                }
            }
        }
    }
}

fn ratio_gate(
    gate: &str,
    value: Option<f64>,
    limit: f64,
    at_most: bool,
    enough: bool,
    basis: String,
) -> GateValue {
    let verdict = match value {
        Some(v) if enough => {
            let ok = if at_most { v <= limit } else { v >= limit };
            if ok {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        }
        _ => Verdict::NoData,
    };
    GateValue {
        gate: gate.into(),
        value,
        threshold: format!("{} {limit}", if at_most { "<=" } else { ">=" }),
        verdict,
        basis,
    }
}

/// The health gates over every device of the rollout that runs the candidate.
pub fn evaluate(s: &RolloutState, obs: &Observations) -> Vec<GateValue> {
    let g = &s.plan.gates;
    let mut out = Vec::new();
    let online = |id: &str| obs.devices.get(id).is_some_and(|o| o.online);
    if let Some(min) = g.min_install_success {
        let installed = s
            .devices
            .values()
            .filter(|d| d.state.runs_candidate())
            .count();
        let failed = s
            .devices
            .values()
            .filter(|d| d.state == DevState::Failed)
            .count();
        let assigned = s
            .devices
            .iter()
            .filter(|(id, d)| d.state != DevState::Queued || online(id))
            .count();
        let finished = installed + failed;
        let value = (finished > 0).then(|| installed as f64 / finished as f64);
        // Fail as soon as failures exceed what the threshold allows of all assigned devices;
        // pass once every finished device counts.
        let budget = ((1.0 - min) * assigned as f64 + 1e-9).floor() as usize;
        let verdict = if failed > budget {
            Verdict::Fail
        } else if finished > 0 {
            Verdict::Pass
        } else {
            Verdict::NoData
        };
        out.push(GateValue {
            gate: "install_success".into(),
            value,
            threshold: format!(">= {min}"),
            verdict,
            basis: format!("{installed} installed, {failed} failed of {assigned} assigned"),
        });
    }
    let mut cand = Health::default();
    let mut base = Health::default();
    let mut n = 0;
    let mut psi: Option<f64> = None;
    for (id, d) in &s.devices {
        if !d.state.runs_candidate() {
            continue;
        }
        if let Some(o) = obs.devices.get(id) {
            n += 1;
            cand.merge(&o.candidate);
            base.merge(&o.baseline);
            if let Some(p) = o.drift_psi {
                psi = Some(psi.map_or(p, |q: f64| q.max(p)));
            }
        }
    }
    if let Some(max) = g.max_error_rate {
        let value = (cand.inferences > 0).then(|| cand.errors as f64 / cand.inferences as f64);
        out.push(ratio_gate(
            "error_rate",
            value,
            max,
            true,
            cand.inferences >= g.min_inferences.max(1),
            format!(
                "{} errors in {} inferences on {n} devices",
                cand.errors, cand.inferences
            ),
        ));
    }
    if let Some(max) = g.max_p99_latency_ratio {
        let c = cand.latency.quantile_upper_us(0.99);
        let b = base.latency.quantile_upper_us(0.99);
        let value = match (c, b) {
            (Some(c), Some(b)) if b > 0 => Some(c as f64 / b as f64),
            _ => None,
        };
        let need = g.min_inferences.max(P99_MIN_SAMPLES);
        let enough = cand.latency.total() >= need && base.latency.total() >= need;
        out.push(ratio_gate(
            "p99_latency_ratio",
            value,
            max,
            true,
            enough,
            format!(
                "candidate p99 <= {} us over {}, previous p99 <= {} us over {}",
                c.map_or("-".into(), |v| v.to_string()),
                cand.latency.total(),
                b.map_or("-".into(), |v| v.to_string()),
                base.latency.total()
            ),
        ));
    }
    if let Some(max) = g.max_drift_psi {
        out.push(ratio_gate(
            "drift_psi",
            psi,
            max,
            true,
            psi.is_some(),
            format!("largest feature PSI over {n} devices"),
        ));
    }
    out
}

/// Observations a p99 needs before a latency gate judges it: below 100 the p99 is the
/// maximum, and one preempted request (or a cold first run) decides the verdict.
pub const P99_MIN_SAMPLES: u64 = 100;

/// The shadow gates over the current wave's shadowing devices.
pub fn evaluate_shadow(s: &RolloutState, obs: &Observations) -> Vec<GateValue> {
    let Some(p) = &s.plan.shadow else {
        return Vec::new();
    };
    let mut total = ShadowObs::default();
    let mut n = 0;
    for (id, d) in &s.devices {
        if d.wave != s.wave || d.state != DevState::Shadowing {
            continue;
        }
        if let Some(o) = obs.devices.get(id) {
            n += 1;
            total.compared = total.compared.saturating_add(o.shadow.compared);
            total.agreed = total.agreed.saturating_add(o.shadow.agreed);
            total.active_latency.merge(&o.shadow.active_latency);
            total.candidate_latency.merge(&o.shadow.candidate_latency);
        }
    }
    let enough = total.compared >= p.min_compared.max(1);
    let mut out = vec![ratio_gate(
        "shadow_agreement",
        (total.compared > 0).then(|| total.agreed as f64 / total.compared as f64),
        p.min_agreement,
        false,
        enough,
        format!(
            "{} of {} compared inputs agreed on {n} devices",
            total.agreed, total.compared
        ),
    )];
    if let Some(max) = p.max_latency_ratio {
        let enough = total.compared >= p.min_compared.max(P99_MIN_SAMPLES);
        let c = total.candidate_latency.quantile_upper_us(0.99);
        let a = total.active_latency.quantile_upper_us(0.99);
        let value = match (c, a) {
            (Some(c), Some(a)) if a > 0 => Some(c as f64 / a as f64),
            _ => None,
        };
        out.push(ratio_gate(
            "shadow_p99_latency_ratio",
            value,
            max,
            true,
            enough,
            format!(
                "candidate p99 <= {} us, active p99 <= {} us on the same inputs",
                c.map_or("-".into(), |v| v.to_string()),
                a.map_or("-".into(), |v| v.to_string())
            ),
        ));
    }
    out
}
