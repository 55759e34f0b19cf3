//! Test helpers: an in-process rumqttd broker on a free loopback port, and a scripted
//! control plane built from the protocol crate (signs keyrings, manifests and commands,
//! serves chunks, acknowledges uplinks, records everything it receives).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_agent::config::{AgentConfig, RuntimeConfig};
use drover_protocol::envelope::{self, DownlinkFrame, UplinkFrame};
use drover_protocol::manifest::{
    chunk_hashes, Lineage, Manifest, TensorData, TensorValue, TestVector,
};
use drover_protocol::messages::{
    Action, ChunkData, Command, DeployMode, Downlink, HelloAck, Phase, Progress, Uplink, UplinkAck,
};
use drover_protocol::topics::{self, hex32, DeviceId, ParsedTopic};
use drover_protocol::trust::{sha256, Digest, KeyEntry, Keyring, Role, SecretKey, SignedBlob};
use drover_protocol::DeviceKey;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub const DEVICE_KEY: [u8; 32] = [9; 32];

pub use drover_host::clock::now_ms;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts rumqttd on a free loopback port; returns the port once it accepts connections.
pub fn start_broker() -> u16 {
    let port = free_port();
    let text = format!(
        r#"
id = 0
[router]
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_payload}
max_inflight_count = 500
dynamic_filters = true
"#,
        max_payload = drover_protocol::envelope::MAX_BROKER_PAYLOAD,
    );
    let cfg: rumqttd::Config = toml::from_str(&text).unwrap();
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(cfg);
        let _ = broker.start();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    port
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Reads `name.json` (inputs and onnxruntime outputs).
pub fn reference(name: &str) -> (Vec<TensorValue>, Vec<TensorValue>) {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{name}.json"))).unwrap()).unwrap();
    let conv = |v: &serde_json::Value| -> Vec<TensorValue> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let data = t["data"].as_array().unwrap();
                TensorValue {
                    name: t["name"].as_str().unwrap().to_owned(),
                    shape: t["shape"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d.as_u64().unwrap())
                        .collect(),
                    data: if t["dtype"] == "F32" {
                        TensorData::F32(data.iter().map(|x| x.as_f64().unwrap() as f32).collect())
                    } else {
                        TensorData::I64(data.iter().map(|x| x.as_i64().unwrap()).collect())
                    },
                }
            })
            .collect()
    };
    (conv(&doc["inputs"]), conv(&doc["outputs"]))
}

/// The fleet's keys: a root, and a signing key for models and commands.
pub struct Keys {
    pub root: SecretKey,
    pub signer: SecretKey,
    pub keyring: SignedBlob,
}

impl Keys {
    pub fn new() -> Keys {
        let root = SecretKey::from_seed([1; 32]);
        let signer = SecretKey::from_seed([2; 32]);
        let keyring = root.sign_keyring(&Keyring {
            version: 1,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            keys: vec![KeyEntry {
                key_id: signer.id(),
                public: signer.public(),
                roles: vec![Role::Models, Role::Commands],
                not_before_ms: 0,
                not_after_ms: u64::MAX,
                revoked: false,
            }],
        });
        Keys {
            root,
            signer,
            keyring,
        }
    }
}

/// A published model: bytes, signed manifest.
#[derive(Clone)]
pub struct Published {
    pub name: String,
    pub version: String,
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    pub blob: SignedBlob,
}

impl Published {
    pub fn digest(&self) -> Digest {
        self.blob.digest()
    }
}

/// Publishes fixture `file` (e.g. `dense_v1`) as model `name`/`version`, with its
/// onnxruntime reference as the self-test vector.
pub fn publish(keys: &Keys, file: &str, name: &str, version: &str, chunk_size: u32) -> Published {
    let bytes = std::fs::read(fixture(&format!("{file}.onnx"))).unwrap();
    let (inputs, outputs) = reference(file);
    publish_bytes(keys, bytes, name, version, chunk_size, (inputs, outputs))
}

/// Publishes model `bytes` as `name`/`version` with one self-test vector.
pub fn publish_bytes(
    keys: &Keys,
    bytes: Vec<u8>,
    name: &str,
    version: &str,
    chunk_size: u32,
    (inputs, outputs): (Vec<TensorValue>, Vec<TensorValue>),
) -> Published {
    let manifest = Manifest {
        name: name.into(),
        version: version.into(),
        sha256: sha256(&bytes),
        size: bytes.len() as u64,
        chunk_size,
        chunk_hashes: chunk_hashes(&bytes, chunk_size),
        inputs: vec![],
        outputs: vec![],
        baseline: None,
        test_vectors: vec![TestVector {
            inputs,
            outputs,
            tolerance: 1e-4,
        }],
        lineage: Lineage::default(),
        created_at_ms: now_ms(),
        sampled_vectors: vec![],
        artifact: None,
    };
    let blob = keys.signer.sign_manifest(&manifest);
    Published {
        name: name.into(),
        version: version.into(),
        bytes,
        manifest,
        blob,
    }
}

pub fn deploy_command(keys: &Keys, device: &str, seq: u64, model: &Published) -> SignedBlob {
    deploy_command_mode(keys, device, seq, model, DeployMode::Activate)
}

pub fn deploy_command_mode(
    keys: &Keys,
    device: &str,
    seq: u64,
    model: &Published,
    mode: DeployMode,
) -> SignedBlob {
    keys.signer.sign_command(&Command {
        target: DeviceId::new(device).unwrap(),
        seq,
        issued_at_ms: now_ms(),
        expires_at_ms: now_ms() + 3_600_000,
        rollout_id: Some(1),
        action: Action::Deploy {
            manifest: model.blob.clone(),
            mode,
        },
    })
}

#[derive(Default)]
pub struct Seen {
    /// Every authenticated uplink frame received, in arrival order (duplicates kept).
    pub frames: Vec<UplinkFrame>,
    /// Chunk requests (frame seq, manifest digest, indices), in arrival order.
    pub chunk_requests: Vec<(u64, Digest, Vec<u32>)>,
}

/// What the fake control plane does automatically.
pub struct Behaviour {
    /// Send the keyring after each hello.
    pub keyring_on_hello: bool,
    /// Commands to (re)send after a hello while the device's replay floor is below them.
    pub commands: Vec<(u64, SignedBlob)>,
    pub ack: bool,
    pub serve_chunks: bool,
    /// The protocol version its HelloAck negotiates (1: a control plane from before
    /// named model slots).
    pub protocol: u16,
}

pub struct ControlPlane {
    pub client: AsyncClient,
    pub seen: Arc<Mutex<Seen>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub models: Arc<Mutex<HashMap<Digest, Published>>>,
    pub device: DeviceId,
    pub keys: Arc<Keys>,
}

pub fn downlink_bytes(device: &DeviceId, msg: Downlink) -> Vec<u8> {
    envelope::seal_downlink(
        &DeviceKey(DEVICE_KEY),
        &DownlinkFrame {
            device: device.clone(),
            sent_at_ms: now_ms(),
            msg,
        },
    )
}

impl ControlPlane {
    pub async fn start(port: u16, device: &str, keys: Arc<Keys>) -> ControlPlane {
        let mut opts = MqttOptions::new(format!("cp-{device}-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(8 << 20, 8 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(opts, 1024);
        client
            .subscribe(topics::uplink_filter_all(), QoS::AtLeastOnce)
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let behaviour = Arc::new(Mutex::new(Behaviour {
            keyring_on_hello: true,
            commands: vec![],
            ack: true,
            serve_chunks: true,
            protocol: 1,
        }));
        let models: Arc<Mutex<HashMap<Digest, Published>>> = Arc::default();
        let dev = DeviceId::new(device).unwrap();
        let (s2, b2, m2, c2, d2, k2) = (
            seen.clone(),
            behaviour.clone(),
            models.clone(),
            client.clone(),
            dev.clone(),
            keys.clone(),
        );
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                let ev = match ev.poll().await {
                    Ok(e) => e,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Event::Incoming(Packet::SubAck(_)) = &ev {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                let Event::Incoming(Packet::Publish(p)) = ev else {
                    continue;
                };
                let Ok(ParsedTopic::Uplink { device, .. }) = topics::parse(&p.topic) else {
                    continue;
                };
                if device != d2 {
                    continue;
                }
                let Ok(frame) = envelope::open_uplink(&p.payload, &device, &DeviceKey(DEVICE_KEY))
                else {
                    continue;
                };
                let mut replies: Vec<(String, Vec<u8>)> = Vec::new();
                {
                    let b = b2.lock().unwrap();
                    if b.ack {
                        replies.push((
                            topics::downlink(&device),
                            downlink_bytes(
                                &device,
                                Downlink::UplinkAck(UplinkAck {
                                    ranges: vec![(frame.seq, frame.seq)],
                                }),
                            ),
                        ));
                    }
                    match &frame.msg {
                        Uplink::Hello(h) => {
                            replies.push((
                                topics::downlink(&device),
                                downlink_bytes(
                                    &device,
                                    Downlink::HelloAck(HelloAck {
                                        protocol_version: b.protocol,
                                        server_time_ms: now_ms(),
                                        stored_up_to: 0,
                                    }),
                                ),
                            ));
                            if b.keyring_on_hello {
                                replies.push((
                                    topics::downlink(&device),
                                    downlink_bytes(&device, Downlink::Keyring(k2.keyring.clone())),
                                ));
                            }
                            for (seq, c) in &b.commands {
                                if *seq > h.last_command_seq {
                                    replies.push((
                                        topics::downlink(&device),
                                        downlink_bytes(&device, Downlink::Command(c.clone())),
                                    ));
                                }
                            }
                        }
                        Uplink::ChunkRequest(r) if b.serve_chunks => {
                            s2.lock().unwrap().chunk_requests.push((
                                frame.seq,
                                r.manifest_digest,
                                r.indices.clone(),
                            ));
                            if let Some(m) = m2.lock().unwrap().get(&r.manifest_digest) {
                                for i in &r.indices {
                                    let Some(len) = m.manifest.chunk_len(*i) else {
                                        continue;
                                    };
                                    let start = *i as usize * m.manifest.chunk_size as usize;
                                    replies.push((
                                        topics::model_chunks(&r.manifest_digest),
                                        envelope::encode_chunk(&ChunkData {
                                            manifest_digest: r.manifest_digest,
                                            index: *i,
                                            data: m.bytes[start..start + len].to_vec(),
                                        }),
                                    ));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                s2.lock().unwrap().frames.push(frame);
                for (t, bytes) in replies {
                    let _ = c2.publish(t, QoS::AtLeastOnce, false, bytes).await;
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        ControlPlane {
            client,
            seen,
            behaviour,
            models,
            device: dev,
            keys,
        }
    }

    pub fn add_model(&self, m: &Published) {
        self.models.lock().unwrap().insert(m.digest(), m.clone());
    }

    pub async fn send(&self, msg: Downlink) {
        self.client
            .publish(
                topics::downlink(&self.device),
                QoS::AtLeastOnce,
                false,
                downlink_bytes(&self.device, msg),
            )
            .await
            .unwrap();
    }

    /// Sends a command now and re-sends it after every hello until accepted.
    pub async fn command(&self, seq: u64, blob: SignedBlob) {
        self.behaviour
            .lock()
            .unwrap()
            .commands
            .push((seq, blob.clone()));
        self.send(Downlink::Command(blob)).await;
    }

    pub fn progress(&self) -> Vec<Progress> {
        self.seen
            .lock()
            .unwrap()
            .frames
            .iter()
            .filter_map(|f| match &f.msg {
                Uplink::Progress(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits (up to 60 s, a guard against hangs, not a timed assertion) for `cond`.
    pub async fn wait_for<T>(&self, what: &str, mut cond: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = cond(&self.seen.lock().unwrap()) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_phase(&self, command_digest: Digest, phase: Phase) -> Progress {
        self.wait_for(
            &format!("{phase:?} for command {}", hex32(&command_digest)),
            |s| {
                s.frames.iter().find_map(|f| match &f.msg {
                    Uplink::Progress(p)
                        if p.command_digest == command_digest && p.phase == phase =>
                    {
                        Some(p.clone())
                    }
                    Uplink::Progress(p)
                        if p.command_digest == command_digest
                            && matches!(
                                p.phase,
                                Phase::Failed | Phase::Refused | Phase::RolledBack
                            )
                            && p.phase != phase =>
                    {
                        panic!("command ended in {:?}: {:?}", p.phase, p.detail)
                    }
                    _ => None,
                })
            },
        )
        .await
    }

    pub async fn wait_hello(&self, count: usize) {
        self.wait_for("hello", |s| {
            (s.frames
                .iter()
                .filter(|f| matches!(f.msg, Uplink::Hello(_)))
                .count()
                >= count)
                .then_some(())
        })
        .await
    }
}

pub fn agent_config(dir: &Path, device: &str, port: u16, keys: &Keys) -> AgentConfig {
    let mut labels = BTreeMap::new();
    labels.insert("site".into(), "test".into());
    AgentConfig {
        device_id: device.into(),
        device_key: hex32(&DEVICE_KEY),
        root_public_key: hex32(&keys.root.public()),
        broker_url: format!("mqtt://127.0.0.1:{port}"),
        data_dir: dir.to_owned(),
        api_addr: "127.0.0.1:0".into(),
        metrics_addr: "127.0.0.1:0".into(),
        labels,
        runtime: RuntimeConfig {
            // New models are self-tested in the real agent binary, as on a device.
            loader_exe: Some(env!("CARGO_BIN_EXE_drover-agent").into()),
            ..RuntimeConfig::default()
        },
        ..AgentConfig::default()
    }
}

/// The KServe v2 JSON request for these inputs.
pub fn infer_body(inputs: &[TensorValue]) -> serde_json::Value {
    let inputs: Vec<serde_json::Value> = inputs
        .iter()
        .map(|t| {
            let (dt, data) = match &t.data {
                TensorData::F32(v) => ("FP32", serde_json::json!(v)),
                TensorData::I64(v) => ("INT64", serde_json::json!(v)),
            };
            serde_json::json!({"name": t.name, "shape": t.shape, "datatype": dt, "data": data})
        })
        .collect();
    serde_json::json!({ "inputs": inputs })
}

/// First F32 output of a KServe v2 response.
pub fn first_output(resp: &serde_json::Value) -> Vec<f32> {
    resp["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4)
}

pub fn f32s(t: &TensorValue) -> Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|x| *x as f32).collect(),
    }
}

pub fn progress_for<'a>(ps: &'a [Progress], digest: &Digest) -> Vec<&'a Progress> {
    ps.iter().filter(|p| &p.command_digest == digest).collect()
}

/// A running agent plus its broker and control plane, with `model` deployed and healthy.
pub struct Harness {
    pub cp: ControlPlane,
    pub keys: Arc<Keys>,
    pub agent: Option<drover_agent::Agent>,
    pub base: String,
    /// The agent's metrics listener (`metrics_addr`).
    pub metrics_base: String,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub next_seq: u64,
}

impl Harness {
    pub async fn start(dev: &str, tweak: impl FnOnce(&mut AgentConfig)) -> Harness {
        Self::start_with_probation(dev, tweak, Duration::from_millis(200)).await
    }

    pub async fn start_with_probation(
        dev: &str,
        tweak: impl FnOnce(&mut AgentConfig),
        probation: Duration,
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, dev, tweak, probation, |_| {}).await
    }

    /// As [`Harness::start_with_probation`], in `dir` (prepared by the caller, e.g. with
    /// a state file of an older release), with the fake control plane set up by `cp_setup`
    /// before the agent connects.
    pub async fn start_in(
        dir: tempfile::TempDir,
        dev: &str,
        tweak: impl FnOnce(&mut AgentConfig),
        probation: Duration,
        cp_setup: impl FnOnce(&mut Behaviour),
    ) -> Harness {
        let port = start_broker();
        let keys = Arc::new(Keys::new());
        let cp = ControlPlane::start(port, dev, keys.clone()).await;
        cp_setup(&mut cp.behaviour.lock().unwrap());
        let mut cfg = agent_config(dir.path(), dev, port, &keys);
        tweak(&mut cfg);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent = drover_agent::run_with(
            cfg,
            drover_agent::Tuning {
                probation,
                ..Default::default()
            },
            async move {
                let _ = stop_rx.await;
            },
        )
        .await
        .unwrap();
        let base = format!("http://{}", agent.api_addr());
        let metrics_base = format!("http://{}", agent.metrics_addr());
        cp.wait_hello(1).await;
        Harness {
            cp,
            keys,
            agent: Some(agent),
            base,
            metrics_base,
            dir,
            stop: Some(stop_tx),
            next_seq: 1,
        }
    }

    /// Signs and sends a command with the next sequence number; returns its blob.
    pub async fn command(&mut self, action: Action) -> SignedBlob {
        let seq = self.next_seq;
        self.next_seq += 1;
        let blob = self.keys.signer.sign_command(&Command {
            target: self.cp.device.clone(),
            seq,
            issued_at_ms: now_ms(),
            expires_at_ms: now_ms() + 600_000,
            rollout_id: None,
            action,
        });
        self.cp.command(seq, blob.clone()).await;
        blob
    }

    pub async fn deploy(&mut self, m: &Published, mode: DeployMode) -> SignedBlob {
        self.cp.add_model(m);
        self.command(Action::Deploy {
            manifest: m.blob.clone(),
            mode,
        })
        .await
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(a) = self.agent.take() {
            a.wait().await.unwrap();
        }
    }
}
