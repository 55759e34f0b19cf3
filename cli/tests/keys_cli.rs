//! `drover keys init|rotate|show` through the binary: 0600 files, refusal of a
//! group/world-readable key, a rotated keyring with a higher version signed by the root.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use drover_control_plane::api::KeyringView;
use drover_protocol::trust::TrustStore;

fn drover(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn show(dir: &Path) -> KeyringView {
    let out = drover(dir, &["keys", "show", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn keys_init_rotate_show_keep_secrets_private_and_sign_rotations_with_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let out = drover(dir.path(), &["keys", "init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in std::fs::read_dir(dir.path().join("keys")).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", e.path().display());
    }
    let root_seed = std::fs::read_to_string(dir.path().join("keys/root.key")).unwrap();
    let v1 = show(dir.path());
    assert_eq!(v1.version, 1);
    assert_eq!(v1.keys.len(), 1);
    assert!(v1.keys[0].current);
    assert_eq!(v1.keys[0].roles, vec!["Models", "Commands"]);
    // Nothing printed is a secret.
    let text = drover(dir.path(), &["keys", "show"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(!all.contains(root_seed.trim()));

    // A second init is refused with advice; exit code non-zero.
    let again = drover(dir.path(), &["keys", "init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("keys rotate"));

    let out = drover(dir.path(), &["keys", "rotate", "--grace-days", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = show(dir.path());
    assert_eq!(v2.version, 2);
    assert_eq!(v2.root_key_id, v1.root_key_id);
    assert_eq!(v2.keys.len(), 2);
    let old = v2
        .keys
        .iter()
        .find(|k| k.key_id == v1.keys[0].key_id)
        .unwrap();
    assert!(!old.current);
    let retire = old.not_after_ms.expect("old key retires");
    assert!(retire > v2.issued_at_ms && retire <= v2.issued_at_ms + 2 * 86_400_000);
    assert!(v2
        .keys
        .iter()
        .any(|k| k.current && k.not_after_ms.is_none()));

    // The rotated keyring verifies against the root and supersedes version 1.
    let keys = drover_control_plane::keys::load(dir.path()).unwrap();
    let mut trust = TrustStore::new(keys.root_public).unwrap();
    let ring = trust
        .accept_keyring(&keys.keyring_blob, v2.issued_at_ms + 1)
        .unwrap();
    assert_eq!(ring.version, 2);
    assert_eq!(keys.signing.id().to_string(), v2.keys[1].key_id);

    // A key file readable by others is refused, with the fix in the message.
    let root = dir.path().join("keys/root.key");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = drover(dir.path(), &["keys", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(matches!(
        drover_control_plane::keys::load(dir.path()),
        Err(drover_control_plane::keys::KeyError::InsecurePermissions { mode: 0o644, .. })
    ));
}

/// Runs `drover keys ...` and returns (success, stderr), asserting it did not panic.
fn keys_cmd(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = drover(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked") && out.status.code() != Some(101),
        "{args:?} panicked: {stderr}"
    );
    (out.status.success(), stderr)
}

#[test]
fn validity_and_grace_days_outside_their_range_are_refused_without_panicking() {
    let max = drover_control_plane::keys::MAX_KEYRING_VALID_DAYS;
    let over = (max + 1).to_string();
    let u64_max = u64::MAX.to_string();
    for bad in ["0", over.as_str(), u64_max.as_str()] {
        let dir = tempfile::tempdir().unwrap();
        let (ok, err) = keys_cmd(dir.path(), &["keys", "init", "--valid-days", bad]);
        assert!(!ok, "--valid-days {bad} accepted");
        assert!(
            err.contains(&format!("--valid-days {bad} is out of range"))
                && err.contains(&format!("1..={max}")),
            "{err}"
        );
        assert!(
            !dir.path().join("keys").exists(),
            "--valid-days {bad} wrote keys"
        );
    }
    for good in ["1", max.to_string().as_str()] {
        let dir = tempfile::tempdir().unwrap();
        let (ok, err) = keys_cmd(dir.path(), &["keys", "init", "--valid-days", good]);
        assert!(ok, "--valid-days {good}: {err}");
    }

    let dir = tempfile::tempdir().unwrap();
    assert!(keys_cmd(dir.path(), &["keys", "init"]).0);
    let grace_max = drover_control_plane::keys::MAX_GRACE_DAYS.to_string();
    for (flag, bad) in [
        ("--valid-days", "0"),
        ("--valid-days", u64_max.as_str()),
        ("--grace-days", u64_max.as_str()),
    ] {
        let (ok, err) = keys_cmd(dir.path(), &["keys", "rotate", flag, bad]);
        assert!(!ok, "rotate {flag} {bad} accepted");
        assert!(
            err.contains(&format!("{flag} {bad} is out of range")),
            "{err}"
        );
    }
    assert_eq!(
        show(dir.path()).version,
        1,
        "a refused rotation changed the keyring"
    );
    let (ok, err) = keys_cmd(
        dir.path(),
        &[
            "keys",
            "rotate",
            "--valid-days",
            &max.to_string(),
            "--grace-days",
            &grace_max,
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(show(dir.path()).version, 2);
}
