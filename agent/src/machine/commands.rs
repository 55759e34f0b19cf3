//! Keyrings and signed commands: verification against the trust store and the replay
//! floor, the write that accepts a command (with what it supersedes in the slot it is
//! about), and what each action does.

use drover_protocol::messages::{Action, Command, KeyringRefused, Phase, Uplink};
use drover_protocol::trust::{SignedBlob, TrustError};

use super::{
    deploy, CommandId, Effect, Event, Machine, Pending, Settings, Undo, KEYRING_REFUSAL_INTERVAL_MS,
};

impl Machine {
    pub(super) fn on_keyring(&mut self, blob: SignedBlob) {
        let current = self.trust.keyring().map(|k| k.version);
        match self.trust.accept_keyring(&blob, self.now) {
            Ok(k) => {
                let version = k.version;
                if Some(version) != current {
                    self.event(Event::KeyringAccepted { version });
                    self.state.keyring = Some(blob);
                    self.persist();
                }
            }
            Err(e) => {
                let reason = e.to_string();
                self.event(Event::KeyringRefused(e));
                // Reports are rate-limited: whoever can publish bogus keyrings must not be
                // able to fill the spool (and the disk's write budget) with refusals.
                if self
                    .last_keyring_refusal_ms
                    .is_some_and(|t| self.now.saturating_sub(t) < KEYRING_REFUSAL_INTERVAL_MS)
                {
                    return;
                }
                self.last_keyring_refusal_ms = Some(self.now);
                let offered_version =
                    drover_protocol::trust::claimed_keyring_version(&blob).unwrap_or(0);
                self.send(
                    Uplink::KeyringRefused(KeyringRefused {
                        offered_version,
                        reason,
                    }),
                    true,
                );
            }
        }
    }

    pub(super) fn on_command(&mut self, blob: SignedBlob) {
        let digest = blob.digest();
        let verified = self.trust.verify_command(
            &blob,
            &self.cfg.device_id,
            self.state.last_command_seq,
            self.now,
        );
        let cmd = match verified {
            Ok(c) => c,
            Err(TrustError::Replayed { seq, .. })
                if self.state.last_command_digest == Some(digest) =>
            {
                self.event(Event::CommandRedelivered { seq });
                return;
            }
            Err(e) => {
                let detail = e.to_string();
                self.event(Event::CommandRefused(e));
                self.progress((0, digest), None, Phase::Refused, (0, 0), Some(detail));
                return;
            }
        };
        // Persist the replay floor before acting, so a replay after a crash is refused. A
        // deployment is persisted in the same write, so a crash cannot lose it.
        let id = (cmd.seq, digest);
        let undo = Undo {
            cmd: id,
            state: self.state.clone(),
            job: self.job.clone(),
            probation: self.probation.clone(),
        };
        self.state.last_command_seq = cmd.seq;
        self.state.last_command_digest = Some(digest);
        let deploy = match &cmd.action {
            Action::Deploy { manifest, mode } => Some(self.prepare_deploy(id, manifest, *mode)),
            _ => None,
        };
        // A command about a model (deploy, rollback, promote, remove) overrides whatever
        // deployment was pending in that model's slot, whatever its version, in the same
        // write as the floor: an older deployment can never resume and activate over a
        // newer command, not even after a restart. Other slots' deployments go on;
        // settings leave them all alone.
        let slot = self.command_slot(&cmd.action, deploy.as_ref());
        if let Some(name) = &slot {
            let pending = match &deploy {
                Some(Ok(p)) => Some(p.clone()),
                _ => None,
            };
            self.slots_mut(name).pending = pending;
            self.state.prune();
        }
        self.out
            .push(Effect::PersistCommand(Box::new(self.state.clone())));
        self.undo = Some(undo);
        self.crash_point("command.after_seq_persist");
        self.progress(id, None, Phase::Received, (0, 0), None);
        if let Some(name) = &slot {
            self.supersede_job(name, cmd.seq);
        }
        match deploy {
            Some(Ok(p)) => self.start_deploy(p),
            Some(Err(r)) => self.progress(id, r.model, r.phase, (0, 0), Some(r.detail)),
            None => self.execute(cmd, slot, id),
        }
    }

    /// The slot a command is about: the one it or its manifest names; for protocol 1's
    /// `Rollback` without a target, `Promote`, or a deploy whose manifest was refused
    /// (its name unknown), the only slot there is (the one model of an old control plane;
    /// for `Promote`, the only slot with a shadow). `None` for settings, and when several
    /// slots make a protocol 1 command ambiguous.
    fn command_slot(
        &self,
        action: &Action,
        deploy: Option<&Result<Pending, deploy::Refusal>>,
    ) -> Option<String> {
        let models = &self.state.models;
        let only = || (models.len() == 1).then(|| models.keys().next().cloned())?;
        match action {
            Action::Deploy { .. } => match deploy {
                Some(Ok(p)) => Some(p.model.name.clone()),
                Some(Err(r)) => r.model.as_ref().map(|m| m.name.clone()).or_else(only),
                None => None,
            },
            Action::Rollback { to: Some(m) } => Some(m.name.clone()),
            Action::Rollback { to: None } => only(),
            Action::Promote => {
                let mut shadowing = models.iter().filter(|(_, s)| s.shadow.is_some());
                match (shadowing.next(), shadowing.next()) {
                    (Some((n, _)), None) => Some(n.clone()),
                    _ => only(),
                }
            }
            Action::RollbackModel { model, .. }
            | Action::PromoteModel { model }
            | Action::RemoveModel { model } => Some(model.clone()),
            Action::Configure(_) => None,
        }
    }

    /// The write accepting a command failed (a full disk): the machine returns to where
    /// it was, so nothing acts on a command a restart would not know, and says why.
    pub(super) fn command_not_persisted(&mut self, undo: Option<Undo>, error: String) {
        let Some(u) = undo else { return };
        // Keep the uplink reservation: sequence numbers handed out stay used.
        let reserved = self.state.uplink_seq_reserved;
        self.state = u.state;
        self.state.uplink_seq_reserved = self.state.uplink_seq_reserved.max(reserved);
        self.job = u.job;
        self.probation = u.probation;
        self.event(Event::CommandNotPersisted {
            seq: u.cmd.0,
            error: error.clone(),
        });
        let detail = format!("not acted on: cannot persist agent state: {error}");
        self.progress(u.cmd, None, Phase::Failed, (0, 0), Some(detail));
    }

    fn execute(&mut self, cmd: Command, slot: Option<String>, id: CommandId) {
        let ambiguous = |m: &Machine| {
            let names: Vec<&str> = m.state.models.keys().map(String::as_str).collect();
            Some(format!(
                "this device serves {} models ({}): name the model (RollbackModel / PromoteModel, \
                 protocol 2)",
                names.len(),
                names.join(", ")
            ))
        };
        match (cmd.action, slot) {
            (Action::Deploy { .. }, _) => {}
            (Action::Rollback { .. } | Action::Promote, None) if self.state.models.len() > 1 => {
                let detail = ambiguous(self);
                self.progress(id, None, Phase::Failed, (0, 0), detail);
            }
            (Action::Rollback { to } | Action::RollbackModel { to, .. }, name) => {
                self.rollback(name.as_deref().unwrap_or_default(), id, to)
            }
            (Action::Promote | Action::PromoteModel { .. }, name) => {
                self.promote(name.as_deref().unwrap_or_default(), id)
            }
            (Action::RemoveModel { model }, _) => self.remove(&model, id),
            (Action::Configure(s), _) => {
                let settings = Settings::from(&s);
                self.state.settings = Some(settings.clone());
                self.emit(Effect::ApplySettings(settings));
                self.persist();
                self.progress(id, None, Phase::Done, (0, 0), None);
            }
        }
    }
}
