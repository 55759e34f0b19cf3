//! Crash test: the real `drover-agent` binary is SIGKILLed at 20+ points of download,
//! verify and activate (hidden `--crash-at POINT:N`). After each restart it serves a
//! verified model at once, finishes the update, and never re-fetches a verified chunk.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drover_agent::download::verified_chunks;
use drover_agent::state::State;
use drover_protocol::messages::Phase;

const DEVICE: &str = "gw-crash";

/// Every point the agent is killed at, with the pass number.
const POINTS: &[&str] = &[
    "command.after_seq_persist:1",
    "deploy.after_pending_persist:1",
    "download.before_chunk_write:1",
    "download.before_chunk_write:4",
    "download.after_chunk_write:1",
    "download.after_chunk_write:6",
    "download.after_bitmap_write:1",
    "download.after_bitmap_write:3",
    "download.after_bitmap_write:10",
    "download.before_blob_rename:1",
    "download.after_blob_rename:1",
    "deploy.after_verify:1",
    "deploy.after_selftest:1",
    "activate.before_state_persist:1",
    "activate.after_state_persist:1",
    "activate.after_swap:1",
    "healthy.before_persist:1",
    "healthy.after_persist:1",
    "fs.after_tmp_write:1",
    "fs.after_tmp_write:4",
    "fs.after_tmp_write:9",
    "fs.after_tmp_write:16",
];

fn write_config(dir: &Path, port: u16, keys: &Keys) -> std::path::PathBuf {
    let cfg = agent_config(dir, DEVICE, port, keys);
    let path = dir.join("agent.toml");
    std::fs::write(&path, cfg.to_toml().unwrap()).unwrap();
    path
}

fn spawn(config: &Path, crash_at: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover-agent"));
    cmd.arg("--config")
        .arg(config)
        .args(["--probation-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(c) = crash_at {
        cmd.args(["--crash-at", c]);
    }
    cmd.spawn().unwrap()
}

/// Reads the API address the agent prints on stdout.
fn api_addr(child: &mut Child) -> String {
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("api_addr=")
        .unwrap_or_else(|| panic!("unexpected stdout {line:?}"))
        .to_owned()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not reach its crash point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &p);
        } else {
            std::fs::copy(e.path(), p).unwrap();
        }
    }
}

async fn infer_version(
    http: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> Option<(String, Vec<f32>)> {
    let r = http
        .post(format!("{base}/v2/models/dense/infer"))
        .json(body)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: serde_json::Value = r.json().await.ok()?;
    Some((v["model_version"].as_str()?.to_owned(), first_output(&v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_point_of_an_update_leaves_a_verified_model_and_resumes() {
    assert!(POINTS.len() >= 20);
    let port = start_broker();
    let keys = Arc::new(Keys::new());
    let cp = ControlPlane::start(port, DEVICE, keys.clone()).await;
    let v1 = publish(&keys, "dense_v1", "dense", "1.0.0", 1024);
    let v2 = publish(&keys, "dense_v2", "dense", "2.0.0", 1024);
    assert!(v2.manifest.chunk_count() >= 10);
    cp.add_model(&v1);
    cp.add_model(&v2);
    let (in1, _) = reference("dense_v1");
    let body = infer_body(&in1);
    let expect_v1 = drover_runtime::Model::load(&v1.bytes)
        .unwrap()
        .run(&in1)
        .unwrap();
    let expect_v2 = drover_runtime::Model::load(&v2.bytes)
        .unwrap()
        .run(&in1)
        .unwrap();
    let http = reqwest::Client::new();

    // Template: an agent that runs v1, healthy.
    let root = tempfile::tempdir().unwrap();
    let template = root.path().join("template");
    std::fs::create_dir_all(&template).unwrap();
    let c1 = deploy_command(&keys, DEVICE, 1, &v1);
    cp.command(1, c1.clone()).await;
    let mut child = spawn(&write_config(&template, port, &keys), None);
    let _ = api_addr(&mut child);
    cp.wait_phase(c1.digest(), Phase::Healthy).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let c2 = deploy_command(&keys, DEVICE, 2, &v2);
    cp.behaviour.lock().unwrap().commands.push((2, c2.clone()));
    for (i, point) in POINTS.iter().enumerate() {
        let dir = root.path().join(format!("run-{i}"));
        copy_dir(&template, &dir);
        let config = write_config(&dir, port, &keys);
        *cp.seen.lock().unwrap() = Default::default();

        // Run until the crash point kills the process.
        let mut child = spawn(&config, Some(point));
        let status = wait_exit(&mut child);
        assert_eq!(
            status.signal(),
            Some(9),
            "{point}: agent was not SIGKILLed: {status:?}"
        );
        let verified = verified_chunks(&dir, &v2.digest());
        let floor = State::load(&dir).unwrap().uplink_seq_reserved;

        // Restart: it serves a verified model at once...
        let mut child = spawn(&config, None);
        let base = format!("http://{}", api_addr(&mut child));
        let (version, out) = loop {
            if let Some(r) = infer_version(&http, &base, &body).await {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let want = if version == "1.0.0" {
            &expect_v1
        } else {
            &expect_v2
        };
        assert!(
            close(&out, &f32s(&want[0])),
            "{point}: wrong output for {version}"
        );

        // ...finishes the update...
        cp.wait_phase(c2.digest(), Phase::Healthy).await;
        let (version, out) = infer_version(&http, &base, &body).await.unwrap();
        assert_eq!(version, "2.0.0", "{point}");
        assert!(close(&out, &f32s(&expect_v2[0])), "{point}");

        // ...without re-fetching a chunk verified before the crash.
        let refetched: Vec<u32> = cp
            .seen
            .lock()
            .unwrap()
            .chunk_requests
            .iter()
            .filter(|(seq, d, _)| *seq > floor && *d == v2.digest())
            .flat_map(|(_, _, idx)| idx.iter().copied())
            .filter(|i| verified.contains(i))
            .collect();
        assert!(
            refetched.is_empty(),
            "{point}: re-fetched verified chunks {refetched:?}"
        );
        eprintln!(
            "{point}: ok ({} chunks verified before the crash)",
            verified.len()
        );

        child.kill().unwrap();
        child.wait().unwrap();
    }
}
