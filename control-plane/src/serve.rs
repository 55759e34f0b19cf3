//! `drover serve`: wires the broker, MQTT sessions, ingest, dispatcher, chunk server and
//! HTTP API together, and tears them down in an order that loses nothing.
//!
//! Shutdown order: HTTP stops accepting; uplink sessions disconnect; ingest stores every
//! queued frame and exits; the dispatcher sends the last acks; the publisher disconnects.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use drover_protocol::envelope::{encode_keyring, seal_downlink, DownlinkFrame};
use drover_protocol::messages::{Downlink, HelloAck, UplinkAck};
use drover_protocol::topics;
use drover_protocol::{DeviceId, DeviceKey};
use rand::RngCore as _;
use rumqttc::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{BrokerMode, BrokerUrl, ValidServeConfig};
use crate::ingest::{self, Event};
use crate::keys::{self, Keys};
use crate::metrics::Metrics;
use crate::mqtt::MqttLink;
use crate::store::{Db, Store};
use drover_host::ct_eq;

pub const DB_FILE: &str = "drover.db";
pub const TOKEN_FILE: &str = "api-token";
pub const URL_FILE: &str = "api-url";

use drover_host::clock::now_ms;

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    topics::hex32(&b)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    TlsFront(#[from] crate::broker::TlsFrontError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("continuous training: {0}")]
    Continuous(#[from] crate::continuous::ContinuousError),
}

/// A device as the broker and ingest see it.
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    pub key: DeviceKey,
    pub decommissioned: bool,
}

/// State shared by every part of the server.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub devices: RwLock<HashMap<DeviceId, DeviceEntry>>,
    pub data_dir: PathBuf,
    /// Swapped in place by `drover keys rotate` (through the API): no restart.
    keys: RwLock<Arc<Keys>>,
    /// The fleet CA: device certificates, the broker's identity, the CRL.
    pub ca: crate::pki::FleetCa,
    /// Open mutual-TLS sessions of the embedded broker (cut on decommission).
    pub tls_sessions: crate::broker::Sessions,
    pub api_token: String,
    /// Written into enrolled agents' configs.
    pub agent_broker_url: String,
    pub command_ttl_ms: u64,
    /// The control plane's own broker login (embedded broker only).
    cp_login: Option<(String, String)>,
    /// Embedded broker behind the mutual-TLS front: the per-process key of the logins the
    /// front vouches for. rumqttd then accepts device logins only with this token, so its
    /// private loopback port cannot be used to skip the certificate check.
    front_key: Option<DeviceKey>,
}

impl Shared {
    /// The current keys (a rotation swaps them; holders keep a consistent snapshot).
    pub fn keys(&self) -> Arc<Keys> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set_keys(&self, keys: Keys) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    /// Ids of decommissioned devices (for the CRL).
    pub fn decommissioned(&self) -> Vec<String> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = devices
            .iter()
            .filter(|(_, d)| d.decommissioned)
            .map(|(id, _)| id.to_string())
            .collect();
        v.sort();
        v
    }

    /// Broker authentication: the control plane's own login, or username = device id
    /// and password = that device's derived MQTT password. Decommissioned: refused.
    /// Behind the TLS front, a device login must carry the front's token instead (the
    /// front checked certificate, username and password before issuing it).
    pub fn broker_login_ok(&self, user: &str, pass: &str) -> bool {
        if let Some((u, p)) = &self.cp_login {
            if user == u {
                return ct_eq(pass.as_bytes(), p.as_bytes());
            }
        }
        let ok = match &self.front_key {
            Some(_) => {
                self.device_active(user)
                    && ct_eq(pass.as_bytes(), self.front_token(user).as_bytes())
            }
            None => self.device_password_ok(user, pass),
        };
        if !ok {
            self.metrics.broker_auth_refused.fetch_add(1, Relaxed);
            tracing::warn!(device_id = user, "broker refused a login");
        }
        ok
    }

    fn device_active(&self, user: &str) -> bool {
        DeviceId::new(user)
            .ok()
            .is_some_and(|id| self.device_key(&id).is_some())
    }

    /// Username = an enrolled, active device id and password = its derived MQTT password.
    pub fn device_password_ok(&self, user: &str, pass: &str) -> bool {
        DeviceId::new(user).ok().is_some_and(|id| {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            devices.get(&id).is_some_and(|d| {
                !d.decommissioned && ct_eq(pass.as_bytes(), d.key.mqtt_password().as_bytes())
            })
        })
    }

    /// The password the TLS front substitutes for a device it has authenticated.
    pub fn front_token(&self, user: &str) -> String {
        match &self.front_key {
            Some(k) => topics::hex32(&k.mac(format!("drover-tls-front-v1:{user}").as_bytes())),
            None => String::new(),
        }
    }

    pub fn device_key(&self, id: &DeviceId) -> Option<DeviceKey> {
        let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
        devices
            .get(id)
            .filter(|d| !d.decommissioned)
            .map(|d| d.key.clone())
    }

    pub fn set_device(&self, id: DeviceId, entry: DeviceEntry) {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        devices.insert(id, entry);
        let n = devices.values().filter(|d| !d.decommissioned).count();
        self.metrics.devices_enrolled.store(n as u64, Relaxed);
    }
}

/// A running server. Dropping it does not stop it: call [`ServeHandle::shutdown`].
pub struct ServeHandle {
    http_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    broker_url: String,
    backend_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    rollouts: crate::rollout::driver::WeakRolloutHandle,
    stop: Option<oneshot::Sender<()>>,
    main: JoinHandle<()>,
}

impl ServeHandle {
    /// The rollout driver (weak: it does not keep the server from shutting down), for an
    /// in-process continuous-training engine.
    pub fn rollouts(&self) -> crate::rollout::driver::WeakRolloutHandle {
        self.rollouts.clone()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The broker address devices connect to.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The broker URL devices are told to use (`mqtts://` unless plaintext was allowed).
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// The embedded rumqttd's private loopback address behind the TLS front (`None` for
    /// an external broker or plaintext mode).
    pub fn embedded_backend_addr(&self) -> Option<SocketAddr> {
        self.backend_addr
    }

    /// Open mutual-TLS sessions of `device` on the embedded broker.
    pub fn open_tls_sessions(&self, device: &str) -> usize {
        self.shared.tls_sessions.open(device)
    }

    pub fn api_token(&self) -> &str {
        &self.shared.api_token
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn root_public_key(&self) -> [u8; 32] {
        self.shared.keys().root_public
    }

    /// Stops the server and waits until everything queued is stored.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.main).await;
    }

    /// Waits until the server stops (its shutdown future resolved).
    pub async fn wait(self) {
        let _ = self.main.await;
    }
}

fn read_or_create_token(data_dir: &Path) -> Result<String, keys::KeyError> {
    let path = data_dir.join(TOKEN_FILE);
    if path.exists() {
        let t = keys::read_private(&path)?;
        return Ok(String::from_utf8_lossy(&t).trim().to_owned());
    }
    let t = random_hex();
    keys::write_private(&path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

/// Starts `drover serve`. Returns once every listener is bound; the server runs until
/// `shutdown` resolves or [`ServeHandle::shutdown`] is called.
pub async fn run(
    config: ValidServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeHandle, ServeError> {
    let raw = &config.raw;
    // A configured policy must load before anything starts.
    if !raw.continuous.policy.is_empty() {
        crate::continuous::Policy::load(Path::new(&raw.continuous.policy))?;
    }
    let data_dir = raw.data_dir.clone();
    for d in [data_dir.clone(), data_dir.join("models")] {
        std::fs::create_dir_all(&d).map_err(|source| ServeError::DataDir { path: d, source })?;
    }
    let keys = keys::load_or_init(&data_dir, now_ms())?;
    let ca = crate::pki::FleetCa::load_or_init(&data_dir, now_ms())?;
    let db = data_dir.join(DB_FILE);
    let mut api_store = Store::open(&db)?;
    api_store.mark_all_offline()?;
    let ingest_store = Store::open(&db)?;
    let api_token = read_or_create_token(&data_dir)?;

    let cp_login = match &config.broker {
        BrokerMode::Embedded { .. } => Some(("drover-control-plane".to_string(), random_hex())),
        BrokerMode::External(_) => None,
    };
    let mut shared = Shared {
        metrics: Arc::new(Metrics::default()),
        devices: RwLock::new(HashMap::new()),
        data_dir: data_dir.clone(),
        keys: RwLock::new(Arc::new(keys)),
        ca,
        tls_sessions: crate::broker::Sessions::default(),
        api_token,
        agent_broker_url: raw.advertised_broker_url.clone(),
        command_ttl_ms: raw.command_ttl_hours.saturating_mul(3_600_000),
        cp_login: cp_login.clone(),
        front_key: None,
    };
    for d in api_store.device_auth()? {
        shared.set_device(
            d.id,
            DeviceEntry {
                key: d.key,
                decommissioned: d.decommissioned,
            },
        );
    }

    // The CRL external brokers read; rewritten at every start so it never goes stale.
    shared.ca.write_crl(&shared.decommissioned(), now_ms())?;
    let mut tls_front = None;
    let (mqtt_addr, url) = match &config.broker {
        BrokerMode::Embedded { listen } if !raw.allow_plaintext => {
            // rumqttd on a private loopback port; the mutual-TLS front on `listen`.
            let backend = crate::broker::concrete(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let front = std::net::TcpListener::bind(listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| crate::broker::BrokerError::Port {
                    addr: *listen,
                    source,
                })?;
            let public = front
                .local_addr()
                .map_err(|source| crate::broker::BrokerError::Port {
                    addr: *listen,
                    source,
                })?;
            let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            if !public.ip().is_unspecified() {
                hosts.push(public.ip().to_string());
            }
            if let Ok(u) = crate::config::parse_broker_url(&shared.agent_broker_url) {
                hosts.push(u.host);
            }
            hosts.dedup();
            let (cert, key) = shared.ca.broker_identity(&hosts, now_ms())?;
            let tls = crate::broker::server_tls_config(shared.ca.ca_pem(), &cert, &key)?;
            tls_front = Some((front, tls));
            let mut k = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut k);
            shared.front_key = Some(DeviceKey(k));
            if shared.agent_broker_url.is_empty() {
                shared.agent_broker_url = format!("mqtts://{public}");
            }
            let (u, p) = cp_login.clone().unwrap_or_default();
            (
                backend,
                BrokerUrl {
                    host: backend.ip().to_string(),
                    port: backend.port(),
                    tls: false,
                    username: Some(u),
                    password: Some(p),
                },
            )
        }
        BrokerMode::Embedded { listen } => {
            tracing::warn!(
                "allow_plaintext: the embedded broker accepts plaintext MQTT without client \
                 certificates; for development only"
            );
            // The broker's auth hook needs `Shared`, and `Shared` needs the broker's URL:
            // resolve the port first, then build both.
            let listen = if listen.port() == 0 {
                std::net::TcpListener::bind(listen)
                    .and_then(|l| l.local_addr())
                    .map_err(|source| crate::broker::BrokerError::Port {
                        addr: *listen,
                        source,
                    })?
            } else {
                *listen
            };
            if shared.agent_broker_url.is_empty() {
                shared.agent_broker_url = format!("mqtt://{listen}");
            }
            let (u, p) = cp_login.unwrap_or_default();
            (
                listen,
                BrokerUrl {
                    host: listen.ip().to_string(),
                    port: listen.port(),
                    tls: false,
                    username: Some(u),
                    password: Some(p),
                },
            )
        }
        BrokerMode::External(u) => {
            if shared.agent_broker_url.is_empty() {
                let scheme = if u.tls { "mqtts" } else { "mqtt" };
                shared.agent_broker_url = format!("{scheme}://{}:{}", u.host, u.port);
            }
            let addr = (u.host.as_str(), u.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], u.port)));
            (addr, u.clone())
        }
    };
    let shared = Arc::new(shared);
    let mut public_mqtt_addr = mqtt_addr;
    let mut backend_addr = None;
    if matches!(config.broker, BrokerMode::Embedded { .. }) {
        crate::broker::start(mqtt_addr, Arc::clone(&shared))?;
        if let Some((front, tls)) = tls_front {
            public_mqtt_addr =
                crate::broker::start_tls_front(front, mqtt_addr, tls, Arc::clone(&shared))?;
            backend_addr = Some(mqtt_addr);
        }
    }

    let (inbound_tx, inbound_rx) = mpsc::channel(65_536);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
    let client_prefix = format!("drover-cp-{}", &random_hex()[..8]);
    // An mqtts:// external broker: the fleet CA and the control plane's own certificate
    // unless others are configured.
    let keys_dir = data_dir.join("keys");
    let ca_file = if raw.broker_ca_file.is_empty() {
        keys_dir.join(crate::pki::CA_CERT_FILE)
    } else {
        PathBuf::from(&raw.broker_ca_file)
    };
    let identity = if raw.broker_client_cert_file.is_empty() {
        (
            keys_dir.join(crate::pki::CP_CERT_FILE),
            keys_dir.join(crate::pki::CP_KEY_FILE),
        )
    } else {
        (
            PathBuf::from(&raw.broker_client_cert_file),
            PathBuf::from(&raw.broker_client_key_file),
        )
    };
    let mqtt = Arc::new(MqttLink::start(
        &url,
        Some(&ca_file),
        Some((&identity.0, &identity.1)),
        &client_prefix,
        raw.ingest.sessions,
        inbound_tx,
    )?);
    let ingest = ingest::spawn(
        ingest_store,
        Arc::clone(&shared),
        inbound_rx,
        events_tx,
        raw.ingest.batch_max,
    )
    .map_err(ServeError::Thread)?;
    let api_store = Db::new(api_store);
    let dispatcher = tokio::spawn(dispatch(
        events_rx,
        Arc::clone(&shared),
        Arc::clone(&mqtt),
        chunk_tx,
        Duration::from_millis(raw.ingest.ack_interval_ms),
    ));
    let chunks = tokio::spawn(crate::chunks::run(
        chunk_rx,
        Arc::clone(&shared),
        Arc::clone(&mqtt),
        api_store.clone(),
        raw.chunk_window_ms,
    ));
    if !mqtt.ready(Duration::from_secs(10)).await {
        tracing::warn!("uplink subscriptions not acknowledged yet; continuing, sessions retry");
    }
    // The keyring is retained so a device gets it the moment it subscribes.
    if let Err(e) = mqtt
        .publish(
            topics::keyring(),
            encode_keyring(&shared.keys().keyring_blob),
            QoS::AtLeastOnce,
            true,
        )
        .await
    {
        tracing::warn!(error = %e, "cannot publish the keyring");
    }

    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| ServeError::Http {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| ServeError::Http {
        addr: config.http_listen,
        source,
    })?;
    let _ = keys::write_private(
        &data_dir.join(URL_FILE),
        format!("http://{http_addr}\n").as_bytes(),
    );
    let (rollouts, rollout_task) = crate::rollout::driver::spawn(
        Arc::clone(&shared),
        api_store.clone(),
        Arc::clone(&mqtt),
        Duration::from_millis(raw.rollout_tick_ms),
        Duration::from_millis(raw.rollout_republish_ms),
    );
    let (continuous, continuous_task) =
        start_continuous(&raw.continuous, &api_store, &shared, rollouts.downgrade()).await?;
    let weak_rollouts = rollouts.downgrade();
    let app = crate::api::router(crate::api::AppState {
        shared: Arc::clone(&shared),
        store: api_store.clone(),
        mqtt: Arc::clone(&mqtt),
        rollouts,
        continuous,
    });
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    let retention_ms = raw.telemetry_retention_hours.saturating_mul(3_600_000);
    let maint_store = api_store.clone();
    let maint_shared = Arc::clone(&shared);
    let maintenance = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        let mut crl_ticks = 0u64;
        loop {
            tick.tick().await;
            let r = maint_store
                .run(move |s| s.prune_telemetry(now_ms().saturating_sub(retention_ms)))
                .await;
            if let Ok(Ok(n)) = r {
                if n > 0 {
                    tracing::info!(rows = n, "pruned raw telemetry past retention");
                }
            }
            // The CRL is re-issued about daily so its nextUpdate stays a year ahead.
            crl_ticks += 1;
            if crl_ticks % 144 == 0 {
                let sh = Arc::clone(&maint_shared);
                let r = tokio::task::spawn_blocking(move || {
                    sh.ca.write_crl(&sh.decommissioned(), now_ms())
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "cannot rewrite the CRL");
                }
            }
        }
    });

    let broker_url = shared.agent_broker_url.clone();
    tracing::info!(%http_addr, mqtt_addr = %public_mqtt_addr, data_dir = %data_dir.display(), "drover serve started");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let main = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop_rx => {}
        }
        tracing::info!("shutting down");
        let _ = http_stop_tx.send(());
        let _ = http.await;
        maintenance.abort();
        // The router (and with it the last rollout handle) is gone; a step in progress
        // finishes its transaction first.
        let _ = rollout_task.await;
        if let Some(t) = continuous_task {
            t.abort();
        }
        mqtt.stop_ingest();
        let _ = tokio::task::spawn_blocking(move || ingest.join()).await;
        let _ = dispatcher.await;
        let _ = chunks.await;
        mqtt.shutdown().await;
        tracing::info!("stopped");
    });
    Ok(ServeHandle {
        http_addr,
        mqtt_addr: public_mqtt_addr,
        broker_url,
        backend_addr,
        shared,
        rollouts: weak_rollouts,
        stop: Some(stop_tx),
        main,
    })
}

/// Starts drift scoring and continuous training when a policy is configured: re-attaches
/// to Slurm jobs left running, then ticks. A policy that does not load stops the server
/// with the reason (the operator asked for it to run).
async fn start_continuous(
    cfg: &crate::config::ContinuousConfig,
    store: &Db,
    shared: &Arc<Shared>,
    rollouts: crate::rollout::driver::WeakRolloutHandle,
) -> Result<
    (
        Option<Arc<crate::continuous::Engine>>,
        Option<JoinHandle<()>>,
    ),
    ServeError,
> {
    use crate::continuous::Engine;
    if cfg.policy.is_empty() {
        return Ok((None, None));
    }
    let mut engine = Engine::from_policy_file(
        store.clone(),
        shared.data_dir.clone(),
        &shared.keys().signing,
        Path::new(&cfg.policy),
        cfg.local_jobs,
    )?;
    engine.slurm = crate::jobs::slurm::SlurmConfig {
        bin_dir: (!cfg.slurm_bin_dir.is_empty()).then(|| PathBuf::from(&cfg.slurm_bin_dir)),
        slurm_conf: (!cfg.slurm_conf.is_empty()).then(|| PathBuf::from(&cfg.slurm_conf)),
    };
    engine.rollouts = Some(rollouts);
    // After `drover keys rotate` the engine signs with the new key, like the rest of serve.
    let live = Arc::clone(shared);
    engine.set_signing_source(Arc::new(move || {
        drover_protocol::SecretKey::from_seed(live.keys().signing.seed())
    }));
    let engine = Arc::new(engine);
    if let Err(e) = engine.reattach().await {
        tracing::error!(error = %e, "cannot re-attach to training jobs");
    }
    let every = Duration::from_secs(cfg.tick_secs);
    let e = Arc::clone(&engine);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match e.tick(now_ms()).await {
                Ok(t) => {
                    if let Some(trigger) = t.trigger {
                        tracing::info!(%trigger, "training job started");
                    }
                }
                Err(err) => tracing::warn!(error = %err, "continuous tick failed"),
            }
        }
    });
    Ok((Some(engine), Some(task)))
}

async fn send_downlink(shared: &Shared, mqtt: &MqttLink, device: &DeviceId, msg: Downlink) {
    let Some(key) = shared.device_key(device) else {
        return;
    };
    let frame = seal_downlink(
        &key,
        &DownlinkFrame {
            device: device.clone(),
            sent_at_ms: now_ms(),
            msg,
        },
    );
    if let Err(e) = mqtt
        .publish(topics::downlink(device), frame, QoS::AtLeastOnce, false)
        .await
    {
        tracing::warn!(device_id = %device, error = %e, "downlink publish failed");
    }
}

async fn flush_acks(shared: &Shared, mqtt: &MqttLink, acks: &mut HashMap<DeviceId, Vec<u64>>) {
    for (device, mut seqs) in acks.drain() {
        let ranges = ingest::ranges(&mut seqs);
        send_downlink(
            shared,
            mqtt,
            &device,
            Downlink::UplinkAck(UplinkAck { ranges }),
        )
        .await;
        shared.metrics.acks_sent.fetch_add(1, Relaxed);
    }
}

/// Sends what ingest asks for: coalesced acks, hello replies, chunk requests.
async fn dispatch(
    mut events: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    mqtt: Arc<MqttLink>,
    chunk_tx: mpsc::UnboundedSender<drover_protocol::messages::ChunkRequest>,
    ack_interval: Duration,
) {
    let mut acks: HashMap<DeviceId, Vec<u64>> = HashMap::new();
    let mut tick = tokio::time::interval(ack_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => {
                    flush_acks(&shared, &mqtt, &mut acks).await;
                    return;
                }
                Some(Event::Acks(v)) => {
                    for (d, s) in v {
                        acks.entry(d).or_default().extend(s);
                    }
                }
                Some(Event::Chunks(c)) => {
                    let _ = chunk_tx.send(c);
                }
                Some(Event::Hello { device, negotiated, stored_up_to, keyring_version, pending_command }) => {
                    let Ok(protocol_version) = negotiated else { continue };
                    send_downlink(&shared, &mqtt, &device, Downlink::HelloAck(HelloAck {
                        protocol_version,
                        server_time_ms: now_ms(),
                        stored_up_to,
                    })).await;
                    // Always offered: re-offering the accepted keyring is harmless, and a
                    // device that missed the retained copy catches up here.
                    let _ = keyring_version;
                    send_downlink(&shared, &mqtt, &device, Downlink::Keyring(shared.keys().keyring_blob.clone())).await;
                    if let Some(cmd) = pending_command {
                        send_downlink(&shared, &mqtt, &device, Downlink::Command(cmd)).await;
                    }
                }
            },
            _ = tick.tick() => {
                if !acks.is_empty() {
                    flush_acks(&shared, &mqtt, &mut acks).await;
                }
            }
        }
    }
}

/// Publishes a signed command to its device (used by the API after persisting it).
pub async fn send_command(
    shared: &Shared,
    mqtt: &MqttLink,
    device: &DeviceId,
    blob: drover_protocol::SignedBlob,
) {
    send_downlink(shared, mqtt, device, Downlink::Command(blob)).await;
}

/// `drover keys rotate` without a restart: reloads the key files, swaps them in and
/// publishes the new keyring (retained, so devices connecting later get it too; devices
/// that were offline also get it in reply to their `Hello`).
pub async fn reload_keys(shared: &Shared, mqtt: &MqttLink) -> Result<Arc<Keys>, ServeError> {
    let dir = shared.data_dir.clone();
    let keys = tokio::task::spawn_blocking(move || keys::load(&dir))
        .await
        .map_err(|e| ServeError::Thread(std::io::Error::other(e.to_string())))??;
    let version = keys.keyring.version;
    shared.set_keys(keys);
    let keys = shared.keys();
    mqtt.publish(
        topics::keyring(),
        encode_keyring(&keys.keyring_blob),
        QoS::AtLeastOnce,
        true,
    )
    .await?;
    tracing::info!(keyring_version = version, signing_key = %keys.signing.id(), "keys reloaded; keyring published");
    Ok(keys)
}
