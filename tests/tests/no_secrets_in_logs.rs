//! No secret reaches a log line at any level: every log of the in-process control plane
//! (embedded broker, TLS front, ingest, API), an in-process agent and the `drover` CLI
//! runs, captured at TRACE for every crate across enroll, mutual-TLS connect, deploy and
//! key rotation, is searched for each secret the run handled (API token, device key,
//! MQTT password, TLS private keys, signing/root/CA key material).
//!
//! Its own test binary: the tracing subscriber is process-global.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_protocol::DeviceKey;
use drover_tests::{cli_devices, cli_enroll, wait_until, workspace_bin};

const WAIT: Duration = Duration::from_secs(90);

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the CLI with TRACE logging; its stdout and stderr join the captured logs.
fn cli(logs: &Captured, args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_bin("drover").unwrap())
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let mut l = logs.clone();
    l.write_all(&out.stdout).unwrap();
    l.write_all(&out.stderr).unwrap();
    assert!(
        out.status.success(),
        "drover {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The base64 body lines of every PEM private key in a file (what a leak would show).
fn pem_key_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_appears_in_trace_logs_across_enroll_connect_deploy_and_rotate() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("server");
    let config = ServeConfig {
        data_dir: data.clone(),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];

    let cfg = cli_enroll(&srv, dir, "gw-log", &[], "127.0.0.1:0").unwrap();
    let tls = cfg.tls.clone().unwrap();
    let agent = drover_agent::run(cfg.clone(), std::future::pending())
        .await
        .unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fixtures/dense_v1.onnx");
    for (version, rotate_first) in [("1.0.0", false), ("2.0.0", true)] {
        if rotate_first {
            let out = cli(
                &logs,
                &[
                    &["keys", "rotate", "--data-dir", data.to_str().unwrap()][..],
                    &srv,
                ]
                .concat(),
            );
            assert!(
                out.contains("running server signs with the new key"),
                "{out}"
            );
        }
        cli(
            &logs,
            &[
                &[
                    "model",
                    "publish",
                    model.to_str().unwrap(),
                    "--name",
                    "dense",
                    "--version",
                    version,
                ][..],
                &srv,
            ]
            .concat(),
        );
        let m = format!("dense@{version}");
        cli(
            &logs,
            &[&["device", "deploy", "gw-log", "--model", &m][..], &srv].concat(),
        );
        wait_until("the deploy lands over mutual TLS", WAIT, || async {
            cli_devices(&srv)
                .iter()
                .any(|d| {
                    d["active_model"]
                        .as_str()
                        .is_some_and(|a| a.contains(version))
                })
                .then_some(())
        })
        .await
        .unwrap();
    }
    cli(&logs, &[&["device", "show", "gw-log"][..], &srv].concat());
    server.shutdown().await;
    drop(agent);

    // Every secret this run handled.
    let device_key = cfg.device_key.clone();
    let key = DeviceKey(drover_protocol::topics::parse_hex32(&device_key).unwrap());
    let mut secrets = vec![
        ("API token", token.clone()),
        ("device key", device_key.to_lowercase()),
        ("device key", device_key.to_uppercase()),
        ("MQTT password", key.mqtt_password()),
        ("a PEM private key", "PRIVATE KEY".to_string()),
    ];
    for line in pem_key_lines(tls.client_key_file.as_ref().unwrap()) {
        secrets.push(("device TLS key", line));
    }
    let keys = data.join("keys");
    // The root key a first start wrote to be moved offline, and every key under keys/.
    let root = data.join(drover_control_plane::keys::ROOT_PENDING_FILE);
    let files = std::fs::read_dir(&keys).unwrap().map(|e| e.unwrap().path());
    for p in files.chain(std::iter::once(root)) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".key") {
            let text = std::fs::read_to_string(&p).unwrap();
            if text.contains("PRIVATE KEY") {
                for line in pem_key_lines(&p) {
                    secrets.push(("server TLS/CA key", line));
                }
            } else {
                // ed25519 seeds (root, signing keys), as hex.
                secrets.push(("signing/root key seed", text.trim().to_string()));
            }
        }
    }
    assert!(
        secrets.len() >= 10,
        "expected root, signing and CA keys: {}",
        secrets.len()
    );
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    // The capture is real: TRACE lines from the server, the agent, the TLS stack and the CLI.
    assert!(text.contains("TRACE"), "no TRACE lines captured");
    assert!(text.contains("device enrolled"), "server logs missing");
    assert!(text.contains("keys reloaded"), "rotation logs missing");
    assert!(text.contains("connected to broker"), "agent logs missing");
    for (what, secret) in &secrets {
        assert!(!secret.is_empty());
        if let Some(at) = text.find(secret.as_str()) {
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!("{what} appears in the logs: {}", &text[start..end]);
        }
    }
    eprintln!(
        "searched {} bytes of logs for {} secrets",
        text.len(),
        secrets.len()
    );
}
