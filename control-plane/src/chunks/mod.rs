//! Chunk serving: chunk requests are answered by publishes on the model's shared chunk
//! topic, timed by the [`coalescer`] so that one publish serves every device downloading
//! the model at the time, and egress stays a small multiple of the model size at any
//! number of downloading devices.
//!
//! A request is served only for a model the requesting device was commanded to fetch (an
//! unexpired deploy command naming that manifest, issued to that device), and only within
//! the device's byte budget ([`DEVICE_BUDGET_BYTES`] per [`DEVICE_BUDGET_WINDOW_MS`]):
//! every publish reaches every device downloading the model, so one device must not be
//! able to multiply a model's egress. Refusals are counted by reason in the metrics and
//! logged at most once per device and reason per minute.
//!
//! [`coalescer`] and [`budget`] are the pure cores (clock passed in); this module is their
//! async shell: it asks the store what a device was commanded, reads model files and
//! publishes through the outbox.

pub mod budget;
pub mod coalescer;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use drover_protocol::envelope::encode_chunk;
use drover_protocol::messages::{ChunkData, ChunkRequest};
use drover_protocol::topics::hex32;
use drover_protocol::trust::Digest;
use drover_protocol::DeviceId;
use tokio::sync::mpsc;

pub use self::budget::DeviceBudget;
pub use self::coalescer::Coalescer;

use crate::app::App;
use crate::store::Db;

/// Most chunks a single request may name (bounds the work one frame can cause).
const MAX_INDICES_PER_REQUEST: usize = 65_536;

/// Chunk bytes one device may have published per window: two of the agent's request
/// batches of the largest chunks (64 × 512 KiB), about 6 MB/s sustained per device.
pub const DEVICE_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
pub const DEVICE_BUDGET_WINDOW_MS: u64 = 10_000;

/// How long a "not commanded" answer is remembered before the store is asked again:
/// shorter than the agent's chunk retry (2 s), so a device commanded just after being
/// refused is served on its next retry.
const REFUSAL_MEMORY_MS: u64 = 1_000;

/// Refusal logs: at most one per device and reason per minute.
const LOG_INTERVAL_MS: u64 = 60_000;

/// Events handled together (one store lookup for all of them; bounds how long that
/// lookup holds the store).
const MAX_EVENTS_PER_BATCH: usize = 4_096;

/// Authorizations remembered before the cache is cleared (bounds its memory).
const MAX_REMEMBERED: usize = 100_000;

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

/// Why a chunk request was refused (the metric's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Refused {
    NotCommanded,
    UnknownModel,
    RateLimited,
}

impl Refused {
    fn as_str(self) -> &'static str {
        match self {
            Refused::NotCommanded => "not_commanded",
            Refused::UnknownModel => "unknown_model",
            Refused::RateLimited => "rate_limited",
        }
    }

    fn counter(self, app: &App) -> &AtomicU64 {
        let m = &app.metrics;
        match self {
            Refused::NotCommanded => &m.chunk_refused_not_commanded,
            Refused::UnknownModel => &m.chunk_refused_unknown_model,
            Refused::RateLimited => &m.chunk_refused_rate_limited,
        }
    }
}

/// Whether a device may fetch a model, remembered until `until_ms`.
#[derive(Clone, Copy, Debug)]
struct Authorization {
    allowed: bool,
    until_ms: u64,
}

struct Server {
    app: App,
    files: Files,
    co: Coalescer,
    budget: DeviceBudget,
    authorized: HashMap<(DeviceId, Digest), Authorization>,
    last_logged: HashMap<(DeviceId, Refused), u64>,
}

impl Server {
    fn refuse(&mut self, device: &DeviceId, why: Refused, digest: &Digest, now: u64) {
        why.counter(&self.app).fetch_add(1, Relaxed);
        let key = (device.clone(), why);
        let due = self
            .last_logged
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= LOG_INTERVAL_MS);
        if due {
            if self.last_logged.len() > MAX_REMEMBERED {
                self.last_logged.clear();
            }
            self.last_logged.insert(key, now);
            tracing::warn!(device_id = %device, model = %hex32(digest), reason = why.as_str(), "chunk request refused");
        }
    }

    /// Looks up, in one store call, whether each requesting device holds an unexpired
    /// deploy command for the model it asks for, for the pairs not remembered. One call
    /// per batch of events, not one per request: a wave's thousands of first asks would
    /// otherwise each wait for a blocking-pool hop and the store's lock, one after
    /// another, behind the rollout driver and the API.
    async fn authorize(&mut self, events: &[ChunkEvent], now: u64) {
        let mut missing = HashSet::new();
        for e in events {
            if let ChunkEvent::Asked(device, r) = e {
                let key = (device.clone(), r.manifest_digest);
                let known = self.authorized.get(&key).is_some_and(|a| now < a.until_ms);
                if !r.indices.is_empty() && !known {
                    missing.insert(key);
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        let looked_up = self
            .files
            .store
            .run(move |s| {
                missing
                    .into_iter()
                    .map(|(device, digest)| {
                        let r = s.deploy_expiry(device.as_str(), &digest, now);
                        ((device, digest), r)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let looked_up = match looked_up {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the devices' commands; chunk requests refused");
                return;
            }
        };
        if self.authorized.len() + looked_up.len() > MAX_REMEMBERED {
            self.authorized.clear();
        }
        for (key, r) in looked_up {
            let a = match r {
                Ok(Some(until_ms)) => Authorization {
                    allowed: true,
                    until_ms,
                },
                Ok(None) => Authorization {
                    allowed: false,
                    until_ms: now.saturating_add(REFUSAL_MEMORY_MS),
                },
                Err(e) => {
                    tracing::warn!(device_id = %key.0, error = %e, "cannot read the device's commands; chunk request refused");
                    continue;
                }
            };
            self.authorized.insert(key, a);
        }
    }

    /// Whether `device` holds an unexpired deploy command for `digest`, as [`Server::authorize`]
    /// found it; `None` when the store could not say (already logged).
    fn commanded(&self, device: &DeviceId, digest: Digest, now: u64) -> Option<bool> {
        self.authorized
            .get(&(device.clone(), digest))
            .filter(|a| now < a.until_ms)
            .map(|a| a.allowed)
    }

    /// Handles a batch of events in order, after one store lookup for all of them.
    async fn handle(&mut self, events: Vec<ChunkEvent>, now: u64) {
        self.authorize(&events, now).await;
        for e in events {
            match e {
                ChunkEvent::Asked(device, r) => self.admit(device, r, now).await,
                ChunkEvent::Reconnected(device) => self.co.reconnected(&device),
            }
        }
    }

    /// Checks a request and queues the chunks it is granted.
    async fn admit(&mut self, device: DeviceId, r: ChunkRequest, now: u64) {
        let digest = r.manifest_digest;
        if r.indices.is_empty() {
            return;
        }
        match self.commanded(&device, digest, now) {
            Some(true) => {}
            Some(false) => return self.refuse(&device, Refused::NotCommanded, &digest, now),
            None => return,
        }
        let Some((bytes, chunk_size)) = self.files.get(digest).await else {
            return self.refuse(&device, Refused::UnknownModel, &digest, now);
        };
        let count = bytes.len().div_ceil(chunk_size.max(1) as usize);
        let mut wanted: Vec<u32> = r
            .indices
            .into_iter()
            .take(MAX_INDICES_PER_REQUEST)
            .filter(|&ix| (ix as usize) < count)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let a = admit_asks(
            &mut self.co,
            &mut self.budget,
            (&device, digest),
            &wanted,
            u64::from(chunk_size),
            now,
        );
        if a.rate_limited {
            self.refuse(&device, Refused::RateLimited, &digest, now);
        }
        (self.app.metrics.chunk_asks_held).fetch_add(a.held as u64, Relaxed);
    }

    async fn publish_due(&mut self, now: u64) {
        for (digest, index) in self.co.due(now) {
            let Some((bytes, chunk_size)) = self.files.get(digest).await else {
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
            if let Err(e) = self.app.outbox.publish_chunk(&digest, frame).await {
                tracing::warn!(error = %e, "chunk publish failed");
            }
        }
    }
}

/// What an admitted request came to.
#[derive(Debug, PartialEq, Eq)]
struct Admitted {
    /// Asks the coalescer held back (already published to the device).
    held: usize,
    /// Some needs were over the device's budget and refused.
    rate_limited: bool,
}

/// The pure part of admitting a request for chunks `wanted` of a model: the coalescer
/// sorts out the asks it holds back, the device's budget is charged only for the rest
/// (a held ask publishes nothing), and the granted ones become needs.
fn admit_asks(
    co: &mut Coalescer,
    budget: &mut DeviceBudget,
    (device, digest): (&DeviceId, Digest),
    wanted: &[u32],
    chunk_bytes: u64,
    now: u64,
) -> Admitted {
    let needed = co.ask(device, digest, wanted, now);
    let granted = budget.grant(device, needed.len(), chunk_bytes, now);
    co.need(digest, &needed[..granted], now);
    Admitted {
        held: wanted.len() - needed.len(),
        rate_limited: granted < needed.len(),
    }
}

/// What the chunk server is told.
#[derive(Debug)]
pub enum ChunkEvent {
    /// A device asked for chunks.
    Asked(DeviceId, ChunkRequest),
    /// A device's hello arrived: it (re)connected.
    Reconnected(DeviceId),
}

/// Serves chunk requests until `rx` closes.
pub async fn run(mut rx: mpsc::UnboundedReceiver<ChunkEvent>, app: App, store: Db) {
    let clock = app.clock.clone();
    let now_ms = || clock.unix_ms();
    let mut server = Server {
        co: Coalescer::new(app.settings.chunk_window.as_millis() as u64),
        budget: DeviceBudget::new(DEVICE_BUDGET_BYTES, DEVICE_BUDGET_WINDOW_MS),
        files: Files {
            store,
            models_dir: app.paths.models_dir(),
            cache: HashMap::new(),
        },
        app,
        authorized: HashMap::new(),
        last_logged: HashMap::new(),
    };
    loop {
        let sleep_for = server
            .co
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
            Some(Some(first)) => {
                let mut events = vec![first];
                while events.len() < MAX_EVENTS_PER_BATCH {
                    match rx.try_recv() {
                        Ok(e) => events.push(e),
                        Err(_) => break,
                    }
                }
                server.handle(events, now_ms()).await;
            }
            Some(None) => {}
        }
        server.publish_due(now_ms()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Digest = [7; 32];

    #[test]
    fn held_asks_cost_the_device_no_budget() {
        let device = DeviceId::new("d1").unwrap();
        let mut co = Coalescer::new(100);
        // Room for four chunks of 1,000 bytes, refilled too slowly to matter here.
        let mut budget = DeviceBudget::new(4_000, 1_000_000_000);
        let first = admit_asks(&mut co, &mut budget, (&device, M), &[0, 1], 1_000, 0);
        assert_eq!((first.held, first.rate_limited), (0, false));
        assert_eq!(co.due(100), vec![(M, 0), (M, 1)]);
        // The agent re-asks every 2 s while the broker delivers: held, and not charged.
        for t in [2_000, 2_100, 2_200, 2_300] {
            let again = admit_asks(&mut co, &mut budget, (&device, M), &[0, 1], 1_000, t);
            assert_eq!((again.held, again.rate_limited), (2, false), "at {t} ms");
        }
        assert!(co.due(5_000).is_empty());
        // Two chunks' worth is left for the two needs after a reconnect: the budget only
        // ever paid for what was published.
        co.reconnected(&device);
        let after = admit_asks(&mut co, &mut budget, (&device, M), &[0, 1], 1_000, 5_000);
        assert_eq!((after.held, after.rate_limited), (0, false));
        assert_eq!(co.due(5_100), vec![(M, 0), (M, 1)]);
        // Now the bucket is empty: refused, and not recorded as a need.
        let over = admit_asks(&mut co, &mut budget, (&device, M), &[2], 1_000, 5_200);
        assert_eq!((over.held, over.rate_limited), (0, true));
        assert!(co.due(9_000).is_empty());
    }
}
