//! `drover device deploy --wait`: follows one deploy command through the device's progress
//! reports (downloading, verified, active, healthy) and exits by outcome: 0 healthy (or
//! shadowing, for `--shadow`), 20 the device failed, refused or rolled back, 21 the command
//! expired before the device answered, 22 `--timeout` passed first. An offline device is
//! said to be so once, with the time its command stays queued until.

use std::time::Duration;

use super::client::{CliError, Client};
use super::{fmt_ms, Output};
use drover_control_plane::api::{DeployResponse, DeviceView, ProgressView};

/// How often the server is asked; a deploy takes seconds to minutes.
const POLL: Duration = Duration::from_millis(500);

/// What a report means for the wait: keep going, done, or failed.
fn outcome(phase: &str, shadow: bool) -> Option<bool> {
    match phase {
        "healthy" => Some(true),
        "shadowing" if shadow => Some(true),
        "failed" | "rolled-back" | "refused" => Some(false),
        _ => None,
    }
}

fn ended(r: &DeployResponse, outcome: &str, detail: String, code: u8) -> anyhow::Error {
    CliError::DeployEnded {
        device: r.device.clone(),
        seq: r.seq,
        outcome: outcome.to_owned(),
        detail,
        code,
    }
    .into()
}

pub async fn wait(
    client: &Client,
    r: &DeployResponse,
    shadow: bool,
    timeout: Option<Duration>,
    output: Output,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (mut shown, mut said_offline) = (0usize, false);
    loop {
        let d: DeviceView = client.get(&format!("/v1/devices/{}", r.device)).await?;
        let reports: Vec<ProgressView> = client
            .get(&format!(
                "/v1/devices/{}/progress?command={}",
                r.device, r.seq
            ))
            .await?;
        for p in reports.iter().skip(shown) {
            if output == Output::Json {
                println!("{}", serde_json::to_string(p)?);
            } else {
                let detail = p.detail.as_deref().map(|d| format!(": {d}"));
                println!(
                    "  {:<12} {}{}",
                    p.phase,
                    fmt_ms(p.received_at_ms),
                    detail.unwrap_or_default()
                );
            }
            if let Some(ok) = outcome(&p.phase, shadow) {
                if ok {
                    if output == Output::Text {
                        println!("{}: {} {}", r.device, r.model, p.phase);
                    }
                    return Ok(());
                }
                let why = p.detail.clone().unwrap_or_else(|| "no detail".into());
                return Err(ended(r, &p.phase, why, 20));
            }
        }
        shown = shown.max(reports.len());
        if reports.is_empty() && !d.online && !said_offline {
            let line = format!("  offline: queued until {}", fmt_ms(r.expires_at_ms));
            // In JSON mode on stderr, so stdout stays JSON lines.
            match output {
                Output::Json => eprintln!("{line}"),
                Output::Text => println!("{line}"),
            }
            said_offline = true;
        }
        if reports.is_empty() && drover_host::clock::now_ms() >= r.expires_at_ms {
            let why = format!(
                "the device did not answer before {}",
                fmt_ms(r.expires_at_ms)
            );
            return Err(ended(r, "expired", why, 21));
        }
        if let Some(t) = timeout.filter(|t| started.elapsed() >= *t) {
            let last = reports.last().map_or("queued", |p| p.phase.as_str());
            let why = format!(
                "still {last} after --timeout {}s; the command stands until {}",
                t.as_secs(),
                fmt_ms(r.expires_at_ms)
            );
            return Err(ended(r, "timed out", why, 22));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::outcome;

    #[test]
    fn a_wait_ends_healthy_or_shadowing_and_fails_on_refusal_or_rollback() {
        assert_eq!(outcome("healthy", false), Some(true));
        assert_eq!(outcome("shadowing", true), Some(true));
        assert_eq!(outcome("shadowing", false), None);
        for p in ["failed", "rolled-back", "refused"] {
            assert_eq!(outcome(p, false), Some(false), "{p}");
        }
        for p in [
            "received",
            "downloading",
            "verified",
            "self-tested",
            "active",
            "unknown",
        ] {
            assert_eq!(outcome(p, false), None, "{p}");
        }
    }
}
