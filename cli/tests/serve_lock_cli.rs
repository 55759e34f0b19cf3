//! `drover serve` processes and the data-dir lock: a second server on the same directory
//! exits with an error naming the directory and the first server's pid, leaving the CLI's
//! URL file alone; a SIGKILLed server leaves no lock behind.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drover_control_plane::app::paths::URL_FILE;

fn serve(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover"));
    c.args([
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(data)
    .env("RUST_LOG", "warn")
    .env_remove("DROVER_SERVER")
    .env_remove("DROVER_TOKEN");
    c
}

/// A server process, SIGKILLed when dropped (a failing test leaves none behind).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server and waits for its first line (printed once it listens).
fn start(data: &Path) -> Server {
    let mut child = serve(data).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("drover serve: api "), "{line:?}");
    Server(child)
}

/// The child's output once it exits; killed (and the test failed) if it is still running
/// after `limit`, as a second server that started would be.
fn exit_within(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "a second serve on the same data dir is still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn url(data: &Path) -> String {
    std::fs::read_to_string(data.join(URL_FILE))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_second_serve_on_one_data_dir_exits_and_a_killed_one_leaves_no_lock() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = start(&data);
    let first_url = url(&data);

    let second = exit_within(
        serve(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "second serve: {err}");
    for needle in [
        data.display().to_string(),
        format!("pid {}", first.0.id()),
        first_url.clone(),
    ] {
        assert!(err.contains(&needle), "{needle:?} missing from {err}");
    }
    assert_eq!(url(&data), first_url, "the second serve took the URL file");

    // SIGKILL: the OS drops the lock with the process.
    drop(first);
    let _third = start(&data);
    assert_ne!(url(&data), first_url);
}
