//! Fault injection for the crash tests: `--crash-at POINT:N` kills the agent with SIGKILL
//! the N-th time it passes the named point. Hidden from `--help`; a no-op unless armed.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

static ARMED: OnceLock<(String, u32)> = OnceLock::new();
static HITS: AtomicU32 = AtomicU32::new(0);

/// Arms one crash point from `POINT:N` (or `POINT`, meaning the first pass).
pub fn arm(spec: &str) -> Result<(), String> {
    let (point, n) = match spec.rsplit_once(':') {
        Some((p, n)) => (
            p,
            n.parse::<u32>()
                .map_err(|_| format!("crash point {spec:?}: N must be a number"))?,
        ),
        None => (spec, 1),
    };
    ARMED
        .set((point.to_owned(), n.max(1)))
        .map_err(|_| "a crash point is already armed".to_owned())
}

/// Marks a crash point. Kills the process (SIGKILL, like a power cut: no destructors, no
/// flushing) when armed for this point and this pass.
pub fn point(name: &str) {
    let Some((armed, n)) = ARMED.get() else {
        return;
    };
    if armed != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::warn!(point = name, "crash point reached: killing self");
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        std::process::abort();
    }
}
