//! Shared test support: an in-process server, scripted devices (protocol crate + rumqttc)
//! and ONNX models built in code (no binary fixtures in the repository).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use drover_control_plane::api::{EnrollRequest, EnrollResponse};
use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve::{self, ServeHandle};
use drover_protocol::envelope::{open_downlink, seal_uplink, DownlinkFrame, UplinkFrame};
use drover_protocol::messages::{
    Hello, LatencyHistogram, Presence, Status, SystemFacts, TelemetryBatch, Uplink,
};
use drover_protocol::topics::{self, parse_hex32};
use drover_protocol::{DeviceId, DeviceKey};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

pub use drover_host::clock::now_ms;

pub fn config(dir: &Path) -> ServeConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut c = ServeConfig {
        data_dir: dir.to_owned(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        chunk_window_ms: 500,
        // These tests speak to the broker as scripted devices with passwords; TLS is
        // covered by tests/tests/security.rs.
        allow_plaintext: true,
        ..Default::default()
    };
    c.ingest.ack_interval_ms = 20;
    c
}

pub async fn start(dir: &Path) -> ServeHandle {
    serve::run(config(dir).validate().unwrap(), std::future::pending())
        .await
        .unwrap()
}

/// Polls `f` until it returns `Some`, for at most 60 s (a readiness wait, not a
/// timing assertion: it only fails when the condition never becomes true).
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..3000 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition never held: {what}");
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(h: &ServeHandle) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{}", h.http_addr()),
            token: h.api_token().to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    pub async fn enroll(&self, id: &str, labels: &[(&str, &str)]) -> EnrollResponse {
        let req = EnrollRequest {
            id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let r = self
            .http
            .post(format!("{}/v1/devices", self.base))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        r.json().await.unwrap()
    }

    pub async fn device(&self, id: &str) -> serde_json::Value {
        self.get(&format!("/v1/devices/{id}")).await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A scripted device speaking the protocol over rumqttc.
pub struct FakeDevice {
    pub id: DeviceId,
    pub key: DeviceKey,
    pub client: AsyncClient,
    pub seq: u64,
    /// Authenticated downlink frames.
    pub downlink: mpsc::UnboundedReceiver<DownlinkFrame>,
    /// Raw publishes on other topics (chunks, keyring).
    pub other: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

pub fn hello() -> Uplink {
    Uplink::Hello(Hello {
        agent_version: "0.1.0-test".into(),
        protocol_min: 1,
        protocol_max: 1,
        arch: "x86_64".into(),
        os: "linux".into(),
        labels: BTreeMap::new(),
        active: None,
        staged: None,
        last_command_seq: 0,
        keyring_version: 0,
    })
}

pub fn telemetry(n: u64) -> Uplink {
    Uplink::Telemetry(TelemetryBatch {
        window_start_ms: 1_000 * n,
        window_end_ms: 1_000 * n + 999,
        model: None,
        inferences: 100 + n,
        errors: 1,
        data_quality_errors: 0,
        latency: LatencyHistogram::new(),
        outputs: vec![60, 40],
        system: SystemFacts {
            cpu_percent: 12.5,
            mem_used_bytes: 1 << 20,
            mem_total_bytes: 1 << 30,
            ..Default::default()
        },
        spool_dropped: 0,
    })
}

impl FakeDevice {
    pub fn from_enrollment(e: &EnrollResponse) -> (DeviceId, DeviceKey) {
        (
            DeviceId::new(e.device_id.clone()).unwrap(),
            DeviceKey(parse_hex32(&e.device_key).unwrap()),
        )
    }

    /// Connects with the device's broker password, a sealed Offline last will, and
    /// subscriptions to its downlink and the keyring. Waits for the subscription ack.
    pub async fn connect(broker: SocketAddr, id: DeviceId, key: DeviceKey) -> Self {
        Self::try_connect(broker, id, key).await.unwrap()
    }

    pub async fn try_connect(
        broker: SocketAddr,
        id: DeviceId,
        key: DeviceKey,
    ) -> Result<Self, String> {
        // The client id is the device id: the broker refuses any other for a device login.
        let mut o = MqttOptions::new(id.to_string(), broker.ip().to_string(), broker.port());
        o.set_credentials(id.to_string(), key.mqtt_password())
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(8 << 20, 8 << 20);
        let will = seal_uplink(
            &key,
            &UplinkFrame {
                device: id.clone(),
                seq: 1_000_000,
                sent_at_ms: now_ms(),
                msg: Uplink::Status(Status {
                    presence: Presence::Offline,
                    active: None,
                    staged: None,
                    shadow: None,
                    uptime_s: 0,
                }),
            },
        );
        o.set_last_will(LastWill::new(
            topics::uplink(&id, topics::UplinkKind::Status),
            will,
            QoS::AtLeastOnce,
            false,
        ));
        let (client, mut el) = AsyncClient::new(o, 1024);
        // Wait for the CONNACK (or the refusal) before handing the loop to a task.
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        client
            .subscribe(topics::downlink(&id), QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .subscribe(topics::keyring(), QoS::AtLeastOnce)
            .await
            .unwrap();
        let (dtx, drx) = mpsc::unbounded_channel();
        let (otx, orx) = mpsc::unbounded_channel();
        let (subacked_tx, mut subacked_rx) = mpsc::unbounded_channel();
        let (kid, kkey) = (id.clone(), key.clone());
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == topics::downlink(&kid) {
                            if let Ok(f) = open_downlink(&p.payload, &kid, &kkey) {
                                let _ = dtx.send(f);
                            }
                        } else {
                            let _ = otx.send((p.topic, p.payload.to_vec()));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subacked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        subacked_rx.recv().await;
        subacked_rx.recv().await;
        Ok(Self {
            id,
            key,
            client,
            seq: 0,
            downlink: drx,
            other: orx,
            task,
        })
    }

    pub fn seal(&mut self, msg: Uplink) -> Vec<u8> {
        self.seq += 1;
        seal_uplink(
            &self.key,
            &UplinkFrame {
                device: self.id.clone(),
                seq: self.seq,
                sent_at_ms: now_ms(),
                msg,
            },
        )
    }

    pub async fn send(&mut self, msg: Uplink) -> u64 {
        let kind = msg.kind();
        let bytes = self.seal(msg);
        self.client
            .publish(
                topics::uplink(&self.id, kind),
                QoS::AtLeastOnce,
                false,
                bytes,
            )
            .await
            .unwrap();
        self.seq
    }

    pub async fn publish_raw(&self, topic: String, bytes: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, bytes)
            .await
            .unwrap();
    }

    pub async fn subscribe(&self, topic: String) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    /// Next authenticated downlink frame matching `f`.
    pub async fn recv_downlink<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&DownlinkFrame) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                fr = self.downlink.recv() => {
                    let fr = fr.expect("device loop ended");
                    if let Some(v) = f(&fr) {
                        return v;
                    }
                }
                _ = &mut deadline => panic!("{}: never received {what}", self.id),
            }
        }
    }

    /// Drops the connection without DISCONNECT, so the broker fires the last will.
    pub fn crash(self) {
        self.task.abort();
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

// ---- ONNX models built in code (protobuf wire format by hand) ----

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_varint(field: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(field) << 3, out);
    varint(v, out);
}

fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint((u64::from(field) << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn value_info(name: &str, dims: &[Result<u64, &str>]) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in dims {
        let mut dim = Vec::new();
        match d {
            Ok(n) => field_varint(1, *n, &mut dim),
            Err(p) => field_bytes(2, p.as_bytes(), &mut dim),
        }
        field_bytes(1, &dim, &mut shape);
    }
    let mut tensor = Vec::new();
    field_varint(1, 1, &mut tensor); // FLOAT
    field_bytes(2, &shape, &mut tensor);
    let mut ty = Vec::new();
    field_bytes(1, &tensor, &mut ty);
    let mut vi = Vec::new();
    field_bytes(1, name.as_bytes(), &mut vi);
    field_bytes(2, &ty, &mut vi);
    vi
}

fn initializer(name: &str, dims: &[u64], values: &[f32]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        field_varint(1, *d, &mut t);
    }
    field_varint(2, 1, &mut t);
    field_bytes(8, name.as_bytes(), &mut t);
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    field_bytes(9, &raw, &mut t);
    t
}

fn node(op: &str, inputs: &[&str], output: &str) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        field_bytes(1, i.as_bytes(), &mut n);
    }
    field_bytes(2, output.as_bytes(), &mut n);
    field_bytes(3, format!("{op}_{output}").as_bytes(), &mut n);
    field_bytes(4, op.as_bytes(), &mut n);
    n
}

/// A dense layer `y = x·W + b` with `features` inputs and `classes` outputs, weights
/// derived from `seed`; `op` replaces MatMul to build a model with an unknown operator.
pub fn dense_model(features: u64, classes: u64, seed: u32, op: &str) -> Vec<u8> {
    let w: Vec<f32> = (0..features * classes)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..classes).map(|i| i as f32 * 0.1).collect();
    let mut g = Vec::new();
    field_bytes(1, &node(op, &["x", "W"], "h"), &mut g);
    field_bytes(1, &node("Add", &["h", "B"], "y"), &mut g);
    field_bytes(2, b"dense", &mut g);
    field_bytes(5, &initializer("W", &[features, classes], &w), &mut g);
    field_bytes(5, &initializer("B", &[classes], &b), &mut g);
    field_bytes(11, &value_info("x", &[Err("batch"), Ok(features)]), &mut g);
    field_bytes(12, &value_info("y", &[Err("batch"), Ok(classes)]), &mut g);
    let mut opset = Vec::new();
    field_bytes(1, b"", &mut opset);
    field_varint(2, 13, &mut opset);
    let mut m = Vec::new();
    field_varint(1, 8, &mut m);
    field_bytes(2, b"drover-test", &mut m);
    field_bytes(7, &g, &mut m);
    field_bytes(8, &opset, &mut m);
    m
}

/// A CSV baseline with `features` columns and `rows` rows.
pub fn baseline_csv(features: usize, rows: usize) -> String {
    let mut s: String = (0..features)
        .map(|i| format!("f{i}"))
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    for r in 0..rows {
        let row: Vec<String> = (0..features)
            .map(|c| format!("{}", ((r * 31 + c * 17) % 100) as f32 / 10.0))
            .collect();
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}
