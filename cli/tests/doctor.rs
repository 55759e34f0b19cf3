//! `drover doctor` through the binary: clean setup → exit 0; each unsafe setting is
//! reported by path, with the command that fixes it, and turns the exit code non-zero.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use drover_control_plane::pki::FleetCa;

fn doctor(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("doctor")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn doctor_passes_a_clean_setup_and_reports_each_unsafe_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let now = drover_host::clock::now_ms();
    drover_control_plane::keys::init(&data, &tmp.path().join("root.key"), now, 365).unwrap();
    let ca = FleetCa::load_or_init(&data, now).unwrap();
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(ok, "{out}");
    assert!(out.contains("no unsafe settings"), "{out}");

    // A world-readable CA key.
    let ca_key = data.join("keys").join("ca.key");
    chmod(&ca_key, 0o644);
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(!ok, "{out}");
    assert!(out.contains("ca.key") && out.contains("chmod 600"), "{out}");
    chmod(&ca_key, 0o600);

    // A CRL whose nextUpdate is near: brokers would soon refuse every client.
    ca.write_crl(&[], now - 340 * 86_400_000).unwrap();
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(!ok && out.contains("CRL nextUpdate"), "{out}");
    ca.write_crl(&[], now).unwrap();
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(ok, "{out}");

    // An integration certificate about to expire; revoked (retired), it is no concern.
    ca.issue_integration("grafana", now - 340 * 86_400_000)
        .unwrap();
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(
        !ok && out.contains("integration certificate grafana") && out.contains("expires soon"),
        "{out}"
    );
    ca.retire_integration_cert("grafana").unwrap();
    let (ok, out) = doctor(&["--data-dir", data_s]);
    assert!(ok, "{out}");

    // A plaintext embedded broker.
    let conf = tmp.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!("version = 1\ndata_dir = {data_s:?}\nallow_plaintext = true\n"),
    )
    .unwrap();
    let (ok, out) = doctor(&["--config", conf.to_str().unwrap()]);
    assert!(!ok && out.contains("allow_plaintext"), "{out}");

    // An agent config readable by others, on plaintext, with a certificate about to expire.
    let cert = ca.issue_client("gw-1", now, 5).unwrap();
    let cert_path = tmp.path().join("gw-1.cert.pem");
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    let agent = tmp.path().join("gw-1.toml");
    std::fs::write(
        &agent,
        format!(
            "version = 1\ndevice_id = \"gw-1\"\ndevice_key = \"{}\"\nroot_public_key = \"{}\"\n\
             broker_url = \"mqtt://127.0.0.1:1883\"\ndata_dir = \"/tmp/x\"\napi_addr = \"127.0.0.1:0\"\n\
             [tls]\nca_file = \"/nonexistent\"\nclient_cert_file = {:?}\n",
            "11".repeat(32),
            "22".repeat(32),
            cert_path.to_str().unwrap()
        ),
    )
    .unwrap();
    chmod(&agent, 0o644);
    let (ok, out) = doctor(&[
        "--data-dir",
        data_s,
        "--agent-config",
        agent.to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("holds the device key"), "{out}");
    assert!(out.contains("plaintext mqtt://"), "{out}");
    assert!(out.contains("expires soon"), "{out}");
}

/// `drover doctor --output json ARGS`: (exit code, the findings as (path, problem, fix)).
fn doctor_json(args: &[&str]) -> (i32, Vec<(String, String, String)>) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("doctor")
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings: Vec<(String, String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or("").to_owned();
            (s("path"), s("problem"), s("fix"))
        })
        .collect();
    assert_eq!(v["unsafe"].as_u64(), Some(findings.len() as u64));
    (out.status.code().unwrap(), findings)
}

#[test]
fn doctor_flags_an_online_root_key_a_readable_database_and_a_plaintext_api_beyond_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let now = drover_host::clock::now_ms();
    // As a first `drover serve` leaves it: the root key written into the data dir.
    drover_control_plane::keys::load_or_init(&data, now).unwrap();
    drover_control_plane::store::Store::open(&data.join("drover.db")).unwrap();
    let pending = data.join(drover_control_plane::keys::ROOT_PENDING_FILE);
    let (code, found) = doctor_json(&["--data-dir", data_s]);
    assert_ne!(code, 0);
    assert_eq!(found.len(), 1, "{found:?}");
    let (path, problem, fix) = &found[0];
    assert_eq!(path, pending.to_str().unwrap());
    assert!(problem.contains("root key is online"), "{problem}");
    assert!(
        fix.starts_with(&format!("mv {}", pending.display())),
        "{fix}"
    );
    // Moved offline: clean.
    std::fs::rename(&pending, tmp.path().join("offline.key")).unwrap();
    assert_eq!(doctor_json(&["--data-dir", data_s]), (0, vec![]));
    // An old data dir's keys/root.key is online too.
    let old = data
        .join("keys")
        .join(drover_control_plane::keys::ROOT_FILE);
    std::fs::copy(tmp.path().join("offline.key"), &old).unwrap();
    let (code, found) = doctor_json(&["--data-dir", data_s]);
    assert!(
        code != 0 && found.len() == 1 && found[0].0 == old.to_str().unwrap(),
        "{found:?}"
    );
    std::fs::remove_file(&old).unwrap();

    // A database others can read (every device key is in it), with the chmod that fixes it.
    let db = data.join("drover.db");
    chmod(&db, 0o644);
    let (code, found) = doctor_json(&["--data-dir", data_s]);
    assert_ne!(code, 0);
    assert!(
        found
            .iter()
            .any(|(p, problem, fix)| p == db.to_str().unwrap()
                && problem.contains("database")
                && *fix == format!("chmod 600 {}", db.display())),
        "{found:?}"
    );
    chmod(&db, 0o600);
    assert_eq!(doctor_json(&["--data-dir", data_s]).0, 0);

    // A plaintext API beyond loopback: in the config, and as the running server wrote it.
    let conf = tmp.path().join("serve.toml");
    let write_conf = |listen: &str, tls: &str| {
        std::fs::write(
            &conf,
            format!(
                "version = 1\ndata_dir = {data_s:?}\nhttp_listen = {listen:?}\napi_tls = {tls:?}\n"
            ),
        )
        .unwrap();
    };
    write_conf("0.0.0.0:8470", "off");
    let (code, found) = doctor_json(&["--config", conf.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        found.iter().any(
            |(_, problem, fix)| problem.contains("plaintext beyond loopback")
                && fix.contains("api_tls = \"auto\"")
        ),
        "{found:?}"
    );
    // The default beyond loopback is TLS, and plaintext on loopback is not flagged.
    for (listen, tls) in [("0.0.0.0:8470", "auto"), ("127.0.0.1:8470", "off")] {
        write_conf(listen, tls);
        let conf = conf.to_str().unwrap();
        assert_eq!(doctor_json(&["--config", conf]).0, 0, "{listen} {tls}");
    }
    let url = data.join("api-url");
    std::fs::write(&url, "http://10.1.2.3:8470\n").unwrap();
    let (code, found) = doctor_json(&["--data-dir", data_s]);
    assert_ne!(code, 0);
    assert!(
        found
            .iter()
            .any(|(p, problem, fix)| p == url.to_str().unwrap()
                && problem.contains("http://10.1.2.3:8470")
                && fix.contains("without --api-plaintext")),
        "{found:?}"
    );
    // `--api-plaintext` on 0.0.0.0: the URL keeps the unspecified address, and is flagged.
    std::fs::write(&url, "http://0.0.0.0:8470\n").unwrap();
    assert_ne!(doctor_json(&["--data-dir", data_s]).0, 0);
    std::fs::write(&url, "http://127.0.0.1:8470\n").unwrap();
    assert_eq!(doctor_json(&["--data-dir", data_s]), (0, vec![]));
}
