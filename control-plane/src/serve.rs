//! `drover serve`: wiring only. Builds the [`App`] and starts the services in named steps,
//! then stops them through one shutdown path that loses nothing.
//!
//! Start: data directory → keys, CA, store, token → broker (embedded or external) → MQTT
//! sessions → `App` → ingest, dispatcher, chunk server → keyring published → HTTP,
//! rollouts, continuous training, maintenance.
//!
//! Shutdown: HTTP stops accepting; the loops that tick (maintenance, continuous training)
//! finish their iteration and return; the rollout driver ends with its last handle;
//! uplink sessions disconnect; ingest stores every queued frame and exits; the dispatcher
//! sends the last acks; the chunk server drains; the publisher disconnects.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::app::{App, DeviceEntry, Devices, KeyStore, Outbox, Paths};
use crate::broker::{BrokerAuth, Sessions};
use crate::config::Settings;
use crate::keys;
use crate::metrics::Metrics;
use crate::mqtt::MqttLink;
use crate::rollout::driver::{RolloutHandle, WeakRolloutHandle};
use crate::store::{Db, Store};
use drover_host::clock::{self, SharedClock};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {data_dir} is in use by another drover serve ({holder}{url}); \
         stop it first, or give this one its own --data-dir"
    )]
    DataDirInUse {
        data_dir: PathBuf,
        /// What the lock file says about its holder (`pid N`).
        holder: String,
        /// `, API at http://…` when the holder's URL file names one.
        url: String,
    },
    #[error("cannot lock data directory {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Broker(#[from] crate::broker::SetupError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Https(#[from] crate::https::HttpsError),
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

/// A running server. Dropping it does not stop it: call [`ServeHandle::shutdown`].
pub struct ServeHandle {
    http_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    backend_addr: Option<SocketAddr>,
    app: App,
    rollouts: WeakRolloutHandle,
    stop: Option<oneshot::Sender<()>>,
    main: JoinHandle<()>,
}

impl ServeHandle {
    /// The rollout driver (weak: it does not keep the server from shutting down), for an
    /// in-process continuous-training engine.
    pub fn rollouts(&self) -> WeakRolloutHandle {
        self.rollouts.clone()
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The API's base URL as clients use it: `https://` unless the API is plaintext (see
    /// `api_url` below for an unspecified listen address).
    pub fn api_url(&self) -> String {
        api_url(self.http_addr, self.app.settings.api_tls.is_some())
    }

    /// The broker address devices connect to.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The broker URL devices are told to use (`mqtts://` unless plaintext was allowed).
    pub fn broker_url(&self) -> &str {
        &self.app.agent_broker_url
    }

    /// The embedded rumqttd's private loopback address behind the TLS front (`None` for
    /// an external broker or plaintext mode).
    pub fn embedded_backend_addr(&self) -> Option<SocketAddr> {
        self.backend_addr
    }

    /// Open mutual-TLS sessions of `device` on the embedded broker.
    pub fn open_tls_sessions(&self, device: &str) -> usize {
        self.app.tls_sessions.open(device)
    }

    pub fn api_token(&self) -> &str {
        &self.app.api_token
    }

    pub fn metrics(&self) -> &Metrics {
        &self.app.metrics
    }

    pub fn root_public_key(&self) -> [u8; 32] {
        self.app.keys.current().root_public
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

/// Starts `drover serve` on the system clock. Returns once every listener is bound; the
/// server runs until `shutdown` resolves or [`ServeHandle::shutdown`] is called.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeHandle, ServeError> {
    run_with_clock(settings, clock::system(), shutdown).await
}

/// [`run`] with the clock every service reads.
pub async fn run_with_clock(
    settings: Settings,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServeHandle, ServeError> {
    // A configured policy must load before anything starts.
    if let Some(c) = &settings.continuous {
        crate::continuous::Policy::load(&c.policy)?;
    }
    let paths = Paths::new(settings.data_dir.clone());
    prepare_data_dir(&paths)?;
    let lock = lock_data_dir(&paths)?;
    let now = clock.unix_ms();
    let keys = KeyStore::new(
        keys::load_or_init(paths.data_dir(), now)?,
        paths.data_dir().into(),
    );
    let ca = Arc::new(crate::pki::FleetCa::load_or_init(paths.data_dir(), now)?);
    let mut api_store = Store::open(&paths.db())?;
    api_store.mark_all_offline()?;
    let ingest_store = Store::open(&paths.db())?;
    let api_token: Arc<str> = read_or_create_token(&paths)?.into();
    let tokens = load_tokens(&api_store, &api_token)?;
    let metrics = Arc::new(Metrics::default());

    let broker = start_broker(&settings, &ca, &api_store, &metrics, now)?;
    let (inbound_tx, inbound_rx) = mpsc::channel(crate::config::INGEST_QUEUE);
    let mqtt = Arc::new(connect_mqtt(
        &settings,
        &paths,
        &broker.prepared,
        inbound_tx,
    )?);
    let app = App {
        outbox: Outbox::new(
            Arc::clone(&mqtt),
            broker.devices.clone(),
            Arc::clone(&clock),
            Arc::clone(&metrics),
        ),
        settings: Arc::new(settings),
        paths,
        clock,
        metrics,
        devices: broker.devices,
        keys,
        ca,
        tls_sessions: broker.sessions,
        api_token,
        tokens,
        agent_broker_url: broker.prepared.agent_broker_url.clone().into(),
        broker_names: broker.prepared.broker_names.clone().into(),
    };

    let api_store = Db::new(api_store);
    let pipeline = start_pipeline(&app, ingest_store, inbound_rx, &api_store)?;
    if !mqtt.ready(Duration::from_secs(10)).await {
        tracing::warn!("uplink subscriptions not acknowledged yet; continuing, sessions retry");
    }
    // Devices in only now: whatever they publish on (re)connecting has a subscriber.
    let _ = broker.open_front.send(true);
    if let Err(e) = app
        .outbox
        .publish_keyring(&app.keys.current().keyring_blob)
        .await
    {
        tracing::warn!(error = %e, "cannot publish the keyring");
    }

    let (stop_loops, loops_stopped) = watch::channel(false);
    let (rollouts, rollout_task) = crate::rollout::driver::spawn(app.clone(), api_store.clone());
    let weak_rollouts = rollouts.downgrade();
    let (continuous, continuous_task) = crate::continuous::start(
        &app,
        &api_store,
        rollouts.downgrade(),
        loops_stopped.clone(),
    )
    .await?;
    let (http_addr, http) = start_http(&app, &api_store, rollouts, continuous).await?;
    let maintenance = tokio::spawn(crate::maintenance::run(
        app.clone(),
        api_store.clone(),
        loops_stopped,
    ));

    tracing::info!(%http_addr, mqtt_addr = %broker.public_addr, data_dir = %app.paths.data_dir().display(), "drover serve started");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let tasks = Tasks {
        http,
        stop_loops,
        maintenance,
        continuous: continuous_task,
        rollouts: rollout_task,
        mqtt,
        pipeline,
        lock,
    };
    let main = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop_rx => {}
        }
        tasks.stop().await;
    });
    Ok(ServeHandle {
        http_addr,
        mqtt_addr: broker.public_addr,
        backend_addr: broker.backend_addr,
        app,
        rollouts: weak_rollouts,
        stop: Some(stop_tx),
        main,
    })
}

/// The broker as started, and the device cache its login hook reads.
struct Broker {
    prepared: crate::broker::Prepared,
    devices: Devices,
    sessions: Arc<Sessions>,
    public_addr: SocketAddr,
    backend_addr: Option<SocketAddr>,
    /// Opens the TLS front to devices (after the uplink subscriptions are in place).
    open_front: watch::Sender<bool>,
}

/// Addresses and logins first (the device cache needs the logins), then the cache and
/// the CRL, then the broker itself (embedded: rumqttd and its TLS front).
fn start_broker(
    settings: &Settings,
    ca: &crate::pki::FleetCa,
    store: &Store,
    metrics: &Arc<Metrics>,
    now: u64,
) -> Result<Broker, ServeError> {
    let mut prepared = crate::broker::prepare(settings, ca, now)?;
    let devices = Devices::new(
        store.device_auth()?.into_iter().map(|d| {
            let entry = DeviceEntry {
                key: d.key,
                decommissioned: d.decommissioned,
            };
            (d.id, entry)
        }),
        prepared.logins.clone(),
        Arc::clone(metrics),
    );
    for i in store.integrations()? {
        devices.set_integration(&i.name, i.revoked_at_ms.is_none());
    }
    // The CRL external brokers read; rewritten at every start so it never goes stale.
    ca.write_crl(&devices.decommissioned(), now)?;
    let sessions = Arc::new(Sessions::default());
    let auth = BrokerAuth {
        devices: devices.clone(),
        sessions: Arc::clone(&sessions),
        metrics: Arc::clone(metrics),
        handshakes: Arc::default(),
        capacity: Arc::new(crate::broker::capacity::Capacity::configured_or_from_limit(
            settings.broker_max_connections,
        )),
    };
    let (open_front, front_opens) = watch::channel(false);
    let (public_addr, backend_addr) = crate::broker::launch(&mut prepared, auth, front_opens)?;
    Ok(Broker {
        prepared,
        devices,
        sessions,
        public_addr,
        backend_addr,
        open_front,
    })
}

fn prepare_data_dir(paths: &Paths) -> Result<(), ServeError> {
    for d in [paths.data_dir().to_owned(), paths.models_dir()] {
        std::fs::create_dir_all(&d).map_err(|source| ServeError::DataDir { path: d, source })?;
    }
    Ok(())
}

/// One server per data directory, held for the process's life: `flock` on
/// `<data>/serve.lock`. The lock belongs to the open file, so it ends with the server's
/// shutdown or with its process (a crash leaves no stale lock), and two servers started in
/// one process on the same directory exclude each other too.
fn lock_data_dir(paths: &Paths) -> Result<std::fs::File, ServeError> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = paths.lock_file();
    let lock_err = |source| ServeError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(lock_err)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "pid unknown".to_owned(),
                h => h.to_owned(),
            };
            let url = std::fs::read_to_string(paths.url_file())
                .map(|u| format!(", API at {}", u.trim()))
                .unwrap_or_default();
            return Err(ServeError::DataDirInUse {
                data_dir: paths.data_dir().to_owned(),
                holder,
                url,
            });
        }
        Err(e) => return Err(lock_err(e.into())),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "pid {}", std::process::id()))
        .map_err(lock_err)?;
    Ok(file)
}

/// The API's token table: the bootstrap admin and the store's active tokens.
fn load_tokens(store: &Store, bootstrap: &str) -> Result<crate::access::Tokens, ServeError> {
    let mut active = Vec::new();
    for (name, role, hash) in store.active_token_hashes()? {
        match crate::access::Role::parse(&role) {
            Some(role) => active.push((name, role, hash)),
            None => {
                tracing::warn!(token = %name, role = %role, "API token with an unknown role ignored")
            }
        }
    }
    Ok(crate::access::Tokens::new(bootstrap, active))
}

fn read_or_create_token(paths: &Paths) -> Result<String, keys::KeyError> {
    let path = paths.token_file();
    if path.exists() {
        let t = keys::read_private(&path)?;
        return Ok(String::from_utf8_lossy(&t).trim().to_owned());
    }
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    let t = drover_protocol::topics::hex32(&b);
    keys::write_private(&path, format!("{t}\n").as_bytes())?;
    Ok(t)
}

/// The control plane's MQTT sessions. For an `mqtts://` external broker: the fleet CA and
/// the control plane's own certificate unless others are configured.
fn connect_mqtt(
    settings: &Settings,
    paths: &Paths,
    broker: &crate::broker::Prepared,
    inbound: mpsc::Sender<crate::mqtt::RawUplink>,
) -> Result<MqttLink, ServeError> {
    let keys_dir = paths.keys_dir();
    let ca_file = settings
        .broker_ca_file
        .clone()
        .unwrap_or_else(|| keys_dir.join(crate::pki::CA_CERT_FILE));
    let (cert, key) = settings.broker_client_identity.clone().unwrap_or_else(|| {
        (
            keys_dir.join(crate::pki::CP_CERT_FILE),
            keys_dir.join(crate::pki::CP_KEY_FILE),
        )
    });
    let mut prefix = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut prefix);
    Ok(MqttLink::start(
        &broker.control_plane_url,
        Some(&ca_file),
        Some((&cert, &key)),
        &format!("drover-cp-{}", hex::encode(prefix)),
        settings.ingest.sessions,
        inbound,
    )?)
}

/// The uplink pipeline: ingest (its own thread), the dispatcher, the chunk server.
struct Pipeline {
    ingest: std::thread::JoinHandle<()>,
    dispatcher: JoinHandle<()>,
    chunks: JoinHandle<()>,
}

fn start_pipeline(
    app: &App,
    ingest_store: Store,
    inbound: mpsc::Receiver<crate::mqtt::RawUplink>,
    api_store: &Db,
) -> Result<Pipeline, ServeError> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
    let ingest = crate::ingest::spawn(
        ingest_store,
        app.devices.clone(),
        Arc::clone(&app.metrics),
        inbound,
        events_tx,
        app.settings.ingest.batch_max,
        app.settings.integration_stream,
    )
    .map_err(ServeError::Thread)?;
    let dispatcher = tokio::spawn(crate::dispatch::run(
        events_rx,
        app.clone(),
        chunk_tx,
        app.settings.ingest.ack_interval,
    ));
    let chunks = tokio::spawn(crate::chunks::run(chunk_rx, app.clone(), api_store.clone()));
    Ok(Pipeline {
        ingest,
        dispatcher,
        chunks,
    })
}

/// Binds the HTTP listener, records its address for CLIs run with `--data-dir`, serves.
async fn start_http(
    app: &App,
    store: &Db,
    rollouts: RolloutHandle,
    continuous: Option<Arc<crate::continuous::Engine>>,
) -> Result<(SocketAddr, (oneshot::Sender<()>, JoinHandle<()>)), ServeError> {
    let listen = app.settings.http_listen;
    let http_err = |source| ServeError::Http {
        addr: listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(http_err)?;
    let http_addr = listener.local_addr().map_err(http_err)?;
    let tls = match &app.settings.api_tls {
        Some(t) => {
            let now = app.clock.unix_ms();
            let (cert, key) =
                crate::https::identity(t, &app.ca, &app.paths.keys_dir(), http_addr, now)?;
            Some(crate::https::server_config(&cert, &key)?)
        }
        None => None,
    };
    let _ = keys::write_private(
        &app.paths.url_file(),
        format!("{}\n", api_url(http_addr, tls.is_some())).as_bytes(),
    );
    let router = crate::api::router(crate::api::AppState {
        app: app.clone(),
        store: store.clone(),
        rollouts,
        continuous,
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let stopped = async {
        let _ = stop_rx.await;
    };
    let task = match tls {
        Some(config) => {
            let listener = crate::https::listen(listener, config).map_err(http_err)?;
            tokio::spawn(async move {
                let r = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "HTTPS server stopped");
                }
            })
        }
        None => tokio::spawn(async move {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }),
    };
    Ok((http_addr, (stop_tx, task)))
}

/// `http(s)://ADDR`; over TLS with `127.0.0.1` for an unspecified address (what a local
/// client can reach and the fleet CA's certificate covers). A plaintext URL keeps the
/// address it listens on, so `drover doctor` sees a plaintext API open beyond loopback.
fn api_url(addr: SocketAddr, tls: bool) -> String {
    let addr = if tls && addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    format!("{}://{addr}", if tls { "https" } else { "http" })
}

/// Every task the server started, stopped in an order that loses nothing.
struct Tasks {
    http: (oneshot::Sender<()>, JoinHandle<()>),
    stop_loops: watch::Sender<bool>,
    maintenance: JoinHandle<()>,
    continuous: Option<JoinHandle<()>>,
    rollouts: JoinHandle<()>,
    mqtt: Arc<MqttLink>,
    pipeline: Pipeline,
    /// The data directory's lock, released once everything else has stopped.
    lock: std::fs::File,
}

impl Tasks {
    async fn stop(self) {
        tracing::info!("shutting down");
        let (http_stop, http) = self.http;
        let _ = http_stop.send(());
        let _ = http.await;
        // Ticking loops finish the iteration in progress and return.
        let _ = self.stop_loops.send(true);
        let _ = self.maintenance.await;
        if let Some(t) = self.continuous {
            let _ = t.await;
        }
        // The router (and with it the last rollout handle) is gone, and so is the
        // continuous engine's; a step in progress finishes its transaction first.
        let _ = self.rollouts.await;
        self.mqtt.stop_ingest();
        let p = self.pipeline;
        let _ = tokio::task::spawn_blocking(move || p.ingest.join()).await;
        let _ = p.dispatcher.await;
        let _ = p.chunks.await;
        self.mqtt.shutdown().await;
        drop(self.lock);
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_api_url_names_what_clients_reach_and_keeps_plaintext_exposure_visible() {
        let any = "0.0.0.0:8470".parse().unwrap();
        let one = "10.0.0.5:8470".parse().unwrap();
        assert_eq!(super::api_url(any, true), "https://127.0.0.1:8470");
        assert_eq!(super::api_url(one, true), "https://10.0.0.5:8470");
        // Plaintext on every address stays visible as such (doctor reports it).
        assert_eq!(super::api_url(any, false), "http://0.0.0.0:8470");
    }
}
