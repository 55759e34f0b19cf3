//! The ACL of the embedded broker's TLS front (rumqttd has none): what each identity may
//! publish and subscribe to. A device: its own topics. A read-only integration
//! (`drover integration create`): subscribe inside the JSON stream, publish nothing.

use drover_protocol::topics::{self, ParsedTopic};
use drover_protocol::DeviceId;

use super::BrokerAuth;

/// Who a front session speaks for: a device, or a read-only integration. The two never
/// mix: an integration's CN has an `@`, which no device id has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Principal {
    Device(DeviceId),
    Integration,
}

impl Principal {
    /// The ACL of the embedded broker (rumqttd has none): a device publishes only on its
    /// own uplink topics (last will included); an integration publishes nowhere.
    pub(super) fn may_publish(&self, topic: &str) -> bool {
        match self {
            Principal::Device(device) => matches!(
                topics::parse(topic),
                Ok(ParsedTopic::Uplink { device: d, .. }) if d == *device
            ),
            Principal::Integration => false,
        }
    }

    /// A device subscribes only to its own downlink, the keyring and model chunk topics
    /// (by digest: no wildcards); an integration only inside the JSON stream.
    pub(super) fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Principal::Device(device) => match topics::parse(filter) {
                Ok(ParsedTopic::Downlink { device: d }) => d == *device,
                Ok(ParsedTopic::Keyring) | Ok(ParsedTopic::ModelChunks { .. }) => true,
                _ => false,
            },
            Principal::Integration => topics::is_json_filter(filter),
        }
    }

    /// Still allowed in (not decommissioned, not revoked).
    pub(super) fn active(&self, auth: &BrokerAuth, identity: &str) -> bool {
        match self {
            Principal::Device(device) => auth.devices.key(device).is_some(),
            Principal::Integration => identity
                .strip_prefix(crate::pki::INTEGRATION_CN_PREFIX)
                .is_some_and(|name| auth.devices.integration_active(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_allows_own_topics_only_and_no_wildcards() {
        let a = DeviceId::new("gw-a").unwrap();
        let b = DeviceId::new("gw-b").unwrap();
        let pa = Principal::Device(a.clone());
        assert!(pa.may_publish(&topics::uplink(&a, topics::UplinkKind::Labels)));
        assert!(!pa.may_publish(&topics::uplink(&b, topics::UplinkKind::Labels)));
        assert!(!pa.may_publish(&topics::downlink(&a)));
        assert!(!pa.may_publish(&topics::keyring()));
        assert!(pa.may_subscribe(&topics::downlink(&a)));
        assert!(pa.may_subscribe(&topics::keyring()));
        assert!(pa.may_subscribe(&topics::model_chunks(&[3; 32])));
        assert!(!pa.may_subscribe(&topics::downlink(&b)));
        for wild in [
            "#",
            "drover/#",
            "drover/v1/dev/+/down",
            "drover/v1/model/+/chunks",
            "drover/v1/json/#",
        ] {
            assert!(!pa.may_subscribe(wild), "{wild}");
        }
    }

    #[test]
    fn an_integration_reads_the_json_stream_and_nothing_else() {
        let a = DeviceId::new("gw-a").unwrap();
        let i = Principal::Integration;
        assert!(i.may_subscribe(&topics::json_filter_all()));
        assert!(i.may_subscribe("drover/v1/json/+/telemetry"));
        assert!(i.may_subscribe(&topics::json_registration(&a)));
        for other in [
            "#".to_string(),
            "drover/#".into(),
            topics::uplink_filter_all(),
            topics::uplink(&a, topics::UplinkKind::Telemetry),
            topics::downlink(&a),
            "drover/v1/dev/+/down".into(),
            topics::keyring(),
            topics::model_chunks(&[3; 32]),
            "drover/v1/model/+/chunks".into(),
        ] {
            assert!(!i.may_subscribe(&other), "{other}");
        }
        for topic in [
            topics::json_uplink(&a, topics::UplinkKind::Telemetry),
            topics::uplink(&a, topics::UplinkKind::Telemetry),
            topics::downlink(&a),
            topics::keyring(),
        ] {
            assert!(!i.may_publish(&topic), "{topic}");
        }
    }
}
