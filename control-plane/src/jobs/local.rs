//! The local-process executor, the embedded default: runs the trainer as a child process
//! in the job's directory, with stdout and stderr captured in `job.log`, a concurrency
//! limit, a timeout and cancellation.
//!
//! The trainer runs in its own process group, and a timeout or cancellation kills the
//! whole group, so a wrapper script cannot leave its children training on.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::{JobError, JobPaths, Outcome};

/// Runs jobs as local processes, at most `concurrency` at a time.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    permits: Arc<Semaphore>,
}

impl LocalExecutor {
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Runs `argv` to completion, timeout or cancellation. Waits for a permit first.
    pub async fn run(
        &self,
        paths: &JobPaths,
        argv: &[String],
        timeout: Duration,
        cancel: &Notify,
    ) -> Result<Outcome, JobError> {
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.map_err(|_| JobError::Slurm("executor closed".into()))?,
            _ = cancel.notified() => return Ok(Outcome::Cancelled),
        };
        let io = |what, path: &std::path::Path| {
            let path = path.to_owned();
            move |source| JobError::Io { what, path, source }
        };
        std::fs::create_dir_all(&paths.out).map_err(io("cannot create", &paths.out))?;
        let log = std::fs::File::create(&paths.log).map_err(io("cannot create", &paths.log))?;
        let log2 = log.try_clone().map_err(io("cannot open", &paths.log))?;
        let (program, args) = argv.split_first().ok_or_else(|| JobError::Spawn {
            program: String::new(),
            source: std::io::Error::other("empty command"),
        })?;
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(&paths.dir)
            .env("DROVER_DATASET", &paths.train)
            .env("DROVER_OUT", &paths.out)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| JobError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pid = child.id();
        tracing::info!(program = %program, pid, dir = %paths.dir.display(), "training job started");
        let outcome = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(io("cannot wait for", &paths.dir))?;
                if status.success() {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed { exit_code: status.code().map(i64::from) }
                }
            }
            _ = tokio::time::sleep(timeout) => Outcome::TimedOut,
            _ = cancel.notified() => Outcome::Cancelled,
        };
        if matches!(outcome, Outcome::TimedOut | Outcome::Cancelled) {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            let _ = child.kill().await;
        }
        Ok(outcome)
    }
}

/// Kills a process group with the system `kill` (no `unsafe` signal calls here).
fn kill_group(pgid: u32) {
    let r = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = r {
        tracing::warn!(pgid, error = %e, "cannot kill the job's process group");
    }
}
