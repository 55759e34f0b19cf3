//! Devices: enrollment, decommissioning, the keys the ingest and broker-auth cache hold,
//! and the device rows the API lists. Uplinks update presence and models in `ingest.rs`.

use std::collections::BTreeMap;

use drover_protocol::{DeviceId, DeviceKey};
use rusqlite::{params, OptionalExtension};

use super::{i, opt_u64, u64_at, Result, Store, StoreError};

/// A device as the store knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRow {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at_ms: u64,
    pub decommissioned: bool,
    pub arch: Option<String>,
    pub os: Option<String>,
    pub agent_version: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub online: bool,
    pub active_model: Option<String>,
    pub staged_model: Option<String>,
    pub last_phase: Option<String>,
    pub reported_command_seq: u64,
    pub max_uplink_seq: u64,
    /// Manifest digest (hex) of the active model.
    pub active_digest: Option<String>,
    /// The detail of the device's latest progress report (why a deploy failed).
    pub last_detail: Option<String>,
    /// When an operator last changed the labels (`drover device label`).
    pub labels_changed_at_ms: Option<u64>,
    /// Labels the agent declares in its hello: shown, never used by selectors.
    pub agent_labels: BTreeMap<String, String>,
}

/// One line of a device's audit log: who did what to it, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceEventRow {
    pub at_ms: u64,
    pub kind: String,
    pub by: String,
    pub detail: String,
}

/// What ingest needs to authenticate a device.
#[derive(Clone, Debug)]
pub struct DeviceAuth {
    pub id: DeviceId,
    pub key: DeviceKey,
    pub decommissioned: bool,
}

const DEVICE_COLS: &str = "id, labels, enrolled_at_ms, decommissioned, arch, os, agent_version, last_seen_ms, online, active_model, staged_model, last_phase, reported_command_seq, max_uplink_seq, active_digest, labels_changed_at_ms, agent_labels, (SELECT p.detail FROM progress p WHERE p.device = devices.id ORDER BY p.seq DESC LIMIT 1)";

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    let labels: String = r.get(1)?;
    Ok(DeviceRow {
        id: r.get(0)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        enrolled_at_ms: u64_at(r, 2)?,
        decommissioned: r.get(3)?,
        arch: r.get(4)?,
        os: r.get(5)?,
        agent_version: r.get(6)?,
        last_seen_ms: opt_u64(r.get(7)?),
        online: r.get(8)?,
        active_model: r.get(9)?,
        staged_model: r.get(10)?,
        last_phase: r.get(11)?,
        reported_command_seq: u64_at(r, 12)?,
        max_uplink_seq: u64_at(r, 13)?,
        active_digest: r.get(14)?,
        labels_changed_at_ms: opt_u64(r.get(15)?),
        agent_labels: r
            .get::<_, Option<String>>(16)?
            .and_then(|l| serde_json::from_str(&l).ok())
            .unwrap_or_default(),
        last_detail: r.get(17)?,
    })
}

impl Store {
    pub fn enroll_device(
        &mut self,
        id: &DeviceId,
        key: &DeviceKey,
        labels: &BTreeMap<String, String>,
        now_ms: u64,
    ) -> Result<()> {
        self.enroll_device_with(id, key, labels, now_ms, || Ok::<_, StoreError>(()))?
    }

    /// Enrolls a device and runs `finish` (the fallible work that completes enrollment, such
    /// as issuing its certificate) inside the same transaction: the row is committed only if
    /// `finish` returns `Ok`, so a failed enrollment leaves nothing behind and the id can be
    /// enrolled again. `finish` does not run when the id is already enrolled.
    pub fn enroll_device_with<T, E>(
        &mut self,
        id: &DeviceId,
        key: &DeviceKey,
        labels: &BTreeMap<String, String>,
        now_ms: u64,
        finish: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<T, E>> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let tx = self.write_tx()?;
        let exists: Option<i64> = tx
            .query_row("SELECT 1 FROM devices WHERE id = ?1", [id.as_str()], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::DeviceExists(id.to_string()));
        }
        tx.execute(
            "INSERT INTO devices (id, device_key, labels, enrolled_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), &key.0[..], labels_json, i(now_ms)],
        )?;
        let done = match finish() {
            Ok(v) => v,
            // Dropping the transaction rolls the insert back.
            Err(e) => return Ok(Err(e)),
        };
        tx.commit()?;
        Ok(Ok(done))
    }

    /// Marks a device decommissioned; returns false when it is not enrolled.
    pub fn decommission_device(&mut self, id: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE devices SET decommissioned = 1, online = 0 WHERE id = ?1",
            [id],
        )?;
        Ok(n == 1)
    }

    /// Replaces a device's operator labels and records who did it, in one transaction;
    /// false when it is not enrolled.
    pub fn set_device_labels(
        &mut self,
        id: &str,
        labels: &BTreeMap<String, String>,
        now_ms: u64,
        event: &DeviceEventRow,
    ) -> Result<bool> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let tx = self.write_tx()?;
        let n = tx.execute(
            "UPDATE devices SET labels = ?2, labels_changed_at_ms = ?3 WHERE id = ?1",
            params![id, labels_json, i(now_ms)],
        )?;
        if n == 1 {
            insert_event(&tx, id, event)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    /// Appends a line to a device's audit log.
    pub fn record_device_event(&mut self, id: &str, event: &DeviceEventRow) -> Result<()> {
        insert_event(&self.conn, id, event)
    }

    /// A device's audit log, newest first.
    pub fn device_events(&self, id: &str, limit: u32) -> Result<Vec<DeviceEventRow>> {
        let mut st = self.conn.prepare(
            "SELECT at_ms, kind, by, detail FROM device_events WHERE device = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![id, limit], |r| {
            Ok(DeviceEventRow {
                at_ms: u64_at(r, 0)?,
                kind: r.get(1)?,
                by: r.get(2)?,
                detail: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every enrolled device's key, for the ingest and broker-auth cache.
    pub fn device_auth(&self) -> Result<Vec<DeviceAuth>> {
        let mut st = self
            .conn
            .prepare("SELECT id, device_key, decommissioned FROM devices")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, bool>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, key, decommissioned) = row?;
            let id = DeviceId::new(id).map_err(|e| StoreError::Corrupt {
                table: "devices",
                detail: e.to_string(),
            })?;
            let key: [u8; 32] = key.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                table: "devices",
                detail: format!("device {id} key is {} bytes", key.len()),
            })?;
            out.push(DeviceAuth {
                id,
                key: DeviceKey(key),
                decommissioned,
            });
        }
        Ok(out)
    }

    /// Presence is unknown after a restart: every device must say hello again.
    pub fn mark_all_offline(&mut self) -> Result<()> {
        self.conn
            .execute("UPDATE devices SET online = 0 WHERE online = 1", [])?;
        Ok(())
    }

    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {DEVICE_COLS} FROM devices ORDER BY id"))?;
        let rows = st.query_map([], device_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"),
                [id],
                device_from_row,
            )
            .optional()?)
    }
}

fn insert_event(conn: &rusqlite::Connection, id: &str, e: &DeviceEventRow) -> Result<()> {
    conn.execute(
        "INSERT INTO device_events (device, at_ms, kind, by, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, i(e.at_ms), e.kind, e.by, e.detail],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolled_devices_read_back_and_decommissioning_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        let labels = BTreeMap::from([("site".to_owned(), "a".to_owned())]);
        for (id, key) in [("gw-1", 1u8), ("gw-2", 2)] {
            let id = DeviceId::new(id).unwrap();
            s.enroll_device(&id, &DeviceKey([key; 32]), &labels, 7)
                .unwrap();
        }
        let again = s.enroll_device(
            &DeviceId::new("gw-1").unwrap(),
            &DeviceKey([1; 32]),
            &labels,
            8,
        );
        assert!(
            matches!(again, Err(StoreError::DeviceExists(_))),
            "{again:?}"
        );

        let d = s.device("gw-1").unwrap().unwrap();
        assert_eq!((d.labels, d.enrolled_at_ms), (labels.clone(), 7));
        assert!(!d.online && !d.decommissioned && d.last_seen_ms.is_none());
        assert!(s.device("gw-3").unwrap().is_none());
        let ids: Vec<String> = s.devices().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["gw-1", "gw-2"]);

        assert!(s.decommission_device("gw-2").unwrap());
        assert!(!s.decommission_device("gw-3").unwrap());
        let auth = s.device_auth().unwrap();
        let gw2 = auth.iter().find(|a| a.id.as_str() == "gw-2").unwrap();
        assert!(gw2.decommissioned && gw2.key.0 == [2; 32]);
        s.mark_all_offline().unwrap();
        assert!(s.device("gw-2").unwrap().unwrap().decommissioned);
    }
}
