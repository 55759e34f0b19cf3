//! The agent's deployment state machine, free of I/O: [`Machine::handle`] takes one
//! [`Input`] and the time, and returns the [`Effect`]s a driver executes (rumqttc's
//! `MqttState` is the model). Two drivers run it: [`crate::core`] against disk, tract and
//! MQTT, and the fleet simulator's virtual devices (`drover-tests`, `sim::device`) against
//! an in-memory store and modelled inference, so the simulator measures this agent and
//! not a copy of it.
//!
//! Deployment: Received → Downloading → Verified → SelfTested → Active → Healthy, or
//! Failed / RolledBack / Refused; every step is persisted before it is reported.
//!
//! Named model slots (protocol 2, issue 17): the record keeps one [`Slots`] per model name
//! (A/B pair, shadow, pending deployment), and the deployment job, probation and restore
//! are kept per name. A deploy goes to the slot its manifest names; `RollbackModel`,
//! `PromoteModel` and `RemoveModel` act on the slot they name; protocol 1's `Rollback`
//! and `Promote` act on the slot their model names, or the only one. A command about one
//! slot supersedes only that slot's deployment in flight. After a `HelloAck` that
//! negotiated protocol 2 the machine sends a `Models` report, and again whenever a slot
//! changes; under protocol 1 it never does.
//!
//! Contract with a driver:
//! - Effects run in order. An effect that asks the store or the runtime something
//!   ([`Effect::is_ask`]: open a download, write a chunk, finish a download, load a model)
//!   is always the last of its batch, and its result ([`Input::Opened`], ...) is handed
//!   back before any other input.
//! - [`Effect::Persist`] carries the record as it must be on disk at that point of the
//!   I/O order; [`Effect::CrashPoint`] names a point of that order where the agent's
//!   SIGKILL tests stop the process. A driver without a disk ignores both.
//! - [`Effect::PersistCommand`] is the write that accepts a command (its replay floor and
//!   what it replaces). If it fails, the driver drops the rest of the batch and hands
//!   back [`Input::PersistFailed`]: the machine forgets the command (it is not acted on)
//!   and reports the failure; the control plane sends it again later.
//! - Trust is checked here, on bytes (`drover-protocol` is pure): keyrings, commands and
//!   manifests against the [`TrustStore`], every chunk against its manifest before it is
//!   written, and every downlink frame's MAC in [`Machine::decode`].
//!
//! Layout: this file holds inputs, effects, uplink sealing, the session, keyrings and
//! commands; `deploy.rs` the download → install → activate → probation → rollback and
//! promote path, per slot; `budget.rs` the `[models]` budget and the `Models` report;
//! `record.rs` the durable record's plain types (`crate::state` owns its
//! on-disk form); `tests.rs` and `tests_deploy.rs` pure unit tests, one per transition;
//! `tests_race.rs` the redeploy race: unit tests and a property test over interleavings
//! of commands, chunks, kills and restarts; `tests_faults.rs` a full disk and a model the
//! server cannot serve; `tests_slots.rs` several named slots side by side.
//!
//! Architecture invariant: no tokio, no MQTT client, no file system, no clock, no tract.
//! Time comes in as `now_ms`; anything slow or fallible outside is an effect.

mod budget;
mod commands;
mod deploy;
mod record;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_deploy;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_race;
#[cfg(test)]
mod tests_runtime;
#[cfg(test)]
mod tests_slots;

use std::collections::BTreeMap;

use drover_protocol::envelope::{self, DecodeError, UplinkFrame};
use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{
    ChunkData, DeployMode, Downlink, Hello, ModelBudget, ModelRef, ModelsReport, Phase, Presence,
    Progress, RuntimeReport, Status, Uplink,
};
use drover_protocol::topics::{self, ParsedTopic};
// The unit tests (`use super::*`) name commands and keyring refusals.
#[cfg(test)]
use drover_protocol::messages::{Action, Command, KeyringRefused};
use drover_protocol::trust::{Digest, SignedBlob, TrustError, TrustStore};
use drover_protocol::{DeviceId, DeviceKey, MIN_PROTOCOL_VERSION};

/// The newest protocol this agent announces in its hello: 2, named model slots; 3, its
/// `Runtime` report (compiled artifacts).
pub const SPEAKS_PROTOCOL: u16 = 3;

pub use budget::{human, memory_estimate, MEMORY_PER_FILE_BYTE, MEMORY_PER_MODEL};
pub use deploy::{
    probation_passed, CHUNK_BATCH, CHUNK_RETRY_MS, MAX_CHUNK_ATTEMPTS, MAX_SILENT_REQUESTS,
    PROBATION_MAX_ERROR_RATE,
};
pub use record::{Pending, Settings, Slot, SlotState, Slots, State};

/// Uplink sequence numbers reserved per state write.
const SEQ_BLOCK: u64 = 1000;
/// Local API request ids reserved ahead (kept at least half ahead at every tick).
pub const REQUEST_ID_BLOCK: u64 = 1 << 20;
/// At most one KeyringRefused report per this interval.
const KEYRING_REFUSAL_INTERVAL_MS: u64 = 60_000;
/// At most this many refused-downlink reports per [`KEYRING_REFUSAL_INTERVAL_MS`]: a peer
/// able to publish garbage on the topic cannot fill the spool with reports.
const DOWNLINK_REFUSALS_PER_INTERVAL: u32 = 16;
/// Bounds of the telemetry window a Configure command may set (signed, but off the
/// network: a driver adds it to its clock).
const TELEMETRY_INTERVAL_MS: (u64, u64) = (100, 86_400_000);

/// A command's (sequence, digest): what every progress report names.
pub type CommandId = (u64, Digest);

/// The machine as it was before a command was accepted ([`Input::PersistFailed`]).
struct Undo {
    cmd: CommandId,
    state: State,
    job: BTreeMap<String, deploy::Job>,
    probation: BTreeMap<String, deploy::Probation>,
}

/// Who this device is and how it behaves.
#[derive(Clone, Debug)]
pub struct Config {
    pub device_id: DeviceId,
    pub device_key: DeviceKey,
    /// Reported in `Hello`.
    pub labels: BTreeMap<String, String>,
    /// Target arch and OS reported in `Hello` (the driver's `std::env::consts`).
    pub arch: String,
    pub os: String,
    /// How long a newly activated model serves before its probation verdict.
    pub probation_ms: u64,
    /// The `[models]` budget a deploy must fit (reported in the `Models` report).
    pub budget: ModelBudget,
    /// What model files this build loads (its runtime and formats): a deploy of another
    /// is refused before download, and it is reported under protocol 3.
    pub runtime: RuntimeReport,
}

/// What happens to the machine.
#[derive(Debug)]
pub enum Input {
    /// The first input after [`Machine::new`]: seals the last will and takes up what the
    /// previous run left (a probation, an unreported verdict, a pending deployment).
    Start,
    Connected,
    Disconnected,
    /// A downlink message whose frame MAC checked out ([`Machine::decode`]).
    Downlink(Downlink),
    /// A message on this device's downlink topic that is not a valid frame (too large,
    /// undecodable, wrong MAC or device): the driver acknowledges it like any message, and
    /// the machine reports it (`Progress` `Refused`, command 0, the SHA-256 of the bytes),
    /// so a persistent session never loops on it and the operator sees why.
    DownlinkRefused {
        digest: Digest,
        len: usize,
        reason: String,
    },
    /// A keyring off the retained topic, not verified yet.
    Keyring(SignedBlob),
    /// A chunk off a model's shared topic, not verified yet.
    Chunk(ChunkData),
    /// Time passed; what the served traffic showed meanwhile.
    Tick(Observed),
    /// A durable message the driver produced (telemetry, drift, samples, labels, shadow
    /// reports): sealed with the next sequence number and spooled.
    Report(Box<Uplink>),
    /// The driver is shutting down: say offline while the session is up.
    Stop,
    /// Result of [`Effect::OpenDownload`].
    Opened {
        manifest_digest: Digest,
        stored: Stored,
    },
    OpenFailed {
        manifest_digest: Digest,
        error: String,
    },
    /// Result of [`Effect::WriteChunk`]: the chunk is durably stored.
    ChunkWritten {
        manifest_digest: Digest,
        index: u32,
    },
    ChunkWriteFailed {
        manifest_digest: Digest,
        index: u32,
        error: String,
    },
    /// Result of [`Effect::FinishDownload`]: the whole file matched and is in the store.
    BlobReady {
        manifest_digest: Digest,
    },
    BlobFailed {
        manifest_digest: Digest,
        error: String,
    },
    /// Result of [`Effect::Load`] (`model` is the manifest digest, as in `ModelRef`).
    Loaded {
        model: Digest,
    },
    LoadFailed {
        model: Digest,
        error: String,
    },
    /// Result of a failed [`Effect::PersistCommand`] (the rest of its batch was dropped).
    PersistFailed {
        error: String,
    },
}

/// What the store already holds of a model ([`Input::Opened`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The verified file: nothing to download.
    Blob,
    /// Which chunks are verified and durably written (one flag per chunk).
    Chunks(Vec<bool>),
}

/// What the served traffic showed, handed in with every tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Per model name: failed and successful requests of its active model since it was
    /// activated.
    pub probation: BTreeMap<String, (u64, u64)>,
    /// Highest local API request id handed out (0 where there is no API).
    pub last_request_id: u64,
}

/// A sealed uplink frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Spool it (kept and re-sent until the control plane acknowledges it).
    pub durable: bool,
    /// Publish it now (the session is up).
    pub publish: bool,
}

/// What the driver does, in order.
#[derive(Debug)]
pub enum Effect {
    /// Write this record durably before the next effect.
    Persist(Box<State>),
    /// Write this record durably before the next effect; if that fails, drop the rest of
    /// the batch and answer [`Input::PersistFailed`] (the write that accepts a command).
    PersistCommand(Box<State>),
    /// A named point of the I/O order (`drover_host::crash::point`).
    CrashPoint(&'static str),
    Uplink(Sealed),
    /// The frame the broker publishes for us if the session dies.
    SetWill {
        topic: String,
        payload: Vec<u8>,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// Re-send the spooled records below `before`, oldest first (the control plane
    /// de-duplicates by sequence number).
    Replay {
        before: u64,
    },
    /// The control plane stored these inclusive uplink ranges: drop them from the spool.
    SpoolAck(Vec<(u64, u64)>),
    /// New settings from a Configure command (sample rate, telemetry window).
    ApplySettings(Settings),
    /// Ask what the store holds of this model; answer [`Input::Opened`] or
    /// [`Input::OpenFailed`].
    OpenDownload {
        manifest_digest: Digest,
        manifest: Manifest,
    },
    /// Ask to store a verified chunk; answer [`Input::ChunkWritten`] or
    /// [`Input::ChunkWriteFailed`].
    WriteChunk {
        manifest_digest: Digest,
        index: u32,
        data: Vec<u8>,
    },
    /// Ask to check the assembled file against the manifest and keep it; answer
    /// [`Input::BlobReady`] or [`Input::BlobFailed`].
    FinishDownload {
        manifest_digest: Digest,
    },
    /// The download was abandoned: release what the driver holds for it.
    CloseDownload {
        manifest_digest: Digest,
    },
    /// Ask to load a model from the store (checking its file against the manifest) and,
    /// with `self_test`, to run the manifest's test vectors; answer [`Input::Loaded`] or
    /// [`Input::LoadFailed`]. The driver holds the loaded model for the next effect.
    Load {
        model: ModelRef,
        manifest: Manifest,
        self_test: bool,
    },
    /// Serve the model just loaded in its slot (in-flight requests finish on the old one;
    /// other slots are not touched).
    ServeLoaded {
        model: String,
    },
    /// Run the model just loaded in shadow beside the named slot's active one.
    ShadowLoaded {
        model: String,
    },
    /// The named slot's shadow model becomes its active one.
    PromoteShadow {
        model: String,
    },
    DropShadow {
        model: String,
    },
    /// Stop serving the named model (active and shadow); its slot is gone from the record.
    Unload {
        model: String,
    },
    /// Something worth a log line or a counter.
    Event(Event),
}

impl Effect {
    /// Whether the machine waits for this effect's result before anything else.
    pub fn is_ask(&self) -> bool {
        matches!(
            self,
            Effect::OpenDownload { .. }
                | Effect::WriteChunk { .. }
                | Effect::FinishDownload { .. }
                | Effect::Load { .. }
        )
    }
}

/// What drivers log (the agent) or count (the simulator).
#[derive(Debug, PartialEq)]
pub enum Event {
    HelloAcked {
        protocol_version: u16,
        stored_up_to: u64,
    },
    KeyringAccepted {
        version: u64,
    },
    KeyringRefused(TrustError),
    /// The broker redelivered the last accepted command (not a replay attack).
    CommandRedelivered {
        seq: u64,
    },
    CommandRefused(TrustError),
    /// A frame on the downlink topic was refused ([`Input::DownlinkRefused`]).
    DownlinkRefused {
        len: usize,
        reason: String,
    },
    Progress {
        command_seq: u64,
        phase: Phase,
        detail: Option<String>,
    },
    /// A chunk failed its check or could not be written; it is asked for again.
    ChunkRefused {
        index: u32,
        reason: String,
    },
    /// A deployment ended before serving: its file or its self-test failed.
    InstallFailed {
        command_seq: u64,
    },
    /// A model passed its self-test and now serves (activate) or shadows.
    Installed {
        command_seq: u64,
        mode: DeployMode,
    },
    ProbationFailed {
        errors: u64,
        ok: u64,
    },
    /// A command was not acted on because its acceptance could not be persisted.
    CommandNotPersisted {
        seq: u64,
        error: String,
    },
}

/// A frame on one of this device's topics that failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum FrameRefused {
    #[error("downlink frame refused: {0}")]
    Downlink(DecodeError),
    #[error("keyring frame refused: {0}")]
    Keyring(DecodeError),
    #[error("chunk frame refused: {0}")]
    Chunk(DecodeError),
    #[error("chunk names another model than its topic")]
    ChunkTopic,
}

/// An incoming MQTT message, decoded ([`Machine::decode`]).
#[derive(Debug)]
pub enum Decoded {
    Input(Input),
    Refused(FrameRefused),
    /// Not a topic this device listens to.
    Ignored,
}

/// The machine. See the module doc.
pub struct Machine {
    cfg: Config,
    state: State,
    trust: TrustStore,
    connected: bool,
    next_seq: u64,
    started_ms: u64,
    last_keyring_refusal_ms: Option<u64>,
    /// Start of the current refused-downlink report window, and reports sent in it.
    downlink_refusals: (u64, u32),
    /// Per model name: the deployment in flight, the rollback waiting for its previous
    /// model to load, the probation of the model just activated.
    job: BTreeMap<String, deploy::Job>,
    restore: BTreeMap<String, deploy::Restore>,
    probation: BTreeMap<String, deploy::Probation>,
    /// The protocol the last `HelloAck` negotiated (1 until one arrives in this session).
    protocol: u16,
    /// The last `Models` report sent in this session (sent again when it changes).
    reported: Option<ModelsReport>,
    /// What a command being accepted changed, restored if its write fails.
    undo: Option<Undo>,
    /// The time of the input being handled.
    now: u64,
    /// The effects of the input being handled.
    out: Vec<Effect>,
}

impl Machine {
    /// `state` and `trust` as loaded at boot (the persisted keyring already offered to
    /// `trust`); uplink sequence numbers continue at `next_seq`. Hand it [`Input::Start`]
    /// first.
    pub fn new(
        cfg: Config,
        state: State,
        trust: TrustStore,
        next_seq: u64,
        now_ms: u64,
    ) -> Machine {
        Machine {
            cfg,
            state,
            trust,
            connected: false,
            next_seq,
            started_ms: now_ms,
            last_keyring_refusal_ms: None,
            downlink_refusals: (0, 0),
            job: BTreeMap::new(),
            restore: BTreeMap::new(),
            probation: BTreeMap::new(),
            protocol: MIN_PROTOCOL_VERSION,
            reported: None,
            undo: None,
            now: now_ms,
            out: Vec::new(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The sequence number the next uplink frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The protocol version negotiated with the control plane in this session.
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    /// The telemetry window: the settings' if a Configure command set one, else
    /// `default_ms`; clamped, since settings come off the network.
    pub fn telemetry_interval_ms(&self, default_ms: u64) -> u64 {
        let (lo, hi) = TELEMETRY_INTERVAL_MS;
        self.state
            .settings
            .as_ref()
            .map(|s| s.telemetry_interval_ms)
            .unwrap_or(default_ms)
            .clamp(lo, hi)
    }

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        self.now = now_ms;
        // The command accepted by the last batch is durable unless this says otherwise.
        let undo = self.undo.take();
        match input {
            Input::PersistFailed { error } => self.command_not_persisted(undo, error),
            Input::Start => self.start(),
            Input::Connected => self.on_connected(),
            Input::Disconnected => {
                self.connected = false;
                self.refresh_will();
            }
            Input::Downlink(msg) => self.on_downlink(msg),
            Input::DownlinkRefused {
                digest,
                len,
                reason,
            } => self.on_downlink_refused(digest, len, reason),
            Input::Keyring(blob) => self.on_keyring(blob),
            Input::Chunk(c) => self.on_chunk(c),
            Input::Tick(seen) => self.tick(seen),
            Input::Report(msg) => self.send(*msg, true),
            Input::Stop => {
                if self.connected {
                    let st = Uplink::Status(self.status(Presence::Offline));
                    self.send(st, false);
                }
            }
            Input::Opened {
                manifest_digest,
                stored,
            } => self.on_opened(manifest_digest, stored),
            Input::OpenFailed {
                manifest_digest,
                error,
            }
            | Input::BlobFailed {
                manifest_digest,
                error,
            } => self.on_store_failed(manifest_digest, error),
            Input::ChunkWritten {
                manifest_digest,
                index,
            } => self.on_chunk_written(manifest_digest, index),
            Input::ChunkWriteFailed {
                manifest_digest,
                index,
                error,
            } => {
                // Not marked held: it is asked for again (a bounded number of times).
                self.chunk_failed(manifest_digest, index, error);
            }
            Input::BlobReady { manifest_digest } => self.on_blob_ready(manifest_digest),
            Input::Loaded { model } => self.on_loaded(model),
            Input::LoadFailed { model, error } => self.on_load_failed(model, error),
        }
        self.resume_idle();
        self.report_models();
        std::mem::take(&mut self.out)
    }

    /// Sends the `Models` report if a slot changed since the last one, under a negotiated
    /// protocol 2 only (an old control plane could not decode it). Not after an effect
    /// that waits for a result: its answer comes back as an input, which reports then.
    fn report_models(&mut self) {
        if self.protocol < 2 || !self.connected || self.asked() {
            return;
        }
        let report = self.models_report();
        if self.reported.as_ref() == Some(&report) {
            return;
        }
        self.reported = Some(report.clone());
        self.send(Uplink::Models(report), true);
    }

    /// Decodes an MQTT message: checks the downlink frame's MAC and device, decodes
    /// keyring and chunk frames (their signatures and hashes are checked when handled).
    pub fn decode(&self, topic: &str, payload: &[u8]) -> Decoded {
        match topics::parse(topic) {
            Ok(ParsedTopic::Downlink { device }) if device == self.cfg.device_id => {
                match envelope::open_downlink(payload, &self.cfg.device_id, &self.cfg.device_key) {
                    Ok(frame) => Decoded::Input(Input::Downlink(frame.msg)),
                    Err(e) => Decoded::Input(Input::DownlinkRefused {
                        digest: drover_protocol::trust::sha256(payload),
                        len: payload.len(),
                        reason: FrameRefused::Downlink(e).to_string(),
                    }),
                }
            }
            Ok(ParsedTopic::Keyring) => match envelope::decode_keyring(payload) {
                Ok(blob) => Decoded::Input(Input::Keyring(blob)),
                Err(e) => Decoded::Refused(FrameRefused::Keyring(e)),
            },
            Ok(ParsedTopic::ModelChunks { manifest_digest }) => {
                match envelope::decode_chunk(payload) {
                    Ok(c) if c.manifest_digest == manifest_digest => {
                        Decoded::Input(Input::Chunk(c))
                    }
                    Ok(_) => Decoded::Refused(FrameRefused::ChunkTopic),
                    Err(e) => Decoded::Refused(FrameRefused::Chunk(e)),
                }
            }
            _ => Decoded::Ignored,
        }
    }

    fn emit(&mut self, e: Effect) {
        self.out.push(e);
    }

    fn event(&mut self, e: Event) {
        self.out.push(Effect::Event(e));
    }

    fn persist(&mut self) {
        self.out.push(Effect::Persist(Box::new(self.state.clone())));
    }

    fn crash_point(&mut self, name: &'static str) {
        self.out.push(Effect::CrashPoint(name));
    }

    /// Whether the last effect so far waits for a result (nothing may follow it).
    fn asked(&self) -> bool {
        self.out.last().is_some_and(Effect::is_ask)
    }

    fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if seq > self.state.uplink_seq_reserved {
            self.state.uplink_seq_reserved = seq + SEQ_BLOCK;
            self.persist();
        }
        seq
    }

    fn seal(&mut self, msg: Uplink) -> (u64, String, Vec<u8>) {
        let seq = self.alloc_seq();
        let topic = topics::uplink(&self.cfg.device_id, msg.kind());
        let frame = UplinkFrame {
            device: self.cfg.device_id.clone(),
            seq,
            sent_at_ms: self.now,
            msg,
        };
        let payload = envelope::seal_uplink(&self.cfg.device_key, &frame);
        (seq, topic, payload)
    }

    /// Sends an uplink message. `durable` ones go through the spool first and are re-sent
    /// until acknowledged; the others (hello, status, chunk requests) are only useful now.
    fn send(&mut self, msg: Uplink, durable: bool) {
        let (seq, topic, payload) = self.seal(msg);
        let publish = self.connected;
        self.emit(Effect::Uplink(Sealed {
            seq,
            topic,
            payload,
            durable,
            publish,
        }));
    }

    fn on_downlink_refused(&mut self, digest: Digest, len: usize, reason: String) {
        self.event(Event::DownlinkRefused {
            len,
            reason: reason.clone(),
        });
        let (start, sent) = &mut self.downlink_refusals;
        if self.now.saturating_sub(*start) >= KEYRING_REFUSAL_INTERVAL_MS {
            (*start, *sent) = (self.now, 0);
        }
        if *sent >= DOWNLINK_REFUSALS_PER_INTERVAL {
            return;
        }
        *sent += 1;
        let detail = format!(
            "a {len}-byte message on this device's downlink topic was refused and \
             acknowledged (dropped, never redelivered): {reason}"
        );
        self.progress((0, digest), None, Phase::Refused, (0, 0), Some(detail));
    }

    fn progress(
        &mut self,
        cmd: CommandId,
        model: Option<ModelRef>,
        phase: Phase,
        (done, total): (u32, u32),
        detail: Option<String>,
    ) {
        self.event(Event::Progress {
            command_seq: cmd.0,
            phase,
            detail: detail.clone(),
        });
        self.send(
            Uplink::Progress(Progress {
                command_seq: cmd.0,
                command_digest: cmd.1,
                model,
                phase,
                chunks_done: done,
                chunks_total: total,
                detail,
            }),
            true,
        );
    }

    fn refresh_will(&mut self) {
        let status = Uplink::Status(self.status(Presence::Offline));
        let (_, topic, payload) = self.seal(status);
        self.emit(Effect::SetWill { topic, payload });
    }

    fn status(&self, presence: Presence) -> Status {
        // Protocol 1 fields: the first slot (an old control plane knows one model).
        let first = self.state.first();
        Status {
            presence,
            active: first
                .and_then(|s| s.active.as_ref())
                .map(|s| s.model.clone()),
            staged: first
                .and_then(|s| s.pending.as_ref())
                .map(|p| p.model.clone()),
            shadow: first
                .and_then(|s| s.shadow.as_ref())
                .map(|s| s.model.clone()),
            uptime_s: self.now.saturating_sub(self.started_ms) / 1000,
        }
    }

    fn start(&mut self) {
        self.refresh_will();
        let names: Vec<String> = self.state.models.keys().cloned().collect();
        for name in &names {
            let Some(a) = self.state.slot(name).and_then(|s| s.active.clone()) else {
                continue;
            };
            if a.state == SlotState::Active {
                let until_ms = self.now.saturating_add(self.cfg.probation_ms);
                let cmd = a.activated_by;
                self.probation
                    .insert(name.clone(), deploy::Probation { until_ms, cmd });
            }
            // Healthy persisted but the report may have died with the process: report again.
            if let (SlotState::Healthy, Some(cmd)) = (a.state, a.activated_by) {
                self.progress(cmd, Some(a.model), Phase::Healthy, (0, 0), None);
                if let Some(a) = self.slots_mut(name).active.as_mut() {
                    a.activated_by = None;
                }
                self.persist();
            }
        }
        // Pending deployments resume in `resume_idle`, one per batch.
    }

    /// Resumes a slot's pending deployment that has no job (left by the previous run):
    /// one per batch, since opening its download waits for the store's answer.
    fn resume_idle(&mut self) {
        if self.asked() {
            return;
        }
        let idle = (self.state.models.iter())
            .find(|(n, s)| s.pending.is_some() && !self.job.contains_key(*n))
            .and_then(|(_, s)| s.pending.clone());
        if let Some(p) = idle {
            self.resume(p);
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        // Protocol 1 until this session's HelloAck says otherwise (the control plane may
        // have been replaced by an older one); the Models report is sent again after it.
        self.protocol = MIN_PROTOCOL_VERSION;
        self.reported = None;
        self.emit(Effect::Subscribe(topics::downlink(&self.cfg.device_id)));
        self.emit(Effect::Subscribe(topics::keyring()));
        let hello = Uplink::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_min: MIN_PROTOCOL_VERSION,
            protocol_max: SPEAKS_PROTOCOL,
            arch: self.cfg.arch.clone(),
            os: self.cfg.os.clone(),
            labels: self.cfg.labels.clone(),
            active: (self.state.first())
                .and_then(|s| s.active.as_ref())
                .map(|s| s.model.clone()),
            staged: (self.state.first())
                .and_then(|s| s.pending.as_ref())
                .map(|p| p.model.clone()),
            last_command_seq: self.state.last_command_seq,
            keyring_version: self.trust.keyring().map(|k| k.version).unwrap_or(0),
        });
        self.send(hello, false);
        let st = Uplink::Status(self.status(Presence::Online));
        self.send(st, false);
        // Everything not yet acknowledged goes again, oldest first; records spooled from
        // now on are sent live.
        let before = self.next_seq;
        self.emit(Effect::Replay { before });
        self.resubscribe_chunks();
    }

    fn on_downlink(&mut self, msg: Downlink) {
        match msg {
            Downlink::HelloAck(ack) => {
                // `stored_up_to` is the highest sequence stored, not a gap-free watermark:
                // a frame below it may have been lost with a control-plane crash, and the
                // spool is then its only copy. Records leave the spool only on exact
                // `UplinkAck` ranges; replays of stored ones are de-duplicated and re-acked.
                self.event(Event::HelloAcked {
                    protocol_version: ack.protocol_version,
                    stored_up_to: ack.stored_up_to,
                });
                self.protocol = ack.protocol_version.min(SPEAKS_PROTOCOL);
                self.reported = None;
                if self.protocol >= 3 {
                    self.send(Uplink::Runtime(self.cfg.runtime.clone()), true);
                }
            }
            Downlink::UplinkAck(ack) => self.emit(Effect::SpoolAck(ack.ranges)),
            Downlink::Keyring(blob) => self.on_keyring(blob),
            Downlink::Command(blob) => self.on_command(blob),
        }
    }

    fn tick(&mut self, seen: Observed) {
        let due: Vec<String> = (self.probation.iter())
            .filter(|(_, p)| self.now >= p.until_ms)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(p) = self.probation.remove(&name) else {
                continue;
            };
            let counts = seen.probation.get(&name).copied().unwrap_or((0, 0));
            self.end_probation(&name, p.cmd, counts);
            if self.asked() {
                // The rollback waits for the previous model; the rest is next tick's.
                return;
            }
        }
        for name in self.chunk_retries_due() {
            self.retry_chunks(&name);
        }
        let last_id = seen.last_request_id;
        if last_id.saturating_add(REQUEST_ID_BLOCK / 2) > self.state.request_ids_reserved {
            self.state.request_ids_reserved = last_id.saturating_add(REQUEST_ID_BLOCK);
            self.persist();
        }
    }
}
