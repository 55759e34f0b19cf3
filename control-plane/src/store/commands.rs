//! Signed commands: each device's sequence is allocated, the command signed and the row
//! committed before anything is published, so a sequence is never used twice.

use drover_protocol::topics::{hex32, parse_hex32};
use rusqlite::{params, OptionalExtension, Transaction};

use super::{i, u, u64_at, Result, Store, StoreError};

/// A signed command, persisted before it is published.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRow {
    pub device: String,
    pub seq: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub kind: String,
    pub model_digest: Option<[u8; 32]>,
    pub key_id: [u8; 8],
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

/// The device's next command sequence: above every command issued and above the floor
/// the device reported (so a restored database never re-uses a sequence).
pub(super) fn next_command_seq(tx: &Transaction<'_>, device: &str) -> Result<u64> {
    let reported: Option<(i64, bool)> = tx
        .query_row(
            "SELECT reported_command_seq, decommissioned FROM devices WHERE id = ?1",
            [device],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((reported, false)) = reported else {
        return Err(StoreError::UnknownDevice(device.to_owned()));
    };
    let last: i64 = tx.query_row(
        "SELECT coalesce(max(seq), 0) FROM commands WHERE device = ?1",
        [device],
        |r| r.get(0),
    )?;
    Ok(u(last.max(reported)) + 1)
}

/// Inserts a command row; `rollout_id` names the rollout whose step issued it.
pub(super) fn insert_command(
    tx: &Transaction<'_>,
    row: &CommandRow,
    rollout_id: Option<u64>,
) -> Result<()> {
    tx.execute(
        "INSERT INTO commands (device, seq, issued_at_ms, expires_at_ms, kind, model_digest, key_id, payload, signature, rollout_id) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
        params![
            row.device,
            i(row.seq),
            i(row.issued_at_ms),
            i(row.expires_at_ms),
            row.kind,
            row.model_digest.as_ref().map(hex32),
            &row.key_id[..],
            row.payload,
            row.signature,
            rollout_id.map(i)
        ],
    )?;
    Ok(())
}

fn command_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRow> {
    let digest: Option<String> = r.get(5)?;
    let key_id: Vec<u8> = r.get(6)?;
    let mut kid = [0u8; 8];
    if key_id.len() == 8 {
        kid.copy_from_slice(&key_id);
    }
    Ok(CommandRow {
        device: r.get(0)?,
        seq: u64_at(r, 1)?,
        issued_at_ms: u64_at(r, 2)?,
        expires_at_ms: u64_at(r, 3)?,
        kind: r.get(4)?,
        model_digest: digest.and_then(|d| parse_hex32(&d)),
        key_id: kid,
        payload: r.get(7)?,
        signature: r.get(8)?,
    })
}

impl Store {
    /// Allocates the device's next command sequence, lets `build` sign the command for it,
    /// and commits the row before returning, so the sequence is durable before publishing.
    pub fn issue_command<E>(
        &mut self,
        device: &str,
        build: impl FnOnce(u64) -> std::result::Result<CommandRow, E>,
    ) -> Result<std::result::Result<CommandRow, E>> {
        let tx = self.write_tx()?;
        let seq = next_command_seq(&tx, device)?;
        let row = match build(seq) {
            Ok(row) => row,
            Err(e) => return Ok(Err(e)),
        };
        insert_command(&tx, &row, None)?;
        tx.commit()?;
        Ok(Ok(row))
    }

    pub fn command(&self, device: &str, seq: u64) -> Result<Option<CommandRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM commands WHERE device = ?1 AND seq = ?2",
                params![device, i(seq)],
                command_from_row,
            )
            .optional()?)
    }

    pub fn latest_command(&self, device: &str) -> Result<Option<CommandRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM commands WHERE device = ?1 ORDER BY seq DESC LIMIT 1",
                [device],
                command_from_row,
            )
            .optional()?)
    }

    /// Commands issued to `device` after sequence `after` and unexpired at `now_ms`, oldest
    /// first: what a reconnecting device has not accepted yet. At most `limit`, the newest.
    pub fn pending_commands(
        &self,
        device: &str,
        after: u64,
        now_ms: u64,
        limit: u32,
    ) -> Result<Vec<CommandRow>> {
        let mut q = self.conn.prepare_cached(
            "SELECT * FROM commands WHERE device = ?1 AND seq > ?2 AND expires_at_ms > ?3
             ORDER BY seq DESC LIMIT ?4",
        )?;
        let mut rows = q
            .query_map(
                params![device, i(after), i(now_ms), limit],
                command_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Until when `device` may fetch the model whose manifest digest is `digest`: the
    /// latest expiry among the deploy commands naming it that were issued to the device
    /// and are unexpired at `now_ms`; `None` when there is none.
    pub fn deploy_expiry(
        &self,
        device: &str,
        digest: &[u8; 32],
        now_ms: u64,
    ) -> Result<Option<u64>> {
        let latest: Option<i64> = self.conn.query_row(
            "SELECT max(expires_at_ms) FROM commands WHERE device = ?1 AND kind = 'deploy' AND model_digest = ?2 AND expires_at_ms > ?3",
            params![device, hex32(digest), i(now_ms)],
            |r| r.get(0),
        )?;
        Ok(latest.map(u))
    }

    pub fn commands(&self, device: &str) -> Result<Vec<CommandRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM commands WHERE device = ?1 ORDER BY seq")?;
        let rows = st.query_map([device], command_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use drover_protocol::{DeviceId, DeviceKey};

    use super::*;

    /// A deploy command for `device` with sequence `seq`.
    pub(crate) fn deploy(device: &str, seq: u64) -> CommandRow {
        CommandRow {
            device: device.into(),
            seq,
            issued_at_ms: 1,
            expires_at_ms: 2,
            kind: "deploy".into(),
            model_digest: Some([7; 32]),
            key_id: [3; 8],
            payload: vec![seq as u8],
            signature: vec![9; 64],
        }
    }

    #[test]
    fn command_sequences_continue_above_the_device_reported_floor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        let dev = DeviceId::new("gw-1").unwrap();
        s.enroll_device(&dev, &DeviceKey([1; 32]), &BTreeMap::new(), 1)
            .unwrap();
        let mk = |seq| -> std::result::Result<CommandRow, ()> {
            Ok(CommandRow {
                device: "gw-1".into(),
                seq,
                issued_at_ms: 1,
                expires_at_ms: 2,
                kind: "deploy".into(),
                model_digest: None,
                key_id: [0; 8],
                payload: vec![],
                signature: vec![],
            })
        };
        assert_eq!(s.issue_command("gw-1", mk).unwrap().unwrap().seq, 1);
        assert_eq!(s.issue_command("gw-1", mk).unwrap().unwrap().seq, 2);
        assert!(matches!(
            s.issue_command("nope", mk),
            Err(StoreError::UnknownDevice(_))
        ));
        assert!(matches!(
            s.enroll_device(&dev, &DeviceKey([1; 32]), &BTreeMap::new(), 1),
            Err(StoreError::DeviceExists(_))
        ));
    }

    #[test]
    fn deploy_expiry_names_only_unexpired_deploys_of_that_model_to_that_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        for d in ["gw-1", "gw-2"] {
            s.enroll_device(
                &DeviceId::new(d).unwrap(),
                &DeviceKey([1; 32]),
                &BTreeMap::new(),
                1,
            )
            .unwrap();
        }
        let with = |seq, kind: &str, digest: [u8; 32], expires_at_ms| CommandRow {
            kind: kind.into(),
            model_digest: Some(digest),
            expires_at_ms,
            ..deploy("gw-1", seq)
        };
        assert_eq!(s.deploy_expiry("gw-1", &[7; 32], 0).unwrap(), None);
        for row in [
            with(1, "deploy", [7; 32], 100),
            with(2, "deploy", [7; 32], 300),
            with(3, "rollback", [8; 32], 900),
            with(4, "deploy", [9; 32], 50),
        ] {
            s.issue_command("gw-1", |_| Ok::<_, ()>(row))
                .unwrap()
                .unwrap();
        }
        assert_eq!(s.deploy_expiry("gw-1", &[7; 32], 10).unwrap(), Some(300));
        assert_eq!(
            s.deploy_expiry("gw-1", &[7; 32], 300).unwrap(),
            None,
            "expired"
        );
        assert_eq!(
            s.deploy_expiry("gw-1", &[8; 32], 10).unwrap(),
            None,
            "not a deploy"
        );
        assert_eq!(s.deploy_expiry("gw-1", &[9; 32], 60).unwrap(), None);
        assert_eq!(
            s.deploy_expiry("gw-2", &[7; 32], 10).unwrap(),
            None,
            "another device"
        );
    }

    #[test]
    fn issued_commands_read_back_and_a_refused_build_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        let dev = DeviceId::new("gw-1").unwrap();
        s.enroll_device(&dev, &DeviceKey([1; 32]), &BTreeMap::new(), 1)
            .unwrap();
        let first = s
            .issue_command("gw-1", |seq| Ok::<_, ()>(deploy("gw-1", seq)))
            .unwrap()
            .unwrap();
        assert_eq!(s.command("gw-1", 1).unwrap(), Some(first.clone()));
        let refused = s.issue_command("gw-1", |_| Err::<CommandRow, _>("cannot sign"));
        assert!(matches!(refused, Ok(Err("cannot sign"))));
        let second = s
            .issue_command("gw-1", |seq| Ok::<_, ()>(deploy("gw-1", seq)))
            .unwrap()
            .unwrap();
        assert_eq!(second.seq, 2, "the refused build used no sequence");
        assert_eq!(s.latest_command("gw-1").unwrap(), Some(second.clone()));
        assert_eq!(s.commands("gw-1").unwrap(), vec![first, second]);
        s.decommission_device("gw-1").unwrap();
        let gone = s.issue_command("gw-1", |seq| Ok::<_, ()>(deploy("gw-1", seq)));
        assert!(
            matches!(gone, Err(StoreError::UnknownDevice(_))),
            "{gone:?}"
        );
    }
}
