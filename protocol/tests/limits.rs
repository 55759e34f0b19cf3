//! The downlink limit holds for every deploy command the control plane can build: a signed
//! manifest within `MAX_MANIFEST_LEN` always makes a sealed frame within
//! `MAX_DOWNLINK_LEN`, whatever the device id, sequence, times and rollout id, so the
//! publish-time check (the registry refuses a larger manifest) is enough.

mod common;

use common::*;
use drover_protocol::envelope::*;
use drover_protocol::manifest::{TensorData, TensorValue, TestVector};
use drover_protocol::messages::{Action, Command, DeployMode, Downlink};
use drover_protocol::DeviceId;
use proptest::prelude::*;

/// A manifest whose test vectors make its signed payload about `target` bytes.
fn manifest_of_about(target: usize) -> drover_protocol::SignedBlob {
    let mut m = manifest();
    let base = signer().sign_manifest(&m).payload.len();
    let floats = target.saturating_sub(base + 64) / 4;
    m.test_vectors.push(TestVector {
        inputs: vec![TensorValue {
            name: "x".into(),
            shape: vec![floats as u64],
            data: TensorData::F32(vec![0.5; floats]),
        }],
        outputs: vec![],
        tolerance: 0.0,
    });
    signer().sign_manifest(&m)
}

fn deploy_frame(manifest: drover_protocol::SignedBlob, id_len: usize, n: u64) -> Vec<u8> {
    let device = DeviceId::new("d".repeat(id_len)).unwrap();
    let cmd = Command {
        target: device.clone(),
        seq: n,
        issued_at_ms: n,
        expires_at_ms: n,
        rollout_id: Some(n),
        action: Action::Deploy {
            manifest,
            mode: DeployMode::Shadow,
        },
    };
    seal_downlink(
        &device_key(),
        &DownlinkFrame {
            device,
            sent_at_ms: n,
            msg: Downlink::Command(signer().sign_command(&cmd)),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_manifest_within_its_limit_always_makes_a_frame_within_the_downlink_limit(
        target in 0usize..256 * 1024,
        id_len in 1usize..=drover_protocol::topics::MAX_DEVICE_ID_LEN,
        n in prop_oneof![Just(u64::MAX), any::<u64>()],
    ) {
        let manifest = manifest_of_about(target);
        let payload = manifest.payload.len();
        let frame = deploy_frame(manifest, id_len, n);
        prop_assert!(frame.len() - payload <= DEPLOY_FRAME_OVERHEAD,
            "overhead {} above {DEPLOY_FRAME_OVERHEAD}", frame.len() - payload);
        if payload <= MAX_MANIFEST_LEN {
            prop_assert!(check_downlink_len(&frame).is_ok(), "{} bytes", frame.len());
        }
    }
}

proptest! {
    // Signing megabytes is slow in a debug build: few cases, all at the boundary (where
    // the length prefixes are longest).
    #![proptest_config(ProptestConfig { cases: 2, ..ProptestConfig::default() })]

    #[test]
    fn at_the_boundary_the_manifest_limit_still_fits_the_downlink_limit(
        target in MAX_MANIFEST_LEN - 64..MAX_MANIFEST_LEN + 64,
    ) {
        let manifest = manifest_of_about(target);
        let payload = manifest.payload.len();
        let frame = deploy_frame(manifest, drover_protocol::topics::MAX_DEVICE_ID_LEN, u64::MAX);
        prop_assert!(frame.len() - payload <= DEPLOY_FRAME_OVERHEAD);
        prop_assert_eq!(check_downlink_len(&frame).is_ok(), payload <= MAX_MANIFEST_LEN
            || frame.len() <= MAX_DOWNLINK_LEN);
    }
}

#[test]
fn the_sender_refuses_a_frame_over_the_limit_with_both_figures() {
    let frame = deploy_frame(manifest_of_about(MAX_DOWNLINK_LEN), 64, u64::MAX);
    let e = check_downlink_len(&frame).unwrap_err();
    assert_eq!(
        e,
        FrameTooLarge {
            len: frame.len(),
            max: MAX_DOWNLINK_LEN
        }
    );
    assert!(e.to_string().contains(&MAX_DOWNLINK_LEN.to_string()), "{e}");
    // Every reader takes what the senders and brokers may pass.
    const { assert!(MAX_BROKER_PAYLOAD > MAX_DOWNLINK_LEN) };
    const { assert!(MAX_MQTT_PACKET > MAX_BROKER_PAYLOAD) };
}
