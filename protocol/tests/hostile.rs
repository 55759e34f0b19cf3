//! Decoding arbitrary or mutated bytes never panics and never allocates past a bound.
//!
//! A capped global allocator (the `cap` crate) turns any allocation beyond the limit into
//! an allocation failure, which aborts the test binary: so this test fails loudly if a
//! hostile length prefix makes the decoder reserve memory it was not given.

mod common;

use cap::Cap;
use common::*;
use drover_protocol::envelope::*;
use proptest::prelude::*;
use std::alloc::System;

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// Decoding may use at most this much extra heap (serde caps pre-allocation at 1 MiB per sequence).
const DECODE_BUDGET: usize = 4 * 1024 * 1024;

/// The allocator's limit is one global shared by the test threads, and `Cap` keeps limit and
/// remaining bytes in two atomics: moving the limit from two threads at once can make
/// `allocated()` read a torn pair. One decode at a time keeps the accounting exact.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn decode_all(bytes: &[u8]) {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = ALLOC.allocated();
    ALLOC
        .set_limit(before.saturating_add(DECODE_BUDGET))
        .unwrap();
    let _ = open_uplink(bytes, &dev(), &device_key());
    let _ = decode_uplink_unauthenticated(bytes);
    let _ = decode_downlink_unauthenticated(bytes);
    let _ = decode_chunk(bytes);
    let _ = decode_keyring(bytes);
    ALLOC.set_limit(usize::MAX).unwrap();
}

/// A frame header of each kind followed by attacker-chosen body bytes.
fn with_header(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![b'D', b'R', 1, 0, kind];
    v.extend_from_slice(body);
    v
}

fn valid_frames() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = uplinks()
        .into_iter()
        .map(|(_, msg)| {
            seal_uplink(
                &device_key(),
                &UplinkFrame {
                    device: dev(),
                    seq: 1,
                    sent_at_ms: NOW,
                    msg,
                },
            )
        })
        .collect();
    v.extend(downlinks().into_iter().map(|(_, msg)| {
        seal_downlink(
            &device_key(),
            &DownlinkFrame {
                device: dev(),
                sent_at_ms: NOW,
                msg,
            },
        )
    }));
    v.push(encode_chunk(&chunk()));
    v.push(encode_keyring(&root().sign_keyring(&keyring(1))));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_valid_headers_never_panic(
        kind in 1u8..=4,
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        decode_all(&with_header(kind, &body));
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        which in 0usize..19,
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let frames = valid_frames();
        let mut f = frames[which % frames.len()].clone();
        for (i, b) in flips {
            let at = i.index(f.len());
            f[at] = b;
        }
        decode_all(&f);
        // Truncations too.
        let cut = f.len() / 2;
        decode_all(&f[..cut]);
    }
}

#[test]
fn huge_length_prefixes_are_refused_without_allocating_them() {
    // A postcard varint claiming 2^60 elements, in every position a length can sit.
    let huge = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
    for kind in 1u8..=4 {
        for prefix_len in 0..40 {
            let mut body = vec![1u8; prefix_len];
            body.extend_from_slice(&huge);
            body.extend_from_slice(&[0u8; 64]);
            decode_all(&with_header(kind, &body));
        }
    }
    // The unauthenticated decoders are the ones that reach postcard with these bytes.
    let mut body = vec![13u8];
    body.extend_from_slice(b"plant-a.gw-01");
    // seq 0, sent_at 0, variant Hello, then agent_version claims 2^60 bytes.
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&huge);
    body.extend_from_slice(&[0u8; 64]);
    let f = with_header(1, &body);
    assert!(decode_uplink_unauthenticated(&f).is_err());
}
