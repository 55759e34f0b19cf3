//! Isolated model checks (issue 25): a new model (deploy or shadow) is loaded and self-tested
//! in a short-lived child process before the agent loads it to serve, so a model that
//! panics, aborts, crashes or runs away in memory or time takes down the child, never the
//! agent.
//!
//! The child is the agent binary in its hidden mode `drover-agent check-model --model FILE
//! --manifest - --threads N --memory-bytes M --cpu-seconds C`: it limits itself first
//! (`RLIMIT_AS` to M bytes, `RLIMIT_CPU` to C seconds; it sets its own limits after exec, so
//! no `pre_exec` and no unsafe code), reads the manifest as JSON on stdin, loads the model
//! ([`load`], the one call to switch by artifact format), runs the manifest's test vectors
//! and sampled vectors exactly as the in-process path did, and prints one JSON [`Report`]
//! on stdout. The parent ([`Loader::check`]) kills it at the wall-clock limit and turns
//! every way it can end into one reason for the deployment's failure ("self-test child
//! killed by SIGKILL after 30 s limit", "self-test child exceeded the 512 MiB memory limit
//! (runtime.load_memory_bytes)").
//!
//! The same binary on both ends, so the JSON between them is not a wire format.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_protocol::manifest::Manifest;
use drover_runtime::{self_test, self_test_sampled, Model, RuntimeError, Threads};
use serde::{Deserialize, Serialize};

use crate::config::RuntimeConfig;

/// The agent binary's name: what `current_exe()` must be called to serve as the loader.
pub const AGENT_EXE: &str = "drover-agent";
/// Memory limit with `runtime.load_memory_bytes = 0`: this floor plus
/// [`MEMORY_PER_MODEL_BYTE`] times the model file's size (BENCHMARKS.md, issue 25).
pub const MEMORY_FLOOR: u64 = 512 << 20;
pub const MEMORY_PER_MODEL_BYTE: u64 = 16;
/// tract-data's message when an allocation fails (an assertion, so a panic).
const TRACT_ALLOC_FAILED: &str = "failed to allocate";
/// At most this much of the child's stdout and stderr is kept.
const MAX_OUTPUT: u64 = 1 << 20;

/// How to run the check: which executable, with which limits.
#[derive(Clone, Debug)]
pub struct Loader {
    pub exe: PathBuf,
    /// 0: derived from the model's size ([`Loader::memory_limit`]).
    pub memory_bytes: u64,
    pub timeout: Duration,
    /// Test-only crash point armed in every child (`--loader-crash-at`).
    pub crash_at: Option<String>,
}

/// What the child prints: passed, or refused with the runtime's reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    /// The runtime's reason, when the model is refused.
    #[serde(default)]
    pub refused: Option<String>,
    /// An allocation failed under the memory limit (tract reports it as a panic).
    #[serde(default)]
    pub out_of_memory: bool,
    pub load_ms: f64,
    pub self_test_ms: f64,
    /// `VmHWM` and `VmPeak` of the child at the end (0 where `/proc` is hidden).
    pub peak_rss_bytes: u64,
    pub peak_vm_bytes: u64,
}

impl Loader {
    /// The loader the config asks for: none with `runtime.isolate = false`; else
    /// `runtime.loader_exe`, or this process when it is `drover-agent`, or a `drover-agent`
    /// beside this process's executable (`drover demo` installed with the agent). An
    /// embedding that has none of these is refused at start, never run unisolated.
    pub fn resolve(rt: &RuntimeConfig, crash_at: Option<String>) -> Result<Option<Loader>, String> {
        if !rt.isolate {
            return Ok(None);
        }
        let exe = match &rt.loader_exe {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => {
                return Err(format!(
                    "runtime.loader_exe: {} is not a file; point it at the drover-agent binary",
                    p.display()
                ))
            }
            None => {
                let me = std::env::current_exe()
                    .map_err(|e| format!("runtime.isolate: cannot find this executable: {e}"))?;
                find_agent_exe(&me).ok_or_else(|| {
                    format!(
                        "runtime.isolate is on, but this process ({}) is not {AGENT_EXE} and no \
                         {AGENT_EXE} is beside it to load models in: set runtime.loader_exe to \
                         the drover-agent binary, or runtime.isolate = false to load models \
                         in-process",
                        me.display()
                    )
                })?
            }
        };
        Ok(Some(Loader {
            exe,
            memory_bytes: rt.load_memory_bytes,
            timeout: Duration::from_millis(rt.load_timeout_ms),
            crash_at,
        }))
    }

    /// The child's address-space limit for a model file of `size` bytes.
    pub fn memory_limit(&self, size: u64) -> u64 {
        if self.memory_bytes != 0 {
            return self.memory_bytes;
        }
        MEMORY_FLOOR.saturating_add(size.saturating_mul(MEMORY_PER_MODEL_BYTE))
    }

    /// CPU seconds: the wall-clock limit on every thread the model may use, plus one.
    fn cpu_seconds(&self, threads: Threads) -> u64 {
        self.timeout.as_secs_f64().ceil() as u64 * threads.count().max(1) as u64 + 1
    }

    /// Loads and self-tests `model` (the file, already checked against `manifest`) in a
    /// child. `Ok` only when the child ran to the end and the model passed; `Err` is the
    /// reason, the runtime's own when it refused the model.
    pub fn check(&self, model: &Path, manifest: &Manifest, threads: u32) -> Result<Report, String> {
        let memory = self.memory_limit(manifest.size);
        let threads_used = Threads::from_config(threads as usize);
        let mut cmd = Command::new(&self.exe);
        if let Some(spec) = &self.crash_at {
            cmd.args(["--crash-at", spec]);
        }
        cmd.arg("check-model")
            .arg("--model")
            .arg(model)
            .args(["--manifest", "-"])
            .args(["--threads", &threads.to_string()])
            .args(["--memory-bytes", &memory.to_string()])
            .args(["--cpu-seconds", &self.cpu_seconds(threads_used).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let manifest_json = serde_json::to_vec(manifest).map_err(|e| e.to_string())?;
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start the self-test child {}: {e}",
                self.exe.display()
            )
        })?;
        let stdin = child.stdin.take();
        let writer = std::thread::spawn(move || {
            if let Some(mut s) = stdin {
                // A child that died early closes the pipe: its exit status says why.
                let _ = s.write_all(&manifest_json);
            }
        });
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(poll_interval(started.elapsed())),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("cannot wait for the self-test child: {e}"));
                }
            }
        };
        let _ = writer.join();
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        let Some(status) = status else {
            return Err(format!(
                "self-test child killed by SIGKILL after {} limit (runtime.load_timeout_ms)",
                seconds(self.timeout)
            ));
        };
        judge(
            status,
            &stdout,
            &stderr,
            memory,
            self.cpu_seconds(threads_used),
        )
    }
}

/// Short polls first (most checks end within milliseconds), then 20 ms.
fn poll_interval(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_millis(200) {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(20)
    }
}

/// Reads a pipe to its end on a thread, keeping the first [`MAX_OUTPUT`] bytes.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = pipe {
            let mut p = p;
            let _ = p.by_ref().take(MAX_OUTPUT).read_to_end(&mut buf);
            // Whatever is left is read and dropped, so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut p, &mut std::io::sink());
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The child's end as a result: its report, or why there is none.
fn judge(
    status: ExitStatus,
    stdout: &str,
    stderr: &str,
    memory: u64,
    cpu_seconds: u64,
) -> Result<Report, String> {
    let over_memory = || {
        format!(
            "self-test child exceeded the {} memory limit (runtime.load_memory_bytes)",
            mib(memory)
        )
    };
    if status.success() {
        let report: Report = serde_json::from_str(stdout.trim()).map_err(|e| {
            format!(
                "self-test child printed no report ({e}): {}",
                last_line(stderr)
            )
        })?;
        return match report.refused.clone() {
            None if report.ok => Ok(report),
            _ if report.out_of_memory => Err(over_memory()),
            Some(reason) => Err(reason),
            None => Err("self-test child reported neither a pass nor a reason".into()),
        };
    }
    // Rust's allocation-failure handler prints the first before it aborts; tract asserts the
    // second, which aborts through the child's panic hook in a `panic = "abort"` build.
    if stderr.contains("memory allocation of") || stderr.contains(TRACT_ALLOC_FAILED) {
        return Err(over_memory());
    }
    match (status.signal(), status.code()) {
        (Some(24), _) => Err(format!(
            "self-test child exceeded its {cpu_seconds} s CPU time limit (SIGXCPU; \
             runtime.load_timeout_ms x threads)"
        )),
        (Some(sig), _) => Err(format!(
            "self-test child killed by {}{}",
            signal_name(sig),
            detail(stderr)
        )),
        (None, Some(code)) => Err(format!(
            "self-test child exited with status {code}{}",
            detail(stderr)
        )),
        (None, None) => Err("self-test child ended without a status".into()),
    }
}

fn detail(stderr: &str) -> String {
    match last_line(stderr) {
        "" => String::new(),
        l => format!(": {l}"),
    }
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

/// `30 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// `512 MiB`, or bytes when not a whole number of MiB.
fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// Loads a model file as its manifest describes it (compiled, or plain ONNX when the
/// runtime has the importer): the one call the child and the serving path make.
pub fn load(
    bytes: &[u8],
    artifact: Option<&drover_protocol::manifest::Artifact>,
    threads: Threads,
) -> Result<Model, RuntimeError> {
    drover_runtime::compiled::load_artifact(bytes, artifact, threads)
}

/// The agent binary a process at `me` runs its children with: itself if it is
/// `drover-agent`, else one beside it, else (cargo puts test binaries in `<profile>/deps/`
/// and the agent in `<profile>/`) one above `deps/`, so the workspace's in-process test
/// agents find it.
pub(crate) fn find_agent_exe(me: &Path) -> Option<PathBuf> {
    if me.file_name().is_some_and(|n| n == AGENT_EXE) {
        return Some(me.to_owned());
    }
    let beside = me.with_file_name(AGENT_EXE);
    if beside.is_file() {
        return Some(beside);
    }
    (me.parent())
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .map(|d| d.join(AGENT_EXE))
        .filter(|p| p.is_file())
}

/// The arguments of the hidden `check-model` mode.
#[derive(Clone, Debug)]
pub struct ChildArgs {
    pub model: PathBuf,
    /// `-`: JSON on stdin.
    pub manifest: PathBuf,
    pub threads: u32,
    pub memory_bytes: u64,
    pub cpu_seconds: u64,
    pub crash_at: Option<String>,
}

/// The last panic's message, so a caught allocation failure is reported as one.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// The `check-model` mode: limits, load, self-test, one JSON report on stdout. Exits 0
/// with a report whenever it gets that far (passed or refused), non-zero otherwise.
pub fn child_main(args: ChildArgs) -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string();
        eprintln!("panic: {msg}");
        if let Ok(mut p) = PANIC.lock() {
            *p = Some(msg);
        }
    }));
    match child(&args) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("check-model: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("check-model: {e}");
            ExitCode::FAILURE
        }
    }
}

fn child(args: &ChildArgs) -> Result<Report, String> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let limit = |r, current: u64, maximum: u64| {
        setrlimit(
            r,
            Rlimit {
                current: Some(current),
                maximum: Some(maximum),
            },
        )
        .map_err(|e| format!("cannot set the {r:?} limit: {e}"))
    };
    limit(Resource::As, args.memory_bytes, args.memory_bytes)?;
    limit(Resource::Cpu, args.cpu_seconds, args.cpu_seconds + 1)?;
    // Under a cgroup memory limit shared with the agent (systemd `MemoryMax=`), the kernel's
    // OOM killer takes this process first.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    if let Some(spec) = &args.crash_at {
        drover_host::crash::arm(spec)?;
    }
    let manifest_json = if args.manifest.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("cannot read the manifest on stdin: {e}"))?;
        buf
    } else {
        std::fs::read(&args.manifest)
            .map_err(|e| format!("cannot read {}: {e}", args.manifest.display()))?
    };
    let manifest: Manifest = serde_json::from_slice(&manifest_json)
        .map_err(|e| format!("manifest is not the agent's JSON: {e}"))?;
    drover_host::crash::point("check_model.start");
    let bytes = std::fs::read(&args.model)
        .map_err(|e| format!("cannot read {}: {e}", args.model.display()))?;
    let mut report = Report::default();
    let started = Instant::now();
    let threads = Threads::from_config(args.threads as usize);
    let loaded = load(&bytes, manifest.artifact.as_ref(), threads);
    report.load_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(bytes);
    let tested = loaded.and_then(|model| {
        drover_host::crash::point("check_model.loaded");
        let started = Instant::now();
        let tested = self_test(&model, &manifest.test_vectors)
            .and_then(|()| self_test_sampled(&model, &manifest.sampled_vectors));
        report.self_test_ms = started.elapsed().as_secs_f64() * 1e3;
        tested
    });
    drover_host::crash::point("check_model.tested");
    match tested {
        Ok(()) => report.ok = true,
        Err(e) => {
            let panic = PANIC.lock().ok().and_then(|p| p.clone());
            report.out_of_memory = panic.is_some_and(|p| p.contains(TRACT_ALLOC_FAILED));
            report.refused = Some(e.to_string());
        }
    }
    (report.peak_rss_bytes, report.peak_vm_bytes) = peaks();
    Ok(report)
}

/// `VmHWM` and `VmPeak` from `/proc/self/status`, in bytes (0 when unreadable).
fn peaks() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmPeak:"))
}

#[cfg(test)]
mod tests;
