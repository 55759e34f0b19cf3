//! The `drover` command line: one module per subcommand, each with its args and `run`.

pub mod agent_files;
pub mod broker;
pub mod client;
pub mod demo;
pub mod device;
pub mod device_history;
pub mod device_wait;
pub mod doctor;
pub mod drift;
pub mod integration;
pub mod keys;
pub mod model;
pub mod rollout;
pub mod rollout_watch;
pub mod serve;
pub mod token;
pub mod train;

use clap::{Parser, Subcommand, ValueEnum};

/// Drover: run, monitor and update ML models on fleets of edge devices.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about, after_help = client::EXIT_CODES)]
pub struct Cli {
    /// Log format on stderr: text (coloured only on a terminal) or json (one object per
    /// line, for journald/Loki/any log shipper).
    #[arg(
        long,
        global = true,
        env = "DROVER_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole system end to end in a temp dir: control plane, a fleet of agents,
    /// training, signed deploy, live inference, telemetry. Nothing to install.
    Demo(demo::DemoArgs),
    /// Run the control plane: embedded MQTT broker, ingest, registry, HTTP API.
    Serve(serve::ServeArgs),
    /// Print the default `drover serve` configuration file (TOML; `--output json`: the
    /// same settings as one JSON object).
    PrintDefaultConfig {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Manage the root key, signing keys and keyring.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Publish and inspect models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Enroll, list, inspect, deploy to and decommission devices.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// Staged rollouts: canary and waves, health gates, pause, resume, abort (rollback).
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Drift scores per device, label group and fleet (PSI, chi-square).
    #[command(subcommand)]
    Drift(drift::DriftCommand),
    /// Training jobs: the built-in trainer, manual runs, job state and outcome.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// External broker setup: write a mosquitto configuration (mutual TLS, CRL, ACLs).
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
    /// Per-user API tokens with roles (viewer, deployer, admin). Admin only.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Read-only identities for integrations (Node-RED, Telegraf): certificates that may
    /// only subscribe to the JSON stream `drover/v1/json/#`. Admin only.
    #[command(subcommand)]
    Integration(integration::IntegrationCommand),
    /// The API's audit log: every call that tried to change something, by whom. Admin only.
    Audit(token::AuditArgs),
    /// Report unsafe settings (key file modes, plaintext broker, expiring certificates);
    /// exits non-zero when it finds any.
    Doctor(doctor::DoctorArgs),
}

/// How listings are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// `drover print-default-config`: the TOML an operator edits, or under `--output json` the
/// same settings as a JSON object (read back from that TOML, so both say the same).
pub fn print_default_config(output: Output) -> anyhow::Result<()> {
    let text = drover_control_plane::config::ServeConfig::default_toml();
    match output {
        Output::Text => print!("{text}"),
        Output::Json => client::print_json(&toml::from_str::<serde_json::Value>(&text)?)?,
    }
    Ok(())
}

/// Formats milliseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn fmt_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    // RFC 3339 `2026-11-25T00:00:00Z`, shown with a space and without the zone letter.
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn epoch_millis_format_as_utc() {
        assert_eq!(super::fmt_ms(0), "1970-01-01 00:00:00");
        assert_eq!(super::fmt_ms(1_795_564_800_000), "2026-11-25 00:00:00");
    }
}
