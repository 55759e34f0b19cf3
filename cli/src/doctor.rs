//! `drover doctor`: reports unsafe settings. Exit code 0 only when it finds none.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use drover_control_plane::config::{BrokerMode, ServeConfig};
use drover_host::clock::now_ms;

const DAY_MS: u64 = 86_400_000;
/// Certificates and keyrings closer than this to their end are reported.
const WARN_DAYS: u64 = 30;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// `drover serve` config file to check (its data dir is checked too).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory of the server (when no --config says it).
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
    pub data_dir: PathBuf,
    /// Agent config files to check as well (repeatable).
    #[arg(long = "agent-config")]
    pub agent_configs: Vec<PathBuf>,
}

/// One unsafe setting: where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub problem: String,
}

fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

fn check_private(path: &Path, what: &str, out: &mut Vec<Finding>) {
    if let Err(drover_host::fs::FsError::InsecurePermissions { mode: m, .. }) =
        drover_host::fs::check_private(path)
    {
        out.push(Finding {
            path: path.display().to_string(),
            problem: format!(
                "{what} is readable by group or others (mode {m:o}); run `chmod 600 {}`",
                path.display()
            ),
        });
    }
}

fn check_cert(path: &Path, what: &str, now: u64, out: &mut Vec<Finding>) {
    let Ok(pem) = std::fs::read_to_string(path) else {
        return;
    };
    let Some(end) = drover_control_plane::pki::not_after_ms(&pem) else {
        out.push(Finding {
            path: path.display().to_string(),
            problem: format!("{what} is not a readable PEM certificate"),
        });
        return;
    };
    if end <= now {
        out.push(Finding {
            path: path.display().to_string(),
            problem: format!("{what} has expired ({})", super::fmt_ms(end)),
        });
    } else if end - now < WARN_DAYS * DAY_MS {
        out.push(Finding {
            path: path.display().to_string(),
            problem: format!("{what} expires soon ({})", super::fmt_ms(end)),
        });
    }
}

/// Every check, as a pure-ish function of the files (the clock passed in). Findings come in
/// a fixed order: server config, key directory, API token, certificates and CRL, keyring,
/// agent configs.
pub fn examine(args: &DoctorArgs, now: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut data_dir = args.data_dir.clone();
    if let Some(path) = &args.config {
        if let Some(dir) = check_serve_config(path, &mut out) {
            data_dir = dir;
        }
    }
    let keys = data_dir.join("keys");
    check_key_files(&keys, &mut out);
    check_private(
        &data_dir.join(drover_control_plane::app::paths::TOKEN_FILE),
        "API token",
        &mut out,
    );
    check_pki(&keys, now, &mut out);
    check_keyring(&data_dir, &keys, now, &mut out);
    for path in &args.agent_configs {
        check_agent_config(path, now, &mut out);
    }
    out
}

/// The `drover serve` config: plaintext transports, a broker password in a readable file.
/// Returns the data dir it names, if it loads.
fn check_serve_config(path: &Path, out: &mut Vec<Finding>) -> Option<PathBuf> {
    let cfg = match ServeConfig::load(Some(path), &HashMap::new(), &Default::default()) {
        Ok(cfg) => cfg,
        Err(e) => {
            out.push(Finding {
                path: path.display().to_string(),
                problem: format!("config does not load: {e}"),
            });
            return None;
        }
    };
    if cfg.allow_plaintext {
        out.push(Finding {
            path: path.display().to_string(),
            problem: "allow_plaintext = true: the embedded broker accepts devices \
                      without TLS or certificates"
                .into(),
        });
    }
    if let BrokerMode::External(u) = &cfg.broker {
        if !u.tls {
            out.push(Finding {
                path: path.display().to_string(),
                problem: "broker_url is plaintext mqtt://; use mqtts://".into(),
            });
        }
        if u.password.is_some() {
            check_private(path, "config holding a broker password", out);
        }
    }
    Some(cfg.data_dir.clone())
}

/// The key directory is private, and so is every key file in it.
fn check_key_files(keys: &Path, out: &mut Vec<Finding>) {
    if let Some(m) = mode(keys) {
        if m & 0o077 != 0 {
            out.push(Finding {
                path: keys.display().to_string(),
                problem: format!(
                    "key directory is open to group or others (mode {m:o}); run `chmod 700 {}`",
                    keys.display()
                ),
            });
        }
    }
    if let Ok(entries) = std::fs::read_dir(keys) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".key") || name == drover_control_plane::keys::KEYRING_FILE {
                check_private(f, "key file", out);
            }
        }
    }
}

/// The fleet's certificates and the CRL are readable and not about to run out.
fn check_pki(keys: &Path, now: u64, out: &mut Vec<Finding>) {
    for (file, what) in [
        (
            drover_control_plane::pki::CA_CERT_FILE,
            "fleet CA certificate",
        ),
        (
            drover_control_plane::pki::BROKER_CERT_FILE,
            "embedded broker certificate",
        ),
        (
            drover_control_plane::pki::CP_CERT_FILE,
            "control plane certificate",
        ),
    ] {
        check_cert(&keys.join(file), what, now, out);
    }
    // Integration identities: a consumer whose certificate ran out stops reading silently.
    let dir = drover_control_plane::pki::integration_certs_dir(keys);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|x| x == "pem"))
        {
            let name = f.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            let what =
                format!("integration certificate {name} (`drover integration create` a new one)");
            check_cert(f, &what, now, out);
        }
    }
    let crl = keys.join(drover_control_plane::pki::CRL_FILE);
    if let Ok(pem) = std::fs::read(&crl) {
        match drover_control_plane::pki::crl_next_update_ms(&pem) {
            Some(t) if t <= now.saturating_add(WARN_DAYS * DAY_MS) => out.push(Finding {
                path: crl.display().to_string(),
                problem: format!(
                    "CRL nextUpdate {}: brokers refuse every client after it; start `drover serve` to re-issue it",
                    super::fmt_ms(t)
                ),
            }),
            Some(_) => {}
            None => out.push(Finding {
                path: crl.display().to_string(),
                problem: "not a readable PEM CRL".into(),
            }),
        }
    }
}

/// The signed keyring (when the data dir has keys) loads and is not about to expire.
fn check_keyring(data_dir: &Path, keys: &Path, now: u64, out: &mut Vec<Finding>) {
    if !keys.join(drover_control_plane::keys::ROOT_FILE).exists() {
        return;
    }
    match drover_control_plane::keys::load(data_dir) {
        Ok(k) if k.keyring.expires_at_ms <= now.saturating_add(WARN_DAYS * DAY_MS) => {
            out.push(Finding {
                path: keys
                    .join(drover_control_plane::keys::KEYRING_FILE)
                    .display()
                    .to_string(),
                problem: format!(
                    "keyring expires {}; run `drover keys rotate`",
                    super::fmt_ms(k.keyring.expires_at_ms)
                ),
            })
        }
        Ok(_) => {}
        Err(e) => out.push(Finding {
            path: keys.display().to_string(),
            problem: e.to_string(),
        }),
    }
}

/// One agent config: private, TLS to the broker, its TLS key private and certificate valid.
fn check_agent_config(path: &Path, now: u64, out: &mut Vec<Finding>) {
    check_private(path, "agent config (holds the device key)", out);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            out.push(Finding {
                path: path.display().to_string(),
                problem: format!("cannot read: {e}"),
            });
            return;
        }
    };
    match drover_agent::config::AgentConfig::from_toml(&text) {
        Ok(cfg) => {
            if cfg.broker_url.starts_with("mqtt://") {
                out.push(Finding {
                    path: path.display().to_string(),
                    problem: "agent connects over plaintext mqtt://".into(),
                });
            }
            if let Some(tls) = &cfg.tls {
                if let Some(k) = &tls.client_key_file {
                    check_private(k, "agent TLS key", out);
                }
                if let Some(c) = &tls.client_cert_file {
                    check_cert(c, "agent client certificate", now, out);
                }
            }
        }
        Err(e) => out.push(Finding {
            path: path.display().to_string(),
            problem: format!("agent config does not load: {e}"),
        }),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let findings = examine(&args, now_ms());
    for f in &findings {
        println!("UNSAFE  {}: {}", f.path, f.problem);
    }
    if findings.is_empty() {
        println!("no unsafe settings found");
        return Ok(());
    }
    anyhow::bail!("{} unsafe setting(s) found", findings.len())
}
