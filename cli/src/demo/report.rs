//! The demo's outcome: one serializable report, written as JSON (for scripts and the CI
//! test) and as Markdown (for people).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub devices: usize,
    pub seed: u64,
    /// Devices per site.
    pub sites: BTreeMap<String, usize>,
    /// The site whose line was retrofitted.
    pub shifted_site: String,
    pub models: Vec<ModelRow>,
    /// Accuracy of live predictions, per phase of the story.
    pub accuracy: Vec<AccuracyRow>,
    /// Per scored drift window and site: the largest PSI over the features and the level.
    pub drift_windows: Vec<DriftRow>,
    /// Devices that reached `alert` in at least one window, per site.
    pub alerting_devices: BTreeMap<String, usize>,
    /// Sites (label groups) that reached `alert` in at least one window.
    pub alerting_sites: Vec<String>,
    pub retraining_trigger: Option<String>,
    /// Seconds from the end of the policy's rollout until the shifted site's drift level
    /// with the retrained model was back at ok (judged against its reference window).
    pub alert_cleared_after_secs: Option<f64>,
    pub rollouts: Vec<RolloutRow>,
    /// The second model served beside the failure predictor, and the fewest active
    /// models any gateway reported once it was rolled out.
    pub companion_model: Option<String>,
    pub models_per_device: usize,
    pub telemetry: TelemetryRow,
    pub timeline: Vec<(String, f64)>,
    pub total_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelRow {
    pub model: String,
    pub job: u64,
    pub trigger: String,
    pub parent: Option<String>,
    pub holdout_accuracy: Option<f64>,
    /// Accuracy on the held-out rows that came from the fleet.
    pub recent_accuracy: Option<f64>,
    pub champion_recent_accuracy: Option<f64>,
    pub train_secs: f64,
    pub key_id: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccuracyRow {
    pub phase: String,
    pub site: String,
    /// `standard` or `high-speed`.
    pub pumps: String,
    pub model: String,
    pub served: u64,
    pub accuracy: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DriftRow {
    pub window_end_ms: u64,
    pub site: String,
    pub model: String,
    pub max_psi: f64,
    pub feature: String,
    pub level: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RolloutRow {
    pub id: u64,
    pub model: String,
    pub started_by: String,
    pub status: String,
    pub secs: f64,
    /// Wave number, devices it reaches, seconds it took.
    pub waves: Vec<(usize, u64, f64)>,
    pub shadow_agreement: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TelemetryRow {
    pub requests_answered: u64,
    pub requests_failed: u64,
    pub inferences_stored: u64,
    pub telemetry_windows: u64,
}

/// A fraction as a percentage, `–` when there is none.
pub fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} %", 100.0 * v))
}

impl Report {
    /// The accuracy of one phase at one site, if anything was served then.
    pub fn accuracy_of(&self, phase: &str, site: &str) -> Option<f64> {
        self.accuracy
            .iter()
            .find(|a| a.phase == phase && a.site == site)
            .and_then(|a| a.accuracy)
    }

    /// The report for people: one section per part of the story.
    pub fn markdown(&self) -> String {
        let mut r = String::new();
        self.intro_md(&mut r);
        self.accuracy_md(&mut r);
        self.models_md(&mut r);
        self.drift_md(&mut r);
        self.rollouts_md(&mut r);
        self.telemetry_md(&mut r);
        self.timeline_md(&mut r);
        r
    }

    /// Title and the fleet the story ran on.
    fn intro_md(&self, r: &mut String) {
        let _ = writeln!(r, "# Drover demo report\n");
        let sites: Vec<String> = self
            .sites
            .iter()
            .map(|(s, n)| format!("{s} ({n})"))
            .collect();
        let _ = writeln!(
            r,
            "{} devices across {} sites, seed {}: {}. The line at **{}** was retrofitted with \
             high-speed pumps mid-run.\n",
            self.devices,
            self.sites.len(),
            self.seed,
            sites.join(", "),
            self.shifted_site
        );
    }

    /// Accuracy of live predictions, per phase, site and pump kind.
    fn accuracy_md(&self, r: &mut String) {
        let _ = writeln!(r, "## Accuracy of live predictions\n");
        let _ = writeln!(r, "| phase | site | pumps | model | requests | accuracy |");
        let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- |");
        for a in &self.accuracy {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} |",
                a.phase,
                a.site,
                a.pumps,
                a.model,
                a.served,
                pct(a.accuracy)
            );
        }
    }

    /// The models the jobs trained, with their gate metrics.
    fn models_md(&self, r: &mut String) {
        let _ = writeln!(
            r,
            "\n## Models (trained by the local executor, gated, signed)\n"
        );
        let _ = writeln!(
            r,
            "| model | job | trigger | parent | held-out accuracy | fleet rows: candidate | fleet rows: champion | training job | key |"
        );
        let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for m in &self.models {
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1} s | {} |",
                m.model,
                m.job,
                m.trigger,
                m.parent.as_deref().unwrap_or("–"),
                pct(m.holdout_accuracy),
                pct(m.recent_accuracy),
                pct(m.champion_recent_accuracy),
                m.train_secs,
                m.key_id
            );
        }
    }

    /// Drift windows per site, and which sites and devices alerted against the first model.
    fn drift_md(&self, r: &mut String) {
        let _ = writeln!(
            r,
            "\n## Drift (largest PSI over the features, per window and site)\n"
        );
        let _ = writeln!(
            r,
            "| window end | site | model | max PSI | feature | level |"
        );
        let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- |");
        let t0 = self.drift_windows.first().map_or(0, |d| d.window_end_ms);
        for d in &self.drift_windows {
            let _ = writeln!(
                r,
                "| +{:.0} s | {} | {} | {:.3} | {} | {} |",
                (d.window_end_ms.saturating_sub(t0)) as f64 / 1000.0,
                d.site,
                d.model,
                d.max_psi,
                d.feature,
                d.level
            );
        }
        let _ = writeln!(
            r,
            "\nEach window is scored against the baseline signed into the model the devices ran \
             (its training data) until a rollout of that model completes; then each site's first \
             window with it becomes the site's reference. The retrained model's baseline mixes both \
             kinds of pump, so {} still differs from it in the window that records its reference, \
             and is judged against its own pumps from the next one: {}.",
            self.shifted_site,
            match self.alert_cleared_after_secs {
                Some(s) => format!("its alert cleared {s:.0} s after the rollout completed"),
                None => "its alert did not clear".to_owned(),
            }
        );
        let alerting: Vec<String> = self
            .alerting_devices
            .iter()
            .map(|(s, n)| format!("{s}: {n} of {}", self.sites.get(s).copied().unwrap_or(0)))
            .collect();
        let _ = writeln!(
            r,
            "\nAgainst the first model: sites that alerted: {}. Devices that alerted: {}. Retraining trigger: {}.",
            if self.alerting_sites.is_empty() {
                "none".to_owned()
            } else {
                self.alerting_sites.join(", ")
            },
            alerting.join(", "),
            self.retraining_trigger.as_deref().unwrap_or("none")
        );
    }

    /// Rollouts with their waves and shadow agreement.
    fn rollouts_md(&self, r: &mut String) {
        let _ = writeln!(r, "\n## Rollouts\n");
        let _ = writeln!(
            r,
            "| rollout | model | started by | status | waves (devices, duration) | shadow agreement | total |"
        );
        let _ = writeln!(r, "| --- | --- | --- | --- | --- | --- | --- |");
        for o in &self.rollouts {
            let waves: Vec<String> = o
                .waves
                .iter()
                .map(|(w, n, s)| format!("{w}: {n} in {s:.1} s"))
                .collect();
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {:.1} s |",
                o.id,
                o.model,
                o.started_by,
                o.status,
                waves.join("; "),
                pct(o.shadow_agreement),
                o.secs
            );
        }
    }

    /// What the agents answered and what landed in SQLite.
    fn telemetry_md(&self, r: &mut String) {
        let t = &self.telemetry;
        let _ = writeln!(r, "\n## Telemetry\n");
        let _ = writeln!(r, "| what | count |\n| --- | --- |");
        let _ = writeln!(
            r,
            "| requests answered by the agents | {} |",
            t.requests_answered
        );
        let _ = writeln!(r, "| requests failed | {} |", t.requests_failed);
        if let Some(c) = &self.companion_model {
            let _ = writeln!(
                r,
                "| models per gateway | {} ({c} beside the failure predictor) |",
                self.models_per_device
            );
        }
        let _ = writeln!(
            r,
            "| inferences reported in telemetry and stored | {} |",
            t.inferences_stored
        );
        let _ = writeln!(r, "| telemetry windows stored | {} |", t.telemetry_windows);
    }

    /// How long each step took.
    fn timeline_md(&self, r: &mut String) {
        let _ = writeln!(r, "\n## Timeline\n\n| step | duration |\n| --- | --- |");
        for (what, s) in &self.timeline {
            let _ = writeln!(r, "| {what} | {s:.1} s |");
        }
        let _ = writeln!(r, "| total | {:.1} s |", self.total_secs);
    }
}
