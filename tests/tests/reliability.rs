//! The short reliability battery (issue 24), run by CI as its own step (`.ci/run`,
//! "battery"): hostile input and faults against real processes — the `drover` and
//! `drover-agent` binaries, the embedded broker behind its mutual-TLS front, mosquitto
//! configured by `drover broker config mosquitto` — asserting on observed outcomes
//! (counters, stored rows, states), never on time. Each test stands alone.
//!
//! What the battery covers that the other suites do not (they stay where they are:
//! `security.rs` auth/ACL matrix, `broker_abuse.rs` takeover and session storm on the
//! embedded broker, `chunk_abuse.rs`, `api_limits.rs`, `bad_input.rs`, `crash.rs`):
//! - `uplink`: payload abuse against a live `drover serve` process through its TLS front;
//! - `slow`: hundreds of silent and byte-dripping TLS connections while a device works;
//! - `http`: HTTP abuse on the control-plane API;
//! - `kserve`: KServe v2 abuse on a running agent's local API;
//! - `downlink`: poison downlinks published to a device's topic;
//! - `mosquitto`: one identity's connect storm on mosquitto from the generated config (the
//!   client-id takeover there is `broker_abuse.rs`'s, the certificate matrix `security.rs`'s);
//! - `agent_kills`: 20 agent SIGKILLs during deploys with reverts;
//! - `serve_kills`: 10 control-plane SIGKILLs during ingest (integrity, sent = stored).

#[path = "reliability/agent_kills.rs"]
mod agent_kills;
#[path = "reliability/common.rs"]
mod common;
#[path = "reliability/downlink.rs"]
mod downlink;
#[path = "reliability/http.rs"]
mod http;
#[path = "reliability/kserve.rs"]
mod kserve;
#[path = "reliability/mosquitto.rs"]
mod mosquitto;
#[path = "reliability/serve_kills.rs"]
mod serve_kills;
#[path = "reliability/slow.rs"]
mod slow;
#[path = "reliability/uplink.rs"]
mod uplink;
