//! API tokens (hashed; the secret itself is never stored) and the append-only audit log.

use rusqlite::{params, OptionalExtension};

use super::{i, opt_u64, u64_at, Result, Store, StoreError};

/// An API token as listed: never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub name: String,
    pub role: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub revoked_at_ms: Option<u64>,
}

/// One authenticated API call that tried to change something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub id: u64,
    pub at_ms: u64,
    pub actor: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

impl Store {
    /// Records a new token by its hash; refused when the name is taken (even by a revoked
    /// token: names stay unique in the audit).
    pub fn insert_token(
        &mut self,
        name: &str,
        role: &str,
        hash: &[u8; 32],
        by: &str,
        now_ms: u64,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        let taken: Option<i64> = tx
            .query_row("SELECT 1 FROM api_tokens WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if taken.is_some() {
            return Err(StoreError::TokenExists(name.to_owned()));
        }
        tx.execute(
            "INSERT INTO api_tokens (name, role, hash, created_at_ms, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, role, &hash[..], i(now_ms), by],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Revokes the active token `name`.
    pub fn revoke_token(&mut self, name: &str, now_ms: u64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE api_tokens SET revoked_at_ms = ?2 WHERE name = ?1 AND revoked_at_ms IS NULL",
            params![name, i(now_ms)],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownToken(name.to_owned()));
        }
        Ok(())
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        let mut st = self.conn.prepare(
            "SELECT name, role, created_at_ms, created_by, revoked_at_ms FROM api_tokens ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(TokenRow {
                name: r.get(0)?,
                role: r.get(1)?,
                created_at_ms: u64_at(r, 2)?,
                created_by: r.get(3)?,
                revoked_at_ms: opt_u64(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `(name, role, hash)` of every token not revoked, for the API's table.
    pub fn active_token_hashes(&self) -> Result<Vec<(String, String, [u8; 32])>> {
        let mut st = self
            .conn
            .prepare("SELECT name, role, hash FROM api_tokens WHERE revoked_at_ms IS NULL")?;
        let rows = st.query_map([], |r| {
            let hash: Vec<u8> = r.get(2)?;
            Ok((r.get(0)?, r.get(1)?, hash))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, role, hash): (String, String, Vec<u8>) = row?;
            let hash: [u8; 32] = hash.try_into().map_err(|_| StoreError::Corrupt {
                table: "api_tokens",
                detail: format!("token {name:?}: hash is not 32 bytes"),
            })?;
            out.push((name, role, hash));
        }
        Ok(out)
    }

    pub fn append_audit(&mut self, row: &AuditRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO audit (at_ms, actor, role, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![i(row.at_ms), row.actor, row.role, row.method, row.path, row.status],
        )?;
        Ok(())
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit(&self, limit: u32) -> Result<Vec<AuditRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, at_ms, actor, role, method, path, status FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit], |r| {
            Ok(AuditRow {
                id: u64_at(r, 0)?,
                at_ms: u64_at(r, 1)?,
                actor: r.get(2)?,
                role: r.get(3)?,
                method: r.get(4)?,
                path: r.get(5)?,
                status: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_their_hash_only_and_the_audit_log_is_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let mut s = Store::open(&path).unwrap();
        s.insert_token("alice", "viewer", &[7; 32], "local-admin", 5)
            .unwrap();
        assert!(matches!(
            s.insert_token("alice", "admin", &[8; 32], "local-admin", 6),
            Err(StoreError::TokenExists(_))
        ));
        assert_eq!(
            s.active_token_hashes().unwrap(),
            vec![("alice".to_owned(), "viewer".to_owned(), [7; 32])]
        );
        s.revoke_token("alice", 9).unwrap();
        assert!(matches!(
            s.revoke_token("alice", 10),
            Err(StoreError::UnknownToken(_))
        ));
        assert!(s.active_token_hashes().unwrap().is_empty());
        assert_eq!(s.tokens().unwrap()[0].revoked_at_ms, Some(9));

        let row = AuditRow {
            id: 0,
            at_ms: 11,
            actor: "alice".into(),
            role: "deployer".into(),
            method: "POST".into(),
            path: "/v1/rollouts".into(),
            status: 201,
        };
        s.append_audit(&row).unwrap();
        let got = s.audit(10).unwrap();
        assert_eq!(
            (got.len(), got[0].actor.as_str(), got[0].status),
            (1, "alice", 201)
        );
        for sql in ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"] {
            let err = s.conn.execute(sql, []).unwrap_err().to_string();
            assert!(err.contains("append-only"), "{err}");
        }
        assert_eq!(s.audit(10).unwrap()[0].actor, "alice");
    }
}
