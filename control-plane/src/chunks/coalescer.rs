//! The chunk coalescer: the pure core of chunk serving. Requests for one chunk within a
//! window collapse into one publish. No I/O, no clock: time comes in as `now_ms`.

use std::collections::BTreeMap;

use drover_protocol::trust::Digest;

/// Pure core: which chunks are due for publishing at `now`. Clock passed in.
#[derive(Debug, Default)]
pub struct Coalescer {
    window_ms: u64,
    /// (model, chunk) → when it was first requested in the current window.
    pending: BTreeMap<(Digest, u32), u64>,
}

impl Coalescer {
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms,
            pending: BTreeMap::new(),
        }
    }

    /// Records a request; a chunk already pending is not queued twice.
    pub fn request(&mut self, digest: Digest, index: u32, now_ms: u64) {
        self.pending.entry((digest, index)).or_insert(now_ms);
    }

    /// Removes and returns the chunks whose window has closed.
    pub fn due(&mut self, now_ms: u64) -> Vec<(Digest, u32)> {
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, t)| now_ms >= t.saturating_add(self.window_ms))
            .map(|(k, _)| *k)
            .collect();
        for k in &due {
            self.pending.remove(k);
        }
        due
    }

    /// When the next window closes, if anything is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending
            .values()
            .min()
            .map(|t| t.saturating_add(self.window_ms))
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_for_one_chunk_within_a_window_are_published_once() {
        let mut c = Coalescer::new(100);
        for dev in 0..20u64 {
            c.request([1; 32], 0, 1_000 + dev);
            c.request([1; 32], 1, 1_000 + dev);
        }
        assert!(c.due(1_099).is_empty());
        assert_eq!(c.next_deadline(), Some(1_100));
        assert_eq!(c.due(1_100), vec![([1; 32], 0), ([1; 32], 1)]);
        assert!(c.is_empty());
        c.request([1; 32], 0, 2_000);
        assert_eq!(c.due(2_100).len(), 1);
    }
}
