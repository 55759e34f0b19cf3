//! Sends what ingest asks for once frames are stored: coalesced uplink acks, hello
//! replies (version, keyring, the pending command), and chunk requests handed on to the
//! chunk server. Runs until ingest's event channel closes, then flushes the last acks.
//!
//! Acks and integration records are published by a task of their own (the bulk sender):
//! at 10,000 devices one ack flush is 10,000 publishes, and while the dispatcher awaited
//! them it forwarded no chunk request and answered no hello. Acks gathered while the bulk
//! sender is busy wait in the dispatcher and go out, merged, with its next flush.

use std::collections::HashMap;
use std::time::Duration;

use drover_protocol::messages::{Downlink, HelloAck};
use drover_protocol::DeviceId;
use tokio::sync::mpsc;

use crate::app::App;
use crate::chunks::ChunkEvent;
use crate::ingest::{self, Event};

type Acks = HashMap<DeviceId, Vec<u64>>;

/// Integration records: (topic, JSON, retain).
type Records = Vec<(String, Vec<u8>, bool)>;

/// Integration record batches queued for the bulk sender before the dispatcher waits.
const JSON_QUEUE: usize = 64;

/// Publishes acks and integration records until both channels close. The ack channel
/// holds one flush, so acks gathered meanwhile are merged in the dispatcher.
async fn bulk_sender(app: App, mut acks: mpsc::Receiver<Acks>, mut json: mpsc::Receiver<Records>) {
    let (mut acks_open, mut json_open) = (true, true);
    while acks_open || json_open {
        tokio::select! {
            a = acks.recv(), if acks_open => match a {
                None => acks_open = false,
                Some(a) => {
                    for (device, mut seqs) in a {
                        app.outbox
                            .send_acks(&device, ingest::ranges(&mut seqs))
                            .await;
                    }
                }
            },
            j = json.recv(), if json_open => match j {
                None => json_open = false,
                Some(records) => {
                    for (topic, json, retain) in records {
                        app.outbox.publish_json(topic, json, retain).await;
                    }
                }
            },
        }
    }
}

/// Hands the gathered acks to the bulk sender if it has room for them; otherwise they
/// stay in `acks` (more are merged in) until the next tick.
fn hand_over_acks(tx: &mpsc::Sender<Acks>, acks: &mut Acks) {
    if acks.is_empty() {
        return;
    }
    if let Ok(permit) = tx.try_reserve() {
        permit.send(std::mem::take(acks));
    }
}

/// Runs the dispatcher until `events` closes.
pub async fn run(
    mut events: mpsc::UnboundedReceiver<Event>,
    app: App,
    chunk_tx: mpsc::UnboundedSender<ChunkEvent>,
    ack_interval: Duration,
) {
    let (acks_tx, acks_rx) = mpsc::channel(1);
    let (json_tx, json_rx) = mpsc::channel(JSON_QUEUE);
    let bulk = tokio::spawn(bulk_sender(app.clone(), acks_rx, json_rx));
    let mut acks = Acks::new();
    let mut tick = tokio::time::interval(ack_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(Event::Acks(v)) => {
                    for (d, s) in v {
                        acks.entry(d).or_default().extend(s);
                    }
                }
                Some(Event::Chunks { device, request }) => {
                    let _ = chunk_tx.send(ChunkEvent::Asked(device, request));
                }
                Some(Event::Json(records)) => {
                    // Waits only when the bulk sender is `JSON_QUEUE` batches behind.
                    let _ = json_tx.send(records).await;
                }
                Some(Event::Hello { device, negotiated, stored_up_to, pending_commands, .. }) => {
                    let _ = chunk_tx.send(ChunkEvent::Reconnected(device.clone()));
                    let Ok(protocol_version) = negotiated else { continue };
                    reply_to_hello(&app, &device, protocol_version, stored_up_to, pending_commands).await;
                }
            },
            _ = tick.tick() => hand_over_acks(&acks_tx, &mut acks),
        }
    }
    // The last acks: waiting for room is fine now, nothing else is dispatched.
    if !acks.is_empty() {
        let _ = acks_tx.send(acks).await;
    }
    drop((acks_tx, json_tx));
    let _ = bulk.await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u8) -> DeviceId {
        DeviceId::new(format!("dev-{n}")).unwrap()
    }

    #[test]
    fn acks_wait_and_merge_while_the_bulk_sender_is_busy() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut acks = Acks::from([(dev(1), vec![1, 2])]);
        hand_over_acks(&tx, &mut acks);
        assert!(acks.is_empty(), "an idle sender takes the acks");

        // The sender is still publishing the first flush: the next acks stay here...
        acks.entry(dev(1)).or_default().push(3);
        hand_over_acks(&tx, &mut acks);
        acks.entry(dev(1)).or_default().push(4);
        acks.entry(dev(2)).or_default().push(1);
        hand_over_acks(&tx, &mut acks);
        assert_eq!(acks.len(), 2, "kept while the sender's slot is taken");

        // ...and go out merged, one publish per device, once it is free.
        assert_eq!(rx.try_recv().unwrap()[&dev(1)], vec![1, 2]);
        hand_over_acks(&tx, &mut acks);
        assert!(acks.is_empty());
        let merged = rx.try_recv().unwrap();
        assert_eq!(merged[&dev(1)], vec![3, 4]);
        assert_eq!(merged[&dev(2)], vec![1]);
        assert!(rx.try_recv().is_err());
    }
}
