//! Categorical encoders and column selection: OneHotEncoder, LabelEncoder,
//! ArrayFeatureExtractor.

use std::collections::HashMap;

use tract_nnef::internal::*;
#[cfg(feature = "onnx")]
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
#[cfg(feature = "onnx")]
use tract_onnx::pb::NodeProto;
#[cfg(feature = "onnx")]
use tract_onnx::tract_hir::internal::*;

use super::nnef_io::{self, attr_int, input, int, one_output};
use super::{ml_op, tensor_f32, tensor_i64};

#[cfg(feature = "onnx")]
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("OneHotEncoder", one_hot_encoder);
    reg.insert("LabelEncoder", label_encoder);
    reg.insert("ArrayFeatureExtractor", array_feature_extractor);
}

#[cfg(feature = "onnx")]
type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

#[cfg(feature = "onnx")]
const STRINGS: &str =
    "string categories are not supported (the agent's wire carries numbers only; \
                       encode them as integers before exporting)";

/// Integer view of a numeric input (onnxruntime casts float categories to int64). tract may
/// hold int64 values that went through shape-like ops as `TDim`.
fn as_i64(t: &Tensor) -> TractResult<std::borrow::Cow<'_, [i64]>> {
    if t.datum_type() == DatumType::I64 {
        return Ok(std::borrow::Cow::Borrowed(
            t.try_as_plain_ram()?.as_slice::<i64>()?,
        ));
    }
    ensure!(
        t.datum_type().is_number() || t.datum_type() == DatumType::TDim,
        "expected a numeric input, got {:?}",
        t.datum_type()
    );
    let c = t.cast_to::<i64>()?;
    Ok(std::borrow::Cow::Owned(
        c.try_as_plain_ram()?.as_slice::<i64>()?.to_vec(),
    ))
}

/// One float column per category appended to the input's shape; an unknown value gives a row
/// of zeros (`zeros=1`, skl2onnx's `handle_unknown="ignore"`) or an error (`zeros=0`).
#[derive(Clone, Debug)]
pub struct OneHotEncoder(Arc<OneHotParams>);

#[derive(Debug)]
pub struct OneHotParams {
    index: HashMap<i64, usize>,
    categories: usize,
    zeros: bool,
}

#[cfg(feature = "onnx")]
fn one_hot_encoder(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    ensure!(
        node.get_attr_opt_tvec::<&str>("cats_strings")?.is_none(),
        "OneHotEncoder: {STRINGS}"
    );
    let cats: Vec<i64> = node.get_attr_vec("cats_int64s")?;
    ensure!(!cats.is_empty(), "OneHotEncoder: no categories");
    let zeros = node.get_attr_opt::<i64>("zeros")?.unwrap_or(1) != 0;
    let categories = cats.len();
    let mut index = HashMap::with_capacity(categories);
    for (i, c) in cats.into_iter().enumerate() {
        index.entry(c).or_insert(i);
    }
    Ok((
        expand(OneHotEncoder(Arc::new(OneHotParams {
            index,
            categories,
            zeros,
        }))),
        vec![],
    ))
}

impl OneHotEncoder {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let categories = self.0.categories;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            for axis in 0..rank {
                s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
            }
            s.equals(&outputs[0].shape[rank], categories.to_dim())
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.0.categories.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &*self.0;
        let x = as_i64(&inputs[0])?;
        let mut out = vec![0.0f32; x.len() * p.categories];
        for (i, v) in x.iter().enumerate() {
            match p.index.get(v) {
                Some(c) => out[i * p.categories + c] = 1.0,
                None if p.zeros => {}
                None => bail!("OneHotEncoder: unknown category {v} (zeros=0)"),
            }
        }
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(p.categories);
        Ok(tvec!(tensor_f32(&shape, out)?))
    }
}
ml_op!(OneHotEncoder, "ai.onnx.ml.OneHotEncoder", inputs: 1, outputs: 1);

#[derive(Debug)]
enum Values {
    I64(Vec<i64>, i64),
    F32(Vec<f32>, f32),
}

/// Maps int64 or float keys to int64 or float values, with a default for unknown keys.
#[derive(Clone, Debug)]
pub struct LabelEncoder(Arc<LabelParams>);

#[derive(Debug)]
pub struct LabelParams {
    /// Key (an int64, or an f32's bits) to position in `values`.
    index: HashMap<i64, usize>,
    float_keys: bool,
    values: Values,
}

fn float_key(v: f32) -> i64 {
    // Every NaN is the same key; -0.0 and 0.0 compare equal.
    if v.is_nan() {
        i64::from(f32::NAN.to_bits())
    } else if v == 0.0 {
        0
    } else {
        i64::from(v.to_bits())
    }
}

#[cfg(feature = "onnx")]
fn label_encoder(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    for attr in ["keys_strings", "values_strings"] {
        ensure!(
            node.get_attr_opt_tvec::<&str>(attr)?.is_none(),
            "LabelEncoder: {STRINGS}"
        );
    }
    for attr in ["keys_tensor", "values_tensor", "default_tensor"] {
        ensure!(
            !node.attribute.iter().any(|a| a.name == attr),
            "LabelEncoder: the {attr} form (ai.onnx.ml opset 4) is not supported"
        );
    }
    let (keys, float_keys): (Vec<i64>, bool) = match (
        node.get_attr_opt_vec::<i64>("keys_int64s")?,
        node.get_attr_opt_vec::<f32>("keys_floats")?,
    ) {
        (Some(k), None) => (k, false),
        (None, Some(k)) => (k.into_iter().map(float_key).collect(), true),
        _ => bail!("LabelEncoder needs exactly one of keys_int64s, keys_floats"),
    };
    let values = match (
        node.get_attr_opt_vec::<i64>("values_int64s")?,
        node.get_attr_opt_vec::<f32>("values_floats")?,
    ) {
        (Some(v), None) => Values::I64(v, node.get_attr_opt("default_int64")?.unwrap_or(-1)),
        (None, Some(v)) => Values::F32(v, node.get_attr_opt("default_float")?.unwrap_or(-0.0)),
        _ => bail!("LabelEncoder needs exactly one of values_int64s, values_floats"),
    };
    let n_values = match &values {
        Values::I64(v, _) => v.len(),
        Values::F32(v, _) => v.len(),
    };
    ensure!(
        n_values == keys.len(),
        "LabelEncoder: {} keys for {n_values} values",
        keys.len()
    );
    let mut index = HashMap::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        index.entry(k).or_insert(i);
    }
    Ok((
        expand(LabelEncoder(Arc::new(LabelParams {
            index,
            float_keys,
            values,
        }))),
        vec![],
    ))
}

impl LabelEncoder {
    fn out_type(&self) -> DatumType {
        match self.0.values {
            Values::I64(..) => DatumType::I64,
            Values::F32(..) => DatumType::F32,
        }
    }

    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        s.equals(&outputs[0].datum_type, self.out_type())?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out_type().fact(inputs[0].shape.clone())))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &*self.0;
        let keys: Vec<i64> = if p.float_keys {
            let c = inputs[0].cast_to::<f32>()?;
            c.try_as_plain_ram()?
                .as_slice::<f32>()?
                .iter()
                .map(|v| float_key(*v))
                .collect()
        } else {
            ensure!(
                matches!(inputs[0].datum_type(), DatumType::I64 | DatumType::TDim),
                "LabelEncoder with int64 keys got {:?} input",
                inputs[0].datum_type()
            );
            as_i64(&inputs[0])?.into_owned()
        };
        let shape = inputs[0].shape();
        let out = match &p.values {
            Values::I64(v, default) => tensor_i64(
                shape,
                keys.iter()
                    .map(|k| p.index.get(k).map_or(*default, |i| v[*i]))
                    .collect(),
            )?,
            Values::F32(v, default) => tensor_f32(
                shape,
                keys.iter()
                    .map(|k| p.index.get(k).map_or(*default, |i| v[*i]))
                    .collect(),
            )?,
        };
        Ok(tvec!(out))
    }
}
ml_op!(LabelEncoder, "ai.onnx.ml.LabelEncoder", inputs: 1, outputs: 1);

/// Selects columns `Y` (int64 indices, any shape) from the last axis of `X`; a rank-1 `X`
/// gives `[1, len(Y)]`, as in onnxruntime.
#[derive(Clone, Debug)]
pub struct ArrayFeatureExtractor(Arc<()>);

#[cfg(feature = "onnx")]
fn array_feature_extractor(_ctx: &ParsingContext, _node: &NodeProto) -> Built {
    Ok((expand(ArrayFeatureExtractor(Arc::new(()))), vec![]))
}

fn gather_last<T: Datum + Copy>(
    x: &Tensor,
    indices: &[i64],
    out_shape: &[usize],
) -> TractResult<TValue> {
    let data = x.try_as_plain_ram()?.as_slice::<T>()?;
    let last = *x.shape().last().unwrap_or(&1);
    let cols: Vec<usize> = indices
        .iter()
        .map(|i| {
            usize::try_from(*i)
                .ok()
                .filter(|i| *i < last)
                .with_context(|| {
                    format!("ArrayFeatureExtractor: index {i} out of range for {last} columns")
                })
        })
        .collect::<TractResult<_>>()?;
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for row in data.chunks_exact(last.max(1)) {
        out.extend(cols.iter().map(|c| row[*c]));
    }
    Ok(tract_ndarray::ArrayD::from_shape_vec(out_shape, out)?
        .into_tensor()
        .into_tvalue())
}

impl ArrayFeatureExtractor {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.given_2(&inputs[0].rank, &inputs[1].shape, move |s, rank, ishape| {
            let n: TDim = ishape.iter().product();
            let rank = rank as usize;
            if rank == 1 {
                s.equals(&outputs[0].rank, 2)?;
                s.equals(&outputs[0].shape[0], 1.to_dim())?;
                s.equals(&outputs[0].shape[1], n)
            } else {
                s.equals(&outputs[0].rank, rank as i64)?;
                for axis in 0..rank - 1 {
                    s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
                }
                s.equals(&outputs[0].shape[rank - 1], n)
            }
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n: TDim = inputs[1].shape.iter().product();
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        match shape.len() {
            0 => bail!("ArrayFeatureExtractor needs an input of rank 1 or more"),
            1 => shape = tvec!(1.to_dim(), n),
            r => shape[r - 1] = n,
        }
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, y) = (&inputs[0], &inputs[1]);
        let idx = y.cast_to::<i64>()?;
        let idx = idx.try_as_plain_ram()?.as_slice::<i64>()?;
        let mut shape: TVec<usize> = x.shape().into();
        match shape.len() {
            0 => bail!("ArrayFeatureExtractor needs an input of rank 1 or more"),
            1 => shape = tvec!(1, idx.len()),
            r => shape[r - 1] = idx.len(),
        }
        let out = match x.datum_type() {
            DatumType::F32 => gather_last::<f32>(x, idx, &shape)?,
            DatumType::F64 => gather_last::<f64>(x, idx, &shape)?,
            DatumType::I64 => gather_last::<i64>(x, idx, &shape)?,
            DatumType::I32 => gather_last::<i32>(x, idx, &shape)?,
            other => bail!("ArrayFeatureExtractor over {other:?} is not supported"),
        };
        Ok(tvec!(out))
    }
}
ml_op!(ArrayFeatureExtractor, "ai.onnx.ml.ArrayFeatureExtractor", inputs: 2, outputs: 1);

// ---------------------------------------------------------------------------------------
// Compiled form (NNEF): key→position indexes are written as two tensors sorted by key.

pub fn register_nnef(reg: &mut Registry) {
    reg.register_dumper(dump_one_hot);
    reg.register_primitive(
        "drover_ml_one_hot_encoder",
        &[
            input(),
            int("keys"),
            int("positions"),
            attr_int("categories"),
            attr_int("zeros"),
        ],
        &one_output(),
        load_one_hot,
    );
    reg.register_dumper(dump_label_encoder);
    reg.register_primitive(
        "drover_ml_label_encoder",
        &[
            input(),
            int("keys"),
            int("positions"),
            TypeName::Scalar.tensor().named("values"),
            TypeName::Scalar.tensor().named("default"),
            attr_int("float_keys"),
        ],
        &one_output(),
        load_label_encoder,
    );
    reg.register_dumper(dump_feature_extractor);
    reg.register_primitive(
        "drover_ml_array_feature_extractor",
        &[input(), int("indices")],
        &one_output(),
        load_feature_extractor,
    );
}

/// `(keys, positions)` sorted by key.
fn index_tensors(index: &HashMap<i64, usize>) -> (Vec<i64>, Vec<i64>) {
    let mut pairs: Vec<(i64, i64)> = index.iter().map(|(k, v)| (*k, *v as i64)).collect();
    pairs.sort_unstable();
    pairs.into_iter().unzip()
}

fn load_index(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
    len: usize,
) -> TractResult<HashMap<i64, usize>> {
    let keys: Vec<i64> = nnef_io::load(builder, inv, "keys")?;
    let positions: Vec<i64> = nnef_io::load(builder, inv, "positions")?;
    ensure!(
        keys.len() == positions.len(),
        "{} keys for {} positions",
        keys.len(),
        positions.len()
    );
    keys.into_iter()
        .zip(positions)
        .map(|(k, p)| {
            let p = usize::try_from(p).ok().filter(|p| *p < len);
            Ok((
                k,
                p.with_context(|| format!("key {k}: position out of range"))?,
            ))
        })
        .collect()
}

fn dump_one_hot(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &OneHotEncoder,
) -> TractResult<Option<Arc<RValue>>> {
    let p = &*op.0;
    let x = ast.mapping[&node.inputs[0]].clone();
    let (keys, positions) = index_tensors(&p.index);
    let keys = nnef_io::dump(ast, node, "keys", &keys)?;
    let positions = nnef_io::dump(ast, node, "positions", &positions)?;
    Ok(Some(invocation(
        "drover_ml_one_hot_encoder",
        &[x, keys, positions],
        &[
            ("categories", numeric(p.categories)),
            ("zeros", numeric(i64::from(p.zeros))),
        ],
    )))
}

fn load_one_hot(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let categories = nnef_io::load_usize(builder, inv, "categories")?;
    ensure!(categories > 0, "OneHotEncoder: no categories");
    let index = load_index(builder, inv, categories)?;
    let zeros = nnef_io::load_usize(builder, inv, "zeros")? != 0;
    let p = OneHotParams {
        index,
        categories,
        zeros,
    };
    builder.wire(OneHotEncoder(Arc::new(p)), &[x])
}

fn dump_label_encoder(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &LabelEncoder,
) -> TractResult<Option<Arc<RValue>>> {
    let p = &*op.0;
    let x = ast.mapping[&node.inputs[0]].clone();
    let (keys, positions) = index_tensors(&p.index);
    let keys = nnef_io::dump(ast, node, "keys", &keys)?;
    let positions = nnef_io::dump(ast, node, "positions", &positions)?;
    let (values, default) = match &p.values {
        Values::I64(v, d) => (
            nnef_io::dump(ast, node, "values", v)?,
            nnef_io::dump(ast, node, "default", &[*d])?,
        ),
        Values::F32(v, d) => (
            nnef_io::dump(ast, node, "values", v)?,
            nnef_io::dump(ast, node, "default", &[*d])?,
        ),
    };
    Ok(Some(invocation(
        "drover_ml_label_encoder",
        &[x, keys, positions, values, default],
        &[("float_keys", numeric(i64::from(p.float_keys)))],
    )))
}

fn load_label_encoder(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let float_keys = nnef_io::load_usize(builder, inv, "float_keys")? != 0;
    let values_dt = inv
        .named_arg_as::<Arc<Tensor>>(builder, "values")?
        .datum_type();
    let values = if values_dt == DatumType::I64 {
        let d: Vec<i64> = nnef_io::load(builder, inv, "default")?;
        ensure!(d.len() == 1, "LabelEncoder: one default value expected");
        Values::I64(nnef_io::load(builder, inv, "values")?, d[0])
    } else {
        Values::F32(
            nnef_io::load(builder, inv, "values")?,
            nnef_io::load_f32(builder, inv, "default")?,
        )
    };
    let n_values = match &values {
        Values::I64(v, _) => v.len(),
        Values::F32(v, _) => v.len(),
    };
    let index = load_index(builder, inv, n_values)?;
    let p = LabelParams {
        index,
        float_keys,
        values,
    };
    builder.wire(LabelEncoder(Arc::new(p)), &[x])
}

fn dump_feature_extractor(
    ast: &mut IntoAst,
    node: &TypedNode,
    _op: &ArrayFeatureExtractor,
) -> TractResult<Option<Arc<RValue>>> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let indices = ast.mapping[&node.inputs[1]].clone();
    Ok(Some(invocation(
        "drover_ml_array_feature_extractor",
        &[x, indices],
        &[],
    )))
}

fn load_feature_extractor(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
) -> TractResult<Value> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let indices: OutletId = inv.named_arg_as(builder, "indices")?;
    builder.wire(ArrayFeatureExtractor(Arc::new(())), &[x, indices])
}
