//! The deployment path of the [`Machine`]: a verified deploy command becomes a pending
//! deployment (persisted with the command's sequence number), then
//! open → download (chunks asked for [`CHUNK_BATCH`] at a time, re-asked after
//! [`CHUNK_RETRY_MS`], each verified before it is written) → finish (whole-file hash) →
//! load and self-test → activate (probation, then healthy or rolled back) or shadow;
//! rollback, promote and remove commands. Everything here acts on one named slot: the job,
//! probation and restore of model A are keyed by A's name, so B's never see them.

use std::collections::{BTreeMap, BTreeSet};

use drover_protocol::messages::{ChunkData, ChunkRequest, DeployMode, ModelRef, Phase, Uplink};
use drover_protocol::topics;
use drover_protocol::trust::{verify_chunk, Digest, SignedBlob};

use super::{CommandId, Effect, Event, Machine, Pending, Slot, SlotState, Slots, Stored};

/// Chunks asked for in one request (bounded so one request cannot flood the broker).
pub const CHUNK_BATCH: usize = 64;
/// How long to wait for requested chunks before asking again.
pub const CHUNK_RETRY_MS: u64 = 2_000;
/// Times one chunk may fail its check (or its write) before the deployment fails: the
/// control plane serves the same bytes again, so a corrupt or truncated model on the
/// server would otherwise be "downloading" for ever.
pub const MAX_CHUNK_ATTEMPTS: u32 = 5;
/// Requests in a row answered by no chunk at all before the deployment fails (a model
/// the server cannot serve; a minute at [`CHUNK_RETRY_MS`], so a busy or rate-limiting
/// server that serves anything at all never trips it).
pub const MAX_SILENT_REQUESTS: u32 = 30;

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
/// the verdict approaches the plain ratio.
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

/// The deployment in flight.
#[derive(Clone)]
pub(super) struct Job {
    pub(super) pending: Pending,
    pub(super) stage: Stage,
}

#[derive(Clone)]
pub(super) enum Stage {
    /// Asked the store what it holds ([`Effect::OpenDownload`]).
    Opening,
    Downloading(Download),
    /// Asked the store to check and keep the whole file ([`Effect::FinishDownload`]).
    Finishing,
    /// Asked for the model to be loaded and self-tested ([`Effect::Load`]).
    SelfTesting,
}

#[derive(Clone)]
pub(super) struct Download {
    /// One flag per chunk: verified and durably written.
    have: Vec<bool>,
    done: u32,
    requested: BTreeSet<u32>,
    last_request_ms: Option<u64>,
    last_reported: u32,
    /// Failed attempts per chunk (check or write), bounded by the chunk count.
    failures: BTreeMap<u32, u32>,
    /// Requests in a row that brought no chunk.
    silent: u32,
}

/// A rollback waiting for the previous model to load ([`Effect::Load`]).
pub(super) struct Restore {
    cmd: CommandId,
    phase: Phase,
    detail: Option<String>,
    prev: Slot,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Probation {
    pub(super) until_ms: u64,
    /// The command that activated the model, reported when the verdict is in.
    pub(super) cmd: Option<CommandId>,
}

/// Why a deploy command installs nothing (reported with its phase).
pub(super) struct Refusal {
    pub(super) model: Option<ModelRef>,
    pub(super) phase: Phase,
    pub(super) detail: String,
}

/// Where the model that becomes active comes from.
#[derive(Clone, Copy)]
enum Source {
    Loaded,
    Shadow,
}

fn command_of(p: &Pending) -> CommandId {
    (p.command_seq, p.command_digest)
}

/// The detail of a deployment that gave up: what the control plane shows.
fn attempts_failed(n: u32, reason: &str) -> String {
    format!("failed after {n} attempts: {reason}")
}

impl Machine {
    /// Verifies a deploy's manifest and checks the budget; the result becomes the named
    /// slot's pending deployment.
    pub(super) fn prepare_deploy(
        &self,
        cmd: CommandId,
        blob: &SignedBlob,
        mode: DeployMode,
    ) -> Result<Pending, Refusal> {
        let manifest = self
            .trust
            .verify_manifest(blob, self.now)
            .map_err(|e| Refusal {
                model: None,
                phase: Phase::Refused,
                detail: e.to_string(),
            })?;
        let model = ModelRef {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: blob.digest(),
        };
        let active = self.state.slot(&model.name).and_then(|s| s.active.as_ref());
        if mode == DeployMode::Activate && active.map(|a| &a.model) == Some(&model) {
            return Err(Refusal {
                model: Some(model),
                phase: Phase::Healthy,
                detail: "already active".into(),
            });
        }
        // A file this build cannot load (a compiled artifact from a newer runtime, or a
        // plain ONNX file on an agent without the importer) is refused before any chunk.
        if let Err(detail) = self.cfg.runtime.check(manifest.artifact.as_ref()) {
            return Err(Refusal {
                model: Some(model),
                phase: Phase::Refused,
                detail,
            });
        }
        if let Err(detail) = self.check_budget(&manifest, mode) {
            return Err(Refusal {
                model: Some(model),
                phase: Phase::Refused,
                detail,
            });
        }
        Ok(Pending {
            command_seq: cmd.0,
            command_digest: cmd.1,
            manifest_blob: blob.clone(),
            manifest,
            model,
            mode,
        })
    }

    /// The named slot, created empty if the device holds nothing of that name.
    pub(super) fn slots_mut(&mut self, name: &str) -> &mut Slots {
        self.state.models.entry(name.to_owned()).or_default()
    }

    /// Ends the named slot's deployment in flight because a newer command about that
    /// model arrived; the record on disk no longer names it (the command's write replaced
    /// the slot's `pending`). Other slots' deployments go on.
    pub(super) fn supersede_job(&mut self, name: &str, by_seq: u64) {
        let Some(old) = self.job.remove(name) else {
            return;
        };
        let p = old.pending;
        self.drop_download(&p);
        let detail = Some(format!("superseded by command {by_seq}"));
        self.progress(command_of(&p), Some(p.model), Phase::Failed, (0, 0), detail);
    }

    /// Starts a verified deploy (already persisted as pending; any older job is gone).
    pub(super) fn start_deploy(&mut self, pending: Pending) {
        self.crash_point("deploy.after_pending_persist");
        self.resume(pending);
    }

    /// Starts or resumes a pending deployment from whatever the store holds.
    pub(super) fn resume(&mut self, pending: Pending) {
        self.emit(Effect::OpenDownload {
            manifest_digest: pending.model.digest,
            manifest: pending.manifest.clone(),
        });
        let name = pending.model.name.clone();
        self.job.insert(
            name,
            Job {
                pending,
                stage: Stage::Opening,
            },
        );
    }

    fn drop_download(&mut self, p: &Pending) {
        let manifest_digest = p.model.digest;
        self.emit(Effect::Unsubscribe(topics::model_chunks(&manifest_digest)));
        self.emit(Effect::CloseDownload { manifest_digest });
    }

    /// The name of the job in flight for this model if it is at this stage (a manifest
    /// digest names one model, so at most one slot's job matches).
    fn job_at(&self, digest: Digest, stage: fn(&Stage) -> bool) -> Option<String> {
        self.job
            .iter()
            .find(|(_, j)| j.pending.model.digest == digest && stage(&j.stage))
            .map(|(n, _)| n.clone())
    }

    pub(super) fn on_opened(&mut self, digest: Digest, stored: Stored) {
        let connected = self.connected;
        let Some(name) = self.job_at(digest, |s| matches!(s, Stage::Opening)) else {
            return;
        };
        let have = match stored {
            Stored::Blob => return self.verified(&name),
            Stored::Chunks(have) => have,
        };
        let Some(job) = self.job.get_mut(&name) else {
            return;
        };
        let total = job.pending.manifest.chunk_count();
        let have = if have.len() == total as usize {
            have
        } else {
            vec![false; total as usize]
        };
        let done = have.iter().filter(|h| **h).count() as u32;
        job.stage = Stage::Downloading(Download {
            have,
            done,
            requested: BTreeSet::new(),
            last_request_ms: None,
            last_reported: done,
            failures: BTreeMap::new(),
            silent: 0,
        });
        let (cmd, model) = (command_of(&job.pending), job.pending.model.clone());
        self.progress(cmd, Some(model), Phase::Downloading, (done, total), None);
        if done == total {
            self.finish(&name);
        } else if connected {
            self.emit(Effect::Subscribe(topics::model_chunks(&digest)));
        }
    }

    /// The store could not open, or the whole file failed its check.
    pub(super) fn on_store_failed(&mut self, digest: Digest, error: String) {
        let at = |s: &Stage| matches!(s, Stage::Opening | Stage::Finishing);
        if let Some(name) = self.job_at(digest, at) {
            self.fail_job(&name, error);
        }
    }

    /// Ends the named slot's job in flight as failed.
    fn fail_job(&mut self, name: &str, detail: String) {
        let Some(job) = self.job.remove(name) else {
            return;
        };
        let p = job.pending;
        self.drop_download(&p);
        self.slots_mut(name).pending = None;
        self.state.prune();
        self.persist();
        self.event(Event::InstallFailed {
            command_seq: p.command_seq,
        });
        self.progress(
            command_of(&p),
            Some(p.model),
            Phase::Failed,
            (0, 0),
            Some(detail),
        );
    }

    /// After a (re)connect the chunk topics are subscribed again and chunks re-asked.
    pub(super) fn resubscribe_chunks(&mut self) {
        let mut topics = Vec::new();
        for job in self.job.values_mut() {
            if let Stage::Downloading(d) = &mut job.stage {
                d.last_request_ms = None;
                topics.push(topics::model_chunks(&job.pending.model.digest));
            }
        }
        for t in topics {
            self.emit(Effect::Subscribe(t));
        }
    }

    /// The slots whose chunk requests are due again.
    pub(super) fn chunk_retries_due(&self) -> Vec<String> {
        let due = |j: &Job| match &j.stage {
            Stage::Downloading(d) => d
                .last_request_ms
                .is_none_or(|t| self.now.saturating_sub(t) >= CHUNK_RETRY_MS),
            _ => false,
        };
        self.job
            .iter()
            .filter(|(_, j)| due(j))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The retry timer ran out: a request that brought no chunk is a failed attempt.
    pub(super) fn retry_chunks(&mut self, name: &str) {
        if !self.connected {
            return;
        }
        let Some(Job {
            stage: Stage::Downloading(d),
            ..
        }) = self.job.get_mut(name)
        else {
            return;
        };
        if d.last_request_ms.is_some() {
            d.silent += 1;
            if d.silent >= MAX_SILENT_REQUESTS {
                let missing = d.have.iter().filter(|h| !**h).count();
                let total = d.have.len();
                let reason = format!("no chunk served ({missing} of {total} missing)");
                return self.fail_job(name, attempts_failed(MAX_SILENT_REQUESTS, &reason));
            }
        }
        self.request_chunks(name);
    }

    /// A chunk failed its check or its write: asked for again, up to
    /// [`MAX_CHUNK_ATTEMPTS`] times, then the deployment fails with the reason.
    pub(super) fn chunk_failed(&mut self, digest: Digest, index: u32, reason: String) {
        let Some(name) = self.job_at(digest, |s| matches!(s, Stage::Downloading(_))) else {
            return self.event(Event::ChunkRefused { index, reason });
        };
        let Some(Job {
            stage: Stage::Downloading(d),
            ..
        }) = self.job.get_mut(&name)
        else {
            return;
        };
        let n = d.failures.entry(index).or_insert(0);
        *n += 1;
        let give_up = *n >= MAX_CHUNK_ATTEMPTS;
        let detail = format!("chunk {index}: {reason}");
        self.event(Event::ChunkRefused { index, reason });
        if give_up {
            self.fail_job(&name, attempts_failed(MAX_CHUNK_ATTEMPTS, &detail));
        }
    }

    pub(super) fn request_chunks(&mut self, name: &str) {
        if !self.connected {
            return;
        }
        let now = self.now;
        let Some(job) = self.job.get_mut(name) else {
            return;
        };
        let Stage::Downloading(d) = &mut job.stage else {
            return;
        };
        let missing: Vec<u32> = (0..d.have.len() as u32)
            .filter(|i| !d.have[*i as usize])
            .take(CHUNK_BATCH)
            .collect();
        if missing.is_empty() {
            return;
        }
        d.requested = missing.iter().copied().collect();
        d.last_request_ms = Some(now);
        let req = Uplink::ChunkRequest(ChunkRequest {
            manifest_digest: job.pending.model.digest,
            indices: missing,
        });
        self.send(req, false);
    }

    /// A chunk off the shared topic: every device downloading the model receives every
    /// chunk any of them asked for, so most are for other devices or already held.
    pub(super) fn on_chunk(&mut self, c: ChunkData) {
        let at = |s: &Stage| matches!(s, Stage::Downloading(_));
        let Some(name) = self.job_at(c.manifest_digest, at) else {
            return;
        };
        let Some(job) = self.job.get(&name) else {
            return;
        };
        let Stage::Downloading(d) = &job.stage else {
            return;
        };
        if d.have.get(c.index as usize) == Some(&true) {
            // Held already: nothing is written, so its hash need not be checked again.
            return self.after_chunk(&name, c.index);
        }
        if let Err(e) = verify_chunk(&job.pending.manifest, c.index, &c.data) {
            // A bad chunk is dropped and asked for again; it never reaches the store.
            return self.chunk_failed(c.manifest_digest, c.index, e.to_string());
        }
        self.emit(Effect::WriteChunk {
            manifest_digest: c.manifest_digest,
            index: c.index,
            data: c.data,
        });
    }

    pub(super) fn on_chunk_written(&mut self, digest: Digest, index: u32) {
        let Some(name) = self.job_at(digest, |s| matches!(s, Stage::Downloading(_))) else {
            return;
        };
        if let Some(Job {
            stage: Stage::Downloading(d),
            ..
        }) = self.job.get_mut(&name)
        {
            d.silent = 0;
            if let Some(h) = d.have.get_mut(index as usize) {
                if !*h {
                    *h = true;
                    d.done += 1;
                }
            }
        }
        self.after_chunk(&name, index);
    }

    /// Progress every quarter, install when complete, the next batch when this one is in.
    fn after_chunk(&mut self, name: &str, index: u32) {
        let Some(job) = self.job.get_mut(name) else {
            return;
        };
        let Stage::Downloading(d) = &mut job.stage else {
            return;
        };
        d.requested.remove(&index);
        let (done, total) = (d.done, d.have.len() as u32);
        let report = done == total || done >= d.last_reported + (total / 4).max(1);
        let batch_done = d.requested.is_empty();
        if report {
            d.last_reported = done;
            let (cmd, model) = (command_of(&job.pending), job.pending.model.clone());
            self.progress(cmd, Some(model), Phase::Downloading, (done, total), None);
        }
        if done == total {
            self.finish(name);
        } else if batch_done {
            self.request_chunks(name);
        }
    }

    /// Every chunk is in: the store checks the whole file.
    fn finish(&mut self, name: &str) {
        let Some(job) = self.job.get_mut(name) else {
            return;
        };
        job.stage = Stage::Finishing;
        let manifest_digest = job.pending.model.digest;
        self.emit(Effect::FinishDownload { manifest_digest });
    }

    pub(super) fn on_blob_ready(&mut self, digest: Digest) {
        if let Some(name) = self.job_at(digest, |s| matches!(s, Stage::Finishing)) {
            self.verified(&name);
        }
    }

    /// The verified file is in the store: load and self-test it.
    fn verified(&mut self, name: &str) {
        let Some(job) = self.job.get_mut(name) else {
            return;
        };
        job.stage = Stage::SelfTesting;
        let p = &job.pending;
        let (cmd, model, manifest) = (command_of(p), p.model.clone(), p.manifest.clone());
        let total = manifest.chunk_count();
        self.emit(Effect::Unsubscribe(topics::model_chunks(&model.digest)));
        self.crash_point("deploy.after_verify");
        self.progress(
            cmd,
            Some(model.clone()),
            Phase::Verified,
            (total, total),
            None,
        );
        self.emit(Effect::Load {
            model,
            manifest,
            self_test: true,
        });
    }

    /// The slot whose rollback waits for this model to load.
    fn restore_of(&self, digest: Digest) -> Option<String> {
        self.restore
            .iter()
            .find(|(_, r)| r.prev.model.digest == digest)
            .map(|(n, _)| n.clone())
    }

    pub(super) fn on_loaded(&mut self, digest: Digest) {
        if let Some(name) = self.job_at(digest, |s| matches!(s, Stage::SelfTesting)) {
            if let Some(job) = self.job.remove(&name) {
                self.installed(job.pending);
            }
        } else if let Some(name) = self.restore_of(digest) {
            if let Some(r) = self.restore.remove(&name) {
                self.restored(&name, r);
            }
        }
    }

    pub(super) fn on_load_failed(&mut self, digest: Digest, error: String) {
        if let Some(name) = self.job_at(digest, |s| matches!(s, Stage::SelfTesting)) {
            self.fail_job(&name, format!("self-test failed: {error}"));
        } else if let Some(name) = self.restore_of(digest) {
            if let Some(r) = self.restore.remove(&name) {
                self.progress(r.cmd, None, Phase::Failed, (0, 0), Some(error));
            }
        }
    }

    /// Self-tested: activate, or run in shadow.
    fn installed(&mut self, p: Pending) {
        let cmd = command_of(&p);
        let total = p.manifest.chunk_count();
        self.crash_point("deploy.after_selftest");
        self.progress(
            cmd,
            Some(p.model.clone()),
            Phase::SelfTested,
            (total, total),
            None,
        );
        let name = p.model.name.clone();
        let mut slot = Slot {
            model: p.model,
            manifest: p.manifest,
            state: SlotState::SelfTested,
            unhealthy_boots: 0,
            activated_by: Some(cmd),
        };
        match p.mode {
            DeployMode::Activate => {
                slot.state = SlotState::Active;
                self.activate(slot, Source::Loaded, Some(cmd));
            }
            DeployMode::Shadow => {
                let model = slot.model.clone();
                let slots = self.slots_mut(&name);
                slots.shadow = Some(slot);
                slots.pending = None;
                self.persist();
                self.emit(Effect::ShadowLoaded { model: name });
                self.progress(cmd, Some(model), Phase::Shadowing, (total, total), None);
            }
        }
        self.event(Event::Installed {
            command_seq: cmd.0,
            mode: p.mode,
        });
    }

    fn activate(&mut self, slot: Slot, from: Source, cmd: Option<CommandId>) {
        let model = slot.model.clone();
        let name = model.name.clone();
        self.crash_point("activate.before_state_persist");
        let slots = self.slots_mut(&name);
        // The outgoing model becomes the rollback target only if it had proved healthy.
        if let Some(old) = slots.active.take() {
            if old.state == SlotState::Healthy {
                slots.previous = Some(old);
            }
        }
        slots.active = Some(slot);
        slots.pending = None;
        self.persist();
        self.crash_point("activate.after_state_persist");
        self.emit(match from {
            Source::Loaded => Effect::ServeLoaded {
                model: name.clone(),
            },
            Source::Shadow => Effect::PromoteShadow {
                model: name.clone(),
            },
        });
        self.crash_point("activate.after_swap");
        if let Some(cmd) = cmd {
            self.progress(cmd, Some(model), Phase::Active, (0, 0), None);
        }
        let until_ms = self.now.saturating_add(self.cfg.probation_ms);
        self.probation.insert(name, Probation { until_ms, cmd });
    }

    fn active_mut(&mut self, name: &str) -> Option<&mut Slot> {
        self.state.models.get_mut(name)?.active.as_mut()
    }

    pub(super) fn end_probation(
        &mut self,
        name: &str,
        cmd: Option<CommandId>,
        (errors, ok): (u64, u64),
    ) {
        let Some(model) = self.active_mut(name).map(|a| a.model.clone()) else {
            return;
        };
        if probation_passed(errors, ok) {
            self.crash_point("healthy.before_persist");
            if let Some(a) = self.active_mut(name) {
                a.state = SlotState::Healthy;
                a.unhealthy_boots = 0;
            }
            self.persist();
            self.crash_point("healthy.after_persist");
            if let Some(cmd) = cmd {
                self.progress(cmd, Some(model), Phase::Healthy, (0, 0), None);
                // Reported (spooled): forget the command so a restart does not report again.
                if let Some(a) = self.active_mut(name) {
                    a.activated_by = None;
                }
                self.persist();
            }
        } else {
            self.event(Event::ProbationFailed { errors, ok });
            let detail = format!(
                "{errors} errors in {} requests during probation",
                errors + ok
            );
            let cmd = cmd.unwrap_or((0, [0; 32]));
            self.roll_back_to_previous(name, cmd, Phase::RolledBack, Some(detail));
        }
    }

    /// Loads the slot's previous model; [`Machine::restored`] swaps it in once loaded.
    fn roll_back_to_previous(
        &mut self,
        name: &str,
        cmd: CommandId,
        phase: Phase,
        detail: Option<String>,
    ) {
        let prev = self.state.slot(name).and_then(|s| s.previous.clone());
        let Some(prev) = prev else {
            let detail = Some("no previous model to roll back to".into());
            return self.progress(cmd, None, Phase::Failed, (0, 0), detail);
        };
        self.emit(Effect::Load {
            model: prev.model.clone(),
            manifest: prev.manifest.clone(),
            self_test: false,
        });
        let r = Restore {
            cmd,
            phase,
            detail,
            prev,
        };
        self.restore.insert(name.to_owned(), r);
    }

    fn restored(&mut self, name: &str, r: Restore) {
        let model = r.prev.model.clone();
        let slots = self.slots_mut(name);
        let mut bad = slots.active.take();
        if let Some(b) = &mut bad {
            b.state = SlotState::RolledBack;
        }
        slots.active = Some(r.prev);
        slots.previous = bad;
        self.probation.remove(name);
        self.persist();
        self.emit(Effect::ServeLoaded {
            model: name.to_owned(),
        });
        self.progress(r.cmd, Some(model), r.phase, (0, 0), r.detail);
    }

    pub(super) fn rollback(&mut self, name: &str, cmd: CommandId, to: Option<ModelRef>) {
        // A rollback ends the rollout: a candidate still in shadow goes too (on disk
        // first, so a failed write leaves it running as the record says).
        if let Some(s) = self.state.models.get_mut(name) {
            if s.shadow.take().is_some() {
                self.persist();
                let model = name.to_owned();
                self.emit(Effect::DropShadow { model });
            }
        }
        if let Some(to) = to {
            let slots = self.state.slot(name);
            // Already where the command wants it (e.g. the candidate never activated, or
            // the agent rolled it back itself): nothing to do.
            if slots.and_then(|s| s.active.as_ref()).map(|a| &a.model) == Some(&to) {
                self.probation.remove(name);
                return self.progress(cmd, Some(to), Phase::Done, (0, 0), None);
            }
            if slots.and_then(|s| s.previous.as_ref()).map(|p| &p.model) != Some(&to) {
                let detail = Some("requested model is not the previous slot".into());
                return self.progress(cmd, Some(to), Phase::Failed, (0, 0), detail);
            }
        }
        self.roll_back_to_previous(name, cmd, Phase::Done, None);
    }

    pub(super) fn promote(&mut self, name: &str, cmd: CommandId) {
        let shadow = self
            .state
            .models
            .get_mut(name)
            .and_then(|s| s.shadow.take());
        let Some(mut slot) = shadow else {
            let detail = Some("no shadow model to promote".into());
            return self.progress(cmd, None, Phase::Failed, (0, 0), detail);
        };
        slot.state = SlotState::Active;
        slot.activated_by = Some(cmd);
        self.activate(slot, Source::Shadow, Some(cmd));
    }

    /// Unloads the named model and frees its slot: the record forgets it (its files are
    /// collected after the write), so its budget is free again. Its deployment in flight
    /// was superseded with the command.
    pub(super) fn remove(&mut self, name: &str, cmd: CommandId) {
        self.probation.remove(name);
        self.restore.remove(name);
        let Some(slots) = self.state.models.remove(name) else {
            let detail = Some(format!(
                "nothing to remove: no model {name:?} on this device"
            ));
            return self.progress(cmd, None, Phase::Done, (0, 0), detail);
        };
        self.persist();
        self.emit(Effect::Unload {
            model: name.to_owned(),
        });
        let model = slots.active.map(|a| a.model);
        self.progress(cmd, model, Phase::Done, (0, 0), None);
    }
}
