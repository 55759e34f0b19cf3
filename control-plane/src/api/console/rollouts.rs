//! Rollouts: the list (with a start form for deployers), the live detail (waves, gates
//! against thresholds over time, events, who did what) and pause/resume/abort.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::html::{self, badge, esc, link, num, opt, table, url};
use super::session::User;
use super::svg::{self, Chart, Series};
use super::{page, read, respond, ConsoleState, Fail, Nav};
use crate::access::required_role;
use crate::api::{EventView, RolloutView};

pub async fn list(
    State(st): State<ConsoleState>,
    user: User,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let all = read(&st, |s| {
        crate::rollout::driver::list(s).map_err(|e| Fail::from(crate::api::ApiError::from(e)))
    })
    .await?;
    let rows: Vec<Vec<String>> = all
        .iter()
        .rev()
        .map(|r| {
            let v = RolloutView::from_state(r, false);
            let healthy: u64 = v.waves.iter().map(|w| w.healthy).sum();
            vec![
                link(
                    &format!("/console/rollouts/{}", v.id),
                    &format!("#{}", v.id),
                ),
                esc(&v.model),
                esc(&v.selector),
                badge(&v.status),
                format!("{} of {}", v.wave, v.waves.len()),
                format!("{healthy} of {} healthy", v.selected),
                html::time(v.updated_at_ms),
            ]
        })
        .collect();
    let mut h = String::from("<section id=\"rollout-list\" data-live aria-labelledby=\"list-h\"><h2 id=\"list-h\">All rollouts</h2>");
    h.push_str(&table(
        "Rollouts, newest first",
        &[
            "rollout", "model", "selector", "status", "wave", "devices", "updated",
        ],
        &rows,
    ));
    h.push_str("</section>");
    if user.identity.role >= required_role(&Method::POST, "/v1/rollouts") {
        let _ = write!(
            h,
            "<section aria-labelledby=\"start-h\"><h2 id=\"start-h\">Start a rollout</h2>\
             <form method=\"post\" action=\"/console/rollouts\" data-confirm=\"Start this rollout?\">{}\
             <label for=\"plan\">Plan (TOML, as for <code>drover rollout start --plan</code>)</label>\
             <textarea id=\"plan\" name=\"plan\" rows=\"10\" required>model = \"NAME@VERSION\"\nselector = \"all\"\n\n[[waves]]\npercent = 10\nbake = \"10m\"\n\n[[waves]]\npercent = 100\nbake = \"10m\"\n</textarea>\
             <input type=\"hidden\" name=\"confirmed\" value=\"\">\
             <button type=\"submit\">Start rollout</button></form></section>",
            user.csrf_field()
        );
    }
    Ok(respond(
        &headers,
        page(Nav::Rollouts, &user, "Rollouts", &h),
    ))
}

pub async fn detail(
    State(st): State<ConsoleState>,
    user: User,
    headers: HeaderMap,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Response, Fail> {
    let Path(id) = id.map_err(crate::api::ApiError::from)?;
    let (r, events) = read(&st, move |s| {
        let f = |e| Fail::from(crate::api::ApiError::from(e));
        Ok((
            crate::rollout::driver::load(s, id).map_err(f)?,
            crate::rollout::driver::events(s, id).map_err(f)?,
        ))
    })
    .await?;
    let Some(r) = r else {
        return Err(Fail(StatusCode::NOT_FOUND, format!("No rollout {id}.")));
    };
    let v = RolloutView::from_state(&r, false);
    let events: Vec<EventView> = events.iter().map(EventView::from).collect();
    let h = render_detail(&v, &events, &user);
    Ok(respond(
        &headers,
        page(Nav::Rollouts, &user, &format!("Rollout #{id}"), &h),
    ))
}

fn render_detail(v: &RolloutView, events: &[EventView], user: &User) -> String {
    let mut h = format!(
        "<section id=\"rollout-status\" data-live aria-live=\"polite\" aria-labelledby=\"status-h\">\
         <h2 id=\"status-h\">Status</h2><p class=\"status\">Status: <span data-status=\"{}\">{}</span>{}</p>",
        esc(&v.status),
        badge(&v.status),
        v.reason
            .as_deref()
            .map_or(String::new(), |r| format!(" — {}", esc(r)))
    );
    let facts = vec![
        vec!["model".into(), model_link(&v.model)],
        vec!["selector".into(), esc(&v.selector)],
        vec![
            "wave".into(),
            format!("{} of {} ({})", v.wave, v.waves.len(), esc(&v.stage)),
        ],
        vec!["stage since".into(), html::time(v.stage_since_ms)],
        vec![
            "stage ends".into(),
            v.stage_ends_ms.map_or("—".into(), html::time),
        ],
        vec!["waiting".into(), opt(v.waiting.as_deref())],
        vec!["selected devices".into(), v.selected.to_string()],
        vec!["started".into(), html::time(v.created_at_ms)],
    ];
    h.push_str(&table("Rollout", &["field", "value"], &facts));
    h.push_str(&actions(v, user));
    let waves: Vec<Vec<String>> = v
        .waves
        .iter()
        .map(|w| {
            let mark = if w.wave == v.wave { " (current)" } else { "" };
            vec![
                format!("{}{mark}", w.wave),
                w.target.to_string(),
                w.assigned.to_string(),
                w.healthy.to_string(),
                w.in_flight.to_string(),
                w.failed.to_string(),
                esc(&w.bake),
            ]
        })
        .collect();
    h.push_str(&table(
        "Waves (cumulative targets)",
        &[
            "wave",
            "target",
            "assigned",
            "healthy",
            "in flight",
            "failed",
            "bake",
        ],
        &waves,
    ));
    let gates: Vec<Vec<String>> = v
        .gates
        .iter()
        .map(|g| {
            vec![
                esc(&g.gate),
                g.value.map_or("—".into(), num),
                esc(&g.threshold),
                badge(verdict(g.verdict)),
                esc(&g.basis),
                opt(g.reason.as_deref()),
            ]
        })
        .collect();
    h.push_str(&table(
        "Gates now",
        &[
            "gate",
            "value",
            "threshold",
            "verdict",
            "basis",
            "why no verdict",
        ],
        &gates,
    ));
    h.push_str("</section><section id=\"rollout-gates\" data-live aria-labelledby=\"gates-h\"><h2 id=\"gates-h\">Gate values over time</h2>");
    for c in gate_charts(events) {
        h.push_str(&svg::render(&c));
    }
    h.push_str("</section><section id=\"rollout-events\" data-live aria-labelledby=\"events-h\"><h2 id=\"events-h\">Events</h2>");
    let rows: Vec<Vec<String>> = events
        .iter()
        .rev()
        .map(|e| vec![html::time(e.at_ms), badge(&e.kind), esc(&e.detail)])
        .collect();
    h.push_str(&table(
        "Events, newest first (who paused, resumed or aborted is in the detail)",
        &["at", "event", "detail"],
        &rows,
    ));
    h.push_str("</section>");
    h
}

fn verdict(v: crate::api::VerdictView) -> &'static str {
    match v {
        crate::api::VerdictView::Pass => "pass",
        crate::api::VerdictView::Fail => "fail",
        crate::api::VerdictView::NoData => "no-data",
    }
}

fn model_link(m: &str) -> String {
    match m.split_once('@') {
        Some((n, v)) => link(&format!("/console/models/{}/{}", url(n), url(v)), m),
        None => esc(m),
    }
}

/// The forms a user may send for this rollout: none for a viewer.
fn actions(v: &RolloutView, user: &User) -> String {
    if user.identity.role < required_role(&Method::POST, "/v1/rollouts/{id}/{op}") {
        return String::new();
    }
    let ops: &[(&str, &str)] = match v.status.as_str() {
        "running" => &[("pause", "Pause"), ("abort", "Abort")],
        "paused" => &[("resume", "Resume"), ("abort", "Abort")],
        "completed" => &[("abort", "Abort (roll back)")],
        _ => &[],
    };
    let mut h =
        String::from("<div class=\"actions\" role=\"group\" aria-label=\"Rollout actions\">");
    for (op, label) in ops {
        let _ = write!(
            h,
            "<form method=\"post\" action=\"/console/rollouts/{id}/{op}\" data-confirm=\"{label} rollout #{id}?\">{}\
             <input type=\"hidden\" name=\"confirmed\" value=\"\"><button type=\"submit\" data-op=\"{op}\">{label}</button></form>",
            user.csrf_field(),
            id = v.id,
        );
    }
    h.push_str("</div>");
    h
}

/// `"<= 0.02"` → 0.02.
fn threshold_value(t: &str) -> Option<f64> {
    t.trim_start_matches(['<', '>', '=', ' '])
        .trim()
        .parse()
        .ok()
}

fn gate_charts(events: &[EventView]) -> Vec<Chart> {
    // Gate → (threshold text, values over time).
    type History = (String, Vec<(u64, f64)>);
    let mut by_gate: BTreeMap<&str, History> = BTreeMap::new();
    for e in events {
        for g in &e.gates {
            let entry = by_gate
                .entry(g.gate.as_str())
                .or_insert_with(|| (g.threshold.clone(), Vec::new()));
            if let Some(v) = g.value {
                entry.1.push((e.at_ms, v));
            }
        }
    }
    by_gate
        .into_iter()
        .enumerate()
        .map(|(k, (gate, (threshold, points)))| Chart {
            id: format!("gate-{k}"),
            title: format!("Gate {gate}"),
            unit: "value".into(),
            series: vec![Series {
                name: gate.to_owned(),
                points,
            }],
            threshold: threshold_value(&threshold).map(|t| (threshold.clone(), t)),
            marked: vec![],
        })
        .collect()
}

#[derive(Deserialize)]
pub struct OpForm {
    csrf: Option<String>,
    #[serde(default)]
    confirmed: String,
    #[serde(default)]
    plan: String,
}

/// The checks every console action passes, in order: role (as the API route), CSRF;
/// a refusal is audited like the API's.
async fn admit(
    st: &ConsoleState,
    user: &User,
    api_route: &str,
    path: &str,
    csrf: Option<&str>,
) -> Result<(), Response> {
    let needed = required_role(&Method::POST, api_route);
    let refusal = if user.identity.role < needed {
        Some(Fail(
            StatusCode::FORBIDDEN,
            format!(
                "{} has role {}; this needs {needed} (an admin can issue one: \
                 `drover token create NAME --role {needed}`).",
                user.identity.name, user.identity.role
            ),
        ))
    } else if !user.csrf_ok(csrf) {
        Some(Fail::csrf())
    } else {
        None
    };
    if let Some(f) = refusal {
        super::super::access::record_audit(&st.api, &user.identity, "POST", path.to_owned(), 403)
            .await;
        return Err(f.into_response());
    }
    Ok(())
}

/// A page asking to confirm an action (what a browser without script gets).
fn confirm_page(user: &User, action: &str, question: &str, f: &OpForm) -> Response {
    let body = format!(
        "<form method=\"post\" action=\"{}\">{}<input type=\"hidden\" name=\"confirmed\" value=\"yes\">\
         <input type=\"hidden\" name=\"plan\" value=\"{}\"><p>{}</p>\
         <button type=\"submit\">Confirm</button> <a href=\"/console/rollouts\">Cancel</a></form>",
        esc(action),
        user.csrf_field(),
        esc(&f.plan),
        esc(question)
    );
    respond(
        &HeaderMap::new(),
        page(Nav::Rollouts, user, "Confirm", &body),
    )
}

pub async fn operate(
    State(st): State<ConsoleState>,
    user: User,
    path: Result<Path<(u64, String)>, PathRejection>,
    Form(f): Form<OpForm>,
) -> Response {
    use crate::rollout::Op;
    let Ok(Path((id, op_name))) = path else {
        return Fail(StatusCode::BAD_REQUEST, "No such rollout path.".into()).into_response();
    };
    let path = format!("/console/rollouts/{id}/{op_name}");
    if let Err(r) = admit(
        &st,
        &user,
        "/v1/rollouts/{id}/{op}",
        &path,
        f.csrf.as_deref(),
    )
    .await
    {
        return r;
    }
    let op = match op_name.as_str() {
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "abort" => Op::Abort,
        "retry" => Op::Retry,
        other => {
            return Fail(
                StatusCode::NOT_FOUND,
                format!("No rollout operation {other:?}: use pause, resume, abort or retry."),
            )
            .into_response()
        }
    };
    if f.confirmed != "yes" {
        return confirm_page(&user, &path, &format!("{op_name} rollout #{id}?"), &f);
    }
    let by = user.identity.actor(None);
    let result = st.api.rollouts.operate(id, op, &by).await;
    let response = match result {
        Ok(_) => {
            tracing::info!(rollout_id = id, op = %op_name, user = %by, "console: rollout operated");
            Redirect::to(&format!("/console/rollouts/{id}")).into_response()
        }
        Err(e) => Fail::from(crate::api::ApiError::from(e)).into_response(),
    };
    let status = response.status().as_u16();
    super::super::access::record_audit(&st.api, &user.identity, "POST", path, status).await;
    response
}

pub async fn start(State(st): State<ConsoleState>, user: User, Form(f): Form<OpForm>) -> Response {
    let path = "/console/rollouts";
    if let Err(r) = admit(&st, &user, "/v1/rollouts", path, f.csrf.as_deref()).await {
        return r;
    }
    let plan = match crate::rollout::Plan::from_toml(&f.plan) {
        Ok(p) => p,
        Err(e) => {
            return Fail(
                StatusCode::BAD_REQUEST,
                format!("The plan is not valid: {e}"),
            )
            .into_response()
        }
    };
    if f.confirmed != "yes" {
        return confirm_page(
            &user,
            path,
            &format!("Start a rollout of {}?", plan.model),
            &f,
        );
    }
    let by = user.identity.actor(None);
    let response = match st.api.rollouts.start(plan, &by).await {
        Ok(s) => Redirect::to(&format!("/console/rollouts/{}", s.id)).into_response(),
        Err(e) => Fail::from(crate::api::ApiError::from(e)).into_response(),
    };
    let status = response.status().as_u16();
    super::super::access::record_audit(&st.api, &user.identity, "POST", path.into(), status).await;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Role;

    #[test]
    fn thresholds_parse_from_their_text() {
        assert_eq!(threshold_value("<= 0.02"), Some(0.02));
        assert_eq!(threshold_value(">= 0.9"), Some(0.9));
        assert_eq!(threshold_value("n/a"), None);
    }

    fn view(status: &str) -> RolloutView {
        let plan = crate::rollout::Plan::from_toml(
            "model = \"m@1.0.0\"\nselector = \"all\"\n[[waves]]\npercent = 100\n",
        )
        .unwrap();
        RolloutView {
            id: 7,
            model: "m@1.0.0".into(),
            digest: String::new(),
            selector: "all".into(),
            status: status.into(),
            reason: None,
            wave: 1,
            waves: vec![],
            stage: "bake".into(),
            stage_since_ms: 0,
            stage_ends_ms: None,
            waiting: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            selected: 0,
            devices: Default::default(),
            gates: vec![],
            plan,
            device_slots: vec![],
        }
    }

    fn user(role: Role) -> User {
        User {
            identity: crate::access::Identity {
                name: "u".into(),
                role,
                bootstrap: false,
            },
            csrf: "c".into(),
        }
    }

    #[test]
    fn a_viewer_gets_no_action_forms_and_a_deployer_the_ones_the_status_allows() {
        assert!(!actions(&view("running"), &user(Role::Viewer)).contains("<form"));
        let running = actions(&view("running"), &user(Role::Deployer));
        assert!(running.contains("/console/rollouts/7/pause") && running.contains("/7/abort"));
        assert!(!running.contains("/7/resume"));
        let paused = actions(&view("paused"), &user(Role::Admin));
        assert!(paused.contains("/7/resume") && !paused.contains("/7/pause"));
        assert!(!actions(&view("aborted"), &user(Role::Admin)).contains("<form"));
    }
}
