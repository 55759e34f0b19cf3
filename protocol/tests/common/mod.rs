//! Deterministic sample messages shared by the wire tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use drover_protocol::manifest::*;
use drover_protocol::messages::*;
use drover_protocol::trust::{KeyEntry, Keyring, Role, SecretKey};
use drover_protocol::{DeviceId, DeviceKey};

pub const NOW: u64 = 1_764_000_000_000;

pub fn dev() -> DeviceId {
    DeviceId::new("plant-a.gw-01").unwrap()
}

pub fn device_key() -> DeviceKey {
    DeviceKey([7u8; 32])
}

pub fn root() -> SecretKey {
    SecretKey::from_seed([1u8; 32])
}

pub fn signer() -> SecretKey {
    SecretKey::from_seed([2u8; 32])
}

pub fn entry(k: &SecretKey, roles: Vec<Role>, not_after_ms: u64) -> KeyEntry {
    KeyEntry {
        key_id: k.id(),
        public: k.public(),
        roles,
        not_before_ms: NOW - 1000,
        not_after_ms,
        revoked: false,
    }
}

pub fn keyring(version: u64) -> Keyring {
    Keyring {
        version,
        issued_at_ms: NOW - 1000,
        expires_at_ms: NOW + 86_400_000,
        keys: vec![entry(
            &signer(),
            vec![Role::Models, Role::Commands],
            NOW + 3_600_000,
        )],
    }
}

pub fn model_ref() -> ModelRef {
    ModelRef {
        name: "vibration".into(),
        version: "1.2.3".into(),
        digest: [9u8; 32],
    }
}

pub fn manifest() -> Manifest {
    let file: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    Manifest {
        name: "vibration".into(),
        version: "1.2.3".into(),
        sha256: drover_protocol::trust::sha256(&file),
        size: file.len() as u64,
        chunk_size: 1024,
        chunk_hashes: chunk_hashes(&file, 1024),
        inputs: vec![TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(4)],
        }],
        outputs: vec![TensorSpec {
            name: "probabilities".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(2)],
        }],
        baseline: Some(Baseline {
            rows: 100,
            features: vec![
                FeatureBaseline::Numeric {
                    name: "rms".into(),
                    edges: vec![0.1, 0.5, 1.0],
                    counts: vec![25, 25, 25, 25],
                    min: 0.0,
                    max: 2.0,
                },
                FeatureBaseline::Categorical {
                    name: "mode".into(),
                    categories: vec![0, 1],
                    counts: vec![60, 40],
                },
            ],
            predictions: vec![90, 10],
        }),
        test_vectors: vec![TestVector {
            inputs: vec![TensorValue {
                name: "x".into(),
                shape: vec![1, 4],
                data: TensorData::F32(vec![0.5, 1.0, 1.5, 2.0]),
            }],
            outputs: vec![TensorValue {
                name: "probabilities".into(),
                shape: vec![1, 2],
                data: TensorData::F32(vec![0.25, 0.75]),
            }],
            tolerance: 1e-4,
        }],
        lineage: Lineage {
            parent: None,
            training_job: Some("job-7".into()),
            dataset: Some("ds-2026-11".into()),
            metrics: BTreeMap::from([("accuracy".into(), 0.93), ("f1".into(), 0.9)]),
        },
        created_at_ms: NOW,
        sampled_vectors: vec![],
        artifact: None,
    }
}

pub fn file_bytes() -> Vec<u8> {
    (0..3000u32).map(|i| (i % 251) as u8).collect()
}

pub fn command(seq: u64) -> Command {
    Command {
        target: dev(),
        seq,
        issued_at_ms: NOW,
        expires_at_ms: NOW + 600_000,
        rollout_id: Some(4),
        action: Action::Deploy {
            manifest: signer().sign_manifest(&manifest()),
            mode: DeployMode::Activate,
        },
    }
}

pub fn hist() -> LatencyHistogram {
    let mut h = LatencyHistogram::new();
    for us in [5, 80, 80, 900, 12_000] {
        h.record(us);
    }
    h
}

/// One sample of every uplink message, with a stable name for its golden file.
pub fn uplinks() -> Vec<(&'static str, Uplink)> {
    vec![
        (
            "up_hello",
            Uplink::Hello(Hello {
                agent_version: "0.1.0".into(),
                protocol_min: 1,
                protocol_max: 1,
                arch: "aarch64".into(),
                os: "linux".into(),
                labels: BTreeMap::from([("site".into(), "plant-a".into())]),
                active: Some(model_ref()),
                staged: None,
                last_command_seq: 41,
                keyring_version: 3,
            }),
        ),
        (
            "up_status",
            Uplink::Status(Status {
                presence: Presence::Offline,
                active: Some(model_ref()),
                staged: None,
                shadow: None,
                uptime_s: 3600,
            }),
        ),
        (
            "up_telemetry",
            Uplink::Telemetry(TelemetryBatch {
                window_start_ms: NOW,
                window_end_ms: NOW + 10_000,
                model: Some(model_ref()),
                inferences: 1200,
                errors: 3,
                data_quality_errors: 1,
                latency: hist(),
                outputs: vec![1100, 100],
                system: SystemFacts {
                    cpu_percent: 12.5,
                    mem_used_bytes: 1 << 29,
                    mem_total_bytes: 1 << 31,
                    agent_rss_bytes: 9 << 20,
                    temperature_c: Some(51.0),
                    disk_free_bytes: 1 << 33,
                    disk_total_bytes: 1 << 34,
                },
                spool_dropped: 0,
            }),
        ),
        (
            "up_progress",
            Uplink::Progress(Progress {
                command_seq: 42,
                command_digest: [3u8; 32],
                model: Some(model_ref()),
                phase: Phase::Downloading,
                chunks_done: 2,
                chunks_total: 3,
                detail: None,
            }),
        ),
        (
            "up_chunk_request",
            Uplink::ChunkRequest(ChunkRequest {
                manifest_digest: [9u8; 32],
                indices: vec![0, 2],
            }),
        ),
        (
            "up_shadow",
            Uplink::Shadow(ShadowReport {
                active: model_ref(),
                candidate: ModelRef {
                    version: "1.3.0".into(),
                    ..model_ref()
                },
                compared: 500,
                agreed: 490,
                candidate_errors: 0,
                active_latency: hist(),
                candidate_latency: hist(),
            }),
        ),
        (
            "up_drift",
            Uplink::Drift(DriftReport {
                model: model_ref(),
                window_start_ms: NOW,
                window_end_ms: NOW + 60_000,
                features: vec![
                    FeatureSketch {
                        counts: vec![10, 20, 30, 40],
                        missing: 1,
                        out_of_range: 2,
                    },
                    FeatureSketch {
                        counts: vec![50, 45, 5],
                        missing: 0,
                        out_of_range: 0,
                    },
                ],
                predictions: vec![80, 20],
            }),
        ),
        (
            "up_samples",
            Uplink::Samples(SampleBatch {
                model: model_ref(),
                samples: vec![Sample {
                    request_id: 77,
                    at_ms: NOW,
                    features: vec![0.5, 1.0, 1.5, 2.0],
                    prediction: vec![0.25, 0.75],
                }],
            }),
        ),
        (
            "up_labels",
            Uplink::Labels(LabelBatch {
                labels: vec![Label {
                    request_id: 77,
                    at_ms: NOW + 5,
                    value: 1.0,
                }],
            }),
        ),
        (
            "up_keyring_refused",
            Uplink::KeyringRefused(KeyringRefused {
                offered_version: 2,
                reason: "keyring version 2 is not newer than the accepted version 3".into(),
            }),
        ),
        (
            "up_models",
            Uplink::Models(ModelsReport {
                slots: vec![SlotStatus {
                    name: "vibration".into(),
                    active: Some(model_ref()),
                    previous: None,
                    staged: None,
                    shadow: Some(model_ref()),
                    disk_bytes: 123_456,
                    memory_bytes: 654_321,
                }],
                budget: ModelBudget {
                    max_models: Some(4),
                    memory_bytes: Some(64 << 20),
                    disk_bytes: None,
                },
            }),
        ),
        (
            "up_runtime",
            Uplink::Runtime(RuntimeReport {
                engine: "tract".into(),
                version: "0.23.9".into(),
                formats: vec![ArtifactFormat {
                    format: "tract-nnef".into(),
                    version: 1,
                }],
            }),
        ),
    ]
}

/// One sample of every downlink message.
pub fn downlinks() -> Vec<(&'static str, Downlink)> {
    vec![
        (
            "down_hello_ack",
            Downlink::HelloAck(HelloAck {
                protocol_version: 1,
                server_time_ms: NOW,
                stored_up_to: 12,
            }),
        ),
        (
            "down_command",
            Downlink::Command(signer().sign_command(&command(42))),
        ),
        (
            "down_keyring",
            Downlink::Keyring(root().sign_keyring(&keyring(3))),
        ),
        (
            "down_uplink_ack",
            Downlink::UplinkAck(UplinkAck {
                ranges: vec![(1, 10), (12, 12)],
            }),
        ),
        (
            "down_command_rollback",
            Downlink::Command(signer().sign_command(&Command {
                action: Action::Rollback {
                    to: Some(model_ref()),
                },
                ..command(43)
            })),
        ),
        (
            "down_command_configure",
            Downlink::Command(signer().sign_command(&Command {
                action: Action::Configure(AgentSettings {
                    telemetry_interval_ms: 5000,
                    sample_rate_ppm: 1000,
                }),
                ..command(44)
            })),
        ),
        (
            "down_command_promote",
            Downlink::Command(signer().sign_command(&Command {
                action: Action::Promote,
                ..command(45)
            })),
        ),
    ]
    .into_iter()
    .chain(downlinks_v2())
    .collect()
}

/// The commands protocol 2 added: one sample of each.
pub fn v2_actions() -> Vec<(&'static str, Action)> {
    vec![
        (
            "down_command_rollback_model",
            Action::RollbackModel {
                model: "vibration".into(),
                to: Some(model_ref()),
            },
        ),
        (
            "down_command_promote_model",
            Action::PromoteModel {
                model: "vibration".into(),
            },
        ),
        (
            "down_command_remove_model",
            Action::RemoveModel {
                model: "vibration".into(),
            },
        ),
    ]
}

fn downlinks_v2() -> Vec<(&'static str, Downlink)> {
    v2_actions()
        .into_iter()
        .enumerate()
        .map(|(i, (name, action))| {
            let cmd = Command {
                action,
                ..command(46 + i as u64)
            };
            (name, Downlink::Command(signer().sign_command(&cmd)))
        })
        .collect()
}

pub fn chunk() -> ChunkData {
    ChunkData {
        manifest_digest: [9u8; 32],
        index: 1,
        data: file_bytes()[1024..2048].to_vec(),
    }
}
