//! Local inference API: the Open Inference Protocol (KServe v2) REST dialect over HTTP on
//! loopback, so tritonclient and KServe clients work unchanged (with their defaults: the
//! binary tensor data extension both ways), plus a feedback endpoint.
//!
//! Layout: this file holds the router, the inference handler and the request limits;
//! [`decode`] reads inputs (JSON or binary) into tensors, [`binary`] the binary
//! extension's request framing, [`outputs`] the response (JSON or binary), [`models`]
//! name/version lookup, metadata, readiness and the repository index, [`metrics`] the
//! Prometheus page, served on a listener of its own (`metrics_addr`) so a scraper never
//! reaches the inference API. Every error status carries `{"error": "..."}`.
//!
//! Inference runs off the async workers (`block_in_place` or the blocking pool); the request holds its model's `Arc` to the
//! end, which is what makes hot swap lossless.
//!
//! Memory per request is bounded: the body limit is sized from the served model's inputs
//! when their shapes are fixed (else [`MAX_BODY`]) and checked on `Content-Length` before
//! a byte is read; the bodies being handled at once share [`MAX_IN_FLIGHT_BYTES`] (a
//! request past it gets 503 at once, so small requests keep being served); and `data` is
//! decoded straight into typed vectors ([`decode`]), never into a JSON tree.

mod binary;
mod decode;
mod metrics;
mod models;
mod outputs;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_protocol::manifest::{DType, Dim, TensorSpec, TensorValue};
use drover_protocol::messages::Label;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::decode::{Decoded, InferRequest, RequestedOutput};
use self::models::Found;
use self::outputs::{datatype, Wanted};
use crate::serving::{InferError, Loaded, Serving};
use drover_host::clock::now_ms;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Request bytes all inference requests may hold at once: one of the largest and room
/// for small ones beside it. Decoding adds at most about twice the body (4-byte values
/// from at least 2 bytes of text each; binary INT32 widened to 8 bytes).
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

/// The inference API's router and the metrics listener's router, sharing their counters.
pub fn routers(state: ApiState) -> (Router, Router) {
    let shared = Shared {
        serving: state.serving,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES)),
        refused: Arc::new(Refused::default()),
    };
    (inference_router(shared.clone()), metrics::router(shared))
}

fn inference_router(shared: Shared) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(models::model_metadata))
        .route("/v2/models/{name}/ready", get(models::model_ready))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(models::model_metadata_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(models::model_ready_v),
        )
        .route("/v2/repository/index", post(models::repository_index))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{name}/feedback", post(feedback))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(s): State<Shared>) -> Response {
    if s.serving.any_active() {
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
        "extensions": ["binary_tensor_data"],
    }))
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

async fn infer(st: State<Shared>, Path(name): Path<String>, req: Request) -> Response {
    run_infer(st, name, None, req).await
}

async fn infer_v(
    st: State<Shared>,
    Path((name, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    run_infer(st, name, Some(version), req).await
}

/// An inference request read and checked against its model, ready to run.
struct Parsed {
    id: Option<String>,
    inputs: Vec<TensorValue>,
    /// Requested outputs and whether each goes binary; `None`: every output.
    wanted: Option<Vec<(String, bool)>>,
    binary_by_default: bool,
}

/// The outputs a request asks for, each binary or not; an output the model lacks, or an
/// extension the agent does not implement, is refused.
fn check_outputs(
    requested: Vec<RequestedOutput>,
    binary_by_default: bool,
    model: &Loaded,
) -> Result<Vec<(String, bool)>, String> {
    let specs = model.model.outputs();
    requested
        .into_iter()
        .map(|o| {
            if o.parameters.classification.is_some() {
                return Err(format!(
                    "output {:?}: the classification extension is not supported; request the raw output",
                    o.name
                ));
            }
            if o.parameters.shared_memory_region.is_some() {
                return Err(format!(
                    "output {:?}: shared memory is not supported here",
                    o.name
                ));
            }
            if !specs.iter().any(|s| s.name == o.name) {
                let have: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                return Err(format!(
                    "model {:?} has no output {:?} (its outputs: {})",
                    model.model_ref.name,
                    o.name,
                    have.join(", ")
                ));
            }
            let binary = o.parameters.binary_data.unwrap_or(binary_by_default);
            Ok((o.name, binary))
        })
        .collect()
}

/// Why a BYTES input cannot be served, naming the model's matching input.
fn bytes_refusal(name: &str, elements: usize, specs: &[TensorSpec]) -> String {
    match specs.iter().find(|s| s.name == name) {
        Some(s) if s.dtype == DType::String => format!(
            "input {name:?}: {elements} BYTES elements read, but the runtime cannot feed string tensors to a model yet"
        ),
        Some(s) => format!(
            "input {name:?} is BYTES but the model's input {name:?} is {}",
            datatype(s.dtype)
        ),
        None => format!("input {name:?} is BYTES but the model has no string input named so"),
    }
}

/// The model-independent part of [`parse`], for the fuzz target (`agent/fuzz`): the
/// body split at `header_length` (the `Inference-Header-Content-Length` value, if any),
/// the borrowed JSON parse, each input's binary slice and its typed decode.
#[doc(hidden)]
pub fn decode_request(
    body: &[u8],
    header_length: Option<&str>,
) -> Result<Vec<drover_protocol::manifest::TensorValue>, String> {
    let header = header_length
        .map(HeaderValue::from_str)
        .transpose()
        .map_err(|e| e.to_string())?;
    let (json, binary) = binary::split(body, header.as_ref())?;
    let req: InferRequest<'_> =
        serde_json::from_slice(json).map_err(|e| format!("malformed inference request: {e}"))?;
    let slices = binary::input_slices(&req.inputs, binary, header.is_some())?;
    let mut out = Vec::with_capacity(req.inputs.len());
    for (i, bytes) in req.inputs.into_iter().zip(slices) {
        if let Decoded::Tensor(t) = decode::decode_input(i, bytes)? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Splits the body (binary extension), parses the JSON header, checks the requested
/// outputs and decodes every input into its tensor.
fn parse(
    body: &[u8],
    header_length: Option<&HeaderValue>,
    model: &Loaded,
) -> Result<Parsed, String> {
    let (json, binary) = binary::split(body, header_length)?;
    let req: InferRequest<'_> =
        serde_json::from_slice(json).map_err(|e| format!("malformed inference request: {e}"))?;
    let binary_by_default = req.parameters.binary_data_output;
    let wanted = req
        .outputs
        .map(|o| check_outputs(o, binary_by_default, model))
        .transpose()?;
    let slices = binary::input_slices(&req.inputs, binary, header_length.is_some())?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, bytes) in req.inputs.into_iter().zip(slices) {
        match decode::decode_input(i, bytes)? {
            Decoded::Tensor(t) => inputs.push(t),
            Decoded::Bytes { name, elements } => {
                return Err(bytes_refusal(&name, elements, model.model.inputs()))
            }
        }
    }
    Ok(Parsed {
        id: req.id,
        inputs,
        wanted,
        binary_by_default,
    })
}

fn infer_error(e: InferError) -> Response {
    let status = match &e {
        InferError::UnknownModel(_) | InferError::UnknownVersion { .. } => StatusCode::NOT_FOUND,
        e if e.is_client_error() => StatusCode::BAD_REQUEST,
        InferError::NoModel => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn run_infer(
    State(s): State<Shared>,
    name: String,
    version: Option<String>,
    req: Request,
) -> Response {
    // The model is checked before the body is read: its inputs size the body's limit.
    if !s.serving.any_active() {
        return infer_error(InferError::NoModel);
    }
    let model = match models::find(&s.serving, &name, version.as_deref()) {
        Ok(Found::Ready(m)) => m,
        Ok(Found::NotReady(_, why)) => return error(StatusCode::SERVICE_UNAVAILABLE, why),
        Err(msg) => return error(StatusCode::NOT_FOUND, msg),
    };
    if let Some(enc) = req
        .headers()
        .get(CONTENT_ENCODING)
        .filter(|e| e.as_bytes() != b"identity")
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "Content-Encoding {:?} is not supported; send the body uncompressed",
                String::from_utf8_lossy(enc.as_bytes())
            ),
        );
    }
    let header_length = req.headers().get(binary::HEADER_LENGTH).cloned();
    let (body, _permit) = match read_body(&s, &name, model.model.inputs(), req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let parsed = match parse(&body, header_length.as_ref(), &model) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    drop((body, model));
    let Parsed {
        id,
        inputs,
        wanted,
        binary_by_default,
    } = parsed;
    let serving = s.serving.clone();
    let n = name.clone();
    // On a multi-thread runtime, run in place: tokio hands this worker's other tasks to a
    // fresh thread, and the request skips a cross-thread hop (~tens of µs on small
    // models). Elsewhere, the blocking pool.
    let multi = tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread;
    let served = if multi {
        Ok(tokio::task::block_in_place(|| {
            serving.infer(&n, version.as_deref(), &inputs, now_ms())
        }))
    } else {
        tokio::task::spawn_blocking(move || {
            serving.infer(&n, version.as_deref(), &inputs, now_ms())
        })
        .await
    };
    let served = match served {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return infer_error(e),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference task failed: {e}"),
            )
        }
    };
    let wanted: Vec<Wanted<'_>> = match &wanted {
        Some(w) => w
            .iter()
            .map(|(name, binary)| Wanted {
                name,
                binary: *binary,
            })
            .collect(),
        None => served
            .outputs
            .iter()
            .map(|o| Wanted {
                name: &o.name,
                binary: binary_by_default,
            })
            .collect(),
    };
    let m = &served.model;
    outputs::respond(
        &m.model_ref.name,
        &m.model_ref.version,
        id.unwrap_or_else(|| served.request_id.to_string()),
        served.request_id,
        m.model.outputs(),
        &served.outputs,
        &wanted,
    )
    .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))
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
    if s.serving.active(&name).is_none() {
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
    s.serving.add_label(
        &name,
        Label {
            request_id: id,
            at_ms: now_ms(),
            value: req.label,
        },
    );
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
