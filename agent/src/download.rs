//! Resumable chunked download into the model store.
//!
//! Each chunk, checked against the signed manifest's hash by the deployment machine
//! before it gets here, is written at its offset in
//! `downloads/<manifest digest>.part`; after the data is fsynced, a bitmap of verified
//! chunks is persisted atomically, so a restart never re-fetches a verified chunk. The whole
//! file is then hashed while streaming (never held in memory) and renamed into
//! `blobs/<sha256>.onnx`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use drover_protocol::manifest::Manifest;
use drover_protocol::topics::hex32;
use drover_protocol::trust::{verify_file, Digest, TrustError};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use drover_host::crash;
use drover_host::fs::{sync_dir, write_atomic};

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("download I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Trust(#[from] TrustError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn blob_path(data_dir: &Path, sha256: &Digest) -> PathBuf {
    data_dir
        .join("blobs")
        .join(format!("{}.onnx", hex32(sha256)))
}

fn part_path(data_dir: &Path, manifest_digest: &Digest) -> PathBuf {
    data_dir
        .join("downloads")
        .join(format!("{}.part", hex32(manifest_digest)))
}

fn bitmap_path(data_dir: &Path, manifest_digest: &Digest) -> PathBuf {
    data_dir
        .join("downloads")
        .join(format!("{}.bitmap", hex32(manifest_digest)))
}

/// Chunks of a download already verified and durably written (for tests and tools).
pub fn verified_chunks(data_dir: &Path, manifest_digest: &Digest) -> Vec<u32> {
    let bits = fs::read(bitmap_path(data_dir, manifest_digest)).unwrap_or_default();
    bits.iter()
        .enumerate()
        .filter(|(_, b)| **b == 1)
        .map(|(i, _)| i as u32)
        .collect()
}

pub struct Download {
    data_dir: PathBuf,
    manifest: Manifest,
    digest: Digest,
    file: File,
    bitmap: Vec<u8>,
}

impl Download {
    /// Opens (or resumes) the download of the model this manifest describes.
    pub fn open(
        data_dir: &Path,
        manifest_digest: Digest,
        manifest: &Manifest,
    ) -> Result<Download, DownloadError> {
        let dir = data_dir.join("downloads");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        fs::create_dir_all(data_dir.join("blobs")).map_err(io(&dir))?;
        let part = part_path(data_dir, &manifest_digest);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(io(&part))?;
        let n = manifest.chunk_count() as usize;
        let mut bitmap = fs::read(bitmap_path(data_dir, &manifest_digest)).unwrap_or_default();
        if bitmap.len() != n {
            bitmap = vec![0; n];
        }
        Ok(Download {
            data_dir: data_dir.to_owned(),
            manifest: manifest.clone(),
            digest: manifest_digest,
            file,
            bitmap,
        })
    }

    /// The model this download is for (its signed manifest's digest).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// One flag per chunk: verified and durably written.
    pub fn have(&self) -> Vec<bool> {
        self.bitmap.iter().map(|b| *b == 1).collect()
    }

    /// Stores one chunk the caller verified against the manifest
    /// (`crate::machine` checks every chunk before asking for it to be written): data
    /// first, fsynced, then the bitmap that records it.
    pub fn write(&mut self, index: u32, data: &[u8]) -> Result<(), DownloadError> {
        let part = part_path(&self.data_dir, &self.digest);
        if index as usize >= self.bitmap.len() {
            return Err(DownloadError::Trust(TrustError::ChunkIndex {
                index,
                count: self.manifest.chunk_count(),
            }));
        }
        crash::point("download.before_chunk_write");
        let offset = u64::from(index) * u64::from(self.manifest.chunk_size);
        self.file.seek(SeekFrom::Start(offset)).map_err(io(&part))?;
        self.file.write_all(data).map_err(io(&part))?;
        self.file.sync_data().map_err(io(&part))?;
        crash::point("download.after_chunk_write");
        if let Some(b) = self.bitmap.get_mut(index as usize) {
            *b = 1;
        }
        let bp = bitmap_path(&self.data_dir, &self.digest);
        write_atomic(&bp, &self.bitmap).map_err(io(&bp))?;
        crash::point("download.after_bitmap_write");
        Ok(())
    }

    /// Hashes the assembled file (streaming), checks it against the manifest and moves it
    /// into `blobs/`. Returns the blob path.
    pub fn finish(self) -> Result<PathBuf, DownloadError> {
        let part = part_path(&self.data_dir, &self.digest);
        let (size, digest) = hash_file(&part).map_err(io(&part))?;
        if let Err(e) = verify_file(&self.manifest, size, &digest) {
            // A file that fails as a whole cannot be trusted chunk by chunk either.
            let _ = fs::remove_file(bitmap_path(&self.data_dir, &self.digest));
            let _ = fs::remove_file(&part);
            return Err(e.into());
        }
        crash::point("download.before_blob_rename");
        let blob = blob_path(&self.data_dir, &self.manifest.sha256);
        fs::rename(&part, &blob).map_err(io(&blob))?;
        if let Some(dir) = blob.parent() {
            sync_dir(dir).map_err(io(dir))?;
        }
        crash::point("download.after_blob_rename");
        let _ = fs::remove_file(bitmap_path(&self.data_dir, &self.digest));
        Ok(blob)
    }
}

/// Size and SHA-256 of a file, read in 64 KiB blocks.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, Digest)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, h.finalize().into()))
}

/// Whether the verified blob for this manifest is already in the store.
pub fn blob_is_valid(data_dir: &Path, manifest: &Manifest) -> bool {
    let p = blob_path(data_dir, &manifest.sha256);
    match hash_file(&p) {
        Ok((size, digest)) => verify_file(manifest, size, &digest).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::manifest::{chunk_hashes, Lineage};
    use drover_protocol::trust::sha256;

    fn manifest(bytes: &[u8]) -> Manifest {
        Manifest {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: sha256(bytes),
            size: bytes.len() as u64,
            chunk_size: 1024,
            chunk_hashes: chunk_hashes(bytes, 1024),
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

    #[test]
    fn resumes_with_written_chunks_and_refuses_a_wrong_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let m = manifest(&bytes);
        let mut d = Download::open(dir.path(), [1; 32], &m).unwrap();
        assert_eq!(d.have(), vec![false, false, false]);
        d.write(1, &bytes[1024..2048]).unwrap();
        assert!(matches!(
            d.write(3, &bytes[..10]),
            Err(DownloadError::Trust(TrustError::ChunkIndex {
                index: 3,
                ..
            }))
        ));
        drop(d);
        let mut d = Download::open(dir.path(), [1; 32], &m).unwrap();
        assert_eq!(d.have(), vec![false, true, false]);
        assert_eq!(verified_chunks(dir.path(), &[1; 32]), vec![1]);
        d.write(0, &bytes[..1024]).unwrap();
        d.write(2, &bytes[2048..]).unwrap();
        let blob = d.finish().unwrap();
        assert_eq!(fs::read(blob).unwrap(), bytes);
        assert!(blob_is_valid(dir.path(), &m));

        // A file that fails as a whole is refused and its partial state forgotten.
        let mut d = Download::open(dir.path(), [2; 32], &m).unwrap();
        d.write(0, &bytes[1024..2048]).unwrap();
        d.write(1, &bytes[1024..2048]).unwrap();
        d.write(2, &bytes[2048..]).unwrap();
        assert!(matches!(
            d.finish(),
            Err(DownloadError::Trust(TrustError::FileHash { .. }))
        ));
        assert!(verified_chunks(dir.path(), &[2; 32]).is_empty());
    }
}
