//! Chunk serving: requests for the same chunk within a short window are answered by one
//! publish on the model's shared chunk topic, so egress grows with model size, not with
//! the number of downloading devices.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::envelope::encode_chunk;
use drover_protocol::messages::{ChunkData, ChunkRequest};
use drover_protocol::topics::{self, hex32};
use drover_protocol::trust::Digest;
use rumqttc::QoS;
use tokio::sync::mpsc;

use crate::mqtt::MqttLink;
use crate::serve::Shared;
use crate::store::Db;
use drover_host::clock::now_ms;

/// Pure core: which chunks are due for publishing at `now`. Clock passed in.
#[derive(Debug, Default)]
pub struct Coalescer {
    window_ms: u64,
    /// (model, chunk) → when it was first requested in the current window.
    pending: BTreeMap<(Digest, u32), u64>,
}

impl Coalescer {
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms,
            pending: BTreeMap::new(),
        }
    }

    /// Records a request; a chunk already pending is not queued twice.
    pub fn request(&mut self, digest: Digest, index: u32, now_ms: u64) {
        self.pending.entry((digest, index)).or_insert(now_ms);
    }

    /// Removes and returns the chunks whose window has closed.
    pub fn due(&mut self, now_ms: u64) -> Vec<(Digest, u32)> {
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, t)| now_ms >= t.saturating_add(self.window_ms))
            .map(|(k, _)| *k)
            .collect();
        for k in &due {
            self.pending.remove(k);
        }
        due
    }

    /// When the next window closes, if anything is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending
            .values()
            .min()
            .map(|t| t.saturating_add(self.window_ms))
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

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
pub async fn run(
    mut rx: mpsc::UnboundedReceiver<ChunkRequest>,
    shared: Arc<Shared>,
    mqtt: Arc<MqttLink>,
    store: Db,
    window_ms: u64,
) {
    let mut co = Coalescer::new(window_ms);
    let mut files = Files {
        store,
        models_dir: shared.data_dir.join("models"),
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
            let len = frame.len() as u64;
            match mqtt
                .publish(
                    topics::model_chunks(&digest),
                    frame,
                    QoS::AtLeastOnce,
                    false,
                )
                .await
            {
                Ok(()) => {
                    shared.metrics.chunk_publishes.fetch_add(1, Relaxed);
                    shared.metrics.chunk_bytes.fetch_add(len, Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "chunk publish failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_for_one_chunk_within_a_window_are_published_once() {
        let mut c = Coalescer::new(100);
        for dev in 0..20u64 {
            c.request([1; 32], 0, 1_000 + dev);
            c.request([1; 32], 1, 1_000 + dev);
        }
        assert!(c.due(1_099).is_empty());
        assert_eq!(c.next_deadline(), Some(1_100));
        assert_eq!(c.due(1_100), vec![([1; 32], 0), ([1; 32], 1)]);
        assert!(c.is_empty());
        c.request([1; 32], 0, 2_000);
        assert_eq!(c.due(2_100).len(), 1);
    }
}
