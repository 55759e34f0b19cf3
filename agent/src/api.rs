//! Local inference API: the Open Inference Protocol (KServe v2) REST dialect over HTTP on
//! loopback, so tritonclient and KServe clients work unchanged, plus a feedback endpoint.
//!
//! Inference runs off the async workers (`block_in_place` or the blocking pool); the request holds its model's `Arc` to the
//! end, which is what makes hot swap lossless.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_protocol::manifest::{DType, Dim, TensorData, TensorSpec, TensorValue};
use drover_protocol::messages::Label;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::serving::{InferError, Serving};
use drover_host::clock::now_ms;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub serving: Arc<Serving>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{name}/feedback", post(feedback))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(s): State<ApiState>) -> Response {
    if s.serving.active().is_some() {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response()
    }
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "drover-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

fn datatype(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::U8 => "UINT8",
        DType::Bool => "BOOL",
        DType::String => "BYTES",
    }
}

fn spec_json(s: &TensorSpec) -> Value {
    let shape: Vec<i64> = s
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => *v as i64,
            Dim::Symbolic(_) => -1,
        })
        .collect();
    json!({ "name": s.name, "datatype": datatype(s.dtype), "shape": shape })
}

async fn model_metadata(State(s): State<ApiState>, Path(name): Path<String>) -> Response {
    match s.serving.active() {
        Some(m) if m.model_ref.name == name => Json(json!({
            "name": m.model_ref.name,
            "versions": [m.model_ref.version],
            "platform": "onnx_tract",
            "inputs": m.model.inputs().iter().map(spec_json).collect::<Vec<_>>(),
            "outputs": m.model.outputs().iter().map(spec_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("model {name:?} is not served here"),
        ),
    }
}

async fn model_metadata_v(
    st: State<ApiState>,
    Path((name, _version)): Path<(String, String)>,
) -> Response {
    model_metadata(st, Path(name)).await
}

async fn model_ready(State(s): State<ApiState>, Path(name): Path<String>) -> Response {
    match s.serving.active() {
        Some(m) if m.model_ref.name == name => {
            Json(json!({ "name": name, "ready": true })).into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("model {name:?} is not served here"),
        ),
    }
}

async fn model_ready_v(
    st: State<ApiState>,
    Path((name, _version)): Path<(String, String)>,
) -> Response {
    model_ready(st, Path(name)).await
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

/// Flattens (possibly nested) JSON arrays of numbers, row-major.
fn flatten(v: &Value, out: &mut Vec<f64>, depth: usize) -> Result<(), String> {
    if depth > 32 {
        return Err("data is nested too deeply".into());
    }
    match v {
        Value::Array(items) => {
            for i in items {
                flatten(i, out, depth + 1)?;
            }
            Ok(())
        }
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("data holds a number out of range")?);
            Ok(())
        }
        Value::Bool(b) => {
            out.push(if *b { 1.0 } else { 0.0 });
            Ok(())
        }
        other => Err(format!("data holds a non-numeric value {other}")),
    }
}

fn to_tensor(i: InferInput) -> Result<TensorValue, String> {
    let shape = i
        .shape
        .iter()
        .map(|d| {
            u64::try_from(*d).map_err(|_| format!("input {:?}: negative dimension {d}", i.name))
        })
        .collect::<Result<Vec<u64>, String>>()?;
    let mut flat = Vec::new();
    flatten(&i.data, &mut flat, 0).map_err(|e| format!("input {:?}: {e}", i.name))?;
    let data = match i.datatype.as_str() {
        "FP32" | "FP64" | "FP16" => TensorData::F32(flat.into_iter().map(|x| x as f32).collect()),
        "INT64" | "INT32" | "INT16" | "INT8" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
        | "BOOL" => {
            if flat.iter().any(|x| x.fract() != 0.0) {
                return Err(format!(
                    "input {:?}: {} data must be integers",
                    i.name, i.datatype
                ));
            }
            TensorData::I64(flat.into_iter().map(|x| x as i64).collect())
        }
        other => {
            return Err(format!(
                "input {:?}: unsupported datatype {other:?}",
                i.name
            ))
        }
    };
    Ok(TensorValue {
        name: i.name,
        shape,
        data,
    })
}

fn output_json(t: &TensorValue) -> Value {
    let (dt, data) = match &t.data {
        TensorData::F32(v) => ("FP32", json!(v)),
        TensorData::I64(v) => ("INT64", json!(v)),
    };
    json!({ "name": t.name, "datatype": dt, "shape": t.shape, "data": data })
}

async fn infer_v(
    st: State<ApiState>,
    Path((name, _version)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    infer(st, Path(name), body).await
}

async fn infer(State(s): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Response {
    let req: InferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("malformed inference request: {e}"),
            )
        }
    };
    let client_id = req.id.clone();
    let wanted: Option<Vec<String>> = req.outputs.map(|o| o.into_iter().map(|o| o.name).collect());
    let inputs = match req
        .inputs
        .into_iter()
        .map(to_tensor)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let serving = s.serving.clone();
    let n = name.clone();
    // On a multi-thread runtime, run in place: tokio hands this worker's other tasks to a
    // fresh thread, and the request skips a cross-thread hop (~tens of µs on small
    // models). Elsewhere, the blocking pool.
    let multi = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let served = if multi {
        Ok(tokio::task::block_in_place(|| {
            serving.infer(&n, &inputs, now_ms())
        }))
    } else {
        tokio::task::spawn_blocking(move || serving.infer(&n, &inputs, now_ms())).await
    };
    let served = match served {
        Ok(Ok(r)) => r,
        Ok(Err(e @ InferError::UnknownModel(_))) => {
            return error(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e)) if e.is_client_error() => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e @ InferError::NoModel)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference task failed: {e}"),
            )
        }
    };
    let outputs: Vec<Value> = served
        .outputs
        .iter()
        .filter(|o| wanted.as_ref().is_none_or(|w| w.contains(&o.name)))
        .map(output_json)
        .collect();
    Json(json!({
        "model_name": served.model.model_ref.name,
        "model_version": served.model.model_ref.version,
        "id": client_id.unwrap_or_else(|| served.request_id.to_string()),
        "parameters": { "drover_request_id": served.request_id },
        "outputs": outputs,
    }))
    .into_response()
}

/// Prometheus text exposition of the agent's cumulative counters.
async fn metrics(State(s): State<ApiState>) -> Response {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let t = &s.serving.totals;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        );
    };
    metric(
        "drover_agent_inferences_total",
        "counter",
        "Inference requests that reached a model.",
        t.inferences.load(Relaxed),
    );
    metric(
        "drover_agent_inference_errors_total",
        "counter",
        "Inferences that failed in the runtime.",
        t.errors.load(Relaxed),
    );
    metric(
        "drover_agent_inference_rejected_total",
        "counter",
        "Inferences refused for bad inputs.",
        t.client_errors.load(Relaxed),
    );
    metric(
        "drover_agent_inference_latency_microseconds_sum",
        "counter",
        "Total model run time.",
        t.latency_us_sum.load(Relaxed),
    );
    metric(
        "drover_agent_model_swaps_total",
        "counter",
        "Active model swaps.",
        t.swaps.load(Relaxed),
    );
    let loaded = s.serving.active();
    metric(
        "drover_agent_model_loaded",
        "gauge",
        "1 when a model is serving.",
        u64::from(loaded.is_some()),
    );
    if let Some(m) = loaded {
        let _ = write!(
            out,
            "# HELP drover_agent_model_info The serving model.\n# TYPE drover_agent_model_info gauge\ndrover_agent_model_info{{name=\"{}\",version=\"{}\"}} 1\n",
            m.model_ref.name, m.model_ref.version
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

#[derive(Deserialize)]
struct FeedbackRequest {
    id: Value,
    label: f64,
}

async fn feedback(State(s): State<ApiState>, Path(name): Path<String>, body: Bytes) -> Response {
    let req: FeedbackRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed feedback: {e}")),
    };
    if s.serving.active().is_none_or(|m| m.model_ref.name != name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("model {name:?} is not served here"),
        );
    }
    let id = match &req.id {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    let Some(id) = id.filter(|id| *id >= 1 && *id <= s.serving.last_request_id()) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown request id {}", req.id),
        );
    };
    if !req.label.is_finite() {
        return error(StatusCode::BAD_REQUEST, "label must be a finite number");
    }
    s.serving.add_label(Label {
        request_id: id,
        at_ms: now_ms(),
        value: req.label,
    });
    Json(json!({ "accepted": true, "id": id })).into_response()
}
