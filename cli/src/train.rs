//! `drover train builtin|run|jobs|show|cancel`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use super::client::{print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::{JobView, RunResponse};
use drover_control_plane::jobs::dataset;
use drover_control_plane::trainer::{self, TrainParams};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// The built-in trainer as a job command: logistic regression on a CSV (feature
    /// columns, last column `label`), writes `model.onnx` and `metrics.json` into --out.
    Builtin {
        /// Training CSV (the job's `{dataset}`).
        #[arg(long)]
        data: PathBuf,
        /// Output directory (the job's `{out}`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = TrainParams::default().epochs)]
        epochs: u32,
        #[arg(long, default_value_t = TrainParams::default().learning_rate)]
        learning_rate: f32,
        /// `json`: print the metrics written to `metrics.json`, with `out`.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Start the policy's training job now.
    Run {
        /// Wait for the job and its gate, and print the outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List training jobs, newest first.
    Jobs {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one training job: state, log tail or gate reason, metrics, lineage.
    Show {
        id: u64,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Cancel a running training job.
    Cancel {
        id: u64,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// Trains and writes the contract's two files.
pub fn builtin(
    data: &std::path::Path,
    out: &std::path::Path,
    p: &TrainParams,
    output: Output,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(data).with_context(|| format!("cannot read {}", data.display()))?;
    let (features, rows) = dataset::parse_labeled_csv(&text, &data.display().to_string())?;
    let d = trainer::Dataset {
        features: rows.iter().map(|r| r.features.clone()).collect(),
        labels: rows.iter().map(|r| r.label).collect(),
    };
    let model = trainer::train(&d, p)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("model.onnx"), model.to_onnx())
        .with_context(|| format!("cannot write {}/model.onnx", out.display()))?;
    let mut metrics = serde_json::json!({
        "train_accuracy": model.accuracy(&d),
        "rows": rows.len(),
        "features": features,
        "classes": model.classes,
        "trainer": "drover-builtin-logreg",
    });
    std::fs::write(
        out.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?,
    )
    .with_context(|| format!("cannot write {}/metrics.json", out.display()))?;
    if output == Output::Json {
        metrics["out"] = serde_json::json!(out);
        return print_json(&metrics);
    }
    println!(
        "trained on {} rows: train accuracy {:.4}; wrote {}",
        rows.len(),
        model.accuracy(&d),
        out.display()
    );
    Ok(())
}

fn print_job(j: &JobView) {
    println!("job {} ({}) {}", j.id, j.name, j.state);
    println!("  trigger   {}", j.trigger);
    println!(
        "  executor  {}{}",
        j.executor,
        j.external_id
            .as_ref()
            .map_or(String::new(), |x| format!(" (id {x})"))
    );
    println!("  created   {}", fmt_ms(j.created_at_ms));
    if let Some(f) = j.finished_at_ms {
        println!("  finished  {}", fmt_ms(f));
    }
    if let Some(p) = &j.parent_model {
        println!("  champion  {p}");
    }
    if let Some(h) = &j.dataset_hash {
        println!("  dataset   {h}");
    }
    if let Some(o) = &j.outcome {
        println!("  outcome   {o}");
    }
    if let Some(c) = &j.candidate_model {
        println!("  published {c}");
    }
    if let Some(m) = &j.metrics {
        println!("  metrics   {m}");
    }
    if let Some(d) = &j.detail {
        for line in d.lines() {
            println!("  | {line}");
        }
    }
}

fn finished(j: &JobView) -> bool {
    !matches!(j.state.as_str(), "queued" | "running")
        && (j.state != "succeeded" || j.outcome.is_some())
}

pub async fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    match cmd {
        TrainCommand::Builtin {
            data,
            out,
            epochs,
            learning_rate,
            output,
        } => builtin(
            &data,
            &out,
            &TrainParams {
                epochs,
                learning_rate,
                ..TrainParams::default()
            },
            output,
        ),
        TrainCommand::Run {
            wait,
            server,
            output,
        } => {
            let c = Client::new(&server)?;
            let r: RunResponse = c.post("/v1/train/run", &serde_json::json!({})).await?;
            if !wait {
                return match output {
                    Output::Json => print_json(&r),
                    Output::Text => {
                        println!("training job {} started", r.job_id);
                        Ok(())
                    }
                };
            }
            let path = format!("/v1/train/jobs/{}", r.job_id);
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_message(format!("training job {}", r.job_id));
            loop {
                let j: JobView = c.get(&path).await?;
                spinner.set_message(format!("training job {}: {}", j.id, j.state));
                spinner.tick();
                if finished(&j) {
                    spinner.finish_and_clear();
                    return match output {
                        Output::Json => print_json(&j),
                        Output::Text => {
                            print_job(&j);
                            Ok(())
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        TrainCommand::Jobs { server, output } => {
            let jobs: Vec<JobView> = Client::new(&server)?.get("/v1/train/jobs").await?;
            match output {
                Output::Json => print_json(&jobs),
                Output::Text => {
                    println!(
                        "{:>5} {:<20} {:<8} {:<10} {:<9} {:<20} created",
                        "ID", "NAME", "EXEC", "STATE", "OUTCOME", "PUBLISHED"
                    );
                    for j in &jobs {
                        println!(
                            "{:>5} {:<20} {:<8} {:<10} {:<9} {:<20} {}",
                            j.id,
                            j.name,
                            j.executor,
                            j.state,
                            j.outcome.as_deref().unwrap_or("-"),
                            j.candidate_model.as_deref().unwrap_or("-"),
                            fmt_ms(j.created_at_ms)
                        );
                    }
                    Ok(())
                }
            }
        }
        TrainCommand::Show { id, server, output } => {
            let j: JobView = Client::new(&server)?
                .get(&format!("/v1/train/jobs/{id}"))
                .await?;
            match output {
                Output::Json => print_json(&j),
                Output::Text => {
                    print_job(&j);
                    Ok(())
                }
            }
        }
        TrainCommand::Cancel { id, server, output } => {
            let reply: serde_json::Value = Client::new(&server)?
                .post(
                    &format!("/v1/train/jobs/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            if output == Output::Json {
                return print_json(&reply);
            }
            println!("cancelling training job {id}");
            Ok(())
        }
    }
}
