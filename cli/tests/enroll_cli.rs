//! `drover device enroll` refuses oversized labels itself, with the server's limits,
//! before it sends anything.

use std::process::Command;

use drover_control_plane::fleet::MAX_LABEL_VALUE_BYTES;

#[test]
fn enroll_refuses_an_oversized_label_before_contacting_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let label = format!("site={}", "x".repeat(MAX_LABEL_VALUE_BYTES + 1));
    // Nothing listens on this URL: a refusal naming the limit proves nothing was sent.
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["device", "enroll", "gw-1", "--label", &label, "--out"])
        .arg(dir.path().join("gw-1.toml"))
        .args(["--server", "http://127.0.0.1:9", "--token", "t"])
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("1-{MAX_LABEL_VALUE_BYTES} bytes")),
        "{err}"
    );
    assert!(!dir.path().join("gw-1.toml").exists());
}
