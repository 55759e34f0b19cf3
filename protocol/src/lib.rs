//! `drover-protocol`: the contract between the Drover agent and control plane.
//!
//! Layout:
//! - [`topics`]: the MQTT topic scheme and validated [`DeviceId`]s.
//! - [`messages`]: every message both ways ([`Uplink`], [`Downlink`], [`Command`], …).
//! - [`manifest`]: signed model manifests (schema, chunk hashes, baseline, test vectors).
//! - [`envelope`]: the versioned, length-bounded, authenticated frame format.
//! - [`trust`]: root key → keyring → signed manifests and commands; per-device MACs.
//! - [`integration`]: the integration stream's versioned flat JSON (uplinks, registrations).
//!
//! Architecture invariant: this crate does no I/O. No tokio, MQTT, SQLite, tract, clock
//! or environment: time comes in as `now_ms` arguments, keys as bytes. `.ci/run` checks
//! the dependency tree.

pub mod envelope;
pub mod integration;
pub mod manifest;
pub mod messages;
pub mod topics;
pub mod trust;

pub use envelope::{
    DecodeError, DownlinkFrame, UplinkFrame, ENVELOPE_VERSION, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
pub use manifest::Manifest;
pub use messages::{Command, Downlink, ModelRef, Uplink};
pub use topics::DeviceId;
pub use trust::{DeviceKey, SecretKey, SignedBlob, TrustError, TrustStore};
