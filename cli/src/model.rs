//! `drover model publish|list|show`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use super::client::{parse_kv, print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::{ModelView, PublishBody};
use drover_control_plane::registry::ModelFormat;

// Parsed once per process: the size of the largest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Validate an ONNX model with the agent runtime, sign it and add it to the registry.
    Publish {
        /// The ONNX file.
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Semantic version X.Y.Z.
        #[arg(long)]
        version: String,
        /// CSV (header row of feature names) to derive the drift baseline from.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// JSON test vectors every device checks before serving the model:
        /// `[{"inputs": [T, ..], "outputs": [T, ..], "tolerance": 1e-4}]` where each T is
        /// `{"name": "x", "shape": [1, 4], "data": {"F32": [..]}}` (or `{"I64": [..]}`),
        /// row-major; an output passes when every element is within `tolerance`
        /// (absolute) of the given value. They travel inside the signed manifest, which a
        /// deploy command must carry within the 4 MiB downlink limit: larger vectors are
        /// refused with the figures.
        ///
        /// Without this flag vectors are derived for every model: from the first baseline
        /// rows, or from deterministic inputs with the full outputs when every input has
        /// at most 1 Mi elements (tolerance 1e-4); otherwise from generated inputs (a seeded
        /// pattern in [-1, 1), 0..3 for integer inputs) with each output sampled at up to
        /// 4096 evenly spaced positions and a tolerance of 1e-5 + 1e-3 × the output's largest
        /// magnitude, so a 1×3×640×640 detector gets three vectors of a few kilobytes.
        #[arg(long, verbatim_doc_comment)]
        test_vectors: Option<PathBuf>,
        /// Chunk size in bytes for downloads (default 65536).
        #[arg(long)]
        chunk_size: Option<u32>,
        /// An input's shape, `NAME=1,3,640,640` (repeatable, one per input): a number fixes an
        /// axis, a name (`N`, `width`) keeps it symbolic. Written into the ONNX file before it
        /// is signed; a dim the file fixes cannot be changed. Give it when a refusal says
        /// the model's shapes depend on dims the file leaves open.
        #[arg(long = "input-shape", value_name = "NAME=D1,D2,...")]
        input_shapes: Vec<String>,
        /// On a refusal, also print the runtime's whole error chain.
        #[arg(long)]
        verbose: bool,
        /// What devices receive: `compiled` (tract's own format, made and self-tested at
        /// publish; agents load it without parsing ONNX) or `onnx` (the file as published,
        /// for agents before protocol 3, which load ONNX only).
        #[arg(long, default_value = "compiled", value_parser = parse_format)]
        format: ModelFormat,
        #[arg(long)]
        training_job: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        /// Evaluation metric `name=value` (repeatable).
        #[arg(long = "metric", value_parser = parse_kv)]
        metrics: Vec<(String, String)>,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List published models.
    List {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one model: NAME@X.Y.Z.
    Show {
        model: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

fn print_model(m: &ModelView) {
    println!("{}@{}", m.name, m.version);
    println!("  digest   {}", m.digest);
    println!("  sha256   {}", m.sha256);
    println!("  size     {} bytes, chunks of {}", m.size, m.chunk_size);
    println!(
        "  signed   by key {} at {}",
        m.key_id,
        fmt_ms(m.created_at_ms)
    );
    if let Ok(s) = serde_json::to_string_pretty(&m.summary) {
        for line in s.lines() {
            println!("  {line}");
        }
    }
}

fn parse_format(s: &str) -> Result<ModelFormat, String> {
    s.parse()
}

pub async fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Publish {
            file,
            name,
            version,
            baseline,
            test_vectors,
            chunk_size,
            input_shapes,
            verbose,
            format,
            training_job,
            dataset,
            metrics,
            server,
            output,
        } => {
            for a in &input_shapes {
                drover_control_plane::registry::parse_input_shape(a)
                    .map_err(|e| anyhow::anyhow!("--input-shape {e}"))?;
            }
            let model = std::fs::read(&file)
                .with_context(|| format!("cannot read model file {}", file.display()))?;
            let baseline_csv = baseline
                .map(|p| {
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read baseline {}", p.display()))
                })
                .transpose()?;
            let test_vectors = test_vectors
                .map(|p| -> anyhow::Result<_> {
                    let t = std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read test vectors {}", p.display()))?;
                    serde_json::from_str(&t).with_context(|| {
                        format!("{} is not a JSON list of test vectors", p.display())
                    })
                })
                .transpose()?;
            let mut m = BTreeMap::new();
            for (k, v) in metrics {
                let v: f64 = v
                    .parse()
                    .with_context(|| format!("metric {k}={v}: value is not a number"))?;
                m.insert(k, v);
            }
            let body = PublishBody {
                name,
                version,
                model_hex: hex::encode(&model),
                baseline_csv,
                test_vectors,
                chunk_size,
                training_job,
                dataset,
                metrics: m,
                input_shapes,
                verbose,
                format,
            };
            let client = Client::new(&server)?;
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_message(format!(
                "uploading {} ({} bytes), validating and signing",
                file.display(),
                model.len()
            ));
            bar.enable_steady_tick(Duration::from_millis(120));
            let r: anyhow::Result<ModelView> = client.post("/v1/models", &body).await;
            bar.finish_and_clear();
            let v = r?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!("published");
            print_model(&v);
            Ok(())
        }
        ModelCommand::List { server, output } => {
            let v: Vec<ModelView> = Client::new(&server)?.get("/v1/models").await?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!(
                "{:<24} {:<10} {:>10}  {:<16} CREATED",
                "NAME", "VERSION", "SIZE", "DIGEST"
            );
            for m in &v {
                println!(
                    "{:<24} {:<10} {:>10}  {:<16} {}",
                    m.name,
                    m.version,
                    m.size,
                    &m.digest[..16.min(m.digest.len())],
                    fmt_ms(m.created_at_ms)
                );
            }
            Ok(())
        }
        ModelCommand::Show {
            model,
            server,
            output,
        } => {
            let (name, version) = drover_control_plane::fleet::parse_model_ref(&model)?;
            let v: ModelView = Client::new(&server)?
                .get(&format!("/v1/models/{name}/{version}"))
                .await?;
            if output == Output::Json {
                return print_json(&v);
            }
            print_model(&v);
            Ok(())
        }
    }
}
