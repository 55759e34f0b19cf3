//! `drover device enroll|list|show|deploy|label|telemetry|history|decommission`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use super::client::{parse_kv, print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::{
    DeployRequest, DeployResponse, DeviceView, EnrollRequest, EnrollResponse, LabelRequest,
    RemoveRequest, RemoveResponse,
};

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Issue a device identity and write the agent's config file.
    Enroll(EnrollArgs),
    /// List devices.
    List {
        /// Only devices with this label `key=value` (repeatable: all must match).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Only devices currently online.
        #[arg(long)]
        online: bool,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one device.
    Show {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Send a signed command telling a device to install a model.
    Deploy {
        id: String,
        /// NAME@X.Y.Z
        #[arg(long)]
        model: String,
        /// Run the model in shadow beside the active one instead of activating it.
        #[arg(long)]
        shadow: bool,
        /// Follow the device's progress (downloading, verified, active, healthy) and exit
        /// by outcome: 0 healthy, 20 failed/refused/rolled back, 21 expired unanswered,
        /// 22 --timeout passed.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (default: when the command expires).
        #[arg(long, value_name = "SECS", requires = "wait")]
        timeout: Option<u64>,
        /// On a device whose agent holds one model (protocol 1), replace a model of another
        /// name. Agents that hold several models put each name in its own slot.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Send a signed command telling a device to remove a model (its slot and files).
    Remove {
        id: String,
        /// The model's NAME (the slot), without a version.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Set or remove a device's labels (audited). A device that comes to match a running
    /// rollout's selector joins it at the current wave when the plan takes late joiners.
    Label {
        id: String,
        /// Labels to set, `key=value`.
        #[arg(value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Label key to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
        /// Who is asking, for the device's audit log (default: $USER).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// A device's recent telemetry windows, newest first.
    Telemetry {
        id: String,
        /// At most this many windows.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// What happened to a device, oldest first: commands, the progress it reported and
    /// operator changes (labels, decommissioning) with who made them.
    History {
        id: String,
        /// At most this many lines (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a device at once: the broker and ingest refuse it from now on.
    Decommission {
        id: String,
        /// Who is asking, for the device's audit log (default: $USER).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// The human form of `device show`.
fn print_device(d: &DeviceView) {
    println!("{}", d.id);
    println!("  online         {}", d.online);
    if d.decommissioned {
        println!("  DECOMMISSIONED");
    }
    let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  labels         {}", labels.join(","));
    if !d.agent_labels.is_empty() {
        let agent: Vec<String> = d
            .agent_labels
            .iter()
            .map(|(k, v)| format!("agent.{k}={v}"))
            .collect();
        println!(
            "  agent labels   {} (not used by selectors)",
            agent.join(",")
        );
    }
    println!(
        "  agent          {} ({} {})",
        d.agent_version.as_deref().unwrap_or("-"),
        d.os.as_deref().unwrap_or("-"),
        d.arch.as_deref().unwrap_or("-")
    );
    println!(
        "  last seen      {}",
        d.last_seen_ms.map(fmt_ms).unwrap_or_else(|| "never".into())
    );
    println!(
        "  active model   {}",
        d.active_model.as_deref().unwrap_or("-")
    );
    println!(
        "  staged model   {}",
        d.staged_model.as_deref().unwrap_or("-")
    );
    println!(
        "  last phase     {}",
        d.last_phase.as_deref().unwrap_or("-")
    );
    if let Some(detail) = &d.last_detail {
        println!("  last detail    {detail}");
    }
    println!("  enrolled       {}", fmt_ms(d.enrolled_at_ms));
    if let Some(p) = d.protocol {
        println!(
            "  protocol       {p}{}",
            if p >= 2 {
                " (several models)"
            } else {
                " (one model)"
            }
        );
    }
    if let Some(r) = &d.runtime {
        println!(
            "  runtime        {} {} (loads {})",
            r.engine,
            r.version,
            r.formats.join(", ")
        );
    }
    print_slots(d);
}

/// Every model slot, one line each, and the budget.
fn print_slots(d: &DeviceView) {
    if d.models.is_empty() {
        return;
    }
    println!("  models");
    for m in &d.models {
        let mut extra = Vec::new();
        if let Some(s) = &m.staged {
            extra.push(format!("staged {s}"));
        }
        if let Some(s) = &m.shadow {
            extra.push(format!("shadow {s}"));
        }
        if let Some(p) = &m.previous {
            extra.push(format!("previous {p}"));
        }
        println!(
            "    {:<16} {:<8} {:<24} {:>8} KiB disk {:>8} KiB mem  {}",
            m.name,
            m.phase,
            m.active.as_deref().unwrap_or("-"),
            m.disk_bytes / 1024,
            m.memory_bytes / 1024,
            extra.join(", ")
        );
    }
    if let Some(b) = &d.budget {
        let or_any =
            |v: Option<u64>| v.map_or("unlimited".to_owned(), |v| format!("{} KiB", v / 1024));
        println!(
            "  budget         models {}, memory {}, disk {}",
            b.max_models
                .map_or("unlimited".to_owned(), |n| n.to_string()),
            or_any(b.memory_bytes),
            or_any(b.disk_bytes)
        );
    }
}

/// `drover device enroll`.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// Device id: 1-64 of [A-Za-z0-9._:-].
    pub id: String,
    /// Label `key=value` (repeatable), used by rollout selectors.
    #[arg(long = "label", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Broker URL the agent connects to (default: the server's, from its first
    /// `--advertise`). Refused unless the broker's certificate names its host.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// The agent's data directory on the device (default: the agent's own,
    /// /var/lib/drover-agent, left out of the config).
    #[arg(long)]
    pub agent_data_dir: Option<PathBuf>,
    /// Where to write the agent config (contains the device secret; mode 0600). The
    /// TLS files (`ID.ca.pem`, `ID.cert.pem`, `ID.key.pem`, 0600) go beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Directory the TLS files will be copied to on the device, as written into the
    /// config (default: the config's own directory: the paths are written relative to
    /// it, so the config and its files can be copied anywhere together).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Re-enroll a decommissioned id for the hardware that replaces it: a new key and
    /// certificate, the device's history kept, its labels kept unless --label is given.
    /// The old certificate stays revoked.
    #[arg(long)]
    pub replace: bool,
    /// Who is asking, for the device's audit log (default: $USER).
    #[arg(long, env = "USER", default_value = "operator")]
    pub by: String,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// What `device enroll --output json` prints (never the device secret: that is in the
/// config file only).
#[derive(Debug, serde::Serialize)]
struct EnrolledView {
    device: String,
    config_file: PathBuf,
    broker_url: String,
    replaced: bool,
}

pub async fn run(cmd: DeviceCommand) -> anyhow::Result<()> {
    match cmd {
        DeviceCommand::Enroll(args) => enroll(args).await,
        DeviceCommand::List {
            labels,
            online,
            server,
            output,
        } => list(labels, online, server, output).await,
        DeviceCommand::Show { id, server, output } => show(id, server, output).await,
        DeviceCommand::Deploy {
            id,
            model,
            shadow,
            wait,
            timeout,
            replace,
            server,
            output,
        } => {
            let wait = wait.then(|| timeout.map(std::time::Duration::from_secs));
            let req = DeployRequest {
                model,
                mode: Some(if shadow { "shadow" } else { "activate" }.into()),
                replace,
            };
            deploy(id, req, wait, server, output).await
        }
        DeviceCommand::Remove {
            id,
            model,
            server,
            output,
        } => remove(id, model, server, output).await,
        DeviceCommand::Label {
            id,
            labels,
            remove,
            by,
            server,
            output,
        } => label(id, labels, remove, by, server, output).await,
        DeviceCommand::Telemetry {
            id,
            limit,
            server,
            output,
        } => super::device_history::telemetry(&Client::new(&server)?, &id, limit, output).await,
        DeviceCommand::History {
            id,
            limit,
            server,
            output,
        } => super::device_history::history(&Client::new(&server)?, &id, limit, output).await,
        DeviceCommand::Decommission {
            id,
            by,
            server,
            output,
        } => decommission(id, by, server, output).await,
    }
}

/// `device enroll`: the identity from the server, the agent's config and TLS files on disk.
async fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let EnrollArgs {
        id,
        labels,
        broker_url,
        agent_data_dir,
        out,
        cert_dir,
        server,
        replace,
        by,
        output,
    } = a;
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    // Refused here with the same limits the server applies, before anything is sent.
    drover_control_plane::fleet::check_labels(&labels)?;
    let r: EnrollResponse = Client::new(&server)?
        .post(
            "/v1/devices",
            &EnrollRequest {
                id: id.clone(),
                labels: labels.clone(),
                replace,
                by: Some(by),
                broker_url,
            },
        )
        .await?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    // Relative TLS paths resolve against the config's directory on the device.
    let cert_dir = cert_dir.unwrap_or_default();
    let cfg = crate::agent_files::write_agent_files(
        r,
        &dir,
        Some(&cert_dir),
        agent_data_dir.unwrap_or_else(|| drover_agent::config::AgentConfig::default().data_dir),
        labels,
    )?;
    let text = crate::agent_files::enrolled_toml(&cfg).context("cannot render the agent config")?;
    drover_host::fs::write_private(&out, text.as_bytes())?;
    if output == Output::Json {
        return print_json(&EnrolledView {
            device: id,
            config_file: std::path::absolute(&out).unwrap_or(out),
            broker_url: cfg.broker_url,
            replaced: replace,
        });
    }
    let what = if replace {
        "re-enrolled for its replacement (new key and certificate; the old ones stay revoked)"
    } else {
        "enrolled"
    };
    println!(
        "{id} {what}; agent config written to {} (TLS certificate and key beside it, 0600)",
        out.display()
    );
    Ok(())
}

/// `device list`, filtered by labels and online state on the server.
async fn list(
    labels: Vec<(String, String)>,
    online: bool,
    server: ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut q = Vec::new();
    if !labels.is_empty() {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        q.push(format!("label={}", l.join(",")));
    }
    if online {
        q.push("online=true".into());
    }
    let path = if q.is_empty() {
        "/v1/devices".to_string()
    } else {
        format!("/v1/devices?{}", q.join("&"))
    };
    let v: Vec<DeviceView> = Client::new(&server)?.get(&path).await?;
    if output == Output::Json {
        return print_json(&v);
    }
    println!(
        "{:<24} {:<7} {:<8} {:<24} LABELS",
        "ID", "ONLINE", "ARCH", "ACTIVE MODEL"
    );
    for d in &v {
        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<24} {:<7} {:<8} {:<24} {}",
            d.id,
            if d.decommissioned {
                "revoked"
            } else if d.online {
                "yes"
            } else {
                "no"
            },
            d.arch.as_deref().unwrap_or("-"),
            d.active_model.as_deref().unwrap_or("-"),
            labels.join(",")
        );
    }
    Ok(())
}

/// `device show`.
async fn show(id: String, server: ServerArgs, output: Output) -> anyhow::Result<()> {
    let v: DeviceView = Client::new(&server)?
        .get(&format!("/v1/devices/{id}"))
        .await?;
    if output == Output::Json {
        return print_json(&v);
    }
    print_device(&v);
    Ok(())
}

/// `device remove`: the server signs and sends the command.
async fn remove(
    id: String,
    model: String,
    server: ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    let r: RemoveResponse = Client::new(&server)?
        .post(
            &format!("/v1/devices/{id}/remove"),
            &RemoveRequest { model },
        )
        .await?;
    if output == Output::Json {
        return print_json(&r);
    }
    println!(
        "command {} sent to {}: remove model {} (expires {}); `drover device show {}` shows the slot go",
        r.seq,
        r.device,
        r.model,
        fmt_ms(r.expires_at_ms),
        r.device
    );
    Ok(())
}

/// `device deploy`: the server signs and sends the command.
async fn deploy(
    id: String,
    req: DeployRequest,
    wait: Option<Option<std::time::Duration>>,
    server: ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    let client = Client::new(&server)?;
    let shadow = req.mode.as_deref() == Some("shadow");
    let r: DeployResponse = client
        .post(&format!("/v1/devices/{id}/deploy"), &req)
        .await?;
    if output == Output::Json {
        return match wait {
            None => print_json(&r),
            // JSON lines: the reply, then each progress report as it arrives.
            Some(timeout) => {
                println!("{}", serde_json::to_string(&r)?);
                super::device_wait::wait(&client, &r, shadow, timeout, output).await
            }
        };
    }
    println!(
        "command {} sent to {}: deploy {} (expires {})",
        r.seq,
        r.device,
        r.model,
        fmt_ms(r.expires_at_ms)
    );
    match wait {
        Some(timeout) => super::device_wait::wait(&client, &r, shadow, timeout, output).await,
        None => Ok(()),
    }
}

/// `device label`: checked here against the server's bounds before sending.
async fn label(
    id: String,
    labels: Vec<(String, String)>,
    remove: Vec<String>,
    by: String,
    server: ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    if labels.is_empty() && remove.is_empty() {
        anyhow::bail!("nothing to change: give labels `key=value` to set or `--remove KEY`");
    }
    let set: BTreeMap<String, String> = labels.into_iter().collect();
    drover_control_plane::fleet::check_labels(&set)?;
    let v: DeviceView = Client::new(&server)?
        .post(
            &format!(
                "/v1/devices/{id}/labels?by={}",
                super::rollout::url_word(&by)
            ),
            &LabelRequest { set, remove },
        )
        .await?;
    if output == Output::Json {
        return print_json(&v);
    }
    let labels: Vec<String> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{id} labels: {}", labels.join(","));
    Ok(())
}

/// `device decommission`.
async fn decommission(
    id: String,
    by: String,
    server: ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    let by = super::rollout::url_word(&by);
    let reply: serde_json::Value = Client::new(&server)?
        .post(&format!("/v1/devices/{id}/decommission?by={by}"), &())
        .await?;
    if output == Output::Json {
        return print_json(&reply);
    }
    println!("{id} decommissioned");
    Ok(())
}
