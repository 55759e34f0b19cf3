//! The Slurm executor: the job becomes a batch script submitted with `sbatch`; its state
//! is followed with `squeue`, then `scontrol show job`, then `sacct` (whichever still knows
//! the job), and the exit code the script writes into the job directory. Everything needed
//! to follow a job is its Slurm id and its directory, both in the store, so a restarted
//! control plane re-attaches to jobs it submitted before.

use std::path::PathBuf;
use std::process::Stdio;

use super::{JobError, JobPaths, Outcome, Resources};

/// Where the Slurm client commands are and which cluster config they use.
#[derive(Clone, Debug, Default)]
pub struct SlurmConfig {
    /// Directory of `sbatch`, `squeue`, `scontrol`, `sacct`, `scancel` (default: `PATH`).
    pub bin_dir: Option<PathBuf>,
    /// `SLURM_CONF` for the client commands (default: the system's).
    pub slurm_conf: Option<PathBuf>,
}

/// What Slurm says about a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlurmState {
    /// Pending, running, completing: not over yet.
    Active(String),
    Done(Outcome),
}

impl SlurmConfig {
    fn command(&self, name: &str) -> tokio::process::Command {
        let program = match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        };
        let mut c = tokio::process::Command::new(program);
        if let Some(conf) = &self.slurm_conf {
            c.env("SLURM_CONF", conf);
        }
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    async fn output(&self, name: &str, args: &[&str]) -> Result<(bool, String, String), JobError> {
        let out = self
            .command(name)
            .args(args)
            .output()
            .await
            .map_err(|source| JobError::Spawn {
                program: name.to_owned(),
                source,
            })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }

    /// Writes the batch script and submits it; returns the Slurm job id.
    pub async fn submit(
        &self,
        job_name: &str,
        paths: &JobPaths,
        argv: &[String],
        resources: &Resources,
        timeout_secs: u64,
    ) -> Result<String, JobError> {
        let io = |what, path: &std::path::Path| {
            let path = path.to_owned();
            move |source| JobError::Io { what, path, source }
        };
        std::fs::create_dir_all(&paths.out).map_err(io("cannot create", &paths.out))?;
        let script_path = paths.dir.join("job.sbatch");
        let script = batch_script(job_name, paths, argv, resources, timeout_secs);
        std::fs::write(&script_path, script).map_err(io("cannot write", &script_path))?;
        let script_arg = script_path.to_string_lossy().into_owned();
        let (ok, out, err) = self.output("sbatch", &["--parsable", &script_arg]).await?;
        if !ok {
            return Err(JobError::Slurm(format!("sbatch refused the job: {err}")));
        }
        // `--parsable` prints `id` or `id;cluster`.
        let id = out.split(';').next().unwrap_or("").trim().to_owned();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(JobError::Slurm(format!(
                "sbatch printed {out:?}, not a job id"
            )));
        }
        tracing::info!(slurm_job = %id, dir = %paths.dir.display(), "training job submitted to slurm");
        Ok(id)
    }

    /// The job's state, from whichever source still knows it.
    pub async fn poll(&self, id: &str, paths: &JobPaths) -> Result<SlurmState, JobError> {
        // The exit code file is written by the script itself as its last act.
        if let Ok(code) = std::fs::read_to_string(paths.dir.join("exit_code")) {
            let code: i64 = code.trim().parse().unwrap_or(-1);
            return Ok(SlurmState::Done(if code == 0 {
                Outcome::Succeeded
            } else {
                Outcome::Failed {
                    exit_code: Some(code),
                }
            }));
        }
        let (ok, out, _) = self.output("squeue", &["-h", "-j", id, "-o", "%T"]).await?;
        if ok && !out.is_empty() {
            return Ok(state_of(&out));
        }
        let (ok, out, _) = self
            .output("scontrol", &["show", "job", id, "--oneliner"])
            .await?;
        if ok {
            if let Some(s) = out
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("JobState="))
            {
                return Ok(state_of(s));
            }
        }
        let (ok, out, _) = self
            .output("sacct", &["-n", "-X", "-P", "-j", id, "-o", "State"])
            .await?;
        if ok && !out.is_empty() {
            return Ok(state_of(out.lines().next().unwrap_or("")));
        }
        // Forgotten by Slurm and no exit code: the script never finished.
        Ok(SlurmState::Done(Outcome::Failed { exit_code: None }))
    }

    pub async fn cancel(&self, id: &str) -> Result<(), JobError> {
        let (ok, _, err) = self.output("scancel", &[id]).await?;
        if ok {
            Ok(())
        } else {
            Err(JobError::Slurm(format!("scancel {id}: {err}")))
        }
    }
}

/// Maps a Slurm job state name to ours.
fn state_of(s: &str) -> SlurmState {
    let s = s.trim().trim_end_matches('+');
    let word = s.split_whitespace().next().unwrap_or("");
    match word {
        "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
        | "RESIZING" | "STAGE_OUT" | "SIGNALING" => SlurmState::Active(word.to_owned()),
        "COMPLETED" => SlurmState::Done(Outcome::Succeeded),
        "TIMEOUT" | "DEADLINE" => SlurmState::Done(Outcome::TimedOut),
        w if w.starts_with("CANCELLED") => SlurmState::Done(Outcome::Cancelled),
        _ => SlurmState::Done(Outcome::Failed { exit_code: None }),
    }
}

/// Single-quotes a word for bash.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn batch_script(
    job_name: &str,
    paths: &JobPaths,
    argv: &[String],
    r: &Resources,
    timeout_secs: u64,
) -> String {
    let dir = paths.dir.to_string_lossy();
    let mut s = String::from("#!/bin/bash\n");
    s += &format!("#SBATCH --job-name=drover-{job_name}\n");
    s += &format!("#SBATCH --output={}\n", paths.log.to_string_lossy());
    s += &format!("#SBATCH --chdir={dir}\n");
    s += &format!("#SBATCH --time={}\n", timeout_secs.div_ceil(60).max(1));
    s += &format!("#SBATCH --cpus-per-task={}\n", r.cpus);
    if let Some(m) = r.memory_mb {
        s += &format!("#SBATCH --mem={m}M\n");
    }
    if let Some(p) = &r.partition {
        s += &format!("#SBATCH --partition={p}\n");
    }
    s += &format!(
        "export DROVER_DATASET={}\nexport DROVER_OUT={}\n",
        sh_quote(&paths.train.to_string_lossy()),
        sh_quote(&paths.out.to_string_lossy())
    );
    s += &argv
        .iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    s += "\nrc=$?\n";
    s += &format!(
        "echo $rc > {d}/exit_code.tmp && mv {d}/exit_code.tmp {d}/exit_code\nexit $rc\n",
        d = sh_quote(&dir)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_states_map_to_outcomes() {
        assert_eq!(state_of("RUNNING"), SlurmState::Active("RUNNING".into()));
        assert_eq!(state_of("COMPLETED"), SlurmState::Done(Outcome::Succeeded));
        assert_eq!(state_of("TIMEOUT"), SlurmState::Done(Outcome::TimedOut));
        assert_eq!(
            state_of("CANCELLED by 0"),
            SlurmState::Done(Outcome::Cancelled)
        );
        assert_eq!(
            state_of("NODE_FAIL"),
            SlurmState::Done(Outcome::Failed { exit_code: None })
        );
    }

    #[test]
    fn batch_script_quotes_every_argument() {
        let p = JobPaths::new(std::path::Path::new("/tmp/j 1"));
        let s = batch_script(
            "n",
            &p,
            &["echo".into(), "it's".into()],
            &Resources::default(),
            90,
        );
        assert!(s.contains("'echo' 'it'\\''s'"), "{s}");
        assert!(s.contains("#SBATCH --time=2\n"), "{s}");
    }
}
