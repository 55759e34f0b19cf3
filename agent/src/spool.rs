//! On-disk uplink spool: every important uplink frame is written here (sealed, with its
//! sequence number) before it is sent, and deleted only when the control plane
//! acknowledges it (`Downlink::UplinkAck`). Bounded in bytes on disk (each record counts
//! the blocks it occupies, not its frame length: a 100-byte frame takes 4 KiB on most file
//! systems): when full, the oldest records go first and are counted (`dropped`, reported
//! in telemetry), never silently; a record that cannot be written (a full disk) is
//! counted as dropped too.
//!
//! Layout: `spool/<seq, 20 digits>.frame`, plus `spool/dropped` holding the drop count.
//! Temp files of interrupted writes are removed when the spool opens.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use drover_host::fs::{remove_temp_files, sync_dir, write_atomic};

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("spool I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

pub struct Spool {
    dir: PathBuf,
    index: BTreeMap<u64, u64>,
    bytes: u64,
    max_bytes: u64,
    dropped: u64,
    /// The file system's block size: what a record is assumed to take before it is
    /// written (then its real allocation counts).
    block: u64,
}

/// Bytes a file takes on disk: its allocated blocks, at least its length.
fn on_disk(meta: &fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512).max(meta.len())
}

/// Which records to evict so that `incoming` more bytes fit (pure: the oldest first).
pub fn evictions(index: &BTreeMap<u64, u64>, bytes: u64, incoming: u64, max: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut total = bytes;
    for (seq, len) in index {
        if total + incoming <= max {
            break;
        }
        out.push(*seq);
        total -= len;
    }
    out
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        // Best effort: leftovers must not stop the agent from starting.
        if let Err(e) = remove_temp_files(dir) {
            tracing::warn!(error = %e, "cannot remove temp files from the spool");
        }
        let block = fs::metadata(dir).map_err(io(dir))?.blksize().max(512);
        let mut index = BTreeMap::new();
        let mut bytes = 0;
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(seq) = name
                .strip_suffix(".frame")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let len = on_disk(&entry.metadata().map_err(io(dir))?);
            index.insert(seq, len);
            bytes += len;
        }
        let dropped = fs::read_to_string(dir.join("dropped"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Spool {
            dir: dir.to_owned(),
            index,
            bytes,
            max_bytes,
            dropped,
            block,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.frame"))
    }

    /// Stores one sealed frame durably; evicts (and counts) the oldest when full. A frame
    /// that cannot be written is counted as dropped and the error returned.
    pub fn push(&mut self, seq: u64, frame: &[u8]) -> Result<(), SpoolError> {
        let len = (frame.len() as u64).div_ceil(self.block) * self.block;
        let evict = evictions(&self.index, self.bytes, len, self.max_bytes);
        if !evict.is_empty() {
            for s in &evict {
                self.remove(*s)?;
            }
            self.dropped += evict.len() as u64;
            tracing::warn!(
                dropped = evict.len(),
                total_dropped = self.dropped,
                "uplink spool full: oldest records dropped"
            );
            // Best effort: the frame below is still written (or counted) either way.
            if let Err(e) = self.save_dropped() {
                tracing::warn!(error = %e, "cannot persist the spool's drop count");
            }
        }
        let p = self.path(seq);
        if let Err(e) = write_atomic(&p, frame) {
            self.dropped += 1;
            // Best effort: on a full disk the count may not be writable either; it is
            // still reported from memory.
            let _ = self.save_dropped();
            return Err(io(&p)(e));
        }
        let len = fs::metadata(&p).map(|m| on_disk(&m)).unwrap_or(len);
        self.index.insert(seq, len);
        self.bytes += len;
        Ok(())
    }

    fn save_dropped(&self) -> Result<(), SpoolError> {
        let p = self.dir.join("dropped");
        write_atomic(&p, self.dropped.to_string().as_bytes()).map_err(io(&p))
    }

    fn remove(&mut self, seq: u64) -> Result<(), SpoolError> {
        if let Some(len) = self.index.remove(&seq) {
            self.bytes -= len;
            let p = self.path(seq);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        Ok(())
    }

    /// Deletes acknowledged records (inclusive ranges).
    pub fn ack(&mut self, ranges: &[(u64, u64)]) -> Result<usize, SpoolError> {
        let mut seqs = Vec::new();
        for (lo, hi) in ranges {
            if lo > hi {
                continue;
            }
            seqs.extend(self.index.range(*lo..=*hi).map(|(s, _)| *s));
        }
        for s in &seqs {
            self.remove(*s)?;
        }
        if !seqs.is_empty() {
            sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        Ok(seqs.len())
    }

    /// Unacknowledged sequence numbers, oldest first.
    pub fn seqs(&self) -> Vec<u64> {
        self.index.keys().copied().collect()
    }

    /// Number of records below `seq`.
    pub fn count_below(&self, seq: u64) -> usize {
        self.index.range(..seq).count()
    }

    /// Up to `limit` sequence numbers in `from..to`, oldest first.
    pub fn range(&self, from: u64, to: u64, limit: usize) -> Vec<u64> {
        if from >= to {
            return Vec::new();
        }
        self.index
            .range(from..to)
            .take(limit)
            .map(|(s, _)| *s)
            .collect()
    }

    pub fn read(&self, seq: u64) -> Result<Vec<u8>, SpoolError> {
        let p = self.path(seq);
        fs::read(&p).map_err(io(&p))
    }

    pub fn max_seq(&self) -> Option<u64> {
        self.index.keys().next_back().copied()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_acks_delete_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        for seq in 1..=5 {
            s.push(seq, &[seq as u8; 10]).unwrap();
        }
        assert_eq!(s.ack(&[(2, 3)]).unwrap(), 2);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.seqs(), vec![1, 4, 5]);
        assert_eq!(s.read(4).unwrap(), vec![4; 10]);
        // Bytes on disk: at least the frames, in whole blocks.
        assert!(s.bytes() >= 30 && s.bytes() % 512 == 0, "{}", s.bytes());
    }

    #[test]
    fn full_spool_drops_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let block = Spool::open(dir.path(), 100).unwrap().block;
        let cap = 10 * block;
        let mut s = Spool::open(dir.path(), cap).unwrap();
        for seq in 1..=12 {
            s.push(seq, &[0; 10]).unwrap();
        }
        assert_eq!(s.seqs(), (3..=12).collect::<Vec<_>>());
        assert_eq!(s.dropped(), 2);
        assert_eq!(Spool::open(dir.path(), cap).unwrap().dropped(), 2);
    }

    /// Issue 24 fault 6: the cap counted frame bytes, so a 75 KB cap held 1.8 MB of small
    /// frames on disk.
    #[test]
    fn the_cap_holds_for_bytes_on_disk_not_frame_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 75 * 1024;
        let mut s = Spool::open(dir.path(), cap).unwrap();
        for seq in 1..=600 {
            s.push(seq, &[7; 120]).unwrap();
        }
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| on_disk(&e.unwrap().metadata().unwrap()))
            .sum();
        assert!(
            on_disk <= cap + s.block,
            "{on_disk} bytes on disk, cap {cap}"
        );
        assert_eq!(s.dropped() + s.len() as u64, 600);
        assert_eq!(s.bytes(), on_disk - on_disk_of(&dir.path().join("dropped")));
    }

    fn on_disk_of(p: &Path) -> u64 {
        fs::metadata(p).map(|m| on_disk(&m)).unwrap_or(0)
    }

    #[test]
    fn orphan_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".00000000000000000007.frame.tmp"), b"x").unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(s.is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn eviction_is_oldest_first_and_minimal() {
        let idx: BTreeMap<u64, u64> = [(1, 40), (2, 40), (3, 10)].into_iter().collect();
        assert_eq!(evictions(&idx, 90, 10, 100), Vec::<u64>::new());
        assert_eq!(evictions(&idx, 90, 20, 100), vec![1]);
        assert_eq!(evictions(&idx, 90, 60, 100), vec![1, 2]);
    }
}
