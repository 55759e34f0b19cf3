//! `drover demo`: the embedded default end to end, in one command.
//!
//! In a temp dir it starts `drover serve` (embedded broker, SQLite), trains a
//! predictive-maintenance model with the built-in trainer on synthetic sensor history,
//! publishes and signs it through the HTTP API, enrolls a fleet of in-process agents
//! over real MQTT, deploys the model by signed command to every device, streams live
//! sensor readings through each agent's KServe v2 API with ground-truth feedback, and
//! reports what the control plane stored. Only public code paths: the same API the CLI
//! uses and the same `drover_agent::run` the binary uses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::client::{Client, ServerArgs};
use crate::api::{
    DeviceView, EnrollRequest, EnrollResponse, ModelView, PublishBody, RolloutView, TelemetryView,
};
use crate::config::ServeConfig;
use crate::rollout::Plan;
use crate::serve;
use crate::trainer::{self, Dataset, TrainParams};

/// Arguments of `drover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of in-process agents (split across two sites).
    #[arg(long, default_value_t = 24)]
    pub devices: usize,
    /// Seed for the synthetic sensor data (same seed, same run).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Live inference requests sent through each agent's local API.
    #[arg(long, default_value_t = 40)]
    pub requests: usize,
    /// Keep the server and agents running afterwards and print CLI commands to explore.
    #[arg(long)]
    pub keep: bool,
    /// Where to write the Markdown report (default: `demo-report.md` in the demo dir).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

const FEATURES: [&str; 4] = ["vibration_rms", "temperature_c", "current_a", "rpm"];
const SITES: [&str; 2] = ["plant-a", "plant-b"];
const WAIT: Duration = Duration::from_secs(120);

/// One synthetic sensor reading and whether the machine failed within the horizon.
fn reading(rng: &mut StdRng) -> (Vec<f32>, u32) {
    let mut normal = |mean: f64, sd: f64| -> f32 {
        // Box–Muller: two uniforms → one standard normal.
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        (mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    };
    let vib = normal(2.2, 0.8);
    let temp = normal(62.0, 7.0);
    let current = normal(12.0, 1.6);
    let rpm = normal(1500.0, 90.0);
    let z = 2.4 * (f64::from(vib) - 3.0)
        + 0.22 * (f64::from(temp) - 68.0)
        + 0.5 * (f64::from(current) - 13.5);
    let p = 1.0 / (1.0 + (-z).exp());
    let failed = u32::from(rng.gen::<f64>() < p);
    (vec![vib, temp, current, rpm], failed)
}

fn dataset(rng: &mut StdRng, rows: usize) -> Dataset {
    let mut d = Dataset::default();
    for _ in 0..rows {
        let (x, y) = reading(rng);
        d.features.push(x);
        d.labels.push(y);
    }
    d
}

fn csv(d: &Dataset) -> String {
    let mut s = FEATURES.join(",");
    s.push('\n');
    for x in &d.features {
        let row: Vec<String> = x.iter().map(|v| format!("{v:.4}")).collect();
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

fn bar(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("  {msg:<34} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

struct Timeline {
    start: Instant,
    rows: Vec<(String, Duration)>,
}

impl Timeline {
    fn mark(&mut self, what: &str, since: Instant) {
        self.rows.push((what.to_string(), since.elapsed()));
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > 2000 {
        bail!(
            "--devices must be between 1 and 2000 (got {})",
            args.devices
        );
    }
    let tmp = tempfile::Builder::new().prefix("drover-demo-").tempdir()?;
    // With --keep the directory outlives the process, so the user can explore it.
    let (dir, _cleanup): (PathBuf, Option<tempfile::TempDir>) = if args.keep {
        (tmp.keep(), None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    let mut tl = Timeline {
        start: Instant::now(),
        rows: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    println!(
        "Drover demo: {} devices across {} sites, seed {}, in {}",
        args.devices,
        SITES.len(),
        args.seed,
        dir.display()
    );

    // 1. Control plane.
    step(
        1,
        "Starting the control plane (embedded MQTT broker, SQLite, HTTP API)",
    );
    let t = Instant::now();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate()?, std::future::pending()).await?;
    let url = format!("http://{}", server.http_addr());
    let client = Client::new(&ServerArgs {
        server: Some(url.clone()),
        token: Some(server.api_token().to_string()),
        data_dir: dir.join("server"),
    })?;
    println!("  HTTP API {url}, MQTT {}", server.mqtt_addr());
    tl.mark("control plane up", t);

    // 2. Train.
    step(
        2,
        "Training a failure predictor on sensor history (built-in trainer → ONNX)",
    );
    let t = Instant::now();
    let history = dataset(&mut rng, 4000);
    let holdout = dataset(&mut rng, 1000);
    let model = trainer::train(&history, &TrainParams::default())?;
    let train_acc = model.accuracy(&history);
    let holdout_acc = model.accuracy(&holdout);
    let onnx = model.to_onnx();
    std::fs::write(dir.join("model.onnx"), &onnx)?;
    std::fs::write(dir.join("history.csv"), csv(&history))?;
    println!(
        "  {} rows, {} features; accuracy {:.1} % train, {:.1} % held out; model.onnx {} bytes",
        history.features.len(),
        FEATURES.len(),
        100.0 * train_acc,
        100.0 * holdout_acc,
        onnx.len()
    );
    tl.mark("trained", t);

    // 3. Publish (validate with tract, baseline, test vectors, sign).
    step(
        3,
        "Publishing: validate with tract, derive the drift baseline, sign the manifest",
    );
    let t = Instant::now();
    let published: ModelView = client
        .post(
            "/v1/models",
            &PublishBody {
                name: "failure-predictor".into(),
                version: "1.0.0".into(),
                model_hex: hex::encode(&onnx),
                baseline_csv: Some(csv(&history)),
                training_job: Some("demo-builtin-trainer".into()),
                dataset: Some(format!("synthetic-seed-{}", args.seed)),
                metrics: BTreeMap::from([("holdout_accuracy".into(), holdout_acc)]),
                ..Default::default()
            },
        )
        .await
        .context("publishing the model")?;
    println!(
        "  failure-predictor@{} digest {}… signed by key {}",
        published.version,
        &published.digest[..16],
        published.key_id
    );
    tl.mark("published", t);

    // 4. Fleet.
    step(
        4,
        "Enrolling the fleet and starting the agents (real MQTT, real keys)",
    );
    let t = Instant::now();
    let pb = bar(args.devices, "devices online");
    let mut agents = Vec::new();
    let mut sites = BTreeMap::new();
    for i in 0..args.devices {
        let site = SITES[i % SITES.len()];
        let id = format!("{site}-gw-{i:03}");
        let r: EnrollResponse = client
            .post(
                "/v1/devices",
                &EnrollRequest {
                    id: id.clone(),
                    labels: BTreeMap::from([("site".into(), site.into())]),
                },
            )
            .await?;
        let agent_dir = dir.join("agents").join(&id);
        std::fs::create_dir_all(&agent_dir)?;
        let mut cfg = r.write_agent_files(
            &agent_dir,
            None,
            agent_dir.clone(),
            BTreeMap::from([("site".into(), site.into())]),
        )?;
        cfg.api_addr = "127.0.0.1:0".into();
        cfg.telemetry.interval_ms = 500;
        let agent = drover_agent::run(cfg, std::future::pending())
            .await
            .with_context(|| format!("starting agent {id}"))?;
        sites.insert(id.clone(), site);
        agents.push((id, agent));
    }
    wait_for(
        &pb,
        || async {
            let l: Vec<DeviceView> = client.get("/v1/devices").await.ok()?;
            Some(l.iter().filter(|d| d.online).count())
        },
        args.devices,
    )
    .await?;
    tl.mark("fleet online", t);

    // 5. Staged rollout: signed commands in gated waves; devices download chunks, verify,
    //    self-test, activate.
    step(
        5,
        "Rolling out in gated waves: canary, then the fleet (signed commands, chunked download, self-test)",
    );
    let t = Instant::now();
    let plan = Plan::from_toml(
        r#"
model = "failure-predictor@1.0.0"
[[waves]]
percent = 10
bake = "2s"
[[waves]]
percent = 50
bake = "1s"
[[waves]]
percent = 100
bake = "0s"
"#,
    )?;
    let started: RolloutView = client.post("/v1/rollouts?by=drover-demo", &plan).await?;
    let done = follow_rollout(&client, started.id).await?;
    let deploy_time = t.elapsed();
    let wave_rows: Vec<(usize, u64, String)> = done
        .waves
        .iter()
        .map(|w| (w.wave, w.target, w.bake.clone()))
        .collect();
    tl.mark("rollout completed on every device", t);

    // 6. Live traffic through each agent's KServe v2 API, with ground-truth feedback.
    step(
        6,
        "Serving live sensor readings through each agent's KServe v2 API",
    );
    let t = Instant::now();
    let http = reqwest::Client::new();
    let pb = bar(args.devices * args.requests, "inferences");
    let mut per_site: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut latencies = Vec::new();
    for (id, agent) in &agents {
        let base = format!("http://{}/v2/models/failure-predictor", agent.api_addr());
        for _ in 0..args.requests {
            let (x, y) = reading(&mut rng);
            let body =
                json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]});
            let started = Instant::now();
            let r: Value = http
                .post(format!("{base}/infer"))
                .json(&body)
                .send()
                .await?
                .error_for_status()
                .with_context(|| format!("inference on {id}"))?
                .json()
                .await?;
            latencies.push(started.elapsed());
            let probs: Vec<f64> = r["outputs"][0]["data"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let predicted = u32::from(
                probs.get(1).copied().unwrap_or(0.0) > probs.first().copied().unwrap_or(0.0),
            );
            let e = per_site.entry(sites[id]).or_default();
            e.0 += 1;
            e.1 += u64::from(predicted == y);
            if let Some(req_id) = r["parameters"]["drover_request_id"].as_u64() {
                http.post(format!("{base}/feedback"))
                    .json(&json!({"id": req_id, "label": y}))
                    .send()
                    .await?
                    .error_for_status()?;
            }
            pb.inc(1);
        }
    }
    pb.finish();
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    tl.mark("live traffic served", t);

    // 7. Telemetry arrives at the control plane.
    step(7, "Waiting for the fleet's telemetry to land in SQLite");
    let t = Instant::now();
    let want = (args.devices * args.requests) as u64;
    let pb = bar(want as usize, "inferences reported");
    let mut counted = 0u64;
    let deadline = Instant::now() + WAIT;
    while counted < want {
        counted = 0;
        for (id, _) in &agents {
            let rows: Vec<TelemetryView> = client
                .get(&format!("/v1/devices/{id}/telemetry?limit=1000"))
                .await?;
            counted += rows.iter().map(|r| r.inferences).sum::<u64>();
        }
        pb.set_position(counted.min(want));
        if Instant::now() > deadline {
            bail!("telemetry reported {counted} of {want} inferences after {WAIT:?}");
        }
        if counted < want {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    pb.finish();
    tl.mark("telemetry stored", t);

    // Summary.
    let mut report = String::new();
    let _ = writeln!(report, "# Drover demo report\n");
    let _ = writeln!(
        report,
        "{} devices across {} sites, seed {}.\n",
        args.devices,
        SITES.len(),
        args.seed
    );
    let _ = writeln!(report, "| what | value |\n| --- | --- |");
    let _ = writeln!(
        report,
        "| model | failure-predictor@1.0.0 ({} bytes, key {}) |",
        onnx.len(),
        published.key_id
    );
    let _ = writeln!(
        report,
        "| accuracy, training history | {:.1} % |",
        100.0 * train_acc
    );
    let _ = writeln!(
        report,
        "| accuracy, held-out history | {:.1} % |",
        100.0 * holdout_acc
    );
    for (site, (n, right)) in &per_site {
        let _ = writeln!(
            report,
            "| live accuracy, {site} | {:.1} % of {n} |",
            100.0 * *right as f64 / (*n).max(1) as f64
        );
    }
    let _ = writeln!(
        report,
        "| staged rollout to all devices (start → completed) | {:.2} s |",
        deploy_time.as_secs_f64()
    );
    for (wave, target, bake) in &wave_rows {
        let _ = writeln!(
            report,
            "| rollout wave {wave} | {target} devices, bake {bake} |"
        );
    }
    let _ = writeln!(
        report,
        "| local API latency p50 (HTTP round trip) | {} µs |",
        p50.as_micros()
    );
    let _ = writeln!(report, "| inferences reported in telemetry | {counted} |");
    let _ = writeln!(
        report,
        "\n## Timeline\n\n| step | duration |\n| --- | --- |"
    );
    for (what, d) in &tl.rows {
        let _ = writeln!(report, "| {what} | {:.2} s |", d.as_secs_f64());
    }
    let _ = writeln!(
        report,
        "| total | {:.2} s |",
        tl.start.elapsed().as_secs_f64()
    );
    let report_path = args
        .report
        .clone()
        .unwrap_or_else(|| dir.join("demo-report.md"));
    std::fs::write(&report_path, &report)
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("\n{report}");
    println!("Report written to {}", report_path.display());

    if args.keep {
        print_explore(&url, &dir.join("server"));
        tokio::signal::ctrl_c().await?;
    }
    for (_, a) in &agents {
        a.shutdown();
    }
    for (_, a) in agents {
        let _ = a.wait().await;
    }
    server.shutdown().await;
    Ok(())
}

/// Follows a rollout with one progress bar per wave until it completes.
async fn follow_rollout(client: &Client, id: u64) -> anyhow::Result<RolloutView> {
    let multi = indicatif::MultiProgress::new();
    let mut bars: Vec<ProgressBar> = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let r: RolloutView = client.get(&format!("/v1/rollouts/{id}")).await?;
        while bars.len() < r.waves.len() {
            let w = &r.waves[bars.len()];
            let b = multi.add(bar(
                w.target as usize,
                &format!("wave {} ({} devices)", w.wave, w.target),
            ));
            bars.push(b);
        }
        for (b, w) in bars.iter().zip(&r.waves) {
            b.set_position(w.healthy.min(w.target));
        }
        match r.status.as_str() {
            "completed" => {
                for b in &bars {
                    b.finish();
                }
                return Ok(r);
            }
            "paused" | "rolled-back" | "rolling-back" => {
                bail!(
                    "rollout {id} stopped: {}",
                    r.reason.as_deref().unwrap_or(r.status.as_str())
                )
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("rollout {id} still {} after {WAIT:?}", r.status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for<F, Fut>(pb: &ProgressBar, mut count: F, want: usize) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let n = count().await.unwrap_or(0);
        pb.set_position(n as u64);
        if n >= want {
            pb.finish();
            return Ok(());
        }
        if Instant::now() > deadline {
            pb.abandon();
            bail!("only {n} of {want} devices got there within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_explore(url: &str, server_dir: &Path) {
    // The API token stays in its 0600 file; the CLI reads it from the data dir.
    println!("\nThe control plane and agents keep running (ctrl-c to stop). Explore with:");
    println!("  export DROVER_DATA_DIR={}", server_dir.display());
    println!("  drover device list");
    println!("  drover model list");
    println!("  drover model show failure-predictor@1.0.0");
    println!("  curl {url}/metrics");
    println!("Data dir: {}", server_dir.display());
}
