//! The agent's durable state: replay floor, uplink sequence reservation, keyring, settings
//! and the model slots. One small JSON file, rewritten atomically on every change.
//!
//! The on-disk record types are private to this module: the rest of the agent works with
//! plain structs, so a field added here is a file-format decision made in one place.

use std::path::{Path, PathBuf};

use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{AgentSettings, DeployMode, ModelRef};
use drover_protocol::trust::{Digest, SignedBlob};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use drover_host::fs::write_atomic;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot write state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Where a model is in its life on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    Staged,
    Verified,
    SelfTested,
    Active,
    Healthy,
    RolledBack,
}

/// A model installed in the store (its file is `blobs/<sha256>.onnx`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub model: ModelRef,
    pub manifest: Manifest,
    pub state: SlotState,
    /// Boots with this model active before it reached `Healthy` (a model that keeps
    /// crashing the agent during probation is rolled back).
    #[serde(default)]
    pub unhealthy_boots: u32,
    /// The command (seq, digest) that activated it, reported when it becomes healthy.
    #[serde(default)]
    pub activated_by: Option<(u64, Digest)>,
}

/// A deployment accepted (its command's seq persisted) but not finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub command_seq: u64,
    pub command_digest: Digest,
    pub manifest_blob: SignedBlob,
    pub manifest: Manifest,
    pub model: ModelRef,
    pub mode: DeployMode,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub telemetry_interval_ms: u64,
    pub sample_rate_ppm: u32,
}

impl From<&AgentSettings> for Settings {
    fn from(s: &AgentSettings) -> Self {
        Self {
            telemetry_interval_ms: s.telemetry_interval_ms,
            sample_rate_ppm: s.sample_rate_ppm,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Highest command sequence accepted (the replay floor).
    pub last_command_seq: u64,
    /// Digest of that command, to recognise the broker redelivering it (not a replay
    /// attack: the same signed bytes we already accepted).
    #[serde(default)]
    pub last_command_digest: Option<Digest>,
    /// Uplink sequence numbers up to this are reserved; a restart continues above it.
    pub uplink_seq_reserved: u64,
    /// Local API request ids up to this are reserved; a restart continues above it, so a
    /// label sent for a request id never meets a sample from another run.
    #[serde(default)]
    pub request_ids_reserved: u64,
    pub keyring: Option<SignedBlob>,
    pub settings: Option<Settings>,
    /// Slot A/B: the model serving traffic and the one to roll back to.
    pub active: Option<Slot>,
    pub previous: Option<Slot>,
    pub shadow: Option<Slot>,
    pub pending: Option<Pending>,
}

impl State {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("state.json")
    }

    /// Reads the state, or a fresh one on first boot.
    pub fn load(data_dir: &Path) -> Result<State, StateError> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Persists durably (temp file, fsync, rename, fsync dir).
    pub fn save(&self, data_dir: &Path) -> Result<(), StateError> {
        let path = Self::path(data_dir);
        let bytes = serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|source| StateError::Write { path, source })
    }
}
