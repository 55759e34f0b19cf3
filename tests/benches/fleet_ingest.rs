//! Ingest benchmark across processes: N devices (each its own MQTT connection and device
//! key, enrolled through the HTTP API) publish sealed telemetry frames through the broker
//! into the control plane's SQLite, with `drover serve` in its own process (so 10,000
//! devices fit the open-file limit: each process holds one side of every connection).
//! The broker's raw publish→subscribe rate for the same devices, payload size and count
//! is measured in the same run, for the ratio.
//!
//! cargo bench -p drover-tests --bench fleet_ingest -- [--devices N] [--messages M]
//!     [--broker embedded|mosquitto] [--batch-max B] [--order burst|interleaved]
//!
//! `--order`: `burst` (each device publishes its M frames back to back, all devices at
//! once) or `interleaved` (every device's first frame, then every device's second, ..., as a
//! fleet reporting on a period sends them: the store's worst case, each batch spread over
//! as many devices as it holds frames).
//! `--batch-max`: the server's `[ingest] batch_max` (frames per SQLite transaction; the
//! server's default when absent), to compare batch sizes in one build.
//!
//! `mosquitto`: Debian's mosquitto (password file, `%u` ACLs, persistence) as the broker,
//! the control plane connecting to it as an external broker. Without `--bench` (as under
//! `cargo test --all-targets`) it is a small smoke run.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_protocol::envelope::{seal_uplink, UplinkFrame};
use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch, Uplink};
use drover_protocol::topics::{self, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::mosquitto::{Mosquitto, CONTROL_PLANE_USER};
use drover_tests::serve_process::{metrics, prom_counter, rss, ServeProcess};
use drover_tests::sim::{self, Identity, SimConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    devices: usize,
    messages: usize,
    broker: String,
    batch_max: Option<usize>,
    interleaved: bool,
    smoke: bool,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let mut a = Args {
        devices: if smoke { 10 } else { 1000 },
        messages: if smoke { 5 } else { 100 },
        broker: "embedded".into(),
        batch_max: None,
        interleaved: false,
        smoke,
    };
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--devices" => a.devices = v.parse().unwrap_or(a.devices),
            "--messages" => a.messages = v.parse().unwrap_or(a.messages),
            "--broker" => a.broker = v,
            "--order" => {
                a.interleaved = match v.as_str() {
                    "burst" => false,
                    "interleaved" => true,
                    _ => panic!("--order takes burst or interleaved, not {v:?}"),
                }
            }
            "--batch-max" => {
                a.batch_max = Some(v.parse().expect("--batch-max takes a number of frames"))
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a))
}

fn telemetry(seq: u64) -> Uplink {
    let mut latency = LatencyHistogram::new();
    latency.record(1500);
    Uplink::Telemetry(TelemetryBatch {
        window_start_ms: seq * 10_000,
        window_end_ms: seq * 10_000 + 9_999,
        model: None,
        inferences: 1000,
        errors: 1,
        data_quality_errors: 0,
        latency,
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

/// A raw device connection whose event loop runs in its own task.
async fn connect(
    host: &str,
    port: u16,
    client_id: String,
    user: String,
    pass: String,
) -> anyhow::Result<AsyncClient> {
    let mut o = MqttOptions::new(client_id.clone(), host, port);
    o.set_credentials(user, pass)
        .set_keep_alive(Duration::from_secs(60))
        .set_inflight(100);
    let (client, mut el) = AsyncClient::new(o, 256);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("{client_id} cannot connect: {e}"),
        }
    }
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Ok(client)
}

async fn run(a: Args) -> anyhow::Result<()> {
    let bin = drover_tests::workspace_bin("drover")?;
    let dir = tempfile::tempdir()?;
    let cp_pass = "bench-control-plane-secret";
    let mosq = if a.broker == "mosquitto" {
        Some(Mosquitto::start(
            &dir.path().join("mosquitto"),
            &[(CONTROL_PLANE_USER.to_string(), cp_pass.to_string())],
        )?)
    } else {
        anyhow::ensure!(a.broker == "embedded", "--broker is embedded or mosquitto");
        None
    };
    let mut extra = match &mosq {
        Some(m) => format!("broker_url = {:?}", m.url(CONTROL_PLANE_USER, cp_pass)),
        None => String::new(),
    };
    if let Some(b) = a.batch_max {
        extra.push_str(&format!("\n[ingest]\nbatch_max = {b}\n"));
    }
    let server = ServeProcess::start(&bin, &dir.path().join("server"), &extra)?;
    let api = server.api();
    let total = (a.devices * a.messages) as u64;
    println!(
        "command: cargo bench -p drover-tests --bench fleet_ingest -- --devices {} --messages {} --broker {} --order {}{}{}",
        a.devices,
        a.messages,
        a.broker,
        if a.interleaved { "interleaved" } else { "burst" },
        a.batch_max
            .map(|b| format!(" --batch-max {b}"))
            .unwrap_or_default(),
        if a.smoke { "   (smoke run: figures mean nothing)" } else { "" }
    );
    println!(
        "machine: {} cores ({}); load average before: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // One more identity for the raw subscriber: the broker binds a client id to its
    // device login, so it cannot share a measured device's.
    let cfg = SimConfig {
        devices: a.devices + 1,
        prefix: "ingest".into(),
        ..SimConfig::default()
    };
    let mut ids: Vec<Identity> = sim::enroll(&api, &cfg, 32).await?;
    let raw_sub = ids.pop().context("no identity enrolled")?;
    if let Some(m) = &mosq {
        let t = Instant::now();
        m.add_users_bulk(
            &ids.iter()
                .map(|d| (d.id.to_string(), d.key.mqtt_password()))
                .collect::<Vec<_>>(),
        )?;
        println!(
            "mosquitto: {} device accounts added in {:.1} s",
            ids.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let (host, port) = (ids[0].broker_host.clone(), ids[0].broker_port);
    let mut clients: Vec<(DeviceId, DeviceKey, AsyncClient)> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(200) {
        let conns: Vec<_> = chunk
            .iter()
            .map(|d| {
                let (id, key, host) = (d.id.clone(), d.key.clone(), host.clone());
                tokio::spawn(async move {
                    let c = connect(
                        &host,
                        port,
                        id.to_string(),
                        id.to_string(),
                        key.mqtt_password(),
                    )
                    .await?;
                    anyhow::Ok((id, key, c))
                })
            })
            .collect();
        for c in conns {
            clients.push(c.await??);
        }
    }
    println!("{} devices connected", clients.len());

    // 1. Raw publish→subscribe through the same broker: same devices, payload size and
    //    count, one subscriber, no ingest. Topic one level below the uplink kinds, so the
    //    control plane's `up/+` subscription does not see it (and mosquitto's `%u` ACL
    //    lets each device write it).
    let payload_len = seal_uplink(
        &clients[0].1,
        &UplinkFrame {
            device: clients[0].0.clone(),
            seq: 1,
            sent_at_ms: 0,
            msg: telemetry(1),
        },
    )
    .len();
    let received = Arc::new(AtomicU64::new(0));
    {
        let (user, pass) = match &mosq {
            Some(_) => (CONTROL_PLANE_USER.to_string(), cp_pass.to_string()),
            None => (raw_sub.id.to_string(), raw_sub.key.mqtt_password()),
        };
        let client_id = match &mosq {
            Some(_) => "bench-raw-sub".to_string(),
            None => raw_sub.id.to_string(),
        };
        let mut o = MqttOptions::new(client_id, host.clone(), port);
        o.set_credentials(user, pass).set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 1024);
        let raw_filter = format!("{}/bench/raw", topics::uplink_filter_all());
        client.subscribe(raw_filter, QoS::AtLeastOnce).await?;
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
        ready_rx.await.context("raw subscriber never subscribed")?;
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (id, _, c) in &clients {
        let c = c.clone();
        let topic = format!("{}/bench/raw", topics::uplink(id, UplinkKind::Telemetry));
        let n = a.messages;
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                c.publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    vec![0u8; payload_len],
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    while received.load(Relaxed) < total && t0.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let raw_s = t0.elapsed().as_secs_f64();
    let raw_n = received.load(Relaxed);
    let raw_rate = raw_n as f64 / raw_s;

    // 2. Ingest: sealed telemetry (as an agent's spool holds it) into SQLite.
    let frames: Vec<Vec<(String, Vec<u8>)>> = clients
        .iter()
        .map(|(id, key, _)| {
            let topic = topics::uplink(id, UplinkKind::Telemetry);
            (1..=a.messages as u64)
                .map(|seq| {
                    let f = UplinkFrame {
                        device: id.clone(),
                        seq,
                        sent_at_ms: seq,
                        msg: telemetry(seq),
                    };
                    (topic.clone(), seal_uplink(key, &f))
                })
                .collect()
        })
        .collect();
    let stored_now = || async {
        metrics(&server.api_url)
            .await
            .ok()
            .and_then(|p| prom_counter(&p, "drover_uplink_stored_total"))
            .unwrap_or(0)
    };
    let stored0 = stored_now().await;
    let t0 = Instant::now();
    if a.interleaved {
        let mut per_device: Vec<_> = frames.into_iter().map(Vec::into_iter).collect();
        for _ in 0..a.messages {
            for ((_, _, c), fr) in clients.iter().zip(per_device.iter_mut()) {
                if let Some((topic, bytes)) = fr.next() {
                    c.publish(topic, QoS::AtLeastOnce, false, bytes).await?;
                }
            }
        }
    } else {
        let mut tasks = Vec::new();
        for ((_, _, c), fr) in clients.iter().zip(frames) {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for (topic, bytes) in fr {
                    c.publish(topic, QoS::AtLeastOnce, false, bytes).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    let mut stored = 0;
    while t0.elapsed() < Duration::from_secs(600) {
        stored = stored_now().await - stored0;
        if stored >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_s = t0.elapsed().as_secs_f64();
    let ingest_rate = stored as f64 / ingest_s;
    let page = metrics(&server.api_url).await?;
    println!(
        "broker raw pub->sub : {raw_rate:>9.0} msg/s ({raw_n} msgs of {payload_len} B in {raw_s:.2} s)"
    );
    println!(
        "ingest into SQLite  : {ingest_rate:>9.0} msg/s ({stored} of {total} rows in {ingest_s:.2} s, {} transactions)",
        prom_counter(&page, "drover_ingest_batches_total").unwrap_or(0)
    );
    println!(
        "ratio ingest / raw  : {:.2}",
        ingest_rate / raw_rate.max(1.0)
    );
    let (server_peak, _) = rss(server.pid()).unwrap_or((0, 0));
    println!(
        "peak RSS: drover serve {:.0} MiB{}",
        server_peak as f64 / 1048576.0,
        match &mosq {
            Some(m) => format!(
                "; mosquitto {:.0} MiB",
                rss(m.pid()).map(|r| r.0).unwrap_or(0) as f64 / 1048576.0
            ),
            None => " (embedded broker included)".into(),
        }
    );
    anyhow::ensure!(stored == total, "only {stored} of {total} stored");
    Ok(())
}
