//! One virtual device: its MQTT session and the agent's own deployment machine
//! (`drover_agent::machine`), in one task.
//!
//! The machine decides what the agent decides: Hello and Status on every connect, uplink
//! sequence numbers and sealing, commands verified against the sequence floor, keyrings,
//! deploy → download (chunks asked for `CHUNK_BATCH` at a time, re-asked after
//! `CHUNK_RETRY_MS`, each verified) → verified → self-tested → active → probation →
//! healthy or rolled back, shadow deploys, promote and rollback. This file executes its
//! effects against what a virtual device has instead of a disk and tract:
//! - the spool is a map of sealed frames kept until the control plane acknowledges them
//!   and replayed after every reconnect;
//! - verified chunks go to the process-wide [`super::ChunkCache`] (once per model, never
//!   per device); the blob store is the set of models whose file this device verified;
//! - "load" is a real tract load and self-test on the first `tract_devices` devices and
//!   nothing elsewhere;
//! - crash points and state snapshots are ignored (nothing survives the process).
//!
//! The traffic the models serve is modelled in [`super::traffic`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_agent::machine::{
    self, Decoded, Effect, Event, FrameRefused, Input, Machine, Observed, Sealed, SlotState, State,
    Stored,
};
use drover_host::clock::now_ms;
use drover_protocol::envelope;
use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{DeployMode, ModelRef, Phase, Uplink};
use drover_protocol::trust::{Digest, TrustStore};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use super::model::ModelBytes;
use super::traffic::Window;
use super::{Identity, InstallTimes, Shared};

/// How often a device advances its clock-driven work (inference, probation, retries).
const TICK: Duration = Duration::from_millis(200);

/// A model this device loaded: what the modelled traffic needs of it.
#[derive(Clone)]
pub(super) struct SimModel {
    pub(super) model: ModelRef,
    pub(super) manifest: Arc<Manifest>,
    /// The real tract model, on devices that run tract.
    pub(super) tract: Option<Arc<drover_runtime::Model>>,
}

/// The download in progress; its chunks live in the shared cache.
struct Download {
    manifest: Arc<Manifest>,
    bytes: Arc<ModelBytes>,
}

enum Op {
    Publish(String, Vec<u8>),
    Subscribe(String),
    Unsubscribe(String),
}

pub struct Device {
    pub(super) ident: Identity,
    pub(super) shared: Arc<Shared>,
    pub(super) rng: rand::rngs::StdRng,
    machine: Machine,
    /// Models whose verified file this device holds (its blob store), by SHA-256.
    store: BTreeSet<Digest>,
    /// Downloads in progress, by manifest digest (one per slot deploying).
    download: BTreeMap<Digest, Download>,
    /// The model an `Effect::Load` brought up, until an effect serves it.
    loaded: Option<SimModel>,
    /// Per model slot (the model's name): the active model and the one in shadow.
    pub(super) active: BTreeMap<String, SimModel>,
    pub(super) shadow: BTreeMap<String, SimModel>,
    /// Per slot: (errors, successes) of its active model since it was activated: what
    /// probation judges.
    pub(super) probation_counts: BTreeMap<String, (u64, u64)>,
    /// The last accepted command and when, for command → active times.
    accepted: Option<(u64, Instant)>,
    /// Since that command: the first chunk request sent, the first chunk received and
    /// the download finished.
    asked_at: Option<Instant>,
    first_chunk_at: Option<Instant>,
    downloaded_at: Option<Instant>,
    /// This device's chunk request topic.
    chunk_request_topic: String,
    spool: BTreeMap<u64, (String, Vec<u8>)>,
    outbox: VecDeque<Op>,
    will: Option<LastWill>,
    telemetry_interval: Duration,
    telemetry_due: Instant,
    pub(super) window_start_ms: u64,
    /// The telemetry window, per slot.
    pub(super) win: BTreeMap<String, Window>,
    pub(super) pending_inferences: f64,
    pub(super) last_served: Instant,
}

impl Device {
    pub fn new(ident: Identity, shared: Arc<Shared>) -> anyhow::Result<Device> {
        let trust = TrustStore::new(ident.root_public)
            .map_err(|e| anyhow::anyhow!("device {}: root key: {e}", ident.id))?;
        let seed = shared.cfg.seed ^ (ident.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let interval = shared
            .cfg
            .telemetry_interval
            .max(Duration::from_millis(100));
        // Spread windows over the interval so the fleet does not report in lockstep.
        let first = interval.mul_f64(rng.gen_range(0.0..1.0));
        let labels = shared
            .cfg
            .groups
            .get(ident.group)
            .map(|g| g.labels.clone())
            .unwrap_or_default();
        let cfg = machine::Config {
            device_id: ident.id.clone(),
            device_key: ident.key.clone(),
            labels,
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            probation_ms: drover_agent::Tuning::default().probation.as_millis() as u64,
            budget: Default::default(),
            runtime: drover_runtime::compiled::runtime_report(),
        };
        let now = now_ms();
        let chunk_request_topic = drover_protocol::topics::uplink(
            &ident.id,
            drover_protocol::topics::UplinkKind::ChunkRequest,
        );
        let mut dev = Device {
            ident,
            shared,
            rng,
            machine: Machine::new(cfg, State::default(), trust, 1, now),
            store: BTreeSet::new(),
            download: BTreeMap::new(),
            loaded: None,
            active: BTreeMap::new(),
            shadow: BTreeMap::new(),
            probation_counts: BTreeMap::new(),
            accepted: None,
            asked_at: None,
            first_chunk_at: None,
            downloaded_at: None,
            chunk_request_topic,
            spool: BTreeMap::new(),
            outbox: VecDeque::new(),
            will: None,
            telemetry_interval: interval,
            telemetry_due: Instant::now() + first,
            window_start_ms: now,
            win: BTreeMap::new(),
            pending_inferences: 0.0,
            last_served: Instant::now(),
        };
        dev.feed(Input::Start);
        Ok(dev)
    }

    fn session(&mut self) -> (AsyncClient, EventLoop) {
        let id = self.ident.id.as_str().to_owned();
        let mut opts = MqttOptions::new(
            id.clone(),
            self.ident.broker_host.clone(),
            self.ident.broker_port,
        );
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(15))
            .set_credentials(id, self.ident.key.mqtt_password())
            .set_max_packet_size(
                envelope::MAX_DOWNLINK_LEN + 1024,
                envelope::MAX_UPLINK_LEN + 1024,
            )
            .set_inflight(64);
        if let Some(w) = self.will.clone() {
            opts.set_last_will(w);
        }
        AsyncClient::new(opts, 64)
    }

    /// Runs the device until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let cfg = self.shared.cfg.clone();
        let mut session = Some(self.session());
        let mut attempt = 0u32;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut back_at: Option<Instant> = None;
        let mut next_churn =
            Instant::now() + cfg.churn_period.mul_f64(self.rng.gen_range(0.5..1.5));
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + TICK.mul_f64(self.rng.gen_range(0.0..1.0)),
            TICK,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() {
                break;
            }
            match &mut session {
                Some((client, el)) => {
                    let waiting = retry_at.filter(|t| *t > tokio::time::Instant::now());
                    tokio::select! {
                        ev = el.poll(), if waiting.is_none() => {
                            retry_at = None;
                            match ev {
                                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                                    attempt = 0;
                                    self.on_connected();
                                }
                                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                                    self.on_message(&p.topic, &p.payload);
                                }
                                Ok(_) => {}
                                Err(_) => {
                                    self.feed(Input::Disconnected);
                                    let delay = drover_agent::mqtt::backoff(attempt, self.rng.gen());
                                    attempt = attempt.saturating_add(1);
                                    retry_at = Some(tokio::time::Instant::now() + delay);
                                    if let Some(w) = self.will.clone() {
                                        el.mqtt_options.set_last_will(w);
                                    }
                                }
                            }
                        }
                        _ = tokio::time::sleep_until(waiting.unwrap_or_else(tokio::time::Instant::now)), if waiting.is_some() => {}
                        _ = tick.tick() => self.tick(),
                        _ = stop.changed() => {}
                    }
                    self.flush(client);
                }
                None => {
                    tokio::select! {
                        _ = tick.tick() => self.tick(),
                        _ = stop.changed() => {}
                    }
                    if back_at.is_some_and(|t| Instant::now() >= t) {
                        back_at = None;
                        attempt = 0;
                        retry_at = None;
                        session = Some(self.session());
                    }
                }
            }
            // Churn: drop the connection abruptly (no DISCONNECT: the broker publishes the
            // last will), come back later with the same identity and state.
            if cfg.churn_probability > 0.0 && session.is_some() && Instant::now() >= next_churn {
                next_churn += cfg.churn_period;
                if self.rng.gen_bool(cfg.churn_probability.clamp(0.0, 1.0)) {
                    session = None;
                    self.feed(Input::Disconnected);
                    self.outbox.clear();
                    back_at = Some(Instant::now() + cfg.churn_downtime);
                    self.shared.stats.churn_drops.fetch_add(1, Relaxed);
                }
            }
        }
        // Clean shutdown, as the agent: say offline, disconnect, let the frames go out.
        if let Some((client, mut el)) = session {
            if self.machine.connected() {
                self.feed(Input::Stop);
                self.flush(&client);
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while el.poll().await.is_ok() {}
                })
                .await;
            }
        }
    }

    fn flush(&mut self, client: &AsyncClient) {
        while let Some(op) = self.outbox.front() {
            let r = match op {
                Op::Publish(t, p) => {
                    client.try_publish(t.clone(), QoS::AtLeastOnce, false, p.clone())
                }
                Op::Subscribe(t) => client.try_subscribe(t.clone(), QoS::AtLeastOnce),
                Op::Unsubscribe(t) => client.try_unsubscribe(t.clone()),
            };
            if r.is_err() {
                // The client's request queue is full: the rest waits for the next event.
                return;
            }
            if matches!(op, Op::Publish(..)) {
                self.shared.stats.publishes.fetch_add(1, Relaxed);
            }
            self.outbox.pop_front();
        }
    }

    fn on_connected(&mut self) {
        self.shared.stats.connects.fetch_add(1, Relaxed);
        self.outbox.clear();
        self.feed(Input::Connected);
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let decoded = self.machine.decode(topic, payload);
        let stats = &self.shared.stats;
        if matches!(
            decoded,
            Decoded::Input(Input::Chunk(_))
                | Decoded::Refused(FrameRefused::Chunk(_) | FrameRefused::ChunkTopic)
        ) {
            stats.chunks_received.fetch_add(1, Relaxed);
            if self.accepted.is_some() && self.first_chunk_at.is_none() && !self.download.is_empty()
            {
                self.first_chunk_at = Some(Instant::now());
            }
            stats
                .chunk_bytes_received
                .fetch_add(payload.len() as u64, Relaxed);
        }
        match decoded {
            Decoded::Input(input) => self.feed(input),
            Decoded::Refused(e) => {
                if matches!(e, FrameRefused::Chunk(_) | FrameRefused::ChunkTopic) {
                    stats.chunks_refused.fetch_add(1, Relaxed);
                }
                tracing::warn!(device_id = %self.ident.id, error = %e, "frame refused");
            }
            Decoded::Ignored => {}
        }
    }

    fn tick(&mut self) {
        let probation = self.probation_counts.clone();
        self.feed(Input::Tick(Observed {
            probation,
            last_request_id: 0,
        }));
        if self.shared.quiet.load(Relaxed) {
            return;
        }
        self.serve_traffic();
        let now = Instant::now();
        if now >= self.telemetry_due {
            self.telemetry_due = now + self.telemetry_interval;
            self.emit_window();
        }
    }

    /// Hands a durable message (telemetry, drift, shadow report) to the machine to seal.
    pub(super) fn report(&mut self, msg: Uplink) {
        if matches!(msg, Uplink::Telemetry(_)) {
            self.shared.stats.telemetry_sent.fetch_add(1, Relaxed);
        }
        self.feed(Input::Report(Box::new(msg)));
    }

    /// Hands the machine one input and executes what it says, in order; a result an
    /// effect produces goes back in at once, as the machine expects.
    fn feed(&mut self, input: Input) {
        let effects = self.machine.handle(input, now_ms());
        for effect in effects {
            if let Some(result) = self.execute(effect) {
                self.feed(result);
            }
        }
    }

    fn execute(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            // Every change of the slots is persisted: the fleet's view follows it.
            Effect::Persist(_) | Effect::PersistCommand(_) => self.publish_active(),
            Effect::CrashPoint(_) => {}
            Effect::Uplink(sealed) => {
                if self.accepted.is_some()
                    && self.asked_at.is_none()
                    && sealed.topic == self.chunk_request_topic
                {
                    self.asked_at = Some(Instant::now());
                }
                self.send(sealed)
            }
            Effect::SetWill { topic, payload } => {
                self.will = Some(LastWill::new(topic, payload, QoS::AtLeastOnce, false));
            }
            Effect::Subscribe(t) => self.outbox.push_back(Op::Subscribe(t)),
            Effect::Unsubscribe(t) => self.outbox.push_back(Op::Unsubscribe(t)),
            Effect::Replay { before } => {
                // Everything not yet acknowledged goes again, oldest first; the control
                // plane de-duplicates by (device, seq).
                let replay: Vec<Op> = self
                    .spool
                    .range(..before)
                    .map(|(_, (t, p))| Op::Publish(t.clone(), p.clone()))
                    .collect();
                self.outbox.extend(replay);
            }
            Effect::SpoolAck(ranges) => self.ack(&ranges),
            Effect::ApplySettings(_) => {
                let default = self.shared.cfg.telemetry_interval.as_millis() as u64;
                let ms = self.machine.telemetry_interval_ms(default);
                self.telemetry_interval = Duration::from_millis(ms);
                self.telemetry_due = Instant::now() + self.telemetry_interval;
            }
            Effect::OpenDownload {
                manifest_digest,
                manifest,
            } => return Some(self.open_download(manifest_digest, manifest)),
            Effect::WriteChunk {
                manifest_digest,
                index,
                data,
            } => return Some(self.write_chunk(manifest_digest, index, &data)),
            Effect::FinishDownload { manifest_digest } => {
                self.downloaded_at.get_or_insert_with(Instant::now);
                return Some(self.finish_download(manifest_digest));
            }
            Effect::CloseDownload { manifest_digest } => {
                self.download.remove(&manifest_digest);
            }
            Effect::Load {
                model,
                manifest,
                self_test,
            } => return Some(self.load(model, manifest, self_test)),
            Effect::ServeLoaded { model } => {
                let l = self.loaded.take();
                self.serve(model, l);
            }
            Effect::ShadowLoaded { model } => {
                if let Some(l) = self.loaded.take() {
                    self.shadow.insert(model, l);
                }
            }
            Effect::PromoteShadow { model } => {
                let s = self.shadow.remove(&model);
                self.serve(model, s);
            }
            Effect::DropShadow { model } => {
                self.shadow.remove(&model);
            }
            Effect::Unload { model } => {
                self.active.remove(&model);
                self.shadow.remove(&model);
                self.probation_counts.remove(&model);
                self.win.remove(&model);
                self.publish_active();
            }
            Effect::Event(e) => self.count(e),
        }
        None
    }

    /// Durable frames stay in the spool until acknowledged; the others only matter now.
    fn send(&mut self, s: Sealed) {
        if s.durable {
            self.spool
                .insert(s.seq, (s.topic.clone(), s.payload.clone()));
            self.shared.stats.durable_sent.fetch_add(1, Relaxed);
            self.publish_unacked();
        }
        if s.publish {
            self.outbox.push_back(Op::Publish(s.topic, s.payload));
        }
    }

    fn ack(&mut self, ranges: &[(u64, u64)]) {
        let mut removed = 0u64;
        for (a, b) in ranges {
            if a > b {
                continue;
            }
            let keys: Vec<u64> = self.spool.range(a..=b).map(|(k, _)| *k).collect();
            for k in keys {
                self.spool.remove(&k);
                removed += 1;
            }
        }
        self.shared.stats.durable_acked.fetch_add(removed, Relaxed);
        self.publish_unacked();
    }

    fn publish_unacked(&self) {
        if let Some(u) = self.shared.unacked.get(self.ident.index) {
            u.store(self.spool.len() as u64, Relaxed);
        }
    }

    fn open_download(&mut self, digest: Digest, manifest: Manifest) -> Input {
        self.download.remove(&digest);
        if self.store.contains(&manifest.sha256) {
            return Input::Opened {
                manifest_digest: digest,
                stored: Stored::Blob,
            };
        }
        let bytes = self.shared.chunks.model(digest, &manifest);
        let n = manifest.chunk_count() as usize;
        self.download.insert(
            digest,
            Download {
                manifest: Arc::new(manifest),
                bytes,
            },
        );
        Input::Opened {
            manifest_digest: digest,
            stored: Stored::Chunks(vec![false; n]),
        }
    }

    fn write_chunk(&mut self, digest: Digest, index: u32, data: &[u8]) -> Input {
        match self.download.get(&digest) {
            Some(d) => {
                self.shared.stats.chunks_verified.fetch_add(1, Relaxed);
                d.bytes.keep(index, data);
                Input::ChunkWritten {
                    manifest_digest: digest,
                    index,
                }
            }
            _ => Input::ChunkWriteFailed {
                manifest_digest: digest,
                index,
                error: "no download open for this model".into(),
            },
        }
    }

    fn finish_download(&mut self, digest: Digest) -> Input {
        let finished = match self.download.remove(&digest) {
            Some(d) => d.bytes.file(&d.manifest).map(|_| d.manifest),
            None => Err("no download open for this model".into()),
        };
        match finished {
            Ok(m) => {
                self.store.insert(m.sha256);
                Input::BlobReady {
                    manifest_digest: digest,
                }
            }
            Err(error) => Input::BlobFailed {
                manifest_digest: digest,
                error,
            },
        }
    }

    /// Loads a model: a real tract load (and self-test) on tract devices.
    fn load(&mut self, model: ModelRef, manifest: Manifest, self_test: bool) -> Input {
        let digest = model.digest;
        let tract = if self.ident.index < self.shared.cfg.tract_devices {
            let file = self.shared.chunks.model(digest, &manifest).file(&manifest);
            let loaded = file.and_then(|f| {
                let m = drover_runtime::compiled::load_artifact(
                    &f,
                    manifest.artifact.as_ref(),
                    drover_runtime::Threads::One,
                )
                .map_err(|e| e.to_string())?;
                if self_test {
                    drover_runtime::self_test(&m, &manifest.test_vectors)
                        .map_err(|e| e.to_string())?;
                    drover_runtime::self_test_sampled(&m, &manifest.sampled_vectors)
                        .map_err(|e| e.to_string())?;
                }
                Ok(m)
            });
            match loaded {
                Ok(m) => Some(Arc::new(m)),
                Err(error) => {
                    return Input::LoadFailed {
                        model: digest,
                        error,
                    }
                }
            }
        } else {
            None
        };
        self.loaded = Some(SimModel {
            model,
            manifest: Arc::new(manifest),
            tract,
        });
        Input::Loaded { model: digest }
    }

    /// A new active model in slot `name`: its probation counts start again (as
    /// `Serving::swap_active`).
    fn serve(&mut self, name: String, m: Option<SimModel>) {
        if let Some(m) = m {
            self.active.insert(name.clone(), m);
            self.probation_counts.insert(name, (0, 0));
        }
    }

    fn publish_active(&self) {
        let active: BTreeMap<String, (String, bool)> = self
            .machine
            .state()
            .models
            .iter()
            .filter_map(|(name, s)| {
                let a = s.active.as_ref()?;
                Some((
                    name.clone(),
                    (
                        format!("{}@{}", a.model.name, a.model.version),
                        a.state == SlotState::Healthy,
                    ),
                ))
            })
            .collect();
        if let Ok(mut v) = self.shared.active.lock() {
            if let Some(slot) = v.get_mut(self.ident.index) {
                *slot = active;
            }
        }
    }

    fn count(&mut self, e: Event) {
        let s = &self.shared.stats;
        match e {
            Event::CommandRefused(_) | Event::DownlinkRefused { .. } => {
                s.commands_refused.fetch_add(1, Relaxed);
            }
            Event::Progress {
                command_seq,
                phase: Phase::Received,
                ..
            } => {
                s.commands_accepted.fetch_add(1, Relaxed);
                self.accepted = Some((command_seq, Instant::now()));
                self.asked_at = None;
                self.first_chunk_at = None;
                self.downloaded_at = None;
            }
            Event::ChunkRefused { .. } => {
                s.chunks_refused.fetch_add(1, Relaxed);
            }
            Event::InstallFailed { .. } => {
                s.install_failures.fetch_add(1, Relaxed);
            }
            Event::Installed { command_seq, mode } => {
                s.installs.fetch_add(1, Relaxed);
                match self.accepted {
                    Some((seq, at)) if seq == command_seq && mode == DeployMode::Activate => {
                        let now = Instant::now();
                        let ms = now.duration_since(at).as_millis() as u64;
                        // Phases a device skipped (a model it already held) count as 0.
                        let asked = self.asked_at.unwrap_or(at);
                        let first = self.first_chunk_at.unwrap_or(asked).max(asked);
                        let done = self.downloaded_at.unwrap_or(first).max(first);
                        let span = |a: Instant, b: Instant| b.duration_since(a).as_millis() as u64;
                        let times = InstallTimes {
                            accepted: at,
                            total_ms: ms,
                            ask_ms: span(at, asked),
                            first_chunk_ms: span(asked, first),
                            download_ms: span(first, done),
                            install_ms: span(done, now),
                        };
                        if let Ok(mut v) = self.shared.command_to_active_ms.lock() {
                            v.push(ms);
                        }
                        if let Ok(mut v) = self.shared.command_to_active.lock() {
                            v.push(times);
                        }
                    }
                    _ => {}
                }
            }
            Event::ProbationFailed { .. } => {
                s.self_rollbacks.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }
}
