//! Drift to a registered candidate, end to end on the embedded default: `drover serve`,
//! two real agents at two sites over real MQTT, live inference and feedback through the
//! agents' local API. One site's feature stream shifts; drift is flagged for that site
//! only; sustained drift triggers a job that trains (the built-in trainer, run as the
//! `drover` binary by the local executor) on fleet samples and labels; the control plane
//! scores candidate and champion on the same held-out rows; the candidate is signed and
//! registered and rolled out by the policy to the drifting site, where its accuracy
//! recovers; once that rollout completed, the site's first window becomes the retrained
//! model's reference there and the site's drift level returns to ok (no cooldown needed
//! to stop a retrain storm) while the other site never alerts. A worse candidate is
//! refused with the reason recorded. Then the labels at the stable site change while its
//! inputs do not: its accuracy from labels drops and the `accuracy_drop` trigger starts
//! a job.
//!
//! The engine runs in the test on the server's own store and keys (the same code `drover
//! serve` ticks), so each drift window is the span of one phase of traffic, not a wall-clock
//! interval the test would have to sleep through.

use std::sync::Arc;
use std::time::Duration;

use drover_control_plane::config::ServeConfig;
use drover_control_plane::continuous::Engine;
use drover_control_plane::drift::Level;
use drover_control_plane::serve;
use drover_control_plane::store::{Db, JobOutcome, JobState, Store};
use drover_host::clock::now_ms;
use drover_tests::training::{features_csv, job_spec, labeled_csv, policy, toml_args, world, Rng};
use drover_tests::{cli_enroll, drover_cli, wait_until, workspace_bin};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);
const MODEL: &str = "shift";

/// Sends `rows` to an agent, one inference and one feedback label each; returns the
/// accuracy of the served predictions.
async fn traffic(http: &reqwest::Client, addr: &str, rows: &[(Vec<f32>, u32)]) -> f64 {
    let mut right = 0;
    for (x, y) in rows {
        let body =
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": x}]});
        let r: Value = http
            .post(format!("http://{addr}/v2/models/{MODEL}/infer"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let p: Vec<f64> = r["outputs"][0]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no outputs in {r}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let class = u32::from(p[1] > p[0]);
        right += u32::from(class == *y);
        let id = &r["parameters"]["drover_request_id"];
        let fb = http
            .post(format!("http://{addr}/v2/models/{MODEL}/feedback"))
            .json(&json!({"id": id, "label": y}))
            .send()
            .await
            .unwrap();
        assert!(
            fb.status().is_success(),
            "feedback refused: {}",
            fb.text().await.unwrap()
        );
    }
    f64::from(right) / rows.len() as f64
}

/// Waits until both devices have reported a telemetry window that closed after `after`:
/// the window holding the phase's last inference and label (its drift sketch, samples and
/// labels are sent before that telemetry) is then in.
async fn ingested(store: &Db, after: u64) {
    wait_until(
        "both devices' windows after the traffic stored",
        WAIT,
        || async {
            let s = store.lock_blocking();
            let done = |d: &str| {
                s.telemetry(d, 5)
                    .ok()
                    .is_some_and(|rows| rows.iter().any(|r| r.window_start_ms > after))
            };
            (done("gw-a") && done("gw-b")).then_some(())
        },
    )
    .await
    .unwrap();
}

/// The worst data-drift level of a scope (accuracy rows left out).
fn level(scores: &[drover_control_plane::drift::Score], scope: &str) -> Level {
    scores
        .iter()
        .filter(|s| s.scope == scope && s.accuracy.is_none())
        .map(|s| s.level)
        .max()
        .unwrap_or_else(|| panic!("no scores for {scope}"))
}

/// A scope's accuracy row (from labels) in one window.
fn accuracy(scores: &[drover_control_plane::drift::Score], scope: &str) -> (Level, f64, u64) {
    let s = scores
        .iter()
        .find(|s| s.scope == scope && s.accuracy.is_some())
        .unwrap_or_else(|| panic!("no accuracy row for {scope}: {scores:?}"));
    let a = s.accuracy.unwrap();
    (s.level, a.correct as f64 / s.count as f64, s.count)
}

/// Site a's inputs as before, but the truth moved: the label is now `x0 > 1`. Input
/// drift cannot see it; only the labels can.
fn relabelled(rng: &mut Rng) -> (Vec<f32>, u32) {
    let (x, _) = world(rng, false);
    let y = u32::from(x[0] > 1.0);
    (x, y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_at_one_site_retrains_gates_and_registers_a_better_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data_dir = dir.join("server");
    let config = ServeConfig {
        data_dir: data_dir.clone(),
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
    let cli = |args: &[&str]| drover_cli(&[args, &srv[..]].concat()).unwrap();

    // The champion: the built-in trainer (through the CLI) on data from before the shift,
    // published with its drift baseline.
    let mut rng = Rng::new(2026);
    let old: Vec<_> = (0..1500).map(|_| world(&mut rng, false)).collect();
    std::fs::write(dir.join("base.csv"), labeled_csv(&old)).unwrap();
    std::fs::write(dir.join("baseline.csv"), features_csv(&old)).unwrap();
    let out = dir.join("champion");
    drover_cli(&[
        "train",
        "builtin",
        "--data",
        dir.join("base.csv").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    cli(&[
        "model",
        "publish",
        out.join("model.onnx").to_str().unwrap(),
        "--name",
        MODEL,
        "--version",
        "1.0.0",
        "--baseline",
        dir.join("baseline.csv").to_str().unwrap(),
    ]);

    // Two sites, one agent each, sampling every input.
    let mut agents = Vec::new();
    let mut stops = Vec::new();
    for (id, site) in [("gw-a", "site=a"), ("gw-b", "site=b")] {
        let mut cfg = cli_enroll(&srv, dir, id, &[site], "127.0.0.1:0").unwrap();
        cfg.telemetry.sample_rate_ppm = 1_000_000;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        agents.push(
            drover_agent::run(cfg, async {
                let _ = rx.await;
            })
            .await
            .unwrap(),
        );
        stops.push(tx);
    }
    let addr_a = agents[0].api_addr().to_string();
    let addr_b = agents[1].api_addr().to_string();
    for id in ["gw-a", "gw-b"] {
        cli(&["device", "deploy", id, "--model", "shift@1.0.0"]);
    }
    let http = reqwest::Client::new();
    for addr in [&addr_a, &addr_b] {
        wait_until("champion served", WAIT, || async {
            let r = http
                .get(format!("http://{addr}/v2/models/{MODEL}/ready"))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await
        .unwrap();
    }

    // The engine on the server's store and keys, with the policy: site groups, two
    // consecutive alert windows trigger the built-in trainer on base + fleet data.
    let store =
        Db::new(Store::open(&data_dir.join(drover_control_plane::app::paths::DB_FILE)).unwrap());
    let keys = drover_control_plane::keys::load(&data_dir).unwrap();
    let drover = workspace_bin("drover").unwrap();
    let train = toml_args(&[
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    let pdir = dir.join("policy");
    std::fs::create_dir_all(&pdir).unwrap();
    // No cooldown: the reference windows recorded after the rollout, not a pause, keep
    // the retrained model from being retrained again.
    let rules = "[drift]\nwindow_secs = 3600\ngroup_by = [\"site\"]\n\
                 [triggers]\nsustained_windows = 2\naccuracy_drop_windows = 2\n\
                 [accuracy]\nmin_accuracy = 0.8\n\
                 [gate]\nmin_recent_improvement = 0.05\n\
                 [rollout]\nselector = \"site=b\"\n[rollout.gates]\non_no_data = \"pass\"\n[[rollout.waves]]\npercent = 100\nbake = \"0s\"\n";
    std::fs::write(pdir.join("policy.toml"), policy(MODEL, rules)).unwrap();
    std::fs::write(
        pdir.join("job.toml"),
        job_spec("local", &train, 300, Some(&dir.join("base.csv"))),
    )
    .unwrap();
    let mut engine = Engine::from_policy_file(
        store.clone(),
        data_dir.clone(),
        &keys.signing,
        &pdir.join("policy.toml"),
        1,
    )
    .unwrap();
    // Accepted candidates are rolled out by the policy's plan through the server's driver.
    engine.rollouts = Some(server.rollouts());
    let engine = Arc::new(engine);

    // Window 0: both sites as at training time. Nothing alerts, nothing triggers.
    let t0 = now_ms();
    let rows_a: Vec<_> = (0..250).map(|_| world(&mut rng, false)).collect();
    let rows_b: Vec<_> = (0..250).map(|_| world(&mut rng, false)).collect();
    traffic(&http, &addr_a, &rows_a).await;
    let acc_b_before_shift = traffic(&http, &addr_b, &rows_b).await;
    ingested(&store, now_ms()).await;
    let tick = engine.tick_window(t0, now_ms()).await.unwrap();
    assert_eq!(
        level(&tick.scores, "site=a"),
        Level::Ok,
        "{:?}",
        tick.scores
    );
    assert_eq!(
        level(&tick.scores, "site=b"),
        Level::Ok,
        "{:?}",
        tick.scores
    );
    assert!(tick.trigger.is_none());

    // Windows 1 and 2: site b's stream shifts. Flagged for site b (and its device) only;
    // the second consecutive alert window triggers training.
    let mut acc_b_shifted = 0.0;
    let mut job = None;
    for window in 1..=2 {
        let t = now_ms();
        let rows_a: Vec<_> = (0..300).map(|_| world(&mut rng, false)).collect();
        let rows_b: Vec<_> = (0..300).map(|_| world(&mut rng, true)).collect();
        traffic(&http, &addr_a, &rows_a).await;
        acc_b_shifted = traffic(&http, &addr_b, &rows_b).await;
        ingested(&store, now_ms()).await;
        let tick = engine.tick_window(t, now_ms()).await.unwrap();
        let psi = |scope: &str| {
            tick.scores
                .iter()
                .filter(|s| s.scope == scope)
                .filter_map(|s| s.psi)
                .fold(0.0, f64::max)
        };
        eprintln!(
            "window {window}: max PSI site=a {:.3}, site=b {:.3}, fleet {:.3}",
            psi("site=a"),
            psi("site=b"),
            psi("fleet")
        );
        assert_eq!(
            level(&tick.scores, "site=b"),
            Level::Alert,
            "window {window}"
        );
        assert_eq!(
            level(&tick.scores, "device:gw-b"),
            Level::Alert,
            "window {window}"
        );
        assert_ne!(
            level(&tick.scores, "site=a"),
            Level::Alert,
            "window {window}"
        );
        assert_ne!(
            level(&tick.scores, "device:gw-a"),
            Level::Alert,
            "window {window}"
        );
        if window == 1 {
            assert!(
                tick.trigger.is_none(),
                "one alert window is not sustained drift"
            );
        } else {
            let trigger = tick
                .trigger
                .clone()
                .expect("sustained drift triggers training");
            assert!(
                ["drift:device:gw-b", "drift:site=b", "drift:fleet"].contains(&trigger.as_str()),
                "{trigger}"
            );
            job = tick.job;
        }
    }
    assert!(
        acc_b_shifted < acc_b_before_shift - 0.2,
        "the champion is wrong at the shifted site: {acc_b_shifted} vs {acc_b_before_shift}"
    );

    // The job trains on base + fleet data; the gate accepts; the candidate is registered.
    let job = job.unwrap().await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.detail);
    assert_eq!(job.outcome, Some(JobOutcome::Accepted), "{:?}", job.detail);
    assert_eq!(job.candidate_model.as_deref(), Some("shift@1.0.1"));
    assert_eq!(job.parent_model.as_deref(), Some("shift@1.0.0"));
    let metrics: Value = serde_json::from_str(job.metrics.as_deref().unwrap()).unwrap();
    let (cand, champ) = (&metrics["candidate"], &metrics["champion"]);
    assert!(
        cand["accuracy"].as_f64() >= champ["accuracy"].as_f64()
            && cand["recent_accuracy"].as_f64().unwrap()
                > champ["recent_accuracy"].as_f64().unwrap() + 0.05,
        "{metrics}"
    );
    let plan: Value = serde_json::from_str(job.rollout_plan.as_deref().unwrap()).unwrap();
    assert_eq!(plan["selector"], "site=b");
    assert!(
        job.detail
            .as_deref()
            .is_some_and(|d| d.contains("rolled out by policy")),
        "{:?}",
        job.detail
    );

    // What the operator sees, through the CLI and the server's API.
    let status: Value = serde_json::from_str(&cli(&[
        "drift", "status", "--level", "alert", "--output", "json",
    ]))
    .unwrap();
    let alerting: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap())
        .collect();
    assert!(
        alerting.contains(&"site=b") && !alerting.contains(&"site=a"),
        "{alerting:?}"
    );
    let history: Value = serde_json::from_str(&cli(&[
        "drift", "history", "--scope", "site=b", "--output", "json",
    ]))
    .unwrap();
    let windows: std::collections::BTreeSet<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["window_end_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(windows.len(), 3, "three windows of history for site b");
    let shown: Value = serde_json::from_str(&cli(&[
        "train",
        "show",
        &job.id.to_string(),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["outcome"], "accepted");
    let model: Value =
        serde_json::from_str(&cli(&["model", "show", "shift@1.0.1", "--output", "json"])).unwrap();
    assert_eq!(
        model["summary"]["lineage"]["parent"], "shift@1.0.0",
        "{model}"
    );
    assert_eq!(
        model["summary"]["lineage"]["training_job"],
        format!("job-{}", job.id)
    );

    // Rolled out by policy to the drifting site only (a staged rollout the server drives);
    // its accuracy there recovers.
    let rollouts: Value =
        serde_json::from_str(&cli(&["rollout", "list", "--output", "json"])).unwrap();
    let by_policy = rollouts
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "shift@1.0.1")
        .expect("a rollout of the accepted candidate");
    assert_eq!(by_policy["selector"], "site=b");
    wait_until("gw-b serves shift@1.0.1", WAIT, || async {
        let v: Value = http
            .get(format!("http://{addr_b}/v2/models/{MODEL}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["versions"]
            .as_array()?
            .iter()
            .any(|x| x == "1.0.1")
            .then_some(())
    })
    .await
    .unwrap();
    // The policy's rollout completes healthy: from the next window on, each site's first
    // window with the retrained model becomes its reference.
    wait_until("the policy's rollout completes", WAIT, || async {
        let v: Value = serde_json::from_str(&cli(&["rollout", "list", "--output", "json"])).ok()?;
        v.as_array()?
            .iter()
            .any(|r| r["model"] == "shift@1.0.1" && r["status"] == "completed")
            .then_some(())
    })
    .await
    .unwrap();
    // Site b still differs from the retrained model's baseline (it mixes both worlds).
    // Window 1 after the rollout is scored against that baseline and recorded as site b's
    // reference; from window 2 site b is judged against its own reference: ok. Site a
    // never alerts, and nothing is retrained again (no cooldown in this policy).
    let mut acc_b_after = 0.0;
    let mut after = Vec::new();
    for window in 1..=2 {
        let t = now_ms();
        let rows: Vec<_> = (0..300).map(|_| world(&mut rng, true)).collect();
        acc_b_after = traffic(&http, &addr_b, &rows).await;
        let rows: Vec<_> = (0..200).map(|_| world(&mut rng, false)).collect();
        traffic(&http, &addr_a, &rows).await;
        ingested(&store, now_ms()).await;
        let tick = engine.tick_window(t, now_ms()).await.unwrap();
        eprintln!(
            "after rollout, window {window}: site=b {:?}, site=a {:?}",
            level(&tick.scores, "site=b"),
            level(&tick.scores, "site=a")
        );
        assert_ne!(
            level(&tick.scores, "site=a"),
            Level::Alert,
            "window {window}"
        );
        assert!(
            tick.trigger.is_none(),
            "window {window}: {:?}",
            tick.trigger
        );
        after.push((level(&tick.scores, "site=b"), tick.scores));
    }
    eprintln!(
        "site b accuracy: before shift {acc_b_before_shift:.3}, shifted {acc_b_shifted:.3}, \
         after retraining {acc_b_after:.3}; gate metrics {metrics}"
    );
    assert!(
        acc_b_after > 0.9 && acc_b_after > acc_b_shifted + 0.2,
        "site b recovers: {acc_b_shifted} -> {acc_b_after}"
    );
    let (last, scores) = after.last().unwrap();
    assert_eq!(
        *last,
        Level::Ok,
        "site b clears within two windows: {scores:?}"
    );
    assert_eq!(level(scores, "device:gw-b"), Level::Ok);
    let (acc_level, acc, n) = accuracy(scores, "site=b");
    assert!(
        acc_level == Level::Ok && acc > 0.9 && n >= 250,
        "{acc_level:?} {acc} {n}"
    );
    let refs = store.lock_blocking().drift_references().unwrap();
    assert_eq!(
        refs.iter().map(|r| r.scope.as_str()).collect::<Vec<_>>(),
        ["site=b"],
        "only site b runs the rolled-out model"
    );
    // The window-by-window history the operator sees: alert while drifting, ok after.
    let history: Value = serde_json::from_str(&cli(&[
        "drift", "history", "--scope", "site=b", "--output", "json",
    ]))
    .unwrap();
    let newest = history
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["window_end_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    let newest_levels: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["window_end_ms"] == newest)
        .map(|s| s["level"].as_str().unwrap())
        .collect();
    assert!(
        !newest_levels.is_empty() && newest_levels.iter().all(|l| *l == "ok"),
        "{newest_levels:?}"
    );
    let gw_a: Value =
        serde_json::from_str(&cli(&["device", "show", "gw-a", "--output", "json"])).unwrap();
    assert_eq!(
        gw_a["active_model"], "shift@1.0.0",
        "the policy's selector kept the stable site on the champion"
    );

    // A worse candidate (an untrained model) is refused, and the job says why.
    let bad = toml_args(&[
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--epochs",
        "0",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    let bdir = dir.join("bad-policy");
    std::fs::create_dir_all(&bdir).unwrap();
    std::fs::write(bdir.join("policy.toml"), policy(MODEL, "")).unwrap();
    std::fs::write(
        bdir.join("job.toml"),
        job_spec("local", &bad, 300, Some(&dir.join("base.csv"))),
    )
    .unwrap();
    let worse = Arc::new(
        Engine::from_policy_file(
            store.clone(),
            data_dir.clone(),
            &keys.signing,
            &bdir.join("policy.toml"),
            1,
        )
        .unwrap(),
    );
    let refused = worse
        .run_job(worse.load_job_spec().unwrap(), "manual", now_ms())
        .await
        .unwrap();
    assert_eq!(refused.state, JobState::Succeeded);
    assert_eq!(refused.outcome, Some(JobOutcome::Refused));
    assert_eq!(refused.parent_model.as_deref(), Some("shift@1.0.1"));
    let reason = refused.detail.unwrap_or_default();
    assert!(reason.contains("worse than the champion's"), "{reason}");
    let versions: Vec<String> = store
        .lock_blocking()
        .models()
        .unwrap()
        .into_iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, ["1.0.0", "1.0.1"], "nothing new was published");

    // Concept drift: at site a the inputs stay as they were but the truth moves (the label
    // is now x0 > 1). Input drift stays quiet there; accuracy from the labels drops below
    // the policy's 0.8 with 95 % confidence, and two such windows start a job through the
    // accuracy trigger.
    let mut acc_job = None;
    for window in 1..=2 {
        let t = now_ms();
        let rows: Vec<_> = (0..250).map(|_| relabelled(&mut rng)).collect();
        let served = traffic(&http, &addr_a, &rows).await;
        let rows: Vec<_> = (0..100).map(|_| world(&mut rng, true)).collect();
        traffic(&http, &addr_b, &rows).await;
        ingested(&store, now_ms()).await;
        let tick = engine.tick_window(t, now_ms()).await.unwrap();
        let (acc_level, acc, n) = accuracy(&tick.scores, "site=a");
        eprintln!(
            "label shift, window {window}: site a served {served:.3}, scored {acc:.3} on {n} \
             labels ({acc_level:?}), input drift {:?}",
            level(&tick.scores, "site=a")
        );
        assert_eq!(acc_level, Level::Alert, "window {window}");
        assert!(n >= 200, "{n} labelled predictions");
        assert_ne!(
            level(&tick.scores, "site=a"),
            Level::Alert,
            "inputs did not drift"
        );
        assert_eq!(accuracy(&tick.scores, "site=b").0, Level::Ok);
        if window == 1 {
            assert!(tick.trigger.is_none(), "{:?}", tick.trigger);
        } else {
            assert_eq!(tick.trigger.as_deref(), Some("accuracy_drop:site=a"));
            acc_job = tick.job;
        }
    }
    let acc_job = acc_job.unwrap().await.unwrap().unwrap();
    assert_eq!(acc_job.trigger, "accuracy_drop:site=a");
    assert_eq!(acc_job.state, JobState::Succeeded, "{:?}", acc_job.detail);

    for s in stops {
        let _ = s.send(());
    }
    for a in agents {
        a.wait().await.unwrap();
    }
    server.shutdown().await;
}

/// `drover serve` with a `[continuous]` policy: `drover train run --wait` starts the
/// policy's job through the API, and the CLI shows the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drover_train_run_through_serve_with_a_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(5);
    let old: Vec<_> = (0..800).map(|_| world(&mut rng, false)).collect();
    std::fs::write(dir.join("base.csv"), labeled_csv(&old)).unwrap();
    std::fs::write(dir.join("baseline.csv"), features_csv(&old)).unwrap();
    let drover = workspace_bin("drover").unwrap();
    let train = toml_args(&[
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    std::fs::write(
        dir.join("policy.toml"),
        policy(MODEL, "[gate]\nmin_recent_improvement = 0.0\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("job.toml"),
        job_spec("local", &train, 300, Some(&dir.join("base.csv"))),
    )
    .unwrap();
    let mut config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    config.continuous.policy = dir.join("policy.toml").display().to_string();
    config.continuous.tick_secs = 3600;
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cli = |args: &[&str]| drover_cli(&[args, &srv[..]].concat());

    // An untrained champion, so the job's candidate must beat it.
    let champ = dir.join("champion");
    drover_cli(&[
        "train",
        "builtin",
        "--epochs",
        "0",
        "--data",
        dir.join("base.csv").to_str().unwrap(),
        "--out",
        champ.to_str().unwrap(),
    ])
    .unwrap();
    cli(&[
        "model",
        "publish",
        champ.join("model.onnx").to_str().unwrap(),
        "--name",
        MODEL,
        "--version",
        "2.0.0",
        "--baseline",
        dir.join("baseline.csv").to_str().unwrap(),
    ])
    .unwrap();

    let job: Value =
        serde_json::from_str(&cli(&["train", "run", "--wait", "--output", "json"]).unwrap())
            .unwrap();
    assert_eq!(job["trigger"], "manual");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["outcome"], "accepted", "{job}");
    assert_eq!(job["candidate_model"], "shift@2.0.1");
    let jobs: Value =
        serde_json::from_str(&cli(&["train", "jobs", "--output", "json"]).unwrap()).unwrap();
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
    let e = cli(&["train", "cancel", "999"])
        .err()
        .map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.contains("training job 999 is not running")));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_with_a_policy_that_does_not_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("policy.toml"),
        "version = 1\nmodel = \"m\"\njob = \"j.toml\"\n[drift]\npsi_warn = 0.5\npsi_alert = 0.2\n",
    )
    .unwrap();
    let mut config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    config.continuous.policy = dir.join("policy.toml").display().to_string();
    let e = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("continuous training: policy") && e.contains("psi_warn = 0.5"),
        "{e}"
    );
}

/// The first model of a policy passes a gate with no champion to beat: it is signed and
/// registered, but the policy's rollout does not ship it by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policys_first_model_is_registered_but_not_rolled_out_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng::new(11);
    let old: Vec<_> = (0..600).map(|_| world(&mut rng, false)).collect();
    std::fs::write(dir.join("base.csv"), labeled_csv(&old)).unwrap();
    let drover = workspace_bin("drover").unwrap();
    let train = toml_args(&[
        drover.to_str().unwrap(),
        "train",
        "builtin",
        "--data",
        "{dataset}",
        "--out",
        "{out}",
    ]);
    let rules = "[rollout]\nselector = \"all\"\n[rollout.gates]\non_no_data = \"pass\"\n[[rollout.waves]]\npercent = 100\nbake = \"0s\"\n";
    std::fs::write(dir.join("policy.toml"), policy(MODEL, rules)).unwrap();
    std::fs::write(
        dir.join("job.toml"),
        job_spec("local", &train, 300, Some(&dir.join("base.csv"))),
    )
    .unwrap();
    let mut config = ServeConfig {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    config.continuous.policy = dir.join("policy.toml").display().to_string();
    config.continuous.tick_secs = 3600;
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let url = format!("http://{}", server.http_addr());
    let token = server.api_token().to_string();
    let srv: Vec<&str> = vec!["--server", &url, "--token", &token];
    let cli = |args: &[&str]| drover_cli(&[args, &srv[..]].concat());

    // A live key rotation: the running engine signs with the new key, not the one it
    // started with (which retires now).
    let data = dir.join("server");
    cli(&[
        "keys",
        "rotate",
        "--data-dir",
        data.to_str().unwrap(),
        "--grace-days",
        "0",
    ])
    .unwrap();
    let ring: Value = serde_json::from_str(
        &drover_cli(&[
            "keys",
            "show",
            "--data-dir",
            data.to_str().unwrap(),
            "--output",
            "json",
        ])
        .unwrap(),
    )
    .unwrap();
    let current = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["current"] == true)
        .map(|k| k["key_id"].as_str().unwrap().to_owned())
        .unwrap();

    let job: Value =
        serde_json::from_str(&cli(&["train", "run", "--wait", "--output", "json"]).unwrap())
            .unwrap();
    assert_eq!(job["outcome"], "accepted", "{job}");
    assert_eq!(job["candidate_model"], "shift@1.0.0");
    let model: Value =
        serde_json::from_str(&cli(&["model", "show", "shift@1.0.0", "--output", "json"]).unwrap())
            .unwrap();
    assert_eq!(model["key_id"], current.as_str(), "{model}");
    assert!(
        job["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not rolled out by policy")),
        "{job}"
    );
    let rollouts: Value =
        serde_json::from_str(&cli(&["rollout", "list", "--output", "json"]).unwrap()).unwrap();
    assert_eq!(rollouts.as_array().map(Vec::len), Some(0), "{rollouts}");
    server.shutdown().await;
}
