//! The per-device chunk budget: the pure core that bounds how many chunk bytes one
//! device can make the server publish. A token bucket per device holding at most
//! `capacity` bytes, refilled at `capacity` per `window_ms`; a request is granted the
//! chunks its bucket covers and refused the rest. No I/O, no clock: time comes in as
//! `now_ms`.
//!
//! Chunk publishes go to a topic every downloading device reads, so without this bound a
//! few small requests repeated over many coalescing windows multiply into the whole model
//! again and again on every subscriber.

use std::collections::HashMap;

use drover_protocol::DeviceId;

/// Buckets kept before full (idle) ones are forgotten; an idle device's bucket is full,
/// so forgetting it changes no decision.
const MAX_TRACKED: usize = 100_000;

/// Tokens are kept in byte-milliseconds (bytes × `window_ms`), so refilling by elapsed
/// milliseconds loses no fraction of a byte between requests.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: u128,
    at_ms: u64,
}

/// Per-device token buckets of chunk bytes.
#[derive(Debug)]
pub struct DeviceBudget {
    capacity: u64,
    window_ms: u64,
    buckets: HashMap<DeviceId, Bucket>,
}

impl DeviceBudget {
    /// `capacity` bytes at most per device, refilled over `window_ms` (at least 1 ms).
    pub fn new(capacity: u64, window_ms: u64) -> Self {
        Self {
            capacity,
            window_ms: window_ms.max(1),
            buckets: HashMap::new(),
        }
    }

    fn full(&self) -> u128 {
        u128::from(self.capacity) * u128::from(self.window_ms)
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> u128 {
        let elapsed = u128::from(now_ms.saturating_sub(b.at_ms));
        (b.tokens + elapsed * u128::from(self.capacity)).min(self.full())
    }

    /// How many of `wanted` chunks of `chunk_bytes` each `device` may have now; their
    /// bytes are taken from its bucket. The rest are refused (the device asks again).
    pub fn grant(
        &mut self,
        device: &DeviceId,
        wanted: usize,
        chunk_bytes: u64,
        now_ms: u64,
    ) -> usize {
        let cost = u128::from(chunk_bytes.max(1)) * u128::from(self.window_ms);
        let tokens = match self.buckets.get(device) {
            Some(b) => self.refilled(*b, now_ms),
            None => self.full(),
        };
        let granted = usize::try_from(tokens / cost)
            .unwrap_or(usize::MAX)
            .min(wanted);
        let left = tokens - granted as u128 * cost;
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(device) {
            let cap = self.full();
            let full: Vec<DeviceId> = self
                .buckets
                .iter()
                .filter(|(_, b)| self.refilled(**b, now_ms) >= cap)
                .map(|(d, _)| d.clone())
                .collect();
            for d in full {
                self.buckets.remove(&d);
            }
        }
        self.buckets.insert(
            device.clone(),
            Bucket {
                tokens: left,
                at_ms: now_ms,
            },
        );
        granted
    }

    /// Devices tracked now (bounded by [`MAX_TRACKED`] plus the devices that are busy).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn a_flood_is_granted_the_capacity_and_nothing_more_within_the_window() {
        let mut b = DeviceBudget::new(10 * 1024, 10_000);
        let d = dev("gw-1");
        let mut granted = 0;
        for _ in 0..100 {
            granted += b.grant(&d, 64, 1024, 5_000);
        }
        assert_eq!(granted, 10, "10 KiB of 1 KiB chunks");
        assert_eq!(b.grant(&d, 64, 1024, 5_000), 0);
    }

    #[test]
    fn a_request_larger_than_the_bucket_is_granted_in_part() {
        let mut b = DeviceBudget::new(4 * 1024, 1_000);
        assert_eq!(b.grant(&dev("gw-1"), 3, 1024, 0), 3);
        assert_eq!(b.grant(&dev("gw-1"), 3, 1024, 0), 1);
    }

    #[test]
    fn the_bucket_refills_in_proportion_to_elapsed_time() {
        let mut b = DeviceBudget::new(10 * 1024, 10_000);
        let d = dev("gw-1");
        assert_eq!(b.grant(&d, 100, 1024, 0), 10);
        assert_eq!(b.grant(&d, 100, 1024, 999), 0, "not a whole chunk yet");
        assert_eq!(b.grant(&d, 100, 1024, 1_000), 1);
        assert_eq!(b.grant(&d, 100, 1024, 3_000), 2);
        // A long idle time refills up to the capacity, never beyond.
        assert_eq!(b.grant(&d, 100, 1024, 1_000_000), 10);
    }

    #[test]
    fn devices_have_separate_budgets() {
        let mut b = DeviceBudget::new(2048, 10_000);
        assert_eq!(b.grant(&dev("gw-1"), 5, 1024, 0), 2);
        assert_eq!(b.grant(&dev("gw-2"), 5, 1024, 0), 2);
        assert_eq!(b.grant(&dev("gw-1"), 5, 1024, 0), 0);
    }

    #[test]
    fn a_chunk_larger_than_the_capacity_is_never_granted_and_a_clock_going_back_refills_nothing() {
        let mut b = DeviceBudget::new(1000, 1_000);
        assert_eq!(b.grant(&dev("gw-1"), 1, 1024, 0), 0);
        let mut b = DeviceBudget::new(2048, 1_000);
        assert_eq!(b.grant(&dev("gw-1"), 2, 1024, 5_000), 2);
        assert_eq!(b.grant(&dev("gw-1"), 2, 1024, 1_000), 0);
    }

    #[test]
    fn idle_devices_are_forgotten_when_many_are_tracked() {
        let mut b = DeviceBudget::new(1024, 1_000);
        for i in 0..MAX_TRACKED {
            b.grant(&dev(&format!("d{i}")), 1, 1024, 0);
        }
        assert_eq!(b.tracked(), MAX_TRACKED);
        // A second later every bucket is full again: all of them may go.
        assert_eq!(b.grant(&dev("late"), 1, 1024, 1_000), 1);
        assert_eq!(b.tracked(), 1);
    }
}
