//! 20 agent SIGKILLs during deploys with reverts: a real `drover-agent` process, an
//! operator deploying dense 1.0.0, 2.0.0, back to 1.0.0 and so on through the `drover`
//! CLI, sometimes again while the agent is down (the revert that issue 24's fault 3 lost),
//! the agent SIGKILLed at a random moment of each deploy and restarted; the last round is
//! always fault 3's exact scenario (kill during the download of the other model, re-deploy
//! of the still-active one while the agent is down). At the end the
//! device runs the model of the newest command (the control plane's desired one), the
//! control plane sees it healthy, and the agent serves it: nothing wedged.

use std::path::PathBuf;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::{cli_enroll, free_port, wait_until};
use rand::{Rng, SeedableRng};

use crate::common::*;

const KILLS: usize = 20;
const DEVICE: &str = "kill-a";

/// Waits (generously) for the device to settle on `version` before the final round; a
/// device that does not get there fails the final assertion anyway, with the details.
/// A device still unsettled after the wait is reported (with the agent's log) on stderr.
async fn healthy_on_newest(srv: &[&str], version: &str, log: &std::path::Path) {
    let want = format!("dense@{version}");
    let settled = wait_until("the device settled", WAIT, || async {
        let d = device_view(srv, DEVICE);
        (d["active_model"] == want.as_str() && d["last_phase"] == "healthy").then_some(())
    })
    .await;
    if settled.is_err() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        eprintln!(
            "agent kills: not settled on {want} after {WAIT:?}: {}; agent log tail:\n{}",
            device_view(srv, DEVICE),
            &text[text.len().saturating_sub(6000)..]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agent_sigkills_during_deploys_and_reverts_end_on_the_newest_command() {
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
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let api_addr = format!("127.0.0.1:{}", free_port());
    cli_enroll(&srv, dir, DEVICE, &[], &api_addr).unwrap();
    let agent_config: PathBuf = dir.join(format!("{DEVICE}.toml"));
    let log = dir.join("agent.log");
    publish_dense(&srv);
    let mut agent = spawn_agent(&agent_config, &log);
    wait_until("the agent online", WAIT, || async {
        (device_view(&srv, DEVICE)["online"] == true).then_some(())
    })
    .await
    .unwrap();

    let seed = drover_host::clock::now_ms();
    eprintln!("agent kills: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let versions = ["1.0.0", "2.0.0"];
    let mut newest = "";
    let mut reverts_while_down = 0;
    for i in 0..KILLS {
        newest = versions[i % 2];
        deploy_dense(&srv, DEVICE, newest);
        // Anywhere in command, download, verify, self-test, activate or probation.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
        agent.kill().unwrap();
        agent.wait().unwrap();
        if rng.gen_bool(0.4) {
            // The operator reverts while the agent is down.
            newest = versions[(i + 1) % 2];
            deploy_dense(&srv, DEVICE, newest);
            reverts_while_down += 1;
        }
        agent = spawn_agent(&agent_config, &log);
    }

    // The last round is always fault 3's: the other model is commanded, the agent is
    // killed early in its download, the operator re-deploys the model that is still
    // active, and the agent comes back. The download in flight must not win.
    healthy_on_newest(&srv, newest, &log).await;
    let (active, other) = (
        newest,
        if newest == versions[0] {
            versions[1]
        } else {
            versions[0]
        },
    );
    deploy_dense(&srv, DEVICE, other);
    tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    deploy_dense(&srv, DEVICE, active);
    newest = active;
    agent = spawn_agent(&agent_config, &log);

    // Settled: healthy on the newest command with nothing staged. A restarted agent
    // reports its healthy boot model at once; a download of an older command still in
    // flight would activate afterwards (fault 3), so the state is checked again after
    // the agent has had ample time for that (a settle, not a time bound), below.
    let want = format!("dense@{newest}");
    let settled = wait_until(&format!("the device healthy on {want}"), WAIT, || async {
        let d = device_view(&srv, DEVICE);
        (d["active_model"] == want.as_str()
            && d["last_phase"] == "healthy"
            && d["staged_model"].is_null())
        .then_some(())
    })
    .await;
    let d = device_view(&srv, DEVICE);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        settled.is_ok(),
        "{KILLS} kills ({reverts_while_down} reverts while down): the device is {d} instead of \
         healthy on {want}; agent log tail: {}",
        &log_text[log_text.len().saturating_sub(3000)..]
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let served = wait_until("the agent serving", WAIT, || served_version(&api_addr)).await;
    let d = device_view(&srv, DEVICE);
    assert_eq!(
        (served.ok().as_deref(), d["active_model"].as_str()),
        (Some(newest), Some(want.as_str())),
        "after the last command ({want}) the agent serves another model (issue 24 fault 3: \
         an older command's download activated over the newer re-deploy); device {d}"
    );
    eprintln!(
        "agent kills: {KILLS} kills, {reverts_while_down} reverts while down, ends on {want}"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    server.shutdown().await;
}
