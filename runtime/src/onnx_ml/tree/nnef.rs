//! The compiled form (NNEF) of the tree ensembles: the flat layout itself (nodes, roots,
//! leaf entries as tensors), so a device does not lay the trees out again. A loaded layout
//! is checked before use: every index in range and every child after its parent, so a walk
//! always ends.

use tract_nnef::internal::*;

use super::super::nnef_io::{
    self, attr_int, attr_str, classifier_outputs, float, input, one_output,
};
use super::super::PostTransform;
use super::{
    Aggregate, ClassifierParams, Ensemble, Mode, Node, RegressorParams, TreeEnsembleClassifier,
    TreeEnsembleRegressor, FEATURE_MASK, LEAF,
};

fn ensemble_params() -> Vec<Parameter> {
    let u32s = |n: &str| TypeName::Integer.tensor().named(n);
    vec![
        input(),
        u32s("node_features"),
        float("node_values"),
        u32s("node_next"),
        u32s("roots"),
        u32s("entry_outputs"),
        float("entry_weights"),
        attr_int("single"),
        attr_int("uniform"),
        attr_int("outputs"),
        attr_int("features"),
        attr_str("aggregate"),
        float("base"),
        attr_str("post_transform"),
    ]
}

pub fn register(reg: &mut Registry) {
    reg.register_dumper(dump_regressor);
    reg.register_primitive(
        "drover_ml_tree_ensemble_regressor",
        &ensemble_params(),
        &one_output(),
        load_regressor,
    );
    reg.register_dumper(dump_classifier);
    let mut params = ensemble_params();
    params.push(TypeName::Integer.tensor().named("labels"));
    params.push(attr_int("binary_case"));
    params.push(attr_int("all_positive"));
    reg.register_primitive(
        "drover_ml_tree_ensemble_classifier",
        &params,
        &classifier_outputs(),
        load_classifier,
    );
}

fn aggregate_name(a: Aggregate) -> &'static str {
    match a {
        Aggregate::Sum => "SUM",
        Aggregate::Average => "AVERAGE",
        Aggregate::Min => "MIN",
        Aggregate::Max => "MAX",
    }
}

fn parse_aggregate(s: &str) -> TractResult<Aggregate> {
    Ok(match s {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => bail!("unknown aggregate {other:?}"),
    })
}

fn mode_of(v: i64) -> TractResult<Option<Mode>> {
    Ok(match v {
        -1 => None,
        0..=5 => Some(Mode::from_bits((v as u32) << super::MODE_SHIFT)),
        other => bail!("unknown branch mode {other}"),
    })
}

/// Positional arguments and attributes of an ensemble with its base values and transform.
type Dumped = (Vec<Arc<RValue>>, Vec<(&'static str, RValue)>);

fn dump_ensemble(
    ast: &mut IntoAst,
    node: &TypedNode,
    e: &Ensemble,
    base: &[f32],
    post: PostTransform,
) -> TractResult<Dumped> {
    let x = ast.mapping[&node.inputs[0]].clone();
    let col = |f: fn(&Node) -> u32| e.nodes.iter().map(f).collect::<Vec<u32>>();
    let features = col(|n| n.feature);
    let next = col(|n| n.next);
    let values: Vec<f32> = e.nodes.iter().map(|n| n.value).collect();
    let outs: Vec<u32> = e.entries.iter().map(|(o, _)| *o).collect();
    let weights: Vec<f32> = e.entries.iter().map(|(_, w)| *w).collect();
    let args = vec![
        x,
        nnef_io::dump(ast, node, "node_features", &features)?,
        nnef_io::dump(ast, node, "node_values", &values)?,
        nnef_io::dump(ast, node, "node_next", &next)?,
        nnef_io::dump(ast, node, "roots", &e.roots)?,
        nnef_io::dump(ast, node, "entry_outputs", &outs)?,
        nnef_io::dump(ast, node, "entry_weights", &weights)?,
    ];
    let base = nnef_io::dump(ast, node, "base", base)?;
    let attrs = vec![
        ("single", numeric(e.single.map_or(-1, i64::from))),
        ("uniform", numeric(e.uniform.map_or(-1, |m| m as i64))),
        ("outputs", numeric(e.outputs)),
        ("features", numeric(e.features)),
        ("aggregate", string(aggregate_name(e.aggregate))),
        ("post_transform", string(post.name())),
        ("base", base.as_ref().clone()),
    ];
    Ok((args, attrs))
}

fn load_ensemble(
    builder: &mut ModelBuilder,
    inv: &ResolvedInvocation,
) -> TractResult<(OutletId, Ensemble, Vec<f32>, PostTransform)> {
    let x: OutletId = inv.named_arg_as(builder, "input")?;
    let features: Vec<u32> = nnef_io::load(builder, inv, "node_features")?;
    let values: Vec<f32> = nnef_io::load(builder, inv, "node_values")?;
    let next: Vec<u32> = nnef_io::load(builder, inv, "node_next")?;
    ensure!(
        features.len() == values.len() && values.len() == next.len(),
        "node arrays of different lengths"
    );
    let outs: Vec<u32> = nnef_io::load(builder, inv, "entry_outputs")?;
    let weights: Vec<f32> = nnef_io::load(builder, inv, "entry_weights")?;
    ensure!(
        outs.len() == weights.len(),
        "entry arrays of different lengths"
    );
    let single: i64 = inv.named_arg_as(builder, "single")?;
    let aggregate: String = inv.named_arg_as(builder, "aggregate")?;
    let post: String = inv.named_arg_as(builder, "post_transform")?;
    let e = Ensemble {
        nodes: features
            .into_iter()
            .zip(values)
            .zip(next)
            .map(|((feature, value), next)| Node {
                feature,
                value,
                next,
            })
            .collect(),
        roots: nnef_io::load(builder, inv, "roots")?,
        entries: outs.into_iter().zip(weights).collect(),
        single: if single == -1 {
            None
        } else {
            Some(u32::try_from(single).context("bad single output")?)
        },
        uniform: mode_of(inv.named_arg_as(builder, "uniform")?)?,
        outputs: nnef_io::load_usize(builder, inv, "outputs")?,
        features: nnef_io::load_usize(builder, inv, "features")?,
        aggregate: parse_aggregate(&aggregate)?,
    };
    check(&e)?;
    let base = nnef_io::load(builder, inv, "base")?;
    Ok((x, e, base, PostTransform::parse(Some(&post))?))
}

/// Every index in range and every child after its parent (so every walk ends).
fn check(e: &Ensemble) -> TractResult<()> {
    let n = e.nodes.len();
    ensure!(e.outputs > 0, "no outputs");
    if let Some(o) = e.single {
        ensure!((o as usize) < e.outputs, "single output {o} out of range");
    }
    ensure!(
        e.entries.iter().all(|(o, _)| (*o as usize) < e.outputs),
        "a leaf entry's output is out of range"
    );
    ensure!(
        e.roots.iter().all(|r| (*r as usize) < n),
        "a tree root is out of range"
    );
    for (i, node) in e.nodes.iter().enumerate() {
        if node.feature & LEAF != 0 {
            if e.single.is_none() {
                let end = (node.next as usize).checked_add(node.value.to_bits() as usize);
                ensure!(
                    end.is_some_and(|end| end <= e.entries.len()),
                    "leaf {i}: entries out of range"
                );
            }
        } else {
            let f = (node.feature & FEATURE_MASK) as usize;
            ensure!(f < e.features, "node {i}: feature {f} out of range");
            ensure!(
                i + 1 < n && (node.next as usize) > i && (node.next as usize) < n,
                "node {i}: children out of order or out of range"
            );
        }
    }
    Ok(())
}

fn dump_regressor(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &TreeEnsembleRegressor,
) -> TractResult<Option<Arc<RValue>>> {
    let p = &*op.0;
    let (args, attrs) = dump_ensemble(ast, node, &p.ensemble, &p.base, p.post)?;
    Ok(Some(invocation(
        "drover_ml_tree_ensemble_regressor",
        &args,
        &attrs,
    )))
}

fn load_regressor(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, ensemble, base, post) = load_ensemble(builder, inv)?;
    let p = RegressorParams {
        ensemble,
        base,
        post,
    };
    builder.wire(TreeEnsembleRegressor(Arc::new(p)), &[x])
}

fn dump_classifier(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &TreeEnsembleClassifier,
) -> TractResult<Option<Arc<RValue>>> {
    let p = &*op.0;
    let (args, mut attrs) = dump_ensemble(ast, node, &p.ensemble, &p.base, p.post)?;
    let labels = nnef_io::dump(ast, node, "labels", &p.labels)?;
    attrs.push(("labels", labels.as_ref().clone()));
    attrs.push(("binary_case", numeric(i64::from(p.binary_case))));
    attrs.push(("all_positive", numeric(i64::from(p.all_positive))));
    Ok(Some(invocation(
        "drover_ml_tree_ensemble_classifier",
        &args,
        &attrs,
    )))
}

fn load_classifier(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let (x, ensemble, base, post) = load_ensemble(builder, inv)?;
    let labels: Vec<i64> = nnef_io::load(builder, inv, "labels")?;
    ensure!(
        labels.len() >= 2 && labels.len() == ensemble.outputs,
        "{} class labels for {} outputs",
        labels.len(),
        ensemble.outputs
    );
    let p = ClassifierParams {
        ensemble,
        labels,
        base,
        post,
        binary_case: nnef_io::load_usize(builder, inv, "binary_case")? != 0,
        all_positive: nnef_io::load_usize(builder, inv, "all_positive")? != 0,
    };
    builder.wire(TreeEnsembleClassifier(Arc::new(p)), &[x])
}
