//! rmqtt as the embedded broker (`embedded_broker = "rmqtt"`, cargo feature `rmqtt`):
//! a candidate measured against rumqttd (BENCHMARKS.md, "Embedded broker: rumqttd
//! against rmqtt"). It does mutual TLS itself on the public address, so each device costs
//! the server one open file instead of the front's three, and checks logins and the ACL
//! in its hooks with the rules of the front (`acl.rs`, `Devices::broker_login_ok`).
//!
//! rmqtt's own defaults allow: listeners take anonymous clients and, with no ACL hook,
//! every publish and subscribe. Here every listener refuses anonymous clients and the
//! hooks below answer every login and every packet; what they do not name is refused.
//!
//! The front's per-identity rules hold here too, through the same `limits::Sessions`:
//! the connect rate is checked at login, each PUBLISH is paced by the identity's message
//! and byte rates in the ACL hook (the hook runs in the connection's own task, so a
//! device over its rate is held back, as behind the front), one live session per
//! identity (the client id must be the identity, and rmqtt closes the older session of a
//! client id), and `Sessions::kick` (decommission, integration revoked) closes an open
//! session at once.
//!
//! Queues: rmqtt bounds each session's delivery queue and drops what overflows it (its
//! `message_dropped` hook, counted here as `drover_broker_dropped_total`). A device's
//! queue holds its downlink; the control plane's ingest sessions receive the whole
//! fleet's telemetry, so their queue is sized for a fleet-wide burst
//! ([`CONTROL_PLANE_QUEUE`]), as rumqttd's log is (4 × 64 MiB).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::retain::{RetainStorage, RetainTree};
use rmqtt::server::MqttServer;
use rmqtt::types::{
    AuthResult, ConnectInfo, PublishAclResult, Reason, Retain, SubscribeAclResult, TopicFilter,
    TopicName,
};

use super::acl::Principal;
use super::{BrokerAuth, BrokerError, MAX_PAYLOAD};
use crate::app::Devices;
use crate::metrics::BrokerRefusal;

/// The broker's TLS files (PEM), written under the data dir: rmqtt reads paths.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Where rmqtt listens: the control plane's plaintext loopback port and the devices'
/// address (mutual TLS, or plaintext with `allow_plaintext`).
#[derive(Clone, Debug)]
pub struct Plan {
    pub backend: SocketAddr,
    pub public: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// The control plane's login name (its password is checked by the device cache).
    pub control_plane_user: String,
}

/// Messages queued for one device session: its downlink (commands, chunks it asked
/// for, the keyring), a few at a time.
const DEVICE_QUEUE: usize = 10_000;
/// Messages queued for one control-plane session: the fleet's telemetry while ingest
/// catches up. 10,000 devices sending a 20-frame burst at once is 200,000; at a few
/// hundred bytes a frame a full queue is a few hundred MiB, the order of rumqttd's log.
pub const CONTROL_PLANE_QUEUE: usize = 1_000_000;

fn listener(name: &str, addr: SocketAddr, queue: usize) -> Builder {
    Builder::new()
        .name(name)
        .laddr(addr)
        .allow_anonymous(false)
        .max_packet_size(u32::try_from(MAX_PAYLOAD + 1024).unwrap_or(u32::MAX))
        .max_connections(1_000_000)
        .max_handshaking_limit(super::handshakes::MAX_PENDING)
        .handshake_timeout(super::front::HANDSHAKE_TIMEOUT)
        .max_inflight(std::num::NonZeroU16::new(1024).unwrap_or(std::num::NonZeroU16::MIN))
        .max_mqueue_len(queue)
        .nodelay(true)
        .backlog(4096)
}

/// Binds both listeners now (so the control plane can connect at once) and runs rmqtt
/// on the current tokio runtime. Devices are accepted once `open` turns true.
pub fn start(
    plan: &Plan,
    auth: BrokerAuth,
    mut open: tokio::sync::watch::Receiver<bool>,
) -> Result<(), BrokerError> {
    let bind_err = |addr: SocketAddr| {
        move |e: rmqtt::Error| BrokerError::Port {
            addr,
            source: std::io::Error::other(e.to_string()),
        }
    };
    let backend = listener("drover-control-plane", plan.backend, CONTROL_PLANE_QUEUE)
        .bind()
        .and_then(|l| l.tcp())
        .map_err(bind_err(plan.backend))?;
    let public = listener("drover-devices", plan.public, DEVICE_QUEUE);
    let public = match &plan.tls {
        Some(f) => public
            .tls_cross_certificate(true)
            .tls_cert(Some(f.cert.display().to_string()))
            .tls_key(Some(f.key.display().to_string()))
            .tls_client_ca_certs(Some(f.ca.display().to_string()))
            .collect_cert_info(true)
            .bind()
            .and_then(|l| l.tls()),
        None => public.bind().and_then(|l| l.tcp()),
    }
    .map_err(bind_err(plan.public))?;
    let (backend_port, tls) = (plan.backend.port(), plan.tls.is_some());
    let control_plane_user = plan.control_plane_user.clone();
    tokio::spawn(async move {
        let scx = ServerContext::new()
            // The machine's load is not the broker's to judge: no refusals when busy.
            .busy_check_enable(false)
            .build()
            .await;
        *scx.extends.retain_mut().await = Box::new(Retained::default());
        // The control plane's ingest sessions share `$share/drover-ingest/...`.
        *scx.extends.shared_subscription_mut().await = Box::new(RoundRobin::default());
        let register = scx.extends.hook_mgr().register();
        let hooks = Hooks {
            auth,
            backend_port,
            tls,
            control_plane_user,
            scx: scx.clone(),
        };
        for typ in [
            Type::ClientAuthenticate,
            Type::ClientConnected,
            Type::ClientDisconnected,
            Type::ClientSubscribeCheckAcl,
            Type::MessagePublishCheckAcl,
            Type::MessageDropped,
        ] {
            register.add(typ, Box::new(hooks.clone())).await;
        }
        register.start().await;
        MqttServer::new(scx.clone())
            .listener(backend)
            .build()
            .start();
        // Devices only once the control plane's uplink subscriptions are in place.
        while !*open.borrow() {
            if open.changed().await.is_err() {
                return;
            }
        }
        MqttServer::new(scx).listener(public).build().start();
    });
    tracing::info!(backend = %plan.backend, public = %plan.public, tls, "embedded rmqtt broker listening");
    Ok(())
}

/// The login and ACL hooks: the front's rules, answered from the device cache.
#[derive(Clone)]
struct Hooks {
    auth: BrokerAuth,
    /// The control plane's listener: only its own login is taken there.
    backend_port: u16,
    /// The public listener does mutual TLS: the certificate's CN must be the login.
    tls: bool,
    control_plane_user: String,
    /// To close a session `Sessions::kick` supersedes.
    scx: ServerContext,
}

impl Hooks {
    fn login(&self, c: &ConnectInfo) -> AuthResult {
        let id = c.id();
        let user = c.username().map(|u| u.to_string()).unwrap_or_default();
        let pass = c
            .password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let devices: &Devices = &self.auth.devices;
        let control_plane = user == self.control_plane_user;
        if id.lid == self.backend_port {
            // The private port: the control plane's login and nothing else.
            return if control_plane && devices.broker_login_ok(&id.client_id, &user, &pass) {
                AuthResult::Allow(true, None)
            } else {
                AuthResult::NotAuthorized
            };
        }
        if control_plane {
            return AuthResult::NotAuthorized;
        }
        if !self.auth.sessions.may_connect(&user, Instant::now()) {
            self.refuse(
                BrokerRefusal::ConnectRate,
                &user,
                format!(
                    "more than {} connects in a burst or {}/s",
                    super::limits::CONNECT_BURST,
                    super::limits::CONNECTS_PER_SEC
                ),
            );
            return AuthResult::NotAuthorized;
        }
        if self.tls {
            let cn = c.cert().and_then(|cert| cert.common_name.as_deref());
            if cn != Some(user.as_str()) {
                return AuthResult::NotAuthorized;
            }
            // An integration's certificate is its whole login (no password).
            if let Some(name) = user.strip_prefix(crate::pki::INTEGRATION_CN_PREFIX) {
                return if *id.client_id == user && devices.integration_active(name) {
                    AuthResult::Allow(false, None)
                } else {
                    AuthResult::NotAuthorized
                };
            }
        }
        if devices.broker_login_ok(&id.client_id, &user, &pass) {
            AuthResult::Allow(false, None)
        } else {
            AuthResult::BadUsernameOrPassword
        }
    }

    /// Counts a refused login and logs it once per identity and reason per interval.
    fn refuse(&self, reason: BrokerRefusal, identity: &str, detail: String) {
        self.auth.metrics.broker_refuse(reason);
        let key = format!("{identity} {reason:?}");
        if let Some(suppressed) = self.auth.sessions.log.due(&key, Instant::now()) {
            tracing::warn!(
                device_id = identity,
                ?reason,
                suppressed,
                "{detail}: connection refused"
            );
        }
    }

    /// The identity of a device or integration session (`None` for the control plane).
    fn identity<'a>(&self, s: &'a rmqtt::session::Session) -> Option<&'a str> {
        let user = s.id.username.as_deref()?;
        (user != self.control_plane_user).then_some(user)
    }

    /// A device or integration session is up: it becomes its identity's live one, and a
    /// task closes it once something supersedes it (a kick, or a newer session).
    fn connected(&self, s: &rmqtt::session::Session) {
        let Some(identity) = self.identity(s) else {
            return;
        };
        let mut registered = self.auth.sessions.register(identity);
        let (scx, id) = (self.scx.clone(), s.id.clone());
        tokio::spawn(async move {
            registered.superseded().await;
            let mut entry = scx.extends.shared().await.entry(id.clone());
            // A newer session of the same client id has already replaced this one in
            // rmqtt (and closed it): kick only the session this task watches.
            if entry.id_same() == Some(true) {
                if let Err(e) = entry.kick(true, true, true).await {
                    tracing::warn!(client_id = %id.client_id, "cannot close a superseded session: {e}");
                } else {
                    tracing::info!(device_id = %id.client_id, "open session closed: device decommissioned or integration revoked");
                }
            }
        });
    }

    /// Paces a PUBLISH by its identity's message and byte rates: held back here, in the
    /// connection's task, as the front holds it back.
    async fn pace(&self, identity: &str, p: &rmqtt::types::Publish) {
        let bytes = p.inner.topic.len() + p.inner.payload.len();
        if let Some((wait, limit)) =
            self.auth
                .sessions
                .charge(identity, true, bytes, Instant::now())
        {
            super::front::throttled(&self.auth, identity, limit, wait);
            tokio::time::sleep(wait).await;
        }
    }

    fn dropped(&self, reason: &Reason) {
        if !matches!(reason, Reason::MessageQueueFull | Reason::MessageExpiration) {
            return; // ACL refusals are counted where they are decided
        }
        self.auth.metrics.broker_dropped.fetch_add(1, Relaxed);
        if let Some(suppressed) = self.auth.sessions.log.due("broker dropped", Instant::now()) {
            tracing::warn!(
                %reason,
                suppressed,
                "the embedded broker dropped a message: a subscriber's queue is full (agents resend unacknowledged telemetry)"
            );
        }
    }

    fn principal(&self, user: Option<&str>) -> Option<(String, Principal)> {
        let user = user?;
        let p = if user.starts_with(crate::pki::INTEGRATION_CN_PREFIX) {
            Principal::Integration
        } else {
            Principal::Device(drover_protocol::DeviceId::new(user).ok()?)
        };
        p.active(&self.auth, user).then(|| (user.to_string(), p))
    }
}

#[async_trait::async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(c) => {
                (false, Some(HookResult::AuthResult(self.login(c))))
            }
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let ok = self
                    .principal(s.id.username.as_deref())
                    .is_some_and(|(_, p)| p.may_subscribe(&sub.topic_filter));
                let r = if ok {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(r)))
            }
            Parameter::ClientConnected(s) => {
                self.connected(s);
                (true, acc)
            }
            Parameter::ClientDisconnected(s, _) => {
                if let Some(identity) = self.identity(s) {
                    self.auth.sessions.leave(identity);
                }
                (true, acc)
            }
            Parameter::MessageDropped(_, _, _, reason) => {
                self.dropped(reason);
                (true, acc)
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let principal = self.principal(s.id.username.as_deref());
                let ok = principal
                    .as_ref()
                    .is_some_and(|(_, pr)| pr.may_publish(&p.inner.topic));
                let r = if ok {
                    if let Some((identity, _)) = &principal {
                        self.pace(identity, p).await;
                    }
                    PublishAclResult::allow()
                } else {
                    self.auth
                        .metrics
                        .broker_refuse(crate::metrics::BrokerRefusal::Acl);
                    PublishAclResult::rejected(true, None)
                };
                (false, Some(HookResult::PublishAclResult(r)))
            }
            _ => (true, acc),
        }
    }
}

/// Shared subscriptions (rmqtt's default does not support them): each message to the
/// next online member of the group, in turn.
#[derive(Default)]
struct RoundRobin(std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl rmqtt::subscribe::SharedSubscription for RoundRobin {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &rmqtt::types::SharedGroup,
        _publisher: &rmqtt::types::Id,
        _topic: &TopicName,
        ncs: &[(
            rmqtt::types::NodeId,
            rmqtt::types::ClientId,
            rmqtt::types::SubscriptionOptions,
            Option<Vec<rmqtt::types::SubscriptionIdentifier>>,
            Option<rmqtt::types::IsOnline>,
        )],
    ) -> Option<(usize, rmqtt::types::IsOnline)> {
        if ncs.is_empty() {
            return None;
        }
        let start = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..ncs.len())
            .map(|k| (start + k) % ncs.len())
            .find(|&i| ncs[i].4.unwrap_or(true))
            .map(|i| (i, true))
            .or(Some((start % ncs.len(), false)))
    }
}

/// Retained messages in memory (rmqtt's core keeps none without its retainer plugin):
/// the keyring is retained, and a device subscribing gets it at once.
#[derive(Default)]
struct Retained {
    tree: tokio::sync::RwLock<RetainTree<Retain>>,
    count: std::sync::atomic::AtomicIsize,
}

#[async_trait::async_trait]
impl RetainStorage for Retained {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        topic: &TopicName,
        retain: Retain,
        _expiry: Option<Duration>,
    ) -> rmqtt::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let t = rmqtt::topic::Topic::from_str(topic)?;
        let mut tree = self.tree.write().await;
        if retain.publish.payload.is_empty() {
            if tree.remove(&t).is_some() {
                self.count.fetch_sub(1, Relaxed);
            }
        } else if tree.matches(&t).is_empty() {
            tree.insert(&t, retain);
            self.count.fetch_add(1, Relaxed);
        } else {
            tree.insert(&t, retain);
        }
        Ok(())
    }

    async fn get(&self, filter: &TopicFilter) -> rmqtt::Result<Vec<(TopicName, Retain)>> {
        let t = rmqtt::topic::Topic::from_str(filter)?;
        let tree = self.tree.read().await;
        Ok(tree
            .matches(&t)
            .into_iter()
            .map(|(topic, r)| (TopicName::from(topic.to_string()), r))
            .collect())
    }

    async fn count(&self) -> isize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn max(&self) -> isize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}
