//! Models compiled at publish to tract's own format (issue 25): the decluttered typed graph
//! of the model's (publish-fixed) ONNX, written as NNEF with tract's `tract_core` and
//! `tract_onnx` extensions and ours (`drover_ml`, [`crate::onnx_ml::nnef_registry`]), in an
//! uncompressed tar. A device loads it with no protobuf and no ONNX translation, then
//! optimizes it for its own CPU exactly as [`Model::load`] does after decluttering, so both
//! give the same plan.
//!
//! tract does not check versions itself: the manifest records the runtime version that
//! compiled an artifact ([`runtime_version`]) and [`COMPILED_FORMAT_VERSION`], and
//! [`check_compatible`] applies the protocol's rule for accepting one with this runtime.
//!
//! Architecture invariant: loading never panics on hostile bytes (tract runs under
//! `catch_unwind`; our operators' loaders check their parameters), and compiling is
//! deterministic (same ONNX in, same bytes out: tar mtimes fixed, entries sorted).

use std::panic::{catch_unwind, AssertUnwindSafe};

use tract_nnef::framework::Nnef;
#[cfg(feature = "onnx")]
use tract_nnef::internal::TractErrorContext;
use tract_nnef::prelude::*;
use tract_onnx_opl::WithOnnx;

use crate::model::{from_optimized, Model, RuntimeError};

mod if_then_else;

/// The compiled artifact format (a tar of tract NNEF/OPL).
pub const COMPILED_FORMAT: &str = "tract-nnef";
/// Bumped when our encoding changes (our operators' NNEF parameters, the tar's layout).
pub const COMPILED_FORMAT_VERSION: u32 = 1;

/// The tract version this build links (a test pins it against Cargo.lock).
pub fn runtime_version() -> &'static str {
    TRACT_VERSION
}

const TRACT_VERSION: &str = "0.23.9";

/// The NNEF framework compile and load share: tract's core and ONNX extensions, ours
/// (`drover_ml` operators, `drover_core` forms of tract ops tract does not write), and
/// extended identifiers (`i"input.1"`) so every node name survives. Built once: building it
/// parses NNEF's standard library and every registry, which costs more than loading a
/// small model.
fn framework() -> &'static Nnef {
    static NNEF: std::sync::OnceLock<Nnef> = std::sync::OnceLock::new();
    NNEF.get_or_init(|| {
        let mut nnef = tract_nnef::nnef()
            .with_onnx()
            .with_registry(crate::onnx_ml::nnef_registry())
            .with_registry(if_then_else::registry());
        nnef.allow_extended_identifier_syntax(true);
        nnef
    })
}

/// ONNX bytes (already fixed by `publish::prepare`) to the compiled artifact's bytes.
/// Deterministic: the same input gives the same bytes.
#[cfg(feature = "onnx")]
pub fn compile(onnx: &[u8]) -> Result<Vec<u8>, RuntimeError> {
    let mut typed = crate::onnx_load::decluttered(onnx)?;
    // The ONNX file's metadata (producer, free-form `metadata_props`) is not needed to run
    // and tract 0.23 writes some values it cannot parse back.
    typed.properties.clear();
    let refused = |e: TractError| {
        RuntimeError::Load(format!(
            "cannot be compiled to tract's format ({e:#}); publish it without compiling \
             (keep the ONNX artifact) or report it with the model attached"
        ))
    };
    catch_unwind(AssertUnwindSafe(|| {
        let nnef = framework();
        let bytes = nnef
            .write_to_tar_with_config(&typed, Vec::new(), false, true)
            .map_err(refused)?;
        // Some of tract's operator forms write but do not read back (tract 0.23's
        // CategoryMapper string-to-int): never hand out an artifact no device can read.
        nnef.model_for_read(&mut &*bytes)
            .context("reading the compiled form back")
            .map_err(refused)?;
        Ok(bytes)
    }))
    .unwrap_or(Err(RuntimeError::Panicked("compiling the model")))
}

fn compiled_err(e: TractError) -> RuntimeError {
    RuntimeError::Compiled(format!(
        "{e:#}; the artifact is damaged or was made by another runtime: re-publish the model \
         (or download it again)"
    ))
}

fn load_compiled_inner(bytes: &[u8], threads: crate::Threads) -> Result<Model, RuntimeError> {
    // A tar is whole 512-byte blocks, a `ustar` header first and two zero blocks last (a
    // cut on a block boundary loses them); anything else is not ours or not whole.
    let whole = bytes.len() >= 1536
        && bytes.len() % 512 == 0
        && &bytes[257..262] == b"ustar"
        && bytes[bytes.len() - 1024..].iter().all(|b| *b == 0);
    if !whole {
        return Err(RuntimeError::Compiled(format!(
            "{} bytes are not a {COMPILED_FORMAT} tar (truncated or not compiled); re-publish \
             the model or download it again",
            bytes.len()
        )));
    }
    let typed = framework()
        .model_for_read(&mut &*bytes)
        .map_err(compiled_err)?;
    let typed = typed
        .into_optimized()
        .map_err(|e| crate::model::refusal("cannot be analysed", &e))?;
    from_optimized(typed, threads)
}

impl Model {
    /// Loads a compiled artifact ([`compile`]): the same model [`Model::load_with`] gives
    /// from the ONNX it was compiled from. Never panics.
    pub fn load_compiled(bytes: &[u8], threads: crate::Threads) -> Result<Model, RuntimeError> {
        catch_unwind(AssertUnwindSafe(|| load_compiled_inner(bytes, threads)))
            .unwrap_or(Err(RuntimeError::Panicked("loading the compiled model")))
    }
}

/// Can this runtime run `artifact`? The one rule, [`RuntimeReport::check`] on this build's
/// [`runtime_report`]: the control plane applies the same rule to the report a device
/// sent before it sends anything, and the agent before it downloads.
///
/// [`RuntimeReport::check`]: drover_protocol::messages::RuntimeReport::check
pub fn check_compatible(artifact: &drover_protocol::manifest::Artifact) -> Result<(), String> {
    runtime_report().check(Some(artifact))
}

/// What this build loads (the device's `Runtime` report, protocol 3): tract at
/// [`runtime_version`], compiled artifacts, and plain ONNX files when the crate is built
/// with its `onnx` feature (the control plane, tests; never the shipped agent).
pub fn runtime_report() -> drover_protocol::messages::RuntimeReport {
    use drover_protocol::messages::{ArtifactFormat, RuntimeReport};
    let mut formats = vec![ArtifactFormat {
        format: COMPILED_FORMAT.into(),
        version: COMPILED_FORMAT_VERSION,
    }];
    if cfg!(feature = "onnx") {
        formats.push(ArtifactFormat {
            format: RuntimeReport::ONNX.into(),
            version: 1,
        });
    }
    RuntimeReport {
        engine: "tract".into(),
        version: runtime_version().into(),
        formats,
    }
}

/// Loads the model file a manifest describes: a compiled artifact (checked against this
/// runtime first) or, with the `onnx` feature, a plain ONNX file; without it a plain
/// ONNX file is refused saying what to do. The one load path of agent and simulator.
pub fn load_artifact(
    bytes: &[u8],
    artifact: Option<&drover_protocol::manifest::Artifact>,
    threads: crate::Threads,
) -> Result<Model, RuntimeError> {
    match artifact {
        Some(a) if a.format == COMPILED_FORMAT => {
            check_compatible(a).map_err(RuntimeError::Load)?;
            Model::load_compiled(bytes, threads)
        }
        Some(a) => Err(RuntimeError::Load(format!(
            "the model file is in format {} {}, and this runtime loads {COMPILED_FORMAT} \
             {COMPILED_FORMAT_VERSION}; upgrade the agent",
            a.format, a.format_version
        ))),
        #[cfg(feature = "onnx")]
        None => Model::load_with(bytes, threads),
        #[cfg(not(feature = "onnx"))]
        None => Err(RuntimeError::Load(
            "the model file is plain ONNX, and this agent runs compiled models only; publish \
             the .onnx again as a new version (drover serve compiles it) and deploy that"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendored tract-nnef parses each expression once (vendor/README.md): subscripts,
    /// slices, and nested arrays and tuples still parse to the same trees.
    #[test]
    fn the_patched_nnef_parser_reads_subscripts_and_nesting() {
        use tract_nnef::ast::parse::parse_assignments;
        use tract_nnef::ast::{Literal, RValue, Subscript};
        let rhs = |src: &str| parse_assignments(src).unwrap().remove(0).right;
        let num = |n: &str| RValue::Literal(Literal::Numeric(n.into()));
        let id = |n: &str| RValue::Identifier(n.into());

        let RValue::Subscript(x, s) = rhs("y = x[1:2];") else {
            panic!("slice")
        };
        assert_eq!(*x, id("x"));
        assert_eq!(*s, Subscript::Range(Some(num("1")), Some(num("2"))));
        let RValue::Subscript(a, s) = rhs("y = [3, 4][0];") else {
            panic!("index")
        };
        assert_eq!(*a, RValue::Array(vec![num("3"), num("4")]));
        assert_eq!(*s, Subscript::Single(num("0")));
        // An open bracket that is not a subscript leaves the atom alone, as before.
        assert!(parse_assignments("y = x[;").is_err());

        let RValue::Invocation(inv) = rhs("y = conv(i\"a.b\", padding = [(0, 0), (1, 1)]);") else {
            panic!("invocation")
        };
        assert_eq!(inv.arguments.len(), 2);
        assert_eq!(inv.arguments[0].rvalue, id("a.b"));
        let pair = |a, b| RValue::Tuple(vec![num(a), num(b)]);
        assert_eq!(
            inv.arguments[1].rvalue,
            RValue::Array(vec![pair("0", "0"), pair("1", "1")])
        );
    }

    #[test]
    fn runtime_version_is_the_tract_in_cargo_lock() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        for krate in ["tract-core", "tract-nnef", "tract-onnx-opl"] {
            let at = lock
                .find(&format!("name = \"{krate}\"\n"))
                .unwrap_or_else(|| panic!("{krate} not in Cargo.lock"));
            let version = lock[at..].lines().nth(1).unwrap();
            assert_eq!(
                version,
                format!("version = \"{}\"", runtime_version()),
                "{krate}"
            );
        }
    }

    fn artifact(runtime_version: &str, format_version: u32) -> drover_protocol::manifest::Artifact {
        drover_protocol::manifest::Artifact {
            format: COMPILED_FORMAT.into(),
            format_version,
            runtime_version: runtime_version.into(),
            source_sha256: [0; 32],
        }
    }

    /// The version rule itself is tested in the protocol (`RuntimeReport::check`); this is
    /// that the runtime applies it with its own version and formats.
    #[test]
    fn the_runtime_applies_the_protocol_rule_with_its_own_version() {
        assert_eq!(check_compatible(&artifact(runtime_version(), 1)), Ok(()));
        let newer = check_compatible(&artifact("0.24.0", 1)).unwrap_err();
        assert!(
            newer.contains("0.24.0") && newer.contains(runtime_version()),
            "{newer}"
        );
        let older_series = check_compatible(&artifact("0.22.1", 1)).unwrap_err();
        assert!(older_series.contains("0.22.1"), "{older_series}");
        let format = check_compatible(&artifact(runtime_version(), COMPILED_FORMAT_VERSION + 1))
            .unwrap_err();
        assert!(format.contains("upgrade the agent"), "{format}");
        assert!(check_compatible(&artifact("0.23", 1)).is_err());
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/compiled/gb_clf.nnef.tar"
        ))
        .unwrap();
        assert!(load_artifact(
            &bytes,
            Some(&artifact(runtime_version(), 1)),
            crate::Threads::One
        )
        .is_ok());
        let Err(e) = load_artifact(&bytes, Some(&artifact("0.24.0", 1)), crate::Threads::One)
        else {
            panic!("a newer runtime's artifact is refused before loading");
        };
        assert!(e.to_string().contains("0.24.0"), "{e}");
    }

    #[test]
    fn garbage_and_truncated_bytes_are_refused_not_panicking() {
        for bytes in [&b""[..], b"\x00\x01\x02", &[0xff; 1024], &[0; 1024]] {
            let e = Model::load_compiled(bytes, crate::Threads::One).unwrap_err();
            assert!(matches!(e, RuntimeError::Compiled(_)), "{e}");
            assert!(e.to_string().contains("re-publish"), "{e}");
        }
    }
}
