//! The `drover` command line: one module per subcommand, each with its args and `run`.

pub mod broker;
pub mod client;
pub mod demo;
pub mod device;
pub mod doctor;
pub mod keys;
pub mod model;
pub mod serve;

use clap::{Parser, Subcommand, ValueEnum};

/// Drover: run, monitor and update ML models on fleets of edge devices.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole system end to end in a temp dir: control plane, a fleet of agents,
    /// training, signed deploy, live inference, telemetry. Nothing to install.
    Demo(demo::DemoArgs),
    /// Run the control plane: embedded MQTT broker, ingest, registry, HTTP API.
    Serve(serve::ServeArgs),
    /// Print the default `drover serve` configuration file.
    PrintDefaultConfig,
    /// Manage the root key, signing keys and keyring.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Publish and inspect models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Enroll, list, inspect, deploy to and decommission devices.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// External broker setup: write a mosquitto configuration (mutual TLS, CRL, ACLs).
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
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

/// Formats milliseconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn fmt_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant), good for any date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn epoch_millis_format_as_utc() {
        assert_eq!(super::fmt_ms(0), "1970-01-01 00:00:00");
        assert_eq!(super::fmt_ms(1_795_564_800_000), "2026-11-25 00:00:00");
    }
}
