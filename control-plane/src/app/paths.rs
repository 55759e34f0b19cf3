//! Where the server keeps its files under the data directory. The file names are the
//! operator-facing contract (`drover doctor`, the CLI's `--data-dir` discovery read them).

use std::path::{Path, PathBuf};

pub const DB_FILE: &str = "drover.db";
/// The API bearer token (0600).
pub const TOKEN_FILE: &str = "api-token";
/// The bound HTTP address, for CLIs run with `--data-dir`.
pub const URL_FILE: &str = "api-url";
/// Held with an OS file lock by the one `drover serve` using this data directory; holds
/// its pid.
pub const LOCK_FILE: &str = "serve.lock";
pub const MODELS_DIR: &str = "models";
pub const KEYS_DIR: &str = "keys";

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Paths {
    data_dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: PathBuf) -> Self {
        Self { data_dir }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn db(&self) -> PathBuf {
        self.data_dir.join(DB_FILE)
    }

    /// Published model files, named by their sha256.
    pub fn models_dir(&self) -> PathBuf {
        self.data_dir.join(MODELS_DIR)
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join(KEYS_DIR)
    }

    pub fn token_file(&self) -> PathBuf {
        self.data_dir.join(TOKEN_FILE)
    }

    pub fn url_file(&self) -> PathBuf {
        self.data_dir.join(URL_FILE)
    }

    pub fn lock_file(&self) -> PathBuf {
        self.data_dir.join(LOCK_FILE)
    }
}
