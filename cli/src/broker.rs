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
    /// mosquitto: TLS listener requiring client certificates from the fleet CA, the
    /// certificate's CN as username, the CRL of decommissioned devices, pattern ACLs.
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
    #[arg(long, default_value_t = 8883)]
    pub port: u16,
    /// Address the listener binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: String,
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
}

/// mosquitto's ACL file: the control plane by its certificate identity, devices by
/// pattern on `%u` (their certificate CN, which they cannot choose; never `%c`).
pub fn mosquitto_acl() -> String {
    use drover_protocol::topics;
    let (publish, subscribe) = topics::device_acl("%u");
    let mut acl = format!(
        "# Written by `drover broker config mosquitto`.\n\
         user {CONTROL_PLANE_IDENTITY}\ntopic readwrite {}\n\n",
        topics::all_filter()
    );
    for t in publish {
        acl.push_str(&format!("pattern write {t}\n"));
    }
    for t in subscribe {
        acl.push_str(&format!("pattern read {t}\n"));
    }
    acl
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
    write_private(&out.join("acl"), mosquitto_acl().as_bytes())?;
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
    let conf = format!(
        "# Written by `drover broker config mosquitto`: mutual TLS with the Drover fleet CA.\n\
         # Devices authenticate by certificate (CN = device id = MQTT username); the ACL\n\
         # confines each to its own topics. Reload after a decommission: kill -HUP <pid>.\n\
         {user}\
         per_listener_settings false\n\
         allow_anonymous false\n\
         listener {port} {bind}\n\
         cafile {out}/ca.pem\n\
         certfile {out}/server.pem\n\
         keyfile {out}/server.key\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         crlfile {crl}\n\
         tls_version tlsv1.2\n\
         acl_file {out}/acl\n\
         {persistence}\
         max_inflight_messages 1000\n\
         max_queued_messages 100000\n\
         message_size_limit 8388608\n",
        port = args.port,
        bind = args.bind,
        out = out.display(),
        crl = crl.display(),
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
            println!("mosquitto configuration written to {}", path.display());
            println!(
                "CRL: {} (rewritten by `drover serve` on every decommission; SIGHUP mosquitto to reload)",
                args.data_dir.join("keys").join(CRL_FILE).display()
            );
            println!(
                "control plane: drover serve --broker-url mqtts://{}:{} (identity {CONTROL_PLANE_IDENTITY} from the fleet CA)",
                args.hosts.first().map(String::as_str).unwrap_or("localhost"),
                args.port
            );
            Ok(())
        }
    }
}
