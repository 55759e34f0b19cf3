//! `drover integration create|list|revoke`: read-only identities for Node-RED, Telegraf
//! and the like, which may subscribe inside the JSON stream (`drover/v1/json/#`) and do
//! nothing else (docs/INTEGRATIONS.md). Admin only.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::client::{print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::{IntegrationCreated, IntegrationRequest, IntegrationView};
use drover_host::fs::write_private;

#[derive(Debug, Subcommand)]
pub enum IntegrationCommand {
    /// Issue an integration identity: writes `ca.pem`, `<NAME>.pem` (its certificate) and
    /// `<NAME>.key` (its private key, 0600, shown nowhere else) into --out.
    Create {
        /// 1-64 of letters, digits and `. _ -`; one per consumer (an identity holds one
        /// broker session at a time).
        name: String,
        /// Directory to write the files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Every integration identity: name, who created it and when, expiry, revoked or not.
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke an identity: its open session is cut, its certificate listed in the CRL.
    Revoke {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        drover_control_plane::integrations::is_name(name),
        "integration name {name:?}: 1-64 of letters, digits and . _ -"
    );
    Ok(())
}

pub async fn run(cmd: IntegrationCommand) -> anyhow::Result<()> {
    match cmd {
        IntegrationCommand::Create {
            name,
            out,
            server,
            output,
        } => {
            check_name(&name)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let c: IntegrationCreated = Client::new(&server)?
                .post(
                    "/v1/integrations",
                    &IntegrationRequest { name: name.clone() },
                )
                .await?;
            let files = [
                ("ca.pem".to_string(), &c.ca_pem),
                (format!("{name}.pem"), &c.cert_pem),
                (format!("{name}.key"), &c.key_pem),
            ];
            for (file, body) in files {
                write_private(&out.join(&file), body.as_bytes())?;
            }
            let dir = std::path::absolute(&out).unwrap_or(out);
            if output == Output::Json {
                return print_json(&json!({
                    "name": c.name, "identity": c.identity, "broker_url": c.broker_url,
                    "topic_filter": c.topic_filter, "not_after_ms": c.not_after_ms,
                    "dir": dir,
                }));
            }
            println!(
                "integration {} created; files in {}:",
                c.name,
                dir.display()
            );
            println!("  ca.pem (the fleet CA), {name}.pem (certificate), {name}.key (private key: keep it secret)");
            println!("broker:    {}", c.broker_url);
            println!(
                "username:  {}   client id: {}   (password: none)",
                c.identity, c.identity
            );
            println!(
                "subscribe: {} (or narrower, e.g. drover/v1/json/+/telemetry); nothing else",
                c.topic_filter
            );
            println!("valid until {}", fmt_ms(c.not_after_ms));
            Ok(())
        }
        IntegrationCommand::List { server, output } => {
            let v: Vec<IntegrationView> = Client::new(&server)?.get("/v1/integrations").await?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!(
                "{:<24} {:<20} {:<20} {:<20} REVOKED",
                "NAME", "CREATED", "BY", "EXPIRES"
            );
            for i in &v {
                println!(
                    "{:<24} {:<20} {:<20} {:<20} {}",
                    i.name,
                    fmt_ms(i.created_at_ms),
                    i.created_by,
                    fmt_ms(i.not_after_ms),
                    i.revoked_at_ms.map_or("-".into(), fmt_ms)
                );
            }
            Ok(())
        }
        IntegrationCommand::Revoke {
            name,
            server,
            output,
        } => {
            check_name(&name)?;
            let path = format!("/v1/integrations/{name}/revoke");
            let () = Client::new(&server)?.post(&path, &json!({})).await?;
            if output == Output::Json {
                return print_json(&json!({"revoked": name}));
            }
            println!("integration {name} revoked: its session is cut and its certificate is in the CRL (SIGHUP mosquitto)");
            Ok(())
        }
    }
}
