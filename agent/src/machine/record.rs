//! The durable record the machine keeps: replay floor, uplink sequence and request id
//! reservations, keyring, settings and the named model slots. Plain data: `crate::state`
//! owns its on-disk form, so a field added here is a file-format decision made there.

use std::collections::BTreeMap;

use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{AgentSettings, DeployMode, ModelRef};
use drover_protocol::trust::{Digest, SignedBlob};

/// Where a model is in its life on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Staged,
    Verified,
    SelfTested,
    Active,
    Healthy,
    RolledBack,
}

/// A model installed in the store (its file is `blobs/<sha256>.onnx` on the agent).
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub model: ModelRef,
    pub manifest: Manifest,
    pub state: SlotState,
    /// Boots with this model active before it reached `Healthy` (a model that keeps
    /// crashing the agent during probation is rolled back).
    pub unhealthy_boots: u32,
    /// The command (seq, digest) that activated it, reported when it becomes healthy.
    pub activated_by: Option<(u64, Digest)>,
}

/// A deployment accepted (its command's seq persisted) but not finished.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub command_seq: u64,
    pub command_digest: Digest,
    pub manifest_blob: SignedBlob,
    pub manifest: Manifest,
    pub model: ModelRef,
    pub mode: DeployMode,
}

#[derive(Clone, Debug, PartialEq)]
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

/// One named model's slot (issue 17): its A/B pair, shadow candidate and deployment in
/// flight. Every model name a device serves has one; they never touch each other.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slots {
    /// The model serving this name's traffic and the one to roll back to.
    pub active: Option<Slot>,
    pub previous: Option<Slot>,
    pub shadow: Option<Slot>,
    pub pending: Option<Pending>,
}

impl Slots {
    /// Holds nothing (a slot whose only deployment failed, or a removed one).
    pub fn is_empty(&self) -> bool {
        self.active.is_none()
            && self.previous.is_none()
            && self.shadow.is_none()
            && self.pending.is_none()
    }

    /// Every installed model the slot keeps (active, previous, shadow).
    pub fn installed(&self) -> impl Iterator<Item = &Slot> {
        [&self.active, &self.previous, &self.shadow]
            .into_iter()
            .flatten()
    }

    /// Counts a boot with an active model that never proved healthy; the third such boot
    /// rolls back to the previous slot (a model that keeps crashing the agent during its
    /// probation would otherwise never leave). Returns whether it rolled back.
    pub fn count_unhealthy_boot(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        if a.state == SlotState::Healthy {
            return false;
        }
        a.unhealthy_boots += 1;
        if a.unhealthy_boots <= 2 || self.previous.is_none() {
            return false;
        }
        let mut bad = self.active.take();
        if let Some(b) = &mut bad {
            b.state = SlotState::RolledBack;
        }
        self.active = self.previous.take();
        self.previous = bad;
        true
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Highest command sequence accepted (the replay floor).
    pub last_command_seq: u64,
    /// Digest of that command, to recognise the broker redelivering it (not a replay
    /// attack: the same signed bytes we already accepted).
    pub last_command_digest: Option<Digest>,
    /// Uplink sequence numbers up to this are reserved; a restart continues above it.
    pub uplink_seq_reserved: u64,
    /// Local API request ids up to this are reserved; a restart continues above it, so a
    /// label sent for a request id never meets a sample from another run.
    pub request_ids_reserved: u64,
    pub keyring: Option<SignedBlob>,
    pub settings: Option<Settings>,
    /// One slot per model name, in name order (never an empty one on disk).
    pub models: BTreeMap<String, Slots>,
}

impl State {
    /// The named slot (read only; `None` if the device holds nothing of that name).
    pub fn slot(&self, name: &str) -> Option<&Slots> {
        self.models.get(name)
    }

    /// The slot a protocol 1 message talks about: the only one, or else the first by
    /// name that serves (an old control plane knows one model per device).
    pub fn first(&self) -> Option<&Slots> {
        if self.models.len() == 1 {
            return self.models.values().next();
        }
        self.models
            .values()
            .find(|s| s.active.is_some())
            .or_else(|| self.models.values().next())
    }

    /// Drops slots that hold nothing.
    pub fn prune(&mut self) {
        self.models.retain(|_, s| !s.is_empty());
    }
}
