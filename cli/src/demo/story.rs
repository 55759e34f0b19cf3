//! The demo's story, one function per chapter. Each chapter prints its step, does its part
//! through the public API (or the agents and traffic the demo runs), records what it
//! measured in the report and marks the timeline.
//!
//! 1-2. [`Story::start`] (control plane), [`Story::enroll_fleet`].
//! 3-4. The first job and its operator rollout: [`Story::first_job`],
//!      [`Story::operator_rollout`].
//! 5-6. Drift: [`Story::live_traffic`] (normal operation scored), [`Story::retrofit`]
//!      (one site shifts until drift triggers a training job).
//! 7-8. Retraining and the policy's rollout: [`Story::retraining`],
//!      [`Story::policy_rollout`].
//! 9-10. [`Story::recovery`] (accuracy with the new model, the drift alert clearing),
//!      [`Story::telemetry`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use drover_control_plane::api::{
    DeviceView, EnrollRequest, EnrollResponse, RolloutView, TelemetryView,
};
use drover_control_plane::api::{JobView, RunResponse};
use drover_control_plane::config::ServeConfig;
use drover_control_plane::rollout::Plan;
use drover_control_plane::serve;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::drift::DriftLog;
use super::report::{pct, AccuracyRow, ModelRow, Report, TelemetryRow};
use super::traffic::{Ledger, Target, Traffic};
use super::watch::{
    accepted_model, bar, follow_rollout, rollout_row, step, version_of, wait_for, wait_job,
};
use super::{
    job_toml, policy_toml, world, DemoArgs, Running, COMPANION, MODEL, RECOVERY_REQUESTS, SHIFTED,
    SITES, WAIT, WINDOW_SECS,
};
use crate::client::{Client, ServerArgs};

/// The whole story; returns the API URL.
pub(super) async fn story(
    args: &DemoArgs,
    dir: &Path,
    running: &mut Running,
) -> anyhow::Result<String> {
    let start = Instant::now();
    let report = Report {
        devices: args.devices,
        seed: args.seed,
        shifted_site: SHIFTED.into(),
        ..Default::default()
    };
    println!(
        "Drover demo: {} edge gateways (one per pump) across {} plants, seed {}, in {}",
        args.devices,
        SITES.len(),
        args.seed,
        dir.display()
    );
    let mut s = Story::start(args, dir, running, report).await?;
    s.enroll_fleet().await?;
    let first = s.first_job().await?;
    s.operator_rollout(&first).await?;
    let (traffic, mut drift) = s.live_traffic(&first).await?;
    let job = s.retrofit(&traffic, &mut drift).await?;
    let (job, second) = s.retraining(job).await?;
    s.policy_rollout(&job, &second).await?;
    let recovered = s.recovery(traffic, &mut drift, &second).await?;
    s.telemetry(recovered).await?;
    drift.fill(&mut s.report, &s.site_of, &first.model);
    s.report.timeline = std::mem::take(&mut s.timeline);
    s.report.total_secs = start.elapsed().as_secs_f64();
    s.write_report()?;
    Ok(s.url)
}

/// What the chapters share.
struct Story<'a> {
    args: &'a DemoArgs,
    dir: &'a Path,
    running: &'a mut Running,
    client: Client,
    url: String,
    report: Report,
    /// What happened, with the seconds it took.
    timeline: Vec<(String, f64)>,
    /// Device id → site.
    site_of: BTreeMap<String, String>,
    /// When the policy's rollout of the retrained model completed.
    rollout_done: Option<Instant>,
}

/// What the traffic left when it stopped after the recovery.
struct Recovered {
    ledger: Ledger,
    failed: u64,
    last_error: Option<String>,
}

impl<'a> Story<'a> {
    fn mark(&mut self, what: &str, since: Instant) {
        self.timeline
            .push((what.into(), since.elapsed().as_secs_f64()));
    }

    /// 1. Control plane with the continuous-training policy.
    async fn start(
        args: &'a DemoArgs,
        dir: &'a Path,
        running: &'a mut Running,
        report: Report,
    ) -> anyhow::Result<Story<'a>> {
        step(1, "Starting the control plane: embedded MQTT broker (mutual TLS), SQLite, HTTP API, drift engine");
        let t = Instant::now();
        let mut rng = StdRng::seed_from_u64(args.seed);
        let pdir = dir.join("policy");
        std::fs::create_dir_all(&pdir)?;
        std::fs::write(pdir.join("history.csv"), world::history_csv(&mut rng, 2000))?;
        std::fs::write(pdir.join("policy.toml"), policy_toml())?;
        let drover =
            std::env::current_exe().context("locating the drover binary for training jobs")?;
        std::fs::write(pdir.join("job.toml"), job_toml(&drover))?;
        let mut config = ServeConfig {
            data_dir: dir.join("server"),
            http_listen: "127.0.0.1:0".into(),
            mqtt_listen: "127.0.0.1:0".into(),
            rollout_tick_ms: 500,
            ..Default::default()
        };
        config.continuous.policy = pdir.join("policy.toml").display().to_string();
        config.continuous.tick_secs = WINDOW_SECS;
        let server = running
            .server
            .insert(serve::run(config.validate()?, std::future::pending()).await?);
        let url = server.api_url();
        let client = Client::new(&ServerArgs {
            server: Some(url.clone()),
            token: Some(server.api_token().to_string()),
            data_dir: dir.join("server"),
            ca: None,
        })?;
        println!(
            "  HTTP API {url}, MQTT {}; policy {}",
            server.mqtt_addr(),
            pdir.join("policy.toml").display()
        );
        let mut s = Story {
            args,
            dir,
            running,
            client,
            url,
            report,
            timeline: Vec::new(),
            site_of: BTreeMap::new(),
            rollout_done: None,
        };
        s.mark("control plane up", t);
        Ok(s)
    }

    /// 2. Fleet.
    async fn enroll_fleet(&mut self) -> anyhow::Result<()> {
        step(
            2,
            "Enrolling the fleet and starting the agents (fleet CA certificates, per-device keys)",
        );
        let t = Instant::now();
        let pb = bar(self.args.devices, "devices online");
        let client = &self.client;
        for i in 0..self.args.devices {
            let site = SITES[i % SITES.len()];
            let id = format!("{site}-gw-{i:03}");
            let labels = BTreeMap::from([("site".to_string(), site.to_string())]);
            let r: EnrollResponse = client
                .post(
                    "/v1/devices",
                    &EnrollRequest {
                        id: id.clone(),
                        labels: labels.clone(),
                        ..Default::default()
                    },
                )
                .await?;
            let agent_dir = self.dir.join("agents").join(&id);
            std::fs::create_dir_all(&agent_dir)?;
            let mut cfg = crate::agent_files::write_agent_files(
                r,
                &agent_dir,
                None,
                agent_dir.clone(),
                labels,
            )?;
            cfg.api_addr = "127.0.0.1:0".into();
            cfg.metrics_addr = "127.0.0.1:0".into();
            cfg.telemetry.interval_ms = 500;
            // Half the readings (with their labels) go back as training samples.
            cfg.telemetry.sample_rate_ppm = 500_000;
            // These agents run inside `drover`: their isolated model checks run the
            // drover-agent installed beside it; without one the demo loads models
            // in-process, and says so (`runtime.isolate`, agent/README.md).
            if let Err(e) = drover_agent::isolate::Loader::resolve(&cfg.runtime, None) {
                tracing::info!(reason = %e, "demo agents load models in-process");
                cfg.runtime.isolate = false;
            }
            let agent = drover_agent::run(cfg, std::future::pending())
                .await
                .with_context(|| format!("starting agent {id}"))?;
            self.site_of.insert(id.clone(), site.to_string());
            *self.report.sites.entry(site.to_string()).or_default() += 1;
            self.running.agents.push((id, agent));
        }
        wait_for(
            &pb,
            || async {
                let l: Vec<DeviceView> = client.get("/v1/devices").await.ok()?;
                Some(l.iter().filter(|d| d.online).count())
            },
            self.args.devices,
        )
        .await?;
        self.mark("fleet online", t);
        Ok(())
    }

    /// 3. The first model: a training job on the plant's history.
    async fn first_job(&mut self) -> anyhow::Result<ModelRow> {
        step(3, "Training the first failure predictor: a job on the local executor runs the built-in Rust trainer");
        let t = Instant::now();
        let started: RunResponse = self
            .client
            .post("/v1/train/run", &serde_json::json!({}))
            .await?;
        let job = wait_job(&self.client, started.job_id).await?;
        let first = accepted_model(&self.client, &job, t).await?;
        println!(
            "  job {} → {}: held-out accuracy {}; signed by key {}",
            job.id,
            first.model,
            pct(first.holdout_accuracy),
            first.key_id
        );
        self.report.models.push(first.clone());
        self.mark("first model trained, gated, signed", t);
        Ok(first)
    }

    /// 4. Its first rollout, started by the operator (the policy rolls out only candidates
    ///    that beat a champion).
    async fn operator_rollout(&mut self, first: &ModelRow) -> anyhow::Result<()> {
        step(4, "Rolling it out in gated waves (10 % canary, 50 %, 100 %): signed commands, chunked download, self-test");
        let t = Instant::now();
        let plan = Plan::from_toml(&format!(
            "model = \"{}\"\nselector = \"all\"\n[[waves]]\npercent = 10\nbake = \"2s\"\n[[waves]]\npercent = 50\nbake = \"1s\"\n[[waves]]\npercent = 100\nbake = \"0s\"\n[gates]\n# No traffic yet in this chapter.\non_no_data = \"pass\"\n",
            first.model
        ))?;
        let r: RolloutView = self
            .client
            .post("/v1/rollouts?by=drover-demo", &plan)
            .await?;
        follow_rollout(&self.client, r.id).await?;
        self.report
            .rollouts
            .push(rollout_row(&self.client, r.id).await?);
        self.mark("first rollout completed", t);
        self.companion().await
    }

    /// 4b. A second model on every gateway, in its own slot and its own rollout: the
    ///     anomaly model trained on the same history by the built-in trainer.
    async fn companion(&mut self) -> anyhow::Result<()> {
        let t = Instant::now();
        let history = std::fs::read_to_string(self.dir.join("policy").join("history.csv"))?;
        let (_, rows) =
            drover_control_plane::jobs::dataset::parse_labeled_csv(&history, "history.csv")?;
        let d = drover_control_plane::trainer::Dataset {
            features: rows.iter().map(|r| r.features.clone()).collect(),
            labels: rows.iter().map(|r| r.label).collect(),
        };
        let params = drover_control_plane::trainer::TrainParams::default();
        let model = drover_control_plane::trainer::train(&d, &params)?;
        let name = format!("{COMPANION}@1.0.0");
        let body = serde_json::json!({
            "name": COMPANION,
            "version": "1.0.0",
            "model_hex": hex::encode(model.to_onnx()),
            "baseline_csv": history,
            "metrics": {"train_accuracy": model.accuracy(&d)},
        });
        let _: serde_json::Value = self.client.post("/v1/models", &body).await?;
        let plan = Plan::from_toml(&format!(
            "model = \"{name}\"\nselector = \"all\"\n[[waves]]\npercent = 100\nbake = \"0s\"\n[gates]\non_no_data = \"pass\"\n"
        ))?;
        let r: RolloutView = self
            .client
            .post("/v1/rollouts?by=drover-demo", &plan)
            .await?;
        follow_rollout(&self.client, r.id).await?;
        // Every gateway now holds both models, each in its own slot.
        let client = &self.client;
        let ids: Vec<String> = self.site_of.keys().cloned().collect();
        wait_for(
            &bar(ids.len(), "gateways serving both models"),
            || async {
                let mut both = 0;
                for id in &ids {
                    let d: DeviceView = client.get(&format!("/v1/devices/{id}")).await.ok()?;
                    let active = d.models.iter().filter(|m| m.active.is_some()).count();
                    both += usize::from(active >= 2);
                }
                Some(both)
            },
            ids.len(),
        )
        .await?;
        println!(
            "  {name}: its own slot and rollout beside {MODEL} on every gateway; each swaps, \
             rolls back and is removed alone (`drover device show ID` lists both)"
        );
        self.report.companion_model = Some(name);
        self.report.models_per_device = 2;
        self.mark("second model on every gateway", t);
        Ok(())
    }

    /// 5. Live traffic with feedback; drift is scored per site.
    async fn live_traffic(&mut self, first: &ModelRow) -> anyhow::Result<(Traffic, DriftLog)> {
        step(
            5,
            "Live sensor readings through every agent's KServe v2 API, with ground-truth feedback",
        );
        let t = Instant::now();
        let every = Duration::from_millis(
            ((self.args.devices as u64 * 1000) / u64::from(self.args.rate)).max(5),
        );
        let targets = self
            .running
            .agents
            .iter()
            .map(|(id, a)| Target {
                id: id.clone(),
                site: self.site_of[id].clone(),
                api: a.api_addr().to_string(),
            })
            .collect();
        let traffic = Traffic::start(targets, MODEL, Some(COMPANION), every, self.args.seed);
        let traffic_start = drover_host::clock::now_ms();
        let mut drift = DriftLog::new(&self.client, traffic_start).await?;
        drift
            .until(
                &self.client,
                |d| d.windows_for(&first.model) >= 2,
                "two drift windows of normal operation",
            )
            .await?;
        self.mark("normal operation scored", t);
        Ok((traffic, drift))
    }

    /// 6. The retrofit at one site, until sustained drift starts a training job.
    async fn retrofit(
        &mut self,
        traffic: &Traffic,
        drift: &mut DriftLog,
    ) -> anyhow::Result<JobView> {
        step(
            6,
            &format!(
                "{SHIFTED} retrofits its line with high-speed pumps: its sensor readings shift"
            ),
        );
        let t = Instant::now();
        traffic.retrofit(SHIFTED);
        let retrofit_ms = drover_host::clock::now_ms();
        let job = loop {
            drift.poll(&self.client).await?;
            let jobs: Vec<JobView> = self.client.get("/v1/train/jobs").await?;
            if let Some(j) = jobs
                .into_iter()
                .find(|j| j.trigger.starts_with("drift:") && j.created_at_ms >= retrofit_ms)
            {
                break j;
            }
            if t.elapsed() > WAIT {
                bail!("no training job was triggered within {WAIT:?} of the retrofit");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!(
            "  sustained drift → training job {} started (trigger {})",
            job.id, job.trigger
        );
        self.report.retraining_trigger = Some(job.trigger.clone());
        self.mark("drift detected, retraining triggered", t);
        Ok(job)
    }

    /// 7. Retraining and the gate; returns the finished job and the model it registered.
    async fn retraining(&mut self, job: JobView) -> anyhow::Result<(JobView, ModelRow)> {
        step(7, "Retraining on the plant history plus the fleet's labelled samples; gate against the champion");
        let t = Instant::now();
        let job = wait_job(&self.client, job.id).await?;
        let second = accepted_model(&self.client, &job, t).await?;
        println!(
            "  {} accepted: fleet held-out accuracy {} vs champion {}; signed by key {}",
            second.model,
            pct(second.recent_accuracy),
            pct(second.champion_recent_accuracy),
            second.key_id
        );
        self.report.models.push(second.clone());
        self.mark("candidate trained, gated, signed", t);
        Ok((job, second))
    }

    /// 8. Rolled out by the policy: shadow on a canary, then the site.
    async fn policy_rollout(&mut self, job: &JobView, second: &ModelRow) -> anyhow::Result<()> {
        step(
            8,
            &format!(
                "The policy rolls {} out to {SHIFTED}: shadow on a canary wave, then the site",
                second.model
            ),
        );
        let t = Instant::now();
        let rollout_id = loop {
            let l: Vec<RolloutView> = self.client.get("/v1/rollouts").await?;
            if let Some(r) = l.iter().find(|r| r.model == second.model) {
                break r.id;
            }
            if t.elapsed() > WAIT {
                bail!(
                    "the policy did not start a rollout of {}: {:?}",
                    second.model,
                    job.detail
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        follow_rollout(&self.client, rollout_id).await?;
        let row = rollout_row(&self.client, rollout_id).await?;
        println!(
            "  shadow agreement on the canary: {}",
            pct(row.shadow_agreement)
        );
        self.report.rollouts.push(row);
        self.rollout_done = Some(Instant::now());
        self.mark("retrained model rolled out", t);
        Ok(())
    }

    /// 9. Recovery: the shifted site's devices answer with the retrained model; the traffic
    ///    stops and its ledger becomes the accuracy table.
    async fn recovery(
        &mut self,
        traffic: Traffic,
        drift: &mut DriftLog,
        second: &ModelRow,
    ) -> anyhow::Result<Recovered> {
        step(
            9,
            &format!("Measuring {SHIFTED}'s accuracy with the retrained model"),
        );
        let t = Instant::now();
        let second_version = version_of(&second.model);
        let n_shifted = self.report.sites.get(SHIFTED).copied().unwrap_or(0) as u64;
        let pb = bar(
            (RECOVERY_REQUESTS * n_shifted) as usize,
            "readings answered by the new model",
        );
        loop {
            let served: u64 = traffic
                .ledger()
                .iter()
                .filter(|((site, _, v), _)| site == SHIFTED && *v == second_version)
                .map(|(_, t)| t.served)
                .sum();
            pb.set_position(served.min(RECOVERY_REQUESTS * n_shifted));
            if served >= RECOVERY_REQUESTS * n_shifted {
                break;
            }
            if t.elapsed() > WAIT {
                bail!(
                    "{SHIFTED} answered only {served} readings with {} within {WAIT:?}",
                    second.model
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pb.finish();
        self.mark("recovery measured", t);
        // The alert that started the retraining clears: the window after the one that
        // recorded plant-b's reference with the new model is judged against it.
        let cleared = Instant::now();
        drift
            .until(
                &self.client,
                |d| d.latest_level(SHIFTED, &second.model).as_deref() == Some("ok"),
                &format!("{SHIFTED}'s drift level with {} back at ok", second.model),
            )
            .await?;
        let after = self.rollout_done.map_or(0.0, |d| d.elapsed().as_secs_f64());
        self.report.alert_cleared_after_secs = Some(after);
        println!(
            "  {SHIFTED}'s drift alert cleared {after:.0} s after the rollout: judged against its own \
             first window with {}",
            second.model
        );
        self.mark("drift alert cleared", cleared);
        let (failed, last_error) = traffic.failures();
        let ledger = traffic.stop().await;
        accuracy_rows(&mut self.report, &ledger, &second_version);
        Ok(Recovered {
            ledger,
            failed,
            last_error,
        })
    }

    /// 10. Telemetry: waits until every answered request is counted in SQLite.
    async fn telemetry(&mut self, recovered: Recovered) -> anyhow::Result<()> {
        let Recovered {
            ledger,
            failed,
            last_error,
        } = recovered;
        step(10, "Waiting for the fleet's telemetry to land in SQLite");
        let t = Instant::now();
        let answered: u64 = ledger.values().map(|t| t.served).sum();
        let pb = bar(answered as usize, "inferences reported");
        let deadline = Instant::now() + WAIT;
        let (stored, windows) = loop {
            let (mut stored, mut windows) = (0u64, 0u64);
            for (id, _) in self.running.agents.iter() {
                let rows: Vec<TelemetryView> = self
                    .client
                    .get(&format!("/v1/devices/{id}/telemetry?limit=100000"))
                    .await?;
                stored += rows.iter().map(|r| r.inferences).sum::<u64>();
                windows += rows.len() as u64;
            }
            pb.set_position(stored.min(answered));
            if stored >= answered {
                break (stored, windows);
            }
            if Instant::now() > deadline {
                bail!("telemetry reported {stored} of {answered} inferences after {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        pb.finish();
        self.mark("telemetry stored", t);
        self.report.telemetry = TelemetryRow {
            requests_answered: answered,
            requests_failed: failed,
            inferences_stored: stored,
            telemetry_windows: windows,
        };
        if let Some(e) = last_error {
            println!("  {failed} requests failed; the last: {e}");
        }
        Ok(())
    }

    /// Writes the report as Markdown and JSON and prints the Markdown.
    fn write_report(&self) -> anyhow::Result<()> {
        let md_path = self
            .args
            .report
            .clone()
            .unwrap_or_else(|| self.dir.join("demo-report.md"));
        let json_path = md_path.with_extension("json");
        let md = self.report.markdown();
        std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
        std::fs::write(&json_path, serde_json::to_vec_pretty(&self.report)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        println!("\n{md}");
        println!(
            "Report written to {} (and {})",
            md_path.display(),
            json_path.display()
        );
        Ok(())
    }
}

/// The accuracy table: one row per (site, pumps, model version) the traffic saw, named by
/// the phase of the story it belongs to, in story order.
fn accuracy_rows(report: &mut Report, ledger: &Ledger, second_version: &str) {
    for ((site, line, version), tally) in ledger {
        let phase = if *version == second_version {
            "after retraining"
        } else if *line == "high-speed" {
            "under drift"
        } else {
            "no drift"
        };
        report.accuracy.push(AccuracyRow {
            phase: phase.into(),
            site: site.clone(),
            pumps: (*line).into(),
            model: format!("{MODEL}@{version}"),
            served: tally.served,
            accuracy: tally.accuracy(),
        });
    }
    let order = |p: &str| {
        ["no drift", "under drift", "after retraining"]
            .iter()
            .position(|x| *x == p)
    };
    report
        .accuracy
        .sort_by(|a, b| (order(&a.phase), &a.site).cmp(&(order(&b.phase), &b.site)));
}
