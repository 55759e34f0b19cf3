//! Training jobs: the job spec (TOML), the dataset a job trains on, and the executors that
//! run it (a local process, or a Slurm batch job).
//!
//! The contract with a trainer, in any language: it reads the training CSV named by
//! `{dataset}` (also `$DROVER_DATASET`; header of feature names, last column `label`, an
//! integer class) and writes `model.onnx` and `metrics.json` into the directory named by
//! `{out}` (also `$DROVER_OUT`). Everything else (held-out data, scoring, signing) stays
//! with the control plane, so a trainer cannot grade its own work.

pub mod dataset;
pub mod local;
pub mod slurm;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::JobState;

pub use dataset::{Dataset, DatasetError, Row};

/// Where a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Local,
    Slurm,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// What a job may use (Slurm passes these to sbatch; the local executor runs one job per
/// permit of its concurrency limit).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub cpus: u32,
    pub memory_mb: Option<u64>,
    pub partition: Option<String>,
}

fn one() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_mb: None,
            partition: None,
        }
    }
}

/// What a job trains on: a base dataset plus labeled fleet samples since a time, with a
/// deterministic held-out split.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRecipe {
    /// CSV with a header of feature names and a last `label` column.
    pub base: Option<PathBuf>,
    /// Labeled fleet samples taken within this many hours before the job (0: none).
    #[serde(default = "default_fleet_hours")]
    pub fleet_since_hours: f64,
    /// Fraction of rows held out for the evaluation gate.
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
}

fn default_fleet_hours() -> f64 {
    24.0 * 7.0
}
fn default_holdout() -> f64 {
    0.25
}

/// A training job, as written in a job spec file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub version: u32,
    pub name: String,
    /// Program and arguments; `{dataset}`, `{out}` and `{job_dir}` are substituted.
    pub command: Vec<String>,
    pub executor: ExecutorKind,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub resources: Resources,
    pub dataset: DatasetRecipe,
}

fn default_timeout() -> u64 {
    3600
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job spec {path}: {detail}")]
    Spec { path: String, detail: String },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("slurm: {0}")]
    Slurm(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl JobSpec {
    /// Parses and validates a spec; every problem is reported at once. `origin` names the
    /// file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<JobSpec, JobError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| JobError::Spec {
            path: origin.to_owned(),
            detail: e.to_string(),
        })?;
        let mut problems = Vec::new();
        if spec.version != 1 {
            problems.push(format!("version = {} (this build reads 1)", spec.version));
        }
        if spec.name.is_empty()
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problems.push(format!("name {:?} must be [A-Za-z0-9._-]+", spec.name));
        }
        if spec.command.first().is_none_or(|c| c.is_empty()) {
            problems.push("command is empty".into());
        }
        if spec.timeout_secs == 0 {
            problems.push("timeout_secs must be above 0".into());
        }
        if spec.resources.cpus == 0 {
            problems.push("resources.cpus must be above 0".into());
        }
        let h = spec.dataset.holdout_fraction;
        if !(h > 0.0 && h < 1.0) {
            problems.push(format!(
                "dataset.holdout_fraction = {h} must be within (0, 1)"
            ));
        }
        if !(spec.dataset.fleet_since_hours >= 0.0 && spec.dataset.fleet_since_hours.is_finite()) {
            problems.push("dataset.fleet_since_hours must be >= 0".into());
        }
        if spec.dataset.base.is_none() && spec.dataset.fleet_since_hours == 0.0 {
            problems.push("dataset has neither a base file nor fleet samples".into());
        }
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(JobError::Spec {
                path: origin.to_owned(),
                detail: problems.join("; "),
            })
        }
    }

    /// The command line with placeholders filled in.
    pub fn argv(&self, paths: &JobPaths) -> Vec<String> {
        self.command
            .iter()
            .map(|a| {
                a.replace("{dataset}", &paths.train.to_string_lossy())
                    .replace("{out}", &paths.out.to_string_lossy())
                    .replace("{job_dir}", &paths.dir.to_string_lossy())
            })
            .collect()
    }
}

/// Files of one job, all under its own directory.
#[derive(Clone, Debug)]
pub struct JobPaths {
    pub dir: PathBuf,
    pub train: PathBuf,
    pub holdout: PathBuf,
    pub out: PathBuf,
    pub log: PathBuf,
}

impl JobPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            train: dir.join("train.csv"),
            holdout: dir.join("holdout.csv"),
            out: dir.join("out"),
            log: dir.join("job.log"),
        }
    }

    pub fn model(&self) -> PathBuf {
        self.out.join("model.onnx")
    }

    pub fn metrics(&self) -> PathBuf {
        self.out.join("metrics.json")
    }
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed { exit_code: Option<i64> },
    TimedOut,
    Cancelled,
}

impl Outcome {
    /// The job state this ending is recorded as.
    pub fn state(&self) -> JobState {
        match self {
            Outcome::Succeeded => JobState::Succeeded,
            Outcome::Failed { .. } => JobState::Failed,
            Outcome::TimedOut => JobState::TimedOut,
            Outcome::Cancelled => JobState::Cancelled,
        }
    }
}

/// The last `lines` lines of a log file (what a failed job is reported with).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => return format!("(no log at {}: {e})", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Checks the trainer kept the contract: `model.onnx` and `metrics.json` (a JSON object)
/// exist in the output directory.
pub fn check_outputs(paths: &JobPaths) -> Result<(Vec<u8>, serde_json::Value), String> {
    let model = std::fs::read(paths.model())
        .map_err(|e| format!("trainer wrote no {}: {e}", paths.model().display()))?;
    let metrics = std::fs::read_to_string(paths.metrics())
        .map_err(|e| format!("trainer wrote no {}: {e}", paths.metrics().display()))?;
    let metrics: serde_json::Value = serde_json::from_str(&metrics)
        .map_err(|e| format!("{} is not JSON: {e}", paths.metrics().display()))?;
    if !metrics.is_object() {
        return Err(format!(
            "{} is not a JSON object",
            paths.metrics().display()
        ));
    }
    Ok((model, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_are_reported_together() {
        let text = r#"
version = 2
name = "bad name"
command = []
executor = "local"
timeout_secs = 0
[dataset]
holdout_fraction = 1.5
fleet_since_hours = 0
"#;
        let e = JobSpec::parse(text, "job.toml")
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        for needle in [
            "version = 2",
            "name \"bad name\"",
            "command is empty",
            "timeout_secs",
            "holdout_fraction = 1.5",
            "neither a base file",
        ] {
            assert!(e.contains(needle), "{needle} missing from {e}");
        }
    }

    #[test]
    fn unknown_executor_is_refused() {
        let text = "version = 1\nname = \"j\"\ncommand = [\"x\"]\nexecutor = \"k8s\"\n[dataset]\n";
        let e = JobSpec::parse(text, "job.toml")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("unknown variant `k8s`")));
    }
}
