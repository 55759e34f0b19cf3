//! `drover keys init|rotate|show`: local key files (never sent over the API).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::client::{Client, ServerArgs};
use super::Output;
use drover_control_plane::api::{keyring_view, KeyringView};
use drover_control_plane::keys;
use drover_host::clock::now_ms;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the root key, a first signing key and keyring version 1 (files 0600). The
    /// root key goes apart from the data directory, to be moved offline: the server never
    /// needs it, only `keys rotate` does.
    Init {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        /// Where to write the root key (0600; refused inside the data directory or over an
        /// existing file). Move it offline afterwards (a USB stick, a vault).
        #[arg(long, value_name = "PATH", default_value = "drover-root.key")]
        root_key_out: PathBuf,
        /// Days until devices refuse this keyring unless it is re-signed.
        #[arg(long, default_value_t = keys::DEFAULT_KEYRING_VALID_DAYS)]
        valid_days: u64,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Add a new signing key; current keys retire after the grace period. A running
    /// `drover serve` on this data dir loads it and publishes the new keyring at once.
    Rotate {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        /// The root key file (`keys init` wrote it; bring it back from offline for this).
        /// Default: a root key still online in the data directory, which `drover doctor`
        /// flags.
        #[arg(long, env = "DROVER_ROOT_KEY", value_name = "PATH")]
        root_key: Option<PathBuf>,
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
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Print key ids, roles and validity (never secrets).
    Show {
        #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// What `keys init --output json` prints.
#[derive(Debug, serde::Serialize)]
struct InitView {
    keys_dir: PathBuf,
    root_key_file: PathBuf,
    keyring: KeyringView,
}

/// What `keys rotate --output json` prints: the new keyring and whether a running server
/// took it (`server_detail` says why not).
#[derive(Debug, serde::Serialize)]
struct RotateView {
    keyring: KeyringView,
    server_reloaded: bool,
    server_detail: Option<String>,
}

fn print(k: &keys::Keys, output: Output) -> anyhow::Result<()> {
    let v = keyring_view(k);
    if output == Output::Json {
        return super::client::print_json(&v);
    }
    print_text(&v);
    Ok(())
}

fn print_text(v: &KeyringView) {
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
}

pub async fn run(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Init {
            data_dir,
            root_key_out,
            valid_days,
            output,
        } => {
            let root_key_out = outside(&data_dir, &root_key_out)?;
            let k = keys::init(&data_dir, &root_key_out, now_ms(), valid_days)?;
            let v = InitView {
                keys_dir: data_dir.join("keys"),
                root_key_file: root_key_out,
                keyring: keyring_view(&k),
            };
            if output == Output::Json {
                return super::client::print_json(&v);
            }
            println!("keys written to {}", v.keys_dir.display());
            println!(
                "ROOT KEY written to {}: move it offline now (a USB stick, a vault). The server \
                 never needs it; `drover keys rotate --root-key PATH` does.",
                v.root_key_file.display()
            );
            print_text(&v.keyring);
            Ok(())
        }
        KeysCommand::Rotate {
            data_dir,
            root_key,
            server,
            token,
            grace_days,
            valid_days,
            output,
        } => {
            let root_key = match root_key {
                Some(p) => p,
                None => {
                    let found = keys::online_root_keys(&data_dir).into_iter().next();
                    let p = found.ok_or(keys::KeyError::RootKeyOffline(data_dir.clone()))?;
                    eprintln!(
                        "warning: signing with the root key found online at {}; move it offline \
                         and pass --root-key next time (`drover doctor` flags it)",
                        p.display()
                    );
                    p
                }
            };
            let k = keys::rotate(&data_dir, &root_key, now_ms(), grace_days, valid_days)?;
            let args = ServerArgs {
                server,
                token,
                data_dir: data_dir.clone(),
                ca: None,
            };
            let (server_reloaded, server_detail) = reload(&args, k.keyring.version).await?;
            let v = RotateView {
                keyring: keyring_view(&k),
                server_reloaded,
                server_detail,
            };
            if output == Output::Json {
                return super::client::print_json(&v);
            }
            println!("keyring version {} signed", k.keyring.version);
            match &v.server_detail {
                None => println!(
                    "the running server signs with the new key and published the keyring"
                ),
                Some(why) => println!(
                    "no running server took the new key ({why}); `drover serve` uses it at its next start"
                ),
            }
            print_text(&v.keyring);
            Ok(())
        }
        KeysCommand::Show { data_dir, output } => print(&keys::load(&data_dir)?, output),
    }
}

/// `--root-key-out`, absolute, refused inside the data directory: the directory the server
/// reads, and backups copy, must not hold the key that can re-sign the fleet's trust.
fn outside(data_dir: &Path, root_out: &Path) -> anyhow::Result<PathBuf> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let (data, out) = (abs(data_dir), abs(root_out));
    // Symlinked parents resolved where they exist (the file itself does not, yet).
    let real = |p: &Path| {
        p.parent().and_then(|d| d.canonicalize().ok()).map_or_else(
            || p.to_owned(),
            |d| d.join(p.file_name().unwrap_or_default()),
        )
    };
    let data_real = data.canonicalize().unwrap_or_else(|_| data.clone());
    anyhow::ensure!(
        !out.starts_with(&data) && !real(&out).starts_with(&data_real),
        "--root-key-out {} is inside the data directory {}, which the server reads and backups \
         copy; write the root key outside it (and then move it offline)",
        root_out.display(),
        data_dir.display()
    );
    Ok(out)
}

/// Asks a running server to load the keyring just signed. No server is not an error (it
/// loads the keys at its next start); a server that loaded another version is.
async fn reload(args: &ServerArgs, version: u64) -> anyhow::Result<(bool, Option<String>)> {
    let reloaded: anyhow::Result<KeyringView> = match Client::new(args) {
        Ok(c) => c.post("/v1/keyring/reload", &()).await,
        Err(e) => Err(e),
    };
    match reloaded {
        Ok(v) if v.version == version => Ok((true, None)),
        Ok(v) => anyhow::bail!(
            "the server at --server reloaded keyring version {}, not {version}: is it serving {}?",
            v.version,
            args.data_dir.display()
        ),
        Err(e) => Ok((false, Some(e.to_string()))),
    }
}
