//! `drover doctor`: reports unsafe settings, each with the command that fixes it. Exit code
//! 0 only when it finds none.

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
    /// `json`: `{"findings": [{"path", "problem"}], "unsafe": N}` on stdout (the exit
    /// code still says whether anything unsafe was found).
    #[arg(long, value_enum, default_value_t)]
    pub output: crate::Output,
}

/// One unsafe setting: where, what is wrong, and the command that fixes it (when one does).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub path: String,
    pub problem: String,
    pub fix: Option<String>,
}

impl Finding {
    fn new(path: &Path, problem: impl Into<String>, fix: Option<String>) -> Self {
        Finding {
            path: path.display().to_string(),
            problem: problem.into(),
            fix,
        }
    }
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
        out.push(Finding::new(
            path,
            format!("{what} is readable by group or others (mode {m:o})"),
            Some(format!("chmod 600 {}", path.display())),
        ));
    }
}

/// A certificate that does not parse, has expired or expires within [`WARN_DAYS`]; `fix`
/// says how a new one is issued.
fn check_cert(path: &Path, what: &str, now: u64, fix: Option<String>, out: &mut Vec<Finding>) {
    let Ok(pem) = std::fs::read_to_string(path) else {
        return;
    };
    let Some(end) = drover_control_plane::pki::not_after_ms(&pem) else {
        out.push(Finding::new(
            path,
            format!("{what} is not a readable PEM certificate"),
            fix,
        ));
        return;
    };
    if end <= now {
        let problem = format!("{what} has expired ({})", super::fmt_ms(end));
        out.push(Finding::new(path, problem, fix));
    } else if end - now < WARN_DAYS * DAY_MS {
        let problem = format!("{what} expires soon ({})", super::fmt_ms(end));
        out.push(Finding::new(path, problem, fix));
    }
}

/// Every check, as a pure-ish function of the files (the clock passed in). Findings come in
/// a fixed order: server config, online root key, key directory, database, API token and
/// address, certificates and CRL, keyring, agent configs.
pub fn examine(args: &DoctorArgs, now: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut data_dir = args.data_dir.clone();
    if let Some(path) = &args.config {
        if let Some(dir) = check_serve_config(path, &mut out) {
            data_dir = dir;
        }
    }
    check_root_keys(&data_dir, &mut out);
    let keys = data_dir.join("keys");
    check_key_files(&keys, &mut out);
    check_database(&data_dir, &mut out);
    check_api_url(&data_dir, &mut out);
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
            out.push(Finding::new(
                path,
                format!("config does not load: {e}"),
                None,
            ));
            return None;
        }
    };
    if cfg.allow_plaintext {
        out.push(Finding::new(
            path,
            "allow_plaintext = true: the embedded broker accepts devices without TLS or \
             certificates",
            Some(format!(
                "set allow_plaintext = false in {} and restart drover serve",
                path.display()
            )),
        ));
    }
    if cfg.api_tls.is_none() && !cfg.http_listen.ip().is_loopback() {
        out.push(Finding::new(
            path,
            format!(
                "api_tls = \"off\" with http_listen = {:?}: the HTTP API is plaintext beyond \
                 loopback (bearer tokens and enrolled device keys cross the network readable)",
                cfg.http_listen.to_string()
            ),
            Some(format!(
                "set api_tls = \"auto\" in {} (TLS from the fleet CA) and restart drover serve",
                path.display()
            )),
        ));
    }
    if let BrokerMode::External(u) = &cfg.broker {
        if !u.tls {
            out.push(Finding::new(
                path,
                "broker_url is plaintext mqtt://",
                Some(format!(
                    "set broker_url = \"mqtts://…\" in {} (`drover broker config mosquitto` \
                     writes a TLS broker config)",
                    path.display()
                )),
            ));
        }
        if u.password.is_some() {
            check_private(path, "config holding a broker password", out);
        }
    }
    Some(cfg.data_dir.clone())
}

/// A root key in the data directory: whoever reads the directory (a compromised server, a
/// backup) can sign a keyring every device accepts.
fn check_root_keys(data_dir: &Path, out: &mut Vec<Finding>) {
    for p in drover_control_plane::keys::online_root_keys(data_dir) {
        out.push(Finding::new(
            &p,
            "the root key is online, in the data directory: whoever can read it can re-sign \
             the fleet's keyring; the server never needs it",
            Some(format!(
                "mv {} /media/usb/drover-root.key  # anywhere offline; `drover keys rotate \
                 --root-key PATH` asks for it",
                p.display()
            )),
        ));
    }
}

/// The database (device keys, token hashes) and SQLite's files beside it are private.
fn check_database(data_dir: &Path, out: &mut Vec<Finding>) {
    let db = drover_control_plane::app::paths::DB_FILE;
    for name in [db.to_owned(), format!("{db}-wal"), format!("{db}-shm")] {
        check_private(
            &data_dir.join(name),
            "database (device keys, API token hashes)",
            out,
        );
    }
}

/// Whether a listen address is loopback only (`127.0.0.1:8470`, `[::1]:0`, `localhost:…`).
fn loopback_listen(listen: &str) -> bool {
    let host = listen
        .rsplit_once(':')
        .map_or(listen, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The URL a running server wrote (`<data>/api-url`): plaintext beyond loopback is flagged
/// whatever config it was started with.
fn check_api_url(data_dir: &Path, out: &mut Vec<Finding>) {
    let path = data_dir.join(drover_control_plane::app::paths::URL_FILE);
    let Ok(url) = std::fs::read_to_string(&path) else {
        return;
    };
    let Ok(url) = reqwest::Url::parse(url.trim()) else {
        return;
    };
    let host = url.host_str().unwrap_or("");
    if url.scheme() == "http" && !loopback_listen(&format!("{host}:0")) {
        out.push(Finding::new(
            &path,
            format!(
                "the running server's HTTP API is plaintext beyond loopback ({url}): bearer \
                 tokens and enrolled device keys cross the network readable"
            ),
            Some(
                "restart drover serve without --api-plaintext and with api_tls = \"auto\" (TLS \
                 from the fleet CA)"
                    .into(),
            ),
        ));
    }
}

/// The key directory is private, and so is every key file in it.
fn check_key_files(keys: &Path, out: &mut Vec<Finding>) {
    if let Some(m) = mode(keys) {
        if m & 0o077 != 0 {
            out.push(Finding::new(
                keys,
                format!("key directory is open to group or others (mode {m:o})"),
                Some(format!("chmod 700 {}", keys.display())),
            ));
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
    use drover_control_plane::pki;
    // The server issues its broker and control-plane certificates again when their key
    // file is gone; a new fleet CA means enrolling every device again (no one command).
    let reissue = |key: &str| {
        Some(format!(
            "rm {}  # then restart drover serve: it issues a new one",
            keys.join(key).display()
        ))
    };
    check_cert(
        &keys.join(pki::CA_CERT_FILE),
        "fleet CA certificate",
        now,
        None,
        out,
    );
    check_cert(
        &keys.join(pki::BROKER_CERT_FILE),
        "embedded broker certificate",
        now,
        reissue(pki::BROKER_KEY_FILE),
        out,
    );
    check_cert(
        &keys.join(pki::CP_CERT_FILE),
        "control plane certificate",
        now,
        reissue(pki::CP_KEY_FILE),
        out,
    );
    // Integration identities: a consumer whose certificate ran out stops reading silently.
    let dir = pki::integration_certs_dir(keys);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|x| x == "pem"))
        {
            let name = f.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            let what = format!("integration certificate {name}");
            let fix = Some(format!(
                "drover integration revoke {name} && drover integration create {name} --out DIR"
            ));
            check_cert(f, &what, now, fix, out);
        }
    }
    let crl = keys.join(pki::CRL_FILE);
    if let Ok(pem) = std::fs::read(&crl) {
        let restart = Some("restart drover serve (it re-issues the CRL at start)".to_owned());
        match pki::crl_next_update_ms(&pem) {
            Some(t) if t <= now.saturating_add(WARN_DAYS * DAY_MS) => out.push(Finding::new(
                &crl,
                format!(
                    "CRL nextUpdate {}: brokers refuse every client after it",
                    super::fmt_ms(t)
                ),
                restart,
            )),
            Some(_) => {}
            None => out.push(Finding::new(&crl, "not a readable PEM CRL", restart)),
        }
    }
}

/// The signed keyring (when the data dir has keys) loads and is not about to expire.
fn check_keyring(data_dir: &Path, keys: &Path, now: u64, out: &mut Vec<Finding>) {
    if !drover_control_plane::keys::initialized(data_dir) {
        return;
    }
    match drover_control_plane::keys::load(data_dir) {
        Ok(k) if k.keyring.expires_at_ms <= now.saturating_add(WARN_DAYS * DAY_MS) => {
            out.push(Finding::new(
                &keys.join(drover_control_plane::keys::KEYRING_FILE),
                format!("keyring expires {}", super::fmt_ms(k.keyring.expires_at_ms)),
                Some(format!(
                    "drover keys rotate --data-dir {} --root-key PATH",
                    data_dir.display()
                )),
            ))
        }
        Ok(_) => {}
        Err(e) => out.push(Finding::new(keys, e.to_string(), None)),
    }
}

/// One agent config: private, TLS to the broker, its TLS key private and certificate valid.
fn check_agent_config(path: &Path, now: u64, out: &mut Vec<Finding>) {
    check_private(path, "agent config (holds the device key)", out);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            out.push(Finding::new(path, format!("cannot read: {e}"), None));
            return;
        }
    };
    match drover_agent::config::AgentConfig::from_toml(&text) {
        Ok(mut cfg) => {
            // Enrolled configs name their TLS files relative to themselves.
            cfg.resolve_tls_paths(path);
            if cfg.broker_url.starts_with("mqtt://") {
                out.push(Finding::new(
                    path,
                    "agent connects over plaintext mqtt://",
                    Some(format!(
                        "drover device enroll {} --replace  # after decommissioning: writes an \
                         mqtts:// config with TLS files",
                        cfg.device_id
                    )),
                ));
            }
            if let Some(tls) = &cfg.tls {
                if let Some(k) = &tls.client_key_file {
                    check_private(k, "agent TLS key", out);
                }
                if let Some(c) = &tls.client_cert_file {
                    let fix = format!(
                        "drover device decommission {id} && drover device enroll {id} --replace \
                         --out {}",
                        path.display(),
                        id = cfg.device_id
                    );
                    check_cert(c, "agent client certificate", now, Some(fix), out);
                }
            }
        }
        Err(e) => out.push(Finding::new(
            path,
            format!("agent config does not load: {e}"),
            None,
        )),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let findings = examine(&args, now_ms());
    match args.output {
        crate::Output::Json => crate::client::print_json(&serde_json::json!({
            "findings": findings,
            "unsafe": findings.len(),
        }))?,
        crate::Output::Text if findings.is_empty() => println!("no unsafe settings found"),
        crate::Output::Text => {
            for f in &findings {
                println!("UNSAFE  {}: {}", f.path, f.problem);
                if let Some(fix) = &f.fix {
                    println!("        fix: {fix}");
                }
            }
        }
    }
    if findings.is_empty() {
        return Ok(());
    }
    anyhow::bail!("{} unsafe setting(s) found", findings.len())
}
