//! Time. [`SystemClock`] reads the wall clock (the only code in Drover that does);
//! [`ManualClock`] is set by tests and simulations. Pure cores never hold a clock: their
//! callers pass `now_ms` in.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch, from some source.
pub trait Clock: Debug + Send + Sync {
    fn unix_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(unix_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(unix_ms)))
    }

    pub fn set(&self, unix_ms: u64) {
        self.0.store(unix_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The shared handle services hold.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock as a shared handle.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// Wall-clock milliseconds since the epoch, for code at the edges (binaries, CLI, tests)
/// that has no clock handed to it.
pub fn now_ms() -> u64 {
    SystemClock.unix_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = ManualClock::new(1_000);
        let c2 = c.clone();
        assert_eq!(c.unix_ms(), 1_000);
        c.advance(500);
        assert_eq!(c2.unix_ms(), 1_500);
        c2.set(7);
        assert_eq!(c.unix_ms(), 7);
    }

    #[test]
    fn system_clock_is_after_2025() {
        assert!(SystemClock.unix_ms() > 1_735_689_600_000);
    }
}
