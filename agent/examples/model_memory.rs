//! What a loaded model really costs in memory, to justify the `[models] memory_bytes`
//! estimate (`machine::budget::memory_estimate`). For each ONNX file given, a fresh child
//! process loads the model as the agent does (`Model::load_with`, one thread) and keeps
//! it, which also pays the process's one-time costs (tract's code paged in, allocator
//! arenas); then it reads its resident set (`VmRSS`), loads the same model a second time
//! (the file's bytes dropped after loading, as the agent's loader does) and reads it
//! again: the difference is what one more loaded model costs. The first load's
//! difference is printed too.
//!
//! `cargo run -p drover-agent --example model_memory -- FILE.onnx...` (figures in
//! BENCHMARKS.md, "Loaded model memory").

use std::process::Command;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn one(path: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let size = bytes.len() as u64;
    let load = |b: &[u8]| {
        drover_runtime::Model::load_with(b, drover_runtime::Threads::One)
            .map_err(|e| format!("{path}: {e}"))
    };
    let start = rss_bytes();
    let first = load(&bytes)?;
    let before = rss_bytes();
    let model = load(&bytes)?;
    drop(bytes);
    let after = rss_bytes();
    let first_cost = before.saturating_sub(start);
    let cost = after.saturating_sub(before);
    let estimate = size * drover_agent::machine::MEMORY_PER_FILE_BYTE
        + drover_agent::machine::MEMORY_PER_MODEL;
    println!(
        "{path}\t{size}\t{first_cost}\t{cost}\t{:.2}\t{estimate}",
        cost as f64 / size as f64
    );
    drop((first, model));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path] = args.as_slice() {
        if flag == "--one" {
            return match one(path) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    }
    println!("file\tfile bytes\tfirst load (RSS delta)\tone more (RSS delta)\tratio\testimate");
    let me = std::env::current_exe().expect("own path");
    for path in &args {
        let status = Command::new(&me).args(["--one", path]).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("{path}: measurement failed");
        }
    }
    std::process::ExitCode::SUCCESS
}
