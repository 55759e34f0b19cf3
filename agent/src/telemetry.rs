//! System facts for telemetry (sysinfo), sampled once per window.

use std::path::Path;

use drover_protocol::messages::SystemFacts;
use sysinfo::{Components, Disks, Pid, ProcessesToUpdate, System};

pub struct SysProbe {
    sys: System,
    pid: Pid,
    /// Whether the hidden-/proc warning was logged (once per process).
    warned: bool,
}

impl Default for SysProbe {
    fn default() -> Self {
        Self::new()
    }
}

impl SysProbe {
    pub fn new() -> Self {
        Self {
            sys: System::new(),
            pid: Pid::from_u32(std::process::id()),
            warned: false,
        }
    }

    /// Whether the host's CPU counters and memory can be read. sysinfo reads
    /// `/proc/stat` and `/proc/meminfo` and answers 0 when they are hidden (systemd's
    /// `ProcSubset=pid`), which would pass for an idle CPU and empty memory.
    fn host_facts_visible(&mut self) -> (bool, bool) {
        let cpu = std::fs::File::open("/proc/stat").is_ok();
        let mem = std::fs::File::open("/proc/meminfo").is_ok();
        let hidden = !(cpu && mem);
        if hidden && !self.warned {
            self.warned = true;
            tracing::warn!(
                cpu_visible = cpu,
                memory_visible = mem,
                "/proc/stat or /proc/meminfo is hidden (systemd ProcSubset=pid?): host CPU and \
                 memory are reported as unknown"
            );
        }
        (cpu, mem)
    }

    /// Samples CPU, memory, agent RSS, temperature and the data dir's disk (blocking, ~ms).
    pub fn sample(&mut self, data_dir: &Path) -> SystemFacts {
        self.sys.refresh_memory();
        self.sys.refresh_cpu_usage();
        self.sys
            .refresh_processes(ProcessesToUpdate::Some(&[self.pid]), true);
        let rss = self.sys.process(self.pid).map(|p| p.memory()).unwrap_or(0);
        let temperature_c = Components::new_with_refreshed_list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .reduce(f32::max);
        let disks = Disks::new_with_refreshed_list();
        let canon = data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_owned());
        let disk = disks
            .iter()
            .filter(|d| canon.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        let (cpu_visible, mem_visible) = self.host_facts_visible();
        let (mem_used, mem_total) = if mem_visible && self.sys.total_memory() > 0 {
            (self.sys.used_memory(), self.sys.total_memory())
        } else {
            (0, 0)
        };
        SystemFacts {
            cpu_percent: if cpu_visible && !self.sys.cpus().is_empty() {
                self.sys.global_cpu_usage()
            } else {
                SystemFacts::CPU_UNKNOWN
            },
            mem_used_bytes: mem_used,
            mem_total_bytes: mem_total,
            agent_rss_bytes: rss,
            temperature_c,
            disk_free_bytes: disk.map(|d| d.available_space()).unwrap_or(0),
            disk_total_bytes: disk.map(|d| d.total_space()).unwrap_or(0),
        }
    }
}

/// Resident set size of this process in bytes, from /proc (Linux), for the benchmark.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
