//! Metrics end to end (issue 20): a running fleet (the control plane, two real agents, a
//! staged rollout with gates, live inference traffic) is linted by `promtool check metrics`
//! on both endpoints and scraped by a real Prometheus (temp config, loopback, 1 s scrape
//! interval), whose HTTP API then answers a rollout's gate value and a device's p99
//! inference latency. The expiry gauges (keyring, fleet CA, CRL, a device's and an
//! integration's certificate) must equal what the files and the API say, and the
//! continuous-training policy's champion must be the rolled-out version.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{
    fixture, publish, roll_out_everywhere, rollout_cli, start_sites, Api, Device, Traffic,
};
use drover_tests::{free_port, peers_required, wait_until};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(180);

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value of the one sample whose series is `series` (name and labels, as printed).
fn value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    line[series.len()..].trim().parse().unwrap()
}

/// The expiry gauges say what the keyring, the CA, the CRL, a device's and an
/// integration's certificate say.
async fn expiry_gauges_match_the_files(
    text: &str,
    keys: &std::path::Path,
    api: &Api,
    integration: &Value,
) {
    use drover_control_plane::pki;
    let secs = |ms: u64| ms as f64 / 1e3;
    let keyring = api.get("/v1/keyring").await.unwrap();
    let ca = std::fs::read_to_string(keys.join(pki::CA_CERT_FILE)).unwrap();
    let crl = std::fs::read(keys.join(pki::CRL_FILE)).unwrap();
    let device = std::fs::read_to_string(keys.join("issued/plant-a-00.pem")).unwrap();
    for (series, want) in [
        (
            "drover_keyring_expiry_timestamp_seconds".to_string(),
            secs(keyring["expires_at_ms"].as_u64().unwrap()),
        ),
        (
            "drover_fleet_ca_expiry_timestamp_seconds".into(),
            secs(pki::not_after_ms(&ca).unwrap()),
        ),
        (
            "drover_crl_next_update_timestamp_seconds".into(),
            secs(pki::crl_next_update_ms(&crl).unwrap()),
        ),
        (
            "drover_device_cert_expiry_timestamp_seconds{device=\"plant-a-00\"}".into(),
            secs(pki::not_after_ms(&device).unwrap()),
        ),
        (
            "drover_integration_cert_expiry_timestamp_seconds{integration=\"grafana\"}".into(),
            secs(integration["not_after_ms"].as_u64().unwrap()),
        ),
    ] {
        assert_eq!(value(text, &series), want, "{series}");
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `promtool check metrics` on `text`: its findings (empty when clean).
fn promtool(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() || !findings.is_empty(),
        "promtool failed silently"
    );
    findings
}

async fn page(url: String) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// One instant query; the first result's value, if any.
async fn query(base: &str, q: &str) -> Option<f64> {
    let v: Value = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn prometheus(dir: &std::path::Path, cp: &str, fleet: &[Device]) -> (KillOnDrop, String) {
    let mut agents = String::new();
    for d in fleet {
        agents.push_str(&format!(
            "      - targets: ['{}']\n        labels: {{device: '{}'}}\n",
            d.metrics_addr().unwrap(),
            d.id
        ));
    }
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: drover\n    static_configs:\n      - targets: ['{cp}']\n\
         \x20 - job_name: drover-agent\n    static_configs:\n{agents}"
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    (KillOnDrop(child), format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_metrics_pages_are_promtool_clean_and_prometheus_answers_gates_and_p99() {
    if !have("promtool") || !have("prometheus") {
        assert!(
            !peers_required(),
            "promtool and prometheus are required (bash .ci/install-deps.sh)"
        );
        eprintln!("skipped: promtool or prometheus not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A continuous-training policy on the rolled-out model, for the champion's series (its
    // job never runs: the tick is an hour and nothing triggers it).
    let train = drover_tests::training::toml_args(&["true"]);
    std::fs::write(
        dir.join("policy.toml"),
        drover_tests::training::policy("dense", ""),
    )
    .unwrap();
    std::fs::write(
        dir.join("job.toml"),
        drover_tests::training::job_spec("local", &train, 60, None),
    )
    .unwrap();
    let mut config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        rollout_tick_ms: 200,
        ..Default::default()
    };
    config.continuous.policy = dir.join("policy.toml").display().to_string();
    config.continuous.tick_secs = 3600;
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let cp = server.http_addr().to_string();
    let api = Api::new(format!("http://{cp}"), server.api_token());
    let fleet = start_sites(&api, dir, &["plant-a"], 2, WAIT).await.unwrap();
    roll_out_everywhere(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0", WAIT)
        .await
        .unwrap();
    let targets = Arc::new(Mutex::new(
        fleet
            .iter()
            .filter_map(Device::api_addr)
            .collect::<Vec<_>>(),
    ));
    let traffic = Traffic::start(targets, "dense", Duration::from_millis(50), 0);

    // A staged rollout whose gates get values from the live traffic.
    publish(&api, &fixture("dense_v2.onnx"), "dense", "2.0.0").unwrap();
    let r = rollout_cli(
        &api,
        &[
            "start",
            "--model",
            "dense@2.0.0",
            "--selector",
            "all",
            "--waves",
            "50,100",
            "--bake",
            "2s",
            "--min-inferences",
            "5",
            "--max-p99-latency-ratio",
            "50",
            "--on-no-data",
            "pass",
        ],
    )
    .unwrap();
    let id = r["id"].as_u64().unwrap();
    let done = wait_until("the gated rollout to complete", WAIT, || async {
        let r = api.get(&format!("/v1/rollouts/{id}")).await.ok()?;
        (r["status"] == "completed").then_some(r)
    })
    .await
    .unwrap();
    let (gate, value) = done["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|g| Some((g["gate"].as_str()?.to_owned(), g["value"].as_f64()?)))
        .unwrap_or_else(|| panic!("no gate with a value: {done:#}"));

    let integration = api
        .post("/v1/integrations", &serde_json::json!({"name": "grafana"}))
        .await
        .unwrap();

    // promtool is clean on both endpoints, which carry the new families.
    let cp_text = page(format!("http://{cp}/metrics")).await;
    assert_eq!(promtool(&cp_text), "", "control plane /metrics:\n{cp_text}");
    for family in [
        "drover_build_info{version=",
        "drover_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/rollouts/{id}\"",
        "drover_ingest_batch_duration_seconds_count ",
        "drover_ingest_queue_depth ",
        &format!("drover_rollout_status{{rollout=\"{id}\",model=\"dense@2.0.0\",status=\"completed\"}} 1"),
        &format!("drover_rollout_gate_verdict{{rollout=\"{id}\",gate=\"{gate}\",verdict="),
        "drover_device_online{device=\"plant-a-00\"} 1",
        "drover_device_info{device=\"plant-a-00\",model=\"dense@2.0.0\"",
        "drover_fleet_devices{online=\"true\",model=\"dense@2.0.0\"} 2",
        "# TYPE drover_training_job_duration_seconds histogram",
        "# TYPE drover_drift_psi gauge",
        "drover_training_champion_info{policy=\"policy\",model=\"dense\",version=\"2.0.0\"} 1",
    ] {
        assert!(cp_text.contains(family), "{family} missing:\n{cp_text}");
    }
    expiry_gauges_match_the_files(&cp_text, &dir.join("server/keys"), &api, &integration).await;
    for d in &fleet {
        let text = page(format!("http://{}/metrics", d.metrics_addr().unwrap())).await;
        assert_eq!(promtool(&text), "", "{} /metrics:\n{text}", d.id);
        assert!(
            text.contains("drover_agent_inference_duration_seconds_bucket{model=\"dense\",version=\"2.0.0\",role=\"active\",le=\"+Inf\"}"),
            "{text}"
        );
    }

    // A real Prometheus scrapes them all and answers through its HTTP API.
    let (_prom, prom) = prometheus(dir, &cp, &fleet);
    let q = format!("drover_rollout_gate_value{{rollout=\"{id}\",gate=\"{gate}\"}}");
    let scraped = wait_until("Prometheus to hold the gate value", WAIT, || async {
        query(&prom, &q).await
    })
    .await
    .unwrap();
    assert!(
        (scraped - value).abs() <= 1e-9 * value.abs().max(1.0),
        "{gate}: Prometheus {scraped}, API {value}"
    );
    let p99 = "histogram_quantile(0.99, sum by (le) (drover_agent_inference_duration_seconds_bucket{device=\"plant-a-00\",role=\"active\"}))";
    let p99 = wait_until("Prometheus to answer plant-a-00's p99", WAIT, || async {
        query(&prom, p99).await.filter(|v| v.is_finite())
    })
    .await
    .unwrap();
    assert!(
        p99 > 0.0 && p99 <= 10.0,
        "p99 {p99} s outside the histogram's buckets"
    );
    eprintln!("gate {gate} = {value}; plant-a-00 p99 = {p99} s");
    traffic.stop().await;
}
