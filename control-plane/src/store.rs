//! The fleet store: SQLite in WAL mode with versioned migrations.
//!
//! Architecture invariant: this is the only module that knows SQL. Every other module
//! speaks in the plain row structs below or in `drover-protocol` types.
//!
//! Durability: every connection runs `synchronous=FULL`, so a committed command sequence
//! or an acknowledged telemetry record survives power loss (an agent deletes a record
//! from its spool once acked, so an ack must mean "on disk"). Batching amortises the fsync.
//! Write transactions use `BEGIN IMMEDIATE` so they never fail half-way with SQLITE_BUSY.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_protocol::envelope::UplinkFrame;
use drover_protocol::messages::{ModelRef, Phase, Presence, Uplink};
use drover_protocol::topics::hex32;
use drover_protocol::{DeviceId, DeviceKey};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
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
    #[error("model {name}@{version} is already published")]
    ModelExists { name: String, version: String },
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
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
];

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
}

/// What ingest needs to authenticate a device.
#[derive(Clone, Debug)]
pub struct DeviceAuth {
    pub id: DeviceId,
    pub key: DeviceKey,
    pub decommissioned: bool,
}

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

/// One raw telemetry window as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub inferences: u64,
    pub errors: u64,
    pub cpu_percent: f64,
    pub mem_used_bytes: u64,
}

/// An authenticated uplink frame waiting to be stored.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub frame: UplinkFrame,
    pub received_at_ms: u64,
}

/// What one batch did, per device.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Sequence numbers now durably stored (including duplicates stored earlier), per device.
    pub stored: HashMap<DeviceId, Vec<u64>>,
    /// Rows newly written (duplicates excluded).
    pub new_rows: u64,
    pub duplicates: u64,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn now_or(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn pack_u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn pack_f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn model_text(m: &Option<ModelRef>) -> (Option<String>, Option<String>) {
    match m {
        Some(m) => (
            Some(format!("{}@{}", m.name, m.version)),
            Some(hex32(&m.digest)),
        ),
        None => (None, None),
    }
}

fn phase_text(p: Phase) -> &'static str {
    match p {
        Phase::Received => "received",
        Phase::Downloading => "downloading",
        Phase::Verified => "verified",
        Phase::SelfTested => "self-tested",
        Phase::Active => "active",
        Phase::Healthy => "healthy",
        Phase::Failed => "failed",
        Phase::RolledBack => "rolled-back",
        Phase::Refused => "refused",
        Phase::Done => "done",
        Phase::Shadowing => "shadowing",
    }
}

fn parse_phase(s: &str) -> Option<Phase> {
    [
        Phase::Received,
        Phase::Downloading,
        Phase::Verified,
        Phase::SelfTested,
        Phase::Active,
        Phase::Healthy,
        Phase::Failed,
        Phase::RolledBack,
        Phase::Refused,
        Phase::Done,
        Phase::Shadowing,
    ]
    .into_iter()
    .find(|p| phase_text(*p) == s)
}

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

/// One telemetry window's health figures.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub model_digest: String,
    pub inferences: u64,
    pub errors: u64,
    pub latency_counts: Vec<u64>,
}

/// One shadow report as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub compared: u64,
    pub agreed: u64,
    pub active_latency: Vec<u64>,
    pub candidate_latency: Vec<u64>,
}

/// One progress report as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressRow {
    pub device: String,
    pub seq: u64,
    pub received_at_ms: u64,
    pub command_seq: u64,
    pub phase: Option<Phase>,
    pub detail: Option<String>,
}

const HOUR_MS: u64 = 3_600_000;

#[derive(Default)]
struct Rollup {
    windows: u64,
    inferences: u64,
    errors: u64,
    dq: u64,
    latency_sum: u64,
    cpu_sum: f64,
    mem_max: u64,
}

/// The device's next command sequence: above every command issued and above the floor
/// the device reported (so a restored database never re-uses a sequence).
fn next_command_seq(tx: &rusqlite::Transaction<'_>, device: &str) -> Result<u64> {
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
    Ok(last.max(reported).max(0) as u64 + 1)
}

fn insert_command(
    tx: &rusqlite::Transaction<'_>,
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

fn unpack_u64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

impl Store {
    /// Opens (creating if needed) the database and runs pending migrations.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
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

    // ---- devices ----

    pub fn enroll_device(
        &mut self,
        id: &DeviceId,
        key: &DeviceKey,
        labels: &BTreeMap<String, String>,
        now_ms: u64,
    ) -> Result<()> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        tx.commit()?;
        Ok(())
    }

    /// Marks a device decommissioned; returns false when it is not enrolled.
    pub fn decommission_device(&mut self, id: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE devices SET decommissioned = 1, online = 0 WHERE id = ?1",
            [id],
        )?;
        Ok(n == 1)
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

    const DEVICE_COLS: &'static str = "id, labels, enrolled_at_ms, decommissioned, arch, os, agent_version, last_seen_ms, online, active_model, staged_model, last_phase, reported_command_seq, max_uplink_seq, active_digest";

    fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
        let labels: String = r.get(1)?;
        Ok(DeviceRow {
            id: r.get(0)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            enrolled_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
            decommissioned: r.get(3)?,
            arch: r.get(4)?,
            os: r.get(5)?,
            agent_version: r.get(6)?,
            last_seen_ms: now_or(r.get(7)?),
            online: r.get(8)?,
            active_model: r.get(9)?,
            staged_model: r.get(10)?,
            last_phase: r.get(11)?,
            reported_command_seq: r.get::<_, i64>(12)?.max(0) as u64,
            max_uplink_seq: r.get::<_, i64>(13)?.max(0) as u64,
            active_digest: r.get(14)?,
        })
    }

    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {} FROM devices ORDER BY id",
            Self::DEVICE_COLS
        ))?;
        let rows = st.query_map([], Self::device_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {} FROM devices WHERE id = ?1", Self::DEVICE_COLS),
                [id],
                Self::device_from_row,
            )
            .optional()?)
    }

    // ---- ingest ----

    /// Stores a batch of authenticated uplink frames in one transaction. Duplicates (same
    /// device and sequence) are recognised and not stored twice.
    pub fn apply_batch(&mut self, batch: &[Inbound]) -> Result<BatchOutcome> {
        let mut out = BatchOutcome::default();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Per device: highest sequence, latest receipt, and whether its last frame in
        // this batch said it went offline (a last will).
        let mut seen: HashMap<&DeviceId, (u64, u64, bool)> = HashMap::new();
        let mut rollups: HashMap<(&str, u64), Rollup> = HashMap::new();
        {
            let mut ins_tel = tx.prepare_cached(
                "INSERT OR IGNORE INTO telemetry VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20)",
            )?;
            for item in batch {
                let f = &item.frame;
                let dev = f.device.as_str();
                let recv = i(item.received_at_ms);
                let e = seen.entry(&f.device).or_insert((0, 0, false));
                e.0 = e.0.max(f.seq);
                e.1 = e.1.max(item.received_at_ms);
                e.2 = matches!(&f.msg, Uplink::Status(s) if s.presence == Presence::Offline);
                let inserted = match &f.msg {
                    Uplink::Telemetry(t) => {
                        let n = ins_tel.execute(params![
                            dev,
                            i(f.seq),
                            recv,
                            i(t.window_start_ms),
                            i(t.window_end_ms),
                            t.model.as_ref().map(|m| hex32(&m.digest)),
                            i(t.inferences),
                            i(t.errors),
                            i(t.data_quality_errors),
                            i(t.latency.sum_us),
                            pack_u64s(&t.latency.counts),
                            pack_u64s(&t.outputs),
                            f64::from(t.system.cpu_percent),
                            i(t.system.mem_used_bytes),
                            i(t.system.mem_total_bytes),
                            i(t.system.agent_rss_bytes),
                            t.system.temperature_c.map(f64::from),
                            i(t.system.disk_free_bytes),
                            i(t.system.disk_total_bytes),
                            i(t.spool_dropped),
                        ])?;
                        if n == 1 {
                            let r = rollups
                                .entry((dev, t.window_start_ms / HOUR_MS * HOUR_MS))
                                .or_default();
                            r.windows += 1;
                            r.inferences = r.inferences.saturating_add(t.inferences);
                            r.errors = r.errors.saturating_add(t.errors);
                            r.dq = r.dq.saturating_add(t.data_quality_errors);
                            r.latency_sum = r.latency_sum.saturating_add(t.latency.sum_us);
                            r.cpu_sum += f64::from(t.system.cpu_percent);
                            r.mem_max = r.mem_max.max(t.system.mem_used_bytes);
                        }
                        n == 1
                    }
                    Uplink::Hello(h) => {
                        let (am, ad) = model_text(&h.active);
                        let (sm, sd) = model_text(&h.staged);
                        tx.execute(
                            "UPDATE devices SET arch=?2, os=?3, agent_version=?4, online=1, active_model=?5, active_digest=?6, staged_model=?7, staged_digest=?8, reported_command_seq=max(reported_command_seq, ?9) WHERE id=?1",
                            params![dev, h.arch, h.os, h.agent_version, am, ad, sm, sd, i(h.last_command_seq)],
                        )?;
                        true
                    }
                    Uplink::Status(s) => {
                        let (am, ad) = model_text(&s.active);
                        let (sm, sd) = model_text(&s.staged);
                        let online = s.presence == Presence::Online;
                        tx.execute(
                            "UPDATE devices SET online=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest), staged_model=?5, staged_digest=?6 WHERE id=?1",
                            params![dev, online, am, ad, sm, sd],
                        )?;
                        true
                    }
                    Uplink::Progress(p) => {
                        let (m, d) = model_text(&p.model);
                        let n = tx.execute(
                            "INSERT OR IGNORE INTO progress VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                            params![
                                dev,
                                i(f.seq),
                                recv,
                                i(p.command_seq),
                                phase_text(p.phase),
                                d,
                                p.chunks_done,
                                p.chunks_total,
                                p.detail
                            ],
                        )?;
                        if n == 1 {
                            match p.phase {
                                Phase::Active | Phase::Healthy => tx.execute(
                                    "UPDATE devices SET last_phase=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest), staged_model=NULL, staged_digest=NULL WHERE id=?1",
                                    params![dev, phase_text(p.phase), m, d],
                                )?,
                                // The model the device returned to (its report names it).
                                Phase::RolledBack | Phase::Done => tx.execute(
                                    "UPDATE devices SET last_phase=?2, active_model=coalesce(?3, active_model), active_digest=coalesce(?4, active_digest) WHERE id=?1",
                                    params![dev, phase_text(p.phase), m, d],
                                )?,
                                Phase::Verified | Phase::SelfTested | Phase::Shadowing => tx.execute(
                                    "UPDATE devices SET last_phase=?2, staged_model=coalesce(?3, staged_model), staged_digest=coalesce(?4, staged_digest) WHERE id=?1",
                                    params![dev, phase_text(p.phase), m, d],
                                )?,
                                _ => tx.execute(
                                    "UPDATE devices SET last_phase=?2 WHERE id=?1",
                                    params![dev, phase_text(p.phase)],
                                )?,
                            };
                        }
                        n == 1
                    }
                    Uplink::Shadow(s) => {
                        tx.execute(
                            "INSERT OR IGNORE INTO shadow (device, seq, received_at_ms, active_digest, candidate_digest, compared, agreed, candidate_errors, active_latency, candidate_latency) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
                            params![
                                dev,
                                i(f.seq),
                                recv,
                                hex32(&s.active.digest),
                                hex32(&s.candidate.digest),
                                i(s.compared),
                                i(s.agreed),
                                i(s.candidate_errors),
                                pack_u64s(&s.active_latency.counts),
                                pack_u64s(&s.candidate_latency.counts)
                            ],
                        )? == 1
                    }
                    Uplink::Drift(d) => {
                        let sketch = serde_json::json!({
                            "features": d.features.iter().map(|s| serde_json::json!({
                                "counts": s.counts, "missing": s.missing, "out_of_range": s.out_of_range
                            })).collect::<Vec<_>>(),
                            "predictions": d.predictions,
                        });
                        tx.execute(
                            "INSERT OR IGNORE INTO drift VALUES (?1,?2,?3,?4,?5,?6,?7)",
                            params![
                                dev,
                                i(f.seq),
                                recv,
                                hex32(&d.model.digest),
                                i(d.window_start_ms),
                                i(d.window_end_ms),
                                sketch.to_string()
                            ],
                        )? == 1
                    }
                    Uplink::Samples(s) => {
                        let mut any = false;
                        for (idx, x) in s.samples.iter().enumerate() {
                            any |= tx.execute(
                                "INSERT OR IGNORE INTO samples VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                                params![
                                    dev,
                                    i(f.seq),
                                    idx as i64,
                                    hex32(&s.model.digest),
                                    i(x.request_id),
                                    i(x.at_ms),
                                    pack_f32s(&x.features),
                                    pack_f32s(&x.prediction)
                                ],
                            )? == 1;
                        }
                        any
                    }
                    Uplink::Labels(l) => {
                        let mut any = false;
                        for (idx, x) in l.labels.iter().enumerate() {
                            any |= tx.execute(
                                "INSERT OR IGNORE INTO labels VALUES (?1,?2,?3,?4,?5,?6)",
                                params![
                                    dev,
                                    i(f.seq),
                                    idx as i64,
                                    i(x.request_id),
                                    i(x.at_ms),
                                    x.value
                                ],
                            )? == 1;
                        }
                        any
                    }
                    // Not stored: served or logged by the caller.
                    Uplink::ChunkRequest(_) | Uplink::KeyringRefused(_) => true,
                };
                if inserted {
                    out.new_rows += 1;
                } else {
                    out.duplicates += 1;
                }
                out.stored.entry(f.device.clone()).or_default().push(f.seq);
            }
            let mut up_roll = tx.prepare_cached(
                "INSERT INTO telemetry_rollup VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)
                 ON CONFLICT (device, bucket_ms) DO UPDATE SET
                   windows = windows + excluded.windows,
                   inferences = inferences + excluded.inferences,
                   errors = errors + excluded.errors,
                   data_quality_errors = data_quality_errors + excluded.data_quality_errors,
                   latency_sum_us = latency_sum_us + excluded.latency_sum_us,
                   cpu_percent_sum = cpu_percent_sum + excluded.cpu_percent_sum,
                   mem_used_max = max(mem_used_max, excluded.mem_used_max)",
            )?;
            for ((dev, bucket), r) in &rollups {
                up_roll.execute(params![
                    dev,
                    i(*bucket),
                    i(r.windows),
                    i(r.inferences),
                    i(r.errors),
                    i(r.dq),
                    i(r.latency_sum),
                    r.cpu_sum,
                    i(r.mem_max)
                ])?;
            }
            let mut up_dev = tx.prepare_cached(
                // A device that speaks is online, even if it never said hello to this
                // process (it stayed connected to an external broker across a restart).
                "UPDATE devices SET max_uplink_seq = max(max_uplink_seq, ?2), last_seen_ms = max(coalesce(last_seen_ms, 0), ?3), online = CASE WHEN ?4 THEN 0 ELSE 1 END WHERE id = ?1 AND decommissioned = 0",
            )?;
            for (dev, (seq, at, offline)) in &seen {
                up_dev.execute(params![dev.as_str(), i(*seq), i(*at), offline])?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Deletes raw telemetry received before `before_ms` (rollups are kept).
    pub fn prune_telemetry(&mut self, before_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM telemetry WHERE received_at_ms < ?1",
            [i(before_ms)],
        )?)
    }

    pub fn telemetry(&self, device: &str, limit: u32) -> Result<Vec<TelemetryRow>> {
        let mut st = self.conn.prepare(
            "SELECT device, seq, received_at_ms, window_start_ms, window_end_ms, inferences, errors, cpu_percent, mem_used_bytes
             FROM telemetry WHERE device = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![device, limit], |r| {
            Ok(TelemetryRow {
                device: r.get(0)?,
                seq: r.get::<_, i64>(1)?.max(0) as u64,
                received_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
                window_start_ms: r.get::<_, i64>(3)?.max(0) as u64,
                window_end_ms: r.get::<_, i64>(4)?.max(0) as u64,
                inferences: r.get::<_, i64>(5)?.max(0) as u64,
                errors: r.get::<_, i64>(6)?.max(0) as u64,
                cpu_percent: r.get(7)?,
                mem_used_bytes: r.get::<_, i64>(8)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn telemetry_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM telemetry", [], |r| r.get::<_, i64>(0))?
            .max(0) as u64)
    }

    /// Rollup windows summed over every bucket of a device.
    pub fn rollup_windows(&self, device: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row(
                "SELECT coalesce(sum(windows), 0) FROM telemetry_rollup WHERE device = ?1",
                [device],
                |r| r.get::<_, i64>(0),
            )?
            .max(0) as u64)
    }

    // ---- models ----

    pub fn insert_model(&mut self, m: &ModelRow) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
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

    fn model_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelRow> {
        let hex_digest = |s: String| drover_protocol::topics::parse_hex32(&s).unwrap_or([0; 32]);
        Ok(ModelRow {
            digest: hex_digest(r.get(0)?),
            name: r.get(1)?,
            version: r.get(2)?,
            sha256: hex_digest(r.get(3)?),
            size: r.get::<_, i64>(4)?.max(0) as u64,
            chunk_size: r.get(5)?,
            created_at_ms: r.get::<_, i64>(6)?.max(0) as u64,
            key_id: r.get(7)?,
            payload: r.get(8)?,
            signature: r.get(9)?,
            summary: r.get(10)?,
        })
    }

    pub fn models(&self) -> Result<Vec<ModelRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM models ORDER BY name, created_at_ms")?;
        let rows = st.query_map([], Self::model_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn model(&self, name: &str, version: &str) -> Result<Option<ModelRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM models WHERE name = ?1 AND version = ?2",
                params![name, version],
                Self::model_from_row,
            )
            .optional()?)
    }

    pub fn model_by_digest(&self, digest: &[u8; 32]) -> Result<Option<ModelRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM models WHERE digest = ?1",
                [hex32(digest)],
                Self::model_from_row,
            )
            .optional()?)
    }

    // ---- commands ----

    /// Allocates the device's next command sequence, lets `build` sign the command for it,
    /// and commits the row before returning, so the sequence is durable before publishing.
    pub fn issue_command<E>(
        &mut self,
        device: &str,
        build: impl FnOnce(u64) -> std::result::Result<CommandRow, E>,
    ) -> Result<std::result::Result<CommandRow, E>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = next_command_seq(&tx, device)?;
        let row = match build(seq) {
            Ok(row) => row,
            Err(e) => return Ok(Err(e)),
        };
        insert_command(&tx, &row, None)?;
        tx.commit()?;
        Ok(Ok(row))
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
            seq: r.get::<_, i64>(1)?.max(0) as u64,
            issued_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
            expires_at_ms: r.get::<_, i64>(3)?.max(0) as u64,
            kind: r.get(4)?,
            model_digest: digest.and_then(|d| drover_protocol::topics::parse_hex32(&d)),
            key_id: kid,
            payload: r.get(7)?,
            signature: r.get(8)?,
        })
    }

    pub fn command(&self, device: &str, seq: u64) -> Result<Option<CommandRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM commands WHERE device = ?1 AND seq = ?2",
                params![device, i(seq)],
                Self::command_from_row,
            )
            .optional()?)
    }

    pub fn latest_command(&self, device: &str) -> Result<Option<CommandRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM commands WHERE device = ?1 ORDER BY seq DESC LIMIT 1",
                [device],
                Self::command_from_row,
            )
            .optional()?)
    }

    pub fn commands(&self, device: &str) -> Result<Vec<CommandRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM commands WHERE device = ?1 ORDER BY seq")?;
        let rows = st.query_map([device], Self::command_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    // ---- rollouts ----

    /// Creates a rollout; `header` builds its JSON state from the allocated id.
    pub fn create_rollout(
        &mut self,
        model_digest: &str,
        created_by: &str,
        now_ms: u64,
        header: impl FnOnce(u64) -> String,
    ) -> Result<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO rollouts (model_digest, status, created_by, created_at_ms, updated_at_ms, header) VALUES (?1, 'running', ?2, ?3, ?3, '{}')",
            params![model_digest, created_by, i(now_ms)],
        )?;
        let id = tx.last_insert_rowid().max(0) as u64;
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
            .map(|r| r.map(|v| v.max(0) as u64))
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
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
        let w = finish(&seqs);
        tx.execute(
            "UPDATE rollouts SET header = ?2, status = ?3, pending = ?4, updated_at_ms = ?5 WHERE id = ?1",
            params![i(id), w.header, w.status, i(w.pending), i(w.now_ms)],
        )?;
        {
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
        }
        tx.commit()?;
        Ok(Ok(rows))
    }

    /// Telemetry windows of one model received since `since_ms` (for rollout gates).
    pub fn model_health_since(&self, digest: &str, since_ms: u64) -> Result<Vec<HealthRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, model_digest, inferences, errors, latency_counts
             FROM telemetry WHERE model_digest = ?1 AND received_at_ms >= ?2",
        )?;
        let rows = st.query_map(params![digest, i(since_ms)], Self::health_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Telemetry windows of every model received in `[from_ms, to_ms)` (rollout baselines).
    pub fn health_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<HealthRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, model_digest, inferences, errors, latency_counts
             FROM telemetry WHERE received_at_ms >= ?1 AND received_at_ms < ?2 AND model_digest IS NOT NULL",
        )?;
        let rows = st.query_map(params![i(from_ms), i(to_ms)], Self::health_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn health_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HealthRow> {
        Ok(HealthRow {
            device: r.get(0)?,
            seq: r.get::<_, i64>(1)?.max(0) as u64,
            received_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
            model_digest: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
            inferences: r.get::<_, i64>(4)?.max(0) as u64,
            errors: r.get::<_, i64>(5)?.max(0) as u64,
            latency_counts: unpack_u64s(&r.get::<_, Vec<u8>>(6)?),
        })
    }

    /// Shadow reports for a candidate received since `since_ms`.
    pub fn shadow_since(&self, candidate_digest: &str, since_ms: u64) -> Result<Vec<ShadowRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, compared, agreed, active_latency, candidate_latency
             FROM shadow WHERE candidate_digest = ?1 AND received_at_ms >= ?2",
        )?;
        let rows = st.query_map(params![candidate_digest, i(since_ms)], |r| {
            Ok(ShadowRow {
                device: r.get(0)?,
                seq: r.get::<_, i64>(1)?.max(0) as u64,
                received_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
                compared: r.get::<_, i64>(3)?.max(0) as u64,
                agreed: r.get::<_, i64>(4)?.max(0) as u64,
                active_latency: unpack_u64s(&r.get::<_, Option<Vec<u8>>>(5)?.unwrap_or_default()),
                candidate_latency: unpack_u64s(
                    &r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default(),
                ),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Progress reports received since `since_ms`, in arrival order per device.
    pub fn progress_since(&self, since_ms: u64) -> Result<Vec<ProgressRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT device, seq, received_at_ms, command_seq, phase, detail FROM progress
             WHERE received_at_ms >= ?1 ORDER BY device, seq",
        )?;
        let rows = st.query_map([i(since_ms)], |r| {
            let phase: String = r.get(4)?;
            Ok(ProgressRow {
                device: r.get(0)?,
                seq: r.get::<_, i64>(1)?.max(0) as u64,
                received_at_ms: r.get::<_, i64>(2)?.max(0) as u64,
                command_seq: r.get::<_, i64>(3)?.max(0) as u64,
                phase: parse_phase(&phase),
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

// ---- issue 7: drift history, fleet training data and training jobs ----

/// A sampled live input with the label that came back for it.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledSample {
    pub device: String,
    pub at_ms: u64,
    pub features: Vec<f32>,
    pub label: f64,
}

/// A training job as stored.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct JobRow {
    pub id: u64,
    pub name: String,
    /// What started it: `manual`, `drift:<scope>`, `labels`, `schedule`.
    pub trigger: String,
    pub executor: String,
    /// The job spec TOML as submitted.
    pub spec: String,
    pub dir: String,
    /// `queued`, `running`, `succeeded`, `failed`, `timed-out`, `cancelled`.
    pub state: String,
    /// Slurm job id, or the local process id.
    pub external_id: Option<String>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub exit_code: Option<i64>,
    /// Failure detail (with the log tail) or the gate's reason.
    pub detail: Option<String>,
    pub dataset_hash: Option<String>,
    pub parent_model: Option<String>,
    /// `accepted` or `refused` once the gate ran.
    pub outcome: Option<String>,
    pub candidate_model: Option<String>,
    /// JSON: the gate's metrics for candidate and champion.
    pub metrics: Option<String>,
    /// JSON: the policy's rollout plan template recorded with an accepted candidate.
    pub rollout_plan: Option<String>,
}

fn unpack_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

impl Store {
    /// Drift sketches whose window ends in `[from_ms, to_ms)`, with their device's labels.
    pub fn drift_sketches(&self, from_ms: u64, to_ms: u64) -> Result<Vec<crate::drift::SketchRow>> {
        use drover_protocol::messages::FeatureSketch;
        let mut st = self.conn.prepare(
            "SELECT d.device, v.labels, d.model_digest, d.window_end_ms, d.sketch
             FROM drift d JOIN devices v ON v.id = d.device
             WHERE d.window_end_ms >= ?1 AND d.window_end_ms < ?2
             ORDER BY d.device, d.seq",
        )?;
        let rows = st.query_map(params![i(from_ms), i(to_ms)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, labels, digest, end, sketch) = row?;
            let corrupt = |detail: String| StoreError::Corrupt {
                table: "drift",
                detail,
            };
            let v: serde_json::Value =
                serde_json::from_str(&sketch).map_err(|e| corrupt(e.to_string()))?;
            let u64s = |x: &serde_json::Value| -> Vec<u64> {
                x.as_array()
                    .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                    .unwrap_or_default()
            };
            let features = v["features"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|f| FeatureSketch {
                            counts: u64s(&f["counts"]),
                            missing: f["missing"].as_u64().unwrap_or(0),
                            out_of_range: f["out_of_range"].as_u64().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(crate::drift::SketchRow {
                device,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                model_digest: drover_protocol::topics::parse_hex32(&digest)
                    .ok_or_else(|| corrupt(format!("bad digest {digest:?}")))?,
                window_end_ms: end.max(0) as u64,
                features,
                predictions: u64s(&v["predictions"]),
            });
        }
        Ok(out)
    }

    /// Stores one window's scores (a recomputed window replaces its earlier scores).
    pub fn insert_drift_scores(&mut self, scores: &[crate::drift::Score]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO drift_scores VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
            )?;
            for s in scores {
                st.execute(params![
                    s.scope,
                    s.model_digest,
                    i(s.window_start_ms),
                    i(s.window_end_ms),
                    s.feature,
                    i(s.count),
                    s.psi,
                    s.chi2,
                    s.p_value,
                    i(s.missing),
                    i(s.out_of_range),
                    s.level.as_str()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The worst level of every (scope, model digest, window end) since `since_ms`:
    /// what the sustained-drift trigger needs, without reading every score.
    pub fn drift_window_levels(
        &self,
        since_ms: u64,
    ) -> Result<Vec<(String, String, u64, crate::drift::Level)>> {
        use crate::drift::Level;
        let mut st = self.conn.prepare(
            "SELECT scope, model_digest, window_end_ms,
                    MAX(CASE level WHEN 'alert' THEN 2 WHEN 'warn' THEN 1 ELSE 0 END)
             FROM drift_scores WHERE window_end_ms >= ?1
             GROUP BY scope, model_digest, window_end_ms",
        )?;
        let rows = st.query_map([i(since_ms)], |r| {
            let level = match r.get::<_, i64>(3)? {
                2 => Level::Alert,
                1 => Level::Warn,
                _ => Level::Ok,
            };
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get::<_, i64>(2)?.max(0) as u64,
                level,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Deletes scores of windows that ended before `before_ms`.
    pub fn prune_drift_scores(&mut self, before_ms: u64) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM drift_scores WHERE window_end_ms < ?1",
            [i(before_ms)],
        )?)
    }

    fn score_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::drift::Score> {
        let level: String = r.get(11)?;
        Ok(crate::drift::Score {
            scope: r.get(0)?,
            model_digest: r.get(1)?,
            window_start_ms: r.get::<_, i64>(2)?.max(0) as u64,
            window_end_ms: r.get::<_, i64>(3)?.max(0) as u64,
            feature: r.get(4)?,
            count: r.get::<_, i64>(5)?.max(0) as u64,
            psi: r.get(6)?,
            chi2: r.get(7)?,
            p_value: r.get(8)?,
            missing: r.get::<_, i64>(9)?.max(0) as u64,
            out_of_range: r.get::<_, i64>(10)?.max(0) as u64,
            level: crate::drift::Level::parse(&level).unwrap_or(crate::drift::Level::Ok),
        })
    }

    /// Scores, newest window first; `scope` filters exactly; at most `limit` rows.
    pub fn drift_history(
        &self,
        scope: Option<&str>,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<crate::drift::Score>> {
        let mut st = self.conn.prepare(
            "SELECT * FROM drift_scores WHERE (?1 IS NULL OR scope = ?1) AND window_end_ms >= ?2
             ORDER BY window_end_ms DESC, scope, feature LIMIT ?3",
        )?;
        let rows = st.query_map(params![scope, i(since_ms), limit], Self::score_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The scores of the most recent scored window of every scope.
    pub fn drift_status(&self) -> Result<Vec<crate::drift::Score>> {
        let mut st = self.conn.prepare(
            "SELECT s.* FROM drift_scores s
             JOIN (SELECT scope, MAX(window_end_ms) AS last FROM drift_scores GROUP BY scope) l
               ON l.scope = s.scope AND l.last = s.window_end_ms
             ORDER BY s.scope, s.model_digest, s.feature",
        )?;
        let rows = st.query_map([], Self::score_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Inputs sampled at or after `since_ms` by any version of model `model_name`, with
    /// the label that came back for them, oldest first. A label only attaches to a sample
    /// taken before it (agents number requests from 1 again after a restart).
    pub fn labeled_samples(&self, since_ms: u64, model_name: &str) -> Result<Vec<LabeledSample>> {
        let mut st = self.conn.prepare(
            "SELECT s.device, s.at_ms, s.features, l.value
             FROM samples s
             JOIN models m ON m.digest = s.model_digest
             JOIN labels l ON l.device = s.device AND l.request_id = s.request_id
                          AND l.at_ms >= s.at_ms
             WHERE s.at_ms >= ?1 AND m.name = ?2
             ORDER BY s.at_ms, s.device, s.seq, s.idx",
        )?;
        let rows = st.query_map(params![i(since_ms), model_name], |r| {
            Ok(LabeledSample {
                device: r.get(0)?,
                at_ms: r.get::<_, i64>(1)?.max(0) as u64,
                features: unpack_f32s(&r.get::<_, Vec<u8>>(2)?),
                label: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Labels received at or after `since_ms`.
    pub fn labels_since(&self, since_ms: u64) -> Result<u64> {
        Ok(self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM labels WHERE at_ms >= ?1",
                [i(since_ms)],
                |r| r.get::<_, i64>(0),
            )?
            .max(0) as u64)
    }

    pub fn insert_job(&mut self, j: &JobRow) -> Result<u64> {
        self.conn.execute(
            "INSERT INTO training_jobs (name, trigger, executor, spec, dir, state, created_at_ms, parent_model)
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            params![j.name, j.trigger, j.executor, j.spec, j.dir, j.state, i(j.created_at_ms), j.parent_model],
        )?;
        Ok(self.conn.last_insert_rowid().max(0) as u64)
    }

    /// Writes every mutable field of a job.
    pub fn update_job(&mut self, j: &JobRow) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE training_jobs SET dir = ?2, state = ?3, external_id = ?4, finished_at_ms = ?5,
               exit_code = ?6, detail = ?7, dataset_hash = ?8, parent_model = ?9, outcome = ?10,
               candidate_model = ?11, metrics = ?12, rollout_plan = ?13
             WHERE id = ?1",
            params![
                i(j.id),
                j.dir,
                j.state,
                j.external_id,
                j.finished_at_ms.map(i),
                j.exit_code,
                j.detail,
                j.dataset_hash,
                j.parent_model,
                j.outcome,
                j.candidate_model,
                j.metrics,
                j.rollout_plan
            ],
        )?;
        if n == 0 {
            return Err(StoreError::Corrupt {
                table: "training_jobs",
                detail: format!("job {} does not exist", j.id),
            });
        }
        Ok(())
    }

    fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: r.get::<_, i64>(0)?.max(0) as u64,
            name: r.get(1)?,
            trigger: r.get(2)?,
            executor: r.get(3)?,
            spec: r.get(4)?,
            dir: r.get(5)?,
            state: r.get(6)?,
            external_id: r.get(7)?,
            created_at_ms: r.get::<_, i64>(8)?.max(0) as u64,
            finished_at_ms: opt_u64(r.get(9)?),
            exit_code: r.get(10)?,
            detail: r.get(11)?,
            dataset_hash: r.get(12)?,
            parent_model: r.get(13)?,
            outcome: r.get(14)?,
            candidate_model: r.get(15)?,
            metrics: r.get(16)?,
            rollout_plan: r.get(17)?,
        })
    }

    pub fn job(&self, id: u64) -> Result<Option<JobRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM training_jobs WHERE id = ?1",
                [i(id)],
                Self::job_from_row,
            )
            .optional()?)
    }

    /// Jobs, newest first.
    pub fn jobs(&self, limit: u32) -> Result<Vec<JobRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM training_jobs ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit], Self::job_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Jobs in one of `states`, oldest first.
    pub fn jobs_in_state(&self, states: &[&str]) -> Result<Vec<JobRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM training_jobs ORDER BY id")?;
        let rows = st.query_map([], Self::job_from_row)?;
        let all = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(all
            .into_iter()
            .filter(|j| states.contains(&j.state.as_str()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_protocol::messages::{LatencyHistogram, SystemFacts, TelemetryBatch};

    fn tel(dev: &DeviceId, seq: u64) -> Inbound {
        Inbound {
            frame: UplinkFrame {
                device: dev.clone(),
                seq,
                sent_at_ms: 1,
                msg: Uplink::Telemetry(TelemetryBatch {
                    window_start_ms: 1000 * seq,
                    window_end_ms: 1000 * seq + 999,
                    model: None,
                    inferences: 10,
                    errors: 1,
                    data_quality_errors: 0,
                    latency: LatencyHistogram::new(),
                    outputs: vec![1, 2],
                    system: SystemFacts::default(),
                    spool_dropped: 0,
                }),
            },
            received_at_ms: 5,
        }
    }

    #[test]
    fn migrations_run_once_and_telemetry_is_deduplicated_by_device_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let dev = DeviceId::new("gw-1").unwrap();
        {
            let mut s = Store::open(&path).unwrap();
            s.enroll_device(&dev, &DeviceKey([1; 32]), &BTreeMap::new(), 1)
                .unwrap();
            let o = s.apply_batch(&[tel(&dev, 1), tel(&dev, 2)]).unwrap();
            assert_eq!((o.new_rows, o.duplicates), (2, 0));
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let o = s.apply_batch(&[tel(&dev, 2), tel(&dev, 3)]).unwrap();
        assert_eq!((o.new_rows, o.duplicates), (1, 1));
        assert_eq!(o.stored[&dev], vec![2, 3]);
        assert_eq!(s.telemetry_count().unwrap(), 3);
        assert_eq!(s.rollup_windows("gw-1").unwrap(), 3);
        assert_eq!(s.device("gw-1").unwrap().unwrap().max_uplink_seq, 3);
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
}
