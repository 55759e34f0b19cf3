//! The mutual-TLS front of the embedded broker (issue 9; limits, issue 24).
//!
//! rumqttd's own TLS support verifies a client certificate but cannot bind it to the MQTT
//! username (its auth hook sees client id, username and password only), has no CRL, and
//! handshakes inline in its accept loop (one silent client stalls every accept). So the
//! embedded broker listens on a private loopback port, and this front terminates mutual
//! TLS on the public address instead, one task per connection, at most
//! `handshakes::MAX_PENDING` of them (`MAX_PENDING_PER_IP` per address) still handshaking:
//!
//! 1. TLS handshake (rustls, ring) verifying the client certificate against the fleet CA
//!    (expired, foreign-CA or missing certificates are refused here);
//! 2. the first MQTT packet must be CONNECT within the connect rate of that identity,
//!    whose username **and client id** equal the certificate's CN (a client id is a
//!    session: another device's would take over its queued commands and kick it off),
//!    and that device must not be decommissioned;
//! 3. the password must be the one derived from that device's key: a device must hold
//!    both its certificate and its key; a read-only integration (CN `integration@<name>`,
//!    `crate::integrations`) must be active instead, its password is ignored;
//! 4. the CONNECT goes on to rumqttd with the password replaced by a per-process token
//!    (`Devices::front_token`); rumqttd's auth hook accepts device logins only with that
//!    token, so connecting to its private loopback port directly gets a device nowhere;
//! 5. the session becomes its identity's only live one: an older session of the same
//!    identity is closed (`limits::Sessions`), so one identity holds one connection's
//!    files, however often it connects;
//! 6. every packet is checked against the ACL (`acl.rs`) and paced by the identity's
//!    message and byte rates.
//!
//! A refused CONNECT gets a CONNACK saying why. Refusals are counted by reason
//! (`drover_broker_refused_total`) and logged once per identity and reason per interval;
//! an ordinary disconnect (EOF, reset, a client that gives up) is neither.
//! `Sessions::kick` cuts a device's open connections at once (decommission).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use drover_protocol::DeviceId;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet as MqttPacket};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::acl::Principal;
use super::limits::Limit;
use super::{BrokerAuth, MAX_PAYLOAD};
use crate::metrics::BrokerRefusal;

/// How long a client may take to finish the TLS handshake and send CONNECT.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A CONNECT is small; anything larger before it is not a client we want.
const MAX_CONNECT: usize = 16 * 1024;

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

/// Listens for mutual-TLS clients on `listen` and relays them to rumqttd at `backends`
/// (one listener, or one per core with `embedded_broker = "rumqttd-tuned"`: sessions are
/// spread over them in turn).
/// The socket is bound at once (its address is known), but devices are accepted only once
/// `open` turns true: the control plane opens it after its uplink subscriptions are in
/// place, so a device reconnecting after a restart never publishes into a broker where no
/// one listens yet (those frames would wait in its spool until its next reconnect).
pub fn start_tls_front(
    listener: TcpListener,
    backends: Vec<SocketAddr>,
    config: Arc<rustls::ServerConfig>,
    auth: BrokerAuth,
    mut open: tokio::sync::watch::Receiver<bool>,
) -> Result<SocketAddr, TlsFrontError> {
    let addr = listener
        .local_addr()
        .map_err(|source| TlsFrontError::Listen {
            addr: backends
                .first()
                .copied()
                .unwrap_or(SocketAddr::from(([0; 4], 0))),
            source,
        })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| TlsFrontError::Listen { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let max_connections = auth.capacity.max();
    tokio::spawn(async move {
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        let mut turn = 0usize;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "TLS front: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Past the open-file limit rumqttd's accept would fail (and spin): refuse here.
            let Some(place) = auth.capacity.enter() else {
                drop(stream);
                report(&auth, peer, over_capacity(&auth));
                continue;
            };
            // Bounded: a flood of silent connections fills its own address's quota and
            // is closed here, never delaying anyone else's handshake.
            let Some(slot) = auth.handshakes.enter(peer.ip()) else {
                drop(stream);
                report(
                    &auth,
                    peer,
                    unidentified(
                        BrokerRefusal::Handshakes,
                        "too many connections handshaking",
                    ),
                );
                continue;
            };
            let acceptor = acceptor.clone();
            let auth = auth.clone();
            turn = turn.wrapping_add(1);
            let backend = backends[turn % backends.len().max(1)];
            tokio::spawn(async move {
                let _place = place;
                if let Err(refused) = relay(stream, acceptor, backend, &auth, slot).await {
                    report(&auth, peer, refused);
                }
            });
        }
    });
    tracing::info!(%addr, max_connections, "embedded MQTT broker listening (mutual TLS)");
    Ok(addr)
}

/// Why the front closed a connection that did not end ordinarily.
#[derive(Debug)]
struct Refused {
    /// `None`: a failure on our side (rumqttd unreachable), logged but not counted.
    reason: Option<BrokerRefusal>,
    identity: Option<String>,
    detail: String,
}

fn refused(reason: BrokerRefusal, identity: &str, detail: impl Into<String>) -> Refused {
    Refused {
        reason: Some(reason),
        identity: Some(identity.to_owned()),
        detail: detail.into(),
    }
}

fn over_capacity(auth: &BrokerAuth) -> Refused {
    unidentified(
        BrokerRefusal::Capacity,
        format!(
            "the broker holds {} connections, the most it may (broker_max_connections, or \
             the open-file limit at {} files per connection): raise the limit (systemd \
             LimitNOFILE=, ulimit -n) and restart, or use an external broker",
            auth.capacity.max(),
            super::capacity::FILES_PER_CONNECTION
        ),
    )
}

fn unidentified(reason: BrokerRefusal, detail: impl Into<String>) -> Refused {
    Refused {
        reason: Some(reason),
        identity: None,
        detail: detail.into(),
    }
}

/// Counts a refusal and logs it, once per identity (or peer address) and reason per
/// interval.
fn report(auth: &BrokerAuth, peer: SocketAddr, r: Refused) {
    if let Some(reason) = r.reason {
        auth.metrics.broker_refuse(reason);
    }
    let who = r.identity.clone().unwrap_or_else(|| peer.ip().to_string());
    let reason = r.reason.map_or("server", BrokerRefusal::as_str);
    if let Some(suppressed) = auth
        .sessions
        .log
        .due(&format!("{who} {reason}"), Instant::now())
    {
        tracing::warn!(
            %peer,
            device_id = r.identity.as_deref().unwrap_or(""),
            reason,
            suppressed,
            detail = %r.detail,
            "TLS front refused a connection"
        );
    }
}

type Tls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// An I/O error that is a peer going away, not a refusal.
fn ordinary(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}

async fn relay(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: SocketAddr,
    auth: &BrokerAuth,
    slot: super::handshakes::Slot,
) -> Result<(), Refused> {
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Err(_) => {
            return Err(unidentified(
                BrokerRefusal::Protocol,
                "TLS handshake timed out",
            ))
        }
        Ok(Err(e)) if ordinary(&e) => return Ok(()),
        Ok(Err(e)) => {
            return Err(unidentified(
                BrokerRefusal::Tls,
                format!("TLS handshake: {e}"),
            ))
        }
        Ok(Ok(tls)) => tls,
    };
    let identity = {
        let (_, conn) = tls.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::pki::common_name(c))
            .ok_or_else(|| {
                unidentified(BrokerRefusal::Tls, "client certificate has no common name")
            })?
    };
    let mut buf = BytesMut::with_capacity(512);
    let Some(connect) = read_connect(&mut tls, &mut buf, &identity).await? else {
        return Ok(());
    };
    let (connect, principal) = match admit(auth, &identity, connect) {
        Ok(c) => c,
        Err((code, r)) => {
            refuse_connect(&mut tls, code).await;
            return Err(r);
        }
    };
    // Admitted: no longer handshaking.
    drop(slot);
    let (out, rest) = replace_connect(buf, connect)
        .map_err(|e| refused(BrokerRefusal::Protocol, &identity, e))?;
    let server = |e: std::io::Error| Refused {
        reason: None,
        identity: Some(identity.clone()),
        detail: format!("embedded broker: {e}"),
    };
    // Replace the older session before rumqttd hears of this one: rumqttd 0.20 reuses
    // the connection slot of a session it replaces, and a late disconnect of the old link
    // then closes the new one. So the old session hands its link back first (`retire`),
    // and this one connects once it is alone.
    let mut session = auth.sessions.register(&identity);
    let live = session.alone(RETIRE_TIMEOUT).await;
    // A decommission between the password check and `register` found no session to
    // kick; it changed the device's standing first, so this check sees it.
    if !live || !principal.active(auth, &identity) {
        auth.sessions.leave(&identity);
        return Ok(());
    }
    let upstream = async {
        let mut up = tokio::net::TcpStream::connect(backend).await?;
        let _ = up.set_nodelay(true);
        up.write_all(&out).await?;
        Ok::<_, std::io::Error>(up)
    };
    let upstream = match upstream.await {
        Ok(u) => u,
        Err(e) => {
            auth.sessions.leave(&identity);
            return Err(server(e));
        }
    };
    let (mut tls_rx, mut tls_tx) = tokio::io::split(tls);
    let (mut up_rx, mut up_tx) = upstream.into_split();
    let mut superseded = false;
    let result = tokio::select! {
        r = filter_client(&mut tls_rx, &mut up_tx, &identity, &principal, auth, rest) => r,
        _ = tokio::io::copy(&mut up_rx, &mut tls_tx) => Ok(()),
        _ = session.superseded() => {
            superseded = true;
            Ok(())
        }
    };
    if superseded {
        retire(&mut up_rx, &mut up_tx).await;
        if !principal.active(auth, &identity) {
            tracing::info!(device_id = %identity, "open session closed: device decommissioned or integration revoked");
        } else {
            auth.metrics.broker_sessions_replaced.fetch_add(1, Relaxed);
            if let Some(suppressed) = auth
                .sessions
                .log
                .due(&format!("{identity} replaced"), Instant::now())
            {
                tracing::info!(device_id = %identity, suppressed, "session replaced by a newer one of the same device");
            }
        }
    }
    auth.sessions.leave(&identity);
    result
}

/// How long a replaced session may take to hand its rumqttd link back.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes a replaced session's link to rumqttd and waits until rumqttd closes its side:
/// it queues the link's disconnect for its router before closing the socket, so a
/// newer session's CONNECT, sent after this, is handled after that disconnect.
async fn retire(
    up_rx: &mut (impl tokio::io::AsyncRead + Unpin),
    up_tx: &mut (impl tokio::io::AsyncWrite + Unpin),
) {
    let _ = up_tx.shutdown().await;
    let _ = tokio::time::timeout(RETIRE_TIMEOUT, async {
        let mut sink = [0u8; 4096];
        while matches!(up_rx.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Reads the first packet, which must be a CONNECT. `None`: the client went away first.
async fn read_connect(
    tls: &mut Tls,
    buf: &mut BytesMut,
    identity: &str,
) -> Result<Option<rumqttc::mqttbytes::v4::Connect>, Refused> {
    let protocol = |detail: String| refused(BrokerRefusal::Protocol, identity, detail);
    let read = async {
        loop {
            if let Some(p) = first_packet(buf).map_err(protocol)? {
                return Ok(Some(p));
            }
            match tls.read_buf(buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if ordinary(&e) => return Ok(None),
                Err(e) => return Err(protocol(format!("reading CONNECT: {e}"))),
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Err(_) => Err(protocol("no CONNECT in time".into())),
        Ok(Ok(Some(MqttPacket::Connect(c)))) => Ok(Some(c)),
        Ok(Ok(Some(_))) => Err(protocol("first packet is not CONNECT".into())),
        Ok(r) => r.map(|_| None),
    }
}

/// The first packet once `buf` holds it whole (`None`: not yet); refused when malformed
/// or larger than a CONNECT may be.
fn first_packet(buf: &BytesMut) -> Result<Option<MqttPacket>, String> {
    let mut probe = buf.clone();
    match MqttPacket::read(&mut probe, MAX_CONNECT) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) if buf.len() > MAX_CONNECT => {
            Err("first packet too large".into())
        }
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(format!("bad first packet: {e}")),
    }
}

/// The CONNECT frame at the front of `buf` replaced by `connect` re-encoded; anything
/// the client pipelined after it is kept. Returns (new CONNECT frame, the rest).
fn replace_connect(
    mut buf: BytesMut,
    connect: rumqttc::mqttbytes::v4::Connect,
) -> Result<(BytesMut, BytesMut), String> {
    let frame_len = rumqttc::mqttbytes::check(buf.iter(), MAX_CONNECT)
        .map_err(|e| e.to_string())?
        .frame_length();
    let rest = buf.split_off(frame_len);
    let mut out = BytesMut::with_capacity(frame_len + 64);
    MqttPacket::Connect(connect)
        .write(&mut out, MAX_CONNECT * 2)
        .map_err(|e| e.to_string())?;
    Ok((out, rest))
}

type Refusal = (ConnectReturnCode, Refused);

/// The login rules of the front; returns the CONNECT to pass on (password replaced by
/// the front's token) or the CONNACK code and refusal.
fn admit(
    auth: &BrokerAuth,
    identity: &str,
    mut connect: rumqttc::mqttbytes::v4::Connect,
) -> Result<(rumqttc::mqttbytes::v4::Connect, Principal), Refusal> {
    use ConnectReturnCode::*;
    if !auth.sessions.may_connect(identity, Instant::now()) {
        return Err((
            ServiceUnavailable,
            refused(
                BrokerRefusal::ConnectRate,
                identity,
                format!(
                    "more than {} connects in a burst or {}/s",
                    super::limits::CONNECT_BURST,
                    super::limits::CONNECTS_PER_SEC
                ),
            ),
        ));
    }
    let login_refused = |detail: String| {
        (
            BadUserNamePassword,
            refused(BrokerRefusal::Login, identity, detail),
        )
    };
    let Some(login) = connect.login.as_mut() else {
        return Err(login_refused(format!(
            "certificate {identity:?} sent no username"
        )));
    };
    if login.username != identity {
        return Err(login_refused(format!(
            "certificate {identity:?} may not log in as {:?}",
            clip(&login.username)
        )));
    }
    if connect.client_id != identity {
        return Err((
            BadClientId,
            refused(
                BrokerRefusal::ClientId,
                identity,
                format!(
                    "certificate {identity:?} may not use client id {:?}: the client id must be the certificate's name",
                    clip(&connect.client_id)
                ),
            ),
        ));
    }
    let principal =
        match identity.strip_prefix(crate::pki::INTEGRATION_CN_PREFIX) {
            // An integration's certificate is its credential (as on mosquitto, where the
            // certificate names the user); its password is ignored.
            Some(name) => {
                if !auth.devices.integration_active(name) {
                    return Err(login_refused(format!(
                    "integration {name:?} was revoked or never created (`drover integration list`)"
                )));
                }
                Principal::Integration
            }
            None => {
                if !auth.devices.password_ok(identity, &login.password) {
                    return Err(login_refused(format!(
                        "{identity} is not an enrolled, active device, or its password is wrong"
                    )));
                }
                Principal::Device(DeviceId::new(identity).map_err(|e| {
                    login_refused(format!("certificate CN is not a device id: {e}"))
                })?)
            }
        };
    login.password = auth.devices.front_token(identity);
    if let Some(will) = &connect.last_will {
        if !principal.may_publish(&will.topic) {
            return Err((
                NotAuthorized,
                refused(
                    BrokerRefusal::Acl,
                    identity,
                    format!("may not set a last will on {:?}", clip(&will.topic)),
                ),
            ));
        }
    }
    Ok((connect, principal))
}

/// Answers a refused CONNECT with a CONNACK naming the reason, then closes.
async fn refuse_connect(tls: &mut Tls, code: ConnectReturnCode) {
    let mut b = BytesMut::with_capacity(4);
    if MqttPacket::ConnAck(ConnAck::new(code, false))
        .write(&mut b, 16)
        .is_ok()
    {
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let _ = tls.write_all(&b).await;
            let _ = tls.shutdown().await;
        })
        .await;
    }
}

/// Relays the client's packets to rumqttd, one whole packet at a time, checking each
/// PUBLISH and SUBSCRIBE against the ACL and pacing them by the identity's rates. MQTT
/// 3.1.1 cannot refuse a publish, so an ACL violation closes the connection, and a
/// device over its rate is held back (TCP pushes back on it), not dropped.
async fn filter_client(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    identity: &str,
    principal: &Principal,
    auth: &BrokerAuth,
    mut buf: BytesMut,
) -> Result<(), Refused> {
    let protocol = |detail: String| refused(BrokerRefusal::Protocol, identity, detail);
    let mut out = BytesMut::new();
    loop {
        while let Some((frame, message)) = next_packet(&mut buf, identity, principal)? {
            if let Some((wait, limit)) =
                auth.sessions
                    .charge(identity, message, frame.len(), Instant::now())
            {
                if !out.is_empty() && to.write_all(&out).await.is_err() {
                    return Ok(());
                }
                out.clear();
                throttled(auth, identity, limit, wait);
                tokio::time::sleep(wait).await;
            }
            out.extend_from_slice(&frame);
        }
        if !out.is_empty() {
            // rumqttd closing its side (it replaced the session, or stopped) is an end,
            // not a refusal.
            if to.write_all(&out).await.is_err() {
                return Ok(());
            }
            out.clear();
        }
        match from.read_buf(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if ordinary(&e) => return Ok(()),
            Err(e) => return Err(protocol(format!("reading from client: {e}"))),
        }
    }
}

/// Splits the next whole packet off `buf` (`None`: not yet whole) and checks it: a
/// PUBLISH or SUBSCRIBE against the ACL, no second CONNECT. Returns the frame and whether
/// it is a message (PUBLISH, SUBSCRIBE, UNSUBSCRIBE) rather than an ack or a ping.
fn next_packet(
    buf: &mut BytesMut,
    identity: &str,
    principal: &Principal,
) -> Result<Option<(BytesMut, bool)>, Refused> {
    let acl = |detail: String| refused(BrokerRefusal::Acl, identity, detail);
    let protocol = |detail: String| refused(BrokerRefusal::Protocol, identity, detail);
    let header = match rumqttc::mqttbytes::check(buf.iter(), MAX_PAYLOAD) {
        Ok(h) => h,
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(protocol(format!("bad packet: {e}"))),
    };
    let frame = buf.split_to(header.frame_length());
    let kind = frame.first().map(|b| b >> 4);
    match kind {
        Some(3) => {
            let topic =
                publish_topic(&frame).ok_or_else(|| protocol("malformed PUBLISH".into()))?;
            if !principal.may_publish(topic) {
                return Err(acl(format!("may not publish to {:?}", clip(topic))));
            }
        }
        Some(8) => {
            let mut probe = frame.clone();
            let Ok(MqttPacket::Subscribe(sub)) = MqttPacket::read(&mut probe, MAX_CONNECT) else {
                return Err(protocol("malformed SUBSCRIBE".into()));
            };
            if let Some(f) = sub
                .filters
                .iter()
                .find(|f| !principal.may_subscribe(&f.path))
            {
                return Err(acl(format!("may not subscribe to {:?}", clip(&f.path))));
            }
        }
        Some(1) => return Err(protocol("a second CONNECT".into())),
        _ => {}
    }
    // PUBLISH, SUBSCRIBE and UNSUBSCRIBE are messages; acks and pings cost bytes.
    Ok(Some((frame, matches!(kind, Some(3 | 8 | 10)))))
}

/// Fuzzing entry (`control-plane/fuzz`, target `mqtt_front`): the bytes a device sends
/// after the TLS handshake, through the front's packet reading as `relay` runs it, minus
/// TLS, sockets, logins and rates: the first-packet reader (fed `data` in pieces of a
/// size taken from its first byte, as reads arrive), the CONNECT re-encoding with the
/// last-will ACL, then the packet splitter with its ACL checks. Nothing may panic, and
/// the splitter must consume exactly the bytes it accepts.
#[doc(hidden)]
pub fn fuzz_device_bytes(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let device = Principal::Device(DeviceId::new("gw-fuzz").expect("a valid device id"));
    let mut pieces = data.chunks(step);
    let mut buf = BytesMut::new();
    let connect = loop {
        match first_packet(&buf) {
            Ok(Some(MqttPacket::Connect(c))) => break c,
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return,
            },
        }
    };
    if let Some(will) = &connect.last_will {
        let _ = device.may_publish(&will.topic);
    }
    let Ok((out, mut buf)) = replace_connect(buf, connect) else {
        return;
    };
    assert!(matches!(
        first_packet(&out),
        Ok(Some(MqttPacket::Connect(_)))
    ));
    loop {
        let before = buf.len();
        match next_packet(&mut buf, "gw-fuzz", &device) {
            Ok(Some((frame, _))) => assert_eq!(frame.len() + buf.len(), before),
            Ok(None) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return,
            },
            Err(_) => return,
        }
    }
}

/// Counts a held-back packet and logs it once per identity and interval.
pub(super) fn throttled(auth: &BrokerAuth, identity: &str, limit: Limit, wait: Duration) {
    let (counter, what) = match limit {
        Limit::Messages => (&auth.metrics.broker_throttled_messages, "messages"),
        Limit::Bytes => (&auth.metrics.broker_throttled_bytes, "bytes"),
    };
    counter.fetch_add(1, Relaxed);
    if let Some(suppressed) = auth
        .sessions
        .log
        .due(&format!("{identity} throttled {what}"), Instant::now())
    {
        tracing::warn!(
            device_id = identity,
            limit = what,
            wait_ms = wait.as_millis() as u64,
            suppressed,
            "device over its rate: packets held back"
        );
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
    use drover_protocol::topics;

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

    fn connect_frame(client_id: &str) -> BytesMut {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(client_id);
        c.set_login(client_id, "pw");
        let mut b = BytesMut::new();
        MqttPacket::Connect(c).write(&mut b, MAX_CONNECT).unwrap();
        b
    }

    #[test]
    fn the_packet_splitter_passes_own_topics_whole_and_refuses_the_rest() {
        let gw = DeviceId::new("gw-fuzz").unwrap();
        let own = topics::uplink(&gw, topics::UplinkKind::Labels);
        let mut buf = publish_frame(&own, 300);
        let whole = buf.len();
        buf.extend_from_slice(&publish_frame("drover/v1/dev/gw-b/up/labels", 3));
        // A split packet waits for its end.
        let mut head = BytesMut::from(&buf[..whole - 1]);
        let gw_id = "gw-fuzz";
        let gw = Principal::Device(gw);
        assert!(matches!(next_packet(&mut head, gw_id, &gw), Ok(None)));
        let (frame, message) = next_packet(&mut buf, gw_id, &gw).unwrap().unwrap();
        assert_eq!((frame.len(), message), (whole, true));
        let err = next_packet(&mut buf, gw_id, &gw).unwrap_err();
        assert!(err.detail.contains("may not publish"), "{err:?}");
        let mut second = connect_frame("gw-fuzz");
        let err = next_packet(&mut second, gw_id, &gw).unwrap_err();
        assert!(err.detail.contains("a second CONNECT"), "{err:?}");
    }

    #[test]
    fn the_first_packet_must_be_a_whole_connect_within_its_cap() {
        let c = connect_frame("gw-fuzz");
        assert!(matches!(first_packet(&c.clone().split_to(5)), Ok(None)));
        assert!(matches!(first_packet(&c), Ok(Some(MqttPacket::Connect(_)))));
        // A claimed length beyond the cap is refused once the cap is passed.
        let mut big = BytesMut::from(&[0x10, 0xff, 0xff, 0x03][..]);
        big.extend_from_slice(&vec![0; MAX_CONNECT + 1]);
        assert!(first_packet(&big).is_err());
        assert!(first_packet(&BytesMut::from(&[0xf0, 0x00][..])).is_err());
        // The fuzz entry runs a session (CONNECT, then an own PUBLISH) in pieces.
        let mut session = vec![7u8];
        session.extend_from_slice(&c);
        let gw = DeviceId::new("gw-fuzz").unwrap();
        session.extend_from_slice(&publish_frame(
            &topics::uplink(&gw, topics::UplinkKind::Labels),
            40,
        ));
        fuzz_device_bytes(&session);
        fuzz_device_bytes(&[]);
        fuzz_device_bytes(&[0]);
    }
}
