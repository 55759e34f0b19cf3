//! Prometheus counters, lock-free (atomics), rendered as text on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use drover_protocol::DecodeError;

/// Why an uplink frame was dropped. The label values are stable (dashboards use them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    BadTopic,
    UnknownDevice,
    Decommissioned,
    TooLarge,
    Incompatible,
    Garbage,
    BadMac,
    DeviceMismatch,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::BadTopic,
        Refusal::UnknownDevice,
        Refusal::Decommissioned,
        Refusal::TooLarge,
        Refusal::Incompatible,
        Refusal::Garbage,
        Refusal::BadMac,
        Refusal::DeviceMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadTopic => "bad_topic",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::Decommissioned => "decommissioned",
            Refusal::TooLarge => "too_large",
            Refusal::Incompatible => "incompatible_version",
            Refusal::Garbage => "garbage",
            Refusal::BadMac => "bad_mac",
            Refusal::DeviceMismatch => "device_mismatch",
        }
    }

    pub fn of(e: &DecodeError) -> Refusal {
        match e {
            DecodeError::TooLarge { .. } => Refusal::TooLarge,
            DecodeError::Incompatible { .. } => Refusal::Incompatible,
            DecodeError::BadMac => Refusal::BadMac,
            DecodeError::DeviceMismatch { .. } => Refusal::DeviceMismatch,
            DecodeError::TooShort { .. }
            | DecodeError::BadMagic
            | DecodeError::UnknownKind(_)
            | DecodeError::WrongKind { .. }
            | DecodeError::Malformed(_) => Refusal::Garbage,
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub uplink_received: AtomicU64,
    pub uplink_stored: AtomicU64,
    pub uplink_duplicates: AtomicU64,
    refused: [AtomicU64; 8],
    pub ingest_batches: AtomicU64,
    pub ingest_errors: AtomicU64,
    pub acks_sent: AtomicU64,
    pub chunk_requests: AtomicU64,
    pub chunk_publishes: AtomicU64,
    pub chunk_bytes: AtomicU64,
    pub commands_issued: AtomicU64,
    pub devices_online: AtomicU64,
    pub devices_enrolled: AtomicU64,
    pub broker_auth_refused: AtomicU64,
    // Chunk requests refused, by reason (a request granted in part counts once).
    pub chunk_refused_not_commanded: AtomicU64,
    pub chunk_refused_unknown_model: AtomicU64,
    pub chunk_refused_rate_limited: AtomicU64,
}

impl Metrics {
    pub fn refuse(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Relaxed);
    }

    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(Relaxed)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "drover_uplink_received_total",
            "Uplink frames received from the broker.",
            self.uplink_received.load(Relaxed),
        );
        counter(
            "drover_uplink_stored_total",
            "Uplink frames stored (new rows).",
            self.uplink_stored.load(Relaxed),
        );
        counter(
            "drover_uplink_duplicates_total",
            "Uplink frames already stored (resent by an agent).",
            self.uplink_duplicates.load(Relaxed),
        );
        counter(
            "drover_ingest_batches_total",
            "SQLite ingest transactions committed.",
            self.ingest_batches.load(Relaxed),
        );
        counter(
            "drover_ingest_errors_total",
            "Ingest transactions that failed (frames not acked, agents resend).",
            self.ingest_errors.load(Relaxed),
        );
        counter(
            "drover_uplink_acks_sent_total",
            "UplinkAck messages sent.",
            self.acks_sent.load(Relaxed),
        );
        counter(
            "drover_chunk_requests_total",
            "Chunk requests received.",
            self.chunk_requests.load(Relaxed),
        );
        counter(
            "drover_chunk_publishes_total",
            "Chunk publishes (coalesced).",
            self.chunk_publishes.load(Relaxed),
        );
        counter(
            "drover_chunk_egress_bytes_total",
            "Bytes of chunk frames published.",
            self.chunk_bytes.load(Relaxed),
        );
        counter(
            "drover_commands_issued_total",
            "Signed commands issued.",
            self.commands_issued.load(Relaxed),
        );
        counter(
            "drover_broker_auth_refused_total",
            "MQTT connections refused by the embedded broker.",
            self.broker_auth_refused.load(Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP drover_uplink_refused_total Uplink frames dropped, by reason.\n# TYPE drover_uplink_refused_total counter"
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                s,
                "drover_uplink_refused_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.refused(r)
            );
        }
        let _ = writeln!(
            s,
            "# HELP drover_devices_online Devices currently online.\n# TYPE drover_devices_online gauge\ndrover_devices_online {}",
            self.devices_online.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP drover_devices_enrolled Devices enrolled and not decommissioned.\n# TYPE drover_devices_enrolled gauge\ndrover_devices_enrolled {}",
            self.devices_enrolled.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP drover_chunk_requests_refused_total Chunk requests refused (in whole or in part), by reason.\n# TYPE drover_chunk_requests_refused_total counter"
        );
        for (reason, v) in [
            ("not_commanded", &self.chunk_refused_not_commanded),
            ("unknown_model", &self.chunk_refused_unknown_model),
            ("rate_limited", &self.chunk_refused_rate_limited),
        ] {
            let _ = writeln!(
                s,
                "drover_chunk_requests_refused_total{{reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        s
    }
}
