//! Boot: the agent's durable state loaded (and migrated, `crate::state`), the model store
//! collected, and every named slot's last good model back in service before the MQTT
//! session starts. Runs once, before [`crate::core::Core`].

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use drover_host::clock::now_ms;
use drover_protocol::manifest::Manifest;
use drover_protocol::messages::ModelRef;
use drover_protocol::trust::TrustStore;

use crate::config::ValidConfig;
use crate::download;
use crate::machine::{Slots, State, REQUEST_ID_BLOCK};
use crate::serving::{Loaded, Serving};
use crate::spool::Spool;
use crate::store::{self, Kept};

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

/// Loads a model from the store, checking its file against the manifest first.
pub(crate) fn load_model(
    cfg: &ValidConfig,
    model: &ModelRef,
    man: &Manifest,
) -> Result<Arc<Loaded>, String> {
    let (data_dir, manifest) = (&cfg.raw.data_dir, man);
    if !download::blob_is_valid(data_dir, manifest) {
        return Err("model file missing or does not match its manifest".into());
    }
    let bytes = std::fs::read(download::blob_path(data_dir, &manifest.sha256))
        .map_err(|e| e.to_string())?;
    let rt = crate::isolate::load(
        &bytes,
        manifest.artifact.as_ref(),
        cfg.raw.runtime.threads(),
    );
    let model_rt = rt.map_err(|e| e.to_string())?;
    Ok(Arc::new(Loaded {
        model_ref: model.clone(),
        manifest: manifest.clone(),
        model: model_rt,
    }))
}

/// Loads the durable state and brings up every slot's last good model in `serving`.
pub fn boot(cfg: &ValidConfig, serving: &Serving) -> Result<Booted, BootError> {
    let data_dir = cfg.raw.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| BootError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    // Temp files of writes a kill interrupted, and what the record no longer names: on a
    // full disk this is what makes room again.
    let _ = drover_host::fs::remove_temp_files(&data_dir);
    let mut state = State::load(&data_dir)?;
    collect_garbage(&data_dir, &Kept::of(&state), serving);
    let mut trust = TrustStore::new(cfg.root_public_key).map_err(BootError::Root)?;
    if let Some(k) = &state.keyring {
        if let Err(e) = trust.accept_keyring(k, now_ms()) {
            tracing::warn!(error = %e, "persisted keyring no longer accepted");
        }
    }
    if let Some(s) = &state.settings {
        serving.set_sample_rate(s.sample_rate_ppm);
    }
    for (name, slots) in state.models.iter_mut() {
        boot_slot(cfg, serving, name, slots);
    }
    // This run's request ids continue above every id an earlier run could have used.
    serving.continue_request_ids_after(state.request_ids_reserved);
    state.request_ids_reserved = state.request_ids_reserved.saturating_add(REQUEST_ID_BLOCK);
    if let Err(e) = state.save(&data_dir) {
        // A full disk: keep serving the models loaded above rather than exit; commands
        // are refused until a write succeeds (`Input::PersistFailed`).
        tracing::error!(error = %e, "cannot persist agent state at boot; serving on");
        serving
            .totals
            .state_write_failures
            .fetch_add(1, Ordering::Relaxed);
        serving.totals.disk_full.store(1, Ordering::Relaxed);
    }
    let spool = Spool::open(&data_dir.join("spool"), cfg.raw.telemetry.spool_max_bytes)?;
    Ok(Booted {
        state,
        trust,
        spool,
    })
}

/// Brings up one slot: its active model (the previous one if the active cannot load, or
/// never proved healthy over three boots) and its shadow.
fn boot_slot(cfg: &ValidConfig, serving: &Serving, name: &str, state: &mut Slots) {
    if state.count_unhealthy_boot() {
        tracing::warn!(model = %name, "active model never became healthy: rolled back");
    }
    let mut loaded = None;
    for which in ["active", "previous"] {
        let slot = if which == "active" {
            state.active.clone()
        } else {
            state.previous.clone()
        };
        let Some(slot) = slot else { continue };
        match load_model(cfg, &slot.model, &slot.manifest) {
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
        serving.swap_active(name, loaded);
    }
    if let Some(s) = &state.shadow {
        match load_model(cfg, &s.model, &s.manifest) {
            Ok(l) => {
                serving.set_shadow(name, Some(l));
            }
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "shadow model unusable; dropped");
                state.shadow = None;
            }
        }
    }
}

/// Deletes what the persisted record `kept` describes no longer needs; logged, never fatal.
pub(crate) fn collect_garbage(data_dir: &Path, kept: &Kept, serving: &Serving) {
    match store::collect(data_dir, kept) {
        Ok(c) if c.files > 0 => {
            serving
                .totals
                .store_collected_bytes
                .fetch_add(c.bytes, Ordering::Relaxed);
            tracing::info!(files = c.files, bytes = c.bytes, "model store collected");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "model store collection failed"),
    }
}
