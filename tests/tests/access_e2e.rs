//! Issue 19's access acceptance, through the `drover` binary and raw HTTP: per-user
//! tokens with roles (a viewer cannot start a rollout: 403), a revoked token is refused,
//! the audit shows the authenticated user (not the name a caller claims), tokens are
//! stored hashed and survive a restart.

use std::process::{Command, Output};

use drover_control_plane::config::ServeConfig;
use drover_control_plane::serve;
use drover_tests::fleet::Api;
use drover_tests::workspace_bin;
use serde_json::{json, Value};

fn drover(api: &Api, args: &[&str]) -> Output {
    Command::new(workspace_bin("drover").unwrap())
        .args(args)
        .args(api.cli_args())
        .output()
        .unwrap()
}

fn create(admin: &Api, name: &str, role: &str) -> String {
    let out = drover(
        admin,
        &["token", "create", name, "--role", role, "--output", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["role"], role);
    v["token"].as_str().unwrap().to_owned()
}

/// Status and error text of a raw call with `token`.
async fn call(base: &str, token: &str, method: reqwest::Method, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .json(&json!({"set": {"tier": "gold"}}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_revocation_and_an_audit_of_authenticated_users() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServeConfig {
        data_dir: tmp.path().join("server"),
        http_listen: "127.0.0.1:0".into(),
        mqtt_listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let server = serve::run(config.clone().validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr());
    let admin = Api::new(&base, server.api_token());
    admin
        .post(
            "/v1/devices",
            &json!({"id": "gw-1", "labels": {"site": "a"}}),
        )
        .await
        .unwrap();
    let alice = create(&admin, "alice", "viewer");
    let bob = create(&admin, "bob", "deployer");

    // A viewer reads but cannot start a rollout, through the CLI (exit 6) or raw HTTP.
    let as_alice = Api::new(&base, &alice);
    assert_eq!(as_alice.get("/v1/devices").await.unwrap()[0]["id"], "gw-1");
    let (status, text) = call(&base, &alice, reqwest::Method::POST, "/v1/rollouts").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("needs deployer"), "{text}");
    let out = drover(
        &as_alice,
        &[
            "rollout",
            "start",
            "--model",
            "m@1.0.0",
            "--selector",
            "all",
            "--yes",
        ],
    );
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("role viewer"));

    // A deployer labels a device; the device's event names bob whatever --by says. It
    // cannot enroll (admin) or read tokens.
    let as_bob = Api::new(&base, &bob);
    let out = drover(
        &as_bob,
        &["device", "label", "gw-1", "tier=gold", "--by", "mallory"],
    );
    assert!(out.status.success(), "{out:?}");
    let events = admin.get("/v1/devices/gw-1/events").await.unwrap();
    assert_eq!(events[0]["by"], "bob", "{events:#}");
    let (status, _) = call(&base, &bob, reqwest::Method::POST, "/v1/devices").await;
    assert_eq!(status, 403);
    let (status, _) = call(&base, &bob, reqwest::Method::GET, "/v1/tokens").await;
    assert_eq!(status, 403);

    // Revoked: refused from the next request on.
    let out = drover(&admin, &["token", "revoke", "alice"]);
    assert!(out.status.success(), "{out:?}");
    let (status, text) = call(&base, &alice, reqwest::Method::GET, "/v1/devices").await;
    assert_eq!(status, 401, "{text}");

    // The audit log: who, with what role, what, and how it ended.
    let out = drover(&admin, &["audit", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let audit: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let has = |actor: &str, path: &str, status: u64| {
        audit
            .iter()
            .any(|e| e["actor"] == actor && e["path"] == path && e["status"] == status)
    };
    assert!(has("bob", "/v1/devices/gw-1/labels", 200), "{audit:#?}");
    assert!(has("alice", "/v1/rollouts", 403), "{audit:#?}");
    assert!(has("bob", "/v1/devices", 403), "{audit:#?}");
    assert!(
        has("local-admin", "/v1/tokens/alice/revoke", 204),
        "{audit:#?}"
    );
    assert!(!audit.iter().any(|e| e["actor"] == "mallory"));

    // Stored hashed: neither secret is anywhere in the database files.
    server.shutdown().await;
    for entry in std::fs::read_dir(tmp.path().join("server")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for secret in [&alice, &bob] {
                let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
                assert!(!found, "a token in clear in {}", path.display());
            }
        }
    }

    // After a restart bob's token works and alice's stays revoked.
    let server = serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap();
    let base = format!("http://{}", server.http_addr());
    let (status, _) = call(&base, &bob, reqwest::Method::GET, "/v1/devices").await;
    assert_eq!(status, 200);
    let (status, _) = call(&base, &alice, reqwest::Method::GET, "/v1/devices").await;
    assert_eq!(status, 401);
    server.shutdown().await;
}
