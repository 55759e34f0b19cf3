//! Ingest throughput: N simulated devices publish telemetry through the embedded broker
//! into SQLite. Prints messages/s stored, and the broker's raw publish→subscribe rate for
//! the same devices and message count, measured in the same run.
//!
//! cargo bench -p drover-control-plane --bench ingest -- [--devices N] [--messages M]
//!     [--sessions S] [--tls]
//!
//! Plaintext (`allow_plaintext`) by default, so figures compare with earlier runs; `--tls`
//! connects every device by mutual TLS through the embedded broker's TLS front, with the
//! certificate its enrollment issued (the raw broker rate is then skipped: the front's ACL
//! refuses its `bench/…` topics).
//!
//! Measured 2026-11-25 on the 2-core x86_64 dev VM (release, load generator, broker and
//! control plane in one process, another build running beside it):
//! - 1,000 devices x 100: broker raw 139,805 msg/s; ingest into SQLite 59,408 msg/s.
//! - 8,000 devices x 25: broker raw 100,204 msg/s; ingest into SQLite 55,294 msg/s.
//!   (10,000 devices needs more than this sandbox's 20,000 open files: two per device.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve::{self, ServeHandle};
use drover_protocol::envelope::{seal_uplink, UplinkFrame};
use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch, Uplink};
use drover_protocol::topics::{self, parse_hex32, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    devices: usize,
    messages: usize,
    sessions: usize,
    tls: bool,
}

fn args() -> Args {
    let mut a = Args {
        devices: 1000,
        messages: 100,
        sessions: 2,
        tls: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; without it (`cargo test --all-targets` runs bench
    // targets too) this is a small smoke run proving the benchmark still works.
    if !argv.iter().any(|a| a == "--bench") {
        a.devices = 10;
        a.messages = 5;
    }
    let mut i = 1;
    while i < argv.len() {
        if argv[i] == "--tls" {
            a.tls = true;
            i += 1;
            continue;
        }
        let v = argv.get(i + 1).and_then(|s| s.parse().ok());
        match (argv[i].as_str(), v) {
            ("--devices", Some(v)) => a.devices = v,
            ("--messages", Some(v)) => a.messages = v,
            ("--sessions", Some(v)) => a.sessions = v,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

struct Device {
    id: DeviceId,
    key: DeviceKey,
    client: AsyncClient,
}

/// An enrolled bench device: id, key, and its TLS material (CA, cert, key PEM).
type Enrolled = (DeviceId, DeviceKey, [String; 3]);

fn client_tls(pem: &[String; 3]) -> rumqttc::Transport {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem[0].as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = CertificateDer::pem_slice_iter(pem[1].as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pem[2].as_bytes()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg)))
}

async fn connect(broker: std::net::SocketAddr, e: Enrolled, tls: bool) -> Device {
    let (id, key, pem) = e;
    let mut o = MqttOptions::new(id.to_string(), broker.ip().to_string(), broker.port());
    if tls {
        o.set_transport(client_tls(&pem));
    }
    o.set_credentials(id.to_string(), key.mqtt_password())
        .set_keep_alive(Duration::from_secs(60))
        .set_inflight(200);
    let (client, mut el) = AsyncClient::new(o, 256);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("device {id} cannot connect: {e}"),
        }
    }
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Device { id, key, client }
}

fn telemetry(seq: u64) -> Uplink {
    Uplink::Telemetry(TelemetryBatch {
        window_start_ms: seq * 10_000,
        window_end_ms: seq * 10_000 + 9_999,
        model: None,
        inferences: 1000,
        errors: 1,
        data_quality_errors: 0,
        latency: LatencyHistogram::new(),
        outputs: vec![700, 300],
        system: SystemFacts {
            cpu_percent: 10.0,
            mem_used_bytes: 1 << 28,
            mem_total_bytes: 1 << 30,
            agent_rss_bytes: 8 << 20,
            temperature_c: Some(45.0),
            disk_free_bytes: 1 << 33,
            disk_total_bytes: 1 << 34,
        },
        spool_dropped: 0,
    })
}

async fn enroll(server: &ServeHandle, n: usize) -> Vec<Enrolled> {
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r: serde_json::Value = http
            .post(format!("http://{}/v1/devices", server.http_addr()))
            .bearer_auth(server.api_token())
            .json(&serde_json::json!({"id": format!("bench-{i:05}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push((
            DeviceId::new(r["device_id"].as_str().unwrap()).unwrap(),
            DeviceKey(parse_hex32(r["device_key"].as_str().unwrap()).unwrap()),
            ["ca_pem", "client_cert_pem", "client_key_pem"]
                .map(|k| r[k].as_str().unwrap_or_default().to_owned()),
        ));
    }
    out
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig {
        data_dir: dir.path().to_owned(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        allow_plaintext: !a.tls,
        ..Default::default()
    };
    cfg.ingest.sessions = a.sessions;
    let server = serve::run(cfg.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let total = (a.devices * a.messages) as u64;
    println!(
        "command: cargo bench -p drover-control-plane --bench ingest -- --devices {} --messages {} --sessions {}{}",
        a.devices, a.messages, a.sessions, if a.tls { " --tls" } else { "" }
    );
    println!(
        "machine: {} cores ({}), {} devices x {} messages = {total} messages",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH,
        a.devices,
        a.messages
    );
    // One more identity for the raw subscriber: the broker binds a client id to its
    // device login, so it cannot share a measured device's.
    let mut ids = enroll(&server, a.devices + 1).await;
    let raw_sub = ids.pop().expect("enrolled");
    let mut devices = Vec::with_capacity(a.devices);
    let t_conn = Instant::now();
    for chunk in ids.chunks(200) {
        let conns = chunk
            .iter()
            .cloned()
            .map(|e| tokio::spawn(connect(server.mqtt_addr(), e, a.tls)));
        for c in conns {
            devices.push(c.await.unwrap());
        }
    }
    let conn_s = t_conn.elapsed().as_secs_f64();
    println!(
        "{} devices connected{} in {conn_s:.2} s ({:.0} connects/s)",
        devices.len(),
        if a.tls { " by mutual TLS" } else { "" },
        devices.len() as f64 / conn_s
    );

    // 1. The broker's raw publish→subscribe rate: same devices, same payload size, one
    //    subscriber (what the control plane's ingest sessions see, without ingest).
    let payload_len = seal_uplink(
        &devices[0].key,
        &UplinkFrame {
            device: devices[0].id.clone(),
            seq: 1,
            sent_at_ms: 0,
            msg: telemetry(1),
        },
    )
    .len();
    let received = Arc::new(AtomicU64::new(0));
    let (raw_s, raw_rate) = if a.tls {
        (0.0, 0.0)
    } else {
        {
            let (id, key, _) = raw_sub.clone();
            let mut o = MqttOptions::new(
                id.to_string(),
                server.mqtt_addr().ip().to_string(),
                server.mqtt_addr().port(),
            );
            o.set_credentials(id.to_string(), key.mqtt_password())
                .set_inflight(1000);
            let (client, mut el) = AsyncClient::new(o, 1024);
            client
                .subscribe("bench/+/raw", QoS::AtLeastOnce)
                .await
                .unwrap();
            let rx = Arc::clone(&received);
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let mut ready = Some(ready_tx);
            tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(_))) => {
                            rx.fetch_add(1, Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
            let _ = ready_rx.await;
        }
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for d in &devices {
            let c = d.client.clone();
            let topic = format!("bench/{}/raw", d.id);
            let n = a.messages;
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    c.publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        vec![0u8; payload_len],
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        while received.load(Relaxed) < total {
            if t0.elapsed() > Duration::from_secs(600) {
                println!("raw: only {} of {total} arrived", received.load(Relaxed));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let raw_s = t0.elapsed().as_secs_f64();
        (raw_s, received.load(Relaxed) as f64 / raw_s)
    };

    // 2. Ingest: authenticated telemetry frames (sealed beforehand, as an agent's spool
    //    holds them) through the broker into SQLite, until all are stored.
    let mut frames: Vec<Vec<(String, Vec<u8>)>> = Vec::with_capacity(devices.len());
    for d in &devices {
        let topic = topics::uplink(&d.id, UplinkKind::Telemetry);
        frames.push(
            (1..=a.messages as u64)
                .map(|seq| {
                    (
                        topic.clone(),
                        seal_uplink(
                            &d.key,
                            &UplinkFrame {
                                device: d.id.clone(),
                                seq,
                                sent_at_ms: seq,
                                msg: telemetry(seq),
                            },
                        ),
                    )
                })
                .collect(),
        );
    }
    let stored0 = server.metrics().uplink_stored.load(Relaxed);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (d, fr) in devices.iter().zip(frames) {
        let c = d.client.clone();
        tasks.push(tokio::spawn(async move {
            for (topic, bytes) in fr {
                c.publish(topic, QoS::AtLeastOnce, false, bytes)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = || server.metrics().uplink_stored.load(Relaxed) - stored0;
    while stored() < total {
        if t0.elapsed() > Duration::from_secs(600) {
            println!("ingest: only {} of {total} stored", stored());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ingest_s = t0.elapsed().as_secs_f64();
    let ingest_rate = stored() as f64 / ingest_s;
    let m = server.metrics();
    if !a.tls {
        println!(
            "broker raw pub->sub : {:>9.0} msg/s ({} msgs of {payload_len} B in {raw_s:.2} s)",
            raw_rate,
            received.load(Relaxed)
        );
    }
    println!(
        "ingest into SQLite  : {:>9.0} msg/s ({} rows in {ingest_s:.2} s, {} transactions, {} acks sent, refused {})",
        ingest_rate,
        stored(),
        m.ingest_batches.load(Relaxed),
        m.acks_sent.load(Relaxed),
        drover_control_plane::metrics::Refusal::ALL
            .iter()
            .map(|r| m.refused(*r))
            .sum::<u64>()
    );
    server.shutdown().await;
}
