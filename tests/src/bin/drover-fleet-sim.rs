//! `drover-fleet-sim`: N protocol-true virtual devices against a running control plane.
//!
//! Enrolls the devices through the HTTP API, connects them to the broker the enrollment
//! names, optionally publishes a model of a given size and rolls it out through cumulative
//! waves, runs for `--duration`, and prints what happened (`--output json` for machines).
//!
//! ```text
//! drover serve --data-dir /tmp/d &
//! drover-fleet-sim --data-dir /tmp/d --devices 1000 --group site=a:3 --group site=b:1 \
//!     --rollout-bytes 1048576 --waves 1,10,50,100 --bake 5s --duration 10s
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use drover_tests::fleet::Api;
use drover_tests::sim::{self, scenario, Fleet, Group, SimConfig, Stats};
use serde_json::json;

/// Runs N virtual devices against a Drover control plane.
#[derive(Debug, Parser)]
#[command(name = "drover-fleet-sim", version)]
struct Args {
    /// Control plane API URL (default: read from `--data-dir`/api-url).
    #[arg(long)]
    server: Option<String>,
    /// API token (default: read from `--data-dir`/api-token).
    #[arg(long, env = "DROVER_TOKEN")]
    token: Option<String>,
    /// The control plane's data dir, to read its API URL and token from.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of virtual devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device ids are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Label group LABELS[:WEIGHT[:ERROR_RATE[:LATENCY_P50_US]]], e.g.
    /// `site=plant-a,hw=pi4:3:0.002:1500`; repeat for several groups.
    #[arg(long = "group", value_parser = Group::parse)]
    groups: Vec<Group>,
    /// Modelled inferences per device per second.
    #[arg(long, default_value_t = 10.0)]
    inference_rate: f64,
    /// Telemetry window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    telemetry_interval: Duration,
    /// A model (`name@version`) that misbehaves on every device; repeatable.
    #[arg(long = "bad-model")]
    bad_models: Vec<String>,
    #[arg(long, default_value_t = 0.3)]
    bad_error_rate: f64,
    #[arg(long, default_value_t = 5.0)]
    bad_latency_factor: f64,
    /// Share of each feature's mass moved to its top bin in drift reports.
    #[arg(long, default_value_t = 0.0)]
    drift: f64,
    /// Every churn period, each device drops off abruptly with this probability.
    #[arg(long, default_value_t = 0.0)]
    churn_probability: f64,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    churn_period: Duration,
    /// How long a dropped device stays away.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    churn_downtime: Duration,
    /// The first N devices run real tract on the models they download.
    #[arg(long, default_value_t = 0)]
    tract_devices: usize,
    /// Enrollment requests in flight at once.
    #[arg(long, default_value_t = 16)]
    enroll_parallel: usize,
    /// Devices connecting at once during start-up.
    #[arg(long, default_value_t = 250)]
    connect_batch: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Publish a generated MLP of about this many bytes and roll it out.
    #[arg(long)]
    rollout_bytes: Option<usize>,
    /// Name and version the generated model is published as.
    #[arg(long, default_value = "sim@1.0.0")]
    rollout_model: String,
    /// Cumulative waves, in percent.
    #[arg(long, default_value = "1,10,50,100", value_delimiter = ',')]
    waves: Vec<f64>,
    /// Bake time after each wave.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    bake: Duration,
    /// Inferences the error and latency gates need before judging.
    #[arg(long, default_value_t = 20)]
    min_inferences: u64,
    /// Keep the fleet running this long after the rollout (or at all without one).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// `text` or `json`.
    #[arg(long, default_value = "text")]
    output: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_trimmed(dir: &Option<PathBuf>, file: &str) -> anyhow::Result<String> {
    let dir = dir
        .as_ref()
        .with_context(|| format!("give --server and --token, or --data-dir holding {file}"))?;
    let p = dir.join(file);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_owned())
}

async fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        matches!(a.output.as_str(), "text" | "json"),
        "--output is text or json"
    );
    let api = api(&a)?;
    let cfg = sim_config(&a);
    let text = a.output == "text";
    let t0 = Instant::now();
    let ids = sim::enroll(&api, &cfg, a.enroll_parallel).await?;
    let enroll_s = t0.elapsed().as_secs_f64();
    if text {
        println!("enrolled {} devices in {enroll_s:.1} s", ids.len());
    }
    let t1 = Instant::now();
    let fleet = Fleet::start(cfg, ids, Duration::from_secs(600)).await?;
    let connect_s = t1.elapsed().as_secs_f64();
    if text {
        println!("connected {} devices in {connect_s:.1} s", a.devices);
    }
    let rollout = match a.rollout_bytes {
        Some(bytes) => roll_out(&api, &a, bytes, text).await?,
        None => serde_json::Value::Null,
    };
    tokio::time::sleep(a.duration).await;
    let mut summary = summary(&fleet, a.devices);
    summary["enroll_s"] = json!(enroll_s);
    summary["connect_s"] = json!(connect_s);
    if text {
        for (k, v) in summary.as_object().into_iter().flatten() {
            println!("{k}: {v}");
        }
    } else {
        summary["rollout"] = rollout;
        println!("{summary}");
    }
    fleet.stop().await;
    Ok(())
}

/// The control plane's API, from the flags or its data dir.
fn api(a: &Args) -> anyhow::Result<Api> {
    let server = match &a.server {
        Some(s) => s.clone(),
        None => read_trimmed(&a.data_dir, drover_control_plane::app::paths::URL_FILE)?,
    };
    let token = match &a.token {
        Some(t) => t.clone(),
        None => read_trimmed(&a.data_dir, drover_control_plane::app::paths::TOKEN_FILE)?,
    };
    Ok(Api::new(server, token))
}

fn sim_config(a: &Args) -> SimConfig {
    SimConfig {
        devices: a.devices,
        prefix: a.prefix.clone(),
        groups: if a.groups.is_empty() {
            vec![Group::default()]
        } else {
            a.groups.clone()
        },
        inference_rate: a.inference_rate,
        telemetry_interval: a.telemetry_interval,
        bad_models: a.bad_models.clone(),
        bad_error_rate: a.bad_error_rate,
        bad_latency_factor: a.bad_latency_factor,
        drift: a.drift.clamp(0.0, 1.0),
        churn_probability: a.churn_probability,
        churn_period: a.churn_period,
        churn_downtime: a.churn_downtime,
        tract_devices: a.tract_devices,
        connect_batch: a.connect_batch,
        seed: a.seed,
    }
}

/// Publishes a generated model of about `bytes` and follows its rollout to the end.
async fn roll_out(
    api: &Api,
    a: &Args,
    bytes: usize,
    text: bool,
) -> anyhow::Result<serde_json::Value> {
    let (name, version) = a
        .rollout_model
        .split_once('@')
        .context("--rollout-model is NAME@X.Y.Z")?;
    let onnx = sim::onnx_model_of_size(bytes, a.seed);
    scenario::publish_model(api, name, version, &onnx, None).await?;
    let plan = scenario::plan(&a.rollout_model, &a.waves, a.bake, a.min_inferences);
    let id = scenario::start_rollout(api, &plan).await?;
    let run = scenario::follow(api, id, Duration::from_secs(3600)).await?;
    if text {
        println!(
            "rollout {id} of {} ({} bytes): {} in {:.1} s",
            a.rollout_model,
            onnx.len(),
            run.status,
            run.total.as_secs_f64()
        );
        for (w, target, d) in &run.waves {
            println!("  wave {w}: {target} devices, {:.1} s", d.as_secs_f64());
        }
    }
    Ok(json!({
        "id": id,
        "model_bytes": onnx.len(),
        "status": run.status,
        "total_s": run.total.as_secs_f64(),
        "waves": run.waves.iter().map(|(w, t, d)| json!({"wave": w, "target": t, "seconds": d.as_secs_f64()})).collect::<Vec<_>>(),
    }))
}

/// What the fleet did, from its counters.
fn summary(fleet: &Fleet, devices: usize) -> serde_json::Value {
    let s = &fleet.shared.stats;
    let mut c2a = fleet
        .shared
        .command_to_active_ms
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    json!({
        "devices": devices,
        "command_to_active_ms": {"p50": sim::quantile(&mut c2a, 0.5), "p99": sim::quantile(&mut c2a, 0.99), "n": c2a.len()},
        "telemetry_sent": Stats::get(&s.telemetry_sent),
        "durable_sent": Stats::get(&s.durable_sent),
        "durable_acked": Stats::get(&s.durable_acked),
        "unacked": fleet.unacked(),
        "connects": Stats::get(&s.connects),
        "churn_drops": Stats::get(&s.churn_drops),
        "commands_accepted": Stats::get(&s.commands_accepted),
        "commands_refused": Stats::get(&s.commands_refused),
        "chunks_received": Stats::get(&s.chunks_received),
        "chunks_verified": Stats::get(&s.chunks_verified),
        "chunks_refused": Stats::get(&s.chunks_refused),
        "chunk_bytes_received": Stats::get(&s.chunk_bytes_received),
        "installs": Stats::get(&s.installs),
        "install_failures": Stats::get(&s.install_failures),
        "self_rollbacks": Stats::get(&s.self_rollbacks),
        "inferences": s.inferences.load(Relaxed),
        "tract_inferences": Stats::get(&s.tract_inferences),
        "chunk_cache_bytes": fleet.shared.chunks.bytes(),
    })
}
