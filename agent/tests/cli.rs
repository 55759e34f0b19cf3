//! The `drover-agent` binary's command line: default config, config errors.

use std::process::Command;

use drover_agent::config::AgentConfig;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_drover-agent"))
}

#[test]
fn print_default_config_prints_the_hardened_defaults_as_toml() {
    let out = bin().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let cfg = AgentConfig::from_toml(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(cfg, AgentConfig::default());
    assert!(cfg.api_addr.starts_with("127.0.0.1:"));
}

#[test]
fn invalid_config_reports_every_error_at_once_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "version = 2\ndevice_id = \"bad/id\"\ndevice_key = \"00\"\nroot_public_key = \"\"\n\
         broker_url = \"http://x\"\ndata_dir = \"/tmp/x\"\napi_addr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["--config"])
        .arg(&path)
        .arg("check-config")
        .env("DROVER_AGENT_TELEMETRY_INTERVAL_MS", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in [
        "version = 2 is not supported",
        "device_id:",
        "device_key:",
        "root_public_key:",
        "broker_url:",
        "telemetry.interval_ms:",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
    // The secret never reaches the output.
    assert!(!err.contains("device_key = "));
}

/// An enrolled device's config (mutual TLS to the broker, files under `dir`), written
/// with `mode`.
fn enrolled_config(dir: &std::path::Path, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let root = drover_protocol::SecretKey::from_seed([7; 32]).public();
    let text = format!(
        "version = 1\ndevice_id = \"gw-01\"\ndevice_key = \"{}\"\nroot_public_key = \"{}\"\n\
         broker_url = \"mqtts://broker.example:8883\"\ndata_dir = \"{d}/data\"\n\
         api_addr = \"127.0.0.1:0\"\n[tls]\nca_file = \"{d}/ca.pem\"\n\
         client_cert_file = \"{d}/gw-01.cert.pem\"\nclient_key_file = \"{d}/gw-01.key.pem\"\n",
        "11".repeat(32),
        drover_protocol::topics::hex32(&root),
        d = dir.display()
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn check(config: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = bin()
        .arg("--config")
        .arg(config)
        .args(extra)
        .arg("check-config")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap();
    (out.status.success(), text)
}

#[test]
fn check_config_reports_absent_tls_files_a_plaintext_override_and_a_readable_config_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = enrolled_config(d, 0o644);
    let (ok, out) = check(&path, &["--broker-url", "mqtt://broker.example:1883"]);
    assert!(!ok, "{out}");
    for needle in [
        format!("tls.ca_file: {}/ca.pem does not exist", d.display()),
        format!("tls.client_cert_file: {}/gw-01.cert.pem does not exist", d.display()),
        format!("tls.client_key_file: {}/gw-01.key.pem does not exist", d.display()),
        "broker_url: \"mqtt://broker.example:1883\" is plaintext MQTT while a [tls] section is configured".into(),
        "set allow_plaintext = true".into(),
        format!(
            "config file {} holds the device key and is readable by group or others (mode 644); run `chmod 600 {}`",
            path.display(),
            path.display()
        ),
    ] {
        assert!(out.contains(&needle), "{needle:?} missing from {out}");
    }
    // The secret never reaches the output.
    assert!(!out.contains(&"11".repeat(32)), "{out}");

    // The files in place, but the client key readable by others.
    for f in ["ca.pem", "gw-01.cert.pem", "gw-01.key.pem"] {
        std::fs::write(d.join(f), "pem").unwrap();
    }
    let (ok, out) = check(&path, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("tls.client_key_file:") && out.contains("readable by group or others"),
        "{out}"
    );
    assert!(
        !out.contains("does not exist") && !out.contains("plaintext"),
        "{out}"
    );

    // Everything private: clean, and plaintext only when allowed explicitly.
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["gw-01.key.pem", "agent.toml"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (ok, out) = check(&path, &[]);
    assert!(ok, "{out}");
    let (ok, out) = check(&path, &["--broker-url", "mqtt://broker.example:1883"]);
    assert!(!ok && out.contains("plaintext MQTT"), "{out}");
    let (ok, out) = check(
        &path,
        &[
            "--broker-url",
            "mqtt://broker.example:1883",
            "--set",
            "allow_plaintext=true",
        ],
    );
    assert!(ok, "{out}");
}

#[test]
fn a_readable_config_without_the_device_key_is_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = enrolled_config(dir.path(), 0o644);
    for f in ["ca.pem", "gw-01.cert.pem", "gw-01.key.pem"] {
        drover_host::fs::write_private(&dir.path().join(f), b"pem").unwrap();
    }
    // The key comes from the environment instead of the file.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&"11".repeat(32), "");
    std::fs::write(&path, text).unwrap();
    let out = bin()
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .env("DROVER_AGENT_DEVICE_KEY", "22".repeat(32))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn logs_carry_no_colour_off_a_terminal_and_are_json_when_asked() {
    // A RUST_LOG the agent cannot read makes it log one warning right after logging starts.
    let run = |extra: &[&str]| {
        let out = bin()
            .args(extra)
            .arg("print-default-config")
            .env("RUST_LOG", "a=notalevel")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let text = run(&[]);
    assert!(text.contains("RUST_LOG not understood"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a piped log: {text:?}"
    );
    let json = run(&["--log-format", "json"]);
    let line = json.lines().find(|l| !l.trim().is_empty()).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "WARN", "{line}");
    assert!(v["fields"]["message"]
        .as_str()
        .unwrap()
        .contains("RUST_LOG not understood"));
}
