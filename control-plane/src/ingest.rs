//! Ingest: authenticate uplink frames and store them in batched transactions.
//!
//! Runs on a dedicated thread (SQLite never blocks the async runtime). A batch is
//! whatever is queued when the thread wakes, up to `batch_max` frames, so batches grow
//! with load and a lone frame is stored at once. After each commit the thread hands the
//! stored sequence numbers to the dispatcher, which acknowledges them to the devices.
//!
//! A frame that fails (bad topic, unknown or decommissioned device, oversized, garbage,
//! bad MAC, forged device id, incompatible version) is counted by reason, logged at most
//! once per device and reason per minute, and dropped; it never touches the database.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use drover_protocol::envelope::{open_uplink, MAX_UPLINK_LEN};
use drover_protocol::messages::{ChunkRequest, Hello, Presence, Uplink};
use drover_protocol::topics::{self, ParsedTopic};
use drover_protocol::trust::SignedBlob;
use drover_protocol::{DecodeError, DeviceId};
use tokio::sync::mpsc;

use crate::app::Devices;
use crate::metrics::Metrics;
use crate::metrics::Refusal;
use crate::mqtt::RawUplink;
use crate::store::{Inbound, Store};
use drover_host::clock::now_ms;

/// At most this many unaccepted commands are re-offered to a reconnecting device.
const MAX_REOFFERED: u32 = 16;

/// What the ingest thread asks the async side to send.
#[derive(Debug)]
pub enum Event {
    /// Stored uplink sequence numbers to acknowledge, per device.
    Acks(Vec<(DeviceId, Vec<u64>)>),
    /// Reply to a hello: negotiated version (or why not), stored high-water mark, and
    /// the commands the device has not accepted yet, oldest first.
    Hello {
        device: DeviceId,
        negotiated: Result<u16, DecodeError>,
        stored_up_to: u64,
        keyring_version: u64,
        pending_commands: Vec<SignedBlob>,
    },
    /// A device's chunk request; the device is named so the chunk server can check what
    /// it was commanded to fetch and charge its budget.
    Chunks {
        device: DeviceId,
        request: ChunkRequest,
    },
    /// Integration stream records to publish (topic, JSON, retained).
    Json(Vec<(String, Vec<u8>, bool)>),
}

const LOG_INTERVAL_MS: u64 = 60_000;

struct Ingest {
    store: Store,
    devices: Devices,
    metrics: Arc<Metrics>,
    events: mpsc::UnboundedSender<Event>,
    last_logged: HashMap<(String, Refusal), u64>,
    online: HashSet<DeviceId>,
    /// Republish every stored uplink as JSON (`integration.stream`).
    json_stream: bool,
}

/// Spawns the ingest thread; it ends (after storing everything queued) when every
/// sender of `rx` is dropped.
pub fn spawn(
    store: Store,
    devices: Devices,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<RawUplink>,
    events: mpsc::UnboundedSender<Event>,
    batch_max: usize,
    json_stream: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("drover-ingest".into())
        .spawn(move || {
            let mut ing = Ingest {
                store,
                devices,
                metrics,
                events,
                json_stream,
                last_logged: HashMap::new(),
                online: HashSet::new(),
            };
            let mut raw = Vec::with_capacity(batch_max);
            while let Some(first) = rx.blocking_recv() {
                raw.push(first);
                while raw.len() < batch_max {
                    match rx.try_recv() {
                        Ok(r) => raw.push(r),
                        Err(_) => break,
                    }
                }
                ing.metrics
                    .ingest_queue_depth
                    .store(rx.len() as u64, Relaxed);
                let started = std::time::Instant::now();
                ing.batch(&mut raw);
                let took = started.elapsed().as_secs_f64();
                ing.metrics.ingest_batch.0.observe(took);
            }
            tracing::debug!("ingest thread drained and stopped");
        })
}

impl Ingest {
    fn refuse(&mut self, who: &str, r: Refusal, detail: &dyn std::fmt::Display) {
        self.metrics.refuse(r);
        let now = now_ms();
        let key = (who.to_owned(), r);
        let due = self
            .last_logged
            .get(&key)
            .is_none_or(|t| now.saturating_sub(*t) >= LOG_INTERVAL_MS);
        if due {
            if self.last_logged.len() > 100_000 {
                self.last_logged.clear();
            }
            self.last_logged.insert(key, now);
            tracing::warn!(device_id = who, reason = r.as_str(), %detail, "uplink frame refused");
        }
    }

    fn authenticate(&mut self, raw: &RawUplink) -> Option<Inbound> {
        let (device, kind) = match topics::parse(&raw.topic) {
            Ok(ParsedTopic::Uplink { device, kind }) => (device, kind),
            Ok(_) => {
                self.refuse("-", Refusal::BadTopic, &"not an uplink topic");
                return None;
            }
            Err(e) => {
                self.refuse("-", Refusal::BadTopic, &e);
                return None;
            }
        };
        let key = self
            .devices
            .entry(&device)
            .map(|d| (d.key, d.decommissioned));
        let key = match key {
            None => {
                self.refuse(device.as_str(), Refusal::UnknownDevice, &"not enrolled");
                return None;
            }
            Some((_, true)) => {
                self.refuse(device.as_str(), Refusal::Decommissioned, &"decommissioned");
                return None;
            }
            Some((k, false)) => k,
        };
        if raw.payload.len() > MAX_UPLINK_LEN {
            let e = DecodeError::TooLarge {
                len: raw.payload.len(),
                max: MAX_UPLINK_LEN,
            };
            self.refuse(device.as_str(), Refusal::TooLarge, &e);
            return None;
        }
        match open_uplink(&raw.payload, &device, &key) {
            Ok(frame) if frame.msg.kind() == kind => Some(Inbound {
                frame,
                received_at_ms: now_ms(),
            }),
            Ok(frame) => {
                let detail = format!(
                    "{:?} message on the {} topic",
                    frame.msg.kind(),
                    kind.as_str()
                );
                self.refuse(device.as_str(), Refusal::Garbage, &detail);
                None
            }
            Err(e) => {
                self.refuse(device.as_str(), Refusal::of(&e), &e);
                None
            }
        }
    }

    fn batch(&mut self, raw: &mut Vec<RawUplink>) {
        let m = Arc::clone(&self.metrics);
        m.uplink_received.fetch_add(raw.len() as u64, Relaxed);
        let mut items = Vec::with_capacity(raw.len());
        for r in raw.drain(..) {
            if let Some(inb) = self.authenticate(&r) {
                items.push(inb);
            }
        }
        if items.is_empty() {
            return;
        }
        // A chunk request is not stored: it is handed on before the batch is written, so a
        // downloading device never waits for a commit (large under load) to get its chunks.
        for item in &items {
            if let Uplink::ChunkRequest(c) = &item.frame.msg {
                m.chunk_requests.fetch_add(1, Relaxed);
                let _ = self.events.send(Event::Chunks {
                    device: item.frame.device.clone(),
                    request: c.clone(),
                });
            }
        }
        let outcome = match self.store.apply_batch(&items) {
            Ok(o) => o,
            Err(e) => {
                // Nothing is acked, so agents keep the frames and resend them.
                m.ingest_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, frames = items.len(), "ingest batch failed");
                return;
            }
        };
        m.ingest_batches.fetch_add(1, Relaxed);
        m.uplink_stored.fetch_add(outcome.new_rows, Relaxed);
        m.uplink_duplicates.fetch_add(outcome.duplicates, Relaxed);
        let _ = self
            .events
            .send(Event::Acks(outcome.stored.into_iter().collect()));
        if self.json_stream {
            self.republish(&items);
        }
        for item in &items {
            let dev = &item.frame.device;
            match &item.frame.msg {
                Uplink::Hello(h) => {
                    self.online.insert(dev.clone());
                    self.hello(dev, h);
                }
                Uplink::Status(s) => {
                    if s.presence == Presence::Online {
                        self.online.insert(dev.clone());
                    } else {
                        self.online.remove(dev);
                        tracing::info!(device_id = %dev, "device offline");
                    }
                }
                Uplink::KeyringRefused(k) => {
                    tracing::warn!(device_id = %dev, offered = k.offered_version, reason = %k.reason, "device refused the keyring");
                }
                _ => {}
            }
        }
        m.devices_online.store(self.online.len() as u64, Relaxed);
    }

    /// The integration stream: every stored uplink as flat JSON, and on a hello the
    /// device's registration (operator labels, model), retained.
    fn republish(&self, items: &[Inbound]) {
        use drover_protocol::integration::{registration_json, uplink_json};
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let f = &item.frame;
            let topic = topics::json_uplink(&f.device, f.msg.kind());
            let json = uplink_json(&f.device, f.seq, item.received_at_ms, &f.msg);
            out.push((topic, json, false));
            if let Uplink::Hello(h) = &f.msg {
                let labels = match self.store.device(f.device.as_str()) {
                    Ok(Some(d)) => d.labels,
                    _ => Default::default(),
                };
                let model = h
                    .active
                    .as_ref()
                    .map(|m| format!("{}@{}", m.name, m.version));
                let reg =
                    registration_json(&f.device, item.received_at_ms, &labels, model.as_deref());
                out.push((topics::json_registration(&f.device), reg, true));
            }
        }
        let _ = self.events.send(Event::Json(out));
    }

    fn hello(&mut self, dev: &DeviceId, h: &Hello) {
        let negotiated = drover_protocol::envelope::negotiate(h.protocol_min, h.protocol_max);
        match &negotiated {
            Err(e) => self.refuse(dev.as_str(), Refusal::Incompatible, e),
            Ok(v) => {
                // What commands may be signed for it (Action::min_protocol).
                if let Err(e) = self.store.set_device_protocol(dev.as_str(), *v) {
                    tracing::warn!(device_id = %dev, error = %e, "could not record the negotiated protocol");
                }
            }
        }
        tracing::info!(device_id = %dev, agent_version = %h.agent_version, arch = %h.arch, "device hello");
        let stored_up_to = match self.store.device(dev.as_str()) {
            Ok(Some(d)) => d.max_uplink_seq,
            _ => 0,
        };
        let now = now_ms();
        // A protocol-2 agent holds several models, so every command it has not accepted
        // is re-offered, oldest first; a protocol-1 agent only the latest (a new command
        // superseded the older ones there).
        let limit = match negotiated {
            Ok(v) if v >= 2 => MAX_REOFFERED,
            _ => 1,
        };
        let pending_commands = match self.store.pending_commands(
            dev.as_str(),
            h.last_command_seq,
            now,
            limit,
        ) {
            Ok(rows) => rows.iter().map(crate::fleet::command_blob).collect(),
            Err(e) => {
                tracing::warn!(device_id = %dev, error = %e, "could not read the commands to re-offer");
                Vec::new()
            }
        };
        let _ = self.events.send(Event::Hello {
            device: dev.clone(),
            negotiated,
            stored_up_to,
            keyring_version: h.keyring_version,
            pending_commands,
        });
    }
}

/// Compresses sorted, de-duplicated sequence numbers into inclusive ranges.
pub fn ranges(seqs: &mut Vec<u64>) -> Vec<(u64, u64)> {
    seqs.sort_unstable();
    seqs.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs.iter() {
        match out.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(s) => *hi = s,
            _ => out.push((s, s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use drover_protocol::envelope::{seal_uplink, UplinkFrame};
    use drover_protocol::topics::UplinkKind;
    use drover_protocol::DeviceKey;

    use crate::app::{BrokerLogins, DeviceEntry};

    #[test]
    fn chunk_requests_are_handed_on_before_the_batch_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("d.db")).unwrap();
        let dev = DeviceId::new("dev-1").unwrap();
        let key = DeviceKey([3; 32]);
        store
            .enroll_device(&dev, &key, &Default::default(), 1)
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let entry = DeviceEntry {
            key: key.clone(),
            decommissioned: false,
        };
        let devices = Devices::new(
            [(dev.clone(), entry)],
            BrokerLogins::default(),
            Arc::clone(&metrics),
        );
        let (tx, rx) = mpsc::channel(16);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let request = ChunkRequest {
            manifest_digest: [9; 32],
            indices: vec![0, 1],
        };
        let frame = UplinkFrame {
            device: dev.clone(),
            seq: 1,
            sent_at_ms: 1,
            msg: Uplink::ChunkRequest(request.clone()),
        };
        // Queued, and the queue closed, before the thread starts: it stores this one batch
        // and stops, and every event it sent is then in `events`, in order.
        tx.try_send(RawUplink {
            topic: topics::uplink(&dev, UplinkKind::ChunkRequest),
            payload: seal_uplink(&key, &frame).into(),
        })
        .unwrap();
        drop(tx);
        spawn(store, devices, metrics, rx, events_tx, 64, false)
            .unwrap()
            .join()
            .unwrap();
        match events.try_recv() {
            Ok(Event::Chunks { device, request: r }) => {
                assert_eq!(device, dev);
                assert_eq!(r.indices, request.indices);
            }
            other => panic!("the chunk request comes first, got {other:?}"),
        }
        match events.try_recv() {
            Ok(Event::Acks(acks)) => assert_eq!(acks, vec![(dev, vec![1])]),
            other => panic!("then its ack, got {other:?}"),
        }
        assert!(events.try_recv().is_err(), "handed on once");
    }

    #[test]
    fn ranges_compress_runs_and_drop_duplicates() {
        assert_eq!(
            ranges(&mut vec![5, 1, 2, 3, 3, 7, 8]),
            vec![(1, 3), (5, 5), (7, 8)]
        );
        assert!(ranges(&mut vec![]).is_empty());
        // Hostile sequence numbers at the top of the range do not overflow.
        assert_eq!(
            ranges(&mut vec![u64::MAX, u64::MAX - 1]),
            vec![(u64::MAX - 1, u64::MAX)]
        );
    }
}
