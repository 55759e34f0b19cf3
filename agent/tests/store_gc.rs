//! The model store keeps only what the record names (issue 24, fault 6): after a series
//! of deploys of distinct models, `blobs/` holds the active and the previous model and
//! `downloads/` nothing. A configured budget (`store.max_bytes`) refuses a deploy that
//! would exceed it before downloading (fault 4).

mod common;

use common::*;
use drover_protocol::manifest::{chunk_hashes, Lineage, Manifest};
use drover_protocol::messages::{DeployMode, Phase, Uplink};
use drover_protocol::topics::hex32;
use drover_protocol::trust::sha256;

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_model_files_are_collected_after_each_deploy() {
    let mut h = Harness::start("gw-gc", |_| {}).await;
    let models: Vec<Published> = ["dense_v1", "dense_v2", "cnn", "forest", "dense_v1"]
        .iter()
        .enumerate()
        .map(|(i, f)| publish(&h.keys, f, "m", &format!("{i}.0.0"), 1024))
        .collect();
    for m in &models {
        let c = h.deploy(m, DeployMode::Activate).await;
        h.cp.wait_phase(c.digest(), Phase::Healthy).await;
    }
    let dir = h.dir.path().to_owned();
    // Active: the last (dense_v1's bytes); previous: forest.
    let mut want = vec![
        format!("{}.onnx", hex32(&models[4].manifest.sha256)),
        format!("{}.onnx", hex32(&models[3].manifest.sha256)),
    ];
    want.sort();
    assert_eq!(names(&dir.join("blobs")), want);
    assert_eq!(names(&dir.join("downloads")), Vec::<String>::new());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_over_the_store_budget_is_refused_before_downloading() {
    let mut h = Harness::start("gw-budget", |c| c.store.max_bytes = 1 << 20).await;
    let bytes = vec![3u8; 2 << 20];
    let manifest = Manifest {
        name: "big".into(),
        version: "1.0.0".into(),
        sha256: sha256(&bytes),
        size: bytes.len() as u64,
        chunk_size: 64 * 1024,
        chunk_hashes: chunk_hashes(&bytes, 64 * 1024),
        inputs: vec![],
        outputs: vec![],
        baseline: None,
        test_vectors: vec![],
        lineage: Lineage::default(),
        created_at_ms: 0,
        sampled_vectors: vec![],
        artifact: None,
    };
    let blob = h.keys.signer.sign_manifest(&manifest);
    let big = Published {
        name: "big".into(),
        version: "1.0.0".into(),
        bytes,
        manifest,
        blob,
    };
    let c = h.deploy(&big, DeployMode::Activate).await;
    let detail =
        h.cp.wait_for("the deploy to fail", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p) if p.command_digest == c.digest() => {
                    (p.phase == Phase::Failed).then(|| p.detail.clone())
                }
                _ => None,
            })
        })
        .await;
    assert_eq!(
        detail.as_deref(),
        Some(
            "over the model store's disk budget: the model needs 2097152 more bytes, \
             the store holds 0 of 1048576 bytes (store.max_bytes)"
        )
    );
    let asked = h.cp.seen.lock().unwrap().chunk_requests.clone();
    assert!(asked.iter().all(|(_, d, _)| *d != big.digest()));
    h.stop().await;
}
