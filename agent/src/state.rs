//! The agent's durable state on disk: `state.json`, one small JSON file rewritten
//! atomically (temp file, fsync, rename, directory fsync) on every change.
//!
//! The deployment machine works with the plain record of [`crate::machine::State`]; the
//! serde types below are private to this module, so the file format is decided here and
//! nowhere else. Field names, order and defaults are the format: never rename or remove
//! one; a new field needs `#[serde(default)]`.
//!
//! Named model slots (issue 17) are the appended `models` map. The single-model fields
//! before it (`active`, `previous`, `shadow`, `pending`) stay: they are written with the
//! first slot, so an agent downgraded to the single-model release still serves it, and a
//! file without `models` (written by that release) is migrated on load: its model becomes
//! the first slot, named by its model (`tests/fixtures/state-v1` is such a file). A
//! `previous` or `shadow` of another name (the single-model agent let a deploy of a new
//! name replace the old one) is not that slot's and is dropped; a `pending` of another
//! name becomes its own slot's deployment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{DeployMode, ModelRef};
use drover_protocol::trust::{Digest, SignedBlob};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use drover_host::fs::write_atomic;

pub use crate::machine::{Pending, Settings, Slot, SlotState, Slots, State};

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

impl State {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("state.json")
    }

    /// Reads the state, or a fresh one on first boot.
    pub fn load(data_dir: &Path) -> Result<State, StateError> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Record>(&bytes)
                .map(State::from)
                .map_err(|e| StateError::Corrupt {
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
        let bytes = serde_json::to_vec(&Record::from(self)).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|source| StateError::Write { path, source })
    }
}

#[derive(Serialize, Deserialize)]
enum SlotStateRecord {
    Staged,
    Verified,
    SelfTested,
    Active,
    Healthy,
    RolledBack,
}

#[derive(Serialize, Deserialize)]
struct SlotRecord {
    model: ModelRef,
    manifest: Manifest,
    state: SlotStateRecord,
    #[serde(default)]
    unhealthy_boots: u32,
    #[serde(default)]
    activated_by: Option<(u64, Digest)>,
}

#[derive(Serialize, Deserialize)]
struct PendingRecord {
    command_seq: u64,
    command_digest: Digest,
    manifest_blob: SignedBlob,
    manifest: Manifest,
    model: ModelRef,
    mode: DeployMode,
}

#[derive(Serialize, Deserialize)]
struct SettingsRecord {
    telemetry_interval_ms: u64,
    sample_rate_ppm: u32,
}

#[derive(Serialize, Deserialize)]
struct Record {
    last_command_seq: u64,
    #[serde(default)]
    last_command_digest: Option<Digest>,
    uplink_seq_reserved: u64,
    #[serde(default)]
    request_ids_reserved: u64,
    keyring: Option<SignedBlob>,
    settings: Option<SettingsRecord>,
    active: Option<SlotRecord>,
    previous: Option<SlotRecord>,
    shadow: Option<SlotRecord>,
    pending: Option<PendingRecord>,
    /// Every named slot (issue 17); absent in files of the single-model release.
    #[serde(default)]
    models: BTreeMap<String, SlotsRecord>,
}

#[derive(Serialize, Deserialize)]
struct SlotsRecord {
    active: Option<SlotRecord>,
    previous: Option<SlotRecord>,
    shadow: Option<SlotRecord>,
    pending: Option<PendingRecord>,
}

impl From<SlotsRecord> for Slots {
    fn from(r: SlotsRecord) -> Self {
        Slots {
            active: r.active.map(Slot::from),
            previous: r.previous.map(Slot::from),
            shadow: r.shadow.map(Slot::from),
            pending: r.pending.map(Pending::from),
        }
    }
}

impl From<&Slots> for SlotsRecord {
    fn from(s: &Slots) -> Self {
        SlotsRecord {
            active: s.active.as_ref().map(SlotRecord::from),
            previous: s.previous.as_ref().map(SlotRecord::from),
            shadow: s.shadow.as_ref().map(SlotRecord::from),
            pending: s.pending.as_ref().map(PendingRecord::from),
        }
    }
}

/// The single-model record's model as the first slot (see the module doc).
fn migrate(legacy: SlotsRecord) -> BTreeMap<String, Slots> {
    let legacy = Slots::from(legacy);
    let mut models = BTreeMap::new();
    let name = [&legacy.active, &legacy.shadow, &legacy.previous]
        .into_iter()
        .flatten()
        .map(|s| s.model.name.clone())
        .next();
    let ours = |s: &Option<Slot>| s.clone().filter(|s| Some(&s.model.name) == name.as_ref());
    if let Some(n) = &name {
        let slots = Slots {
            active: ours(&legacy.active),
            previous: ours(&legacy.previous),
            shadow: ours(&legacy.shadow),
            pending: None,
        };
        models.insert(n.clone(), slots);
    }
    if let Some(p) = legacy.pending {
        let slot: &mut Slots = models.entry(p.model.name.clone()).or_default();
        slot.pending = Some(p);
    }
    models.retain(|_, s: &mut Slots| !s.is_empty());
    models
}

impl From<SlotStateRecord> for SlotState {
    fn from(s: SlotStateRecord) -> Self {
        match s {
            SlotStateRecord::Staged => SlotState::Staged,
            SlotStateRecord::Verified => SlotState::Verified,
            SlotStateRecord::SelfTested => SlotState::SelfTested,
            SlotStateRecord::Active => SlotState::Active,
            SlotStateRecord::Healthy => SlotState::Healthy,
            SlotStateRecord::RolledBack => SlotState::RolledBack,
        }
    }
}

impl From<SlotState> for SlotStateRecord {
    fn from(s: SlotState) -> Self {
        match s {
            SlotState::Staged => SlotStateRecord::Staged,
            SlotState::Verified => SlotStateRecord::Verified,
            SlotState::SelfTested => SlotStateRecord::SelfTested,
            SlotState::Active => SlotStateRecord::Active,
            SlotState::Healthy => SlotStateRecord::Healthy,
            SlotState::RolledBack => SlotStateRecord::RolledBack,
        }
    }
}

impl From<SlotRecord> for Slot {
    fn from(r: SlotRecord) -> Self {
        Slot {
            model: r.model,
            manifest: r.manifest,
            state: r.state.into(),
            unhealthy_boots: r.unhealthy_boots,
            activated_by: r.activated_by,
        }
    }
}

impl From<&Slot> for SlotRecord {
    fn from(s: &Slot) -> Self {
        SlotRecord {
            model: s.model.clone(),
            manifest: s.manifest.clone(),
            state: s.state.into(),
            unhealthy_boots: s.unhealthy_boots,
            activated_by: s.activated_by,
        }
    }
}

impl From<PendingRecord> for Pending {
    fn from(r: PendingRecord) -> Self {
        Pending {
            command_seq: r.command_seq,
            command_digest: r.command_digest,
            manifest_blob: r.manifest_blob,
            manifest: r.manifest,
            model: r.model,
            mode: r.mode,
        }
    }
}

impl From<&Pending> for PendingRecord {
    fn from(p: &Pending) -> Self {
        PendingRecord {
            command_seq: p.command_seq,
            command_digest: p.command_digest,
            manifest_blob: p.manifest_blob.clone(),
            manifest: p.manifest.clone(),
            model: p.model.clone(),
            mode: p.mode,
        }
    }
}

impl From<Record> for State {
    fn from(r: Record) -> Self {
        State {
            last_command_seq: r.last_command_seq,
            last_command_digest: r.last_command_digest,
            uplink_seq_reserved: r.uplink_seq_reserved,
            request_ids_reserved: r.request_ids_reserved,
            keyring: r.keyring,
            settings: r.settings.map(|s| Settings {
                telemetry_interval_ms: s.telemetry_interval_ms,
                sample_rate_ppm: s.sample_rate_ppm,
            }),
            models: if r.models.is_empty() {
                migrate(SlotsRecord {
                    active: r.active,
                    previous: r.previous,
                    shadow: r.shadow,
                    pending: r.pending,
                })
            } else {
                r.models.into_iter().map(|(n, s)| (n, s.into())).collect()
            },
        }
    }
}

impl From<&State> for Record {
    fn from(s: &State) -> Self {
        // The single-model fields carry the first slot (a downgraded agent serves it).
        let first = s.first();
        Record {
            last_command_seq: s.last_command_seq,
            last_command_digest: s.last_command_digest,
            uplink_seq_reserved: s.uplink_seq_reserved,
            request_ids_reserved: s.request_ids_reserved,
            keyring: s.keyring.clone(),
            settings: s.settings.as_ref().map(|s| SettingsRecord {
                telemetry_interval_ms: s.telemetry_interval_ms,
                sample_rate_ppm: s.sample_rate_ppm,
            }),
            active: first.and_then(|f| f.active.as_ref()).map(SlotRecord::from),
            previous: first
                .and_then(|f| f.previous.as_ref())
                .map(SlotRecord::from),
            shadow: first.and_then(|f| f.shadow.as_ref()).map(SlotRecord::from),
            pending: first
                .and_then(|f| f.pending.as_ref())
                .map(PendingRecord::from),
            models: (s.models.iter())
                .filter(|(_, slots)| !slots.is_empty())
                .map(|(n, slots)| (n.clone(), SlotsRecord::from(slots)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_format_is_unchanged_and_old_files_load() {
        let dir = tempfile::tempdir().unwrap();
        // Written before `last_command_digest` and `request_ids_reserved` existed.
        let old = r#"{"last_command_seq":3,"uplink_seq_reserved":1000,"keyring":null,"settings":{"telemetry_interval_ms":500,"sample_rate_ppm":10},"active":null,"previous":null,"shadow":null,"pending":null}"#;
        std::fs::write(State::path(dir.path()), old).unwrap();
        let s = State::load(dir.path()).unwrap();
        assert_eq!(s.last_command_seq, 3);
        assert_eq!(s.request_ids_reserved, 0);
        s.save(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(State::path(dir.path())).unwrap(),
            r#"{"last_command_seq":3,"last_command_digest":null,"uplink_seq_reserved":1000,"request_ids_reserved":0,"keyring":null,"settings":{"telemetry_interval_ms":500,"sample_rate_ppm":10},"active":null,"previous":null,"shadow":null,"pending":null,"models":{}}"#
        );
        assert_eq!(State::load(dir.path()).unwrap(), s);
    }

    /// `tests/fixtures/state-v1/state.json` was written by the single-model agent.
    fn v1_fixture(dir: &Path) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-v1");
        std::fs::copy(fixture.join("state.json"), State::path(dir)).unwrap();
    }

    #[test]
    fn a_single_model_state_file_becomes_the_first_slot() {
        let dir = tempfile::tempdir().unwrap();
        v1_fixture(dir.path());
        let s = State::load(dir.path()).unwrap();
        let names: Vec<&String> = s.models.keys().collect();
        assert_eq!(names, ["dense"]);
        let dense = s.slot("dense").unwrap();
        let active = dense.active.as_ref().unwrap();
        assert_eq!(
            (active.model.version.as_str(), active.state),
            ("2.0.0", SlotState::Healthy)
        );
        assert_eq!(dense.previous.as_ref().unwrap().model.version, "1.0.0");
        assert_eq!((s.last_command_seq, s.uplink_seq_reserved), (2, 1001));
        // Saved in the new layout, the single-model fields still carry it (a downgraded
        // agent serves it), and it loads back the same.
        s.save(dir.path()).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(State::path(dir.path())).unwrap()).unwrap();
        assert_eq!(json["active"]["model"]["version"], "2.0.0");
        assert_eq!(
            json["models"]["dense"]["previous"]["model"]["version"],
            "1.0.0"
        );
        assert_eq!(State::load(dir.path()).unwrap(), s);
    }

    #[test]
    fn the_new_layout_keeps_every_slot_and_ignores_the_legacy_fields() {
        let dir = tempfile::tempdir().unwrap();
        v1_fixture(dir.path());
        let mut s = State::load(dir.path()).unwrap();
        let mut other = s.slot("dense").unwrap().clone();
        other.previous = None;
        s.models.insert("another".into(), other);
        s.save(dir.path()).unwrap();
        let back = State::load(dir.path()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.models.len(), 2);
    }
}
