//! The `drover` binary end to end: `serve` as a process (port 0, SIGTERM), and the CLI
//! as its API client: model publish/list/show, device enroll/show, exit codes.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn drover(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap()
}

fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn serve_process_and_cli_publish_list_show_with_trustworthy_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("print-default-config")
        .output()
        .unwrap();
    let text = String::from_utf8(cfg.stdout).unwrap();
    let parsed: drover_control_plane::config::ServeConfig = toml::from_str(&text).unwrap();
    assert_eq!(parsed, Default::default());

    let mut server = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("drover serve: api http://127.0.0.1:"),
        "{line}"
    );

    let model = dir.path().join("model.onnx");
    std::fs::write(&model, common::dense_model(6, 3, 11, "MatMul")).unwrap();
    let csv = dir.path().join("baseline.csv");
    std::fs::write(&csv, common::baseline_csv(6, 120)).unwrap();
    let m = ok(&drover(
        &data,
        &[
            "model",
            "publish",
            model.to_str().unwrap(),
            "--name",
            "anomaly",
            "--version",
            "2.1.0",
            "--baseline",
            csv.to_str().unwrap(),
            "--metric",
            "f1=0.93",
            "--output",
            "json",
        ],
    ));
    assert_eq!(m["summary"]["baseline"]["rows"], 120);
    assert_eq!(m["summary"]["lineage"]["metrics"]["f1"], 0.93);
    let list = ok(&drover(&data, &["model", "list", "--output", "json"]));
    assert_eq!(list[0]["name"], "anomaly");
    let show = ok(&drover(
        &data,
        &["model", "show", "anomaly@2.1.0", "--output", "json"],
    ));
    assert_eq!(show["digest"], m["digest"]);

    // Exit codes: 3 not found, 4 already exists, 6 refused (bad input).
    assert_eq!(
        drover(&data, &["device", "show", "nope"]).status.code(),
        Some(3)
    );
    assert_eq!(
        drover(&data, &["model", "show", "nope@1.0.0"])
            .status
            .code(),
        Some(3)
    );
    let out = dir.path().join("a.toml");
    let enroll = ["device", "enroll", "edge-1", "--out", out.to_str().unwrap()];
    ok(&drover(&data, &enroll));
    assert_eq!(drover(&data, &enroll).status.code(), Some(4));
    let bad = drover(
        &data,
        &["device", "enroll", "bad/id", "--out", out.to_str().unwrap()],
    );
    assert_eq!(bad.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("device id contains '/'"));
    let again = drover(
        &data,
        &[
            "model",
            "publish",
            model.to_str().unwrap(),
            "--name",
            "anomaly",
            "--version",
            "2.1.0",
        ],
    );
    assert_eq!(again.status.code(), Some(4));
    let shown = ok(&drover(
        &data,
        &["device", "show", "edge-1", "--output", "json"],
    ));
    assert_eq!(shown["online"], false);
    // No server at all: 5, with advice.
    let gone = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args([
            "device",
            "list",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is `drover serve` running?"));

    // SIGTERM: graceful shutdown, exit 0.
    let st = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(server.wait().unwrap().success());
}
