//! One negative test per trust rule, each asserting the exact refusal.

mod common;

use common::*;
use drover_protocol::messages::Action;
use drover_protocol::trust::*;
use drover_protocol::{DeviceId, TrustError};

fn store() -> TrustStore {
    let mut s = TrustStore::new(root().public()).unwrap();
    s.accept_keyring(&root().sign_keyring(&keyring(3)), NOW)
        .unwrap();
    s
}

#[test]
fn valid_manifest_and_command_are_accepted() {
    let s = store();
    let m = s
        .verify_manifest(&signer().sign_manifest(&manifest()), NOW)
        .unwrap();
    assert_eq!(m, manifest());
    let c = s
        .verify_command(&signer().sign_command(&command(42)), &dev(), 41, NOW)
        .unwrap();
    assert_eq!(c.seq, 42);
    let Action::Deploy { manifest: blob, .. } = c.action else {
        panic!("expected deploy")
    };
    assert_eq!(s.verify_manifest(&blob, NOW).unwrap(), manifest());
}

#[test]
fn tampered_payload_is_refused() {
    let mut blob = signer().sign_manifest(&manifest());
    let last = blob.payload.len() - 1;
    blob.payload[last] ^= 1;
    assert_eq!(
        store().verify_manifest(&blob, NOW),
        Err(TrustError::BadSignature)
    );
}

#[test]
fn wrong_key_is_refused() {
    // Signed by a key that claims the trusted key's id.
    let rogue = SecretKey::from_seed([66u8; 32]);
    let mut blob = rogue.sign_manifest(&manifest());
    blob.key_id = signer().id();
    assert_eq!(
        store().verify_manifest(&blob, NOW),
        Err(TrustError::BadSignature)
    );
}

#[test]
fn unknown_key_id_is_refused() {
    let rogue = SecretKey::from_seed([66u8; 32]);
    let blob = rogue.sign_manifest(&manifest());
    assert_eq!(
        store().verify_manifest(&blob, NOW),
        Err(TrustError::UnknownKey { key_id: rogue.id() })
    );
}

#[test]
fn expired_keyring_is_refused() {
    let mut s = TrustStore::new(root().public()).unwrap();
    let k = keyring(3);
    let blob = root().sign_keyring(&k);
    assert_eq!(
        s.accept_keyring(&blob, k.expires_at_ms),
        Err(TrustError::KeyringExpired {
            expires_at_ms: k.expires_at_ms,
            now_ms: k.expires_at_ms
        })
    );
    // An accepted keyring that has since expired stops vouching for anything.
    let s = store();
    assert!(matches!(
        s.verify_manifest(&signer().sign_manifest(&manifest()), k.expires_at_ms + 1),
        Err(TrustError::KeyringExpired { .. })
    ));
}

#[test]
fn keyring_not_signed_by_root_is_refused() {
    let mut s = TrustStore::new(root().public()).unwrap();
    // A signing key (trusted for models) may not issue keyrings.
    let blob = signer().sign_keyring(&keyring(4));
    assert_eq!(
        s.accept_keyring(&blob, NOW),
        Err(TrustError::NotSignedByRoot {
            key_id: signer().id()
        })
    );
    // Root's id with another key's signature.
    let mut forged = SecretKey::from_seed([66u8; 32]).sign_keyring(&keyring(4));
    forged.key_id = root().id();
    assert_eq!(
        s.accept_keyring(&forged, NOW),
        Err(TrustError::BadSignature)
    );
}

#[test]
fn a_refused_keyring_still_names_the_version_it_claims() {
    let blob = root().sign_keyring(&keyring(2));
    assert_eq!(claimed_keyring_version(&blob), Some(2));
    assert_eq!(
        claimed_keyring_version(&signer().sign_manifest(&manifest())),
        None
    );
}

#[test]
fn older_keyring_is_refused_as_rollback() {
    let mut s = store();
    assert_eq!(
        s.accept_keyring(&root().sign_keyring(&keyring(2)), NOW),
        Err(TrustError::KeyringRollback {
            offered: 2,
            current: 3
        })
    );
    // The same keyring again is fine; a different one with the same version is not.
    assert!(s
        .accept_keyring(&root().sign_keyring(&keyring(3)), NOW)
        .is_ok());
    let mut other = keyring(3);
    other.expires_at_ms += 1;
    assert_eq!(
        s.accept_keyring(&root().sign_keyring(&other), NOW),
        Err(TrustError::KeyringRollback {
            offered: 3,
            current: 3
        })
    );
}

#[test]
fn rotated_out_key_is_refused_after_its_grace_period() {
    let mut s = store();
    let new_key = SecretKey::from_seed([3u8; 32]);
    let mut k = keyring(4);
    let retire_at = NOW + 60_000;
    k.keys[0].not_after_ms = retire_at;
    k.keys.push(entry(
        &new_key,
        vec![Role::Models, Role::Commands],
        NOW + 86_000_000,
    ));
    s.accept_keyring(&root().sign_keyring(&k), NOW).unwrap();
    let old_blob = signer().sign_manifest(&manifest());
    assert!(s.verify_manifest(&old_blob, NOW).is_ok(), "still in grace");
    assert_eq!(
        s.verify_manifest(&old_blob, retire_at),
        Err(TrustError::KeyRetired {
            key_id: signer().id(),
            not_after_ms: retire_at
        })
    );
    assert!(s
        .verify_manifest(&new_key.sign_manifest(&manifest()), retire_at)
        .is_ok());
    // Dropped from the keyring entirely: unknown.
    let mut k5 = k.clone();
    k5.version = 5;
    k5.keys.remove(0);
    s.accept_keyring(&root().sign_keyring(&k5), NOW).unwrap();
    assert_eq!(
        s.verify_manifest(&old_blob, NOW),
        Err(TrustError::UnknownKey {
            key_id: signer().id()
        })
    );
}

#[test]
fn revoked_not_yet_valid_and_unauthorised_keys_are_refused() {
    let blob = signer().sign_manifest(&manifest());
    for (edit, want) in [
        (
            (|e: &mut KeyEntry| e.revoked = true) as fn(&mut KeyEntry),
            TrustError::KeyRevoked {
                key_id: signer().id(),
            },
        ),
        (
            |e: &mut KeyEntry| e.not_before_ms = NOW + 5,
            TrustError::KeyNotYetValid {
                key_id: signer().id(),
                not_before_ms: NOW + 5,
            },
        ),
        (
            |e: &mut KeyEntry| e.roles = vec![Role::Commands],
            TrustError::KeyNotAuthorized {
                key_id: signer().id(),
                role: Role::Models,
            },
        ),
    ] {
        let mut k = keyring(3);
        edit(&mut k.keys[0]);
        let mut s = TrustStore::new(root().public()).unwrap();
        s.accept_keyring(&root().sign_keyring(&k), NOW).unwrap();
        assert_eq!(s.verify_manifest(&blob, NOW), Err(want));
    }
}

#[test]
fn expired_command_is_refused() {
    let c = command(42);
    let blob = signer().sign_command(&c);
    assert_eq!(
        store().verify_command(&blob, &dev(), 41, c.expires_at_ms),
        Err(TrustError::CommandExpired {
            expires_at_ms: c.expires_at_ms,
            now_ms: c.expires_at_ms
        })
    );
}

#[test]
fn replayed_command_is_refused() {
    let blob = signer().sign_command(&command(42));
    assert_eq!(
        store().verify_command(&blob, &dev(), 42, NOW),
        Err(TrustError::Replayed { seq: 42, last: 42 })
    );
    assert_eq!(
        store().verify_command(&blob, &dev(), 50, NOW),
        Err(TrustError::Replayed { seq: 42, last: 50 })
    );
}

#[test]
fn command_for_another_device_is_refused() {
    let blob = signer().sign_command(&command(42));
    let other = DeviceId::new("plant-b.gw-09").unwrap();
    assert_eq!(
        store().verify_command(&blob, &other, 0, NOW),
        Err(TrustError::WrongTarget {
            target: dev().to_string()
        })
    );
}

#[test]
fn signature_for_one_kind_is_refused_as_another() {
    // Relabel a signed manifest as a command: the kind is inside the signed bytes.
    let mut blob = signer().sign_manifest(&manifest());
    assert_eq!(
        store().verify_command(&blob, &dev(), 0, NOW),
        Err(TrustError::WrongKind {
            expected: SigKind::Command,
            got: SigKind::Manifest
        })
    );
    blob.kind = SigKind::Command;
    assert_eq!(
        store().verify_command(&blob, &dev(), 0, NOW),
        Err(TrustError::BadSignature)
    );
}

#[test]
fn chunk_and_file_hash_mismatches_are_refused() {
    let m = manifest();
    let file = file_bytes();
    assert_eq!(verify_chunk(&m, 0, &file[..1024]), Ok(()));
    let mut bad = file[1024..2048].to_vec();
    bad[7] ^= 1;
    assert_eq!(
        verify_chunk(&m, 1, &bad),
        Err(TrustError::ChunkHash { index: 1 })
    );
    assert_eq!(
        verify_chunk(&m, 2, &file[2048..2100]),
        Err(TrustError::ChunkLength {
            index: 2,
            expected: 952,
            got: 52
        })
    );
    assert_eq!(
        verify_chunk(&m, 3, &[]),
        Err(TrustError::ChunkIndex { index: 3, count: 3 })
    );
    assert_eq!(verify_file(&m, file.len() as u64, &sha256(&file)), Ok(()));
    assert_eq!(
        verify_file(&m, 10, &sha256(&file)),
        Err(TrustError::FileSize {
            expected: 3000,
            got: 10
        })
    );
    assert!(matches!(
        verify_file(&m, 3000, &sha256(b"other")),
        Err(TrustError::FileHash { .. })
    ));
}

#[test]
fn signed_but_structurally_invalid_manifest_is_refused() {
    let mut m = manifest();
    m.chunk_hashes.pop();
    assert!(matches!(
        store().verify_manifest(&signer().sign_manifest(&m), NOW),
        Err(TrustError::BadManifest(_))
    ));
    let blob = signer().sign(SigKind::Manifest, vec![0xff; 3]);
    assert!(matches!(
        store().verify_manifest(&blob, NOW),
        Err(TrustError::Malformed(_))
    ));
}

#[test]
fn nothing_verifies_before_a_keyring_is_accepted() {
    let s = TrustStore::new(root().public()).unwrap();
    assert_eq!(
        s.verify_manifest(&signer().sign_manifest(&manifest()), NOW),
        Err(TrustError::NoKeyring)
    );
}

#[test]
fn secrets_are_not_printed_by_debug() {
    let k = signer();
    let dbg = format!("{k:?} {:?}", device_key());
    assert!(!dbg.contains(&hex::encode(k.seed())));
    assert!(dbg.contains("redacted"));
}
