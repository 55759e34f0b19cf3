//! Read-only integration identities: who may read the JSON stream. The certificate itself
//! is a file of the fleet CA (`pki`); the row says whether it is active.

use rusqlite::{params, OptionalExtension};

use super::{i, opt_u64, u64_at, Result, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegrationRow {
    pub name: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub not_after_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

impl Store {
    /// Records a new integration and runs `issue` (the certificate) in the same
    /// transaction: if issuing fails the row is rolled back. Refused while an active
    /// integration has the name; a revoked one's row is replaced.
    pub fn create_integration_with<T, E>(
        &mut self,
        name: &str,
        by: &str,
        now_ms: u64,
        issue: impl FnOnce() -> std::result::Result<(T, u64), E>,
    ) -> Result<std::result::Result<T, E>> {
        let tx = self.write_tx()?;
        let active: Option<Option<i64>> = tx
            .query_row(
                "SELECT revoked_at_ms FROM integrations WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if matches!(active, Some(None)) {
            return Err(StoreError::IntegrationExists(name.to_owned()));
        }
        let (out, not_after_ms) = match issue() {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        tx.execute(
            "INSERT OR REPLACE INTO integrations (name, created_at_ms, created_by, not_after_ms) \
             VALUES (?1, ?2, ?3, ?4)",
            params![name, i(now_ms), by, i(not_after_ms)],
        )?;
        tx.commit()?;
        Ok(Ok(out))
    }

    /// Revokes the active integration `name`.
    pub fn revoke_integration(&mut self, name: &str, now_ms: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE integrations SET revoked_at_ms = ?2 WHERE name = ?1 AND revoked_at_ms IS NULL",
            params![name, i(now_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownIntegration(name.to_owned()));
        }
        Ok(())
    }

    /// Every integration, active or revoked, by name.
    pub fn integrations(&self) -> Result<Vec<IntegrationRow>> {
        let mut st = self.conn.prepare(
            "SELECT name, created_at_ms, created_by, not_after_ms, revoked_at_ms \
             FROM integrations ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(IntegrationRow {
                name: r.get(0)?,
                created_at_ms: u64_at(r, 1)?,
                created_by: r.get(2)?,
                not_after_ms: u64_at(r, 3)?,
                revoked_at_ms: opt_u64(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_integration_name_is_unique_while_active_and_free_again_once_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db")).unwrap();
        let ok = || Ok::<_, String>(((), 99));
        s.create_integration_with("node-red", "admin", 1, ok)
            .unwrap()
            .unwrap();
        assert!(matches!(
            s.create_integration_with("node-red", "admin", 2, ok),
            Err(StoreError::IntegrationExists(_))
        ));
        // A failed issue leaves no row.
        let failed = s
            .create_integration_with("telegraf", "admin", 2, || Err::<((), u64), _>("no CA"))
            .unwrap();
        assert!(failed.is_err());
        assert_eq!(s.integrations().unwrap().len(), 1);
        s.revoke_integration("node-red", 3).unwrap();
        assert!(matches!(
            s.revoke_integration("node-red", 4),
            Err(StoreError::UnknownIntegration(_))
        ));
        assert_eq!(s.integrations().unwrap()[0].revoked_at_ms, Some(3));
        s.create_integration_with("node-red", "bob", 5, ok)
            .unwrap()
            .unwrap();
        let rows = s.integrations().unwrap();
        assert_eq!(
            rows,
            vec![IntegrationRow {
                name: "node-red".into(),
                created_at_ms: 5,
                created_by: "bob".into(),
                not_after_ms: 99,
                revoked_at_ms: None,
            }]
        );
    }
}
