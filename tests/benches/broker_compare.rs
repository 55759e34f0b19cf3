//! The embedded broker candidates side by side in one run (issue 23): for each broker
//! (`embedded_broker` in `drover serve`'s config) and fleet size, `drover serve` in its
//! own process with the production mutual-TLS listener; N devices (each enrolled through
//! the HTTP API, with its own certificate, key and MQTT session) connect, subscribe as an
//! agent does (its downlink topic and the retained keyring), hold their sessions, then
//! publish sealed telemetry that the control plane stores in SQLite.
//!
//! cargo bench -p drover-tests --features rmqtt --bench broker_compare --
//!     [--devices 1000,5000,10000] [--brokers rumqttd,rmqtt] [--messages M] [--hold S]
//!
//! Per run: connect rate and time until every device is connected and subscribed, devices
//! that got the retained keyring, devices still connected after the hold, the server's
//! open files and RSS (before the devices, after they connected; RSS per device), stored
//! telemetry msg/s, load average before and after. A run that does not get every device
//! connected within `--connect-timeout` seconds (default 300) reports how many it got and
//! goes on to the next. `drover serve` must have been built with the brokers asked for
//! (`cargo build --release -p drover-cli --bin drover --features rmqtt`). Without
//! `--bench` (as under `cargo test --all-targets`) it is a small smoke run on rumqttd.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drover_protocol::envelope::{seal_uplink, UplinkFrame};
use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch, Uplink};
use drover_protocol::topics::{self, parse_hex32, UplinkKind};
use drover_protocol::{DeviceId, DeviceKey};
use drover_tests::serve_process::{metrics, prom_counter, rss, Listen, ServeProcess};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

struct Args {
    devices: Vec<usize>,
    brokers: Vec<String>,
    messages: usize,
    hold: u64,
    connect_timeout: u64,
    smoke: bool,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let smoke = !argv.iter().any(|a| a == "--bench");
    let val = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let list = |name: &str, default: &str| -> Vec<String> {
        val(name)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let num = |name: &str, default: u64| val(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    Args {
        devices: list("--devices", if smoke { "20" } else { "1000,5000,10000" })
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        brokers: list("--brokers", if smoke { "rumqttd" } else { "rumqttd,rmqtt" }),
        messages: num("--messages", if smoke { 2 } else { 20 }) as usize,
        hold: num("--hold", if smoke { 1 } else { 10 }),
        connect_timeout: num("--connect-timeout", if smoke { 60 } else { 300 }),
        smoke,
    }
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(a))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

async fn run(a: Args) -> anyhow::Result<()> {
    let bin = drover_tests::workspace_bin("drover")?;
    println!(
        "command: cargo bench -p drover-tests --features rmqtt --bench broker_compare -- --devices {} --brokers {} --messages {} --hold {}{}",
        a.devices.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","),
        a.brokers.join(","),
        a.messages,
        a.hold,
        if a.smoke { "   (smoke run: figures mean nothing)" } else { "" }
    );
    println!(
        "machine: {} cores ({}), open-file limit of each process {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::env::consts::ARCH,
        rustix_nofile()
    );
    let mut rows = Vec::new();
    for &n in &a.devices {
        for broker in &a.brokers {
            let r = one_run(&bin, broker, n, &a).await;
            match r {
                Ok(row) => {
                    println!("{}", row.line());
                    rows.push(row);
                }
                Err(e) => println!("{broker} x {n}: run failed: {e:#}"),
            }
        }
    }
    println!("\n| broker | devices | connected (subscribed) | connect rate | all subscribed | keyring | held {}s | server files | RSS before / after | RSS per device | stored | stored msg/s | broker dropped | load before / after |", a.hold);
    println!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in &rows {
        println!("{}", r.markdown());
    }
    if a.smoke {
        let r = rows.first().context("the smoke run did not run")?;
        anyhow::ensure!(
            r.subscribed == r.devices && r.stored == (r.devices * a.messages) as u64,
            "smoke run incomplete: {}",
            r.line()
        );
    }
    Ok(())
}

fn rustix_nofile() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    l.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join("/")
                })
        })
        .unwrap_or_default()
}

struct Row {
    broker: String,
    devices: usize,
    connected: usize,
    subscribed: usize,
    connect_s: f64,
    subscribed_s: f64,
    keyring: usize,
    held: usize,
    files: usize,
    rss_before: u64,
    rss_after: u64,
    stored: u64,
    ingest_rate: f64,
    /// Messages the broker dropped (`drover_broker_dropped_total`; rmqtt's queues).
    dropped: u64,
    load_before: String,
    load_after: String,
}

impl Row {
    fn per_device(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64
            / self.connected.max(1) as f64
            / 1024.0
    }

    fn line(&self) -> String {
        format!(
            "{} x {}: connected {} (subscribed {}) in {:.1} s ({:.0}/s), all subscribed {:.1} s, keyring {}, held {}, server files {}, RSS {:.0} -> {:.0} MiB ({:.1} KiB/device), stored {} at {:.0} msg/s, broker dropped {}, load {} -> {}",
            self.broker, self.devices, self.connected, self.subscribed, self.connect_s,
            self.connected as f64 / self.connect_s.max(1e-9), self.subscribed_s, self.keyring, self.held, self.files,
            mib(self.rss_before), mib(self.rss_after), self.per_device(), self.stored, self.ingest_rate,
            self.dropped, self.load_before, self.load_after
        )
    }

    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} ({}) | {:.0}/s | {:.1} s | {} | {} | {} | {:.0} / {:.0} MiB | {:.1} KiB | {} | {:.0} | {} | {} / {} |",
            self.broker, self.devices, self.connected, self.subscribed,
            self.connected as f64 / self.connect_s.max(1e-9), self.subscribed_s, self.keyring, self.held,
            self.files, mib(self.rss_before), mib(self.rss_after), self.per_device(), self.stored,
            self.ingest_rate, self.dropped, self.load_before, self.load_after
        )
    }
}

/// An enrolled device: its key and the TLS client config from its certificate.
struct Enrolled {
    id: DeviceId,
    key: DeviceKey,
    tls: Arc<rumqttc::tokio_rustls::rustls::ClientConfig>,
}

async fn enroll(
    api: &drover_tests::fleet::Api,
    dir: &Path,
    n: usize,
) -> anyhow::Result<(Vec<Enrolled>, String, u16)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (api, gate, dir) = (api.clone(), gate.clone(), dir.to_owned());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let id = format!("cmp-{i:05}");
            let r = api
                .post("/v1/devices", &serde_json::json!({"id": id, "labels": {}}))
                .await
                .with_context(|| format!("enrolling {id}"))?;
            let r: drover_control_plane::api::EnrollResponse = serde_json::from_value(r)?;
            let (ca, cert, key) = (
                dir.join(format!("{id}.ca.pem")),
                dir.join(format!("{id}.pem")),
                dir.join(format!("{id}.key")),
            );
            std::fs::write(&ca, &r.ca_pem)?;
            std::fs::write(&cert, &r.client_cert_pem)?;
            drover_host::fs::write_private(&key, r.client_key_pem.as_bytes())?;
            let tls = drover_control_plane::mqtt::tls_config(&ca, Some((&cert, &key)))?;
            let url = r.broker_url.clone();
            anyhow::Ok((
                Enrolled {
                    id: DeviceId::new(r.device_id)?,
                    key: DeviceKey(parse_hex32(&r.device_key).context("device key")?),
                    tls,
                },
                url,
            ))
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut url = String::new();
    while let Some(r) = set.join_next().await {
        let (e, u) = r??;
        url = u;
        out.push(e);
    }
    let rest = url.split("://").nth(1).context("broker url")?;
    let (host, port) = rest.rsplit_once(':').context("broker port")?;
    Ok((out, host.to_string(), port.parse()?))
}

/// What every device's task reports.
#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    subscribed: AtomicUsize,
    keyring: AtomicUsize,
    lost: AtomicUsize,
    last_connect_ms: AtomicU64,
    last_subscribe_ms: AtomicU64,
}

/// One device: mutual TLS, CONNECT, SUBSCRIBE downlink + keyring; then it keeps its
/// session, counting what arrives, until `stop`.
async fn device(
    d: &Enrolled,
    host: String,
    port: u16,
    c: Arc<Counters>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<AsyncClient> {
    let mut o = MqttOptions::new(d.id.to_string(), host, port);
    o.set_credentials(d.id.to_string(), d.key.mqtt_password())
        .set_clean_session(false)
        .set_keep_alive(Duration::from_secs(15))
        .set_inflight(64)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            d.tls.clone(),
        )));
    let (client, mut el) = AsyncClient::new(o, 64);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("{} cannot connect: {e}", d.id),
        }
    }
    c.connected.fetch_add(1, Relaxed);
    c.last_connect_ms
        .fetch_max(t0.elapsed().as_millis() as u64, Relaxed);
    client.try_subscribe(topics::downlink(&d.id), QoS::AtLeastOnce)?;
    client.try_subscribe(topics::keyring(), QoS::AtLeastOnce)?;
    let keyring = topics::keyring();
    tokio::spawn(async move {
        let (mut subacks, mut got_keyring) = (0, false);
        while !stop.load(Relaxed) {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == 2 {
                        c.subscribed.fetch_add(1, Relaxed);
                        c.last_subscribe_ms
                            .fetch_max(t0.elapsed().as_millis() as u64, Relaxed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == keyring && !got_keyring => {
                    got_keyring = true;
                    c.keyring.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => {
                    c.lost.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    });
    Ok(client)
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

/// Connects every device (at most 256 handshakes in flight from this side); returns the
/// clients that connected, once all are subscribed or the timeout passed.
async fn connect_all(
    devs: &Arc<Vec<Enrolled>>,
    host: &str,
    port: u16,
    c: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
    timeout: Duration,
) -> Vec<(usize, AsyncClient)> {
    let t0 = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..devs.len() {
        let (gate, c, stop, devs, host) = (
            gate.clone(),
            c.clone(),
            stop.clone(),
            devs.clone(),
            host.to_string(),
        );
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            // A device retries as an agent does, until the run's deadline.
            while t0.elapsed() < timeout {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(10),
                    device(&devs[i], host.clone(), port, c.clone(), t0, stop.clone()),
                );
                if let Ok(Ok(client)) = attempt.await {
                    return Some((i, client));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None
        });
    }
    let mut clients = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(x)) = r {
            clients.push(x);
        }
    }
    while c.subscribed.load(Relaxed) < clients.len() && t0.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    clients
}

async fn one_run(bin: &Path, broker: &str, n: usize, a: &Args) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let listen = Listen {
        plaintext: false,
        ..Listen::default()
    };
    let server = ServeProcess::start_with(
        bin,
        &dir.path().join("server"),
        &listen,
        &format!("embedded_broker = {broker:?}"),
    )?;
    let api = server.api();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    let t = Instant::now();
    let (devs, host, port) = enroll(&api, &certs, n).await?;
    let devs = Arc::new(devs);
    println!(
        "{broker} x {n}: enrolled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let load_before = loadavg();
    let rss_before = rss(server.pid()).map(|r| r.1).unwrap_or(0);
    let c = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_secs(a.connect_timeout);
    let clients = connect_all(&devs, &host, port, &c, &stop, timeout).await;
    let connected = clients.len();
    let subscribed = c.subscribed.load(Relaxed);
    let connect_s = c.last_connect_ms.load(Relaxed) as f64 / 1e3;
    let subscribed_s = c.last_subscribe_ms.load(Relaxed) as f64 / 1e3;
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let held = connected.saturating_sub(c.lost.load(Relaxed));
    let files = open_files(server.pid());
    let rss_after = rss(server.pid()).map(|r| r.1).unwrap_or(0);
    let (stored, ingest_rate) = ingest(&server, &devs, &clients, a.messages).await?;
    let dropped = metrics(&server.api_url)
        .await
        .ok()
        .and_then(|p| prom_counter(&p, "drover_broker_dropped_total"))
        .unwrap_or(0);
    stop.store(true, Relaxed);
    let row = Row {
        broker: broker.to_string(),
        devices: n,
        connected,
        subscribed,
        connect_s,
        subscribed_s,
        keyring: c.keyring.load(Relaxed),
        held,
        files,
        rss_before,
        rss_after,
        stored,
        ingest_rate,
        dropped,
        load_before,
        load_after: loadavg(),
    };
    drop(clients);
    server.kill()?;
    Ok(row)
}

/// One device's sealed frames, with their topics.
type Frames = Vec<(String, Vec<u8>)>;

/// Every connected device publishes `messages` sealed telemetry frames; returns the rows
/// stored and the rate (stored rows over the time until the last was stored).
async fn ingest(
    server: &ServeProcess,
    devs: &[Enrolled],
    clients: &[(usize, AsyncClient)],
    messages: usize,
) -> anyhow::Result<(u64, f64)> {
    let total = (clients.len() * messages) as u64;
    let frames: Vec<(AsyncClient, Frames)> = clients
        .iter()
        .map(|(i, client)| {
            let d = &devs[*i];
            let topic = topics::uplink(&d.id, UplinkKind::Telemetry);
            let f = (1..=messages as u64)
                .map(|seq| {
                    let frame = UplinkFrame {
                        device: d.id.clone(),
                        seq,
                        sent_at_ms: seq,
                        msg: telemetry(seq),
                    };
                    (topic.clone(), seal_uplink(&d.key, &frame))
                })
                .collect();
            (client.clone(), f)
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
    for (client, fr) in frames {
        tokio::spawn(async move {
            for (topic, bytes) in fr {
                if client
                    .publish(topic, QoS::AtLeastOnce, false, bytes)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    let mut stored = 0;
    let mut last_change = Instant::now();
    while t0.elapsed() < Duration::from_secs(600) && last_change.elapsed() < Duration::from_secs(30)
    {
        let now = stored_now().await - stored0;
        if now != stored {
            stored = now;
            last_change = Instant::now();
        }
        if stored >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = if stored >= total {
        t0.elapsed().as_secs_f64()
    } else {
        (last_change - t0).as_secs_f64()
    };
    Ok((stored, stored as f64 / secs.max(1e-9)))
}
