//! Every message exchanged between agent and control plane.
//!
//! Wire rule (postcard is positional): never reorder, remove or retype a field or variant.
//! New variants go at the end of an enum, in a new `PROTOCOL_VERSION`, and are sent only to
//! a peer that negotiated it; a changed struct would change the envelope's layout.
//! Golden-byte fixtures in `tests/golden/` fail when an encoding changes by accident.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::trust::{Digest, SignedBlob};

/// Identifies one model version everywhere: the digest is the SHA-256 of its signed
/// manifest payload, so two models with equal name and version but other bytes differ.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub digest: Digest,
}

/// Device → control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Uplink {
    Hello(Hello),
    Status(Status),
    Telemetry(TelemetryBatch),
    Progress(Progress),
    ChunkRequest(ChunkRequest),
    Shadow(ShadowReport),
    Drift(DriftReport),
    Samples(SampleBatch),
    Labels(LabelBatch),
    KeyringRefused(KeyringRefused),
    /// Protocol 2: every named model slot and the device's budget. Sent after `Hello` and
    /// whenever a slot changes; only to a control plane that negotiated protocol 2.
    Models(ModelsReport),
    /// Protocol 3: what model artifacts the device can run (its runtime and formats), so
    /// the control plane sends each device a form it loads. Sent after a `HelloAck`
    /// negotiating 3, on the `models` topic kind.
    Runtime(RuntimeReport),
}

impl Uplink {
    /// The topic kind this message travels on.
    pub fn kind(&self) -> crate::topics::UplinkKind {
        use crate::topics::UplinkKind as K;
        match self {
            Uplink::Hello(_) => K::Hello,
            Uplink::Status(_) => K::Status,
            Uplink::Telemetry(_) => K::Telemetry,
            Uplink::Progress(_) => K::Progress,
            Uplink::ChunkRequest(_) => K::ChunkRequest,
            Uplink::Shadow(_) => K::Shadow,
            Uplink::Drift(_) => K::Drift,
            Uplink::Samples(_) => K::Samples,
            Uplink::Labels(_) => K::Labels,
            Uplink::KeyringRefused(_) => K::KeyringRefused,
            Uplink::Models(_) | Uplink::Runtime(_) => K::Models,
        }
    }
}

/// Sent on every (re)connect: who the device is and what it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_version: String,
    /// Oldest and newest protocol versions this agent speaks.
    pub protocol_min: u16,
    pub protocol_max: u16,
    /// Rust target arch (`x86_64`, `aarch64`, `arm`).
    pub arch: String,
    pub os: String,
    pub labels: BTreeMap<String, String>,
    pub active: Option<ModelRef>,
    pub staged: Option<ModelRef>,
    /// Highest command sequence the device has accepted (its replay floor).
    pub last_command_seq: u64,
    pub keyring_version: u64,
}

/// One named model slot on a device (protocol 2): its A/B pair, staged and shadow models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// The model name, which is the slot's name.
    pub name: String,
    pub active: Option<ModelRef>,
    /// The version a rollback of this slot returns to.
    pub previous: Option<ModelRef>,
    pub staged: Option<ModelRef>,
    pub shadow: Option<ModelRef>,
    /// Bytes this slot's files take on disk (every version kept for it).
    pub disk_bytes: u64,
    /// Estimated resident bytes of the models this slot has loaded.
    pub memory_bytes: u64,
}

/// Limits a device sets on the models it holds (its config); `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelBudget {
    pub max_models: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub disk_bytes: Option<u64>,
}

/// Every model slot of a device and its budget (protocol 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsReport {
    pub slots: Vec<SlotStatus>,
    pub budget: ModelBudget,
}

/// The model runtime of a device and the artifact formats it loads (protocol 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReport {
    /// The inference engine, `tract`.
    pub engine: String,
    /// Its version, e.g. `0.23.9`: artifacts compiled by a newer one are not sent.
    pub version: String,
    /// Every format this build loads with the newest version of each (`tract-nnef` 1;
    /// `onnx` 1 when the agent was built with its ONNX importer).
    pub formats: Vec<ArtifactFormat>,
}

/// One artifact format and its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFormat {
    pub format: String,
    pub version: u32,
}

impl RuntimeReport {
    /// The format name of a plain ONNX model file (a manifest without `artifact`).
    pub const ONNX: &'static str = "onnx";

    /// Does this runtime load artifacts of `format` at `version`?
    pub fn loads(&self, format: &str, version: u32) -> bool {
        self.formats
            .iter()
            .any(|f| f.format == format && f.version >= version)
    }

    /// Can this runtime run the model file a manifest describes (`None`: plain ONNX)?
    /// The reason names both sides and what to do.
    pub fn check(&self, artifact: Option<&crate::manifest::Artifact>) -> Result<(), String> {
        use crate::manifest::parse_semver;
        let Some(a) = artifact else {
            if self.loads(Self::ONNX, 1) {
                return Ok(());
            }
            return Err(format!(
                "this agent runs compiled models only ({}), and the manifest names a plain ONNX \
                 file; publish it with a control plane that compiles models (drover serve 0.5 or \
                 later), or use an agent built with the `onnx` feature",
                self.formats_text()
            ));
        };
        if !self.loads(&a.format, a.format_version) {
            return Err(format!(
                "the model is compiled as {} {}, and this agent loads {}; upgrade the agent",
                a.format,
                a.format_version,
                self.formats_text()
            ));
        }
        // tract 0.x: a minor version may change an operator's serialized form, so only the
        // same major.minor series reads an artifact, and not one from a newer patch.
        match (
            parse_semver(&a.runtime_version),
            parse_semver(&self.version),
        ) {
            (Some(theirs), Some(mine)) if theirs > mine => Err(format!(
                "the model was compiled by {} {}, newer than this agent's {} {}; upgrade the \
                 agent, or deploy to it from a control plane with the same runtime",
                self.engine, a.runtime_version, self.engine, self.version
            )),
            (Some(theirs), Some(mine)) if (theirs.0, theirs.1) != (mine.0, mine.1) => Err(format!(
                "the model was compiled by {} {}, a series this agent's {} {} does not \
                     read; upgrade the agent to {}.{}.x, or publish the model again with \
                     `--format onnx` for it",
                self.engine, a.runtime_version, self.engine, self.version, theirs.0, theirs.1
            )),
            (Some(_), Some(_)) => Ok(()),
            _ => Err(format!(
                "runtime version {:?} or {:?} is not MAJOR.MINOR.PATCH",
                a.runtime_version, self.version
            )),
        }
    }

    fn formats_text(&self) -> String {
        let names: Vec<String> = (self.formats.iter())
            .map(|f| format!("{} {}", f.format, f.version))
            .collect();
        names.join(", ")
    }
}

impl Uplink {
    /// The lowest negotiated protocol version this message may be sent under.
    pub fn min_protocol(&self) -> u16 {
        match self {
            Uplink::Models(_) => 2,
            Uplink::Runtime(_) => 3,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    Online,
    /// Published by the broker as the last will, or by the agent on clean shutdown.
    Offline,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub presence: Presence,
    pub active: Option<ModelRef>,
    pub staged: Option<ModelRef>,
    /// Model running in shadow beside the active one, if any.
    pub shadow: Option<ModelRef>,
    pub uptime_s: u64,
}

/// Fixed, protocol-wide latency buckets so histograms from any agent merge by addition.
/// Bucket `i` counts latencies `<= LATENCY_BUCKETS_US[i]`; the last bucket is overflow.
pub const LATENCY_BUCKETS_US: [u64; 24] = [
    10,
    20,
    50,
    100,
    200,
    350,
    500,
    750,
    1_000,
    1_500,
    2_000,
    3_500,
    5_000,
    7_500,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    u64::MAX,
];

/// A mergeable latency histogram over [`LATENCY_BUCKETS_US`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; LATENCY_BUCKETS_US.len()],
            sum_us: 0,
        }
    }

    pub fn record(&mut self, us: u64) {
        if self.counts.len() != LATENCY_BUCKETS_US.len() {
            self.counts.resize(LATENCY_BUCKETS_US.len(), 0);
        }
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i.min(LATENCY_BUCKETS_US.len() - 1)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), or `None` when empty.
    pub fn quantile_upper_us(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return LATENCY_BUCKETS_US.get(i).copied();
            }
        }
        LATENCY_BUCKETS_US.last().copied()
    }
}

/// Host facts from sysinfo, sampled once per telemetry window.
///
/// A fact the agent cannot read (its unit hides `/proc/stat` and `/proc/meminfo`, as
/// systemd's `ProcSubset=pid` does) is sent as unknown, never as 0: `cpu_percent` =
/// [`SystemFacts::CPU_UNKNOWN`], and `mem_total_bytes` = 0 (no host has no memory) with
/// `mem_used_bytes` 0. Read them through [`SystemFacts::cpu`] and [`SystemFacts::memory`].
/// The encoding is unchanged: both were always representable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemFacts {
    /// Host CPU use, 0-100; [`SystemFacts::CPU_UNKNOWN`] when it cannot be read.
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    /// 0 when memory cannot be read.
    pub mem_total_bytes: u64,
    /// Agent process resident memory.
    pub agent_rss_bytes: u64,
    pub temperature_c: Option<f32>,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
}

impl SystemFacts {
    /// `cpu_percent` of a host whose CPU counters cannot be read: no reading is negative.
    pub const CPU_UNKNOWN: f32 = -1.0;

    /// Host CPU use in percent, `None` when unknown.
    pub fn cpu(&self) -> Option<f32> {
        (self.cpu_percent >= 0.0).then_some(self.cpu_percent)
    }

    /// `(used, total)` host memory in bytes, `None` when unknown.
    pub fn memory(&self) -> Option<(u64, u64)> {
        (self.mem_total_bytes > 0).then_some((self.mem_used_bytes, self.mem_total_bytes))
    }
}

/// One telemetry window (counters reset per window; the control plane sums windows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub model: Option<ModelRef>,
    pub inferences: u64,
    pub errors: u64,
    /// Inputs refused for NaN, missing values or out-of-range features.
    pub data_quality_errors: u64,
    pub latency: LatencyHistogram,
    /// Count of predictions per output class (argmax) or per output bin.
    pub outputs: Vec<u64>,
    pub system: SystemFacts,
    /// Spool records dropped because the spool was full (cumulative since install).
    pub spool_dropped: u64,
}

/// Where a device is in carrying out a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Received,
    Downloading,
    Verified,
    SelfTested,
    Active,
    Healthy,
    Failed,
    RolledBack,
    Refused,
    /// A command with nothing to install (rollback, config) was carried out.
    Done,
    /// The model runs in shadow beside the active one.
    Shadowing,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub command_seq: u64,
    /// SHA-256 of the signed command payload, so a report cannot be mistaken for another.
    pub command_digest: Digest,
    pub model: Option<ModelRef>,
    pub phase: Phase,
    pub chunks_done: u32,
    pub chunks_total: u32,
    /// Human-readable reason on `Failed`/`Refused`/`RolledBack`.
    pub detail: Option<String>,
}

/// The longest a control plane lets a requested chunk wait before publishing it (its
/// coalescer's republish hold), counted from the request, while the device keeps asking.
/// The agent gives a download up after `MAX_SILENT_REQUESTS` requests `CHUNK_RETRY_MS`
/// apart that bring nothing (a minute); that rule is sized so that twice this bound (one
/// publish lost on the way, then its resend) cannot trip it.
pub const CHUNK_SERVE_BOUND_MS: u64 = 20_000;

/// Ask for chunks of a model (missing ones only: verified chunks are never re-fetched).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub manifest_digest: Digest,
    pub indices: Vec<u32>,
}

/// Candidate vs active on the same live inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub active: ModelRef,
    pub candidate: ModelRef,
    pub compared: u64,
    /// Same argmax (classification) or within tolerance (regression).
    pub agreed: u64,
    pub candidate_errors: u64,
    pub active_latency: LatencyHistogram,
    pub candidate_latency: LatencyHistogram,
}

/// Counts of one feature over the bins of the manifest's baseline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureSketch {
    /// One count per baseline bin (numeric: `edges.len() + 1` bins; categorical: one per
    /// category plus "other").
    pub counts: Vec<u64>,
    pub missing: u64,
    pub out_of_range: u64,
}

/// Per-window distribution sketches: mergeable, never raw data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub model: ModelRef,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub features: Vec<FeatureSketch>,
    pub predictions: Vec<u64>,
}

/// One sampled live input, kept for retraining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Agent-local request id, the key a later label attaches to.
    pub request_id: u64,
    pub at_ms: u64,
    pub features: Vec<f32>,
    pub prediction: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleBatch {
    pub model: ModelRef,
    pub samples: Vec<Sample>,
}

/// A ground-truth label for an earlier request, from the feedback endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub request_id: u64,
    pub at_ms: u64,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelBatch {
    pub labels: Vec<Label>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyringRefused {
    pub offered_version: u64,
    pub reason: String,
}

/// Control plane → one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Downlink {
    HelloAck(HelloAck),
    /// A command signed by a fleet signing key ([`crate::trust::SigKind::Command`]).
    Command(SignedBlob),
    /// A keyring signed by the root key ([`crate::trust::SigKind::Keyring`]).
    Keyring(SignedBlob),
    /// Application-level acknowledgement: uplink frames with these sequence numbers are
    /// stored durably, so the agent may delete them from its spool.
    UplinkAck(UplinkAck),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Version both sides will speak.
    pub protocol_version: u16,
    pub server_time_ms: u64,
    /// Highest uplink sequence already stored for this device. Informational: it is not a
    /// gap-free watermark, so an agent must not drop spooled records below it (only
    /// `UplinkAck` ranges delete them).
    pub stored_up_to: u64,
}

/// Inclusive ranges of stored uplink sequence numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkAck {
    pub ranges: Vec<(u64, u64)>,
}

/// One piece of a model file, published on the model's shared chunk topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkData {
    pub manifest_digest: Digest,
    pub index: u32,
    /// Decoded as one copy rather than byte by byte: the wire bytes are the same (a
    /// varint length, then the bytes), `benches/chunk_decode.rs`.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What a signed command tells a device to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub target: crate::topics::DeviceId,
    /// Strictly increasing per device; a device refuses any `seq <=` its last accepted.
    pub seq: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// Rollout this command belongs to, for reports.
    pub rollout_id: Option<u64>,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Install the model described by this signed manifest.
    Deploy {
        manifest: SignedBlob,
        mode: DeployMode,
    },
    /// Return to the previous healthy model (or to `to` if still in the store).
    Rollback { to: Option<ModelRef> },
    /// Promote the shadow model to active.
    Promote,
    /// Change runtime settings.
    Configure(AgentSettings),
    // ---- protocol 2: several models per device, each in the slot its name names ----
    /// Return the named model's slot to its previous healthy version (or to `to`).
    RollbackModel { model: String, to: Option<ModelRef> },
    /// Promote the named model's shadow candidate to active.
    PromoteModel { model: String },
    /// Stop serving the named model and free its slot and files.
    RemoveModel { model: String },
}

impl Action {
    /// The oldest protocol version whose agents understand this action: the control plane
    /// never signs one for a device that negotiated less (an older agent could not decode
    /// it, and would refuse it only after the operator waited for it).
    pub fn min_protocol(&self) -> u16 {
        match self {
            Action::Deploy { .. } | Action::Rollback { .. } | Action::Promote => 1,
            Action::Configure(_) => 1,
            Action::RollbackModel { .. } | Action::PromoteModel { .. } => 2,
            Action::RemoveModel { .. } => 2,
        }
    }

    /// The model slot this action is about, when it names one.
    pub fn model(&self) -> Option<&str> {
        match self {
            Action::RollbackModel { model, .. }
            | Action::PromoteModel { model }
            | Action::RemoveModel { model } => Some(model),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployMode {
    /// Self-test, then switch traffic to it.
    Activate,
    /// Self-test, then run beside the active model and report agreement.
    Shadow,
}

/// Settings the control plane may change remotely (signed like every command).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    pub telemetry_interval_ms: u64,
    /// Fraction of live inputs kept as samples, in parts per million.
    pub sample_rate_ppm: u32,
}

#[cfg(test)]
mod runtime_tests {
    use super::*;
    use crate::manifest::Artifact;

    fn report(formats: &[(&str, u32)]) -> RuntimeReport {
        RuntimeReport {
            engine: "tract".into(),
            version: "0.23.9".into(),
            formats: (formats.iter())
                .map(|(f, v)| ArtifactFormat {
                    format: (*f).into(),
                    version: *v,
                })
                .collect(),
        }
    }

    fn artifact(runtime: &str, version: u32) -> Artifact {
        Artifact {
            format: "tract-nnef".into(),
            format_version: version,
            runtime_version: runtime.into(),
            source_sha256: [0; 32],
        }
    }

    #[test]
    fn an_artifact_from_a_newer_runtime_or_format_is_refused_with_both_versions() {
        let r = report(&[("tract-nnef", 1)]);
        assert_eq!(r.check(Some(&artifact("0.23.9", 1))), Ok(()));
        assert_eq!(r.check(Some(&artifact("0.23.1", 1))), Ok(()));
        // Another minor series of tract 0.x may serialize operators differently.
        let series = r.check(Some(&artifact("0.21.0", 1))).unwrap_err();
        assert!(
            series.contains("0.21.0") && series.contains("0.21.x"),
            "{series}"
        );
        let newer = r.check(Some(&artifact("0.24.0", 1))).unwrap_err();
        assert!(
            newer.contains("0.24.0") && newer.contains("0.23.9"),
            "{newer}"
        );
        assert!(newer.contains("upgrade the agent"), "{newer}");
        // 0.23.10 is newer than 0.23.9: versions compare as numbers, not text.
        assert!(r.check(Some(&artifact("0.23.10", 1))).is_err());
        let format = r.check(Some(&artifact("0.23.9", 2))).unwrap_err();
        assert!(format.contains("tract-nnef 2"), "{format}");
        assert!(r.check(Some(&artifact("latest", 1))).is_err());
    }

    #[test]
    fn a_plain_onnx_file_needs_the_onnx_format() {
        let nnef_only = report(&[("tract-nnef", 1)]);
        let e = nnef_only.check(None).unwrap_err();
        assert!(e.contains("compiled models only"), "{e}");
        assert_eq!(
            report(&[("tract-nnef", 1), ("onnx", 1)]).check(None),
            Ok(())
        );
    }
}
