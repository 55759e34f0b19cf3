//! The web console (issue 21): HTML pages served under `/console` on the API's listener,
//! rendered on the server (no Node toolchain, assets embedded with `include_str!`), behind
//! a session login with the API's tokens and roles ([`session`]).
//!
//! Pages: the fleet overview and device pages ([`fleet`]), rollouts with their live
//! detail and pause/resume/abort ([`rollouts`]), drift ([`drift`]), models with their
//! lineage and training jobs ([`registry`]). Charts are SVG drawn here ([`svg`]).
//! `console.js` only polls the page it is on (ETag, `If-None-Match`) to swap its
//! `data-live` regions, and asks before a form that changes something is sent.
//!
//! Actions go through the services the API calls (the rollout driver's `operate`), need
//! the role `access::required_role` gives the matching API route, the session's CSRF
//! token and a confirmation, and are appended to the same audit log.

mod drift;
mod fleet;
mod html;
mod registry;
mod rollouts;
mod session;
mod svg;

pub use session::{Sessions, COOKIE};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest as _, Sha256};

use self::html::esc;
use self::session::User;
use super::{ApiError, AppState};

/// The console's state: the API's, and the open sessions.
#[derive(Clone)]
pub struct ConsoleState {
    pub api: AppState,
    pub sessions: Sessions,
}

pub fn router(api: AppState) -> Router {
    let st = ConsoleState {
        api,
        sessions: Sessions::default(),
    };
    Router::new()
        .route(
            "/console/login",
            get(session::login_form).post(session::login),
        )
        .route("/console/logout", post(session::logout))
        .route("/console", get(fleet::overview))
        .route("/console/devices/{id}", get(fleet::device))
        .route(
            "/console/rollouts",
            get(rollouts::list).post(rollouts::start),
        )
        .route("/console/rollouts/{id}", get(rollouts::detail))
        .route("/console/rollouts/{id}/{op}", post(rollouts::operate))
        .route("/console/drift", get(drift::show))
        .route("/console/models", get(registry::models))
        .route("/console/models/{name}/{version}", get(registry::model))
        .route("/console/jobs", get(registry::jobs))
        .route("/console/jobs/{id}", get(registry::job))
        .route("/console/assets/console.js", get(script))
        .route("/console/assets/console.css", get(style))
        .with_state(st)
}

const JS: &str = include_str!("assets/console.js");
const CSS: &str = include_str!("assets/console.css");

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Which section a page belongs to (the navigation marks it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Rollouts,
    Drift,
    Models,
    Jobs,
}

/// The whole document around a page's `<main>`.
fn shell(title: &str, nav: Option<(Nav, &User)>, main: &str) -> String {
    let mut head = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Drover</title><link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
         <script src=\"/console/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>",
        esc(title)
    );
    if let Some((active, user)) = nav {
        let items = [
            (Nav::Fleet, "/console", "Fleet"),
            (Nav::Rollouts, "/console/rollouts", "Rollouts"),
            (Nav::Drift, "/console/drift", "Drift"),
            (Nav::Models, "/console/models", "Models"),
            (Nav::Jobs, "/console/jobs", "Training jobs"),
        ];
        head.push_str("<header><nav aria-label=\"Sections\"><ul>");
        for (n, href, label) in items {
            let cur = if n == active {
                " aria-current=\"page\""
            } else {
                ""
            };
            head.push_str(&format!("<li><a href=\"{href}\"{cur}>{label}</a></li>"));
        }
        head.push_str(&format!(
            "</ul></nav><form class=\"who\" method=\"post\" action=\"/console/logout\">\
             <span>Signed in as <strong>{}</strong> (<span data-role>{}</span>)</span>{}\
             <button type=\"submit\">Sign out</button></form></header>",
            esc(&user.identity.name),
            user.identity.role,
            user.csrf_field()
        ));
    }
    head.push_str(main);
    head.push_str("</body></html>");
    head
}

/// A page for a signed-in user: `<main>` with its heading.
fn page(nav: Nav, user: &User, title: &str, body: &str) -> String {
    let main = format!(
        "<main id=\"main\" tabindex=\"-1\"><h1>{}</h1>{body}</main>",
        esc(title)
    );
    shell(title, Some((nav, user)), &main)
}

/// An HTML response with the console's headers: no caching without revalidation, an
/// ETag over the body (the live poll's `If-None-Match` gets 304 when nothing changed),
/// and a strict content security policy (no inline script or style).
fn html_response(status: StatusCode, body: String) -> Response {
    let etag = format!(
        "\"{}\"",
        &drover_protocol::topics::hex32(&Sha256::digest(body.as_bytes()).into())[..32]
    );
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    r
}

/// A rendered page, or 304 when the client already has it (`If-None-Match`).
fn respond(headers: &HeaderMap, body: String) -> Response {
    let r = html_response(StatusCode::OK, body);
    let theirs = headers.get(header::IF_NONE_MATCH);
    if theirs.is_some() && theirs == r.headers().get(header::ETAG) {
        let mut nm = StatusCode::NOT_MODIFIED.into_response();
        if let Some(e) = r.headers().get(header::ETAG) {
            nm.headers_mut().insert(header::ETAG, e.clone());
        }
        return nm;
    }
    r
}

/// A refusal or failure, shown as a page.
#[derive(Debug)]
pub struct Fail(pub StatusCode, pub String);

impl Fail {
    fn csrf() -> Self {
        Fail(
            StatusCode::FORBIDDEN,
            "The form's CSRF token is missing or wrong: reload the page and try again.".into(),
        )
    }
}

impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Self {
        Fail(e.0, e.1)
    }
}

impl From<crate::store::StoreError> for Fail {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let main = format!(
            "<main id=\"main\"><h1>{} {}</h1><p role=\"alert\">{}</p>\
             <p><a href=\"/console\">Back to the fleet</a></p></main>",
            self.0.as_u16(),
            esc(self.0.canonical_reason().unwrap_or("")),
            esc(&self.1)
        );
        html_response(self.0, shell("Error", None, &main))
    }
}

/// Runs store work on the blocking pool.
async fn read<T: Send + 'static>(
    st: &ConsoleState,
    f: impl FnOnce(&mut crate::store::Store) -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    st.api.store.run(f).await.map_err(Fail::from)?
}
