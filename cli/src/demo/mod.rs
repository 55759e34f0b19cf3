//! `drover demo`: the whole loop on the embedded default, in one command.
//!
//! In a temp dir it starts `drover serve` (embedded broker, SQLite) with a continuous
//! training policy, enrolls a fleet of in-process agents at two sites over real MQTT and
//! TLS, and plays a predictive-maintenance story through public code paths only: the HTTP
//! API the CLI uses, the server's own drift engine and local training executor (running
//! `drover train builtin`, the built-in Rust trainer), the rollout driver, and the same
//! `drover_agent::run` the agent binary uses, served over each agent's KServe v2 API.
//!
//! 1. The first model is trained by a job, gated, signed and rolled out in waves.
//! 2. Live readings flow; ground-truth labels come back as feedback; drift is scored.
//! 3. One site's line is retrofitted: its sensor distribution shifts; drift is flagged
//!    there; sustained drift triggers retraining on the labelled samples the fleet sent.
//! 4. The candidate beats the champion on held-out fleet data, is signed, runs in shadow
//!    on a canary wave, then rolls out; the site's accuracy recovers.

mod report;
mod traffic;
mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::client::{Client, ServerArgs};
use drover_control_plane::api::ScoreView as Score;
use drover_control_plane::api::{
    DeviceView, EnrollRequest, EnrollResponse, ModelView, RolloutReport, RolloutView, TelemetryView,
};
use drover_control_plane::api::{JobView, RunResponse};
use drover_control_plane::config::ServeConfig;
use drover_control_plane::rollout::Plan;
use drover_control_plane::serve;
pub use report::Report;
use report::{pct, AccuracyRow, DriftRow, ModelRow, RolloutRow, TelemetryRow};
use traffic::{Target, Traffic};

/// Arguments of `drover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of in-process agents (split across two sites).
    #[arg(long, default_value_t = 24)]
    pub devices: usize,
    /// Seed for the synthetic sensor data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Live inference requests per second across the fleet.
    #[arg(long, default_value_t = 150)]
    pub rate: u32,
    /// Keep the server and agents running afterwards and print CLI commands to explore.
    #[arg(long)]
    pub keep: bool,
    /// Where to write the Markdown report (default: `demo-report.md` in the demo dir); the
    /// same report as JSON goes next to it with the `.json` extension.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

const MODEL: &str = "failure-predictor";
const SITES: [&str; 2] = ["plant-a", "plant-b"];
/// The site whose line is retrofitted mid-run.
const SHIFTED: &str = "plant-b";
/// Drift window and engine tick.
const WINDOW_SECS: u64 = 4;
const WAIT: Duration = Duration::from_secs(120);
/// Requests each device of a site must answer with the retrained model before its
/// accuracy is reported.
const RECOVERY_REQUESTS: u64 = 25;

/// The continuous-training policy the server runs. Sites are scored apart; two windows
/// in a row at `alert` start a job; a candidate must beat the champion on the fleet's
/// held-out rows by 5 points; accepted candidates go to the site whose line changed,
/// shadowed on a canary first.
fn policy_toml() -> String {
    format!(
        r#"version = 1
model = "{MODEL}"
job = "job.toml"

[drift]
window_secs = {WINDOW_SECS}
group_by = ["site"]
# Every device, site and feature is scored each window: a strict significance keeps
# chance alerts on a few dozen readings out.
max_p_value = 1e-6

[triggers]
sustained_windows = 2
# Once drift has started a job, its model gets time to roll out and be judged.
cooldown_secs = 600

[gate]
max_regression = 0.02
min_recent_improvement = 0.05

[rollout]
selector = "site={SHIFTED}"
max_concurrent = 0
device_deadline = "60s"
[rollout.gates]
max_error_rate = 0.01
# p99 over a few hundred requests on a busy laptop is noisy (the histogram's buckets
# double); a model of the same size stays near 1.
max_p99_latency_ratio = 4.0
[[rollout.waves]]
percent = 25
bake = "2s"
[[rollout.waves]]
percent = 100
bake = "0s"
[rollout.shadow]
duration = "4s"
min_compared = 20
# The candidate must disagree with the champion where the champion is wrong: this
# gate catches a broken candidate (say, one constant answer), not a better one.
min_agreement = 0.3
max_latency_ratio = 5.0
waves = 1
"#
    )
}

/// The job spec: the built-in trainer, run as this binary by the local executor, on the
/// plant history plus every labelled sample the fleet sent.
fn job_toml(drover: &Path) -> String {
    format!(
        r#"version = 1
name = "retrain-{MODEL}"
executor = "local"
timeout_secs = 300
command = [{:?}, "train", "builtin", "--data", "{{dataset}}", "--out", "{{out}}"]
[dataset]
base = "history.csv"
fleet_since_hours = 24
holdout_fraction = 0.3
"#,
        drover.display().to_string()
    )
}

fn bar(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("  {msg:<40} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.devices < 2 || args.devices > 2000 {
        bail!(
            "--devices must be between 2 and 2000 (got {}): the demo needs a device at each of its two sites",
            args.devices
        );
    }
    if !(1..=5000).contains(&args.rate) {
        bail!(
            "--rate must be between 1 and 5000 requests/s (got {})",
            args.rate
        );
    }
    let tmp = tempfile::Builder::new().prefix("drover-demo-").tempdir()?;
    // With --keep the directory outlives the process, so the user can explore it.
    let (dir, _cleanup): (PathBuf, Option<tempfile::TempDir>) = if args.keep {
        (tmp.keep(), None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    // Whatever happens in the story, the agents and the server stop before the temp dir
    // under them is removed.
    let mut fleet = Running::default();
    let told = story(&args, &dir, &mut fleet).await;
    if let (Ok(url), true) = (&told, args.keep) {
        print_explore(url, &dir.join("server"));
        tokio::signal::ctrl_c().await?;
    }
    fleet.shutdown().await;
    told.map(|_| ())
}

/// What the demo started and must stop.
#[derive(Default)]
struct Running {
    server: Option<serve::ServeHandle>,
    agents: Vec<(String, drover_agent::Agent)>,
}

impl Running {
    async fn shutdown(self) {
        for (_, a) in &self.agents {
            a.shutdown();
        }
        for (_, a) in self.agents {
            let _ = a.wait().await;
        }
        if let Some(s) = self.server {
            s.shutdown().await;
        }
    }
}

/// The whole story; returns the API URL.
async fn story(args: &DemoArgs, dir: &Path, running: &mut Running) -> anyhow::Result<String> {
    let start = Instant::now();
    let mut timeline: Vec<(String, f64)> = Vec::new();
    let mut mark =
        |what: &str, since: Instant| timeline.push((what.into(), since.elapsed().as_secs_f64()));
    let mut report = Report {
        devices: args.devices,
        seed: args.seed,
        shifted_site: SHIFTED.into(),
        ..Default::default()
    };
    println!(
        "Drover demo: {} edge gateways (one per pump) across {} plants, seed {}, in {}",
        args.devices,
        SITES.len(),
        args.seed,
        dir.display()
    );

    // 1. Control plane with the continuous-training policy.
    step(1, "Starting the control plane: embedded MQTT broker (mutual TLS), SQLite, HTTP API, drift engine");
    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let pdir = dir.join("policy");
    std::fs::create_dir_all(&pdir)?;
    std::fs::write(pdir.join("history.csv"), world::history_csv(&mut rng, 2000))?;
    std::fs::write(pdir.join("policy.toml"), policy_toml())?;
    let drover = std::env::current_exe().context("locating the drover binary for training jobs")?;
    std::fs::write(pdir.join("job.toml"), job_toml(&drover))?;
    let mut config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        rollout_tick_ms: 500,
        ..Default::default()
    };
    config.continuous.policy = pdir.join("policy.toml").display().to_string();
    config.continuous.tick_secs = WINDOW_SECS;
    let server = running
        .server
        .insert(serve::run(config.validate()?, std::future::pending()).await?);
    let url = format!("http://{}", server.http_addr());
    let client = Client::new(&ServerArgs {
        server: Some(url.clone()),
        token: Some(server.api_token().to_string()),
        data_dir: dir.join("server"),
    })?;
    println!(
        "  HTTP API {url}, MQTT {}; policy {}",
        server.mqtt_addr(),
        pdir.join("policy.toml").display()
    );
    mark("control plane up", t);

    // 2. Fleet.
    step(
        2,
        "Enrolling the fleet and starting the agents (fleet CA certificates, per-device keys)",
    );
    let t = Instant::now();
    let pb = bar(args.devices, "devices online");
    let agents = &mut running.agents;
    let mut site_of = BTreeMap::new();
    for i in 0..args.devices {
        let site = SITES[i % SITES.len()];
        let id = format!("{site}-gw-{i:03}");
        let labels = BTreeMap::from([("site".to_string(), site.to_string())]);
        let r: EnrollResponse = client
            .post(
                "/v1/devices",
                &EnrollRequest {
                    id: id.clone(),
                    labels: labels.clone(),
                },
            )
            .await?;
        let agent_dir = dir.join("agents").join(&id);
        std::fs::create_dir_all(&agent_dir)?;
        let mut cfg =
            crate::agent_files::write_agent_files(r, &agent_dir, None, agent_dir.clone(), labels)?;
        cfg.api_addr = "127.0.0.1:0".into();
        cfg.telemetry.interval_ms = 500;
        // Half the readings (with their labels) go back as training samples.
        cfg.telemetry.sample_rate_ppm = 500_000;
        let agent = drover_agent::run(cfg, std::future::pending())
            .await
            .with_context(|| format!("starting agent {id}"))?;
        site_of.insert(id.clone(), site.to_string());
        *report.sites.entry(site.to_string()).or_default() += 1;
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
    mark("fleet online", t);

    // 3. The first model: a training job on the plant's history.
    step(3, "Training the first failure predictor: a job on the local executor runs the built-in Rust trainer");
    let t = Instant::now();
    let started: RunResponse = client.post("/v1/train/run", &serde_json::json!({})).await?;
    let job = wait_job(&client, started.job_id).await?;
    let first = accepted_model(&client, &job, t).await?;
    println!(
        "  job {} → {}: held-out accuracy {}; signed by key {}",
        job.id,
        first.model,
        pct(first.holdout_accuracy),
        first.key_id
    );
    report.models.push(first.clone());
    mark("first model trained, gated, signed", t);

    // 4. Its first rollout, started by the operator (the policy rolls out only
    //    candidates that beat a champion).
    step(4, "Rolling it out in gated waves (10 % canary, 50 %, 100 %): signed commands, chunked download, self-test");
    let t = Instant::now();
    let plan = Plan::from_toml(&format!(
        "model = \"{}\"\n[[waves]]\npercent = 10\nbake = \"2s\"\n[[waves]]\npercent = 50\nbake = \"1s\"\n[[waves]]\npercent = 100\nbake = \"0s\"\n",
        first.model
    ))?;
    let r: RolloutView = client.post("/v1/rollouts?by=drover-demo", &plan).await?;
    follow_rollout(&client, r.id).await?;
    report.rollouts.push(rollout_row(&client, r.id).await?);
    mark("first rollout completed", t);

    // 5. Live traffic with feedback; drift is scored per site.
    step(
        5,
        "Live sensor readings through every agent's KServe v2 API, with ground-truth feedback",
    );
    let t = Instant::now();
    let every = Duration::from_millis(((args.devices as u64 * 1000) / u64::from(args.rate)).max(5));
    let targets = agents
        .iter()
        .map(|(id, a)| Target {
            id: id.clone(),
            site: site_of[id].clone(),
            api: a.api_addr().to_string(),
        })
        .collect();
    let traffic = Traffic::start(targets, MODEL, every, args.seed);
    let traffic_start = drover_host::clock::now_ms();
    let mut drift = DriftLog::new(&client, traffic_start).await?;
    drift
        .until(
            &client,
            |d| d.windows_for(&first.model) >= 2,
            "two drift windows of normal operation",
        )
        .await?;
    mark("normal operation scored", t);

    // 6. The retrofit at one site.
    step(
        6,
        &format!("{SHIFTED} retrofits its line with high-speed pumps: its sensor readings shift"),
    );
    let t = Instant::now();
    traffic.retrofit(SHIFTED);
    let retrofit_ms = drover_host::clock::now_ms();
    let job = loop {
        drift.poll(&client).await?;
        let jobs: Vec<JobView> = client.get("/v1/train/jobs").await?;
        if let Some(j) = jobs
            .into_iter()
            .find(|j| j.trigger.starts_with("drift:") && j.created_at_ms >= retrofit_ms)
        {
            break j;
        }
        if t.elapsed() > WAIT {
            bail!("no training job was triggered within {WAIT:?} of the retrofit");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "  sustained drift → training job {} started (trigger {})",
        job.id, job.trigger
    );
    report.retraining_trigger = Some(job.trigger.clone());
    mark("drift detected, retraining triggered", t);

    // 7. Retraining and the gate.
    step(7, "Retraining on the plant history plus the fleet's labelled samples; gate against the champion");
    let t = Instant::now();
    let job = wait_job(&client, job.id).await?;
    let second = accepted_model(&client, &job, t).await?;
    println!(
        "  {} accepted: fleet held-out accuracy {} vs champion {}; signed by key {}",
        second.model,
        pct(second.recent_accuracy),
        pct(second.champion_recent_accuracy),
        second.key_id
    );
    report.models.push(second.clone());
    mark("candidate trained, gated, signed", t);

    // 8. Rolled out by the policy: shadow on a canary, then the site.
    step(
        8,
        &format!(
            "The policy rolls {} out to {SHIFTED}: shadow on a canary wave, then the site",
            second.model
        ),
    );
    let t = Instant::now();
    let rollout_id = loop {
        let l: Vec<RolloutView> = client.get("/v1/rollouts").await?;
        if let Some(r) = l.iter().find(|r| r.model == second.model) {
            break r.id;
        }
        if t.elapsed() > WAIT {
            bail!(
                "the policy did not start a rollout of {}: {:?}",
                second.model,
                job.detail
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    follow_rollout(&client, rollout_id).await?;
    let row = rollout_row(&client, rollout_id).await?;
    println!(
        "  shadow agreement on the canary: {}",
        pct(row.shadow_agreement)
    );
    report.rollouts.push(row);
    mark("retrained model rolled out", t);

    // 9. Recovery.
    step(
        9,
        &format!("Measuring {SHIFTED}'s accuracy with the retrained model"),
    );
    let t = Instant::now();
    let second_version = version_of(&second.model);
    let n_shifted = report.sites.get(SHIFTED).copied().unwrap_or(0) as u64;
    let pb = bar(
        (RECOVERY_REQUESTS * n_shifted) as usize,
        "readings answered by the new model",
    );
    loop {
        let served: u64 = traffic
            .ledger()
            .iter()
            .filter(|((site, _, v), _)| site == SHIFTED && *v == second_version)
            .map(|(_, t)| t.served)
            .sum();
        pb.set_position(served.min(RECOVERY_REQUESTS * n_shifted));
        if served >= RECOVERY_REQUESTS * n_shifted {
            break;
        }
        if t.elapsed() > WAIT {
            bail!(
                "{SHIFTED} answered only {served} readings with {} within {WAIT:?}",
                second.model
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pb.finish();
    drift.poll(&client).await?;
    let (failed, last_error) = traffic.failures();
    let ledger = traffic.stop().await;
    mark("recovery measured", t);
    for ((site, line, version), tally) in &ledger {
        let phase = if *version == second_version {
            "after retraining"
        } else if *line == "high-speed" {
            "under drift"
        } else {
            "no drift"
        };
        report.accuracy.push(AccuracyRow {
            phase: phase.into(),
            site: site.clone(),
            pumps: (*line).into(),
            model: format!("{MODEL}@{version}"),
            served: tally.served,
            accuracy: tally.accuracy(),
        });
    }
    let order = |p: &str| {
        ["no drift", "under drift", "after retraining"]
            .iter()
            .position(|x| *x == p)
    };
    report
        .accuracy
        .sort_by(|a, b| (order(&a.phase), &a.site).cmp(&(order(&b.phase), &b.site)));

    // 10. Telemetry.
    step(10, "Waiting for the fleet's telemetry to land in SQLite");
    let t = Instant::now();
    let answered: u64 = ledger.values().map(|t| t.served).sum();
    let pb = bar(answered as usize, "inferences reported");
    let deadline = Instant::now() + WAIT;
    let (stored, windows) = loop {
        let (mut stored, mut windows) = (0u64, 0u64);
        for (id, _) in agents.iter() {
            let rows: Vec<TelemetryView> = client
                .get(&format!("/v1/devices/{id}/telemetry?limit=100000"))
                .await?;
            stored += rows.iter().map(|r| r.inferences).sum::<u64>();
            windows += rows.len() as u64;
        }
        pb.set_position(stored.min(answered));
        if stored >= answered {
            break (stored, windows);
        }
        if Instant::now() > deadline {
            bail!("telemetry reported {stored} of {answered} inferences after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    pb.finish();
    mark("telemetry stored", t);
    report.telemetry = TelemetryRow {
        requests_answered: answered,
        requests_failed: failed,
        inferences_stored: stored,
        telemetry_windows: windows,
    };
    if let Some(e) = last_error {
        println!("  {failed} requests failed; the last: {e}");
    }
    drift.fill(&mut report, &site_of, &first.model);
    report.timeline = timeline;
    report.total_secs = start.elapsed().as_secs_f64();

    // Report.
    let md_path = args
        .report
        .clone()
        .unwrap_or_else(|| dir.join("demo-report.md"));
    let json_path = md_path.with_extension("json");
    let md = report.markdown();
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("\n{md}");
    println!(
        "Report written to {} (and {})",
        md_path.display(),
        json_path.display()
    );

    Ok(url)
}

fn version_of(model: &str) -> String {
    model.rsplit_once('@').map_or(model, |(_, v)| v).to_owned()
}

/// Waits for a training job to end.
async fn wait_job(client: &Client, id: u64) -> anyhow::Result<JobView> {
    let deadline = Instant::now() + WAIT;
    loop {
        let j: JobView = client.get(&format!("/v1/train/jobs/{id}")).await?;
        if !matches!(j.state.as_str(), "queued" | "running") {
            return Ok(j);
        }
        if Instant::now() > deadline {
            bail!("training job {id} still {} after {WAIT:?}", j.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The model an accepted job registered, or why there is none.
async fn accepted_model(
    client: &Client,
    job: &JobView,
    since: Instant,
) -> anyhow::Result<ModelRow> {
    let (Some("accepted"), Some(model)) = (job.outcome.as_deref(), job.candidate_model.as_deref())
    else {
        bail!(
            "training job {} ended {} ({}): {}",
            job.id,
            job.state,
            job.outcome.as_deref().unwrap_or("no outcome"),
            job.detail.as_deref().unwrap_or("")
        );
    };
    let (name, version) = model.split_once('@').unwrap_or((model, ""));
    let m: ModelView = client.get(&format!("/v1/models/{name}/{version}")).await?;
    let metric = |who: &str, what: &str| job.metrics.as_ref().and_then(|v| v[who][what].as_f64());
    Ok(ModelRow {
        model: model.to_owned(),
        job: job.id,
        trigger: job.trigger.clone(),
        parent: job.parent_model.clone(),
        holdout_accuracy: metric("candidate", "accuracy"),
        recent_accuracy: metric("candidate", "recent_accuracy"),
        champion_recent_accuracy: metric("champion", "recent_accuracy"),
        train_secs: since.elapsed().as_secs_f64(),
        key_id: m.key_id,
    })
}

/// A rollout's waves and durations from its report.
async fn rollout_row(client: &Client, id: u64) -> anyhow::Result<RolloutRow> {
    let r: RolloutReport = client.get(&format!("/v1/rollouts/{id}/report")).await?;
    let mut bounds = vec![r.rollout.created_at_ms];
    let mut agreement = None;
    for e in &r.events {
        if matches!(e.kind.as_str(), "advanced" | "completed") {
            bounds.push(e.at_ms);
        }
        if e.kind == "promoted" && agreement.is_none() {
            agreement = e
                .gates
                .iter()
                .find(|g| g.gate == "shadow_agreement")
                .and_then(|g| g.value);
        }
    }
    let waves = r
        .rollout
        .waves
        .iter()
        .zip(bounds.windows(2))
        .map(|(w, b)| (w.wave, w.target, b[1].saturating_sub(b[0]) as f64 / 1000.0))
        .collect();
    let end = bounds.last().copied().unwrap_or(r.rollout.created_at_ms);
    let started_by = r
        .events
        .iter()
        .find(|e| e.kind == "started")
        .and_then(|e| {
            e.detail
                .split(" started a rollout")
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "-".into());
    Ok(RolloutRow {
        id,
        model: r.rollout.model.clone(),
        started_by,
        status: r.rollout.status.clone(),
        secs: end.saturating_sub(r.rollout.created_at_ms) as f64 / 1000.0,
        waves,
        shadow_agreement: agreement,
    })
}

/// The drift windows scored since the traffic started, printed as they arrive.
struct DriftLog {
    since_ms: u64,
    scores: Vec<Score>,
    seen: BTreeSet<u64>,
    /// Model digest (hex) → `name@version`.
    models: BTreeMap<String, String>,
}

impl DriftLog {
    async fn new(client: &Client, since_ms: u64) -> anyhow::Result<Self> {
        let mut d = DriftLog {
            since_ms,
            scores: Vec::new(),
            seen: BTreeSet::new(),
            models: BTreeMap::new(),
        };
        d.refresh_models(client).await?;
        Ok(d)
    }

    async fn refresh_models(&mut self, client: &Client) -> anyhow::Result<()> {
        let l: Vec<ModelView> = client.get("/v1/models").await?;
        self.models = l
            .into_iter()
            .map(|m| (m.digest.clone(), format!("{}@{}", m.name, m.version)))
            .collect();
        Ok(())
    }

    fn model(&self, digest: &str) -> String {
        self.models
            .get(digest)
            .cloned()
            .unwrap_or_else(|| digest.chars().take(12).collect())
    }

    /// Windows scored so far with sketches of `model` at every site.
    fn windows_for(&self, model: &str) -> usize {
        let mut per: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
        for s in &self.scores {
            if self.model(&s.model_digest) == model {
                if let Some(site) = s.scope.strip_prefix("site=") {
                    per.entry(s.window_end_ms).or_default().insert(site);
                }
            }
        }
        per.values().filter(|s| s.len() == SITES.len()).count()
    }

    /// Fetches new windows and prints one line per window and site.
    async fn poll(&mut self, client: &Client) -> anyhow::Result<()> {
        let all: Vec<Score> = client
            .get(&format!(
                "/v1/drift/history?since_ms={}&limit=100000",
                self.since_ms
            ))
            .await?;
        if all
            .iter()
            .any(|s| !self.models.contains_key(&s.model_digest))
        {
            self.refresh_models(client).await?;
        }
        let new_ends: BTreeSet<u64> = all
            .iter()
            .map(|s| s.window_end_ms)
            .filter(|e| !self.seen.contains(e))
            .collect();
        self.scores = all;
        for end in new_ends {
            self.seen.insert(end);
            let rows = site_rows(&self.scores, end, |d| self.model(d));
            let line: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} ({}) PSI {:.2} {}",
                        r.site,
                        version_of(&r.model),
                        r.max_psi,
                        r.level.to_uppercase()
                    )
                })
                .collect();
            if !line.is_empty() {
                println!(
                    "  drift window +{:>3.0} s: {}",
                    end.saturating_sub(self.since_ms) as f64 / 1000.0,
                    line.join(" · ")
                );
            }
        }
        Ok(())
    }

    async fn until(
        &mut self,
        client: &Client,
        done: impl Fn(&Self) -> bool,
        what: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll(client).await?;
            if done(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("waited {WAIT:?} for {what}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The drift part of the report: per window and site; which sites and devices
    /// alerted against the first model.
    fn fill(&self, report: &mut Report, site_of: &BTreeMap<String, String>, first: &str) {
        let ends: BTreeSet<u64> = self.scores.iter().map(|s| s.window_end_ms).collect();
        for end in ends {
            report
                .drift_windows
                .extend(site_rows(&self.scores, end, |d| self.model(d)));
        }
        let mut sites = BTreeSet::new();
        let mut devices: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for s in &self.scores {
            if s.level != "alert" || self.model(&s.model_digest) != first {
                continue;
            }
            if let Some(site) = s.scope.strip_prefix("site=") {
                sites.insert(site.to_owned());
            }
            if let Some(site) = s.scope.strip_prefix("device:").and_then(|d| site_of.get(d)) {
                devices.entry(site.clone()).or_default().insert(&s.scope);
            }
        }
        report.alerting_sites = sites.into_iter().collect();
        for site in SITES {
            report
                .alerting_devices
                .insert(site.into(), devices.get(site).map_or(0, BTreeSet::len));
        }
    }
}

/// One row per (site, model) for the window ending at `end`: the largest PSI over its
/// features and the worst level.
fn site_rows(scores: &[Score], end: u64, model: impl Fn(&str) -> String) -> Vec<DriftRow> {
    let mut rows: BTreeMap<(String, String), DriftRow> = BTreeMap::new();
    for s in scores.iter().filter(|s| s.window_end_ms == end) {
        let Some(site) = s.scope.strip_prefix("site=") else {
            continue;
        };
        let m = model(&s.model_digest);
        let r = rows
            .entry((site.to_owned(), m.clone()))
            .or_insert_with(|| DriftRow {
                window_end_ms: end,
                site: site.to_owned(),
                model: m,
                max_psi: 0.0,
                feature: String::new(),
                level: "ok".into(),
            });
        if let Some(p) = s.psi {
            if p > r.max_psi || r.feature.is_empty() {
                r.max_psi = p.max(r.max_psi);
                r.feature = s.feature.clone();
            }
        }
        if s.level.as_str() == "alert" || (s.level.as_str() == "warn" && r.level == "ok") {
            r.level = s.level.as_str().into();
        }
    }
    rows.into_values().collect()
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
            if w.wave == r.wave && r.status == "running" {
                b.set_message(format!(
                    "wave {} ({} devices): {}",
                    w.wave, w.target, r.stage
                ));
            } else {
                b.set_message(format!("wave {} ({} devices)", w.wave, w.target));
            }
        }
        match r.status.as_str() {
            "completed" => {
                for b in &bars {
                    b.finish();
                }
                return Ok(r);
            }
            "paused" | "rolled-back" | "rolling-back" | "aborted" => {
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
    println!("  drover model show {MODEL}@1.0.1");
    println!("  drover drift status");
    println!("  drover train jobs");
    println!("  drover rollout list");
    println!("  drover rollout report 2");
    println!("  curl {url}/metrics");
    println!("Data dir: {}", server_dir.display());
}
