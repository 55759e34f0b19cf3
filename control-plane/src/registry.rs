//! Model registry: validate an ONNX file with the agent's own runtime (tract), derive its
//! drift baseline and test vectors, sign the manifest, store file and row.
//!
//! Validation uses `drover_runtime`, the code devices run, so a model this build
//! of the agent cannot load (an unsupported operator, external data, a tract panic) is
//! refused at publish time, naming the operator, instead of failing on every device.

use std::path::Path;

use drover_protocol::manifest::{
    self, Artifact, Baseline, DType, Dim, FeatureBaseline, Lineage, Manifest, ManifestError,
    PatternInput, SampledVector, TensorData, TensorSpec, TensorValue, TestVector,
    DEFAULT_CHUNK_SIZE, MAX_MODEL_SIZE,
};
use drover_protocol::trust::{sha256, SecretKey, SignedBlob};
/// `--input-shape NAME=D1,D2,…` as the API and the CLI parse it.
pub use drover_runtime::publish::parse_input_shape;
use drover_runtime::publish::PublishOptions;
use drover_runtime::{Model, RuntimeError, Threads};

use crate::store::{ModelRow, Store, StoreError};

/// Bins per numeric feature in a derived baseline (quantile edges).
pub const BASELINE_BINS: usize = 10;
/// Rows of the baseline run through the model to count reference predictions.
const MAX_PREDICTION_ROWS: usize = 5_000;
const MAX_BASELINE_ROWS: usize = 1_000_000;
const TEST_VECTORS: usize = 3;
const TOLERANCE: f32 = 1e-4;
/// The room derived test vectors may take in a manifest.
const AUTO_VECTOR_BUDGET: usize = drover_protocol::envelope::MAX_MANIFEST_LEN / 2;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("model is {0} bytes; the limit is {MAX_MODEL_SIZE}")]
    TooLarge(u64),
    #[error("model refused: {0}")]
    Runtime(RuntimeError),
    #[error("test vectors fail on this runtime: {0}")]
    SelfTest(RuntimeError),
    #[error(
        "the compiled form ({format}) {what}: {error}; publish the ONNX file as it is with \
         `--format onnx` (agents then parse it on the device), and report the model"
    )]
    Compile {
        format: &'static str,
        what: &'static str,
        error: RuntimeError,
    },
    #[error("baseline CSV: {0}")]
    Baseline(String),
    #[error(
        "the signed manifest would be {len} bytes, and a deploy command must carry it within \
         the {max_frame}-byte downlink limit every device enforces (at most {max} bytes of \
         manifest); its test vectors take {vectors} bytes and its baseline {baseline}: give \
         fewer or smaller test vectors (`--test-vectors`) or a baseline with fewer features"
    )]
    ManifestTooLarge {
        len: usize,
        max: usize,
        max_frame: usize,
        vectors: usize,
        baseline: usize,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write model file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The form devices receive a model in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// Compiled at publish into tract's own serialization (`tract-nnef`), self-tested in
    /// that form: devices load it without parsing ONNX (issue 25). The ONNX file is kept
    /// in the registry.
    #[default]
    Compiled,
    /// The ONNX file (after the publish fixes), for agents before protocol 3.
    Onnx,
}

impl std::str::FromStr for ModelFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "compiled" => Ok(ModelFormat::Compiled),
            "onnx" => Ok(ModelFormat::Onnx),
            _ => Err(format!("{s:?} is not a model format: use compiled or onnx")),
        }
    }
}

/// What `drover model publish` sends.
#[derive(Clone, Debug, Default)]
pub struct PublishRequest {
    pub name: String,
    pub version: String,
    pub model: Vec<u8>,
    pub baseline_csv: Option<String>,
    pub test_vectors: Option<Vec<TestVector>>,
    pub chunk_size: Option<u32>,
    pub lineage: Lineage,
    /// The operator's input shapes (`--input-shape NAME=1,3,640,640`), written into the
    /// ONNX file before it is signed.
    pub input_shapes: Vec<(String, Vec<Dim>)>,
    pub format: ModelFormat,
}

/// What `prepare` produced: the signed manifest, the exact bytes it describes (the
/// operator's file after the publish fixes, or its compiled form) and one line per fix.
pub struct Prepared {
    pub manifest: Manifest,
    pub blob: SignedBlob,
    pub bytes: Vec<u8>,
    /// The fixed ONNX file a compiled artifact was made from (kept in the registry).
    pub source: Option<Vec<u8>>,
    pub fixes: Vec<String>,
}

/// Compiles the fixed ONNX file and checks the compiled form against the test vectors
/// the ONNX model produced, on one thread as the control plane loads everything: what
/// devices receive is exactly what passed here.
fn compile_checked(
    onnx: &[u8],
    vectors: &[TestVector],
    sampled: &[SampledVector],
) -> Result<(Vec<u8>, Artifact), RegistryError> {
    use drover_runtime::compiled::{COMPILED_FORMAT, COMPILED_FORMAT_VERSION};
    let err = |what| {
        move |error| RegistryError::Compile {
            format: COMPILED_FORMAT,
            what,
            error,
        }
    };
    let compiled = drover_runtime::compiled::compile(onnx).map_err(err("cannot be made"))?;
    let model = Model::load_compiled(&compiled, Threads::One).map_err(err("does not load"))?;
    drover_runtime::self_test(&model, vectors)
        .and_then(|()| drover_runtime::self_test_sampled(&model, sampled))
        .map_err(err("disagrees with the ONNX model"))?;
    let artifact = Artifact {
        format: COMPILED_FORMAT.into(),
        format_version: COMPILED_FORMAT_VERSION,
        runtime_version: drover_runtime::compiled::runtime_version().into(),
        source_sha256: sha256(onnx),
    };
    Ok((compiled, artifact))
}

/// The ONNX file of a published model in the registry: the file itself, or the one its
/// compiled artifact was made from (what the training gate evaluates).
pub fn onnx_path(models_dir: &Path, row: &ModelRow) -> std::path::PathBuf {
    let source = Manifest::decode(&row.payload)
        .ok()
        .and_then(|m| m.artifact)
        .map_or(row.sha256, |a| a.source_sha256);
    models_dir.join(drover_protocol::topics::hex32(&source))
}

/// A baseline parsed from CSV: feature names and their numeric columns.
struct Table {
    names: Vec<String>,
    rows: Vec<Vec<Option<f64>>>,
}

fn parse_csv(text: &str) -> Result<Table, RegistryError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .ok_or_else(|| RegistryError::Baseline("file is empty; expected a header row".into()))?;
    let names: Vec<String> = header.split(',').map(|s| s.trim().to_owned()).collect();
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        if rows.len() >= MAX_BASELINE_ROWS {
            break;
        }
        let cells: Vec<Option<f64>> = line
            .split(',')
            .map(|c| c.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect();
        if cells.len() != names.len() {
            return Err(RegistryError::Baseline(format!(
                "row {} has {} columns, the header has {}",
                n + 2,
                cells.len(),
                names.len()
            )));
        }
        rows.push(cells);
    }
    if rows.is_empty() {
        return Err(RegistryError::Baseline("no data rows".into()));
    }
    Ok(Table { names, rows })
}

/// The bin of value `v` for ascending `edges`: bin `i` holds `edges[i-1] <= v < edges[i]`
/// (bin 0 below the first edge, the last bin at or above the last edge). Agents must bin
/// live values the same way.
pub fn bin_of(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|e| *e <= v)
}

/// Quantile bin edges and reference counts for one numeric column.
pub fn numeric_baseline(name: &str, values: &[f64]) -> FeatureBaseline {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = Vec::new();
    if !sorted.is_empty() {
        for k in 1..BASELINE_BINS {
            let e = sorted[(k * sorted.len() / BASELINE_BINS).min(sorted.len() - 1)];
            if edges.last().is_none_or(|l| e > *l) {
                edges.push(e);
            }
        }
    }
    let mut counts = vec![0u64; edges.len() + 1];
    for v in &sorted {
        counts[bin_of(&edges, *v)] += 1;
    }
    FeatureBaseline::Numeric {
        name: name.to_owned(),
        edges,
        counts,
        min: sorted.first().copied().unwrap_or(0.0),
        max: sorted.last().copied().unwrap_or(0.0),
    }
}

fn concrete_shape(spec: &TensorSpec) -> Vec<u64> {
    spec.shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) => 1,
        })
        .collect()
}

/// The model's input as one row of features, when its first input is `[batch, features]`.
fn row_input(model: &Model, row: &[f32]) -> Option<Vec<TensorValue>> {
    let [spec] = model.inputs() else { return None };
    if spec.dtype != DType::F32 || spec.shape.len() != 2 {
        return None;
    }
    match &spec.shape[1] {
        Dim::Fixed(n) if *n as usize == row.len() => {}
        Dim::Symbolic(_) => {}
        _ => return None,
    }
    Some(vec![TensorValue {
        name: spec.name.clone(),
        shape: vec![1, row.len() as u64],
        data: TensorData::F32(row.to_vec()),
    }])
}

/// Deterministic inputs for a model without a usable baseline.
fn synthetic_inputs(model: &Model, k: usize) -> Option<Vec<TensorValue>> {
    model
        .inputs()
        .iter()
        .map(|spec| {
            let shape = concrete_shape(spec);
            let n: u64 = shape.iter().product();
            if n > 1 << 20 {
                return None;
            }
            let data = match spec.dtype {
                DType::F32 | DType::F64 => TensorData::F32(
                    (0..n)
                        .map(|i| ((i as usize + k * 3) % 7) as f32 * 0.25 - 0.5)
                        .collect(),
                ),
                DType::I64 | DType::I32 => {
                    TensorData::I64((0..n).map(|i| ((i as usize + k) % 3) as i64).collect())
                }
                _ => return None,
            };
            Some(TensorValue {
                name: spec.name.clone(),
                shape,
                data,
            })
        })
        .collect()
}

fn prediction_class(out: &[TensorValue]) -> Option<usize> {
    let first = out.first()?;
    let v: Vec<f64> = match &first.data {
        TensorData::F32(d) => d.iter().map(|x| f64::from(*x)).collect(),
        TensorData::I64(d) => d.iter().map(|x| *x as f64).collect(),
    };
    match v.len() {
        0 => None,
        // One score: a binary probability, two bins split at 0.5.
        1 => Some(usize::from(v[0] >= 0.5)),
        _ => v
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i),
    }
}

/// Vectors from seeded inputs with sampled outputs, for a model full vectors could not be
/// made for.
fn sampled_vectors(model: &Model) -> Result<Vec<SampledVector>, RegistryError> {
    let mut sampled = Vec::new();
    for k in 0..TEST_VECTORS as u32 {
        let inputs = model
            .inputs()
            .iter()
            .map(|spec| PatternInput {
                name: spec.name.clone(),
                shape: concrete_shape(spec),
                dtype: spec.dtype,
                seed: k,
            })
            .collect();
        match drover_runtime::sampled::sampled_vector(model, inputs)
            .map_err(RegistryError::Runtime)?
        {
            Some(v) => sampled.push(v),
            None => break,
        }
    }
    Ok(sampled)
}

/// The manifest's test vectors: the operator's (checked here first), else `derived` (from
/// the baseline's rows), else full ones from deterministic inputs within the budget, else
/// sampled ones, so every model gets vectors that test.
fn test_vectors(
    req: &PublishRequest,
    model: &Model,
    derived: Vec<TestVector>,
) -> Result<(Vec<TestVector>, Vec<SampledVector>), RegistryError> {
    let mut vectors = derived;
    match &req.test_vectors {
        Some(given) => {
            drover_runtime::self_test(model, given).map_err(RegistryError::SelfTest)?;
            vectors = given.clone();
        }
        None if vectors.is_empty() => {
            for k in 0..TEST_VECTORS {
                let Some(inputs) = synthetic_inputs(model, k) else {
                    break;
                };
                let outputs = model.run(&inputs).map_err(RegistryError::Runtime)?;
                let v = TestVector {
                    inputs,
                    outputs,
                    tolerance: TOLERANCE,
                };
                // Derived vectors never make the manifest too large to deploy: they stop
                // at half the room a deploy command has.
                if wire_len(&vectors) + wire_len(&v) > AUTO_VECTOR_BUDGET {
                    break;
                }
                vectors.push(v);
            }
        }
        None => {}
    }
    // Whatever the input size, a model gets vectors: when full ones could not be made (an
    // input over 1 Mi elements, or no room in the manifest), generated inputs with sampled
    // outputs, a few kilobytes each.
    let sampled = if req.test_vectors.is_none() && vectors.is_empty() {
        sampled_vectors(model)?
    } else {
        Vec::new()
    };
    Ok((vectors, sampled))
}

/// Fixes, validates, derives and signs: everything `publish` does except storing. The
/// file is published as shipped: the runtime applies the operator's input shapes and the
/// semantics-keeping graph fixes (`drover_runtime::publish`) to the bytes before they are
/// hashed and signed, so devices download exactly what was validated here.
pub fn prepare(
    req: &PublishRequest,
    signing: &SecretKey,
    now_ms: u64,
) -> Result<Prepared, RegistryError> {
    manifest::validate_model_name(&req.name)?;
    if manifest::parse_semver(&req.version).is_none() {
        return Err(ManifestError::BadVersion(req.version.clone()).into());
    }
    let size = req.model.len() as u64;
    if size > MAX_MODEL_SIZE {
        return Err(RegistryError::TooLarge(size));
    }
    let opts = PublishOptions {
        input_shapes: req.input_shapes.clone(),
    };
    let fixed =
        drover_runtime::publish::prepare(&req.model, &opts).map_err(RegistryError::Runtime)?;
    let (model, bytes, fixes) = (fixed.model, fixed.bytes, fixed.fixes);
    let size = bytes.len() as u64;
    if size > MAX_MODEL_SIZE {
        return Err(RegistryError::TooLarge(size));
    }
    let table = req.baseline_csv.as_deref().map(parse_csv).transpose()?;
    let mut baseline = None;
    let mut vectors = Vec::new();
    if let Some(t) = &table {
        let features = (0..t.names.len())
            .map(|c| {
                let col: Vec<f64> = t.rows.iter().filter_map(|r| r[c]).collect();
                numeric_baseline(&t.names[c], &col)
            })
            .collect();
        let mut predictions: Vec<u64> = Vec::new();
        for (n, row) in t.rows.iter().take(MAX_PREDICTION_ROWS).enumerate() {
            if row.iter().any(Option::is_none) {
                continue;
            }
            let row: Vec<f32> = row.iter().map(|v| v.unwrap_or(0.0) as f32).collect();
            let Some(inputs) = row_input(&model, &row) else {
                break;
            };
            let out = model.run(&inputs).map_err(RegistryError::Runtime)?;
            if let Some(c) = prediction_class(&out) {
                if predictions.len() <= c {
                    predictions.resize(c + 1, 0);
                }
                predictions[c] += 1;
            }
            if n < TEST_VECTORS && req.test_vectors.is_none() {
                vectors.push(TestVector {
                    inputs,
                    outputs: out,
                    tolerance: TOLERANCE,
                });
            }
        }
        baseline = Some(Baseline {
            rows: t.rows.len() as u64,
            features,
            predictions,
        });
    }
    let (vectors, sampled) = test_vectors(req, &model, vectors)?;
    let (bytes, artifact, source) = match req.format {
        ModelFormat::Onnx => (bytes, None, None),
        ModelFormat::Compiled => {
            let (compiled, artifact) = compile_checked(&bytes, &vectors, &sampled)?;
            (compiled, Some(artifact), Some(bytes))
        }
    };
    let size = bytes.len() as u64;
    if size > MAX_MODEL_SIZE {
        return Err(RegistryError::TooLarge(size));
    }
    let chunk_size = req.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    let m = Manifest {
        name: req.name.clone(),
        version: req.version.clone(),
        sha256: sha256(&bytes),
        size,
        chunk_size,
        chunk_hashes: manifest::chunk_hashes(&bytes, chunk_size),
        inputs: model.inputs().to_vec(),
        outputs: model.outputs().to_vec(),
        baseline,
        test_vectors: vectors,
        lineage: req.lineage.clone(),
        created_at_ms: now_ms,
        sampled_vectors: sampled,
        artifact,
    };
    m.validate()?;
    check_manifest_len(&m)?;
    let blob = signing.sign_manifest(&m);
    Ok(Prepared {
        manifest: m,
        blob,
        bytes,
        source,
        fixes,
    })
}

/// Refuses a manifest no deploy command could carry (`envelope::MAX_MANIFEST_LEN`), naming
/// what takes the room.
pub fn check_manifest_len(m: &Manifest) -> Result<(), RegistryError> {
    use drover_protocol::envelope::{MAX_DOWNLINK_LEN, MAX_MANIFEST_LEN};
    let total = wire_len(m);
    if total <= MAX_MANIFEST_LEN {
        return Ok(());
    }
    Err(RegistryError::ManifestTooLarge {
        len: total,
        max: MAX_MANIFEST_LEN,
        max_frame: MAX_DOWNLINK_LEN,
        vectors: wire_len(&m.test_vectors),
        baseline: wire_len(&m.baseline),
    })
}

/// The postcard length of a value (what it takes in a signed manifest).
fn wire_len<T: serde::Serialize>(v: &T) -> usize {
    postcard::experimental::serialized_size(v).unwrap_or(usize::MAX)
}

fn spec_json(s: &TensorSpec) -> serde_json::Value {
    serde_json::json!({
        "name": s.name,
        "dtype": format!("{:?}", s.dtype),
        "shape": s.shape.iter().map(|d| match d {
            Dim::Fixed(n) => serde_json::json!(n),
            Dim::Symbolic(x) => serde_json::json!(x),
        }).collect::<Vec<_>>(),
    })
}

/// The human-facing summary stored beside the signed manifest; `fixes` are the publish
/// fixes applied to the operator's file.
pub fn summary(m: &Manifest, fixes: &[String]) -> serde_json::Value {
    let (format, runtime, source) = match &m.artifact {
        Some(a) => (
            format!("{} {}", a.format, a.format_version),
            Some(a.runtime_version.clone()),
            Some(drover_protocol::topics::hex32(&a.source_sha256)),
        ),
        None => ("onnx".to_owned(), None, None),
    };
    serde_json::json!({
        "format": format,
        "runtime_version": runtime,
        "source_sha256": source,
        "publish_fixes": fixes,
        "inputs": m.inputs.iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(spec_json).collect::<Vec<_>>(),
        "chunks": m.chunk_hashes.len(),
        "test_vectors": m.test_vectors.len(),
        "sampled_vectors": m.sampled_vectors.len(),
        "baseline": m.baseline.as_ref().map(|b| serde_json::json!({
            "rows": b.rows,
            "features": b.features.iter().map(|f| match f {
                FeatureBaseline::Numeric { name, .. } | FeatureBaseline::Categorical { name, .. } => name.clone(),
            }).collect::<Vec<_>>(),
            "predictions": b.predictions,
        })),
        "lineage": {
            "parent": m.lineage.parent.as_ref().map(|p| format!("{}@{}", p.name, p.version)),
            "training_job": m.lineage.training_job,
            "dataset": m.lineage.dataset,
            "metrics": m.lineage.metrics,
        },
    })
}

/// Validates, signs and stores a model: file under `models/<sha256>`, row in the store.
pub fn publish(
    store: &mut Store,
    models_dir: &Path,
    req: &PublishRequest,
    signing: &SecretKey,
    now_ms: u64,
) -> Result<ModelRow, RegistryError> {
    if store.model(&req.name, &req.version)?.is_some() {
        return Err(StoreError::ModelExists {
            name: req.name.clone(),
            version: req.version.clone(),
        }
        .into());
    }
    let Prepared {
        manifest: m,
        blob,
        bytes,
        source,
        fixes,
    } = prepare(req, signing, now_ms)?;
    // The shipped file, and the ONNX file a compiled one was made from.
    for file in std::iter::once(&bytes).chain(source.as_ref()) {
        let path = models_dir.join(drover_protocol::topics::hex32(&sha256(file)));
        if !path.exists() {
            drover_host::fs::write_atomic(&path, file)
                .map_err(|source| RegistryError::Io { path, source })?;
        }
    }
    let row = ModelRow {
        digest: blob.digest(),
        name: m.name.clone(),
        version: m.version.clone(),
        sha256: m.sha256,
        size: m.size,
        chunk_size: m.chunk_size,
        created_at_ms: now_ms,
        key_id: blob.key_id.to_string(),
        payload: blob.payload.clone(),
        signature: blob.signature.clone(),
        summary: summary(&m, &fixes).to_string(),
    };
    store.insert_model(&row)?;
    tracing::info!(model = %m.name, version = %m.version, digest = %drover_protocol::topics::hex32(&row.digest), "model published");
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_baseline_bins_cover_every_value() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let FeatureBaseline::Numeric {
            edges,
            counts,
            min,
            max,
            ..
        } = numeric_baseline("x", &values)
        else {
            panic!("numeric expected")
        };
        assert_eq!(edges.len(), BASELINE_BINS - 1);
        assert_eq!(counts.iter().sum::<u64>(), 1000);
        assert!(counts.iter().all(|c| *c == 100), "{counts:?}");
        assert_eq!((min, max), (0.0, 999.0));
        assert_eq!(bin_of(&edges, -1.0), 0);
        assert_eq!(bin_of(&edges, 5000.0), edges.len());
    }

    #[test]
    fn csv_with_ragged_rows_is_refused_with_the_row_number() {
        let e = parse_csv("a,b\n1,2\n3\n").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("baseline CSV: row 3 has 1 columns, the header has 2")
        );
    }
}
