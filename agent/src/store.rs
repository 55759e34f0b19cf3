//! Housekeeping of the model store (`blobs/`, `downloads/`): what may be deleted and
//! whether a download fits on the disk.
//!
//! Collection keeps exactly what the persisted record names: the blobs of the active,
//! previous, shadow and pending (pinned) slots and the partial download of the pending
//! deployment. Everything else is garbage: blobs of superseded models, partials of
//! superseded or failed downloads, temp files of interrupted writes. It runs only on a
//! record that is already on disk, so a crash never leaves the record naming a deleted
//! file; each deletion is one `unlink` (atomic), then the directory is fsynced.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use drover_host::fs::{free_space, remove_temp_files, sync_dir};
use drover_protocol::manifest::Manifest;
use drover_protocol::topics::hex32;

use crate::machine::State;

/// Free space a download must leave for the state file, the spool and the logs.
pub const DISK_RESERVE_BYTES: u64 = 1 << 20;

/// What the record keeps: blob names (`<sha256>.onnx`) and partial-download stems
/// (`<manifest digest>`), in hex.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    blobs: BTreeSet<String>,
    partials: BTreeSet<String>,
}

impl Kept {
    pub fn of(state: &State) -> Kept {
        let mut k = Kept::default();
        for slots in state.models.values() {
            for slot in slots.installed() {
                k.blobs.insert(hex32(&slot.manifest.sha256));
            }
            if let Some(p) = &slots.pending {
                k.blobs.insert(hex32(&p.manifest.sha256));
                k.partials.insert(hex32(&p.model.digest));
            }
        }
        k
    }
}

/// What one collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub files: u64,
    pub bytes: u64,
}

/// Deletes what `kept` (from a record already persisted) does not name.
pub fn collect(data_dir: &Path, kept: &Kept) -> std::io::Result<Collected> {
    let mut c = Collected::default();
    for (sub, names, keep_file) in [
        (
            "blobs",
            &kept.blobs,
            blob_kept as fn(&str, &BTreeSet<String>) -> bool,
        ),
        ("downloads", &kept.partials, partial_kept),
    ] {
        let dir = data_dir.join(sub);
        c.files += remove_temp_files(&dir)? as u64;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut removed = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !entry.file_type()?.is_file() || keep_file(&name, names) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path())?;
            c.files += 1;
            c.bytes += len;
            removed = true;
        }
        if removed {
            sync_dir(&dir)?;
        }
    }
    remove_temp_files(data_dir)?;
    Ok(c)
}

fn blob_kept(name: &str, kept: &BTreeSet<String>) -> bool {
    name.strip_suffix(".onnx").is_some_and(|h| kept.contains(h))
}

fn partial_kept(name: &str, kept: &BTreeSet<String>) -> bool {
    let stem = name
        .strip_suffix(".part")
        .or_else(|| name.strip_suffix(".bitmap"));
    stem.is_some_and(|h| kept.contains(h))
}

/// Refuses a download that would not fit, with the figures: the bytes still to write (the
/// model's size less its chunks already held) against the store's budget `max_bytes`
/// (0: none) given what `blobs/` and `downloads/` hold, then, plus
/// [`DISK_RESERVE_BYTES`], against the free space.
pub fn check_fits(
    data_dir: &Path,
    manifest: &Manifest,
    held: &[bool],
    max_bytes: u64,
) -> Result<(), String> {
    let held_bytes: u64 = held
        .iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(i, _)| chunk_len(manifest, i as u64))
        .sum();
    let needed = manifest.size.saturating_sub(held_bytes);
    if max_bytes > 0 {
        let used = dir_bytes(&data_dir.join("blobs")) + dir_bytes(&data_dir.join("downloads"));
        if used.saturating_add(needed) > max_bytes {
            return Err(format!(
                "over the model store's disk budget: the model needs {needed} more bytes, \
                 the store holds {used} of {max_bytes} bytes (store.max_bytes)"
            ));
        }
    }
    let free = match free_space(data_dir) {
        Ok(f) => f,
        Err(e) => {
            // Unknown is not full: the writes themselves still fail cleanly.
            tracing::warn!(error = %e, "cannot read free disk space; download not checked");
            return Ok(());
        }
    };
    if needed.saturating_add(DISK_RESERVE_BYTES) > free {
        return Err(format!(
            "not enough disk space: the model needs {needed} more bytes \
             (+{DISK_RESERVE_BYTES} reserve), {free} bytes free in {}",
            data_dir.display()
        ));
    }
    Ok(())
}

/// Bytes the files directly in `dir` take (0 when it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn chunk_len(m: &Manifest, index: u64) -> u64 {
    let size = u64::from(m.chunk_size);
    m.size.saturating_sub(index.saturating_mul(size)).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Pending, Slot, SlotState, Slots};
    use drover_protocol::manifest::{chunk_hashes, Lineage};
    use drover_protocol::messages::{DeployMode, ModelRef};
    use drover_protocol::trust::{sha256, KeyId, SigKind, SignedBlob};

    fn manifest(seed: u8) -> Manifest {
        let bytes = vec![seed; 3000];
        Manifest {
            name: "m".into(),
            version: format!("{seed}.0.0"),
            sha256: sha256(&bytes),
            size: bytes.len() as u64,
            chunk_size: 1024,
            chunk_hashes: chunk_hashes(&bytes, 1024),
            inputs: vec![],
            outputs: vec![],
            baseline: None,
            test_vectors: vec![],
            lineage: Lineage::default(),
            created_at_ms: 0,
            sampled_vectors: vec![],
            artifact: None,
        }
    }

    fn model(seed: u8) -> ModelRef {
        ModelRef {
            name: "m".into(),
            version: format!("{seed}.0.0"),
            digest: [seed; 32],
        }
    }

    fn slot(seed: u8) -> Option<Slot> {
        Some(Slot {
            model: model(seed),
            manifest: manifest(seed),
            state: SlotState::Healthy,
            unhealthy_boots: 0,
            activated_by: None,
        })
    }

    fn touch(dir: &Path, sub: &str, name: &str) {
        fs::create_dir_all(dir.join(sub)).unwrap();
        fs::write(dir.join(sub).join(name), b"x").unwrap();
    }

    #[test]
    fn collection_keeps_active_previous_shadow_and_pending_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for seed in 1..=90u8 {
            touch(
                d,
                "blobs",
                &format!("{}.onnx", hex32(&manifest(seed).sha256)),
            );
        }
        for seed in [5u8, 7] {
            touch(d, "downloads", &format!("{}.part", hex32(&[seed; 32])));
            touch(d, "downloads", &format!("{}.bitmap", hex32(&[seed; 32])));
        }
        touch(d, "downloads", ".x.bitmap.tmp");
        touch(d, "blobs", "unrelated.txt");
        let slots = Slots {
            active: slot(90),
            previous: slot(89),
            shadow: slot(3),
            pending: Some(Pending {
                command_seq: 9,
                command_digest: [0; 32],
                manifest_blob: SignedBlob {
                    kind: SigKind::Manifest,
                    key_id: KeyId([0; 8]),
                    payload: vec![],
                    signature: vec![],
                },
                manifest: manifest(7),
                model: model(7),
                mode: DeployMode::Activate,
            }),
        };
        let state = State {
            models: [("m".to_owned(), slots)].into(),
            ..State::default()
        };
        let c = collect(d, &Kept::of(&state)).unwrap();
        let mut left: Vec<String> = ["blobs", "downloads"]
            .iter()
            .flat_map(|s| fs::read_dir(d.join(s)).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{}.onnx", hex32(&manifest(90).sha256)),
            format!("{}.onnx", hex32(&manifest(89).sha256)),
            format!("{}.onnx", hex32(&manifest(3).sha256)),
            format!("{}.onnx", hex32(&manifest(7).sha256)),
            format!("{}.part", hex32(&[7; 32])),
            format!("{}.bitmap", hex32(&[7; 32])),
        ];
        want.sort();
        assert_eq!(left, want);
        // 86 blobs, the unrelated file, one partial with its bitmap, one temp file.
        assert_eq!(c.files, 86 + 1 + 2 + 1);
    }

    #[test]
    fn a_download_that_cannot_fit_is_refused_with_the_figures() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest(1);
        assert_eq!(check_fits(dir.path(), &m, &[false; 3], 0), Ok(()));
        // The budget counts what the store already holds.
        touch(dir.path(), "blobs", "old.onnx");
        fs::write(dir.path().join("blobs/old.onnx"), vec![0; 1_047_000]).unwrap();
        assert_eq!(
            check_fits(dir.path(), &m, &[false; 3], 1 << 20),
            Err(
                "over the model store's disk budget: the model needs 3000 more bytes, \
             the store holds 1047000 of 1048576 bytes (store.max_bytes)"
                    .into()
            )
        );
        assert_eq!(
            check_fits(dir.path(), &m, &[true, true, false], 1 << 20),
            Ok(())
        );
        m.size = u64::MAX / 2;
        let e = check_fits(dir.path(), &m, &[true, false, false], 0).unwrap_err();
        let needed = u64::MAX / 2 - 1024;
        assert!(
            e.starts_with(&format!(
                "not enough disk space: the model needs {needed} more bytes"
            )),
            "{e}"
        );
        assert!(e.contains("bytes free in"), "{e}");
    }
}
