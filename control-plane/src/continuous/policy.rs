//! The continuous-training policy file: drift windows and thresholds, triggers, the
//! job, the gate, and the rollout template for accepted candidates.

use std::path::{Path, PathBuf};

use drover_protocol::manifest::{self};
use serde::Deserialize;

use super::*;
use crate::drift::{self, Thresholds};

/// Drift scoring settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftPolicy {
    /// Length of one scoring window (sketches whose window ends inside it are merged).
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Device labels scores are also grouped by (e.g. `["site"]`).
    #[serde(default)]
    pub group_by: Vec<String>,
    #[serde(default = "default_warn")]
    pub psi_warn: f64,
    #[serde(default = "default_alert")]
    pub psi_alert: f64,
    /// A level is raised only at this chi-square p-value or lower (lower it when many
    /// scopes and features are scored per window, so chance alerts stay rare).
    #[serde(default = "default_max_p")]
    pub max_p_value: f64,
    /// Stored scores older than this are deleted.
    #[serde(default = "default_retention")]
    pub retention_hours: u64,
    /// After a rollout of a model completes healthy, the first window in which a label
    /// group reports at least this many observations with it becomes that group's
    /// reference for the model (0: always score against the manifest's baseline).
    #[serde(default = "default_reference_min_rows")]
    pub reference_min_rows: u64,
}

fn default_reference_min_rows() -> u64 {
    100
}

/// Accuracy monitoring from labels: what each window's accuracy is judged against.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyPolicy {
    /// The accuracy every version of the model must hold.
    #[serde(default)]
    pub min_accuracy: Option<f64>,
    /// How far below the accuracy its gate measured (the `accuracy` in the model's
    /// lineage) a model may fall; the higher of the two floors applies.
    #[serde(default)]
    pub max_drop: Option<f64>,
    /// Confidence of the Wilson interval a level is decided on.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Fewer labels than this in a scope and window give no level.
    #[serde(default = "default_min_labels")]
    pub min_labels: u64,
}

fn default_min_labels() -> u64 {
    30
}

impl Default for AccuracyPolicy {
    fn default() -> Self {
        Self {
            min_accuracy: None,
            max_drop: None,
            confidence: default_confidence(),
            min_labels: default_min_labels(),
        }
    }
}

impl AccuracyPolicy {
    /// The floor for a model whose gate measured `measured` (if it went through one).
    pub fn floor(&self, measured: Option<f64>) -> Option<f64> {
        let relative = self.max_drop.zip(measured).map(|(d, m)| m - d);
        match (self.min_accuracy, relative) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

fn default_retention() -> u64 {
    24 * 7
}

fn default_window() -> u64 {
    300
}
fn default_warn() -> f64 {
    drift::DEFAULT_PSI_WARN
}
fn default_alert() -> f64 {
    drift::DEFAULT_PSI_ALERT
}
fn default_max_p() -> f64 {
    drift::DEFAULT_MAX_P_VALUE
}

impl Default for DriftPolicy {
    fn default() -> Self {
        Self {
            window_secs: default_window(),
            group_by: Vec::new(),
            psi_warn: default_warn(),
            psi_alert: default_alert(),
            max_p_value: default_max_p(),
            retention_hours: default_retention(),
            reference_min_rows: default_reference_min_rows(),
        }
    }
}

/// When a job starts by itself (each `0` turns that trigger off).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// This many consecutive windows at `alert` in one scope.
    #[serde(default)]
    pub sustained_windows: u32,
    /// This many consecutive windows whose accuracy (from labels) is at `alert` in one
    /// scope: the trigger `accuracy_drop`, for concept drift the inputs do not show.
    #[serde(default)]
    pub accuracy_drop_windows: u32,
    /// This many labels received since the last job.
    #[serde(default)]
    pub min_new_labels: u64,
    /// A job at least this often, counted from the last job stored, else from the newest
    /// registration of the policy's model.
    #[serde(default)]
    pub every_hours: f64,
    /// After a job that drift or an accuracy drop started, neither starts another for
    /// this long: its model
    /// needs time to roll out and be judged on fresh data (0: no pause).
    #[serde(default)]
    pub cooldown_secs: u64,
}

/// What a candidate must show to replace the champion.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePolicy {
    /// How much the main metric (accuracy on all held-out rows) may drop.
    #[serde(default)]
    pub max_regression: f64,
    /// How much accuracy on the recent (fleet) held-out rows must improve, as the lower
    /// confidence bound of the paired difference (candidate minus champion, same rows).
    #[serde(default = "default_margin")]
    pub min_recent_improvement: f64,
    /// Fewer recent (fleet) held-out rows than this cannot show an improvement: the
    /// improvement is then judged on every held-out row instead.
    #[serde(default = "default_min_recent_rows")]
    pub min_recent_rows: u64,
    /// Confidence of that bound, in (0.5, 1): 0.95 means the candidate beats the champion
    /// by `min_recent_improvement` with 95 % confidence.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

fn default_margin() -> f64 {
    0.01
}

fn default_min_recent_rows() -> u64 {
    30
}

fn default_confidence() -> f64 {
    0.95
}

impl Default for GatePolicy {
    fn default() -> Self {
        Self {
            max_regression: 0.0,
            min_recent_improvement: default_margin(),
            min_recent_rows: default_min_recent_rows(),
            confidence: default_confidence(),
        }
    }
}

/// A continuous-training policy file (TOML).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    /// The model this policy retrains: its latest published version is the champion.
    pub model: String,
    /// Job spec file, relative to the policy file.
    pub job: PathBuf,
    #[serde(default)]
    pub drift: DriftPolicy,
    #[serde(default)]
    pub triggers: Triggers,
    #[serde(default)]
    pub gate: GatePolicy,
    #[serde(default)]
    pub accuracy: AccuracyPolicy,
    /// Rollout plan template for accepted candidates, handed to the rollout engine as is.
    pub rollout: Option<toml::Table>,
}

impl Policy {
    pub fn parse(text: &str, origin: &str) -> Result<Policy> {
        let err = |detail: String| ContinuousError::Policy {
            path: origin.to_owned(),
            detail,
        };
        let p: Policy = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut problems = Vec::new();
        if p.version != 1 {
            problems.push(format!("version = {} (this build reads 1)", p.version));
        }
        if manifest::validate_model_name(&p.model).is_err() {
            problems.push(format!("model {:?} is not a valid model name", p.model));
        }
        if p.drift.window_secs == 0 {
            problems.push("drift.window_secs must be above 0".into());
        }
        if !(p.drift.psi_warn > 0.0 && p.drift.psi_warn <= p.drift.psi_alert) {
            problems.push(format!(
                "drift.psi_warn = {} must be above 0 and at most psi_alert = {}",
                p.drift.psi_warn, p.drift.psi_alert
            ));
        }
        if !(p.drift.max_p_value > 0.0 && p.drift.max_p_value <= 1.0) {
            problems.push(format!(
                "drift.max_p_value = {} must be within (0, 1]",
                p.drift.max_p_value
            ));
        }
        if !(p.triggers.every_hours >= 0.0 && p.triggers.every_hours.is_finite()) {
            problems.push("triggers.every_hours must be >= 0".into());
        }
        if !(0.0..1.0).contains(&p.gate.max_regression)
            || !(0.0..1.0).contains(&p.gate.min_recent_improvement)
        {
            problems.push("gate margins must be within [0, 1)".into());
        }
        if !(p.gate.confidence > 0.5 && p.gate.confidence < 1.0) {
            problems.push(format!(
                "gate.confidence = {} must be within (0.5, 1), for example 0.95",
                p.gate.confidence
            ));
        }
        let a = &p.accuracy;
        let unit = |v: Option<f64>| v.is_none_or(|v| (0.0..=1.0).contains(&v));
        if !unit(a.min_accuracy) || !unit(a.max_drop) {
            problems
                .push("accuracy.min_accuracy and accuracy.max_drop must be within [0, 1]".into());
        }
        if !(a.confidence > 0.5 && a.confidence < 1.0) {
            problems.push(format!(
                "accuracy.confidence = {} must be within (0.5, 1), for example 0.95",
                a.confidence
            ));
        }
        if p.triggers.accuracy_drop_windows > 0 && a.min_accuracy.is_none() && a.max_drop.is_none()
        {
            problems.push(
                "triggers.accuracy_drop_windows needs accuracy.min_accuracy or accuracy.max_drop \
                 (what accuracy counts as a drop)"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(p)
        } else {
            Err(err(problems.join("; ")))
        }
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| ContinuousError::Policy {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Policy::parse(&text, &path.display().to_string())
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            psi_warn: self.drift.psi_warn,
            psi_alert: self.drift.psi_alert,
            max_p_value: self.drift.max_p_value,
        }
    }
}

/// The policy's `[rollout]` table as a rollout plan for `model` (`name@version`).
pub fn rollout_plan(
    template: &toml::Table,
    model: &str,
) -> std::result::Result<crate::rollout::Plan, String> {
    let mut t = template.clone();
    t.insert("model".into(), toml::Value::String(model.to_owned()));
    let plan: crate::rollout::Plan = toml::Value::Table(t)
        .try_into()
        .map_err(|e| format!("the policy's [rollout] plan is invalid: {e}"))?;
    plan.validate().map_err(|e| e.to_string())?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_policy_and_job_specs_parse() {
        let p = Policy::parse(
            include_str!("../../trainers/examples/policy.toml"),
            "policy.toml",
        );
        assert!(p.as_ref().is_ok_and(|p| p.rollout.is_some()), "{p:?}");
        let template = p.unwrap().rollout.unwrap();
        let plan = rollout_plan(&template, "classifier@1.0.1").unwrap();
        assert!(plan.shadow.is_some() && plan.waves.len() == 3, "{plan:?}");
        assert!(rollout_plan(&toml::Table::new(), "classifier@1.0.1").is_err());
        for (name, text) in [
            (
                "builtin",
                include_str!("../../trainers/examples/job-builtin.toml"),
            ),
            (
                "sklearn",
                include_str!("../../trainers/examples/job-sklearn.toml"),
            ),
            (
                "slurm",
                include_str!("../../trainers/examples/job-slurm.toml"),
            ),
        ] {
            let j = crate::jobs::JobSpec::parse(text, name);
            assert!(j.is_ok(), "{name}: {j:?}");
        }
    }

    #[test]
    fn an_accuracy_trigger_needs_a_floor_and_the_higher_floor_applies() {
        let base =
            "version = 1\nmodel = \"m\"\njob = \"j.toml\"\n[triggers]\naccuracy_drop_windows = 2\n";
        let e = Policy::parse(base, "p.toml").err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("needs accuracy.min_accuracy")),
            "{e:?}"
        );
        let p = Policy::parse(
            &format!("{base}[accuracy]\nmin_accuracy = 0.8\nmax_drop = 0.05\n"),
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.accuracy.floor(None), Some(0.8));
        assert_eq!(p.accuracy.floor(Some(0.95)), Some(0.95 - 0.05));
        assert_eq!(p.accuracy.floor(Some(0.7)), Some(0.8));
        assert_eq!(AccuracyPolicy::default().floor(Some(0.9)), None);
        let e = Policy::parse(
            &format!("{base}[accuracy]\nmin_accuracy = 1.5\nconfidence = 1.0\n"),
            "p.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("min_accuracy") && e.contains("accuracy.confidence"),
            "{e}"
        );
    }

    #[test]
    fn policy_problems_are_reported_together() {
        let e = Policy::parse(
            "version = 3\nmodel = \"a b\"\njob = \"j.toml\"\n[drift]\nwindow_secs = 0\n",
            "p.toml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        for n in ["version = 3", "model \"a b\"", "window_secs"] {
            assert!(e.contains(n), "{n} in {e}");
        }
    }
}
