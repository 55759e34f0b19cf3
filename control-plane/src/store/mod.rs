//! The fleet store: SQLite in WAL mode with versioned migrations.
//!
//! Architecture invariant: this is the only module that knows SQL (and the only one that
//! names `rusqlite`). It imports no domain module of the control plane: callers speak to
//! it in the plain row types below and in `drover-protocol` types, and convert to their
//! own types at their edge.
//!
//! Layout, one `impl Store` block per aggregate:
//! - `mod.rs`: opening (pragmas), the versioned migrations, [`StoreError`], [`Store`],
//!   the column encodings every aggregate shares, and [`Db`], the server's handle.
//! - `devices.rs`: enrollment, decommissioning, the auth cache's keys, device rows.
//! - `models.rs`: published model versions.
//! - `commands.rs`: signed commands and the per-device command sequence.
//! - `ingest.rs`: [`Store::apply_batch`], one helper per uplink kind.
//! - `observations.rs`: what devices reported, read back: telemetry, health windows,
//!   shadow reports, progress.
//! - `rollouts.rs`: rollout headers, device slots, report events, the atomic step.
//! - `drift.rs`: drift sketches and drift score history.
//! - `integrations.rs`: read-only integration identities (their certificates are files).
//! - `jobs.rs`: training jobs (their state and outcome enums) and labeled samples.
//!
//! Durability: every connection runs `synchronous=FULL`, so a committed command sequence
//! or an acknowledged telemetry record survives power loss (an agent deletes a record
//! from its spool once acked, so an ack must mean "on disk"). Batching amortises the fsync.
//! Write transactions use `BEGIN IMMEDIATE` so they never fail half-way with SQLITE_BUSY.
//!
//! Threads: a `Store` call blocks on disk, so async code reaches the server's connection
//! only through [`Db::run`] (blocking pool, one lock); ingest owns a second connection on
//! its own thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

mod access;
mod commands;
mod console;
mod devices;
mod drift;
mod drift_reference;
mod ingest;
mod integrations;
mod jobs;
mod models;

/// Test helpers that other modules' tests build stores with.
#[cfg(test)]
pub(crate) mod test_support {
    pub(crate) use super::ingest::tests::{enrolled, frame};
    pub(crate) use super::models::tests::model;
}
mod observations;
mod rollouts;
mod slots;

pub use access::{AuditRow, TokenRow};
pub use commands::CommandRow;
pub use console::{ConsoleDevicePage, ConsoleDeviceQuery, ConsoleTelemetryRow};
pub use devices::{DeviceAuth, DeviceEventRow, DeviceRow, ReplacedSeqs};
pub use drift::{DriftLevel, DriftScoreRow, DriftSketchRow, DriftWindowLevel};
pub use drift_reference::{DriftReferenceRow, LabeledPrediction};
pub use ingest::{phase_text, BatchOutcome, Inbound};
pub use integrations::IntegrationRow;
pub use jobs::{JobOutcome, JobRow, JobState, LabeledSample};
pub use models::ModelRow;
pub use observations::{HealthRow, ProgressRow, ShadowRow, TelemetryRow};
pub use rollouts::{RolloutRows, RolloutWrite};
pub use slots::{DeviceRuntime, SlotRow};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create database {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path} has schema version {found}, newer than this build's {supported}: upgrade drover")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("device {0} is already enrolled")]
    DeviceExists(String),
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
    #[error(
        "device {0} is enrolled and active: decommission it first (`drover device decommission {0}`), \
         then enroll its replacement with --replace"
    )]
    DeviceActive(String),
    #[error(
        "device {0} was decommissioned; to enroll a replacement under the same id (its history \
         kept), run `drover device enroll {0} --replace`"
    )]
    DeviceDecommissioned(String),
    #[error("an API token named {0:?} already exists; revoke it or choose another name")]
    TokenExists(String),
    #[error("no active API token is named {0:?}; see `drover token list`")]
    UnknownToken(String),
    #[error("an integration named {0:?} already exists; revoke it first (`drover integration revoke {0}`) or choose another name")]
    IntegrationExists(String),
    #[error("no active integration is named {0:?}; see `drover integration list`")]
    UnknownIntegration(String),
    #[error("model {name}@{version} is already published")]
    ModelExists { name: String, version: String },
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    /// A value this build does not know in a column that holds one of a fixed set (a
    /// newer build wrote it, or the file was edited).
    #[error("{table}.{column} holds {value:?}, which this build does not know (expected one of: {expected})")]
    UnknownValue {
        table: &'static str,
        column: &'static str,
        value: String,
        expected: String,
    },
    /// The blocking task running store work panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
}

type Result<T> = std::result::Result<T, StoreError>;

/// Migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    device_key BLOB NOT NULL,
    labels TEXT NOT NULL,
    enrolled_at_ms INTEGER NOT NULL,
    decommissioned INTEGER NOT NULL DEFAULT 0,
    arch TEXT, os TEXT, agent_version TEXT,
    last_seen_ms INTEGER,
    online INTEGER NOT NULL DEFAULT 0,
    active_model TEXT, active_digest TEXT,
    staged_model TEXT, staged_digest TEXT,
    last_phase TEXT,
    reported_command_seq INTEGER NOT NULL DEFAULT 0,
    max_uplink_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE models (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    summary TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE commands (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    issued_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    model_digest TEXT,
    key_id BLOB NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE telemetry (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER NOT NULL,
    model_digest TEXT,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    data_quality_errors INTEGER NOT NULL,
    latency_sum_us INTEGER NOT NULL,
    latency_counts BLOB NOT NULL,
    outputs BLOB NOT NULL,
    cpu_percent REAL NOT NULL,
    mem_used_bytes INTEGER NOT NULL,
    mem_total_bytes INTEGER NOT NULL,
    agent_rss_bytes INTEGER NOT NULL,
    temperature_c REAL,
    disk_free_bytes INTEGER NOT NULL,
    disk_total_bytes INTEGER NOT NULL,
    spool_dropped INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX telemetry_by_time ON telemetry (received_at_ms);
CREATE TABLE telemetry_rollup (
    device TEXT NOT NULL,
    bucket_ms INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    data_quality_errors INTEGER NOT NULL,
    latency_sum_us INTEGER NOT NULL,
    cpu_percent_sum REAL NOT NULL,
    mem_used_max INTEGER NOT NULL,
    PRIMARY KEY (device, bucket_ms)
) WITHOUT ROWID;
CREATE TABLE progress (
    device TEXT NOT NULL, seq INTEGER NOT NULL, received_at_ms INTEGER NOT NULL,
    command_seq INTEGER NOT NULL, phase TEXT NOT NULL, model_digest TEXT,
    chunks_done INTEGER NOT NULL, chunks_total INTEGER NOT NULL, detail TEXT,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE shadow (
    device TEXT NOT NULL, seq INTEGER NOT NULL, received_at_ms INTEGER NOT NULL,
    active_digest TEXT NOT NULL, candidate_digest TEXT NOT NULL,
    compared INTEGER NOT NULL, agreed INTEGER NOT NULL, candidate_errors INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE drift (
    device TEXT NOT NULL, seq INTEGER NOT NULL, received_at_ms INTEGER NOT NULL,
    model_digest TEXT NOT NULL, window_start_ms INTEGER NOT NULL, window_end_ms INTEGER NOT NULL,
    sketch TEXT NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE samples (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
    model_digest TEXT NOT NULL, request_id INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    features BLOB NOT NULL, prediction BLOB NOT NULL,
    PRIMARY KEY (device, seq, idx)
) WITHOUT ROWID;
CREATE TABLE labels (
    device TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
    request_id INTEGER NOT NULL, at_ms INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (device, seq, idx)
) WITHOUT ROWID;
"#,
    // 2: staged rollouts (state, per-device slots, report events); shadow latency;
    // which rollout a command belongs to.
    r#"
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    model_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    pending INTEGER NOT NULL DEFAULT 0,
    header TEXT NOT NULL
);
CREATE TABLE rollout_devices (
    rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
    device TEXT NOT NULL,
    slot TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device)
) WITHOUT ROWID;
CREATE TABLE rollout_events (
    rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
    n INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (rollout_id, n)
) WITHOUT ROWID;
ALTER TABLE shadow ADD COLUMN active_latency BLOB;
ALTER TABLE shadow ADD COLUMN candidate_latency BLOB;
ALTER TABLE commands ADD COLUMN rollout_id INTEGER;
CREATE INDEX shadow_by_candidate ON shadow (candidate_digest, received_at_ms);
CREATE INDEX telemetry_by_model ON telemetry (model_digest, received_at_ms);
"#,
    // 3: drift score history and training jobs (issue 7).
    r#"
CREATE TABLE drift_scores (
    scope TEXT NOT NULL, model_digest TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL, window_end_ms INTEGER NOT NULL,
    feature TEXT NOT NULL, count INTEGER NOT NULL,
    psi REAL, chi2 REAL, p_value REAL,
    missing INTEGER NOT NULL, out_of_range INTEGER NOT NULL, level TEXT NOT NULL,
    PRIMARY KEY (scope, model_digest, window_end_ms, feature)
) WITHOUT ROWID;
CREATE INDEX drift_scores_by_end ON drift_scores (window_end_ms);
CREATE INDEX samples_by_request ON samples (device, request_id);
CREATE TABLE training_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, trigger TEXT NOT NULL, executor TEXT NOT NULL,
    spec TEXT NOT NULL, dir TEXT NOT NULL, state TEXT NOT NULL,
    external_id TEXT, created_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER, exit_code INTEGER, detail TEXT,
    dataset_hash TEXT, parent_model TEXT,
    outcome TEXT, candidate_model TEXT, metrics TEXT,
    rollout_plan TEXT
);
"#,
    // 4: fleet operations (issue 18): relabelling (when a device's labels last changed,
    // so a relabelled device can join a running rollout late), the labels an agent
    // declares (shown, never selected on), and the per-device audit log.
    r#"
ALTER TABLE devices ADD COLUMN labels_changed_at_ms INTEGER;
ALTER TABLE devices ADD COLUMN agent_labels TEXT;
CREATE TABLE device_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    by TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX device_events_by_device ON device_events (device, id);
"#,
    // 5: access (issue 19): per-user API tokens (hashed) with roles, and the API's audit
    // log, append-only (triggers refuse UPDATE and DELETE).
    r#"
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at_ms INTEGER
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    // 6: read-only integration identities (issue 20); a revoked name may be created again.
    r#"
CREATE TABLE integrations (
    name TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    not_after_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
"#,
    // 7: named model slots (issue 17, protocol 2) and the negotiated protocol.
    r#"
ALTER TABLE devices ADD COLUMN protocol INTEGER;
ALTER TABLE devices ADD COLUMN models_seq INTEGER;
ALTER TABLE devices ADD COLUMN model_budget TEXT;
CREATE TABLE device_models (
    device TEXT NOT NULL REFERENCES devices(id),
    name TEXT NOT NULL,
    active TEXT,
    active_digest TEXT,
    previous TEXT,
    staged TEXT,
    shadow TEXT,
    disk_bytes INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    PRIMARY KEY (device, name)
);
"#,
    // 8: the drift loop (issue 22): reference windows per (model, label group) recorded
    // after a rollout completed healthy (bin counts only), and accuracy rows in the drift
    // history (labelled predictions right, with the Wilson interval).
    r#"
CREATE TABLE drift_references (
    model_digest TEXT NOT NULL, scope TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL, window_end_ms INTEGER NOT NULL,
    recorded_at_ms INTEGER NOT NULL, sketch TEXT NOT NULL,
    PRIMARY KEY (model_digest, scope)
) WITHOUT ROWID;
ALTER TABLE drift_scores ADD COLUMN correct INTEGER;
ALTER TABLE drift_scores ADD COLUMN accuracy_low REAL;
ALTER TABLE drift_scores ADD COLUMN accuracy_high REAL;
CREATE INDEX labels_by_time ON labels (at_ms);
"#,
    // 9: the model runtime a device reported (issue 25, protocol 3): its engine version and
    // the artifact formats it loads, as JSON; NULL until reported in the current session.
    r#"
ALTER TABLE devices ADD COLUMN runtime TEXT;
"#,
];

/// One SQLite connection with the schema migrated to this build's version.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database and runs pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        create_private(path)?;
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        let mut s = Store {
            conn,
            path: path.to_owned(),
        };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<()> {
        let found: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = MIGRATIONS.len() as i64;
        if found > supported {
            return Err(StoreError::SchemaTooNew {
                path: self.path.clone(),
                found,
                supported,
            });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (n + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// A write transaction that takes the write lock up front (see the module doc).
    fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

// ---- column encodings shared by the aggregates ----

/// A `u64` as SQLite's signed integer (values past `i64::MAX` saturate; none occur).
fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer read back as `u64` (negative values cannot be written; read as 0).
fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(u)
}

/// Integer column `idx` of a row as `u64`.
fn u64_at(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(u(r.get::<_, i64>(idx)?))
}

/// Latency histograms and output counts: little-endian `u64`s.
fn pack_u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn unpack_u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Sampled features and predictions: little-endian `f32`s.
fn pack_f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn unpack_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---- the server's handle ----

/// The server's handle on its store connection: cheap to clone, shared by every service
/// (API, rollout driver, chunk server, continuous training, maintenance). The connection
/// sits behind a private mutex that only [`Db::run`] (and [`Db::lock_blocking`] for
/// synchronous code) takes, so "spawn_blocking, lock, recover poison" is written once.
#[derive(Clone)]
pub struct Db {
    store: Arc<Mutex<Store>>,
}

impl Db {
    pub fn new(store: Store) -> Self {
        Self {
            store: Arc::new(Mutex::new(store)),
        }
    }

    /// Runs `f` with the store on tokio's blocking pool (SQLite work blocks on disk and
    /// must never run on the async runtime's threads), and returns what it returns. Only
    /// a panic or cancellation of the blocking task is a `StoreError::Task`; `f`'s own
    /// errors are in `T`.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Store) -> T + Send + 'static,
        T: Send + 'static,
    {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&mut lock(&store)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))
    }

    /// Locks the store on the calling thread, for synchronous code that is not on the
    /// async runtime (tools, benches, tests). Async code uses [`Db::run`].
    pub fn lock_blocking(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
}

/// A closure that panicked while holding the lock cannot leave a half-written
/// transaction behind (an uncommitted `Transaction` rolls back when dropped), so the
/// connection stays usable and a poisoned lock is taken over rather than propagated.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates a missing database file 0600 before SQLite opens it: it holds every device key
/// and token hash, and SQLite gives its `-wal` and `-shm` files the database file's mode.
/// An existing file keeps its mode (`drover doctor` reports a readable one).
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_and_its_wal_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.db");
        let s = Store::open(&path).unwrap();
        s.conn
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        for name in ["drover.db", "drover.db-wal", "drover.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        drop(Store::open(&path).unwrap());
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        s.conn
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        drop(s);
        let e = Store::open(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("newer than this build"), "{e}");
    }

    #[tokio::test]
    async fn db_run_survives_a_panicking_closure() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(Store::open(&dir.path().join("d.db")).unwrap());
        let r = db.run(|_| -> u64 { panic!("boom") }).await;
        assert!(matches!(r, Err(StoreError::Task(_))), "{r:?}");
        let v = db.run(|s| s.schema_version()).await.unwrap().unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        assert_eq!(db.lock_blocking().schema_version().unwrap(), v);
    }
}
