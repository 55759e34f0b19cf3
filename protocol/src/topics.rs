//! The MQTT topic scheme. Every topic string in Drover is built or parsed here.
//!
//! ```text
//! drover/v1/dev/{device}/up/{kind}     device → control plane (authenticated frames)
//! drover/v1/dev/{device}/down          control plane → one device (hello acks, signed commands, acks)
//! drover/v1/model/{digest}/chunks      control plane → every device downloading that model (shared)
//! drover/v1/fleet/keyring              retained, root-signed keyring
//! ```
//!
//! Architecture invariant: no other module in any crate writes a topic literal.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

const PREFIX: &str = "drover/v1";

/// A validated device id: 1–64 bytes of `[A-Za-z0-9._:-]`, so it can never inject MQTT
/// wildcards (`+`, `#`), topic levels (`/`), NUL, or whitespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct DeviceId(String);

/// Why a device id or a topic was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("device id is empty")]
    EmptyDeviceId,
    #[error("device id is {len} bytes, the limit is {MAX_DEVICE_ID_LEN}")]
    DeviceIdTooLong { len: usize },
    #[error("device id contains {ch:?}; allowed: letters, digits, '.', '_', ':' and '-'")]
    BadDeviceIdChar { ch: char },
    #[error("topic {topic:?} is not a Drover topic")]
    Unknown { topic: String },
}

impl DeviceId {
    /// Validates and wraps a device id.
    pub fn new(id: impl Into<String>) -> Result<Self, TopicError> {
        let id = id.into();
        if id.is_empty() {
            return Err(TopicError::EmptyDeviceId);
        }
        if id.len() > MAX_DEVICE_ID_LEN {
            return Err(TopicError::DeviceIdTooLong { len: id.len() });
        }
        if let Some(ch) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(TopicError::BadDeviceIdChar { ch });
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

// Deserialization re-validates, so a device id decoded off the wire is always well-formed.
impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceId::new(s).map_err(serde::de::Error::custom)
    }
}

/// The kind of a device → control plane message, which is also the last topic level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UplinkKind {
    Hello,
    Status,
    Telemetry,
    Progress,
    ChunkRequest,
    Shadow,
    Drift,
    Samples,
    Labels,
    KeyringRefused,
    /// Protocol 2: [`crate::messages::ModelsReport`].
    Models,
}

impl UplinkKind {
    pub const ALL: [UplinkKind; 11] = [
        UplinkKind::Hello,
        UplinkKind::Status,
        UplinkKind::Telemetry,
        UplinkKind::Progress,
        UplinkKind::ChunkRequest,
        UplinkKind::Shadow,
        UplinkKind::Drift,
        UplinkKind::Samples,
        UplinkKind::Labels,
        UplinkKind::KeyringRefused,
        UplinkKind::Models,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UplinkKind::Hello => "hello",
            UplinkKind::Status => "status",
            UplinkKind::Telemetry => "telemetry",
            UplinkKind::Progress => "progress",
            UplinkKind::ChunkRequest => "chunkreq",
            UplinkKind::Shadow => "shadow",
            UplinkKind::Drift => "drift",
            UplinkKind::Samples => "samples",
            UplinkKind::Labels => "labels",
            UplinkKind::KeyringRefused => "keyring-refused",
            UplinkKind::Models => "models",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Topic a device publishes one kind of message on.
pub fn uplink(device: &DeviceId, kind: UplinkKind) -> String {
    format!("{PREFIX}/dev/{device}/up/{}", kind.as_str())
}

/// Root of the integration stream: flat JSON the control plane republishes for readers
/// (Node-RED, Telegraf), never read by agents or the control plane.
pub fn json_root() -> String {
    format!("{PREFIX}/json")
}

/// Where the JSON record of a device's uplink of `kind` is republished.
pub fn json_uplink(device: &DeviceId, kind: UplinkKind) -> String {
    format!("{PREFIX}/json/{device}/{}", kind.as_str())
}

/// The device's retained registration (labels, model) in the integration stream.
pub fn json_registration(device: &DeviceId) -> String {
    format!("{PREFIX}/json/{device}/registration")
}

/// Filter for the whole integration stream.
pub fn json_filter_all() -> String {
    format!("{PREFIX}/json/#")
}

/// Whether a subscription filter can match only topics of the integration stream: its
/// first levels are literally `drover/v1/json/` (no wildcard there), so it can never reach
/// an uplink, downlink, chunk or keyring topic. What a read-only integration identity may
/// subscribe to.
pub fn is_json_filter(filter: &str) -> bool {
    filter
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix("/json/"))
        .is_some_and(|rest| !rest.is_empty())
}

/// Broker ACL of a read-only integration identity, for brokers whose pattern ACLs apply to
/// every user (mosquitto): `(read, deny)`: it reads the integration stream, and is denied
/// every tree the device patterns of [`device_acl`] open (a deny wins over a pattern).
pub fn integration_acl() -> (String, Vec<String>) {
    (
        json_filter_all(),
        vec![
            format!("{PREFIX}/dev/#"),
            format!("{PREFIX}/model/#"),
            format!("{PREFIX}/fleet/#"),
        ],
    )
}

/// Filter the control plane subscribes to for every device's uplink.
pub fn uplink_filter_all() -> String {
    format!("{PREFIX}/dev/+/up/+")
}

/// The same filter as an MQTT v5 / mosquitto shared subscription, so several control-plane
/// instances (or several ingest sessions of one) split the fleet's uplink between them.
pub fn uplink_filter_shared(group: &str) -> String {
    format!("$share/{group}/{PREFIX}/dev/+/up/+")
}

/// Topic the control plane publishes to one device on.
pub fn downlink(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/down")
}

/// Topic carrying chunks of the model whose signed manifest has this digest. Every device
/// downloading the same model subscribes to it, so one publish serves them all.
pub fn model_chunks(manifest_digest: &[u8; 32]) -> String {
    format!("{PREFIX}/model/{}/chunks", hex32(manifest_digest))
}

/// Retained topic holding the current root-signed keyring.
pub fn keyring() -> String {
    format!("{PREFIX}/fleet/keyring")
}

/// Broker ACL patterns for one device, with `user` standing for its authenticated
/// identity (mosquitto's `%u`, EMQX's `${username}`): it may publish only under its own
/// uplink topics, and read only its own downlink, every model's chunk topic and the
/// fleet keyring. Returns `(publish, subscribe)` topic filters.
pub fn device_acl(user: &str) -> (Vec<String>, Vec<String>) {
    (
        vec![format!("{PREFIX}/dev/{user}/up/#")],
        vec![
            format!("{PREFIX}/dev/{user}/down"),
            format!("{PREFIX}/model/+/chunks"),
            keyring(),
        ],
    )
}

/// The filter covering every Drover topic (the control plane's own ACL).
pub fn all_filter() -> String {
    format!("{PREFIX}/#")
}

/// What a topic received by the control plane or the agent names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedTopic {
    Uplink { device: DeviceId, kind: UplinkKind },
    Downlink { device: DeviceId },
    ModelChunks { manifest_digest: [u8; 32] },
    Keyring,
}

/// Parses any Drover topic. Unknown or malformed topics are an error, never a panic.
pub fn parse(topic: &str) -> Result<ParsedTopic, TopicError> {
    let unknown = || TopicError::Unknown {
        topic: topic.chars().take(200).collect(),
    };
    let rest = topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(unknown)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["dev", id, "up", kind] => Ok(ParsedTopic::Uplink {
            device: DeviceId::new(*id)?,
            kind: UplinkKind::parse(kind).ok_or_else(unknown)?,
        }),
        ["dev", id, "down"] => Ok(ParsedTopic::Downlink {
            device: DeviceId::new(*id)?,
        }),
        ["model", digest, "chunks"] => Ok(ParsedTopic::ModelChunks {
            manifest_digest: parse_hex32(digest).ok_or_else(unknown)?,
        }),
        ["fleet", "keyring"] => Ok(ParsedTopic::Keyring),
        _ => Err(unknown()),
    }
}

/// Lower-case hex of a 32-byte digest.
pub fn hex32(d: &[u8; 32]) -> String {
    hex::encode(d)
}

/// Parses 64 hex digits into a digest.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_filters_stay_inside_the_integration_stream() {
        let gw = DeviceId::new("gw-1").unwrap();
        for ok in [
            json_filter_all(),
            "drover/v1/json/+/telemetry".into(),
            json_registration(&gw),
        ] {
            assert!(is_json_filter(&ok), "{ok}");
        }
        for bad in [
            "#".to_string(),
            "drover/#".into(),
            "drover/v1/#".into(),
            "drover/v1/+/gw-1/up/telemetry".into(),
            "drover/v1/json".into(),
            "drover/v1/json/".into(),
            "$share/g/drover/v1/json/#".into(),
            uplink(&gw, UplinkKind::Telemetry),
            downlink(&gw),
            keyring(),
            uplink_filter_all(),
        ] {
            assert!(!is_json_filter(&bad), "{bad}");
        }
    }

    #[test]
    fn device_id_refuses_wildcards_levels_nul_and_length() {
        assert_eq!(DeviceId::new(""), Err(TopicError::EmptyDeviceId));
        for (bad, ch) in [
            ("a+b", '+'),
            ("a#", '#'),
            ("a/b", '/'),
            ("a\0", '\0'),
            ("a b", ' '),
        ] {
            assert_eq!(DeviceId::new(bad), Err(TopicError::BadDeviceIdChar { ch }));
        }
        assert_eq!(
            DeviceId::new("x".repeat(65)),
            Err(TopicError::DeviceIdTooLong { len: 65 })
        );
        assert!(DeviceId::new("x".repeat(64)).is_ok());
        assert!(DeviceId::new("plant-a.gw_01:7").is_ok());
    }

    #[test]
    fn every_topic_round_trips_through_parse() {
        let d = DeviceId::new("dev-1").unwrap();
        for kind in UplinkKind::ALL {
            assert_eq!(
                parse(&uplink(&d, kind)).unwrap(),
                ParsedTopic::Uplink {
                    device: d.clone(),
                    kind
                }
            );
        }
        assert_eq!(
            parse(&downlink(&d)).unwrap(),
            ParsedTopic::Downlink { device: d }
        );
        let digest = [0xab; 32];
        assert_eq!(
            parse(&model_chunks(&digest)).unwrap(),
            ParsedTopic::ModelChunks {
                manifest_digest: digest
            }
        );
        assert_eq!(parse(&keyring()).unwrap(), ParsedTopic::Keyring);
    }

    #[test]
    fn malformed_topics_are_errors() {
        for t in [
            "",
            "drover/v1",
            "drover/v2/dev/a/up/hello",
            "drover/v1/dev/a/up/nope",
            "drover/v1/dev/a+/up/hello",
            "drover/v1/model/zz/chunks",
            "drover/v1/dev/a/up/hello/extra",
        ] {
            assert!(parse(t).is_err(), "{t}");
        }
    }
}
