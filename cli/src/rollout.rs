//! `drover rollout start|plan|status|watch|pause|resume|abort|list|report`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::client::{print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::VerdictView as Verdict;
use drover_control_plane::api::{PreviewView, RolloutReport, RolloutView};
use drover_control_plane::rollout::plan::{Gates, ShadowPhase, Wave};
use drover_control_plane::rollout::{OnFailure, OnNoData, Plan};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout from a plan file and/or flags (flags override the file).
    /// Shows the devices it would take and asks for confirmation on a terminal.
    Start(Box<StartArgs>),
    /// Preview a plan against the fleet as it is now (matched devices, devices per wave,
    /// devices another rollout holds); starts nothing. Same as `start --dry-run`.
    Plan(Box<StartArgs>),
    /// Show one rollout (waves, gates against thresholds, devices), or list them.
    Status {
        id: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Follow a rollout live until it completes, pauses, rolls back or is aborted. Exits
    /// 0 completed, 10 paused, 11 rolled back, 12 aborted; an unreachable server (a
    /// restart) is polled again until --give-up-after.
    Watch {
        id: u64,
        /// Refresh interval.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// How long to keep polling a server that does not answer (it may be restarting).
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        give_up_after: Duration,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop assigning devices (in-flight installs finish).
    Pause(IdArgs),
    /// Continue a paused rollout.
    Resume(IdArgs),
    /// Stop and send every device that took the model back to its previous one; the
    /// rollout ends `aborted` (a gate's rollback ends `rolled-back`).
    Abort(IdArgs),
    /// Queue the rollout's failed devices again; each gets a fresh deploy command.
    Retry(IdArgs),
    /// List rollouts, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// The rollout's report: who, what, when, and each gate's value at each decision.
    Report {
        id: u64,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct IdArgs {
    pub id: u64,
    /// Who is asking, for the rollout's report (default: $USER).
    #[arg(long, env = "USER", default_value = "operator")]
    pub by: String,
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Plan file (TOML); see `drover rollout start --help` for the fields.
    pub plan: Option<PathBuf>,
    /// NAME@X.Y.Z of a published model.
    #[arg(long)]
    pub model: Option<String>,
    /// Device selector, e.g. `site=plant-a,arch=aarch64`; `all` for the whole fleet.
    #[arg(long)]
    pub selector: Option<String>,
    /// Cumulative waves in percent, e.g. `1,10,50,100`.
    #[arg(long, value_delimiter = ',')]
    pub waves: Option<Vec<f64>>,
    /// Bake time of every wave, e.g. `10m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bake: Option<Duration>,
    #[arg(long)]
    pub max_concurrent: Option<u32>,
    /// Deploy commands sent per second within a wave (0: all at once).
    #[arg(long)]
    pub deploys_per_second: Option<f64>,
    /// Time a device has to install once commanded, e.g. `1h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deadline: Option<Duration>,
    /// `pause` or `rollback` when a gate fails.
    #[arg(long, value_parser = parse_on_failure)]
    pub on_failure: Option<OnFailure>,
    #[arg(long)]
    pub min_install_success: Option<f64>,
    #[arg(long)]
    pub max_error_rate: Option<f64>,
    #[arg(long)]
    pub max_p99_latency_ratio: Option<f64>,
    #[arg(long)]
    pub max_drift_psi: Option<f64>,
    #[arg(long)]
    pub min_inferences: Option<u64>,
    /// What a gate without a verdict (too little data) does once a stage's time is over:
    /// `hold` the stage (the default) or `pass`.
    #[arg(long, value_parser = parse_on_no_data)]
    pub on_no_data: Option<OnNoData>,
    /// Run a shadow phase of this length on each wave before activation.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shadow: Option<Duration>,
    /// Shadow agreement needed to promote.
    #[arg(long)]
    pub min_agreement: Option<f64>,
    /// Largest candidate/active p99 latency ratio in the shadow phase.
    #[arg(long)]
    pub max_shadow_latency_ratio: Option<f64>,
    /// Who is starting it, for the rollout's report (default: $USER).
    #[arg(long, env = "USER", default_value = "operator")]
    pub by: String,
    /// Apply window, repeatable, e.g. `--window "Sat 02:00-05:00 Europe/Berlin"`: devices
    /// download any time and switch to the model only inside a window.
    #[arg(long = "window")]
    pub windows: Vec<String>,
    /// Devices enrolled into the selector while the rollout runs join the current wave.
    #[arg(long)]
    pub late_joiners: bool,
    /// Show what the plan would take and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Start without asking (scripts; required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

fn parse_on_no_data(s: &str) -> Result<OnNoData, String> {
    match s {
        "hold" => Ok(OnNoData::Hold),
        "pass" => Ok(OnNoData::Pass),
        _ => Err(format!("{s:?} must be hold or pass")),
    }
}

fn parse_on_failure(s: &str) -> Result<OnFailure, String> {
    match s {
        "pause" => Ok(OnFailure::Pause),
        "rollback" => Ok(OnFailure::Rollback),
        _ => Err(format!("{s:?} must be pause or rollback")),
    }
}

/// The plan from the file (if any) with the flags laid over it, validated.
pub fn build_plan(a: &StartArgs) -> anyhow::Result<Plan> {
    let mut plan = match &a.plan {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read plan {}", p.display()))?;
            toml::from_str::<Plan>(&text)
                .map_err(|e| anyhow::anyhow!("invalid rollout plan {}: {e}", p.display()))?
        }
        None => Plan {
            model: String::new(),
            selector: String::new(),
            waves: vec![
                Wave {
                    percent: Some(10.0),
                    count: None,
                    bake: Duration::from_secs(300),
                },
                Wave {
                    percent: Some(100.0),
                    count: None,
                    bake: Duration::from_secs(300),
                },
            ],
            max_concurrent: 100,
            deploys_per_second: 0.0,
            device_deadline: Duration::from_secs(3600),
            on_failure: OnFailure::Pause,
            gates: Gates::default(),
            shadow: None,
            late_joiners: false,
            windows: Vec::new(),
        },
    };
    if let Some(m) = &a.model {
        plan.model = m.clone();
    }
    if let Some(s) = &a.selector {
        plan.selector = s.clone();
    }
    if let Some(w) = &a.waves {
        let bake = plan.waves.first().map(|w| w.bake).unwrap_or_default();
        plan.waves = w
            .iter()
            .map(|&p| Wave {
                percent: Some(p),
                count: None,
                bake,
            })
            .collect();
    }
    if let Some(b) = a.bake {
        for w in &mut plan.waves {
            w.bake = b;
        }
    }
    if let Some(r) = a.deploys_per_second {
        plan.deploys_per_second = r;
    }
    if let Some(n) = a.max_concurrent {
        plan.max_concurrent = n;
    }
    if a.late_joiners {
        plan.late_joiners = true;
    }
    if !a.windows.is_empty() {
        plan.windows = a.windows.clone();
    }
    if let Some(d) = a.deadline {
        plan.device_deadline = d;
    }
    if let Some(f) = a.on_failure {
        plan.on_failure = f;
    }
    let g = &mut plan.gates;
    if let Some(v) = a.min_install_success {
        g.min_install_success = Some(v);
    }
    if let Some(v) = a.max_error_rate {
        g.max_error_rate = Some(v);
    }
    if let Some(v) = a.max_p99_latency_ratio {
        g.max_p99_latency_ratio = Some(v);
    }
    if let Some(v) = a.max_drift_psi {
        g.max_drift_psi = Some(v);
    }
    if let Some(v) = a.min_inferences {
        g.min_inferences = v;
    }
    if let Some(v) = a.on_no_data {
        g.on_no_data = Some(v);
        g.require_data = None;
    }
    if a.shadow.is_some() || a.min_agreement.is_some() || a.max_shadow_latency_ratio.is_some() {
        let s = plan.shadow.get_or_insert_with(ShadowPhase::default);
        if let Some(r) = a.max_shadow_latency_ratio {
            s.max_latency_ratio = Some(r);
        }
        if let Some(d) = a.shadow {
            s.duration = d;
        }
        if let Some(m) = a.min_agreement {
            s.min_agreement = m;
        }
    }
    plan.validate()?;
    Ok(plan)
}

/// Keeps an operator name query-safe (letters, digits, `.-_@`).
pub(crate) fn url_word(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        .take(64)
        .collect()
}

pub(crate) fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "FAIL",
        Verdict::NoData => "no verdict",
    }
}

pub(crate) fn print_status(r: &RolloutView) {
    println!(
        "rollout {}  {}  {}  (selector {:?}, {} devices selected)",
        r.id, r.model, r.status, r.selector, r.selected
    );
    if let Some(reason) = &r.reason {
        println!("  reason: {reason}");
    }
    if let Some(w) = &r.waiting {
        println!("  waiting: {w}");
    }
    println!(
        "  wave {}/{} stage {} since {}; started {}",
        r.wave,
        r.waves.len(),
        r.stage,
        fmt_ms(r.stage_since_ms),
        fmt_ms(r.created_at_ms)
    );
    if let Some(left) = super::rollout_watch::time_left(r) {
        println!("  stage time left: {left}");
    }
    // Per-wave figures: the devices each wave adds, then where they are.
    println!(
        "  {:<5} {:>8} {:>11} {:>9} {:>8} {:>7} {:>10}  BAKE",
        "WAVE", "DEVICES", "CUMULATIVE", "ASSIGNED", "HEALTHY", "FAILED", "IN FLIGHT"
    );
    let mut before = 0;
    for w in &r.waves {
        println!(
            "  {:<5} {:>8} {:>11} {:>9} {:>8} {:>7} {:>10}  {}",
            w.wave,
            w.target.saturating_sub(before),
            w.target,
            w.assigned,
            w.healthy,
            w.failed,
            w.in_flight,
            w.bake
        );
        before = before.max(w.target);
    }
    if !r.gates.is_empty() {
        println!(
            "  {:<26} {:>10}  {:<10} {:<10} BASIS",
            "GATE", "VALUE", "LIMIT", "VERDICT"
        );
        for g in &r.gates {
            println!(
                "  {:<26} {:>10}  {:<10} {:<10} {}",
                g.gate,
                g.value.map_or("-".into(), |v| format!("{v:.4}")),
                g.threshold,
                verdict(g.verdict),
                g.basis
            );
            if let Some(why) = &g.reason {
                println!("  {:<26} {:>10}  {:<10} {:<10} ({why})", "", "", "", "");
            }
        }
    }
    let failed: Vec<_> = r
        .device_slots
        .iter()
        .filter(|d| d.state == "failed")
        .collect();
    for d in failed.iter().take(10) {
        println!(
            "  failed {} (wave {}): {}",
            d.device,
            d.wave,
            d.detail.as_deref().unwrap_or("-")
        );
    }
}

pub(crate) fn is_final(r: &RolloutView) -> bool {
    matches!(
        r.status.as_str(),
        "completed" | "paused" | "rolled-back" | "aborted"
    )
}

pub async fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Start(a) if a.dry_run => preview(&a).await,
        RolloutCommand::Plan(a) => preview(&a).await,
        RolloutCommand::Start(a) => start(&a).await,
        RolloutCommand::Status { id, server, output } => {
            let client = Client::new(&server)?;
            match id {
                Some(id) => {
                    let r: RolloutView = client.get(&format!("/v1/rollouts/{id}")).await?;
                    if output == Output::Json {
                        return print_json(&r);
                    }
                    print_status(&r);
                }
                None => {
                    let all: Vec<RolloutView> = client.get("/v1/rollouts").await?;
                    if output == Output::Json {
                        return print_json(&all);
                    }
                    for r in all.iter().filter(|r| !is_final(r) || r.status == "paused") {
                        print_status(r);
                    }
                }
            }
            Ok(())
        }
        RolloutCommand::List { server, output } => {
            let all: Vec<RolloutView> = Client::new(&server)?.get("/v1/rollouts").await?;
            if output == Output::Json {
                return print_json(&all);
            }
            println!(
                "{:<4} {:<28} {:<13} {:<6} {:<20} SELECTOR",
                "ID", "MODEL", "STATUS", "WAVE", "STARTED"
            );
            for r in &all {
                println!(
                    "{:<4} {:<28} {:<13} {:<6} {:<20} {}",
                    r.id,
                    r.model,
                    r.status,
                    format!("{}/{}", r.wave, r.waves.len()),
                    fmt_ms(r.created_at_ms),
                    r.selector
                );
            }
            Ok(())
        }
        RolloutCommand::Watch {
            id,
            interval,
            give_up_after,
            server,
            output,
        } => super::rollout_watch::watch(id, interval, give_up_after, &server, output).await,
        RolloutCommand::Pause(a) => operate(a, "pause").await,
        RolloutCommand::Resume(a) => operate(a, "resume").await,
        RolloutCommand::Abort(a) => operate(a, "abort").await,
        RolloutCommand::Retry(a) => operate(a, "retry").await,
        RolloutCommand::Report { id, server, output } => {
            let r: RolloutReport = Client::new(&server)?
                .get(&format!("/v1/rollouts/{id}/report"))
                .await?;
            if output == Output::Json {
                return print_json(&r);
            }
            print_status(&r.rollout);
            println!("\n  TIMELINE");
            for e in &r.events {
                println!("  {}  {:<14} {}", fmt_ms(e.at_ms), e.kind, e.detail);
                for g in &e.gates {
                    // Which gates decided, and on what: verdict, basis, and why not.
                    println!(
                        "  {:>21} {:<24} {:>10} {:<10} {:<10} {}{}",
                        "",
                        g.gate,
                        g.value.map_or("-".into(), |v| format!("{v:.4}")),
                        g.threshold,
                        verdict(g.verdict),
                        g.basis,
                        g.reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
    }
}

/// The plan's preview from the server, printed (text or JSON).
async fn preview(a: &StartArgs) -> anyhow::Result<()> {
    let plan = build_plan(a)?;
    let p: PreviewView = Client::new(&a.server)?
        .post("/v1/rollouts/preview", &plan)
        .await?;
    if a.output == Output::Json {
        return print_json(&p);
    }
    print_preview(&plan, &p);
    Ok(())
}

fn print_preview(plan: &Plan, p: &PreviewView) {
    println!(
        "{} to {} of {} devices matching {:?}",
        plan.model,
        p.targets.len(),
        p.matched,
        p.selector
    );
    for w in &p.waves {
        let note = if w.adds == 0 {
            "  (adds none: passes at once)"
        } else {
            ""
        };
        println!(
            "  wave {}: +{} -> {} devices, bake {}{note}",
            w.wave, w.adds, w.cumulative, w.bake
        );
    }
    for h in &p.held {
        println!("  held by rollout {}: {}", h.rollout, h.device);
    }
}

/// Asks on the terminal; anything but y/yes declines.
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::Write as _;
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim().to_lowercase().as_str(), "y" | "yes"))
}

async fn start(a: &StartArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let plan = build_plan(a)?;
    if !a.yes && !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "stdin is not a terminal, so the rollout cannot be confirmed: pass --yes to start it \
             (or --dry-run to see what it would take)"
        );
    }
    let client = Client::new(&a.server)?;
    if !a.yes {
        let p: PreviewView = client.post("/v1/rollouts/preview", &plan).await?;
        print_preview(&plan, &p);
        if p.targets.is_empty() {
            anyhow::bail!("the plan targets no device; nothing started");
        }
        let q = format!(
            "Start rolling out {} to {} devices?",
            plan.model,
            p.targets.len()
        );
        if !confirm(&q)? {
            anyhow::bail!("not started");
        }
    }
    let path = format!("/v1/rollouts?by={}", url_word(&a.by));
    let r: RolloutView = client.post(&path, &plan).await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!(
        "rollout {} started: {} to {} devices matching {:?}, {} waves; follow it with `drover rollout watch {}`",
        r.id,
        r.model,
        r.selected,
        r.selector,
        r.waves.len(),
        r.id
    );
    Ok(())
}

async fn operate(a: IdArgs, op: &str) -> anyhow::Result<()> {
    let r: RolloutView = Client::new(&a.server)?
        .post(
            &format!("/v1/rollouts/{}/{op}?by={}", a.id, url_word(&a.by)),
            &(),
        )
        .await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!("rollout {} is now {}", r.id, r.status);
    Ok(())
}
