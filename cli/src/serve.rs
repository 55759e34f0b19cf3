//! `drover serve`.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;

use drover_control_plane::config::{Overrides, ServeConfig};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see `drover print-default-config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (database, keys, models, API token).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP API address; port 0 picks a free port.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Embedded broker address; port 0 picks a free port.
    #[arg(long)]
    pub mqtt_listen: Option<String>,
    /// A host name or address devices reach the broker by, `HOST` or `HOST:PORT`
    /// (repeatable; replaces `advertise` in the config file). The broker certificate
    /// carries every one; `device enroll` writes the first into agent configs. Required
    /// with an unspecified --mqtt-listen (0.0.0.0, [::]).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub advertise: Vec<String>,
    /// Use an external broker instead: mqtt://user:pass@host:port.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// Fault injection for crash tests: SIGKILL self the N-th time POINT is passed.
    #[arg(long, hide = true, value_name = "POINT:N")]
    pub crash_at: Option<String>,
    /// Development only: let the embedded broker accept plaintext MQTT (passwords, no
    /// client certificates). Logs a warning. Default: mutual TLS.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Serve the HTTP API in plaintext even beyond loopback (`api_tls = "off"`; `drover
    /// doctor` reports it). Default: TLS with a certificate from the fleet CA whenever the
    /// API listens beyond loopback.
    #[arg(long)]
    pub api_plaintext: bool,
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Every device holds a socket on the embedded broker (three with the mutual-TLS front:
/// the device's, and both ends of the front's loopback link to rumqttd), so the common
/// soft limit of 1,024 open files would refuse devices long before 10,000. The soft limit
/// is raised to the hard one, which an unprivileged process may do; what stays is logged.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let l = getrlimit(Resource::Nofile);
        // `None` is "unlimited": nothing to raise (or, for the hard limit, no number the
        // kernel would take as a soft one).
        if let (Some(soft), Some(hard)) = (l.current, l.maximum) {
            if soft < hard {
                let raised = rustix::process::Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => tracing::info!(
                        from = soft,
                        to = hard,
                        "raised the open-file soft limit to the hard limit"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        soft,
                        hard,
                        "cannot raise the open-file soft limit"
                    ),
                }
            } else {
                tracing::info!(soft, hard, "open-file limit");
            }
        }
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.crash_at {
        drover_host::crash::arm(spec).map_err(anyhow::Error::msg)?;
    }
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("DROVER_"))
        .collect();
    let overrides = Overrides {
        data_dir: args.data_dir,
        http_listen: args.http_listen,
        mqtt_listen: args.mqtt_listen,
        broker_url: args.broker_url,
        allow_plaintext: args.allow_plaintext,
        api_plaintext: args.api_plaintext,
        advertise: args.advertise,
    };
    let config = ServeConfig::load(args.config.as_deref(), &env, &overrides)?;
    raise_open_file_limit();
    let handle = drover_control_plane::serve::run(config, signal()).await?;
    println!(
        "drover serve: api {} broker {}",
        handle.api_url(),
        handle.broker_url()
    );
    handle.wait().await;
    Ok(())
}
