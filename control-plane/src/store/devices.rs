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
/// Where a replaced device's sequence numbers stopped (see [`Store::replace_device_with`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplacedSeqs {
    /// The highest uplink sequence stored from the old device.
    pub max_uplink_seq: u64,
    /// The highest command sequence issued to the old device.
    pub max_command_seq: u64,
}

#[derive(Clone, Debug)]
pub struct DeviceAuth {
    pub id: DeviceId,
    pub key: DeviceKey,
    pub decommissioned: bool,
}

pub(super) const DEVICE_COLS: &str = "id, labels, enrolled_at_ms, decommissioned, arch, os, agent_version, last_seen_ms, online, active_model, staged_model, last_phase, reported_command_seq, max_uplink_seq, active_digest, labels_changed_at_ms, agent_labels, (SELECT p.detail FROM progress p WHERE p.device = devices.id ORDER BY p.seq DESC LIMIT 1)";

pub(super) fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
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
        let exists: Option<bool> = tx
            .query_row(
                "SELECT decommissioned FROM devices WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        match exists {
            Some(true) => return Err(StoreError::DeviceDecommissioned(id.to_string())),
            Some(false) => return Err(StoreError::DeviceExists(id.to_string())),
            None => {}
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

    /// Re-enrolls a decommissioned device's id for its replacement, in one transaction:
    /// the new key, `labels` (the old ones when `None`), the replacement's event, and
    /// state that described the old hardware cleared (online, models, phase, agent
    /// labels). History (telemetry, commands, progress, events) is kept. Returns where
    /// the old device's sequence numbers stopped, for the replacement's config: without
    /// them the control plane would take its first frames for replays, and it would act on
    /// commands issued to the device it replaces. `finish` runs inside the transaction
    /// (the certificate is issued there), as in [`Store::enroll_device_with`].
    pub fn replace_device_with<T, E>(
        &mut self,
        id: &DeviceId,
        key: &DeviceKey,
        labels: Option<&BTreeMap<String, String>>,
        event: &DeviceEventRow,
        finish: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<(T, ReplacedSeqs), E>> {
        let tx = self.write_tx()?;
        let row: Option<(bool, i64, String)> = tx
            .query_row(
                "SELECT decommissioned, max_uplink_seq, labels FROM devices WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((decommissioned, max_uplink, old_labels)) = row else {
            return Err(StoreError::UnknownDevice(id.to_string()));
        };
        if !decommissioned {
            return Err(StoreError::DeviceActive(id.to_string()));
        }
        let max_command: Option<i64> = tx.query_row(
            "SELECT max(seq) FROM commands WHERE device = ?1",
            [id.as_str()],
            |r| r.get(0),
        )?;
        let labels_json = match labels {
            Some(l) => serde_json::to_string(l).unwrap_or_else(|_| "{}".into()),
            None => old_labels,
        };
        tx.execute(
            "UPDATE devices SET device_key = ?2, labels = ?3, enrolled_at_ms = ?4, decommissioned = 0, \
             online = 0, active_model = NULL, active_digest = NULL, staged_model = NULL, \
             staged_digest = NULL, last_phase = NULL, agent_labels = NULL, labels_changed_at_ms = ?4 \
             WHERE id = ?1",
            params![id.as_str(), &key.0[..], labels_json, i(event.at_ms)],
        )?;
        insert_event(&tx, id.as_str(), event)?;
        let done = match finish() {
            Ok(v) => v,
            // Dropping the transaction rolls the update back.
            Err(e) => return Ok(Err(e)),
        };
        tx.commit()?;
        let seqs = ReplacedSeqs {
            max_uplink_seq: u64::try_from(max_uplink).unwrap_or(0),
            max_command_seq: max_command.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        };
        Ok(Ok((done, seqs)))
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

    #[test]
    fn only_a_decommissioned_device_is_replaced_and_its_sequences_come_back() {
        use crate::store::ingest::tests::{frame, telemetry};
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        let labels = BTreeMap::from([("site".to_owned(), "a".to_owned())]);
        let id = DeviceId::new("gw-1").unwrap();
        s.enroll_device(&id, &DeviceKey([1; 32]), &labels, 7)
            .unwrap();
        s.apply_batch(&[frame("gw-1", 41, 9, telemetry(None, 41))])
            .unwrap();
        let event = |at_ms| DeviceEventRow {
            at_ms,
            kind: "replaced".into(),
            by: "ops".into(),
            detail: "new hardware".into(),
        };
        let ok = || Ok::<_, ()>(());
        let active = s.replace_device_with(&id, &DeviceKey([2; 32]), None, &event(8), ok);
        assert!(
            matches!(active, Err(StoreError::DeviceActive(_))),
            "{active:?}"
        );
        let unknown = s.replace_device_with(
            &DeviceId::new("gw-9").unwrap(),
            &DeviceKey([2; 32]),
            None,
            &event(8),
            ok,
        );
        assert!(matches!(unknown, Err(StoreError::UnknownDevice(_))));

        assert!(s.decommission_device("gw-1").unwrap());
        let again = s.enroll_device(&id, &DeviceKey([2; 32]), &labels, 8);
        assert!(matches!(again, Err(StoreError::DeviceDecommissioned(_))));
        // A failed finish leaves the device decommissioned with its old key.
        let failed = s
            .replace_device_with(&id, &DeviceKey([2; 32]), None, &event(9), || {
                Err::<(), _>("no CA")
            })
            .unwrap();
        assert!(failed.is_err());
        assert!(s.device("gw-1").unwrap().unwrap().decommissioned);

        let ((), seqs) = s
            .replace_device_with(&id, &DeviceKey([3; 32]), None, &event(10), ok)
            .unwrap()
            .unwrap();
        assert_eq!(seqs.max_uplink_seq, 41);
        assert_eq!(seqs.max_command_seq, 0);
        let d = s.device("gw-1").unwrap().unwrap();
        assert!(!d.decommissioned && !d.online);
        assert_eq!((d.labels, d.enrolled_at_ms), (labels, 10));
        let auth = s.device_auth().unwrap();
        assert_eq!(auth[0].key.0, [3; 32]);
        let kinds: Vec<String> = s
            .device_events("gw-1", 10)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["replaced"]);
    }
}
