//! Benchmark (not a test): the real-model corpus (`runtime/corpus/`, issue 16), every model.
//! Per model: published? (after the lockfile's `--input-shape` arguments and the publish
//! fixes), max absolute error against onnxruntime's reference, tract's model time (median,
//! one thread, through `Model::run` as the agent calls it) and onnxruntime's, timed by
//! `fetch.py ort-time` in a Python subprocess in the same run with 1 intra-op thread and
//! with its default, tract again on `Threads::Auto` (the agent's default `runtime.threads`:
//! the cores, at most 4) against onnxruntime's default threads, and this process's peak RSS after the model ran (VmHWM; it only grows,
//! so read it as "peak so far").
//!
//! A second table (issue 25) compares each published model loaded from ONNX with the same
//! model compiled to tract's format: load time (median, through `Model::load` and
//! `Model::load_compiled`), compile time, run time of both (median, one thread), artifact
//! size against the ONNX size. `BENCH_TABLE=compiled` prints only that table (no
//! onnxruntime timing).
//!
//! Run: `cargo bench -p drover-runtime --bench real_models` (needs python3 with onnxruntime
//! and numpy, and the registries on first run; `CORPUS_ONLY=a,b` limits it to some models;
//! without `--bench` it is a quick smoke run of one iteration over the lockfile's CI subset
//! whose figures mean nothing).

// The bench does not read `family`.
#[allow(dead_code)]
#[path = "../corpus/case.rs"]
mod case;

use std::process::Command;
use std::time::Instant;

use drover_runtime::compiled::compile;
use drover_runtime::publish::{parse_input_shape, prepare, PublishOptions};
use drover_runtime::{Model, Threads};

fn bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn runs() -> usize {
    if bench() {
        10
    } else {
        1
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ort_ms(name: &str, threads: usize, runs: usize) -> Option<f64> {
    let out = Command::new("python3")
        .arg(case::corpus_dir().join("fetch.py"))
        .args(["ort-time", name, &threads.to_string(), &runs.to_string()])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["median_ms"].as_f64()
}

fn published(c: &case::Case) -> Option<drover_runtime::publish::Prepared> {
    let bytes = std::fs::read(&c.model).expect("fetched");
    let opts = PublishOptions {
        input_shapes: c
            .input_shapes
            .iter()
            .map(|a| parse_input_shape(a).expect("lockfile"))
            .collect(),
    };
    prepare(&bytes, &opts).ok()
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn timed_ms<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed().as_secs_f64() * 1e3, v)
}

/// ONNX against compiled: load, compile and run times, sizes.
fn compiled_table(only: &[String]) {
    let runs = runs();
    println!(
        "\n{:<20} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8} {:>10} {:>10} {:>7} {:>6}  note",
        "model",
        "ONNX KB",
        "tnef KB",
        "size",
        "load ms",
        "loadC ms",
        "load x",
        "run ms",
        "runC ms",
        "run x",
        "cmp ms"
    );
    for c in case::cases() {
        if (!only.is_empty() && !only.contains(&c.name)) || (!bench() && !c.ci) {
            continue;
        }
        let Some(p) = published(&c) else {
            println!("{:<20} not published", c.name);
            continue;
        };
        let (compile_ms, artifact) = timed_ms(|| compile(&p.bytes));
        let artifact = match artifact {
            Ok(a) => a,
            Err(e) => {
                let msg: String = e.to_string().chars().take(160).collect();
                println!("{:<20} does not compile: {msg}", c.name);
                continue;
            }
        };
        // Interleaved (ONNX, compiled, ONNX, …) so a busy machine slows both alike.
        let (mut load_onnx, mut load_compiled) = (vec![], vec![]);
        for _ in 0..runs.max(3) {
            load_onnx.push(timed_ms(|| Model::load(&p.bytes).expect("loads")).0);
            let once = || Model::load_compiled(&artifact, Threads::One).expect("loads");
            load_compiled.push(timed_ms(once).0);
        }
        let (load_onnx, load_compiled) = (median(load_onnx), median(load_compiled));
        let compiled = Model::load_compiled(&artifact, Threads::One).expect("loads");
        p.model.run(&c.inputs).expect("warm-up");
        compiled.run(&c.inputs).expect("warm-up");
        let (mut run_onnx, mut run_compiled) = (vec![], vec![]);
        for _ in 0..runs * 2 {
            run_onnx.push(timed_ms(|| p.model.run(&c.inputs).expect("runs")).0);
            run_compiled.push(timed_ms(|| compiled.run(&c.inputs).expect("runs")).0);
        }
        let (run_onnx, run_compiled) = (median(run_onnx), median(run_compiled));
        let same = compiled.run(&c.inputs).ok() == p.model.run(&c.inputs).ok();
        // Constants aside (the ONNX path keeps duplicates of identical constants).
        let ops = |m: &Model| -> Vec<String> {
            m.plan_ops().into_iter().filter(|o| o != "Const").collect()
        };
        let same_plan = ops(&compiled) == ops(&p.model);
        println!(
            "{:<20} {:>9.0} {:>9.0} {:>6.2} {:>10.2} {:>10.2} {:>8.2} {:>10.3} {:>10.3} {:>7.3} {:>6.0}  {}, {}",
            c.name,
            p.bytes.len() as f64 / 1024.0,
            artifact.len() as f64 / 1024.0,
            artifact.len() as f64 / p.bytes.len() as f64,
            load_onnx,
            load_compiled,
            load_compiled / load_onnx,
            run_onnx,
            run_compiled,
            run_compiled / run_onnx,
            compile_ms,
            if same { "same outputs" } else { "OUTPUTS DIFFER" },
            if same_plan { "same plan" } else { "PLANS DIFFER" },
        );
    }
}

fn main() {
    let only: Vec<String> = std::env::var("CORPUS_ONLY")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    // The smoke run (`cargo test --all-targets`, unoptimized tract) takes only the CI subset.
    let mut args: Vec<&str> = only.iter().map(String::as_str).collect();
    if !bench() {
        args.push("--ci");
    }
    case::fetch(&args);
    if std::env::var("BENCH_TABLE").as_deref() == Ok("compiled") {
        compiled_table(&only);
        return;
    }
    let runs = runs();
    println!(
        "{:<20} {:<9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>8}  note",
        "model",
        "published",
        "max err",
        "tract ms",
        "tractN ms",
        "ort1 ms",
        "ortN ms",
        "x ort1",
        "xN ortN",
        "RSS MB"
    );
    for c in case::cases() {
        if (!only.is_empty() && !only.contains(&c.name)) || (!bench() && !c.ci) {
            continue;
        }
        let bytes = std::fs::read(&c.model).expect("fetched");
        let opts = PublishOptions {
            input_shapes: c
                .input_shapes
                .iter()
                .map(|a| parse_input_shape(a).expect("lockfile"))
                .collect(),
        };
        let p = match prepare(&bytes, &opts) {
            Ok(p) => p,
            Err(e) => {
                let msg: String = e.to_string().chars().take(160).collect();
                println!(
                    "{:<20} {:<9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7} {:>8}  refused: {msg}",
                    c.name, "no", "-", "-", "-", "-", "-", "-", "-", "-"
                );
                continue;
            }
        };
        let err = match p.model.run(&c.inputs) {
            Ok(out) => case::max_abs_error(&out, &c.outputs),
            Err(e) => Err(e.to_string()),
        };
        let err = match err {
            Ok(e) => format!("{e:.1e}"),
            Err(e) => {
                println!("{:<20} {:<9} run failed: {e}", c.name, "yes");
                continue;
            }
        };
        let median_ms = |m: &Model| {
            let mut times: Vec<f64> = (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    m.run(&c.inputs).expect("ran once");
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        };
        let tract = median_ms(&p.model);
        let threaded = Model::load_with(&p.bytes, Threads::Auto).expect("loads as published");
        // Warm-up: the pool's threads start on the first threaded run.
        threaded.run(&c.inputs).expect("ran once");
        let tract_n = median_ms(&threaded);
        let ort1 = ort_ms(&c.name, 1, runs.max(3));
        let ortn = ort_ms(&c.name, 0, runs.max(3));
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        let x = |t: f64, v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}", t / v));
        let note = if p.fixes.is_empty() {
            String::new()
        } else {
            format!("fixes: {}", p.fixes.join("; "))
        };
        println!(
            "{:<20} {:<9} {:>9} {:>10.2} {:>10.2} {:>10} {:>10} {:>7} {:>7} {:>8.0}  {note}",
            c.name,
            "yes",
            err,
            tract,
            tract_n,
            f(ort1),
            f(ortn),
            x(tract, ort1),
            x(tract_n, ortn),
            peak_rss_mb()
        );
    }
    compiled_table(&only);
}
