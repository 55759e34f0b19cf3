//! Scenario steps shared by the simulator binary, its benches and its CI test: publish a
//! model through the HTTP API, start a staged rollout, follow it wave by wave.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::fleet::Api;

/// Publishes `onnx` as `name@version` (`POST /v1/models`), with an optional baseline CSV.
pub async fn publish_model(
    api: &Api,
    name: &str,
    version: &str,
    onnx: &[u8],
    baseline_csv: Option<String>,
) -> anyhow::Result<Value> {
    api.post(
        "/v1/models",
        &json!({
            "name": name,
            "version": version,
            "model_hex": hex_encode(onnx),
            "baseline_csv": baseline_csv,
        }),
    )
    .await
    .with_context(|| format!("publishing {name}@{version}"))
}

fn hex_encode(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// A plan with cumulative waves (`percents`), the same bake after each, no concurrency
/// cap, and gates that need `min_inferences` before judging errors and latency.
pub fn plan(model: &str, percents: &[f64], bake: Duration, min_inferences: u64) -> Value {
    let waves: Vec<Value> = percents
        .iter()
        .map(|p| json!({"percent": p, "bake": format!("{}ms", bake.as_millis())}))
        .collect();
    json!({
        "model": model,
        "selector": "all",
        "waves": waves,
        "max_concurrent": 0,
        "device_deadline": "10m",
        "on_failure": "rollback",
        // The benchmark times waves; gates short of data pass, as before `on_no_data`.
        "gates": {"min_inferences": min_inferences, "on_no_data": "pass"},
    })
}

/// Starts a rollout; returns its id.
pub async fn start_rollout(api: &Api, plan: &Value) -> anyhow::Result<u64> {
    let r = api.post("/v1/rollouts", plan).await?;
    r["id"].as_u64().context("rollout id in the response")
}

/// How a followed rollout went.
#[derive(Clone, Debug)]
pub struct RolloutRun {
    pub status: String,
    pub total: Duration,
    /// Per wave: (one-based wave, cumulative target, time from the wave's start until
    /// the next began or the rollout ended).
    pub waves: Vec<(usize, u64, Duration)>,
    pub last: Value,
}

/// Polls the rollout until it is no longer running (or `timeout`), timing each wave.
pub async fn follow(api: &Api, id: u64, timeout: Duration) -> anyhow::Result<RolloutRun> {
    let t0 = Instant::now();
    let mut wave = 1usize;
    let mut wave_start = t0;
    let mut waves = Vec::new();
    loop {
        let r = api.get(&format!("/v1/rollouts/{id}")).await?;
        let status = r["status"].as_str().unwrap_or_default().to_owned();
        let w = r["wave"].as_u64().unwrap_or(1) as usize;
        let target = |w: usize| {
            r["waves"]
                .get(w.saturating_sub(1))
                .and_then(|v| v["target"].as_u64())
                .unwrap_or(0)
        };
        while w > wave {
            waves.push((wave, target(wave), wave_start.elapsed()));
            wave += 1;
            wave_start = Instant::now();
        }
        if !matches!(status.as_str(), "running" | "rolling-back") {
            waves.push((wave, target(wave), wave_start.elapsed()));
            return Ok(RolloutRun {
                status,
                total: t0.elapsed(),
                waves,
                last: r,
            });
        }
        anyhow::ensure!(
            t0.elapsed() < timeout,
            "rollout {id} still {status} at wave {w} after {timeout:?}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
