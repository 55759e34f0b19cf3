//! Staged rollouts: plans, the pure engine, and the async driver that applies it.
//!
//! - [`plan`]: the operator's plan (TOML or flags): model, selector, cumulative waves, bake
//!   times, concurrency, deadline, gates, shadow phase; device buckets.
//! - [`engine`]: `step(state, observations, now) -> (state, actions, events)`, no I/O; its
//!   private helpers: `waves` (assignment, dispatch), `slots` (device reports, deploy and
//!   promote), `gates` (gate evaluation).
//! - [`windows`]: apply windows (days, hours, IANA zone), checked with the time passed in.
//! - [`record`]: the stored form (JSON in SQLite), apart from the engine's types.
//! - [`targets`]: the selector over the store's device rows, devices held by open
//!   rollouts, a plan's preview against the fleet, the candidate's drift per device.
//! - [`driver`]: reads observations from the store, runs the engine on a timer, persists
//!   state + commands in one transaction, publishes the commands.

pub mod driver;
pub mod engine;
mod gates;
pub mod plan;
pub mod record;
mod slots;
pub mod targets;
mod waves;
pub mod windows;

#[cfg(test)]
mod engine_pilot_tests;
#[cfg(test)]
mod engine_tests;

pub use engine::{
    Candidate, DevState, Event, GateValue, LiveAccuracy, Op, RolloutState, Stage, Status, Verdict,
};
pub use plan::{OnFailure, OnNoData, Plan, PlanError, Selector};
pub use waves::{Preview, WavePreview};
