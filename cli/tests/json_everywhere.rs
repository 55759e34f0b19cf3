//! `--output json` on every `drover` command (issue 19): the test walks clap's command tree
//! and runs every leaf with `--output json`, against a running server or offline, parsing
//! stdout as JSON (one document, or JSON lines for the commands that follow something).
//! The server's API is HTTPS, so every client command also proves it trusts the fleet CA.
//! A leaf is either run here or listed in [`NO_JSON`] with the reason, and both lists
//! must match the tree exactly: a new subcommand without JSON, or without a case here,
//! fails this test.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use clap::CommandFactory as _;
use drover_cli::Cli;
use drover_control_plane::serve::ServeHandle;
use drover_protocol::messages::{Downlink, Phase, Progress, Uplink};
use drover_protocol::trust::TrustStore;
use serde_json::Value;

/// Leaves that print no JSON, and why. Checked to be exactly the leaves not run below.
const NO_JSON: &[(&str, &str)] = &[
    (
        "serve",
        "a long-running server: what it prints is its log, JSON with --log-format json",
    ),
    (
        "demo",
        "a narrated tour of the whole system for a person at a terminal",
    ),
];

/// Every leaf of the command tree, as `"device enroll"`.
fn leaves(cmd: &clap::Command, prefix: &str, out: &mut BTreeSet<String>) {
    let subs: Vec<&clap::Command> = cmd.get_subcommands().collect();
    if subs.is_empty() {
        out.insert(prefix.trim().to_owned());
    }
    for s in subs {
        leaves(s, &format!("{prefix} {}", s.get_name()), out);
    }
}

fn find<'a>(cmd: &'a clap::Command, path: &str) -> &'a clap::Command {
    path.split(' ')
        .fold(cmd, |c, name| c.find_subcommand(name).unwrap())
}

/// How a command's stdout must parse.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One JSON document.
    One,
    /// One JSON object per line (`rollout watch`, `device deploy --wait`).
    Lines,
}

struct Walk {
    leaves: BTreeSet<String>,
    ran: BTreeSet<String>,
    data: std::path::PathBuf,
}

impl Walk {
    /// Runs `drover LEAF ARGS --output json` with the server's data dir in the
    /// environment, so the CLI finds its URL and token.
    async fn exec(&mut self, leaf: &str, args: &[&str]) -> std::process::Output {
        assert!(self.leaves.contains(leaf), "{leaf:?} is not a leaf");
        self.ran.insert(leaf.to_owned());
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_drover"));
        c.args(leaf.split(' '))
            .args(args)
            .args(["--output", "json"])
            .env_remove("DROVER_SERVER")
            .env_remove("DROVER_TOKEN")
            .env("DROVER_DATA_DIR", &self.data);
        tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap()
    }

    /// [`Walk::exec`], then checks the exit code and parses stdout.
    async fn run(&mut self, leaf: &str, args: &[&str], code: i32, shape: Shape) -> Value {
        let out = self.exec(leaf, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "drover {leaf} {args:?}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        parse(leaf, &out.stdout, shape)
    }
}

/// stdout as one JSON document, or as JSON lines (returned as an array).
fn parse(leaf: &str, stdout: &[u8], shape: Shape) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let one = |s: &str| {
        serde_json::from_str::<Value>(s).unwrap_or_else(|e| {
            panic!("drover {leaf} --output json printed no JSON ({e}):\n{text}")
        })
    };
    match shape {
        Shape::One => one(&text),
        Shape::Lines => {
            let lines: Vec<Value> = text.lines().map(one).collect();
            assert!(!lines.is_empty(), "drover {leaf}: no line");
            Value::Array(lines)
        }
    }
}

fn write_inputs(dir: &Path) {
    let mut labeled = String::from("x0,x1,label\n");
    let mut features = String::from("x0,x1\n");
    for i in 0..200 {
        let x0 = (i as f32 / 20.0) - 5.0;
        let x1 = ((i * 7) % 13) as f32 / 13.0;
        labeled += &format!("{x0},{x1},{}\n", u8::from(x0 > 0.0));
        features += &format!("{x0},{x1}\n");
    }
    std::fs::write(dir.join("train.csv"), labeled).unwrap();
    std::fs::write(dir.join("baseline.csv"), features).unwrap();
    // A policy whose job waits, so `train cancel` has a running job to cancel.
    std::fs::write(
        dir.join("policy.toml"),
        "version = 1\nmodel = \"clf\"\njob = \"job.toml\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("job.toml"),
        format!(
            "version = 1\nname = \"wait\"\nexecutor = \"local\"\ntimeout_secs = 600\n\
             command = [\"sh\", \"-c\", \"sleep 60\"]\n[dataset]\nbase = {:?}\n\
             fleet_since_hours = 24\nholdout_fraction = 0.3\n",
            dir.join("train.csv").display().to_string()
        ),
    )
    .unwrap();
}

/// The enrolled device of an agent config, connected, greeted, trusting the keyring.
async fn connect(server: &ServeHandle, config: &Path) -> (common::FakeDevice, TrustStore) {
    let text = std::fs::read_to_string(config).unwrap();
    let cfg = drover_agent::config::AgentConfig::from_toml(&text).unwrap();
    let v = cfg.validate().unwrap();
    let mut d = common::FakeDevice::connect(server.mqtt_addr(), v.device_id, v.device_key).await;
    // The current protocol, so commands that name a model slot may be sent to it.
    let mut hello = common::hello();
    if let Uplink::Hello(h) = &mut hello {
        h.protocol_max = drover_protocol::PROTOCOL_VERSION;
    }
    d.send(hello).await;
    let keyring = d
        .recv_downlink("Keyring", |f| match &f.msg {
            Downlink::Keyring(k) => Some(k.clone()),
            _ => None,
        })
        .await;
    let mut trust = TrustStore::new(v.root_public_key).unwrap();
    trust.accept_keyring(&keyring, common::now_ms()).unwrap();
    (d, trust)
}

/// Answers the next command the device receives with a `failed` report.
async fn fail_next_command((d, trust): &mut (common::FakeDevice, TrustStore)) {
    let blob = d
        .recv_downlink("Command", |f| match &f.msg {
            Downlink::Command(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    let cmd = trust
        .verify_command(&blob, &d.id, 0, common::now_ms())
        .unwrap();
    d.send(Uplink::Progress(Progress {
        command_seq: cmd.seq,
        command_digest: blob.digest(),
        model: None,
        phase: Phase::Failed,
        chunks_done: 0,
        chunks_total: 0,
        detail: Some("disk full".into()),
    }))
    .await;
}

#[test]
fn every_leaf_takes_output_json_or_is_a_listed_exception() {
    let cli = Cli::command();
    let mut all = BTreeSet::new();
    leaves(&cli, "", &mut all);
    for (leaf, why) in NO_JSON {
        assert!(
            all.contains(*leaf),
            "exception {leaf:?} ({why}) is no command"
        );
    }
    for leaf in all.iter().filter(|l| !NO_JSON.iter().any(|(n, _)| n == l)) {
        let cmd = find(&cli, leaf);
        let output = cmd.get_arguments().find(|a| a.get_id() == "output");
        let json = output.is_some_and(|a| {
            a.get_possible_values()
                .iter()
                .any(|v| v.get_name() == "json")
        });
        assert!(json, "`drover {leaf}` has no `--output json`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_json_that_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_inputs(dir);
    let data = dir.join("server");
    let mut all = BTreeSet::new();
    leaves(&Cli::command(), "", &mut all);
    let mut w = Walk {
        leaves: all,
        ran: BTreeSet::new(),
        data: data.clone(),
    };
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (train, baseline) = (s(&dir.join("train.csv")), s(&dir.join("baseline.csv")));

    // Offline commands.
    let trained = w
        .run(
            "train builtin",
            &["--data", &train, "--out", &s(&dir.join("m1"))],
            0,
            Shape::One,
        )
        .await;
    assert_eq!(trained["rows"], 200);
    let cfg = w.run("print-default-config", &[], 0, Shape::One).await;
    assert_eq!(cfg["version"], 1);
    let fresh = s(&dir.join("fresh"));
    let init = w
        .run(
            "keys init",
            &[
                "--data-dir",
                &fresh,
                "--root-key-out",
                &s(&dir.join("root.key")),
            ],
            0,
            Shape::One,
        )
        .await;
    assert_eq!(init["keyring"]["version"], 1);
    w.run(
        "broker config mosquitto",
        &[
            "--data-dir",
            &fresh,
            "--out",
            &s(&dir.join("mq")),
            "--host",
            "localhost",
        ],
        0,
        Shape::One,
    )
    .await;

    // Against a running server (its data dir tells the CLI its URL and token).
    let mut config = common::config(&data);
    config.continuous.policy = s(&dir.join("policy.toml"));
    // Every command below reaches the API over TLS, trusting the fleet CA of the data dir.
    config.api_tls = "on".into();
    let server =
        drover_control_plane::serve::run(config.validate().unwrap(), std::future::pending())
            .await
            .unwrap();
    w.run("keys show", &[], 0, Shape::One).await;
    let rotated = w.run("keys rotate", &[], 0, Shape::One).await;
    assert_eq!(rotated["server_reloaded"], true, "{rotated}");
    let model = s(&dir.join("m1").join("model.onnx"));
    let publish = [
        "--name",
        "clf",
        "--version",
        "1.0.0",
        "--baseline",
        &baseline,
    ];
    w.run(
        "model publish",
        &[&[model.as_str()][..], &publish].concat(),
        0,
        Shape::One,
    )
    .await;
    w.run("model list", &[], 0, Shape::One).await;
    w.run("model show", &["clf@1.0.0"], 0, Shape::One).await;
    for (id, site) in [("gw-1", "site=a"), ("gw-2", "site=b")] {
        let cfg = s(&dir.join(format!("{id}.toml")));
        let e = w
            .run(
                "device enroll",
                &[id, "--label", site, "--out", &cfg],
                0,
                Shape::One,
            )
            .await;
        assert_eq!(e["device"], id);
    }
    w.run("device list", &[], 0, Shape::One).await;
    w.run("device show", &["gw-2"], 0, Shape::One).await;
    w.run("device label", &["gw-2", "zone=x"], 0, Shape::One)
        .await;
    w.run("device telemetry", &["gw-2"], 0, Shape::One).await;
    w.run(
        "device deploy",
        &["gw-2", "--model", "clf@1.0.0"],
        0,
        Shape::One,
    )
    .await;
    // Following an offline device's deploy: JSON lines until --timeout (exit 22).
    let lines = w
        .run(
            "device deploy",
            &["gw-2", "--model", "clf@1.0.0", "--wait", "--timeout", "1"],
            22,
            Shape::Lines,
        )
        .await;
    assert_eq!(lines[0]["device"], "gw-2");
    w.run("device history", &["gw-2"], 0, Shape::One).await;

    // gw-1 online as a scripted device that fails its rollout command, so `rollout
    // retry` has a failed device to queue again.
    let mut gw1 = connect(&server, &dir.join("gw-1.toml")).await;
    let plan = ["--model", "clf@1.0.0", "--selector", "site=a"];
    w.run("rollout plan", &plan, 0, Shape::One).await;
    let started = w
        .run(
            "rollout start",
            &[&plan[..], &["--yes"]].concat(),
            0,
            Shape::One,
        )
        .await;
    let id = started["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{started}"));
    let id = id.to_string();
    w.run("rollout status", &[&id], 0, Shape::One).await;
    w.run("rollout list", &[], 0, Shape::One).await;
    w.run("rollout report", &[&id], 0, Shape::One).await;
    w.run("rollout pause", &[&id], 0, Shape::One).await;
    w.run("rollout resume", &[&id], 0, Shape::One).await;
    fail_next_command(&mut gw1).await;
    // A readiness wait on the rollout's view (through the CLI: the API is HTTPS here).
    let mut failed = false;
    for _ in 0..600 {
        let r = w.run("rollout status", &[&id], 0, Shape::One).await;
        if r["devices"]["failed"].as_u64() == Some(1) {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed, "the rollout's device never failed");
    w.run("rollout retry", &[&id], 0, Shape::One).await;
    w.run("rollout abort", &[&id], 0, Shape::One).await;
    // An aborted rollout: one JSON line, exit 12.
    w.run("rollout watch", &[&id], 12, Shape::Lines).await;
    // gw-1 negotiated protocol 2 (several models), so a model slot can be removed.
    let removed = w
        .run("device remove", &["gw-1", "--model", "clf"], 0, Shape::One)
        .await;
    assert_eq!(removed["model"], "clf");

    w.run("drift status", &[], 0, Shape::One).await;
    w.run("drift history", &[], 0, Shape::One).await;
    let job = w.run("train run", &[], 0, Shape::One).await;
    let job = job["job_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{job}"))
        .to_string();
    w.run("train jobs", &[], 0, Shape::One).await;
    w.run("train show", &[&job], 0, Shape::One).await;
    // The job is cancellable once its command runs: a readiness wait, not a timing check.
    let mut cancelled = None;
    for _ in 0..600 {
        let out = w.exec("train cancel", &[&job]).await;
        if out.status.success() {
            cancelled = Some(parse("train cancel", &out.stdout, Shape::One));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled = cancelled.expect("the training job never became cancellable");
    assert_eq!(cancelled["cancelling"].to_string(), job);

    w.run(
        "token create",
        &["alice", "--role", "viewer"],
        0,
        Shape::One,
    )
    .await;
    w.run("token list", &[], 0, Shape::One).await;
    w.run("token revoke", &["alice"], 0, Shape::One).await;
    let made = w
        .run(
            "integration create",
            &["nodered", "--out", &s(&dir.join("integration"))],
            0,
            Shape::One,
        )
        .await;
    assert!(made.is_object(), "{made}");
    w.run("integration list", &[], 0, Shape::One).await;
    w.run("integration revoke", &["nodered"], 0, Shape::One)
        .await;
    w.run("audit", &[], 0, Shape::One).await;
    w.run("device decommission", &["gw-2"], 0, Shape::One).await;
    let doctor = w
        .run("doctor", &["--data-dir", &fresh], 0, Shape::One)
        .await;
    assert_eq!(doctor["unsafe"], 0, "{doctor}");
    server.shutdown().await;

    let expected: BTreeSet<String> = w
        .leaves
        .iter()
        .filter(|l| !NO_JSON.iter().any(|(n, _)| n == l))
        .cloned()
        .collect();
    assert_eq!(
        w.ran, expected,
        "every leaf runs here with --output json or is in NO_JSON with its reason"
    );
}
