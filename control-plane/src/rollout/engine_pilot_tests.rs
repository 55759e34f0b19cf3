//! Pilot-sized fleets (issue 18): the shipped example plan on one to ten devices, waves
//! that add no devices. The clock is passed in; devices are simulated as data.

use drover_protocol::messages::Phase;

use super::engine::*;
use super::engine_tests::{candidate, count, hist, issue, Fleet, NEW, OLD, S};
use super::plan::*;

pub(super) fn example_plan() -> Plan {
    Plan::from_toml(include_str!("../../examples/rollout.toml")).unwrap()
}

/// Devices that do what they are told at once: a shadow deploy shadows and compares
/// `compared` inputs; an activation or a promotion becomes healthy and serves `served`
/// inferences; a rollback returns to the old model.
pub(super) struct Obedient {
    pub(super) fleet: Fleet,
    pub(super) compared: u64,
    pub(super) served: u64,
}

impl Obedient {
    pub(super) fn new(n: usize) -> Self {
        Obedient {
            fleet: Fleet::new(n),
            compared: 600,
            served: 200,
        }
    }

    pub(super) fn answer(&mut self, actions: &[Action]) {
        let (c, served) = (self.compared, self.served);
        for a in actions {
            let o = self.fleet.dev(a.device());
            match a {
                Action::Deploy { shadow: true, .. } => {
                    o.progress = Some((Phase::Shadowing, None));
                    o.shadow = ShadowObs {
                        compared: c,
                        agreed: c,
                        active_latency: hist(100, c),
                        candidate_latency: hist(100, c),
                    };
                }
                Action::Deploy { shadow: false, .. } | Action::Promote { .. } => {
                    o.progress = Some((Phase::Healthy, None));
                    o.active = Some(NEW.into());
                    o.candidate = Health {
                        inferences: served,
                        errors: 0,
                        latency: hist(100, served),
                    };
                }
                Action::Rollback { .. } => {
                    o.progress = Some((Phase::Done, None));
                    o.active = Some(OLD.into());
                }
            }
        }
    }
}

/// Steps the rollout once a simulated minute, from `start_min`, until it stops running or
/// `minutes` pass; returns the last state and every event.
pub(super) fn drive(
    s: RolloutState,
    dev: &mut Obedient,
    start_min: u64,
    minutes: u64,
) -> (RolloutState, Vec<Event>) {
    let mut s = s;
    let mut events = Vec::new();
    for minute in start_min..start_min + minutes {
        let st = issue(step(&s, &dev.fleet.obs, minute * 60 * S));
        dev.answer(&st.actions);
        events.extend(st.events);
        s = st.state;
        if s.status != Status::Running {
            break;
        }
    }
    (s, events)
}

#[test]
fn small_fleets_complete_the_shipped_example_plan() {
    for n in [1, 2, 3, 7, 10] {
        let mut dev = Obedient::new(n);
        let s0 = RolloutState::new(1, example_plan(), candidate(), 0);
        let (s, events) = drive(s0, &mut dev, 0, 24 * 60);
        assert_eq!(
            s.status,
            Status::Completed,
            "{n} devices: stuck in wave {} stage {:?}; gates {:?}",
            s.wave + 1,
            s.stage,
            s.gates
        );
        assert_eq!(count(&s, DevState::Healthy), n, "{n} devices");
        // 1 % and 10 % of ten devices or fewer are both the one canary.
        let empty: Vec<&Event> = events.iter().filter(|e| e.kind == "wave-empty").collect();
        assert!(
            empty
                .iter()
                .any(|e| e.detail.starts_with("wave 2 adds no devices")),
            "{n} devices: {empty:?}"
        );
    }
}

#[test]
fn a_wave_that_adds_no_devices_passes_at_once_without_its_bake_or_shadow() {
    // Two devices: 10 % and 50 % are both one device.
    let mut dev = Obedient::new(2);
    let mut p = example_plan();
    p.waves = vec![
        Wave {
            percent: Some(10.0),
            count: None,
            bake: std::time::Duration::from_secs(60),
        },
        Wave {
            percent: Some(50.0),
            count: None,
            bake: std::time::Duration::from_secs(86_400),
        },
        Wave {
            percent: Some(100.0),
            count: None,
            bake: std::time::Duration::ZERO,
        },
    ];
    let s0 = RolloutState::new(1, p, candidate(), 0);
    // Wave 1: shadow (10 min), promote, bake (1 min).
    let (s, _) = drive(s0, &mut dev, 0, 13);
    assert_eq!((s.wave, s.stage), (1, Stage::Shadow), "{:?}", s.status);
    let st = step(&s, &dev.fleet.obs, 13 * 60 * S);
    assert_eq!(st.state.wave, 2, "passed at once, not after a day's bake");
    let e = st.events.iter().find(|e| e.kind == "wave-empty").unwrap();
    assert_eq!(
        e.detail,
        "wave 2 adds no devices (1 of 2 selected were already assigned); passed at once"
    );
    assert!(st.actions.is_empty());
}

#[test]
fn a_rollout_with_no_device_holds_rather_than_passing_its_waves() {
    let dev = Obedient::new(0);
    let s0 = RolloutState::new(1, example_plan(), candidate(), 0);
    let st = step(&s0, &dev.fleet.obs, 3_600 * S);
    assert_eq!((st.state.status, st.state.wave), (Status::Running, 0));
    assert!(st.events.is_empty(), "{:?}", st.events);
}

/// Ten devices installed and baked, serving nothing yet.
fn installed_without_traffic(p: Plan) -> (Obedient, RolloutState) {
    let mut dev = Obedient::new(10);
    dev.served = 0;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &dev.fleet.obs, 0));
    dev.answer(&s1.actions);
    let s2 = step(&s1.state, &dev.fleet.obs, S).state;
    assert_eq!(s2.stage, Stage::Bake);
    (dev, s2)
}

fn one_wave(bake_s: u64) -> Plan {
    let mut p = example_plan();
    p.shadow = None;
    p.waves = vec![Wave {
        percent: Some(100.0),
        count: None,
        bake: std::time::Duration::from_secs(bake_s),
    }];
    p
}

#[test]
fn a_gate_without_a_verdict_holds_the_bake_and_says_why_once() {
    let (mut dev, s) = installed_without_traffic(one_wave(60));
    let held = step(&s, &dev.fleet.obs, 100 * S);
    assert_eq!(
        held.state.status,
        Status::Running,
        "no verdict is not a pass"
    );
    let g = held
        .state
        .gates
        .iter()
        .find(|g| g.gate == "error_rate")
        .unwrap();
    assert_eq!(g.verdict, Verdict::NoData);
    assert_eq!(
        g.reason.as_deref(),
        Some("needs 100 inferences on the candidate, has 0")
    );
    let why = held.state.waiting.clone().unwrap();
    assert!(
        why.starts_with("no verdict yet: error_rate: needs 100"),
        "{why}"
    );
    assert!(
        why.contains("p99_latency_ratio: needs 100 latencies"),
        "{why}"
    );
    let holding: Vec<&Event> = held.events.iter().filter(|e| e.kind == "holding").collect();
    assert_eq!(holding.len(), 1);
    assert!(holding[0]
        .detail
        .starts_with("wave 1 holds: no verdict yet"));
    // Still no data: still holding, and the event is not repeated.
    let again = step(&held.state, &dev.fleet.obs, 200 * S);
    assert_eq!(again.state.status, Status::Running);
    assert!(again.events.is_empty(), "{:?}", again.events);
    // Traffic arrives: every gate has a verdict, the rollout completes.
    dev.served = 200;
    let ids: Vec<String> = again.state.devices.keys().cloned().collect();
    for id in &ids {
        dev.answer(&[Action::Promote { device: id.clone() }]);
    }
    let done = step(&again.state, &dev.fleet.obs, 300 * S);
    assert_eq!(done.state.status, Status::Completed);
    assert_eq!(done.state.waiting, None);
    let e = done.events.iter().find(|e| e.kind == "completed").unwrap();
    assert!(e.detail.contains("every gate passed"), "{}", e.detail);
}

#[test]
fn on_no_data_pass_ends_the_stage_and_names_the_gates_that_had_no_verdict() {
    let mut p = one_wave(60);
    p.gates.on_no_data = Some(OnNoData::Pass);
    let (dev, s) = installed_without_traffic(p);
    let done = step(&s, &dev.fleet.obs, 100 * S);
    assert_eq!(done.state.status, Status::Completed);
    let e = done.events.iter().find(|e| e.kind == "completed").unwrap();
    assert!(
        e.detail
            .contains("without a verdict (on_no_data = \"pass\"): error_rate: needs 100"),
        "{}",
        e.detail
    );
}

#[test]
fn the_shadow_stage_never_promotes_below_min_compared_even_when_no_data_passes() {
    let mut p = example_plan(); // min_compared = 500
    p.gates.on_no_data = Some(OnNoData::Pass);
    let mut dev = Obedient::new(1);
    dev.compared = 0;
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let (s, events) = drive(s0, &mut dev, 0, 60);
    assert_eq!(
        (s.status.clone(), s.wave, s.stage),
        (Status::Running, 0, Stage::Shadow)
    );
    assert!(
        !events.iter().any(|e| e.kind == "promoted"),
        "promoted on zero comparisons: {events:?}"
    );
    assert_eq!(
        s.waiting.as_deref(),
        Some("shadow_agreement: needs 500 compared inputs, has 0")
    );
    let g = &s
        .gates
        .iter()
        .find(|g| g.gate == "shadow_agreement")
        .unwrap();
    assert_eq!((g.verdict, g.value), (Verdict::NoData, None));
    // 499 is still short; 500 promotes.
    for (n, promotes) in [(499, false), (500, true)] {
        let o = dev.fleet.dev("dev-000");
        o.shadow.compared = n;
        o.shadow.agreed = n;
        let st = step(&s, &dev.fleet.obs, 61 * 60 * S);
        assert_eq!(st.state.stage == Stage::Install, promotes, "{n} compared");
    }
}

#[test]
fn a_ten_percent_slower_model_across_a_bucket_edge_passes_a_1_5_latency_gate() {
    // 180–199 µs before, 201–220 µs after: the 100–200 and 200–350 buckets, whose upper
    // edges made the ratio 1.75.
    let spread = |from: u64, n: u64| {
        let mut h = drover_protocol::messages::LatencyHistogram::new();
        for i in 0..n {
            h.record(from + i % 20);
        }
        h
    };
    let mut dev = Obedient::new(3);
    let s0 = RolloutState::new(1, one_wave(60), candidate(), 0);
    let s1 = issue(step(&s0, &dev.fleet.obs, 0));
    dev.answer(&s1.actions);
    for id in s1.state.devices.keys() {
        let o = dev.fleet.dev(id);
        o.baseline.latency = spread(180, 500);
        o.candidate.latency = spread(201, 500);
    }
    let s2 = step(&s1.state, &dev.fleet.obs, S);
    let g = s2
        .state
        .gates
        .iter()
        .find(|g| g.gate == "p99_latency_ratio")
        .unwrap();
    assert_eq!(g.verdict, Verdict::Pass, "{g:?}");
    assert!(g.value.unwrap() < 1.15, "{g:?}");
    // The basis shows the real quantiles.
    assert!(g.basis.starts_with("candidate p50 2"), "{}", g.basis);
    assert!(g.basis.contains("previous model p50 1"), "{}", g.basis);
}

#[test]
fn an_operator_abort_ends_aborted_not_rolled_back() {
    let mut dev = Obedient::new(4);
    let s0 = RolloutState::new(1, one_wave(600), candidate(), 0);
    let (s, _) = drive(s0, &mut dev, 0, 3);
    assert_eq!(count(&s, DevState::Healthy), 4);
    let ab = issue(operate(&s, Op::Abort, "carol", 200 * S).unwrap());
    assert_eq!(ab.state.status.name(), "aborting");
    assert_eq!(ab.actions.len(), 4, "every device is sent back");
    dev.answer(&ab.actions);
    let done = step(&ab.state, &dev.fleet.obs, 201 * S);
    assert_eq!(
        done.state.status,
        Status::Aborted {
            reason: "aborted by carol".into()
        }
    );
    assert_eq!(done.state.status.name(), "aborted");
    assert!(!done.state.status.is_active());
    let e = done.events.iter().find(|e| e.kind == "aborted").unwrap();
    assert!(e.detail.starts_with("4 devices back"), "{}", e.detail);
    // A gate's rollback still ends rolled back (see engine_tests), never "aborted".
    assert!(!done.events.iter().any(|e| e.kind == "rolled-back"));
}

#[test]
fn retry_queues_failed_devices_again_and_they_are_commanded() {
    let mut dev = Obedient::new(10);
    let mut p = one_wave(0);
    p.gates.min_install_success = Some(0.5);
    let s0 = RolloutState::new(1, p, candidate(), 0);
    let s1 = issue(step(&s0, &dev.fleet.obs, 0));
    dev.answer(&s1.actions);
    let bad = s1.state.devices.keys().next().unwrap().clone();
    dev.fleet.dev(&bad).progress = Some((Phase::Failed, Some("disk full".into())));
    dev.fleet.dev(&bad).active = Some(OLD.into());
    let s2 = step(&s1.state, &dev.fleet.obs, S).state;
    let s3 = step(&s2, &dev.fleet.obs, 2 * S).state;
    assert_eq!(s3.status, Status::Completed, "{:?}", s3.gates);
    assert_eq!(s3.devices[&bad].state, DevState::Failed);
    // Retry after completion: the failed device is queued and commanded again.
    let r = operate(&s3, Op::Retry, "dave", 3 * S).unwrap();
    assert_eq!(r.state.devices[&bad].state, DevState::Queued);
    assert!(r.events[0]
        .detail
        .starts_with("dave retried 1 failed devices"));
    let s4 = issue(step(&r.state, &dev.fleet.obs, 4 * S));
    assert_eq!(
        s4.actions,
        vec![Action::Deploy {
            device: bad.clone(),
            shadow: false
        }]
    );
    dev.answer(&s4.actions);
    let s5 = step(&s4.state, &dev.fleet.obs, 5 * S).state;
    assert_eq!(s5.devices[&bad].state, DevState::Healthy);
    assert_eq!(s5.status, Status::Completed);
    // Nothing left to retry: refused, saying why.
    let e = operate(&s5, Op::Retry, "dave", 6 * S).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollout 1 is without failed devices: cannot retry"
    );
}

#[test]
fn late_joiners_join_the_current_wave_when_the_plan_takes_them() {
    for take in [true, false] {
        let mut dev = Obedient::new(10);
        let mut p = example_plan();
        p.shadow = None;
        p.late_joiners = take;
        let s0 = RolloutState::new(1, p, candidate(), 1_000 * S);
        let s1 = issue(step(&s0, &dev.fleet.obs, 1_000 * S));
        assert_eq!(s1.state.devices.len(), 1, "the canary");
        // A device enrolled after the start, ranked past wave 1's (and 2's) size.
        let top = dev
            .fleet
            .obs
            .selected
            .iter()
            .map(|d| bucket(d))
            .max()
            .unwrap();
        let late = (0..1000)
            .map(|i| format!("late-{i}"))
            .find(|id| bucket(id) > top)
            .unwrap();
        let mut o = dev.fleet.dev("dev-000").clone();
        o.progress = None;
        o.active = Some(OLD.into());
        o.joined_at_ms = 1_500 * S;
        dev.fleet.obs.devices.insert(late.clone(), o);
        dev.fleet.obs.selected.push(late.clone());
        let s2 = issue(step(&s1.state, &dev.fleet.obs, 1_600 * S));
        let joined = s2.state.devices.get(&late);
        if take {
            assert_eq!(
                joined.map(|d| (d.wave, d.state)),
                Some((0, DevState::Deploying))
            );
            assert!(
                s2.events.iter().any(|e| e.kind == "late-joiners"),
                "{:?}",
                s2.events
            );
        } else {
            assert!(
                joined.is_none(),
                "waits for the wave that reaches its bucket"
            );
        }
    }
}

#[test]
fn apply_windows_let_devices_download_any_time_but_activate_only_inside_one() {
    let at = |civil: &str| {
        let dt: jiff::civil::DateTime = civil.parse().unwrap();
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        dt.to_zoned(tz).unwrap().timestamp().as_millisecond() as u64
    };
    let mut dev = Obedient::new(3);
    dev.fleet.dev("dev-002").active = None; // nothing to shadow beside
    let mut p = one_wave(60);
    p.windows = vec!["Sat 02:00-05:00 Europe/Berlin".into()];
    // Friday noon: outside the window.
    let fri = at("2026-12-04T12:00");
    let s0 = RolloutState::new(1, p, candidate(), fri);
    let s1 = issue(step(&s0, &dev.fleet.obs, fri));
    assert_eq!(
        s1.actions,
        vec![
            Action::Deploy {
                device: "dev-000".into(),
                shadow: true
            },
            Action::Deploy {
                device: "dev-001".into(),
                shadow: true
            },
        ],
        "downloads start at once, as shadows; dev-002 waits queued"
    );
    dev.answer(&s1.actions);
    // All Friday night: installed in shadow, nobody switches.
    let mut s = s1.state;
    for h in 13..26 {
        let now = fri + (h - 12) * 3_600 * S;
        let st = issue(step(&s, &dev.fleet.obs, now));
        assert!(st.actions.is_empty(), "hour {h}: {:?}", st.actions);
        s = st.state;
    }
    assert_eq!(count(&s, DevState::Shadowing), 2);
    assert_eq!(count(&s, DevState::Queued), 1);
    assert!(s
        .waiting
        .as_deref()
        .unwrap()
        .starts_with("outside the apply windows"));
    // Saturday 02:00 Berlin: the shadows are promoted, the queued device activates.
    let sat = at("2026-12-05T02:00");
    let st = issue(step(&s, &dev.fleet.obs, sat));
    let mut got: Vec<String> = st.actions.iter().map(|a| format!("{a:?}")).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "Deploy { device: \"dev-002\", shadow: false }",
            "Promote { device: \"dev-000\" }",
            "Promote { device: \"dev-001\" }",
        ]
    );
    dev.answer(&st.actions);
    let (done, _) = drive(st.state, &mut dev, sat / (60 * S) + 1, 10);
    assert_eq!(done.status, Status::Completed, "{:?}", done.waiting);
    assert_eq!(count(&done, DevState::Healthy), 3);
}
