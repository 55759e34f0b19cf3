//! Live sensor traffic through every agent's KServe v2 API, with the ground-truth label
//! sent back as feedback (that is how the fleet gathers labelled samples), and a ledger of
//! what each site's pumps were told, per model version and line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use super::world::{self, Line};

/// Counts for one (site, line, model version).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub served: u64,
    pub right: u64,
}

impl Tally {
    pub fn accuracy(&self) -> Option<f64> {
        (self.served > 0).then(|| self.right as f64 / self.served as f64)
    }
}

/// Key: site, line, model version that answered.
pub type Ledger = BTreeMap<(String, &'static str, String), Tally>;

pub fn line_name(line: Line) -> &'static str {
    match line {
        Line::Standard => "standard",
        Line::HighSpeed => "high-speed",
    }
}

/// One device the traffic goes to.
pub struct Target {
    pub id: String,
    pub site: String,
    pub api: String,
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    /// Sites whose pumps are the high-speed kind from now on.
    retrofitted: Arc<Mutex<Vec<String>>>,
    ledger: Arc<Mutex<Ledger>>,
    failed: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Starts one sender per device, each sending a reading every `every`.
    /// Each reading also goes to `companion`, the second model every gateway serves (no
    /// feedback; a failed request counts as one).
    pub fn start(
        targets: Vec<Target>,
        model: &str,
        companion: Option<&str>,
        every: Duration,
        seed: u64,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let retrofitted = Arc::new(Mutex::new(Vec::<String>::new()));
        let ledger = Arc::new(Mutex::new(Ledger::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let http = reqwest::Client::new();
        let tasks = targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let (stop, retro, ledger, failed, last_error, http) = (
                    Arc::clone(&stop),
                    Arc::clone(&retrofitted),
                    Arc::clone(&ledger),
                    Arc::clone(&failed),
                    Arc::clone(&last_error),
                    http.clone(),
                );
                let base = format!("http://{}/v2/models/{model}", t.api);
                let second = companion.map(|c| format!("http://{}/v2/models/{c}/infer", t.api));
                let mut rng = StdRng::seed_from_u64(seed ^ ((i as u64 + 1) << 32));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let line = if lock(&retro).contains(&t.site) {
                            Line::HighSpeed
                        } else {
                            Line::Standard
                        };
                        let (x, y) = world::reading(&mut rng, line);
                        if let Some(url) = &second {
                            if let Err(e) = infer_only(&http, url, &x).await {
                                failed.fetch_add(1, Ordering::Relaxed);
                                *lock(&last_error) = Some(format!("{}: {e:#}", t.id));
                            }
                        }
                        match infer(&http, &base, &x, y).await {
                            Ok((version, right)) => {
                                let mut l = lock(&ledger);
                                let e = l
                                    .entry((t.site.clone(), line_name(line), version))
                                    .or_default();
                                e.served += 1;
                                e.right += u64::from(right);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                *lock(&last_error) = Some(format!("{}: {e:#}", t.id));
                            }
                        }
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            retrofitted,
            ledger,
            failed,
            last_error,
            tasks,
        }
    }

    /// From now on `site` runs high-speed pumps.
    pub fn retrofit(&self, site: &str) {
        lock(&self.retrofitted).push(site.to_owned());
    }

    pub fn ledger(&self) -> Ledger {
        lock(&self.ledger).clone()
    }

    /// Requests that got no answer, and the last reason.
    pub fn failures(&self) -> (u64, Option<String>) {
        (
            self.failed.load(Ordering::Relaxed),
            lock(&self.last_error).clone(),
        )
    }

    /// Stops every sender after its request in flight.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let ledger = lock(&self.ledger).clone();
        ledger
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One inference and its feedback; returns the version that answered and whether its
/// prediction was right.
/// One request without feedback; an error when it is not answered with outputs.
async fn infer_only(http: &reqwest::Client, url: &str, x: &[f32]) -> anyhow::Result<()> {
    let body =
        json!({"inputs": [{"name": "x", "shape": [1, x.len()], "datatype": "FP32", "data": x}]});
    let r: Value = http
        .post(url)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(r["outputs"][0]["data"].is_array(), "unexpected output {r}");
    Ok(())
}

async fn infer(
    http: &reqwest::Client,
    base: &str,
    x: &[f32],
    y: u32,
) -> anyhow::Result<(String, bool)> {
    let body =
        json!({"inputs": [{"name": "x", "shape": [1, x.len()], "datatype": "FP32", "data": x}]});
    let r: Value = http
        .post(format!("{base}/infer"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let probs: Vec<f64> = r["outputs"][0]["data"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    anyhow::ensure!(probs.len() == 2, "unexpected output {r}");
    let predicted = u32::from(probs[1] > probs[0]);
    let version = r["model_version"].as_str().unwrap_or("?").to_owned();
    if let Some(id) = r["parameters"]["drover_request_id"].as_u64() {
        http.post(format!("{base}/feedback"))
            .json(&json!({"id": id, "label": y}))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok((version, predicted == y))
}
