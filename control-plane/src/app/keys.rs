//! The signing keys and keyring of the running server, swapped in place by
//! `drover keys rotate` (through the API): no restart, and holders keep a consistent
//! snapshot of the keys they started with.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::keys::{self, KeyError, Keys};

/// Cheap to clone; every clone sees the same keys.
#[derive(Clone, Debug)]
pub struct KeyStore {
    current: Arc<RwLock<Arc<Keys>>>,
    data_dir: PathBuf,
}

impl KeyStore {
    pub fn new(keys: Keys, data_dir: PathBuf) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(keys))),
            data_dir,
        }
    }

    /// The current keys.
    pub fn current(&self) -> Arc<Keys> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reloads the key files (after `drover keys rotate`) and swaps them in. Blocking file
    /// work: call from a blocking thread.
    pub fn reload_blocking(&self) -> Result<Arc<Keys>, KeyError> {
        let keys = Arc::new(keys::load(&self.data_dir)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&keys);
        Ok(keys)
    }
}
