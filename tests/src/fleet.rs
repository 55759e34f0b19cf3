//! A fleet of real in-process agents for end-to-end tests: enrolled through the HTTP API,
//! each with its own MQTT session, keys, data dir, tract runtime and local inference API,
//! plus a traffic generator that calls their KServe v2 endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use drover_agent::config::AgentConfig;
use serde_json::{json, Value};

/// The control plane's HTTP API with its bearer token.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Api {
            http: reqwest::Client::new(),
            base: base.into(),
            token: token.into(),
        }
    }

    /// `--server URL --token T` for the CLI.
    pub fn cli_args(&self) -> Vec<String> {
        vec![
            "--server".into(),
            self.base.clone(),
            "--token".into(),
            self.token.clone(),
        ]
    }

    async fn check(r: reqwest::Response) -> anyhow::Result<Value> {
        let status = r.status();
        let text = r.text().await?;
        anyhow::ensure!(status.is_success(), "HTTP {status}: {text}");
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?;
        Self::check(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        Self::check(r).await
    }

    /// Device id → active model (`name@version`), for every device.
    pub async fn active_models(&self) -> anyhow::Result<BTreeMap<String, Option<String>>> {
        let v = self.get("/v1/devices").await?;
        Ok(v.as_array()
            .context("device list")?
            .iter()
            .map(|d| {
                (
                    d["id"].as_str().unwrap_or_default().to_owned(),
                    d["active_model"].as_str().map(str::to_owned),
                )
            })
            .collect())
    }
}

/// One enrolled device and, when running, its agent.
pub struct Device {
    pub id: String,
    pub config: AgentConfig,
    agent: Option<drover_agent::Agent>,
}

impl Device {
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.agent.as_ref().map(|a| a.api_addr())
    }

    /// The agent's Prometheus listener (`metrics_addr`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.agent.as_ref().map(|a| a.metrics_addr())
    }

    pub fn running(&self) -> bool {
        self.agent.is_some()
    }

    /// Starts (or restarts, with the same data dir) the agent.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.agent.is_none(), "{} already running", self.id);
        let agent = drover_agent::run(self.config.clone(), std::future::pending()).await?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Stops the agent cleanly (it says offline; its data dir stays).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(a) = self.agent.take() {
            a.shutdown();
            a.wait().await?;
        }
        Ok(())
    }
}

/// Enrolls `id` through the API and returns its agent config (data dir under `dir`,
/// API on a free loopback port, short telemetry windows).
pub async fn enroll(
    api: &Api,
    dir: &Path,
    id: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<Device> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let resp = api
        .post("/v1/devices", &json!({"id": id, "labels": labels}))
        .await?;
    let resp: drover_control_plane::api::EnrollResponse = serde_json::from_value(resp)?;
    let data_dir: PathBuf = dir.join(format!("{id}-data"));
    // The device's key, certificate and the fleet CA, for mutual TLS (files 0600).
    let mut config = drover_cli::agent_files::write_agent_files(resp, dir, None, data_dir, labels)?;
    config.api_addr = "127.0.0.1:0".into();
    config.metrics_addr = "127.0.0.1:0".into();
    config.telemetry.interval_ms = 300;
    // In-process agents check new models in the real agent binary, as devices do.
    config.runtime.loader_exe = Some(crate::workspace_bin("drover-agent")?);
    Ok(Device {
        id: id.to_owned(),
        config,
        agent: None,
    })
}

/// Background inference traffic against every running device's local API.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Where traffic goes; update it as devices stop and start.
pub type Targets = Arc<Mutex<Vec<SocketAddr>>>;

impl Traffic {
    /// Sends one request per target every `period`, to model `name`. Each target's every
    /// `bad_every`-th request (0: none) carries a feature value of 5.0, which a fragile
    /// model cannot take.
    pub fn start(targets: Targets, name: &str, period: Duration, bad_every: u64) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let (s, n, name) = (stop.clone(), sent.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let mut round = 0u64;
            while !s.load(Ordering::Relaxed) {
                round += 1;
                let addrs = targets.lock().map(|t| t.clone()).unwrap_or_default();
                let mut reqs = Vec::new();
                for (k, a) in addrs.into_iter().enumerate() {
                    // Every device gets a bad input every `bad_every` rounds.
                    let v = if bad_every > 0 && (round + k as u64) % bad_every == 0 {
                        5.0
                    } else {
                        0.25
                    };
                    let body = json!({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": vec![v; 16]}]});
                    let req = http
                        .post(format!("http://{a}/v2/models/{name}/infer"))
                        .json(&body)
                        .send();
                    reqs.push(req);
                }
                for r in reqs {
                    let _ = r.await;
                    n.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(period).await;
            }
        });
        Traffic { stop, sent, task }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// Publishes an ONNX file through the CLI binary as `name@version`.
pub fn publish(api: &Api, file: &Path, name: &str, version: &str) -> anyhow::Result<Value> {
    let mut args: Vec<String> = vec![
        "model".into(),
        "publish".into(),
        file.to_string_lossy().into_owned(),
        "--name".into(),
        name.into(),
        "--version".into(),
        version.into(),
        "--output".into(),
        "json".into(),
    ];
    args.extend(api.cli_args());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::drover_cli(&refs)?;
    Ok(serde_json::from_str(&out)?)
}

/// Runs `drover rollout ...` through the CLI binary with `--output json`.
pub fn rollout_cli(api: &Api, args: &[&str]) -> anyhow::Result<Value> {
    let mut all: Vec<String> = vec!["rollout".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    if args.first() == Some(&"start") {
        // Not a terminal: the start cannot ask for confirmation.
        all.push("--yes".into());
    }
    all.extend(["--output".into(), "json".into()]);
    all.extend(api.cli_args());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = crate::drover_cli(&refs)?;
    // One pretty object, or (watch) one object per line: the last is the final state.
    match serde_json::from_str(&out) {
        Ok(v) => Ok(v),
        Err(_) => Ok(serde_json::from_str(out.lines().last().unwrap_or("null"))?),
    }
}

/// The agent fixtures directory (real ONNX models and onnxruntime reference outputs).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures")
        .join(name)
}

/// An in-process `drover serve` on loopback ports (embedded broker, SQLite under
/// `dir/server`), with `adjust` applied to its config, and an API client for it.
pub async fn serve_local(
    dir: &Path,
    adjust: impl FnOnce(&mut drover_control_plane::config::ServeConfig),
) -> anyhow::Result<(drover_control_plane::serve::ServeHandle, Api)> {
    let mut config = drover_control_plane::config::ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    adjust(&mut config);
    let server =
        drover_control_plane::serve::run(config.validate()?, std::future::pending()).await?;
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());
    Ok((server, api))
}

/// Enrolls and starts `per_site` agents at each site (`<site>-NN`, label `site=<site>`)
/// and waits until every one of them is online.
pub async fn start_sites(
    api: &Api,
    dir: &Path,
    sites: &[&str],
    per_site: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Device>> {
    let mut fleet = Vec::new();
    for site in sites {
        for i in 0..per_site {
            let mut d = enroll(api, dir, &format!("{site}-{i:02}"), &[("site", site)]).await?;
            d.start().await?;
            fleet.push(d);
        }
    }
    let want = fleet.len();
    crate::wait_until(&format!("{want} devices online"), timeout, || async {
        let v = api.get("/v1/devices?online=true").await.ok()?;
        (v.as_array()?.len() == want).then_some(())
    })
    .await?;
    Ok(fleet)
}

/// Publishes `file` as `name@version` and rolls it out to every device in one wave,
/// waiting until the rollout completes. Returns the rollout id.
pub async fn roll_out_everywhere(
    api: &Api,
    file: &Path,
    name: &str,
    version: &str,
    timeout: Duration,
) -> anyhow::Result<u64> {
    publish(api, file, name, version)?;
    let model = format!("{name}@{version}");
    let r = rollout_cli(
        api,
        &[
            "start",
            "--model",
            &model,
            "--selector",
            "all",
            "--on-no-data",
            "pass",
            "--waves",
            "100",
            "--bake",
            "0s",
        ],
    )?;
    let id = r["id"].as_u64().context("rollout id")?;
    crate::wait_until(
        &format!("rollout of {model} to complete"),
        timeout,
        || async {
            let r = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
            (r["status"] == "completed").then_some(())
        },
    )
    .await?;
    Ok(id)
}
