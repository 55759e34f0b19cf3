//! Periodic upkeep: raw telemetry past retention is pruned (hourly rollups stay), and
//! the CRL is re-issued about daily so its nextUpdate stays a year ahead.

use std::time::Duration;

use tokio::sync::watch;

use crate::app::App;
use crate::store::Db;

const EVERY: Duration = Duration::from_secs(600);
/// CRL re-issue: every 144th round (about daily).
const CRL_EVERY_ROUNDS: u64 = 144;

/// Runs until `stop` turns true (or its sender is gone), finishing the round in progress.
pub async fn run(app: App, store: Db, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        prune(&app, &store).await;
        rounds += 1;
        if rounds % CRL_EVERY_ROUNDS == 0 {
            let a = app.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.write_crl_blocking()).await {
                tracing::warn!(error = %e, "cannot rewrite the CRL");
            }
        }
    }
}

async fn prune(app: &App, store: &Db) {
    let retention_ms =
        u64::try_from(app.settings.telemetry_retention.as_millis()).unwrap_or(u64::MAX);
    let cutoff = app.clock.unix_ms().saturating_sub(retention_ms);
    let r = store.run(move |s| s.prune_telemetry(cutoff)).await;
    match r {
        Ok(Ok(n)) if n > 0 => tracing::info!(rows = n, "pruned raw telemetry past retention"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune telemetry"),
        _ => {}
    }
}
