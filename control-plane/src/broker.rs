//! The embedded MQTT broker (rumqttd), with per-device authentication from the store.
//!
//! rumqttd runs on its own threads and cannot be stopped; it lives until the process
//! exits. A restarted in-process server therefore starts a second broker on a new port.

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
}

/// Largest MQTT payload the broker accepts: a full chunk or command frame fits, and an
/// oversized uplink still reaches ingest, which counts it (`too_large`) and drops it.
pub const MAX_PAYLOAD: usize = drover_protocol::envelope::MAX_DOWNLINK_LEN + 64 * 1024;

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

/// Starts the broker; returns the address it listens on once it accepts connections.
pub fn start(listen: SocketAddr, devices: Devices) -> Result<SocketAddr, BrokerError> {
    let addr = concrete(listen)?;
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD,
        max_inflight_count: 1024,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |_client_id, user: String, pass: String| {
        let ok = devices.broker_login_ok(&user, &pass);
        async move { ok }
    });
    let server = ServerSettings {
        name: "drover-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 50_010,
            max_outgoing_packet_count: 1024,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
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
    // Readiness: the broker binds on its own thread; wait until it accepts.
    for _ in 0..500 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            tracing::info!(%addr, "embedded MQTT broker listening");
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(BrokerError::NotListening(addr))
}

// ---- TLS front (issue 9) -------------------------------------------------------------
//
// rumqttd's own TLS support verifies a client certificate but cannot bind it to the MQTT
// username (its auth hook sees client id, username and password only), has no CRL, and
// handshakes inline in its accept loop (one silent client stalls every accept). So the
// embedded broker listens on a private loopback port, and this front terminates mutual
// TLS on the public address instead, one task per connection:
//
// 1. TLS handshake (rustls, ring) verifying the client certificate against the fleet CA
//    (expired, foreign-CA or missing certificates are refused here);
// 2. the first MQTT packet must be CONNECT whose username equals the certificate's CN, and
//    that device must not be decommissioned;
// 3. the password must be the one derived from that device's key: a device must hold
//    both its certificate and its key;
// 4. the CONNECT goes on to rumqttd with the password replaced by a per-process token
//    (`Devices::front_token`); rumqttd's auth hook accepts device logins only with that
//    token, so connecting to its private loopback port directly gets a device nowhere.
//
// `Sessions::kick` cuts a device's open connections at once (decommission).

use std::sync::Mutex;

use bytes::BytesMut;
use drover_protocol::topics::{self, ParsedTopic};
use drover_protocol::DeviceId;
use rumqttc::mqttbytes::v4::Packet as MqttPacket;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;

/// How long a client may take to finish the TLS handshake and send CONNECT.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A CONNECT is small; anything larger before it is not a client we want.
const MAX_CONNECT: usize = 16 * 1024;

/// Open TLS sessions, so a decommissioned device can be disconnected at once.
#[derive(Debug)]
pub struct Sessions {
    kick: broadcast::Sender<String>,
    open: Mutex<HashMap<String, usize>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            kick: broadcast::channel(1024).0,
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl Sessions {
    /// Closes every open connection of `identity`.
    pub fn kick(&self, identity: &str) {
        let _ = self.kick.send(identity.to_owned());
    }

    /// Number of open TLS connections of `identity`.
    pub fn open(&self, identity: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(identity).copied().unwrap_or(0)
    }

    fn enter(&self, identity: &str, delta: isize) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(identity.to_owned()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            open.remove(identity);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFrontError {
    #[error("cannot read {path}: {detail}")]
    File {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The rustls server config: the broker's certificate, client certificates required and
/// verified against the fleet CA.
pub fn server_tls_config(
    ca_pem: &str,
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, TlsFrontError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file = |path: &std::path::Path| {
        crate::keys::read_private(path).map_err(|e| TlsFrontError::File {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| TlsFrontError::Tls(format!("fleet CA: {e}")))?;
        roots
            .add(c)
            .map_err(|e| TlsFrontError::Tls(format!("fleet CA: {e}")))?;
    }
    let certs = CertificateDer::pem_slice_iter(&file(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFrontError::Tls(format!("{}: {e}", cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&file(key_file)?)
        .map_err(|e| TlsFrontError::Tls(format!("{}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsFrontError::Tls(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFrontError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsFrontError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Listens for mutual-TLS clients on `listen` and relays them to rumqttd at `backend`.
pub fn start_tls_front(
    listener: TcpListener,
    backend: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    auth: BrokerAuth,
) -> Result<SocketAddr, TlsFrontError> {
    let addr = listener
        .local_addr()
        .map_err(|source| TlsFrontError::Listen {
            addr: backend,
            source,
        })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| TlsFrontError::Listen { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS front: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let auth = auth.clone();
            tokio::spawn(async move {
                if let Err(reason) = relay(stream, acceptor, backend, &auth).await {
                    auth.metrics
                        .broker_auth_refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%peer, %reason, "TLS front refused a connection");
                }
            });
        }
    });
    tracing::info!(%addr, "embedded MQTT broker listening (mutual TLS)");
    Ok(addr)
}

async fn relay(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
    auth: &BrokerAuth,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let identity = {
        let (_, conn) = tls.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::pki::common_name(c))
            .ok_or_else(|| "client certificate has no common name".to_string())?
    };
    // Subscribe before checking the device's state, so a decommission racing this
    // connection is either seen now or kicks it later.
    let mut kicks = auth.sessions.kick.subscribe();
    let mut buf = BytesMut::with_capacity(512);
    let connect = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let mut probe = buf.clone();
            match MqttPacket::read(&mut probe, MAX_CONNECT) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("bad first packet: {e}")),
            }
            if buf.len() > MAX_CONNECT {
                return Err("first packet too large".to_string());
            }
            let n = tls
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading CONNECT: {e}"))?;
            if n == 0 {
                return Err("closed before CONNECT".to_string());
            }
        }
    })
    .await
    .map_err(|_| "no CONNECT in time".to_string())??;
    let MqttPacket::Connect(connect) = connect else {
        return Err("first packet is not CONNECT".into());
    };
    let mut connect = connect;
    let Some(login) = connect.login.as_mut() else {
        return Err(format!("certificate {identity:?} sent no username"));
    };
    if login.username != identity {
        return Err(format!(
            "certificate {identity:?} may not log in as {:?}",
            clip(&login.username)
        ));
    }
    if !auth.devices.password_ok(&identity, &login.password) {
        return Err(format!(
            "{identity} is not an enrolled, active device, or its password is wrong"
        ));
    }
    login.password = auth.devices.front_token(&identity);
    let device = DeviceId::new(identity.as_str()).map_err(|e| e.to_string())?;
    if let Some(will) = &connect.last_will {
        if !may_publish(&device, &will.topic) {
            return Err(format!(
                "{identity} may not set a last will on {:?}",
                clip(&will.topic)
            ));
        }
    }
    // The CONNECT frame is replaced; anything the client pipelined after it is kept.
    let frame_len = rumqttc::mqttbytes::check(buf.iter(), MAX_CONNECT)
        .map_err(|e| format!("bad first packet: {e}"))?
        .frame_length();
    let rest = buf.split_off(frame_len);
    let mut out = BytesMut::with_capacity(frame_len + 64);
    MqttPacket::Connect(connect)
        .write(&mut out, MAX_CONNECT * 2)
        .map_err(|e| format!("re-encoding CONNECT: {e}"))?;
    let buf = out;
    let mut upstream = tokio::net::TcpStream::connect(backend)
        .await
        .map_err(|e| format!("embedded broker: {e}"))?;
    let _ = upstream.set_nodelay(true);
    upstream
        .write_all(&buf)
        .await
        .map_err(|e| format!("embedded broker: {e}"))?;
    auth.sessions.enter(&identity, 1);
    let kicked = async {
        loop {
            match kicks.recv().await {
                Ok(id) if id == identity => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    let (mut tls_rx, mut tls_tx) = tokio::io::split(tls);
    let (mut up_rx, mut up_tx) = upstream.into_split();
    let result = tokio::select! {
        r = filter_client(&mut tls_rx, &mut up_tx, &device, rest) => r,
        _ = tokio::io::copy(&mut up_rx, &mut tls_tx) => Ok(()),
        _ = kicked => {
            tracing::info!(device_id = %identity, "open session closed: device decommissioned");
            Ok(())
        }
    };
    auth.sessions.enter(&identity, -1);
    result
}

/// The ACL of the embedded broker (rumqttd has none): a device publishes only on its own
/// uplink topics (last will included).
fn may_publish(device: &DeviceId, topic: &str) -> bool {
    matches!(topics::parse(topic), Ok(ParsedTopic::Uplink { device: d, .. }) if d == *device)
}

/// A device subscribes only to its own downlink, the keyring and model chunk topics (by
/// digest: no wildcards).
fn may_subscribe(device: &DeviceId, filter: &str) -> bool {
    match topics::parse(filter) {
        Ok(ParsedTopic::Downlink { device: d }) => d == *device,
        Ok(ParsedTopic::Keyring) | Ok(ParsedTopic::ModelChunks { .. }) => true,
        _ => false,
    }
}

/// Relays the client's packets to rumqttd, one whole packet at a time, checking each
/// PUBLISH and SUBSCRIBE against the ACL. MQTT 3.1.1 cannot refuse a publish, so a
/// violation closes the connection (and is logged and counted by the caller).
async fn filter_client(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    device: &DeviceId,
    mut buf: BytesMut,
) -> Result<(), String> {
    loop {
        let mut out = BytesMut::new();
        loop {
            let header = match rumqttc::mqttbytes::check(buf.iter(), MAX_PAYLOAD) {
                Ok(h) => h,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(format!("bad packet: {e}")),
            };
            let frame = buf.split_to(header.frame_length());
            match frame.first().map(|b| b >> 4) {
                Some(3) => {
                    let topic = publish_topic(&frame).ok_or("malformed PUBLISH")?;
                    if !may_publish(device, topic) {
                        return Err(format!("{device} may not publish to {:?}", clip(topic)));
                    }
                }
                Some(8) => {
                    let mut probe = frame.clone();
                    let Ok(MqttPacket::Subscribe(sub)) = MqttPacket::read(&mut probe, MAX_CONNECT)
                    else {
                        return Err("malformed SUBSCRIBE".into());
                    };
                    if let Some(f) = sub.filters.iter().find(|f| !may_subscribe(device, &f.path)) {
                        return Err(format!("{device} may not subscribe to {:?}", clip(&f.path)));
                    }
                }
                Some(1) => return Err("a second CONNECT".into()),
                _ => {}
            }
            out.extend_from_slice(&frame);
        }
        if !out.is_empty() {
            to.write_all(&out)
                .await
                .map_err(|e| format!("embedded broker: {e}"))?;
        }
        if from
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("reading from client: {e}"))?
            == 0
        {
            return Ok(());
        }
    }
}

/// Client-chosen text in a log line: bounded (debug-formatting escapes the rest).
fn clip(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The topic of a whole PUBLISH frame, without copying its payload.
fn publish_topic(frame: &[u8]) -> Option<&str> {
    // Fixed header: 1 byte, then the remaining length in 1-4 bytes (high bit = more).
    let len_bytes = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let at = 1 + len_bytes;
    let n = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]) as usize;
    std::str::from_utf8(frame.get(at + 2..at + 2 + n)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_frame(topic: &str, payload_len: usize) -> BytesMut {
        let mut b = BytesMut::new();
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            topic,
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            vec![7u8; payload_len],
        );
        p.pkid = 1;
        MqttPacket::Publish(p).write(&mut b, 1 << 24).unwrap();
        b
    }

    #[test]
    fn publish_topic_is_read_whatever_the_length_encoding() {
        // 1-, 2- and 3-byte remaining lengths.
        for len in [10, 300, 70_000] {
            let f = publish_frame("drover/v1/dev/gw-1/up/telemetry", len);
            assert_eq!(publish_topic(&f), Some("drover/v1/dev/gw-1/up/telemetry"));
        }
        assert_eq!(publish_topic(&[0x30]), None);
        assert_eq!(publish_topic(&[0x30, 0x05, 0x00, 0x09, b'a']), None);
    }

    #[test]
    fn acl_allows_own_topics_only_and_no_wildcards() {
        let a = DeviceId::new("gw-a").unwrap();
        let b = DeviceId::new("gw-b").unwrap();
        assert!(may_publish(
            &a,
            &topics::uplink(&a, topics::UplinkKind::Labels)
        ));
        assert!(!may_publish(
            &a,
            &topics::uplink(&b, topics::UplinkKind::Labels)
        ));
        assert!(!may_publish(&a, &topics::downlink(&a)));
        assert!(!may_publish(&a, &topics::keyring()));
        assert!(may_subscribe(&a, &topics::downlink(&a)));
        assert!(may_subscribe(&a, &topics::keyring()));
        assert!(may_subscribe(&a, &topics::model_chunks(&[3; 32])));
        assert!(!may_subscribe(&a, &topics::downlink(&b)));
        for wild in [
            "#",
            "drover/#",
            "drover/v1/dev/+/down",
            "drover/v1/model/+/chunks",
        ] {
            assert!(!may_subscribe(&a, wild), "{wild}");
        }
    }
}

// ---- setup: which broker, on which addresses, with which logins ---------------------

use std::net::ToSocketAddrs as _;

use rand::RngCore as _;

use crate::app::BrokerLogins;
use crate::config::{BrokerMode, BrokerUrl, Settings};

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
}

fn random_secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    topics::hex32(&b)
}

/// Decides addresses, logins and the broker's TLS identity from the settings.
pub fn prepare(
    settings: &Settings,
    ca: &crate::pki::FleetCa,
    now_ms: u64,
) -> Result<Prepared, SetupError> {
    let advertised = settings.advertised_broker_url.clone();
    match &settings.broker {
        BrokerMode::Embedded { listen } if !settings.allow_plaintext => {
            prepare_tls_front(*listen, advertised, ca, now_ms)
        }
        BrokerMode::Embedded { listen } => {
            tracing::warn!(
                "allow_plaintext: the embedded broker accepts plaintext MQTT without client \
                 certificates; for development only"
            );
            let listen = concrete(*listen)?;
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
                agent_broker_url: advertised.unwrap_or_else(|| format!("mqtt://{listen}")),
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
                agent_broker_url: advertised
                    .unwrap_or_else(|| format!("{scheme}://{}:{}", u.host, u.port)),
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

/// rumqttd on a private loopback port; the mutual-TLS front on `listen`, with a broker
/// certificate for every name devices may use to reach it.
fn prepare_tls_front(
    listen: SocketAddr,
    advertised: Option<String>,
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
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !public.ip().is_unspecified() {
        hosts.push(public.ip().to_string());
    }
    if let Some(u) = advertised
        .as_deref()
        .and_then(|a| crate::config::parse_broker_url(a).ok())
    {
        hosts.push(u.host);
    }
    hosts.dedup();
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
        agent_broker_url: advertised.unwrap_or_else(|| format!("mqtts://{public}")),
    })
}

/// Starts the embedded broker (and its TLS front) when `prepared` asks for one. Returns
/// the public address and, behind a front, rumqttd's private address.
pub fn launch(
    prepared: &mut Prepared,
    auth: BrokerAuth,
) -> Result<(SocketAddr, Option<SocketAddr>), SetupError> {
    let Some(embedded) = prepared.embedded else {
        return Ok((prepared.public_addr, None));
    };
    start(embedded, auth.devices.clone())?;
    match prepared.tls_front.take() {
        Some((front, tls)) => {
            let public = start_tls_front(front, embedded, tls, auth)?;
            Ok((public, Some(embedded)))
        }
        None => Ok((embedded, None)),
    }
}
