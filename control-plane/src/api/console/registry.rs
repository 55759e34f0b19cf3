//! Models (versions, lineage: training job, dataset, parent and children, held-out
//! metrics, signature) and training jobs (state, trigger, gate outcome and reason, log
//! tail).

use std::fmt::Write as _;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{self, badge, esc, link, num, opt, table, url};
use super::{page, read, respond, ConsoleState, Fail, Nav};
use crate::api::{JobView, ModelView};

fn model_href(m: &str) -> Option<String> {
    let (n, v) = m.split_once('@')?;
    Some(format!("/console/models/{}/{}", url(n), url(v)))
}

fn model_link(m: Option<&str>) -> String {
    match m.and_then(|m| Some((m, model_href(m)?))) {
        Some((m, href)) => link(&href, m),
        None => opt(m),
    }
}

/// `job-12` (a model's lineage) → a link to job 12.
fn job_link(j: Option<&str>) -> String {
    match j.and_then(|j| j.strip_prefix("job-")?.parse::<u64>().ok()) {
        Some(id) => link(&format!("/console/jobs/{id}"), &format!("job-{id}")),
        None => opt(j),
    }
}

fn lineage<'a>(m: &'a ModelView, key: &str) -> Option<&'a str> {
    m.summary.get("lineage")?.get(key)?.as_str()
}

pub async fn models(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let rows = read(&st, |s| Ok(s.models()?)).await?;
    let views: Vec<ModelView> = rows.into_iter().map(ModelView::from).collect();
    let cells: Vec<Vec<String>> = views
        .iter()
        .rev()
        .map(|m| {
            let name = format!("{}@{}", m.name, m.version);
            vec![
                model_link(Some(&name)),
                html::time(m.created_at_ms),
                model_link(lineage(m, "parent")),
                job_link(lineage(m, "training_job")),
                opt(lineage(m, "dataset")),
                format!("{} bytes", m.size),
            ]
        })
        .collect();
    let h = format!(
        "<section id=\"model-list\" data-live aria-labelledby=\"m-h\"><h2 id=\"m-h\">Published versions</h2>{}</section>",
        table(
            "Models, newest first",
            &["model", "published", "parent", "training job", "dataset", "size"],
            &cells
        )
    );
    Ok(respond(&headers, page(Nav::Models, &user, "Models", &h)))
}

pub async fn model(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Fail> {
    let Path((name, version)) = path.map_err(crate::api::ApiError::from)?;
    let rows = read(&st, |s| Ok(s.models()?)).await?;
    let all: Vec<ModelView> = rows.into_iter().map(ModelView::from).collect();
    let Some(m) = all.iter().find(|m| m.name == name && m.version == version) else {
        return Err(Fail(
            StatusCode::NOT_FOUND,
            format!("No model {name}@{version}: see the models page."),
        ));
    };
    let me = format!("{name}@{version}");
    let children: Vec<String> = all
        .iter()
        .filter(|c| lineage(c, "parent") == Some(me.as_str()))
        .map(|c| model_link(Some(&format!("{}@{}", c.name, c.version))))
        .collect();
    let mut h = String::from(
        "<section aria-labelledby=\"lin-h\"><h2 id=\"lin-h\">Lineage</h2><ol class=\"lineage\">",
    );
    let _ = write!(
        h,
        "<li>Parent: {}</li><li>Training job: <span data-lineage=\"job\">{}</span></li>\
         <li>Dataset: {}</li><li><strong>This version: {}</strong></li><li>Children: {}</li></ol>",
        model_link(lineage(m, "parent")),
        job_link(lineage(m, "training_job")),
        opt(lineage(m, "dataset")),
        esc(&me),
        if children.is_empty() {
            "none".into()
        } else {
            children.join(", ")
        }
    );
    let metrics: Vec<Vec<String>> = m
        .summary
        .get("lineage")
        .and_then(|l| l.get("metrics"))
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| vec![esc(k), v.as_f64().map_or_else(|| esc(&v.to_string()), num)])
                .collect()
        })
        .unwrap_or_default();
    h.push_str(&table("Held-out metrics", &["metric", "value"], &metrics));
    h.push_str(
        "</section><section aria-labelledby=\"sig-h\"><h2 id=\"sig-h\">Signature and contents</h2>",
    );
    let spec = |key: &str| -> String {
        m.summary
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|s| {
                        esc(&format!(
                            "{} {} {}",
                            s.get("name").and_then(|n| n.as_str()).unwrap_or("?"),
                            s.get("dtype").and_then(|n| n.as_str()).unwrap_or("?"),
                            s.get("shape").map_or(String::new(), |v| v.to_string())
                        ))
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            })
            .unwrap_or_default()
    };
    let facts = vec![
        vec![
            "manifest digest".into(),
            format!("<code>{}</code>", esc(&m.digest)),
        ],
        vec![
            "file SHA-256".into(),
            format!("<code>{}</code>", esc(&m.sha256)),
        ],
        vec![
            "signed by key".into(),
            format!("<code>{}</code>", esc(&m.key_id)),
        ],
        vec!["published".into(), html::time(m.created_at_ms)],
        vec![
            "size".into(),
            format!("{} bytes in chunks of {}", m.size, m.chunk_size),
        ],
        vec!["inputs".into(), spec("inputs")],
        vec!["outputs".into(), spec("outputs")],
        vec![
            "test vectors".into(),
            m.summary
                .get("test_vectors")
                .map_or("—".into(), |v| esc(&v.to_string())),
        ],
        vec![
            "drift baseline".into(),
            m.summary
                .get("baseline")
                .filter(|b| !b.is_null())
                .map_or("none".into(), |b| esc(&b.to_string())),
        ],
    ];
    h.push_str(&table("Manifest", &["field", "value"], &facts));
    h.push_str("</section>");
    Ok(respond(
        &headers,
        page(Nav::Models, &user, &format!("Model {me}"), &h),
    ))
}

pub async fn jobs(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let rows = read(&st, |s| Ok(s.jobs(500)?)).await?;
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(JobView::from)
        .map(|j| {
            vec![
                link(&format!("/console/jobs/{}", j.id), &format!("job-{}", j.id)),
                esc(&j.name),
                esc(&j.trigger),
                badge(&j.state),
                j.outcome.as_deref().map_or("—".into(), badge),
                model_link(j.candidate_model.as_deref()),
                html::time(j.created_at_ms),
            ]
        })
        .collect();
    let h = format!(
        "<section id=\"job-list\" data-live aria-labelledby=\"j-h\"><h2 id=\"j-h\">Jobs</h2>{}</section>",
        table(
            "Training jobs, newest first",
            &["job", "name", "trigger", "state", "gate", "candidate", "created"],
            &cells
        )
    );
    Ok(respond(
        &headers,
        page(Nav::Jobs, &user, "Training jobs", &h),
    ))
}

/// Lines of a job's log shown on its page.
const LOG_LINES: usize = 40;

pub async fn job(
    State(st): State<ConsoleState>,
    user: super::User,
    headers: HeaderMap,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Response, Fail> {
    let Path(id) = id.map_err(crate::api::ApiError::from)?;
    let row = read(&st, move |s| Ok(s.job(id)?)).await?;
    let Some(j) = row.map(JobView::from) else {
        return Err(Fail(
            StatusCode::NOT_FOUND,
            format!("No training job {id}."),
        ));
    };
    let log = std::path::Path::new(&j.dir).join("job.log");
    let tail = tokio::task::spawn_blocking(move || crate::jobs::log_tail(&log, LOG_LINES))
        .await
        .unwrap_or_default();
    let facts = vec![
        vec!["state".into(), badge(&j.state)],
        vec!["trigger".into(), esc(&j.trigger)],
        vec![
            "executor".into(),
            format!("{} {}", esc(&j.executor), opt(j.external_id.as_deref())),
        ],
        vec![
            "gate outcome".into(),
            j.outcome.as_deref().map_or("—".into(), badge),
        ],
        vec![
            "reason / detail".into(),
            format!("<pre>{}</pre>", opt(j.detail.as_deref())),
        ],
        vec!["parent model".into(), model_link(j.parent_model.as_deref())],
        vec![
            "candidate model".into(),
            model_link(j.candidate_model.as_deref()),
        ],
        vec!["dataset".into(), opt(j.dataset_hash.as_deref())],
        vec!["created".into(), html::time(j.created_at_ms)],
        vec![
            "finished".into(),
            j.finished_at_ms.map_or("—".into(), html::time),
        ],
        vec![
            "exit code".into(),
            j.exit_code.map_or("—".into(), |c| c.to_string()),
        ],
    ];
    let mut h = String::from(
        "<section id=\"job-facts\" data-live aria-labelledby=\"jf-h\"><h2 id=\"jf-h\">Job</h2>",
    );
    h.push_str(&table("Job", &["field", "value"], &facts));
    if let Some(m) = &j.metrics {
        let _ = write!(
            h,
            "<h3>Gate metrics</h3><pre>{}</pre>",
            esc(&serde_json::to_string_pretty(m).unwrap_or_default())
        );
    }
    let _ = write!(
        h,
        "<h3>Log tail (last {LOG_LINES} lines)</h3><pre class=\"log\">{}</pre></section>",
        if tail.is_empty() {
            "(no log)".into()
        } else {
            esc(&tail)
        }
    );
    Ok(respond(
        &headers,
        page(Nav::Jobs, &user, &format!("Training job {id}"), &h),
    ))
}
