//! `drover-agent`: the Drover edge agent.

pub mod config;
pub mod runtime;
