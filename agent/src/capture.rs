//! Capture budgets (issue 22): which sampled live inputs the agent keeps for retraining,
//! and how many. Sampling (`telemetry.sample_rate_ppm`) picks candidates; the `[capture]`
//! policy keeps all of them, only low-confidence ones, or only those the shadow candidate
//! disagreed on; per-minute, per-hour and per-day counts and a daily byte budget cap what
//! is kept. Everything refused is counted by reason (`drover_agent_samples_dropped_total`).
//! Pure: the clock comes in as `now_ms`.

use drover_protocol::manifest::{TensorData, TensorValue};
use serde::{Deserialize, Serialize};

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;

/// Which sampled inputs are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// Every sampled input.
    #[default]
    All,
    /// Inputs whose top score is below `low_confidence_below` (models without a float
    /// score output are kept: their confidence is unknown).
    LowConfidence,
    /// Inputs the shadow candidate answered differently from the active model.
    Disagreements,
}

/// The `[capture]` section of the agent config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    pub keep: Keep,
    /// With `keep = "low-confidence"`: the top score below which an input is kept.
    pub low_confidence_below: f32,
    /// Samples kept per clock minute, hour and day; 0: no cap.
    pub per_minute: u32,
    pub per_hour: u32,
    pub per_day: u32,
    /// Bytes of samples (features and prediction, 4 bytes a value) kept per day; 0: no cap.
    pub max_bytes_per_day: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            keep: Keep::All,
            low_confidence_below: 0.6,
            per_minute: 0,
            per_hour: 0,
            per_day: 0,
            max_bytes_per_day: 0,
        }
    }
}

impl CaptureConfig {
    /// Problems with the section, for the config's all-at-once report.
    pub fn check(&self, errors: &mut Vec<String>) {
        if !(self.low_confidence_below > 0.0 && self.low_confidence_below <= 1.0) {
            errors.push("capture.low_confidence_below: must be within (0, 1]".into());
        }
    }
}

/// Why a sampled input was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    Minute,
    Hour,
    Day,
    Bytes,
    /// The telemetry window already holds its maximum of samples.
    Window,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::Minute,
        Dropped::Hour,
        Dropped::Day,
        Dropped::Bytes,
        Dropped::Window,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Minute => "per_minute",
            Dropped::Hour => "per_hour",
            Dropped::Day => "per_day",
            Dropped::Bytes => "max_bytes_per_day",
            Dropped::Window => "window_full",
        }
    }
}

/// Counts kept in the current clock minute, hour and day.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    minute: (u64, u32),
    hour: (u64, u32),
    day: (u64, u32, u64),
}

impl Budget {
    /// Takes one sample of `bytes` from the budget, or says which cap it hit.
    pub fn admit(&mut self, cfg: &CaptureConfig, now_ms: u64, bytes: u64) -> Result<(), Dropped> {
        let (m, h, d) = (now_ms / MINUTE_MS, now_ms / HOUR_MS, now_ms / DAY_MS);
        if self.minute.0 != m {
            self.minute = (m, 0);
        }
        if self.hour.0 != h {
            self.hour = (h, 0);
        }
        if self.day.0 != d {
            self.day = (d, 0, 0);
        }
        let over = |cap: u32, n: u32| cap > 0 && n >= cap;
        if over(cfg.per_minute, self.minute.1) {
            return Err(Dropped::Minute);
        }
        if over(cfg.per_hour, self.hour.1) {
            return Err(Dropped::Hour);
        }
        if over(cfg.per_day, self.day.1) {
            return Err(Dropped::Day);
        }
        if cfg.max_bytes_per_day > 0 && self.day.2.saturating_add(bytes) > cfg.max_bytes_per_day {
            return Err(Dropped::Bytes);
        }
        self.minute.1 += 1;
        self.hour.1 += 1;
        self.day.1 += 1;
        self.day.2 += bytes;
        Ok(())
    }
}

/// Whether the keep policy wants this sampled input: `outputs` are the active model's,
/// `shadow_disagreed` is `Some` when a shadow candidate ran on it.
pub fn wanted(
    cfg: &CaptureConfig,
    outputs: &[TensorValue],
    shadow_disagreed: Option<bool>,
) -> bool {
    match cfg.keep {
        Keep::All => true,
        Keep::Disagreements => shadow_disagreed == Some(true),
        Keep::LowConfidence => top_score(outputs).is_none_or(|s| s < cfg.low_confidence_below),
    }
}

/// The highest score in the first row of the first float output (a lone score `p` is a
/// binary classifier's: its confidence is `max(p, 1 - p)`).
fn top_score(outputs: &[TensorValue]) -> Option<f32> {
    outputs.iter().find_map(|o| match &o.data {
        TensorData::F32(v) if !v.is_empty() => {
            let row = o
                .shape
                .last()
                .map_or(v.len(), |c| (*c as usize).clamp(1, v.len()));
            match &v[..row] {
                // One score is the positive class's probability: confidence is the larger side.
                [p] => Some(p.max(1.0 - p)),
                r => r.iter().copied().reduce(f32::max),
            }
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_minute: u32, per_hour: u32, per_day: u32, bytes: u64) -> CaptureConfig {
        CaptureConfig {
            per_minute,
            per_hour,
            per_day,
            max_bytes_per_day: bytes,
            ..CaptureConfig::default()
        }
    }

    #[test]
    fn each_cap_holds_within_its_clock_period_and_resets_after() {
        let c = cfg(2, 3, 4, 0);
        let mut b = Budget::default();
        let t = 10 * DAY_MS;
        assert_eq!(b.admit(&c, t, 10), Ok(()));
        assert_eq!(b.admit(&c, t + 1, 10), Ok(()));
        assert_eq!(b.admit(&c, t + 2, 10), Err(Dropped::Minute));
        assert_eq!(b.admit(&c, t + MINUTE_MS, 10), Ok(()));
        assert_eq!(b.admit(&c, t + 2 * MINUTE_MS, 10), Err(Dropped::Hour));
        assert_eq!(b.admit(&c, t + HOUR_MS, 10), Ok(()));
        assert_eq!(b.admit(&c, t + 2 * HOUR_MS, 10), Err(Dropped::Day));
        assert_eq!(b.admit(&c, t + DAY_MS, 10), Ok(()));
        // No caps: everything is kept.
        let mut free = Budget::default();
        let none = CaptureConfig::default();
        assert!((0..10_000).all(|i| free.admit(&none, t + i, 1 << 20).is_ok()));
    }

    #[test]
    fn the_daily_byte_budget_refuses_what_would_go_over() {
        let c = cfg(0, 0, 0, 100);
        let mut b = Budget::default();
        assert_eq!(b.admit(&c, 5, 60), Ok(()));
        assert_eq!(b.admit(&c, 6, 60), Err(Dropped::Bytes));
        // A smaller one still fits; the refused one took nothing.
        assert_eq!(b.admit(&c, 7, 40), Ok(()));
        assert_eq!(b.admit(&c, DAY_MS + 1, 60), Ok(()));
    }

    fn scores(v: &[f32]) -> Vec<TensorValue> {
        vec![TensorValue {
            name: "p".into(),
            shape: vec![1, v.len() as u64],
            data: TensorData::F32(v.to_vec()),
        }]
    }

    #[test]
    fn the_keep_policy_picks_low_confidence_or_disagreements() {
        let low = CaptureConfig {
            keep: Keep::LowConfidence,
            ..CaptureConfig::default()
        };
        assert!(wanted(&low, &scores(&[0.45, 0.55]), None));
        assert!(!wanted(&low, &scores(&[0.1, 0.9]), None));
        // A lone probability of 0.05 is a confident "no", 0.5 is not.
        assert!(!wanted(&low, &scores(&[0.05]), None));
        assert!(wanted(&low, &scores(&[0.5]), None));
        let labels = vec![TensorValue {
            name: "label".into(),
            shape: vec![1],
            data: TensorData::I64(vec![1]),
        }];
        assert!(
            wanted(&low, &labels, None),
            "no score: confidence unknown, kept"
        );
        let dis = CaptureConfig {
            keep: Keep::Disagreements,
            ..CaptureConfig::default()
        };
        assert!(wanted(&dis, &scores(&[0.1, 0.9]), Some(true)));
        assert!(!wanted(&dis, &scores(&[0.1, 0.9]), Some(false)));
        assert!(!wanted(&dis, &scores(&[0.1, 0.9]), None), "no shadow ran");
        assert!(wanted(&CaptureConfig::default(), &scores(&[0.9]), None));
    }
}
