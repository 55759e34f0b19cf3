//! The drift windows the server scored since the traffic started: printed as they arrive,
//! then summarised per site for the report.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::bail;
use drover_control_plane::api::ModelView;
use drover_control_plane::api::ScoreView as Score;

use super::report::{DriftRow, Report};
use super::watch::version_of;
use super::{SITES, WAIT};
use crate::client::Client;

/// The drift windows scored since the traffic started, printed as they arrive.
pub(super) struct DriftLog {
    since_ms: u64,
    scores: Vec<Score>,
    seen: BTreeSet<u64>,
    /// Model digest (hex) → `name@version`.
    models: BTreeMap<String, String>,
}

impl DriftLog {
    pub(super) async fn new(client: &Client, since_ms: u64) -> anyhow::Result<Self> {
        let mut d = DriftLog {
            since_ms,
            scores: Vec::new(),
            seen: BTreeSet::new(),
            models: BTreeMap::new(),
        };
        d.refresh_models(client).await?;
        Ok(d)
    }

    async fn refresh_models(&mut self, client: &Client) -> anyhow::Result<()> {
        let l: Vec<ModelView> = client.get("/v1/models").await?;
        self.models = l
            .into_iter()
            .map(|m| (m.digest.clone(), format!("{}@{}", m.name, m.version)))
            .collect();
        Ok(())
    }

    fn model(&self, digest: &str) -> String {
        self.models
            .get(digest)
            .cloned()
            .unwrap_or_else(|| digest.chars().take(12).collect())
    }

    /// Windows scored so far with sketches of `model` at every site.
    pub(super) fn windows_for(&self, model: &str) -> usize {
        let mut per: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
        for s in &self.scores {
            if self.model(&s.model_digest) == model {
                if let Some(site) = s.scope.strip_prefix("site=") {
                    per.entry(s.window_end_ms).or_default().insert(site);
                }
            }
        }
        per.values().filter(|s| s.len() == SITES.len()).count()
    }

    /// The level of the latest window scored for `site` with `model` (`name@version`).
    pub(super) fn latest_level(&self, site: &str, model: &str) -> Option<String> {
        let end = self
            .scores
            .iter()
            .filter(|s| s.scope == format!("site={site}") && self.model(&s.model_digest) == model)
            .map(|s| s.window_end_ms)
            .max()?;
        site_rows(&self.scores, end, |d| self.model(d))
            .into_iter()
            .find(|r| r.site == site && r.model == model)
            .map(|r| r.level)
    }

    /// Fetches new windows and prints one line per window and site.
    pub(super) async fn poll(&mut self, client: &Client) -> anyhow::Result<()> {
        let all: Vec<Score> = client
            .get(&format!(
                "/v1/drift/history?since_ms={}&limit=100000",
                self.since_ms
            ))
            .await?;
        if all
            .iter()
            .any(|s| !self.models.contains_key(&s.model_digest))
        {
            self.refresh_models(client).await?;
        }
        let new_ends: BTreeSet<u64> = all
            .iter()
            .map(|s| s.window_end_ms)
            .filter(|e| !self.seen.contains(e))
            .collect();
        self.scores = all;
        for end in new_ends {
            self.seen.insert(end);
            let rows = site_rows(&self.scores, end, |d| self.model(d));
            let line: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} ({}) PSI {:.2} {}",
                        r.site,
                        version_of(&r.model),
                        r.max_psi,
                        r.level.to_uppercase()
                    )
                })
                .collect();
            if !line.is_empty() {
                println!(
                    "  drift window +{:>3.0} s: {}",
                    end.saturating_sub(self.since_ms) as f64 / 1000.0,
                    line.join(" · ")
                );
            }
        }
        Ok(())
    }

    pub(super) async fn until(
        &mut self,
        client: &Client,
        done: impl Fn(&Self) -> bool,
        what: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll(client).await?;
            if done(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("waited {WAIT:?} for {what}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The drift part of the report: per window and site; which sites and devices
    /// alerted against the first model.
    pub(super) fn fill(
        &self,
        report: &mut Report,
        site_of: &BTreeMap<String, String>,
        first: &str,
    ) {
        let ends: BTreeSet<u64> = self.scores.iter().map(|s| s.window_end_ms).collect();
        for end in ends {
            report
                .drift_windows
                .extend(site_rows(&self.scores, end, |d| self.model(d)));
        }
        let mut sites = BTreeSet::new();
        let mut devices: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for s in &self.scores {
            if s.level != "alert" || self.model(&s.model_digest) != first {
                continue;
            }
            if let Some(site) = s.scope.strip_prefix("site=") {
                sites.insert(site.to_owned());
            }
            if let Some(site) = s.scope.strip_prefix("device:").and_then(|d| site_of.get(d)) {
                devices.entry(site.clone()).or_default().insert(&s.scope);
            }
        }
        report.alerting_sites = sites.into_iter().collect();
        for site in SITES {
            report
                .alerting_devices
                .insert(site.into(), devices.get(site).map_or(0, BTreeSet::len));
        }
    }
}

/// One row per (site, model) for the window ending at `end`: the largest PSI over its
/// features and the worst level.
fn site_rows(scores: &[Score], end: u64, model: impl Fn(&str) -> String) -> Vec<DriftRow> {
    let mut rows: BTreeMap<(String, String), DriftRow> = BTreeMap::new();
    for s in scores.iter().filter(|s| s.window_end_ms == end) {
        let Some(site) = s.scope.strip_prefix("site=") else {
            continue;
        };
        let m = model(&s.model_digest);
        let r = rows
            .entry((site.to_owned(), m.clone()))
            .or_insert_with(|| DriftRow {
                window_end_ms: end,
                site: site.to_owned(),
                model: m,
                max_psi: 0.0,
                feature: String::new(),
                level: "ok".into(),
            });
        if let Some(p) = s.psi {
            if p > r.max_psi || r.feature.is_empty() {
                r.max_psi = p.max(r.max_psi);
                r.feature = s.feature.clone();
            }
        }
        if s.level.as_str() == "alert" || (s.level.as_str() == "warn" && r.level == "ok") {
            r.level = s.level.as_str().into();
        }
    }
    rows.into_values().collect()
}
