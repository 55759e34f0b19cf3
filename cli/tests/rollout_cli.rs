//! `drover rollout start` refuses risky starts before it reaches a server (issue 18).

use std::process::{Command, Stdio};

fn drover(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .args(["--server", "http://127.0.0.1:9", "--token", "t"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn refused(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn rollout_start_needs_a_selector_and_yes_when_it_cannot_ask() {
    // No selector: the whole fleet must be named.
    let e = refused(&drover(&["rollout", "start", "--model", "m@1.0.0"]));
    assert!(e.contains("give `all` to target the whole fleet"), "{e}");
    // stdin is not a terminal and there is no --yes: refused, and told what to pass.
    let e = refused(&drover(&[
        "rollout",
        "start",
        "--model",
        "m@1.0.0",
        "--selector",
        "all",
    ]));
    assert!(e.contains("pass --yes"), "{e}");
    // With --yes it goes on to the server (none listens here).
    let e = refused(&drover(&[
        "rollout",
        "start",
        "--model",
        "m@1.0.0",
        "--selector",
        "all",
        "--yes",
    ]));
    assert!(e.contains("cannot reach the server"), "{e}");
}
