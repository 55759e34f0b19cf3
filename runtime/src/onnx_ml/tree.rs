//! Tree ensembles: TreeEnsembleClassifier, TreeEnsembleRegressor.
//!
//! The ONNX attributes describe nodes as parallel arrays keyed by `(tree id, node id)`. At
//! load time each tree is laid out depth-first in one flat array of 12-byte nodes shared by
//! the whole ensemble: a branch's "true" child is the next node, so a node stores only its
//! feature (with mode flags in the high bits), its threshold and its "false" child. A walk
//! down a tree then touches one small, mostly sequential array; a 20-tree depth-6 forest
//! fits in L1. Single-output ensembles (regressors, binary gradient boosting) keep the leaf
//! weight in the leaf node itself; others point into a flat `(output, weight)` table.
//! Rows are evaluated a block at a time, tree by tree, so a tree stays hot in cache while a
//! batch goes through it; the all-`BRANCH_LEQ` case (every exporter tried) has its own walk
//! loop with the comparison inlined.
//!
//! Aggregation, base values, post-transforms and the binary-classifier special cases follow
//! onnxruntime's `tree_ensemble_aggregator.h`, which is what exported models are checked
//! against.
//!
//! Layout: this file holds the flat representation, the walk and aggregation and the two
//! operators; `tree/parse.rs` reads and checks the attributes and lays the trees out
//! (feature `onnx`); `tree/nnef.rs` writes and reads the laid-out trees in compiled
//! artifacts.

use tract_nnef::internal::*;
#[cfg(feature = "onnx")]
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
#[cfg(feature = "onnx")]
use tract_onnx::pb::NodeProto;
#[cfg(feature = "onnx")]
use tract_onnx::tract_hir::internal::*;

use super::linear::classifier_facts;
#[cfg(feature = "onnx")]
use super::linear::{classifier_rules, int_labels};
use super::{as_f32, logistic, ml_op, probit, rows_cols, tensor_f32, tensor_i64, PostTransform};

mod nnef;
#[cfg(feature = "onnx")]
mod parse;

pub use nnef::register as register_nnef;

#[cfg(feature = "onnx")]
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("TreeEnsembleClassifier", tree_classifier);
    reg.insert("TreeEnsembleRegressor", tree_regressor);
}

#[cfg(feature = "onnx")]
type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

const LEAF: u32 = 1 << 31;
const MISSING_TRUE: u32 = 1 << 30;
const MODE_SHIFT: u32 = 24;
const MODE_MASK: u32 = 0x7 << MODE_SHIFT;
const FEATURE_MASK: u32 = (1 << MODE_SHIFT) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Mode {
    Leq = 0,
    Lt = 1,
    Gte = 2,
    Gt = 3,
    Eq = 4,
    Neq = 5,
}

impl Mode {
    #[cfg(feature = "onnx")]
    fn parse(s: &str) -> TractResult<Option<Mode>> {
        Ok(Some(match s {
            "BRANCH_LEQ" => Mode::Leq,
            "BRANCH_LT" => Mode::Lt,
            "BRANCH_GTE" => Mode::Gte,
            "BRANCH_GT" => Mode::Gt,
            "BRANCH_EQ" => Mode::Eq,
            "BRANCH_NEQ" => Mode::Neq,
            "LEAF" => return Ok(None),
            other => bail!("unknown tree node mode {other:?}"),
        }))
    }

    fn from_bits(f: u32) -> Mode {
        match (f & MODE_MASK) >> MODE_SHIFT {
            0 => Mode::Leq,
            1 => Mode::Lt,
            2 => Mode::Gte,
            3 => Mode::Gt,
            4 => Mode::Eq,
            _ => Mode::Neq,
        }
    }

    #[inline(always)]
    fn test(self, x: f32, v: f32) -> bool {
        match self {
            Mode::Leq => x <= v,
            Mode::Lt => x < v,
            Mode::Gte => x >= v,
            Mode::Gt => x > v,
            Mode::Eq => x == v,
            Mode::Neq => x != v,
        }
    }
}

/// One flattened node. Branch: `feature | mode << 24 | MISSING_TRUE?`, threshold `value`,
/// true child at `index + 1`, false child at `next`. Leaf: `LEAF`, and either the leaf weight
/// in `value` (single output) or `next` = first entry in `Ensemble::entries` and
/// `value.to_bits()` = entry count.
#[derive(Clone, Copy, Debug)]
struct Node {
    feature: u32,
    value: f32,
    next: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Debug)]
struct Ensemble {
    nodes: Vec<Node>,
    /// Root node index of each tree, in tree-id order.
    roots: Vec<u32>,
    /// `(output, weight)` leaf entries when `single` is `None`.
    entries: Vec<(u32, f32)>,
    /// `Some(output)` when every leaf entry goes to that one output.
    single: Option<u32>,
    /// Every branch uses this mode (the common case: all `BRANCH_LEQ`).
    uniform: Option<Mode>,
    outputs: usize,
    features: usize,
    aggregate: Aggregate,
}

impl Ensemble {
    /// The leaf a row reaches in the tree rooted at `root`.
    #[inline(always)]
    fn walk<const UNIFORM: bool>(&self, mode: Mode, root: u32, row: &[f32]) -> &Node {
        let mut i = root as usize;
        loop {
            let n = &self.nodes[i];
            if n.feature & LEAF != 0 {
                return n;
            }
            let x = row[(n.feature & FEATURE_MASK) as usize];
            let m = if UNIFORM {
                mode
            } else {
                Mode::from_bits(n.feature)
            };
            let go_true = m.test(x, n.value) | ((n.feature & MISSING_TRUE != 0) & x.is_nan());
            i = if go_true { i + 1 } else { n.next as usize };
        }
    }

    /// [`Self::walk`] for the common all-`BRANCH_LEQ` ensemble, the comparison inlined.
    #[inline(always)]
    fn walk_leq(&self, root: u32, row: &[f32]) -> &Node {
        let mut i = root as usize;
        loop {
            let n = &self.nodes[i];
            if n.feature & LEAF != 0 {
                return n;
            }
            let x = row[(n.feature & FEATURE_MASK) as usize];
            let go_true = (x <= n.value) | ((n.feature & MISSING_TRUE != 0) & x.is_nan());
            i = if go_true { i + 1 } else { n.next as usize };
        }
    }

    /// Accumulates every tree into `acc` (`[rows, outputs]`) and `has` (whether an output
    /// received any leaf entry), in tree order per row.
    fn accumulate(&self, x: &[f32], cols: usize, acc: &mut [f32], has: &mut [bool]) {
        match self.uniform {
            Some(mode) => self.accumulate_with::<true>(mode, x, cols, acc, has),
            None => self.accumulate_with::<false>(Mode::Leq, x, cols, acc, has),
        }
    }

    fn add_leaf(&self, leaf: &Node, acc: &mut [f32], has: &mut [bool]) {
        match self.single {
            Some(out) => {
                if leaf.next > 0 {
                    let o = out as usize;
                    combine(self.aggregate, &mut acc[o], &mut has[o], leaf.value);
                }
            }
            None => {
                let start = leaf.next as usize;
                let end = start + leaf.value.to_bits() as usize;
                for &(out, w) in &self.entries[start..end] {
                    let o = out as usize;
                    combine(self.aggregate, &mut acc[o], &mut has[o], w);
                }
            }
        }
    }

    fn accumulate_with<const UNIFORM: bool>(
        &self,
        mode: Mode,
        x: &[f32],
        cols: usize,
        acc: &mut [f32],
        has: &mut [bool],
    ) {
        let k = self.outputs;
        let rows: Vec<&[f32]> = if cols == 0 {
            // Only possible when every tree is a single leaf.
            vec![&[]; acc.len() / k.max(1)]
        } else {
            x.chunks_exact(cols).collect()
        };
        // Blocks of rows go through each tree together, so a tree stays in L1 while the block
        // walks it. Each row still receives the trees in order, so sums round exactly as
        // onnxruntime's do. (Walking a block's rows in lockstep, branch-free, measured ~2x
        // slower on these ensembles: a step waits for the block's deepest row.)
        for (b, block) in rows.chunks(BLOCK).enumerate() {
            let base = b * BLOCK;
            for &root in &self.roots {
                for (r, row) in block.iter().enumerate() {
                    let leaf = if UNIFORM && mode == Mode::Leq {
                        self.walk_leq(root, row)
                    } else {
                        self.walk::<UNIFORM>(mode, root, row)
                    };
                    let o = (base + r) * k;
                    self.add_leaf(leaf, &mut acc[o..o + k], &mut has[o..o + k]);
                }
            }
        }
    }
}

/// Rows that go through one tree before the next tree.
const BLOCK: usize = 8;

#[inline(always)]
fn combine(agg: Aggregate, acc: &mut f32, has: &mut bool, w: f32) {
    match agg {
        Aggregate::Sum | Aggregate::Average => *acc += w,
        Aggregate::Min => {
            if !*has || w < *acc {
                *acc = w
            }
        }
        Aggregate::Max => {
            if !*has || w > *acc {
                *acc = w
            }
        }
    }
    *has = true;
}

fn check_input(e: &Ensemble, input: &Tensor) -> TractResult<(usize, usize)> {
    let (rows, cols) = rows_cols(input.shape())?;
    ensure!(
        cols >= e.features,
        "input has {cols} features, the trees use {}",
        e.features
    );
    Ok((rows, cols))
}

// ---------------------------------------------------------------------------------------
// Regressor

#[derive(Debug)]
pub struct RegressorParams {
    ensemble: Ensemble,
    base: Vec<f32>,
    post: PostTransform,
}

/// Tree ensemble regressor: `[N, n_targets]` float output.
#[derive(Clone, Debug)]
pub struct TreeEnsembleRegressor(Arc<RegressorParams>);

#[cfg(feature = "onnx")]
fn tree_regressor(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let targets: usize = node.get_attr_opt("n_targets")?.unwrap_or(1);
    ensure!(targets > 0, "TreeEnsembleRegressor: n_targets is 0");
    let aggregate = match node
        .get_attr_opt::<&str>("aggregate_function")?
        .unwrap_or("SUM")
    {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => bail!("TreeEnsembleRegressor: unknown aggregate_function {other:?}"),
    };
    let ensemble = Ensemble::parse(node, "target", targets, aggregate)?;
    let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
    let post = PostTransform::parse(node.get_attr_opt("post_transform")?)?;
    Ok((
        expand(TreeEnsembleRegressor(Arc::new(RegressorParams {
            ensemble,
            base,
            post,
        }))),
        vec![],
    ))
}

impl TreeEnsembleRegressor {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[1], self.0.ensemble.outputs.to_dim())?;
        s.given(&inputs[0].rank, move |s, rank| {
            if rank == 1 {
                s.equals(&outputs[0].shape[0], 1.to_dim())
            } else {
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])
            }
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut f = classifier_facts(inputs[0], self.0.ensemble.outputs);
        Ok(tvec!(f.remove(1)))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &*self.0;
        let e = &p.ensemble;
        let (rows, cols) = check_input(e, &inputs[0])?;
        let x = as_f32(&inputs[0])?;
        let k = e.outputs;
        let mut acc = vec![0.0f32; rows * k];
        let mut has = vec![false; rows * k];
        e.accumulate(&x, cols, &mut acc, &mut has);
        let n_trees = e.roots.len() as f32;
        for row in acc.chunks_exact_mut(k) {
            if k == 1 {
                // onnxruntime's single-target path: one base value ("origin"), PROBIT only.
                let origin = if p.base.len() == 1 { p.base[0] } else { 0.0 };
                if e.aggregate == Aggregate::Average {
                    row[0] /= n_trees;
                }
                row[0] += origin;
                if p.post == PostTransform::Probit {
                    row[0] = probit(row[0]);
                }
            } else {
                let use_base = p.base.len() == k;
                for (j, v) in row.iter_mut().enumerate() {
                    if e.aggregate == Aggregate::Average {
                        *v /= n_trees;
                    }
                    if use_base {
                        *v += p.base[j];
                    }
                }
                p.post.apply(row);
            }
        }
        Ok(tvec!(tensor_f32(&[rows, k], acc)?))
    }
}
ml_op!(TreeEnsembleRegressor, "ai.onnx.ml.TreeEnsembleRegressor", inputs: 1, outputs: 1);

// ---------------------------------------------------------------------------------------
// Classifier

#[derive(Debug)]
pub struct ClassifierParams {
    ensemble: Ensemble,
    labels: Vec<i64>,
    base: Vec<f32>,
    post: PostTransform,
    /// Two classes and every leaf weight on the same one (binary gradient boosting).
    binary_case: bool,
    all_positive: bool,
}

/// Tree ensemble classifier, `zipmap=False` form: int64 labels `[N]` and float scores
/// `[N, classes]`.
#[derive(Clone, Debug)]
pub struct TreeEnsembleClassifier(Arc<ClassifierParams>);

#[cfg(feature = "onnx")]
fn tree_classifier(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let labels = int_labels(node, "classlabels_int64s")?;
    ensure!(
        labels.len() >= 2,
        "TreeEnsembleClassifier: needs at least two class labels"
    );
    let ensemble = Ensemble::parse(node, "class", labels.len(), Aggregate::Sum)?;
    let weights: Vec<f32> = node.get_attr_vec("class_weights")?;
    let all_positive = weights.iter().all(|w| *w >= 0.0);
    let binary_case = labels.len() == 2 && ensemble.single.is_some();
    let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
    let post = PostTransform::parse(node.get_attr_opt("post_transform")?)?;
    Ok((
        expand(TreeEnsembleClassifier(Arc::new(ClassifierParams {
            ensemble,
            labels,
            base,
            post,
            binary_case,
            all_positive,
        }))),
        vec![],
    ))
}

impl ClassifierParams {
    /// onnxruntime's `_set_score_binary`: the label, and how to widen one score to two.
    fn binary_label(&self, pos_weight: f32) -> (i64, u8) {
        if self.binary_case {
            if self.all_positive {
                if pos_weight > 0.5 {
                    (self.labels[1], 0)
                } else {
                    (self.labels[0], 1)
                }
            } else if pos_weight > 0.0 {
                (self.labels[1], 2)
            } else {
                (self.labels[0], 3)
            }
        } else if pos_weight > 0.0 {
            (1, 0)
        } else {
            (0, 0)
        }
    }

    /// Finalizes one row of two class scores (onnxruntime's binary `FinalizeScores`).
    fn finalize_binary(&self, row: &mut [f32], has: &mut [bool]) -> i64 {
        let mut write_additional: Option<u8> = None;
        let mut single = false;
        match self.base.len() {
            2 => {
                if has[1] {
                    // onnxruntime ignores base_values[0] here (it assumes both are equal).
                    row[1] = self.base[1] + row[0];
                    row[0] = -row[1];
                } else {
                    row[1] += self.base[1];
                    row[0] += self.base[0];
                }
            }
            1 => {
                row[0] += self.base[0];
                single = !has[1];
            }
            _ => {
                write_additional = Some(3);
                single = !has[1];
            }
        }
        let pos_weight = if !single && has[1] {
            row[1]
        } else if has[0] {
            row[0]
        } else {
            0.0
        };
        let (label, widen) = self.binary_label(pos_weight);
        // `_set_score_binary` overwrites the mode only in the binary case.
        let widen = if self.binary_case {
            widen
        } else {
            write_additional.unwrap_or(widen)
        };
        if single {
            let s = row[0];
            let (a, b) = match (widen, self.post) {
                (_, PostTransform::Probit) => (probit(s), 0.0),
                (0 | 1, _) => (1.0 - s, s),
                (2 | 3, PostTransform::Logistic) => (logistic(-s), logistic(s)),
                (2, _) => (-s, s),
                _ => (s, -s),
            };
            row[0] = a;
            row[1] = b;
        } else {
            self.post.apply(row);
        }
        label
    }
}

impl TreeEnsembleClassifier {
    #[cfg(feature = "onnx")]
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        classifier_rules(s, inputs, outputs, self.0.labels.len())
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(classifier_facts(inputs[0], self.0.labels.len()))
    }

    fn eval_ml(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = &*self.0;
        let e = &p.ensemble;
        let (rows, cols) = check_input(e, &inputs[0])?;
        let x = as_f32(&inputs[0])?;
        let k = e.outputs;
        let mut acc = vec![0.0f32; rows * k];
        let mut has = vec![false; rows * k];
        e.accumulate(&x, cols, &mut acc, &mut has);
        let mut labels = Vec::with_capacity(rows);
        for (row, has) in acc.chunks_exact_mut(k).zip(has.chunks_exact_mut(k)) {
            if k > 2 {
                for (j, b) in p.base.iter().enumerate().take(k) {
                    if has[j] {
                        row[j] += b;
                    } else {
                        row[j] = *b;
                        has[j] = true;
                    }
                }
                let mut best: Option<usize> = None;
                for j in 0..k {
                    if has[j] && best.is_none_or(|b| row[j] > row[b]) {
                        best = Some(j);
                    }
                }
                labels.push(p.labels[best.unwrap_or(0)]);
                p.post.apply(row);
            } else {
                labels.push(p.finalize_binary(row, has));
            }
        }
        Ok(tvec!(
            tensor_i64(&[rows], labels)?,
            tensor_f32(&[rows, k], acc)?
        ))
    }
}
ml_op!(TreeEnsembleClassifier, "ai.onnx.ml.TreeEnsembleClassifier", inputs: 1, outputs: 2);

#[cfg(all(test, feature = "onnx"))]
mod tests {
    use super::*;
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::AttributeProto;

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn floats(name: &str, v: &[f32]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Floats as i32,
            floats: v.to_vec(),
            ..Default::default()
        }
    }

    fn strings(name: &str, v: &[&str]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Strings as i32,
            strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    /// One tree: node 0 tests feature 1 with `mode` against 0.5 (NaN goes to the true side
    /// when `missing`); true → leaf 1 (weight 10), false → leaf 2 (weight 20).
    fn regressor(mode: &str, missing: i64, true_child: i64) -> NodeProto {
        NodeProto {
            op_type: "TreeEnsembleRegressor".into(),
            attribute: vec![
                ints("nodes_treeids", &[0, 0, 0]),
                ints("nodes_nodeids", &[0, 1, 2]),
                ints("nodes_featureids", &[1, 0, 0]),
                floats("nodes_values", &[0.5, 0.0, 0.0]),
                strings("nodes_modes", &[mode, "LEAF", "LEAF"]),
                ints("nodes_truenodeids", &[true_child, 0, 0]),
                ints("nodes_falsenodeids", &[2, 0, 0]),
                ints("nodes_missing_value_tracks_true", &[missing, 0, 0]),
                ints("target_treeids", &[0, 0]),
                ints("target_nodeids", &[1, 2]),
                ints("target_ids", &[0, 0]),
                floats("target_weights", &[10.0, 20.0]),
            ],
            ..Default::default()
        }
    }

    fn eval(node: &NodeProto, rows: &[[f32; 2]]) -> TractResult<Vec<f32>> {
        let ensemble = Ensemble::parse(node, "target", 1, Aggregate::Sum)?;
        let op = TreeEnsembleRegressor(Arc::new(RegressorParams {
            ensemble,
            base: vec![],
            post: PostTransform::None,
        }));
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let x = tensor_f32(&[rows.len(), 2], flat)?;
        let out = op.eval_ml(tvec!(x))?;
        Ok(out[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    }

    #[test]
    fn branch_modes_and_missing_values_follow_onnx() {
        let rows = [[0.0, 0.2], [0.0, 0.5], [0.0, 0.9], [0.0, f32::NAN]];
        assert_eq!(
            eval(&regressor("BRANCH_LEQ", 0, 1), &rows).unwrap(),
            [10.0, 10.0, 20.0, 20.0]
        );
        assert_eq!(
            eval(&regressor("BRANCH_LT", 1, 1), &rows).unwrap(),
            [10.0, 20.0, 20.0, 10.0]
        );
        assert_eq!(
            eval(&regressor("BRANCH_GT", 0, 1), &rows).unwrap(),
            [20.0, 20.0, 10.0, 20.0]
        );
        // 12 rows: a lockstep block of 8, then 4 walked one by one; same answers.
        let many: Vec<[f32; 2]> = rows.iter().cycle().take(12).copied().collect();
        let want: Vec<f32> = [10.0, 20.0, 20.0, 10.0]
            .into_iter()
            .cycle()
            .take(12)
            .collect();
        assert_eq!(eval(&regressor("BRANCH_LT", 1, 1), &many).unwrap(), want);
    }

    #[test]
    fn malformed_trees_are_refused_with_a_reason() {
        // Node 0's true child is itself: a cycle, leaf 1 alone looks like the root.
        let e = eval(&regressor("BRANCH_LEQ", 0, 0), &[[0.0, 0.0]]).unwrap_err();
        assert!(format!("{e:#}").contains("not a tree"), "{e:#}");
        // A child id that does not exist: leaf 1 is nobody's child, a second root.
        let e = eval(&regressor("BRANCH_LEQ", 0, 7), &[[0.0, 0.0]]).unwrap_err();
        assert!(format!("{e:#}").contains("more than one root"), "{e:#}");
        // A leaf weight for an output that does not exist.
        let mut n = regressor("BRANCH_LEQ", 0, 1);
        n.attribute[10] = ints("target_ids", &[0, 3]);
        let e = eval(&n, &[[0.0, 0.0]]).unwrap_err();
        assert!(format!("{e:#}").contains("out of range"), "{e:#}");
    }

    #[test]
    fn an_input_narrower_than_the_trees_is_an_error_not_a_panic() {
        let node = regressor("BRANCH_LEQ", 0, 1);
        let ensemble = Ensemble::parse(&node, "target", 1, Aggregate::Sum).unwrap();
        let op = TreeEnsembleRegressor(Arc::new(RegressorParams {
            ensemble,
            base: vec![],
            post: PostTransform::None,
        }));
        let x = tensor_f32(&[2, 1], vec![0.0, 1.0]).unwrap();
        let e = op.eval_ml(tvec!(x)).unwrap_err();
        assert!(format!("{e:#}").contains("features"), "{e:#}");
    }
}
