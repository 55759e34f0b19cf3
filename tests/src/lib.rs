//! `drover-tests`: end-to-end tests of the whole system (in `tests/`), and the helpers
//! they share: real outside peers (mosquitto) started on loopback, free ports, waiting.
//!
//! Layout:
//! - [`mosquitto`]: a real Debian mosquitto with password file, `%u` pattern ACLs and
//!   persistence, on a free loopback port, killed on drop.
//! - [`free_port`], [`wait_until`]: loopback port picking and bounded polling.

pub mod mosquitto;

use std::future::Future;
use std::time::Duration;

/// Picks a free loopback TCP port (for peers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Polls `check` until it returns `Some` or `timeout` passes. Returns what it found, or an
/// error naming `what` so a failing end-to-end test says which step never happened.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether tests that need a real outside peer must fail (CI) rather than skip (a quick
/// local loop on a machine without the peer installed).
pub fn peers_required() -> bool {
    std::env::var_os("DROVER_REQUIRE_PEERS").is_some_and(|v| v == "1")
}
