//! Benchmark (not a test): the agent's peak RSS (VmHWM) while it handles one, then four
//! concurrent, ~62 MB KServe v2 JSON inference requests (issue 24, fault 8). Each figure
//! comes from a fresh `drover-agent` process, since VmHWM only grows.
//!
//! Run: `cargo bench -p drover-agent --bench request_memory`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use drover_agent::config::AgentConfig;
use drover_agent::download::blob_path;
use drover_agent::state::{Slot, SlotState, Slots, State};
use drover_protocol::manifest::{chunk_hashes, Lineage, Manifest};
use drover_protocol::messages::ModelRef;
use drover_protocol::topics::hex32;
use drover_protocol::trust::sha256;

/// Installs the dense fixture (`x`: [batch, 16] FP32) as the healthy active slot.
fn install(dir: &Path) {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dense_v1.onnx"),
    )
    .unwrap();
    let manifest = Manifest {
        name: "dense".into(),
        version: "1.0.0".into(),
        sha256: sha256(&bytes),
        size: bytes.len() as u64,
        chunk_size: 65536,
        chunk_hashes: chunk_hashes(&bytes, 65536),
        inputs: vec![],
        outputs: vec![],
        baseline: None,
        test_vectors: vec![],
        lineage: Lineage::default(),
        created_at_ms: 0,
        sampled_vectors: vec![],
        artifact: None,
    };
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(blob_path(dir, &manifest.sha256), &bytes).unwrap();
    State {
        models: [(
            "dense".to_owned(),
            Slots {
                active: Some(Slot {
                    model: ModelRef {
                        name: "dense".into(),
                        version: "1.0.0".into(),
                        digest: [7; 32],
                    },
                    manifest,
                    state: SlotState::Healthy,
                    unhealthy_boots: 0,
                    activated_by: None,
                }),
                ..Slots::default()
            },
        )]
        .into(),
        ..State::default()
    }
    .save(dir)
    .unwrap();
}

fn config(dir: &Path) -> AgentConfig {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    AgentConfig {
        device_id: "bench".into(),
        device_key: hex32(&[9; 32]),
        root_public_key: hex32(&drover_protocol::SecretKey::from_seed([1; 32]).public()),
        // Nothing listens here: the agent serves offline.
        broker_url: format!("mqtt://127.0.0.1:{port}"),
        data_dir: dir.to_owned(),
        api_addr: "127.0.0.1:0".into(),
        metrics_addr: "127.0.0.1:0".into(),
        ..AgentConfig::default()
    }
}

fn kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A request of about `target` bytes: rows of 16 numbers as Python's json writes floats.
fn body(target: usize) -> Vec<u8> {
    let row: Vec<String> = (0..16)
        .map(|i| format!("{}", 0.123_456_78 + i as f64))
        .collect();
    let row = row.join(", ");
    let rows = target / (row.len() + 2);
    let mut s = format!(
        "{{\"inputs\": [{{\"name\": \"x\", \"shape\": [{rows}, 16], \"datatype\": \"FP32\", \"data\": ["
    );
    s.reserve(target + 64);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push_str(&row);
    }
    s.push_str("]}]}");
    s.into_bytes()
}

/// Peak RSS of a fresh agent after `concurrent` copies of `body` at once; the statuses.
fn peak(rt: &tokio::runtime::Runtime, body: &[u8], concurrent: usize) -> (u64, u64, Vec<u16>) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path());
    let cfg_path = dir.path().join("agent.toml");
    std::fs::write(&cfg_path, config(dir.path()).to_toml().unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover-agent"))
        .arg("--config")
        .arg(&cfg_path)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line.trim().trim_start_matches("api_addr=").to_owned();
    let url = format!("http://{addr}/v2/models/dense/infer");
    let idle = kb(child.id(), "VmRSS:");
    let statuses = rt.block_on(async {
        let http = reqwest::Client::new();
        let small = br#"{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}"#;
        loop {
            let r = http.post(&url).body(&small[..]).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                break;
            }
        }
        let calls = (0..concurrent).map(|_| {
            let req = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_vec());
            // A refused request may be answered (and its connection closed) before its
            // body is sent: a send error is reported as status 0.
            async move {
                match req.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        status
                    }
                    Err(_) => 0,
                }
            }
        });
        let mut out = Vec::new();
        for h in calls.map(tokio::spawn).collect::<Vec<_>>() {
            out.push(h.await.unwrap());
        }
        out
    });
    let hwm = kb(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    (idle, hwm, statuses)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // `cargo test --all-targets` runs bench targets too: a small smoke run there.
    let size = if std::env::args().any(|a| a == "--bench") {
        62_000_000
    } else {
        2_000_000
    };
    let body = body(size);
    println!("command: cargo bench -p drover-agent --bench request_memory");
    println!(
        "request: {:.1} MB of JSON (dense fixture, x: [rows, 16] FP32)",
        body.len() as f64 / 1e6
    );
    for concurrent in [1, 4] {
        let (idle, hwm, statuses) = peak(&rt, &body, concurrent);
        println!(
            "{concurrent} concurrent: agent RSS before {:.0} MB, peak (VmHWM) {:.0} MB; statuses {statuses:?}",
            idle as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }
}
