//! Agent configuration: a human-edited TOML file, apart from wire types.
//!
//! Layering: built-in defaults < TOML file < `DROVER_AGENT_*` environment < command-line
//! overrides. Every field is validated and every error is reported at once, so an operator
//! fixes a config in one pass. The environment is passed in as a map: tests never touch the
//! process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use drover_protocol::topics::{parse_hex32, DeviceId};
use drover_protocol::trust::DeviceKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;
/// Prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "DROVER_AGENT_";

/// Keys absent from a file take their defaults (`drover device enroll` writes only what
/// the enrollment decides).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub version: u32,
    pub device_id: String,
    /// 64 hex chars: the HMAC key shared with the control plane. Secret: never logged.
    pub device_key: String,
    /// 64 hex chars: the pinned ed25519 root public key.
    pub root_public_key: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker_url: String,
    pub data_dir: PathBuf,
    /// Loopback address of the local inference API (`127.0.0.1:0` picks a port).
    pub api_addr: String,
    /// Address of the Prometheus `/metrics` listener, apart from the inference API so a
    /// scraper never reaches it (`127.0.0.1:0` picks a port; a non-loopback address lets
    /// a Prometheus on the network scrape the device while the API stays on loopback).
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: String,
    /// Accept a plaintext `mqtt://` broker_url while a `[tls]` section is configured (the
    /// TLS files are then unused). Off: such a config is refused rather than silently
    /// dropping TLS, as the control plane's `allow_plaintext` guards its broker.
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The budget of named models this device holds (issue 17).
    #[serde(default)]
    pub models: ModelsConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Which sampled inputs are kept, within which budget.
    #[serde(default)]
    pub capture: crate::capture::CaptureConfig,
    /// Written by `drover device enroll --replace`; absent for a new device.
    #[serde(default, skip_serializing_if = "ReplacementConfig::is_new_device")]
    pub replacement: ReplacementConfig,
}

// Hand-written so the device key can never reach a log line.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("version", &self.version)
            .field("device_id", &self.device_id)
            .field("device_key", &"<redacted>")
            .field("root_public_key", &self.root_public_key)
            .field("broker_url", &self.broker_url)
            .field("data_dir", &self.data_dir)
            .field("api_addr", &self.api_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("allow_plaintext", &self.allow_plaintext)
            .field("labels", &self.labels)
            .field("tls", &self.tls)
            .field("telemetry", &self.telemetry)
            .field("store", &self.store)
            .field("models", &self.models)
            .field("runtime", &self.runtime)
            .field("capture", &self.capture)
            .field("replacement", &self.replacement)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub interval_ms: u64,
    pub spool_max_bytes: u64,
    /// Fraction of live inputs kept as samples, in parts per million.
    pub sample_rate_ppm: u32,
}

/// The model store (`blobs/`, `downloads/`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Disk budget of the model store in bytes: a deploy that would take the store's
    /// files above it is refused before downloading. 0: no budget (free space only).
    pub max_bytes: u64,
}

/// The model budget (`[models]`): how many named models, and how much disk and memory
/// they may take. A deploy that would exceed it is refused before its download, with the
/// figures; the budget is reported to the control plane (`Models`, protocol 2). 0: no
/// limit. Disk counts every version a slot keeps (active, previous, shadow, staged) at
/// its manifest's size; memory is an estimate per loaded model (active and shadow):
/// `MEMORY_PER_FILE_BYTE` x file size + `MEMORY_PER_MODEL` (`machine::budget`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    pub max_models: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl ModelsConfig {
    /// The budget as the machine checks it and the `Models` report carries it.
    pub fn budget(&self) -> drover_protocol::messages::ModelBudget {
        let limit = |v: u64| (v != 0).then_some(v);
        drover_protocol::messages::ModelBudget {
            max_models: (self.max_models != 0).then_some(self.max_models),
            memory_bytes: limit(self.memory_bytes),
            disk_bytes: limit(self.disk_bytes),
        }
    }
}

/// The model runtime (tract).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads one inference may use (tract's multithreaded kernels): 0 picks the
    /// device's cores, at most 4; 1 runs every inference on the thread serving it.
    pub threads: u32,
    /// Threads of the agent's async runtime (MQTT, the HTTP API, telemetry): 1 by default,
    /// which is what a device agent's I/O needs and each further thread costs about 0.5 MiB
    /// of RSS (BENCHMARKS.md); inference never runs on them for long (it moves off to a
    /// blocking thread). 0 picks the device's cores. Raise it for many concurrent
    /// requests with large JSON bodies, whose parsing runs on these threads.
    pub io_threads: u32,
    /// Load and self-test every new model (deploy, shadow) in a short-lived child process
    /// first (`crate::isolate`), so a model that crashes or runs away fails its deployment
    /// instead of taking the agent down.
    pub isolate: bool,
    /// The child's address-space limit in bytes; 0: 512 MiB + 16 x the model file's size.
    pub load_memory_bytes: u64,
    /// The child's wall-clock limit in ms (its CPU-time limit is this times the threads).
    pub load_timeout_ms: u64,
    /// The drover-agent binary the child runs; unset: this process when it is
    /// drover-agent, else a drover-agent beside its executable, else the agent refuses to
    /// start (embeddings such as tests and `drover demo` set it, or `isolate = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_exe: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            io_threads: 1,
            isolate: true,
            load_memory_bytes: 0,
            load_timeout_ms: 120_000,
            loader_exe: None,
        }
    }
}

/// The most threads `runtime.threads` accepts.
pub const MAX_RUNTIME_THREADS: u32 = 64;

impl RuntimeConfig {
    pub fn threads(&self) -> drover_runtime::Threads {
        drover_runtime::Threads::from_config(self.threads as usize)
    }

    /// Worker threads for the agent's tokio runtime (`io_threads`; 0: the device's cores).
    pub fn io_worker_threads(&self) -> usize {
        match self.io_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }
}

/// Where the sequence numbers of the device this one replaces stopped (`drover device
/// enroll --replace` writes them). Without them the control plane would take the
/// replacement's first frames for replays of the old device's, and the replacement would
/// act on commands issued to the hardware it replaces.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplacementConfig {
    /// The first uplink sequence number this device may use.
    pub uplink_seq_start: u64,
    /// Commands up to this sequence number were issued to the replaced device: ignored.
    pub command_seq_floor: u64,
}

impl ReplacementConfig {
    pub fn is_new_device(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval_ms: 10_000,
            spool_max_bytes: 64 * 1024 * 1024,
            sample_rate_ppm: 10_000,
        }
    }
}

/// The metrics listener's default: loopback, next to the API's default port.
fn default_metrics_addr() -> String {
    "127.0.0.1:9480".into()
}

impl Default for AgentConfig {
    /// A hardened default: loopback API, TLS-less only on localhost, empty identity that
    /// validation refuses until `drover device enroll` fills it in.
    fn default() -> Self {
        Self {
            version: CONFIG_VERSION,
            device_id: String::new(),
            device_key: String::new(),
            root_public_key: String::new(),
            broker_url: "mqtt://127.0.0.1:1883".into(),
            data_dir: PathBuf::from("/var/lib/drover-agent"),
            api_addr: "127.0.0.1:8480".into(),
            metrics_addr: default_metrics_addr(),
            allow_plaintext: false,
            labels: BTreeMap::new(),
            tls: None,
            telemetry: TelemetryConfig::default(),
            store: StoreConfig::default(),
            models: ModelsConfig::default(),
            runtime: RuntimeConfig::default(),
            capture: Default::default(),
            replacement: ReplacementConfig::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error("cannot serialize config: {0}")]
    Serialize(String),
}

/// Broker address parsed from `broker_url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// A config that passed validation, with its secrets decoded.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    pub raw: AgentConfig,
    pub device_id: DeviceId,
    pub device_key: DeviceKey,
    pub root_public_key: [u8; 32],
    pub broker: BrokerAddr,
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

impl AgentConfig {
    /// Parses TOML text (no layering, no validation).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })
    }

    /// Relative `[tls]` paths made relative to `config_file`'s directory, as the agent
    /// reads them: for tools that parse a config with [`AgentConfig::from_toml`] and then
    /// open its files (`drover doctor --agent-config`).
    pub fn resolve_tls_paths(&mut self, config_file: &Path) {
        let (Some(dir), Some(tls)) = (config_file.parent(), self.tls.as_mut()) else {
            return;
        };
        let beside = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        beside(&mut tls.ca_file);
        tls.client_cert_file.as_mut().map(beside);
        tls.client_key_file.as_mut().map(beside);
    }

    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }

    /// Loads the layered config: defaults < `file` < `env` (`DROVER_AGENT_*` keys; nested
    /// keys joined by `_`, e.g. `DROVER_AGENT_TELEMETRY_INTERVAL_MS`) < `overrides`
    /// (`key=value` pairs with dotted keys, e.g. `telemetry.interval_ms=500`), then
    /// validates.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &[(String, String)],
    ) -> Result<ValidConfig, ConfigError> {
        Self::layered(file, env, overrides)?.validate()
    }

    /// What `drover-agent check-config` reports: [`AgentConfig::load`]'s validation plus
    /// the files the config names, checked on disk: TLS files that are absent or whose key
    /// is readable by others, and a config file readable by others while it holds the
    /// device key. Every problem at once, each saying what to do.
    pub fn check(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &[(String, String)],
    ) -> Result<ValidConfig, ConfigError> {
        let cfg = Self::layered(file, env, overrides)?;
        let mut errors = match cfg.validate() {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(errors)) => errors,
            Err(e) => return Err(e),
        };
        if let Some(path) = file {
            errors.extend(config_file_problem(path));
        }
        if let Some(tls) = &cfg.tls {
            errors.extend(tls_file_problems(tls));
        }
        if errors.is_empty() {
            cfg.validate()
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// Defaults < `file` < `env` < `overrides`, not yet validated.
    fn layered(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &[(String, String)],
    ) -> Result<AgentConfig, ConfigError> {
        let mut table = toml::Table::try_from(AgentConfig::default())
            .map_err(|e| ConfigError::Serialize(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let mut from_file: toml::Table =
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            tls_paths_beside(&mut from_file, path);
            merge(&mut table, from_file);
        }
        let mut errors = Vec::new();
        for (key, value) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            match env_key_path(rest) {
                Some(path) => set_path(&mut table, &path, value),
                None => errors.push(format!("environment variable {key} names no config key")),
            }
        }
        for (key, value) in overrides {
            let path: Vec<&str> = key.split('.').collect();
            set_path(&mut table, &path, value);
        }
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: file.map(Path::to_owned).unwrap_or_default(),
                message: e.to_string(),
            })
    }

    /// The numeric limits of the telemetry, store and runtime sections.
    fn check_limits(&self, errors: &mut Vec<String>) {
        let t = &self.telemetry;
        if !(100..=86_400_000).contains(&t.interval_ms) {
            errors.push("telemetry.interval_ms: must be within 100..=86400000".into());
        }
        if t.spool_max_bytes < 64 * 1024 {
            errors.push("telemetry.spool_max_bytes: must be at least 65536".into());
        }
        if t.sample_rate_ppm > 1_000_000 {
            errors.push("telemetry.sample_rate_ppm: must be at most 1000000".into());
        }
        if self.store.max_bytes != 0 && self.store.max_bytes < 1 << 20 {
            errors.push("store.max_bytes: must be 0 (no budget) or at least 1048576".into());
        }
        self.capture.check(errors);
        if self.runtime.threads > MAX_RUNTIME_THREADS {
            errors.push(format!(
                "runtime.threads: must be at most {MAX_RUNTIME_THREADS} (0 picks the device's cores)"
            ));
        }
        if self.runtime.io_threads > MAX_RUNTIME_THREADS {
            errors.push(format!(
                "runtime.io_threads: must be at most {MAX_RUNTIME_THREADS} (0 picks the device's cores)"
            ));
        }
        let rt = &self.runtime;
        if rt.load_memory_bytes != 0 && rt.load_memory_bytes < 64 << 20 {
            errors.push(
                "runtime.load_memory_bytes: must be 0 (derived from the model's size) or at \
                 least 67108864 (64 MiB)"
                    .into(),
            );
        }
        if !(100..=86_400_000).contains(&rt.load_timeout_ms) {
            errors.push("runtime.load_timeout_ms: must be within 100..=86400000".into());
        }
    }

    /// Checks every field; reports all problems at once.
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        let mut errors = Vec::new();
        if self.version != CONFIG_VERSION {
            errors.push(format!(
                "version = {} is not supported; this agent reads version {CONFIG_VERSION}",
                self.version
            ));
        }
        let device_id = DeviceId::new(self.device_id.clone())
            .map_err(|e| errors.push(format!("device_id: {e}")))
            .ok();
        let device_key = parse_hex32(&self.device_key)
            .ok_or_else(|| errors.push("device_key: must be 64 hex characters".into()))
            .ok();
        let root = parse_hex32(&self.root_public_key)
            .ok_or_else(|| errors.push("root_public_key: must be 64 hex characters".into()))
            .ok();
        if let Some(r) = root {
            if drover_protocol::TrustStore::new(r).is_err() {
                errors.push("root_public_key: not a valid ed25519 public key".into());
            }
        }
        let broker = parse_broker_url(&self.broker_url)
            .map_err(|e| errors.push(format!("broker_url: {e}")))
            .ok();
        if let Some(b) = &broker {
            if b.tls && self.tls.is_none() {
                errors
                    .push("tls: an mqtts:// broker_url needs a [tls] section with ca_file".into());
            }
            if !b.tls && self.tls.is_some() && !self.allow_plaintext {
                errors.push(format!(
                    "broker_url: {:?} is plaintext MQTT while a [tls] section is configured, so \
                     the agent would connect without TLS and leave ca_file and the client \
                     certificate unused; use mqtts://, or set allow_plaintext = true \
                     (--set allow_plaintext=true) if plaintext is really meant",
                    self.broker_url
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
                errors.push(
                    "tls: client_cert_file and client_key_file must be given together".into(),
                );
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("data_dir: must not be empty".into());
        }
        let api_addr = self
            .api_addr
            .parse::<SocketAddr>()
            .map_err(|e| errors.push(format!("api_addr: {e}")))
            .ok();
        let metrics_addr = self
            .metrics_addr
            .parse::<SocketAddr>()
            .map_err(|e| {
                errors.push(format!(
                    "metrics_addr: {e} (host:port, e.g. 127.0.0.1:9480)"
                ))
            })
            .ok();
        if let (Some(a), Some(m)) = (api_addr, metrics_addr) {
            if a == m && a.port() != 0 {
                errors.push(format!(
                    "metrics_addr: {m} is api_addr too; give /metrics a port of its own"
                ));
            }
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 64 || v.len() > 256 {
                errors.push(format!(
                    "labels.{k}: keys are 1-64 bytes and values up to 256 bytes"
                ));
            }
        }
        self.check_limits(&mut errors);
        match (
            device_id,
            device_key,
            root,
            broker,
            api_addr.zip(metrics_addr),
        ) {
            (
                Some(device_id),
                Some(key),
                Some(root),
                Some(broker),
                Some((api_addr, metrics_addr)),
            ) if errors.is_empty() => Ok(ValidConfig {
                raw: self.clone(),
                device_id,
                device_key: DeviceKey(key),
                root_public_key: root,
                broker,
                api_addr,
                metrics_addr,
            }),
            _ => Err(ConfigError::Invalid(errors)),
        }
    }
}

/// Parses `mqtt://host:port` or `mqtts://host:port`.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddr, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?} has an invalid port"))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// The config file holds the device key and group or others may read it.
fn config_file_problem(path: &Path) -> Option<String> {
    let holds_key = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .and_then(|t| Some(!t.get("device_key")?.as_str()?.is_empty()))
        .unwrap_or(false);
    match drover_host::fs::check_private(path) {
        Err(drover_host::fs::FsError::InsecurePermissions { mode, .. }) if holds_key => {
            Some(format!(
                "config file {} holds the device key and is readable by group or others \
                 (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ))
        }
        _ => None,
    }
}

/// TLS files named in `[tls]` that are absent or unreadable, and a client key others may
/// read.
fn tls_file_problems(tls: &TlsConfig) -> Vec<String> {
    let mut out = Vec::new();
    let files = [
        (
            "tls.ca_file",
            Some(&tls.ca_file),
            "the fleet CA certificate",
        ),
        (
            "tls.client_cert_file",
            tls.client_cert_file.as_ref(),
            "the device certificate from `drover device enroll`",
        ),
        (
            "tls.client_key_file",
            tls.client_key_file.as_ref(),
            "the device key from `drover device enroll`",
        ),
    ];
    for (key, path, what) in files {
        let Some(path) = path else { continue };
        let p = path.display();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(format!(
                "{key}: {p} does not exist; copy {what} there or correct the path"
            )),
            Err(e) => out.push(format!("{key}: cannot read {p}: {e}")),
            Ok(m) if !m.is_file() => out.push(format!("{key}: {p} is not a file")),
            Ok(_) if key == "tls.client_key_file" => {
                if let Err(drover_host::fs::FsError::InsecurePermissions { mode, .. }) =
                    drover_host::fs::check_private(path)
                {
                    out.push(format!(
                        "{key}: {p} is readable by group or others (mode {mode:o}); \
                         run `chmod 600 {p}`"
                    ));
                }
            }
            Ok(_) => {}
        }
    }
    out
}

/// Relative `[tls]` paths in a config file name files beside it (`drover device enroll`
/// writes them so), wherever the agent is started from.
fn tls_paths_beside(file_table: &mut toml::Table, file: &Path) {
    let Some(dir) = file.parent() else { return };
    let Some(toml::Value::Table(tls)) = file_table.get_mut("tls") else {
        return;
    };
    for key in ["ca_file", "client_cert_file", "client_key_file"] {
        if let Some(toml::Value::String(p)) = tls.get_mut(key) {
            if Path::new(p.as_str()).is_relative() {
                *p = dir.join(p.as_str()).to_string_lossy().into_owned();
            }
        }
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Maps an env suffix (`TELEMETRY_INTERVAL_MS`) to a key path.
fn env_key_path(rest: &str) -> Option<Vec<&'static str>> {
    const KEYS: &[&[&str]] = &[
        &["version"],
        &["device_id"],
        &["device_key"],
        &["root_public_key"],
        &["broker_url"],
        &["data_dir"],
        &["api_addr"],
        &["metrics_addr"],
        &["allow_plaintext"],
        &["tls", "ca_file"],
        &["tls", "client_cert_file"],
        &["tls", "client_key_file"],
        &["telemetry", "interval_ms"],
        &["telemetry", "spool_max_bytes"],
        &["telemetry", "sample_rate_ppm"],
        &["store", "max_bytes"],
        &["models", "max_models"],
        &["models", "memory_bytes"],
        &["models", "disk_bytes"],
        &["runtime", "threads"],
        &["runtime", "io_threads"],
        &["runtime", "isolate"],
        &["runtime", "load_memory_bytes"],
        &["runtime", "load_timeout_ms"],
        &["runtime", "loader_exe"],
        &["capture", "keep"],
        &["capture", "low_confidence_below"],
        &["capture", "per_minute"],
        &["capture", "per_hour"],
        &["capture", "per_day"],
        &["capture", "max_bytes_per_day"],
    ];
    let want = rest.to_ascii_lowercase();
    KEYS.iter()
        .find(|p| p.join("_") == want)
        .map(|p| p.to_vec())
}

/// Sets a dotted key to a string value, typed by the key (numbers stay numbers).
fn set_path(table: &mut toml::Table, path: &[&str], value: &str) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    let v = match value.parse::<i64>() {
        Ok(n)
            if matches!(
                *last,
                "version"
                    | "interval_ms"
                    | "spool_max_bytes"
                    | "sample_rate_ppm"
                    | "max_bytes"
                    | "threads"
                    | "io_threads"
                    | "load_memory_bytes"
                    | "load_timeout_ms"
                    | "per_minute"
                    | "per_hour"
                    | "per_day"
                    | "max_bytes_per_day"
            ) =>
        {
            toml::Value::Integer(n)
        }
        _ if *last == "low_confidence_below" && value.parse::<f64>().is_ok() => {
            toml::Value::Float(value.parse::<f64>().unwrap_or_default())
        }
        _ => match (*last, value.parse::<bool>()) {
            ("allow_plaintext" | "isolate", Ok(b)) => toml::Value::Boolean(b),
            _ => toml::Value::String(value.to_owned()),
        },
    };
    t.insert((*last).to_owned(), v);
}

#[cfg(test)]
mod tests;
