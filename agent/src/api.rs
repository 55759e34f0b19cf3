//! Local inference API: the Open Inference Protocol (KServe v2) REST dialect over HTTP on
//! loopback, so tritonclient and KServe clients work unchanged, plus a feedback endpoint.
//!
//! Inference runs off the async workers (`block_in_place` or the blocking pool); the request holds its model's `Arc` to the
//! end, which is what makes hot swap lossless.
//!
//! Memory per request is bounded: the body limit is sized from the served model's inputs
//! when their shapes are fixed (else [`MAX_BODY`]) and checked on `Content-Length` before
//! a byte is read; the bodies being handled at once share [`MAX_IN_FLIGHT_BYTES`] (a
//! request past it gets 503 at once, so small requests keep being served); and `data` is
//! decoded straight into typed vectors ([`decode`]), never into a JSON tree.

mod decode;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{CONTENT_LENGTH, RETRY_AFTER};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_protocol::manifest::{DType, Dim, TensorData, TensorSpec, TensorValue};
use drover_protocol::messages::Label;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::decode::InferRequest;
use crate::serving::{InferError, Serving};
use drover_host::clock::now_ms;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Request bytes all inference requests may hold at once: one of the largest and room
/// for small ones beside it. Decoding adds at most about twice the body (4-byte values
/// from at least 2 bytes of text each).
pub const MAX_IN_FLIGHT_BYTES: usize = MAX_BODY + 16 * 1024 * 1024;

/// Text one JSON number may take in a request sized from fixed input shapes
/// (`-1.2345678901234567e-308, ` is 26).
const MAX_JSON_BYTES_PER_VALUE: usize = 32;

/// Room for names, shapes, datatypes and parameters in a request sized from its inputs.
const REQUEST_OVERHEAD: usize = 64 * 1024;

/// How long a request body may take to arrive (its bytes are reserved meanwhile).
const BODY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct ApiState {
    pub serving: Arc<Serving>,
}

/// Requests refused to bound memory, by reason.
#[derive(Default)]
struct Refused {
    too_large: AtomicU64,
    busy: AtomicU64,
}

/// The handlers' state: the caller's and the API's own limits.
#[derive(Clone)]
struct Shared {
    serving: Arc<Serving>,
    in_flight: Arc<Semaphore>,
    refused: Arc<Refused>,
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
        .with_state(Shared {
            serving: state.serving,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
            refused: Arc::new(Refused::default()),
        })
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(s): State<Shared>) -> Response {
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

async fn model_metadata(State(s): State<Shared>, Path(name): Path<String>) -> Response {
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
    st: State<Shared>,
    Path((name, _version)): Path<(String, String)>,
) -> Response {
    model_metadata(st, Path(name)).await
}

async fn model_ready(State(s): State<Shared>, Path(name): Path<String>) -> Response {
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
    st: State<Shared>,
    Path((name, _version)): Path<(String, String)>,
) -> Response {
    model_ready(st, Path(name)).await
}

/// The request body a model's inputs can need, at most: with every dimension fixed, the
/// values they hold at [`MAX_JSON_BYTES_PER_VALUE`] each plus [`REQUEST_OVERHEAD`];
/// otherwise (a batch dimension) [`MAX_BODY`]. Also returns that value count, if known.
fn body_limit(inputs: &[TensorSpec]) -> (usize, Option<u64>) {
    let values = inputs.iter().try_fold(0u64, |acc, spec| {
        let n = spec.shape.iter().try_fold(1u64, |n, d| match d {
            Dim::Fixed(v) => n.checked_mul(*v),
            Dim::Symbolic(_) => None,
        })?;
        acc.checked_add(n)
    });
    let limit = values
        .and_then(|v| usize::try_from(v).ok())
        .and_then(|v| v.checked_mul(MAX_JSON_BYTES_PER_VALUE))
        .and_then(|b| b.checked_add(REQUEST_OVERHEAD))
        .map_or(MAX_BODY, |b| b.min(MAX_BODY));
    (limit, values)
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    id: String,
    parameters: ResponseParameters,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct ResponseParameters {
    drover_request_id: u64,
}

/// An output tensor, serialized from the runtime's vector (no intermediate JSON tree).
#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    data: OutputData<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutputData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

fn output_json(t: &TensorValue) -> OutputJson<'_> {
    let (datatype, data) = match &t.data {
        TensorData::F32(v) => ("FP32", OutputData::F32(v)),
        TensorData::I64(v) => ("INT64", OutputData::I64(v)),
    };
    OutputJson {
        name: &t.name,
        datatype,
        shape: &t.shape,
        data,
    }
}

async fn infer_v(
    st: State<Shared>,
    Path((name, _version)): Path<(String, String)>,
    req: Request,
) -> Response {
    infer(st, Path(name), req).await
}

/// Reads an inference request's body within the model's limit and the agent's in-flight
/// budget; the permit is held until the response is built.
async fn read_body(
    s: &Shared,
    name: &str,
    inputs: &[TensorSpec],
    req: Request,
) -> Result<(Bytes, OwnedSemaphorePermit), Response> {
    let (limit, values) = body_limit(inputs);
    let claimed = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |len: String| {
        s.refused.too_large.fetch_add(1, Relaxed);
        let why = match values {
            Some(v) => format!("its inputs' fixed shapes hold {v} values"),
            None => "the agent's largest request".into(),
        };
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {len} bytes exceeds the limit of {limit} bytes for model {name:?} ({why}); send fewer rows per request"),
        )
    };
    if let Some(len) = claimed.filter(|l| *l > limit as u64) {
        return Err(too_large(len.to_string()));
    }
    // Without a length, the whole limit is reserved.
    let reserve = claimed.map_or(limit, |l| l as usize).max(1);
    let permit = u32::try_from(reserve)
        .ok()
        .and_then(|n| s.in_flight.clone().try_acquire_many_owned(n).ok());
    let Some(permit) = permit else {
        s.refused.busy.fetch_add(1, Relaxed);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent is busy: inference requests in flight already hold close to its {MAX_IN_FLIGHT_BYTES}-byte budget and this one needs {reserve}; retry shortly or send smaller requests"),
        );
        r.headers_mut()
            .insert(RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return Err(r);
    };
    match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(req.into_body(), limit)).await {
        Ok(Ok(body)) => Ok((body, permit)),
        Ok(Err(e)) if is_length_limit(&e) => Err(too_large(format!("more than {limit}"))),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("could not read the request body: {e}"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_DEADLINE.as_secs()
            ),
        )),
    }
}

/// Whether reading a body failed on its length limit (a body sent without a length).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("length limit exceeded") {
            return true;
        }
        cur = err.source();
    }
    false
}

async fn infer(State(s): State<Shared>, Path(name): Path<String>, req: Request) -> Response {
    // The model is checked before the body is read: its inputs size the body's limit.
    let model = match s.serving.active() {
        Some(m) if m.model_ref.name == name => m,
        Some(_) => {
            return error(
                StatusCode::NOT_FOUND,
                InferError::UnknownModel(name).to_string(),
            )
        }
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                InferError::NoModel.to_string(),
            )
        }
    };
    let (body, _permit) = match read_body(&s, &name, model.model.inputs(), req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    drop(model);
    let req: InferRequest<'_> = match serde_json::from_slice(&body) {
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
        .map(decode::to_tensor)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    drop(body);
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
    let outputs: Vec<OutputJson<'_>> = served
        .outputs
        .iter()
        .filter(|o| wanted.as_ref().is_none_or(|w| w.contains(&o.name)))
        .map(output_json)
        .collect();
    Json(InferResponse {
        model_name: &served.model.model_ref.name,
        model_version: &served.model.model_ref.version,
        id: client_id.unwrap_or_else(|| served.request_id.to_string()),
        parameters: ResponseParameters {
            drover_request_id: served.request_id,
        },
        outputs,
    })
    .into_response()
}

/// Prometheus text exposition of the agent's cumulative counters.
async fn metrics(State(s): State<Shared>) -> Response {
    use std::fmt::Write as _;
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
    metric(
        "drover_agent_spool_dropped_total",
        "counter",
        "Uplink records the spool dropped: evicted when full or not writable (cumulative).",
        t.spool_dropped.load(Relaxed),
    );
    metric(
        "drover_agent_state_write_failures_total",
        "counter",
        "Failed writes of the agent's state file (commands are not acted on meanwhile).",
        t.state_write_failures.load(Relaxed),
    );
    metric(
        "drover_agent_disk_full",
        "gauge",
        "1 while the last state write failed (a full disk), else 0.",
        t.disk_full.load(Relaxed),
    );
    metric(
        "drover_agent_store_collected_bytes_total",
        "counter",
        "Bytes of superseded model files and partial downloads collected.",
        t.store_collected_bytes.load(Relaxed),
    );
    metric(
        "drover_agent_requests_too_large_total",
        "counter",
        "Inference requests refused for a body over the limit (413).",
        s.refused.too_large.load(Relaxed),
    );
    metric(
        "drover_agent_requests_busy_total",
        "counter",
        "Inference requests refused because requests in flight held the byte budget (503).",
        s.refused.busy.load(Relaxed),
    );
    metric(
        "drover_agent_request_bytes_in_flight",
        "gauge",
        "Request body bytes reserved by inference requests being handled.",
        (MAX_IN_FLIGHT_BYTES - s.in_flight.available_permits()) as u64,
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

async fn feedback(State(s): State<Shared>, Path(name): Path<String>, body: Bytes) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape,
        }
    }

    #[test]
    fn the_body_limit_follows_fixed_input_shapes_and_falls_back_to_the_largest_body() {
        let fixed = [
            spec(vec![Dim::Fixed(1), Dim::Fixed(4)]),
            spec(vec![Dim::Fixed(2)]),
        ];
        assert_eq!(
            body_limit(&fixed),
            (6 * MAX_JSON_BYTES_PER_VALUE + REQUEST_OVERHEAD, Some(6))
        );
        let batch = [spec(vec![Dim::Symbolic("N".into()), Dim::Fixed(16)])];
        assert_eq!(body_limit(&batch), (MAX_BODY, None));
        let huge = [spec(vec![Dim::Fixed(1 << 40)])];
        assert_eq!(body_limit(&huge), (MAX_BODY, Some(1 << 40)));
    }
}
