//! Training jobs (their state and the gate's outcome are enums stored as text) and the
//! labeled fleet samples a job trains on.

use std::fmt;

use rusqlite::{params, OptionalExtension};

use super::{i, opt_u64, u, u64_at, unpack_f32s, Result, Store, StoreError};

/// Where a training job is. Stored as [`JobState::as_str`] in `training_jobs.state`, and
/// shown with the same strings by the HTTP API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum JobState {
    #[default]
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed-out",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state a stored string names; an unknown string is refused with what it may be.
    pub fn parse(s: &str) -> Result<JobState> {
        parse_one(&Self::ALL, Self::as_str, "state", s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the evaluation gate decided about a succeeded job's candidate. Stored as
/// [`JobOutcome::as_str`] in `training_jobs.outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobOutcome {
    Accepted,
    Refused,
}

impl JobOutcome {
    pub const ALL: [JobOutcome; 2] = [JobOutcome::Accepted, JobOutcome::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Accepted => "accepted",
            JobOutcome::Refused => "refused",
        }
    }

    /// The outcome a stored string names; an unknown string is refused with what it may be.
    pub fn parse(s: &str) -> Result<JobOutcome> {
        parse_one(&Self::ALL, Self::as_str, "outcome", s)
    }
}

impl fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_one<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    column: &'static str,
    s: &str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|v| name(*v) == s)
        .ok_or_else(|| StoreError::UnknownValue {
            table: "training_jobs",
            column,
            value: s.to_owned(),
            expected: all.iter().map(|v| name(*v)).collect::<Vec<_>>().join(", "),
        })
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
    pub state: JobState,
    /// Slurm job id, or the local process id.
    pub external_id: Option<String>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub exit_code: Option<i64>,
    /// Failure detail (with the log tail) or the gate's reason.
    pub detail: Option<String>,
    pub dataset_hash: Option<String>,
    pub parent_model: Option<String>,
    /// Set once the gate ran.
    pub outcome: Option<JobOutcome>,
    pub candidate_model: Option<String>,
    /// JSON: the gate's metrics for candidate and champion.
    pub metrics: Option<String>,
    /// JSON: the policy's rollout plan template recorded with an accepted candidate.
    pub rollout_plan: Option<String>,
}

/// A sampled live input with the label that came back for it.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledSample {
    pub device: String,
    pub at_ms: u64,
    pub features: Vec<f32>,
    pub label: f64,
}

/// A job row, its state and outcome still text: the enums are parsed outside SQLite's
/// row callback so that an unknown value is a [`StoreError::UnknownValue`].
fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(JobRow, String, Option<String>)> {
    let row = JobRow {
        id: u64_at(r, 0)?,
        name: r.get(1)?,
        trigger: r.get(2)?,
        executor: r.get(3)?,
        spec: r.get(4)?,
        dir: r.get(5)?,
        state: JobState::Queued,
        external_id: r.get(7)?,
        created_at_ms: u64_at(r, 8)?,
        finished_at_ms: opt_u64(r.get(9)?),
        exit_code: r.get(10)?,
        detail: r.get(11)?,
        dataset_hash: r.get(12)?,
        parent_model: r.get(13)?,
        outcome: None,
        candidate_model: r.get(15)?,
        metrics: r.get(16)?,
        rollout_plan: r.get(17)?,
    };
    Ok((row, r.get(6)?, r.get(14)?))
}

fn parse_job(raw: rusqlite::Result<(JobRow, String, Option<String>)>) -> Result<JobRow> {
    let (mut row, state, outcome) = raw?;
    row.state = JobState::parse(&state)?;
    row.outcome = outcome.as_deref().map(JobOutcome::parse).transpose()?;
    Ok(row)
}

impl Store {
    pub fn insert_job(&mut self, j: &JobRow) -> Result<u64> {
        self.conn.execute(
            "INSERT INTO training_jobs (name, trigger, executor, spec, dir, state, created_at_ms, parent_model)
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            params![j.name, j.trigger, j.executor, j.spec, j.dir, j.state.as_str(), i(j.created_at_ms), j.parent_model],
        )?;
        Ok(u(self.conn.last_insert_rowid()))
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
                j.state.as_str(),
                j.external_id,
                j.finished_at_ms.map(i),
                j.exit_code,
                j.detail,
                j.dataset_hash,
                j.parent_model,
                j.outcome.map(JobOutcome::as_str),
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

    pub fn job(&self, id: u64) -> Result<Option<JobRow>> {
        self.conn
            .query_row(
                "SELECT * FROM training_jobs WHERE id = ?1",
                [i(id)],
                job_from_row,
            )
            .optional()
            .transpose()
            .map(parse_job)
            .transpose()
    }

    /// Jobs, newest first.
    pub fn jobs(&self, limit: u32) -> Result<Vec<JobRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM training_jobs ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit], job_from_row)?;
        rows.map(parse_job).collect()
    }

    /// Jobs in one of `states`, oldest first.
    pub fn jobs_in_state(&self, states: &[JobState]) -> Result<Vec<JobRow>> {
        let mut st = self
            .conn
            .prepare("SELECT * FROM training_jobs ORDER BY id")?;
        let rows = st.query_map([], job_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            let row = parse_job(row)?;
            if states.contains(&row.state) {
                out.push(row);
            }
        }
        Ok(out)
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
                at_ms: u64_at(r, 1)?,
                features: unpack_f32s(&r.get::<_, Vec<u8>>(2)?),
                label: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Labels received at or after `since_ms`.
    pub fn labels_since(&self, since_ms: u64) -> Result<u64> {
        Ok(u(self.conn.query_row(
            "SELECT COUNT(*) FROM labels WHERE at_ms >= ?1",
            [i(since_ms)],
            |r| r.get::<_, i64>(0),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use drover_protocol::messages::{Label, LabelBatch, Sample, SampleBatch, Uplink};

    use super::super::ingest::tests::{enrolled, frame, model_ref};
    use super::super::models::tests::model;
    use super::*;

    fn queued(name: &str) -> JobRow {
        JobRow {
            name: name.into(),
            trigger: "manual".into(),
            executor: "local".into(),
            spec: "name = \"j\"".into(),
            created_at_ms: 10,
            ..Default::default()
        }
    }

    #[test]
    fn job_states_and_outcomes_keep_their_stored_strings() {
        let strings: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            strings,
            [
                "queued",
                "running",
                "succeeded",
                "failed",
                "timed-out",
                "cancelled"
            ]
        );
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()).unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        for o in JobOutcome::ALL {
            assert_eq!(JobOutcome::parse(o.as_str()).unwrap(), o);
        }
        assert_eq!(JobOutcome::Accepted.as_str(), "accepted");
        assert_eq!(JobOutcome::Refused.as_str(), "refused");
    }

    #[test]
    fn jobs_round_trip_and_are_listed_by_state() {
        let (_dir, mut s) = enrolled(&[]);
        let mut a = queued("a");
        a.id = s.insert_job(&a).unwrap();
        let mut b = queued("b");
        b.id = s.insert_job(&b).unwrap();
        a.state = JobState::Succeeded;
        a.outcome = Some(JobOutcome::Accepted);
        a.finished_at_ms = Some(20);
        a.exit_code = Some(0);
        a.metrics = Some("{}".into());
        s.update_job(&a).unwrap();
        b.state = JobState::Running;
        b.external_id = Some("123".into());
        s.update_job(&b).unwrap();

        assert_eq!(s.job(a.id).unwrap(), Some(a.clone()));
        assert_eq!(s.job(99).unwrap(), None);
        assert_eq!(s.jobs(10).unwrap(), vec![b.clone(), a.clone()]);
        assert_eq!(
            s.jobs_in_state(&[JobState::Queued, JobState::Running])
                .unwrap(),
            vec![b]
        );
        let ghost = JobRow {
            id: 99,
            ..queued("ghost")
        };
        assert!(matches!(
            s.update_job(&ghost),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn an_unknown_job_state_or_outcome_in_the_database_is_refused_by_name() {
        let (_dir, mut s) = enrolled(&[]);
        let id = s.insert_job(&queued("a")).unwrap();
        s.conn
            .execute(
                "UPDATE training_jobs SET state = 'paused' WHERE id = ?1",
                [i(id)],
            )
            .unwrap();
        let e = s.job(id).unwrap_err();
        assert!(
            matches!(&e, StoreError::UnknownValue { column: "state", value, .. } if value == "paused"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("training_jobs.state holds \"paused\""),
            "{msg}"
        );
        assert!(
            msg.contains("queued, running, succeeded, failed, timed-out, cancelled"),
            "{msg}"
        );
        assert!(s.jobs(10).is_err() && s.jobs_in_state(&[JobState::Running]).is_err());

        s.conn
            .execute(
                "UPDATE training_jobs SET state = 'succeeded', outcome = 'maybe' WHERE id = ?1",
                [i(id)],
            )
            .unwrap();
        let e = s.job(id).unwrap_err().to_string();
        assert!(e.contains("training_jobs.outcome holds \"maybe\""), "{e}");
    }

    #[test]
    fn labels_join_the_samples_taken_before_them_by_model_name() {
        let (_dir, mut s) = enrolled(&["gw-1"]);
        let m = model_ref(6);
        let mut row = model("cls", &m.version, 6);
        row.digest = m.digest;
        s.insert_model(&row).unwrap();
        let sample = |request_id, at_ms, x: f32| Sample {
            request_id,
            at_ms,
            features: vec![x, x + 1.0],
            prediction: vec![1.0],
        };
        let label = |request_id, at_ms, value| Label {
            request_id,
            at_ms,
            value,
        };
        let samples = Uplink::Samples(SampleBatch {
            model: m,
            samples: vec![sample(1, 100, 0.5), sample(2, 200, 1.5)],
        });
        // Request 2's label is older than its sample: from before an agent restart.
        let labels = Uplink::Labels(LabelBatch {
            labels: vec![label(1, 150, 1.0), label(2, 50, 0.0)],
        });
        s.apply_batch(&[
            frame("gw-1", 1, 300, samples),
            frame("gw-1", 2, 300, labels),
        ])
        .unwrap();
        let got = s.labeled_samples(0, "cls").unwrap();
        assert_eq!(
            got,
            vec![LabeledSample {
                device: "gw-1".into(),
                at_ms: 100,
                features: vec![0.5, 1.5],
                label: 1.0,
            }]
        );
        assert!(s.labeled_samples(101, "cls").unwrap().is_empty());
        assert!(s.labeled_samples(0, "other").unwrap().is_empty());
        assert_eq!(s.labels_since(0).unwrap(), 2);
        assert_eq!(s.labels_since(100).unwrap(), 1);
    }
}
