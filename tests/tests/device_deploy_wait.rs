//! `drover device deploy --wait`, by running the binary against a real control plane and a
//! real agent (issue 18): the phases of a deploy as the device reports them, exit 0 when
//! healthy (or already active), and an offline device said to be queued until its command
//! expires (exit 22 at `--timeout`); then `device label`, `device history` (commands,
//! reported phases, audited changes in one timeline) and `device telemetry`.

use std::process::{Command, Output};
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::{enroll, fixture, publish, Api};
use drover_tests::{wait_until, workspace_bin};

const WAIT: Duration = Duration::from_secs(120);

fn drover(api: &Api, args: &[&str]) -> Output {
    Command::new(workspace_bin("drover").unwrap())
        .args(args)
        .args(api.cli_args())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_follows_phases_to_an_exit_code_and_history_tells_the_story() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let api = Api::new(format!("http://{}", server.http_addr()), server.api_token());
    let mut gw = enroll(&api, dir, "gw-1", &[("site", "a")]).await.unwrap();
    gw.start().await.unwrap();
    enroll(&api, dir, "gw-off", &[("site", "a")]).await.unwrap();
    wait_until("gw-1 online", WAIT, || async {
        let d = api.get("/v1/devices/gw-1").await.ok()?;
        (d["online"] == true).then_some(())
    })
    .await
    .unwrap();
    publish(&api, &fixture("dense_v1.onnx"), "dense", "1.0.0").unwrap();

    let o = drover(
        &api,
        &[
            "device",
            "deploy",
            "gw-1",
            "--model",
            "dense@1.0.0",
            "--wait",
        ],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let at = |phase: &str| out.find(&format!("  {phase} ")).unwrap_or(usize::MAX);
    for phase in ["downloading", "verified", "active", "healthy"] {
        assert!(at(phase) < usize::MAX, "{phase} missing: {out}");
    }
    assert!(
        at("downloading") < at("verified") && at("active") < at("healthy"),
        "{out}"
    );
    assert!(out.contains("gw-1: dense@1.0.0 healthy"), "{out}");

    // The same model again: the agent answers "already active", which is where we want it.
    let o = drover(
        &api,
        &[
            "device",
            "deploy",
            "gw-1",
            "--model",
            "dense@1.0.0",
            "--wait",
        ],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("healthy") && out.contains("already active"),
        "{out}"
    );

    // An offline device: said once, with the command's expiry; --timeout ends the wait.
    let o = drover(
        &api,
        &[
            "device",
            "deploy",
            "gw-off",
            "--model",
            "dense@1.0.0",
            "--wait",
            "--timeout",
            "1",
        ],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(22), "{out}");
    assert_eq!(out.matches("offline: queued until ").count(), 1, "{out}");
    assert!(out.contains("still queued after --timeout 1s"), "{out}");

    // Bad input says what to do.
    let o = drover(
        &api,
        &["device", "deploy", "gw-1", "--model", "dense", "--wait"],
    );
    let out = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("must look like NAME@X.Y.Z"), "{out}");

    // `device label` through the binary, then the device's history and telemetry.
    let o = drover(
        &api,
        &[
            "device", "label", "gw-1", "site=b", "--remove", "nothing", "--by", "alice",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = drover(&api, &["device", "label", "gw-1", "agent.site=b"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(text(&o).contains("are the agent's own"), "{}", text(&o));
    let o = drover(&api, &["device", "history", "gw-1"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    for line in [
        "enrolled",
        "command 1 deploy",
        "command 1 healthy",
        "command 2 healthy: already active",
        "labels {site=a} -> {site=b} (by alice)",
    ] {
        assert!(out.contains(line), "{line} missing: {out}");
    }
    assert!(
        out.find("command 1 deploy") < out.find("command 1 downloading"),
        "{out}"
    );
    wait_until("a telemetry window from gw-1", WAIT, || async {
        let o = drover(&api, &["device", "telemetry", "gw-1", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (!v.as_array()?.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let o = drover(&api, &["device", "telemetry", "gw-1"]);
    assert!(text(&o).contains("INFERENCES"), "{}", text(&o));
    let o = drover(&api, &["device", "history", "gw-404"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    gw.stop().await.unwrap();
}
