//! Which model a request names, and the model endpoints: metadata, readiness (with or
//! without `/versions/{v}`) and the repository index.
//!
//! The agent holds at most two versions of a model: the active one (ready, serving) and
//! a shadow candidate (present, compared against the active one, serving nothing: not
//! ready). Any other version is unknown here (404).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_protocol::manifest::{Dim, TensorSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use super::outputs::datatype;
use super::{error, Shared};
use crate::serving::{Loaded, Serving};

/// A model version the agent holds.
pub enum Found {
    Ready(Arc<Loaded>),
    /// Present but not serving, and why.
    NotReady(Arc<Loaded>, String),
}

fn shadow_reason(shadow: &Loaded, active: Option<&Loaded>) -> String {
    let beside = active.map_or_else(String::new, |a| {
        format!(" beside version {:?}", a.model_ref.version)
    });
    format!(
        "model {:?} version {:?} is loaded as a shadow candidate{beside}: it is compared against the active version and serves no requests",
        shadow.model_ref.name, shadow.model_ref.version
    )
}

/// Looks up `name` (and `version`, if the path names one): the active version is ready,
/// the shadow candidate present but not ready; anything else is unknown (a 404 with
/// this reason).
pub fn find(serving: &Serving, name: &str, version: Option<&str>) -> Result<Found, String> {
    let active = serving.active(name);
    let shadow = serving.shadow(name);
    let matches = |m: &Arc<Loaded>| version.is_none_or(|v| m.model_ref.version == v);
    if let Some(a) = active.as_ref().filter(|m| matches(m)) {
        return Ok(Found::Ready(a.clone()));
    }
    if let Some(s) = shadow.as_ref().filter(|m| matches(m)) {
        let reason = shadow_reason(s, active.as_deref());
        return Ok(Found::NotReady(s.clone(), reason));
    }
    let msg = match (version, active.or(shadow)) {
        (Some(v), Some(m)) => format!(
            "model {name:?} has no version {v:?} here (version {:?} is served)",
            m.model_ref.version
        ),
        _ => format!("model {name:?} is not served here"),
    };
    Err(msg)
}

fn spec_json(s: &TensorSpec) -> Value {
    let shape: Vec<i64> = s
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => i64::try_from(*v).unwrap_or(i64::MAX),
            Dim::Symbolic(_) => -1,
        })
        .collect();
    json!({ "name": s.name, "datatype": datatype(s.dtype), "shape": shape })
}

fn metadata(serving: &Serving, name: &str, version: Option<&str>) -> Response {
    let m = match find(serving, name, version) {
        Ok(Found::Ready(m) | Found::NotReady(m, _)) => m,
        Err(msg) => return error(StatusCode::NOT_FOUND, msg),
    };
    // `versions` lists what may be served on request: the active version.
    let versions: Vec<String> = serving
        .active(name)
        .map(|a| a.model_ref.version.clone())
        .into_iter()
        .collect();
    Json(json!({
        "name": m.model_ref.name,
        "versions": versions,
        "platform": "onnx_tract",
        "inputs": m.model.inputs().iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": m.model.outputs().iter().map(spec_json).collect::<Vec<_>>(),
    }))
    .into_response()
}

fn readiness(serving: &Serving, name: &str, version: Option<&str>) -> Response {
    match find(serving, name, version) {
        Ok(Found::Ready(m)) => Json(json!({
            "name": name, "version": m.model_ref.version, "ready": true,
        }))
        .into_response(),
        Ok(Found::NotReady(m, why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "name": name, "version": m.model_ref.version, "ready": false, "error": why,
            })),
        )
            .into_response(),
        Err(msg) => error(StatusCode::NOT_FOUND, msg),
    }
}

pub async fn model_metadata(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    metadata(&s.serving, &name, None)
}

pub async fn model_metadata_v(
    State(s): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&s.serving, &name, Some(&version))
}

pub async fn model_ready(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    readiness(&s.serving, &name, None)
}

pub async fn model_ready_v(
    State(s): State<Shared>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    readiness(&s.serving, &name, Some(&version))
}

#[derive(Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index` (Triton's model repository extension, index only): the
/// versions held here with their state; `{"ready": true}` lists only ready ones.
pub async fn repository_index(State(s): State<Shared>, body: Bytes) -> Response {
    let req: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("malformed repository index request: {e}"),
                )
            }
        }
    };
    // Every model served here, in name order: its active version, then its shadow.
    let mut index = Vec::new();
    for a in s.serving.actives() {
        index.push(json!({
            "name": a.model_ref.name, "version": a.model_ref.version, "state": "READY",
        }));
        if let Some(sh) = s.serving.shadow(&a.model_ref.name).filter(|_| !req.ready) {
            index.push(json!({
                "name": sh.model_ref.name, "version": sh.model_ref.version,
                "state": "UNAVAILABLE", "reason": shadow_reason(&sh, Some(&a)),
            }));
        }
    }
    Json(Value::Array(index)).into_response()
}
