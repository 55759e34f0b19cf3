//! The parent's side against scripted children: every way a child can end becomes one
//! reason. The real child (`check-model`) is driven by `tests/isolate.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use drover_protocol::manifest::{Lineage, Manifest};

use super::*;

fn manifest(size: u64) -> Manifest {
    Manifest {
        name: "m".into(),
        version: "1.0.0".into(),
        sha256: [0; 32],
        size,
        chunk_size: 65536,
        chunk_hashes: vec![],
        inputs: vec![],
        outputs: vec![],
        baseline: None,
        test_vectors: vec![],
        lineage: Lineage::default(),
        created_at_ms: 0,
        sampled_vectors: vec![],
        artifact: None,
    }
}

/// A loader whose "agent binary" is a shell script with this body.
fn scripted(dir: &Path, body: &str, timeout: Duration) -> Loader {
    let exe = dir.join("fake-agent");
    std::fs::write(&exe, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    Loader {
        exe,
        memory_bytes: 64 << 20,
        timeout,
        crash_at: None,
    }
}

/// Runs the check; a fork elsewhere in the test process can briefly hold the new
/// script open for writing (ETXTBSY), which is retried.
fn check(loader: &Loader) -> Result<Report, String> {
    for _ in 0..50 {
        match loader.check(Path::new("/nonexistent"), &manifest(1000), 1) {
            Err(e) if e.contains("Text file busy") => std::thread::sleep(Duration::from_millis(20)),
            r => return r,
        }
    }
    panic!("script stayed busy");
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_child_past_the_wall_clock_limit_is_killed_with_the_limit_named() {
    let dir = tempfile::tempdir().unwrap();
    let l = scripted(dir.path(), "exec sleep 60", Duration::from_millis(300));
    let e = check(&l).unwrap_err();
    assert_eq!(
        e,
        "self-test child killed by SIGKILL after 0.3 s limit (runtime.load_timeout_ms)"
    );
}

#[test]
fn a_child_killed_by_a_signal_is_named_with_its_last_words() {
    let dir = tempfile::tempdir().unwrap();
    let l = scripted(
        dir.path(),
        "echo 'tract: bad graph' >&2; kill -SEGV $$",
        30 * SECOND,
    );
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child killed by SIGSEGV: tract: bad graph"
    );
}

#[test]
fn an_allocation_failure_is_reported_as_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let body = "echo 'memory allocation of 4294967296 bytes failed' >&2; kill -ABRT $$";
    let l = scripted(dir.path(), body, 30 * SECOND);
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child exceeded the 64 MiB memory limit (runtime.load_memory_bytes)"
    );
    // tract's assertion, aborting as it does in a `panic = "abort"` build.
    let body = "echo 'panic: failed to allocate Layout { size: 4294967296, align: 16 }' >&2; kill -ABRT $$";
    let l = scripted(dir.path(), body, 30 * SECOND);
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child exceeded the 64 MiB memory limit (runtime.load_memory_bytes)"
    );
    let body = r#"echo '{"ok":false,"refused":"tract panicked","out_of_memory":true,"load_ms":1,"self_test_ms":0,"peak_rss_bytes":0,"peak_vm_bytes":0}'"#;
    let l = scripted(dir.path(), body, 30 * SECOND);
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child exceeded the 64 MiB memory limit (runtime.load_memory_bytes)"
    );
}

#[test]
fn a_cpu_limit_signal_names_the_cpu_limit() {
    let dir = tempfile::tempdir().unwrap();
    let l = scripted(dir.path(), "kill -XCPU $$", 2 * SECOND);
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child exceeded its 3 s CPU time limit (SIGXCPU; runtime.load_timeout_ms x threads)"
    );
}

#[test]
fn a_refusal_carries_the_runtime_reason_and_a_pass_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"cat >/dev/null; echo '{"ok":false,"refused":"model uses operator Foo which this agent'"'"'s runtime does not support","load_ms":1,"self_test_ms":0,"peak_rss_bytes":0,"peak_vm_bytes":0}'"#;
    let l = scripted(dir.path(), body, 30 * SECOND);
    assert_eq!(
        check(&l).unwrap_err(),
        "model uses operator Foo which this agent's runtime does not support"
    );
    let body = r#"cat >/dev/null; echo '{"ok":true,"load_ms":2.5,"self_test_ms":1,"peak_rss_bytes":10,"peak_vm_bytes":20}'"#;
    let l = scripted(dir.path(), body, 30 * SECOND);
    let r = check(&l).unwrap();
    assert!(r.ok);
    assert_eq!((r.load_ms, r.peak_rss_bytes), (2.5, 10));
}

#[test]
fn a_failed_exit_or_a_missing_report_is_a_failure_never_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let l = scripted(
        dir.path(),
        "echo 'check-model: no such file' >&2; exit 3",
        30 * SECOND,
    );
    assert_eq!(
        check(&l).unwrap_err(),
        "self-test child exited with status 3: check-model: no such file"
    );
    let l = scripted(dir.path(), "echo garbage", 30 * SECOND);
    assert!(check(&l)
        .unwrap_err()
        .starts_with("self-test child printed no report"));
}

#[test]
fn the_child_is_given_the_model_manifest_threads_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let args = dir.path().join("args");
    let body = format!(
        "echo \"$@\" > {}; cat > {}.json; echo '{{\"ok\":true,\"load_ms\":0,\"self_test_ms\":0,\"peak_rss_bytes\":0,\"peak_vm_bytes\":0}}'",
        args.display(),
        args.display()
    );
    let mut l = scripted(dir.path(), &body, 30 * SECOND);
    l.memory_bytes = 0;
    l.crash_at = Some("check_model.loaded:1".into());
    check(&l).unwrap();
    let seen = std::fs::read_to_string(&args).unwrap();
    assert_eq!(
        seen.trim(),
        format!(
            "--crash-at check_model.loaded:1 check-model --model /nonexistent --manifest - \
             --threads 1 --memory-bytes {} --cpu-seconds 31",
            MEMORY_FLOOR + 16_000
        )
    );
    let json = std::fs::read(args.with_extension("json")).unwrap();
    let m: Manifest = serde_json::from_slice(&json).unwrap();
    assert_eq!(m, manifest(1000));
}

#[test]
fn the_agent_binary_is_this_one_or_beside_it_or_above_cargos_deps() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, deps) = (dir.path().join("bin"), dir.path().join("debug/deps"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&deps).unwrap();
    // Another program with no agent anywhere near: none (the caller refuses to start).
    assert_eq!(find_agent_exe(&bin.join("other")), None);
    assert_eq!(find_agent_exe(&deps.join("e2e-0123")), None);
    let me = bin.join(AGENT_EXE);
    assert_eq!(find_agent_exe(&me), Some(me.clone()));
    std::fs::write(&me, "").unwrap();
    assert_eq!(find_agent_exe(&bin.join("drover")), Some(me));
    // A test binary in <profile>/deps/ finds <profile>/drover-agent, only under deps/.
    let above = dir.path().join("debug").join(AGENT_EXE);
    std::fs::write(&above, "").unwrap();
    assert_eq!(find_agent_exe(&deps.join("e2e-0123")), Some(above));
    std::fs::create_dir_all(dir.path().join("debug/other")).unwrap();
    assert_eq!(find_agent_exe(&dir.path().join("debug/other/x")), None);
}

#[test]
fn isolation_asked_for_without_a_loader_refuses_to_start() {
    let mut rt = RuntimeConfig {
        isolate: false,
        ..RuntimeConfig::default()
    };
    assert!(Loader::resolve(&rt, None).unwrap().is_none());
    rt.isolate = true;
    rt.loader_exe = Some("/nonexistent/drover-agent".into());
    let e = Loader::resolve(&rt, None).unwrap_err();
    assert!(e.starts_with("runtime.loader_exe: /nonexistent/drover-agent is not a file"));
    let dir = tempfile::tempdir().unwrap();
    let l = scripted(dir.path(), "true", SECOND);
    rt.loader_exe = Some(l.exe.clone());
    rt.load_timeout_ms = 5_000;
    let got = Loader::resolve(&rt, None).unwrap().unwrap();
    assert_eq!(
        (got.memory_limit(10), got.exe, got.timeout),
        (MEMORY_FLOOR + 160, l.exe, 5 * SECOND)
    );
}
