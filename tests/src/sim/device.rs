//! One virtual device: its MQTT session, trust store, command floor, A/B slots (in
//! memory), download state and modelled inference, in one task.
//!
//! It follows the agent's core (`drover_agent::core`) step by step: Hello and Status on
//! every connect, durable frames spooled until an `UplinkAck` and replayed after a
//! reconnect, commands verified against the sequence floor (a redelivery of the last
//! accepted command ignored), deploy → download (chunks requested `CHUNK_BATCH` at a time,
//! retried after `CHUNK_RETRY`, each verified) → verified → self-tested → active →
//! probation → healthy or rolled back, shadow deploys, promote and rollback.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_agent::machine::{probation_passed, CHUNK_BATCH, CHUNK_RETRY_MS};
use drover_host::clock::now_ms;
use drover_protocol::envelope::{self, UplinkFrame};
use drover_protocol::manifest::{Dim, Manifest};
use drover_protocol::messages::{
    Action, ChunkRequest, DeployMode, Downlink, DriftReport, Hello, KeyringRefused,
    LatencyHistogram, ModelRef, Phase, Presence, Progress, ShadowReport, Status, SystemFacts,
    TelemetryBatch, Uplink,
};
use drover_protocol::topics::{self, ParsedTopic};
use drover_protocol::trust::{verify_chunk, Digest, SignedBlob, TrustError, TrustStore};
use drover_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use super::model::{drift_sketches, sample_latency_us, ModelBytes};
use super::{Identity, Shared};

/// How often a device advances its clock-driven work (inference, probation, retries).
const TICK: Duration = Duration::from_millis(200);
/// At most one KeyringRefused report per this interval (as the agent).
const KEYRING_REFUSAL_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Slot {
    model: ModelRef,
    manifest: Arc<Manifest>,
    healthy: bool,
    /// The real tract model, on devices that run tract.
    tract: Option<Arc<drover_runtime::Model>>,
}

struct Job {
    seq: u64,
    digest: Digest,
    model: ModelRef,
    manifest: Arc<Manifest>,
    blob: SignedBlob,
    mode: DeployMode,
    have: Vec<bool>,
    done: u32,
    requested: BTreeSet<u32>,
    last_request: Option<Instant>,
    subscribed_at: Instant,
    last_reported: u32,
    bytes: Arc<ModelBytes>,
    accepted_at: Instant,
}

enum Op {
    Publish(String, Vec<u8>),
    Subscribe(String),
    Unsubscribe(String),
}

#[derive(Default)]
struct Window {
    inferences: u64,
    errors: u64,
    latency: LatencyHistogram,
    outputs: Vec<u64>,
    /// Shadow comparison on the same inputs.
    compared: u64,
    agreed: u64,
    candidate_errors: u64,
    active_latency: LatencyHistogram,
    candidate_latency: LatencyHistogram,
}

pub struct Device {
    ident: Identity,
    shared: Arc<Shared>,
    rng: rand::rngs::StdRng,
    trust: TrustStore,
    last_command_seq: u64,
    last_command_digest: Option<Digest>,
    active: Option<Slot>,
    previous: Option<Slot>,
    shadow: Option<Slot>,
    /// Models whose verified file this device holds (its blob store).
    store: BTreeSet<Digest>,
    job: Option<Job>,
    probation: Option<(Instant, Option<(u64, Digest)>)>,
    probation_counts: (u64, u64),
    next_seq: u64,
    spool: BTreeMap<u64, (String, Vec<u8>)>,
    outbox: VecDeque<Op>,
    connected: bool,
    last_keyring_refusal: Option<Instant>,
    telemetry_interval: Duration,
    telemetry_due: Instant,
    window_start_ms: u64,
    win: Window,
    pending_inferences: f64,
    last_served: Instant,
    started: Instant,
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
        Ok(Device {
            ident,
            shared,
            rng,
            trust,
            last_command_seq: 0,
            last_command_digest: None,
            active: None,
            previous: None,
            shadow: None,
            store: BTreeSet::new(),
            job: None,
            probation: None,
            probation_counts: (0, 0),
            next_seq: 1,
            spool: BTreeMap::new(),
            outbox: VecDeque::new(),
            connected: false,
            last_keyring_refusal: None,
            telemetry_interval: interval,
            telemetry_due: Instant::now() + first,
            window_start_ms: now_ms(),
            win: Window::default(),
            pending_inferences: 0.0,
            last_served: Instant::now(),
            started: Instant::now(),
        })
    }

    fn seal(&mut self, msg: Uplink) -> (u64, String, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let topic = topics::uplink(&self.ident.id, msg.kind());
        let frame = UplinkFrame {
            device: self.ident.id.clone(),
            seq,
            sent_at_ms: now_ms(),
            msg,
        };
        (seq, topic, envelope::seal_uplink(&self.ident.key, &frame))
    }

    /// Durable frames are spooled until acknowledged; the others only matter now.
    fn send(&mut self, msg: Uplink, durable: bool) {
        let telemetry = matches!(msg, Uplink::Telemetry(_));
        let (seq, topic, payload) = self.seal(msg);
        if telemetry {
            self.shared.stats.telemetry_sent.fetch_add(1, Relaxed);
        }
        if durable {
            self.spool.insert(seq, (topic.clone(), payload.clone()));
            self.shared.stats.durable_sent.fetch_add(1, Relaxed);
            self.publish_unacked();
        }
        if self.connected {
            self.outbox.push_back(Op::Publish(topic, payload));
        }
    }

    fn publish_unacked(&self) {
        if let Some(u) = self.shared.unacked.get(self.ident.index) {
            u.store(self.spool.len() as u64, Relaxed);
        }
    }

    fn will(&mut self) -> LastWill {
        let st = Uplink::Status(self.status(Presence::Offline));
        let (_, topic, payload) = self.seal(st);
        LastWill::new(topic, payload, QoS::AtLeastOnce, false)
    }

    fn status(&self, presence: Presence) -> Status {
        Status {
            presence,
            active: self.active.as_ref().map(|s| s.model.clone()),
            staged: self.job.as_ref().map(|j| j.model.clone()),
            shadow: self.shadow.as_ref().map(|s| s.model.clone()),
            uptime_s: self.started.elapsed().as_secs(),
        }
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
            .set_inflight(64)
            .set_last_will(self.will());
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
                                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                    attempt = 0;
                                    self.on_connected();
                                }
                                Ok(Event::Incoming(Packet::Publish(p))) => {
                                    self.on_message(&p.topic, &p.payload);
                                }
                                Ok(Event::Incoming(Packet::SubAck(_))) => self.on_suback(),
                                Ok(_) => {}
                                Err(_) => {
                                    self.connected = false;
                                    let delay = drover_agent::mqtt::backoff(attempt, self.rng.gen());
                                    attempt = attempt.saturating_add(1);
                                    retry_at = Some(tokio::time::Instant::now() + delay);
                                    el.mqtt_options.set_last_will(self.will());
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
                    self.connected = false;
                    self.outbox.clear();
                    back_at = Some(Instant::now() + cfg.churn_downtime);
                    self.shared.stats.churn_drops.fetch_add(1, Relaxed);
                }
            }
        }
        // Clean shutdown, as the agent: say offline, disconnect, let the frames go out.
        if let Some((client, mut el)) = session {
            if self.connected {
                let st = Uplink::Status(self.status(Presence::Offline));
                self.send(st, false);
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
        self.connected = true;
        self.shared.stats.connects.fetch_add(1, Relaxed);
        self.outbox.clear();
        self.outbox
            .push_back(Op::Subscribe(topics::downlink(&self.ident.id)));
        self.outbox.push_back(Op::Subscribe(topics::keyring()));
        let labels = self
            .shared
            .cfg
            .groups
            .get(self.ident.group)
            .map(|g| g.labels.clone())
            .unwrap_or_default();
        let hello = Uplink::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_min: MIN_PROTOCOL_VERSION,
            protocol_max: PROTOCOL_VERSION,
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            labels,
            active: self.active.as_ref().map(|s| s.model.clone()),
            staged: self.job.as_ref().map(|j| j.model.clone()),
            last_command_seq: self.last_command_seq,
            keyring_version: self.trust.keyring().map(|k| k.version).unwrap_or(0),
        });
        self.send(hello, false);
        let st = Uplink::Status(self.status(Presence::Online));
        self.send(st, false);
        // Everything not yet acknowledged goes again, oldest first; the control plane
        // de-duplicates by (device, seq).
        let replay: Vec<Op> = self
            .spool
            .values()
            .map(|(t, p)| Op::Publish(t.clone(), p.clone()))
            .collect();
        self.outbox.extend(replay);
        if let Some(job) = &mut self.job {
            let digest = job.blob.digest();
            self.outbox
                .push_back(Op::Subscribe(topics::model_chunks(&digest)));
            job.last_request = None;
            job.subscribed_at = Instant::now();
        }
    }

    fn on_suback(&mut self) {
        if self.job.as_ref().is_some_and(|j| j.last_request.is_none()) {
            self.request_chunks();
        }
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        match topics::parse(topic) {
            Ok(ParsedTopic::Downlink { device }) if device == self.ident.id => {
                match envelope::open_downlink(payload, &self.ident.id, &self.ident.key) {
                    Ok(frame) => self.on_downlink(frame.msg),
                    Err(e) => {
                        tracing::warn!(device_id = %self.ident.id, error = %e, "downlink frame refused")
                    }
                }
            }
            Ok(ParsedTopic::Keyring) => match envelope::decode_keyring(payload) {
                Ok(blob) => self.on_keyring(blob),
                Err(e) => {
                    tracing::warn!(device_id = %self.ident.id, error = %e, "keyring frame refused")
                }
            },
            Ok(ParsedTopic::ModelChunks { manifest_digest }) => {
                self.shared.stats.chunks_received.fetch_add(1, Relaxed);
                self.shared
                    .stats
                    .chunk_bytes_received
                    .fetch_add(payload.len() as u64, Relaxed);
                match envelope::decode_chunk(payload) {
                    Ok(c) if c.manifest_digest == manifest_digest => {
                        self.on_chunk(manifest_digest, c.index, &c.data)
                    }
                    Ok(_) | Err(_) => {
                        self.shared.stats.chunks_refused.fetch_add(1, Relaxed);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_downlink(&mut self, msg: Downlink) {
        match msg {
            Downlink::HelloAck(_) => {}
            Downlink::UplinkAck(ack) => {
                let mut removed = 0u64;
                for (a, b) in ack.ranges {
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
            Downlink::Keyring(blob) => self.on_keyring(blob),
            Downlink::Command(blob) => self.on_command(blob),
        }
    }

    fn on_keyring(&mut self, blob: SignedBlob) {
        if let Err(e) = self.trust.accept_keyring(&blob, now_ms()) {
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
        let cmd =
            match self
                .trust
                .verify_command(&blob, &self.ident.id, self.last_command_seq, now_ms())
            {
                Ok(c) => c,
                Err(TrustError::Replayed { .. }) if self.last_command_digest == Some(digest) => {
                    return;
                }
                Err(e) => {
                    self.shared.stats.commands_refused.fetch_add(1, Relaxed);
                    self.progress(0, digest, None, Phase::Refused, 0, 0, Some(e.to_string()));
                    return;
                }
            };
        self.shared.stats.commands_accepted.fetch_add(1, Relaxed);
        let seq = cmd.seq;
        self.last_command_seq = seq;
        self.last_command_digest = Some(digest);
        self.progress(seq, digest, None, Phase::Received, 0, 0, None);
        match cmd.action {
            Action::Deploy { manifest, mode } => self.deploy(seq, digest, manifest, mode),
            Action::Rollback { to } => self.rollback(seq, digest, to),
            Action::Promote => self.promote(seq, digest),
            Action::Configure(s) => {
                self.telemetry_interval =
                    Duration::from_millis(s.telemetry_interval_ms.clamp(100, 86_400_000));
                self.telemetry_due = Instant::now() + self.telemetry_interval;
                self.progress(seq, digest, None, Phase::Done, 0, 0, None);
            }
        }
    }

    fn deploy(&mut self, seq: u64, digest: Digest, blob: SignedBlob, mode: DeployMode) {
        let manifest = match self.trust.verify_manifest(&blob, now_ms()) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                self.progress(seq, digest, None, Phase::Refused, 0, 0, Some(e.to_string()));
                return;
            }
        };
        let mdigest = blob.digest();
        let model = ModelRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: mdigest,
        };
        if mode == DeployMode::Activate && self.active.as_ref().map(|a| &a.model) == Some(&model) {
            self.progress(
                seq,
                digest,
                Some(model),
                Phase::Healthy,
                0,
                0,
                Some("already active".into()),
            );
            return;
        }
        self.cancel_job(seq);
        let total = manifest.chunk_count();
        let bytes = self.shared.chunks.model(mdigest, &manifest);
        self.job = Some(Job {
            seq,
            digest,
            model: model.clone(),
            manifest: manifest.clone(),
            blob,
            mode,
            have: vec![false; total as usize],
            done: 0,
            requested: BTreeSet::new(),
            last_request: None,
            subscribed_at: Instant::now(),
            last_reported: 0,
            bytes,
            accepted_at: Instant::now(),
        });
        if self.store.contains(&manifest.sha256) {
            self.install();
            return;
        }
        self.progress(seq, digest, Some(model), Phase::Downloading, 0, total, None);
        if self.connected {
            self.outbox
                .push_back(Op::Subscribe(topics::model_chunks(&mdigest)));
        }
    }

    /// A later command overrides an in-flight download.
    fn cancel_job(&mut self, by_seq: u64) {
        if let Some(old) = self.job.take() {
            self.outbox
                .push_back(Op::Unsubscribe(topics::model_chunks(&old.blob.digest())));
            self.progress(
                old.seq,
                old.digest,
                Some(old.model),
                Phase::Failed,
                0,
                0,
                Some(format!("superseded by command {by_seq}")),
            );
        }
    }

    fn request_chunks(&mut self) {
        if !self.connected {
            return;
        }
        let Some(job) = &mut self.job else { return };
        let missing: Vec<u32> = (0..job.have.len() as u32)
            .filter(|i| !job.have[*i as usize])
            .take(CHUNK_BATCH)
            .collect();
        if missing.is_empty() {
            return;
        }
        job.requested = missing.iter().copied().collect();
        job.last_request = Some(Instant::now());
        let req = Uplink::ChunkRequest(ChunkRequest {
            manifest_digest: job.blob.digest(),
            indices: missing,
        });
        self.send(req, false);
    }

    fn on_chunk(&mut self, mdigest: Digest, index: u32, data: &[u8]) {
        let Some(job) = &mut self.job else { return };
        if job.blob.digest() != mdigest || job.have.get(index as usize) != Some(&false) {
            return;
        }
        if verify_chunk(&job.manifest, index, data).is_err() {
            // Dropped and asked for again, as on the agent.
            self.shared.stats.chunks_refused.fetch_add(1, Relaxed);
            return;
        }
        self.shared.stats.chunks_verified.fetch_add(1, Relaxed);
        job.bytes.keep(index, data);
        job.have[index as usize] = true;
        job.done += 1;
        job.requested.remove(&index);
        let total = job.have.len() as u32;
        let (done, complete) = (job.done, job.done == total);
        let report = done == total || done >= job.last_reported + (total / 4).max(1);
        let batch_done = job.requested.is_empty();
        let (seq, digest, model) = (job.seq, job.digest, job.model.clone());
        if report {
            job.last_reported = done;
            self.progress(
                seq,
                digest,
                Some(model),
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

    fn fail_job(&mut self, job: Job, detail: String) {
        self.shared.stats.install_failures.fetch_add(1, Relaxed);
        self.progress(
            job.seq,
            job.digest,
            Some(job.model),
            Phase::Failed,
            0,
            0,
            Some(detail),
        );
    }

    /// Verified file → self-test (real, on tract devices) → activate or shadow.
    fn install(&mut self) {
        let Some(job) = self.job.take() else { return };
        self.outbox
            .push_back(Op::Unsubscribe(topics::model_chunks(&job.blob.digest())));
        let total = job.manifest.chunk_count();
        let file = match job.bytes.file(&job.manifest) {
            Ok(f) => f,
            Err(e) => return self.fail_job(job, e),
        };
        self.store.insert(job.manifest.sha256);
        let (seq, digest, model) = (job.seq, job.digest, job.model.clone());
        self.progress(
            seq,
            digest,
            Some(model.clone()),
            Phase::Verified,
            total,
            total,
            None,
        );
        let tract = if self.ident.index < self.shared.cfg.tract_devices {
            let loaded = drover_runtime::Model::load(&file)
                .and_then(|m| drover_runtime::self_test(&m, &job.manifest.test_vectors).map(|_| m));
            match loaded {
                Ok(m) => Some(Arc::new(m)),
                Err(e) => return self.fail_job(job, format!("self-test failed: {e}")),
            }
        } else {
            None
        };
        self.progress(
            seq,
            digest,
            Some(model.clone()),
            Phase::SelfTested,
            total,
            total,
            None,
        );
        let slot = Slot {
            model: model.clone(),
            manifest: job.manifest.clone(),
            healthy: false,
            tract,
        };
        match job.mode {
            DeployMode::Activate => {
                self.record_command_to_active(job.accepted_at);
                self.activate(slot, Some((seq, digest)));
            }
            DeployMode::Shadow => {
                self.shadow = Some(slot);
                self.progress(
                    seq,
                    digest,
                    Some(model),
                    Phase::Shadowing,
                    total,
                    total,
                    None,
                );
            }
        }
        self.shared.stats.installs.fetch_add(1, Relaxed);
    }

    fn record_command_to_active(&self, since: Instant) {
        if let Ok(mut v) = self.shared.command_to_active_ms.lock() {
            v.push(since.elapsed().as_millis() as u64);
        }
    }

    fn publish_active(&self) {
        if let Ok(mut v) = self.shared.active.lock() {
            if let Some(slot) = v.get_mut(self.ident.index) {
                *slot = self
                    .active
                    .as_ref()
                    .map(|a| (format!("{}@{}", a.model.name, a.model.version), a.healthy));
            }
        }
    }

    fn activate(&mut self, slot: Slot, cmd: Option<(u64, Digest)>) {
        let model = slot.model.clone();
        if let Some(old) = self.active.take() {
            if old.healthy {
                self.previous = Some(old);
            }
        }
        self.active = Some(slot);
        self.publish_active();
        if let Some((seq, digest)) = cmd {
            self.progress(seq, digest, Some(model), Phase::Active, 0, 0, None);
        }
        self.probation = Some((
            Instant::now() + drover_agent::Tuning::default().probation,
            cmd,
        ));
        self.probation_counts = (0, 0);
    }

    fn end_probation(&mut self, cmd: Option<(u64, Digest)>) {
        let (errors, ok) = self.probation_counts;
        let Some(active) = self.active.clone() else {
            return;
        };
        if probation_passed(errors, ok) {
            if let Some(a) = &mut self.active {
                a.healthy = true;
            }
            self.publish_active();
            if let Some((seq, digest)) = cmd {
                self.progress(seq, digest, Some(active.model), Phase::Healthy, 0, 0, None);
            }
        } else {
            self.shared.stats.self_rollbacks.fetch_add(1, Relaxed);
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
    ) {
        let Some(prev) = self.previous.take() else {
            self.progress(
                seq,
                digest,
                None,
                Phase::Failed,
                0,
                0,
                Some("no previous model to roll back to".into()),
            );
            return;
        };
        let mut bad = self.active.take();
        if let Some(b) = &mut bad {
            b.healthy = false;
        }
        let model = prev.model.clone();
        self.active = Some(prev);
        self.previous = bad;
        self.probation = None;
        self.publish_active();
        self.progress(seq, digest, Some(model), phase, 0, 0, detail);
    }

    fn rollback(&mut self, seq: u64, digest: Digest, to: Option<ModelRef>) {
        self.cancel_job(seq);
        if let Some(to) = &to {
            if self.active.as_ref().map(|a| &a.model) == Some(to) {
                self.probation = None;
                self.progress(seq, digest, Some(to.clone()), Phase::Done, 0, 0, None);
                return;
            }
            if self.previous.as_ref().map(|p| &p.model) != Some(to) {
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
        let Some(mut slot) = self.shadow.take() else {
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
        slot.healthy = false;
        self.activate(slot, Some((seq, digest)));
    }

    fn is_bad(&self, m: &ModelRef) -> bool {
        let name = format!("{}@{}", m.name, m.version);
        self.shared.cfg.bad_models.contains(&name)
    }

    /// (error rate, median latency) of a model on this device.
    fn behaviour(&self, m: &ModelRef) -> (f64, f64) {
        let cfg = &self.shared.cfg;
        let g = cfg
            .groups
            .get(self.ident.group)
            .cloned()
            .unwrap_or_default();
        if self.is_bad(m) {
            (
                cfg.bad_error_rate.max(g.error_rate),
                g.latency_p50_us as f64 * cfg.bad_latency_factor,
            )
        } else {
            (g.error_rate, g.latency_p50_us as f64)
        }
    }

    /// One inference on `slot`: real tract on tract devices, modelled otherwise.
    /// Returns (error, latency µs, predicted class).
    fn infer(&mut self, slot: &Slot) -> (bool, u64, usize) {
        let (err_rate, p50) = self.behaviour(&slot.model);
        let classes = slot
            .manifest
            .outputs
            .first()
            .and_then(|o| o.shape.last())
            .and_then(|d| match d {
                Dim::Fixed(n) => Some(*n as usize),
                Dim::Symbolic(_) => None,
            })
            .unwrap_or(2)
            .clamp(1, 1024);
        if let (Some(model), Some(tv)) = (&slot.tract, slot.manifest.test_vectors.first()) {
            let t0 = Instant::now();
            let out = model.run(&tv.inputs);
            let us = t0.elapsed().as_micros() as u64;
            self.shared.stats.tract_inferences.fetch_add(1, Relaxed);
            let class = out
                .ok()
                .and_then(|o| o.into_iter().next())
                .and_then(|t| match t.data {
                    drover_protocol::manifest::TensorData::F32(v) => v
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i),
                    _ => None,
                });
            let err = class.is_none() || self.rng.gen_bool(err_rate.clamp(0.0, 1.0));
            return (err, us.max(1), class.unwrap_or(0) % classes);
        }
        let err = self.rng.gen_bool(err_rate.clamp(0.0, 1.0));
        (
            err,
            sample_latency_us(&mut self.rng, p50),
            self.rng.gen_range(0..classes),
        )
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
            Some(j) => match j.last_request {
                Some(t) => now.duration_since(t) >= Duration::from_millis(CHUNK_RETRY_MS),
                None => now.duration_since(j.subscribed_at) >= Duration::from_secs(1),
            },
            None => false,
        };
        if retry {
            self.request_chunks();
        }
        if self.shared.quiet.load(Relaxed) {
            return;
        }
        self.serve_traffic();
        if now >= self.telemetry_due {
            self.telemetry_due = now + self.telemetry_interval;
            self.emit_window();
        }
    }

    /// The inferences apps asked for since the last tick.
    fn serve_traffic(&mut self) {
        let Some(active) = self.active.clone() else {
            self.last_served = Instant::now();
            return;
        };
        // Requests arrive with wall time, not with ticks: a device whose task ran late
        // (a busy simulator) serves everything that arrived meanwhile.
        let now = Instant::now();
        let elapsed = now.duration_since(std::mem::replace(&mut self.last_served, now));
        self.pending_inferences += self.shared.cfg.inference_rate * elapsed.as_secs_f64();
        let n = self.pending_inferences.floor() as u64;
        self.pending_inferences -= n as f64;
        let shadow = self.shadow.clone();
        for _ in 0..n {
            let (err, us, class) = self.infer(&active);
            self.win.inferences += 1;
            self.win.latency.record(us);
            if err {
                self.win.errors += 1;
                self.probation_counts.0 += 1;
            } else {
                self.probation_counts.1 += 1;
            }
            if self.win.outputs.len() <= class {
                self.win.outputs.resize(class + 1, 0);
            }
            self.win.outputs[class] += 1;
            if let Some(s) = &shadow {
                let (cerr, cus, cclass) = self.infer(s);
                self.win.compared += 1;
                self.win.active_latency.record(us);
                self.win.candidate_latency.record(cus);
                if cerr {
                    self.win.candidate_errors += 1;
                }
                // Modelled classes are independent draws; agreement follows the
                // candidate's health instead (a bad candidate disagrees when it errs).
                if !cerr && (s.tract.is_some() || !self.is_bad(&s.model) || cclass == class) {
                    self.win.agreed += 1;
                }
            }
        }
        self.shared.stats.inferences.fetch_add(n, Relaxed);
    }

    fn emit_window(&mut self) {
        let end = now_ms();
        let start = std::mem::replace(&mut self.window_start_ms, end);
        let w = std::mem::take(&mut self.win);
        let active = self.active.clone();
        let facts = SystemFacts {
            cpu_percent: self.rng.gen_range(5.0..25.0),
            mem_used_bytes: 300 << 20,
            mem_total_bytes: 1 << 30,
            agent_rss_bytes: 18 << 20,
            temperature_c: Some(self.rng.gen_range(40.0..60.0)),
            disk_free_bytes: 4 << 30,
            disk_total_bytes: 8 << 30,
        };
        self.send(
            Uplink::Telemetry(TelemetryBatch {
                window_start_ms: start,
                window_end_ms: end,
                model: active.as_ref().map(|a| a.model.clone()),
                inferences: w.inferences,
                errors: w.errors,
                data_quality_errors: 0,
                latency: w.latency,
                outputs: w.outputs.clone(),
                system: facts,
                spool_dropped: 0,
            }),
            true,
        );
        if let Some(a) = &active {
            if let Some(b) = &a.manifest.baseline {
                if w.inferences > 0 {
                    let features = drift_sketches(b, w.inferences, self.shared.cfg.drift);
                    self.send(
                        Uplink::Drift(DriftReport {
                            model: a.model.clone(),
                            window_start_ms: start,
                            window_end_ms: end,
                            features,
                            predictions: w.outputs,
                        }),
                        true,
                    );
                }
            }
        }
        if let (Some(a), Some(s)) = (&active, &self.shadow) {
            if w.compared > 0 {
                let report = ShadowReport {
                    active: a.model.clone(),
                    candidate: s.model.clone(),
                    compared: w.compared,
                    agreed: w.agreed,
                    candidate_errors: w.candidate_errors,
                    active_latency: w.active_latency,
                    candidate_latency: w.candidate_latency,
                };
                self.send(Uplink::Shadow(report), true);
            }
        }
    }
}
