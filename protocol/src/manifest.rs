//! Model manifests: what a signing key vouches for about one model file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::messages::ModelRef;
use crate::trust::Digest;

/// Largest model the protocol carries (guards every count derived from `size`).
pub const MAX_MODEL_SIZE: u64 = 1 << 30;
/// Chunk size bounds: large enough to be efficient, small enough for any broker's limit.
pub const MIN_CHUNK_SIZE: u32 = 1024;
pub const MAX_CHUNK_SIZE: u32 = 512 * 1024;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
    U8,
    Bool,
    String,
}

/// Tensor dimension: fixed, or symbolic (a batch axis).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    Fixed(u64),
    Symbolic(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// A concrete tensor in a test vector (row-major).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorValue {
    pub name: String,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Inputs and the outputs a correct runtime must produce for them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestVector {
    pub inputs: Vec<TensorValue>,
    pub outputs: Vec<TensorValue>,
    /// Max absolute difference allowed per element.
    pub tolerance: f32,
}

/// Reference distribution of one input feature, captured at training time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeatureBaseline {
    /// Bin edges (ascending, `n` edges make `n + 1` bins) and the reference count per bin.
    Numeric {
        name: String,
        edges: Vec<f64>,
        counts: Vec<u64>,
        min: f64,
        max: f64,
    },
    /// Category codes and their reference counts; unseen codes fall in an extra bin.
    Categorical {
        name: String,
        categories: Vec<i64>,
        counts: Vec<u64>,
    },
}

/// Everything drift detection compares live data with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub rows: u64,
    pub features: Vec<FeatureBaseline>,
    /// Reference count per predicted class (or per output bin).
    pub predictions: Vec<u64>,
}

/// Where a model came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub parent: Option<ModelRef>,
    pub training_job: Option<String>,
    pub dataset: Option<String>,
    /// Evaluation metrics (ordered: signed bytes must be deterministic).
    pub metrics: BTreeMap<String, f64>,
}

/// The signed description of one model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Semantic version `MAJOR.MINOR.PATCH`.
    pub version: String,
    pub sha256: Digest,
    pub size: u64,
    pub chunk_size: u32,
    pub chunk_hashes: Vec<Digest>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub baseline: Option<Baseline>,
    pub test_vectors: Vec<TestVector>,
    pub lineage: Lineage,
    pub created_at_ms: u64,
}

/// A manifest that cannot be right, whoever signed it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("model name {0:?} is empty, too long or has characters outside [A-Za-z0-9._-]")]
    BadName(String),
    #[error("version {0:?} is not MAJOR.MINOR.PATCH")]
    BadVersion(String),
    #[error("model size {0} is zero or above the {MAX_MODEL_SIZE}-byte limit")]
    BadSize(u64),
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    #[error("{got} chunk hashes for a {size}-byte model in {chunk_size}-byte chunks (expected {expected})")]
    ChunkCount {
        got: usize,
        expected: u64,
        size: u64,
        chunk_size: u32,
    },
}

impl Manifest {
    /// Structural checks that do not need the file.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_model_name(&self.name)?;
        parse_semver(&self.version)
            .ok_or_else(|| ManifestError::BadVersion(self.version.clone()))?;
        if self.size == 0 || self.size > MAX_MODEL_SIZE {
            return Err(ManifestError::BadSize(self.size));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ManifestError::BadChunkSize(self.chunk_size));
        }
        let expected = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunk_hashes.len() as u64 != expected {
            return Err(ManifestError::ChunkCount {
                got: self.chunk_hashes.len(),
                expected,
                size: self.size,
                chunk_size: self.chunk_size,
            });
        }
        Ok(())
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_hashes.len() as u32
    }

    /// Byte length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u32) -> Option<usize> {
        let start = u64::from(index).checked_mul(u64::from(self.chunk_size))?;
        if start >= self.size {
            return None;
        }
        Some((self.size - start).min(u64::from(self.chunk_size)) as usize)
    }
}

pub fn validate_model_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName(name.chars().take(80).collect()))
    }
}

/// Parses `MAJOR.MINOR.PATCH` (no pre-release tags: versions order devices' rollbacks).
pub fn parse_semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.');
    let mut num = || -> Option<u64> {
        let p = it.next()?;
        if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let r = (num()?, num()?, num()?);
    if it.next().is_some() {
        return None;
    }
    Some(r)
}

/// Splits a model file into chunk hashes (pure: the caller reads the file).
pub fn chunk_hashes(bytes: &[u8], chunk_size: u32) -> Vec<Digest> {
    bytes
        .chunks(chunk_size.max(1) as usize)
        .map(crate::trust::sha256)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_parses_strictly() {
        assert_eq!(parse_semver("1.2.3"), Some((1, 2, 3)));
        for bad in ["1.2", "1.2.3.4", "a.b.c", "1..3", "", "1.2.3-rc1", "+1.2.3"] {
            assert_eq!(parse_semver(bad), None, "{bad}");
        }
    }

    #[test]
    fn chunk_len_covers_the_file_exactly() {
        let m = Manifest {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: [0; 32],
            size: 2500,
            chunk_size: 1024,
            chunk_hashes: vec![[0; 32]; 3],
            inputs: vec![],
            outputs: vec![],
            baseline: None,
            test_vectors: vec![],
            lineage: Lineage::default(),
            created_at_ms: 0,
        };
        assert_eq!(m.validate(), Ok(()));
        assert_eq!(m.chunk_len(0), Some(1024));
        assert_eq!(m.chunk_len(2), Some(452));
        assert_eq!(m.chunk_len(3), None);
        let mut bad = m.clone();
        bad.chunk_hashes.pop();
        assert!(matches!(
            bad.validate(),
            Err(ManifestError::ChunkCount {
                got: 2,
                expected: 3,
                ..
            })
        ));
    }
}
