//! The device's runtime (protocol 3): its `Runtime` report, and deploys of a model file it
//! cannot load refused before any chunk is asked for.

use super::tests::*;
use super::tests_deploy::deploy;
use super::*;
use drover_protocol::manifest::Artifact;
use drover_protocol::messages::{ArtifactFormat, HelloAck};

fn ack(r: &mut Rig, protocol_version: u16) -> Vec<Effect> {
    r.handle(Input::Downlink(Downlink::HelloAck(HelloAck {
        protocol_version,
        server_time_ms: 0,
        stored_up_to: 0,
    })))
}

fn runtime_reports(effects: &[Effect]) -> Vec<RuntimeReport> {
    (uplinks(effects).into_iter())
        .filter_map(|u| match u {
            Uplink::Runtime(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// A model whose manifest says it was compiled by `runtime` in format version `format`.
fn compiled(r: &Rig, runtime: &str, format: u32) -> TestModel {
    let mut m = TestModel::named(&r.signer, "vision", "1.0.0", 3000);
    m.manifest.artifact = Some(Artifact {
        format: "tract-nnef".into(),
        format_version: format,
        runtime_version: runtime.into(),
        source_sha256: [7; 32],
    });
    m.blob = r.signer.sign_manifest(&m.manifest);
    m
}

fn rig_with_formats(formats: &[(&str, u32)]) -> Rig {
    let mut r = rig();
    let mut cfg = config();
    cfg.runtime.formats = (formats.iter())
        .map(|(f, v)| ArtifactFormat {
            format: (*f).into(),
            version: *v,
        })
        .collect();
    let (state, trust) = (r.m.state().clone(), r.m.trust().clone());
    r.m = Machine::new(cfg, state, trust, r.m.next_seq(), r.now);
    r.handle(Input::Start);
    r.handle(Input::Connected);
    r
}

#[test]
fn the_runtime_is_reported_only_under_a_negotiated_protocol_3() {
    let mut r = rig();
    assert_eq!(runtime_reports(&ack(&mut r, 2)), vec![]);
    assert_eq!(runtime_reports(&ack(&mut r, 3)), vec![config().runtime]);
    // Every new session reports it again (the control plane may have lost it).
    r.handle(Input::Disconnected);
    r.handle(Input::Connected);
    assert_eq!(runtime_reports(&ack(&mut r, 3)), vec![config().runtime]);
}

#[test]
fn an_artifact_from_a_newer_runtime_is_refused_before_any_chunk() {
    let mut r = rig();
    let newer = compiled(&r, "0.24.0", 1);
    let e = deploy(&mut r, 1, &newer, DeployMode::Activate);
    let (seq, phase, detail) = progress(&e).pop().unwrap();
    assert_eq!((seq, phase), (1, Phase::Refused));
    let detail = detail.unwrap();
    assert!(
        detail.contains("0.24.0") && detail.contains("0.23.9"),
        "{detail}"
    );
    assert!(!e.iter().any(|e| matches!(e, Effect::OpenDownload { .. })));
    assert!(r.m.state().slot("vision").is_none());
    // The same model compiled by this runtime's version downloads.
    let same = compiled(&r, "0.23.9", 1);
    let e = deploy(&mut r, 2, &same, DeployMode::Activate);
    assert!(
        matches!(e.last(), Some(Effect::OpenDownload { .. })),
        "{:?}",
        names(&e)
    );
}

#[test]
fn a_plain_onnx_file_is_refused_by_an_agent_without_the_importer() {
    let mut r = rig_with_formats(&[("tract-nnef", 1)]);
    let onnx = TestModel::named(&r.signer, "vision", "1.0.0", 3000);
    let e = deploy(&mut r, 1, &onnx, DeployMode::Activate);
    let (_, phase, detail) = progress(&e).pop().unwrap();
    assert_eq!(phase, Phase::Refused);
    assert!(detail.unwrap().contains("compiled models only"));
    assert!(!e.iter().any(|e| matches!(e, Effect::OpenDownload { .. })));
    let same = compiled(&r, "0.23.9", 1);
    let e = deploy(&mut r, 2, &same, DeployMode::Activate);
    assert!(matches!(e.last(), Some(Effect::OpenDownload { .. })));
}
