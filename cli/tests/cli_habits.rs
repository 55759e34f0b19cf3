//! The habits of a Unix command line (issue 19): a closed pipe ends `drover` quietly,
//! `--server` without a scheme is understood and a bad one refused with what to write,
//! errors are JSON under `--output json`, and `--help` lists the exit codes.

use std::os::unix::process::ExitStatusExt as _;
use std::process::{Command, Stdio};

fn drover() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    c.env_remove("DROVER_SERVER").env_remove("DROVER_TOKEN");
    c
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // The reader is gone before drover writes its first line (`drover … | head -0`).
    let mut child = drover()
        .arg("print-default-config")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn a_server_without_a_scheme_is_http_and_a_bad_one_says_what_to_write() {
    // Nothing listens on port 1: the address was understood, the server is unreachable.
    let out = drover()
        .args(["device", "list", "--server", "127.0.0.1:1", "--token", "t"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("builder error"), "{stderr}");

    let out = drover()
        .args(["device", "list", "--server", "ftp://x", "--token", "t"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("http://127.0.0.1:8470"), "{stderr}");
}

#[test]
fn errors_are_json_under_output_json() {
    let out = drover()
        .args([
            "device",
            "list",
            "--server",
            "127.0.0.1:1",
            "--token",
            "t",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["code"], 5);
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("cannot reach the server"));
}

#[test]
fn help_lists_the_exit_codes() {
    let out = drover().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for line in ["Exit codes:", "5   server unreachable", "12  rollout watch"] {
        assert!(help.contains(line), "{help}");
    }
}

/// `drover serve` logging to a pipe, as under systemd or `2> file`: until its first
/// stdout line (it listens), then SIGTERM; returns what it wrote on stderr.
fn serve_stderr(extra: &[&str]) -> String {
    use std::io::{BufRead as _, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = drover()
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("drover serve: api "), "{line:?}");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stderr).unwrap()
}

/// SIGPIPE's bit in a `SigIgn:` mask of /proc/<pid>/status.
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << (13 - 1)) != 0
}

#[test]
fn a_server_ignores_sigpipe_so_a_peer_that_resets_cannot_kill_it() {
    use std::io::{BufRead as _, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = drover()
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let serving = ignores_sigpipe(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    // (An ordinary command ends on a closed pipe by SIGPIPE's default action: the test
    // above.)
    assert!(
        serving,
        "drover serve takes SIGPIPE's default action (death)"
    );
}

#[test]
fn logs_carry_no_colour_off_a_terminal_and_are_json_when_asked() {
    let text = serve_stderr(&[]);
    assert!(text.contains("INFO"), "{text}");
    // A healthy start and stop logs no error (rumqttd called every closed connection one).
    assert!(!text.contains("ERROR"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI escapes in a piped log: {text:?}"
    );

    let json = serve_stderr(&["--log-format", "json"]);
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
}
