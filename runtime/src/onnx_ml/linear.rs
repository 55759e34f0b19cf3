//! Linear models: LinearClassifier, LinearRegressor (`scores = X · Wᵀ + b`).

use tract_nnef::internal::*;
#[cfg(feature = "onnx")]
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
#[cfg(feature = "onnx")]
use tract_onnx::pb::NodeProto;
#[cfg(feature = "onnx")]
use tract_onnx::tract_hir::internal::*;

use super::nnef_io::{self, attr_int, attr_str, classifier_outputs, float, input, int, one_output};
use super::{as_f32, logistic, ml_op, probit, rows_cols, tensor_f32, tensor_i64, PostTransform};

#[cfg(feature = "onnx")]
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("LinearClassifier", linear_classifier);
    reg.insert("LinearRegressor", linear_regressor);
}

#[cfg(feature = "onnx")]
type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// Coefficients `[targets, features]` (row-major) and intercepts `[targets]`.
#[derive(Debug)]
struct Dense {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    targets: usize,
    features: usize,
}

impl Dense {
    fn new(
        coefficients: Vec<f32>,
        intercepts: Option<Vec<f32>>,
        targets: usize,
    ) -> TractResult<Dense> {
        ensure!(
            targets > 0 && !coefficients.is_empty() && coefficients.len() % targets == 0,
            "{} coefficients do not split into {targets} targets",
            coefficients.len()
        );
        let intercepts = intercepts.unwrap_or_else(|| vec![0.0; targets]);
        ensure!(
            intercepts.len() == targets,
            "{} intercepts for {targets} targets",
            intercepts.len()
        );
        let features = coefficients.len() / targets;
        Ok(Dense {
            coefficients,
            intercepts,
            targets,
            features,
        })
    }

    /// `[rows, targets]` scores for a row-major `[rows, features]` input.
    fn scores(&self, x: &[f32], rows: usize, cols: usize) -> TractResult<Vec<f32>> {
        ensure!(
            cols == self.features,
            "input has {cols} features, the model {}",
            self.features
        );
        let mut out = Vec::with_capacity(rows * self.targets);
        for row in x.chunks_exact(cols.max(1)).take(rows) {
            for (w, b) in self
                .coefficients
                .chunks_exact(self.features)
                .zip(&self.intercepts)
            {
                let dot: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum();
                out.push(dot + b);
            }
        }
        Ok(out)
    }
}

fn batch_dim(shape: &ShapeFact) -> TDim {
    if shape.rank() == 1 {
        1.into()
    } else {
        shape[0].clone()
    }
}

/// Multi-target linear regression; `PROBIT` applies to single-target outputs only, other
/// transforms to rows of two or more targets, as in onnxruntime.
#[derive(Clone, Debug)]
pub struct LinearRegressor(Arc<(Dense, PostTransform)>);

#[cfg(feature = "onnx")]
fn linear_regressor(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let targets: usize = node.get_attr_opt("targets")?.unwrap_or(1);
    let dense = Dense::new(
        node.get_attr_vec("coefficients")?,
        node.get_attr_opt_vec("intercepts")?,
        targets,
    )?;
    let post = PostTransform::parse(node.get_attr_opt("post_transform")?)?;
    Ok((expand(LinearRegressor(Arc::new((dense, post)))), vec![]))
}

impl LinearRegressor {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[1], self.0 .0.targets.to_dim())?;
        s.given(&inputs[0].rank, move |s, rank| {
            if rank == 1 {
                s.equals(&outputs[0].shape[0], 1.to_dim())
            } else {
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])
            }
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = batch_dim(&inputs[0].shape);
        Ok(tvec!(f32::fact([n, self.0 .0.targets.to_dim()])))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (dense, post) = &*self.0;
        let x = as_f32(&inputs[0])?;
        let (rows, cols) = rows_cols(inputs[0].shape())?;
        let mut out = dense.scores(&x, rows, cols)?;
        if dense.targets == 1 {
            if *post == PostTransform::Probit {
                out.iter_mut().for_each(|v| *v = probit(*v));
            }
        } else {
            out.chunks_exact_mut(dense.targets)
                .for_each(|row| post.apply(row));
        }
        Ok(tvec!(tensor_f32(&[rows, dense.targets], out)?))
    }
}
ml_op!(LinearRegressor, "ai.onnx.ml.LinearRegressor", inputs: 1, outputs: 1);

#[derive(Debug)]
pub struct ClassifierParams {
    dense: Dense,
    labels: Vec<i64>,
    post: PostTransform,
}

/// Linear classifier, `zipmap=False` form: int64 labels `[N]` and float scores. The label is
/// the argmax of the raw scores (first wins on ties); with a single score column and two
/// labels, the label is positive when the score is > 0 and the scores become `[1 - p, p]`.
#[derive(Clone, Debug)]
pub struct LinearClassifier(Arc<ClassifierParams>);

impl ClassifierParams {
    fn binary(&self) -> bool {
        self.dense.targets == 1 && self.labels.len() == 2
    }

    fn score_columns(&self) -> usize {
        if self.binary() {
            2
        } else {
            self.dense.targets
        }
    }
}

#[cfg(feature = "onnx")]
/// Class labels as int64. String labels are refused: the agent's wire carries int64 labels.
pub fn int_labels(node: &NodeProto, int_attr: &str) -> TractResult<Vec<i64>> {
    if node
        .get_attr_opt_tvec::<&str>("classlabels_strings")?
        .is_some()
    {
        bail!(
            "{}: string class labels are not supported (the agent's wire carries int64 labels; \
             encode the labels as integers before exporting)",
            node.op_type
        );
    }
    let labels: Vec<i64> = node.get_attr_vec(int_attr)?;
    ensure!(!labels.is_empty(), "{}: no class labels", node.op_type);
    Ok(labels)
}

#[cfg(feature = "onnx")]
fn linear_classifier(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let labels = int_labels(node, "classlabels_ints")?;
    let intercepts: Option<Vec<f32>> = node.get_attr_opt_vec("intercepts")?;
    let coefficients: Vec<f32> = node.get_attr_vec("coefficients")?;
    // onnxruntime counts models by intercepts; without them, one per class (or one for two).
    let targets = match &intercepts {
        Some(i) => i.len(),
        None if labels.len() == 2 && coefficients.len() % 2 == 1 => 1,
        None => labels.len(),
    };
    let dense = Dense::new(coefficients, intercepts, targets)?;
    check_labels(&dense, &labels)?;
    let post = PostTransform::parse(node.get_attr_opt("post_transform")?)?;
    Ok((
        expand(LinearClassifier(Arc::new(ClassifierParams {
            dense,
            labels,
            post,
        }))),
        vec![],
    ))
}

fn check_labels(dense: &Dense, labels: &[i64]) -> TractResult<()> {
    let targets = dense.targets;
    ensure!(
        targets == labels.len() || (targets == 1 && labels.len() == 2),
        "LinearClassifier: {targets} score columns for {} class labels",
        labels.len()
    );
    Ok(())
}

#[cfg(feature = "onnx")]
pub fn classifier_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    columns: usize,
) -> InferenceResult {
    s.equals(&outputs[0].datum_type, DatumType::I64)?;
    s.equals(&outputs[1].datum_type, DatumType::F32)?;
    s.equals(&outputs[0].rank, 1)?;
    s.equals(&outputs[1].rank, 2)?;
    s.equals(&outputs[1].shape[1], columns.to_dim())?;
    s.equals(&outputs[0].shape[0], &outputs[1].shape[0])?;
    s.given(&inputs[0].rank, move |s, rank| {
        if rank == 1 {
            s.equals(&outputs[0].shape[0], 1.to_dim())
        } else {
            s.equals(&outputs[0].shape[0], &inputs[0].shape[0])
        }
    })
}

pub fn classifier_facts(input: &TypedFact, columns: usize) -> TVec<TypedFact> {
    let n = batch_dim(&input.shape);
    tvec!(i64::fact([n.clone()]), f32::fact([n, columns.to_dim()]))
}

impl LinearClassifier {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        classifier_rules(s, inputs, outputs, self.0.score_columns())
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(classifier_facts(inputs[0], self.0.score_columns()))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &*self.0;
        let x = as_f32(&inputs[0])?;
        let (rows, cols) = rows_cols(inputs[0].shape())?;
        let raw = p.dense.scores(&x, rows, cols)?;
        let mut labels = Vec::with_capacity(rows);
        let scores = if p.binary() {
            let mut out = Vec::with_capacity(rows * 2);
            for s in raw {
                labels.push(if s > 0.0 { p.labels[1] } else { p.labels[0] });
                let v = match p.post {
                    PostTransform::Logistic => logistic(s),
                    PostTransform::Probit => probit(s),
                    _ => s,
                };
                out.extend([1.0 - v, v]);
            }
            out
        } else {
            let mut out = raw;
            for row in out.chunks_exact_mut(p.dense.targets) {
                let mut best = 0;
                for (j, v) in row.iter().enumerate().skip(1) {
                    if *v > row[best] {
                        best = j;
                    }
                }
                labels.push(p.labels[best]);
                if p.dense.targets > 1 {
                    p.post.apply(row);
                } else if p.post == PostTransform::Probit {
                    row[0] = probit(row[0]);
                }
            }
            out
        };
        let columns = p.score_columns();
        Ok(tvec!(
            tensor_i64(&[rows], labels)?,
            tensor_f32(&[rows, columns], scores)?
        ))
    }
}
ml_op!(LinearClassifier, "ai.onnx.ml.LinearClassifier", inputs: 1, outputs: 2);

// ---------------------------------------------------------------------------------------
// Compiled form (NNEF)

fn dense_params() -> [tract_nnef::internal::Parameter; 3] {
    [
        float("coefficients"),
        float("intercepts"),
        attr_int("targets"),
    ]
}

pub fn register_nnef(reg: &mut Registry) {
    reg.register_dumper(dump_regressor);
    let mut params = vec![input()];
    params.extend(dense_params());
    params.push(attr_str("post_transform"));
    reg.register_primitive(
        "drover_ml_linear_regressor",
        &params,
        &one_output(),
        load_regressor,
    );
    reg.register_dumper(dump_classifier);
    params.push(int("labels"));
    reg.register_primitive(
        "drover_ml_linear_classifier",
        &params,
        &classifier_outputs(),
        load_classifier,
    );
}

type DumpedDense = (Vec<Arc<RValue>>, (&'static str, RValue));

/// The dense part's arguments: coefficient and intercept tensors, the target count.
fn dump_dense(ast: &mut IntoAst, node: &TypedNode, d: &Dense) -> TractResult<DumpedDense> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let c = nnef_io::dump(ast, node, "coefficients", &d.coefficients)?;
    let i = nnef_io::dump(ast, node, "intercepts", &d.intercepts)?;
    Ok((vec![x, c, i], ("targets", numeric(d.targets))))
}

fn load_dense(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
) -> TractResult<(OutletId, Dense, PostTransform)> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let coefficients = nnef_io::load(builder, inv, "coefficients")?;
    let intercepts = nnef_io::load(builder, inv, "intercepts")?;
    let targets = nnef_io::load_usize(builder, inv, "targets")?;
    let post: String = inv.named_arg_as(builder, "post_transform")?;
    let dense = Dense::new(coefficients, Some(intercepts), targets)?;
    Ok((x, dense, PostTransform::parse(Some(&post))?))
}

fn dump_regressor(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &LinearRegressor,
) -> TractResult<Option<Arc<RValue>>> {
    let (dense, post) = &*op.0;
    let (args, targets) = dump_dense(ast, node, dense)?;
    Ok(Some(invocation(
        "drover_ml_linear_regressor",
        &args,
        &[targets, ("post_transform", string(post.name()))],
    )))
}

fn load_regressor(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, dense, post) = load_dense(builder, inv)?;
    builder.wire(LinearRegressor(Arc::new((dense, post))), &[x])
}

fn dump_classifier(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &LinearClassifier,
) -> TractResult<Option<Arc<RValue>>> {
    let p = &*op.0;
    let (args, targets) = dump_dense(ast, node, &p.dense)?;
    let labels = nnef_io::dump(ast, node, "labels", &p.labels)?;
    Ok(Some(invocation(
        "drover_ml_linear_classifier",
        &args,
        &[
            targets,
            ("post_transform", string(p.post.name())),
            ("labels", labels.as_ref().clone()),
        ],
    )))
}

fn load_classifier(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, dense, post) = load_dense(builder, inv)?;
    let labels: Vec<i64> = nnef_io::load(builder, inv, "labels")?;
    ensure!(!labels.is_empty(), "LinearClassifier: no class labels");
    check_labels(&dense, &labels)?;
    builder.wire(
        LinearClassifier(Arc::new(ClassifierParams {
            dense,
            labels,
            post,
        })),
        &[x],
    )
}
