//! Everything the control plane sends to devices: MAC'd downlinks (acks, hello replies,
//! signed commands), the retained keyring, model chunks. The only code that publishes;
//! services hand it protocol values, never topic strings or frames.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use drover_host::clock::SharedClock;
use drover_protocol::envelope::{check_downlink_len, encode_keyring, seal_downlink, DownlinkFrame};
use drover_protocol::messages::{Downlink, UplinkAck};
use drover_protocol::topics;
use drover_protocol::trust::Digest;
use drover_protocol::{DeviceId, SignedBlob};
use rumqttc::QoS;

use super::devices::Devices;
use crate::metrics::Metrics;
use crate::mqtt::{Lane, MqttError, MqttLink};

/// Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    mqtt: Arc<MqttLink>,
    devices: Devices,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(
        mqtt: Arc<MqttLink>,
        devices: Devices,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            mqtt,
            devices,
            clock,
            metrics,
        }
    }

    /// Seals `msg` with the device's key and publishes it on its downlink topic. An
    /// unknown or decommissioned device gets nothing; a failed publish is logged (the
    /// caller's state is already persisted, and republishing is its own policy).
    ///
    /// A sealed frame above `MAX_DOWNLINK_LEN` is never published (every device would
    /// refuse it): it is logged and counted (`downlinks_too_large`). Publish and deploy
    /// refuse such a manifest with the figures before a command exists, so this is the
    /// last guard, not the operator's error message.
    pub async fn send(&self, device: &DeviceId, msg: Downlink) {
        self.send_on(Lane::Control, device, msg).await;
    }

    async fn send_on(&self, lane: Lane, device: &DeviceId, msg: Downlink) {
        let Some(key) = self.devices.key(device) else {
            return;
        };
        let frame = seal_downlink(
            &key,
            &DownlinkFrame {
                device: device.clone(),
                sent_at_ms: self.clock.unix_ms(),
                msg,
            },
        );
        if let Err(e) = check_downlink_len(&frame) {
            self.metrics.downlinks_too_large.fetch_add(1, Relaxed);
            tracing::error!(device_id = %device, error = %e, "downlink not sent");
            return;
        }
        if let Err(e) = self
            .mqtt
            .publish(
                lane,
                topics::downlink(device),
                frame,
                QoS::AtLeastOnce,
                false,
            )
            .await
        {
            tracing::warn!(device_id = %device, error = %e, "downlink publish failed");
        }
    }

    /// Publishes a signed command to its device (after the caller persisted it).
    pub async fn send_command(&self, device: &DeviceId, blob: SignedBlob) {
        self.send(device, Downlink::Command(blob)).await;
    }

    /// Acknowledges stored uplink sequence ranges to a device.
    pub async fn send_acks(&self, device: &DeviceId, ranges: Vec<(u64, u64)>) {
        self.send_on(
            Lane::Bulk,
            device,
            Downlink::UplinkAck(UplinkAck { ranges }),
        )
        .await;
        self.metrics.acks_sent.fetch_add(1, Relaxed);
    }

    /// Publishes the keyring, retained, so a device gets it the moment it subscribes.
    pub async fn publish_keyring(&self, keyring: &SignedBlob) -> Result<(), MqttError> {
        self.mqtt
            .publish(
                Lane::Control,
                topics::keyring(),
                encode_keyring(keyring),
                QoS::AtLeastOnce,
                true,
            )
            .await
    }

    /// Publishes one integration stream record (QoS 0: readers are not devices; a lost
    /// record is not resent). Failures are counted, not retried.
    pub async fn publish_json(&self, topic: String, json: Vec<u8>, retain: bool) {
        // JSON of a large uplink (samples as decimal text) can outgrow the broker's payload
        // limit: refused here with its size, as for downlinks, not by the broker.
        let limit = drover_protocol::envelope::MAX_BROKER_PAYLOAD;
        if json.len() > limit {
            self.metrics.json_failed.fetch_add(1, Relaxed);
            tracing::warn!(
                topic,
                bytes = json.len(),
                limit,
                "integration record too large; not published"
            );
            return;
        }
        match self
            .mqtt
            .publish(Lane::Bulk, topic, json, QoS::AtMostOnce, retain)
            .await
        {
            Ok(()) => self.metrics.json_published.fetch_add(1, Relaxed),
            Err(_) => self.metrics.json_failed.fetch_add(1, Relaxed),
        };
    }

    /// Publishes one encoded chunk frame on the model's shared chunk topic.
    pub async fn publish_chunk(&self, model: &Digest, frame: Vec<u8>) -> Result<(), MqttError> {
        let len = frame.len() as u64;
        self.mqtt
            .publish(
                Lane::Chunks,
                topics::model_chunks(model),
                frame,
                QoS::AtLeastOnce,
                false,
            )
            .await?;
        self.metrics.chunk_publishes.fetch_add(1, Relaxed);
        self.metrics.chunk_bytes.fetch_add(len, Relaxed);
        Ok(())
    }
}
