//! The `ai.onnx.ml` operators scikit-learn exporters emit (skl2onnx, onnxmltools), registered
//! into tract-onnx's operator table by [`onnx`].
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
//! type rules) and the typed op it expands into, so there is a single definition to keep
//! right. Classifier outputs are the `zipmap=False` form: an int64 label tensor `[N]` and a
//! float probability tensor `[N, classes]`; `ZipMap` (sequences of maps) stays unsupported
//! and is refused by name.

use tract_onnx::model::OnnxOpRegister;
use tract_onnx::tract_hir::internal::*;

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

/// Adds (or replaces) our `ai.onnx.ml` operators in a tract-onnx operator table.
pub fn register(reg: &mut OnnxOpRegister) {
    preprocessing::register(reg);
    linear::register(reg);
    encoding::register(reg);
    tree::register(reg);
}

/// tract-onnx with our `ai.onnx.ml` operators registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register(&mut onnx.op_register);
    onnx
}

/// Implements tract's `Op`, `EvalOp`, `TypedOp` and `Expansion` for an operator struct from
/// its inherent `rules`, `facts` and `eval_ml` methods. Equality (which tract uses to merge
/// identical nodes) is pointer equality on the shared parameters. Callers import
/// `tract_onnx::tract_hir::internal::*`.
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
            tract_onnx::tract_hir::tract_core::op_as_typed_op!();
        }

        impl EvalOp for $t {
            tract_onnx::tract_hir::tract_core::op_out_of_plan!();
            fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
                self.eval_ml(inputs)
            }
        }

        impl TypedOp for $t {
            fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
                self.facts(inputs)
            }
            tract_onnx::tract_hir::tract_core::as_op!();
        }

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
