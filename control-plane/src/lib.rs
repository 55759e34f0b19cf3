//! `drover-control-plane`: the `drover serve` library (the `drover` binary and its CLI
//! live in `drover-cli`).
//!
//! Layout:
//! - [`serve`]: wires everything; `serve::run(config, shutdown)` is what `main` and the
//!   tests call.
//! - [`config`]: serve configuration (defaults < TOML < env < flags).
//! - [`broker`]: the embedded rumqttd broker behind a mutual-TLS front (certificate,
//!   username = CN, key-derived password, per-topic ACL, sessions cut on decommission).
//! - [`mqtt`]: the control plane's rumqttc sessions (the only MQTT client code).
//! - [`ingest`]: authenticates uplink frames, stores them in batches on its own thread.
//! - [`chunks`]: coalesced chunk serving on shared per-model topics.
//! - [`registry`]: model validation (tract), baseline, test vectors, signing.
//! - [`fleet`]: enroll, decommission, signed deploy commands.
//! - [`rollout`]: staged rollouts: plans, the pure engine, the driver that applies it.
//! - [`store`]: SQLite, one file per aggregate; the only module that knows SQL. [`store::Db`]
//!   is the services' handle on it.
//! - [`keys`]: root/signing key files and the root-signed keyring.
//! - [`pki`]: the fleet CA (rcgen): device and broker certificates, the CRL.
//! - [`integrations`]: read-only integration identities for the JSON stream.
//! - [`api`]: HTTP API (axum) and its JSON views; [`access`]: API tokens, roles, the
//!   audit rule; [`metrics`]: Prometheus counters.
//! - [`trainer`]: the built-in trainer (logistic regression exported as ONNX), so the
//!   embedded default can train with nothing installed but Rust.
//! - [`drift`]: PSI and chi-square drift scores per device, label group and fleet;
//!   [`drift_record`] converts them to and from the store's drift rows.
//! - [`jobs`]: training job specs, datasets and executors (local process, Slurm).
//! - [`continuous`]: policy, triggers, the evaluation gate and registration of candidates.

pub mod access;
pub mod api;

pub mod app;
pub mod broker;
pub mod chunks;
pub mod config;
pub mod continuous;
pub mod dispatch;
pub mod drift;
pub mod drift_record;
pub mod fleet;
pub mod https;
pub mod ingest;
pub mod integrations;
pub mod jobs;
pub mod keys;
pub mod maintenance;
pub mod metrics;
pub mod mqtt;
pub mod pki;
pub mod registry;
pub mod rollout;
pub mod serve;
pub mod stats;
pub mod store;
pub mod trainer;
