//! What `drover device enroll` (and the demo, and the end-to-end fleets) write for a new
//! device: its TLS files and its agent config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_agent::config::{AgentConfig, ConfigError, ReplacementConfig, TlsConfig};
use drover_control_plane::api::EnrollResponse;
use drover_host::fs::{write_private, FsError};

/// Writes the TLS files beside the agent config (`<dir>/<id>.ca.pem`, `<id>.cert.pem`,
/// `<id>.key.pem`, all 0600) and returns the agent config referring to them under
/// `device_dir` (where they will live on the device; `dir` when `None`).
pub fn write_agent_files(
    resp: EnrollResponse,
    dir: &Path,
    device_dir: Option<&Path>,
    data_dir: PathBuf,
    labels: BTreeMap<String, String>,
) -> Result<AgentConfig, FsError> {
    let id = resp.device_id.clone();
    let names = [
        format!("{id}.ca.pem"),
        format!("{id}.cert.pem"),
        format!("{id}.key.pem"),
    ];
    let has_tls = !resp.client_cert_pem.is_empty();
    if has_tls {
        for (name, body) in
            names
                .iter()
                .zip([&resp.ca_pem, &resp.client_cert_pem, &resp.client_key_pem])
        {
            write_private(&dir.join(name), body.as_bytes())?;
        }
    }
    let on_device = device_dir.unwrap_or(dir);
    let tls = (has_tls && resp.broker_url.starts_with("mqtts://")).then(|| TlsConfig {
        ca_file: on_device.join(&names[0]),
        client_cert_file: Some(on_device.join(&names[1])),
        client_key_file: Some(on_device.join(&names[2])),
    });
    let mut cfg = agent_config(resp, data_dir, labels);
    cfg.tls = tls;
    Ok(cfg)
}

/// The enrolled device's agent config (the agent's own defaults for everything the
/// enrollment does not decide).
pub fn agent_config(
    resp: EnrollResponse,
    data_dir: PathBuf,
    labels: BTreeMap<String, String>,
) -> AgentConfig {
    let replacement = ReplacementConfig {
        uplink_seq_start: resp.uplink_seq_start,
        command_seq_floor: resp.command_seq_floor,
    };
    AgentConfig {
        replacement,
        device_id: resp.device_id,
        device_key: resp.device_key,
        root_public_key: resp.root_public_key,
        broker_url: resp.broker_url,
        data_dir,
        labels,
        ..Default::default()
    }
}

/// The agent config `device enroll` writes: what the enrollment decides (identity, broker,
/// TLS files, labels, a replacement's sequences) and nothing else, so every key left out
/// takes the agent's own default on the device (`drover-agent print-default-config`)
/// rather than a value fixed on the operator's machine.
pub fn enrolled_toml(cfg: &AgentConfig) -> Result<String, ConfigError> {
    const ALWAYS: [&str; 5] = [
        "version",
        "device_id",
        "device_key",
        "root_public_key",
        "broker_url",
    ];
    let ser = |c: &AgentConfig| {
        toml::Table::try_from(c).map_err(|e| ConfigError::Serialize(e.to_string()))
    };
    let defaults = ser(&AgentConfig::default())?;
    let mut table = ser(cfg)?;
    table.retain(|k, v| ALWAYS.contains(&k) || defaults.get(k) != Some(v));
    let body = toml::to_string(&table).map_err(|e| ConfigError::Serialize(e.to_string()))?;
    Ok(format!(
        "# Written by `drover device enroll`. Keys left out take the agent's defaults\n\
         # (`drover-agent print-default-config`); relative [tls] paths are relative to this file.\n{body}"
    ))
}
