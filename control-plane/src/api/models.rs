//! `/v1/models`: publish (validate with the device runtime, sign), list, show.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use drover_protocol::manifest::{Lineage, TestVector};
use drover_protocol::topics::hex32;

use super::{blocking, not_found, ApiError, AppState};
use crate::registry::{self, ModelFormat, PublishRequest};
use crate::store::ModelRow;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelView {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub sha256: String,
    pub size: u64,
    pub chunk_size: u32,
    pub created_at_ms: u64,
    pub key_id: String,
    pub summary: serde_json::Value,
}

impl From<ModelRow> for ModelView {
    fn from(m: ModelRow) -> Self {
        Self {
            name: m.name,
            version: m.version,
            digest: hex32(&m.digest),
            sha256: hex32(&m.sha256),
            size: m.size,
            chunk_size: m.chunk_size,
            created_at_ms: m.created_at_ms,
            key_id: m.key_id,
            summary: serde_json::from_str(&m.summary).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PublishBody {
    pub name: String,
    pub version: String,
    /// The ONNX file, hex-encoded.
    pub model_hex: String,
    #[serde(default)]
    pub baseline_csv: Option<String>,
    /// Test vectors in the protocol's JSON form (`[{inputs, outputs, tolerance}]`).
    #[serde(default)]
    pub test_vectors: Option<Vec<TestVector>>,
    #[serde(default)]
    pub chunk_size: Option<u32>,
    #[serde(default)]
    pub training_job: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// `NAME=D1,D2,…` per input (`--input-shape`): a number fixes an axis, a name keeps it
    /// symbolic.
    #[serde(default)]
    pub input_shapes: Vec<String>,
    /// Append tract's whole error chain to a refusal (`--verbose`).
    #[serde(default)]
    pub verbose: bool,
    /// What devices receive: `compiled` (default) or `onnx` (`--format`).
    #[serde(default)]
    pub format: ModelFormat,
}

pub(super) async fn list_models(
    State(st): State<AppState>,
) -> Result<Json<Vec<ModelView>>, ApiError> {
    let rows = blocking(&st, |_, s| Ok(s.models()?)).await?;
    Ok(Json(rows.into_iter().map(ModelView::from).collect()))
}

pub(super) async fn show_model(
    State(st): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelView>, ApiError> {
    let (n, v) = (name.clone(), version.clone());
    let row = blocking(&st, move |_, s| Ok(s.model(&n, &v)?)).await?;
    row.map(|r| Json(r.into()))
        .ok_or_else(|| not_found(&format!("model {name}@{version}")))
}

pub(super) async fn publish(
    State(st): State<AppState>,
    Json(body): Json<PublishBody>,
) -> Result<(StatusCode, Json<ModelView>), ApiError> {
    let model = hex::decode(body.model_hex.trim()).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("model_hex is not hex: {e}"),
        )
    })?;
    let input_shapes = body
        .input_shapes
        .iter()
        .map(|a| drover_runtime::publish::parse_input_shape(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("--input-shape {e}")))?;
    let verbose = body.verbose;
    let req = PublishRequest {
        input_shapes,
        format: body.format,
        name: body.name,
        version: body.version,
        model,
        baseline_csv: body.baseline_csv,
        test_vectors: body.test_vectors,
        chunk_size: body.chunk_size,
        lineage: Lineage {
            parent: None,
            training_job: body.training_job,
            dataset: body.dataset,
            metrics: body.metrics,
        },
    };
    let row = blocking(&st, move |sh, s| {
        registry::publish(
            s,
            &sh.paths.models_dir(),
            &req,
            &sh.keys.current().signing,
            sh.clock.unix_ms(),
        )
        .map_err(|e| publish_error(e, verbose))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// A publish refusal; with `verbose`, a runtime refusal carries tract's whole error chain
/// after the message (the message alone names the node, the operator and what to do).
fn publish_error(e: registry::RegistryError, verbose: bool) -> ApiError {
    let trace = match &e {
        registry::RegistryError::Runtime(drover_runtime::RuntimeError::Refused(r)) if verbose => {
            Some(r.trace.clone())
        }
        _ => None,
    };
    let mut api = ApiError::from(e);
    if let Some(t) = trace {
        api.1 = format!("{}\n\ntract's error chain:\n{t}", api.1);
    }
    api
}
