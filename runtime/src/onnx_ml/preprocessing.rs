//! Row-wise preprocessing: Scaler, Normalizer, Imputer, Binarizer.

use tract_nnef::internal::*;
#[cfg(feature = "onnx")]
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
#[cfg(feature = "onnx")]
use tract_onnx::pb::NodeProto;
#[cfg(feature = "onnx")]
use tract_onnx::tract_hir::internal::*;

use super::nnef_io::{self, attr_str, float, input, one_output};
use super::{as_f32, ml_op, rows_cols, tensor_f32};

#[cfg(feature = "onnx")]
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("Normalizer", normalizer);
    reg.insert("Imputer", imputer);
    reg.insert("Binarizer", binarizer);
}

#[cfg(feature = "onnx")]
type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// A per-column parameter: one value for every column, or one per column.
fn per_column(values: &[f32], cols: usize, what: &str) -> TractResult<()> {
    ensure!(
        values.len() == 1 || values.len() == cols,
        "{what} has {} values for {cols} columns",
        values.len()
    );
    Ok(())
}

#[cfg(feature = "onnx")]
fn same_shape_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    dt: Option<DatumType>,
) -> InferenceResult {
    s.equals(&outputs[0].shape, &inputs[0].shape)?;
    match dt {
        Some(dt) => s.equals(&outputs[0].datum_type, dt)?,
        None => s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?,
    }
    Ok(())
}

/// `Y = (X - offset) * scale`, float output whatever the numeric input.
#[derive(Clone, Debug)]
pub struct Scaler(Arc<ScalerParams>);

#[derive(Debug)]
pub struct ScalerParams {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

#[cfg(feature = "onnx")]
fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let offset: Vec<f32> = node
        .get_attr_opt_vec("offset")?
        .unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    ensure!(
        !offset.is_empty() && !scale.is_empty(),
        "Scaler needs offset and scale"
    );
    Ok((
        expand(Scaler(Arc::new(ScalerParams { offset, scale }))),
        vec![],
    ))
}

impl Scaler {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_rules(s, inputs, outputs, Some(DatumType::F32))
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = as_f32(&inputs[0])?;
        let (_, cols) = rows_cols(inputs[0].shape())?;
        let p = &self.0;
        per_column(&p.offset, cols, "Scaler offset")?;
        per_column(&p.scale, cols, "Scaler scale")?;
        let out: Vec<f32> = if p.offset.len() == cols && p.scale.len() == cols {
            x.chunks_exact(cols.max(1))
                .flat_map(|row| {
                    row.iter()
                        .zip(p.offset.iter().zip(&p.scale))
                        .map(|(v, (o, s))| (v - o) * s)
                })
                .collect()
        } else {
            x.iter()
                .enumerate()
                .map(|(i, v)| {
                    let c = i % cols.max(1);
                    let o = p.offset[if p.offset.len() == 1 { 0 } else { c }];
                    let s = p.scale[if p.scale.len() == 1 { 0 } else { c }];
                    (v - o) * s
                })
                .collect()
        };
        Ok(tvec!(tensor_f32(inputs[0].shape(), out)?))
    }
}
ml_op!(Scaler, "ai.onnx.ml.Scaler", inputs: 1, outputs: 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Norm {
    Max,
    L1,
    L2,
}

impl Norm {
    fn parse(s: &str) -> TractResult<Norm> {
        Ok(match s {
            "MAX" => Norm::Max,
            "L1" => Norm::L1,
            "L2" => Norm::L2,
            other => bail!("Normalizer: unknown norm {other:?}"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Norm::Max => "MAX",
            Norm::L1 => "L1",
            Norm::L2 => "L2",
        }
    }
}

/// Normalizes each row by its max (signed, as onnxruntime does), L1 or L2 norm; a row whose
/// norm is zero is left as it is.
#[derive(Clone, Debug)]
pub struct Normalizer(Arc<Norm>);

#[cfg(feature = "onnx")]
fn normalizer(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let norm = Norm::parse(node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX"))?;
    Ok((expand(Normalizer(Arc::new(norm))), vec![]))
}

impl Normalizer {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_rules(s, inputs, outputs, Some(DatumType::F32))
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut out = as_f32(&inputs[0])?.into_owned();
        let (_, cols) = rows_cols(inputs[0].shape())?;
        for row in out.chunks_exact_mut(cols.max(1)) {
            let norm = match *self.0 {
                Norm::Max => row.iter().copied().fold(f32::MIN, f32::max),
                Norm::L1 => row.iter().map(|v| v.abs()).sum(),
                Norm::L2 => row.iter().map(|v| v * v).sum::<f32>().sqrt(),
            };
            if norm != 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok(tvec!(tensor_f32(inputs[0].shape(), out)?))
    }
}
ml_op!(Normalizer, "ai.onnx.ml.Normalizer", inputs: 1, outputs: 1);

/// Replaces `replaced_value_float` (NaN by default in skl2onnx's exports) with a per-column
/// value.
#[derive(Clone, Debug)]
pub struct Imputer(Arc<ImputerParams>);

#[derive(Debug)]
pub struct ImputerParams {
    imputed: Vec<f32>,
    replaced: f32,
}

#[cfg(feature = "onnx")]
fn imputer(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    ensure!(
        node.get_attr_opt_vec::<i64>("imputed_value_int64s")?
            .is_none(),
        "Imputer over int64 values is not supported (only imputed_value_floats)"
    );
    let imputed: Vec<f32> = node.get_attr_vec("imputed_value_floats")?;
    ensure!(
        !imputed.is_empty(),
        "Imputer: imputed_value_floats is empty"
    );
    let replaced: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
    Ok((
        expand(Imputer(Arc::new(ImputerParams { imputed, replaced }))),
        vec![],
    ))
}

impl Imputer {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_rules(s, inputs, outputs, Some(DatumType::F32))
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == DatumType::F32,
            "Imputer supports float inputs, got {:?}",
            inputs[0].datum_type
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut out = as_f32(&inputs[0])?.into_owned();
        let (_, cols) = rows_cols(inputs[0].shape())?;
        let p = &self.0;
        per_column(&p.imputed, cols, "Imputer imputed_value_floats")?;
        let nan = p.replaced.is_nan();
        for (i, v) in out.iter_mut().enumerate() {
            if (nan && v.is_nan()) || *v == p.replaced {
                *v = p.imputed[if p.imputed.len() == 1 { 0 } else { i % cols }];
            }
        }
        Ok(tvec!(tensor_f32(inputs[0].shape(), out)?))
    }
}
ml_op!(Imputer, "ai.onnx.ml.Imputer", inputs: 1, outputs: 1);

/// `Y = X > threshold ? 1 : 0`, same type as the (float) input.
#[derive(Clone, Debug)]
pub struct Binarizer(Arc<f32>);

#[cfg(feature = "onnx")]
fn binarizer(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((expand(Binarizer(Arc::new(threshold))), vec![]))
}

impl Binarizer {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_rules(s, inputs, outputs, Some(DatumType::F32))
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == DatumType::F32,
            "Binarizer supports float inputs, got {:?}",
            inputs[0].datum_type
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let t = *self.0;
        let out = as_f32(&inputs[0])?
            .iter()
            .map(|v| if *v > t { 1.0 } else { 0.0 })
            .collect();
        Ok(tvec!(tensor_f32(inputs[0].shape(), out)?))
    }
}
ml_op!(Binarizer, "ai.onnx.ml.Binarizer", inputs: 1, outputs: 1);

// ---------------------------------------------------------------------------------------
// Compiled form (NNEF)

pub fn register_nnef(reg: &mut Registry) {
    reg.register_dumper(dump_scaler);
    reg.register_primitive(
        "drover_ml_scaler",
        &[input(), float("offset"), float("scale")],
        &one_output(),
        load_scaler,
    );
    reg.register_dumper(dump_normalizer);
    reg.register_primitive(
        "drover_ml_normalizer",
        &[input(), attr_str("norm")],
        &one_output(),
        load_normalizer,
    );
    reg.register_dumper(dump_imputer);
    reg.register_primitive(
        "drover_ml_imputer",
        &[input(), float("imputed"), float("replaced")],
        &one_output(),
        load_imputer,
    );
    reg.register_dumper(dump_binarizer);
    reg.register_primitive(
        "drover_ml_binarizer",
        &[input(), float("threshold")],
        &one_output(),
        load_binarizer,
    );
}

fn dump_scaler(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Scaler,
) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let offset = nnef_io::dump(ast, node, "offset", &op.0.offset)?;
    let scale = nnef_io::dump(ast, node, "scale", &op.0.scale)?;
    Ok(Some(invocation(
        "drover_ml_scaler",
        &[x, offset, scale],
        &[],
    )))
}

fn load_scaler(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let offset: Vec<f32> = nnef_io::load(builder, inv, "offset")?;
    let scale: Vec<f32> = nnef_io::load(builder, inv, "scale")?;
    ensure!(
        !offset.is_empty() && !scale.is_empty(),
        "Scaler needs offset and scale"
    );
    builder.wire(Scaler(Arc::new(ScalerParams { offset, scale })), &[x])
}

fn dump_normalizer(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Normalizer,
) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    Ok(Some(invocation(
        "drover_ml_normalizer",
        &[x],
        &[("norm", string(op.0.name()))],
    )))
}

fn load_normalizer(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let norm: String = inv.named_arg_as(builder, "norm")?;
    builder.wire(Normalizer(Arc::new(Norm::parse(&norm)?)), &[x])
}

fn dump_imputer(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Imputer,
) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let imputed = nnef_io::dump(ast, node, "imputed", &op.0.imputed)?;
    let replaced = nnef_io::dump(ast, node, "replaced", &[op.0.replaced])?;
    Ok(Some(invocation(
        "drover_ml_imputer",
        &[x, imputed, replaced],
        &[],
    )))
}

fn load_imputer(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let imputed: Vec<f32> = nnef_io::load(builder, inv, "imputed")?;
    ensure!(!imputed.is_empty(), "Imputer: imputed values are empty");
    let replaced = nnef_io::load_f32(builder, inv, "replaced")?;
    builder.wire(Imputer(Arc::new(ImputerParams { imputed, replaced })), &[x])
}

fn dump_binarizer(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &Binarizer,
) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let threshold = nnef_io::dump(ast, node, "threshold", &[*op.0])?;
    Ok(Some(invocation(
        "drover_ml_binarizer",
        &[x, threshold],
        &[],
    )))
}

fn load_binarizer(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let threshold = nnef_io::load_f32(builder, inv, "threshold")?;
    builder.wire(Binarizer(Arc::new(threshold)), &[x])
}
