//! Which devices take part, and when they are commanded.
//!
//! [`assign`] ranks the selected devices by bucket (stable across steps and restarts) and
//! gives a slot to each one up to the current wave's cumulative size; [`dispatch`] commands
//! queued devices within the plan's concurrency limit and its per-wave deploy rate; [`preview`] shows, before a rollout
//! starts, which devices its waves would take.

use std::collections::BTreeMap;

use super::engine::{event, Action, DevState, Event, Observations, RolloutState, Slot};
use super::plan::{bucket, Plan};
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
    // Late joiners (if the plan takes them) go in at the current wave, whatever their rank.
    let created = s.created_at_ms;
    let late = |id: &str| {
        s.plan.late_joiners
            && obs
                .devices
                .get(id)
                .is_some_and(|o| o.joined_at_ms > created)
    };
    let late: Vec<&str> = ranked
        .iter()
        .skip(want)
        .copied()
        .filter(|id| !s.devices.contains_key(*id) && late(id))
        .collect();
    if !late.is_empty() {
        events.push(event(
            now_ms,
            "late-joiners",
            format!(
                "wave {}: {} devices that joined the selector after the start assigned",
                s.wave + 1,
                late.len()
            ),
        ));
    }
    for id in ranked.iter().take(want).chain(late.iter()) {
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
    let mut paced = paced_allowance(s, now_ms);
    // Outside the apply windows a device with no model to shadow beside waits queued:
    // its only way in is activating, which waits for a window.
    let closed = !super::windows::open(&s.plan.windows, now_ms);
    let queued: Vec<String> = s
        .devices
        .iter()
        .filter(|(_, d)| d.state == DevState::Queued && !(closed && d.previous.is_none()))
        .map(|(id, _)| id.clone())
        .collect();
    for id in queued {
        if paced == 0 {
            break;
        }
        if obs.online(&id) {
            if free == 0 {
                continue;
            }
            free -= 1;
        }
        paced -= 1;
        deploy(s, &id, now_ms, actions);
    }
}

/// Deploys the plan's `deploys_per_second` still allows in the current wave at `now`: one
/// second's worth at the wave's first command, then the rate since it. Counted from the
/// wave's devices' command times, so a restart neither resets nor doubles it.
fn paced_allowance(s: &RolloutState, now_ms: u64) -> usize {
    let rate = s.plan.deploys_per_second;
    if !(rate.is_finite() && rate > 0.0) {
        return usize::MAX;
    }
    let sent = s
        .devices
        .values()
        .filter(|d| d.wave == s.wave)
        .filter_map(|d| d.commanded_at_ms);
    let (count, first) = sent.fold((0usize, u64::MAX), |(n, f), t| (n + 1, f.min(t)));
    let elapsed_s = now_ms.saturating_sub(first.min(now_ms)) as f64 / 1000.0;
    let allowed = (rate.ceil() + rate * elapsed_s).floor();
    (allowed as usize).saturating_sub(count)
}

/// What a plan would do to the fleet as it is now: the devices it targets and how its
/// waves split them. Shown before a rollout starts (`--dry-run`, `drover rollout plan`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    /// Devices the selector matches (decommissioned ones excluded).
    pub matched: usize,
    /// Matched devices another open rollout holds, with its id: left out until it ends.
    pub held: BTreeMap<String, u64>,
    /// Matched devices that are not held, in wave order.
    pub targets: Vec<String>,
    pub waves: Vec<WavePreview>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WavePreview {
    /// Cumulative devices after this wave.
    pub cumulative: usize,
    /// Devices this wave adds (0: it passes at once).
    pub adds: usize,
}

/// Splits `matched` (ids the selector picks) by `holders` (device → the open rollout that
/// holds it) and ranks the rest into `plan`'s waves, as [`assign`] will.
pub fn preview(plan: &Plan, matched: &[String], holders: &BTreeMap<String, u64>) -> Preview {
    let mut held = BTreeMap::new();
    let mut free = Vec::new();
    for id in matched {
        match holders.get(id) {
            Some(r) => {
                held.insert(id.clone(), *r);
            }
            None => free.push(id.clone()),
        }
    }
    let obs = Observations {
        selected: free,
        ..Observations::default()
    };
    let targets: Vec<String> = ranked(&obs).into_iter().map(str::to_owned).collect();
    let mut before = 0;
    let waves = plan
        .waves
        .iter()
        .map(|w| {
            let cumulative = w.cumulative(targets.len()).max(before);
            let adds = cumulative - before;
            before = cumulative;
            WavePreview { cumulative, adds }
        })
        .collect();
    Preview {
        matched: matched.len(),
        held,
        targets,
        waves,
    }
}

impl Preview {
    /// Why a rollout of this plan must not start: it would target no device.
    /// Why a rollout of `model` must not start beside an open rollout of the same model
    /// that holds some of its devices: their commands would supersede each other in the
    /// device's slot. Rollouts of other models never conflict (see `targets::holders`).
    pub fn conflict(&self, model: &str) -> Option<String> {
        if self.held.is_empty() {
            return None;
        }
        let by: std::collections::BTreeSet<u64> = self.held.values().copied().collect();
        let ids: Vec<String> = by.iter().map(u64::to_string).collect();
        Some(format!(
            "rollout(s) {} of the same model already hold {} of the {} devices this plan selects; \
             two rollouts of one model on a device would fight over its slot. Wait for {} to end \
             (`drover rollout status {}`) or abort it, then start the rollout of {model}",
            ids.join(", "),
            self.held.len(),
            self.matched,
            ids.join(", "),
            ids[0],
        ))
    }

    pub fn refusal(&self, selector: &str) -> Option<String> {
        if !self.targets.is_empty() {
            return None;
        }
        Some(if self.matched == 0 {
            format!(
                "selector {selector:?} matches no device: check it with `drover device list --label ...`"
            )
        } else {
            let by: std::collections::BTreeSet<u64> = self.held.values().copied().collect();
            format!(
                "all {} devices selector {selector:?} matches are held by rollout(s) {}: wait for them to end or abort them",
                self.matched,
                by.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        })
    }
}
