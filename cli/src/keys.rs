//! `drover keys init|rotate|show`: local key files (never sent over the API).

use std::path::PathBuf;

use clap::Subcommand;

use super::client::{Client, ServerArgs};
use super::Output;
use drover_control_plane::api::{keyring_view, KeyringView};
use drover_control_plane::keys;
use drover_host::clock::now_ms;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the root key, a first signing key and keyring version 1 (files 0600).
    Init {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        /// Days until devices refuse this keyring unless it is re-signed.
        #[arg(long, default_value_t = keys::DEFAULT_KEYRING_VALID_DAYS)]
        valid_days: u64,
    },
    /// Add a new signing key; current keys retire after the grace period. A running
    /// `drover serve` on this data dir loads it and publishes the new keyring at once.
    Rotate {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        /// API URL of the running server (default: <data-dir>/api-url).
        #[arg(long, env = "DROVER_SERVER")]
        server: Option<String>,
        /// API token (default: <data-dir>/api-token).
        #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Days the old signing keys stay valid (in-flight commands still land).
        #[arg(long, default_value_t = keys::DEFAULT_GRACE_DAYS)]
        grace_days: u64,
        #[arg(long, default_value_t = keys::DEFAULT_KEYRING_VALID_DAYS)]
        valid_days: u64,
    },
    /// Print key ids, roles and validity (never secrets).
    Show {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

fn print(k: &keys::Keys, output: Output) -> anyhow::Result<()> {
    let v = keyring_view(k);
    if output == Output::Json {
        return super::client::print_json(&v);
    }
    println!("root key     {}", v.root_key_id);
    println!(
        "keyring      version {}, issued {}, expires {}",
        v.version,
        super::fmt_ms(v.issued_at_ms),
        super::fmt_ms(v.expires_at_ms)
    );
    for key in &v.keys {
        let until = key
            .not_after_ms
            .map(|t| format!("until {}", super::fmt_ms(t)))
            .unwrap_or_else(|| "no end".into());
        println!(
            "signing key  {}  roles {}  from {}  {until}{}{}",
            key.key_id,
            key.roles.join("+"),
            super::fmt_ms(key.not_before_ms),
            if key.revoked { "  REVOKED" } else { "" },
            if key.current { "  (current)" } else { "" },
        );
    }
    Ok(())
}

pub async fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Init {
            data_dir,
            valid_days,
        } => {
            let k = keys::init(&data_dir, now_ms(), valid_days)?;
            println!("keys written to {}", data_dir.join("keys").display());
            print(&k, Output::Text)
        }
        KeysCommand::Rotate {
            data_dir,
            server,
            token,
            grace_days,
            valid_days,
        } => {
            let k = keys::rotate(&data_dir, now_ms(), grace_days, valid_days)?;
            println!("keyring version {} signed", k.keyring.version);
            let args = ServerArgs {
                server,
                token,
                data_dir: data_dir.clone(),
            };
            let reloaded: anyhow::Result<KeyringView> = match Client::new(&args) {
                Ok(c) => c.post("/v1/keyring/reload", &()).await,
                Err(e) => Err(e),
            };
            match reloaded {
                Ok(v) if v.version == k.keyring.version => {
                    println!("the running server signs with the new key and published the keyring")
                }
                Ok(v) => anyhow::bail!(
                    "the server at --server reloaded keyring version {}, not {}: is it serving {}?",
                    v.version,
                    k.keyring.version,
                    data_dir.display()
                ),
                Err(e) => println!(
                    "no running server took the new key ({e}); `drover serve` uses it at its next start"
                ),
            }
            print(&k, Output::Text)
        }
        KeysCommand::Show { data_dir, output } => print(&keys::load(&data_dir)?, output),
    }
}
