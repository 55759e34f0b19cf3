//! `drover rollout watch`: follows a rollout until it ends, one frame per poll.
//!
//! On a terminal each wave has a bar of its own devices (healthy of the devices that wave
//! adds, never drawn fuller than it is), each gate a line (value, threshold, verdict, why
//! no verdict), and a status line with the time left in the stage. The final frame is the
//! rollout's real state (`rollout status`), and the exit code says how it ended
//! ([`exit_code`]). A server that does not answer (restarting, say) is polled again, with
//! its URL re-read from the data directory, until `--give-up-after`.

use std::time::Duration;

use drover_control_plane::api::RolloutView;

use super::client::{CliError, Client, ServerArgs};
use super::rollout::{is_final, print_status, verdict};
use super::Output;

/// Exit code of `rollout watch` for a final status: 0 completed, 10 paused, 11 rolled
/// back, 12 aborted; `None` while the rollout goes on.
pub fn exit_code(status: &str) -> Option<u8> {
    match status {
        "completed" => Some(0),
        "paused" => Some(10),
        "rolled-back" => Some(11),
        "aborted" => Some(12),
        _ => None,
    }
}

/// The stage's time left by this machine's clock ("4m 10s"), while it runs.
pub fn time_left(r: &RolloutView) -> Option<String> {
    let ends = r.stage_ends_ms?;
    let left = ends.saturating_sub(drover_host::clock::now_ms());
    let secs = Duration::from_secs(left.div_ceil(1000));
    Some(humantime::format_duration(secs).to_string())
}

/// One gate's line: name, value, threshold, verdict and (without one) why.
fn gate_line(g: &drover_control_plane::api::GateView) -> String {
    let mut line = format!(
        "{:<26} {:>10} {:<10} {}",
        g.gate,
        g.value.map_or("-".into(), |v| format!("{v:.4}")),
        g.threshold,
        verdict(g.verdict)
    );
    if let Some(why) = &g.reason {
        line.push_str(&format!(" ({why})"));
    }
    line
}

/// The bars and lines of the live view.
struct Frame {
    multi: indicatif::MultiProgress,
    style: indicatif::ProgressStyle,
    status: indicatif::ProgressBar,
    waves: Vec<indicatif::ProgressBar>,
    gates: Vec<indicatif::ProgressBar>,
}

impl Frame {
    fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let status = multi.add(indicatif::ProgressBar::new_spinner());
        let style =
            indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
        Frame {
            multi,
            style,
            status,
            waves: Vec::new(),
            gates: Vec::new(),
        }
    }

    fn draw(&mut self, r: &RolloutView) {
        let mut line = format!(
            "rollout {} {} wave {}/{} {}",
            r.id,
            r.status,
            r.wave,
            r.waves.len(),
            r.stage
        );
        if let Some(left) = time_left(r) {
            line.push_str(&format!(", {left} left"));
        }
        if let Some(w) = &r.waiting {
            line.push_str(&format!(" | waiting: {w}"));
        }
        self.status.set_message(line);
        self.status.tick();
        while self.waves.len() < r.waves.len() {
            let b = self.multi.add(indicatif::ProgressBar::new(0));
            b.set_style(self.style.clone());
            b.set_prefix(format!("wave {}", self.waves.len() + 1));
            self.waves.push(b);
        }
        let mut before = 0;
        for (b, w) in self.waves.iter().zip(&r.waves) {
            let own = w.target.saturating_sub(before);
            before = before.max(w.target);
            b.set_length(own);
            b.set_position(w.healthy.min(own));
            b.set_message(format!(
                "healthy, {} failed, {} in flight, bake {}",
                w.failed, w.in_flight, w.bake
            ));
        }
        while self.gates.len() < r.gates.len() {
            self.gates
                .push(self.multi.add(indicatif::ProgressBar::new_spinner()));
        }
        for (i, b) in self.gates.iter().enumerate() {
            b.set_message(r.gates.get(i).map(gate_line).unwrap_or_default());
            b.tick();
        }
    }

    /// Leaves every bar as it is (never filled to the end) and clears the live view.
    fn end(self) {
        for b in self.waves.iter().chain(&self.gates) {
            b.abandon();
        }
        self.status.abandon();
        let _ = self.multi.clear();
    }
}

/// Whether a failed poll is worth another try (the server is away or restarting).
fn transient(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<CliError>() {
        Some(CliError::Unreachable { .. }) => true,
        Some(CliError::Refused { status, .. }) => *status >= 500,
        _ => false,
    }
}

pub async fn watch(
    id: u64,
    interval: Duration,
    give_up_after: Duration,
    server: &ServerArgs,
    output: Output,
) -> anyhow::Result<()> {
    let mut client = Client::new(server)?;
    let tries = (give_up_after.as_millis() / interval.as_millis().max(1)).max(1);
    let mut failed = 0u128;
    let mut frame = (output == Output::Text).then(Frame::new);
    loop {
        let r: RolloutView = match client.get(&format!("/v1/rollouts/{id}")).await {
            Ok(r) => r,
            Err(e) if transient(&e) && failed < tries => {
                failed += 1;
                if let Some(f) = &frame {
                    f.status
                        .set_message(format!("{e}; retrying ({failed}/{tries})"));
                    f.status.tick();
                } else {
                    eprintln!("{e}; retrying ({failed}/{tries})");
                }
                // A restarted server may listen elsewhere: read its URL again.
                if let Ok(c) = Client::new(server) {
                    client = c;
                }
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        failed = 0;
        match &mut frame {
            // One JSON object per line, so scripts can follow along.
            None => println!("{}", serde_json::to_string(&r)?),
            Some(f) => f.draw(&r),
        }
        if is_final(&r) {
            if let Some(f) = frame.take() {
                f.end();
                print_status(&r);
            }
            return match exit_code(&r.status) {
                Some(0) | None => Ok(()),
                Some(code) => Err(CliError::RolloutEnded {
                    id,
                    status: r.status.clone(),
                    reason: r.reason.clone().unwrap_or_default(),
                    code,
                }
                .into()),
            };
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_own_exit_code() {
        let codes: Vec<Option<u8>> = ["completed", "paused", "rolled-back", "aborted", "running"]
            .iter()
            .map(|s| exit_code(s))
            .collect();
        assert_eq!(codes, vec![Some(0), Some(10), Some(11), Some(12), None]);
    }
}
