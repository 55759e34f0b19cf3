//! Key files: signing keys, the root-signed keyring and the root's public half under
//! `<data>/keys/`; the root key itself apart from them.
//!
//! The root key signs keyrings only, so the running server never needs it: `keys init`
//! writes it where the operator says (`--root-key-out`, outside the data directory) to be
//! moved offline, and `keys rotate` asks for it (`--root-key`). `root.pub` pins the root's
//! public half for loading and for checking the key `rotate` is given. A first `drover
//! serve` on an empty data directory writes it to `<data>/root-key-MOVE-OFFLINE.key`, and
//! data directories from before this keep `keys/root.key`: both work, and `drover doctor`
//! flags them as an online root key.
//!
//! Security rules: secret files are created 0600 (temp file, fsync, rename); a secret file
//! readable by group or others is refused, never silently used; secrets never reach a log
//! line or `Debug` output (`SecretKey` redacts itself).

use std::fs;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use drover_protocol::trust::{KeyEntry, KeyId, Keyring, Role, SecretKey, SignedBlob, TrustStore};
use rand::RngCore as _;

/// The root key's file name in `<data>/keys/` before it was kept offline (still read).
pub const ROOT_FILE: &str = "root.key";
/// The root's public half (hex), in `<data>/keys/`: its presence marks a complete init.
pub const ROOT_PUBLIC_FILE: &str = "root.pub";
/// Where a first `drover serve` writes the root key it creates, in `<data>/`, for the
/// operator to move offline.
pub const ROOT_PENDING_FILE: &str = "root-key-MOVE-OFFLINE.key";
pub const KEYRING_FILE: &str = "keyring.bin";
const DAY_MS: u64 = 86_400_000;
/// Keyring validity when not told otherwise: devices refuse an expired keyring, so the
/// operator must re-sign (`keys rotate`) at least this often.
pub const DEFAULT_KEYRING_VALID_DAYS: u64 = 365;
/// How long a rotated-out key's signatures stay valid, so in-flight commands still land.
pub const DEFAULT_GRACE_DAYS: u64 = 7;
/// Longest keyring validity `keys init`/`keys rotate` accept (about ten years): beyond it
/// the expiry date stops being a date an operator can act on.
pub const MAX_KEYRING_VALID_DAYS: u64 = 3650;
/// Longest grace period `keys rotate` accepts for the retiring keys.
pub const MAX_GRACE_DAYS: u64 = 365;
/// Tolerated device clock skew for a new key's `not_before_ms`.
const SKEW_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keys already exist in {0}; use `drover keys rotate` to add a signing key")]
    AlreadyInitialized(PathBuf),
    #[error("no keys in {0}; run `drover keys init --data-dir <dir>` first")]
    NotInitialized(PathBuf),
    #[error("{0} already exists; choose another --root-key-out (a root key is never overwritten)")]
    RootKeyExists(PathBuf),
    #[error(
        "the root key is not in {0} (kept offline); pass --root-key PATH (the file `drover keys init` wrote)"
    )]
    RootKeyOffline(PathBuf),
    #[error("{path} is not this fleet's root key: it is {got}, the keyring's root is {want}")]
    WrongRootKey {
        path: PathBuf,
        got: KeyId,
        want: KeyId,
    },
    #[error("{path} does not hold a root public key (64 hex characters)")]
    BadPublicKey { path: PathBuf },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not 64 hex characters")]
    BadKeyFile { path: PathBuf },
    #[error("keyring {path} does not verify against the root key: {reason}")]
    BadKeyring { path: PathBuf, reason: String },
    #[error("keyring {0} has no active signing key; run `drover keys rotate`")]
    NoActiveKey(PathBuf),
    #[error("{flag} {days} is out of range: it must be within {min}..={max} days")]
    DaysOutOfRange {
        flag: &'static str,
        days: u64,
        min: u64,
        max: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loaded key material for a running server.
#[derive(Debug)]
pub struct Keys {
    pub root_public: [u8; 32],
    pub keyring: Keyring,
    pub keyring_blob: SignedBlob,
    /// The newest active signing key (signs manifests and commands).
    pub signing: SecretKey,
}

fn key_path(dir: &Path, id: KeyId) -> PathBuf {
    dir.join(format!("signing-{id}.key"))
}

impl From<drover_host::fs::FsError> for KeyError {
    fn from(e: drover_host::fs::FsError) -> Self {
        match e {
            drover_host::fs::FsError::Io { path, source } => KeyError::Io { path, source },
            drover_host::fs::FsError::InsecurePermissions { path, mode } => {
                KeyError::InsecurePermissions { path, mode }
            }
        }
    }
}

/// Writes a file with mode 0600 atomically and durably ([`drover_host::fs::write_private`]).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    Ok(drover_host::fs::write_private(path, bytes)?)
}

/// Reads a private file, refusing it when group or others may read it.
pub fn read_private(path: &Path) -> Result<Vec<u8>, KeyError> {
    Ok(drover_host::fs::read_private(path)?)
}

fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    let bytes = read_private(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let seed = drover_protocol::topics::parse_hex32(text.trim()).ok_or(KeyError::BadKeyFile {
        path: path.to_owned(),
    })?;
    Ok(SecretKey::from_seed(seed))
}

fn write_secret(path: &Path, k: &SecretKey) -> Result<(), KeyError> {
    let mut s = drover_protocol::topics::hex32(&k.seed());
    s.push('\n');
    write_private(path, s.as_bytes())
}

fn new_secret() -> SecretKey {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    SecretKey::from_seed(seed)
}

fn write_keyring(dir: &Path, blob: &SignedBlob) -> Result<(), KeyError> {
    let bytes = postcard::to_allocvec(blob).map_err(|e| KeyError::BadKeyring {
        path: dir.join(KEYRING_FILE),
        reason: e.to_string(),
    })?;
    write_private(&dir.join(KEYRING_FILE), &bytes)
}

fn read_keyring(dir: &Path, root: &[u8; 32]) -> Result<(SignedBlob, Keyring), KeyError> {
    let path = dir.join(KEYRING_FILE);
    let bytes = read_private(&path)?;
    let bad = |reason: String| KeyError::BadKeyring {
        path: path.clone(),
        reason,
    };
    let blob: SignedBlob = postcard::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
    // Checked at time 0: this is our own keyring, we want its signature checked, not its
    // expiry (an expired keyring must still be readable so it can be rotated).
    let ring = TrustStore::new(*root)
        .and_then(|t| t.check_keyring(&blob, 0))
        .map_err(|e| bad(e.to_string()))?;
    Ok((blob, ring))
}

/// Refuses a day count outside `min..=max` before any file is touched: 0 valid days makes a
/// keyring devices refuse at once, and a huge count overflows every date it reaches.
fn check_days(flag: &'static str, days: u64, min: u64, max: u64) -> Result<(), KeyError> {
    if (min..=max).contains(&days) {
        Ok(())
    } else {
        Err(KeyError::DaysOutOfRange {
            flag,
            days,
            min,
            max,
        })
    }
}

/// Whether `<data>/keys` holds a complete init (`root.pub`, or an old online `root.key`).
pub fn initialized(data_dir: &Path) -> bool {
    let dir = data_dir.join("keys");
    dir.join(ROOT_PUBLIC_FILE).exists() || dir.join(ROOT_FILE).exists()
}

/// The root key files a data directory holds online, if any: an old `keys/root.key`, or
/// the one a first `drover serve` wrote and nobody moved yet.
pub fn online_root_keys(data_dir: &Path) -> Vec<PathBuf> {
    [
        data_dir.join("keys").join(ROOT_FILE),
        data_dir.join(ROOT_PENDING_FILE),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect()
}

/// The root's public half: `root.pub`, or derived from an old online `root.key`.
fn root_public(dir: &Path) -> Result<[u8; 32], KeyError> {
    let path = dir.join(ROOT_PUBLIC_FILE);
    if path.exists() {
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        return drover_protocol::topics::parse_hex32(text.trim())
            .ok_or(KeyError::BadPublicKey { path });
    }
    let old = dir.join(ROOT_FILE);
    if old.exists() {
        return Ok(read_secret(&old)?.public());
    }
    Err(KeyError::NotInitialized(dir.to_owned()))
}

/// `drover keys init`: a root key (written to `root_out`, to be taken offline), a first
/// signing key (models + commands) and keyring v1.
pub fn init(
    data_dir: &Path,
    root_out: &Path,
    now_ms: u64,
    valid_days: u64,
) -> Result<Keys, KeyError> {
    check_days("--valid-days", valid_days, 1, MAX_KEYRING_VALID_DAYS)?;
    let dir = data_dir.join("keys");
    if initialized(data_dir) {
        return Err(KeyError::AlreadyInitialized(dir));
    }
    if root_out.exists() {
        return Err(KeyError::RootKeyExists(root_out.to_owned()));
    }
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    let root = new_secret();
    let signing = new_secret();
    let ring = Keyring {
        version: 1,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(valid_days.saturating_mul(DAY_MS)),
        keys: vec![KeyEntry {
            key_id: signing.id(),
            public: signing.public(),
            roles: vec![Role::Models, Role::Commands],
            not_before_ms: now_ms.saturating_sub(SKEW_MS),
            not_after_ms: u64::MAX,
            revoked: false,
        }],
    };
    let blob = root.sign_keyring(&ring);
    write_secret(&key_path(&dir, signing.id()), &signing)?;
    write_keyring(&dir, &blob)?;
    write_secret(root_out, &root)?;
    // The public half is written last: its presence marks a complete init.
    let public = format!("{}\n", drover_protocol::topics::hex32(&root.public()));
    write_private(&dir.join(ROOT_PUBLIC_FILE), public.as_bytes())?;
    tracing::info!(root_key = %root.id(), signing_key = %signing.id(), "keys initialized");
    Ok(Keys {
        root_public: root.public(),
        keyring: ring,
        keyring_blob: blob,
        signing,
    })
}

/// `drover keys rotate`: a new signing key, signed into the keyring by the root key read
/// from `root_key` (checked to be this fleet's); active keys retire after `grace_days`.
pub fn rotate(
    data_dir: &Path,
    root_key: &Path,
    now_ms: u64,
    grace_days: u64,
    valid_days: u64,
) -> Result<Keys, KeyError> {
    check_days("--valid-days", valid_days, 1, MAX_KEYRING_VALID_DAYS)?;
    check_days("--grace-days", grace_days, 0, MAX_GRACE_DAYS)?;
    let dir = data_dir.join("keys");
    if !initialized(data_dir) {
        return Err(KeyError::NotInitialized(dir));
    }
    let want = root_public(&dir)?;
    let root = read_secret(root_key)?;
    if root.public() != want {
        return Err(KeyError::WrongRootKey {
            path: root_key.to_owned(),
            got: root.id(),
            want: KeyId::of(&want),
        });
    }
    let (_, old) = read_keyring(&dir, &want)?;
    let signing = new_secret();
    let retire_at = now_ms.saturating_add(grace_days.saturating_mul(DAY_MS));
    let mut keys: Vec<KeyEntry> = old
        .keys
        .into_iter()
        // Keys already past their end are dropped: they can never verify again.
        .filter(|k| k.not_after_ms > now_ms)
        .map(|mut k| {
            k.not_after_ms = k.not_after_ms.min(retire_at);
            k
        })
        .collect();
    keys.push(KeyEntry {
        key_id: signing.id(),
        public: signing.public(),
        roles: vec![Role::Models, Role::Commands],
        not_before_ms: now_ms.saturating_sub(SKEW_MS),
        not_after_ms: u64::MAX,
        revoked: false,
    });
    let ring = Keyring {
        version: old.version + 1,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(valid_days.saturating_mul(DAY_MS)),
        keys,
    };
    let blob = root.sign_keyring(&ring);
    write_secret(&key_path(&dir, signing.id()), &signing)?;
    write_keyring(&dir, &blob)?;
    tracing::info!(signing_key = %signing.id(), keyring_version = ring.version, "signing key rotated");
    Ok(Keys {
        root_public: root.public(),
        keyring: ring,
        keyring_blob: blob,
        signing,
    })
}

/// Loads the keys a server needs (never the root key); the current signing key is the
/// newest active one.
pub fn load(data_dir: &Path) -> Result<Keys, KeyError> {
    let dir = data_dir.join("keys");
    if !initialized(data_dir) {
        return Err(KeyError::NotInitialized(dir));
    }
    let root_public = root_public(&dir)?;
    let (blob, ring) = read_keyring(&dir, &root_public)?;
    let current = ring
        .keys
        .iter()
        .filter(|k| !k.revoked && k.not_after_ms == u64::MAX)
        .max_by_key(|k| k.not_before_ms)
        .ok_or_else(|| KeyError::NoActiveKey(dir.join(KEYRING_FILE)))?;
    let signing = read_secret(&key_path(&dir, current.key_id))?;
    Ok(Keys {
        root_public,
        keyring: ring,
        keyring_blob: blob,
        signing,
    })
}

/// Loads the keys, creating them on a first start; the root key then goes to
/// `<data>/root-key-MOVE-OFFLINE.key`, and the operator is told to move it.
pub fn load_or_init(data_dir: &Path, now_ms: u64) -> Result<Keys, KeyError> {
    if initialized(data_dir) {
        return load(data_dir);
    }
    let root_out = data_dir.join(ROOT_PENDING_FILE);
    let keys = init(data_dir, &root_out, now_ms, DEFAULT_KEYRING_VALID_DAYS)?;
    tracing::warn!(
        path = %root_out.display(),
        "root key created: move it offline; the server does not need it, `drover keys rotate --root-key PATH` does"
    );
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_0600_files_keeps_the_root_key_apart_and_refuses_a_second_init() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let root_out = dir.path().join("root.key");
        let k = init(&data, &root_out, 1_000_000_000, 30).unwrap();
        for e in fs::read_dir(data.join("keys")).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(
            fs::metadata(&root_out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Nothing in the data directory is the root key: the server loads without it.
        assert!(online_root_keys(&data).is_empty());
        assert!(matches!(
            init(&data, &dir.path().join("other.key"), 1, 30),
            Err(KeyError::AlreadyInitialized(_))
        ));
        let loaded = load(&data).unwrap();
        assert_eq!(loaded.signing.id(), k.signing.id());
        assert_eq!(loaded.root_public, k.root_public);
        // A second fleet never overwrites a root key.
        assert!(matches!(
            init(&dir.path().join("data2"), &root_out, 1, 30),
            Err(KeyError::RootKeyExists(_))
        ));
    }

    #[test]
    fn rotate_needs_this_fleets_root_key() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let (root_a, root_b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        init(&a, &root_a, 1_000_000_000, 30).unwrap();
        init(&b, &root_b, 1_000_000_000, 30).unwrap();
        assert!(matches!(
            rotate(&a, &root_b, 1_000_000_001, 1, 30),
            Err(KeyError::WrongRootKey { .. })
        ));
        assert_eq!(load(&a).unwrap().keyring.version, 1);
        let k = rotate(&a, &root_a, 1_000_000_001, 1, 30).unwrap();
        assert_eq!(k.keyring.version, 2);
        assert_eq!(load(&a).unwrap().signing.id(), k.signing.id());
    }

    #[test]
    fn an_old_data_dir_with_its_root_key_online_still_loads_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let keys_dir = data.join("keys");
        // The layout before the root key went offline: keys/root.key, no root.pub.
        init(&data, &keys_dir.join(ROOT_FILE), 1_000_000_000, 30).unwrap();
        fs::remove_file(keys_dir.join(ROOT_PUBLIC_FILE)).unwrap();
        assert!(initialized(&data));
        assert_eq!(online_root_keys(&data), vec![keys_dir.join(ROOT_FILE)]);
        load(&data).unwrap();
        let k = rotate(&data, &keys_dir.join(ROOT_FILE), 1_000_000_001, 1, 30).unwrap();
        assert_eq!(load(&data).unwrap().keyring.version, k.keyring.version);
    }

    #[test]
    fn a_first_serve_start_writes_the_root_key_to_be_moved_offline() {
        let dir = tempfile::tempdir().unwrap();
        load_or_init(dir.path(), 1_000_000_000).unwrap();
        let pending = dir.path().join(ROOT_PENDING_FILE);
        assert_eq!(online_root_keys(dir.path()), vec![pending.clone()]);
        // Moved offline (gone from here): the server still starts.
        fs::remove_file(&pending).unwrap();
        load_or_init(dir.path(), 1_000_000_001).unwrap();
        assert!(online_root_keys(dir.path()).is_empty());
    }

    #[test]
    fn world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = init(dir.path(), &dir.path().join("r.key"), 1_000_000_000, 30).unwrap();
        let signing = key_path(&dir.path().join("keys"), k.signing.id());
        fs::set_permissions(&signing, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KeyError::InsecurePermissions { mode: 0o644, .. })
        ));
    }
}
