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
