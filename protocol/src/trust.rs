//! The trust chain: root key → keyring of signing keys → signed manifests and commands;
//! and per-device MACs for device → control plane frames.
//!
//! Every check here runs on the exact signed bytes *before* they are decoded, and every
//! refusal is a distinct [`TrustError`] variant so callers (and tests) can tell why.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::manifest::{Manifest, ManifestError};
use crate::messages::Command;
use crate::topics::{hex32, DeviceId};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Short key id: the first 8 bytes of the SHA-256 of the public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(public: &[u8; 32]) -> Self {
        let d = sha256(public);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a signature is for. It is part of the signed bytes, so a signature made for one
/// kind can never be replayed as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigKind {
    Keyring,
    Manifest,
    Command,
}

/// What a signing key in the keyring may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Models,
    Commands,
}

/// Signed bytes, exactly as signed: `{kind, key id, payload, signature}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBlob {
    pub kind: SigKind,
    pub key_id: KeyId,
    pub payload: Vec<u8>,
    /// 64-byte ed25519 signature over `DOMAIN || kind || payload`.
    pub signature: Vec<u8>,
}

const DOMAIN: &[u8] = b"drover-sig-v1\0";

fn signed_message(kind: SigKind, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 1 + payload.len());
    m.extend_from_slice(DOMAIN);
    m.push(kind as u8);
    m.extend_from_slice(payload);
    m
}

impl SignedBlob {
    /// Digest identifying this signed object (of the payload: the signature is not
    /// malleable in meaning, but its bytes are not what we name things by).
    pub fn digest(&self) -> Digest {
        sha256(&self.payload)
    }
}

/// One signing key as listed in the keyring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub key_id: KeyId,
    pub public: [u8; 32],
    pub roles: Vec<Role>,
    pub not_before_ms: u64,
    /// After this instant the key is retired: its signatures are refused.
    pub not_after_ms: u64,
    pub revoked: bool,
}

/// The set of signing keys the root key currently vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyring {
    /// Strictly increasing; a device never goes back to an older keyring.
    pub version: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub keys: Vec<KeyEntry>,
}

/// Every reason the trust chain refuses something.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("signature does not verify (tampered payload or wrong key)")]
    BadSignature,
    #[error("signature is {len} bytes, expected 64")]
    SignatureLength { len: usize },
    #[error("signed object is a {got:?}, expected a {expected:?}")]
    WrongKind { expected: SigKind, got: SigKind },
    #[error("no keyring has been accepted yet")]
    NoKeyring,
    #[error("keyring is not signed by the pinned root key (signed by {key_id})")]
    NotSignedByRoot { key_id: KeyId },
    #[error("keyring expired at {expires_at_ms} ms (now {now_ms} ms)")]
    KeyringExpired { expires_at_ms: u64, now_ms: u64 },
    #[error("keyring version {offered} is not newer than the accepted version {current}")]
    KeyringRollback { offered: u64, current: u64 },
    #[error("signing key {key_id} is not in the keyring")]
    UnknownKey { key_id: KeyId },
    #[error("signing key {key_id} was rotated out at {not_after_ms} ms")]
    KeyRetired { key_id: KeyId, not_after_ms: u64 },
    #[error("signing key {key_id} is not valid before {not_before_ms} ms")]
    KeyNotYetValid { key_id: KeyId, not_before_ms: u64 },
    #[error("signing key {key_id} is revoked")]
    KeyRevoked { key_id: KeyId },
    #[error("signing key {key_id} may not sign {role:?}")]
    KeyNotAuthorized { key_id: KeyId, role: Role },
    #[error("public key bytes are not a valid ed25519 key")]
    BadPublicKey,
    #[error("signed payload does not decode: {0}")]
    Malformed(String),
    #[error("manifest is invalid: {0}")]
    BadManifest(#[from] ManifestError),
    #[error("command expired at {expires_at_ms} ms (now {now_ms} ms)")]
    CommandExpired { expires_at_ms: u64, now_ms: u64 },
    #[error("command sequence {seq} is not above the last accepted {last} (replay or rollback)")]
    Replayed { seq: u64, last: u64 },
    #[error("command is for device {target}, not this one")]
    WrongTarget { target: String },
    #[error("chunk {index} is outside the manifest's {count} chunks")]
    ChunkIndex { index: u32, count: u32 },
    #[error("chunk {index} is {got} bytes, the manifest says {expected}")]
    ChunkLength {
        index: u32,
        expected: usize,
        got: usize,
    },
    #[error("chunk {index} hash does not match the manifest")]
    ChunkHash { index: u32 },
    #[error("model file is {got} bytes, the manifest says {expected}")]
    FileSize { expected: u64, got: u64 },
    #[error("model file hash {got} does not match the manifest's {expected}")]
    FileHash { expected: String, got: String },
}

/// A private ed25519 key with its id. Its `Debug` never prints the secret.
pub struct SecretKey {
    key: SigningKey,
    id: KeyId,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

impl SecretKey {
    /// Builds a key from 32 secret bytes (the caller draws them from the OS RNG).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let id = KeyId::of(&key.verifying_key().to_bytes());
        Self { key, id }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn sign(&self, kind: SigKind, payload: Vec<u8>) -> SignedBlob {
        let sig = self.key.sign(&signed_message(kind, &payload));
        SignedBlob {
            kind,
            key_id: self.id,
            payload,
            signature: sig.to_bytes().to_vec(),
        }
    }

    pub fn sign_keyring(&self, k: &Keyring) -> SignedBlob {
        self.sign(SigKind::Keyring, encode_payload(k))
    }

    pub fn sign_manifest(&self, m: &Manifest) -> SignedBlob {
        self.sign(SigKind::Manifest, encode_payload(m))
    }

    pub fn sign_command(&self, c: &Command) -> SignedBlob {
        self.sign(SigKind::Command, encode_payload(c))
    }
}

fn encode_payload<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail: postcard only errors on
    // unsupported serde features, which these types do not use.
    postcard::to_allocvec(v).unwrap_or_default()
}

fn decode_payload<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, TrustError> {
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(TrustError::Malformed(format!(
            "{} trailing bytes after the signed object",
            rest.len()
        ))),
        Err(e) => Err(TrustError::Malformed(e.to_string())),
    }
}

fn verify_raw(public: &[u8; 32], blob: &SignedBlob) -> Result<(), TrustError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| TrustError::BadPublicKey)?;
    let sig: [u8; 64] =
        blob.signature
            .as_slice()
            .try_into()
            .map_err(|_| TrustError::SignatureLength {
                len: blob.signature.len(),
            })?;
    key.verify_strict(
        &signed_message(blob.kind, &blob.payload),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| TrustError::BadSignature)
}

fn expect_kind(blob: &SignedBlob, expected: SigKind) -> Result<(), TrustError> {
    if blob.kind != expected {
        return Err(TrustError::WrongKind {
            expected,
            got: blob.kind,
        });
    }
    Ok(())
}

/// The pinned root key and the keyring accepted under it. Pure: the clock is passed in.
#[derive(Clone, Debug)]
pub struct TrustStore {
    root: [u8; 32],
    root_id: KeyId,
    keyring: Option<Keyring>,
}

impl TrustStore {
    pub fn new(root_public: [u8; 32]) -> Result<Self, TrustError> {
        VerifyingKey::from_bytes(&root_public).map_err(|_| TrustError::BadPublicKey)?;
        Ok(Self {
            root: root_public,
            root_id: KeyId::of(&root_public),
            keyring: None,
        })
    }

    pub fn root_id(&self) -> KeyId {
        self.root_id
    }

    pub fn keyring(&self) -> Option<&Keyring> {
        self.keyring.as_ref()
    }

    /// Checks a keyring without accepting it.
    pub fn check_keyring(&self, blob: &SignedBlob, now_ms: u64) -> Result<Keyring, TrustError> {
        expect_kind(blob, SigKind::Keyring)?;
        if blob.key_id != self.root_id {
            return Err(TrustError::NotSignedByRoot {
                key_id: blob.key_id,
            });
        }
        verify_raw(&self.root, blob)?;
        let k: Keyring = decode_payload(&blob.payload)?;
        if now_ms >= k.expires_at_ms {
            return Err(TrustError::KeyringExpired {
                expires_at_ms: k.expires_at_ms,
                now_ms,
            });
        }
        if let Some(cur) = &self.keyring {
            // Re-offering the accepted keyring is harmless; anything older is a rollback.
            if k.version < cur.version || (k.version == cur.version && &k != cur) {
                return Err(TrustError::KeyringRollback {
                    offered: k.version,
                    current: cur.version,
                });
            }
        }
        Ok(k)
    }

    /// Verifies and installs a keyring signed by the root key.
    pub fn accept_keyring(
        &mut self,
        blob: &SignedBlob,
        now_ms: u64,
    ) -> Result<&Keyring, TrustError> {
        let k = self.check_keyring(blob, now_ms)?;
        Ok(self.keyring.insert(k))
    }

    fn check_signer(&self, blob: &SignedBlob, role: Role, now_ms: u64) -> Result<(), TrustError> {
        let ring = self.keyring.as_ref().ok_or(TrustError::NoKeyring)?;
        if now_ms >= ring.expires_at_ms {
            return Err(TrustError::KeyringExpired {
                expires_at_ms: ring.expires_at_ms,
                now_ms,
            });
        }
        let key_id = blob.key_id;
        let entry = ring
            .keys
            .iter()
            .find(|k| k.key_id == key_id)
            .ok_or(TrustError::UnknownKey { key_id })?;
        if entry.revoked {
            return Err(TrustError::KeyRevoked { key_id });
        }
        if now_ms < entry.not_before_ms {
            return Err(TrustError::KeyNotYetValid {
                key_id,
                not_before_ms: entry.not_before_ms,
            });
        }
        if now_ms >= entry.not_after_ms {
            return Err(TrustError::KeyRetired {
                key_id,
                not_after_ms: entry.not_after_ms,
            });
        }
        if !entry.roles.contains(&role) {
            return Err(TrustError::KeyNotAuthorized { key_id, role });
        }
        verify_raw(&entry.public, blob)
    }

    /// Verifies a signed manifest, then decodes and validates it.
    pub fn verify_manifest(&self, blob: &SignedBlob, now_ms: u64) -> Result<Manifest, TrustError> {
        expect_kind(blob, SigKind::Manifest)?;
        self.check_signer(blob, Role::Models, now_ms)?;
        let m = Manifest::decode(&blob.payload).map_err(TrustError::Malformed)?;
        m.validate()?;
        Ok(m)
    }

    /// Verifies a signed command for device `me`, whose last accepted sequence is
    /// `last_seq`. The caller persists `seq` before acting on the command.
    pub fn verify_command(
        &self,
        blob: &SignedBlob,
        me: &DeviceId,
        last_seq: u64,
        now_ms: u64,
    ) -> Result<Command, TrustError> {
        expect_kind(blob, SigKind::Command)?;
        self.check_signer(blob, Role::Commands, now_ms)?;
        let c: Command = decode_payload(&blob.payload)?;
        if &c.target != me {
            return Err(TrustError::WrongTarget {
                target: c.target.to_string(),
            });
        }
        if now_ms >= c.expires_at_ms {
            return Err(TrustError::CommandExpired {
                expires_at_ms: c.expires_at_ms,
                now_ms,
            });
        }
        if c.seq <= last_seq {
            return Err(TrustError::Replayed {
                seq: c.seq,
                last: last_seq,
            });
        }
        Ok(c)
    }
}

/// The version a keyring blob *claims*, read without verifying it: only for reporting a
/// refused keyring (`Uplink::KeyringRefused`), never for deciding anything.
pub fn claimed_keyring_version(blob: &SignedBlob) -> Option<u64> {
    if blob.kind != SigKind::Keyring {
        return None;
    }
    decode_payload::<Keyring>(&blob.payload)
        .ok()
        .map(|k| k.version)
}

/// Checks one downloaded chunk against the verified manifest.
pub fn verify_chunk(m: &Manifest, index: u32, data: &[u8]) -> Result<(), TrustError> {
    let expected = m.chunk_len(index).ok_or(TrustError::ChunkIndex {
        index,
        count: m.chunk_count(),
    })?;
    if data.len() != expected {
        return Err(TrustError::ChunkLength {
            index,
            expected,
            got: data.len(),
        });
    }
    let want = m
        .chunk_hashes
        .get(index as usize)
        .ok_or(TrustError::ChunkIndex {
            index,
            count: m.chunk_count(),
        })?;
    if &sha256(data) != want {
        return Err(TrustError::ChunkHash { index });
    }
    Ok(())
}

/// Checks a whole assembled file's size and SHA-256 against the manifest.
pub fn verify_file(m: &Manifest, size: u64, sha256: &Digest) -> Result<(), TrustError> {
    if size != m.size {
        return Err(TrustError::FileSize {
            expected: m.size,
            got: size,
        });
    }
    if sha256 != &m.sha256 {
        return Err(TrustError::FileHash {
            expected: hex32(&m.sha256),
            got: hex32(sha256),
        });
    }
    Ok(())
}

/// A device's secret for authenticating its uplink frames (HMAC-SHA256).
///
/// Why a MAC and not a signature per message: ingest must verify ≥ 50,000 messages/s on
/// two cores. HMAC-SHA256 of a 200-byte frame costs ~1 µs; ed25519 verification ~50 µs.
/// The control plane holds every device key (it enrolled them), so symmetric keys give
/// the same guarantee: only that device (or the control plane) can produce its frames.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; 32]);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

pub const MAC_LEN: usize = 32;

impl DeviceKey {
    pub fn mac(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(bytes);
        m.finalize().into_bytes().into()
    }

    /// The password a device presents to the MQTT broker (username = device id). Derived,
    /// so the broker never needs the key that authenticates frames.
    pub fn mqtt_password(&self) -> String {
        crate::topics::hex32(&self.mac(b"drover-mqtt-password-v1"))
    }

    /// Constant-time MAC check.
    pub fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(&self.0) else {
            return false;
        };
        m.update(bytes);
        m.verify_slice(tag).is_ok()
    }
}
