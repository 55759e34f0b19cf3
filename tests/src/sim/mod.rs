//! The fleet simulator: N protocol-true virtual devices in one process.
//!
//! Each virtual device is enrolled through the control plane's HTTP API, holds its own
//! MQTT session (rumqttc, `clean_session = false`, its own credentials and last will),
//! its own device key and pinned root key, and runs the agent's own deployment machine
//! (`drover_agent::machine`): keyrings, commands and manifests verified with
//! [`drover_protocol::TrustStore`], every model chunk checked against its manifest,
//! uplink frames sealed with [`drover_protocol::envelope`], sequence floors kept, the
//! chunk batch, retry and probation rules, and durable frames (telemetry, progress,
//! shadow, drift) kept in an in-memory spool until the control plane acknowledges them,
//! as the agent's disk spool does. A change to the agent's deployment logic is a change
//! to every simulated device.
//!
//! What is modelled instead of run: inference (latency distribution, error rate per label
//! group, drift, a "bad model" that raises errors and latency) and the on-disk store:
//! verified chunks live once per model in a process-wide [`ChunkCache`], so 10,000
//! devices downloading a 1 MB model hold 1 MB, not 10 GB. A subset of devices
//! (`tract_devices`) loads the downloaded bytes into the agent's real tract runtime,
//! self-tests against the manifest's test vectors and serves every modelled inference with
//! a real one.
//!
//! Layout: [`device`] is one virtual device's task (its session, and the machine's effects
//! executed against memory); `traffic` the modelled requests and telemetry windows;
//! [`model`] the shared chunk cache, the inference model and a generator for ONNX models
//! of a given size; [`scenario`] the publish/rollout steps; this file holds the
//! configuration, enrollment and the fleet handle.

pub mod device;
pub mod model;
pub mod scenario;
mod traffic;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_protocol::topics::parse_hex32;
use drover_protocol::{DeviceId, DeviceKey};
use tokio::sync::watch;

pub use model::{onnx_model_of_size, ChunkCache};

/// One label group: which labels its devices carry, how many of the fleet it holds, and
/// how its inference behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub labels: BTreeMap<String, String>,
    /// Relative share of the fleet.
    pub weight: u32,
    /// Fraction of inferences that fail on a good model.
    pub error_rate: f64,
    /// Median modelled latency.
    pub latency_p50_us: u64,
}

impl Group {
    /// Parses `LABELS[:WEIGHT[:ERROR_RATE[:LATENCY_P50_US]]]`, labels as `k=v,k=v`
    /// (e.g. `site=plant-a,hw=pi4:3:0.002:1500`).
    pub fn parse(s: &str) -> Result<Group, String> {
        let mut parts = s.split(':');
        let mut labels = BTreeMap::new();
        for kv in parts
            .next()
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("group {s:?}: label {kv:?} is not KEY=VALUE"))?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        let mut g = Group {
            labels,
            ..Group::default()
        };
        let num = |what: &str, v: Option<&str>| -> Result<Option<f64>, String> {
            v.map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("group {s:?}: {what} {v:?} is not a number >= 0"))
            })
            .transpose()
        };
        if let Some(w) = num("weight", parts.next())? {
            g.weight = w as u32;
        }
        if let Some(e) = num("error rate", parts.next())? {
            if e > 1.0 {
                return Err(format!("group {s:?}: error rate {e} is above 1"));
            }
            g.error_rate = e;
        }
        if let Some(l) = num("latency", parts.next())? {
            g.latency_p50_us = (l as u64).max(1);
        }
        if parts.next().is_some() {
            return Err(format!(
                "group {s:?}: expected LABELS[:WEIGHT[:ERROR_RATE[:LATENCY_P50_US]]]"
            ));
        }
        if g.weight == 0 {
            return Err(format!("group {s:?}: weight must be at least 1"));
        }
        Ok(g)
    }
}

impl Default for Group {
    fn default() -> Self {
        Group {
            labels: BTreeMap::new(),
            weight: 1,
            error_rate: 0.001,
            latency_p50_us: 2_000,
        }
    }
}

/// How the fleet behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub devices: usize,
    /// Device ids are `{prefix}-{index:05}`.
    pub prefix: String,
    pub groups: Vec<Group>,
    /// Modelled inferences per device per second.
    pub inference_rate: f64,
    /// Telemetry window.
    pub telemetry_interval: Duration,
    /// Models (`name@version`) that misbehave on every device running them.
    pub bad_models: Vec<String>,
    /// Error rate of a bad model.
    pub bad_error_rate: f64,
    /// Latency multiplier of a bad model.
    pub bad_latency_factor: f64,
    /// Share of each feature's mass moved to its top bin in drift reports (0: none).
    pub drift: f64,
    /// Every `churn_period`, each device drops off with this probability ...
    pub churn_probability: f64,
    pub churn_period: Duration,
    /// ... abruptly (its last will fires) and comes back after this long.
    pub churn_downtime: Duration,
    /// The first this many devices run real tract on the models they download.
    pub tract_devices: usize,
    /// Devices connecting at once during start-up.
    pub connect_batch: usize,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            devices: 100,
            prefix: "sim".into(),
            groups: vec![Group::default()],
            inference_rate: 10.0,
            telemetry_interval: Duration::from_secs(1),
            bad_models: Vec::new(),
            bad_error_rate: 0.3,
            bad_latency_factor: 5.0,
            drift: 0.0,
            churn_probability: 0.0,
            churn_period: Duration::from_secs(10),
            churn_downtime: Duration::from_secs(3),
            tract_devices: 0,
            connect_batch: 250,
            seed: 1,
        }
    }
}

/// Fleet-wide counters, updated by every device.
#[derive(Debug, Default)]
pub struct Stats {
    /// Telemetry frames created (each a distinct uplink sequence number).
    pub telemetry_sent: AtomicU64,
    /// Durable frames (telemetry, progress, shadow, drift) created and acknowledged.
    pub durable_sent: AtomicU64,
    pub durable_acked: AtomicU64,
    /// Publishes handed to the MQTT client, including replays.
    pub publishes: AtomicU64,
    pub connects: AtomicU64,
    pub churn_drops: AtomicU64,
    pub commands_accepted: AtomicU64,
    pub commands_refused: AtomicU64,
    pub chunks_received: AtomicU64,
    pub chunks_verified: AtomicU64,
    pub chunks_refused: AtomicU64,
    pub chunk_bytes_received: AtomicU64,
    pub installs: AtomicU64,
    pub install_failures: AtomicU64,
    pub self_rollbacks: AtomicU64,
    pub tract_inferences: AtomicU64,
    pub inferences: AtomicU64,
}

impl Stats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Relaxed)
    }
}

/// One install's command → active time, split where the device waited.
#[derive(Clone, Copy, Debug)]
pub struct InstallTimes {
    /// When the device accepted the command.
    pub accepted: Instant,
    pub total_ms: u64,
    /// Accepted → first chunk request sent.
    pub ask_ms: u64,
    /// First chunk request → first chunk of the model received.
    pub first_chunk_ms: u64,
    /// First chunk → every chunk verified and the file assembled.
    pub download_ms: u64,
    /// Download complete → active (load, self-test, install).
    pub install_ms: u64,
}

/// What every device and the fleet handle share.
pub struct Shared {
    pub cfg: SimConfig,
    pub stats: Stats,
    pub chunks: ChunkCache,
    /// Per device and model slot: the active model (`name@version`) and whether it
    /// proved healthy.
    pub active: Mutex<Vec<BTreeMap<String, (String, bool)>>>,
    /// Milliseconds from accepting a deploy command to serving the model, per install.
    pub command_to_active_ms: Mutex<Vec<u64>>,
    /// The same, with when each device accepted its command (benches split it by wave)
    /// and where the time went.
    pub command_to_active: Mutex<Vec<InstallTimes>>,
    /// Durable frames not yet acknowledged, per device.
    pub unacked: Vec<AtomicU64>,
    /// When set, devices stop serving traffic and reporting windows (so a test can
    /// compare what was sent with what was stored).
    pub quiet: AtomicBool,
}

/// An enrolled virtual device's identity.
#[derive(Clone, Debug)]
pub struct Identity {
    pub index: usize,
    pub id: DeviceId,
    pub key: DeviceKey,
    pub root_public: [u8; 32],
    pub broker_host: String,
    pub broker_port: u16,
    pub group: usize,
}

/// Picks device `i`'s group by weight, deterministically.
pub fn group_of(groups: &[Group], i: usize) -> usize {
    let total: u64 = groups.iter().map(|g| u64::from(g.weight)).sum();
    if total == 0 {
        return 0;
    }
    let mut slot = (i as u64).wrapping_mul(2_654_435_761) % total;
    for (gi, g) in groups.iter().enumerate() {
        if slot < u64::from(g.weight) {
            return gi;
        }
        slot -= u64::from(g.weight);
    }
    0
}

/// `mqtt://[user:pass@]host:port` → (host, port).
fn broker_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("broker URL {url:?} is not mqtt://"))?;
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    let (h, p) = hostport
        .rsplit_once(':')
        .with_context(|| format!("broker URL {url:?} has no port"))?;
    Ok((h.to_owned(), p.parse().context("broker port")?))
}

/// Enrolls the fleet through the HTTP API (`POST /v1/devices`), `parallel` at a time.
pub async fn enroll(
    api: &crate::fleet::Api,
    cfg: &SimConfig,
    parallel: usize,
) -> anyhow::Result<Vec<Identity>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..cfg.devices {
        let api = api.clone();
        let group = group_of(&cfg.groups, i);
        let labels = cfg
            .groups
            .get(group)
            .map(|g| g.labels.clone())
            .unwrap_or_default();
        let id = format!("{}-{i:05}", cfg.prefix);
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let r = api
                .post(
                    "/v1/devices",
                    &serde_json::json!({"id": id, "labels": labels}),
                )
                .await
                .with_context(|| format!("enrolling {id}"))?;
            let r: drover_control_plane::api::EnrollResponse = serde_json::from_value(r)?;
            let (broker_host, broker_port) = broker_host_port(&r.broker_url)?;
            anyhow::Ok(Identity {
                index: i,
                id: DeviceId::new(r.device_id)?,
                key: DeviceKey(parse_hex32(&r.device_key).context("device key")?),
                root_public: parse_hex32(&r.root_public_key).context("root key")?,
                broker_host,
                broker_port,
                group,
            })
        });
    }
    let mut results = Vec::with_capacity(cfg.devices);
    while let Some(r) = set.join_next().await {
        results.push(r.map_err(|e| anyhow::anyhow!("enroll task: {e}"))?);
    }
    let mut out = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    out.sort_by_key(|d| d.index);
    Ok(out)
}

/// A running fleet.
pub struct Fleet {
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts one task per device; returns once every device has connected once (or
    /// `connect_timeout` passed, which is an error naming how many did).
    pub async fn start(
        cfg: SimConfig,
        identities: Vec<Identity>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Fleet> {
        let n = identities.len();
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            chunks: ChunkCache::default(),
            active: Mutex::new(vec![BTreeMap::new(); n]),
            command_to_active_ms: Mutex::new(Vec::new()),
            command_to_active: Mutex::new(Vec::new()),
            unacked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            quiet: AtomicBool::new(false),
            cfg,
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(n);
        let batch = shared.cfg.connect_batch.max(1);
        let deadline = tokio::time::Instant::now() + connect_timeout;
        for chunk in identities.chunks(batch) {
            let before = Stats::get(&shared.stats.connects);
            for ident in chunk {
                let dev = device::Device::new(ident.clone(), shared.clone())?;
                tasks.push(tokio::spawn(dev.run(stop_rx.clone())));
            }
            // Ramp up: wait for this batch before starting the next (a broker facing
            // thousands of simultaneous CONNECTs times some out).
            while Stats::get(&shared.stats.connects) < before + chunk.len() as u64 {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {n} devices connected within {connect_timeout:?}",
                    Stats::get(&shared.stats.connects)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Fleet {
            shared,
            stop,
            tasks,
        })
    }

    /// Active model per device (`name@version`, healthy): its first slot by name, the
    /// one model of a single-model fleet.
    pub fn active(&self) -> Vec<Option<(String, bool)>> {
        self.slots()
            .into_iter()
            .map(|m| m.into_values().next())
            .collect()
    }

    /// Every model slot per device: name → (`name@version`, healthy).
    pub fn slots(&self) -> Vec<BTreeMap<String, (String, bool)>> {
        self.shared
            .active
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Durable frames still waiting for the control plane's acknowledgement.
    pub fn unacked(&self) -> u64 {
        self.shared.unacked.iter().map(|u| u.load(Relaxed)).sum()
    }

    /// Stops traffic and telemetry, then waits until every durable frame sent so far is
    /// acknowledged (stored by the control plane), or `timeout`.
    pub async fn quiesce(&self, timeout: Duration) -> anyhow::Result<()> {
        self.shared.quiet.store(true, Relaxed);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.unacked();
            if left == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{left} durable frames still unacknowledged after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every device: each says offline and disconnects cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The `p`-quantile (0..=1) of `v` (sorted in place), or 0 when empty.
pub fn quantile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((p.clamp(0.0, 1.0) * (v.len() - 1) as f64).round()) as usize;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_labels_weight_error_and_latency_and_refuse_bad_fields() {
        let g = Group::parse("site=plant-a,hw=pi4:3:0.002:1500").unwrap();
        assert_eq!(g.labels.len(), 2);
        assert_eq!((g.weight, g.error_rate, g.latency_p50_us), (3, 0.002, 1500));
        assert_eq!(Group::parse("site=b").unwrap().weight, 1);
        for bad in [
            "site",
            "a=b:x",
            "a=b:0",
            "a=b:1:2",
            "a=b:1:0.1:5:9",
            "a=b:-1",
        ] {
            assert!(Group::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_spread_over_groups_by_weight() {
        let groups = vec![
            Group::parse("g=a:3").unwrap(),
            Group::parse("g=b:1").unwrap(),
        ];
        let mut counts = [0usize; 2];
        for i in 0..4000 {
            counts[group_of(&groups, i)] += 1;
        }
        assert_eq!(counts, [3000, 1000]);
    }

    #[test]
    fn broker_urls_give_host_and_port() {
        assert_eq!(
            broker_host_port("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(broker_host_port("mqtt://u:p@h:7").unwrap(), ("h".into(), 7));
        assert!(broker_host_port("http://h:1").is_err());
        assert!(broker_host_port("mqtt://h").is_err());
    }
}
