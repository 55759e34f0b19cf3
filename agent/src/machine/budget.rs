//! The device's model budget (agent config `[models]`): how many named models it holds,
//! and the disk and memory they may take. A deploy that would exceed it is refused when
//! its command is handled, before the download opens, with the figures and what to do.
//!
//! Disk counts every file a slot keeps (active, previous, shadow, staged; a file two
//! slots share counts once) at its manifest's `size`. Memory is an estimate of the models
//! loaded (active and shadow of every slot), [`memory_estimate`] per model; it counts the
//! models served after the deploy (during a hot swap the outgoing version stays loaded
//! until its last request ends).

use std::collections::BTreeMap;

use drover_protocol::manifest::Manifest;
use drover_protocol::messages::{ModelBudget, ModelsReport, SlotStatus};
use drover_protocol::trust::Digest;

use super::{DeployMode, Machine, Slots};

/// Resident bytes a loaded model costs per byte of its ONNX file, plus a fixed overhead
/// per model. Measured (`agent/examples/model_memory.rs`, BENCHMARKS.md "Loaded model
/// memory"): one more loaded model costs 1.17-1.24 x its file on the corpus models of
/// about 1.2 MB, and 20-60 KiB for the KiB-sized fixtures; 2 x plus 1 MiB leaves room for
/// models whose optimized plan packs weights again. Per-request activations are not in
/// it (they depend on the request; `benches/request_memory.rs`).
pub const MEMORY_PER_FILE_BYTE: u64 = 2;
pub const MEMORY_PER_MODEL: u64 = 1 << 20;

/// Estimated resident bytes of a loaded model.
pub fn memory_estimate(m: &Manifest) -> u64 {
    m.size
        .saturating_mul(MEMORY_PER_FILE_BYTE)
        .saturating_add(MEMORY_PER_MODEL)
}

/// The files a slot keeps, by content hash, with their sizes.
fn files(s: &Slots, into: &mut BTreeMap<Digest, u64>) {
    for slot in s.installed() {
        into.insert(slot.manifest.sha256, slot.manifest.size);
    }
    if let Some(p) = &s.pending {
        into.insert(p.manifest.sha256, p.manifest.size);
    }
}

fn disk_bytes(s: &Slots) -> u64 {
    let mut f = BTreeMap::new();
    files(s, &mut f);
    f.values().sum()
}

fn memory_bytes(s: &Slots) -> u64 {
    [&s.active, &s.shadow]
        .into_iter()
        .flatten()
        .map(|slot| memory_estimate(&slot.manifest))
        .sum()
}

/// A byte count for a person: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn human(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

impl Machine {
    /// Every slot and the budget, as the `Models` report (protocol 2) carries them.
    pub fn models_report(&self) -> ModelsReport {
        let slots = self
            .state
            .models
            .iter()
            .map(|(name, s)| SlotStatus {
                name: name.clone(),
                active: s.active.as_ref().map(|a| a.model.clone()),
                previous: s.previous.as_ref().map(|a| a.model.clone()),
                staged: s.pending.as_ref().map(|p| p.model.clone()),
                shadow: s.shadow.as_ref().map(|a| a.model.clone()),
                disk_bytes: disk_bytes(s),
                memory_bytes: memory_bytes(s),
            })
            .collect();
        ModelsReport {
            slots,
            budget: self.cfg.budget.clone(),
        }
    }

    /// Whether a deploy of `m` fits the budget; the refusal's detail otherwise.
    pub(super) fn check_budget(&self, m: &Manifest, mode: DeployMode) -> Result<(), String> {
        let ModelBudget {
            max_models,
            memory_bytes: memory,
            disk_bytes: disk,
        } = &self.cfg.budget;
        let name = &m.name;
        let what = format!("model {name:?} {}", m.version);
        let others: Vec<&String> = (self.state.models.iter())
            .filter(|(n, s)| *n != name && !s.is_empty())
            .map(|(n, _)| n)
            .collect();
        let this = self.state.slot(name).filter(|s| !s.is_empty());
        if let (Some(max), None) = (max_models, this) {
            if others.len() as u64 >= u64::from(*max) {
                let held: Vec<&str> = others.iter().map(|s| s.as_str()).collect();
                return Err(format!(
                    "{what} needs a model slot of its own, but the device holds {} of its {max} \
                     ({}); remove a model or raise [models] max_models",
                    others.len(),
                    held.join(", ")
                ));
            }
        }
        if let Some(total) = disk {
            let mut held = BTreeMap::new();
            for s in self.state.models.values() {
                files(s, &mut held);
            }
            let need = if held.contains_key(&m.sha256) {
                0
            } else {
                m.size
            };
            let used: u64 = held.values().sum();
            let left = total.saturating_sub(used);
            if need > left {
                return Err(format!(
                    "{what} needs {} on disk, the budget leaves {} of {}; remove a model or \
                     raise [models] disk_bytes",
                    human(need),
                    human(left),
                    human(*total)
                ));
            }
        }
        if let Some(total) = memory {
            let used: u64 = self.state.models.values().map(memory_bytes).sum();
            // The version it replaces in its slot (active, or shadow) is unloaded.
            let replaced = this
                .and_then(|s| match mode {
                    DeployMode::Activate => s.active.as_ref(),
                    DeployMode::Shadow => s.shadow.as_ref(),
                })
                .map_or(0, |slot| memory_estimate(&slot.manifest));
            let need = memory_estimate(m);
            let left = total.saturating_sub(used.saturating_sub(replaced));
            if need > left {
                return Err(format!(
                    "{what} needs an estimated {} of memory loaded, the budget leaves {} of {}; \
                     remove a model or raise [models] memory_bytes",
                    human(need),
                    human(left),
                    human(*total)
                ));
            }
        }
        Ok(())
    }
}
