//! Rollout benchmark: a generated ~1 MB model to N simulated devices through cumulative
//! waves with gates passing. `drover serve` (embedded broker + control plane) runs as its
//! own process; the fleet simulator runs in this one.
//!
//! cargo bench -p drover-tests --bench fleet_rollout -- [--devices N] [--model-bytes B]
//!     [--waves 1,10,50,100] [--bake-ms 5000] [--tick-ms 500] [--broker embedded|rmqtt|mosquitto]
//!     [--deploys-per-second R]
//!
//! Prints total time, time per wave, the control plane's chunk egress (bytes published on
//! chunk topics: should follow the model's size, not the device count), commands issued,
//! peak RSS of the server process (broker + control plane) and of the simulator, and the
//! per-device time from accepting the deploy command to serving the model (all, and per
//! wave). `--deploys-per-second` sets the plan's per-wave deploy rate (0: at once). Without
//! `--bench` (as under `cargo test --all-targets`) it is a small smoke run.

use std::time::{Duration, Instant};

use drover_tests::mosquitto::{Mosquitto, CONTROL_PLANE_USER};
use drover_tests::serve_process::{cpu_seconds, metrics, prom_counter, rss, ServeProcess};
use drover_tests::sim::{self, scenario, Fleet, Group, InstallTimes, SimConfig, Stats};

struct Args {
    devices: usize,
    model_bytes: usize,
    waves: Vec<f64>,
    bake_ms: u64,
    tick_ms: u64,
    broker: String,
    deploys_per_second: f64,
    smoke: bool,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        devices: if smoke { 20 } else { 1000 },
        model_bytes: if smoke { 64 * 1024 } else { 1 << 20 },
        waves: vec![1.0, 10.0, 50.0, 100.0],
        bake_ms: if smoke { 500 } else { 5000 },
        tick_ms: 500,
        broker: "embedded".into(),
        deploys_per_second: 0.0,
        smoke,
    };
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--devices" => a.devices = v.parse().unwrap_or(a.devices),
            "--model-bytes" => a.model_bytes = v.parse().unwrap_or(a.model_bytes),
            "--bake-ms" => a.bake_ms = v.parse().unwrap_or(a.bake_ms),
            "--tick-ms" => a.tick_ms = v.parse().unwrap_or(a.tick_ms),
            "--broker" => a.broker = v,
            "--deploys-per-second" => {
                a.deploys_per_second = v.parse().unwrap_or(a.deploys_per_second)
            }
            "--waves" => {
                a.waves = v.split(',').filter_map(|p| p.trim().parse().ok()).collect();
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn run(a: Args) -> anyhow::Result<()> {
    let bin = drover_tests::workspace_bin("drover")?;
    let dir = tempfile::tempdir()?;
    let cp_pass = "bench-control-plane-secret";
    let mosq = if a.broker == "mosquitto" {
        Some(Mosquitto::start(
            &dir.path().join("mosquitto"),
            &[(CONTROL_PLANE_USER.to_string(), cp_pass.to_string())],
        )?)
    } else {
        anyhow::ensure!(
            a.broker == "embedded" || a.broker == "rmqtt",
            "--broker is embedded, rmqtt (a server built with `--features rmqtt`) or mosquitto"
        );
        None
    };
    let mut extra = format!("rollout_tick_ms = {}\n", a.tick_ms);
    if a.broker == "rmqtt" {
        extra.push_str("embedded_broker = \"rmqtt\"\n");
    }
    if let Some(m) = &mosq {
        extra.push_str(&format!(
            "broker_url = {:?}\n",
            m.url(CONTROL_PLANE_USER, cp_pass)
        ));
    }
    let server = ServeProcess::start(&bin, &dir.path().join("server"), &extra)?;
    let api = server.api();
    let waves_s: Vec<String> = a.waves.iter().map(|w| w.to_string()).collect();
    println!(
        "command: cargo bench -p drover-tests --bench fleet_rollout -- --devices {} --model-bytes {} --waves {} --bake-ms {} --tick-ms {} --broker {} --deploys-per-second {}{}",
        a.devices,
        a.model_bytes,
        waves_s.join(","),
        a.bake_ms,
        a.tick_ms,
        a.broker,
        a.deploys_per_second,
        if a.smoke { "   (smoke run: figures mean nothing)" } else { "" }
    );
    println!(
        "machine: {} cores ({}); load average before: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let cfg = SimConfig {
        devices: a.devices,
        prefix: "bench".into(),
        groups: vec![
            Group::parse("site=plant-a:3:0.001:1500").map_err(anyhow::Error::msg)?,
            Group::parse("site=plant-b:1:0.002:3000").map_err(anyhow::Error::msg)?,
        ],
        // The agent's probation rule fails a model on one error among fewer than ten
        // requests, so devices need some traffic during their 2 s probation.
        inference_rate: 20.0,
        telemetry_interval: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let t0 = Instant::now();
    let ids = sim::enroll(&api, &cfg, 32).await?;
    if let Some(m) = &mosq {
        m.add_users_bulk(
            &ids.iter()
                .map(|d| (d.id.to_string(), d.key.mqtt_password()))
                .collect::<Vec<_>>(),
        )?;
    }
    let enroll_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let fleet = Fleet::start(cfg, ids, Duration::from_secs(900)).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    println!(
        "{} devices enrolled in {enroll_s:.1} s, connected in {connect_s:.1} s",
        a.devices
    );

    let onnx = sim::onnx_model_of_size(a.model_bytes, 1);
    scenario::publish_model(&api, "bench", "1.0.0", &onnx, None).await?;
    let page = metrics(&server.api_url).await?;
    let egress0 = prom_counter(&page, "drover_chunk_egress_bytes_total").unwrap_or(0);
    let pubs0 = prom_counter(&page, "drover_chunk_publishes_total").unwrap_or(0);
    let cpu0 = cpu_seconds(server.pid()).unwrap_or(0.0);
    let received0 = Stats::get(&fleet.shared.stats.chunk_bytes_received);

    let mut plan = scenario::plan(
        "bench@1.0.0",
        &a.waves,
        Duration::from_millis(a.bake_ms),
        20,
    );
    if a.deploys_per_second > 0.0 {
        plan["deploys_per_second"] = a.deploys_per_second.into();
    }
    let started = Instant::now();
    let id = scenario::start_rollout(&api, &plan).await?;
    let run = scenario::follow(&api, id, Duration::from_secs(3600)).await?;
    let page = metrics(&server.api_url).await?;
    let egress = prom_counter(&page, "drover_chunk_egress_bytes_total").unwrap_or(0) - egress0;
    let publishes = prom_counter(&page, "drover_chunk_publishes_total").unwrap_or(0) - pubs0;
    let commands = prom_counter(&page, "drover_commands_issued_total").unwrap_or(0);
    let cpu = cpu_seconds(server.pid()).unwrap_or(0.0) - cpu0;
    let (server_peak, _) = rss(server.pid()).unwrap_or((0, 0));
    let (sim_peak, _) = rss(std::process::id()).unwrap_or((0, 0));
    let mosq_peak = mosq
        .as_ref()
        .and_then(|m| rss(m.pid()))
        .map(|r| r.0)
        .unwrap_or(0);
    let active = fleet.active();
    let on_model = active
        .iter()
        .filter(|a| a.as_ref().is_some_and(|(m, _)| m == "bench@1.0.0"))
        .count();
    let mut c2a = fleet
        .shared
        .command_to_active_ms
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let received = Stats::get(&fleet.shared.stats.chunk_bytes_received) - received0;

    println!(
        "rollout of {} bytes ({} chunks) to {} devices: {} in {:.1} s; {on_model} devices on it",
        onnx.len(),
        onnx.len()
            .div_ceil(drover_protocol::manifest::DEFAULT_CHUNK_SIZE as usize),
        a.devices,
        run.status,
        run.total.as_secs_f64()
    );
    let per_wave = fleet
        .shared
        .command_to_active
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    let mut wave_end = started;
    for (w, target, d) in &run.waves {
        let wave_start = wave_end;
        wave_end += *d;
        // A device's command is accepted within the wave that commanded it.
        let wave: Vec<InstallTimes> = per_wave
            .iter()
            .filter(|t| {
                t.accepted >= wave_start && (t.accepted < wave_end || *w == run.waves.len())
            })
            .copied()
            .collect();
        let p50 = |f: fn(&InstallTimes) -> u64| {
            let mut v: Vec<u64> = wave.iter().map(f).collect();
            sim::quantile(&mut v, 0.5)
        };
        let mut ms: Vec<u64> = wave.iter().map(|t| t.total_ms).collect();
        println!(
            "  wave {w}: cumulative {target} devices, {:.1} s; command -> active p50 {} ms, p99 {} ms (n = {})",
            d.as_secs_f64(),
            sim::quantile(&mut ms, 0.5),
            sim::quantile(&mut ms, 0.99),
            ms.len()
        );
        // How spread the wave's commands arrived: later arrivals are what the coalescer
        // publishes again for.
        let first = wave.iter().map(|t| t.accepted).min();
        let mut spread: Vec<u64> = wave
            .iter()
            .map(|t| first.map_or(0, |f| t.accepted.duration_since(f).as_millis() as u64))
            .collect();
        println!(
            "    commands accepted over p50 {} ms, p90 {} ms after the wave's first; p50 per phase: accepted -> first ask {} ms, ask -> first chunk {} ms, download {} ms, install {} ms",
            sim::quantile(&mut spread, 0.5),
            sim::quantile(&mut spread, 0.9),
            p50(|t| t.ask_ms),
            p50(|t| t.first_chunk_ms),
            p50(|t| t.download_ms),
            p50(|t| t.install_ms),
        );
    }
    println!(
        "control-plane chunk egress: {:.2} MiB in {publishes} publishes ({:.2} x model size); devices received {:.1} MiB in total",
        mib(egress),
        egress as f64 / onnx.len() as f64,
        mib(received)
    );
    println!("signed commands issued: {commands}");
    println!(
        "command -> active per device: p50 {} ms, p99 {} ms (n = {})",
        sim::quantile(&mut c2a, 0.5),
        sim::quantile(&mut c2a, 0.99),
        c2a.len()
    );
    println!(
        "peak RSS: drover serve ({}) {:.0} MiB; simulator {:.0} MiB; server CPU during rollout {cpu:.1} s",
        if mosq.is_some() {
            format!("control plane; mosquitto {:.0} MiB", mib(mosq_peak))
        } else {
            "broker + control plane".into()
        },
        mib(server_peak),
        mib(sim_peak)
    );
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    anyhow::ensure!(
        run.status == "completed",
        "rollout ended {}: {}",
        run.status,
        run.last
    );
    fleet.stop().await;
    drop(server);
    Ok(())
}
