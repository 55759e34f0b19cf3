//! Retained chunks: while a model is being deployed, each of its chunks sits on the broker
//! as a retained message on a topic of its own ([`topics::model_chunk`]), so a device gets
//! the whole model from the broker the moment it subscribes, with no request and no wait
//! for the [`super::coalescer`]. The control plane publishes a model once per deployment
//! period, whatever the number of devices (chunk egress one model), and the broker's
//! fan-out is the only limit on how fast devices receive it.
//!
//! A model is published before the first deploy command naming it is sent (a device that
//! subscribes after that finds it retained; one already subscribed gets it live), kept
//! while deploy commands for it go out, and cleared (an empty retained publish per chunk)
//! once `chunk_retain` has passed since the last. What is retained is recorded in
//! `<data>/retained-chunks.json`, so a restart clears what an earlier run left on an
//! external broker. Requests still work: a device that gets nothing on subscribing (a
//! broker without retained messages, an ACL without the retained topics, a model cleared
//! since) asks after the agent's retry interval and is served on the shared topic.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use drover_host::clock::SharedClock;
use drover_protocol::envelope::encode_chunk;
use drover_protocol::messages::ChunkData;
use drover_protocol::topics::{hex32, parse_hex32};
use drover_protocol::trust::Digest;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::app::{Outbox, Paths};
use crate::config::Settings;
use crate::store::{CommandRow, Db};

/// Where the retained models are recorded, under the data directory.
pub const RECORD_FILE: &str = "retained-chunks.json";

/// One retained model: how many chunk topics hold it, and until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    chunks: u32,
    until_ms: u64,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Retained {
    inner: Arc<Inner>,
}

struct Inner {
    store: Db,
    outbox: Outbox,
    clock: SharedClock,
    models_dir: PathBuf,
    record: PathBuf,
    window_ms: u64,
    models: Mutex<HashMap<Digest, Entry>>,
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("window_ms", &self.inner.window_ms)
            .finish_non_exhaustive()
    }
}

impl Retained {
    /// Retains for `settings.chunk_retain` (zero: nothing). Reads what an earlier run
    /// recorded (cleared by the next [`Retained::sweep`] once its time is up); an
    /// unreadable record is logged and started over.
    pub fn new(
        store: Db,
        outbox: Outbox,
        clock: &SharedClock,
        paths: &Paths,
        settings: &Settings,
    ) -> Self {
        let record = paths.data_dir().join(RECORD_FILE);
        let models = match std::fs::read(&record) {
            Ok(bytes) => parse_record(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %record.display(), error = %e, "retained chunk record unreadable; starting a new one");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        Retained {
            inner: Arc::new(Inner {
                store,
                outbox,
                clock: Arc::clone(clock),
                models_dir: paths.models_dir(),
                record,
                window_ms: u64::try_from(settings.chunk_retain.as_millis()).unwrap_or(u64::MAX),
                models: Mutex::new(models),
            }),
        }
    }

    /// A deploy command for this model is about to be sent: publishes its chunks retained
    /// unless they already are, and keeps them `chunk_retain` from now.
    pub async fn keep(&self, digest: Digest) {
        let me = &self.inner;
        if me.window_ms == 0 {
            return;
        }
        let until_ms = me.clock.unix_ms().saturating_add(me.window_ms);
        let mut models = me.models.lock().await;
        if let Some(e) = models.get_mut(&digest) {
            e.until_ms = e.until_ms.max(until_ms);
            return;
        }
        let dir = me.models_dir.clone();
        let loaded = me
            .store
            .run(move |s| {
                let row = s.model_by_digest(&digest).ok().flatten()?;
                let bytes = std::fs::read(dir.join(hex32(&row.sha256))).ok()?;
                Some((bytes, row.chunk_size))
            })
            .await
            .ok()
            .flatten();
        let Some((bytes, chunk_size)) = loaded else {
            tracing::warn!(model = %hex32(&digest), "model file not found; its chunks are served on request only");
            return;
        };
        let pieces = bytes.chunks(chunk_size.max(1) as usize);
        let chunks = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
        // Recorded first: a publish that fails half-way still gets cleared.
        models.insert(digest, Entry { chunks, until_ms });
        me.save(&models).await;
        for (index, data) in (0..chunks).zip(pieces) {
            let frame = encode_chunk(&ChunkData {
                manifest_digest: digest,
                index,
                data: data.to_vec(),
            });
            if let Err(e) = me
                .outbox
                .publish_retained_chunk(&digest, index, frame)
                .await
            {
                tracing::warn!(model = %hex32(&digest), error = %e, "retained chunk publish failed; devices ask for what they miss");
                break;
            }
        }
        tracing::info!(model = %hex32(&digest), chunks, "model chunks retained on the broker");
    }

    /// Clears every model whose time is up (an empty retained publish per chunk).
    pub async fn sweep(&self) {
        let me = &self.inner;
        let now = me.clock.unix_ms();
        let mut models = me.models.lock().await;
        let due: Vec<(Digest, Entry)> = models
            .iter()
            .filter(|(_, e)| e.until_ms <= now)
            .map(|(d, e)| (*d, *e))
            .collect();
        if due.is_empty() {
            return;
        }
        for (digest, e) in due {
            let cleared = async {
                for index in 0..e.chunks {
                    me.outbox.clear_retained_chunk(&digest, index).await?;
                }
                Ok::<(), crate::mqtt::MqttError>(())
            };
            match cleared.await {
                Ok(()) => {
                    models.remove(&digest);
                    tracing::info!(model = %hex32(&digest), chunks = e.chunks, "retained model chunks cleared");
                }
                // Kept in the record: tried again at the next sweep.
                Err(e) => {
                    tracing::warn!(model = %hex32(&digest), error = %e, "cannot clear retained chunks")
                }
            }
        }
        me.save(&models).await;
    }

    /// [`Retained::keep`] for every model these commands deploy, before they go out.
    pub async fn keep_deployed(&self, rows: &[CommandRow]) {
        let models: BTreeSet<Digest> = rows
            .iter()
            .filter(|r| r.kind == "deploy")
            .filter_map(|r| r.model_digest)
            .collect();
        for digest in models {
            self.keep(digest).await;
        }
    }

    /// The models retained now, by digest, and until when (for tests and tools).
    pub async fn retained(&self) -> Vec<(Digest, u64)> {
        let models = self.inner.models.lock().await;
        let mut v: Vec<_> = models.iter().map(|(d, e)| (*d, e.until_ms)).collect();
        v.sort();
        v
    }
}

impl Inner {
    async fn save(&self, models: &HashMap<Digest, Entry>) {
        let json: HashMap<String, Entry> = models.iter().map(|(d, e)| (hex32(d), *e)).collect();
        let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
        let path = self.record.clone();
        let written =
            tokio::task::spawn_blocking(move || drover_host::fs::write_atomic(&path, &bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(file = %self.record.display(), "cannot record the retained models; a restart may leave them on an external broker");
        }
    }
}

fn parse_record(bytes: &[u8]) -> Result<HashMap<Digest, Entry>, String> {
    let json: HashMap<String, Entry> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    json.into_iter()
        .map(|(k, e)| {
            parse_hex32(&k)
                .map(|d| (d, e))
                .ok_or_else(|| format!("{k:?} is not a model digest"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_bad_records_are_refused() {
        let e = Entry {
            chunks: 17,
            until_ms: 99,
        };
        let json = serde_json::to_vec(&HashMap::from([(hex32(&[5; 32]), e)])).unwrap();
        assert_eq!(parse_record(&json).unwrap(), HashMap::from([([5; 32], e)]));
        for bad in [
            &b"not json"[..],
            br#"{"zz": {"chunks": 1, "until_ms": 2}}"#,
            br#"{"0505": {"chunks": 1}}"#,
        ] {
            assert!(
                parse_record(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
