//! Round-trip and golden-byte tests for every message, and version negotiation.
//!
//! Golden files pin the exact encoding: an accidental change to a type fails here. After
//! an intended change (with a protocol version bump), re-bless with
//! `DROVER_BLESS=1 cargo test -p drover-protocol --test wire`.

mod common;

use std::path::PathBuf;

use common::*;
use drover_protocol::envelope::*;
use drover_protocol::DecodeError;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.hex"))
}

fn check_golden(name: &str, bytes: &[u8]) {
    let path = golden_path(name);
    let hex = hex::encode(bytes);
    if std::env::var_os("DROVER_BLESS").is_some() {
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("missing golden file {}: {e}", path.display()));
    assert_eq!(
        want.trim(),
        hex,
        "encoding of {name} changed; if intended, bump PROTOCOL_VERSION and re-bless"
    );
}

fn uplink_frame(seq: u64, msg: drover_protocol::Uplink) -> UplinkFrame {
    UplinkFrame {
        device: dev(),
        seq,
        sent_at_ms: NOW,
        msg,
    }
}

#[test]
fn every_uplink_round_trips_and_matches_golden_bytes() {
    for (i, (name, msg)) in uplinks().into_iter().enumerate() {
        let frame = uplink_frame(i as u64 + 1, msg);
        let bytes = seal_uplink(&device_key(), &frame);
        check_golden(name, &bytes);
        let back = open_uplink(&bytes, &dev(), &device_key()).unwrap();
        assert_eq!(back, frame, "{name}");
        assert_eq!(
            drover_protocol::topics::parse(&drover_protocol::topics::uplink(
                &dev(),
                back.msg.kind()
            ))
            .unwrap(),
            drover_protocol::topics::ParsedTopic::Uplink {
                device: dev(),
                kind: frame.msg.kind()
            }
        );
    }
}

#[test]
fn every_downlink_round_trips_and_matches_golden_bytes() {
    for (name, msg) in downlinks() {
        let frame = DownlinkFrame {
            device: dev(),
            sent_at_ms: NOW,
            msg,
        };
        let bytes = seal_downlink(&device_key(), &frame);
        check_golden(name, &bytes);
        assert_eq!(
            open_downlink(&bytes, &dev(), &device_key()).unwrap(),
            frame,
            "{name}"
        );
    }
}

#[test]
fn chunk_and_keyring_frames_round_trip_and_match_golden_bytes() {
    let c = chunk();
    let bytes = encode_chunk(&c);
    check_golden("chunk", &bytes);
    assert_eq!(decode_chunk(&bytes).unwrap(), c);

    let k = root().sign_keyring(&keyring(3));
    let bytes = encode_keyring(&k);
    check_golden("keyring", &bytes);
    assert_eq!(decode_keyring(&bytes).unwrap(), k);
}

#[test]
fn incompatible_envelope_version_is_refused_with_both_versions_named() {
    let mut bytes = seal_uplink(&device_key(), &uplink_frame(1, uplinks().remove(0).1));
    // Frames keep the first release's layout: its version is what every peer reads.
    assert_eq!(u16::from_le_bytes([bytes[2], bytes[3]]), 1);
    bytes[2..4].copy_from_slice(&(ENVELOPE_VERSION + 1).to_le_bytes());
    let err = open_uplink(&bytes, &dev(), &device_key()).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Incompatible {
            peer: ENVELOPE_VERSION + 1,
            min: ENVELOPE_VERSION,
            max: ENVELOPE_VERSION
        }
    );
    assert!(err.to_string().contains("upgrade the older side"), "{err}");
    bytes[2..4].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        open_uplink(&bytes, &dev(), &device_key()),
        Err(DecodeError::Incompatible { peer: 0, .. })
    ));
}

#[test]
fn negotiation_picks_the_highest_common_version_or_refuses() {
    assert_eq!(negotiate(1, 9), Ok(PROTOCOL_VERSION));
    assert_eq!(
        negotiate(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
        Ok(PROTOCOL_VERSION)
    );
    assert!(matches!(
        negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3),
        Err(DecodeError::Incompatible { .. })
    ));
}

/// The first release's `Action`, as its agents decode it (protocol 1).
#[derive(Debug, PartialEq, serde::Deserialize)]
enum ActionV1 {
    Deploy {
        manifest: drover_protocol::SignedBlob,
        mode: drover_protocol::messages::DeployMode,
    },
    Rollback {
        to: Option<drover_protocol::messages::ModelRef>,
    },
    Promote,
    Configure(drover_protocol::messages::AgentSettings),
}

#[test]
fn protocol_2_commands_are_unreadable_to_a_protocol_1_agent_and_marked_so() {
    use drover_protocol::messages::Action;
    // Every action of the first release still decodes in an old agent's layout...
    for action in [
        Action::Promote,
        Action::Rollback { to: None },
        Action::Configure(drover_protocol::messages::AgentSettings {
            telemetry_interval_ms: 1000,
            sample_rate_ppm: 0,
        }),
    ] {
        assert_eq!(action.min_protocol(), 1);
        let bytes = postcard::to_allocvec(&action).unwrap();
        assert!(
            postcard::from_bytes::<ActionV1>(&bytes).is_ok(),
            "{action:?}"
        );
    }
    // ...and every action protocol 2 added does not, so the control plane must never send
    // one to such an agent: `min_protocol` says which ones.
    for (name, action) in v2_actions() {
        assert_eq!(action.min_protocol(), 2, "{name}");
        assert_eq!(action.model(), Some("vibration"), "{name}");
        let bytes = postcard::to_allocvec(&action).unwrap();
        assert!(
            postcard::from_bytes::<ActionV1>(&bytes).is_err(),
            "{name} decoded as a protocol 1 action"
        );
    }
}

#[test]
fn frames_are_authenticated_per_device() {
    let frame = uplink_frame(5, uplinks().remove(1).1);
    let bytes = seal_uplink(&device_key(), &frame);
    // Another device's key: refused before decoding.
    let other = drover_protocol::DeviceKey([8u8; 32]);
    assert_eq!(
        open_uplink(&bytes, &dev(), &other),
        Err(DecodeError::BadMac)
    );
    // Any flipped byte in header, body or tag: refused.
    for i in [0, 3, 4, 10, bytes.len() / 2, bytes.len() - 1] {
        let mut t = bytes.clone();
        t[i] ^= 0x40;
        assert!(open_uplink(&t, &dev(), &device_key()).is_err(), "byte {i}");
    }
    // A device that relays its own validly-MAC'd frame on another device's topic.
    let b = drover_protocol::DeviceId::new("plant-b.gw-02").unwrap();
    assert_eq!(
        open_uplink(&bytes, &b, &device_key()),
        Err(DecodeError::DeviceMismatch {
            claimed: dev().to_string(),
            expected: b.to_string()
        })
    );
    // Frame kinds are not interchangeable.
    assert!(matches!(
        open_downlink(&bytes, &dev(), &device_key()),
        Err(DecodeError::WrongKind { .. })
    ));
}

#[test]
fn oversized_and_truncated_frames_are_refused_before_decoding() {
    let mut big = vec![0u8; MAX_UPLINK_LEN + 1];
    big[..5].copy_from_slice(&[b'D', b'R', 1, 0, 1]);
    assert_eq!(
        open_uplink(&big, &dev(), &device_key()),
        Err(DecodeError::TooLarge {
            len: MAX_UPLINK_LEN + 1,
            max: MAX_UPLINK_LEN
        })
    );
    assert_eq!(check_header(b"DR"), Err(DecodeError::TooShort { len: 2 }));
    assert_eq!(check_header(b"XX\x01\x00\x01"), Err(DecodeError::BadMagic));
    assert_eq!(
        check_header(b"DR\x01\x00\x09"),
        Err(DecodeError::UnknownKind(9))
    );
    let bytes = seal_uplink(&device_key(), &uplink_frame(1, uplinks().remove(2).1));
    assert!(open_uplink(&bytes[..bytes.len() - 1], &dev(), &device_key()).is_err());
}

#[test]
fn trailing_bytes_after_a_message_are_refused() {
    let mut bytes = encode_chunk(&chunk());
    bytes.push(0);
    assert_eq!(
        decode_chunk(&bytes),
        Err(DecodeError::Malformed(
            "1 trailing bytes after the message".into()
        ))
    );
}
