//! `drover serve` as a child process: for benchmarks whose broker and control plane must
//! live in their own process (10,000 devices need 10,000 sockets on each side, and the
//! server's peak RSS must be its own). Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Where a [`ServeProcess`] listens: port 0 picks a free one on each start.
#[derive(Clone, Debug)]
pub struct Listen {
    pub http_port: u16,
    pub mqtt_port: u16,
    /// The embedded broker in plaintext (simulated devices log in with passwords only).
    pub plaintext: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            http_port: 0,
            mqtt_port: 0,
            plaintext: true,
        }
    }
}

impl Listen {
    /// Fixed free ports, kept across restarts.
    pub fn fixed(plaintext: bool) -> Listen {
        Listen {
            http_port: crate::free_port(),
            mqtt_port: crate::free_port(),
            plaintext,
        }
    }
}

pub struct ServeProcess {
    child: Child,
    pub data_dir: PathBuf,
    pub api_url: String,
    pub token: String,
}

impl ServeProcess {
    /// Starts `drover` (binary at `bin`) with `serve --config` on a config whose data dir
    /// is `data_dir`, free loopback ports, the embedded broker in plaintext (simulated
    /// devices log in with passwords, not certificates) and the given extra TOML lines (e.g.
    /// `rollout_tick_ms = 500`, `broker_url = "mqtt://..."`).
    pub fn start(bin: &Path, data_dir: &Path, extra_toml: &str) -> anyhow::Result<ServeProcess> {
        Self::start_with(bin, data_dir, &Listen::default(), extra_toml)
    }

    /// As [`ServeProcess::start`] with the listeners chosen: fixed ports survive a restart
    /// (devices reconnect to the address they were enrolled with), and `plaintext: false`
    /// runs the production mutual-TLS front. The log is appended to, so it spans restarts.
    pub fn start_with(
        bin: &Path,
        data_dir: &Path,
        listen: &Listen,
        extra_toml: &str,
    ) -> anyhow::Result<ServeProcess> {
        std::fs::create_dir_all(data_dir)?;
        let conf = data_dir.join("serve.toml");
        std::fs::write(
            &conf,
            format!(
                "version = 1\ndata_dir = {:?}\nhttp_listen = \"127.0.0.1:{}\"\nmqtt_listen = \"127.0.0.1:{}\"\nallow_plaintext = {}\n{extra_toml}\n",
                data_dir.display().to_string(),
                listen.http_port,
                listen.mqtt_port,
                listen.plaintext,
            ),
        )?;
        let url_file = data_dir.join(drover_control_plane::app::paths::URL_FILE);
        let _ = std::fs::remove_file(&url_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("serve.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = ServeProcess {
            child,
            data_dir: data_dir.to_owned(),
            api_url: String::new(),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = p.child.try_wait()? {
                bail!("drover serve exited ({st}): {}", p.log());
            }
            if let Ok(url) = std::fs::read_to_string(&url_file) {
                if !url.trim().is_empty() {
                    p.api_url = url.trim().to_owned();
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "drover serve did not write {}: {}",
                    url_file.display(),
                    p.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        p.token =
            std::fs::read_to_string(data_dir.join(drover_control_plane::app::paths::TOKEN_FILE))?
                .trim()
                .to_owned();
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server (no shutdown path runs) and reaps it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("serve.log")).unwrap_or_default()
    }

    pub fn api(&self) -> crate::fleet::Api {
        crate::fleet::Api::new(self.api_url.clone(), self.token.clone())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `drover serve` as [`ServeProcess::start_with`] does, retrying for up to 20 s
/// while a killed predecessor's ports are still being released.
pub fn start_retrying(
    bin: &Path,
    data_dir: &Path,
    listen: &Listen,
) -> anyhow::Result<ServeProcess> {
    let mut last = None;
    for _ in 0..100 {
        match ServeProcess::start_with(bin, data_dir, listen, "") {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("drover serve did not start")))
}

/// What a stopped server's database says about the telemetry of devices whose id starts
/// with `device_prefix`: `PRAGMA integrity_check`, rows, and distinct (device, window)
/// pairs (rows above it are duplicates).
pub fn inspect_telemetry(
    data_dir: &Path,
    device_prefix: &str,
) -> anyhow::Result<(String, u64, u64)> {
    let db = rusqlite::Connection::open(data_dir.join(drover_control_plane::app::paths::DB_FILE))?;
    let check: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    let mine = "substr(device, 1, length(?1)) = ?1";
    let rows: u64 = db.query_row(
        &format!("SELECT count(*) FROM telemetry WHERE {mine}"),
        [device_prefix],
        |r| r.get(0),
    )?;
    let distinct: u64 = db.query_row(
        &format!(
            "SELECT count(*) FROM (SELECT DISTINCT device, window_start_ms FROM telemetry WHERE {mine})"
        ),
        [device_prefix],
        |r| r.get(0),
    )?;
    Ok((check, rows, distinct))
}

/// Peak and current resident set size of a process, in bytes (`VmHWM`, `VmRSS`).
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// One counter from a Prometheus text page (`name value`, no labels).
pub fn prom_counter(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The control plane's `/metrics` page (open, no token).
pub async fn metrics(api_url: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("{api_url}/metrics"))
        .await?
        .text()
        .await?)
}
