//! Per-identity limits of the TLS front (issue 24): one live session per identity (a new
//! one replaces the old), token buckets for connects, messages and bytes, and a
//! rate-limited log so a misbehaving device costs one warn line per interval, never one
//! per packet.
//!
//! An identity is a certificate CN the fleet CA issued (the front knows it only after the
//! TLS handshake verified the certificate), so the per-identity state is bounded by the
//! certificates issued, not by what the network sends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::MAX_PAYLOAD;
use crate::metrics::RateLog;

/// Connects per identity: a burst of 20, then one a second. An agent reconnects after a
/// jittered backoff of seconds, and a test that kills an agent 20 times in a row stays
/// inside the burst; a connect loop (6,655 sessions in the outside battery) is refused at
/// the front before rumqttd sees it.
pub const CONNECT_BURST: f64 = 20.0;
pub const CONNECTS_PER_SEC: f64 = 1.0;

/// PUBLISH and SUBSCRIBE packets per identity: a burst of 1,000 (a spool replay after a
/// day offline sends its frames back to back, paced by acks), then 200 a second, ten
/// times what a device at its busiest (downloading, with 1 s telemetry windows) sends.
pub const MESSAGE_BURST: f64 = 1000.0;
pub const MESSAGES_PER_SEC: f64 = 200.0;

/// Bytes per identity: a burst of two largest packets, so any packet the broker accepts
/// passes, then 1 MiB/s: an uplink frame is at most 1 MiB and devices send a few a
/// second at most.
pub const BYTE_BURST: f64 = 2.0 * MAX_PAYLOAD as f64;
pub const BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

/// A token bucket with debt: a charge always succeeds and returns how long to wait until
/// the bucket is back to zero, so a flood is paced instead of dropped (MQTT 3.1.1 cannot
/// refuse a publish). Pure: the clock comes in as `now`.
#[derive(Clone, Debug)]
pub struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(burst: f64, per_sec: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        self.at = now;
    }

    /// Takes `cost` if the bucket holds it; otherwise takes nothing and says no.
    pub fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Takes `cost`, going into debt if needed; returns the wait that pays the debt.
    pub fn charge(&mut self, cost: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

#[derive(Debug)]
struct PerIdentity {
    /// The generation of the session allowed to live (every other one closes) and the
    /// number of open sessions, watched by the sessions of this identity.
    live: watch::Sender<(u64, usize)>,
    connects: Bucket,
    messages: Bucket,
    bytes: Bucket,
}

impl PerIdentity {
    fn new(now: Instant) -> Self {
        PerIdentity {
            live: watch::Sender::new((0, 0)),
            connects: Bucket::new(CONNECT_BURST, CONNECTS_PER_SEC, now),
            messages: Bucket::new(MESSAGE_BURST, MESSAGES_PER_SEC, now),
            bytes: Bucket::new(BYTE_BURST, BYTES_PER_SEC, now),
        }
    }
}

/// Open TLS sessions and the per-identity limits. A session registers with a new
/// generation and watches its identity's live generation: a newer session, or a
/// decommission, changes it and the older session closes. Only that identity's sessions
/// wake (a fleet reconnecting at once does not wake every session for every connect).
#[derive(Debug, Default)]
pub struct Sessions {
    state: Mutex<State>,
    /// Refusals and throttling, one line per identity and reason per interval.
    pub log: RateLog,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    ids: HashMap<String, PerIdentity>,
}

/// A registered session: its generation and the watch that tells it to close.
pub struct Registered {
    pub generation: u64,
    live: watch::Receiver<(u64, usize)>,
}

impl Registered {
    /// Resolves once a newer session of the same identity, or a kick, supersedes this one.
    pub async fn superseded(&mut self) {
        let gen = self.generation;
        if self.live.wait_for(|(live, _)| *live != gen).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until the sessions this one replaces have left (or `limit` passes);
    /// `false` if this one was superseded meanwhile.
    pub async fn alone(&mut self, limit: Duration) -> bool {
        let gen = self.generation;
        let wait = self
            .live
            .wait_for(|(live, open)| *live != gen || *open <= 1);
        let _ = tokio::time::timeout(limit, wait).await;
        self.live.borrow().0 == gen
    }
}

impl Sessions {
    fn with<T>(&self, identity: &str, f: impl FnOnce(&mut PerIdentity, &mut u64) -> T) -> T {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { next, ids } = &mut *st;
        let e = ids
            .entry(identity.to_owned())
            .or_insert_with(|| PerIdentity::new(Instant::now()));
        f(e, next)
    }

    /// Closes every open connection of `identity` (decommission).
    pub fn kick(&self, identity: &str) {
        self.with(identity, |e, next| {
            *next += 1;
            e.live.send_modify(|(live, _)| *live = *next);
        });
    }

    /// Number of open TLS connections of `identity`.
    pub fn open(&self, identity: &str) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.ids.get(identity).map_or(0, |e| e.live.borrow().1)
    }

    /// A connect of `identity`: `false` when its connect bucket is empty.
    pub fn may_connect(&self, identity: &str, now: Instant) -> bool {
        self.with(identity, |e, _| e.connects.try_take(1.0, now))
    }

    /// Registers a new session of `identity` as the live one; older ones close. The
    /// caller must [`Sessions::leave`] when the session ends.
    pub fn register(&self, identity: &str) -> Registered {
        self.with(identity, |e, next| {
            *next += 1;
            e.live.send_modify(|(live, open)| {
                *live = *next;
                *open += 1;
            });
            Registered {
                generation: *next,
                live: e.live.subscribe(),
            }
        })
    }

    pub fn leave(&self, identity: &str) {
        self.with(identity, |e, _| {
            e.live
                .send_modify(|(_, open)| *open = open.saturating_sub(1))
        });
    }

    /// Charges a packet to `identity`'s buckets; returns how long to hold it back and
    /// which limit asked for the longer wait.
    pub fn charge(
        &self,
        identity: &str,
        message: bool,
        bytes: usize,
        now: Instant,
    ) -> Option<(Duration, Limit)> {
        self.with(identity, |e, _| {
            let by_bytes = e.bytes.charge(bytes as f64, now);
            let by_messages = if message {
                e.messages.charge(1.0, now)
            } else {
                Duration::ZERO
            };
            match (by_messages.is_zero(), by_bytes.is_zero()) {
                (true, true) => None,
                _ if by_messages >= by_bytes => Some((by_messages, Limit::Messages)),
                _ => Some((by_bytes, Limit::Bytes)),
            }
        })
    }
}

/// Which per-identity rate held a packet back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Messages,
    Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3.0, 1.0, t0);
        assert!((0..3).all(|_| b.try_take(1.0, t0)));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(1)));
        assert!(!b.try_take(1.0, t0 + Duration::from_secs(1)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.try_take(1.0, later)));
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn charging_past_the_bucket_asks_for_the_wait_that_pays_the_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0, t0);
        assert_eq!(b.charge(10.0, t0), Duration::ZERO);
        assert_eq!(b.charge(5.0, t0), Duration::from_secs(1));
        assert_eq!(b.charge(0.0, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_new_session_supersedes_the_old_and_a_kick_supersedes_all() {
        let s = Sessions::default();
        let mut a = s.register("gw-1");
        let other = s.register("gw-2");
        let mut b = s.register("gw-1");
        a.superseded().await;
        assert_eq!(s.open("gw-1"), 2);
        s.leave("gw-1");
        assert_eq!(s.open("gw-1"), 1);
        assert!(
            b.alone(Duration::from_secs(5)).await,
            "the newest session stays"
        );
        s.kick("gw-1");
        b.superseded().await;
        assert!(
            !other.live.has_changed().unwrap(),
            "another identity is untouched"
        );
    }
}
