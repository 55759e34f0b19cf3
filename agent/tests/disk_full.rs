//! Disk full on the agent (issue 24, fault 4), with the real `drover-agent` binary and its
//! data dir (state, model store, spool) on a 2 MiB tmpfs:
//! - a deploy that cannot fit is refused before a byte is downloaded, with the figures;
//! - on a full disk a command whose acceptance cannot be persisted is not acted on, the
//!   failure is reported and counted (`/metrics`, spool drops in telemetry);
//! - a SIGKILL and a restart on the full disk keep serving the active model;
//! - no temp file is left behind, and once there is room the command goes through.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Without it the test runs itself again inside
//! a user and mount namespace (`unshare -rm`); where that is impossible too it says why
//! and passes, unless `DROVER_REQUIRE_PEERS=1`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use drover_agent::state::State;
use drover_protocol::manifest::{chunk_hashes, Lineage, Manifest};
use drover_protocol::messages::{Phase, Uplink};
use drover_protocol::trust::sha256;

const DEVICE: &str = "gw-diskfull";
const TEST: &str =
    "a_full_disk_refuses_what_cannot_fit_acts_on_nothing_unpersisted_and_keeps_serving";
/// Set in the copy of this test that runs inside `unshare -rm`.
const IN_NAMESPACE: &str = "DROVER_DISK_FULL_IN_NAMESPACE";

/// Runs this test again inside a user and mount namespace, where an unprivileged user
/// may mount a tmpfs. `Ok(())` when it ran and passed; `Err` when it could not run.
fn rerun_in_namespace() -> Result<(), String> {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return Err("no tmpfs inside the namespace either".into());
    }
    let status = Command::new("unshare")
        .args(["-rm", "--"])
        .arg(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["--exact", TEST, "--nocapture"])
        .env(IN_NAMESPACE, "1")
        .status()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    match status.code() {
        Some(0) => Ok(()),
        // The test harness's exit code for a failed test.
        Some(101) => panic!("the test failed inside `unshare -rm`"),
        _ => Err(format!("`unshare -rm` is not available: {status}")),
    }
}

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The agent, its inference API's base URL and its metrics listener's.
fn spawn(config: &Path) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .arg("--config")
        .arg(config)
        .args(["--probation-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut addr = |key: &str| {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line.trim()
            .strip_prefix(key)
            .unwrap_or_else(|| panic!("agent did not start: stdout {line:?}"))
            .to_owned()
    };
    let api = addr("api_addr=");
    let metrics = addr("metrics_addr=");
    (child, format!("http://{api}"), format!("http://{metrics}"))
}

/// A model of `size` bytes: never downloaded, so its content does not matter.
fn big_model(keys: &Keys, size: usize) -> Published {
    let bytes = vec![7u8; size];
    let manifest = Manifest {
        name: "dense".into(),
        version: "9.0.0".into(),
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
    let blob = keys.signer.sign_manifest(&manifest);
    Published {
        name: "dense".into(),
        version: "9.0.0".into(),
        bytes,
        manifest,
        blob,
    }
}

/// Fills the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    while f.write_all(&[0]).is_ok() {}
    let _ = f.sync_all();
    p
}

fn files(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            files(&e.path(), out);
        } else {
            out.push(e.path().display().to_string());
        }
    }
}

async fn served_version(http: &reqwest::Client, base: &str, body: &serde_json::Value) -> String {
    loop {
        if let Ok(r) = http
            .post(format!("{base}/v2/models/dense/infer"))
            .json(body)
            .send()
            .await
        {
            if r.status() == 200 {
                let v: serde_json::Value = r.json().await.unwrap();
                return v["model_version"].as_str().unwrap().to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_cannot_fit_acts_on_nothing_unpersisted_and_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let _tmpfs = match Tmpfs::mount(&data, "2m") {
        Ok(t) => t,
        Err(e) => {
            let e = match rerun_in_namespace() {
                Ok(()) => return,
                Err(why) => format!("{e}; {why}"),
            };
            if std::env::var("DROVER_REQUIRE_PEERS").as_deref() == Ok("1") {
                panic!("cannot mount a tmpfs (DROVER_REQUIRE_PEERS=1): {e}");
            }
            eprintln!("skipped: cannot mount a tmpfs for the agent's data dir: {e}");
            return;
        }
    };
    let port = start_broker();
    let keys = Arc::new(Keys::new());
    let cp = ControlPlane::start(port, DEVICE, keys.clone()).await;
    let v1 = publish(&keys, "dense_v1", "dense", "1.0.0", 1024);
    let v2 = publish(&keys, "dense_v2", "dense", "2.0.0", 1024);
    let big = big_model(&keys, 3 << 20);
    for m in [&v1, &v2, &big] {
        cp.add_model(m);
    }
    let mut cfg = agent_config(&data, DEVICE, port, &keys);
    cfg.telemetry.interval_ms = 200;
    let config = root.path().join("agent.toml");
    std::fs::write(&config, cfg.to_toml().unwrap()).unwrap();
    let http = reqwest::Client::new();
    let body = infer_body(&reference("dense_v1").0);

    // Sent after the hello (and the keyring), as the control plane does.
    let c1 = deploy_command(&keys, DEVICE, 1, &v1);
    cp.behaviour.lock().unwrap().commands.push((1, c1.clone()));
    let (mut agent, base, metrics) = spawn(&config);
    cp.wait_phase(c1.digest(), Phase::Healthy).await;

    // 1. Cannot fit: refused before downloading, with the figures.
    let c2 = deploy_command(&keys, DEVICE, 2, &big);
    cp.command(2, c2.clone()).await;
    let failed = cp
        .wait_for("the big deploy to fail", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p) if p.command_digest == c2.digest() => {
                    (p.phase == Phase::Failed).then(|| p.detail.clone().unwrap_or_default())
                }
                _ => None,
            })
        })
        .await;
    eprintln!("big deploy: {failed}");
    assert!(
        failed.starts_with(&format!(
            "not enough disk space: the model needs {} more bytes (+1048576 reserve), ",
            3 << 20
        )) && failed.contains(" bytes free in "),
        "{failed}"
    );
    let asked = cp.seen.lock().unwrap().chunk_requests.clone();
    assert!(
        !asked.iter().any(|(_, d, _)| *d == big.digest()),
        "chunks of a model that cannot fit were requested"
    );
    let downloads = data.join("downloads");
    let mut left = Vec::new();
    if downloads.exists() {
        files(&downloads, &mut left);
    }
    assert!(left.is_empty(), "partial download left: {left:?}");

    // 2. A full disk: the next command is not acted on; the failure is reported. Nothing
    // may free space meanwhile: no acks (the spool keeps every record; its cap is above
    // the disk's size, so it evicts nothing either).
    cp.behaviour.lock().unwrap().ack = false;
    let filler = fill(&data);
    // Telemetry cannot be spooled either: every lost record is counted.
    cp.wait_for("telemetry counting spool drops", |s| {
        s.frames.iter().find_map(|f| match &f.msg {
            Uplink::Telemetry(t) if t.spool_dropped > 0 => Some(()),
            _ => None,
        })
    })
    .await;
    // Acks sent before they were turned off may have freed a block meanwhile.
    fill(&data);
    let c3 = deploy_command(&keys, DEVICE, 3, &v2);
    cp.command(3, c3.clone()).await;
    let detail = cp
        .wait_for("the unpersisted command to be reported", |s| {
            s.frames.iter().find_map(|f| match &f.msg {
                Uplink::Progress(p) if p.command_digest == c3.digest() => {
                    assert_eq!(p.phase, Phase::Failed, "{:?}", p.detail);
                    p.detail.clone()
                }
                _ => None,
            })
        })
        .await;
    assert!(
        detail.starts_with("not acted on: cannot persist agent state: "),
        "{detail}"
    );
    assert_eq!(State::load(&data).unwrap().last_command_seq, 2);
    assert_eq!(served_version(&http, &base, &body).await, "1.0.0");
    assert_eq!(metric(&http, &metrics, "drover_agent_disk_full").await, 1);
    assert!(metric(&http, &metrics, "drover_agent_state_write_failures_total").await >= 1);
    assert!(metric(&http, &metrics, "drover_agent_spool_dropped_total").await >= 1);

    // 3. SIGKILL and restart on the full disk: it serves the active model.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let (mut agent, base, _) = spawn(&config);
    assert_eq!(served_version(&http, &base, &body).await, "1.0.0");
    assert_eq!(agent.try_wait().unwrap(), None, "the agent exited");

    // 4. No temp file of a failed write is left behind.
    let mut all = Vec::new();
    files(&data, &mut all);
    let temps: Vec<_> = all.iter().filter(|f| f.ends_with(".tmp")).collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");

    // 5. With room again, the control plane's re-sent command goes through.
    std::fs::remove_file(filler).unwrap();
    cp.behaviour.lock().unwrap().ack = true;
    agent.kill().unwrap();
    agent.wait().unwrap();
    *cp.seen.lock().unwrap() = Default::default();
    let (mut agent, base, _) = spawn(&config);
    cp.wait_phase(c3.digest(), Phase::Healthy).await;
    assert_eq!(served_version(&http, &base, &body).await, "2.0.0");
    // Only what the record keeps is in the store: v2 (active) and v1 (previous).
    let mut store = Vec::new();
    files(&data.join("blobs"), &mut store);
    assert_eq!(store.len(), 2, "{store:?}");
    agent.kill().unwrap();
    agent.wait().unwrap();
}
