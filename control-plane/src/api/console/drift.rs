//! Drift: every scope's latest level, and one scope's scores per feature over time with
//! its alert windows marked, naming the model (and so the baseline) they were scored
//! against.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::html::{badge, esc, link, num, table, url};
use super::svg::{self, Chart, Series};
use super::{page, read, respond, ConsoleState, Fail, Nav};
use crate::store::{DriftLevel, DriftScoreRow};

#[derive(Deserialize)]
pub struct DriftQuery {
    scope: Option<String>,
}

/// Score rows a scope's charts read (newest first from the store).
const HISTORY_ROWS: u32 = 5000;

async fn page_handler(
    st: ConsoleState,
    user: super::User,
    headers: HeaderMap,
    scope: Option<String>,
) -> Result<Response, Fail> {
    let sc = scope.clone();
    let (status, history, models) = read(&st, move |s| {
        let history = match &sc {
            Some(scope) => s.drift_history(Some(scope), 0, HISTORY_ROWS)?,
            None => Vec::new(),
        };
        Ok((s.drift_status()?, history, model_names(s)?))
    })
    .await?;
    let model_cell = |digest: &str| match models.get(digest).and_then(|m| m.split_once('@')) {
        Some((n, v)) => link(
            &format!("/console/models/{}/{}", url(n), url(v)),
            &format!("{n}@{v}"),
        ),
        None => esc(&digest[..digest.len().min(16)]),
    };
    let mut h = String::from(
        "<section id=\"drift-status\" data-live aria-labelledby=\"status-h\"><h2 id=\"status-h\">Latest window per scope</h2>",
    );
    let mut worst: BTreeMap<(String, String), (DriftLevel, u64, usize)> = BTreeMap::new();
    for r in &status {
        let e = worst
            .entry((r.scope.clone(), r.model_digest.clone()))
            .or_insert((DriftLevel::Ok, r.window_end_ms, 0));
        e.0 = e.0.max(r.level);
        e.2 += 1;
    }
    let rows: Vec<Vec<String>> = worst
        .iter()
        .map(|((scope, digest), (level, end, n))| {
            vec![
                link(&format!("/console/drift?scope={}", url(scope)), scope),
                model_cell(digest),
                badge(level.as_str()),
                n.to_string(),
                super::html::time(*end),
            ]
        })
        .collect();
    h.push_str(&table(
        "Drift by scope (worst feature of the latest window)",
        &[
            "scope",
            "model (baseline)",
            "level",
            "features",
            "window end",
        ],
        &rows,
    ));
    h.push_str("</section>");
    if let Some(scope) = &scope {
        h.push_str(&format!(
            "<section id=\"drift-scope\" data-live aria-labelledby=\"scope-h\"><h2 id=\"scope-h\">Scope {}</h2>",
            esc(scope)
        ));
        let digests: Vec<&str> = {
            let mut d: Vec<&str> = history.iter().map(|r| r.model_digest.as_str()).collect();
            d.sort_unstable();
            d.dedup();
            d
        };
        for d in digests {
            h.push_str(&format!(
                "<p>Scored against the baseline of {}.</p>",
                model_cell(d)
            ));
        }
        h.push_str(&feature_charts("drift", &history, &models));
        h.push_str("</section>");
    }
    let title = match &scope {
        Some(s) => format!("Drift: {s}"),
        None => "Drift".into(),
    };
    Ok(respond(&headers, page(Nav::Drift, &user, &title, &h)))
}

pub async fn show(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
    Query(q): Query<DriftQuery>,
) -> Result<Response, Fail> {
    page_handler(st, user, headers, q.scope.filter(|s| !s.is_empty())).await
}

/// Every published model's `name@version` by manifest digest (hex).
pub fn model_names(s: &crate::store::Store) -> Result<HashMap<String, String>, Fail> {
    Ok(s.models()?
        .into_iter()
        .map(|m| {
            (
                drover_protocol::topics::hex32(&m.digest),
                format!("{}@{}", m.name, m.version),
            )
        })
        .collect())
}

/// One chart per feature: PSI per window, alert windows marked.
/// `models` names a manifest digest (hex) `name@version`.
pub fn feature_charts(
    id_prefix: &str,
    rows: &[DriftScoreRow],
    models: &HashMap<String, String>,
) -> String {
    let mut by_feature: BTreeMap<&str, Vec<&DriftScoreRow>> = BTreeMap::new();
    for r in rows {
        by_feature.entry(r.feature.as_str()).or_default().push(r);
    }
    let mut out = String::new();
    for (k, (feature, mut rs)) in by_feature.into_iter().enumerate() {
        rs.sort_by_key(|r| r.window_end_ms);
        let marked = rs
            .iter()
            .filter(|r| r.level == DriftLevel::Alert)
            .map(|r| (r.window_start_ms, r.window_end_ms))
            .collect();
        let latest = rs.last().map(|r| (r.level, r.psi, r.p_value));
        // One line per model scored: each against its own baseline.
        let mut by_model: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
        for r in &rs {
            if let Some(p) = r.psi {
                by_model
                    .entry(r.model_digest.as_str())
                    .or_default()
                    .push((r.window_end_ms, p));
            }
        }
        let c = Chart {
            id: format!("{id_prefix}-{k}"),
            title: format!("Drift of {feature}"),
            unit: "PSI".into(),
            series: by_model
                .into_iter()
                .map(|(digest, points)| Series {
                    name: models
                        .get(digest)
                        .cloned()
                        .unwrap_or_else(|| digest[..digest.len().min(12)].to_owned()),
                    points,
                })
                .collect(),
            threshold: None,
            marked,
        };
        out.push_str(&svg::render(&c));
        if let Some((level, psi, p)) = latest {
            out.push_str(&format!(
                "<p>Latest: {} PSI {} p-value {}</p>",
                badge(level.as_str()),
                psi.map_or("—".into(), num),
                p.map_or("—".into(), num)
            ));
        }
    }
    if out.is_empty() {
        out.push_str("<p>No drift scores for this scope yet.</p>");
    }
    out
}
