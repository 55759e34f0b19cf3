//! Model slots (protocol 2): every named model a device holds, from its `Models` reports,
//! and the protocol version it negotiated in its hello. A report replaces the device's
//! slots whole; an older report that arrives late (a resent frame) is ignored.

use std::collections::HashMap;

use drover_protocol::messages::{ModelBudget, ModelRef, ModelsReport, RuntimeReport};
use drover_protocol::topics::hex32;
use rusqlite::{params, Connection, OptionalExtension};

use super::{i, opt_u64, Result, Store};

/// One model slot of a device, as its latest report gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    pub name: String,
    /// `name@version` of each model, when the slot has one.
    pub active: Option<String>,
    pub active_digest: Option<String>,
    pub previous: Option<String>,
    pub staged: Option<String>,
    pub shadow: Option<String>,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
}

fn text(m: &Option<ModelRef>) -> Option<String> {
    m.as_ref().map(|m| format!("{}@{}", m.name, m.version))
}

/// What a device can load, as far as the control plane knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRuntime {
    /// It never said hello: nothing is known (its agent checks what it is sent).
    Unknown,
    /// Its agent negotiated a protocol before 3: a release that loads plain ONNX only.
    Onnx {
        protocol: u16,
    },
    /// Protocol 3, but its runtime report has not arrived yet in this session.
    Pending,
    Reported(RuntimeReport),
}

/// Stores the runtime a device reported (protocol 3).
pub(super) fn update_runtime(tx: &Connection, dev: &str, r: &RuntimeReport) -> Result<bool> {
    let json = serde_json::to_string(r).unwrap_or_default();
    tx.execute(
        "UPDATE devices SET runtime=?2 WHERE id=?1",
        params![dev, json],
    )?;
    Ok(true)
}

/// Stores a device's models report unless a newer one is stored; true when stored.
pub(super) fn update_models(
    tx: &Connection,
    dev: &str,
    seq: i64,
    r: &ModelsReport,
) -> Result<bool> {
    let newer: Option<i64> = tx
        .query_row("SELECT models_seq FROM devices WHERE id=?1", [dev], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    if newer.is_some_and(|s| s >= seq) {
        return Ok(false);
    }
    let budget = serde_json::json!({
        "max_models": r.budget.max_models,
        "memory_bytes": r.budget.memory_bytes,
        "disk_bytes": r.budget.disk_bytes,
    })
    .to_string();
    tx.execute(
        "UPDATE devices SET models_seq=?2, model_budget=?3 WHERE id=?1",
        params![dev, seq, budget],
    )?;
    tx.execute("DELETE FROM device_models WHERE device=?1", [dev])?;
    let mut ins = tx.prepare_cached(
        "INSERT OR REPLACE INTO device_models VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
    )?;
    for s in &r.slots {
        ins.execute(params![
            dev,
            s.name,
            text(&s.active),
            s.active.as_ref().map(|m| hex32(&m.digest)),
            text(&s.previous),
            text(&s.staged),
            text(&s.shadow),
            i(s.disk_bytes),
            i(s.memory_bytes),
        ])?;
    }
    Ok(true)
}

impl Store {
    /// The model slots a device last reported, by name. Empty for a device that speaks
    /// protocol 1 (its one model is in the device row).
    pub fn device_slots(&self, dev: &str) -> Result<Vec<SlotRow>> {
        let mut q = self.conn.prepare_cached(
            "SELECT name, active, active_digest, previous, staged, shadow, disk_bytes, memory_bytes
             FROM device_models WHERE device=?1 ORDER BY name",
        )?;
        let rows = q.query_map([dev], |r| {
            Ok(SlotRow {
                name: r.get(0)?,
                active: r.get(1)?,
                active_digest: r.get(2)?,
                previous: r.get(3)?,
                staged: r.get(4)?,
                shadow: r.get(5)?,
                disk_bytes: r.get::<_, i64>(6)?.max(0) as u64,
                memory_bytes: r.get::<_, i64>(7)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// For every device that reports slots (protocol 2): the active digest of its slot
    /// `name`, `None` when it holds no such model. Devices missing here hold one model,
    /// the one in their device row.
    pub fn slot_actives(&self, name: &str) -> Result<HashMap<String, Option<String>>> {
        let mut q = self.conn.prepare_cached(
            "SELECT device, max(CASE WHEN name = ?1 THEN active_digest END)
             FROM device_models GROUP BY device",
        )?;
        let rows = q.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The budget a device last reported; `None` before its first models report.
    pub fn device_budget(&self, dev: &str) -> Result<Option<ModelBudget>> {
        let raw: Option<String> = self
            .conn
            .query_row("SELECT model_budget FROM devices WHERE id=?1", [dev], |r| {
                r.get(0)
            })
            .optional()?
            .flatten();
        Ok(raw.and_then(|raw| {
            let v: serde_json::Value = serde_json::from_str(&raw).ok()?;
            let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
            Some(ModelBudget {
                max_models: n("max_models").and_then(|n| u32::try_from(n).ok()),
                memory_bytes: n("memory_bytes"),
                disk_bytes: n("disk_bytes"),
            })
        }))
    }

    /// Records the protocol version a device negotiated in its latest hello.
    pub fn set_device_protocol(&self, dev: &str, version: u16) -> Result<()> {
        self.conn.execute(
            "UPDATE devices SET protocol=?2 WHERE id=?1",
            params![dev, version],
        )?;
        Ok(())
    }

    /// What the device can load: from its runtime report, or its protocol.
    pub fn device_runtime(&self, dev: &str) -> Result<DeviceRuntime> {
        let row: Option<(Option<i64>, Option<String>)> = self
            .conn
            .query_row(
                "SELECT protocol, runtime FROM devices WHERE id=?1",
                [dev],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((Some(protocol), runtime)) = row else {
            return Ok(DeviceRuntime::Unknown);
        };
        let protocol = u16::try_from(protocol).unwrap_or(u16::MAX);
        Ok(match runtime.and_then(|j| serde_json::from_str(&j).ok()) {
            Some(r) => DeviceRuntime::Reported(r),
            None if protocol < 3 => DeviceRuntime::Onnx { protocol },
            None => DeviceRuntime::Pending,
        })
    }

    /// The protocol version a device negotiated; 1 for a device never seen (the floor
    /// every release speaks).
    pub fn device_protocol(&self, dev: &str) -> Result<u16> {
        let v: Option<u64> = self
            .conn
            .query_row("SELECT protocol FROM devices WHERE id=?1", [dev], |r| {
                r.get::<_, Option<i64>>(0).map(opt_u64)
            })
            .optional()?
            .flatten();
        Ok(v.and_then(|v| u16::try_from(v).ok()).unwrap_or(1))
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::messages::{SlotStatus, Uplink};

    use super::super::ingest::tests::{enrolled, frame, model_ref};
    use super::*;

    fn report(names: &[&str], disk: u64) -> Uplink {
        Uplink::Models(ModelsReport {
            slots: names
                .iter()
                .map(|n| SlotStatus {
                    name: (*n).into(),
                    active: Some(ModelRef {
                        name: (*n).into(),
                        ..model_ref(3)
                    }),
                    previous: None,
                    staged: None,
                    shadow: None,
                    disk_bytes: disk,
                    memory_bytes: 2 * disk,
                })
                .collect(),
            budget: ModelBudget {
                max_models: Some(3),
                memory_bytes: None,
                disk_bytes: Some(1 << 20),
            },
        })
    }

    #[test]
    fn a_models_report_replaces_the_slots_and_a_late_older_one_is_ignored() {
        let (_d, mut s) = enrolled(&["gw-1"]);
        assert!(s.device_slots("gw-1").unwrap().is_empty());
        assert_eq!(s.device_budget("gw-1").unwrap(), None);
        s.apply_batch(&[frame("gw-1", 5, 10, report(&["b", "a"], 100))])
            .unwrap();
        let names: Vec<String> = s
            .device_slots("gw-1")
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            s.device_slots("gw-1").unwrap()[0].active.as_deref(),
            Some("a@1.0.3")
        );
        assert_eq!(
            s.device_budget("gw-1").unwrap().unwrap().max_models,
            Some(3)
        );
        // A removed slot disappears with the next report.
        s.apply_batch(&[frame("gw-1", 7, 11, report(&["a"], 50))])
            .unwrap();
        let slots = s.device_slots("gw-1").unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!((slots[0].disk_bytes, slots[0].memory_bytes), (50, 100));
        // A resent older report (seq 6) must not bring "b" back.
        s.apply_batch(&[frame("gw-1", 6, 12, report(&["a", "b"], 1))])
            .unwrap();
        assert_eq!(s.device_slots("gw-1").unwrap().len(), 1);
        let actives = s.slot_actives("a").unwrap();
        assert_eq!(actives.get("gw-1"), Some(&Some(hex32(&[3; 32]))));
        assert_eq!(s.slot_actives("b").unwrap().get("gw-1"), Some(&None));
    }

    #[test]
    fn the_runtime_comes_from_the_report_or_the_protocol_and_a_hello_forgets_it() {
        use drover_protocol::messages::{ArtifactFormat, Hello};
        let (_d, s) = enrolled(&["gw-1"]);
        let mut s = s;
        assert_eq!(s.device_runtime("gw-1").unwrap(), DeviceRuntime::Unknown);
        s.set_device_protocol("gw-1", 2).unwrap();
        assert_eq!(
            s.device_runtime("gw-1").unwrap(),
            DeviceRuntime::Onnx { protocol: 2 }
        );
        s.set_device_protocol("gw-1", 3).unwrap();
        assert_eq!(s.device_runtime("gw-1").unwrap(), DeviceRuntime::Pending);
        let r = RuntimeReport {
            engine: "tract".into(),
            version: "0.23.9".into(),
            formats: vec![ArtifactFormat {
                format: "tract-nnef".into(),
                version: 1,
            }],
        };
        s.apply_batch(&[frame("gw-1", 5, 10, Uplink::Runtime(r.clone()))])
            .unwrap();
        assert_eq!(
            s.device_runtime("gw-1").unwrap(),
            DeviceRuntime::Reported(r)
        );
        let hello = Hello {
            agent_version: "0.4.0".into(),
            protocol_min: 1,
            protocol_max: 2,
            arch: "aarch64".into(),
            os: "linux".into(),
            labels: Default::default(),
            active: None,
            staged: None,
            last_command_seq: 0,
            keyring_version: 1,
        };
        s.apply_batch(&[frame("gw-1", 6, 11, Uplink::Hello(hello))])
            .unwrap();
        assert_eq!(s.device_runtime("gw-1").unwrap(), DeviceRuntime::Pending);
    }

    #[test]
    fn the_negotiated_protocol_defaults_to_1_and_is_recorded() {
        let (_d, s) = enrolled(&["gw-1"]);
        assert_eq!(s.device_protocol("gw-1").unwrap(), 1);
        assert_eq!(s.device_protocol("unknown").unwrap(), 1);
        s.set_device_protocol("gw-1", 2).unwrap();
        assert_eq!(s.device_protocol("gw-1").unwrap(), 2);
    }
}
