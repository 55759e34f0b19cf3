//! The embedded MQTT broker (rumqttd), with per-device authentication from the store.
//!
//! rumqttd runs on its own threads and cannot be stopped; it lives until the process
//! exits. A restarted in-process server therefore starts a second broker on a new port.
//!
//! `front.rs` is the mutual-TLS front devices and integrations connect to; `acl.rs` what
//! each may publish and subscribe to; `limits.rs` its per-identity session and rate limits.

mod acl;
pub mod capacity;
mod front;
pub mod handshakes;
mod limits;
#[cfg(feature = "rmqtt")]
mod rmqtt_engine;

#[doc(hidden)]
pub use front::fuzz_device_bytes;
pub use front::{server_tls_config, start_tls_front, TlsFrontError};
pub use limits::{
    Sessions, BYTES_PER_SEC, BYTE_BURST, CONNECTS_PER_SEC, CONNECT_BURST, MESSAGES_PER_SEC,
    MESSAGE_BURST,
};

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::app::Devices;
use crate::metrics::Metrics;

/// What the broker's login hook and the TLS front consult: the device cache, the open
/// sessions (cut on decommission) and the refusal counters.
#[derive(Clone, Debug)]
pub struct BrokerAuth {
    pub devices: Devices,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// Connections between accept and an admitted CONNECT (`handshakes.rs`).
    pub handshakes: Arc<handshakes::Handshakes>,
    /// Connections the mutual-TLS front relays at once (`capacity.rs`).
    pub capacity: Arc<capacity::Capacity>,
}

/// Largest MQTT payload the broker accepts (`envelope::MAX_BROKER_PAYLOAD`, derived from
/// `MAX_DOWNLINK_LEN`): a full chunk or command frame fits, an oversized uplink still
/// reaches ingest, which counts it (`too_large`) and drops it, and an oversized downlink
/// reaches the agent, which acknowledges and reports it.
pub const MAX_PAYLOAD: usize = drover_protocol::envelope::MAX_BROKER_PAYLOAD;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot find a free port on {addr}: {source}")]
    Port {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
}

/// Port 0 means "pick one": bind it to learn a free port, release it, give it to rumqttd
/// (which cannot report the port it bound).
pub fn concrete(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = TcpListener::bind(addr).map_err(|source| BrokerError::Port { addr, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Port { addr, source })
}

/// How rumqttd is set up: as configured since issue 9, or `embedded_broker =
/// "rumqttd-tuned"` (one listener, each its own thread and runtime, per core, and
/// per-filter logs bounded to 2 × 4 MiB instead of 4 × 64 MiB). Its router stays one
/// thread either way; BENCHMARKS.md compares both.
#[derive(Clone, Copy, Debug)]
pub struct RumqttdShape {
    pub listeners: usize,
    pub segment_size: usize,
    pub segment_count: usize,
}

impl RumqttdShape {
    pub const DEFAULT: RumqttdShape = RumqttdShape {
        listeners: 1,
        segment_size: 64 * 1024 * 1024,
        segment_count: 4,
    };

    pub fn tuned() -> RumqttdShape {
        RumqttdShape {
            listeners: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 8),
            // A segment holds at least one full-size message.
            segment_size: (4 * 1024 * 1024).max(2 * MAX_PAYLOAD),
            segment_count: 2,
        }
    }
}

/// Starts the broker; returns the address it listens on once it accepts connections.
pub fn start(listen: SocketAddr, devices: Devices) -> Result<SocketAddr, BrokerError> {
    start_shaped(&[listen], devices, RumqttdShape::DEFAULT).map(|a| a[0])
}

/// Starts rumqttd with one listener per address in `listens` (the first is the control
/// plane's); returns their addresses once each accepts connections.
pub fn start_shaped(
    listens: &[SocketAddr],
    devices: Devices,
    shape: RumqttdShape,
) -> Result<Vec<SocketAddr>, BrokerError> {
    let addrs = listens
        .iter()
        .map(|a| concrete(*a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let ok = devices.broker_login_ok(&client_id, &user, &pass);
        async move { ok }
    });
    let servers = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let server = ServerSettings {
                name: if i == 0 {
                    "drover-v4".into()
                } else {
                    format!("drover-v4-{i}")
                },
                listen: *addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connections.clone(),
            };
            ((i + 1).to_string(), server)
        })
        .collect::<HashMap<_, _>>();
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 50_010,
            max_outgoing_packet_count: 1024,
            max_segment_size: shape.segment_size,
            max_segment_count: shape.segment_count,
            ..Default::default()
        },
        v4: Some(servers),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("drover-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    // Readiness: the broker binds on its own threads; wait until each accepts.
    for addr in &addrs {
        listening(*addr)?;
    }
    Ok(addrs)
}

fn listening(addr: SocketAddr) -> Result<(), BrokerError> {
    for _ in 0..500 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            tracing::info!(%addr, "embedded MQTT broker listening");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotListening(addr))
}

// ---- setup: which broker, on which addresses, with which logins ---------------------

use std::net::ToSocketAddrs as _;

use rand::RngCore as _;

use crate::app::BrokerLogins;
use crate::config::{BrokerMode, BrokerUrl, EmbeddedBroker, Settings};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    TlsFront(#[from] TlsFrontError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

/// The broker decided on, before anything listens.
pub struct Prepared {
    /// Where the control plane's own sessions connect, with its login.
    pub control_plane_url: BrokerUrl,
    /// Where rumqttd listens (embedded only): the private loopback port behind the TLS
    /// front, or the public address in plaintext mode.
    pub embedded: Option<SocketAddr>,
    /// The public mutual-TLS listener and its server config (embedded, not plaintext).
    pub tls_front: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    /// The address devices connect to (for an external broker, as resolved now).
    pub public_addr: SocketAddr,
    pub logins: BrokerLogins,
    /// Written into enrolled agents' configs.
    pub agent_broker_url: String,
    /// The names and addresses the broker's certificate carries (embedded broker behind
    /// the TLS front; empty otherwise): `device enroll --broker-url` is checked against them.
    pub broker_names: Vec<String>,
    /// Which embedded broker `launch` starts (`embedded_broker`).
    pub engine: EmbeddedBroker,
    /// `embedded_broker = "rmqtt"`: its listeners (then `tls_front` is `None`).
    #[cfg(feature = "rmqtt")]
    rmqtt: Option<rmqtt_engine::Plan>,
}

fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    drover_protocol::topics::hex32(&b)
}

/// Decides addresses, logins and the broker's TLS identity from the settings.
pub fn prepare(
    settings: &Settings,
    ca: &crate::pki::FleetCa,
    now_ms: u64,
) -> Result<Prepared, SetupError> {
    match &settings.broker {
        #[cfg(feature = "rmqtt")]
        BrokerMode::Embedded { listen }
            if settings.embedded_broker == crate::config::EmbeddedBroker::Rmqtt =>
        {
            prepare_rmqtt(*listen, settings, ca, now_ms)
        }
        BrokerMode::Embedded { listen } if !settings.allow_plaintext => {
            prepare_tls_front(*listen, settings, ca, now_ms)
        }
        BrokerMode::Embedded { listen } => {
            tracing::warn!(
                "allow_plaintext: the embedded broker accepts plaintext MQTT without client \
                 certificates; for development only"
            );
            let listen = concrete(*listen)?;
            let agent_broker_url = agent_url(settings, "mqtt", listen);
            let login = ("drover-control-plane".to_string(), random_secret());
            Ok(Prepared {
                control_plane_url: loopback_login(listen, &login),
                embedded: Some(listen),
                tls_front: None,
                public_addr: listen,
                logins: BrokerLogins {
                    control_plane: Some(login),
                    front_key: None,
                },
                agent_broker_url,
                broker_names: Vec::new(),
                engine: settings.embedded_broker,
                #[cfg(feature = "rmqtt")]
                rmqtt: None,
            })
        }
        BrokerMode::External(u) => {
            let scheme = if u.tls { "mqtts" } else { "mqtt" };
            let public_addr = (u.host.as_str(), u.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], u.port)));
            Ok(Prepared {
                control_plane_url: u.clone(),
                embedded: None,
                tls_front: None,
                public_addr,
                logins: BrokerLogins::default(),
                agent_broker_url: settings
                    .advertised_broker_url
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{}:{}", u.host, u.port)),
                broker_names: Vec::new(),
                engine: settings.embedded_broker,
                #[cfg(feature = "rmqtt")]
                rmqtt: None,
            })
        }
    }
}

fn loopback_login(addr: SocketAddr, login: &(String, String)) -> BrokerUrl {
    BrokerUrl {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: false,
        username: Some(login.0.clone()),
        password: Some(login.1.clone()),
    }
}

/// The URL enrolled agents get: `advertised_broker_url`, else the first advertised name
/// (the broker's port unless it names one), else the address the broker listens on.
fn agent_url(settings: &Settings, scheme: &str, public: SocketAddr) -> String {
    if let Some(u) = &settings.advertised_broker_url {
        return u.clone();
    }
    match settings.advertise.first() {
        Some(a) => format!("{scheme}://{}", a.authority(public.port())),
        None => format!("{scheme}://{public}"),
    }
}

/// Every name and address the broker certificate must carry: loopback, a specific listen
/// address, each advertised name and `advertised_broker_url`'s host; once each, in order.
fn broker_hosts(settings: &Settings, public: SocketAddr) -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !public.ip().is_unspecified() {
        hosts.push(public.ip().to_string());
    }
    hosts.extend(settings.advertise.iter().map(|a| a.host.clone()));
    if let Some(u) = settings
        .advertised_broker_url
        .as_deref()
        .and_then(|a| crate::config::parse_broker_url(a).ok())
    {
        hosts.push(u.host.to_ascii_lowercase());
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

/// rumqttd on a private loopback port; the mutual-TLS front on `listen`, with a broker
/// certificate for every name devices may use to reach it.
fn prepare_tls_front(
    listen: SocketAddr,
    settings: &Settings,
    ca: &crate::pki::FleetCa,
    now_ms: u64,
) -> Result<Prepared, SetupError> {
    let backend = concrete(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let port_err = |source| BrokerError::Port {
        addr: listen,
        source,
    };
    let front = TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(port_err)?;
    let public = front.local_addr().map_err(port_err)?;
    let hosts = broker_hosts(settings, public);
    let (cert, key) = ca.broker_identity(&hosts, now_ms)?;
    let tls = server_tls_config(ca.ca_pem(), &cert, &key)?;
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    let login = ("drover-control-plane".to_string(), random_secret());
    Ok(Prepared {
        control_plane_url: loopback_login(backend, &login),
        embedded: Some(backend),
        tls_front: Some((front, tls)),
        public_addr: public,
        logins: BrokerLogins {
            control_plane: Some(login),
            front_key: Some(drover_protocol::DeviceKey(k)),
        },
        agent_broker_url: agent_url(settings, "mqtts", public),
        broker_names: hosts,
        engine: settings.embedded_broker,
        #[cfg(feature = "rmqtt")]
        rmqtt: None,
    })
}

/// Starts the embedded broker (and its TLS front) when `prepared` asks for one. Returns
/// the public address and, behind a front, rumqttd's private address. The front accepts
/// devices once `open` turns true (see [`start_tls_front`]).
pub fn launch(
    prepared: &mut Prepared,
    auth: BrokerAuth,
    open: tokio::sync::watch::Receiver<bool>,
) -> Result<(SocketAddr, Option<SocketAddr>), SetupError> {
    let Some(embedded) = prepared.embedded else {
        return Ok((prepared.public_addr, None));
    };
    #[cfg(feature = "rmqtt")]
    if let Some(plan) = &prepared.rmqtt {
        rmqtt_engine::start(plan, auth, open)?;
        return Ok((plan.public, Some(embedded)));
    }
    let (listens, shape) = match prepared.engine {
        EmbeddedBroker::RumqttdTuned => {
            let shape = RumqttdShape::tuned();
            let extra = SocketAddr::from(([127, 0, 0, 1], 0));
            let mut l = vec![embedded];
            l.extend(std::iter::repeat_n(extra, shape.listeners - 1));
            (l, shape)
        }
        _ => (vec![embedded], RumqttdShape::DEFAULT),
    };
    let backends = start_shaped(&listens, auth.devices.clone(), shape)?;
    match prepared.tls_front.take() {
        Some((front, tls)) => {
            let public = start_tls_front(front, backends, tls, auth, open)?;
            Ok((public, Some(embedded)))
        }
        None => Ok((embedded, None)),
    }
}

/// rmqtt on the public address (mutual TLS with the broker certificate, unless
/// `allow_plaintext`) and on a private loopback port for the control plane's login.
#[cfg(feature = "rmqtt")]
fn prepare_rmqtt(
    listen: SocketAddr,
    settings: &Settings,
    ca: &crate::pki::FleetCa,
    now_ms: u64,
) -> Result<Prepared, SetupError> {
    let backend = concrete(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let public = concrete(listen)?;
    let login = ("drover-control-plane".to_string(), random_secret());
    let (tls, hosts, scheme) = if settings.allow_plaintext {
        (None, Vec::new(), "mqtt")
    } else {
        let hosts = broker_hosts(settings, public);
        let (cert, key) = ca.broker_identity(&hosts, now_ms)?;
        let files = rmqtt_engine::TlsFiles {
            cert,
            key,
            ca: ca.dir().join(crate::pki::CA_CERT_FILE),
        };
        (Some(files), hosts, "mqtts")
    };
    let plan = rmqtt_engine::Plan {
        backend,
        public,
        tls,
        control_plane_user: login.0.clone(),
    };
    Ok(Prepared {
        control_plane_url: loopback_login(backend, &login),
        embedded: Some(backend),
        tls_front: None,
        public_addr: public,
        logins: BrokerLogins {
            control_plane: Some(login),
            front_key: None,
        },
        agent_broker_url: agent_url(settings, scheme, public),
        broker_names: hosts,
        engine: settings.embedded_broker,
        rmqtt: Some(plan),
    })
}
