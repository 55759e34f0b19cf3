//! Publish as shipped: the graph fixes the control plane applies to a model's ONNX bytes
//! before signing, so the file devices download is the one that was validated.
//!
//! Every fix keeps the model's semantics and is described in one line for the manifest's
//! lineage:
//! - `--input-shape NAME=1,3,640,640`: the operator's shape for an input (a number fixes an
//!   axis, a name keeps it symbolic); a dim the file fixes cannot be changed.
//! - `If` nodes whose condition is a constant (a `Constant` node or an initializer) are
//!   replaced by the branch taken, so tract never has to unify two branches of different
//!   shapes.
//! - `value_info` shape hints are dropped (tract infers every shape again, and exporters
//!   leave stale ones); declared output shapes are dropped only when the model does not
//!   load with them.

use std::collections::HashSet;

use drover_protocol::manifest::Dim;
use prost::Message;
use tract_onnx::pb;

use crate::model::{Model, RuntimeError};

/// The operator's choices at publish.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishOptions {
    /// `(input name, dims)`, from `--input-shape`.
    pub input_shapes: Vec<(String, Vec<Dim>)>,
}

/// The bytes to sign, the model they load as, and what was changed.
pub struct Prepared {
    pub bytes: Vec<u8>,
    pub model: Model,
    /// One line per fix, for the manifest's lineage; empty when the file is unchanged.
    pub fixes: Vec<String>,
}

/// Parses `NAME=1,3,640,640` (`--input-shape`); an axis is a number or a symbol name.
pub fn parse_input_shape(arg: &str) -> Result<(String, Vec<Dim>), String> {
    let (name, dims) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected NAME=D1,D2,… (for example x=1,3,640,640)"))?;
    if name.is_empty() {
        return Err(format!("{arg:?}: the input name is empty"));
    }
    let dims = dims
        .split(',')
        .map(|d| {
            let d = d.trim();
            if let Ok(n) = d.parse::<u64>() {
                Ok(Dim::Fixed(n))
            } else if !d.is_empty()
                && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !d.starts_with(|c: char| c.is_ascii_digit())
            {
                Ok(Dim::Symbolic(d.to_owned()))
            } else {
                Err(format!(
                    "{arg:?}: axis {d:?} is neither a number nor a symbol name ([A-Za-z_][A-Za-z0-9_]*)"
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), dims))
}

fn fmt_dims(t: Option<&pb::TypeProto>) -> String {
    let Some(pb::type_proto::Value::TensorType(tt)) = t.and_then(|t| t.value.as_ref()) else {
        return "?".into();
    };
    let Some(shape) = &tt.shape else {
        return "?".into();
    };
    let dims: Vec<String> = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v.to_string(),
            Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                p.clone()
            }
            _ => "?".into(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

fn tensor_shape(t: &mut Option<pb::TypeProto>) -> Option<&mut pb::TensorShapeProto> {
    let pb::type_proto::Value::TensorType(tt) = t.as_mut()?.value.as_mut()?;
    tt.shape.as_mut()
}

fn set_input_shape(
    g: &mut pb::GraphProto,
    name: &str,
    dims: &[Dim],
) -> Result<String, RuntimeError> {
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let names: Vec<String> = g
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| i.name.clone())
        .collect();
    let bad = |detail: String| RuntimeError::InputOption {
        input: name.to_owned(),
        detail,
    };
    let input = g
        .input
        .iter_mut()
        .find(|i| i.name == name && names.contains(&i.name))
        .ok_or_else(|| {
            bad(format!(
                "the model has no such input; its inputs are {names:?}"
            ))
        })?;
    let before = fmt_dims(input.r#type.as_ref());
    use pb::tensor_shape_proto::dimension::Value as V;
    let shape = tensor_shape(&mut input.r#type)
        .ok_or_else(|| bad("the file gives this input no tensor shape to set".into()))?;
    if shape.dim.len() != dims.len() {
        return Err(bad(format!(
            "the model's input has {} axes {before}, --input-shape gives {}",
            shape.dim.len(),
            dims.len()
        )));
    }
    for (axis, (d, want)) in shape.dim.iter_mut().zip(dims).enumerate() {
        // A negative dim_value (paddle2onnx writes -1) is an open axis.
        let fixed = matches!(d.value, Some(V::DimValue(v)) if v >= 0);
        if let (true, Some(V::DimValue(have)), Dim::Fixed(w)) = (fixed, &d.value, want) {
            if *have as u64 != *w {
                return Err(bad(format!(
                    "axis {axis} is fixed to {have} in the file {before}; it cannot be {w}"
                )));
            }
        }
        if let (true, Some(V::DimValue(have)), Dim::Symbolic(s)) = (fixed, &d.value, want) {
            return Err(bad(format!(
                "axis {axis} is fixed to {have} in the file {before}; it cannot be the symbol {s}"
            )));
        }
        d.value = Some(match want {
            Dim::Fixed(w) => V::DimValue(*w as i64),
            Dim::Symbolic(s) => V::DimParam(s.clone()),
        });
    }
    Ok(format!(
        "input {name:?}: shape {before} -> {} (--input-shape)",
        fmt_dims(input.r#type.as_ref())
    ))
}

/// The value of a constant boolean condition, when `name` is one: a scalar (or
/// one-element) bool or integer initializer or `Constant` node output.
fn constant_condition(g: &pb::GraphProto, name: &str) -> Option<bool> {
    let t = g.initializer.iter().find(|t| t.name == name).or_else(|| {
        g.node
            .iter()
            .find(|n| n.op_type == "Constant" && n.output.first().map(String::as_str) == Some(name))
            .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
            .and_then(|a| a.t.as_ref())
    })?;
    if t.dims.iter().product::<i64>() != 1 {
        return None;
    }
    // 9 = BOOL, 6 = INT32, 7 = INT64, 2 = UINT8
    match t.data_type {
        9 | 6 | 2 => t
            .int32_data
            .first()
            .map(|v| *v != 0)
            .or_else(|| t.raw_data.first().map(|b| *b != 0)),
        7 => t
            .int64_data
            .first()
            .map(|v| *v != 0)
            .or_else(|| t.raw_data.first().map(|b| *b != 0)),
        _ => None,
    }
}

/// Every name a graph (and its subgraphs) defines.
fn defined_names(g: &pb::GraphProto, out: &mut HashSet<String>) {
    out.extend(g.input.iter().map(|i| i.name.clone()));
    out.extend(g.initializer.iter().map(|i| i.name.clone()));
    for n in &g.node {
        out.extend(n.output.iter().cloned());
        for a in &n.attribute {
            if let Some(sub) = &a.g {
                defined_names(sub, out);
            }
        }
    }
}

/// Replaces each `If` with a constant condition by the nodes of the branch taken, then
/// does the same inside the remaining subgraphs. Returns one line per folded node.
fn fold_constant_ifs(g: &mut pb::GraphProto, fixes: &mut Vec<String>, depth: usize) {
    if depth > 16 {
        return;
    }
    // The names this graph itself defines (not its subgraphs'): a branch inlined here
    // must not define any of them.
    let parent: HashSet<String> = g
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(g.initializer.iter().map(|i| i.name.clone()))
        .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect();
    let conds: Vec<Option<bool>> = g
        .node
        .iter()
        .map(|n| {
            (n.op_type == "If" && n.domain.is_empty())
                .then(|| n.input.first().and_then(|c| constant_condition(g, c)))
                .flatten()
        })
        .collect();
    let mut nodes = Vec::with_capacity(g.node.len());
    for (mut n, cond) in std::mem::take(&mut g.node).into_iter().zip(conds) {
        let branch_name = match cond {
            Some(true) => "then_branch",
            Some(false) => "else_branch",
            None => {
                for a in &mut n.attribute {
                    if let Some(sub) = a.g.as_mut() {
                        fold_constant_ifs(sub, fixes, depth + 1);
                    }
                }
                nodes.push(n);
                continue;
            }
        };
        let Some(branch) = n
            .attribute
            .iter_mut()
            .find(|a| a.name == branch_name)
            .and_then(|a| a.g.take())
        else {
            nodes.push(n);
            continue;
        };
        if branch.output.len() != n.output.len() {
            nodes.push(n);
            continue;
        }
        let mut branch = branch;
        fold_constant_ifs(&mut branch, fixes, depth + 1);
        let mut inner = HashSet::new();
        defined_names(&branch, &mut inner);
        if inner.iter().any(|name| parent.contains(name)) {
            // A branch name shadows one of its parent's: inlining would change what the
            // name means. Leave this If to tract.
            if let Some(a) = n.attribute.iter_mut().find(|a| a.name == branch_name) {
                a.g = Some(branch);
            }
            nodes.push(n);
            continue;
        }
        g.initializer.extend(branch.initializer);
        nodes.extend(branch.node);
        for (k, (from, to)) in branch.output.iter().zip(&n.output).enumerate() {
            nodes.push(pb::NodeProto {
                name: format!("{}/{branch_name}/output_{k}", n.name),
                op_type: "Identity".into(),
                input: vec![from.name.clone()],
                output: vec![to.clone()],
                ..Default::default()
            });
        }
        fixes.push(format!(
            "If node {:?}: condition is the constant {}, replaced by its {branch_name}",
            n.name,
            cond == Some(true)
        ));
    }
    g.node = nodes;
}

fn drop_value_info(g: &mut pb::GraphProto) -> usize {
    let mut n = g.value_info.len();
    g.value_info.clear();
    for node in &mut g.node {
        for a in &mut node.attribute {
            if let Some(sub) = a.g.as_mut() {
                n += drop_value_info(sub);
            }
        }
    }
    n
}

fn drop_output_shapes(g: &mut pb::GraphProto) -> Vec<String> {
    g.output
        .iter_mut()
        .filter_map(|o| match o.r#type.as_mut()?.value.as_mut()? {
            pb::type_proto::Value::TensorType(tt) if tt.shape.is_some() => {
                let had = fmt_dims(o.r#type.as_ref());
                if let Some(pb::type_proto::Value::TensorType(tt)) =
                    o.r#type.as_mut().and_then(|t| t.value.as_mut())
                {
                    tt.shape = None;
                }
                Some(format!("{:?} {had}", o.name))
            }
            _ => None,
        })
        .collect()
}

/// Applies the operator's shapes and the semantics-keeping fixes, then loads the result
/// with the runtime devices run. A file that needs no fix is returned as given (same
/// sha256); shape hints are dropped only when the model does not load with them, and a
/// model that loads in no form is refused with the error of its first form.
pub fn prepare(bytes: &[u8], opts: &PublishOptions) -> Result<Prepared, RuntimeError> {
    let mut proto =
        pb::ModelProto::decode(bytes).map_err(|e| RuntimeError::Decode(e.to_string()))?;
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| RuntimeError::Decode("no graph".into()))?;
    let mut fixes = Vec::new();
    let mut seen = HashSet::new();
    for (name, dims) in &opts.input_shapes {
        if !seen.insert(name.clone()) {
            return Err(RuntimeError::InputOption {
                input: name.clone(),
                detail: "--input-shape given twice for it".into(),
            });
        }
        fixes.push(set_input_shape(graph, name, dims)?);
    }
    fold_constant_ifs(graph, &mut fixes, 0);
    let first = if fixes.is_empty() {
        bytes.to_vec()
    } else {
        proto.encode_to_vec()
    };
    let first_err = match Model::load(&first) {
        Ok(model) => {
            return Ok(Prepared {
                bytes: first,
                model,
                fixes,
            })
        }
        Err(e) => e,
    };
    let graph = proto.graph.as_mut().expect("checked above");
    let dropped = drop_value_info(graph);
    if dropped > 0 {
        fixes.push(format!(
            "{dropped} value_info shape hints dropped (tract infers every shape again)"
        ));
        let fixed = proto.encode_to_vec();
        if let Ok(model) = Model::load(&fixed) {
            return Ok(Prepared {
                bytes: fixed,
                model,
                fixes,
            });
        }
    }
    let graph = proto.graph.as_mut().expect("checked above");
    let outputs = drop_output_shapes(graph);
    if outputs.is_empty() {
        return Err(first_err);
    }
    // A declared output shape the exporter got wrong (ddddocr declares [1, seqlen] for a
    // [T, 1, C] output) stops tract's analysis; it is only a hint.
    fixes.push(format!(
        "declared output shapes dropped (tract infers them): {}",
        outputs.join(", ")
    ));
    let fixed = proto.encode_to_vec();
    let model = Model::load(&fixed).map_err(|_| first_err)?;
    Ok(Prepared {
        bytes: fixed,
        model,
        fixes,
    })
}

#[cfg(test)]
#[path = "publish_tests.rs"]
mod tests;
