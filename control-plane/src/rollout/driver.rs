//! The async shell around the rollout engine.
//!
//! One task owns every open rollout's state in memory. Operator requests (start, pause,
//! resume, abort) arrive on a channel, so they never race a tick. Each tick builds the
//! observations from the store (incrementally: only rows received since the last tick are
//! read), runs [`engine::step`], writes the new state and the commands it issues in one
//! SQLite transaction, then publishes the commands. On start it reloads every open rollout,
//! so a restarted control plane resumes exactly where the last committed step left it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use drover_protocol::messages::{
    Action as WireAction, DeployMode, LatencyHistogram, ModelRef, Phase,
};
use drover_protocol::topics::parse_hex32;
use drover_protocol::DeviceId;
use tokio::sync::{mpsc, oneshot};

use super::engine::{
    self, Action, Candidate, DevState, DeviceObs, Event, Health, Observations, Op, RolloutState,
    ShadowObs,
};
use super::plan::{Plan, Selector};
use super::record;
use super::targets::{candidate_drift, held_by_older, holders, live_accuracy, preview_of, selects};
use super::waves::Preview;
use crate::app::App;
use crate::fleet;
use crate::store::{Db, DeviceRow, RolloutWrite, Store, StoreError};

/// Rows received up to this long before the last one read are read again (and skipped if
/// already seen), so a batch committed late is never missed.
const RESCAN_MS: u64 = 30_000;
/// How far before a rollout starts the previous model's telemetry is its baseline.
const BASELINE_MS: u64 = 15 * 60_000;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Plan(#[from] super::plan::PlanError),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rollout {0} not found")]
    NotFound(u64),
    #[error(transparent)]
    Refused(#[from] engine::OpRefused),
    #[error("corrupt rollout state in the store: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
    #[error("the rollout driver is not running")]
    Stopped,
    /// The plan would target no device (none matches, or every match is held).
    #[error("{0}")]
    NoTargets(String),
    /// An open rollout of the same model holds some of the devices.
    #[error("{0}")]
    Conflict(String),
    /// Some target devices could not load the model's file (`fleet::check_runtime`).
    #[error("{0}")]
    CannotLoad(String),
}

enum Msg {
    Start {
        plan: Box<Plan>,
        by: String,
        reply: oneshot::Sender<Result<RolloutState, RolloutError>>,
    },
    Operate {
        id: u64,
        op: Op,
        by: String,
        reply: oneshot::Sender<Result<RolloutState, RolloutError>>,
    },
    Preview {
        plan: Box<Plan>,
        reply: oneshot::Sender<Result<Preview, RolloutError>>,
    },
    /// Which open rollout of a model holds a device, if any.
    Holder {
        device: String,
        model: String,
        reply: oneshot::Sender<Option<u64>>,
    },
}

/// The API's handle on the driver.
#[derive(Clone, Debug)]
pub struct RolloutHandle {
    tx: mpsc::Sender<Msg>,
}

/// A handle that does not keep the driver alive (for long-lived owners such as the
/// continuous-training engine, so shutdown is not held up by them).
#[derive(Clone, Debug)]
pub struct WeakRolloutHandle {
    tx: mpsc::WeakSender<Msg>,
}

impl WeakRolloutHandle {
    pub fn upgrade(&self) -> Option<RolloutHandle> {
        self.tx.upgrade().map(|tx| RolloutHandle { tx })
    }
}

impl RolloutHandle {
    pub fn downgrade(&self) -> WeakRolloutHandle {
        WeakRolloutHandle {
            tx: self.tx.downgrade(),
        }
    }

    pub async fn start(&self, plan: Plan, by: &str) -> Result<RolloutState, RolloutError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Start {
                plan: Box::new(plan),
                by: by.to_owned(),
                reply,
            })
            .await
            .map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)?
    }

    /// What `plan` would target now, without starting it.
    pub async fn preview(&self, plan: Plan) -> Result<Preview, RolloutError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Preview {
            plan: Box::new(plan),
            reply,
        };
        self.tx.send(msg).await.map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)?
    }

    /// The open rollout (running, paused or rolling back) of model `model` (a name) that
    /// holds `device`, if any.
    pub async fn holder(&self, device: &str, model: &str) -> Result<Option<u64>, RolloutError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Holder {
            device: device.to_owned(),
            model: model.to_owned(),
            reply,
        };
        self.tx.send(msg).await.map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)
    }

    pub async fn operate(&self, id: u64, op: Op, by: &str) -> Result<RolloutState, RolloutError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Operate {
                id,
                op,
                by: by.to_owned(),
                reply,
            })
            .await
            .map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)?
    }
}

/// Reads a rollout's committed state (for the API's read paths).
pub fn load(store: &Store, id: u64) -> Result<Option<RolloutState>, RolloutError> {
    let Some((header, slots)) = store.rollout(id)? else {
        return Ok(None);
    };
    Ok(Some(record::load(&header, slots)?))
}

/// Every rollout's header (devices omitted), newest first.
pub fn list(store: &Store) -> Result<Vec<RolloutState>, RolloutError> {
    store
        .rollouts()?
        .iter()
        .map(|h| Ok(record::load_header(h)?))
        .collect()
}

/// A rollout's report events, oldest first.
pub fn events(store: &Store, id: u64) -> Result<Vec<Event>, RolloutError> {
    store
        .rollout_events(id)?
        .iter()
        .map(|e| Ok(record::load_event(e)?))
        .collect()
}

/// Rows of a growing table read incrementally: each tick reads from a little before the
/// newest row seen, skipping rows already applied.
#[derive(Default)]
struct Cursor {
    newest_ms: u64,
    seen: HashMap<(String, u64), u64>,
}

impl Cursor {
    fn read_from_ms(&self, floor: u64) -> u64 {
        self.newest_ms.saturating_sub(RESCAN_MS).max(floor)
    }

    /// True the first time a row is offered.
    fn fresh(&mut self, device: &str, seq: u64, at_ms: u64) -> bool {
        if at_ms < self.newest_ms.saturating_sub(RESCAN_MS) {
            return false;
        }
        self.newest_ms = self.newest_ms.max(at_ms);
        self.seen.insert((device.to_owned(), seq), at_ms).is_none()
    }

    fn prune(&mut self) {
        let floor = self.newest_ms.saturating_sub(RESCAN_MS);
        self.seen.retain(|_, at| *at >= floor);
    }
}

/// What the driver has read about one rollout so far.
#[derive(Default)]
struct Seen {
    baseline: Option<HashMap<(String, String), Health>>,
    candidate: HashMap<String, Health>,
    candidate_cursor: Cursor,
    shadow: HashMap<String, ShadowObs>,
    shadow_cursor: Cursor,
    /// (device, command seq) → (uplink seq, phase, detail) of the latest report.
    progress: HashMap<(String, u64), (u64, Phase, Option<String>)>,
    progress_cursor: Cursor,
}

fn hist(counts: Vec<u64>, sum_us: u64) -> LatencyHistogram {
    LatencyHistogram { counts, sum_us }
}

impl Seen {
    /// Reads what was stored since the last tick: the pre-rollout baseline (once), the
    /// candidate's health, shadow reports and command progress.
    fn read_new_rows(&mut self, s: &Store, digest: &str, created: u64) -> Result<(), RolloutError> {
        if self.baseline.is_none() {
            let mut b: HashMap<(String, String), Health> = HashMap::new();
            for row in s.health_between(created.saturating_sub(BASELINE_MS), created)? {
                b.entry((row.device, row.model_digest))
                    .or_default()
                    .merge(&Health {
                        inferences: row.inferences,
                        errors: row.errors,
                        latency: hist(row.latency_counts, row.latency_sum_us),
                    });
            }
            self.baseline = Some(b);
        }
        let from = self.candidate_cursor.read_from_ms(created);
        for row in s.model_health_since(digest, from)? {
            if self
                .candidate_cursor
                .fresh(&row.device, row.seq, row.received_at_ms)
            {
                self.candidate
                    .entry(row.device)
                    .or_default()
                    .merge(&Health {
                        inferences: row.inferences,
                        errors: row.errors,
                        latency: hist(row.latency_counts, row.latency_sum_us),
                    });
            }
        }
        self.candidate_cursor.prune();
        self.read_shadow(s, digest, created)?;
        self.read_progress(s, created)
    }

    fn read_shadow(&mut self, s: &Store, digest: &str, created: u64) -> Result<(), RolloutError> {
        let from = self.shadow_cursor.read_from_ms(created);
        for row in s.shadow_since(digest, from)? {
            if self
                .shadow_cursor
                .fresh(&row.device, row.seq, row.received_at_ms)
            {
                let e = self.shadow.entry(row.device).or_default();
                e.compared = e.compared.saturating_add(row.compared);
                e.agreed = e.agreed.saturating_add(row.agreed);
                e.active_latency.merge(&hist(row.active_latency, 0));
                e.candidate_latency.merge(&hist(row.candidate_latency, 0));
            }
        }
        self.shadow_cursor.prune();
        Ok(())
    }

    fn read_progress(&mut self, s: &Store, created: u64) -> Result<(), RolloutError> {
        let from = self.progress_cursor.read_from_ms(created);
        for row in s.progress_since(from)? {
            if !self
                .progress_cursor
                .fresh(&row.device, row.seq, row.received_at_ms)
            {
                continue;
            }
            let Some(phase) = row.phase else { continue };
            let e = self
                .progress
                .entry((row.device, row.command_seq))
                .or_insert((0, phase, None));
            if row.seq >= e.0 {
                *e = (row.seq, phase, row.detail);
            }
        }
        self.progress_cursor.prune();
        Ok(())
    }
}

/// What the engine sees of each selected or assigned device.
fn observations(
    r: &RolloutState,
    devices: Vec<DeviceRow>,
    seen: &Seen,
    drift: &HashMap<String, f64>,
    held: &HashSet<String>,
) -> Observations {
    let selector = Selector::parse(&r.plan.selector).unwrap_or_default();
    let mut obs = Observations::default();
    for d in devices {
        let assigned = r.devices.get(&d.id);
        let selected = !held.contains(&d.id) && selects(&selector, &d);
        if !selected && assigned.is_none() {
            continue;
        }
        if selected {
            obs.selected.push(d.id.clone());
        }
        let progress = assigned
            .and_then(|a| a.command_seq)
            .and_then(|seq| seen.progress.get(&(d.id.clone(), seq)))
            .map(|(_, p, detail)| (*p, detail.clone()));
        let previous = assigned
            .and_then(|a| a.previous.clone())
            .or_else(|| d.active_digest.clone());
        let baseline = previous
            .and_then(|p| {
                seen.baseline
                    .as_ref()
                    .and_then(|b| b.get(&(d.id.clone(), p)).cloned())
            })
            .unwrap_or_default();
        obs.devices.insert(
            d.id.clone(),
            DeviceObs {
                online: d.online && !d.decommissioned,
                active: d.active_digest.clone(),
                progress,
                candidate: seen.candidate.get(&d.id).cloned().unwrap_or_default(),
                baseline,
                shadow: seen.shadow.get(&d.id).cloned().unwrap_or_default(),
                drift_psi: drift.get(&d.id).copied(),
                // Enrolled, or relabelled by an operator, after the start: a late joiner.
                joined_at_ms: d.enrolled_at_ms.max(d.labels_changed_at_ms.unwrap_or(0)),
            },
        );
    }
    obs
}

struct Driver {
    app: App,
    store: Db,
    rollouts: BTreeMap<u64, RolloutState>,
    seen: HashMap<u64, Seen>,
    /// (device, seq) → when it was last published.
    published: HashMap<(String, u64), u64>,
    /// A command an online device has not answered at all for this long is published
    /// again (same bytes, same sequence: a device that already has it refuses the
    /// replay). This covers a crash between committing a step and publishing it when
    /// devices stay connected to an external broker and so never say hello again.
    republish_ms: u64,
}

/// Starts the driver task; it stops when every handle is dropped.
pub fn spawn(app: App, store: Db) -> (RolloutHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let interval = app.settings.rollout_tick;
    let republish = app.settings.rollout_republish;
    let driver = Driver {
        app,
        store,
        rollouts: BTreeMap::new(),
        seen: HashMap::new(),
        published: HashMap::new(),
        republish_ms: u64::try_from(republish.as_millis()).unwrap_or(u64::MAX),
    };
    let task = tokio::spawn(driver.run(rx, interval));
    (RolloutHandle { tx }, task)
}

impl Driver {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&App, &mut Store) -> Result<T, RolloutError> + Send + 'static,
    ) -> Result<T, RolloutError> {
        let app = self.app.clone();
        self.store.run(move |s| f(&app, s)).await?
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, interval: Duration) {
        match self
            .blocking(|_, s| {
                let mut out = Vec::new();
                for id in s.open_rollouts()? {
                    out.extend(load(s, id)?);
                }
                Ok(out)
            })
            .await
        {
            Ok(open) => {
                for r in open {
                    tracing::info!(
                        rollout = r.id,
                        status = r.status.name(),
                        wave = r.wave + 1,
                        "resuming rollout"
                    );
                    self.rollouts.insert(r.id, r);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot load open rollouts; none will progress"),
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => return,
                    Some(Msg::Start { plan, by, reply }) => {
                        let r = self.start(*plan, &by).await;
                        let _ = reply.send(r);
                    }
                    Some(Msg::Operate { id, op, by, reply }) => {
                        let r = self.operate(id, op, &by).await;
                        let _ = reply.send(r);
                    }
                    Some(Msg::Preview { plan, reply }) => {
                        let _ = reply.send(self.preview(*plan).await);
                    }
                    Some(Msg::Holder { device, model, reply }) => {
                        let held = holders(self.rollouts.values(), &model);
                        let _ = reply.send(held.get(&device).copied());
                    }
                },
                _ = tick.tick() => self.tick_all().await,
            }
        }
    }

    async fn preview(&self, plan: Plan) -> Result<Preview, RolloutError> {
        plan.validate()?;
        let devices = self.blocking(|_, s| Ok(s.devices()?)).await?;
        let name = fleet::parse_model_ref(&plan.model)?.0.to_owned();
        Ok(preview_of(
            &plan,
            &devices,
            &holders(self.rollouts.values(), &name),
        ))
    }

    async fn start(&mut self, plan: Plan, by: &str) -> Result<RolloutState, RolloutError> {
        // Refuse a rollout that would touch nothing rather than "complete" it.
        let preview = self.preview(plan.clone()).await?;
        if let Some(why) = preview.conflict(&plan.model) {
            return Err(RolloutError::Conflict(why));
        }
        if let Some(why) = preview.refusal(&plan.selector) {
            return Err(RolloutError::NoTargets(why));
        }
        let by = by.to_owned();
        let now = self.app.clock.unix_ms();
        let state = self
            .blocking(move |_, s| {
                let model = fleet::find_model(s, &plan.model)?;
                fleet::check_deployable(&model)?;
                fleet::check_all_load(s, &preview.targets, &model)?
                    .map_or(Ok(()), |why| Err(RolloutError::CannotLoad(why)))?;
                let candidate = Candidate {
                    name: model.name.clone(),
                    version: model.version.clone(),
                    digest: drover_protocol::topics::hex32(&model.digest),
                };
                let mut state = None;
                let digest = candidate.digest.clone();
                s.create_rollout(&digest, &by, now, |id| {
                    let st = RolloutState::new(id, plan.clone(), candidate.clone(), now);
                    let header = record::header(&st);
                    state = Some(st);
                    header
                })?;
                let state = state.ok_or_else(|| RolloutError::Corrupt("no state".into()))?;
                let ev = Event {
                    at_ms: now,
                    kind: "started".into(),
                    detail: format!(
                        "{by} started a rollout of {}@{} to {:?} in {} waves",
                        state.candidate.name,
                        state.candidate.version,
                        state.plan.selector,
                        state.plan.waves.len()
                    ),
                    gates: Vec::new(),
                };
                write_step(s, &state, vec![ev], now)?;
                Ok(state)
            })
            .await?;
        tracing::info!(rollout = state.id, model = %state.plan.model, "rollout started");
        self.rollouts.insert(state.id, state.clone());
        // First step at once: the canary wave's commands go out now.
        self.tick(state.id).await;
        Ok(self.rollouts.get(&state.id).cloned().unwrap_or(state))
    }

    async fn operate(&mut self, id: u64, op: Op, by: &str) -> Result<RolloutState, RolloutError> {
        let current = match self.rollouts.get(&id) {
            Some(r) => r.clone(),
            None => self
                .blocking(move |_, s| load(s, id))
                .await?
                .ok_or(RolloutError::NotFound(id))?,
        };
        let step = engine::operate(&current, op, by, self.app.clock.unix_ms())?;
        tracing::info!(rollout = id, ?op, by, "operator request");
        let state = self.commit(&current, step).await?;
        self.rollouts.insert(id, state.clone());
        Ok(state)
    }

    async fn tick_all(&mut self) {
        let ids: Vec<u64> = self.rollouts.keys().copied().collect();
        for id in ids {
            self.tick(id).await;
        }
    }

    async fn tick(&mut self, id: u64) {
        let Some(current) = self.rollouts.get(&id).cloned() else {
            return;
        };
        let obs = match self.observe(&current).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(rollout = id, error = %e, "cannot read observations");
                return;
            }
        };
        self.republish_unanswered(&current, &obs).await;
        let step = engine::step(&current, &obs, self.app.clock.unix_ms());
        if step.state == current && step.actions.is_empty() && step.events.is_empty() {
            return;
        }
        // Persist only when something a reader would see changed.
        let unchanged = step.actions.is_empty()
            && step.events.is_empty()
            && step.state.devices == current.devices
            && step.state.status == current.status
            && step.state.gates == current.gates
            && step.state.waiting == current.waiting
            && step.state.stage == current.stage
            && step.state.wave == current.wave;
        if unchanged {
            return;
        }
        match self.commit(&current, step).await {
            Ok(s) => {
                let keep = s.status.is_active()
                    && !(s.status == engine::Status::Completed && pending(&s) == 0);
                if keep {
                    self.rollouts.insert(id, s);
                } else {
                    self.rollouts.remove(&id);
                    self.seen.remove(&id);
                }
            }
            Err(e) => tracing::error!(rollout = id, error = %e, "rollout step not applied"),
        }
    }

    /// Persists a step (state, events and the commands it issues, in one transaction) and
    /// publishes the commands.
    async fn commit(
        &self,
        before: &RolloutState,
        step: engine::Step,
    ) -> Result<RolloutState, RolloutError> {
        let now = self.app.clock.unix_ms();
        let before = before.clone();
        let engine::Step {
            state,
            actions,
            events,
        } = step;
        for e in &events {
            tracing::info!(rollout = state.id, kind = %e.kind, "{}", e.detail);
        }
        let (state, rows) = self
            .blocking(move |app, s| {
                let manifest = match fleet::find_model(s, &state.plan.model) {
                    Ok(m) => Some(fleet::manifest_blob(&m)),
                    Err(_) => None,
                };
                // Rollback targets by digest, resolved to names for the signed command.
                let mut to_refs: HashMap<String, Option<ModelRef>> = HashMap::new();
                for a in &actions {
                    if let Action::Rollback { to: Some(d), .. } = a {
                        let r = parse_hex32(d)
                            .and_then(|b| s.model_by_digest(&b).ok().flatten())
                            .map(|m| ModelRef {
                                name: m.name,
                                version: m.version,
                                digest: m.digest,
                            });
                        to_refs.insert(d.clone(), r);
                    }
                }
                let devices: Vec<String> = actions.iter().map(|a| a.device().to_owned()).collect();
                let by_device: HashMap<&str, &Action> =
                    actions.iter().map(|a| (a.device(), a)).collect();
                // Devices that negotiated protocol 2 get commands naming the slot.
                let mut named = HashSet::new();
                for d in &devices {
                    if s.device_protocol(d)? >= 2 {
                        named.insert(d.as_str());
                    }
                }
                let slot_name = state.candidate.name.clone();
                let mut state = state;
                let rollout_id = state.id;
                let model_name = state.plan.model.clone();
                let rows = s.apply_rollout_step(
                    rollout_id,
                    &devices,
                    |device, seq| {
                        let id = DeviceId::new(device)
                            .map_err(|e| RolloutError::Corrupt(e.to_string()))?;
                        let action = wire_action(
                            by_device.get(device).copied(),
                            manifest.as_ref(),
                            &to_refs,
                            named.contains(device).then_some(slot_name.as_str()),
                        )
                        .map_err(|e| match e {
                            RolloutError::Corrupt(m) if m.is_empty() => RolloutError::Corrupt(
                                format!("model {model_name} is no longer published"),
                            ),
                            e => e,
                        })?;
                        Ok::<_, RolloutError>(fleet::sign_command(
                            app,
                            &id,
                            seq,
                            now,
                            Some(rollout_id),
                            action,
                        ))
                    },
                    |seqs| {
                        for (device, seq) in seqs {
                            if let Some(slot) = state.devices.get_mut(device) {
                                slot.command_seq = Some(*seq);
                            }
                        }
                        write_of(&before, &state, events, now)
                    },
                )?;
                Ok((state, rows?))
            })
            .await?;
        if !rows.is_empty() {
            // Crash tests: the step is committed, its commands not yet published.
            drover_host::crash::point("rollout.after_commit");
        }
        for row in &rows {
            if let Ok(device) = DeviceId::new(row.device.clone()) {
                self.app.metrics.commands_issued.fetch_add(1, Relaxed);
                self.app
                    .outbox
                    .send_command(&device, fleet::command_blob(row))
                    .await;
            }
        }
        Ok(state)
    }

    async fn republish_unanswered(&mut self, r: &RolloutState, obs: &Observations) {
        let now = self.app.clock.unix_ms();
        let due: Vec<(String, u64)> = r
            .devices
            .iter()
            .filter(|(_, d)| {
                matches!(
                    d.state,
                    DevState::Deploying | DevState::Promoting | DevState::RollingBack
                )
            })
            .filter_map(|(id, d)| {
                let o = obs.devices.get(id)?;
                let seq = d.command_seq?;
                let since = self
                    .published
                    .get(&(id.clone(), seq))
                    .copied()
                    .or(d.commanded_at_ms)?;
                (o.online && o.progress.is_none() && now.saturating_sub(since) >= self.republish_ms)
                    .then(|| (id.clone(), seq))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let wanted = due.clone();
        let rows = self
            .blocking(move |_, s| {
                let mut out = Vec::new();
                for (device, seq) in &wanted {
                    out.extend(s.command(device, *seq)?);
                }
                Ok(out)
            })
            .await
            .unwrap_or_default();
        for row in rows {
            if let Ok(device) = DeviceId::new(row.device.clone()) {
                tracing::info!(rollout = r.id, device_id = %device, seq = row.seq, "republishing an unanswered command");
                self.app
                    .outbox
                    .send_command(&device, fleet::command_blob(&row))
                    .await;
                self.published.insert((row.device.clone(), row.seq), now);
            }
        }
    }

    async fn observe(&mut self, r: &RolloutState) -> Result<Observations, RolloutError> {
        let id = r.id;
        let seen = self.seen.remove(&id).unwrap_or_default();
        let digest = r.candidate.digest.clone();
        let created = r.created_at_ms;
        let want_drift = r.plan.gates.max_drift_psi.is_some();
        let want_accuracy = r.plan.gates.max_live_accuracy_drop.is_some();
        let name = r.candidate.name.clone();
        let now = self.app.clock.unix_ms();
        let (devices, seen, drift, live) = self
            .blocking(move |_, s| {
                let mut seen = seen;
                seen.read_new_rows(s, &digest, created)?;
                let drift = if want_drift {
                    candidate_drift(s, &digest, created, now)?
                } else {
                    HashMap::new()
                };
                let live = if want_accuracy {
                    Some(live_accuracy(s, &name, &digest, created, now)?)
                } else {
                    None
                };
                // A device with several models: what is active is its slot of this model.
                let slots = s.slot_actives(&name)?;
                let mut devices = s.devices()?;
                for d in &mut devices {
                    if let Some(active) = slots.get(&d.id) {
                        d.active_digest.clone_from(active);
                    }
                }
                Ok((devices, seen, drift, live))
            })
            .await?;
        let held = held_by_older(&self.rollouts, r.id);
        let mut obs = observations(r, devices, &seen, &drift, &held);
        obs.live_accuracy = live;
        self.seen.insert(id, seen);
        Ok(obs)
    }
}

/// The signed command's action for an engine action. `slot` names the model for a device
/// that holds several (protocol 2); `manifest` is `None` when the model is no longer
/// published (an empty `Corrupt`, which the caller words).
fn wire_action(
    action: Option<&Action>,
    manifest: Option<&drover_protocol::SignedBlob>,
    to_refs: &HashMap<String, Option<ModelRef>>,
    slot: Option<&str>,
) -> Result<WireAction, RolloutError> {
    Ok(match action {
        Some(Action::Deploy { shadow, .. }) => WireAction::Deploy {
            manifest: manifest
                .cloned()
                .ok_or_else(|| RolloutError::Corrupt(String::new()))?,
            mode: if *shadow {
                DeployMode::Shadow
            } else {
                DeployMode::Activate
            },
        },
        Some(Action::Promote { .. }) => match slot {
            Some(model) => WireAction::PromoteModel {
                model: model.to_owned(),
            },
            None => WireAction::Promote,
        },
        Some(Action::Rollback { to, .. }) => {
            let to = to.as_ref().and_then(|d| to_refs.get(d).cloned().flatten());
            match slot {
                Some(model) => WireAction::RollbackModel {
                    model: model.to_owned(),
                    to,
                },
                None => WireAction::Rollback { to },
            }
        }
        None => return Err(RolloutError::Corrupt("no action".into())),
    })
}

/// Devices still in flight.
fn pending(s: &RolloutState) -> u64 {
    s.devices
        .values()
        .filter(|d| pending_state(d.state))
        .count() as u64
}

/// The store writes for going from `before` to `after`.
fn write_of(
    before: &RolloutState,
    after: &RolloutState,
    events: Vec<Event>,
    now: u64,
) -> RolloutWrite {
    let slots = after
        .devices
        .iter()
        .filter(|(id, slot)| before.devices.get(*id) != Some(*slot))
        .map(|(id, slot)| (id.clone(), record::slot(slot)))
        .collect();
    RolloutWrite {
        header: record::header(after),
        status: after.status.name().to_owned(),
        pending: pending(after),
        now_ms: now,
        slots,
        events: events
            .into_iter()
            .map(|e| (e.at_ms, e.kind.clone(), record::event(&e)))
            .collect(),
    }
}

/// Writes a state with no commands (a new rollout).
fn write_step(
    s: &mut Store,
    state: &RolloutState,
    events: Vec<Event>,
    now: u64,
) -> Result<(), RolloutError> {
    let empty = RolloutState {
        devices: BTreeMap::new(),
        ..state.clone()
    };
    let w = write_of(&empty, state, events, now);
    let no_command = |d: &str, _| Err(RolloutError::Corrupt(format!("unexpected command for {d}")));
    s.apply_rollout_step(state.id, &[], no_command, |_| w)?
        .map(|_| ())
}

fn pending_state(s: DevState) -> bool {
    matches!(
        s,
        DevState::Queued
            | DevState::Deploying
            | DevState::Shadowing
            | DevState::Promoting
            | DevState::Active
            | DevState::RollingBack
    )
}
