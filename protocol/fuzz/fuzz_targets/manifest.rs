//! Fuzzes manifest decoding behind a valid signature: arbitrary bytes are signed by a key
//! the pinned keyring trusts, so every byte reaches the postcard decoder and the
//! structural checks (`TrustStore::verify_manifest`). Nothing may panic, and a manifest
//! that passes must answer chunk questions for every index without panicking.
#![no_main]

use std::sync::OnceLock;

use drover_protocol::trust::{KeyEntry, Keyring, Role, SecretKey, SignedBlob, TrustStore};
use libfuzzer_sys::fuzz_target;

const NOW_MS: u64 = 1_800_000_000_000;

fn rig() -> &'static (TrustStore, SecretKey) {
    static RIG: OnceLock<(TrustStore, SecretKey)> = OnceLock::new();
    RIG.get_or_init(|| {
        let root = SecretKey::from_seed([1; 32]);
        let signer = SecretKey::from_seed([2; 32]);
        let ring = Keyring {
            version: 1,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            keys: vec![KeyEntry {
                key_id: signer.id(),
                public: signer.public(),
                roles: vec![Role::Models, Role::Commands],
                not_before_ms: 0,
                not_after_ms: u64::MAX,
                revoked: false,
            }],
        };
        let mut store = TrustStore::new(root.public()).unwrap();
        store
            .accept_keyring(&root.sign_keyring(&ring), NOW_MS)
            .unwrap();
        (store, signer)
    })
}

fuzz_target!(|data: &[u8]| {
    let (store, signer) = rig();
    let blob: SignedBlob = signer.sign(drover_protocol::trust::SigKind::Manifest, data.to_vec());
    if let Ok(m) = store.verify_manifest(&blob, NOW_MS) {
        let n = m.chunk_count();
        for i in 0..n.min(4096).saturating_add(2) {
            let len = m.chunk_len(i);
            let _ = drover_protocol::trust::verify_chunk(
                &m,
                i,
                &vec![0u8; len.unwrap_or(0).min(1 << 16)],
            );
        }
        let _ = drover_protocol::trust::verify_file(&m, m.size, &m.sha256);
    }
});
