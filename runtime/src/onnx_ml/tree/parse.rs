//! Loading a tree ensemble: reads the ONNX node and leaf attribute arrays, checks them
//! (lengths, ids, outputs, one root per tree, no cycles, no shared nodes) and lays every
//! tree out depth-first into the flat node array described in the parent module.

use std::collections::HashMap;

use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::{Aggregate, Ensemble, Mode, Node, FEATURE_MASK, LEAF, MISSING_TRUE, MODE_SHIFT};

impl Ensemble {
    /// Reads the ONNX attributes, checks them, and lays every tree out (see the module doc).
    pub(super) fn parse(
        node: &NodeProto,
        prefix: &str,
        outputs: usize,
        aggregate: Aggregate,
    ) -> TractResult<Ensemble> {
        refuse_tensor_forms(node)?;
        let op = &node.op_type;
        let a = NodeAttrs::read(node)?;
        let leaves = Leaves::read(node, prefix, outputs)?;
        let n = a.tree_ids.len();
        let index: HashMap<(i64, i64), usize> = a
            .tree_ids
            .iter()
            .zip(&a.node_ids)
            .enumerate()
            .map(|(i, (t, n))| ((*t, *n), i))
            .collect();
        ensure!(index.len() == n, "{op}: duplicate (tree, node) ids");
        let (tree_order, roots_by_tree) = a.roots(op)?;

        let mut e = Ensemble {
            nodes: Vec::with_capacity(n),
            roots: Vec::with_capacity(tree_order.len()),
            entries: Vec::with_capacity(leaves.tree.len()),
            single: leaves.single_output(),
            uniform: None,
            outputs,
            features: 0,
            aggregate,
        };
        let mut layout = Layout {
            op,
            a: &a,
            index,
            leaf_entries: leaves.by_node(),
            uniform: None,
            max_feature: 0,
        };
        for t in tree_order {
            let root = *roots_by_tree
                .get(&t)
                .with_context(|| format!("{op}: tree {t} has no root (a cycle)"))?;
            layout.tree(&mut e, t, root)?;
        }
        e.uniform = layout.uniform.flatten();
        e.features = layout.max_feature;
        Ok(e)
    }
}

/// The node arrays (`nodes_*`): parallel, one entry per node of every tree.
struct NodeAttrs {
    tree_ids: Vec<i64>,
    node_ids: Vec<i64>,
    features: Vec<i64>,
    values: Vec<f32>,
    trues: Vec<i64>,
    falses: Vec<i64>,
    /// `None` for a leaf.
    modes: Vec<Option<Mode>>,
    missing: Vec<i64>,
}

impl NodeAttrs {
    fn read(node: &NodeProto) -> TractResult<NodeAttrs> {
        let op = &node.op_type;
        let tree_ids: Vec<i64> = node.get_attr_vec("nodes_treeids")?;
        let n = tree_ids.len();
        ensure!(n > 0, "{op}: no nodes");
        let a = NodeAttrs {
            tree_ids,
            node_ids: node.get_attr_vec("nodes_nodeids")?,
            features: node.get_attr_vec("nodes_featureids")?,
            values: node.get_attr_vec("nodes_values")?,
            trues: node.get_attr_vec("nodes_truenodeids")?,
            falses: node.get_attr_vec("nodes_falsenodeids")?,
            modes: node
                .get_attr_tvec::<&str>("nodes_modes")?
                .iter()
                .map(|s| Mode::parse(s))
                .collect::<TractResult<_>>()?,
            missing: node
                .get_attr_opt_vec("nodes_missing_value_tracks_true")?
                .unwrap_or_else(|| vec![0; n]),
        };
        for (name, len) in [
            ("nodes_nodeids", a.node_ids.len()),
            ("nodes_featureids", a.features.len()),
            ("nodes_values", a.values.len()),
            ("nodes_truenodeids", a.trues.len()),
            ("nodes_falsenodeids", a.falses.len()),
            ("nodes_modes", a.modes.len()),
            ("nodes_missing_value_tracks_true", a.missing.len()),
        ] {
            ensure!(len == n, "{op}: {name} has {len} entries, expected {n}");
        }
        Ok(a)
    }

    /// Tree ids in ascending order, and each tree's root: the node no other node of that
    /// tree points to.
    fn roots(&self, op: &str) -> TractResult<(Vec<i64>, HashMap<i64, usize>)> {
        let n = self.tree_ids.len();
        let mut children = std::collections::HashSet::new();
        for i in 0..n {
            if self.modes[i].is_some() {
                children.insert((self.tree_ids[i], self.trues[i]));
                children.insert((self.tree_ids[i], self.falses[i]));
            }
        }
        let mut tree_order: Vec<i64> = self.tree_ids.clone();
        tree_order.sort_unstable();
        tree_order.dedup();
        let mut roots_by_tree: HashMap<i64, usize> = HashMap::new();
        for i in 0..n {
            if !children.contains(&(self.tree_ids[i], self.node_ids[i])) {
                ensure!(
                    roots_by_tree.insert(self.tree_ids[i], i).is_none(),
                    "{op}: tree {} has more than one root",
                    self.tree_ids[i]
                );
            }
        }
        Ok((tree_order, roots_by_tree))
    }
}

/// The leaf arrays: `class_*` for classifiers, `target_*` for regressors.
struct Leaves {
    tree: Vec<i64>,
    node: Vec<i64>,
    output: Vec<i64>,
    weight: Vec<f32>,
}

impl Leaves {
    fn read(node: &NodeProto, prefix: &str, outputs: usize) -> TractResult<Leaves> {
        let op = &node.op_type;
        let leaves = Leaves {
            tree: node.get_attr_vec(&format!("{prefix}_treeids"))?,
            node: node.get_attr_vec(&format!("{prefix}_nodeids"))?,
            output: node.get_attr_vec(&format!("{prefix}_ids"))?,
            weight: node.get_attr_vec(&format!("{prefix}_weights"))?,
        };
        let m = leaves.tree.len();
        attr_len(node, &format!("{prefix}_nodeids"), &leaves.node, m)?;
        attr_len(node, &format!("{prefix}_ids"), &leaves.output, m)?;
        attr_len(node, &format!("{prefix}_weights"), &leaves.weight, m)?;
        for o in &leaves.output {
            ensure!(
                usize::try_from(*o).is_ok_and(|o| o < outputs),
                "{op}: leaf output {o} out of range for {outputs} outputs"
            );
        }
        Ok(leaves)
    }

    /// `(output, weight)` entries per `(tree, node)`, in attribute order (the order leaf
    /// weights are summed in, so results match the exporter's).
    fn by_node(&self) -> HashMap<(i64, i64), Vec<(u32, f32)>> {
        let mut by_node: HashMap<(i64, i64), Vec<(u32, f32)>> = HashMap::new();
        for i in 0..self.tree.len() {
            by_node
                .entry((self.tree[i], self.node[i]))
                .or_default()
                .push((self.output[i] as u32, self.weight[i]));
        }
        by_node
    }

    /// `Some(output)` when every entry goes to that one output.
    fn single_output(&self) -> Option<u32> {
        let distinct: std::collections::BTreeSet<i64> = self.output.iter().copied().collect();
        if distinct.len() == 1 {
            distinct.first().map(|o| *o as u32)
        } else {
            None
        }
    }
}

fn attr_len<T>(node: &NodeProto, name: &str, v: &[T], n: usize) -> TractResult<()> {
    ensure!(
        v.len() == n,
        "{}: {name} has {} entries, expected {n}",
        node.op_type,
        v.len()
    );
    Ok(())
}

fn refuse_tensor_forms(node: &NodeProto) -> TractResult<()> {
    if let Some(a) = node
        .attribute
        .iter()
        .find(|a| a.name.ends_with("_as_tensor"))
    {
        bail!(
            "{}: {} (double-precision trees) is not supported",
            node.op_type,
            a.name
        );
    }
    Ok(())
}

/// Lays trees out depth-first into an [`Ensemble`], tracking whether every branch shares
/// one mode and how many features the branches read.
struct Layout<'a> {
    op: &'a str,
    a: &'a NodeAttrs,
    /// Original index of each `(tree, node)`.
    index: HashMap<(i64, i64), usize>,
    leaf_entries: HashMap<(i64, i64), Vec<(u32, f32)>>,
    /// `None` before the first branch, then `Some(Some(mode))` while all branches agree.
    uniform: Option<Option<Mode>>,
    max_feature: usize,
}

impl Layout<'_> {
    /// Appends tree `t`, true child first, and checks every node of the tree was reached
    /// exactly once from its root.
    fn tree(&mut self, e: &mut Ensemble, t: i64, root: usize) -> TractResult<()> {
        let (op, n) = (self.op, self.a.tree_ids.len());
        e.roots.push(e.nodes.len() as u32);
        // `stack` holds (original index, slot whose `next` to patch with our position).
        let mut stack: Vec<(usize, Option<usize>)> = vec![(root, None)];
        let mut visited = 0usize;
        while let Some((i, patch)) = stack.pop() {
            visited += 1;
            ensure!(visited <= n, "{op}: tree {t} is not a tree (a cycle)");
            let here = e.nodes.len();
            ensure!(here < u32::MAX as usize / 2, "{op}: too many nodes");
            if let Some(p) = patch {
                e.nodes[p].next = here as u32;
            }
            match self.a.modes[i] {
                Some(mode) => {
                    e.nodes.push(self.branch(i, mode)?);
                    let child = |id: i64| {
                        self.index
                            .get(&(t, id))
                            .copied()
                            .with_context(|| format!("{op}: tree {t} has no node {id}"))
                    };
                    // Pushed in reverse: the true child is laid out right after us.
                    stack.push((child(self.a.falses[i])?, Some(here)));
                    stack.push((child(self.a.trues[i])?, None));
                }
                None => self.leaf(e, t, i),
            }
        }
        let in_tree = self.a.tree_ids.iter().filter(|id| **id == t).count();
        ensure!(
            visited == in_tree,
            "{op}: tree {t} is not a tree ({visited} of its {in_tree} nodes reachable once from its root)"
        );
        Ok(())
    }

    /// The flattened branch node `i`; its false child is patched in when laid out.
    fn branch(&mut self, i: usize, mode: Mode) -> TractResult<Node> {
        let feature = self.a.features[i];
        let f = usize::try_from(feature)
            .ok()
            .filter(|f| *f <= FEATURE_MASK as usize)
            .with_context(|| format!("{}: bad feature id {feature}", self.op))?;
        self.max_feature = self.max_feature.max(f + 1);
        self.uniform = match self.uniform {
            None => Some(Some(mode)),
            Some(Some(u)) if u == mode => Some(Some(u)),
            _ => Some(None),
        };
        let mut bits = f as u32 | ((mode as u32) << MODE_SHIFT);
        if self.a.missing[i] != 0 {
            bits |= MISSING_TRUE;
        }
        Ok(Node {
            feature: bits,
            value: self.a.values[i],
            next: 0,
        })
    }

    /// Appends leaf `i` of tree `t`: its summed weight inline for a single-output ensemble,
    /// else a span of `e.entries`.
    fn leaf(&self, e: &mut Ensemble, t: i64, i: usize) {
        let entries = self
            .leaf_entries
            .get(&(t, self.a.node_ids[i]))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let node = if e.single.is_some() {
            Node {
                feature: LEAF,
                value: entries.iter().map(|(_, w)| w).sum(),
                next: entries.len() as u32,
            }
        } else {
            let start = e.entries.len() as u32;
            e.entries.extend_from_slice(entries);
            Node {
                feature: LEAF,
                value: f32::from_bits(entries.len() as u32),
                next: start,
            }
        };
        e.nodes.push(node);
    }
}
