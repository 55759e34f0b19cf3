//! `/v1/integrations`: read-only integration identities (`drover integration`), admin
//! only (`access::required_role`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::access::Actor;
use super::{blocking, ApiError, AppState};
use crate::integrations::{self, IntegrationError};
use crate::store::IntegrationRow;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/integrations", get(list).post(create))
        .route("/v1/integrations/{name}/revoke", post(revoke))
}

impl From<IntegrationError> for ApiError {
    fn from(e: IntegrationError) -> Self {
        match e {
            IntegrationError::Store(s) => s.into(),
            IntegrationError::BadName(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            IntegrationError::Pki(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IntegrationRequest {
    pub name: String,
}

/// The identity's files: in this response only (the server keeps the certificate, never
/// the key).
#[derive(Clone, Serialize, Deserialize)]
pub struct IntegrationCreated {
    pub name: String,
    /// Certificate CN, MQTT username and MQTT client id.
    pub identity: String,
    pub broker_url: String,
    /// The subscription filter it may use (and narrower ones inside it).
    pub topic_filter: String,
    pub ca_pem: String,
    pub cert_pem: String,
    /// Secret: the certificate's private key.
    pub key_pem: String,
    pub not_after_ms: u64,
}

impl std::fmt::Debug for IntegrationCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegrationCreated")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IntegrationView {
    pub name: String,
    pub identity: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub not_after_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

impl From<IntegrationRow> for IntegrationView {
    fn from(r: IntegrationRow) -> Self {
        IntegrationView {
            identity: integrations::identity(&r.name),
            name: r.name,
            created_at_ms: r.created_at_ms,
            created_by: r.created_by,
            not_after_ms: r.not_after_ms,
            revoked_at_ms: r.revoked_at_ms,
        }
    }
}

async fn create(
    State(st): State<AppState>,
    Actor(by): Actor,
    Json(req): Json<IntegrationRequest>,
) -> Result<(StatusCode, Json<IntegrationCreated>), ApiError> {
    let name = req.name.clone();
    let issued = blocking(&st, move |app, s| {
        Ok(integrations::create(
            app,
            s,
            &name,
            &by,
            app.clock.unix_ms(),
        )?)
    })
    .await?;
    let app = &st.app;
    Ok((
        StatusCode::CREATED,
        Json(IntegrationCreated {
            identity: integrations::identity(&req.name),
            name: req.name,
            broker_url: app.agent_broker_url.to_string(),
            topic_filter: drover_protocol::topics::json_filter_all(),
            ca_pem: app.ca.ca_pem().to_owned(),
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
            not_after_ms: issued.not_after_ms,
        }),
    ))
}

async fn list(State(st): State<AppState>) -> Result<Json<Vec<IntegrationView>>, ApiError> {
    let rows = blocking(&st, |_, s| Ok(s.integrations()?)).await?;
    Ok(Json(rows.into_iter().map(IntegrationView::from).collect()))
}

async fn revoke(
    State(st): State<AppState>,
    Actor(by): Actor,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&st, move |app, s| {
        Ok(integrations::revoke(
            app,
            s,
            &name,
            &by,
            app.clock.unix_ms(),
        )?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
