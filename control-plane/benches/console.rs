//! The web console at fleet scale (issue 21): `drover serve` (in process, loopback) with
//! N devices in its store, rows as ingest leaves them (labels, presence, last seen,
//! active model, phase); a signed-in client fetches the fleet overview (first page, a
//! label filter, a search on a later page) and the figures are the request's round trip
//! on loopback, an upper bound of the server's time (SQL, aggregation, rendering),
//! plus the page weight (HTML, CSS, script).
//!
//! cargo bench -p drover-control-plane --bench console -- [--devices N] [--requests R]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_control_plane::store::Store;
use drover_protocol::{DeviceId, DeviceKey};

fn arg(name: &str, default: usize, smoke: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    if !argv.iter().any(|a| a == "--bench") {
        return smoke;
    }
    argv.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn populate(db: &std::path::Path, devices: usize, now_ms: u64) -> anyhow::Result<()> {
    let mut store = Store::open(db)?;
    for k in 0..devices {
        let labels = BTreeMap::from([
            ("site".to_owned(), format!("plant-{:02}", k % 20)),
            ("line".to_owned(), format!("line-{}", k % 7)),
            (
                "pump".to_owned(),
                ["centrifugal", "screw", "piston"][k % 3].to_owned(),
            ),
        ]);
        store.enroll_device(
            &DeviceId::new(format!("gw-{k:05}"))?,
            &DeviceKey([7; 32]),
            &labels,
            now_ms,
        )?;
    }
    drop(store);
    // What hellos, model reports and progress leave on the rows (ingest's own columns).
    let conn = rusqlite::Connection::open(db)?;
    conn.execute(
        "UPDATE devices SET online = (rowid % 10 != 0), last_seen_ms = ?1 - (rowid % 600) * 1000,
             arch = 'aarch64', os = 'linux', agent_version = '0.1.0',
             active_model = CASE WHEN rowid % 4 = 0 THEN 'vibration@1.1.0' ELSE 'vibration@1.0.0' END,
             last_phase = 'healthy'",
        [now_ms as i64],
    )?;
    Ok(())
}

struct Timing {
    what: String,
    times: Vec<Duration>,
    bytes: usize,
}

impl Timing {
    fn print(&mut self) {
        self.times.sort();
        let q = |p: f64| self.times[((self.times.len() - 1) as f64 * p).round() as usize];
        println!(
            "{:<44} p50 {:>7.2} ms  p95 {:>7.2} ms  max {:>7.2} ms  html {:>6} B",
            self.what,
            q(0.5).as_secs_f64() * 1e3,
            q(0.95).as_secs_f64() * 1e3,
            q(1.0).as_secs_f64() * 1e3,
            self.bytes
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let devices = arg("--devices", 1000, 60);
    let requests = arg("--requests", 50, 3);
    let tmp = tempfile::tempdir()?;
    let config = ServeConfig {
        data_dir: tmp.path().to_owned(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        allow_plaintext: true,
        ..Default::default()
    };
    let h = serve::run(config.validate()?, std::future::pending()).await?;
    let now = drover_host::clock::now_ms();
    let db = tmp.path().join("drover.db");
    tokio::task::spawn_blocking(move || populate(&db, devices, now)).await??;

    let base = format!("http://{}", h.http_addr());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = http
        .post(format!("{base}/console/login"))
        .form(&[("token", h.api_token())])
        .send()
        .await?;
    anyhow::ensure!(r.status() == 303, "sign-in refused: {}", r.status());
    let cookie = r.headers()["set-cookie"]
        .to_str()?
        .split(';')
        .next()
        .unwrap_or_default()
        .to_owned();
    println!(
        "console overview, {devices} devices, {requests} requests each (loopback round trip):"
    );
    let pages = [
        ("/console", "overview, page 1"),
        (
            "/console?label=site%3Dplant-07",
            "overview, label site=plant-07",
        ),
        (
            "/console?q=gw-00&state=online&page=3",
            "overview, search + state, page 3",
        ),
    ];
    for (path, what) in pages {
        let mut t = Timing {
            what: what.into(),
            times: Vec::new(),
            bytes: 0,
        };
        for _ in 0..requests {
            let started = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .header("cookie", &cookie)
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200, "{path}: {}", r.status());
            let body = r.bytes().await?;
            t.times.push(started.elapsed());
            t.bytes = body.len();
        }
        t.print();
    }
    let mut weight = 0;
    for a in ["/console/assets/console.css", "/console/assets/console.js"] {
        let r = http
            .get(format!("{base}{a}"))
            .header("cookie", &cookie)
            .send()
            .await?;
        weight += r.bytes().await?.len();
    }
    println!("assets (CSS + script): {weight} B, cached by the browser");
    h.shutdown().await;
    Ok(())
}
