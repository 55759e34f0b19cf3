//! Unit tests of the deployment path, one per transition: deploy → open → download →
//! finish → self-test → activate → probation → healthy | rolled back; shadow, promote,
//! rollback, supersede, restart.

use super::tests::*;
use super::*;

pub(super) fn deploy(r: &mut Rig, seq: u64, m: &TestModel, mode: DeployMode) -> Vec<Effect> {
    let cmd = r.command(
        seq,
        Action::Deploy {
            manifest: m.blob.clone(),
            mode,
        },
    );
    r.send_command(cmd)
}

pub(super) fn opened(r: &mut Rig, m: &TestModel, stored: Stored) -> Vec<Effect> {
    r.handle(Input::Opened {
        manifest_digest: m.digest(),
        stored,
    })
}

/// Feeds a chunk and, if the machine asks to write it, reports it written.
pub(super) fn chunk(r: &mut Rig, m: &TestModel, index: u32) -> Vec<Effect> {
    let mut e = r.handle(Input::Chunk(m.chunk(index)));
    if let Some(Effect::WriteChunk { index, .. }) = e.last() {
        let index = *index;
        e.extend(r.handle(Input::ChunkWritten {
            manifest_digest: m.digest(),
            index,
        }));
    }
    e
}

/// Deploys a model whose file is already in the store, through its self-test.
pub(super) fn install(r: &mut Rig, seq: u64, m: &TestModel, mode: DeployMode) -> Vec<Effect> {
    deploy(r, seq, m, mode);
    opened(r, m, Stored::Blob);
    r.handle(Input::Loaded { model: m.digest() })
}

/// Installs and activates a model and ends its probation with clean traffic.
fn healthy(r: &mut Rig, seq: u64, m: &TestModel) {
    install(r, seq, m, DeployMode::Activate);
    r.now += PROBATION_MS;
    r.tick(0, 10);
    assert_eq!(
        r.m.state().one().active.as_ref().unwrap().state,
        SlotState::Healthy
    );
}

pub(super) fn commanded(r: &mut Rig, seq: u64, action: Action) -> Vec<Effect> {
    let cmd = r.command(seq, action);
    r.send_command(cmd)
}

#[test]
fn a_deploy_is_persisted_as_pending_then_asks_the_store_what_it_holds() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    let e = deploy(&mut r, 1, &m, DeployMode::Activate);
    assert_eq!(
        names(&e),
        [
            "persist",
            "crash command.after_seq_persist",
            "progress Received",
            "crash deploy.after_pending_persist",
            "open"
        ]
    );
    let first = match &e[0] {
        Effect::PersistCommand(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        first.one().pending.as_ref().map(|p| p.model.clone()),
        Some(m.model_ref())
    );
}

#[test]
fn a_resumed_download_asks_only_for_missing_chunks_in_batches_and_again_after_the_retry() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 70 * 1024);
    deploy(&mut r, 1, &m, DeployMode::Activate);
    let mut have = vec![false; 70];
    have[0] = true;
    have[1] = true;
    let e = opened(&mut r, &m, Stored::Chunks(have));
    assert_eq!(names(&e), ["progress Downloading", "subscribe"]);
    assert_eq!(progress(&e)[0].1, Phase::Downloading);
    let asked = |e: &[Effect]| -> Vec<u32> {
        uplinks(e)
            .into_iter()
            .filter_map(|u| match u {
                Uplink::ChunkRequest(c) => Some(c.indices),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let first = asked(&r.tick(0, 0));
    assert_eq!(first, (2..2 + CHUNK_BATCH as u32).collect::<Vec<_>>());
    r.now += CHUNK_RETRY_MS - 1;
    assert!(asked(&r.tick(0, 0)).is_empty());
    r.now += 1;
    assert_eq!(asked(&r.tick(0, 0)), first);
    // Requests go only over a live session; a reconnect subscribes and asks again.
    r.handle(Input::Disconnected);
    r.now += CHUNK_RETRY_MS;
    assert!(asked(&r.tick(0, 0)).is_empty());
    let e = r.handle(Input::Connected);
    assert_eq!(names(&e).iter().filter(|n| *n == "subscribe").count(), 3);
    assert_eq!(asked(&r.tick(0, 0)), first);
}

#[test]
fn verified_chunks_are_written_then_the_file_is_finished_self_tested_and_activated() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3500);
    deploy(&mut r, 1, &m, DeployMode::Activate);
    opened(&mut r, &m, Stored::Chunks(vec![false; 4]));
    let e = r.handle(Input::Chunk(m.chunk(0)));
    assert!(
        matches!(&e[..], [Effect::WriteChunk { index: 0, data, .. }] if *data == m.chunk(0).data)
    );
    let e = r.handle(Input::ChunkWritten {
        manifest_digest: m.digest(),
        index: 0,
    });
    // Progress every quarter; the first chunk in also asks for the rest.
    assert_eq!(names(&e), ["progress Downloading", "uplink ChunkRequest"]);
    chunk(&mut r, &m, 1);
    chunk(&mut r, &m, 2);
    // A chunk held already is not written twice.
    assert!(!names(&chunk(&mut r, &m, 1))
        .iter()
        .any(|n| n.starts_with("write")));
    let e = chunk(&mut r, &m, 3);
    assert_eq!(names(&e)[1..], ["progress Downloading", "finish"]);
    let e = r.handle(Input::BlobReady {
        manifest_digest: m.digest(),
    });
    assert_eq!(
        names(&e),
        [
            "unsubscribe",
            "crash deploy.after_verify",
            "progress Verified",
            "load test=true"
        ]
    );
    let e = r.handle(Input::Loaded { model: m.digest() });
    assert_eq!(
        names(&e),
        [
            "crash deploy.after_selftest",
            "progress SelfTested",
            "crash activate.before_state_persist",
            "persist",
            "crash activate.after_state_persist",
            "serve",
            "crash activate.after_swap",
            "progress Active"
        ]
    );
    let s = persisted(&e).unwrap();
    assert_eq!(s.one().pending, None);
    let a = s.one().active.as_ref().unwrap();
    assert_eq!(
        (a.model.clone(), a.state),
        (m.model_ref(), SlotState::Active)
    );
    assert!(events(&e).contains(&&Event::Installed {
        command_seq: 1,
        mode: DeployMode::Activate
    }));
}

#[test]
fn a_tampered_chunk_is_refused_and_never_written() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    deploy(&mut r, 1, &m, DeployMode::Activate);
    opened(&mut r, &m, Stored::Chunks(vec![false; 3]));
    let mut bad = m.chunk(1);
    bad.data[0] ^= 1;
    let e = r.handle(Input::Chunk(bad));
    assert!(matches!(
        &e[..],
        [Effect::Event(Event::ChunkRefused { index: 1, .. })]
    ));
    // A chunk the store could not write is not held: it is asked for again.
    r.handle(Input::Chunk(m.chunk(2)));
    let e = r.handle(Input::ChunkWriteFailed {
        manifest_digest: m.digest(),
        index: 2,
        error: "disk full".into(),
    });
    assert!(matches!(
        &e[..],
        [Effect::Event(Event::ChunkRefused { index: 2, .. })]
    ));
    let asked: Vec<u32> = uplinks(&r.tick(0, 0))
        .into_iter()
        .filter_map(|u| match u {
            Uplink::ChunkRequest(c) => Some(c.indices),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(asked, [0, 1, 2]);
}

#[test]
fn a_chunk_for_a_model_not_in_flight_is_ignored() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    let other = TestModel::new(&r.signer, "9.0.0", 3000);
    assert!(r.handle(Input::Chunk(m.chunk(0))).is_empty());
    deploy(&mut r, 1, &m, DeployMode::Activate);
    // Before the store answered: nothing to write into yet.
    assert!(r.handle(Input::Chunk(m.chunk(0))).is_empty());
    opened(&mut r, &m, Stored::Chunks(vec![false; 3]));
    assert!(r.handle(Input::Chunk(other.chunk(0))).is_empty());
    assert!(r
        .handle(Input::ChunkWritten {
            manifest_digest: other.digest(),
            index: 0
        })
        .is_empty());
}

#[test]
fn a_newer_deploy_supersedes_the_download_in_flight() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    deploy(&mut r, 1, &v1, DeployMode::Activate);
    opened(&mut r, &v1, Stored::Chunks(vec![false; 3]));
    let e = deploy(&mut r, 2, &v2, DeployMode::Activate);
    assert_eq!(
        names(&e),
        [
            "persist",
            "crash command.after_seq_persist",
            "progress Received",
            "unsubscribe",
            "close",
            "progress Failed",
            "crash deploy.after_pending_persist",
            "open"
        ]
    );
    assert_eq!(
        progress(&e)[1],
        (1, Phase::Failed, Some("superseded by command 2".into()))
    );
    let pending = persisted(&e).unwrap().one().pending.as_ref().unwrap();
    assert_eq!(pending.model, v2.model_ref());
    assert!(
        matches!(e.last(), Some(Effect::OpenDownload { manifest_digest, .. }) if *manifest_digest == v2.digest())
    );
    opened(&mut r, &v2, Stored::Chunks(vec![false; 3]));
    assert!(r.handle(Input::Chunk(v1.chunk(0))).is_empty());
}

#[test]
fn a_model_already_in_the_store_is_self_tested_without_downloading() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    deploy(&mut r, 1, &m, DeployMode::Activate);
    let e = opened(&mut r, &m, Stored::Blob);
    assert_eq!(
        names(&e),
        [
            "unsubscribe",
            "crash deploy.after_verify",
            "progress Verified",
            "load test=true"
        ]
    );
}

#[test]
fn a_failed_open_finish_or_self_test_fails_the_job_and_clears_pending() {
    for stage in ["open", "finish", "self-test"] {
        let mut r = rig();
        let m = TestModel::new(&r.signer, "1.0.0", 1500);
        deploy(&mut r, 1, &m, DeployMode::Activate);
        let error = "boom".to_owned();
        let e = match stage {
            "open" => r.handle(Input::OpenFailed {
                manifest_digest: m.digest(),
                error,
            }),
            "finish" => {
                opened(&mut r, &m, Stored::Chunks(vec![true, true]));
                r.handle(Input::BlobFailed {
                    manifest_digest: m.digest(),
                    error,
                })
            }
            _ => {
                opened(&mut r, &m, Stored::Blob);
                r.handle(Input::LoadFailed {
                    model: m.digest(),
                    error,
                })
            }
        };
        assert_eq!(
            names(&e),
            ["unsubscribe", "close", "persist", "progress Failed"],
            "{stage}"
        );
        assert_eq!(persisted(&e).unwrap().one().pending, None, "{stage}");
        let detail = progress(&e)[0].2.clone().unwrap();
        let want = if stage == "self-test" {
            "self-test failed: boom"
        } else {
            "boom"
        };
        assert_eq!(detail, want);
        assert!(events(&e).contains(&&Event::InstallFailed { command_seq: 1 }));
        assert!(r.m.state().one().active.is_none());
    }
}

#[test]
fn probation_without_evidence_against_the_model_marks_it_healthy_and_reports_once() {
    let mut r = rig();
    let m = TestModel::new(&r.signer, "1.0.0", 3000);
    install(&mut r, 1, &m, DeployMode::Activate);
    r.now += PROBATION_MS - 1;
    assert!(r.tick(1, 1).is_empty());
    r.now += 1;
    let e = r.tick(1, 4);
    assert_eq!(
        names(&e),
        [
            "crash healthy.before_persist",
            "persist",
            "crash healthy.after_persist",
            "progress Healthy",
            "persist"
        ]
    );
    let a = persisted(&e).unwrap().one().active.clone().unwrap();
    assert_eq!((a.state, a.activated_by), (SlotState::Healthy, None));
    r.now += PROBATION_MS;
    assert!(r.tick(100, 0).is_empty());
}

#[test]
fn probation_failure_rolls_back_to_the_previous_healthy_model() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    install(&mut r, 2, &v2, DeployMode::Activate);
    r.now += PROBATION_MS;
    let e = r.tick(5, 0);
    assert_eq!(names(&e), ["load test=false"]);
    assert!(events(&e).contains(&&Event::ProbationFailed { errors: 5, ok: 0 }));
    let e = r.handle(Input::Loaded { model: v1.digest() });
    assert_eq!(names(&e), ["persist", "serve", "progress RolledBack"]);
    assert_eq!(
        progress(&e)[0],
        (
            2,
            Phase::RolledBack,
            Some("5 errors in 5 requests during probation".into())
        )
    );
    let s = persisted(&e).unwrap();
    assert_eq!(s.one().active.as_ref().unwrap().model, v1.model_ref());
    let bad = s.one().previous.as_ref().unwrap();
    assert_eq!(
        (bad.model.clone(), bad.state),
        (v2.model_ref(), SlotState::RolledBack)
    );
}

#[test]
fn probation_failure_with_nothing_to_roll_back_to_is_reported_failed() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    install(&mut r, 1, &v1, DeployMode::Activate);
    r.now += PROBATION_MS;
    let e = r.tick(5, 0);
    assert_eq!(
        progress(&e),
        [(
            1,
            Phase::Failed,
            Some("no previous model to roll back to".into())
        )]
    );
}

#[test]
fn a_rollback_command_restores_the_previous_model_and_ends_a_shadow() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    let v3 = TestModel::new(&r.signer, "3.0.0", 3000);
    healthy(&mut r, 1, &v1);
    healthy(&mut r, 2, &v2);
    install(&mut r, 3, &v3, DeployMode::Shadow);
    let e = commanded(&mut r, 4, Action::Rollback { to: None });
    assert_eq!(
        names(&e)[3..],
        ["persist", "drop shadow", "load test=false"]
    );
    let e = r.handle(Input::Loaded { model: v1.digest() });
    assert_eq!(names(&e), ["persist", "serve", "progress Done"]);
    let s = r.m.state();
    assert_eq!(s.one().active.as_ref().unwrap().model, v1.model_ref());
    assert_eq!(s.one().previous.as_ref().unwrap().model, v2.model_ref());
    assert_eq!(s.one().shadow, None);
}

#[test]
fn a_rollback_cancels_the_download_in_flight_and_names_its_target() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    deploy(&mut r, 2, &v2, DeployMode::Activate);
    opened(&mut r, &v2, Stored::Chunks(vec![false; 3]));
    // To the active model: the download goes, nothing else to do.
    let e = commanded(
        &mut r,
        3,
        Action::Rollback {
            to: Some(v1.model_ref()),
        },
    );
    assert_eq!(
        names(&e)[3..],
        ["unsubscribe", "close", "progress Failed", "progress Done"]
    );
    // The command's own write already dropped the pending deployment.
    assert_eq!(persisted(&e).unwrap().one().pending, None);
    assert_eq!(r.m.state().one().pending, None);
    assert!(r.handle(Input::Chunk(v2.chunk(0))).is_empty());
    // To a model that is not the previous slot: refused.
    let e = commanded(
        &mut r,
        4,
        Action::Rollback {
            to: Some(v2.model_ref()),
        },
    );
    assert_eq!(
        progress(&e)[1],
        (
            4,
            Phase::Failed,
            Some("requested model is not the previous slot".into())
        )
    );
}

#[test]
fn a_previous_model_that_no_longer_loads_fails_the_rollback_and_keeps_the_active_one() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    healthy(&mut r, 2, &v2);
    commanded(&mut r, 3, Action::Rollback { to: None });
    let e = r.handle(Input::LoadFailed {
        model: v1.digest(),
        error: "model file missing".into(),
    });
    assert_eq!(
        progress(&e),
        [(3, Phase::Failed, Some("model file missing".into()))]
    );
    assert_eq!(
        r.m.state().one().active.as_ref().unwrap().model,
        v2.model_ref()
    );
}

#[test]
fn a_shadow_deploy_runs_beside_the_active_model_until_promoted() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    let e = install(&mut r, 2, &v2, DeployMode::Shadow);
    assert_eq!(
        names(&e),
        [
            "crash deploy.after_selftest",
            "progress SelfTested",
            "persist",
            "shadow",
            "progress Shadowing"
        ]
    );
    let s = persisted(&e).unwrap();
    assert_eq!(s.one().shadow.as_ref().unwrap().model, v2.model_ref());
    assert_eq!(s.one().active.as_ref().unwrap().model, v1.model_ref());
    let e = commanded(&mut r, 3, Action::Promote);
    assert_eq!(
        names(&e)[3..],
        [
            "crash activate.before_state_persist",
            "persist",
            "crash activate.after_state_persist",
            "promote",
            "crash activate.after_swap",
            "progress Active"
        ]
    );
    let s = persisted(&e).unwrap();
    let a = s.one().active.as_ref().unwrap();
    assert_eq!(
        (a.model.clone(), a.state, a.activated_by.map(|c| c.0)),
        (v2.model_ref(), SlotState::Active, Some(3))
    );
    assert_eq!(s.one().previous.as_ref().unwrap().model, v1.model_ref());
    assert_eq!(s.one().shadow, None);
}

#[test]
fn promote_without_a_shadow_and_deploying_the_active_model_change_nothing() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let e = commanded(&mut r, 1, Action::Promote);
    assert_eq!(
        progress(&e)[1],
        (1, Phase::Failed, Some("no shadow model to promote".into()))
    );
    healthy(&mut r, 2, &v1);
    let e = deploy(&mut r, 3, &v1, DeployMode::Activate);
    assert_eq!(
        progress(&e)[1],
        (3, Phase::Healthy, Some("already active".into()))
    );
    assert!(!e.iter().any(Effect::is_ask));
}

#[test]
fn an_activation_never_proven_healthy_keeps_no_rollback_target() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    install(&mut r, 1, &v1, DeployMode::Activate);
    install(&mut r, 2, &v2, DeployMode::Activate);
    assert_eq!(r.m.state().one().previous, None);
}

#[test]
fn a_restart_takes_up_probation_an_unreported_verdict_and_a_pending_deploy() {
    // Crashed during probation: probation starts again.
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    install(&mut r, 1, &v1, DeployMode::Activate);
    let mut again = rig_with(r.m.state().clone(), true);
    again.now += PROBATION_MS;
    assert_eq!(phases(&again.tick(0, 1)), [Phase::Healthy]);

    // Crashed after persisting Healthy, before the report: reported at start.
    let mut state = again.m.state().clone();
    state.one_mut().active.as_mut().unwrap().activated_by = Some((1, [1; 32]));
    let mut again = fresh(state, true);
    let e = again.handle(Input::Start);
    assert_eq!(names(&e), ["will", "progress Healthy", "persist"]);
    assert_eq!(
        persisted(&e)
            .unwrap()
            .one()
            .active
            .as_ref()
            .unwrap()
            .activated_by,
        None
    );

    // Crashed with a deploy pending: the store is asked again.
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    deploy(&mut r, 2, &v2, DeployMode::Activate);
    let mut again = fresh(r.m.state().clone(), true);
    let e = again.handle(Input::Start);
    assert_eq!(names(&e), ["will", "open"]);
}

#[test]
fn a_model_that_never_proves_healthy_is_rolled_back_on_the_third_boot() {
    let mut r = rig();
    let v1 = TestModel::new(&r.signer, "1.0.0", 3000);
    let v2 = TestModel::new(&r.signer, "2.0.0", 3000);
    healthy(&mut r, 1, &v1);
    install(&mut r, 2, &v2, DeployMode::Activate);
    let mut s = r.m.state().clone();
    assert!(!s.one_mut().count_unhealthy_boot());
    assert!(!s.one_mut().count_unhealthy_boot());
    assert!(s.one_mut().count_unhealthy_boot());
    assert_eq!(s.one().active.as_ref().unwrap().model, v1.model_ref());
    let bad = s.one().previous.as_ref().unwrap();
    assert_eq!(
        (bad.model.clone(), bad.state),
        (v2.model_ref(), SlotState::RolledBack)
    );
    // A healthy model is never counted.
    assert!(!s.one_mut().count_unhealthy_boot());
    assert_eq!(s.one().active.as_ref().unwrap().unhealthy_boots, 0);
}
