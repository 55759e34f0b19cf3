//! One device's slot: what its reports do to it, and the commands that move it on.
//!
//! [`update_slot`] folds a device's progress report (or, when a report was lost, the model it
//! says it runs) into its state and fails it past the device deadline; [`deploy`] and
//! [`promote`] mark the slot commanded and emit the action the driver turns into a command.

use drover_protocol::messages::Phase;

use super::engine::{Action, DevState, DeviceObs, RolloutState, Slot, Stage};

/// Folds what one device reported into its slot.
pub(super) fn update_slot(
    slot: &mut Slot,
    o: &DeviceObs,
    candidate: &str,
    now_ms: u64,
    deadline_ms: u64,
) {
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

pub(super) fn deploy(s: &mut RolloutState, id: &str, now_ms: u64, actions: &mut Vec<Action>) {
    // Only a wave in its shadow stage installs as a shadow; past it (or on waves the
    // shadow phase does not cover) devices activate directly. Outside the plan's apply
    // windows they install as a shadow too (download and self-test now), and are
    // promoted inside a window.
    let shadow = s.stage == Stage::Shadow || !super::windows::open(&s.plan.windows, now_ms);
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

pub(super) fn promote(s: &mut RolloutState, id: &str, now_ms: u64, actions: &mut Vec<Action>) {
    if let Some(slot) = s.devices.get_mut(id) {
        slot.state = DevState::Promoting;
        slot.commanded_at_ms = Some(now_ms);
        slot.command_seq = None;
        actions.push(Action::Promote {
            device: id.to_owned(),
        });
    }
}
