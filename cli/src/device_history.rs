//! `drover device telemetry|history DEVICE`: a device's recent telemetry windows, and one
//! timeline of what happened to it (commands sent, progress it reported, operator changes
//! from its audit log), read from what the server already stores.

use serde::Serialize;

use super::client::{print_json, Client};
use super::{fmt_ms, Output};
use drover_control_plane::api::{
    CommandView, DeviceEventView, DeviceView, ProgressView, TelemetryView,
};

/// One line of `device history`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HistoryLine {
    pub at_ms: u64,
    /// `enrolled`, `command`, `progress` or an audit kind (`labels`, `decommissioned`).
    pub kind: String,
    pub detail: String,
}

pub async fn telemetry(
    client: &Client,
    id: &str,
    limit: u32,
    output: Output,
) -> anyhow::Result<()> {
    let rows: Vec<TelemetryView> = client
        .get(&format!("/v1/devices/{id}/telemetry?limit={limit}"))
        .await?;
    if output == Output::Json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("{id}: no telemetry stored (the device has not reported a window yet, or retention pruned it)");
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:>10} {:>7} {:>6} {:>10}",
        "WINDOW END", "SECONDS", "INFERENCES", "ERRORS", "CPU %", "MEM MB"
    );
    for t in &rows {
        println!(
            "{:<20} {:>8.1} {:>10} {:>7} {:>6} {:>10}",
            fmt_ms(t.window_end_ms),
            t.window_end_ms.saturating_sub(t.window_start_ms) as f64 / 1000.0,
            t.inferences,
            t.errors,
            t.cpu_percent
                .map_or_else(|| "?".to_string(), |c| format!("{c:.1}")),
            t.mem_used_bytes
                .map_or_else(|| "?".to_string(), |m| format!("{:.1}", m as f64 / 1e6))
        );
    }
    Ok(())
}

/// Merges the device's rows into one timeline, oldest first.
pub fn timeline(
    d: &DeviceView,
    commands: &[CommandView],
    progress: &[ProgressView],
    events: &[DeviceEventView],
) -> Vec<HistoryLine> {
    let mut out = vec![HistoryLine {
        at_ms: d.enrolled_at_ms,
        kind: "enrolled".into(),
        detail: format!("{} enrolled", d.id),
    }];
    out.extend(commands.iter().map(|c| HistoryLine {
        at_ms: c.issued_at_ms,
        kind: "command".into(),
        detail: format!(
            "command {} {}{} (expires {})",
            c.seq,
            c.kind,
            c.model_digest
                .as_deref()
                .map(|m| format!(" {}", &m[..m.len().min(12)]))
                .unwrap_or_default(),
            fmt_ms(c.expires_at_ms)
        ),
    }));
    out.extend(progress.iter().map(|p| HistoryLine {
        at_ms: p.received_at_ms,
        kind: "progress".into(),
        detail: format!(
            "command {} {}{}",
            p.command_seq,
            p.phase,
            p.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        ),
    }));
    out.extend(events.iter().map(|e| HistoryLine {
        at_ms: e.at_ms,
        kind: e.kind.clone(),
        detail: format!("{} (by {})", e.detail, e.by),
    }));
    // Stable: rows of one time keep their source order (a command before its reports).
    out.sort_by_key(|l| l.at_ms);
    out
}

pub async fn history(client: &Client, id: &str, limit: u32, output: Output) -> anyhow::Result<()> {
    let d: DeviceView = client.get(&format!("/v1/devices/{id}")).await?;
    let commands: Vec<CommandView> = client.get(&format!("/v1/devices/{id}/commands")).await?;
    let progress: Vec<ProgressView> = client
        .get(&format!("/v1/devices/{id}/progress?limit={limit}"))
        .await?;
    let events: Vec<DeviceEventView> = client
        .get(&format!("/v1/devices/{id}/events?limit={limit}"))
        .await?;
    let mut lines = timeline(&d, &commands, &progress, &events);
    let skip = lines.len().saturating_sub(limit as usize);
    lines.drain(..skip);
    if output == Output::Json {
        return print_json(&lines);
    }
    for l in &lines {
        println!("{}  {:<10} {}", fmt_ms(l.at_ms), l.kind, l.detail);
    }
    Ok(())
}
