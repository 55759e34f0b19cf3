//! Every engine transition, with the clock passed in.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_protocol::messages::{LatencyHistogram, Phase};

use super::engine::*;
use super::plan::*;

pub(super) const OLD: &str = "old-digest";
pub(super) const NEW: &str = "new-digest";
pub(super) const S: u64 = 1000;

pub(super) fn plan(waves: &[(f64, u64)]) -> Plan {
    Plan {
        model: "m@2.0.0".into(),
        selector: String::new(),
        waves: waves
            .iter()
            .map(|&(p, bake_s)| Wave {
                percent: Some(p),
                count: None,
                bake: Duration::from_secs(bake_s),
            })
            .collect(),
        max_concurrent: 0,
        deploys_per_second: 0.0,
        device_deadline: Duration::from_secs(600),
        on_failure: OnFailure::Pause,
        gates: Gates {
            min_inferences: 10,
            ..Gates::default()
        },
        shadow: None,
        late_joiners: false,
        windows: Vec::new(),
    }
}

pub(super) fn candidate() -> Candidate {
    Candidate {
        name: "m".into(),
        version: "2.0.0".into(),
        digest: NEW.into(),
    }
}

pub(super) fn hist(us: u64, n: u64) -> LatencyHistogram {
    let mut h = LatencyHistogram::new();
    for _ in 0..n {
        h.record(us);
    }
    h
}

/// A fleet of `n` online devices running the old model.
pub(super) struct Fleet {
    pub(super) obs: Observations,
}

impl Fleet {
    pub(super) fn new(n: usize) -> Self {
        let mut obs = Observations::default();
        for i in 0..n {
            let id = format!("dev-{i:03}");
            obs.selected.push(id.clone());
            obs.devices.insert(
                id,
                DeviceObs {
                    online: true,
                    active: Some(OLD.into()),
                    baseline: Health {
                        inferences: 100,
                        errors: 0,
                        latency: hist(100, 100),
                    },
                    ..DeviceObs::default()
                },
            );
        }
        Fleet { obs }
    }

    pub(super) fn dev(&mut self, id: &str) -> &mut DeviceObs {
        self.obs.devices.get_mut(id).unwrap()
    }

    /// Every device commanded in `s` reports `phase` (and, if healthy, serves well).
    pub(super) fn report_all(&mut self, s: &RolloutState, from: DevState, phase: Phase) {
        for (id, slot) in &s.devices {
            if slot.state == from {
                let o = self.dev(id);
                o.progress = Some((phase, None));
                if phase == Phase::Healthy {
                    o.active = Some(NEW.into());
                    o.candidate = Health {
                        inferences: 100,
                        errors: 0,
                        latency: hist(100, 100),
                    };
                }
            }
        }
    }
}

pub(super) fn ids_in(actions: &[Action]) -> Vec<String> {
    actions.iter().map(|a| a.device().to_owned()).collect()
}

pub(super) fn count(s: &RolloutState, st: DevState) -> usize {
    s.devices.values().filter(|d| d.state == st).count()
}

/// The driver fills in each command's sequence; tests do the same.
pub(super) fn issue(mut step: Step) -> Step {
    for (n, a) in step.actions.iter().enumerate() {
        if let Some(slot) = step.state.devices.get_mut(a.device()) {
            slot.command_seq = Some(100 + n as u64);
        }
    }
    step
}

#[test]
fn canary_wave_is_the_lowest_buckets_and_other_devices_are_untouched() {
    let f = Fleet::new(50);
    let s = RolloutState::new(1, plan(&[(10.0, 60), (100.0, 60)]), candidate(), 0);
    let st = issue(step(&s, &f.obs, 0));
    assert_eq!(st.actions.len(), 5, "10 % of 50");
    let mut by_bucket: Vec<(u32, String)> = f
        .obs
        .selected
        .iter()
        .map(|id| (bucket(id), id.clone()))
        .collect();
    by_bucket.sort();
    let expect: Vec<String> = by_bucket.iter().take(5).map(|(_, id)| id.clone()).collect();
    let mut got = ids_in(&st.actions);
    got.sort();
    let mut expect_sorted = expect.clone();
    expect_sorted.sort();
    assert_eq!(got, expect_sorted);
    assert!(st
        .actions
        .iter()
        .all(|a| matches!(a, Action::Deploy { shadow: false, .. })));
    assert_eq!(st.state.devices.len(), 5);
    // The same inputs give the same canary: deterministic.
    let again = step(&s, &f.obs, 0);
    assert_eq!(ids_in(&again.actions).len(), 5);
    // A second step with no news sends nothing twice.
    let idle = step(&st.state, &f.obs, S);
    assert!(idle.actions.is_empty(), "{:?}", idle.actions);
}

#[test]
fn waves_advance_only_after_install_and_bake_then_complete() {
    let mut f = Fleet::new(20);
    let s0 = RolloutState::new(1, plan(&[(10.0, 60), (100.0, 30)]), candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    assert_eq!(s1.stage, Stage::Install);
    // Half-way: active (probation) is not finished.
    f.report_all(&s1, DevState::Deploying, Phase::Active);
    let s2 = step(&s1, &f.obs, 5 * S).state;
    assert_eq!(count(&s2, DevState::Active), 2);
    assert_eq!(s2.stage, Stage::Install);
    f.report_all(&s2, DevState::Active, Phase::Healthy);
    let s3 = step(&s2, &f.obs, 10 * S);
    assert_eq!(s3.state.stage, Stage::Bake);
    assert_eq!(s3.state.stage_since_ms, 10 * S);
    // Bake not over: stays in wave 1.
    let s4 = step(&s3.state, &f.obs, 69 * S);
    assert_eq!((s4.state.wave, s4.state.stage), (0, Stage::Bake));
    assert!(s4.actions.is_empty());
    // Bake over, gates pass: wave 2 starts and its devices are commanded.
    let s5 = step(&s4.state, &f.obs, 70 * S);
    assert_eq!(s5.state.wave, 1);
    assert!(s5
        .events
        .iter()
        .any(|e| e.kind == "advanced" && !e.gates.is_empty()));
    let s6 = issue(step(&s5.state, &f.obs, 71 * S));
    assert_eq!(s6.actions.len(), 18, "the remaining 18 devices");
    f.report_all(&s6.state, DevState::Deploying, Phase::Healthy);
    let s7 = step(&s6.state, &f.obs, 72 * S).state;
    assert_eq!(s7.stage, Stage::Bake);
    let s8 = step(&s7, &f.obs, 102 * S);
    assert_eq!(s8.state.status, Status::Completed);
    assert_eq!(count(&s8.state, DevState::Healthy), 20);
}

#[test]
fn error_rate_over_the_gate_pauses_the_canary_and_nobody_else_gets_it() {
    let mut f = Fleet::new(40);
    let s0 = RolloutState::new(1, plan(&[(5.0, 60), (100.0, 60)]), candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    for (id, slot) in &s1.devices {
        if slot.state == DevState::Deploying {
            f.dev(id).candidate.errors = 30; // 30 % errors
        }
    }
    let s2 = step(&s1, &f.obs, 5 * S);
    assert!(matches!(&s2.state.status, Status::Paused { reason } if reason.contains("error_rate")));
    assert!(s2.actions.is_empty());
    let ev = s2.events.iter().find(|e| e.kind == "paused").unwrap();
    let g = ev.gates.iter().find(|g| g.gate == "error_rate").unwrap();
    assert_eq!(g.verdict, Verdict::Fail);
    assert!((g.value.unwrap() - 0.3).abs() < 1e-9);
    // Paused: time passes, nothing more is assigned or sent.
    let s3 = step(&s2.state, &f.obs, 1000 * S);
    assert!(s3.actions.is_empty());
    assert_eq!(s3.state.devices.len(), 2);
}

#[test]
fn a_failing_gate_with_rollback_returns_only_commanded_devices_to_their_previous_model() {
    let mut f = Fleet::new(40);
    let mut p = plan(&[(5.0, 60), (100.0, 60)]);
    p.on_failure = OnFailure::Rollback;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    for (id, slot) in &s1.devices {
        if slot.state == DevState::Deploying {
            f.dev(id).candidate.latency = hist(5_000, 100); // 100 us -> 5 ms
        }
    }
    let s2 = issue(step(&s1, &f.obs, 5 * S));
    assert!(
        matches!(&s2.state.status, Status::RollingBack { reason } if reason.contains("p99_latency_ratio")),
        "{:?}",
        s2.state.status
    );
    assert_eq!(s2.actions.len(), 2);
    for a in &s2.actions {
        assert_eq!(
            a,
            &Action::Rollback {
                device: a.device().into(),
                to: Some(OLD.into())
            }
        );
    }
    // Devices confirm; the rollout ends rolled back.
    for id in ids_in(&s2.actions) {
        f.dev(&id).progress = Some((Phase::Done, None));
    }
    let s3 = step(&s2.state, &f.obs, 6 * S);
    assert!(matches!(s3.state.status, Status::RolledBack { .. }));
    assert_eq!(count(&s3.state, DevState::RolledBack), 2);
    assert!(s3.events.iter().any(|e| e.kind == "rolled-back"));
}

#[test]
fn install_failures_beyond_the_budget_fail_the_gate_at_once() {
    let mut f = Fleet::new(20);
    let mut p = plan(&[(50.0, 60)]);
    p.gates.min_install_success = Some(0.8); // 2 of 10 may fail
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    let ids: Vec<String> = s1.devices.keys().cloned().collect();
    for id in &ids[..2] {
        f.dev(id).progress = Some((Phase::Failed, Some("self-test failed".into())));
    }
    let s2 = step(&s1, &f.obs, S);
    assert_eq!(
        s2.state.status,
        Status::Running,
        "2 failures are within budget"
    );
    assert_eq!(
        s2.events
            .iter()
            .filter(|e| e.kind == "device-failed")
            .count(),
        2
    );
    f.dev(&ids[2]).progress = Some((Phase::RolledBack, Some("probation".into())));
    let s3 = step(&s2.state, &f.obs, 2 * S);
    assert!(
        matches!(&s3.state.status, Status::Paused { reason } if reason.contains("install_success")),
        "{:?}",
        s3.state.status
    );
}

#[test]
fn offline_devices_are_counted_apart_and_picked_up_when_they_return() {
    let mut f = Fleet::new(10);
    let s0 = RolloutState::new(1, plan(&[(100.0, 10)]), candidate(), 0);
    // Two devices are offline when the wave starts.
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    let ids: Vec<String> = s1.devices.keys().cloned().collect();
    f.dev(&ids[0]).online = false;
    f.dev(&ids[1]).online = false;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    f.dev(&ids[0]).progress = None;
    f.dev(&ids[1]).progress = None;
    f.dev(&ids[0]).active = Some(OLD.into());
    f.dev(&ids[1]).active = Some(OLD.into());
    // The wave does not wait for them, and they are not failures.
    let s2 = step(&s1, &f.obs, S).state;
    assert_eq!(s2.stage, Stage::Bake);
    assert_eq!(count(&s2, DevState::Deploying), 2);
    // Past the deadline while offline: still not failed.
    let s3 = step(&s2, &f.obs, 700 * S).state;
    assert_eq!(s3.status, Status::Completed);
    assert_eq!(count(&s3, DevState::Failed), 0);
    assert_eq!(count(&s3, DevState::Deploying), 2);
    // One returns and installs (its pending command is delivered at hello).
    f.dev(&ids[0]).online = true;
    f.dev(&ids[0]).progress = Some((Phase::Healthy, None));
    let s4 = step(&s3, &f.obs, 800 * S).state;
    assert_eq!(s4.devices[&ids[0]].state, DevState::Healthy);
    // An online device stuck past the deadline is a failure.
    f.dev(&ids[1]).online = true;
    f.dev(&ids[1]).progress = Some((Phase::Downloading, None));
    let s5 = step(&s4, &f.obs, 900 * S).state;
    assert_eq!(s5.devices[&ids[1]].state, DevState::Failed);
    assert!(s5.devices[&ids[1]]
        .detail
        .as_deref()
        .unwrap()
        .contains("deadline"));
}

#[test]
fn concurrency_limit_holds_back_online_devices_only() {
    let mut f = Fleet::new(10);
    let mut p = plan(&[(100.0, 0)]);
    p.max_concurrent = 3;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let offline = f.obs.selected[0].clone();
    f.dev(&offline).online = false;
    let s1 = issue(step(&s0, &f.obs, 0));
    // 3 online downloads, plus the offline device's command (delivered when it returns).
    assert_eq!(s1.actions.len(), 4);
    assert!(ids_in(&s1.actions).contains(&offline));
    assert_eq!(count(&s1.state, DevState::Queued), 6);
    f.report_all(&s1.state, DevState::Deploying, Phase::Healthy);
    f.dev(&offline).progress = None;
    let s2 = issue(step(&s1.state, &f.obs, S));
    assert_eq!(s2.actions.len(), 3, "3 more as slots free up");
}

#[test]
fn a_wave_s_deploys_go_out_at_the_plan_s_rate_from_its_first_command() {
    let mut f = Fleet::new(20);
    let mut p = plan(&[(50.0, 0), (100.0, 0)]);
    p.deploys_per_second = 2.0;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    // One second's worth at the wave's first command, then 2 per second since it.
    let s1 = issue(step(&s0, &f.obs, 10 * S));
    assert_eq!(s1.actions.len(), 2);
    let s2 = issue(step(&s1.state, &f.obs, 10 * S + 400));
    assert_eq!(s2.actions.len(), 0, "not a whole command due yet");
    let s3 = issue(step(&s2.state, &f.obs, 12 * S + 500));
    assert_eq!(s3.actions.len(), 5, "2 + 2 x 2.5 s = 7 by now");
    let s4 = issue(step(&s3.state, &f.obs, 60 * S));
    assert_eq!(s4.actions.len(), 3, "the wave's 10 devices, no more");
    // The next wave starts its own count: one second's worth at its first command.
    f.report_all(&s4.state, DevState::Deploying, Phase::Healthy);
    let mut s = s4.state;
    let mut t = 60 * S;
    let mut first_of_wave_2 = 0;
    while first_of_wave_2 == 0 && t < 200 * S {
        t += S;
        let st = issue(step(&s, &f.obs, t));
        if st.state.wave == 1 {
            first_of_wave_2 = st.actions.len();
        }
        s = st.state;
    }
    assert_eq!(first_of_wave_2, 2);
}

#[test]
fn a_negative_or_non_finite_deploy_rate_is_refused_with_what_to_give() {
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let mut p = plan(&[(100.0, 0)]);
        p.selector = "all".into();
        p.deploys_per_second = bad;
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("deploys_per_second") && e.contains("0 or more"),
            "{e}"
        );
    }
    let p = Plan::from_toml(
        "model = \"m@1.0.0\"\nselector = \"all\"\ndeploys_per_second = 50\n[[waves]]\npercent = 100\n",
    )
    .unwrap();
    assert_eq!(p.deploys_per_second, 50.0);
}

#[test]
fn shadow_phase_promotes_on_agreement_and_pauses_on_disagreement() {
    for agree in [true, false] {
        let mut f = Fleet::new(10);
        let mut p = plan(&[(20.0, 10), (100.0, 10)]);
        p.shadow = Some(ShadowPhase {
            duration: Duration::from_secs(30),
            min_compared: 50,
            min_agreement: 0.9,
            max_latency_ratio: Some(2.0),
            waves: 0,
        });
        let s0 = RolloutState::new(1, p, candidate(), 0);
        let s1 = issue(step(&s0, &f.obs, 0));
        assert_eq!(s1.state.stage, Stage::Shadow);
        assert!(s1
            .actions
            .iter()
            .all(|a| matches!(a, Action::Deploy { shadow: true, .. })));
        f.report_all(&s1.state, DevState::Deploying, Phase::Shadowing);
        for id in s1.state.devices.keys() {
            // 2 × 60 compared: the shadow p99 gate needs 100 for a verdict.
            f.dev(id).shadow = ShadowObs {
                compared: 60,
                agreed: if agree { 58 } else { 30 },
                active_latency: hist(100, 60),
                candidate_latency: hist(150, 60),
            };
        }
        let s2 = step(&s1.state, &f.obs, 10 * S);
        if !agree {
            assert!(
                matches!(&s2.state.status, Status::Paused { reason } if reason.contains("shadow_agreement"))
            );
            continue;
        }
        assert!(s2.actions.is_empty(), "shadow duration not over");
        assert_eq!(count(&s2.state, DevState::Shadowing), 2);
        let s3 = issue(step(&s2.state, &f.obs, 30 * S));
        assert_eq!(s3.actions.len(), 2);
        assert!(s3
            .actions
            .iter()
            .all(|a| matches!(a, Action::Promote { .. })));
        assert_eq!(s3.state.stage, Stage::Install);
        f.report_all(&s3.state, DevState::Promoting, Phase::Healthy);
        let s4 = step(&s3.state, &f.obs, 31 * S);
        assert_eq!(count(&s4.state, DevState::Healthy), 2);
        assert_eq!(s4.state.stage, Stage::Bake);
    }
}

#[test]
fn a_late_shadowing_device_is_promoted_after_its_wave_moved_on() {
    let mut f = Fleet::new(4);
    let mut p = plan(&[(50.0, 0), (100.0, 0)]);
    p.shadow = Some(ShadowPhase {
        duration: Duration::ZERO,
        min_compared: 1,
        min_agreement: 0.5,
        max_latency_ratio: None,
        waves: 0,
    });
    let mut s = RolloutState::new(1, p, candidate(), 0);
    s.wave = 1;
    s.stage = Stage::Install;
    s.devices.insert(
        "dev-000".into(),
        Slot {
            wave: 0,
            state: DevState::Deploying,
            assigned_at_ms: 0,
            commanded_at_ms: Some(0),
            command_seq: Some(7),
            previous: Some(OLD.into()),
            detail: None,
        },
    );
    f.dev("dev-000").progress = Some((Phase::Shadowing, None));
    let st = step(&s, &f.obs, S);
    assert!(st.actions.contains(&Action::Promote {
        device: "dev-000".into()
    }));
}

#[test]
fn a_lost_progress_report_is_recovered_from_the_reported_active_model() {
    let mut f = Fleet::new(1);
    let s0 = RolloutState::new(1, plan(&[(100.0, 0)]), candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.dev("dev-000").active = Some(NEW.into());
    let s2 = step(&s1, &f.obs, S).state;
    assert_eq!(s2.devices["dev-000"].state, DevState::Active);
}

#[test]
fn a_stored_require_data_true_holds_the_wave_until_gates_have_data() {
    let mut f = Fleet::new(10);
    let mut p = plan(&[(100.0, 10)]);
    p.gates.require_data = Some(true);
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    for id in s1.devices.keys() {
        f.dev(id).candidate = Health::default();
    }
    let s2 = step(&s1, &f.obs, S).state;
    assert_eq!(s2.stage, Stage::Bake);
    let s3 = step(&s2, &f.obs, 100 * S).state;
    assert_eq!(s3.status, Status::Running, "no inference data yet");
    for id in s1.devices.keys() {
        f.dev(id).candidate = Health {
            inferences: 50,
            errors: 0,
            latency: hist(100, 50),
        };
    }
    let s4 = step(&s3, &f.obs, 101 * S).state;
    assert_eq!(s4.status, Status::Completed);
}

#[test]
fn operators_pause_resume_and_abort_with_checks() {
    let mut f = Fleet::new(10);
    let s0 = RolloutState::new(1, plan(&[(100.0, 10)]), candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    let s1 = step(&s1, &f.obs, S).state;
    let paused = operate(&s1, Op::Pause, "alice", 2 * S).unwrap();
    assert!(matches!(&paused.state.status, Status::Paused { reason } if reason.contains("alice")));
    assert!(operate(&paused.state, Op::Pause, "alice", 2 * S).is_err());
    let resumed = operate(&paused.state, Op::Resume, "alice", 3 * S).unwrap();
    assert_eq!(resumed.state.status, Status::Running);
    let aborted = operate(&resumed.state, Op::Abort, "bob", 4 * S).unwrap();
    assert!(matches!(&aborted.state.status, Status::Aborting { reason } if reason.contains("bob")));
    assert_eq!(aborted.actions.len(), 10);
    assert!(operate(&aborted.state, Op::Resume, "bob", 5 * S).is_err());
    let e = operate(&aborted.state, Op::Abort, "bob", 5 * S).unwrap_err();
    assert!(e.to_string().contains("aborting"), "{e}");
}

#[test]
fn rollback_skips_devices_without_a_previous_model_and_never_commanded_ones() {
    let mut f = Fleet::new(4);
    f.dev("dev-000").active = None;
    let mut p = plan(&[(100.0, 10)]);
    p.max_concurrent = 1;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    let queued = count(&s1, DevState::Queued);
    assert_eq!(queued, 3);
    let ab = operate(&s1, Op::Abort, "op", S).unwrap();
    assert!(ab.actions.len() <= 1);
    let none_prev = &ab.state.devices["dev-000"];
    assert!(matches!(
        none_prev.state,
        DevState::Failed | DevState::RolledBack
    ));
    assert_eq!(count(&ab.state, DevState::Queued), 0);
}

#[test]
fn devices_that_stop_matching_keep_their_slot_and_new_matches_join_the_current_wave() {
    let mut f = Fleet::new(10);
    let s0 = RolloutState::new(1, plan(&[(50.0, 0), (100.0, 0)]), candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    assert_eq!(s1.devices.len(), 5);
    let gone = s1.devices.keys().next().unwrap().clone();
    f.obs.selected.retain(|d| d != &gone);
    let s2 = step(&s1, &f.obs, S).state;
    assert!(s2.devices.contains_key(&gone));
    let _ = BTreeMap::<u8, u8>::new();
}

#[test]
fn a_shadow_phase_limited_to_the_canary_activates_later_waves_directly() {
    let mut f = Fleet::new(10);
    let mut p = plan(&[(20.0, 0), (100.0, 0)]);
    p.shadow = Some(ShadowPhase {
        duration: Duration::from_secs(5),
        min_compared: 10,
        min_agreement: 0.5,
        max_latency_ratio: None,
        waves: 1,
    });
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0));
    assert_eq!(s1.state.stage, Stage::Shadow);
    assert_eq!(s1.actions.len(), 2);
    assert!(s1
        .actions
        .iter()
        .all(|a| matches!(a, Action::Deploy { shadow: true, .. })));
    f.report_all(&s1.state, DevState::Deploying, Phase::Shadowing);
    for id in s1.state.devices.keys() {
        f.dev(id).shadow = ShadowObs {
            compared: 20,
            agreed: 18,
            active_latency: hist(100, 20),
            candidate_latency: hist(100, 20),
        };
    }
    let s2 = issue(step(&s1.state, &f.obs, 5 * S));
    assert!(s2
        .actions
        .iter()
        .all(|a| matches!(a, Action::Promote { .. })));
    f.report_all(&s2.state, DevState::Promoting, Phase::Healthy);
    let s3 = step(&s2.state, &f.obs, 6 * S);
    assert_eq!(s3.state.stage, Stage::Bake);
    // Bake over: wave 2 is past the shadow phase and installs directly.
    let s4 = step(&s3.state, &f.obs, 7 * S);
    assert_eq!(s4.state.wave, 1);
    assert_eq!(s4.state.stage, Stage::Install);
    let s5 = issue(step(&s4.state, &f.obs, 7 * S));
    assert_eq!(s5.actions.len(), 8, "{:?}", s5.actions);
    assert!(s5
        .actions
        .iter()
        .all(|a| matches!(a, Action::Deploy { shadow: false, .. })));
}

#[test]
fn aborting_during_the_shadow_phase_sends_shadowing_devices_back_to_their_model() {
    let mut f = Fleet::new(10);
    let mut p = plan(&[(20.0, 0), (100.0, 0)]);
    p.shadow = Some(ShadowPhase {
        duration: Duration::from_secs(60),
        ..ShadowPhase::default()
    });
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0));
    f.report_all(&s1.state, DevState::Deploying, Phase::Shadowing);
    let s2 = step(&s1.state, &f.obs, S);
    assert_eq!(count(&s2.state, DevState::Shadowing), 2);
    let ab = operate(&s2.state, Op::Abort, "op", 2 * S).unwrap();
    let sent: Vec<&Action> = ab
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Rollback { .. }))
        .collect();
    assert_eq!(sent.len(), 2, "{:?}", ab.actions);
    for a in sent {
        let Action::Rollback { device, to } = a else {
            unreachable!()
        };
        assert_eq!(
            to, &ab.state.devices[device].previous,
            "back to the model it runs"
        );
    }
    assert_eq!(count(&ab.state, DevState::RollingBack), 2);
}

#[test]
fn a_p99_latency_gate_needs_a_hundred_samples_before_one_slow_request_decides_it() {
    let shadow_obs = |n: u64, slow: u64| {
        let mut cand = hist(100, n - slow);
        cand.merge(&hist(5_000, slow));
        ShadowObs {
            compared: n,
            agreed: n,
            active_latency: hist(100, n),
            candidate_latency: cand,
        }
    };
    // One slow request in 20 is the p99 (the maximum): no verdict. One in 100 is not the
    // p99; ten in 200 are.
    for (n, slow, verdict) in [
        (20, 1, Verdict::NoData),
        (100, 1, Verdict::Pass),
        (200, 10, Verdict::Fail),
    ] {
        let mut f = Fleet::new(5);
        let mut p = plan(&[(20.0, 0), (100.0, 0)]);
        p.shadow = Some(ShadowPhase {
            duration: Duration::from_secs(60),
            min_compared: 10,
            min_agreement: 0.5,
            max_latency_ratio: Some(2.0),
            waves: 0,
        });
        let s0 = RolloutState::new(1, p, candidate(), 0);
        let s1 = issue(step(&s0, &f.obs, 0));
        f.report_all(&s1.state, DevState::Deploying, Phase::Shadowing);
        let id = s1.state.devices.keys().next().unwrap().clone();
        f.dev(&id).shadow = shadow_obs(n, slow);
        let s2 = step(&s1.state, &f.obs, S);
        let gates = evaluate_shadow(&s2.state, &f.obs);
        let g = gates
            .iter()
            .find(|g| g.gate == "shadow_p99_latency_ratio")
            .unwrap();
        assert_eq!(g.verdict, verdict, "{n} samples: {g:?}");
    }
}

#[test]
fn a_candidate_worse_on_labelled_inputs_pauses_and_no_labels_hold_the_wave() {
    use crate::rollout::LiveAccuracy;
    let mut f = Fleet::new(20);
    let mut p = plan(&[(10.0, 60), (100.0, 60)]);
    p.gates.max_live_accuracy_drop = Some(0.05);
    p.gates.min_labels = Some(50);
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &f.obs, 0)).state;
    f.report_all(&s1, DevState::Deploying, Phase::Healthy);
    // No labels yet: no verdict, and the bake's end does not let the wave pass.
    let s2 = step(&s1, &f.obs, S).state;
    let s3 = step(&s2, &f.obs, 100 * S).state;
    assert_eq!(s3.status, Status::Running);
    assert_eq!(s3.wave, 0, "no data is never a pass");
    let g = s3.gates.iter().find(|g| g.gate == "live_accuracy").unwrap();
    assert_eq!(g.verdict, Verdict::NoData);
    // The canary is right on 60 % of its labelled inputs, the control group on 92 %.
    f.obs.live_accuracy = Some(LiveAccuracy {
        candidate: (120, 200),
        control: (1_840, 2_000),
    });
    let s4 = step(&s3, &f.obs, 101 * S);
    assert!(
        matches!(&s4.state.status, Status::Paused { reason } if reason.contains("live_accuracy")),
        "{:?}",
        s4.state.status
    );
    assert!(s4.actions.is_empty());
    // As good as the control group: the wave goes on.
    f.obs.live_accuracy = Some(LiveAccuracy {
        candidate: (1_850, 2_000),
        control: (1_840, 2_000),
    });
    let s5 = step(&s3, &f.obs, 101 * S).state;
    assert_eq!(s5.wave, 1, "{:?}", s5.gates);
}
