//! How many connections the mutual-TLS front relays at once. Each costs three of the
//! process's open files: the device's socket and both ends of the front's loopback link
//! to rumqttd. Past the open-file limit rumqttd's own accept fails, and it retries at
//! once and logs every failure: at 6,600 devices under a 20,000-file limit that was
//! 2.3 million log lines (375 MB) in seconds, and the devices beyond the limit were
//! never told why (BENCHMARKS.md, "Embedded broker"). So the front refuses a
//! connection at accept, before its handshake, once the files left would not carry it,
//! counts it (`drover_broker_refused_total{reason="capacity"}`) and says which limit
//! to raise.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Open files one relayed connection holds.
pub const FILES_PER_CONNECTION: u64 = 3;

/// Open files kept for everything else: SQLite and its WAL, model files being read or
/// written, the HTTP API's connections, the control plane's own MQTT sessions, the
/// listeners and logs.
pub const FILE_RESERVE: u64 = 512;

/// Connections the front may relay with `open_files` (the soft open-file limit) available.
pub fn for_open_files(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_sub(FILE_RESERVE) / FILES_PER_CONNECTION)
        .unwrap_or(usize::MAX)
}

/// The process's soft open-file limit (`None`: unlimited, or not a Unix).
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A count of relayed connections against a maximum.
#[derive(Debug)]
pub struct Capacity {
    open: AtomicUsize,
    max: usize,
}

/// One relayed connection's place; given back on drop.
#[derive(Debug)]
pub struct Place(Arc<Capacity>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

impl Capacity {
    pub fn new(max: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// `configured` connections, or (0) as many as the open-file limit carries.
    pub fn configured_or_from_limit(configured: usize) -> Self {
        let max = match configured {
            0 => open_file_limit().map_or(usize::MAX, for_open_files),
            n => n,
        };
        Self::new(max)
    }

    /// A place for one more connection, if the maximum is not reached.
    pub fn enter(self: &Arc<Self>) -> Option<Place> {
        self.open
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Place(Arc::clone(self)))
    }

    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_given_back_on_drop() {
        let c = Arc::new(Capacity::new(2));
        let a = c.enter().unwrap();
        let b = c.enter().unwrap();
        assert!(c.enter().is_none());
        assert_eq!(c.open(), 2);
        drop(a);
        let _again = c.enter().unwrap();
        assert!(c.enter().is_none());
        drop(b);
        assert_eq!(c.open(), 1);
    }

    #[test]
    fn the_open_file_limit_sizes_the_front() {
        // This sandbox's 20,000: 6,496 devices, where rumqttd began to spin at 6,646.
        assert_eq!(for_open_files(20_000), 6_496);
        assert_eq!(for_open_files(1_048_576), 349_354);
        assert_eq!(for_open_files(100), 0);
    }
}
