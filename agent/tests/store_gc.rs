//! The model store keeps only what the record names (issue 24, fault 6): after a series
//! of deploys of distinct models, `blobs/` holds the active and the previous model and
//! `downloads/` nothing.

mod common;

use common::*;
use drover_protocol::messages::{DeployMode, Phase};
use drover_protocol::topics::hex32;

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
