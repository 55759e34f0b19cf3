//! `drover drift status|history`: drift scores per device, label group and fleet.

use clap::Subcommand;

use super::client::{print_json, Client, ServerArgs};
use super::{fmt_ms, Output};
use drover_control_plane::api::ScoreView as Score;
use drover_control_plane::drift::Level;

#[derive(Debug, Subcommand)]
pub enum DriftCommand {
    /// The latest scored window of every scope (device, label group, fleet).
    Status {
        /// Only scopes at this level or worse: ok, warn, alert.
        #[arg(long, default_value = "ok")]
        level: String,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stored scores, newest window first.
    History {
        /// `fleet`, `device:<id>` or `<label>=<value>`.
        #[arg(long)]
        scope: Option<String>,
        /// Only windows ending in the last this many hours.
        #[arg(long, default_value_t = 24.0)]
        since_hours: f64,
        #[arg(long, default_value_t = 200)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

fn print_scores(scores: &[Score]) {
    println!(
        "{:<24} {:<16} {:>9} {:>11} {:>8} {:>7} {:>5}  {:<5}  window end",
        "SCOPE", "FEATURE", "PSI", "P-VALUE", "COUNT", "MISSING", "OOR", "LEVEL"
    );
    for s in scores {
        // An accuracy row shows the accuracy and its interval where PSI and p-value go.
        let (first, second) = match (s.accuracy, s.accuracy_low, s.accuracy_high) {
            (Some(a), Some(lo), Some(hi)) => (format!("acc {a:.3}"), format!("{lo:.3}-{hi:.3}")),
            _ => (
                opt(s.psi),
                s.p_value.map_or("-".into(), |p| format!("{p:.3e}")),
            ),
        };
        println!(
            "{:<24} {:<16} {:>9} {:>11} {:>8} {:>7} {:>5}  {:<5}  {}",
            s.scope,
            s.feature,
            first,
            second,
            s.count,
            s.missing,
            s.out_of_range,
            s.level.as_str(),
            fmt_ms(s.window_end_ms)
        );
    }
}

pub async fn run(cmd: DriftCommand) -> anyhow::Result<()> {
    match cmd {
        DriftCommand::Status {
            level,
            server,
            output,
        } => {
            let min = Level::parse(&level)
                .ok_or_else(|| anyhow::anyhow!("--level {level:?}: expected ok, warn or alert"))?;
            let scores: Vec<Score> = Client::new(&server)?.get("/v1/drift/status").await?;
            let scores: Vec<Score> = scores
                .into_iter()
                .filter(|s| Level::parse(&s.level).is_some_and(|l| l >= min))
                .collect();
            match output {
                Output::Json => print_json(&scores),
                Output::Text => {
                    print_scores(&scores);
                    Ok(())
                }
            }
        }
        DriftCommand::History {
            scope,
            since_hours,
            limit,
            server,
            output,
        } => {
            if !(since_hours >= 0.0 && since_hours.is_finite()) {
                anyhow::bail!("--since-hours must be a number >= 0");
            }
            let since =
                drover_host::clock::now_ms().saturating_sub((since_hours * 3_600_000.0) as u64);
            let mut path = format!("/v1/drift/history?since_ms={since}&limit={limit}");
            if let Some(s) = scope {
                path.push_str("&scope=");
                path.push_str(&urlencode(&s));
            }
            let scores: Vec<Score> = Client::new(&server)?.get(&path).await?;
            match output {
                Output::Json => print_json(&scores),
                Output::Text => {
                    print_scores(&scores);
                    Ok(())
                }
            }
        }
    }
}

/// Percent-encodes a query value (scopes hold `=` and `:`).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
