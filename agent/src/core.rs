//! The agent's core: one dedicated thread that owns the durable state, the trust store,
//! the spool and the deployment state machine. It consumes MQTT events, produces uplink
//! frames, and does its disk and tract work itself (it is not the MQTT poll loop, and
//! inference requests never wait on it).
//!
//! Deployment: Received → Downloading → Verified → SelfTested → Active → Healthy, or
//! Failed / RolledBack / Refused; every step is persisted before it is reported.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_host::clock::now_ms;

use drover_protocol::envelope::{self, UplinkFrame};
use drover_protocol::messages::{
    Action, ChunkRequest, Command, DeployMode, Downlink, DriftReport, Hello, KeyringRefused,
    LabelBatch, ModelRef, Phase, Presence, Progress, SampleBatch, ShadowReport, Status,
    TelemetryBatch, Uplink,
};
use drover_protocol::topics::{self, ParsedTopic};
use drover_protocol::trust::{Digest, SignedBlob, TrustError, TrustStore};
use drover_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::ValidConfig;
use crate::download::{self, Download};
use crate::mqtt::{Inbound, Outbound, WillSlot};
use crate::serving::{Loaded, Serving};
use crate::spool::Spool;
use crate::state::{Pending, Settings, Slot, SlotState, State};
use crate::telemetry::SysProbe;
use drover_host::crash;
use drover_runtime::{self_test, Model};

/// Chunks asked for in one request (bounded so one request cannot flood the broker).
/// Public so the fleet simulator's virtual devices ask exactly as agents do.
pub const CHUNK_BATCH: usize = 64;
/// How long to wait for requested chunks before asking again.
pub const CHUNK_RETRY: Duration = Duration::from_secs(2);
/// Uplink sequence numbers reserved per state write.
const SEQ_BLOCK: u64 = 1000;
/// Request ids reserved ahead (kept at least half ahead at every telemetry tick).
const REQUEST_ID_BLOCK: u64 = 1 << 20;
/// At most one KeyringRefused report per this interval.
const KEYRING_REFUSAL_INTERVAL: Duration = Duration::from_secs(60);
/// Replayed spool records in flight (sent, not yet acknowledged) after a reconnect.
const REPLAY_WINDOW: usize = 256;

/// A spool replay in progress: records with `next <= seq < end` are still to be sent.
#[derive(Clone, Copy, Debug)]
struct Replay {
    next: u64,
    end: u64,
}

/// Knobs tests turn; production uses the defaults.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// How long a newly activated model must serve without errors before it is `Healthy`.
    pub probation: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            probation: Duration::from_secs(2),
        }
    }
}

struct Job {
    pending: Pending,
    download: Option<Download>,
    requested: BTreeSet<u32>,
    last_request: Option<Instant>,
    last_reported: u32,
}

/// Error rate above which a model on probation is rolled back.
pub const PROBATION_MAX_ERROR_RATE: f64 = 0.10;

/// The probation verdict on the requests a newly activated model served since activation:
/// it fails only when they show, with 95 % confidence, an error rate above
/// [`PROBATION_MAX_ERROR_RATE`], i.e. when the lower bound of the Wilson score interval of
/// `errors / (errors + ok)` exceeds it. A plain ratio judges a handful of requests by
/// chance: one error among the first five requests is 20 %, so a good model failing
/// 0.4 % of requests was rolled back on a device that happened to serve few requests
/// during probation (and, as a first install, had nothing to roll back to). With the
/// bound, 1 error in 2 requests passes, 2 in 3 or 5 in 5 fail, and with many requests
/// the verdict approaches the plain ratio. Public so the fleet simulator's virtual
/// devices judge their (modelled) probation by the agent's own rule.
pub fn probation_passed(errors: u64, ok: u64) -> bool {
    if errors == 0 {
        return true;
    }
    let n = errors.saturating_add(ok) as f64;
    let p = errors as f64 / n;
    // z for a one-sided 97.5 % / two-sided 95 % interval.
    let z2 = 1.96f64 * 1.96;
    let centre = p + z2 / (2.0 * n);
    let spread = (z2 * (p * (1.0 - p) / n + z2 / (4.0 * n * n))).sqrt();
    let lower = (centre - spread) / (1.0 + z2 / n);
    lower <= PROBATION_MAX_ERROR_RATE
}

pub struct Core {
    cfg: ValidConfig,
    data_dir: PathBuf,
    tuning: Tuning,
    state: State,
    trust: TrustStore,
    spool: Spool,
    serving: Arc<Serving>,
    out: UnboundedSender<Outbound>,
    will: WillSlot,
    connected: bool,
    last_keyring_refusal: Option<Instant>,
    replay: Option<Replay>,
    next_seq: u64,
    job: Option<Job>,
    probation: Option<(Instant, Option<(u64, Digest)>)>,
    telemetry_due: Instant,
    window_start_ms: u64,
    sys: SysProbe,
    started: Instant,
}

/// Boot: loads state and the last good model. Runs before the session starts.
pub struct Booted {
    pub state: State,
    pub trust: TrustStore,
    pub spool: Spool,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("root public key: {0}")]
    Root(drover_protocol::TrustError),
}

fn load_slot(data_dir: &std::path::Path, slot: &Slot) -> Result<Arc<Loaded>, String> {
    if !download::blob_is_valid(data_dir, &slot.manifest) {
        return Err("model file missing or does not match its manifest".into());
    }
    let bytes = std::fs::read(download::blob_path(data_dir, &slot.manifest.sha256))
        .map_err(|e| e.to_string())?;
    let model = Model::load(&bytes).map_err(|e| e.to_string())?;
    Ok(Arc::new(Loaded {
        model_ref: slot.model.clone(),
        manifest: slot.manifest.clone(),
        model,
    }))
}

/// Loads the durable state and brings up the last good model in `serving`.
pub fn boot(cfg: &ValidConfig, serving: &Serving) -> Result<Booted, BootError> {
    let data_dir = cfg.raw.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| BootError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let mut state = State::load(&data_dir)?;
    let mut trust = TrustStore::new(cfg.root_public_key).map_err(BootError::Root)?;
    if let Some(k) = &state.keyring {
        if let Err(e) = trust.accept_keyring(k, now_ms()) {
            tracing::warn!(error = %e, "persisted keyring no longer accepted");
        }
    }
    if let Some(s) = &state.settings {
        serving.set_sample_rate(s.sample_rate_ppm);
    }
    // A model that was activated but never proved healthy gets two boots to do so.
    if let Some(a) = &mut state.active {
        if a.state != SlotState::Healthy {
            a.unhealthy_boots += 1;
            if a.unhealthy_boots > 2 && state.previous.is_some() {
                tracing::warn!(model = %a.model.name, "active model never became healthy: rolling back");
                let mut bad = state.active.take();
                if let Some(b) = &mut bad {
                    b.state = SlotState::RolledBack;
                }
                state.active = state.previous.take();
                state.previous = bad;
            }
        }
    }
    let mut loaded = None;
    for which in ["active", "previous"] {
        let slot = if which == "active" {
            state.active.clone()
        } else {
            state.previous.clone()
        };
        let Some(slot) = slot else { continue };
        match load_slot(&data_dir, &slot) {
            Ok(l) => {
                if which == "previous" {
                    // Active is unusable: the previous slot takes over.
                    state.previous = state.active.take();
                    state.active = Some(slot);
                }
                loaded = Some(l);
                break;
            }
            Err(e) => {
                tracing::error!(slot = which, model = %slot.model.name, error = %e, "cannot load model")
            }
        }
    }
    if let Some(l) = &loaded {
        tracing::info!(model = %l.model_ref.name, version = %l.model_ref.version, "serving model");
    }
    serving.swap_active(loaded);
    if let Some(s) = &state.shadow {
        match load_slot(&data_dir, s) {
            Ok(l) => {
                serving.set_shadow(Some(l));
            }
            Err(e) => {
                tracing::warn!(error = %e, "shadow model unusable; dropped");
                state.shadow = None;
            }
        }
    }
    // This run's request ids continue above every id an earlier run could have used.
    serving.continue_request_ids_after(state.request_ids_reserved);
    state.request_ids_reserved = state.request_ids_reserved.saturating_add(REQUEST_ID_BLOCK);
    state.save(&data_dir)?;
    let spool = Spool::open(&data_dir.join("spool"), cfg.raw.telemetry.spool_max_bytes)?;
    Ok(Booted {
        state,
        trust,
        spool,
    })
}

impl Core {
    pub fn new(
        cfg: ValidConfig,
        booted: Booted,
        serving: Arc<Serving>,
        out: UnboundedSender<Outbound>,
        will: WillSlot,
        tuning: Tuning,
    ) -> Core {
        let next_seq = booted
            .state
            .uplink_seq_reserved
            .max(booted.spool.max_seq().unwrap_or(0))
            + 1;
        let data_dir = cfg.raw.data_dir.clone();
        let mut core = Core {
            cfg,
            data_dir,
            tuning,
            state: booted.state,
            trust: booted.trust,
            spool: booted.spool,
            serving,
            out,
            will,
            connected: false,
            last_keyring_refusal: None,
            replay: None,
            next_seq,
            job: None,
            probation: None,
            telemetry_due: Instant::now(),
            window_start_ms: now_ms(),
            sys: SysProbe::new(),
            started: Instant::now(),
        };
        core.telemetry_due = Instant::now() + core.interval();
        core.refresh_will();
        if let Some(a) = &core.state.active {
            if a.state == SlotState::Active {
                core.probation = Some((Instant::now() + core.tuning.probation, a.activated_by));
            }
        }
        // Healthy persisted but the report may have died with the process: report again.
        if let Some(a) = core.state.active.clone() {
            if let (SlotState::Healthy, Some((seq, digest))) = (a.state, a.activated_by) {
                core.progress(seq, digest, Some(a.model), Phase::Healthy, 0, 0, None);
                if let Some(a) = &mut core.state.active {
                    a.activated_by = None;
                }
                core.save();
            }
        }
        if let Some(p) = core.state.pending.clone() {
            core.resume(p);
        }
        core
    }

    fn interval(&self) -> Duration {
        let ms = self
            .state
            .settings
            .as_ref()
            .map(|s| s.telemetry_interval_ms)
            .unwrap_or(self.cfg.raw.telemetry.interval_ms)
            // Settings come off the network (signed, but still): clamp before `Instant +`.
            .clamp(100, 86_400_000);
        Duration::from_millis(ms)
    }

    fn save(&mut self) {
        if let Err(e) = self.state.save(&self.data_dir) {
            tracing::error!(error = %e, "cannot persist agent state");
        }
    }

    fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if seq > self.state.uplink_seq_reserved {
            self.state.uplink_seq_reserved = seq + SEQ_BLOCK;
            self.save();
        }
        seq
    }

    fn seal(&mut self, msg: Uplink) -> (u64, String, Vec<u8>) {
        let seq = self.alloc_seq();
        let topic = topics::uplink(&self.cfg.device_id, msg.kind());
        let frame = UplinkFrame {
            device: self.cfg.device_id.clone(),
            seq,
            sent_at_ms: now_ms(),
            msg,
        };
        (
            seq,
            topic,
            envelope::seal_uplink(&self.cfg.device_key, &frame),
        )
    }

    /// Sends an uplink message. `durable` ones go through the spool first and are re-sent
    /// until acknowledged; the others (hello, status, chunk requests) are only useful now.
    fn send(&mut self, msg: Uplink, durable: bool) {
        let (seq, topic, payload) = self.seal(msg);
        if durable {
            if let Err(e) = self.spool.push(seq, &payload) {
                tracing::error!(error = %e, seq, "cannot spool uplink record");
            }
        }
        if self.connected {
            let _ = self.out.send(Outbound::Publish { topic, payload });
        }
    }

    fn refresh_will(&mut self) {
        let status = Uplink::Status(self.status(Presence::Offline));
        let (_, topic, payload) = self.seal(status);
        if let Ok(mut w) = self.will.lock() {
            *w = (topic, payload);
        }
    }

    fn status(&self, presence: Presence) -> Status {
        Status {
            presence,
            active: self.state.active.as_ref().map(|s| s.model.clone()),
            staged: self.state.pending.as_ref().map(|p| p.model.clone()),
            shadow: self.state.shadow.as_ref().map(|s| s.model.clone()),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, rx: Receiver<Inbound>, stop: Arc<AtomicBool>) {
        let span = tracing::info_span!("core", device_id = %self.cfg.device_id);
        let _entered = span.enter();
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
        }
        if self.connected {
            let st = Uplink::Status(self.status(Presence::Offline));
            self.send(st, false);
            let _ = self.out.send(Outbound::Disconnect);
        }
    }

    fn handle(&mut self, ev: Inbound) {
        match ev {
            Inbound::Connected => self.on_connected(),
            Inbound::Disconnected(_) => {
                self.connected = false;
                self.replay = None;
                self.refresh_will();
            }
            Inbound::Message {
                topic,
                payload,
                ack,
            } => {
                self.on_message(&topic, &payload);
                // Handled (and persisted where it matters): now the broker may forget it.
                let _ = self.out.send(Outbound::Ack(ack));
            }
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        let dev = self.cfg.device_id.clone();
        let _ = self.out.send(Outbound::Subscribe(topics::downlink(&dev)));
        let _ = self.out.send(Outbound::Subscribe(topics::keyring()));
        let hello = Uplink::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_min: MIN_PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            labels: self.cfg.raw.labels.clone(),
            active: self.state.active.as_ref().map(|s| s.model.clone()),
            staged: self.state.pending.as_ref().map(|p| p.model.clone()),
            last_command_seq: self.state.last_command_seq,
            keyring_version: self.trust.keyring().map(|k| k.version).unwrap_or(0),
        });
        self.send(hello, false);
        let st = Uplink::Status(self.status(Presence::Online));
        self.send(st, false);
        // Everything not yet acknowledged is replayed, oldest first, in windows (see
        // `replay`); records spooled from now on are sent live. The control plane
        // de-duplicates by (device, seq).
        self.replay = Some(Replay {
            next: 0,
            end: self.next_seq,
        });
        self.replay_window();
        if let Some(job) = &mut self.job {
            let digest = job.pending.manifest_blob.digest();
            let _ = self
                .out
                .send(Outbound::Subscribe(topics::model_chunks(&digest)));
            job.last_request = None;
        }
    }

    /// Sends the next window of the replay: at most `REPLAY_WINDOW` records may be in
    /// flight unacknowledged, so a large spool never sits in memory at once.
    fn replay_window(&mut self) {
        let Some(r) = self.replay else { return };
        if !self.connected {
            return;
        }
        let in_flight = self.spool.count_below(r.next);
        let room = REPLAY_WINDOW.saturating_sub(in_flight);
        if room == 0 {
            return;
        }
        let batch = self.spool.range(r.next, r.end, room);
        let dev = self.cfg.device_id.clone();
        for seq in &batch {
            match self.spool.read(*seq) {
                Ok(bytes) => {
                    if let Ok(f) = envelope::decode_uplink_unauthenticated(&bytes) {
                        let topic = topics::uplink(&dev, f.msg.kind());
                        let _ = self.out.send(Outbound::Publish {
                            topic,
                            payload: bytes,
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, seq, "unreadable spool record"),
            }
        }
        let next = batch.last().map(|s| s + 1).unwrap_or(r.next);
        let done = self.spool.range(next, r.end, 1).is_empty();
        self.replay = if done {
            None
        } else {
            Some(Replay { next, end: r.end })
        };
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        match topics::parse(topic) {
            Ok(ParsedTopic::Downlink { device }) if device == self.cfg.device_id => {
                match envelope::open_downlink(payload, &self.cfg.device_id, &self.cfg.device_key) {
                    Ok(frame) => self.on_downlink(frame.msg),
                    Err(e) => tracing::warn!(error = %e, "downlink frame refused"),
                }
            }
            Ok(ParsedTopic::Keyring) => match envelope::decode_keyring(payload) {
                Ok(blob) => self.on_keyring(blob),
                Err(e) => tracing::warn!(error = %e, "keyring frame refused"),
            },
            Ok(ParsedTopic::ModelChunks { manifest_digest }) => {
                match envelope::decode_chunk(payload) {
                    Ok(c) if c.manifest_digest == manifest_digest => {
                        self.on_chunk(manifest_digest, c.index, &c.data)
                    }
                    Ok(_) => tracing::warn!("chunk names another model than its topic"),
                    Err(e) => tracing::warn!(error = %e, "chunk frame refused"),
                }
            }
            _ => tracing::debug!(topic, "ignored message"),
        }
    }

    fn on_downlink(&mut self, msg: Downlink) {
        match msg {
            Downlink::HelloAck(ack) => {
                tracing::info!(
                    protocol = ack.protocol_version,
                    stored_up_to = ack.stored_up_to,
                    "hello acknowledged"
                );
                // `stored_up_to` is the highest sequence stored, not a gap-free watermark:
                // a frame below it may have been lost with a control-plane crash, and the
                // spool is then its only copy. Records leave the spool only on exact
                // `UplinkAck` ranges; replays of stored ones are de-duplicated and re-acked.
            }
            Downlink::UplinkAck(ack) => {
                if let Err(e) = self.spool.ack(&ack.ranges) {
                    tracing::warn!(error = %e, "spool ack failed");
                }
                self.replay_window();
            }
            Downlink::Keyring(blob) => self.on_keyring(blob),
            Downlink::Command(blob) => self.on_command(blob),
        }
    }

    fn on_keyring(&mut self, blob: SignedBlob) {
        let current = self.trust.keyring().map(|k| k.version);
        match self.trust.accept_keyring(&blob, now_ms()) {
            Ok(k) => {
                if Some(k.version) != current {
                    tracing::info!(version = k.version, "keyring accepted");
                    self.state.keyring = Some(blob);
                    self.save();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "keyring refused");
                // Reports are rate-limited: whoever can publish bogus keyrings must not be
                // able to fill the spool (and the disk's write budget) with refusals.
                let now = Instant::now();
                if self
                    .last_keyring_refusal
                    .is_some_and(|t| now.duration_since(t) < KEYRING_REFUSAL_INTERVAL)
                {
                    return;
                }
                self.last_keyring_refusal = Some(now);
                let offered_version =
                    drover_protocol::trust::claimed_keyring_version(&blob).unwrap_or(0);
                self.send(
                    Uplink::KeyringRefused(KeyringRefused {
                        offered_version,
                        reason: e.to_string(),
                    }),
                    true,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn progress(
        &mut self,
        seq: u64,
        digest: Digest,
        model: Option<ModelRef>,
        phase: Phase,
        done: u32,
        total: u32,
        detail: Option<String>,
    ) {
        tracing::info!(command_seq = seq, phase = ?phase, detail = detail.as_deref().unwrap_or(""), "deployment progress");
        self.send(
            Uplink::Progress(Progress {
                command_seq: seq,
                command_digest: digest,
                model,
                phase,
                chunks_done: done,
                chunks_total: total,
                detail,
            }),
            true,
        );
    }

    fn on_command(&mut self, blob: SignedBlob) {
        let digest = blob.digest();
        let cmd = match self.trust.verify_command(
            &blob,
            &self.cfg.device_id,
            self.state.last_command_seq,
            now_ms(),
        ) {
            Ok(c) => c,
            Err(TrustError::Replayed { seq, .. })
                if self.state.last_command_digest == Some(digest) =>
            {
                tracing::debug!(
                    command_seq = seq,
                    "redelivery of the last accepted command ignored"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "command refused");
                self.progress(0, digest, None, Phase::Refused, 0, 0, Some(e.to_string()));
                return;
            }
        };
        // Persist the replay floor before acting, so a replay after a crash is refused. A
        // deployment is persisted in the same write, so a crash cannot lose it.
        let seq = cmd.seq;
        self.state.last_command_seq = seq;
        self.state.last_command_digest = Some(digest);
        let deploy = match &cmd.action {
            Action::Deploy { manifest, mode } => {
                Some(self.prepare_deploy(seq, digest, manifest, *mode))
            }
            _ => None,
        };
        if let Some(Ok(p)) = &deploy {
            self.state.pending = Some(p.clone());
        }
        self.save();
        crash::point("command.after_seq_persist");
        self.progress(seq, digest, None, Phase::Received, 0, 0, None);
        match deploy {
            Some(Ok(p)) => self.start_deploy(p),
            Some(Err((model, phase, detail))) => {
                self.progress(seq, digest, model, phase, 0, 0, Some(detail))
            }
            None => self.execute(cmd, digest),
        }
    }

    fn execute(&mut self, cmd: Command, digest: Digest) {
        let seq = cmd.seq;
        match cmd.action {
            Action::Deploy { .. } => {}
            Action::Rollback { to } => self.rollback(seq, digest, to),
            Action::Promote => self.promote(seq, digest),
            Action::Configure(s) => {
                self.state.settings = Some(Settings::from(&s));
                self.serving.set_sample_rate(s.sample_rate_ppm);
                self.save();
                self.telemetry_due = Instant::now() + self.interval();
                self.progress(seq, digest, None, Phase::Done, 0, 0, None);
            }
        }
    }

    /// Verifies a deploy's manifest; the result becomes the pending deployment.
    #[allow(clippy::type_complexity)]
    fn prepare_deploy(
        &mut self,
        seq: u64,
        digest: Digest,
        blob: &SignedBlob,
        mode: DeployMode,
    ) -> Result<Pending, (Option<ModelRef>, Phase, String)> {
        let manifest = self
            .trust
            .verify_manifest(blob, now_ms())
            .map_err(|e| (None, Phase::Refused, e.to_string()))?;
        let model = ModelRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: blob.digest(),
        };
        if mode == DeployMode::Activate
            && self.state.active.as_ref().map(|a| &a.model) == Some(&model)
        {
            return Err((Some(model), Phase::Healthy, "already active".into()));
        }
        Ok(Pending {
            command_seq: seq,
            command_digest: digest,
            manifest_blob: blob.clone(),
            manifest,
            model,
            mode,
        })
    }

    fn start_deploy(&mut self, pending: Pending) {
        if let Some(old) = self.job.take() {
            let d = old.pending.manifest_blob.digest();
            let _ = self
                .out
                .send(Outbound::Unsubscribe(topics::model_chunks(&d)));
            self.progress(
                old.pending.command_seq,
                old.pending.command_digest,
                Some(old.pending.model.clone()),
                Phase::Failed,
                0,
                0,
                Some(format!("superseded by command {}", pending.command_seq)),
            );
        }
        crash::point("deploy.after_pending_persist");
        self.resume(pending);
    }

    /// Starts or resumes a pending deployment from whatever is already on disk.
    fn resume(&mut self, pending: Pending) {
        let mdigest = pending.manifest_blob.digest();
        if download::blob_is_valid(&self.data_dir, &pending.manifest) {
            self.job = Some(Job {
                pending,
                download: None,
                requested: BTreeSet::new(),
                last_request: None,
                last_reported: 0,
            });
            self.install();
            return;
        }
        match Download::open(&self.data_dir, mdigest, &pending.manifest) {
            Ok(d) => {
                let (done, total) = (d.done(), d.total());
                let complete = d.is_complete();
                self.job = Some(Job {
                    pending: pending.clone(),
                    download: Some(d),
                    requested: BTreeSet::new(),
                    last_request: None,
                    last_reported: done,
                });
                self.progress(
                    pending.command_seq,
                    pending.command_digest,
                    Some(pending.model.clone()),
                    Phase::Downloading,
                    done,
                    total,
                    None,
                );
                if complete {
                    self.install();
                } else if self.connected {
                    let _ = self
                        .out
                        .send(Outbound::Subscribe(topics::model_chunks(&mdigest)));
                }
            }
            Err(e) => self.fail_job(pending, Phase::Failed, e.to_string()),
        }
    }

    fn fail_job(&mut self, p: Pending, phase: Phase, detail: String) {
        let _ = self.out.send(Outbound::Unsubscribe(topics::model_chunks(
            &p.manifest_blob.digest(),
        )));
        self.job = None;
        self.state.pending = None;
        self.save();
        self.progress(
            p.command_seq,
            p.command_digest,
            Some(p.model),
            phase,
            0,
            0,
            Some(detail),
        );
    }

    fn request_chunks(&mut self) {
        if !self.connected {
            return;
        }
        let Some(job) = &mut self.job else { return };
        let Some(d) = &job.download else { return };
        let missing: Vec<u32> = d.missing().into_iter().take(CHUNK_BATCH).collect();
        if missing.is_empty() {
            return;
        }
        job.requested = missing.iter().copied().collect();
        job.last_request = Some(Instant::now());
        let req = Uplink::ChunkRequest(ChunkRequest {
            manifest_digest: job.pending.manifest_blob.digest(),
            indices: missing,
        });
        self.send(req, false);
    }

    fn on_chunk(&mut self, mdigest: Digest, index: u32, data: &[u8]) {
        let Some(job) = &mut self.job else { return };
        if job.pending.manifest_blob.digest() != mdigest {
            return;
        }
        let Some(d) = &mut job.download else { return };
        match d.accept(index, data) {
            Ok(_) => {}
            Err(e) => {
                // A bad chunk is dropped and asked for again; it never reaches the file.
                tracing::warn!(error = %e, index, "chunk refused");
                return;
            }
        }
        job.requested.remove(&index);
        let (done, total, complete) = (d.done(), d.total(), d.is_complete());
        let report = done == total || done >= job.last_reported + (total / 4).max(1);
        let p = job.pending.clone();
        let batch_done = job.requested.is_empty();
        if report {
            job.last_reported = done;
            self.progress(
                p.command_seq,
                p.command_digest,
                Some(p.model.clone()),
                Phase::Downloading,
                done,
                total,
                None,
            );
        }
        if complete {
            self.install();
        } else if batch_done {
            self.request_chunks();
        }
    }

    /// Verified file → self-test → activate (or shadow).
    fn install(&mut self) {
        let Some(mut job) = self.job.take() else {
            return;
        };
        let p = job.pending.clone();
        let total = p.manifest.chunk_count();
        if let Some(d) = job.download.take() {
            if let Err(e) = d.finish() {
                self.fail_job(p, Phase::Failed, e.to_string());
                return;
            }
        }
        let _ = self.out.send(Outbound::Unsubscribe(topics::model_chunks(
            &p.manifest_blob.digest(),
        )));
        crash::point("deploy.after_verify");
        self.progress(
            p.command_seq,
            p.command_digest,
            Some(p.model.clone()),
            Phase::Verified,
            total,
            total,
            None,
        );
        let slot = Slot {
            model: p.model.clone(),
            manifest: p.manifest.clone(),
            state: SlotState::SelfTested,
            unhealthy_boots: 0,
            activated_by: Some((p.command_seq, p.command_digest)),
        };
        let loaded = load_slot(&self.data_dir, &slot).and_then(|l| {
            self_test(&l.model, &p.manifest.test_vectors)
                .map(|_| l)
                .map_err(|e| e.to_string())
        });
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.fail_job(p, Phase::Failed, format!("self-test failed: {e}"));
                return;
            }
        };
        crash::point("deploy.after_selftest");
        self.progress(
            p.command_seq,
            p.command_digest,
            Some(p.model.clone()),
            Phase::SelfTested,
            total,
            total,
            None,
        );
        match p.mode {
            DeployMode::Activate => {
                let mut slot = slot;
                slot.state = SlotState::Active;
                self.activate(slot, loaded, Some((p.command_seq, p.command_digest)));
            }
            DeployMode::Shadow => {
                let mut slot = slot;
                slot.state = SlotState::SelfTested;
                self.state.shadow = Some(slot);
                self.state.pending = None;
                self.save();
                self.serving.set_shadow(Some(loaded));
                self.progress(
                    p.command_seq,
                    p.command_digest,
                    Some(p.model),
                    Phase::Shadowing,
                    total,
                    total,
                    None,
                );
            }
        }
    }

    fn activate(&mut self, slot: Slot, loaded: Arc<Loaded>, cmd: Option<(u64, Digest)>) {
        let model = slot.model.clone();
        crash::point("activate.before_state_persist");
        // The outgoing model becomes the rollback target only if it had proved healthy.
        let old = self.state.active.take();
        if let Some(o) = old {
            if o.state == SlotState::Healthy {
                self.state.previous = Some(o);
            }
        }
        self.state.active = Some(slot);
        self.state.pending = None;
        self.save();
        crash::point("activate.after_state_persist");
        self.serving.swap_active(Some(loaded));
        crash::point("activate.after_swap");
        if let Some((seq, digest)) = cmd {
            self.progress(seq, digest, Some(model), Phase::Active, 0, 0, None);
        }
        self.probation = Some((Instant::now() + self.tuning.probation, cmd));
    }

    fn end_probation(&mut self, cmd: Option<(u64, Digest)>) {
        let (errors, ok) = self.serving.probation();
        let Some(active) = self.state.active.clone() else {
            return;
        };
        if probation_passed(errors, ok) {
            crash::point("healthy.before_persist");
            if let Some(a) = &mut self.state.active {
                a.state = SlotState::Healthy;
                a.unhealthy_boots = 0;
            }
            self.save();
            crash::point("healthy.after_persist");
            if let Some((seq, digest)) = cmd {
                self.progress(seq, digest, Some(active.model), Phase::Healthy, 0, 0, None);
                // Reported (spooled): forget the command so a restart does not report again.
                if let Some(a) = &mut self.state.active {
                    a.activated_by = None;
                }
                self.save();
            }
        } else {
            let detail = format!(
                "{errors} errors in {} requests during probation",
                errors + ok
            );
            let (seq, digest) = cmd.unwrap_or((0, [0; 32]));
            self.roll_back_to_previous(seq, digest, Phase::RolledBack, Some(detail));
        }
    }

    fn roll_back_to_previous(
        &mut self,
        seq: u64,
        digest: Digest,
        phase: Phase,
        detail: Option<String>,
    ) -> bool {
        let Some(prev) = self.state.previous.clone() else {
            self.progress(
                seq,
                digest,
                None,
                Phase::Failed,
                0,
                0,
                Some("no previous model to roll back to".into()),
            );
            return false;
        };
        match load_slot(&self.data_dir, &prev) {
            Ok(l) => {
                let mut bad = self.state.active.take();
                if let Some(b) = &mut bad {
                    b.state = SlotState::RolledBack;
                }
                self.state.active = Some(prev.clone());
                self.state.previous = bad;
                self.probation = None;
                self.save();
                self.serving.swap_active(Some(l));
                self.progress(seq, digest, Some(prev.model), phase, 0, 0, detail);
                true
            }
            Err(e) => {
                self.progress(seq, digest, None, Phase::Failed, 0, 0, Some(e));
                false
            }
        }
    }

    /// Drops an in-flight download: a later command (a rollback) overrides it, so the
    /// deploy it belonged to must not activate afterwards.
    fn cancel_job(&mut self, by_seq: u64) {
        if let Some(old) = self.job.take() {
            let d = old.pending.manifest_blob.digest();
            let _ = self
                .out
                .send(Outbound::Unsubscribe(topics::model_chunks(&d)));
            self.state.pending = None;
            self.save();
            self.progress(
                old.pending.command_seq,
                old.pending.command_digest,
                Some(old.pending.model.clone()),
                Phase::Failed,
                0,
                0,
                Some(format!("superseded by command {by_seq}")),
            );
        }
    }

    fn rollback(&mut self, seq: u64, digest: Digest, to: Option<ModelRef>) {
        self.cancel_job(seq);
        // A rollback ends the rollout: a candidate still in shadow goes too.
        if self.state.shadow.take().is_some() {
            self.serving.set_shadow(None);
            self.save();
        }
        if let Some(to) = &to {
            // Already where the command wants it (e.g. the candidate never activated, or
            // the agent rolled it back itself): nothing to do.
            if self.state.active.as_ref().map(|a| &a.model) == Some(to) {
                self.probation = None;
                self.progress(seq, digest, Some(to.clone()), Phase::Done, 0, 0, None);
                return;
            }
            let prev = self.state.previous.as_ref().map(|p| &p.model);
            if prev != Some(to) {
                self.progress(
                    seq,
                    digest,
                    Some(to.clone()),
                    Phase::Failed,
                    0,
                    0,
                    Some("requested model is not the previous slot".into()),
                );
                return;
            }
        }
        self.roll_back_to_previous(seq, digest, Phase::Done, None);
    }

    fn promote(&mut self, seq: u64, digest: Digest) {
        let Some(mut slot) = self.state.shadow.take() else {
            self.progress(
                seq,
                digest,
                None,
                Phase::Failed,
                0,
                0,
                Some("no shadow model to promote".into()),
            );
            return;
        };
        let Some(loaded) = self.serving.set_shadow(None) else {
            self.state.shadow = Some(slot);
            return;
        };
        slot.state = SlotState::Active;
        slot.activated_by = Some((seq, digest));
        self.activate(slot, loaded, Some((seq, digest)));
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let Some((until, cmd)) = self.probation {
            if now >= until {
                self.probation = None;
                self.end_probation(cmd);
            }
        }
        let retry = match &self.job {
            Some(j) if j.download.is_some() => j
                .last_request
                .is_none_or(|t| now.duration_since(t) >= CHUNK_RETRY),
            _ => false,
        };
        if retry {
            self.request_chunks();
        }
        let last_id = self.serving.last_request_id();
        if last_id.saturating_add(REQUEST_ID_BLOCK / 2) > self.state.request_ids_reserved {
            self.state.request_ids_reserved = last_id.saturating_add(REQUEST_ID_BLOCK);
            self.save();
        }
        if now >= self.telemetry_due {
            self.telemetry_due = now + self.interval();
            self.replay_window();
            self.emit_telemetry();
        }
    }

    fn emit_telemetry(&mut self) {
        let w = self.serving.take_window();
        let end = now_ms();
        let start = std::mem::replace(&mut self.window_start_ms, end);
        let system = self.sys.sample(&self.data_dir);
        let active = self.serving.active();
        let model = active.as_ref().map(|a| a.model_ref.clone());
        self.send(
            Uplink::Telemetry(TelemetryBatch {
                window_start_ms: start,
                window_end_ms: end,
                model: model.clone(),
                inferences: w.inferences,
                errors: w.errors,
                data_quality_errors: w.data_quality_errors,
                latency: w.latency,
                outputs: w.outputs,
                system,
                spool_dropped: self.spool.dropped(),
            }),
            true,
        );
        if let (Some(a), false) = (&active, w.features.is_empty()) {
            if a.manifest.baseline.is_some() {
                self.send(
                    Uplink::Drift(DriftReport {
                        model: a.model_ref.clone(),
                        window_start_ms: start,
                        window_end_ms: end,
                        features: w.features,
                        predictions: w.predictions,
                    }),
                    true,
                );
            }
        }
        if let (Some(m), false) = (&model, w.samples.is_empty()) {
            self.send(
                Uplink::Samples(SampleBatch {
                    model: m.clone(),
                    samples: w.samples,
                }),
                true,
            );
        }
        if !w.labels.is_empty() {
            self.send(Uplink::Labels(LabelBatch { labels: w.labels }), true);
        }
        if let (Some(a), Some(s)) = (&model, self.serving.shadow()) {
            if w.shadow.compared > 0 || w.shadow.candidate_errors > 0 {
                self.send(
                    Uplink::Shadow(ShadowReport {
                        active: a.clone(),
                        candidate: s.model_ref.clone(),
                        compared: w.shadow.compared,
                        agreed: w.shadow.agreed,
                        candidate_errors: w.shadow.candidate_errors,
                        active_latency: w.shadow.active_latency,
                        candidate_latency: w.shadow.candidate_latency,
                    }),
                    true,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use drover_protocol::envelope::DownlinkFrame;
    use drover_protocol::messages::ChunkData;
    use drover_protocol::topics::{hex32, UplinkKind};
    use drover_protocol::trust::{KeyEntry, Keyring, Role};
    use drover_protocol::{DeviceKey, SecretKey};
    use std::sync::Mutex;

    #[test]
    fn probation_fails_only_on_evidence_of_an_error_rate_above_ten_percent() {
        // No errors, or no requests: nothing against the model.
        assert!(probation_passed(0, 0));
        assert!(probation_passed(0, 3));
        // A few requests with one error: chance, not evidence (the plain 10 % ratio
        // failed all of these).
        assert!(probation_passed(1, 1));
        assert!(probation_passed(1, 4));
        assert!(probation_passed(2, 8));
        // Clear evidence fails, with few or many requests.
        assert!(!probation_passed(1, 0));
        assert!(!probation_passed(2, 1));
        assert!(!probation_passed(5, 0));
        assert!(!probation_passed(10, 0));
        assert!(!probation_passed(16, 24));
        assert!(!probation_passed(150, 850));
        // Many requests: the verdict approaches the ratio.
        assert!(probation_passed(10, 990));
        assert!(probation_passed(100, 900));
        assert!(!probation_passed(140, 860));
    }

    struct Rig {
        core: Core,
        out: tokio::sync::mpsc::UnboundedReceiver<Outbound>,
        _dir: tempfile::TempDir,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = SecretKey::from_seed([1; 32]);
        let cfg = AgentConfig {
            device_id: "gw-unit".into(),
            device_key: hex32(&[9; 32]),
            root_public_key: hex32(&root.public()),
            data_dir: dir.path().to_owned(),
            api_addr: "127.0.0.1:0".into(),
            ..AgentConfig::default()
        }
        .validate()
        .unwrap();
        let serving = Arc::new(Serving::new(0));
        let booted = boot(&cfg, &serving).unwrap();
        let (tx, out) = tokio::sync::mpsc::unbounded_channel();
        let will = Arc::new(Mutex::new((String::new(), Vec::new())));
        let mut core = Core::new(cfg, booted, serving, tx, will, Tuning::default());
        core.connected = true;
        Rig {
            core,
            out,
            _dir: dir,
        }
    }

    fn keyring(root: &SecretKey, signer: &SecretKey, version: u64) -> SignedBlob {
        root.sign_keyring(&Keyring {
            version,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            keys: vec![KeyEntry {
                key_id: signer.id(),
                public: signer.public(),
                roles: vec![Role::Models, Role::Commands],
                not_before_ms: 0,
                not_after_ms: u64::MAX,
                revoked: false,
            }],
        })
    }

    fn published(out: &mut tokio::sync::mpsc::UnboundedReceiver<Outbound>) -> Vec<String> {
        let mut topics = Vec::new();
        while let Ok(o) = out.try_recv() {
            if let Outbound::Publish { topic, .. } = o {
                topics.push(topic);
            }
        }
        topics
    }

    #[test]
    fn request_ids_continue_across_restarts_even_past_the_first_reservation() {
        let Rig { mut core, _dir, .. } = rig();
        let first = core.serving.alloc_request_id();
        // A long run: more requests than the reservation made at boot.
        core.serving
            .continue_request_ids_after(first + REQUEST_ID_BLOCK);
        let last = core.serving.alloc_request_id();
        core.tick();
        let cfg = core.cfg.clone();
        drop(core);
        let again = Serving::new(0);
        boot(&cfg, &again).unwrap();
        let next = again.alloc_request_id();
        assert!(next > last, "{next} after a restart, {last} before");
    }

    #[test]
    fn reconnect_replays_the_spool_in_bounded_windows() {
        let mut r = rig();
        r.core.connected = false;
        for i in 0..600 {
            r.core.send(
                Uplink::Labels(LabelBatch {
                    labels: vec![drover_protocol::messages::Label {
                        request_id: i,
                        at_ms: 0,
                        value: 1.0,
                    }],
                }),
                true,
            );
        }
        let labels = topics::uplink(&r.core.cfg.device_id, UplinkKind::Labels);
        let count = |out: &mut tokio::sync::mpsc::UnboundedReceiver<Outbound>| {
            published(out).iter().filter(|t| **t == labels).count()
        };
        assert_eq!(count(&mut r.out), 0);
        r.core.on_connected();
        assert_eq!(count(&mut r.out), REPLAY_WINDOW);
        let seqs = r.core.spool.seqs();
        r.core
            .on_downlink(Downlink::UplinkAck(drover_protocol::messages::UplinkAck {
                ranges: vec![(seqs[0], seqs[99])],
            }));
        assert_eq!(count(&mut r.out), 100);
        r.core
            .on_downlink(Downlink::UplinkAck(drover_protocol::messages::UplinkAck {
                ranges: vec![(seqs[100], seqs[REPLAY_WINDOW + 99])],
            }));
        assert_eq!(count(&mut r.out), 600 - REPLAY_WINDOW - 100);
        assert!(r.core.replay.is_none());
    }

    #[test]
    fn extreme_settings_are_clamped_not_panicking() {
        let mut r = rig();
        r.core.execute(
            Command {
                target: r.core.cfg.device_id.clone(),
                seq: 1,
                issued_at_ms: 0,
                expires_at_ms: u64::MAX,
                rollout_id: None,
                action: Action::Configure(drover_protocol::messages::AgentSettings {
                    telemetry_interval_ms: u64::MAX,
                    sample_rate_ppm: u32::MAX,
                }),
            },
            [0; 32],
        );
        r.core.tick();
        assert_eq!(r.core.interval(), Duration::from_millis(86_400_000));
    }

    #[test]
    fn keyring_from_another_root_is_refused_and_reported() {
        let mut r = rig();
        published(&mut r.out);
        let rogue = SecretKey::from_seed([5; 32]);
        let blob = keyring(&rogue, &rogue, 9);
        r.core
            .on_message(&topics::keyring(), &envelope::encode_keyring(&blob));
        let want = topics::uplink(&r.core.cfg.device_id, UplinkKind::KeyringRefused);
        assert!(published(&mut r.out).contains(&want));
        // A flood of bogus keyrings yields no further reports within the interval.
        for v in 10..20 {
            let blob = keyring(&rogue, &rogue, v);
            r.core
                .on_message(&topics::keyring(), &envelope::encode_keyring(&blob));
        }
        assert!(!published(&mut r.out).contains(&want));
        assert!(r.core.trust.keyring().is_none());
        // The genuine one is accepted and persisted.
        let root = SecretKey::from_seed([1; 32]);
        let good = keyring(&root, &root, 1);
        r.core
            .on_message(&topics::keyring(), &envelope::encode_keyring(&good));
        assert_eq!(r.core.trust.keyring().map(|k| k.version), Some(1));
        assert_eq!(State::load(&r.core.data_dir).unwrap().keyring, Some(good));
    }

    #[test]
    fn hostile_frames_never_panic_or_change_state() {
        let mut r = rig();
        let root = SecretKey::from_seed([1; 32]);
        let dev = r.core.cfg.device_id.clone();
        let key = DeviceKey([9; 32]);
        let cmd = root.sign_command(&Command {
            target: dev.clone(),
            seq: 5,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            rollout_id: None,
            action: Action::Promote,
        });
        let frames: Vec<(String, Vec<u8>)> = vec![
            (
                topics::downlink(&dev),
                envelope::seal_downlink(
                    &key,
                    &DownlinkFrame {
                        device: dev.clone(),
                        sent_at_ms: 0,
                        msg: Downlink::Command(cmd),
                    },
                ),
            ),
            (
                topics::keyring(),
                envelope::encode_keyring(&keyring(&root, &root, 3)),
            ),
            (
                topics::model_chunks(&[4; 32]),
                envelope::encode_chunk(&ChunkData {
                    manifest_digest: [4; 32],
                    index: 7,
                    data: vec![1; 100],
                }),
            ),
        ];
        let before = State::load(&r.core.data_dir).unwrap();
        for (topic, bytes) in &frames {
            for cut in 0..bytes.len() {
                r.core.on_message(topic, &bytes[..cut]);
            }
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0x55;
                r.core.on_message(topic, &b);
            }
            r.core.on_message("drover/v1/dev/other/down", bytes);
            r.core.on_message("not/a/topic", bytes);
        }
        let after = State::load(&r.core.data_dir).unwrap();
        assert_eq!(after.last_command_seq, before.last_command_seq);
        assert_eq!(after.active, None);
        assert!(r.core.trust.keyring().is_none());
    }
}
