//! `drover serve` configuration: defaults < TOML file < `DROVER_*` environment < flags.
//!
//! Every field is validated and every error is reported at once. The environment is
//! passed in as a map, so tests never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const CONFIG_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub version: u32,
    /// Holds `drover.db`, `keys/`, `models/`, `api-token` and `api-url`.
    pub data_dir: PathBuf,
    /// HTTP API address (`127.0.0.1:0` picks a free port).
    pub http_listen: String,
    /// TLS on the HTTP API: `auto` (TLS unless `http_listen` is loopback), `on` (always),
    /// `off` (plaintext even beyond loopback: `drover doctor` reports it).
    pub api_tls: String,
    /// Host names and addresses clients reach the API by, added to the certificate the
    /// fleet CA issues it (`localhost`, `127.0.0.1` and a specific listen address always are).
    pub api_hosts: Vec<String>,
    /// The operator's certificate chain and key (PEM) for the API; empty = issued by the
    /// fleet CA (the CLI trusts `<data>/keys/ca.pem`, or `--ca`).
    pub api_cert_file: String,
    pub api_key_file: String,
    /// Embedded broker address (port 0 picks a free port). Ignored with `broker_url`.
    pub mqtt_listen: String,
    /// External broker (`mqtt://user:pass@host:port`); empty = run the embedded broker.
    pub broker_url: String,
    /// PEM CA bundle trusted for an `mqtts://` external broker; empty = the fleet CA
    /// (`<data>/keys/ca.pem`, as `drover broker config mosquitto` sets the broker up).
    pub broker_ca_file: String,
    /// Client certificate and key for an `mqtts://` external broker; empty = the control
    /// plane's own identity from the fleet CA (`<data>/keys/control-plane.{pem,key}`).
    pub broker_client_cert_file: String,
    pub broker_client_key_file: String,
    /// Development only: the embedded broker accepts plaintext MQTT with passwords and no
    /// client certificates (a warning is logged). Default: mutual TLS only.
    pub allow_plaintext: bool,
    /// Which embedded broker runs: `rumqttd` (default, behind the mutual-TLS front),
    /// `rumqttd-tuned` (the same, one rumqttd listener per core) or `rmqtt` (mutual TLS and
    /// the ACL in its own hooks; builds with the `rmqtt` feature only). BENCHMARKS.md
    /// compares them.
    pub embedded_broker: String,
    /// Connections the embedded broker's mutual-TLS front relays at once; 0 (default): as
    /// many as the open-file limit carries (3 files each, 512 kept for the rest). Past it a
    /// connection is closed at accept and counted (`reason="capacity"`).
    pub broker_max_connections: usize,
    /// Broker URL written into enrolled agents' configs; empty = derived from the broker.
    pub advertised_broker_url: String,
    /// Names and addresses devices reach the embedded broker by (`HOST` or `HOST:PORT`;
    /// port default: the broker's). The broker certificate carries every one; `device
    /// enroll` writes the first into agent configs. Required when `mqtt_listen` is an
    /// unspecified address (`0.0.0.0`, `[::]`).
    pub advertise: Vec<String>,
    pub ingest: IngestConfig,
    /// Raw telemetry older than this is deleted (hourly rollups are kept).
    pub telemetry_retention_hours: u64,
    /// A chunk devices need is published once no new device has asked for it for this long
    /// (at most its hold after the first ask): devices arriving together share one publish.
    pub chunk_window_ms: u64,
    /// Deployment commands expire this long after being issued.
    pub command_ttl_hours: u64,
    /// How often the rollout driver re-evaluates every open rollout.
    pub rollout_tick_ms: u64,
    /// A rollout command an online device has not answered for this long is published again.
    pub rollout_republish_ms: u64,
    /// Drift scoring and continuous training (see `continuous.rs`).
    pub continuous: ContinuousConfig,
    /// The `/metrics` page.
    pub metrics: MetricsConfig,
    /// The integration stream (docs/INTEGRATIONS.md).
    pub integration: IntegrationConfig,
}

/// The integration stream: every stored uplink republished as flat JSON on
/// `drover/v1/json/<device>/<kind>`, device registrations retained.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrationConfig {
    /// Off by default: it doubles the broker's message rate.
    pub stream: bool,
}

/// The `/metrics` page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per-device series (online, last seen, model, agent version) are written while the
    /// fleet has at most this many devices; above it only fleet totals, so a large fleet
    /// never floods Prometheus. 0: never per device.
    pub per_device_limit: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_device_limit: 1000,
        }
    }
}

/// Drift scoring and continuous training. Off while `policy` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContinuousConfig {
    /// Policy file (TOML): drift windows, triggers, job spec, gate, rollout template.
    pub policy: String,
    /// How often triggers are checked and finished drift windows scored. Windows are the
    /// policy's `window_secs`, aligned to the epoch, each scored once after it ends, so
    /// they never overlap whatever the tick; a tick longer than the window scores the
    /// windows it missed at the next tick (at most 12).
    pub tick_secs: u64,
    /// Training jobs the local executor runs at once.
    pub local_jobs: usize,
    /// Directory of the Slurm client commands; empty = `PATH`.
    pub slurm_bin_dir: String,
    /// `SLURM_CONF` for the Slurm client commands; empty = the system's.
    pub slurm_conf: String,
}

impl Default for ContinuousConfig {
    fn default() -> Self {
        Self {
            policy: String::new(),
            tick_secs: 300,
            local_jobs: 1,
            slurm_bin_dir: String::new(),
            slurm_conf: String::new(),
        }
    }
}

/// Frames waiting for the ingest thread (authenticated and stored in batches); beyond it the
/// MQTT sessions stop reading and the broker holds the rest.
pub const INGEST_QUEUE: usize = 65_536;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest number of frames written in one SQLite transaction. The ingest thread takes
    /// what is queued, up to this, so batches stay small when the fleet is quiet. Large
    /// fleets need large batches under load: every device in a batch costs its own pages
    /// of the device-ordered tables, so frames per transaction set the write cost per frame
    /// (BENCHMARKS.md, "Ingest's SQLite stage alone"). The bound is the time the write
    /// lock is held: API writes wait for a batch to commit.
    pub batch_max: usize,
    /// Uplink acks to each device are coalesced over this interval.
    pub ack_interval_ms: u64,
    /// MQTT sessions sharing the uplink subscription (`$share`), for throughput.
    pub sessions: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_max: 32_768,
            ack_interval_ms: 200,
            sessions: 2,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            data_dir: PathBuf::from("drover-data"),
            http_listen: "127.0.0.1:8470".into(),
            api_tls: "auto".into(),
            api_hosts: Vec::new(),
            api_cert_file: String::new(),
            api_key_file: String::new(),
            // MQTT over TLS's port; with allow_plaintext set 1883 explicitly if wanted.
            mqtt_listen: "127.0.0.1:8883".into(),
            broker_url: String::new(),
            broker_ca_file: String::new(),
            broker_client_cert_file: String::new(),
            broker_client_key_file: String::new(),
            allow_plaintext: false,
            embedded_broker: "rumqttd".into(),
            broker_max_connections: 0,
            advertised_broker_url: String::new(),
            advertise: Vec::new(),
            ingest: IngestConfig::default(),
            telemetry_retention_hours: 24 * 7,
            chunk_window_ms: 100,
            command_ttl_hours: 24 * 7,
            rollout_tick_ms: 1000,
            rollout_republish_ms: 30_000,
            continuous: ContinuousConfig::default(),
            metrics: MetricsConfig::default(),
            integration: IntegrationConfig::default(),
        }
    }
}

/// Command-line overrides (the highest layer).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub mqtt_listen: Option<String>,
    pub broker_url: Option<String>,
    pub allow_plaintext: bool,
    /// `--api-plaintext`: `api_tls = "off"`.
    pub api_plaintext: bool,
    /// `--advertise` (repeatable); replaces the file's list when not empty.
    pub advertise: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// An MQTT broker address with optional credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Parses `mqtt://[user:pass@]host[:port]` or `mqtts://…`.
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!(
            "broker url {url:?} must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (cred, hostport) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let (username, password) = match cred {
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
            None => (Some(c.to_owned()), None),
        },
        None => (None, None),
    };
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
            h.trim_matches(|c| c == '[' || c == ']').to_owned(),
            p.parse::<u16>()
                .map_err(|_| format!("broker url port {p:?} is not a number"))?,
        ),
        _ => (hostport.to_owned(), default_port),
    };
    if host.is_empty() {
        return Err(format!("broker url {url:?} has no host"));
    }
    Ok(BrokerUrl {
        host,
        port,
        tls,
        username,
        password,
    })
}

/// The API certificate's names: `api_hosts`, then every advertised host not among them.
fn api_hosts(configured: &[String], advertise: &[Advertised]) -> Vec<String> {
    let mut hosts = configured.to_vec();
    for a in advertise {
        if !hosts.contains(&a.host) {
            hosts.push(a.host.clone());
        }
    }
    hosts
}

/// A name or address devices reach the embedded broker by (`advertise`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertised {
    /// A DNS name (lowercase) or an IP address, as it goes into the certificate.
    pub host: String,
    /// `None`: the broker's own port.
    pub port: Option<u16>,
}

impl Advertised {
    /// `host:port` for a URL, an IPv6 address in brackets.
    pub fn authority(&self, broker_port: u16) -> String {
        let port = self.port.unwrap_or(broker_port);
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }
}

/// Parses `HOST`, `HOST:PORT`, an IPv4 or IPv6 address, or `[IPV6]:PORT`.
pub fn parse_advertised(s: &str) -> Result<Advertised, String> {
    let usage = "give the host name or address devices connect to, optionally with :PORT \
                 (e.g. cp.example.com or 192.0.2.10:8883)";
    if s.contains("://") || s.contains('/') || s.contains('@') {
        return Err(format!("{s:?} is not a host: {usage}"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(format!("{s:?} is not a host: {usage}")),
            },
            None => return Err(format!("{s:?} has no closing ]: {usage}")),
        }
    } else if s.matches(':').count() > 1 {
        (s, None) // a bare IPv6 address
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => Some(n),
            _ => return Err(format!("{s:?}: port {p:?} is not a port number (1-65535)")),
        },
    };
    let host = match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => {
            return Err(format!(
                "{s:?} is the unspecified address, which no device can connect to: {usage}"
            ))
        }
        Ok(ip) => ip.to_string(),
        Err(_) if is_dns_name(host) => host.to_ascii_lowercase(),
        Err(_) => return Err(format!("{s:?} is not a DNS name or IP address: {usage}")),
    };
    Ok(Advertised { host, port })
}

/// A DNS name a certificate can carry: dot-separated labels of letters, digits and inner
/// hyphens, 1-63 bytes each, 253 at most in all.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The broker the server runs or joins.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerMode {
    Embedded { listen: SocketAddr },
    External(BrokerUrl),
}

/// The embedded broker's implementation (`embedded_broker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddedBroker {
    /// rumqttd behind Drover's mutual-TLS front (`broker/front.rs`).
    Rumqttd,
    /// The same with one rumqttd listener per core behind the front and bounded
    /// per-filter logs (`broker::RumqttdShape::tuned`).
    RumqttdTuned,
    /// rmqtt, doing mutual TLS and the ACL itself (`broker/rmqtt_engine.rs`).
    Rmqtt,
}

impl EmbeddedBroker {
    fn parse(s: &str) -> Result<EmbeddedBroker, String> {
        match s {
            "rumqttd" => Ok(EmbeddedBroker::Rumqttd),
            "rumqttd-tuned" => Ok(EmbeddedBroker::RumqttdTuned),
            "rmqtt" if cfg!(feature = "rmqtt") => Ok(EmbeddedBroker::Rmqtt),
            "rmqtt" => Err("embedded_broker = \"rmqtt\" needs a drover built with the `rmqtt` \
                 feature (cargo build -p drover-cli --features rmqtt); this one has rumqttd only"
                .into()),
            other => Err(format!(
                "embedded_broker = {other:?} is not a broker; use \"rumqttd\" (the default), \"rumqttd-tuned\" or \"rmqtt\""
            )),
        }
    }
}

/// A config that passed validation, typed: addresses parsed, optional paths as `Option`,
/// durations as `Duration`. What the server runs on; the TOML form stays in `ServeConfig`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    /// TLS on the HTTP API (`None`: plaintext, on loopback under `auto` or by `off`).
    pub api_tls: Option<crate::https::ApiTls>,
    pub broker: BrokerMode,
    /// Embedded broker only: plaintext MQTT with passwords, no client certificates.
    pub allow_plaintext: bool,
    pub embedded_broker: EmbeddedBroker,
    /// `broker_max_connections` (0: from the open-file limit).
    pub broker_max_connections: usize,
    /// CA bundle for an `mqtts://` external broker (`None`: the fleet CA).
    pub broker_ca_file: Option<PathBuf>,
    /// Client certificate and key for an `mqtts://` external broker (`None`: the control
    /// plane's own identity from the fleet CA).
    pub broker_client_identity: Option<(PathBuf, PathBuf)>,
    /// Broker URL written into enrolled agents' configs (`None`: derived from the broker).
    pub advertised_broker_url: Option<String>,
    /// Names and addresses devices use for the embedded broker (`advertise`), in order.
    pub advertise: Vec<Advertised>,
    pub ingest: IngestSettings,
    pub telemetry_retention: Duration,
    pub chunk_window: Duration,
    pub command_ttl: Duration,
    pub rollout_tick: Duration,
    pub rollout_republish: Duration,
    /// Drift scoring and continuous training (`None`: no policy configured).
    pub continuous: Option<ContinuousSettings>,
    /// Fleets up to this size get per-device series on `/metrics` (0: never).
    pub metrics_per_device_limit: usize,
    /// Republish uplinks as JSON (`integration.stream`).
    pub integration_stream: bool,
}

#[derive(Clone, Debug)]
pub struct IngestSettings {
    pub batch_max: usize,
    pub ack_interval: Duration,
    pub sessions: usize,
}

#[derive(Clone, Debug)]
pub struct ContinuousSettings {
    pub policy: PathBuf,
    pub tick: Duration,
    pub local_jobs: usize,
    pub slurm_bin_dir: Option<PathBuf>,
    pub slurm_conf: Option<PathBuf>,
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl ServeConfig {
    /// The typed form of a config whose checks passed.
    fn settings(
        self,
        http_listen: SocketAddr,
        broker: BrokerMode,
        advertise: Vec<Advertised>,
    ) -> Settings {
        const HOUR: Duration = Duration::from_secs(3_600);
        let c = self.continuous;
        let api_tls = match self.api_tls.as_str() {
            "off" => false,
            "on" => true,
            _ => !http_listen.ip().is_loopback(),
        };
        let api_tls = api_tls.then(|| {
            match (
                non_empty(&self.api_cert_file),
                non_empty(&self.api_key_file),
            ) {
                (Some(cert), Some(key)) => crate::https::ApiTls::Files { cert, key },
                // The names devices reach this server by are the API's too.
                _ => crate::https::ApiTls::FleetCa {
                    hosts: api_hosts(&self.api_hosts, &advertise),
                },
            }
        });
        Settings {
            http_listen,
            api_tls,
            broker,
            allow_plaintext: self.allow_plaintext,
            embedded_broker: EmbeddedBroker::parse(&self.embedded_broker)
                .unwrap_or(EmbeddedBroker::Rumqttd),
            broker_max_connections: self.broker_max_connections,
            broker_ca_file: non_empty(&self.broker_ca_file),
            broker_client_identity: non_empty(&self.broker_client_cert_file)
                .zip(non_empty(&self.broker_client_key_file)),
            advertised_broker_url: (!self.advertised_broker_url.is_empty())
                .then_some(self.advertised_broker_url),
            advertise,
            ingest: IngestSettings {
                batch_max: self.ingest.batch_max,
                ack_interval: Duration::from_millis(self.ingest.ack_interval_ms),
                sessions: self.ingest.sessions,
            },
            telemetry_retention: HOUR
                .saturating_mul(u32::try_from(self.telemetry_retention_hours).unwrap_or(u32::MAX)),
            chunk_window: Duration::from_millis(self.chunk_window_ms),
            command_ttl: HOUR
                .saturating_mul(u32::try_from(self.command_ttl_hours).unwrap_or(u32::MAX)),
            rollout_tick: Duration::from_millis(self.rollout_tick_ms),
            rollout_republish: Duration::from_millis(self.rollout_republish_ms),
            continuous: non_empty(&c.policy).map(|policy| ContinuousSettings {
                policy,
                tick: Duration::from_secs(c.tick_secs),
                local_jobs: c.local_jobs,
                slurm_bin_dir: non_empty(&c.slurm_bin_dir),
                slurm_conf: non_empty(&c.slurm_conf),
            }),
            metrics_per_device_limit: self.metrics.per_device_limit,
            integration_stream: self.integration.stream,
            data_dir: self.data_dir,
        }
    }
}

fn env_layer(cfg: &mut ServeConfig, env: &HashMap<String, String>, errors: &mut Vec<String>) {
    if let Some(v) = env.get("DROVER_DATA_DIR") {
        cfg.data_dir = PathBuf::from(v);
    }
    if let Some(v) = env.get("DROVER_HTTP_LISTEN") {
        cfg.http_listen = v.clone();
    }
    if let Some(v) = env.get("DROVER_MQTT_LISTEN") {
        cfg.mqtt_listen = v.clone();
    }
    if let Some(v) = env.get("DROVER_BROKER_URL") {
        cfg.broker_url = v.clone();
    }
    if let Some(v) = env.get("DROVER_ADVERTISE") {
        cfg.advertise = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    if let Some(v) = env.get("DROVER_BROKER_CA_FILE") {
        cfg.broker_ca_file = v.clone();
    }
    if let Some(v) = env.get("DROVER_INGEST_SESSIONS") {
        match v.parse() {
            Ok(n) => cfg.ingest.sessions = n,
            Err(_) => errors.push(format!("DROVER_INGEST_SESSIONS={v:?} is not a number")),
        }
    }
}

impl ServeConfig {
    /// `advertise` parsed; an unspecified embedded listen address needs a name devices can
    /// use, or enrolled agents would be told to connect to `0.0.0.0`.
    fn check_advertise(
        &self,
        broker: Option<&BrokerMode>,
        errors: &mut Vec<String>,
    ) -> Vec<Advertised> {
        let mut out: Vec<Advertised> = Vec::new();
        for a in &self.advertise {
            match parse_advertised(a) {
                Ok(a) if !out.contains(&a) => out.push(a),
                Ok(_) => {}
                Err(e) => errors.push(format!("advertise: {e}")),
            }
        }
        match broker {
            Some(BrokerMode::External(_)) if !self.advertise.is_empty() => errors.push(
                "advertise names the embedded broker's certificate; with broker_url set \
                 advertised_broker_url to the URL devices use instead"
                    .into(),
            ),
            Some(BrokerMode::Embedded { listen })
                if listen.ip().is_unspecified()
                    && self.advertise.is_empty()
                    && self.advertised_broker_url.is_empty() =>
            {
                errors.push(format!(
                    "mqtt_listen = {listen} accepts devices on every address but names none \
                     they can reach, so enrolled agents would be told to connect to {}; set \
                     the name or address devices use: `drover serve --advertise HOST[:PORT]` \
                     (repeatable) or `advertise = [\"HOST\"]` in the config file",
                    listen.ip()
                ));
            }
            _ => {}
        }
        out
    }
}

impl ServeConfig {
    /// Applies every layer and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Settings, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?
            }
            None => ServeConfig::default(),
        };
        let mut errors = Vec::new();
        env_layer(&mut cfg, env, &mut errors);
        if let Some(v) = &overrides.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = &overrides.http_listen {
            cfg.http_listen = v.clone();
        }
        if let Some(v) = &overrides.mqtt_listen {
            cfg.mqtt_listen = v.clone();
        }
        if let Some(v) = &overrides.broker_url {
            cfg.broker_url = v.clone();
        }
        if overrides.allow_plaintext {
            cfg.allow_plaintext = true;
        }
        if overrides.api_plaintext {
            cfg.api_tls = "off".into();
        }
        if !overrides.advertise.is_empty() {
            cfg.advertise = overrides.advertise.clone();
        }
        cfg.validate_with(errors)
    }

    pub fn validate(self) -> Result<Settings, ConfigError> {
        self.validate_with(Vec::new())
    }

    fn validate_with(self, mut errors: Vec<String>) -> Result<Settings, ConfigError> {
        if self.version != CONFIG_VERSION {
            errors.push(format!(
                "version = {} is not supported; this build reads version {CONFIG_VERSION}",
                self.version
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("data_dir is empty".into());
        }
        let http: Option<SocketAddr> = match self.http_listen.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(format!(
                    "http_listen = {:?} is not an address like 127.0.0.1:8470",
                    self.http_listen
                ));
                None
            }
        };
        let broker = if self.broker_url.is_empty() {
            match self.mqtt_listen.parse() {
                Ok(listen) => Some(BrokerMode::Embedded { listen }),
                Err(_) => {
                    errors.push(format!(
                        "mqtt_listen = {:?} is not an address like 127.0.0.1:8883",
                        self.mqtt_listen
                    ));
                    None
                }
            }
        } else {
            match parse_broker_url(&self.broker_url) {
                Ok(u) => Some(BrokerMode::External(u)),
                Err(e) => {
                    errors.push(e);
                    None
                }
            }
        };
        if !self.advertised_broker_url.is_empty() {
            if let Err(e) = parse_broker_url(&self.advertised_broker_url) {
                errors.push(format!("advertised_broker_url: {e}"));
            }
        }
        if let Err(e) = EmbeddedBroker::parse(&self.embedded_broker) {
            errors.push(e);
        }
        let advertise = self.check_advertise(broker.as_ref(), &mut errors);
        if self.continuous.tick_secs == 0 || self.continuous.local_jobs == 0 {
            errors.push("continuous.tick_secs and continuous.local_jobs must be at least 1".into());
        }
        if !matches!(self.api_tls.as_str(), "auto" | "on" | "off") {
            errors.push(format!(
                "api_tls = {:?} must be \"auto\", \"on\" or \"off\"",
                self.api_tls
            ));
        }
        if self.api_cert_file.is_empty() != self.api_key_file.is_empty() {
            errors.push("api_cert_file and api_key_file must be given together".into());
        }
        if self.api_hosts.iter().any(|h| h.trim().is_empty()) {
            errors.push("api_hosts has an empty name".into());
        }
        if self.broker_client_cert_file.is_empty() != self.broker_client_key_file.is_empty() {
            errors.push(
                "broker_client_cert_file and broker_client_key_file must be given together".into(),
            );
        }
        if !(1..=INGEST_QUEUE).contains(&self.ingest.batch_max) {
            errors.push(format!(
                "ingest.batch_max must be within 1..={INGEST_QUEUE} (the ingest queue holds \
                 {INGEST_QUEUE} frames)"
            ));
        }
        if self.ingest.sessions == 0 || self.ingest.sessions > 64 {
            errors.push("ingest.sessions must be within 1..=64".into());
        }
        if self.ingest.ack_interval_ms == 0 {
            errors.push("ingest.ack_interval_ms must be at least 1".into());
        }
        if self.command_ttl_hours == 0 {
            errors.push("command_ttl_hours must be at least 1".into());
        }
        if !(10..=600_000).contains(&self.rollout_tick_ms) {
            errors.push("rollout_tick_ms must be within 10..=600000".into());
        }
        if !(100..=3_600_000).contains(&self.rollout_republish_ms) {
            errors.push("rollout_republish_ms must be within 100..=3600000".into());
        }
        match (errors.is_empty(), http, broker) {
            (true, Some(http_listen), Some(broker)) => {
                Ok(self.settings(http_listen, broker, advertise))
            }
            _ => Err(ConfigError::Invalid(errors)),
        }
    }

    /// The commented default config printed by `drover print-default-config`.
    pub fn default_toml() -> String {
        let body = toml::to_string(&ServeConfig::default()).unwrap_or_default();
        format!(
            "# drover serve configuration (defaults < this file < DROVER_* env < flags)\n{body}"
        )
    }
}

#[cfg(test)]
mod tests;
