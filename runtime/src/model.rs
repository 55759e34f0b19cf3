//! The loaded model: inference, self-test, and the errors both load paths share.
//!
//! Used by the agent before activating a model and by the control plane at publish time,
//! so both refuse the same models for the same reasons. A model comes from ONNX bytes
//! ([`Model::load`], `crate::onnx_load`, feature `onnx`) or from a compiled artifact
//! ([`Model::load_compiled`], [`crate::compiled`]); both end in the same optimized plan
//! built here.
//!
//! Architecture invariant: nothing here panics on hostile bytes. tract is known to panic
//! on some malformed models, so loading and running go through `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use drover_protocol::manifest::{DType, Dim, TensorData, TensorSpec, TensorValue, TestVector};
use thiserror::Error;
use tract_nnef::prelude::*;

/// Largest tensor (elements) a request may carry, so a client cannot make us allocate GBs.
pub const MAX_TENSOR_ELEMENTS: u64 = 16 * 1024 * 1024;

#[derive(Clone, Debug, Error, PartialEq)]
pub enum RuntimeError {
    #[error("model is not a valid ONNX protobuf: {0}")]
    Decode(String),
    #[error("model uses ONNX external data (tensor {tensor:?}); refused: weights must be inline")]
    ExternalData { tensor: String },
    #[error("model uses operator {0} which this agent's runtime does not support")]
    UnsupportedOperator(String),
    #[error("model does not load: {0}")]
    Load(String),
    #[error("compiled model artifact does not load: {0}")]
    Compiled(String),
    #[error("tract panicked while {0} (caught; the agent keeps running)")]
    Panicked(&'static str),
    #[error("model expects {expected} inputs, got {got}")]
    InputCount { expected: usize, got: usize },
    #[error("input {name:?}: expected {expected}, got {got}")]
    InputType {
        name: String,
        expected: String,
        got: String,
    },
    #[error("input {name:?}: shape {got:?} does not match the model's {expected}")]
    InputShape {
        name: String,
        expected: String,
        got: Vec<u64>,
    },
    #[error("input {name:?}: shape {shape:?} needs {expected} values, got {got}")]
    DataLength {
        name: String,
        shape: Vec<u64>,
        expected: u64,
        got: usize,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("output {name:?} has type {dtype} which the wire cannot carry")]
    OutputType { name: String, dtype: String },
    #[error("--input-shape {input}: {detail}")]
    InputOption { input: String, detail: String },
    #[error("{0}")]
    Refused(Box<Refusal>),
    #[error("self-test vector {vector}: {detail}")]
    SelfTest { vector: usize, detail: String },
}

/// A model tract stopped at one node: what the operator reads, and tract's whole error
/// chain for `--verbose`.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub node: String,
    pub op: String,
    pub what: String,
    pub cause: String,
    pub hint: String,
    pub trace: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Refusal {
            node,
            op,
            what,
            cause,
            hint,
            ..
        } = self;
        write!(f, "node {node:?} ({op}) {what}: {cause}; {hint}")
    }
}

/// A loaded, optimized model ready to run concurrently (`run` takes `&self`).
pub struct Model {
    pub(crate) plan: Arc<TypedRunnableModel>,
    /// Threads one inference uses (1: tract's inline path).
    threads: usize,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn dtype_of(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::U8 => DType::U8,
        DatumType::Bool => DType::Bool,
        DatumType::String => DType::String,
        _ => return None,
    })
}

fn spec_of(name: String, fact: &TypedFact) -> TensorSpec {
    let shape = fact
        .shape
        .iter()
        .map(|d| match d.to_i64() {
            Ok(v) if v >= 0 => Dim::Fixed(v as u64),
            _ => Dim::Symbolic(d.to_string()),
        })
        .collect();
    TensorSpec {
        name,
        // Types the wire lacks (f16, u16, …) are described as F32: a client sends F32 and
        // `run` refuses it with a precise message.
        dtype: dtype_of(fact.datum_type).unwrap_or(DType::F32),
        shape,
    }
}

fn fmt_shape(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Symbolic(s) => s.clone(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// The model from an optimized typed graph: the input and output specs the wire sees and
/// the runnable plan on `threads`.
pub(crate) fn from_optimized(
    typed: TypedModel,
    threads: crate::Threads,
) -> Result<Model, RuntimeError> {
    let mut inputs = Vec::new();
    for (ix, outlet) in typed.input_outlets().map_err(load_err)?.iter().enumerate() {
        let name = typed.node(outlet.node).name.clone();
        inputs.push(spec_of(name, typed.input_fact(ix).map_err(load_err)?));
    }
    let mut outputs = Vec::new();
    for (ix, outlet) in typed.output_outlets().map_err(load_err)?.iter().enumerate() {
        let name = typed
            .outlet_label(*outlet)
            .map(str::to_owned)
            .unwrap_or_else(|| typed.node(outlet.node).name.clone());
        outputs.push(spec_of(name, typed.output_fact(ix).map_err(load_err)?));
    }
    let options = tract_core::runtime::RunOptions {
        executor: threads.executor(),
        ..Default::default()
    };
    let plan = typed
        .into_runnable_with_options(&options)
        .map_err(load_err)?;
    Ok(Model {
        plan,
        threads: threads.count(),
        inputs,
        outputs,
    })
}

/// The node a tract error chain names (`node #12 "name" Op`), as `(name, op)`.
fn node_in(msg: &str) -> Option<(String, String)> {
    let at = msg.find("node #")?;
    let rest = &msg[at + 6..];
    let rest = rest
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .strip_prefix(" \"")?;
    let (name, rest) = rest.split_once('"')?;
    let op: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':'))
        .collect();
    (!op.is_empty()).then(|| (name.to_owned(), op))
}

/// A load failure as the operator reads it: the node and operator tract stopped at, the
/// root cause, and what to do; tract's whole chain is kept in `trace` (`--verbose`).
pub(crate) fn refusal(what: &str, e: &TractError) -> RuntimeError {
    let trace = format!("{e:#}");
    let Some((node, op)) = e.chain().find_map(|c| node_in(&c.to_string())) else {
        return RuntimeError::Load(trace);
    };
    let cause = e.root_cause().to_string();
    let cause: String = cause
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    let shapes = [
        "unify",
        "Clashing",
        "Sym(",
        "symbol",
        "shape",
        "Undetermined",
    ];
    let hint = if op == "If" {
        "its two branches give outputs of different shapes or types and its condition is \
         not a constant: re-export the model for one configuration (the branch you run), or \
         give the inputs' shapes with `drover model publish --input-shape NAME=D1,D2,...`"
    } else if shapes.iter().any(|k| trace.contains(k)) {
        "its shapes depend on dims the file leaves open: give the inputs' shapes with \
         `drover model publish --input-shape NAME=D1,D2,...` (one per input; a name keeps an \
         axis symbolic)"
    } else {
        "this runtime cannot run that node as exported: re-export the model (another opset, \
         or without this operator) or report it with the model attached"
    };
    RuntimeError::Refused(Box::new(Refusal {
        node,
        op,
        what: what.to_owned(),
        cause,
        hint: hint.to_owned(),
        trace,
    }))
}

pub(crate) fn load_err(e: TractError) -> RuntimeError {
    RuntimeError::Load(format!("{e:#}"))
}

fn to_tensor(spec: &TensorSpec, v: &TensorValue) -> Result<Tensor, RuntimeError> {
    if v.shape.len() != spec.shape.len()
        || v.shape
            .iter()
            .zip(&spec.shape)
            .any(|(got, want)| match want {
                Dim::Fixed(w) => got != w,
                Dim::Symbolic(_) => false,
            })
    {
        return Err(RuntimeError::InputShape {
            name: spec.name.clone(),
            expected: fmt_shape(&spec.shape),
            got: v.shape.clone(),
        });
    }
    let expected = v
        .shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| RuntimeError::InputShape {
            name: spec.name.clone(),
            expected: format!("at most {MAX_TENSOR_ELEMENTS} elements"),
            got: v.shape.clone(),
        })?;
    let (len, got_type) = match &v.data {
        TensorData::F32(d) => (d.len(), "F32"),
        TensorData::I64(d) => (d.len(), "I64"),
    };
    if len as u64 != expected {
        return Err(RuntimeError::DataLength {
            name: spec.name.clone(),
            shape: v.shape.clone(),
            expected,
            got: len,
        });
    }
    let shape: Vec<usize> = v.shape.iter().map(|d| *d as usize).collect();
    let type_err = || RuntimeError::InputType {
        name: spec.name.clone(),
        expected: format!("{:?}", spec.dtype),
        got: got_type.into(),
    };
    let t = match (&v.data, spec.dtype) {
        (TensorData::F32(d), DType::F32) => Tensor::from_shape(&shape, d),
        (TensorData::F32(d), DType::F64) => {
            let d: Vec<f64> = d.iter().map(|x| f64::from(*x)).collect();
            Tensor::from_shape(&shape, &d)
        }
        (TensorData::I64(d), DType::I64) => Tensor::from_shape(&shape, d),
        (TensorData::I64(d), DType::I32) => {
            let d: Vec<i32> = d
                .iter()
                .map(|x| i32::try_from(*x))
                .collect::<Result<_, _>>()
                .map_err(|_| type_err())?;
            Tensor::from_shape(&shape, &d)
        }
        _ => return Err(type_err()),
    };
    t.map_err(|e| RuntimeError::Run(format!("{e:#}")))
}

fn from_tensor(name: &str, t: &Tensor) -> Result<TensorValue, RuntimeError> {
    let shape = t.shape().iter().map(|d| *d as u64).collect();
    let err = |e: TractError| RuntimeError::Run(format!("{e:#}"));
    let data = match t.datum_type() {
        DatumType::F32 => TensorData::F32(
            t.to_plain_array_view::<f32>()
                .map_err(err)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::F64 => TensorData::F32(
            t.to_plain_array_view::<f64>()
                .map_err(err)?
                .iter()
                .map(|x| *x as f32)
                .collect(),
        ),
        DatumType::I64 => TensorData::I64(
            t.to_plain_array_view::<i64>()
                .map_err(err)?
                .iter()
                .copied()
                .collect(),
        ),
        DatumType::I32 => TensorData::I64(
            t.to_plain_array_view::<i32>()
                .map_err(err)?
                .iter()
                .map(|x| i64::from(*x))
                .collect(),
        ),
        DatumType::U8 => TensorData::I64(
            t.to_plain_array_view::<u8>()
                .map_err(err)?
                .iter()
                .map(|x| i64::from(*x))
                .collect(),
        ),
        DatumType::Bool => TensorData::I64(
            t.to_plain_array_view::<bool>()
                .map_err(err)?
                .iter()
                .map(|x| i64::from(*x))
                .collect(),
        ),
        DatumType::TDim => {
            let c = t.cast_to::<i64>().map_err(err)?;
            TensorData::I64(
                c.to_plain_array_view::<i64>()
                    .map_err(err)?
                    .iter()
                    .copied()
                    .collect(),
            )
        }
        other => {
            return Err(RuntimeError::OutputType {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            })
        }
    };
    Ok(TensorValue {
        name: name.to_owned(),
        shape,
        data,
    })
}

impl Model {
    /// The optimized plan's operators in evaluation order (diagnostics, and tests that two
    /// load paths give the same plan).
    pub fn plan_ops(&self) -> Vec<String> {
        let model = self.plan.model();
        model
            .eval_order()
            .unwrap_or_default()
            .into_iter()
            .map(|n| model.node(n).op().name().to_string())
            .collect()
    }

    /// Threads one inference uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Runs one inference. Inputs are matched by name when every name matches, else by
    /// position. Shapes and types are checked against the model before tract sees them.
    pub fn run(&self, inputs: &[TensorValue]) -> Result<Vec<TensorValue>, RuntimeError> {
        if inputs.len() != self.inputs.len() {
            return Err(RuntimeError::InputCount {
                expected: self.inputs.len(),
                got: inputs.len(),
            });
        }
        let by_name = self
            .inputs
            .iter()
            .all(|s| inputs.iter().any(|v| v.name == s.name));
        let mut tensors: TVec<TValue> = TVec::new();
        for (ix, spec) in self.inputs.iter().enumerate() {
            let v = if by_name {
                inputs.iter().find(|v| v.name == spec.name)
            } else {
                inputs.get(ix)
            };
            let v = v.ok_or(RuntimeError::InputCount {
                expected: self.inputs.len(),
                got: inputs.len(),
            })?;
            tensors.push(to_tensor(spec, v)?.into());
        }
        let out = catch_unwind(AssertUnwindSafe(|| self.plan.run(tensors)))
            .map_err(|_| RuntimeError::Panicked("running the model"))?
            .map_err(|e| RuntimeError::Run(format!("{e:#}")))?;
        out.iter()
            .zip(&self.outputs)
            .map(|(t, spec)| from_tensor(&spec.name, t))
            .collect()
    }
}

/// Runs every test vector and compares each output element within the vector's
/// tolerance. The first mismatch is reported with its position.
pub fn self_test(model: &Model, vectors: &[TestVector]) -> Result<(), RuntimeError> {
    for (vi, tv) in vectors.iter().enumerate() {
        let got = model.run(&tv.inputs).map_err(|e| RuntimeError::SelfTest {
            vector: vi,
            detail: e.to_string(),
        })?;
        for want in &tv.outputs {
            let g =
                got.iter()
                    .find(|g| g.name == want.name)
                    .ok_or_else(|| RuntimeError::SelfTest {
                        vector: vi,
                        detail: format!("model has no output {:?}", want.name),
                    })?;
            compare(g, want, tv.tolerance)
                .map_err(|detail| RuntimeError::SelfTest { vector: vi, detail })?;
        }
    }
    Ok(())
}

/// Element-wise comparison within `tolerance` (absolute).
pub fn compare(got: &TensorValue, want: &TensorValue, tolerance: f32) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!(
            "output {:?} shape {:?}, expected {:?}",
            want.name, got.shape, want.shape
        ));
    }
    let as_f64 = |d: &TensorData| -> Vec<f64> {
        match d {
            TensorData::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            TensorData::I64(v) => v.iter().map(|x| *x as f64).collect(),
        }
    };
    let (g, w) = (as_f64(&got.data), as_f64(&want.data));
    if g.len() != w.len() {
        return Err(format!("output {:?} length differs", want.name));
    }
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a - b).abs() <= f64::from(tolerance) || (a.is_nan() && b.is_nan());
        if !ok {
            return Err(format!(
                "output {:?} element {i} is {a}, expected {b} (tolerance {tolerance})",
                want.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "onnx")]
    #[test]
    fn garbage_bytes_are_refused_not_panicking() {
        for bytes in [&b""[..], b"\x00\x01\x02", &[0xff; 64]] {
            assert!(Model::load(bytes).is_err());
        }
    }

    #[test]
    fn compare_reports_the_first_element_out_of_tolerance() {
        let v = |d: Vec<f32>| TensorValue {
            name: "y".into(),
            shape: vec![d.len() as u64],
            data: TensorData::F32(d),
        };
        assert!(compare(&v(vec![1.0, 2.0]), &v(vec![1.0005, 2.0]), 1e-3).is_ok());
        let e = compare(&v(vec![1.0, 2.5]), &v(vec![1.0, 2.0]), 1e-3).unwrap_err();
        assert!(e.contains("element 1"), "{e}");
    }
}
