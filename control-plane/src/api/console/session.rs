//! Console login: an API token, entered once in a form, buys a session. The browser holds
//! only a random session id (cookie `drover_console`: HttpOnly, SameSite=Strict, Secure
//! when the API is TLS); the server keeps the token's hash, never the token, and
//! re-identifies it on every request, so a revoked token ends its sessions at once.
//! Sessions end after [`IDLE_MS`] without a request, after [`MAX_AGE_MS`] in any case, or
//! at logout. Each session has its own CSRF token, which every state-changing form
//! carries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use rand::RngCore as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::html::esc;
use super::ConsoleState;
use crate::access::{self, Identity};

pub const COOKIE: &str = "drover_console";
/// A session unused this long is gone.
pub const IDLE_MS: u64 = 60 * 60 * 1000;
/// A session older than this is gone, used or not.
pub const MAX_AGE_MS: u64 = 12 * 60 * 60 * 1000;
/// Sessions held at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;

struct Session {
    token_hash: [u8; 32],
    csrf: String,
    created_ms: u64,
    last_ms: u64,
}

/// The open sessions, by the SHA-256 of their id. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sessions {
    by_id: Arc<Mutex<HashMap<[u8; 32], Session>>>,
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    drover_protocol::topics::hex32(&b)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for a token (known by its hash); returns its id.
    fn open(&self, token_hash: [u8; 32], now_ms: u64) -> String {
        let id = random_hex();
        let mut map = self.lock();
        map.retain(|_, s| live(s, now_ms));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_ms).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(
            key(&id),
            Session {
                token_hash,
                csrf: random_hex(),
                created_ms: now_ms,
                last_ms: now_ms,
            },
        );
        id
    }

    /// The session's token hash and CSRF token, if it is live; touches it.
    fn touch(&self, id: &str, now_ms: u64) -> Option<([u8; 32], String)> {
        let mut map = self.lock();
        let k = key(id);
        let s = map.get_mut(&k)?;
        if !live(s, now_ms) {
            map.remove(&k);
            return None;
        }
        s.last_ms = now_ms;
        Some((s.token_hash, s.csrf.clone()))
    }

    fn close(&self, id: &str) {
        self.lock().remove(&key(id));
    }
}

fn live(s: &Session, now_ms: u64) -> bool {
    now_ms.saturating_sub(s.last_ms) < IDLE_MS && now_ms.saturating_sub(s.created_ms) < MAX_AGE_MS
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn set_cookie(st: &ConsoleState, value: &str, max_age_s: u64) -> HeaderValue {
    let secure = if st.api.app.settings.api_tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let c = format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    );
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A signed-in console user: who, and the CSRF token their forms must carry.
pub struct User {
    pub identity: Identity,
    pub csrf: String,
}

impl User {
    /// The hidden CSRF field of a form.
    pub fn csrf_field(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            esc(&self.csrf)
        )
    }

    /// Whether `given` is this session's CSRF token.
    pub fn csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| drover_host::ct_eq(g.as_bytes(), self.csrf.as_bytes()))
    }
}

impl FromRequestParts<ConsoleState> for User {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &ConsoleState) -> Result<Self, Response> {
        let now = st.api.app.clock.unix_ms();
        let found = cookie_value(&parts.headers)
            .and_then(|id| st.sessions.touch(&id, now))
            .and_then(|(hash, csrf)| Some((st.api.app.tokens.identify_hash(&hash)?, csrf)));
        match found {
            Some((identity, csrf)) => Ok(User { identity, csrf }),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/console", |p| p.as_str());
                let to = format!("/console/login?next={}", super::html::url(next));
                Err(Redirect::to(&to).into_response())
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct NextQuery {
    next: Option<String>,
}

/// Only a path inside the console is a place to return to after login.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/console") && !n.contains("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/console".into(),
    }
}

fn login_page(next: &str, error: Option<&str>) -> String {
    let err = error.map_or(String::new(), |e| {
        format!(
            "<p class=\"error\" role=\"alert\"><span aria-hidden=\"true\">✖</span> {}</p>",
            esc(e)
        )
    });
    let body = format!(
        "<main id=\"main\" class=\"login\"><h1>Sign in to Drover</h1>{err}\
         <form method=\"post\" action=\"/console/login\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label for=\"token\">API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required \
         aria-describedby=\"token-help\">\
         <p id=\"token-help\">A token from <code>drover token create NAME --role viewer|deployer|admin</code>, \
         or the bootstrap token in <code>&lt;data&gt;/api-token</code>. The browser keeps only a session id.</p>\
         <button type=\"submit\">Sign in</button></form></main>",
        esc(next)
    );
    super::shell("Sign in", None, &body)
}

pub async fn login_form(axum::extract::Query(q): axum::extract::Query<NextQuery>) -> Response {
    super::html_response(
        StatusCode::OK,
        login_page(&safe_next(q.next.as_deref()), None),
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    next: Option<String>,
}

pub async fn login(State(st): State<ConsoleState>, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    let hash = access::hash_token(&f.token);
    let Some(identity) = st.api.app.tokens.identify_hash(&hash) else {
        tracing::info!("console sign-in refused: unknown or revoked token");
        return super::html_response(
            StatusCode::UNAUTHORIZED,
            login_page(&next, Some("Wrong or revoked token.")),
        );
    };
    let now = st.api.app.clock.unix_ms();
    let id = st.sessions.open(hash, now);
    super::super::access::record_audit(&st.api, &identity, "POST", "/console/login".into(), 303)
        .await;
    tracing::info!(user = %identity.name, role = %identity.role, "console sign-in");
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&st, &id, MAX_AGE_MS / 1000));
    r
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: Option<String>,
}

pub async fn logout(
    State(st): State<ConsoleState>,
    user: User,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !user.csrf_ok(f.csrf.as_deref()) {
        return super::Fail::csrf().into_response();
    }
    if let Some(id) = cookie_value(&headers) {
        st.sessions.close(&id);
    }
    super::super::access::record_audit(
        &st.api,
        &user.identity,
        "POST",
        "/console/logout".into(),
        303,
    )
    .await;
    let mut r = Redirect::to("/console/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&st, "", 0));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_too_long_or_too_old_or_closed() {
        let s = Sessions::default();
        let id = s.open([7; 32], 1_000);
        assert_eq!(s.touch(&id, 2_000).map(|t| t.0), Some([7; 32]));
        assert!(s.touch(&id, 2_000 + IDLE_MS).is_none(), "idle too long");
        let id = s.open([7; 32], 0);
        let mut t = 0;
        while t + IDLE_MS / 2 < MAX_AGE_MS {
            t += IDLE_MS / 2;
            assert!(s.touch(&id, t).is_some());
        }
        assert!(s.touch(&id, MAX_AGE_MS).is_none(), "too old");
        let id = s.open([7; 32], 0);
        s.close(&id);
        assert!(s.touch(&id, 1).is_none());
        assert!(s.touch("not-a-session", 1).is_none());
    }

    #[test]
    fn only_console_paths_are_returned_to() {
        assert_eq!(
            safe_next(Some("/console/rollouts/3")),
            "/console/rollouts/3"
        );
        assert_eq!(safe_next(Some("https://evil.example/")), "/console");
        assert_eq!(safe_next(Some("/console//evil.example")), "/console");
        assert_eq!(safe_next(None), "/console");
    }
}
