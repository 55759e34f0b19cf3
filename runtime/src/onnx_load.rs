//! ONNX in (feature `onnx`): parse, check, type and optimize a model's ONNX bytes
//! ([`Model::load`]), or stop at the decluttered graph a compiled artifact holds.
//!
//! Architecture invariant: nothing here panics on hostile bytes (`catch_unwind` around
//! tract); ONNX `external_data` is refused before tract sees the model (it would open paths
//! named by the file); operators tract lacks are refused by name before tract builds the
//! graph. The `ai.onnx.ml` operators come from [`crate::onnx_ml`], registered into tract's
//! table.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::model::{from_optimized, refusal, Model, RuntimeError};

fn op_name(domain: &str, op: &str) -> String {
    let d = if domain.is_empty() { "ai.onnx" } else { domain };
    format!("{d}:{op}")
}

fn check_tensor(t: &pb::TensorProto) -> Result<(), RuntimeError> {
    // data_location 1 = EXTERNAL.
    if !t.external_data.is_empty() || t.data_location == Some(1) {
        return Err(RuntimeError::ExternalData {
            tensor: t.name.chars().take(80).collect(),
        });
    }
    Ok(())
}

/// Refuses external data and unsupported operators, walking subgraphs too.
fn check_graph(
    g: &pb::GraphProto,
    known: &tract_onnx::model::OnnxOpRegister,
    depth: usize,
) -> Result<(), RuntimeError> {
    if depth > 16 {
        return Err(RuntimeError::Load("subgraphs nested too deeply".into()));
    }
    for t in &g.initializer {
        check_tensor(t)?;
    }
    for n in &g.node {
        let ml = crate::onnx_ml::OPERATORS.contains(&n.op_type.as_str());
        let known_here = match n.domain.as_str() {
            "" | "ai.onnx" => !ml && known.0.contains_key(&n.op_type),
            "ai.onnx.ml" => ml,
            _ => false,
        };
        if !known_here {
            return Err(RuntimeError::UnsupportedOperator(op_name(
                &n.domain, &n.op_type,
            )));
        }
        for a in &n.attribute {
            if let Some(t) = &a.t {
                check_tensor(t)?;
            }
            for t in &a.tensors {
                check_tensor(t)?;
            }
            if let Some(sub) = &a.g {
                check_graph(sub, known, depth + 1)?;
            }
            for sub in &a.graphs {
                check_graph(sub, known, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Parses and checks ONNX bytes into tract's inference model, every open input axis a symbol.
fn inference_model(bytes: &[u8]) -> Result<InferenceModel, RuntimeError> {
    let onnx = crate::onnx_ml::onnx();
    let proto = onnx
        .proto_model_for_read(&mut &*bytes)
        .map_err(|e| RuntimeError::Decode(format!("{e:#}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| RuntimeError::Decode("no graph".into()))?;
    check_graph(graph, &onnx.op_register, 0)?;
    let mut model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| refusal("cannot be read", &e))?;
    // Unknown dims become symbols, so one optimized plan serves every size: axis 0 of
    // every input is the shared batch `N` (skl2onnx and most exporters write `None` there,
    // and inputs batched together must agree); any other unnamed axis gets its own symbol
    // `<input>_<axis>`, so `[None, None]` serves `[2, 5]`. Named dims keep the file's name.
    let batch = model.sym("N");
    for ix in 0..model.inputs.len() {
        let fact = model
            .input_fact(ix)
            .map_err(|e| RuntimeError::Load(format!("{e:#}")))?
            .clone();
        let input = model.node(model.inputs[ix].node).name.clone();
        if fact.shape.rank().concretize().is_some() {
            let dims: Vec<TDim> = fact
                .shape
                .dims()
                .enumerate()
                .map(|(axis, d)| {
                    d.concretize().unwrap_or_else(|| match axis {
                        0 => batch.clone().into(),
                        _ => model.sym(&axis_symbol(&input, axis)).into(),
                    })
                })
                .collect();
            model
                .set_input_fact(ix, fact.with_shape(dims))
                .map_err(|e| RuntimeError::Load(format!("{e:#}")))?;
        }
    }
    Ok(model)
}

fn load_inner(bytes: &[u8], threads: crate::Threads) -> Result<Model, RuntimeError> {
    let typed = inference_model(bytes)?
        .into_optimized()
        .map_err(|e| refusal("cannot be analysed", &e))?;
    from_optimized(typed, threads)
}

/// The decluttered (not optimized) typed graph of ONNX bytes: what a compiled artifact
/// holds, so every device optimizes it for its own CPU. Never panics.
pub(crate) fn decluttered(bytes: &[u8]) -> Result<TypedModel, RuntimeError> {
    catch_unwind(AssertUnwindSafe(|| {
        inference_model(bytes)?
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| refusal("cannot be analysed", &e))
    }))
    .unwrap_or(Err(RuntimeError::Panicked("loading the model")))
}

/// The symbol of an unnamed dynamic axis: `<input>_<axis>`, the input's name reduced to
/// `[A-Za-z0-9_]` so it reads as one identifier in shapes and errors.
fn axis_symbol(input: &str, axis: usize) -> String {
    let clean: String = input
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{clean}_{axis}")
}

impl Model {
    /// Parses, checks and optimizes an ONNX model. Never panics: a tract panic becomes
    /// [`RuntimeError::Panicked`].
    pub fn load(bytes: &[u8]) -> Result<Model, RuntimeError> {
        Self::load_with(bytes, crate::Threads::One)
    }

    /// As [`Model::load`], running each inference on `threads` threads (tract's
    /// multithreaded kernels; outputs are the same as on one thread).
    pub fn load_with(bytes: &[u8], threads: crate::Threads) -> Result<Model, RuntimeError> {
        catch_unwind(AssertUnwindSafe(|| load_inner(bytes, threads)))
            .unwrap_or(Err(RuntimeError::Panicked("loading the model")))
    }
}
