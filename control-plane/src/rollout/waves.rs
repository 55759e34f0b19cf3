//! Which devices take part, and when they are commanded.
//!
//! [`assign`] ranks the selected devices by bucket (stable across steps and restarts) and
//! gives a slot to each one up to the current wave's cumulative size; [`dispatch`] commands
//! queued devices within the plan's concurrency limit.

use super::engine::{event, Action, DevState, Event, Observations, RolloutState, Slot};
use super::plan::bucket;
use super::slots::deploy;

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

/// Assigns devices up to the current wave's cumulative size.
pub(super) fn assign(
    s: &mut RolloutState,
    obs: &Observations,
    now_ms: u64,
    events: &mut Vec<Event>,
) {
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
}

/// Commands queued devices, online first, within the concurrency limit. Offline devices get
/// their command too (delivered when they return) without taking a slot.
pub(super) fn dispatch(
    s: &mut RolloutState,
    obs: &Observations,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let limit = match s.plan.max_concurrent {
        0 => usize::MAX,
        n => n as usize,
    };
    let busy = s
        .devices
        .iter()
        .filter(|(id, d)| d.state == DevState::Deploying && obs.online(id))
        .count();
    let mut free = limit.saturating_sub(busy);
    let queued: Vec<String> = s
        .devices
        .iter()
        .filter(|(_, d)| d.state == DevState::Queued)
        .map(|(id, _)| id.clone())
        .collect();
    for id in queued {
        if obs.online(&id) {
            if free == 0 {
                continue;
            }
            free -= 1;
        }
        deploy(s, &id, now_ms, actions);
    }
}
