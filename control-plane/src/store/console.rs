//! Reads for the web console (issue 21): one page of devices with the fleet's counts
//! aggregated in SQL (so the overview costs the same at 10 or 10,000 devices), and the
//! telemetry windows a device page charts, latency histograms included.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter};

use super::devices::{device_from_row, DEVICE_COLS};
use super::{i, u64_at, unpack_u64s, DeviceRow, Result, Store};

/// Which devices the overview lists; every part is optional and they combine with AND.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsoleDeviceQuery {
    /// A substring of the device id.
    pub search: Option<String>,
    /// An operator label that must equal a value (`site`, `plant-b`).
    pub label: Option<(String, String)>,
    /// `online`, `offline` or `decommissioned`.
    pub state: Option<String>,
    /// The active model (`name@version`).
    pub model: Option<String>,
    pub offset: u64,
    pub limit: u32,
}

/// One page of devices and the counts over every device the query matches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsoleDevicePage {
    pub devices: Vec<DeviceRow>,
    /// Devices the query matches (all pages).
    pub total: u64,
    /// Matched devices by `site` label (`""`: no site), by state, by active model.
    pub by_site: Vec<(String, u64)>,
    pub by_state: Vec<(String, u64)>,
    pub by_model: Vec<(String, u64)>,
}

/// One telemetry window for the device page's charts.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsoleTelemetryRow {
    pub window_end_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    /// Counts per `LATENCY_BUCKETS_US` bucket.
    pub latency_counts: Vec<u64>,
    /// Negative: unknown.
    pub cpu_percent: f64,
    pub mem_used_bytes: u64,
    /// 0: unknown.
    pub mem_total_bytes: u64,
}

const STATE_SQL: &str =
    "CASE WHEN decommissioned = 1 THEN 'decommissioned' WHEN online = 1 THEN 'online' ELSE 'offline' END";

impl ConsoleDeviceQuery {
    /// The WHERE clause and its parameters.
    fn clause(&self) -> (String, Vec<Value>) {
        let mut parts = vec!["1 = 1".to_owned()];
        let mut args: Vec<Value> = Vec::new();
        if let Some(s) = self.search.as_deref().filter(|s| !s.is_empty()) {
            // LIKE with the pattern's own wildcards escaped: a search is a plain substring.
            let esc = s
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            parts.push("id LIKE ? ESCAPE '\\'".into());
            args.push(Value::Text(format!("%{esc}%")));
        }
        if let Some((k, v)) = &self.label {
            parts.push(
                "EXISTS (SELECT 1 FROM json_each(devices.labels) j WHERE j.key = ? AND j.value = ?)"
                    .into(),
            );
            args.push(Value::Text(k.clone()));
            args.push(Value::Text(v.clone()));
        }
        if let Some(st) = self.state.as_deref().filter(|s| !s.is_empty()) {
            parts.push(format!("{STATE_SQL} = ?"));
            args.push(Value::Text(st.to_owned()));
        }
        if let Some(m) = self.model.as_deref().filter(|s| !s.is_empty()) {
            parts.push("active_model = ?".into());
            args.push(Value::Text(m.to_owned()));
        }
        (parts.join(" AND "), args)
    }
}

impl Store {
    /// One page of the devices `q` matches, by id, with counts over all of them.
    pub fn console_devices(&self, q: &ConsoleDeviceQuery) -> Result<ConsoleDevicePage> {
        let (clause, args) = q.clause();
        let mut page_args = args.clone();
        page_args.push(Value::Integer(i64::from(q.limit)));
        page_args.push(Value::Integer(i(q.offset)));
        let mut st = self.conn.prepare(&format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE {clause} ORDER BY id LIMIT ? OFFSET ?"
        ))?;
        let devices = st
            .query_map(params_from_iter(page_args.iter()), device_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let group = |expr: &str| -> Result<Vec<(String, u64)>> {
            let mut st = self.conn.prepare(&format!(
                "SELECT COALESCE({expr}, ''), COUNT(*) FROM devices WHERE {clause}
                 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50"
            ))?;
            let rows = st.query_map(params_from_iter(args.iter()), |r| {
                Ok((r.get::<_, String>(0)?, u64_at(r, 1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        };
        let by_site = group("json_extract(labels, '$.site')")?;
        let by_state = group(STATE_SQL)?;
        let by_model = group("active_model")?;
        let total: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM devices WHERE {clause}"),
            params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        Ok(ConsoleDevicePage {
            devices,
            total: total.max(0) as u64,
            by_site,
            by_state,
            by_model,
        })
    }

    /// A device's latest `limit` telemetry windows, oldest first (the order a chart reads).
    pub fn console_telemetry(&self, device: &str, limit: u32) -> Result<Vec<ConsoleTelemetryRow>> {
        let mut st = self.conn.prepare(
            "SELECT window_end_ms, inferences, errors, latency_counts, cpu_percent,
                    mem_used_bytes, mem_total_bytes
             FROM telemetry WHERE device = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![device, limit], |r| {
            Ok(ConsoleTelemetryRow {
                window_end_ms: u64_at(r, 0)?,
                inferences: u64_at(r, 1)?,
                errors: u64_at(r, 2)?,
                latency_counts: unpack_u64s(&r.get::<_, Vec<u8>>(3)?),
                cpu_percent: r.get(4)?,
                mem_used_bytes: u64_at(r, 5)?,
                mem_total_bytes: u64_at(r, 6)?,
            })
        })?;
        let mut v = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        v.reverse();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_protocol::{DeviceId, DeviceKey};

    use super::*;

    fn fleet(n: usize) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        for k in 0..n {
            let site = if k % 3 == 0 { "plant-a" } else { "plant-b" };
            let labels = BTreeMap::from([("site".to_owned(), site.to_owned())]);
            let id = DeviceId::new(format!("gw-{k:04}")).unwrap();
            s.enroll_device(&id, &DeviceKey([1; 32]), &labels, 1)
                .unwrap();
        }
        (dir, s)
    }

    #[test]
    fn pages_follow_the_id_order_and_counts_cover_every_match() {
        let (_d, s) = fleet(10);
        let q = ConsoleDeviceQuery {
            limit: 4,
            offset: 4,
            ..Default::default()
        };
        let p = s.console_devices(&q).unwrap();
        let ids: Vec<_> = p.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["gw-0004", "gw-0005", "gw-0006", "gw-0007"]);
        assert_eq!(p.total, 10);
        assert_eq!(
            p.by_site,
            [("plant-b".to_owned(), 6), ("plant-a".to_owned(), 4)]
        );
        assert_eq!(p.by_state, [("offline".to_owned(), 10)]);
        let q = ConsoleDeviceQuery {
            label: Some(("site".into(), "plant-a".into())),
            search: Some("00".into()),
            limit: 50,
            ..Default::default()
        };
        let p = s.console_devices(&q).unwrap();
        let ids: Vec<_> = p.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["gw-0000", "gw-0003", "gw-0006", "gw-0009"]);
        assert_eq!(p.total, 4);
    }

    #[test]
    fn a_search_is_a_plain_substring_not_a_pattern() {
        let (_d, s) = fleet(3);
        let q = ConsoleDeviceQuery {
            search: Some("gw_%".into()),
            limit: 50,
            ..Default::default()
        };
        assert_eq!(s.console_devices(&q).unwrap().total, 0);
    }
}
