//! tract-core's `IfThenElse` (an ONNX `If` whose condition is only known at run time) in
//! compiled artifacts: tract 0.23 has no NNEF form for it. Each branch is written as an NNEF
//! fragment (as tract writes a `Scan` body) and the node as
//! `drover_if(cond, then_inputs, else_inputs, then, else)`: the outer wires each branch reads,
//! one per fragment parameter in order (the branch's inputs, then its weights), and the
//! fragments' names. Read back, each branch is rebuilt in the outer model's symbol scope, so
//! shapes keep their symbols.

use tract_core::ops::logic::IfThenElse;
use tract_nnef::ast::Identifier;
use tract_nnef::internal::*;
use tract_nnef::ser::{array, to_fragment_def};

/// The registry of our NNEF forms for tract-core operators.
pub const REGISTRY: &str = "drover_core";

pub fn registry() -> Registry {
    let mut reg = Registry::new(REGISTRY)
        .with_doc("Extension `drover_core`: NNEF forms of tract-core ops tract does not write.");
    reg.register_dumper(dump);
    reg.register_primitive(
        "drover_if",
        &[
            TypeName::Logical.tensor().named("cond"),
            TypeName::Scalar.tensor().array().named("then_inputs"),
            TypeName::Scalar.tensor().array().named("else_inputs"),
            TypeName::String.named("then"),
            TypeName::String.named("else"),
        ],
        &[("outputs", TypeName::Scalar.tensor().array())],
        load,
    );
    reg
}

/// One branch as a fragment; the outer values its parameters take, in order.
fn branch(
    ast: &mut IntoAst,
    node: &TypedNode,
    body: &TypedModel,
    mapping: &[usize],
    which: &str,
) -> TractResult<(Identifier, Vec<RValue>)> {
    let (mut frag, tensors) = to_fragment_def(ast, body)?;
    frag.decl.id = Identifier(format!("drover_if_{which}_{}", node.id));
    let mut args: Vec<RValue> = mapping
        .iter()
        .map(|ix| ast.mapping[&node.inputs[*ix]].as_ref().clone())
        .collect();
    // The fragment's parameters are the body's inputs, then its weights sorted by id.
    for param in &frag.decl.parameters[mapping.len()..] {
        let t = tensors
            .iter()
            .find(|t| t.parameter_id == param.id)
            .with_context(|| format!("no weight for parameter {:?}", param.id.0))?;
        let label = format!("{}.{which}.{}", node.name, t.label.0);
        args.push(ast.konst_variable(label, &t.value)?.as_ref().clone());
    }
    let id = frag.decl.id.clone();
    ast.fragments.insert(id.clone(), frag);
    Ok((id, args))
}

fn dump(ast: &mut IntoAst, node: &TypedNode, op: &IfThenElse) -> TractResult<Option<Arc<RValue>>> {
    let cond = ast.mapping[&node.inputs[0]].clone();
    let (then_id, then_args) = branch(ast, node, &op.then_body, &op.then_input_mapping, "then")?;
    let (else_id, else_args) = branch(ast, node, &op.else_body, &op.else_input_mapping, "else")?;
    Ok(Some(invocation(
        "drover_if",
        &[cond],
        &[
            ("then_inputs", array(then_args)),
            ("else_inputs", array(else_args)),
            ("then", string(then_id.0)),
            ("else", string(else_id.0)),
        ],
    )))
}

/// Rebuilds the branch fragment `name` with its parameters bound to `wires`' facts.
fn rebuild(builder: &ModelBuilder, name: &str, wires: &[OutletId]) -> TractResult<TypedModel> {
    let frag = builder
        .proto_model
        .doc
        .fragments
        .iter()
        .find(|f| f.decl.id.0 == name)
        .with_context(|| format!("no fragment {name:?}"))?;
    ensure!(
        frag.decl.parameters.len() == wires.len(),
        "fragment {name:?} takes {} values, {} given",
        frag.decl.parameters.len(),
        wires.len()
    );
    let body_ast = frag
        .body
        .as_deref()
        .with_context(|| format!("fragment {name:?} has no body"))?;
    let template = TypedModel {
        symbols: builder.model.symbols.clone(),
        ..TypedModel::default()
    };
    let mut body = ModelBuilder::new(builder.framework, builder.proto_model, template);
    body.scopes.push(HashMap::new());
    body.naming_scopes.clone_from(&builder.naming_scopes);
    body.registries.clone_from(&builder.registries);
    for (param, wire) in frag.decl.parameters.iter().zip(wires) {
        let fact = builder.model.outlet_fact(*wire)?.clone();
        let source = body.model.add_source(param.id.0.to_string(), fact)?;
        body.scopes
            .last_mut()
            .expect("pushed above")
            .insert(param.id.clone(), Value::Wire(source));
    }
    body.wire_body(body_ast)
        .with_context(|| format!("wiring {name:?}"))?;
    let outputs = frag
        .decl
        .results
        .iter()
        .map(|r| {
            let v = body
                .scopes
                .last()
                .expect("pushed above")
                .get(&r.id)
                .with_context(|| format!("{name:?}: no result {:?}", r.id.0))?
                .clone();
            v.to::<OutletId>(&mut body)
        })
        .collect::<TractResult<Vec<_>>>()?;
    body.model.select_output_outlets(&outputs)?;
    Ok(body.model)
}

fn load(builder: &mut ModelBuilder, inv: &ResolvedInvocation) -> TractResult<Value> {
    let cond: OutletId = inv.named_arg_as(builder, "cond")?;
    let then_wires: TVec<OutletId> = inv.named_arg_as(builder, "then_inputs")?;
    let else_wires: TVec<OutletId> = inv.named_arg_as(builder, "else_inputs")?;
    let then_name: String = inv.named_arg_as(builder, "then")?;
    let else_name: String = inv.named_arg_as(builder, "else")?;
    let then_body = rebuild(builder, &then_name, &then_wires)?;
    let else_body = rebuild(builder, &else_name, &else_wires)?;
    let mut inputs = vec![cond];
    inputs.extend(then_wires.iter().copied());
    inputs.extend(else_wires.iter().copied());
    let op = IfThenElse {
        then_input_mapping: (1..=then_wires.len()).collect(),
        else_input_mapping: (then_wires.len() + 1..inputs.len()).collect(),
        then_body,
        else_body,
    };
    builder.wire(op, &inputs)
}
