//! `App`: the one context every control-plane service takes (mini-redis `Db` style).
//! Cloning is cheap; every field is a handle whose state is private to its module.
//!
//! - [`devices`]: the device cache and the broker's login rules.
//! - [`keys`]: the serving keys, swapped in place on rotation.
//! - [`outbox`]: everything sent to devices (downlinks, commands, keyring, chunks).
//! - [`paths`]: where files live under the data directory.
//!
//! Architecture invariant: `serve.rs` builds the `App` and starts services; services get
//! an `App` (or the handles they need) and never import `serve`.

pub mod devices;
pub mod keys;
pub mod outbox;
pub mod paths;

use std::sync::Arc;

use drover_host::clock::SharedClock;

pub use self::devices::{BrokerLogins, DeviceEntry, Devices};
pub use self::keys::KeyStore;
pub use self::outbox::Outbox;
pub use self::paths::Paths;
use crate::broker::Sessions;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::pki::FleetCa;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error("the rotated keyring is loaded but could not be published: {0}")]
    Publish(#[from] crate::mqtt::MqttError),
    #[error("key reload task failed: {0}")]
    Task(String),
}

#[derive(Clone, Debug)]
pub struct App {
    pub settings: Arc<Settings>,
    pub paths: Paths,
    pub clock: SharedClock,
    pub metrics: Arc<Metrics>,
    pub devices: Devices,
    pub keys: KeyStore,
    /// The fleet CA: device certificates, the broker's identity, the CRL.
    pub ca: Arc<FleetCa>,
    /// Open mutual-TLS sessions of the embedded broker (cut on decommission).
    pub tls_sessions: Arc<Sessions>,
    pub outbox: Outbox,
    /// The bootstrap API token (`<data>/api-token`, an admin).
    pub api_token: Arc<str>,
    /// Every token the API accepts, by hash, with its identity and role.
    pub tokens: crate::access::Tokens,
    /// The broker URL written into enrolled agents' configs.
    pub agent_broker_url: Arc<str>,
    /// The names and addresses the embedded broker's certificate carries (empty for an
    /// external or plaintext broker).
    pub broker_names: Arc<[String]>,
}

impl App {
    /// When a command issued now expires.
    pub fn command_expiry_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.settings.command_ttl.as_millis() as u64)
    }

    /// `drover keys rotate` without a restart: reloads the key files, swaps them in and
    /// publishes the new keyring (retained, so devices connecting later get it too;
    /// devices that were offline also get it in reply to their `Hello`).
    pub async fn reload_keys(&self) -> Result<Arc<crate::keys::Keys>, ReloadError> {
        let store = self.keys.clone();
        let keys = tokio::task::spawn_blocking(move || store.reload_blocking())
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))??;
        self.outbox.publish_keyring(&keys.keyring_blob).await?;
        tracing::info!(
            keyring_version = keys.keyring.version,
            signing_key = %keys.signing.id(),
            "keys reloaded; keyring published"
        );
        Ok(keys)
    }

    /// Rewrites the CRL from the device cache (blocking file work).
    pub fn write_crl_blocking(&self) -> Result<std::path::PathBuf, crate::pki::PkiError> {
        self.ca
            .write_crl(&self.devices.decommissioned(), self.clock.unix_ms())
    }
}
