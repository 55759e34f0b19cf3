//! `drover doctor` through the binary: clean setup → exit 0; each unsafe setting is
//! reported by path and turns the exit code non-zero.

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
    drover_control_plane::keys::init(&data, now, 365).unwrap();
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
