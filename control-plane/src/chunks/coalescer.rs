//! The chunk coalescer: the pure core of chunk serving. It decides when a requested chunk
//! is published on the model's shared topic, so that one publish serves every device
//! downloading the model and egress stays a small multiple of the model at any fleet
//! size. No I/O, no clock: time comes in as `now_ms`.
//!
//! Why not "one publish per request window": devices that start downloading at different
//! times (a wave's commands reach thousands of devices over seconds) and devices that
//! re-ask every 2 s while the broker is still delivering made the control plane publish
//! every chunk again and again (8-40 x the model, BENCHMARKS.md). Three rules instead:
//!
//! - **Covered requests wait.** A device subscribes to the chunk topic before it first asks
//!   (the agent's order), so a chunk published after a device's first request reached it
//!   or is on its way. Asking again for such a chunk (the agent re-asks after 2 s of
//!   silence) republishes nothing until [`RESEND_MS`] after its last publish; an ask
//!   after that is a need again (a device that lost it to a reconnect without a
//!   session, or behind a broker that has not delivered it yet). A device is "new" again after
//!   [`FORGET_MS`] without a request (it stopped downloading, or was offline), and at once
//!   when it reconnects ([`Coalescer::reconnected`], on its hello).
//! - **Needs are gathered until arrivals settle.** A chunk a device needs (never published
//!   since it first asked) is published once no new need has come for the quiet period
//!   (`chunk_window_ms`), at most the chunk's hold after the first need: a wave's devices
//!   arriving over a second or two share one publish.
//! - **The hold grows with demand.** A chunk needed again soon after a publish is not
//!   republished before its hold has passed since that publish; each publish in such a
//!   run doubles the hold, from [`HOLD_BASE_MS`] to [`HOLD_CAP_MS`]; needs that come
//!   back only after the hold start a new burst from the base (the next wave is not
//!   held back by the last one's stragglers). Paced or straggling arrivals then cost a few publishes, not one per
//!   quiet period.
//!
//! **Invariant:** a chunk a device asks for, and keeps asking for every 2 s as the agent
//! does, is published at most [`drover_protocol::messages::CHUNK_SERVE_BOUND_MS`] after
//! its first ask (the hold cap, or the resend delay plus one retry and the quiet period),
//! which the agent's give-up rule is sized for.

use std::collections::{BTreeMap, HashMap};

use drover_protocol::messages::CHUNK_SERVE_BOUND_MS;
use drover_protocol::trust::Digest;
use drover_protocol::DeviceId;

/// A chunk that already reached a device (published after its first request) is
/// republished for that device's renewed request only this long after its last publish.
/// The device keeps asking every 2 s; its first ask after this delay is a need (published
/// within the quiet period), so the bound holds with room for that ask and the quiet period.
pub const RESEND_MS: u64 = 16_000;
/// The first hold of a chunk needed again soon after a publish; doubled per publish.
pub const HOLD_BASE_MS: u64 = 2_000;
/// The longest hold.
pub const HOLD_CAP_MS: u64 = 16_000;
/// A device that asked nothing for this long is taken as new on its next request (three
/// of the agent's 2 s retries missed: it stopped downloading or was offline).
pub const FORGET_MS: u64 = 6_000;

/// The agent's retry interval (`drover_agent::machine::CHUNK_RETRY_MS`; the control plane
/// does not depend on the agent).
const AGENT_RETRY_MS: u64 = 2_000;

const _: () = assert!(
    HOLD_CAP_MS <= CHUNK_SERVE_BOUND_MS
        && RESEND_MS + AGENT_RETRY_MS + HOLD_BASE_MS <= CHUNK_SERVE_BOUND_MS
);

/// Devices and chunks remembered before idle ones are dropped (dropping one only makes a
/// later request count as a need: never a missed publish).
const MAX_TRACKED: usize = 100_000;

/// One chunk's publishing state.
#[derive(Clone, Copy, Debug, Default)]
struct Chunk {
    last_pub: Option<u64>,
    /// Publishes in the current run of renewed demand (the hold is `HOLD_BASE_MS << streak`).
    streak: u32,
    first_need: Option<u64>,
    last_need: Option<u64>,
    /// The waiting needs came within the hold of the last publish (demand goes on).
    run_on: bool,
}

impl Chunk {
    fn hold(&self) -> u64 {
        HOLD_BASE_MS
            .saturating_mul(1u64 << self.streak.min(16))
            .min(HOLD_CAP_MS)
    }

    /// When the waiting needs are published: once they settle (no new one for the quiet
    /// period), at most a hold after the first; in a run, not before a hold after the last
    /// publish.
    fn due(&self, quiet_ms: u64) -> Option<u64> {
        let (first, last) = (self.first_need?, self.last_need?);
        let settled = last
            .saturating_add(quiet_ms)
            .min(first.saturating_add(self.hold()));
        let spaced = match self.last_pub {
            Some(p) if self.run_on => p.saturating_add(self.hold()),
            _ => 0,
        };
        Some(settled.max(spaced))
    }

    /// A device needs the chunk at `now`.
    fn need(&mut self, now_ms: u64) {
        if self.first_need.is_none() {
            // Needed again within the hold of the last publish: the run of demand goes on
            // (spaced by the hold, which then doubles); otherwise a new burst starts.
            self.run_on = self
                .last_pub
                .is_some_and(|p| now_ms.saturating_sub(p) < self.hold());
            if !self.run_on {
                self.streak = 0;
            }
            self.first_need = Some(now_ms);
        }
        self.last_need = Some(now_ms);
    }

    fn published(&mut self, now_ms: u64) {
        if self.first_need.is_some() && self.run_on {
            self.streak = self.streak.saturating_add(1);
        }
        self.run_on = false;
        self.last_pub = Some(now_ms);
        self.first_need = None;
        self.last_need = None;
    }

    fn idle(&self, now_ms: u64) -> bool {
        self.first_need.is_none()
            && self
                .last_pub
                .is_none_or(|p| now_ms.saturating_sub(p) > RESEND_MS + FORGET_MS + HOLD_CAP_MS)
    }
}

/// When a device downloading a model first asked, and when it last asked.
#[derive(Clone, Copy, Debug)]
struct Seen {
    since: u64,
    last: u64,
}

/// Pure core: which chunks are due for publishing at `now`. Clock passed in.
#[derive(Debug, Default)]
pub struct Coalescer {
    quiet_ms: u64,
    chunks: BTreeMap<(Digest, u32), Chunk>,
    /// Per device, per model it is downloading.
    devices: HashMap<DeviceId, HashMap<Digest, Seen>>,
}

impl Coalescer {
    /// `quiet_ms`: how long no new need must come before a needed chunk is published.
    pub fn new(quiet_ms: u64) -> Self {
        Self {
            quiet_ms,
            chunks: BTreeMap::new(),
            devices: HashMap::new(),
        }
    }

    /// Records `device`'s request for chunks `indices` of model `digest`; returns how many
    /// of them it holds back (published to that device since its first ask). The rest are
    /// recorded as needs.
    pub fn request(
        &mut self,
        device: &DeviceId,
        digest: Digest,
        indices: &[u32],
        now_ms: u64,
    ) -> usize {
        let needed = self.ask(device, digest, indices, now_ms);
        self.need(digest, &needed, now_ms);
        indices.len() - needed.len()
    }

    /// Records that `device` asked for chunks `indices` of model `digest` and returns the
    /// ones it needs: those not published to it since its first ask. Records no need:
    /// the caller passes the ones it grants to [`Coalescer::need`] (held asks publish
    /// nothing, so they must cost the device no budget).
    pub fn ask(
        &mut self,
        device: &DeviceId,
        digest: Digest,
        indices: &[u32],
        now_ms: u64,
    ) -> Vec<u32> {
        if self.devices.len() >= MAX_TRACKED {
            self.devices.retain(|_, models| {
                models.retain(|_, s| now_ms.saturating_sub(s.last) <= FORGET_MS);
                !models.is_empty()
            });
        }
        let seen = self
            .devices
            .entry(device.clone())
            .or_default()
            .entry(digest)
            .or_insert(Seen {
                since: now_ms,
                last: now_ms,
            });
        if now_ms.saturating_sub(seen.last) > FORGET_MS || now_ms < seen.since {
            seen.since = now_ms;
        }
        seen.last = now_ms;
        let since = seen.since;
        indices
            .iter()
            .copied()
            .filter(|&index| match self.chunks.get(&(digest, index)) {
                // Strictly after: a publish in the same millisecond may have been routed
                // before the broker took the device's subscription.
                Some(Chunk {
                    last_pub: Some(p), ..
                }) => !(*p > since && now_ms < p.saturating_add(RESEND_MS)),
                _ => true,
            })
            .collect()
    }

    /// Records needs for chunks `indices` of model `digest` (published within the quiet
    /// period, or when their hold ends).
    pub fn need(&mut self, digest: Digest, indices: &[u32], now_ms: u64) {
        if self.chunks.len() >= MAX_TRACKED {
            self.chunks.retain(|_, c| !c.idle(now_ms));
        }
        for &index in indices {
            self.chunks.entry((digest, index)).or_default().need(now_ms);
        }
    }

    /// `device` (re)connected: what was published to it before may have been lost with
    /// its old connection, so its next asks are needs, not repeats. Without this a device
    /// reconnecting within [`FORGET_MS`] of its last ask waited up to a hold per chunk.
    pub fn reconnected(&mut self, device: &DeviceId) {
        self.devices.remove(device);
    }

    /// Marks the chunks due at `now` published and returns them, in (model, index) order.
    pub fn due(&mut self, now_ms: u64) -> Vec<(Digest, u32)> {
        let quiet = self.quiet_ms;
        let mut out = Vec::new();
        for (k, c) in self.chunks.iter_mut() {
            if c.due(quiet).is_some_and(|d| now_ms >= d) {
                c.published(now_ms);
                out.push(*k);
            }
        }
        out
    }

    /// When the next chunk falls due, if any is waiting.
    pub fn next_deadline(&self) -> Option<u64> {
        self.chunks
            .values()
            .filter_map(|c| c.due(self.quiet_ms))
            .min()
    }

    /// Whether no chunk is waiting.
    pub fn is_empty(&self) -> bool {
        self.next_deadline().is_none()
    }
}

#[cfg(test)]
#[path = "coalescer_tests.rs"]
mod tests;
