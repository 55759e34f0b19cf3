//! The agent's core: one dedicated thread that drives the deployment machine
//! ([`crate::machine`]) and executes its effects against the disk ([`crate::state`],
//! [`crate::download`], [`crate::spool`]), tract (`drover_runtime`), the models being
//! served ([`crate::serving`]) and the MQTT session ([`crate::mqtt`]). It also owns what
//! is the agent's alone: boot (the last good model back in service), the spool replay
//! after a reconnect and the telemetry window. It is not the MQTT poll loop, and
//! inference requests never wait on it.
//!
//! The order of disk writes and crash points (`drover_host::crash`) is the machine's
//! effect order: `tests/crash.rs` SIGKILLs the agent at each point and checks recovery.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_host::clock::now_ms;
use drover_host::crash;
use drover_protocol::envelope;
use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{
    DriftReport, LabelBatch, ModelRef, SampleBatch, ShadowReport, SystemFacts, TelemetryBatch,
    Uplink,
};
use drover_protocol::topics;
use drover_protocol::trust::Digest;
use drover_runtime::{self_test, self_test_sampled};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::ValidConfig;
use crate::download::{self, Download};
use crate::isolate::Loader;
use crate::machine::{
    self, Decoded, Effect, Event, Input, Machine, Observed, Sealed, State, Stored,
};
use crate::mqtt::{Inbound, Outbound, WillSlot};
use crate::serving::{Loaded, Serving, Window};
use crate::spool::Spool;
use crate::store::{self, Kept};
use crate::telemetry::SysProbe;

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
    /// A crash point (`POINT:N`) armed in every isolated self-test child (crash tests).
    pub loader_crash_at: Option<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            probation: Duration::from_secs(2),
            loader_crash_at: None,
        }
    }
}

pub use crate::boot::{boot, BootError, Booted};
use crate::boot::{collect_garbage, load_model};

pub struct Core {
    cfg: ValidConfig,
    data_dir: PathBuf,
    machine: Machine,
    spool: Spool,
    serving: Arc<Serving>,
    out: UnboundedSender<Outbound>,
    will: WillSlot,
    replay: Option<Replay>,
    /// The downloads in progress, one per slot at most (`Effect::OpenDownload` until
    /// finished or closed), by manifest digest.
    download: BTreeMap<Digest, Download>,
    /// The model an `Effect::Load` brought up, until an effect serves it.
    loaded: Option<Arc<Loaded>>,
    /// Where new models are checked before they load here (`runtime.isolate`).
    loader: Option<Loader>,
    /// What the record on disk keeps in the model store (collected when it changes).
    kept: Kept,
    telemetry_due: Instant,
    window_start_ms: u64,
    sys: SysProbe,
}

impl Core {
    /// Builds the core and takes up what the last run left (seals the last will the
    /// session connects with, resumes a pending deployment).
    pub fn new(
        cfg: ValidConfig,
        booted: Booted,
        serving: Arc<Serving>,
        out: UnboundedSender<Outbound>,
        will: WillSlot,
        tuning: Tuning,
        loader: Option<Loader>,
    ) -> Core {
        // A replacement continues the replaced device's sequences (config `[replacement]`):
        // uplinks after the last one stored, commands after the last one issued to it.
        let replacement = &cfg.raw.replacement;
        let mut booted = booted;
        booted.state.last_command_seq = booted
            .state
            .last_command_seq
            .max(replacement.command_seq_floor);
        let next_seq = booted
            .state
            .uplink_seq_reserved
            .max(booted.spool.max_seq().unwrap_or(0))
            .max(replacement.uplink_seq_start.saturating_sub(1))
            + 1;
        let machine_cfg = machine::Config {
            device_id: cfg.device_id.clone(),
            device_key: cfg.device_key.clone(),
            labels: cfg.raw.labels.clone(),
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            probation_ms: tuning.probation.as_millis() as u64,
            budget: cfg.raw.models.budget(),
            runtime: drover_runtime::compiled::runtime_report(),
        };
        let now = now_ms();
        let kept = Kept::of(&booted.state);
        let dropped = booted.spool.dropped();
        serving
            .totals
            .spool_dropped
            .store(dropped, Ordering::Relaxed);
        let machine = Machine::new(machine_cfg, booted.state, booted.trust, next_seq, now);
        let data_dir = cfg.raw.data_dir.clone();
        let mut core = Core {
            cfg,
            data_dir,
            machine,
            spool: booted.spool,
            serving,
            out,
            will,
            replay: None,
            download: BTreeMap::new(),
            loaded: None,
            loader,
            kept,
            telemetry_due: Instant::now(),
            window_start_ms: now,
            sys: SysProbe::new(),
        };
        core.telemetry_due = Instant::now() + core.interval();
        core.feed(Input::Start);
        core
    }

    fn interval(&self) -> Duration {
        let default = self.cfg.raw.telemetry.interval_ms;
        Duration::from_millis(self.machine.telemetry_interval_ms(default))
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, rx: Receiver<Inbound>, stop: Arc<AtomicBool>) {
        let span = tracing::info_span!("core", device_id = %self.cfg.device_id);
        let _entered = span.enter();
        self.spool_gauges();
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => self.on_inbound(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
        }
        let was_connected = self.machine.connected();
        self.feed(Input::Stop);
        if was_connected {
            let _ = self.out.send(Outbound::Disconnect);
        }
    }

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Connected => {
                self.serving.totals.set_connected(true);
                self.feed(Input::Connected)
            }
            Inbound::Disconnected(_) => {
                self.serving.totals.set_connected(false);
                self.replay = None;
                self.feed(Input::Disconnected);
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

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        match self.machine.decode(topic, payload) {
            Decoded::Input(input) => self.feed(input),
            Decoded::Refused(e) => tracing::warn!(error = %e, "frame refused"),
            Decoded::Ignored => tracing::debug!(topic, "ignored message"),
        }
    }

    /// Hands the machine one input and executes what it says, in order. A result an
    /// effect produces goes back in at once (depth first), as the machine expects.
    fn feed(&mut self, input: Input) {
        let effects = self.machine.handle(input, now_ms());
        for effect in effects {
            if let Some(result) = self.execute(effect) {
                // A command whose acceptance is not on disk is not acted on: the rest of
                // its batch is dropped (the machine's contract).
                let void = matches!(result, Input::PersistFailed { .. });
                self.feed(result);
                if void {
                    break;
                }
            }
        }
    }

    /// Writes the record; on success collects what it no longer keeps.
    fn persist(&mut self, state: &State) -> Result<(), crate::state::StateError> {
        let totals = &self.serving.totals;
        if let Err(e) = state.save(&self.data_dir) {
            tracing::error!(error = %e, "cannot persist agent state");
            totals.state_write_failures.fetch_add(1, Ordering::Relaxed);
            totals.disk_full.store(1, Ordering::Relaxed);
            return Err(e);
        }
        totals.disk_full.store(0, Ordering::Relaxed);
        let kept = Kept::of(state);
        if kept != self.kept {
            self.kept = kept;
            collect_garbage(&self.data_dir, &self.kept, &self.serving);
        }
        Ok(())
    }

    /// Executes one effect; returns the result of those that ask something.
    fn execute(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Persist(state) => {
                let _ = self.persist(&state);
            }
            Effect::PersistCommand(state) => {
                if let Err(e) = self.persist(&state) {
                    return Some(Input::PersistFailed {
                        error: e.to_string(),
                    });
                }
            }
            Effect::CrashPoint(name) => crash::point(name),
            Effect::Uplink(sealed) => self.send(sealed),
            Effect::SetWill { topic, payload } => {
                if let Ok(mut w) = self.will.lock() {
                    *w = (topic, payload);
                }
            }
            Effect::Subscribe(t) => {
                let _ = self.out.send(Outbound::Subscribe(t));
            }
            Effect::Unsubscribe(t) => {
                let _ = self.out.send(Outbound::Unsubscribe(t));
            }
            Effect::Replay { before } => {
                // Replayed in windows (see `replay_window`) so a large spool never sits
                // in memory at once.
                self.replay = Some(Replay {
                    next: 0,
                    end: before,
                });
                self.replay_window();
            }
            Effect::SpoolAck(ranges) => {
                if let Err(e) = self.spool.ack(&ranges) {
                    tracing::warn!(error = %e, "spool ack failed");
                }
                self.spool_gauges();
                self.replay_window();
            }
            Effect::ApplySettings(s) => {
                self.serving.set_sample_rate(s.sample_rate_ppm);
                self.telemetry_due = Instant::now() + self.interval();
            }
            Effect::OpenDownload {
                manifest_digest,
                manifest,
            } => return Some(self.open_download(manifest_digest, &manifest)),
            Effect::WriteChunk {
                manifest_digest,
                index,
                data,
            } => return Some(self.write_chunk(manifest_digest, index, &data)),
            Effect::FinishDownload { manifest_digest } => {
                return Some(self.finish_download(manifest_digest))
            }
            Effect::CloseDownload { manifest_digest } => {
                self.download.remove(&manifest_digest);
            }
            Effect::Load {
                model,
                manifest,
                self_test: test,
            } => return Some(self.load(&model, &manifest, test)),
            Effect::ServeLoaded { model } => match self.loaded.take() {
                Some(l) => {
                    self.serving.swap_active(&model, Some(l));
                }
                None => tracing::error!(%model, "no loaded model to serve"),
            },
            Effect::ShadowLoaded { model } => match self.loaded.take() {
                Some(l) => {
                    self.serving.set_shadow(&model, Some(l));
                }
                None => tracing::error!(%model, "no loaded model to shadow"),
            },
            Effect::PromoteShadow { model } => match self.serving.set_shadow(&model, None) {
                Some(l) => {
                    self.serving.swap_active(&model, Some(l));
                }
                None => tracing::error!(%model, "no shadow model to promote"),
            },
            Effect::DropShadow { model } => {
                self.serving.set_shadow(&model, None);
            }
            Effect::Unload { model } => {
                tracing::info!(%model, "model removed");
                self.serving.remove(&model);
            }
            Effect::Event(e) => log_event(e),
        }
        None
    }

    /// Durable frames go through the spool first and are re-sent until acknowledged.
    fn send(&mut self, s: Sealed) {
        if s.durable {
            if let Err(e) = self.spool.push(s.seq, &s.payload) {
                // Counted as a drop by the spool; sent live below if the session is up.
                tracing::error!(error = %e, seq = s.seq, "cannot spool uplink record");
            }
            self.spool_gauges();
        }
        if s.publish {
            let _ = self.out.send(Outbound::Publish {
                topic: s.topic,
                payload: s.payload,
            });
        }
    }

    /// The spool's figures on `/metrics`.
    fn spool_gauges(&self) {
        let totals = &self.serving.totals;
        totals.set_spool(self.spool.dropped(), self.spool.bytes());
    }

    /// The open download's progress on `/metrics` (0 of 0 when none is open).
    fn download_gauges(&self) {
        let have: Vec<bool> = self.download.values().flat_map(|d| d.have()).collect();
        let have = (!self.download.is_empty()).then_some(have);
        self.serving.totals.set_download(have.as_deref());
    }

    fn open_download(&mut self, manifest_digest: Digest, manifest: &Manifest) -> Input {
        let input = self.open_download_inner(manifest_digest, manifest);
        self.download_gauges();
        input
    }

    fn open_download_inner(&mut self, manifest_digest: Digest, manifest: &Manifest) -> Input {
        self.download.remove(&manifest_digest);
        if download::blob_is_valid(&self.data_dir, manifest) {
            return Input::Opened {
                manifest_digest,
                stored: Stored::Blob,
            };
        }
        // Refused before a byte is written when it cannot fit, with the figures; what the
        // record no longer keeps is collected first.
        let held: Vec<bool> = {
            let n = manifest.chunk_count() as usize;
            let mut held = vec![false; n];
            for i in download::verified_chunks(&self.data_dir, &manifest_digest) {
                if let Some(h) = held.get_mut(i as usize) {
                    *h = true;
                }
            }
            held
        };
        let budget = self.cfg.raw.store.max_bytes;
        if store::check_fits(&self.data_dir, manifest, &held, budget).is_err() {
            collect_garbage(&self.data_dir, &self.kept, &self.serving);
            if let Err(error) = store::check_fits(&self.data_dir, manifest, &held, budget) {
                return Input::OpenFailed {
                    manifest_digest,
                    error,
                };
            }
        }
        match Download::open(&self.data_dir, manifest_digest, manifest) {
            Ok(d) => {
                let stored = Stored::Chunks(d.have());
                self.download.insert(manifest_digest, d);
                Input::Opened {
                    manifest_digest,
                    stored,
                }
            }
            Err(e) => Input::OpenFailed {
                manifest_digest,
                error: e.to_string(),
            },
        }
    }

    fn write_chunk(&mut self, manifest_digest: Digest, index: u32, data: &[u8]) -> Input {
        let written = match self.download.get_mut(&manifest_digest) {
            Some(d) => d.write(index, data).map_err(|e| e.to_string()),
            _ => Err("no download open for this model".to_owned()),
        };
        if written.is_ok() {
            self.download_gauges();
        }
        match written {
            Ok(()) => Input::ChunkWritten {
                manifest_digest,
                index,
            },
            Err(error) => Input::ChunkWriteFailed {
                manifest_digest,
                index,
                error,
            },
        }
    }

    fn finish_download(&mut self, manifest_digest: Digest) -> Input {
        let finished = match self.download.remove(&manifest_digest) {
            Some(d) => d.finish().map_err(|e| e.to_string()),
            _ => Err("no download open for this model".to_owned()),
        };
        self.download_gauges();
        match finished {
            Ok(_) => Input::BlobReady { manifest_digest },
            Err(error) => Input::BlobFailed {
                manifest_digest,
                error,
            },
        }
    }

    fn load(&mut self, model: &ModelRef, manifest: &Manifest, test: bool) -> Input {
        let loaded = match (&self.loader, test) {
            (Some(loader), true) => self.load_isolated(loader, model, manifest),
            _ => self.load_in_process(model, manifest, test),
        };
        match loaded {
            Ok(l) => {
                self.loaded = Some(l);
                Input::Loaded {
                    model: model.digest,
                }
            }
            Err(error) => Input::LoadFailed {
                model: model.digest,
                error,
            },
        }
    }

    /// Loads and self-tests `model` in a child first; only a model that passed there is
    /// loaded here (without testing it twice).
    fn load_isolated(
        &self,
        loader: &Loader,
        model: &ModelRef,
        manifest: &Manifest,
    ) -> Result<Arc<Loaded>, String> {
        let data_dir = &self.cfg.raw.data_dir;
        if !download::blob_is_valid(data_dir, manifest) {
            return Err("model file missing or does not match its manifest".into());
        }
        let path = download::blob_path(data_dir, &manifest.sha256);
        let started = Instant::now();
        let checked = loader.check(&path, manifest, self.cfg.raw.runtime.threads);
        self.serving.totals.self_tested(started.elapsed());
        let report = checked?;
        tracing::info!(
            model = %model.name,
            version = %model.version,
            load_ms = report.load_ms,
            self_test_ms = report.self_test_ms,
            peak_rss_bytes = report.peak_rss_bytes,
            "model passed its isolated self-test"
        );
        load_model(&self.cfg, model, manifest)
    }

    fn load_in_process(
        &self,
        model: &ModelRef,
        manifest: &Manifest,
        test: bool,
    ) -> Result<Arc<Loaded>, String> {
        load_model(&self.cfg, model, manifest).and_then(|l| {
            if test {
                let started = Instant::now();
                let tested = self_test(&l.model, &manifest.test_vectors)
                    .and_then(|()| self_test_sampled(&l.model, &manifest.sampled_vectors));
                self.serving.totals.self_tested(started.elapsed());
                tested.map_err(|e| e.to_string())?;
            }
            Ok(l)
        })
    }

    /// Sends the next window of the replay: at most `REPLAY_WINDOW` records may be in
    /// flight unacknowledged, so a large spool never sits in memory at once.
    fn replay_window(&mut self) {
        let Some(r) = self.replay else { return };
        if !self.machine.connected() {
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

    fn tick(&mut self) {
        self.feed(Input::Tick(Observed {
            probation: self.serving.probation(),
            last_request_id: self.serving.last_request_id(),
        }));
        let now = Instant::now();
        if now >= self.telemetry_due {
            self.telemetry_due = now + self.interval();
            self.replay_window();
            self.emit_telemetry();
        }
    }

    /// One telemetry batch per served model per window (and its drift, samples, labels
    /// and shadow report), or one without a model when none serves (system facts).
    fn emit_telemetry(&mut self) {
        let windows = self.serving.take_windows();
        let end = now_ms();
        let start = std::mem::replace(&mut self.window_start_ms, end);
        let system = self.sys.sample(&self.data_dir);
        let mut any = false;
        for (_, active, shadow, w) in windows {
            if active.is_none() && w.inferences == 0 {
                continue;
            }
            any = true;
            self.emit_window((start, end), &system, (active, shadow), w);
        }
        if !any {
            let w = Window::default();
            self.emit_window((start, end), &system, (None, None), w);
        }
    }

    fn emit_window(
        &mut self,
        (start, end): (u64, u64),
        system: &SystemFacts,
        (active, shadow): (Option<Arc<Loaded>>, Option<Arc<Loaded>>),
        w: Window,
    ) {
        let model = active.as_ref().map(|a| a.model_ref.clone());
        self.feed(Input::Report(Box::new(Uplink::Telemetry(TelemetryBatch {
            window_start_ms: start,
            window_end_ms: end,
            model: model.clone(),
            inferences: w.inferences,
            errors: w.errors,
            data_quality_errors: w.data_quality_errors,
            latency: w.latency,
            outputs: w.outputs,
            system: system.clone(),
            spool_dropped: self.spool.dropped(),
        }))));
        if let (Some(a), false) = (&active, w.features.is_empty()) {
            if a.manifest.baseline.is_some() {
                self.feed(Input::Report(Box::new(Uplink::Drift(DriftReport {
                    model: a.model_ref.clone(),
                    window_start_ms: start,
                    window_end_ms: end,
                    features: w.features,
                    predictions: w.predictions,
                }))));
            }
        }
        if let (Some(m), false) = (&model, w.samples.is_empty()) {
            self.feed(Input::Report(Box::new(Uplink::Samples(SampleBatch {
                model: m.clone(),
                samples: w.samples,
            }))));
        }
        if !w.labels.is_empty() {
            self.feed(Input::Report(Box::new(Uplink::Labels(LabelBatch {
                labels: w.labels,
            }))));
        }
        if let (Some(a), Some(s)) = (&model, shadow) {
            if w.shadow.compared > 0 || w.shadow.candidate_errors > 0 {
                self.feed(Input::Report(Box::new(Uplink::Shadow(ShadowReport {
                    active: a.clone(),
                    candidate: s.model_ref.clone(),
                    compared: w.shadow.compared,
                    agreed: w.shadow.agreed,
                    candidate_errors: w.shadow.candidate_errors,
                    active_latency: w.shadow.active_latency,
                    candidate_latency: w.shadow.candidate_latency,
                }))));
            }
        }
    }
}

fn log_event(e: Event) {
    match e {
        Event::HelloAcked {
            protocol_version,
            stored_up_to,
        } => tracing::info!(
            protocol = protocol_version,
            stored_up_to,
            "hello acknowledged"
        ),
        Event::KeyringAccepted { version } => tracing::info!(version, "keyring accepted"),
        Event::KeyringRefused(e) => tracing::warn!(error = %e, "keyring refused"),
        Event::CommandRedelivered { seq } => tracing::debug!(
            command_seq = seq,
            "redelivery of the last accepted command ignored"
        ),
        Event::CommandRefused(e) => tracing::warn!(error = %e, "command refused"),
        Event::DownlinkRefused { len, reason } => {
            tracing::warn!(error = %reason, len, "downlink refused, acknowledged and reported")
        }
        Event::CommandNotPersisted { seq, error } => tracing::error!(
            command_seq = seq,
            error = %error,
            "command not acted on: its acceptance could not be persisted"
        ),
        Event::Progress {
            command_seq,
            phase,
            detail,
        } => tracing::info!(
            command_seq,
            phase = ?phase,
            detail = detail.as_deref().unwrap_or(""),
            "deployment progress"
        ),
        Event::ChunkRefused { index, reason } => {
            tracing::warn!(error = %reason, index, "chunk refused")
        }
        Event::ProbationFailed { errors, ok } => {
            tracing::warn!(errors, ok, "model failed its probation")
        }
        // Reported as progress already.
        Event::InstallFailed { .. } | Event::Installed { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::machine::REQUEST_ID_BLOCK;
    use drover_protocol::messages::{Downlink, Label, UplinkAck};
    use drover_protocol::topics::{hex32, UplinkKind};
    use drover_protocol::SecretKey;
    use std::sync::Mutex;

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
            metrics_addr: "127.0.0.1:0".into(),
            ..AgentConfig::default()
        }
        .validate()
        .unwrap();
        let serving = Arc::new(Serving::new(0));
        let booted = boot(&cfg, &serving).unwrap();
        let (tx, out) = tokio::sync::mpsc::unbounded_channel();
        let will = Arc::new(Mutex::new((String::new(), Vec::new())));
        let core = Core::new(cfg, booted, serving, tx, will, Tuning::default(), None);
        Rig {
            core,
            out,
            _dir: dir,
        }
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
        for i in 0..600 {
            r.core
                .feed(Input::Report(Box::new(Uplink::Labels(LabelBatch {
                    labels: vec![Label {
                        request_id: i,
                        at_ms: 0,
                        value: 1.0,
                    }],
                }))));
        }
        let labels = topics::uplink(&r.core.cfg.device_id, UplinkKind::Labels);
        let count = |out: &mut tokio::sync::mpsc::UnboundedReceiver<Outbound>| {
            published(out).iter().filter(|t| **t == labels).count()
        };
        assert_eq!(count(&mut r.out), 0);
        r.core.on_inbound(Inbound::Connected);
        assert_eq!(count(&mut r.out), REPLAY_WINDOW);
        let seqs = r.core.spool.seqs();
        r.core.feed(Input::Downlink(Downlink::UplinkAck(UplinkAck {
            ranges: vec![(seqs[0], seqs[99])],
        })));
        assert_eq!(count(&mut r.out), 100);
        r.core.feed(Input::Downlink(Downlink::UplinkAck(UplinkAck {
            ranges: vec![(seqs[100], seqs[REPLAY_WINDOW + 99])],
        })));
        assert_eq!(count(&mut r.out), 600 - REPLAY_WINDOW - 100);
        assert!(r.core.replay.is_none());
    }

    #[test]
    fn refused_frames_leave_the_state_on_disk_alone() {
        let mut r = rig();
        let before = State::load(&r.core.data_dir).unwrap();
        let dev = r.core.cfg.device_id.clone();
        r.core.on_message(&topics::downlink(&dev), b"DR\x01garbage");
        r.core.on_message(&topics::keyring(), b"not a keyring");
        r.core.on_message("not/a/topic", b"");
        assert_eq!(State::load(&r.core.data_dir).unwrap(), before);
        assert!(r.core.machine.trust().keyring().is_none());
    }

    #[test]
    fn the_last_will_is_sealed_before_the_session_starts() {
        let r = rig();
        let (topic, payload) = r.core.will.lock().unwrap().clone();
        assert_eq!(
            topic,
            topics::uplink(&r.core.cfg.device_id, UplinkKind::Status)
        );
        let f = envelope::decode_uplink_unauthenticated(&payload).unwrap();
        assert!(
            matches!(f.msg, Uplink::Status(s) if s.presence == drover_protocol::messages::Presence::Offline)
        );
    }
}
