//! What the battery's tests share: a `drover serve` process, enrolled device identities
//! and their raw MQTT sessions, sealed telemetry, the server's counters.

use std::path::Path;
use std::time::Duration;

use drover_agent::config::AgentConfig;
use drover_protocol::envelope::{seal_uplink, UplinkFrame};
use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch, Uplink};
use drover_protocol::topics::parse_hex32;
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::fleet::Api;
use drover_tests::serve_process::{Listen, ServeProcess};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, TlsConfiguration, Transport};

/// Generous: waits end as soon as their condition holds.
pub const WAIT: Duration = Duration::from_secs(120);

/// `drover serve` as its own process, production mode (mutual-TLS front) unless
/// `plaintext`, on free ports.
pub fn serve(dir: &Path, plaintext: bool) -> ServeProcess {
    let bin = drover_tests::workspace_bin("drover").unwrap();
    let listen = Listen {
        plaintext,
        ..Listen::default()
    };
    ServeProcess::start_with(&bin, &dir.join("server"), &listen, "").unwrap()
}

/// An enrolled device as a raw client sees it.
pub struct Dev {
    pub id: DeviceId,
    pub key: DeviceKey,
    pub config: AgentConfig,
}

impl Dev {
    pub async fn enroll(api: &Api, dir: &Path, id: &str) -> Dev {
        let d = drover_tests::fleet::enroll(api, dir, id, &[])
            .await
            .unwrap();
        Dev {
            id: DeviceId::new(id).unwrap(),
            key: DeviceKey(parse_hex32(&d.config.device_key).unwrap()),
            config: d.config,
        }
    }

    /// The broker port from the enrollment's broker URL.
    pub fn broker_port(&self) -> u16 {
        let url = &self.config.broker_url;
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// MQTT options as the agent logs in: client id = device id, certificate when the
    /// enrollment gave one.
    pub fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.id.as_str(), "127.0.0.1", self.broker_port());
        o.set_keep_alive(Duration::from_secs(30))
            .set_credentials(self.id.as_str(), self.key.mqtt_password())
            .set_max_packet_size(8 << 20, 8 << 20);
        if let Some(t) = &self.config.tls {
            let cfg = drover_control_plane::mqtt::tls_config(
                &t.ca_file,
                Some((
                    t.client_cert_file.as_ref().unwrap(),
                    t.client_key_file.as_ref().unwrap(),
                )),
            )
            .unwrap();
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
        }
        o
    }

    /// Connects and waits for the CONNACK.
    pub async fn connect(&self) -> (AsyncClient, EventLoop) {
        let (c, mut el) = AsyncClient::new(self.options(), 256);
        tokio::time::timeout(WAIT, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return,
                    Ok(_) => {}
                    Err(e) => panic!("{} cannot connect: {e}", self.id),
                }
            }
        })
        .await
        .unwrap();
        (c, el)
    }

    /// A telemetry frame sealed with this device's key.
    pub fn telemetry(&self, seq: u64) -> Vec<u8> {
        seal_uplink(
            &self.key,
            &UplinkFrame {
                device: self.id.clone(),
                seq,
                sent_at_ms: drover_host::clock::now_ms(),
                msg: telemetry(seq),
            },
        )
    }
}

pub fn telemetry(seq: u64) -> Uplink {
    let mut latency = LatencyHistogram::new();
    latency.record(1500);
    Uplink::Telemetry(TelemetryBatch {
        window_start_ms: seq * 10_000,
        window_end_ms: seq * 10_000 + 9_999,
        model: None,
        inferences: 100 + seq,
        errors: 0,
        data_quality_errors: 0,
        latency,
        outputs: vec![1, 2],
        system: SystemFacts {
            cpu_percent: 1.0,
            mem_used_bytes: 1 << 20,
            mem_total_bytes: 1 << 30,
            agent_rss_bytes: 1 << 20,
            temperature_c: None,
            disk_free_bytes: 1 << 30,
            disk_total_bytes: 1 << 31,
        },
        spool_dropped: 0,
    })
}

/// Telemetry rows the control plane holds for `id`.
pub async fn stored(api: &Api, id: &str) -> Option<usize> {
    let rows = api
        .get(&format!("/v1/devices/{id}/telemetry?limit=100000"))
        .await
        .ok()?;
    Some(rows.as_array()?.len())
}

/// One sample from the server's `/metrics` page (`name{labels}` exactly as printed), 0
/// when absent.
pub async fn metric(api: &Api, sample: &str) -> u64 {
    let page = drover_tests::serve_process::metrics(&api.base)
        .await
        .unwrap_or_default();
    drover_tests::serve_process::prom_counter(&page, sample).unwrap_or(0)
}

/// The server answers `/healthz`.
pub async fn healthy(api: &Api) -> bool {
    reqwest::get(format!("{}/healthz", api.base))
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// A real `drover-agent` process on `config`, short probation, its log appended to `log`.
pub fn spawn_agent(config: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(drover_tests::workspace_bin("drover-agent").unwrap())
        .arg("--config")
        .arg(config)
        .args(["--probation-ms", "300"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(log))
        .spawn()
        .unwrap()
}

/// Publishes the dense fixtures as dense 1.0.0 and 2.0.0 through the CLI.
pub fn publish_dense(srv: &[&str]) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures");
    for (file, version) in [("dense_v1.onnx", "1.0.0"), ("dense_v2.onnx", "2.0.0")] {
        let f = fixtures.join(file);
        let args = [
            "model",
            "publish",
            f.to_str().unwrap(),
            "--name",
            "dense",
            "--version",
            version,
        ];
        drover_tests::drover_cli(&[&args[..], srv].concat()).unwrap();
    }
}

/// `drover device deploy ID --model dense@VERSION`.
pub fn deploy_dense(srv: &[&str], id: &str, version: &str) {
    let m = format!("dense@{version}");
    let args = ["device", "deploy", id, "--model", m.as_str()];
    drover_tests::drover_cli(&[&args[..], srv].concat()).unwrap();
}

/// The control plane's view of device `id` (null when absent).
pub fn device_view(srv: &[&str], id: &str) -> serde_json::Value {
    drover_tests::cli_devices(srv)
        .into_iter()
        .find(|d| d["id"] == id)
        .unwrap_or_default()
}

/// Waits until the control plane sees `id` healthy on dense@`version`. On a timeout the
/// error carries the device as the control plane last saw it and the agent's log, so a
/// failure in CI (where the temporary directory is gone) can be read from its output.
pub async fn healthy_on(srv: &[&str], id: &str, version: &str, log: &Path) -> anyhow::Result<()> {
    let want = format!("dense@{version}");
    let waited = drover_tests::wait_until(&format!("{id} healthy on {want}"), WAIT, || async {
        let d = device_view(srv, id);
        (d["active_model"] == want.as_str() && d["last_phase"] == "healthy").then_some(())
    })
    .await;
    waited.map_err(|e| {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "{e}\nthe device as last seen: {}\nagent log (last 60 lines):\n{}",
            device_view(srv, id),
            tail.join("\n")
        )
    })
}

/// A valid KServe v2 request for the dense fixtures.
pub fn dense_request() -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![0.25f32; 16]}]})
}

/// The `model_version` the agent's KServe v2 API answers a valid request with.
pub async fn served_version(api: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .post(format!("http://{api}/v2/models/dense/infer"))
        .json(&dense_request())
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    Some(v["model_version"].as_str()?.to_owned())
}
