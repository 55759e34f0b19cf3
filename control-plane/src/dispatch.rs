//! Sends what ingest asks for once frames are stored: coalesced uplink acks, hello
//! replies (version, keyring, the pending command), and chunk requests handed on to the
//! chunk server. Runs until ingest's event channel closes, then flushes the last acks.

use std::collections::HashMap;
use std::time::Duration;

use drover_protocol::messages::{Downlink, HelloAck};
use drover_protocol::DeviceId;
use tokio::sync::mpsc;

use crate::app::App;
use crate::chunks::ChunkEvent;
use crate::ingest::{self, Event};

async fn flush_acks(app: &App, acks: &mut HashMap<DeviceId, Vec<u64>>) {
    for (device, mut seqs) in acks.drain() {
        app.outbox
            .send_acks(&device, ingest::ranges(&mut seqs))
            .await;
    }
}

/// Runs the dispatcher until `events` closes.
pub async fn run(
    mut events: mpsc::UnboundedReceiver<Event>,
    app: App,
    chunk_tx: mpsc::UnboundedSender<ChunkEvent>,
    ack_interval: Duration,
) {
    let mut acks: HashMap<DeviceId, Vec<u64>> = HashMap::new();
    let mut tick = tokio::time::interval(ack_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => {
                    flush_acks(&app, &mut acks).await;
                    return;
                }
                Some(Event::Acks(v)) => {
                    for (d, s) in v {
                        acks.entry(d).or_default().extend(s);
                    }
                }
                Some(Event::Chunks { device, request }) => {
                    let _ = chunk_tx.send(ChunkEvent::Asked(device, request));
                }
                Some(Event::Json(records)) => {
                    for (topic, json, retain) in records {
                        app.outbox.publish_json(topic, json, retain).await;
                    }
                }
                Some(Event::Hello { device, negotiated, stored_up_to, pending_commands, .. }) => {
                    let _ = chunk_tx.send(ChunkEvent::Reconnected(device.clone()));
                    let Ok(protocol_version) = negotiated else { continue };
                    reply_to_hello(&app, &device, protocol_version, stored_up_to, pending_commands).await;
                }
            },
            _ = tick.tick() => {
                if !acks.is_empty() {
                    flush_acks(&app, &mut acks).await;
                }
            }
        }
    }
}

async fn reply_to_hello(
    app: &App,
    device: &DeviceId,
    protocol_version: u16,
    stored_up_to: u64,
    pending_commands: Vec<drover_protocol::SignedBlob>,
) {
    let out = &app.outbox;
    out.send(
        device,
        Downlink::HelloAck(HelloAck {
            protocol_version,
            server_time_ms: app.clock.unix_ms(),
            stored_up_to,
        }),
    )
    .await;
    // Always offered: re-offering the accepted keyring is harmless, and a device that
    // missed the retained copy catches up here.
    out.send(
        device,
        Downlink::Keyring(app.keys.current().keyring_blob.clone()),
    )
    .await;
    for cmd in pending_commands {
        out.send_command(device, cmd).await;
    }
}
