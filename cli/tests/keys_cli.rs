//! `drover keys init|rotate|show` through the binary: 0600 files, refusal of a
//! group/world-readable key, a rotated keyring with a higher version signed by the root,
//! the root key written apart from the data directory and asked for by `rotate`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use drover_control_plane::api::KeyringView;
use drover_protocol::trust::TrustStore;

/// `drover ARGS --data-dir DIR`, run in DIR's parent (where `keys init` writes the root
/// key by default).
fn drover(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .current_dir(dir.parent().unwrap())
        .env_remove("DROVER_ROOT_KEY")
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
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root_file = tmp.path().join("root.key");
    let root = root_file.to_str().unwrap();
    let out = drover(&data, &["keys", "init", "--root-key-out", root]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in std::fs::read_dir(data.join("keys")).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", e.path().display());
    }
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("ROOT KEY written to {root}")),
        "{said}"
    );
    assert!(said.contains("move it offline"), "{said}");
    let root_seed = std::fs::read_to_string(&root_file).unwrap();
    // The data directory holds no root key: only its public half.
    assert!(drover_control_plane::keys::online_root_keys(&data).is_empty());
    let v1 = show(&data);
    assert_eq!(v1.version, 1);
    assert_eq!(v1.keys.len(), 1);
    assert!(v1.keys[0].current);
    assert_eq!(v1.keys[0].roles, vec!["Models", "Commands"]);
    // Nothing printed is a secret.
    let text = drover(&data, &["keys", "show"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(!all.contains(root_seed.trim()));

    // A second init is refused with advice; exit code non-zero.
    let other = tmp.path().join("other.key");
    let again = drover(
        &data,
        &["keys", "init", "--root-key-out", other.to_str().unwrap()],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("keys rotate"));

    // Rotation asks for the root key: without it, the error says which flag to give.
    let out = drover(&data, &["keys", "rotate", "--grace-days", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pass --root-key PATH"), "{err}");
    let out = drover(
        &data,
        &["keys", "rotate", "--grace-days", "2", "--root-key", root],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = show(&data);
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
    let keys = drover_control_plane::keys::load(&data).unwrap();
    let mut trust = TrustStore::new(keys.root_public).unwrap();
    let ring = trust
        .accept_keyring(&keys.keyring_blob, v2.issued_at_ms + 1)
        .unwrap();
    assert_eq!(ring.version, 2);
    assert_eq!(keys.signing.id().to_string(), v2.keys[1].key_id);

    // A key file readable by others is refused, with the fix in the message.
    let signing = data.join(format!("keys/signing-{}.key", v2.keys[1].key_id));
    std::fs::set_permissions(&signing, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = drover(&data, &["keys", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(matches!(
        drover_control_plane::keys::load(&data),
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
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (ok, err) = keys_cmd(&dir, &["keys", "init", "--valid-days", bad]);
        assert!(!ok, "--valid-days {bad} accepted");
        assert!(
            err.contains(&format!("--valid-days {bad} is out of range"))
                && err.contains(&format!("1..={max}")),
            "{err}"
        );
        assert!(
            !dir.join("keys").exists() && !tmp.path().join("drover-root.key").exists(),
            "--valid-days {bad} wrote keys"
        );
    }
    for good in ["1", max.to_string().as_str()] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (ok, err) = keys_cmd(&dir, &["keys", "init", "--valid-days", good]);
        assert!(ok, "--valid-days {good}: {err}");
    }

    // The default --root-key-out: drover-root.key in the current directory.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    assert!(keys_cmd(&dir, &["keys", "init"]).0);
    let root = tmp.path().join("drover-root.key");
    assert!(root.exists());
    let root = root.to_str().unwrap();
    let grace_max = drover_control_plane::keys::MAX_GRACE_DAYS.to_string();
    for (flag, bad) in [
        ("--valid-days", "0"),
        ("--valid-days", u64_max.as_str()),
        ("--grace-days", u64_max.as_str()),
    ] {
        let (ok, err) = keys_cmd(&dir, &["keys", "rotate", "--root-key", root, flag, bad]);
        assert!(!ok, "rotate {flag} {bad} accepted");
        assert!(
            err.contains(&format!("{flag} {bad} is out of range")),
            "{err}"
        );
    }
    assert_eq!(
        show(&dir).version,
        1,
        "a refused rotation changed the keyring"
    );
    let (ok, err) = keys_cmd(
        &dir,
        &[
            "keys",
            "rotate",
            "--root-key",
            root,
            "--valid-days",
            &max.to_string(),
            "--grace-days",
            &grace_max,
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(show(&dir).version, 2);
}

#[test]
fn the_root_key_is_refused_inside_the_data_directory_and_a_foreign_one_cannot_rotate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let inside = data.join("root.key");
    let (ok, err) = keys_cmd(
        &data,
        &["keys", "init", "--root-key-out", inside.to_str().unwrap()],
    );
    assert!(!ok && err.contains("is inside the data directory"), "{err}");
    assert!(!inside.exists() && !data.join("keys").exists());

    let mine = tmp.path().join("mine.key");
    let (ok, err) = keys_cmd(
        &data,
        &["keys", "init", "--root-key-out", mine.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let other_data = tmp.path().join("other");
    let theirs = tmp.path().join("theirs.key");
    let (ok, err) = keys_cmd(
        &other_data,
        &["keys", "init", "--root-key-out", theirs.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, err) = keys_cmd(
        &data,
        &["keys", "rotate", "--root-key", theirs.to_str().unwrap()],
    );
    assert!(!ok && err.contains("is not this fleet's root key"), "{err}");
    assert_eq!(show(&data).version, 1);
    // A root key file is never overwritten by another init.
    let (ok, err) = keys_cmd(
        &tmp.path().join("third"),
        &["keys", "init", "--root-key-out", mine.to_str().unwrap()],
    );
    assert!(!ok && err.contains("already exists"), "{err}");
}
