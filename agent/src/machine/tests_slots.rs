//! Unit tests of named model slots (issue 17): models of different names side by side,
//! each with its own deployment, probation, rollback and removal; the `[models]` budget
//! refused before any download; the `Models` report under protocol 2 only.

use drover_protocol::messages::HelloAck;

use super::tests::*;
use super::tests_deploy::{chunk, commanded, deploy, install, opened};
use super::*;

fn model(r: &Rig, name: &str, version: &str) -> TestModel {
    TestModel::named(&r.signer, name, version, 3000)
}

/// Installs, activates and passes probation (every slot's traffic is clean).
fn healthy(r: &mut Rig, seq: u64, m: &TestModel) {
    install(r, seq, m, DeployMode::Activate);
    r.now += PROBATION_MS;
    r.tick(0, 10);
    let slot = r.m.state().slot(&m.manifest.name).unwrap();
    assert_eq!(slot.active.as_ref().unwrap().model, m.model_ref());
    assert_eq!(slot.active.as_ref().unwrap().state, SlotState::Healthy);
}

fn rig_budget(budget: ModelBudget) -> Rig {
    let mut r = rig();
    let cfg = Config { budget, ..config() };
    let (state, trust) = (r.m.state().clone(), r.m.trust().clone());
    r.m = Machine::new(cfg, state, trust, r.m.next_seq(), r.now);
    r.handle(Input::Start);
    r.handle(Input::Connected);
    r
}

/// The model names the effects that touch serving talk about.
fn served_names(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ServeLoaded { model }
            | Effect::ShadowLoaded { model }
            | Effect::PromoteShadow { model }
            | Effect::DropShadow { model }
            | Effect::Unload { model } => Some(model.clone()),
            Effect::Load { model, .. } => Some(model.name.clone()),
            _ => None,
        })
        .collect()
}

fn models_reports(effects: &[Effect]) -> Vec<ModelsReport> {
    uplinks(effects)
        .into_iter()
        .filter_map(|u| match u {
            Uplink::Models(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn hello_ack(r: &mut Rig, protocol_version: u16) -> Vec<Effect> {
    r.handle(Input::Downlink(Downlink::HelloAck(HelloAck {
        protocol_version,
        server_time_ms: 0,
        stored_up_to: 0,
    })))
}

#[test]
fn deploying_b_while_a_serves_leaves_a_untouched() {
    let mut r = rig();
    let a = model(&r, "a", "1.0.0");
    let b = model(&r, "b", "1.0.0");
    healthy(&mut r, 1, &a);
    let a_before = r.m.state().slot("a").cloned();
    let mut e = install(&mut r, 2, &b, DeployMode::Activate);
    assert_eq!(served_names(&e), ["b"]);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::ServeLoaded { model } if model == "b")));
    // B's probation fails: B rolls back (to nothing: it is B's first version), A serves on.
    r.now += PROBATION_MS;
    let mut probation = BTreeMap::new();
    probation.insert("a".to_owned(), (0, 50));
    probation.insert("b".to_owned(), (40, 10));
    e = r.handle(Input::Tick(Observed {
        probation,
        last_request_id: 0,
    }));
    assert_eq!(
        progress(&e).last().map(|p| p.2.clone()),
        Some(Some("no previous model to roll back to".into()))
    );
    assert!(served_names(&e).is_empty(), "{:?}", names(&e));
    assert_eq!(r.m.state().slot("a").cloned(), a_before);
    let names_held: Vec<&String> = r.m.state().models.keys().collect();
    assert_eq!(names_held, ["a", "b"]);
}

#[test]
fn a_probation_failure_of_b_rolls_back_b_only() {
    let mut r = rig();
    let (a1, b1, b2) = (
        model(&r, "a", "1.0.0"),
        model(&r, "b", "1.0.0"),
        model(&r, "b", "2.0.0"),
    );
    healthy(&mut r, 1, &a1);
    healthy(&mut r, 2, &b1);
    install(&mut r, 3, &b2, DeployMode::Activate);
    r.now += PROBATION_MS;
    let probation = [("a".to_owned(), (0, 10)), ("b".to_owned(), (9, 1))].into();
    let e = r.handle(Input::Tick(Observed {
        probation,
        last_request_id: 0,
    }));
    assert_eq!(served_names(&e), ["b"]);
    let e = r.handle(Input::Loaded { model: b1.digest() });
    assert_eq!(served_names(&e), ["b"]);
    assert_eq!(phases(&e), [Phase::RolledBack]);
    let s = r.m.state();
    assert_eq!(
        s.slot("b").unwrap().active.as_ref().unwrap().model,
        b1.model_ref()
    );
    assert_eq!(
        s.slot("a").unwrap().active.as_ref().unwrap().model,
        a1.model_ref()
    );
    assert_eq!(
        s.slot("a").unwrap().active.as_ref().unwrap().state,
        SlotState::Healthy
    );
}

#[test]
fn a_rollback_of_a_leaves_b_alone() {
    let mut r = rig();
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        model(&r, "a", "2.0.0"),
        model(&r, "b", "1.0.0"),
    );
    healthy(&mut r, 1, &a1);
    healthy(&mut r, 2, &a2);
    healthy(&mut r, 3, &b1);
    let b_before = r.m.state().slot("b").cloned();
    let rollback = Action::RollbackModel {
        model: "a".into(),
        to: None,
    };
    let e = commanded(&mut r, 4, rollback);
    assert_eq!(served_names(&e), ["a"]);
    let e = r.handle(Input::Loaded { model: a1.digest() });
    assert_eq!(served_names(&e), ["a"]);
    assert_eq!(phases(&e), [Phase::Done]);
    let s = r.m.state();
    assert_eq!(
        s.slot("a").unwrap().active.as_ref().unwrap().model,
        a1.model_ref()
    );
    assert_eq!(s.slot("b").cloned(), b_before);
    // Protocol 1's Rollback names its target, so it finds the slot too; without one it
    // is ambiguous on a device with two models.
    let e = commanded(&mut r, 5, Action::Rollback { to: None });
    let (_, phase, detail) = progress(&e).pop().unwrap();
    assert_eq!(phase, Phase::Failed);
    assert!(detail.unwrap().contains("serves 2 models (a, b)"));
    let e = commanded(
        &mut r,
        6,
        Action::Rollback {
            to: Some(a1.model_ref()),
        },
    );
    assert_eq!(phases(&e), [Phase::Received, Phase::Done]);
    assert!(served_names(&e).is_empty());
}

#[test]
fn promote_model_promotes_that_slot_s_shadow() {
    let mut r = rig();
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        model(&r, "a", "2.0.0"),
        model(&r, "b", "1.0.0"),
    );
    healthy(&mut r, 1, &a1);
    healthy(&mut r, 2, &b1);
    let e = install(&mut r, 3, &a2, DeployMode::Shadow);
    assert_eq!(served_names(&e), ["a"]);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::ShadowLoaded { model } if model == "a")));
    let e = commanded(&mut r, 4, Action::PromoteModel { model: "b".into() });
    assert_eq!(phases(&e), [Phase::Received, Phase::Failed]);
    let e = commanded(&mut r, 5, Action::PromoteModel { model: "a".into() });
    assert_eq!(served_names(&e), ["a"]);
    assert!(
        matches!(e.iter().find(|e| matches!(e, Effect::PromoteShadow { .. })), Some(Effect::PromoteShadow { model }) if model == "a")
    );
    let s = r.m.state();
    assert_eq!(
        s.slot("a").unwrap().active.as_ref().unwrap().model,
        a2.model_ref()
    );
    assert_eq!(
        s.slot("b").unwrap().active.as_ref().unwrap().model,
        b1.model_ref()
    );
}

#[test]
fn a_deploy_of_one_slot_does_not_supersede_another_slot_s_download() {
    let mut r = rig();
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        model(&r, "a", "2.0.0"),
        model(&r, "b", "1.0.0"),
    );
    deploy(&mut r, 1, &a1, DeployMode::Activate);
    opened(&mut r, &a1, Stored::Chunks(vec![false; 3]));
    let e = deploy(&mut r, 2, &b1, DeployMode::Activate);
    assert_eq!(phases(&e), [Phase::Received], "{:?}", names(&e));
    opened(&mut r, &b1, Stored::Chunks(vec![false; 3]));
    // Both downloads go on: a chunk of either is written.
    let e = chunk(&mut r, &a1, 0);
    assert!(
        names(&e).iter().any(|n| n.starts_with("write")),
        "{:?}",
        names(&e)
    );
    let e = chunk(&mut r, &b1, 0);
    assert!(
        names(&e).iter().any(|n| n.starts_with("write")),
        "{:?}",
        names(&e)
    );
    let s = r.m.state();
    assert_eq!(
        s.slot("a").unwrap().pending.as_ref().unwrap().model,
        a1.model_ref()
    );
    assert_eq!(
        s.slot("b").unwrap().pending.as_ref().unwrap().model,
        b1.model_ref()
    );
    // A newer deploy of A supersedes A's download only.
    let e = deploy(&mut r, 3, &a2, DeployMode::Activate);
    assert_eq!(
        progress(&e)[1],
        (1, Phase::Failed, Some("superseded by command 3".into()))
    );
    let s = persisted(&e).unwrap();
    assert_eq!(
        s.slot("a").unwrap().pending.as_ref().unwrap().model,
        a2.model_ref()
    );
    assert_eq!(
        s.slot("b").unwrap().pending.as_ref().unwrap().model,
        b1.model_ref()
    );
    opened(&mut r, &a2, Stored::Chunks(vec![false; 3]));
    let e = chunk(&mut r, &b1, 1);
    assert!(
        names(&e).iter().any(|n| n.starts_with("write")),
        "{:?}",
        names(&e)
    );
    assert!(r.handle(Input::Chunk(a1.chunk(1))).is_empty());
}

#[test]
fn remove_model_unloads_the_slot_and_supersedes_its_download_only() {
    let mut r = rig();
    let (a1, b1, b2) = (
        model(&r, "a", "1.0.0"),
        model(&r, "b", "1.0.0"),
        model(&r, "b", "2.0.0"),
    );
    healthy(&mut r, 1, &a1);
    healthy(&mut r, 2, &b1);
    deploy(&mut r, 3, &b2, DeployMode::Activate);
    opened(&mut r, &b2, Stored::Chunks(vec![false; 3]));
    let e = commanded(&mut r, 4, Action::RemoveModel { model: "b".into() });
    assert_eq!(
        phases(&e),
        [Phase::Received, Phase::Failed, Phase::Done],
        "{:?}",
        names(&e)
    );
    assert_eq!(served_names(&e), ["b"]);
    assert!(
        matches!(e.iter().rev().find(|e| matches!(e, Effect::Unload { .. })), Some(Effect::Unload { model }) if model == "b")
    );
    let s = persisted(&e).unwrap();
    assert!(s.slot("b").is_none());
    assert_eq!(
        s.slot("a").unwrap().active.as_ref().unwrap().model,
        a1.model_ref()
    );
    // Removing it again changes nothing and says so.
    let e = commanded(&mut r, 5, Action::RemoveModel { model: "b".into() });
    let (_, phase, detail) = progress(&e).pop().unwrap();
    assert_eq!(phase, Phase::Done);
    assert!(detail.unwrap().starts_with("nothing to remove"));
    assert!(served_names(&e).is_empty());
}

#[test]
fn a_deploy_past_max_models_is_refused_before_download_until_a_model_is_removed() {
    let mut r = rig_budget(ModelBudget {
        max_models: Some(1),
        ..ModelBudget::default()
    });
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        model(&r, "a", "2.0.0"),
        model(&r, "b", "1.0.0"),
    );
    healthy(&mut r, 1, &a1);
    let e = deploy(&mut r, 2, &b1, DeployMode::Activate);
    assert_eq!(
        progress(&e).pop().unwrap(),
        (
            2,
            Phase::Refused,
            Some(
                "model \"b\" 1.0.0 needs a model slot of its own, but the device holds 1 of its 1 \
                 (a); remove a model or raise [models] max_models"
                    .into()
            )
        )
    );
    assert!(!e.iter().any(Effect::is_ask), "{:?}", names(&e));
    assert!(r.m.state().slot("b").is_none());
    // A new version of the model it holds still fits.
    let e = deploy(&mut r, 3, &a2, DeployMode::Activate);
    assert!(matches!(e.last(), Some(Effect::OpenDownload { .. })));
    commanded(&mut r, 4, Action::RemoveModel { model: "a".into() });
    let e = deploy(&mut r, 5, &b1, DeployMode::Activate);
    assert!(
        matches!(e.last(), Some(Effect::OpenDownload { manifest_digest, .. }) if *manifest_digest == b1.digest())
    );
}

#[test]
fn a_deploy_past_the_disk_budget_is_refused_with_the_figures_before_download() {
    let mut r = rig_budget(ModelBudget {
        disk_bytes: Some(8 * 1024),
        ..ModelBudget::default()
    });
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        // Another version length: other bytes, so a second file.
        model(&r, "a", "10.0.0"),
        TestModel::named(&r.signer, "b", "1.0.0", 3 * 1024),
    );
    assert_ne!(a1.manifest.sha256, a2.manifest.sha256);
    healthy(&mut r, 1, &a1);
    healthy(&mut r, 2, &a2);
    // a holds 2 x 3000 bytes (active and previous): 2192 bytes left of 8192.
    let e = deploy(&mut r, 3, &b1, DeployMode::Activate);
    assert_eq!(
        progress(&e).pop().unwrap().2.unwrap(),
        "model \"b\" 1.0.0 needs 3.0 KiB on disk, the budget leaves 2.1 KiB of 8.0 KiB; \
         remove a model or raise [models] disk_bytes"
    );
    assert!(!e.iter().any(Effect::is_ask));
    assert!(uplinks(&e)
        .iter()
        .all(|u| !matches!(u, Uplink::ChunkRequest(_))));
    commanded(&mut r, 4, Action::RemoveModel { model: "a".into() });
    let e = deploy(&mut r, 5, &b1, DeployMode::Activate);
    assert!(matches!(e.last(), Some(Effect::OpenDownload { .. })));
}

#[test]
fn a_deploy_past_the_memory_budget_is_refused_but_a_replacement_fits() {
    let one = memory_estimate(&model(&rig(), "a", "1.0.0").manifest);
    let mut r = rig_budget(ModelBudget {
        memory_bytes: Some(one + one / 2),
        ..ModelBudget::default()
    });
    let (a1, a2, b1) = (
        model(&r, "a", "1.0.0"),
        model(&r, "a", "2.0.0"),
        model(&r, "b", "1.0.0"),
    );
    healthy(&mut r, 1, &a1);
    let e = deploy(&mut r, 2, &b1, DeployMode::Activate);
    let detail = progress(&e).pop().unwrap().2.unwrap();
    assert!(
        detail.contains("of memory loaded") && detail.ends_with("raise [models] memory_bytes"),
        "{detail}"
    );
    // A's next version replaces A's active one: it fits.
    let e = deploy(&mut r, 3, &a2, DeployMode::Activate);
    assert!(matches!(e.last(), Some(Effect::OpenDownload { .. })));
}

#[test]
fn the_models_report_is_sent_under_protocol_2_only_and_on_every_slot_change() {
    let mut r = rig_budget(ModelBudget {
        max_models: Some(4),
        ..ModelBudget::default()
    });
    let (a1, b1) = (model(&r, "a", "1.0.0"), model(&r, "b", "1.0.0"));
    // No HelloAck yet: protocol 1 is assumed, nothing is reported.
    let mut e = Vec::new();
    install(&mut r, 1, &a1, DeployMode::Activate);
    e.extend(hello_ack(&mut r, 1));
    assert!(models_reports(&e).is_empty());
    assert_eq!(r.m.protocol(), 1);
    // An old control plane: the agent behaves as before and never reports slots.
    r.now += PROBATION_MS;
    e.extend(r.tick(0, 10));
    e.extend(install(&mut r, 2, &b1, DeployMode::Activate));
    assert!(models_reports(&e).is_empty());
    // A control plane that negotiates 2: the report at once, with every slot and budget.
    let e = hello_ack(&mut r, 2);
    let reports = models_reports(&e);
    assert_eq!(reports.len(), 1);
    let names: Vec<&str> = reports[0].slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(reports[0].slots[0].active, Some(a1.model_ref()));
    assert_eq!(reports[0].slots[0].disk_bytes, 3000);
    assert_eq!(
        reports[0].slots[0].memory_bytes,
        memory_estimate(&a1.manifest)
    );
    assert_eq!(reports[0].budget.max_models, Some(4));
    // Nothing changed: no report; a slot changes: a report.
    assert!(models_reports(&r.tick(0, 10)).is_empty());
    let e = commanded(&mut r, 3, Action::RemoveModel { model: "a".into() });
    let reports = models_reports(&e);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].slots.len(), 1);
    // A reconnect forgets the negotiation until the next HelloAck.
    r.handle(Input::Disconnected);
    let e = r.handle(Input::Connected);
    assert!(models_reports(&e).is_empty());
    assert_eq!(r.m.protocol(), 1);
    assert_eq!(models_reports(&hello_ack(&mut r, 2)).len(), 1);
}
