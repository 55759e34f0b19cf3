//! What devices reported, read back: raw telemetry and its hourly rollup (the API),
//! health windows, shadow reports and progress reports (the rollout driver's gates and
//! device states). `ingest.rs` writes all of it.

use drover_protocol::messages::Phase;
use rusqlite::params;

use super::ingest::parse_phase;
use super::{i, u, u64_at, unpack_u64s, Result, Store};

/// One raw telemetry window as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    /// Negative: unknown (`SystemFacts::CPU_UNKNOWN`, stored as sent).
    pub cpu_percent: f64,
    pub mem_used_bytes: u64,
    /// 0: memory unknown.
    pub mem_total_bytes: u64,
}

/// One telemetry window's health figures.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub model_digest: String,
    pub inferences: u64,
    pub errors: u64,
    pub latency_counts: Vec<u64>,
    /// Sum of the window's latencies, so quantiles can be placed inside a bucket.
    pub latency_sum_us: u64,
}

/// One shadow report as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub compared: u64,
    pub agreed: u64,
    pub active_latency: Vec<u64>,
    pub candidate_latency: Vec<u64>,
}

/// One progress report as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub command_seq: u64,
    /// `None` for a phase this build does not know.
    pub phase: Option<Phase>,
    pub detail: Option<String>,
}

fn health_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HealthRow> {
    Ok(HealthRow {
        device: r.get(0)?,
        seq: u64_at(r, 1)?,
        received_at_ms: u64_at(r, 2)?,
        model_digest: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        inferences: u64_at(r, 4)?,
        errors: u64_at(r, 5)?,
        latency_counts: unpack_u64s(&r.get::<_, Vec<u8>>(6)?),
        latency_sum_us: u64_at(r, 7)?,
    })
}

impl Store {
    /// Deletes raw telemetry received before `before_ms` (rollups are kept).
    pub fn prune_telemetry(&mut self, before_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM telemetry WHERE received_at_ms < ?1",
            [i(before_ms)],
        )?)
    }

    /// A device's latest `limit` telemetry windows, newest first.
    pub fn telemetry(&self, device: &str, limit: u32) -> Result<Vec<TelemetryRow>> {
        let mut st = self.conn.prepare(
            "SELECT device, seq, received_at_ms, window_start_ms, window_end_ms, inferences, errors, cpu_percent, mem_used_bytes,
                    mem_total_bytes
             FROM telemetry WHERE device = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![device, limit], |r| {
            Ok(TelemetryRow {
                device: r.get(0)?,
                seq: u64_at(r, 1)?,
                received_at_ms: u64_at(r, 2)?,
                window_start_ms: u64_at(r, 3)?,
                window_end_ms: u64_at(r, 4)?,
                inferences: u64_at(r, 5)?,
                errors: u64_at(r, 6)?,
                cpu_percent: r.get(7)?,
                mem_used_bytes: u64_at(r, 8)?,
                mem_total_bytes: u64_at(r, 9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn telemetry_count(&self) -> Result<u64> {
        Ok(u(self.conn.query_row(
            "SELECT count(*) FROM telemetry",
            [],
            |r| r.get::<_, i64>(0),
        )?))
    }

    /// Rollup windows summed over every bucket of a device.
    pub fn rollup_windows(&self, device: &str) -> Result<u64> {
        Ok(u(self.conn.query_row(
            "SELECT coalesce(sum(windows), 0) FROM telemetry_rollup WHERE device = ?1",
            [device],
            |r| r.get::<_, i64>(0),
        )?))
    }

    /// Telemetry windows of one model received since `since_ms` (for rollout gates).
    pub fn model_health_since(&self, digest: &str, since_ms: u64) -> Result<Vec<HealthRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, model_digest, inferences, errors, latency_counts, latency_sum_us
             FROM telemetry WHERE model_digest = ?1 AND received_at_ms >= ?2",
        )?;
        let rows = st.query_map(params![digest, i(since_ms)], health_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Telemetry windows of every model received in `[from_ms, to_ms)` (rollout baselines).
    pub fn health_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<HealthRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, model_digest, inferences, errors, latency_counts, latency_sum_us
             FROM telemetry WHERE received_at_ms >= ?1 AND received_at_ms < ?2 AND model_digest IS NOT NULL",
        )?;
        let rows = st.query_map(params![i(from_ms), i(to_ms)], health_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Shadow reports for a candidate received since `since_ms`.
    pub fn shadow_since(&self, candidate_digest: &str, since_ms: u64) -> Result<Vec<ShadowRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, compared, agreed, active_latency, candidate_latency
             FROM shadow WHERE candidate_digest = ?1 AND received_at_ms >= ?2",
        )?;
        let rows = st.query_map(params![candidate_digest, i(since_ms)], |r| {
            // Reports stored before migration 2 have no latency histograms.
            let latency = |idx| -> rusqlite::Result<Vec<u64>> {
                Ok(unpack_u64s(
                    &r.get::<_, Option<Vec<u8>>>(idx)?.unwrap_or_default(),
                ))
            };
            Ok(ShadowRow {
                device: r.get(0)?,
                seq: u64_at(r, 1)?,
                received_at_ms: u64_at(r, 2)?,
                compared: u64_at(r, 3)?,
                agreed: u64_at(r, 4)?,
                active_latency: latency(5)?,
                candidate_latency: latency(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Progress reports received since `since_ms`, in arrival order per device.
    pub fn progress_since(&self, since_ms: u64) -> Result<Vec<ProgressRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, command_seq, phase, detail FROM progress
             WHERE received_at_ms >= ?1 ORDER BY device, seq",
        )?;
        let rows = st.query_map([i(since_ms)], |r| {
            let phase: String = r.get(4)?;
            Ok(ProgressRow {
                device: r.get(0)?,
                seq: u64_at(r, 1)?,
                received_at_ms: u64_at(r, 2)?,
                command_seq: u64_at(r, 3)?,
                phase: parse_phase(&phase),
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A device's progress reports, newest `limit` in arrival order; only those for
    /// command `command_seq` when given.
    pub fn device_progress(
        &self,
        device: &str,
        command_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ProgressRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, command_seq, phase, detail FROM progress
             WHERE device = ?1 AND (?2 IS NULL OR command_seq = ?2) ORDER BY seq DESC LIMIT ?3",
        )?;
        let rows = st.query_map(params![device, command_seq.map(i), limit], |r| {
            let phase: String = r.get(4)?;
            Ok(ProgressRow {
                device: r.get(0)?,
                seq: u64_at(r, 1)?,
                received_at_ms: u64_at(r, 2)?,
                command_seq: u64_at(r, 3)?,
                phase: parse_phase(&phase),
                detail: r.get(5)?,
            })
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::messages::{LatencyHistogram, ShadowReport, Uplink};

    use super::super::ingest::tests::{enrolled, frame, model_ref, telemetry};

    #[test]
    fn health_and_shadow_rows_read_back_by_model_and_time() {
        let (_dir, mut s) = enrolled(&["gw-1", "gw-2"]);
        let mut lat = LatencyHistogram::new();
        lat.counts[1] = 7;
        let shadow = Uplink::Shadow(ShadowReport {
            active: model_ref(1),
            candidate: model_ref(2),
            compared: 20,
            agreed: 19,
            candidate_errors: 0,
            active_latency: lat.clone(),
            candidate_latency: LatencyHistogram::new(),
        });
        s.apply_batch(&[
            frame("gw-1", 1, 100, telemetry(Some(model_ref(1)), 1)),
            frame("gw-2", 1, 200, telemetry(Some(model_ref(2)), 1)),
            frame("gw-2", 2, 300, telemetry(None, 2)),
            frame("gw-2", 3, 300, shadow),
        ])
        .unwrap();

        let h = s.model_health_since(&"02".repeat(32), 0).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            (h[0].device.as_str(), h[0].inferences, h[0].errors),
            ("gw-2", 10, 1)
        );
        assert_eq!(h[0].latency_counts[3], 10);
        assert!(s
            .model_health_since(&"02".repeat(32), 201)
            .unwrap()
            .is_empty());
        // Windows without a model are not health of any model.
        let all = s.health_between(0, 1_000).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.health_between(150, 1_000).unwrap().len(), 1);

        let sh = s.shadow_since(&"02".repeat(32), 0).unwrap();
        assert_eq!(sh.len(), 1);
        assert_eq!((sh[0].compared, sh[0].agreed), (20, 19));
        assert_eq!(sh[0].active_latency, lat.counts);

        let t = s.telemetry("gw-2", 1).unwrap();
        assert_eq!((t.len(), t[0].seq, t[0].window_start_ms), (1, 2, 2000));
        assert_eq!(s.prune_telemetry(150).unwrap(), 1);
        assert_eq!(s.telemetry_count().unwrap(), 2);
        assert_eq!(
            s.rollup_windows("gw-1").unwrap(),
            1,
            "rollups outlive pruning"
        );
    }
}
