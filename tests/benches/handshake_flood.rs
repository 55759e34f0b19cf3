//! Handshake flood benchmark (issue 23): how long a real device takes to connect (mutual
//! TLS handshake, CONNECT, CONNACK through the embedded broker's TLS front) with 0 and
//! with N silent TCP connections open against the same listener, side by side in one run.
//!
//! cargo bench -p drover-tests --bench handshake_flood -- [--silent N] [--connects K]
//!     [--broker rumqttd|rumqttd-tuned|rmqtt]
//!
//! `--broker` is the `embedded_broker` (default rumqttd behind the TLS front; `rmqtt` does
//! the handshake itself and needs `--features rmqtt`).
//!
//! Without `--bench` (as under `cargo test --all-targets`) it is a small smoke run.

use std::time::{Duration, Instant};

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::topics;
use drover_protocol::DeviceKey;
use drover_tests::fleet::{enroll, Api};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One connect: TCP, mutual TLS, CONNECT, CONNACK; then a clean disconnect.
async fn connect_once(
    port: u16,
    cfg: &drover_agent::config::AgentConfig,
) -> anyhow::Result<Duration> {
    let key = DeviceKey(
        topics::parse_hex32(&cfg.device_key).ok_or_else(|| anyhow::anyhow!("bad device key"))?,
    );
    let tls = cfg.tls.as_ref().ok_or_else(|| anyhow::anyhow!("no tls"))?;
    let mut o = MqttOptions::new(cfg.device_id.clone(), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_credentials(cfg.device_id.clone(), key.mqtt_password());
    let cert = tls.client_cert_file.clone().unwrap_or_default();
    let keyf = tls.client_key_file.clone().unwrap_or_default();
    let rustls = drover_control_plane::mqtt::tls_config(&tls.ca_file, Some((&cert, &keyf)))?;
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(rustls)));
    let started = Instant::now();
    let (c, mut el) = AsyncClient::new(o, 16);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("connect: {e}"),
        }
    }
    let took = started.elapsed();
    c.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    Ok(took)
}

async fn series(
    port: u16,
    cfg: &drover_agent::config::AgentConfig,
    k: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        out.push(connect_once(port, cfg).await?);
        // The connect rate (a burst of 20, then 1/s per identity) is not what is measured.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    out.sort();
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let silent_n = arg("--silent", if bench { 500 } else { 50 });
    let k = arg("--connects", if bench { 10 } else { 2 });
    let argv: Vec<String> = std::env::args().collect();
    let broker = argv
        .iter()
        .position(|a| a == "--broker")
        .and_then(|i| argv.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "rumqttd".into());
    let tmp = tempfile::tempdir()?;
    let config = ServeConfig {
        data_dir: tmp.path().join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        embedded_broker: broker.clone(),
        ..Default::default()
    };
    let server = serve::run(config.validate()?, std::future::pending()).await?;
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());
    let dev = enroll(&api, tmp.path(), "gw-bench", &[]).await?;
    let port = server.mqtt_addr().port();

    let quiet = series(port, &dev.config, k).await?;
    let mut silent = Vec::with_capacity(silent_n);
    for _ in 0..silent_n {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await?);
    }
    let flooded = series(port, &dev.config, k).await?;
    drop(silent);
    println!("handshake_flood: {k} connects each, mutual TLS to the embedded broker ({broker})");
    for (what, s) in [
        ("0 silent connections", &quiet),
        (&*format!("{silent_n} silent connections"), &flooded),
    ] {
        println!(
            "  {what:<24} connect p50 {:>7.1} ms  max {:>7.1} ms",
            ms(s[s.len() / 2]),
            ms(s[s.len() - 1])
        );
    }
    let delay = flooded[flooded.len() / 2].saturating_sub(quiet[quiet.len() / 2]);
    println!("  delay from the flood (p50): {:.1} ms", ms(delay));
    server.shutdown().await;
    Ok(())
}
