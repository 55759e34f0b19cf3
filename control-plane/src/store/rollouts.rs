//! Rollouts: each rollout's header, its device slots and its report events, all JSON the
//! rollout driver produces and reads back (the store does not look inside), and the
//! atomic step that issues a step's commands and writes its state together.

use rusqlite::{params, OptionalExtension, Transaction};

use super::commands::{insert_command, next_command_seq};
use super::{i, u, CommandRow, Result, Store};

/// One rollout step's writes (JSON produced by the rollout driver).
#[derive(Clone, Debug, Default)]
pub struct RolloutWrite {
    pub header: String,
    pub status: String,
    /// Devices still in flight (a completed rollout with pending devices keeps ticking).
    pub pending: u64,
    pub now_ms: u64,
    /// Changed device slots: (device, slot JSON).
    pub slots: Vec<(String, String)>,
    /// New report events: (at_ms, kind, event JSON).
    pub events: Vec<(u64, String, String)>,
}

/// A rollout's header JSON and its device slots (device, slot JSON).
pub type RolloutRows = (String, Vec<(String, String)>);

impl Store {
    /// Creates a rollout; `header` builds its JSON state from the allocated id.
    pub fn create_rollout(
        &mut self,
        model_digest: &str,
        created_by: &str,
        now_ms: u64,
        header: impl FnOnce(u64) -> String,
    ) -> Result<u64> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO rollouts (model_digest, status, created_by, created_at_ms, updated_at_ms, header) VALUES (?1, 'running', ?2, ?3, ?3, '{}')",
            params![model_digest, created_by, i(now_ms)],
        )?;
        let id = u(tx.last_insert_rowid());
        tx.execute(
            "UPDATE rollouts SET header = ?2 WHERE id = ?1",
            params![i(id), header(id)],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Rollouts the driver must still tick: not rolled back, and either not completed or
    /// with devices still in flight (late devices are picked up after completion).
    pub fn open_rollouts(&self) -> Result<Vec<u64>> {
        let mut st = self.conn.prepare(
            "SELECT id FROM rollouts WHERE status IN ('running', 'paused', 'rolling-back') OR (status = 'completed' AND pending > 0) ORDER BY id",
        )?;
        let rows = st.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(u))
            .collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every rollout's header JSON, newest first.
    pub fn rollouts(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT header FROM rollouts ORDER BY id DESC")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A rollout's header JSON and its device slots (device, slot JSON).
    pub fn rollout(&self, id: u64) -> Result<Option<RolloutRows>> {
        let header: Option<String> = self
            .conn
            .query_row("SELECT header FROM rollouts WHERE id = ?1", [i(id)], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(header) = header else {
            return Ok(None);
        };
        let mut st = self.conn.prepare_cached(
            "SELECT device, slot FROM rollout_devices WHERE rollout_id = ?1 ORDER BY device",
        )?;
        let rows = st.query_map([i(id)], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Some((header, rows.collect::<rusqlite::Result<Vec<_>>>()?)))
    }

    /// A rollout's report events (JSON), oldest first.
    pub fn rollout_events(&self, id: u64) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT event FROM rollout_events WHERE rollout_id = ?1 ORDER BY n")?;
        let rows = st.query_map([i(id)], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Applies one engine step in a single transaction: issues the commands (each device's
    /// next sequence, signed by `build`), then writes the state `finish` returns given the
    /// issued `(device, seq)` pairs. A crash leaves either all of it or none, so a
    /// restarted control plane never re-sends a step's commands nor loses them.
    pub fn apply_rollout_step<E>(
        &mut self,
        id: u64,
        commands: &[String],
        mut build: impl FnMut(&str, u64) -> std::result::Result<CommandRow, E>,
        finish: impl FnOnce(&[(String, u64)]) -> RolloutWrite,
    ) -> Result<std::result::Result<Vec<CommandRow>, E>> {
        let tx = self.write_tx()?;
        let mut rows = Vec::with_capacity(commands.len());
        let mut seqs = Vec::with_capacity(commands.len());
        for device in commands {
            let seq = next_command_seq(&tx, device)?;
            let row = match build(device, seq) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            insert_command(&tx, &row, Some(id))?;
            seqs.push((device.clone(), seq));
            rows.push(row);
        }
        write_step(&tx, id, &finish(&seqs))?;
        tx.commit()?;
        Ok(Ok(rows))
    }
}

/// A step's header, changed slots and new events.
fn write_step(tx: &Transaction<'_>, id: u64, w: &RolloutWrite) -> Result<()> {
    tx.execute(
        "UPDATE rollouts SET header = ?2, status = ?3, pending = ?4, updated_at_ms = ?5 WHERE id = ?1",
        params![i(id), w.header, w.status, i(w.pending), i(w.now_ms)],
    )?;
    let mut up = tx.prepare_cached(
        "INSERT INTO rollout_devices (rollout_id, device, slot) VALUES (?1, ?2, ?3)
         ON CONFLICT (rollout_id, device) DO UPDATE SET slot = excluded.slot",
    )?;
    for (device, slot) in &w.slots {
        up.execute(params![i(id), device, slot])?;
    }
    let mut ev = tx.prepare_cached(
        "INSERT INTO rollout_events (rollout_id, n, at_ms, kind, event)
         VALUES (?1, (SELECT coalesce(max(n), 0) + 1 FROM rollout_events WHERE rollout_id = ?1), ?2, ?3, ?4)",
    )?;
    for (at, kind, json) in &w.events {
        ev.execute(params![i(id), i(*at), kind, json])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::commands::tests::deploy;
    use super::super::ingest::tests::enrolled;
    use super::*;

    fn write(status: &str, pending: u64, slots: &[(&str, &str)], events: &[&str]) -> RolloutWrite {
        RolloutWrite {
            header: format!("{{\"status\":\"{status}\"}}"),
            status: status.into(),
            pending,
            now_ms: 50,
            slots: slots
                .iter()
                .map(|(d, s)| (d.to_string(), s.to_string()))
                .collect(),
            events: events
                .iter()
                .map(|e| (40, "wave".to_owned(), e.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_step_writes_commands_slots_and_events_together_or_not_at_all() {
        let (_dir, mut s) = enrolled(&["gw-1", "gw-2"]);
        let id = s
            .create_rollout(&"aa".repeat(32), "op", 10, |id| format!("{{\"id\":{id}}}"))
            .unwrap();
        assert_eq!(
            s.rollout(id).unwrap(),
            Some((format!("{{\"id\":{id}}}"), vec![]))
        );
        assert_eq!(s.open_rollouts().unwrap(), vec![id]);

        let devices = ["gw-1".to_owned(), "gw-2".to_owned()];
        let issued = s
            .apply_rollout_step(
                id,
                &devices,
                |d, seq| Ok::<_, ()>(deploy(d, seq)),
                |seqs| {
                    assert_eq!(seqs, [("gw-1".to_owned(), 1), ("gw-2".to_owned(), 1)]);
                    write(
                        "running",
                        2,
                        &[("gw-1", "{\"s\":1}"), ("gw-2", "{\"s\":1}")],
                        &["e1"],
                    )
                },
            )
            .unwrap()
            .unwrap();
        assert_eq!(issued.len(), 2);
        assert_eq!(s.commands("gw-2").unwrap(), vec![deploy("gw-2", 1)]);

        // A build that fails leaves neither its commands nor the step's state.
        let failed = s
            .apply_rollout_step(
                id,
                &devices,
                |d, seq| {
                    if d == "gw-2" {
                        Err("no key")
                    } else {
                        Ok(deploy(d, seq))
                    }
                },
                |_| write("running", 9, &[("gw-1", "{\"s\":2}")], &["lost"]),
            )
            .unwrap();
        assert!(matches!(failed, Err("no key")));
        assert_eq!(s.commands("gw-1").unwrap().len(), 1);

        s.apply_rollout_step(
            id,
            &[],
            |d, seq| Ok::<_, ()>(deploy(d, seq)),
            |_| write("completed", 0, &[("gw-1", "{\"s\":3}")], &["e2"]),
        )
        .unwrap()
        .unwrap();
        let (header, slots) = s.rollout(id).unwrap().unwrap();
        assert_eq!(header, "{\"status\":\"completed\"}");
        assert_eq!(slots[0], ("gw-1".to_owned(), "{\"s\":3}".to_owned()));
        assert_eq!(s.rollout_events(id).unwrap(), ["e1", "e2"]);
        assert!(
            s.open_rollouts().unwrap().is_empty(),
            "completed, nothing pending"
        );
        assert_eq!(s.rollouts().unwrap(), vec![header]);
    }
}
