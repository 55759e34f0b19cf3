//! `drover token create|list|revoke` and `drover audit`: per-user API tokens with roles,
//! and the API's append-only audit log. Admin only.

use clap::{Args, Subcommand};
use serde_json::json;

use super::client::{print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::{AuditView, TokenCreated, TokenRequest, TokenView};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; it is printed once (the server keeps only its hash).
    Create {
        /// Who the token is for, as the audit log will name them: 1-64 of letters,
        /// digits and `. _ @ -`.
        name: String,
        /// viewer (reads everything), deployer (also publishes, deploys, labels, runs
        /// rollouts and training) or admin (also enrolls, decommissions, manages keys,
        /// tokens and reads the audit log).
        #[arg(long, value_parser = ["viewer", "deployer", "admin"])]
        role: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Every token issued: name, role, who issued it and when, revoked or not.
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token: refused from the next request on.
    Revoke {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// `drover audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The newest this many entries.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub server: ServerArgs,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            name,
            role,
            server,
            output,
        } => {
            let t: TokenCreated = Client::new(&server)?
                .post("/v1/tokens", &TokenRequest { name, role })
                .await?;
            if output == Output::Json {
                return print_json(&json!({"name": t.name, "role": t.role, "token": t.token}));
            }
            println!(
                "token for {} ({}), shown once; keep it secret:",
                t.name, t.role
            );
            println!("{}", t.token);
            println!("use it with --token or DROVER_TOKEN");
            Ok(())
        }
        TokenCommand::List { server, output } => {
            let v: Vec<TokenView> = Client::new(&server)?.get("/v1/tokens").await?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!(
                "{:<24} {:<9} {:<20} {:<20} REVOKED",
                "NAME", "ROLE", "CREATED", "BY"
            );
            for t in &v {
                println!(
                    "{:<24} {:<9} {:<20} {:<20} {}",
                    t.name,
                    t.role,
                    fmt_ms(t.created_at_ms),
                    t.created_by,
                    t.revoked_at_ms.map_or("-".into(), fmt_ms)
                );
            }
            Ok(())
        }
        TokenCommand::Revoke {
            name,
            server,
            output,
        } => {
            anyhow::ensure!(
                drover_control_plane::access::is_name(&name),
                "token name {name:?}: 1-64 of letters, digits and . _ @ - (see `drover token list`)"
            );
            let path = format!("/v1/tokens/{name}/revoke");
            let () = Client::new(&server)?.post(&path, &json!({})).await?;
            if output == Output::Json {
                return print_json(&json!({"revoked": name}));
            }
            println!("token {name} revoked");
            Ok(())
        }
    }
}

pub async fn audit(a: AuditArgs) -> anyhow::Result<()> {
    let v: Vec<AuditView> = Client::new(&a.server)?
        .get(&format!("/v1/audit?limit={}", a.limit))
        .await?;
    if a.output == Output::Json {
        return print_json(&v);
    }
    println!(
        "{:<20} {:<24} {:<9} {:<6} {:<6} PATH",
        "WHEN", "WHO", "ROLE", "METHOD", "STATUS"
    );
    for e in &v {
        println!(
            "{:<20} {:<24} {:<9} {:<6} {:<6} {}",
            fmt_ms(e.at_ms),
            e.actor,
            e.role,
            e.method,
            e.status,
            e.path
        );
    }
    Ok(())
}
