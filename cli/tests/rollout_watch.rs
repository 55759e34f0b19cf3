//! `drover rollout watch` run as a binary (issue 18): its exit code and final frame match
//! how the rollout ended, and it keeps polling across a control-plane restart. Devices are
//! enrolled but never connect, so rollouts only move when an operator moves them.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

fn watch(data: &Path, id: u64, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    c.args(["rollout", "watch", &id.to_string(), "--interval", "100ms"])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .stdin(Stdio::null());
    c
}

async fn run(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

async fn start_rollout(api: &Api) -> u64 {
    let plan = json!({"model": "m@1.0.0", "selector": "all",
        "waves": [{"percent": 50, "bake": "1h"}, {"percent": 100}]});
    let (status, r) = api.post("/v1/rollouts", &plan).await;
    assert_eq!(status, 201, "{r}");
    r["id"].as_u64().unwrap()
}

async fn wait_status(api: &Api, id: u64, want: &str) {
    eventually(&format!("rollout {id} {want}"), || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await;
        (r["status"] == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exit_codes_and_final_frames_match_the_outcome_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let server = start(&data).await;
    let api = Api::new(&server);
    for id in ["gw-1", "gw-2", "gw-3", "gw-4"] {
        api.enroll(id, &[("site", "a")]).await;
    }
    let model = dense_model(8, 3, 5, "MatMul");
    let body = json!({"name": "m", "version": "1.0.0", "model_hex": hex::encode(&model)});
    assert_eq!(api.post("/v1/models", &body).await.0, 201);

    // Paused: exit 10; the JSON stream's last line is the final state.
    let id = start_rollout(&api).await;
    assert_eq!(
        api.post(&format!("/v1/rollouts/{id}/pause"), &json!({}))
            .await
            .0,
        200
    );
    let out = run(watch(&data, id, &["--output", "json"])).await;
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "paused");

    // Aborted: exit 12, and the final frame shows the real counts, not full bars.
    assert_eq!(
        api.post(&format!("/v1/rollouts/{id}/abort"), &json!({}))
            .await
            .0,
        200
    );
    wait_status(&api, id, "aborted").await;
    let out = run(watch(&data, id, &[])).await;
    assert_eq!(out.status.code(), Some(12), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("rollout {id}  m@1.0.0  aborted")),
        "{text}"
    );
    assert!(text.contains("reason: aborted by"), "{text}");
    // Wave 1 adds 2 of 4 devices, none healthy; wave 2 was never reached.
    let wave1 = text
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap();
    let cols: Vec<&str> = wave1.split_whitespace().collect();
    assert_eq!(&cols[..5], &["1", "2", "2", "2", "0"], "{wave1}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("rollout {id} ended aborted")),
        "{stderr}"
    );

    // Across a restart: the watcher keeps polling, finds the new server's address in
    // the data directory, and exits by the outcome it then sees.
    let id = start_rollout(&api).await;
    let mut follower = watch(&data, id, &["--output", "json", "--give-up-after", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = collect(follower.stdout.take().unwrap());
    let stderr = collect(follower.stderr.take().unwrap());
    eventually("the watcher's first frame", || async {
        (!stdout.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    server.shutdown().await;
    eventually("the watcher retries while the server is down", || async {
        stderr.lock().unwrap().contains("retrying").then_some(())
    })
    .await;
    let server = start(&data).await;
    let api = Api::new(&server);
    assert_eq!(
        api.post(&format!("/v1/rollouts/{id}/abort"), &json!({}))
            .await
            .0,
        200
    );
    let status = tokio::task::spawn_blocking(move || follower.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(12), "{}", stderr.lock().unwrap());
    let out = stdout.lock().unwrap().clone();
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "aborted");
    server.shutdown().await;
}

/// Everything `r` yields, gathered by a thread as it comes.
fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut g = b.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    buf
}
