//! The stored form of a rollout: the JSON the store keeps in `rollouts.header`,
//! `rollout_devices.slot` and `rollout_events.event`, apart from the engine's types.
//!
//! Why a copy of the engine's shapes: the engine's types change with its logic, but an
//! existing `drover.db` must keep loading, so the stored layout is written down here once
//! and converted at the edge. Renaming an engine field no longer changes the schema;
//! changing a record type here does, and `stored_json_is_stable` fails when it happens.
//!
//! The plan is stored as the operator's own document ([`Plan`], TOML or JSON), which is
//! a file format with its own stability promise.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::engine::{
    Candidate, DevState, Event, GateValue, RolloutState, Slot, Stage, Status, Verdict,
};
use super::plan::Plan;

/// Why a stored record does not load.
#[derive(Debug, thiserror::Error)]
#[error("stored rollout record does not parse: {0}")]
pub struct RecordError(String);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CandidateRecord {
    name: String,
    version: String,
    digest: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
enum StatusRecord {
    Running,
    Paused { reason: String },
    Completed,
    RollingBack { reason: String },
    RolledBack { reason: String },
    Aborting { reason: String },
    Aborted { reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum StageRecord {
    Shadow,
    Install,
    Bake,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum DevStateRecord {
    Queued,
    Deploying,
    Shadowing,
    Promoting,
    Active,
    Healthy,
    Failed,
    RollingBack,
    RolledBack,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SlotRecord {
    wave: usize,
    state: DevStateRecord,
    assigned_at_ms: u64,
    commanded_at_ms: Option<u64>,
    command_seq: Option<u64>,
    previous: Option<String>,
    detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum VerdictRecord {
    Pass,
    Fail,
    NoData,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct GateRecord {
    gate: String,
    value: Option<f64>,
    threshold: String,
    verdict: VerdictRecord,
    basis: String,
    /// Added with three-valued gates; older records have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EventRecord {
    at_ms: u64,
    kind: String,
    detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gates: Vec<GateRecord>,
}

/// The header: everything but the per-device slots (stored one row per device, so a
/// step writes only the slots it changed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct HeaderRecord {
    id: u64,
    plan: Plan,
    candidate: CandidateRecord,
    status: StatusRecord,
    wave: usize,
    stage: StageRecord,
    stage_since_ms: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
    /// Always empty in the header; kept so older rows (which carried it) still load.
    #[serde(default)]
    devices: BTreeMap<String, SlotRecord>,
    gates: Vec<GateRecord>,
    #[serde(default)]
    selected: u64,
    /// Added with holding stages; older rows have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waiting: Option<String>,
}

fn to_json(v: &impl Serialize) -> String {
    // Serializing plain structs of strings and numbers to a String cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T, RecordError> {
    serde_json::from_str(s).map_err(|e| RecordError(e.to_string()))
}

/// The stored header of a rollout (its slots are stored apart, see [`slot`]).
pub fn header(s: &RolloutState) -> String {
    to_json(&HeaderRecord {
        id: s.id,
        plan: s.plan.clone(),
        candidate: CandidateRecord {
            name: s.candidate.name.clone(),
            version: s.candidate.version.clone(),
            digest: s.candidate.digest.clone(),
        },
        status: status_record(&s.status),
        wave: s.wave,
        stage: match s.stage {
            Stage::Shadow => StageRecord::Shadow,
            Stage::Install => StageRecord::Install,
            Stage::Bake => StageRecord::Bake,
        },
        stage_since_ms: s.stage_since_ms,
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        devices: BTreeMap::new(),
        gates: s.gates.iter().map(gate_record).collect(),
        selected: s.selected,
        waiting: s.waiting.clone(),
    })
}

/// A rollout from its stored header and slots.
pub fn load(
    header: &str,
    slots: impl IntoIterator<Item = (String, String)>,
) -> Result<RolloutState, RecordError> {
    let h: HeaderRecord = from_json(header)?;
    let mut devices: BTreeMap<String, Slot> = h
        .devices
        .into_iter()
        .map(|(id, s)| (id, slot_of(s)))
        .collect();
    for (id, s) in slots {
        devices.insert(id, slot_of(from_json(&s)?));
    }
    Ok(RolloutState {
        id: h.id,
        plan: h.plan,
        candidate: Candidate {
            name: h.candidate.name,
            version: h.candidate.version,
            digest: h.candidate.digest,
        },
        status: match h.status {
            StatusRecord::Running => Status::Running,
            StatusRecord::Paused { reason } => Status::Paused { reason },
            StatusRecord::Completed => Status::Completed,
            StatusRecord::RollingBack { reason } => Status::RollingBack { reason },
            StatusRecord::RolledBack { reason } => Status::RolledBack { reason },
            StatusRecord::Aborting { reason } => Status::Aborting { reason },
            StatusRecord::Aborted { reason } => Status::Aborted { reason },
        },
        wave: h.wave,
        stage: match h.stage {
            StageRecord::Shadow => Stage::Shadow,
            StageRecord::Install => Stage::Install,
            StageRecord::Bake => Stage::Bake,
        },
        stage_since_ms: h.stage_since_ms,
        created_at_ms: h.created_at_ms,
        updated_at_ms: h.updated_at_ms,
        devices,
        gates: h.gates.into_iter().map(gate_of).collect(),
        selected: h.selected,
        waiting: h.waiting,
    })
}

/// A rollout's header without its slots (listings).
pub fn load_header(header: &str) -> Result<RolloutState, RecordError> {
    load(header, std::iter::empty())
}

/// The stored form of one device's slot.
pub fn slot(s: &Slot) -> String {
    to_json(&SlotRecord {
        wave: s.wave,
        state: dev_state_record(s.state),
        assigned_at_ms: s.assigned_at_ms,
        commanded_at_ms: s.commanded_at_ms,
        command_seq: s.command_seq,
        previous: s.previous.clone(),
        detail: s.detail.clone(),
    })
}

/// The stored form of a report event.
pub fn event(e: &Event) -> String {
    to_json(&EventRecord {
        at_ms: e.at_ms,
        kind: e.kind.clone(),
        detail: e.detail.clone(),
        gates: e.gates.iter().map(gate_record).collect(),
    })
}

/// A report event from its stored form.
pub fn load_event(s: &str) -> Result<Event, RecordError> {
    let e: EventRecord = from_json(s)?;
    Ok(Event {
        at_ms: e.at_ms,
        kind: e.kind,
        detail: e.detail,
        gates: e.gates.into_iter().map(gate_of).collect(),
    })
}

fn status_record(s: &Status) -> StatusRecord {
    match s.clone() {
        Status::Running => StatusRecord::Running,
        Status::Paused { reason } => StatusRecord::Paused { reason },
        Status::Completed => StatusRecord::Completed,
        Status::RollingBack { reason } => StatusRecord::RollingBack { reason },
        Status::RolledBack { reason } => StatusRecord::RolledBack { reason },
        Status::Aborting { reason } => StatusRecord::Aborting { reason },
        Status::Aborted { reason } => StatusRecord::Aborted { reason },
    }
}

fn dev_state_record(s: DevState) -> DevStateRecord {
    match s {
        DevState::Queued => DevStateRecord::Queued,
        DevState::Deploying => DevStateRecord::Deploying,
        DevState::Shadowing => DevStateRecord::Shadowing,
        DevState::Promoting => DevStateRecord::Promoting,
        DevState::Active => DevStateRecord::Active,
        DevState::Healthy => DevStateRecord::Healthy,
        DevState::Failed => DevStateRecord::Failed,
        DevState::RollingBack => DevStateRecord::RollingBack,
        DevState::RolledBack => DevStateRecord::RolledBack,
    }
}

fn slot_of(r: SlotRecord) -> Slot {
    Slot {
        wave: r.wave,
        state: match r.state {
            DevStateRecord::Queued => DevState::Queued,
            DevStateRecord::Deploying => DevState::Deploying,
            DevStateRecord::Shadowing => DevState::Shadowing,
            DevStateRecord::Promoting => DevState::Promoting,
            DevStateRecord::Active => DevState::Active,
            DevStateRecord::Healthy => DevState::Healthy,
            DevStateRecord::Failed => DevState::Failed,
            DevStateRecord::RollingBack => DevState::RollingBack,
            DevStateRecord::RolledBack => DevState::RolledBack,
        },
        assigned_at_ms: r.assigned_at_ms,
        commanded_at_ms: r.commanded_at_ms,
        command_seq: r.command_seq,
        previous: r.previous,
        detail: r.detail,
    }
}

fn gate_record(g: &GateValue) -> GateRecord {
    GateRecord {
        gate: g.gate.clone(),
        value: g.value,
        threshold: g.threshold.clone(),
        verdict: match g.verdict {
            Verdict::Pass => VerdictRecord::Pass,
            Verdict::Fail => VerdictRecord::Fail,
            Verdict::NoData => VerdictRecord::NoData,
        },
        basis: g.basis.clone(),
        reason: g.reason.clone(),
    }
}

fn gate_of(r: GateRecord) -> GateValue {
    GateValue {
        gate: r.gate,
        value: r.value,
        threshold: r.threshold,
        verdict: match r.verdict {
            VerdictRecord::Pass => Verdict::Pass,
            VerdictRecord::Fail => Verdict::Fail,
            VerdictRecord::NoData => Verdict::NoData,
        },
        basis: r.basis,
        reason: r.reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RolloutState {
        let plan =
            Plan::from_toml("model = \"m@1.0.0\"\nselector = \"all\"\n[[waves]]\npercent = 100\n")
                .unwrap();
        let mut s = RolloutState::new(
            7,
            plan,
            Candidate {
                name: "m".into(),
                version: "1.0.0".into(),
                digest: "ab".into(),
            },
            1_000,
        );
        s.status = Status::Paused {
            reason: "error rate".into(),
        };
        s.gates.push(GateValue {
            gate: "error_rate".into(),
            value: Some(0.5),
            threshold: "<= 0.02".into(),
            verdict: Verdict::Fail,
            basis: "10 inferences on 1 device".into(),
            reason: None,
        });
        s.gates.push(GateValue {
            gate: "p99_latency_ratio".into(),
            value: None,
            threshold: "<= 2".into(),
            verdict: Verdict::NoData,
            basis: "10 of 10 latencies".into(),
            reason: Some("needs 100 latencies on the candidate, has 10".into()),
        });
        s.devices.insert(
            "gw-1".into(),
            Slot {
                wave: 0,
                state: DevState::RollingBack,
                assigned_at_ms: 1_000,
                commanded_at_ms: Some(1_001),
                command_seq: Some(3),
                previous: Some("cd".into()),
                detail: None,
            },
        );
        s
    }

    #[test]
    fn a_rollout_survives_its_stored_form() {
        let s = state();
        let slots: Vec<(String, String)> = s
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), slot(d)))
            .collect();
        assert_eq!(load(&header(&s), slots).unwrap(), s);
        let e = Event {
            at_ms: 5,
            kind: "paused".into(),
            detail: "gate failed".into(),
            gates: s.gates.clone(),
        };
        assert_eq!(load_event(&event(&e)).unwrap(), e);
    }

    /// The layout existing databases hold. A change here is a schema change: it needs a
    /// migration, not an edit of this test.
    #[test]
    fn stored_json_is_stable() {
        let s = state();
        let slot_json = slot(&s.devices["gw-1"]);
        assert_eq!(
            slot_json,
            r#"{"wave":0,"state":"rolling-back","assigned_at_ms":1000,"commanded_at_ms":1001,"command_seq":3,"previous":"cd","detail":null}"#
        );
        let h: serde_json::Value = serde_json::from_str(&header(&s)).unwrap();
        assert_eq!(
            h["status"],
            serde_json::json!({"state": "paused", "reason": "error rate"})
        );
        assert_eq!(h["stage"], "install");
        let mut aborted = s.clone();
        aborted.status = Status::Aborted {
            reason: "aborted by op".into(),
        };
        let a: serde_json::Value = serde_json::from_str(&header(&aborted)).unwrap();
        assert_eq!(
            a["status"],
            serde_json::json!({"state": "aborted", "reason": "aborted by op"})
        );
        assert_eq!(
            load_header(&header(&aborted)).unwrap().status,
            aborted.status
        );
        assert_eq!(h["gates"][0]["verdict"], "fail");
        assert!(h["gates"][0].get("reason").is_none());
        assert_eq!(h["gates"][1]["verdict"], "no-data");
        assert_eq!(
            h["gates"][1]["reason"],
            "needs 100 latencies on the candidate, has 10"
        );
        assert_eq!(h["candidate"]["digest"], "ab");
        let e = event(&Event {
            at_ms: 5,
            kind: "started".into(),
            detail: "d".into(),
            gates: vec![],
        });
        assert_eq!(e, r#"{"at_ms":5,"kind":"started","detail":"d"}"#);
    }

    /// A header written before three-valued gates and `on_no_data` (no `reason`, the
    /// plan's `require_data = false`) still loads, and keeps passing gates without data.
    #[test]
    fn a_record_from_before_honest_gates_still_loads() {
        let old = r#"{"id":3,"plan":{"model":"m@1.0.0","selector":"","waves":[{"percent":100.0,"bake":"1m"}],"max_concurrent":100,"device_deadline":"1h","on_failure":"pause","gates":{"min_install_success":0.95,"max_error_rate":0.02,"max_p99_latency_ratio":2.0,"max_drift_psi":null,"min_inferences":20,"require_data":false}},"candidate":{"name":"m","version":"1.0.0","digest":"ab"},"status":{"state":"running"},"wave":0,"stage":"bake","stage_since_ms":1,"created_at_ms":1,"updated_at_ms":1,"gates":[{"gate":"error_rate","value":null,"threshold":"<= 0.02","verdict":"no-data","basis":"0 errors in 0 inferences on 1 devices"}],"selected":1}"#;
        let s = load_header(old).unwrap();
        assert_eq!(s.gates[0].verdict, Verdict::NoData);
        assert_eq!(s.gates[0].reason, None);
        assert_eq!(
            s.plan.gates.no_data_policy(),
            crate::rollout::OnNoData::Pass,
            "a stored rollout keeps the behaviour it started with"
        );
        assert_eq!(s.waiting, None);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        assert!(load("{", std::iter::empty()).is_err());
        assert!(load_header(r#"{"id":1}"#).is_err());
        assert!(load_event("[]").is_err());
    }
}
