//! Chunk serving: requests for the same chunk within a short window are answered by one
//! publish on the model's shared chunk topic, so egress grows with model size, not with
//! the number of downloading devices.
//!
//! [`coalescer`] is the pure core (which chunks are due, clock passed in); this module is
//! its async shell: it reads model files and publishes through the outbox.

pub mod coalescer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::envelope::encode_chunk;
use drover_protocol::messages::{ChunkData, ChunkRequest};
use drover_protocol::topics::hex32;
use drover_protocol::trust::Digest;
use tokio::sync::mpsc;

pub use self::coalescer::Coalescer;

use crate::app::App;
use crate::store::Db;

/// Most chunks a single request may name (bounds the work one frame can cause).
const MAX_INDICES_PER_REQUEST: usize = 65_536;

/// A model file and its chunk size.
type ModelFile = (Arc<Vec<u8>>, u32);

/// Model files by manifest digest, read once.
struct Files {
    store: Db,
    models_dir: PathBuf,
    cache: HashMap<Digest, Option<ModelFile>>,
}

impl Files {
    async fn get(&mut self, digest: Digest) -> Option<ModelFile> {
        if let Some(v) = self.cache.get(&digest) {
            return v.clone();
        }
        let dir = self.models_dir.clone();
        let loaded = self
            .store
            .run(move |s| {
                let row = s.model_by_digest(&digest).ok().flatten()?;
                let bytes = std::fs::read(dir.join(hex32(&row.sha256))).ok()?;
                Some((Arc::new(bytes), row.chunk_size))
            })
            .await
            .ok()
            .flatten();
        if self.cache.len() > 64 {
            self.cache.clear();
        }
        self.cache.insert(digest, loaded.clone());
        loaded
    }
}

/// Serves chunk requests until `rx` closes.
pub async fn run(mut rx: mpsc::UnboundedReceiver<ChunkRequest>, app: App, store: Db) {
    let now_ms = || app.clock.unix_ms();
    let mut co = Coalescer::new(app.settings.chunk_window.as_millis() as u64);
    let mut files = Files {
        store,
        models_dir: app.paths.models_dir(),
        cache: HashMap::new(),
    };
    loop {
        let sleep_for = co
            .next_deadline()
            .map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
        let req = match sleep_for {
            Some(d) => tokio::select! {
                r = rx.recv() => r.map(Some),
                _ = tokio::time::sleep(d) => Some(None),
            },
            None => rx.recv().await.map(Some),
        };
        match req {
            None => return,
            Some(Some(r)) => {
                let now = now_ms();
                for &ix in r.indices.iter().take(MAX_INDICES_PER_REQUEST) {
                    co.request(r.manifest_digest, ix, now);
                }
            }
            Some(None) => {}
        }
        for (digest, index) in co.due(now_ms()) {
            let Some((bytes, chunk_size)) = files.get(digest).await else {
                tracing::debug!(model = %hex32(&digest), "chunk request for an unknown model");
                continue;
            };
            let start = (index as usize).saturating_mul(chunk_size as usize);
            if start >= bytes.len() {
                continue;
            }
            let end = (start + chunk_size as usize).min(bytes.len());
            let frame = encode_chunk(&ChunkData {
                manifest_digest: digest,
                index,
                data: bytes[start..end].to_vec(),
            });
            if let Err(e) = app.outbox.publish_chunk(&digest, frame).await {
                tracing::warn!(error = %e, "chunk publish failed");
            }
        }
    }
}
