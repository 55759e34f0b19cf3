//! `/v1/keyring`: the keyring as devices verify it, and reload after `drover keys rotate`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyView {
    pub key_id: String,
    pub roles: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: Option<u64>,
    pub revoked: bool,
    pub current: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyringView {
    pub root_key_id: String,
    pub version: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub keys: Vec<KeyView>,
}

/// The keyring as shown by `keys show` (never a secret).
pub fn keyring_view(keys: &crate::keys::Keys) -> KeyringView {
    let root_id = drover_protocol::trust::KeyId::of(&keys.root_public);
    KeyringView {
        root_key_id: root_id.to_string(),
        version: keys.keyring.version,
        issued_at_ms: keys.keyring.issued_at_ms,
        expires_at_ms: keys.keyring.expires_at_ms,
        keys: keys
            .keyring
            .keys
            .iter()
            .map(|k| KeyView {
                key_id: k.key_id.to_string(),
                roles: k.roles.iter().map(|r| format!("{r:?}")).collect(),
                not_before_ms: k.not_before_ms,
                not_after_ms: (k.not_after_ms != u64::MAX).then_some(k.not_after_ms),
                revoked: k.revoked,
                current: k.key_id == keys.signing.id(),
            })
            .collect(),
    }
}

pub(super) async fn keyring(State(st): State<AppState>) -> Json<KeyringView> {
    Json(keyring_view(&st.app.keys.current()))
}

/// `POST /v1/keyring/reload`: `drover keys rotate` tells the running server to load the
/// rotated key files and publish the new keyring, so no restart is needed.
pub(super) async fn reload_keyring(
    State(st): State<AppState>,
) -> Result<Json<KeyringView>, ApiError> {
    let keys = st
        .app
        .reload_keys()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(keyring_view(&keys)))
}
