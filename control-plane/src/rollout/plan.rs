//! Rollout plans: what to roll out, to whom, in which waves, under which health gates.
//!
//! A plan is a TOML file (or the same fields given as `drover rollout start` flags). It is
//! validated once, all errors at once, and stored with the rollout, so a restarted
//! control plane keeps following the plan it started with.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Number of buckets devices are hashed into (basis points: 1 bucket = 0.01 %).
pub const BUCKETS: u32 = 10_000;

/// A device's stable rollout bucket: the same id always lands in the same bucket, so the
/// canary set is deterministic and a device that misses its wave keeps its place.
pub fn bucket(device_id: &str) -> u32 {
    let h = Sha256::new()
        .chain_update(b"drover-rollout-bucket\0")
        .chain_update(device_id.as_bytes())
        .finalize();
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % BUCKETS
}

/// What happens when a health gate fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop assigning devices; the operator decides (`resume` or `abort`).
    #[default]
    Pause,
    /// Send every device that took the candidate a signed command back to its previous model.
    Rollback,
}

/// One cumulative wave: after it, `percent` of the targets (or `count` devices) have the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Cumulative share of the selected devices, in percent (0 < p <= 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// Cumulative number of devices (instead of `percent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// How long the wave must stay healthy, after its last device installed, before the next.
    #[serde(with = "humantime_serde", default)]
    pub bake: Duration,
}

impl Wave {
    /// Cumulative number of targets this wave covers, out of `n` (at least one if `n > 0`).
    pub fn cumulative(&self, n: usize) -> usize {
        let k = match (self.percent, self.count) {
            (Some(p), _) => (p / 100.0 * n as f64).ceil() as usize,
            (None, Some(c)) => usize::try_from(c).unwrap_or(usize::MAX),
            (None, None) => n,
        };
        k.clamp(usize::from(n > 0), n)
    }
}

/// Health gates. Unset fields keep their defaults; to turn a gate off, give it a
/// threshold it cannot fail (e.g. `min_install_success = 0`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Installed / (installed + failed) among devices that finished, at least this.
    pub min_install_success: Option<f64>,
    /// Inference errors / inferences on the candidate, at most this.
    pub max_error_rate: Option<f64>,
    /// Candidate p99 latency / p99 of the model the same devices ran before, at most this.
    pub max_p99_latency_ratio: Option<f64>,
    /// Largest per-feature PSI against the manifest's baseline, at most this.
    pub max_drift_psi: Option<f64>,
    /// The candidate's accuracy on labelled inputs may fall below the control group's
    /// (devices still on another version of the model, over the same span) by at most
    /// this, at 95 % confidence: fails when it is worse by more, passes when it is not,
    /// no verdict while the labels cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live_accuracy_drop: Option<f64>,
    /// Labels needed on each side (candidate, control) before that gate gives a verdict
    /// (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_labels: Option<u64>,
    /// Inferences needed before the error and latency gates give a verdict.
    pub min_inferences: u64,
    /// What a gate without a verdict (too little data) does once a stage's time is over:
    /// `hold` the stage (the default) or let it `pass`, said so in the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_no_data: Option<OnNoData>,
    /// Replaced by `on_no_data`; `false` is `on_no_data = "pass"`, `true` is `"hold"`.
    /// Still read because rollouts stored before it carry `require_data = false`, and
    /// those keep the behaviour they started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_data: Option<bool>,
}

/// What a gate without a verdict does at the end of a stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoData {
    /// The stage waits until every gate has a verdict.
    #[default]
    Hold,
    /// The stage ends anyway; the event names the gates that had no verdict.
    Pass,
}

impl Gates {
    /// `on_no_data`, or what the older `require_data` meant, or `hold`.
    pub fn no_data_policy(&self) -> OnNoData {
        match (self.on_no_data, self.require_data) {
            (Some(p), _) => p,
            (None, Some(false)) => OnNoData::Pass,
            (None, _) => OnNoData::Hold,
        }
    }
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            min_install_success: Some(0.95),
            max_error_rate: Some(0.02),
            max_p99_latency_ratio: Some(2.0),
            max_drift_psi: None,
            max_live_accuracy_drop: None,
            min_labels: None,
            min_inferences: 100,
            on_no_data: None,
            require_data: None,
        }
    }
}

/// The optional shadow phase run on each wave's devices before activation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowPhase {
    /// Minimum time the candidate runs in shadow on a wave before it may be promoted.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Live inputs compared (summed over the wave) before agreement gives a verdict.
    pub min_compared: u64,
    /// Agreed / compared, at least this.
    pub min_agreement: f64,
    /// Candidate p99 / active p99 on the same inputs, at most this.
    pub max_latency_ratio: Option<f64>,
    /// How many waves, from the first, run the shadow phase (0: every wave). `1`
    /// shadows the canary only.
    pub waves: u32,
}

impl ShadowPhase {
    /// Whether wave `wave` (0-based) runs the shadow phase.
    pub fn covers(&self, wave: usize) -> bool {
        self.waves == 0 || wave < self.waves as usize
    }
}

impl Default for ShadowPhase {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(60),
            min_compared: 50,
            min_agreement: 0.95,
            max_latency_ratio: Some(2.0),
            waves: 0,
        }
    }
}

/// A rollout plan as written by the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// `NAME@X.Y.Z` of a published model.
    pub model: String,
    /// Device selector, e.g. `site=plant-a,arch=aarch64`, or `all` for the whole fleet.
    /// A new rollout needs one; an empty selector (the whole fleet by omission) is only
    /// read back from rollouts stored before this rule.
    #[serde(default)]
    pub selector: String,
    pub waves: Vec<Wave>,
    /// Devices downloading at once (0: no limit).
    #[serde(default = "default_concurrency")]
    pub max_concurrent: u32,
    /// Deploy commands sent per second within a wave, from the wave's first (0: all at
    /// once, within `max_concurrent`). A wave's devices share chunk publishes, so pacing
    /// trades chunk egress for each device's own download time: a broker that delivers F
    /// bytes/s feeds about F / model-size devices per second.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deploys_per_second: f64,
    /// How long a device has to install after being commanded. An online device past it
    /// counts as failed; an offline one is counted apart and picked up when it returns.
    #[serde(with = "humantime_serde", default = "default_deadline")]
    pub device_deadline: Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowPhase>,
    /// Devices that come to match the selector while the rollout runs (enrolled after it
    /// started) join at the current wave at once, instead of waiting for the wave whose
    /// cumulative size reaches their bucket.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late_joiners: bool,
    /// Apply windows (`"Sat 02:00-05:00 Europe/Berlin"`): devices download any time but
    /// switch to the candidate only inside one. Empty: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

fn default_concurrency() -> u32 {
    100
}

fn default_deadline() -> Duration {
    Duration::from_secs(3600)
}

/// Why a plan was refused: every problem found, one per line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid rollout plan:\n  - {}", .0.join("\n  - "))]
pub struct PlanError(pub Vec<String>);

impl Plan {
    /// Parses a TOML plan and validates it.
    pub fn from_toml(text: &str) -> Result<Plan, PlanError> {
        let plan: Plan = toml::from_str(text).map_err(|e| PlanError(vec![e.to_string()]))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Checks every field; reports all problems at once.
    pub fn validate(&self) -> Result<(), PlanError> {
        let mut errs = Vec::new();
        if crate::fleet::parse_model_ref(&self.model).is_err() {
            errs.push(format!("model {:?} must look like NAME@X.Y.Z", self.model));
        }
        if self.selector.trim().is_empty() {
            errs.push(
                "selector is empty: name the devices (e.g. site=plant-a), or give `all` to target the whole fleet"
                    .into(),
            );
        } else if let Err(e) = Selector::parse(&self.selector) {
            errs.push(e);
        }
        if self.waves.is_empty() {
            errs.push("at least one wave is needed, e.g. [[waves]] percent = 100".into());
        }
        let mut last = 0.0f64;
        let mut last_count = 0u64;
        for (i, w) in self.waves.iter().enumerate() {
            let n = i + 1;
            match (w.percent, w.count) {
                (Some(_), Some(_)) => {
                    errs.push(format!("wave {n}: give percent or count, not both"))
                }
                (None, None) => errs.push(format!("wave {n}: give percent or count")),
                (Some(p), None) => {
                    if !(p > 0.0 && p <= 100.0) {
                        errs.push(format!("wave {n}: percent {p} must be in (0, 100]"));
                    } else if p < last {
                        errs.push(format!(
                            "wave {n}: waves are cumulative; {p} % is below the previous {last} %"
                        ));
                    }
                    last = last.max(p);
                }
                (None, Some(c)) => {
                    if c == 0 {
                        errs.push(format!("wave {n}: count must be at least 1"));
                    } else if c < last_count {
                        errs.push(format!(
                            "wave {n}: waves are cumulative; {c} devices is below the previous {last_count}"
                        ));
                    }
                    last_count = last_count.max(c);
                }
            }
        }
        if !(self.deploys_per_second.is_finite() && self.deploys_per_second >= 0.0) {
            errs.push(format!(
                "deploys_per_second = {} must be a number of commands per second, 0 or more \
                 (0: each wave's deploys at once)",
                self.deploys_per_second
            ));
        }
        let g = &self.gates;
        for (name, v) in [
            ("gates.min_install_success", g.min_install_success),
            ("gates.max_error_rate", g.max_error_rate),
            ("gates.max_live_accuracy_drop", g.max_live_accuracy_drop),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    errs.push(format!("{name} = {v} must be between 0 and 1"));
                }
            }
        }
        for (name, v) in [
            ("gates.max_p99_latency_ratio", g.max_p99_latency_ratio),
            ("gates.max_drift_psi", g.max_drift_psi),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    errs.push(format!("{name} = {v} must be a positive number"));
                }
            }
        }
        if g.on_no_data.is_some() && g.require_data.is_some() {
            errs.push(
                "gates.require_data is replaced by gates.on_no_data: keep only on_no_data".into(),
            );
        }
        if let Some(s) = &self.shadow {
            if s.min_compared == 0 {
                errs.push(
                    "shadow.min_compared = 0 would promote on no comparison: give at least 1"
                        .into(),
                );
            }
            if !(0.0..=1.0).contains(&s.min_agreement) {
                errs.push(format!(
                    "shadow.min_agreement = {} must be between 0 and 1",
                    s.min_agreement
                ));
            }
            if let Some(r) = s.max_latency_ratio {
                if !(r.is_finite() && r > 0.0) {
                    errs.push(format!("shadow.max_latency_ratio = {r} must be positive"));
                }
            }
        }
        for w in &self.windows {
            if let Err(e) = super::windows::Window::parse(w) {
                errs.push(e);
            }
        }
        if self.device_deadline.is_zero() {
            errs.push("device_deadline must be longer than zero".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(PlanError(errs))
        }
    }
}

/// The selector for the whole fleet, which must be asked for by name.
pub const ALL: &str = "all";

/// One condition of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Condition {
    key: String,
    negate: bool,
    /// Any of these values matches (`site=a|b`).
    values: Vec<String>,
}

/// Which devices a rollout targets: comma-separated `key=value`, `key!=value` or
/// `key=v1|v2` conditions over device labels and the attributes `id`, `arch`, `os` and
/// `agent_version` (a label of the same name wins). All conditions must hold. `all`
/// (alone) selects every device, as did the empty selector of older plans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Condition>);

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        if s.trim() == ALL {
            return Ok(Selector(Vec::new()));
        }
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == ALL {
                return Err(format!(
                    "selector {s:?}: `all` stands alone (the whole fleet); drop it or the other conditions"
                ));
            }
            let (key, negate, vals) = if let Some((k, v)) = part.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!(
                    "selector condition {part:?} must look like key=value or key!=value"
                ));
            };
            let key = key.trim();
            let values: Vec<String> = vals.split('|').map(|v| v.trim().to_owned()).collect();
            if key.is_empty() || values.iter().any(String::is_empty) {
                return Err(format!(
                    "selector condition {part:?} needs a key and non-empty values"
                ));
            }
            out.push(Condition {
                key: key.to_owned(),
                negate,
                values,
            });
        }
        Ok(Selector(out))
    }

    /// Whether a device with these labels and attributes is selected.
    pub fn matches(
        &self,
        labels: &BTreeMap<String, String>,
        attrs: &[(&str, Option<&str>)],
    ) -> bool {
        self.0.iter().all(|c| {
            let v = labels.get(&c.key).map(String::as_str).or_else(|| {
                attrs
                    .iter()
                    .find(|(k, _)| *k == c.key)
                    .and_then(|(_, v)| *v)
            });
            let hit = v.is_some_and(|v| c.values.iter().any(|x| x == v));
            hit != c.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("pump-0001"), bucket("pump-0001"));
        let mut hist = [0u32; 10];
        for i in 0..10_000 {
            hist[(bucket(&format!("dev-{i}")) / 1000) as usize] += 1;
        }
        // Each decile holds about 1,000 of 10,000 ids.
        assert!(hist.iter().all(|&h| (850..1150).contains(&h)), "{hist:?}");
    }

    #[test]
    fn waves_are_cumulative_and_never_empty() {
        let w = |p: f64| Wave {
            percent: Some(p),
            count: None,
            bake: Duration::ZERO,
        };
        assert_eq!(w(1.0).cumulative(50), 1);
        assert_eq!(w(10.0).cumulative(50), 5);
        assert_eq!(w(50.0).cumulative(51), 26);
        assert_eq!(w(100.0).cumulative(50), 50);
        assert_eq!(w(1.0).cumulative(0), 0);
        let c = Wave {
            percent: None,
            count: Some(500),
            bake: Duration::ZERO,
        };
        assert_eq!(c.cumulative(20), 20);
    }

    #[test]
    fn a_plan_parses_from_toml() {
        let p = Plan::from_toml(
            r#"
model = "pump@1.2.0"
selector = "site=plant-a,arch=aarch64|x86_64"
max_concurrent = 10
device_deadline = "10m"
on_failure = "rollback"
[[waves]]
percent = 1
bake = "5m"
[[waves]]
percent = 100
bake = "1h"
[gates]
max_error_rate = 0.01
min_inferences = 5
on_no_data = "pass"
[shadow]
duration = "30s"
min_compared = 10
min_agreement = 0.9
"#,
        )
        .unwrap();
        assert_eq!(p.on_failure, OnFailure::Rollback);
        assert_eq!(p.waves[1].bake, Duration::from_secs(3600));
        assert_eq!(p.device_deadline, Duration::from_secs(600));
        assert_eq!(p.gates.max_error_rate, Some(0.01));
        assert_eq!(
            p.gates.min_install_success,
            Some(0.95),
            "unset gates keep their defaults"
        );
        assert_eq!(p.shadow.as_ref().unwrap().min_agreement, 0.9);
        assert_eq!(p.gates.no_data_policy(), OnNoData::Pass);
    }

    #[test]
    fn gates_without_data_hold_unless_the_plan_says_pass() {
        let base = "model = \"m@1.0.0\"\nselector = \"all\"\n[[waves]]\npercent = 100\n";
        let policy = |gates: &str| {
            Plan::from_toml(&format!("{base}[gates]\n{gates}"))
                .map(|p| p.gates.no_data_policy())
                .map_err(|e| e.to_string())
        };
        assert_eq!(policy(""), Ok(OnNoData::Hold), "the safe default");
        assert_eq!(policy("on_no_data = \"pass\""), Ok(OnNoData::Pass));
        // Rollouts stored before on_no_data carry require_data and keep their behaviour.
        assert_eq!(policy("require_data = false"), Ok(OnNoData::Pass));
        assert_eq!(policy("require_data = true"), Ok(OnNoData::Hold));
        let both = policy("require_data = false\non_no_data = \"hold\"").unwrap_err();
        assert!(both.contains("keep only on_no_data"), "{both}");
        let bad = policy("on_no_data = \"skip\"").unwrap_err();
        assert!(bad.contains("hold") && bad.contains("pass"), "{bad}");
        let shadow = Plan::from_toml(&format!("{base}[shadow]\nmin_compared = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(shadow.contains("shadow.min_compared"), "{shadow}");
    }

    #[test]
    fn the_documented_example_plan_is_valid() {
        let p = Plan::from_toml(include_str!("../../examples/rollout.toml")).unwrap();
        assert_eq!(p.waves.len(), 4);
        assert_eq!(p.on_failure, OnFailure::Rollback);
        assert!(p.shadow.is_some());
    }

    #[test]
    fn a_bad_plan_reports_every_problem() {
        let e = Plan::from_toml(
            r#"
model = "pump"
selector = "site"
[[waves]]
percent = 50
[[waves]]
percent = 10
count = 3
[[waves]]
percent = 120
[gates]
max_error_rate = 2.0
"#,
        )
        .unwrap_err();
        let text = e.to_string();
        for needle in [
            "NAME@X.Y.Z",
            "key=value",
            "percent or count, not both",
            "(0, 100]",
            "gates.max_error_rate",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        assert!(Plan::from_toml("model = 'a@1'\nwaves = []\nbogus = 1")
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }

    #[test]
    fn selectors_match_labels_and_attributes() {
        let s = Selector::parse("site=plant-a|plant-b, arch=aarch64, tier!=test").unwrap();
        let l = labels(&[("site", "plant-b")]);
        assert!(s.matches(&l, &[("arch", Some("aarch64"))]));
        assert!(!s.matches(&l, &[("arch", Some("x86_64"))]));
        assert!(!s.matches(&l, &[("arch", None)]));
        let test = labels(&[("site", "plant-a"), ("tier", "test")]);
        assert!(!s.matches(&test, &[("arch", Some("aarch64"))]));
        assert!(Selector::parse("").unwrap().matches(&l, &[]));
        assert!(Selector::parse("all").unwrap().matches(&l, &[]));
        assert!(Selector::parse("site=").is_err());
        let e = Selector::parse("all,site=a").unwrap_err();
        assert!(e.contains("stands alone"), "{e}");
    }

    #[test]
    fn the_whole_fleet_needs_selector_all() {
        let e = Plan::from_toml("model = \"m@1.0.0\"\n[[waves]]\npercent = 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("give `all` to target the whole fleet"), "{e}");
        let p =
            Plan::from_toml("model = \"m@1.0.0\"\nselector = \"all\"\n[[waves]]\npercent = 100\n");
        assert!(p.is_ok(), "{p:?}");
    }
}
