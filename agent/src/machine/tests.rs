//! Unit tests of the machine: session, uplink sealing, keyrings, commands, frames. Pure:
//! the rig answers the effects that ask something, time is a number. The deployment
//! transitions are in `tests_deploy.rs`; both share the rig below.

use super::*;
use drover_protocol::envelope::DownlinkFrame;
use drover_protocol::manifest::{chunk_hashes, Lineage};
use drover_protocol::messages::ArtifactFormat;
use drover_protocol::messages::{AgentSettings, UplinkAck};
use drover_protocol::topics::UplinkKind;
use drover_protocol::trust::{sha256, KeyEntry, Keyring, Role};
use drover_protocol::SecretKey;

pub(super) const T0: u64 = 1_700_000_000_000;
pub(super) const PROBATION_MS: u64 = 2_000;
const CHUNK: u32 = 1024;

pub(super) struct Rig {
    pub m: Machine,
    pub root: SecretKey,
    pub signer: SecretKey,
    pub now: u64,
}

pub(super) fn keyring(root: &SecretKey, signer: &SecretKey, version: u64) -> SignedBlob {
    root.sign_keyring(&Keyring {
        version,
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
    })
}

pub(super) fn config() -> Config {
    Config {
        device_id: DeviceId::new("gw-unit").unwrap(),
        device_key: DeviceKey([9; 32]),
        labels: BTreeMap::new(),
        arch: "x86_64".into(),
        os: "linux".into(),
        probation_ms: PROBATION_MS,
        budget: ModelBudget::default(),
        runtime: RuntimeReport {
            engine: "tract".into(),
            version: "0.23.9".into(),
            formats: vec![
                ArtifactFormat {
                    format: "tract-nnef".into(),
                    version: 1,
                },
                ArtifactFormat {
                    format: RuntimeReport::ONNX.into(),
                    version: 1,
                },
            ],
        },
    }
}

/// A record with no slot at all reads as this empty one.
pub(super) static NO_SLOT: Slots = Slots {
    active: None,
    previous: None,
    shadow: None,
    pending: None,
};

/// The single slot of a one-model device (the tests written before named slots).
pub(super) trait One {
    fn one(&self) -> &Slots;
    fn one_mut(&mut self) -> &mut Slots;
}

impl One for State {
    fn one(&self) -> &Slots {
        assert!(
            self.models.len() <= 1,
            "several slots: {:?}",
            self.models.keys()
        );
        self.models.values().next().unwrap_or(&NO_SLOT)
    }

    fn one_mut(&mut self) -> &mut Slots {
        self.models.values_mut().next().expect("a slot")
    }
}

/// A started machine with a keyring (`trusted`) or none, not connected.
pub(super) fn rig_with(state: State, trusted: bool) -> Rig {
    let mut r = fresh(state, trusted);
    r.handle(Input::Start);
    r
}

/// As [`rig_with`], before [`Input::Start`].
pub(super) fn fresh(state: State, trusted: bool) -> Rig {
    let root = SecretKey::from_seed([1; 32]);
    let signer = SecretKey::from_seed([2; 32]);
    let mut trust = TrustStore::new(root.public()).unwrap();
    if trusted {
        trust
            .accept_keyring(&keyring(&root, &signer, 1), T0)
            .unwrap();
    }
    Rig {
        m: Machine::new(config(), state, trust, 1, T0),
        root,
        signer,
        now: T0,
    }
}

/// A started, connected machine that trusts the test signer.
pub(super) fn rig() -> Rig {
    // As after boot: request ids reserved ahead.
    let state = State {
        request_ids_reserved: REQUEST_ID_BLOCK,
        ..State::default()
    };
    let mut r = rig_with(state, true);
    r.handle(Input::Connected);
    r
}

impl Rig {
    /// Handles an input, checking the contract: an effect that asks is last.
    pub fn handle(&mut self, input: Input) -> Vec<Effect> {
        let effects = self.m.handle(input, self.now);
        if let Some(i) = effects.iter().position(Effect::is_ask) {
            assert_eq!(
                i,
                effects.len() - 1,
                "an ask must end its batch: {effects:?}"
            );
        }
        effects
    }

    pub fn command(&self, seq: u64, action: Action) -> SignedBlob {
        self.signer.sign_command(&Command {
            target: self.m.config().device_id.clone(),
            seq,
            issued_at_ms: 0,
            expires_at_ms: u64::MAX,
            rollout_id: None,
            action,
        })
    }

    pub fn send_command(&mut self, blob: SignedBlob) -> Vec<Effect> {
        self.handle(Input::Downlink(Downlink::Command(blob)))
    }

    pub fn tick(&mut self, errors: u64, ok: u64) -> Vec<Effect> {
        // The counts of every slot's model on probation (tests use one model name).
        let probation = (self.m.state().models.keys())
            .map(|n| (n.clone(), (errors, ok)))
            .collect();
        self.handle(Input::Tick(Observed {
            probation,
            last_request_id: 0,
        }))
    }
}

/// A model file of `len` bytes in 1 KiB chunks, its manifest and the signed manifest.
pub(super) struct TestModel {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
    pub blob: SignedBlob,
}

impl TestModel {
    pub fn new(signer: &SecretKey, version: &str, len: usize) -> TestModel {
        Self::named(signer, "m", version, len)
    }

    /// A model of another name (another slot).
    pub fn named(signer: &SecretKey, name: &str, version: &str, len: usize) -> TestModel {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ version.len() as u8 ^ name.len() as u8)
            .collect();
        let manifest = Manifest {
            name: name.into(),
            version: version.into(),
            sha256: sha256(&bytes),
            size: len as u64,
            chunk_size: CHUNK,
            chunk_hashes: chunk_hashes(&bytes, CHUNK),
            inputs: vec![],
            outputs: vec![],
            baseline: None,
            test_vectors: vec![],
            lineage: Lineage::default(),
            created_at_ms: 0,
            sampled_vectors: vec![],
            artifact: None,
        };
        let blob = signer.sign_manifest(&manifest);
        TestModel {
            bytes,
            manifest,
            blob,
        }
    }

    pub fn digest(&self) -> Digest {
        self.blob.digest()
    }

    pub fn model_ref(&self) -> ModelRef {
        ModelRef {
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            digest: self.digest(),
        }
    }

    pub fn chunk(&self, index: u32) -> ChunkData {
        let start = index as usize * CHUNK as usize;
        let end = (start + CHUNK as usize).min(self.bytes.len());
        ChunkData {
            manifest_digest: self.digest(),
            index,
            data: self.bytes[start..end].to_vec(),
        }
    }
}

/// The uplink messages among `effects`, in order.
pub(super) fn uplinks(effects: &[Effect]) -> Vec<Uplink> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Uplink(s) => Some(
                envelope::decode_uplink_unauthenticated(&s.payload)
                    .unwrap()
                    .msg,
            ),
            _ => None,
        })
        .collect()
}

/// The progress reports among `effects`: (command seq, phase, detail).
pub(super) fn progress(effects: &[Effect]) -> Vec<(u64, Phase, Option<String>)> {
    uplinks(effects)
        .into_iter()
        .filter_map(|u| match u {
            Uplink::Progress(p) => Some((p.command_seq, p.phase, p.detail)),
            _ => None,
        })
        .collect()
}

pub(super) fn phases(effects: &[Effect]) -> Vec<Phase> {
    progress(effects).into_iter().map(|p| p.1).collect()
}

/// The last record persisted among `effects`.
pub(super) fn persisted(effects: &[Effect]) -> Option<&State> {
    effects.iter().rev().find_map(|e| match e {
        Effect::Persist(s) | Effect::PersistCommand(s) => Some(&**s),
        _ => None,
    })
}

/// A short name per effect, to check their order.
pub(super) fn names(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Persist(_) | Effect::PersistCommand(_) => "persist".to_owned(),
            Effect::CrashPoint(p) => format!("crash {p}"),
            Effect::Uplink(s) => {
                match envelope::decode_uplink_unauthenticated(&s.payload)
                    .unwrap()
                    .msg
                {
                    Uplink::Progress(p) => format!("progress {:?}", p.phase),
                    m => format!("uplink {:?}", m.kind()),
                }
            }
            Effect::SetWill { .. } => "will".into(),
            Effect::Subscribe(_) => "subscribe".into(),
            Effect::Unsubscribe(_) => "unsubscribe".into(),
            Effect::Replay { .. } => "replay".into(),
            Effect::SpoolAck(_) => "spool ack".into(),
            Effect::ApplySettings(_) => "settings".into(),
            Effect::OpenDownload { .. } => "open".into(),
            Effect::WriteChunk { index, .. } => format!("write {index}"),
            Effect::FinishDownload { .. } => "finish".into(),
            Effect::CloseDownload { .. } => "close".into(),
            Effect::Load { self_test, .. } => format!("load test={self_test}"),
            Effect::ServeLoaded { .. } => "serve".into(),
            Effect::ShadowLoaded { .. } => "shadow".into(),
            Effect::PromoteShadow { .. } => "promote".into(),
            Effect::Unload { model } => format!("unload {model}"),
            Effect::DropShadow { .. } => "drop shadow".into(),
            Effect::Event(_) => "event".into(),
        })
        .filter(|n| n != "event")
        .collect()
}

pub(super) fn events(effects: &[Effect]) -> Vec<&Event> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(ev) => Some(ev),
            _ => None,
        })
        .collect()
}

#[test]
fn probation_fails_only_on_evidence_of_an_error_rate_above_ten_percent() {
    // No errors, or no requests: nothing against the model.
    assert!(probation_passed(0, 0));
    assert!(probation_passed(0, 3));
    // A few requests with one error: chance, not evidence (the plain 10 % ratio
    // failed all of these).
    assert!(probation_passed(1, 1));
    assert!(probation_passed(1, 4));
    assert!(probation_passed(2, 8));
    // Clear evidence fails, with few or many requests.
    assert!(!probation_passed(1, 0));
    assert!(!probation_passed(2, 1));
    assert!(!probation_passed(5, 0));
    assert!(!probation_passed(10, 0));
    assert!(!probation_passed(16, 24));
    assert!(!probation_passed(150, 850));
    // Many requests: the verdict approaches the ratio.
    assert!(probation_passed(10, 990));
    assert!(probation_passed(100, 900));
    assert!(!probation_passed(140, 860));
}

#[test]
fn start_seals_a_will_and_connect_says_hello_status_then_replays() {
    let mut r = fresh(State::default(), true);
    let start = r.handle(Input::Start);
    // The will takes the first sequence number, which reserves a block first.
    assert_eq!(names(&start), ["persist", "will"]);
    let conn = r.handle(Input::Connected);
    assert_eq!(
        names(&conn),
        [
            "subscribe",
            "subscribe",
            "uplink Hello",
            "uplink Status",
            "replay"
        ]
    );
    let Some(Effect::Replay { before }) = conn.last() else {
        panic!("{conn:?}")
    };
    assert_eq!(*before, r.m.next_seq());
    // Hello and status matter only now: never spooled.
    assert!(conn
        .iter()
        .all(|e| !matches!(e, Effect::Uplink(s) if s.durable)));
    let dis = r.handle(Input::Disconnected);
    assert_eq!(names(&dis), ["will"]);
    let Some(Effect::SetWill { payload, .. }) = dis.first() else {
        panic!()
    };
    let f = envelope::decode_uplink_unauthenticated(payload).unwrap();
    assert!(matches!(f.msg, Uplink::Status(s) if s.presence == Presence::Offline));
}

#[test]
fn reports_are_spooled_and_published_only_while_connected() {
    let mut r = rig_with(State::default(), true);
    let report = |r: &mut Rig| {
        r.handle(Input::Report(Box::new(Uplink::KeyringRefused(
            KeyringRefused {
                offered_version: 0,
                reason: String::new(),
            },
        ))))
    };
    let off = report(&mut r);
    assert!(matches!(off.last(), Some(Effect::Uplink(s)) if s.durable && !s.publish));
    r.handle(Input::Connected);
    let on = report(&mut r);
    assert!(matches!(on.last(), Some(Effect::Uplink(s)) if s.durable && s.publish));
    // Stop says offline while the session is up, and nothing once it is down.
    assert_eq!(names(&r.handle(Input::Stop)), ["uplink Status"]);
    r.handle(Input::Disconnected);
    assert!(r.handle(Input::Stop).is_empty());
}

#[test]
fn uplink_sequence_numbers_are_reserved_in_blocks_before_use() {
    let mut r = rig_with(State::default(), true);
    // The will sealed at start took seq 1 and reserved the first block.
    assert_eq!(r.m.state().uplink_seq_reserved, 1 + SEQ_BLOCK);
    let mut persists = 0;
    for _ in 0..=SEQ_BLOCK {
        let e = r.handle(Input::Disconnected);
        persists += names(&e).iter().filter(|n| *n == "persist").count();
    }
    assert_eq!(persists, 1, "one write per block");
    assert!(r.m.state().uplink_seq_reserved >= r.m.next_seq());
}

#[test]
fn request_ids_are_reserved_ahead_of_the_highest_one_handed_out() {
    let mut r = rig();
    let seen = |last_request_id| Observed {
        last_request_id,
        ..Observed::default()
    };
    assert!(r.handle(Input::Tick(seen(REQUEST_ID_BLOCK / 2))).is_empty());
    let e = r.handle(Input::Tick(seen(REQUEST_ID_BLOCK / 2 + 1)));
    assert_eq!(names(&e), ["persist"]);
    assert_eq!(
        persisted(&e).unwrap().request_ids_reserved,
        REQUEST_ID_BLOCK / 2 + 1 + REQUEST_ID_BLOCK
    );
}

#[test]
fn uplink_acks_and_hello_acks_reach_the_spool_and_the_log() {
    let mut r = rig();
    let e = r.handle(Input::Downlink(Downlink::UplinkAck(UplinkAck {
        ranges: vec![(1, 5)],
    })));
    assert!(matches!(&e[..], [Effect::SpoolAck(r)] if r == &vec![(1, 5)]));
    let e = r.handle(Input::Downlink(Downlink::HelloAck(
        drover_protocol::messages::HelloAck {
            protocol_version: 1,
            server_time_ms: 0,
            stored_up_to: 9,
        },
    )));
    assert!(matches!(
        events(&e)[..],
        [Event::HelloAcked {
            stored_up_to: 9,
            ..
        }]
    ));
}

#[test]
fn keyring_from_another_root_is_refused_and_reported_at_most_once_a_minute() {
    let mut r = rig_with(State::default(), false);
    r.handle(Input::Connected);
    let rogue = SecretKey::from_seed([5; 32]);
    let refused = |e: &[Effect]| {
        uplinks(e)
            .iter()
            .any(|u| matches!(u, Uplink::KeyringRefused(k) if k.offered_version >= 9))
    };
    let e = r.handle(Input::Keyring(keyring(&rogue, &rogue, 9)));
    assert!(refused(&e));
    // A flood of bogus keyrings yields no further reports within the interval.
    for v in 10..20 {
        let e = r.handle(Input::Keyring(keyring(&rogue, &rogue, v)));
        assert!(!refused(&e));
        assert!(matches!(events(&e)[..], [Event::KeyringRefused(_)]));
    }
    r.now += KEYRING_REFUSAL_INTERVAL_MS;
    assert!(refused(
        &r.handle(Input::Keyring(keyring(&rogue, &rogue, 21)))
    ));
    assert!(r.m.trust().keyring().is_none());
    // The genuine one is accepted and persisted; offered again, nothing changes.
    let good = keyring(&r.root, &r.signer, 1);
    let e = r.handle(Input::Downlink(Downlink::Keyring(good.clone())));
    assert_eq!(r.m.trust().keyring().map(|k| k.version), Some(1));
    assert_eq!(
        persisted(&e).and_then(|s| s.keyring.clone()),
        Some(good.clone())
    );
    assert!(r.handle(Input::Keyring(good)).is_empty());
}

#[test]
fn an_accepted_command_is_persisted_before_it_is_reported() {
    let mut r = rig();
    let cmd = r.command(
        3,
        Action::Configure(AgentSettings {
            telemetry_interval_ms: 500,
            sample_rate_ppm: 7,
        }),
    );
    let e = r.send_command(cmd.clone());
    assert_eq!(
        names(&e),
        [
            "persist",
            "crash command.after_seq_persist",
            "progress Received",
            "settings",
            "persist",
            "progress Done"
        ]
    );
    let first = match &e[0] {
        Effect::PersistCommand(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.last_command_seq, 3);
    assert_eq!(first.last_command_digest, Some(cmd.digest()));
    assert_eq!(r.m.telemetry_interval_ms(1000), 500);
}

#[test]
fn a_replayed_command_is_refused_but_a_redelivery_is_ignored() {
    let mut r = rig();
    let five = r.command(5, Action::Promote);
    r.send_command(five.clone());
    // The broker delivering the same signed bytes again: silently ignored.
    let e = r.send_command(five);
    assert!(uplinks(&e).is_empty());
    assert!(matches!(
        events(&e)[..],
        [Event::CommandRedelivered { seq: 5 }]
    ));
    // Another command at or below the floor: refused and reported, floor unchanged.
    let e = r.send_command(r.command(4, Action::Promote));
    let p = progress(&e);
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0, p[0].1), (0, Phase::Refused));
    assert!(p[0].2.as_deref().unwrap().contains("replay"), "{p:?}");
    assert!(persisted(&e).is_none());
    assert_eq!(r.m.state().last_command_seq, 5);
}

#[test]
fn commands_from_unknown_keys_or_for_other_devices_are_refused() {
    let mut r = rig();
    let rogue = SecretKey::from_seed([7; 32]);
    let forged = rogue.sign_command(&Command {
        target: r.m.config().device_id.clone(),
        seq: 9,
        issued_at_ms: 0,
        expires_at_ms: u64::MAX,
        rollout_id: None,
        action: Action::Promote,
    });
    let e = r.send_command(forged);
    assert!(matches!(
        events(&e)[..],
        [
            Event::CommandRefused(TrustError::UnknownKey { .. }),
            Event::Progress { .. }
        ]
    ));
    let other = r.signer.sign_command(&Command {
        target: DeviceId::new("gw-other").unwrap(),
        seq: 9,
        issued_at_ms: 0,
        expires_at_ms: u64::MAX,
        rollout_id: None,
        action: Action::Promote,
    });
    let e = r.send_command(other);
    assert_eq!(phases(&e), [Phase::Refused]);
    assert_eq!(r.m.state().last_command_seq, 0);
}

#[test]
fn extreme_settings_are_clamped_not_overflowing() {
    let mut r = rig();
    let cmd = r.command(
        1,
        Action::Configure(AgentSettings {
            telemetry_interval_ms: u64::MAX,
            sample_rate_ppm: u32::MAX,
        }),
    );
    r.send_command(cmd);
    assert_eq!(r.m.telemetry_interval_ms(1000), 86_400_000);
    let cmd = r.command(
        2,
        Action::Configure(AgentSettings {
            telemetry_interval_ms: 0,
            sample_rate_ppm: 0,
        }),
    );
    r.send_command(cmd);
    assert_eq!(r.m.telemetry_interval_ms(1000), 100);
}

#[test]
fn hostile_frames_are_refused_in_decoding_and_never_change_state() {
    let mut r = rig_with(State::default(), false);
    let dev = r.m.config().device_id.clone();
    let key = DeviceKey([9; 32]);
    let root = SecretKey::from_seed([1; 32]);
    let cmd = root.sign_command(&Command {
        target: dev.clone(),
        seq: 5,
        issued_at_ms: 0,
        expires_at_ms: u64::MAX,
        rollout_id: None,
        action: Action::Promote,
    });
    let frames: Vec<(String, Vec<u8>)> = vec![
        (
            topics::downlink(&dev),
            envelope::seal_downlink(
                &key,
                &DownlinkFrame {
                    device: dev.clone(),
                    sent_at_ms: 0,
                    msg: Downlink::Command(cmd),
                },
            ),
        ),
        (
            topics::keyring(),
            envelope::encode_keyring(&keyring(&root, &root, 3)),
        ),
        (
            topics::model_chunks(&[4; 32]),
            envelope::encode_chunk(&ChunkData {
                manifest_digest: [4; 32],
                index: 7,
                data: vec![1; 100],
            }),
        ),
    ];
    let before = r.m.state().clone();
    let feed = |r: &mut Rig, topic: &str, bytes: &[u8]| {
        if let Decoded::Input(i) = r.m.decode(topic, bytes) {
            r.handle(i);
        }
    };
    for (topic, bytes) in &frames {
        for cut in 0..bytes.len() {
            feed(&mut r, topic, &bytes[..cut]);
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x55;
            feed(&mut r, topic, &b);
        }
        feed(&mut r, "drover/v1/dev/other/down", bytes);
        feed(&mut r, "not/a/topic", bytes);
    }
    let after = r.m.state();
    assert_eq!(after.last_command_seq, before.last_command_seq);
    assert_eq!(after.one().active, None);
    assert_eq!(after.one().pending, None);
    assert!(r.m.trust().keyring().is_none());
}

#[test]
fn decoding_sorts_frames_by_topic_and_checks_the_downlink_mac() {
    let r = rig();
    let dev = r.m.config().device_id.clone();
    let frame = DownlinkFrame {
        device: dev.clone(),
        sent_at_ms: 0,
        msg: Downlink::UplinkAck(UplinkAck { ranges: vec![] }),
    };
    let good = envelope::seal_downlink(&DeviceKey([9; 32]), &frame);
    let forged = envelope::seal_downlink(&DeviceKey([8; 32]), &frame);
    let down = topics::downlink(&dev);
    assert!(matches!(
        r.m.decode(&down, &good),
        Decoded::Input(Input::Downlink(_))
    ));
    assert!(matches!(
        r.m.decode(&down, &forged),
        Decoded::Input(Input::DownlinkRefused { len, .. }) if len == forged.len()
    ));
    let chunk = envelope::encode_chunk(&ChunkData {
        manifest_digest: [4; 32],
        index: 0,
        data: vec![],
    });
    assert!(matches!(
        r.m.decode(&topics::model_chunks(&[5; 32]), &chunk),
        Decoded::Refused(FrameRefused::ChunkTopic)
    ));
    assert!(matches!(
        r.m.decode(&topics::uplink(&dev, UplinkKind::Status), &good),
        Decoded::Ignored
    ));
}

#[test]
fn refused_downlinks_are_reported_by_digest_and_size_within_a_budget() {
    let mut r = rig();
    let dev = r.m.config().device_id.clone();
    let down = topics::downlink(&dev);
    let mut oversized = b"DR".to_vec();
    oversized.extend_from_slice(&envelope::ENVELOPE_VERSION.to_le_bytes());
    oversized.push(2);
    oversized.resize(envelope::MAX_DOWNLINK_LEN + 1, 0);
    for (bytes, why) in [
        (oversized, "above the 4194304-byte limit"),
        (b"\x00 not a frame".to_vec(), "bad magic"),
    ] {
        let Decoded::Input(input) = r.m.decode(&down, &bytes) else {
            panic!("{why}: not an input");
        };
        let e = r.handle(input);
        assert!(matches!(
            events(&e)[0],
            Event::DownlinkRefused { len, .. } if *len == bytes.len()
        ));
        let p = progress(&e);
        assert_eq!((p.len(), p[0].0, p[0].1), (1, 0, Phase::Refused), "{p:?}");
        let detail = p[0].2.as_deref().unwrap();
        assert!(
            detail.contains(why) && detail.contains("acknowledged"),
            "{detail}"
        );
        let digest = uplinks(&e).iter().find_map(|u| match u {
            Uplink::Progress(p) => Some(p.command_digest),
            _ => None,
        });
        assert_eq!(digest, Some(drover_protocol::trust::sha256(&bytes)));
    }
    // A flood is reported up to the budget, then only logged; state untouched.
    let before = r.m.state().clone();
    let reported: usize = (0..40)
        .map(|_| {
            let Decoded::Input(i) = r.m.decode(&down, b"junk") else {
                panic!()
            };
            progress(&r.handle(i)).len()
        })
        .sum();
    assert_eq!(reported, DOWNLINK_REFUSALS_PER_INTERVAL as usize - 2);
    assert_eq!(r.m.state().last_command_seq, before.last_command_seq);
}
