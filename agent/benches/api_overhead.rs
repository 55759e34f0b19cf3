//! Benchmark (not a test): the local KServe v2 API's overhead over calling tract directly,
//! p50 and p99, and the agent's RSS/PSS with a model loaded.
//!
//! Run: `cargo bench -p drover-agent --bench api_overhead`
//! (release build; the agent has no broker here, so it serves the pre-installed model
//! while its MQTT session retries in the background, as on an offline device).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_agent::config::AgentConfig;
use drover_agent::download::blob_path;
use drover_agent::state::{Slot, SlotState, Slots, State};
use drover_protocol::manifest::{
    chunk_hashes, Artifact, Lineage, Manifest, TensorData, TensorValue,
};
use drover_protocol::messages::ModelRef;
use drover_protocol::topics::hex32;
use drover_protocol::trust::sha256;
use drover_runtime::Model;

/// Requests per measurement. `cargo bench` passes `--bench`; without it (`cargo test
/// --all-targets` runs bench targets too) this is a quick smoke run that only proves the
/// benchmark still works, and its figures mean nothing.
fn iterations() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        5000
    } else {
        50
    }
}

fn fixture() -> Vec<u8> {
    std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dense_v1.onnx"))
        .unwrap()
}

/// Installs the model as the healthy active slot of a fresh data dir.
fn install(dir: &Path, bytes: &[u8], artifact: Option<Artifact>) {
    let manifest = Manifest {
        name: "dense".into(),
        version: "1.0.0".into(),
        sha256: sha256(bytes),
        size: bytes.len() as u64,
        chunk_size: 65536,
        chunk_hashes: chunk_hashes(bytes, 65536),
        inputs: vec![],
        outputs: vec![],
        baseline: None,
        test_vectors: vec![],
        lineage: Lineage::default(),
        created_at_ms: 0,
        sampled_vectors: vec![],
        artifact,
    };
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(blob_path(dir, &manifest.sha256), bytes).unwrap();
    let state = State {
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
    };
    state.save(dir).unwrap();
}

fn config(dir: &Path, exe: &Path) -> AgentConfig {
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
        runtime: drover_agent::config::RuntimeConfig {
            loader_exe: Some(exe.to_owned()),
            ..Default::default()
        },
        ..AgentConfig::default()
    }
}

fn quantiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    (q(0.50), q(0.99))
}

fn mem_kb(pid: u32, file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let n = iterations();
    let bytes = fixture();
    let x: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) / 8.0).collect();
    let input = TensorValue {
        name: "x".into(),
        shape: vec![1, 16],
        data: TensorData::F32(x.clone()),
    };

    // Direct tract call.
    let model = Model::load(&bytes).unwrap();
    for _ in 0..500 {
        model.run(std::slice::from_ref(&input)).unwrap();
    }
    let direct: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            model.run(std::slice::from_ref(&input)).unwrap();
            t.elapsed()
        })
        .collect();
    let (d50, d99) = quantiles(direct);

    // Through the agent's HTTP API (in-process agent, keep-alive client).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &bytes, None);
    let ((a50, a99), (f50, f99)) = rt.block_on(async {
        let agent = drover_agent::run(config(dir.path(), Path::new(TEST_AGENT)), std::future::pending()).await.unwrap();
        let url = format!("http://{}/v2/models/dense/infer", agent.api_addr());
        let http = reqwest::Client::new();
        let body = serde_json::json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x}]})
            .to_string();
        let call = || {
            let req = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        };
        for _ in 0..500 {
            call().await;
        }
        let mut api = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            call().await;
            api.push(t.elapsed());
        }
        // The HTTP floor: client + loopback + server for a handler that does nothing.
        let live = format!("http://{}/v2/health/live", agent.api_addr());
        let mut floor = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = http.get(&live).send().await.unwrap();
            r.bytes().await.unwrap();
            floor.push(t.elapsed());
        }
        agent.shutdown();
        agent.wait().await.unwrap();
        (quantiles(api), quantiles(floor))
    });

    // The real binary: cold start, RSS/PSS and idle CPU with the model loaded, the model
    // installed as plain ONNX and as the compiled artifact devices are sent (issue 25); and
    // the same for a device build of the agent (no ONNX importer) when `DEVICE_AGENT` names
    // one, e.g. `cargo build -p drover-agent --profile release-size`.
    let compiled = drover_runtime::compiled::compile(&bytes).unwrap();
    let artifact = Artifact {
        format: drover_runtime::compiled::COMPILED_FORMAT.into(),
        format_version: drover_runtime::compiled::COMPILED_FORMAT_VERSION,
        runtime_version: drover_runtime::compiled::runtime_version().into(),
        source_sha256: sha256(&bytes),
    };
    let mut runs = vec![
        (
            "test build, ONNX file".to_owned(),
            PathBuf::from(TEST_AGENT),
            bytes.clone(),
            None,
        ),
        (
            "test build, compiled".to_owned(),
            PathBuf::from(TEST_AGENT),
            compiled.clone(),
            Some(artifact.clone()),
        ),
    ];
    if let Some(device) = std::env::var_os("DEVICE_AGENT") {
        let label = format!("device build ({}), compiled", Path::new(&device).display());
        runs.push((label, PathBuf::from(device), compiled, Some(artifact)));
    }
    let mut figures = Vec::new();
    for (label, exe, file, artifact) in runs {
        figures.push((label, process_figures(&rt, &exe, &file, artifact)));
    }

    println!("command: cargo bench -p drover-agent --bench api_overhead");
    println!("model: tests/fixtures/dense_v1.onnx (16 -> 128 -> 3 dense, batch 1), {n} sequential requests");
    println!("direct tract Model::run      p50 {d50:8.1} us   p99 {d99:8.1} us");
    println!("KServe v2 HTTP API (client)  p50 {a50:8.1} us   p99 {a99:8.1} us");
    println!(
        "API overhead                 p50 {:8.1} us   p99 {:8.1} us",
        a50 - d50,
        a99 - d99
    );
    println!("HTTP floor (GET /v2/health/live, same client) p50 {f50:8.1} us   p99 {f99:8.1} us");
    println!(
        "agent-side inference overhead (API - floor - tract) p50 {:8.1} us",
        a50 - f50 - d50
    );
    for (label, f) in &figures {
        println!(
            "{label}: {} B binary; cold start (spawn -> first inference served) median of {COLD_STARTS} \
             {:.1} ms (min {:.1}); after 200 requests RSS {:.1} MiB ({:.1} MB), PSS {:.1} MiB; idle CPU {}",
            f.bin_size,
            f.cold_start_ms.0,
            f.cold_start_ms.1,
            f.rss_kb as f64 / 1024.0,
            f.rss_kb as f64 * 1024.0 / 1e6,
            f.pss_kb as f64 / 1024.0,
            f.idle_cpu_pct
                .map(|p| format!("{p:.2} % of one core over {} s", idle_secs()))
                .unwrap_or_else(|| "unreadable".into()),
        );
    }
}

/// The agent binary `cargo bench` built (with the features tests unify: it loads ONNX too).
const TEST_AGENT: &str = env!("CARGO_BIN_EXE_drover-agent");

/// Process spawns per cold-start figure.
const COLD_STARTS: usize = 5;

fn idle_secs() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        20
    } else {
        1
    }
}

struct ProcessFigures {
    bin_size: u64,
    /// Median and minimum.
    cold_start_ms: (f64, f64),
    rss_kb: u64,
    pss_kb: u64,
    idle_cpu_pct: Option<f64>,
}

/// Starts `exe` [`COLD_STARTS`] times on a data dir holding `file` as the healthy model and
/// times spawn to the first inference served; the last process then serves 200 requests
/// and is measured (RSS, PSS, idle CPU).
fn process_figures(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    file: &[u8],
    artifact: Option<Artifact>,
) -> ProcessFigures {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), file, artifact);
    let cfg_path = dir.path().join("agent.toml");
    std::fs::write(&cfg_path, config(dir.path(), exe).to_toml().unwrap()).unwrap();
    let body = serde_json::json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![0.1f32; 16]}]});
    let http = reqwest::Client::new();
    let mut cold = Vec::new();
    let mut child = None;
    for run in 0..COLD_STARTS {
        if let Some(mut c) = child.take() {
            let _ = Child::kill(&mut c);
            let _ = c.wait();
        }
        let spawned = Instant::now();
        let mut c = Command::new(exe)
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line.trim().trim_start_matches("api_addr=").to_owned();
        let url = format!("http://{addr}/v2/models/dense/infer");
        rt.block_on(async {
            loop {
                if let Ok(r) = http.post(&url).json(&body).send().await {
                    if r.status() == 200 {
                        break;
                    }
                }
            }
            cold.push(spawned.elapsed().as_secs_f64() * 1e3);
            if run + 1 == COLD_STARTS {
                for _ in 0..200 {
                    let r = http.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            }
        });
        child = Some(c);
    }
    let mut c = child.unwrap();
    let pid = c.id();
    let rss_kb = mem_kb(pid, "status", "VmRSS:").unwrap_or(0);
    let pss_kb = mem_kb(pid, "smaps_rollup", "Pss:").unwrap_or(0);
    // Idle CPU: the process's user + system time over a window with no requests (its
    // telemetry timer, spool and reconnect backoff keep running).
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(idle_secs()));
    let after = cpu_ticks(pid);
    let idle_cpu_pct = match (before, after, clock_ticks()) {
        (Some(b), Some(a), Some(hz)) => Some(100.0 * (a - b) as f64 / (hz * idle_secs()) as f64),
        _ => None,
    };
    let _ = c.kill();
    let _ = c.wait();
    cold.sort_by(f64::total_cmp);
    ProcessFigures {
        bin_size: std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0),
        cold_start_ms: (cold[cold.len() / 2], cold[0]),
        rss_kb,
        pss_kb,
        idle_cpu_pct,
    }
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> Option<u64> {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}
