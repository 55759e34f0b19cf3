//! `drover-runtime`: the model runtime the agent serves with and the control plane
//! validates and evaluates with, so publish time and device time refuse the same models for
//! the same reasons.
//!
//! Layout:
//! - [`model`] (re-exported at the root): the loaded model, run and self-test against a
//!   manifest's test vectors, behind `catch_unwind`.
//! - `onnx_load` (feature `onnx`): [`Model::load`], ONNX bytes parsed, checked and optimized.
//! - [`compiled`]: models compiled at publish to tract's own format (NNEF plus tract's
//!   extensions and ours, in a tar): [`compiled::compile`] (feature `onnx`),
//!   [`Model::load_compiled`], and the runtime/format version check.
//! - [`onnx_ml`]: the `ai.onnx.ml` operators scikit-learn exporters emit, registered into
//!   tract-onnx's operator table (feature `onnx`) and into an NNEF registry (`drover_ml`)
//!   that writes and reads them in compiled artifacts.
//! - [`publish`] (feature `onnx`): the graph fixes applied to a model's ONNX bytes at publish
//!   (operator's input shapes, constant-condition `If` folded, stale shape hints dropped).
//! - [`graph`] (feature `onnx`): helpers that build small ONNX graphs (the built-in trainer's
//!   model, the simulator's and benchmarks' fixtures).
//!
//! Without the default feature `onnx` the crate links only tract-core, tract-nnef and
//! tract-onnx-opl: it loads, runs and self-tests compiled models, what a device needs.
//!
//! Architecture invariant: no I/O, no clock, no async runtime: bytes in, tensors out.

pub mod compiled;
#[cfg(feature = "onnx")]
pub mod graph;
pub mod model;
#[cfg(feature = "onnx")]
mod onnx_load;
pub mod onnx_ml;
#[cfg(feature = "onnx")]
pub mod publish;
pub mod sampled;
pub mod threads;

pub use model::*;
pub use sampled::self_test_sampled;
pub use threads::Threads;
