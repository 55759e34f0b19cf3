//! Which devices a rollout targets, read from the store's device rows: the selector's
//! matches, the devices other open rollouts hold, a plan's preview against the fleet as
//! it is, and the candidate's drift per device for the drift gate.

use std::collections::{BTreeMap, HashMap, HashSet};

use drover_protocol::topics::parse_hex32;

use super::driver::RolloutError;
use super::engine::{LiveAccuracy, RolloutState, Status};
use super::plan::{Plan, Selector};
use super::waves::{preview, Preview};
use crate::store::{DeviceRow, Store};

/// Whether the selector picks this device (never a decommissioned one).
pub fn selects(selector: &Selector, d: &DeviceRow) -> bool {
    !d.decommissioned
        && selector.matches(
            &d.labels,
            &[
                ("id", Some(d.id.as_str())),
                ("arch", d.arch.as_deref()),
                ("os", d.os.as_deref()),
                ("agent_version", d.agent_version.as_deref()),
            ],
        )
}

/// `plan` against the fleet as it is now, with the devices open rollouts hold.
pub fn preview_of(plan: &Plan, devices: &[DeviceRow], holders: &BTreeMap<String, u64>) -> Preview {
    let selector = Selector::parse(&plan.selector).unwrap_or_default();
    let matched: Vec<String> = devices
        .iter()
        .filter(|d| selects(&selector, d))
        .map(|d| d.id.clone())
        .collect();
    preview(plan, &matched, holders)
}

/// Open rollouts (running, paused or rolling back) and the devices they hold: a newer
/// rollout leaves those alone until the older one ends, so a device never gets commands
/// from two rollouts that would supersede each other. Completed rollouts hold nothing.
///
/// Rollouts are per model name: a rollout of another model does not hold a device (it
/// lives in its own slot there), so only open rollouts of `model` count.
pub fn holders<'a>(
    open: impl IntoIterator<Item = &'a RolloutState>,
    model: &str,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in open.into_iter().filter(|r| r.candidate.name == model) {
        if matches!(
            r.status,
            Status::Running
                | Status::Paused { .. }
                | Status::RollingBack { .. }
                | Status::Aborting { .. }
        ) {
            for id in r.devices.keys() {
                out.entry(id.clone()).or_insert(r.id);
            }
        }
    }
    out
}

/// Devices an older open rollout holds (see [`holders`]).
pub fn held_by_older(open: &BTreeMap<u64, RolloutState>, id: u64) -> HashSet<String> {
    let Some(model) = open.get(&id).map(|r| r.candidate.name.as_str()) else {
        return HashSet::new();
    };
    holders(open.range(..id).map(|(_, r)| r), model)
        .into_keys()
        .collect()
}

/// Largest PSI per device of the candidate's live inputs (and predictions) against the
/// baseline in its signed manifest, over the drift sketches reported since the rollout
/// started. Empty when the model has no baseline.
pub(super) fn candidate_drift(
    s: &Store,
    digest_hex: &str,
    from_ms: u64,
    to_ms: u64,
) -> Result<HashMap<String, f64>, RolloutError> {
    let Some(digest) = parse_hex32(digest_hex) else {
        return Ok(HashMap::new());
    };
    let Some(model) = s.model_by_digest(&digest)? else {
        return Ok(HashMap::new());
    };
    let manifest = drover_protocol::manifest::Manifest::decode(&model.payload)
        .map_err(|e| RolloutError::Corrupt(format!("manifest of {}: {e}", model.name)))?;
    let Some(baseline) = manifest.baseline else {
        return Ok(HashMap::new());
    };
    let sketches: Vec<_> = s
        .drift_sketches(from_ms, to_ms.saturating_add(1))?
        .into_iter()
        .filter(|k| k.model_digest == digest)
        .map(crate::drift::SketchRow::from)
        .collect();
    let baselines = BTreeMap::from([(digest, baseline)]);
    let scores = crate::drift::score_window(
        &baselines,
        &sketches,
        &[],
        (from_ms, to_ms),
        &crate::drift::Thresholds::default(),
    );
    let mut out: HashMap<String, f64> = HashMap::new();
    for sc in scores {
        let (Some(device), Some(psi)) = (sc.scope.strip_prefix("device:"), sc.psi) else {
            continue;
        };
        let e = out.entry(device.to_owned()).or_insert(psi);
        *e = e.max(psi);
    }
    Ok(out)
}

/// Labelled predictions since `from_ms` for the live-accuracy gate: the candidate's
/// (`digest`, hex), and the control group's: every other version of model `name`.
pub(super) fn live_accuracy(
    s: &Store,
    name: &str,
    digest: &str,
    from_ms: u64,
    to_ms: u64,
) -> Result<LiveAccuracy, RolloutError> {
    let versions: HashSet<[u8; 32]> = s
        .models()?
        .into_iter()
        .filter(|m| m.name == name)
        .map(|m| m.digest)
        .collect();
    let mut out = LiveAccuracy::default();
    for p in s.labeled_predictions(from_ms, to_ms.saturating_add(1))? {
        if !versions.contains(&p.model_digest) {
            continue;
        }
        let (Some(pred), Some(label)) = (
            crate::drift::accuracy::predicted_class(&p.prediction),
            crate::drift::accuracy::label_class(p.label),
        ) else {
            continue;
        };
        let side = if drover_protocol::topics::hex32(&p.model_digest) == digest {
            &mut out.candidate
        } else {
            &mut out.control
        };
        side.0 += u64::from(pred == label);
        side.1 += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::engine::{Candidate, DevState, Slot};
    use crate::rollout::plan::Plan;

    fn rollout(id: u64, status: Status, devices: &[&str]) -> RolloutState {
        let plan =
            Plan::from_toml("model = \"m@1.0.0\"\nselector = \"all\"\n[[waves]]\npercent = 100\n")
                .unwrap();
        let mut r = RolloutState::new(
            id,
            plan,
            Candidate {
                name: "m".into(),
                version: "1.0.0".into(),
                digest: "d".into(),
            },
            0,
        );
        r.status = status;
        for d in devices {
            r.devices.insert(
                (*d).to_owned(),
                Slot {
                    wave: 0,
                    state: DevState::Healthy,
                    assigned_at_ms: 0,
                    commanded_at_ms: Some(0),
                    command_seq: Some(1),
                    previous: None,
                    detail: None,
                },
            );
        }
        r
    }

    #[test]
    fn an_older_active_rollout_holds_its_devices() {
        let mut open = BTreeMap::new();
        open.insert(1, rollout(1, Status::Running, &["a", "b"]));
        open.insert(2, rollout(2, Status::Paused { reason: "x".into() }, &["c"]));
        open.insert(3, rollout(3, Status::Completed, &["d"]));
        open.insert(4, rollout(4, Status::Running, &["e"]));
        let held = held_by_older(&open, 4);
        let mut v: Vec<String> = held.into_iter().collect();
        v.sort_unstable();
        assert_eq!(v, vec!["a", "b", "c"], "completed rollouts release devices");
        assert!(
            held_by_older(&open, 1).is_empty(),
            "the oldest is never held"
        );
    }
}
