//! `drover-runtime`: the model runtime the agent serves with and the control plane
//! validates and evaluates with, so publish time and device time refuse the same models for
//! the same reasons.
//!
//! Layout:
//! - [`model`] (re-exported at the root): tract-onnx load, optimize, run and self-test
//!   against a manifest's test vectors, behind `catch_unwind`.
//! - [`onnx_ml`]: the `ai.onnx.ml` operators scikit-learn exporters emit, registered into
//!   tract-onnx's operator table.
//! - [`publish`]: the graph fixes applied to a model's ONNX bytes at publish (operator's
//!   input shapes, constant-condition `If` folded, stale shape hints dropped).
//! - [`graph`]: helpers that build small ONNX graphs (the built-in trainer's model, the
//!   simulator's and benchmarks' fixtures).
//!
//! Architecture invariant: no I/O, no clock, no async runtime: bytes in, tensors out.

pub mod graph;
pub mod model;
pub mod onnx_ml;
pub mod publish;
pub mod sampled;
pub mod threads;

pub use model::*;
pub use sampled::self_test_sampled;
pub use threads::Threads;
