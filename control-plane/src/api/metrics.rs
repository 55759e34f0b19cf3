//! `/metrics`: the counters and histograms of [`crate::metrics::Metrics`], then the fleet's
//! state read from the store at scrape time: rollouts (status, wave, stage, devices by
//! state, every gate's value and verdict), devices (fleet totals; per device while the
//! fleet is within `metrics.per_device_limit`), drift (PSI, p-value and level of each
//! scope's latest window), training jobs and the continuous-training champion, and the
//! expiry of what trust rests on (keyring, fleet CA, CRL, device and integration
//! certificates, as Unix times). Passes `promtool check metrics`
//! (`tests/tests/metrics_e2e.rs`).
//!
//! Series whose subject changes (a rollout's status, a device's model) are written with the
//! current value as a label and the value 1 (the "info"/state-set pattern), so alerts read
//! `drover_rollout_status{status="paused"} == 1`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use drover_host::prom::{self, header as family, sample, Histogram, SLOW_BUCKETS};

use super::rollouts::RolloutView;
use super::{blocking, ApiError, AppState};
use crate::app::App;
use crate::store::{DriftScoreRow, Store};

/// Finished rollouts kept on the page (the newest), besides every open one.
const FINISHED_ROLLOUTS: usize = 20;

pub(super) async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let mut out = st.app.metrics.render();
    let limit = st.app.settings.metrics_per_device_limit;
    // (policy name: its file's stem, the model it retrains)
    let policy = st.continuous.as_ref().map(|e| {
        let name = st
            .app
            .settings
            .continuous
            .as_ref()
            .map_or(String::new(), |c| {
                c.policy
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        (name, e.policy.model.clone())
    });
    let fleet = blocking(&st, move |app, s| fleet_state(app, s, limit, policy)).await;
    match fleet {
        Ok(text) => out.push_str(&text),
        Err(ApiError(_, e)) => tracing::warn!(error = %e, "/metrics: fleet state not read"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn fleet_state(
    app: &App,
    s: &mut Store,
    per_device_limit: usize,
    policy: Option<(String, String)>,
) -> Result<String, ApiError> {
    let mut out = String::new();
    rollouts(&mut out, s)?;
    let per_device = devices(&mut out, s, per_device_limit)?;
    drift(&mut out, &s.drift_status()?, per_device_limit);
    training(&mut out, s)?;
    let champ = match &policy {
        Some((name, model)) => crate::continuous::champion(s.models()?, model)
            .map(|c| (name.as_str(), model.as_str(), c.version)),
        None => None,
    };
    champion(
        &mut out,
        champ.as_ref().map(|(p, m, v)| (*p, *m, v.as_str())),
    );
    let secs = |ms: u64| ms as f64 / 1e3;
    let device_certs: Vec<(String, f64)> = per_device
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| {
            let ms = app.ca.device_cert_not_after_ms(&d)?;
            Some((d, secs(ms)))
        })
        .collect();
    let integrations: Vec<(String, f64)> = s
        .integrations()?
        .into_iter()
        .filter(|i| i.revoked_at_ms.is_none())
        .map(|i| (i.name, secs(i.not_after_ms)))
        .collect();
    let crl = std::fs::read(app.ca.dir().join(crate::pki::CRL_FILE))
        .ok()
        .and_then(|pem| crate::pki::crl_next_update_ms(&pem));
    let trust = Trust {
        keyring: secs(app.keys.current().keyring.expires_at_ms),
        ca: crate::pki::not_after_ms(app.ca.ca_pem()).map(secs),
        crl: crl.map(secs),
        device_certs,
        integrations,
    };
    expiry(&mut out, &trust);
    Ok(out)
}

/// When what the fleet's trust rests on stops working, in Unix seconds.
struct Trust {
    keyring: f64,
    ca: Option<f64>,
    crl: Option<f64>,
    /// Per device, within `metrics.per_device_limit`.
    device_certs: Vec<(String, f64)>,
    integrations: Vec<(String, f64)>,
}

fn expiry(o: &mut String, t: &Trust) {
    prom::single(
        o,
        "drover_keyring_expiry_timestamp_seconds",
        "gauge",
        "When the published keyring expires (devices refuse commands signed under it after; `drover keys rotate`).",
        t.keyring,
    );
    if let Some(v) = t.ca {
        prom::single(
            o,
            "drover_fleet_ca_expiry_timestamp_seconds",
            "gauge",
            "When the fleet CA certificate expires.",
            v,
        );
    }
    if let Some(v) = t.crl {
        prom::single(
            o,
            "drover_crl_next_update_timestamp_seconds",
            "gauge",
            "nextUpdate of the CRL external brokers read (OpenSSL brokers refuse every client after it).",
            v,
        );
    }
    family(
        o,
        "drover_device_cert_expiry_timestamp_seconds",
        "gauge",
        "When a device's client certificate expires (per device, within metrics.per_device_limit).",
    );
    for (d, v) in &t.device_certs {
        sample(
            o,
            "drover_device_cert_expiry_timestamp_seconds",
            &[("device", d)],
            *v,
        );
    }
    family(
        o,
        "drover_integration_cert_expiry_timestamp_seconds",
        "gauge",
        "When an active integration identity's certificate expires.",
    );
    for (i, v) in &t.integrations {
        let l = [("integration", i.as_str())];
        sample(
            o,
            "drover_integration_cert_expiry_timestamp_seconds",
            &l,
            *v,
        );
    }
}

/// The continuous-training champion: `(policy, model, version)`.
fn champion(o: &mut String, champ: Option<(&str, &str, &str)>) {
    family(
        o,
        "drover_training_champion_info",
        "gauge",
        "The model version continuous training must beat (the policy model's latest published version), always 1.",
    );
    if let Some((policy, model, version)) = champ {
        let l = [("policy", policy), ("model", model), ("version", version)];
        sample(o, "drover_training_champion_info", &l, 1.0);
    }
}

fn rollouts(o: &mut String, s: &Store) -> Result<(), ApiError> {
    let all = crate::rollout::driver::list(s).map_err(ApiError::from)?;
    let open: Vec<u64> = s.open_rollouts()?;
    let mut views = Vec::new();
    let mut finished = 0;
    for r in all.iter().rev() {
        if open.contains(&r.id) {
            // The header alone holds no device slots: load the whole rollout.
            if let Some(full) = crate::rollout::driver::load(s, r.id).map_err(ApiError::from)? {
                views.push(RolloutView::from_state(&full, false));
            }
        } else if finished < FINISHED_ROLLOUTS {
            finished += 1;
            views.push(RolloutView::from_state(r, false));
        }
    }
    views.sort_by_key(|v| v.id);
    family(
        o,
        "drover_rollout_status",
        "gauge",
        "1 for a rollout's current status (running, paused, completed, rolling-back, rolled-back, aborting, aborted).",
    );
    for v in &views {
        let id = v.id.to_string();
        sample(
            o,
            "drover_rollout_status",
            &[("rollout", &id), ("model", &v.model), ("status", &v.status)],
            1.0,
        );
    }
    family(
        o,
        "drover_rollout_stage",
        "gauge",
        "1 for a rollout's current stage (install, shadow, bake).",
    );
    for v in &views {
        let id = v.id.to_string();
        sample(
            o,
            "drover_rollout_stage",
            &[("rollout", &id), ("stage", &v.stage)],
            1.0,
        );
    }
    family(
        o,
        "drover_rollout_wave",
        "gauge",
        "A rollout's current wave (1-based).",
    );
    for v in &views {
        let id = v.id.to_string();
        sample(o, "drover_rollout_wave", &[("rollout", &id)], v.wave as f64);
    }
    family(
        o,
        "drover_rollout_devices",
        "gauge",
        "Devices of an open rollout by state: assigned, healthy, failed, in_flight.",
    );
    for v in views.iter().filter(|v| open.contains(&v.id)) {
        let id = v.id.to_string();
        let sum = |f: fn(&super::rollouts::WaveView) -> u64| v.waves.iter().map(f).sum::<u64>();
        for (state, n) in [
            ("assigned", sum(|w| w.assigned)),
            ("healthy", sum(|w| w.healthy)),
            ("failed", sum(|w| w.failed)),
            ("in_flight", sum(|w| w.in_flight)),
        ] {
            sample(
                o,
                "drover_rollout_devices",
                &[("rollout", &id), ("state", state)],
                n as f64,
            );
        }
    }
    gates(o, &views);
    Ok(())
}

fn gates(o: &mut String, views: &[RolloutView]) {
    family(
        o,
        "drover_rollout_gate_value",
        "gauge",
        "A gate's value at the rollout's last evaluation (absent while it has none).",
    );
    for v in views {
        let id = v.id.to_string();
        for g in &v.gates {
            if let Some(x) = g.value {
                let l = [("rollout", id.as_str()), ("gate", &g.gate)];
                sample(o, "drover_rollout_gate_value", &l, x);
            }
        }
    }
    family(
        o,
        "drover_rollout_gate_verdict",
        "gauge",
        "1 for a gate's verdict at the rollout's last evaluation (pass, fail, no-data).",
    );
    for v in views {
        let id = v.id.to_string();
        for g in &v.gates {
            let verdict = match g.verdict {
                super::rollouts::VerdictView::Pass => "pass",
                super::rollouts::VerdictView::Fail => "fail",
                super::rollouts::VerdictView::NoData => "no-data",
            };
            let l = [
                ("rollout", id.as_str()),
                ("gate", &g.gate),
                ("verdict", verdict),
            ];
            sample(o, "drover_rollout_gate_verdict", &l, 1.0);
        }
    }
}

/// Returns the device ids when per-device series are written.
fn devices(o: &mut String, s: &Store, limit: usize) -> Result<Option<Vec<String>>, ApiError> {
    let rows: Vec<_> = s
        .devices()?
        .into_iter()
        .filter(|d| !d.decommissioned)
        .collect();
    let per_device = rows.len() <= limit;
    family(
        o,
        "drover_fleet_devices",
        "gauge",
        "Enrolled devices by online state and active model.",
    );
    let mut by: BTreeMap<(bool, String), u64> = BTreeMap::new();
    for d in &rows {
        let model = d.active_model.clone().unwrap_or_default();
        *by.entry((d.online, model)).or_default() += 1;
    }
    for ((online, model), n) in by {
        let online = if online { "true" } else { "false" };
        sample(
            o,
            "drover_fleet_devices",
            &[("online", online), ("model", &model)],
            n as f64,
        );
    }
    prom::single(
        o,
        "drover_metrics_per_device",
        "gauge",
        "1 when per-device series are written (the fleet is within metrics.per_device_limit).",
        f64::from(u8::from(per_device)),
    );
    if !per_device {
        return Ok(None);
    }
    family(
        o,
        "drover_device_online",
        "gauge",
        "1 while the device is online.",
    );
    for d in &rows {
        let v = f64::from(u8::from(d.online));
        sample(o, "drover_device_online", &[("device", &d.id)], v);
    }
    family(
        o,
        "drover_device_last_seen_timestamp_seconds",
        "gauge",
        "When the device was last heard from (Unix time).",
    );
    for d in &rows {
        if let Some(ms) = d.last_seen_ms {
            let l = [("device", d.id.as_str())];
            sample(
                o,
                "drover_device_last_seen_timestamp_seconds",
                &l,
                ms as f64 / 1e3,
            );
        }
    }
    family(
        o,
        "drover_device_info",
        "gauge",
        "A device's active model, agent version and architecture (always 1).",
    );
    for d in &rows {
        let model = d.active_model.clone().unwrap_or_default();
        let agent = d.agent_version.clone().unwrap_or_default();
        let arch = d.arch.clone().unwrap_or_default();
        let l = [
            ("device", d.id.as_str()),
            ("model", &model),
            ("agent_version", &agent),
            ("arch", &arch),
        ];
        sample(o, "drover_device_info", &l, 1.0);
    }
    Ok(Some(rows.into_iter().map(|d| d.id).collect()))
}

fn drift(o: &mut String, rows: &[DriftScoreRow], per_device_limit: usize) {
    // Device scopes are per-device series: bounded by the same switch.
    let device_scopes = rows
        .iter()
        .filter(|r| r.scope.starts_with("device:"))
        .count();
    let keep =
        |r: &&DriftScoreRow| !r.scope.starts_with("device:") || device_scopes <= per_device_limit;
    let rows: Vec<&DriftScoreRow> = rows.iter().filter(keep).collect();
    for (name, help, get) in [
        (
            "drover_drift_psi",
            "PSI of a feature in a scope's latest scored window.",
            (|r: &DriftScoreRow| r.psi) as fn(&DriftScoreRow) -> Option<f64>,
        ),
        (
            "drover_drift_p_value",
            "Chi-square p-value of a feature in a scope's latest scored window.",
            |r: &DriftScoreRow| r.p_value,
        ),
        (
            "drover_drift_accuracy",
            "Accuracy from labels in a scope's latest scored window (feature __accuracy__).",
            |r: &DriftScoreRow| r.accuracy.map(|a| a.0 as f64 / r.count.max(1) as f64),
        ),
    ] {
        family(o, name, "gauge", help);
        for r in &rows {
            if let Some(v) = get(r) {
                sample(o, name, &[("scope", &r.scope), ("feature", &r.feature)], v);
            }
        }
    }
    family(
        o,
        "drover_drift_level",
        "gauge",
        "Worst drift level of a scope's latest window: 0 ok, 1 warn, 2 alert.",
    );
    let mut worst: BTreeMap<&str, u8> = BTreeMap::new();
    for r in &rows {
        let l = match r.level.as_str() {
            "alert" => 2,
            "warn" => 1,
            _ => 0,
        };
        let w = worst.entry(r.scope.as_str()).or_default();
        *w = (*w).max(l);
    }
    for (scope, l) in worst {
        sample(o, "drover_drift_level", &[("scope", scope)], f64::from(l));
    }
}

fn training(o: &mut String, s: &Store) -> Result<(), ApiError> {
    let jobs = s.jobs(u32::MAX)?;
    let mut by: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let duration = Histogram::new(&SLOW_BUCKETS);
    for j in &jobs {
        // `drift:<scope>` → `drift`: the scope is not a label (unbounded).
        let trigger = j.trigger.split(':').next().unwrap_or_default().to_owned();
        let outcome = j.outcome.map(|x| x.as_str()).unwrap_or("none").to_owned();
        *by.entry((trigger, j.state.as_str().to_owned(), outcome))
            .or_default() += 1;
        if let Some(end) = j.finished_at_ms {
            duration.observe(end.saturating_sub(j.created_at_ms) as f64 / 1e3);
        }
    }
    family(
        o,
        "drover_training_jobs",
        "gauge",
        "Training jobs stored, by trigger (manual, drift, accuracy_drop, labels, schedule), state and gate outcome.",
    );
    for ((trigger, state, outcome), n) in by {
        let l = [
            ("trigger", trigger.as_str()),
            ("state", &state),
            ("outcome", &outcome),
        ];
        sample(o, "drover_training_jobs", &l, n as f64);
    }
    family(
        o,
        "drover_training_job_duration_seconds",
        "histogram",
        "Finished training jobs' time from submission to end.",
    );
    prom::histogram(o, "drover_training_job_duration_seconds", &[], &duration);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_protocol::{DeviceId, DeviceKey};

    use super::*;

    fn store(devices: &[&str]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        for d in devices {
            let id = DeviceId::new(*d).unwrap();
            s.enroll_device(&id, &DeviceKey([1; 32]), &BTreeMap::new(), 1)
                .unwrap();
        }
        (dir, s)
    }

    fn score(
        scope: &str,
        feature: &str,
        psi: f64,
        level: crate::store::DriftLevel,
    ) -> DriftScoreRow {
        DriftScoreRow {
            scope: scope.into(),
            model_digest: "ab".repeat(32),
            window_start_ms: 0,
            window_end_ms: 100,
            feature: feature.into(),
            count: 50,
            psi: Some(psi),
            chi2: Some(9.0),
            p_value: Some(0.001),
            missing: 0,
            out_of_range: 0,
            level,
            accuracy: None,
        }
    }

    #[test]
    fn drift_shows_psi_p_value_and_the_worst_level_per_scope_device_scopes_bounded() {
        use crate::store::DriftLevel::{Alert, Ok as Fine};
        let rows = [
            score("fleet", "temp", 0.05, Fine),
            score("site=plant-b", "temp", 0.4, Alert),
            score("site=plant-b", "vib", 0.01, Fine),
            score("device:gw-1", "temp", 0.3, Alert),
            crate::store::DriftScoreRow {
                psi: None,
                chi2: None,
                p_value: None,
                accuracy: Some((40, 0.7, 0.9)),
                ..score("site=plant-a", "__accuracy__", 0.0, Fine)
            },
        ];
        let mut o = String::new();
        drift(&mut o, &rows, 10);
        assert!(
            o.contains(
                "drover_drift_accuracy{scope=\"site=plant-a\",feature=\"__accuracy__\"} 0.8\n"
            ),
            "{o}"
        );
        assert!(
            o.contains("drover_drift_psi{scope=\"site=plant-b\",feature=\"temp\"} 0.4"),
            "{o}"
        );
        assert!(
            o.contains("drover_drift_p_value{scope=\"fleet\",feature=\"temp\"} 0.001"),
            "{o}"
        );
        assert!(
            o.contains("drover_drift_level{scope=\"site=plant-b\"} 2"),
            "{o}"
        );
        assert!(o.contains("drover_drift_level{scope=\"fleet\"} 0"), "{o}");
        assert!(o.contains("device:gw-1"), "{o}");
        let mut large = String::new();
        drift(&mut large, &rows, 0);
        assert!(!large.contains("device:gw-1"), "{large}");
        assert!(
            large.contains("drover_drift_level{scope=\"site=plant-b\"} 2"),
            "{large}"
        );
    }

    #[test]
    fn training_jobs_are_counted_by_trigger_state_and_outcome_with_durations() {
        use crate::store::{JobOutcome, JobRow, JobState};
        let (_d, mut s) = store(&[]);
        for (trigger, end) in [("drift:site=plant-b", Some(90_000)), ("manual", None)] {
            let mut j = JobRow {
                name: "j".into(),
                trigger: trigger.into(),
                executor: "local".into(),
                spec: "name = \"j\"".into(),
                created_at_ms: 30_000,
                ..Default::default()
            };
            j.id = s.insert_job(&j).unwrap();
            if let Some(end) = end {
                j.state = JobState::Succeeded;
                j.outcome = Some(JobOutcome::Accepted);
                j.finished_at_ms = Some(end);
                s.update_job(&j).unwrap();
            }
        }
        let mut o = String::new();
        training(&mut o, &s).unwrap();
        let l = "{trigger=\"drift\",state=\"succeeded\",outcome=\"accepted\"} 1";
        assert!(o.contains(&format!("drover_training_jobs{l}")), "{o}");
        let l = "{trigger=\"manual\",state=\"queued\",outcome=\"none\"} 1";
        assert!(o.contains(&format!("drover_training_jobs{l}")), "{o}");
        assert!(
            o.contains("drover_training_job_duration_seconds_bucket{le=\"60\"} 1"),
            "{o}"
        );
        assert!(
            o.contains("drover_training_job_duration_seconds_sum 60"),
            "{o}"
        );
    }

    #[test]
    fn per_device_series_stop_above_the_limit_and_fleet_totals_remain() {
        let (_d, s) = store(&["gw-1", "gw-2", "gw-3"]);
        let mut within = String::new();
        devices(&mut within, &s, 3).unwrap();
        assert!(
            within.contains("drover_device_online{device=\"gw-2\"} 0"),
            "{within}"
        );
        assert!(within.contains("drover_metrics_per_device 1"), "{within}");
        let mut above = String::new();
        devices(&mut above, &s, 2).unwrap();
        assert!(!above.contains("drover_device_"), "{above}");
        assert!(above.contains("drover_metrics_per_device 0"), "{above}");
        assert!(
            above.contains("drover_fleet_devices{online=\"false\",model=\"\"} 3"),
            "{above}"
        );
    }

    #[test]
    fn expiry_gauges_and_the_champion_are_written_with_their_subjects() {
        let mut o = String::new();
        expiry(
            &mut o,
            &Trust {
                keyring: 1.5e9,
                ca: Some(2e9),
                crl: None,
                device_certs: vec![("gw-1".into(), 1.8e9)],
                integrations: vec![("node-red".into(), 1.9e9)],
            },
        );
        for line in [
            "drover_keyring_expiry_timestamp_seconds 1500000000",
            "drover_fleet_ca_expiry_timestamp_seconds 2000000000",
            "drover_device_cert_expiry_timestamp_seconds{device=\"gw-1\"} 1800000000",
            "drover_integration_cert_expiry_timestamp_seconds{integration=\"node-red\"} 1900000000",
        ] {
            assert!(o.contains(line), "{line} in\n{o}");
        }
        assert!(!o.contains("drover_crl_next_update"), "{o}");
        let mut c = String::new();
        champion(&mut c, Some(("retrain", "dense", "1.0.10")));
        assert!(
            c.contains(
                "drover_training_champion_info{policy=\"retrain\",model=\"dense\",version=\"1.0.10\"} 1"
            ),
            "{c}"
        );
    }
}
