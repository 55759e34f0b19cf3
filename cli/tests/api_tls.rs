//! The HTTP API over TLS (issue 19): `drover serve` serves HTTPS with a certificate from the
//! fleet CA (or the operator's), writes an https:// api-url, and the CLI trusts the fleet
//! CA found in the data directory or given with `--ca`; an untrusted certificate is
//! refused with exit code 7 and the flag to use.

#[path = "../../control-plane/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use drover_control_plane::pki::FleetCa;
use drover_control_plane::serve::ServeHandle;

/// `drover device list --output json` with these flags; (exit code, stdout, stderr).
async fn list(args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    c.args(["device", "list", "--output", "json"])
        .args(args)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_CA")
        .env_remove("DROVER_DATA_DIR");
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn start(
    data: &Path,
    edit: impl FnOnce(&mut drover_control_plane::config::ServeConfig),
) -> ServeHandle {
    let mut config = common::config(data);
    config.api_tls = "on".into();
    edit(&mut config);
    drover_control_plane::serve::run(config.validate().unwrap(), std::future::pending())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trusts_the_fleet_ca_and_refuses_any_other_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let server = start(&data, |_| {}).await;
    let url = server.api_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let written = std::fs::read_to_string(data.join("api-url")).unwrap();
    assert_eq!(written.trim(), url);
    let token = server.api_token().to_owned();
    let data_s = data.to_str().unwrap();

    // The CLI on the server's host: URL, token and fleet CA from the data directory.
    let (code, out, err) = list(&["--data-dir", data_s]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[]");

    // Elsewhere, with the fleet CA given: trusted.
    let ca = data.join("keys").join("ca.pem");
    let empty = tmp.path().join("elsewhere");
    let remote = [
        "--server",
        &url,
        "--token",
        &token,
        "--data-dir",
        empty.to_str().unwrap(),
    ];
    let (code, _, err) = list(&[&remote[..], &["--ca", ca.to_str().unwrap()]].concat()).await;
    assert_eq!(code, 0, "{err}");

    // No CA, or another fleet's: refused, exit 7, saying which flag to use.
    let other = FleetCa::load_or_init(&tmp.path().join("other"), common::now_ms()).unwrap();
    let other_ca = tmp.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.ca_pem()).unwrap();
    for extra in [vec![], vec!["--ca", other_ca.to_str().unwrap()]] {
        let (code, out, err) = list(&[&remote[..], &extra[..]].concat()).await;
        assert_eq!(code, 7, "{extra:?}: {err}");
        assert!(out.is_empty());
        let e: serde_json::Value = serde_json::from_str(&err).unwrap();
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains("not trusted") && msg.contains("--ca"), "{msg}");
    }

    // No plaintext on a TLS listener.
    let plain = url.replacen("https://", "http://", 1);
    let (code, _, err) = list(&[
        "--server",
        &plain,
        "--token",
        &token,
        "--data-dir",
        empty.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 5, "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_is_served_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    // The operator's own CA and certificate, not the fleet CA.
    let theirs = FleetCa::load_or_init(&tmp.path().join("corp"), common::now_ms()).unwrap();
    let issued = theirs
        .issue_server(&["127.0.0.1".to_owned()], common::now_ms())
        .unwrap();
    let (cert, key, ca) = (
        tmp.path().join("api.pem"),
        tmp.path().join("api.key"),
        tmp.path().join("corp-ca.pem"),
    );
    drover_host::fs::write_private(&cert, issued.cert_pem.as_bytes()).unwrap();
    drover_host::fs::write_private(&key, issued.key_pem.as_bytes()).unwrap();
    std::fs::write(&ca, theirs.ca_pem()).unwrap();
    let data = tmp.path().join("server");
    let server = start(&data, |c| {
        c.api_cert_file = cert.display().to_string();
        c.api_key_file = key.display().to_string();
    })
    .await;
    let data_s = data.to_str().unwrap();
    // The fleet CA did not issue it: the data directory's CA is not enough...
    let (code, _, err) = list(&["--data-dir", data_s]).await;
    assert_eq!(code, 7, "{err}");
    // ...the operator's CA is.
    let (code, _, err) = list(&["--data-dir", data_s, "--ca", ca.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    server.shutdown().await;
}
