//! Authentication, roles and the audit log on the HTTP API, and the token and audit
//! routes (`drover token`, `drover audit`).

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{blocking, ApiError, AppState, LimitQuery};
use crate::access::{self, Identity, Role};
use crate::store::{AuditRow, TokenRow};

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}/revoke", post(revoke_token))
        .route("/v1/audit", get(audit))
}

/// Every `/v1` route: the bearer token names an identity, whose role must reach the one
/// the route needs (`access::required_role`); a call that may change something is
/// recorded in the append-only audit log with the identity and the response's status.
pub(super) async fn authorize(
    State(st): State<AppState>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let identity = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| st.app.tokens.identify(t));
    let Some(identity) = identity else {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing, wrong or revoked bearer token: pass --token, set DROVER_TOKEN, or use \
             --data-dir of the server"
                .into(),
        )
        .into_response();
    };
    let method = req.method().clone();
    let route = matched.as_ref().map_or("", |m| m.as_str()).to_owned();
    let path = req.uri().path().to_owned();
    let needed = access::required_role(&method, &route);
    let response = if identity.role < needed {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; {method} {path} needs {needed} (an admin can issue one: \
                 `drover token create NAME --role {needed}`)",
                identity.name, identity.role
            ),
        )
        .into_response()
    } else {
        req.extensions_mut().insert(identity.clone());
        next.run(req).await
    };
    if method != Method::GET && method != Method::HEAD {
        record_audit(
            &st,
            &identity,
            method.as_str(),
            path,
            response.status().as_u16(),
        )
        .await;
    }
    response
}

/// Appends one line to the audit log: the API's non-GET calls and the console's actions,
/// through this one function.
pub(super) async fn record_audit(
    st: &AppState,
    identity: &Identity,
    method: &str,
    path: String,
    status: u16,
) {
    let row = AuditRow {
        id: 0,
        at_ms: st.app.clock.unix_ms(),
        actor: identity.name.clone(),
        role: identity.role.to_string(),
        method: method.to_owned(),
        path,
        status,
    };
    let logged = blocking(st, move |_, s| Ok(s.append_audit(&row)?)).await;
    if let Err(ApiError(_, e)) = logged {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

/// Who asked, for the records a change leaves (rollout reports, device events): the
/// authenticated identity; `?by=` counts only with the shared bootstrap token.
pub struct Actor(pub String);

#[derive(Deserialize)]
struct ByParam {
    by: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let identity = parts.extensions.get::<Identity>().cloned().ok_or_else(|| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no authenticated identity".into(),
            )
        })?;
        let by = Query::<ByParam>::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|q| q.0.by);
        Ok(Actor(identity.actor(by.as_deref())))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRequest {
    pub name: String,
    pub role: String,
}

/// The token itself is in this response only; the server keeps its hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub role: String,
    pub token: String,
}

impl std::fmt::Debug for TokenCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCreated")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub role: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub revoked_at_ms: Option<u64>,
}

impl From<TokenRow> for TokenView {
    fn from(t: TokenRow) -> Self {
        TokenView {
            name: t.name,
            role: t.role,
            created_at_ms: t.created_at_ms,
            created_by: t.created_by,
            revoked_at_ms: t.revoked_at_ms,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditView {
    pub id: u64,
    pub at_ms: u64,
    pub actor: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

impl From<AuditRow> for AuditView {
    fn from(a: AuditRow) -> Self {
        AuditView {
            id: a.id,
            at_ms: a.at_ms,
            actor: a.actor,
            role: a.role,
            method: a.method,
            path: a.path,
            status: a.status,
        }
    }
}

async fn create_token(
    State(st): State<AppState>,
    Actor(by): Actor,
    Json(req): Json<TokenRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    if !access::is_name(&req.name) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "token name {:?}: 1-64 of letters, digits and . _ @ -",
                req.name.chars().take(64).collect::<String>()
            ),
        ));
    }
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "role {:?}: use viewer, deployer or admin",
                req.role.chars().take(32).collect::<String>()
            ),
        )
    })?;
    let (token, hash) = access::new_token();
    let name = req.name.clone();
    blocking(&st, move |app, s| {
        s.insert_token(&name, role.as_str(), &hash, &by, app.clock.unix_ms())?;
        app.tokens.insert(hash, &name, role);
        Ok(())
    })
    .await?;
    tracing::info!(token = %req.name, %role, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            name: req.name,
            role: role.to_string(),
            token,
        }),
    ))
}

async fn list_tokens(State(st): State<AppState>) -> Result<Json<Vec<TokenView>>, ApiError> {
    let rows = blocking(&st, |_, s| Ok(s.tokens()?)).await?;
    Ok(Json(rows.into_iter().map(TokenView::from).collect()))
}

async fn revoke_token(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let n = name.clone();
    blocking(&st, move |app, s| {
        s.revoke_token(&n, app.clock.unix_ms())?;
        app.tokens.remove(&n);
        Ok(())
    })
    .await?;
    tracing::info!(token = %name, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn audit(
    State(st): State<AppState>,
    Query(q): Query<LimitQuery>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = blocking(&st, move |_, s| Ok(s.audit(limit)?)).await?;
    Ok(Json(rows.into_iter().map(AuditView::from).collect()))
}
