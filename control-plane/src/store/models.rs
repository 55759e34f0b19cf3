//! Published model versions: the signed manifest exactly as signed, and a summary.

use drover_protocol::topics::{hex32, parse_hex32};
use rusqlite::{params, OptionalExtension};

use super::{i, u64_at, Result, Store, StoreError};

/// A published model version.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRow {
    pub digest: [u8; 32],
    pub name: String,
    pub version: String,
    pub sha256: [u8; 32],
    pub size: u64,
    pub chunk_size: u32,
    pub created_at_ms: u64,
    pub key_id: String,
    /// The signed manifest payload and its signature, exactly as signed.
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    /// Human-facing JSON summary (schema, lineage, metrics, baseline size).
    pub summary: String,
}

fn model_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelRow> {
    let hex_digest = |s: String| parse_hex32(&s).unwrap_or([0; 32]);
    Ok(ModelRow {
        digest: hex_digest(r.get(0)?),
        name: r.get(1)?,
        version: r.get(2)?,
        sha256: hex_digest(r.get(3)?),
        size: u64_at(r, 4)?,
        chunk_size: r.get(5)?,
        created_at_ms: u64_at(r, 6)?,
        key_id: r.get(7)?,
        payload: r.get(8)?,
        signature: r.get(9)?,
        summary: r.get(10)?,
    })
}

impl Store {
    pub fn insert_model(&mut self, m: &ModelRow) -> Result<()> {
        let tx = self.write_tx()?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM models WHERE name = ?1 AND version = ?2",
                params![m.name, m.version],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::ModelExists {
                name: m.name.clone(),
                version: m.version.clone(),
            });
        }
        tx.execute(
            "INSERT INTO models VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
            params![
                hex32(&m.digest),
                m.name,
                m.version,
                hex32(&m.sha256),
                i(m.size),
                m.chunk_size,
                i(m.created_at_ms),
                m.key_id,
                m.payload,
                m.signature,
                m.summary
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn models(&self) -> Result<Vec<ModelRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM models ORDER BY name, created_at_ms")?;
        let rows = st.query_map([], model_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn model(&self, name: &str, version: &str) -> Result<Option<ModelRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM models WHERE name = ?1 AND version = ?2",
                params![name, version],
                model_from_row,
            )
            .optional()?)
    }

    pub fn model_by_digest(&self, digest: &[u8; 32]) -> Result<Option<ModelRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM models WHERE digest = ?1",
                [hex32(digest)],
                model_from_row,
            )
            .optional()?)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A model row whose fields all differ, so a swapped column shows.
    pub(crate) fn model(name: &str, version: &str, digest: u8) -> ModelRow {
        ModelRow {
            digest: [digest; 32],
            name: name.into(),
            version: version.into(),
            sha256: [digest.wrapping_add(1); 32],
            size: 1234,
            chunk_size: 256,
            created_at_ms: u64::from(digest) * 10,
            key_id: "k1".into(),
            payload: vec![1, 2, 3],
            signature: vec![4; 64],
            summary: "{\"schema\":1}".into(),
        }
    }

    #[test]
    fn models_round_trip_by_name_and_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("d.db")).unwrap();
        let a = model("cls", "1.0.0", 1);
        let b = model("cls", "1.0.1", 2);
        s.insert_model(&b).unwrap();
        s.insert_model(&a).unwrap();
        let again = s.insert_model(&a);
        assert!(
            matches!(again, Err(StoreError::ModelExists { .. })),
            "{again:?}"
        );
        assert_eq!(s.model("cls", "1.0.0").unwrap(), Some(a.clone()));
        assert_eq!(s.model_by_digest(&[2; 32]).unwrap(), Some(b.clone()));
        assert_eq!(s.model_by_digest(&[9; 32]).unwrap(), None);
        // By name, oldest first.
        assert_eq!(s.models().unwrap(), vec![a, b]);
    }
}
