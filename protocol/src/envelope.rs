//! The versioned wire envelope.
//!
//! ```text
//! frame  = magic "DR" | envelope version u16 LE | kind u8 | postcard body | [mac 32 bytes]
//! kinds  = 1 uplink   (device → CP; body UplinkFrame; MAC with the device key)
//!          2 downlink (CP → device; body DownlinkFrame; MAC with the device key)
//!          3 chunk    (CP → downloading devices; body ChunkData; checked by manifest hash)
//!          4 keyring  (CP → fleet, retained; body SignedBlob; checked by the root key)
//! ```
//!
//! Decoding order, so hostile bytes cost little and cannot panic: length bounds, magic,
//! version, kind, MAC over the exact received bytes, and only then postcard.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::MAX_CHUNK_SIZE;
use crate::messages::{ChunkData, Downlink, Uplink};
use crate::topics::DeviceId;
use crate::trust::{DeviceKey, SignedBlob, MAC_LEN};

/// The frame layout's version, in every frame's header. The message set grows by
/// versions of its own ([`PROTOCOL_VERSION`]) without changing the layout, so every
/// peer since the first release reads every frame's header.
pub const ENVELOPE_VERSION: u16 = 1;
/// The newest message set this build speaks. A version only appends enum variants (old
/// layouts are unchanged), and a peer sends one of them only to a peer whose hello
/// negotiated that version ([`crate::messages::Action::min_protocol`]):
/// 1 the first release; 2 commands about one named model (`RollbackModel`,
/// `PromoteModel`, `RemoveModel`) for agents that serve several models; 3 the device's
/// `Runtime` report (the artifact formats it loads), so it may be sent compiled models.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest message set this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

pub const MAGIC: [u8; 2] = *b"DR";
pub const HEADER_LEN: usize = 5;

/// Upper bounds checked before anything is decoded or allocated.
pub const MAX_UPLINK_LEN: usize = 1024 * 1024;
/// The one downlink limit: the control plane's outbox refuses to publish a sealed frame
/// above it, the API refuses a deploy whose command would be above it, every agent
/// refuses (and acknowledges, and reports) a received frame above it, and the broker and
/// client packet limits below derive from it.
pub const MAX_DOWNLINK_LEN: usize = 4 * 1024 * 1024;
pub const MAX_CHUNK_FRAME_LEN: usize = MAX_CHUNK_SIZE as usize + 1024;
pub const MAX_KEYRING_LEN: usize = 64 * 1024;

/// Headroom above the largest frame, in the broker's payload limit and again in the
/// clients' packet limit (MQTT fixed header, topic, properties).
pub const MQTT_SLACK: usize = 64 * 1024;
/// The largest MQTT payload a Drover broker accepts (the embedded broker's
/// `max_payload_size`, mosquitto's `message_size_limit` as `drover broker config
/// mosquitto` writes it): a frame somewhat over its kind's limit still reaches its
/// reader, which refuses it by the envelope's bound instead of it vanishing in the broker.
pub const MAX_BROKER_PAYLOAD: usize = MAX_DOWNLINK_LEN + MQTT_SLACK;
/// The largest MQTT packet a Drover client (agent, control plane) reads: everything the
/// broker delivers, so a client never drops its connection over a packet, which would make
/// the broker redeliver the unacknowledged message on every reconnect, forever.
pub const MAX_MQTT_PACKET: usize = MAX_BROKER_PAYLOAD + MQTT_SLACK;

/// An upper bound of everything in a sealed deploy command frame except the signed
/// manifest's payload: envelope header and MAC, the downlink frame (device id up to
/// `topics::MAX_DEVICE_ID_LEN`, time), the signed command (key id, signature, length
/// prefixes) and the command's own fields. `protocol/tests/limits.rs` checks it holds.
pub const DEPLOY_FRAME_OVERHEAD: usize = 1024;
/// The largest signed manifest payload a deploy command can carry within
/// [`MAX_DOWNLINK_LEN`]. The registry refuses to publish a larger one.
pub const MAX_MANIFEST_LEN: usize = MAX_DOWNLINK_LEN - DEPLOY_FRAME_OVERHEAD;

/// A sealed downlink frame the sender must not publish.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "the downlink frame would be {len} bytes, above the {max}-byte limit every device \
     enforces; it was not sent"
)]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

/// The sender's check, before publishing a sealed downlink frame.
pub fn check_downlink_len(frame: &[u8]) -> Result<(), FrameTooLarge> {
    if frame.len() > MAX_DOWNLINK_LEN {
        return Err(FrameTooLarge {
            len: frame.len(),
            max: MAX_DOWNLINK_LEN,
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Uplink = 1,
    Downlink = 2,
    Chunk = 3,
    Keyring = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Uplink,
            2 => FrameKind::Downlink,
            3 => FrameKind::Chunk,
            4 => FrameKind::Keyring,
            _ => return None,
        })
    }

    fn max_len(self) -> usize {
        match self {
            FrameKind::Uplink => MAX_UPLINK_LEN,
            FrameKind::Downlink => MAX_DOWNLINK_LEN,
            FrameKind::Chunk => MAX_CHUNK_FRAME_LEN,
            FrameKind::Keyring => MAX_KEYRING_LEN,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame is {len} bytes, shorter than its header")]
    TooShort { len: usize },
    #[error("frame is {len} bytes, above the {max}-byte limit for this kind")]
    TooLarge { len: usize, max: usize },
    #[error("not a Drover frame (bad magic)")]
    BadMagic,
    #[error("peer speaks protocol version {peer}; this build speaks {min}..={max}: upgrade the older side")]
    Incompatible { peer: u16, min: u16, max: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected:?} frame, got {got:?}")]
    WrongKind { expected: FrameKind, got: FrameKind },
    #[error("frame authentication failed (bad MAC or wrong device key)")]
    BadMac,
    #[error("frame names device {claimed} but arrived for device {expected}")]
    DeviceMismatch { claimed: String, expected: String },
    #[error("frame body does not decode: {0}")]
    Malformed(String),
}

/// A device → control plane message with its per-device sequence number, which the
/// control plane de-duplicates on and acknowledges (see `Downlink::UplinkAck`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UplinkFrame {
    pub device: DeviceId,
    pub seq: u64,
    pub sent_at_ms: u64,
    pub msg: Uplink,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DownlinkFrame {
    pub device: DeviceId,
    pub sent_at_ms: u64,
    pub msg: Downlink,
}

fn header(kind: FrameKind) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    v.push(kind as u8);
    v
}

fn encode_body<T: Serialize>(out: Vec<u8>, body: &T) -> Vec<u8> {
    // Encoding our own types into a growable Vec cannot fail (they use no serde feature
    // postcard lacks); an empty frame would be refused by every decoder anyway.
    postcard::to_extend(body, out).unwrap_or_default()
}

/// Reads and checks the header of any frame; returns its kind.
pub fn check_header(bytes: &[u8]) -> Result<FrameKind, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    if bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[2], bytes[3]]);
    if version != ENVELOPE_VERSION {
        return Err(DecodeError::Incompatible {
            peer: version,
            min: ENVELOPE_VERSION,
            max: ENVELOPE_VERSION,
        });
    }
    let kind = FrameKind::from_u8(bytes[4]).ok_or(DecodeError::UnknownKind(bytes[4]))?;
    if bytes.len() > kind.max_len() {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: kind.max_len(),
        });
    }
    Ok(kind)
}

fn expect(bytes: &[u8], expected: FrameKind) -> Result<(), DecodeError> {
    let got = check_header(bytes)?;
    if got != expected {
        return Err(DecodeError::WrongKind { expected, got });
    }
    Ok(())
}

/// Decodes a whole body: trailing bytes are refused, so one frame has one meaning.
fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(DecodeError::Malformed(e.to_string())),
    }
}

fn open_mac<'a>(bytes: &'a [u8], key: &DeviceKey) -> Result<&'a [u8], DecodeError> {
    if bytes.len() < HEADER_LEN + MAC_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    if !key.verify(signed, tag) {
        return Err(DecodeError::BadMac);
    }
    Ok(&signed[HEADER_LEN..])
}

fn seal(mut v: Vec<u8>, key: &DeviceKey) -> Vec<u8> {
    let tag = key.mac(&v);
    v.extend_from_slice(&tag);
    v
}

/// Encodes and authenticates an uplink frame.
pub fn seal_uplink(key: &DeviceKey, frame: &UplinkFrame) -> Vec<u8> {
    seal(encode_body(header(FrameKind::Uplink), frame), key)
}

/// Authenticates and decodes an uplink frame that arrived on `device`'s topic.
pub fn open_uplink(
    bytes: &[u8],
    device: &DeviceId,
    key: &DeviceKey,
) -> Result<UplinkFrame, DecodeError> {
    expect(bytes, FrameKind::Uplink)?;
    let body = open_mac(bytes, key)?;
    let f: UplinkFrame = decode(body)?;
    if &f.device != device {
        return Err(DecodeError::DeviceMismatch {
            claimed: f.device.to_string(),
            expected: device.to_string(),
        });
    }
    Ok(f)
}

pub fn seal_downlink(key: &DeviceKey, frame: &DownlinkFrame) -> Vec<u8> {
    seal(encode_body(header(FrameKind::Downlink), frame), key)
}

pub fn open_downlink(
    bytes: &[u8],
    device: &DeviceId,
    key: &DeviceKey,
) -> Result<DownlinkFrame, DecodeError> {
    expect(bytes, FrameKind::Downlink)?;
    let body = open_mac(bytes, key)?;
    let f: DownlinkFrame = decode(body)?;
    if &f.device != device {
        return Err(DecodeError::DeviceMismatch {
            claimed: f.device.to_string(),
            expected: device.to_string(),
        });
    }
    Ok(f)
}

pub fn encode_chunk(c: &ChunkData) -> Vec<u8> {
    encode_body(header(FrameKind::Chunk), c)
}

/// Decodes a chunk frame; its contents are trusted only after `trust::verify_chunk`.
pub fn decode_chunk(bytes: &[u8]) -> Result<ChunkData, DecodeError> {
    expect(bytes, FrameKind::Chunk)?;
    decode(&bytes[HEADER_LEN..])
}

pub fn encode_keyring(k: &SignedBlob) -> Vec<u8> {
    encode_body(header(FrameKind::Keyring), k)
}

/// Decodes a keyring frame; trusted only after `TrustStore::accept_keyring`.
pub fn decode_keyring(bytes: &[u8]) -> Result<SignedBlob, DecodeError> {
    expect(bytes, FrameKind::Keyring)?;
    decode(&bytes[HEADER_LEN..])
}

/// Decodes an uplink frame's body *without* authenticating it. Only for tools that
/// inspect traffic (and for the fuzzer); never for acting on a message.
pub fn decode_uplink_unauthenticated(bytes: &[u8]) -> Result<UplinkFrame, DecodeError> {
    expect(bytes, FrameKind::Uplink)?;
    if bytes.len() < HEADER_LEN + MAC_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    decode(&bytes[HEADER_LEN..bytes.len() - MAC_LEN])
}

/// As [`decode_uplink_unauthenticated`], for downlink frames.
pub fn decode_downlink_unauthenticated(bytes: &[u8]) -> Result<DownlinkFrame, DecodeError> {
    expect(bytes, FrameKind::Downlink)?;
    if bytes.len() < HEADER_LEN + MAC_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    decode(&bytes[HEADER_LEN..bytes.len() - MAC_LEN])
}

/// Picks the protocol version two peers will speak, or says why they cannot talk.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Result<u16, DecodeError> {
    let hi = peer_max.min(PROTOCOL_VERSION);
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    if lo > hi {
        return Err(DecodeError::Incompatible {
            peer: peer_max,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    Ok(hi)
}
