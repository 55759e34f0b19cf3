//! The control plane's MQTT sessions (rumqttc): the only module that touches the MQTT
//! client. Each session's event loop runs alone in its task (publishing from the polling
//! task can deadlock rumqttc under load); incoming uplink publishes are handed to ingest
//! over a bounded channel, so a slow database back-pressures the broker, not memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::BrokerUrl;

/// One publish as received: topic and payload, not yet parsed or authenticated.
#[derive(Debug)]
pub struct RawUplink {
    pub topic: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtts:// needs a CA bundle: set broker_ca_file")]
    NoCaFile,
    #[error("cannot read CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("publish to {topic} failed: {source}")]
    Publish {
        topic: String,
        source: rumqttc::ClientError,
    },
}

/// The publishing sessions: each its own connection, request queue and in-flight window,
/// so a backlog in one lane never delays another. Acks to every device of a large fleet
/// (thousands of publishes every ack interval) queued in one session with commands and
/// model chunks held a wave's first chunks back by seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Signed commands, hello replies, the keyring: few, and each one waited for.
    Control = 0,
    /// Model chunks on the shared chunk topics: large, and what a rollout waits for.
    Chunks = 1,
    /// Uplink acks and integration records: many, none urgent to the millisecond.
    Bulk = 2,
}

/// Number of publishing sessions, one per [`Lane`]; uplink sessions come after them.
const LANES: usize = 3;

/// Handle to the sessions: the first [`LANES`] publish, the rest receive uplinks.
pub struct MqttLink {
    clients: Vec<AsyncClient>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    stop_ingest: watch::Sender<bool>,
    stop_publisher: watch::Sender<bool>,
    /// Count of uplink subscriptions acknowledged by the broker.
    subscribed: watch::Receiver<usize>,
    sessions: usize,
}

impl MqttLink {
    /// Connects `sessions` sessions; with more than one they share the uplink filter.
    pub fn start(
        url: &BrokerUrl,
        ca_file: Option<&Path>,
        identity: Option<(&Path, &Path)>,
        client_prefix: &str,
        sessions: usize,
        inbound: mpsc::Sender<RawUplink>,
    ) -> Result<Self, MqttError> {
        let tls = if url.tls {
            Some(tls_config(ca_file.ok_or(MqttError::NoCaFile)?, identity)?)
        } else {
            None
        };
        let (stop_ingest, ingest_rx) = watch::channel(false);
        let (stop_publisher, publisher_rx) = watch::channel(false);
        let (subacked, subscribed) = watch::channel(0usize);
        let subacked = Arc::new(subacked);
        let filter = if sessions > 1 {
            drover_protocol::topics::uplink_filter_shared("drover-ingest")
        } else {
            drover_protocol::topics::uplink_filter_all()
        };
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        // Publishing sessions publish only, so their queues never wait behind ingest.
        for n in 0..LANES + sessions {
            let mut o = MqttOptions::new(format!("{client_prefix}-{n}"), &url.host, url.port);
            o.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(
                    drover_protocol::envelope::MAX_MQTT_PACKET,
                    drover_protocol::envelope::MAX_MQTT_PACKET,
                )
                .set_inflight(1000)
                .set_request_channel_capacity(4096);
            if let Some(t) = &tls {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    Arc::clone(t),
                )));
            }
            if let Some(u) = &url.username {
                o.set_credentials(u.clone(), url.password.clone().unwrap_or_default());
            }
            let (client, eventloop) = AsyncClient::new(o, 4096);
            let uplink = n >= LANES;
            tasks.push(tokio::spawn(poll_loop(
                client.clone(),
                eventloop,
                uplink.then(|| filter.clone()),
                uplink.then(|| inbound.clone()),
                if !uplink {
                    publisher_rx.clone()
                } else {
                    ingest_rx.clone()
                },
                Arc::clone(&subacked),
            )));
            clients.push(client);
        }
        Ok(Self {
            clients,
            tasks: std::sync::Mutex::new(tasks),
            stop_ingest,
            stop_publisher,
            subscribed,
            sessions,
        })
    }

    /// Waits until every uplink session's subscription is acknowledged (so nothing a
    /// device publishes from now on is missed), or `timeout` passes; returns whether ready.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.subscribed.clone();
        let want = self.sessions;
        tokio::time::timeout(timeout, rx.wait_for(|n| *n >= want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub async fn publish(
        &self,
        lane: Lane,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), MqttError> {
        self.clients[lane as usize]
            .publish(topic.clone(), qos, retain, payload)
            .await
            .map_err(|source| MqttError::Publish { topic, source })
    }

    /// Stops the uplink sessions; their poll loops end and drop the ingest channel, so
    /// ingest stores what is queued and stops. The publishing sessions keep running.
    pub fn stop_ingest(&self) {
        let _ = self.stop_ingest.send(true);
        for c in self.clients.iter().skip(LANES) {
            let _ = c.try_disconnect();
        }
    }

    /// Disconnects every session and waits for the poll loops to end.
    pub async fn shutdown(&self) {
        self.stop_ingest();
        let _ = self.stop_publisher.send(true);
        for c in self.clients.iter().take(LANES) {
            let _ = c.try_disconnect();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// A rustls client config trusting the CA certificates in a PEM file, presenting the
/// client certificate `identity` (cert, key) when given.
pub fn tls_config(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca_err = |detail: String| MqttError::CaFile {
        path: ca_file.display().to_string(),
        detail,
    };
    let pem = std::fs::read(ca_file).map_err(|e| ca_err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| ca_err(e.to_string()))?;
        roots.add(c).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let id_err = |path: &Path, detail: String| MqttError::CaFile {
                path: path.display().to_string(),
                detail,
            };
            let cert_pem = std::fs::read(cert).map_err(|e| id_err(cert, e.to_string()))?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| id_err(cert, e.to_string()))?;
            let key_pem = crate::keys::read_private(key).map_err(|e| id_err(key, e.to_string()))?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| id_err(key, e.to_string()))?;
            cfg.with_client_auth_cert(certs, key_der)
                .map_err(|e| MqttError::Tls(e.to_string()))?
        }
        None => cfg.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

async fn poll_loop(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    filter: Option<String>,
    // None for a publishing session: it must not keep the ingest channel open.
    inbound: Option<mpsc::Sender<RawUplink>>,
    mut stop: watch::Receiver<bool>,
    subacked: Arc<watch::Sender<usize>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = stop.changed() => {
                // Let the disconnect request go out, briefly.
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                tracing::debug!("mqtt session connected");
                if let Some(f) = &filter {
                    // try_: never wait on the request channel from the polling task.
                    if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "cannot subscribe to uplink");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subacked.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let raw = RawUplink {
                    topic: p.topic,
                    payload: p.payload,
                };
                if let Some(tx) = &inbound {
                    if tx.send(raw).await.is_err() {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if *stop.borrow() {
                    return;
                }
                tracing::warn!(error = %e, "mqtt session error; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
