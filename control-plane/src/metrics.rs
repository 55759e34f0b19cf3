//! Prometheus counters, lock-free (atomics), rendered as text on `/metrics`; HTTP and
//! ingest durations as histograms in seconds. The fleet's state (rollouts, devices, drift,
//! training) is read from the store when scraped (`api/metrics.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_host::prom::{self, Histogram, DURATION_BUCKETS};
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

/// Why the embedded broker's TLS front refused a connection, or closed one it had let in.
/// The label values are stable (dashboards use them). An ordinary disconnect is none of
/// these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokerRefusal {
    /// TLS handshake failed: no, foreign, expired or revoked client certificate.
    Tls,
    /// Username not the certificate's CN, wrong password, or device not active.
    Login,
    /// MQTT client id not the certificate's CN (session takeover).
    ClientId,
    /// Too many connects of one identity.
    ConnectRate,
    /// A PUBLISH, last will or SUBSCRIBE outside the device's own topics.
    Acl,
    /// Not MQTT: no CONNECT in time, malformed or oversized packets.
    Protocol,
    /// Closed on accept: too many connections of the fleet or of one peer address are
    /// still handshaking (`broker/handshakes.rs`).
    Handshakes,
    /// Closed on accept: the front relays as many connections as the open-file limit
    /// carries (`broker/capacity.rs`).
    Capacity,
}

impl BrokerRefusal {
    pub const ALL: [BrokerRefusal; 8] = [
        BrokerRefusal::Tls,
        BrokerRefusal::Login,
        BrokerRefusal::ClientId,
        BrokerRefusal::ConnectRate,
        BrokerRefusal::Acl,
        BrokerRefusal::Protocol,
        BrokerRefusal::Handshakes,
        BrokerRefusal::Capacity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BrokerRefusal::Tls => "tls",
            BrokerRefusal::Login => "login",
            BrokerRefusal::ClientId => "client_id",
            BrokerRefusal::ConnectRate => "connect_rate",
            BrokerRefusal::Acl => "acl",
            BrokerRefusal::Protocol => "protocol",
            BrokerRefusal::Handshakes => "handshakes",
            BrokerRefusal::Capacity => "capacity",
        }
    }

    /// Refusals of who a client is (also counted in `broker_auth_refused`).
    pub fn is_auth(self) -> bool {
        matches!(
            self,
            BrokerRefusal::Tls | BrokerRefusal::Login | BrokerRefusal::ClientId
        )
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
    /// Sealed downlinks above `MAX_DOWNLINK_LEN`, never published.
    pub downlinks_too_large: AtomicU64,
    pub chunk_requests: AtomicU64,
    pub chunk_publishes: AtomicU64,
    /// Chunks asked for again by a device they were published to since its first ask
    /// (held by the coalescer until its resend delay).
    pub chunk_asks_held: AtomicU64,
    pub chunk_bytes: AtomicU64,
    pub commands_issued: AtomicU64,
    pub devices_online: AtomicU64,
    pub devices_enrolled: AtomicU64,
    /// Logins refused (TLS front and rumqttd's hook); never an ordinary disconnect.
    pub broker_auth_refused: AtomicU64,
    // Chunk requests refused, by reason (a request granted in part counts once).
    pub chunk_refused_not_commanded: AtomicU64,
    pub chunk_refused_unknown_model: AtomicU64,
    pub chunk_refused_rate_limited: AtomicU64,
    broker_refused: [AtomicU64; BrokerRefusal::ALL.len()],
    /// Packets the TLS front held back because their identity exceeded its message rate.
    pub broker_throttled_messages: AtomicU64,
    /// Packets held back for the byte rate.
    pub broker_throttled_bytes: AtomicU64,
    /// Sessions closed because the same identity connected again.
    pub broker_sessions_replaced: AtomicU64,
    /// Messages the embedded broker dropped on their way to a subscriber (rmqtt: its
    /// queue was full, or the message expired in it).
    pub broker_dropped: AtomicU64,
    /// Refused logins of the embedded broker's hook, logged once per username and interval.
    pub login_log: RateLog,
    /// Time to authenticate and store one ingest batch.
    pub ingest_batch: IngestBatch,
    /// Uplink frames waiting for the ingest thread.
    pub ingest_queue_depth: AtomicU64,
    /// Integration stream records published, and those the publisher refused.
    pub json_published: AtomicU64,
    pub json_failed: AtomicU64,
    /// HTTP requests by (method, route pattern, status).
    http: Mutex<std::collections::BTreeMap<HttpKey, std::sync::Arc<Histogram>>>,
}

/// An HTTP histogram's labels: method, route pattern (`/v1/devices/{id}`), status code.
type HttpKey = (String, String, u16);

/// The ingest batch histogram (a newtype so `Metrics` keeps deriving `Default`).
#[derive(Debug)]
pub struct IngestBatch(pub Histogram);

impl Default for IngestBatch {
    fn default() -> Self {
        Self(Histogram::new(&DURATION_BUCKETS))
    }
}

impl Metrics {
    pub fn refuse(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Relaxed);
    }

    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(Relaxed)
    }

    pub fn broker_refuse(&self, r: BrokerRefusal) {
        self.broker_refused[r as usize].fetch_add(1, Relaxed);
        if r.is_auth() {
            self.broker_auth_refused.fetch_add(1, Relaxed);
        }
    }

    pub fn broker_refused(&self, r: BrokerRefusal) -> u64 {
        self.broker_refused[r as usize].load(Relaxed)
    }

    /// Records one HTTP request; `route` is the matched pattern, never the raw path, so
    /// ids do not become series.
    pub fn http_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let h = {
            let mut map = self.http.lock().unwrap_or_else(|p| p.into_inner());
            map.entry((method.to_owned(), route.to_owned(), status))
                .or_insert_with(|| std::sync::Arc::new(Histogram::new(&DURATION_BUCKETS)))
                .clone()
        };
        h.observe(seconds);
    }

    /// Build info, HTTP and ingest histograms, the integration stream, the ingest queue.
    fn render_timings(&self, s: &mut String) {
        prom::header(
            s,
            "drover_build_info",
            "gauge",
            "The running control plane's version (always 1).",
        );
        prom::sample(
            s,
            "drover_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        prom::header(
            s,
            "drover_http_request_duration_seconds",
            "histogram",
            "HTTP requests by method, route pattern and status code.",
        );
        let http: Vec<_> = {
            let map = self.http.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(k, h)| (k.clone(), h.clone())).collect()
        };
        for ((method, route, status), h) in http {
            let code = status.to_string();
            let l = [
                ("method", method.as_str()),
                ("route", &route),
                ("code", &code),
            ];
            prom::histogram(s, "drover_http_request_duration_seconds", &l, &h);
        }
        prom::header(
            s,
            "drover_ingest_batch_duration_seconds",
            "histogram",
            "Time to authenticate and store one ingest batch (one SQLite transaction).",
        );
        prom::histogram(
            s,
            "drover_ingest_batch_duration_seconds",
            &[],
            &self.ingest_batch.0,
        );
        for (name, help, v) in [
            (
                "drover_integration_published_total",
                "Integration stream records (JSON) published.",
                &self.json_published,
            ),
            (
                "drover_integration_failed_total",
                "Integration stream records the publisher refused (not retried).",
                &self.json_failed,
            ),
        ] {
            prom::single(s, name, "counter", help, v.load(Relaxed) as f64);
        }
        prom::single(
            s,
            "drover_ingest_queue_depth",
            "gauge",
            "Uplink frames received and waiting for the ingest thread.",
            self.ingest_queue_depth.load(Relaxed) as f64,
        );
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        self.render_timings(&mut s);
        let counters: [(&str, &str, &AtomicU64); 17] = [
            ("drover_uplink_received_total", "Uplink frames received from the broker.", &self.uplink_received),
            ("drover_uplink_stored_total", "Uplink frames stored (new rows).", &self.uplink_stored),
            ("drover_uplink_duplicates_total", "Uplink frames already stored (resent by an agent).", &self.uplink_duplicates),
            ("drover_ingest_batches_total", "SQLite ingest transactions committed.", &self.ingest_batches),
            ("drover_ingest_errors_total", "Ingest transactions that failed (frames not acked, agents resend).", &self.ingest_errors),
            ("drover_uplink_acks_sent_total", "UplinkAck messages sent.", &self.acks_sent),
            ("drover_downlinks_too_large_total", "Downlink frames above the downlink limit, refused by the outbox and not sent.", &self.downlinks_too_large),
            ("drover_chunk_requests_total", "Chunk requests received.", &self.chunk_requests),
            ("drover_chunk_publishes_total", "Chunk publishes (coalesced).", &self.chunk_publishes),
            ("drover_chunk_asks_held_total", "Chunks asked for again by a device they were already published to since its first ask; not republished before the resend delay.", &self.chunk_asks_held),
            ("drover_chunk_egress_bytes_total", "Bytes of chunk frames published.", &self.chunk_bytes),
            ("drover_commands_issued_total", "Signed commands issued.", &self.commands_issued),
            ("drover_broker_auth_refused_total", "MQTT logins refused by the embedded broker (certificate, login, client id).", &self.broker_auth_refused),
            ("drover_broker_throttled_messages_total", "Packets the TLS front held back: their device exceeded its message rate.", &self.broker_throttled_messages),
            ("drover_broker_throttled_bytes_total", "Packets the TLS front held back: their device exceeded its byte rate.", &self.broker_throttled_bytes),
            ("drover_broker_sessions_replaced_total", "Sessions closed because the same device connected again.", &self.broker_sessions_replaced),
            ("drover_broker_dropped_total", "Messages the embedded broker dropped before a subscriber got them (its queue full, or expired in it).", &self.broker_dropped),
        ];
        for (name, help, v) in counters {
            let v = v.load(Relaxed);
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        labelled(
            &mut s,
            "drover_broker_refused_total",
            "Connections the TLS front refused or closed, by reason.",
            BrokerRefusal::ALL
                .iter()
                .map(|r| (r.as_str(), self.broker_refused(*r))),
        );
        labelled(
            &mut s,
            "drover_uplink_refused_total",
            "Uplink frames dropped, by reason.",
            Refusal::ALL.iter().map(|r| (r.as_str(), self.refused(*r))),
        );
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
        labelled(
            &mut s,
            "drover_chunk_requests_refused_total",
            "Chunk requests refused (in whole or in part), by reason.",
            [
                ("not_commanded", &self.chunk_refused_not_commanded),
                ("unknown_model", &self.chunk_refused_unknown_model),
                ("rate_limited", &self.chunk_refused_rate_limited),
            ]
            .into_iter()
            .map(|(reason, v)| (reason, v.load(Relaxed))),
        );
        s
    }
}

/// A counter family with one `reason` label.
fn labelled<'a>(
    s: &mut String,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, v) in values {
        let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {v}");
    }
}

/// One warn line per identity (or peer address) and reason per minute; the lines in
/// between are counted and reported in the next one.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Entries of the rate-limited log before it forgets them all (peer addresses of
/// unauthenticated refusals are not bounded by the fleet).
const LOG_KEYS: usize = 4096;

/// One line per key per [`LOG_INTERVAL`]; returns how many were suppressed before it
/// when a line is due, `None` when this one is to be counted and not written.
#[derive(Debug, Default)]
pub struct RateLog {
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl RateLog {
    pub fn due(&self, key: &str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= LOG_KEYS && !last.contains_key(key) {
            last.clear();
        }
        match last.get_mut(key) {
            Some((at, suppressed)) if now.saturating_duration_since(*at) < LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_log_writes_one_line_per_key_and_interval_and_counts_the_rest() {
        let log = RateLog::default();
        let t0 = Instant::now();
        assert_eq!(log.due("gw-1", t0), Some(0));
        assert_eq!(log.due("gw-1", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.due("gw-1", t0 + Duration::from_secs(2)), None);
        assert_eq!(log.due("gw-2", t0), Some(0));
        assert_eq!(log.due("gw-1", t0 + LOG_INTERVAL), Some(2));
    }
}
