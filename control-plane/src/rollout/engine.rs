//! The rollout engine: a pure function of (rollout state, fleet observations, now) to the
//! next state, the commands to send and the events to record.
//!
//! Nothing here does I/O or reads a clock, so every transition is unit-tested with the
//! time passed in. The async shell (`driver.rs`) builds the observations from the store,
//! persists the new state together with the commands it issues (one transaction), and
//! publishes them.
//!
//! Layout: this file holds the types (the state types are stored as JSON and returned by the
//! API, so their field names are a schema), [`operate`], [`step`] and the stage transitions
//! of a running rollout (shadow, install, bake, stop, rollback). Its helpers live beside it:
//! `waves.rs` assigns selected devices to the current wave and commands them within the
//! concurrency limit, `slots.rs` folds device reports into their slots and issues deploy and
//! promote, `gates.rs` evaluates the health and shadow gates.
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

pub use super::gates::{evaluate, evaluate_shadow, P99_MIN_SAMPLES};
use super::gates::{failure_reason, hold_reason, passed_how};
use super::plan::{OnFailure, Plan};
use super::slots::{promote, update_slot};
use super::waves::{assign, dispatch};
use super::windows;

/// The model being rolled out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub version: String,
    /// Manifest digest, hex.
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Running,
    Paused {
        reason: String,
    },
    Completed,
    RollingBack {
        reason: String,
    },
    RolledBack {
        reason: String,
    },
    /// An operator aborted it: devices are sent back as for a rollback, but the outcome
    /// is the operator's call, not a gate's, and is reported apart.
    Aborting {
        reason: String,
    },
    Aborted {
        reason: String,
    },
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused { .. } => "paused",
            Status::Completed => "completed",
            Status::RollingBack { .. } => "rolling-back",
            Status::RolledBack { .. } => "rolled-back",
            Status::Aborting { .. } => "aborting",
            Status::Aborted { .. } => "aborted",
        }
    }

    /// Still needs the driver's attention (late devices, rollbacks in flight).
    pub fn is_active(&self) -> bool {
        !matches!(self, Status::RolledBack { .. } | Status::Aborted { .. })
    }
}

/// Where the current wave is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The wave's devices run the candidate in shadow; shadow gates decide promotion.
    Shadow,
    /// Devices install (or are promoted); the stage ends when every online one finished.
    Install,
    /// Every device of the wave finished; health gates must hold for the bake time.
    Bake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub(super) fn runs_candidate(self) -> bool {
        matches!(self, DevState::Active | DevState::Healthy)
    }

    /// Waiting on the device.
    pub(super) fn in_flight(self) -> bool {
        matches!(
            self,
            DevState::Deploying | DevState::Promoting | DevState::Active
        )
    }
}

/// One device's part in a rollout.
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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
    pub selected: u64,
    /// Why the current stage, its time over, still waits (gates without a verdict).
    pub waiting: Option<String>,
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
            waiting: None,
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
    /// When the device came to match the fleet (its enrollment), for late joiners.
    pub joined_at_ms: u64,
}

/// The fleet as the engine sees it: the devices the selector picks now, plus every device
/// already assigned (even if it no longer matches).
#[derive(Clone, Debug, Default)]
pub struct Observations {
    pub selected: Vec<String>,
    pub devices: BTreeMap<String, DeviceObs>,
    /// Labelled predictions since the rollout started, `(right, labelled)`: the
    /// candidate's, and the control group's on other versions of the model. Read only
    /// when the plan gates on live accuracy.
    pub live_accuracy: Option<LiveAccuracy>,
}

/// See [`Observations::live_accuracy`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LiveAccuracy {
    pub candidate: (u64, u64),
    pub control: (u64, u64),
}

impl Observations {
    /// Whether the device is connected now; a device the store knows nothing of is not.
    pub(super) fn online(&self, id: &str) -> bool {
        self.devices.get(id).is_some_and(|o| o.online)
    }
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

/// A gate's verdict: three-valued, so a gate short of data is never read as passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// No verdict yet: too little data (the gate's `reason` says what is missing).
    NoData,
}

/// One gate's value against its threshold at one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct GateValue {
    pub gate: String,
    pub value: Option<f64>,
    /// `<=` or `>=` and the threshold, e.g. "<= 0.02".
    pub threshold: String,
    pub verdict: Verdict,
    /// What the value was computed over ("48 inferences on 3 devices").
    pub basis: String,
    /// Why there is no verdict ("needs 100 inferences, has 48"); `None` with a verdict.
    pub reason: Option<String>,
}

/// Something worth a line in the rollout's report.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub at_ms: u64,
    pub kind: String,
    pub detail: String,
    /// Gate values at the decision, if it was one.
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
    /// Queue the failed devices again (they get a fresh deploy command).
    Retry,
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
            s.status = Status::Aborting { reason };
        }
        (Op::Retry, Status::Running | Status::Paused { .. } | Status::Completed) => {
            let failed: Vec<String> = s
                .devices
                .iter()
                .filter(|(_, d)| d.state == DevState::Failed)
                .map(|(id, _)| id.clone())
                .collect();
            if failed.is_empty() {
                return Err(OpRefused {
                    id: state.id,
                    status: "without failed devices",
                    op: "retry",
                });
            }
            for id in &failed {
                if let Some(slot) = s.devices.get_mut(id) {
                    slot.state = DevState::Queued;
                    slot.commanded_at_ms = None;
                    slot.command_seq = None;
                    slot.detail = Some("retried".into());
                }
            }
            // A completed rollout runs again for them; its waves are all passed, so it
            // completes again once they are commanded.
            if s.status == Status::Completed {
                s.status = Status::Running;
            }
            let when = if matches!(s.status, Status::Paused { .. }) {
                "on resume"
            } else {
                "now"
            };
            events.push(event(
                now_ms,
                "retry",
                format!(
                    "{who} retried {} failed devices; they are commanded {when}",
                    failed.len()
                ),
            ));
        }
        (Op::Pause, _) => return Err(refuse("pause")),
        (Op::Resume, _) => return Err(refuse("resume")),
        (Op::Abort, _) => return Err(refuse("abort")),
        (Op::Retry, _) => return Err(refuse("retry")),
    }
    s.updated_at_ms = now_ms;
    Ok(Step {
        state: s,
        actions,
        events,
    })
}

pub(super) fn event(at_ms: u64, kind: &str, detail: String) -> Event {
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

    // Fold what devices reported into their slots.
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
        Status::RollingBack { reason } | Status::Aborting { reason } => {
            finish_rollback(&mut s, obs, &reason, now_ms, &mut events)
        }
        Status::RolledBack { .. } | Status::Aborted { .. } => {}
    }
    if matches!(s.status, Status::Running | Status::Completed) {
        promote_late(&mut s, now_ms, &mut actions);
    }
    s.updated_at_ms = now_ms;
    Step {
        state: s,
        actions,
        events,
    }
}

/// Rolling back: done once no online device still awaits its rollback (offline ones get it
/// when they return).
fn finish_rollback(
    s: &mut RolloutState,
    obs: &Observations,
    reason: &str,
    now_ms: u64,
    events: &mut Vec<Event>,
) {
    let pending = s
        .devices
        .iter()
        .filter(|(id, d)| d.state == DevState::RollingBack && obs.online(id))
        .count();
    if pending == 0 {
        let reason = reason.to_owned();
        let aborted = matches!(s.status, Status::Aborting { .. });
        let done = s
            .devices
            .values()
            .filter(|d| d.state == DevState::RolledBack)
            .count();
        let detail = format!("{done} devices back on their previous model ({reason})");
        if aborted {
            s.status = Status::Aborted { reason };
            events.push(event(now_ms, "aborted", detail));
        } else {
            s.status = Status::RolledBack { reason };
            events.push(event(now_ms, "rolled-back", detail));
        }
    }
}

/// Devices that finished a shadow phase their wave has moved past (late arrivals) are
/// promoted; the caller skips this once the rollout was stopped.
fn promote_late(s: &mut RolloutState, now_ms: u64, actions: &mut Vec<Action>) {
    if !windows::open(&s.plan.windows, now_ms) {
        return;
    }
    let wave_done = |slot: &Slot| slot.wave < s.wave || s.stage != Stage::Shadow;
    let late: Vec<String> = s
        .devices
        .iter()
        .filter(|(_, d)| d.state == DevState::Shadowing && wave_done(d))
        .map(|(id, _)| id.clone())
        .collect();
    for id in late {
        promote(s, &id, now_ms, actions);
    }
}

/// Rolls back every device that took (or was sent) the candidate to its previous model;
/// a device with no previous model fails, one never commanded is done at once.
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

/// A running rollout's step: assign and command devices, judge the gates, then move the
/// current wave's stage on.
fn run(
    s: &mut RolloutState,
    obs: &Observations,
    now_ms: u64,
    actions: &mut Vec<Action>,
    events: &mut Vec<Event>,
) {
    assign(s, obs, now_ms, events);
    dispatch(s, obs, now_ms, actions);

    // Gates over every device that took the candidate.
    let gates = evaluate(s, obs);
    let shadow_gates = if s.stage == Stage::Shadow {
        evaluate_shadow(s, obs)
    } else {
        Vec::new()
    };
    let mut all_gates = gates.clone();
    all_gates.extend(shadow_gates.iter().cloned());
    s.gates = all_gates.clone();
    if let Some(reason) = failure_reason(s.wave, &all_gates) {
        stop(s, reason, all_gates, now_ms, actions, events);
        return;
    }

    if wave_adds_nothing(s) {
        let target = s.plan.waves[s.wave].cumulative(s.selected as usize);
        let detail = format!(
            "wave {} adds no devices ({target} of {} selected were already assigned); passed at once",
            s.wave + 1,
            s.selected
        );
        events.push(event(now_ms, "wave-empty", detail));
        advance(s, all_gates, now_ms, events);
        return;
    }
    match s.stage {
        Stage::Shadow => shadow_stage(s, obs, shadow_gates, now_ms, actions, events),
        Stage::Install => install_stage(s, obs, now_ms, events),
        Stage::Bake => bake_stage(s, gates, now_ms, events),
    }
}

/// A gate failed: pause or roll back, as the plan says.
fn stop(
    s: &mut RolloutState,
    reason: String,
    gates: Vec<GateValue>,
    now_ms: u64,
    actions: &mut Vec<Action>,
    events: &mut Vec<Event>,
) {
    match s.plan.on_failure {
        OnFailure::Pause => {
            s.status = Status::Paused {
                reason: reason.clone(),
            };
            events.push(Event {
                at_ms: now_ms,
                kind: "paused".into(),
                detail: reason,
                gates,
            });
        }
        OnFailure::Rollback => start_rollback(s, &reason, now_ms, actions, events, gates),
    }
}

/// The wave shadows the candidate: once no online device of the wave is still installing,
/// the shadow duration has passed and (if the plan requires data) the shadow gates pass,
/// its shadowing devices are promoted and the wave installs.
fn shadow_stage(
    s: &mut RolloutState,
    obs: &Observations,
    shadow_gates: Vec<GateValue>,
    now_ms: u64,
    actions: &mut Vec<Action>,
    events: &mut Vec<Event>,
) {
    let wave = s.wave;
    let since = now_ms.saturating_sub(s.stage_since_ms);
    let Some(shadow) = s.plan.shadow.clone() else {
        s.stage = Stage::Install;
        return;
    };
    let waiting = s.devices.iter().any(|(id, d)| {
        d.wave == wave
            && matches!(d.state, DevState::Queued | DevState::Deploying)
            && obs.online(id)
    });
    let shadowing = s
        .devices
        .values()
        .filter(|d| d.wave == wave && d.state == DevState::Shadowing)
        .count();
    let min = u64::try_from(shadow.duration.as_millis()).unwrap_or(u64::MAX);
    if waiting || shadowing == 0 || since < min {
        return;
    }
    // Never promote on fewer than `min_compared` comparisons, whatever `on_no_data` says.
    let agreement = shadow_gates.iter().find(|g| g.gate == "shadow_agreement");
    if let Some(g) = agreement.filter(|g| g.verdict != Verdict::Pass) {
        let why = g.reason.as_deref().unwrap_or("no verdict");
        hold(s, format!("shadow_agreement: {why}"), now_ms, events);
        return;
    }
    if let Some(why) = hold_reason(s.plan.gates.no_data_policy(), &shadow_gates) {
        hold(s, why, now_ms, events);
        return;
    }
    if !windows::open(&s.plan.windows, now_ms) {
        hold(s, outside_windows(&s.plan.windows), now_ms, events);
        return;
    }
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
            "wave {}: shadow phase over, {}; promoting {} devices",
            wave + 1,
            passed_how(&shadow_gates),
            ids.len()
        ),
        gates: shadow_gates,
    });
    s.stage = Stage::Install;
    s.stage_since_ms = now_ms;
    s.waiting = None;
}

/// The wave installs: once nothing up to it is queued, shadowing or in flight on an online
/// device, and some device runs the candidate, the bake starts.
fn install_stage(s: &mut RolloutState, obs: &Observations, now_ms: u64, events: &mut Vec<Event>) {
    let wave = s.wave;
    let waiting = s.devices.iter().any(|(id, d)| {
        d.wave <= wave
            && (d.state == DevState::Queued
                || (d.state.in_flight() && obs.online(id))
                || (d.state == DevState::Shadowing && d.wave == wave))
    });
    let healthy = s
        .devices
        .values()
        .filter(|d| d.state.runs_candidate())
        .count();
    if waiting && !windows::open(&s.plan.windows, now_ms) {
        hold(s, outside_windows(&s.plan.windows), now_ms, events);
    }
    if !waiting && healthy > 0 {
        s.stage = Stage::Bake;
        s.stage_since_ms = now_ms;
        s.waiting = None;
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

/// The wave bakes: once the bake time has passed and (if the plan requires data) every
/// health gate passes, the next wave starts, or the rollout completes after the last.
fn bake_stage(s: &mut RolloutState, gates: Vec<GateValue>, now_ms: u64, events: &mut Vec<Event>) {
    let wave = s.wave;
    let since = now_ms.saturating_sub(s.stage_since_ms);
    let bake = u64::try_from(s.plan.waves[wave].bake.as_millis()).unwrap_or(u64::MAX);
    if since < bake {
        return;
    }
    if let Some(why) = hold_reason(s.plan.gates.no_data_policy(), &gates) {
        hold(s, why, now_ms, events);
        return;
    }
    advance(s, gates, now_ms, events);
}

fn outside_windows(w: &[String]) -> String {
    format!(
        "outside the apply windows ({}): devices have the model and switch inside one",
        w.join(", ")
    )
}

/// The stage's time is over but it must wait: say why once (a `holding` event), and keep
/// the reason, with its current counts, for `status` and `watch`.
fn hold(s: &mut RolloutState, why: String, now_ms: u64, events: &mut Vec<Event>) {
    if s.waiting.is_none() {
        let detail = format!("wave {} holds: {why}", s.wave + 1);
        events.push(Event {
            at_ms: now_ms,
            kind: "holding".into(),
            detail,
            gates: s.gates.clone(),
        });
    }
    s.waiting = Some(why);
}

/// A wave that assigned no device of its own: small fleets, where rounding up makes
/// several cumulative percentages the same device count. Waiting on it (for a shadowing
/// device, say) would hang the rollout, so it passes at once. A rollout with no device
/// at all is not "past" anything and holds instead.
fn wave_adds_nothing(s: &RolloutState) -> bool {
    !s.devices.is_empty() && !s.devices.values().any(|d| d.wave == s.wave)
}

/// The current wave is done: start the next one, or complete after the last.
fn advance(s: &mut RolloutState, gates: Vec<GateValue>, now_ms: u64, events: &mut Vec<Event>) {
    let wave = s.wave;
    s.waiting = None;
    if wave + 1 >= s.plan.waves.len() {
        s.status = Status::Completed;
        events.push(Event {
            at_ms: now_ms,
            kind: "completed".into(),
            detail: format!(
                "all {} waves passed ({}); {} devices run {}@{}",
                s.plan.waves.len(),
                passed_how(&gates),
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
                "wave {} passed ({}); starting wave {}",
                wave + 1,
                passed_how(&gates),
                wave + 2
            ),
            gates,
        });
    }
}
