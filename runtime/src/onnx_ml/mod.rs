//! The `ai.onnx.ml` operators scikit-learn exporters emit (skl2onnx, onnxmltools), registered
//! into tract-onnx's operator table by [`onnx`] (feature `onnx`), and into the NNEF registry
//! [`nnef_registry`] (`drover_ml`) that writes them into compiled artifacts and reads them
//! back: each operator's parameters are NNEF tensors (`.dat` files in the tar, exact bits)
//! and attributes, and a loader checks them as the ONNX parser does before building the op.
//!
//! tract-onnx 0.23 ships a few of these (LinearClassifier, LinearRegressor, Normalizer,
//! TreeEnsembleClassifier, CategoryMapper); ours replace them because their results or speed
//! differ from onnxruntime's (Normalizer MAX divides by the absolute max where onnxruntime
//! divides by the signed max; the tree classifier is ~90x slower), and the others are missing.
//! Semantics follow onnxruntime's CPU kernels, which is what models are validated against.
//!
//! Layout: one file per operator family.
//! - `preprocessing.rs`: Scaler, Normalizer, Imputer, Binarizer
//! - `linear.rs`: LinearClassifier, LinearRegressor
//! - `encoding.rs`: OneHotEncoder, LabelEncoder, ArrayFeatureExtractor
//! - `tree.rs`: TreeEnsembleClassifier, TreeEnsembleRegressor (flattened evaluator)
//!
//! Each operator is one struct that is both tract's inference-time `Expansion` (shape and
//! type rules, feature `onnx`) and the typed op it expands into, so there is a single
//! definition to keep right. Classifier outputs are the `zipmap=False` form: an int64 label tensor `[N]` and a
//! float probability tensor `[N, classes]`; `ZipMap` (sequences of maps) stays unsupported
//! and is refused by name.

use tract_nnef::internal::*;
#[cfg(feature = "onnx")]
use tract_onnx::model::OnnxOpRegister;

mod encoding;
mod linear;
mod preprocessing;
mod tree;

/// The `ai.onnx.ml` operators a model may use: ours, plus tract's own CategoryMapper.
pub const OPERATORS: &[&str] = &[
    "ArrayFeatureExtractor",
    "Binarizer",
    "CategoryMapper",
    "Imputer",
    "LabelEncoder",
    "LinearClassifier",
    "LinearRegressor",
    "Normalizer",
    "OneHotEncoder",
    "Scaler",
    "TreeEnsembleClassifier",
    "TreeEnsembleRegressor",
];

/// The NNEF registry of compiled artifacts for our operators.
pub const NNEF_REGISTRY: &str = "drover_ml";

/// Our operators' NNEF serializers and loaders (`drover_ml_*` primitives).
pub fn nnef_registry() -> Registry {
    let mut reg = Registry::new(NNEF_REGISTRY)
        .with_doc("Extension `drover_ml`: Drover's ai.onnx.ml operators.")
        .with_doc("Add `extension tract_registry drover_ml` to `graph.nnef`");
    preprocessing::register_nnef(&mut reg);
    linear::register_nnef(&mut reg);
    encoding::register_nnef(&mut reg);
    tree::register_nnef(&mut reg);
    reg
}

/// Adds (or replaces) our `ai.onnx.ml` operators in a tract-onnx operator table.
#[cfg(feature = "onnx")]
pub fn register(reg: &mut OnnxOpRegister) {
    preprocessing::register(reg);
    linear::register(reg);
    encoding::register(reg);
    tree::register(reg);
}

/// tract-onnx with our `ai.onnx.ml` operators registered.
#[cfg(feature = "onnx")]
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}

/// Implements tract's `Op`, `EvalOp`, `TypedOp` and `Expansion` for an operator struct from
/// its inherent `rules`, `facts` and `eval_ml` methods. Equality (which tract uses to merge
/// identical nodes) is pointer equality on the shared parameters. Callers import
/// `tract_nnef::internal::*` (and `tract_onnx::tract_hir::internal::*` with feature `onnx`).
macro_rules! ml_op {
    ($t:ident, $name:expr, inputs: $n_in:expr, outputs: $n_out:expr) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                std::sync::Arc::ptr_eq(&self.0, &other.0)
            }
        }
        impl Eq for $t {}

        impl Op for $t {
            fn name(&self) -> StaticName {
                $name.into()
            }
            tract_core::op_as_typed_op!();
        }

        impl EvalOp for $t {
            tract_core::op_out_of_plan!();
            fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
                self.eval_ml(inputs)
            }
        }

        impl TypedOp for $t {
            fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
                self.facts(inputs)
            }
            tract_core::as_op!();
        }

        #[cfg(feature = "onnx")]
        impl Expansion for $t {
            fn name(&self) -> StaticName {
                $name.into()
            }
            fn nboutputs(&self) -> TractResult<usize> {
                Ok($n_out)
            }
            fn rules<'r, 'p: 'r, 's: 'r>(
                &'s self,
                s: &mut Solver<'r>,
                inputs: &'p [TensorProxy],
                outputs: &'p [TensorProxy],
            ) -> InferenceResult {
                check_input_arity(inputs, $n_in)?;
                check_output_arity(outputs, $n_out)?;
                self.rules(s, inputs, outputs)
            }
            fn wire(
                &self,
                prefix: &str,
                model: &mut TypedModel,
                inputs: &[OutletId],
            ) -> TractResult<TVec<OutletId>> {
                model.wire_node(prefix, self.clone(), inputs)
            }
        }
    };
}
pub(crate) use ml_op;

/// The input as contiguous f32 values (onnxruntime's ML kernels compute in f32 whatever the
/// numeric input type).
fn as_f32(t: &Tensor) -> TractResult<std::borrow::Cow<'_, [f32]>> {
    if t.datum_type() == DatumType::F32 {
        Ok(std::borrow::Cow::Borrowed(
            t.try_as_plain_ram()?.as_slice::<f32>()?,
        ))
    } else {
        ensure!(
            t.datum_type().is_number(),
            "expected a numeric input, got {:?}",
            t.datum_type()
        );
        let c = t.cast_to::<f32>()?;
        Ok(std::borrow::Cow::Owned(
            c.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        ))
    }
}

/// `[rows, cols]` of a rank-1 (one row) or rank-2 input, as onnxruntime reads them.
fn rows_cols(shape: &[usize]) -> TractResult<(usize, usize)> {
    match shape {
        [c] => Ok((1, *c)),
        [n, c] => Ok((*n, *c)),
        other => bail!("expected a rank 1 or 2 input, got shape {other:?}"),
    }
}

fn tensor_f32(shape: &[usize], data: Vec<f32>) -> TractResult<TValue> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data)?
        .into_tensor()
        .into_tvalue())
}

fn tensor_i64(shape: &[usize], data: Vec<i64>) -> TractResult<TValue> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data)?
        .into_tensor()
        .into_tvalue())
}

/// Score post-transforms, as onnxruntime applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
    Probit,
}

impl PostTransform {
    fn name(self) -> &'static str {
        match self {
            PostTransform::None => "NONE",
            PostTransform::Logistic => "LOGISTIC",
            PostTransform::Softmax => "SOFTMAX",
            PostTransform::SoftmaxZero => "SOFTMAX_ZERO",
            PostTransform::Probit => "PROBIT",
        }
    }

    fn parse(s: Option<&str>) -> TractResult<PostTransform> {
        Ok(match s.unwrap_or("NONE") {
            "NONE" => PostTransform::None,
            "LOGISTIC" => PostTransform::Logistic,
            "SOFTMAX" => PostTransform::Softmax,
            "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
            "PROBIT" => PostTransform::Probit,
            other => bail!("unknown post_transform {other:?}"),
        })
    }

    /// Transforms one row of two or more scores in place.
    fn apply(self, scores: &mut [f32]) {
        match self {
            PostTransform::None => {}
            PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
            PostTransform::Probit => scores.iter_mut().for_each(|s| *s = probit(*s)),
            PostTransform::Softmax => {
                let max = scores.iter().copied().fold(-f32::MAX, f32::max);
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                scores.iter_mut().for_each(|s| *s /= sum);
            }
            PostTransform::SoftmaxZero => {
                let max = scores.iter().copied().fold(-f32::MAX, f32::max);
                let exp_neg_max = (-max).exp();
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    if *s > 0.000_000_1 || *s < -0.000_000_1 {
                        *s = (*s - max).exp();
                        sum += *s;
                    } else {
                        *s *= exp_neg_max;
                    }
                }
                scores.iter_mut().for_each(|s| *s /= sum);
            }
        }
    }
}

/// onnxruntime's `ComputeLogistic`: symmetric, so large negative inputs do not lose precision.
fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 {
        1.0 - v
    } else {
        v
    }
}

/// onnxruntime's `ComputeProbit` (with its `ErfInv` approximation and its rounded pi, to give
/// the same numbers).
#[allow(clippy::approx_constant)]
fn probit(x: f32) -> f32 {
    let x = 2.0 * x - 1.0;
    let sgn = if x < 0.0 { -1.0 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (3.14159 * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    let v3 = -v + (v * v - v2).sqrt();
    std::f32::consts::SQRT_2 * sgn * v3.sqrt()
}

/// NNEF helpers the operator families share: parameters written as variables (`.dat`
/// tensors, exact bits) and read back with their type and rank checked.
mod nnef_io {
    use tract_nnef::ast::TypeSpec;
    use tract_nnef::internal::*;

    /// A rank-1 parameter tensor, written as `<node>.<what>.dat`.
    pub fn dump<T: Datum + Copy>(
        ast: &mut IntoAst,
        node: &TypedNode,
        what: &str,
        values: &[T],
    ) -> TractResult<Arc<RValue>> {
        ast.konst_variable(format!("{}.{what}", node.name), &rctensor1(values))
    }

    /// A rank-1 parameter tensor of `T`, as [`dump`] wrote it.
    pub fn load<T: Datum + Copy>(
        builder: &mut ModelBuilder,
        inv: &ResolvedInvocation,
        what: &str,
    ) -> TractResult<Vec<T>> {
        let t: Arc<Tensor> = inv.named_arg_as(builder, what)?;
        ensure!(
            t.datum_type() == T::datum_type() && t.rank() == 1,
            "parameter {what}: expected a rank 1 {:?} tensor, got {:?} {:?}",
            T::datum_type(),
            t.datum_type(),
            t.shape()
        );
        Ok(t.try_as_plain_ram()?.as_slice::<T>()?.to_vec())
    }

    /// One f32 parameter (kept as a tensor so NaN and every bit survive).
    pub fn load_f32(
        builder: &mut ModelBuilder,
        inv: &ResolvedInvocation,
        what: &str,
    ) -> TractResult<f32> {
        match load::<f32>(builder, inv, what)?.as_slice() {
            [v] => Ok(*v),
            other => bail!("parameter {what}: expected one value, got {}", other.len()),
        }
    }

    /// A non-negative integer attribute.
    pub fn load_usize(
        builder: &mut ModelBuilder,
        inv: &ResolvedInvocation,
        what: &str,
    ) -> TractResult<usize> {
        let v: i64 = inv.named_arg_as(builder, what)?;
        usize::try_from(v).with_context(|| format!("attribute {what}: {v} is negative"))
    }

    pub fn float(name: &str) -> Parameter {
        TypeName::Scalar.tensor().named(name)
    }

    pub fn int(name: &str) -> Parameter {
        TypeName::Integer.tensor().named(name)
    }

    pub fn attr_int(name: &str) -> Parameter {
        TypeName::Integer.named(name)
    }

    pub fn attr_str(name: &str) -> Parameter {
        TypeName::String.named(name)
    }

    pub fn input() -> Parameter {
        TypeName::Scalar.tensor().named("input")
    }

    /// One output of type `scalar`.
    pub fn one_output() -> [(&'static str, TypeSpec); 1] {
        [("output", TypeName::Scalar.tensor())]
    }

    /// A classifier's two outputs: labels and scores.
    pub fn classifier_outputs() -> [(&'static str, TypeSpec); 2] {
        [
            ("label", TypeName::Integer.tensor()),
            ("scores", TypeName::Scalar.tensor()),
        ]
    }
}
