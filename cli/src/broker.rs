//! `drover broker config mosquitto`: a mosquitto configuration for a production broker,
//! issued from the fleet CA in the local data directory (never over the API: it signs a
//! server certificate).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;

use drover_control_plane::pki::{FleetCa, CONTROL_PLANE_IDENTITY, CRL_FILE};
use drover_host::clock::now_ms;
use drover_host::fs::write_private;

#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Write a broker configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// mosquitto: a device listener requiring client certificates from the fleet CA, the
    /// certificate's CN as username and as client id, the CRL of decommissioned devices,
    /// pattern ACLs; and a control-plane listener that also wants the control plane's
    /// password.
    Mosquitto(MosquittoArgs),
}

#[derive(Debug, clap::Args)]
pub struct MosquittoArgs {
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "drover-data")]
    pub data_dir: PathBuf,
    /// Directory to write mosquitto.conf, acl, ca.pem, server.pem and server.key into.
    #[arg(long)]
    pub out: PathBuf,
    /// Host names or IP addresses devices use to reach the broker (repeatable).
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    /// Port of the device listener.
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// Address the device listener binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,
    /// Port of the control plane's listener (default: the device port + 1).
    #[arg(long)]
    pub control_plane_port: Option<u16>,
    /// Address the control plane's listener binds (default: as the device listener).
    #[arg(long)]
    pub control_plane_bind: Option<String>,
    /// CRL the broker reads (default: the one `drover serve` rewrites on every
    /// decommission, `<data-dir>/keys/crl.pem`; send mosquitto SIGHUP to reload it).
    #[arg(long)]
    pub crl_file: Option<PathBuf>,
    /// Directory for mosquitto's persistence database (off when not given).
    #[arg(long)]
    pub persistence_dir: Option<PathBuf>,
    /// User mosquitto runs as after start (its `user` option). It must be able to read
    /// server.key and the CRL: run it as the user of `drover serve`, or copy
    /// `<data-dir>/keys/crl.pem` to the broker after each decommission.
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: crate::Output,
}

/// The ACL of the device listener: devices by pattern on `%u` (their certificate CN,
/// which they cannot choose; the client id is the same name there, but `%u` says so);
/// then one block per active integration (CN `integration@<name>`): read the JSON stream,
/// nothing else. mosquitto applies the device patterns to every user, so the block denies
/// each tree they open (`topic deny` wins over a pattern; checked against a real
/// mosquitto 2.0: the integration's publishes and its reads of chunks and the keyring
/// were refused, the JSON stream read).
pub fn mosquitto_acl(integrations: &[String]) -> String {
    use drover_protocol::topics;
    let (publish, subscribe) = topics::device_acl("%u");
    let mut acl =
        "# Written by `drover broker config mosquitto`: the device listener.\n".to_string();
    for t in publish {
        acl.push_str(&format!("pattern write {t}\n"));
    }
    for t in subscribe {
        acl.push_str(&format!("pattern read {t}\n"));
    }
    if !integrations.is_empty() {
        acl.push_str(
            "\n# Read-only integrations (`drover integration create`); rerun this command after\n\
             # creating or revoking one, then SIGHUP mosquitto.\n",
        );
    }
    let (read, deny) = topics::integration_acl();
    for name in integrations {
        acl.push_str(&format!(
            "user {}\ntopic read {read}\n",
            drover_control_plane::integrations::identity(name),
        ));
        for d in &deny {
            acl.push_str(&format!("topic deny {d}\n"));
        }
    }
    acl
}

/// The ACL of the control plane's listener: the control plane, nobody else.
pub fn control_plane_acl() -> String {
    format!(
        "# Written by `drover broker config mosquitto`: the control plane's listener.\n\
         user {CONTROL_PLANE_IDENTITY}\ntopic readwrite {}\n",
        drover_protocol::topics::all_filter()
    )
}

/// A mosquitto password file line, `$6$` format (SHA-512 over password and salt, both
/// base64), which mosquitto 2.0 reads; written here so the config needs no
/// `mosquitto_passwd` on the machine that writes it.
pub fn mosquitto_password_line(user: &str, password: &str, salt: &[u8; 12]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha512::new();
    h.update(password.as_bytes());
    h.update(salt);
    format!("{user}:$6${}${}\n", base64(salt), base64(&h.finalize()))
}

/// Standard base64 with padding (what mosquitto's password file uses).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(A[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// File holding the control plane's `--broker-url` (with its password), 0600.
pub const CONTROL_PLANE_URL_FILE: &str = "control-plane.url";

/// The control plane's password on its listener, written to `passwd.control-plane`. A rerun
/// (after `drover integration create|revoke`) keeps the one in `control-plane.url`: the
/// running control plane must still get in when it reconnects.
fn control_plane_secret(out: &Path) -> anyhow::Result<String> {
    let kept = std::fs::read_to_string(out.join(CONTROL_PLANE_URL_FILE))
        .ok()
        .filter(|_| out.join("passwd.control-plane").exists())
        .and_then(|u| drover_control_plane::config::parse_broker_url(u.trim()).ok())
        .filter(|u| u.username.as_deref() == Some(CONTROL_PLANE_IDENTITY))
        .and_then(|u| u.password);
    if let Some(secret) = kept {
        return Ok(secret);
    }
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    let mut salt = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut b);
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let secret = hex::encode(b);
    let line = mosquitto_password_line(CONTROL_PLANE_IDENTITY, &secret, &salt);
    write_private(&out.join("passwd.control-plane"), line.as_bytes())?;
    Ok(secret)
}

/// Writes the configuration; returns the path of `mosquitto.conf`.
pub fn write_mosquitto(args: &MosquittoArgs) -> anyhow::Result<PathBuf> {
    let ca = FleetCa::load_or_init(&args.data_dir, now_ms())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = std::path::absolute(&args.out)?;
    let server = ca.issue_server(&args.hosts, now_ms())?;
    write_private(&out.join("ca.pem"), ca.ca_pem().as_bytes())?;
    write_private(&out.join("server.pem"), server.cert_pem.as_bytes())?;
    write_private(&out.join("server.key"), server.key_pem.as_bytes())?;
    let acl = mosquitto_acl(&active_integrations(&args.data_dir)?);
    write_private(&out.join("acl"), acl.as_bytes())?;
    write_private(
        &out.join("acl.control-plane"),
        control_plane_acl().as_bytes(),
    )?;
    let cp_port = match args.control_plane_port {
        Some(p) => p,
        None => args.port.checked_add(1).context(
            "--port 65535 leaves no port for the control plane: give --control-plane-port",
        )?,
    };
    let cp_bind = args.control_plane_bind.as_deref().unwrap_or(&args.bind);
    let secret = control_plane_secret(&out)?;
    let cp_host = args
        .hosts
        .first()
        .map(String::as_str)
        .unwrap_or("localhost");
    write_private(
        &out.join(CONTROL_PLANE_URL_FILE),
        format!("mqtts://{CONTROL_PLANE_IDENTITY}:{secret}@{cp_host}:{cp_port}\n").as_bytes(),
    )?;
    let crl = match &args.crl_file {
        Some(p) => p.clone(),
        None => {
            let decommissioned = decommissioned_devices(&args.data_dir)?;
            ca.write_crl(&decommissioned, now_ms())?
        }
    };
    let crl = std::path::absolute(&crl).unwrap_or(crl);
    let persistence = match &args.persistence_dir {
        Some(d) => format!(
            "persistence true\npersistence_location {}/\nautosave_interval 1\n",
            std::path::absolute(d)?.display()
        ),
        None => "persistence false\n".into(),
    };
    // Two listeners, because the client id is a session: queued commands and the live
    // connection. On the device listener it is forced to the certificate CN
    // (`use_username_as_clientid` after `use_identity_as_username`), so a device can
    // neither take over another's session nor hold more than one. The control plane runs
    // several sessions under one identity, so it gets its own listener where client ids
    // are free, closed to devices by a password only the control plane holds.
    let tls = format!(
        "cafile {out}/ca.pem\n\
         certfile {out}/server.pem\n\
         keyfile {out}/server.key\n\
         require_certificate true\n\
         crlfile {crl}\n\
         tls_version tlsv1.2\n\
         allow_anonymous false\n",
        out = out.display(),
        crl = crl.display(),
    );
    let conf = format!(
        "# Written by `drover broker config mosquitto`: mutual TLS with the Drover fleet CA.\n\
         # Devices authenticate by certificate (CN = device id = MQTT username = client id);\n\
         # the ACL confines each to its own topics. Reload after a decommission: kill -HUP <pid>.\n\
         {user}\
         per_listener_settings true\n\
         {persistence}\
         max_inflight_messages 1000\n\
         max_queued_messages 100000\n\
         # The payload limit every Drover peer derives from the downlink limit: an oversized\n\
         # downlink still reaches the agent, which acknowledges and reports it.\n\
         message_size_limit {size_limit}\n\
         \n# Devices.\n\
         listener {port} {bind}\n\
         {tls}\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         acl_file {out}/acl\n\
         \n# The control plane: certificate and password (see control-plane.url).\n\
         listener {cp_port} {cp_bind}\n\
         {tls}\
         password_file {out}/passwd.control-plane\n\
         acl_file {out}/acl.control-plane\n",
        port = args.port,
        bind = args.bind,
        out = out.display(),
        size_limit = drover_protocol::envelope::MAX_BROKER_PAYLOAD,
        user = args
            .user
            .as_ref()
            .map(|u| format!("user {u}\n"))
            .unwrap_or_default(),
    );
    let path = out.join("mosquitto.conf");
    write_private(&path, conf.as_bytes())?;
    Ok(path)
}

fn active_integrations(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    let db = data_dir.join(drover_control_plane::app::paths::DB_FILE);
    if !db.exists() {
        return Ok(Vec::new());
    }
    let store = drover_control_plane::store::Store::open(&db)?;
    Ok(store
        .integrations()?
        .into_iter()
        .filter(|i| i.revoked_at_ms.is_none())
        .map(|i| i.name)
        .collect())
}

fn decommissioned_devices(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    let db = data_dir.join(drover_control_plane::app::paths::DB_FILE);
    if !db.exists() {
        return Ok(Vec::new());
    }
    let store = drover_control_plane::store::Store::open(&db)?;
    Ok(store
        .device_auth()?
        .into_iter()
        .filter(|d| d.decommissioned)
        .map(|d| d.id.to_string())
        .collect())
}

pub fn run(cmd: BrokerCommand) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Config(ConfigCommand::Mosquitto(args)) => {
            let path = write_mosquitto(&args)?;
            let crl = args.data_dir.join("keys").join(CRL_FILE);
            let dir = std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone());
            let url_file = dir.join(CONTROL_PLANE_URL_FILE);
            let advertised = format!(
                "mqtts://{}:{}",
                args.hosts
                    .first()
                    .map(String::as_str)
                    .unwrap_or("localhost"),
                args.port
            );
            if args.output == crate::Output::Json {
                return crate::client::print_json(&serde_json::json!({
                    "config_file": path,
                    "crl_file": crl,
                    "control_plane_url_file": url_file,
                    "advertised_broker_url": advertised,
                }));
            }
            println!("mosquitto configuration written to {}", path.display());
            println!(
                "CRL: {} (rewritten by `drover serve` on every decommission; SIGHUP mosquitto to reload)",
                crl.display()
            );
            println!(
                "control plane: drover serve --broker-url \"$(cat {})\" with advertised_broker_url = \"{advertised}\" in its config file, so devices get the device listener (identity {CONTROL_PLANE_IDENTITY} from the fleet CA, plus the password in that file)",
                url_file.display(),
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn an_integration_reads_the_json_stream_and_nothing_else_on_mosquitto() {
        let acl = mosquitto_acl(&["node-red".into()]);
        let (devices, integration) = acl.split_once("user integration@node-red\n").unwrap();
        assert_eq!(
            integration,
            "topic read drover/v1/json/#\ntopic deny drover/v1/dev/#\n\
             topic deny drover/v1/model/#\ntopic deny drover/v1/fleet/#\n"
        );
        assert!(!devices.contains("topic "), "{devices}");
        assert!(!mosquitto_acl(&[]).contains("user "));
    }

    #[test]
    fn the_device_listener_forces_the_client_id_to_the_certificate_name() {
        let tmp = tempfile::tempdir().unwrap();
        let args = MosquittoArgs {
            data_dir: tmp.path().join("data"),
            out: tmp.path().join("out"),
            hosts: vec!["broker.example".into()],
            port: 8883,
            bind: "0.0.0.0".into(),
            control_plane_port: None,
            control_plane_bind: None,
            crl_file: None,
            persistence_dir: None,
            user: None,
            output: crate::Output::Text,
        };
        let conf = std::fs::read_to_string(write_mosquitto(&args).unwrap()).unwrap();
        let (_, devices) = conf.split_once("listener 8883 0.0.0.0").unwrap();
        let (devices, cp) = devices.split_once("listener 8884 0.0.0.0").unwrap();
        assert!(devices.contains("use_identity_as_username true\nuse_username_as_clientid true"));
        assert!(!devices.contains("password_file"));
        assert!(cp.contains("password_file") && !cp.contains("use_identity_as_username"));
        let url = std::fs::read_to_string(args.out.join(CONTROL_PLANE_URL_FILE)).unwrap();
        assert!(url.starts_with("mqtts://drover-control-plane:"), "{url}");
        assert!(url.trim_end().ends_with("@broker.example:8884"), "{url}");
        // A rerun keeps the control plane's password (it may be connected with it).
        let passwd = std::fs::read_to_string(args.out.join("passwd.control-plane")).unwrap();
        write_mosquitto(&args).unwrap();
        assert_eq!(
            std::fs::read_to_string(args.out.join(CONTROL_PLANE_URL_FILE)).unwrap(),
            url
        );
        assert_eq!(
            std::fs::read_to_string(args.out.join("passwd.control-plane")).unwrap(),
            passwd
        );
    }
}
