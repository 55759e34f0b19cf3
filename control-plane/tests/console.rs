//! The web console over HTTP against a real `serve::run`: login and sessions, roles and
//! CSRF on actions, escaping of what devices and operators wrote, pagination.

mod common;

use common::Api;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;

struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Browser {
    fn new(base: &str) -> Self {
        Browser {
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            base: base.to_owned(),
            cookie: None,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = &self.cookie {
            r = r.header(COOKIE, c);
        }
        r.send().await.unwrap()
    }

    async fn text(&self, path: &str) -> String {
        let r = self.get(path).await;
        assert_eq!(r.status().as_u16(), 200, "GET {path}");
        r.text().await.unwrap()
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut r = self.http.post(format!("{}{path}", self.base)).form(form);
        if let Some(c) = &self.cookie {
            r = r.header(COOKIE, c);
        }
        r.send().await.unwrap()
    }

    /// Signs in; returns the Set-Cookie header as sent.
    async fn login(&mut self, token: &str) -> String {
        let r = self
            .post("/console/login", &[("token", token), ("next", "/console")])
            .await;
        assert_eq!(r.status().as_u16(), 303, "sign-in accepted");
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        self.cookie = Some(set.split(';').next().unwrap().to_owned());
        set
    }

    async fn csrf(&self, path: &str) -> String {
        let page = self.text(path).await;
        let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
        page[at..at + 64].to_owned()
    }
}

async fn token(api: &Api, name: &str, role: &str) -> String {
    let (status, body) = api
        .post(
            "/v1/tokens",
            &serde_json::json!({ "name": name, "role": role }),
        )
        .await;
    assert_eq!(status, 201);
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn console_needs_a_session_and_actions_need_the_role_and_the_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let h = common::start(dir.path()).await;
    let api = Api::new(&h);
    let viewer = token(&api, "vera", "viewer").await;
    let deployer = token(&api, "dave", "deployer").await;
    let mut b = Browser::new(&api.base);

    // No session: every page sends to the login form, naming where to come back.
    let r = b.get("/console/rollouts").await;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers()[LOCATION].to_str().unwrap(),
        "/console/login?next=%2Fconsole%2Frollouts"
    );
    let r = b.post("/console/rollouts/1/pause", &[("csrf", "x")]).await;
    assert_eq!(
        r.status().as_u16(),
        303,
        "a post without a session is not served"
    );
    let r = b.post("/console/login", &[("token", "drover_wrong")]).await;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get(SET_COOKIE).is_none());

    // A viewer: a session cookie that is not the token, no action buttons, refused posts.
    let set = b.login(&viewer).await;
    assert!(set.starts_with("drover_console="), "{set}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    assert!(!set.contains("Secure"), "plaintext listener: no Secure");
    assert!(!set.contains(&viewer), "the cookie never holds the token");
    let value = set
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("drover_console=");
    assert!(
        value.len() == 64 && value.bytes().all(|c| c.is_ascii_hexdigit()),
        "{value}"
    );
    let page = b.text("/console/rollouts").await;
    assert!(page.contains("vera") && page.contains("viewer"));
    assert!(
        !page.contains("Start rollout"),
        "a viewer sees no start form"
    );
    let csrf = b.csrf("/console/rollouts").await;
    let r = b
        .post(
            "/console/rollouts/1/pause",
            &[("csrf", &csrf), ("confirmed", "yes")],
        )
        .await;
    assert_eq!(r.status().as_u16(), 403, "a viewer may not pause");
    let r = b
        .post(
            "/console/rollouts",
            &[("csrf", &csrf), ("confirmed", "yes"), ("plan", "x")],
        )
        .await;
    assert_eq!(r.status().as_u16(), 403, "a viewer may not start");

    // A deployer: the role passes, but not without this session's CSRF token.
    let mut d = Browser::new(&api.base);
    d.login(&deployer).await;
    assert!(d.text("/console/rollouts").await.contains("Start rollout"));
    let r = d
        .post("/console/rollouts/1/pause", &[("confirmed", "yes")])
        .await;
    assert_eq!(r.status().as_u16(), 403, "CSRF token missing");
    assert!(r.text().await.unwrap().contains("CSRF"));
    let r = d
        .post(
            "/console/rollouts/1/pause",
            &[("csrf", &csrf), ("confirmed", "yes")],
        )
        .await;
    assert_eq!(r.status().as_u16(), 403, "another session's CSRF token");
    let mine = d.csrf("/console/rollouts").await;
    let r = d
        .post(
            "/console/rollouts/1/pause",
            &[("csrf", &mine), ("confirmed", "yes")],
        )
        .await;
    assert_eq!(
        r.status().as_u16(),
        404,
        "checks passed; there is no rollout 1"
    );
    let r = d
        .post("/console/rollouts/1/pause", &[("csrf", &mine)])
        .await;
    assert_eq!(r.status().as_u16(), 200, "unconfirmed: a confirmation page");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("name=\"confirmed\" value=\"yes\""));

    // Every console post with an identity is in the audit log, refusals included.
    let audit = api.get("/v1/audit?limit=50").await;
    let lines: Vec<(String, String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().to_owned(),
                a["path"].as_str().unwrap().to_owned(),
                a["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(lines.contains(&("vera".into(), "/console/login".into(), 303)));
    assert!(lines.contains(&("vera".into(), "/console/rollouts/1/pause".into(), 403)));
    assert!(lines.contains(&("dave".into(), "/console/rollouts/1/pause".into(), 404)));

    // Revoking the token ends its sessions at once; signing out ends a session.
    let (status, _) = api
        .post("/v1/tokens/vera/revoke", &serde_json::json!({}))
        .await;
    assert_eq!(status, 204);
    assert_eq!(b.get("/console").await.status().as_u16(), 303);
    let r = d.post("/console/logout", &[("csrf", &mine)]).await;
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(d.get("/console").await.status().as_u16(), 303);
    h.shutdown().await;
}

#[tokio::test]
async fn what_devices_and_operators_wrote_is_escaped_and_the_overview_pages() {
    let dir = tempfile::tempdir().unwrap();
    let h = common::start(dir.path()).await;
    let api = Api::new(&h);
    api.enroll(
        "evil-1",
        &[("note", "<script>alert(1)</script>"), ("site", "x\"><b>")],
    )
    .await;
    for k in 0..60 {
        let site = if k % 2 == 0 { "plant-a" } else { "plant-b" };
        api.enroll(&format!("gw-{k:03}"), &[("site", site)]).await;
    }
    let mut b = Browser::new(&api.base);
    b.login(&api.token).await;

    let page = b.text("/console?q=evil").await;
    assert!(
        !page.contains("<script>alert(1)"),
        "a label never becomes markup"
    );
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!page.contains("x\"><b>") && page.contains("x&quot;&gt;&lt;b&gt;"));
    let device = b.text("/console/devices/evil-1").await;
    assert!(!device.contains("<script>alert") && device.contains("&lt;script&gt;"));

    // 61 devices: 50 on the first page, 11 on the second, counts over all of them.
    let rows = |p: &str| p.matches("href=\"/console/devices/").count();
    let first = b.text("/console").await;
    assert_eq!(rows(&first), 50);
    assert!(first.contains("61 devices match; page 1 of 2."));
    assert!(first.contains("rel=\"next\"") && !first.contains("rel=\"prev\""));
    let second = b.text("/console?page=2").await;
    assert_eq!(rows(&second), 11);
    assert!(second.contains("gw-059") && !second.contains("gw-000"));
    assert!(second.contains("rel=\"prev\"") && !second.contains("rel=\"next\""));
    let a = b.text("/console?label=site%3Dplant-a").await;
    assert!(a.contains("30 devices match; page 1 of 1."));
    assert_eq!(rows(&a), 30);

    // Live polling: the same page again with its ETag is 304.
    let r = b.get("/console?page=2").await;
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let again = b
        .http
        .get(format!("{}/console?page=2", b.base))
        .header(COOKIE, b.cookie.clone().unwrap())
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_session_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.api_tls = "on".into();
    let h = drover_control_plane::serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let ca = std::fs::read(dir.path().join("keys").join("ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(Policy::none())
        .build()
        .unwrap();
    let url = h.api_url();
    assert!(url.starts_with("https://"), "{url}");
    let r = http
        .post(format!("{url}/console/login"))
        .form(&[("token", h.api_token())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(set.contains("; Secure"), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    h.shutdown().await;
}
