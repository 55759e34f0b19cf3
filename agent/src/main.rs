//! `drover-agent`: thin entry point. Parses flags, loads the layered config, sets up
//! tracing and calls [`drover_agent::run`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_agent::config::AgentConfig;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Drover edge agent: verified model store, local inference API, telemetry.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, default_value = "/etc/drover/agent.toml")]
    config: PathBuf,
    /// Override a config key: `--set telemetry.interval_ms=500` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Override `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `api_addr`.
    #[arg(long)]
    api_addr: Option<String>,
    /// Override `metrics_addr` (the Prometheus `/metrics` listener).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Override `broker_url`.
    #[arg(long)]
    broker_url: Option<String>,
    /// Fault injection for crash tests: SIGKILL self at the N-th pass of POINT.
    #[arg(long, hide = true, value_name = "POINT:N")]
    crash_at: Option<String>,
    /// Log format on stderr: text (coloured only on a terminal) or json (one object per
    /// line, for journald/Loki/any log shipper).
    #[arg(long, env = "DROVER_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Probation before a new model is declared healthy, in ms (tests shorten it).
    #[arg(long, hide = true, default_value_t = 2000)]
    probation_ms: u64,
    /// Fault injection for crash tests: arm POINT:N in every isolated self-test child.
    #[arg(long, hide = true, value_name = "POINT:N")]
    loader_crash_at: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the default (hardened) config as TOML.
    PrintDefaultConfig,
    /// Run the agent (the default).
    Run,
    /// Load and validate the config and check the files it names (TLS files present, keys
    /// and a config holding the device key private); print it (secrets redacted) and exit,
    /// non-zero with every problem listed.
    CheckConfig,
    /// Internal: load and self-test one model under limits and print a JSON report (the
    /// agent runs itself so for every new model, `runtime.isolate`).
    #[command(hide = true)]
    CheckModel(CheckModelArgs),
}

#[derive(clap::Args)]
struct CheckModelArgs {
    #[arg(long)]
    model: PathBuf,
    /// The manifest as JSON; `-` reads it from stdin.
    #[arg(long)]
    manifest: PathBuf,
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Address-space limit (RLIMIT_AS).
    #[arg(long)]
    memory_bytes: u64,
    /// CPU-time limit (RLIMIT_CPU).
    #[arg(long)]
    cpu_seconds: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckModel(a)) = &cli.cmd {
        return drover_agent::isolate::child_main(drover_agent::isolate::ChildArgs {
            model: a.model.clone(),
            manifest: a.manifest.clone(),
            threads: a.threads,
            memory_bytes: a.memory_bytes,
            cpu_seconds: a.cpu_seconds,
            crash_at: cli.crash_at.clone(),
        });
    }
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, bad_filter) = log_filter(rust_log.as_deref());
    // No colour codes in files and journald: ANSI only when stderr is a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if cli.log_format == "json" {
        tracing_subscriber::registry()
            .with(fmt.json().with_ansi(false))
            .with(filter)
            .init();
    } else {
        tracing_subscriber::registry()
            .with(fmt.with_ansi(ansi))
            .with(filter)
            .init();
    }
    if let Some(err) = bad_filter {
        tracing::warn!(rust_log = ?rust_log, error = %err, "RUST_LOG not understood; logging at info");
    }
    // tract can panic on hostile models: new ones are loaded first in the isolated child;
    // in unwinding builds the runtime catches a panic, and this puts the message in the
    // structured log instead of bare stderr (with panic = "abort" it is the last line).
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic (caught where the runtime guards it)");
    }));
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter from `RUST_LOG`: comma-separated `level`, `target` or `target=level` directives
/// (`warn,drover_agent=debug`); unset or empty means `info`. tracing-subscriber's `Targets`
/// rather than `EnvFilter`: no regex engine in the device binary (BENCHMARKS.md, issue 8), at the
/// price of `EnvFilter`'s span and field matchers. Unparsable input falls back to `info` and
/// returns the parse error for a warning.
fn log_filter(rust_log: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match rust_log.map(str::trim) {
        None | Some("") => (info(), None),
        Some(s) => match s.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (info(), Some(e.to_string())),
        },
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    if let Some(Cmd::PrintDefaultConfig) = cli.cmd {
        print!("{}", AgentConfig::default().to_toml()?);
        return Ok(());
    }
    if let Some(spec) = &cli.crash_at {
        drover_host::crash::arm(spec).map_err(anyhow::Error::msg)?;
    }
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with(drover_agent::config::ENV_PREFIX))
        .collect();
    let mut overrides = Vec::new();
    for s in &cli.set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {s:?}: expected KEY=VALUE"))?;
        overrides.push((k.to_owned(), v.to_owned()));
    }
    if let Some(d) = &cli.data_dir {
        overrides.push(("data_dir".into(), d.display().to_string()));
    }
    if let Some(a) = &cli.api_addr {
        overrides.push(("api_addr".into(), a.clone()));
    }
    if let Some(m) = &cli.metrics_addr {
        overrides.push(("metrics_addr".into(), m.clone()));
    }
    if let Some(b) = &cli.broker_url {
        overrides.push(("broker_url".into(), b.clone()));
    }
    if let Some(Cmd::CheckConfig) = cli.cmd {
        let cfg = AgentConfig::check(Some(&cli.config), &env, &overrides)?;
        println!("{:#?}", cfg.raw);
        return Ok(());
    }
    let cfg = AgentConfig::load(Some(&cli.config), &env, &overrides)?;
    let tuning = drover_agent::Tuning {
        probation: std::time::Duration::from_millis(cli.probation_ms),
        loader_crash_at: cli.loader_crash_at.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.raw.runtime.io_worker_threads())
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
        };
        let agent = drover_agent::run_with(cfg.raw, tuning, shutdown).await?;
        // Tests and scripts read the bound addresses from stdout, one line each; a reader
        // that closed the pipe after the line it wanted must not kill the agent (println!
        // panics on a broken pipe), so write errors are ignored.
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "api_addr={}", agent.api_addr());
            let _ = writeln!(out, "metrics_addr={}", agent.metrics_addr());
            let _ = out.flush();
        }
        agent.wait().await?;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn rust_log_directives_set_levels_per_target() {
        let (f, err) = log_filter(Some("warn,drover_agent=debug"));
        assert_eq!(err, None);
        assert!(f.would_enable("drover_agent::core", &Level::DEBUG));
        assert!(!f.would_enable("drover_agent::core", &Level::TRACE));
        assert!(f.would_enable("rumqttc::state", &Level::WARN));
        assert!(!f.would_enable("rumqttc::state", &Level::INFO));
    }

    #[test]
    fn unset_empty_or_bad_rust_log_means_info() {
        for input in [None, Some(""), Some("  ")] {
            let (f, err) = log_filter(input);
            assert_eq!(err, None, "{input:?}");
            assert!(f.would_enable("drover_agent", &Level::INFO));
            assert!(!f.would_enable("drover_agent", &Level::DEBUG));
        }
        let (f, err) = log_filter(Some("drover_agent=loud"));
        assert!(err.is_some());
        assert!(f.would_enable("tract_core", &Level::INFO));
        assert!(!f.would_enable("tract_core", &Level::DEBUG));
    }
}
