//! The fleet overview (one page of devices, filtered and counted in SQL) and the device
//! page (models, phases, telemetry and drift charts).

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use drover_protocol::messages::LATENCY_BUCKETS_US;

use super::html::{self, ago, badge, esc, link, opt, table, url};
use super::svg::{self, Chart, Series};
use super::{page, read, respond, ConsoleState, Fail, Nav};
use crate::store::{ConsoleDevicePage, ConsoleDeviceQuery, ConsoleTelemetryRow, DeviceRow};

/// Devices per overview page.
pub const PAGE_SIZE: u32 = 50;

#[derive(Clone, Debug, Default, Deserialize)]
pub struct OverviewQuery {
    #[serde(default)]
    pub q: String,
    /// `key=value`.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub page: Option<u64>,
}

impl OverviewQuery {
    fn store_query(&self) -> ConsoleDeviceQuery {
        let page = self.page.unwrap_or(1).max(1);
        ConsoleDeviceQuery {
            search: Some(self.q.trim().to_owned()).filter(|s| !s.is_empty()),
            label: self
                .label
                .split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())),
            state: Some(self.state.clone()).filter(|s| !s.is_empty()),
            model: Some(self.model.clone()).filter(|s| !s.is_empty()),
            offset: (page - 1).saturating_mul(u64::from(PAGE_SIZE)),
            limit: PAGE_SIZE,
        }
    }

    /// The query string with `page` replaced.
    fn with_page(&self, page: u64) -> String {
        format!(
            "/console?q={}&label={}&state={}&model={}&page={page}",
            url(&self.q),
            url(&self.label),
            url(&self.state),
            url(&self.model)
        )
    }
}

pub async fn overview(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
    Query(q): Query<OverviewQuery>,
) -> Result<Response, Fail> {
    let sq = q.store_query();
    let p = read(&st, move |s| Ok(s.console_devices(&sq)?)).await?;
    let now = st.api.app.clock.unix_ms();
    Ok(respond(
        &headers,
        page(Nav::Fleet, &user, "Fleet", &render_overview(&q, &p, now)),
    ))
}

/// The overview's `<main>` content (public for the benchmark's page weight).
pub fn render_overview(q: &OverviewQuery, p: &ConsoleDevicePage, now_ms: u64) -> String {
    let mut h = String::with_capacity(64 * 1024);
    let states = ["", "online", "offline", "decommissioned"];
    let _ = write!(
        h,
        "<form class=\"filters\" method=\"get\" action=\"/console\" role=\"search\">\
         <label for=\"f-q\">Device id contains</label><input id=\"f-q\" name=\"q\" value=\"{}\">\
         <label for=\"f-label\">Label (key=value)</label><input id=\"f-label\" name=\"label\" value=\"{}\" placeholder=\"site=plant-a\">\
         <label for=\"f-state\">State</label><select id=\"f-state\" name=\"state\">",
        esc(&q.q),
        esc(&q.label)
    );
    for s in states {
        let sel = if s == q.state { " selected" } else { "" };
        let text = if s.is_empty() { "any" } else { s };
        let _ = write!(h, "<option value=\"{s}\"{sel}>{text}</option>");
    }
    let _ = write!(
        h,
        "</select><label for=\"f-model\">Active model</label><input id=\"f-model\" name=\"model\" value=\"{}\" placeholder=\"name@version\">\
         <button type=\"submit\">Filter</button></form>",
        esc(&q.model)
    );
    h.push_str("<section id=\"fleet-counts\" data-live aria-labelledby=\"counts-h\"><h2 id=\"counts-h\">Counts</h2><div class=\"counts\">");
    let count_rows = |rows: &[(String, u64)], key: &str| -> Vec<Vec<String>> {
        rows.iter()
            .map(|(k, n)| {
                let shown = if k.is_empty() { "(none)" } else { k.as_str() };
                let filter = match key {
                    "site" => format!("/console?label={}", url(&format!("site={k}"))),
                    "state" => format!("/console?state={}", url(k)),
                    _ => format!("/console?model={}", url(k)),
                };
                let cell = if key == "state" {
                    format!("<a href=\"{}\">{}</a>", esc(&filter), badge(shown))
                } else {
                    link(&filter, shown)
                };
                vec![cell, n.to_string()]
            })
            .collect()
    };
    h.push_str(&table(
        "Devices by site",
        &["site", "devices"],
        &count_rows(&p.by_site, "site"),
    ));
    h.push_str(&table(
        "Devices by state",
        &["state", "devices"],
        &count_rows(&p.by_state, "state"),
    ));
    h.push_str(&table(
        "Devices by active model",
        &["model", "devices"],
        &count_rows(&p.by_model, "model"),
    ));
    h.push_str("</div></section>");
    let page = q.page.unwrap_or(1).max(1);
    let pages = p.total.div_ceil(u64::from(PAGE_SIZE)).max(1);
    let rows: Vec<Vec<String>> = p.devices.iter().map(|d| device_cells(d, now_ms)).collect();
    let _ = write!(
        h,
        "<section id=\"fleet-devices\" data-live aria-labelledby=\"devices-h\"><h2 id=\"devices-h\">Devices</h2>\
         <p>{} devices match; page {page} of {pages}.</p>",
        p.total
    );
    h.push_str(&table(
        &format!("Devices, page {page} of {pages}"),
        &[
            "device",
            "site",
            "state",
            "active model",
            "phase",
            "labels",
            "last seen",
        ],
        &rows,
    ));
    h.push_str("<nav aria-label=\"Pages\" class=\"pager\">");
    if page > 1 {
        let _ = write!(
            h,
            "<a rel=\"prev\" href=\"{}\">← previous</a> ",
            esc(&q.with_page(page - 1))
        );
    }
    if page < pages {
        let _ = write!(
            h,
            "<a rel=\"next\" href=\"{}\">next →</a>",
            esc(&q.with_page(page + 1))
        );
    }
    h.push_str("</nav></section>");
    h
}

fn state_of(d: &DeviceRow) -> &'static str {
    if d.decommissioned {
        "decommissioned"
    } else if d.online {
        "online"
    } else {
        "offline"
    }
}

fn device_cells(d: &DeviceRow, now_ms: u64) -> Vec<String> {
    let labels: Vec<String> = d
        .labels
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect();
    vec![
        link(&format!("/console/devices/{}", url(&d.id)), &d.id),
        opt(d.labels.get("site").map(String::as_str)),
        badge(state_of(d)),
        opt(d.active_model.as_deref()),
        opt(d.last_phase.as_deref()),
        labels.join(", "),
        d.last_seen_ms.map_or("never".into(), |t| {
            format!("{} ({})", html::time(t), ago(t, now_ms))
        }),
    ]
}

/// Telemetry windows the device page charts.
const CHART_WINDOWS: u32 = 120;

pub async fn device(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let i = id.clone();
    let (row, slots, tele, drift, names) = read(&st, move |s| {
        let scope = crate::drift::scope_device(&i);
        Ok((
            s.device(&i)?,
            s.device_slots(&i)?,
            s.console_telemetry(&i, CHART_WINDOWS)?,
            s.drift_history(Some(&scope), 0, 2000)?,
            super::drift::model_names(s)?,
        ))
    })
    .await?;
    let Some(d) = row else {
        return Err(Fail(
            axum::http::StatusCode::NOT_FOUND,
            format!("No device {id:?}: check the id on the fleet page."),
        ));
    };
    let now = st.api.app.clock.unix_ms();
    let mut h = String::new();
    let facts = vec![
        vec!["state".into(), badge(state_of(&d))],
        vec![
            "last seen".into(),
            d.last_seen_ms.map_or("never".into(), |t| {
                format!("{} ({})", html::time(t), ago(t, now))
            }),
        ],
        vec![
            "labels".into(),
            d.labels
                .iter()
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect::<Vec<_>>()
                .join(", "),
        ],
        vec![
            "agent labels".into(),
            d.agent_labels
                .iter()
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect::<Vec<_>>()
                .join(", "),
        ],
        vec![
            "agent".into(),
            format!(
                "{} on {} {}",
                opt(d.agent_version.as_deref()),
                opt(d.os.as_deref()),
                opt(d.arch.as_deref())
            ),
        ],
        vec!["enrolled".into(), html::time(d.enrolled_at_ms)],
        vec!["last command".into(), d.reported_command_seq.to_string()],
    ];
    h.push_str("<section id=\"device-facts\" data-live aria-labelledby=\"facts-h\"><h2 id=\"facts-h\">Device</h2>");
    h.push_str(&table("Facts", &["fact", "value"], &facts));
    h.push_str("</section><section id=\"device-models\" data-live aria-labelledby=\"models-h\"><h2 id=\"models-h\">Models</h2>");
    h.push_str(&models_table(&d, &slots));
    h.push_str("</section><section id=\"device-charts\" data-live aria-labelledby=\"charts-h\"><h2 id=\"charts-h\">Telemetry</h2>");
    for c in telemetry_charts(&tele) {
        h.push_str(&svg::render(&c));
    }
    h.push_str(&super::drift::feature_charts(
        "device-drift",
        &drift,
        &names,
    ));
    h.push_str("</section>");
    Ok(respond(
        &headers,
        page(Nav::Fleet, &user, &format!("Device {id}"), &h),
    ))
}

/// One row per model slot the device reported (protocol 2); a protocol 1 device's one
/// model from its row. New slot fields become columns here.
fn models_table(d: &DeviceRow, slots: &[crate::store::SlotRow]) -> String {
    let model_link = |m: Option<&str>| match m.and_then(|m| m.split_once('@')) {
        Some((n, v)) => link(
            &format!("/console/models/{}/{}", url(n), url(v)),
            &format!("{n}@{v}"),
        ),
        None => opt(m),
    };
    let rows: Vec<Vec<String>> = if slots.is_empty() {
        vec![vec![
            "(default)".into(),
            model_link(d.active_model.as_deref()),
            model_link(d.staged_model.as_deref()),
            "—".into(),
            d.last_phase.as_deref().map_or("—".into(), badge),
            opt(d.last_detail.as_deref()),
        ]]
    } else {
        slots
            .iter()
            .map(|s| {
                vec![
                    esc(&s.name),
                    model_link(s.active.as_deref()),
                    model_link(s.staged.as_deref()),
                    model_link(s.shadow.as_deref()),
                    badge(&crate::api::SlotView::from(s.clone()).phase),
                    format!("previous {}", opt(s.previous.as_deref())),
                ]
            })
            .collect()
    };
    table(
        "Model slots",
        &["slot", "active", "staged", "shadow", "phase", "detail"],
        &rows,
    )
}

fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            let us = LATENCY_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX);
            // The overflow bucket has no upper bound: show the last finite one.
            let us = if us == u64::MAX {
                LATENCY_BUCKETS_US[LATENCY_BUCKETS_US.len() - 2]
            } else {
                us
            };
            return Some(us as f64 / 1000.0);
        }
    }
    None
}

fn telemetry_charts(t: &[ConsoleTelemetryRow]) -> Vec<Chart> {
    let pts = |f: &dyn Fn(&ConsoleTelemetryRow) -> Option<f64>| -> Vec<(u64, f64)> {
        t.iter()
            .filter_map(|r| f(r).map(|v| (r.window_end_ms, v)))
            .collect()
    };
    let series = |name: &str, points| Series {
        name: name.into(),
        points,
    };
    let chart = |id: &str, title: &str, unit: &str, series| Chart {
        id: id.into(),
        title: title.into(),
        unit: unit.into(),
        series,
        threshold: None,
        marked: vec![],
    };
    vec![
        chart(
            "chart-latency",
            "Inference latency (bucket upper bound)",
            "ms",
            vec![
                series("p50", pts(&|r| quantile_ms(&r.latency_counts, 0.5))),
                series("p99", pts(&|r| quantile_ms(&r.latency_counts, 0.99))),
            ],
        ),
        chart(
            "chart-errors",
            "Errors per window",
            "errors",
            vec![
                series("errors", pts(&|r| Some(r.errors as f64))),
                series("inferences", pts(&|r| Some(r.inferences as f64))),
            ],
        ),
        chart(
            "chart-host",
            "Host CPU and memory",
            "%",
            vec![
                series(
                    "CPU",
                    pts(&|r| (r.cpu_percent >= 0.0).then_some(r.cpu_percent)),
                ),
                series(
                    "memory",
                    pts(&|r| {
                        (r.mem_total_bytes > 0)
                            .then(|| r.mem_used_bytes as f64 / r.mem_total_bytes as f64 * 100.0)
                    }),
                ),
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_read_the_histogram_buckets() {
        let mut c = vec![0u64; LATENCY_BUCKETS_US.len()];
        c[0] = 99;
        c[5] = 1;
        assert_eq!(
            quantile_ms(&c, 0.5),
            Some(LATENCY_BUCKETS_US[0] as f64 / 1000.0)
        );
        assert_eq!(
            quantile_ms(&c, 0.999),
            Some(LATENCY_BUCKETS_US[5] as f64 / 1000.0)
        );
        assert_eq!(quantile_ms(&[0; 3], 0.5), None);
    }
}
