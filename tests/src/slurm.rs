//! A real single-node Slurm cluster for tests (Debian `slurm-wlm` and `munge`): munged,
//! slurmctld and slurmd in the foreground as children of the test, with their own config,
//! key, sockets, state and logs in a temp dir, on free loopback ports. Killed on drop.
//!
//! Needs root (slurmd runs jobs as the submitting user and manages their processes) —
//! CI runs as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub struct SlurmCluster {
    children: Vec<Child>,
    pub dir: PathBuf,
    /// `SLURM_CONF` for client commands.
    pub conf: PathBuf,
}

/// Whether the Slurm and munge daemons are installed.
pub fn installed() -> bool {
    [
        "/usr/sbin/slurmctld",
        "/usr/sbin/slurmd",
        "/usr/sbin/munged",
    ]
    .iter()
    .all(|p| Path::new(p).exists())
        && which("sbatch")
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn hostname() -> anyhow::Result<String> {
    let out = Command::new("hostname").arg("-s").output()?;
    let h = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if h.is_empty() {
        bail!("hostname -s printed nothing");
    }
    Ok(h)
}

impl SlurmCluster {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        if !installed() {
            bail!("slurm-wlm and munge are not installed (run .ci/install-deps.sh)");
        }
        for d in ["state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let key = dir.join("munge.key");
        let mut k = vec![0u8; 1024];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8) ^ (std::process::id() as u8).wrapping_mul(31) ^ 0x5a;
        }
        // munged only needs the key secret from other users; the cluster is loopback-only
        // and lives as long as the test.
        std::fs::write(&key, &k)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let socket = dir.join("munge.sock");
        let mut cluster = SlurmCluster {
            children: Vec::new(),
            dir: dir.to_owned(),
            conf: dir.join("slurm.conf"),
        };
        cluster.children.push(
            Command::new("/usr/sbin/munged")
                .arg("-F")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!(
                    "--log-file={}",
                    dir.join("log/munged.log").display()
                ))
                .arg(format!("--pid-file={}", dir.join("munged.pid").display()))
                .arg(format!("--seed-file={}", dir.join("munged.seed").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting munged")?,
        );
        crate::wait_until("munge socket", Duration::from_secs(20), || async {
            socket.exists().then_some(())
        })
        .await?;
        let host = hostname()?;
        let d = dir.display();
        let conf = format!(
            "ClusterName=drovertest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n\
             SlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             ReturnToService=2\nMpiDefault=none\nJobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n\
             SwitchType=switch/none\nMinJobAge=600\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1024 State=UNKNOWN\n\
             PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            ctld = crate::free_port(),
            slurmd = crate::free_port(),
            sock = socket.display(),
        );
        std::fs::write(&cluster.conf, conf)?;
        for (daemon, extra) in [
            ("/usr/sbin/slurmctld", &["-i"][..]),
            ("/usr/sbin/slurmd", &[][..]),
        ] {
            cluster.children.push(
                Command::new(daemon)
                    .arg("-D")
                    .args(extra)
                    .arg("-f")
                    .arg(&cluster.conf)
                    .env("SLURM_CONF", &cluster.conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("starting {daemon}"))?,
            );
        }
        let conf = cluster.conf.clone();
        crate::wait_until("slurm node idle", Duration::from_secs(60), || {
            let conf = conf.clone();
            async move {
                let out = Command::new("sinfo")
                    .args(["-h", "-o", "%T"])
                    .env("SLURM_CONF", &conf)
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .starts_with("idle")
                    .then_some(())
            }
        })
        .await
        .with_context(|| {
            format!(
                "slurmctld log:\n{}\nslurmd log:\n{}",
                std::fs::read_to_string(dir.join("log/slurmctld.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("log/slurmd.log")).unwrap_or_default()
            )
        })?;
        Ok(cluster)
    }

    /// The executor settings that point Drover at this cluster.
    pub fn config(&self) -> drover_control_plane::jobs::slurm::SlurmConfig {
        drover_control_plane::jobs::slurm::SlurmConfig {
            bin_dir: None,
            slurm_conf: Some(self.conf.clone()),
        }
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Daemons first, munged last (they authenticate through it while stopping).
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
