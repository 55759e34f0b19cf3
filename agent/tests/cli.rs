//! The `drover-agent` binary's command line: default config, config errors.

use std::process::Command;

use drover_agent::config::AgentConfig;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drover-agent"))
}

#[test]
fn print_default_config_prints_the_hardened_defaults_as_toml() {
    let out = bin().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let cfg = AgentConfig::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cfg, AgentConfig::default());
    assert!(cfg.api_addr.starts_with("127.0.0.1:"));
}

#[test]
fn invalid_config_reports_every_error_at_once_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "version = 2\ndevice_id = \"bad/id\"\ndevice_key = \"00\"\nroot_public_key = \"\"\n\
         broker_url = \"http://x\"\ndata_dir = \"/tmp/x\"\napi_addr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["--config"])
        .arg(&path)
        .arg("check-config")
        .env("DROVER_AGENT_TELEMETRY_INTERVAL_MS", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in [
        "version = 2 is not supported",
        "device_id:",
        "device_key:",
        "root_public_key:",
        "broker_url:",
        "telemetry.interval_ms:",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
    // The secret never reaches the output.
    assert!(!err.contains("device_key = "));
}
