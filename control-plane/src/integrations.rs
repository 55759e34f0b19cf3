//! Read-only integration identities (`drover integration create|list|revoke`): a client
//! certificate from the fleet CA whose CN is `integration@<name>`, for a Node-RED,
//! Telegraf or Grafana agent that reads the JSON stream (docs/INTEGRATIONS.md).
//!
//! What it may do, on the embedded broker's TLS front (`broker::acl`) and in the generated
//! mosquitto ACL alike: subscribe inside `drover/v1/json/#`; nothing else (no publish, no
//! device uplinks, downlinks, chunks or keyring). The `@` in its CN keeps it apart from
//! devices: no device id contains one, so it can neither log in as a device nor take a
//! device's broker session (client id = CN). One identity holds one session, so give
//! each consumer its own.
//!
//! Revoking cuts its open session at once and lists its certificate in the CRL for good.

use crate::app::App;
use crate::pki::{Issued, PkiError, INTEGRATION_CN_PREFIX};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    #[error("integration name {0:?}: 1-64 of letters, digits and . _ -")]
    BadName(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// An integration name: 1-64 of `[A-Za-z0-9._-]`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The certificate CN, MQTT username and client id of integration `name`.
pub fn identity(name: &str) -> String {
    format!("{INTEGRATION_CN_PREFIX}{name}")
}

fn checked(name: &str) -> Result<(), IntegrationError> {
    if is_name(name) {
        Ok(())
    } else {
        Err(IntegrationError::BadName(name.chars().take(64).collect()))
    }
}

/// Creates integration `name`: its certificate (secret key included, returned once) and
/// its row; it may connect at once.
pub fn create(
    app: &App,
    store: &mut Store,
    name: &str,
    by: &str,
    now_ms: u64,
) -> Result<Issued, IntegrationError> {
    checked(name)?;
    let issued = store.create_integration_with(name, by, now_ms, || {
        app.ca.issue_integration(name, now_ms).map(|i| {
            let not_after = i.not_after_ms;
            (i, not_after)
        })
    })??;
    app.devices.set_integration(name, true);
    tracing::info!(integration = name, by, "integration identity created");
    Ok(issued)
}

/// Revokes integration `name`: refused from now on, its open session cut, its
/// certificate listed in the CRL.
pub fn revoke(
    app: &App,
    store: &mut Store,
    name: &str,
    by: &str,
    now_ms: u64,
) -> Result<(), IntegrationError> {
    checked(name)?;
    store.revoke_integration(name, now_ms)?;
    app.devices.set_integration(name, false);
    app.tls_sessions.kick(&identity(name));
    app.ca.retire_integration_cert(name)?;
    app.write_crl_blocking()?;
    tracing::info!(integration = name, by, "integration identity revoked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_names_cannot_carry_levels_or_wildcards() {
        assert!(is_name("node-red.plant_b"));
        for bad in ["", "a/b", "a+b", "#", "a b", &"x".repeat(65)] {
            assert!(!is_name(bad), "{bad}");
        }
        assert_eq!(identity("telegraf"), "integration@telegraf");
        assert!(drover_protocol::DeviceId::new(identity("telegraf")).is_err());
    }
}
