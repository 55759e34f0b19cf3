//! `drover-tests`: end-to-end tests of the whole system (in `tests/`), and the helpers
//! they share: real outside peers (mosquitto) started on loopback, free ports, waiting.
//!
//! Layout:
//! - [`mosquitto`]: a real Debian mosquitto on a free loopback port, killed on drop: with
//!   password file, `%u` pattern ACLs and persistence, or with the mutual-TLS configuration
//!   `drover broker config mosquitto` writes (certificate identity, CRL, ACL).
//! - [`free_port`], [`wait_until`]: loopback port picking and bounded polling.
//! - [`slurm`]: a real single-node Slurm cluster (munged, slurmctld, slurmd) on loopback.
//! - [`training`]: store, keys, a shifting synthetic world and fleet data for the
//!   continuous-training tests.
//! - [`sim`]: the fleet simulator (thousands of protocol-true virtual devices in one
//!   process), run by the `drover-fleet-sim` binary, the benches and `tests/fleet_sim.rs`.
//! - [`serve_process`]: `drover serve` as a child process, for benches that need the
//!   broker and control plane in their own process (open-file limits, peak RSS).

pub mod fleet;
pub mod mosquitto;
pub mod serve_process;
pub mod sim;
pub mod slurm;
pub mod training;

use std::future::Future;
use std::time::Duration;

/// Picks a free loopback TCP port (for peers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `check` until it returns `Some` or `timeout` passes. Returns what it found, or an
/// error naming `what` so a failing end-to-end test says which step never happened.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether tests that need a real outside peer must fail (CI) rather than skip (a quick
/// local loop on a machine without the peer installed).
pub fn peers_required() -> bool {
    std::env::var_os("DROVER_REQUIRE_PEERS").is_some_and(|v| v == "1")
}

/// Path of a workspace binary (`drover`, `drover-agent`). `cargo test --workspace` builds
/// every package's binaries before any test runs; when a test is run alone (`-p
/// drover-tests`) the binary is built on demand.
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    let exe = std::env::current_exe()?;
    // A binary of this package (`drover-soak`) sits beside the workspace's binaries.
    let beside = exe.with_file_name(name);
    if beside.exists() && exe.parent().and_then(|d| d.file_name()) != Some("deps".as_ref()) {
        return Ok(beside);
    }
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test binary has no target dir")?
        .to_path_buf();
    let path = profile_dir.join(name);
    if !path.exists() {
        let package = match name {
            "drover" => "drover-cli",
            "drover-agent" => "drover-agent",
            other => anyhow::bail!("unknown workspace binary {other}"),
        };
        // Benches run from target/release: build the binary they measure in release too.
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let st = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .args(release.then_some("--release"))
            .status()?;
        anyhow::ensure!(st.success(), "building {name} failed");
    }
    Ok(path)
}

/// Runs the `drover` CLI with args; returns stdout, or an error with stderr.
pub fn drover_cli(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(workspace_bin("drover")?)
        .args(args)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "drover {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `drover device list --output json` through the CLI binary.
pub fn cli_devices(server: &[&str]) -> Vec<serde_json::Value> {
    drover_cli(&[&["device", "list", "--output", "json"][..], server].concat())
        .ok()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Enrolls a device through the CLI (`device enroll --out`) and rewrites the parts of
/// its config that belong to this test machine: data dir, API address, and a short
/// telemetry interval. The config file is left with those edits, as an operator would.
pub fn cli_enroll(
    server: &[&str],
    dir: &std::path::Path,
    id: &str,
    labels: &[&str],
    api_addr: &str,
) -> anyhow::Result<drover_agent::config::AgentConfig> {
    let out = dir.join(format!("{id}.toml"));
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["device", "enroll", id, "--out", out_s.as_str()];
    for l in labels {
        args.extend(["--label", l]);
    }
    args.extend(server);
    drover_cli(&args)?;
    // Loaded as the agent loads it (TLS paths relative to the file made absolute), so the
    // returned config also runs in process.
    let mut cfg =
        drover_agent::config::AgentConfig::load(Some(&out), &Default::default(), &[])?.raw;
    cfg.data_dir = dir.join(format!("{id}-data"));
    cfg.api_addr = api_addr.to_string();
    cfg.metrics_addr = "127.0.0.1:0".into();
    cfg.telemetry.interval_ms = 300;
    std::fs::write(&out, cfg.to_toml()?)?;
    Ok(cfg)
}
