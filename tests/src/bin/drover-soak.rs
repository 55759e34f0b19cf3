//! `drover-soak`: the soak form of the reliability battery (issue 24). A simulated fleet
//! (default 1,000 devices) reports telemetry into a `drover serve` process while a few
//! real `drover-agent` processes are deployed to and SIGKILLed over and over, and the
//! server itself is SIGKILLed and restarted. The embedded broker lives in `drover serve`,
//! so every control-plane kill is also a broker restart (default every 8 s, more often
//! than the issue's 60 s). At the end it prints, per kind, attempts, survived, lost and
//! duplicated, and writes the same as JSON.
//!
//! ```text
//! cargo run --release -p drover-tests --bin drover-soak -- --duration 30m --devices 1000 \
//!     --agents 4 --agent-kill-interval 1700ms --serve-kill-interval 8s --json soak.json
//! ```
//!
//! Telemetry: frames the fleet sent vs rows stored (lost = sent − stored once every frame
//! is acknowledged, duplicated = rows − distinct (device, window)); `PRAGMA
//! integrity_check` after the last kill. Deploys: each agent kill follows a deploy of the
//! other model to that agent; converged = agents on their newest commanded model at the
//! end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use drover_tests::fleet::{self, Api};
use drover_tests::serve_process::{inspect_telemetry, start_retrying, Listen, ServeProcess};
use drover_tests::sim::{self, Fleet, SimConfig, Stats};
use serde_json::json;

/// Soaks a Drover control plane and agents under kills.
#[derive(Debug, Parser)]
#[command(name = "drover-soak")]
struct Args {
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Simulated devices reporting telemetry.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Real `drover-agent` processes, deployed to and killed in turn.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// One agent (round robin) is redeployed and SIGKILLed this often (fixed rate).
    #[arg(long, default_value = "1700ms", value_parser = humantime::parse_duration)]
    agent_kill_interval: Duration,
    /// `drover serve` (control plane and embedded broker) is SIGKILLed this often (fixed
    /// rate).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    serve_kill_interval: Duration,
    /// Telemetry window of the simulated devices.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    telemetry_interval: Duration,
    /// Where the JSON summary goes.
    #[arg(long, default_value = "soak.json")]
    json: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One real agent process and what it was last told to run.
struct Agent {
    id: String,
    config: PathBuf,
    log: PathBuf,
    child: Child,
    newest: Option<&'static str>,
}

impl Agent {
    fn spawn(config: &Path, log: &Path) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Ok(Command::new(drover_tests::workspace_bin("drover-agent")?)
            .arg("--config")
            .arg(config)
            .args(["--probation-ms", "300"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()?)
    }
}

#[derive(Default)]
struct Counts {
    agent_kills: u64,
    agent_restarts: u64,
    serve_kills: u64,
    serve_restarts: u64,
    deploys: u64,
}

/// POSTs until the (possibly restarting) server takes it.
async fn post_retrying(api: &Api, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..300 {
        match api.post(path, body).await {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("POST {path} failed")))
}

async fn start_agents(api: &Api, dir: &Path, n: usize) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for i in 0..n {
        let id = format!("soak-agent-{i:02}");
        let mut d = fleet::enroll(api, dir, &id, &[]).await?;
        d.config.api_addr = "127.0.0.1:0".into();
        d.config.metrics_addr = "127.0.0.1:0".into();
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, d.config.to_toml()?)?;
        let log = dir.join(format!("{id}.log"));
        let child = Agent::spawn(&config, &log)?;
        agents.push(Agent {
            id,
            config,
            log,
            child,
            newest: None,
        });
    }
    Ok(agents)
}

async fn run(a: Args) -> anyhow::Result<bool> {
    let bin = drover_tests::workspace_bin("drover")?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("server");
    let listen = Listen::fixed(true);
    let mut server = start_retrying(&bin, &data, &listen)?;
    let api = server.api();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures");
    fleet::publish(&api, &fixtures.join("dense_v1.onnx"), "dense", "1.0.0")?;
    fleet::publish(&api, &fixtures.join("dense_v2.onnx"), "dense", "2.0.0")?;
    let cfg = SimConfig {
        devices: a.devices,
        prefix: "fleet".into(),
        telemetry_interval: a.telemetry_interval,
        inference_rate: 2.0,
        connect_batch: 100,
        ..SimConfig::default()
    };
    let ids = sim::enroll(&api, &cfg, 16).await?;
    let fleet = Fleet::start(cfg, ids, Duration::from_secs(600)).await?;
    let mut agents = start_agents(&api, tmp.path(), a.agents).await?;
    println!(
        "soak: {} simulated devices, {} agents, {:?}; agent kill every {:?}, serve kill every {:?}",
        a.devices, a.agents, a.duration, a.agent_kill_interval, a.serve_kill_interval
    );

    let mut c = Counts::default();
    let start = Instant::now();
    let (mut next_agent, mut next_serve) =
        (start + a.agent_kill_interval, start + a.serve_kill_interval);
    let mut turn = 0usize;
    while start.elapsed() < a.duration {
        let now = Instant::now();
        if now >= next_serve {
            server.kill()?;
            c.serve_kills += 1;
            server = start_retrying(&bin, &data, &listen)?;
            c.serve_restarts += 1;
            // Fixed rate: a slow restart does not stretch the schedule.
            next_serve += a.serve_kill_interval;
        } else if now >= next_agent && !agents.is_empty() {
            let ag = &mut agents[turn % a.agents];
            turn += 1;
            let version = if ag.newest == Some("1.0.0") {
                "2.0.0"
            } else {
                "1.0.0"
            };
            let body = json!({"model": format!("dense@{version}")});
            post_retrying(&api, &format!("/v1/devices/{}/deploy", ag.id), &body).await?;
            ag.newest = Some(version);
            c.deploys += 1;
            // A random moment of that deploy.
            let pause =
                rand::random::<u64>() % (a.agent_kill_interval.as_millis() as u64 / 2).max(1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            ag.child.kill()?;
            ag.child.wait()?;
            c.agent_kills += 1;
            ag.child = Agent::spawn(&ag.config, &ag.log)?;
            c.agent_restarts += 1;
            next_agent += a.agent_kill_interval;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    finish(a, server, &bin, &data, &listen, fleet, agents, c).await
}

/// Settles, measures, prints the table and writes the JSON. Returns whether nothing was
/// lost, duplicated or left unconverged.
#[allow(clippy::too_many_arguments)]
async fn finish(
    a: Args,
    mut server: ServeProcess,
    bin: &Path,
    data: &Path,
    listen: &Listen,
    fleet: Fleet,
    mut agents: Vec<Agent>,
    c: Counts,
) -> anyhow::Result<bool> {
    let api = server.api();
    // Agents: wait for each to be healthy on its newest command.
    let deadline = Instant::now() + Duration::from_secs(180);
    let converged = loop {
        let models = api.get("/v1/devices").await.unwrap_or_default();
        let list = models.as_array().cloned().unwrap_or_default();
        let ok = agents
            .iter()
            .filter(|ag| {
                let want = ag.newest.map(|v| format!("dense@{v}"));
                list.iter().any(|d| {
                    d["id"] == ag.id.as_str()
                        && d["last_phase"] == "healthy"
                        && d["active_model"].as_str().map(str::to_owned) == want
                })
            })
            .count();
        if ok == agents.len() || Instant::now() > deadline {
            break ok;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Telemetry: stop, wait for acks; a frame caught by a restart waits for a reconnect.
    let mut replay_restarts = 0;
    while fleet.quiesce(Duration::from_secs(30)).await.is_err() && replay_restarts < 3 {
        server.kill()?;
        server = start_retrying(bin, data, listen)?;
        replay_restarts += 1;
    }
    let unacked = fleet.unacked();
    let sent = Stats::get(&fleet.shared.stats.telemetry_sent);
    fleet.stop().await;
    for ag in &mut agents {
        let _ = ag.child.kill();
        let _ = ag.child.wait();
    }
    server.kill()?;
    let (check, rows, distinct) =
        inspect_telemetry(data, "fleet-").context("reading the database")?;
    let lost = sent.saturating_sub(rows);
    let dup = rows - distinct;
    let unconverged = agents.len() - converged;
    println!(
        "\n{:<24}{:>10}{:>10}{:>8}{:>12}",
        "kind", "attempts", "survived", "lost", "duplicated"
    );
    let row = |k: &str, n: u64, s: u64, l: String, d: String| {
        println!("{k:<24}{n:>10}{s:>10}{l:>8}{d:>12}");
    };
    row(
        "agent SIGKILL",
        c.agent_kills,
        c.agent_restarts,
        "-".into(),
        "-".into(),
    );
    row(
        "control-plane SIGKILL",
        c.serve_kills,
        c.serve_restarts,
        "-".into(),
        "-".into(),
    );
    row(
        "telemetry frames",
        sent,
        rows.min(sent),
        lost.to_string(),
        dup.to_string(),
    );
    row(
        "deploys (agents final)",
        agents.len() as u64,
        converged as u64,
        unconverged.to_string(),
        "-".into(),
    );
    println!(
        "\ndeploy commands {}; integrity_check {check}; frames waiting for a reconnect {unacked}, \
         extra restarts to replay them {replay_restarts}",
        c.deploys
    );
    let summary = json!({
        "duration_s": a.duration.as_secs_f64(),
        "devices": a.devices,
        "agents": a.agents,
        "agent_kills": {"attempts": c.agent_kills, "survived": c.agent_restarts},
        "control_plane_kills": {"attempts": c.serve_kills, "survived": c.serve_restarts},
        "telemetry": {"sent": sent, "stored": rows, "lost": lost, "duplicated": dup},
        "deploys": {"commanded": c.deploys, "agents": agents.len(), "converged": converged, "unconverged": unconverged},
        "integrity_check": check,
        "replay_restarts": replay_restarts,
    });
    std::fs::write(&a.json, serde_json::to_string_pretty(&summary)?)?;
    println!("summary written to {}", a.json.display());
    // More rows than frames sent would be rows nobody sent: as wrong as a loss.
    Ok(check == "ok" && rows == sent && dup == 0 && unconverged == 0)
}
